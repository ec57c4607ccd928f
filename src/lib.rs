//! Portcullis: an MCP gateway. Clients hold one gateway credential; the gateway relays MCP to
//! upstream servers over HTTP and stdio. The modules follow the path of a request:
//! `transport` → `mcp` → `upstream`, with `app` wiring them together.

pub mod app;
pub mod audit;
pub mod authn;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod keys;
pub mod layers;
pub mod listener;
pub mod mcp;
pub mod net;
pub mod oauth;
pub mod origin;
pub mod policy;
pub mod protocol;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod upstream;
pub mod vault;
