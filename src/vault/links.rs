//! Connect links and the authorization code flow: a single-use link for a person, the start of
//! the flow (discovery, registration, the authorization URL), and its completion at the callback
//! (state, `iss`, the code exchange, the tokens stored encrypted).

use super::*;

impl Vault {
    /// A single-use connect link for `subject` at `server`, remembering what the upstream's
    /// challenge asked for (`extra_scopes` adds step-up scopes, R94).
    pub async fn link(
        &self,
        server: &str,
        subject: &str,
        challenge: Option<&BearerChallenge>,
        extra_scopes: &[String],
    ) -> Result<Link, VaultError> {
        self.server(server)?;
        let remembered;
        let challenge = match challenge {
            Some(c) => {
                // A step-up challenge is about one operation, not the server.
                if c.error.as_deref() != Some("insufficient_scope") {
                    self.challenges.insert(server.to_owned(), c.clone());
                }
                Some(c)
            }
            None => {
                remembered = self.challenges.get(server).map(|c| c.clone());
                remembered.as_ref()
            }
        };
        let secret = random_b64(32)?;
        let now = self.now();
        let details = LinkDetails {
            scopes: union(&challenge.map(BearerChallenge::scopes).unwrap_or_default(), extra_scopes),
            resource_metadata: challenge.and_then(|c| c.resource_metadata.clone()),
        };
        let row = LinkRow {
            id: sha256_hex(&secret),
            server: server.to_owned(),
            subject: subject.to_owned(),
            details: serde_json::to_string(&details).unwrap_or_default(),
            created_at: now,
            expires_at: now + LINK_TTL_SECS,
        };
        self.store.vault_link_put(&row).await?;
        let url = format!("{}/connect/{server}?link={secret}", self.public_url.as_str().trim_end_matches('/'));
        Ok(Link { url: SecretString::from(url), expires_at: row.expires_at })
    }

    /// Uses a connect link for `server` (once) and starts the authorization: the URL to send
    /// the person's browser to.
    ///
    /// `browser` is a secret the caller also gave the browser (a cookie): the callback then
    /// accepts the response only from that browser, so an authorization URL copied out of
    /// this flow and sent to someone else cannot connect their account here.
    pub async fn begin_from_link(
        &self,
        server: &str,
        link_secret: &str,
        browser: Option<&str>,
    ) -> Result<Url, VaultError> {
        self.server(server)?;
        let row =
            self.store.vault_link_use(&sha256_hex(link_secret), server, self.now()).await?.ok_or_else(unusable_link)?;
        let details: LinkDetails = serde_json::from_str(&row.details).unwrap_or_default();
        let challenge = BearerChallenge {
            error: None,
            scope: (!details.scopes.is_empty()).then(|| details.scopes.join(" ")),
            resource_metadata: details.resource_metadata,
        };
        self.begin(server, &row.subject, Some(&challenge), browser).await
    }

    /// Whose connection the link `link_secret` for `server` would make (`''`: the shared
    /// one), without using it: for the page that asks the person to confirm.
    pub async fn peek_link(&self, server: &str, link_secret: &str) -> Result<String, VaultError> {
        self.store
            .vault_link_peek(&sha256_hex(link_secret), server, self.now())
            .await?
            .map(|r| r.subject)
            .ok_or_else(unusable_link)
    }

    /// Discovers, registers and records a flow for `subject` at `server`; returns the
    /// authorization URL (validated against the egress policy, R102). The request is pushed
    /// where the server offers it (RFC 9126), and a dynamic registration the server no longer
    /// knows is made again first (see `authorize`).
    pub async fn begin(
        &self,
        server: &str,
        subject: &str,
        challenge: Option<&BearerChallenge>,
        browser: Option<&str>,
    ) -> Result<Url, VaultError> {
        let vs = self.server(server)?.clone();
        self.check_enabled(subject).await?;
        let pins = Pins { metadata_url: vs.oauth.metadata_url.clone() };
        let found = discovery::discover(&self.egress, vs.url.as_ref(), challenge, &pins).await?;
        let redirect_uri = self.redirect_uri(server);
        let client = self.choose_client(&vs, &found, &redirect_uri).await?;
        let previous = self.store.vault_connection(server, subject).await?.map(|c| challenge::split_scopes(&c.scopes));
        let scopes = self.scopes_for(&vs, &found, challenge, previous.as_deref());
        let pkce_verifier = random_b64(32)?;
        let pkce_challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(pkce_verifier.as_bytes()));
        let state = random_b64(32)?;
        let resource =
            found.resource.clone().or_else(|| vs.oauth.resource.clone()).filter(|_| vs.oauth.resource_parameter);
        let request = authorize::Request {
            redirect_uri: &redirect_uri,
            state: &state,
            code_challenge: &pkce_challenge,
            scopes: &scopes,
            resource: resource.as_deref(),
            extra: &vs.oauth.authorization_params,
        };
        // Pushed (RFC 9126) where offered; either way the gateway makes sure the authorization
        // server still knows its client before the browser goes there.
        let (url, client) = self.authorization_url(&vs, &found, &redirect_uri, client, &request).await?;
        let Chosen { auth: client, kind, .. } = client;
        self.egress.policy().check_url(&url).map_err(OAuthError::from)?;
        let now = self.now();
        let id = sha256_hex(&state);
        let details = FlowDetails {
            redirect_uri,
            scopes,
            resource,
            client_id: client.client_id.clone(),
            client_kind: kind,
            auth_method: client.method,
            metadata: found.server,
            browser: browser.map(sha256_hex),
        };
        let sealed = self.seal(crate::store::vault::FLOWS_TABLE.table, &id, pkce_verifier.as_bytes())?;
        self.store
            .vault_flow_put(&FlowRow {
                id,
                server: server.to_owned(),
                subject: subject.to_owned(),
                details: serde_json::to_string(&details).unwrap_or_default(),
                sealed,
                created_at: now,
                expires_at: now + FLOW_TTL_SECS,
            })
            .await?;
        tracing::info!(server, issuer = %details.metadata.issuer, client = ?kind, "upstream authorization started");
        Ok(url)
    }

    /// Refuses to connect for a person who is disabled (or gone): offboarding must not be
    /// undone by a link or a flow that was still open.
    pub(super) async fn check_enabled(&self, subject: &str) -> Result<(), VaultError> {
        if subject.is_empty() || self.store.principal_enabled(subject).await? {
            return Ok(());
        }
        Err(VaultError::Flow { detail: "the person this connection is for is disabled".to_owned() })
    }

    /// Scope selection (R92–R94): configured scopes, then the challenge's, else everything
    /// the resource metadata lists; previous scopes kept on step-up; `offline_access` when
    /// the authorization server lists it.
    pub(super) fn scopes_for(
        &self,
        vs: &VaultServer,
        found: &Discovered,
        challenge: Option<&BearerChallenge>,
        previous: Option<&[String]>,
    ) -> Vec<String> {
        let asked = challenge.map(BearerChallenge::scopes).unwrap_or_default();
        let mut scopes = if !asked.is_empty() {
            union(&vs.oauth.scopes, &asked)
        } else if !vs.oauth.scopes.is_empty() {
            vs.oauth.scopes.clone()
        } else {
            found.resource_scopes.clone().unwrap_or_default()
        };
        if let Some(prev) = previous.filter(|_| !asked.is_empty()) {
            scopes = union(prev, &scopes);
        }
        let offline = found.server.scopes_supported.as_ref().is_some_and(|s| s.iter().any(|s| s == "offline_access"));
        if offline && !scopes.iter().any(|s| s == "offline_access") {
            scopes.push("offline_access".to_owned());
        }
        scopes
    }

    /// Completes an authorization at `server`'s callback with the response's query
    /// parameters: `state` (single-use, R89), `iss` (RFC 9207, R90), then `error` or `code`.
    ///
    /// `browser` is the secret the browser presents (its cookie); a flow bound to a browser
    /// is completed only by that browser.
    pub async fn complete(
        &self,
        server: &str,
        params: &HashMap<String, String>,
        browser: Option<&str>,
    ) -> Result<Connected, VaultError> {
        let state = params.get("state").ok_or_else(|| VaultError::Flow { detail: "no state".to_owned() })?;
        let flow =
            self.store.vault_flow_take(&sha256_hex(state)).await?.filter(|f| f.expires_at >= self.now()).ok_or_else(
                || VaultError::Flow {
                    detail: "unknown or expired state; start again from the connect link".to_owned(),
                },
            )?;
        if flow.server != server {
            return Err(VaultError::Flow { detail: "this response belongs to another server's callback".to_owned() });
        }
        self.check_enabled(&flow.subject).await?;
        let d: FlowDetails = serde_json::from_str(&flow.details)
            .map_err(|_| VaultError::Flow { detail: "the stored flow is unreadable".to_owned() })?;
        if let Some(expected) = &d.browser
            && browser.map(sha256_hex).as_ref() != Some(expected)
        {
            return Err(VaultError::Flow {
                detail: "this sign-in was started in another browser; open your own connect link".to_owned(),
            });
        }
        match params.get("iss") {
            Some(iss) if *iss != d.metadata.issuer => {
                return Err(VaultError::Flow {
                    detail: format!("the response names issuer {iss:?}, expected {:?}", d.metadata.issuer),
                });
            }
            None if d.metadata.authorization_response_iss_parameter_supported => {
                return Err(VaultError::Flow {
                    detail: "the response lacks the iss parameter its server promised".into(),
                });
            }
            _ => {}
        }
        if let Some(error) = params.get("error") {
            return Err(VaultError::OAuth(OAuthError::Denied {
                error: error.chars().take(64).collect(),
                description: params.get("error_description").map(|d| d.chars().take(200).collect()),
            }));
        }
        let code = params.get("code").ok_or_else(|| VaultError::Flow { detail: "no code".to_owned() })?;
        let verifier = self.open(crate::store::vault::FLOWS_TABLE.table, &flow.id, &flow.sealed)?;
        let verifier = String::from_utf8(verifier).map_err(|_| VaultError::Crypto("verifier".to_owned()))?;
        let gone = || VaultError::Flow { detail: "the registration used for this flow is gone".to_owned() };
        let issuer = &d.metadata.issuer;
        let client = self.stored_client(server, issuer, &d.client_id, d.client_kind, d.auth_method, gone).await?;
        let exchanged = endpoint::exchange_code(
            &self.egress,
            &client,
            &d.metadata.token_endpoint,
            code,
            &verifier,
            &d.redirect_uri,
            d.resource.as_deref(),
        )
        .await
        .map_err(VaultError::from);
        let tokens = match exchanged {
            Ok(t) => t,
            Err(VaultError::OAuth(OAuthError::Token { error: Some(code), detail }))
                if code == "invalid_client" && d.client_kind == ClientKind::Dynamic =>
            {
                // The server forgot the registration between the start and the end of the flow:
                // the next link registers again instead of failing the same way.
                self.store.vault_client_delete(server, issuer, &d.client_id).await?;
                tracing::warn!(server, %issuer, "the authorization server no longer knows the gateway's registration");
                return Err(VaultError::OAuth(OAuthError::Token {
                    error: Some(code),
                    detail: format!("{detail} (the registration was dropped; a new connect link registers again)"),
                }));
            }
            Err(e) => return Err(e),
        };
        let details = ConnectionDetails {
            token_endpoint: d.metadata.token_endpoint.clone(),
            revocation_endpoint: d.metadata.revocation_endpoint.clone(),
            redirect_uri: d.redirect_uri.clone(),
            resource: d.resource.clone(),
            client_kind: d.client_kind,
            auth_method: client.method,
        };
        let connected = self
            .store_tokens(server, &flow.subject, &d.metadata.issuer, &client.client_id, &d.scopes, &details, tokens)
            .await?;
        tracing::info!(server, issuer = %d.metadata.issuer, "upstream connection made");
        Ok(connected)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_tokens(
        &self,
        server: &str,
        subject: &str,
        issuer: &str,
        client_id: &str,
        asked: &[String],
        details: &ConnectionDetails,
        tokens: Tokens,
    ) -> Result<Connected, VaultError> {
        let now = self.now();
        let id = uuid::Uuid::now_v7().to_string();
        let scopes = tokens.scopes.clone().unwrap_or_else(|| asked.to_vec());
        let expires_at = tokens.expires_in.map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
        let sealed = self.seal_tokens(&id, &tokens.access, tokens.refresh.as_ref())?;
        self.store
            .vault_connection_put(&ConnectionRow {
                id,
                server: server.to_owned(),
                subject: subject.to_owned(),
                issuer: issuer.to_owned(),
                client_id: client_id.to_owned(),
                scopes: scopes.join(" "),
                details: serde_json::to_string(details).unwrap_or_default(),
                sealed,
                expires_at,
                status: "active".to_owned(),
                generation: 0,
                created_at: now,
                refreshed_at: None,
                last_error: None,
            })
            .await?;
        self.cache.remove(&(server.to_owned(), subject.to_owned()));
        Ok(Connected { server: server.to_owned(), subject: subject.to_owned(), scopes, expires_at })
    }

    pub(super) fn seal_tokens(
        &self,
        id: &str,
        access: &SecretString,
        refresh: Option<&SecretString>,
    ) -> Result<crate::crypto::Sealed, VaultError> {
        let plain = serde_json::to_vec(&SealedTokens {
            a: access.expose_secret().to_owned(),
            r: refresh.map(|r| r.expose_secret().to_owned()),
        })
        .map_err(|e| VaultError::Crypto(e.to_string()))?;
        self.seal(crate::store::vault::CONNECTIONS_TABLE.table, id, &plain)
    }

    pub(super) fn open_tokens(&self, row: &ConnectionRow) -> Result<(SecretString, Option<SecretString>), VaultError> {
        let plain = self.open(crate::store::vault::CONNECTIONS_TABLE.table, &row.id, &row.sealed)?;
        let t: SealedTokens = serde_json::from_slice(&plain).map_err(|_| VaultError::Crypto("tokens".to_owned()))?;
        Ok((SecretString::from(t.a), t.r.map(SecretString::from)))
    }
}
