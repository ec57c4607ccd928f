//! The settings of an upstream's OAuth (`auth = { type = "oauth", … }` and
//! `client_credentials`), as the vault and the OAuth client use them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use url::Url;

/// `auth = { type = "oauth", … }` (and `client_credentials`) of one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OAuthConfig {
    /// Each person connects their own account (`true`), or one shared connection (`false`).
    pub per_user: bool,
    /// Machine-to-machine: the client credentials grant, no person involved.
    pub client_credentials: bool,
    /// Scopes always asked for.
    pub scopes: Vec<String>,
    /// A pre-registered client id.
    pub client_id: Option<String>,
    /// The issuer the pre-registered client belongs to: its secret is never sent to another
    /// (R86, R121). Required with `client_secret` unless `metadata_url` pins the server.
    pub issuer: Option<String>,
    /// The name of the stored secret holding the pre-registered client's secret.
    pub client_secret: Option<String>,
    /// Pin the token endpoint authentication method of the pre-registered client.
    pub token_endpoint_auth_method: Option<AuthMethod>,
    /// Authorization server metadata URL, instead of discovery.
    pub metadata_url: Option<Url>,
    /// Extra parameters for the authorization request.
    pub authorization_params: BTreeMap<String, String>,
    /// Send the `resource` parameter (RFC 8707). Providers that refuse it (Entra ID v2) need
    /// `false`. Default `true`.
    pub resource_parameter: bool,
    /// Send `scope` when refreshing (Entra ID needs it). Default `false`.
    pub scope_on_refresh: bool,
    /// For a stdio upstream: the environment variable that carries the access token.
    pub env: Option<String>,
    /// The resource indicator (RFC 8707) to ask tokens for when discovery gives none (a
    /// stdio upstream: the API its tokens are for).
    pub resource: Option<String>,
}

impl OAuthConfig {
    /// Whose connection serves `caller`: their own with `per_user`, else the shared one
    /// (`""`).
    pub fn subject(&self, caller: &str) -> String {
        if self.per_user { caller.to_owned() } else { String::new() }
    }
}

/// How the gateway authenticates at a token endpoint (R97).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `client_secret_basic`.
    ClientSecretBasic,
    /// `client_secret_post`.
    ClientSecretPost,
    /// `none` (public client: CIMD, or a registration without a secret).
    None,
}

impl AuthMethod {
    /// The RFC 7591 name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::None => "none",
        }
    }

    /// From the RFC 7591 name.
    pub fn parse(text: &str) -> Option<AuthMethod> {
        match text {
            "client_secret_basic" => Some(AuthMethod::ClientSecretBasic),
            "client_secret_post" => Some(AuthMethod::ClientSecretPost),
            "none" => Some(AuthMethod::None),
            _ => None,
        }
    }

    /// The method to use for a client with (or without) a secret, among those the server
    /// advertises (RFC 8414 §2: absent means `client_secret_basic`).
    pub fn choose(has_secret: bool, supported: Option<&[String]>) -> AuthMethod {
        let offers = |m: AuthMethod| match supported {
            None => m == AuthMethod::ClientSecretBasic,
            Some(list) => list.iter().any(|s| s == m.as_str()),
        };
        if !has_secret {
            return AuthMethod::None;
        }
        [AuthMethod::ClientSecretBasic, AuthMethod::ClientSecretPost]
            .into_iter()
            .find(|m| offers(*m))
            .unwrap_or(AuthMethod::ClientSecretBasic)
    }
}
