//! Streamable HTTP upstreams. One upstream session per client session; each client message
//! is POSTed with the upstream's session id, and the upstream's answer (JSON or an SSE
//! stream) is relayed byte for byte, so event ids, `retry` fields and unknown fields survive.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;
use url::Url;

use super::{ClientHello, Opened, Reply, UpstreamError, initialize_request, opened_from_response};
use crate::transport::jsonrpc::{Kind, Message};
use crate::transport::session::SessionState;

/// `Mcp-Session-Id`.
pub const SESSION_HEADER: &str = "mcp-session-id";
/// `MCP-Protocol-Version`.
pub const PROTOCOL_HEADER: &str = "mcp-protocol-version";
/// What the gateway accepts from upstreams.
const ACCEPT_BOTH: &str = "application/json, text/event-stream";
/// Largest error-body excerpt put into a message.
const DETAIL_CHARS: usize = 200;
/// Largest JSON body read from an upstream (larger answers must stream as SSE).
const MAX_JSON_BYTES: usize = 64 * 1024 * 1024;

/// A Streamable HTTP upstream.
pub struct HttpUpstream {
    name: Arc<str>,
    url: Url,
    client: reqwest::Client,
    timeout: Duration,
}

impl HttpUpstream {
    /// A connector for `url` (connects lazily).
    pub fn new(
        name: Arc<str>,
        url: Url,
        client: reqwest::Client,
        timeout: Duration,
    ) -> HttpUpstream {
        HttpUpstream {
            name,
            url,
            client,
            timeout,
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            return UpstreamError::Timeout {
                server: self.name.to_string(),
                secs: self.timeout.as_secs(),
            };
        }
        // reqwest's Display names the URL; keep only the innermost cause.
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        UpstreamError::Unreachable {
            server: self.name.to_string(),
            cause: cause.to_string(),
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        session: Option<&SessionState>,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .request(method, self.url.clone())
            .header(header::ACCEPT, ACCEPT_BOTH);
        if let Some(s) = session {
            if let Some(id) = &s.upstream_session {
                req = req.header(SESSION_HEADER, id);
            }
            req = req.header(PROTOCOL_HEADER, &s.upstream_protocol);
        }
        req
    }

    async fn status_error(&self, resp: reqwest::Response) -> UpstreamError {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let excerpt: String = body
            .chars()
            .filter(|c| !c.is_control())
            .take(DETAIL_CHARS)
            .collect();
        let detail = if excerpt.is_empty() {
            String::new()
        } else {
            format!(": {excerpt}")
        };
        UpstreamError::Status {
            server: self.name.to_string(),
            status,
            detail,
        }
    }

    /// `initialize` upstream with the client's capabilities, then `notifications/initialized`.
    pub async fn open(&self, hello: &ClientHello) -> Result<Opened, UpstreamError> {
        let body = initialize_request(Value::from(0), hello);
        let resp = self
            .request(reqwest::Method::POST, None)
            .json(&body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp).await);
        }
        let session = resp
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let response = self.single_response(resp, &Value::from(0)).await?;
        let opened = opened_from_response(&self.name, response, session)?;
        let state = SessionState {
            version: 1,
            key: String::new(),
            client_protocol: String::new(),
            upstream_protocol: opened.upstream_protocol.clone(),
            upstream_session: opened.upstream_session.clone(),
            created: 0,
        };
        let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        let resp = self
            .request(reqwest::Method::POST, Some(&state))
            .header(header::CONTENT_TYPE, "application/json")
            .body(note)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp).await);
        }
        Ok(opened)
    }

    /// Reads the response with `id` from a JSON or SSE answer.
    async fn single_response(
        &self,
        resp: reqwest::Response,
        id: &Value,
    ) -> Result<Value, UpstreamError> {
        let is_sse = content_type(resp.headers()).starts_with("text/event-stream");
        let protocol = |detail: String| UpstreamError::Protocol {
            server: self.name.to_string(),
            detail,
        };
        if !is_sse {
            let bytes = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
            return serde_json::from_slice(&bytes)
                .map_err(|e| protocol(format!("invalid JSON: {e}")));
        }
        let mut events = sse_stream::SseStream::from_bytes_stream(resp.bytes_stream());
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| protocol(format!("invalid SSE: {e}")))?;
            let Some(data) = event.data else { continue };
            let Ok(msg) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            if msg.get("id") == Some(id)
                && (msg.get("result").is_some() || msg.get("error").is_some())
            {
                return Ok(msg);
            }
        }
        Err(protocol("the stream ended before the response".to_owned()))
    }

    /// POSTs one client message and relays the answer.
    pub async fn send(
        &self,
        session: &SessionState,
        message: Message,
    ) -> Result<Reply, UpstreamError> {
        let mut req = self
            .request(reqwest::Method::POST, Some(session))
            .header(header::CONTENT_TYPE, "application/json")
            .body(message.raw);
        if message.kind == Kind::Request {
            req = req.timeout(self.timeout);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        self.relay(resp, session).await
    }

    async fn relay(
        &self,
        resp: reqwest::Response,
        session: &SessionState,
    ) -> Result<Reply, UpstreamError> {
        match resp.status() {
            StatusCode::ACCEPTED => Ok(Reply::Accepted),
            s if s.is_success() => {
                if content_type(resp.headers()).starts_with("text/event-stream") {
                    return Ok(Reply::Sse(resp));
                }
                if resp
                    .content_length()
                    .is_some_and(|n| n > MAX_JSON_BYTES as u64)
                {
                    return Err(UpstreamError::Protocol {
                        server: self.name.to_string(),
                        detail: "JSON answer larger than 64 MiB".to_owned(),
                    });
                }
                let bytes = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
                if bytes.is_empty() {
                    Ok(Reply::Accepted)
                } else {
                    Ok(Reply::Json(bytes))
                }
            }
            StatusCode::NOT_FOUND if session.upstream_session.is_some() => {
                Err(UpstreamError::SessionExpired)
            }
            StatusCode::METHOD_NOT_ALLOWED => Ok(Reply::Status(StatusCode::METHOD_NOT_ALLOWED)),
            _ => Err(self.status_error(resp).await),
        }
    }

    /// GET: the session's server-to-client stream, resumed after `last_event_id` if given.
    pub async fn listen(
        &self,
        session: &SessionState,
        last_event_id: Option<&str>,
    ) -> Result<Reply, UpstreamError> {
        let mut req = self
            .request(reqwest::Method::GET, Some(session))
            .header(header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id.and_then(|v| HeaderValue::from_str(v).ok()) {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        self.relay(resp, session).await
    }

    /// DELETE: ends the upstream session.
    pub async fn close(&self, session: &SessionState) -> Result<(), UpstreamError> {
        if session.upstream_session.is_none() {
            return Ok(());
        }
        let resp = self
            .request(reqwest::Method::DELETE, Some(session))
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Ok(()),
            _ => Err(self.status_error(resp).await),
        }
    }

    /// Ready when the upstream answers HTTP at all (any status).
    pub async fn ready(&self) -> Result<(), UpstreamError> {
        self.client
            .get(self.url.clone())
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.unreachable(&e))
    }
}

fn content_type(headers: &http::HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}
