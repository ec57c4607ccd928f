//! Streamable HTTP endpoints: `POST`, `GET` and `DELETE` on `/mcp/{server}`.
//!
//! Every POST goes through the same flat list of steps: find the server, check `Host` and
//! `Origin`, authenticate, check the media types, read the body within its limit, parse the
//! envelope, then either open a session (`initialize`) or relay within the sealed session.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;

use super::exchange::Exchange;
use super::jsonrpc::{self, Kind, Message};
use super::reply;
use super::session::{SessionState, binding};
use crate::app::{AppState, Server};
use crate::authn::{self, Principal};
use crate::error::{Failure, GatewayError};
use crate::mcp::{self, version};
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
    match *request.method() {
        Method::POST => post_to(app, target, request).await,
        Method::GET => get_from(app, target, request).await,
        _ => delete_at(app, target, request).await,
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
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let mut ex = Exchange::new("invalid");
    let resp = match post_steps(app, target, &parts.headers, body, &mut ex).await {
        Ok(resp) => resp,
        Err(failure) => {
            ex.note_failure(&failure);
            failure.into_response()
        }
    };
    app.finish(ex, resp, started).await
}

async fn post_steps(
    app: &AppState,
    target: Target<'_>,
    headers: &HeaderMap,
    body: Body,
    ex: &mut Exchange,
) -> Result<Response, Failure> {
    let (server, principal) = admit(app, target, headers, ex).await?;
    check_content_type(headers)?;
    check_accept(headers, false)?;
    let bytes = read_body(body, app.config().gateway.max_body_bytes).await?;
    ex.bytes_in = bytes.len() as u64;
    // The relay's futures are large (kilobytes of nested state); boxed here, they are built
    // only for requests that get this far, and every future before this point stays small
    // enough that refusals do not pay for copying them.
    match jsonrpc::Body::parse(bytes)? {
        jsonrpc::Body::Single(message) => {
            ex.note_message(&message, metric_method(message.method()));
            Box::pin(one_message(app, &server, &principal, headers, message, ex)).await
        }
        jsonrpc::Body::Batch(messages) => {
            ex.metric = "batch";
            ex.method = "batch".to_owned();
            Box::pin(batch(app, &server, &principal, headers, messages, ex)).await
        }
    }
}

async fn one_message(
    app: &AppState,
    server: &Server,
    principal: &Principal,
    headers: &HeaderMap,
    message: Message,
    ex: &mut Exchange,
) -> Result<Response, Failure> {
    if mcp::stateless::is_stateless(headers) {
        ex.client = mcp::stateless::client_of(&message);
        let request_id = (message.kind == Kind::Request).then(|| message.id.clone()).flatten();
        let reply = mcp::stateless::handle(app, server, &principal.id, headers, message).await?;
        let timeout = server.config.request_timeout;
        return Ok(reply::post_response(reply, request_id, timeout, &server.config.name).await);
    }
    if message.kind == Kind::Request && message.method() == "initialize" {
        let (response, state, sealed) = mcp::initialize(app, server, principal, &message).await?;
        ex.client = state.client;
        let mut resp = axum::Json(response).into_response();
        if let Ok(v) = HeaderValue::from_str(&sealed) {
            resp.headers_mut().insert(SESSION_HEADER, v);
        }
        return Ok(resp);
    }
    let id = message.id.clone();
    let session = session(app, server, principal, headers).map_err(|e| e.with_id(id.clone()))?;
    ex.client.clone_from(&session.client);
    let request_id = (message.kind == Kind::Request).then(|| id.clone()).flatten();
    let reply = mcp::relay(server, &session, message).await?;
    Ok(reply::post_response(reply, request_id, server.config.request_timeout, &server.config.name).await)
}

/// A 2025-03-26 batch: each message is relayed in order and the answers are collected.
async fn batch(
    app: &AppState,
    server: &Server,
    principal: &Principal,
    headers: &HeaderMap,
    messages: Vec<Message>,
    ex: &mut Exchange,
) -> Result<Response, Failure> {
    let mut answers = Vec::new();
    for message in messages {
        if message.method() == "initialize" {
            let err = GatewayError::InvalidParams("initialize cannot be batched".into());
            return Err(err.with_id(message.id));
        }
        let resp =
            one_message(app, server, principal, headers, message, ex).await.unwrap_or_else(IntoResponse::into_response);
        if resp.status() == StatusCode::ACCEPTED {
            continue;
        }
        let is_sse =
            resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        if is_sse {
            answers.extend(sse_messages(&body).filter(|m| m.get("result").is_some() || m.get("error").is_some()));
        } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
            answers.push(v);
        }
    }
    if answers.is_empty() {
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    Ok(axum::Json(answers).into_response())
}

fn sse_messages(body: &[u8]) -> impl Iterator<Item = serde_json::Value> + '_ {
    body.split(|b| *b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .filter_map(|data| serde_json::from_slice(data.trim_ascii()).ok())
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
    let started = Instant::now();
    let mut ex = Exchange::new("GET");
    let result = async {
        let (server, principal) = admit(app, target, &headers, &mut ex).await?;
        check_accept(&headers, true)?;
        let session = session(app, &server, &principal, &headers)?;
        ex.client.clone_from(&session.client);
        let last = headers.get("last-event-id").and_then(|v| v.to_str().ok());
        let reply = mcp::listen(&server, &session, last).await.map_err(GatewayError::from)?;
        Ok::<_, Failure>(reply::get_response(reply, stream_end(app, &server, &headers)))
    }
    .await;
    let resp = result.unwrap_or_else(|f| {
        ex.note_failure(&f);
        f.into_response()
    });
    app.finish(ex, resp, started).await
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
    let started = Instant::now();
    let mut ex = Exchange::new("DELETE");
    let result = async {
        let (server, principal) = admit(app, target, &headers, &mut ex).await?;
        let session = session(app, &server, &principal, &headers)?;
        ex.client.clone_from(&session.client);
        mcp::close(&server, &session).await.map_err(GatewayError::from)?;
        Ok::<_, Failure>(StatusCode::OK.into_response())
    }
    .await;
    let resp = result.unwrap_or_else(|f| {
        ex.note_failure(&f);
        f.into_response()
    });
    app.finish(ex, resp, started).await
}

/// Completes when a long-lived stream opened with `headers` must end: the gateway shuts down,
/// or the caller's grant token stops working (revoked, expired, principal disabled).
pub(super) fn stream_end(app: &AppState, server: &Arc<Server>, headers: &HeaderMap) -> BoxFuture<'static, ()> {
    let shutdown = app.shutdown().clone().cancelled_owned();
    let revoked = authn::revoked(app, server, headers);
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
            Err(unknown) => return Err(authn::unknown_server(app, headers, unknown).await),
        },
    };
    ex.server = Some(server.clone());
    app.hosts().check(headers)?;
    let principal = authn::authenticate(app, &server, headers).await?;
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
    let has = |t: &str| {
        accept.split(',').any(|part| {
            let m = part.split(';').next().unwrap_or("").trim();
            m.eq_ignore_ascii_case(t) || m == "*/*"
        })
    };
    match (stream, has("text/event-stream"), has("application/json")) {
        (true, true, _) => Ok(()),
        (true, false, _) => Err(GatewayError::NotAcceptable("GET needs Accept: text/event-stream")),
        (false, true, _) | (false, _, true) => Ok(()),
        (false, false, false) => {
            Err(GatewayError::NotAcceptable("POST needs Accept: application/json, text/event-stream"))
        }
    }
}

pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(GatewayError::PayloadTooLarge(limit))
        }
        Err(_) => Err(GatewayError::BodyRead),
    }
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
