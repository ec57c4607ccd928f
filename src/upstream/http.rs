//! Streamable HTTP upstreams. One upstream session per client session; each client message
//! is POSTed with the upstream's session id, and the upstream's answer (JSON or an SSE
//! stream) is relayed byte for byte, so event ids, `retry` fields and unknown fields survive.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, StatusCode, header};
use serde_json::Value;
use url::Url;

use super::credentials::Renewed;
use super::{ClientHello, Opened, Reply, UpstreamError, initialize_request, opened_from_response};
use crate::oauth::client::challenge::BearerChallenge;
use crate::protocol::jsonrpc::{Kind, Message, code, error_response, result_response};
use crate::protocol::session::SessionState;
use crate::protocol::version;

/// `Mcp-Session-Id`.
pub const SESSION_HEADER: &str = "mcp-session-id";
/// `MCP-Protocol-Version`.
pub const PROTOCOL_HEADER: &str = "mcp-protocol-version";
/// What the gateway accepts from upstreams.
const ACCEPT_BOTH: &str = "application/json, text/event-stream";
/// Largest error-body excerpt put into a message.
const DETAIL_CHARS: usize = 200;
/// JSON answers up to this size are read whole (one write to the client); larger ones, or
/// ones of unknown length, are relayed as they arrive so memory stays bounded.
const BUFFERED_JSON_BYTES: u64 = 1024 * 1024;

/// A Streamable HTTP upstream.
pub struct HttpUpstream {
    name: Arc<str>,
    auth: crate::config::UpstreamAuth,
    credentials: Arc<super::credentials::Credentials>,
    url: Url,
    client: reqwest::Client,
    timeout: Duration,
    /// Largest answer read (`max_response_bytes`).
    max_bytes: usize,
    /// Whether the upstream keeps sessions: unknown, stateful or stateless (2026-07-28).
    mode: AtomicU8,
}

const MODE_UNKNOWN: u8 = 0;
const MODE_STATEFUL: u8 = 1;
const MODE_STATELESS: u8 = 2;

impl HttpUpstream {
    /// A connector for `url` (connects lazily).
    pub fn new(
        config: &crate::config::ServerConfig,
        url: Url,
        stateless: bool,
        client: reqwest::Client,
        credentials: Arc<super::credentials::Credentials>,
    ) -> HttpUpstream {
        let mode = AtomicU8::new(if stateless { MODE_STATELESS } else { MODE_UNKNOWN });
        HttpUpstream {
            name: Arc::from(config.name.as_str()),
            auth: config.auth.clone(),
            credentials,
            url,
            client,
            timeout: config.request_timeout,
            max_bytes: config.limits.max_response_bytes,
            mode,
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            return UpstreamError::Timeout { server: self.name.to_string(), after: self.timeout };
        }
        // reqwest's Display names the URL; keep only the innermost cause.
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        UpstreamError::Unreachable { server: self.name.to_string(), cause: cause.to_string() }
    }

    /// The header carrying the gateway's own credential for this upstream (for `caller`'s
    /// calls), if it has one.
    async fn credential(&self, caller: &str) -> Result<Option<(HeaderName, HeaderValue)>, UpstreamError> {
        self.credentials.header(&self.name, &self.auth, caller).await
    }

    /// Sends a request. For an OAuth upstream, a 401 gets one refresh and one retry (R99),
    /// and a refusal that a new authorization could fix becomes
    /// [`UpstreamError::Authorization`] with a connect link for `caller`.
    async fn execute(&self, req: reqwest::RequestBuilder, caller: &str) -> Result<reqwest::Response, UpstreamError> {
        let req = req.build().map_err(|e| self.unreachable(&e))?;
        if !matches!(self.auth, crate::config::UpstreamAuth::OAuth(_)) {
            return self.client.execute(req).await.map_err(|e| self.unreachable(&e));
        }
        // Boxed: the refresh and retry make a large future, which every request's future
        // would otherwise carry.
        Box::pin(self.execute_authorized(req, caller)).await
    }

    /// [`Self::execute`] for an OAuth upstream.
    async fn execute_authorized(
        &self,
        req: reqwest::Request,
        caller: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let again = req.try_clone();
        let sent = req.headers().get(header::AUTHORIZATION).cloned();
        let resp = self.client.execute(req).await.map_err(|e| self.unreachable(&e))?;
        if !matches!(resp.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Ok(resp);
        }
        let challenge = BearerChallenge::from_headers(resp.headers());
        let status = resp.status().as_u16();
        match self.credentials.refused(&self.name, caller, status, challenge.as_ref(), sent.as_ref()).await? {
            Renewed::Refused(e) => Err(e),
            Renewed::Retry(name, value) => {
                let Some(mut retry) = again else { return Ok(resp) };
                retry.headers_mut().insert(name, value);
                let resp = self.client.execute(retry).await.map_err(|e| self.unreachable(&e))?;
                if !matches!(resp.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                    return Ok(resp);
                }
                // Refused with a fresh token too: only a new authorization can help.
                let challenge = BearerChallenge::from_headers(resp.headers());
                let status = resp.status().as_u16();
                match self.credentials.refused(&self.name, caller, status, challenge.as_ref(), None).await? {
                    Renewed::Refused(e) => Err(e),
                    Renewed::Retry(..) => Ok(resp),
                }
            }
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        session: Option<&SessionState>,
        caller: &str,
    ) -> Result<reqwest::RequestBuilder, UpstreamError> {
        let mut req = self.client.request(method, self.url.clone()).header(header::ACCEPT, ACCEPT_BOTH);
        if let Some((name, value)) = self.credential(caller).await? {
            req = req.header(name, value);
        }
        if let Some(s) = session {
            if let Some(id) = &s.upstream_session {
                req = req.header(SESSION_HEADER, id);
            }
            req = req.header(PROTOCOL_HEADER, version::header_value(&s.upstream_protocol));
        }
        Ok(req)
    }

    async fn status_error(&self, resp: reqwest::Response) -> UpstreamError {
        let status = resp.status().as_u16();
        // Only the start of the body is read: an error page can be as large as it likes.
        let prefix = super::limit::read_prefix(resp, DETAIL_CHARS * 4).await;
        let body = String::from_utf8_lossy(&prefix);
        let excerpt: String = body.chars().filter(|c| !c.is_control()).take(DETAIL_CHARS).collect();
        let detail = if excerpt.is_empty() { String::new() } else { format!(": {excerpt}") };
        UpstreamError::Status { server: self.name.to_string(), status, detail }
    }

    /// Opens an upstream session: `initialize` (then `notifications/initialized`), or, for an
    /// upstream that speaks only the stateless 2026-07-28 revision, `server/discover`.
    /// With `protocol = "auto"` a refused `initialize` is retried as `server/discover` once,
    /// and the answer is remembered for this server.
    pub async fn open(&self, hello: &ClientHello) -> Result<Opened, UpstreamError> {
        match self.mode.load(Ordering::Relaxed) {
            MODE_STATELESS => return self.discover(hello).await,
            MODE_STATEFUL => return self.initialize(hello).await,
            _ => {}
        }
        match self.initialize(hello).await {
            Ok(opened) => {
                self.mode.store(MODE_STATEFUL, Ordering::Relaxed);
                Ok(opened)
            }
            Err(first @ (UpstreamError::Status { .. } | UpstreamError::Protocol { .. })) => {
                match self.discover(hello).await {
                    Ok(opened) => {
                        self.mode.store(MODE_STATELESS, Ordering::Relaxed);
                        Ok(opened)
                    }
                    Err(_) => Err(first),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a lifecycle request of the gateway's own; any non-success status is an error.
    async fn lifecycle(
        &self,
        req: reqwest::RequestBuilder,
        body: &Value,
        caller: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let resp = self.execute(req.json(body).timeout(self.timeout), caller).await?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp).await);
        }
        Ok(resp)
    }

    async fn initialize(&self, hello: &ClientHello) -> Result<Opened, UpstreamError> {
        let body = initialize_request(Value::from(0), hello);
        let resp = self
            .lifecycle(self.request(reqwest::Method::POST, None, &hello.caller).await?, &body, &hello.caller)
            .await?;
        let session = resp.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let response = self.single_response(resp, &Value::from(0)).await?;
        let opened = opened_from_response(&self.name, response, session)?;
        let state = SessionState {
            version: 1,
            upstream_protocol: opened.upstream_protocol.clone(),
            upstream_session: opened.upstream_session.clone(),
            subject: hello.caller.clone(),
            ..SessionState::default()
        };
        let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        let req = self
            .request(reqwest::Method::POST, Some(&state), &hello.caller)
            .await?
            .header(header::CONTENT_TYPE, "application/json")
            .body(note)
            .timeout(self.timeout);
        let resp = self.execute(req, &hello.caller).await?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp).await);
        }
        Ok(opened)
    }

    /// Reads the response with `id` from a JSON or SSE answer.
    async fn single_response(&self, resp: reqwest::Response, id: &Value) -> Result<Value, UpstreamError> {
        let is_sse = content_type(resp.headers()).starts_with("text/event-stream");
        let protocol = |detail: String| UpstreamError::Protocol { server: self.name.to_string(), detail };
        if !is_sse {
            let bytes = super::limit::read_body(resp, &self.name, self.max_bytes).await?;
            return serde_json::from_slice(&bytes).map_err(|e| protocol(format!("invalid JSON: {e}")));
        }
        let mut events = super::limit::events(super::limit::sse_body(resp, self.name.clone(), self.max_bytes));
        while let Some(event) = events.next().await {
            let event = event?;
            let Some(data) = event.data else { continue };
            let Ok(msg) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            if msg.get("id") == Some(id) && (msg.get("result").is_some() || msg.get("error").is_some()) {
                return Ok(msg);
            }
        }
        Err(protocol("the stream ended before the response".to_owned()))
    }

    /// POSTs one client message and relays the answer.
    pub async fn send(&self, session: &SessionState, message: Message) -> Result<Reply, UpstreamError> {
        if session.upstream_protocol == version::STATELESS {
            return Box::pin(self.send_stateless(session, message)).await;
        }
        let req = self
            .request(reqwest::Method::POST, Some(session), &session.subject)
            .await?
            .header(header::CONTENT_TYPE, "application/json")
            .body(message.raw);
        // The deadline covers the headers and a JSON body; an SSE body is timed by the relay.
        let id = message.id.clone();
        let exchange = async {
            let resp = self.execute(req, &session.subject).await?;
            self.relay(resp, session, id).await
        };
        if message.kind != Kind::Request {
            return exchange.await;
        }
        let timeout = UpstreamError::Timeout { server: self.name.to_string(), after: self.timeout };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| timeout)?
    }

    /// The answer to the request with `id` (`None`: a notification, or a GET stream).
    async fn relay(
        &self,
        resp: reqwest::Response,
        session: &SessionState,
        id: Option<Value>,
    ) -> Result<Reply, UpstreamError> {
        match resp.status() {
            StatusCode::ACCEPTED => Ok(Reply::Accepted),
            s if s.is_success() => {
                if content_type(resp.headers()).starts_with("text/event-stream") {
                    let credential = self.credential(&session.subject).await?;
                    let resume = session.upstream_session.as_ref().map(|id| {
                        Box::new(Resume {
                            credential,
                            client: self.client.clone(),
                            url: self.url.clone(),
                            session: id.clone(),
                            protocol: session.upstream_protocol.clone(),
                        })
                    });
                    let body = super::limit::sse_body(resp, self.name.clone(), self.max_bytes);
                    let (server, limit) = (self.name.clone(), self.max_bytes);
                    return Ok(Reply::Sse(SseReply { body, resume, id, server, limit }));
                }
                // A body of known length within the limit is relayed as it arrives when large;
                // one of unknown length is read (up to the limit) so that an oversized one can
                // still be refused with a clear error.
                if resp.content_length().is_some_and(|n| n > self.max_bytes as u64) {
                    return Err(super::limit::too_large(&self.name, self.max_bytes));
                }
                if resp.content_length().is_some_and(|n| n > BUFFERED_JSON_BYTES) {
                    return Ok(Reply::JsonBody(resp));
                }
                let bytes = super::limit::read_body(resp, &self.name, self.max_bytes).await?;
                if bytes.is_empty() { Ok(Reply::Accepted) } else { Ok(Reply::Json(bytes)) }
            }
            StatusCode::NOT_FOUND if session.upstream_session.is_some() => Err(UpstreamError::SessionExpired),
            StatusCode::METHOD_NOT_ALLOWED => Ok(Reply::Status(StatusCode::METHOD_NOT_ALLOWED)),
            _ => Err(self.status_error(resp).await),
        }
    }

    /// GET: the session's server-to-client stream, resumed after `last_event_id` if given.
    pub async fn listen(&self, session: &SessionState, last_event_id: Option<&str>) -> Result<Reply, UpstreamError> {
        if session.upstream_protocol == version::STATELESS || session.pending {
            // The stateless revision has no GET stream; nor has a session the gateway answers
            // for until its caller connects.
            return Ok(Reply::Status(StatusCode::METHOD_NOT_ALLOWED));
        }
        let mut req = self
            .request(reqwest::Method::GET, Some(session), &session.subject)
            .await?
            .header(header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id.and_then(|v| HeaderValue::from_str(v).ok()) {
            req = req.header("last-event-id", id);
        }
        let resp = self.execute(req, &session.subject).await?;
        self.relay(resp, session, None).await
    }

    /// DELETE: ends the upstream session.
    pub async fn close(&self, session: &SessionState) -> Result<(), UpstreamError> {
        if session.upstream_session.is_none() || session.pending {
            return Ok(());
        }
        let req = self.request(reqwest::Method::DELETE, Some(session), &session.subject).await?.timeout(self.timeout);
        let resp = self.execute(req, &session.subject).await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Ok(()),
            _ => Err(self.status_error(resp).await),
        }
    }

    /// Ready when the upstream answers HTTP at all (any status).
    pub async fn ready(&self) -> Result<(), UpstreamError> {
        // Without credentials: a readiness probe must not fetch or refresh tokens.
        self.client
            .request(reqwest::Method::GET, self.url.clone())
            .header(header::ACCEPT, ACCEPT_BOTH)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.unreachable(&e))
    }
}

/// `Mcp-Method` and `Mcp-Name`: the method and the tool, prompt or resource it names,
/// mirrored in headers by the stateless revision.
const METHOD_HEADER: &str = "mcp-method";
const NAME_HEADER: &str = "mcp-name";

impl HttpUpstream {
    async fn stateless_request(&self, method: &str, caller: &str) -> Result<reqwest::RequestBuilder, UpstreamError> {
        Ok(self
            .request(reqwest::Method::POST, None, caller)
            .await?
            .header(header::CONTENT_TYPE, "application/json")
            .header(PROTOCOL_HEADER, version::STATELESS)
            .header(METHOD_HEADER, method))
    }

    /// `server/discover`, turned into the shape of an `initialize` result.
    async fn discover(&self, hello: &ClientHello) -> Result<Opened, UpstreamError> {
        let meta = request_meta(&hello.capabilities, &hello.client_info);
        let body =
            serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": {"_meta": meta}});
        let resp = self
            .lifecycle(self.stateless_request("server/discover", &hello.caller).await?, &body, &hello.caller)
            .await?;
        let response = self.single_response(resp, &Value::from(0)).await?;
        let result = response.get("result").cloned().unwrap_or(Value::Null);
        let speaks = result
            .get("supportedVersions")
            .and_then(Value::as_array)
            .is_some_and(|v| v.iter().any(|x| x == version::STATELESS));
        if !speaks {
            let detail = "server/discover does not list 2026-07-28".to_owned();
            return Err(UpstreamError::Protocol { server: self.name.to_string(), detail });
        }
        let server_info = result
            .pointer("/_meta/io.modelcontextprotocol~1serverInfo")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"name": &*self.name, "version": "unknown"}));
        let mut init = serde_json::json!({
            "protocolVersion": version::STATELESS,
            "capabilities": result.get("capabilities").cloned().unwrap_or_else(|| serde_json::json!({})),
            "serverInfo": server_info,
        });
        if let Some(i) = result.get("instructions") {
            init["instructions"] = i.clone();
        }
        Ok(Opened { upstream_session: None, upstream_protocol: version::STATELESS.to_owned(), result: init })
    }

    /// Relays to a stateless upstream: every request gets the `_meta` the revision requires,
    /// methods it removed are answered here, and its results are adapted for older clients.
    async fn send_stateless(&self, session: &SessionState, message: Message) -> Result<Reply, UpstreamError> {
        let method = message.method().to_owned();
        if message.kind == Kind::Request && matches!(method.as_str(), "ping" | "logging/setLevel") {
            let id = message.id.clone().unwrap_or(Value::Null);
            let response = result_response(&id, serde_json::json!({}));
            return Ok(Reply::Json(serde_json::to_vec(&response).unwrap_or_default().into()));
        }
        if message.kind != Kind::Request {
            // Notifications of the session lifecycle have no meaning without a session.
            return Ok(Reply::Accepted);
        }
        let message_id = message.id.clone();
        let mut value = message
            .value()
            .map_err(|e| UpstreamError::Protocol { server: self.name.to_string(), detail: e.to_string() })?;
        let hello = session.hello.clone().unwrap_or(Value::Null);
        let caps = hello.get("capabilities").cloned().unwrap_or_else(|| serde_json::json!({}));
        let info =
            hello.get("clientInfo").cloned().unwrap_or_else(|| serde_json::json!({"name": "unknown", "version": "0"}));
        if !value.get("params").is_some_and(Value::is_object) {
            value["params"] = serde_json::json!({});
        }
        let meta = value["params"].as_object_mut().map(|p| p.entry("_meta").or_insert_with(|| serde_json::json!({})));
        if let Some(Value::Object(meta)) = meta {
            for (k, v) in request_meta(&caps, &info).as_object().into_iter().flatten() {
                meta.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let mut req = self.stateless_request(&method, &session.subject).await?.timeout(self.timeout);
        let name_key = match method.as_str() {
            "tools/call" | "prompts/get" => Some("/params/name"),
            "resources/read" => Some("/params/uri"),
            _ => None,
        };
        if let Some(name) = name_key.and_then(|k| value.pointer(k)).and_then(Value::as_str)
            && let Ok(h) = HeaderValue::from_str(name)
        {
            req = req.header(NAME_HEADER, h);
        }
        let resp = self.execute(req.json(&value), &session.subject).await?;
        let reply = self.relay(resp, session, message_id).await?;
        if session.client_protocol == version::STATELESS {
            return Ok(reply);
        }
        let server = self.name.clone();
        let stream = super::messages_of(reply).map(move |msg| for_stateful_client(msg, &server));
        Ok(Reply::Messages(Box::pin(stream)))
    }
}

/// The `_meta` keys a 2026-07-28 request carries.
fn request_meta(capabilities: &Value, client_info: &Value) -> Value {
    serde_json::json!({
        "io.modelcontextprotocol/protocolVersion": version::STATELESS,
        "io.modelcontextprotocol/clientCapabilities": capabilities,
        "io.modelcontextprotocol/clientInfo": client_info,
    })
}

/// A stateless upstream's answer as an older client expects it: without the fields that
/// revision added, and with an input request (which the gateway cannot yet turn into
/// sampling or elicitation) reported as an error.
fn for_stateful_client(mut msg: Value, server: &str) -> Value {
    let Some(result) = msg.get_mut("result").and_then(Value::as_object_mut) else {
        return msg;
    };
    if result.get("resultType").and_then(Value::as_str).is_some_and(|t| t != "complete") {
        let text =
            format!("upstream server '{server}' asked for client input, which the gateway cannot relay to this client");
        return error_response(msg.get("id"), code::UPSTREAM_ERROR, &text);
    }
    for key in ["resultType", "cacheScope", "ttlMs"] {
        result.remove(key);
    }
    msg
}

fn content_type(headers: &http::HeaderMap) -> &str {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// An SSE answer from an HTTP upstream, with what is needed to resume it.
pub struct SseReply {
    /// The upstream's body, each event within `max_response_bytes`.
    pub body: super::limit::ByteStream,
    /// How to resume the stream after the upstream closes it early (session upstreams only).
    pub resume: Option<Box<Resume>>,
    /// The id of the request answered (`None` for a GET stream), for an error in its place.
    pub id: Option<Value>,
    /// The server's name.
    pub server: Arc<str>,
    /// Its `max_response_bytes`, for resumed streams.
    pub limit: usize,
}

/// Enough of an upstream session to GET its stream again with `Last-Event-ID`.
pub struct Resume {
    credential: Option<(HeaderName, HeaderValue)>,
    client: reqwest::Client,
    url: Url,
    session: String,
    protocol: String,
}

/// How many times the gateway resumes one answer before giving up.
const MAX_RESUMES: u32 = 10;
/// Longest `retry` delay honoured before resuming.
const MAX_RETRY: Duration = Duration::from_secs(5);

struct Resuming {
    events: super::limit::Events,
    resume: Option<Box<Resume>>,
    id: Option<Value>,
    server: Arc<str>,
    limit: usize,
    last_id: Option<String>,
    retry: Duration,
    answered: bool,
    resumes: u32,
}

/// The messages of an SSE answer. When the gateway itself reads an answer (rather than
/// relaying bytes to a client that can resume on its own) and the upstream closes the stream
/// before the response, the gateway resumes it with GET and `Last-Event-ID`.
pub fn resuming_messages(sse: SseReply) -> super::MessageStream {
    let state = Resuming {
        events: super::limit::events(sse.body),
        resume: sse.resume,
        id: sse.id,
        server: sse.server,
        limit: sse.limit,
        last_id: None,
        retry: Duration::from_millis(500),
        answered: false,
        resumes: 0,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            // The response is the last message of an answer; a resumed GET stream stays open.
            if st.answered {
                return None;
            }
            match st.events.next().await {
                Some(Ok(event)) => {
                    if let Some(id) = event.id.filter(|i| !i.is_empty()) {
                        st.last_id = Some(id);
                    }
                    if let Some(ms) = event.retry {
                        st.retry = Duration::from_millis(ms).min(MAX_RETRY);
                    }
                    let Some(msg) = event.data.and_then(|d| serde_json::from_str::<Value>(&d).ok()) else { continue };
                    st.answered |= msg.get("result").is_some() || msg.get("error").is_some();
                    return Some((msg, st));
                }
                broken @ (Some(Err(_)) | None) => {
                    if let Some(Err(e @ UpstreamError::TooLarge { .. })) = broken {
                        // Resuming would replay the same event: the request fails here.
                        st.answered = true;
                        let id = st.id.clone()?;
                        return Some((error_response(Some(&id), code::UPSTREAM_ERROR, &e.to_string()), st));
                    }
                    if st.resumes >= MAX_RESUMES {
                        return None;
                    }
                    let (Some(resume), Some(last)) = (&st.resume, &st.last_id) else { return None };
                    tokio::time::sleep(st.retry).await;
                    st.resumes += 1;
                    let mut get = resume.client.get(resume.url.clone());
                    if let Some((name, value)) = &resume.credential {
                        get = get.header(name, value);
                    }
                    let resp = get
                        .header(header::ACCEPT, "text/event-stream")
                        .header(SESSION_HEADER, &resume.session)
                        .header(PROTOCOL_HEADER, &resume.protocol)
                        .header("last-event-id", last)
                        .send()
                        .await
                        .ok()
                        .filter(|r| r.status().is_success())?;
                    st.events = super::limit::events(super::limit::sse_body(resp, st.server.clone(), st.limit));
                }
            }
        }
    }))
}
