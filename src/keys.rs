//! The master key and the keys derived from it.
//!
//! The master key comes from `PORTCULLIS_MASTER_KEY` (32 bytes, base64) or from
//! `{data_dir}/master.key`, created with mode 0600 on first start. Every replica that shares a
//! store must share the master key: sealed session ids are decoded with a key derived from it.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

/// Environment variable holding the base64 master key.
pub const MASTER_KEY_ENV: &str = "PORTCULLIS_MASTER_KEY";

/// 32 secret bytes. `Debug` never shows them.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(redacted)")
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
}

/// Why the master key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The environment variable is not 32 bytes of base64.
    #[error("{MASTER_KEY_ENV} must be 32 bytes encoded as base64")]
    BadEnv,
    /// The key file is unreadable or malformed.
    #[error("key file {path}: {why}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
}

/// Loads the master key from the environment or the key file, creating the file if needed.
pub fn load_master_key(data_dir: &Path) -> Result<Key, KeyError> {
    if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
        return decode(&text).ok_or(KeyError::BadEnv);
    }
    let path = data_dir.join("master.key");
    let file_err = |why: String| KeyError::File { path: path.display().to_string(), why };
    match std::fs::read_to_string(&path) {
        Ok(text) => decode(&text).ok_or_else(|| file_err("not 32 bytes of base64".to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(|e| file_err(e.to_string()))?;
            let key = Key::random();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&path).map_err(|e| file_err(e.to_string()))?;
            writeln!(f, "{}", STANDARD.encode(key.0)).map_err(|e| file_err(e.to_string()))?;
            tracing::info!(path = %path.display(), "created a new master key file");
            Ok(key)
        }
        Err(e) => Err(file_err(e.to_string())),
    }
}

fn decode(text: &str) -> Option<Key> {
    let bytes = STANDARD.decode(text.trim()).ok()?;
    Some(Key(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_master_key(dir.path()).expect("created");
        let b = load_master_key(dir.path()).expect("reused");
        assert_eq!(a.bytes(), b.bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("master.key")).expect("exists").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(format!("{a:?}"), "Key(redacted)");
        assert_ne!(a.derive("x").bytes(), a.derive("y").bytes());
    }
}
