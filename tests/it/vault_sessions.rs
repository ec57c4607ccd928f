//! Per-user upstream OAuth from the official SDK clients' side: a person who has not connected
//! yet opens a session, gets a connect link from a tool call, connects in the browser, and the
//! same session goes on (no new `initialize`, neither SDK re-initializes by itself); the same
//! after the provider refused a refresh. The clients are the SDK drivers' interactive `connect`
//! scenario (`tests/node/client-driver.mjs`, `tests/python/client_driver.py`), against the
//! provider of `vault_e2e.rs`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::keys::Key;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::common::*;
use crate::vault_e2e::{Caller, Provider, connect, open_link};

/// How long any one answer of a driver may take.
const READ: Duration = Duration::from_secs(60);

/// Which client a driver runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Sdk {
    /// The TypeScript SDK (initialize handshake).
    Ts,
    /// The Python SDK (initialize handshake).
    Py,
    /// The Python SDK on the stateless 2026-07-28 revision: no session.
    PyStateless,
}

/// An SDK driver running the interactive `connect` scenario: one command per line on its
/// stdin, one JSON event per line on its stdout, the report on the last line.
pub(crate) struct Driver {
    sdk: Sdk,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

impl Driver {
    /// Starts the driver for the person whose grant is `token`; `extra` are more driver options.
    pub(crate) async fn start(sdk: Sdk, url: &str, token: &str, extra: &[&str]) -> Driver {
        let (program, script) = match sdk {
            Sdk::Ts => (PathBuf::from("node"), node_dir().join("client-driver.mjs")),
            Sdk::Py | Sdk::PyStateless => (python(), repo().join("tests/python/client_driver.py")),
        };
        let protocol = if sdk == Sdk::PyStateless { "2026-07-28" } else { "legacy" };
        let mut child = Command::new(program)
            .arg(script)
            .args([url, "connect", "--protocol", protocol, "--timeout", "50"])
            .arg("--header")
            .arg(format!("Authorization: Bearer {token}"))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the driver runs");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped");
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
                sink.lock().expect("lock").push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        Driver { sdk, child, stdin, stdout, stderr }
    }

    /// Sends `command` and returns the line it printed, as JSON.
    pub(crate) async fn send(&mut self, command: &str) -> Value {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await.expect("the driver reads");
        self.stdin.flush().await.expect("the driver reads");
        let line = tokio::time::timeout(READ, self.stdout.next_line()).await;
        let stderr = self.stderr.lock().expect("lock").clone();
        let Ok(Ok(Some(line))) = line else {
            panic!("{:?}: no answer to {command:?} within {READ:?}: {line:?}\n{stderr}", self.sdk)
        };
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{:?}: {command:?} printed {line:?} ({e})\n{stderr}", self.sdk))
    }

    /// Sends `command` and returns its event, which must be `event`.
    pub(crate) async fn event(&mut self, command: &str, event: &str) -> Value {
        let answer = self.send(command).await;
        assert_eq!(answer["event"], event, "{:?}: {command:?} answered {answer}", self.sdk);
        answer
    }

    /// `list`: the names of the tools listed, in order.
    pub(crate) async fn list(&mut self) -> Value {
        let answer = self.event("list", "list").await;
        assert_eq!(answer["error"], Value::Null, "{:?}: tools/list failed: {answer}", self.sdk);
        answer["tools"].clone()
    }

    /// `call TOOL`, which must answer with a connect link, as a tool error or as a `-32042`
    /// error when `elicitation` (the client declared URL-mode elicitation). Returns the link
    /// and the session the call was sent in.
    async fn link_from(&mut self, tool: &str, elicitation: bool) -> (String, Value) {
        let answer = self.event(&format!("call {tool}"), "call").await;
        if elicitation {
            assert_eq!(answer["code"], -32042, "{:?}: a URL elicitation is expected: {answer}", self.sdk);
        } else {
            assert_eq!(answer["isError"], true, "{:?}: a tool error is expected: {answer}", self.sdk);
        }
        let link = answer["link"].as_str().unwrap_or_else(|| panic!("{:?}: no link in {answer}", self.sdk));
        assert!(link.contains("/connect/acme?link="), "{link}");
        (link.to_owned(), answer["session"].clone())
    }

    /// `call TOOL` until the link, then the person opens it and connects as `account`.
    /// Returns the session the call was sent in.
    async fn connect_from(&mut self, tool: &str, account: &str, elicitation: bool) -> Value {
        let (link, session) = self.link_from(tool, elicitation).await;
        let (status, page) = open_link(&link, account).await;
        assert_eq!(status, 200, "{page}");
        assert!(page.contains("Connected"), "{page}");
        session
    }

    /// `call whoami`, which must answer `account` in `session`.
    async fn whoami_is(&mut self, account: &str, session: &Value) {
        let answer = self.event("call whoami", "call").await;
        assert_eq!(
            (&answer["isError"], &answer["text"], &answer["error"]),
            (&json!(false), &json!(account), &Value::Null),
            "{:?}: whoami after connecting: {answer}",
            self.sdk
        );
        assert_eq!(&answer["session"], session, "{:?}: the same session goes on: {answer}", self.sdk);
    }

    /// `end`: the driver closes and reports; the report must say `ok`.
    pub(crate) async fn end(mut self) -> Value {
        let report = self.send("end").await;
        assert_eq!(report["ok"], true, "{:?}: {report}\n{}", self.sdk, self.stderr.lock().expect("lock"));
        let exited = tokio::time::timeout(READ, self.child.wait()).await;
        assert!(matches!(exited, Ok(Ok(s)) if s.success()), "{:?}: the driver exited with {exited:?}", self.sdk);
        report
    }
}

/// Tool names, sorted.
fn sorted(names: impl Iterator<Item = Value>) -> Vec<Value> {
    let mut names: Vec<Value> = names.collect();
    names.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    names
}

/// Whether the page behind `link` says it connects `person`'s account (opening it does not
/// use it up).
async fn link_names(link: &str, person: &str) -> bool {
    let page = reqwest::get(link).await.expect("the connect page").text().await.expect("text");
    page.contains(&format!("Portcullis user {person}"))
}

/// A session that got the connect link keeps working once the person connected, and again
/// after a refresh the provider refused (`invalid_grant`) and a reconnection: the same
/// session throughout, one `initialize` in all (none when stateless).
async fn the_session_goes_on_after_connecting(sdk: Sdk, elicitation: bool) {
    let provider = Provider::start(5).await;
    let key = Key::random();
    let gw = TestGateway::start_keyed(&provider.servers(), "", key.clone()).await;
    let store = store_of(&gw).await;
    let alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let extra: &[&str] = if elicitation { &["--url-elicitation"] } else { &[] };
    let mut driver = Driver::start(sdk, &gw.url("acme"), &alice.token, extra).await;

    let session = driver.connect_from("whoami", "alice", elicitation).await;
    assert_eq!(session.is_null(), sdk == Sdk::PyStateless, "{session}");
    driver.whoami_is("alice", &session).await;

    provider.revoke_refresh_token(&gw, &key, &store, "alice").await;
    // Past the access token's expiry: the next call needs the refresh that is now refused.
    tokio::time::sleep(Duration::from_secs(provider.ttl + 1)).await;
    let again = driver.connect_from("whoami", "alice", elicitation).await;
    assert_eq!(again, session, "the reconnect link came in the same session");
    driver.whoami_is("alice", &session).await;

    let report = driver.end().await;
    let (initializes, sessions) = if sdk == Sdk::PyStateless { (0, json!([])) } else { (1, json!([session])) };
    assert_eq!(report["initialize_requests"], initializes, "{report}");
    assert_eq!(report["session_ids"], sessions, "{report}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_typescript_sdk_session_goes_on_after_connecting() {
    the_session_goes_on_after_connecting(Sdk::Ts, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_typescript_sdk_session_goes_on_after_a_url_elicitation() {
    the_session_goes_on_after_connecting(Sdk::Ts, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_session_goes_on_after_connecting() {
    the_session_goes_on_after_connecting(Sdk::Py, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_stateless_client_goes_on_after_connecting() {
    the_session_goes_on_after_connecting(Sdk::PyStateless, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_stateless_client_goes_on_after_a_url_elicitation() {
    the_session_goes_on_after_connecting(Sdk::PyStateless, true).await;
}

/// Someone who has not connected sees the tools the gateway saw in a connected person's
/// session; a call returns a link made for them, and once they connected, their calls act as
/// themselves.
#[tokio::test(flavor = "multi_thread")]
async fn an_unconnected_person_sees_the_tools_and_gets_a_link_of_their_own() {
    let provider = Provider::start(30).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let mut alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    connect(&mut alice, "alice").await;
    assert_eq!(alice.whoami().await, "alice");
    let listed = alice.send(&json!({"jsonrpc": "2.0", "id": 60, "method": "tools/list"})).await;
    assert_eq!(listed.status(), 200, "alice lists the tools in her connected session");
    let tools = messages(listed).await.remove(0)["result"]["tools"].clone();
    let upstream = sorted(tools.as_array().expect("tools").iter().map(|t| t["name"].clone()));
    assert!(upstream.contains(&json!("whoami")) && upstream.contains(&json!("echo")), "{upstream:?}");

    let bob = Caller::new(&store, &gw.url("acme"), "bob").await;
    let mut driver = Driver::start(Sdk::Ts, &gw.url("acme"), &bob.token, &[]).await;
    let names = driver.list().await;
    let seen = sorted(names.as_array().expect("names").iter().cloned());
    assert_eq!(seen, upstream, "bob, unconnected, sees the tools alice's session listed");
    let (link, session) = driver.link_from("echo", false).await;
    assert!(link_names(&link, "bob").await, "the link connects bob's account: {link}");
    let (status, page) = open_link(&link, "bob").await;
    assert_eq!((status, page.contains("Connected")), (200, true), "{page}");
    driver.whoami_is("bob", &session).await;
    driver.end().await;
    gw.stop().await;
}

/// On a gateway that never saw the upstream's tools, an unconnected person's list is one
/// `connect` tool, and calling it returns the link.
#[tokio::test(flavor = "multi_thread")]
async fn with_no_tools_seen_yet_the_list_is_a_connect_tool() {
    let provider = Provider::start(30).await;
    let gw = TestGateway::start(&provider.servers()).await;
    let store = store_of(&gw).await;
    let alice = Caller::new(&store, &gw.url("acme"), "alice").await;
    let mut driver = Driver::start(Sdk::Py, &gw.url("acme"), &alice.token, &[]).await;
    assert_eq!(driver.list().await, json!(["connect"]));
    let (link, _) = driver.link_from("connect", false).await;
    assert!(link_names(&link, "alice").await, "the link connects alice's account: {link}");
    driver.end().await;
    gw.stop().await;
}
