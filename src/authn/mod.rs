//! Authentication: the `Authorization: Bearer …` header becomes a [`Principal`] on every HTTP
//! request (never trusted from the session), or the request gets 401 with a
//! `WWW-Authenticate: Bearer` challenge (RFC 6750) that says no more than "invalid".

pub mod cache;
pub mod token;

use std::sync::Arc;

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::app::{AppState, Server};
use crate::error::GatewayError;
use crate::store::identity::TokenAuth;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable id (empty for anonymous callers of public servers).
    pub id: String,
    /// Name (`alice`, `ci-bot`).
    pub name: String,
    /// Person, service account, or nobody (public servers).
    pub kind: PrincipalKind,
    /// Group names.
    pub groups: Vec<String>,
    /// The grant token used.
    pub token_id: Option<String>,
}

/// The kinds of principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A person.
    User,
    /// A headless agent or scheduled job.
    Service,
    /// No credentials, on a `public = true` server.
    Anonymous,
}

impl PrincipalKind {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::Service => "service",
            PrincipalKind::Anonymous => "anonymous",
        }
    }
}

impl Principal {
    /// The caller of a public server.
    pub fn anonymous() -> Principal {
        Principal {
            id: String::new(),
            name: "anonymous".to_owned(),
            kind: PrincipalKind::Anonymous,
            groups: Vec::new(),
            token_id: None,
        }
    }
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

/// Authenticates one HTTP request for `server`.
pub async fn authenticate(app: &AppState, server: &Server, headers: &HeaderMap) -> Result<Principal, GatewayError> {
    if server.config.public {
        return Ok(Principal::anonymous());
    }
    check(app, server, &bearer_hash(headers)?).await
}

/// The hash of the request's grant token, if it carries a well-formed one.
fn bearer_hash(headers: &HeaderMap) -> Result<[u8; 32], GatewayError> {
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(bearer) = header.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer "))) else {
        return Err(GatewayError::Unauthenticated(Rejection::Missing));
    };
    let bearer = bearer.trim();
    // Shape and checksum first: random strings never reach the store.
    if !token::well_formed(bearer) {
        return Err(GatewayError::Unauthenticated(Rejection::Invalid));
    }
    Ok(token::hash(bearer))
}

/// The principal of the grant token whose hash is `hash`, if it may call `server` now.
async fn check(app: &AppState, server: &Server, hash: &[u8; 32]) -> Result<Principal, GatewayError> {
    let now = app.clock().unix_secs();
    let found = match app.tokens().get(hash) {
        Some(remembered) => remembered,
        None => {
            let epoch = app.tokens().epoch();
            let found = app.store().token_lookup(hash).await.map_err(|e| {
                tracing::error!(error = %e, "token lookup failed");
                GatewayError::StoreUnavailable
            })?;
            app.tokens().put(*hash, found.clone(), epoch);
            found
        }
    };
    let auth = found.filter(|t| t.usable_for(&server.config.name, now));
    let Some(auth) = auth else { return Err(GatewayError::Unauthenticated(Rejection::Invalid)) };
    app.touch_token(&auth.token_id, auth.last_used_at, now);
    Ok(principal_of(auth))
}

/// Completes once the grant token of a request that authenticated with `headers` stops
/// working for `server`: revoked, expired, or its principal disabled. Long-lived streams (a
/// session's GET stream, a legacy SSE connection) end on it, so `portcullis user disable`
/// ends them within the revocation poll ([`cache::POLL`]), on every replica. The check runs
/// on each change of the revocation epoch and at least every [`cache::TTL`] (for expiry).
/// While the store cannot answer the stream goes on, but not for long: once the token has gone
/// unconfirmed for [`cache::TTL`] (a revocation may be what the store cannot tell), the stream
/// ends, as a new request would be refused; the client opens it again when the store is back.
pub fn revoked(app: &AppState, server: &Arc<Server>, headers: &HeaderMap) -> impl Future<Output = ()> + Send + 'static {
    let app = app.clone();
    let server = server.clone();
    let hash = bearer_hash(headers).ok();
    let mut changes = app.tokens().changes();
    async move {
        let Some(hash) = hash else { return std::future::pending().await };
        if server.config.public {
            return std::future::pending().await;
        }
        let mut unconfirmed_since: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return std::future::pending().await },
                () = tokio::time::sleep(cache::TTL) => {}
            }
            match check(&app, &server, &hash).await {
                Err(GatewayError::Unauthenticated(_)) => return,
                Err(GatewayError::StoreUnavailable) => {
                    let since = *unconfirmed_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= cache::TTL {
                        tracing::warn!(
                            "ending a stream whose token the store could not confirm for {}s",
                            cache::TTL.as_secs()
                        );
                        return;
                    }
                }
                _ => unconfirmed_since = None,
            }
        }
    }
}

fn principal_of(auth: TokenAuth) -> Principal {
    Principal {
        id: auth.principal_id,
        name: auth.principal_name,
        kind: if auth.service { PrincipalKind::Service } else { PrincipalKind::User },
        groups: auth.groups,
        token_id: Some(auth.token_id),
    }
}
