//! Builds the gateway's state, serves its routes, and shuts down gracefully.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::Either;
use http::StatusCode;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::authn::Authenticator;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::GatewayError;
use crate::keys::KeyRing;
use crate::mcp::Server;
use crate::origin::HostPolicy;
use crate::protocol::session::Sealer;
use crate::state::{AppState, Parts};
use crate::store::Store;
use crate::upstream::credentials::Credentials;

/// How long an idle connection to an upstream is kept for reuse (see [`upstream_client`]).
const UPSTREAM_POOL_IDLE: Duration = Duration::from_secs(4);
/// How often the metrics recorder drains histogram samples and drops idle series, so its
/// memory stays bounded whether or not anyone scrapes `/metrics`.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

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
    /// The layers' state: the count of refusals left out of the audit log is reported from it.
    admission: Arc<crate::layers::Admission>,
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
    /// The policies of `[policy] dir` cannot be used.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
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
        // Invalid policies stop the start before anything listens.
        let policy = match &config.policy {
            None => crate::policy::Policies::Builtin,
            Some(p) => crate::policy::Policies::Cedar(crate::policy::Current::load(&p.dir, p.utc_offset_minutes)?),
        };
        let listen = config.gateway.listen;
        let listener =
            tokio::net::TcpListener::bind(listen).await.map_err(|source| StartError::Bind { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: listen, source })?;
        for warning in config
            .warnings
            .iter()
            .cloned()
            .chain(crate::net::config_warnings(&config))
            .chain(crate::policy::config_warnings(&config))
        {
            tracing::warn!("{warning}");
        }
        tracing::info!(policy = %policy.describe(), "policies in force");
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
        let state = build_state(config, keys, store, addr, shutdown, policy);
        if let (crate::policy::Policies::Cedar(current), Some(p)) = (state.policy(), &state.config().policy) {
            crate::policy::watch(current.clone(), p.reload_interval, state.shutdown().clone());
        }
        if state.config().audit.enabled {
            admission.attach_audit(state.audit().clone());
            tokio::spawn(crate::layers::report_unrecorded(admission.clone(), state.shutdown().clone()));
        }
        if let Some(c) = &checkpoints {
            state.audit().watch_checkpoints(c.health());
        }
        let (admin_addr, admin) = match admin_listen {
            Some(at) => match tokio::net::TcpListener::bind(at).await.and_then(|l| Ok((l.local_addr()?, l))) {
                Ok((bound, listener)) => {
                    let router = admin_router(state.clone());
                    let admission = admission.clone();
                    let service = move |peer| crate::layers::stack(admission.clone(), peer, router.clone());
                    let served = crate::listener::serve(listener, settings, service, state.shutdown().clone());
                    tracing::info!(addr = %bound, "admin listener for /metrics and /readyz");
                    (Some(bound), Some(tokio::spawn(served)))
                }
                Err(source) => {
                    state.shutdown().cancel();
                    let _ = task.await;
                    return Err(StartError::Bind { addr: at, source });
                }
            },
            None => (None, None),
        };
        tokio::spawn(metrics_upkeep(state.metrics().clone(), state.shutdown().clone()));
        tokio::spawn(state.authn().tokens().clone().watch(state.store().clone(), state.shutdown().clone()));
        if let Some(vault) = state.vault().cloned() {
            tokio::spawn(vault.run_refresher(state.shutdown().clone()));
            tokio::spawn(sweep_stdio(state.clone(), state.authn().tokens().changes()));
        }
        gate.open(Front { router: router(state.clone()), app: state.clone() });
        tracing::info!(%addr, public_url = %state.public_url(), "portcullis is serving");
        Ok(Gateway { addr, admin_addr, state, task, admin, checkpoints, admission })
    }

    /// Stops accepting, lets in-flight calls finish within `shutdown_grace`, ends streams,
    /// then stops upstream processes.
    pub async fn shutdown(self) {
        let grace = self.state.config().gateway.shutdown_grace;
        self.state.shutdown().cancel();
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
        for server in self.state.servers() {
            server.shutdown().await;
        }
        // After the listeners stopped, so no refusal comes after it.
        self.admission.report_unrecorded();
        // After the listener drained, so every exchange's record is queued; before the store closes.
        self.state.audit().shutdown().await;
        // After the last record is written, so the final checkpoint covers it.
        if let Some(c) = self.checkpoints {
            c.finish().await;
        }
        self.state.store().close().await;
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
fn build_state(
    config: Config,
    keys: KeyRing,
    store: Store,
    addr: SocketAddr,
    shutdown: CancellationToken,
    policy: crate::policy::Policies,
) -> AppState {
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
    let mut server_names: Vec<String> = config.servers.iter().map(|s| s.name.clone()).collect();
    server_names.sort();
    AppState::new(Parts {
        policy,
        server_names: server_names.into(),
        sealer: Sealer::from_ring(&keys.derive("session")),
        config,
        public_url,
        servers,
        hosts,
        authn: Arc::new(Authenticator::new(store.clone(), Clock::system())),
        store,
        clock: Clock::system(),
        metrics: metrics_handle(),
        shutdown,
        audit,
        keys: shared_keys,
        vault,
    })
}

/// The HTTP client for configured upstreams (operator-chosen URLs, so no SSRF guard here;
/// URLs that come from clients or upstreams go through `net` instead).
///
/// Idle pooled connections are dropped after [`UPSTREAM_POOL_IDLE`], before the upstream's own
/// keep-alive timeout ends them: a request written to a connection the server is closing at
/// that moment fails with a reset that cannot be retried (an MCP POST is not idempotent).
/// Node's HTTP server, behind most MCP servers, closes idle connections after 5 s.
fn upstream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(UPSTREAM_POOL_IDLE)
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
            () = app.shutdown().cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        if let Some(vault) = app.vault() {
            vault.forget_cached();
        }
        for server in app.servers() {
            server.sweep().await;
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
            .and_then(|name| self.app.configured(name));
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
        .route("/connect/{server}", get(crate::transport::connect::connect).post(crate::transport::connect::confirm))
        .route("/oauth/callback/{server}", get(crate::transport::connect::callback))
        .route("/oauth/client-metadata.json", get(crate::transport::connect::client_metadata))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz_summary));
    // `/metrics` names every server: with an admin listener it is served only there; without
    // one, the main listener serves it to this host's own clients only.
    let router = if admin { router } else { router.route("/metrics", get(local_metrics)) };
    router.with_state(state.clone()).merge(crate::transport::legacy_sse::routes(state))
}

/// `/metrics` on the main listener (no admin listener configured): for a client on this host
/// (a loopback peer, not relayed by a proxy), else 404 as if there were no such path.
async fn local_metrics(state: State<AppState>) -> Response {
    if !crate::layers::from_this_host() {
        return StatusCode::NOT_FOUND.into_response();
    }
    metrics(state).await
}

/// The admin listener's routes: `/metrics`, the detailed `/readyz` and `/healthz`.
fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `/readyz` on the main listener, for anyone: ready or not, and how many servers are ready,
/// with no server names (those are on the admin listener's `/readyz`).
async fn readyz_summary(State(app): State<AppState>) -> Response {
    let probe = app.probe().await;
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
    let probe = app.probe().await;
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
    let body = app.metrics().render();
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
