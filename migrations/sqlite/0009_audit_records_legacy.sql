-- Rows of audit_records are moved into segments by the gateway on start (see 0008; they keep
-- their seq and hashes). The table is renamed so that a replica of an earlier version still
-- running on a shared database fails loudly on its next append (and keeps its records queued)
-- instead of starting a second chain, from seq 1, in a table nobody reads any more.
ALTER TABLE audit_records RENAME TO audit_records_legacy;
