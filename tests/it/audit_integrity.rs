//! The audit log's integrity at its edges, through real gateways: signed checkpoints catch a
//! tail cut or rolled back in the store (`audit verify --checkpoints`), a checkpoint that cannot
//! be written is counted and logged (and refuses strict calls until one is), secrets in
//! arguments (key names, URL passwords, PEM keys) never reach the store, and no request can
//! make a record larger than the caps.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use portcullis::audit::{Verification, verify};
use portcullis::keys::Key;
use portcullis::store::Store;
use serde_json::{Value, json};

use crate::common::*;

fn store_url(dir: &Path) -> String {
    format!("sqlite://{}/portcullis.db", dir.display())
}

/// `portcullis audit …` against the gateway's data directory, with its master key.
fn audit_cli(dir: &Path, key: &Key, args: &[&str]) -> (bool, String) {
    let config = dir.join("cli.toml");
    std::fs::write(&config, format!("[gateway]\ndata_dir = {:?}\n", dir.display().to_string())).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&config)
        .arg("audit")
        .args(args)
        .env_remove("PORTCULLIS_CONFIG")
        .env_remove("PORTCULLIS_MASTER_KEYS")
        .env("PORTCULLIS_MASTER_KEY", base64::engine::general_purpose::STANDARD.encode(key.bytes()))
        .output()
        .expect("portcullis runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Waits until the checkpoint file's last line names seq `seq` or later.
async fn checkpoint_reaches(path: &Path, seq: i64) -> Value {
    for _ in 0..300 {
        let last = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.lines().last().map(str::to_owned))
            .and_then(|l| serde_json::from_str::<Value>(&l).ok());
        if let Some(line) = last.filter(|l| l["seq"].as_i64().is_some_and(|s| s >= seq)) {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no checkpoint reached seq {seq}: {:?}", std::fs::read_to_string(path));
}

/// Initializes a session and makes `n` tool calls in it; returns how many exchanges that was.
async fn calls(url: &str, token: Option<&str>, n: usize) -> i64 {
    let c = reqwest::Client::new();
    let authed = |req: reqwest::RequestBuilder| match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let init = authed(post(&c, url, &init_body(), None)).send().await.expect("initialize");
    let session = init.headers()["mcp-session-id"].to_str().expect("ascii").to_owned();
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    authed(post(&c, url, &note, Some(&session))).send().await.expect("initialized");
    for i in 0..n {
        let call = json!({"jsonrpc": "2.0", "id": i + 2, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": format!("call {i}")}}});
        let r = authed(post(&c, url, &call, Some(&session))).send().await.expect("call");
        assert_eq!(r.status(), 200);
    }
    2 + n as i64
}

async fn delete_newest_segment(store: &Store) {
    let Store::Sqlite(pool) = store else { unreachable!("a SQLite store") };
    for sql in [
        "DELETE FROM audit_segment_keys WHERE first_seq = (SELECT MAX(first_seq) FROM audit_segments)",
        "DELETE FROM audit_segments WHERE first_seq = (SELECT MAX(first_seq) FROM audit_segments)",
    ] {
        sqlx::query(sql).execute(pool).await.expect("delete");
    }
}

fn servers(fixture: &Fixture) -> String {
    format!("[audit]\ncheckpoint_interval = \"100ms\"\n\n[[servers]]\nname = \"fx\"\nurl = \"{}\"\n", fixture.url)
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_catch_a_cut_tail_and_a_rollback() {
    let fixture = Fixture::start(&[]).await;
    let key = Key::random();
    let gw = TestGateway::start_keyed(&servers(&fixture), "", key.clone()).await;
    let dir = gw.dir.clone();
    let cp_file = dir.path().join("audit-checkpoints.jsonl");
    let store = Store::connect(&store_url(dir.path())).await.expect("store");
    let token = token_for(&store, "alice").await;

    // Two rounds of calls, each in segments of its own, each covered by a checkpoint.
    let first = calls(&gw.url("fx"), Some(&token), 3).await;
    let seen = checkpoint_reaches(&cp_file, first).await;
    let second = first + calls(&gw.url("fx"), Some(&token), 4).await;
    checkpoint_reaches(&cp_file, second).await;
    let (ok, text) = audit_cli(dir.path(), &key, &["verify", "--checkpoints", cp_file.to_str().expect("utf-8")]);
    assert!(ok, "an intact log passes: {text}");
    assert!(text.contains(&format!("ok: {second} records")) && text.contains("checkpoint(s) agree"), "{text}");
    gw.stop().await;

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cp_file).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the checkpoint file is private");
    }
    // Each line is signed; the log line carries the same checkpoint.
    assert!(seen["mac"].as_str().is_some_and(|m| m.len() == 64) && seen["key_id"].is_string(), "{seen}");

    // Someone with write access to the database deletes the newest records: the chain alone
    // still verifies (what it holds is intact), the checkpoints do not.
    delete_newest_segment(&store).await;
    let remaining = store.audit_count().await.expect("count");
    assert!(remaining < second && remaining >= first, "{remaining}");
    assert!(matches!(verify(&store).await.expect("verifies"), Verification::Intact { .. }));
    let (ok, text) = audit_cli(dir.path(), &key, &["verify"]);
    assert!(ok, "without checkpoints the cut goes unseen: {text}");
    let (ok, text) = audit_cli(dir.path(), &key, &["verify", "--checkpoints", cp_file.to_str().expect("utf-8")]);
    assert!(!ok, "a cut tail fails: {text}");
    assert!(text.contains("cut") && text.contains(&format!("seq {}", remaining + 1)), "{text}");
    assert!(text.contains(&format!("the log ends at seq {remaining}")), "{text}");

    // The gateway starts again on the cut log and appends: the seqs a checkpoint saw come
    // back with other records. That is a rollback, and it is named as one.
    let gw = start_on(&dir, &fixture, key.clone()).await;
    let third = remaining + calls(&gw.url("fx"), Some(&token), 12).await;
    checkpoint_reaches(&cp_file, third).await;
    gw.stop().await;
    let (ok, text) = audit_cli(dir.path(), &key, &["verify", "--checkpoints", cp_file.to_str().expect("utf-8")]);
    assert!(!ok, "a rolled back log fails: {text}");
    assert!(text.contains("rolled back"), "{text}");

    // A checkpoint line that was edited (or forged without the key) fails too.
    let edited = dir.path().join("edited.jsonl");
    let text = std::fs::read_to_string(&cp_file).expect("read");
    let mut lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let seq = lines[0]["seq"].as_i64().expect("seq");
    lines[0]["seq"] = json!(seq + 1);
    let rewritten: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&edited, rewritten).expect("write");
    let (ok, text) = audit_cli(dir.path(), &key, &["verify", "--checkpoints", edited.to_str().expect("utf-8")]);
    assert!(!ok && text.contains("line 1") && text.contains("does not verify"), "{text}");
    // Under another master key nothing can be checked, and that fails too.
    let (ok, text) =
        audit_cli(dir.path(), &Key::random(), &["verify", "--checkpoints", cp_file.to_str().expect("utf-8")]);
    assert!(!ok && text.contains("not in the key ring"), "{text}");
}

/// A gateway on an existing data directory (`dir`), keyed `key`.
async fn start_on(dir: &std::sync::Arc<tempfile::TempDir>, fixture: &Fixture, key: Key) -> Gateway {
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nshutdown_grace = \"10s\"\n{}",
        dir.path().display().to_string(),
        servers(fixture)
    );
    let config = portcullis::config::Config::parse(&text, "test.toml", Vec::new()).expect("config");
    let gateway = portcullis::app::Gateway::start_with_key(config, key).await.expect("starts");
    Gateway { base: format!("http://{}", gateway.addr), gateway: Some(gateway) }
}

/// A gateway started by [`start_on`].
struct Gateway {
    gateway: Option<portcullis::app::Gateway>,
    base: String,
}

impl Gateway {
    fn url(&self, server: &str) -> String {
        format!("{}/mcp/{server}", self.base)
    }

    async fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_can_be_turned_off_and_moved() {
    let fixture = Fixture::start(&[]).await;
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let file: PathBuf = elsewhere.path().join("sub/cp.jsonl");
    let rest = format!(
        "[audit]\ncheckpoint_interval = \"50ms\"\ncheckpoint_file = {:?}\n\n[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n",
        file.display().to_string(),
        fixture.url
    );
    let gw = TestGateway::start(&rest).await;
    calls(&gw.url("fx"), None, 1).await;
    checkpoint_reaches(&file, 3).await;
    let dir = gw.dir.clone();
    gw.stop().await;
    assert!(!dir.path().join("audit-checkpoints.jsonl").exists());

    let off = format!(
        "[audit]\ncheckpoint_interval = \"0s\"\n\n[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n",
        fixture.url
    );
    let gw = TestGateway::start(&off).await;
    calls(&gw.url("fx"), None, 1).await;
    let dir = gw.dir.clone();
    gw.stop().await;
    assert!(!dir.path().join("audit-checkpoints.jsonl").exists(), "off means no file");

    // A file that cannot be opened stops the start, rather than running without checkpoints.
    let blocked = format!(
        "[audit]\ncheckpoint_file = {:?}\n",
        elsewhere.path().join("sub/cp.jsonl/not-a-dir/cp").display().to_string()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let text =
        format!("[gateway]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n{blocked}", dir.path().display().to_string());
    let config = portcullis::config::Config::parse(&text, "test.toml", Vec::new()).expect("config");
    let err = portcullis::app::Gateway::start_with_key(config, Key::random()).await.err().expect("refused");
    assert!(err.to_string().contains("audit checkpoint file"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_in_arguments_never_reach_the_store() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\n", fixture.url)).await;
    let store = Store::connect(&store_url(gw.dir.path())).await.expect("store");
    let token = token_for(&store, "alice").await;
    let c = reqwest::Client::new();
    let url = gw.url("fx");
    let session = {
        let init = post(&c, &url, &init_body(), None).bearer_auth(&token).send().await.expect("initialize");
        init.headers()["mcp-session-id"].to_str().expect("ascii").to_owned()
    };
    let pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n";
    let args = json!({
        "text": "deploy",
        "passwd": "hunter2", "db_pwd": "hunter3", "credentials": {"user": "bob", "key": "hunter4"},
        "sessionCookie": "hunter5",
        "remote": "https://bob:hunter6@git.example.com/acme/r.git",
        "dsn": "postgres://app:hunter7@db.internal:5432/main",
        "files": [{"name": "id_ed25519", "content": pem}],
    });
    let call =
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": args}});
    let r = post(&c, &url, &call, Some(&session)).bearer_auth(&token).send().await.expect("call");
    // The upstream got every argument as sent: redaction is for the record only.
    let answer = messages(r).await;
    assert_eq!(answer[0]["result"]["structuredContent"]["passwd"], "hunter2", "{answer:?}");
    let _keep = gw.dir.clone();
    gw.stop().await;

    let records = store.audit_after(0, 100).await.expect("records");
    let record = records.iter().find(|r| r.tool.as_deref() == Some("echo")).expect("the call's record");
    let stored: Value = serde_json::from_str(&record.arguments).expect("json");
    assert_eq!(
        stored,
        json!({
            "text": "deploy",
            "passwd": "[REDACTED]", "db_pwd": "[REDACTED]", "credentials": "[REDACTED]",
            "sessionCookie": "[REDACTED]",
            "remote": "https://bob:[REDACTED]@git.example.com/acme/r.git",
            "dsn": "postgres://app:[REDACTED]@db.internal:5432/main",
            "files": [{"name": "id_ed25519", "content": "[REDACTED]\n"}],
        })
    );
    let everything = format!("{records:?}");
    for secret in ["hunter", "b3BlbnNzaC1rZXkt", "PRIVATE KEY"] {
        assert!(!everything.contains(secret), "{secret} reached the store");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_server_name_in_a_callback_makes_a_small_record() {
    let oauth = "[[servers]]\nname = \"acme\"\nurl = \"https://acme.example.com/mcp\"\nauth = { type = \"oauth\" }\n";
    let gw = TestGateway::start(oauth).await;
    let name = "n".repeat(30 * 1024);
    let description = "d".repeat(20 * 1024);
    let resp = reqwest::get(format!(
        "{}/oauth/callback/{name}?state={}&error=access_denied&error_description={description}",
        gw.base,
        "s".repeat(5000)
    ))
    .await
    .expect("answers");
    assert!(resp.status().is_client_error(), "{}", resp.status());
    let dir = gw.dir.clone();
    gw.stop().await;

    let store = Store::connect(&store_url(dir.path())).await.expect("store");
    let records = store.audit_after(0, 10).await.expect("records");
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r.method, "vault/connect");
    let server = r.server.as_deref().expect("server");
    assert!(server.len() <= 256 && server.starts_with("nnnn") && server.ends_with("[cut]"), "{}", server.len());
    let size = serde_json::to_string(r).expect("json").len();
    assert!(size < 2 * 1024, "the whole record is {size} bytes");
    assert!(matches!(verify(&store).await.expect("verifies"), Verification::Intact { records: 1, .. }));
}

/// The value of an unlabelled series on the gateway's `/metrics`, if it is there.
async fn metric(base: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until the gauge `portcullis_audit_checkpoint_failing` reads `failing`.
async fn checkpoints_failing(base: &str, failing: bool) {
    let want = if failing { 1.0 } else { 0.0 };
    for _ in 0..300 {
        if metric(base, "portcullis_audit_checkpoint_failing").await == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("portcullis_audit_checkpoint_failing never read {want}");
}

fn echo(id: u64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}})
}

/// With the checkpoint file's path taken by a directory (the file was removed and cannot be
/// created again), the next checkpoint cannot be written: it is logged and counted, and the
/// gauge says so until one is. `strict` refuses calls meanwhile (503, before anything is
/// forwarded); `async` goes on answering. Once the path is free, checkpoints resume in a new
/// file, and so do strict calls.
async fn a_checkpoint_that_cannot_be_written(durability: &str) {
    let fixture = Fixture::start(&[]).await;
    let rest = format!(
        "[audit]\ndurability = \"{durability}\"\ncheckpoint_interval = \"100ms\"\n\n\
         [[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n",
        fixture.url
    );
    let gw = TestGateway::start(&rest).await;
    let cp_file = gw.dir.path().join("audit-checkpoints.jsonl");
    let client = reqwest::Client::new();
    let url = gw.url("fx");
    let session = raw_session(&client, &url).await;
    let call = |id| post(&client, &url, &echo(id), Some(&session)).send();
    assert_eq!(call(2).await.expect("call").status(), 200);
    checkpoint_reaches(&cp_file, 3).await;
    assert_eq!(metric(&gw.base, "portcullis_audit_checkpoint_errors_total").await.unwrap_or(0.0), 0.0);

    std::fs::remove_file(&cp_file).expect("remove");
    std::fs::create_dir(&cp_file).expect("a directory in its place");
    // A record moves the head, so the next tick has a checkpoint to write, and cannot.
    assert_eq!(call(3).await.expect("call").status(), 200);
    checkpoints_failing(&gw.base, true).await;
    assert!(metric(&gw.base, "portcullis_audit_checkpoint_errors_total").await.is_some_and(|n| n >= 1.0));

    let during = call(4).await.expect("call");
    let status = during.status().as_u16();
    let retry = during.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_owned());
    let body = during.text().await.expect("body");
    let forwarded = fixture.requests().await.iter().filter(|r| r["body"]["id"] == 4).count();
    if durability == "strict" {
        assert_eq!(status, 503, "strict fails closed: {body}");
        assert_eq!(retry.as_deref(), Some("1"), "{body}");
        assert!(body.contains("checkpoints cannot be written"), "the refusal names its cause: {body}");
        assert_eq!(forwarded, 0, "the refused call was not forwarded");
    } else {
        assert_eq!(status, 200, "async goes on: {body}");
    }

    std::fs::remove_dir(&cp_file).expect("free the path");
    checkpoints_failing(&gw.base, false).await;
    let line = checkpoint_reaches(&cp_file, 4).await;
    assert!(line["mac"].is_string(), "{line}");
    assert_eq!(call(5).await.expect("call").status(), 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_that_cannot_be_written_refuses_strict_calls_until_one_is() {
    a_checkpoint_that_cannot_be_written("strict").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_that_cannot_be_written_is_counted_while_async_calls_go_on() {
    a_checkpoint_that_cannot_be_written("async").await;
}
