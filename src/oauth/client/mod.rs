//! The gateway as an OAuth client: what an upstream's `WWW-Authenticate` challenge asks for
//! (`challenge`), where its authorization server is and what it supports (`discovery`, RFC
//! 9728 and RFC 8414 with the OpenID fallback), and the calls to its endpoints (`endpoint`:
//! dynamic registration, code exchange, refresh, client credentials, PAR, revocation). Every
//! fetch goes through the guarded outbound client (`net::Egress`). Errors never carry a
//! token, code, verifier or client secret.

pub mod challenge;
pub mod discovery;
pub mod endpoint;

use crate::net::EgressError;
use crate::protocol::fault::Fault;

/// Why a step of the OAuth protocol failed.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// Discovery failed or found something unacceptable.
    #[error("discovery failed: {detail}")]
    Discovery {
        /// What.
        detail: String,
    },
    /// A guarded fetch was refused or failed.
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// The gateway could not register with the authorization server.
    #[error("client registration failed: {detail}")]
    Registration {
        /// What.
        detail: String,
    },
    /// An authorization response that cannot be accepted (wrong issuer, bad redirect, …).
    #[error("the authorization response was refused: {detail}")]
    Flow {
        /// What.
        detail: String,
    },
    /// The authorization server (or the person) declined.
    #[error("the authorization server answered {error}{}", .description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Denied {
        /// The `error` code.
        error: String,
        /// The `error_description`, shortened.
        description: Option<String>,
    },
    /// The token endpoint refused or answered badly.
    #[error("the token endpoint refused: {detail}")]
    Token {
        /// The OAuth `error` code, if any (`invalid_grant`, …).
        error: Option<String>,
        /// What.
        detail: String,
    },
    /// The authorization server refused a pushed authorization request (RFC 9126), or
    /// answered it badly.
    #[error("the pushed authorization request was refused: {detail}")]
    Pushed {
        /// The OAuth `error` code of a 400 or 401 answer (`invalid_client`, …).
        error: Option<String>,
        /// What.
        detail: String,
    },
    /// A setting the protocol cannot use.
    #[error("{detail}")]
    Config {
        /// What.
        detail: String,
    },
}

impl OAuthError {
    /// Which failure this is on the wire (`protocol::fault`): the person's or the
    /// authorization server's refusal is the request's; anything else is the upstream's.
    pub fn fault(&self) -> Fault {
        match self {
            OAuthError::Denied { .. } => Fault::InvalidRequest,
            OAuthError::Discovery { .. }
            | OAuthError::Egress(_)
            | OAuthError::Registration { .. }
            | OAuthError::Flow { .. }
            | OAuthError::Token { .. }
            | OAuthError::Pushed { .. }
            | OAuthError::Config { .. } => Fault::Upstream,
        }
    }
}
