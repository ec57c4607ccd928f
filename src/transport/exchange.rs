//! One HTTP exchange on an MCP endpoint, as the metrics and the audit log see it. Handlers
//! fill an [`Exchange`] as they go; [`AppState::finish`] turns it into one metric sample and
//! exactly one audit record, whatever the outcome.

use std::sync::Arc;
use std::time::Instant;

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{StatusCode, header};
use http_body::Frame;
use serde::Deserialize;
use serde_json::Value;

use super::jsonrpc::{Message, code, error_response};
use crate::app::{AppState, Server};
use crate::audit::{Arguments, AuditWriter, Decision, Durability, Record};
use crate::authn::Principal;
use crate::error::{Failure, GatewayError};

/// What an exchange did so far.
#[derive(Debug)]
pub struct Exchange {
    /// The low-cardinality method label for metrics.
    pub metric: &'static str,
    /// The JSON-RPC method (or the HTTP method for GET and DELETE).
    pub method: String,
    /// The configured server it was for, once found.
    pub server: Option<Arc<Server>>,
    /// Who called, once authenticated.
    pub principal: Option<Principal>,
    /// `clientInfo` name and version, from the session or the request.
    pub client: Option<(String, String)>,
    /// The tool, for `tools/call`.
    pub tool: Option<String>,
    /// The tool's arguments (redacted before they are stored).
    pub arguments: Option<Value>,
    /// Request body bytes.
    pub bytes_in: u64,
    /// How it failed, if it did: the decision and the JSON-RPC code.
    pub failure: Option<(Decision, i64)>,
}

impl Exchange {
    /// An exchange whose method is not known yet (`metric` is used until it is).
    pub fn new(metric: &'static str) -> Exchange {
        Exchange {
            metric,
            method: metric.to_owned(),
            server: None,
            principal: None,
            client: None,
            tool: None,
            arguments: None,
            bytes_in: 0,
            failure: None,
        }
    }

    /// Notes the message being handled; for `tools/call`, its tool and arguments.
    pub fn note_message(&mut self, message: &Message, metric: &'static str) {
        self.metric = metric;
        self.method = message.method.clone().unwrap_or_else(|| "response".to_owned());
        if self.method == "tools/call" {
            #[derive(Deserialize)]
            struct Call {
                params: Option<Params>,
            }
            #[derive(Deserialize)]
            struct Params {
                name: Option<String>,
                arguments: Option<Value>,
            }
            if let Ok(Call { params: Some(p) }) = serde_json::from_slice::<Call>(&message.raw) {
                self.tool = p.name.map(|n| n.chars().take(256).collect());
                self.arguments = p.arguments;
            }
        }
    }

    /// Notes a failure: refusals of identity and origin are denials, the rest errors.
    pub fn note_failure(&mut self, failure: &Failure) {
        let (_, rpc) = failure.error.status_and_code(failure.id.is_some());
        let decision = match failure.error {
            GatewayError::Unauthenticated(_) | GatewayError::ForbiddenHost | GatewayError::ForbiddenOrigin => {
                Decision::Deny
            }
            _ => Decision::Error,
        };
        self.failure = Some((decision, rpc));
    }
}

impl AppState {
    /// Ends an exchange: one metric sample and one audit record. In strict durability the
    /// answer waits for the record to be durable, and becomes an error if it cannot be.
    pub async fn finish(&self, ex: Exchange, resp: Response, started: Instant) -> Response {
        self.observe(ex.server.as_deref(), ex.metric, resp.status(), started);
        if !self.config().audit.enabled {
            return resp;
        }
        let (decision, upstream_status) = match ex.failure {
            Some((d, rpc)) => (d, Some(rpc)),
            None => (Decision::Allow, Some(i64::from(resp.status().as_u16()))),
        };
        // A body of known length is counted now; a stream is counted as it goes (below).
        let known = http_body::Body::size_hint(resp.body()).exact().or_else(|| {
            resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
        });
        let request_id =
            crate::layers::RequestId::current().unwrap_or_else(crate::layers::RequestId::generate).to_string();
        let principal = ex.principal;
        let record = Record {
            principal_id: principal.as_ref().map(|p| p.id.clone()),
            principal_kind: principal.as_ref().map(|p| p.kind.as_str().to_owned()),
            principal_name: principal.as_ref().map(|p| p.name.clone()),
            token_id: principal.and_then(|p| p.token_id),
            client_name: ex.client.as_ref().map(|c| c.0.clone()),
            client_version: ex.client.map(|c| c.1),
            server: ex.server.map(|s| s.config.name.clone()),
            tool: ex.tool,
            arguments: ex.arguments.map(Arguments::new).unwrap_or_else(Arguments::none),
            upstream_status,
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            bytes_in: ex.bytes_in,
            bytes_out: known.unwrap_or(0),
            ..Record::new(self.clock().unix_millis(), request_id, ex.method, decision)
        };
        if known.is_none() && self.audit().durability() == Durability::Async {
            // A streamed answer (SSE) is recorded when it ends, with the bytes it carried and
            // its whole duration, or when the client goes away. In strict durability the
            // record must be durable before the answer starts, so it is written now instead.
            let (parts, body) = resp.into_parts();
            let pending = Pending { record, writer: self.audit().clone(), started };
            return Response::from_parts(parts, Body::new(Metered { inner: body, bytes: 0, pending: Some(pending) }));
        }
        match self.audit().write(record).await {
            Ok(()) => resp,
            Err(e) => {
                tracing::error!(error = %e, "an audit record could not be stored; the call is refused");
                let body = error_response(None, code::INTERNAL_ERROR, "the audit record could not be stored");
                (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
            }
        }
    }
}

/// A streamed answer's record, written when the stream ends or is dropped.
struct Pending {
    record: Record,
    writer: AuditWriter,
    started: Instant,
}

/// A response body that counts the bytes it yields and writes the exchange's audit record
/// once: at its end, or when it is dropped (the client went away, or shutdown ended it).
struct Metered {
    inner: Body,
    bytes: u64,
    pending: Option<Pending>,
}

impl Metered {
    fn record(&mut self) {
        if let Some(Pending { mut record, writer, started }) = self.pending.take() {
            record.bytes_out = self.bytes;
            record.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            writer.record(record);
        }
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.record(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.record();
    }
}
