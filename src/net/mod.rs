//! The guarded HTTP client: every URL that comes from an upstream or a client (OAuth metadata,
//! authorization server endpoints, registration, JWKS) is fetched through [`Egress`], never
//! through a plain `reqwest::Client` (R101, R121: upstream metadata is hostile input).
//!
//! The guard, checked at the point of decision rather than after the fact:
//! - `https` only; `http` only to loopback and only with `outbound.allow_http_loopback`
//!   (development and the conformance suite's mocks).
//! - No private, loopback, link-local, shared, multicast or reserved addresses (IPv4, IPv6 and
//!   IPv4 embedded in IPv6) unless the address is in `outbound.allow_networks` (or loopback
//!   with `allow_http_loopback`). IP literals are checked before the request; names are checked
//!   by the client's resolver, and the connection goes to exactly the addresses that passed
//!   (DNS pinned: no second lookup between the check and the connect).
//! - No redirects: a 3xx is an error naming where it pointed.
//! - A time limit per request (connect included) and a size limit per body, enforced while
//!   reading.
//!
//! Operator-chosen upstream URLs (`[[servers]] url`) do not go through here: they are trusted
//! configuration (see `app::upstream_client`).

pub mod ip;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::de::DeserializeOwned;
use url::Url;

mod warnings;

pub use ip::{Class, classify};
pub use warnings::config_warnings;

pub use crate::config::OutboundConfig;

/// What the guard allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Allow `http://` URLs whose host is loopback, and loopback addresses. Development only.
    pub allow_http_loopback: bool,
    /// Networks allowed although not public (on-premises authorization servers).
    pub allow_networks: Vec<IpNet>,
    /// Longest time for one request, from connect to the last byte of the body.
    pub timeout: Duration,
    /// Largest accepted response body.
    pub max_body_bytes: usize,
}

impl Policy {
    /// The policy these settings describe (invalid entries, which the validator reports, are
    /// left out).
    pub fn from_config(config: &OutboundConfig) -> Policy {
        Policy {
            allow_http_loopback: config.allow_http_loopback,
            allow_networks: config.allow_networks.iter().filter_map(|n| n.parse().ok()).collect(),
            timeout: crate::config::parse_duration(&config.timeout).unwrap_or(Policy::default().timeout),
            max_body_bytes: config.max_body_bytes,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_http_loopback: false,
            allow_networks: Vec::new(),
            timeout: Duration::from_secs(10),
            max_body_bytes: 256 * 1024,
        }
    }
}

impl Policy {
    /// Why `addr` may not be reached, if it may not.
    pub fn refuses(&self, addr: IpAddr) -> Option<Class> {
        let class = classify(addr);
        if class == Class::Public || self.allow_networks.iter().any(|n| n.contains(&addr)) {
            return None;
        }
        if class == Class::Loopback && self.allow_http_loopback {
            return None;
        }
        Some(class)
    }

    /// Checks a URL's scheme and, for an IP literal, its address. Names are checked when
    /// they resolve.
    pub fn check_url(&self, url: &Url) -> Result<(), EgressError> {
        if !matches!(url.scheme(), "https" | "http") {
            return Err(EgressError::Url { url: shown(url), reason: "only https is allowed" });
        }
        let host = match url.host() {
            Some(h) => h,
            None => return Err(EgressError::Url { url: shown(url), reason: "it has no host" }),
        };
        let literal = match host {
            url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
            url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
            url::Host::Domain(_) => None,
        };
        let loopback_name = matches!(host, url::Host::Domain(d) if d.eq_ignore_ascii_case("localhost"));
        match url.scheme() {
            "https" => {}
            "http"
                if self.allow_http_loopback
                    && (loopback_name || literal.is_some_and(|a| classify(a) == Class::Loopback)) => {}
            "http" => {
                return Err(EgressError::Url {
                    url: shown(url),
                    reason: "only https is allowed (http only to loopback with outbound.allow_http_loopback)",
                });
            }
            _ => return Err(EgressError::Url { url: shown(url), reason: "only https is allowed" }),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EgressError::Url { url: shown(url), reason: "it carries credentials" });
        }
        if let Some(addr) = literal
            && let Some(class) = self.refuses(addr)
        {
            return Err(EgressError::Address { host: host.to_string(), addr, class });
        }
        Ok(())
    }
}

/// What `[outbound]` would have to say before the guard fetches some URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needed {
    /// Plain `http://` to a host that is not loopback: no switch allows it.
    Https,
    /// A loopback host (or `http://` to one): `allow_http_loopback = true`.
    AllowHttpLoopback,
    /// An address that is not public: a network containing it in `allow_networks`.
    Network(IpAddr, Class),
}

impl std::fmt::Display for Needed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Needed::Https => f.write_str("use https (plain http is allowed only to loopback hosts)"),
            Needed::AllowHttpLoopback => f.write_str("set outbound.allow_http_loopback = true (development only)"),
            Needed::Network(addr, class) => {
                write!(f, "add a network containing {addr} ({class}) to outbound.allow_networks")
            }
        }
    }
}

impl Policy {
    /// What this policy lacks to let the guard fetch `url`, as far as the URL itself shows
    /// (IP literals and `localhost`; other names are judged when they resolve). For
    /// `check-config`'s warnings; fetches still go through [`Policy::check_url`].
    pub fn needs(&self, url: &Url) -> Option<Needed> {
        let (literal, loopback) = match url.host()? {
            url::Host::Ipv4(a) => (Some(IpAddr::V4(a)), classify(IpAddr::V4(a)) == Class::Loopback),
            url::Host::Ipv6(a) => (Some(IpAddr::V6(a)), classify(IpAddr::V6(a)) == Class::Loopback),
            url::Host::Domain(d) => (None, d.eq_ignore_ascii_case("localhost")),
        };
        let http = url.scheme() == "http";
        if http && !loopback {
            return Some(Needed::Https);
        }
        if loopback && !self.allow_http_loopback && (http || literal.is_none_or(|a| self.refuses(a).is_some())) {
            return Some(Needed::AllowHttpLoopback);
        }
        let addr = literal?;
        self.refuses(addr).map(|class| Needed::Network(addr, class))
    }
}

/// Why a guarded fetch failed. Messages name the URL (without query or credentials) and the
/// rule, never a token.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The URL itself is not allowed.
    #[error("refused to fetch {url}: {reason}")]
    Url {
        /// The URL, without its query.
        url: String,
        /// Which rule.
        reason: &'static str,
    },
    /// The host is or resolves to an address the policy refuses.
    #[error("refused to connect to {host} ({addr}): {class} addresses are not allowed")]
    Address {
        /// The host as written.
        host: String,
        /// The refused address.
        addr: IpAddr,
        /// Its class.
        class: Class,
    },
    /// The answer was a redirect, which is never followed.
    #[error("{url} answered {status} redirecting to {location}: redirects are not followed")]
    Redirect {
        /// The URL fetched.
        url: String,
        /// The 3xx status.
        status: StatusCode,
        /// Where it pointed (without its query).
        location: String,
    },
    /// The body exceeded the size limit.
    #[error("{url} answered with more than {limit} bytes")]
    TooLarge {
        /// The URL fetched.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// No complete answer within the time limit.
    #[error("{url} did not answer within {}s", .timeout.as_secs_f64())]
    Timeout {
        /// The URL fetched.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer was not the JSON expected.
    #[error("{url} answered with a body that is not the expected JSON: {reason}")]
    Json {
        /// The URL fetched.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Connecting or transferring failed.
    #[error("could not fetch {url}: {reason}")]
    Transport {
        /// The URL fetched.
        url: String,
        /// The cause, flattened (guard refusals from the resolver surface as [`EgressError::Address`]).
        reason: String,
    },
}

/// A URL as shown in errors and logs: no query, fragment or credentials.
pub fn shown(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// A fetched answer: status, headers and the whole body (within the limit).
#[derive(Debug)]
pub struct Fetched {
    /// The HTTP status (never a 3xx).
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The URL fetched, as shown in errors.
    pub url: String,
}

impl Fetched {
    /// The body as JSON of type `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, EgressError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| EgressError::Json { url: self.url.clone(), reason: e.to_string() })
    }
}

/// The guarded client. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    /// The guarded client, or why it could not be built: then every fetch is refused. There is
    /// no unguarded client to fall back to.
    client: Result<reqwest::Client, Arc<str>>,
    policy: Arc<Policy>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl Egress {
    /// A client that enforces `policy`.
    /// If the client cannot be built (only a broken TLS backend fails here), the error is
    /// logged and every fetch through this `Egress` is refused with it: nothing falls back to
    /// a client without the guard.
    pub fn new(policy: Policy) -> Egress {
        let policy = Arc::new(policy);
        let built = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(GuardedResolver { policy: policy.clone() })
            .connect_timeout(policy.timeout)
            .timeout(policy.timeout)
            .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")));
        Egress::from_builder(built, policy)
    }

    fn from_builder(builder: reqwest::ClientBuilder, policy: Arc<Policy>) -> Egress {
        let client = builder.build().map_err(|e| {
            tracing::error!(error = %e, "the guarded outbound HTTP client cannot be built; outbound fetches are refused");
            Arc::from(format!("the guarded HTTP client could not be built: {e}"))
        });
        Egress { client, policy }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// `GET url`.
    pub async fn get(&self, url: &Url, headers: HeaderMap) -> Result<Fetched, EgressError> {
        self.send(Method::GET, url, headers, None).await
    }

    /// `POST url` with a form body (`application/x-www-form-urlencoded`).
    pub async fn post_form(
        &self,
        url: &Url,
        headers: HeaderMap,
        form: &[(&str, &str)],
    ) -> Result<Fetched, EgressError> {
        let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let mut headers = headers;
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-www-form-urlencoded"));
        self.send(Method::POST, url, headers, Some(Bytes::from(body))).await
    }

    /// `POST url` with a JSON body.
    pub async fn post_json(
        &self,
        url: &Url,
        headers: HeaderMap,
        body: &serde_json::Value,
    ) -> Result<Fetched, EgressError> {
        let mut headers = headers;
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        self.send(Method::POST, url, headers, Some(Bytes::from(body.to_string()))).await
    }

    /// One request under the guard: URL check, pinned resolution, no redirects, the time limit
    /// over the whole exchange and the size limit while reading.
    pub async fn send(
        &self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Fetched, EgressError> {
        self.policy.check_url(url)?;
        let shown_url = shown(url);
        let timeout = self.policy.timeout;
        let client = self
            .client
            .as_ref()
            .map_err(|why| EgressError::Transport { url: shown_url.clone(), reason: why.to_string() })?;
        let exchange = async {
            let mut req = client.request(method, url.clone()).headers(headers);
            if let Some(body) = body {
                req = req.body(body);
            }
            let resp = req.send().await.map_err(|e| self.transport_error(url, e))?;
            let status = resp.status();
            if status.is_redirection() {
                let location = resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(|l| url.join(l).map(|u| shown(&u)).unwrap_or_else(|_| "an invalid URL".to_owned()))
                    .unwrap_or_else(|| "nowhere".to_owned());
                return Err(EgressError::Redirect { url: shown_url.clone(), status, location });
            }
            let limit = self.policy.max_body_bytes;
            if resp.content_length().is_some_and(|n| n > limit as u64) {
                return Err(EgressError::TooLarge { url: shown_url.clone(), limit });
            }
            let headers = resp.headers().clone();
            let mut resp = resp;
            let mut body = BytesMut::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport_error(url, e))? {
                if body.len() + chunk.len() > limit {
                    return Err(EgressError::TooLarge { url: shown_url.clone(), limit });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Fetched { status, headers, body: body.freeze(), url: shown_url.clone() })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(EgressError::Timeout { url: shown_url, timeout }),
        }
    }

    /// Flattens a reqwest error; a refusal by the resolver becomes [`EgressError::Address`].
    fn transport_error(&self, url: &Url, e: reqwest::Error) -> EgressError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if let Some(refused) = err.downcast_ref::<Refused>() {
                return EgressError::Address { host: refused.host.clone(), addr: refused.addr, class: refused.class };
            }
            source = err.source();
        }
        if e.is_timeout() {
            return EgressError::Timeout { url: shown(url), timeout: self.policy.timeout };
        }
        // Without the URL: it may carry a query, and the error names the URL shown anyway.
        let e = e.without_url();
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(err) = source {
            reason.push_str(": ");
            reason.push_str(&err.to_string());
            source = err.source();
        }
        EgressError::Transport { url: shown(url), reason }
    }
}

/// A resolver refusal, carried through reqwest's error chain.
#[derive(Debug, thiserror::Error)]
#[error("refused to connect to {host} ({addr}): {class} addresses are not allowed")]
struct Refused {
    host: String,
    addr: IpAddr,
    class: Class,
}

/// Resolves with the system resolver, then refuses the name if any of its addresses is not
/// allowed (a name that mixes public and private addresses is refused whole, so a second
/// lookup cannot pick the private one). The connection uses exactly these addresses.
struct GuardedResolver {
    policy: Arc<Policy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for a in &addrs {
                if let Some(class) = policy.refuses(a.ip()) {
                    return Err(
                        Box::new(Refused { host, addr: a.ip(), class }) as Box<dyn std::error::Error + Send + Sync>
                    );
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests;
