//! Loading, saving and parsing key rings.

use super::*;

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("exists").permissions().mode() & 0o777
}

#[test]
fn key_file_is_created_private_and_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = load_key_ring_from(dir.path(), None, None).expect("created");
    let b = load_key_ring_from(dir.path(), None, None).expect("reused");
    assert_eq!(a.active_key().bytes(), b.active_key().bytes());
    assert_eq!(a.active_id(), &a.active_key().fingerprint());
    assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);
    assert_eq!(format!("{:?}", a.active_key()), "Key(redacted)");
    assert_ne!(a.active_key().derive("x").bytes(), a.active_key().derive("y").bytes());
}

/// Processes starting together on a fresh data directory end up with one key: every loader
/// gets the same one, none sees a half-written file, and no temporary file is left behind.
#[test]
fn key_file_created_by_many_at_once_is_one_key() {
    for _ in 0..20 {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let start = std::sync::Barrier::new(12);
        let ids: Vec<Result<KeyId, String>> = std::thread::scope(|s| {
            let loaders: Vec<_> = (0..12)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        load_key_ring_from(&data, None, None).map(|r| r.active_id().clone()).map_err(|e| e.to_string())
                    })
                })
                .collect();
            loaders.into_iter().map(|l| l.join().expect("no panic")).collect()
        });
        let first = ids[0].clone().expect("loaded");
        assert!(ids.iter().all(|id| id.as_ref() == Ok(&first)), "{ids:?}");
        let names: Vec<_> = std::fs::read_dir(&data).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from(KEY_FILE)]);
        assert_eq!(load_key_ring_from(&data, None, None).expect("reloaded").active_id(), &first);
    }
}

#[test]
fn ring_file_wins_over_key_file_and_keeps_the_old_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = load_key_ring_from(dir.path(), None, None).expect("created");
    let saved = old.with_new_active(Key::random(), 5).expect("new key").save(dir.path()).expect("saved");
    assert_eq!(mode(&dir.path().join(RING_FILE)), 0o600);
    let loaded = load_key_ring_from(dir.path(), None, None).expect("loaded");
    assert_eq!(loaded.active_id(), saved.active_id());
    assert_ne!(loaded.active_id(), old.active_id());
    assert!(loaded.get(old.active_id().as_str()).is_some());
    assert_eq!(loaded.source(), &RingSource::RingFile(dir.path().join(RING_FILE)));
    let retired = loaded.without(old.active_id().as_str()).expect("retired");
    assert_eq!(retired.keys().len(), 1);
    assert!(matches!(retired.without(retired.active_id().as_str()), Err(KeyError::RetireActive(_))));
}

#[test]
fn environment_rings_parse_and_errors_carry_no_key() {
    let (a, b) = (Key::random(), Key::random());
    let text = format!("new:{}, old:{}", STANDARD.encode(a.bytes()), STANDARD.encode(b.bytes()));
    let ring = load_key_ring_from(Path::new("/nonexistent"), Some(&text), None).expect("parses");
    assert_eq!(ring.active_id().as_str(), "new");
    assert_eq!(ring.get("old").map(|k| *k.bytes()), Some(*b.bytes()));
    assert_eq!(ring.source(), &RingSource::EnvRing);
    let dbg = format!("{ring:?}");
    assert!(!dbg.contains(&STANDARD.encode(a.bytes())) && dbg.contains("\"new\""), "{dbg}");
    let bad = format!("x:{}", &STANDARD.encode(a.bytes())[..20]);
    let err = load_key_ring_from(Path::new("/nonexistent"), Some(&bad), None).expect_err("short key");
    assert!(!err.to_string().contains(&bad[2..]), "{err}");
    assert!(matches!(load_key_ring_from(Path::new("/x"), Some(&text), Some("y")), Err(KeyError::BothEnv)));
    let single = load_key_ring_from(Path::new("/x"), None, Some(&STANDARD.encode(a.bytes()))).expect("one key");
    assert_eq!(single.active_id(), &a.fingerprint());
    assert!(KeyId::parse("a:b").is_err() && KeyId::parse("").is_err() && KeyId::parse("k-1_B").is_ok());
}

#[test]
fn malformed_ring_files_are_reported_without_their_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leaked = "c2VjcmV0LWtleS1tYXRlcmlhbC1kby1ub3QtcHJpbnQ=";
    std::fs::write(dir.path().join(RING_FILE), format!("{{\"version\": \"{leaked}\"}}")).expect("written");
    let err = load_key_ring_from(dir.path(), None, None).expect_err("malformed").to_string();
    assert!(err.contains("line 1") && !err.contains(leaked), "{err}");
}
