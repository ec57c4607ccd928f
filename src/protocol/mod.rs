//! The MCP wire vocabulary both sides of the gateway share: JSON-RPC messages as the gateway
//! reads them (`jsonrpc`), the sealed session a client holds (`session`), and the protocol
//! revisions (`version`). It sits below `transport` (the client side) and `upstream` (the
//! server side), and depends on neither.

pub mod fault;
pub mod jsonrpc;
pub mod session;
pub mod version;
