//! The authorization server's endpoints: dynamic client registration (RFC 7591), the token
//! endpoint (authorization code, refresh, client credentials; through the `oauth2` crate) and
//! revocation (RFC 7009). Every request goes through [`Egress`]; no value here is logged.

use bytes::Bytes;
use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AuthType, AuthorizationCode, ClientId, ClientSecret, EndpointNotSet, EndpointSet, PkceCodeVerifier, RedirectUrl,
    RefreshToken, RequestTokenError, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::OAuthError;
use crate::config::AuthMethod;
use crate::net::{Egress, EgressError};

/// The gateway's identity at one authorization server.
#[derive(Clone)]
pub struct ClientAuth {
    /// `client_id`.
    pub client_id: String,
    /// `client_secret`, if it has one.
    pub secret: Option<SecretString>,
    /// How it authenticates.
    pub method: AuthMethod,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("client_id", &self.client_id)
            .field("secret", &self.secret.as_ref().map(|_| "redacted"))
            .field("method", &self.method)
            .finish()
    }
}

/// Tokens from a token endpoint.
pub struct Tokens {
    /// The access token.
    pub access: SecretString,
    /// A refresh token, if one was issued.
    pub refresh: Option<SecretString>,
    /// Lifetime in seconds, if given.
    pub expires_in: Option<u64>,
    /// Granted scopes, if the server said.
    pub scopes: Option<Vec<String>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("refresh", &self.refresh.is_some())
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// A dynamic client registration (RFC 7591 §3.1), as a web application (R85).
pub async fn register(
    egress: &Egress,
    endpoint: &str,
    redirect_uri: &str,
    supported_methods: Option<&[String]>,
) -> Result<ClientAuth, OAuthError> {
    let url = parse(endpoint, "registration_endpoint")?;
    // A confidential client when the server allows it; a public one when it only takes `none`.
    let wanted = match supported_methods {
        Some(list) if !list.iter().any(|m| m == "client_secret_basic" || m == "client_secret_post") => AuthMethod::None,
        other => AuthMethod::choose(true, other),
    };
    let body = serde_json::json!({
        "client_name": "Portcullis",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": wanted.as_str(),
        "application_type": "web",
    });
    let fetched = egress.post_json(&url, json_accept(), &body).await?;
    if !fetched.status.is_success() {
        let err: OAuthErrorBody = serde_json::from_slice(&fetched.body).unwrap_or_default();
        return Err(OAuthError::Registration {
            detail: format!(
                "{} refused the registration (HTTP {}{})",
                fetched.url,
                fetched.status.as_u16(),
                err.describe()
            ),
        });
    }
    #[derive(Deserialize)]
    struct Registered {
        client_id: String,
        #[serde(default)]
        client_secret: Option<String>,
        #[serde(default)]
        token_endpoint_auth_method: Option<String>,
    }
    let reg: Registered = fetched.json()?;
    let secret = reg.client_secret.filter(|s| !s.is_empty()).map(SecretString::from);
    let method = match reg.token_endpoint_auth_method.as_deref().and_then(AuthMethod::parse) {
        Some(m) => m,
        None if secret.is_some() => {
            if wanted == AuthMethod::None {
                AuthMethod::choose(true, supported_methods)
            } else {
                wanted
            }
        }
        None => AuthMethod::None,
    };
    if method != AuthMethod::None && secret.is_none() {
        return Err(OAuthError::Registration {
            detail: format!("{} registered a client for {} without a secret", fetched.url, method.as_str()),
        });
    }
    Ok(ClientAuth { client_id: reg.client_id, secret, method })
}

/// An OAuth error body (RFC 6749 §5.2), for messages. Both fields come from the server: they
/// are cut short and stripped of control characters before anything logs or shows them.
#[derive(Debug, Default, Deserialize)]
struct OAuthErrorBody {
    #[serde(default, deserialize_with = "short_text")]
    error: Option<String>,
    #[serde(default, deserialize_with = "short_text")]
    error_description: Option<String>,
}

/// Longest error code or description kept from a server's answer.
const ERROR_TEXT_CHARS: usize = 200;

fn short_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    Ok(text.map(|t| t.chars().filter(|c| !c.is_control()).take(ERROR_TEXT_CHARS).collect()))
}

impl OAuthErrorBody {
    fn describe(&self) -> String {
        match (&self.error, &self.error_description) {
            (Some(e), Some(d)) => format!(": {e}: {d}"),
            (Some(e), None) => format!(": {e}"),
            _ => String::new(),
        }
    }
}

fn json_accept() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(http::header::ACCEPT, http::HeaderValue::from_static("application/json"));
    h
}

fn parse(url: &str, what: &str) -> Result<Url, OAuthError> {
    Url::parse(url).map_err(|_| OAuthError::Discovery { detail: format!("the {what} is not a URL") })
}

type TokenClient = BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

fn token_client(auth: &ClientAuth, token_endpoint: &str) -> Result<TokenClient, OAuthError> {
    let token_url = TokenUrl::new(token_endpoint.to_owned())
        .map_err(|_| OAuthError::Discovery { detail: "the token_endpoint is not a URL".to_owned() })?;
    let mut client = BasicClient::new(ClientId::new(auth.client_id.clone())).set_token_uri(token_url);
    if let Some(secret) = auth.secret.as_ref().filter(|_| auth.method != AuthMethod::None) {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
    }
    let auth_type = match auth.method {
        AuthMethod::ClientSecretBasic => AuthType::BasicAuth,
        AuthMethod::ClientSecretPost | AuthMethod::None => AuthType::RequestBody,
    };
    Ok(client.set_auth_type(auth_type))
}

/// `oauth2`'s HTTP client: the guard. A named type with a boxed `Send` future (a closure
/// would leave the futures' `Send` proof to higher-ranked inference, which fails).
struct Guarded<'a>(&'a Egress);

impl<'c> oauth2::AsyncHttpClient<'c> for Guarded<'_> {
    type Error = EgressError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, EgressError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(send(self.0, request))
    }
}

/// Sends `oauth2`'s requests through the guard.
async fn send(egress: &Egress, req: oauth2::HttpRequest) -> Result<oauth2::HttpResponse, EgressError> {
    let (parts, body) = req.into_parts();
    let url = Url::parse(&parts.uri.to_string())
        .map_err(|_| EgressError::Url { url: parts.uri.to_string(), reason: "not a URL" })?;
    let fetched = egress.send(parts.method, &url, parts.headers, Some(Bytes::from(body))).await?;
    let mut resp = http::Response::new(fetched.body.to_vec());
    *resp.status_mut() = fetched.status;
    *resp.headers_mut() = fetched.headers;
    Ok(resp)
}

fn tokens(resp: BasicTokenResponse) -> Tokens {
    Tokens {
        access: SecretString::from(resp.access_token().secret().clone()),
        refresh: resp.refresh_token().map(|r| SecretString::from(r.secret().clone())),
        expires_in: resp.expires_in().map(|d| d.as_secs()),
        scopes: resp.scopes().map(|s| s.iter().map(|s| s.to_string()).collect()),
    }
}

fn token_error(e: RequestTokenError<EgressError, oauth2::basic::BasicErrorResponse>) -> OAuthError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let code = match r.error() {
                BasicErrorResponseType::Extension(s) => s.clone(),
                other => other.as_ref().to_owned(),
            };
            let detail = match r.error_description() {
                Some(d) => format!("{code}: {}", d.chars().take(200).collect::<String>()),
                None => code.clone(),
            };
            OAuthError::Token { error: Some(code), detail }
        }
        RequestTokenError::Request(e) => OAuthError::Egress(e),
        RequestTokenError::Parse(e, _) => {
            OAuthError::Token { error: None, detail: format!("the token response is not valid: {}", e.path()) }
        }
        RequestTokenError::Other(s) => OAuthError::Token { error: None, detail: s },
    }
}

/// Exchanges an authorization code (with its PKCE verifier and the resource, R88).
pub async fn exchange_code(
    egress: &Egress,
    auth: &ClientAuth,
    token_endpoint: &str,
    code: &str,
    verifier: &str,
    redirect_uri: &str,
    resource: Option<&str>,
) -> Result<Tokens, OAuthError> {
    let redirect = RedirectUrl::new(redirect_uri.to_owned())
        .map_err(|_| OAuthError::Flow { detail: "the redirect URI is not a URL".to_owned() })?;
    let client = token_client(auth, token_endpoint)?.set_redirect_uri(redirect);
    let http = Guarded(egress);
    let mut req = client
        .exchange_code(AuthorizationCode::new(code.to_owned()))
        .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()));
    if let Some(r) = resource {
        req = req.add_extra_param("resource", r.to_owned());
    }
    req.request_async(&http).await.map(tokens).map_err(token_error)
}

/// Refreshes (R98): `scope` only when asked (some providers require it), `resource` unless
/// disabled.
pub async fn refresh(
    egress: &Egress,
    auth: &ClientAuth,
    token_endpoint: &str,
    refresh_token: &SecretString,
    scopes: Option<&[String]>,
    resource: Option<&str>,
) -> Result<Tokens, OAuthError> {
    let client = token_client(auth, token_endpoint)?;
    let http = Guarded(egress);
    let token = RefreshToken::new(refresh_token.expose_secret().to_owned());
    let mut req = client.exchange_refresh_token(&token);
    if let Some(scopes) = scopes {
        req = req.add_scopes(scopes.iter().map(|s| oauth2::Scope::new(s.clone())));
    }
    if let Some(r) = resource {
        req = req.add_extra_param("resource", r.to_owned());
    }
    req.request_async(&http).await.map(tokens).map_err(token_error)
}

/// The client credentials grant (machine-to-machine upstreams, R104).
pub async fn client_credentials(
    egress: &Egress,
    auth: &ClientAuth,
    token_endpoint: &str,
    scopes: &[String],
    resource: Option<&str>,
) -> Result<Tokens, OAuthError> {
    let client = token_client(auth, token_endpoint)?;
    let http = Guarded(egress);
    let mut req = client.exchange_client_credentials().add_scopes(scopes.iter().map(|s| oauth2::Scope::new(s.clone())));
    if let Some(r) = resource {
        req = req.add_extra_param("resource", r.to_owned());
    }
    req.request_async(&http).await.map(tokens).map_err(token_error)
}

/// Adds the client's authentication to a form POST, as at the token endpoint (RFC 6749
/// §2.3.1): a `Basic` header (marked sensitive), or `client_id` (and `client_secret`) in the
/// form. With `Basic`, `client_id` is not added to the form.
fn authenticate<'a>(
    auth: &'a ClientAuth,
    headers: &mut http::HeaderMap,
    form: &mut Vec<(&'a str, &'a str)>,
) -> Result<(), OAuthError> {
    let secret = auth.secret.as_ref().map(|s| s.expose_secret()).unwrap_or_default();
    match auth.method {
        AuthMethod::ClientSecretBasic => {
            // RFC 6749 §2.3.1: both parts form-encoded before base64.
            let enc = |t: &str| url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>();
            let basic = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{}:{}", enc(&auth.client_id), enc(secret)),
            );
            let mut value = http::HeaderValue::from_str(&format!("Basic {basic}"))
                .map_err(|_| OAuthError::Config { detail: "the client id cannot be sent in a header".to_owned() })?;
            value.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, value);
        }
        AuthMethod::ClientSecretPost => {
            form.push(("client_id", &auth.client_id));
            form.push(("client_secret", secret));
        }
        AuthMethod::None => form.push(("client_id", &auth.client_id)),
    }
    Ok(())
}

/// The longest `request_uri` accepted from a pushed authorization request: it ends up in the
/// browser's URL, and RFC 9126 request URIs are short references.
pub const MAX_REQUEST_URI_LEN: usize = 2048;

/// A pushed authorization request's answer (RFC 9126 §2.2).
pub struct Pushed {
    /// The reference to the pushed request, for the browser's authorization URL.
    pub request_uri: String,
    /// How long the reference stays usable, in seconds.
    pub expires_in: u64,
}

impl std::fmt::Debug for Pushed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pushed").field("expires_in", &self.expires_in).finish_non_exhaustive()
    }
}

/// Pushes an authorization request (RFC 9126 §2.1): `params` are the authorization request's
/// parameters without `client_id`, sent with the client's authentication as at the token
/// endpoint (R97), through the guard.
pub async fn push_authorization(
    egress: &Egress,
    auth: &ClientAuth,
    endpoint: &str,
    params: &[(String, String)],
) -> Result<Pushed, OAuthError> {
    let url = parse(endpoint, "pushed_authorization_request_endpoint")?;
    let mut headers = json_accept();
    let mut form: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    authenticate(auth, &mut headers, &mut form)?;
    if auth.method == AuthMethod::ClientSecretBasic {
        // RFC 9126 §2.1: the request carries `client_id` like any authorization request.
        form.push(("client_id", &auth.client_id));
    }
    let fetched = egress.post_form(&url, headers, &form).await?;
    pushed(fetched.status, &fetched.body, &fetched.url)
}

/// Reads a pushed authorization response: on success a bounded `request_uri` and a positive
/// `expires_in` (RFC 9126 §2.2); on an error answer (§2.3) the OAuth `error` code, kept only
/// for 400 and 401 (the statuses RFC 6749 §5.2 gives client and request errors).
pub fn pushed(status: http::StatusCode, body: &[u8], url: &str) -> Result<Pushed, OAuthError> {
    if !status.is_success() {
        let err: OAuthErrorBody = serde_json::from_slice(body).unwrap_or_default();
        let oauth = matches!(status.as_u16(), 400 | 401);
        return Err(OAuthError::Pushed {
            error: err.error.clone().filter(|_| oauth).map(|e| e.chars().take(64).collect()),
            detail: format!("{url} answered HTTP {}{}", status.as_u16(), err.describe()),
        });
    }
    let invalid = |why: &str| OAuthError::Pushed { error: None, detail: format!("{url} answered {why}") };
    #[derive(Deserialize)]
    struct Answer {
        request_uri: serde_json::Value,
        expires_in: serde_json::Value,
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|_| invalid("without a JSON request_uri and expires_in"))?;
    let request_uri = match answer.request_uri {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= MAX_REQUEST_URI_LEN => s,
        serde_json::Value::String(s) if !s.is_empty() => {
            return Err(invalid(&format!("a request_uri longer than {MAX_REQUEST_URI_LEN} bytes")));
        }
        _ => return Err(invalid("a request_uri that is not a non-empty string")),
    };
    if request_uri.chars().any(char::is_control) {
        return Err(invalid("a request_uri with control characters"));
    }
    let expires_in = answer
        .expires_in
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| invalid("an expires_in that is not a positive integer"))?;
    Ok(Pushed { request_uri, expires_in })
}

/// Revokes a token at the provider (RFC 7009). Sent directly through the guard rather than
/// through `oauth2`, which refuses any non-https revocation URL even where the operator allowed
/// loopback http for development; the guard alone decides which URLs may be used.
pub async fn revoke(
    egress: &Egress,
    auth: &ClientAuth,
    revocation_endpoint: &str,
    token: &SecretString,
    refresh: bool,
) -> Result<(), OAuthError> {
    let url = parse(revocation_endpoint, "revocation_endpoint")?;
    let hint = if refresh { "refresh_token" } else { "access_token" };
    let mut headers = json_accept();
    let mut form: Vec<(&str, &str)> = vec![("token", token.expose_secret()), ("token_type_hint", hint)];
    authenticate(auth, &mut headers, &mut form)?;
    let fetched = egress.post_form(&url, headers, &form).await?;
    if fetched.status.is_success() {
        return Ok(());
    }
    let err: OAuthErrorBody = serde_json::from_slice(&fetched.body).unwrap_or_default();
    Err(OAuthError::Token {
        error: err.error.clone(),
        detail: format!("revocation refused (HTTP {}{})", fetched.status.as_u16(), err.describe()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_method_follows_what_the_server_offers() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(AuthMethod::choose(true, None), AuthMethod::ClientSecretBasic);
        assert_eq!(AuthMethod::choose(true, Some(&list(&["client_secret_post"]))), AuthMethod::ClientSecretPost);
        assert_eq!(
            AuthMethod::choose(true, Some(&list(&["none", "client_secret_basic"]))),
            AuthMethod::ClientSecretBasic
        );
        assert_eq!(AuthMethod::choose(false, Some(&list(&["client_secret_basic"]))), AuthMethod::None);
    }

    #[test]
    fn client_auth_debug_hides_the_secret() {
        let a = ClientAuth {
            client_id: "id".into(),
            secret: Some(SecretString::from("hunter2")),
            method: AuthMethod::ClientSecretBasic,
        };
        assert!(!format!("{a:?}").contains("hunter2"));
    }

    const PAR: &str = "https://as.example.com/par";

    fn answer(status: u16, body: &str) -> Result<Pushed, OAuthError> {
        pushed(http::StatusCode::from_u16(status).expect("status"), body.as_bytes(), PAR)
    }

    #[test]
    fn a_pushed_request_answers_a_bounded_reference_and_a_lifetime() {
        let ok = answer(
            201,
            r#"{"request_uri":"urn:ietf:params:oauth:request_uri:6esc_11ACC5bwc014ltc14eY22c","expires_in":60}"#,
        )
        .expect("accepted");
        assert_eq!(
            (ok.request_uri.as_str(), ok.expires_in),
            ("urn:ietf:params:oauth:request_uri:6esc_11ACC5bwc014ltc14eY22c", 60)
        );
        assert!(!format!("{ok:?}").contains("6esc"), "Debug leaves the reference out");
        assert!(answer(200, r#"{"request_uri":"urn:x","expires_in":90}"#).is_ok(), "200 is taken like 201");
        let longest = "u".repeat(MAX_REQUEST_URI_LEN);
        assert!(answer(201, &format!(r#"{{"request_uri":"{longest}","expires_in":5}}"#)).is_ok());
        for bad in [
            format!(r#"{{"request_uri":"{longest}u","expires_in":5}}"#),
            r#"{"request_uri":"","expires_in":60}"#.to_owned(),
            r#"{"request_uri":42,"expires_in":60}"#.to_owned(),
            r#"{"request_uri":null,"expires_in":60}"#.to_owned(),
            r#"{"request_uri":"urn:x\n","expires_in":60}"#.to_owned(),
            r#"{"request_uri":"urn:x"}"#.to_owned(),
            r#"{"request_uri":"urn:x","expires_in":0}"#.to_owned(),
            r#"{"request_uri":"urn:x","expires_in":-5}"#.to_owned(),
            r#"{"request_uri":"urn:x","expires_in":"60"}"#.to_owned(),
            r#"{"request_uri":"urn:x","expires_in":1.5}"#.to_owned(),
            "not json".to_owned(),
        ] {
            match answer(201, &bad) {
                Err(OAuthError::Pushed { error: None, detail }) => assert!(detail.starts_with(PAR), "{detail}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_refused_push_keeps_the_oauth_error_code_of_a_400_or_401_only() {
        let code = |status: u16, body: &str| match answer(status, body) {
            Err(OAuthError::Pushed { error, detail }) => {
                assert!(detail.contains(&format!("HTTP {status}")), "{detail}");
                error
            }
            other => panic!("{status} {body}: {other:?}"),
        };
        let invalid_client = r#"{"error":"invalid_client","error_description":"client is invalid"}"#;
        assert_eq!(code(401, invalid_client).as_deref(), Some("invalid_client"));
        assert_eq!(code(400, invalid_client).as_deref(), Some("invalid_client"));
        assert_eq!(code(400, r#"{"error":"invalid_request"}"#).as_deref(), Some("invalid_request"));
        assert_eq!(code(500, invalid_client), None, "a server error says nothing about the client");
        assert_eq!(code(429, invalid_client), None);
        assert_eq!(code(401, "<html>no</html>"), None);
    }

    #[test]
    fn client_authentication_goes_in_a_sensitive_header_or_the_form() {
        let basic = ClientAuth {
            client_id: "c 1".into(),
            secret: Some(SecretString::from("s:3")),
            method: AuthMethod::ClientSecretBasic,
        };
        let (mut headers, mut form) = (http::HeaderMap::new(), Vec::new());
        authenticate(&basic, &mut headers, &mut form).expect("basic");
        let value = &headers[http::header::AUTHORIZATION];
        assert!(value.is_sensitive());
        let expected = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "c+1:s%3A3");
        assert_eq!(value.to_str().expect("ascii"), format!("Basic {expected}"));
        assert!(form.is_empty());
        let post = ClientAuth { method: AuthMethod::ClientSecretPost, ..basic.clone() };
        let (mut headers, mut form) = (http::HeaderMap::new(), Vec::new());
        authenticate(&post, &mut headers, &mut form).expect("post");
        assert_eq!(form, vec![("client_id", "c 1"), ("client_secret", "s:3")]);
        assert!(headers.is_empty());
        let public = ClientAuth { client_id: "p".into(), secret: None, method: AuthMethod::None };
        let (mut headers, mut form) = (http::HeaderMap::new(), Vec::new());
        authenticate(&public, &mut headers, &mut form).expect("none");
        assert_eq!(form, vec![("client_id", "p")]);
    }
}
