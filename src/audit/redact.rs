//! Secrets out of call arguments before they are stored: values under sensitive key names,
//! strings that look like common credential formats, passwords in URLs and PEM private keys
//! become `"[REDACTED]"`.

use serde_json::{Map, Value};

/// What a secret is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Removes secrets from JSON values. Cheap to clone; build one per writer.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// Lower-cased key fragments without `-` and `_`.
    keys: Vec<String>,
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor::new(crate::config::DEFAULT_REDACT_KEYS)
    }
}

/// A key name lower-cased without `-`, `_` and spaces, so `API-Key`, `api_key` and `apiKey`
/// compare equal.
pub(crate) fn normalize_key(key: &str) -> String {
    key.chars().filter(|c| !matches!(c, '-' | '_' | ' ')).flat_map(char::to_lowercase).collect()
}

impl Redactor {
    /// A redactor for these key names (case-insensitive, matched anywhere in a key, ignoring
    /// `-` and `_`). The token patterns always apply.
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Redactor {
        let keys = keys.iter().map(|k| normalize_key(k.as_ref())).filter(|k| !k.is_empty()).collect();
        Redactor { keys }
    }

    /// Whether values under `key` are redacted whatever they hold.
    pub fn is_sensitive_key(&self, key: &str) -> bool {
        let key = normalize_key(key);
        self.keys.iter().any(|k| key.contains(k.as_str()))
    }

    /// A copy of `value` with secrets replaced.
    pub fn redact(&self, value: &Value) -> Value {
        match value {
            Value::String(s) => Value::String(scrub(s).unwrap_or_else(|| s.clone())),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.redact(v)).collect()),
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    let key = scrub(k).unwrap_or_else(|| k.clone());
                    let v = if self.is_sensitive_key(k) { Value::String(REDACTED.to_owned()) } else { self.redact(v) };
                    out.insert(key, v);
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
}

/// `s` with every credential-looking substring replaced by [`REDACTED`], or `None` when there
/// is none (the common case, which then costs no allocation): token formats, the password of a
/// URL's userinfo (`https://user:[REDACTED]@host`), and PEM private key blocks, whole.
pub fn scrub(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let found = match bytes[i] {
            b':' => url_password(bytes, i),
            b'-' => pem_block(&bytes[i..]).map(|len| (i, i + len)),
            _ if i == 0 || !bytes[i - 1].is_ascii_alphanumeric() => secret_len(&bytes[i..]).map(|len| (i, i + len)),
            _ => None,
        };
        match found {
            Some((start, end)) => {
                // Every pattern starts and ends next to ASCII, so both ends are char boundaries.
                let o = out.get_or_insert_with(|| String::with_capacity(s.len()));
                o.push_str(&s[copied..start]);
                o.push_str(REDACTED);
                i = end;
                copied = end;
            }
            None => i += 1,
        }
    }
    out.map(|mut o| {
        o.push_str(&s[copied..]);
        o
    })
}

/// Where the password of a URL's userinfo lies, when `t[at..]` starts with `://` and the
/// authority after it has one (`scheme://user:password@host`): `(start, end)`. The authority
/// ends at the first `/ ? #`, whitespace or quote; its userinfo at the last `@` (a password
/// with a bare `@` in it is still covered); the password starts after the first `:`.
fn url_password(t: &[u8], at: usize) -> Option<(usize, usize)> {
    if !t[at..].starts_with(b"://") {
        return None;
    }
    let start = at + 3;
    let len = t[start..]
        .iter()
        .position(|b| b"/?#\\\"'<>".contains(b) || b.is_ascii_whitespace() || b.is_ascii_control())
        .unwrap_or(t.len() - start);
    let authority = &t[start..start + len];
    let userinfo = &authority[..authority.iter().rposition(|b| *b == b'@')?];
    let colon = userinfo.iter().position(|b| *b == b':')?;
    (colon + 1 < userinfo.len()).then_some((start + colon + 1, start + userinfo.len()))
}

/// The length of the PEM private key block starting at `t[0]`, if one does: from
/// `-----BEGIN … PRIVATE KEY-----` (any label holding `PRIVATE KEY`: RSA, EC, OPENSSH,
/// ENCRYPTED, PGP … BLOCK) to the end of its `-----END …-----` line, or to the end of the text
/// when the block is cut short. Certificates and public keys are left alone.
fn pem_block(t: &[u8]) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const DASHES: &[u8] = b"-----";
    let rest = t.strip_prefix(BEGIN)?;
    // The label: up to the closing dashes, on one line, of a sane length.
    let label_len = rest.iter().take(80).position(|b| *b == b'-' || *b == b'\n' || *b == b'\r')?;
    let label = &rest[..label_len];
    if !rest[label_len..].starts_with(DASHES) || !contains(label, b"PRIVATE KEY") {
        return None;
    }
    let body_at = BEGIN.len() + label_len + DASHES.len();
    let Some(end_at) = find(&t[body_at..], b"-----END ") else { return Some(t.len()) };
    let footer_at = body_at + end_at + b"-----END ".len();
    match find(&t[footer_at..], DASHES) {
        Some(n) => Some(footer_at + n + DASHES.len()),
        None => Some(t.len()),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// The length of the secret starting at `t[0]`, if one does.
fn secret_len(t: &[u8]) -> Option<usize> {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let dashed = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let upper = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit();
    match t.first()? {
        // GitHub: ghp_ (classic), gho_ (OAuth), ghs_ (app server), ghu_, ghr_; fine-grained PATs.
        b'g' => prefixed(t, b"github_pat_", word, 20).or_else(|| {
            [&b"ghp_"[..], b"gho_", b"ghs_", b"ghu_", b"ghr_"].iter().find_map(|p| prefixed(t, p, alnum, 20))
        }),
        // Slack: xoxb-, xoxa-, xoxp-, xoxr-, xoxs-.
        b'x' if t.len() > 4 && t.starts_with(b"xox") && b"abprs".contains(&t[3]) && t[4] == b'-' => {
            run(&t[5..], |b| alnum(b) || b == b'-').filter(|n| *n >= 10).map(|n| n + 5)
        }
        // AWS access key ids (long-term AKIA, temporary ASIA).
        b'A' => prefixed(t, b"AKIA", upper, 16).or_else(|| prefixed(t, b"ASIA", upper, 16)),
        b'B' | b'b' => bearer(t),
        // A JWT: base64url JSON header `{"…`, payload, signature (empty for alg none).
        b'e' if t.starts_with(b"eyJ") => {
            let header = run(t, dashed)?;
            let payload = run(t.get(header + 1..)?, dashed)?;
            if header < 10 || t.get(header) != Some(&b'.') || payload == 0 {
                return None;
            }
            let sig_at = header + 1 + payload;
            if t.get(sig_at) != Some(&b'.') {
                return None;
            }
            Some(sig_at + 1 + run(&t[sig_at + 1..], dashed).unwrap_or(0))
        }
        // Portcullis grant tokens.
        b'p' => prefixed(t, b"pcl_", alnum, 16),
        // OpenAI (sk-…, sk-proj-…) and Anthropic (sk-ant-…) keys.
        b's' => prefixed(t, b"sk-", dashed, 20),
        _ => None,
    }
}

/// `prefix` followed by at least `min` bytes of `class`: the length of the whole.
fn prefixed(t: &[u8], prefix: &[u8], class: impl Fn(u8) -> bool, min: usize) -> Option<usize> {
    let rest = t.strip_prefix(prefix)?;
    run(rest, class).filter(|n| *n >= min).map(|n| prefix.len() + n)
}

/// How many leading bytes belong to `class` (`None` for none).
fn run(t: &[u8], class: impl Fn(u8) -> bool) -> Option<usize> {
    let n = t.iter().take_while(|b| class(**b)).count();
    (n > 0).then_some(n)
}

/// `Bearer <token68>` (scheme case-insensitive) with a credential of at least 8 characters.
fn bearer(t: &[u8]) -> Option<usize> {
    if t.len() < 7 || !t[..6].eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let spaces = run(&t[6..], |b| b == b' ')?;
    let start = 6 + spaces;
    let token68 = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b);
    let cred = run(&t[start..], token68).filter(|n| *n >= 8)?;
    let pad = run(&t[start + cred..], |b| b == b'=').unwrap_or(0);
    Some(start + cred + pad)
}
