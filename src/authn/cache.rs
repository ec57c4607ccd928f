//! Remembered token checks. A lookup in the store costs a round trip on every request, so the
//! result (found or not) is kept in memory, tagged with the store's revocation epoch. Every
//! change that can take access away (a token revoked, a principal disabled, a group membership
//! changed) moves that epoch; each gateway polls it every [`POLL`] and stops trusting entries
//! tagged with an older one. So a revocation takes effect on every replica within `POLL`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::store::identity::TokenAuth;

/// How often the revocation epoch is read.
pub const POLL: Duration = Duration::from_millis(250);
/// The longest an entry is trusted even when the epoch does not move.
pub const TTL: Duration = Duration::from_secs(30);
/// Tokens found (and tokens not found) kept at most, each; a map that is full starts over.
/// The two are kept apart so that a flood of made-up tokens, each well formed and each looked
/// up once, empties only the map of tokens not found, and callers with real tokens keep
/// their remembered checks.
pub const CAP: usize = 100_000;

struct Entry {
    auth: Option<TokenAuth>,
    epoch: i64,
    at: Instant,
}

/// Token checks by token hash.
pub struct TokenCache {
    /// Checks that found a token.
    known: DashMap<[u8; 32], Entry>,
    /// Checks that found none.
    unknown: DashMap<[u8; 32], Entry>,
    /// The epoch last read from the store; `i64::MIN` until the first read.
    epoch: AtomicI64,
    /// Tells long-lived streams that the epoch moved (see [`super::revoked`]).
    changes: watch::Sender<i64>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            known: DashMap::new(),
            unknown: DashMap::new(),
            epoch: AtomicI64::new(i64::MIN),
            changes: watch::Sender::new(i64::MIN),
        }
    }
}

impl TokenCache {
    /// The epoch to tag a lookup that starts now.
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Wakes whenever the revocation epoch moves.
    pub fn changes(&self) -> watch::Receiver<i64> {
        self.changes.subscribe()
    }

    /// A remembered check, if it is still trustworthy.
    pub fn get(&self, hash: &[u8; 32]) -> Option<Option<TokenAuth>> {
        let epoch = self.epoch();
        let trusted = |e: &Entry| epoch != i64::MIN && e.epoch == epoch && e.at.elapsed() < TTL;
        if let Some(e) = self.known.get(hash) {
            return trusted(&e).then(|| e.auth.clone());
        }
        let e = self.unknown.get(hash)?;
        trusted(&e).then_some(None)
    }

    /// Remembers a check made from a lookup that started at `epoch`.
    pub fn put(&self, hash: [u8; 32], auth: Option<TokenAuth>, epoch: i64) {
        let (map, other) = if auth.is_some() { (&self.known, &self.unknown) } else { (&self.unknown, &self.known) };
        if map.len() >= CAP {
            map.clear();
        }
        // A token found now and not before (or the other way) is remembered in one map only.
        other.remove(&hash);
        map.insert(hash, Entry { auth, epoch, at: Instant::now() });
    }

    /// Polls the store's revocation epoch until `shutdown`.
    pub async fn watch(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match store.revocation_epoch().await {
                Ok(epoch) => {
                    if self.epoch.swap(epoch, Ordering::AcqRel) != epoch {
                        self.known.retain(|_, e| e.epoch == epoch);
                        self.unknown.retain(|_, e| e.epoch == epoch);
                    }
                    // Compared with the last epoch announced, so a change made while the store
                    // could not be read is announced too.
                    self.changes.send_if_modified(|last| std::mem::replace(last, epoch) != epoch);
                }
                // Without a fresh epoch nothing cached is trusted: checks go to the store.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the revocation epoch");
                    self.epoch.store(i64::MIN, Ordering::Release);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> TokenAuth {
        TokenAuth {
            token_id: "t1".into(),
            principal_id: "p1".into(),
            principal_name: "alice".into(),
            service: false,
            disabled: false,
            groups: Vec::new(),
            servers: None,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        }
    }

    fn hash(i: usize) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&(i as u64).to_le_bytes());
        h[31] = 1;
        h
    }

    #[test]
    fn a_flood_of_unknown_tokens_keeps_the_known_ones() {
        let cache = TokenCache::default();
        cache.epoch.store(7, Ordering::Release);
        let real = [9u8; 32];
        cache.put(real, Some(auth()), 7);
        // Each made-up token is looked up once and remembered as not found, past the cap.
        for i in 0..CAP + 10 {
            cache.put(hash(i), None, 7);
        }
        assert!(cache.unknown.len() <= CAP);
        assert_eq!(cache.get(&real).map(|a| a.map(|a| a.token_id)), Some(Some("t1".to_owned())));
        assert_eq!(cache.get(&hash(CAP + 9)), Some(None), "the latest unknown token is remembered");
    }

    #[test]
    fn a_token_found_later_is_no_longer_remembered_as_unknown() {
        let cache = TokenCache::default();
        cache.epoch.store(3, Ordering::Release);
        cache.put(hash(1), None, 3);
        assert_eq!(cache.get(&hash(1)), Some(None));
        cache.put(hash(1), Some(auth()), 3);
        assert!(cache.get(&hash(1)).is_some_and(|a| a.is_some()));
        cache.put(hash(1), None, 3);
        assert_eq!(cache.get(&hash(1)), Some(None));
        // Entries of an older epoch are not trusted.
        cache.epoch.store(4, Ordering::Release);
        assert_eq!(cache.get(&hash(1)), None);
    }
}
