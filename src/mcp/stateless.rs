//! Clients of the stateless 2026-07-28 revision: no `initialize`, no session; every request
//! carries its protocol version and the client's capabilities in `_meta`.
//!
//! Toward an upstream that keeps sessions, the gateway holds one upstream session per server
//! and person for these clients, never shared between two principals (what one person's calls
//! leave in an upstream session is theirs alone) (opened without sampling, elicitation or roots, since the gateway does
//! not yet translate them into 2026-07-28 input requests). `server/discover` is answered from
//! that session's `initialize` result. Results gain the fields the revision requires
//! (`resultType`, and `cacheScope`/`ttlMs` on cacheable results).

use futures::StreamExt;
use http::HeaderMap;
use serde_json::{Value, json};

use super::Server;
use crate::clock::Clock;
use crate::error::{Failure, GatewayError};
use crate::protocol::jsonrpc::{Kind, Message, result_response};
use crate::protocol::version;
use crate::upstream::http::PROTOCOL_HEADER;
use crate::upstream::mux::features;
use crate::upstream::{MessageStream, Reply, UpstreamError, messages_of};

/// `Mcp-Method`: the JSON-RPC method, mirrored in a header by 2026-07-28 clients.
pub const METHOD_HEADER: &str = "mcp-method";

/// Results the 2026-07-28 revision marks cacheable.
const CACHEABLE: &[&str] =
    &["server/discover", "tools/list", "prompts/list", "resources/list", "resources/templates/list"];

/// Whether a POST speaks the stateless revision: its protocol header says so and it carries
/// no session.
pub fn is_stateless(headers: &HeaderMap) -> bool {
    headers.get(PROTOCOL_HEADER).is_some_and(|v| v.as_bytes() == version::STATELESS.as_bytes())
        && headers.get(crate::upstream::http::SESSION_HEADER).is_none()
}

/// Checks what a stateless request's headers say against its body: `Mcp-Method` must name
/// the body's method.
#[expect(
    clippy::result_large_err,
    reason = "Failure carries the request's JSON id, as everywhere on the dispatch; this path is taken once per request"
)]
pub fn check_headers(headers: &HeaderMap, message: &Message) -> Result<(), Failure> {
    if let Some(m) = headers.get(METHOD_HEADER)
        && m.as_bytes() != message.method().as_bytes()
        && message.kind != Kind::Response
    {
        return Err(
            GatewayError::InvalidHeader("Mcp-Method does not match the body's method").with_id(message.id.clone())
        );
    }
    Ok(())
}

/// `server/discover`, answered from the caller's stateless upstream session's `initialize`
/// result (or the stand-in one for a person not connected to an OAuth upstream yet).
pub async fn discover(clock: &Clock, server: &Server, caller: &str, id: Option<&Value>) -> Result<Reply, Failure> {
    let fail = |e: UpstreamError| GatewayError::from(e).with_id(id.cloned());
    let init = match super::unconnected::is_connected(server, caller).await.map_err(fail)? {
        true => server.stateless_session(clock, caller).await.map_err(fail)?.1,
        false => super::unconnected::initialize_result(server, version::STATELESS).await.result,
    };
    let response = result_response(id.unwrap_or(&Value::Null), discover_result(&init));
    Ok(Reply::Json(serde_json::to_vec(&response).unwrap_or_default().into()))
}

/// Relays one stateless message within the caller's own upstream session, and adapts the
/// answer to the revision.
pub async fn relay(clock: &Clock, server: &Server, caller: &str, message: Message) -> Result<Reply, Failure> {
    let id = message.id.clone();
    let fail = |e: UpstreamError| GatewayError::from(e).with_id(id.clone());
    // A person not connected to an OAuth upstream yet: the gateway answers (see `unconnected`).
    let connected = super::unconnected::is_connected(server, caller).await.map_err(fail)?;
    let method = message.method.clone().unwrap_or_default();
    let reply = if connected {
        let url_mode = method == "tools/call" && client_features(&message) & features::ELICITATION_URL != 0;
        let listing = super::catalog::listing_of(&message);
        let reply = send_with_reopen(clock, server, caller, message).await;
        let reply = match reply {
            // A tool call that needs the caller to (re)connect gets the link as a tool result
            // unless the client declared URL-mode elicitation.
            Err(UpstreamError::Authorization { reason, link: Some(link), .. })
                if method == "tools/call" && !url_mode =>
            {
                Ok(super::unconnected::link_tool_result(id.as_ref(), &reason, &link))
            }
            other => other,
        }
        .map_err(fail)?;
        match (listing, server.catalog()) {
            (Some(listing), Some(catalog)) => catalog.tee(listing, reply),
            _ => reply,
        }
    } else {
        super::unconnected::answer(server, caller, client_features(&message), &message).await?
    };
    if id.is_none() {
        return Ok(Reply::Accepted);
    }
    let stream = messages_of(reply)
        .filter_map(move |msg| {
            let adapted = adapt(msg, &method);
            async move { adapted }
        })
        .boxed();
    Ok(Reply::Messages(stream as MessageStream))
}

/// The capability bits (`upstream::mux::features`) a stateless request declares in its
/// `_meta`.
fn client_features(message: &Message) -> u8 {
    message
        .value()
        .ok()
        .and_then(|v| v.pointer("/params/_meta/io.modelcontextprotocol~1clientCapabilities").cloned())
        .map_or(0, |caps| features::from_capabilities(&caps))
}

/// The client's name and version from a stateless request's `_meta` (for the audit log).
pub fn client_of(message: &Message) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        params: Option<Params>,
    }
    #[derive(serde::Deserialize)]
    struct Params {
        #[serde(rename = "_meta")]
        meta: Option<Meta>,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "io.modelcontextprotocol/clientInfo")]
        client_info: Option<Value>,
    }
    let env: Envelope = serde_json::from_slice(&message.raw).ok()?;
    let info = env.params?.meta?.client_info?;
    Some(crate::mcp::client_name_version(&info))
}

/// Sends within the caller's stateless upstream session, reopening it once if the upstream
/// forgot it.
async fn send_with_reopen(
    clock: &Clock,
    server: &Server,
    caller: &str,
    message: Message,
) -> Result<Reply, UpstreamError> {
    let (session, _) = server.stateless_session(clock, caller).await?;
    match server.upstream.send(&session, message.clone()).await {
        Err(UpstreamError::SessionExpired) => {
            server.forget_stateless_session(caller, &session.key);
            let (session, _) = server.stateless_session(clock, caller).await?;
            server.upstream.send(&session, message).await
        }
        other => other,
    }
}

/// The `server/discover` result built from an upstream `initialize` result.
pub fn discover_result(init: &Value) -> Value {
    let mut result = json!({
        "supportedVersions": version::SUPPORTED,
        "capabilities": init.get("capabilities").cloned().unwrap_or_else(|| json!({})),
        "resultType": "complete",
        "cacheScope": "private",
        "ttlMs": 0,
    });
    if let Some(i) = init.get("instructions") {
        result["instructions"] = i.clone();
    }
    if let Some(info) = init.get("serverInfo") {
        result["_meta"] = json!({ "io.modelcontextprotocol/serverInfo": info });
    }
    result
}

/// Adds what the revision requires to a result; drops server-to-client requests, which a
/// stateless client cannot answer on this stream.
fn adapt(mut msg: Value, method: &str) -> Option<Value> {
    if msg.get("method").is_some() && msg.get("id").is_some() {
        return None;
    }
    if let Some(result) = msg.get_mut("result").and_then(Value::as_object_mut) {
        result.entry("resultType").or_insert_with(|| Value::from("complete"));
        if CACHEABLE.contains(&method) {
            result.entry("cacheScope").or_insert_with(|| Value::from("private"));
            result.entry("ttlMs").or_insert_with(|| Value::from(0));
        }
    }
    Some(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_gain_the_fields_the_revision_requires() {
        let r = adapt(json!({"jsonrpc":"2.0","id":1,"result":{"tools":[]}}), "tools/list").expect("kept");
        assert_eq!(r["result"], json!({"tools": [], "resultType": "complete", "cacheScope": "private", "ttlMs": 0}));
        let r = adapt(json!({"jsonrpc":"2.0","id":1,"result":{"content":[]}}), "tools/call").expect("kept");
        assert_eq!(r["result"], json!({"content": [], "resultType": "complete"}));
        assert!(adapt(json!({"jsonrpc":"2.0","id":9,"method":"sampling/createMessage"}), "tools/call").is_none());
    }

    #[test]
    fn discover_is_built_from_initialize() {
        let init =
            json!({"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"x","version":"1"}});
        let d = discover_result(&init);
        assert_eq!(d["capabilities"], json!({"tools": {}}));
        assert_eq!(d["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "x");
        assert!(d["supportedVersions"].as_array().is_some_and(|v| v.contains(&json!("2026-07-28"))));
    }
}
