//! Legacy HTTP+SSE upstreams (protocol 2024-11-05): a long-lived GET stream per client
//! session announces a POST endpoint; answers come back on the stream. The connection lives
//! in this replica's memory, so such sessions are served by the replica that opened them
//! (another replica answers 404 and the client initializes again).
//!
//! A connection ends with its session: at DELETE, at once when a legacy SSE client's stream
//! drops, and otherwise after `idle_timeout` without traffic and without an open GET stream or
//! a call in flight (the client's next message then gets 404 and it initializes again).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt;
use http::header;
use serde_json::Value;
use tokio::sync::mpsc;
use url::Url;

use super::mux::Mux;
use super::stdio::send_via_mux;
use super::{ClientHello, Opened, Reply, UpstreamError};
use crate::protocol::jsonrpc::Message;
use crate::protocol::session::SessionState;

struct Connection {
    mux: Arc<Mux>,
    tasks: [tokio::task::JoinHandle<()>; 2],
    /// When its session last sent a message or opened its stream.
    used: std::sync::Mutex<Instant>,
    server: Arc<str>,
}

impl Connection {
    fn touch(&self) {
        *self.used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Whether nothing has used it for `idle`: no message, no open GET stream, no call.
    fn idle_for(&self, idle: Duration) -> bool {
        let (listeners, pending) = self.mux.sizes();
        listeners == 0 && pending == 0 && self.used.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= idle
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
        metrics::gauge!("portcullis_sse_upstream_connections", "server" => self.server.to_string()).decrement(1.0);
    }
}

type Connections = DashMap<String, Connection>;

/// A legacy SSE upstream.
pub struct SseUpstream {
    name: Arc<str>,
    url: Url,
    client: reqwest::Client,
    timeout: Duration,
    auth: crate::config::UpstreamAuth,
    credentials: Arc<super::credentials::Credentials>,
    connections: Arc<Connections>,
    limits: crate::config::UpstreamLimits,
    /// Whether the idle sweeper runs (started with the first connection).
    sweeping: std::sync::atomic::AtomicBool,
}

impl SseUpstream {
    /// A connector for the SSE endpoint `url`.
    pub fn new(
        config: &crate::config::ServerConfig,
        url: Url,
        client: reqwest::Client,
        credentials: Arc<super::credentials::Credentials>,
    ) -> SseUpstream {
        SseUpstream {
            name: Arc::from(config.name.as_str()),
            url,
            client,
            timeout: config.request_timeout,
            auth: config.auth.clone(),
            credentials,
            connections: Arc::default(),
            limits: config.limits,
            sweeping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Starts the task that closes idle connections, once.
    fn sweep_idle(&self) {
        if self.sweeping.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let idle = self.limits.idle_timeout;
        let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(close_idle(Arc::downgrade(&self.connections), self.name.clone(), idle, every));
    }

    fn err(&self, detail: impl Into<String>) -> UpstreamError {
        UpstreamError::Protocol { server: self.name.to_string(), detail: detail.into() }
    }

    /// Opens the stream, waits for the endpoint, and initializes with the client's hello.
    pub async fn open(&self, hello: &ClientHello, session_key: &str) -> Result<Opened, UpstreamError> {
        let credential = self.credentials.header(&self.name, &self.auth, "").await?;
        let mut get = self.client.get(self.url.clone()).header(header::ACCEPT, "text/event-stream");
        if let Some((name, value)) = &credential {
            get = get.header(name, value);
        }
        // The deadline covers the headers only: the stream itself lives as long as the session.
        let resp = tokio::time::timeout(self.timeout, get.send())
            .await
            .map_err(|_| UpstreamError::Timeout { server: self.name.to_string(), after: self.timeout })?
            .map_err(|e| UpstreamError::Unreachable { server: self.name.to_string(), cause: e.to_string() })?;
        if !resp.status().is_success() {
            return Err(UpstreamError::Status {
                server: self.name.to_string(),
                status: resp.status().as_u16(),
                detail: String::new(),
            });
        }
        let limit = self.limits.max_response_bytes;
        let mut events = super::limit::events(super::limit::sse_body(resp, self.name.clone(), limit));
        let endpoint = tokio::time::timeout(self.timeout, async {
            while let Some(Ok(ev)) = events.next().await {
                if ev.event.as_deref() == Some("endpoint") {
                    return ev.data;
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| self.err("sent no `endpoint` event"))?;
        let endpoint = self.url.join(endpoint.trim()).map_err(|e| self.err(format!("bad endpoint: {e}")))?;
        // Only post where the stream came from: the endpoint is upstream-controlled input.
        if endpoint.origin() != self.url.origin() {
            return Err(self.err("announced an endpoint on another origin"));
        }
        let (mux, out_rx) = Mux::new(self.name.clone(), self.limits.queue_messages, self.timeout);
        let mux = Arc::new(mux);
        let reader = tokio::spawn({
            let mux = mux.clone();
            async move {
                let mut why = "closed its SSE stream".to_owned();
                while let Some(ev) = events.next().await {
                    let ev = match ev {
                        Ok(ev) => ev,
                        Err(e) => {
                            if let UpstreamError::TooLarge { limit, .. } = e {
                                why = format!("sent a message larger than {limit} bytes (max_response_bytes)");
                            }
                            break;
                        }
                    };
                    let is_message = ev.event.as_deref().is_none_or(|e| e == "message");
                    if let (true, Some(data)) = (is_message, ev.data)
                        && let Ok(msg) = serde_json::from_str::<Value>(&data)
                    {
                        mux.route(msg);
                    }
                }
                mux.close(&why);
            }
        });
        let poster = tokio::spawn(post_loop(self.client.clone(), endpoint, credential, out_rx, mux.clone()));
        metrics::gauge!("portcullis_sse_upstream_connections", "server" => self.name.to_string()).increment(1.0);
        let conn = Connection {
            mux: mux.clone(),
            tasks: [reader, poster],
            used: std::sync::Mutex::new(Instant::now()),
            server: self.name.clone(),
        };
        let response = tokio::time::timeout(self.timeout, mux.call(super::initialize_request(Value::from(0), hello)))
            .await
            .map_err(|_| UpstreamError::Timeout { server: self.name.to_string(), after: self.timeout })??;
        let opened = super::opened_from_response(&self.name, response, None)?;
        mux.forward(
            "",
            &Message::from_value(&serde_json::json!({"jsonrpc":"2.0","method":"notifications/initialized"})),
        )
        .await?;
        self.connections.insert(session_key.to_owned(), conn);
        self.sweep_idle();
        Ok(opened)
    }

    fn mux(&self, session: &SessionState) -> Result<Arc<Mux>, UpstreamError> {
        match self.connections.get(&session.key) {
            Some(c) if !c.mux.is_closed() => {
                c.touch();
                Ok(c.mux.clone())
            }
            _ => Err(UpstreamError::SessionExpired),
        }
    }

    /// Relays one client message.
    pub async fn send(&self, session: &SessionState, message: Message) -> Result<Reply, UpstreamError> {
        send_via_mux(&*self.mux(session)?, session, message).await
    }

    /// Open connections (one per live session).
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// The session's server-to-client stream.
    pub async fn listen(&self, session: &SessionState) -> Result<Reply, UpstreamError> {
        Ok(Reply::Messages(self.mux(session)?.listen(&session.key, session.features)?))
    }

    /// Drops the session's connection.
    pub fn close(&self, session: &SessionState) {
        if let Some((_, c)) = self.connections.remove(&session.key) {
            c.mux.close("session ended");
        }
    }

    /// Ready when the SSE endpoint answers.
    pub async fn ready(&self) -> Result<(), UpstreamError> {
        self.client
            .get(self.url.clone())
            .header(header::ACCEPT, "text/event-stream")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| UpstreamError::Unreachable { server: self.name.to_string(), cause: e.to_string() })
    }

    /// Drops every connection.
    pub fn shutdown(&self) {
        self.connections.clear();
    }
}

/// Closes the connections of `connections` idle for `idle`, every `every`, until the
/// upstream is dropped.
async fn close_idle(connections: Weak<Connections>, server: Arc<str>, idle: Duration, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(connections) = connections.upgrade() else { return };
        connections.retain(|_, c| {
            if !c.idle_for(idle) {
                return true;
            }
            c.mux.close("closed the session's connection: it was idle (idle_timeout)");
            metrics::counter!("portcullis_sse_upstream_idle_closed_total", "server" => server.to_string()).increment(1);
            tracing::info!(server = %server, "closed an idle legacy SSE upstream connection");
            false
        });
    }
}

async fn post_loop(
    client: reqwest::Client,
    endpoint: Url,
    credential: Option<(http::HeaderName, http::HeaderValue)>,
    mut rx: mpsc::Receiver<Bytes>,
    mux: Arc<Mux>,
) {
    while let Some(body) = rx.recv().await {
        let mut post = client.post(endpoint.clone()).header(header::CONTENT_TYPE, "application/json");
        if let Some((name, value)) = &credential {
            post = post.header(name, value);
        }
        let sent = post.body(body).send().await;
        match sent {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "legacy SSE upstream refused a message"),
            Err(_) => {
                mux.close("could not be reached");
                return;
            }
        }
    }
}
