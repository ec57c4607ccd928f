//! The hash chain: `hash = SHA-256(prev_hash || canonical(entry))`, where the canonical form
//! includes `seq`, and the first record's `prev_hash` is [`GENESIS`]. [`verify`] walks the chain
//! from seq 1 and names the first record that is edited, missing or out of place.

use std::fmt;

use sha2::{Digest, Sha256};

use super::AuditError;
use super::record::Entry;
use crate::store::Store;

/// The `prev_hash` of the first record: 32 zero bytes.
pub const GENESIS: [u8; 32] = [0; 32];

/// How many segments `verify` reads per query.
const PAGE: i64 = 16;

/// The hash of `entry` (whose `seq` and `prev_hash` are set).
pub fn entry_hash(entry: &Entry) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&entry.prev_hash);
    h.update(entry.canonical());
    h.finalize().into()
}

/// Numbers `entry` as `seq`, links it to `prev`, and computes its hash.
pub fn seal(entry: &mut Entry, seq: i64, prev: &[u8]) {
    entry.seq = seq;
    entry.prev_hash = prev.to_vec();
    entry.hash = entry_hash(entry).to_vec();
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Every record checks out.
    Intact {
        /// How many records there are.
        records: u64,
        /// The last record's seq and hash (anchor it elsewhere to detect a truncated tail).
        head: Option<(i64, Vec<u8>)>,
    },
    /// The first bad record.
    Broken(Break),
}

/// Where and how the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The first bad seq.
    pub seq: i64,
    /// What is wrong there.
    pub kind: BreakKind,
    /// One sentence for the operator.
    pub detail: String,
}

/// The ways a chain breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// The record's content no longer matches its hash.
    Edited,
    /// The record is gone (a gap in seq, or it links to a record that no longer exists).
    Deleted,
    /// The record links to a record that exists elsewhere in the chain.
    Reordered,
    /// The log ends before a record a checkpoint saw: its tail was deleted.
    Cut,
    /// The record differs from the one a checkpoint saw at its seq: the log was rolled back
    /// to an earlier point and rewritten from there.
    RolledBack,
}

impl fmt::Display for BreakKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakKind::Edited => "edited",
            BreakKind::Deleted => "deleted",
            BreakKind::Reordered => "reordered",
            BreakKind::Cut => "cut",
            BreakKind::RolledBack => "rolled back",
        })
    }
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "audit chain broken at seq {}: {} ({})", self.seq, self.kind, self.detail)
    }
}

/// Walks the whole chain from seq 1, segment by segment, and reports the first bad record.
/// Records appended while it runs are checked too, up to the last one it reads.
///
/// Besides the chain, each segment's own columns and search keys must describe its records
/// exactly: a segment whose bounds, times or keys were edited (to hide records from a search)
/// is reported as an edit of its first record.
pub async fn verify(store: &Store) -> Result<Verification, AuditError> {
    verify_anchored(store, &Anchors::new()).await
}

/// What checkpoints saw: the hash of the record at each seq, and a few words saying which
/// checkpoint (for the message).
pub type Anchors = std::collections::BTreeMap<i64, (Vec<u8>, String)>;

/// [`verify`], and also: every record an anchor names must be there with the anchor's hash.
/// A log that ends before the newest anchor was cut ([`BreakKind::Cut`]); a record whose hash
/// differs from its anchor's was rewritten after a rollback ([`BreakKind::RolledBack`]). A
/// break in the chain itself is reported first, where it is.
pub async fn verify_anchored(store: &Store, anchors: &Anchors) -> Result<Verification, AuditError> {
    let mut expected: i64 = 1;
    let mut running: Vec<u8> = GENESIS.to_vec();
    let mut from = Some(i64::MIN);
    while let Some(start) = from {
        let page = store.audit_segments(start, PAGE).await?;
        let Some(last) = page.last() else { break };
        // A segment keyed i64::MAX (only tampering makes one) is the last there can be.
        from = last.first_seq.checked_add(1);
        for seg in &page {
            let entries = match &seg.entries {
                Ok(entries) => entries,
                Err(e) if seg.first_seq > expected => {
                    return Ok(broken(
                        expected,
                        BreakKind::Deleted,
                        format!("missing; the next segment, unreadable, starts at seq {}: {}", seg.first_seq, e.reason),
                    ));
                }
                Err(e) => {
                    return Ok(broken(
                        expected,
                        BreakKind::Edited,
                        format!("the segment holding it cannot be read: {}", e.reason),
                    ));
                }
            };
            let first = expected;
            for entry in entries {
                if let Some(b) = check(store, entry, expected, &running).await? {
                    return Ok(Verification::Broken(b));
                }
                if let Some((hash, which)) = anchors.get(&entry.seq)
                    && *hash != entry.hash
                {
                    return Ok(broken(
                        entry.seq,
                        BreakKind::RolledBack,
                        format!("its hash differs from the one {which} saw: the log was rolled back and rewritten"),
                    ));
                }
                running.clone_from(&entry.hash);
                expected += 1;
            }
            if let Some(why) = seg.mismatch(entries) {
                return Ok(broken(first, BreakKind::Edited, format!("its segment was edited: {why}")));
            }
        }
    }
    if let Some((&seq, (_, which))) = anchors.range(expected..).next_back() {
        return Ok(broken(
            expected,
            BreakKind::Cut,
            format!(
                "the log ends at seq {}, but {which} saw seq {seq}: records {expected} to {seq} (at least) were deleted",
                expected - 1
            ),
        ));
    }
    let records = u64::try_from(expected - 1).unwrap_or(0);
    let head = (records > 0).then(|| (expected - 1, running));
    Ok(Verification::Intact { records, head })
}

fn broken(seq: i64, kind: BreakKind, detail: String) -> Verification {
    Verification::Broken(Break { seq, kind, detail })
}

/// Checks the record found where seq `expected` should be, given the previous record's hash.
async fn check(store: &Store, entry: &Entry, expected: i64, running: &[u8]) -> Result<Option<Break>, AuditError> {
    let broken = |kind, detail: String| Ok(Some(Break { seq: expected, kind, detail }));
    if entry.seq != expected {
        return broken(BreakKind::Deleted, format!("missing; the next record is seq {}", entry.seq));
    }
    let intact = entry_hash(entry).as_slice() == entry.hash.as_slice()
        && serde_json::from_str::<serde::de::IgnoredAny>(&entry.arguments).is_ok();
    if entry.prev_hash.as_slice() == running {
        return if intact {
            Ok(None)
        } else {
            broken(BreakKind::Edited, "its content does not match its hash".to_owned())
        };
    }
    // The link to seq - 1 is broken: find where the record it links to is now.
    match store.audit_seq_of_hash(&entry.prev_hash).await? {
        Some(at) => {
            broken(BreakKind::Reordered, format!("it follows the record now at seq {at}, not seq {}", expected - 1))
        }
        None if intact || renumbered(entry) => broken(
            BreakKind::Deleted,
            format!("its prev_hash matches no record: seq {} was deleted or replaced", expected - 1),
        ),
        None => broken(BreakKind::Edited, "its content and prev_hash do not match its hash".to_owned()),
    }
}

/// Whether `entry` was hashed as seq + 1: the record before it was deleted and the rest
/// renumbered to close the gap.
fn renumbered(entry: &Entry) -> bool {
    let mut moved = entry.clone();
    moved.seq += 1;
    entry_hash(&moved).as_slice() == entry.hash.as_slice()
}
