//! One configured upstream server as the dispatch sees it: its configuration, its connector
//! (reachable only through [`super::dispatch`]), the stateless sessions of its 2026-07-28
//! clients, and, with upstream OAuth, the vault, the continuity of sessions and the catalog.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::clock::Clock;
use crate::config::ServerConfig;
use crate::protocol::session::SessionState;
use crate::upstream::Upstream;
use crate::upstream::credentials::Credentials;

/// One principal's stateless upstream session, opened once.
type StatelessSlot = Arc<tokio::sync::OnceCell<(SessionState, serde_json::Value)>>;

/// One configured upstream server and its connector.
pub struct Server {
    /// Its configuration.
    pub config: ServerConfig,
    /// Its connector: reachable from the dispatch only (`super`), never from a transport.
    pub(super) upstream: Upstream,
    /// The upstream sessions of stateless (2026-07-28) clients, opened on first use, one per
    /// principal (keyed by principal id), never shared.
    stateless: dashmap::DashMap<String, StatelessSlot>,
    /// Metric handles by (method, status), registered on first use: the hot path then
    /// neither allocates labels nor searches the registry.
    metrics: dashmap::DashMap<(&'static str, u16), (metrics::Counter, metrics::Histogram)>,
    /// The vault, for servers with upstream OAuth.
    vault: Option<Arc<crate::vault::Vault>>,
    /// With upstream OAuth: the upstream sides opened behind client sessions after they began.
    continuity: Option<crate::mcp::continuity::Continuity>,
    /// With upstream OAuth: what the upstream last showed, for people not connected yet.
    catalog: Option<Arc<crate::mcp::catalog::Catalog>>,
    /// For a trusted server: each tool's annotations as its last listing showed them, which
    /// policy decisions on calls read (`resource.annotations`). At most [`MAX_TOOLS`].
    annotations: dashmap::DashMap<String, serde_json::Value>,
}

/// The most tools whose annotations a trusted server's entry keeps.
const MAX_TOOLS: usize = 10_000;

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("name", &self.config.name).finish_non_exhaustive()
    }
}

impl Server {
    /// The server of `config`, its connector built on `client` and `credentials`.
    pub fn new(config: &ServerConfig, client: reqwest::Client, credentials: Arc<Credentials>) -> Server {
        let oauth = matches!(config.auth, crate::config::UpstreamAuth::OAuth(_));
        let vault = credentials.vault().filter(|_| oauth).cloned();
        let (store, keys) = (credentials.store().clone(), credentials.keys().clone());
        Server {
            continuity: vault
                .as_ref()
                .map(|_| crate::mcp::continuity::Continuity::new(&config.name, store.clone(), keys)),
            catalog: vault.as_ref().map(|_| crate::mcp::catalog::Catalog::new(store, &config.name)),
            vault,
            config: config.clone(),
            upstream: Upstream::new(config, client, credentials),
            stateless: Default::default(),
            metrics: Default::default(),
            annotations: Default::default(),
        }
    }

    /// A trusted server's tool's annotations, as its last listing showed them.
    pub fn tool_annotations(&self, tool: &str) -> Option<serde_json::Value> {
        self.annotations.get(tool).map(|a| a.clone())
    }

    /// Notes a tool's annotations from a listing (trusted servers only; others' are never read).
    pub fn observe_tool(&self, tool: &str, annotations: Option<&serde_json::Value>) {
        if !self.config.trusted {
            return;
        }
        match annotations {
            Some(a) if self.annotations.get(tool).is_none_or(|known| *known != *a) => {
                if self.annotations.len() >= MAX_TOOLS && !self.annotations.contains_key(tool) {
                    self.annotations.clear();
                }
                self.annotations.insert(tool.to_owned(), a.clone());
            }
            Some(_) => {}
            None => {
                self.annotations.remove(tool);
            }
        }
    }

    /// The vault, when this server uses upstream OAuth.
    pub fn vault(&self) -> Option<&Arc<crate::vault::Vault>> {
        self.vault.as_ref()
    }

    /// With upstream OAuth: the upstream sides opened behind client sessions after they began.
    pub fn continuity(&self) -> Option<&crate::mcp::continuity::Continuity> {
        self.continuity.as_ref()
    }

    /// With upstream OAuth: what the upstream last showed.
    pub fn catalog(&self) -> Option<&Arc<crate::mcp::catalog::Catalog>> {
        self.catalog.as_ref()
    }

    /// The upstream session for `caller`'s stateless requests and its `initialize` result.
    /// Each principal has their own, opened once: concurrent first requests of one caller
    /// wait for the same opening, and nobody holds a lock across the upstream's answer.
    pub async fn stateless_session(
        &self,
        clock: &Clock,
        caller: &str,
    ) -> Result<(SessionState, serde_json::Value), crate::upstream::UpstreamError> {
        let slot = match self.stateless.get(caller) {
            Some(slot) => slot.clone(),
            None => {
                if self.stateless.len() >= STATELESS_SESSIONS {
                    self.evict_stateless_sessions().await;
                }
                self.stateless.entry(caller.to_owned()).or_default().clone()
            }
        };
        slot.get_or_try_init(|| self.open_stateless_session(clock, caller)).await.cloned()
    }

    async fn open_stateless_session(
        &self,
        clock: &Clock,
        caller: &str,
    ) -> Result<(SessionState, serde_json::Value), crate::upstream::UpstreamError> {
        let hello = crate::upstream::ClientHello {
            protocol: crate::protocol::version::LATEST_STATEFUL.to_owned(),
            capabilities: serde_json::json!({}),
            client_info: serde_json::json!({"name": "portcullis", "version": env!("CARGO_PKG_VERSION")}),
            caller: caller.to_owned(),
        };
        let session_key = format!("stateless-{}", crate::protocol::session::new_session_key());
        let opened = self.upstream.open(&hello, &session_key).await?;
        let stateless_upstream = opened.upstream_protocol == crate::protocol::version::STATELESS;
        let state = SessionState {
            version: 1,
            key: session_key,
            client_protocol: crate::protocol::version::STATELESS.to_owned(),
            upstream_protocol: opened.upstream_protocol,
            upstream_session: opened.upstream_session,
            created: clock.unix_secs(),
            hello: stateless_upstream
                .then(|| serde_json::json!({"capabilities": hello.capabilities, "clientInfo": hello.client_info})),
            features: 0,
            client: None,
            subject: caller.to_owned(),
            pending: false,
        };
        Ok((state, opened.result))
    }

    /// Drops `caller`'s stateless upstream session `key` (the upstream forgot it); a newer one
    /// opened meanwhile stays.
    pub fn forget_stateless_session(&self, caller: &str, key: &str) {
        self.stateless.remove_if(caller, |_, slot| slot.get().is_none_or(|(s, _)| s.key == key));
    }

    /// Makes room for new callers' stateless sessions: forgets a tenth of the kept ones and
    /// ends them at the upstream (each is opened again on its caller's next request).
    async fn evict_stateless_sessions(&self) {
        let victims: Vec<String> =
            self.stateless.iter().take(STATELESS_SESSIONS / 10 + 1).map(|e| e.key().clone()).collect();
        let ended: Vec<SessionState> = victims
            .iter()
            .filter_map(|caller| self.stateless.remove(caller))
            .filter_map(|(_, slot)| slot.get().map(|(session, _)| session.clone()))
            .collect();
        let closes = ended.iter().map(|session| self.upstream.close(session));
        let _ = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(closes)).await;
        metrics::counter!("portcullis_stateless_sessions_evicted_total", "server" => self.config.name.clone())
            .increment(1);
    }
}

impl Server {
    /// Whether the upstream answers (`/readyz`).
    pub async fn ready(&self) -> Result<(), crate::upstream::UpstreamError> {
        self.upstream.ready().await
    }

    /// Stops the per-user processes of people whose upstream connection ended.
    pub async fn sweep(&self) {
        self.upstream.sweep().await;
    }

    /// Stops child processes and background connections (graceful shutdown).
    pub async fn shutdown(&self) {
        self.upstream.shutdown().await;
    }

    /// Counts one finished HTTP exchange with this server in the metrics. Handles are
    /// registered on first use and then read under the shard's read lock, without cloning.
    pub fn observe(&self, method: &'static str, status: StatusCode, elapsed: Duration) {
        let record = |(counter, histogram): &(metrics::Counter, metrics::Histogram)| {
            counter.increment(1);
            histogram.record(elapsed.as_secs_f64());
        };
        let key = (method, status.as_u16());
        if let Some(handles) = self.metrics.get(&key) {
            return record(&handles);
        }
        record(&self.metrics.entry(key).or_insert_with(|| request_metrics(&self.config.name, method, status)));
    }
}

/// The request counter and latency histogram of `server`, `method` and `status`.
pub fn request_metrics(
    server: &str,
    method: &'static str,
    status: StatusCode,
) -> (metrics::Counter, metrics::Histogram) {
    let (server, status) = (server.to_owned(), status.as_str().to_owned());
    (
        metrics::counter!("portcullis_requests_total", "server" => server.clone(), "method" => method, "status" => status),
        metrics::histogram!("portcullis_request_duration_seconds", "server" => server, "method" => method),
    )
}

/// Most stateless upstream sessions kept per server (one per principal); past it, the oldest
/// are ended and opened again on their caller's next request.
const STATELESS_SESSIONS: usize = 10_000;
