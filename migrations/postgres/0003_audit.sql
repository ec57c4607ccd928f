-- The audit log: one row per MCP request, hash-chained (see docs/audit.md).
-- arguments is TEXT, not JSONB: the chain hashes the exact text, and JSONB would reorder it.
-- hash = SHA-256(prev_hash || canonical JSON of the row without its hashes); seq starts at 1,
-- has no gaps, and the first row's prev_hash is 32 zero bytes. Ids are plain TEXT on purpose:
-- records outlive the principals and tokens they name.
CREATE TABLE audit_records (
    seq BIGINT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    principal_id TEXT,
    principal_kind TEXT,
    principal_name TEXT,
    token_id TEXT,
    client_name TEXT,
    client_version TEXT,
    server TEXT,
    method TEXT NOT NULL,
    tool TEXT,
    arguments TEXT NOT NULL,
    decision TEXT NOT NULL,
    upstream_status BIGINT,
    latency_us BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL
);

CREATE INDEX audit_records_time ON audit_records (time_ms);
CREATE INDEX audit_records_principal ON audit_records (principal_name, seq);
CREATE INDEX audit_records_server ON audit_records (server, tool, seq);
