//! The one path every client message takes toward an upstream, whatever carried it:
//! Streamable HTTP (one message or a batch member), the legacy HTTP+SSE transport, or the
//! stateless 2026-07-28 revision.
//!
//! ```text
//! transport ─ framing, Host/Origin, authentication, the sealed session, the body read strictly
//!     │
//!     ▼
//! dispatch(call, message, exchange)
//!     ├─ Action::read ─ the one reading of the message (method, tool, arguments) that the
//!     │                 audit record keeps and policy will decide on
//!     ├─ per-method arm ─ decision point (allow, deny, hold: policy)
//!     ├─ forward ─ the only way to an upstream connector: relay within the session (and its
//!     │            upstream side re-opened behind it, `continuity`), or the caller's own
//!     │            stateless session; people not connected to an OAuth upstream are answered
//!     │            by the gateway (`unconnected`)
//!     └─ listing arms ─ filter point for what the caller may see
//!     │
//!     ▼
//! transport ─ the reply as JSON or SSE; the exchange becomes one audit record per message
//! ```
//!
//! `GET` (the server-to-client stream) and `DELETE` (the end of a session) carry no client
//! message; they reach the upstream through [`listen`] and [`close`] here too.

use std::sync::Arc;

use http::HeaderMap;
use serde_json::Value;

use super::{Env, Server};
use super::{catalog, continuity, guard, stateless, unconnected};
use crate::authn::Principal;
use crate::error::{Failure, GatewayError};
use crate::protocol::jsonrpc::{Kind, Message, ToolCall};
use crate::protocol::session::SessionState;
use crate::upstream::{Reply, UpstreamError};

/// Who sends a message, to which server, and within which session.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    /// What the dispatch needs of the gateway around it.
    pub env: Env<'a>,
    /// The configured server the message is for.
    pub server: &'a Arc<Server>,
    /// The authenticated caller.
    pub caller: &'a Principal,
    /// The session it belongs to.
    pub via: Via<'a>,
}

/// The session a message belongs to.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    /// None yet: only `initialize` opens one.
    Opening,
    /// A sealed session opened by this caller at this server.
    Session(&'a SessionState),
    /// A stateless (2026-07-28) request, which carries its revision and capabilities itself.
    Stateless(&'a HeaderMap),
}

/// What dispatching a message produced.
pub enum Outcome {
    /// The answer to relay to the client (`Reply::Accepted` for notifications and responses).
    Reply(Reply),
    /// A new session: the `initialize` response, the session, and its sealed id.
    Opened {
        /// The JSON-RPC response to `initialize`.
        response: Value,
        /// The session.
        state: Box<SessionState>,
        /// Its sealed id, for `Mcp-Session-Id`.
        sealed: String,
    },
}

/// What the dispatch tells the message's audit record.
#[derive(Debug, Default)]
pub struct Trace {
    /// The tool a `tools/call` runs, with its arguments, as the upstream reads them.
    pub tool: Option<ToolCall>,
    /// Whether the message went on toward the upstream (after it, a client that hangs up
    /// leaves a call the upstream may have acted on).
    pub forwarded: bool,
    /// What policy decided, where a decision was taken ([`guard`]).
    pub policy: Option<guard::Verdict>,
}

/// What a message asks for, read once from its strictly parsed envelope.
#[derive(Debug)]
pub enum Action {
    /// `initialize`: opens a session.
    Initialize,
    /// `server/discover` (2026-07-28).
    Discover,
    /// `tools/call`: one tool with its arguments.
    CallTool(ToolCall),
    /// `tools/list`, `prompts/list`, `resources/list`, `resources/templates/list`.
    List(&'static str),
    /// `resources/read`, `resources/subscribe`, `resources/unsubscribe`.
    Resource,
    /// `prompts/get`.
    GetPrompt,
    /// `completion/complete`.
    Complete,
    /// Any other request (`ping`, `logging/setLevel`, methods the gateway does not know).
    Request,
    /// A notification (`notifications/*`): no answer.
    Notify,
    /// A response to a request the server sent (sampling, elicitation, roots).
    Answer,
}

impl Action {
    /// Reads what `message` asks for. Refused here: a `tools/call` without a tool name, and a
    /// "notification" (no `id`, or `id: null`) whose method is not a `notifications/…` one:
    /// an upstream that runs such messages anyway would run them past every per-method arm.
    pub fn read(message: &Message) -> Result<Action, GatewayError> {
        Ok(match (message.kind, message.method()) {
            (Kind::Response, _) => Action::Answer,
            (Kind::Notification, method) if method.starts_with("notifications/") => Action::Notify,
            (Kind::Notification, method) => {
                let shown: String = method.chars().take(64).collect();
                let text = format!("`{shown}` is not a notification: a request needs an `id`");
                return Err(GatewayError::InvalidRequest(text));
            }
            (Kind::Request, "initialize") => Action::Initialize,
            (Kind::Request, "server/discover") => Action::Discover,
            (Kind::Request, "tools/call") => {
                match message.tool_call().map_err(|e| GatewayError::InvalidParams(e.into()))? {
                    Some(tool) => Action::CallTool(tool),
                    None => Action::Request,
                }
            }
            (Kind::Request, "tools/list") => Action::List("tools/list"),
            (Kind::Request, "prompts/list") => Action::List("prompts/list"),
            (Kind::Request, "resources/list") => Action::List("resources/list"),
            (Kind::Request, "resources/templates/list") => Action::List("resources/templates/list"),
            (Kind::Request, "resources/read" | "resources/subscribe" | "resources/unsubscribe") => Action::Resource,
            (Kind::Request, "prompts/get") => Action::GetPrompt,
            (Kind::Request, "completion/complete") => Action::Complete,
            (Kind::Request, _) => Action::Request,
        })
    }
}

/// Dispatches one client message: reads it, takes the per-method steps, and forwards it.
/// Everything a client sends to an upstream passes here, once per JSON-RPC message.
///
/// The paths most messages do not take (opening a session, the stateless revision, servers
/// with upstream OAuth) are boxed, so that the future of the common one, a message relayed
/// within a session, stays small: it is built and moved for every message.
pub async fn dispatch(call: Call<'_>, message: Message, trace: &mut Trace) -> Result<Outcome, Failure> {
    let id = message.id.clone();
    let mut action = Action::read(&message).map_err(|e| e.with_id(id.clone()))?;
    if let Action::CallTool(tool) = &mut action {
        // The trace keeps the one reading; the arm below needs only to know it is a call.
        trace.tool = Some(ToolCall { name: std::mem::take(&mut tool.name), arguments: tool.arguments.take() });
    }
    // A stateless (2026-07-28) request opens no session: each is a `connect` decision too.
    if matches!(call.via, Via::Stateless(_)) && !guard::may_connect(&call, trace) {
        return Err(GatewayError::UnknownServer(call.server.config.name.clone()).with_id(id));
    }
    match action {
        Action::Initialize => match call.via {
            // Decision point: may the caller use this server at all (`connect`)? A refusal
            // is answered as an unknown server is.
            Via::Opening if !guard::may_connect(&call, trace) => {
                Err(GatewayError::UnknownServer(call.server.config.name.clone()).with_id(id))
            }
            Via::Opening => {
                let opened = Box::pin(super::initialize(call.env, call.server, call.caller, &message));
                let (response, state, sealed) = opened.await?;
                Ok(Outcome::Opened { response, state: Box::new(state), sealed })
            }
            // A stateless client has no lifecycle; within a session, `initialize` comes once.
            Via::Session(_) | Via::Stateless(_) => {
                let text = "initialize opens a session and comes first, once";
                Err(GatewayError::InvalidRequest(text.into()).with_id(id))
            }
        },
        Action::Discover if matches!(call.via, Via::Stateless(_)) => {
            Box::pin(stateless::discover(call.env.clock, call.server, &call.caller.id, id.as_ref()))
                .await
                .map(Outcome::Reply)
        }
        // Decision point: whether `call.caller` may run this tool with these arguments; a
        // refusal answers as an unknown tool does.
        Action::CallTool(_) | Action::Resource | Action::GetPrompt | Action::Complete => {
            if let Some(refusal) = guard::check(&call, &message, trace) {
                return Ok(Outcome::Reply(refusal));
            }
            forward(call, message, trace).await
        }
        // Filter point: a listing shows only what the caller may use.
        Action::List(method) => match forward(call, message, trace).await? {
            Outcome::Reply(reply) => Ok(Outcome::Reply(guard::filter(&call, method, reply))),
            opened @ Outcome::Opened { .. } => Ok(opened),
        },
        Action::Discover | Action::Request | Action::Notify | Action::Answer => forward(call, message, trace).await,
    }
}

/// Sends a message on toward the upstream: the only way from a client message to an
/// upstream connector.
async fn forward(call: Call<'_>, message: Message, trace: &mut Trace) -> Result<Outcome, Failure> {
    let id = message.id.clone();
    // Strict durability: a call whose record could not be kept is not made at all.
    if let Some(audit) = call.env.audit
        && audit.durability() == crate::audit::Durability::Strict
        && let Some(why) = audit.refuses_strict()
    {
        let refusal = match why {
            crate::audit::AuditError::Unprotected => GatewayError::AuditUnprotected,
            _ => GatewayError::AuditFull,
        };
        return Err(refusal.with_id(id));
    }
    trace.forwarded = true;
    let reply = match call.via {
        Via::Session(session) => relay(call.server, session, message).await?,
        Via::Stateless(_) => Box::pin(stateless::relay(call.env.clock, call.server, &call.caller.id, message)).await?,
        Via::Opening => return Err(GatewayError::MissingSession.with_id(id)),
    };
    Ok(Outcome::Reply(reply))
}

/// Relays one message of an established session.
async fn relay(server: &Server, session: &SessionState, message: Message) -> Result<Reply, Failure> {
    let id = message.id.clone();
    let tool_call = message.method() == "tools/call";
    let sent = match server.continuity() {
        Some(continuity) => match Box::pin(relay_continued(server, continuity, session, message)).await? {
            Relayed::Sent(sent) => sent,
            Relayed::Answered(reply) => return Ok(reply),
        },
        None => server.upstream.send(session, message).await,
    };
    match sent {
        // A tool call that needs the caller to (re)connect: a URL-mode elicitation for clients
        // that declared it, a tool error carrying the link for the others.
        Err(UpstreamError::Authorization { reason, link: Some(link), .. })
            if tool_call && session.features & crate::upstream::mux::features::ELICITATION_URL == 0 =>
        {
            Ok(unconnected::link_tool_result(id.as_ref(), &reason, &link))
        }
        other => other.map_err(|e| GatewayError::from(e).with_id(id)),
    }
}

/// What [`relay_continued`] did.
enum Relayed {
    /// Sent upstream; the upstream's answer or why it failed.
    Sent(Result<Reply, UpstreamError>),
    /// Answered by the gateway (the caller is not connected).
    Answered(Reply),
}

/// Relays within a session of an OAuth server, whose upstream side the gateway may open or
/// re-open behind the client's session id (see `continuity`), and whose listings it keeps
/// (see `catalog`).
async fn relay_continued(
    server: &Server,
    continuity: &continuity::Continuity,
    session: &SessionState,
    message: Message,
) -> Result<Relayed, Failure> {
    let id = message.id.clone();
    let fail = |e: UpstreamError| GatewayError::from(e).with_id(id.clone());
    let mut side = continuity.current(session).await.map_err(fail)?;
    if side.as_ref().is_some_and(|s| s.closed) {
        return Ok(Relayed::Sent(Err(UpstreamError::SessionExpired)));
    }
    // The first answer after the upstream side was opened behind a session that showed the
    // stand-in listings tells the client its lists changed.
    let mut announce = false;
    if side.is_none() && session.pending {
        if !unconnected::is_connected(server, &session.subject).await.map_err(fail)? {
            let reply = unconnected::answer(server, &session.subject, session.features, &message).await?;
            return Ok(Relayed::Answered(reply));
        }
        side = match continuity.reopen(&server.upstream, session, None).await {
            Ok(reopened) => Some(opened(server, reopened)),
            Err(e) => return Ok(Relayed::Sent(Err(e))),
        };
        announce = message.kind == Kind::Request;
    }
    if session.pending
        && let Some(reply) = unconnected::connected_answer(server, &message).await
    {
        return Ok(Relayed::Answered(if announce { unconnected::with_list_changed(reply) } else { reply }));
    }
    let listing = catalog::listing_of(&message);
    let effective = side.as_ref().map(|s| s.apply(session));
    let mut sent = server.upstream.send(effective.as_ref().unwrap_or(session), message.clone()).await;
    if matches!(sent, Err(UpstreamError::SessionExpired)) {
        // The upstream forgot the session: open it again behind the same id, and send again
        // (a 404 means the upstream did not act on the message).
        sent = match continuity.reopen(&server.upstream, session, side.as_deref()).await {
            Ok(reopened) => server.upstream.send(&opened(server, reopened).apply(session), message).await,
            Err(e) => Err(e),
        };
    }
    let sent = match (listing, server.catalog()) {
        (Some(listing), Some(catalog)) => sent.map(|reply| catalog.tee(listing, reply)),
        _ => sent,
    };
    Ok(Relayed::Sent(if announce { sent.map(unconnected::with_list_changed) } else { sent }))
}

/// `session` with the upstream side the gateway opened behind it later, if it did
/// (`continuity`); a session the client ended is expired.
async fn upstream_side(server: &Server, session: &SessionState) -> Result<Option<SessionState>, UpstreamError> {
    let Some(continuity) = server.continuity() else { return Ok(None) };
    match continuity.current(session).await? {
        Some(side) if side.closed => Err(UpstreamError::SessionExpired),
        Some(side) => Ok(Some(side.apply(session))),
        None => Ok(None),
    }
}

/// Opens the session's server-to-client stream (HTTP GET), resumed after `last_event_id`.
pub async fn listen(
    server: &Server,
    session: &SessionState,
    last_event_id: Option<&str>,
) -> Result<Reply, UpstreamError> {
    let side = upstream_side(server, session).await?;
    server.upstream.listen(side.as_ref().unwrap_or(session), last_event_id).await
}

/// Ends the session (HTTP DELETE): its upstream side, and for an OAuth server the record that
/// no replica may open it again.
pub async fn close(server: &Server, session: &SessionState) -> Result<(), UpstreamError> {
    let closed = close_upstream(server, session).await;
    if let Some(continuity) = server.continuity() {
        continuity.close(session).await?;
    }
    closed
}

/// Ends the session's upstream side only (a legacy SSE stream closing: its id lives in the
/// stream, so nobody can present it again).
pub async fn close_upstream(server: &Server, session: &SessionState) -> Result<(), UpstreamError> {
    // The side in the store: another replica may have re-opened the session behind this id.
    let side = match server.continuity() {
        Some(continuity) => match continuity.latest(session).await? {
            Some(side) if side.closed => return Err(UpstreamError::SessionExpired),
            side => side.map(|s| s.apply(session)),
        },
        None => None,
    };
    server.upstream.close(side.as_ref().unwrap_or(session)).await
}

/// The side a re-open chose; the upstream's `initialize` result, when it opened one, goes
/// into the catalog.
fn opened(server: &Server, (side, init): (Arc<continuity::Side>, Option<Value>)) -> Arc<continuity::Side> {
    if let (Some(catalog), Some(init)) = (server.catalog(), init) {
        catalog.observe(catalog::INITIALIZE, "", &init);
    }
    side
}
