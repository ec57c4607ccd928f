//! Audit records: append a chained batch in one transaction, read pages and searches.
//!
//! Appends are serialised across processes (SQLite `BEGIN IMMEDIATE`; on PostgreSQL a
//! transaction-level advisory lock) and read the chain's head inside the transaction, so
//! several replicas can append to one chain without forking it.

use super::{Store, StoreError};
use crate::audit::Entry;
use crate::on_pool;

/// The PostgreSQL advisory lock key that serialises appends ("pclaudit").
const APPEND_LOCK: i64 = 0x7063_6c61_7564_6974;

/// Rows per `INSERT` statement (2,000 binds, well under both databases' limits). Measured with
/// the relay bench's audit arm on SQLite: the writer's CPU per record fell from 10.1 µs at 20
/// rows to 7.1 µs at 100; 250 rows gained nothing more.
const ROWS_PER_INSERT: usize = 100;

/// How an `INSERT` names its parameters.
#[derive(Clone, Copy)]
enum Placeholders {
    /// `$1, $2, …` (PostgreSQL).
    Numbered,
    /// `?` (SQLite). Numbered parameters cost SQLite a linear scan of the statement's parameter
    /// names per bind (`sqlite3_bind_parameter_name`, which sqlx calls for each one): with 400
    /// binds that scan was the largest part of the writer's CPU per record.
    Anonymous,
}

const COLUMNS: &str = "seq, time_ms, request_id, principal_id, principal_kind, principal_name, token_id, \
     client_name, client_version, server, method, tool, arguments, decision, upstream_status, latency_us, \
     bytes_in, bytes_out, prev_hash, hash";
const N_COLUMNS: usize = 20;

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

/// A value bound into [`search_sql`]'s statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// Text.
    Text(String),
    /// An integer.
    Int(i64),
}

fn insert_sql(verb: &str, rows: usize, style: Placeholders) -> String {
    let mut sql = format!("{verb} INTO audit_records ({COLUMNS}) VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..N_COLUMNS {
            if c > 0 {
                sql.push_str(", ");
            }
            match style {
                Placeholders::Numbered => {
                    sql.push('$');
                    sql.push_str(itoa::Buffer::new().format(r * N_COLUMNS + c + 1));
                }
                Placeholders::Anonymous => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

/// Reads the head, seals `entries` onto it and inserts them, inside the open transaction `$tx`.
macro_rules! append_in {
    ($tx:ident, $entries:ident, $style:expr) => {{
        let head: Option<(i64, Vec<u8>)> = sqlx::query_as(HEAD_SQL).fetch_optional(&mut *$tx).await?;
        seal_onto($entries, head);
        for chunk in $entries.chunks(ROWS_PER_INSERT) {
            let sql = insert_sql("INSERT", chunk.len(), $style);
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for e in chunk {
                q = q
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
                    .bind(&e.hash);
            }
            q.execute(&mut *$tx).await?;
        }
        $tx.commit().await?;
    }};
}

/// The chain's head: the newest record's seq and hash.
const HEAD_SQL: &str = "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1";

/// Numbers and chains `entries` after `head` (the genesis when the log is empty).
fn seal_onto(entries: &mut [Entry], head: Option<(i64, Vec<u8>)>) {
    let (mut seq, mut prev) = head.unwrap_or_else(|| (0, crate::audit::GENESIS.to_vec()));
    for e in entries.iter_mut() {
        seq += 1;
        crate::audit::seal(e, seq, &prev);
        prev.clone_from(&e.hash);
    }
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
                append_in!(tx, entries, Placeholders::Anonymous);
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(APPEND_LOCK).execute(&mut *tx).await?;
                append_in!(tx, entries, Placeholders::Numbered);
            }
        }
        Ok(())
    }

    /// Up to `limit` records with `seq > after`, in seq order.
    pub async fn audit_after(&self, after: i64, limit: i64) -> Result<Vec<Entry>, StoreError> {
        const SQL: &str = "SELECT * FROM audit_records WHERE seq > $1 ORDER BY seq LIMIT $2";
        Ok(on_pool!(self, p => sqlx::query_as(SQL).bind(after).bind(limit).fetch_all(p).await?))
    }

    /// The seq of the record whose hash is `hash`, if any.
    pub async fn audit_seq_of_hash(&self, hash: &[u8]) -> Result<Option<i64>, StoreError> {
        const SQL: &str = "SELECT seq FROM audit_records WHERE hash = $1 ORDER BY seq LIMIT 1";
        Ok(on_pool!(self, p => sqlx::query_scalar(SQL).bind(hash).fetch_optional(p).await?))
    }

    /// How many records there are.
    pub async fn audit_count(&self) -> Result<i64, StoreError> {
        Ok(on_pool!(self, p => sqlx::query_scalar("SELECT COUNT(*) FROM audit_records").fetch_one(p).await?))
    }

    /// The newest `query.limit` records matching `query`, returned oldest first.
    pub async fn audit_search(&self, query: &AuditQuery) -> Result<Vec<Entry>, StoreError> {
        let (sql, binds) = search_sql(query);
        let mut rows: Vec<Entry> = on_pool!(self, p => {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
            for b in &binds {
                q = match b {
                    Bind::Text(s) => q.bind(s.as_str()),
                    Bind::Int(i) => q.bind(*i),
                };
            }
            q.fetch_all(p).await?
        });
        rows.reverse();
        Ok(rows)
    }
}

/// The `SELECT` of [`Store::audit_search`] and its values, in `$n` placeholders.
pub fn search_sql(query: &AuditQuery) -> (String, Vec<Bind>) {
    let mut sql = String::from("SELECT * FROM audit_records WHERE 1 = 1");
    let mut binds = Vec::new();
    let mut cond = |sql: &mut String, clause: &str, bind: Bind| {
        binds.push(bind);
        sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
    };
    if let Some(u) = &query.user {
        // By name, through the name index; an argument shaped like a principal id (a UUID)
        // also matches ids, by a scan: an OR across the two columns could use no index.
        let clause = if uuid::Uuid::try_parse(u).is_ok() {
            " AND (principal_name = ? OR principal_id = ?)"
        } else {
            " AND principal_name = ?"
        };
        cond(&mut sql, clause, Bind::Text(u.clone()));
    }
    if let Some(s) = &query.server {
        cond(&mut sql, " AND server = ?", Bind::Text(s.clone()));
    }
    if let Some(t) = &query.tool {
        cond(&mut sql, " AND tool = ?", Bind::Text(t.clone()));
    }
    if let Some(t) = query.since_ms {
        cond(&mut sql, " AND time_ms >= ?", Bind::Int(t));
    }
    if let Some(t) = query.until_ms {
        cond(&mut sql, " AND time_ms < ?", Bind::Int(t));
    }
    if let Some(s) = query.after_seq {
        cond(&mut sql, " AND seq > ?", Bind::Int(s));
    }
    cond(&mut sql, " ORDER BY seq DESC LIMIT ?", Bind::Int(query.limit.max(0)));
    (sql, binds)
}

/// Where the audit writer appends: [`Store::audit_append`] through the pool, or, on a SQLite
/// file, a connection of the writer's own through `rusqlite` (see
/// `docs/decisions/0005-sqlite-audit-appends.md`): sqlx's SQLite driver spends more per bound
/// value than SQLite spends inserting the row, and a record has twenty.
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

/// Rows per `INSERT` on the writer's own SQLite connection: a batch goes in as statements of
/// these sizes, largest first, so at most three statements are prepared (and cached). Rows of
/// one statement share SQLite's cursors: inserted one statement per row, each row's index
/// entries were found by a full descent of the index, twice the instructions of the rest of
/// the insert. And a statement's bound texts and blobs (seven per row, each copied by SQLite)
/// come from the connection's lookaside memory while it lasts (about 120 small slots by
/// default), from `malloc` after: twelve rows stay within it. Measured with callgrind on the
/// relay bench's refusal arm, 12-row statements cost 13,900 instructions per record against
/// 16,100 for 100-row ones.
const SQLITE_CHUNKS: [usize; 3] = [12, 4, 1];

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

/// A connection for appends, set up as the pool's are (WAL, which the file already keeps,
/// `synchronous = FULL`, a 5 s busy timeout).
fn open_appender(file: &std::path::Path) -> Result<rusqlite::Connection, StoreError> {
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(file, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
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
    // `OR ROLLBACK`: a multi-row INSERT that may fail part way otherwise opens a statement
    // journal and copies each page it first touches into it, so that the failing statement
    // alone could be undone. A failed append is rolled back whole anyway (the connection is
    // dropped and the batch retried), so the transaction may as well go with it.
    static SQL: std::sync::LazyLock<[String; 3]> = std::sync::LazyLock::new(|| {
        SQLITE_CHUNKS.map(|rows| insert_sql("INSERT OR ROLLBACK", rows, Placeholders::Anonymous))
    });
    let mut rest = &*entries;
    while !rest.is_empty() {
        let i = SQLITE_CHUNKS.iter().position(|&n| n <= rest.len()).unwrap_or(SQLITE_CHUNKS.len() - 1);
        let (chunk, tail) = rest.split_at(SQLITE_CHUNKS[i]);
        let mut insert = tx.prepare_cached(&SQL[i])?;
        let mut column = 0;
        let mut bind = |value: &dyn rusqlite::ToSql| {
            column += 1;
            insert.raw_bind_parameter(column, value)
        };
        for e in chunk {
            bind(&e.seq)?;
            bind(&e.time_ms)?;
            bind(&e.request_id)?;
            bind(&e.principal_id)?;
            bind(&e.principal_kind)?;
            bind(&e.principal_name)?;
            bind(&e.token_id)?;
            bind(&e.client_name)?;
            bind(&e.client_version)?;
            bind(&e.server)?;
            bind(&e.method)?;
            bind(&e.tool)?;
            bind(&e.arguments)?;
            bind(&e.decision)?;
            bind(&e.upstream_status)?;
            bind(&e.latency_us)?;
            bind(&e.bytes_in)?;
            bind(&e.bytes_out)?;
            bind(&e.prev_hash)?;
            bind(&e.hash)?;
        }
        insert.raw_execute()?;
        rest = tail;
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
    async fn a_failed_insert_leaves_no_row_of_its_batch() {
        // The writer's statements roll the whole transaction back on a constraint failure
        // (`OR ROLLBACK`, no statement journal): nothing of the batch may remain, and the
        // appender must work again on the retry.
        let (_dir, store) = file_store().await;
        let Store::Sqlite(pool) = &store else { unreachable!() };
        sqlx::query("CREATE UNIQUE INDEX test_unique_request ON audit_records (request_id)")
            .execute(pool)
            .await
            .unwrap();
        let mut appender = store.audit_appender();
        // Seventeen rows: a 12-row statement, then a 4-row one, then one; the duplicate is in
        // the second statement, after the first has inserted its rows.
        let mut batch: Vec<Entry> = (0..17).map(|i| entry(&format!("r{i}"))).collect();
        batch[14].request_id = "r3".into();
        appender.append(&mut batch).await.unwrap_err();
        assert_eq!(batch.len(), 17);
        assert_eq!(store.audit_count().await.unwrap(), 0);

        batch[14].request_id = "r14".into();
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
