//! The driver the official conformance suite runs in client mode
//! (`conformance client --command "<this binary>" --suite auth`): the gateway's own upstream
//! connector and vault, against the suite's mock MCP server and authorization server.
//!
//! It opens a session, lists tools and calls `test-tool`, through `upstream::Upstream` with
//! `auth = { type = "oauth" }`. When the upstream asks for authorization, the vault hands out
//! a connect link; the driver plays the person who opens it: `Vault::begin_from_link`, then a
//! GET of the authorization URL without following redirects (the mock server approves at
//! once and redirects to the callback), then `Vault::complete` with the callback's query, as
//! the gateway's `/oauth/callback/{server}` does. Test-only: loopback `http` is allowed here.
//!
//! Reads `MCP_CONFORMANCE_SCENARIO` and `MCP_CONFORMANCE_CONTEXT` (pre-registered client
//! credentials); the server URL is the last argument. Exits non-zero on failure.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use portcullis::clock::Clock;
use portcullis::config::OAuthConfig;
use portcullis::config::OutboundConfig;
use portcullis::config::{ServerConfig, ServerTransport, UpstreamAuth};
use portcullis::keys::{Key, KeyRing, SharedKeyRing};
use portcullis::net::Egress;
use portcullis::protocol::jsonrpc::Message;
use portcullis::protocol::session::SessionState;
use portcullis::store::Store;
use portcullis::upstream::credentials::Credentials;
use portcullis::upstream::{ClientHello, Upstream, UpstreamError};
use portcullis::vault::{Vault, VaultServer};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// The Client ID Metadata Document URL the suite expects (`auth/basic-cimd`).
const CIMD_URL: &str = "https://conformance-test.local/client-metadata.json";
const SERVER: &str = "conformance";
/// Authorization attempts per operation (`auth/scope-retry-limit`: at most 3).
const MAX_AUTHORIZATIONS: usize = 3;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conformance client: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let url =
        std::env::args().next_back().ok_or_else(|| anyhow::anyhow!("usage: oauth_conformance_client <server-url>"))?;
    let url = Url::parse(&url)?;
    let scenario = std::env::var("MCP_CONFORMANCE_SCENARIO").unwrap_or_default();
    let context: serde_json::Value =
        std::env::var("MCP_CONFORMANCE_CONTEXT").ok().and_then(|c| serde_json::from_str(&c).ok()).unwrap_or_default();
    eprintln!("scenario {scenario}, server {url}");

    let dir = tempfile::tempdir()?;
    let store = Store::connect(&format!("sqlite://{}/vault.db", dir.path().display())).await?;
    let keys = SharedKeyRing::new(KeyRing::single(Key::random()), None);
    // The person connecting: a principal of the gateway, as in production.
    let caller = store.principal_add("conformance-user", false, &[], 0).await?.map_err(|e| anyhow::anyhow!("{e}"))?.id;
    let outbound = OutboundConfig { allow_http_loopback: true, ..OutboundConfig::default() };
    let mut oauth = OAuthConfig { per_user: true, resource_parameter: true, ..OAuthConfig::default() };
    if let Some(id) = context.get("client_id").and_then(|v| v.as_str()) {
        oauth.client_id = Some(id.to_owned());
        if let Some(secret) = context.get("client_secret").and_then(|v| v.as_str()) {
            store.secret_set("client-secret", &SecretString::from(secret), &keys.current(), 0).await?;
            oauth.client_secret = Some("client-secret".to_owned());
            // An operator pins the issuer a pre-registered client belongs to; here it is
            // whatever the suite's server names, looked up once.
            let egress = Egress::new(portcullis::net::Policy::from_config(&outbound));
            let found =
                portcullis::oauth::client::discovery::discover(&egress, Some(&url), None, &Default::default()).await?;
            oauth.issuer = Some(found.server.issuer);
        }
    }
    // Machine-to-machine scenarios: the client credentials grant, no person involved.
    if scenario.starts_with("auth/client-credentials") {
        oauth.client_credentials = true;
        oauth.per_user = false;
    }
    let vault = Vault::new(
        store.clone(),
        keys.clone(),
        Egress::new(portcullis::net::Policy::from_config(&outbound)),
        Clock::system(),
        Url::parse("http://127.0.0.1:9/")?,
        Some(CIMD_URL.to_owned()),
        vec![VaultServer { name: SERVER.to_owned(), url: Some(url.clone()), oauth: oauth.clone() }],
    );
    let credentials = Credentials::with_vault(store, keys, vault.clone());
    let config = ServerConfig {
        name: SERVER.to_owned(),
        transport: ServerTransport::StreamableHttp { url, stateless: false },
        public: false,
        trusted: false,
        request_timeout: Duration::from_secs(10),
        auth: UpstreamAuth::OAuth(Box::new(oauth)),
        limits: Default::default(),
    };
    let upstream = Upstream::new(&config, reqwest::Client::new(), credentials);
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;

    let hello = ClientHello {
        protocol: "2025-11-25".to_owned(),
        capabilities: serde_json::json!({}),
        client_info: serde_json::json!({"name": "portcullis-conformance", "version": "1"}),
        caller: caller.clone(),
    };
    let mut attempts = 0;
    let opened = loop {
        match upstream.open(&hello, "conformance").await {
            Err(UpstreamError::Authorization { link: Some(link), .. }) => {
                connect(&vault, &browser, &link, &mut attempts).await?;
            }
            other => break other?,
        }
    };
    let session = SessionState {
        version: 1,
        key: "conformance".to_owned(),
        client_protocol: "2025-11-25".to_owned(),
        upstream_protocol: opened.upstream_protocol,
        upstream_session: opened.upstream_session,
        subject: caller.clone(),
        ..SessionState::default()
    };
    let list = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}});
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "test-tool", "arguments": {}}});
    for request in [list, call] {
        let mut attempts = 0;
        loop {
            let message = Message::from_value(&request);
            match upstream.send(&session, message).await {
                Err(UpstreamError::Authorization { link: Some(link), .. }) => {
                    connect(&vault, &browser, &link, &mut attempts).await?;
                }
                Err(e) => return Err(e.into()),
                Ok(reply) => {
                    let answers: Vec<_> = futures::StreamExt::collect(portcullis::upstream::messages_of(reply)).await;
                    eprintln!("{} answered: {}", request["method"], serde_json::Value::from(answers));
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Plays the person who opens the connect link.
async fn connect(
    vault: &Arc<Vault>,
    browser: &reqwest::Client,
    link: &SecretString,
    attempts: &mut usize,
) -> anyhow::Result<()> {
    *attempts += 1;
    if *attempts > MAX_AUTHORIZATIONS {
        anyhow::bail!("still refused after {MAX_AUTHORIZATIONS} authorizations; giving up");
    }
    let link = Url::parse(link.expose_secret())?;
    let secret = link.query_pairs().find(|(k, _)| k == "link").map(|(_, v)| v.into_owned()).unwrap_or_default();
    let authorize = vault.begin_from_link(SERVER, &secret, Some("driver-browser")).await?;
    let resp = browser.get(authorize).send().await?;
    let location = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow::anyhow!("the authorization server answered {} without a redirect", resp.status()))?;
    let callback = Url::parse(location)?;
    let params: HashMap<String, String> = callback.query_pairs().into_owned().collect();
    let connected = vault.complete(SERVER, &params, Some("driver-browser")).await?;
    eprintln!("connected with scopes {:?}", connected.scopes);
    Ok(())
}
