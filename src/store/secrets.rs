//! Static upstream credentials: named secrets, encrypted at rest and bound to their name
//! (`"secrets:<name>"`), so a value copied to another name does not decrypt.

use secrecy::{ExposeSecret, SecretString};
use sqlx::Row;

use super::{Store, StoreError};
use crate::crypto::{CryptoError, Sealed, row_aad};
use crate::keys::{KeyId, KeyRing, SharedKeyRing};
use crate::store::rotate::EncryptedTable;

/// The secrets table, as key rotation sees it.
pub const SECRETS_TABLE: EncryptedTable = EncryptedTable { table: "secrets", id_column: "name" };

/// The largest secret value accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// A stored secret's name and times (seconds since the Unix epoch); never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    /// The name configs refer to.
    pub name: String,
    /// When it was first set.
    pub created_at: i64,
    /// When it was last set.
    pub updated_at: i64,
}

/// Why a secret could not be stored or read. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The name is not acceptable.
    #[error("secret name {0:?} must be 1 to 128 of A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// The value is empty.
    #[error("a secret value must not be empty")]
    Empty,
    /// The value is too long.
    #[error("a secret value must be at most {MAX_SECRET_BYTES} bytes")]
    TooLarge,
    /// Encryption or decryption failed.
    #[error("secret {name}: {source}")]
    Crypto {
        /// The secret's name.
        name: String,
        /// The cause.
        source: CryptoError,
    },
    /// The decrypted value is not UTF-8.
    #[error("secret {0}: the stored value is not UTF-8")]
    NotUtf8(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for SecretError {
    fn from(e: sqlx::Error) -> SecretError {
        SecretError::Store(StoreError::Query(e))
    }
}

/// Checks a secret name: 1 to 128 of `A-Z a-z 0-9 . _ -`.
pub fn check_secret_name(name: &str) -> Result<(), SecretError> {
    let ok = (1..=128).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(SecretError::BadName(name.chars().take(140).collect())) }
}

fn aad(name: &str) -> String {
    row_aad(SECRETS_TABLE.table, name)
}

fn crypto_err(name: &str) -> impl FnOnce(CryptoError) -> SecretError + '_ {
    move |source| SecretError::Crypto { name: name.to_owned(), source }
}

fn to_string(name: &str, bytes: &secrecy::SecretSlice<u8>) -> Result<SecretString, SecretError> {
    let text = std::str::from_utf8(bytes.expose_secret()).map_err(|_| SecretError::NotUtf8(name.to_owned()))?;
    Ok(SecretString::from(text))
}

impl Store {
    /// Stores `value` under `name` (replacing any earlier value), encrypted under the ring's
    /// active key. `now` is seconds since the Unix epoch.
    pub async fn secret_set(
        &self,
        name: &str,
        value: &SecretString,
        ring: &KeyRing,
        now: i64,
    ) -> Result<(), SecretError> {
        check_secret_name(name)?;
        let plain = value.expose_secret().as_bytes();
        if plain.is_empty() {
            return Err(SecretError::Empty);
        }
        if plain.len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLarge);
        }
        let sealed = ring.encrypt(&aad(name), plain).map_err(crypto_err(name))?;
        crate::on_pool!(self, p => sqlx::query(
            "INSERT INTO secrets (name, key_id, ciphertext, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, ciphertext = excluded.ciphertext, \
             updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(sealed.key_id.as_str())
        .bind(sealed.ciphertext.as_slice())
        .bind(now)
        .execute(p)
        .await?
        .rows_affected());
        Ok(())
    }

    /// The value of `name`, decrypted with `ring`; `None` if there is no such secret.
    pub async fn secret_get(&self, name: &str, ring: &KeyRing) -> Result<Option<SecretString>, SecretError> {
        let Some(sealed) = self.secret_sealed(name).await? else { return Ok(None) };
        let plain = ring.decrypt(&aad(name), &sealed).map_err(crypto_err(name))?;
        to_string(name, &plain).map(Some)
    }

    /// Like [`Store::secret_get`] for a long-running process: reloads the ring once if the row
    /// names a key it has not loaded yet (another process rotated).
    pub async fn secret_get_shared(
        &self,
        name: &str,
        keys: &SharedKeyRing,
    ) -> Result<Option<SecretString>, SecretError> {
        let Some(sealed) = self.secret_sealed(name).await? else { return Ok(None) };
        let plain = keys.decrypt(&aad(name), &sealed).map_err(crypto_err(name))?;
        to_string(name, &plain).map(Some)
    }

    /// The stored ciphertext of `name`, as it is in the table.
    pub async fn secret_sealed(&self, name: &str) -> Result<Option<Sealed>, SecretError> {
        check_secret_name(name)?;
        let row: Option<(String, Vec<u8>)> = crate::on_pool!(self, p => {
            let row = sqlx::query("SELECT key_id, ciphertext FROM secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(p)
                .await?;
            row.map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?))).transpose()?
        });
        let Some((key_id, ciphertext)) = row else { return Ok(None) };
        let key_id = KeyId::parse(&key_id).map_err(|_| crypto_err(name)(CryptoError::Malformed))?;
        Ok(Some(Sealed { key_id, ciphertext }))
    }

    /// Every secret's name and times, by name; never values.
    pub async fn secret_list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        let rows = crate::on_pool!(self, p => {
            let rows = sqlx::query("SELECT name, created_at, updated_at FROM secrets ORDER BY name")
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|r| Ok(SecretInfo { name: r.try_get(0)?, created_at: r.try_get(1)?, updated_at: r.try_get(2)? }))
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(rows)
    }

    /// Deletes `name`; `false` if there was no such secret.
    pub async fn secret_delete(&self, name: &str) -> Result<bool, SecretError> {
        check_secret_name(name)?;
        let n = crate::on_pool!(self, p => sqlx::query("DELETE FROM secrets WHERE name = $1")
            .bind(name)
            .execute(p)
            .await?
            .rows_affected());
        Ok(n > 0)
    }
}
