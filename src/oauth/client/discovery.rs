//! Discovery from an upstream's 401 (R76–R82, R103): the protected resource metadata (the
//! challenge's `resource_metadata`, then the path-inserted well-known URL, then the root one),
//! the authorization server's metadata (OAuth, then OpenID, in the order of RFC 8414 §3.1 and
//! OIDC Discovery §4), and for upstreams on the 2025-03-26 model, metadata at the upstream's
//! origin and then the default endpoints. Every fetch goes through [`Egress`].

use http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use url::Url;

use super::OAuthError;
use super::challenge::BearerChallenge;
use crate::net::{Egress, EgressError};

/// RFC 9728 protected resource metadata (the fields the gateway uses).
#[derive(Debug, Clone, Deserialize)]
pub struct ResourceMetadata {
    /// The resource identifier.
    pub resource: String,
    /// Issuers that can issue tokens for it.
    #[serde(default)]
    pub authorization_servers: Vec<String>,
    /// Scopes the resource knows.
    #[serde(default)]
    pub scopes_supported: Option<Vec<String>>,
}

/// RFC 8414 / OpenID authorization server metadata (the fields the gateway uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerMetadata {
    /// The issuer identifier.
    pub issuer: String,
    /// Where browsers are sent.
    pub authorization_endpoint: String,
    /// Where codes and refresh tokens are exchanged.
    pub token_endpoint: String,
    /// RFC 7591 dynamic client registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_endpoint: Option<String>,
    /// RFC 7009 token revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_endpoint: Option<String>,
    /// RFC 9126 pushed authorization requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_authorization_request_endpoint: Option<String>,
    /// RFC 9126 §5: the server accepts authorization requests only when pushed.
    #[serde(default)]
    pub require_pushed_authorization_requests: bool,
    /// Scopes the server knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes_supported: Option<Vec<String>>,
    /// PKCE methods; must contain `S256` (R82).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_challenge_methods_supported: Option<Vec<String>>,
    /// Client authentication methods at the token endpoint (RFC 8414 default:
    /// `client_secret_basic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    /// Grant types (RFC 8414 default: `authorization_code`, `implicit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_types_supported: Option<Vec<String>>,
    /// Client ID Metadata Documents are accepted as `client_id`.
    #[serde(default)]
    pub client_id_metadata_document_supported: bool,
    /// RFC 9207: authorization responses carry `iss`.
    #[serde(default)]
    pub authorization_response_iss_parameter_supported: bool,
}

/// Everything the vault needs to run a flow against one upstream.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// The resource indicator to send (RFC 8707): the metadata's `resource`, or the upstream
    /// URL when there is no resource metadata; none for a stdio upstream.
    pub resource: Option<String>,
    /// Scopes the resource metadata lists.
    pub resource_scopes: Option<Vec<String>>,
    /// The authorization server.
    pub server: ServerMetadata,
}

/// Options that pin parts of discovery (from the server's `auth` configuration).
#[derive(Debug, Clone, Default)]
pub struct Pins {
    /// Fetch the authorization server metadata from here instead of discovering it.
    pub metadata_url: Option<Url>,
}

/// Runs discovery for the upstream at `upstream`, starting from its challenge if it sent one.
/// An upstream without a URL (stdio) needs `pins.metadata_url`.
pub async fn discover(
    egress: &Egress,
    upstream: Option<&Url>,
    challenge: Option<&BearerChallenge>,
    pins: &Pins,
) -> Result<Discovered, OAuthError> {
    let Some(upstream) = upstream else {
        let url = pins.metadata_url.as_ref().ok_or_else(|| OAuthError::Discovery {
            detail: "a stdio upstream needs metadata_url in its auth".to_owned(),
        })?;
        let server = fetch_server_metadata(egress, url, None).await?.ok_or_else(|| OAuthError::Discovery {
            detail: format!("no authorization server metadata at {}", crate::net::shown(url)),
        })?;
        return checked(Discovered { resource: None, resource_scopes: None, server }, egress);
    };
    let prm = resource_metadata(egress, upstream, challenge).await?;
    if let Some(url) = &pins.metadata_url {
        let server = fetch_server_metadata(egress, url, None).await?.ok_or_else(|| OAuthError::Discovery {
            detail: format!("no authorization server metadata at {}", crate::net::shown(url)),
        })?;
        let (resource, resource_scopes) = match prm {
            Some(p) => (Some(p.resource), p.scopes_supported),
            None => (Some(upstream.to_string()), None),
        };
        return checked(Discovered { resource, resource_scopes, server }, egress);
    }
    let Some(prm) = prm else { return legacy(egress, upstream).await };
    let issuer = prm.authorization_servers.first().cloned().ok_or_else(|| OAuthError::Discovery {
        detail: "the protected resource metadata names no authorization server".to_owned(),
    })?;
    let server = server_metadata(egress, &issuer).await?;
    checked(Discovered { resource: Some(prm.resource), resource_scopes: prm.scopes_supported, server }, egress)
}

/// The PRM, or `None` if the upstream publishes none (2025-03-26 model). A refused or broken
/// fetch is an error; a 4xx/5xx moves on to the next candidate.
async fn resource_metadata(
    egress: &Egress,
    upstream: &Url,
    challenge: Option<&BearerChallenge>,
) -> Result<Option<ResourceMetadata>, OAuthError> {
    let mut candidates = Vec::new();
    if let Some(url) = challenge.and_then(|c| c.resource_metadata.as_deref()) {
        let url = Url::parse(url).map_err(|_| OAuthError::Discovery {
            detail: "the upstream's challenge names a resource_metadata that is not a URL".to_owned(),
        })?;
        candidates.push(url);
    }
    let path = upstream.path().trim_end_matches('/');
    if !path.is_empty() {
        candidates.push(well_known(upstream, "oauth-protected-resource", path));
    }
    candidates.push(well_known(upstream, "oauth-protected-resource", ""));
    for url in candidates {
        let fetched = egress.get(&url, protocol_header()).await?;
        if fetched.status != StatusCode::OK {
            continue;
        }
        let prm: ResourceMetadata = fetched.json()?;
        // R78 (RFC 9728 §3.3, §7.3): the metadata must describe this upstream.
        if !resource_matches(&prm.resource, upstream) {
            return Err(OAuthError::Discovery {
                detail: format!(
                    "the protected resource metadata at {} is for {:?}, not for this upstream ({})",
                    fetched.url,
                    prm.resource,
                    crate::net::shown(upstream)
                ),
            });
        }
        return Ok(Some(prm));
    }
    Ok(None)
}

/// Whether the PRM `resource` names `upstream`: the same URL, or (as the official SDKs accept)
/// the same origin with a path that is a prefix of the upstream's, segment-wise.
pub fn resource_matches(resource: &str, upstream: &Url) -> bool {
    let Ok(r) = Url::parse(resource) else { return false };
    if r.origin() != upstream.origin() || r.query().is_some() && r.query() != upstream.query() {
        return false;
    }
    let rp = r.path().trim_end_matches('/');
    let up = upstream.path().trim_end_matches('/');
    up == rp || up.starts_with(&format!("{rp}/"))
}

/// `scheme://authority/.well-known/{name}{path}` (RFC 9728 §3.1, RFC 8414 §3.1).
fn well_known(base: &Url, name: &str, path: &str) -> Url {
    let mut u = base.clone();
    u.set_path(&format!("/.well-known/{name}{path}"));
    u.set_query(None);
    u.set_fragment(None);
    u
}

fn protocol_header() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("mcp-protocol-version", HeaderValue::from_static(crate::protocol::version::LATEST_STATEFUL));
    h
}

/// The metadata of `issuer` (the exact string from PRM), trying in order, for an issuer with a
/// path: OAuth path-inserted, OpenID path-inserted, OpenID path-appended; without a path:
/// OAuth, then OpenID (R80). The document's `issuer` must equal `issuer` exactly (R81).
pub async fn server_metadata(egress: &Egress, issuer: &str) -> Result<ServerMetadata, OAuthError> {
    let base = Url::parse(issuer)
        .map_err(|_| OAuthError::Discovery { detail: format!("the issuer {issuer:?} is not a URL") })?;
    if base.query().is_some() || base.fragment().is_some() {
        return Err(OAuthError::Discovery { detail: format!("the issuer {issuer:?} has a query or fragment") });
    }
    let path = base.path().trim_end_matches('/').to_owned();
    let candidates = if path.is_empty() {
        vec![well_known(&base, "oauth-authorization-server", ""), well_known(&base, "openid-configuration", "")]
    } else {
        let mut appended = base.clone();
        appended.set_path(&format!("{path}/.well-known/openid-configuration"));
        vec![
            well_known(&base, "oauth-authorization-server", &path),
            well_known(&base, "openid-configuration", &path),
            appended,
        ]
    };
    for url in candidates {
        if let Some(doc) = fetch_server_metadata(egress, &url, Some(issuer)).await? {
            return Ok(doc);
        }
    }
    Err(OAuthError::Discovery { detail: format!("no authorization server metadata found for issuer {issuer}") })
}

/// One metadata document, `None` on a 4xx/5xx. With `issuer`, the document must name it.
async fn fetch_server_metadata(
    egress: &Egress,
    url: &Url,
    issuer: Option<&str>,
) -> Result<Option<ServerMetadata>, OAuthError> {
    let fetched = egress.get(url, protocol_header()).await?;
    if fetched.status != StatusCode::OK {
        return Ok(None);
    }
    let doc: ServerMetadata = fetched.json()?;
    if let Some(issuer) = issuer
        && doc.issuer != issuer
    {
        return Err(OAuthError::Discovery {
            detail: format!(
                "the authorization server metadata at {} names issuer {:?}, expected {issuer:?}",
                fetched.url, doc.issuer
            ),
        });
    }
    Ok(Some(doc))
}

/// 2025-03-26 model (R103): no PRM; metadata at the upstream's origin, else the default
/// endpoints `/authorize`, `/token` and `/register` there.
async fn legacy(egress: &Egress, upstream: &Url) -> Result<Discovered, OAuthError> {
    let origin = upstream.origin().ascii_serialization();
    let url = well_known(upstream, "oauth-authorization-server", "");
    let server = match fetch_server_metadata(egress, &url, None).await? {
        Some(doc) => doc,
        None => ServerMetadata {
            issuer: origin.clone(),
            authorization_endpoint: format!("{origin}/authorize"),
            token_endpoint: format!("{origin}/token"),
            registration_endpoint: Some(format!("{origin}/register")),
            revocation_endpoint: None,
            pushed_authorization_request_endpoint: None,
            require_pushed_authorization_requests: false,
            scopes_supported: None,
            code_challenge_methods_supported: Some(vec!["S256".to_owned()]),
            token_endpoint_auth_methods_supported: None,
            grant_types_supported: None,
            client_id_metadata_document_supported: false,
            authorization_response_iss_parameter_supported: false,
        },
    };
    checked(Discovered { resource: Some(upstream.to_string()), resource_scopes: None, server }, egress)
}

/// Checks a discovered server before anything is sent to it: PKCE S256 (R82) and every
/// endpoint under the egress policy (R101, R102: a `javascript:` or private authorization URL
/// is refused before a browser is ever sent there).
fn checked(d: Discovered, egress: &Egress) -> Result<Discovered, OAuthError> {
    let s256 = d.server.code_challenge_methods_supported.as_ref().is_some_and(|m| m.iter().any(|m| m == "S256"));
    if !s256 {
        return Err(OAuthError::Discovery {
            detail: format!(
                "the authorization server {} does not advertise PKCE S256 (code_challenge_methods_supported)",
                d.server.issuer
            ),
        });
    }
    if d.server.require_pushed_authorization_requests && d.server.pushed_authorization_request_endpoint.is_none() {
        return Err(OAuthError::Discovery {
            detail: format!(
                "the authorization server {} requires pushed authorization requests but names no \
                 pushed_authorization_request_endpoint",
                d.server.issuer
            ),
        });
    }
    let endpoints = [
        ("authorization_endpoint", Some(&d.server.authorization_endpoint)),
        ("token_endpoint", Some(&d.server.token_endpoint)),
        ("registration_endpoint", d.server.registration_endpoint.as_ref()),
        ("revocation_endpoint", d.server.revocation_endpoint.as_ref()),
        ("pushed_authorization_request_endpoint", d.server.pushed_authorization_request_endpoint.as_ref()),
    ];
    for (name, url) in endpoints {
        let Some(url) = url else { continue };
        let parsed = Url::parse(url)
            .map_err(|_| OAuthError::Discovery { detail: format!("the authorization server's {name} is not a URL") })?;
        egress.policy().check_url(&parsed).map_err(|e| match e {
            EgressError::Url { url, reason } => OAuthError::Discovery {
                detail: format!("the authorization server's {name} {url} is refused: {reason}"),
            },
            other => OAuthError::Egress(other),
        })?;
        if let Some(host) = parsed.host()
            && let Some(class) = literal_refused(egress, &host)
        {
            return Err(OAuthError::Discovery {
                detail: format!("the authorization server's {name} points at a {class} address"),
            });
        }
    }
    Ok(d)
}

fn literal_refused(egress: &Egress, host: &url::Host<&str>) -> Option<crate::net::Class> {
    match host {
        url::Host::Ipv4(a) => egress.policy().refuses((*a).into()),
        url::Host::Ipv6(a) => egress.policy().refuses((*a).into()),
        url::Host::Domain(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_matching_is_exact_or_a_same_origin_path_prefix() {
        let up = Url::parse("https://mcp.example.com/v1/mcp").expect("url");
        assert!(resource_matches("https://mcp.example.com/v1/mcp", &up));
        assert!(resource_matches("https://mcp.example.com/v1/mcp/", &up));
        assert!(resource_matches("https://mcp.example.com", &up));
        assert!(resource_matches("https://mcp.example.com/v1", &up));
        assert!(!resource_matches("https://mcp.example.com/v", &up));
        assert!(!resource_matches("https://evil.example.com/v1/mcp", &up));
        assert!(!resource_matches("http://mcp.example.com/v1/mcp", &up));
        assert!(!resource_matches("https://mcp.example.com:444/v1/mcp", &up));
        assert!(!resource_matches("not a url", &up));
    }

    #[test]
    fn well_known_urls_insert_the_path_after_the_origin() {
        let u = Url::parse("https://as.example.com/tenant1?x=1").expect("url");
        assert_eq!(
            well_known(&u, "oauth-authorization-server", "/tenant1").as_str(),
            "https://as.example.com/.well-known/oauth-authorization-server/tenant1"
        );
        assert_eq!(
            well_known(&u, "oauth-protected-resource", "").as_str(),
            "https://as.example.com/.well-known/oauth-protected-resource"
        );
    }
}
