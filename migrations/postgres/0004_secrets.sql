-- Static upstream credentials, encrypted at rest (XChaCha20-Poly1305). `key_id` names the
-- master key that made `ciphertext`; the ciphertext is bound to 'secrets:<name>'.
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    ciphertext BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX secrets_key_id ON secrets (key_id);
