//! Sealed sessions: the `Mcp-Session-Id` a client sees is the gateway's session state,
//! encrypted and authenticated (XChaCha20-Poly1305), so any replica can decode it and nobody
//! can forge one or move it to another server endpoint.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::keys::Key;

/// What the gateway remembers about one client session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// Format version of this state.
    #[serde(rename = "v")]
    pub version: u8,
    /// A random id, unique per session, naming in-memory state (stdio multiplexing).
    #[serde(rename = "k")]
    pub key: String,
    /// Protocol revision agreed with the client.
    #[serde(rename = "c")]
    pub client_protocol: String,
    /// Protocol revision agreed with the upstream.
    #[serde(rename = "u")]
    pub upstream_protocol: String,
    /// The upstream's own session id, for HTTP upstreams that issue one.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub upstream_session: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    #[serde(rename = "t")]
    pub created: u64,
    /// The client's `{capabilities, clientInfo}`, kept when the upstream is stateless
    /// (2026-07-28), which needs them in every request's `_meta`, and on servers with upstream
    /// OAuth, whose upstream side the gateway may open later behind this session
    /// (`mcp::continuity`).
    #[serde(rename = "h", default, skip_serializing_if = "Option::is_none")]
    pub hello: Option<serde_json::Value>,
    /// The client's sampling/elicitation/roots capabilities as bits
    /// (`upstream::mux::features`), for routing the upstream's own requests.
    #[serde(rename = "f", default)]
    pub features: u8,
    /// The client's `clientInfo` name and version (for the audit log), each at most 64 chars.
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub client: Option<(String, String)>,
    /// The principal who opened the session: whose upstream credentials its calls use on
    /// servers with per-user OAuth.
    #[serde(rename = "p", default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    /// Opened while the caller had no connection to this OAuth upstream: the gateway answers
    /// for it (`mcp::unconnected`) until the caller connects; then it opens the upstream side
    /// behind this same session (`mcp::continuity`).
    #[serde(rename = "w", default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// Seals session ids with one key and opens them with that key or older ones (after a key
/// rotation). Opened ids are remembered (up to [`OPENED_CAP`]), so a session's later requests
/// skip the decryption.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    older: std::sync::Arc<[XChaCha20Poly1305]>,
    opened: std::sync::Arc<dashmap::DashMap<String, (String, std::sync::Arc<SessionState>)>>,
    /// How many times a session id was opened (remembered or not).
    opens: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// How many opened ids a sealer remembers before it starts over.
pub const OPENED_CAP: usize = 10_000;

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(redacted)")
    }
}

const NONCE_LEN: usize = 24;

impl Sealer {
    /// A sealer keyed by `key` (derive it for this purpose only).
    pub fn new(key: &Key) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(key.bytes().into()),
            older: Default::default(),
            opened: Default::default(),
            opens: Default::default(),
        }
    }

    /// A sealer for a key ring already derived for this purpose (`ring.derive("session")`):
    /// seals with the active key, opens with any key of the ring.
    pub fn from_ring(ring: &crate::keys::KeyRing) -> Sealer {
        let older = ring
            .keys()
            .iter()
            .filter(|k| &k.id != ring.active_id())
            .map(|k| XChaCha20Poly1305::new(k.key.bytes().into()))
            .collect();
        Sealer { older, ..Sealer::new(ring.active_key()) }
    }

    /// Encrypts `state`, bound to `binding` (the server name, and later the principal).
    pub fn seal(&self, state: &SessionState, binding: &str) -> String {
        let plain = serde_json::to_vec(state).expect("session state serialises");
        let mut nonce_bytes = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce_bytes).expect("the OS random source is available");
        let nonce = XNonce::from(nonce_bytes);
        let sealed = self
            .cipher
            .encrypt(&nonce, Payload { msg: &plain, aad: binding.as_bytes() })
            .expect("encryption of a small buffer cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Decrypts a session id; `None` for anything forged, altered, or bound elsewhere.
    pub fn open(&self, id: &str, binding: &str) -> Option<std::sync::Arc<SessionState>> {
        self.opens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(hit) = self.opened.get(id) {
            return (hit.0 == binding).then(|| hit.1.clone());
        }
        let state = std::sync::Arc::new(self.decrypt(id, binding)?);
        if self.opened.len() >= OPENED_CAP {
            self.opened.clear();
        }
        self.opened.insert(id.to_owned(), (binding.to_owned(), state.clone()));
        Some(state)
    }

    /// How many times [`Sealer::open`] was called: each HTTP request within a session opens
    /// its id once (a batch too, for all its messages).
    pub fn opens(&self) -> u64 {
        self.opens.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn decrypt(&self, id: &str, binding: &str) -> Option<SessionState> {
        if id.len() > 4096 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(id).ok()?;
        if bytes.len() <= NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).ok()?;
        let payload = || Payload { msg: sealed, aad: binding.as_bytes() };
        let plain = std::iter::once(&self.cipher)
            .chain(self.older.iter())
            .find_map(|cipher| cipher.decrypt(&nonce, payload()).ok())?;
        let state: SessionState = serde_json::from_slice(&plain).ok()?;
        (state.version == 1).then_some(state)
    }
}

/// What a session id is bound to: the server it was opened at and the principal who opened
/// it, so it works nowhere else and for nobody else.
pub fn binding(server: &str, principal_id: &str) -> String {
    format!("{server}\0{principal_id}")
}

/// A fresh random session key (16 bytes, hex).
pub fn new_session_key() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SessionState {
        SessionState {
            version: 1,
            key: new_session_key(),
            client_protocol: "2025-06-18".into(),
            upstream_protocol: "2025-03-26".into(),
            upstream_session: Some("abc".into()),
            created: 1,
            hello: None,
            features: 0,
            client: None,
            subject: "u1".into(),
            pending: false,
        }
    }

    #[test]
    fn round_trip_and_tamper_evidence() {
        let sealer = Sealer::new(&Key::random());
        let id = sealer.seal(&state(), "everything");
        assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)), "visible ASCII only");
        assert_eq!(
            sealer.open(&id, "everything").map(|s| (*s).clone()),
            Some(state()).map(|mut s| {
                s.key = sealer.open(&id, "everything").map(|s| (*s).clone()).expect("opens").key;
                s
            })
        );
        assert_eq!(sealer.open(&id, "files"), None, "bound to its server");
        let mut bytes = URL_SAFE_NO_PAD.decode(&id).expect("b64");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(sealer.open(&URL_SAFE_NO_PAD.encode(bytes), "everything"), None, "altered");
        assert_eq!(Sealer::new(&Key::random()).open(&id, "everything"), None, "other key");
        assert_eq!(sealer.open("not-a-session", "everything"), None);
    }
}
