//! Refusals: the layers' own (two `Authorization` headers, the gateway-wide limit) and the
//! per-principal limits leave audit records, with the principal when it is known; a flood of
//! unauthenticated requests is counted rather than written row by row; and one legacy SSE
//! session cannot pile up calls past `limits.max_in_flight_per_legacy_session`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use portcullis::audit::Entry as AuditRow;
use portcullis::authn::token::NewToken;
use serde_json::{Value, json};

use crate::common::*;

fn slow(id: u64, ms: u64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "slow", "arguments": {"ms": ms}}})
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-request-id"].to_str().expect("ascii").to_owned()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_recorded_and_an_unauthenticated_flood_is_counted() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\n\n[limits]\nmax_in_flight_per_principal = 1\n\
         failed_auth_burst = 10\nfailed_auth_per_minute = 1\n\
         unauthenticated_records_burst = 5\nunauthenticated_records_per_minute = 1\n",
        fixture.url
    ))
    .await;
    let store = store_of(&gw).await;
    let alice = token_for(&store, "alice").await;
    let (c, url) = (reqwest::Client::new(), gw.url("fx"));
    let session = {
        let r = post(&c, &url, &init_body(), None).bearer_auth(&alice).send().await.expect("sent");
        r.headers()["mcp-session-id"].to_str().expect("ascii").to_owned()
    };
    // Refused after authentication (alice's one place is taken): recorded with alice.
    let running = tokio::spawn(post(&c, &url, &slow(5, 1500), Some(&session)).bearer_auth(&alice).send());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ping = json!({"jsonrpc": "2.0", "id": 6, "method": "ping"});
    let r = post(&c, &url, &ping, Some(&session)).bearer_auth(&alice).send().await.expect("sent");
    assert_eq!(r.status(), 429);
    let limited = request_id(&r);
    running.await.expect("joined").expect("sent").bytes().await.expect("body");
    // Refused by the layers, before authentication: recorded with its request id.
    let r = post(&c, &url, &init_body(), None)
        .bearer_auth(&alice)
        .header("authorization", "Bearer pcl_other")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 400);
    let two_headers = request_id(&r);
    // 100 made-up tokens from one address: the record budget (5) goes first, then only counts.
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let bearer = format!("Bearer {}", NewToken::generate().expose());
        let r = post(&c, &url, &init_body(), None).header("authorization", bearer).send().await.expect("sent");
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    let refill = (started.elapsed().as_secs_f64() / 60.0).ceil() as usize;
    let text = c.get(format!("{}/metrics", gw.base)).send().await.expect("sent").text().await.expect("text");
    let counted = metric(&text, "portcullis_audit_unrecorded_total") as usize;

    let _dir = gw.dir.clone(); // the store outlives the gateway
    gw.stop().await;
    let records = store.audit_after(0, 1000).await.expect("records");
    let by_id = |id: &str| -> &AuditRow { records.iter().find(|r| r.request_id == id).expect("a record") };
    let r = by_id(&limited);
    assert_eq!((r.principal_name.as_deref(), r.decision.as_str()), (Some("alice"), "error"), "{r:?}");
    assert_eq!((r.server.as_deref(), r.upstream_status), (Some("fx"), Some(-32600)));
    let r = by_id(&two_headers);
    assert_eq!((r.method.as_str(), r.server.as_deref(), r.decision.as_str()), ("POST", Some("fx"), "deny"), "{r:?}");
    assert_eq!(r.principal_id, None);
    // The flood and the two-header refusal: 101 refusals without a principal, each either
    // written (within the budget) or counted, and the count is in the log too.
    let written = records.iter().filter(|r| r.principal_id.is_none() && r.method != "audit/unrecorded").count();
    eprintln!("101 refusals without a principal: {written} written, {counted} counted");
    assert!(written <= 5 + refill, "{written} refusals without a principal were written");
    assert_eq!(written + counted, 101, "written {written}, counted {counted}");
    let summaries: Vec<Value> = records
        .iter()
        .filter(|r| r.method == "audit/unrecorded")
        .map(|r| serde_json::from_str(&r.arguments).expect("json"))
        .collect();
    let summed: u64 = summaries.iter().map(|s| s["unrecorded"].as_u64().expect("a count")).sum();
    assert_eq!(summed as usize, counted, "{summaries:?}");
    assert!(summaries.iter().all(|s| s["reason"] == "limits.unauthenticated_records_per_minute"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_by_the_gateway_wide_limit_is_recorded() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n\n[limits]\nmax_in_flight = 1\n",
        fixture.url
    ))
    .await;
    let store = store_of(&gw).await;
    let (c, url) = (reqwest::Client::new(), gw.url("fx"));
    let s = raw_session(&c, &url).await;
    let running = tokio::spawn(post(&c, &url, &slow(5, 1500), Some(&s)).send());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = post(&c, &url, &json!({"jsonrpc": "2.0", "id": 6, "method": "ping"}), Some(&s)).send().await;
    let r = r.expect("sent");
    assert_eq!(r.status(), 503);
    let refused = request_id(&r);
    running.await.expect("joined").expect("sent").bytes().await.expect("body");
    let _dir = gw.dir.clone();
    gw.stop().await;
    let records = store.audit_after(0, 1000).await.expect("records");
    let r = records.iter().find(|r| r.request_id == refused).expect("the refusal's record");
    assert_eq!((r.method.as_str(), r.server.as_deref(), r.decision.as_str()), ("POST", Some("fx"), "error"), "{r:?}");
    assert_eq!(r.upstream_status, Some(-32603));
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
    // The notification holds a place until the upstream has taken it.
    for _ in 0..100 {
        if fixture.requests().await.iter().any(|r| r["body"]["method"] == "notifications/initialized") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in 10..14 {
        legacy.post(&c, &slow(id, 3000)).await;
    }
    // Notifications take places too: one refused has no id to be answered by on the stream,
    // so its POST says so.
    let note = json!({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"});
    let r = c.post(&legacy.endpoint).header("content-type", "application/json").json(&note).send().await;
    let r = r.expect("sent");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
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
    assert_eq!(metric(&text, r#"portcullis_refusals_total{reason="legacy_session_in_flight"}"#), 3.0, "{text}");
    drop(legacy);
    let _dir = gw.dir.clone();
    gw.stop().await;
    let records = store.audit_after(0, 1000).await.expect("records");
    let refused: Vec<&AuditRow> =
        records.iter().filter(|r| r.upstream_status == Some(-32600) && r.method == "tools/call").collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    let note = records.iter().filter(|r| r.method == "notifications/roots/list_changed").collect::<Vec<_>>();
    assert_eq!(note.len(), 1, "the refused notification has one record: {note:?}");
    assert_eq!(note[0].decision, "error", "{note:?}");
    assert!(
        refused.iter().all(|r| r.tool.as_deref() == Some("slow") && r.principal_kind.as_deref() == Some("anonymous"))
    );
}
