//! Instructions per request: the gateway under callgrind, serving a fixed number of relayed
//! `tools/call`s, with the count split by the part of the request path that spent it.
//!
//! ```text
//! cargo bench --bench instructions                     # small (bare relay), full path, unknown token
//! cargo bench --bench instructions -- small            # scenarios whose name contains "small"
//! BENCH_GATEWAY_BIN=/path/to/portcullis cargo bench --bench instructions   # another build
//! ```
//!
//! Unlike CPU time, an instruction count does not depend on what else runs on the machine, so
//! two builds can be compared on a busy machine, and a difference of a few hundred
//! instructions per request shows. It needs `valgrind` (with `callgrind_control`) on `PATH`.
//! For function names the gateway binary needs symbols: build it with
//! `CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_PROFILE_RELEASE_STRIP=none`.
//!
//! Each scenario starts `portcullis-bench-stub` and one gateway configured as in
//! `bench/relay.rs` (the bare relay, or the full path with a grant token, the audit log and a
//! static upstream credential), the gateway under `valgrind --tool=callgrind`. It opens
//! `INSTR_CONCURRENCY` keep-alive connections (default 1), each with its MCP session, sends a
//! warm-up of 200 calls, zeroes the counters (`callgrind_control -z`), sends `INSTR_REQUESTS`
//! calls (default 2000) in a closed loop, waits for the audit writer's last batch, and dumps
//! the counters (`callgrind_control -d`). Everything the gateway's threads executed between
//! the zero and the dump is divided by the number of requests: the listener, the layers, the
//! handler, the upstream client, the audit writer, tokio and the allocator alike. Kernel time
//! is not counted (callgrind sees user space only).
//!
//! The split by part ([`PARTS`]) adds up the inclusive cost of the functions that enter each
//! part, less that of the inner parts they call (see [`Profile::part`]). A part's functions
//! missing from a build (an older revision) count as zero. The report and each dump are
//! written to `target/bench-instructions/`.

#[path = "support.rs"]
mod support;

use std::collections::HashMap;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use portcullis::authn::token::NewToken;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use support::{Proc, start_stub};

const PROTOCOL: &str = "2025-11-25";
const WARM_UP: usize = 200;

/// Which gateway and credential a scenario uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Audit off, a public server.
    Bare,
    /// A grant token, the audit log on, a static upstream credential.
    Full,
    /// The full-path gateway, a well-formed token it does not know (401).
    UnknownToken,
}

const SCENARIOS: [(&str, Route); 3] =
    [("small", Route::Bare), ("full", Route::Full), ("unknown-token", Route::UnknownToken)];

/// Functions whose inclusive costs are added up, calls between them counted once. A pattern
/// matches the start of callgrind's demangled names, so that one covers every instantiation
/// and closure of a generic function.
type Set = &'static [&'static str];
/// The first of these sets whose every pattern is found in the build (revisions differ in
/// their functions and in what the compiler inlined); a single set counts whichever of its
/// patterns are found.
type Choice = &'static [Set];

/// The connection task: `axum::serve`'s before the listener of issue 17, the listener's after.
const CONNECTION: Choice =
    &[&["portcullis::listener::connection::{{closure}}"], &["axum::serve::handle_connection::{{closure}}"]];
/// What the connection task calls for each request: the layers (the revisions with them) and,
/// inside them, the gateway's front service (`app::Gate`, `app::Front`).
const SERVICE: Choice = &[
    &[
        "<portcullis::layers::Admit<S> as tower_service::Service",
        "<portcullis::layers::Admitted<F> as core::future::future::Future>::poll",
    ],
    &[
        "<portcullis::layers::Admit<S> as tower_service::Service",
        "<tracing::instrument::Instrumented<T> as core::future::future::Future>::poll",
    ],
    &["<portcullis::app::Gate as tower_service::Service", "portcullis::app::Front::call::{{closure}}"],
];
const LAYERS: Choice = &[SERVICE[0], SERVICE[1]];
const GATE: Choice = &[&["<portcullis::app::Gate as tower_service::Service"]];
const FRONT: Choice = &[&["portcullis::app::Front::call::{{closure}}"]];
const PER_PRINCIPAL: Choice = &[&[
    "portcullis::layers::admitted",
    "portcullis::layers::before_lookup",
    "portcullis::layers::authentication_succeeded",
    "portcullis::layers::authentication_failed",
]];
const ADMISSION: Choice = &[&[
    "portcullis::transport::http::admit::{{closure}}",
    "portcullis::authn::authenticate",
    "portcullis::authn::Authenticator::",
    "portcullis::authn::bearer_hash",
    "portcullis::authn::check",
    "portcullis::authn::lookup",
    "portcullis::authn::principal_of",
    "portcullis::authn::token::",
    "portcullis::authn::cache::TokenCache::get",
    "portcullis::transport::origin::HostPolicy::check",
    "portcullis::origin::HostPolicy::check",
    "portcullis::app::AppState::touch_token",
    "portcullis::store::identity::TokenAuth::usable_for",
]];
const READING: Choice = &[&[
    "portcullis::protocol::jsonrpc::Body::parse",
    "portcullis::transport::jsonrpc::Body::parse",
    "portcullis::protocol::jsonrpc::Message::tool_call",
    "portcullis::transport::exchange::Exchange::note_message",
]];
const SESSION: Choice =
    &[&["portcullis::protocol::session::Sealer::open", "portcullis::transport::session::Sealer::open"]];
const UPSTREAM: Choice =
    &[&["portcullis::upstream::Upstream::send::{{closure}}", "portcullis::transport::reply::post_response"]];
const EXCHANGE: Choice = &[&[
    "portcullis::transport::exchange::Exchange::new",
    "portcullis::transport::exchange::Exchange::record",
    "portcullis::transport::exchange::<impl ",
    "<portcullis::transport::exchange::Exchange as core::ops::drop::Drop>::drop",
]];
const AUDIT_WRITER: Choice = &[&[
    "portcullis::audit::writer::Task::run::{{closure}}",
    "portcullis::audit::storage::append_rows",
    "portcullis::store::audit::append_rows",
]];

/// The parts of a request's cost. Each is the inclusive cost of its `plus` choices less that
/// of its `minus` choices; a part whose functions a build lacks (an older revision) shows
/// zero. Inlining moves a few hundred instructions between neighbouring parts from one build
/// to the next; the totals are exact.
const PARTS: &[Part] = &[
    Part {
        name: "HTTP server: hyper, the connection task (`axum::serve`, then `listener`), response bodies",
        plus: &[CONNECTION],
        minus: &[SERVICE],
    },
    Part {
        name: "layers: request id, one `Authorization`, gateway-wide permit, scope, panics caught",
        plus: &[LAYERS],
        minus: &[GATE, FRONT],
    },
    Part { name: "layers: per-principal permit (called by authentication)", plus: &[PER_PRINCIPAL], minus: &[] },
    Part { name: "front: the handler's future boxed (`app::Gate`)", plus: &[GATE], minus: &[] },
    Part {
        name: "admission: server, `Host`/`Origin`, authentication (none on a public server)",
        plus: &[ADMISSION],
        minus: &[PER_PRINCIPAL],
    },
    Part { name: "reading: envelope, strictness, tool call", plus: &[READING], minus: &[] },
    Part { name: "session: the sealed id opened", plus: &[SESSION], minus: &[] },
    Part { name: "upstream: request sent, answer read and relayed", plus: &[UPSTREAM], minus: &[] },
    Part { name: "exchange: opened, finished, metrics, record handed to the writer", plus: &[EXCHANGE], minus: &[] },
    Part {
        name: "handler steps: `transport::http`, dispatch, reply",
        plus: &[FRONT],
        minus: &[ADMISSION, READING, SESSION, UPSTREAM, EXCHANGE],
    },
    Part { name: "audit writer (off the request path)", plus: &[AUDIT_WRITER], minus: &[] },
];

struct Part {
    name: &'static str,
    plus: &'static [Choice],
    minus: &'static [Choice],
}

// ---------------------------------------------------------------------------------------------
// Processes

fn gateway_bin() -> PathBuf {
    std::env::var_os("BENCH_GATEWAY_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portcullis")), PathBuf::from)
}

/// `portcullis --config CONFIG`, or `valgrind … portcullis --config CONFIG`, with a clean
/// environment.
fn gateway_command(config: &Path, callgrind_out: Option<&Path>) -> Command {
    let mut cmd = match callgrind_out {
        Some(out) => {
            let mut cmd = Command::new("valgrind");
            cmd.arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .args(["--compress-strings=no", "--compress-pos=no", "--quiet"])
                .arg(gateway_bin());
            cmd
        }
        None => Command::new(gateway_bin()),
    };
    cmd.arg("--config").arg(config).env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PORTCULLIS_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

async fn gateway_cli(config: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = gateway_command(config, None);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run portcullis {args:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes()).await.expect("write to the CLI's stdin");
    }
    let out = child.wait_with_output().await.expect("the CLI's output is readable");
    assert!(out.status.success(), "portcullis {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes the gateway's config in `dir` (as `bench/relay.rs` does) and, for the full path,
/// prepares its data directory; returns the config and the grant token.
async fn prepare(dir: &Path, stub: SocketAddr, full: bool, addr: SocketAddr) -> (PathBuf, Option<String>) {
    std::fs::create_dir_all(dir).expect("create the gateway's directory");
    let data = dir.join("data").display().to_string();
    let config = dir.join("portcullis.toml");
    let toml = if full {
        let limits = match std::env::var_os("BENCH_NO_LIMITS") {
            Some(_) => "",
            None => "[limits]\nfailed_auth_per_minute = 0\nunauthenticated_records_per_minute = 0\n\n",
        };
        format!(
            "[gateway]\nlisten = \"{addr}\"\ndata_dir = {data:?}\n\n[log]\nlevel = \"warn\"\n\n{limits}\
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
    if !full {
        return (config, None);
    }
    gateway_cli(&config, &["user", "add", "bench"], None).await;
    let out = gateway_cli(&config, &["token", "create", "--user", "bench", "--name", "bench"], None).await;
    let token = out.lines().last().unwrap_or_default().trim().to_owned();
    gateway_cli(&config, &["secret", "set", "stub-key"], Some("bench-upstream-key")).await;
    (config, Some(token))
}

// ---------------------------------------------------------------------------------------------
// Client

struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    authorization: Option<HeaderValue>,
    /// 401 expected; no session.
    rejected: bool,
}

struct Conn {
    tx: SendRequest<Full<Bytes>>,
    session: Option<HeaderValue>,
}

async fn post(conn: &mut Conn, t: &Target, body: Bytes) -> (StatusCode, Option<HeaderValue>) {
    let mut req = Request::post("/mcp/stub")
        .header(HOST, t.host.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/json, text/event-stream");
    if let Some(a) = &t.authorization {
        req = req.header(AUTHORIZATION, a.clone());
    }
    if let Some(s) = &conn.session {
        req = req.header("mcp-session-id", s.clone()).header("mcp-protocol-version", PROTOCOL);
    }
    let req = req.body(Full::new(body)).expect("a valid request");
    conn.tx.ready().await.expect("the connection is open");
    let resp = conn.tx.send_request(req).await.expect("an answer");
    let session = resp.headers().get("mcp-session-id").cloned();
    let status = resp.status();
    resp.into_body().collect().await.expect("the whole answer");
    (status, session)
}

async fn open(t: &Target) -> Conn {
    let stream = tokio::net::TcpStream::connect(t.addr).await.expect("connect to the gateway");
    stream.set_nodelay(true).expect("nodelay");
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut conn = Conn { tx, session: None };
    if t.rejected {
        return conn;
    }
    let init = format!(
        r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{PROTOCOL}","capabilities":{{}},"clientInfo":{{"name":"portcullis-bench","version":"0.1.0"}}}}}}"#
    );
    let (status, session) = post(&mut conn, t, Bytes::from(init)).await;
    assert_eq!(status, StatusCode::OK, "initialize");
    conn.session = Some(session.expect("initialize answers with a session id"));
    let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    assert_eq!(post(&mut conn, t, note).await.0, StatusCode::ACCEPTED, "notifications/initialized");
    conn
}

/// Sends `n` calls over `conns`, each connection in a closed loop.
async fn load(conns: Vec<Conn>, t: &Arc<Target>, n: usize) -> Vec<Conn> {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (next, t) = (next.clone(), t.clone());
            tokio::spawn(async move {
                loop {
                    let ticket = next.fetch_add(1, Ordering::Relaxed);
                    if ticket >= n {
                        return conn;
                    }
                    let body = format!(
                        r#"{{"jsonrpc":"2.0","id":{},"method":"tools/call","params":{{"name":"small","arguments":{{}}}}}}"#,
                        ticket + 1
                    );
                    let (status, _) = post(&mut conn, &t, Bytes::from(body)).await;
                    let expected = if t.rejected { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
                    assert_eq!(status, expected, "tools/call");
                }
            })
        })
        .collect();
    let mut back = Vec::new();
    for w in workers {
        back.push(w.await.expect("a load worker panicked"));
    }
    back
}

async fn ready(addr: SocketAddr) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else { return false };
    let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else { return false };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get("/readyz").header(HOST, addr.to_string()).body(Full::new(Bytes::new())).expect("valid");
    matches!(tx.send_request(req).await, Ok(r) if r.status() == StatusCode::OK)
}

fn callgrind_control(flag: &str, pid: u32) {
    let out = std::process::Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .output()
        .expect("callgrind_control runs (is valgrind installed?)");
    assert!(out.status.success(), "callgrind_control {flag}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs one scenario; returns the dump's path.
async fn run(name: &str, route: Route, requests: usize, concurrency: usize, out_dir: &Path) -> PathBuf {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let (stub, stub_addr) = start_stub().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("bound").port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (config, token) = prepare(scratch.path(), stub_addr, route != Route::Bare, addr).await;
    let out = out_dir.join(format!("callgrind.{name}.out"));
    for stale in std::fs::read_dir(out_dir).into_iter().flatten().flatten() {
        if stale.file_name().to_string_lossy().starts_with(&format!("callgrind.{name}.out")) {
            let _ = std::fs::remove_file(stale.path());
        }
    }
    let strace = std::env::var_os("INSTR_STRACE").is_some();
    let gateway = Proc::spawn(
        gateway_command(&config, (!strace).then_some(out.as_path()))
            .arg("serve")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit()),
        "the gateway",
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready(addr).await {
        assert!(Instant::now() < deadline, "the gateway under valgrind was not ready within 300s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let authorization = match route {
        Route::Bare => None,
        Route::Full => token.map(|t| HeaderValue::from_str(&format!("Bearer {t}")).expect("a header value")),
        Route::UnknownToken => {
            Some(HeaderValue::from_str(&format!("Bearer {}", NewToken::generate().expose())).expect("a header value"))
        }
    };
    let target = Arc::new(Target {
        addr,
        host: HeaderValue::from_str(&addr.to_string()).expect("a header value"),
        authorization,
        rejected: route == Route::UnknownToken,
    });
    let mut conns = Vec::new();
    for _ in 0..concurrency {
        conns.push(open(&target).await);
    }
    let conns = load(conns, &target, WARM_UP).await;
    // Let the audit writer commit the warm-up's records before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let syscalls = out_dir.join(format!("strace.{name}.txt"));
    let tracer = if strace {
        let t = Proc::spawn(
            Command::new("strace").args(["-c", "-f", "-o"]).arg(&syscalls).arg("-p").arg(gateway.pid.to_string()),
            "strace",
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        Some(t)
    } else {
        callgrind_control("-z", gateway.pid);
        None
    };
    let started = Instant::now();
    let conns = load(conns, &target, requests).await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(mut t) = tracer {
        let _ = std::process::Command::new("kill").arg("-INT").arg(t.pid.to_string()).status();
        let _ = t.child.wait().await;
        eprintln!("{name}: {requests} requests; syscalls in {}", syscalls.display());
        return syscalls;
    }
    callgrind_control("-d", gateway.pid);
    eprintln!(
        "{name}: {requests} requests over {concurrency} connection(s) in {:.1}s under callgrind",
        took.as_secs_f64()
    );
    drop(conns);
    drop(gateway);
    drop(stub);
    let dump = out_dir.join(format!("callgrind.{name}.out.1"));
    // The dump is written by the gateway's process; wait until it is complete.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&dump).is_ok_and(|s| s.contains("\ntotals:")) {
        assert!(Instant::now() < deadline, "no complete dump at {}", dump.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    dump
}

// ---------------------------------------------------------------------------------------------
// The dump

/// One callgrind dump: each function's own cost, and each call edge's inclusive cost.
#[derive(Default)]
struct Profile {
    total: u64,
    own: HashMap<String, u64>,
    /// (caller, callee) -> inclusive cost of the calls.
    calls: HashMap<(String, String), u64>,
}

impl Profile {
    /// Reads a dump written with `--compress-strings=no --compress-pos=no` (one event, `Ir`).
    fn read(path: &Path) -> Profile {
        let file = std::fs::File::open(path).expect("the dump opens");
        let mut p = Profile::default();
        let mut current = String::new();
        let mut callee: Option<String> = None;
        let mut pending_call: Option<String> = None;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.expect("the dump reads");
            if let Some(name) = line.strip_prefix("fn=") {
                current = name.to_owned();
            } else if let Some(name) = line.strip_prefix("cfn=") {
                callee = Some(name.to_owned());
            } else if line.starts_with("calls=") {
                pending_call = callee.take();
            } else if let Some(total) = line.strip_prefix("totals:").or_else(|| line.strip_prefix("summary:")) {
                p.total = total.trim().parse().unwrap_or(p.total);
            } else if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*') {
                let cost: u64 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                match pending_call.take() {
                    Some(to) => *p.calls.entry((current.clone(), to)).or_default() += cost,
                    None => *p.own.entry(current.clone()).or_default() += cost,
                }
            }
        }
        p
    }

    /// The inclusive cost of every function matching one of `patterns`, counting calls between
    /// two matching functions once (a part's entries often call each other).
    fn inclusive(&self, patterns: &[&str]) -> u64 {
        let hit = |f: &str| patterns.iter().any(|p| f.starts_with(p));
        let own: u64 = self.own.iter().filter(|(f, _)| hit(f)).map(|(_, c)| c).sum();
        let out: u64 = self.calls.iter().filter(|((from, to), _)| hit(from) && !hit(to)).map(|(_, c)| c).sum();
        own + out
    }

    /// The instructions executed in functions whose name contains `module`: their own code
    /// and what was inlined into them, not what they call.
    fn own_of(&self, module: &str) -> u64 {
        self.own.iter().filter(|(f, _)| f.contains(module)).map(|(_, c)| c).sum()
    }

    /// The cost of the first set of `choice` whose every pattern is found; a choice of one set
    /// is that set's cost, whichever of its patterns are found.
    fn choice(&self, choice: Choice) -> u64 {
        if let [set] = choice {
            return self.inclusive(set);
        }
        choice.iter().find(|set| set.iter().all(|p| self.inclusive(&[p]) > 0)).map_or(0, |set| self.inclusive(set))
    }

    /// A part's cost (see [`PARTS`]).
    fn part(&self, part: &Part) -> u64 {
        let plus: u64 = part.plus.iter().map(|c| self.choice(c)).sum();
        let minus: u64 = part.minus.iter().map(|c| self.choice(c)).sum();
        plus.saturating_sub(minus)
    }
}

// ---------------------------------------------------------------------------------------------

/// The parts of each dump's requests side by side, in instructions per request.
fn table(columns: &[(String, Profile)], requests: usize) -> String {
    let per = |n: u64| format!("{:.0}", n as f64 / requests.max(1) as f64);
    let mut o = format!(
        "| part | {} |\n|---|{}\n",
        columns.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(" | "),
        "--:|".repeat(columns.len())
    );
    let mut counted = vec![0; columns.len()];
    for part in PARTS {
        let costs: Vec<u64> = columns.iter().map(|(_, p)| p.part(part)).collect();
        for (sum, c) in counted.iter_mut().zip(&costs) {
            *sum += c;
        }
        o.push_str(&format!("| {} | {} |\n", part.name, costs.iter().map(|c| per(*c)).collect::<Vec<_>>().join(" | ")));
    }
    let rest: Vec<String> = columns.iter().zip(&counted).map(|((_, p), c)| per(p.total.saturating_sub(*c))).collect();
    o.push_str(&format!("| everything else: tokio's scheduler and timers, other tasks | {} |\n", rest.join(" | ")));
    let totals: Vec<String> = columns.iter().map(|(_, p)| format!("**{}**", per(p.total))).collect();
    o.push_str(&format!("| **total** | {} |\n", totals.join(" | ")));
    o.push_str(&format!(
        "\nOwn instructions of the modules on the request path (executed in their functions, code the compiler \
         inlined into them included, what they call excluded; not additive with the parts above):\n\n\
         | module | {} |\n|---|{}\n",
        columns.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(" | "),
        "--:|".repeat(columns.len())
    ));
    for module in MODULES {
        let costs: Vec<String> = columns.iter().map(|(_, p)| per(p.own_of(module))).collect();
        o.push_str(&format!("| `{module}` | {} |\n", costs.join(" | ")));
    }
    o.push_str(&format!(
        "\nSteps of the layers, each with what it calls (part of the layers' rows above):\n\n| step | {} |\n|---|{}\n",
        columns.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(" | "),
        "--:|".repeat(columns.len())
    ));
    for (step, choice) in LAYER_STEPS {
        let costs: Vec<String> = columns.iter().map(|(_, p)| per(p.choice(choice))).collect();
        o.push_str(&format!("| {step} | {} |\n", costs.join(" | ")));
    }
    o
}

/// Modules whose own instructions the report shows (see [`Profile::own_of`]): those of
/// issue 17's pipeline, and the reading before it.
const MODULES: &[&str] = &[
    "portcullis::listener::",
    "portcullis::layers::",
    "portcullis::protocol::jsonrpc::",
    "portcullis::transport::jsonrpc::",
    "portcullis::mcp::dispatch::",
    "portcullis::transport::exchange::",
];

/// Steps of the layers, each with what it calls (inclusive), shown apart; they are part of
/// the layers' rows above.
const LAYER_STEPS: &[(&str, Choice)] = &[
    ("request id made (`RequestId::generate`)", &[&["portcullis::layers::RequestId::generate"]]),
    (
        "answer finished: `X-Request-Id` set, permits handed to the body (`layers::finished`)",
        &[&["portcullis::layers::finished"]],
    ),
    ("per-principal permit taken (`layers::admitted`)", &[&["portcullis::layers::admitted"]]),
    (
        "per-principal permit given back (`Held` dropped)",
        &[&[
            "core::ptr::drop_in_place<portcullis::layers::Held>",
            "<portcullis::layers::Held as core::ops::drop::Drop>",
        ]],
    ),
];

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let env_usize =
        |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let requests = env_usize("INSTR_REQUESTS", 2000);
    let concurrency = env_usize("INSTR_CONCURRENCY", 1);
    // Dumps made before (`LABEL=PATH,…`): their parts side by side, nothing run.
    if let Ok(dumps) = std::env::var("INSTR_ANALYZE") {
        let columns: Vec<(String, Profile)> = dumps
            .split(',')
            .map(|d| {
                let (label, path) = d.split_once('=').unwrap_or((d, d));
                (label.to_owned(), Profile::read(Path::new(path)))
            })
            .collect();
        print!("{}", table(&columns, requests));
        return;
    }
    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-instructions");
    std::fs::create_dir_all(&out_dir).expect("create the output directory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let mut report = format!(
        "Gateway `{}`, {requests} requests after {WARM_UP} warm-up, concurrency {concurrency}; instructions per request \
         (callgrind `Ir`, user space, every thread of the gateway):\n\n",
        gateway_bin().display()
    );
    for (name, route) in SCENARIOS {
        if !selected(name) {
            continue;
        }
        let dump = runtime.block_on(run(name, route, requests, concurrency, &out_dir));
        if std::env::var_os("INSTR_STRACE").is_some() {
            continue;
        }
        let columns = [(name.to_owned(), Profile::read(&dump))];
        report.push_str(&format!("### {name}\n\n{}\nDump: `{}`\n\n", table(&columns, requests), dump.display()));
    }
    print!("{report}");
    let path = out_dir.join("report.md");
    std::fs::write(&path, &report).expect("write the report");
    eprintln!("wrote {}", path.display());
}
