//! Where rings live: the environment, `keys.json`, `master.key`; loading, creating and saving.

use std::io::Write;
use std::path::Path;

use secrecy::zeroize::{Zeroize, Zeroizing};
use serde::{Deserialize, Serialize};

use super::{KEY_FILE, Key, KeyError, KeyId, KeyRing, MASTER_KEY_ENV, MASTER_KEYS_ENV, RING_FILE, RingKey, RingSource};

impl KeyRing {
    /// Writes the ring to `{data_dir}/keys.json` (mode 0600, replaced atomically).
    pub fn save(&self, data_dir: &Path) -> Result<KeyRing, KeyError> {
        let path = data_dir.join(RING_FILE);
        let file = RingFileFormat {
            version: 1,
            active: self.active_id().to_string(),
            keys: self
                .keys
                .iter()
                .map(|k| RingFileKey { id: k.id.to_string(), key: k.key.to_base64().to_string(), created: k.created })
                .collect(),
        };
        let mut text = Zeroizing::new(serde_json::to_string_pretty(&file).map_err(|e| file_err(&path, e))?);
        text.push('\n');
        drop(file);
        write_private(&path, text.as_bytes())?;
        Ok(KeyRing { source: RingSource::RingFile(path), ..self.clone() })
    }
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> KeyError {
    KeyError::File { path: path.display().to_string(), why: why.to_string() }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RingFileFormat {
    version: u32,
    active: String,
    keys: Vec<RingFileKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RingFileKey {
    id: String,
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<i64>,
}

impl Drop for RingFileKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// Loads the ring from the environment or the data directory, creating `master.key` if no
/// source exists yet.
pub fn load_key_ring(data_dir: &Path) -> Result<KeyRing, KeyError> {
    let ring = Zeroizing::new(std::env::var(MASTER_KEYS_ENV).unwrap_or_default());
    let key = Zeroizing::new(std::env::var(MASTER_KEY_ENV).unwrap_or_default());
    load_key_ring_from(
        data_dir,
        Some(ring.as_str()).filter(|s| !s.is_empty()),
        Some(key.as_str()).filter(|s| !s.is_empty()),
    )
}

/// Like [`load_key_ring`] with the two environment values given (`None` when unset).
pub fn load_key_ring_from(data_dir: &Path, env_ring: Option<&str>, env_key: Option<&str>) -> Result<KeyRing, KeyError> {
    match (env_ring, env_key) {
        (Some(_), Some(_)) => return Err(KeyError::BothEnv),
        (Some(text), None) => return parse_env_ring(text),
        (None, Some(text)) => {
            let key = Key::from_base64(text).ok_or(KeyError::BadEnv)?;
            return Ok(KeyRing { source: RingSource::EnvKey, ..KeyRing::single(key) });
        }
        (None, None) => {}
    }
    let ring_path = data_dir.join(RING_FILE);
    match std::fs::read_to_string(&ring_path) {
        Ok(text) => return parse_ring_file(&ring_path, &Zeroizing::new(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_err(&ring_path, e)),
    }
    load_or_create_key_file(data_dir)
}

fn parse_env_ring(text: &str) -> Result<KeyRing, KeyError> {
    let mut keys = Vec::new();
    for (i, entry) in text.split(',').map(str::trim).filter(|e| !e.is_empty()).enumerate() {
        let (id, b64) = entry.split_once(':').ok_or(KeyError::BadEnvRing(i + 1))?;
        let key = Key::from_base64(b64).ok_or(KeyError::BadEnvRing(i + 1))?;
        keys.push(RingKey { id: KeyId::parse(id)?, key, created: None });
    }
    let active = keys.first().map(|k| k.id.clone()).ok_or(KeyError::BadEnvRing(1))?;
    Ok(KeyRing { source: RingSource::EnvRing, ..KeyRing::new(keys, &active)? })
}

fn parse_ring_file(path: &Path, text: &str) -> Result<KeyRing, KeyError> {
    // serde_json's messages can quote the input; name the place only.
    let file: RingFileFormat = serde_json::from_str(text)
        .map_err(|e| file_err(path, format!("not a ring file (line {}, column {})", e.line(), e.column())))?;
    if file.version != 1 {
        return Err(file_err(path, format!("unsupported version {}", file.version)));
    }
    let mut keys = Vec::with_capacity(file.keys.len());
    for k in &file.keys {
        let key = Key::from_base64(&k.key)
            .ok_or_else(|| file_err(path, format!("key {:?} is not 32 bytes of base64", k.id)))?;
        keys.push(RingKey { id: KeyId::parse(&k.id)?, key, created: k.created });
    }
    let ring = KeyRing::new(keys, &KeyId::parse(&file.active)?).map_err(|e| file_err(path, e))?;
    Ok(KeyRing { source: RingSource::RingFile(path.to_owned()), ..ring })
}

fn load_or_create_key_file(data_dir: &Path) -> Result<KeyRing, KeyError> {
    let path = data_dir.join(KEY_FILE);
    let read = |path: &Path| -> Result<KeyRing, KeyError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| file_err(path, e))?);
        let key = Key::from_base64(&text).ok_or_else(|| file_err(path, "not 32 bytes of base64"))?;
        Ok(KeyRing { source: RingSource::KeyFile(path.to_owned()), ..KeyRing::single(key) })
    };
    if path.exists() {
        return read(&path);
    }
    let key = Key::random();
    let mut text = key.to_base64();
    text.push('\n');
    // Processes that start together on a fresh data directory race here: each writes its key
    // whole to a file of its own, then links it into place, which fails if the name exists.
    // One key wins, and no reader ever sees a half-written file.
    let tmp = write_temp(&path, text.as_bytes())?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), key_id = %key.fingerprint(), "created a new master key file");
            Ok(KeyRing { source: RingSource::KeyFile(path), ..KeyRing::single(key) })
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(&path),
        // A filesystem without hard links (some network and FUSE mounts): create the file
        // itself exclusively instead. A process starting at the very same moment could then
        // read it before its one short write lands; it fails with a clear error and a restart
        // reads the whole key.
        Err(_) => {
            let created =
                create_private(&path).and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()));
            match created {
                Ok(()) => Ok(KeyRing { source: RingSource::KeyFile(path.clone()), ..KeyRing::single(key) }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(&path),
                Err(e) => Err(file_err(&path, e)),
            }
        }
    }
}

fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

/// Writes `bytes` to a fresh 0600 file beside `path`, then renames it over `path`, so readers
/// see the old ring or the new one, never half of one.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let tmp = write_temp(path, bytes)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_err(path, e));
    }
    Ok(())
}

/// Writes `bytes` to a fresh 0600 file with a random name beside `path` (creating the
/// directory), synced to disk, and returns its name.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<std::path::PathBuf, KeyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // The data directory holds the keys: when it is created here, only its owner may enter.
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| file_err(dir, e))?;
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| file_err(path, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}", suffix.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    let written = create_private(&tmp).and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_err(path, e));
    }
    Ok(tmp)
}
