//! The migration lock: however many processes (replicas, CLI commands) open a fresh store at
//! once, one at a time runs [`Store::migrate`](super::Store::migrate), the others wait and then
//! find nothing left to do. sqlx's SQLite migrator takes no lock at all, and its PostgreSQL one
//! does not cover the move of legacy audit rows that follows the migrations.
//!
//! SQLite: an OS file lock on a file beside the database, so it works only where every process
//! sees the same local filesystem. PostgreSQL: a session advisory lock on a connection of its
//! own, taken out of the pool, so that a failed or abandoned migration closes the connection
//! and the server releases the lock (a pooled connection would keep it).

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool};

use super::StoreError;

/// The longest a process waits for another one's migrations before giving up: long enough for
/// a large legacy audit table to move, short enough that a stuck holder is reported.
pub const WAIT: Duration = Duration::from_secs(600);

/// The advisory lock key of migrations on PostgreSQL ("pclmigr" in ASCII); distinct from sqlx's
/// own key and from the audit writer's.
pub const PG_KEY: i64 = 0x0070_636c_6d69_6772;

/// The lock file of the SQLite database at `db`: `{db}.migrate-lock`. Kept after use (removing
/// it would let a late process lock a different file than a waiting one).
pub fn path_for(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".migrate-lock");
    PathBuf::from(name)
}

/// The lock of a SQLite database, held while migrating; released when dropped (the file
/// closes).
#[derive(Debug)]
pub struct SqliteLock(Option<(File, PathBuf)>);

impl SqliteLock {
    /// Locks the SQLite database whose file is `db` (empty: in memory, nothing to lock),
    /// waiting at most `limit` for another process to release it.
    pub async fn take(db: &Path, limit: Duration) -> Result<SqliteLock, StoreError> {
        if db.as_os_str().is_empty() {
            return Ok(SqliteLock(None));
        }
        let path = path_for(db);
        let err = |e: std::io::Error| StoreError::Lock { path: path.display().to_string(), why: e.to_string() };
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(err)?;
        let mut patience = Patience::new(format!("the lock file {}", path.display()), limit);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => patience.wait().await?,
                Err(TryLockError::Error(e)) => return Err(err(e)),
            }
        }
        Ok(SqliteLock(Some((file, path))))
    }

    /// Releases the lock, reporting a failure (dropping releases it too).
    pub fn release(self) -> Result<(), StoreError> {
        let Some((file, path)) = self.0 else { return Ok(()) };
        file.unlock().map_err(|e| StoreError::Lock { path: path.display().to_string(), why: e.to_string() })
    }
}

/// The advisory lock of a PostgreSQL database, held on a connection of its own while
/// migrating; released when dropped (the connection closes).
#[derive(Debug)]
pub struct PostgresLock(PgConnection);

impl PostgresLock {
    /// Takes the lock, waiting at most `limit` for another process to release it.
    pub async fn take(pool: &PgPool, limit: Duration) -> Result<PostgresLock, StoreError> {
        let mut conn = pool.acquire().await?.detach();
        let mut patience = Patience::new(format!("the PostgreSQL advisory lock {PG_KEY}"), limit);
        while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
            .bind(PG_KEY)
            .fetch_one(&mut conn)
            .await?
        {
            patience.wait().await?;
        }
        Ok(PostgresLock(conn))
    }

    /// The connection holding the lock. Migrations run on it: sqlx leaves its own advisory
    /// lock held when a migration fails, and on this connection that lock goes away with it
    /// instead of going back into the pool.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.0
    }

    /// Releases the lock and closes the connection.
    pub async fn release(mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_unlock($1)").bind(PG_KEY).execute(&mut self.0).await?;
        self.0.close().await?;
        Ok(())
    }
}

/// The wait between attempts at a lock: growing pauses, a log line once, and an error naming
/// the lock after `limit`.
struct Patience {
    what: String,
    limit: Duration,
    started: Instant,
    pause: Duration,
}

impl Patience {
    fn new(what: String, limit: Duration) -> Patience {
        Patience { what, limit, started: Instant::now(), pause: Duration::from_millis(10) }
    }

    async fn wait(&mut self) -> Result<(), StoreError> {
        let waited = self.started.elapsed();
        if waited >= self.limit {
            return Err(StoreError::LockTimeout { what: std::mem::take(&mut self.what), waited: self.limit });
        }
        if self.pause == Duration::from_millis(10) {
            tracing::info!(lock = %self.what, "another process is migrating the store; waiting for it");
        }
        tokio::time::sleep(self.pause.min(self.limit - waited)).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(200));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_lock_file_makes_a_second_taker_wait_then_give_up_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("p.db");
        let held = SqliteLock::take(&db, Duration::from_secs(1)).await.expect("first taker");
        let err = SqliteLock::take(&db, Duration::from_millis(100)).await.expect_err("held elsewhere");
        let text = err.to_string();
        assert!(text.contains(&path_for(&db).display().to_string()) && text.contains("gave up after"), "{text}");
        held.release().expect("released");
        SqliteLock::take(&db, Duration::from_millis(100)).await.expect("free again");
    }

    #[tokio::test]
    async fn an_in_memory_database_needs_no_lock() {
        let lock = SqliteLock::take(Path::new(""), Duration::ZERO).await.expect("nothing to lock");
        assert!(lock.0.is_none());
    }
}
