//! The dispatch's policy steps (`policy`): the decision points, where a message is allowed
//! or refused before it is forwarded, and the filter points, where a listing loses what the
//! caller may not use.
//!
//! A refusal answers exactly as an upstream answers a name it does not know (the JSON-RPC
//! errors of the MCP specification: `-32602 Unknown tool: x`, `-32602 Unknown prompt: x`,
//! `-32002 Resource not found`), so that a denied item and a missing one look alike. The
//! decision, with the policies that made it, goes into the message's trace and from there
//! into its audit record.

use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;

use super::Server;
use super::dispatch::{Call, Trace, Via};
use crate::policy::{Act, Args, Ask, Policies};
use crate::protocol::jsonrpc::{Message, error_response};
use crate::upstream::{Reply, messages_of};

/// JSON-RPC code of an unknown tool or prompt, or invalid params (MCP specification).
const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC code of a resource that does not exist (MCP specification).
const RESOURCE_NOT_FOUND: i64 = -32002;

/// What a policy decided about a message, for its audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether it was allowed.
    pub allowed: bool,
    /// The policies that made the decision (`builtin` for the built-in rule).
    pub policies: Vec<String>,
    /// The JSON-RPC code the refusal answered with.
    pub code: Option<i64>,
}

/// Who asks, with everything a decision needs but the act, owned: listings are filtered as
/// their answer streams, after the dispatch has returned.
#[derive(Clone)]
pub struct Asker {
    policies: Policies,
    principal: crate::authn::Principal,
    server: Arc<Server>,
    client: Option<(String, String)>,
    servers: Arc<[String]>,
    now_ms: i64,
}

impl Asker {
    /// The caller of `call`.
    pub fn of(call: &Call<'_>) -> Asker {
        let client = match call.via {
            Via::Session(s) => s.client.clone(),
            Via::Opening | Via::Stateless(_) => None,
        };
        Asker {
            policies: call.env.policy.clone(),
            principal: call.caller.clone(),
            server: call.server.clone(),
            client,
            servers: call.caller.servers.clone().unwrap_or_else(|| call.env.servers.clone()),
            now_ms: call.env.clock.unix_millis(),
        }
    }

    fn ask<'a>(&'a self, act: Act<'a>) -> Ask<'a> {
        Ask {
            principal: &self.principal,
            server: &self.server.config.name,
            trusted: self.server.config.trusted,
            act,
            client: self.client.as_ref().map(|(n, v)| (n.as_str(), v.as_str())),
            servers: &self.servers,
            now_ms: self.now_ms,
        }
    }

    /// Decides `act`; a refusal is counted and logged at debug.
    pub fn decide(&self, act: Act<'_>) -> crate::policy::Decision {
        let action = act.action();
        let decision = self.policies.decide(&self.ask(act));
        if !decision.errors.is_empty() {
            metrics::counter!("portcullis_policy_errors_total").increment(1);
            tracing::warn!(action, server = %self.server.config.name, errors = ?decision.errors, "a policy failed while deciding: denied");
        }
        let outcome = if decision.allowed { "allow" } else { "deny" };
        metrics::counter!("portcullis_policy_decisions_total", "action" => action, "decision" => outcome).increment(1);
        decision
    }

    /// Whether a listing shows an item that `act` (with unknown arguments) would use.
    fn may_list(&self, act: Act<'_>) -> bool {
        self.policies.may_list(&self.ask(act))
    }
}

/// The decision point of a message that names an item (a tool, a prompt, a resource):
/// `None` when it may go on, else the answer that refuses it. Other messages go on (the
/// session was allowed when it was opened).
pub fn check(call: &Call<'_>, message: &Message, trace: &mut Trace) -> Option<Reply> {
    if matches!(call.env.policy, Policies::Builtin) {
        return None;
    }
    let asker = Asker::of(call);
    let id = message.id.as_ref();
    let (decision, refusal) = match message.method() {
        "tools/call" => {
            let tool = trace.tool.as_ref()?;
            let annotations = call.server.tool_annotations(&tool.name);
            let act = Act::CallTool {
                name: &tool.name,
                args: Args::Known(tool.arguments.as_ref()),
                annotations: annotations.as_ref(),
            };
            (asker.decide(act), (INVALID_PARAMS, format!("Unknown tool: {}", tool.name)))
        }
        "prompts/get" => {
            let params = message.params().unwrap_or(Value::Null);
            let name = params.get("name").and_then(Value::as_str).unwrap_or_default();
            let act = Act::GetPrompt { name, args: Args::Known(params.get("arguments")) };
            (asker.decide(act), (INVALID_PARAMS, format!("Unknown prompt: {name}")))
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            let params = message.params().unwrap_or(Value::Null);
            let uri = params.get("uri").and_then(Value::as_str).unwrap_or_default();
            (asker.decide(Act::ReadResource { uri }), (RESOURCE_NOT_FOUND, "Resource not found".to_owned()))
        }
        "completion/complete" => {
            // A completion names a prompt or a resource: it is allowed when they are.
            let params = message.params().unwrap_or(Value::Null);
            let r = &params["ref"];
            let allowed = match r["type"].as_str() {
                Some("ref/prompt") => {
                    let name = r["name"].as_str().unwrap_or_default();
                    asker.may_list(Act::GetPrompt { name, args: Args::Unknown })
                }
                Some("ref/resource") => {
                    let uri = r["uri"].as_str().unwrap_or_default();
                    asker.decide(Act::ReadResource { uri }).allowed
                }
                _ => false,
            };
            let decision = crate::policy::Decision { allowed, policies: Vec::new(), errors: Vec::new() };
            (decision, (INVALID_PARAMS, "Unknown reference".to_owned()))
        }
        _ => return None,
    };
    let (code, text) = refusal;
    trace.policy = Some(Verdict {
        allowed: decision.allowed,
        policies: decision.policies,
        code: (!decision.allowed).then_some(code),
    });
    if decision.allowed {
        return None;
    }
    let body = serde_json::to_vec(&error_response(id, code, &text)).unwrap_or_default();
    Some(Reply::Json(body.into()))
}

/// The decision point of `initialize` (and of each stateless request): may the caller use
/// this server at all? `false` is answered as an unknown server is.
pub fn may_connect(call: &Call<'_>, trace: &mut Trace) -> bool {
    if matches!(call.env.policy, Policies::Builtin) {
        return true;
    }
    let decision = Asker::of(call).decide(Act::Connect);
    let allowed = decision.allowed;
    trace.policy = Some(Verdict { allowed, policies: decision.policies, code: None });
    allowed
}

/// The filter point of a listing: the answer to `method` without what the caller may not
/// use. A listing the caller may not see at all (`list_tools` denied) is empty.
pub fn filter(call: &Call<'_>, method: &'static str, reply: Reply) -> Reply {
    if matches!(call.env.policy, Policies::Builtin) {
        return reply;
    }
    let asker = Arc::new(Asker::of(call));
    let whole = method != "tools/list" || asker.decide(Act::ListTools).allowed;
    let keep = move |msg: &mut Value| {
        if let Some(result) = msg.get_mut("result").and_then(Value::as_object_mut) {
            filter_result(&asker, method, whole, result);
        }
    };
    match reply {
        Reply::Json(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut msg) => {
                keep(&mut msg);
                Reply::Json(serde_json::to_vec(&msg).unwrap_or_default().into())
            }
            // Not JSON: nothing of it is shown.
            Err(_) => Reply::Json(bytes::Bytes::new()),
        },
        reply @ (Reply::JsonBody(_) | Reply::Sse(_) | Reply::Messages(_)) => {
            Reply::Messages(Box::pin(messages_of(reply).map(move |mut msg| {
                keep(&mut msg);
                msg
            })))
        }
        other @ (Reply::Accepted | Reply::Status(_)) => other,
    }
}

/// Keeps the items of one listing result the caller may use; a result shaped per caller is
/// never marked as cacheable by everyone.
fn filter_result(asker: &Asker, method: &str, whole: bool, result: &mut serde_json::Map<String, Value>) {
    let key = match method {
        "tools/list" => "tools",
        "prompts/list" => "prompts",
        "resources/list" => "resources",
        "resources/templates/list" => "resourceTemplates",
        _ => return,
    };
    if let Some(Value::Array(items)) = result.get_mut(key) {
        items.retain(|item| shows(asker, method, whole, item));
    }
    if result.get("cacheScope").and_then(Value::as_str) == Some("public") {
        result.insert("cacheScope".to_owned(), Value::from("private"));
    }
}

/// Whether one item of a `method` listing is shown: a tool or prompt when some call to it
/// could be allowed, a resource (or template) when reading it is.
fn shows(asker: &Asker, method: &str, whole: bool, item: &Value) -> bool {
    let text = |key: &str| item[key].as_str().unwrap_or_default();
    match method {
        "tools/list" => {
            let annotations = item.get("annotations");
            asker.server.observe_tool(text("name"), annotations);
            let annotations = annotations.filter(|_| asker.server.config.trusted);
            whole && asker.may_list(Act::CallTool { name: text("name"), args: Args::Unknown, annotations })
        }
        "prompts/list" => asker.may_list(Act::GetPrompt { name: text("name"), args: Args::Unknown }),
        "resources/list" => asker.decide(Act::ReadResource { uri: text("uri") }).allowed,
        "resources/templates/list" => asker.decide(Act::ReadResource { uri: text("uriTemplate") }).allowed,
        _ => true,
    }
}
