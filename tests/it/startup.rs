//! Starting: many processes (gateways and CLI commands) on one fresh store migrate it once and
//! share one master key; a gateway waiting for the store answers `/readyz` 503 and every other
//! path 503 with `Retry-After` until it is ready.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use portcullis::app::{Gateway, StartError};
use portcullis::config::Config;
use portcullis::keys::Key;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::*;

const GATEWAYS: usize = 10;

/// `portcullis` with `config`, with nothing of this process's environment that would change it.
fn portcullis(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.arg("--config").arg(config).kill_on_drop(true);
    for var in ["PORTCULLIS_MASTER_KEY", "PORTCULLIS_MASTER_KEYS", "PORTCULLIS_CONFIG", "RUST_LOG"] {
        cmd.env_remove(var);
    }
    cmd
}

/// A `portcullis serve` process, its address and the id of the master key it uses, read from
/// its JSON log. Killed when dropped.
struct Served {
    addr: String,
    key_id: String,
    _child: Child,
}

async fn serve(config: &Path) -> Served {
    let mut child = portcullis(config).arg("serve").stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("runs");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            seen.push(line);
            if event["message"] == "listening; opening the store" {
                return Some((event["addr"].as_str()?.to_owned(), event["key_id"].as_str()?.to_owned()));
            }
        }
        None
    })
    .await;
    let Ok(Some((addr, key_id))) = found else {
        let status = child.try_wait();
        panic!("a gateway never reported its address ({status:?}):\n{}", seen.join("\n"));
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Served { addr, key_id, _child: child }
}

/// A client that gives up on a request after 5 s: a listener that accepted but does not
/// answer must fail the test, not hang it.
fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client")
}

/// Starts `GATEWAYS` gateways and two `user add` commands at once on the store `store_url`
/// (empty: the default SQLite file in the data directory) and checks that all of them succeed
/// and that every gateway uses the one master key in the data directory.
async fn many_start_together(store_url: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let store = if store_url.is_empty() { String::new() } else { format!("[store]\nurl = {store_url:?}\n") };
    let config = dir.path().join("portcullis.toml");
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n{store}\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
        data.display().to_string()
    );
    std::fs::write(&config, text).expect("config written");

    let mut users: Vec<Command> = (0..2)
        .map(|i| {
            let mut cmd = portcullis(&config);
            cmd.args(["user", "add", &format!("u{i}")]);
            cmd
        })
        .collect();
    let (gateways, users) = tokio::join!(
        futures::future::join_all((0..GATEWAYS).map(|_| serve(&config))),
        futures::future::join_all(users.iter_mut().map(Command::output))
    );
    for out in users {
        let out = out.expect("user add runs");
        assert!(
            out.status.success(),
            "user add failed while gateways started: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let client = client();
    futures::future::join_all(gateways.iter().map(|g| ready(&client, &g.addr))).await;

    let on_disk = portcullis::keys::load_key_ring_from(&data, None, None).expect("the key file");
    for g in &gateways {
        assert_eq!(g.key_id, on_disk.active_id().as_str(), "a gateway uses another key than {}", data.display());
    }
    let listed = portcullis(&config).args(["user", "list"]).output().await.expect("user list runs");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("u0") && listed.contains("u1"), "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_gateways_and_cli_commands_start_together_on_a_fresh_sqlite_store() {
    many_start_together("").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_gateways_and_cli_commands_start_together_on_a_fresh_postgres_database() {
    let pg = FreshPostgres::create().await;
    many_start_together(&pg.url).await;
}

/// The migration lock, held by the test as another process would hold it.
enum Held {
    File(std::fs::File),
    Postgres(sqlx::PgConnection),
}

impl Held {
    async fn release(self) {
        match self {
            Held::File(file) => file.unlock().expect("unlocked"),
            Held::Postgres(conn) => sqlx::Connection::close(conn).await.expect("closed"),
        }
    }
}

/// While another process holds the migration lock, the gateway is bound but not ready: it
/// says so on `/readyz` and asks MCP clients to come back; once the lock is free it starts.
async fn waits_for_the_migration_lock(data: &Path, store: &str, held: Held) {
    let port = free_port();
    let text =
        format!("[gateway]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n{store}", data.display().to_string());
    let config = Config::parse(&text, "test.toml", Vec::new()).expect("config");
    let starting = tokio::spawn(Gateway::start_with_key(config, Key::random()));
    let (c, base) = (client(), format!("http://127.0.0.1:{port}"));

    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        assert!(Instant::now() < deadline, "the gateway never reported that it applies migrations");
        if let Ok(r) = c.get(format!("{base}/readyz")).send().await {
            assert_eq!(r.status(), 503);
            let report: Value = r.json().await.expect("json");
            if report["store"] == "starting: applying migrations" {
                break report;
            }
            assert_eq!(report, json!({"store": "starting: opening the store"}));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(report, json!({"store": "starting: applying migrations"}));
    assert_eq!(c.get(format!("{base}/healthz")).send().await.expect("sent").status(), 200);
    let r = post(&c, &format!("{base}/mcp/anything"), &init_body(), None).send().await.expect("sent");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], -32603, "{body}");
    assert_eq!(body["error"]["message"], "the gateway is starting: applying migrations", "{body}");
    let r = c.get(format!("{base}/metrics")).send().await.expect("sent");
    assert_eq!((r.status().as_u16(), r.headers()["retry-after"].to_str().expect("ascii")), (503, "1"));
    assert!(!starting.is_finished(), "the gateway started although the migration lock is held");

    held.release().await;
    let gateway = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .expect("started once the lock was free")
        .expect("joined")
        .expect("gateway starts");
    let r = c.get(format!("{base}/readyz")).send().await.expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("json")["store"], "ok");
    let r = post(&c, &format!("{base}/mcp/anything"), &init_body(), None).send().await.expect("sent");
    // Served by the gateway now: an unknown server answers an unauthenticated caller with
    // the challenge a configured one gives.
    assert_eq!(r.status(), 401, "served by the gateway now");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_waiting_for_sqlite_migrations_answers_503_until_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    // SQLite names its file by its real path, and the lock file sits beside that.
    let data = dir.path().canonicalize().expect("real path");
    let lock_path = portcullis::store::migration_lock_path(&data.join("portcullis.db"));
    let file = std::fs::File::create(&lock_path).expect("lock file");
    file.lock().expect("locked");
    waits_for_the_migration_lock(&data, "", Held::File(file)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_waiting_for_postgres_migrations_answers_503_until_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = FreshPostgres::create().await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url).await.expect("connects");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(portcullis::store::MIGRATION_LOCK_PG_KEY)
        .execute(&mut conn)
        .await
        .expect("locked");
    let store = format!("\n[store]\nurl = {:?}\n", pg.url);
    waits_for_the_migration_lock(dir.path(), &store, Held::Postgres(conn)).await;
}

/// A store that cannot be opened fails the start as before, and the port is let go.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_cannot_open_fails_the_start_and_closes_the_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "not a directory").expect("written");
    let port = free_port();
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n\n[store]\nurl = \"sqlite://{}/sub/p.db\"\n",
        dir.path().display().to_string(),
        blocker.display()
    );
    let config = Config::parse(&text, "test.toml", Vec::new()).expect("config");
    let Err(e) = Gateway::start_with_key(config, Key::random()).await else { panic!("started without a store") };
    assert!(matches!(e, StartError::Store(_)), "{e}");
    assert!(e.to_string().starts_with("store: cannot open sqlite://"), "{e}");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(), "still listening on {port}");
}

/// The memory limits' first spelling under `[gateway]` still works: `check-config` accepts it
/// with a warning naming the key to write instead (an error with `--strict`), and a gateway
/// started with it applies it, as with the `[limits]` spelling.
#[tokio::test(flavor = "multi_thread")]
async fn memory_limits_under_gateway_still_work_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("p.toml");
    let data = dir.path().display().to_string();
    std::fs::write(&config, format!("[gateway]\ndata_dir = {data:?}\nmax_response_bytes = 65536\n")).expect("written");
    let out = portcullis(&config).arg("check-config").output().await.expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning = "p.toml: warning: gateway.max_response_bytes (line 1): is deprecated: write it as \
                   limits.max_response_bytes (under [limits])";
    assert!(stderr.contains(warning), "{stderr}");
    let out = portcullis(&config).args(["check-config", "--strict"]).output().await.expect("runs");
    assert!(!out.status.success(), "--strict fails on the warning");
    // With a [policy] folder, so that the built-in rule's warning is not there either.
    std::fs::write(
        &config,
        format!("[gateway]\ndata_dir = {data:?}\n\n[limits]\nmax_response_bytes = 65536\n\n[policy]\ndir = {data:?}\n"),
    )
    .expect("written");
    let out = portcullis(&config).args(["check-config", "--strict"]).output().await.expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let fixture = Fixture::start(&[]).await;
    let servers = format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n", fixture.url);
    for (gateway_keys, limits) in [("max_response_bytes = 65536", ""), ("", "\n[limits]\nmax_response_bytes = 65536\n")]
    {
        let gw = TestGateway::start_with(&format!("{servers}{limits}"), gateway_keys).await;
        let c = client();
        let url = gw.url("fx");
        let session = raw_session(&c, &url).await;
        let big = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "big", "arguments": {"bytes": 100_000}}});
        let r = post(&c, &url, &big, Some(&session)).send().await.expect("sent");
        let answer = messages(r).await.into_iter().find(|m| m["id"] == 2).expect("an answer");
        let expected = "upstream server 'fx' sent a message larger than 65536 bytes (max_response_bytes)";
        assert_eq!(answer["error"]["message"], expected, "{gateway_keys}{limits}: {answer}");
        gw.stop().await;
    }
}
