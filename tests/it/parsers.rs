//! Property tests of the SSE reading the gateway does (`sse_stream::SseStream`, which reads
//! Streamable HTTP answers and legacy SSE streams in `upstream::http` and `upstream::sse`):
//! any bytes, cut anywhere, never panic; valid events, written as an upstream or the gateway
//! itself (axum's `Event`) writes them and cut at any points, are read back equal. The
//! `WWW-Authenticate` parser's properties are beside it, in `src/vault/challenge.rs`.

use std::convert::Infallible;

use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse as AxumSse};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use proptest::prelude::*;
use sse_stream::{Sse, SseStream};

/// `bytes` cut at `cuts` (positions, any order, repeats allowed), as a body stream yields them.
fn chunks(bytes: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]])).collect()
}

/// Everything the gateway's reader makes of `chunks`: events, or where it stopped with an error.
fn read(chunks: Vec<Bytes>) -> Vec<Result<Sse, String>> {
    let stream = futures::stream::iter(chunks.into_iter().map(Ok::<Bytes, std::io::Error>));
    let events = SseStream::from_bytes_stream(stream);
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
    let mut out = String::new();
    for e in events {
        if comments {
            out.push_str(&format!(": keep-alive{eol}"));
        }
        if let Some(id) = &e.id {
            out.push_str(&format!("id: {id}{eol}"));
        }
        if let Some(data) = &e.data {
            for line in data.split('\n') {
                out.push_str(&format!("data: {line}{eol}"));
            }
        }
        if let Some(name) = &e.event {
            out.push_str(&format!("event:{name}{eol}"));
        }
        if let Some(retry) = e.retry {
            out.push_str(&format!("retry: {retry}{eol}"));
        }
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
    fn sse_reading_of_line_soup_never_panics(
        lines in proptest::collection::vec(
            prop_oneof!["data:[^\r\n]{0,10}", "event: ?[a-z]{0,5}", "id:[ -~]{0,5}", "retry: ?[0-9a-z]{0,5}", ":.{0,5}", "[a-z]{0,5}:?", Just(String::new())],
            0..30,
        ),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let text: String = lines.iter().map(|l| format!("{l}{eol}")).collect();
        let _ = read(chunks(text.as_bytes(), &cuts));
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
