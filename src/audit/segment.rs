//! Audit segments: how the store keeps records. The writer commits a batch of chained records as
//! one or more segments, each one row of `audit_segments` holding its records back to back in a
//! compact binary form ([postcard](https://docs.rs/postcard)), plus the keys a search looks
//! records up by (`audit_segment_keys`). See `docs/decisions/0006-audit-segments.md` for why
//! not one row per record.
//!
//! The encoding carries every column of [`Entry`], the chain's `prev_hash` and `hash` included,
//! so a segment decodes to exactly the entries that were sealed. The hash chain is computed over
//! [`Entry::canonical`] as before; the encoding is storage only, and editing its bytes shows up
//! in `audit verify` as an edited (or unreadable) record.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::record::Entry;

/// The first byte of every segment: the encoding's version. Version 2 adds `policy` after
/// the fields of version 1 (postcard writes a struct as its fields in order, so a version 2
/// record is a version 1 record followed by the new field); version 1 segments still decode.
const VERSION: u8 = 2;

/// A segment closes once its encoded records pass this size (a single larger record still
/// gets a segment of its own). Keeps rows far below both databases' value limits and bounds
/// what a search decodes to find one record.
pub const MAX_SEGMENT_BYTES: usize = 1 << 20;

/// What a search can look a segment up by: [`Key::kind`] and the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A principal's name.
    User,
    /// A principal's id.
    Principal,
    /// An upstream server.
    Server,
    /// A tool.
    Tool,
}

impl Key {
    /// As stored in `audit_segment_keys.kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Key::User => "user",
            Key::Principal => "principal",
            Key::Server => "server",
            Key::Tool => "tool",
        }
    }
}

/// A segment ready to store: its records encoded, and what describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Seq of its first record (the row's key).
    pub first_seq: i64,
    /// Seq of its last record.
    pub last_seq: i64,
    /// Earliest `time_ms` among its records.
    pub min_time_ms: i64,
    /// Latest `time_ms` among its records.
    pub max_time_ms: i64,
    /// Its last record's hash: the chain's head when it is the newest segment.
    pub last_hash: Vec<u8>,
    /// The encoded records.
    pub records: Vec<u8>,
    /// The distinct keys of its records.
    pub keys: BTreeSet<(Key, String)>,
}

/// A segment's bytes could not be decoded (they were edited, or are not a segment).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit segment at seq {first_seq} cannot be read: {reason}")]
pub struct Unreadable {
    /// The segment's `first_seq`.
    pub first_seq: i64,
    /// What is wrong.
    pub reason: String,
}

#[derive(Serialize)]
struct Out<'a> {
    seq: i64,
    time_ms: i64,
    request_id: &'a str,
    principal_id: Option<&'a str>,
    principal_kind: Option<&'a str>,
    principal_name: Option<&'a str>,
    token_id: Option<&'a str>,
    client_name: Option<&'a str>,
    client_version: Option<&'a str>,
    server: Option<&'a str>,
    method: &'a str,
    tool: Option<&'a str>,
    arguments: &'a str,
    decision: &'a str,
    upstream_status: Option<i64>,
    latency_us: i64,
    bytes_in: i64,
    bytes_out: i64,
    prev_hash: Bytes<'a>,
    hash: Bytes<'a>,
}

/// A byte string written in one piece. postcard writes bytes and a sequence of `u8` alike (a
/// varint length, then the bytes), so [`In`] reads them back as `Vec<u8>`; a plain `&[u8]`
/// would be written a byte at a time.
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// The same fields as [`Out`], in the same order, owned.
#[derive(Deserialize)]
struct In {
    seq: i64,
    time_ms: i64,
    request_id: String,
    principal_id: Option<String>,
    principal_kind: Option<String>,
    principal_name: Option<String>,
    token_id: Option<String>,
    client_name: Option<String>,
    client_version: Option<String>,
    server: Option<String>,
    method: String,
    tool: Option<String>,
    arguments: String,
    decision: String,
    upstream_status: Option<i64>,
    latency_us: i64,
    bytes_in: i64,
    bytes_out: i64,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

/// Version 2: version 1's fields, then `policy`.
#[derive(Serialize)]
struct Out2<'a> {
    v1: Out<'a>,
    policy: Option<&'a str>,
}

/// Version 2, read.
#[derive(Deserialize)]
struct In2 {
    v1: In,
    policy: Option<String>,
}

/// The fields of `e` that version 1 has.
fn v1_of(e: &Entry) -> Out<'_> {
    Out {
        seq: e.seq,
        time_ms: e.time_ms,
        request_id: &e.request_id,
        principal_id: e.principal_id.as_deref(),
        principal_kind: e.principal_kind.as_deref(),
        principal_name: e.principal_name.as_deref(),
        token_id: e.token_id.as_deref(),
        client_name: e.client_name.as_deref(),
        client_version: e.client_version.as_deref(),
        server: e.server.as_deref(),
        method: &e.method,
        tool: e.tool.as_deref(),
        arguments: &e.arguments,
        decision: &e.decision,
        upstream_status: e.upstream_status,
        latency_us: e.latency_us,
        bytes_in: e.bytes_in,
        bytes_out: e.bytes_out,
        prev_hash: Bytes(&e.prev_hash),
        hash: Bytes(&e.hash),
    }
}

/// Appends `e`, encoded, to `out`.
fn encode_one(e: &Entry, out: &mut Vec<u8>) {
    let record = Out2 { v1: v1_of(e), policy: e.policy.as_deref() };
    // postcard fails only for types it cannot encode or a full buffer; neither applies here.
    let taken = std::mem::take(out);
    *out = postcard::to_extend(&record, taken).expect("encoding an audit record into a Vec cannot fail");
}

/// Cuts sealed `entries` into segments of at most [`MAX_SEGMENT_BYTES`] (or one record).
pub fn segments(entries: &[Entry]) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut rest = entries;
    while let Some(first) = rest.first() {
        let mut records = Vec::with_capacity(1 + rest.len().min(512) * 160);
        records.push(VERSION);
        let mut segment = Segment {
            first_seq: first.seq,
            last_seq: first.seq,
            min_time_ms: first.time_ms,
            max_time_ms: first.time_ms,
            last_hash: Vec::new(),
            records: Vec::new(),
            keys: BTreeSet::new(),
        };
        let mut n = 0;
        for e in rest {
            if n > 0 && records.len() >= MAX_SEGMENT_BYTES {
                break;
            }
            encode_one(e, &mut records);
            segment.last_seq = e.seq;
            segment.min_time_ms = segment.min_time_ms.min(e.time_ms);
            segment.max_time_ms = segment.max_time_ms.max(e.time_ms);
            for (key, value) in keys_of(e) {
                // Nearly every record repeats its batch's keys: look before allocating.
                if !segment.keys.iter().any(|(k, v)| *k == key && v == value) {
                    segment.keys.insert((key, value.to_owned()));
                }
            }
            n += 1;
        }
        segment.last_hash = rest[n - 1].hash.clone();
        segment.records = records;
        out.push(segment);
        rest = &rest[n..];
    }
    out
}

/// Key values are cut to this many bytes (at a character boundary): PostgreSQL refuses index
/// entries over about 2.7 kB, and some values come from the request (the server named in an
/// OAuth callback's path, before any authentication), so an unbounded one could make every
/// retry of a batch fail. A search cuts its value the same way and then compares records in
/// full.
pub const MAX_KEY_BYTES: usize = 256;

/// `value` as stored in, and looked up from, `audit_segment_keys`.
pub fn key_value(value: &str) -> &str {
    if value.len() <= MAX_KEY_BYTES {
        return value;
    }
    let mut end = MAX_KEY_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// The keys a search may find `e` by.
pub fn keys_of(e: &Entry) -> impl Iterator<Item = (Key, &str)> {
    [
        (Key::User, e.principal_name.as_deref()),
        (Key::Principal, e.principal_id.as_deref()),
        (Key::Server, e.server.as_deref()),
        (Key::Tool, e.tool.as_deref()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, key_value(v))))
}

/// Decodes a segment's records, in the order they are stored.
pub fn decode(first_seq: i64, bytes: &[u8]) -> Result<Vec<Entry>, Unreadable> {
    let unreadable = |reason: String| Unreadable { first_seq, reason };
    let Some((&version, mut rest)) = bytes.split_first() else {
        return Err(unreadable("empty".into()));
    };
    if !(1..=VERSION).contains(&version) {
        return Err(unreadable(format!("unknown encoding {version}")));
    }
    let mut out = Vec::with_capacity(rest.len() / 128);
    while !rest.is_empty() {
        let ((r, policy), tail) = if version == 1 {
            let (r, tail): (In, &[u8]) = postcard::take_from_bytes(rest).map_err(|e| unreadable(e.to_string()))?;
            ((r, None), tail)
        } else {
            let (r, tail): (In2, &[u8]) = postcard::take_from_bytes(rest).map_err(|e| unreadable(e.to_string()))?;
            ((r.v1, r.policy), tail)
        };
        rest = tail;
        out.push(Entry {
            policy,
            seq: r.seq,
            time_ms: r.time_ms,
            request_id: r.request_id,
            principal_id: r.principal_id,
            principal_kind: r.principal_kind,
            principal_name: r.principal_name,
            token_id: r.token_id,
            client_name: r.client_name,
            client_version: r.client_version,
            server: r.server,
            method: r.method,
            tool: r.tool,
            arguments: r.arguments,
            decision: r.decision,
            upstream_status: r.upstream_status,
            latency_us: r.latency_us,
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            prev_hash: r.prev_hash,
            hash: r.hash,
        });
    }
    if out.is_empty() {
        return Err(unreadable("no records".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64, server: &str, args: &str) -> Entry {
        Entry {
            seq,
            time_ms: 1_700_000_000_000 + seq,
            request_id: format!("r{seq}"),
            principal_name: (seq % 2 == 0).then(|| "alice".to_owned()),
            server: Some(server.to_owned()),
            method: "tools/call".into(),
            tool: Some("search".into()),
            arguments: args.into(),
            decision: "allow".into(),
            upstream_status: Some(-32001),
            latency_us: 12,
            bytes_in: i64::MAX,
            prev_hash: vec![seq as u8; 32],
            hash: vec![seq as u8 + 1; 32],
            ..Entry::default()
        }
    }

    #[test]
    fn a_segment_decodes_to_the_entries_it_was_made_of() {
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, "github", "{\"q\":\"ünï\\u0000\"}")).collect();
        let segs = segments(&entries);
        assert_eq!(segs.len(), 1);
        let s = &segs[0];
        assert_eq!((s.first_seq, s.last_seq), (1, 5));
        assert_eq!((s.min_time_ms, s.max_time_ms), (1_700_000_000_001, 1_700_000_000_005));
        assert_eq!(s.last_hash, entries[4].hash);
        let keys: Vec<_> = s.keys.iter().map(|(k, v)| (k.kind(), v.as_str())).collect();
        assert_eq!(keys, [("user", "alice"), ("server", "github"), ("tool", "search")]);
        assert_eq!(decode(1, &s.records).unwrap(), entries);
    }

    #[test]
    fn a_version_1_segment_still_decodes_and_version_2_keeps_the_policy() {
        // Version 1, as earlier gateways wrote it: the same fields, no policy.
        let e = entry(4, "github", "{}");
        let v1 = postcard::to_extend(&v1_of(&e), vec![1u8]).unwrap();
        assert_eq!(decode(4, &v1).unwrap(), vec![e.clone()]);
        let with_policy = Entry { policy: Some("eng-issues,no-prod".into()), ..e };
        let s = segments(std::slice::from_ref(&with_policy));
        assert_eq!(s[0].records[0], VERSION);
        assert_eq!(decode(4, &s[0].records).unwrap(), vec![with_policy]);
    }

    #[test]
    fn large_batches_are_cut_into_segments_of_bounded_size() {
        let big = format!("\"{}\"", "x".repeat(300_000));
        let entries: Vec<Entry> = (1..=9).map(|i| entry(i, "s", &big)).collect();
        let segs = segments(&entries);
        assert!(segs.len() >= 3, "{}", segs.len());
        let mut seq = 1;
        for s in &segs {
            assert!(s.records.len() < MAX_SEGMENT_BYTES + 310_000);
            let decoded = decode(s.first_seq, &s.records).unwrap();
            assert_eq!(decoded.first().unwrap().seq, seq);
            seq = decoded.last().unwrap().seq + 1;
        }
        assert_eq!(seq, 10);
    }

    #[test]
    fn long_key_values_are_cut_at_a_character_boundary() {
        let long = format!("a{}", "☃".repeat(400));
        let cut = key_value(&long);
        assert!(cut.len() <= MAX_KEY_BYTES && long.starts_with(cut) && cut.len() > MAX_KEY_BYTES - 4);
        assert_eq!(key_value("github"), "github");
        let mut e = entry(1, &long, "null");
        e.tool = Some(long.clone());
        let segs = segments(std::slice::from_ref(&e));
        assert!(segs[0].keys.iter().all(|(_, v)| v.len() <= MAX_KEY_BYTES), "{:?}", segs[0].keys);
    }

    #[test]
    fn damaged_bytes_are_reported_not_guessed() {
        let entries: Vec<Entry> = (1..=3).map(|i| entry(i, "s", "null")).collect();
        let bytes = segments(&entries).remove(0).records;
        assert!(decode(7, &[]).is_err());
        assert!(decode(7, &[9]).unwrap_err().reason.contains("unknown encoding"));
        assert_eq!(decode(7, &bytes[..bytes.len() - 3]).unwrap_err().first_seq, 7);
        assert!(decode(7, &[VERSION]).is_err());
    }
}
