//! The audit log on the request path: every MCP exchange leaves exactly one record, with the
//! principal, token, client, tool and redacted arguments; a SIGTERM under load loses none.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use portcullis::audit::{Verification, verify};
use portcullis::authn::token::NewToken;
use portcullis::store::Store;
use serde_json::json;

use crate::common::*;

const NOW: i64 = 1_795_400_000;

async fn alice_token(store: &Store) -> String {
    store.principal_add("alice", false, &[], NOW).await.expect("store").expect("added");
    let t = NewToken::generate();
    store.token_create("alice", "laptop", &t.hash(), &None, None, NOW).await.expect("store").expect("created");
    t.expose().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_exchange_leaves_exactly_one_record() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\n", fixture.url)).await;
    let store = Store::connect(&format!("sqlite://{}/portcullis.db", gw.dir.path().display())).await.expect("store");
    let token = alice_token(&store).await;
    let c = reqwest::Client::new();
    let url = gw.url("fx");
    let mut exchanges = 0;
    let mut send = |req: reqwest::RequestBuilder| {
        exchanges += 1;
        req.send()
    };
    // Allowed: initialize, initialized, a tool call with a secret among its arguments.
    let init = send(post(&c, &url, &init_body(), None).bearer_auth(&token)).await.expect("sent");
    let session = init.headers()["mcp-session-id"].to_str().expect("ascii").to_owned();
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    send(post(&c, &url, &note, Some(&session)).bearer_auth(&token)).await.expect("sent");
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo",
        "arguments": {"text": "hello", "api_key": "k-123", "note": "ghp_abcdefghijklmnopqrstuvwxyz0123456789"}}});
    let r = send(post(&c, &url, &call, Some(&session)).bearer_auth(&token)).await.expect("sent");
    let json_len = r.bytes().await.expect("body").len() as i64;
    // A call that outlasts the JSON window is answered as an SSE stream: its record is written
    // when the stream ends, with the bytes it carried and its whole duration.
    let slow = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "slow",
        "arguments": {"ms": 600}, "_meta": {"progressToken": "p"}}});
    let r = send(post(&c, &url, &slow, Some(&session)).bearer_auth(&token)).await.expect("sent");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let sse_len = r.bytes().await.expect("body").len() as i64;
    // Denied and failed: no token, a wrong token, a bad origin, bad JSON, an unknown server.
    send(post(&c, &url, &init_body(), None)).await.expect("sent");
    send(post(&c, &url, &init_body(), None).bearer_auth(NewToken::generate().expose())).await.expect("sent");
    send(post(&c, &url, &init_body(), None).bearer_auth(&token).header("origin", "http://evil.example.com"))
        .await
        .expect("sent");
    send(c.post(&url).bearer_auth(&token).header("content-type", "application/json").body("{nope"))
        .await
        .expect("sent");
    // (With a token: to a caller without one, an unknown server answers like a known one.)
    send(post(&c, &gw.url("nope"), &init_body(), None).bearer_auth(&token)).await.expect("sent");
    let _dir = gw.dir.clone(); // the store outlives the gateway
    gw.stop().await;

    assert_eq!(store.audit_count().await.expect("count"), exchanges, "one record per exchange");
    assert!(matches!(verify(&store).await.expect("verifies"), Verification::Intact { .. }));
    let records = store.audit_after(0, 100).await.expect("records");
    let call = records.iter().find(|r| r.tool.as_deref() == Some("echo")).expect("the call's record");
    assert_eq!(call.bytes_out, json_len, "a JSON answer's bytes");
    let streamed = records.iter().find(|r| r.tool.as_deref() == Some("slow")).expect("the streamed call's record");
    assert_eq!(streamed.bytes_out, sse_len, "a streamed answer's bytes, counted to its end");
    assert!(streamed.latency_us >= 600_000, "a streamed answer's whole duration: {}", streamed.latency_us);
    assert_eq!(call.principal_name.as_deref(), Some("alice"));
    assert_eq!(call.principal_kind.as_deref(), Some("user"));
    assert!(call.token_id.is_some());
    assert_eq!((call.client_name.as_deref(), call.client_version.as_deref()), (Some("it"), Some("1")));
    assert_eq!(call.server.as_deref(), Some("fx"));
    assert_eq!(call.tool.as_deref(), Some("echo"));
    assert_eq!(call.decision, "allow");
    assert!(call.arguments.contains("\"text\":\"hello\""), "{}", call.arguments);
    assert!(!call.arguments.contains("k-123") && !call.arguments.contains("ghp_"), "{}", call.arguments);
    let denials = records.iter().filter(|r| r.decision == "deny").count();
    assert_eq!(denials, 3, "no token, wrong token, bad origin");
    let errors: Vec<_> = records.iter().filter(|r| r.decision == "error").map(|r| r.upstream_status).collect();
    assert_eq!(errors, vec![Some(-32700), Some(-32600)], "parse error, unknown server");
    for r in &records {
        assert!(!format!("{r:?}").contains(&token), "no record holds the token");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigterm_under_load_loses_no_record() {
    let fixture = Fixture::start(&[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n[log]\nlevel = \"warn\"\n[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n",
            dir.path().display().to_string(),
            fixture.url
        ),
    )
    .expect("written");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("gateway runs");
    let base = format!("http://127.0.0.1:{port}");
    let c = reqwest::Client::new();
    ready(&c, &format!("127.0.0.1:{port}")).await;
    let url = format!("{base}/mcp/fx");
    let session = raw_session(&c, &url).await;
    let answered = Arc::new(AtomicU64::new(2)); // initialize and initialized
    let mut load = Vec::new();
    for i in 0..16 {
        let (c, url, session, answered) = (c.clone(), url.clone(), session.clone(), answered.clone());
        load.push(tokio::spawn(async move {
            for n in 0.. {
                let call = json!({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": format!("{i}-{n}")}}});
                match post(&c, &url, &call, Some(&session)).send().await {
                    Ok(r) if r.status().is_success() => {
                        messages(r).await;
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().expect("running")).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signalled");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits").expect("status");
    assert!(status.success(), "clean exit: {status}");
    for task in load {
        let _ = task.await;
    }
    let answered = answered.load(Ordering::SeqCst);
    assert!(answered > 50, "the load ran: {answered}");
    let store = Store::connect(&format!("sqlite://{}/portcullis.db", dir.path().display())).await.expect("store");
    let records = store.audit_count().await.expect("count");
    // Every answered exchange has its record; a request cut off by the shutdown may add one.
    assert!(records as u64 >= answered && records as u64 <= answered + 16, "{records} records, {answered} answered");
    assert!(matches!(verify(&store).await.expect("verifies"), Verification::Intact { .. }));
}
