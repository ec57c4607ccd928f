//! Key rotation in the store: which keys the encrypted rows use, and re-encryption of every
//! row under the active key while the gateway keeps running.
//!
//! Rows are re-encrypted in batches, each with one conditional `UPDATE … WHERE id = $ AND
//! key_id = $old AND ciphertext = $old`: a writer that changed the row meanwhile wins, and the
//! next pass looks at the row again if the writer used an old key.
//!
//! The SQL names tables and columns from [`ENCRYPTED_TABLES`], a constant, hence `AssertSqlSafe`.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{AssertSqlSafe, Row};

use super::{Store, StoreError};
use crate::crypto::{CryptoError, Sealed, row_aad};
use crate::keys::{KeyId, KeyRing};

/// One table whose rows are encrypted. It has the columns `key_id` (TEXT) and `ciphertext`
/// (BLOB/BYTEA), a TEXT primary key `id_column`, and binds each ciphertext to
/// [`row_aad`]`(table, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptedTable {
    /// The table.
    pub table: &'static str,
    /// Its TEXT primary key.
    pub id_column: &'static str,
}

/// Every table with encrypted rows; a new one joins rotation (and `keys list`) by adding
/// itself here.
pub const ENCRYPTED_TABLES: &[EncryptedTable] = &[
    super::secrets::SECRETS_TABLE,
    super::vault::CLIENTS_TABLE,
    super::vault::FLOWS_TABLE,
    super::vault::CONNECTIONS_TABLE,
];

/// How many passes a rotation makes at most (writers using an old key can add work).
const MAX_PASSES: usize = 8;

/// A row that could not be re-encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRow {
    /// Its table.
    pub table: &'static str,
    /// Its id (a name, never a value).
    pub id: String,
    /// Why.
    pub error: CryptoError,
}

/// What a re-encryption did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reencrypted {
    /// Rows now under the active key.
    pub rows: u64,
    /// Rows a concurrent writer changed first (left as the writer wrote them).
    pub raced: u64,
    /// Rows that could not be decrypted (unknown key, or not authentic).
    pub failed: Vec<FailedRow>,
    /// Rows still under another key when the rotation ended.
    pub remaining: u64,
}

/// How many rows use each key id, over every encrypted table.
pub async fn key_usage(store: &Store) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut usage = BTreeMap::new();
    for t in ENCRYPTED_TABLES {
        let sql = format!("SELECT key_id, COUNT(*) FROM {} GROUP BY key_id", t.table);
        let rows: Vec<(String, i64)> = crate::on_pool!(store, p => {
            let rows = sqlx::query(AssertSqlSafe(sql.as_str())).fetch_all(p).await?;
            rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, sqlx::Error>>()?
        });
        for (id, n) in rows {
            *usage.entry(id).or_insert(0) += u64::try_from(n).unwrap_or(0);
        }
    }
    Ok(usage)
}

/// Re-encrypts every row not under `ring`'s active key, `batch` rows per query.
pub async fn reencrypt(store: &Store, ring: &KeyRing, batch: u32) -> Result<Reencrypted, StoreError> {
    let mut report = Reencrypted::default();
    let mut failed = BTreeSet::new();
    for _ in 0..MAX_PASSES {
        let before = (report.rows, report.raced);
        for t in ENCRYPTED_TABLES {
            reencrypt_table(store, ring, t, batch.max(1), &mut report, &mut failed).await?;
        }
        if (report.rows, report.raced) == before {
            break;
        }
    }
    let usage = key_usage(store).await?;
    report.remaining = usage.iter().filter(|(id, _)| id.as_str() != ring.active_id().as_str()).map(|(_, n)| n).sum();
    Ok(report)
}

/// One pass over one table, in id order.
async fn reencrypt_table(
    store: &Store,
    ring: &KeyRing,
    t: &EncryptedTable,
    batch: u32,
    report: &mut Reencrypted,
    failed: &mut BTreeSet<(&'static str, String)>,
) -> Result<(), StoreError> {
    let (table, id_col) = (t.table, t.id_column);
    let first =
        format!("SELECT {id_col}, key_id, ciphertext FROM {table} WHERE key_id <> $1 ORDER BY {id_col} LIMIT {batch}");
    let next = format!(
        "SELECT {id_col}, key_id, ciphertext FROM {table} WHERE key_id <> $1 AND {id_col} > $2 \
         ORDER BY {id_col} LIMIT {batch}"
    );
    let update = format!(
        "UPDATE {table} SET key_id = $1, ciphertext = $2 WHERE {id_col} = $3 AND key_id = $4 AND ciphertext = $5"
    );
    let active = ring.active_id().as_str();
    let mut after: Option<String> = None;
    loop {
        let rows: Vec<(String, String, Vec<u8>)> = crate::on_pool!(store, p => {
            let query = match &after {
                None => sqlx::query(AssertSqlSafe(first.as_str())).bind(active),
                Some(last) => sqlx::query(AssertSqlSafe(next.as_str())).bind(active).bind(last.as_str()),
            };
            let rows = query.fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<_, sqlx::Error>>()?
        });
        let Some(last) = rows.last().map(|r| r.0.clone()) else { return Ok(()) };
        for (id, old_key, old_text) in rows {
            let fresh = match reseal(ring, table, &id, &old_key, &old_text) {
                Ok(fresh) => fresh,
                Err(error) => {
                    if failed.insert((table, id.clone())) {
                        tracing::warn!(table, id = %id, %error, "cannot re-encrypt a row");
                        report.failed.push(FailedRow { table, id, error });
                    }
                    continue;
                }
            };
            let changed = crate::on_pool!(store, p => sqlx::query(AssertSqlSafe(update.as_str()))
                .bind(fresh.key_id.as_str())
                .bind(fresh.ciphertext.as_slice())
                .bind(id.as_str())
                .bind(old_key.as_str())
                .bind(old_text.as_slice())
                .execute(p)
                .await?
                .rows_affected());
            if changed == 1 { report.rows += 1 } else { report.raced += 1 }
        }
        tracing::debug!(table, rows = report.rows, raced = report.raced, "re-encrypted a batch");
        after = Some(last);
    }
}

fn reseal(ring: &KeyRing, table: &str, id: &str, key_id: &str, ciphertext: &[u8]) -> Result<Sealed, CryptoError> {
    let key_id = KeyId::parse(key_id).map_err(|_| CryptoError::Malformed)?;
    let aad = row_aad(table, id);
    let plain = ring.decrypt(&aad, &Sealed { key_id, ciphertext: ciphertext.to_vec() })?;
    ring.encrypt(&aad, secrecy::ExposeSecret::expose_secret(&plain))
}
