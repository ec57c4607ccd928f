//! MCP: the gateway is an MCP server to the client and an MCP client to the upstream. Every
//! client message goes through [`dispatch::dispatch`]; this module holds the lifecycle
//! (`initialize`) it steps in for, and the parts it uses.

pub mod catalog;
pub mod continuity;
pub mod dispatch;
pub mod guard;
pub mod server;
pub mod stateless;
pub mod unconnected;

use serde_json::Value;

pub use server::Server;

use crate::audit::AuditWriter;
use crate::authn::Principal;
use crate::clock::Clock;
use crate::error::{Failure, GatewayError};
use crate::protocol::jsonrpc::{Message, result_response};
use crate::protocol::session::Sealer;
use crate::protocol::session::{SessionState, binding, new_session_key};
use crate::upstream::ClientHello;

/// What the dispatch needs of the gateway around it.
#[derive(Clone, Copy)]
pub struct Env<'a> {
    /// The clock (session creation times).
    pub clock: &'a Clock,
    /// Seals and opens session ids.
    pub sealer: &'a Sealer,
    /// The audit writer, when the audit log is on: with strict durability, a call whose record
    /// could not be kept is refused before it is forwarded.
    pub audit: Option<&'a AuditWriter>,
    /// The policies in force (`guard` takes the decisions).
    pub policy: &'a crate::policy::Policies,
    /// Every configured server's name: what a grant token not limited to some reaches.
    pub servers: &'a std::sync::Arc<[String]>,
}

/// A client's `initialize`: open an upstream session with the client's capabilities, seal
/// the gateway session, and answer with the upstream's server info at the client's revision.
///
/// Returns the response, the session, and its sealed id for the `Mcp-Session-Id` header.
pub async fn initialize(
    env: Env<'_>,
    server: &Server,
    principal: &Principal,
    message: &Message,
) -> Result<(Value, SessionState, String), Failure> {
    let id = message.id.clone();
    let fail = |e: GatewayError| e.with_id(id.clone());
    let request = message.value().map_err(|e| fail(e.into()))?;
    let params = request.get("params").cloned().unwrap_or(Value::Null);
    let requested = params
        .get("protocolVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| fail(GatewayError::InvalidParams("initialize needs params.protocolVersion".into())))?;
    let protocol = version::negotiate(requested);
    let hello = ClientHello {
        protocol: protocol.to_owned(),
        capabilities: params.get("capabilities").cloned().unwrap_or_else(|| serde_json::json!({})),
        client_info: params
            .get("clientInfo")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"name": "unknown", "version": "0"})),
        caller: principal.id.clone(),
    };
    let key = new_session_key();
    // An OAuth upstream the caller has not connected yet: the gateway answers for it (see
    // `unconnected`), and opens the upstream side behind this same session once they have.
    let connected = unconnected::is_connected(server, &principal.id).await.map_err(|e| fail(e.into()))?;
    let (opened, pending) = if connected {
        match server.upstream.open(&hello, &key).await {
            Ok(opened) => (opened, false),
            Err(crate::upstream::UpstreamError::Authorization { .. }) => {
                (unconnected::initialize_result(server, protocol).await, true)
            }
            Err(e) => return Err(fail(e.into())),
        }
    } else {
        (unconnected::initialize_result(server, protocol).await, true)
    };
    if let (Some(catalog), false) = (server.catalog(), pending) {
        catalog.observe(catalog::INITIALIZE, "", &opened.result);
    }
    // A stateless upstream needs the client's capabilities in every request's `_meta`; an
    // OAuth upstream may have to be opened again behind this session (`continuity`).
    let keep_hello = opened.upstream_protocol == version::STATELESS || server.continuity().is_some();
    let state = SessionState {
        version: 1,
        key,
        client_protocol: protocol.to_owned(),
        upstream_protocol: opened.upstream_protocol,
        upstream_session: opened.upstream_session,
        created: env.clock.unix_secs(),
        hello: keep_hello.then(|| kept_hello(&hello)),
        features: crate::upstream::mux::features::from_capabilities(&hello.capabilities),
        client: Some(client_name_version(&hello.client_info)),
        subject: principal.id.clone(),
        pending,
    };
    let sealed = env.sealer.seal(&state, &binding(&server.config.name, &principal.id));
    metrics::counter!("portcullis_sessions_opened_total", "server" => server.config.name.clone()).increment(1);
    let mut result = opened.result;
    result["protocolVersion"] = Value::from(protocol);
    let response = result_response(message.id.as_ref().unwrap_or(&Value::Null), result);
    Ok((response, state, sealed))
}

/// Largest client `initialize` kept whole in a sealed session id.
const HELLO_KEPT_BYTES: usize = 1024;

/// The client's `{capabilities, clientInfo}` as kept in its sealed session: whole when small,
/// else only the standard capabilities and the client's name and version (the id travels in
/// every request's headers).
fn kept_hello(hello: &ClientHello) -> Value {
    let whole = serde_json::json!({"capabilities": hello.capabilities, "clientInfo": hello.client_info});
    if serde_json::to_vec(&whole).map_or(usize::MAX, |v| v.len()) <= HELLO_KEPT_BYTES {
        return whole;
    }
    let (name, version) = client_name_version(&hello.client_info);
    let bits = crate::upstream::mux::features::from_capabilities(&hello.capabilities);
    serde_json::json!({
        "capabilities": crate::upstream::mux::features::to_capabilities(bits),
        "clientInfo": {"name": name, "version": version},
    })
}

/// `clientInfo`'s name and version, cut to 64 characters each.
pub fn client_name_version(info: &Value) -> (String, String) {
    let field = |k: &str| info.get(k).and_then(Value::as_str).unwrap_or("").chars().take(64).collect::<String>();
    (field("name"), field("version"))
}

pub use crate::protocol::version;
