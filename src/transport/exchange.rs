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

use crate::audit::{Arguments, AuditWriter, Decision, Durability, Record};
use crate::authn::Principal;
use crate::error::{Failure, GatewayError};
use crate::layers::RequestId;
use crate::mcp::Server;
use crate::mcp::dispatch::Trace;
use crate::protocol::fault::Fault;
use crate::protocol::jsonrpc::Message;
use crate::state::AppState;

/// `X-Request-Id`: the gateway's id for a request, in its answer, its logs and its audit
/// record.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What an exchange did so far. Dropped before [`AppState::finish`] (the client hung up, the
/// handler was cancelled), it still leaves its metric sample and audit record: a call is
/// never unrecorded because its client went away.
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
    /// What the dispatch read and did: the tool of a `tools/call` and its arguments (redacted
    /// before they are stored), and whether the message was forwarded.
    pub trace: Trace,
    /// Request body bytes.
    pub bytes_in: u64,
    /// How it failed, if it did: the decision and the JSON-RPC code.
    pub failure: Option<(Decision, i64)>,
    /// The gateway's id for the HTTP request (shared by the members of a batch).
    pub request_id: RequestId,
    /// Whether the id came from the layers, which send it back in `X-Request-Id` themselves.
    layered: bool,
    /// When the exchange began.
    started: Instant,
    /// When it began, for the record.
    time_ms: i64,
    /// Until the exchange is finished: the gateway, to record it if it is dropped instead.
    open: Option<AppState>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("method", &self.method)
            .field("server", &self.server.as_ref().map(|s| &s.config.name))
            .field("tool", &self.trace.tool.as_ref().map(|t| &t.name))
            .field("request_id", &self.request_id.as_str())
            .finish_non_exhaustive()
    }
}

/// The status recorded for a call whose client went away before its answer was complete
/// (the convention of several proxies for "client closed request").
pub const CLIENT_GONE: u16 = 499;

impl Exchange {
    /// An exchange beginning now, whose method is not known yet (`metric` is used until it is).
    pub fn new(app: &AppState, metric: &'static str) -> Exchange {
        // The id the layers gave the HTTP request (see `layers::RequestId`).
        let layered = RequestId::current();
        Exchange {
            metric,
            method: metric.to_owned(),
            server: None,
            principal: None,
            client: None,
            trace: Trace::default(),
            bytes_in: 0,
            failure: None,
            layered: layered.is_some(),
            request_id: layered.unwrap_or_else(RequestId::generate),
            started: Instant::now(),
            time_ms: app.clock().unix_millis(),
            open: Some(app.clone()),
        }
    }

    /// The exchange of one message of a batch carried by this one: same caller, server,
    /// client and request id; its own method, timing and record.
    pub fn member(&self, app: &AppState, message: &Message) -> Exchange {
        let mut member = Exchange::new(app, "batch");
        member.request_id.clone_from(&self.request_id);
        member.server.clone_from(&self.server);
        member.principal.clone_from(&self.principal);
        member.client.clone_from(&self.client);
        member.bytes_in = message.raw.len() as u64;
        member.note_message(message, "batch");
        member
    }

    /// Closes an exchange that leaves no record of its own (its messages each have theirs).
    pub fn settle(mut self) {
        self.open = None;
    }

    /// Notes the message being handled (the tool of a `tools/call` is noted by the dispatch,
    /// from its one reading of the message).
    pub fn note_message(&mut self, message: &Message, metric: &'static str) {
        self.metric = metric;
        self.method = message.method.clone().unwrap_or_else(|| "response".to_owned());
    }

    /// Notes a failure: refusals of identity and origin are denials, the rest errors.
    pub fn note_failure(&mut self, failure: &Failure) {
        let (_, rpc) = failure.error.status_and_code(failure.id.is_some());
        let decision = match failure.error.fault() {
            Fault::Unauthenticated | Fault::Forbidden => Decision::Deny,
            _ => Decision::Error,
        };
        self.failure = Some((decision, rpc));
    }

    /// The record of this exchange, answered with `status` (an HTTP status, or
    /// [`CLIENT_GONE`]) and `bytes_out`.
    fn record(&mut self, status: u16, bytes_out: u64) -> Record {
        let (decision, upstream_status) = match self.failure {
            Some((d, rpc)) => (d, Some(rpc)),
            // Refused by policy, answered as an unknown item is.
            None if self.trace.policy.as_ref().is_some_and(|v| !v.allowed) => {
                (Decision::Deny, self.trace.policy.as_ref().and_then(|v| v.code))
            }
            // Gone before anything was forwarded: nothing reached the upstream.
            None if status == CLIENT_GONE && !self.trace.forwarded => (Decision::Error, None),
            None if status == CLIENT_GONE => (Decision::Error, Some(i64::from(CLIENT_GONE))),
            None => (Decision::Allow, Some(i64::from(status))),
        };
        // Refused by a per-principal limit after authentication: the record still says who.
        let principal = self.principal.take().or_else(crate::layers::admitted_principal);
        let client = self.client.take();
        let (tool, arguments) = match self.trace.tool.take() {
            Some(call) => (Some(call.name.chars().take(256).collect()), call.arguments),
            None => (None, None),
        };
        Record {
            principal_id: principal.as_ref().map(|p| p.id.clone()),
            principal_kind: principal.as_ref().map(|p| p.kind.as_str().to_owned()),
            principal_name: principal.as_ref().map(|p| p.name.clone()),
            token_id: principal.and_then(|p| p.token_id),
            client_name: client.as_ref().map(|c| c.0.clone()),
            client_version: client.map(|c| c.1),
            server: self.server.as_ref().map(|s| s.config.name.clone()),
            tool,
            arguments: arguments.map(Arguments::new).unwrap_or_else(Arguments::none),
            upstream_status,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            bytes_in: self.bytes_in,
            bytes_out,
            policy: self.trace.policy.take().map(|v| v.policies.join(",")).filter(|p| !p.is_empty()),
            ..Record::new(self.time_ms, self.request_id.as_str().to_owned(), std::mem::take(&mut self.method), decision)
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let Some(app) = self.open.take() else { return };
        // Dropped while its handler unwinds from a panic (answered 500 by the layers), or
        // because the client went away.
        let panicked = std::thread::panicking();
        let status = match panicked {
            true => Fault::Internal.row().status,
            false => StatusCode::from_u16(CLIENT_GONE).unwrap_or(StatusCode::BAD_REQUEST),
        };
        app.observe(self.server.as_deref(), self.metric, status, self.started);
        if !app.config().audit.enabled {
            return;
        }
        if panicked {
            self.failure = Some((Decision::Error, Fault::Internal.row().rpc_code));
        } else {
            tracing::info!(request_id = %self.request_id, method = %self.method, "the client went away before its answer");
        }
        let record = self.record(CLIENT_GONE, 0);
        if unrecorded(&record) {
            return;
        }
        app.audit().record(record);
    }
}

/// Whether `record` is left out of the audit log (only counted): a refusal without a principal
/// past its client address's record budget (see `layers::may_record_unauthenticated`).
fn unrecorded(record: &Record) -> bool {
    record.principal_id.is_none() && record.decision != Decision::Allow && !crate::layers::may_record_unauthenticated()
}

impl AppState {
    /// Ends an exchange: one metric sample and one audit record. In strict durability the
    /// answer waits for the record to be durable, and becomes an error if it cannot be.
    pub async fn finish(&self, mut ex: Exchange, mut resp: Response) -> Response {
        ex.open = None;
        if !ex.layered {
            resp.headers_mut().insert(REQUEST_ID_HEADER, ex.request_id.header_value());
        }
        let started = ex.started;
        self.observe(ex.server.as_deref(), ex.metric, resp.status(), started);
        if !self.config().audit.enabled {
            return resp;
        }
        // A body of known length is counted now; a stream is counted as it goes (below).
        let known = http_body::Body::size_hint(resp.body()).exact().or_else(|| {
            resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
        });
        let record = ex.record(resp.status().as_u16(), known.unwrap_or(0));
        if unrecorded(&record) {
            return resp;
        }
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
            // The store is behind: the call is refused until the queue drains.
            Err(crate::audit::AuditError::Full) => Failure::from(GatewayError::AuditFull).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "an audit record could not be stored; the call is refused");
                Failure::from(GatewayError::AuditFailed).into_response()
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
    /// Writes the record; `ended` tells whether the whole answer went out. An answer to a
    /// message cut short (the client left mid-stream) is recorded as such; a `GET` stream
    /// ends that way normally.
    fn record(&mut self, ended: bool) {
        if let Some(Pending { mut record, writer, started }) = self.pending.take() {
            if !ended && record.method != "GET" && record.decision == Decision::Allow {
                record.decision = Decision::Error;
                record.upstream_status = Some(i64::from(CLIENT_GONE));
            }
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
            Poll::Ready(None) => self.record(true),
            Poll::Ready(Some(Err(_))) => self.record(false),
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
        self.record(false);
    }
}
