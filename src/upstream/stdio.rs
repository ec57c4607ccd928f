//! stdio upstreams: one child process per server (per person, for servers with per-user
//! OAuth: their access token in its environment), started on first use, initialized once by
//! the gateway, restarted with backoff after it dies and at once when its token changes,
//! stderr copied into the gateway's logs, and stopped (stdin closed, then SIGTERM, then SIGKILL
//! to its process group) on shutdown or when its person's connection ends.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, mpsc};

use super::limit::{Line, Lines};
use super::mux::Mux;
use super::{ClientHello, Opened, Reply, UpstreamError};
use crate::config::{ServerConfig, ServerTransport};
use crate::protocol::jsonrpc::{Kind, Message};
use crate::protocol::session::SessionState;
use crate::protocol::version;

/// Environment variables passed on from the gateway's own environment.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR", "USER", "SYSTEMROOT"];
/// Backoff after a crash: doubles from the first value up to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(30));
/// A process that lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

struct Running {
    mux: Arc<Mux>,
    init: Value,
    child: Arc<Mutex<Child>>,
    writer: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Slot {
    running: Option<Running>,
    failures: u32,
    last_start: Option<Instant>,
    /// SHA-256 of the access token the process was started with (OAuth servers).
    token: Option<[u8; 32]>,
}

/// A stdio upstream.
pub struct StdioUpstream {
    name: Arc<str>,
    command: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    /// Longest wait for the process to start and answer `initialize`.
    start_timeout: Duration,
    /// Longest wait for room in the queue toward the process.
    request_timeout: Duration,
    limits: crate::config::UpstreamLimits,
    auth: crate::config::UpstreamAuth,
    credentials: Arc<super::credentials::Credentials>,
    /// Processes by person (`""`: the one process of a server without per-user OAuth).
    slots: Mutex<std::collections::HashMap<String, Arc<Mutex<Slot>>>>,
    ended: std::sync::Mutex<Ended>,
}

/// Sessions ended with DELETE, remembered (up to a cap) so their ids stop working: by a
/// 16-byte digest of their key, so the memory this takes is bounded at about 5 MB a server.
#[derive(Default)]
struct Ended {
    keys: std::collections::HashSet<[u8; 16]>,
    order: std::collections::VecDeque<[u8; 16]>,
}

/// How many ended sessions a server remembers; older ones are forgotten first.
const ENDED_CAP: usize = 100_000;

fn ended_digest(key: &str) -> [u8; 16] {
    use sha2::Digest;
    let full = sha2::Sha256::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

impl StdioUpstream {
    /// A connector for one configured stdio server (starts nothing).
    pub fn new(config: &ServerConfig, credentials: Arc<super::credentials::Credentials>) -> StdioUpstream {
        let ServerTransport::Stdio { command, args, env, cwd, start_timeout } = &config.transport else {
            unreachable!("StdioUpstream is built only for stdio servers")
        };
        StdioUpstream {
            name: Arc::from(config.name.as_str()),
            command: command.clone(),
            args: args.clone(),
            env: env.clone(),
            cwd: cwd.clone(),
            start_timeout: *start_timeout,
            request_timeout: config.request_timeout,
            limits: config.limits,
            auth: config.auth.clone(),
            credentials,
            slots: Mutex::new(std::collections::HashMap::new()),
            ended: std::sync::Mutex::new(Ended::default()),
        }
    }

    fn process_error(&self, detail: impl Into<String>) -> UpstreamError {
        UpstreamError::Process { server: self.name.to_string(), detail: detail.into() }
    }

    fn oauth(&self) -> Option<&crate::config::OAuthConfig> {
        match &self.auth {
            crate::config::UpstreamAuth::OAuth(o) => Some(o),
            _ => None,
        }
    }

    /// Whose process serves `caller`: their own with per-user OAuth, else the server's one.
    fn process_key(&self, caller: &str) -> String {
        self.oauth().map(|o| o.subject(caller)).unwrap_or_default()
    }

    async fn slot(&self, key: &str) -> Arc<Mutex<Slot>> {
        self.slots.lock().await.entry(key.to_owned()).or_default().clone()
    }

    /// The live process for `caller`, started (or restarted after backoff, or with a fresh
    /// token when the token changed) if needed.
    async fn running(&self, caller: &str) -> Result<(Arc<Mux>, Value), UpstreamError> {
        let token = match self.oauth() {
            Some(_) => Some(Box::pin(self.credentials.env_token(&self.name, caller)).await?),
            None => None,
        };
        let fingerprint = token.as_ref().map(|t| {
            use sha2::Digest;
            <[u8; 32]>::from(sha2::Sha256::digest(secrecy::ExposeSecret::expose_secret(t).as_bytes()))
        });
        let slot = self.slot(&self.process_key(caller)).await;
        let mut slot = slot.lock().await;
        if let Some(r) = &slot.running {
            if !r.mux.is_closed() && slot.token == fingerprint {
                return Ok((r.mux.clone(), r.init.clone()));
            }
            if r.mux.is_closed() {
                if slot.last_start.is_some_and(|t| t.elapsed() >= HEALTHY_AFTER) {
                    slot.failures = 0;
                }
                slot.failures += 1;
            } else {
                tracing::info!(server = %self.name, "restarting a stdio upstream with its fresh token");
            }
            if let Some(old) = slot.running.take() {
                tokio::spawn(stop(old));
            }
        }
        if slot.failures > 0 {
            let wait = BACKOFF.0.saturating_mul(1 << slot.failures.min(16)).min(BACKOFF.1);
            let since = slot.last_start.map(|t| t.elapsed()).unwrap_or(wait);
            if since < wait {
                tokio::time::sleep(wait - since).await;
            }
        }
        slot.last_start = Some(Instant::now());
        // Boxed, as the token above: starting a process makes a large future, which every
        // message's future would otherwise carry.
        let running = match tokio::time::timeout(self.start_timeout, Box::pin(self.start(token.as_ref()))).await {
            Ok(r) => r,
            Err(_) => Err(self.process_error(format!(
                "did not start and initialize within {} (start_timeout)",
                super::human(self.start_timeout)
            ))),
        };
        let running = running.inspect_err(|_| slot.failures += 1)?;
        let out = (running.mux.clone(), running.init.clone());
        slot.running = Some(running);
        slot.token = fingerprint;
        Ok(out)
    }

    async fn start(&self, token: Option<&secrecy::SecretString>) -> Result<Running, UpstreamError> {
        let mut cmd = Command::new(&self.command);
        cmd.args(&self.args)
            .env_clear()
            .envs(INHERITED_ENV.iter().filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))))
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if let crate::config::UpstreamAuth::StaticEnv { secret, env } = &self.auth {
            let value = self.credentials.secret(&self.name, secret).await?;
            cmd.env(env, secrecy::ExposeSecret::expose_secret(&value));
        }
        if let (Some(token), Some(env)) = (token, self.oauth().and_then(|o| o.env.as_ref())) {
            cmd.env(env, secrecy::ExposeSecret::expose_secret(token));
        }
        let mut child =
            cmd.spawn().map_err(|e| self.process_error(format!("could not start `{}`: {e}", self.command)))?;
        tracing::info!(server = %self.name, pid = child.id(), "started stdio upstream");
        metrics::counter!("portcullis_stdio_starts_total", "server" => self.name.to_string()).increment(1);
        let (stdin, stdout, stderr) = match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(i), Some(o), Some(e)) => (i, o, e),
            _ => return Err(self.process_error("has no stdio pipes")),
        };
        let (mux, out_rx) = Mux::new(self.name.clone(), self.limits.queue_messages, self.request_timeout);
        let mux = Arc::new(mux);
        let child = Arc::new(Mutex::new(child));
        let writer = tokio::spawn(write_lines(stdin, out_rx));
        tokio::spawn(log_stderr(self.name.clone(), stderr));
        let max_line = self.limits.max_response_bytes;
        tokio::spawn(read_stdout(self.name.clone(), stdout, max_line, mux.clone(), child.clone()));

        let hello = ClientHello {
            protocol: version::LATEST_STATEFUL.to_owned(),
            capabilities: serde_json::json!({ "sampling": {}, "elicitation": {}, "roots": { "listChanged": true } }),
            client_info: serde_json::json!({ "name": "portcullis", "version": env!("CARGO_PKG_VERSION") }),
            caller: String::new(),
        };
        let running = Running { mux: mux.clone(), init: Value::Null, child, writer };
        let initialized = async {
            let response = mux.call(super::initialize_request(Value::from(0), &hello)).await?;
            let opened = super::opened_from_response(&self.name, response, None)?;
            mux.forward(
                "",
                &Message::from_value(&serde_json::json!({"jsonrpc":"2.0","method":"notifications/initialized"})),
            )
            .await?;
            Ok::<_, UpstreamError>(opened.result)
        };
        // The caller's timeout may drop this future: a guard stops the process unless it
        // initialized, so no half-started process (with a token in its environment) lingers.
        let mut guard = StartGuard(Some(running));
        let init = initialized.await?;
        let mut running = guard.0.take().ok_or_else(|| self.process_error("lost its process"))?;
        running.init = init;
        Ok(running)
    }

    /// Answers a client's `initialize` from the process's own initialization.
    pub async fn open(&self, hello: &ClientHello) -> Result<Opened, UpstreamError> {
        let (_, init) = self.running(&hello.caller).await?;
        let upstream_protocol = init.get("protocolVersion").and_then(Value::as_str).unwrap_or_default().to_owned();
        Ok(Opened { upstream_session: None, upstream_protocol, result: init })
    }

    fn check_live(&self, session: &SessionState) -> Result<(), UpstreamError> {
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.keys.contains(&ended_digest(&session.key)) { Err(UpstreamError::SessionExpired) } else { Ok(()) }
    }

    /// Relays one client message.
    pub async fn send(&self, session: &SessionState, message: Message) -> Result<Reply, UpstreamError> {
        self.check_live(session)?;
        let (mux, _) = self.running(&session.subject).await?;
        send_via_mux(&mux, session, message).await
    }

    /// The session's GET stream.
    pub async fn listen(&self, session: &SessionState) -> Result<Reply, UpstreamError> {
        self.check_live(session)?;
        if session.pending {
            return Ok(Reply::Status(http::StatusCode::METHOD_NOT_ALLOWED));
        }
        let (mux, _) = self.running(&session.subject).await?;
        Ok(Reply::Messages(mux.listen(&session.key, session.features)?))
    }

    /// Ends the session: its id stops working (the process keeps serving others).
    pub async fn close(&self, session: &SessionState) {
        {
            let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
            let digest = ended_digest(&session.key);
            if ended.keys.insert(digest) {
                ended.order.push_back(digest);
            }
            while ended.order.len() > ENDED_CAP {
                if let Some(old) = ended.order.pop_front() {
                    ended.keys.remove(&old);
                }
            }
        }
        let slot = self.slots.lock().await.get(&self.process_key(&session.subject)).cloned();
        if let Some(slot) = slot
            && let Some(r) = &slot.lock().await.running
        {
            r.mux.forget(&session.key);
        }
    }

    /// Ready when the process runs, or can be started (a per-user server has no process of
    /// its own to check).
    pub async fn ready(&self) -> Result<(), UpstreamError> {
        if self.oauth().is_some_and(|o| o.per_user) {
            return Ok(());
        }
        self.running("").await.map(|_| ())
    }

    /// Stops every process: close stdin, then SIGTERM, then SIGKILL.
    pub async fn shutdown(&self) {
        let slots: Vec<_> = self.slots.lock().await.drain().map(|(_, s)| s).collect();
        for slot in slots {
            if let Some(r) = slot.lock().await.running.take() {
                stop(r).await;
            }
        }
    }

    /// Stops the processes of people whose connection ended (disabled, revoked, needing
    /// reconnection). Returns how many were stopped.
    pub async fn sweep(&self) -> usize {
        if !self.oauth().is_some_and(|o| o.per_user) {
            return 0;
        }
        let keys: Vec<String> = self.slots.lock().await.keys().cloned().collect();
        let mut stopped = 0;
        for key in keys {
            if self.credentials.connected(&self.name, &key).await {
                continue;
            }
            let slot = self.slots.lock().await.remove(&key);
            if let Some(slot) = slot
                && let Some(r) = slot.lock().await.running.take()
            {
                tracing::info!(server = %self.name, "stopping a stdio upstream whose connection ended");
                stop(r).await;
                stopped += 1;
            }
        }
        stopped
    }
}

/// Stops a process that did not finish starting, when dropped while still holding it.
struct StartGuard(Option<Running>);

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            tokio::spawn(stop(r));
        }
    }
}

/// Stops one process: close stdin, then SIGTERM, then SIGKILL to its process group.
async fn stop(r: Running) {
    r.mux.close("was stopped by the gateway");
    r.writer.abort(); // drops stdin: well-behaved servers exit on EOF
    let mut child = r.child.lock().await;
    if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_ok() {
        return;
    }
    #[cfg(unix)]
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_ok() {
            return;
        }
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

/// Sends a client message through a mux: requests get a message stream, the rest are
/// forwarded; `initialized` was already sent by the gateway itself.
pub async fn send_via_mux(mux: &Mux, session: &SessionState, message: Message) -> Result<Reply, UpstreamError> {
    match message.kind {
        Kind::Request => {
            let value = message
                .value()
                .map_err(|e| UpstreamError::Protocol { server: String::new(), detail: e.to_string() })?;
            Ok(Reply::Messages(mux.request(&session.key, session.features, value).await?))
        }
        Kind::Notification if message.method() == "notifications/initialized" => Ok(Reply::Accepted),
        Kind::Notification | Kind::Response => {
            mux.forward(&session.key, &message).await?;
            Ok(Reply::Accepted)
        }
    }
}

async fn write_lines(mut stdin: tokio::process::ChildStdin, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(bytes) = rx.recv().await {
        // JSON text never contains a raw newline, so one line is one message.
        if stdin.write_all(&bytes).await.is_err() || stdin.write_all(b"\n").await.is_err() {
            break;
        }
        if rx.is_empty() && stdin.flush().await.is_err() {
            break;
        }
    }
}

/// Longest stderr line copied into the logs; the rest of a longer one is skipped.
const MAX_STDERR_LINE: usize = 16 * 1024;

async fn log_stderr(server: Arc<str>, stderr: tokio::process::ChildStderr) {
    let mut lines = Lines::new(BufReader::new(stderr), MAX_STDERR_LINE);
    while let Some(line) = lines.next_line().await {
        match line {
            Line::Text(line) => {
                let line = String::from_utf8_lossy(&line);
                tracing::info!(target: "portcullis::upstream::stderr", server = %server, "{line}");
            }
            Line::TooLong => tracing::info!(
                target: "portcullis::upstream::stderr",
                server = %server,
                "(a stderr line longer than {MAX_STDERR_LINE} bytes was skipped)"
            ),
        }
    }
}

/// Reads the process's messages, one per line of at most `max_line` bytes. A longer line is
/// skipped without being kept: it may have been the answer to any pending call, so each of
/// them fails with an error naming the server (and is cancelled upstream), and the process
/// goes on serving.
async fn read_stdout(
    server: Arc<str>,
    stdout: tokio::process::ChildStdout,
    max_line: usize,
    mux: Arc<Mux>,
    child: Arc<Mutex<Child>>,
) {
    let mut lines = Lines::new(BufReader::new(stdout), max_line);
    while let Some(line) = lines.next_line().await {
        let line = match line {
            Line::Text(line) => line,
            Line::TooLong => {
                // Counted and logged; the calls in flight on the process fail.
                super::limit::too_large(&server, max_line);
                let why = format!("sent a message larger than {max_line} bytes (max_response_bytes)");
                mux.fail_pending(&why);
                continue;
            }
        };
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Value>(text) {
            Ok(Value::Array(items)) => items.into_iter().for_each(|m| mux.route(m)),
            Ok(msg) => mux.route(msg),
            Err(_) => tracing::warn!(server = %server, "ignored a stdout line that is not JSON"),
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(5), async { child.lock().await.wait().await }).await;
    let why = match status {
        Ok(Ok(s)) => format!("exited ({s})"),
        _ => "closed its stdout".to_owned(),
    };
    if mux.is_closed() {
        // The gateway stopped it (shutdown); nothing went wrong.
        tracing::info!(server = %server, "stdio upstream {why}");
    } else {
        tracing::warn!(server = %server, "stdio upstream {why}");
    }
    metrics::counter!("portcullis_stdio_exits_total", "server" => server.to_string()).increment(1);
    mux.close(&why);
}
