//! `[audit]`: the settings of the audit log (`audit`).

use std::path::PathBuf;

use serde::Deserialize;

/// The key names redacted when `[audit] redact_keys` is not set.
pub const DEFAULT_REDACT_KEYS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "access_token",
    "refresh_token",
    "client_secret",
    "private_key",
    "credential",
    "cookie",
    "session",
];

/// How long a call waits for its audit record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Answer at once; the record is committed in the next batch (within about 50 ms).
    #[default]
    Async,
    /// Answer only after the batch holding the call's record has committed.
    Strict,
}

/// `[audit]`: the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write a record for every MCP exchange. Turning it off is for benchmarks of the bare
    /// relay and for development; the gateway warns at start when it is off. Default `true`.
    pub enabled: bool,
    /// `"async"` (answer at once, the record follows within about 50 ms) or `"strict"` (answer
    /// only once the record is committed). Default `"async"`.
    pub durability: Durability,
    /// Records queued in memory for the writer. When they are all taken, an `async` call waits
    /// for room (up to 100 ms, while the store is committing: `portcullis_audit_waits_total`),
    /// then its record spills to the overflow queue (`portcullis_audit_overflow_total`). At
    /// least 1. Default `1024` (under a megabyte at full).
    pub capacity: usize,
    /// Bytes the overflow queue may hold (records estimated by their fields). Past it, in
    /// `strict` durability a call is answered 503 with `Retry-After`; in `async` the record is
    /// shed and counted (`portcullis_audit_shed_total`), and a record of how many were shed is
    /// written once the store takes records again. At least 1024. Default `67108864` (64 MiB).
    pub max_overflow_bytes: usize,
    /// Argument keys whose values are replaced by `"[REDACTED]"`: case-insensitive, matched
    /// anywhere in the key, ignoring `-` and `_`. Setting it replaces the default list. Default
    /// `["password", "passwd", "pwd", "passphrase", "secret", "token", "api_key", "apikey",
    /// "authorization", "access_token", "refresh_token", "client_secret", "private_key",
    /// "credential", "cookie", "session"]`.
    pub redact_keys: Vec<String>,
    /// How often the chain's head is signed and appended to `checkpoint_file` (only when it
    /// moved), so that a log cut or rolled back behind a checkpoint is detected by `audit
    /// verify --checkpoints`. A duration (`"60s"`, `"5m"`); `"0s"` turns checkpoints off.
    /// Default `"60s"`.
    pub checkpoint_interval: String,
    /// Where checkpoints are appended (created with mode 0600). Keep it where the database's
    /// administrators cannot write, or ship its lines (also logged) elsewhere. Default
    /// `{data_dir}/audit-checkpoints.jsonl`.
    pub checkpoint_file: Option<PathBuf>,
}

/// The default `[audit] checkpoint_interval`.
pub const DEFAULT_CHECKPOINT_INTERVAL: &str = "60s";

/// The checkpoint file's name in the data directory when `[audit] checkpoint_file` is unset.
pub const DEFAULT_CHECKPOINT_FILE: &str = "audit-checkpoints.jsonl";

/// The default `[audit] capacity`.
pub const DEFAULT_CAPACITY: usize = 1_024;
/// The default `[audit] max_overflow_bytes`: 64 MiB.
pub const DEFAULT_MAX_OVERFLOW_BYTES: usize = 64 * 1024 * 1024;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            durability: Durability::Async,
            capacity: DEFAULT_CAPACITY,
            max_overflow_bytes: DEFAULT_MAX_OVERFLOW_BYTES,
            redact_keys: DEFAULT_REDACT_KEYS.iter().map(|k| (*k).to_owned()).collect(),
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL.to_owned(),
            checkpoint_file: None,
        }
    }
}

impl AuditConfig {
    /// Every problem with these settings, one line each, for the config validator.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.capacity == 0 {
            problems.push("audit.capacity must be at least 1".to_owned());
        }
        if self.max_overflow_bytes < 1024 {
            problems.push("audit.max_overflow_bytes must be at least 1024".to_owned());
        }
        if self.redact_keys.iter().any(|k| k.chars().all(|c| matches!(c, '-' | '_' | ' '))) {
            problems.push("audit.redact_keys must not contain empty names".to_owned());
        }
        if super::parse_duration(&self.checkpoint_interval).is_none() {
            problems.push(format!(
                "audit.checkpoint_interval: {:?} is not a duration like \"60s\" (\"0s\" turns checkpoints off)",
                self.checkpoint_interval
            ));
        }
        if self.checkpoint_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            problems.push("audit.checkpoint_file must not be empty".to_owned());
        }
        problems
    }

    /// How often to write checkpoints; `None` when they are off (or the interval is invalid,
    /// which the validator reports).
    pub fn checkpoint_every(&self) -> Option<std::time::Duration> {
        super::parse_duration(&self.checkpoint_interval).filter(|d| !d.is_zero())
    }

    /// The checkpoint file for a gateway whose data directory is `data_dir`.
    pub fn checkpoint_path(&self, data_dir: &std::path::Path) -> PathBuf {
        self.checkpoint_file.clone().unwrap_or_else(|| data_dir.join(DEFAULT_CHECKPOINT_FILE))
    }
}
