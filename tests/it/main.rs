//! Integration tests: one binary, one module per suite. Each test starts real gateways and
//! real upstream servers on loopback.

mod audit;
mod audit_integrity;
mod audit_path;
mod bounds;
mod common;
mod conformance;
mod egress;
mod errors;
mod fail_closed;
mod http2;
mod identity;
mod layers;
mod parsers;
mod pipeline;
mod policy;
mod protocol;
mod refusals;
mod relay;
mod secrets;
mod startup;
mod structure;
mod upstream_auth;
mod vault_e2e;
mod vault_sessions;
mod vault_store;
