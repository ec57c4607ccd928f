//! `[limits]`: what one gateway process lets its clients hold at once, and how long it waits
//! for them. Every limit has a default a production gateway can run with; each refusal is
//! counted in `portcullis_refusals_total{reason}` (see docs/config.md).

use std::time::Duration;

use serde::Deserialize;

use super::{DEFAULT_CLIENT_QUEUE_BYTES, UpstreamLimits};

/// `[limits]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Open client connections at most; further ones are closed as they are accepted.
    /// Default `10000`.
    pub max_connections: usize,
    /// Longest time a client may take to send a request's headers, counted from its first
    /// byte (or from the connection's opening, for its first request). Default `"10s"`.
    pub header_read_timeout: String,
    /// Longest time a connection may stay open with no request in progress and no byte sent
    /// either way. Default `"60s"`.
    pub idle_timeout: String,
    /// Requests in progress at once over the whole gateway (long-lived streams and
    /// `/healthz`, `/readyz`, `/metrics` are not counted); past it, 503 with `Retry-After`.
    /// Default `1024`.
    pub max_in_flight: usize,
    /// Requests in progress at once per principal, counted after authentication (anonymous
    /// callers of public servers per client address); past it, 429 with `Retry-After`.
    /// Default `64`.
    pub max_in_flight_per_principal: usize,
    /// Long-lived streams (a session's GET stream, a legacy SSE connection) open at once per
    /// principal; past it, 429 with `Retry-After`. Default `16`.
    pub max_streams_per_principal: usize,
    /// Requests in progress at once on one legacy SSE session (each POST is answered 202 at
    /// once and its requests handled in the background until their answers are on the
    /// stream); past it, a request is answered with a JSON-RPC error on the stream. Default
    /// `64`.
    pub max_in_flight_per_legacy_session: usize,
    /// Failed authentications a client address may make in a burst before it is limited.
    /// Default `20`.
    pub failed_auth_burst: u32,
    /// Failed authentications per minute a client address earns back (the bucket's refill);
    /// `0` turns the limit off. Default `60`.
    pub failed_auth_per_minute: u32,
    /// Audit records of refusals without a principal (failed authentication, refusals made
    /// before it) a client address may cause in a burst; past it they are counted instead.
    /// Default `20`.
    pub unauthenticated_records_burst: u32,
    /// Such records per minute a client address earns back; `0` records every such refusal.
    /// Default `60`.
    pub unauthenticated_records_per_minute: u32,
    /// Largest answer read from an upstream (a JSON body, one SSE event, one stdio line), in
    /// bytes; servers may override it. Default 16777216 (16 MiB).
    pub max_response_bytes: Option<u64>,
    /// Messages queued toward one stdio process or legacy SSE upstream, and per call or GET
    /// stream from it. Default 64.
    pub upstream_queue: Option<u64>,
    /// Bytes queued toward one legacy SSE client stream before relaying waits. Default
    /// 4194304 (4 MiB).
    pub client_queue_bytes: Option<u64>,
    /// How long a legacy SSE upstream connection may sit unused before it is closed; servers
    /// may override it. Default `"15m"`.
    pub sse_idle_timeout: Option<String>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: 10_000,
            header_read_timeout: "10s".to_owned(),
            idle_timeout: "60s".to_owned(),
            max_in_flight: 1024,
            max_in_flight_per_principal: 64,
            max_streams_per_principal: 16,
            max_in_flight_per_legacy_session: 64,
            failed_auth_burst: 20,
            failed_auth_per_minute: 60,
            unauthenticated_records_burst: 20,
            unauthenticated_records_per_minute: 60,
            max_response_bytes: None,
            upstream_queue: None,
            client_queue_bytes: None,
            sse_idle_timeout: None,
        }
    }
}

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections at most.
    pub max_connections: usize,
    /// Longest wait for a request's headers.
    pub header_read_timeout: Duration,
    /// Longest idle time of a connection.
    pub idle_timeout: Duration,
    /// Requests in progress at once, gateway-wide.
    pub max_in_flight: usize,
    /// Requests in progress at once per principal.
    pub max_in_flight_per_principal: usize,
    /// Long-lived streams open at once per principal.
    pub max_streams_per_principal: usize,
    /// Requests in progress at once on one legacy SSE session.
    pub max_in_flight_per_legacy_session: usize,
    /// Failed authentications per client address in a burst.
    pub failed_auth_burst: u32,
    /// Failed authentications per minute earned back; `0`: no limit.
    pub failed_auth_per_minute: u32,
    /// Audit records of refusals without a principal per client address in a burst.
    pub unauthenticated_records_burst: u32,
    /// Such records per minute earned back; `0`: no limit.
    pub unauthenticated_records_per_minute: u32,
    /// The memory limits servers get unless they set their own (validated with the servers,
    /// in `config::Validator`, since the deprecated `[gateway]` keys may set them too).
    pub upstream: UpstreamLimits,
    /// Bytes queued toward one legacy SSE client stream before relaying waits.
    pub client_queue_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        RawLimits::default().validate().unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }
}

impl RawLimits {
    /// The validated limits, or one line per problem.
    pub fn validate(self) -> Result<Limits, Vec<String>> {
        let mut problems = Vec::new();
        let mut duration = |key: &str, text: &str| match super::parse_duration(text) {
            Some(d) if !d.is_zero() => d,
            _ => {
                problems.push(format!("limits.{key}: {text:?} is not a duration like \"10s\" (above zero)"));
                Duration::from_secs(1)
            }
        };
        let header_read_timeout = duration("header_read_timeout", &self.header_read_timeout);
        let idle_timeout = duration("idle_timeout", &self.idle_timeout);
        for (key, value) in [
            ("max_connections", self.max_connections),
            ("max_in_flight", self.max_in_flight),
            ("max_in_flight_per_principal", self.max_in_flight_per_principal),
            ("max_streams_per_principal", self.max_streams_per_principal),
            ("max_in_flight_per_legacy_session", self.max_in_flight_per_legacy_session),
            ("failed_auth_burst", self.failed_auth_burst as usize),
            ("unauthenticated_records_burst", self.unauthenticated_records_burst as usize),
        ] {
            if value == 0 {
                problems.push(format!("limits.{key} must be at least 1"));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Limits {
            max_connections: self.max_connections,
            header_read_timeout,
            idle_timeout,
            max_in_flight: self.max_in_flight,
            max_in_flight_per_principal: self.max_in_flight_per_principal,
            max_streams_per_principal: self.max_streams_per_principal,
            max_in_flight_per_legacy_session: self.max_in_flight_per_legacy_session,
            failed_auth_burst: self.failed_auth_burst,
            failed_auth_per_minute: self.failed_auth_per_minute,
            unauthenticated_records_burst: self.unauthenticated_records_burst,
            unauthenticated_records_per_minute: self.unauthenticated_records_per_minute,
            upstream: UpstreamLimits::default(),
            client_queue_bytes: DEFAULT_CLIENT_QUEUE_BYTES,
        })
    }
}
