//! Builds the gateway's state, serves its routes, and shuts down gracefully.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::Either;
use http::StatusCode;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::clock::Clock;
use crate::config::{Config, ServerConfig};
use crate::error::GatewayError;
use crate::keys::KeyRing;
use crate::protocol::session::{Sealer, SessionState};
use crate::store::Store;
use crate::transport::origin::HostPolicy;
use crate::upstream::Upstream;
use crate::upstream::credentials::Credentials;

/// One principal's stateless upstream session, opened once.
type StatelessSlot = Arc<tokio::sync::OnceCell<(SessionState, serde_json::Value)>>;

/// One configured upstream server and its connector.
pub struct Server {
    /// Its configuration.
    pub config: ServerConfig,
    /// Its connector.
    pub upstream: Upstream,
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
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("name", &self.config.name).finish_non_exhaustive()
    }
}

impl Server {
    fn new(config: &ServerConfig, client: reqwest::Client, credentials: Arc<Credentials>) -> Server {
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
        app: &AppState,
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
        slot.get_or_try_init(|| self.open_stateless_session(app, caller)).await.cloned()
    }

    async fn open_stateless_session(
        &self,
        app: &AppState,
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
            created: app.clock().unix_secs(),
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

/// Most stateless upstream sessions kept per server (one per principal); past it, the oldest
/// are ended and opened again on their caller's next request.
const STATELESS_SESSIONS: usize = 10_000;

struct Inner {
    config: Config,
    public_url: Url,
    servers: HashMap<String, Arc<Server>>,
    sealer: Sealer,
    hosts: HostPolicy,
    store: Store,
    clock: Clock,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    legacy: crate::transport::legacy_sse::Connections,
    audit: crate::audit::AuditWriter,
    keys: crate::keys::SharedKeyRing,
    tokens: Arc<crate::authn::cache::TokenCache>,
    touched: dashmap::DashMap<String, i64>,
    vault: Option<Arc<crate::vault::Vault>>,
    /// The last readiness probe, reused for [`PROBE_TTL`].
    probe: tokio::sync::Mutex<Option<(Instant, Probe)>>,
}

/// How long a readiness probe's result is reused: however often `/readyz` is asked, the
/// store and the upstreams are probed at most once per this interval.
const PROBE_TTL: Duration = Duration::from_secs(2);
/// How often the metrics recorder drains histogram samples and drops idle series, so its
/// memory stays bounded whether or not anyone scrapes `/metrics`.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// One readiness probe: the store, and each server by name (with its error, if any).
#[derive(Clone)]
struct Probe {
    store: Result<(), String>,
    servers: Vec<(String, Result<(), String>)>,
}

impl Probe {
    fn ready(&self) -> bool {
        self.store.is_ok() && self.servers.iter().all(|(_, r)| r.is_ok())
    }
}

/// Shared state: a cheap handle, passed to every handler.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The URL clients use, resolved against the bound address.
    pub fn public_url(&self) -> &Url {
        &self.0.public_url
    }

    /// The vault, when some server uses upstream OAuth.
    pub fn vault(&self) -> Option<&Arc<crate::vault::Vault>> {
        self.0.vault.as_ref()
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Result<Arc<Server>, GatewayError> {
        self.0.servers.get(name).cloned().ok_or_else(|| GatewayError::UnknownServer(name.chars().take(64).collect()))
    }

    /// Seals and opens session ids.
    pub fn sealer(&self) -> &Sealer {
        &self.0.sealer
    }

    /// The DNS-rebinding guard.
    pub fn hosts(&self) -> &HostPolicy {
        &self.0.hosts
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.0.clock
    }

    /// Open connections of legacy HTTP+SSE clients on this replica.
    pub fn legacy(&self) -> &crate::transport::legacy_sse::Connections {
        &self.0.legacy
    }

    /// The audit log writer.
    pub fn audit(&self) -> &crate::audit::AuditWriter {
        &self.0.audit
    }

    /// The master key ring (reloaded from its source when a row names a key it lacks).
    pub fn keys(&self) -> &crate::keys::SharedKeyRing {
        &self.0.keys
    }

    /// Remembered token checks.
    pub fn tokens(&self) -> &crate::authn::cache::TokenCache {
        &self.0.tokens
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// Records a token's last use in the background, at most once a minute per token.
    pub fn touch_token(&self, id: &str, last_used: Option<i64>, now: u64) {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        // The stored time may come from a remembered check; the map knows this process's touches.
        let last = self.0.touched.get(id).map(|t| *t).max(last_used);
        if last.is_some_and(|t| now - t < 60) {
            return;
        }
        if self.0.touched.len() >= crate::authn::cache::CAP {
            self.0.touched.clear();
        }
        self.0.touched.insert(id.to_owned(), now);
        let (store, id) = (self.0.store.clone(), id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = store.token_touch(&id, now).await {
                tracing::warn!(error = %e, "could not record a token's last use");
            }
        });
    }

    /// Cancelled when shutdown begins; long streams end on it.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.0.shutdown
    }

    /// Records one finished HTTP exchange in the metrics.
    pub fn observe(&self, server: Option<&Server>, method: &'static str, status: StatusCode, started: Instant) {
        let elapsed = started.elapsed();
        let name = server.map_or("unknown", |s| s.config.name.as_str());
        tracing::debug!(
            server = name,
            method,
            status = status.as_u16(),
            micros = elapsed.as_micros() as u64,
            "mcp request"
        );
        let record = |(counter, histogram): &(metrics::Counter, metrics::Histogram)| {
            counter.increment(1);
            histogram.record(elapsed.as_secs_f64());
        };
        let Some(s) = server else { return record(&request_metrics(name, method, status)) };
        let key = (method, status.as_u16());
        // Registered handles are read under the shard's read lock, without cloning them.
        if let Some(handles) = s.metrics.get(&key) {
            return record(&handles);
        }
        record(&s.metrics.entry(key).or_insert_with(|| request_metrics(name, method, status)));
    }
}

fn request_metrics(server: &str, method: &'static str, status: StatusCode) -> (metrics::Counter, metrics::Histogram) {
    let (server, status) = (server.to_owned(), status.as_str().to_owned());
    (
        metrics::counter!("portcullis_requests_total", "server" => server.clone(), "method" => method, "status" => status),
        metrics::histogram!("portcullis_request_duration_seconds", "server" => server, "method" => method),
    )
}

/// The process-wide Prometheus recorder (the `metrics` facade is global by design).
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); this handle still renders ours.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A running gateway.
pub struct Gateway {
    /// The bound address.
    pub addr: SocketAddr,
    /// The bound address of the admin listener (`gateway.admin_listen`), if any.
    pub admin_addr: Option<SocketAddr>,
    /// The state, for inspection.
    pub state: AppState,
    task: tokio::task::JoinHandle<()>,
    admin: Option<tokio::task::JoinHandle<()>>,
    checkpoints: Option<crate::audit::checkpoint::Checkpointer>,
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The store failed to open or migrate.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The master key could not be loaded.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// The audit checkpoint file could not be opened.
    #[error(transparent)]
    Checkpoint(#[from] crate::audit::checkpoint::CheckpointError),
}

impl Gateway {
    /// Binds, opens the store, and starts serving. Upstreams start on first use.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let keys = crate::keys::load_key_ring(&config.gateway.data_dir)?;
        Self::start_with_key(config, keys).await
    }

    /// Like [`Gateway::start`] with a given master key or key ring.
    ///
    /// Binds first, so the port is known and `/readyz` answers while the store opens and
    /// migrates (which can wait for another process's migrations); until then every other path
    /// answers 503 with `Retry-After`. Returns once the gateway serves everything.
    pub async fn start_with_key(config: Config, keys: impl Into<KeyRing>) -> Result<Gateway, StartError> {
        let keys: KeyRing = keys.into();
        let listen = config.gateway.listen;
        let listener =
            tokio::net::TcpListener::bind(listen).await.map_err(|source| StartError::Bind { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: listen, source })?;
        for warning in crate::net::config_warnings(&config) {
            tracing::warn!("{warning}");
        }
        let shutdown = CancellationToken::new();
        let gate = Gate::default();
        let admission = crate::layers::Admission::new(&config);
        let settings = crate::listener::Settings::from(&config.limits);
        let task = {
            let (gate, admission) = (gate.clone(), admission.clone());
            let service = move |peer| crate::layers::stack(admission.clone(), peer, gate.clone());
            tokio::spawn(crate::listener::serve(listener, settings, service, shutdown.clone()))
        };
        tracing::info!(%addr, key_id = %keys.active_id(), "listening; opening the store");
        let store = match open_store(&config.store.url, &gate).await {
            Ok(store) => store,
            Err(e) => {
                shutdown.cancel();
                task.abort();
                let _ = task.await;
                return Err(e.into());
            }
        };
        let admin_listen = config.gateway.admin_listen;
        let checkpoints = match start_checkpoints(&config, &keys, &store) {
            Ok(c) => c,
            Err(e) => {
                shutdown.cancel();
                task.abort();
                let _ = task.await;
                store.close().await;
                return Err(e.into());
            }
        };
        let state = build_state(config, keys, store, addr, shutdown);
        if let Some(c) = &checkpoints {
            state.audit().watch_checkpoints(c.health());
        }
        let (admin_addr, admin) = match admin_listen {
            Some(at) => match tokio::net::TcpListener::bind(at).await.and_then(|l| Ok((l.local_addr()?, l))) {
                Ok((bound, listener)) => {
                    let router = admin_router(state.clone());
                    let service = move |peer| crate::layers::stack(admission.clone(), peer, router.clone());
                    let served = crate::listener::serve(listener, settings, service, state.0.shutdown.clone());
                    tracing::info!(addr = %bound, "admin listener for /metrics and /readyz");
                    (Some(bound), Some(tokio::spawn(served)))
                }
                Err(source) => {
                    state.0.shutdown.cancel();
                    let _ = task.await;
                    return Err(StartError::Bind { addr: at, source });
                }
            },
            None => (None, None),
        };
        tokio::spawn(metrics_upkeep(state.0.metrics.clone(), state.0.shutdown.clone()));
        tokio::spawn(state.0.tokens.clone().watch(state.0.store.clone(), state.0.shutdown.clone()));
        if let Some(vault) = state.0.vault.clone() {
            tokio::spawn(vault.run_refresher(state.0.shutdown.clone()));
            tokio::spawn(sweep_stdio(state.clone(), state.0.tokens.changes()));
        }
        gate.open(Front { router: router(state.clone()), app: state.clone() });
        tracing::info!(%addr, public_url = %state.public_url(), "portcullis is serving");
        Ok(Gateway { addr, admin_addr, state, task, admin, checkpoints })
    }

    /// Stops accepting, lets in-flight calls finish within `shutdown_grace`, ends streams,
    /// then stops upstream processes.
    pub async fn shutdown(self) {
        let grace = self.state.config().gateway.shutdown_grace;
        self.state.0.shutdown.cancel();
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            tracing::warn!(grace_secs = grace.as_secs(), "in-flight requests did not finish in time");
            task.abort();
        }
        if let Some(admin) = self.admin {
            // Its probes are short; it ends with the main listener.
            if tokio::time::timeout(Duration::from_secs(1), admin).await.is_err() {
                tracing::warn!("the admin listener did not stop in time");
            }
        }
        for server in self.state.0.servers.values() {
            server.upstream.shutdown().await;
        }
        // After the listener drained, so every exchange's record is queued; before the store closes.
        self.state.0.audit.shutdown().await;
        // After the last record is written, so the final checkpoint covers it.
        if let Some(c) = self.checkpoints {
            c.finish().await;
        }
        self.state.0.store.close().await;
        tracing::info!("portcullis stopped");
    }
}

/// Opens and migrates the store, telling `/readyz` which of the two it is doing.
async fn open_store(url: &str, gate: &Gate) -> Result<Store, crate::store::StoreError> {
    gate.phase(Phase::OpeningStore);
    let store = Store::open(url).await?;
    gate.phase(Phase::Migrating);
    store.migrate().await?;
    Ok(store)
}

/// Starts signing the audit chain's head into `[audit] checkpoint_file`, unless the audit log
/// or checkpoints are off.
fn start_checkpoints(
    config: &Config,
    keys: &KeyRing,
    store: &Store,
) -> Result<Option<crate::audit::checkpoint::Checkpointer>, crate::audit::checkpoint::CheckpointError> {
    let Some(every) = config.audit.checkpoint_every().filter(|_| config.audit.enabled) else { return Ok(None) };
    let path = config.audit.checkpoint_path(&config.gateway.data_dir);
    let c = crate::audit::checkpoint::Checkpointer::start(store.clone(), keys.clone(), Clock::system(), path, every)?;
    Ok(Some(c))
}

/// The gateway's state over an open store, for a listener bound at `addr`.
fn build_state(config: Config, keys: KeyRing, store: Store, addr: SocketAddr, shutdown: CancellationToken) -> AppState {
    let audit = crate::audit::AuditWriter::start(store.clone(), &config.audit);
    if !config.audit.enabled {
        tracing::warn!("the audit log is off ([audit] enabled = false): MCP exchanges leave no record");
    }
    let shared_keys = crate::keys::SharedKeyRing::new(keys.clone(), Some(config.gateway.data_dir.clone()));
    let public_url = config
        .gateway
        .public_url
        .clone()
        .unwrap_or_else(|| Url::parse(&format!("http://{addr}")).expect("a socket address makes a valid URL"));
    let hosts = HostPolicy::new(&public_url, addr, &config.gateway.allowed_hosts, &config.gateway.allowed_origins);
    let client = upstream_client();
    let vault = crate::vault::Vault::from_config(&config, store.clone(), shared_keys.clone(), &public_url);
    let credentials = match &vault {
        Some(v) => Credentials::with_vault(store.clone(), shared_keys.clone(), v.clone()),
        None => Credentials::new(store.clone(), shared_keys.clone()),
    };
    let servers = config
        .servers
        .iter()
        .map(|s| (s.name.clone(), Arc::new(Server::new(s, client.clone(), credentials.clone()))))
        .collect();
    AppState(Arc::new(Inner {
        sealer: Sealer::from_ring(&keys.derive("session")),
        config,
        public_url,
        servers,
        hosts,
        store,
        clock: Clock::system(),
        metrics: metrics_handle(),
        shutdown,
        legacy: Default::default(),
        audit,
        keys: shared_keys,
        tokens: Arc::new(crate::authn::cache::TokenCache::default()),
        touched: Default::default(),
        vault,
        probe: Default::default(),
    }))
}

/// The HTTP client for configured upstreams (operator-chosen URLs, so no SSRF guard here;
/// URLs that come from clients or upstreams go through `net` instead).
fn upstream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the TLS backend initialises")
}

/// Runs the metrics recorder's upkeep until shutdown (see [`METRICS_UPKEEP`]).
async fn metrics_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(METRICS_UPKEEP) => handle.run_upkeep(),
        }
    }
}

/// Stops the per-user stdio processes of people whose connection ended: when access changes
/// (the revocation epoch moves: a person disabled, a token revoked) and every 30 s.
async fn sweep_stdio(app: AppState, mut changes: tokio::sync::watch::Receiver<i64>) {
    loop {
        tokio::select! {
            () = app.0.shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        if let Some(vault) = app.vault() {
            vault.forget_cached();
        }
        for server in app.0.servers.values() {
            server.upstream.sweep().await;
        }
    }
}

/// What the listener runs once the gateway is ready (see [`Gate`]): `POST`, `GET` and `DELETE`
/// on `/mcp/{name}` of a configured server go straight to their handler, everything else
/// through axum's router. Those three
/// carry nearly all of the traffic, refusals included, and the router spends per request on
/// what they do not need: matching, path parameters put into the request's extensions (a map
/// allocated per request), a boxed clone of the route's service, two boxed futures and a
/// `Content-Length` header built on the heap (hyper writes it from the body's exact size). The
/// router still answers every other path and method, and percent-encoded spellings of
/// configured names (`/mcp/{server}` decodes them), with the same handlers.
struct Front {
    app: AppState,
    router: Router,
}

impl Front {
    fn call(&self, request: axum::extract::Request) -> GateFuture {
        use http::Method;
        let server = Some(request.method())
            .filter(|m| matches!(**m, Method::POST | Method::GET | Method::DELETE))
            .and_then(|_| request.uri().path().strip_prefix("/mcp/"))
            .and_then(|name| self.app.0.servers.get(name));
        match server {
            Some(server) => {
                let (app, server) = (self.app.clone(), server.clone());
                Either::Left(Box::pin(async move { Ok(crate::transport::http::direct(&app, &server, request).await) }))
            }
            None => Either::Right(Either::Left(tower::Service::call(&mut self.router.clone(), request))),
        }
    }
}

/// What a starting gateway is doing, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Connecting to the database (creating a SQLite file).
    #[default]
    OpeningStore,
    /// Applying migrations, or waiting for another process that is.
    Migrating,
}

impl Phase {
    fn text(self) -> &'static str {
        match self {
            Phase::OpeningStore => "opening the store",
            Phase::Migrating => "applying migrations",
        }
    }
}

/// The service the listener runs from the moment it is bound: the starting answers until the
/// gateway is ready, [`Front`] from then on. Hyper clones the service for every request, so
/// the gate is one `Arc`; once open it costs one atomic load per request.
#[derive(Clone, Default)]
struct Gate(Arc<GateInner>);

#[derive(Default)]
struct GateInner {
    front: OnceLock<Front>,
    phase: std::sync::Mutex<Phase>,
}

type GateFuture = Either<
    futures::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>,
    Either<
        <Router as tower::Service<axum::extract::Request>>::Future,
        std::future::Ready<Result<Response, std::convert::Infallible>>,
    >,
>;

impl Gate {
    fn phase(&self, phase: Phase) {
        *self.0.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = phase;
    }

    fn open(&self, front: Front) {
        // Only `start_with_key` opens its own gate, once.
        let _ = self.0.front.set(front);
    }

    /// The answer of a gateway that is not ready yet: alive, not ready, come back in a second.
    fn starting(&self, request: &axum::extract::Request) -> Response {
        let phase = self.0.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner).text();
        let read = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
        let path = request.uri().path();
        let mut response = match path {
            "/healthz" if read => return "ok".into_response(),
            "/readyz" if read => {
                let report = serde_json::json!({ "store": format!("starting: {phase}") });
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(report)).into_response()
            }
            _ if path.starts_with("/mcp/") => {
                crate::error::Failure::from(GatewayError::Starting(phase)).into_response()
            }
            _ => {
                let report = serde_json::json!({ "error": GatewayError::Starting(phase).to_string() });
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(report)).into_response()
            }
        };
        response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        response
    }
}

impl tower::Service<axum::extract::Request> for Gate {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = GateFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        match self.0.front.get() {
            Some(front) => front.call(request),
            None => Either::Right(Either::Right(std::future::ready(Ok(self.starting(&request))))),
        }
    }
}

fn router(state: AppState) -> Router {
    use crate::transport::http as mcp_http;
    let admin = state.config().gateway.admin_listen.is_some();
    let router = Router::new()
        .route("/mcp/{server}", post(mcp_http::post).get(mcp_http::get).delete(mcp_http::delete))
        .route("/mcp/{server}/", post(mcp_http::post).get(mcp_http::get).delete(mcp_http::delete))
        .route("/mcp/{server}/sse", get(crate::transport::legacy_sse::open))
        .route("/mcp/{server}/messages", post(crate::transport::legacy_sse::message))
        .route("/connect/{server}", get(crate::transport::connect::connect).post(crate::transport::connect::confirm))
        .route("/oauth/callback/{server}", get(crate::transport::connect::callback))
        .route("/oauth/client-metadata.json", get(crate::transport::connect::client_metadata))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz_summary));
    // With an admin listener, `/metrics` (which names every server) is served only there.
    let router = if admin { router } else { router.route("/metrics", get(metrics)) };
    router.with_state(state)
}

/// The admin listener's routes: `/metrics`, the detailed `/readyz` and `/healthz`.
fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The last readiness probe, or a new one if it is older than [`PROBE_TTL`]. Concurrent
/// callers wait for one probe rather than each making their own.
async fn probe(app: &AppState) -> Probe {
    let mut cached = app.0.probe.lock().await;
    if let Some((at, probe)) = cached.as_ref()
        && at.elapsed() < PROBE_TTL
    {
        return probe.clone();
    }
    let store = app.0.store.ping().await.map_err(|e| e.to_string());
    let checks = app.0.servers.values().map(|s| async move {
        let r = tokio::time::timeout(Duration::from_secs(10), s.upstream.ready()).await;
        let r = match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 10s".to_owned()),
        };
        (s.config.name.clone(), r)
    });
    let mut servers = futures::future::join_all(checks).await;
    servers.sort_by(|a, b| a.0.cmp(&b.0));
    let probe = Probe { store, servers };
    *cached = Some((Instant::now(), probe.clone()));
    probe
}

/// `/readyz` on the main listener, for anyone: ready or not, and how many servers are ready,
/// with no server names (those are on the admin listener's `/readyz`).
async fn readyz_summary(State(app): State<AppState>) -> Response {
    let probe = probe(&app).await;
    let ready = probe.servers.iter().filter(|(_, r)| r.is_ok()).count();
    let report = serde_json::json!({
        "store": if probe.store.is_ok() { "ok" } else { "unavailable" },
        "servers": { "ready": ready, "total": probe.servers.len() },
    });
    let status = if probe.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(report)).into_response()
}

/// `/readyz` on the admin listener: the store and each server by name, with its error.
async fn readyz(State(app): State<AppState>) -> Response {
    let probe = probe(&app).await;
    let text = |r: &Result<(), String>| match r {
        Ok(()) => serde_json::Value::from("ok"),
        Err(e) => serde_json::Value::from(e.as_str()),
    };
    let servers: serde_json::Map<String, serde_json::Value> =
        probe.servers.iter().map(|(name, r)| (name.clone(), text(r))).collect();
    let report = serde_json::json!({ "store": text(&probe.store), "servers": servers });
    let status = if probe.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(report)).into_response()
}

async fn metrics(State(app): State<AppState>) -> Response {
    let body = app.0.metrics.render();
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
