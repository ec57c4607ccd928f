//! DNS-rebinding guard: `Host` must name this gateway and `Origin`, when a browser sends one,
//! must be trusted. Both failures answer 403.

use std::borrow::Cow;
use std::net::SocketAddr;

use http::HeaderMap;
use http::header::{HOST, ORIGIN};
use url::Url;

use crate::error::GatewayError;

const LOOPBACK_NAMES: &[&str] = &["localhost", "127.0.0.1", "[::1]"];

/// Which `Host` and `Origin` values are accepted. The lists are short (the public URL, the
/// bound address, a few configured extras), so they are searched in order: comparing a few
/// short strings costs less than hashing the header once, and every request passes here.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    hosts: Vec<String>,
    origins: Vec<String>,
    /// On a loopback listener, loopback names are accepted on any port.
    loopback: bool,
}

impl HostPolicy {
    /// Accepts the public URL's authority, the bound address, and the configured extras.
    pub fn new(public_url: &Url, bound: SocketAddr, extra_hosts: &[String], extra_origins: &[String]) -> HostPolicy {
        // The bound address first: on a loopback listener, clients name it most often.
        let mut hosts = vec![bound.to_string()];
        let mut origins = Vec::new();
        if let Some(host) = public_url.host_str() {
            let authority = match public_url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            };
            hosts.push(authority.to_ascii_lowercase());
            origins.push(public_url.origin().ascii_serialization().to_ascii_lowercase());
        }
        hosts.extend(extra_hosts.iter().cloned());
        origins.extend(extra_origins.iter().map(|o| o.trim_end_matches('/').to_owned()));
        HostPolicy { hosts, origins, loopback: bound.ip().is_loopback() }
    }

    fn is_loopback_name(&self, authority: &str) -> bool {
        let name = match authority.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => n,
            _ => authority,
        };
        self.loopback && LOOPBACK_NAMES.contains(&name)
    }

    /// Checks `Host` and `Origin`.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), GatewayError> {
        // Lower-cased only when it has to be: every request passes here, refusals included.
        let host = headers.get(HOST).and_then(|h| h.to_str().ok()).map(|h| {
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(h.to_ascii_lowercase())
            } else {
                Cow::Borrowed(h)
            }
        });
        match host.as_deref() {
            Some(h) if self.hosts.iter().any(|a| a == h) || self.is_loopback_name(h) => {}
            _ => return Err(GatewayError::ForbiddenHost),
        }
        let Some(origin) = headers.get(ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().map_err(|_| GatewayError::ForbiddenOrigin)?.to_ascii_lowercase();
        let trimmed = origin.trim_end_matches('/');
        if self.origins.iter().any(|o| o == trimmed) {
            return Ok(());
        }
        let authority = Url::parse(&origin).ok().and_then(|u| {
            let host = u.host_str()?.to_owned();
            Some(match u.port() {
                Some(p) => format!("{host}:{p}"),
                None => host,
            })
        });
        match authority {
            Some(a) if self.is_loopback_name(&a) => Ok(()),
            _ => Err(GatewayError::ForbiddenOrigin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, host.parse().expect("header"));
        if let Some(o) = origin {
            h.insert(ORIGIN, o.parse().expect("header"));
        }
        h
    }

    #[test]
    fn rebinding_is_refused_and_loopback_accepted() {
        let url = Url::parse("http://127.0.0.1:8080").expect("url");
        let p = HostPolicy::new(&url, "127.0.0.1:8080".parse().expect("addr"), &[], &[]);
        assert!(p.check(&headers("127.0.0.1:8080", None)).is_ok());
        assert!(p.check(&headers("localhost:8080", Some("http://localhost:6274"))).is_ok());
        assert!(p.check(&headers("[::1]:8080", None)).is_ok());
        assert!(matches!(p.check(&headers("evil.example.com", None)), Err(GatewayError::ForbiddenHost)));
        assert!(matches!(
            p.check(&headers("127.0.0.1:8080", Some("http://evil.example.com"))),
            Err(GatewayError::ForbiddenOrigin)
        ));
        assert!(matches!(p.check(&headers("127.0.0.1:8080", Some("null"))), Err(GatewayError::ForbiddenOrigin)));
    }

    #[test]
    fn a_public_listener_accepts_only_its_own_names() {
        let url = Url::parse("https://mcp.example.com").expect("url");
        let p = HostPolicy::new(&url, "0.0.0.0:443".parse().expect("addr"), &["gw.internal:8443".into()], &[]);
        assert!(p.check(&headers("mcp.example.com", Some("https://mcp.example.com"))).is_ok());
        assert!(p.check(&headers("gw.internal:8443", None)).is_ok());
        // Host names are case-insensitive (RFC 9110 §4.2.3).
        assert!(p.check(&headers("MCP.Example.COM", None)).is_ok());
        assert!(p.check(&headers("localhost", None)).is_err());
        assert!(p.check(&headers("EVIL.example.com", None)).is_err());
    }
}
