//! `portcullis-bench-stub`: a minimal MCP server for the relay benchmark (`bench/relay.rs`).
//!
//! It answers Streamable HTTP with fixed, precomputed bytes so that, in the benchmark, the
//! gateway's own cost dominates. Only the JSON-RPC envelope is read (`id`, `method`, and for
//! `tools/call` the tool name); the request's `id` is copied into the answer verbatim.
//!
//! ```text
//! portcullis-bench-stub [PORT] [--threads N] [--exit-on-stdin-eof]
//! ```
//!
//! Prints `listening http://127.0.0.1:<port>/mcp` once bound (PORT 0 or absent: any free port).
//! Tools: `small` (short text), `64k` (64 KiB of text), `1m` (1 MiB of text), `sse` (the small
//! result framed as one `text/event-stream` event). `--threads` picks the runtime's worker
//! count (default 1: a current-thread runtime, the cheapest per request).
//! `--exit-on-stdin-eof` exits when stdin closes, so the stub dies with its parent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Protocol revisions the stub echoes back; anything else gets the newest.
const VERSIONS: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];
const SESSION_ID: &str = "bench-stub-session";

/// A response body of up to three precomputed pieces (prefix, id, suffix): no copy of large
/// payloads per request, and an exact length so hyper sends `Content-Length`.
struct Pieces {
    parts: [Bytes; 3],
    next: usize,
    remaining: u64,
}

impl Pieces {
    fn new(parts: [Bytes; 3]) -> Pieces {
        let remaining = parts.iter().map(|p| p.len() as u64).sum();
        Pieces { parts, next: 0, remaining }
    }

    fn empty() -> Pieces {
        Pieces::new([Bytes::new(), Bytes::new(), Bytes::new()])
    }
}

impl Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        while this.next < this.parts.len() {
            let part = std::mem::take(&mut this.parts[this.next]);
            this.next += 1;
            if !part.is_empty() {
                this.remaining -= part.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(part))));
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Everything the stub ever answers, built once.
struct Canned {
    /// `{"jsonrpc":"2.0","id":`
    json_prefix: Bytes,
    /// `event: message\ndata: {"jsonrpc":"2.0","id":`
    sse_prefix: Bytes,
    /// `,"result":{InitializeResult}}` per entry of `VERSIONS`.
    initialize: [Bytes; 3],
    tools_list: Bytes,
    small: Bytes,
    small_sse: Bytes,
    k64: Bytes,
    m1: Bytes,
    empty_result: Bytes,
    unknown_tool: Bytes,
    unknown_method: Bytes,
    parse_error: Bytes,
}

fn text_of(len: usize) -> String {
    const PATTERN: &str = "The quick brown fox jumps over the lazy dog. ";
    PATTERN.chars().cycle().take(len).collect()
}

fn result_suffix(result: &serde_json::Value) -> Bytes {
    Bytes::from(format!(",\"result\":{result}}}"))
}

fn text_result(text: &str) -> serde_json::Value {
    serde_json::json!({"content": [{"type": "text", "text": text}], "isError": false})
}

impl Canned {
    fn build() -> Canned {
        let initialize = VERSIONS.map(|v| {
            result_suffix(&serde_json::json!({
                "protocolVersion": v,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "portcullis-bench-stub", "version": "0.1.0"},
            }))
        });
        let tool = |name: &str, description: &str| {
            serde_json::json!({
                "name": name,
                "description": description,
                "inputSchema": {"type": "object", "properties": {}},
            })
        };
        let tools = serde_json::json!({"tools": [
            tool("small", "A short text result."),
            tool("64k", "A 64 KiB text result."),
            tool("1m", "A 1 MiB text result."),
            tool("sse", "A short text result as a text/event-stream."),
        ]});
        let small = result_suffix(&text_result("ok"));
        let mut small_sse = small.to_vec();
        small_sse.extend_from_slice(b"\n\n");
        let error = |code: i64, message: &str| {
            Bytes::from(format!(",\"error\":{}}}", serde_json::json!({"code": code, "message": message})))
        };
        Canned {
            json_prefix: Bytes::from_static(b"{\"jsonrpc\":\"2.0\",\"id\":"),
            sse_prefix: Bytes::from_static(b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":"),
            initialize,
            tools_list: result_suffix(&tools),
            small,
            small_sse: Bytes::from(small_sse),
            k64: result_suffix(&text_result(&text_of(64 * 1024))),
            m1: result_suffix(&text_result(&text_of(1024 * 1024))),
            empty_result: result_suffix(&serde_json::json!({})),
            unknown_tool: error(-32602, "unknown tool"),
            unknown_method: error(-32601, "method not found"),
            parse_error: error(-32700, "parse error"),
        }
    }
}

/// Just enough of a JSON-RPC message to route it; `params.arguments` and the rest are skipped.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<&'a str>,
    #[serde(borrow, default)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow, default)]
    name: Option<&'a str>,
    #[serde(borrow, default, rename = "protocolVersion")]
    protocol_version: Option<&'a str>,
}

enum Kind {
    Json,
    Sse,
}

fn respond(status: StatusCode, body: Pieces, kind: Option<Kind>, session: bool) -> Response<Pieces> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    match kind {
        Some(Kind::Json) => {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        Some(Kind::Sse) => {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert("cache-control", HeaderValue::from_static("no-cache"));
        }
        None => {}
    }
    if session {
        h.insert("mcp-session-id", HeaderValue::from_static(SESSION_ID));
    }
    resp
}

fn status(status: StatusCode) -> Response<Pieces> {
    respond(status, Pieces::empty(), None, false)
}

async fn handle(canned: Arc<Canned>, req: Request<Incoming>) -> Result<Response<Pieces>, Infallible> {
    if req.uri().path() != "/mcp" {
        return Ok(status(StatusCode::NOT_FOUND));
    }
    match *req.method() {
        Method::POST => {}
        Method::DELETE => return Ok(status(StatusCode::OK)),
        _ => return Ok(status(StatusCode::METHOD_NOT_ALLOWED)),
    }
    let Ok(body) = req.into_body().collect().await.map(|c| c.to_bytes()) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(&body) else {
        let parts = [canned.json_prefix.clone(), Bytes::from_static(b"null"), canned.parse_error.clone()];
        return Ok(respond(StatusCode::OK, Pieces::new(parts), Some(Kind::Json), false));
    };
    // Notifications and responses: nothing to answer.
    let (Some(id), Some(method)) = (envelope.id, envelope.method) else {
        return Ok(status(StatusCode::ACCEPTED));
    };
    let id = body.slice_ref(id.get().as_bytes());
    let params = envelope.params.as_ref();
    let mut kind = Kind::Json;
    let mut session = false;
    let suffix = match method {
        "tools/call" => match params.and_then(|p| p.name) {
            Some("small") => canned.small.clone(),
            Some("64k") => canned.k64.clone(),
            Some("1m") => canned.m1.clone(),
            Some("sse") => {
                kind = Kind::Sse;
                canned.small_sse.clone()
            }
            _ => canned.unknown_tool.clone(),
        },
        "initialize" => {
            session = true;
            let asked = params.and_then(|p| p.protocol_version).unwrap_or_default();
            let i = VERSIONS.iter().position(|v| *v == asked).unwrap_or(VERSIONS.len() - 1);
            canned.initialize[i].clone()
        }
        "tools/list" => canned.tools_list.clone(),
        "ping" => canned.empty_result.clone(),
        _ => canned.unknown_method.clone(),
    };
    let prefix = match kind {
        Kind::Json => canned.json_prefix.clone(),
        Kind::Sse => canned.sse_prefix.clone(),
    };
    Ok(respond(StatusCode::OK, Pieces::new([prefix, id, suffix]), Some(kind), session))
}

struct Args {
    port: u16,
    threads: usize,
    exit_on_stdin_eof: bool,
}

fn args() -> Args {
    let mut out = Args { port: 0, threads: 1, exit_on_stdin_eof: false };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => out.threads = it.next().and_then(|n| n.parse().ok()).expect("--threads N"),
            "--exit-on-stdin-eof" => out.exit_on_stdin_eof = true,
            "-h" | "--help" => {
                println!("portcullis-bench-stub [PORT] [--threads N] [--exit-on-stdin-eof]");
                std::process::exit(0);
            }
            p => out.port = p.parse().expect("PORT must be a number"),
        }
    }
    out
}

fn main() {
    let args = args();
    if args.exit_on_stdin_eof {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
    };
    let runtime = runtime.expect("the tokio runtime starts");
    runtime.block_on(serve(args.port));
}

async fn serve(port: u16) {
    let canned = Arc::new(Canned::build());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("the stub can bind its port");
    let addr = listener.local_addr().expect("a bound listener has an address");
    println!("listening http://{addr}/mcp");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let canned = canned.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(canned.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
