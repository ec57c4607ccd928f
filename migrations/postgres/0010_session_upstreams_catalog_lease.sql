-- A client session keeps its id while the gateway opens (or re-opens) the upstream side
-- behind it: after the person connects their account, or after the upstream forgot the
-- session. One row per re-opened session, keyed by the session's random key; the ciphertext
-- holds the upstream's session id and revision, bound to '<table>:<session_key>'.
CREATE TABLE mcp_session_upstreams (
    session_key TEXT PRIMARY KEY,
    server TEXT NOT NULL,
    key_id TEXT NOT NULL,
    ciphertext BYTEA NOT NULL,
    generation BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX mcp_session_upstreams_updated ON mcp_session_upstreams (updated_at);

-- The listings (and `initialize` result) the gateway last saw from an OAuth upstream, so a
-- person who has not connected yet sees the server's real tools. One row per page.
CREATE TABLE server_catalog (
    server TEXT NOT NULL,
    method TEXT NOT NULL,
    page TEXT NOT NULL,
    body TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (server, method, page)
);

-- Who refreshes a connection's token, across processes sharing the store: a lease taken with
-- one conditional UPDATE (SQLite serialises writers), released when the refresh is stored.
ALTER TABLE vault_connections ADD COLUMN refresh_lease_owner TEXT;
ALTER TABLE vault_connections ADD COLUMN refresh_lease_until BIGINT;
