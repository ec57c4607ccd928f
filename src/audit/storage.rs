//! Audit records: append a chained batch as segments in one transaction, read them back, and
//! search them.
//!
//! Appends are serialised across processes (SQLite `BEGIN IMMEDIATE`; on PostgreSQL a
//! transaction-level advisory lock) and read the chain's head inside the transaction, so
//! several replicas can append to one chain without forking it.
//!
//! Records live in segments (`crate::audit::segment`): one row of `audit_segments` per batch
//! (or per megabyte of it), plus the keys a search finds it by in `audit_segment_keys`.

use std::collections::BTreeSet;

use crate::audit::Entry;
use crate::audit::segment::{self, Key, Segment, Unreadable};
use crate::on_pool;
use crate::store::{Store, StoreError};

/// The PostgreSQL advisory lock key that serialises appends ("pclaudit").
const APPEND_LOCK: i64 = 0x7063_6c61_7564_6974;

/// The chain's head: the newest segment's last seq and hash.
const HEAD_SQL: &str = "SELECT last_seq, last_hash FROM audit_segments ORDER BY first_seq DESC LIMIT 1";

const INSERT_SEGMENT: &str = "INSERT INTO audit_segments \
     (first_seq, last_seq, min_time_ms, max_time_ms, last_hash, records) VALUES ($1, $2, $3, $4, $5, $6)";

/// Key rows per `INSERT` (three values each).
const KEY_ROWS: usize = 200;

/// Segments read per query.
const SEGMENTS_PER_READ: i64 = 16;

/// Filters for [`Store::audit_search`]; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Principal name, or id (a UUID).
    pub user: Option<String>,
    /// Upstream server.
    pub server: Option<String>,
    /// Tool.
    pub tool: Option<String>,
    /// From this time on (Unix ms, inclusive).
    pub since_ms: Option<i64>,
    /// Before this time (Unix ms, exclusive).
    pub until_ms: Option<i64>,
    /// Only records after this seq.
    pub after_seq: Option<i64>,
    /// At most this many, the newest.
    pub limit: i64,
}

impl AuditQuery {
    /// Whether `e` matches every filter.
    pub fn matches(&self, e: &Entry) -> bool {
        let user = self.user.as_deref().is_none_or(|u| {
            e.principal_name.as_deref() == Some(u) || (is_uuid(u) && e.principal_id.as_deref() == Some(u))
        });
        user && self.server.as_deref().is_none_or(|s| e.server.as_deref() == Some(s))
            && self.tool.as_deref().is_none_or(|t| e.tool.as_deref() == Some(t))
            && self.since_ms.is_none_or(|t| e.time_ms >= t)
            && self.until_ms.is_none_or(|t| e.time_ms < t)
            && self.after_seq.is_none_or(|s| e.seq > s)
    }
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::try_parse(s).is_ok()
}

/// A value bound into [`search_sql`]'s statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// Text.
    Text(String),
    /// An integer.
    Int(i64),
}

/// A stored segment as read back: its columns, its records decoded (or why they could not
/// be), and the keys stored for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSegment {
    /// `first_seq`.
    pub first_seq: i64,
    /// `last_seq`.
    pub last_seq: i64,
    /// `min_time_ms`.
    pub min_time_ms: i64,
    /// `max_time_ms`.
    pub max_time_ms: i64,
    /// `last_hash`.
    pub last_hash: Vec<u8>,
    /// The records, or why they cannot be read.
    pub entries: Result<Vec<Entry>, Unreadable>,
    /// Its rows in `audit_segment_keys`.
    pub keys: BTreeSet<(String, String)>,
}

impl StoredSegment {
    /// What is wrong with the segment's own columns and keys, given records that decoded:
    /// `None` when they describe those records exactly.
    pub fn mismatch(&self, entries: &[Entry]) -> Option<&'static str> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Some("it holds no records");
        };
        if (self.first_seq, self.last_seq) != (first.seq, last.seq) {
            return Some("its seq range does not match its records");
        }
        if self.last_hash != last.hash {
            return Some("its last hash does not match its last record");
        }
        let min = entries.iter().map(|e| e.time_ms).min().unwrap_or(0);
        let max = entries.iter().map(|e| e.time_ms).max().unwrap_or(0);
        if (self.min_time_ms, self.max_time_ms) != (min, max) {
            return Some("its time range does not match its records");
        }
        let keys: BTreeSet<(String, String)> =
            entries.iter().flat_map(segment::keys_of).map(|(k, v)| (k.kind().to_owned(), v.to_owned())).collect();
        if keys != self.keys {
            return Some("its search keys do not match its records");
        }
        None
    }
}

/// `INSERT INTO audit_segment_keys` with `rows` rows of `$n` placeholders.
fn keys_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT INTO audit_segment_keys (kind, value, first_seq) VALUES ");
    for r in 0..rows {
        let n = r * 3;
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(${}, ${}, ${})", n + 1, n + 2, n + 3));
    }
    sql
}

/// Inserts segment `$s` and its keys inside the open transaction `$tx`.
macro_rules! insert_segment {
    ($tx:ident, $s:expr) => {{
        let s: &Segment = $s;
        sqlx::query(INSERT_SEGMENT)
            .bind(s.first_seq)
            .bind(s.last_seq)
            .bind(s.min_time_ms)
            .bind(s.max_time_ms)
            .bind(&s.last_hash)
            .bind(&s.records)
            .execute(&mut *$tx)
            .await?;
        let keys: Vec<&(Key, String)> = s.keys.iter().collect();
        for chunk in keys.chunks(KEY_ROWS) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(keys_sql(chunk.len())));
            for (k, v) in chunk {
                q = q.bind(k.kind()).bind(v.as_str()).bind(s.first_seq);
            }
            q.execute(&mut *$tx).await?;
        }
    }};
}

/// Reads the head, seals `entries` onto it and inserts them as segments, inside the open
/// transaction `$tx`.
macro_rules! append_in {
    ($tx:ident, $entries:ident) => {{
        let head: Option<(i64, Vec<u8>)> = sqlx::query_as(HEAD_SQL).fetch_optional(&mut *$tx).await?;
        seal_onto($entries, head);
        for s in &segment::segments($entries) {
            insert_segment!($tx, s);
        }
        $tx.commit().await?;
    }};
}

/// Moves the oldest rows left in `audit_records_legacy` (the table earlier versions wrote,
/// renamed by migration 0009) into segments inside the open transaction `$tx`, and evaluates
/// to how many it moved.
macro_rules! upgrade_in {
    ($tx:ident) => {{
        const ROWS: &str = "SELECT * FROM audit_records_legacy ORDER BY seq LIMIT 1000";
        let rows: Vec<Entry> = sqlx::query_as(ROWS).fetch_all(&mut *$tx).await?;
        if let Some(last) = rows.last() {
            for s in &segment::segments(&rows) {
                insert_segment!($tx, s);
            }
            sqlx::query("DELETE FROM audit_records_legacy WHERE seq <= $1").bind(last.seq).execute(&mut *$tx).await?;
        }
        $tx.commit().await?;
        rows.len()
    }};
}

/// Numbers and chains `entries` after `head` (the genesis when the log is empty).
fn seal_onto(entries: &mut [Entry], head: Option<(i64, Vec<u8>)>) {
    let (mut seq, mut prev) = head.unwrap_or_else(|| (0, crate::audit::GENESIS.to_vec()));
    for e in entries.iter_mut() {
        seq += 1;
        crate::audit::seal(e, seq, &prev);
        prev.clone_from(&e.hash);
    }
}

/// A segment that cannot be decoded, as the store's error.
fn unreadable(e: Unreadable) -> StoreError {
    StoreError::Unreadable(e.to_string())
}

impl Store {
    /// Appends `entries` to the chain in one transaction, setting their `seq`, `prev_hash`
    /// and `hash`. On error nothing is appended (and the entries are re-sealed on retry).
    pub async fn audit_append(&self, entries: &mut [Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite(pool) => {
                // IMMEDIATE takes the write lock before the head is read, so a second process
                // waits (busy_timeout) instead of failing to upgrade a read transaction.
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                append_in!(tx, entries);
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(APPEND_LOCK).execute(&mut *tx).await?;
                append_in!(tx, entries);
            }
        }
        Ok(())
    }

    /// Stores `segments` exactly as given, without sealing: for tests that play an attacker
    /// with write access to the database.
    pub async fn audit_put_segments(&self, segments: &[Segment]) -> Result<(), StoreError> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for s in segments {
                insert_segment!(tx, s);
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Moves the records that earlier versions kept one per row in `audit_records` (renamed
    /// `audit_records_legacy` by migration 0009) into segments, keeping their seq and hashes
    /// (so `audit verify` checks them as before), in transactions of a thousand. Runs with the migrations, before any append; returns how
    /// many records it moved.
    pub async fn audit_upgrade(&self) -> Result<usize, StoreError> {
        let mut moved = 0;
        loop {
            let n = match self {
                Store::Sqlite(pool) => {
                    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                    upgrade_in!(tx)
                }
                Store::Postgres(pool) => {
                    let mut tx = pool.begin().await?;
                    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(APPEND_LOCK).execute(&mut *tx).await?;
                    upgrade_in!(tx)
                }
            };
            if n == 0 {
                break;
            }
            moved += n;
        }
        if moved > 0 {
            tracing::info!(records = moved, "audit records moved from audit_records_legacy into segments");
        }
        Ok(moved)
    }

    /// Up to `n` segments with `first_seq >= from`, in order, with their keys; their records
    /// are decoded but not checked (that is `audit verify`'s job).
    pub async fn audit_segments(&self, from: i64, n: i64) -> Result<Vec<StoredSegment>, StoreError> {
        const SQL: &str = "SELECT first_seq, last_seq, min_time_ms, max_time_ms, last_hash, records \
             FROM audit_segments WHERE first_seq >= $1 ORDER BY first_seq LIMIT $2";
        const KEYS: &str = "SELECT kind, value, first_seq FROM audit_segment_keys \
             WHERE first_seq >= $1 AND first_seq <= $2";
        type Row = (i64, i64, i64, i64, Vec<u8>, Vec<u8>);
        let rows: Vec<Row> = on_pool!(self, p => sqlx::query_as(SQL).bind(from).bind(n).fetch_all(p).await?);
        let (Some(lo), Some(hi)) = (rows.first().map(|r| r.0), rows.last().map(|r| r.0)) else {
            return Ok(Vec::new());
        };
        let keys: Vec<(String, String, i64)> =
            on_pool!(self, p => sqlx::query_as(KEYS).bind(lo).bind(hi).fetch_all(p).await?);
        Ok(rows
            .into_iter()
            .map(|(first_seq, last_seq, min_time_ms, max_time_ms, last_hash, records)| StoredSegment {
                first_seq,
                last_seq,
                min_time_ms,
                max_time_ms,
                last_hash,
                entries: segment::decode(first_seq, &records),
                keys: keys.iter().filter(|k| k.2 == first_seq).map(|k| (k.0.clone(), k.1.clone())).collect(),
            })
            .collect())
    }

    /// Up to `limit` records with `seq > after`, in seq order.
    pub async fn audit_after(&self, after: i64, limit: i64) -> Result<Vec<Entry>, StoreError> {
        // The segment that may hold seq after + 1, then those after it.
        const START: &str = "SELECT MAX(first_seq) FROM audit_segments WHERE first_seq <= $1";
        let start: Option<i64> =
            on_pool!(self, p => sqlx::query_scalar(START).bind(after.saturating_add(1)).fetch_one(p).await?);
        let mut from = start.unwrap_or(i64::MIN);
        let mut out = Vec::new();
        let limit = usize::try_from(limit).unwrap_or(0);
        while out.len() < limit {
            let page = self.read_segments(from, SEGMENTS_PER_READ).await?;
            let Some(&(last, _)) = page.last() else { break };
            for (first_seq, bytes) in page {
                out.extend(
                    segment::decode(first_seq, &bytes).map_err(unreadable)?.into_iter().filter(|e| e.seq > after),
                );
            }
            // A segment keyed i64::MAX (only tampering makes one) is the last there can be.
            let Some(next) = last.checked_add(1) else { break };
            from = next;
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn read_segments(&self, from: i64, n: i64) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        const SQL: &str =
            "SELECT first_seq, records FROM audit_segments WHERE first_seq >= $1 ORDER BY first_seq LIMIT $2";
        Ok(on_pool!(self, p => sqlx::query_as(SQL).bind(from).bind(n).fetch_all(p).await?))
    }

    /// The seq of the record whose hash is `hash`, if any (a scan: `audit verify` asks only
    /// after finding a broken link).
    pub async fn audit_seq_of_hash(&self, hash: &[u8]) -> Result<Option<i64>, StoreError> {
        let mut from = i64::MIN;
        loop {
            let page = self.read_segments(from, SEGMENTS_PER_READ).await?;
            let Some(&(last, _)) = page.last() else { return Ok(None) };
            for (first_seq, bytes) in page {
                // Unreadable segments are `verify`'s to report, not this lookup's.
                if let Some(e) =
                    segment::decode(first_seq, &bytes).ok().and_then(|es| es.into_iter().find(|e| e.hash == hash))
                {
                    return Ok(Some(e.seq));
                }
            }
            let Some(next) = last.checked_add(1) else { return Ok(None) };
            from = next;
        }
    }

    /// The chain's head: the newest record's seq and hash (`None` for an empty log).
    pub async fn audit_head(&self) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(on_pool!(self, p => sqlx::query_as(HEAD_SQL).fetch_optional(p).await?))
    }

    /// How many records there are.
    pub async fn audit_count(&self) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT CAST(COALESCE(SUM(last_seq - first_seq + 1), 0) AS BIGINT) FROM audit_segments";
        Ok(on_pool!(self, p => sqlx::query_scalar(SQL).fetch_one(p).await?))
    }

    /// The newest `query.limit` records matching `query`, returned oldest first.
    pub async fn audit_search(&self, query: &AuditQuery) -> Result<Vec<Entry>, StoreError> {
        let limit = usize::try_from(query.limit).unwrap_or(0);
        let mut found = Vec::new();
        let mut before = i64::MAX;
        while found.len() < limit {
            let (sql, binds) = search_sql(query, before);
            let page: Vec<(i64, Vec<u8>)> = on_pool!(self, p => {
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
                for b in &binds {
                    q = match b {
                        Bind::Text(s) => q.bind(s.as_str()),
                        Bind::Int(i) => q.bind(*i),
                    };
                }
                q.fetch_all(p).await?
            });
            let Some(&(oldest, _)) = page.last() else { break };
            for (first_seq, bytes) in page {
                let entries = segment::decode(first_seq, &bytes).map_err(unreadable)?;
                found.extend(entries.into_iter().rev().filter(|e| query.matches(e)));
            }
            before = oldest;
        }
        found.truncate(limit);
        found.reverse();
        Ok(found)
    }
}

/// The `SELECT` of [`Store::audit_search`]'s segments older than `before` that may hold a
/// match, newest first, and its values, in `$n` placeholders. Users, principal ids, servers
/// and tools are looked up in `audit_segment_keys`; times by each segment's range.
pub fn search_sql(query: &AuditQuery, before: i64) -> (String, Vec<Bind>) {
    fn arg(binds: &mut Vec<Bind>, bind: Bind) -> String {
        binds.push(bind);
        format!("${}", binds.len())
    }
    fn has_key(binds: &mut Vec<Bind>, kinds: &str, value: &str) -> String {
        let v = arg(binds, Bind::Text(segment::key_value(value).to_owned()));
        format!(" AND first_seq IN (SELECT first_seq FROM audit_segment_keys WHERE kind IN ({kinds}) AND value = {v})")
    }
    let mut b = Vec::new();
    let mut sql =
        format!("SELECT first_seq, records FROM audit_segments WHERE first_seq < {}", arg(&mut b, Bind::Int(before)));
    if let Some(u) = &query.user {
        // By name; an argument shaped like a principal id (a UUID) also matches ids.
        let kinds = if is_uuid(u) { "'user', 'principal'" } else { "'user'" };
        sql.push_str(&has_key(&mut b, kinds, u));
    }
    if let Some(s) = &query.server {
        sql.push_str(&has_key(&mut b, "'server'", s));
    }
    if let Some(t) = &query.tool {
        sql.push_str(&has_key(&mut b, "'tool'", t));
    }
    if let Some(t) = query.since_ms {
        sql.push_str(&format!(" AND max_time_ms >= {}", arg(&mut b, Bind::Int(t))));
    }
    if let Some(t) = query.until_ms {
        sql.push_str(&format!(" AND min_time_ms < {}", arg(&mut b, Bind::Int(t))));
    }
    if let Some(s) = query.after_seq {
        sql.push_str(&format!(" AND last_seq > {}", arg(&mut b, Bind::Int(s))));
    }
    sql.push_str(&format!(" ORDER BY first_seq DESC LIMIT {}", arg(&mut b, Bind::Int(SEGMENTS_PER_READ))));
    (sql, b)
}

/// Where the audit writer appends: [`Store::audit_append`] through the pool, or, on a SQLite
/// file, a connection of the writer's own through `rusqlite` (see
/// `docs/decisions/0005-sqlite-audit-appends.md`), so that appends never wait for a connection
/// of the pool that serves requests.
#[derive(Debug)]
pub enum AuditAppender {
    /// PostgreSQL, or an in-memory SQLite database.
    Pool(Store),
    /// A SQLite file.
    Own {
        /// The file.
        file: std::sync::Arc<std::path::Path>,
        /// The connection, opened on first use (and again after an error).
        conn: Option<rusqlite::Connection>,
    },
}

impl Store {
    /// The audit writer's way of appending to this store.
    pub fn audit_appender(&self) -> AuditAppender {
        if let Store::Sqlite(pool) = self {
            let opts = pool.connect_options();
            let file = opts.get_filename();
            // An in-memory database is private to its connection: a second one would see
            // another database, so such stores keep appending through the pool.
            let in_memory = file.as_os_str().is_empty() || file.to_string_lossy().contains(":memory:");
            if !in_memory {
                return AuditAppender::Own { file: file.into(), conn: None };
            }
        }
        AuditAppender::Pool(self.clone())
    }
}

impl AuditAppender {
    /// Appends `entries` to the chain in one transaction, setting their `seq`, `prev_hash` and
    /// `hash`, like [`Store::audit_append`] (whose locking it shares: `BEGIN IMMEDIATE`).
    pub async fn append(&mut self, entries: &mut Vec<Entry>) -> Result<(), StoreError> {
        let (file, conn) = match self {
            AuditAppender::Pool(store) => return store.audit_append(entries).await,
            AuditAppender::Own { file, conn } => (file, conn),
        };
        if entries.is_empty() {
            return Ok(());
        }
        let (file, open) = (file.clone(), conn.take());
        let mut batch = std::mem::take(entries);
        let job = tokio::task::spawn_blocking(move || {
            // The batch must come back whatever happens, or the writer's retry would find it
            // empty and count records as written that never were: a panic inside SQLite's
            // bindings or the sealing is caught here and turned into an error, and the
            // connection (whose state is then unknown) is dropped and reopened on the retry.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match open {
                    Some(c) => Ok(c),
                    None => open_appender(&file),
                }
                .and_then(|mut c| append_rows(&mut c, &mut batch).map(|()| c))
            }))
            .unwrap_or_else(|_| Err(StoreError::Append("the append panicked; the connection is reopened".into())));
            (result, batch)
        });
        // With the panic caught above, a join error means the runtime is shutting down and
        // cancelled the task before it ran: the batch went with it, and the writer counts it
        // as lost (loudly) when it sees an emptied batch come back with an error.
        let (result, batch) = job.await.map_err(|e| StoreError::Append(e.to_string()))?;
        *entries = batch;
        // After an error the connection is dropped (rolling back anything open) and reopened
        // on the next attempt.
        *conn = Some(result?);
        Ok(())
    }
}

/// The appender's page cache, in KiB. An append reads the right edge of two B-trees and writes
/// a batch's pages; SQLite's default (2 000 KiB) would fill with pages it never reads again as
/// the log grows, resident for the process's life. A batch larger than this spills its dirty
/// pages to the WAL before the commit, which writes them there anyway.
const APPENDER_CACHE_KIB: i64 = 128;

/// A connection for appends, set up as the pool's are (WAL, which the file already keeps,
/// `synchronous = FULL`, a 5 s busy timeout), with a small page cache.
fn open_appender(file: &std::path::Path) -> Result<rusqlite::Connection, StoreError> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(file, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -APPENDER_CACHE_KIB)?;
    Ok(conn)
}

fn append_rows(conn: &mut rusqlite::Connection, entries: &mut [Entry]) -> Result<(), StoreError> {
    use rusqlite::OptionalExtension;
    #[cfg(test)]
    tests::maybe_panic(entries);
    // IMMEDIATE, as in `Store::audit_append`: the write lock before the head is read.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let head = tx.query_row(HEAD_SQL, [], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
    seal_onto(entries, head);
    for s in segment::segments(entries) {
        tx.prepare_cached(INSERT_SEGMENT)?.execute(rusqlite::params![
            s.first_seq,
            s.last_seq,
            s.min_time_ms,
            s.max_time_ms,
            s.last_hash,
            s.records
        ])?;
        let mut key = tx.prepare_cached(&keys_sql(1))?;
        for (k, v) in &s.keys {
            key.execute(rusqlite::params![k.kind(), v, s.first_seq])?;
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set by the test below: the next append of a batch whose first record has
    /// [`PANICKING_ID`] panics, once.
    static PANIC_ONCE: AtomicBool = AtomicBool::new(false);
    const PANICKING_ID: &str = "append-panics-once";

    pub(super) fn maybe_panic(entries: &[Entry]) {
        if entries.first().is_some_and(|e| e.request_id == PANICKING_ID) && PANIC_ONCE.swap(false, Ordering::SeqCst) {
            panic!("a panic inside the append, as a test asks");
        }
    }

    /// A store on a SQLite file (so the writer appends through its own connection).
    async fn file_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("a.db").display())).await.unwrap();
        (dir, store)
    }

    /// A record as the writer would hand it over, before sealing.
    fn entry(request_id: &str) -> Entry {
        Entry {
            time_ms: 1_700_000_000_000,
            request_id: request_id.to_owned(),
            method: "ping".into(),
            arguments: "null".into(),
            decision: "allow".into(),
            ..Entry::default()
        }
    }

    #[tokio::test]
    async fn a_failed_append_leaves_nothing_of_its_batch() {
        // The segment goes in first, its keys after it: a failure at the keys must take the
        // segment with it, and the appender must work again on the retry.
        let (_dir, store) = file_store().await;
        let Store::Sqlite(pool) = &store else { unreachable!() };
        sqlx::query(
            "CREATE TRIGGER test_boom BEFORE INSERT ON audit_segment_keys WHEN NEW.value = 'boom' \
             BEGIN SELECT RAISE(ABORT, 'boom'); END",
        )
        .execute(pool)
        .await
        .unwrap();
        let mut appender = store.audit_appender();
        let mut batch: Vec<Entry> = (0..17).map(|i| entry(&format!("r{i}"))).collect();
        batch[14].server = Some("boom".into());
        appender.append(&mut batch).await.unwrap_err();
        assert_eq!(batch.len(), 17);
        assert_eq!(store.audit_count().await.unwrap(), 0);
        let segments: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_segments").fetch_one(pool).await.unwrap();
        assert_eq!(segments, 0);

        batch[14].server = Some("fine".into());
        appender.append(&mut batch).await.unwrap();
        assert_eq!(store.audit_count().await.unwrap(), 17);
        let verdict = crate::audit::verify(&store).await.unwrap();
        assert!(matches!(verdict, crate::audit::Verification::Intact { records: 17, .. }), "{verdict:?}");
    }

    #[tokio::test]
    async fn a_panic_inside_an_append_keeps_the_batch_for_the_retry() {
        let (_dir, store) = file_store().await;
        let mut appender = store.audit_appender();
        assert!(matches!(appender, AuditAppender::Own { .. }));
        let mut batch: Vec<Entry> =
            (0..5).map(|i| entry(&if i == 0 { PANICKING_ID.to_owned() } else { format!("r{i}") })).collect();
        let ids: Vec<String> = batch.iter().map(|e| e.request_id.clone()).collect();

        PANIC_ONCE.store(true, Ordering::SeqCst);
        let err = appender.append(&mut batch).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(batch.len(), 5, "the batch comes back for the retry");
        assert_eq!(store.audit_count().await.unwrap(), 0);

        appender.append(&mut batch).await.unwrap();
        assert_eq!(store.audit_count().await.unwrap(), 5);
        let stored: Vec<String> = batch.iter().map(|e| e.request_id.clone()).collect();
        assert_eq!(stored, ids);
        let verdict = crate::audit::verify(&store).await.unwrap();
        assert!(matches!(verdict, crate::audit::Verification::Intact { records: 5, .. }), "{verdict:?}");
    }
}
