//! One path for every client message (`mcp::dispatch`): the gateway reads a message once,
//! strictly, so what it records is what the upstream runs; every message leaves one audit
//! record, also when its client hangs up or it came in a batch; stateless clients never share
//! an upstream session.

use std::time::Duration;

use portcullis::audit::Entry as AuditRow;
use portcullis::store::Store;
use serde_json::{Value, json};

use crate::common::*;

/// Waits until the audit log holds a record `found` accepts.
async fn record_where(store: &Store, found: impl Fn(&AuditRow) -> bool) -> AuditRow {
    for _ in 0..100 {
        let records = store.audit_after(0, 1000).await.expect("records");
        if let Some(r) = records.into_iter().find(|r| found(r)) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no such audit record");
}

/// The tool calls that reached the fixture.
async fn calls_upstream(fixture: &Fixture) -> Vec<Value> {
    fixture
        .requests()
        .await
        .into_iter()
        .filter(|r| r["body"]["method"] == "tools/call")
        .map(|r| r["body"]["params"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_whose_client_hangs_up_is_recorded_as_such() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\n\n[[servers]]\nname = \"fxs\"\n{}",
        fixture.url,
        fixture_stdio_toml()
    ))
    .await;
    let store = store_of(&gw).await;
    let token = token_for(&store, "alice").await;
    let c = reqwest::Client::new();
    for server in ["fx", "fxs"] {
        let url = gw.url(server);
        let session = {
            let init = post(&c, &url, &init_body(), None).bearer_auth(&token).send().await.expect("sent");
            init.headers()["mcp-session-id"].to_str().expect("ascii").to_owned()
        };
        // `curl -m 1` on a two-second tool: the client is gone before the answer.
        let slow = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "slow", "arguments": {"ms": 2000}}});
        let sent = post(&c, &url, &slow, Some(&session)).bearer_auth(&token).timeout(Duration::from_millis(700));
        let r = sent.send().await.and_then(|r| r.error_for_status());
        let cut = match r {
            Err(e) => e.is_timeout(),
            // An SSE answer started (the call outlasted the JSON window): the body is cut.
            Ok(resp) => resp.bytes().await.is_err(),
        };
        assert!(cut, "{server}: the client gave up before the answer");
        let record =
            record_where(&store, |r| r.server.as_deref() == Some(server) && r.tool.as_deref() == Some("slow")).await;
        assert_eq!(record.decision, "error", "{server}: {record:?}");
        assert_eq!(record.upstream_status, Some(499), "{server}: gone after the call was forwarded: {record:?}");
        assert_eq!(record.principal_name.as_deref(), Some("alice"));
        assert!(record.arguments.contains("2000"), "{record:?}");
        // The gateway serves on.
        let ping = json!({"jsonrpc": "2.0", "id": 8, "method": "ping"});
        let r = post(&c, &url, &ping, Some(&session)).bearer_auth(&token).send().await.expect("sent");
        assert_eq!(r.status(), 200);
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_reads_a_message_as_the_upstream_does_or_refuses_it() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\n", fixture.url)).await;
    let store = store_of(&gw).await;
    let token = token_for(&store, "alice").await;
    let c = reqwest::Client::new();
    let url = gw.url("fx");
    let session = {
        let init = post(&c, &url, &init_body(), None).bearer_auth(&token).send().await.expect("sent");
        init.headers()["mcp-session-id"].to_str().expect("ascii").to_owned()
    };
    let raw = |body: Vec<u8>| {
        in_session(c.post(&url), &session)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body)
    };
    let deep = |levels: usize| {
        format!(
            r#"{{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"x","n":{}1{}}}}}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    };
    let refused: [(&str, Vec<u8>, i64); 8] = [
        (
            "a tool call without an id, as if a notification",
            br#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"echo","arguments":{"text":"n"}}}"#.to_vec(),
            -32600,
        ),
        (
            "a tool call with a null id",
            br#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"echo","arguments":{"text":"n"}}}"#.to_vec(),
            -32600,
        ),
        (
            "a repeated key (the upstream would run the last one)",
            br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"a"},"name":"slow"}}"#.to_vec(),
            -32600,
        ),
        (
            "a repeated key spelled with an escape",
            br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","arguments":{"text":"a"},"n\u0061me":"slow"}}"#.to_vec(),
            -32600,
        ),
        ("arguments nested 200 levels deep", deep(200).into_bytes(), -32600),
        (
            "invalid UTF-8 inside params",
            b"{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"text\":\"\xc3\x28\"}}}".to_vec(),
            -32700,
        ),
        (
            "a batch on a 2025-11-25 session",
            br#"[{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"echo","arguments":{"text":"b"}}}]"#.to_vec(),
            -32600,
        ),
        ("a tool call without a tool name", br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"arguments":{}}}"#.to_vec(), -32602),
    ];
    for (what, body, code) in refused {
        let r = raw(body).send().await.expect("sent");
        let answer: Value = r.json().await.expect("a JSON-RPC error");
        assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
    }
    // Within the limit the same shape is relayed whole.
    let r = raw(deep(50).into_bytes()).send().await.expect("sent");
    let answers = messages(r).await;
    assert!(answers[0]["result"].is_object(), "{answers:?}");
    assert_eq!(calls_upstream(&fixture).await.len(), 1, "nothing refused reached the upstream");

    // A 2025-03-26 session may batch: each message is dispatched and recorded on its own.
    let old_session = open_batching_session(&c, &url, Some(&token)).await;
    let batch = json!([
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "first"}}},
        {"jsonrpc": "2.0", "id": 11, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 12, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "second"}}},
    ]);
    let in_old_session = |body: &Value| post_batching(&c, &url, &old_session, body).bearer_auth(&token).send();
    let r = in_old_session(&batch).await.expect("sent");
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    let answers: Vec<Value> = r.json().await.expect("a batch answer");
    let ids: Vec<&Value> = answers.iter().map(|a| &a["id"]).collect();
    assert_eq!(ids, [&json!(10), &json!(11), &json!(12)]);
    // Past the limit, a batch is refused whole.
    let many: Vec<Value> = (0..33).map(|i| json!({"jsonrpc": "2.0", "id": 100 + i, "method": "ping"})).collect();
    let r = in_old_session(&Value::Array(many)).await.expect("sent");
    assert_eq!(r.status(), 400);
    let answer: Value = r.json().await.expect("json");
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
    assert_eq!(calls_upstream(&fixture).await.len(), 3);

    let _dir = gw.dir.clone(); // the store outlives the gateway
    gw.stop().await;
    let records = store.audit_after(0, 1000).await.expect("records");
    let members: Vec<_> = records.iter().filter(|r| r.request_id == request_id).collect();
    let seen: Vec<(&str, Option<&str>)> = members.iter().map(|r| (r.method.as_str(), r.tool.as_deref())).collect();
    assert_eq!(
        seen,
        [
            ("notifications/initialized", None),
            ("tools/call", Some("echo")),
            ("tools/list", None),
            ("tools/call", Some("echo")),
        ],
        "one record per message of the batch"
    );
    assert!(members[1].arguments.contains("first") && members[3].arguments.contains("second"));
    // The refusals are recorded as errors, with the tool the gateway could not tell.
    let refusals = records.iter().filter(|r| r.decision == "error" && r.upstream_status == Some(-32600)).count();
    assert_eq!(
        refusals, 7,
        "two tool calls without an id, two repeated keys, deep nesting, a batch on 2025-11-25, an oversized batch"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stateless_clients_of_different_people_never_share_an_upstream_session() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\n", fixture.url)).await;
    let store = store_of(&gw).await;
    let alice = token_for(&store, "alice").await;
    let bob = token_for(&store, "bob").await;
    for token in [&alice, &bob, &alice] {
        let auth = format!("Authorization: Bearer {token}");
        let r = py(&gw.url("fx"), "stateless", &["--protocol", "2026-07-28", "--header", &auth]).await;
        assert_eq!(r["echo"], "hello", "{r}");
    }
    let mut sessions: Vec<String> = fixture
        .requests()
        .await
        .into_iter()
        .filter(|r| r["body"]["method"] == "tools/call")
        .map(|r| r["headers"]["mcp-session-id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions[0], sessions[2], "one person's calls share their session");
    sessions.dedup();
    assert_ne!(sessions[0], sessions[1], "two people's calls never do");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_sse_messages_are_recorded_one_by_one_when_answered() {
    let fixture = Fixture::start(&[]).await;
    let gw =
        TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n", fixture.url)).await;
    let store = store_of(&gw).await;
    let basic = ts(&format!("{}/sse", gw.url("fx")), "basic", &["--transport", "sse"]).await;
    assert_eq!(basic["echo"], "hello", "{basic}");
    let _dir = gw.dir.clone(); // the store outlives the gateway
    gw.stop().await;
    let records = store.audit_after(0, 1000).await.expect("records");
    let methods: Vec<&str> = records.iter().map(|r| r.method.as_str()).collect();
    assert!(!methods.contains(&"POST"), "messages, not POSTs, are recorded: {methods:?}");
    for method in ["initialize", "notifications/initialized", "tools/list", "tools/call"] {
        assert!(methods.contains(&method), "{method} recorded: {methods:?}");
    }
    let call = records.iter().find(|r| r.tool.as_deref() == Some("echo")).expect("the call's record");
    assert_eq!((call.decision.as_str(), call.upstream_status), ("allow", Some(200)), "{call:?}");
    assert!(call.arguments.contains("hello"), "{call:?}");
}

/// A 2025-03-26 batch opens its sealed session once, not once per message: every message of
/// the batch is dispatched within the session the request named.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_opens_its_session_once() {
    let fixture = Fixture::start(&[]).await;
    let gw =
        TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n", fixture.url)).await;
    let (c, url) = (reqwest::Client::new(), gw.url("fx"));
    let session = open_batching_session(&c, &url, None).await;
    let echo = |id: u64| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}});
    let batch = json!([{"jsonrpc": "2.0", "method": "notifications/initialized"}, echo(10), echo(11), echo(12),
        {"jsonrpc": "2.0", "id": 13, "method": "ping"}]);
    let before = gw.state().sealer().opens();
    let r = post_batching(&c, &url, &session, &batch).send().await.expect("sent");
    assert_eq!(r.status(), 200);
    let answers: Vec<Value> = r.json().await.expect("a batch answer");
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert_eq!(gw.state().sealer().opens() - before, 1, "one opening for the five messages");
    gw.stop().await;
}
