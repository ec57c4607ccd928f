//! The store: SQLite by default (one file, created on first start), PostgreSQL when several
//! replicas share the work. An enum over the two pools, not a trait object; migrations live
//! in `migrations/sqlite` and `migrations/postgres` and are applied on start.

pub mod identity;
mod lock;
pub mod placement;
pub mod rotate;
pub mod secrets;
pub mod sessions;
pub mod vault;

use std::str::FromStr;

pub use lock::{PG_KEY as MIGRATION_LOCK_PG_KEY, WAIT as MIGRATION_LOCK_WAIT, path_for as migration_lock_path};

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// Runs the same sqlx code against whichever pool the store holds: `on_pool!(store, p => expr)`
/// expands `expr` once per backend with `p` bound to that backend's pool. Use it where the SQL
/// text is the same for both; `match` on [`Store`] where the dialects differ.
#[macro_export]
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite($pool) => $body,
            $crate::store::Store::Postgres($pool) => $body,
        }
    };
}

/// A connection pool to one of the two supported databases.
#[derive(Debug, Clone)]
pub enum Store {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Connecting failed.
    #[error("cannot open {url}: {source}")]
    Connect {
        /// The URL with any password removed.
        url: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// The migration lock could not be taken.
    #[error("cannot use the migration lock {path}: {why}")]
    Lock {
        /// The lock file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// Another process held the migration lock for too long.
    #[error("waited for {what}: another process held it; gave up after {}s", waited.as_secs_f32())]
    LockTimeout {
        /// The lock.
        what: String,
        /// How long this process waited.
        waited: std::time::Duration,
    },
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// An audit append through the writer's own SQLite connection failed.
    #[error("audit append failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The blocking task of an audit append did not finish.
    #[error("audit append failed: {0}")]
    Append(String),
    /// A stored audit segment cannot be decoded (`audit verify` names the record).
    #[error("{0}")]
    Unreadable(String),
}

/// The URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Creates `dir` and its missing parents with mode 0700 (the data directory holds the store,
/// the master key and the audit checkpoints); an existing directory is left as it is.
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates the SQLite file, empty, with mode 0600 before SQLite opens it: SQLite would create
/// it with the process's umask (usually 0644), and gives its `-wal` and `-shm` files the
/// database file's mode. An existing file keeps its mode, with a warning when others may read
/// it.
fn create_private_file(file: &std::path::Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(file) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(file)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %file.display(),
                        mode = format!("{:o}", mode & 0o777),
                        "the SQLite store is open to other users of this machine; chmod 600 it (and its -wal and -shm files)"
                    );
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Runs the PostgreSQL migrations on `conn`. `Migrator::run` takes an `Acquire`, whose bound
/// on `&mut PgConnection` keeps the caller's future from being provably `Send`; `run_direct`
/// (public, hidden from sqlx's docs for this reason) takes the connection itself.
async fn migrate_postgres(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations/postgres").run_direct(None, conn, false).await
}

impl Store {
    /// Opens (creating a SQLite file and its directory if needed) and migrates.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let store = Store::open(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens (creating a SQLite file and its directory if needed) without migrating.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let connect_err = |source| StoreError::Connect { url: redact_url(url), source };
        let store = if url.starts_with("postgres") {
            let pool = PgPoolOptions::new().max_connections(16).connect(url).await.map_err(connect_err)?;
            Store::Postgres(pool)
        } else {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(connect_err)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(std::time::Duration::from_secs(5));
            let file = opts.get_filename();
            let in_memory = file.as_os_str().is_empty() || file.to_string_lossy().contains(":memory:");
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty() && !in_memory) {
                create_private_dir(dir).map_err(|e| connect_err(sqlx::Error::Io(e)))?;
            }
            if let Some(dir) = file.parent() {
                placement::check_sqlite_dir(dir).map_err(|why| connect_err(sqlx::Error::Configuration(why.into())))?;
            }
            if !in_memory {
                create_private_file(file).map_err(|e| connect_err(sqlx::Error::Io(e)))?;
            }
            let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await.map_err(connect_err)?;
            Store::Sqlite(pool)
        };
        Ok(store)
    }

    /// Applies pending migrations and moves legacy audit rows, holding the migration lock
    /// throughout: processes that start together migrate one after the other (the later ones
    /// find nothing to do) instead of racing to create the same tables.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(p) => {
                // SQLite names the main database's file; an empty name means in memory.
                let file: String = sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                    .fetch_one(p)
                    .await?;
                let lock = lock::SqliteLock::take(std::path::Path::new(&file), lock::WAIT).await?;
                sqlx::migrate!("./migrations/sqlite").run(p).await?;
                self.audit_upgrade().await?;
                lock.release()
            }
            Store::Postgres(p) => {
                let mut lock = lock::PostgresLock::take(p, lock::WAIT).await?;
                migrate_postgres(lock.connection()).await?;
                self.audit_upgrade().await?;
                lock.release().await
            }
        }
    }

    /// A round trip to the database (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(p) => {
                sqlx::query("SELECT 1").execute(p).await?;
            }
            Store::Postgres(p) => {
                sqlx::query("SELECT 1").execute(p).await?;
            }
        }
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match self {
            Store::Sqlite(p) => p.close().await,
            Store::Postgres(p) => p.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact_url("postgres://u:hunter2@db/x"), "postgres://u:redacted@db/x");
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }

    #[tokio::test]
    async fn sqlite_file_and_directory_are_created_and_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/nested/p.db", dir.path().display());
        let store = Store::connect(&url).await.expect("opens");
        store.ping().await.expect("pings");
        assert!(dir.path().join("nested/p.db").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name: &str| {
                std::fs::metadata(dir.path().join(name)).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
            };
            assert_eq!(mode("nested"), 0o700, "a directory the store creates is private");
            for file in ["nested/p.db", "nested/p.db-wal", "nested/p.db-shm"] {
                assert_eq!(mode(file), 0o600, "{file} is private");
            }
        }
    }

    /// PostgreSQL runs in CI (127.0.0.1:5432, trust auth); set PORTCULLIS_TEST_PG to override.
    #[tokio::test]
    async fn postgres_connects_and_migrates() {
        let url =
            std::env::var("PORTCULLIS_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let store = Store::connect(&url).await.expect("PostgreSQL on 127.0.0.1:5432 must be running");
        store.ping().await.expect("pings");
    }
}
