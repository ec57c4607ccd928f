//! Audit: the writer, the hash chain and `verify` on SQLite and PostgreSQL, and the
//! `portcullis audit` CLI against a real store file.
//!
//! PostgreSQL runs on 127.0.0.1:5432 in CI (PORTCULLIS_TEST_PG overrides the URL); every
//! PostgreSQL test creates its own database and drops it afterwards, and fails when the server
//! is down.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use portcullis::audit::Entry;
use portcullis::audit::segment;
use portcullis::audit::storage::AuditQuery;
use portcullis::audit::{
    Arguments, AuditConfig, AuditError, AuditWriter, BreakKind, Decision, Durability, Record, Verification, verify,
};
use portcullis::store::Store;
use serde_json::{Value, json};
use sqlx::Connection;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, migrated store that disappears with the value.
struct TestDb {
    store: Store,
    url: String,
    _dir: tempfile::TempDir,
    _pg: Option<PgDatabase>,
}

/// A PostgreSQL database created for one test, dropped (with its connections) on drop.
struct PgDatabase {
    admin_url: String,
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside any runtime we may block, so use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
                }
            });
        })
        .join();
    }
}

fn pg_url() -> String {
    std::env::var("PORTCULLIS_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn test_db(backend: Backend) -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    match backend {
        Backend::Sqlite => {
            let url = format!("sqlite://{}/audit.db", dir.path().display());
            let store = Store::connect(&url).await.expect("sqlite opens");
            TestDb { store, url, _dir: dir, _pg: None }
        }
        Backend::Postgres => {
            let admin_url = pg_url();
            let name = format!("pcl_audit_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::PgConnection::connect(&admin_url)
                .await
                .expect("PostgreSQL on 127.0.0.1:5432 (or PORTCULLIS_TEST_PG) must be running");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .expect("create test database");
            let guard = PgDatabase { admin_url: admin_url.clone(), name: name.clone() };
            let mut url = url::Url::parse(&admin_url).expect("PostgreSQL URL");
            url.set_path(&format!("/{name}"));
            let url = url.to_string();
            let store = Store::connect(&url).await.expect("test database opens");
            TestDb { store, url, _dir: dir, _pg: Some(guard) }
        }
    }
}

/// Runs `$scenario(backend)` once per backend, as `$scenario::sqlite` and `$scenario::postgres`.
macro_rules! on_both {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$scenario(super::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$scenario(super::Backend::Postgres).await
            }
        }
    )*};
}

on_both!(
    chain_verifies_and_secrets_never_reach_the_store,
    edited_record_is_named,
    deleted_record_is_named,
    reordered_records_are_named,
    writer_loses_nothing_across_shutdown,
    async_callers_wait_for_a_writer_that_is_behind,
    strict_mode_returns_after_commit,
    replicas_share_one_chain,
    search_filters_combine,
    a_user_search_uses_the_key_index,
    store_outage_is_retried_and_never_silent,
    every_column_survives_batches_of_any_size,
    rows_of_earlier_versions_move_into_segments,
    a_segment_at_the_end_of_the_key_space_ends_every_read,
    checkpoints_pin_the_tail,
);

/// Principal ids are UUIDs, as the store makes them.
fn principal_id(n: usize) -> String {
    format!("0193a8b0-0000-7000-8000-00000000000{n}")
}

fn record(i: usize) -> Record {
    let mut r = Record::new(1_795_400_000_000 + i as i64, format!("req-{i}"), "tools/call", Decision::Allow);
    r.principal_id = Some(principal_id(i % 3));
    r.principal_kind = Some("user".into());
    r.principal_name = Some(["alice", "bob", "carol"][i % 3].into());
    r.token_id = Some(format!("tok-{}", i % 3));
    r.client_name = Some("claude-code".into());
    r.client_version = Some("2.1.0".into());
    r.server = Some(["github", "linear"][i % 2].into());
    r.tool = Some(format!("tool_{}", i % 5));
    r.arguments = Arguments::new(json!({"i": i, "q": "text"}));
    r.upstream_status = Some(200);
    r.latency_us = 1000 + i as u64;
    r.bytes_in = 100;
    r.bytes_out = 2000;
    r
}

async fn writer_with(db: &TestDb, config: AuditConfig, n: usize) -> AuditWriter {
    let writer = AuditWriter::start(db.store.clone(), &config);
    for i in 0..n {
        writer.record(record(i));
    }
    writer.flush().await.expect("flushed");
    writer
}

async fn filled(backend: Backend, n: usize) -> TestDb {
    let db = test_db(backend).await;
    writer_with(&db, AuditConfig::default(), n).await.shutdown().await;
    db
}

async fn exec(store: &Store, sql: &'static str) {
    portcullis::on_pool!(store, p => { sqlx::query(sql).execute(p).await.expect(sql); });
}

/// Plays an attacker with write access to the database: rewrites every stored record as `edit`
/// leaves it, with segment bounds, times and search keys made to match, so that only the hash
/// chain can tell.
async fn tamper(store: &Store, edit: impl FnOnce(&mut Vec<Entry>)) {
    let stored = store.audit_segments(i64::MIN, i64::MAX).await.expect("read");
    let mut entries: Vec<Entry> = stored.into_iter().flat_map(|s| s.entries.expect("readable")).collect();
    edit(&mut entries);
    exec(store, "DELETE FROM audit_segment_keys").await;
    exec(store, "DELETE FROM audit_segments").await;
    store.audit_put_segments(&segment::segments(&entries)).await.expect("rewrite");
}

async fn broken_at(store: &Store) -> (i64, BreakKind) {
    match verify(store).await.expect("verify runs") {
        Verification::Broken(b) => (b.seq, b.kind),
        intact => panic!("tampering went unnoticed: {intact:?}"),
    }
}

async fn chain_verifies_and_secrets_never_reach_the_store(backend: Backend) {
    let db = test_db(backend).await;
    assert_eq!(
        verify(&db.store).await.expect("verify"),
        Verification::Intact { records: 0, head: None },
        "an empty log is intact"
    );
    let writer = AuditWriter::start(db.store.clone(), &AuditConfig::default());
    let mut secret = record(0);
    secret.arguments = Arguments::new(json!({
        "password": "hunter2",
        "note": "my key is ghp_0123456789abcdefghijABCDEFGHIJ0123 ok",
        "headers": {"Authorization": "Bearer abcdefghijklmnop"},
        "float": 0.1,
        "unicode": "snow ☃ and nul \u{0}",
    }));
    secret.client_name = Some("nul\0client".into());
    writer.record(secret);
    for i in 1..10 {
        writer.record(record(i));
    }
    writer.shutdown().await;
    match verify(&db.store).await.expect("verify") {
        Verification::Intact { records: 10, head: Some((10, hash)) } => assert_eq!(hash.len(), 32),
        other => panic!("{other:?}"),
    }
    let entries = db.store.audit_after(0, 100).await.expect("read");
    let seqs: Vec<i64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    assert_eq!(entries[0].prev_hash, vec![0; 32], "genesis");
    let args: Value = serde_json::from_str(&entries[0].arguments).expect("json");
    assert_eq!(args["password"], "[REDACTED]");
    assert_eq!(args["note"], "my key is [REDACTED] ok");
    assert_eq!(args["headers"]["Authorization"], "[REDACTED]");
    assert_eq!(args["float"], 0.1);
    assert_eq!(entries[0].client_name.as_deref(), Some("nul\u{fffd}client"));
    let all = format!("{entries:?}");
    assert!(!all.contains("hunter2") && !all.contains("ghp_") && !all.contains("abcdefghijklmnop"), "{all}");
}

async fn edited_record_is_named(backend: Backend) {
    let db = filled(backend, 6).await;
    tamper(&db.store, |es| es[3].arguments = "{\"i\":99}".into()).await;
    assert_eq!(broken_at(&db.store).await, (4, BreakKind::Edited));

    let db = filled(backend, 6).await;
    tamper(&db.store, |es| es[0].decision = "deny".into()).await;
    assert_eq!(broken_at(&db.store).await, (1, BreakKind::Edited));

    let db = filled(backend, 6).await;
    tamper(&db.store, |es| es[5].arguments = "not json".into()).await;
    assert_eq!(broken_at(&db.store).await, (6, BreakKind::Edited));

    // Bytes changed in place, without decoding: the record no longer matches its hash, or
    // the segment no longer reads.
    let db = filled(backend, 6).await;
    exec(
        &db.store,
        match backend {
            Backend::Sqlite => "UPDATE audit_segments SET records = CAST(REPLACE(records, 'tool_3', 'tool_9') AS BLOB)",
            Backend::Postgres => {
                "UPDATE audit_segments SET records = decode(replace(encode(records, 'hex'), \
                 encode('tool_3'::bytea, 'hex'), encode('tool_9'::bytea, 'hex')), 'hex')"
            }
        },
    )
    .await;
    assert_eq!(broken_at(&db.store).await, (4, BreakKind::Edited));

    // A segment's own columns and keys are checked too: dropping a key would hide records
    // from `audit search --user`.
    let db = filled(backend, 6).await;
    exec(&db.store, "DELETE FROM audit_segment_keys WHERE value = 'carol'").await;
    assert_eq!(broken_at(&db.store).await, (1, BreakKind::Edited));
}

async fn deleted_record_is_named(backend: Backend) {
    let db = filled(backend, 6).await;
    tamper(&db.store, |es| drop(es.remove(2))).await;
    assert_eq!(broken_at(&db.store).await, (3, BreakKind::Deleted));

    let db = filled(backend, 6).await;
    tamper(&db.store, |es| drop(es.remove(0))).await;
    assert_eq!(broken_at(&db.store).await, (1, BreakKind::Deleted));

    // Deleting and renumbering to hide the gap is still a deletion.
    let db = filled(backend, 6).await;
    tamper(&db.store, |es| {
        es.remove(2);
        es[2..].iter_mut().for_each(|e| e.seq -= 1);
    })
    .await;
    assert_eq!(broken_at(&db.store).await, (3, BreakKind::Deleted));

    // A whole segment gone: two batches, the first deleted.
    let db = test_db(backend).await;
    writer_with(&db, AuditConfig::default(), 3).await.shutdown().await;
    writer_with(&db, AuditConfig::default(), 3).await.shutdown().await;
    exec(&db.store, "DELETE FROM audit_segments WHERE first_seq = 1").await;
    assert_eq!(broken_at(&db.store).await, (1, BreakKind::Deleted));
}

async fn reordered_records_are_named(backend: Backend) {
    // Two records trade places (each takes the other's seq).
    let swap = |a: usize, b: usize| {
        move |es: &mut Vec<Entry>| {
            es.swap(a, b);
            (es[a].seq, es[b].seq) = (es[b].seq, es[a].seq);
        }
    };
    let db = filled(backend, 6).await;
    tamper(&db.store, swap(2, 3)).await;
    assert_eq!(broken_at(&db.store).await, (3, BreakKind::Reordered));

    let db = filled(backend, 6).await;
    tamper(&db.store, swap(1, 4)).await;
    assert_eq!(broken_at(&db.store).await, (2, BreakKind::Reordered));
}

async fn writer_loses_nothing_across_shutdown(backend: Backend) {
    // A small channel forces the overflow path under this burst.
    for capacity in [64, 10_000] {
        let db = test_db(backend).await;
        let writer = AuditWriter::start(db.store.clone(), &AuditConfig { capacity, ..AuditConfig::default() });
        let tasks: Vec<_> = (0..50)
            .map(|t| {
                let w = writer.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        w.record(record(t * 100 + i));
                        if i % 10 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        writer.shutdown().await;
        let stats = writer.stats();
        assert_eq!(db.store.audit_count().await.expect("count"), 5000, "capacity {capacity}: {stats:?}");
        assert_eq!((stats.written, stats.dropped), (5000, 0), "{stats:?}");
        assert!(stats.batches <= 1000, "records are batched: {stats:?}");
        assert_eq!(writer.backlog(), 0);
        match verify(&db.store).await.expect("verify") {
            Verification::Intact { records: 5000, .. } => {}
            other => panic!("{other:?}"),
        }
        let ids: std::collections::HashSet<String> =
            db.store.audit_after(0, 10_000).await.expect("read").into_iter().map(|e| e.request_id).collect();
        assert_eq!(ids.len(), 5000, "every request id exactly once");
        // After shutdown nothing is accepted, and nothing is lost silently.
        writer.record(record(0));
        assert_eq!(writer.stats().dropped, 1);
        assert!(matches!(writer.record_durable(record(1)).await, Err(AuditError::Closed)));
        assert_eq!(writer.stats().dropped, 2);
        assert_eq!(db.store.audit_count().await.expect("count"), 5000);
    }
}

/// Callers of `write` in `async` durability faster than the store wait for room in the channel
/// (up to `MAX_WAIT` each) rather than spilling into the overflow queue: memory stays at the
/// channel's capacity, and nothing is lost.
async fn async_callers_wait_for_a_writer_that_is_behind(backend: Backend) {
    const TASKS: usize = 8;
    const EACH: usize = 200;
    let db = test_db(backend).await;
    let writer = AuditWriter::start(db.store.clone(), &AuditConfig { capacity: 64, ..AuditConfig::default() });
    assert_eq!(writer.durability(), Durability::Async);
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let w = writer.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    w.write(record(t * EACH + i)).await.expect("queued");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    writer.shutdown().await;
    let stats = writer.stats();
    let total = (TASKS * EACH) as u64;
    assert_eq!((stats.written, stats.dropped, stats.shed), (total, 0, 0), "{stats:?}");
    assert!(stats.waited > 0, "the callers outran the store and waited: {stats:?}");
    // Each wait ends when the writer takes its next batch, long before `MAX_WAIT`; only a
    // commit stalled past it (a loaded machine's fsync) lets a record spill.
    assert!(stats.overflowed * 10 <= total, "records waited rather than spilled: {stats:?}");
    assert!(
        matches!(verify(&db.store).await.expect("verify"), Verification::Intact { records, .. } if records == total)
    );
}

async fn strict_mode_returns_after_commit(backend: Backend) {
    let db = test_db(backend).await;
    let config = AuditConfig { durability: Durability::Strict, ..AuditConfig::default() };
    let writer = AuditWriter::start(db.store.clone(), &config);
    assert_eq!(writer.durability(), Durability::Strict);
    for i in 0..3 {
        writer.write(record(i)).await.expect("committed");
        // Visible to another reader the moment the call returns.
        assert_eq!(db.store.audit_count().await.expect("count"), i as i64 + 1);
    }
    let seq = writer.record_durable(record(3)).await.expect("committed");
    assert_eq!(seq, 4);
    // Many strict callers at once share transactions (group commit), each learning its seq.
    let writer = Arc::new(writer);
    let calls: Vec<_> = (10..60)
        .map(|i| {
            let w = writer.clone();
            tokio::spawn(async move { w.record_durable(record(i)).await.expect("committed") })
        })
        .collect();
    let mut seqs = Vec::new();
    for c in calls {
        seqs.push(c.await.expect("task"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (5..55).collect::<Vec<i64>>());
    assert_eq!(db.store.audit_count().await.expect("count"), 54);
    writer.shutdown().await;
    assert!(matches!(verify(&db.store).await.expect("verify"), Verification::Intact { records: 54, .. }));
}

async fn replicas_share_one_chain(backend: Backend) {
    let db = test_db(backend).await;
    // Two writers on two pools: two gateway replicas sharing a database.
    let other = Store::connect(&db.url).await.expect("second pool");
    let writers = [
        AuditWriter::start(db.store.clone(), &AuditConfig::default()),
        AuditWriter::start(other.clone(), &AuditConfig::default()),
    ];
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let w = writers[t % 2].clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    w.record(record(t * 50 + i));
                    // Each flush closes a batch, so the replicas' transactions interleave.
                    if i % 10 == 9 {
                        w.flush().await.expect("flushed");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    for w in &writers {
        w.shutdown().await;
    }
    assert!(writers.iter().all(|w| w.stats().batches >= 5), "both replicas wrote several batches");
    assert_eq!(db.store.audit_count().await.expect("count"), 400);
    assert!(matches!(verify(&db.store).await.expect("verify"), Verification::Intact { records: 400, .. }));
    other.close().await;
}

async fn search_filters_combine(backend: Backend) {
    let db = filled(backend, 30).await;
    let search = |q: AuditQuery| {
        let store = db.store.clone();
        async move { store.audit_search(&AuditQuery { limit: 100, ..q }).await.expect("search") }
    };
    let alice = search(AuditQuery { user: Some("alice".into()), ..AuditQuery::default() }).await;
    assert_eq!(alice.len(), 10);
    assert!(alice.iter().all(|e| e.principal_name.as_deref() == Some("alice")));
    assert!(alice.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
    let by_id = search(AuditQuery { user: Some(principal_id(0)), ..AuditQuery::default() }).await;
    assert_eq!(by_id, alice, "--user matches ids too");
    let both = search(AuditQuery {
        user: Some("alice".into()),
        server: Some("github".into()),
        tool: Some("tool_0".into()),
        ..AuditQuery::default()
    })
    .await;
    // i % 3 == 0, i % 2 == 0, i % 5 == 0: i in {0}, and 30 records hold only i < 30.
    assert_eq!(both.iter().map(|e| e.request_id.as_str()).collect::<Vec<_>>(), ["req-0"]);
    let window = search(AuditQuery {
        since_ms: Some(1_795_400_000_010),
        until_ms: Some(1_795_400_000_015),
        ..AuditQuery::default()
    })
    .await;
    assert_eq!(window.iter().map(|e| e.seq).collect::<Vec<_>>(), [11, 12, 13, 14, 15]);
    let newest = db.store.audit_search(&AuditQuery { limit: 3, ..AuditQuery::default() }).await.expect("search");
    assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), [28, 29, 30]);
}

/// `audit search --user NAME` finds its segments through the keys' primary key on both
/// backends, not by decoding the whole log.
async fn a_user_search_uses_the_key_index(backend: Backend) {
    use portcullis::audit::storage::{Bind, search_sql};
    let db = filled(backend, 30).await;
    let query = AuditQuery { user: Some("alice".into()), limit: 10, ..AuditQuery::default() };
    let (sql, binds) = search_sql(&query, i64::MAX);
    let [Bind::Int(before), Bind::Text(name), Bind::Int(limit)] = &binds[..] else { panic!("binds: {binds:?}") };
    let plan: Vec<String> = match &db.store {
        Store::Sqlite(p) => {
            let rows: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                    .bind(before)
                    .bind(name)
                    .bind(limit)
                    .fetch_all(p)
                    .await
                    .expect("plan");
            rows.into_iter().map(|r| r.3).collect()
        }
        Store::Postgres(p) => {
            // A few rows are cheaper to scan than to look up: forbid the scan, so the plan
            // shows whether the index can serve the query at all.
            let mut tx = p.begin().await.expect("tx");
            sqlx::query("SET LOCAL enable_seqscan = off").execute(&mut *tx).await.expect("set");
            let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
                .bind(before)
                .bind(name)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await
                .expect("plan");
            rows.into_iter().map(|r| r.0).collect()
        }
    };
    let keyed = |l: &String| match backend {
        Backend::Sqlite => l.contains("USING PRIMARY KEY (kind=? AND value=?)"),
        Backend::Postgres => l.contains("audit_segment_keys_pkey"),
    };
    assert!(plan.iter().any(keyed), "plan: {plan:#?}");
    let by_id = search_sql(&AuditQuery { user: Some(principal_id(1)), ..AuditQuery::default() }, i64::MAX);
    assert!(by_id.0.contains("'user', 'principal'"), "an id-shaped argument matches ids too: {}", by_id.0);
    let found = db.store.audit_search(&query).await.expect("search");
    assert_eq!(found.len(), 10);
    assert!(found.iter().all(|e| e.principal_name.as_deref() == Some("alice")));
}

fn portcullis(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(config)
        .args(["audit"])
        .args(args)
        .env_remove("PORTCULLIS_CONFIG")
        .output()
        .expect("portcullis runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_cli_verify_tail_search_export() {
    let db = test_db(Backend::Sqlite).await;
    let dir = db._dir.path();
    let config = dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!("[gateway]\ndata_dir = {:?}\n\n[store]\nurl = {:?}\n", dir.display().to_string(), db.url),
    )
    .expect("config");
    let writer = AuditWriter::start(db.store.clone(), &AuditConfig::default());
    for i in 0..5 {
        let mut r = record(i);
        if i == 1 {
            r.arguments = Arguments::new(json!({"api_key": "sk-0123456789abcdefghijklmn", "q": "x"}));
        }
        writer.record(r);
    }
    writer.shutdown().await;

    let out = portcullis(&config, &["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("ok: 5 records"), "{stdout}");

    let out = portcullis(&config, &["tail", "-n", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.lines().next().is_some_and(|l| l.contains("#4") && l.contains("req-3")), "{stdout}");

    let out = portcullis(&config, &["search", "--user", "bob", "--json", "--since", "2026-11-23"]);
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert!(out.status.success());
    assert_eq!(lines.iter().map(|v| v["seq"].as_i64().unwrap_or(0)).collect::<Vec<_>>(), [2, 5]);

    let export = dir.join("audit.jsonl");
    let out = portcullis(&config, &["export", "--format", "jsonl", "--out", export.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&export).expect("export written");
    let rows: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0]["prev_hash"], "0".repeat(64));
    assert_eq!(rows[1]["prev_hash"], rows[0]["hash"]);
    assert_eq!(rows[1]["arguments"], json!({"api_key": "[REDACTED]", "q": "x"}));
    assert!(!text.contains("sk-0123"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&export).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o077, 0, "the export is private: {mode:o}");
    }
    let out = portcullis(&config, &["export", "--format", "jsonl"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), text, "stdout export matches the file");

    tamper(&db.store, |es| es[1].latency_us = 1).await;
    let out = portcullis(&config, &["verify"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "verify must fail after tampering");
    assert!(stderr.contains("seq 2") && stderr.contains("edited"), "{stderr}");
}

/// Makes every insert into `audit_segments` fail (a store outage), or ends it.
async fn outage(store: &Store, on: bool) {
    match (store, on) {
        (Store::Sqlite(_), true) => {
            exec(
                store,
                "CREATE TRIGGER audit_off BEFORE INSERT ON audit_segments BEGIN SELECT RAISE(ABORT, 'down'); END",
            )
            .await
        }
        (Store::Sqlite(_), false) => exec(store, "DROP TRIGGER audit_off").await,
        (Store::Postgres(_), true) => {
            exec(store, "CREATE OR REPLACE FUNCTION audit_off() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'down'; END $$")
                .await;
            exec(
                store,
                "CREATE TRIGGER audit_off BEFORE INSERT ON audit_segments FOR EACH ROW EXECUTE FUNCTION audit_off()",
            )
            .await;
        }
        (Store::Postgres(_), false) => exec(store, "DROP TRIGGER audit_off ON audit_segments").await,
    }
}

async fn store_outage_is_retried_and_never_silent(backend: Backend) {
    let db = test_db(backend).await;
    let writer = AuditWriter::start(db.store.clone(), &AuditConfig::default());
    writer.record_durable(record(0)).await.expect("committed");
    outage(&db.store, true).await;
    // A strict caller hears of the failure at once; its record stays queued.
    assert!(matches!(writer.record_durable(record(1)).await, Err(AuditError::NotCommitted(_))));
    writer.record(record(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(writer.stats().errors >= 2, "{:?}", writer.stats());
    assert_eq!(writer.backlog(), 2);
    outage(&db.store, false).await;
    writer.flush().await.expect("flushed after the outage");
    assert_eq!(db.store.audit_count().await.expect("count"), 3);
    assert_eq!((writer.backlog(), writer.stats().dropped), (0, 0));

    // Still down at shutdown: a few more attempts, then the loss is counted (and logged).
    outage(&db.store, true).await;
    writer.record(record(3));
    let started = std::time::Instant::now();
    writer.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown is bounded");
    assert_eq!((writer.stats().dropped, writer.backlog()), (1, 0));
    outage(&db.store, false).await;
    assert!(matches!(verify(&db.store).await.expect("verify"), Verification::Intact { records: 3, .. }));
}

/// A batch of 123 records goes into SQLite as statements of 100, 10, 10, 1, 1 and 1 rows
/// (`docs/decisions/0005-sqlite-audit-appends.md`); every column of every row, empty ones
/// included, reads back as written, in order and chained.
async fn every_column_survives_batches_of_any_size(backend: Backend) {
    let db = test_db(backend).await;
    let writer = AuditWriter::start(db.store.clone(), &AuditConfig::default());
    let sparse = |i: usize| {
        let mut r = record(i);
        if i.is_multiple_of(7) {
            // A refusal before authentication: no principal, client, tool or upstream status.
            r.principal_id = None;
            r.principal_kind = None;
            r.principal_name = None;
            r.token_id = None;
            r.client_name = None;
            r.client_version = None;
            r.tool = None;
            r.upstream_status = None;
        }
        r
    };
    for i in 0..123 {
        writer.record(sparse(i));
    }
    writer.flush().await.expect("flushed");
    writer.record(sparse(123));
    writer.shutdown().await;
    let rows = db.store.audit_after(0, 1000).await.expect("read");
    assert_eq!(rows.len(), 124);
    for (i, e) in rows.iter().enumerate() {
        let r = sparse(i);
        assert_eq!(e.seq, i as i64 + 1);
        assert_eq!(e.time_ms, r.time_ms);
        assert_eq!(e.request_id, r.request_id);
        assert_eq!(e.principal_id, r.principal_id);
        assert_eq!(e.principal_kind, r.principal_kind);
        assert_eq!(e.principal_name, r.principal_name);
        assert_eq!(e.token_id, r.token_id);
        assert_eq!(e.client_name, r.client_name);
        assert_eq!(e.client_version, r.client_version);
        assert_eq!(e.server, r.server);
        assert_eq!(e.method, "tools/call");
        assert_eq!(e.tool, r.tool);
        assert_eq!(serde_json::from_str::<Value>(&e.arguments).expect("json"), json!({"i": i, "q": "text"}));
        assert_eq!(e.decision, "allow");
        assert_eq!(e.upstream_status, r.upstream_status);
        assert_eq!(e.latency_us, 1000 + i as i64);
        assert_eq!((e.bytes_in, e.bytes_out), (100, 2000));
        assert_eq!(e.hash.len(), 32);
    }
    assert!(rows.windows(2).all(|w| w[1].prev_hash == w[0].hash), "each row names the one before");
    assert!(matches!(verify(&db.store).await.expect("verify"), Verification::Intact { records: 124, .. }));
}

/// Records that an earlier version kept one per row in `audit_records` move into segments on
/// start, keeping their seq and hashes: the chain verifies across them and the writer
/// continues it. Tampering with a row before the move is still found after it.
async fn rows_of_earlier_versions_move_into_segments(backend: Backend) {
    let db = test_db(backend).await;
    let mut prev = portcullis::audit::GENESIS.to_vec();
    let redactor = portcullis::audit::Redactor::new(portcullis::audit::DEFAULT_REDACT_KEYS);
    for i in 0..1234 {
        let mut e = record(i).into_entry(&redactor);
        e.seq = i as i64 + 1;
        e.prev_hash = prev.clone();
        e.hash = portcullis::audit::entry_hash(&e).to_vec();
        prev.clone_from(&e.hash);
        if i == 700 {
            e.tool = Some("edited".into());
        }
        insert_row(&db.store, &e).await;
    }
    assert_eq!(db.store.audit_upgrade().await.expect("upgrade"), 1234);
    assert_eq!(db.store.audit_upgrade().await.expect("again"), 0, "nothing left to move");
    assert_eq!(db.store.audit_count().await.expect("count"), 1234);
    assert_eq!(broken_at(&db.store).await, (701, BreakKind::Edited));
    tamper(&db.store, |es| {
        es[700].tool = Some(format!("tool_{}", 700 % 5));
    })
    .await;
    assert!(matches!(verify(&db.store).await.expect("verify"), Verification::Intact { records: 1234, .. }));

    writer_with(&db, AuditConfig::default(), 10).await.shutdown().await;
    match verify(&db.store).await.expect("verify") {
        Verification::Intact { records: 1244, .. } => {}
        other => panic!("{other:?}"),
    }
    let left: i64 = portcullis::on_pool!(&db.store, p => sqlx::query_scalar("SELECT COUNT(*) FROM audit_records_legacy").fetch_one(p).await.expect("count"));
    assert_eq!(left, 0);
}

/// One row of the table earlier versions wrote.
async fn insert_row(store: &Store, e: &Entry) {
    const SQL: &str = "INSERT INTO audit_records_legacy (seq, time_ms, request_id, principal_id, principal_kind, \
         principal_name, token_id, client_name, client_version, server, method, tool, arguments, decision, \
         upstream_status, latency_us, bytes_in, bytes_out, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, \
         $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)";
    portcullis::on_pool!(store, p => {
        sqlx::query(SQL)
            .bind(e.seq)
            .bind(e.time_ms)
            .bind(&e.request_id)
            .bind(&e.principal_id)
            .bind(&e.principal_kind)
            .bind(&e.principal_name)
            .bind(&e.token_id)
            .bind(&e.client_name)
            .bind(&e.client_version)
            .bind(&e.server)
            .bind(&e.method)
            .bind(&e.tool)
            .bind(&e.arguments)
            .bind(&e.decision)
            .bind(e.upstream_status)
            .bind(e.latency_us)
            .bind(e.bytes_in)
            .bind(e.bytes_out)
            .bind(&e.prev_hash)
            .bind(&e.hash)
            .execute(p)
            .await
            .expect("insert");
    });
}

/// A segment keyed at the very end of the key space (only tampering makes one) ends every
/// read instead of being read again forever, and `verify` reports it.
async fn a_segment_at_the_end_of_the_key_space_ends_every_read(backend: Backend) {
    let db = filled(backend, 6).await;
    let mut stray = db.store.audit_after(5, 1).await.expect("read").remove(0);
    stray.seq = i64::MAX;
    db.store.audit_put_segments(&segment::segments(&[stray])).await.expect("put");
    use tokio::time::timeout;
    const T: Duration = Duration::from_secs(20);
    let all = timeout(T, db.store.audit_after(0, 1000)).await.expect("audit_after ends").expect("read");
    assert_eq!(all.len(), 7);
    let last = timeout(T, db.store.audit_after(i64::MAX - 1, 10)).await.expect("ends").expect("read");
    assert_eq!(last.len(), 1);
    assert_eq!(timeout(T, db.store.audit_seq_of_hash(&[0; 32])).await.expect("ends").expect("scan"), None);
    let verdict = timeout(T, verify(&db.store)).await.expect("verify ends").expect("verify");
    assert!(matches!(verdict, Verification::Broken(ref b) if b.seq == 7), "{verdict:?}");
}

/// The checkpointer on each backend: it signs the store's head into its file, and the chain
/// checked against those checkpoints catches a cut tail and a rollback that the chain alone
/// cannot see.
async fn checkpoints_pin_the_tail(backend: Backend) {
    use portcullis::audit::checkpoint::{Checkpointer, check_file};
    use portcullis::audit::{Anchors, verify_anchored};
    use portcullis::keys::{Key, KeyRing};

    let db = filled(backend, 20).await;
    let ring = KeyRing::single(Key::random());
    let file = db._dir.path().join("cp.jsonl");
    let clock = portcullis::clock::Clock::system();
    let cp = Checkpointer::start(db.store.clone(), ring.clone(), clock, file.clone(), Duration::from_millis(20))
        .expect("opens its file");
    cp.finish().await;
    let checked = check_file(&std::fs::read_to_string(&file).expect("written"), &ring);
    assert!(checked.bad.is_empty() && checked.unknown_key.is_empty(), "{checked:?}");
    let head = db.store.audit_head().await.expect("head").expect("not empty");
    assert_eq!(checked.anchors.keys().copied().collect::<Vec<_>>(), [20], "one checkpoint of the unmoved head");
    assert_eq!(checked.anchors[&20].0, head.1);
    let mut anchors: Anchors =
        checked.anchors.iter().map(|(s, (h, line, _))| (*s, (h.clone(), format!("line {line}")))).collect();
    let tenth = db.store.audit_after(9, 1).await.expect("read").remove(0);
    anchors.insert(10, (tenth.hash.clone(), "an earlier checkpoint".into()));
    assert!(matches!(
        verify_anchored(&db.store, &anchors).await.expect("runs"),
        Verification::Intact { records: 20, .. }
    ));

    // The tail cut: the chain alone still verifies; against the checkpoints it is cut at 16.
    tamper(&db.store, |es| es.truncate(15)).await;
    assert!(matches!(verify(&db.store).await.expect("runs"), Verification::Intact { records: 15, .. }));
    match verify_anchored(&db.store, &anchors).await.expect("runs") {
        Verification::Broken(b) => assert_eq!((b.seq, b.kind), (16, BreakKind::Cut), "{b}"),
        intact => panic!("a cut tail went unnoticed: {intact:?}"),
    }
    // Writing on after the cut reuses seqs 16.. with other records: a rollback, named at the
    // first checkpointed seq it rewrote.
    writer_with(&db, AuditConfig::default(), 8).await.shutdown().await;
    assert!(matches!(verify(&db.store).await.expect("runs"), Verification::Intact { records: 23, .. }));
    match verify_anchored(&db.store, &anchors).await.expect("runs") {
        Verification::Broken(b) => assert_eq!((b.seq, b.kind), (20, BreakKind::RolledBack), "{b}"),
        intact => panic!("a rollback went unnoticed: {intact:?}"),
    }
}
