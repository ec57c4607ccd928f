//! Turns an upstream [`Reply`] into the HTTP response the client gets.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;

use crate::protocol::jsonrpc::{code, error_response};
use crate::upstream::limit::ByteStream;
use crate::upstream::{MessageStream, Reply};

/// How long a multiplexed answer may take and still go back as plain JSON.
const JSON_WINDOW: Duration = Duration::from_millis(200);

/// How often an idle GET stream sends a comment to keep proxies from closing it.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Builds the response for a POST. `request_id` is set when the client sent a request: then a
/// multiplexed answer whose first message is the response goes back as plain JSON, and a
/// missing answer after `timeout` becomes a JSON-RPC error naming the server.
pub async fn post_response(reply: Reply, request_id: Option<Value>, timeout: Duration, server: &str) -> Response {
    match reply {
        Reply::Accepted => StatusCode::ACCEPTED.into_response(),
        Reply::Status(s) => s.into_response(),
        Reply::Json(bytes) => json_bytes(bytes.into()),
        Reply::JsonBody(resp) => {
            let length = resp.content_length();
            let mut out = json_bytes(Body::from_stream(resp.bytes_stream()));
            if let Some(n) = length {
                out.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
            out
        }
        // In-flight answers are drained on shutdown, not cut: they are bounded by the timeout.
        Reply::Sse(sse) => match request_id {
            Some(id) => relay_sse_within(sse.body, id, timeout, server.to_owned()),
            None => relay_sse(sse.body, None),
        },
        Reply::Messages(stream) => {
            let Some(id) = request_id else {
                return StatusCode::ACCEPTED.into_response();
            };
            let id_for_error = id.clone();
            let stream = with_deadline(stream, id, timeout, server.to_owned());
            let mut stream = Box::pin(stream);
            // A quick answer goes back as plain JSON; a slow one starts an SSE stream at once,
            // so the client sees headers (and can tell the call is alive) without waiting.
            let first = match tokio::time::timeout(JSON_WINDOW, stream.next()).await {
                Ok(None) => {
                    let text = format!("upstream server '{server}' ended the stream without answering");
                    let err = error_response(Some(&id_for_error), code::UPSTREAM_ERROR, &text);
                    return json_bytes(Body::from(err.to_string()));
                }
                Ok(Some(first)) => first,
                Err(_) => return sse_of(stream, None, true),
            };
            if first.get("result").is_some() || first.get("error").is_some() {
                return json_bytes(Body::from(serde_json::to_vec(&first).unwrap_or_default()));
            }
            sse_of(futures::stream::iter([first]).chain(stream), None, false)
        }
    }
}

/// Builds the response for a GET stream, which ends when `stop` completes.
pub fn get_response(reply: Reply, stop: BoxFuture<'static, ()>) -> Response {
    match reply {
        Reply::Sse(sse) => relay_sse(sse.body, Some(stop)),
        Reply::Messages(stream) => sse_of(stream, Some(stop), true),
        Reply::Status(s) => s.into_response(),
        Reply::Accepted | Reply::Json(_) | Reply::JsonBody(_) => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

fn json_bytes(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Relays an upstream SSE body byte for byte; a GET stream ends when `stop` completes.
fn relay_sse(body: ByteStream, stop: Option<BoxFuture<'static, ()>>) -> Response {
    let body = match stop {
        Some(stop) => Body::from_stream(body.take_until(stop)),
        None => Body::from_stream(body),
    };
    let mut out = Response::new(body);
    let h = out.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out
}

/// Relays the SSE answer to one request; if the upstream breaks off the stream or the answer
/// does not complete within `timeout`, the stream ends with a JSON-RPC error naming the server.
/// (An upstream that closes the stream on purpose, expecting the client to resume with GET,
/// ends it normally.)
fn relay_sse_within(body: ByteStream, id: Value, timeout: Duration, server: String) -> Response {
    let deadline = Box::pin(tokio::time::sleep(timeout));
    let stream = futures::stream::unfold((Box::pin(body), deadline, false), move |(mut body, mut deadline, done)| {
        let (id, server) = (id.clone(), server.clone());
        async move {
            if done {
                return None;
            }
            let text = tokio::select! {
                chunk = body.next() => match chunk {
                    Some(Ok(bytes)) => return Some((Ok::<_, std::io::Error>(bytes), (body, deadline, false))),
                    None => return None,
                    Some(Err(e @ crate::upstream::UpstreamError::TooLarge { .. })) => (code::UPSTREAM_ERROR, e.to_string()),
                    Some(Err(_)) => (code::UPSTREAM_ERROR, format!("upstream server '{server}' broke off its answer")),
                },
                _ = &mut deadline => (
                    code::UPSTREAM_TIMEOUT,
                    format!("upstream server '{server}' did not answer within {}", crate::upstream::human(timeout)),
                ),
            };
            let err = error_response(Some(&id), text.0, &text.1);
            // The blank line first ends any event the upstream left half-written.
            let event = format!("\n\nevent: message\ndata: {err}\n\n");
            Some((Ok(bytes::Bytes::from(event)), (body, deadline, true)))
        }
    });
    let mut out = Response::new(Body::from_stream(stream));
    let h = out.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out
}

fn sse_of(
    stream: impl Stream<Item = Value> + Send + 'static,
    stop: Option<BoxFuture<'static, ()>>,
    keep_alive: bool,
) -> Response {
    let until = async move {
        match stop {
            Some(stop) => stop.await,
            None => std::future::pending().await,
        }
    };
    let events = stream
        .take_until(until)
        .map(|msg| Ok::<_, Infallible>(Event::default().data(serde_json::to_string(&msg).unwrap_or_default())));
    let sse = Sse::new(events);
    if keep_alive { sse.keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response() } else { sse.into_response() }
}

/// Ends a multiplexed answer with a timeout error if its response does not come in time.
fn with_deadline(
    stream: MessageStream,
    id: Value,
    timeout: Duration,
    server: String,
) -> impl Stream<Item = Value> + Send {
    let deadline = tokio::time::sleep(timeout);
    futures::stream::unfold(
        (stream, Box::pin(deadline), Some(id), false),
        move |(mut stream, mut deadline, id, done)| {
            let server = server.clone();
            async move {
                if done {
                    return None;
                }
                tokio::select! {
                    msg = stream.next() => msg.map(|m| (m, (stream, deadline, id, false))),
                    _ = &mut deadline => {
                        let text = format!("upstream server '{server}' did not answer within {}", crate::upstream::human(timeout));
                        let err = error_response(id.as_ref(), code::UPSTREAM_TIMEOUT, &text);
                        Some((err, (stream, deadline, None, true)))
                    }
                }
            }
        },
    )
}
