//! The client-facing side: Streamable HTTP endpoints, the JSON-RPC envelope, sealed sessions
//! and the DNS-rebinding guard.

pub mod connect;
pub mod exchange;
pub mod http;
pub mod jsonrpc;
pub mod legacy_sse;
pub mod origin;
pub mod reply;
pub mod session;
