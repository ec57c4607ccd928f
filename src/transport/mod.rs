//! The client-facing side: Streamable HTTP endpoints, the legacy HTTP+SSE transport, the
//! connect pages, the DNS-rebinding guard, and the exchange each request leaves in the metrics
//! and the audit log.

pub mod connect;
pub mod exchange;
pub mod http;
pub mod legacy_sse;
pub mod reply;

// Their home is `protocol`, below both sides; these paths stay for a while.
pub use crate::protocol::{jsonrpc, session};
