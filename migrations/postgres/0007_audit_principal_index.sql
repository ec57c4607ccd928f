-- `audit search --user` looked records up by principal name OR id, which no index could
-- serve: every search scanned the whole log. It now asks by name (by id only for an argument
-- shaped like one), and the name index leaves out records without a principal (requests
-- refused before authentication), so a flood of bad tokens does not grow it.
DROP INDEX audit_records_principal;
CREATE INDEX audit_records_principal ON audit_records (principal_name, seq) WHERE principal_name IS NOT NULL;
