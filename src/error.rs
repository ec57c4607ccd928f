//! The gateway's refusals ([`GatewayError`]) and how any failure is answered: as a JSON-RPC
//! error body ([`Failure`]'s response) or as an OAuth 2.0 error body ([`Failure::oauth_response`]).
//! Which status and codes a failure gets is the one table in [`crate::protocol::fault`]; this
//! module asks each wrapped error for its [`Fault`] and never looks inside it. [`GatewayError::fault`]
//! and [`GatewayError::label`] have no `_` arms: a new variant forces a decision here.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;

use crate::protocol::fault::Fault;
use crate::protocol::jsonrpc::EnvelopeError;
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
    #[error("the audit log cannot take records right now (its queue is at audit.max_overflow_bytes); retry shortly")]
    AuditFull,
    /// Strict durability, and the last checkpoint of the audit chain's head could not be
    /// written: the call is refused before it is forwarded until one is (503).
    #[error(
        "the audit log's checkpoints cannot be written (audit.checkpoint_file), so strict calls are refused; retry shortly"
    )]
    AuditUnprotected,
    /// Strict durability: the record of a finished call could not be stored, so its answer is
    /// withheld (500).
    #[error("the audit record could not be stored")]
    AuditFailed,
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
    /// Requests in progress on one legacy SSE session.
    SessionRequests,
}

impl Limit {
    /// The label in `portcullis_refusals_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "principal_in_flight",
            Limit::Streams => "principal_streams",
            Limit::FailedAuthentication => "failed_authentication",
            Limit::SessionRequests => "legacy_session_in_flight",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Limit::Requests => "too many requests in progress for this caller",
            Limit::Streams => "too many open streams for this caller",
            Limit::FailedAuthentication => "too many failed authentications from this address",
            Limit::SessionRequests => "too many requests in progress on this session",
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

    /// Which failure this is on the wire (its row in [`Fault::row`]): the gateway's own
    /// refusals here, the modules' errors by their own account.
    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::UnknownServer(_) | GatewayError::UnknownSession => Fault::NotFound,
            GatewayError::ForbiddenHost | GatewayError::ForbiddenOrigin => Fault::Forbidden,
            GatewayError::Unauthenticated(_) => Fault::Unauthenticated,
            GatewayError::PayloadTooLarge(_) => Fault::TooLarge,
            GatewayError::UnsupportedMediaType => Fault::UnsupportedMediaType,
            GatewayError::NotAcceptable(_) => Fault::NotAcceptable,
            GatewayError::Envelope(e) => e.fault(),
            GatewayError::MissingSession
            | GatewayError::UnsupportedProtocolVersion(_)
            | GatewayError::InvalidRequest(_)
            | GatewayError::InvalidHeader(_)
            | GatewayError::BodyRead => Fault::InvalidRequest,
            GatewayError::InvalidParams(_) => Fault::InvalidParams,
            GatewayError::StoreUnavailable
            | GatewayError::ShuttingDown
            | GatewayError::Starting(_)
            | GatewayError::Overloaded
            | GatewayError::AuditFull
            | GatewayError::AuditUnprotected => Fault::Unavailable,
            GatewayError::Limited { .. } => Fault::Limited,
            GatewayError::Panicked | GatewayError::AuditFailed => Fault::Internal,
            GatewayError::Upstream(e) => e.fault(),
        }
    }

    /// HTTP status and JSON-RPC code, for a message with an id (`has_id`) or without.
    pub fn status_and_code(&self, has_id: bool) -> (StatusCode, i64) {
        let fault = self.fault();
        (fault.status(has_id), fault.row().rpc_code)
    }

    /// The caller's connect link and what to tell them, when they must connect an account.
    pub fn connect_link(&self) -> Option<(&str, &secrecy::SecretString)> {
        match self {
            GatewayError::Upstream(e) => e.connect_link(),
            _ => None,
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
            GatewayError::AuditUnprotected => "audit_unprotected",
            GatewayError::Panicked => "panicked",
            GatewayError::AuditFailed => "audit_failed",
            GatewayError::Upstream(e) => e.label(),
        }
    }
}

impl GatewayError {
    /// The headers this refusal adds to its answer, whatever the body: the challenge of a
    /// credential refusal, and `Retry-After` where the wait is known.
    fn annotate(&self, headers: &mut http::HeaderMap) {
        match self {
            GatewayError::Unauthenticated(why) => {
                headers.insert(header::WWW_AUTHENTICATE, challenge(*why));
            }
            GatewayError::Starting(_)
            | GatewayError::Overloaded
            | GatewayError::AuditFull
            | GatewayError::AuditUnprotected => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::Limited { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
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
            return (Fault::Unauthenticated.row().status, headers, bytes::Bytes::clone(body)).into_response();
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
    /// The answer as an OAuth 2.0 error (RFC 6749 §5.2): the status of the failure's row, a
    /// JSON body with `error` and `error_description`, `Cache-Control: no-store`, and the
    /// failure's `WWW-Authenticate` challenge or `Retry-After`, as in the JSON-RPC answer.
    pub fn oauth_response(self) -> Response {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'static str,
            error_description: &'a str,
        }
        let fault = self.error.fault();
        let description = self.error.to_string();
        let body =
            serde_json::to_vec(&Body { error: fault.row().oauth, error_description: &description }).unwrap_or_default();
        let headers = [(header::CONTENT_TYPE, JSON), (header::CACHE_CONTROL, HeaderValue::from_static("no-store"))];
        let mut resp = (fault.status(false), headers, body).into_response();
        self.error.annotate(resp.headers_mut());
        resp
    }

    /// The answer, rendered from the error and the request id.
    fn render(self) -> Response {
        let (status, rpc_code) = self.error.status_and_code(self.id.is_some());
        let body = self.body(rpc_code);
        let mut resp = (status, [(header::CONTENT_TYPE, JSON)], body).into_response();
        self.error.annotate(resp.headers_mut());
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
        if let Some((reason, link)) = self.error.connect_link() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream_down() -> GatewayError {
        GatewayError::Upstream(UpstreamError::Unreachable { server: "docs".into(), cause: "refused".into() })
    }

    #[test]
    fn a_failed_upstream_is_told_in_band_to_a_request_and_out_of_band_otherwise() {
        assert_eq!(upstream_down().status_and_code(true), (StatusCode::OK, -32001));
        assert_eq!(upstream_down().status_and_code(false), (StatusCode::BAD_GATEWAY, -32001));
        let refused = GatewayError::Unauthenticated(Rejection::Invalid);
        assert_eq!(refused.status_and_code(true), (StatusCode::UNAUTHORIZED, -32600));
        assert_eq!(GatewayError::AuditFull.status_and_code(true), (StatusCode::SERVICE_UNAVAILABLE, -32603));
    }

    async fn body(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16).await.expect("a body");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[tokio::test]
    async fn the_same_failure_renders_as_json_rpc_and_as_oauth() {
        let refused = || Failure::from(GatewayError::Unauthenticated(Rejection::Invalid));
        let rpc = refused().into_response();
        let oauth = refused().oauth_response();
        assert_eq!(rpc.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(oauth.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(rpc.headers()[header::WWW_AUTHENTICATE], oauth.headers()[header::WWW_AUTHENTICATE]);
        assert_eq!(oauth.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(body(rpc).await["error"]["code"], -32600);
        let oauth = body(oauth).await;
        assert_eq!(oauth["error"], "invalid_token");
        assert_eq!(oauth["error_description"], "authentication required");

        let limited = Failure::from(GatewayError::Limited { limit: Limit::FailedAuthentication, retry_after: 7 });
        let resp = limited.oauth_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        assert_eq!(body(resp).await["error"], "temporarily_unavailable");
    }

    #[tokio::test]
    async fn an_oauth_body_carries_no_connect_link() {
        // The link is the caller's own secret: only the JSON-RPC answer to that caller has it.
        let error = GatewayError::Upstream(UpstreamError::Authorization {
            server: "docs".into(),
            reason: "connect your account".into(),
            link: Some(secrecy::SecretString::from("https://gw.example/connect/docs?t=SECRET")),
        });
        let text = body(Failure::from(error).oauth_response()).await.to_string();
        assert!(!text.contains("SECRET"), "{text}");
    }
}
