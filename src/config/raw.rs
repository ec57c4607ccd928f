//! What users write: serde structs that mirror `portcullis.toml` one to one.
//!
//! Every struct denies unknown keys; every field names its default in its `///` line, and
//! `docs/config.md` lists the same keys. Validation lives in `super::validate`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[gateway]`: the listener and how the gateway presents itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// Socket address to listen on. Default `127.0.0.1:8080`.
    pub listen: Option<String>,
    /// The URL clients use to reach the gateway. Default `http://{listen}`.
    pub public_url: Option<String>,
    /// Extra `Host` header values accepted besides the public URL's host (and loopback names
    /// when the listener is loopback). Default none.
    pub allowed_hosts: Option<Vec<String>>,
    /// Extra `Origin` values accepted besides the public URL's origin. Default none.
    pub allowed_origins: Option<Vec<String>>,
    /// Largest accepted request body in bytes. Default 4194304 (4 MiB).
    pub max_body_bytes: Option<u64>,
    /// Most messages in one JSON-RPC batch (2024-11-05 and 2025-03-26 sessions only). Default 32.
    pub max_batch: Option<u64>,
    /// Longest wait for an upstream's answer to one request, e.g. `"300s"`. Default `"300s"`.
    pub request_timeout: Option<String>,
    /// How long a graceful shutdown waits for in-flight calls. Default `"30s"`.
    pub shutdown_grace: Option<String>,
    /// Directory for the key file and the default SQLite database. Default `portcullis-data`.
    pub data_dir: Option<String>,
    /// Allow `public = true` servers on a non-loopback listener. Default `false`.
    pub force_public_on_non_loopback: Option<bool>,
    /// A second listener for `/metrics`, `/readyz` (with each server's state) and `/healthz`,
    /// e.g. `"127.0.0.1:9090"`; when set, the main listener no longer serves `/metrics`.
    /// Default none.
    pub admin_listen: Option<String>,
    /// Addresses or networks of reverse proxies whose `X-Forwarded-For` is believed for the
    /// client address (failed-authentication limits). Default none: the peer address is used.
    pub trusted_proxies: Option<Vec<String>>,
    /// Keep a client's own `X-Request-Id` (visible ASCII, at most 128 bytes) instead of making
    /// one. Default `false`.
    pub trust_request_id: Option<bool>,
    /// Deprecated spelling of `limits.max_response_bytes` (still read, with a warning).
    pub max_response_bytes: Option<u64>,
    /// Deprecated spelling of `limits.upstream_queue` (still read, with a warning).
    pub upstream_queue: Option<u64>,
    /// Deprecated spelling of `limits.client_queue_bytes` (still read, with a warning).
    pub client_queue_bytes: Option<u64>,
    /// Deprecated spelling of `limits.sse_idle_timeout` (still read, with a warning).
    pub sse_idle_timeout: Option<String>,
}

/// `[store]`: where state lives.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `sqlite://PATH` or `postgres://…`. Default `sqlite://{data_dir}/portcullis.db`.
    pub url: Option<String>,
}

/// `[log]`: structured logs on stderr.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `"text"` or `"json"`. Default `"text"`.
    pub format: Option<String>,
    /// A tracing filter such as `"info"` or `"portcullis=debug"`. Default `"info"`
    /// (`RUST_LOG` wins when set).
    pub level: Option<String>,
}

/// One `[[servers]]` entry: an upstream MCP server.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Endpoint name: the server is served at `{public_url}/mcp/{name}`. Required.
    pub name: Option<String>,
    /// HTTP upstream URL (Streamable HTTP, or legacy SSE with `transport = "sse"`).
    pub url: Option<String>,
    /// `"streamable-http"` or `"sse"` (legacy HTTP+SSE). Default `"streamable-http"`; only
    /// with `url`.
    pub transport: Option<String>,
    /// `"auto"` (try `initialize`, fall back to `server/discover`) or `"2026-07-28"` (speak only
    /// the stateless revision). Default `"auto"`; only with `url`.
    pub protocol: Option<String>,
    /// Program to run for a stdio upstream.
    pub command: Option<String>,
    /// Arguments for `command`. Default none.
    pub args: Option<Vec<String>>,
    /// Extra environment for `command`. Default none (the gateway's own environment is
    /// not passed on except `PATH`, `HOME`, `LANG`, `TMPDIR` and `USER`).
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory for `command`. Default the gateway's own.
    pub cwd: Option<String>,
    /// Longest wait for `command` to start and answer `initialize`. Default `"120s"`; only
    /// with `command`.
    pub start_timeout: Option<String>,
    /// Serve without client authentication (local single-user setups). Default `false`.
    pub public: Option<bool>,
    /// Believe the tool annotations this server lists (`readOnlyHint`, `destructiveHint`, …)
    /// in policy decisions (`resource.annotations`). Default `false`: only for servers whose
    /// tool definitions you control or trust.
    pub trusted: Option<bool>,
    /// Per-server override of `gateway.request_timeout`. Default unset.
    pub request_timeout: Option<String>,
    /// Per-server override of `limits.max_response_bytes`. Default unset.
    pub max_response_bytes: Option<u64>,
    /// With `transport = "sse"`: per-server override of `limits.sse_idle_timeout`. Default
    /// unset.
    pub idle_timeout: Option<String>,
    /// Credentials the gateway attaches to this upstream. Default none.
    pub auth: Option<RawAuth>,
}

/// `auth = { … }` of a server: how the gateway authenticates to the upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// `"none"` or `"static"`. Required.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// With `static`: the name of a secret stored with `portcullis secret set NAME`.
    pub secret: Option<String>,
    /// With `static` on an HTTP upstream: the header to send. Default `"Authorization"`.
    pub header: Option<String>,
    /// With `header`: text before the secret. Default `"Bearer "` for `Authorization`, else none.
    pub prefix: Option<String>,
    /// With `static` on a stdio upstream: the environment variable to set. Required there.
    pub env: Option<String>,
    /// With `oauth`: each person connects their own account (`true`, default) or one shared
    /// connection an admin makes (`false`).
    pub per_user: Option<bool>,
    /// With `oauth`/`client_credentials`: scopes always asked for.
    pub scopes: Option<Vec<String>>,
    /// A pre-registered client id.
    pub client_id: Option<String>,
    /// The issuer the pre-registered client belongs to.
    pub issuer: Option<String>,
    /// The stored secret (name) holding the pre-registered client's secret.
    pub client_secret: Option<String>,
    /// `client_secret_basic`, `client_secret_post` or `none` for the pre-registered client.
    pub token_endpoint_auth_method: Option<String>,
    /// The authorization server metadata URL, instead of discovery.
    pub metadata_url: Option<String>,
    /// Extra authorization request parameters.
    pub authorization_params: Option<std::collections::BTreeMap<String, String>>,
    /// Send RFC 8707 `resource` (default `true`; Entra ID v2 needs `false`).
    pub resource_parameter: Option<bool>,
    /// Send `scope` on refresh (default `false`; Entra ID needs `true`).
    pub scope_on_refresh: Option<bool>,
    /// Named provider quirks: `"entra"` (no `resource`, `scope` on refresh).
    pub provider: Option<String>,
    /// The resource indicator to ask tokens for when the upstream does not say (stdio).
    pub resource: Option<String>,
}
