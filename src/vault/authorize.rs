//! The authorization request of a flow, and the check that the authorization server still
//! knows the gateway's client before a browser is sent there.
//!
//! An authorization server that lost the gateway's dynamic registration (restarted without
//! storage, or cleaned it up) would otherwise stop every person at its own error page
//! (`invalid_client`), and the gateway would learn of it only when some refresh failed. So,
//! before answering with the authorization URL:
//!
//! - Where the metadata offers pushed authorization requests (RFC 9126), the request is pushed
//!   with the client's authentication; the push itself is the check. A push that fails for
//!   another reason leaves the request in the browser's URL as before, unless the server
//!   requires pushed requests (`require_pushed_authorization_requests`).
//! - Otherwise, for a stored dynamic registration only, the token endpoint is asked to refresh
//!   a refresh token that was never issued, with the client's authentication. The client is
//!   authenticated before the grant is looked at (RFC 6749 §5.2): `invalid_client` means the
//!   registration is gone, `invalid_grant` that it is known. No authorization code, PKCE state
//!   or code-replay defence is involved. Any other answer lets the flow go on as before.
//!
//! A dynamic registration found gone is deleted and made again, once. A pre-registered client
//! or the gateway's Client ID Metadata Document cannot be re-made by the gateway: the operator
//! gets an error that says so.

use std::collections::BTreeMap;

use url::Url;

use super::{Chosen, ClientKind, Vault, VaultError, VaultServer, random_b64};
use crate::oauth::client::OAuthError;
use crate::oauth::client::discovery::{Discovered, ServerMetadata};
use crate::oauth::client::endpoint::{self, ClientAuth};

/// The parameters of one authorization request (R87–R92), without `client_id`.
pub(super) struct Request<'a> {
    pub redirect_uri: &'a str,
    pub state: &'a str,
    pub code_challenge: &'a str,
    pub scopes: &'a [String],
    pub resource: Option<&'a str>,
    /// The server's configured `authorization_params`.
    pub extra: &'a BTreeMap<String, String>,
}

impl Request<'_> {
    /// The parameters, in the order the front-channel URL has always carried them.
    fn params(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = vec![
            ("response_type".into(), "code".into()),
            ("redirect_uri".into(), self.redirect_uri.into()),
            ("state".into(), self.state.into()),
            ("code_challenge".into(), self.code_challenge.into()),
            ("code_challenge_method".into(), "S256".into()),
        ];
        if !self.scopes.is_empty() {
            p.push(("scope".into(), self.scopes.join(" ")));
        }
        if let Some(r) = self.resource {
            p.push(("resource".into(), r.into()));
        }
        p.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        p
    }
}

/// `endpoint?client_id=…&` followed by `params`.
fn with_query(endpoint: &str, client_id: &str, params: &[(String, String)]) -> Result<Url, VaultError> {
    let mut url = Url::parse(endpoint).map_err(|_| {
        VaultError::OAuth(OAuthError::Discovery { detail: "the authorization_endpoint is not a URL".to_owned() })
    })?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("client_id", client_id);
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    Ok(url)
}

/// What an answer made with the client's authentication says about its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientStatus {
    /// The server knows the client.
    Known,
    /// The server does not know the client (`invalid_client`).
    Gone,
    /// The answer does not say.
    Unclear,
}

impl ClientStatus {
    /// From the OAuth `error` code of an answer to the client's authenticated request.
    pub(super) fn from_error(error: Option<&str>) -> ClientStatus {
        match error {
            Some("invalid_client") => ClientStatus::Gone,
            Some("invalid_grant") => ClientStatus::Known,
            _ => ClientStatus::Unclear,
        }
    }
}

/// What a flow does next about its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Use the client.
    Proceed,
    /// Delete the stored registration and register again.
    Register,
    /// Stop: the operator must act (or the server refuses even a new registration).
    Refuse,
}

/// The decision: only a dynamic registration that was stored before this flow is made again,
/// and only while `retry` (once per flow).
pub(super) fn next(kind: ClientKind, fresh: bool, status: ClientStatus, retry: bool) -> Next {
    match status {
        ClientStatus::Known | ClientStatus::Unclear => Next::Proceed,
        ClientStatus::Gone if kind == ClientKind::Dynamic && !fresh && retry => Next::Register,
        ClientStatus::Gone => Next::Refuse,
    }
}

/// The error for a client the authorization server does not know and the gateway cannot
/// register again, naming what the operator should look at.
fn refused(kind: ClientKind, client: &ClientAuth, server: &ServerMetadata) -> VaultError {
    let issuer = &server.issuer;
    let detail = match kind {
        ClientKind::Preregistered => format!(
            "{issuer} answered invalid_client for the configured client_id {:?}: check client_id and client_secret \
             in this server's auth",
            client.client_id
        ),
        ClientKind::Metadata => format!(
            "{issuer} answered invalid_client for the gateway's client metadata document {}: it must be able to \
             fetch it",
            client.client_id
        ),
        ClientKind::Dynamic => {
            format!("{issuer} answered invalid_client for a registration it made just now")
        }
    };
    VaultError::OAuth(OAuthError::Registration { detail })
}

impl Vault {
    /// The URL to send the browser to for `request`, with the client that the authorization
    /// server was found to know (registered again, once, when its registration was gone).
    pub(super) async fn authorization_url(
        &self,
        vs: &VaultServer,
        found: &Discovered,
        redirect_uri: &str,
        mut client: Chosen,
        request: &Request<'_>,
    ) -> Result<(Url, Chosen), VaultError> {
        let server = &found.server;
        let params = request.params();
        for retry in [true, false] {
            let status = match &server.pushed_authorization_request_endpoint {
                Some(par) => match endpoint::push_authorization(&self.egress, &client.auth, par, &params)
                    .await
                    .map_err(VaultError::from)
                {
                    Ok(pushed) => {
                        let reference = [("request_uri".to_owned(), pushed.request_uri)];
                        let url = with_query(&server.authorization_endpoint, &client.auth.client_id, &reference)?;
                        return Ok((url, client));
                    }
                    Err(VaultError::OAuth(OAuthError::Pushed { error, .. }))
                        if ClientStatus::from_error(error.as_deref()) == ClientStatus::Gone =>
                    {
                        ClientStatus::Gone
                    }
                    // Pushing is optional unless the server requires it: a push that failed for
                    // another reason (a parameter it refuses there, an outage of that endpoint)
                    // leaves the request in the browser's URL, as without pushed requests.
                    Err(e) if !server.require_pushed_authorization_requests => {
                        tracing::warn!(
                            server = %vs.name, issuer = %server.issuer, error = %e,
                            "the pushed authorization request failed; the browser carries the request instead"
                        );
                        ClientStatus::Unclear
                    }
                    Err(e) => return Err(e),
                },
                None if client.kind == ClientKind::Dynamic && !client.fresh => {
                    self.probe(&client.auth, server, request.resource).await?
                }
                None => ClientStatus::Unclear,
            };
            match next(client.kind, client.fresh, status, retry) {
                Next::Proceed => {
                    let url = with_query(&server.authorization_endpoint, &client.auth.client_id, &params)?;
                    return Ok((url, client));
                }
                Next::Refuse => return Err(refused(client.kind, &client.auth, server)),
                Next::Register => {
                    tracing::warn!(
                        server = %vs.name, issuer = %server.issuer,
                        "the authorization server no longer knows the gateway's registration; registering again"
                    );
                    self.store.vault_client_delete(&vs.name, &server.issuer, &client.auth.client_id).await?;
                    client = self.choose_client(vs, found, redirect_uri).await?;
                }
            }
        }
        Err(refused(client.kind, &client.auth, server))
    }

    /// Asks the token endpoint whether it knows `client` (see the module's comment). Tokens,
    /// should a server ever issue any for a made-up refresh token, are dropped.
    async fn probe(
        &self,
        client: &ClientAuth,
        server: &ServerMetadata,
        resource: Option<&str>,
    ) -> Result<ClientStatus, VaultError> {
        let made_up = secrecy::SecretString::from(random_b64(32)?);
        Ok(
            match endpoint::refresh(&self.egress, client, &server.token_endpoint, &made_up, None, resource)
                .await
                .map_err(VaultError::from)
            {
                Err(VaultError::OAuth(OAuthError::Token { error, .. })) => ClientStatus::from_error(error.as_deref()),
                Ok(_) | Err(_) => ClientStatus::Unclear,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stored_dynamic_registration_is_made_again_and_only_once() {
        use ClientKind::*;
        use ClientStatus::*;
        assert_eq!(next(Dynamic, false, Gone, true), Next::Register);
        assert_eq!(next(Dynamic, false, Gone, false), Next::Refuse, "once per flow");
        assert_eq!(next(Dynamic, true, Gone, true), Next::Refuse, "a registration made just now is not redone");
        for kind in [Preregistered, Metadata] {
            assert_eq!(next(kind, false, Gone, true), Next::Refuse, "{kind:?} is the operator's to fix");
        }
        for kind in [Dynamic, Preregistered, Metadata] {
            for status in [Known, Unclear] {
                assert_eq!(next(kind, false, status, true), Next::Proceed, "{kind:?} {status:?}");
            }
        }
    }

    #[test]
    fn only_invalid_client_says_the_registration_is_gone() {
        assert_eq!(ClientStatus::from_error(Some("invalid_client")), ClientStatus::Gone);
        assert_eq!(ClientStatus::from_error(Some("invalid_grant")), ClientStatus::Known);
        for other in [Some("unauthorized_client"), Some("invalid_request"), Some("server_error"), None] {
            assert_eq!(ClientStatus::from_error(other), ClientStatus::Unclear, "{other:?}");
        }
    }

    fn request<'a>(scopes: &'a [String], extra: &'a BTreeMap<String, String>) -> Request<'a> {
        Request {
            redirect_uri: "https://gw.example.com/oauth/callback/acme",
            state: "st",
            code_challenge: "ch",
            scopes,
            resource: Some("https://mcp.example.com/mcp"),
            extra,
        }
    }

    #[test]
    fn the_request_carries_pkce_state_scope_resource_and_extra_parameters() {
        let scopes = ["mcp:tools".to_owned(), "offline_access".to_owned()];
        let extra = BTreeMap::from([("prompt".to_owned(), "consent".to_owned())]);
        let params = request(&scopes, &extra).params();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("response_type"), Some("code"));
        assert_eq!(get("code_challenge_method"), Some("S256"));
        assert_eq!(get("scope"), Some("mcp:tools offline_access"));
        assert_eq!(get("resource"), Some("https://mcp.example.com/mcp"));
        assert_eq!(get("prompt"), Some("consent"));
        assert_eq!(get("client_id"), None, "added by the front channel or the client's authentication");
        let none = BTreeMap::new();
        assert_eq!(request(&[], &none).params().iter().find(|(n, _)| n == "scope"), None);
    }

    #[test]
    fn the_browser_gets_the_client_id_and_only_the_reference_of_a_pushed_request() {
        let reference = [("request_uri".to_owned(), "urn:ietf:params:oauth:request_uri:abc".to_owned())];
        let url = with_query("https://as.example.com/authorize?tenant=1", "c1", &reference).expect("url");
        assert_eq!(
            url.as_str(),
            "https://as.example.com/authorize?tenant=1&client_id=c1&request_uri=urn%3Aietf%3Aparams%3Aoauth%3Arequest_uri%3Aabc"
        );
        assert!(with_query("not a url", "c1", &reference).is_err());
    }
}
