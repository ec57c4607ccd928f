//! Bad input gets a clear error with the right HTTP status and JSON-RPC code, and the gateway
//! keeps working: DNS rebinding, sizes, media types, sessions, unreachable and crashing
//! upstreams, and graceful shutdown.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

async fn gateway_with_fixture() -> (Fixture, TestGateway) {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start_with(
        &format!(
            "[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n\n[[servers]]\nname = \"fxs\"\n{}public = true\n\n[[servers]]\nname = \"private\"\nurl = \"{}\"\n\n[[servers]]\nname = \"down\"\nurl = \"http://127.0.0.1:{}/mcp\"\npublic = true\n",
            fixture.url,
            fixture_stdio_toml(),
            fixture.url,
            free_port()
        ),
        "max_body_bytes = 65536",
    )
    .await;
    (fixture, gw)
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_refused_with_the_right_status_and_code() {
    let (_fixture, gw) = gateway_with_fixture().await;
    let c = reqwest::Client::new();
    let url = gw.url("fx");

    // DNS rebinding: a foreign Origin or Host gets 403 (conformance: dns-rebinding-protection).
    let r = post(&c, &url, &init_body(), None).header("origin", "http://evil.example.com").send().await.expect("sent");
    assert_eq!(r.status(), 403);
    let r = post(&c, &url, &init_body(), None).header("host", "evil.example.com").send().await.expect("sent");
    assert_eq!(r.status(), 403);

    // Unknown server: to a caller without credentials, the 401 challenge a configured server
    // gives (names cannot be probed); an authenticated caller gets 404 (tests/it/layers.rs).
    let (status, body) = error_of(post(&c, &gw.url("nope"), &init_body(), None).send().await.expect("sent")).await;
    assert_eq!((status, body["error"]["message"].as_str()), (401, Some("authentication required")));

    // Not JSON: 400 with a JSON-RPC parse error.
    let r = c.post(&url).header("content-type", "application/json").body("{nope").send().await.expect("sent");
    let (status, body) = error_of(r).await;
    assert_eq!((status, body["error"]["code"].as_i64()), (400, Some(-32700)));

    // JSON but not JSON-RPC: 400, invalid request.
    let r = post(&c, &url, &json!({"hello": 1}), None).send().await.expect("sent");
    let (status, body) = error_of(r).await;
    assert_eq!((status, body["error"]["code"].as_i64()), (400, Some(-32600)));

    // Too large: 413.
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x".repeat(70_000)}});
    assert_eq!(post(&c, &url, &big, None).send().await.expect("sent").status(), 413);

    // Wrong media type: 415. A client that accepts neither JSON nor SSE: 406.
    let r = c.post(&url).header("content-type", "text/plain").body("{}").send().await.expect("sent");
    assert_eq!(r.status(), 415);
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "text/html")
        .json(&init_body())
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 406);

    // Sessions: missing 400, forged 404, moved to another server 404, bad protocol header 400.
    let ping = json!({"jsonrpc": "2.0", "id": 5, "method": "ping"});
    let (status, body) = error_of(post(&c, &url, &ping, None).send().await.expect("sent")).await;
    assert_eq!((status, body["id"].as_i64()), (400, Some(5)));
    assert_eq!(post(&c, &url, &ping, Some("forged")).send().await.expect("sent").status(), 404);
    let session = raw_session(&c, &url).await;
    assert_eq!(post(&c, &gw.url("fxs"), &ping, Some(&session)).send().await.expect("sent").status(), 404);
    let r = post(&c, &url, &ping, None)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "1999-01-01")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 400);
    let msgs = messages(post(&c, &url, &ping, Some(&session)).send().await.expect("sent")).await;
    assert_eq!(msgs.last().expect("answer")["result"], json!({}), "the session still works");

    // Not public and no identity yet: 401 with a Bearer challenge.
    let r = post(&c, &gw.url("private"), &init_body(), None).send().await.expect("sent");
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().expect("ascii").starts_with("Bearer"));

    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_answers_a_json_rpc_error_naming_it() {
    let (_fixture, gw) = gateway_with_fixture().await;
    let c = reqwest::Client::new();
    let (status, body) = error_of(post(&c, &gw.url("down"), &init_body(), None).send().await.expect("sent")).await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], 1);
    assert_eq!(body["error"]["code"], -32001);
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(msg.starts_with("upstream server 'down' is unreachable: "), "{msg}");
    gw.stop().await;
}

/// A stdio process that never answers `initialize` is given up after its `start_timeout`, not
/// its (longer) `request_timeout`, and the error names the server and the setting.
#[tokio::test(flavor = "multi_thread")]
async fn a_stdio_upstream_that_never_initializes_fails_after_its_start_timeout() {
    let gw = TestGateway::start(
        "[[servers]]\nname = \"mute\"\ncommand = \"sleep\"\nargs = [\"30\"]\npublic = true\nrequest_timeout = \"60s\"\nstart_timeout = \"300ms\"\n",
    )
    .await;
    let c = reqwest::Client::new();
    let started = std::time::Instant::now();
    let (status, body) = error_of(post(&c, &gw.url("mute"), &init_body(), None).send().await.expect("sent")).await;
    assert!(started.elapsed() < Duration::from_secs(10), "gave up after {:?}", started.elapsed());
    assert_eq!(status, 200);
    assert_eq!(body["id"], 1);
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(msg.contains("'mute'") && msg.contains("within 300ms (start_timeout)"), "{msg}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_stdio_upstream_fails_pending_calls_and_restarts() {
    let (_fixture, gw) = gateway_with_fixture().await;
    let c = reqwest::Client::new();
    let url = gw.url("fxs");
    let session = raw_session(&c, &url).await;
    let crash =
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "crash", "arguments": {}}});
    let msgs = messages(post(&c, &url, &crash, Some(&session)).send().await.expect("sent")).await;
    let answer = msgs.iter().find(|m| m["id"] == 7).expect("an answer for the pending call");
    let msg = answer["error"]["message"].as_str().expect("an error");
    assert!(msg.starts_with("upstream server 'fxs' exited"), "{msg}");
    // The next call restarts the process (after a short backoff) on the same client session.
    let echo = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "back"}}});
    let msgs = messages(post(&c, &url, &echo, Some(&session)).send().await.expect("sent")).await;
    assert_eq!(msgs.last().expect("answer")["result"]["content"][0]["text"], "back");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_drains_in_flight_calls() {
    let (_fixture, gw) = gateway_with_fixture().await;
    let c = reqwest::Client::new();
    let mut calls = Vec::new();
    for server in ["fx", "fxs"] {
        let url = gw.url(server);
        let session = raw_session(&c, &url).await;
        let slow = json!({"jsonrpc": "2.0", "id": server, "method": "tools/call", "params": {"name": "slow", "arguments": {"ms": 1500}}});
        calls.push(tokio::spawn(post(&c, &url, &slow, Some(&session)).send()));
    }
    // Both calls are in flight when shutdown begins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stdio_children(), 1, "the stdio upstream runs");
    let base = gw.base.clone();
    gw.stop().await;
    assert_eq!(stdio_children(), 0, "shutdown stopped the stdio upstream");
    for call in calls {
        let resp = call.await.expect("joined").expect("the in-flight call completed");
        let msgs = messages(resp).await;
        assert!(msgs.last().expect("answer")["result"].is_object(), "{msgs:?}");
    }
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err(), "no longer listening");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_answers_at_every_spelling_of_its_path() {
    // POST, GET and DELETE at a configured server's own path are answered ahead of the router;
    // `/mcp/{server}` serves the rest. Both must reach the same server, with the same session,
    // metrics and audit.
    let (_fixture, gw) = gateway_with_fixture().await;
    let c = reqwest::Client::new();
    let (plain, slash, encoded) = (gw.url("fx"), format!("{}/", gw.url("fx")), gw.url("%66x"));
    let session = raw_session(&c, &plain).await;
    let ping = json!({"jsonrpc": "2.0", "id": 7, "method": "ping"});
    for url in [&plain, &slash, &encoded] {
        let msgs = messages(post(&c, url, &ping, Some(&session)).send().await.expect("sent")).await;
        assert_eq!(msgs.last().expect("answer")["result"], json!({}), "{url}");
    }
    // A session of one server is still refused at another, whichever way it is spelled.
    assert_eq!(post(&c, &gw.url("%66xs"), &ping, Some(&session)).send().await.expect("sent").status(), 404);
    // DELETE through the path parameter ends the session opened at the server's own route.
    let r = in_session(c.delete(&encoded), &session).send().await.expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(post(&c, &plain, &ping, Some(&session)).send().await.expect("sent").status(), 404);
    let metrics = c.get(format!("{}/metrics", gw.base)).send().await.expect("sent").text().await.expect("text");
    assert!(metrics.contains(r#"portcullis_requests_total{server="fx",method="ping",status="200"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"portcullis_requests_total{server="fx",method="DELETE",status="200"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"portcullis_requests_total{server="fxs",method="ping",status="404"} 1"#), "{metrics}");
    // Other methods at a configured server's own path still go through the router: 405 with
    // the methods it takes.
    let r = c.put(&plain).body("{}").send().await.expect("sent");
    assert_eq!(r.status(), 405);
    let allow = r.headers().get("allow").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    for m in ["POST", "GET", "DELETE"] {
        assert!(allow.contains(m), "{allow}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let (_fixture, gw) = gateway_with_fixture().await;
    let c = reqwest::Client::new();
    assert_eq!(c.get(format!("{}/healthz", gw.base)).send().await.expect("sent").status(), 200);
    // The public /readyz names no server (the detailed report is on the admin listener,
    // tests/it/layers.rs).
    let ready = c.get(format!("{}/readyz", gw.base)).send().await.expect("sent");
    assert_eq!(ready.status(), 503, "the 'down' server is unreachable");
    let report: Value = ready.json().await.expect("json");
    assert_eq!(report, json!({"store": "ok", "servers": {"ready": 3, "total": 4}}));
    raw_session(&c, &gw.url("fx")).await;
    let metrics = c.get(format!("{}/metrics", gw.base)).send().await.expect("sent").text().await.expect("text");
    assert!(
        metrics.contains(r#"portcullis_requests_total{server="fx",method="initialize",status="200"}"#),
        "{metrics}"
    );
    assert!(metrics.contains("portcullis_request_duration_seconds_bucket"), "{metrics}");
    assert!(metrics.contains(r#"portcullis_sessions_opened_total{server="fx"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"portcullis_stdio_starts_total{server="fxs"} 1"#), "{metrics}");
    // Without an admin listener, /metrics (which names every server) is for this host's own
    // clients only: a request a proxy relayed from elsewhere gets 404, like an unknown path.
    for (header, value) in
        [("x-forwarded-for", "203.0.113.7"), ("forwarded", "for=203.0.113.7"), ("x-real-ip", "203.0.113.7")]
    {
        let r = c.get(format!("{}/metrics", gw.base)).header(header, value).send().await.expect("sent");
        assert_eq!(r.status(), 404, "{header}");
        let body = r.text().await.expect("text");
        assert!(!body.contains("fx"), "{header}: {body}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upstream_times_out_with_an_error_naming_it() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\nrequest_timeout = \"2s\"\n\n[[servers]]\nname = \"fxs\"\n{}public = true\nrequest_timeout = \"2s\"\n",
        fixture.url,
        fixture_stdio_toml()
    ))
    .await;
    // The stdio process's start has its own `start_timeout` (120 s by default), so only the
    // slow call itself meets the 2 s limit.
    let c = reqwest::Client::new();
    for server in ["fx", "fxs"] {
        // Also checks that the endpoint answers with a trailing slash.
        let url = format!("{}/", gw.url(server));
        let session = raw_session(&c, &url).await;
        let slow = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "slow", "arguments": {"ms": 8000}}});
        let msgs = messages(post(&c, &url, &slow, Some(&session)).send().await.expect("sent")).await;
        let last = msgs.last().expect("an answer");
        assert_eq!(last["id"], 9, "{server}: {msgs:?}");
        let code = last["error"]["code"].as_i64();
        assert_eq!(code, Some(-32002), "{server}: {last}");
        assert!(last["error"]["message"].as_str().is_some_and(|m| m.ends_with("within 2s")), "{last}");
        assert!(last["error"]["message"].as_str().is_some_and(|m| m.contains(&format!("'{server}'"))), "{last}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_reports_every_problem_and_honours_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[gateway]\nlisten = \"nowhere\"\n\n[[servers]]\nname = \"a\"\n").expect("written");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config"])
        .arg(&file)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("p.toml:1: gateway.listen"), "{err}");
    assert!(err.contains("p.toml:4: server \"a\": set `url`"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("check-config")
        .env("PORTCULLIS_CONFIG", &file)
        .env("PORTCULLIS_GATEWAY__LISTEN", "127.0.0.1:9")
        .env("PORTCULLIS_SERVERS__A__COMMAND", "cat")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn check_config_warns_about_oauth_providers_the_outbound_guard_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.toml");
    // With a [policy] folder, so that the built-in rule's warning is not among them.
    let text = format!(
        "[policy]\ndir = {:?}\n\n[[servers]]\nname = \"local\"\nurl = \"http://127.0.0.1:9/mcp\"\nauth = {{ type = \"oauth\" }}\n",
        dir.path().display().to_string()
    );
    std::fs::write(&file, text).expect("written");
    let check = |strict: bool| check_config(&file, strict);
    let out = check(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("p.toml: warning: server \"local\": url http://127.0.0.1:9/mcp ")
            && err.contains("set outbound.allow_http_loopback = true"),
        "{err}"
    );
    let out = check(true);
    assert!(!out.status.success(), "--strict fails on warnings");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--strict: 1 warning above"));
}

/// Live child processes of this test process that run the stdio fixture.
fn stdio_children() -> usize {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let dir = e.path();
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // Fields after the command name: state, ppid, ...
            let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            let ppid = after.split_whitespace().nth(1).unwrap_or("");
            let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap_or_default();
            ppid == me && cmdline.contains("fixture-server.mjs") && cmdline.contains("--stdio")
        })
        .count()
}

/// Without `[policy]` the built-in rule is in force: `check-config` names it and `--strict`
/// fails on it.
#[test]
fn check_config_strict_fails_on_the_built_in_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[[servers]]\nname = \"local\"\nurl = \"http://127.0.0.1:9/mcp\"\n").expect("written");
    let check = |strict: bool| check_config(&file, strict);
    let out = check(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no [policy] section: the built-in rule is in force"), "{err}");
    assert!(!check(true).status.success(), "--strict fails on the built-in rule");
}

/// `portcullis check-config FILE`, with `--strict` when `strict`.
fn check_config(file: &std::path::Path, strict: bool) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.arg("check-config").arg(file).env_remove("PORTCULLIS_CONFIG");
    if strict {
        cmd.arg("--strict");
    }
    cmd.output().expect("runs")
}
