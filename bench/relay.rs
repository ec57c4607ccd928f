//! Relay benchmark: what the gateway adds to one MCP `tools/call`, in latency, CPU and memory.
//!
//! ```text
//! cargo bench --bench relay                  # full run (a few minutes)
//! BENCH_QUICK=1 cargo bench --bench relay    # smoke run (seconds)
//! cargo bench --bench relay -- small         # only scenarios whose name contains "small"
//! BENCH_GATEWAY_BIN=/path/to/portcullis cargo bench --bench relay   # another gateway build
//! BENCH_BASELINE_BIN=/path/to/older/portcullis cargo bench --bench relay   # A/B in one run
//! ```
//!
//! It starts `portcullis-bench-stub` (a fixed-bytes MCP server) and `portcullis serve` in
//! front of it as child processes, then drives closed-loop load from this process over HTTP/1.1
//! keep-alive connections (one connection and one MCP session per concurrent client). Each
//! scenario measures two arms, DIRECT (client → stub) and GATEWAY (client → gateway → stub),
//! in alternating rounds so that noise on the shared machine hits both alike, and reports the
//! gateway as differences and ratios against the direct arm of the same run. CPU time comes
//! from /proc (the sum of the gateway's threads' schedstat run time over its rounds only),
//! memory from /proc/<pid>/status. See docs/performance.md.
//!
//! Two gateways run side by side: the bare relay (`[audit] enabled = false`, a `public = true`
//! server: no token check, no audit record, no upstream credential) and the full path (a grant
//! token on every request, the audit log on, a static upstream credential), each with its own
//! data directory and port. The full-path gateway also serves the invalid-token arms, which
//! expect 401. After the relay scenarios, a micro-benchmark times the audit step of the request
//! path (`AuditWriter::record` / `write`) in this process.
//!
//! With `BENCH_BASELINE_BIN`, two more gateways of that build (an older revision) serve every
//! scenario as a third arm, BASELINE, in the same rounds as the other two, so that a change is
//! measured against its baseline on the same machine in the same minutes; the report adds the
//! gateway's CPU per request over the baseline's. `BENCH_BASELINE_NO_LIMITS=1` leaves `[limits]`
//! out of the baseline's config (builds older than it), as `BENCH_NO_LIMITS=1` does for the
//! gateway's.
//!
//! `BENCH_POLICY=1` gives the full-path gateway (not the baseline's) a `[policy]` folder of
//! 1,000 policies written as docs/policy.md recommends (bound to their server and tool), an
//! unbound `forbid` every decision evaluates, and the permit of the benchmark's call. With
//! `BENCH_BASELINE_BIN` set to the same build, the full-path scenarios then measure what policy
//! adds per request.

#[path = "support.rs"]
mod support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use portcullis::audit::{Arguments, AuditConfig, AuditWriter, Decision, Record, WriterStats};
use portcullis::authn::token::{self, NewToken};
use portcullis::clock::Clock;
use portcullis::store::Store;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use support::{Proc, start_stub};

const PROTOCOL: &str = "2025-11-25";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

// Targets (see docs/performance.md).
const TARGET_CPU_US_C16: f64 = 40.0;
const TARGET_ADDED_P50_US_C1: f64 = 100.0;
const TARGET_IDLE_RSS_MIB: f64 = 15.0;
const TARGET_FULL_CPU_US_C16: f64 = 80.0;
const TARGET_REJECT_CPU_US_C16: f64 = 15.0;
const TARGET_AUDIT_STEP_NS: f64 = 3_000.0;

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Which gateway, with which credential, a scenario's gateway arm goes through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The bare relay: audit off, a public server, no credentials.
    Bare,
    /// The full path: a grant token, an audit record and a static upstream credential.
    Full,
    /// The full-path gateway with a well-formed grant token it does not know: 401 expected.
    UnknownToken,
    /// The full-path gateway with a random string of a token's shape (bad checksum): 401 expected.
    MalformedToken,
}

struct Scenario {
    name: &'static str,
    route: Route,
    tool: &'static str,
    concurrency: usize,
    /// Requests per round per arm.
    per_round: usize,
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let s = |name, route, tool, concurrency, full: usize, quick_n: usize| Scenario {
        name,
        route,
        tool,
        concurrency,
        per_round: if quick { quick_n } else { full },
    };
    vec![
        s("small c1", Route::Bare, "small", 1, 3_000, 200),
        s("small c16", Route::Bare, "small", 16, 10_000, 1_000),
        s("small c64", Route::Bare, "small", 64, 10_000, 1_000),
        s("64k c16", Route::Bare, "64k", 16, 3_000, 300),
        s("1m c16", Route::Bare, "1m", 16, 200, 48),
        s("sse c16", Route::Bare, "sse", 16, 10_000, 1_000),
        s("full c1", Route::Full, "small", 1, 3_000, 200),
        s("full c16", Route::Full, "small", 16, 10_000, 1_000),
        s("unknown-token c16", Route::UnknownToken, "small", 16, 10_000, 1_000),
        s("malformed-token c16", Route::MalformedToken, "small", 16, 10_000, 1_000),
    ]
}

// ---------------------------------------------------------------------------------------------
// Child processes

impl Proc {
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("bound").port()
}

/// A running gateway and, for the full path, the grant token created for it.
struct Gateway {
    proc: Proc,
    addr: SocketAddr,
    token: Option<String>,
}

/// The gateway binary: this build's, or `BENCH_GATEWAY_BIN` (a profiling build, an older commit).
fn gateway_bin() -> PathBuf {
    std::env::var_os("BENCH_GATEWAY_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portcullis")), PathBuf::from)
}

/// A build of the gateway to run, and whether its config may have a `[limits]` section.
struct Build {
    bin: PathBuf,
    limits: bool,
    /// A `[policy]` folder for the full path (`BENCH_POLICY`).
    policy: bool,
}

impl Build {
    /// The gateway measured (`BENCH_GATEWAY_BIN`, `BENCH_NO_LIMITS`).
    fn gateway() -> Build {
        Build {
            bin: gateway_bin(),
            limits: std::env::var_os("BENCH_NO_LIMITS").is_none(),
            policy: std::env::var_os("BENCH_POLICY").is_some(),
        }
    }

    /// The baseline, if any (`BENCH_BASELINE_BIN`, `BENCH_BASELINE_NO_LIMITS`).
    fn baseline() -> Option<Build> {
        let bin = PathBuf::from(std::env::var_os("BENCH_BASELINE_BIN")?);
        Some(Build { bin, limits: std::env::var_os("BENCH_BASELINE_NO_LIMITS").is_none(), policy: false })
    }
}

/// `portcullis --config CONFIG ARGS…` with a clean environment (no `RUST_LOG`, no
/// `PORTCULLIS_*` overrides or master key from the caller's shell).
fn gateway_command(bin: &std::path::Path, config: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(config).env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PORTCULLIS_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs one CLI command of the gateway to completion and returns its stdout.
async fn gateway_cli(bin: &std::path::Path, config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = gateway_command(bin, config);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run portcullis {args:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes()).await.expect("write to the CLI's stdin");
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("portcullis {args:?} did not finish within 60s"))
        .expect("the CLI's output is readable");
    assert!(
        out.status.success(),
        "portcullis {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 1,000 policies over 50 servers of 20 tools, each bound to its server and tool with an
/// argument rule; an unbound `forbid` on an argument, which every decision evaluates; and the
/// permit of the benchmark's own calls (`small` of `stub`, for the user `bench`).
fn bench_policies() -> String {
    let mut text = String::new();
    for s in 0..50 {
        for t in 0..20 {
            let _ = writeln!(
                text,
                "permit(principal in Portcullis::Group::\"g{s}\", action == Portcullis::Action::\"call_tool\", resource)\n\
                 when {{ resource.server == \"s{s}\" && resource.name == \"t{t}\" && context.args.repo like \"acme/*\" }};"
            );
        }
    }
    text.push_str(
        "forbid(principal, action == Portcullis::Action::\"call_tool\", resource)\n\
         when { context.args has repo && context.args.repo like \"*secret*\" };\n\
         permit(principal == Portcullis::User::\"bench\", action == Portcullis::Action::\"call_tool\", resource)\n\
         when { resource.server == \"stub\" && resource.name == \"small\" };\n",
    );
    text
}

/// Starts a gateway in `dir` (its config and data directory) in front of `stub`: the bare
/// relay, or with `full` the full path, whose data directory is prepared with the CLI first (a
/// user, a grant token, the upstream secret).
async fn start_gateway(dir: &std::path::Path, stub: SocketAddr, full: bool, build: &Build) -> Gateway {
    let bin = build.bin.as_path();
    std::fs::create_dir_all(dir).expect("create the gateway's directory");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let data = dir.join("data");
    let config = dir.join("portcullis.toml");
    let data = data.display().to_string();
    let toml = if full {
        // No [audit] section: enabled, async durability. No `public`: a grant token is required.
        // The invalid-token arms send a flood of refused tokens from one address, which the
        // failed-authentication limit would answer 429 and the record budget would leave out
        // of the audit log: both are off here, so that every refusal is looked up and recorded
        // as before either existed. `BENCH_NO_LIMITS=1` leaves the section out for builds older
        // than `[limits]` (A/B runs).
        let limits = match build.limits {
            false => "",
            true => "[limits]\nfailed_auth_per_minute = 0\nunauthenticated_records_per_minute = 0\n\n",
        };
        let policy = match build.policy {
            false => String::new(),
            true => {
                let folder = dir.join("policies");
                std::fs::create_dir_all(&folder).expect("create the policy folder");
                std::fs::write(folder.join("bench.cedar"), bench_policies()).expect("write the policies");
                format!("[policy]\ndir = {:?}\n\n", folder.display().to_string())
            }
        };
        format!(
            "[gateway]\nlisten = \"{addr}\"\ndata_dir = {data:?}\n\n[log]\nlevel = \"warn\"\n\n\
             {limits}{policy}\
             [[servers]]\nname = \"stub\"\nurl = \"http://{stub}/mcp\"\n\
             auth = {{ type = \"static\", secret = \"stub-key\" }}\n"
        )
    } else {
        format!(
            "[gateway]\nlisten = \"{addr}\"\ndata_dir = {data:?}\n\n[log]\nlevel = \"warn\"\n\n[audit]\nenabled = false\n\n\
             [[servers]]\nname = \"stub\"\nurl = \"http://{stub}/mcp\"\npublic = true\n"
        )
    };
    std::fs::write(&config, toml).expect("write the gateway config");
    let token = if full {
        gateway_cli(bin, &config, &["user", "add", "bench"], None).await;
        let out = gateway_cli(bin, &config, &["token", "create", "--user", "bench", "--name", "bench"], None).await;
        let token = out.lines().last().unwrap_or_default().trim().to_owned();
        assert!(portcullis::authn::token::well_formed(&token), "`token create` printed no token last: {out:?}");
        gateway_cli(bin, &config, &["secret", "set", "stub-key"], Some("bench-upstream-key")).await;
        Some(token)
    } else {
        None
    };
    let mut gw = Proc::spawn(
        gateway_command(bin, &config)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit()),
        "the gateway",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = gw.child.try_wait() {
            panic!("the gateway exited during startup: {status}");
        }
        if ready(addr).await {
            return Gateway { proc: gw, addr, token };
        }
        assert!(Instant::now() < deadline, "the gateway was not ready (/readyz) within 60s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the gateway serves (it answers `/healthz` while it opens its store, `/readyz` only
/// once it serves everything).
async fn ready(addr: SocketAddr) -> bool {
    let Ok(mut tx) = connect(addr).await else {
        return false;
    };
    let req =
        Request::get("/readyz").header(HOST, addr.to_string()).body(Full::new(Bytes::new())).expect("a valid request");
    match tx.send_request(req).await {
        Ok(resp) => resp.status() == StatusCode::OK,
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

/// CPU time of every thread of `pid`, in ns (first field of each task's schedstat).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum()
}

/// utime + stime of the whole process (dead threads included), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    ns: u64,
    ticks: u64,
}

impl Cpu {
    fn read(pid: u32) -> Cpu {
        Cpu { ns: cpu_ns(pid), ticks: cpu_ticks(pid) }
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu { ns: self.ns.saturating_sub(before.ns), ticks: self.ticks.saturating_sub(before.ticks) }
    }

    fn add(&mut self, other: Cpu) {
        self.ns += other.ns;
        self.ticks += other.ticks;
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// One side of the comparison: where the MCP endpoint is.
struct Arm {
    label: &'static str,
    addr: SocketAddr,
    path: &'static str,
    host: HeaderValue,
    /// `Authorization` sent with every request (the full path and the invalid-token arms).
    authorization: Option<HeaderValue>,
    /// Every answer must be 401 with an `invalid_token` challenge; no MCP session is opened.
    rejected: bool,
    /// How long to wait after a round before reading the CPU counters, so that the gateway's
    /// background work for the round (the audit writer's last batch) is counted in it.
    settle: Duration,
}

/// One keep-alive connection with its own MCP session (none on the invalid-token arms).
struct Conn {
    tx: SendRequest<Full<Bytes>>,
    session: Option<HeaderValue>,
}

async fn connect(addr: SocketAddr) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (tx, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}

/// Sends one POST and reads the whole answer.
async fn post(
    tx: &mut SendRequest<Full<Bytes>>,
    arm: &Arm,
    session: Option<&HeaderValue>,
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut req = Request::post(arm.path)
        .header(HOST, arm.host.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/json, text/event-stream");
    if let Some(a) = &arm.authorization {
        req = req.header(AUTHORIZATION, a.clone());
    }
    if let Some(s) = session {
        req = req.header("mcp-session-id", s.clone()).header("mcp-protocol-version", PROTOCOL);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    tx.ready().await.map_err(|e| format!("connection: {e}"))?;
    let resp = tx.send_request(req).await.map_err(|e| format!("connection: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| format!("connection: {e}"))?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

#[derive(Deserialize)]
struct Reply<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    result: Option<IgnoredAny>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// Checks that a 200 answer (JSON or SSE) carries a result, not an error, for `id`.
fn check_answer(headers: &HeaderMap, body: &[u8], id: &str) -> Result<(), String> {
    let is_sse = headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let judge = |reply: Reply<'_>| match (reply.result, reply.error) {
        (Some(_), None) => Ok(()),
        (_, Some(_)) => Err(format!("JSON-RPC error: {}", excerpt(body))),
        (None, None) => Err(format!("neither result nor error: {}", excerpt(body))),
    };
    if is_sse {
        for data in body.split(|b| *b == b'\n').filter_map(|l| l.strip_prefix(b"data:")) {
            let Ok(reply) = serde_json::from_slice::<Reply<'_>>(data.trim_ascii()) else {
                continue;
            };
            if reply.id.map(RawValue::get) == Some(id) && (reply.result.is_some() || reply.error.is_some()) {
                return judge(reply);
            }
        }
        return Err(format!("no response for id {id} in the SSE stream: {}", excerpt(body)));
    }
    let reply =
        serde_json::from_slice::<Reply<'_>>(body).map_err(|e| format!("invalid JSON ({e}): {}", excerpt(body)))?;
    if reply.id.map(RawValue::get) != Some(id) {
        return Err(format!("answer for another id: {}", excerpt(body)));
    }
    judge(reply)
}

fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// Connects, `initialize`s and sends `notifications/initialized`.
async fn open(arm: &Arm) -> Result<Conn, String> {
    let mut tx = connect(arm.addr).await.map_err(|e| format!("connect to {}: {e}", arm.label))?;
    if arm.rejected {
        // The token cannot open a session; the calls go out without one.
        return Ok(Conn { tx, session: None });
    }
    let init = format!(
        r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{PROTOCOL}","capabilities":{{}},"clientInfo":{{"name":"portcullis-bench","version":"0.1.0"}}}}}}"#
    );
    let (status, headers, body) = post(&mut tx, arm, None, Bytes::from(init)).await?;
    if status != StatusCode::OK {
        return Err(format!("{}: initialize answered HTTP {status}: {}", arm.label, excerpt(&body)));
    }
    check_answer(&headers, &body, "0").map_err(|e| format!("{}: initialize: {e}", arm.label))?;
    let session = headers
        .get("mcp-session-id")
        .cloned()
        .ok_or_else(|| format!("{}: initialize answered without Mcp-Session-Id", arm.label))?;
    let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    let (status, _, body) = post(&mut tx, arm, Some(&session), note).await?;
    if status != StatusCode::ACCEPTED {
        return Err(format!("{}: notifications/initialized answered HTTP {status}: {}", arm.label, excerpt(&body)));
    }
    Ok(Conn { tx, session: Some(session) })
}

/// One `tools/call`; `Err((message, connection_broken))`.
async fn call(conn: &mut Conn, arm: &Arm, tool: &str, id: usize) -> Result<(), (String, bool)> {
    let body =
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#);
    let sent =
        tokio::time::timeout(REQUEST_TIMEOUT, post(&mut conn.tx, arm, conn.session.as_ref(), Bytes::from(body))).await;
    let (status, headers, body) = match sent {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err((e, true)),
        Err(_) => {
            return Err((format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()), true));
        }
    };
    if arm.rejected {
        let challenge = headers.get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if status != StatusCode::UNAUTHORIZED || !challenge.contains("invalid_token") {
            return Err((
                format!("expected 401 invalid_token, got HTTP {status} ({challenge:?}): {}", excerpt(&body)),
                false,
            ));
        }
        return Ok(());
    }
    if status != StatusCode::OK {
        return Err((format!("HTTP {status}: {}", excerpt(&body)), false));
    }
    check_answer(&headers, &body, &id.to_string()).map_err(|e| (e, false))
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    sent: usize,
    ok: usize,
    busy: Duration,
    gateway_cpu: Cpu,
    stub_cpu: Cpu,
    errors: Vec<String>,
}

impl Tally {
    fn error(&mut self, e: String) {
        if self.errors.len() < 5 {
            self.errors.push(e);
        }
    }
}

struct Pids {
    gateway: u32,
    stub: u32,
}

/// Runs `n` calls over `conns` (one closed-loop worker per connection) and adds them to `tally`.
async fn round(
    conns: &mut Vec<Option<Conn>>,
    arm: &Arc<Arm>,
    tool: &'static str,
    n: usize,
    pids: &Pids,
    tally: &mut Tally,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let gw_before = Cpu::read(pids.gateway);
    let stub_before = Cpu::read(pids.stub);
    let started = Instant::now();
    let workers: Vec<_> = conns
        .drain(..)
        .map(|conn| {
            let next = next.clone();
            let arm = arm.clone();
            tokio::spawn(async move {
                let mut conn = match conn {
                    Some(c) => Some(c),
                    None => open(&arm).await.ok(),
                };
                let mut latencies = Vec::with_capacity(n / 8 + 1);
                let mut errors = Vec::new();
                while let Some(c) = conn.as_mut() {
                    let ticket = next.fetch_add(1, Ordering::Relaxed);
                    if ticket >= n {
                        break;
                    }
                    let t0 = Instant::now();
                    match call(c, &arm, tool, ticket + 1).await {
                        Ok(()) => latencies.push(t0.elapsed().as_nanos() as u64),
                        Err((e, broken)) => {
                            errors.push(e);
                            if broken {
                                conn = open(&arm).await.ok();
                            }
                        }
                    }
                }
                (conn, latencies, errors)
            })
        })
        .collect();
    for worker in workers {
        let (conn, latencies, errors) = worker.await.expect("a load worker panicked");
        conns.push(conn);
        tally.ok += latencies.len();
        tally.latencies_ns.extend(latencies);
        for e in errors {
            tally.error(e);
        }
    }
    tally.busy += started.elapsed();
    tally.sent += n;
    if !arm.settle.is_zero() {
        tokio::time::sleep(arm.settle).await;
    }
    tally.gateway_cpu.add(Cpu::read(pids.gateway).since(gw_before));
    tally.stub_cpu.add(Cpu::read(pids.stub).since(stub_before));
}

async fn open_all(arm: &Arm, count: usize) -> Vec<Option<Conn>> {
    let opened = futures::future::join_all((0..count).map(|_| open(arm))).await;
    opened.into_iter().map(|c| Some(c.unwrap_or_else(|e| panic!("cannot open an MCP session: {e}")))).collect()
}

// ---------------------------------------------------------------------------------------------
// Results

struct ArmResult {
    requests: usize,
    errors: usize,
    throughput: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    gateway_cpu_us: f64,
    gateway_cpu_ticks_us: f64,
    stub_cpu_us: f64,
    first_errors: Vec<String>,
}

fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

impl ArmResult {
    fn from(mut t: Tally, ticks_per_sec: u64) -> ArmResult {
        t.latencies_ns.sort_unstable();
        let per_req = |ns: u64| ns as f64 / 1000.0 / t.sent.max(1) as f64;
        ArmResult {
            requests: t.sent,
            errors: t.sent - t.ok,
            throughput: t.ok as f64 / t.busy.as_secs_f64(),
            p50: percentile_us(&t.latencies_ns, 50.0),
            p90: percentile_us(&t.latencies_ns, 90.0),
            p99: percentile_us(&t.latencies_ns, 99.0),
            gateway_cpu_us: per_req(t.gateway_cpu.ns),
            gateway_cpu_ticks_us: per_req(t.gateway_cpu.ticks * 1_000_000_000 / ticks_per_sec),
            stub_cpu_us: per_req(t.stub_cpu.ns),
            first_errors: t.errors,
        }
    }
}

struct ScenarioResult {
    name: &'static str,
    /// The gateway arm's label.
    arm: &'static str,
    direct: ArmResult,
    gateway: ArmResult,
    /// The baseline build's gateway arm (`BENCH_BASELINE_BIN`), if any.
    baseline: Option<ArmResult>,
    gateway_hwm_kib: u64,
    gateway_cpu_ticks: u64,
}

/// The baseline's arm of a scenario, and its gateway's pid.
struct Baseline<'a> {
    arm: &'a Arc<Arm>,
    pid: u32,
}

async fn run_scenario(
    sc: &Scenario,
    direct: &Arc<Arm>,
    gateway: &Arc<Arm>,
    pids: &Pids,
    baseline: Option<Baseline<'_>>,
    rounds: usize,
) -> ScenarioResult {
    let ticks_per_sec = clock_ticks_per_sec();
    let mut conns_direct = open_all(direct, sc.concurrency).await;
    let mut conns_gateway = open_all(gateway, sc.concurrency).await;
    // Warm-up (discarded): fills connection pools, caches and allocator arenas on both paths.
    let warm = (sc.per_round / 5).max(sc.concurrency * 4);
    round(&mut conns_direct, direct, sc.tool, warm, pids, &mut Tally::default()).await;
    round(&mut conns_gateway, gateway, sc.tool, warm, pids, &mut Tally::default()).await;
    let base_pids = baseline.as_ref().map(|b| Pids { gateway: b.pid, stub: pids.stub });
    let mut conns_base = match &baseline {
        Some(b) => open_all(b.arm, sc.concurrency).await,
        None => Vec::new(),
    };
    if let (Some(b), Some(p)) = (&baseline, &base_pids) {
        round(&mut conns_base, b.arm, sc.tool, warm, p, &mut Tally::default()).await;
    }
    let mut d = Tally::default();
    let mut g = Tally::default();
    let mut b = Tally::default();
    for r in 0..rounds {
        // Alternate which arm goes first so drift (thermal, neighbours) does not favour one.
        // The baseline's rounds sit next to the gateway's, before them in one round and after
        // them in the next.
        if r % 2 == 0 {
            round(&mut conns_direct, direct, sc.tool, sc.per_round, pids, &mut d).await;
            round(&mut conns_gateway, gateway, sc.tool, sc.per_round, pids, &mut g).await;
            if let (Some(base), Some(p)) = (&baseline, &base_pids) {
                round(&mut conns_base, base.arm, sc.tool, sc.per_round, p, &mut b).await;
            }
        } else {
            if let (Some(base), Some(p)) = (&baseline, &base_pids) {
                round(&mut conns_base, base.arm, sc.tool, sc.per_round, p, &mut b).await;
            }
            round(&mut conns_gateway, gateway, sc.tool, sc.per_round, pids, &mut g).await;
            round(&mut conns_direct, direct, sc.tool, sc.per_round, pids, &mut d).await;
        }
        eprint!(".");
    }
    eprintln!();
    let gateway_cpu_ticks = g.gateway_cpu.ticks;
    ScenarioResult {
        name: sc.name,
        arm: gateway.label,
        direct: ArmResult::from(d, ticks_per_sec),
        gateway: ArmResult::from(g, ticks_per_sec),
        baseline: baseline.map(|_| ArmResult::from(b, ticks_per_sec)),
        gateway_hwm_kib: status_kib(pids.gateway, "VmHWM"),
        gateway_cpu_ticks,
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn today_utc() -> String {
    let secs = i64::try_from(portcullis::clock::Clock::system().unix_secs()).unwrap_or(i64::MAX);
    portcullis::clock::rfc3339(secs)[..10].to_owned()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{cores} cores ({cpu}), Linux {}, load average at start {}", kernel.trim(), load.join(" "))
}

fn revision() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head} + uncommitted changes") } else { head }
}

fn us(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

struct Report {
    quick: bool,
    rounds: usize,
    results: Vec<ScenarioResult>,
    /// The bare-relay gateway.
    idle_rss_kib: u64,
    peak_hwm_kib: u64,
    /// The full-path gateway.
    full_idle_rss_kib: u64,
    full_peak_hwm_kib: u64,
    audit: Option<AuditBench>,
    started: String,
}

/// One row of the targets table; `limit` None means reported without a target.
fn target_row(o: &mut String, what: &str, limit: Option<f64>, unit: &str, value: Option<f64>) {
    let limit_text = limit.map_or_else(|| "–".to_owned(), |l| format!("≤ {l} {unit}"));
    let (measured, verdict) = match (value, limit) {
        (None, _) => ("not run".to_owned(), "–"),
        (Some(v), None) => (format!("{} {unit}", us(v)), "–"),
        (Some(v), Some(l)) => (format!("{} {unit}", us(v)), met(v <= l)),
    };
    let _ = writeln!(o, "| {what} | {limit_text} | {measured} | {verdict} |");
}

/// The gateway against the baseline build, from the rounds of the same run.
fn render_baseline(o: &mut String, r: &Report) {
    let bin = std::env::var_os("BENCH_BASELINE_BIN").map(PathBuf::from).unwrap_or_default();
    let _ = writeln!(
        o,
        "\nAgainst the baseline build `{}` (BENCH_BASELINE_BIN), its rounds interleaved with the gateway's in the same run \
         (CPU per request; the stub's is its CPU per request during each arm's rounds):\n",
        bin.display()
    );
    let _ = writeln!(
        o,
        "| scenario | gateway CPU µs/req | baseline CPU µs/req | gateway / baseline | stub CPU µs/req, gateway's rounds | stub CPU µs/req, baseline's rounds | baseline errors |"
    );
    let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|--:|");
    for s in &r.results {
        let Some(b) = &s.baseline else { continue };
        let g = &s.gateway;
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.2} | {} | {} | {} |",
            s.name,
            us(g.gateway_cpu_us),
            us(b.gateway_cpu_us),
            g.gateway_cpu_us / b.gateway_cpu_us,
            us(g.stub_cpu_us),
            us(b.stub_cpu_us),
            b.errors
        );
    }
}

fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "## Relay benchmark results\n");
    let _ = writeln!(
        o,
        "{} UTC, revision {}, {}. {} rounds per arm, arms interleaved{}.\n",
        r.started,
        revision(),
        machine(),
        r.rounds,
        if r.quick { " — QUICK MODE (smoke run, numbers not meaningful)" } else { "" }
    );
    if let Some(bin) = std::env::var_os("BENCH_GATEWAY_BIN") {
        let _ = writeln!(o, "Gateway binary: `{}` (BENCH_GATEWAY_BIN).\n", PathBuf::from(bin).display());
    }
    let _ = writeln!(
        o,
        "| scenario | arm | requests | errors | req/s | p50 µs | p90 µs | p99 µs | added p50 µs | gateway CPU µs/req | stub CPU µs/req |"
    );
    let _ = writeln!(o, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for s in &r.results {
        for (label, a) in [("direct", &s.direct), (s.arm, &s.gateway)] {
            let added = if label == "direct" { String::new() } else { us(a.p50 - s.direct.p50) };
            let _ = writeln!(
                o,
                "| {} | {label} | {} | {} | {:.0} | {} | {} | {} | {added} | {} | {} |",
                s.name,
                a.requests,
                a.errors,
                a.throughput,
                us(a.p50),
                us(a.p90),
                us(a.p99),
                us(a.gateway_cpu_us),
                us(a.stub_cpu_us),
            );
        }
    }
    let _ = writeln!(o, "\nRatios, gateway arm over direct arm of the same run (lower is better except throughput):\n");
    let _ = writeln!(
        o,
        "| scenario | throughput | p50 | p99 | gateway CPU / stub CPU per request | gateway VmHWM after, MiB |"
    );
    let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|");
    for s in &r.results {
        let (d, g) = (&s.direct, &s.gateway);
        let _ = writeln!(
            o,
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
            s.name,
            g.throughput / d.throughput,
            g.p50 / d.p50,
            g.p99 / d.p99,
            g.gateway_cpu_us / d.stub_cpu_us,
            mib(s.gateway_hwm_kib),
        );
    }
    if r.results.iter().any(|s| s.baseline.is_some()) {
        render_baseline(&mut o, r);
    }
    let find = |name: &str| r.results.iter().find(|s| s.name == name);
    let errors: usize = r
        .results
        .iter()
        .map(|s| s.direct.errors + s.gateway.errors + s.baseline.as_ref().map_or(0, |b| b.errors))
        .sum();
    let _ = writeln!(o, "\nTargets:\n");
    let _ = writeln!(o, "| target | limit | measured | verdict |");
    let _ = writeln!(o, "|---|--:|--:|---|");
    let gateway_cpu = |name: &str| find(name).map(|s| s.gateway.gateway_cpu_us);
    let added_p50 = |name: &str| find(name).map(|s| s.gateway.p50 - s.direct.p50);
    target_row(&mut o, "gateway CPU per request, small c16", Some(TARGET_CPU_US_C16), "µs", gateway_cpu("small c16"));
    target_row(&mut o, "added p50 latency, small c1", Some(TARGET_ADDED_P50_US_C1), "µs", added_p50("small c1"));
    let idle = mib(r.idle_rss_kib);
    let _ = writeln!(
        o,
        "| gateway RSS idle (VmRSS before load) | ≤ {TARGET_IDLE_RSS_MIB} MiB | {idle:.1} MiB | {} |",
        met(idle <= TARGET_IDLE_RSS_MIB)
    );
    let _ = writeln!(o, "| gateway RSS peak (VmHWM after all scenarios) | – | {:.1} MiB | – |", mib(r.peak_hwm_kib));
    target_row(
        &mut o,
        "full path: gateway CPU per request, full c16",
        Some(TARGET_FULL_CPU_US_C16),
        "µs",
        gateway_cpu("full c16"),
    );
    target_row(&mut o, "full path: added p50 latency, full c1", None, "µs", added_p50("full c1"));
    target_row(
        &mut o,
        "gateway CPU per rejected request, unknown-token c16",
        Some(TARGET_REJECT_CPU_US_C16),
        "µs",
        gateway_cpu("unknown-token c16"),
    );
    target_row(
        &mut o,
        "gateway CPU per rejected request, malformed-token c16",
        Some(TARGET_REJECT_CPU_US_C16),
        "µs",
        gateway_cpu("malformed-token c16"),
    );
    target_row(
        &mut o,
        "audit step on the request path (build the record + `write`), mean",
        Some(TARGET_AUDIT_STEP_NS),
        "ns",
        r.audit.as_ref().map(|a| a.step_mean_ns),
    );
    let _ = writeln!(
        o,
        "| full-path gateway RSS idle / peak | – | {:.1} / {:.1} MiB | – |",
        mib(r.full_idle_rss_kib),
        mib(r.full_peak_hwm_kib)
    );
    let _ = writeln!(o, "| errors, all scenarios and arms | 0 | {errors} | {} |", met(errors == 0));
    let _ = writeln!(
        o,
        "\nFor scale: the best Rust peer spends about 85 µs of CPU per relayed MCP request and adds about 170 µs at concurrency 1; \
         on its full path (JWT, one rule, backend key, access log) it spends about 165 µs of CPU per request."
    );
    if let Some(a) = &r.audit {
        let _ = writeln!(
            o,
            "\nAudit step on the request path, timed in the bench process ({} calls per measurement, one thread, \
             SQLite store, async durability):\n",
            a.calls
        );
        let _ = writeln!(o, "| measurement | mean ns/call | p50 ns | p99 ns |");
        let _ = writeln!(o, "|---|--:|--:|--:|");
        let _ = writeln!(
            o,
            "| `AuditWriter::record` of a prebuilt record (batches of {AUDIT_BATCH}, writer idle, flushed between) | {} | – | – |",
            us(a.enqueue_ns)
        );
        let _ = writeln!(
            o,
            "| build the record as `AppState::finish` does + `write().await`, the writer task waiting (woken by each call) | {} | {} | {} |",
            us(a.step_mean_ns),
            us(a.step_p50_ns),
            us(a.step_p99_ns)
        );
        let _ = writeln!(
            o,
            "| off the request path, for comparison: the writer's CPU per record committed (redaction, hash chain, \
             SQLite), during the flushes of the first measurement | {} | – | – |",
            us(a.writer_cpu_ns)
        );
        let _ = writeln!(
            o,
            "\nTimer overhead (`Instant::now` + `elapsed`, median, included above): {} ns. Writer afterwards: {} written, \
             {} overflowed, {} dropped.{}",
            us(a.timer_ns),
            a.stats.written,
            a.stats.overflowed,
            a.stats.dropped,
            if a.stats.overflowed > 0 {
                " Some calls took the overflow path (channel full): the figures above are not those of the normal path."
            } else {
                ""
            }
        );
    }
    if !r.results.is_empty() {
        let _ = writeln!(
            o,
            "\nCross-check of gateway CPU from utime+stime (clock ticks, whole process): {}.",
            r.results
                .iter()
                .map(|s| format!(
                    "{} {} µs/req ({} ticks)",
                    s.name,
                    us(s.gateway.gateway_cpu_ticks_us),
                    s.gateway_cpu_ticks
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let mut first = true;
    for s in &r.results {
        let arms = [("direct", Some(&s.direct)), (s.arm, Some(&s.gateway)), ("baseline", s.baseline.as_ref())];
        for (label, a) in arms.into_iter().filter_map(|(l, a)| Some((l, a?))) {
            for e in &a.first_errors {
                if first {
                    let _ = writeln!(o, "\nFirst errors:\n");
                    first = false;
                }
                let _ = writeln!(o, "- {} {label}: {e}", s.name);
            }
        }
    }
    o
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    // `cargo bench` passes `--bench`; other arguments filter scenarios by name.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let mut report = runtime.block_on(run(quick, &selected));
    drop(runtime);
    if selected(AUDIT_STEP) {
        let calls = if quick { 10_000 } else { 100_000 };
        eprintln!("{AUDIT_STEP}: {calls} calls per measurement");
        report.audit = Some(audit_bench(calls));
    }
    let report = render(&report);
    print!("{report}");
    let path = target_dir().join("bench-relay.md");
    match std::fs::write(&path, &report) {
        Ok(()) => eprintln!("wrote {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

/// A random string of a grant token's shape whose checksum does not match: rejected before
/// any store lookup, after the checksum is computed.
fn malformed_token() -> String {
    loop {
        let (a, b) = (NewToken::generate(), NewToken::generate());
        let t = format!("pcl_{}{}", &a.expose()[4..44], &b.expose()[4..10]);
        if !token::well_formed(&t) {
            return t;
        }
    }
}

async fn run(quick: bool, selected: &dyn Fn(&str) -> bool) -> Report {
    let started = today_utc();
    let rounds = if quick { 2 } else { 5 };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (stub, stub_addr) = start_stub().await;
    let build = Build::gateway();
    let bare = start_gateway(&dir.path().join("bare"), stub_addr, false, &build).await;
    let full = start_gateway(&dir.path().join("full"), stub_addr, true, &build).await;
    let baseline = match Build::baseline() {
        Some(b) => Some((
            start_gateway(&dir.path().join("base-bare"), stub_addr, false, &b).await,
            start_gateway(&dir.path().join("base-full"), stub_addr, true, &b).await,
        )),
        None => None,
    };
    // Let start-up work (migrations, lazy statics) settle before sampling the idle footprint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss_kib = status_kib(bare.proc.pid, "VmRSS");
    let full_idle_rss_kib = status_kib(full.proc.pid, "VmRSS");
    eprintln!(
        "stub pid {} on {stub_addr}; bare gateway pid {} on {}, idle RSS {:.1} MiB; full-path gateway pid {} on {}, idle RSS {:.1} MiB",
        stub.pid,
        bare.proc.pid,
        bare.addr,
        mib(idle_rss_kib),
        full.proc.pid,
        full.addr,
        mib(full_idle_rss_kib)
    );
    let bearer =
        |t: &str| Some(HeaderValue::from_str(&format!("Bearer {t}")).expect("a token is a valid header value"));
    let arm = |label, addr: SocketAddr, path, authorization, rejected, settle| {
        let host = HeaderValue::from_str(&addr.to_string()).expect("an address is a valid Host");
        Arc::new(Arm { label, addr, path, host, authorization, rejected, settle })
    };
    let token = full.token.as_deref().expect("the full-path gateway has a grant token");
    // A fresh token that was never stored: well-formed, so the gateway looks it up and finds nothing.
    let unknown = NewToken::generate();
    // The audit writer commits a batch at most 50 ms after its first record; wait it out.
    let audit_settle = Duration::from_millis(200);
    let direct = arm("direct", stub_addr, "/mcp", None, false, Duration::ZERO);
    let via_bare = arm("gateway", bare.addr, "/mcp/stub", None, false, Duration::ZERO);
    let via_full = arm("full path", full.addr, "/mcp/stub", bearer(token), false, audit_settle);
    let via_unknown = arm("unknown token", full.addr, "/mcp/stub", bearer(unknown.expose()), true, audit_settle);
    let malformed = bearer(&malformed_token());
    let via_malformed = arm("malformed token", full.addr, "/mcp/stub", malformed.clone(), true, audit_settle);
    // The baseline's arms: the same requests to its own two gateways.
    let base_arms = baseline.as_ref().map(|(bare, full)| {
        let token = full.token.as_deref().expect("the full-path gateway has a grant token");
        let base =
            |addr, authorization, rejected, settle| arm("baseline", addr, "/mcp/stub", authorization, rejected, settle);
        [
            base(bare.addr, None, false, Duration::ZERO),
            base(full.addr, bearer(token), false, audit_settle),
            base(full.addr, bearer(unknown.expose()), true, audit_settle),
            base(full.addr, malformed.clone(), true, audit_settle),
        ]
    });
    let mut results = Vec::new();
    for sc in scenarios(quick) {
        if !selected(sc.name) {
            continue;
        }
        let (via, gateway_pid) = match sc.route {
            Route::Bare => (&via_bare, bare.proc.pid),
            Route::Full => (&via_full, full.proc.pid),
            Route::UnknownToken => (&via_unknown, full.proc.pid),
            Route::MalformedToken => (&via_malformed, full.proc.pid),
        };
        let pids = Pids { gateway: gateway_pid, stub: stub.pid };
        let base = match (&baseline, &base_arms) {
            (Some((bare, full)), Some(arms)) => Some(match sc.route {
                Route::Bare => Baseline { arm: &arms[0], pid: bare.proc.pid },
                Route::Full => Baseline { arm: &arms[1], pid: full.proc.pid },
                Route::UnknownToken => Baseline { arm: &arms[2], pid: full.proc.pid },
                Route::MalformedToken => Baseline { arm: &arms[3], pid: full.proc.pid },
            }),
            _ => None,
        };
        eprint!("{:<19} c={:<3} {} rounds × {} requests per arm ", sc.name, sc.concurrency, rounds, sc.per_round);
        results.push(run_scenario(&sc, &direct, via, &pids, base, rounds).await);
    }
    let peak_hwm_kib = status_kib(bare.proc.pid, "VmHWM");
    let full_peak_hwm_kib = status_kib(full.proc.pid, "VmHWM");
    if let Some((bare, full)) = baseline {
        full.proc.stop().await;
        bare.proc.stop().await;
    }
    full.proc.stop().await;
    bare.proc.stop().await;
    stub.stop().await;
    Report {
        quick,
        rounds,
        results,
        idle_rss_kib,
        peak_hwm_kib,
        full_idle_rss_kib,
        full_peak_hwm_kib,
        audit: None,
        started,
    }
}

// ---------------------------------------------------------------------------------------------
// The audit step on the request path

/// The name `cargo bench --bench relay -- audit` selects.
const AUDIT_STEP: &str = "audit step";
/// Records per timed batch of the enqueue measurement (well below the channel's capacity).
const AUDIT_BATCH: usize = 1_000;

struct AuditBench {
    calls: usize,
    /// `record()` of prebuilt records, ns per call.
    enqueue_ns: f64,
    /// Building the record + `write().await`, per call.
    step_mean_ns: f64,
    step_p50_ns: f64,
    step_p99_ns: f64,
    /// `Instant::now()` + `elapsed()`, median.
    timer_ns: f64,
    /// CPU time of this process while the writer committed the records of measurement 1, per
    /// record: the background side (redaction, hash chain, SQLite), off the request path.
    writer_cpu_ns: f64,
    stats: WriterStats,
}

/// Times the audit writer's request-path side on a current-thread runtime of its own, so that
/// nothing else runs during a timed call; the writer task runs between calls.
fn audit_bench(calls: usize) -> AuditBench {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("the tokio runtime starts");
    runtime.block_on(audit_step(calls))
}

async fn audit_step(calls: usize) -> AuditBench {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("audit.db").display()))
        .await
        .expect("the SQLite store opens");
    let writer = AuditWriter::start(store.clone(), &AuditConfig::default());
    let clock = Clock::system();
    let principal_id = uuid::Uuid::now_v7().to_string();
    let token_id = uuid::Uuid::now_v7().to_string();
    // What `AppState::finish` builds for a `tools/call` on the full path: a fresh request id,
    // the time, the principal's and the server's strings cloned. It moves the strings it
    // already owns (method, tool, token id, client version) where this allocates them, so this
    // slightly overstates the cost.
    let build = || Record {
        principal_id: Some(principal_id.clone()),
        principal_kind: Some("user".to_owned()),
        principal_name: Some("bench".to_owned()),
        token_id: Some(token_id.clone()),
        client_name: Some("portcullis-bench".to_owned()),
        client_version: Some("0.1.0".to_owned()),
        server: Some("stub".to_owned()),
        tool: Some("small".to_owned()),
        arguments: Arguments::new(serde_json::Value::Object(serde_json::Map::new())),
        upstream_status: Some(200),
        latency_us: 150,
        bytes_in: 85,
        bytes_out: 91,
        ..Record::new(clock.unix_millis(), uuid::Uuid::now_v7().to_string(), "tools/call", Decision::Allow)
    };

    // 1. The hand-over alone: prebuilt records, the writer idle (flushed between batches). The
    // flushes are timed separately, in CPU time: that is the writer's background cost.
    let me = std::process::id();
    let mut enqueue = Duration::ZERO;
    let mut writer_cpu = 0;
    let mut done = 0;
    while done < calls {
        let k = AUDIT_BATCH.min(calls - done);
        let records: Vec<Record> = (0..k).map(|_| build()).collect();
        let t0 = Instant::now();
        for record in records {
            writer.record(record);
        }
        enqueue += t0.elapsed();
        let cpu_before = cpu_ns(me);
        writer.flush().await.expect("the audit batch commits");
        writer_cpu += cpu_ns(me).saturating_sub(cpu_before);
        done += k;
    }

    // 2. The whole step as the request path takes it, one call at a time; between calls the
    // writer task takes the record and waits again, so every call also wakes it. Calls come far
    // faster here than requests do, so whenever a batch's worth is pending the bench lets the
    // writer catch up (untimed), keeping the channel far from full as it is in the gateway.
    let mut step = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t0 = Instant::now();
        writer.write(build()).await.expect("async durability answers at once");
        step.push(t0.elapsed().as_nanos() as u64);
        tokio::task::yield_now().await;
        if writer.backlog() >= AUDIT_BATCH as u64 {
            writer.flush().await.expect("the audit batch commits");
        }
    }
    writer.flush().await.expect("the audit batch commits");

    let mut timer: Vec<u64> = (0..10_000)
        .map(|_| {
            let t0 = Instant::now();
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    timer.sort_unstable();
    let stats = writer.stats();
    writer.shutdown().await;
    store.close().await;
    let mean = step.iter().sum::<u64>() as f64 / calls.max(1) as f64;
    step.sort_unstable();
    AuditBench {
        calls,
        enqueue_ns: enqueue.as_nanos() as f64 / calls.max(1) as f64,
        step_mean_ns: mean,
        step_p50_ns: percentile_us(&step, 50.0) * 1000.0,
        step_p99_ns: percentile_us(&step, 99.0) * 1000.0,
        timer_ns: percentile_us(&timer, 50.0) * 1000.0,
        writer_cpu_ns: writer_cpu as f64 / calls.max(1) as f64,
        stats,
    }
}
