//! Configured URLs this guard will refuse: settings that are valid but will not work as written: `check-config` prints them, `serve`
//! logs them at start.

use url::Url;

use super::Policy;
use crate::config::{Config, ServerTransport, UpstreamAuth};

/// One line per warning, naming the server, the URL and what to change. Today: OAuth
/// upstreams whose discovery or provider URLs the `[outbound]` guard will refuse (the
/// upstream's own URL is trusted for MCP traffic, but its OAuth metadata is fetched through
/// the guard).
pub fn config_warnings(config: &Config) -> Vec<String> {
    {
        let policy = Policy::from_config(&config.outbound);
        let mut warnings = Vec::new();
        for server in &config.servers {
            let UpstreamAuth::OAuth(oauth) = &server.auth else { continue };
            let upstream = match &server.transport {
                ServerTransport::StreamableHttp { url, .. } | ServerTransport::Sse { url } => Some(url.clone()),
                ServerTransport::Stdio { .. } => None,
            };
            let issuer = oauth.issuer.as_deref().and_then(|i| Url::parse(i).ok());
            for (key, url) in
                [("url", upstream), ("auth.metadata_url", oauth.metadata_url.clone()), ("auth.issuer", issuer)]
            {
                let Some(url) = url else { continue };
                if let Some(needed) = policy.needs(&url) {
                    warnings.push(format!(
                        "server {:?}: {key} {} is fetched for OAuth through the [outbound] guard, which refuses it: {needed}",
                        server.name,
                        super::shown(&url)
                    ));
                }
            }
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback OAuth upstream and a provider on a private address.
    const LOCAL_AND_ONPREM: &str = r#"
[[servers]]
name = "local"
url = "http://127.0.0.1:9000/mcp"
auth = { type = "oauth" }

[[servers]]
name = "onprem"
url = "https://mcp.example.com/mcp"
auth = { type = "client_credentials", client_id = "c", issuer = "https://10.1.2.3/realms/x" }
"#;

    fn warnings(text: &str) -> Vec<String> {
        config_warnings(&Config::parse(text, "test.toml", Vec::new()).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn oauth_providers_the_guard_refuses_are_named_with_the_switch_to_set() {
        let text = LOCAL_AND_ONPREM.to_owned()
            + r#"
[[servers]]
name = "plain"
url = "https://mcp.example.com/mcp"
auth = { type = "oauth", metadata_url = "http://idp.example.com/.well-known/oauth-authorization-server" }

[[servers]]
name = "fine"
url = "https://mcp.example.com/mcp"
auth = { type = "oauth", metadata_url = "https://idp.example.com/.well-known/oauth-authorization-server" }

[[servers]]
name = "static"
url = "http://127.0.0.1:9001/mcp"
"#;
        let all = warnings(&text);
        assert_eq!(all.len(), 3, "{all:#?}");
        assert!(all[0].starts_with("server \"local\": url http://127.0.0.1:9000/mcp "), "{}", all[0]);
        assert!(all[0].ends_with("set outbound.allow_http_loopback = true (development only)"), "{}", all[0]);
        assert!(all[1].starts_with("server \"onprem\": auth.issuer https://10.1.2.3/realms/x "), "{}", all[1]);
        assert!(
            all[1].ends_with("add a network containing 10.1.2.3 (private) to outbound.allow_networks"),
            "{}",
            all[1]
        );
        assert!(all[2].starts_with("server \"plain\": auth.metadata_url http://idp.example.com/"), "{}", all[2]);
        assert!(all[2].ends_with("use https (plain http is allowed only to loopback hosts)"), "{}", all[2]);
    }

    #[test]
    fn the_switches_silence_them() {
        let text = r#"
[outbound]
allow_http_loopback = true
allow_networks = ["10.1.0.0/16"]
"#
        .to_owned()
            + LOCAL_AND_ONPREM;
        assert_eq!(warnings(&text), Vec::<String>::new());
    }
}
