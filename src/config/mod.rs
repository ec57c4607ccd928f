//! Configuration: `raw` holds what users write, this module turns it into a validated
//! [`Config`] and reports every problem at once, each with its location.

mod audit;
mod env;
pub mod limits;
mod oauth;
mod outbound;
pub mod policy;
pub mod raw;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

pub use audit::{
    AuditConfig, DEFAULT_CAPACITY, DEFAULT_CHECKPOINT_FILE, DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_MAX_OVERFLOW_BYTES,
    DEFAULT_REDACT_KEYS, Durability,
};
pub use oauth::{AuthMethod, OAuthConfig};
pub use outbound::OutboundConfig;
use raw::{RawAuth, RawGateway, RawLog, RawServer, RawStore};

/// Default `start_timeout` of a stdio server: long enough for `npx` to fetch a package on a
/// cold cache, short enough that a process that never answers is reported.
pub const DEFAULT_START_TIMEOUT_SECS: u64 = 120;

/// The validated configuration of one gateway.
#[derive(Debug, Clone)]
pub struct Config {
    /// The listener and how the gateway presents itself.
    pub gateway: GatewayConfig,
    /// Where state lives.
    pub store: StoreConfig,
    /// Log format and filter.
    pub log: LogConfig,
    /// Upstream servers, in file order.
    pub servers: Vec<ServerConfig>,
    /// The audit log.
    pub audit: AuditConfig,
    /// The guard on URLs that come from upstreams and clients.
    pub outbound: OutboundConfig,
    /// Connection, concurrency, failed-authentication and memory limits.
    pub limits: limits::Limits,
    /// `[policy]`: the Cedar policies; `None` means the built-in rule (see `policy`).
    pub policy: Option<policy::PolicyConfig>,
    /// Settings that are valid but deserve a warning (deprecated keys, with what to write
    /// instead), one line each with its line number: `check-config` prints them, `serve` logs
    /// them.
    pub warnings: Vec<String>,
}

/// Validated `[gateway]`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Socket address to listen on.
    pub listen: SocketAddr,
    /// The URL clients use; `None` means `http://{bound address}`.
    pub public_url: Option<Url>,
    /// Accepted `Host` values besides the defaults, lower-cased.
    pub allowed_hosts: Vec<String>,
    /// Accepted `Origin` values besides the defaults, lower-cased.
    pub allowed_origins: Vec<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most messages in one JSON-RPC batch.
    pub max_batch: usize,
    /// Longest wait for one upstream answer.
    pub request_timeout: Duration,
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// Key file and default database directory.
    pub data_dir: PathBuf,
    /// Allow `public = true` servers on a non-loopback listener.
    pub force_public_on_non_loopback: bool,
    /// The listener for `/metrics` and the detailed `/readyz`, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Keep a client's own `X-Request-Id`.
    pub trust_request_id: bool,
}

/// Default `limits.max_response_bytes`: 16 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Default `limits.upstream_queue`.
pub const DEFAULT_UPSTREAM_QUEUE: usize = 64;
/// Default `limits.client_queue_bytes`: 4 MiB.
pub const DEFAULT_CLIENT_QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Default `limits.sse_idle_timeout`, in seconds.
pub const DEFAULT_SSE_IDLE_TIMEOUT_SECS: u64 = 15 * 60;

/// What the gateway holds in memory for one upstream, at most (see docs/config.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLimits {
    /// Largest answer read from the upstream: a JSON body, one SSE event, one stdio line.
    /// Larger ones are refused while they are read, with a JSON-RPC error naming the server.
    pub max_response_bytes: usize,
    /// Messages queued toward the upstream's pipe (writers wait for room) and per call or GET
    /// stream from it (notifications past it are shed and counted).
    pub queue_messages: usize,
    /// A legacy SSE upstream connection with no traffic and no open stream for this long is
    /// closed (its client's next message gets 404 and initializes again).
    pub idle_timeout: Duration,
}

impl Default for UpstreamLimits {
    fn default() -> Self {
        UpstreamLimits {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            queue_messages: DEFAULT_UPSTREAM_QUEUE,
            idle_timeout: Duration::from_secs(DEFAULT_SSE_IDLE_TIMEOUT_SECS),
        }
    }
}

/// Validated `[store]`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite://…` or `postgres://…`.
    pub url: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// A tracing filter directive.
    pub level: String,
}

/// One validated upstream server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Endpoint name, unique.
    pub name: String,
    /// How to reach it.
    pub transport: ServerTransport,
    /// Served without client authentication.
    pub public: bool,
    /// Its tools' annotations (`readOnlyHint`, `destructiveHint`, …) are believed by policy.
    pub trusted: bool,
    /// Longest wait for one answer from this server.
    pub request_timeout: Duration,
    /// Credentials the gateway attaches to the upstream.
    pub auth: UpstreamAuth,
    /// Memory limits toward this upstream.
    pub limits: UpstreamLimits,
}

/// How the gateway authenticates to an upstream. The client's own token is never forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// Nothing.
    None,
    /// A stored secret as an HTTP header value.
    StaticHeader {
        /// Secret name.
        secret: String,
        /// Header name.
        header: String,
        /// Text before the secret.
        prefix: String,
    },
    /// A stored secret in a stdio upstream's environment.
    StaticEnv {
        /// Secret name.
        secret: String,
        /// Variable name.
        env: String,
    },
    /// Upstream OAuth through the vault (`oauth` or `client_credentials`).
    OAuth(Box<OAuthConfig>),
}

/// How an upstream is reached.
#[derive(Debug, Clone)]
pub enum ServerTransport {
    /// Streamable HTTP (2025-03-26 and later).
    StreamableHttp {
        /// The MCP endpoint.
        url: Url,
        /// Speak only the stateless 2026-07-28 revision to it (`protocol = "2026-07-28"`).
        stateless: bool,
    },
    /// The legacy HTTP+SSE transport (2024-11-05).
    Sse {
        /// The SSE endpoint (usually ending in `/sse`).
        url: Url,
    },
    /// A child process speaking newline-delimited JSON-RPC on stdin/stdout.
    Stdio {
        /// Program.
        command: String,
        /// Arguments.
        args: Vec<String>,
        /// Extra environment.
        env: BTreeMap<String, String>,
        /// Working directory.
        cwd: Option<PathBuf>,
        /// Longest wait for the process to start and answer `initialize`, apart from
        /// `request_timeout`: a cold `npx` start can take far longer than any one call should.
        start_timeout: Duration,
    },
}

/// Every problem found in a configuration, each prefixed with its location.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem, `file:line: what`.
    pub problems: Vec<String>,
}

impl Config {
    /// Reads, overrides from `PORTCULLIS_…` variables, and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { problems: vec![format!("{}: cannot read: {e}", path.display())] })?;
        Self::parse(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses `text` (named `origin` in messages) with the given environment overrides.
    pub fn parse(
        text: &str,
        origin: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError { problems: vec![format!("{origin}: {}", e.to_string().trim_end())] })?;
        let mut v = Validator { origin, text, problems: Vec::new(), warnings: Vec::new() };
        env::apply_overrides(&mut table, vars, &mut v.problems);
        let spans = Spans::find(text);
        let config = v.config(table, &spans);
        if v.problems.is_empty() {
            // `config` is complete whenever no problem was recorded.
            let config = config.map(|c| Config { warnings: std::mem::take(&mut v.warnings), ..c });
            config.ok_or_else(|| ConfigError { problems: vec![format!("{origin}: invalid")] })
        } else {
            Err(ConfigError { problems: v.problems })
        }
    }
}

/// Byte offsets of each section, used only to point at lines in messages.
#[derive(Default)]
struct Spans {
    sections: BTreeMap<String, usize>,
    servers: Vec<usize>,
}

impl Spans {
    fn find(text: &str) -> Spans {
        #[derive(Deserialize)]
        struct Top {
            gateway: Option<toml::Spanned<toml::Value>>,
            store: Option<toml::Spanned<toml::Value>>,
            log: Option<toml::Spanned<toml::Value>>,
            audit: Option<toml::Spanned<toml::Value>>,
            outbound: Option<toml::Spanned<toml::Value>>,
            limits: Option<toml::Spanned<toml::Value>>,
            policy: Option<toml::Spanned<toml::Value>>,
            servers: Option<Vec<toml::Spanned<toml::Value>>>,
        }
        let Ok(top) = toml::from_str::<Top>(text) else {
            return Spans::default();
        };
        let mut spans = Spans::default();
        for (name, s) in [
            ("gateway", top.gateway),
            ("store", top.store),
            ("log", top.log),
            ("audit", top.audit),
            ("outbound", top.outbound),
            ("limits", top.limits),
            ("policy", top.policy),
        ] {
            if let Some(s) = s {
                spans.sections.insert(name.to_owned(), s.span().start);
            }
        }
        spans.servers = top.servers.unwrap_or_default().iter().map(|s| s.span().start).collect();
        spans
    }
}

struct Validator<'a> {
    origin: &'a str,
    text: &'a str,
    problems: Vec<String>,
    warnings: Vec<String>,
}

impl Validator<'_> {
    fn at(&mut self, offset: Option<usize>, what: &str, msg: impl std::fmt::Display) {
        let line = self.located(offset, what, msg);
        self.problems.push(line);
    }

    /// A warning, without the file's name (`check-config` and `serve` put it in front).
    fn warn_at(&mut self, offset: Option<usize>, what: &str, msg: impl std::fmt::Display) {
        let warning = match self.line(offset) {
            Some(l) => format!("{what} (line {l}): {msg}"),
            None => format!("{what}: {msg}"),
        };
        self.warnings.push(warning);
    }

    fn located(&self, offset: Option<usize>, what: &str, msg: impl std::fmt::Display) -> String {
        match self.line(offset) {
            Some(l) => format!("{}:{l}: {what}: {msg}", self.origin),
            None => format!("{}: {what}: {msg}", self.origin),
        }
    }

    fn line(&self, offset: Option<usize>) -> Option<usize> {
        offset.map(|o| self.text[..o.min(self.text.len())].matches('\n').count() + 1)
    }

    fn section<T: for<'de> Deserialize<'de> + Default>(
        &mut self,
        table: &mut toml::Table,
        name: &str,
        spans: &Spans,
    ) -> T {
        match table.remove(name) {
            None => T::default(),
            Some(value) => value.try_into().unwrap_or_else(|e: toml::de::Error| {
                self.at(spans.sections.get(name).copied(), &format!("[{name}]"), e.message());
                T::default()
            }),
        }
    }

    fn config(&mut self, mut table: toml::Table, spans: &Spans) -> Option<Config> {
        let mut gateway: RawGateway = self.section(&mut table, "gateway", spans);
        let store: RawStore = self.section(&mut table, "store", spans);
        let log: RawLog = self.section(&mut table, "log", spans);
        let audit: AuditConfig = self.section(&mut table, "audit", spans);
        for problem in audit.problems() {
            self.at(spans.sections.get("audit").copied(), "[audit]", problem);
        }
        let outbound: OutboundConfig = self.section(&mut table, "outbound", spans);
        for problem in outbound.problems() {
            self.at(spans.sections.get("outbound").copied(), "[outbound]", problem);
        }
        let policy = match table.contains_key("policy") {
            false => None,
            true => {
                let raw: policy::RawPolicy = self.section(&mut table, "policy", spans);
                raw.validate()
                    .map_err(|problems| {
                        for problem in problems {
                            self.at(spans.sections.get("policy").copied(), "[policy]", problem);
                        }
                    })
                    .ok()
            }
        };
        let mut raw_limits: limits::RawLimits = self.section(&mut table, "limits", spans);
        let at = (spans.sections.get("gateway").copied(), spans.sections.get("limits").copied());
        let (upstream, client_queue_bytes) = self.memory_limits(&mut gateway, &mut raw_limits, at);
        let limits = raw_limits.validate().unwrap_or_else(|problems| {
            for problem in problems {
                self.at(spans.sections.get("limits").copied(), "[limits]", problem);
            }
            limits::Limits::default()
        });
        let limits = limits::Limits { upstream, client_queue_bytes, ..limits };
        let servers = match table.remove("servers") {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items,
            Some(_) => {
                self.at(None, "servers", "must be an array of tables ([[servers]])");
                Vec::new()
            }
        };
        for key in table.keys() {
            self.at(
                None,
                key,
                "unknown top-level key (expected gateway, store, log, audit, outbound, limits, policy, servers)",
            );
        }
        let gateway = self.gateway(gateway, spans.sections.get("gateway").copied());
        let store = StoreConfig {
            url: store.url.unwrap_or_else(|| {
                let dir = gateway.as_ref().map(|g| g.data_dir.clone()).unwrap_or_default();
                format!("sqlite://{}", dir.join("portcullis.db").display())
            }),
        };
        if !(store.url.starts_with("sqlite:") || store.url.starts_with("postgres")) {
            self.at(spans.sections.get("store").copied(), "store.url", "must start with sqlite: or postgres://");
        }
        let log = self.log(log, spans.sections.get("log").copied());
        let mut parsed = Vec::new();
        let mut names = HashSet::new();
        for (i, item) in servers.into_iter().enumerate() {
            let at = spans.servers.get(i).copied();
            let raw: RawServer = match item.try_into() {
                Ok(raw) => raw,
                Err(e) => {
                    self.at(at, &format!("[[servers]] #{}", i + 1), e.message());
                    continue;
                }
            };
            if let Some(s) = self.server(raw, i, at, gateway.as_ref(), limits.upstream) {
                if !names.insert(s.name.clone()) {
                    self.at(at, &format!("server {:?}", s.name), "duplicate name");
                }
                parsed.push(s);
            }
        }
        Some(Config {
            gateway: gateway?,
            store,
            log,
            servers: parsed,
            audit,
            outbound,
            limits,
            policy,
            warnings: Vec::new(),
        })
    }

    fn gateway(&mut self, raw: RawGateway, at: Option<usize>) -> Option<GatewayConfig> {
        let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen: Option<SocketAddr> = listen_text
            .parse()
            .map_err(|_| {
                self.at(at, "gateway.listen", format!("{listen_text:?} is not an address like 127.0.0.1:8080"))
            })
            .ok();
        let public_url = match raw.public_url.as_deref().map(|t| (t, Url::parse(t.trim_end_matches('/')))) {
            None => Some(None),
            Some((_, Ok(u))) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(Some(u)),
            Some((text, _)) => {
                self.at(at, "gateway.public_url", format!("{text:?} is not an http(s) URL"));
                None
            }
        };
        let request_timeout = self.duration(at, "gateway.request_timeout", raw.request_timeout, 300);
        let shutdown_grace = self.duration(at, "gateway.shutdown_grace", raw.shutdown_grace, 30);
        let max_body = raw.max_body_bytes.unwrap_or(4 * 1024 * 1024);
        if max_body < 1024 {
            self.at(at, "gateway.max_body_bytes", "must be at least 1024");
        }
        let admin_listen = match raw.admin_listen.as_deref().map(|t| (t, t.parse::<SocketAddr>())) {
            None => Some(None),
            Some((_, Ok(a))) => Some(Some(a)),
            Some((text, Err(_))) => {
                self.at(at, "gateway.admin_listen", format!("{text:?} is not an address like 127.0.0.1:9090"));
                None
            }
        };
        let mut trusted_proxies = Vec::new();
        for text in raw.trusted_proxies.unwrap_or_default() {
            let net =
                text.parse::<ipnet::IpNet>().or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match net {
                Ok(n) => trusted_proxies.push(n),
                Err(_) => self.at(
                    at,
                    "gateway.trusted_proxies",
                    format!("{text:?} is not an address or network like \"10.0.0.0/8\""),
                ),
            }
        }
        let max_batch = raw.max_batch.unwrap_or(crate::protocol::jsonrpc::MAX_BATCH as u64);
        if !(1..=1000).contains(&max_batch) {
            self.at(at, "gateway.max_batch", "must be between 1 and 1000");
        }
        let lower =
            |v: Option<Vec<String>>| v.unwrap_or_default().into_iter().map(|s| s.to_ascii_lowercase()).collect();
        Some(GatewayConfig {
            listen: listen?,
            force_public_on_non_loopback: raw.force_public_on_non_loopback.unwrap_or(false),
            admin_listen: admin_listen?,
            trusted_proxies,
            trust_request_id: raw.trust_request_id.unwrap_or(false),
            public_url: public_url?,
            allowed_hosts: lower(raw.allowed_hosts),
            allowed_origins: lower(raw.allowed_origins),
            max_body_bytes: usize::try_from(max_body).unwrap_or(usize::MAX),
            max_batch: usize::try_from(max_batch).unwrap_or(usize::MAX),
            request_timeout,
            shutdown_grace,
            data_dir: PathBuf::from(raw.data_dir.unwrap_or_else(|| "portcullis-data".to_owned())),
        })
    }

    /// The memory limits of `[limits]` (what servers get unless they set their own, and the
    /// legacy SSE client queue), also read from their deprecated spellings in `[gateway]`
    /// (with a warning; both at once is an error). `at`: where `[gateway]` and `[limits]` are.
    fn memory_limits(
        &mut self,
        gateway: &mut RawGateway,
        limits: &mut limits::RawLimits,
        at: (Option<usize>, Option<usize>),
    ) -> (UpstreamLimits, usize) {
        let max_response_bytes =
            self.moved("max_response_bytes", gateway.max_response_bytes.take(), limits.max_response_bytes.take(), at);
        let upstream_queue =
            self.moved("upstream_queue", gateway.upstream_queue.take(), limits.upstream_queue.take(), at);
        let client_queue_bytes =
            self.moved("client_queue_bytes", gateway.client_queue_bytes.take(), limits.client_queue_bytes.take(), at);
        let sse_idle_timeout =
            self.moved("sse_idle_timeout", gateway.sse_idle_timeout.take(), limits.sse_idle_timeout.take(), at);
        let (value, key, at) = max_response_bytes;
        let max_response_bytes = self.bytes(at, &key, value, 1024).unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        let (value, key, at) = upstream_queue;
        let mut queue_messages = self.bytes(at, &key, value, 1).unwrap_or(DEFAULT_UPSTREAM_QUEUE);
        if queue_messages > 1_000_000 {
            self.at(at, &key, "must be at most 1000000");
            queue_messages = DEFAULT_UPSTREAM_QUEUE;
        }
        let (value, key, at) = sse_idle_timeout;
        let idle_timeout = self.duration(at, &key, value, DEFAULT_SSE_IDLE_TIMEOUT_SECS);
        if idle_timeout.is_zero() {
            self.at(at, &key, "must be more than 0");
        }
        let (value, key, at) = client_queue_bytes;
        let client_queue_bytes = self.bytes(at, &key, value, 1024).unwrap_or(DEFAULT_CLIENT_QUEUE_BYTES);
        (UpstreamLimits { max_response_bytes, queue_messages, idle_timeout }, client_queue_bytes)
    }

    /// The value of `limits.{name}`, or of its deprecated spelling `gateway.{name}` (noted in
    /// the warnings), with the key and place it was written at.
    fn moved<T>(
        &mut self,
        name: &str,
        old: Option<T>,
        new: Option<T>,
        (at_gateway, at_limits): (Option<usize>, Option<usize>),
    ) -> (Option<T>, String, Option<usize>) {
        let (old_key, new_key) = (format!("gateway.{name}"), format!("limits.{name}"));
        match (old, new) {
            (Some(_), Some(new)) => {
                self.at(at_gateway, &old_key, format!("is also set as {new_key}: keep only {new_key}"));
                (Some(new), new_key, at_limits)
            }
            (Some(old), None) => {
                self.warn_at(at_gateway, &old_key, format!("is deprecated: write it as {new_key} (under [limits])"));
                (Some(old), old_key, at_gateway)
            }
            (None, new) => (new, new_key, at_limits),
        }
    }

    /// A size or count of at least `min` (`None` when unset or refused).
    fn bytes(&mut self, at: Option<usize>, key: &str, raw: Option<u64>, min: u64) -> Option<usize> {
        let n = raw?;
        if n < min {
            self.at(at, key, format!("must be at least {min}"));
            return None;
        }
        Some(usize::try_from(n).unwrap_or(usize::MAX))
    }
}

impl Validator<'_> {
    fn log(&mut self, raw: RawLog, at: Option<usize>) -> LogConfig {
        let format = match raw.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.at(at, "log.format", format!("{other:?} is not \"text\" or \"json\""));
                LogFormat::Text
            }
        };
        let level = raw.level.unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            self.at(at, "log.level", format!("{level:?} is not a valid filter"));
        }
        LogConfig { format, level }
    }

    fn duration(&mut self, at: Option<usize>, key: &str, raw: Option<String>, default_secs: u64) -> Duration {
        match raw {
            None => Duration::from_secs(default_secs),
            Some(text) => parse_duration(&text).unwrap_or_else(|| {
                self.at(at, key, format!("{text:?} is not a duration like \"30s\", \"500ms\" or \"5m\""));
                Duration::from_secs(default_secs)
            }),
        }
    }

    fn server(
        &mut self,
        raw: RawServer,
        index: usize,
        at: Option<usize>,
        gateway: Option<&GatewayConfig>,
        inherited: UpstreamLimits,
    ) -> Option<ServerConfig> {
        let what = match &raw.name {
            Some(n) => format!("server {n:?}"),
            None => format!("[[servers]] #{}", index + 1),
        };
        let name = raw.name.clone().unwrap_or_default();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && name.as_bytes()[0].is_ascii_alphanumeric();
        if raw.name.is_none() {
            self.at(at, &what, "missing `name`");
        } else if !valid_name {
            self.at(at, &what, "`name` must be 1-64 of a-z, 0-9, '-' or '_', starting with a letter or digit");
        }
        let transport = match (raw.url, raw.command) {
            (Some(_), Some(_)) => {
                self.at(at, &what, "set either `url` or `command`, not both");
                None
            }
            (None, None) => {
                self.at(at, &what, "set `url` (HTTP upstream) or `command` (stdio upstream)");
                None
            }
            (Some(url), None) => {
                if raw.args.is_some() || raw.env.is_some() || raw.cwd.is_some() || raw.start_timeout.is_some() {
                    self.at(at, &what, "`args`, `env`, `cwd` and `start_timeout` apply only to `command`");
                }
                let stateless = match raw.protocol.as_deref() {
                    None | Some("auto") => false,
                    Some("2026-07-28") if raw.transport.as_deref() != Some("sse") => true,
                    Some(other) => {
                        self.at(
                            at,
                            &what,
                            format!("protocol {other:?} is not \"auto\" or \"2026-07-28\" (Streamable HTTP only)"),
                        );
                        false
                    }
                };
                match Url::parse(&url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                        match raw.transport.as_deref() {
                            None | Some("streamable-http") => {
                                Some(ServerTransport::StreamableHttp { url: u, stateless })
                            }
                            Some("sse") => Some(ServerTransport::Sse { url: u }),
                            Some(other) => {
                                self.at(
                                    at,
                                    &what,
                                    format!("transport {other:?} is not \"streamable-http\" or \"sse\""),
                                );
                                None
                            }
                        }
                    }
                    _ => {
                        self.at(at, &what, format!("url {url:?} is not an http(s) URL"));
                        None
                    }
                }
            }
            (None, Some(command)) => {
                if raw.transport.is_some() || raw.protocol.is_some() {
                    self.at(at, &what, "`transport` and `protocol` apply only to `url`");
                }
                if command.trim().is_empty() {
                    self.at(at, &what, "`command` is empty");
                }
                let start_timeout =
                    self.duration(at, &format!("{what}: start_timeout"), raw.start_timeout, DEFAULT_START_TIMEOUT_SECS);
                Some(ServerTransport::Stdio {
                    command,
                    args: raw.args.unwrap_or_default(),
                    env: raw.env.unwrap_or_default(),
                    cwd: raw.cwd.map(PathBuf::from),
                    start_timeout,
                })
            }
        };
        let public = raw.public.unwrap_or(false);
        if let Some(g) = gateway
            && public
            && !g.listen.ip().is_loopback()
            && !g.force_public_on_non_loopback
        {
            self.at(
                at,
                &what,
                "`public = true` needs a loopback listener (or gateway.force_public_on_non_loopback = true)",
            );
        }
        let default_timeout = gateway.map(|g| g.request_timeout).unwrap_or(Duration::from_secs(300));
        let request_timeout = match raw.request_timeout {
            None => default_timeout,
            Some(t) => self.duration(at, &format!("{what}: request_timeout"), Some(t), 300),
        };
        let stdio = matches!(transport, Some(ServerTransport::Stdio { .. }));
        let mut limits = inherited;
        if let Some(n) = self.bytes(at, &format!("{what}: max_response_bytes"), raw.max_response_bytes, 1024) {
            limits.max_response_bytes = n;
        }
        if let Some(t) = raw.idle_timeout {
            if !matches!(transport, Some(ServerTransport::Sse { .. })) {
                self.at(at, &what, "`idle_timeout` applies only to `transport = \"sse\"`");
            }
            limits.idle_timeout = self.duration(at, &format!("{what}: idle_timeout"), Some(t), 0);
            if limits.idle_timeout.is_zero() {
                self.at(at, &what, "`idle_timeout` must be more than 0");
            }
        }
        let auth = self.auth(raw.auth, stdio, at, &what);
        if public && matches!(auth, Some(UpstreamAuth::OAuth(_))) {
            // Anonymous callers have no identity to hold a connection (nor to be handed one).
            self.at(at, &what, "`public = true` cannot be combined with OAuth upstream credentials");
        }
        if matches!(transport, Some(ServerTransport::Sse { .. })) && matches!(auth, Some(UpstreamAuth::OAuth(_))) {
            self.at(at, &what, "OAuth upstreams need the Streamable HTTP transport (not transport = \"sse\")");
        }
        let trusted = raw.trusted.unwrap_or(false);
        Some(ServerConfig { name, transport: transport?, public, trusted, request_timeout, auth: auth?, limits })
            .filter(|_| valid_name)
    }

    fn auth(&mut self, raw: Option<RawAuth>, stdio: bool, at: Option<usize>, what: &str) -> Option<UpstreamAuth> {
        let Some(raw) = raw else { return Some(UpstreamAuth::None) };
        let what = format!("{what}: auth");
        match raw.kind.as_deref() {
            Some("none") => Some(UpstreamAuth::None),
            Some("static") => {
                let Some(secret) = raw.secret else {
                    self.at(at, &what, "`static` needs `secret` (a name from `portcullis secret set`)");
                    return None;
                };
                match (stdio, raw.header, raw.env) {
                    (_, Some(_), Some(_)) => {
                        self.at(at, &what, "set `header` (HTTP upstreams) or `env` (stdio upstreams), not both");
                        None
                    }
                    (true, Some(_), None) | (true, None, None) => {
                        self.at(at, &what, "a stdio upstream takes its secret in `env = \"VARIABLE\"`");
                        None
                    }
                    (false, _, Some(_)) => {
                        self.at(at, &what, "an HTTP upstream takes its secret in `header`, not `env`");
                        None
                    }
                    (true, None, Some(env)) => Some(UpstreamAuth::StaticEnv { secret, env }),
                    (false, header, None) => {
                        let header = header.unwrap_or_else(|| "Authorization".to_owned());
                        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                            self.at(at, &what, format!("{header:?} is not a header name"));
                            return None;
                        }
                        let default_prefix = if header.eq_ignore_ascii_case("authorization") { "Bearer " } else { "" };
                        let prefix = raw.prefix.unwrap_or_else(|| default_prefix.to_owned());
                        Some(UpstreamAuth::StaticHeader { secret, header, prefix })
                    }
                }
            }
            Some(kind @ ("oauth" | "client_credentials")) => {
                let machine = kind == "client_credentials";
                self.oauth(raw, machine, stdio, at, &what)
            }
            Some(other) => {
                self.at(
                    at,
                    &what,
                    format!(
                        "type {other:?} is not supported (\"none\", \"static\", \"oauth\" or \"client_credentials\")"
                    ),
                );
                None
            }
            None => {
                self.at(at, &what, "missing `type`");
                None
            }
        }
    }
}

impl Validator<'_> {
    fn oauth(
        &mut self,
        raw: RawAuth,
        machine: bool,
        stdio: bool,
        at: Option<usize>,
        what: &str,
    ) -> Option<UpstreamAuth> {
        let mut ok = true;
        if raw.secret.is_some() || raw.header.is_some() || raw.prefix.is_some() {
            self.at(at, what, "`secret`, `header` and `prefix` belong to `static`");
            ok = false;
        }
        match (stdio, &raw.env, &raw.metadata_url) {
            (true, Some(_), Some(_)) | (false, None, _) => {}
            (true, None, _) => {
                self.at(at, what, "a stdio upstream takes its access token in `env = \"VARIABLE\"`");
                ok = false;
            }
            (true, Some(_), None) => {
                self.at(at, what, "a stdio upstream has no URL to discover from: set `metadata_url`");
                ok = false;
            }
            (false, Some(_), _) => {
                self.at(at, what, "`env` applies to stdio upstreams; an HTTP upstream gets the token in its header");
                ok = false;
            }
        }
        if machine && raw.client_id.is_none() {
            self.at(at, what, "`client_credentials` needs `client_id` (and usually `client_secret`)");
            ok = false;
        }
        if machine && raw.per_user == Some(true) {
            self.at(at, what, "`client_credentials` is one shared connection; `per_user` does not apply");
            ok = false;
        }
        if raw.client_secret.is_some() && raw.client_id.is_none() {
            self.at(at, what, "`client_secret` needs `client_id`");
            ok = false;
        }
        if raw.client_secret.is_some() && raw.issuer.is_none() && raw.metadata_url.is_none() {
            self.at(
                at,
                what,
                "`client_secret` needs `issuer` (or `metadata_url`): the client's secret goes only to the authorization server it belongs to",
            );
            ok = false;
        }
        if raw.issuer.is_some() && raw.client_id.is_none() {
            self.at(at, what, "`issuer` pins a pre-registered client: it needs `client_id`");
            ok = false;
        }
        let method = match raw.token_endpoint_auth_method.as_deref() {
            None => None,
            Some(m) => {
                match AuthMethod::parse(m) {
                    Some(m) => Some(m),
                    None => {
                        self.at(
                        at,
                        what,
                        format!("token_endpoint_auth_method {m:?} is not client_secret_basic, client_secret_post or none"),
                    );
                        ok = false;
                        None
                    }
                }
            }
        };
        let metadata_url = match raw.metadata_url.as_deref() {
            None => None,
            Some(u) => match Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "https" | "http") => Some(url),
                _ => {
                    self.at(at, what, format!("metadata_url {u:?} is not an http(s) URL"));
                    ok = false;
                    None
                }
            },
        };
        let (mut resource_parameter, mut scope_on_refresh) = (true, false);
        match raw.provider.as_deref() {
            None | Some("generic") => {}
            Some("entra") => {
                resource_parameter = false;
                scope_on_refresh = true;
            }
            Some(other) => {
                self.at(at, what, format!("provider {other:?} is not \"generic\" or \"entra\""));
                ok = false;
            }
        }
        if let Some(r) = &raw.resource
            && !Url::parse(r).is_ok_and(|u| u.fragment().is_none() && matches!(u.scheme(), "https" | "http"))
        {
            self.at(at, what, format!("resource {r:?} is not an http(s) URL without a fragment"));
            ok = false;
        }
        let scopes = raw.scopes.unwrap_or_default();
        if scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
            self.at(at, what, "each scope must be one non-empty word");
            ok = false;
        }
        let config = OAuthConfig {
            per_user: !machine && raw.per_user.unwrap_or(true),
            client_credentials: machine,
            scopes,
            client_id: raw.client_id,
            issuer: raw.issuer,
            client_secret: raw.client_secret,
            token_endpoint_auth_method: method,
            metadata_url,
            authorization_params: raw.authorization_params.unwrap_or_default(),
            resource_parameter: raw.resource_parameter.unwrap_or(resource_parameter),
            scope_on_refresh: raw.scope_on_refresh.unwrap_or(scope_on_refresh),
            env: raw.env,
            resource: raw.resource,
        };
        ok.then(|| UpstreamAuth::OAuth(Box::new(config)))
    }
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"90d"` (a bare number means seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "d" => n.checked_mul(86_400).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
