//! The gateway's registration at each authorization server: pre-registered, its Client ID
//! Metadata Document, or dynamic registration (kept, checked, and made again when the server
//! forgot it).

use super::*;

impl Vault {
    /// The client identity at the discovered server (see [`Vault::choose_client`]).
    pub(super) async fn client_for(
        &self,
        vs: &VaultServer,
        found: &Discovered,
        redirect_uri: &str,
    ) -> Result<(ClientAuth, ClientKind), VaultError> {
        let chosen = self.choose_client(vs, found, redirect_uri).await?;
        Ok((chosen.auth, chosen.kind))
    }

    /// The client identity at the discovered server, in the order of R83: pre-registered, the
    /// gateway's metadata document, dynamic registration (kept per issuer, R86).
    pub(super) async fn choose_client(
        &self,
        vs: &VaultServer,
        found: &Discovered,
        redirect_uri: &str,
    ) -> Result<Chosen, VaultError> {
        let supported = found.server.token_endpoint_auth_methods_supported.as_deref();
        if let Some(id) = &vs.oauth.client_id {
            // The pre-registered client belongs to one authorization server: an upstream that
            // names another one must not receive its secret (R86, R121).
            if let Some(pinned) = &vs.oauth.issuer
                && *pinned != found.server.issuer
            {
                return Err(VaultError::OAuth(OAuthError::Discovery {
                    detail: format!(
                        "the upstream names the authorization server {}, but this server's client is registered at {pinned}",
                        found.server.issuer
                    ),
                }));
            }
            let secret = self.preregistered_secret(vs).await?;
            let method =
                vs.oauth.token_endpoint_auth_method.unwrap_or_else(|| AuthMethod::choose(secret.is_some(), supported));
            return Ok(Chosen::stored(ClientAuth { client_id: id.clone(), secret, method }, ClientKind::Preregistered));
        }
        if found.server.client_id_metadata_document_supported
            && let Some(id) = &self.cimd_url
        {
            return Ok(Chosen::stored(
                ClientAuth { client_id: id.clone(), secret: None, method: AuthMethod::None },
                ClientKind::Metadata,
            ));
        }
        let issuer = &found.server.issuer;
        if let Some(row) = self.store.vault_client(&vs.name, issuer, redirect_uri).await? {
            return Ok(Chosen::stored(self.client_of(&row)?, ClientKind::Dynamic));
        }
        let Some(endpoint) = &found.server.registration_endpoint else {
            return Err(VaultError::OAuth(OAuthError::Registration {
                detail: format!(
                    "{issuer} offers no dynamic registration and no client metadata documents; register a client there \
                     and set client_id (and client_secret) in this server's auth"
                ),
            }));
        };
        let client = endpoint::register(&self.egress, endpoint, redirect_uri, supported).await?;
        let id = uuid::Uuid::now_v7().to_string();
        let ours = client.client_id.clone();
        let secret = client.secret.as_ref().map(|s| s.expose_secret().to_owned()).unwrap_or_default();
        let sealed = self.seal(crate::store::vault::CLIENTS_TABLE.table, &id, secret.as_bytes())?;
        self.store
            .vault_client_put(&ClientRow {
                id,
                server: vs.name.clone(),
                issuer: issuer.clone(),
                client_id: client.client_id.clone(),
                auth_method: client.method.as_str().to_owned(),
                redirect_uri: redirect_uri.to_owned(),
                sealed,
                created_at: self.now(),
            })
            .await?;
        // A concurrent registration may have been stored first: everybody uses the stored one.
        let stored = self.store.vault_client(&vs.name, issuer, redirect_uri).await?;
        if let Some(row) = stored.filter(|r| r.client_id != ours) {
            return Ok(Chosen::stored(self.client_of(&row)?, ClientKind::Dynamic));
        }
        tracing::info!(server = %vs.name, %issuer, "registered with the upstream's authorization server");
        Ok(Chosen { auth: client, kind: ClientKind::Dynamic, fresh: true })
    }

    pub(super) fn client_of(&self, row: &ClientRow) -> Result<ClientAuth, VaultError> {
        let secret = self.open(crate::store::vault::CLIENTS_TABLE.table, &row.id, &row.sealed)?;
        let secret = String::from_utf8(secret).map_err(|_| VaultError::Crypto("client secret".to_owned()))?;
        Ok(ClientAuth {
            client_id: row.client_id.clone(),
            secret: (!secret.is_empty()).then(|| SecretString::from(secret)),
            method: AuthMethod::parse(&row.auth_method).unwrap_or(AuthMethod::None),
        })
    }

    pub(super) async fn preregistered_secret(&self, vs: &VaultServer) -> Result<Option<SecretString>, VaultError> {
        let Some(name) = &vs.oauth.client_secret else { return Ok(None) };
        let value = self.store.secret_get_shared(name, &self.keys).await.map_err(|e| VaultError::Config {
            detail: format!("the client secret '{name}' of server '{}' could not be read: {e}", vs.name),
        })?;
        value.map(Some).ok_or_else(|| VaultError::Config {
            detail: format!(
                "the client secret '{name}' of server '{}' is not set (portcullis secret set {name})",
                vs.name
            ),
        })
    }

    /// The client identity a flow or a connection used: `client_id` of `kind` for `server` at
    /// `issuer`; `gone` is the error when its dynamic registration no longer exists.
    pub(super) async fn stored_client(
        &self,
        server: &str,
        issuer: &str,
        client_id: &str,
        kind: ClientKind,
        method: AuthMethod,
        gone: impl FnOnce() -> VaultError,
    ) -> Result<ClientAuth, VaultError> {
        match kind {
            ClientKind::Preregistered => Ok(ClientAuth {
                client_id: client_id.to_owned(),
                secret: self.preregistered_secret(self.server(server)?).await?,
                method,
            }),
            ClientKind::Metadata => {
                Ok(ClientAuth { client_id: client_id.to_owned(), secret: None, method: AuthMethod::None })
            }
            ClientKind::Dynamic => {
                let row = self.store.vault_client_by_id(server, issuer, client_id).await?.ok_or_else(gone)?;
                self.client_of(&row)
            }
        }
    }

    /// The client a connection's tokens belong to, for refresh and revocation.
    pub(super) async fn client_of_connection(
        &self,
        conn: &ConnectionRow,
        d: &ConnectionDetails,
    ) -> Result<ClientAuth, VaultError> {
        let gone = || VaultError::NeedsReconnect {
            server: conn.server.clone(),
            reason: "the gateway's registration with the authorization server is gone".to_owned(),
        };
        self.stored_client(&conn.server, &conn.issuer, &conn.client_id, d.client_kind, d.auth_method, gone).await
    }
}
