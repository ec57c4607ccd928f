//! Protocol revisions are negotiated on each side independently: a stateless 2026-07-28
//! client works through the gateway to a 2025-03-26 upstream, and a 2025-03-26 client works
//! through the gateway to an upstream that speaks only 2026-07-28.

use std::process::Stdio;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::common::*;

/// Our Python-SDK server that refuses `initialize` and speaks only 2026-07-28.
struct StatelessServer {
    url: String,
    _proc: Proc,
}

impl StatelessServer {
    async fn start() -> StatelessServer {
        let mut child = Command::new(python())
            .arg(repo().join("tests/python/stateless_server.py"))
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("python runs");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("listening ") {
                    return url.trim().to_owned();
                }
            }
            panic!("stateless server exited");
        })
        .await
        .expect("stateless server started");
        StatelessServer { url, _proc: Proc { child } }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stateless_client_reaches_a_2025_03_26_upstream() {
    let fixture = Fixture::start(&["--protocol", "2025-03-26"]).await;
    let stdio = fixture_stdio_toml().replace("\"--stdio\"]", "\"--stdio\", \"--protocol\", \"2025-03-26\"]");
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"old\"\nurl = \"{}\"\npublic = true\n\n[[servers]]\nname = \"olds\"\n{stdio}public = true\n",
        fixture.url
    ))
    .await;
    for server in ["old", "olds"] {
        let r = py(&gw.url(server), "stateless", &["--protocol", "2026-07-28"]).await;
        assert_eq!(r["protocol_version"], "2026-07-28", "{server}: {r}");
        assert_eq!(r["echo"], "hello", "{server}: {r}");
        assert_eq!(r["server_info"]["name"], "portcullis-fixture");
    }
    // The upstream really is at 2025-03-26: a stateful client through the same gateway sees
    // its own revision, not the upstream's.
    let r = py(&gw.url("old"), "basic", &["--protocol", "2025-06-18"]).await;
    assert_eq!(r["protocol_version"], "2025-06-18");
    // Stateless requests carry no session, so there is no stream to GET.
    let c = reqwest::Client::new();
    let get = c.get(gw.url("old")).header("accept", "text/event-stream").header("mcp-protocol-version", "2026-07-28");
    assert_eq!(get.send().await.expect("sent").status(), 405);
    let store = portcullis::store::Store::connect(&format!("sqlite://{}/portcullis.db", gw.dir.path().display()))
        .await
        .expect("store");
    let _dir = gw.dir.clone(); // the store outlives the gateway
    gw.stop().await;
    // The audit log names the stateless client from its per-request `_meta`.
    let records = store.audit_after(0, 1000).await.expect("records");
    let call = records.iter().find(|r| r.method == "tools/call").expect("a call was audited");
    assert!(call.client_name.as_deref().is_some_and(|n| !n.is_empty()), "{call:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_client_reaches_a_stateless_only_upstream() {
    let upstream = StatelessServer::start().await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"new\"\nurl = \"{0}\"\nprotocol = \"2026-07-28\"\npublic = true\n\n[[servers]]\nname = \"auto\"\nurl = \"{0}\"\npublic = true\n",
        upstream.url
    ))
    .await;
    for server in ["new", "auto"] {
        for version in ["2025-03-26", "2025-11-25"] {
            let r = py(&gw.url(server), "basic", &["--protocol", version]).await;
            assert_eq!(r["protocol_version"], version, "{server}: {r}");
            assert_eq!(r["echo"], "hello", "{server}: {r}");
        }
        let r = ts(&gw.url(server), "basic", &["--protocol", "2025-03-26"]).await;
        assert_eq!(r["echo"], "hello", "{server}: {r}");
    }
    // The gateway fills in the per-request `_meta` the stateless revision requires.
    let c = reqwest::Client::new();
    let url = gw.url("new");
    let session = raw_session(&c, &url).await;
    let call =
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}});
    let msgs = messages(post(&c, &url, &call, Some(&session)).send().await.expect("sent")).await;
    let text = msgs.last().expect("answer")["result"]["content"][0]["text"].as_str().expect("text").to_owned();
    let seen: serde_json::Value = serde_json::from_str(&text).expect("whoami answers JSON");
    assert_eq!(seen["io.modelcontextprotocol/protocolVersion"], "2026-07-28", "{seen}");
    assert_eq!(seen["io.modelcontextprotocol/clientInfo"]["name"], "it", "{seen}");
    assert!(seen["io.modelcontextprotocol/clientCapabilities"].is_object(), "{seen}");
    assert!(msgs.last().expect("answer")["result"].get("resultType").is_none(), "old clients see no resultType");
    // A 2026-07-28 client passes straight through.
    let r = py(&url, "stateless", &["--protocol", "2026-07-28"]).await;
    assert_eq!(r["echo"], "hello");
    gw.stop().await;
}

/// A stateless client cannot resume a stream, so when the upstream closes one mid-call (SSE
/// polling) the gateway resumes it with `Last-Event-ID` and delivers the answer.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_resumes_an_upstream_stream_for_a_stateless_client() {
    let fixture = Fixture::start(&[]).await;
    let gw =
        TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n", fixture.url)).await;
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "test_reconnection", "arguments": {},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}});
    let resp = reqwest::Client::new()
        .post(gw.url("fx"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .json(&call)
        .send()
        .await
        .expect("sent");
    let msgs = messages(resp).await;
    let answer = msgs.iter().find(|m| m["id"] == 1).expect("an answer");
    assert_eq!(answer["result"]["content"][0]["text"], "Reconnection test completed successfully", "{answer}");
    assert_eq!(answer["result"]["resultType"], "complete");
    let resumed =
        fixture.requests().await.iter().any(|r| r["method"] == "GET" && r["headers"]["last-event-id"].is_string());
    assert!(resumed, "the gateway resumed with Last-Event-ID");
    gw.stop().await;
}
