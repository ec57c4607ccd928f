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
    let (opened, pending) = match server.upstream.open(&hello, &key).await {
        Ok(opened) => (opened, false),
        // An OAuth upstream the caller has not connected yet: open a session the gateway
        // answers for, so the client starts and the caller gets the link on a tool call.
        Err(crate::upstream::UpstreamError::Authorization { .. }) => (unconnected(server, protocol), true),
        Err(e) => return Err(fail(e.into())),
    };
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
        pending,
    };
    let sealed = app.sealer().seal(&state, &binding(&server.config.name, &principal.id));
    metrics::counter!("portcullis_sessions_opened_total", "server" => server.config.name.clone()).increment(1);
    let mut result = opened.result;
    result["protocolVersion"] = Value::from(protocol);
    let response = result_response(message.id.as_ref().unwrap_or(&Value::Null), result);
    Ok((response, state, sealed))
}

/// The `initialize` result of a session opened before the caller connected (the upstream's
/// own arrives once they have).
fn unconnected(server: &Server, protocol: &str) -> crate::upstream::Opened {
    let name = &server.config.name;
    crate::upstream::Opened {
        upstream_session: None,
        upstream_protocol: String::new(),
        result: serde_json::json!({
            "protocolVersion": protocol,
            "capabilities": {"tools": {"listChanged": true}},
            "serverInfo": {"name": name, "version": "unconnected"},
            "instructions": format!("'{name}' needs you to connect your account first: call any of its tools to get the link."),
        }),
    }
}

/// Answers for a session opened before the caller connected (see
/// [`SessionState::pending`]): empty lists, and on a tool call the connect link, as a
/// URL-mode elicitation (JSON-RPC -32042) when the client declared it, else as a tool error
/// carrying the link. Once the caller is connected, the session ends (404): the client
/// initializes again and reaches the upstream.
async fn unconnected_answer(server: &Server, session: &SessionState, message: Message) -> Result<Reply, Failure> {
    use crate::transport::jsonrpc::Kind;
    use crate::upstream::UpstreamError;
    let id = message.id.clone();
    let name = server.config.name.clone();
    let Some(vault) = server.vault() else {
        return Err(GatewayError::from(UpstreamError::SessionExpired).with_id(id));
    };
    if vault.token(&name, &session.subject).await.is_ok() {
        return Err(GatewayError::from(UpstreamError::SessionExpired).with_id(id));
    }
    if message.kind != Kind::Request {
        return Ok(Reply::Accepted);
    }
    let reply = |result: Value| {
        let bytes =
            serde_json::to_vec(&result_response(id.as_ref().unwrap_or(&Value::Null), result)).unwrap_or_default();
        Ok(Reply::Json(bytes.into()))
    };
    let empty = |key: &str| serde_json::json!({ key: [] });
    match message.method() {
        "ping" => reply(serde_json::json!({})),
        "tools/list" => reply(empty("tools")),
        "prompts/list" => reply(empty("prompts")),
        "resources/list" => reply(empty("resources")),
        "resources/templates/list" => reply(empty("resourceTemplates")),
        method => {
            let subject = vault.subject_for(&name, &session.subject);
            let shared = vault.is_shared(&name);
            let (reason, link) = if shared {
                (
                    format!("'{name}' is not connected yet: ask an administrator to run `portcullis connect {name}`"),
                    None,
                )
            } else {
                let link = vault.link(&name, &subject, None, &[]).await.map_err(|e| {
                    GatewayError::from(UpstreamError::Credential { server: name.clone(), detail: e.to_string() })
                        .with_id(id.clone())
                })?;
                (format!("'{name}' needs you to connect your account first"), Some(link.url))
            };
            let url_mode = session.features & crate::upstream::mux::features::ELICITATION_URL != 0;
            match link {
                Some(link) if method == "tools/call" && !url_mode => Ok(link_tool_error(id.as_ref(), &reason, &link)),
                link => {
                    Err(GatewayError::from(UpstreamError::Authorization { server: name, reason, link }).with_id(id))
                }
            }
        }
    }
}

/// Relays one message of an established session.
pub async fn relay(server: &Server, session: &SessionState, message: Message) -> Result<Reply, Failure> {
    if session.pending {
        return unconnected_answer(server, session, message).await;
    }
    let id = message.id.clone();
    let tool_call = message.method() == "tools/call";
    match server.upstream.send(session, message).await {
        // A tool call that needs the caller to (re)connect: a URL-mode elicitation for clients
        // that declared it, a tool error carrying the link for the others.
        Err(crate::upstream::UpstreamError::Authorization { reason, link: Some(link), .. })
            if tool_call && session.features & crate::upstream::mux::features::ELICITATION_URL == 0 =>
        {
            Ok(link_tool_error(id.as_ref(), &reason, &link))
        }
        other => other.map_err(|e| GatewayError::from(e).with_id(id)),
    }
}

/// A `tools/call` result that tells the caller to open `link`.
fn link_tool_error(id: Option<&Value>, reason: &str, link: &secrecy::SecretString) -> Reply {
    use secrecy::ExposeSecret;
    let text = format!("{reason}. Open this link to connect, then call the tool again: {}", link.expose_secret());
    let result = serde_json::json!({"content": [{"type": "text", "text": text}], "isError": true});
    let bytes = serde_json::to_vec(&result_response(id.unwrap_or(&Value::Null), result)).unwrap_or_default();
    Reply::Json(bytes.into())
}

/// `clientInfo`'s name and version, cut to 64 characters each.
pub fn client_name_version(info: &Value) -> (String, String) {
    let field = |k: &str| info.get(k).and_then(Value::as_str).unwrap_or("").chars().take(64).collect::<String>();
    (field("name"), field("version"))
}
