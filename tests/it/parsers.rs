//! Property tests of the SSE reading the gateway does (`upstream::event_stream`, which reads
//! Streamable HTTP answers and legacy SSE streams in `upstream::http` and `upstream::sse`):
//! any bytes, cut anywhere, never panic and never fail the reading; valid events, written as an
//! upstream or the gateway itself (axum's `Event`) writes them and cut at any points, are read
//! back equal, whatever unknown fields and lines without a colon are mixed in (ignored, as the
//! SSE standard says). The `WWW-Authenticate` parser's properties are beside it, in
//! `src/vault/challenge.rs`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse as AxumSse};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use portcullis::upstream::event_stream::{self, Event as Sse, Events};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::common::*;

/// `bytes` cut at `cuts` (positions, any order, repeats allowed), as a body stream yields them.
fn chunks(bytes: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]])).collect()
}

/// Everything the gateway's reader makes of `chunks`: events, or where it stopped with an error
/// (only the body itself can fail the reading).
fn read(chunks: Vec<Bytes>) -> Vec<Result<Sse, String>> {
    let stream = futures::stream::iter(chunks.into_iter().map(Ok::<Bytes, std::io::Error>));
    let events = Events::new(stream);
    futures::executor::block_on(events.map(|r| r.map_err(|e| e.to_string())).collect())
}

/// An event as the gateway relies on it: a name, data of several lines, an id, a retry.
fn event() -> impl Strategy<Value = Sse> {
    let line = "[^\r\n\u{0}]{0,20}";
    (
        proptest::option::of("[A-Za-z][A-Za-z0-9_/-]{0,15}"),
        proptest::option::of(proptest::collection::vec(line, 1..4).prop_map(|l| l.join("\n"))),
        proptest::option::of(line),
        proptest::option::of(0u64..100_000),
    )
        .prop_filter("an event has at least one field", |(e, d, i, r)| {
            e.is_some() || d.is_some() || i.is_some() || r.is_some()
        })
        .prop_map(|(event, data, id, retry)| Sse { event, data, id, retry })
}

/// `events` as an upstream writes them: field lines in any order, data split into one line
/// per line, comments, and `\n`, `\r\n` or `\r` line ends.
fn render(events: &[Sse], eol: &str, comments: bool) -> Vec<u8> {
    render_with(events, eol, comments, &[])
}

/// A line an upstream may add that is no field the reader knows: an unknown field with or
/// without a value, or a line without a colon (a field named by the whole line).
fn junk() -> impl Strategy<Value = String> {
    let name = "[a-zA-Z][a-zA-Z0-9_-]{0,8}"
        .prop_filter("not a known field", |n| !matches!(n.as_str(), "data" | "event" | "id" | "retry"));
    (name, proptest::option::of("[^\r\n]{0,12}")).prop_map(|(name, value)| match value {
        Some(v) => format!("{name}:{v}"),
        None => name,
    })
}

/// Like [`render`], with the lines of `junk` spread among each event's fields.
fn render_with(events: &[Sse], eol: &str, comments: bool, junk: &[String]) -> Vec<u8> {
    let mut out = String::new();
    let mut junk = junk.iter().cycle().take(junk.len() * 2);
    let mut extra = |out: &mut String| {
        if let Some(line) = junk.next() {
            out.push_str(&format!("{line}{eol}"));
        }
    };
    for e in events {
        if comments {
            out.push_str(&format!(": keep-alive{eol}"));
        }
        extra(&mut out);
        if let Some(id) = &e.id {
            out.push_str(&format!("id: {id}{eol}"));
        }
        if let Some(data) = &e.data {
            for line in data.split('\n') {
                out.push_str(&format!("data: {line}{eol}"));
            }
        }
        extra(&mut out);
        if let Some(name) = &e.event {
            out.push_str(&format!("event:{name}{eol}"));
        }
        if let Some(retry) = e.retry {
            out.push_str(&format!("retry: {retry}{eol}"));
        }
        extra(&mut out);
        out.push_str(eol);
    }
    out.into_bytes()
}

/// `events` as the gateway writes them to its own clients (axum's SSE response).
fn render_axum(events: &[Sse]) -> Vec<u8> {
    let items: Vec<Result<Event, Infallible>> = events
        .iter()
        .map(|e| {
            let mut ev = Event::default();
            if let Some(name) = &e.event {
                ev = ev.event(name);
            }
            if let Some(data) = &e.data {
                ev = ev.data(data);
            }
            if let Some(id) = &e.id {
                ev = ev.id(id);
            }
            if let Some(retry) = e.retry {
                ev = ev.retry(std::time::Duration::from_millis(retry));
            }
            Ok(ev)
        })
        .collect();
    let resp = AxumSse::new(futures::stream::iter(items)).into_response();
    let body = futures::executor::block_on(resp.into_body().collect()).expect("an in-memory body");
    body.to_bytes().to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sse_reading_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = read(chunks(&bytes, &cuts));
    }

    #[test]
    fn sse_reading_of_line_soup_never_panics_nor_fails(
        lines in proptest::collection::vec(
            prop_oneof!["data:[^\r\n]{0,10}", "event: ?[a-z]{0,5}", "id:[ -~]{0,5}", "retry: ?[0-9a-z]{0,5}", ":.{0,5}", "[a-z]{0,5}:?", Just(String::new())],
            0..30,
        ),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let text: String = lines.iter().map(|l| format!("{l}{eol}")).collect();
        let read = read(chunks(text.as_bytes(), &cuts));
        prop_assert!(read.iter().all(Result::is_ok), "{read:?}");
    }

    #[test]
    fn unknown_fields_and_lines_without_a_colon_change_nothing(
        events in proptest::collection::vec(event(), 1..6),
        junk in proptest::collection::vec(junk(), 1..6),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let bytes = render_with(&events, eol, true, &junk);
        let want: Vec<Result<Sse, String>> = events.iter().cloned().map(Ok).collect();
        prop_assert_eq!(read(chunks(&bytes, &cuts)), want);
    }

    #[test]
    fn sse_events_round_trip_whatever_the_cuts(
        events in proptest::collection::vec(event(), 0..6),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        comments in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let bytes = render(&events, eol, comments);
        let want: Vec<Result<Sse, String>> = events.iter().cloned().map(Ok).collect();
        prop_assert_eq!(read(chunks(&bytes, &cuts)), want);
    }

    #[test]
    fn what_the_gateway_writes_its_reader_reads_back(
        events in proptest::collection::vec(event(), 0..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        // axum writes no `data` field for empty data (browsers would ignore the event), and an
        // event left with no field is no event; the gateway's messages are never empty.
        let events: Vec<Sse> = events
            .into_iter()
            .map(|e| Sse { data: e.data.filter(|d| !d.is_empty()), ..e })
            .filter(|e| e.event.is_some() || e.data.is_some() || e.id.is_some() || e.retry.is_some())
            .collect();
        let bytes = render_axum(&events);
        let want: Vec<Result<Sse, String>> = events.iter().cloned().map(Ok).collect();
        prop_assert_eq!(read(chunks(&bytes, &cuts)), want);
    }
}

/// An SSE event as a sloppy upstream writes it: a comment, unknown fields with and without a
/// value, an invalid `retry`, and the message pretty-printed over several `data` lines.
fn sloppy_event(message: &Value) -> String {
    let pretty = serde_json::to_string_pretty(message).expect("json");
    let data: String = pretty.lines().map(|l| format!("data: {l}\n")).collect();
    format!(": hello\nfoo: bar\nnocolon\nretry: soon\nevent: message\nx-vendor:1\n{data}id\n\n")
}

/// A Streamable HTTP upstream (`/mcp`) and a legacy SSE upstream (`/sse`, `/messages`) that
/// answer `initialize` and `tools/call` (an echo of `text`) in [`sloppy_event`]s.
async fn sloppy_upstream() -> String {
    use axum::response::IntoResponse;
    type Stream = Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>>;
    fn answer(body: &Value) -> Option<Value> {
        let result = match body["method"].as_str()? {
            "initialize" => json!({"protocolVersion": body["params"]["protocolVersion"], "capabilities": {"tools": {}},
                "serverInfo": {"name": "sloppy", "version": "1"}}),
            "tools/call" => {
                let text = body["params"]["arguments"]["text"].as_str().unwrap_or_default();
                json!({"content": [{"type": "text", "text": format!("echo: {text}")}]})
            }
            _ => json!({}),
        };
        body.get("id").map(|id| json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }
    async fn mcp(body: axum::Json<Value>) -> axum::response::Response {
        let Some(answer) = answer(&body) else { return http::StatusCode::ACCEPTED.into_response() };
        let headers = [
            (http::header::CONTENT_TYPE, "text/event-stream"),
            (http::HeaderName::from_static("mcp-session-id"), "s1"),
        ];
        (headers, sloppy_event(&answer)).into_response()
    }
    async fn sse(axum::extract::State(stream): axum::extract::State<Stream>) -> axum::response::Response {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send("foo: bar\nnocolon\nevent: endpoint\nx-vendor:\ndata: /messages\n\n".to_owned()).expect("open");
        *stream.lock().expect("lock") = Some(tx);
        let body = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|text| (Ok::<_, std::io::Error>(Bytes::from(text)), rx))
        });
        ([(http::header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(body)).into_response()
    }
    async fn messages(
        axum::extract::State(stream): axum::extract::State<Stream>,
        body: axum::Json<Value>,
    ) -> http::StatusCode {
        if let (Some(answer), Some(tx)) = (answer(&body), stream.lock().expect("lock").as_ref()) {
            let _ = tx.send(sloppy_event(&answer));
        }
        http::StatusCode::ACCEPTED
    }
    let app = axum::Router::new()
        .route("/mcp", axum::routing::post(mcp))
        .route("/sse", axum::routing::get(sse))
        .route("/messages", axum::routing::post(messages))
        .with_state(Stream::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// Unknown SSE fields and lines without a colon from an upstream are ignored, not taken for a
/// broken stream: through a gateway, a Streamable HTTP upstream's `initialize` (read by the
/// gateway), a call (relayed as it came), a 2025-03-26 batch (read by the gateway, messages
/// over several `data` lines), and a legacy SSE upstream's endpoint and answers all work.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_sse_fields_from_an_upstream_are_ignored() {
    let upstream = sloppy_upstream().await;
    let gw = TestGateway::start(&format!(
        "[[servers]]\nname = \"http\"\nurl = \"{upstream}/mcp\"\npublic = true\n\n\
         [[servers]]\nname = \"legacy\"\nurl = \"{upstream}/sse\"\ntransport = \"sse\"\npublic = true\n"
    ))
    .await;
    let c = reqwest::Client::new();
    let echo = |id: u64, text: &str| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}});
    let text_of = |answer: &Value| answer.pointer("/result/content/0/text").and_then(Value::as_str).map(str::to_owned);
    for server in ["http", "legacy"] {
        let url = gw.url(server);
        let session = raw_session(&c, &url).await;
        let r = post(&c, &url, &echo(2, server), Some(&session)).send().await.expect("sent");
        assert_eq!(r.status(), 200, "{server}");
        let body = r.bytes().await.expect("body");
        let answers: Vec<Value> = match serde_json::from_slice::<Value>(&body) {
            Ok(one) => vec![one],
            Err(_) => event_stream::parse(&body)
                .into_iter()
                .filter_map(|e| e.data.and_then(|d| serde_json::from_str(&d).ok()))
                .collect(),
        };
        let answer = answers.iter().find(|a| a["id"] == 2).unwrap_or_else(|| panic!("{server}: {answers:?}"));
        assert_eq!(text_of(answer).as_deref(), Some(format!("echo: {server}").as_str()), "{server}: {answer}");
    }
    // A 2025-03-26 batch: the gateway reads each member's answer itself.
    let url = gw.url("http");
    let session = open_batching_session(&c, &url, None).await;
    let batch = json!([echo(10, "a"), echo(11, "b")]);
    let r = post_batching(&c, &url, &session, &batch).send().await.expect("sent");
    let answers: Vec<Value> = r.json().await.expect("a batch answer");
    let texts: Vec<Option<String>> = answers.iter().map(text_of).collect();
    assert_eq!(texts, [Some("echo: a".to_owned()), Some("echo: b".to_owned())], "{answers:?}");
    gw.stop().await;
}
