//! MCP dispatch: the gateway is an MCP server to the client and an MCP client to the upstream.
//! It steps in for the lifecycle (`initialize`, `server/discover`) and relays everything else
//! untouched.

pub mod catalog;
pub mod continuity;
pub mod stateless;
pub mod unconnected;
pub mod version;

use serde_json::Value;

use crate::app::{AppState, Server};
use crate::authn::Principal;
use crate::error::{Failure, GatewayError};
use crate::transport::jsonrpc::{Message, result_response};
use crate::transport::session::{SessionState, binding, new_session_key};
use crate::upstream::{ClientHello, Reply, UpstreamError};

/// A client's `initialize`: open an upstream session with the client's capabilities, seal
/// the gateway session, and answer with the upstream's server info at the client's revision.
///
/// Returns the response, the session, and its sealed id for the `Mcp-Session-Id` header.
pub async fn initialize(
    app: &AppState,
    server: &Server,
    principal: &Principal,
    message: &Message,
) -> Result<(Value, SessionState, String), Failure> {
    let id = message.id.clone();
    let fail = |e: GatewayError| e.with_id(id.clone());
    let request = message.value().map_err(|e| fail(e.into()))?;
    let params = request.get("params").cloned().unwrap_or(Value::Null);
    let requested = params
        .get("protocolVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| fail(GatewayError::InvalidParams("initialize needs params.protocolVersion".into())))?;
    let protocol = version::negotiate(requested);
    let hello = ClientHello {
        protocol: protocol.to_owned(),
        capabilities: params.get("capabilities").cloned().unwrap_or_else(|| serde_json::json!({})),
        client_info: params
            .get("clientInfo")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"name": "unknown", "version": "0"})),
        caller: principal.id.clone(),
    };
    let key = new_session_key();
    // An OAuth upstream the caller has not connected yet: the gateway answers for it (see
    // `unconnected`), and opens the upstream side behind this same session once they have.
    let connected = unconnected::is_connected(server, &principal.id).await.map_err(|e| fail(e.into()))?;
    let (opened, pending) = if connected {
        match server.upstream.open(&hello, &key).await {
            Ok(opened) => (opened, false),
            Err(crate::upstream::UpstreamError::Authorization { .. }) => {
                (unconnected::initialize_result(server, protocol).await, true)
            }
            Err(e) => return Err(fail(e.into())),
        }
    } else {
        (unconnected::initialize_result(server, protocol).await, true)
    };
    if let (Some(catalog), false) = (server.catalog(), pending) {
        catalog.observe(catalog::INITIALIZE, "", &opened.result);
    }
    // A stateless upstream needs the client's capabilities in every request's `_meta`; an
    // OAuth upstream may have to be opened again behind this session (`continuity`).
    let keep_hello = opened.upstream_protocol == version::STATELESS || server.continuity().is_some();
    let state = SessionState {
        version: 1,
        key,
        client_protocol: protocol.to_owned(),
        upstream_protocol: opened.upstream_protocol,
        upstream_session: opened.upstream_session,
        created: app.clock().unix_secs(),
        hello: keep_hello.then(|| kept_hello(&hello)),
        features: crate::upstream::mux::features::from_capabilities(&hello.capabilities),
        client: Some(client_name_version(&hello.client_info)),
        subject: principal.id.clone(),
        pending,
    };
    let sealed = app.sealer().seal(&state, &binding(&server.config.name, &principal.id));
    metrics::counter!("portcullis_sessions_opened_total", "server" => server.config.name.clone()).increment(1);
    let mut result = opened.result;
    result["protocolVersion"] = Value::from(protocol);
    let response = result_response(message.id.as_ref().unwrap_or(&Value::Null), result);
    Ok((response, state, sealed))
}

/// Largest client `initialize` kept whole in a sealed session id.
const HELLO_KEPT_BYTES: usize = 1024;

/// The client's `{capabilities, clientInfo}` as kept in its sealed session: whole when small,
/// else only the standard capabilities and the client's name and version (the id travels in
/// every request's headers).
fn kept_hello(hello: &ClientHello) -> Value {
    let whole = serde_json::json!({"capabilities": hello.capabilities, "clientInfo": hello.client_info});
    if serde_json::to_vec(&whole).map_or(usize::MAX, |v| v.len()) <= HELLO_KEPT_BYTES {
        return whole;
    }
    let (name, version) = client_name_version(&hello.client_info);
    let bits = crate::upstream::mux::features::from_capabilities(&hello.capabilities);
    serde_json::json!({
        "capabilities": crate::upstream::mux::features::to_capabilities(bits),
        "clientInfo": {"name": name, "version": version},
    })
}

/// Relays one message of an established session.
pub async fn relay(server: &Server, session: &SessionState, message: Message) -> Result<Reply, Failure> {
    let id = message.id.clone();
    let tool_call = message.method() == "tools/call";
    let sent = match server.continuity() {
        Some(continuity) => match relay_continued(server, continuity, session, message).await? {
            Relayed::Sent(sent) => sent,
            Relayed::Answered(reply) => return Ok(reply),
        },
        None => server.upstream.send(session, message).await,
    };
    match sent {
        // A tool call that needs the caller to (re)connect: a URL-mode elicitation for clients
        // that declared it, a tool error carrying the link for the others.
        Err(crate::upstream::UpstreamError::Authorization { reason, link: Some(link), .. })
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
        announce = message.kind == crate::transport::jsonrpc::Kind::Request;
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
fn opened(
    server: &Server,
    (side, init): (std::sync::Arc<continuity::Side>, Option<Value>),
) -> std::sync::Arc<continuity::Side> {
    if let (Some(catalog), Some(init)) = (server.catalog(), init) {
        catalog.observe(catalog::INITIALIZE, "", &init);
    }
    side
}

/// `clientInfo`'s name and version, cut to 64 characters each.
pub fn client_name_version(info: &Value) -> (String, String) {
    let field = |k: &str| info.get(k).and_then(Value::as_str).unwrap_or("").chars().take(64).collect::<String>();
    (field("name"), field("version"))
}
