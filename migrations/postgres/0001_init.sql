-- Gateway facts that outlive a process (schema version lives in _sqlx_migrations).
CREATE TABLE gateway_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
