//! Soak benchmark: one million relayed `tools/call`s with nobody scraping `/metrics`, and the
//! gateway's RSS before, during and after.
//!
//! ```text
//! cargo bench --bench soak                       # 1,000,000 requests, audit off
//! SOAK_REQUESTS=200000 cargo bench --bench soak  # fewer
//! SOAK_AUDIT=1 cargo bench --bench soak          # with the audit log on (async durability)
//! SOAK_CONNECTIONS=16 cargo bench --bench soak   # more concurrent keep-alive connections
//! SOAK_AUDIT=1 SOAK_DURABILITY=strict cargo bench --bench soak   # audit on, strict durability
//! SOAK_AUDIT_CONFIG='capacity = 10000' SOAK_AUDIT=1 cargo bench --bench soak  # more [audit] lines
//! SOAK_GATEWAY_BIN=/path/to/portcullis cargo bench --bench soak   # another build of the gateway
//! SOAK_SMAPS_DIR=/tmp/smaps cargo bench --bench soak   # a copy of /proc/PID/smaps at each reading
//! ```
//!
//! It starts `portcullis-bench-stub` and `portcullis serve` (a `public = true` server in front
//! of the stub) as child processes, opens one MCP session, and drives closed-loop load over
//! HTTP/1.1 keep-alive connections. RSS (`VmRSS` of `/proc/PID/status`) is read once the
//! gateway is ready, after a 10,000-request warm-up, after every further 100,000 and at the
//! end, and once more after the load has stopped and the audit log has caught up (the "settled"
//! figure: what the process keeps); the peak is `VmHWM`. Only then is `/metrics` read once, for
//! the audit writer's counters. The last line is one JSON object with the figures. See
//! docs/performance.md.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const WARMUP: usize = 10_000;
const STEP: usize = 100_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the gateway runs");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect(field)
}

fn rss_kib(pid: u32) -> u64 {
    if let Ok(dir) = std::env::var("SOAK_SMAPS_DIR") {
        let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        let _ = std::fs::copy(format!("/proc/{pid}/smaps"), format!("{dir}/{n:02}.smaps"));
    }
    status_kib(pid, "VmRSS:")
}

/// The value of an unlabelled series in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn start_stub() -> (Child, String) {
    let mut stub = Command::new(env!("CARGO_BIN_EXE_portcullis-bench-stub"))
        .args(["0", "--exit-on-stdin-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the stub runs");
    let mut lines = tokio::io::BufReader::new(stub.stdout.take().expect("stdout")).lines();
    let line = lines.next_line().await.expect("stdout").expect("the stub's address");
    let url = line.trim().strip_prefix("listening ").expect("a `listening` line").to_owned();
    (stub, url)
}

async fn start_gateway(dir: &Path, stub_url: &str, audit: bool) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let config = dir.join("portcullis.toml");
    let audit = if audit {
        let durability = std::env::var("SOAK_DURABILITY").unwrap_or_else(|_| "async".to_owned());
        let extra = std::env::var("SOAK_AUDIT_CONFIG").unwrap_or_default();
        format!("[audit]\ndurability = {durability:?}\n{extra}\n\n")
    } else {
        "[audit]\nenabled = false\n\n".to_owned()
    };
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n\n[log]\nlevel = \"warn\"\n\n{audit}\
         [[servers]]\nname = \"stub\"\nurl = \"{stub_url}\"\npublic = true\n",
        dir.join("data").display().to_string()
    );
    std::fs::write(&config, text).expect("config");
    let bin = std::env::var("SOAK_GATEWAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_portcullis").to_owned());
    let gateway = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway runs");
    let addr = format!("127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("http://{addr}/readyz")).send().await
            && r.status() == 200
        {
            return (gateway, addr);
        }
        assert!(Instant::now() < deadline, "the gateway was not ready within 60s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn open_session(addr: &str) -> String {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/mcp/stub");
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "soak", "version": "1"}}});
    let resp = client
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .json(&init)
        .send()
        .await
        .expect("initialize");
    let session = resp.headers()["mcp-session-id"].to_str().expect("ascii").to_owned();
    let note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    client
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&note)
        .send()
        .await
        .expect("initialized");
    session
}

/// `count` `tools/call`s over `connections` keep-alive connections.
async fn relay(addr: &str, session: &str, connections: usize, count: usize) {
    let left = Arc::new(AtomicUsize::new(count));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (addr, session, left) = (addr.to_owned(), session.to_owned(), left.clone());
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(TcpStream::connect(&addr).await.expect("connect"));
                let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.expect("handshake");
                tokio::spawn(conn);
                let mut id = 0u64;
                while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                    id += 1;
                    let body = format!(
                        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"small","arguments":{{}}}}}}"#
                    );
                    let req = http::Request::post("/mcp/stub")
                        .header("host", &addr)
                        .header("content-type", "application/json")
                        .header("accept", "application/json, text/event-stream")
                        .header("mcp-session-id", &session)
                        .header("mcp-protocol-version", "2025-11-25")
                        .body(Full::new(Bytes::from(body)))
                        .expect("request");
                    let resp = tx.send_request(req).await.expect("answered");
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.expect("body");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("joined");
    }
}

#[tokio::main]
async fn main() {
    let total = env_usize("SOAK_REQUESTS", 1_000_000).max(WARMUP);
    let connections = env_usize("SOAK_CONNECTIONS", 8).max(1);
    let audit = std::env::var("SOAK_AUDIT").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_stub, stub_url) = start_stub().await;
    let (gateway, addr) = start_gateway(dir.path(), &stub_url, audit).await;
    let pid = gateway.id().expect("pid");
    let session = open_session(&addr).await;
    let ready = rss_kib(pid);
    println!("soak: {total} requests, {connections} connections, audit {}", if audit { "on" } else { "off" });
    println!("{:>10}  {:>10}  {:>8}", "requests", "RSS KiB", "req/s");
    println!("{:>10}  {ready:>10}  {:>8}", 0, "-");
    let started = Instant::now();
    relay(&addr, &session, connections, WARMUP).await;
    let warm = rss_kib(pid);
    println!("{WARMUP:>10}  {warm:>10}  {:>8.0}", WARMUP as f64 / started.elapsed().as_secs_f64());
    let mut done = WARMUP;
    while done < total {
        let step = STEP.min(total - done);
        let t = Instant::now();
        relay(&addr, &session, connections, step).await;
        done += step;
        println!("{done:>10}  {:>10}  {:>8.0}", rss_kib(pid), step as f64 / t.elapsed().as_secs_f64());
    }
    let end = rss_kib(pid);
    let secs = started.elapsed().as_secs_f64();
    // The load has stopped: what the audit writer still holds is committed within a batch's
    // delay; what the process keeps after that is retained, not in use.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = rss_kib(pid);
    let peak = status_kib(pid, "VmHWM:");
    println!("{:>10}  {settled:>10}  settled (2 s after the load); peak (VmHWM) {peak} KiB", "-");
    let metrics = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let count = |name| metric(&metrics, name).unwrap_or(0.0) as u64;
    let growth = |to: u64, from: u64| i64::try_from(to).unwrap_or(0) - i64::try_from(from).unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "requests": total, "connections": connections, "audit": audit, "seconds": (secs * 10.0).round() / 10.0,
            "rss_kib": {"ready": ready, "after_warmup": warm, "end": end, "settled": settled, "peak": peak},
            "growth_kib": {"end": growth(end, ready), "settled": growth(settled, ready), "peak": growth(peak, ready)},
            "growth_kib_after_warmup": growth(end, warm),
            "audit_records": {
                "written": count("portcullis_audit_written_total"),
                "overflowed": count("portcullis_audit_overflow_total"),
                "shed": count("portcullis_audit_shed_total"),
                "batches": count("portcullis_audit_batch_seconds_count"),
                "batch_ms_mean": (metric(&metrics, "portcullis_audit_batch_seconds_sum").unwrap_or(0.0) * 1e3
                    / metric(&metrics, "portcullis_audit_batch_seconds_count").unwrap_or(1.0).max(1.0) * 100.0)
                    .round() / 100.0,
                "waits": count("portcullis_audit_waits_total"),
            },
        })
    );
}
