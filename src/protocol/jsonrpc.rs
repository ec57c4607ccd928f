//! The JSON-RPC 2.0 envelope, read just deep enough to route a message.
//!
//! The gateway forwards the bytes it received; it parses only `id`, `method` and whether the
//! message is a response, so fields it does not know pass through untouched (rmcp's typed
//! messages drop unknown fields; see docs/decisions/0002-raw-json-relay.md).

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

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
    /// The `params` member's bytes, when present.
    pub params: Option<Bytes>,
}

/// Why a body is not a JSON-RPC message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON at all (or not UTF-8, or a number out of range).
    #[error("parse error: {0}")]
    Parse(String),
    /// JSON, but not a JSON-RPC 2.0 message the gateway reads one way only.
    #[error("invalid request: {0}")]
    Invalid(std::borrow::Cow<'static, str>),
}

impl EnvelopeError {
    /// Which failure this is on the wire.
    pub fn fault(&self) -> super::fault::Fault {
        match self {
            EnvelopeError::Parse(_) => super::fault::Fault::Parse,
            EnvelopeError::Invalid(_) => super::fault::Fault::InvalidRequest,
        }
    }

    fn invalid(text: &'static str) -> EnvelopeError {
        EnvelopeError::Invalid(text.into())
    }
}

/// How deep objects and arrays may nest in a message (the message itself is level 1). Deeper
/// messages are refused: the gateway must read everything it forwards, and a reader with a
/// smaller limit than the upstream's would see less than the upstream runs.
pub const MAX_DEPTH: usize = 64;

impl Message {
    /// Reads one message from its bytes, strictly: the bytes are UTF-8 JSON, no object repeats
    /// a key (after unescaping), nothing nests deeper than [`MAX_DEPTH`], and the envelope is
    /// JSON-RPC 2.0. A message that passes has one reading, the one every upstream's JSON
    /// parser gives it, so what the audit log (and policy) sees is what the upstream runs.
    pub fn parse(raw: Bytes) -> Result<Message, EnvelopeError> {
        let mut de = serde_json::Deserializer::from_slice(&raw);
        let env = serde::Deserializer::deserialize_any(&mut de, EnvelopeVisitor { raw: &raw })
            .map_err(|e| classify(&raw, e))?;
        de.end().map_err(|e| EnvelopeError::Parse(e.to_string()))?;
        if env.jsonrpc != Some(true) {
            return Err(EnvelopeError::invalid("`jsonrpc` must be \"2.0\""));
        }
        let kind = match (&env.method, env.answered) {
            (Some(_), false) if env.id.is_some() => Kind::Request,
            (Some(_), false) => Kind::Notification,
            (None, true) => Kind::Response,
            _ => return Err(EnvelopeError::invalid("a message needs `method`, or `result`/`error`")),
        };
        if matches!(&env.id, Some(id) if !(id.is_string() || id.is_number())) {
            return Err(EnvelopeError::invalid("`id` must be a string or a number"));
        }
        let params = env.params.map(|(start, end)| raw.slice(start..end));
        Ok(Message { raw, id: env.id, method: env.method, kind, params })
    }
    /// Builds a message from a JSON value (messages the gateway itself sends).
    pub fn from_value(value: &Value) -> Message {
        let raw = Bytes::from(serde_json::to_vec(value).unwrap_or_default());
        let method = value.get("method").and_then(Value::as_str).map(str::to_owned);
        let id = value.get("id").filter(|v| !v.is_null()).cloned();
        let kind = match (&method, &id) {
            (Some(_), Some(_)) => Kind::Request,
            (Some(_), None) => Kind::Notification,
            (None, _) => Kind::Response,
        };
        let params = value.get("params").map(|p| Bytes::from(serde_json::to_vec(p).unwrap_or_default()));
        Message { raw, id, method, kind, params }
    }

    /// The full JSON value (parses the bytes again; used off the byte-relay path).
    pub fn value(&self) -> Result<Value, EnvelopeError> {
        serde_json::from_slice(&self.raw).map_err(|e| EnvelopeError::Parse(e.to_string()))
    }

    /// The method, or `""` for responses.
    pub fn method(&self) -> &str {
        self.method.as_deref().unwrap_or("")
    }

    /// The `params` member as JSON (`None` when absent).
    pub fn params(&self) -> Option<Value> {
        serde_json::from_slice(self.params.as_deref()?).ok()
    }

    /// A `tools/call`'s tool name and arguments: `Ok(None)` for other methods, an error when
    /// the call names no tool (it is refused before it reaches an upstream).
    pub fn tool_call(&self) -> Result<Option<ToolCall>, &'static str> {
        if self.method() != "tools/call" {
            return Ok(None);
        }
        #[derive(Deserialize)]
        struct Params {
            name: Option<Value>,
            /// Present (even `null`) or absent.
            #[serde(default, deserialize_with = "present")]
            arguments: Option<Value>,
        }
        fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
            Value::deserialize(d).map(Some)
        }
        // Only an object has a `name` (a derived reader would also take an array's first item).
        let params: Option<Params> = match &self.params {
            Some(p) if p.first() == Some(&b'{') => serde_json::from_slice(p).ok(),
            _ => None,
        };
        match params {
            Some(Params { name: Some(Value::String(name)), arguments }) => Ok(Some(ToolCall { name, arguments })),
            _ => Err("tools/call needs `params.name`, a string"),
        }
    }
}

/// What a `tools/call` asks for, as the upstream will read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments (`None` when the call has none).
    pub arguments: Option<Value>,
}

fn classify(raw: &[u8], e: serde_json::Error) -> EnvelopeError {
    // Refusals of well-formed JSON are data errors; the same error category also comes from
    // a malformed body whose first token already disagreed, which is a parse error.
    if e.is_data() && serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_ok() {
        EnvelopeError::Invalid(e.to_string().into())
    } else {
        EnvelopeError::Parse(e.to_string())
    }
}

/// The envelope as read in one pass.
#[derive(Default)]
struct Read {
    /// `jsonrpc`, if present: whether it is `"2.0"`.
    jsonrpc: Option<bool>,
    id: Option<Value>,
    method: Option<String>,
    /// Where `params` lies in the bytes.
    params: Option<(usize, usize)>,
    answered: bool,
    base: usize,
}

/// Reads the top-level object of a message (level 1).
struct EnvelopeVisitor<'r> {
    raw: &'r [u8],
}

impl<'de> Visitor<'de> for EnvelopeVisitor<'_> {
    type Value = Read;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON-RPC message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read, A::Error> {
        let mut keys = Keys::default();
        let mut read = Read { base: self.raw.as_ptr() as usize, ..Read::default() };
        let members = Strict { level: 2 };
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let field = Field::of(&key);
            keys.insert(key).map_err(de::Error::custom)?;
            match field {
                Field::Jsonrpc => read.jsonrpc = Some(map.next_value_seed(Text)?.is_some_and(|v| v == "2.0")),
                Field::Id => read.id = Some(map.next_value_seed(Shallow)?),
                Field::Method => match map.next_value_seed(Text)? {
                    Some(m) => read.method = Some(m.into_owned()),
                    None => return Err(de::Error::custom("`method` must be a string")),
                },
                Field::Params => {
                    let params: &'de RawValue = map.next_value()?;
                    let text = params.get();
                    let mut de = serde_json::Deserializer::from_str(text);
                    members.deserialize(&mut de).map_err(de::Error::custom)?;
                    let start = (text.as_ptr() as usize).wrapping_sub(read.base);
                    read.params = Some((start, start + text.len()));
                }
                Field::Answer => {
                    map.next_value_seed(members)?;
                    read.answered = true;
                }
                Field::Other => map.next_value_seed(members)?,
            }
        }
        // `id: null` is no id (a notification, or an answer to an unreadable request).
        read.id = read.id.filter(|id| !id.is_null());
        Ok(read)
    }
}

/// The members of the envelope the gateway reads.
enum Field {
    Jsonrpc,
    Id,
    Method,
    Params,
    /// `result` or `error`.
    Answer,
    Other,
}

impl Field {
    fn of(key: &str) -> Field {
        match key {
            "jsonrpc" => Field::Jsonrpc,
            "id" => Field::Id,
            "method" => Field::Method,
            "params" => Field::Params,
            "result" | "error" => Field::Answer,
            _ => Field::Other,
        }
    }
}

/// A member at level 2 read as text if it is a string (`jsonrpc`, `method`), borrowed from
/// the bytes when it has no escapes; any other value is checked as [`Strict`] does and read
/// as `None`.
struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Strict { level: 2 }.visit_seq(seq).map(|()| None)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Strict { level: 2 }.visit_map(map).map(|()| None)
    }
}

/// Any JSON value at level 2 that the envelope keeps (`id`): read within the depth limit.
struct Shallow;

impl<'de> DeserializeSeed<'de> for Shallow {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        let value = Value::deserialize(d)?;
        if depth(&value) + 1 > MAX_DEPTH {
            return Err(de::Error::custom(format_args!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(value)
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(members) => 1 + members.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Checks a value without keeping it: no repeated keys, no nesting below [`MAX_DEPTH`]
/// (`level` is the level a container here would have).
#[derive(Clone, Copy)]
struct Strict {
    level: usize,
}

impl Strict {
    fn enter<E: de::Error>(self) -> Result<Strict, E> {
        if self.level > MAX_DEPTH {
            return Err(E::custom(format_args!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(Strict { level: self.level + 1 })
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.enter()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.enter()?;
        let mut keys = Keys::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            keys.insert(key).map_err(de::Error::custom)?;
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

/// An object key, unescaped; borrowed from the bytes when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

/// The keys of one object so far; a repeated key is an error (parsers disagree on which of
/// two values wins). The first keys are kept inline and searched, so a small object costs no
/// allocation; past them, all are hashed.
#[derive(Default)]
struct Keys<'de> {
    first: [Cow<'de, str>; SEARCHED],
    len: usize,
    many: std::collections::HashSet<Cow<'de, str>>,
}

/// Keys of one object searched before they are hashed.
const SEARCHED: usize = 16;

impl<'de> Keys<'de> {
    fn insert(&mut self, key: Cow<'de, str>) -> Result<(), String> {
        if self.len < SEARCHED {
            if self.first[..self.len].contains(&key) {
                return Err(repeated(&key));
            }
            self.first[self.len] = key;
        } else {
            if self.many.is_empty() {
                self.many.extend(self.first.iter().cloned());
            }
            if self.many.contains(&key) {
                return Err(repeated(&key));
            }
            self.many.insert(key);
        }
        self.len += 1;
        Ok(())
    }
}

fn repeated(key: &str) -> String {
    let shown: String = key.chars().take(64).collect();
    format!("key `{shown}` is repeated in one object")
}

/// The most messages one batch may hold.
pub const MAX_BATCH: usize = 32;

/// The body of one POST: a single message or a batch (2024-11-05 and 2025-03-26 only).
#[derive(Debug)]
pub enum Body {
    /// One message.
    Single(Message),
    /// A JSON array of messages.
    Batch(Vec<Message>),
}

impl Body {
    /// Reads a POST body; a batch holds at most `max_batch` messages.
    pub fn parse(raw: Bytes, max_batch: usize) -> Result<Body, EnvelopeError> {
        let first = raw.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'[') {
            return Message::parse(raw).map(Body::Single);
        }
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(&raw).map_err(|e| classify(&raw, e))?;
        if items.is_empty() {
            return Err(EnvelopeError::invalid("empty batch"));
        }
        if items.len() > max_batch {
            let text = format!("a batch of {} messages; at most {max_batch} are accepted", items.len());
            return Err(EnvelopeError::Invalid(text.into()));
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
        assert!(matches!(Body::parse(Bytes::from_static(b"[]"), MAX_BATCH), Err(EnvelopeError::Invalid(_))));
    }

    #[test]
    fn batches_split_into_messages() {
        let raw = Bytes::from_static(br#"[{"jsonrpc":"2.0","method":"a"},{"jsonrpc":"2.0","id":"x","result":{}}]"#);
        let Ok(Body::Batch(items)) = Body::parse(raw, MAX_BATCH) else { panic!("batch") };
        assert_eq!(items[0].kind, Kind::Notification);
        assert_eq!(items[1].kind, Kind::Response);
        assert_eq!(&items[1].raw[..], br#"{"jsonrpc":"2.0","id":"x","result":{}}"#);
    }

    #[test]
    fn one_reading_or_none() {
        let refused = |raw: &'static [u8]| Message::parse(Bytes::from_static(raw)).is_err();
        // A repeated key: parsers disagree on which value wins.
        assert!(refused(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"name":"whoami"}}"#));
        assert!(refused(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"tools/list"}"#));
        assert!(refused(br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":{"b":1,"\u0062":2}}}"#));
        // Invalid UTF-8 inside a string, and lone surrogates.
        assert!(refused(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\",\"params\":{\"a\":\"\xff\"}}"));
        assert!(refused(br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":"\ud800"}}"#));
        // Trailing content, and numbers no reader can hold.
        assert!(refused(br#"{"jsonrpc":"2.0","id":1,"method":"x"} {}"#));
        assert!(refused(br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"n":1e999}}"#));
        // Nesting: MAX_DEPTH levels pass, one more does not.
        let nested = |levels: usize| {
            let inner = levels - 2; // the message object and `params`
            let text = format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"a":{}1{}}}}}"#,
                "[".repeat(inner),
                "]".repeat(inner)
            );
            Message::parse(Bytes::from(text))
        };
        assert!(nested(MAX_DEPTH).is_ok());
        assert!(matches!(nested(MAX_DEPTH + 1), Err(EnvelopeError::Invalid(_))));
        assert!(nested(10_000).is_err());
        // Many keys are checked by hashing.
        let many: Vec<String> = (0..100).map(|i| format!(r#""k{i}":1"#)).collect();
        let text = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{{},"k7":2}}}}"#, many.join(","));
        assert!(Message::parse(Bytes::from(text)).is_err());
    }

    #[test]
    fn a_tool_call_is_read_from_its_params() {
        let raw = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"a":[1]}}}"#;
        let m = Message::parse(Bytes::from_static(raw)).expect("valid");
        let call = m.tool_call().expect("has a name").expect("is a call");
        assert_eq!(call, ToolCall { name: "echo".into(), arguments: Some(serde_json::json!({"a": [1]})) });
        let m = Message::parse(Bytes::from_static(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#,
        ))
        .expect("valid envelope");
        assert!(m.tool_call().is_err());
        let m = Message::parse(Bytes::from_static(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["echo",{}]}"#,
        ))
        .expect("valid envelope");
        assert!(m.tool_call().is_err(), "positional params name no tool");
    }

    #[test]
    fn batches_are_limited() {
        let one = r#"{"jsonrpc":"2.0","method":"notifications/x"}"#;
        let text = format!("[{}]", [one; 5].join(","));
        assert!(matches!(Body::parse(Bytes::from(text.clone()), 5), Ok(Body::Batch(b)) if b.len() == 5));
        assert!(matches!(Body::parse(Bytes::from(text), 4), Err(EnvelopeError::Invalid(_))));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Any JSON value, nested a few levels.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                (-1e9f64..1e9).prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(6, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(".{0,8}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = Message::parse(Bytes::from(raw.clone()));
                let _ = Body::parse(Bytes::from(raw), MAX_BATCH);
            }

            #[test]
            fn arbitrary_text_never_panics(text in "[\\[\\]{}\":,a-z0-9\\\\ ]{0,256}") {
                let _ = Message::parse(Bytes::from(text.clone()));
                let _ = Body::parse(Bytes::from(text), MAX_BATCH);
            }

            /// A valid message is read as `serde_json::Value` reads it: same method, id, tool
            /// and arguments, and its bytes are kept exactly.
            #[test]
            fn valid_messages_read_as_values_do(
                id in prop_oneof![any::<i64>().prop_map(Value::from), "[a-z0-9-]{1,12}".prop_map(Value::from)],
                method in prop_oneof![Just("tools/call".to_owned()), "[a-z/]{1,16}"],
                name in ".{0,16}",
                arguments in json(),
                extra in json(),
            ) {
                let message = serde_json::json!({
                    "jsonrpc": "2.0", "id": id, "method": method,
                    "params": {"name": name, "arguments": arguments, "_meta": extra},
                });
                let raw = Bytes::from(serde_json::to_vec(&message).expect("serialises"));
                let read = Message::parse(raw.clone()).expect("a valid message is accepted");
                let value: Value = serde_json::from_slice(&raw).expect("valid JSON");
                prop_assert_eq!(&read.raw, &raw);
                prop_assert_eq!(read.kind, Kind::Request);
                prop_assert_eq!(Some(read.method()), value["method"].as_str());
                prop_assert_eq!(read.id.as_ref(), Some(&value["id"]));
                prop_assert_eq!(read.params(), Some(value["params"].clone()));
                if method == "tools/call" {
                    let call = read.tool_call().expect("named").expect("a call");
                    prop_assert_eq!(Some(call.name.as_str()), value["params"]["name"].as_str());
                    prop_assert_eq!(call.arguments.as_ref(), Some(&value["params"]["arguments"]));
                }
            }

            /// Text that repeats a key is refused, however it is spelled; when there are no
            /// repeats, the gateway's reading equals `serde_json::Value`'s.
            #[test]
            fn repeated_keys_are_refused(
                keys in prop::collection::vec("[a-c]{1,2}", 1..6),
                escape in any::<bool>(),
            ) {
                let members: Vec<String> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        let k = if escape { k.chars().map(|c| format!("\\u{:04x}", c as u32)).collect() } else { k.clone() };
                        format!(r#""{k}":{i}"#)
                    })
                    .collect();
                let text = format!(
                    r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{{}}}}}}}"#,
                    members.join(",")
                );
                let distinct = keys.iter().collect::<std::collections::HashSet<_>>().len() == keys.len();
                let read = Message::parse(Bytes::from(text.clone()));
                prop_assert_eq!(read.is_ok(), distinct);
                if let Ok(read) = read {
                    let value: Value = serde_json::from_str(&text).expect("valid JSON");
                    let call = read.tool_call().expect("named").expect("a call");
                    prop_assert_eq!(call.arguments.as_ref(), Some(&value["params"]["arguments"]));
                }
            }
        }
    }
}
