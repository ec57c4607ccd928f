//! Answers for a person who has not connected their account at an OAuth upstream yet (or must
//! connect again). The gateway answers for the upstream: `initialize` and the tool and prompt
//! listings from what the upstream last showed (`mcp::catalog`; resource listings are empty),
//! so a chat host lists the server's real tools; any call returns the connect link, as a URL-mode elicitation (JSON-RPC -32042) when
//! the client declared it, else as a tool result carrying the link, which a model can relay.
//! When the gateway never saw the server's tools, one tool, [`CONNECT_TOOL`], is listed.
//! Once the person connected, `mcp::continuity` opens the upstream behind the same session.

use serde_json::{Value, json};

use super::Server;
use super::catalog::{self, Catalog};
use crate::error::{Failure, GatewayError};
use crate::protocol::jsonrpc::{Kind, Message, result_response};
use crate::upstream::mux::features;
use crate::upstream::{Opened, Reply, UpstreamError};

/// The listings answered for an unconnected person (those not in the catalog are empty).
const LISTINGS: &[&str] = &["tools/list", "prompts/list", "resources/list", "resources/templates/list"];

/// The tool listed for an unconnected person when the server's own tools are not known yet.
pub const CONNECT_TOOL: &str = "connect";

/// Whether `caller` has a usable connection to `server` (an OAuth server). A store failure is
/// an error, not "unconnected".
pub async fn is_connected(server: &Server, caller: &str) -> Result<bool, UpstreamError> {
    let Some(vault) = server.vault() else { return Ok(true) };
    match vault.token(&server.config.name, caller).await {
        Ok(_) => Ok(true),
        Err(crate::vault::VaultError::NotConnected { .. } | crate::vault::VaultError::NeedsReconnect { .. }) => {
            Ok(false)
        }
        Err(e) => Err(UpstreamError::Credential { server: server.config.name.clone(), detail: e.to_string() }),
    }
}

fn note(name: &str) -> String {
    format!("'{name}' needs you to connect your account first: call any of its tools to get the link to open.")
}

/// The `initialize` result of a session opened before the caller connected: the upstream's
/// last one when known (its capabilities, server info and instructions, with a note), else a
/// stand-in that offers tools.
pub async fn initialize_result(server: &Server, protocol: &str) -> Opened {
    let name = &server.config.name;
    let seen = match server.catalog() {
        Some(c) => c.page(catalog::INITIALIZE, "").await,
        None => None,
    };
    let mut result = seen.unwrap_or_else(|| {
        json!({
            "capabilities": {"tools": {"listChanged": true}},
            "serverInfo": {"name": name, "version": "unconnected"},
        })
    });
    let instructions = match result.get("instructions").and_then(Value::as_str) {
        Some(theirs) => format!("{}\n\n{theirs}", note(name)),
        None => note(name),
    };
    result["instructions"] = Value::from(instructions);
    result["protocolVersion"] = Value::from(protocol);
    Opened { upstream_session: None, upstream_protocol: String::new(), result }
}

/// Answers `message` for `caller`, who is not connected to `server`. `client_features` are
/// the client's capability bits (`upstream::mux::features`).
pub async fn answer(server: &Server, caller: &str, client_features: u8, message: &Message) -> Result<Reply, Failure> {
    let id = message.id.clone();
    if message.kind != Kind::Request {
        return Ok(Reply::Accepted);
    }
    #[expect(clippy::result_large_err, reason = "Failure carries the request's JSON id, as everywhere on the dispatch")]
    let reply = |result: Value| {
        let bytes =
            serde_json::to_vec(&result_response(id.as_ref().unwrap_or(&Value::Null), result)).unwrap_or_default();
        Ok(Reply::Json(bytes.into()))
    };
    let method = message.method();
    if method == "ping" {
        return reply(json!({}));
    }
    if let Some(list) = LISTINGS.iter().find(|m| **m == method) {
        let page = message.value().map(|v| catalog::cursor_of(&v)).unwrap_or_default();
        return reply(listing(server.catalog(), &server.config.name, list, &page).await);
    }
    let (reason, link) = connect_link(server, caller).await.map_err(|e| GatewayError::from(e).with_id(id.clone()))?;
    match link {
        Some(link) if method == "tools/call" && client_features & features::ELICITATION_URL == 0 => {
            Ok(link_tool_result(id.as_ref(), &reason, &link))
        }
        link => {
            Err(GatewayError::from(UpstreamError::Authorization { server: server.config.name.clone(), reason, link })
                .with_id(id))
        }
    }
}

/// The listing an unconnected person sees: the page the upstream last showed, else (first
/// page of tools) the connect tool, else an empty page.
async fn listing(catalog: Option<&std::sync::Arc<Catalog>>, name: &str, method: &str, page: &str) -> Value {
    let kept = catalog.filter(|_| catalog::LISTS.contains(&method));
    if let Some(seen) = match kept {
        Some(c) => c.page(method, page).await,
        None => None,
    } {
        return seen;
    }
    match method {
        "tools/list" if page.is_empty() => json!({"tools": [{
            "name": CONNECT_TOOL,
            "title": format!("Connect your {name} account"),
            "description": format!(
                "Returns the link to open in a browser to connect your account at '{name}'. The server's own tools \
                 appear once you are connected."
            ),
            "inputSchema": {"type": "object", "properties": {}},
            "annotations": {"readOnlyHint": true, "openWorldHint": false},
        }]}),
        "tools/list" => json!({"tools": []}),
        "prompts/list" => json!({"prompts": []}),
        "resources/list" => json!({"resources": []}),
        _ => json!({"resourceTemplates": []}),
    }
}

/// Why the caller cannot go on, and the link that fixes it (none for a shared connection,
/// which an administrator makes).
async fn connect_link(server: &Server, caller: &str) -> Result<(String, Option<secrecy::SecretString>), UpstreamError> {
    let name = server.config.name.clone();
    let Some(vault) = server.vault() else {
        let detail = "the server has no upstream OAuth".to_owned();
        return Err(UpstreamError::Credential { server: name, detail });
    };
    if vault.is_shared(&name) {
        let reason = format!("'{name}' is not connected yet: ask an administrator to run `portcullis connect {name}`");
        return Ok((reason, None));
    }
    let subject = vault.subject_for(&name, caller);
    let link = vault
        .link(&name, &subject, None, &[])
        .await
        .map_err(|e| UpstreamError::Credential { server: name.clone(), detail: e.to_string() })?;
    Ok((format!("'{name}' needs you to connect your account first"), Some(link.url)))
}

/// A `tools/call` result that tells the caller to open `link`.
pub fn link_tool_result(id: Option<&Value>, reason: &str, link: &secrecy::SecretString) -> Reply {
    use secrecy::ExposeSecret;
    let text = format!("{reason}. Open this link to connect, then call the tool again: {}", link.expose_secret());
    let result = json!({"content": [{"type": "text", "text": text}], "isError": true});
    let bytes = serde_json::to_vec(&result_response(id.unwrap_or(&Value::Null), result)).unwrap_or_default();
    Reply::Json(bytes.into())
}

/// For a session that was opened unconnected and whose person has connected since: the
/// answer to a call of the stand-in [`CONNECT_TOOL`], unless the upstream's own listing (as
/// last seen) has a tool of that name. `None` for every other message.
pub async fn connected_answer(server: &Server, message: &Message) -> Option<Reply> {
    // Every tool call of such a session comes here: look for the name before parsing.
    let named = std::str::from_utf8(&message.raw).is_ok_and(|text| text.contains(CONNECT_TOOL));
    if message.kind != Kind::Request || message.method() != "tools/call" || !named {
        return None;
    }
    let request = message.value().ok()?;
    if request.pointer("/params/name").and_then(Value::as_str) != Some(CONNECT_TOOL) {
        return None;
    }
    let seen = match server.catalog() {
        Some(c) => c.page("tools/list", "").await,
        None => None,
    };
    let theirs = seen
        .as_ref()
        .and_then(|s| s.get("tools"))
        .and_then(Value::as_array)
        .is_some_and(|tools| tools.iter().any(|t| t.get("name").and_then(Value::as_str) == Some(CONNECT_TOOL)));
    if theirs {
        return None;
    }
    let text =
        format!("Your account at '{}' is connected. List the tools again to see the server's own.", server.config.name);
    let result = json!({"content": [{"type": "text", "text": text}]});
    let bytes = serde_json::to_vec(&result_response(message.id.as_ref().unwrap_or(&Value::Null), result)).ok()?;
    Some(Reply::Json(bytes.into()))
}

/// `reply` preceded by `notifications/tools/list_changed`, so a client that was shown the
/// stand-in listing fetches the upstream's own. The answer then goes back as a short SSE
/// stream.
pub fn with_list_changed(reply: Reply) -> Reply {
    use futures::StreamExt;
    if matches!(reply, Reply::Accepted | Reply::Status(_)) {
        return reply;
    }
    let note = json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"});
    Reply::Messages(Box::pin(futures::stream::once(async move { note }).chain(crate::upstream::messages_of(reply))))
}
