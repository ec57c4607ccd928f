//! The audit record as the request path builds it ([`Record`]) and as the store keeps it
//! ([`Entry`]): redacted, sanitised, numbered and chained.

use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::chain::hex;
use super::redact::Redactor;

/// What the gateway decided about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed and forwarded.
    Allow,
    /// Refused by authentication or policy.
    Deny,
    /// Allowed, but failed in the gateway or upstream.
    Error,
}

impl Decision {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The arguments of a call, not yet redacted. `Debug` never shows them: redaction happens in
/// the writer, off the request path, and only the redacted form is ever stored or printed.
#[derive(Clone, Default, PartialEq)]
pub struct Arguments(Option<Value>);

impl Arguments {
    /// No arguments (stored as JSON `null`).
    pub fn none() -> Arguments {
        Arguments(None)
    }

    /// Arguments as the client sent them; secrets are removed before storing.
    pub fn new(value: Value) -> Arguments {
        Arguments(Some(value))
    }

    /// Roughly how many bytes they hold in memory.
    pub fn approx_bytes(&self) -> usize {
        fn size(v: &Value) -> usize {
            16 + match v {
                Value::String(s) => s.len(),
                Value::Array(items) => items.iter().map(size).sum(),
                Value::Object(map) => map.iter().map(|(k, v)| k.len() + 16 + size(v)).sum(),
                Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            }
        }
        self.0.as_ref().map_or(0, size)
    }

    /// Whether there are any.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// The redacted arguments as canonical JSON text (sorted keys, no whitespace).
    pub fn redacted(&self, redactor: &Redactor) -> String {
        match &self.0 {
            None => "null".to_owned(),
            Some(v) => canonical_json(&redactor.redact(v)),
        }
    }
}

impl From<Value> for Arguments {
    fn from(value: Value) -> Self {
        Arguments::new(value)
    }
}

impl fmt::Debug for Arguments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("Arguments(none)"),
            Some(_) => f.write_str("Arguments(not yet redacted)"),
        }
    }
}

/// One MCP request as the request path reports it. Build it with [`Record::new`] and struct
/// update syntax, then hand it to [`super::AuditWriter`].
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The gateway's request id (the one in logs and traces).
    pub request_id: String,
    /// The principal's stable id; `None` before authentication succeeded.
    pub principal_id: Option<String>,
    /// `user`, `service` or `anonymous`.
    pub principal_kind: Option<String>,
    /// The principal's name (`alice`, `ci-bot`).
    pub principal_name: Option<String>,
    /// The grant token's id (never the token).
    pub token_id: Option<String>,
    /// `clientInfo.name` from `initialize`.
    pub client_name: Option<String>,
    /// `clientInfo.version` from `initialize`.
    pub client_version: Option<String>,
    /// The upstream server's configured name; `None` when no server matched.
    pub server: Option<String>,
    /// The JSON-RPC method (`tools/call`, `tools/list`, …).
    pub method: String,
    /// The tool, for `tools/call`.
    pub tool: Option<String>,
    /// The call's arguments; secrets are redacted before storing.
    pub arguments: Arguments,
    /// What the gateway decided.
    pub decision: Decision,
    /// The upstream's HTTP status, or its JSON-RPC error code.
    pub upstream_status: Option<i64>,
    /// From the request's arrival to the end of the answer, in microseconds.
    pub latency_us: u64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// The policies that decided the message, comma-separated (`docs/policy.md`); `None`
    /// where no policy decision was taken.
    pub policy: Option<String>,
}

impl Record {
    /// Roughly how many bytes the record holds in memory (for the overflow queue's cap).
    pub fn approx_bytes(&self) -> usize {
        let texts = [
            &self.principal_id,
            &self.principal_kind,
            &self.principal_name,
            &self.token_id,
            &self.client_name,
            &self.client_version,
            &self.server,
            &self.tool,
            &self.policy,
        ];
        std::mem::size_of::<Record>()
            + self.request_id.len()
            + self.method.len()
            + texts.iter().map(|t| t.as_ref().map_or(0, String::len)).sum::<usize>()
            + self.arguments.approx_bytes()
    }

    /// A record with the required fields; the rest start empty.
    pub fn new(time_ms: i64, request_id: impl Into<String>, method: impl Into<String>, decision: Decision) -> Record {
        Record {
            time_ms,
            request_id: request_id.into(),
            principal_id: None,
            principal_kind: None,
            principal_name: None,
            token_id: None,
            client_name: None,
            client_version: None,
            server: None,
            method: method.into(),
            tool: None,
            arguments: Arguments::none(),
            decision,
            upstream_status: None,
            latency_us: 0,
            bytes_in: 0,
            bytes_out: 0,
            policy: None,
        }
    }

    /// The stored form, not yet chained: arguments redacted, every field capped (see
    /// [`MAX_TEXT_BYTES`], [`MAX_ARGUMENTS_BYTES`]), NUL characters (which PostgreSQL `TEXT`
    /// refuses) replaced, counters clamped to the database's signed 64 bits.
    pub fn into_entry(self, redactor: &Redactor) -> Entry {
        let text = |s: String| cap_text(if s.contains('\0') { s.replace('\0', "\u{fffd}") } else { s });
        let opt = |s: Option<String>| s.map(text);
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        // Nobody vouches for what an unauthenticated request carries (a refused call, an OAuth
        // callback, an anonymous caller of a public server, whose id is empty): a smaller budget.
        let authenticated = self.principal_id.as_deref().is_some_and(|id| !id.is_empty());
        let budget = if authenticated { MAX_ARGUMENTS_BYTES } else { MAX_ANONYMOUS_ARGUMENTS_BYTES };
        Entry {
            seq: 0,
            time_ms: self.time_ms,
            request_id: text(self.request_id),
            principal_id: opt(self.principal_id),
            principal_kind: opt(self.principal_kind),
            principal_name: opt(self.principal_name),
            token_id: opt(self.token_id),
            client_name: opt(self.client_name),
            client_version: opt(self.client_version),
            server: opt(self.server),
            method: text(self.method),
            tool: opt(self.tool),
            arguments: cap_arguments(self.arguments.redacted(redactor), budget),
            decision: self.decision.as_str().to_owned(),
            upstream_status: self.upstream_status,
            latency_us: int(self.latency_us),
            bytes_in: int(self.bytes_in),
            bytes_out: int(self.bytes_out),
            policy: opt(self.policy),
            prev_hash: Vec::new(),
            hash: Vec::new(),
        }
    }
}

/// The most bytes a text field of a record keeps (method, server, tool, principal, client
/// name and version, request and token ids). Longer values, which only a misbehaving client
/// sends (a 30 kB server name in a callback's path), are cut at a character boundary and end
/// in [`CUT_MARK`].
pub const MAX_TEXT_BYTES: usize = 256;

/// The most bytes of arguments (as canonical JSON, after redaction) a record of an
/// authenticated request keeps. Larger arguments are replaced by a summary (see
/// [`cap_arguments`]).
pub const MAX_ARGUMENTS_BYTES: usize = 64 * 1024;

/// The same for a request with no authenticated principal (a refused call, an OAuth callback,
/// an anonymous caller of a public server).
pub const MAX_ANONYMOUS_ARGUMENTS_BYTES: usize = 1024;

/// What ends a text field that was cut.
pub const CUT_MARK: &str = "…[cut]";

/// `s` cut to [`MAX_TEXT_BYTES`] (marked), counted by `portcullis_audit_truncated_total`.
fn cap_text(mut s: String) -> String {
    if s.len() <= MAX_TEXT_BYTES {
        return s;
    }
    let mut end = MAX_TEXT_BYTES - CUT_MARK.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(CUT_MARK);
    metrics::counter!("portcullis_audit_truncated_total", "field" => "text").increment(1);
    s
}

/// `json` if it fits in `budget` bytes; otherwise a JSON object that says so and what it was:
/// `{"$truncated":{"bytes":N,"sha256":"…","head":"<the first bytes, as a string>"}}`, which
/// itself fits in `budget` (the head is what is left of it). The hash lets an investigator
/// match the record against a copy of the arguments kept elsewhere.
pub fn cap_arguments(json: String, budget: usize) -> String {
    use sha2::{Digest, Sha256};
    if json.len() <= budget {
        return json;
    }
    metrics::counter!("portcullis_audit_truncated_total", "field" => "arguments").increment(1);
    let digest = hex(&Sha256::digest(json.as_bytes()));
    let summary = |head: &str| {
        let mut m = serde_json::Map::new();
        m.insert("bytes".into(), Value::from(json.len()));
        m.insert("sha256".into(), Value::from(digest.as_str()));
        m.insert("head".into(), Value::from(head));
        canonical_json(&serde_json::json!({ "$truncated": m }))
    };
    // Escaping can only grow the head, so shrink it until the whole fits.
    let mut end = budget.saturating_sub(summary("").len()).min(json.len());
    loop {
        while !json.is_char_boundary(end) {
            end -= 1;
        }
        let out = summary(&json[..end]);
        if out.len() <= budget || end == 0 {
            return out;
        }
        end = end.saturating_sub((out.len() - budget).max(1));
    }
}

/// One record exactly as stored (every field of a record in a segment, see [`super::segment`];
/// `FromRow` reads the one-row-per-record table of earlier versions). Arguments are already
/// redacted, so `Debug` and the JSON export may show everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Entry {
    /// Position in the chain, from 1, without gaps.
    pub seq: i64,
    /// Unix milliseconds.
    pub time_ms: i64,
    /// Request id.
    pub request_id: String,
    /// Principal id.
    pub principal_id: Option<String>,
    /// Principal kind.
    pub principal_kind: Option<String>,
    /// Principal name.
    pub principal_name: Option<String>,
    /// Grant token id.
    pub token_id: Option<String>,
    /// Client name.
    pub client_name: Option<String>,
    /// Client version.
    pub client_version: Option<String>,
    /// Upstream server.
    pub server: Option<String>,
    /// JSON-RPC method.
    pub method: String,
    /// Tool name.
    pub tool: Option<String>,
    /// Redacted arguments as canonical JSON text.
    pub arguments: String,
    /// `allow`, `deny` or `error`.
    pub decision: String,
    /// Upstream HTTP status or JSON-RPC error code.
    pub upstream_status: Option<i64>,
    /// Latency in microseconds.
    pub latency_us: i64,
    /// Request bytes.
    pub bytes_in: i64,
    /// Response bytes.
    pub bytes_out: i64,
    /// The policies that decided it, comma-separated; `None` where none did (and in every
    /// record written before policy existed: `#[sqlx(default)]` for their table).
    #[sqlx(default)]
    pub policy: Option<String>,
    /// The previous record's hash (32 zero bytes for the first).
    pub prev_hash: Vec<u8>,
    /// SHA-256 over `prev_hash` and the canonical form of this record.
    pub hash: Vec<u8>,
}

impl Entry {
    /// The canonical serialisation the chain hashes: a JSON object of every column except the
    /// two hashes, keys sorted, no whitespace, `arguments` embedded as stored. Changing this
    /// breaks every existing chain.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(320 + self.arguments.len());
        let mut w = Canonical { out: &mut out, first: true };
        w.raw("arguments", &self.arguments);
        w.int("bytes_in", Some(self.bytes_in));
        w.int("bytes_out", Some(self.bytes_out));
        w.str("client_name", self.client_name.as_deref());
        w.str("client_version", self.client_version.as_deref());
        w.str("decision", Some(&self.decision));
        w.int("latency_us", Some(self.latency_us));
        w.str("method", Some(&self.method));
        // Only when set: records without it keep the form (and hash) they were sealed with.
        if let Some(policy) = self.policy.as_deref() {
            w.str("policy", Some(policy));
        }
        w.str("principal_id", self.principal_id.as_deref());
        w.str("principal_kind", self.principal_kind.as_deref());
        w.str("principal_name", self.principal_name.as_deref());
        w.str("request_id", Some(&self.request_id));
        w.int("seq", Some(self.seq));
        w.str("server", self.server.as_deref());
        w.int("time_ms", Some(self.time_ms));
        w.str("token_id", self.token_id.as_deref());
        w.str("tool", self.tool.as_deref());
        w.int("upstream_status", self.upstream_status);
        out.push(b'}');
        out
    }
}

struct Canonical<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl Canonical<'_> {
    /// Keys are plain ASCII names, so they are written as they are, without escaping.
    fn key(&mut self, key: &str) {
        self.out.push(if self.first { b'{' } else { b',' });
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.out.extend_from_slice(json.as_bytes());
    }

    fn str(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(v) => push_json_str(self.out, v),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    fn int(&mut self, key: &str, value: Option<i64>) {
        self.key(key);
        match value {
            Some(v) => self.out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
            None => self.out.extend_from_slice(b"null"),
        }
    }
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `value` as JSON with object keys sorted (by their UTF-8 bytes) at every depth, no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::new();
    write_canonical(&mut out, value);
    String::from_utf8(out).unwrap_or_default()
}

fn write_canonical(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json_str(out, k);
                out.push(b':');
                write_canonical(out, v);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, v);
            }
            out.push(b']');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// The export form: every column, hashes in hex, arguments as JSON (or as a string if the
/// stored text is not JSON, which only tampering can cause).
impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let arguments: Value =
            serde_json::from_str(&self.arguments).unwrap_or_else(|_| Value::String(self.arguments.clone()));
        let mut m = s.serialize_map(Some(21))?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("time_ms", &self.time_ms)?;
        m.serialize_entry("request_id", &self.request_id)?;
        m.serialize_entry("principal_id", &self.principal_id)?;
        m.serialize_entry("principal_kind", &self.principal_kind)?;
        m.serialize_entry("principal_name", &self.principal_name)?;
        m.serialize_entry("token_id", &self.token_id)?;
        m.serialize_entry("client_name", &self.client_name)?;
        m.serialize_entry("client_version", &self.client_version)?;
        m.serialize_entry("server", &self.server)?;
        m.serialize_entry("method", &self.method)?;
        m.serialize_entry("tool", &self.tool)?;
        m.serialize_entry("arguments", &arguments)?;
        m.serialize_entry("decision", &self.decision)?;
        m.serialize_entry("policy", &self.policy)?;
        m.serialize_entry("upstream_status", &self.upstream_status)?;
        m.serialize_entry("latency_us", &self.latency_us)?;
        m.serialize_entry("bytes_in", &self.bytes_in)?;
        m.serialize_entry("bytes_out", &self.bytes_out)?;
        m.serialize_entry("prev_hash", &hex(&self.prev_hash))?;
        m.serialize_entry("hash", &hex(&self.hash))?;
        m.end()
    }
}
