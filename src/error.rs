//! The one place errors become HTTP statuses and JSON-RPC codes. No `_` arms: a new variant
//! forces a decision here.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;

use crate::protocol::jsonrpc::{EnvelopeError, code};
use crate::upstream::UpstreamError;

/// Why the gateway refused or could not complete an MCP request.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No server with this name is configured.
    #[error("unknown server '{0}'")]
    UnknownServer(String),
    /// The `Host` header names a host this gateway does not serve (DNS rebinding guard).
    #[error("forbidden: host not allowed")]
    ForbiddenHost,
    /// The `Origin` header names an origin this gateway does not trust.
    #[error("forbidden: origin not allowed")]
    ForbiddenOrigin,
    /// No acceptable credentials.
    #[error("authentication required")]
    Unauthenticated(Rejection),
    /// The store did not answer (authentication cannot be decided).
    #[error("the gateway cannot check credentials right now")]
    StoreUnavailable,
    /// The body is larger than `gateway.max_body_bytes`.
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The body is not `application/json`.
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// The client does not accept what the gateway would send.
    #[error("{0}")]
    NotAcceptable(&'static str),
    /// The body is not JSON-RPC.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// A request other than `initialize` without `Mcp-Session-Id`.
    #[error("Mcp-Session-Id header is required")]
    MissingSession,
    /// A session id the gateway did not issue for this server, or one that ended.
    #[error("session not found")]
    UnknownSession,
    /// `MCP-Protocol-Version` names a revision the gateway does not speak.
    #[error("unsupported protocol version {0:?}")]
    UnsupportedProtocolVersion(String),
    /// A header contradicts the body.
    #[error("{0}")]
    InvalidHeader(&'static str),
    /// A well-formed message the gateway does not accept where it was sent (a batch on a
    /// revision without batches, `initialize` within a session).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A malformed request the gateway understood well enough to refuse.
    #[error("invalid params: {0}")]
    InvalidParams(String),
    /// The upstream failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The body could not be read.
    #[error("could not read the request body")]
    BodyRead,
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// A limit on what one principal or client address may do at once (429).
    #[error("{}", .limit.message())]
    Limited {
        /// Which limit.
        limit: Limit,
        /// Seconds to wait, for `Retry-After`.
        retry_after: u64,
    },
    /// The gateway is at its limit of requests in progress (503).
    #[error("the gateway is busy; retry shortly")]
    Overloaded,
    /// The audit log cannot take a durable record now (strict durability, its overflow queue
    /// full): the call is refused before it is forwarded (503).
    #[error("the audit log cannot take records right now; retry shortly")]
    AuditFull,
    /// A handler panicked; the request was abandoned (500).
    #[error("internal error")]
    Panicked,
    /// The gateway is still starting (opening or migrating the store); answered with
    /// `Retry-After`.
    #[error("the gateway is starting: {0}")]
    Starting(&'static str),
}

/// Why a request has no principal. Every variant answers 401; only `Missing` omits the
/// `error` parameter (RFC 6750 §3.1), and the rest share one description so the answer does
/// not tell an attacker which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Malformed, unknown, expired, revoked, of a disabled principal, or not for this server.
    Invalid,
}

/// The limits that answer 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Requests in progress per principal.
    Requests,
    /// Long-lived streams per principal.
    Streams,
    /// Failed authentications per client address.
    FailedAuthentication,
}

impl Limit {
    /// The label in `portcullis_refusals_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "principal_in_flight",
            Limit::Streams => "principal_streams",
            Limit::FailedAuthentication => "failed_authentication",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Limit::Requests => "too many requests in progress for this caller",
            Limit::Streams => "too many open streams for this caller",
            Limit::FailedAuthentication => "too many failed authentications from this address",
        }
    }
}

/// A [`GatewayError`] with what is needed to answer it: the request id, if any.
#[derive(Debug)]
pub struct Failure {
    /// The error.
    pub error: GatewayError,
    /// The id of the JSON-RPC request that failed, when it is known.
    pub id: Option<Value>,
}

impl<E: Into<GatewayError>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure { error: e.into(), id: None }
    }
}

impl GatewayError {
    /// Attaches the failing request's id.
    pub fn with_id(self, id: Option<Value>) -> Failure {
        Failure { error: self, id }
    }

    /// HTTP status and JSON-RPC code. A failed upstream answers a *request* with HTTP 200 and
    /// a JSON-RPC error, so SDK clients show the message (which names the server).
    pub fn status_and_code(&self, has_id: bool) -> (StatusCode, i64) {
        match self {
            GatewayError::UnknownServer(_) => (StatusCode::NOT_FOUND, code::INVALID_REQUEST),
            GatewayError::ForbiddenHost | GatewayError::ForbiddenOrigin => {
                (StatusCode::FORBIDDEN, code::INVALID_REQUEST)
            }
            GatewayError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, code::INVALID_REQUEST),
            GatewayError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, code::INTERNAL_ERROR),
            GatewayError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, code::INVALID_REQUEST),
            GatewayError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, code::INVALID_REQUEST),
            GatewayError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, code::INVALID_REQUEST),
            GatewayError::Envelope(EnvelopeError::Parse(_)) => (StatusCode::BAD_REQUEST, code::PARSE_ERROR),
            GatewayError::Envelope(EnvelopeError::Invalid(_)) => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST),
            GatewayError::MissingSession => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST),
            GatewayError::UnknownSession => (StatusCode::NOT_FOUND, code::INVALID_REQUEST),
            GatewayError::UnsupportedProtocolVersion(_) => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST),
            GatewayError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST),
            GatewayError::InvalidParams(_) => (StatusCode::OK, code::INVALID_PARAMS),
            GatewayError::InvalidHeader(_) => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST),
            GatewayError::BodyRead => (StatusCode::BAD_REQUEST, code::INVALID_REQUEST),
            GatewayError::ShuttingDown
            | GatewayError::Starting(_)
            | GatewayError::Overloaded
            | GatewayError::AuditFull => (StatusCode::SERVICE_UNAVAILABLE, code::INTERNAL_ERROR),
            GatewayError::Limited { .. } => (StatusCode::TOO_MANY_REQUESTS, code::INVALID_REQUEST),
            GatewayError::Panicked => (StatusCode::INTERNAL_SERVER_ERROR, code::INTERNAL_ERROR),
            GatewayError::Upstream(e) => match e {
                UpstreamError::SessionExpired => (StatusCode::NOT_FOUND, code::INVALID_REQUEST),
                UpstreamError::Timeout { .. } if has_id => (StatusCode::OK, code::UPSTREAM_TIMEOUT),
                UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, code::UPSTREAM_TIMEOUT),
                UpstreamError::Unreachable { .. }
                | UpstreamError::Status { .. }
                | UpstreamError::Process { .. }
                | UpstreamError::Credential { .. }
                | UpstreamError::Authorization { link: None, .. }
                | UpstreamError::TooLarge { .. }
                | UpstreamError::Protocol { .. } => {
                    (if has_id { StatusCode::OK } else { StatusCode::BAD_GATEWAY }, code::UPSTREAM_ERROR)
                }
                UpstreamError::Authorization { link: Some(_), .. } => {
                    (if has_id { StatusCode::OK } else { StatusCode::FORBIDDEN }, code::URL_ELICITATION_REQUIRED)
                }
            },
        }
    }

    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            GatewayError::UnknownServer(_) => "unknown_server",
            GatewayError::ForbiddenHost => "forbidden_host",
            GatewayError::ForbiddenOrigin => "forbidden_origin",
            GatewayError::Unauthenticated(_) => "unauthenticated",
            GatewayError::StoreUnavailable => "store_unavailable",
            GatewayError::PayloadTooLarge(_) => "too_large",
            GatewayError::UnsupportedMediaType => "media_type",
            GatewayError::NotAcceptable(_) => "not_acceptable",
            GatewayError::Envelope(_) => "bad_message",
            GatewayError::MissingSession => "missing_session",
            GatewayError::UnknownSession => "unknown_session",
            GatewayError::UnsupportedProtocolVersion(_) => "bad_protocol_version",
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::InvalidParams(_) => "invalid_params",
            GatewayError::InvalidHeader(_) => "invalid_header",
            GatewayError::BodyRead => "body_read",
            GatewayError::ShuttingDown => "shutting_down",
            GatewayError::Starting(_) => "starting",
            GatewayError::Limited { limit, .. } => limit.label(),
            GatewayError::Overloaded => "overloaded",
            GatewayError::AuditFull => "audit_full",
            GatewayError::Panicked => "panicked",
            GatewayError::Upstream(UpstreamError::SessionExpired) => "session_expired",
            GatewayError::Upstream(UpstreamError::Timeout { .. }) => "upstream_timeout",
            GatewayError::Upstream(_) => "upstream_error",
        }
    }
}

/// `Content-Type` of every error answer (a `const`, so its bytes are checked at compile time).
const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// The challenge of a request without credentials (RFC 6750 §3.1: no `error` parameter).
const CHALLENGE_MISSING: HeaderValue = HeaderValue::from_static("Bearer realm=\"portcullis\"");
/// The challenge of a request with credentials the gateway refuses, whatever the reason.
const CHALLENGE_INVALID: HeaderValue = HeaderValue::from_static(
    "Bearer realm=\"portcullis\", error=\"invalid_token\", error_description=\"The access token is invalid\"",
);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        // Refusals of credentials are the answer an attacker can drive hardest, and they never
        // vary (no id: the body is not read before authentication), so their bodies are
        // rendered once.
        if let (GatewayError::Unauthenticated(why), None) = (&self.error, &self.id) {
            static BODIES: [std::sync::LazyLock<bytes::Bytes>; 2] = [
                std::sync::LazyLock::new(|| refusal_body(Rejection::Missing)),
                std::sync::LazyLock::new(|| refusal_body(Rejection::Invalid)),
            ];
            let body = match why {
                Rejection::Missing => &BODIES[0],
                Rejection::Invalid => &BODIES[1],
            };
            let headers = [(header::CONTENT_TYPE, JSON), (header::WWW_AUTHENTICATE, challenge(*why))];
            return (StatusCode::UNAUTHORIZED, headers, bytes::Bytes::clone(body)).into_response();
        }
        self.render()
    }
}

/// The `WWW-Authenticate` challenge of a credential refusal.
fn challenge(why: Rejection) -> HeaderValue {
    match why {
        Rejection::Missing => CHALLENGE_MISSING,
        Rejection::Invalid => CHALLENGE_INVALID,
    }
}

/// The body of a credential refusal, as [`Failure::render`] writes it.
fn refusal_body(why: Rejection) -> bytes::Bytes {
    let failure = Failure { error: GatewayError::Unauthenticated(why), id: None };
    let (_, rpc_code) = failure.error.status_and_code(false);
    bytes::Bytes::from(failure.body(rpc_code))
}

impl Failure {
    /// The answer, rendered from the error and the request id.
    fn render(self) -> Response {
        let (status, rpc_code) = self.error.status_and_code(self.id.is_some());
        let body = self.body(rpc_code);
        let mut resp = (status, [(header::CONTENT_TYPE, JSON)], body).into_response();
        if let GatewayError::Unauthenticated(why) = self.error {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, challenge(why));
        }
        if let GatewayError::Starting(_) | GatewayError::Overloaded | GatewayError::AuditFull = self.error {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let GatewayError::Limited { retry_after, .. } = self.error {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        resp
    }

    /// The JSON-RPC error envelope.
    fn body(&self, rpc_code: i64) -> Vec<u8> {
        // Serialised straight from borrowed parts: refusals are the path an attacker can drive
        // hardest, so they skip building a `serde_json::Value`.
        #[derive(serde::Serialize)]
        struct Envelope<'a> {
            jsonrpc: &'static str,
            id: &'a Value,
            error: Error<'a>,
        }
        #[derive(serde::Serialize)]
        struct Error<'a> {
            code: i64,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<Value>,
        }
        let mut message = self.error.to_string();
        let mut data = None;
        if let GatewayError::Upstream(UpstreamError::Authorization { reason, link: Some(link), .. }) = &self.error {
            // URL-mode elicitation required (MCP 2025-11-25): clients that support it open the
            // link; the message carries it for the others.
            use secrecy::ExposeSecret;
            let url = link.expose_secret();
            message = format!("{reason}: {url}");
            data = Some(serde_json::json!({"elicitations": [{
                "mode": "url",
                "elicitationId": uuid::Uuid::new_v4().to_string(),
                "url": url,
                "message": reason,
            }]}));
        }
        let envelope = Envelope {
            jsonrpc: "2.0",
            id: self.id.as_ref().unwrap_or(&Value::Null),
            error: Error { code: rpc_code, message: &message, data },
        };
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}
