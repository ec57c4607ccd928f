//! Access tokens for upstream calls: from the cache, refreshed ahead of expiry (one refresh per
//! connection at a time across replicas: a row lock on PostgreSQL, a lease on SQLite), client
//! credentials for machine connections, and the background refresher.

use super::*;

/// A held connection (see `Vault::lock_connection`); the replicas' lock is released first.
pub(super) struct ConnectionLock {
    _replicas: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
    _lease: Option<Lease>,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

/// How long a refresh lease on SQLite lasts at least; with a longer `[outbound] timeout`, three
/// times that (a refresh is one guarded request, a machine token a few), so the lease runs out
/// only when its holder died.
const LEASE_SECS: i64 = 30;
/// Longest wait for another process's lease before giving up.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// A refresh lease held on a SQLite store, given back when dropped.
struct Lease {
    store: Store,
    server: String,
    subject: String,
    owner: Arc<str>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (store, server, subject, owner) = (
            self.store.clone(),
            std::mem::take(&mut self.server),
            std::mem::take(&mut self.subject),
            self.owner.clone(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.vault_refresh_lease_release(&server, &subject, &owner).await {
                    // It runs out by itself after LEASE_SECS.
                    tracing::warn!(%server, error = %e, "a refresh lease could not be given back");
                }
            });
        }
    }
}

impl Vault {
    /// The access token for `caller`'s calls to `server`, refreshed first when it is about to
    /// expire. Returns it with the connection's generation (for [`Vault::rejected`]).
    pub async fn token(self: &Arc<Self>, server: &str, caller: &str) -> Result<(SecretString, i64), VaultError> {
        let subject = self.subject_for(server, caller);
        let key = (server.to_owned(), subject.clone());
        let now = self.now();
        if let Some(hit) = self.cache.get(&key)
            && hit.due.is_none_or(|due| due > now)
            && hit.at.elapsed() < CACHE_TTL
        {
            return Ok((hit.token.clone(), hit.generation));
        }
        let vs = self.server(server)?;
        let Some(row) = self.store.vault_connection(server, &subject).await? else {
            if vs.oauth.client_credentials {
                return self.machine_token(server).await;
            }
            return Err(VaultError::NotConnected { server: server.to_owned() });
        };
        if row.status == "reconnect" {
            return Err(VaultError::NeedsReconnect {
                server: server.to_owned(),
                reason: row.last_error.unwrap_or_else(|| "the authorization server no longer accepts it".to_owned()),
            });
        }
        let due = refresh_at(row.expires_at, row.refreshed_at.unwrap_or(row.created_at));
        if due.is_some_and(|due| due <= now) {
            return self.refresh(server, &subject, row.generation).await;
        }
        let (access, _) = self.open_tokens(&row)?;
        self.cache.insert(key, Cached::new(access.clone(), due, row.generation));
        Ok((access, row.generation))
    }

    /// An upstream refused the token of `generation` (401): refresh once, unless another call
    /// already did (R99). The caller retries once with the new token.
    pub async fn rejected(
        self: &Arc<Self>,
        server: &str,
        caller: &str,
        generation: i64,
    ) -> Result<(SecretString, i64), VaultError> {
        let subject = self.subject_for(server, caller);
        self.cache.remove(&(server.to_owned(), subject.clone()));
        self.refresh(server, &subject, generation).await
    }

    /// Refreshes the connection of `subject` at `server` unless its generation moved past
    /// `seen` (then the newer token is returned). One refresh at a time per connection.
    ///
    /// The refresh runs in a task of its own: a caller that goes away (a client that
    /// disconnects, a timeout) must not cancel it between the provider rotating the refresh
    /// token and the store keeping the new one.
    pub(super) async fn refresh(
        self: &Arc<Self>,
        server: &str,
        subject: &str,
        seen: i64,
    ) -> Result<(SecretString, i64), VaultError> {
        let this = self.clone();
        let (server, subject) = (server.to_owned(), subject.to_owned());
        tokio::spawn(async move { this.refresh_now(&server, &subject, seen).await })
            .await
            .map_err(|e| VaultError::Config { detail: format!("the refresh task failed: {e}") })?
    }

    /// Holds the connection of `subject` at `server` for one refresh or revocation: this
    /// process's lock, and on PostgreSQL the replicas' advisory lock. Released when dropped.
    pub(super) async fn lock_connection(&self, server: &str, subject: &str) -> Result<ConnectionLock, VaultError> {
        let lock = self.locks.entry((server.to_owned(), subject.to_owned())).or_default().clone();
        let local = lock.lock_owned().await;
        let (replicas, lease) = match &self.lock_pool {
            Some(pool) => (Some(crate::store::vault::refresh_lock(pool, server, subject).await?), None),
            None => (None, self.lease(server, subject).await?),
        };
        Ok(ConnectionLock { _replicas: replicas, _lease: lease, _local: local })
    }

    /// On SQLite, the connection's refresh lease (other processes may share the file): waits
    /// while another process holds it. `None` when there is no connection to lock.
    async fn lease(&self, server: &str, subject: &str) -> Result<Option<Lease>, VaultError> {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(10);
        loop {
            let now = self.now();
            let timeout = i64::try_from(self.egress.policy().timeout.as_secs()).unwrap_or(i64::MAX / 4);
            let until = now.saturating_add(LEASE_SECS.max(timeout.saturating_mul(3)));
            match self.store.vault_refresh_lease_take(server, subject, &self.owner, now, until).await? {
                None => return Ok(None),
                Some(true) => {
                    let (store, owner) = (self.store.clone(), self.owner.clone());
                    return Ok(Some(Lease { store, server: server.to_owned(), subject: subject.to_owned(), owner }));
                }
                Some(false) if started.elapsed() > LEASE_WAIT => {
                    return Err(VaultError::OAuth(OAuthError::Token {
                        error: None,
                        detail: format!("another gateway process has been refreshing '{server}' for too long"),
                    }));
                }
                Some(false) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(200));
                }
            }
        }
    }

    pub(super) async fn refresh_now(
        &self,
        server: &str,
        subject: &str,
        seen: i64,
    ) -> Result<(SecretString, i64), VaultError> {
        let key = (server.to_owned(), subject.to_owned());
        let _locked = self.lock_connection(server, subject).await?;
        let row = self
            .store
            .vault_connection(server, subject)
            .await?
            .ok_or_else(|| VaultError::NotConnected { server: server.to_owned() })?;
        let now = self.now();
        // Another call (or replica) refreshed since `seen`: use its token, not the refresh token.
        let unexpired = row.expires_at.is_none_or(|e| e > now);
        if row.generation != seen && row.status == "active" && unexpired {
            let (access, _) = self.open_tokens(&row)?;
            let due = refresh_at(row.expires_at, row.refreshed_at.unwrap_or(row.created_at));
            self.cache.insert(key, Cached::new(access.clone(), due, row.generation));
            return Ok((access, row.generation));
        }
        if row.status == "reconnect" {
            return Err(VaultError::NeedsReconnect {
                server: server.to_owned(),
                reason: row.last_error.unwrap_or_else(|| "the authorization server no longer accepts it".to_owned()),
            });
        }
        let (_, refresh_token) = self.open_tokens(&row)?;
        let d: ConnectionDetails =
            serde_json::from_str(&row.details).map_err(|_| VaultError::Crypto("connection details".to_owned()))?;
        let vs = self.server(server)?.clone();
        let Some(refresh_token) = refresh_token else {
            if vs.oauth.client_credentials {
                return self.machine_token(server).await;
            }
            let reason = "the access token expired and the authorization server gave no refresh token";
            self.store.vault_connection_failed(&row.id, row.generation, true, reason).await?;
            return Err(VaultError::NeedsReconnect { server: server.to_owned(), reason: reason.to_owned() });
        };
        let client = self.client_of_connection(&row, &d).await?;
        let scopes = challenge::split_scopes(&row.scopes);
        let result = endpoint::refresh(
            &self.egress,
            &client,
            &d.token_endpoint,
            &refresh_token,
            vs.oauth.scope_on_refresh.then_some(scopes.as_slice()),
            d.resource.as_deref(),
        )
        .await
        .map_err(VaultError::from);
        let tokens = match result {
            Ok(t) => t,
            Err(VaultError::OAuth(OAuthError::Token { error: Some(code), detail }))
                if code == "invalid_grant" || code == "invalid_client" =>
            {
                // Another process may have refreshed meanwhile (a lease that ran out): the
                // refusal is about the token it replaced, and its token is the one to use.
                if let Ok(newer) = self.newer_token(server, subject, row.generation).await {
                    return Ok(newer);
                }
                // The grant is gone (revoked, expired, or the server forgot us): ask the person
                // to reconnect instead of retrying in a loop.
                let reason = format!("the authorization server refused the refresh ({detail})");
                self.store.vault_connection_failed(&row.id, row.generation, true, &reason).await?;
                if code == "invalid_client" && d.client_kind == ClientKind::Dynamic {
                    self.store.vault_client_delete(server, &row.issuer, &row.client_id).await?;
                }
                metrics::counter!("portcullis_vault_refresh_total", "server" => server.to_owned(), "outcome" => "reconnect")
                    .increment(1);
                return Err(VaultError::NeedsReconnect { server: server.to_owned(), reason });
            }
            Err(e) => {
                self.store.vault_connection_failed(&row.id, row.generation, false, &e.to_string()).await?;
                metrics::counter!("portcullis_vault_refresh_total", "server" => server.to_owned(), "outcome" => "error")
                    .increment(1);
                return Err(e);
            }
        };
        // The rotated refresh token replaces the old one in the same statement as the new
        // access token, before either is used (R98).
        let refresh_next = tokens.refresh.clone().or(Some(refresh_token));
        let sealed = self.seal_tokens(&row.id, &tokens.access, refresh_next.as_ref())?;
        let expires_at = tokens.expires_in.map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
        let new_scopes = tokens.scopes.as_ref().map(|s| s.join(" ")).unwrap_or_else(|| row.scopes.clone());
        let stored = self
            .store
            .vault_connection_refreshed(&row.id, row.generation, &sealed, expires_at, &new_scopes, now)
            .await?;
        if !stored {
            // Another process stored first (a new authorization, or a refresh that did not
            // take the lock): its token is the one to use.
            return self.newer_token(server, subject, row.generation).await;
        }
        metrics::counter!("portcullis_vault_refresh_total", "server" => server.to_owned(), "outcome" => "ok")
            .increment(1);
        tracing::info!(server, "upstream token refreshed");
        let generation = row.generation + 1;
        self.cache.insert(key, Cached::new(tokens.access.clone(), refresh_at(expires_at, now), generation));
        Ok((tokens.access, generation))
    }

    /// The token of a connection that moved past `generation` while this process refreshed.
    pub(super) async fn newer_token(
        &self,
        server: &str,
        subject: &str,
        generation: i64,
    ) -> Result<(SecretString, i64), VaultError> {
        let changed = || VaultError::NeedsReconnect {
            server: server.to_owned(),
            reason: "the connection changed during the refresh".to_owned(),
        };
        let row = self.store.vault_connection(server, subject).await?.ok_or_else(changed)?;
        let expired = row.expires_at.is_some_and(|e| e <= self.now());
        if row.generation == generation || row.status != "active" || expired {
            return Err(changed());
        }
        let (access, _) = self.open_tokens(&row)?;
        let due = refresh_at(row.expires_at, row.refreshed_at.unwrap_or(row.created_at));
        self.cache.insert((server.to_owned(), subject.to_owned()), Cached::new(access.clone(), due, row.generation));
        Ok((access, row.generation))
    }

    /// The client credentials grant for a machine-to-machine server (stored as the shared
    /// connection).
    pub(super) async fn machine_token(&self, server: &str) -> Result<(SecretString, i64), VaultError> {
        let vs = self.server(server)?.clone();
        let pins = Pins { metadata_url: vs.oauth.metadata_url.clone() };
        let found = discovery::discover(&self.egress, vs.url.as_ref(), None, &pins).await?;
        let (client, kind) = self.client_for(&vs, &found, &self.redirect_uri(server)).await?;
        let resource =
            found.resource.clone().or_else(|| vs.oauth.resource.clone()).filter(|_| vs.oauth.resource_parameter);
        let tokens = endpoint::client_credentials(
            &self.egress,
            &client,
            &found.server.token_endpoint,
            &vs.oauth.scopes,
            resource.as_deref(),
        )
        .await?;
        let access = tokens.access.clone();
        let details = ConnectionDetails {
            token_endpoint: found.server.token_endpoint.clone(),
            revocation_endpoint: found.server.revocation_endpoint.clone(),
            redirect_uri: self.redirect_uri(server),
            resource,
            client_kind: kind,
            auth_method: client.method,
        };
        self.store_tokens(server, "", &found.server.issuer, &client.client_id, &vs.oauth.scopes, &details, tokens)
            .await?;
        let row = self.store.vault_connection(server, "").await?;
        Ok((access, row.map(|r| r.generation).unwrap_or(0)))
    }

    /// Refreshes, in the background, every active connection whose token expires within the
    /// next tick plus its margin (with a per-connection jitter, so replicas and connections do
    /// not all refresh at once), until `stop`. Tokens shorter-lived than
    /// [`BACKGROUND_MIN_LIFETIME_SECS`] are left to on-demand refresh.
    pub async fn run_refresher(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(REFRESHER_TICK) => {}
            }
            if let Err(e) = self.refresh_due().await {
                tracing::warn!(error = %e, "background refresh pass failed");
            }
        }
    }

    /// One pass of the background refresher; returns how many connections it refreshed.
    pub async fn refresh_due(self: &Arc<Self>) -> Result<usize, VaultError> {
        let now = self.now();
        let tick = i64::try_from(REFRESHER_TICK.as_secs()).unwrap_or(15);
        let mut refreshed = 0;
        for row in self.store.vault_connections(None).await? {
            let Some(expires) = row.expires_at else { continue };
            let issued = row.refreshed_at.unwrap_or(row.created_at);
            if row.status != "active"
                || expires - issued < BACKGROUND_MIN_LIFETIME_SECS
                || !self.servers.contains_key(&row.server)
            {
                continue;
            }
            let jitter = i64::from(Sha256::digest(row.id.as_bytes())[0]) % tick.max(1);
            let due = refresh_at(Some(expires), issued).unwrap_or(expires) - tick - jitter;
            if due > now {
                continue;
            }
            match self.refresh(&row.server, &row.subject, row.generation).await {
                Ok(_) => refreshed += 1,
                Err(e) => tracing::warn!(server = %row.server, error = %e, "background refresh failed"),
            }
        }
        Ok(refreshed)
    }

    /// Forgets every decrypted token (access changed somewhere: the next use reads the store).
    pub fn forget_cached(&self) {
        self.cache.clear();
    }
}
