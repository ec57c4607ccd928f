//! A legacy SSE session cannot pile up calls past `limits.max_in_flight_per_legacy_session`.

use std::time::Duration;

use futures::StreamExt;
use portcullis::audit::Entry as AuditRow;
use serde_json::{Value, json};

use crate::common::*;

fn slow(id: u64, ms: u64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "slow", "arguments": {"ms": ms}}})
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A legacy SSE client reading its stream: the messages that arrive on it, by id.
struct LegacyStream {
    endpoint: String,
    events: portcullis::upstream::event_stream::Events<
        futures::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>,
    >,
}

impl LegacyStream {
    async fn open(c: &reqwest::Client, base: &str, server: &str) -> LegacyStream {
        let r = c.get(format!("{base}/mcp/{server}/sse")).header("accept", "text/event-stream").send().await;
        let r = r.expect("sent");
        assert_eq!(r.status(), 200);
        let body = r.bytes_stream().map(|c| c.map_err(std::io::Error::other)).boxed();
        let mut events = portcullis::upstream::event_stream::Events::new(body);
        let first = events.next().await.expect("an event").expect("read");
        assert_eq!(first.event.as_deref(), Some("endpoint"));
        LegacyStream { endpoint: format!("{base}{}", first.data.expect("an endpoint")), events }
    }

    async fn post(&self, c: &reqwest::Client, body: &Value) {
        let r = c.post(&self.endpoint).header("content-type", "application/json").json(body).send().await;
        assert_eq!(r.expect("sent").status(), 202);
    }

    /// The next message on the stream.
    async fn next(&mut self) -> Value {
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let event = self.events.next().await.expect("the stream goes on").expect("read");
                if let Some(message) = event.data.and_then(|d| serde_json::from_str::<Value>(&d).ok()) {
                    return message;
                }
            }
        });
        read.await.expect("a message within 20 s")
    }
}

/// One legacy SSE session may have `limits.max_in_flight_per_legacy_session` messages in
/// progress; past it, a message is answered at once with a JSON-RPC error on the stream (and
/// recorded), while the session's other calls go on and its places come back as they end.
#[tokio::test(flavor = "multi_thread")]
async fn a_legacy_sse_session_has_a_bounded_number_of_calls_in_progress() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n\n[limits]\nmax_in_flight_per_legacy_session = 2\n",
        fixture.url
    ))
    .await;
    let store = store_of(&gw).await;
    let c = reqwest::Client::new();
    let mut legacy = LegacyStream::open(&c, &gw.base, "fx").await;
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "it", "version": "1"}}});
    legacy.post(&c, &init).await;
    assert_eq!(legacy.next().await["id"], 0);
    legacy.post(&c, &json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
    for id in 10..14 {
        legacy.post(&c, &slow(id, 3000)).await;
    }
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 4 {
        let m = legacy.next().await;
        answers.insert(m["id"].as_u64().expect("an id"), m);
    }
    for id in [10, 11] {
        assert!(answers[&id]["result"].is_object(), "{id}: {}", answers[&id]);
    }
    for id in [12, 13] {
        let error = &answers[&id]["error"];
        assert_eq!(error["code"], -32600, "{id}: {}", answers[&id]);
        assert_eq!(error["message"], "too many requests in progress on this session");
    }
    // The places came back.
    legacy.post(&c, &slow(14, 10)).await;
    assert!(legacy.next().await["result"].is_object());
    let text = c.get(format!("{}/metrics", gw.base)).send().await.expect("sent").text().await.expect("text");
    assert_eq!(metric(&text, r#"portcullis_refusals_total{reason="legacy_session_in_flight"}"#), 2.0, "{text}");
    drop(legacy);
    let _dir = gw.dir.clone();
    gw.stop().await;
    let records = store.audit_after(0, 1000).await.expect("records");
    let refused: Vec<&AuditRow> = records.iter().filter(|r| r.upstream_status == Some(-32600)).collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused.iter().all(|r| r.tool.as_deref() == Some("slow") && r.principal_kind.as_deref() == Some("anonymous"))
    );
}
