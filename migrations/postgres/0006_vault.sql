-- The vault: upstream OAuth. Every token, client secret and PKCE verifier is encrypted
-- (XChaCha20-Poly1305, `key_id` + `ciphertext`, bound to '<table>:<id>') like `secrets`.

-- Clients the gateway registered dynamically (RFC 7591), one per upstream server and
-- authorization server issuer (R86: never reused with another issuer).
CREATE TABLE vault_clients (
    id TEXT PRIMARY KEY,
    server TEXT NOT NULL,
    issuer TEXT NOT NULL,
    client_id TEXT NOT NULL,
    auth_method TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    key_id TEXT NOT NULL,
    ciphertext BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (server, issuer, redirect_uri)
);
CREATE INDEX vault_clients_key_id ON vault_clients (key_id);

-- Authorization flows in progress: one row per `state`, single-use, short-lived. `id` is the
-- SHA-256 of the state (hex); the ciphertext holds the PKCE verifier.
CREATE TABLE vault_flows (
    id TEXT PRIMARY KEY,
    server TEXT NOT NULL,
    subject TEXT NOT NULL,
    details TEXT NOT NULL,
    key_id TEXT NOT NULL,
    ciphertext BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX vault_flows_key_id ON vault_flows (key_id);
CREATE INDEX vault_flows_expires ON vault_flows (expires_at);

-- Connections: the tokens of one upstream server for one subject (a user or service
-- account id; '' for a shared connection). The ciphertext holds the access and refresh
-- tokens; `generation` grows with every change, so a refresh that lost a race notices.
CREATE TABLE vault_connections (
    id TEXT PRIMARY KEY,
    server TEXT NOT NULL,
    subject TEXT NOT NULL,
    issuer TEXT NOT NULL,
    client_id TEXT NOT NULL,
    scopes TEXT NOT NULL,
    details TEXT NOT NULL,
    key_id TEXT NOT NULL,
    ciphertext BYTEA NOT NULL,
    expires_at BIGINT,
    status TEXT NOT NULL,
    generation BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    refreshed_at BIGINT,
    last_error TEXT,
    UNIQUE (server, subject)
);
CREATE INDEX vault_connections_key_id ON vault_connections (key_id);
CREATE INDEX vault_connections_subject ON vault_connections (subject);

-- Connect links: single-use, short-lived, bound to the subject they were made for. `id` is
-- the SHA-256 of the link's secret (hex); `details` holds what the upstream asked for (its
-- challenge's scopes and metadata URL), never a secret.
CREATE TABLE vault_links (
    id TEXT PRIMARY KEY,
    server TEXT NOT NULL,
    subject TEXT NOT NULL,
    details TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
