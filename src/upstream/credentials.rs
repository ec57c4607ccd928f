//! Upstream credentials. Static ones: secrets stored with `portcullis secret set`, read from
//! the store and decrypted on first use, and kept in memory for [`TTL`] so a changed secret
//! reaches upstreams within that time without a restart. OAuth ones come from the vault.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};

use super::UpstreamError;
use crate::config::UpstreamAuth;
use crate::keys::SharedKeyRing;
use crate::oauth::client::challenge::BearerChallenge;
use crate::store::Store;
use crate::vault::{Vault, VaultError};

/// How long a decrypted secret is reused.
pub const TTL: Duration = Duration::from_secs(30);

/// Reads secrets for upstream calls.
pub struct Credentials {
    store: Store,
    keys: SharedKeyRing,
    cache: DashMap<String, (SecretString, Instant)>,
    vault: Option<Arc<Vault>>,
}

/// What an upstream's refusal (401/403) leads to.
pub enum Renewed {
    /// Send again with this header.
    Retry(HeaderName, HeaderValue),
    /// The caller must (re)connect: the error to return.
    Refused(UpstreamError),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(redacted)")
    }
}

impl Credentials {
    /// Credentials read from `store` with `keys`.
    pub fn new(store: Store, keys: SharedKeyRing) -> Arc<Credentials> {
        Arc::new(Credentials { store, keys, cache: DashMap::new(), vault: None })
    }

    /// Credentials that also serve OAuth upstreams from `vault`.
    pub fn with_vault(store: Store, keys: SharedKeyRing, vault: Arc<Vault>) -> Arc<Credentials> {
        Arc::new(Credentials { store, keys, cache: DashMap::new(), vault: Some(vault) })
    }

    /// The store the credentials are read from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The key ring that decrypts them.
    pub fn keys(&self) -> &SharedKeyRing {
        &self.keys
    }

    /// The vault, if the gateway has one.
    pub fn vault(&self) -> Option<&Arc<Vault>> {
        self.vault.as_ref()
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
    /// `caller` is the principal whose connection a per-user OAuth server uses. An OAuth
    /// server the caller has not connected yet gets no header: its 401 and challenge then
    /// start the connection ([`Credentials::refused`]).
    pub async fn header(
        &self,
        server: &str,
        auth: &UpstreamAuth,
        caller: &str,
    ) -> Result<Option<(HeaderName, HeaderValue)>, UpstreamError> {
        if let UpstreamAuth::OAuth(_) = auth {
            let vault = self.vault_for(server)?;
            // Boxed: a token refresh makes a large future, which every request's would carry.
            return match Box::pin(vault.token(server, caller)).await {
                Ok((token, _)) => Ok(Some(bearer(server, &token)?)),
                Err(VaultError::NotConnected { .. } | VaultError::NeedsReconnect { .. }) => Ok(None),
                Err(e) => Err(vault_error(server, e)),
            };
        }
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

    /// The access token a stdio upstream with OAuth gets in its environment, for `caller`;
    /// without a connection, the error that carries the caller's connect link.
    pub async fn env_token(&self, server: &str, caller: &str) -> Result<SecretString, UpstreamError> {
        let vault = self.vault_for(server)?;
        match vault.token(server, caller).await {
            Ok((token, _)) => Ok(token),
            Err(VaultError::NotConnected { .. } | VaultError::NeedsReconnect { .. }) => {
                match self.refused(server, caller, 401, None, None).await? {
                    Renewed::Refused(e) => Err(e),
                    Renewed::Retry(..) => Err(UpstreamError::Credential {
                        server: server.to_owned(),
                        detail: "the connection changed; try again".to_owned(),
                    }),
                }
            }
            Err(e) => Err(vault_error(server, e)),
        }
    }

    /// Whether `caller` still has a usable connection to `server` (for stopping the stdio
    /// processes of people who no longer do).
    pub async fn connected(&self, server: &str, caller: &str) -> bool {
        match &self.vault {
            // A store failure is not a reason to stop anyone's process.
            Some(v) => v.is_connected(server, caller).await.unwrap_or(true),
            None => true,
        }
    }

    fn vault_for(&self, server: &str) -> Result<&Arc<Vault>, UpstreamError> {
        self.vault.as_ref().ok_or_else(|| UpstreamError::Credential {
            server: server.to_owned(),
            detail: "OAuth upstreams need the vault, which this process did not start".to_owned(),
        })
    }

    /// An OAuth upstream refused a request (`status` 401 or 403) that carried `sent` (or no
    /// credential): refresh once and retry (R99), or say how to connect (R94 step-up on
    /// `insufficient_scope`).
    pub async fn refused(
        &self,
        server: &str,
        caller: &str,
        status: u16,
        challenge: Option<&BearerChallenge>,
        sent: Option<&HeaderValue>,
    ) -> Result<Renewed, UpstreamError> {
        let vault = self.vault_for(server)?;
        let insufficient = status == 403 && challenge.and_then(|c| c.error.as_deref()) == Some("insufficient_scope");
        if status == 401
            && let Some(sent) = sent
        {
            let current = vault.token(server, caller).await;
            let renewed = match current {
                Ok((token, generation)) => {
                    let (_, value) = bearer(server, &token)?;
                    if value.as_bytes() == sent.as_bytes() {
                        vault.rejected(server, caller, generation).await
                    } else {
                        Ok((token, generation))
                    }
                }
                Err(e) => Err(e),
            };
            match renewed {
                Ok((token, _)) => {
                    let (name, value) = bearer(server, &token)?;
                    return Ok(Renewed::Retry(name, value));
                }
                Err(VaultError::NotConnected { .. } | VaultError::NeedsReconnect { .. }) => {}
                Err(e) => return Err(vault_error(server, e)),
            }
        } else if status == 403 && !insufficient {
            return Ok(Renewed::Refused(UpstreamError::Status {
                server: server.to_owned(),
                status,
                detail: ": forbidden".to_owned(),
            }));
        }
        let extra = if insufficient { challenge.map(BearerChallenge::scopes).unwrap_or_default() } else { Vec::new() };
        let subject = vault.subject_for(server, caller);
        let reason = if insufficient {
            format!("'{server}' needs more permissions ({}); connect again to grant them", extra.join(" "))
        } else if sent.is_some() {
            format!("the connection to '{server}' no longer works; connect again")
        } else {
            format!("'{server}' needs you to connect your account first")
        };
        if subject.is_empty() && !caller.is_empty() && vault.is_shared(server) {
            // A shared connection is made by an administrator (`portcullis connect`), never
            // through a link handed to whoever called.
            return Ok(Renewed::Refused(UpstreamError::Authorization {
                server: server.to_owned(),
                reason: format!(
                    "{reason} (a shared connection: ask an administrator to run `portcullis connect {server}`)"
                ),
                link: None,
            }));
        }
        if insufficient && !vault.step_up_allowed(server, &subject) {
            return Ok(Renewed::Refused(UpstreamError::Authorization {
                server: server.to_owned(),
                reason: format!(
                    "'{server}' still asks for more permissions ({}) after {} authorizations; ask an administrator",
                    extra.join(" "),
                    crate::vault::STEP_UP_LIMIT
                ),
                link: None,
            }));
        }
        let link = vault.link(server, &subject, challenge, &extra).await.map_err(|e| vault_error(server, e))?;
        Ok(Renewed::Refused(UpstreamError::Authorization { server: server.to_owned(), reason, link: Some(link.url) }))
    }
}

fn bearer(server: &str, token: &SecretString) -> Result<(HeaderName, HeaderValue), UpstreamError> {
    let mut value =
        HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).map_err(|_| UpstreamError::Credential {
            server: server.to_owned(),
            detail: "the upstream access token cannot be sent in a header".to_owned(),
        })?;
    value.set_sensitive(true);
    Ok((http::header::AUTHORIZATION, value))
}

fn vault_error(server: &str, e: VaultError) -> UpstreamError {
    tracing::warn!(server, error = %e, "upstream OAuth failed");
    UpstreamError::Credential { server: server.to_owned(), detail: e.to_string() }
}
