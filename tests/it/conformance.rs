//! The official conformance suite (npm `@modelcontextprotocol/conformance`, on Node 22), in
//! server mode, against the gateway fronting our fixture over HTTP and over stdio.

use tokio::process::Command;

use crate::common::*;

async fn run_suite(url: &str) {
    let out = Command::new(node_dir().join("run-conformance-server.sh"))
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .expect("the conformance script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("conformance: 32 passed, 0 failed"),
        "conformance against {url}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_server_scenario_passes_through_the_gateway_to_an_http_upstream() {
    let fixture = Fixture::start(&[]).await;
    let gw =
        TestGateway::start(&format!("[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n", fixture.url)).await;
    run_suite(&gw.url("fx")).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_server_scenario_passes_through_the_gateway_to_a_stdio_upstream() {
    let gw = TestGateway::start(&format!("[[servers]]\nname = \"fxs\"\n{}public = true\n", fixture_stdio_toml())).await;
    run_suite(&gw.url("fxs")).await;
    gw.stop().await;
}

/// The example that drives the gateway's upstream OAuth client (`examples/oauth_conformance_client.rs`),
/// built next to the test binaries by `cargo test`/`cargo nextest`.
fn oauth_driver() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let driver = dir.join("examples/oauth_conformance_client");
    assert!(driver.exists(), "{} is missing: build it with `cargo build --examples`", driver.display());
    driver
}

/// The conformance CLI in client mode, with `args`, running the OAuth driver.
async fn conformance_client(args: &[&str]) -> std::process::Output {
    let node = node_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    Command::new(node.join("node_modules/.bin/node"))
        .arg(node.join("node_modules/@modelcontextprotocol/conformance/dist/index.js"))
        .arg("client")
        .args(args)
        .arg("--command")
        .arg(oauth_driver())
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output()
        .await
        .expect("the conformance CLI runs")
}

async fn run_client_suite(suite: &str, scenarios: usize) {
    let out = conformance_client(&["--suite", suite]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let passed = stdout.lines().filter(|l| l.starts_with('✓')).count();
    assert!(
        out.status.success() && passed == scenarios && stdout.contains(" 0 failed, 0 warnings"),
        "conformance client suite {suite}: {passed}/{scenarios} scenarios passed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// R76–R97, R103: discovery (four metadata layouts), CIMD, scope selection and step-up, the
/// retry limit, the three token endpoint authentication methods and pre-registration.
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_oauth_client_passes_the_auth_suite() {
    run_client_suite("auth", 14).await;
}

/// R103: 2025-03-26 upstreams (metadata at the origin, and the default endpoints).
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_oauth_client_passes_the_backcompat_suite() {
    run_client_suite("backcompat", 2).await;
}

/// R78 (a resource mismatch stops the flow) and R93 (`offline_access` only when offered).
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_oauth_client_passes_the_draft_suite() {
    run_client_suite("draft", 3).await;
}

/// R104: machine-to-machine upstreams (`type = "client_credentials"`), the extension scenario
/// with `client_secret_basic` (the JWT-assertion variant needs private_key_jwt, not built).
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_oauth_client_passes_the_client_credentials_scenario() {
    let out = conformance_client(&["--scenario", "auth/client-credentials-basic"]).await;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // "Passed: N/N, 0 failed, 0 warnings": every check passed, whatever their number.
    let all_passed = text.lines().filter_map(|l| l.trim().strip_prefix("Passed: ")).any(|rest| {
        let (counts, tail) = rest.split_once(',').unwrap_or((rest, ""));
        counts.split_once('/').is_some_and(|(a, b)| a == b) && tail.trim() == "0 failed, 0 warnings"
    });
    assert!(
        out.status.success() && all_passed && text.contains("OVERALL: PASSED"),
        "auth/client-credentials-basic:\n{text}"
    );
}
