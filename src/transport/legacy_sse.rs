//! The legacy HTTP+SSE transport (protocol 2024-11-05) for old clients: `GET
//! /mcp/{server}/sse` opens a stream whose first event names a POST endpoint,
//! `/mcp/{server}/messages?sessionId=…`; every answer travels on the stream.
//!
//! The connection lives in this replica's memory (the stream is one long response), so its
//! POSTs must reach the same replica; the MCP session inside it is the usual sealed one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use crate::authn::Principal;
use crate::error::{Failure, GatewayError};
use crate::mcp::Server;
use crate::mcp::dispatch::{self, Call, Outcome, Via, dispatch};
use crate::protocol::jsonrpc::{self, Kind, Message, error_response};
use crate::protocol::session::{SessionState, new_session_key};
use crate::state::AppState;
use crate::upstream::messages_of;

/// Open legacy connections by id.
#[derive(Default)]
pub struct Connections(DashMap<String, Arc<Connection>>);

/// The state of the legacy routes: the gateway's, and this replica's open connections.
#[derive(Clone)]
pub struct Legacy {
    app: AppState,
    connections: Arc<Connections>,
}

/// The legacy transport's routes, `/mcp/{server}/sse` and `/mcp/{server}/messages`, with the
/// open connections they share.
pub fn routes(app: AppState) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/mcp/{server}/sse", get(open))
        .route("/mcp/{server}/messages", post(message))
        .with_state(Legacy { app, connections: Arc::default() })
}

/// One legacy client connection.
pub struct Connection {
    server: String,
    principal: Principal,
    tx: ClientTx,
    session: Mutex<Option<SessionState>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Requests in progress (`limits.max_in_flight_per_legacy_session`).
    in_flight: Arc<tokio::sync::Semaphore>,
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
    connections: Arc<Connections>,
    id: String,
}

impl Drop for Closer {
    fn drop(&mut self) {
        let Some((_, conn)) = self.connections.0.remove(&self.id) else { return };
        conn.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..).for_each(|t| t.abort());
        if let (Some(session), Ok(server)) = (conn.session(), self.app.server(&conn.server)) {
            tokio::spawn(async move {
                let _ = crate::mcp::dispatch::close_upstream(&server, &session).await;
            });
        }
    }
}

/// `GET /mcp/{server}/sse`.
async fn open(
    State(Legacy { app, connections }): State<Legacy>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut ex = Exchange::new(&app, "GET");
    let result = async {
        let (server, principal) = admit(&app, Target::Name(&name), &headers, &mut ex).await?;
        check_accept(&headers, true)?;
        Ok::<_, Failure>(stream(&app, &connections, &name, principal, stream_end(&app, &server, &headers)))
    }
    .await;
    let resp = result.unwrap_or_else(|f| {
        ex.note_failure(&f);
        f.into_response()
    });
    app.finish(ex, resp).await
}

/// Every queued message counts at least this many bytes, so the queue's length is bounded too.
const MIN_CHARGE: usize = 1024;

/// The sending side of one client's stream, bounded in bytes (`limits.client_queue_bytes`):
/// a sender waits for room, up to the server's `request_timeout`, so a client that does not
/// read stalls only its own calls and the memory held for it stays bounded.
#[derive(Clone)]
struct ClientTx {
    tx: mpsc::Sender<(String, tokio::sync::OwnedSemaphorePermit)>,
    room: Arc<tokio::sync::Semaphore>,
    capacity: usize,
    wait: Duration,
    server: Arc<str>,
}

/// The receiving side: each message's room is given back once it is on its way to the client.
type ClientRx = mpsc::Receiver<(String, tokio::sync::OwnedSemaphorePermit)>;

impl ClientTx {
    fn new(capacity: usize, wait: Duration, server: &str) -> (ClientTx, ClientRx) {
        let capacity = capacity.clamp(MIN_CHARGE, u32::MAX as usize);
        let (tx, rx) = mpsc::channel(capacity / MIN_CHARGE);
        let room = Arc::new(tokio::sync::Semaphore::new(capacity));
        (ClientTx { tx, room, capacity, wait, server: Arc::from(server) }, rx)
    }

    fn charge(&self, text: &str) -> u32 {
        u32::try_from(text.len().clamp(MIN_CHARGE, self.capacity)).unwrap_or(u32::MAX)
    }

    /// Queues `msg`, waiting for room; `Err` when the stream is gone or stayed full.
    async fn send(&self, msg: Value) -> Result<(), ()> {
        let text = msg.to_string();
        let queued = async {
            let permit = self.room.clone().acquire_many_owned(self.charge(&text)).await.map_err(drop)?;
            self.tx.send((text, permit)).await.map_err(drop)
        };
        match tokio::time::timeout(self.wait, queued).await {
            Ok(sent) => sent,
            Err(_) => {
                self.full();
                Err(())
            }
        }
    }

    /// Queues `msg` if there is room now (an error after a call timed out); drops it otherwise.
    fn try_send(&self, msg: Value) {
        let text = msg.to_string();
        let Ok(permit) = self.room.clone().try_acquire_many_owned(self.charge(&text)) else {
            return self.full();
        };
        let _ = self.tx.try_send((text, permit));
    }

    fn full(&self) {
        metrics::counter!("portcullis_client_queue_full_total", "server" => self.server.to_string()).increment(1);
        tracing::warn!(server = %self.server, "a legacy SSE client is not reading its stream: a message was not queued");
    }
}

fn stream(
    app: &AppState,
    connections: &Arc<Connections>,
    name: &str,
    principal: Principal,
    end: BoxFuture<'static, ()>,
) -> Response {
    let id = new_session_key();
    let wait = app.server(name).map(|s| s.config.request_timeout).unwrap_or(app.config().gateway.request_timeout);
    let (tx, rx) = ClientTx::new(app.config().limits.client_queue_bytes, wait, name);
    let conn = Connection {
        server: name.to_owned(),
        principal,
        tx,
        session: Mutex::new(None),
        tasks: Mutex::default(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(app.config().limits.max_in_flight_per_legacy_session)),
    };
    connections.0.insert(id.clone(), Arc::new(conn));
    let endpoint = format!("{}/mcp/{name}/messages?sessionId={id}", app.public_url().path().trim_end_matches('/'));
    let closer = Closer { app: app.clone(), connections: connections.clone(), id };
    let first = futures::stream::iter([Event::default().event("endpoint").data(endpoint)]);
    let messages = futures::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    })
    .map(move |(text, _room): (String, _)| {
        let _keep = &closer;
        Event::default().event("message").data(text)
    });
    let events = first.chain(messages).take_until(end).map(Ok::<_, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// `POST /mcp/{server}/messages?sessionId=…`: answers 202 and sends the answers on the stream.
/// Each message goes through the dispatch and leaves its own audit record once its answer is
/// known (or its connection ends first).
async fn message(
    State(Legacy { app, connections }): State<Legacy>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut ex = Exchange::new(&app, "POST");
    let result = async {
        let (server, principal) = admit(&app, Target::Name(&name), &headers, &mut ex).await?;
        check_content_type(&headers)?;
        // A connection serves only the principal that opened it.
        let conn = query
            .get("sessionId")
            .and_then(|id| connections.0.get(id).map(|c| c.clone()))
            .filter(|c| c.server == name && c.principal.id == principal.id)
            .ok_or(GatewayError::UnknownSession)?;
        let bytes = read_body(body, app.config().gateway.max_body_bytes).await?;
        ex.bytes_in = bytes.len() as u64;
        ex.client = conn.session().and_then(|s| s.client);
        let messages = match jsonrpc::Body::parse(bytes, app.config().gateway.max_batch)? {
            jsonrpc::Body::Single(m) => vec![m],
            jsonrpc::Body::Batch(ms) => {
                let protocol = conn.session().map(|s| s.client_protocol);
                if protocol.as_deref().is_some_and(|p| !crate::protocol::version::has_batches(p)) {
                    let text =
                        format!("JSON-RPC batches are not part of protocol revision {}", protocol.unwrap_or_default());
                    return Err(GatewayError::InvalidRequest(text).into());
                }
                if ms.iter().any(|m| m.method() == "initialize") {
                    return Err(GatewayError::InvalidRequest("initialize cannot be batched".into()).into());
                }
                ms
            }
        };
        let mut unanswered = false;
        for m in messages {
            let member = ex.member(&app, &m);
            unanswered |= handle(&app, &server, &conn, m, member).await == Handled::RefusedWithoutId;
        }
        if unanswered {
            // A notification or response refused for the session's cap has no id to be
            // answered by on the stream: the POST says so. Each message has its own record
            // already, so the POST's answer is not recorded again.
            let limit = crate::error::Limit::SessionRequests;
            return Ok(Failure::from(GatewayError::Limited { limit, retry_after: 1 }).into_response());
        }
        Ok::<_, Failure>(StatusCode::ACCEPTED.into_response())
    }
    .await;
    match result {
        Ok(mut resp) => {
            // Each message leaves its own record.
            resp.headers_mut().insert(super::exchange::REQUEST_ID_HEADER, ex.request_id.header_value());
            ex.settle();
            resp
        }
        Err(f) => {
            ex.note_failure(&f);
            app.finish(ex, f.into_response()).await
        }
    }
}

/// What became of one message of a legacy connection.
#[derive(Debug, PartialEq, Eq)]
enum Handled {
    /// Answered, or on its way (its answer or error goes on the stream).
    Taken,
    /// A message without an id refused for the session's cap: nothing can go on the stream.
    RefusedWithoutId,
}

/// One message of a legacy connection: `initialize` is answered at once; anything else is
/// dispatched in the background and its answers join the stream. Either way the message's
/// record is written when its answer is known; a task stopped by the connection's end leaves
/// the record of a client gone.
async fn handle(
    app: &AppState,
    server: &Arc<Server>,
    conn: &Arc<Connection>,
    message: Message,
    mut ex: Exchange,
) -> Handled {
    if message.kind == Kind::Request && message.method() == "initialize" {
        let call = Call { env: app.env(), server, caller: &conn.principal, via: Via::Opening };
        let state = match dispatch(call, message, &mut ex.trace).await {
            Ok(Outcome::Opened { response, state, .. }) => {
                ex.client.clone_from(&state.client);
                app.finish(ex, StatusCode::OK.into_response()).await;
                let _ = conn.tx.send(response).await;
                state
            }
            Ok(Outcome::Reply(_)) => return Handled::Taken,
            Err(f) => {
                fail(app, conn, f, ex).await;
                return Handled::Taken;
            }
        };
        *conn.session.lock().unwrap_or_else(|p| p.into_inner()) = Some((*state).clone());
        // The upstream's own messages (list changes, requests outside a call) join the stream.
        let (server, tx) = (server.clone(), conn.tx.clone());
        conn.spawn(async move {
            if let Ok(reply) = dispatch::listen(&server, &state, None).await {
                let mut msgs = messages_of(reply);
                while let Some(m) = msgs.next().await {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
        });
        return Handled::Taken;
    }
    let Some(session) = conn.session() else {
        let f = GatewayError::MissingSession.with_id(message.id.clone());
        fail(app, conn, f, ex).await;
        return Handled::Taken;
    };
    // The POST is answered 202 at once: every message holds one of its session's places until
    // it has been handled (a request: until its answer is on the stream), so one session
    // cannot pile up work without bound, whatever kind of message it sends.
    let Ok(place) = conn.in_flight.clone().try_acquire_owned() else {
        // Refused before the dispatch: its record still names the tool, as the dispatch reads it.
        if let Ok(dispatch::Action::CallTool(tool)) = dispatch::Action::read(&message) {
            ex.trace.tool = Some(tool);
        }
        let limit = crate::error::Limit::SessionRequests;
        metrics::counter!("portcullis_refusals_total", "reason" => limit.label()).increment(1);
        let without_id = message.id.is_none();
        let f = GatewayError::Limited { limit, retry_after: 1 }.with_id(message.id.clone());
        fail_now(app, conn, f, ex).await;
        return if without_id { Handled::RefusedWithoutId } else { Handled::Taken };
    };
    let (app, server, conn2) = (app.clone(), server.clone(), conn.clone());
    conn.spawn(async move {
        let _place = place;
        let conn = conn2;
        let id = message.id.clone();
        let timeout = server.config.request_timeout;
        let call = Call { env: app.env(), server: &server, caller: &conn.principal, via: Via::Session(&session) };
        let answered = tokio::time::timeout(timeout, async {
            let reply = match dispatch(call, message, &mut ex.trace).await? {
                Outcome::Reply(reply) => reply,
                Outcome::Opened { .. } => return Ok(()),
            };
            let mut msgs = messages_of(reply);
            while let Some(m) = msgs.next().await {
                let last = id.is_some() && m.get("id") == id.as_ref() && m.get("method").is_none();
                // Waits for room: a client that does not read stalls only its own calls.
                if conn.tx.send(m).await.is_err() || last {
                    break;
                }
            }
            Ok::<_, Failure>(())
        })
        .await;
        match answered {
            Ok(Ok(())) => drop(app.finish(ex, StatusCode::OK.into_response()).await),
            Ok(Err(f)) => fail(&app, &conn, f, ex).await,
            Err(_) => {
                let timeout =
                    crate::upstream::UpstreamError::Timeout { server: server.config.name.clone(), after: timeout };
                let f = GatewayError::Upstream(timeout).with_id(id.clone());
                // The time is up: the error goes only if there is room for it now.
                fail_now(&app, &conn, f, ex).await;
            }
        }
    });
    Handled::Taken
}

/// Sends a message's error on the stream (when it had an id) and records it.
async fn fail(app: &AppState, conn: &Connection, f: Failure, mut ex: Exchange) {
    ex.note_failure(&f);
    if f.id.is_some() {
        let (_, rpc) = f.error.status_and_code(true);
        let _ = conn.tx.send(error_response(f.id.as_ref(), rpc, &f.error.to_string())).await;
    }
    app.finish(ex, f.into_response()).await;
}

/// Like [`fail`], without waiting for room on the stream.
async fn fail_now(app: &AppState, conn: &Connection, f: Failure, mut ex: Exchange) {
    ex.note_failure(&f);
    if f.id.is_some() {
        let (_, rpc) = f.error.status_and_code(true);
        conn.tx.try_send(error_response(f.id.as_ref(), rpc, &f.error.to_string()));
    }
    app.finish(ex, f.into_response()).await;
}
