//! What an OAuth upstream last showed: its `initialize` result (capabilities and server info)
//! and its tool and prompt listings, page by page, as seen in any connected person's session. A person who has
//! not connected yet is shown these, so a chat host lists the server's real tools and the model
//! can call one, which answers with the connect link (see `mcp::unconnected`).
//!
//! Kept in the store (`server_catalog`), so every replica and a restarted gateway know them;
//! written only when a page changed. Pages are those of the chain a client walks: the first
//! page, and a page whose cursor an earlier stored page named as its `nextCursor`.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde_json::Value;

use crate::clock::Clock;
use crate::store::Store;
use crate::upstream::{Reply, messages_of};

/// The listings kept: those that describe the server rather than the person's data. Resource
/// listings (file names, records) are the person's own and are never kept.
pub const LISTS: &[&str] = &["tools/list", "prompts/list"];
/// The `initialize` result is kept under this method name.
pub const INITIALIZE: &str = "initialize";
/// Largest page kept.
const MAX_PAGE_BYTES: usize = 1024 * 1024;
/// Longest cursor kept.
const MAX_CURSOR_CHARS: usize = 512;
/// Most pages kept per listing.
const MAX_PAGES: usize = 20;
/// A page that keeps changing is written at most this often (per process).
const MIN_REWRITE: std::time::Duration = std::time::Duration::from_secs(60);

/// One server's catalog.
pub struct Catalog {
    store: Store,
    server: String,
    clock: Clock,
    /// Per method: the hash of each page this process stored or read, and the cursors that
    /// stored pages name as their next page.
    known: Mutex<HashMap<String, Known>>,
}

#[derive(Default)]
struct Known {
    /// Per page: the hash of its body and when this process last wrote it.
    pages: HashMap<String, (u64, Option<std::time::Instant>)>,
    next: HashSet<String>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("server", &self.server).finish_non_exhaustive()
    }
}

/// The cursor of a listing request (`""` for the first page).
pub fn cursor_of(request: &Value) -> String {
    request.pointer("/params/cursor").and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// The listing `message` asks for and its page, when it is a kept listing whose page the
/// gateway could read: a request the gateway cannot parse (too deep, say) is relayed but its
/// answer is not kept, lest it be filed under the wrong page.
pub fn listing_of(message: &crate::protocol::jsonrpc::Message) -> Option<(&'static str, String)> {
    let method = LISTS.iter().find(|m| **m == message.method()).copied()?;
    let request = message.value().ok()?;
    Some((method, cursor_of(&request)))
}

fn hash_of(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl Catalog {
    /// The catalog of `server`.
    pub fn new(store: Store, server: &str) -> Arc<Catalog> {
        Arc::new(Catalog { store, server: server.to_owned(), clock: Clock::system(), known: Mutex::default() })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stored result of `method` at `page`, if the gateway saw one.
    pub async fn page(&self, method: &str, page: &str) -> Option<Value> {
        let body = match self.store.catalog_page(&self.server, method, page).await {
            Ok(body) => body?,
            Err(e) => {
                tracing::warn!(server = %self.server, error = %e, "the server's catalog could not be read");
                return None;
            }
        };
        let value: Value = serde_json::from_str(&body).ok()?;
        self.remember(method, page, &body, &value, None);
        Some(value)
    }

    fn remember(&self, method: &str, page: &str, body: &str, result: &Value, written: Option<std::time::Instant>) {
        let mut known = self.known();
        let k = known.entry(method.to_owned()).or_default();
        k.pages.insert(page.to_owned(), (hash_of(body), written));
        if let Some(next) = result.get("nextCursor").and_then(Value::as_str) {
            // An upstream whose cursors change with every listing would grow this forever.
            if k.next.len() >= 4 * MAX_PAGES {
                k.next.clear();
            }
            k.next.insert(next.to_owned());
        }
    }

    /// Keeps `result` (of `method` at `page`) when it is a page worth keeping and changed.
    /// The store write runs in the background; a failed one is logged, never the caller's
    /// problem.
    pub fn observe(self: &Arc<Self>, method: &str, page: &str, result: &Value) {
        let kept = if method == INITIALIZE {
            let mut kept = serde_json::Map::new();
            // Not `instructions`: an upstream may write them for the person it answers.
            for key in ["capabilities", "serverInfo"] {
                if let Some(v) = result.get(key) {
                    kept.insert(key.to_owned(), v.clone());
                }
            }
            Value::Object(kept)
        } else {
            result.clone()
        };
        let Ok(body) = serde_json::to_string(&kept) else { return };
        if body.len() > MAX_PAGE_BYTES || page.chars().count() > MAX_CURSOR_CHARS {
            return;
        }
        {
            let known = self.known();
            let k = known.get(method);
            let reachable = page.is_empty() || k.is_some_and(|k| k.next.contains(page));
            let full = k.is_some_and(|k| k.pages.len() >= MAX_PAGES && !k.pages.contains_key(page));
            let seen = k.and_then(|k| k.pages.get(page));
            let same = seen.is_some_and(|(h, _)| *h == hash_of(&body));
            let recent = seen.and_then(|(_, at)| *at).is_some_and(|at| at.elapsed() < MIN_REWRITE);
            if !reachable || full || same || recent {
                return;
            }
        }
        self.remember(method, page, &body, &kept, Some(std::time::Instant::now()));
        let (this, method, page) = (self.clone(), method.to_owned(), page.to_owned());
        tokio::spawn(async move {
            let now = i64::try_from(this.clock.unix_secs()).unwrap_or(i64::MAX);
            if let Err(e) = this.store.catalog_put(&this.server, &method, &page, &body, now).await {
                tracing::warn!(server = %this.server, %method, error = %e, "the server's catalog could not be stored");
                // Try again on the next sighting.
                if let Some(k) = this.known().get_mut(&method) {
                    k.pages.remove(&page);
                }
            }
        });
    }

    /// Passes `reply` (the answer to a `method` request at `page`, see [`listing_of`]) on,
    /// keeping its result.
    pub fn tee(self: &Arc<Self>, (method, page): (&'static str, String), reply: Reply) -> Reply {
        match reply {
            Reply::Json(bytes) => {
                if let Ok(msg) = serde_json::from_slice::<Value>(&bytes)
                    && let Some(result) = msg.get("result")
                {
                    self.observe(method, &page, result);
                }
                Reply::Json(bytes)
            }
            Reply::JsonBody(resp) if resp.content_length().is_none_or(|n| n > MAX_PAGE_BYTES as u64) => {
                Reply::JsonBody(resp)
            }
            reply @ (Reply::JsonBody(_) | Reply::Sse(_) | Reply::Messages(_)) => {
                let this = self.clone();
                let stream = messages_of(reply).inspect(move |msg| {
                    if let Some(result) = msg.get("result") {
                        this.observe(method, &page, result);
                    }
                });
                Reply::Messages(Box::pin(stream))
            }
            other @ (Reply::Accepted | Reply::Status(_)) => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn catalog() -> (Arc<Catalog>, Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect(&format!("sqlite://{}/c.db", dir.path().display())).await.expect("store");
        (Catalog::new(store.clone(), "gh"), store, dir)
    }

    /// Waits for the background write of `page`.
    async fn stored(store: &Store, method: &str, page: &str) -> Option<Value> {
        for _ in 0..200 {
            if let Some(body) = store.catalog_page("gh", method, page).await.expect("read") {
                return serde_json::from_str(&body).ok();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        None
    }

    #[tokio::test]
    async fn pages_of_the_chain_are_kept_and_others_are_not() {
        let (catalog, store, _dir) = catalog().await;
        catalog.observe("tools/list", "made-up", &json!({"tools": [{"name": "x"}]}));
        catalog.observe("tools/list", "", &json!({"tools": [{"name": "a"}], "nextCursor": "p2"}));
        catalog.observe("tools/list", "p2", &json!({"tools": [{"name": "b"}]}));
        assert_eq!(stored(&store, "tools/list", "").await, Some(json!({"tools": [{"name": "a"}], "nextCursor": "p2"})));
        assert_eq!(stored(&store, "tools/list", "p2").await, Some(json!({"tools": [{"name": "b"}]})));
        assert_eq!(store.catalog_page("gh", "tools/list", "made-up").await.expect("read"), None, "not announced");
        // Another process's catalog reads them back.
        let other = Catalog::new(store.clone(), "gh");
        assert_eq!(other.page("tools/list", "p2").await, Some(json!({"tools": [{"name": "b"}]})));
        assert_eq!(Catalog::new(store, "jira").page("tools/list", "").await, None, "per server");
    }

    #[tokio::test]
    async fn initialize_keeps_what_describes_the_server_and_large_pages_are_skipped() {
        let (catalog, store, _dir) = catalog().await;
        let init = json!({"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
            "serverInfo": {"name": "gh", "version": "1"}, "instructions": "Hello alice", "_meta": {"x": 1}});
        catalog.observe(INITIALIZE, "", &init);
        let kept = stored(&store, INITIALIZE, "").await.expect("kept");
        assert_eq!(kept, json!({"capabilities": {"tools": {}}, "serverInfo": {"name": "gh", "version": "1"}}));
        let big = json!({"prompts": [{"name": "p", "description": "x".repeat(MAX_PAGE_BYTES)}]});
        catalog.observe("prompts/list", "", &big);
        catalog.observe("tools/list", "", &json!({"tools": []}));
        assert!(stored(&store, "tools/list", "").await.is_some());
        assert_eq!(store.catalog_page("gh", "prompts/list", "").await.expect("read"), None, "too large");
    }
}
