//! Relay benchmark: what the gateway adds to one MCP `tools/call`, in latency, CPU and memory.
//!
//! ```text
//! cargo bench --bench relay                  # full run (a few minutes)
//! BENCH_QUICK=1 cargo bench --bench relay    # smoke run (seconds)
//! cargo bench --bench relay -- small         # only scenarios whose name contains "small"
//! BENCH_GATEWAY_BIN=/path/to/portcullis cargo bench --bench relay   # another gateway build
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
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const PROTOCOL: &str = "2025-11-25";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

// Targets (see docs/performance.md).
const TARGET_CPU_US_C16: f64 = 40.0;
const TARGET_ADDED_P50_US_C1: f64 = 100.0;
const TARGET_IDLE_RSS_MIB: f64 = 15.0;

// ---------------------------------------------------------------------------------------------
// Scenarios

struct Scenario {
    name: &'static str,
    tool: &'static str,
    concurrency: usize,
    /// Requests per round per arm.
    per_round: usize,
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let s = |name, tool, concurrency, full: usize, quick_n: usize| Scenario {
        name,
        tool,
        concurrency,
        per_round: if quick { quick_n } else { full },
    };
    vec![
        s("small c1", "small", 1, 3_000, 200),
        s("small c16", "small", 16, 10_000, 1_000),
        s("small c64", "small", 64, 10_000, 1_000),
        s("64k c16", "64k", 16, 3_000, 300),
        s("1m c16", "1m", 16, 200, 48),
        s("sse c16", "sse", 16, 10_000, 1_000),
    ]
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process, killed when dropped (also when the bench panics and unwinds).
struct Proc {
    child: Child,
    pid: u32,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &str) -> Proc {
        let child = cmd.kill_on_drop(true).spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let pid = child.id().expect("a just-spawned child has a pid");
        Proc { child, pid }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn start_stub() -> (Proc, SocketAddr) {
    let mut stub = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_portcullis-bench-stub"))
            .args(["0", "--exit-on-stdin-eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
        "the stub",
    );
    let stdout = stub.child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the stub prints its address within 30s")
        .expect("the stub's stdout is readable")
        .expect("the stub prints its address before exiting");
    let addr = line
        .strip_prefix("listening http://")
        .and_then(|rest| rest.strip_suffix("/mcp"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected stub banner {line:?}"));
    (stub, addr)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("bound").port()
}

async fn start_gateway(dir: &std::path::Path, stub: SocketAddr) -> (Proc, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let data = dir.join("data");
    let config = dir.join("portcullis.toml");
    let toml = format!(
        "[gateway]\nlisten = \"{addr}\"\ndata_dir = {data:?}\n\n[log]\nlevel = \"warn\"\n\n[audit]\nenabled = false\n\n\
         [[servers]]\nname = \"stub\"\nurl = \"http://{stub}/mcp\"\npublic = true\n",
        data = data.display().to_string(),
    );
    std::fs::write(&config, toml).expect("write the gateway config");
    // BENCH_GATEWAY_BIN runs another build of the gateway (a profiling build, an older commit).
    let bin = std::env::var_os("BENCH_GATEWAY_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portcullis")), PathBuf::from);
    let mut gw = Proc::spawn(
        Command::new(&bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
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
        if healthz(addr).await {
            return (gw, addr);
        }
        assert!(Instant::now() < deadline, "the gateway did not answer /healthz within 60s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn healthz(addr: SocketAddr) -> bool {
    let Ok(mut tx) = connect(addr).await else {
        return false;
    };
    let req =
        Request::get("/healthz").header(HOST, addr.to_string()).body(Full::new(Bytes::new())).expect("a valid request");
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
}

/// One keep-alive connection with its own MCP session.
struct Conn {
    tx: SendRequest<Full<Bytes>>,
    session: HeaderValue,
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
    Ok(Conn { tx, session })
}

/// One `tools/call`; `Err((message, connection_broken))`.
async fn call(conn: &mut Conn, arm: &Arm, tool: &str, id: usize) -> Result<(), (String, bool)> {
    let body =
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#);
    let sent =
        tokio::time::timeout(REQUEST_TIMEOUT, post(&mut conn.tx, arm, Some(&conn.session), Bytes::from(body))).await;
    let (status, headers, body) = match sent {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err((e, true)),
        Err(_) => {
            return Err((format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()), true));
        }
    };
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
    direct: ArmResult,
    gateway: ArmResult,
    gateway_hwm_kib: u64,
    gateway_cpu_ticks: u64,
}

async fn run_scenario(
    sc: &Scenario,
    direct: &Arc<Arm>,
    gateway: &Arc<Arm>,
    pids: &Pids,
    rounds: usize,
) -> ScenarioResult {
    let ticks_per_sec = clock_ticks_per_sec();
    let mut conns_direct = open_all(direct, sc.concurrency).await;
    let mut conns_gateway = open_all(gateway, sc.concurrency).await;
    // Warm-up (discarded): fills connection pools, caches and allocator arenas on both paths.
    let warm = (sc.per_round / 5).max(sc.concurrency * 4);
    round(&mut conns_direct, direct, sc.tool, warm, pids, &mut Tally::default()).await;
    round(&mut conns_gateway, gateway, sc.tool, warm, pids, &mut Tally::default()).await;
    let mut d = Tally::default();
    let mut g = Tally::default();
    for r in 0..rounds {
        // Alternate which arm goes first so drift (thermal, neighbours) does not favour one.
        if r % 2 == 0 {
            round(&mut conns_direct, direct, sc.tool, sc.per_round, pids, &mut d).await;
            round(&mut conns_gateway, gateway, sc.tool, sc.per_round, pids, &mut g).await;
        } else {
            round(&mut conns_gateway, gateway, sc.tool, sc.per_round, pids, &mut g).await;
            round(&mut conns_direct, direct, sc.tool, sc.per_round, pids, &mut d).await;
        }
        eprint!(".");
    }
    eprintln!();
    let gateway_cpu_ticks = g.gateway_cpu.ticks;
    ScenarioResult {
        name: sc.name,
        direct: ArmResult::from(d, ticks_per_sec),
        gateway: ArmResult::from(g, ticks_per_sec),
        gateway_hwm_kib: status_kib(pids.gateway, "VmHWM"),
        gateway_cpu_ticks,
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn today_utc() -> String {
    let secs = portcullis::clock::Clock::system().unix_secs();
    // Days to civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
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

struct Report<'a> {
    quick: bool,
    rounds: usize,
    results: &'a [ScenarioResult],
    idle_rss_kib: u64,
    peak_hwm_kib: u64,
    started: String,
}

fn render(r: &Report<'_>) -> String {
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
    for s in r.results {
        for (label, a) in [("direct", &s.direct), ("gateway", &s.gateway)] {
            let added = if label == "gateway" { us(a.p50 - s.direct.p50) } else { String::new() };
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
    for s in r.results {
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
    let find = |name: &str| r.results.iter().find(|s| s.name == name);
    let errors: usize = r.results.iter().map(|s| s.direct.errors + s.gateway.errors).sum();
    let _ = writeln!(o, "\nTargets:\n");
    let _ = writeln!(o, "| target | limit | measured | verdict |");
    let _ = writeln!(o, "|---|--:|--:|---|");
    match find("small c16") {
        Some(s) => {
            let v = s.gateway.gateway_cpu_us;
            let _ = writeln!(
                o,
                "| gateway CPU per request, small c16 | ≤ {TARGET_CPU_US_C16} µs | {} µs | {} |",
                us(v),
                met(v <= TARGET_CPU_US_C16)
            );
        }
        None => {
            let _ = writeln!(o, "| gateway CPU per request, small c16 | ≤ {TARGET_CPU_US_C16} µs | not run | – |");
        }
    }
    match find("small c1") {
        Some(s) => {
            let v = s.gateway.p50 - s.direct.p50;
            let _ = writeln!(
                o,
                "| added p50 latency, small c1 | ≤ {TARGET_ADDED_P50_US_C1} µs | {} µs | {} |",
                us(v),
                met(v <= TARGET_ADDED_P50_US_C1)
            );
        }
        None => {
            let _ = writeln!(o, "| added p50 latency, small c1 | ≤ {TARGET_ADDED_P50_US_C1} µs | not run | – |");
        }
    }
    let idle = mib(r.idle_rss_kib);
    let _ = writeln!(
        o,
        "| gateway RSS idle (VmRSS before load) | ≤ {TARGET_IDLE_RSS_MIB} MiB | {idle:.1} MiB | {} |",
        met(idle <= TARGET_IDLE_RSS_MIB)
    );
    let _ = writeln!(o, "| gateway RSS peak (VmHWM after all scenarios) | – | {:.1} MiB | – |", mib(r.peak_hwm_kib));
    let _ = writeln!(o, "| errors, all scenarios and arms | 0 | {errors} | {} |", met(errors == 0));
    let _ = writeln!(
        o,
        "\nFor scale: the best Rust peer spends about 85 µs of CPU per relayed MCP request and adds about 170 µs at concurrency 1."
    );
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
    let mut first = true;
    for s in r.results {
        for (label, a) in [("direct", &s.direct), ("gateway", &s.gateway)] {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let report = runtime.block_on(run(quick, &filters));
    print!("{report}");
    let path = target_dir().join("bench-relay.md");
    match std::fs::write(&path, &report) {
        Ok(()) => eprintln!("wrote {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

async fn run(quick: bool, filters: &[String]) -> String {
    let started = today_utc();
    let rounds = if quick { 2 } else { 5 };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (stub, stub_addr) = start_stub().await;
    let (gateway, gateway_addr) = start_gateway(dir.path(), stub_addr).await;
    let pids = Pids { gateway: gateway.pid, stub: stub.pid };
    // Let start-up work (migrations, lazy statics) settle before sampling the idle footprint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss_kib = status_kib(pids.gateway, "VmRSS");
    eprintln!(
        "stub pid {} on {stub_addr}, gateway pid {} on {gateway_addr}, gateway idle RSS {:.1} MiB",
        pids.stub,
        pids.gateway,
        mib(idle_rss_kib)
    );
    let host = |a: SocketAddr| HeaderValue::from_str(&a.to_string()).expect("an address is a valid Host");
    let direct = Arc::new(Arm { label: "direct", addr: stub_addr, path: "/mcp", host: host(stub_addr) });
    let via = Arc::new(Arm { label: "gateway", addr: gateway_addr, path: "/mcp/stub", host: host(gateway_addr) });
    let mut results = Vec::new();
    for sc in scenarios(quick) {
        if !filters.is_empty() && !filters.iter().any(|f| sc.name.contains(f.as_str())) {
            continue;
        }
        eprint!("{:<10} c={:<3} {} rounds × {} requests per arm ", sc.name, sc.concurrency, rounds, sc.per_round);
        results.push(run_scenario(&sc, &direct, &via, &pids, rounds).await);
    }
    let peak_hwm_kib = status_kib(pids.gateway, "VmHWM");
    gateway.stop().await;
    stub.stop().await;
    render(&Report { quick, rounds, results: &results, idle_rss_kib, peak_hwm_kib, started })
}
