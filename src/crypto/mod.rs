//! Encryption at rest: XChaCha20-Poly1305 under the key ring's keys, each ciphertext naming
//! its key and bound to its row.
//!
//! A ciphertext is `0x01 ‖ nonce (24 bytes) ‖ sealed bytes and tag`, stored beside the id of
//! the master key that made it. The cipher key is the master key's `"at-rest"` subkey, so no
//! other use of the master key (session sealing) shares it. The associated data is the row's
//! address, `"<table>:<id>"` (see [`row_aad`]): a ciphertext copied into another row, or
//! altered in any bit, does not decrypt.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::SecretSlice;

use crate::keys::{Key, KeyId, KeyRing, SharedKeyRing};

/// The format byte that starts every ciphertext.
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// The subkey purpose for data at rest.
const PURPOSE: &str = "at-rest";

/// One encrypted value and the id of the key that encrypted it. `Debug` shows the id and the
/// length only.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The master key's id (the `key_id` column).
    pub key_id: KeyId,
    /// Format byte, nonce, ciphertext and tag (the `ciphertext` column).
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed {{ key_id: {:?}, len: {} }}", self.key_id.as_str(), self.ciphertext.len())
    }
}

/// Why a value could not be encrypted or decrypted. Never carries the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The ciphertext names a key this ring does not hold.
    #[error("the ciphertext was made with key {0}, which is not in the key ring")]
    UnknownKey(String),
    /// Wrong key, wrong row, or altered.
    #[error("the ciphertext does not authenticate (wrong key, moved from another row, or altered)")]
    Unauthentic,
    /// Too short, or an unknown format.
    #[error("the ciphertext is malformed")]
    Malformed,
    /// The OS random source failed.
    #[error("the OS random source failed")]
    Random,
}

/// The associated data that binds a ciphertext to one row: `"<table>:<id>"`.
pub fn row_aad(table: &str, id: &str) -> String {
    format!("{table}:{id}")
}

fn cipher(master: &Key) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(master.derive(PURPOSE).bytes().into())
}

impl KeyRing {
    /// Encrypts `plaintext` under the active key, bound to `aad` (use [`row_aad`]).
    pub fn encrypt(&self, aad: &str, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let sealed = cipher(self.active_key())
            .encrypt(&XNonce::from(nonce), Payload { msg: plaintext, aad: aad.as_bytes() })
            .map_err(|_| CryptoError::Malformed)?;
        let mut ciphertext = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        ciphertext.push(FORMAT_V1);
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(&sealed);
        Ok(Sealed { key_id: self.active_id().clone(), ciphertext })
    }

    /// Decrypts `sealed` with the key it names; fails unless `aad` is the one it was sealed with.
    pub fn decrypt(&self, aad: &str, sealed: &Sealed) -> Result<SecretSlice<u8>, CryptoError> {
        let key = self.get(sealed.key_id.as_str()).ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.to_string()))?;
        let bytes = &sealed.ciphertext;
        if bytes.len() < 1 + NONCE_LEN + TAG_LEN || bytes[0] != FORMAT_V1 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, body) = bytes[1..].split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| CryptoError::Malformed)?;
        let plain = cipher(key)
            .decrypt(&nonce, Payload { msg: body, aad: aad.as_bytes() })
            .map_err(|_| CryptoError::Unauthentic)?;
        Ok(SecretSlice::from(plain))
    }
}

impl SharedKeyRing {
    /// Decrypts with the current ring; if the ciphertext names a key it lacks (another process
    /// rotated), reloads the ring once and tries again.
    pub fn decrypt(&self, aad: &str, sealed: &Sealed) -> Result<SecretSlice<u8>, CryptoError> {
        match self.current().decrypt(aad, sealed) {
            Err(CryptoError::UnknownKey(id)) => match self.reload() {
                Ok(ring) => ring.decrypt(aad, sealed),
                Err(e) => {
                    tracing::warn!(error = %e, "could not reload the key ring");
                    Err(CryptoError::UnknownKey(id))
                }
            },
            other => other,
        }
    }

    /// Encrypts under the current ring's active key.
    pub fn encrypt(&self, aad: &str, plaintext: &[u8]) -> Result<Sealed, CryptoError> {
        self.current().encrypt(aad, plaintext)
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn bound_to_row_key_and_bits() {
        let ring = KeyRing::single(Key::random());
        let sealed = ring.encrypt("secrets:a", b"value").expect("seals");
        assert_eq!(ring.decrypt("secrets:a", &sealed).expect("opens").expose_secret(), b"value");
        assert_eq!(ring.decrypt("secrets:b", &sealed).err(), Some(CryptoError::Unauthentic));
        let other = KeyRing::single(Key::random());
        let moved = Sealed { key_id: other.active_id().clone(), ..sealed.clone() };
        assert_eq!(other.decrypt("secrets:a", &moved).err(), Some(CryptoError::Unauthentic));
        assert!(matches!(other.decrypt("secrets:a", &sealed), Err(CryptoError::UnknownKey(_))));
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.ciphertext[i] ^= 0x40;
            assert!(ring.decrypt("secrets:a", &bad).is_err(), "bit flip at {i}");
        }
        let short = Sealed { ciphertext: sealed.ciphertext[..20].to_vec(), ..sealed.clone() };
        assert_eq!(ring.decrypt("secrets:a", &short).err(), Some(CryptoError::Malformed));
        assert!(!format!("{sealed:?}").contains("value"));
    }
}
