//! Shared harness: real gateways on 127.0.0.1:0, real upstream servers, real SDK clients.

#![allow(dead_code)] // a shared harness: not every suite uses every helper

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use portcullis::app::Gateway;
use portcullis::config::Config;
use portcullis::keys::Key;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn node_dir() -> PathBuf {
    let dir = repo().join("tests/node");
    assert!(
        dir.join("node_modules/@modelcontextprotocol/sdk").exists(),
        "tests/node/node_modules is missing: run scripts/test-deps.sh (scripts/test does it)"
    );
    dir
}

pub fn python() -> PathBuf {
    let py = repo().join("tests/python/.venv/bin/python");
    assert!(py.exists(), "tests/python/.venv is missing: run scripts/test-deps.sh (scripts/test does it)");
    py
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Reads stdout lines until one starts with `prefix`; returns the rest of that line.
async fn wait_for_line(child: &mut Child, prefix: &str) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.trim().to_owned());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("the process never printed {prefix:?}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

/// Our fixture MCP server over HTTP; `url` is its Streamable HTTP endpoint.
pub struct Fixture {
    pub url: String,
    _proc: Proc,
}

impl Fixture {
    pub async fn start(args: &[&str]) -> Fixture {
        let mut child = Command::new("node")
            .arg(node_dir().join("fixture-server.mjs"))
            .args(["--http", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let url = wait_for_line(&mut child, "listening ").await;
        Fixture { url, _proc: Proc { child } }
    }

    /// The fixture's legacy SSE endpoint.
    pub fn sse_url(&self) -> String {
        self.url.replace("/mcp", "/sse")
    }

    /// Every request the fixture received (method, path, headers, body).
    pub async fn requests(&self) -> Vec<Value> {
        let url = self.url.replace("/mcp", "/debug/requests");
        reqwest::get(url).await.expect("fixture answers").json().await.expect("json")
    }
}

/// The stdio command line of the fixture, as TOML `command`/`args` keys.
pub fn fixture_stdio_toml() -> String {
    format!(
        "command = \"node\"\nargs = [{:?}, \"--stdio\"]\n",
        node_dir().join("fixture-server.mjs").display().to_string()
    )
}

/// `@modelcontextprotocol/server-everything` over Streamable HTTP on a free port.
pub struct Everything {
    pub url: String,
    _proc: Proc,
}

pub fn everything_entry() -> PathBuf {
    node_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
}

impl Everything {
    pub async fn start() -> Everything {
        let port = free_port();
        let child = Command::new("node")
            .arg(everything_entry())
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let url = format!("http://127.0.0.1:{port}/mcp");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Everything { url, _proc: Proc { child } };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("server-everything did not start");
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A whole gateway, in this process, on 127.0.0.1:0.
pub struct TestGateway {
    gateway: Option<Gateway>,
    pub base: String,
    /// The data directory; hold a clone to use the store after `stop` (which drops the gateway).
    pub dir: std::sync::Arc<tempfile::TempDir>,
}

impl TestGateway {
    /// Starts a gateway whose config is `[gateway]` defaults plus `rest` (usually servers).
    pub async fn start(rest: &str) -> TestGateway {
        Self::start_with(rest, "").await
    }

    /// Like `start`, with extra `[gateway]` keys.
    pub async fn start_with(rest: &str, gateway_keys: &str) -> TestGateway {
        Self::start_keyed(rest, gateway_keys, Key::random()).await
    }

    /// Like `start_with`, with a given master key (replicas share one).
    pub async fn start_keyed(rest: &str, gateway_keys: &str, key: Key) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nshutdown_grace = \"10s\"\n{gateway_keys}\n{rest}",
            dir.path().display().to_string()
        );
        let config = Config::parse(&text, "test.toml", Vec::new()).unwrap_or_else(|e| panic!("config: {e}"));
        let gateway = Gateway::start_with_key(config, key).await.expect("gateway starts");
        let base = format!("http://{}", gateway.addr);
        TestGateway { gateway: Some(gateway), base, dir: std::sync::Arc::new(dir) }
    }

    pub fn url(&self, server: &str) -> String {
        format!("{}/mcp/{server}", self.base)
    }

    /// The running gateway's state.
    pub fn state(&self) -> &portcullis::state::AppState {
        &self.gateway.as_ref().expect("running").state
    }

    pub async fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
    }
}

/// Runs an SDK client driver and returns its last-line JSON report.
async fn driver(program: &Path, script: &Path, url: &str, scenario: &str, extra: &[&str]) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new(program).arg(script).arg(url).arg(scenario).args(extra).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{scenario}: driver timed out"))
    .expect("driver runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("{}");
    let report: Value = serde_json::from_str(last).unwrap_or(Value::Null);
    assert!(
        out.status.success() && report["ok"] == Value::Bool(true),
        "{} {scenario} against {url} failed ({}):\n{last}\n{stderr}",
        script.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        out.status
    );
    report
}

/// The official Python SDK client.
pub async fn py(url: &str, scenario: &str, extra: &[&str]) -> Value {
    driver(&python(), &repo().join("tests/python/client_driver.py"), url, scenario, extra).await
}

/// The official TypeScript SDK client.
pub async fn ts(url: &str, scenario: &str, extra: &[&str]) -> Value {
    driver(Path::new("node"), &node_dir().join("client-driver.mjs"), url, scenario, extra).await
}

/// A raw JSON-RPC POST with the usual MCP headers.
pub fn post(client: &reqwest::Client, url: &str, body: &Value, session: Option<&str>) -> reqwest::RequestBuilder {
    let req = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .json(body);
    match session {
        Some(s) => in_session(req, s),
        None => req,
    }
}

/// Opens a session at `url` in 2025-03-26, the last revision with JSON-RPC batches (with
/// `token` as bearer, if given); returns its id.
pub async fn open_batching_session(client: &reqwest::Client, url: &str, token: Option<&str>) -> String {
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "old", "version": "1"}}});
    let req = post(client, url, &init, None);
    let req = match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let resp = req.send().await.expect("sent");
    assert_eq!(resp.status(), 200, "a 2025-03-26 session opens");
    resp.headers()["mcp-session-id"].to_str().expect("ascii").to_owned()
}

/// A POST of `body` within a session opened by [`open_batching_session`].
pub fn post_batching(client: &reqwest::Client, url: &str, session: &str, body: &Value) -> reqwest::RequestBuilder {
    post(client, url, body, None).header("mcp-session-id", session).header("mcp-protocol-version", "2025-03-26")
}

/// `req` within the session `session`: its id and the protocol revision it speaks.
pub fn in_session(req: reqwest::RequestBuilder, session: &str) -> reqwest::RequestBuilder {
    req.header("mcp-session-id", session).header("mcp-protocol-version", "2025-11-25")
}

pub fn init_body() -> Value {
    serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "it", "version": "1"}}
    })
}

/// Initializes a session with raw HTTP and returns its id.
pub async fn raw_session(client: &reqwest::Client, url: &str) -> String {
    let resp = post(client, url, &init_body(), None).send().await.expect("initialize");
    assert_eq!(resp.status(), 200, "initialize: {:?}", resp.text().await);
    let Some(id) = resp.headers().get("mcp-session-id").map(|v| v.to_str().expect("ascii").to_owned()) else {
        panic!("initialize answered without a session: {:?}", resp.text().await);
    };
    let note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let r = post(client, url, &note, Some(&id)).send().await.expect("initialized");
    assert_eq!(r.status(), 202);
    id
}

/// Parses a JSON or SSE body into its JSON-RPC messages.
pub async fn messages(resp: reqwest::Response) -> Vec<Value> {
    let sse = resp.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let text = resp.text().await.expect("body");
    if !sse {
        return vec![serde_json::from_str(&text).expect("json body")];
    }
    text.lines().filter_map(|l| l.strip_prefix("data:")).filter_map(|d| serde_json::from_str(d.trim()).ok()).collect()
}

/// A fresh PostgreSQL database on the local server (dropped when the guard drops), so tests
/// never share state. Fails, never skips, when PostgreSQL is down.
pub struct FreshPostgres {
    pub url: String,
    name: String,
    admin: String,
}

impl FreshPostgres {
    pub async fn create() -> FreshPostgres {
        let admin =
            std::env::var("PORTCULLIS_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("pcl_it_{}", uuid_like());
        let pool = sqlx::PgPool::connect(&admin).await.expect("PostgreSQL on 127.0.0.1:5432 must be running");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create database");
        pool.close().await;
        let url = match admin.rfind('/') {
            Some(i) => format!("{}/{name}", &admin[..i]),
            None => panic!("PORTCULLIS_TEST_PG needs a database path"),
        };
        FreshPostgres { url, name, admin }
    }
}

impl Drop for FreshPostgres {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop in a thread of its own: Drop cannot await, and the test's runtime may be ending.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&pool)
                        .await;
                }
            });
        })
        .join();
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the calling test again inside a fresh user and network namespace that has only
/// loopback (`unshare -rn`), so that a broken outbound guard could not send a packet beyond
/// this machine. Returns `true` in the outer run, after asserting that the inner run passed;
/// `false` inside the namespace, where the test body goes on. `test` is the test's path in
/// this binary, e.g. `egress::redirects_are_refused`.
pub async fn outside_netns(test: &str) -> bool {
    if std::env::var_os("PORTCULLIS_IN_NETNS").is_some() {
        // Prove the premise: the namespace has loopback and nothing else.
        let dev = std::fs::read_to_string("/proc/net/dev").expect("/proc/net/dev");
        let ifaces: Vec<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
        assert_eq!(ifaces, ["lo"], "the test namespace must have only loopback");
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = tokio::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-c", "ip link set lo up && exec \"$@\"", "sh"])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env("PORTCULLIS_IN_NETNS", "1")
        .output()
        .await
        .expect("unshare runs (util-linux)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the test failed inside its network namespace:\n{text}");
    assert!(text.contains("1 passed"), "the test did not run inside its network namespace:\n{text}");
    true
}

/// Polls `http://{addr}/readyz` until it answers 200 (a gateway process has opened its store
/// and its upstreams answer); panics with the last answer after 60 s.
pub async fn ready(client: &reqwest::Client, addr: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        match client.get(format!("http://{addr}/readyz")).send().await {
            Ok(r) if r.status() == 200 => return,
            Ok(r) => last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} never became ready; last answer: {last}");
}

/// The store of a gateway started by [`TestGateway`] (its default SQLite file).
pub async fn store_of(gw: &TestGateway) -> portcullis::store::Store {
    portcullis::store::Store::connect(&format!("sqlite://{}/portcullis.db", gw.dir.path().display()))
        .await
        .expect("the gateway's store")
}

/// A user `name` and a grant token for them (all servers, no expiry).
pub async fn token_for(store: &portcullis::store::Store, name: &str) -> String {
    const NOW: i64 = 1_795_400_000;
    store.principal_add(name, false, &[], NOW).await.expect("store").expect("added");
    let t = portcullis::authn::token::NewToken::generate();
    store.token_create(name, "laptop", &t.hash(), &None, None, NOW).await.expect("store").expect("created");
    t.expose().to_owned()
}
