//! How a failure is told on the wire: the one table. Each module's errors say which
//! [`Fault`] they are (`EnvelopeError::fault`, `UpstreamError::fault`, `GatewayError::fault`);
//! the row gives the HTTP status, the JSON-RPC error code, the OAuth 2.0 error code (RFC 6749
//! §5.2, RFC 6750 §3.1: for the protected resource's challenges and the coming authorization
//! server's token and registration endpoints) and whether the failure of a JSON-RPC request is
//! told in band (HTTP 200 with a JSON-RPC error, so SDK clients show its message, which names
//! the server).

use http::StatusCode;

use super::jsonrpc::code;

/// The kinds of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Not JSON (or not UTF-8).
    Parse,
    /// Not a request the gateway accepts: a malformed envelope or header, a missing session,
    /// a batch where batches are not allowed.
    InvalidRequest,
    /// A request whose parameters are wrong.
    InvalidParams,
    /// No acceptable credentials.
    Unauthenticated,
    /// Credentials that do not allow this (a host or origin the gateway does not serve).
    Forbidden,
    /// An unknown server or session.
    NotFound,
    /// A body over the size limit.
    TooLarge,
    /// A body that is not JSON.
    UnsupportedMediaType,
    /// A client that does not accept what the gateway would send.
    NotAcceptable,
    /// A per-caller limit (with `Retry-After`).
    Limited,
    /// The gateway cannot serve now: starting, shutting down, overloaded, store or audit
    /// log unavailable (with `Retry-After` where the wait is known).
    Unavailable,
    /// A bug: a handler panicked.
    Internal,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream failed.
    Upstream,
    /// The caller must open a URL first (MCP 2025-11-25 URL-mode elicitation): the link that
    /// connects their account to an OAuth upstream.
    AuthorizationRequired,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The HTTP status (of a failure not told in band).
    pub status: StatusCode,
    /// The JSON-RPC error code.
    pub rpc_code: i64,
    /// The OAuth 2.0 `error` code.
    pub oauth: &'static str,
    /// The failure of a JSON-RPC request (one with an id) is answered with HTTP 200.
    pub in_band: bool,
}

const fn row(status: StatusCode, rpc_code: i64, oauth: &'static str, in_band: bool) -> Row {
    Row { status, rpc_code, oauth, in_band }
}

impl Fault {
    /// Its row.
    pub const fn row(self) -> Row {
        use StatusCode as S;
        match self {
            Fault::Parse => row(S::BAD_REQUEST, code::PARSE_ERROR, "invalid_request", false),
            Fault::InvalidRequest => row(S::BAD_REQUEST, code::INVALID_REQUEST, "invalid_request", false),
            Fault::InvalidParams => row(S::BAD_REQUEST, code::INVALID_PARAMS, "invalid_request", true),
            Fault::Unauthenticated => row(S::UNAUTHORIZED, code::INVALID_REQUEST, "invalid_token", false),
            Fault::Forbidden => row(S::FORBIDDEN, code::INVALID_REQUEST, "access_denied", false),
            Fault::NotFound => row(S::NOT_FOUND, code::INVALID_REQUEST, "invalid_request", false),
            Fault::TooLarge => row(S::PAYLOAD_TOO_LARGE, code::INVALID_REQUEST, "invalid_request", false),
            Fault::UnsupportedMediaType => {
                row(S::UNSUPPORTED_MEDIA_TYPE, code::INVALID_REQUEST, "invalid_request", false)
            }
            Fault::NotAcceptable => row(S::NOT_ACCEPTABLE, code::INVALID_REQUEST, "invalid_request", false),
            Fault::Limited => row(S::TOO_MANY_REQUESTS, code::INVALID_REQUEST, "temporarily_unavailable", false),
            Fault::Unavailable => row(S::SERVICE_UNAVAILABLE, code::INTERNAL_ERROR, "temporarily_unavailable", false),
            Fault::Internal => row(S::INTERNAL_SERVER_ERROR, code::INTERNAL_ERROR, "server_error", false),
            Fault::UpstreamTimeout => row(S::GATEWAY_TIMEOUT, code::UPSTREAM_TIMEOUT, "temporarily_unavailable", true),
            Fault::Upstream => row(S::BAD_GATEWAY, code::UPSTREAM_ERROR, "server_error", true),
            Fault::AuthorizationRequired => row(S::FORBIDDEN, code::URL_ELICITATION_REQUIRED, "access_denied", true),
        }
    }

    /// The HTTP status of this failure, for a message with an id (`has_id`) or without.
    pub const fn status(self, has_id: bool) -> StatusCode {
        let row = self.row();
        if has_id && row.in_band { StatusCode::OK } else { row.status }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Fault; 15] = [
        Fault::Parse,
        Fault::InvalidRequest,
        Fault::InvalidParams,
        Fault::Unauthenticated,
        Fault::Forbidden,
        Fault::NotFound,
        Fault::TooLarge,
        Fault::UnsupportedMediaType,
        Fault::NotAcceptable,
        Fault::Limited,
        Fault::Unavailable,
        Fault::Internal,
        Fault::UpstreamTimeout,
        Fault::Upstream,
        Fault::AuthorizationRequired,
    ];

    #[test]
    fn every_row_is_an_error_on_every_wire() {
        // RFC 6749 §5.2 and RFC 6750 §3.1 codes only; an error status whenever told out of band.
        const OAUTH: [&str; 6] = [
            "invalid_request",
            "invalid_token",
            "access_denied",
            "temporarily_unavailable",
            "server_error",
            "insufficient_scope",
        ];
        for fault in ALL {
            let row = fault.row();
            assert!(row.status.is_client_error() || row.status.is_server_error(), "{fault:?}");
            assert!(OAUTH.contains(&row.oauth), "{fault:?}");
            assert!(row.rpc_code < 0, "{fault:?}");
            assert_eq!(fault.status(false), row.status);
            assert_eq!(fault.status(true), if row.in_band { StatusCode::OK } else { row.status });
        }
    }

    #[test]
    fn refusals_before_reading_a_message_are_never_told_in_band() {
        // The body was not read (or not understood), so there is no request to answer in band.
        for fault in [Fault::Parse, Fault::Unauthenticated, Fault::TooLarge, Fault::Limited, Fault::Unavailable] {
            assert!(!fault.row().in_band, "{fault:?}");
        }
    }
}
