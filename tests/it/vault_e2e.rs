//! The vault end to end: a real OAuth 2 authorization server we did not write (npm
//! `oidc-provider`, `tests/node/oauth-as.mjs`) protects a real MCP server whose token checks
//! come from the official TypeScript SDK (`tests/node/protected-mcp-server.mjs`, JWT access
//! tokens with the resource as audience, rotating refresh tokens). Access tokens live a few
//! seconds, so every test crosses expiries. The tests play the clients (raw MCP over HTTP)
//! and the people who open connect links (a browser that follows no redirect by itself).

use std::time::{Duration, Instant};

use base64::Engine;
use portcullis::authn::token::NewToken;
use portcullis::keys::Key;
use portcullis::store::Store;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::common::*;

/// The authorization server and the protected MCP server.
pub(crate) struct Provider {
    pub(crate) issuer: String,
    mcp: String,
    port: u16,
    pub(crate) ttl: u64,
    _as: Proc,
    _mcp: Proc,
}

async fn spawn_line(script: &str, args: &[String]) -> (Proc, String) {
    let mut child = Command::new(node_dir().join("node_modules/.bin/node"))
        .arg(node_dir().join(script))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let stdout = child.stdout.take().expect("piped");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the fixture starts")
        .expect("reads")
        .expect("a line");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = line.strip_prefix("listening ").unwrap_or_else(|| panic!("{script}: {line}")).trim().to_owned();
    (Proc { child }, url)
}

impl Provider {
    pub(crate) async fn start(ttl: u64) -> Provider {
        let (as_proc, issuer) = spawn_line("oauth-as.mjs", &["--access-ttl".into(), ttl.to_string()]).await;
        let port: u16 = issuer.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        let (mcp_proc, mcp) = spawn_line("protected-mcp-server.mjs", &["--issuer".into(), issuer.clone()]).await;
        Provider { issuer, mcp, port, ttl, _as: as_proc, _mcp: mcp_proc }
    }

    /// Restarts the authorization server on the same port: every client, grant and token is
    /// lost, and its signing key changes.
    async fn restart_authorization_server(&mut self) {
        let _ = self._as.child.start_kill();
        let _ = self._as.child.wait().await;
        let args = ["--port".into(), self.port.to_string(), "--access-ttl".into(), self.ttl.to_string()];
        let (proc, issuer) = spawn_line("oauth-as.mjs", &args).await;
        assert_eq!(issuer, self.issuer);
        self._as = proc;
    }

    async fn as_stats(&self) -> Value {
        reqwest::get(format!("{}/test/stats", self.issuer)).await.expect("stats").json().await.expect("json")
    }

    async fn refreshes(&self) -> u64 {
        self.as_stats().await["token_requests"]["refresh_token"].as_u64().unwrap_or(0)
    }

    /// Revokes `person`'s refresh token at the authorization server, as its admin would
    /// (RFC 7009, with the gateway's own client credentials): the next refresh gets
    /// `invalid_grant`.
    pub(crate) async fn revoke_refresh_token(&self, gw: &TestGateway, key: &Key, store: &Store, person: &str) {
        use secrecy::ExposeSecret;
        let ring = portcullis::keys::KeyRing::single(key.clone());
        let unseal = |table: &str, id: &str, sealed: &portcullis::crypto::Sealed| {
            let plain = ring.decrypt(&portcullis::crypto::row_aad(table, id), sealed).expect("decrypts");
            plain.expose_secret().to_vec()
        };
        let principals = store.principal_list(false).await.expect("store");
        let subject = &principals.iter().find(|p| p.name == person).expect("a principal").id;
        let row = store.vault_connections(Some(subject)).await.expect("rows").remove(0);
        let tokens: Value = serde_json::from_slice(&unseal("vault_connections", &row.id, &row.sealed)).expect("json");
        let callback = format!("{}/oauth/callback/acme", gw.base);
        let client = store.vault_client("acme", &self.issuer, &callback).await.expect("store").expect("registered");
        let client_secret = String::from_utf8(unseal("vault_clients", &client.id, &client.sealed)).expect("utf8");
        let refresh = tokens["r"].as_str().expect("a refresh token");
        let answer = reqwest::Client::new()
            .post(format!("{}/token/revocation", self.issuer))
            .basic_auth(&client.client_id, Some(&client_secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={refresh}&token_type_hint=refresh_token"))
            .send()
            .await
            .expect("the provider answers");
        assert_eq!(answer.status(), 200, "revocation");
    }

    async fn mcp_stats(&self) -> Value {
        let url = self.mcp.replace("/mcp", "/test/stats");
        reqwest::get(url).await.expect("stats").json().await.expect("json")
    }

    /// Gateway configuration: the protected server as `acme`, per-user OAuth.
    pub(crate) fn servers(&self) -> String {
        format!(
            "[outbound]\nallow_http_loopback = true\n\n[[servers]]\nname = \"acme\"\nurl = \"{}\"\nauth = {{ type = \"oauth\" }}\n",
            self.mcp
        )
    }
}

/// A caller: one grant token, one MCP session at a time, raw HTTP.
pub(crate) struct Caller {
    http: reqwest::Client,
    url: String,
    pub(crate) token: String,
    session: Option<String>,
    next_id: u64,
}

impl Caller {
    pub(crate) async fn new(store: &Store, gw_url: &str, name: &str) -> Caller {
        let now = i64::try_from(portcullis::clock::Clock::system().unix_secs()).expect("fits");
        if store.principal_add(name, false, &[], now).await.expect("store").is_err() {
            // Already there (a second replica's caller).
        }
        let token = NewToken::generate();
        store.token_create(name, "e2e", &token.hash(), &None, None, now).await.expect("store").expect("created");
        Caller {
            http: reqwest::Client::new(),
            url: gw_url.to_owned(),
            token: token.expose().to_owned(),
            session: None,
            next_id: 1,
        }
    }

    pub(crate) async fn send(&mut self, body: &Value) -> reqwest::Response {
        post(&self.http, &self.url, body, self.session.as_deref())
            .header("authorization", format!("Bearer {}", self.token))
            .send()
            .await
            .expect("the gateway answers")
    }

    async fn initialize(&mut self) -> Value {
        self.session = None;
        let resp = self.send(&init_body()).await;
        assert_eq!(resp.status(), 200);
        self.session = Some(resp.headers()["mcp-session-id"].to_str().expect("ascii").to_owned());
        let result = messages(resp).await.remove(0)["result"].clone();
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        assert_eq!(self.send(&note).await.status(), 202);
        result
    }

    /// `tools/call`; re-initializes once when the session ended (404), as clients must.
    async fn call(&mut self, tool: &str, args: Value) -> Value {
        for _ in 0..2 {
            if self.session.is_none() {
                self.initialize().await;
            }
            self.next_id += 1;
            let body = json!({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call",
                "params": {"name": tool, "arguments": args}});
            let resp = self.send(&body).await;
            if resp.status() == 404 {
                self.session = None;
                continue;
            }
            assert_eq!(resp.status(), 200, "tools/call {tool}");
            return messages(resp).await.into_iter().find(|m| m.get("id").is_some()).expect("a response");
        }
        panic!("the session ended twice in a row")
    }

    pub(crate) async fn whoami(&mut self) -> String {
        let answer = self.call("whoami", json!({})).await;
        assert_eq!(answer["result"]["isError"], Value::Null, "whoami failed: {answer}");
        answer["result"]["content"][0]["text"].as_str().expect("text").to_owned()
    }
}

/// The connect link in a tool error (or a -32042 error).
pub(crate) fn link_in(answer: &Value) -> String {
    let text = answer["result"]["content"][0]["text"]
        .as_str()
        .or_else(|| answer["error"]["message"].as_str())
        .unwrap_or_else(|| panic!("no link in {answer}"));
    let start = text.find("http://").unwrap_or_else(|| panic!("no link in {text}"));
    text[start..].split_whitespace().next().expect("a link").to_owned()
}

/// A browser that follows no redirect by itself.
fn browser() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

/// Where a redirect points.
fn location(resp: &reqwest::Response) -> Option<String> {
    resp.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The person's confirmation on the page of `link`: its form, posted back from the gateway's
/// own origin.
async fn confirm(browser: &reqwest::Client, link: &str) -> reqwest::Response {
    let url = url::Url::parse(link).expect("link");
    let origin = url.origin().ascii_serialization();
    let secret = url.query_pairs().find(|(k, _)| k == "link").map(|(_, v)| v.into_owned()).expect("secret");
    browser
        .post(format!("{origin}{}", url.path()))
        .header("origin", &origin)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("link={secret}"))
        .send()
        .await
        .expect("confirm")
}

/// Plays the person who opens `link`: the gateway's page, their confirmation (a POST from
/// that page, which sets the flow's browser cookie), the authorization server and its login
/// (completed as `account`), then the gateway's callback with the cookie. Returns the
/// callback page.
pub(crate) async fn open_link(link: &str, account: &str) -> (u16, String) {
    let browser = browser();
    let page = browser.get(link).send().await.expect("connect page");
    assert_eq!(page.status(), 200, "the connect link shows a page first");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    let text = page.text().await.expect("page");
    assert!(text.contains("method=\"post\""), "{text}");
    let resp = confirm(&browser, link).await;
    assert_eq!(resp.status(), 303, "the confirmation redirects to the provider");
    let cookie = resp.headers()["set-cookie"].to_str().expect("cookie").split(';').next().expect("pair").to_owned();
    let authorize = location(&resp).expect("location");
    let resp = browser.get(&authorize).send().await.expect("authorize");
    let interaction = location(&resp).unwrap_or_else(|| panic!("authorize answered {}", resp.status()));
    let resp = browser.get(format!("{interaction}/auto?account={account}")).send().await.expect("login");
    let callback = location(&resp).unwrap_or_else(|| panic!("login answered {}", resp.status()));
    assert!(callback.contains("/oauth/callback/acme?"), "{callback}");
    let resp = browser.get(&callback).header("cookie", cookie).send().await.expect("callback");
    (resp.status().as_u16(), resp.text().await.expect("page"))
}

/// Connects `caller` as `account` from a tool call that asked for it.
pub(crate) async fn connect(caller: &mut Caller, account: &str) {
    let answer = caller.call("whoami", json!({})).await;
    assert_eq!(answer["result"]["isError"], true, "an unconnected call is a tool error: {answer}");
    let (status, page) = open_link(&link_in(&answer), account).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Connected"), "{page}");
}

/// A configuration file for CLI commands against `gw`'s data directory and `provider`'s server.
fn cli_config(gw: &TestGateway, provider: &Provider) -> std::path::PathBuf {
    let config = gw.dir.path().join("cli.toml");
    let text = format!(
        "[gateway]\ndata_dir = {:?}\npublic_url = {:?}\n{}",
        gw.dir.path().display().to_string(),
        gw.base,
        provider.servers()
    );
    std::fs::write(&config, text).expect("config");
    config
}

/// Two people connect their own accounts; each call acts as its own person (R96, R100).
#[tokio::test(flavor = "multi_thread")]
async fn two_people_connect_and_each_call_acts_as_its_own_person() {
    let provider = Provider::start(10).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let mut bob = Caller::new(&store, &gw.url("acme"), "bob").await;

    // Before connecting: the session opens (the gateway answers for it); the gateway never saw
    // the server's tools, so it lists the one that hands out the link; a tool call returns a
    // link made for this caller.
    let init = alice.initialize().await;
    assert_eq!(init["serverInfo"]["version"], "unconnected", "{init}");
    let list = alice.send(&json!({"jsonrpc": "2.0", "id": 50, "method": "tools/list"})).await;
    let tools = messages(list).await[0]["result"]["tools"].clone();
    assert_eq!(tools.as_array().map(Vec::len), Some(1), "{tools}");
    assert_eq!(tools[0]["name"], "connect");
    let session = alice.session.clone();
    let answer = alice.call("whoami", json!({})).await;
    let link = link_in(&answer);
    assert!(link.contains("/connect/acme?link="), "{link}");
    // Someone else's grant cannot use a link twice: it is single-use.
    let (status, page) = open_link(&link, "alice").await;
    assert_eq!((status, page.contains("Connected")), (200, true), "{page}");
    let browser = browser();
    let again = browser.get(&link).send().await.expect("again");
    assert_eq!(again.status(), 400, "a used link is refused");

    // The session that got the link goes on: no new initialize. Its first answer tells the
    // client that the tool list changed, and the stand-in tool now says the account is connected.
    let first = alice
        .send(&json!({"jsonrpc": "2.0", "id": 51, "method": "tools/call",
        "params": {"name": "connect", "arguments": {}}}))
        .await;
    assert_eq!(first.status(), 200);
    let first = messages(first).await;
    assert_eq!(first[0]["method"], "notifications/tools/list_changed", "{first:?}");
    let text = first[1]["result"]["content"][0]["text"].as_str().unwrap_or_default().to_owned();
    assert!(text.contains("is connected"), "{first:?}");
    assert_eq!(alice.whoami().await, "alice");
    assert_eq!(alice.session, session, "the same session continues after connecting");
    connect(&mut bob, "bob").await;
    assert_eq!(bob.whoami().await, "bob");
    assert_eq!(alice.whoami().await, "alice");

    let subjects = provider.mcp_stats().await["subjects"].clone();
    assert!(subjects["alice"].as_u64() >= Some(2) && subjects["bob"].as_u64() >= Some(1), "{subjects}");
    // Tokens are stored encrypted: no access token appears in the database file.
    let rows = store.vault_connections(None).await.expect("rows");
    assert_eq!(rows.len(), 2);
    drop(store);
    gw.stop().await;
}

/// A session of three minutes keeps working across many expiries of 5-second access
/// tokens with rotating refresh tokens, and the client never sees a failure (R98, R99).
#[tokio::test(flavor = "multi_thread")]
async fn a_long_session_survives_many_expiries_invisibly() {
    let provider = Provider::start(5).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    alice.initialize().await;
    connect(&mut alice, "alice").await;
    let before = provider.refreshes().await;
    let start = Instant::now();
    let mut calls = 0;
    while start.elapsed() < Duration::from_secs(180) {
        let answer = alice.call("echo", json!({"text": format!("n{calls}")})).await;
        assert_eq!(answer["result"]["content"][0]["text"], format!("n{calls}"), "call {calls}: {answer}");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let refreshes = provider.refreshes().await - before;
    // About one refresh per lifetime (5 s) over 180 s, never one per call.
    assert!((25..=72).contains(&refreshes), "{refreshes} refreshes for {calls} calls");
    let unauthorized = provider.mcp_stats().await["unauthorized"].as_u64().unwrap_or(0);
    assert!(unauthorized <= 3, "expired tokens were sent {unauthorized} times");
    gw.stop().await;
}

/// Calls at the moment of expiry, spread over two replicas sharing the store at `store_url`,
/// cause exactly one refresh and all succeed (R98: a rotating refresh token is never spent
/// twice; a replica that did not refresh uses the other's token).
async fn calls_at_expiry_over_two_replicas_refresh_once(store_url: &str, per_replica: usize) {
    let provider = Provider::start(5).await;
    let key = Key::random();
    let config = format!("[store]\nurl = \"{store_url}\"\n{}", provider.servers());
    let a = TestGateway::start_keyed(&config, "", key.clone()).await;
    let b = TestGateway::start_keyed(&config, "", key).await;
    let store = Store::connect(store_url).await.expect("store");
    let mut first = Caller::new(&store, &a.url("acme"), "alice").await;
    first.initialize().await;
    connect(&mut first, "alice").await;
    assert_eq!(first.whoami().await, "alice");

    let mut callers = Vec::new();
    for i in 0..2 * per_replica {
        let gw = if i % 2 == 0 { &a } else { &b };
        let mut c = Caller::new(&store, &gw.url("acme"), "alice").await;
        c.initialize().await;
        callers.push(c);
    }
    // Wait until the access token has expired, then call all at once.
    tokio::time::sleep(Duration::from_secs(provider.ttl + 1)).await;
    let before = provider.refreshes().await;
    let calls = callers.into_iter().map(|mut c| tokio::spawn(async move { c.call("whoami", json!({})).await }));
    for answer in futures::future::join_all(calls).await {
        let answer = answer.expect("task");
        assert_eq!(answer["result"]["content"][0]["text"], "alice", "a failed call: {answer}");
    }
    assert_eq!(provider.refreshes().await - before, 1, "exactly one refresh");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_calls_at_expiry_across_two_replicas_on_postgres_refresh_once() {
    let pg = FreshPostgres::create().await;
    calls_at_expiry_over_two_replicas_refresh_once(&pg.url, 25).await;
}

/// On one SQLite file the replicas agree through the connection's refresh lease.
#[tokio::test(flavor = "multi_thread")]
async fn twenty_calls_at_expiry_across_two_replicas_on_one_sqlite_file_refresh_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/shared.db", dir.path().display());
    calls_at_expiry_over_two_replicas_refresh_once(&url, 10).await;
}

/// An authorization server that lost every client and token (restarted) leads to a clean
/// prompt to reconnect, not a loop of failures; reconnecting works (R98 invalid_grant /
/// invalid_client, R86 re-registration).
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_authorization_server_leads_to_a_clean_reconnection() {
    let mut provider = Provider::start(5).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    alice.initialize().await;
    connect(&mut alice, "alice").await;
    assert_eq!(alice.whoami().await, "alice");
    provider.restart_authorization_server().await;

    let answer = alice.call("whoami", json!({})).await;
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    let text = answer["result"]["content"][0]["text"].as_str().unwrap_or_default().to_owned();
    assert!(text.contains("connect"), "{text}");
    let rows = store.vault_connections(None).await.expect("rows");
    assert_eq!(rows[0].status, "reconnect", "the connection is marked, not retried in a loop");
    // Asking again does not hammer the provider: no new refresh attempt for a marked connection.
    let before = provider.as_stats().await["token_requests"]["refresh_token"].as_u64();
    let again = alice.call("whoami", json!({})).await;
    assert_eq!(again["result"]["isError"], true);
    assert_eq!(provider.as_stats().await["token_requests"]["refresh_token"].as_u64(), before);

    let (status, page) = open_link(&link_in(&again), "alice").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(alice.whoami().await, "alice");
    gw.stop().await;
}

/// An authorization server that restarted (and forgot the gateway's dynamic registration) does
/// not stop the next links at its error page: before sending a browser there, the gateway
/// pushes the authorization request (RFC 9126), sees `invalid_client`, registers again once (R86)
/// and pushes again. Both a new person's link (from a tool call) and an administrator's link
/// (`portcullis connect`) complete, with no refresh having to fail first.
#[tokio::test(flavor = "multi_thread")]
async fn links_register_again_when_the_provider_forgot_the_gateway() {
    let stats = links_after_the_provider_forgot_the_gateway(&[]).await;
    assert_eq!(stats["token_requests"]["refresh_token"].as_u64(), Some(0), "no refresh had to fail first: {stats}");
}

/// The same without pushed authorization requests: each link's flow asks the token endpoint
/// about the stored registration first (a made-up refresh token with the client's
/// authentication): `invalid_client` for bob's link (registered again), `invalid_grant` for
/// alice's (the new registration is known).
#[tokio::test(flavor = "multi_thread")]
async fn links_register_again_without_pushed_requests_too() {
    let stats = links_after_the_provider_forgot_the_gateway(&["--no-par".to_owned()]).await;
    assert_eq!(stats["token_requests"]["refresh_token"].as_u64(), Some(2), "one check per link: {stats}");
}

/// Alice connects, the authorization server (started with `as_args`) restarts, then bob's link
/// from a tool call and alice's link from `portcullis connect` both complete and each call acts
/// as its person, with exactly one new registration. Returns the new server's counters.
async fn links_after_the_provider_forgot_the_gateway(as_args: &[String]) -> Value {
    let ttl = 30;
    let args = |port: Option<u16>| {
        let mut a = vec!["--access-ttl".to_owned(), ttl.to_string()];
        a.extend(port.map(|p| ["--port".to_owned(), p.to_string()]).into_iter().flatten());
        a.extend(as_args.iter().cloned());
        a
    };
    let (as_proc, issuer) = spawn_line("oauth-as.mjs", &args(None)).await;
    let port: u16 = issuer.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let (mcp_proc, mcp) = spawn_line("protected-mcp-server.mjs", &["--issuer".into(), issuer.clone()]).await;
    let mut provider = Provider { issuer, mcp, port, ttl, _as: as_proc, _mcp: mcp_proc };
    let key = Key::random();
    let gw = TestGateway::start_keyed(&provider.servers(), "", key.clone()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let mut bob = Caller::new(&store, &gw.url("acme"), "bob").await;
    connect(&mut alice, "alice").await;
    assert_eq!(alice.whoami().await, "alice");
    let redirect = format!("{}/oauth/callback/acme", gw.base);
    let before = store.vault_client("acme", &provider.issuer, &redirect).await.expect("store").expect("registered");

    // The provider restarts on the same port: every client, grant and token is gone (its
    // counters too).
    let _ = provider._as.child.start_kill();
    let _ = provider._as.child.wait().await;
    let (as_proc, issuer) = spawn_line("oauth-as.mjs", &args(Some(provider.port))).await;
    assert_eq!(issuer, provider.issuer);
    provider._as = as_proc;

    // Two links are handed out while the gateway still holds the stale registration: bob's,
    // from his first tool call, and alice's, from an administrator.
    let answer = bob.call("whoami", json!({})).await;
    assert_eq!(answer["result"]["isError"], true, "an unconnected call is a tool error: {answer}");
    let bobs_link = link_in(&answer);
    let config = cli_config(&gw, &provider);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&config)
        .args(["connect", "acme", "--user", "alice"])
        .env("PORTCULLIS_MASTER_KEY", base64::engine::general_purpose::STANDARD.encode(key.bytes()))
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let alices_link = String::from_utf8_lossy(&out.stdout).lines().last().expect("a link").to_owned();

    let (status, page) = open_link(&bobs_link, "bob").await;
    assert_eq!((status, page.contains("Connected")), (200, true), "{page}");
    let (status, page) = open_link(&alices_link, "alice").await;
    assert_eq!((status, page.contains("Connected")), (200, true), "{page}");
    assert_eq!(bob.whoami().await, "bob");
    assert_eq!(alice.whoami().await, "alice");

    let stats = provider.as_stats().await;
    assert_eq!(stats["registrations"].as_u64(), Some(1), "exactly one new registration: {stats}");
    let after = store.vault_client("acme", &provider.issuer, &redirect).await.expect("store").expect("registered");
    assert_ne!(after.client_id, before.client_id, "the stale registration was replaced");
    let rows = store.vault_connections(None).await.expect("rows");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.client_id == after.client_id && r.status == "active"), "both use the new client");
    gw.stop().await;
    stats
}

/// A provider that forgets the gateway between the start of a flow and its callback: the code
/// exchange answers `invalid_client`, the callback says so, and the dynamic registration is
/// dropped, so the next link registers again and completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_code_exchange_refused_with_invalid_client_drops_the_registration() {
    let mut provider = Provider::start(30).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let link = link_in(&alice.call("whoami", json!({})).await);
    let browser = browser();
    let resp = confirm(&browser, &link).await;
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"].to_str().expect("cookie").split(';').next().expect("pair").to_owned();
    let authorize = location(&resp).expect("location");
    assert!(authorize.contains("request_uri="), "the request was pushed: {authorize}");
    let resp = browser.get(&authorize).send().await.expect("authorize");
    let interaction = location(&resp).unwrap_or_else(|| panic!("authorize answered {}", resp.status()));
    let resp = browser.get(format!("{interaction}/auto?account=alice")).send().await.expect("login");
    let callback = location(&resp).expect("callback");

    provider.restart_authorization_server().await;
    let redirect = format!("{}/oauth/callback/acme", gw.base);
    assert!(store.vault_client("acme", &provider.issuer, &redirect).await.expect("store").is_some());
    let resp = browser.get(&callback).header("cookie", cookie).send().await.expect("callback");
    assert_eq!(resp.status(), 502);
    let page = resp.text().await.expect("page");
    assert!(page.contains("invalid_client"), "{page}");
    assert!(store.vault_client("acme", &provider.issuer, &redirect).await.expect("store").is_none(), "dropped");

    let (status, page) = open_link(&link_in(&alice.call("whoami", json!({})).await), "alice").await;
    assert_eq!((status, page.contains("Connected")), (200, true), "{page}");
    assert_eq!(alice.whoami().await, "alice");
    assert_eq!(provider.as_stats().await["registrations"].as_u64(), Some(1));
    gw.stop().await;
}

/// A pre-registered client the authorization server does not know is the operator's to fix:
/// the pushed request's `invalid_client` stops the flow at the gateway's own page with an
/// error that says so, before any browser reaches the provider, and nothing is registered.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_preregistered_client_is_reported_to_the_operator() {
    let provider = Provider::start(30).await;
    let servers = provider
        .servers()
        .replace("auth = { type = \"oauth\" }", "auth = { type = \"oauth\", client_id = \"never-registered\" }");
    let gw = TestGateway::start(&servers).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let link = link_in(&alice.call("whoami", json!({})).await);
    let resp = confirm(&browser(), &link).await;
    assert_eq!(resp.status(), 502, "no redirect to the provider");
    let page = resp.text().await.expect("page");
    assert!(
        page.contains("invalid_client") && page.contains("never-registered") && page.contains("client_id"),
        "{page}"
    );
    let stats = provider.as_stats().await;
    assert_eq!((stats["registrations"].as_u64(), stats["authorizations"].as_u64()), (Some(0), Some(0)), "{stats}");
    gw.stop().await;
}

/// `portcullis user disable` revokes the person's upstream tokens at the provider (RFC 7009),
/// deletes them, and leaves one audit record with the report.
#[tokio::test(flavor = "multi_thread")]
async fn offboarding_revokes_upstream_tokens_at_the_provider() {
    let provider = Provider::start(30).await;
    let key = Key::random();
    let gw = TestGateway::start_keyed(&provider.servers(), "", key.clone()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    alice.initialize().await;
    connect(&mut alice, "alice").await;
    assert_eq!(alice.whoami().await, "alice");

    let config = cli_config(&gw, &provider);
    let master = base64::engine::general_purpose::STANDARD.encode(key.bytes());
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("PORTCULLIS_MASTER_KEY", &master)
            .output()
            .expect("runs");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // An administrator hands bob a link from the command line: alone on its last line.
    let mut bob = Caller::new(&store, &gw.url("acme"), "bob").await;
    let printed = cli(&["connect", "acme", "--user", "bob"]);
    let link = printed.lines().last().expect("a last line").to_owned();
    assert!(link.starts_with(&format!("{}/connect/acme?link=", gw.base)), "{printed}");
    let (status, page) = open_link(&link, "bob").await;
    assert_eq!((status, page.contains("Connected")), (200, true), "{page}");
    assert_eq!(bob.whoami().await, "bob");
    let shared = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&config)
        .args(["connect", "acme"])
        .env("PORTCULLIS_MASTER_KEY", &master)
        .output()
        .expect("runs");
    assert!(!shared.status.success() && String::from_utf8_lossy(&shared.stderr).contains("--user"));

    let listed = cli(&["connection", "list"]);
    assert!(listed.contains("acme") && listed.contains("alice") && listed.contains("active"), "{listed}");

    // One connection revoked by an administrator: the running gateway stops using it at once
    // (the revocation epoch moves), and the next call asks alice to connect again.
    let revoked = cli(&["connection", "revoke", "acme", "--user", "alice"]);
    assert!(revoked.contains("refresh token revoked at the provider"), "{revoked}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let answer = alice.call("whoami", json!({})).await;
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    let (status, page) = open_link(&link_in(&answer), "alice").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(alice.whoami().await, "alice");

    let report = cli(&["user", "disable", "alice"]);
    assert!(report.contains("acme: refresh token revoked at the provider"), "{report}");
    assert_eq!(provider.as_stats().await["revocations"].as_u64(), Some(2));
    let left = store.vault_connections(None).await.expect("rows");
    assert_eq!(left.len(), 1, "bob's connection stays");
    assert!(!cli(&["connection", "list"]).contains("alice"));
    let audit = cli(&["audit", "export", "--format", "jsonl"]);
    let connects = audit.lines().filter(|l| l.contains("vault/connect") && l.contains("\"allow\"")).count();
    assert!(connects >= 3, "each connection is audited:\n{audit}");
    let record = audit.lines().find(|l| l.contains("admin/user.disable")).expect("an audit record of the offboarding");
    assert!(record.contains("refresh token revoked at the provider") && record.contains("alice"), "{record}");
    gw.stop().await;
}

/// A stdio upstream with per-user OAuth: one process per person with that person's access
/// token in its environment, restarted with every fresh token, and stopped when the person is
/// disabled.
#[tokio::test(flavor = "multi_thread")]
async fn stdio_upstreams_get_one_process_per_person_with_their_token() {
    let provider = Provider::start(5).await;
    let key = Key::random();
    let servers = format!(
        "[outbound]\nallow_http_loopback = true\n\n[[servers]]\nname = \"acme\"\ncommand = {:?}\nargs = [{:?}]\n\
         auth = {{ type = \"oauth\", env = \"UPSTREAM_TOKEN\", scopes = [\"mcp:tools\"], resource = {:?}, \
         metadata_url = \"{}/.well-known/oauth-authorization-server\" }}\n",
        node_dir().join("node_modules/.bin/node").display().to_string(),
        node_dir().join("token-stdio-server.mjs").display().to_string(),
        provider.mcp,
        provider.issuer,
    );
    let gw = TestGateway::start_keyed(&servers, "", key.clone()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let mut bob = Caller::new(&store, &gw.url("acme"), "bob").await;
    for (caller, name) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        let init = caller.initialize().await;
        assert_eq!(init["serverInfo"]["version"], "unconnected", "{init}");
        connect(caller, name).await;
    }
    let parse = |text: String| {
        let mut parts = text.split(' ');
        let sub = parts.next().unwrap_or_default().to_owned();
        let pid: u32 = parts.next().and_then(|p| p.strip_prefix("pid=")).and_then(|p| p.parse().ok()).expect("pid");
        (sub, pid)
    };
    let (who_a, pid_a) = parse(alice.whoami().await);
    let (who_b, pid_b) = parse(bob.whoami().await);
    assert_eq!((who_a.as_str(), who_b.as_str()), ("alice", "bob"));
    assert_ne!(pid_a, pid_b, "one process per person");
    assert_eq!(parse(alice.whoami().await).1, pid_a, "the process is reused while its token is valid");

    // After expiry the token is refreshed and the process restarted with the fresh one.
    tokio::time::sleep(Duration::from_secs(provider.ttl + 1)).await;
    let (who, pid) = parse(alice.whoami().await);
    assert_eq!(who, "alice");
    assert_ne!(pid, pid_a, "restarted with the fresh token");

    // Disabling bob stops his process (and revokes his token at the provider).
    let config = gw.dir.path().join("cli.toml");
    std::fs::write(&config, format!("[gateway]\ndata_dir = {:?}\n{servers}", gw.dir.path().display().to_string()))
        .expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&config)
        .args(["user", "disable", "bob"])
        .env("PORTCULLIS_MASTER_KEY", base64::engine::general_purpose::STANDARD.encode(key.bytes()))
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid_b) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!alive(pid_b), "bob's process was stopped; disable said: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(parse(alice.whoami().await).0, "alice", "alice's process is untouched");
    gw.stop().await;
}

/// The gateway's Client ID Metadata Document (R84): served at an https URL of its own with
/// every server's callback, and not at all when the public URL is not https.
#[tokio::test(flavor = "multi_thread")]
async fn the_client_metadata_document_lists_every_callback() {
    let servers = "[[servers]]\nname = \"a\"\nurl = \"https://a.example.com/mcp\"\nauth = { type = \"oauth\" }\n\n\
                   [[servers]]\nname = \"b\"\nurl = \"https://b.example.com/mcp\"\nauth = { type = \"oauth\" }\n";
    let gw = TestGateway::start_with(servers, "public_url = \"https://gw.example.com\"").await;
    let doc: Value = reqwest::get(format!("{}/oauth/client-metadata.json", gw.base))
        .await
        .expect("served")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["client_id"], "https://gw.example.com/oauth/client-metadata.json");
    assert_eq!(
        doc["redirect_uris"],
        json!(["https://gw.example.com/oauth/callback/a", "https://gw.example.com/oauth/callback/b"])
    );
    assert_eq!(doc["token_endpoint_auth_method"], "none");
    gw.stop().await;
    let plain = TestGateway::start(servers).await;
    let resp = reqwest::get(format!("{}/oauth/client-metadata.json", plain.base)).await.expect("answers");
    assert_eq!(resp.status(), 404);
    plain.stop().await;
}

/// No upstream token, authorization code, PKCE verifier, state or link secret reaches the
/// gateway's logs, even at `debug` (R117): a whole flow, a refresh and a call through
/// `portcullis serve`, then every secret of the flow is looked for in what it printed.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_of_the_flow_reaches_the_logs() {
    use secrecy::ExposeSecret;
    let provider = Provider::start(5).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n[log]\nlevel = \"debug\"\n{}",
            dir.path().display().to_string(),
            provider.servers()
        ),
    )
    .expect("config");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("PORTCULLIS_MASTER_KEY")
            .output()
            .expect("runs");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["user", "add", "alice"]);
    let grant = cli(&["token", "create", "--user", "alice", "--name", "t"]).lines().last().expect("token").to_owned();
    let log_path = dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("RUST_LOG", "debug")
        .env_remove("PORTCULLIS_MASTER_KEY")
        .stdout(log.try_clone().expect("clone"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("serve starts");
    let http = reqwest::Client::new();
    ready(&http, &format!("127.0.0.1:{port}")).await;
    let mut alice =
        Caller { http: http.clone(), url: format!("{base}/mcp/acme"), token: grant, session: None, next_id: 1 };
    alice.initialize().await;
    let answer = alice.call("whoami", json!({})).await;
    let link = link_in(&answer);
    let (status, _) = open_link(&link, "alice").await;
    assert_eq!(status, 200);
    assert_eq!(alice.whoami().await, "alice");
    tokio::time::sleep(Duration::from_secs(provider.ttl + 1)).await;
    assert_eq!(alice.whoami().await, "alice", "after a refresh");

    // Every secret the vault holds for alice, decrypted here to look for it.
    let store = Store::connect(&format!("sqlite://{}/portcullis.db", dir.path().display())).await.expect("store");
    let ring = portcullis::keys::load_key_ring(dir.path()).expect("key ring");
    let row = store.vault_connections(None).await.expect("rows").remove(0);
    let plain =
        ring.decrypt(&portcullis::crypto::row_aad("vault_connections", &row.id), &row.sealed).expect("decrypts");
    let tokens: Value = serde_json::from_slice(plain.expose_secret()).expect("json");
    let mut secrets =
        vec![tokens["a"].as_str().expect("access").to_owned(), tokens["r"].as_str().expect("refresh").to_owned()];
    secrets.push(link.split("link=").nth(1).expect("link secret").to_owned());
    serve.start_kill().expect("kill");
    let _ = serve.wait().await;
    let logged = std::fs::read_to_string(&log_path).expect("log");
    assert!(logged.contains("upstream connection made") && logged.contains("upstream token refreshed"), "{logged}");
    for secret in &secrets {
        assert!(!logged.contains(secret.as_str()), "a secret of the flow was logged");
    }
    for marker in ["eyJ", "code=", "code_verifier", "refresh_token=", "state="] {
        assert!(!logged.contains(marker), "{marker:?} appears in the logs");
    }
}

/// Clients of the stateless 2026-07-28 revision (no session) also call as their own person:
/// the gateway keeps one upstream session per person for them on a per-user OAuth server.
#[tokio::test(flavor = "multi_thread")]
async fn stateless_clients_call_as_their_own_person() {
    let provider = Provider::start(10).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let mut bob = Caller::new(&store, &gw.url("acme"), "bob").await;
    connect(&mut alice, "alice").await;
    connect(&mut bob, "bob").await;
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "stateless", "version": "1"},
    });
    for (caller, name) in [(&alice, "alice"), (&bob, "bob")] {
        let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}, "_meta": meta}});
        let resp = post(&caller.http, &caller.url, &body, None)
            .header("authorization", format!("Bearer {}", caller.token))
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "whoami")
            .send()
            .await
            .expect("answers");
        assert_eq!(resp.status(), 200);
        let answer = messages(resp).await.into_iter().find(|m| m["id"] == 7).expect("response");
        assert_eq!(answer["result"]["content"][0]["text"], name, "{answer}");
    }
    gw.stop().await;
}

/// A connect link shows whose account it connects before anything happens; only the
/// gateway's own page can start the flow; and the flow finishes only in the browser that
/// started it, so an authorization URL copied out of it and sent to someone else connects
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn connect_links_name_their_person_and_bind_the_browser() {
    let provider = Provider::start(30).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let mut mallory = Caller::new(&store, &gw.url("acme"), "mallory").await;
    let answer = mallory.call("whoami", json!({})).await;
    let link = link_in(&answer);
    let browser = browser();
    let page = browser.get(&link).send().await.expect("page");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let text = page.text().await.expect("text");
    assert!(text.contains("Portcullis user mallory") && text.contains("acme"), "{text}");

    let url = url::Url::parse(&link).expect("link");
    let secret = url.query_pairs().find(|(k, _)| k == "link").map(|(_, v)| v.into_owned()).expect("secret");
    let post = |origin: Option<&str>| {
        let mut req = browser
            .post(format!("{}{}", gw.base, url.path()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("link={secret}"));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    assert_eq!(post(Some("https://evil.example")).await.expect("post").status(), 403, "another site's form");
    assert_eq!(post(None).await.expect("post").status(), 403, "no origin");

    // Mallory starts the flow, then sends the provider's URL to alice, who signs in there.
    let started = post(Some(&gw.base)).await.expect("post");
    assert_eq!(started.status(), 303);
    let authorize = started.headers()["location"].to_str().expect("location").to_owned();
    let at_provider = browser.get(&authorize).send().await.expect("authorize");
    let interaction = at_provider.headers()["location"].to_str().expect("interaction").to_owned();
    let login = browser.get(format!("{interaction}/auto?account=alice")).send().await.expect("login");
    let callback = login.headers()["location"].to_str().expect("callback").to_owned();
    // Alice's browser lands on the callback without mallory's cookie.
    let landed = browser.get(&callback).send().await.expect("callback");
    assert_eq!(landed.status(), 400);
    assert!(landed.text().await.expect("page").contains("another browser"));
    assert!(store.vault_connections(None).await.expect("rows").is_empty(), "nothing was connected");
    gw.stop().await;
}

/// A client that declared URL-mode elicitation gets the connect link as a JSON-RPC
/// `-32042` error (MCP 2025-11-25) instead of a tool error.
#[tokio::test(flavor = "multi_thread")]
async fn clients_with_url_elicitation_get_the_link_as_an_elicitation() {
    let provider = Provider::start(30).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {"elicitation": {"form": {}, "url": {}}},
            "clientInfo": {"name": "it", "version": "1"}}
    });
    let resp = alice.send(&init).await;
    alice.session = Some(resp.headers()["mcp-session-id"].to_str().expect("ascii").to_owned());
    let answer = alice.call("whoami", json!({})).await;
    assert_eq!(answer["error"]["code"], -32042, "{answer}");
    let url = answer["error"]["data"]["elicitations"][0]["url"].as_str().expect("url").to_owned();
    assert_eq!(answer["error"]["data"]["elicitations"][0]["mode"], "url");
    let (status, page) = open_link(&url, "alice").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(alice.whoami().await, "alice");
    gw.stop().await;
}

/// A grant the provider revoked behind the gateway's back: the next refresh gets
/// `invalid_grant`, the connection is marked for reconnection and the call says so, once,
/// without retrying in a loop.
#[tokio::test(flavor = "multi_thread")]
async fn a_grant_revoked_at_the_provider_asks_for_reconnection() {
    let provider = Provider::start(5).await;
    let key = Key::random();
    let gw = TestGateway::start_keyed(&provider.servers(), "", key.clone()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    connect(&mut alice, "alice").await;
    assert_eq!(alice.whoami().await, "alice");

    // Revoke alice's refresh token at the provider, as its admin would.
    provider.revoke_refresh_token(&gw, &key, &store, "alice").await;

    tokio::time::sleep(Duration::from_secs(provider.ttl + 1)).await;
    let answer = alice.call("whoami", json!({})).await;
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    let row = store.vault_connections(None).await.expect("rows").remove(0);
    assert_eq!(row.status, "reconnect");
    assert!(row.last_error.as_deref().unwrap_or_default().contains("invalid_grant"), "{:?}", row.last_error);
    let refreshes = provider.refreshes().await;
    let again = alice.call("whoami", json!({})).await;
    assert_eq!(again["result"]["isError"], true);
    assert_eq!(provider.refreshes().await, refreshes, "no refresh loop");
    gw.stop().await;
}
