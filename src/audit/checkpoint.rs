//! Signed checkpoints of the chain's head, kept outside the database, so that a log cut short
//! or rolled back behind one is detected (the hash chain alone proves nothing past its last
//! record). See `docs/audit.md` (Checkpoints) and `docs/decisions/0008-audit-checkpoints.md`.
//!
//! Every `[audit] checkpoint_interval` the gateway reads the head (seq and hash of the newest
//! record) and, when it moved (or the file no longer has its name), appends one line to
//! `[audit] checkpoint_file` (opened append-only, mode 0600) and logs it:
//!
//! ```text
//! {"v":1,"seq":1042,"hash":"…","time_ms":1765123456789,"key_id":"3f2a9c01","mac":"…"}
//! ```
//!
//! `mac` is HMAC-SHA256 under the `"audit-checkpoint"` subkey of the master key `key_id`, over
//! [`Checkpoint::signed_bytes`]. `portcullis audit verify --checkpoints FILE` checks every line
//! against the key ring and then the chain against every checkpoint: a record a checkpoint saw
//! must still be there with the same hash.
//!
//! A checkpoint that cannot be taken or written (the head cannot be read, the file cannot be
//! opened, written or synced, or its path no longer names the file the gateway opened and a new
//! one cannot be created there) is never silent: it is logged at `error`, counted by
//! `portcullis_audit_checkpoint_errors_total`, and [`Health`] (the gauge
//! `portcullis_audit_checkpoint_failing`) says so until a checkpoint is written again, which is
//! tried every second meanwhile. In `strict` durability the audit writer refuses new calls
//! while it does (fail closed, [`crate::audit::AuditWriter::refuses_strict`]); in `async`
//! calls go on.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::chain::hex;
use crate::clock::Clock;
use crate::keys::{Key, KeyRing};
use crate::store::Store;

/// The key ring purpose of the checkpoint MAC key: no other use shares it.
pub const PURPOSE: &str = "audit-checkpoint";

/// The format version written in every line.
const VERSION: u32 = 1;

/// What a verifier reads from the end of the file to find the last checkpoint at start.
const TAIL_BYTES: u64 = 4096;

/// How soon a checkpoint is tried again after one could not be written (or the interval, if
/// shorter).
const RETRY: Duration = Duration::from_secs(1);

type HmacSha256 = hmac::Hmac<Sha256>;

/// One signed checkpoint: the chain's head at `time_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The head's seq.
    pub seq: i64,
    /// The head's hash.
    pub hash: Vec<u8>,
    /// When it was taken (Unix milliseconds).
    pub time_ms: i64,
    /// The master key whose subkey signed it.
    pub key_id: String,
    /// HMAC-SHA256 over [`Checkpoint::signed_bytes`].
    pub mac: Vec<u8>,
}

/// A line of the checkpoint file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    v: u32,
    seq: i64,
    hash: String,
    time_ms: i64,
    key_id: String,
    mac: String,
}

/// Why checkpoints could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened, read or written.
    #[error("audit checkpoint file {path}: {why}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
}

impl Checkpoint {
    /// Signs the head `(seq, hash)` taken at `time_ms` with the ring's active key.
    pub fn sign(ring: &KeyRing, seq: i64, hash: &[u8], time_ms: i64) -> Checkpoint {
        let key_id = ring.active_id().to_string();
        let mut c = Checkpoint { seq, hash: hash.to_vec(), time_ms, key_id, mac: Vec::new() };
        c.mac = mac(&ring.active_key().derive(PURPOSE)).chain_update(c.signed_bytes()).finalize().into_bytes().to_vec();
        c
    }

    /// What the MAC covers: a domain tag, then seq, time, the key id (length-prefixed) and the
    /// hash (length-prefixed), so no two checkpoints share a byte string.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.key_id.len() + self.hash.len());
        out.extend_from_slice(b"portcullis/audit-checkpoint/v1\0");
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        for part in [self.key_id.as_bytes(), &self.hash] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// Whether the MAC is right under the ring's key `key_id`: `None` when the ring does not
    /// hold that key (retired since), else the answer (compared in constant time).
    pub fn authentic(&self, ring: &KeyRing) -> Option<bool> {
        let key = ring.get(&self.key_id)?.derive(PURPOSE);
        Some(mac(&key).chain_update(self.signed_bytes()).verify_slice(&self.mac).is_ok())
    }

    /// The file line, without its newline.
    pub fn to_line(&self) -> String {
        let line = Line {
            v: VERSION,
            seq: self.seq,
            hash: hex(&self.hash),
            time_ms: self.time_ms,
            key_id: self.key_id.clone(),
            mac: hex(&self.mac),
        };
        // A struct of strings and integers always serialises.
        serde_json::to_string(&line).unwrap_or_default()
    }

    /// Reads a file line.
    pub fn parse(line: &str) -> Option<Checkpoint> {
        let l: Line = serde_json::from_str(line).ok()?;
        if l.v != VERSION {
            return None;
        }
        Some(Checkpoint {
            seq: l.seq,
            hash: unhex(&l.hash)?,
            time_ms: l.time_ms,
            key_id: l.key_id,
            mac: unhex(&l.mac)?,
        })
    }
}

fn mac(key: &Key) -> HmacSha256 {
    // HMAC takes keys of any length.
    <HmacSha256 as KeyInit>::new_from_slice(key.bytes()).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// What a checkpoint file says, checked against a key ring.
#[derive(Debug, Default)]
pub struct Checked {
    /// The authentic checkpoints by seq, each with where it is in the file (1-based line).
    pub anchors: BTreeMap<i64, (Vec<u8>, usize, i64)>,
    /// Lines that do not authenticate or do not parse: `(line, why)`. Any of these fails
    /// verification.
    pub bad: Vec<(usize, String)>,
    /// Lines signed with keys the ring does not hold (retired since, or the wrong ring): they
    /// cannot be checked, which also fails verification.
    pub unknown_key: Vec<usize>,
    /// Authentic lines.
    pub count: usize,
}

/// Reads and checks every line of `text` (a checkpoint file) against `ring`.
pub fn check_file(text: &str, ring: &KeyRing) -> Checked {
    let mut out = Checked::default();
    let torn_tail = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let Some(c) = Checkpoint::parse(line) else {
            // A crash in the middle of a write leaves a last line without its newline.
            if !(torn_tail && n == lines.len()) {
                out.bad.push((n, "not a checkpoint line".to_owned()));
            }
            continue;
        };
        match c.authentic(ring) {
            None => out.unknown_key.push(n),
            Some(false) => out.bad.push((n, format!("its signature does not verify under key {}", c.key_id))),
            Some(true) => {
                out.count += 1;
                if let Some((hash, first, _)) = out.anchors.get(&c.seq)
                    && *hash != c.hash
                {
                    out.bad.push((
                        n,
                        format!(
                            "it names another hash for seq {} than line {first}: the log was rolled back and \
                             rewritten between them",
                            c.seq
                        ),
                    ));
                    continue;
                }
                out.anchors.entry(c.seq).or_insert((c.hash, n, c.time_ms));
            }
        }
    }
    out
}

/// Whether checkpoints are being written: shared by the checkpointer with the audit writer,
/// which refuses `strict` calls while the last checkpoint could not be written.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    /// Whether the last checkpoint could not be taken or written.
    pub fn failing(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, failing: bool) {
        if self.0.swap(failing, Ordering::Relaxed) != failing {
            metrics::gauge!("portcullis_audit_checkpoint_failing").set(if failing { 1.0 } else { 0.0 });
        }
    }
}

/// The running checkpointer of a gateway process.
pub struct Checkpointer {
    stop: CancellationToken,
    task: JoinHandle<()>,
    health: Health,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").finish_non_exhaustive()
    }
}

/// The state the task keeps between ticks.
struct Task {
    store: Store,
    ring: KeyRing,
    clock: Clock,
    path: PathBuf,
    /// The open file; `None` after it could not be opened again (it is tried on every tick).
    file: Option<std::fs::File>,
    last: Option<(i64, Vec<u8>)>,
    health: Health,
}

impl Checkpointer {
    /// Opens `path` (append-only, created 0600) and starts writing a checkpoint of `store`'s
    /// head every `interval`, signed with `ring`'s active key. Fails when the file cannot be
    /// opened: a gateway configured to keep checkpoints does not start without them.
    pub fn start(
        store: Store,
        ring: KeyRing,
        clock: Clock,
        path: PathBuf,
        interval: Duration,
    ) -> Result<Checkpointer, CheckpointError> {
        let file = open_append(&path)?;
        let last = last_checkpoint(&path, &ring)?;
        let stop = CancellationToken::new();
        let health = Health::default();
        metrics::gauge!("portcullis_audit_checkpoint_failing").set(0.0);
        let mut task = Task { store, ring, clock, path, file: Some(file), last, health: health.clone() };
        let token = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let wait = if task.health.failing() { interval.min(RETRY) } else { interval };
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                task.tick().await;
            }
            // One last checkpoint of the head as shutdown leaves it.
            task.tick().await;
        });
        Ok(Checkpointer { stop, task, health })
    }

    /// Whether checkpoints are being written, for the audit writer
    /// ([`crate::audit::AuditWriter::watch_checkpoints`]).
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Writes a final checkpoint and stops. Call it after the audit writer has flushed.
    pub async fn finish(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the audit checkpoint task failed");
        }
    }
}

impl Task {
    /// Takes and writes one checkpoint if the head moved; any failure is logged, counted and
    /// reported by [`Health`] until a checkpoint is written again.
    async fn tick(&mut self) {
        match self.checkpoint().await {
            Ok(()) => self.health.set(false),
            Err(why) => {
                self.health.set(true);
                metrics::counter!("portcullis_audit_checkpoint_errors_total").increment(1);
                tracing::error!(
                    path = %self.path.display(),
                    error = %why,
                    "audit checkpoint not written: the log's tail is not protected until one is (strict calls are refused meanwhile)"
                );
            }
        }
    }

    async fn checkpoint(&mut self) -> Result<(), String> {
        let head = match self.store.audit_head().await {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("cannot read the chain's head: {e}")),
        };
        if self.last.as_ref() == Some(&head) {
            // An idle log still has its newest checkpoint on disk: a file removed or replaced
            // meanwhile gets that checkpoint again in a file at its path, and a path where
            // none can be made is reported now, not once the head moves.
            let (path, open) = (self.path.clone(), self.file.take());
            let (file, kept) = tokio::task::spawn_blocking(move || {
                let kept = open.as_ref().is_some_and(|f| names(&path, f));
                (open, kept)
            })
            .await
            .unwrap_or((None, false));
            self.file = file;
            if kept {
                return Ok(());
            }
        }
        if let Some((seq, hash)) = &self.last
            && (head.0 < *seq || (head.0 == *seq && head.1 != *hash))
        {
            metrics::counter!("portcullis_audit_rollback_detected_total").increment(1);
            tracing::error!(
                checkpoint_seq = seq,
                head_seq = head.0,
                "the audit log was rolled back behind the last checkpoint: records were deleted or rewritten in the store"
            );
        }
        let checkpoint = Checkpoint::sign(&self.ring, head.0, &head.1, self.clock.unix_millis());
        let line = checkpoint.to_line();
        let (path, open) = (self.path.clone(), self.file.take());
        let written = tokio::task::spawn_blocking(move || {
            let mut file = match reopened(open, &path) {
                Ok(file) => file,
                Err(e) => return (None, Err(e.to_string())),
            };
            let before = file.metadata().map(|m| m.len());
            let r = file.write_all(format!("{line}\n").as_bytes()).and_then(|()| file.sync_data());
            if r.is_err()
                && let Ok(len) = before
            {
                // No torn line stays behind to run into the next one (a verifier would reject
                // the pair); if even this fails, the verifier names the line.
                let _ = file.set_len(len);
            }
            (Some(file), r.map_err(|e| e.to_string()))
        })
        .await;
        let (file, result) = written.unwrap_or_else(|e| (None, Err(e.to_string())));
        // A file that failed a write stays open: the next attempt appends to it again.
        self.file = file;
        result?;
        self.last = Some(head);
        metrics::counter!("portcullis_audit_checkpoints_total").increment(1);
        metrics::gauge!("portcullis_audit_checkpoint_seq").set(checkpoint.seq as f64);
        tracing::info!(
            seq = checkpoint.seq,
            hash = %hex(&checkpoint.hash),
            time_ms = checkpoint.time_ms,
            key_id = %checkpoint.key_id,
            mac = %hex(&checkpoint.mac),
            "audit checkpoint"
        );
        Ok(())
    }
}

/// `open` if `path` still names it; otherwise (it was removed, renamed or replaced, or is not
/// open) the file at `path`, opened or created as at start. Checkpoints written into a file
/// that no longer has a name would be lost without an error.
fn reopened(open: Option<std::fs::File>, path: &Path) -> Result<std::fs::File, CheckpointError> {
    if let Some(file) = open {
        if names(path, &file) {
            return Ok(file);
        }
        tracing::warn!(
            path = %path.display(),
            "the audit checkpoint file was removed or replaced; checkpoints go on in a file at its path"
        );
    }
    open_append(path)
}

/// Whether `path` names the open `file`.
fn names(path: &Path, file: &std::fs::File) -> bool {
    let (Ok(open), Ok(named)) = (file.metadata(), std::fs::metadata(path)) else { return false };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        open.dev() == named.dev() && open.ino() == named.ino()
    }
    #[cfg(not(unix))]
    {
        open.len() == named.len() && named.is_file()
    }
}

/// Opens `path` for appending only, creating it (and its directory, 0700) with mode 0600. An
/// existing file that others may read or write is used, with a warning.
pub fn open_append(path: &Path) -> Result<std::fs::File, CheckpointError> {
    let err = |why: std::io::Error| CheckpointError::File { path: path.display().to_string(), why: why.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::store::create_private_dir(dir).map_err(err)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts.open(path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(err)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the audit checkpoint file is open to other users; chmod 600 it");
        }
    }
    Ok(file)
}

/// The newest authentic checkpoint at the end of `path`, if any (only the file's last few
/// kilobytes are read).
fn last_checkpoint(path: &Path, ring: &KeyRing) -> Result<Option<(i64, Vec<u8>)>, CheckpointError> {
    let err = |why: std::io::Error| CheckpointError::File { path: path.display().to_string(), why: why.to_string() };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES))).map_err(err)?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(err)?;
    let text = String::from_utf8_lossy(&tail);
    Ok(text
        .lines()
        .rev()
        .filter_map(Checkpoint::parse)
        .find(|c| c.authentic(ring) == Some(true))
        .map(|c| (c.seq, c.hash)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::single(Key::random())
    }

    #[test]
    fn a_checkpoint_round_trips_and_authenticates_only_unchanged() {
        let ring = ring();
        let c = Checkpoint::sign(&ring, 42, &[7; 32], 1_765_000_000_000);
        let back = Checkpoint::parse(&c.to_line()).expect("parses");
        assert_eq!(back, c);
        assert_eq!(back.authentic(&ring), Some(true));
        for edit in [
            |c: &mut Checkpoint| c.seq += 1,
            |c: &mut Checkpoint| c.hash[0] ^= 1,
            |c: &mut Checkpoint| c.time_ms -= 1,
            |c: &mut Checkpoint| c.mac[31] ^= 1,
        ] {
            let mut bad = c.clone();
            edit(&mut bad);
            assert_eq!(bad.authentic(&ring), Some(false), "{bad:?}");
        }
        assert_eq!(c.authentic(&self::ring()), None, "another ring has no such key");
        let other = KeyRing::single(Key::random());
        let forged = Checkpoint { key_id: other.active_id().to_string(), ..Checkpoint::sign(&other, 42, &[7; 32], 1) };
        assert_eq!(forged.authentic(&ring), None);
        // The subkey is not the master key itself, nor the at-rest key.
        let raw = Checkpoint { mac: Vec::new(), ..c.clone() };
        let under_master = mac(ring.active_key()).chain_update(raw.signed_bytes()).finalize().into_bytes().to_vec();
        assert_ne!(under_master, c.mac);
    }

    #[test]
    fn a_file_is_checked_line_by_line() {
        let ring = ring();
        let a = Checkpoint::sign(&ring, 3, &[1; 32], 10).to_line();
        let b = Checkpoint::sign(&ring, 9, &[2; 32], 20).to_line();
        let mut forged = Checkpoint::sign(&ring, 12, &[3; 32], 30);
        forged.seq = 13;
        let disagree = Checkpoint::sign(&ring, 3, &[4; 32], 40).to_line();
        let stranger = Checkpoint::sign(&self::ring(), 50, &[5; 32], 50).to_line();
        let text = format!("{a}\n{b}\n\n{}\n{disagree}\n{stranger}\ngarbage\n{{\"v\":1,\"se", forged.to_line());
        let checked = check_file(&text, &ring);
        assert_eq!(checked.count, 3);
        assert_eq!(checked.anchors.keys().copied().collect::<Vec<_>>(), [3, 9]);
        assert_eq!(checked.anchors[&3].1, 1, "the first line that named seq 3");
        let bad: Vec<usize> = checked.bad.iter().map(|(n, _)| *n).collect();
        assert_eq!(bad, [4, 5, 7], "{:?}", checked.bad);
        assert!(checked.bad[1].1.contains("rolled back"), "{:?}", checked.bad);
        assert_eq!(checked.unknown_key, [6]);
    }

    /// A task over a store holding one record, writing to `path` (opened as at start).
    async fn task_on(path: &Path) -> (tempfile::TempDir, Task) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&format!("sqlite://{}/a.db", dir.path().display())).await.expect("store");
        let mut entry = crate::audit::Entry {
            time_ms: 1,
            request_id: "r1".into(),
            method: "ping".into(),
            arguments: "null".into(),
            decision: "allow".into(),
            ..crate::audit::Entry::default()
        };
        store.audit_append(std::slice::from_mut(&mut entry)).await.expect("append");
        let file = open_append(path).expect("opens");
        let task = Task {
            store,
            ring: ring(),
            clock: Clock::fixed(1_765_000_000),
            path: path.to_owned(),
            file: Some(file),
            last: None,
            health: Health::default(),
        };
        (dir, task)
    }

    #[tokio::test]
    async fn a_checkpoint_that_cannot_be_written_is_reported_until_one_is() {
        // A full disk: every write to /dev/full fails (ENOSPC).
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let (_dir, mut task) = task_on(full).await;
        task.tick().await;
        assert!(task.health.failing(), "a failed write is not silent");
        assert_eq!(task.last, None, "nothing was checkpointed");
        task.tick().await;
        assert!(task.health.failing(), "and it is tried again");

        // Its path moves to a writable file (the file was replaced): the next tick writes there.
        let dir = tempfile::tempdir().expect("tempdir");
        task.path = dir.path().join("cp.jsonl");
        task.tick().await;
        assert!(!task.health.failing());
        assert_eq!(task.last.as_ref().map(|l| l.0), Some(1));
        let text = std::fs::read_to_string(&task.path).expect("read");
        assert_eq!(check_file(&text, &task.ring).count, 1, "{text}");
    }

    #[tokio::test]
    async fn checkpoints_follow_their_path_when_the_file_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cp.jsonl");
        let (_db, mut task) = task_on(&path).await;
        std::fs::remove_file(&path).expect("remove");
        task.tick().await;
        assert!(!task.health.failing());
        let text = std::fs::read_to_string(&path).expect("written to a new file at the path, not the removed one");
        assert_eq!(check_file(&text, &task.ring).count, 1, "{text}");

        // Removed while the log is idle (the head did not move): the same checkpoint is
        // written again at the path.
        std::fs::remove_file(&path).expect("remove");
        task.tick().await;
        assert!(!task.health.failing());
        let text = std::fs::read_to_string(&path).expect("the idle log's checkpoint written again");
        assert_eq!(check_file(&text, &task.ring).count, 1, "{text}");

        // A directory in its place: no file can be made there, and that is reported even
        // though the head has not moved.
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("mkdir");
        task.tick().await;
        assert!(task.health.failing());
        assert!(task.file.is_none());
        std::fs::remove_dir(&path).expect("rmdir");
        task.tick().await;
        assert!(!task.health.failing());
    }

    #[tokio::test]
    async fn the_file_is_created_private_and_only_appended_to() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/cp.jsonl");
        let ring = ring();
        {
            let mut f = open_append(&path).expect("opens");
            f.write_all(format!("{}\n", Checkpoint::sign(&ring, 1, &[1; 32], 1).to_line()).as_bytes()).expect("w");
        }
        let mut f = open_append(&path).expect("opens again");
        f.write_all(format!("{}\n", Checkpoint::sign(&ring, 2, &[2; 32], 2).to_line()).as_bytes()).expect("w");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
        assert_eq!(last_checkpoint(&path, &ring).expect("reads"), Some((2, vec![2; 32])));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(&dir.path().join("nested")), 0o700);
        }
    }
}
