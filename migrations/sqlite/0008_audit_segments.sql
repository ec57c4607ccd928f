-- Audit records are kept in segments: one row per committed batch (or per megabyte of it),
-- its records encoded back to back (see docs/decisions/0006-audit-segments.md). A row per
-- record cost the writer a table insert, two index inserts and twenty bound values per
-- request; a segment costs one insert per batch. The hash chain is unchanged.
--
-- audit_segment_keys lists, per segment, the users, principal ids, servers and tools of its
-- records: what `audit search` looks segments up by before decoding them.
--
-- Existing rows of audit_records are moved into segments by the gateway on start (they keep
-- their seq and hashes; `audit verify` checks them as before); the table stays, empty.
CREATE TABLE audit_segments (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    min_time_ms INTEGER NOT NULL,
    max_time_ms INTEGER NOT NULL,
    last_hash BLOB NOT NULL,
    records BLOB NOT NULL
);

CREATE TABLE audit_segment_keys (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    PRIMARY KEY (kind, value, first_seq)
) WITHOUT ROWID;

-- `audit verify` reads each segment's keys back to check them.
CREATE INDEX audit_segment_keys_segment ON audit_segment_keys (first_seq);
