//! The vault: the gateway is the OAuth client of upstream servers. It discovers their
//! authorization servers, registers itself, runs authorization code + PKCE once per person
//! (or once for a shared connection), keeps the tokens encrypted, refreshes them (one refresh
//! per connection at a time) and revokes them. Clients never see upstream tokens.
//!
//! Flow of a connection: an upstream answers 401 → [`Vault::link`] makes a single-use connect
//! link for the caller → the person opens it → [`Vault::begin`] discovers, registers (again,
//! when the server forgot the registration) and returns the authorization URL → the provider
//! redirects to the server's own callback →
//! [`Vault::complete`] checks `state` and `iss`, exchanges the code and stores the tokens →
//! [`Vault::token`] hands the access token to upstream calls, refreshing it when due.

mod authorize;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use crate::clock::Clock;
use crate::crypto::row_aad;
use crate::keys::SharedKeyRing;
use crate::net::Egress;
use crate::oauth::client::OAuthError;
use crate::oauth::client::challenge::{self, BearerChallenge};
use crate::oauth::client::discovery::{self, Discovered, Pins, ServerMetadata};
use crate::oauth::client::endpoint::{self, AuthMethod, ClientAuth, Tokens};
use crate::store::vault::{ClientRow, ConnectionRow, FlowRow, LinkRow};
use crate::store::{Store, StoreError};

/// How long an authorization flow (its `state`) stays valid (R89, R114: about 10 minutes).
pub const FLOW_TTL_SECS: i64 = 600;
/// How long a connect link stays valid.
pub const LINK_TTL_SECS: i64 = 900;
/// Step-up authorizations allowed per connection within [`STEP_UP_WINDOW`] (R94): an upstream
/// that keeps asking for more gets an error instead of a fourth link.
pub const STEP_UP_LIMIT: u32 = 3;
/// See [`STEP_UP_LIMIT`].
pub const STEP_UP_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a decrypted access token is reused before the connection row is read again.
pub const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// An access token this close to expiry (at most a third of its lifetime) is refreshed
/// before use.
pub const REFRESH_MARGIN_SECS: i64 = 30;
/// How often the background refresher looks for connections about to expire.
pub const REFRESHER_TICK: std::time::Duration = std::time::Duration::from_secs(15);
/// Tokens living shorter than this are only refreshed on demand, not in the background.
pub const BACKGROUND_MIN_LIFETIME_SECS: i64 = 120;

/// When a token issued at `issued_at` and expiring at `expires_at` is due for refresh.
fn refresh_at(expires_at: Option<i64>, issued_at: i64) -> Option<i64> {
    expires_at.map(|e| e - REFRESH_MARGIN_SECS.min((e - issued_at).max(0) / 3))
}

/// `auth = { type = "oauth", … }` (and `client_credentials`) of one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OAuthConfig {
    /// Each person connects their own account (`true`), or one shared connection (`false`).
    pub per_user: bool,
    /// Machine-to-machine: the client credentials grant, no person involved.
    pub client_credentials: bool,
    /// Scopes always asked for.
    pub scopes: Vec<String>,
    /// A pre-registered client id.
    pub client_id: Option<String>,
    /// The issuer the pre-registered client belongs to: its secret is never sent to another
    /// (R86, R121). Required with `client_secret` unless `metadata_url` pins the server.
    pub issuer: Option<String>,
    /// The name of the stored secret holding the pre-registered client's secret.
    pub client_secret: Option<String>,
    /// Pin the token endpoint authentication method of the pre-registered client.
    pub token_endpoint_auth_method: Option<AuthMethodName>,
    /// Authorization server metadata URL, instead of discovery.
    pub metadata_url: Option<Url>,
    /// Extra parameters for the authorization request.
    pub authorization_params: BTreeMap<String, String>,
    /// Send the `resource` parameter (RFC 8707). Providers that refuse it (Entra ID v2) need
    /// `false`. Default `true`.
    pub resource_parameter: bool,
    /// Send `scope` when refreshing (Entra ID needs it). Default `false`.
    pub scope_on_refresh: bool,
    /// For a stdio upstream: the environment variable that carries the access token.
    pub env: Option<String>,
    /// The resource indicator (RFC 8707) to ask tokens for when discovery gives none (a
    /// stdio upstream: the API its tokens are for).
    pub resource: Option<String>,
}

impl OAuthConfig {
    /// Whose connection serves `caller`: their own with `per_user`, else the shared one
    /// (`""`).
    pub fn subject(&self, caller: &str) -> String {
        if self.per_user { caller.to_owned() } else { String::new() }
    }
}

/// A token endpoint authentication method named in configuration.
pub type AuthMethodName = AuthMethod;

/// Why the vault could not do what was asked. Messages never carry a token, code, verifier or
/// client secret.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A step of the OAuth protocol failed (discovery, registration, an endpoint).
    #[error(transparent)]
    OAuth(#[from] OAuthError),
    /// An authorization response or connect link that cannot be accepted (unknown state,
    /// expired link, …).
    #[error("the authorization response was refused: {detail}")]
    Flow {
        /// What.
        detail: String,
    },
    /// Nobody connected this server for this subject yet.
    #[error("not connected to '{server}'")]
    NotConnected {
        /// The server.
        server: String,
    },
    /// The connection no longer works and needs a new authorization.
    #[error("the connection to '{server}' must be renewed: {reason}")]
    NeedsReconnect {
        /// The server.
        server: String,
        /// Why.
        reason: String,
    },
    /// The server or its settings are unknown or incomplete.
    #[error("{detail}")]
    Config {
        /// What.
        detail: String,
    },
    /// The store failed.
    #[error("the vault's store failed: {0}")]
    Store(#[from] StoreError),
    /// Encryption or decryption failed.
    #[error("the vault could not decrypt or encrypt a value: {0}")]
    Crypto(String),
}

/// One upstream server the vault serves.
#[derive(Debug, Clone)]
pub struct VaultServer {
    /// Its name.
    pub name: String,
    /// Its MCP endpoint (`None` for a stdio upstream).
    pub url: Option<Url>,
    /// Its OAuth settings.
    pub oauth: OAuthConfig,
}

/// A new connect link.
#[derive(Clone)]
pub struct Link {
    /// The URL to open (`{public_url}/connect/{server}?link=…`).
    pub url: SecretString,
    /// When it stops working.
    pub expires_at: i64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// What a completed authorization made.
#[derive(Debug, Clone)]
pub struct Connected {
    /// The server.
    pub server: String,
    /// Whose connection (`''` for shared).
    pub subject: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// When the access token expires, if known.
    pub expires_at: Option<i64>,
}

/// The vault. Cheap to share (`Arc`).
pub struct Vault {
    store: Store,
    keys: SharedKeyRing,
    egress: Egress,
    clock: Clock,
    public_url: Url,
    cimd_url: Option<String>,
    servers: HashMap<String, VaultServer>,
    /// One refresh per connection at a time in this process (PostgreSQL adds a lock across
    /// replicas).
    locks: DashMap<(String, String), Arc<tokio::sync::Mutex<()>>>,
    /// With PostgreSQL: a small pool of its own for the replicas' refresh locks, so lock
    /// holders never wait for a connection that other lock holders keep.
    lock_pool: Option<sqlx::PgPool>,
    /// The last challenge each server sent (its metadata URL and scopes), for links made
    /// without one at hand.
    challenges: DashMap<String, BearerChallenge>,
    /// Step-up links handed out per connection: (count, window start).
    step_ups: DashMap<(String, String), (u32, std::time::Instant)>,
    /// This process's name on refresh leases (SQLite).
    owner: Arc<str>,
    /// Decrypted access tokens: (token, refresh due at, generation, cached at). An entry is
    /// trusted for [`CACHE_TTL`], so a connection revoked or replaced by another process (the
    /// CLI, another replica) stops being used within that time.
    cache: DashMap<(String, String), Cached>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("servers", &self.servers.keys().collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

/// A held connection (see `Vault::lock_connection`); the replicas' lock is released first.
struct ConnectionLock {
    _replicas: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    _lease: Option<Lease>,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

/// How long a refresh lease on SQLite lasts at least; with a longer `[outbound] timeout`, three
/// times that (a refresh is one guarded request, a machine token a few), so the lease runs out
/// only when its holder died.
const LEASE_SECS: i64 = 30;
/// Longest wait for another process's lease before giving up.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// A refresh lease held on a SQLite store, given back when dropped.
struct Lease {
    store: Store,
    server: String,
    subject: String,
    owner: Arc<str>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (store, server, subject, owner) = (
            self.store.clone(),
            std::mem::take(&mut self.server),
            std::mem::take(&mut self.subject),
            self.owner.clone(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.vault_refresh_lease_release(&server, &subject, &owner).await {
                    // It runs out by itself after LEASE_SECS.
                    tracing::warn!(%server, error = %e, "a refresh lease could not be given back");
                }
            });
        }
    }
}

/// A decrypted access token kept in memory.
struct Cached {
    token: SecretString,
    /// When it is due for refresh (unix seconds), if it expires.
    due: Option<i64>,
    generation: i64,
    at: std::time::Instant,
}

impl Cached {
    fn new(token: SecretString, due: Option<i64>, generation: i64) -> Cached {
        Cached { token, due, generation, at: std::time::Instant::now() }
    }
}

/// Non-secret details of a flow in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FlowDetails {
    redirect_uri: String,
    scopes: Vec<String>,
    resource: Option<String>,
    client_id: String,
    client_kind: ClientKind,
    auth_method: AuthMethod,
    metadata: ServerMetadata,
    /// SHA-256 of the secret the browser that started the flow holds, if it was bound to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    browser: Option<String>,
}

/// Non-secret details of a connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConnectionDetails {
    token_endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revocation_endpoint: Option<String>,
    redirect_uri: String,
    resource: Option<String>,
    client_kind: ClientKind,
    auth_method: AuthMethod,
}

/// Where a client identity came from (R83).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ClientKind {
    /// Configured by the operator.
    Preregistered,
    /// The gateway's Client ID Metadata Document.
    Metadata,
    /// Registered dynamically (RFC 7591).
    Dynamic,
}

/// The client identity chosen for a flow.
#[derive(Debug)]
struct Chosen {
    auth: ClientAuth,
    kind: ClientKind,
    /// Registered just now, by this flow: the authorization server knew it a moment ago.
    fresh: bool,
}

impl Chosen {
    fn stored(auth: ClientAuth, kind: ClientKind) -> Chosen {
        Chosen { auth, kind, fresh: false }
    }
}

/// What a link asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LinkDetails {
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    resource_metadata: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct SealedTokens {
    a: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<String>,
}

fn unusable_link() -> VaultError {
    VaultError::Flow { detail: "this connect link is unknown, expired or already used; ask for a new one".to_owned() }
}

fn random_b64(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source failing leaves zeros; `getrandom` only fails on broken systems,
    // where the key ring could not have been made either.
    let _ = getrandom::fill(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn union(a: &[String], b: &[String]) -> Vec<String> {
    let mut out = a.to_vec();
    for s in b {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

impl Vault {
    /// A vault for `servers`, with redirect URIs under `public_url` and, when set, the
    /// gateway's Client ID Metadata Document URL (`cimd_url`, https).
    pub fn new(
        store: Store,
        keys: SharedKeyRing,
        egress: Egress,
        clock: Clock,
        public_url: Url,
        cimd_url: Option<String>,
        servers: Vec<VaultServer>,
    ) -> Arc<Vault> {
        let lock_pool = match &store {
            Store::Postgres(p) => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .connect_lazy_with((*p.connect_options()).clone()),
            ),
            Store::Sqlite(_) => None,
        };
        Arc::new(Vault {
            lock_pool,
            store,
            keys,
            egress,
            clock,
            public_url,
            cimd_url,
            servers: servers.into_iter().map(|s| (s.name.clone(), s)).collect(),
            locks: DashMap::new(),
            challenges: DashMap::new(),
            step_ups: DashMap::new(),
            owner: Arc::from(uuid::Uuid::now_v7().to_string()),
            cache: DashMap::new(),
        })
    }

    /// The vault for a gateway's configuration: `None` unless some server uses OAuth.
    pub fn from_config(
        config: &crate::config::Config,
        store: Store,
        keys: SharedKeyRing,
        public_url: &Url,
    ) -> Option<Arc<Vault>> {
        let servers: Vec<VaultServer> = config
            .servers
            .iter()
            .filter_map(|s| match (&s.auth, &s.transport) {
                (
                    crate::config::UpstreamAuth::OAuth(oauth),
                    crate::config::ServerTransport::StreamableHttp { url, .. },
                ) => Some(VaultServer { name: s.name.clone(), url: Some(url.clone()), oauth: (**oauth).clone() }),
                (crate::config::UpstreamAuth::OAuth(oauth), crate::config::ServerTransport::Stdio { .. }) => {
                    Some(VaultServer { name: s.name.clone(), url: None, oauth: (**oauth).clone() })
                }
                _ => None,
            })
            .collect();
        if servers.is_empty() {
            return None;
        }
        // A Client ID Metadata Document must sit at an https URL (R84).
        let cimd_url = (public_url.scheme() == "https")
            .then(|| format!("{}/oauth/client-metadata.json", public_url.as_str().trim_end_matches('/')));
        let egress = Egress::new(config.outbound.policy());
        Some(Vault::new(store, keys, egress, Clock::system(), public_url.clone(), cimd_url, servers))
    }

    fn now(&self) -> i64 {
        i64::try_from(self.clock.unix_secs()).unwrap_or(i64::MAX)
    }

    fn server(&self, name: &str) -> Result<&VaultServer, VaultError> {
        self.servers
            .get(name)
            .ok_or_else(|| VaultError::Config { detail: format!("server '{name}' does not use OAuth") })
    }

    /// The subject a connection is stored under: the caller for per-user servers, `''` for a
    /// shared connection.
    pub fn subject_for(&self, server: &str, caller: &str) -> String {
        self.servers.get(server).map(|s| s.oauth.subject(caller)).unwrap_or_default()
    }

    /// Counts a step-up for `subject` at `server`; `false` once [`STEP_UP_LIMIT`] were handed
    /// out within [`STEP_UP_WINDOW`] without the upstream being satisfied.
    pub fn step_up_allowed(&self, server: &str, subject: &str) -> bool {
        let mut e =
            self.step_ups.entry((server.to_owned(), subject.to_owned())).or_insert((0, std::time::Instant::now()));
        if e.1.elapsed() > STEP_UP_WINDOW {
            *e = (0, std::time::Instant::now());
        }
        e.0 += 1;
        e.0 <= STEP_UP_LIMIT
    }

    /// Whether `server` uses one shared connection.
    pub fn is_shared(&self, server: &str) -> bool {
        self.servers.get(server).is_some_and(|s| !s.oauth.per_user)
    }

    /// The callback of `server` (distinct per server, R91).
    pub fn redirect_uri(&self, server: &str) -> String {
        format!("{}/oauth/callback/{server}", self.public_url.as_str().trim_end_matches('/'))
    }

    /// Every redirect URI (for the Client ID Metadata Document).
    pub fn redirect_uris(&self) -> Vec<String> {
        let mut names: Vec<_> = self.servers.keys().collect();
        names.sort();
        names.into_iter().map(|n| self.redirect_uri(n)).collect()
    }

    /// The gateway's Client ID Metadata Document (R84), if it has an https URL for one.
    pub fn client_metadata_document(&self) -> Option<serde_json::Value> {
        let id = self.cimd_url.as_ref()?;
        Some(serde_json::json!({
            "client_id": id,
            "client_name": "Portcullis",
            "redirect_uris": self.redirect_uris(),
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
            "application_type": "web",
        }))
    }

    fn seal(&self, table: &str, id: &str, value: &[u8]) -> Result<crate::crypto::Sealed, VaultError> {
        self.keys.encrypt(&row_aad(table, id), value).map_err(|e| VaultError::Crypto(e.to_string()))
    }

    fn open(&self, table: &str, id: &str, sealed: &crate::crypto::Sealed) -> Result<Vec<u8>, VaultError> {
        self.keys
            .decrypt(&row_aad(table, id), sealed)
            .map(|s| s.expose_secret().to_vec())
            .map_err(|e| VaultError::Crypto(e.to_string()))
    }

    /// A single-use connect link for `subject` at `server`, remembering what the upstream's
    /// challenge asked for (`extra_scopes` adds step-up scopes, R94).
    pub async fn link(
        &self,
        server: &str,
        subject: &str,
        challenge: Option<&BearerChallenge>,
        extra_scopes: &[String],
    ) -> Result<Link, VaultError> {
        self.server(server)?;
        let remembered;
        let challenge = match challenge {
            Some(c) => {
                // A step-up challenge is about one operation, not the server.
                if c.error.as_deref() != Some("insufficient_scope") {
                    self.challenges.insert(server.to_owned(), c.clone());
                }
                Some(c)
            }
            None => {
                remembered = self.challenges.get(server).map(|c| c.clone());
                remembered.as_ref()
            }
        };
        let secret = random_b64(32);
        let now = self.now();
        let details = LinkDetails {
            scopes: union(&challenge.map(BearerChallenge::scopes).unwrap_or_default(), extra_scopes),
            resource_metadata: challenge.and_then(|c| c.resource_metadata.clone()),
        };
        let row = LinkRow {
            id: sha256_hex(&secret),
            server: server.to_owned(),
            subject: subject.to_owned(),
            details: serde_json::to_string(&details).unwrap_or_default(),
            created_at: now,
            expires_at: now + LINK_TTL_SECS,
        };
        self.store.vault_link_put(&row).await?;
        let url = format!("{}/connect/{server}?link={secret}", self.public_url.as_str().trim_end_matches('/'));
        Ok(Link { url: SecretString::from(url), expires_at: row.expires_at })
    }

    /// Uses a connect link for `server` (once) and starts the authorization: the URL to send
    /// the person's browser to.
    ///
    /// `browser` is a secret the caller also gave the browser (a cookie): the callback then
    /// accepts the response only from that browser, so an authorization URL copied out of
    /// this flow and sent to someone else cannot connect their account here.
    pub async fn begin_from_link(
        &self,
        server: &str,
        link_secret: &str,
        browser: Option<&str>,
    ) -> Result<Url, VaultError> {
        self.server(server)?;
        let row =
            self.store.vault_link_use(&sha256_hex(link_secret), server, self.now()).await?.ok_or_else(unusable_link)?;
        let details: LinkDetails = serde_json::from_str(&row.details).unwrap_or_default();
        let challenge = BearerChallenge {
            error: None,
            scope: (!details.scopes.is_empty()).then(|| details.scopes.join(" ")),
            resource_metadata: details.resource_metadata,
        };
        self.begin(server, &row.subject, Some(&challenge), browser).await
    }

    /// Whose connection the link `link_secret` for `server` would make (`''`: the shared
    /// one), without using it: for the page that asks the person to confirm.
    pub async fn peek_link(&self, server: &str, link_secret: &str) -> Result<String, VaultError> {
        self.store
            .vault_link_peek(&sha256_hex(link_secret), server, self.now())
            .await?
            .map(|r| r.subject)
            .ok_or_else(unusable_link)
    }

    /// Discovers, registers and records a flow for `subject` at `server`; returns the
    /// authorization URL (validated against the egress policy, R102). The request is pushed
    /// where the server offers it (RFC 9126), and a dynamic registration the server no longer
    /// knows is made again first (see `authorize`).
    pub async fn begin(
        &self,
        server: &str,
        subject: &str,
        challenge: Option<&BearerChallenge>,
        browser: Option<&str>,
    ) -> Result<Url, VaultError> {
        let vs = self.server(server)?.clone();
        self.check_enabled(subject).await?;
        let pins = Pins { metadata_url: vs.oauth.metadata_url.clone() };
        let found = discovery::discover(&self.egress, vs.url.as_ref(), challenge, &pins).await?;
        let redirect_uri = self.redirect_uri(server);
        let client = self.choose_client(&vs, &found, &redirect_uri).await?;
        let previous = self.store.vault_connection(server, subject).await?.map(|c| challenge::split_scopes(&c.scopes));
        let scopes = self.scopes_for(&vs, &found, challenge, previous.as_deref());
        let pkce_verifier = random_b64(32);
        let pkce_challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(pkce_verifier.as_bytes()));
        let state = random_b64(32);
        let resource =
            found.resource.clone().or_else(|| vs.oauth.resource.clone()).filter(|_| vs.oauth.resource_parameter);
        let request = authorize::Request {
            redirect_uri: &redirect_uri,
            state: &state,
            code_challenge: &pkce_challenge,
            scopes: &scopes,
            resource: resource.as_deref(),
            extra: &vs.oauth.authorization_params,
        };
        // Pushed (RFC 9126) where offered; either way the gateway makes sure the authorization
        // server still knows its client before the browser goes there.
        let (url, client) = self.authorization_url(&vs, &found, &redirect_uri, client, &request).await?;
        let Chosen { auth: client, kind, .. } = client;
        self.egress.policy().check_url(&url).map_err(OAuthError::from)?;
        let now = self.now();
        let id = sha256_hex(&state);
        let details = FlowDetails {
            redirect_uri,
            scopes,
            resource,
            client_id: client.client_id.clone(),
            client_kind: kind,
            auth_method: client.method,
            metadata: found.server,
            browser: browser.map(sha256_hex),
        };
        let sealed = self.seal(crate::store::vault::FLOWS_TABLE.table, &id, pkce_verifier.as_bytes())?;
        self.store
            .vault_flow_put(&FlowRow {
                id,
                server: server.to_owned(),
                subject: subject.to_owned(),
                details: serde_json::to_string(&details).unwrap_or_default(),
                sealed,
                created_at: now,
                expires_at: now + FLOW_TTL_SECS,
            })
            .await?;
        tracing::info!(server, issuer = %details.metadata.issuer, client = ?kind, "upstream authorization started");
        Ok(url)
    }

    /// Refuses to connect for a person who is disabled (or gone): offboarding must not be
    /// undone by a link or a flow that was still open.
    async fn check_enabled(&self, subject: &str) -> Result<(), VaultError> {
        if subject.is_empty() || self.store.principal_enabled(subject).await? {
            return Ok(());
        }
        Err(VaultError::Flow { detail: "the person this connection is for is disabled".to_owned() })
    }

    /// Scope selection (R92–R94): configured scopes, then the challenge's, else everything
    /// the resource metadata lists; previous scopes kept on step-up; `offline_access` when
    /// the authorization server lists it.
    fn scopes_for(
        &self,
        vs: &VaultServer,
        found: &Discovered,
        challenge: Option<&BearerChallenge>,
        previous: Option<&[String]>,
    ) -> Vec<String> {
        let asked = challenge.map(BearerChallenge::scopes).unwrap_or_default();
        let mut scopes = if !asked.is_empty() {
            union(&vs.oauth.scopes, &asked)
        } else if !vs.oauth.scopes.is_empty() {
            vs.oauth.scopes.clone()
        } else {
            found.resource_scopes.clone().unwrap_or_default()
        };
        if let Some(prev) = previous.filter(|_| !asked.is_empty()) {
            scopes = union(prev, &scopes);
        }
        let offline = found.server.scopes_supported.as_ref().is_some_and(|s| s.iter().any(|s| s == "offline_access"));
        if offline && !scopes.iter().any(|s| s == "offline_access") {
            scopes.push("offline_access".to_owned());
        }
        scopes
    }

    /// The client identity at the discovered server (see [`Vault::choose_client`]).
    async fn client_for(
        &self,
        vs: &VaultServer,
        found: &Discovered,
        redirect_uri: &str,
    ) -> Result<(ClientAuth, ClientKind), VaultError> {
        let chosen = self.choose_client(vs, found, redirect_uri).await?;
        Ok((chosen.auth, chosen.kind))
    }

    /// The client identity at the discovered server, in the order of R83: pre-registered, the
    /// gateway's metadata document, dynamic registration (kept per issuer, R86).
    async fn choose_client(
        &self,
        vs: &VaultServer,
        found: &Discovered,
        redirect_uri: &str,
    ) -> Result<Chosen, VaultError> {
        let supported = found.server.token_endpoint_auth_methods_supported.as_deref();
        if let Some(id) = &vs.oauth.client_id {
            // The pre-registered client belongs to one authorization server: an upstream that
            // names another one must not receive its secret (R86, R121).
            if let Some(pinned) = &vs.oauth.issuer
                && *pinned != found.server.issuer
            {
                return Err(VaultError::OAuth(OAuthError::Discovery {
                    detail: format!(
                        "the upstream names the authorization server {}, but this server's client is registered at {pinned}",
                        found.server.issuer
                    ),
                }));
            }
            let secret = self.preregistered_secret(vs).await?;
            let method =
                vs.oauth.token_endpoint_auth_method.unwrap_or_else(|| AuthMethod::choose(secret.is_some(), supported));
            return Ok(Chosen::stored(ClientAuth { client_id: id.clone(), secret, method }, ClientKind::Preregistered));
        }
        if found.server.client_id_metadata_document_supported
            && let Some(id) = &self.cimd_url
        {
            return Ok(Chosen::stored(
                ClientAuth { client_id: id.clone(), secret: None, method: AuthMethod::None },
                ClientKind::Metadata,
            ));
        }
        let issuer = &found.server.issuer;
        if let Some(row) = self.store.vault_client(&vs.name, issuer, redirect_uri).await? {
            return Ok(Chosen::stored(self.client_of(&row)?, ClientKind::Dynamic));
        }
        let Some(endpoint) = &found.server.registration_endpoint else {
            return Err(VaultError::OAuth(OAuthError::Registration {
                detail: format!(
                    "{issuer} offers no dynamic registration and no client metadata documents; register a client there \
                     and set client_id (and client_secret) in this server's auth"
                ),
            }));
        };
        let client = endpoint::register(&self.egress, endpoint, redirect_uri, supported).await?;
        let id = uuid::Uuid::now_v7().to_string();
        let ours = client.client_id.clone();
        let secret = client.secret.as_ref().map(|s| s.expose_secret().to_owned()).unwrap_or_default();
        let sealed = self.seal(crate::store::vault::CLIENTS_TABLE.table, &id, secret.as_bytes())?;
        self.store
            .vault_client_put(&ClientRow {
                id,
                server: vs.name.clone(),
                issuer: issuer.clone(),
                client_id: client.client_id.clone(),
                auth_method: client.method.as_str().to_owned(),
                redirect_uri: redirect_uri.to_owned(),
                sealed,
                created_at: self.now(),
            })
            .await?;
        // A concurrent registration may have been stored first: everybody uses the stored one.
        let stored = self.store.vault_client(&vs.name, issuer, redirect_uri).await?;
        if let Some(row) = stored.filter(|r| r.client_id != ours) {
            return Ok(Chosen::stored(self.client_of(&row)?, ClientKind::Dynamic));
        }
        tracing::info!(server = %vs.name, %issuer, "registered with the upstream's authorization server");
        Ok(Chosen { auth: client, kind: ClientKind::Dynamic, fresh: true })
    }

    fn client_of(&self, row: &ClientRow) -> Result<ClientAuth, VaultError> {
        let secret = self.open(crate::store::vault::CLIENTS_TABLE.table, &row.id, &row.sealed)?;
        let secret = String::from_utf8(secret).map_err(|_| VaultError::Crypto("client secret".to_owned()))?;
        Ok(ClientAuth {
            client_id: row.client_id.clone(),
            secret: (!secret.is_empty()).then(|| SecretString::from(secret)),
            method: AuthMethod::parse(&row.auth_method).unwrap_or(AuthMethod::None),
        })
    }

    async fn preregistered_secret(&self, vs: &VaultServer) -> Result<Option<SecretString>, VaultError> {
        let Some(name) = &vs.oauth.client_secret else { return Ok(None) };
        let value = self.store.secret_get_shared(name, &self.keys).await.map_err(|e| VaultError::Config {
            detail: format!("the client secret '{name}' of server '{}' could not be read: {e}", vs.name),
        })?;
        value.map(Some).ok_or_else(|| VaultError::Config {
            detail: format!(
                "the client secret '{name}' of server '{}' is not set (portcullis secret set {name})",
                vs.name
            ),
        })
    }

    /// The client identity a flow or a connection used: `client_id` of `kind` for `server` at
    /// `issuer`; `gone` is the error when its dynamic registration no longer exists.
    async fn stored_client(
        &self,
        server: &str,
        issuer: &str,
        client_id: &str,
        kind: ClientKind,
        method: AuthMethod,
        gone: impl FnOnce() -> VaultError,
    ) -> Result<ClientAuth, VaultError> {
        match kind {
            ClientKind::Preregistered => Ok(ClientAuth {
                client_id: client_id.to_owned(),
                secret: self.preregistered_secret(self.server(server)?).await?,
                method,
            }),
            ClientKind::Metadata => {
                Ok(ClientAuth { client_id: client_id.to_owned(), secret: None, method: AuthMethod::None })
            }
            ClientKind::Dynamic => {
                let row = self.store.vault_client_by_id(server, issuer, client_id).await?.ok_or_else(gone)?;
                self.client_of(&row)
            }
        }
    }

    /// The client a connection's tokens belong to, for refresh and revocation.
    async fn client_of_connection(
        &self,
        conn: &ConnectionRow,
        d: &ConnectionDetails,
    ) -> Result<ClientAuth, VaultError> {
        let gone = || VaultError::NeedsReconnect {
            server: conn.server.clone(),
            reason: "the gateway's registration with the authorization server is gone".to_owned(),
        };
        self.stored_client(&conn.server, &conn.issuer, &conn.client_id, d.client_kind, d.auth_method, gone).await
    }

    /// Completes an authorization at `server`'s callback with the response's query
    /// parameters: `state` (single-use, R89), `iss` (RFC 9207, R90), then `error` or `code`.
    ///
    /// `browser` is the secret the browser presents (its cookie); a flow bound to a browser
    /// is completed only by that browser.
    pub async fn complete(
        &self,
        server: &str,
        params: &HashMap<String, String>,
        browser: Option<&str>,
    ) -> Result<Connected, VaultError> {
        let state = params.get("state").ok_or_else(|| VaultError::Flow { detail: "no state".to_owned() })?;
        let flow =
            self.store.vault_flow_take(&sha256_hex(state)).await?.filter(|f| f.expires_at >= self.now()).ok_or_else(
                || VaultError::Flow {
                    detail: "unknown or expired state; start again from the connect link".to_owned(),
                },
            )?;
        if flow.server != server {
            return Err(VaultError::Flow { detail: "this response belongs to another server's callback".to_owned() });
        }
        self.check_enabled(&flow.subject).await?;
        let d: FlowDetails = serde_json::from_str(&flow.details)
            .map_err(|_| VaultError::Flow { detail: "the stored flow is unreadable".to_owned() })?;
        if let Some(expected) = &d.browser
            && browser.map(sha256_hex).as_ref() != Some(expected)
        {
            return Err(VaultError::Flow {
                detail: "this sign-in was started in another browser; open your own connect link".to_owned(),
            });
        }
        match params.get("iss") {
            Some(iss) if *iss != d.metadata.issuer => {
                return Err(VaultError::Flow {
                    detail: format!("the response names issuer {iss:?}, expected {:?}", d.metadata.issuer),
                });
            }
            None if d.metadata.authorization_response_iss_parameter_supported => {
                return Err(VaultError::Flow {
                    detail: "the response lacks the iss parameter its server promised".into(),
                });
            }
            _ => {}
        }
        if let Some(error) = params.get("error") {
            return Err(VaultError::OAuth(OAuthError::Denied {
                error: error.chars().take(64).collect(),
                description: params.get("error_description").map(|d| d.chars().take(200).collect()),
            }));
        }
        let code = params.get("code").ok_or_else(|| VaultError::Flow { detail: "no code".to_owned() })?;
        let verifier = self.open(crate::store::vault::FLOWS_TABLE.table, &flow.id, &flow.sealed)?;
        let verifier = String::from_utf8(verifier).map_err(|_| VaultError::Crypto("verifier".to_owned()))?;
        let gone = || VaultError::Flow { detail: "the registration used for this flow is gone".to_owned() };
        let issuer = &d.metadata.issuer;
        let client = self.stored_client(server, issuer, &d.client_id, d.client_kind, d.auth_method, gone).await?;
        let exchanged = endpoint::exchange_code(
            &self.egress,
            &client,
            &d.metadata.token_endpoint,
            code,
            &verifier,
            &d.redirect_uri,
            d.resource.as_deref(),
        )
        .await
        .map_err(VaultError::from);
        let tokens = match exchanged {
            Ok(t) => t,
            Err(VaultError::OAuth(OAuthError::Token { error: Some(code), detail }))
                if code == "invalid_client" && d.client_kind == ClientKind::Dynamic =>
            {
                // The server forgot the registration between the start and the end of the flow:
                // the next link registers again instead of failing the same way.
                self.store.vault_client_delete(server, issuer, &d.client_id).await?;
                tracing::warn!(server, %issuer, "the authorization server no longer knows the gateway's registration");
                return Err(VaultError::OAuth(OAuthError::Token {
                    error: Some(code),
                    detail: format!("{detail} (the registration was dropped; a new connect link registers again)"),
                }));
            }
            Err(e) => return Err(e),
        };
        let details = ConnectionDetails {
            token_endpoint: d.metadata.token_endpoint.clone(),
            revocation_endpoint: d.metadata.revocation_endpoint.clone(),
            redirect_uri: d.redirect_uri.clone(),
            resource: d.resource.clone(),
            client_kind: d.client_kind,
            auth_method: client.method,
        };
        let connected = self
            .store_tokens(server, &flow.subject, &d.metadata.issuer, &client.client_id, &d.scopes, &details, tokens)
            .await?;
        tracing::info!(server, issuer = %d.metadata.issuer, "upstream connection made");
        Ok(connected)
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_tokens(
        &self,
        server: &str,
        subject: &str,
        issuer: &str,
        client_id: &str,
        asked: &[String],
        details: &ConnectionDetails,
        tokens: Tokens,
    ) -> Result<Connected, VaultError> {
        let now = self.now();
        let id = uuid::Uuid::now_v7().to_string();
        let scopes = tokens.scopes.clone().unwrap_or_else(|| asked.to_vec());
        let expires_at = tokens.expires_in.map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
        let sealed = self.seal_tokens(&id, &tokens.access, tokens.refresh.as_ref())?;
        self.store
            .vault_connection_put(&ConnectionRow {
                id,
                server: server.to_owned(),
                subject: subject.to_owned(),
                issuer: issuer.to_owned(),
                client_id: client_id.to_owned(),
                scopes: scopes.join(" "),
                details: serde_json::to_string(details).unwrap_or_default(),
                sealed,
                expires_at,
                status: "active".to_owned(),
                generation: 0,
                created_at: now,
                refreshed_at: None,
                last_error: None,
            })
            .await?;
        self.cache.remove(&(server.to_owned(), subject.to_owned()));
        Ok(Connected { server: server.to_owned(), subject: subject.to_owned(), scopes, expires_at })
    }

    fn seal_tokens(
        &self,
        id: &str,
        access: &SecretString,
        refresh: Option<&SecretString>,
    ) -> Result<crate::crypto::Sealed, VaultError> {
        let plain = serde_json::to_vec(&SealedTokens {
            a: access.expose_secret().to_owned(),
            r: refresh.map(|r| r.expose_secret().to_owned()),
        })
        .map_err(|e| VaultError::Crypto(e.to_string()))?;
        self.seal(crate::store::vault::CONNECTIONS_TABLE.table, id, &plain)
    }

    fn open_tokens(&self, row: &ConnectionRow) -> Result<(SecretString, Option<SecretString>), VaultError> {
        let plain = self.open(crate::store::vault::CONNECTIONS_TABLE.table, &row.id, &row.sealed)?;
        let t: SealedTokens = serde_json::from_slice(&plain).map_err(|_| VaultError::Crypto("tokens".to_owned()))?;
        Ok((SecretString::from(t.a), t.r.map(SecretString::from)))
    }

    /// The access token for `caller`'s calls to `server`, refreshed first when it is about to
    /// expire. Returns it with the connection's generation (for [`Vault::rejected`]).
    pub async fn token(self: &Arc<Self>, server: &str, caller: &str) -> Result<(SecretString, i64), VaultError> {
        let subject = self.subject_for(server, caller);
        let key = (server.to_owned(), subject.clone());
        let now = self.now();
        if let Some(hit) = self.cache.get(&key)
            && hit.due.is_none_or(|due| due > now)
            && hit.at.elapsed() < CACHE_TTL
        {
            return Ok((hit.token.clone(), hit.generation));
        }
        let vs = self.server(server)?;
        let Some(row) = self.store.vault_connection(server, &subject).await? else {
            if vs.oauth.client_credentials {
                return self.machine_token(server).await;
            }
            return Err(VaultError::NotConnected { server: server.to_owned() });
        };
        if row.status == "reconnect" {
            return Err(VaultError::NeedsReconnect {
                server: server.to_owned(),
                reason: row.last_error.unwrap_or_else(|| "the authorization server no longer accepts it".to_owned()),
            });
        }
        let due = refresh_at(row.expires_at, row.refreshed_at.unwrap_or(row.created_at));
        if due.is_some_and(|due| due <= now) {
            return self.refresh(server, &subject, row.generation).await;
        }
        let (access, _) = self.open_tokens(&row)?;
        self.cache.insert(key, Cached::new(access.clone(), due, row.generation));
        Ok((access, row.generation))
    }

    /// An upstream refused the token of `generation` (401): refresh once, unless another call
    /// already did (R99). The caller retries once with the new token.
    pub async fn rejected(
        self: &Arc<Self>,
        server: &str,
        caller: &str,
        generation: i64,
    ) -> Result<(SecretString, i64), VaultError> {
        let subject = self.subject_for(server, caller);
        self.cache.remove(&(server.to_owned(), subject.clone()));
        self.refresh(server, &subject, generation).await
    }

    /// Refreshes the connection of `subject` at `server` unless its generation moved past
    /// `seen` (then the newer token is returned). One refresh at a time per connection.
    ///
    /// The refresh runs in a task of its own: a caller that goes away (a client that
    /// disconnects, a timeout) must not cancel it between the provider rotating the refresh
    /// token and the store keeping the new one.
    async fn refresh(
        self: &Arc<Self>,
        server: &str,
        subject: &str,
        seen: i64,
    ) -> Result<(SecretString, i64), VaultError> {
        let this = self.clone();
        let (server, subject) = (server.to_owned(), subject.to_owned());
        tokio::spawn(async move { this.refresh_now(&server, &subject, seen).await })
            .await
            .map_err(|e| VaultError::Config { detail: format!("the refresh task failed: {e}") })?
    }

    /// Holds the connection of `subject` at `server` for one refresh or revocation: this
    /// process's lock, and on PostgreSQL the replicas' advisory lock. Released when dropped.
    async fn lock_connection(&self, server: &str, subject: &str) -> Result<ConnectionLock, VaultError> {
        let lock = self.locks.entry((server.to_owned(), subject.to_owned())).or_default().clone();
        let local = lock.lock_owned().await;
        let (replicas, lease) = match &self.lock_pool {
            Some(pool) => (Some(crate::store::vault::refresh_lock(pool, server, subject).await?), None),
            None => (None, self.lease(server, subject).await?),
        };
        Ok(ConnectionLock { _replicas: replicas, _lease: lease, _local: local })
    }

    /// On SQLite, the connection's refresh lease (other processes may share the file): waits
    /// while another process holds it. `None` when there is no connection to lock.
    async fn lease(&self, server: &str, subject: &str) -> Result<Option<Lease>, VaultError> {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(10);
        loop {
            let now = self.now();
            let timeout = i64::try_from(self.egress.policy().timeout.as_secs()).unwrap_or(i64::MAX / 4);
            let until = now.saturating_add(LEASE_SECS.max(timeout.saturating_mul(3)));
            match self.store.vault_refresh_lease_take(server, subject, &self.owner, now, until).await? {
                None => return Ok(None),
                Some(true) => {
                    let (store, owner) = (self.store.clone(), self.owner.clone());
                    return Ok(Some(Lease { store, server: server.to_owned(), subject: subject.to_owned(), owner }));
                }
                Some(false) if started.elapsed() > LEASE_WAIT => {
                    return Err(VaultError::OAuth(OAuthError::Token {
                        error: None,
                        detail: format!("another gateway process has been refreshing '{server}' for too long"),
                    }));
                }
                Some(false) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(200));
                }
            }
        }
    }

    async fn refresh_now(&self, server: &str, subject: &str, seen: i64) -> Result<(SecretString, i64), VaultError> {
        let key = (server.to_owned(), subject.to_owned());
        let _locked = self.lock_connection(server, subject).await?;
        let row = self
            .store
            .vault_connection(server, subject)
            .await?
            .ok_or_else(|| VaultError::NotConnected { server: server.to_owned() })?;
        let now = self.now();
        // Another call (or replica) refreshed since `seen`: use its token, not the refresh token.
        let unexpired = row.expires_at.is_none_or(|e| e > now);
        if row.generation != seen && row.status == "active" && unexpired {
            let (access, _) = self.open_tokens(&row)?;
            let due = refresh_at(row.expires_at, row.refreshed_at.unwrap_or(row.created_at));
            self.cache.insert(key, Cached::new(access.clone(), due, row.generation));
            return Ok((access, row.generation));
        }
        if row.status == "reconnect" {
            return Err(VaultError::NeedsReconnect {
                server: server.to_owned(),
                reason: row.last_error.unwrap_or_else(|| "the authorization server no longer accepts it".to_owned()),
            });
        }
        let (_, refresh_token) = self.open_tokens(&row)?;
        let d: ConnectionDetails =
            serde_json::from_str(&row.details).map_err(|_| VaultError::Crypto("connection details".to_owned()))?;
        let vs = self.server(server)?.clone();
        let Some(refresh_token) = refresh_token else {
            if vs.oauth.client_credentials {
                return self.machine_token(server).await;
            }
            let reason = "the access token expired and the authorization server gave no refresh token";
            self.store.vault_connection_failed(&row.id, row.generation, true, reason).await?;
            return Err(VaultError::NeedsReconnect { server: server.to_owned(), reason: reason.to_owned() });
        };
        let client = self.client_of_connection(&row, &d).await?;
        let scopes = challenge::split_scopes(&row.scopes);
        let result = endpoint::refresh(
            &self.egress,
            &client,
            &d.token_endpoint,
            &refresh_token,
            vs.oauth.scope_on_refresh.then_some(scopes.as_slice()),
            d.resource.as_deref(),
        )
        .await
        .map_err(VaultError::from);
        let tokens = match result {
            Ok(t) => t,
            Err(VaultError::OAuth(OAuthError::Token { error: Some(code), detail }))
                if code == "invalid_grant" || code == "invalid_client" =>
            {
                // Another process may have refreshed meanwhile (a lease that ran out): the
                // refusal is about the token it replaced, and its token is the one to use.
                if let Ok(newer) = self.newer_token(server, subject, row.generation).await {
                    return Ok(newer);
                }
                // The grant is gone (revoked, expired, or the server forgot us): ask the person
                // to reconnect instead of retrying in a loop.
                let reason = format!("the authorization server refused the refresh ({detail})");
                self.store.vault_connection_failed(&row.id, row.generation, true, &reason).await?;
                if code == "invalid_client" && d.client_kind == ClientKind::Dynamic {
                    self.store.vault_client_delete(server, &row.issuer, &row.client_id).await?;
                }
                metrics::counter!("portcullis_vault_refresh_total", "server" => server.to_owned(), "outcome" => "reconnect")
                    .increment(1);
                return Err(VaultError::NeedsReconnect { server: server.to_owned(), reason });
            }
            Err(e) => {
                self.store.vault_connection_failed(&row.id, row.generation, false, &e.to_string()).await?;
                metrics::counter!("portcullis_vault_refresh_total", "server" => server.to_owned(), "outcome" => "error")
                    .increment(1);
                return Err(e);
            }
        };
        // The rotated refresh token replaces the old one in the same statement as the new
        // access token, before either is used (R98).
        let refresh_next = tokens.refresh.clone().or(Some(refresh_token));
        let sealed = self.seal_tokens(&row.id, &tokens.access, refresh_next.as_ref())?;
        let expires_at = tokens.expires_in.map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
        let new_scopes = tokens.scopes.as_ref().map(|s| s.join(" ")).unwrap_or_else(|| row.scopes.clone());
        let stored = self
            .store
            .vault_connection_refreshed(&row.id, row.generation, &sealed, expires_at, &new_scopes, now)
            .await?;
        if !stored {
            // Another process stored first (a new authorization, or a refresh that did not
            // take the lock): its token is the one to use.
            return self.newer_token(server, subject, row.generation).await;
        }
        metrics::counter!("portcullis_vault_refresh_total", "server" => server.to_owned(), "outcome" => "ok")
            .increment(1);
        tracing::info!(server, "upstream token refreshed");
        let generation = row.generation + 1;
        self.cache.insert(key, Cached::new(tokens.access.clone(), refresh_at(expires_at, now), generation));
        Ok((tokens.access, generation))
    }

    /// The token of a connection that moved past `generation` while this process refreshed.
    async fn newer_token(
        &self,
        server: &str,
        subject: &str,
        generation: i64,
    ) -> Result<(SecretString, i64), VaultError> {
        let changed = || VaultError::NeedsReconnect {
            server: server.to_owned(),
            reason: "the connection changed during the refresh".to_owned(),
        };
        let row = self.store.vault_connection(server, subject).await?.ok_or_else(changed)?;
        let expired = row.expires_at.is_some_and(|e| e <= self.now());
        if row.generation == generation || row.status != "active" || expired {
            return Err(changed());
        }
        let (access, _) = self.open_tokens(&row)?;
        let due = refresh_at(row.expires_at, row.refreshed_at.unwrap_or(row.created_at));
        self.cache.insert((server.to_owned(), subject.to_owned()), Cached::new(access.clone(), due, row.generation));
        Ok((access, row.generation))
    }

    /// The client credentials grant for a machine-to-machine server (stored as the shared
    /// connection).
    async fn machine_token(&self, server: &str) -> Result<(SecretString, i64), VaultError> {
        let vs = self.server(server)?.clone();
        let pins = Pins { metadata_url: vs.oauth.metadata_url.clone() };
        let found = discovery::discover(&self.egress, vs.url.as_ref(), None, &pins).await?;
        let (client, kind) = self.client_for(&vs, &found, &self.redirect_uri(server)).await?;
        let resource =
            found.resource.clone().or_else(|| vs.oauth.resource.clone()).filter(|_| vs.oauth.resource_parameter);
        let tokens = endpoint::client_credentials(
            &self.egress,
            &client,
            &found.server.token_endpoint,
            &vs.oauth.scopes,
            resource.as_deref(),
        )
        .await?;
        let access = tokens.access.clone();
        let details = ConnectionDetails {
            token_endpoint: found.server.token_endpoint.clone(),
            revocation_endpoint: found.server.revocation_endpoint.clone(),
            redirect_uri: self.redirect_uri(server),
            resource,
            client_kind: kind,
            auth_method: client.method,
        };
        self.store_tokens(server, "", &found.server.issuer, &client.client_id, &vs.oauth.scopes, &details, tokens)
            .await?;
        let row = self.store.vault_connection(server, "").await?;
        Ok((access, row.map(|r| r.generation).unwrap_or(0)))
    }

    /// Revokes `subject`'s connection to `server` at the provider (RFC 7009, when it has a
    /// revocation endpoint) and deletes it. Returns what happened at the provider.
    pub async fn revoke(&self, server: &str, subject: &str) -> Result<Option<String>, VaultError> {
        // Under the refresh locks, so a refresh cannot rotate the token between the read and
        // the revocation.
        let _locked = self.lock_connection(server, subject).await?;
        let Some(row) = self.store.vault_connection(server, subject).await? else { return Ok(None) };
        let outcome = self.revoke_at_provider(&row).await;
        self.store.vault_connection_delete(&row.id).await?;
        self.cache.remove(&(server.to_owned(), subject.to_owned()));
        Ok(Some(outcome))
    }

    async fn revoke_at_provider(&self, row: &ConnectionRow) -> String {
        let Ok(d) = serde_json::from_str::<ConnectionDetails>(&row.details) else {
            return "details unreadable; deleted locally only".to_owned();
        };
        let Some(endpoint) = &d.revocation_endpoint else {
            return "the provider has no revocation endpoint; deleted locally".to_owned();
        };
        let (access, refresh) = match self.open_tokens(row) {
            Ok(t) => t,
            Err(e) => return format!("{e}; deleted locally only"),
        };
        let client = match self.client_of_connection(row, &d).await {
            Ok(c) => c,
            Err(e) => return format!("{e}; deleted locally only"),
        };
        // Revoking the refresh token ends the grant and its access tokens (RFC 7009 §2.1);
        // without one, the access token itself is revoked.
        let (token, is_refresh) = match &refresh {
            Some(r) => (r, true),
            None => (&access, false),
        };
        let what = if is_refresh { "refresh token" } else { "access token" };
        match endpoint::revoke(&self.egress, &client, endpoint, token, is_refresh).await {
            Ok(()) => format!("{what} revoked at the provider"),
            Err(e) => format!("{what} not revoked at the provider ({e}); deleted locally"),
        }
    }

    /// Refreshes, in the background, every active connection whose token expires within the
    /// next tick plus its margin (with a per-connection jitter, so replicas and connections do
    /// not all refresh at once), until `stop`. Tokens shorter-lived than
    /// [`BACKGROUND_MIN_LIFETIME_SECS`] are left to on-demand refresh.
    pub async fn run_refresher(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(REFRESHER_TICK) => {}
            }
            if let Err(e) = self.refresh_due().await {
                tracing::warn!(error = %e, "background refresh pass failed");
            }
        }
    }

    /// One pass of the background refresher; returns how many connections it refreshed.
    pub async fn refresh_due(self: &Arc<Self>) -> Result<usize, VaultError> {
        let now = self.now();
        let tick = i64::try_from(REFRESHER_TICK.as_secs()).unwrap_or(15);
        let mut refreshed = 0;
        for row in self.store.vault_connections(None).await? {
            let Some(expires) = row.expires_at else { continue };
            let issued = row.refreshed_at.unwrap_or(row.created_at);
            if row.status != "active"
                || expires - issued < BACKGROUND_MIN_LIFETIME_SECS
                || !self.servers.contains_key(&row.server)
            {
                continue;
            }
            let jitter = i64::from(Sha256::digest(row.id.as_bytes())[0]) % tick.max(1);
            let due = refresh_at(Some(expires), issued).unwrap_or(expires) - tick - jitter;
            if due > now {
                continue;
            }
            match self.refresh(&row.server, &row.subject, row.generation).await {
                Ok(_) => refreshed += 1,
                Err(e) => tracing::warn!(server = %row.server, error = %e, "background refresh failed"),
            }
        }
        Ok(refreshed)
    }

    /// Forgets every decrypted token (access changed somewhere: the next use reads the store).
    pub fn forget_cached(&self) {
        self.cache.clear();
    }

    /// Whether `caller`'s connection to `server` exists and works, read from the store (not
    /// the cache, which it clears when the answer is no).
    pub async fn is_connected(&self, server: &str, caller: &str) -> Result<bool, VaultError> {
        let subject = self.subject_for(server, caller);
        let row = self.store.vault_connection(server, &subject).await?;
        let ok = row.is_some_and(|r| r.status == "active");
        if !ok {
            self.cache.remove(&(server.to_owned(), subject));
        }
        Ok(ok)
    }

    /// Connections, all or one subject's (never tokens).
    pub async fn connections(&self, subject: Option<&str>) -> Result<Vec<ConnectionRow>, VaultError> {
        Ok(self.store.vault_connections(subject).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_due_a_third_of_their_life_early_at_most_thirty_seconds() {
        assert_eq!(refresh_at(Some(1_000), 990), Some(997));
        assert_eq!(refresh_at(Some(10_000), 6_400), Some(9_970));
        assert_eq!(refresh_at(None, 0), None);
        assert_eq!(refresh_at(Some(100), 200), Some(100), "an issue time after expiry leaves no margin");
    }

    #[tokio::test]
    async fn step_ups_are_limited_per_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&format!("sqlite://{}/v.db", dir.path().display())).await.expect("store");
        let keys = SharedKeyRing::new(crate::keys::KeyRing::single(crate::keys::Key::random()), None);
        let egress = Egress::new(crate::net::OutboundConfig::default().policy());
        let url = Url::parse("https://gw.example.com").expect("url");
        let vault = Vault::new(store, keys, egress, Clock::system(), url, None, Vec::new());
        for _ in 0..STEP_UP_LIMIT {
            assert!(vault.step_up_allowed("gh", "alice"));
        }
        assert!(!vault.step_up_allowed("gh", "alice"), "a fourth step-up is refused");
        assert!(vault.step_up_allowed("gh", "bob"), "counted per person");
        assert!(vault.step_up_allowed("jira", "alice"), "and per server");
    }
}
