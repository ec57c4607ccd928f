//! What the benchmarks share: their child processes and the stub upstream
//! (`bench/stub.rs`). Included with `#[path]` by `relay.rs` and `instructions.rs`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A child process, killed when dropped (also when the bench panics and unwinds).
pub struct Proc {
    pub child: Child,
    pub pid: u32,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, what: &str) -> Proc {
        let child = cmd.kill_on_drop(true).spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let pid = child.id().expect("a just-spawned child has a pid");
        Proc { child, pid }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Starts the stub upstream on an ephemeral port; it exits when our end of its stdin closes.
pub async fn start_stub() -> (Proc, SocketAddr) {
    let mut stub = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_portcullis-bench-stub"))
            .args(["0", "--exit-on-stdin-eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
        "the stub",
    );
    let stdout = stub.child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the stub prints its address within 30s")
        .expect("the stub's stdout is readable")
        .expect("the stub prints its address before exiting");
    let addr = line
        .strip_prefix("listening http://")
        .and_then(|rest| rest.strip_suffix("/mcp"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected stub banner {line:?}"));
    (stub, addr)
}
