//! The audit log: one [`Record`] per MCP request, including denials and errors.
//!
//! - `record`: what the request path fills in, and [`Entry`], the stored, chained form.
//! - `redact`: secrets out of arguments (key names, token patterns, URL passwords, PEM keys),
//!   before anything is stored.
//! - `chain`: the SHA-256 hash chain and [`verify`], which names the first bad record.
//! - `writer`: [`AuditWriter`], the non-blocking batched writer (one per process and store).
//! - `checkpoint`: signed checkpoints of the chain's head, kept outside the database.
//! - `time`: RFC 3339 in and out, for the CLI.
//!
//! `docs/audit.md` describes the record fields, the chain, the durability modes and the
//! overflow policy for operators.

mod chain;
pub mod checkpoint;
pub(crate) mod record;
mod redact;
pub mod segment;
pub mod storage;
pub mod time;
mod writer;

#[cfg(test)]
mod tests;

pub use crate::config::{
    AuditConfig, DEFAULT_CAPACITY, DEFAULT_CHECKPOINT_FILE, DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_MAX_OVERFLOW_BYTES,
    DEFAULT_REDACT_KEYS, Durability,
};
pub(crate) use chain::seal;
pub use chain::{Anchors, Break, BreakKind, GENESIS, Verification, entry_hash, hex, verify, verify_anchored};
pub use record::{Arguments, Decision, Entry, Record};
pub use redact::{REDACTED, Redactor};
pub use writer::{AuditWriter, WriterStats};

/// The method of the record that says how many records were shed.
pub const SHED_METHOD: &str = "audit/shed";

/// Why an audit operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store refused a query.
    #[error("audit store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The batch holding a strict record failed to commit; the writer keeps retrying it.
    #[error("audit record not committed: {0}")]
    NotCommitted(String),
    /// The writer has shut down, so the record was not accepted (and was counted as dropped).
    #[error("the audit writer has shut down")]
    Closed,
    /// The overflow queue is full (`max_overflow_bytes`: the store is slow or down), so a
    /// `strict` record was not accepted; the call is answered 503 with `Retry-After`.
    #[error("the audit queue is full (audit.max_overflow_bytes): the store is slow or unavailable")]
    Full,
    /// The last checkpoint of the chain's head could not be written (`audit.checkpoint_file`),
    /// so the log's tail is not protected: `strict` calls are refused (503) until one is.
    #[error("the audit checkpoint file cannot be written (audit.checkpoint_file): the log's tail is not protected")]
    Unprotected,
}
