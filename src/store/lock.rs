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
const PG_KEY: i64 = 0x0070_636c_6d69_6772;

/// The lock file of the SQLite database at `db`: `{db}.migrate-lock`. Kept after use (removing
/// it would let a late process lock a different file than a waiting one).
pub fn path_for(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".migrate-lock");
    PathBuf::from(name)
}

/// Held while migrating; released when dropped.
#[derive(Debug)]
pub enum MigrationLock {
    /// An in-memory SQLite database: no other process can see it.
    None,
    /// The locked file (closing it releases the lock).
    File {
        /// The open, locked file.
        file: File,
        /// Its name, for messages.
        path: PathBuf,
    },
    /// The connection holding the advisory lock.
    Postgres(PgConnection),
}

impl MigrationLock {
    /// Locks the SQLite database whose file is `db` (empty: in memory, nothing to lock),
    /// waiting at most `limit` for another process to release it.
    pub async fn sqlite(db: &Path, limit: Duration) -> Result<MigrationLock, StoreError> {
        if db.as_os_str().is_empty() {
            return Ok(MigrationLock::None);
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
        Ok(MigrationLock::File { file, path })
    }

    /// Takes the advisory lock on a connection of its own, waiting at most `limit`.
    pub async fn postgres(pool: &PgPool, limit: Duration) -> Result<MigrationLock, StoreError> {
        let mut conn = pool.acquire().await?.detach();
        let mut patience = Patience::new(format!("the PostgreSQL advisory lock {PG_KEY}"), limit);
        while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
            .bind(PG_KEY)
            .fetch_one(&mut conn)
            .await?
        {
            patience.wait().await?;
        }
        Ok(MigrationLock::Postgres(conn))
    }

    /// Releases the lock. Dropping it releases it too (the file or the connection closes);
    /// this also reports a failed release and closes the PostgreSQL connection politely.
    pub async fn release(self) -> Result<(), StoreError> {
        match self {
            MigrationLock::None => Ok(()),
            MigrationLock::File { file, path } => {
                file.unlock().map_err(|e| StoreError::Lock { path: path.display().to_string(), why: e.to_string() })
            }
            MigrationLock::Postgres(mut conn) => {
                sqlx::query("SELECT pg_advisory_unlock($1)").bind(PG_KEY).execute(&mut conn).await?;
                conn.close().await?;
                Ok(())
            }
        }
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
        let held = MigrationLock::sqlite(&db, Duration::from_secs(1)).await.expect("first taker");
        let err = MigrationLock::sqlite(&db, Duration::from_millis(100)).await.expect_err("held elsewhere");
        let text = err.to_string();
        assert!(text.contains(&path_for(&db).display().to_string()) && text.contains("gave up after"), "{text}");
        held.release().await.expect("released");
        MigrationLock::sqlite(&db, Duration::from_millis(100)).await.expect("free again");
    }

    #[tokio::test]
    async fn an_in_memory_database_needs_no_lock() {
        let lock = MigrationLock::sqlite(Path::new(""), Duration::ZERO).await.expect("nothing to lock");
        assert!(matches!(lock, MigrationLock::None));
    }
}
