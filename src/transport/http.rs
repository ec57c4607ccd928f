//! Streamable HTTP endpoints: `POST`, `GET` and `DELETE` on `/mcp/{server}`.
//!
//! Every POST goes through the same flat list of steps: find the server, check `Host` and
//! `Origin`, authenticate, check the media types, read the body within its limit, parse the
//! envelope, then either open a session (`initialize`) or relay within the sealed session.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;

use super::exchange::Exchange;
use super::reply;
use crate::authn::Principal;
use crate::error::{Failure, GatewayError};
use crate::layers::InScope;
use crate::mcp;
use crate::mcp::Server;
use crate::mcp::dispatch::{self, Call, Outcome, Via, dispatch};
use crate::protocol::jsonrpc::{self, Kind, Message};
use crate::protocol::session::{SessionState, binding};
use crate::protocol::version;
use crate::state::AppState;
use crate::upstream::http::{PROTOCOL_HEADER, SESSION_HEADER};

/// Which server a request is for: one of the configured servers, matched ahead of the router
/// (see `app::Front`), or a name taken from the path and looked up per request.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// A configured server.
    Server(&'a Arc<Server>),
    /// A name from the path, not yet looked up.
    Name(&'a str),
}

/// `POST`, `GET` or `DELETE` on `/mcp/{name}` of the configured server `server`, answered
/// ahead of axum's router (see `app::Front`).
pub async fn direct(app: &AppState, server: &Arc<Server>, request: Request) -> Response {
    let target = Target::Server(server);
    // GET and DELETE come once per session; boxed, their futures are not part of every POST's.
    match *request.method() {
        Method::POST => post_to(app, target, request).await,
        Method::GET => Box::pin(get_from(app, target, request)).await,
        _ => Box::pin(delete_at(app, target, request)).await,
    }
}

/// `POST /mcp/{server}` for a name that is not answered ahead of the router.
pub async fn post(State(app): State<AppState>, Path(name): Path<String>, request: Request) -> Response {
    post_to(&app, Target::Name(&name), request).await
}

/// A POST to an MCP endpoint.
///
/// It takes the whole request rather than axum's `HeaderMap` extractor, which clones the
/// headers.
async fn post_to(app: &AppState, target: Target<'_>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Until a message is read (a refusal before the body, or a body that is not JSON-RPC),
    // the record and the metric name the HTTP method, as the layers' refusals do.
    let mut ex = Exchange::new(app, "POST");
    match post_steps(app, target, &parts.headers, body, &mut ex).await {
        Ok(Posted::Answered(resp)) => app.finish(ex, resp).await,
        Ok(Posted::Batch(resp)) => {
            // Each message of the batch left its own record.
            ex.settle();
            resp
        }
        Err(failure) => {
            ex.note_failure(&failure);
            app.finish(ex, failure.into_response()).await
        }
    }
}

/// What a POST produced.
enum Posted {
    /// The answer to one message, recorded with the exchange.
    Answered(Response),
    /// The answers to a batch, whose messages were recorded one by one.
    Batch(Response),
}

async fn post_steps(
    app: &AppState,
    target: Target<'_>,
    headers: &HeaderMap,
    body: Body,
    ex: &mut Exchange,
) -> Result<Posted, Failure> {
    let (server, principal) = admit(app, target, headers, ex).await?;
    check_content_type(headers)?;
    check_accept(headers, false)?;
    let bytes = read_body(body, app.config().gateway.max_body_bytes).await?;
    ex.bytes_in = bytes.len() as u64;
    // The relay's futures are large (kilobytes of nested state); boxed here, they are built
    // only for requests that get this far, and every future before this point stays small
    // enough that refusals do not pay for copying them.
    match jsonrpc::Body::parse(bytes, app.config().gateway.max_batch)? {
        jsonrpc::Body::Single(message) => {
            ex.note_message(&message, metric_method(message.method()));
            let answered = Box::pin(one_message(app, &server, &principal, headers, None, message, ex));
            answered.await.map(Posted::Answered)
        }
        jsonrpc::Body::Batch(messages) => {
            ex.metric = "batch";
            ex.method = "batch".to_owned();
            let answered = Box::pin(batch(app, &server, &principal, headers, messages, ex));
            answered.await.map(Posted::Batch)
        }
    }
}

/// One message: through the dispatch, then its answer as JSON or SSE. Its session: none for
/// `initialize`, the caller's own stateless one on the 2026-07-28 revision, else the sealed
/// session named in the headers (`opened`, when the caller has opened it already: a batch
/// opens it once for all its messages).
async fn one_message(
    app: &AppState,
    server: &Arc<Server>,
    principal: &Principal,
    headers: &HeaderMap,
    opened: Option<&Arc<SessionState>>,
    message: Message,
    ex: &mut Exchange,
) -> Result<Response, Failure> {
    let stateless = mcp::stateless::is_stateless(headers);
    let opening = !stateless && message.kind == Kind::Request && message.method() == "initialize";
    let session = match (stateless || opening, opened) {
        (true, _) => None,
        (false, Some(session)) => Some(session.clone()),
        (false, None) => Some(session(app, server, principal, headers).map_err(|e| e.with_id(message.id.clone()))?),
    };
    let via = match &session {
        Some(session) => {
            ex.client.clone_from(&session.client);
            Via::Session(session)
        }
        None if stateless => {
            mcp::stateless::check_headers(headers, &message)?;
            ex.client = mcp::stateless::client_of(&message);
            Via::Stateless(headers)
        }
        None => Via::Opening,
    };
    let request_id = (message.kind == Kind::Request).then(|| message.id.clone()).flatten();
    let call = Call { env: app.env(), server, caller: principal, via };
    match dispatch(call, message, &mut ex.trace).await? {
        Outcome::Opened { response, state, sealed } => {
            ex.client = state.client;
            let mut resp = axum::Json(response).into_response();
            if let Ok(v) = HeaderValue::from_str(&sealed) {
                resp.headers_mut().insert(SESSION_HEADER, v);
            }
            Ok(resp)
        }
        Outcome::Reply(reply) => {
            Ok(reply::post_response(reply, request_id, server.config.request_timeout, &server.config.name).await)
        }
    }
}

/// A batch (2024-11-05 and 2025-03-26 sessions only): each message goes through the
/// dispatch in order, leaves its own audit record, and its answer joins the batch's.
async fn batch(
    app: &AppState,
    server: &Arc<Server>,
    principal: &Principal,
    headers: &HeaderMap,
    messages: Vec<Message>,
    ex: &mut Exchange,
) -> Result<Response, Failure> {
    // Refused whole, before anything is forwarded: batches of later revisions, and
    // `initialize` in a batch. The sealed session is opened once, for every message.
    let opened = match mcp::stateless::is_stateless(headers) {
        true => None,
        false => Some(session(app, server, principal, headers)?),
    };
    let protocol = opened.as_ref().map_or(version::STATELESS, |s| s.client_protocol.as_str());
    if !version::has_batches(protocol) {
        let text = format!("JSON-RPC batches are not part of protocol revision {protocol}");
        return Err(GatewayError::InvalidRequest(text).into());
    }
    if messages.iter().any(|m| m.method() == "initialize") {
        return Err(GatewayError::InvalidRequest("initialize cannot be batched".into()).into());
    }
    let mut answers = Vec::new();
    for message in messages {
        let mut member = ex.member(app, &message);
        let resp = match one_message(app, server, principal, headers, opened.as_ref(), message, &mut member).await {
            Ok(resp) => resp,
            Err(failure) => {
                member.note_failure(&failure);
                failure.into_response()
            }
        };
        if resp.status() == StatusCode::ACCEPTED {
            app.finish(member, resp).await;
            continue;
        }
        let is_sse =
            resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        // Collected through the member's record, so its bytes and its end are counted.
        let resp = app.finish(member, resp).await;
        let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        if is_sse {
            answers.extend(sse_messages(&body).filter(|m| m.get("result").is_some() || m.get("error").is_some()));
        } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
            answers.push(v);
        }
    }
    let mut resp = match answers.is_empty() {
        true => StatusCode::ACCEPTED.into_response(),
        false => axum::Json(answers).into_response(),
    };
    resp.headers_mut().insert(super::exchange::REQUEST_ID_HEADER, ex.request_id.header_value());
    Ok(resp)
}

/// The JSON-RPC messages of an SSE body, read as every other upstream stream is (data over
/// several lines, unknown fields ignored).
fn sse_messages(body: &[u8]) -> impl Iterator<Item = serde_json::Value> {
    crate::upstream::event_stream::parse(body)
        .into_iter()
        .filter_map(|event| event.data.and_then(|data| serde_json::from_str(&data).ok()))
}

/// `GET /mcp/{server}` for a name that is not answered ahead of the router.
pub async fn get(State(app): State<AppState>, Path(name): Path<String>, request: Request) -> Response {
    get_from(&app, Target::Name(&name), request).await
}

/// A GET on an MCP endpoint: the session's server-to-client stream.
async fn get_from(app: &AppState, target: Target<'_>, request: Request) -> Response {
    let headers = request.into_parts().0.headers;
    if mcp::stateless::is_stateless(&headers) {
        // The stateless revision has no GET stream and no session to delete.
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let mut ex = Exchange::new(app, "GET");
    let result = async {
        let (server, principal) = admit(app, target, &headers, &mut ex).await?;
        check_accept(&headers, true)?;
        let session = session(app, &server, &principal, &headers)?;
        ex.client.clone_from(&session.client);
        let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
        let reply = dispatch::listen(&server, &session, last).await.map_err(GatewayError::from)?;
        Ok::<_, Failure>(reply::get_response(reply, stream_end(app, &server, &headers)))
    }
    .await;
    let resp = result.unwrap_or_else(|f| {
        ex.note_failure(&f);
        f.into_response()
    });
    app.finish(ex, resp).await
}

/// `DELETE /mcp/{server}` for a name that is not answered ahead of the router.
pub async fn delete(State(app): State<AppState>, Path(name): Path<String>, request: Request) -> Response {
    delete_at(&app, Target::Name(&name), request).await
}

/// A DELETE on an MCP endpoint: ends the session.
async fn delete_at(app: &AppState, target: Target<'_>, request: Request) -> Response {
    let headers = request.into_parts().0.headers;
    if mcp::stateless::is_stateless(&headers) {
        // The stateless revision has no GET stream and no session to delete.
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let mut ex = Exchange::new(app, "DELETE");
    let result = async {
        let (server, principal) = admit(app, target, &headers, &mut ex).await?;
        let session = session(app, &server, &principal, &headers)?;
        ex.client.clone_from(&session.client);
        dispatch::close(&server, &session).await.map_err(GatewayError::from)?;
        Ok::<_, Failure>(StatusCode::OK.into_response())
    }
    .await;
    let resp = result.unwrap_or_else(|f| {
        ex.note_failure(&f);
        f.into_response()
    });
    app.finish(ex, resp).await
}

/// Completes when a long-lived stream opened with `headers` must end: the gateway shuts down,
/// or the caller's grant token stops working (revoked, expired, principal disabled).
pub(super) fn stream_end(app: &AppState, server: &Arc<Server>, headers: &HeaderMap) -> BoxFuture<'static, ()> {
    let shutdown = app.shutdown().clone().cancelled_owned();
    let revoked = app.authn().revoked(&server.config, headers);
    Box::pin(async move {
        tokio::select! {
            () = shutdown => {}
            () = revoked => tracing::info!("a stream ends: its grant token no longer works"),
        }
    })
}

/// The first steps of every exchange: find the server, check `Host` and `Origin` (DNS
/// rebinding), and authenticate the caller, noting who it is.
pub(super) async fn admit(
    app: &AppState,
    target: Target<'_>,
    headers: &HeaderMap,
    ex: &mut Exchange,
) -> Result<(Arc<Server>, Principal), GatewayError> {
    let server = match target {
        Target::Server(s) => s.clone(),
        Target::Name(name) => match app.server(name) {
            Ok(server) => server,
            // Unauthenticated callers get the challenge a configured server gives.
            Err(unknown) => return Err(Box::pin(app.authn().unknown_server(headers, unknown, &InScope)).await),
        },
    };
    ex.server = Some(server.clone());
    app.hosts().check(headers)?;
    let principal = app.authn().authenticate(&server.config, headers, &InScope).await?;
    ex.principal = Some(principal.clone());
    Ok((server, principal))
}

/// The session named by `Mcp-Session-Id`, which must have been opened by the same principal
/// at the same server.
fn session(
    app: &AppState,
    server: &Server,
    principal: &Principal,
    headers: &HeaderMap,
) -> Result<Arc<SessionState>, GatewayError> {
    if let Some(v) = headers.get(PROTOCOL_HEADER) {
        let v = v.to_str().unwrap_or_default();
        if !version::is_supported(v) {
            return Err(GatewayError::UnsupportedProtocolVersion(v.chars().take(40).collect()));
        }
    }
    let id = headers.get(SESSION_HEADER).ok_or(GatewayError::MissingSession)?;
    let id = id.to_str().map_err(|_| GatewayError::UnknownSession)?;
    app.sealer().open(id, &binding(&server.config.name, &principal.id)).ok_or(GatewayError::UnknownSession)
}

pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), GatewayError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") { Ok(()) } else { Err(GatewayError::UnsupportedMediaType) }
}

/// Clients must accept JSON and SSE on POST, and SSE on GET; a missing `Accept` (or `*/*`) is
/// taken as accepting everything, since many simple clients send none.
pub(super) fn check_accept(headers: &HeaderMap, stream: bool) -> Result<(), GatewayError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    // One pass over the media ranges for both types.
    let (mut sse, mut json) = (false, false);
    for part in accept.split(',') {
        let m = part.split(';').next().unwrap_or("").trim();
        if m == "*/*" {
            (sse, json) = (true, true);
        } else if m.eq_ignore_ascii_case("text/event-stream") {
            sse = true;
        } else if m.eq_ignore_ascii_case("application/json") {
            json = true;
        }
    }
    match (stream, sse, json) {
        (true, true, _) => Ok(()),
        (true, false, _) => Err(GatewayError::NotAcceptable("GET needs Accept: text/event-stream")),
        (false, true, _) | (false, _, true) => Ok(()),
        (false, false, false) => {
            Err(GatewayError::NotAcceptable("POST needs Accept: application/json, text/event-stream"))
        }
    }
}

pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    let mut body = http_body_util::Limited::new(body, limit);
    // The first piece is kept as it came: most requests arrive in one, which then costs no
    // copy. Pieces are joined only when a second one comes; trailers are ignored.
    let mut first: Option<Bytes> = None;
    let mut joined = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
            Some(_) => GatewayError::PayloadTooLarge(limit),
            None => GatewayError::BodyRead,
        })?;
        let Ok(data) = frame.into_data() else { continue };
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            None => joined.extend_from_slice(&data),
            Some(piece) => {
                joined.extend_from_slice(&piece);
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

/// The method label for metrics: known MCP methods by name, anything else as `other`.
fn metric_method(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "server/discover",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
    ];
    if method.is_empty() {
        return "response";
    }
    KNOWN.iter().find(|m| **m == method).copied().unwrap_or("other")
}
