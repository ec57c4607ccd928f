//! Static upstream credentials: secrets stored with `portcullis secret set`, read from the
//! store and decrypted on first use, and kept in memory for [`TTL`] so a changed secret
//! reaches upstreams within that time without a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};

use super::UpstreamError;
use crate::config::UpstreamAuth;
use crate::keys::SharedKeyRing;
use crate::store::Store;

/// How long a decrypted secret is reused.
pub const TTL: Duration = Duration::from_secs(30);

/// Reads secrets for upstream calls.
pub struct Credentials {
    store: Store,
    keys: SharedKeyRing,
    cache: DashMap<String, (SecretString, Instant)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(redacted)")
    }
}

impl Credentials {
    /// Credentials read from `store` with `keys`.
    pub fn new(store: Store, keys: SharedKeyRing) -> Arc<Credentials> {
        Arc::new(Credentials { store, keys, cache: DashMap::new() })
    }

    /// The secret named `name`, for `server`'s calls.
    pub async fn secret(&self, server: &str, name: &str) -> Result<SecretString, UpstreamError> {
        if let Some(hit) = self.cache.get(name).filter(|e| e.1.elapsed() < TTL) {
            return Ok(hit.0.clone());
        }
        let missing = |detail: String| UpstreamError::Credential { server: server.to_owned(), detail };
        let value = self.store.secret_get_shared(name, &self.keys).await.map_err(|e| {
            tracing::error!(server, secret = name, error = %e, "an upstream credential could not be read");
            missing(format!("credential '{name}' could not be read"))
        })?;
        let value =
            value.ok_or_else(|| missing(format!("credential '{name}' is not set (portcullis secret set {name})")))?;
        self.cache.insert(name.to_owned(), (value.clone(), Instant::now()));
        Ok(value)
    }

    /// The header an HTTP upstream with `auth` gets, if any; marked sensitive so it is never
    /// printed.
    pub async fn header(
        &self,
        server: &str,
        auth: &UpstreamAuth,
    ) -> Result<Option<(HeaderName, HeaderValue)>, UpstreamError> {
        let UpstreamAuth::StaticHeader { secret, header, prefix } = auth else { return Ok(None) };
        let value = self.secret(server, secret).await?;
        let bad = || UpstreamError::Credential {
            server: server.to_owned(),
            detail: format!("credential '{secret}' cannot be sent in header {header}"),
        };
        let name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| bad())?;
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", value.expose_secret())).map_err(|_| bad())?;
        value.set_sensitive(true);
        Ok(Some((name, value)))
    }
}
