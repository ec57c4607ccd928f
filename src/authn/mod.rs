//! Authentication: the `Authorization: Bearer …` header becomes a [`Principal`] on every HTTP
//! request (never trusted from the session), or the request gets 401 with a
//! `WWW-Authenticate: Bearer` challenge (RFC 6750) that says no more than "invalid".

pub mod cache;
pub mod token;

use std::sync::Arc;

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::clock::Clock;
use crate::config::ServerConfig;
use crate::error::GatewayError;
use crate::store::Store;
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
    /// The servers the token is limited to; `None`: every server.
    pub servers: Option<std::sync::Arc<[String]>>,
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
            servers: None,
        }
    }
}

pub use crate::error::Rejection;

/// What the gateway's limits say around authentication (`layers` implements it for a request
/// in its scope; [`Unlimited`] outside one). Authentication asks, it does not know the limits.
pub trait Gate {
    /// Before a token is looked up in the store: may refuse (too many failures from here).
    fn before_lookup(&self) -> Result<(), GatewayError>;
    /// A credential proved valid.
    fn succeeded(&self);
    /// A credential was refused: returns the error to answer (`refusal`, or a limit's).
    fn failed(&self, refusal: GatewayError) -> GatewayError;
    /// After authentication: the per-principal limits.
    fn admitted(&self, principal: &Principal) -> Result<(), GatewayError>;
}

/// No limits: a stream's background re-check, and callers outside a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl Gate for Unlimited {
    fn before_lookup(&self) -> Result<(), GatewayError> {
        Ok(())
    }
    fn succeeded(&self) {}
    fn failed(&self, refusal: GatewayError) -> GatewayError {
        refusal
    }
    fn admitted(&self, _: &Principal) -> Result<(), GatewayError> {
        Ok(())
    }
}

/// Turns grant tokens into principals: the store, the remembered checks, and the record of
/// each token's last use.
pub struct Authenticator {
    store: Store,
    tokens: Arc<cache::TokenCache>,
    clock: Clock,
    /// When this process last recorded each token's use.
    touched: dashmap::DashMap<String, i64>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Authentication against `store`, at `clock`'s time.
    pub fn new(store: Store, clock: Clock) -> Authenticator {
        Authenticator { store, tokens: Arc::new(cache::TokenCache::default()), clock, touched: Default::default() }
    }

    /// Remembered token checks (their revocation epoch drives the end of streams).
    pub fn tokens(&self) -> &Arc<cache::TokenCache> {
        &self.tokens
    }

    /// Authenticates one HTTP request for `server`, then applies the per-principal limits
    /// ([`Gate::admitted`]). A refused credential counts against the client address's
    /// failed-authentication limit, which once exhausted answers 429 without a store lookup.
    pub async fn authenticate(
        &self,
        server: &ServerConfig,
        headers: &HeaderMap,
        gate: &impl Gate,
    ) -> Result<Principal, GatewayError> {
        let principal = if server.public {
            Principal::anonymous()
        } else {
            let found = match bearer_hash(headers) {
                Ok(hash) => self.check(&server.name, &hash, gate).await,
                Err(e) => Err(e),
            };
            match found {
                Err(e @ GatewayError::Unauthenticated(Rejection::Invalid)) => return Err(gate.failed(e)),
                other => other?,
            }
        };
        gate.admitted(&principal)?;
        Ok(principal)
    }

    /// The answer to a request for a server name that is not configured: to a caller without
    /// a valid grant token, the same 401 challenge a configured server's refusal carries (so
    /// names cannot be probed); to an authenticated caller, `unknown` (404).
    pub async fn unknown_server(&self, headers: &HeaderMap, unknown: GatewayError, gate: &impl Gate) -> GatewayError {
        let hash = match bearer_hash(headers) {
            Ok(hash) => hash,
            Err(e @ GatewayError::Unauthenticated(Rejection::Invalid)) => return gate.failed(e),
            Err(e) => return e,
        };
        let now = self.clock.unix_secs();
        match self.lookup(&hash, gate).await {
            Ok(Some(auth)) if auth.usable_at(now) => {
                gate.succeeded();
                unknown
            }
            Ok(_) => gate.failed(GatewayError::Unauthenticated(Rejection::Invalid)),
            Err(e) => e,
        }
    }

    /// The principal of the grant token whose hash is `hash`, if it may call `server` now.
    async fn check(&self, server: &str, hash: &[u8; 32], gate: &impl Gate) -> Result<Principal, GatewayError> {
        let now = self.clock.unix_secs();
        let auth = self.lookup(hash, gate).await?.filter(|t| t.usable_for(server, now));
        let Some(auth) = auth else { return Err(GatewayError::Unauthenticated(Rejection::Invalid)) };
        self.touch(&auth.token_id, auth.last_used_at, now);
        Ok(principal_of(auth))
    }

    /// The token whose hash is `hash`: remembered, or looked up in the store unless the
    /// gate refuses (`portcullis_token_lookups_total` counts the lookups).
    async fn lookup(&self, hash: &[u8; 32], gate: &impl Gate) -> Result<Option<TokenAuth>, GatewayError> {
        if let Some(remembered) = self.tokens.get(hash) {
            return Ok(remembered);
        }
        gate.before_lookup()?;
        let epoch = self.tokens.epoch();
        metrics::counter!("portcullis_token_lookups_total").increment(1);
        // Boxed: a store query makes a large future, which every request's would otherwise carry.
        let found = Box::pin(self.store.token_lookup(hash)).await.map_err(|e| {
            tracing::error!(error = %e, "token lookup failed");
            GatewayError::StoreUnavailable
        })?;
        self.tokens.put(*hash, found.clone(), epoch);
        Ok(found)
    }

    /// Records a token's last use in the background, at most once a minute per token.
    fn touch(&self, id: &str, last_used: Option<i64>, now: u64) {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        // The stored time may come from a remembered check; the map knows this process's touches.
        let last = self.touched.get(id).map(|t| *t).max(last_used);
        if last.is_some_and(|t| now - t < 60) {
            return;
        }
        if self.touched.len() >= cache::CAP {
            self.touched.clear();
        }
        self.touched.insert(id.to_owned(), now);
        let (store, id) = (self.store.clone(), id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = store.token_touch(&id, now).await {
                tracing::warn!(error = %e, "could not record a token's last use");
            }
        });
    }

    /// Completes once the grant token of a request that authenticated with `headers` stops
    /// working for `server`: revoked, expired, or its principal disabled. Long-lived streams
    /// (a session's GET stream, a legacy SSE connection) end on it, so `portcullis user
    /// disable` ends them within the revocation poll ([`cache::POLL`]), on every replica. The
    /// check runs on each change of the revocation epoch and at least every [`cache::TTL`]
    /// (for expiry). While the store cannot answer the stream goes on, but not for long: once
    /// the token has gone unconfirmed for [`cache::TTL`] (a revocation may be what the store
    /// cannot tell), the stream ends, as a new request would be refused; the client opens it
    /// again when the store is back.
    pub fn revoked(
        self: &Arc<Self>,
        server: &ServerConfig,
        headers: &HeaderMap,
    ) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        let (name, public) = (server.name.clone(), server.public);
        let hash = bearer_hash(headers).ok();
        let mut changes = self.tokens.changes();
        async move {
            let Some(hash) = hash else { return std::future::pending().await };
            if public {
                return std::future::pending().await;
            }
            let mut unconfirmed_since: Option<std::time::Instant> = None;
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return std::future::pending().await },
                    () = tokio::time::sleep(cache::TTL) => {}
                }
                match this.check(&name, &hash, &Unlimited).await {
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

fn principal_of(auth: TokenAuth) -> Principal {
    Principal {
        id: auth.principal_id,
        name: auth.principal_name,
        kind: if auth.service { PrincipalKind::Service } else { PrincipalKind::User },
        groups: auth.groups,
        token_id: Some(auth.token_id),
        servers: auth.servers.map(std::sync::Arc::from),
    }
}
