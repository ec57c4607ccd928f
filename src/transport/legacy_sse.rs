//! The legacy HTTP+SSE transport (protocol 2024-11-05) for old clients: `GET
//! /mcp/{server}/sse` opens a stream whose first event names a POST endpoint,
//! `/mcp/{server}/messages?sessionId=…`; every answer travels on the stream.
//!
//! The connection lives in this replica's memory (the stream is one long response), so its
//! POSTs must reach the same replica; the MCP session inside it is the usual sealed one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use futures::StreamExt;
use futures::future::BoxFuture;
use http::{HeaderMap, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use super::exchange::Exchange;
use super::http::{Target, admit, check_accept, check_content_type, read_body, stream_end};
use super::jsonrpc::{self, Kind, Message, code, error_response};
use super::session::{SessionState, new_session_key};
use crate::app::{AppState, Server};
use crate::authn::Principal;
use crate::error::{Failure, GatewayError};
use crate::mcp;
use crate::upstream::messages_of;

/// Open legacy connections by id.
#[derive(Default)]
pub struct Connections(DashMap<String, Arc<Connection>>);

/// One legacy client connection.
pub struct Connection {
    server: String,
    principal: Principal,
    tx: mpsc::UnboundedSender<Value>,
    session: Mutex<Option<SessionState>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Connection {
    fn session(&self) -> Option<SessionState> {
        self.session.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task));
    }
}

/// Removes the connection, stops its tasks and ends its upstream session when the client's
/// stream goes away.
struct Closer {
    app: AppState,
    id: String,
}

impl Drop for Closer {
    fn drop(&mut self) {
        let Some((_, conn)) = self.app.legacy().0.remove(&self.id) else { return };
        conn.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..).for_each(|t| t.abort());
        if let (Some(session), Ok(server)) = (conn.session(), self.app.server(&conn.server)) {
            tokio::spawn(async move {
                let _ = crate::mcp::close_upstream(&server, &session).await;
            });
        }
    }
}

/// `GET /mcp/{server}/sse`.
pub async fn open(State(app): State<AppState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let mut ex = Exchange::new("GET");
    let result = async {
        let (server, principal) = admit(&app, Target::Name(&name), &headers, &mut ex).await?;
        check_accept(&headers, true)?;
        Ok::<_, Failure>(stream(&app, &name, principal, stream_end(&app, &server, &headers)))
    }
    .await;
    let resp = result.unwrap_or_else(|f| {
        ex.note_failure(&f);
        f.into_response()
    });
    app.finish(ex, resp, started).await
}

fn stream(app: &AppState, name: &str, principal: Principal, end: BoxFuture<'static, ()>) -> Response {
    let id = new_session_key();
    let (tx, rx) = mpsc::unbounded_channel();
    let conn =
        Connection { server: name.to_owned(), principal, tx, session: Mutex::new(None), tasks: Mutex::default() };
    app.legacy().0.insert(id.clone(), Arc::new(conn));
    let endpoint = format!("{}/mcp/{name}/messages?sessionId={id}", app.public_url().path().trim_end_matches('/'));
    let closer = Closer { app: app.clone(), id };
    let first = futures::stream::iter([Event::default().event("endpoint").data(endpoint)]);
    let messages = futures::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    })
    .map(move |msg: Value| {
        let _keep = &closer;
        Event::default().event("message").data(msg.to_string())
    });
    let events = first.chain(messages).take_until(end).map(Ok::<_, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// `POST /mcp/{server}/messages?sessionId=…`: answers 202 and sends the answers on the stream.
pub async fn message(
    State(app): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut ex = Exchange::new("POST");
    let result = async {
        let (server, principal) = admit(&app, Target::Name(&name), &headers, &mut ex).await?;
        check_content_type(&headers)?;
        // A connection serves only the principal that opened it.
        let conn = query
            .get("sessionId")
            .and_then(|id| app.legacy().0.get(id).map(|c| c.clone()))
            .filter(|c| c.server == name && c.principal.id == principal.id)
            .ok_or(GatewayError::UnknownSession)?;
        let bytes = read_body(body, app.config().gateway.max_body_bytes).await?;
        ex.bytes_in = bytes.len() as u64;
        let messages = match jsonrpc::Body::parse(bytes)? {
            jsonrpc::Body::Single(m) => vec![m],
            jsonrpc::Body::Batch(ms) => ms,
        };
        if let Some(first) = messages.first() {
            ex.note_message(first, "POST");
        }
        ex.client = conn.session().and_then(|s| s.client);
        for m in messages {
            dispatch(&app, &server, &conn, m).await?;
        }
        Ok::<_, Failure>(StatusCode::ACCEPTED.into_response())
    }
    .await;
    let resp = result.unwrap_or_else(|f| {
        ex.note_failure(&f);
        f.into_response()
    });
    app.finish(ex, resp, started).await
}

async fn dispatch(
    app: &AppState,
    server: &Arc<Server>,
    conn: &Arc<Connection>,
    message: Message,
) -> Result<(), Failure> {
    if message.kind == Kind::Request && message.method() == "initialize" {
        let (response, state, _) = match mcp::initialize(app, server, &conn.principal, &message).await {
            Ok(opened) => opened,
            Err(f) => {
                let (_, rpc) = f.error.status_and_code(true);
                let _ = conn.tx.send(error_response(f.id.as_ref(), rpc, &f.error.to_string()));
                return Ok(());
            }
        };
        *conn.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        let _ = conn.tx.send(response);
        // The upstream's own messages (list changes, requests outside a call) join the stream.
        let (server, tx) = (server.clone(), conn.tx.clone());
        conn.spawn(async move {
            if let Ok(reply) = server.upstream.listen(&state, None).await {
                let mut msgs = messages_of(reply);
                while let Some(m) = msgs.next().await {
                    if tx.send(m).is_err() {
                        return;
                    }
                }
            }
        });
        return Ok(());
    }
    let id = message.id.clone();
    let session = conn.session().ok_or_else(|| GatewayError::MissingSession.with_id(id.clone()))?;
    let (server, tx) = (server.clone(), conn.tx.clone());
    conn.spawn(async move {
        let timeout = server.config.request_timeout;
        let answer = async {
            match mcp::relay(&server, &session, message).await {
                Ok(reply) => {
                    let mut msgs = messages_of(reply);
                    while let Some(m) = msgs.next().await {
                        let _ = tx.send(m);
                    }
                }
                Err(f) => {
                    let (_, rpc) = f.error.status_and_code(true);
                    let _ = tx.send(error_response(f.id.as_ref(), rpc, &f.error.to_string()));
                }
            }
        };
        if tokio::time::timeout(timeout, answer).await.is_err() && id.is_some() {
            let text = format!(
                "upstream server '{}' did not answer within {}",
                server.config.name,
                crate::upstream::human(timeout)
            );
            let _ = tx.send(error_response(id.as_ref(), code::UPSTREAM_TIMEOUT, &text));
        }
    });
    Ok(())
}
