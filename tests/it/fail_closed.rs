//! Failing closed around the request path: what a gateway creates on a fresh data directory
//! is private (the directory 0700; the SQLite store and its `-wal` and `-shm` files, the master
//! key and the audit checkpoint file 0600, under the usual umask 022), and a long-lived stream
//! whose token the store can no longer confirm ends. The random source and the guarded HTTP
//! client are covered by unit tests (`vault::tests`, `net::tests`).

use std::process::Stdio;

use crate::common::*;

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_data_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;

    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("fresh/data");
    let port = free_port();
    let config = root.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n[log]\nlevel = \"warn\"\n[audit]\ncheckpoint_interval = \"50ms\"\n",
            data.display().to_string()
        ),
    )
    .expect("config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("PORTCULLIS_MASTER_KEY")
        .env_remove("PORTCULLIS_MASTER_KEYS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("gateway runs");
    let c = reqwest::Client::new();
    ready(&c, &format!("127.0.0.1:{port}")).await;
    // A request that leaves a record, so the WAL and the checkpoint file have content.
    let _ = c.get(format!("http://127.0.0.1:{port}/mcp/nope")).send().await;
    for _ in 0..200 {
        if std::fs::metadata(data.join("audit-checkpoints.jsonl")).is_ok_and(|m| m.len() > 0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mode = |name: &str| {
        let p = if name.is_empty() { data.clone() } else { data.join(name) };
        std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    assert_eq!(mode(""), 0o700, "the data directory");
    assert_eq!(
        std::fs::metadata(root.path().join("fresh")).expect("parent").permissions().mode() & 0o777,
        0o700,
        "every directory the gateway creates"
    );
    for file in ["portcullis.db", "portcullis.db-wal", "portcullis.db-shm", "master.key", "audit-checkpoints.jsonl"] {
        assert_eq!(mode(file), 0o600, "{file}");
    }
    child.start_kill().expect("kill");
    let _ = child.wait().await;
}

/// A long-lived stream whose token the store can no longer confirm (an outage: a revocation
/// could be what it cannot tell) ends within two token-cache periods rather than running on
/// unchecked; a new request during the outage is refused outright.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_when_the_store_cannot_confirm_its_token() {
    use portcullis::authn::token::NewToken;
    use portcullis::store::Store;
    use serde_json::json;
    use std::time::Duration;

    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\n", fixture.url)).await;
    let store = Store::connect(&format!("sqlite://{}/portcullis.db", gw.dir.path().display())).await.expect("store");
    store.principal_add("alice", false, &[], 1_795_400_000).await.expect("store").expect("added");
    let t = NewToken::generate();
    store.token_create("alice", "laptop", &t.hash(), &None, None, 1_795_400_000).await.expect("store").expect("made");
    let token = t.expose().to_owned();
    let c = reqwest::Client::new();
    let url = gw.url("fx");
    let session = {
        let init = post(&c, &url, &init_body(), None).bearer_auth(&token).send().await.expect("sent");
        init.headers()["mcp-session-id"].to_str().expect("ascii").to_owned()
    };
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post(&c, &url, &note, Some(&session)).bearer_auth(&token).send().await.expect("sent");
    let get = c
        .get(&url)
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .send()
        .await
        .expect("sent");
    assert_eq!(get.status(), 200);

    // The outage: the tables the token check and the revocation poll read are gone.
    let Store::Sqlite(pool) = &store else { unreachable!("SQLite") };
    for sql in
        ["ALTER TABLE grant_tokens RENAME TO grant_tokens_away", "ALTER TABLE revocation_epoch RENAME TO epoch_away"]
    {
        sqlx::query(sql).execute(pool).await.expect("rename");
    }
    let started = std::time::Instant::now();
    let ping = json!({"jsonrpc": "2.0", "id": 9, "method": "ping"});
    tokio::time::sleep(portcullis::authn::cache::POLL * 3).await;
    let refused = post(&c, &url, &ping, Some(&session)).bearer_auth(&token).send().await.expect("sent");
    assert_eq!(refused.status(), 503, "a new request is refused while the store cannot answer");
    let limit = portcullis::authn::cache::TTL * 2 + Duration::from_secs(10);
    let ended = tokio::time::timeout(limit, get.bytes()).await;
    assert!(ended.is_ok(), "the stream still runs {:?} into the outage", started.elapsed());
    for sql in
        ["ALTER TABLE grant_tokens_away RENAME TO grant_tokens", "ALTER TABLE epoch_away RENAME TO revocation_epoch"]
    {
        sqlx::query(sql).execute(pool).await.expect("rename back");
    }
    gw.stop().await;
}
