//! Identity: grant tokens checked on every request with the official SDK clients, sessions
//! bound to their principal, offboarding, and the identity store on SQLite and PostgreSQL.

use std::time::Duration;

use portcullis::authn::token::NewToken;
use portcullis::store::Store;
use portcullis::store::identity::IdentityError;
use serde_json::json;

use crate::common::*;

const NOW: i64 = 1_795_400_000;

/// A gateway with two non-public servers in front of the fixture, and its store.
async fn private_gateway(fixture: &Fixture) -> (TestGateway, Store) {
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{0}\"\n\n[[servers]]\nname = \"other\"\nurl = \"{0}\"\n\n[[servers]]\nname = \"fxs\"\n{1}",
        fixture.url,
        fixture_stdio_toml()
    ))
    .await;
    let store = Store::connect(&format!("sqlite://{}/portcullis.db", gw.dir.path().display())).await.expect("store");
    (gw, store)
}

async fn token_for(
    store: &Store,
    owner: &str,
    servers: Option<Vec<String>>,
    expires_at: Option<i64>,
) -> (String, String) {
    let token = NewToken::generate();
    let now = now();
    let id = store
        .token_create(owner, "t", &token.hash(), &servers, expires_at, now)
        .await
        .expect("store")
        .expect("created");
    (id, token.expose().to_owned())
}

fn now() -> i64 {
    i64::try_from(portcullis::clock::Clock::system().unix_secs()).expect("fits")
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_clients_with_grant_tokens_and_every_kind_of_refusal() {
    let fixture = Fixture::start(&[]).await;
    let (gw, store) = private_gateway(&fixture).await;
    store.principal_add("alice", false, &[], NOW).await.expect("store").expect("added");
    store.principal_add("ci-bot", true, &[], NOW).await.expect("store").expect("added");
    let (_, alice) = token_for(&store, "alice", None, None).await;
    let (_, bot) = token_for(&store, "ci-bot", None, None).await;
    let (_, fx_only) = token_for(&store, "alice", Some(vec!["fx".into()]), None).await;
    let (_, expired) = token_for(&store, "alice", None, Some(now() - 1)).await;
    let (revoked_id, revoked) = token_for(&store, "alice", None, None).await;
    assert!(store.token_revoke(&revoked_id, now()).await.expect("store"));

    // The right tokens work, through HTTP and stdio upstreams, for both SDKs.
    for server in ["fx", "fxs"] {
        let r = py(&gw.url(server), "basic", &["--header", &bearer(&alice)]).await;
        assert_eq!(r["echo"], "hello", "{server}: {r}");
        let r = ts(&gw.url(server), "basic", &["--header", &bearer(&bot)]).await;
        assert_eq!(r["echo"], "hello", "{server}: {r}");
    }
    py(&gw.url("fx"), "basic", &["--header", &bearer(&fx_only)]).await;

    // Wrong, malformed, expired, revoked and wrong-server tokens: 401, invalid_token.
    let wrong = NewToken::generate();
    let refused = [wrong.expose(), "pcl_not-a-token", expired.as_str(), revoked.as_str()].map(|t| (t.to_owned(), "fx"));
    for (token, server) in refused.iter().map(|(t, s)| (t.as_str(), *s)).chain([(fx_only.as_str(), "other")]) {
        for driver in ["py", "ts"] {
            let header = bearer(token);
            let args = ["--header", header.as_str()];
            let r = if driver == "py" {
                py(&gw.url(server), "unauthorized", &args).await
            } else {
                ts(&gw.url(server), "unauthorized", &args).await
            };
            assert_eq!(r["status"], 401, "{driver} {server}: {r}");
            let challenge = r["www_authenticate"].as_str().unwrap_or_default();
            assert!(challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""), "{r}");
        }
    }
    // No credentials: 401 with a challenge and no error code (RFC 6750 §3.1).
    let r = py(&gw.url("fx"), "unauthorized", &[]).await;
    assert_eq!(r["status"], 401);
    assert_eq!(r["www_authenticate"], "Bearer realm=\"portcullis\"");

    // The upstream never saw a client's token.
    for req in fixture.requests().await {
        let auth = req["headers"]["authorization"].as_str().unwrap_or("");
        assert!(!auth.contains("pcl_"), "a grant token reached the upstream: {req}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_belong_to_their_principal_and_disabling_ends_them() {
    let fixture = Fixture::start(&[]).await;
    let (gw, store) = private_gateway(&fixture).await;
    for name in ["alice", "bob"] {
        store.principal_add(name, false, &[], NOW).await.expect("store").expect("added");
    }
    let (_, alice) = token_for(&store, "alice", None, None).await;
    let (_, alice2) = token_for(&store, "alice", None, None).await;
    let (_, bob) = token_for(&store, "bob", None, None).await;
    let c = reqwest::Client::new();
    let url = gw.url("fx");
    let init = post(&c, &url, &init_body(), None).bearer_auth(&alice).send().await.expect("sent");
    assert_eq!(init.status(), 200);
    let session = init.headers()["mcp-session-id"].to_str().expect("ascii").to_owned();
    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"});
    // Alice's other token may use her session; Bob's may not.
    let ok = post(&c, &url, &ping, Some(&session)).bearer_auth(&alice2).send().await.expect("sent");
    assert_eq!(ok.status(), 200);
    let stolen = post(&c, &url, &ping, Some(&session)).bearer_auth(&bob).send().await.expect("sent");
    assert_eq!(stolen.status(), 404, "a session id does not move to another principal");
    // Her long-lived streams: the session's GET stream and a legacy SSE connection.
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post(&c, &url, &note, Some(&session)).bearer_auth(&alice).send().await.expect("sent");
    let get = c
        .get(&url)
        .bearer_auth(&alice)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .send()
        .await
        .expect("sent");
    assert_eq!(get.status(), 200);
    let legacy = c
        .get(format!("{url}/sse"))
        .bearer_auth(&alice)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("sent");
    assert_eq!(legacy.status(), 200);
    // Offboarding: every token revoked at once; her live session stops on its next request,
    // and her open streams end.
    let revoked = store.principal_disable("alice", now()).await.expect("store").expect("disabled");
    assert_eq!(revoked, 2);
    // Gateways learn of revocations by polling the store's revocation epoch.
    tokio::time::sleep(portcullis::authn::cache::POLL * 3).await;
    let after = post(&c, &url, &ping, Some(&session)).bearer_auth(&alice).send().await.expect("sent");
    assert_eq!(after.status(), 401);
    for (what, stream) in [("GET stream", get), ("legacy SSE stream", legacy)] {
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.bytes()).await;
        assert!(ended.is_ok(), "the {what} of a disabled user ends");
    }
    assert!(store.token_list(Some("alice")).await.expect("store").iter().all(|t| t.revoked_at.is_some()));
    // Bob is unaffected.
    let bob_init = post(&c, &url, &init_body(), None).bearer_auth(&bob).send().await.expect("sent");
    assert_eq!(bob_init.status(), 200);
    gw.stop().await;
}

/// The CLI end to end: users, groups, service accounts, tokens printed once on their last line.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_manages_principals_and_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\ndata_dir = {:?}\n[[servers]]\nname = \"github\"\ncommand = \"true\"\n",
            dir.path().display().to_string()
        ),
    )
    .expect("written");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .expect("runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(run(&["group", "add", "eng"]).0);
    assert!(run(&["user", "add", "alice", "--group", "eng"]).0);
    assert!(run(&["service-account", "add", "ci-bot"]).0);
    let (ok, _, err) = run(&["user", "add", "alice"]);
    assert!(!ok && err.contains("'alice' already exists"), "{err}");
    let (ok, out, _) =
        run(&["token", "create", "--user", "alice", "--name", "laptop", "--expires", "90d", "--server", "github"]);
    assert!(ok, "{out}");
    let token = out.lines().last().expect("a last line");
    assert!(portcullis::authn::token::well_formed(token), "{token:?}");
    let (ok, out, _) = run(&["token", "create", "--service-account", "ci-bot", "--name", "nightly"]);
    assert!(ok);
    assert!(out.lines().last().is_some_and(portcullis::authn::token::well_formed));
    let (ok, _, err) = run(&["token", "create", "--user", "alice", "--name", "x", "--server", "nope"]);
    assert!(!ok && err.contains("not a configured server"), "{err}");
    let (_, list, _) = run(&["token", "list"]);
    assert!(list.contains("laptop") && list.contains("nightly") && list.contains("github"), "{list}");
    assert!(!list.contains(token), "token values are never listed");
    let id = list.lines().find(|l| l.contains("laptop")).and_then(|l| l.split_whitespace().next()).expect("id");
    assert!(run(&["token", "revoke", id]).0);
    let (_, list, _) = run(&["token", "list", "--user", "alice"]);
    assert!(list.contains("revoked") && !list.contains("nightly"), "{list}");
    let (_, users, _) = run(&["user", "list"]);
    assert!(users.contains("alice") && users.contains("eng") && !users.contains("ci-bot"), "{users}");
    let (ok, out, _) = run(&["user", "disable", "alice"]);
    assert!(ok && out.contains("revoked 0 grant tokens"), "{out}");
    let (_, groups, _) = run(&["group", "list"]);
    assert!(groups.contains("eng") && groups.contains("alice"), "{groups}");
}

/// The identity store behaves the same on SQLite and PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn identity_store_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = FreshPostgres::create().await;
    for url in [format!("sqlite://{}/s.db", dir.path().display()), pg.url.clone()] {
        let s = Store::connect(&url).await.expect("connects");
        s.group_add("eng", NOW).await.expect("store").expect("added");
        assert_eq!(s.group_add("eng", NOW).await.expect("store"), Err(IdentityError::Exists("group 'eng'".into())));
        let alice = s.principal_add("alice", false, &["eng".into()], NOW).await.expect("store").expect("added");
        assert_eq!(alice.groups, vec!["eng".to_owned()]);
        assert!(matches!(
            s.principal_add("bob", false, &["nope".into()], NOW).await.expect("store"),
            Err(IdentityError::NotFound(_))
        ));
        s.principal_add("ci", true, &[], NOW).await.expect("store").expect("added");
        assert_eq!(s.principal_list(true).await.expect("store").len(), 1, "{url}");
        let t = NewToken::generate();
        let servers = Some(vec!["github".to_owned()]);
        let id = s
            .token_create("alice", "laptop", &t.hash(), &servers, Some(NOW + 10), NOW)
            .await
            .expect("store")
            .expect("made");
        let auth = s.token_lookup(&t.hash()).await.expect("store").expect("found");
        assert_eq!((auth.token_id.as_str(), auth.principal_name.as_str()), (id.as_str(), "alice"));
        assert_eq!(auth.groups, vec!["eng".to_owned()]);
        assert!(auth.usable_for("github", NOW as u64));
        assert!(!auth.usable_for("jira", NOW as u64), "limited to its servers");
        assert!(!auth.usable_for("github", (NOW + 10) as u64), "expired");
        assert!(s.token_lookup(&NewToken::generate().hash()).await.expect("store").is_none());
        s.token_touch(&id, NOW + 5).await.expect("touched");
        assert_eq!(s.token_list(Some("alice")).await.expect("store")[0].last_used_at, Some(NOW + 5));
        assert_eq!(s.principal_disable("alice", NOW + 1).await.expect("store"), Ok(1));
        let auth = s.token_lookup(&t.hash()).await.expect("store").expect("found");
        assert!(auth.disabled && auth.revoked_at.is_some());
        assert!(!auth.usable_for("github", NOW as u64));
        s.group_member("eng", "ci", true).await.expect("store").expect("added");
        let groups = s.group_list().await.expect("store");
        assert_eq!(groups, vec![("eng".to_owned(), vec!["alice".to_owned(), "ci".to_owned()])]);
        s.close().await;
    }
}
