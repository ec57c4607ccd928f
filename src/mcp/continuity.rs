//! A client's session outlives the upstream side behind it. On a server with upstream OAuth
//! the gateway owns the client's session id and opens the upstream side itself when the
//! person connects during the session (the session was opened while they had no connection,
//! `SessionState::pending`), and opens it again when the upstream forgot it (HTTP 404, for
//! example an upstream that ties sessions to the token of a connection that was renewed). The
//! client keeps its `Mcp-Session-Id` and never has to initialize again: the official SDKs do
//! not re-initialize on their own.
//!
//! The sealed session id cannot change, so the upstream side chosen later is kept beside it:
//! in this process's memory, and in the store (`mcp_session_upstreams`, encrypted) for the
//! other replicas. A replica that meets such a session first sends with the upstream session
//! named in the sealed id, gets the upstream's 404, and then finds the newer side in the store
//! instead of opening yet another. Re-opening is single-flight per session: one task at a
//! time in a process, and one winner across replicas (a conditional write; the loser closes
//! the upstream session it opened and uses the winner's).
//!
//! A session the client ended (`DELETE`) is remembered as closed, so a later request with its
//! id gets the 404 it always got and is never re-opened.

use std::sync::Arc;

use dashmap::DashMap;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Clock;
use crate::crypto::row_aad;
use crate::keys::SharedKeyRing;
use crate::protocol::session::SessionState;
use crate::store::Store;
use crate::store::sessions::{SESSION_UPSTREAM_TTL_SECS, SESSION_UPSTREAMS_TABLE, SessionUpstreamRow};
use crate::upstream::{ClientHello, Opened, Upstream, UpstreamError};

/// Sessions remembered in memory before the map starts over (the store still has them).
const MEMORY_CAP: usize = 100_000;

/// The upstream side of a session, as chosen after the session began. `Debug` leaves out the
/// upstream's session id.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    /// The upstream's session id.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub upstream_session: Option<String>,
    /// The revision the upstream answered with.
    #[serde(rename = "u", default)]
    pub upstream_protocol: String,
    /// The client ended the session: it is never opened again.
    #[serde(rename = "x", default, skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
    /// The store row's generation.
    #[serde(skip)]
    pub generation: i64,
}

impl std::fmt::Debug for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Side")
            .field("upstream_session", &self.upstream_session.as_ref().map(|_| "redacted"))
            .field("upstream_protocol", &self.upstream_protocol)
            .field("closed", &self.closed)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Side {
    /// `session` with this upstream side.
    pub fn apply(&self, session: &SessionState) -> SessionState {
        SessionState {
            upstream_session: self.upstream_session.clone(),
            upstream_protocol: self.upstream_protocol.clone(),
            pending: false,
            ..session.clone()
        }
    }
}

/// Drops a session's re-open lock from the map once nobody else holds or waits for it.
struct ForgetLock<'a> {
    locks: &'a DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    key: &'a str,
}

impl Drop for ForgetLock<'_> {
    fn drop(&mut self) {
        // The map's own handle and the dropping caller's are the last two.
        self.locks.remove_if(self.key, |_, l| Arc::strong_count(l) <= 2);
    }
}

/// One server's re-opened sessions.
pub struct Continuity {
    server: String,
    store: Store,
    keys: SharedKeyRing,
    clock: Clock,
    sides: DashMap<String, Arc<Side>>,
    locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl std::fmt::Debug for Continuity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Continuity").field("server", &self.server).finish_non_exhaustive()
    }
}

/// Why a session's upstream side could not be found or opened.
fn store_failed(server: &str, e: impl std::fmt::Display) -> UpstreamError {
    tracing::error!(server, error = %e, "a session's upstream side could not be read or stored");
    UpstreamError::Credential { server: server.to_owned(), detail: "the session could not be continued".to_owned() }
}

/// What the gateway tells the upstream about the client when it opens the upstream side
/// later: the client's own `initialize` (kept in the sealed session), or for sessions sealed
/// without it, what the session still knows.
pub fn hello_of(session: &SessionState) -> ClientHello {
    let kept = session.hello.as_ref();
    let capabilities = kept
        .and_then(|h| h.get("capabilities").cloned())
        .unwrap_or_else(|| crate::upstream::mux::features::to_capabilities(session.features));
    let client_info = kept.and_then(|h| h.get("clientInfo").cloned()).unwrap_or_else(|| {
        let (name, version) = session.client.clone().unwrap_or_default();
        serde_json::json!({"name": name, "version": version})
    });
    ClientHello {
        protocol: session.client_protocol.clone(),
        capabilities,
        client_info,
        caller: session.subject.clone(),
    }
}

impl Continuity {
    /// Re-opened sessions of `server`.
    pub fn new(server: &str, store: Store, keys: SharedKeyRing) -> Continuity {
        Continuity {
            server: server.to_owned(),
            store,
            keys,
            clock: Clock::system(),
            sides: DashMap::new(),
            locks: DashMap::new(),
        }
    }

    /// The side this process knows for `session`; for a session opened before its person
    /// connected, also the one another replica may have stored.
    pub async fn current(&self, session: &SessionState) -> Result<Option<Arc<Side>>, UpstreamError> {
        self.check_age(session)?;
        if let Some(side) = self.sides.get(&session.key) {
            return Ok(Some(side.clone()));
        }
        if !session.pending {
            return Ok(None);
        }
        self.stored(&session.key).await
    }

    /// The side in the store (another replica may have re-opened or ended the session since
    /// this one last looked), else the one this process knows.
    pub async fn latest(&self, session: &SessionState) -> Result<Option<Arc<Side>>, UpstreamError> {
        self.check_age(session)?;
        match self.stored(&session.key).await? {
            Some(side) => Ok(Some(side)),
            None => Ok(self.sides.get(&session.key).map(|s| s.clone())),
        }
    }

    /// A session older than the store keeps its rows is over: its row (an ended session's
    /// among them) may be gone, and it must not be opened again.
    fn check_age(&self, session: &SessionState) -> Result<(), UpstreamError> {
        let age = self.clock.unix_secs().saturating_sub(session.created);
        let limit = u64::try_from(SESSION_UPSTREAM_TTL_SECS).unwrap_or(u64::MAX);
        if age > limit { Err(UpstreamError::SessionExpired) } else { Ok(()) }
    }

    async fn stored(&self, key: &str) -> Result<Option<Arc<Side>>, UpstreamError> {
        let Some(row) = self.store.session_upstream(key).await.map_err(|e| store_failed(&self.server, e))? else {
            return Ok(None);
        };
        if row.server != self.server {
            return Ok(None);
        }
        // Unreadable (a retired key, or tampering): as if absent, so the session opens anew.
        let Ok(plain) = self.keys.decrypt(&row_aad(SESSION_UPSTREAMS_TABLE, key), &row.sealed) else {
            return Ok(None);
        };
        let Ok(mut side) = serde_json::from_slice::<Side>(plain.expose_secret()) else { return Ok(None) };
        side.generation = row.generation;
        let side = Arc::new(side);
        self.remember(key, side.clone());
        Ok(Some(side))
    }

    fn remember(&self, key: &str, side: Arc<Side>) {
        if self.sides.len() >= MEMORY_CAP {
            self.sides.clear();
        }
        self.sides.insert(key.to_owned(), side);
    }

    /// Opens the upstream side of `session` (again), unless someone did since `used` (the side
    /// the caller sent with, `None` for the one in the sealed id). Returns the side to use, and
    /// the upstream's `initialize` result when this call opened it.
    pub async fn reopen(
        &self,
        upstream: &Upstream,
        session: &SessionState,
        used: Option<&Side>,
    ) -> Result<(Arc<Side>, Option<Value>), UpstreamError> {
        self.check_age(session)?;
        let lock = self.locks.entry(session.key.clone()).or_default().clone();
        // Forgets the lock when the last waiter is done, also when the client went away and
        // this future was dropped.
        let _forget = ForgetLock { locks: &self.locks, key: &session.key };
        let _held = lock.lock().await;
        self.reopen_locked(upstream, session, used).await
    }

    async fn reopen_locked(
        &self,
        upstream: &Upstream,
        session: &SessionState,
        used: Option<&Side>,
    ) -> Result<(Arc<Side>, Option<Value>), UpstreamError> {
        let newer = |side: &Side| used.is_none_or(|u| side.generation > u.generation);
        let latest = self.stored(&session.key).await?;
        if let Some(side) = &latest {
            if side.closed {
                return Err(UpstreamError::SessionExpired);
            }
            if newer(side) {
                return Ok((side.clone(), None));
            }
        }
        let opened: Opened = upstream.open(&hello_of(session), &session.key).await?;
        let generation = latest.as_ref().map_or(0, |s| s.generation);
        let side = Side {
            upstream_session: opened.upstream_session.clone(),
            upstream_protocol: opened.upstream_protocol.clone(),
            closed: false,
            generation: generation + 1,
        };
        if self.put(&session.key, &side, latest.as_ref().map(|s| s.generation)).await? {
            tracing::info!(server = %self.server, "a session's upstream side was opened again");
            metrics::counter!("portcullis_sessions_reopened_total", "server" => self.server.clone()).increment(1);
            let side = Arc::new(side);
            self.remember(&session.key, side.clone());
            return Ok((side, Some(opened.result)));
        }
        // Another replica stored its side first: use that one, and end ours.
        let _ = upstream.close(&side.apply(session)).await;
        match self.stored(&session.key).await? {
            Some(side) if !side.closed => Ok((side, None)),
            _ => Err(UpstreamError::SessionExpired),
        }
    }

    async fn put(&self, key: &str, side: &Side, previous: Option<i64>) -> Result<bool, UpstreamError> {
        let plain = serde_json::to_vec(side).map_err(|e| store_failed(&self.server, e))?;
        let sealed = self
            .keys
            .encrypt(&row_aad(SESSION_UPSTREAMS_TABLE, key), &plain)
            .map_err(|e| store_failed(&self.server, e))?;
        let row = SessionUpstreamRow {
            session_key: key.to_owned(),
            server: self.server.clone(),
            sealed,
            generation: side.generation,
            updated_at: i64::try_from(self.clock.unix_secs()).unwrap_or(i64::MAX),
        };
        self.store.session_upstream_put(&row, previous).await.map_err(|e| store_failed(&self.server, e))
    }

    /// The client ended `session`: it is remembered as closed (here and in the store), so no
    /// replica opens it again.
    pub async fn close(&self, session: &SessionState) -> Result<(), UpstreamError> {
        let latest = self.stored(&session.key).await?;
        let generation = latest.as_ref().map_or(0, |s| s.generation);
        let mut side = Side { closed: true, generation: generation + 1, ..Side::default() };
        // A lost race means someone re-opened or closed it meanwhile; closing again wins.
        if !self.put(&session.key, &side, latest.as_ref().map(|s| s.generation)).await? {
            let again = self.stored(&session.key).await?;
            side.generation = again.as_ref().map_or(0, |s| s.generation) + 1;
            self.put(&session.key, &side, again.as_ref().map(|s| s.generation)).await?;
        }
        self.remember(&session.key, Arc::new(side));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::mux::features;

    fn session() -> SessionState {
        SessionState {
            version: 1,
            key: "k".into(),
            client_protocol: "2025-11-25".into(),
            upstream_protocol: String::new(),
            pending: true,
            subject: "u1".into(),
            features: features::SAMPLING | features::ELICITATION | features::ELICITATION_URL,
            client: Some(("inspector".into(), "2".into())),
            ..SessionState::default()
        }
    }

    #[test]
    fn the_client_is_introduced_with_its_own_initialize_or_what_the_session_kept() {
        let mut s = session();
        let hello = hello_of(&s);
        assert_eq!(hello.protocol, "2025-11-25");
        assert_eq!(hello.caller, "u1");
        assert_eq!(hello.client_info, serde_json::json!({"name": "inspector", "version": "2"}));
        assert_eq!(features::from_capabilities(&hello.capabilities), s.features, "the same capabilities");
        s.hello =
            Some(serde_json::json!({"capabilities": {"roots": {"listChanged": true}}, "clientInfo": {"name": "c"}}));
        let hello = hello_of(&s);
        assert_eq!(hello.capabilities, serde_json::json!({"roots": {"listChanged": true}}));
        assert_eq!(hello.client_info, serde_json::json!({"name": "c"}));
    }

    #[test]
    fn a_side_replaces_the_upstream_fields_only() {
        let side =
            Side { upstream_session: Some("up".into()), upstream_protocol: "2025-06-18".into(), ..Side::default() };
        let s = side.apply(&session());
        assert_eq!(
            (s.upstream_session.as_deref(), s.upstream_protocol.as_str(), s.pending),
            (Some("up"), "2025-06-18", false)
        );
        assert_eq!((s.key.as_str(), s.subject.as_str(), s.client_protocol.as_str()), ("k", "u1", "2025-11-25"));
        let text = serde_json::to_string(&side).expect("json");
        assert!(!text.contains("generation"), "the generation is the row's, not the ciphertext's: {text}");
    }
}
