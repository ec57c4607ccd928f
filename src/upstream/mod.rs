//! Connectors to upstream MCP servers: Streamable HTTP, legacy HTTP+SSE, and stdio child
//! processes. An enum, not a trait object: the set is closed and `match` keeps it explicit.

pub mod credentials;
pub mod event_stream;
pub mod http;
pub mod limit;
pub mod mux;
pub mod sse;
pub mod stdio;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use serde_json::Value;

use crate::config::{ServerConfig, ServerTransport};
use crate::protocol::fault::Fault;
use crate::protocol::jsonrpc::Message;
use crate::protocol::session::SessionState;

/// A stream of JSON-RPC messages coming back from an upstream.
pub type MessageStream = Pin<Box<dyn Stream<Item = Value> + Send>>;

/// What the client declared in its `initialize`, passed on to the upstream.
#[derive(Debug, Clone)]
pub struct ClientHello {
    /// The protocol revision agreed with the client; offered to the upstream first.
    pub protocol: String,
    /// The client's `capabilities`.
    pub capabilities: Value,
    /// The client's `clientInfo`.
    pub client_info: Value,
    /// The principal's id (whose upstream credentials to use; empty for anonymous).
    pub caller: String,
}

/// An upstream session after a successful `initialize`.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The upstream's session id, if it issued one.
    pub upstream_session: Option<String>,
    /// The protocol revision the upstream answered with.
    pub upstream_protocol: String,
    /// The upstream's `InitializeResult` (server info, capabilities, instructions).
    pub result: Value,
}

/// An upstream's answer to one message.
pub enum Reply {
    /// Nothing to send back (notifications and responses): HTTP 202.
    Accepted,
    /// One JSON body.
    Json(Bytes),
    /// A large JSON body relayed as it arrives from an HTTP upstream.
    JsonBody(reqwest::Response),
    /// An SSE body relayed byte for byte from an HTTP upstream.
    Sse(http::SseReply),
    /// Messages produced by a multiplexed upstream (stdio, legacy SSE), response last.
    Messages(MessageStream),
    /// An HTTP status without a body (for example 405 for GET on a server without a stream).
    Status(::http::StatusCode),
}

/// Why an upstream could not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connection failed.
    #[error("upstream server '{server}' is unreachable: {cause}")]
    Unreachable {
        /// Server name.
        server: String,
        /// Cause, without secrets.
        cause: String,
    },
    /// No answer in time.
    #[error("upstream server '{server}' did not answer within {}", human(*.after))]
    Timeout {
        /// Server name.
        server: String,
        /// The timeout.
        after: std::time::Duration,
    },
    /// An HTTP error status.
    #[error("upstream server '{server}' answered HTTP {status}{detail}")]
    Status {
        /// Server name.
        server: String,
        /// HTTP status.
        status: u16,
        /// A short excerpt of the body, prefixed with ": ", or empty.
        detail: String,
    },
    /// The upstream no longer knows the session (HTTP 404); the client must re-initialize.
    #[error("upstream session expired")]
    SessionExpired,
    /// A stdio upstream exited or could not be started.
    #[error("upstream server '{server}' {detail}")]
    Process {
        /// Server name.
        server: String,
        /// What happened.
        detail: String,
    },
    /// The gateway's credential for the upstream is missing or unusable.
    #[error("upstream server '{server}': {detail}")]
    Credential {
        /// Server name.
        server: String,
        /// What is wrong (never the value).
        detail: String,
    },
    /// The caller must connect (or reconnect) their account at an OAuth upstream. The link is
    /// kept out of the message (messages reach logs); the MCP layer shows it to the caller.
    #[error("upstream server '{server}' needs authorization: {reason}")]
    Authorization {
        /// Server name.
        server: String,
        /// What to do, for people.
        reason: String,
        /// The single-use connect link for this caller, if one was made.
        link: Option<secrecy::SecretString>,
    },
    /// The upstream sent a message (a JSON body, an SSE event, a stdio line) larger than
    /// `max_response_bytes`; it was refused while it was read.
    #[error("upstream server '{server}' sent a message larger than {limit} bytes (max_response_bytes)")]
    TooLarge {
        /// Server name.
        server: String,
        /// The limit.
        limit: usize,
    },
    /// The upstream broke the protocol.
    #[error("upstream server '{server}' broke the protocol: {detail}")]
    Protocol {
        /// Server name.
        server: String,
        /// What was wrong.
        detail: String,
    },
}

impl UpstreamError {
    /// Which failure this is on the wire.
    pub fn fault(&self) -> Fault {
        match self {
            UpstreamError::SessionExpired => Fault::NotFound,
            UpstreamError::Timeout { .. } => Fault::UpstreamTimeout,
            UpstreamError::Authorization { link: Some(_), .. } => Fault::AuthorizationRequired,
            UpstreamError::Unreachable { .. }
            | UpstreamError::Status { .. }
            | UpstreamError::Process { .. }
            | UpstreamError::Credential { .. }
            | UpstreamError::Authorization { link: None, .. }
            | UpstreamError::TooLarge { .. }
            | UpstreamError::Protocol { .. } => Fault::Upstream,
        }
    }

    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::SessionExpired => "session_expired",
            UpstreamError::Timeout { .. } => "upstream_timeout",
            _ => "upstream_error",
        }
    }

    /// The caller's connect link and what to tell them, when the caller must connect their
    /// account first (told to the client as a URL-mode elicitation).
    pub fn connect_link(&self) -> Option<(&str, &secrecy::SecretString)> {
        match self {
            UpstreamError::Authorization { reason, link: Some(link), .. } => Some((reason, link)),
            _ => None,
        }
    }
}

/// One upstream connector.
pub enum Upstream {
    /// Streamable HTTP.
    Http(http::HttpUpstream),
    /// Legacy HTTP+SSE.
    Sse(sse::SseUpstream),
    /// A stdio child process.
    Stdio(stdio::StdioUpstream),
}

impl Upstream {
    /// Builds the connector for one configured server (starts nothing yet).
    pub fn new(config: &ServerConfig, client: reqwest::Client, credentials: Arc<credentials::Credentials>) -> Upstream {
        match &config.transport {
            ServerTransport::StreamableHttp { url, stateless } => {
                Upstream::Http(http::HttpUpstream::new(config, url.clone(), *stateless, client, credentials))
            }
            ServerTransport::Sse { url } => {
                Upstream::Sse(sse::SseUpstream::new(config, url.clone(), client, credentials))
            }
            ServerTransport::Stdio { .. } => Upstream::Stdio(stdio::StdioUpstream::new(config, credentials)),
        }
    }

    /// Opens an upstream session for a client that just sent `initialize`.
    pub async fn open(&self, hello: &ClientHello, session_key: &str) -> Result<Opened, UpstreamError> {
        match self {
            Upstream::Http(u) => u.open(hello).await,
            Upstream::Sse(u) => u.open(hello, session_key).await,
            Upstream::Stdio(u) => u.open(hello).await,
        }
    }

    /// Sends one client message within a session.
    pub async fn send(&self, session: &SessionState, message: Message) -> Result<Reply, UpstreamError> {
        match self {
            Upstream::Http(u) => u.send(session, message).await,
            Upstream::Sse(u) => u.send(session, message).await,
            Upstream::Stdio(u) => u.send(session, message).await,
        }
    }

    /// Opens the session's server-to-client stream (HTTP GET).
    pub async fn listen(&self, session: &SessionState, last_event_id: Option<&str>) -> Result<Reply, UpstreamError> {
        match self {
            Upstream::Http(u) => u.listen(session, last_event_id).await,
            Upstream::Sse(u) => u.listen(session).await,
            Upstream::Stdio(u) => u.listen(session).await,
        }
    }

    /// Ends the session (HTTP DELETE).
    pub async fn close(&self, session: &SessionState) -> Result<(), UpstreamError> {
        match self {
            Upstream::Http(u) => u.close(session).await,
            Upstream::Sse(u) => {
                u.close(session);
                Ok(())
            }
            Upstream::Stdio(u) => {
                u.close(session).await;
                Ok(())
            }
        }
    }

    /// Whether the upstream is usable now (for `/readyz`).
    pub async fn ready(&self) -> Result<(), UpstreamError> {
        match self {
            Upstream::Http(u) => u.ready().await,
            Upstream::Sse(u) => u.ready().await,
            Upstream::Stdio(u) => u.ready().await,
        }
    }

    /// Stops the per-user processes of people whose upstream connection ended.
    pub async fn sweep(&self) -> usize {
        match self {
            Upstream::Stdio(u) => u.sweep().await,
            Upstream::Http(_) | Upstream::Sse(_) => 0,
        }
    }

    /// Stops child processes and background connections.
    pub async fn shutdown(&self) {
        match self {
            Upstream::Http(_) => {}
            Upstream::Sse(u) => u.shutdown(),
            Upstream::Stdio(u) => u.shutdown().await,
        }
    }
}

/// The `initialize` request the gateway sends upstream on a client's behalf.
pub fn initialize_request(id: Value, hello: &ClientHello) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "initialize",
        "params": {
            "protocolVersion": hello.protocol,
            "capabilities": hello.capabilities,
            "clientInfo": hello.client_info,
        }
    })
}

/// Reads the result of an upstream `initialize` response.
pub fn opened_from_response(
    server: &str,
    response: Value,
    upstream_session: Option<String>,
) -> Result<Opened, UpstreamError> {
    if let Some(err) = response.get("error") {
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("error");
        return Err(UpstreamError::Protocol { server: server.to_owned(), detail: format!("initialize failed: {msg}") });
    }
    let result = response.get("result").cloned().unwrap_or(Value::Null);
    let version = result.get("protocolVersion").and_then(Value::as_str).unwrap_or_default().to_owned();
    if !crate::protocol::version::is_supported(&version) {
        return Err(UpstreamError::Protocol {
            server: server.to_owned(),
            detail: format!("unsupported protocol version {version:?}"),
        });
    }
    Ok(Opened { upstream_session, upstream_protocol: version, result })
}

/// Any reply as a stream of messages (parsing JSON and SSE bodies), for paths that must read
/// or adapt each message rather than relay bytes.
pub fn messages_of(reply: Reply) -> MessageStream {
    use futures::StreamExt;
    match reply {
        Reply::Accepted | Reply::Status(_) => futures::stream::empty().boxed(),
        Reply::Json(bytes) => {
            let items = match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Array(items)) => items,
                Ok(v) => vec![v],
                Err(_) => Vec::new(),
            };
            futures::stream::iter(items).boxed()
        }
        Reply::JsonBody(resp) => futures::stream::once(async move { resp.bytes().await.unwrap_or_default() })
            .flat_map(|bytes| messages_of(Reply::Json(bytes)))
            .boxed(),
        Reply::Sse(sse) => http::resuming_messages(sse),
        Reply::Messages(stream) => stream,
    }
}

/// `1500ms` as `"1.5s"`, `500ms` as `"500ms"`, for messages.
pub fn human(d: std::time::Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
