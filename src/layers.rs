//! The layers every request passes through, whatever it is for (the MCP fast path of
//! `app::Front` included), applied by one service, [`Admit`], built by [`stack`]:
//!
//! 1. a request id: made (UUID v7) or, with `gateway.trust_request_id`, kept from the client's
//!    `X-Request-Id`; put in the request's tracing span, the `X-Request-Id` response header and
//!    (through [`RequestId::current`]) the audit record;
//! 2. exactly one `Authorization` header, else 400;
//! 3. the gateway-wide limit on requests in progress (503 with `Retry-After`);
//! 4. a task-local [`Scope`] in which authentication adds the per-principal limits (429 with
//!    `Retry-After`): requests in progress, and long-lived streams;
//! 5. panics caught into a 500 with a JSON-RPC error body.
//!
//! Permits are held until the response body ends, so a streamed answer counts for as long as
//! it streams. The connection-level limits (open connections, header-read and idle timeouts)
//! are in `listener`.
//!
//! Refusals leave audit records: those made here (2 and 3) directly, with the request id and
//! the server named in the path; those made after authentication with the principal (see
//! [`admitted_principal`]). A refusal that has no principal is recorded only while its client
//! address has record budget left ([`may_record_unauthenticated`]), so that a flood of
//! unauthenticated requests is counted (`portcullis_audit_unrecorded_total`, and one
//! `audit/unrecorded` record per [`UNRECORDED_EVERY`]) rather than written row by row.
//!
//! Every request pays for these, so they are written to cost little: one allocation for the
//! scope and one for the response body that holds the permits, atomic counters rather than
//! semaphores, and request ids made from a counter (see [`RequestId::generate`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body::Frame;

use crate::audit::Decision;
use crate::authn::{Principal, PrincipalKind};
use crate::config::Config;
use crate::error::{Failure, GatewayError, Limit};

/// The request id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Client addresses remembered by the failed-authentication limit at most; past it, those
/// whose bucket is full again are forgotten (and if none is, all are).
const ADDRESSES_CAP: usize = 100_000;
/// How often the count of refusals left out of the audit log is written to it (as one
/// `audit/unrecorded` record), when there were any; and once more at shutdown.
pub const UNRECORDED_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// The method of the record that says how many refusals were left out of the audit log.
pub const UNRECORDED_METHOD: &str = "audit/unrecorded";

/// The id of one request, as sent back in `X-Request-Id` and written in its audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(Repr);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Repr {
    /// Made here: a UUID v7, hyphenated (ASCII), kept inline so that copies cost no allocation.
    Made([u8; 36]),
    /// A trusted client's own (visible ASCII, at most 128 bytes).
    Given(HeaderValue),
}

impl RequestId {
    /// The id of the request being handled by the current task, if it came through [`stack`].
    pub fn current() -> Option<RequestId> {
        SCOPE.try_with(|s| s.request_id.clone()).ok()
    }

    /// A fresh id: a UUID v7 (RFC 9562), time-ordered, so records sort by it.
    ///
    /// Its 74 bits after the millisecond timestamp are a random prefix drawn once per process
    /// (42 bits) and a counter (32 bits): ids of one process never repeat and stay in order
    /// within a millisecond, and two replicas share a prefix with a chance of one in 4·10¹²
    /// (RFC 9562's "fixed bit-length dedicated counter", method 1). Making one costs a clock
    /// read and an atomic increment instead of a draw from the random generator per request.
    pub fn generate() -> RequestId {
        static PREFIX: OnceLock<Option<[u8; 6]>> = OnceLock::new();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let prefix = PREFIX.get_or_init(|| {
            let mut prefix = [0u8; 6];
            getrandom::fill(&mut prefix).ok().map(|()| prefix)
        });
        let uuid = match prefix {
            Some(p) => {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes();
                let tail = [p[0], p[1], p[2], p[3], p[4], p[5], n[0], n[1], n[2], n[3]];
                let millis = u64::try_from(crate::clock::Clock::system().unix_millis()).unwrap_or(0);
                uuid::Builder::from_unix_timestamp_millis(millis, &tail).into_uuid()
            }
            // No randomness for the prefix: each id draws its own.
            None => uuid::Uuid::now_v7(),
        };
        let mut text = [0u8; 36];
        uuid.hyphenated().encode_lower(&mut text);
        RequestId(Repr::Made(text))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Made(text) => std::str::from_utf8(text).unwrap_or_default(),
            Repr::Given(value) => value.to_str().unwrap_or_default(),
        }
    }

    /// The id as a header value.
    pub fn header_value(&self) -> HeaderValue {
        match &self.0 {
            Repr::Made(text) => HeaderValue::from_bytes(text).unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            Repr::Given(value) => value.clone(),
        }
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one request holds while it is handled, reachable from the handlers' task. The
/// permits it holds are given back when it is dropped: after the response body ends (or is
/// dropped) and the handler's future is gone.
struct Scope {
    admission: Arc<Admission>,
    request_id: RequestId,
    /// The client's address (the peer, or the first untrusted hop of `X-Forwarded-For`).
    client: IpAddr,
    /// The connection's peer address.
    peer: IpAddr,
    /// Whether the request carries a header a forwarding proxy adds (looked at for
    /// `/metrics` only).
    forwarded: bool,
    /// The principal a per-principal limit refused.
    principal: Mutex<Option<Principal>>,
    /// A long-lived stream (GET under `/mcp/`): counted against the stream limit, not the
    /// request limits.
    stream: bool,
    /// Whether it holds one of the gateway-wide permits.
    permit: bool,
    /// The per-principal permit taken after authentication.
    held: OnceLock<Held>,
    /// A failed-authentication token was taken ahead of a store lookup (and is given back if
    /// the token turns out valid).
    charged: AtomicBool,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.permit {
            self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// The limits' shared state, one per gateway.
pub struct Admission {
    max_in_flight: usize,
    /// Requests in progress that hold a gateway-wide permit (streams and probes do not).
    in_flight: AtomicUsize,
    per_principal: usize,
    principals: Counts,
    per_principal_streams: usize,
    streams: Counts,
    failed: Option<Buckets>,
    trusted_proxies: Vec<ipnet::IpNet>,
    trust_request_id: bool,
    /// Budgets of audit records of refusals without a principal, per client address.
    records: Option<Buckets>,
    /// The refusals left out of the audit log since the last `audit/unrecorded` record.
    unrecorded: Mutex<Option<Unrecorded>>,
    /// The audit log, once the store is open (`None` with `[audit] enabled = false`).
    audit: std::sync::OnceLock<crate::audit::AuditWriter>,
    /// Configured server names (a refusal's record names the server only if it is one).
    servers: std::collections::HashSet<String>,
}

/// Refusals left out of the audit log, counted until they are reported.
#[derive(Debug, Clone, Copy)]
struct Unrecorded {
    count: u64,
    from_ms: i64,
    to_ms: i64,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

impl Admission {
    /// The limits of `config`.
    pub fn new(config: &Config) -> Arc<Admission> {
        let limits = &config.limits;
        let failed = (limits.failed_auth_per_minute > 0).then(|| Buckets {
            burst: f64::from(limits.failed_auth_burst),
            per_sec: f64::from(limits.failed_auth_per_minute) / 60.0,
            map: DashMap::new(),
        });
        let records = (limits.unauthenticated_records_per_minute > 0).then(|| Buckets {
            burst: f64::from(limits.unauthenticated_records_burst),
            per_sec: f64::from(limits.unauthenticated_records_per_minute) / 60.0,
            map: DashMap::new(),
        });
        Arc::new(Admission {
            records,
            unrecorded: Mutex::new(None),
            audit: std::sync::OnceLock::new(),
            servers: config.servers.iter().map(|s| s.name.clone()).collect(),
            max_in_flight: limits.max_in_flight,
            in_flight: AtomicUsize::new(0),
            per_principal: limits.max_in_flight_per_principal,
            principals: Counts::default(),
            per_principal_streams: limits.max_streams_per_principal,
            streams: Counts::default(),
            failed,
            trusted_proxies: config.gateway.trusted_proxies.clone(),
            trust_request_id: config.gateway.trust_request_id,
        })
    }

    /// Gives the layers the audit log, once the store is open: refusals made before then are
    /// not recorded (the gateway answers 503 to everything but probes until it is ready).
    pub fn attach_audit(&self, writer: crate::audit::AuditWriter) {
        let _ = self.audit.set(writer);
    }

    /// Whether a refusal without a principal from `client` may be written to the audit log:
    /// takes one record from the address's budget, or counts the refusal as unrecorded.
    fn may_record(&self, client: IpAddr) -> bool {
        let Some(records) = self.records.as_ref() else { return true };
        if records.take(client).is_none() {
            return true;
        }
        metrics::counter!("portcullis_audit_unrecorded_total").increment(1);
        let now = crate::clock::Clock::system().unix_millis();
        let mut unrecorded = self.unrecorded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match unrecorded.as_mut() {
            Some(u) => {
                u.count += 1;
                u.to_ms = now;
            }
            None => *unrecorded = Some(Unrecorded { count: 1, from_ms: now, to_ms: now }),
        }
        false
    }

    /// Writes the record saying how many refusals were left out of the audit log since the
    /// last such record, if any were.
    pub fn report_unrecorded(&self) {
        if let (Some(audit), Some(record)) = (self.audit.get(), self.unrecorded_record()) {
            audit.record(record);
        }
    }

    /// The record saying how many refusals were left out of the audit log since the last one,
    /// if any were.
    fn unrecorded_record(&self) -> Option<crate::audit::Record> {
        let u = self.unrecorded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()?;
        let now = crate::clock::Clock::system().unix_millis();
        let details = serde_json::json!({
            "unrecorded": u.count,
            "from_ms": u.from_ms,
            "to_ms": u.to_ms,
            "reason": "limits.unauthenticated_records_per_minute",
        });
        Some(crate::audit::Record {
            arguments: crate::audit::Arguments::new(details),
            ..crate::audit::Record::new(now, RequestId::generate().as_str(), UNRECORDED_METHOD, Decision::Deny)
        })
    }

    /// Records a request refused by the layers themselves (probes aside), within the client
    /// address's record budget: it has no principal yet.
    fn record_refusal(&self, request: &Request, id: &RequestId, client: IpAddr, error: &GatewayError) {
        let Some(audit) = self.audit.get() else { return };
        let path = request.uri().path();
        if matches!(path, "/healthz" | "/readyz" | "/metrics") || !self.may_record(client) {
            return;
        }
        let server = path.strip_prefix("/mcp/").map(|rest| rest.split('/').next().unwrap_or_default());
        let (decision, code) = match error {
            GatewayError::InvalidHeader(_) => (Decision::Deny, crate::protocol::jsonrpc::code::INVALID_REQUEST),
            _ => (Decision::Error, error.status_and_code(false).1),
        };
        let now = crate::clock::Clock::system().unix_millis();
        audit.record(crate::audit::Record {
            server: server.filter(|s| self.servers.contains(*s)).map(str::to_owned),
            upstream_status: Some(code),
            ..crate::audit::Record::new(now, id.as_str(), request.method().as_str(), decision)
        });
    }

    /// Requests in progress now, gateway-wide (streams and probes not counted).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire).min(self.max_in_flight)
    }

    /// Takes one of the gateway-wide permits, if one is left.
    fn enter(&self) -> bool {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) < self.max_in_flight {
            return true;
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// The request's id: the client's own if trusted and well formed, else a new one.
    fn request_id(&self, headers: &HeaderMap) -> RequestId {
        if !self.trust_request_id {
            return RequestId::generate();
        }
        let given = headers
            .get(X_REQUEST_ID)
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic()));
        match given {
            Some(v) => RequestId(Repr::Given(v.clone())),
            None => RequestId::generate(),
        }
    }

    /// The client's address: `peer`, unless `peer` is a trusted proxy and the request carries
    /// `X-Forwarded-For`, in which case the nearest hop that is not a trusted proxy (reading
    /// from the right, as each proxy appends the address it saw).
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let mut hops = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else { return peer };
            for hop in text.split(',') {
                match hop.trim().parse::<IpAddr>() {
                    Ok(ip) => hops.push(ip),
                    Err(_) => return peer,
                }
            }
        }
        hops.iter().rev().find(|ip| !trusted(ip)).or(hops.first()).copied().unwrap_or(peer)
    }
}

/// Whom a per-principal limit counts: an anonymous caller by address, the others by id.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Who {
    Address(IpAddr),
    Principal(Arc<str>),
}

/// Open counts per principal, each entry removed when its count falls to zero.
#[derive(Default, Clone)]
struct Counts(Arc<DashMap<Who, usize>>);

impl Counts {
    fn try_enter(&self, who: Who, max: usize) -> Option<Held> {
        let mut entry = self.0.entry(who.clone()).or_insert(0);
        if *entry >= max {
            return None;
        }
        *entry += 1;
        drop(entry);
        Some(Held { counts: self.clone(), who })
    }
}

/// One unit of a per-principal count, held until the request's scope ends.
struct Held {
    counts: Counts,
    who: Who,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counts.0.remove_if_mut(&self.who, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// What the per-address limits count a client address as: an IPv4 address (also written
/// IPv4-mapped, `::ffff:a.b.c.d`) is itself; an IPv6 address is its /64, the smallest block a
/// site is usually given, so that one host rotating through its own addresses (privacy
/// extensions, or a whole /64 routed to it) does not get a fresh budget with each. Audit
/// records keep the full address.
fn limited_as(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

/// Token buckets of failed authentications per client address: each failure takes a token,
/// tokens come back at a steady rate up to the burst, and an address without a token is
/// answered 429 without its token being looked up.
struct Buckets {
    burst: f64,
    per_sec: f64,
    map: DashMap<IpAddr, (f64, Instant)>,
}

impl Buckets {
    fn level(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        (tokens + now.saturating_duration_since(at).as_secs_f64() * self.per_sec).min(self.burst)
    }

    fn wait(&self, tokens: f64) -> u64 {
        ((1.0 - tokens) / self.per_sec).ceil().max(1.0) as u64
    }

    /// Returns a token taken from `addr`.
    fn give_back(&self, addr: IpAddr) {
        if let Some(mut bucket) = self.map.get_mut(&limited_as(addr)) {
            let now = Instant::now();
            *bucket = ((self.level(*bucket, now) + 1.0).min(self.burst), now);
        }
    }

    /// Takes a token from `addr`; how long it must wait if there was none.
    fn take(&self, addr: IpAddr) -> Option<u64> {
        let addr = limited_as(addr);
        let now = Instant::now();
        if self.map.len() >= ADDRESSES_CAP && !self.map.contains_key(&addr) {
            self.map.retain(|_, b| self.level(*b, now) < self.burst);
            if self.map.len() >= ADDRESSES_CAP {
                self.map.clear();
            }
        }
        let mut bucket = self.map.entry(addr).or_insert((self.burst, now));
        let tokens = self.level(*bucket, now);
        if tokens < 1.0 {
            *bucket = (tokens, now);
            return Some(self.wait(tokens));
        }
        *bucket = (tokens - 1.0, now);
        None
    }
}

/// After authentication: the per-principal limits. Outside a request scope (unit tests, or a
/// check made by a stream's background task), nothing is limited; within one, a principal is
/// counted once however often its request authenticates.
pub fn admitted(principal: &Principal) -> Result<(), GatewayError> {
    let Ok(scope) = SCOPE.try_with(Arc::clone) else { return Ok(()) };
    scope.refund();
    if scope.held.get().is_some() {
        return Ok(());
    }
    let who = match principal.kind {
        PrincipalKind::Anonymous => Who::Address(limited_as(scope.client)),
        PrincipalKind::User | PrincipalKind::Service => Who::Principal(Arc::from(principal.id.as_str())),
    };
    let a = &scope.admission;
    let (held, limit) = if scope.stream {
        (a.streams.try_enter(who, a.per_principal_streams), Limit::Streams)
    } else {
        (a.principals.try_enter(who, a.per_principal), Limit::Requests)
    };
    match held {
        Some(held) => {
            // Set once (checked above; a request is handled by one task).
            let _ = scope.held.set(held);
            Ok(())
        }
        None => {
            // The refusal's record names who was refused (see `admitted_principal`).
            *scope.principal.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(principal.clone());
            Err(refused(limit, 1))
        }
    }
}

/// Before a token is looked up in the store: takes one failure from the client address's
/// bucket ahead of time (so concurrent lookups cannot overrun it), or refuses with 429 if
/// there is none. The failure is given back when the token proves valid.
pub fn before_lookup() -> Result<(), GatewayError> {
    let Ok(scope) = SCOPE.try_with(Arc::clone) else { return Ok(()) };
    let Some(buckets) = scope.admission.failed.as_ref() else { return Ok(()) };
    if scope.charged.load(Ordering::Acquire) {
        return Ok(());
    }
    match buckets.take(scope.client) {
        Some(wait) => Err(refused(Limit::FailedAuthentication, wait)),
        None => {
            scope.charged.store(true, Ordering::Release);
            Ok(())
        }
    }
}

/// The principal of the request being handled that a per-principal limit refused right after
/// authentication: its audit record names who was refused.
pub fn admitted_principal() -> Option<Principal> {
    SCOPE.try_with(|s| s.principal.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()).ok().flatten()
}

/// Whether the record of a refusal without a principal (authentication failed or was not
/// reached) may be written for the request being handled: yes while its client address has
/// record budget left (`limits.unauthenticated_records_*`), else it is only counted. Outside
/// a request scope, yes.
pub fn may_record_unauthenticated() -> bool {
    SCOPE.try_with(|s| s.admission.may_record(s.client)).unwrap_or(true)
}

/// Whether the request being handled came straight from this host: a loopback peer, and no
/// `Forwarded`, `X-Forwarded-For` or `X-Real-IP` header (which a proxy on this host would add
/// for a client elsewhere; the headers are looked at on `/metrics` only, the one path that
/// asks). Outside a request scope, no.
pub fn from_this_host() -> bool {
    SCOPE.try_with(|s| is_local(s.peer, s.forwarded)).unwrap_or(false)
}

fn is_local(peer: IpAddr, forwarded: bool) -> bool {
    !forwarded && peer.to_canonical().is_loopback()
}

/// Writes an `audit/unrecorded` record every [`UNRECORDED_EVERY`] when refusals were left out
/// of the audit log, until `shutdown` is cancelled (the gateway writes the last one once its
/// listeners have stopped: [`Admission::report_unrecorded`]).
pub async fn report_unrecorded(admission: Arc<Admission>, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(UNRECORDED_EVERY) => admission.report_unrecorded(),
        }
    }
}

/// A credential proved valid: the failure taken ahead of its lookup is given back.
pub fn authentication_succeeded() {
    let _ = SCOPE.try_with(|scope| scope.refund());
}

/// After a refused credential: counts the failure against the client's address (unless it was
/// counted before its lookup). Returns the error to answer: `refusal` itself, or 429 once the
/// address has no failure left.
pub fn authentication_failed(refusal: GatewayError) -> GatewayError {
    let Ok(scope) = SCOPE.try_with(Arc::clone) else { return refusal };
    if scope.charged.swap(false, Ordering::AcqRel) {
        return refusal;
    }
    match scope.admission.failed.as_ref().and_then(|b| b.take(scope.client)) {
        Some(wait) => refused(Limit::FailedAuthentication, wait),
        None => refusal,
    }
}

/// The limits of the request in progress (its task-local scope), as authentication asks them.
#[derive(Debug, Clone, Copy, Default)]
pub struct InScope;

impl crate::authn::Gate for InScope {
    fn before_lookup(&self) -> Result<(), GatewayError> {
        before_lookup()
    }
    fn succeeded(&self) {
        authentication_succeeded();
    }
    fn failed(&self, refusal: GatewayError) -> GatewayError {
        authentication_failed(refusal)
    }
    fn admitted(&self, principal: &Principal) -> Result<(), GatewayError> {
        admitted(principal)
    }
}

impl Scope {
    fn refund(&self) {
        if self.charged.swap(false, Ordering::AcqRel)
            && let Some(b) = self.admission.failed.as_ref()
        {
            b.give_back(self.client);
        }
    }
}

fn refused(limit: Limit, retry_after: u64) -> GatewayError {
    metrics::counter!("portcullis_refusals_total", "reason" => limit.label()).increment(1);
    GatewayError::Limited { limit, retry_after }
}

/// The production layer stack around `inner`, for one connection from `peer`.
pub fn stack<S>(admission: Arc<Admission>, peer: SocketAddr, inner: S) -> Admit<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    Admit { admission, peer: peer.ip(), inner }
}

/// The answer to a request whose handler panicked: 500 with a JSON-RPC error (valid JSON on
/// every path), counted in `portcullis_panics_total`. The connection and the process go on.
fn panic_answer() -> Response {
    // The payload may quote request data, so it is not logged; the request's span is.
    tracing::error!("a request handler panicked; answered 500");
    metrics::counter!("portcullis_panics_total").increment(1);
    Failure::from(GatewayError::Panicked).into_response()
}

/// The layers' service (see the module documentation).
#[derive(Clone)]
pub struct Admit<S> {
    admission: Arc<Admission>,
    peer: IpAddr,
    inner: S,
}

impl<S> tower::Service<Request> for Admit<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Holding>;
    type Error = Infallible;
    type Future = Admitted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let a = &self.admission;
        let id = a.request_id(request.headers());
        let span =
            tracing::info_span!("request", id = id.as_str(), method = %request.method(), path = request.uri().path());
        let path = request.uri().path();
        let stream = request.method() == Method::GET && path.starts_with("/mcp/");
        let probe = matches!(path, "/healthz" | "/readyz" | "/metrics");
        let mut permit = false;
        let refusal = if request.headers().get_all(http::header::AUTHORIZATION).iter().nth(1).is_some() {
            metrics::counter!("portcullis_refusals_total", "reason" => "authorization_headers").increment(1);
            Some(GatewayError::InvalidHeader("a request must carry at most one Authorization header"))
        } else if stream || probe {
            None
        } else if a.enter() {
            permit = true;
            None
        } else {
            metrics::counter!("portcullis_refusals_total", "reason" => "in_flight").increment(1);
            Some(GatewayError::Overloaded)
        };
        let client = a.client_address(self.peer, request.headers());
        if let Some(error) = refusal {
            a.record_refusal(&request, &id, client, &error);
            let mut resp = Failure::from(error).into_response();
            resp.headers_mut().insert(X_REQUEST_ID, id.header_value());
            return Admitted { handler: None, scope: None, answer: Some(Holding::free(resp)), span };
        }
        let headers = request.headers();
        let forwarded = path == "/metrics"
            && ["forwarded", "x-forwarded-for", "x-real-ip"].iter().any(|h| headers.contains_key(*h));
        let scope = Arc::new(Scope {
            admission: a.clone(),
            request_id: id,
            client,
            peer: self.peer,
            forwarded,
            principal: Mutex::new(None),
            stream,
            permit,
            held: OnceLock::new(),
            charged: AtomicBool::new(false),
        });
        let called = {
            let _entered = span.enter();
            std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request)))
        };
        match called {
            Ok(handler) => {
                Admitted { handler: Some(SCOPE.scope(scope.clone(), handler)), scope: Some(scope), answer: None, span }
            }
            Err(_) => Admitted { handler: None, scope: None, answer: Some(finished(panic_answer(), scope)), span },
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of [`Admit`]: a refusal, or the handler's answer, made within the request's
    /// scope and span, panics caught, with the request's permits handed to its body.
    pub struct Admitted<F> {
        #[pin]
        handler: Option<tokio::task::futures::TaskLocalFuture<Arc<Scope>, F>>,
        scope: Option<Arc<Scope>>,
        answer: Option<http::Response<Holding>>,
        span: tracing::Span,
    }
}

impl<F> Future for Admitted<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<http::Response<Holding>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(answer) = this.answer.take() {
            return Poll::Ready(Ok(answer));
        }
        let _entered = this.span.enter();
        let Some(handler) = this.handler.as_mut().as_pin_mut() else {
            // Polled again after its answer: there is none left to give.
            return Poll::Ready(Ok(Holding::free(panic_answer())));
        };
        let answer = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(answer))) => answer,
            Err(_) => panic_answer(),
        };
        // The handler's future goes now, with its reference to the scope: the body's is the
        // last, so the permits are given back when the body ends.
        this.handler.set(None);
        let answer = match this.scope.take() {
            Some(scope) => finished(answer, scope),
            None => Holding::free(answer),
        };
        Poll::Ready(Ok(answer))
    }
}

/// The request's answer, with its id and a body that holds its permits, if any, until it
/// ends.
fn finished(mut answer: Response, scope: Arc<Scope>) -> http::Response<Holding> {
    answer.headers_mut().insert(X_REQUEST_ID, scope.request_id.header_value());
    let scope = (scope.permit || scope.held.get().is_some()).then_some(scope);
    answer.map(|body| Holding { inner: body, scope })
}

pin_project_lite::pin_project! {
    /// The body of an answer that came through the layers: it keeps its request's scope, and
    /// so its permits, until it ends or is dropped.
    pub struct Holding {
        #[pin]
        inner: Body,
        scope: Option<Arc<Scope>>,
    }
}

impl Holding {
    /// An answer that holds nothing.
    fn free(answer: Response) -> http::Response<Holding> {
        answer.map(|body| Holding { inner: body, scope: None })
    }
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.scope.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(extra: &str) -> Arc<Admission> {
        let config = Config::parse(&format!("[gateway]\n{extra}\n"), "t", Vec::new()).expect("config");
        Admission::new(&config)
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).expect("ascii"));
        }
        h
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop_behind_trusted_proxies_only() {
        let a = admission("trusted_proxies = [\"10.0.0.0/8\"]");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let proxy = ip("10.1.2.3");
        // Everything left of the first untrusted hop may be forged by the client.
        let h = forwarded(&["6.6.6.6, 198.51.100.7", "10.9.9.9"]);
        assert_eq!(a.client_address(proxy, &h), ip("198.51.100.7"));
        assert_eq!(a.client_address(ip("192.0.2.1"), &h), ip("192.0.2.1"), "an untrusted peer's header is ignored");
        assert_eq!(a.client_address(proxy, &forwarded(&["not an address"])), proxy);
        assert_eq!(a.client_address(proxy, &HeaderMap::new()), proxy);
        assert_eq!(a.client_address(proxy, &forwarded(&["10.0.0.1, 10.0.0.2"])), ip("10.0.0.1"));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_until_it_refills() {
        let b = Buckets { burst: 3.0, per_sec: 1.0 / 60.0, map: DashMap::new() };
        let addr: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(b.take(addr), None);
        }
        let wait = b.take(addr).expect("limited");
        assert!((59..=60).contains(&wait), "{wait}");
        b.give_back(addr);
        assert_eq!(b.take(addr), None, "a token given back can be taken again");
        assert!(b.take("192.0.2.2".parse().expect("ip")).is_none(), "other addresses are apart");
    }

    #[test]
    fn an_ipv6_host_rotating_its_addresses_shares_one_budget() {
        let b = Buckets { burst: 2.0, per_sec: 1.0 / 60.0, map: DashMap::new() };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(b.take(ip("2001:db8:1:2::1")), None);
        assert_eq!(b.take(ip("2001:db8:1:2:ffff:ffff:ffff:fffe")), None);
        assert!(b.take(ip("2001:db8:1:2:1234::9")).is_some(), "the same /64, however the host spells it");
        assert_eq!(b.take(ip("2001:db8:1:3::1")), None, "the next /64 is another site");
        assert_eq!(limited_as(ip("::ffff:192.0.2.7")), ip("192.0.2.7"), "an IPv4-mapped address is its IPv4 address");
        assert_eq!(limited_as(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn only_a_loopback_peer_without_forwarding_headers_is_this_host() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(is_local(ip("127.0.0.1"), false));
        assert!(is_local(ip("127.8.9.10"), false));
        assert!(is_local(ip("::1"), false));
        assert!(is_local(ip("::ffff:127.0.0.1"), false));
        assert!(!is_local(ip("127.0.0.1"), true), "a proxy on this host relays someone else");
        assert!(!is_local(ip("192.0.2.1"), false));
        assert!(!is_local(ip("10.0.0.1"), false));
        assert!(!is_local(ip("::ffff:192.0.2.1"), false));
    }

    #[test]
    fn a_client_request_id_is_kept_only_when_trusted_and_well_formed() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_ne!(admission("").request_id(&h).as_str(), "abc-123");
        let trusting = admission("trust_request_id = true");
        assert_eq!(trusting.request_id(&h).as_str(), "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(trusting.request_id(&h).as_str(), "has space");
    }
}
