//! Many client sessions over one message pipe (a stdio process, or one legacy SSE connection).
//!
//! Client request ids and progress tokens are rewritten to gateway-unique values so sessions
//! cannot collide, and answers are routed back by those values. Messages the upstream starts
//! itself carry no session, so they are routed by a rule (see [`Mux::route`]):
//! - progress goes to the request that owns the token;
//! - requests (sampling, elicitation, roots) and log messages go to the most recent pending
//!   request's stream, or else to a session's GET stream;
//! - everything else (list changes, resource updates) goes to every GET stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{MessageStream, UpstreamError};
use crate::protocol::jsonrpc::{Kind, Message, code, error_response};

type Tx = mpsc::UnboundedSender<Value>;

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
    tx: Tx,
    progress: Option<String>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// gateway progress token → (pending request id, client's token).
    progress: HashMap<String, (u64, Value)>,
    listeners: HashMap<String, (Tx, u8)>,
    closed: Option<String>,
}

/// The routing table of one pipe.
pub struct Mux {
    server: Arc<str>,
    out: mpsc::UnboundedSender<Bytes>,
    state: Arc<std::sync::Mutex<State>>,
    next_id: AtomicU64,
}

impl Mux {
    /// A mux writing outgoing messages (one JSON text each) to `out`.
    pub fn new(server: Arc<str>, out: mpsc::UnboundedSender<Bytes>) -> Mux {
        Mux { server, out, state: Arc::default(), next_id: AtomicU64::new(1) }
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
    pub fn request(&self, session: &str, features: u8, value: Value) -> Result<MessageStream, UpstreamError> {
        let mut value = value;
        let gid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let client_id = std::mem::replace(&mut value["id"], Value::from(gid));
        let token = value.pointer_mut("/params/_meta/progressToken").map(|t| {
            let ours = format!("p{gid}");
            (std::mem::replace(t, Value::from(ours.clone())), ours)
        });
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.lock();
            if let Some(why) = &st.closed {
                return Err(self.closed_error(why));
            }
            let progress = token.map(|(client_token, ours)| {
                st.progress.insert(ours.clone(), (gid, client_token));
                ours
            });
            st.pending.insert(gid, Pending { session: session.to_owned(), features, client_id, tx, progress });
        }
        self.write(&value)?;
        let cancel = CancelOnDrop { state: self.state.clone(), out: self.out.clone(), gid, answered: false };
        Ok(Box::pin(Answer { rx, cancel }))
    }

    /// Sends a request of the gateway's own and waits for its response.
    pub async fn call(&self, value: Value) -> Result<Value, UpstreamError> {
        use futures::StreamExt;
        let mut stream = self.request("", 0, value)?;
        while let Some(msg) = stream.next().await {
            if msg.get("result").is_some() || msg.get("error").is_some() {
                return Ok(msg);
            }
        }
        Err(self.closed_error("closed before answering"))
    }

    /// Forwards a client notification or response; cancellations are mapped to our ids.
    pub fn forward(&self, session: &str, message: &Message) -> Result<(), UpstreamError> {
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
            return self.write(&value);
        }
        self.send_raw(message.raw.clone())
    }

    fn write(&self, value: &Value) -> Result<(), UpstreamError> {
        let bytes = serde_json::to_vec(value).map_err(|e| self.closed_error(&e.to_string()))?;
        self.send_raw(Bytes::from(bytes))
    }

    fn send_raw(&self, bytes: Bytes) -> Result<(), UpstreamError> {
        self.out.send(bytes).map_err(|_| self.closed_error("is not running"))
    }

    /// Registers a session's GET stream; it ends when the pipe closes.
    pub fn listen(&self, session: &str, features: u8) -> Result<MessageStream, UpstreamError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.lock();
        if let Some(why) = &st.closed {
            return Err(self.closed_error(why));
        }
        st.listeners.insert(session.to_owned(), (tx, features));
        Ok(Box::pin(tokio_stream_from(rx)))
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
            let _ = p.tx.send(msg);
            return;
        }
        let Some(method) = method else { return };
        if method == "ping" && msg.get("id").is_some() {
            // The gateway is the upstream's client: it answers pings itself.
            let id = msg["id"].clone();
            drop(st);
            let _ = self.write(&serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {}}));
            return;
        }
        if method == "notifications/progress" {
            let token = msg.pointer("/params/progressToken").and_then(Value::as_str).unwrap_or("");
            if let Some((gid, client_token)) = st.progress.get(token).cloned() {
                msg["params"]["progressToken"] = client_token;
                if let Some(p) = st.pending.get(&gid) {
                    let _ = p.tx.send(msg);
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
            if let Some((_, p)) = latest {
                let _ = p.tx.send(msg);
                return;
            }
            if let Some((tx, _)) = st.listeners.values().find(|(tx, f)| f & needed == needed && !tx.is_closed()) {
                let _ = tx.send(msg);
                return;
            }
            if let Some(id) = msg.get("id").cloned() {
                drop(st);
                let text = format!("no connected client can answer {method}");
                let err = error_response(Some(&id), code::INTERNAL_ERROR, &text);
                let _ = self.write(&err);
            }
            return;
        }
        st.listeners.retain(|_, (tx, _)| tx.send(msg.clone()).is_ok());
    }

    /// Ends the pipe: every pending request gets a JSON-RPC error naming the server and why.
    pub fn close(&self, why: &str) {
        let mut st = self.lock();
        st.closed = Some(why.to_owned());
        let text = format!("upstream server '{}' {why}", self.server);
        for (_, p) in st.pending.drain() {
            let _ = p.tx.send(error_response(Some(&p.client_id), code::UPSTREAM_ERROR, &text));
        }
        st.progress.clear();
        st.listeners.clear();
    }
}

fn lock(state: &std::sync::Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding this lock leaves consistent maps; keep serving.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The messages for one pending request. Dropped before its response (the client went away),
/// it tells the upstream with `notifications/cancelled` and forgets the request.
struct Answer {
    rx: mpsc::UnboundedReceiver<Value>,
    cancel: CancelOnDrop,
}

impl futures::Stream for Answer {
    type Item = Value;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Value>> {
        let polled = self.rx.poll_recv(cx);
        match &polled {
            std::task::Poll::Ready(Some(m)) if m.get("result").is_some() || m.get("error").is_some() => {
                self.cancel.answered = true;
            }
            std::task::Poll::Ready(None) => self.cancel.answered = true,
            _ => {}
        }
        polled
    }
}

struct CancelOnDrop {
    state: Arc<std::sync::Mutex<State>>,
    out: mpsc::UnboundedSender<Bytes>,
    gid: u64,
    answered: bool,
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
        let note = serde_json::json!({
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": self.gid, "reason": "the client went away"},
        });
        let _ = self.out.send(Bytes::from(note.to_string()));
    }
}

fn tokio_stream_from(mut rx: mpsc::UnboundedReceiver<Value>) -> impl futures::Stream<Item = Value> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use serde_json::json;

    fn mux() -> (Mux, mpsc::UnboundedReceiver<Bytes>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Mux::new(Arc::from("files"), tx), rx)
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<Bytes>) -> Value {
        serde_json::from_slice(&rx.try_recv().expect("a message was written")).expect("json")
    }

    #[tokio::test]
    async fn ids_and_progress_tokens_are_rewritten_and_restored() {
        let (mux, mut out) = mux();
        let a = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":1}}});
        let mut sa = mux.request("a", 7, a.clone()).expect("sent");
        let mut sb = mux.request("b", 7, a).expect("sent");
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
        let mut s = mux.request("a", 7, json!({"jsonrpc":"2.0","id":"x","method":"tools/call"})).expect("sent");
        mux.close("exited (exit status: 1)");
        let err = s.next().await.expect("error response");
        assert_eq!(err["id"], "x");
        assert_eq!(err["error"]["message"], "upstream server 'files' exited (exit status: 1)");
        assert!(s.next().await.is_none());
        assert!(mux.request("a", 7, json!({"jsonrpc":"2.0","id":1,"method":"ping"})).is_err());
    }

    #[tokio::test]
    async fn server_requests_go_to_the_latest_pending_call_or_a_listener() {
        let (mux, mut out) = mux();
        let mut listen = mux.listen("a", 7).expect("listening");
        mux.route(json!({"jsonrpc":"2.0","id":9,"method":"roots/list"}));
        assert_eq!(listen.next().await.expect("to listener")["method"], "roots/list");
        let mut call = mux.request("b", 7, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"})).expect("sent");
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
            .expect("sent");
        let _ = sent(&mut out);
        let _unable = mux.request("unable", 0, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"})).expect("sent");
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
        let s = mux.request("a", 7, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"})).expect("sent");
        let gid = sent(&mut out)["id"].clone();
        drop(s);
        let note = sent(&mut out);
        assert_eq!(note["method"], "notifications/cancelled");
        assert_eq!(note["params"]["requestId"], gid);
        // An answered request is not cancelled.
        let mut s = mux.request("a", 7, json!({"jsonrpc":"2.0","id":2,"method":"tools/call"})).expect("sent");
        let gid = sent(&mut out)["id"].clone();
        mux.route(json!({"jsonrpc":"2.0","id":gid,"result":{}}));
        assert!(s.next().await.is_some());
        drop(s);
        assert!(out.try_recv().is_err(), "nothing more was written");
    }
}
