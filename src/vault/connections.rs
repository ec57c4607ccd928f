//! Connections as people and operators see them: whether one exists, the list, and revocation
//! (at the provider too, where it offers it).

use super::*;

impl Vault {
    /// Revokes `subject`'s connection to `server` at the provider (RFC 7009, when it has a
    /// revocation endpoint) and deletes it. Returns what happened at the provider.
    pub async fn revoke(&self, server: &str, subject: &str) -> Result<Option<String>, VaultError> {
        // Under the refresh locks, so a refresh cannot rotate the token between the read and
        // the revocation.
        let _locked = self.lock_connection(server, subject).await?;
        let Some(row) = self.store.vault_connection(server, subject).await? else { return Ok(None) };
        let outcome = self.revoke_at_provider(&row).await;
        self.store.vault_connection_delete(&row.id).await?;
        self.cache.remove(&(server.to_owned(), subject.to_owned()));
        Ok(Some(outcome))
    }

    pub(super) async fn revoke_at_provider(&self, row: &ConnectionRow) -> String {
        let Ok(d) = serde_json::from_str::<ConnectionDetails>(&row.details) else {
            return "details unreadable; deleted locally only".to_owned();
        };
        let Some(endpoint) = &d.revocation_endpoint else {
            return "the provider has no revocation endpoint; deleted locally".to_owned();
        };
        let (access, refresh) = match self.open_tokens(row) {
            Ok(t) => t,
            Err(e) => return format!("{e}; deleted locally only"),
        };
        let client = match self.client_of_connection(row, &d).await {
            Ok(c) => c,
            Err(e) => return format!("{e}; deleted locally only"),
        };
        // Revoking the refresh token ends the grant and its access tokens (RFC 7009 §2.1);
        // without one, the access token itself is revoked.
        let (token, is_refresh) = match &refresh {
            Some(r) => (r, true),
            None => (&access, false),
        };
        let what = if is_refresh { "refresh token" } else { "access token" };
        match endpoint::revoke(&self.egress, &client, endpoint, token, is_refresh).await {
            Ok(()) => format!("{what} revoked at the provider"),
            Err(e) => format!("{what} not revoked at the provider ({e}); deleted locally"),
        }
    }

    /// Whether `caller`'s connection to `server` exists and works, read from the store (not
    /// the cache, which it clears when the answer is no).
    pub async fn is_connected(&self, server: &str, caller: &str) -> Result<bool, VaultError> {
        let subject = self.subject_for(server, caller);
        let row = self.store.vault_connection(server, &subject).await?;
        let ok = row.is_some_and(|r| r.status == "active");
        if !ok {
            self.cache.remove(&(server.to_owned(), subject));
        }
        Ok(ok)
    }

    /// Connections, all or one subject's (never tokens).
    pub async fn connections(&self, subject: Option<&str>) -> Result<Vec<ConnectionRow>, VaultError> {
        Ok(self.store.vault_connections(subject).await?)
    }
}
