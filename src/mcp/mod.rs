//! MCP dispatch: the gateway is an MCP server to the client and an MCP client to the upstream.
//! It steps in for the lifecycle (`initialize`, `server/discover`) and relays everything else
//! untouched.

pub mod stateless;
pub mod version;

use serde_json::Value;

use crate::app::{AppState, Server};
use crate::authn::Principal;
use crate::error::{Failure, GatewayError};
use crate::transport::jsonrpc::{Message, result_response};
use crate::transport::session::{SessionState, binding, new_session_key};
use crate::upstream::{ClientHello, Reply};

/// A client's `initialize`: open an upstream session with the client's capabilities, seal
/// the gateway session, and answer with the upstream's server info at the client's revision.
///
/// Returns the response, the session, and its sealed id for the `Mcp-Session-Id` header.
pub async fn initialize(
    app: &AppState,
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
    let opened = server.upstream.open(&hello, &key).await.map_err(|e| fail(e.into()))?;
    // A stateless upstream needs the client's capabilities in every request's `_meta`.
    let hello_kept = (opened.upstream_protocol == version::STATELESS)
        .then(|| serde_json::json!({"capabilities": hello.capabilities, "clientInfo": hello.client_info}));
    let state = SessionState {
        version: 1,
        key,
        client_protocol: protocol.to_owned(),
        upstream_protocol: opened.upstream_protocol,
        upstream_session: opened.upstream_session,
        created: app.clock().unix_secs(),
        hello: hello_kept,
        features: crate::upstream::mux::features::from_capabilities(&hello.capabilities),
        client: Some(client_name_version(&hello.client_info)),
        subject: principal.id.clone(),
    };
    let sealed = app.sealer().seal(&state, &binding(&server.config.name, &principal.id));
    metrics::counter!("portcullis_sessions_opened_total", "server" => server.config.name.clone()).increment(1);
    let mut result = opened.result;
    result["protocolVersion"] = Value::from(protocol);
    let response = result_response(message.id.as_ref().unwrap_or(&Value::Null), result);
    Ok((response, state, sealed))
}

/// Relays one message of an established session.
pub async fn relay(server: &Server, session: &SessionState, message: Message) -> Result<Reply, Failure> {
    let id = message.id.clone();
    server.upstream.send(session, message).await.map_err(|e| GatewayError::from(e).with_id(id))
}

/// `clientInfo`'s name and version, cut to 64 characters each.
pub fn client_name_version(info: &Value) -> (String, String) {
    let field = |k: &str| info.get(k).and_then(Value::as_str).unwrap_or("").chars().take(64).collect::<String>();
    (field("name"), field("version"))
}
