//! Many client sessions over one message pipe (a stdio process, or one legacy SSE connection).
//!
//! Client request ids and progress tokens are rewritten to gateway-unique values so sessions
//! cannot collide, and answers are routed back by those values. Messages the upstream starts
//! itself carry no session, so they are routed by a rule (see [`Mux::route`]):
//! - progress goes to the request that owns the token;
//! - requests (sampling, elicitation, roots) and log messages go to the most recent pending
//!   request's stream, or else to a session's GET stream;
//! - everything else (list changes, resource updates) goes to every GET stream.
//!
//! Every queue is bounded (`gateway.upstream_queue` messages). Toward the upstream, a writer
//! waits for room, up to the server's `request_timeout`. From the upstream, the reader never
//! waits for a slow client (that would stall every session on the pipe): a response has a slot
//! of its own, and a notification or request that finds its client's queue full is shed,
//! counted in `portcullis_upstream_shed_total` (a request is refused to the upstream).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{MessageStream, UpstreamError};
use crate::protocol::jsonrpc::{Kind, Message, code, error_response};

/// Client capabilities that decide where the upstream's own requests may go.
pub mod features {
    use serde_json::Value;

    /// The client declared `sampling`.
    pub const SAMPLING: u8 = 1;
    /// The client declared `elicitation`.
    pub const ELICITATION: u8 = 2;
    /// The client declared `roots`.
    pub const ROOTS: u8 = 4;
    /// The client declared URL-mode elicitation (`elicitation.url`, MCP 2025-11-25).
    pub const ELICITATION_URL: u8 = 8;

    /// The bits for a client's `capabilities` object.
    pub fn from_capabilities(caps: &Value) -> u8 {
        let bits = [("sampling", SAMPLING), ("elicitation", ELICITATION), ("roots", ROOTS)]
            .iter()
            .filter(|(k, _)| caps.get(k).is_some_and(|v| !v.is_null()))
            .fold(0, |acc, (_, bit)| acc | bit);
        let url = caps.pointer("/elicitation/url").is_some_and(|v| !v.is_null());
        if url { bits | ELICITATION_URL } else { bits }
    }

    /// A `capabilities` object declaring what `bits` say (for a session that kept only
    /// these).
    pub fn to_capabilities(bits: u8) -> Value {
        let mut caps = serde_json::Map::new();
        for (key, bit) in [("sampling", SAMPLING), ("elicitation", ELICITATION), ("roots", ROOTS)] {
            if bits & bit != 0 {
                caps.insert(key.to_owned(), Value::Object(Default::default()));
            }
        }
        if bits & ELICITATION_URL != 0 {
            caps.insert("elicitation".to_owned(), serde_json::json!({"form": {}, "url": {}}));
        }
        Value::Object(caps)
    }

    /// The bit a client needs to answer an upstream request with `method` (0: any client).
    pub fn needed_for(method: &str) -> u8 {
        match method {
            "sampling/createMessage" => SAMPLING,
            "elicitation/create" => ELICITATION,
            "roots/list" => ROOTS,
            _ => 0,
        }
    }
}

struct Pending {
    session: String,
    features: u8,
    client_id: Value,
    /// Notifications and requests for the caller, before the response.
    notes: mpsc::Sender<Value>,
    /// The response (or an error in its place).
    done: oneshot::Sender<Value>,
    progress: Option<String>,
}

struct Listener {
    tx: mpsc::Sender<Value>,
    features: u8,
    /// Which registration this is, so that a stream dropped after its session listened again
    /// does not remove the newer one.
    serial: u64,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// gateway progress token → (pending request id, client's token).
    progress: HashMap<String, (u64, Value)>,
    listeners: HashMap<String, Listener>,
    closed: Option<String>,
}

/// The routing table of one pipe.
pub struct Mux {
    server: Arc<str>,
    out: mpsc::Sender<Bytes>,
    state: Arc<std::sync::Mutex<State>>,
    next_id: AtomicU64,
    /// Messages queued per call or GET stream.
    queue: usize,
    /// Longest wait for room in the queue toward the upstream.
    write_timeout: Duration,
}

impl Mux {
    /// A mux whose queues hold `queue` messages; it writes outgoing messages (one JSON text
    /// each) to the returned receiver, and a writer waits at most `write_timeout` for room.
    pub fn new(server: Arc<str>, queue: usize, write_timeout: Duration) -> (Mux, mpsc::Receiver<Bytes>) {
        let (out, rx) = mpsc::channel(queue.max(1));
        let mux =
            Mux { server, out, state: Arc::default(), next_id: AtomicU64::new(1), queue: queue.max(1), write_timeout };
        (mux, rx)
    }

    /// Counts a message from the upstream that no client had room for.
    fn shed(&self, method: &str) {
        metrics::counter!("portcullis_upstream_shed_total", "server" => self.server.to_string()).increment(1);
        tracing::debug!(server = %self.server, method, "a client's queue is full: an upstream message was shed");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn closed_error(&self, why: &str) -> UpstreamError {
        UpstreamError::Process { server: self.server.to_string(), detail: why.to_owned() }
    }

    /// Whether the pipe has ended.
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Sends a request and returns the stream of messages for it, its response last.
    /// `features` are the session's client capabilities (see [`features`]), used to route the
    /// upstream's own requests to a client that can answer them.
    pub async fn request(&self, session: &str, features: u8, value: Value) -> Result<MessageStream, UpstreamError> {
        let mut value = value;
        let gid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let client_id = std::mem::replace(&mut value["id"], Value::from(gid));
        let token = value.pointer_mut("/params/_meta/progressToken").map(|t| {
            let ours = format!("p{gid}");
            (std::mem::replace(t, Value::from(ours.clone())), ours)
        });
        let (notes, notes_rx) = mpsc::channel(self.queue);
        let (done, done_rx) = oneshot::channel();
        {
            let mut st = self.lock();
            if let Some(why) = &st.closed {
                return Err(self.closed_error(why));
            }
            let progress = token.map(|(client_token, ours)| {
                st.progress.insert(ours.clone(), (gid, client_token));
                ours
            });
            let pending = Pending { session: session.to_owned(), features, client_id, notes, done, progress };
            st.pending.insert(gid, pending);
        }
        // Dropped while waiting for room (the caller gave up), the guard forgets the request.
        let mut cancel = CancelOnDrop {
            state: self.state.clone(),
            out: self.out.clone(),
            server: self.server.clone(),
            gid,
            answered: false,
            written: false,
        };
        self.write(&value).await?;
        cancel.written = true;
        Ok(Box::pin(Answer { notes: notes_rx, done: done_rx, finished: false, cancel }))
    }

    /// Sends a request of the gateway's own and waits for its response.
    pub async fn call(&self, value: Value) -> Result<Value, UpstreamError> {
        use futures::StreamExt;
        let mut stream = self.request("", 0, value).await?;
        while let Some(msg) = stream.next().await {
            if msg.get("result").is_some() || msg.get("error").is_some() {
                return Ok(msg);
            }
        }
        Err(self.closed_error("closed before answering"))
    }

    /// Forwards a client notification or response; cancellations are mapped to our ids.
    pub async fn forward(&self, session: &str, message: &Message) -> Result<(), UpstreamError> {
        if message.kind == Kind::Notification && message.method() == "notifications/cancelled" {
            let mut value = message.value().map_err(|e| self.closed_error(&e.to_string()))?;
            let client_id = value.pointer("/params/requestId").cloned();
            let gid = {
                let st = self.lock();
                st.pending
                    .iter()
                    .find(|(_, p)| p.session == session && Some(&p.client_id) == client_id.as_ref())
                    .map(|(gid, _)| *gid)
            };
            let Some(gid) = gid else { return Ok(()) };
            value["params"]["requestId"] = Value::from(gid);
            return self.write(&value).await;
        }
        self.send_raw(message.raw.clone()).await
    }

    async fn write(&self, value: &Value) -> Result<(), UpstreamError> {
        let bytes = serde_json::to_vec(value).map_err(|e| self.closed_error(&e.to_string()))?;
        self.send_raw(Bytes::from(bytes)).await
    }

    /// Queues one message toward the upstream, waiting for room up to the write timeout.
    async fn send_raw(&self, bytes: Bytes) -> Result<(), UpstreamError> {
        match tokio::time::timeout(self.write_timeout, self.out.send(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.closed_error("is not running")),
            Err(_) => {
                metrics::counter!("portcullis_upstream_queue_full_total", "server" => self.server.to_string())
                    .increment(1);
                Err(self.closed_error(&format!(
                    "is not reading its input: its queue stayed full for {}",
                    super::human(self.write_timeout)
                )))
            }
        }
    }

    /// Queues a message of the gateway's own (answers to pings, refusals, cancellations)
    /// without waiting: when the queue is full it is dropped, and counted.
    fn try_write(&self, value: &Value) {
        try_send(&self.out, &self.server, value);
    }

    /// Registers a session's GET stream; it ends when the pipe closes, and dropping it
    /// unregisters it.
    pub fn listen(&self, session: &str, features: u8) -> Result<MessageStream, UpstreamError> {
        let (tx, rx) = mpsc::channel(self.queue);
        let serial = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if let Some(why) = &st.closed {
            return Err(self.closed_error(why));
        }
        st.listeners.insert(session.to_owned(), Listener { tx, features, serial });
        let guard = Unlisten { state: self.state.clone(), session: session.to_owned(), serial };
        Ok(Box::pin(Listening { rx, _guard: guard }))
    }

    /// Sessions with a registered GET stream and requests waiting for answers (for tests and
    /// metrics: both must return to zero when their clients are gone).
    pub fn sizes(&self) -> (usize, usize) {
        let st = self.lock();
        (st.listeners.len(), st.pending.len())
    }

    /// Fails every pending request with `why` (the upstream sent something the gateway could
    /// not read, which may have been any of their answers) and tells the upstream they are
    /// cancelled. The pipe stays open.
    pub fn fail_pending(&self, why: &str) {
        let failed: Vec<(u64, Pending)> = {
            let mut st = self.lock();
            st.progress.clear();
            st.pending.drain().collect()
        };
        let text = format!("upstream server '{}' {why}", self.server);
        for (gid, p) in failed {
            let _ = p.done.send(error_response(Some(&p.client_id), code::UPSTREAM_ERROR, &text));
            self.try_write(&cancelled(gid, why));
        }
    }

    /// Forgets a session: its GET stream ends and its pending requests are dropped.
    pub fn forget(&self, session: &str) {
        let mut st = self.lock();
        st.listeners.remove(session);
        st.pending.retain(|_, p| p.session != session);
    }

    /// Routes one message from the upstream.
    pub fn route(&self, mut msg: Value) {
        let is_response = msg.get("result").is_some() || msg.get("error").is_some();
        let method = msg.get("method").and_then(Value::as_str).map(str::to_owned);
        let mut st = self.lock();
        if is_response {
            let Some(gid) = msg.get("id").and_then(Value::as_u64) else {
                return;
            };
            let Some(p) = st.pending.remove(&gid) else {
                return;
            };
            if let Some(t) = &p.progress {
                st.progress.remove(t);
            }
            msg["id"] = p.client_id;
            let _ = p.done.send(msg);
            return;
        }
        let Some(method) = method else { return };
        if method == "ping" && msg.get("id").is_some() {
            // The gateway is the upstream's client: it answers pings itself.
            let id = msg["id"].clone();
            drop(st);
            self.try_write(&serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {}}));
            return;
        }
        if method == "notifications/progress" {
            let token = msg.pointer("/params/progressToken").and_then(Value::as_str).unwrap_or("");
            if let Some((gid, client_token)) = st.progress.get(token).cloned() {
                msg["params"]["progressToken"] = client_token;
                if let Some(p) = st.pending.get(&gid)
                    && let Err(mpsc::error::TrySendError::Full(_)) = p.notes.try_send(msg)
                {
                    self.shed(&method);
                }
            }
            return;
        }
        let targeted =
            msg.get("id").is_some() || method == "notifications/message" || method == "notifications/cancelled";
        if targeted {
            let needed = features::needed_for(&method);
            let latest = st
                .pending
                .iter()
                .filter(|(_, p)| !p.session.is_empty() && p.features & needed == needed)
                .max_by_key(|(gid, _)| **gid);
            let mut full = false;
            let mut msg = msg;
            let listener = st.listeners.values().find(|l| l.features & needed == needed && !l.tx.is_closed());
            for tx in latest.map(|(_, p)| &p.notes).into_iter().chain(listener.map(|l| &l.tx)) {
                msg = match tx.try_send(msg) {
                    Ok(()) => return,
                    Err(mpsc::error::TrySendError::Full(m)) => {
                        full = true;
                        m
                    }
                    Err(mpsc::error::TrySendError::Closed(m)) => m,
                };
            }
            if full {
                self.shed(&method);
            }
            if let Some(id) = msg.get("id").cloned() {
                drop(st);
                let text = if full {
                    format!("the client that could answer {method} is not reading")
                } else {
                    format!("no connected client can answer {method}")
                };
                let err = error_response(Some(&id), code::INTERNAL_ERROR, &text);
                self.try_write(&err);
            }
            return;
        }
        let mut shed = 0;
        st.listeners.retain(|_, l| match l.tx.try_send(msg.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                shed += 1;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        drop(st);
        for _ in 0..shed {
            self.shed(&method);
        }
    }

    /// Ends the pipe: every pending request gets a JSON-RPC error naming the server and why.
    pub fn close(&self, why: &str) {
        let mut st = self.lock();
        st.closed = Some(why.to_owned());
        let text = format!("upstream server '{}' {why}", self.server);
        for (_, p) in st.pending.drain() {
            let _ = p.done.send(error_response(Some(&p.client_id), code::UPSTREAM_ERROR, &text));
        }
        st.progress.clear();
        st.listeners.clear();
    }
}

fn lock(state: &std::sync::Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding this lock leaves consistent maps; keep serving.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The messages for one pending request: notifications first, then the response. Dropped
/// before its response (the client went away), it tells the upstream with
/// `notifications/cancelled` and forgets the request.
struct Answer {
    notes: mpsc::Receiver<Value>,
    done: oneshot::Receiver<Value>,
    finished: bool,
    cancel: CancelOnDrop,
}

impl futures::Stream for Answer {
    type Item = Value;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Value>> {
        use std::future::Future;
        use std::task::Poll;
        if self.finished {
            return Poll::Ready(None);
        }
        // Everything queued before the response was queued before it was sent.
        if let Poll::Ready(Some(m)) = self.notes.poll_recv(cx) {
            return Poll::Ready(Some(m));
        }
        match std::pin::Pin::new(&mut self.done).poll(cx) {
            Poll::Ready(done) => {
                self.finished = true;
                self.cancel.answered = true;
                Poll::Ready(done.ok())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// `notifications/cancelled` for the upstream request `gid`.
fn cancelled(gid: u64, reason: &str) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": gid, "reason": reason},
    })
}

/// Queues `value` toward the upstream if there is room; otherwise drops it, counted.
fn try_send(out: &mpsc::Sender<Bytes>, server: &str, value: &Value) {
    let Ok(bytes) = serde_json::to_vec(value) else { return };
    if let Err(mpsc::error::TrySendError::Full(_)) = out.try_send(Bytes::from(bytes)) {
        metrics::counter!("portcullis_upstream_queue_full_total", "server" => server.to_owned()).increment(1);
        tracing::warn!(server, "the queue toward the upstream is full: a message of the gateway's own was dropped");
    }
}

struct CancelOnDrop {
    state: Arc<std::sync::Mutex<State>>,
    out: mpsc::Sender<Bytes>,
    server: Arc<str>,
    gid: u64,
    answered: bool,
    /// Whether the request reached the queue toward the upstream.
    written: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mut st = lock(&self.state);
        let Some(p) = st.pending.remove(&self.gid) else { return };
        if let Some(t) = &p.progress {
            st.progress.remove(t);
        }
        drop(st);
        if self.written {
            try_send(&self.out, &self.server, &cancelled(self.gid, "the client went away"));
        }
    }
}

/// A session's GET stream; dropped, it unregisters itself.
struct Listening {
    rx: mpsc::Receiver<Value>,
    _guard: Unlisten,
}

impl futures::Stream for Listening {
    type Item = Value;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Value>> {
        self.rx.poll_recv(cx)
    }
}

struct Unlisten {
    state: Arc<std::sync::Mutex<State>>,
    session: String,
    serial: u64,
}

impl Drop for Unlisten {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if st.listeners.get(&self.session).is_some_and(|l| l.serial == self.serial) {
            st.listeners.remove(&self.session);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use serde_json::json;

    fn mux() -> (Mux, mpsc::Receiver<Bytes>) {
        Mux::new(Arc::from("files"), 8, Duration::from_secs(5))
    }

    fn sent(rx: &mut mpsc::Receiver<Bytes>) -> Value {
        serde_json::from_slice(&rx.try_recv().expect("a message was written")).expect("json")
    }

    #[tokio::test]
    async fn ids_and_progress_tokens_are_rewritten_and_restored() {
        let (mux, mut out) = mux();
        let a = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":1}}});
        let mut sa = mux.request("a", 7, a.clone()).await.expect("sent");
        let mut sb = mux.request("b", 7, a).await.expect("sent");
        let (wa, wb) = (sent(&mut out), sent(&mut out));
        assert_ne!(wa["id"], wb["id"], "same client id, different upstream ids");
        let tok_b = wb["params"]["_meta"]["progressToken"].clone();
        mux.route(
            json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":tok_b,"progress":1}}),
        );
        mux.route(json!({"jsonrpc":"2.0","id":wb["id"],"result":{"ok":"b"}}));
        mux.route(json!({"jsonrpc":"2.0","id":wa["id"],"result":{"ok":"a"}}));
        let b: Vec<Value> = sb.by_ref().collect().await;
        assert_eq!(b[0]["params"]["progressToken"], json!(1));
        assert_eq!(b[1], json!({"jsonrpc":"2.0","id":1,"result":{"ok":"b"}}));
        assert_eq!(sa.next().await.expect("answer")["result"]["ok"], "a");
    }

    #[tokio::test]
    async fn a_closed_pipe_fails_pending_requests_with_a_clear_error() {
        let (mux, _out) = mux();
        let mut s = mux.request("a", 7, json!({"jsonrpc":"2.0","id":"x","method":"tools/call"})).await.expect("sent");
        mux.close("exited (exit status: 1)");
        let err = s.next().await.expect("error response");
        assert_eq!(err["id"], "x");
        assert_eq!(err["error"]["message"], "upstream server 'files' exited (exit status: 1)");
        assert!(s.next().await.is_none());
        assert!(mux.request("a", 7, json!({"jsonrpc":"2.0","id":1,"method":"ping"})).await.is_err());
    }

    #[tokio::test]
    async fn server_requests_go_to_the_latest_pending_call_or_a_listener() {
        let (mux, mut out) = mux();
        let mut listen = mux.listen("a", 7).expect("listening");
        mux.route(json!({"jsonrpc":"2.0","id":9,"method":"roots/list"}));
        assert_eq!(listen.next().await.expect("to listener")["method"], "roots/list");
        let mut call = mux.request("b", 7, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"})).await.expect("sent");
        let _ = sent(&mut out);
        mux.route(json!({"jsonrpc":"2.0","id":10,"method":"sampling/createMessage"}));
        assert_eq!(call.next().await.expect("to caller")["method"], "sampling/createMessage");
        mux.route(json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"}));
        assert_eq!(listen.next().await.expect("broadcast")["method"], "notifications/tools/list_changed");
        mux.route(json!({"jsonrpc":"2.0","id":"srv","method":"ping"}));
        assert_eq!(sent(&mut out), json!({"jsonrpc":"2.0","id":"srv","result":{}}));
    }

    #[tokio::test]
    async fn server_requests_go_only_to_clients_that_declared_the_capability() {
        let (mux, mut out) = mux();
        let mut able = mux
            .request("able", features::SAMPLING, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"}))
            .await
            .expect("sent");
        let _ = sent(&mut out);
        let _unable =
            mux.request("unable", 0, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"})).await.expect("sent");
        let _ = sent(&mut out);
        mux.route(json!({"jsonrpc":"2.0","id":10,"method":"sampling/createMessage"}));
        assert_eq!(able.next().await.expect("to the able client")["id"], 10);
        mux.route(json!({"jsonrpc":"2.0","id":11,"method":"elicitation/create"}));
        let refusal = sent(&mut out);
        assert_eq!(refusal["id"], 11);
        assert_eq!(refusal["error"]["message"], "no connected client can answer elicitation/create");
        assert_eq!(features::from_capabilities(&json!({"sampling": {}, "roots": {"listChanged": true}})), 5);
    }

    #[tokio::test]
    async fn a_request_whose_client_went_away_is_cancelled_upstream() {
        let (mux, mut out) = mux();
        let s = mux.request("a", 7, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"})).await.expect("sent");
        let gid = sent(&mut out)["id"].clone();
        drop(s);
        let note = sent(&mut out);
        assert_eq!(note["method"], "notifications/cancelled");
        assert_eq!(note["params"]["requestId"], gid);
        // An answered request is not cancelled.
        let mut s = mux.request("a", 7, json!({"jsonrpc":"2.0","id":2,"method":"tools/call"})).await.expect("sent");
        let gid = sent(&mut out)["id"].clone();
        mux.route(json!({"jsonrpc":"2.0","id":gid,"result":{}}));
        assert!(s.next().await.is_some());
        drop(s);
        assert!(out.try_recv().is_err(), "nothing more was written");
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_loses_notifications_but_never_its_answer() {
        let (mux, mut out) = mux();
        let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":"t"}}});
        let answer = mux.request("a", 7, call).await.expect("sent");
        let token = sent(&mut out)["params"]["_meta"]["progressToken"].clone();
        for i in 0..50 {
            mux.route(json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":token,"progress":i}}));
        }
        mux.route(json!({"jsonrpc":"2.0","id":1,"result":{"done":true}}));
        let got: Vec<Value> = answer.collect().await;
        assert_eq!(got.len(), 9, "the queue's 8 notifications, then the response");
        assert_eq!(got[0]["params"]["progress"], 0);
        assert_eq!(got[8]["result"]["done"], true);
        assert_eq!(mux.sizes(), (0, 0));
    }

    #[tokio::test]
    async fn a_dropped_get_stream_unregisters_itself_but_not_a_newer_one() {
        let (mux, _out) = mux();
        let first = mux.listen("a", 7).expect("listening");
        let second = mux.listen("a", 7).expect("listening again");
        let _other = mux.listen("b", 7).expect("listening");
        assert_eq!(mux.sizes(), (2, 0));
        drop(first);
        assert_eq!(mux.sizes(), (2, 0), "the newer stream of a stays");
        drop(second);
        assert_eq!(mux.sizes(), (1, 0));
    }

    #[tokio::test]
    async fn a_full_queue_toward_the_upstream_makes_writers_wait_and_then_fail() {
        let (mux, mut out) = Mux::new(Arc::from("files"), 1, Duration::from_millis(200));
        let _first = mux.request("a", 7, json!({"jsonrpc":"2.0","id":1,"method":"ping"})).await.expect("queued");
        let Err(e) = mux.request("a", 7, json!({"jsonrpc":"2.0","id":2,"method":"ping"})).await else {
            panic!("a second request fits in a queue of one");
        };
        assert_eq!(e.to_string(), "upstream server 'files' is not reading its input: its queue stayed full for 200ms");
        assert_eq!(mux.sizes(), (0, 1), "the request that was never written is forgotten");
        assert_eq!(sent(&mut out)["id"], 1);
    }

    #[tokio::test]
    async fn an_unreadable_message_fails_the_calls_in_flight_and_cancels_them_upstream() {
        let (mux, mut out) = mux();
        let mut s = mux.request("a", 7, json!({"jsonrpc":"2.0","id":"x","method":"tools/call"})).await.expect("sent");
        let gid = sent(&mut out)["id"].clone();
        mux.fail_pending("sent a message larger than 1024 bytes (max_response_bytes)");
        let err = s.next().await.expect("an error");
        assert_eq!(err["id"], "x");
        assert_eq!(
            err["error"]["message"],
            "upstream server 'files' sent a message larger than 1024 bytes (max_response_bytes)"
        );
        let note = sent(&mut out);
        assert_eq!((note["method"].as_str(), &note["params"]["requestId"]), (Some("notifications/cancelled"), &gid));
        assert!(!mux.is_closed(), "the pipe goes on");
    }
}
