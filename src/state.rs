//! The gateway's shared state: one cheap handle ([`AppState`]) to the configuration, the
//! servers, the store, the keys, authentication, the audit writer and the vault, passed to
//! every handler. Built once by `app`; below `transport` and above `mcp` and `authn`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::audit::AuditWriter;
use crate::authn::Authenticator;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::GatewayError;
use crate::keys::SharedKeyRing;
use crate::mcp::Server;
use crate::origin::HostPolicy;
use crate::protocol::session::Sealer;
use crate::store::Store;
use crate::vault::Vault;

/// What the shared state is made of; `app` builds it once at start.
pub struct Parts {
    /// The validated configuration.
    pub config: Config,
    /// The URL clients use, resolved against the bound address.
    pub public_url: Url,
    /// The configured servers by name.
    pub servers: HashMap<String, Arc<Server>>,
    /// Seals and opens session ids.
    pub sealer: Sealer,
    /// The DNS-rebinding guard.
    pub hosts: HostPolicy,
    /// The store.
    pub store: Store,
    /// The clock.
    pub clock: Clock,
    /// The metrics recorder's handle (renders `/metrics`).
    pub metrics: PrometheusHandle,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    /// The audit log writer.
    pub audit: AuditWriter,
    /// The master key ring.
    pub keys: SharedKeyRing,
    /// Authentication of grant tokens.
    pub authn: Arc<Authenticator>,
    /// The vault, when some server uses upstream OAuth.
    pub vault: Option<Arc<Vault>>,
    /// The policies in force.
    pub policy: crate::policy::Policies,
    /// Every configured server's name, sorted.
    pub server_names: Arc<[String]>,
}

struct Inner {
    parts: Parts,
    /// The last readiness probe, reused for [`PROBE_TTL`].
    probe: tokio::sync::Mutex<Option<(Instant, Probe)>>,
}

/// How long a readiness probe's result is reused: however often `/readyz` is asked, the
/// store and the upstreams are probed at most once per this interval.
const PROBE_TTL: Duration = Duration::from_secs(2);

/// One readiness probe: the store, and each server by name (with its error, if any).
#[derive(Clone)]
pub struct Probe {
    /// The store's answer.
    pub store: Result<(), String>,
    /// Each server's answer, by name.
    pub servers: Vec<(String, Result<(), String>)>,
}

impl Probe {
    /// Everything answered.
    pub fn ready(&self) -> bool {
        self.store.is_ok() && self.servers.iter().all(|(_, r)| r.is_ok())
    }
}

/// Shared state: a cheap handle, passed to every handler.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// The shared state of `parts`.
    pub fn new(parts: Parts) -> AppState {
        AppState(Arc::new(Inner { parts, probe: Default::default() }))
    }

    /// The policies in force.
    pub fn policy(&self) -> &crate::policy::Policies {
        &self.0.parts.policy
    }

    /// Authentication of grant tokens.
    pub fn authn(&self) -> &Arc<Authenticator> {
        &self.0.parts.authn
    }

    /// The configured servers.
    pub fn servers(&self) -> impl Iterator<Item = &Arc<Server>> {
        self.0.parts.servers.values()
    }

    /// The server configured at exactly `name`, if any (the fast path's lookup).
    pub fn configured(&self, name: &str) -> Option<&Arc<Server>> {
        self.0.parts.servers.get(name)
    }

    /// The metrics recorder's handle.
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.0.parts.metrics
    }

    /// What the dispatch needs of the gateway around it.
    pub fn env(&self) -> crate::mcp::Env<'_> {
        let parts = &self.0.parts;
        crate::mcp::Env {
            clock: &parts.clock,
            sealer: &parts.sealer,
            audit: parts.config.audit.enabled.then_some(&parts.audit),
            policy: &parts.policy,
            servers: &parts.server_names,
        }
    }

    /// The last readiness probe, or a new one if it is older than [`PROBE_TTL`]. Concurrent
    /// callers wait for one probe rather than each making their own.
    pub async fn probe(&self) -> Probe {
        let mut cached = self.0.probe.lock().await;
        if let Some((at, probe)) = cached.as_ref()
            && at.elapsed() < PROBE_TTL
        {
            return probe.clone();
        }
        let store = self.0.parts.store.ping().await.map_err(|e| e.to_string());
        let checks = self.servers().map(|s| async move {
            let r = tokio::time::timeout(Duration::from_secs(10), s.ready()).await;
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

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.0.parts.config
    }

    /// The URL clients use, resolved against the bound address.
    pub fn public_url(&self) -> &Url {
        &self.0.parts.public_url
    }

    /// The vault, when some server uses upstream OAuth.
    pub fn vault(&self) -> Option<&Arc<Vault>> {
        self.0.parts.vault.as_ref()
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Result<Arc<Server>, GatewayError> {
        self.0
            .parts
            .servers
            .get(name)
            .cloned()
            .ok_or_else(|| GatewayError::UnknownServer(name.chars().take(64).collect()))
    }

    /// Seals and opens session ids.
    pub fn sealer(&self) -> &Sealer {
        &self.0.parts.sealer
    }

    /// The DNS-rebinding guard.
    pub fn hosts(&self) -> &HostPolicy {
        &self.0.parts.hosts
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.0.parts.clock
    }

    /// The audit log writer.
    pub fn audit(&self) -> &AuditWriter {
        &self.0.parts.audit
    }

    /// The master key ring (reloaded from its source when a row names a key it lacks).
    pub fn keys(&self) -> &SharedKeyRing {
        &self.0.parts.keys
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.0.parts.store
    }

    /// Cancelled when shutdown begins; long streams end on it.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.0.parts.shutdown
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
        match server {
            Some(s) => s.observe(method, status, elapsed),
            None => {
                let (counter, histogram) = crate::mcp::server::request_metrics(name, method, status);
                counter.increment(1);
                histogram.record(elapsed.as_secs_f64());
            }
        }
    }
}
