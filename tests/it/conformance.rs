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
