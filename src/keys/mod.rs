//! Master keys: the key ring that encrypts data at rest and seals session ids.
//!
//! A ring holds one or more 32-byte master keys, each with a short id, and names one of them
//! active: new ciphertexts use the active key, old ones name the key that made them. Keys come
//! from, in order (see `docs/secrets.md`):
//!
//! 1. `PORTCULLIS_MASTER_KEYS` — `id:base64,id:base64,…`, the first entry active;
//! 2. `PORTCULLIS_MASTER_KEY` — one base64 key (its id is its fingerprint);
//! 3. `{data_dir}/keys.json` — the ring file written by `portcullis keys rotate`;
//! 4. `{data_dir}/master.key` — one base64 key, created with mode 0600 on first start.
//!
//! Every replica that shares a store must share the ring.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::zeroize::{Zeroize, Zeroizing};
use sha2::{Digest, Sha256};

pub use sources::{load_key_ring, load_key_ring_from};

mod sources;
#[cfg(test)]
mod tests;

/// Environment variable holding one base64 master key.
pub const MASTER_KEY_ENV: &str = "PORTCULLIS_MASTER_KEY";
/// Environment variable holding a whole ring: `id:base64,…`, the first entry active.
pub const MASTER_KEYS_ENV: &str = "PORTCULLIS_MASTER_KEYS";
/// The ring file in the data directory.
pub const RING_FILE: &str = "keys.json";
/// The single-key file in the data directory (created on first start).
pub const KEY_FILE: &str = "master.key";

/// 32 secret bytes, wiped when dropped. `Debug` never shows them.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(redacted)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Key {
    /// The raw bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fresh random key.
    pub fn random() -> Key {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("the OS random source is available");
        Key(k)
    }

    /// A subkey for one purpose; purposes never share a key.
    pub fn derive(&self, purpose: &str) -> Key {
        let mut h = Sha256::new();
        h.update(b"portcullis/key/v1\0");
        h.update(purpose.as_bytes());
        h.update([0]);
        h.update(self.0);
        Key(h.finalize().into())
    }

    /// A public, stable id for this key: 8 hex digits of a hash that reveals nothing of it.
    pub fn fingerprint(&self) -> KeyId {
        let digest = Sha256::new().chain_update(b"portcullis/key-id/v1\0").chain_update(self.0).finalize();
        KeyId(digest.iter().take(4).map(|b| format!("{b:02x}")).collect())
    }

    fn from_base64(text: &str) -> Option<Key> {
        let bytes = Zeroizing::new(STANDARD.decode(text.trim()).ok()?);
        let array: [u8; 32] = bytes.as_slice().try_into().ok()?;
        Some(Key(array))
    }

    fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0))
    }
}

/// The public name of a key in a ring: 1 to 32 of `A-Z a-z 0-9 _ -`. Stored beside every
/// ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Checks and wraps an id.
    pub fn parse(text: &str) -> Result<KeyId, KeyError> {
        let ok =
            (1..=32).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok { Ok(KeyId(text.to_owned())) } else { Err(KeyError::BadId(text.chars().take(40).collect())) }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a ring was loaded from; decides whether `keys rotate` may write to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingSource {
    /// `PORTCULLIS_MASTER_KEYS`.
    EnvRing,
    /// `PORTCULLIS_MASTER_KEY`.
    EnvKey,
    /// `{data_dir}/keys.json`.
    RingFile(PathBuf),
    /// `{data_dir}/master.key`.
    KeyFile(PathBuf),
    /// Built in memory (tests, or a ring about to be saved).
    Memory,
}

impl RingSource {
    /// Whether the keys come from the environment (the operator manages them there).
    pub fn is_env(&self) -> bool {
        matches!(self, RingSource::EnvRing | RingSource::EnvKey)
    }
}

impl std::fmt::Display for RingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingSource::EnvRing => f.write_str(MASTER_KEYS_ENV),
            RingSource::EnvKey => f.write_str(MASTER_KEY_ENV),
            RingSource::RingFile(p) | RingSource::KeyFile(p) => write!(f, "{}", p.display()),
            RingSource::Memory => f.write_str("memory"),
        }
    }
}

/// One key of a ring.
#[derive(Debug, Clone)]
pub struct RingKey {
    /// Its id.
    pub id: KeyId,
    /// The key.
    pub key: Key,
    /// When it was added (seconds since the Unix epoch), where known.
    pub created: Option<i64>,
}

/// Master keys by id, one of them active. `Debug` shows ids only.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<RingKey>,
    active: usize,
    source: RingSource,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("active", &self.active_id().as_str())
            .field("keys", &self.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>())
            .field("source", &self.source)
            .finish()
    }
}

impl From<Key> for KeyRing {
    fn from(key: Key) -> KeyRing {
        KeyRing::single(key)
    }
}

impl KeyRing {
    /// A ring of one key, its id the key's fingerprint.
    pub fn single(key: Key) -> KeyRing {
        KeyRing {
            keys: vec![RingKey { id: key.fingerprint(), key, created: None }],
            active: 0,
            source: RingSource::Memory,
        }
    }

    /// A ring of `keys` with `active` the active one; ids must be distinct.
    pub fn new(keys: Vec<RingKey>, active: &KeyId) -> Result<KeyRing, KeyError> {
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.id == k.id) {
                return Err(KeyError::DuplicateId(k.id.clone()));
            }
        }
        let active = keys.iter().position(|k| &k.id == active).ok_or_else(|| KeyError::NoSuchKey(active.clone()))?;
        Ok(KeyRing { keys, active, source: RingSource::Memory })
    }

    /// The id of the key new ciphertexts use.
    pub fn active_id(&self) -> &KeyId {
        &self.keys[self.active].id
    }

    /// The key new ciphertexts use.
    pub fn active_key(&self) -> &Key {
        &self.keys[self.active].key
    }

    /// The key named `id`.
    pub fn get(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id.as_str() == id).map(|k| &k.key)
    }

    /// Every key, in ring order.
    pub fn keys(&self) -> &[RingKey] {
        &self.keys
    }

    /// Where the ring came from.
    pub fn source(&self) -> &RingSource {
        &self.source
    }

    /// The same ring with every key replaced by its subkey for `purpose` (ids unchanged).
    pub fn derive(&self, purpose: &str) -> KeyRing {
        let keys = self
            .keys
            .iter()
            .map(|k| RingKey { id: k.id.clone(), key: k.key.derive(purpose), created: k.created })
            .collect();
        KeyRing { keys, active: self.active, source: self.source.clone() }
    }

    /// This ring plus `key` (id: its fingerprint), made active.
    pub fn with_new_active(&self, key: Key, now: i64) -> Result<KeyRing, KeyError> {
        let ring = self.with_new_key(key, now)?;
        Ok(KeyRing { active: ring.keys.len() - 1, ..ring })
    }

    /// This ring plus `key` (id: its fingerprint), not active: replicas can decrypt with it
    /// before anything encrypts with it.
    pub fn with_new_key(&self, key: Key, now: i64) -> Result<KeyRing, KeyError> {
        let id = key.fingerprint();
        if self.get(id.as_str()).is_some() {
            return Err(KeyError::DuplicateId(id));
        }
        let mut keys = self.keys.clone();
        keys.push(RingKey { id, key, created: Some(now) });
        Ok(KeyRing { keys, active: self.active, source: self.source.clone() })
    }

    /// This ring with the key `id` active.
    pub fn with_active(&self, id: &str) -> Result<KeyRing, KeyError> {
        Ok(KeyRing { active: self.position(id)?, ..self.clone() })
    }

    fn position(&self, id: &str) -> Result<usize, KeyError> {
        self.keys.iter().position(|k| k.id.as_str() == id).ok_or_else(|| KeyError::NoSuchKey(KeyId(id.into())))
    }

    /// This ring without the key `id`, which must not be the active one.
    pub fn without(&self, id: &str) -> Result<KeyRing, KeyError> {
        let at = self.position(id)?;
        if at == self.active {
            return Err(KeyError::RetireActive(self.active_id().clone()));
        }
        let mut ring = self.clone();
        ring.keys.remove(at);
        ring.active = ring.keys.iter().position(|k| &k.id == self.active_id()).unwrap_or(0);
        Ok(ring)
    }
}

/// Why a key or ring could not be loaded or changed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `PORTCULLIS_MASTER_KEY` is not 32 bytes of base64.
    #[error("{MASTER_KEY_ENV} must be 32 bytes encoded as base64")]
    BadEnv,
    /// `PORTCULLIS_MASTER_KEYS` is malformed.
    #[error("{MASTER_KEYS_ENV} must be id:base64 entries separated by commas (entry {0} is not)")]
    BadEnvRing(usize),
    /// Both environment variables are set.
    #[error("set {MASTER_KEYS_ENV} or {MASTER_KEY_ENV}, not both")]
    BothEnv,
    /// A key id is malformed.
    #[error("key id {0:?} must be 1 to 32 of A-Z a-z 0-9 _ -")]
    BadId(String),
    /// Two keys share an id.
    #[error("key id {0} appears twice in the ring")]
    DuplicateId(KeyId),
    /// No key has this id.
    #[error("no key {0} in the ring")]
    NoSuchKey(KeyId),
    /// The active key cannot be retired.
    #[error("key {0} is the active key; rotate first")]
    RetireActive(KeyId),
    /// A key file is unreadable or malformed.
    #[error("key file {path}: {why}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
}

/// The ring of a long-running process: shared by every task, and reloaded from its source when
/// a ciphertext names a key the process has not seen (another process rotated).
#[derive(Debug, Clone)]
pub struct SharedKeyRing {
    current: Arc<RwLock<Arc<KeyRing>>>,
    data_dir: Option<PathBuf>,
}

impl SharedKeyRing {
    /// Wraps `ring`; `data_dir` is where to reload it from (`None`: never reload).
    pub fn new(ring: KeyRing, data_dir: Option<PathBuf>) -> SharedKeyRing {
        SharedKeyRing { current: Arc::new(RwLock::new(Arc::new(ring))), data_dir }
    }

    /// Loads the ring as [`load_key_ring`] does, remembering where to reload it from.
    pub fn load(data_dir: &Path) -> Result<SharedKeyRing, KeyError> {
        Ok(SharedKeyRing::new(load_key_ring(data_dir)?, Some(data_dir.to_owned())))
    }

    /// The ring as last loaded.
    pub fn current(&self) -> Arc<KeyRing> {
        self.current.read().map(|r| r.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Reads the ring again from its source (a no-op for rings built in memory) and returns it.
    pub fn reload(&self) -> Result<Arc<KeyRing>, KeyError> {
        let Some(dir) = self.data_dir.as_deref().filter(|_| self.current().source() != &RingSource::Memory) else {
            return Ok(self.current());
        };
        let fresh = Arc::new(load_key_ring(dir)?);
        let mut slot = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = fresh.clone();
        tracing::info!(active = %fresh.active_id(), keys = fresh.keys().len(), "reloaded the key ring");
        Ok(fresh)
    }
}
