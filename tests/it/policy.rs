//! Per-tool and per-argument policy (`[policy] dir`, docs/policy.md) from the official SDK
//! clients' side: a listing shows only the tools the caller could call, a denied call is
//! answered as an unknown tool is, an argument rule bites on the exact argument, no batch or
//! legacy SSE shape gets a call past a deny, every decision is in the audit record, and a
//! change of the folder is picked up without a restart (an invalid one leaves the old set).

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::vault_sessions::{Driver, Sdk};

const POLICIES: &str = r#"
@id("echo-for-all")
permit(principal, action == Portcullis::Action::"call_tool", resource)
when { resource.server == "fx" && resource.name == "echo" };

@id("no-secrets-echoed")
forbid(principal, action == Portcullis::Action::"call_tool", resource)
when { resource.server == "fx" && resource.name == "echo" && context.args has text && context.args.text like "*secret*" };

@id("eng-simple-text")
permit(principal in Portcullis::Group::"eng", action == Portcullis::Action::"call_tool", resource)
when { resource.server == "fx" && resource.name == "test_simple_text" };
"#;

/// A user `name` in `groups` and a grant token for them.
async fn person(store: &portcullis::store::Store, name: &str, groups: &[&str]) -> String {
    const NOW: i64 = 1_795_400_000;
    for g in groups {
        let _ = store.group_add(g, NOW).await.expect("store");
    }
    let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
    store.principal_add(name, false, &groups, NOW).await.expect("store").expect("added");
    let t = portcullis::authn::token::NewToken::generate();
    store.token_create(name, "laptop", &t.hash(), &None, None, NOW).await.expect("store").expect("created");
    t.expose().to_owned()
}

async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_filter_listings_refuse_calls_as_unknown_and_reload_on_change() {
    let fixture = Fixture::start(&[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("main.cedar"), POLICIES).expect("written");
    let gw = TestGateway::start(&format!(
        "[policy]\ndir = {:?}\nreload_interval = \"200ms\"\n\n[[servers]]\nname = \"fx\"\nurl = \"{}\"\n",
        dir.path().display().to_string(),
        fixture.url
    ))
    .await;
    let store = store_of(&gw).await;
    let alice = person(&store, "alice", &["eng"]).await;
    let bob = person(&store, "bob", &[]).await;
    let url = gw.url("fx");

    for sdk in [Sdk::Ts, Sdk::Py] {
        let mut a = Driver::start(sdk, &url, &alice, &[]).await;
        assert_eq!(a.list().await, json!(["test_simple_text", "echo"]), "{sdk:?}: alice sees what she may call");
        let ok = a.event(r#"call echo {"text":"hello"}"#, "call").await;
        assert_eq!((&ok["isError"], &ok["text"]), (&json!(false), &json!("hello")), "{sdk:?}: {ok}");
        let simple = a.event("call test_simple_text", "call").await;
        assert_eq!(simple["error"], Value::Null, "{sdk:?}: {simple}");
        // The argument rule bites on the exact argument.
        let secret = a.event(r#"call echo {"text":"my secret"}"#, "call").await;
        assert_eq!(secret["code"], -32602, "{sdk:?}: {secret}");
        a.end().await;

        let mut b = Driver::start(sdk, &url, &bob, &[]).await;
        assert_eq!(b.list().await, json!(["echo"]), "{sdk:?}: bob sees echo only");
        // Denied and unknown look alike.
        let denied = b.event("call test_simple_text", "call").await;
        let unknown = b.event("call no_such_tool", "call").await;
        assert_eq!(denied["code"], -32602, "{sdk:?}: {denied}");
        assert_eq!(unknown["code"], -32602, "{sdk:?}: {unknown}");
        let shape = |v: &Value| {
            v["error"].as_str().unwrap_or_default().replace("test_simple_text", "X").replace("no_such_tool", "X")
        };
        assert_eq!(shape(&denied), shape(&unknown), "{sdk:?}: {denied} / {unknown}");
        b.end().await;
    }
    let refused_upstream =
        fixture.requests().await.iter().filter(|r| r["body"]["params"]["name"] == "test_simple_text").count();
    assert_eq!(refused_upstream, 2, "only alice's calls (one per SDK) reached the upstream");

    // No batch shape gets a call past a deny: a 2025-03-26 batch of an allowed and a denied call.
    let c = reqwest::Client::new();
    let session = open_batching_session(&c, &url, Some(&bob)).await;
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "test_simple_text", "arguments": {}}},
    ]);
    let resp = post_batching(&c, &url, &session, &batch).bearer_auth(&bob).send().await.expect("sent");
    // One JSON array of answers, or SSE events of them.
    let answers: Vec<Value> = messages(resp)
        .await
        .into_iter()
        .flat_map(|m| match m {
            Value::Array(items) => items,
            one => vec![one],
        })
        .collect();
    let by_id = |id: i64| answers.iter().find(|m| m["id"] == id).cloned().unwrap_or(Value::Null);
    assert!(by_id(1)["result"].is_object(), "{answers:?}");
    assert_eq!(by_id(2)["error"]["code"], -32602, "{answers:?}");
    let forwarded =
        fixture.requests().await.iter().filter(|r| r["body"]["params"]["name"] == "test_simple_text").count();
    assert_eq!(forwarded, 2, "the denied batch member never reached the upstream");

    // An invalid change is refused and the old set stays in force.
    let errors_before = metric(&gw.base, "portcullis_policy_reload_errors_total").await;
    std::fs::write(dir.path().join("broken.cedar"), "permit(principal, action, resource) when { resource.nope };")
        .expect("written");
    let mut refused = false;
    for _ in 0..100 {
        if metric(&gw.base, "portcullis_policy_reload_errors_total").await > errors_before {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the invalid change is counted");
    assert_eq!(metric(&gw.base, "portcullis_policy_valid").await, 0.0);
    let mut b = Driver::start(Sdk::Ts, &url, &bob, &[]).await;
    assert_eq!(b.list().await, json!(["echo"]), "the old set is still in force");
    b.end().await;

    // A valid change is in force without a restart.
    std::fs::remove_file(dir.path().join("broken.cedar")).expect("removed");
    std::fs::write(
        dir.path().join("bob.cedar"),
        r#"permit(principal == Portcullis::User::"bob", action == Portcullis::Action::"call_tool", resource == Portcullis::Tool::"fx/test_simple_text");"#,
    )
    .expect("written");
    let mut seen = Value::Null;
    for _ in 0..100 {
        let mut b = Driver::start(Sdk::Py, &url, &bob, &[]).await;
        seen = b.list().await;
        b.end().await;
        if seen == json!(["test_simple_text", "echo"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, json!(["test_simple_text", "echo"]), "the new policy is in force");
    assert_eq!(metric(&gw.base, "portcullis_policy_valid").await, 1.0);

    let gw_dir = gw.dir.clone();
    gw.stop().await;
    // Every decision is in the audit record: a denied call is `deny` with the code it was
    // answered with.
    let records = store.audit_after(0, 10_000).await.expect("records");
    let denied: Vec<_> = records
        .iter()
        .filter(|r| r.tool.as_deref() == Some("test_simple_text") && r.principal_name.as_deref() == Some("bob"))
        .collect();
    assert!(!denied.is_empty());
    assert!(denied.iter().all(|r| r.decision == "deny" && r.upstream_status == Some(-32602)), "{denied:?}");
    // The policies that decided are named: the permit of an allowed call, the forbid of a
    // refused one (a call nothing permits names none).
    let echo = |text: &str| {
        records
            .iter()
            .filter(|r| r.tool.as_deref() == Some("echo") && r.arguments.contains(text))
            .map(|r| (r.decision.as_str(), r.policy.as_deref()))
            .collect::<Vec<_>>()
    };
    assert_eq!(echo("hello"), vec![("allow", Some("echo-for-all")); 2], "one per SDK");
    assert_eq!(echo("my secret"), vec![("deny", Some("no-secrets-echoed")); 2]);
    assert!(denied.iter().all(|r| r.policy.is_none()), "{denied:?}");

    // `policy explain` decides as the gateway does, naming the policies.
    let config = gw_dir.path().join("cli.toml");
    let text = format!(
        "[gateway]\ndata_dir = {:?}\n\n[policy]\ndir = {:?}\n\n[[servers]]\nname = \"fx\"\nurl = \"{}\"\n",
        gw_dir.path().display().to_string(),
        dir.path().display().to_string(),
        fixture.url
    );
    std::fs::write(&config, text).expect("config");
    let explain = |who: &str, args: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["--config"])
            .arg(&config)
            .args(["policy", "explain", "--user", who, "--server", "fx", "--tool", "echo", "--args", args])
            .output()
            .expect("runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = explain("alice", r#"{"text":"hi"}"#);
    assert!(text.contains("decision: allow") && text.contains("policies: echo-for-all"), "{text}");
    let text = explain("alice", r#"{"text":"a secret"}"#);
    assert!(text.contains("decision: deny") && text.contains("policies: no-secrets-echoed"), "{text}");
}
