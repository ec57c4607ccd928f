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
/// Entries kept at most; the cache starts over beyond this.
pub const CAP: usize = 100_000;

struct Entry {
    auth: Option<TokenAuth>,
    epoch: i64,
    at: Instant,
}

/// Token checks by token hash.
pub struct TokenCache {
    entries: DashMap<[u8; 32], Entry>,
    /// The epoch last read from the store; `i64::MIN` until the first read.
    epoch: AtomicI64,
    /// Tells long-lived streams that the epoch moved (see [`super::revoked`]).
    changes: watch::Sender<i64>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache { entries: DashMap::new(), epoch: AtomicI64::new(i64::MIN), changes: watch::Sender::new(i64::MIN) }
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
        let e = self.entries.get(hash)?;
        (epoch != i64::MIN && e.epoch == epoch && e.at.elapsed() < TTL).then(|| e.auth.clone())
    }

    /// Remembers a check made from a lookup that started at `epoch`.
    pub fn put(&self, hash: [u8; 32], auth: Option<TokenAuth>, epoch: i64) {
        if self.entries.len() >= CAP {
            self.entries.clear();
        }
        self.entries.insert(hash, Entry { auth, epoch, at: Instant::now() });
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
                        self.entries.retain(|_, e| e.epoch == epoch);
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
