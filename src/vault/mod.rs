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
mod clients;
mod connections;
mod links;
mod refresh;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

use crate::clock::Clock;
use crate::config::{AuthMethod, OAuthConfig};
use crate::crypto::row_aad;
use crate::keys::SharedKeyRing;
use crate::net::Egress;
use crate::oauth::client::OAuthError;
use crate::oauth::client::challenge::{self, BearerChallenge};
use crate::oauth::client::discovery::{self, Discovered, Pins, ServerMetadata};
use crate::oauth::client::endpoint::{self, ClientAuth, Tokens};
use crate::protocol::fault::Fault;
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

impl VaultError {
    /// Which failure this is on the wire (`protocol::fault`).
    pub fn fault(&self) -> Fault {
        match self {
            VaultError::OAuth(e) => e.fault(),
            VaultError::Flow { .. } | VaultError::Config { .. } => Fault::InvalidRequest,
            VaultError::NotConnected { .. } | VaultError::NeedsReconnect { .. } => Fault::AuthorizationRequired,
            VaultError::Store(_) => Fault::Unavailable,
            VaultError::Crypto(_) => Fault::Internal,
        }
    }
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

/// `bytes` random bytes, base64url: link secrets, PKCE verifiers, `state`. When the OS random
/// source fails the flow is refused; nothing predictable is ever handed out in their place.
fn random_b64(bytes: usize) -> Result<String, VaultError> {
    let mut buf = vec![0u8; bytes];
    fill_random(&mut buf).map_err(|e| {
        tracing::error!(error = %e, "the OS random source failed; refusing the OAuth flow");
        VaultError::Crypto("the OS random source failed".to_owned())
    })?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

#[cfg(not(test))]
fn fill_random(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    getrandom::fill(buf)
}

/// In unit tests the random source can be made to fail, to prove the refusal.
#[cfg(test)]
fn fill_random(buf: &mut [u8]) -> Result<(), getrandom::Error> {
    if tests::RANDOM_FAILS.with(std::cell::Cell::get) {
        return Err(getrandom::Error::UNSUPPORTED);
    }
    getrandom::fill(buf)
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
        let egress = Egress::new(crate::net::Policy::from_config(&config.outbound));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Makes this thread's random source fail (see `fill_random`).
        pub(super) static RANDOM_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[tokio::test]
    async fn no_link_is_made_when_the_random_source_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&format!("sqlite://{}/v.db", dir.path().display())).await.expect("store");
        let keys = SharedKeyRing::new(crate::keys::KeyRing::single(crate::keys::Key::random()), None);
        let egress = Egress::new(crate::net::Policy::from_config(&crate::net::OutboundConfig::default()));
        let url = Url::parse("https://gw.example.com").expect("url");
        let server = VaultServer {
            name: "gh".into(),
            url: Some(Url::parse("https://gh.example.com/mcp").expect("url")),
            oauth: OAuthConfig::default(),
        };
        let vault = Vault::new(store, keys, egress, Clock::system(), url, None, vec![server]);
        RANDOM_FAILS.with(|f| f.set(true));
        let refused = vault.link("gh", "", None, &[]).await;
        RANDOM_FAILS.with(|f| f.set(false));
        assert!(matches!(refused, Err(VaultError::Crypto(ref why)) if why.contains("random")), "{:?}", refused.err());
        let link = vault.link("gh", "", None, &[]).await.expect("a link once randomness is back");
        let secret = link.url.expose_secret().split("link=").nth(1).expect("secret").to_owned();
        assert_eq!(secret.len(), 43, "32 random bytes");
        assert_ne!(secret, URL_SAFE_NO_PAD.encode([0u8; 32]));
    }

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
        let egress = Egress::new(crate::net::Policy::from_config(&crate::net::OutboundConfig::default()));
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
