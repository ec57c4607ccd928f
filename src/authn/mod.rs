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

/// Authenticates one HTTP request for `server`, then applies the per-principal limits
/// (`layers::admitted`). A refused credential counts against the client address's
/// failed-authentication limit, which once exhausted answers 429 without a store lookup.
pub async fn authenticate(app: &AppState, server: &Server, headers: &HeaderMap) -> Result<Principal, GatewayError> {
    let principal = if server.config.public {
        Principal::anonymous()
    } else {
        let found = match bearer_hash(headers) {
            Ok(hash) => check(app, server, &hash).await,
            Err(e) => Err(e),
        };
        match found {
            Err(e @ GatewayError::Unauthenticated(Rejection::Invalid)) => {
                return Err(crate::layers::authentication_failed(e));
            }
            other => other?,
        }
    };
    crate::layers::admitted(&principal)?;
    Ok(principal)
}

/// The answer to a request for a server name that is not configured: to a caller without a
/// valid grant token, the same 401 challenge a configured server's refusal carries (so names
/// cannot be probed); to an authenticated caller, `unknown` (404).
pub async fn unknown_server(app: &AppState, headers: &HeaderMap, unknown: GatewayError) -> GatewayError {
    let hash = match bearer_hash(headers) {
        Ok(hash) => hash,
        Err(e @ GatewayError::Unauthenticated(Rejection::Invalid)) => return crate::layers::authentication_failed(e),
        Err(e) => return e,
    };
    let now = app.clock().unix_secs();
    match lookup(app, &hash).await {
        Ok(Some(auth)) if auth.usable_at(now) => {
            crate::layers::authentication_succeeded();
            unknown
        }
        Ok(_) => crate::layers::authentication_failed(GatewayError::Unauthenticated(Rejection::Invalid)),
        Err(e) => e,
    }
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
    let auth = lookup(app, hash).await?.filter(|t| t.usable_for(&server.config.name, now));
    let Some(auth) = auth else { return Err(GatewayError::Unauthenticated(Rejection::Invalid)) };
    app.touch_token(&auth.token_id, auth.last_used_at, now);
    Ok(principal_of(auth))
}

/// The token whose hash is `hash`: remembered, or looked up in the store unless the client's
/// address is limited for failing authentication (`portcullis_token_lookups_total` counts
/// the lookups).
async fn lookup(app: &AppState, hash: &[u8; 32]) -> Result<Option<TokenAuth>, GatewayError> {
    if let Some(remembered) = app.tokens().get(hash) {
        return Ok(remembered);
    }
    crate::layers::before_lookup()?;
    let epoch = app.tokens().epoch();
    metrics::counter!("portcullis_token_lookups_total").increment(1);
    // Boxed: a store query makes a large future, which every request's would otherwise carry.
    let found = Box::pin(app.store().token_lookup(hash)).await.map_err(|e| {
        tracing::error!(error = %e, "token lookup failed");
        GatewayError::StoreUnavailable
    })?;
    app.tokens().put(*hash, found.clone(), epoch);
    Ok(found)
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
