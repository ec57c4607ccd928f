//! The JSON-RPC 2.0 envelope, read just deep enough to route a message.
//!
//! The gateway forwards the bytes it received; it parses only `id`, `method` and whether the
//! message is a response, so fields it does not know pass through untouched (rmcp's typed
//! messages drop unknown fields; see docs/decisions/0002-raw-json-relay.md).

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

/// JSON-RPC error codes the gateway emits.
pub mod code {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid JSON-RPC message.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Method not found.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid params.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Internal error.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The upstream server could not be reached or failed (implementation-defined range).
    pub const UPSTREAM_ERROR: i64 = -32001;
    /// The upstream server did not answer in time.
    pub const UPSTREAM_TIMEOUT: i64 = -32002;
    /// The caller must open a URL first (MCP 2025-11-25 URL-mode elicitation): here, the link
    /// that connects their account to an OAuth upstream.
    pub const URL_ELICITATION_REQUIRED: i64 = -32042;
}

/// What kind of message this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has `method` and `id`: expects a response.
    Request,
    /// Has `method`, no `id`.
    Notification,
    /// Has `result` or `error`.
    Response,
}

/// One message: its original bytes plus the routing fields.
#[derive(Debug, Clone)]
pub struct Message {
    /// The bytes as received.
    pub raw: Bytes,
    /// Request or response id (`None` for notifications).
    pub id: Option<Value>,
    /// Method name for requests and notifications.
    pub method: Option<String>,
    /// Request, notification or response.
    pub kind: Kind,
}

/// Why a body is not a JSON-RPC message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON at all.
    #[error("parse error: {0}")]
    Parse(String),
    /// JSON, but not a JSON-RPC 2.0 message.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

#[derive(Deserialize)]
struct Envelope<'a> {
    jsonrpc: Option<&'a str>,
    #[serde(default)]
    id: Option<Value>,
    #[serde(borrow, default)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    result: Option<IgnoredAny>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

impl Message {
    /// Reads one message from its bytes.
    pub fn parse(raw: Bytes) -> Result<Message, EnvelopeError> {
        let env: Envelope<'_> = serde_json::from_slice(&raw).map_err(|e| classify(&raw, e))?;
        if env.jsonrpc != Some("2.0") {
            return Err(EnvelopeError::Invalid("`jsonrpc` must be \"2.0\""));
        }
        let kind = match (&env.method, env.result.is_some() || env.error.is_some()) {
            (Some(_), false) if env.id.is_some() => Kind::Request,
            (Some(_), false) => Kind::Notification,
            (None, true) => Kind::Response,
            _ => {
                return Err(EnvelopeError::Invalid("a message needs `method`, or `result`/`error`"));
            }
        };
        if matches!(&env.id, Some(id) if !(id.is_string() || id.is_number())) {
            return Err(EnvelopeError::Invalid("`id` must be a string or a number"));
        }
        let method = env.method.map(|m| m.into_owned());
        let id = env.id;
        Ok(Message { raw, id, method, kind })
    }

    /// Builds a message from a JSON value.
    pub fn from_value(value: &Value) -> Message {
        let raw = Bytes::from(serde_json::to_vec(value).unwrap_or_default());
        let method = value.get("method").and_then(Value::as_str).map(str::to_owned);
        let id = value.get("id").filter(|v| !v.is_null()).cloned();
        let kind = match (&method, &id) {
            (Some(_), Some(_)) => Kind::Request,
            (Some(_), None) => Kind::Notification,
            (None, _) => Kind::Response,
        };
        Message { raw, id, method, kind }
    }

    /// The full JSON value (parses the bytes again; used off the byte-relay path).
    pub fn value(&self) -> Result<Value, EnvelopeError> {
        serde_json::from_slice(&self.raw).map_err(|e| EnvelopeError::Parse(e.to_string()))
    }

    /// The method, or `""` for responses.
    pub fn method(&self) -> &str {
        self.method.as_deref().unwrap_or("")
    }
}

fn classify(raw: &[u8], e: serde_json::Error) -> EnvelopeError {
    if e.is_syntax() || e.is_eof() || serde_json::from_slice::<IgnoredAny>(raw).is_err() {
        EnvelopeError::Parse(e.to_string())
    } else {
        EnvelopeError::Invalid("not a JSON-RPC 2.0 message object")
    }
}

/// The body of one POST: a single message or a batch (2025-03-26 only).
#[derive(Debug)]
pub enum Body {
    /// One message.
    Single(Message),
    /// A JSON array of messages.
    Batch(Vec<Message>),
}

impl Body {
    /// Reads a POST body.
    pub fn parse(raw: Bytes) -> Result<Body, EnvelopeError> {
        let first = raw.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'[') {
            return Message::parse(raw).map(Body::Single);
        }
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(&raw).map_err(|e| classify(&raw, e))?;
        if items.is_empty() {
            return Err(EnvelopeError::Invalid("empty batch"));
        }
        items
            .into_iter()
            .map(|item| Message::parse(raw.slice_ref(item.get().as_bytes())))
            .collect::<Result<_, _>>()
            .map(Body::Batch)
    }
}

/// A JSON-RPC error response.
pub fn error_response(id: Option<&Value>, code: i64, message: &str) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": { "code": code, "message": message },
    })
}

/// A JSON-RPC success response.
pub fn result_response(id: &Value, result: Value) -> Value {
    serde_json::json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_fields_are_read_and_bytes_kept() {
        let raw = Bytes::from_static(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"x-vendor":1}}"#);
        let m = Message::parse(raw.clone()).expect("valid");
        assert_eq!(m.kind, Kind::Request);
        assert_eq!(m.id, Some(serde_json::json!(7)));
        assert_eq!(m.method(), "tools/call");
        assert_eq!(m.raw, raw);
    }

    #[test]
    fn bad_bodies_are_classified() {
        assert!(matches!(Message::parse(Bytes::from_static(b"{nope")), Err(EnvelopeError::Parse(_))));
        assert!(matches!(Message::parse(Bytes::from_static(b"[1")), Err(EnvelopeError::Parse(_))));
        assert!(matches!(Message::parse(Bytes::from_static(br#"{"id":1}"#)), Err(EnvelopeError::Invalid(_))));
        assert!(matches!(
            Message::parse(Bytes::from_static(br#"{"jsonrpc":"2.0","id":{},"method":"x"}"#)),
            Err(EnvelopeError::Invalid(_))
        ));
        assert!(matches!(Body::parse(Bytes::from_static(b"[]")), Err(EnvelopeError::Invalid(_))));
    }

    #[test]
    fn batches_split_into_messages() {
        let raw = Bytes::from_static(br#"[{"jsonrpc":"2.0","method":"a"},{"jsonrpc":"2.0","id":"x","result":{}}]"#);
        let Ok(Body::Batch(items)) = Body::parse(raw) else { panic!("batch") };
        assert_eq!(items[0].kind, Kind::Notification);
        assert_eq!(items[1].kind, Kind::Response);
        assert_eq!(&items[1].raw[..], br#"{"jsonrpc":"2.0","id":"x","result":{}}"#);
    }
}
