//! Secrets at rest and key rotation, every store test on SQLite and on PostgreSQL; the
//! `secret` and `keys` command lines; redaction.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use portcullis::crypto::{CryptoError, Sealed};
use portcullis::keys::{Key, KeyRing, SharedKeyRing, load_key_ring_from};
use portcullis::protocol::session::{Sealer, SessionState};
use portcullis::store::Store;
use portcullis::store::rotate::{key_usage, reencrypt};
use portcullis::store::secrets::SecretError;
use secrecy::{ExposeSecret, SecretString};
use tempfile::TempDir;

use crate::common::FreshPostgres;

const NOW: i64 = 1_760_000_000;

/// A fresh, empty store, gone when dropped.
struct Db {
    store: Store,
    url: String,
    _dir: TempDir,
    _pg: Option<FreshPostgres>,
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/p.db", dir.path().display());
        Db { store: Store::connect(&url).await.expect("sqlite opens"), url, _dir: dir, _pg: None }
    }

    async fn postgres() -> Db {
        let pg = FreshPostgres::create().await;
        let store = Store::connect(&pg.url).await.expect("PostgreSQL on 127.0.0.1:5432 must be running");
        Db { store, url: pg.url.clone(), _dir: tempfile::tempdir().expect("tempdir"), _pg: Some(pg) }
    }

    /// Runs raw SQL with one bytes parameter and one text parameter (for tampering).
    async fn exec(&self, sql: &'static str, bytes: &[u8], text: &str) {
        portcullis::on_pool!(&self.store, p => {
            sqlx::query(sql).bind(bytes).bind(text).execute(p).await.expect("raw sql");
        });
    }
}

/// Every test body below runs once per backend.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name(super::Db::sqlite().await).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name(super::Db::postgres().await).await
            })*
        }
    };
}

on_both_stores!(
    secret_round_trip,
    secret_moved_to_another_row_fails,
    secret_tampering_fails,
    key_rotation_reencrypts_every_row,
    key_rotation_loses_no_concurrent_write,
    key_ring_reloads_after_another_process_rotates,
    secret_and_keys_cli,
);

fn secret(text: &str) -> SecretString {
    SecretString::from(text)
}

fn is_crypto(r: Result<Option<SecretString>, SecretError>, want: &CryptoError) -> bool {
    matches!(r, Err(SecretError::Crypto { source, .. }) if &source == want)
}

async fn secret_round_trip(db: Db) {
    let s = &db.store;
    let ring = KeyRing::single(Key::random());
    s.secret_set("github-pat", &secret("ghp_first"), &ring, NOW).await.expect("set");
    assert_eq!(s.secret_get("github-pat", &ring).await.expect("get").expect("found").expose_secret(), "ghp_first");
    s.secret_set("github-pat", &secret("ghp_second"), &ring, NOW + 10).await.expect("replaced");
    s.secret_set("a.b_c-1", &secret("x"), &ring, NOW).await.expect("set");
    assert_eq!(s.secret_get("github-pat", &ring).await.expect("get").expect("found").expose_secret(), "ghp_second");
    let list = s.secret_list().await.expect("list");
    assert_eq!(list.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["a.b_c-1", "github-pat"]);
    assert_eq!((list[1].created_at, list[1].updated_at), (NOW, NOW + 10));
    assert!(s.secret_get("absent", &ring).await.expect("get").is_none());
    assert!(matches!(s.secret_set("bad name", &secret("x"), &ring, NOW).await, Err(SecretError::BadName(_))));
    assert!(matches!(s.secret_set("n", &secret(""), &ring, NOW).await, Err(SecretError::Empty)));
    let other = KeyRing::single(Key::random());
    let wrong = s.secret_get("github-pat", &other).await;
    assert!(is_crypto(wrong, &CryptoError::UnknownKey(ring.active_id().to_string())));
    assert!(s.secret_delete("github-pat").await.expect("delete"));
    assert!(!s.secret_delete("github-pat").await.expect("delete"));
    assert!(s.secret_get("github-pat", &ring).await.expect("get").is_none());
    s.close().await;
}

async fn secret_moved_to_another_row_fails(db: Db) {
    let s = &db.store;
    let ring = KeyRing::single(Key::random());
    s.secret_set("a", &secret("value-of-a"), &ring, NOW).await.expect("set");
    s.secret_set("b", &secret("value-of-b"), &ring, NOW).await.expect("set");
    let a = s.secret_sealed("a").await.expect("read").expect("found");
    db.exec("UPDATE secrets SET ciphertext = $1 WHERE name = $2", &a.ciphertext, "b").await;
    let err = s.secret_get("b", &ring).await.expect_err("bound to its row");
    assert!(matches!(err, SecretError::Crypto { source: CryptoError::Unauthentic, .. }), "{err}");
    assert!(!format!("{err} {err:?}").contains("value-of"), "{err:?}");
    assert_eq!(s.secret_get("a", &ring).await.expect("get").expect("found").expose_secret(), "value-of-a");
    s.close().await;
}

async fn secret_tampering_fails(db: Db) {
    let s = &db.store;
    let ring = KeyRing::single(Key::random()).with_new_active(Key::random(), NOW).expect("two keys");
    s.secret_set("t", &secret("tamper-me"), &ring, NOW).await.expect("set");
    let sealed = s.secret_sealed("t").await.expect("read").expect("found");
    for at in [0, 1, 30, sealed.ciphertext.len() - 1] {
        let mut bad = sealed.ciphertext.clone();
        bad[at] ^= 0x01;
        db.exec("UPDATE secrets SET ciphertext = $1 WHERE name = $2", &bad, "t").await;
        assert!(s.secret_get("t", &ring).await.is_err(), "byte {at} altered");
    }
    db.exec("UPDATE secrets SET ciphertext = $1 WHERE name = $2", &sealed.ciphertext, "t").await;
    assert!(s.secret_get("t", &ring).await.is_ok(), "restored");
    // The same ciphertext claimed by the ring's other key.
    let other_id = ring.keys()[0].id.to_string();
    portcullis::on_pool!(s, p => {
        sqlx::query("UPDATE secrets SET key_id = $1 WHERE name = 't'").bind(&other_id).execute(p).await.expect("raw");
    });
    assert!(is_crypto(s.secret_get("t", &ring).await, &CryptoError::Unauthentic));
    s.close().await;
}

async fn key_rotation_reencrypts_every_row(db: Db) {
    let s = &db.store;
    let old = KeyRing::single(Key::random());
    for i in 0..120 {
        s.secret_set(&format!("s{i:03}"), &secret(&format!("value-{i}")), &old, NOW).await.expect("set");
    }
    let new = old.with_new_active(Key::random(), NOW).expect("new key");
    let report = reencrypt(s, &new, 7).await.expect("rotates");
    assert_eq!((report.rows, report.raced, report.remaining), (120, 0, 0), "{report:?}");
    assert!(report.failed.is_empty());
    let usage = key_usage(s).await.expect("usage");
    assert_eq!(usage.into_iter().collect::<Vec<_>>(), [(new.active_id().to_string(), 120)]);
    let retired = new.without(old.active_id().as_str()).expect("the old key is retirable");
    for i in 0..120 {
        let v = s.secret_get(&format!("s{i:03}"), &retired).await.expect("get").expect("found");
        assert_eq!(v.expose_secret(), format!("value-{i}"));
    }
    assert!(s.secret_get("s000", &old).await.is_err(), "the old ring lacks the new key");
    assert_eq!(reencrypt(s, &new, 7).await.expect("again").rows, 0, "nothing left to do");
    // A row under a key nobody holds is reported, not fatal.
    let stray = KeyRing::single(Key::random());
    s.secret_set("stray", &secret("x"), &stray, NOW).await.expect("set");
    let report = reencrypt(s, &new, 7).await.expect("rotates");
    assert_eq!((report.failed.len(), report.remaining), (1, 1), "{report:?}");
    assert_eq!((report.failed[0].table, report.failed[0].id.as_str()), ("secrets", "stray"));
    s.close().await;
}

async fn key_rotation_loses_no_concurrent_write(db: Db) {
    let s = db.store.clone();
    let old = KeyRing::single(Key::random());
    const N: usize = 200;
    for i in 0..N {
        s.secret_set(&format!("c{i:03}"), &secret("v0"), &old, NOW).await.expect("set");
    }
    let new = old.with_new_active(Key::random(), NOW).expect("new key");
    let rotation = tokio::spawn({
        let (s, new) = (s.clone(), new.clone());
        async move { reencrypt(&s, &new, 3).await.expect("rotates") }
    });
    // Four writers, half of them still on the old ring (a replica that has not reloaded).
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (s, ring) = (s.clone(), if w % 2 == 0 { old.clone() } else { new.clone() });
            tokio::spawn(async move {
                for round in 1..=2 {
                    for i in (w..N).step_by(4) {
                        let v = secret(&format!("v{round}-{i}"));
                        s.secret_set(&format!("c{i:03}"), &v, &ring, NOW + round).await.expect("concurrent set");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    let first = rotation.await.expect("rotation");
    assert!(first.failed.is_empty(), "{first:?}");
    // Rows the stale writers wrote after the pass are picked up by the next run.
    let second = reencrypt(&s, &new, 50).await.expect("rotates");
    assert_eq!(second.remaining, 0, "{second:?}");
    for i in 0..N {
        let v = s.secret_get(&format!("c{i:03}"), &new).await.expect("get").expect("found");
        assert_eq!(v.expose_secret(), format!("v2-{i}"), "row c{i:03} kept its last write");
    }
    assert_eq!(key_usage(&s).await.expect("usage").get(new.active_id().as_str()), Some(&(N as u64)));
    s.close().await;
}

async fn key_ring_reloads_after_another_process_rotates(db: Db) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = &db.store;
    let shared = SharedKeyRing::new(load_key_ring_from(dir.path(), None, None).expect("ring"), Some(dir.path().into()));
    // SharedKeyRing::load reads the process environment; this test pins the file source.
    let gateway_ring = shared.current();
    s.secret_set("live", &secret("live-value"), &gateway_ring, NOW).await.expect("set");
    // `keys rotate` in another process: a new active key in keys.json, every row re-encrypted.
    let rotated = load_key_ring_from(dir.path(), None, None)
        .expect("ring")
        .with_new_active(Key::random(), NOW)
        .expect("new key")
        .save(dir.path())
        .expect("saved");
    reencrypt(s, &rotated, 10).await.expect("rotates");
    assert!(s.secret_get("live", &gateway_ring).await.is_err(), "the stale ring alone cannot read it");
    let v = s.secret_get_shared("live", &shared).await.expect("reloads").expect("found");
    assert_eq!(v.expose_secret(), "live-value");
    assert_eq!(shared.current().active_id(), rotated.active_id());
    s.close().await;
}

/// Runs the CLI with `config`, feeding `stdin`; returns (success, stdout, stderr).
fn cli(config: &Path, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("PORTCULLIS_MASTER_KEY")
        .env_remove("PORTCULLIS_MASTER_KEYS")
        .env_remove("PORTCULLIS_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("portcullis runs");
    child.stdin.take().expect("stdin").write_all(stdin).expect("writes stdin");
    let out = child.wait_with_output().expect("portcullis ends");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

async fn secret_and_keys_cli(db: Db) {
    const VALUE: &str = "ghp_Cli5ecretValue_do_not_print";
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = dir.path().join("portcullis.toml");
    let toml = format!("[gateway]\ndata_dir = {:?}\n\n[store]\nurl = {:?}\n", data.display().to_string(), db.url);
    std::fs::write(&config, toml).expect("config written");
    let seen = std::cell::RefCell::new(String::new());
    let run_env = |args: &[&str], stdin: &str, env: &[(&str, &str)]| {
        let (ok, out, err) = cli(&config, args, stdin.as_bytes(), env);
        seen.borrow_mut().push_str(&out);
        seen.borrow_mut().push_str(&err);
        (ok, out, err)
    };
    let run = |args: &[&str], stdin: &str| run_env(args, stdin, &[]);

    let (ok, _, err) = run(&["secret", "set", "github-pat"], &format!("{VALUE}\n"));
    assert!(ok, "{err}");
    let (ok, list, err) = run(&["secret", "list"], "");
    assert!(ok && list.contains("github-pat"), "{list}{err}");
    let (ok, _, err) = run(&["secret", "set", "empty"], "\n");
    assert!(!ok && err.contains("empty"), "{err}");
    let (ok, _, _) = run(&["secret", "set", "bad name"], "x");
    assert!(!ok);

    let old = load_key_ring_from(&data, None, None).expect("the CLI created the key file");
    assert_eq!(mode(&data.join("master.key")), 0o600);
    let stored = db.store.secret_get("github-pat", &old).await.expect("get").expect("found");
    assert_eq!(stored.expose_secret(), VALUE, "one trailing newline dropped");

    let (ok, keys, err) = run(&["keys", "list"], "");
    assert!(ok && keys.contains(old.active_id().as_str()), "{keys}{err}");
    let (ok, out, err) = run(&["keys", "rotate", "--batch", "1"], "");
    assert!(ok && out.contains("re-encrypted 1 rows"), "{out}{err}");
    let new = load_key_ring_from(&data, None, None).expect("ring file");
    assert_ne!(new.active_id(), old.active_id());
    assert_eq!(mode(&data.join("keys.json")), 0o600);
    let (ok, keys, _) = run(&["keys", "list"], "");
    let row = |id: &str| keys.lines().find(|l| l.starts_with(id)).unwrap_or_default().to_owned();
    assert!(
        ok && row(new.active_id().as_str()).contains('*') && row(new.active_id().as_str()).ends_with(" 1"),
        "{keys}"
    );
    assert!(row(old.active_id().as_str()).ends_with(" 0"), "{keys}");
    let (ok, _, err) = run(&["keys", "retire", new.active_id().as_str()], "");
    assert!(!ok && err.contains("active"), "{err}");
    let (ok, out, err) = run(&["keys", "retire", old.active_id().as_str()], "");
    assert!(ok, "{out}{err}");

    // Two-step rotation: add a key every replica can hold, then make it active.
    let (ok, out, err) = run(&["keys", "add"], "");
    assert!(ok, "{out}{err}");
    let staged = load_key_ring_from(&data, None, None).expect("ring file");
    assert_eq!((staged.keys().len(), staged.active_id()), (2, new.active_id()), "added, not active");
    let added = staged.keys()[1].id.to_string();
    assert!(out.contains(&added), "{out}");
    let (ok, _, _) = run(&["keys", "rotate", "--to", "nope"], "");
    assert!(!ok, "an unknown key");
    let (ok, out, err) = run(&["keys", "rotate", "--to", &added], "");
    assert!(ok && out.contains("re-encrypted 1 rows"), "{out}{err}");
    let (ok, out, err) = run(&["keys", "retire", new.active_id().as_str()], "");
    assert!(ok, "{out}{err}");
    let last = load_key_ring_from(&data, None, None).expect("ring file");
    assert_eq!((last.keys().len(), last.active_id().as_str()), (1, added.as_str()));

    // Keys from the environment are the operator's to change.
    let env_key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, Key::random().bytes());
    let env = [("PORTCULLIS_MASTER_KEY", env_key.as_str())];
    let (ok, _, err) = run_env(&["keys", "rotate"], "", &env);
    assert!(!ok && err.contains("PORTCULLIS_MASTER_KEY"), "{err}");
    let (ok, out, _) = run_env(&["keys", "list"], "", &env);
    assert!(ok && out.contains("keys from PORTCULLIS_MASTER_KEY"), "{out}");
    let stored = db.store.secret_get("github-pat", &last).await.expect("get").expect("found");
    assert_eq!(stored.expose_secret(), VALUE);

    let (ok, _, err) = run(&["secret", "delete", "github-pat"], "");
    assert!(ok, "{err}");
    let (ok, list, _) = run(&["secret", "list"], "");
    assert!(ok && !list.contains("github-pat"), "{list}");
    let seen = seen.into_inner();
    assert!(!seen.contains(VALUE) && !seen.contains("Cli5ecret"), "the value leaked into CLI output:\n{seen}");
    db.store.close().await;
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("exists").permissions().mode() & 0o777
}

/// Sessions sealed before a rotation still open after it, until their key is retired.
#[test]
fn key_rotation_keeps_sessions_open_until_retirement() {
    let old = KeyRing::single(Key::random());
    let state = SessionState { version: 1, key: "k".into(), ..Default::default() };
    let id = Sealer::from_ring(&old.derive("session")).seal(&state, "srv");
    let new = old.with_new_active(Key::random(), NOW).expect("new key");
    let sealer = Sealer::from_ring(&new.derive("session"));
    assert_eq!(sealer.open(&id, "srv").map(|s| s.key.clone()), Some("k".to_owned()));
    let fresh = sealer.seal(&state, "srv");
    assert!(Sealer::from_ring(&old.derive("session")).open(&fresh, "srv").is_none(), "sealed with the new key");
    let retired = new.without(old.active_id().as_str()).expect("retired");
    assert!(Sealer::from_ring(&retired.derive("session")).open(&id, "srv").is_none());
    // A single-key ring seals exactly as the plain constructor does.
    let key = Key::random();
    let plain = Sealer::new(&key.derive("session")).seal(&state, "srv");
    assert!(Sealer::from_ring(&KeyRing::single(key).derive("session")).open(&plain, "srv").is_some());
}

/// Keys, rings, ciphertexts, secret values and errors never show secret material.
#[test]
fn secret_and_key_debug_is_redacted() {
    use base64::Engine;
    let key = Key::random();
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.bytes());
    let hex: String = key.bytes().iter().map(|b| format!("{b:02x}")).collect();
    let ring = KeyRing::single(key.clone());
    let value = secret("s3cr3t-Value");
    let sealed: Sealed = ring.encrypt("secrets:x", b"s3cr3t-Value").expect("seals");
    let opened = ring.decrypt("secrets:x", &sealed).expect("opens");
    let shared = SharedKeyRing::new(ring.clone(), None);
    let err = SecretError::Crypto { name: "x".into(), source: CryptoError::Unauthentic };
    let all = format!("{key:?} {ring:?} {shared:?} {sealed:?} {value:?} {opened:?} {err:?} {err}");
    for needle in [b64.as_str(), &hex[..16], "s3cr3t", &format!("{:?}", key.bytes())] {
        assert!(!all.contains(needle), "{needle} in {all}");
    }
    assert!(all.contains(ring.active_id().as_str()), "ids are public: {all}");
}
