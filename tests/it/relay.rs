//! The relay, driven by the official SDK clients through the gateway to real upstreams:
//! our fixture (HTTP and stdio) and `@modelcontextprotocol/server-everything` (HTTP and stdio).

use crate::common::*;

async fn gateway_for(fixture: &Fixture) -> TestGateway {
    TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n\n[[servers]]\nname = \"fxs\"\n{}public = true\n",
        fixture.url,
        fixture_stdio_toml()
    ))
    .await
}

/// Python SDK: the basic lifecycle, progress, logging, sampling and elicitation, over an HTTP
/// and a stdio upstream.
#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_client_through_http_and_stdio_upstreams() {
    let fixture = Fixture::start(&[]).await;
    let gw = gateway_for(&fixture).await;
    for server in ["fx", "fxs"] {
        let url = gw.url(server);
        let basic = py(&url, "basic", &[]).await;
        assert_eq!(basic["echo"], "hello", "{server}: {basic}");
        assert_eq!(basic["protocol_version"], "2025-11-25");
        assert_eq!(py(&url, "progress", &[]).await["progress"], serde_json::json!([0.0, 50.0, 100.0]));
        let logs = py(&url, "logging", &[]).await;
        assert_eq!(logs["logs"].as_array().map(Vec::len), Some(3), "{server}: {logs}");
        assert_eq!(py(&url, "sampling", &[]).await["result"]["text"], "LLM response: sampled: hi");
        let elicited = py(&url, "elicitation", &[]).await;
        assert_eq!(elicited["elicitation_requests"][0]["content"]["username"], "alice", "{server}: {elicited}");
    }
    gw.stop().await;
}

/// Older client revisions work through the gateway to a 2025-11-25 upstream: each side is
/// negotiated on its own.
#[tokio::test(flavor = "multi_thread")]
async fn older_client_revisions_negotiate_independently() {
    let fixture = Fixture::start(&[]).await;
    let gw = gateway_for(&fixture).await;
    for version in ["2025-03-26", "2025-06-18"] {
        for server in ["fx", "fxs"] {
            let r = py(&gw.url(server), "basic", &["--protocol", version]).await;
            assert_eq!(r["protocol_version"], version, "{server}: {r}");
            assert_eq!(r["echo"], "hello");
        }
    }
    gw.stop().await;
}

/// `@modelcontextprotocol/server-everything` over HTTP and over stdio.
#[tokio::test(flavor = "multi_thread")]
async fn server_everything_over_http_and_stdio() {
    let everything = Everything::start().await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"ev\"\nurl = \"{}\"\npublic = true\n\n[[servers]]\nname = \"evs\"\ncommand = \"node\"\nargs = [{:?}, \"stdio\"]\npublic = true\n",
        everything.url,
        everything_entry().display().to_string()
    ))
    .await;
    for server in ["ev", "evs"] {
        let r = py(&gw.url(server), "everything", &[]).await;
        assert_eq!(r["echo"], "Echo: hello", "{server}: {r}");
        assert!(r["tools"].as_array().is_some_and(|t| t.len() > 5), "{server}: {r}");
        let r = ts(&gw.url(server), "everything", &[]).await;
        assert_eq!(r["echo"], "Echo: hello", "{server}: {r}");
    }
    gw.stop().await;
}

/// The client's unknown request fields reach the upstream untouched, and the upstream's
/// unknown result fields reach the client.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_fields_pass_through_both_ways() {
    let fixture = Fixture::start(&[]).await;
    let gw = gateway_for(&fixture).await;
    let client = reqwest::Client::new();
    for server in ["fx", "fxs"] {
        let url = gw.url(server);
        let session = raw_session(&client, &url).await;
        let call = serde_json::json!({
            "jsonrpc": "2.0", "id": "call-1", "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "hi", "x-extra": [1, 2]},
                       "x-vendor-ext": {"keep": true}, "_meta": {"trace": "abc"}}
        });
        // The client's own credentials never travel upstream.
        let resp = post(&client, &url, &call, Some(&session))
            .header("authorization", "Bearer client-secret-token")
            .send()
            .await
            .expect("call");
        let msgs = messages(resp).await;
        let answer = msgs.iter().find(|m| m["id"] == "call-1").expect("answer");
        assert_eq!(answer["result"]["structuredContent"]["x-extra"], serde_json::json!([1, 2]), "{server}: {answer}");
        assert_eq!(answer["result"]["_meta"]["requestMeta"]["trace"], "abc", "{server}: {answer}");
        // A method the gateway does not know is relayed, and the upstream answers it.
        let custom = serde_json::json!({"jsonrpc": "2.0", "id": 77, "method": "x-vendor/hello", "params": {"a": 1}});
        let msgs = messages(post(&client, &url, &custom, Some(&session)).send().await.expect("sent")).await;
        let answer = msgs.iter().find(|m| m["id"] == 77).expect("answer");
        assert_eq!(answer["error"]["code"], -32601, "the upstream's own method-not-found: {answer}");
    }
    let seen = fixture.requests().await;
    let call = seen.iter().find(|r| r["body"]["method"] == "tools/call").expect("recorded");
    assert_eq!(call["body"]["params"]["x-vendor-ext"], serde_json::json!({"keep": true}));
    let custom = seen.iter().find(|r| r["body"]["method"] == "x-vendor/hello").expect("relayed upstream");
    assert_eq!(custom["body"]["params"], serde_json::json!({"a": 1}));
    for r in &seen {
        let auth = r["headers"]["authorization"].as_str().unwrap_or("");
        assert!(!auth.contains("client-secret-token"), "the client's token reached the upstream: {r}");
    }
    gw.stop().await;
}

/// TypeScript SDK: the full scenario list through the gateway to an HTTP, a stdio and a
/// legacy SSE upstream.
#[tokio::test(flavor = "multi_thread")]
async fn typescript_sdk_client_through_every_upstream_transport() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n\n[[servers]]\nname = \"fxs\"\n{}public = true\n\n[[servers]]\nname = \"legacy\"\nurl = \"{}\"\ntransport = \"sse\"\npublic = true\n",
        fixture.url,
        fixture_stdio_toml(),
        fixture.sse_url()
    ))
    .await;
    let debug = fixture.url.replace("/mcp", "/debug/requests");
    for server in ["fx", "fxs", "legacy"] {
        let url = gw.url(server);
        let basic = ts(&url, "basic", &[]).await;
        assert_eq!(basic["echo"], "hello", "{server}: {basic}");
        for scenario in [
            "progress",
            "logging",
            "sampling",
            "elicitation",
            "roots",
            "cancel",
            "list-changed",
            "resume",
            "session",
            "concurrent",
            "big",
        ] {
            ts(&url, scenario, &[]).await;
        }
        // The HTTP fixture records what reached it; the stdio child is another process.
        let seen: &[&str] = if server == "fxs" { &[] } else { &["--debug-url", &debug] };
        ts(&url, "passthrough", seen).await;
    }
    gw.stop().await;
}

/// Replicas that share the master key serve each other's sessions: the session id carries its
/// own state. A gateway with another key refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn any_replica_with_the_same_key_serves_a_session() {
    let fixture = Fixture::start(&[]).await;
    let servers = format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n\n[[servers]]\nname = \"fxs\"\n{}public = true\n",
        fixture.url,
        fixture_stdio_toml()
    );
    let key = portcullis::keys::Key::random();
    let a = TestGateway::start_keyed(&servers, "", key.clone()).await;
    let b = TestGateway::start_keyed(&servers, "", key).await;
    let other = TestGateway::start(&servers).await;
    let c = reqwest::Client::new();
    for server in ["fx", "fxs"] {
        let session = raw_session(&c, &a.url(server)).await;
        let echo = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "via b"}}});
        let msgs = messages(post(&c, &b.url(server), &echo, Some(&session)).send().await.expect("sent")).await;
        assert_eq!(msgs.last().expect("answer")["result"]["content"][0]["text"], "via b", "{server}: {msgs:?}");
        let refused = post(&c, &other.url(server), &echo, Some(&session)).send().await.expect("sent");
        assert_eq!(refused.status(), 404, "{server}: another key does not open it");
    }
    a.stop().await;
    b.stop().await;
    other.stop().await;
}

/// Old clients on the legacy HTTP+SSE transport (`/mcp/{name}/sse`) reach every kind of
/// upstream, with server-to-client requests and notifications on their stream.
#[tokio::test(flavor = "multi_thread")]
async fn legacy_sse_clients_reach_http_and_stdio_upstreams() {
    let fixture = Fixture::start(&[]).await;
    let gw = gateway_for(&fixture).await;
    for server in ["fx", "fxs"] {
        let url = format!("{}/sse", gw.url(server));
        let basic = ts(&url, "basic", &["--transport", "sse"]).await;
        assert_eq!(basic["echo"], "hello", "{server}: {basic}");
        for scenario in ["logging", "sampling", "elicitation", "roots", "list-changed", "concurrent", "big"] {
            ts(&url, scenario, &["--transport", "sse"]).await;
        }
    }
    // A message for a connection this gateway does not hold: 404.
    let c = reqwest::Client::new();
    let r =
        post(&c, &format!("{}/messages?sessionId=nope", gw.url("fx")), &init_body(), None).send().await.expect("sent");
    assert_eq!(r.status(), 404);
    gw.stop().await;
}
