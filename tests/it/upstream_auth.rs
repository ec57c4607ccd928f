//! Static upstream credentials: a stored secret reaches a real upstream that checks it (as an
//! HTTP header, and in a stdio upstream's environment), and the client's own token never does.

use portcullis::authn::token::NewToken;
use portcullis::keys::{Key, KeyRing};
use portcullis::store::Store;
use secrecy::SecretString;
use serde_json::json;

use crate::common::*;

const SECRET: &str = "s3cret-upstream-value";

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_secret_reaches_upstreams_that_check_it() {
    let fixture = Fixture::start(&["--require-header", &format!("authorization=Bearer {SECRET}")]).await;
    let key = Key::random();
    let stdio = fixture_stdio_toml()
        .replace("\"--stdio\"]", &format!("\"--stdio\", \"--require-env\", \"GITHUB_TOKEN={SECRET}\"]"));
    let gw = TestGateway::start_keyed(
        &format!(
            "[[servers]]\nname = \"gh\"\nurl = \"{0}\"\nauth = {{ type = \"static\", secret = \"gh-pat\" }}\n\n\
             [[servers]]\nname = \"ghl\"\nurl = \"{1}\"\ntransport = \"sse\"\nauth = {{ type = \"static\", secret = \"gh-pat\", header = \"Authorization\", prefix = \"Bearer \" }}\n\n\
             [[servers]]\nname = \"ghs\"\n{stdio}auth = {{ type = \"static\", secret = \"gh-pat\", env = \"GITHUB_TOKEN\" }}\n",
            fixture.url,
            fixture.sse_url()
        ),
        "",
        key.clone(),
    )
    .await;
    let store = Store::connect(&format!("sqlite://{}/portcullis.db", gw.dir.path().display())).await.expect("store");
    store.principal_add("alice", false, &[], 1).await.expect("store").expect("added");
    let token = NewToken::generate();
    store.token_create("alice", "t", &token.hash(), &None, None, 1).await.expect("store").expect("created");
    let bearer = format!("Authorization: Bearer {}", token.expose());

    // Before the secret exists, the call fails with an error that names it (and nothing else).
    let c = reqwest::Client::new();
    let r = post(&c, &gw.url("gh"), &init_body(), None).bearer_auth(token.expose()).send().await.expect("sent");
    let body: serde_json::Value = r.json().await.expect("json");
    let msg = body["error"]["message"].as_str().expect("an error");
    assert!(msg.contains("credential 'gh-pat' is not set"), "{msg}");

    store.secret_set("gh-pat", &SecretString::from(SECRET), &KeyRing::from(key), 2).await.expect("stored");
    for server in ["gh", "ghl", "ghs"] {
        let r = py(&gw.url(server), "basic", &["--header", &bearer]).await;
        assert_eq!(r["echo"], "hello", "{server}: {r}");
    }
    let r = ts(&gw.url("gh"), "basic", &["--header", &bearer]).await;
    assert_eq!(r["echo"], "hello");

    // Every request that reached the HTTP upstream carried the stored secret, none the client's token.
    let seen = fixture.requests().await;
    let mcp: Vec<_> = seen.iter().filter(|r| r["path"].as_str().is_some_and(|p| !p.starts_with("/debug"))).collect();
    assert!(mcp.len() > 5, "{seen:?}");
    for r in mcp {
        assert_eq!(r["headers"]["authorization"], json!(format!("Bearer {SECRET}")), "{r}");
        assert!(!r.to_string().contains(token.expose()), "the client's token reached the upstream: {r}");
    }
    gw.stop().await;
}
