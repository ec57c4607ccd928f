//! HTTP/2 connections (h2c, prior knowledge) and the listener's timeouts: a client that is
//! slow but busy (pinging between requests, sending a request body a piece at a time) is
//! never cut, and a connection with no request for `limits.idle_timeout` is closed (with
//! GOAWAY) even while its client keeps pinging.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::common::*;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(text: &str) -> Body {
    Full::new(Bytes::from(text.to_owned())).map_err(|never| match never {}).boxed()
}

/// An HTTP/2 connection to `addr` that pings every 200 ms, idle or not; and a task that ends
/// when the connection does.
async fn connect(addr: &str) -> (hyper::client::conn::http2::SendRequest<Body>, tokio::task::JoinHandle<()>) {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    let (tx, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(200))
        .keep_alive_while_idle(true)
        .handshake(io)
        .await
        .expect("an HTTP/2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (tx, task)
}

fn request(addr: &str, path: &str, body: Body) -> http::Request<Body> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body)
        .expect("a request")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_http2_client_is_never_cut_and_an_idle_one_is_closed() {
    let fixture = Fixture::start(&[]).await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"fx\"\nurl = \"{}\"\npublic = true\n\n[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"3s\"\n",
        fixture.url
    ))
    .await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let (mut tx, conn) = connect(&addr).await;
    let init = serde_json::to_string(&init_body()).expect("json");
    let resp = tx.send_request(request(&addr, "/mcp/fx", full(&init))).await.expect("answered");
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_2));
    resp.into_body().collect().await.expect("body");
    // Twice the header-read timeout with no request, pings flowing and window updates after the
    // answer: the connection stays (it is not idle for the idle timeout yet).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!conn.is_finished(), "a connection between requests was closed before its idle timeout");
    // A request whose body takes longer than both timeouts to arrive, a piece every 500 ms.
    let pieces: Vec<String> =
        init.chars().collect::<Vec<_>>().chunks(init.len() / 8 + 1).map(String::from_iter).collect();
    let body = futures::stream::unfold(pieces.into_iter(), |mut rest| async move {
        let piece = rest.next()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(piece))), rest))
    });
    let started = Instant::now();
    let resp = tx.send_request(request(&addr, "/mcp/fx", BodyExt::boxed(StreamBody::new(body)))).await;
    let resp = resp.expect("a slow request is answered");
    assert_eq!(resp.status(), 200);
    let answer: Value =
        serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes()).expect("json");
    assert!(answer["result"]["serverInfo"].is_object(), "{answer}");
    assert!(started.elapsed() > Duration::from_secs(3), "the body took longer than the idle timeout to send");
    // Now idle (pings do not count): closed within the idle timeout, plus a margin.
    let idle = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), conn).await.expect("an idle connection is closed").expect("joined");
    let lasted = idle.elapsed();
    assert!(lasted >= Duration::from_millis(2500), "closed after {lasted:?}, before the idle timeout");
    let c = reqwest::Client::new();
    let text = c.get(format!("{}/metrics", gw.base)).send().await.expect("sent").text().await.expect("text");
    let closed = |reason: &str| {
        let name = format!(r#"portcullis_connections_closed_total{{reason="{reason}"}}"#);
        text.lines().find_map(|l| l.strip_prefix(&name).map(|v| v.trim().to_owned())).unwrap_or_default()
    };
    assert_eq!(closed("idle_timeout"), "1", "{text}");
    assert_eq!(closed("header_timeout"), "", "{text}");
    gw.stop().await;
}
