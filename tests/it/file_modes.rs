//! What a gateway creates on a fresh data directory is private: the directory 0700; the
//! SQLite store and its `-wal` and `-shm` files, the master key and the audit checkpoint file
//! 0600. Checked on a `portcullis serve` process, with the usual umask (022) of a shell.

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
