//! The reading of `text/event-stream` bodies from upstreams (Streamable HTTP answers and GET
//! streams, legacy SSE streams), as the HTML standard's "event stream interpretation" has it:
//!
//! - lines end at `\r\n`, `\n` or `\r`; a byte order mark at the very start is skipped, and
//!   text that is not UTF-8 is read with U+FFFD in its place;
//! - a line starting with `:` is a comment; `name: value` is a field (one space after the
//!   colon is dropped), and a line without a colon is a field named by the whole line with an
//!   empty value;
//! - `data` lines are joined with `\n`; `event` and `id` keep their last value (an `id` holding
//!   U+0000 is ignored); `retry` is taken only when it is all ASCII digits;
//! - any other field name is ignored, as is an invalid `retry`: nothing an upstream writes
//!   makes the reading fail, only the body itself can (a broken connection, or the size limit);
//! - an empty line ends an event; an event cut off by the end of the body is dropped.
//!
//! One departure, for the callers' sake: an event with an `id` or `retry` but no `data` is
//! passed on too (a browser would only remember the two), so that a resuming reader learns
//! the last event id; readers skip events without data.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;

/// One event read from a stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event` field (the type); `None` when absent or empty, which means `message`.
    pub event: Option<String>,
    /// The `data` lines joined with `\n`; `None` when the event had no `data` line.
    pub data: Option<String>,
    /// The last valid `id` field.
    pub id: Option<String>,
    /// The last valid `retry` field, in milliseconds.
    pub retry: Option<u64>,
}

impl Event {
    fn is_empty(&self) -> bool {
        self.event.is_none() && self.data.is_none() && self.id.is_none() && self.retry.is_none()
    }
}

/// The line-by-line state of a reading.
#[derive(Debug, Default)]
pub struct Parser {
    /// The event being read.
    current: Event,
    /// The start of a line that the previous chunk cut.
    partial: Vec<u8>,
    /// The last chunk ended with `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    /// Past the start of the stream (where a byte order mark may be).
    started: bool,
}

impl Parser {
    /// A reading at the start of a stream.
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Reads `chunk`, adding each event it completes to `out`.
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<Event>) {
        if std::mem::take(&mut self.after_cr) && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        while !chunk.is_empty() {
            let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) else {
                self.partial.extend_from_slice(chunk);
                return;
            };
            if self.partial.is_empty() {
                self.line(&chunk[..end], out);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&chunk[..end]);
                self.line(&line, out);
                line.clear();
                // Keep the allocation for the next cut line.
                self.partial = line;
            }
            let was_cr = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if was_cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
        }
    }

    /// Reads one complete line (without its line end).
    fn line(&mut self, mut line: &[u8], out: &mut Vec<Event>) {
        if !std::mem::replace(&mut self.started, true) {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            let event = std::mem::take(&mut self.current);
            if !event.is_empty() {
                out.push(event);
            }
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(0) => return,
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                let value = String::from_utf8_lossy(value);
                match &mut self.current.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => self.current.data = Some(value.into_owned()),
                }
            }
            b"event" => {
                self.current.event = (!value.is_empty()).then(|| String::from_utf8_lossy(value).into_owned());
            }
            b"id" if !value.contains(&0) => self.current.id = Some(String::from_utf8_lossy(value).into_owned()),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                if let Some(ms) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    self.current.retry = Some(ms);
                }
            }
            // Unknown fields, an `id` with U+0000, a `retry` that is not a number: ignored.
            _ => {}
        }
    }
}

/// Every complete event in `body`, read as one whole stream.
pub fn parse(body: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    Parser::new().feed(body, &mut out);
    out
}

pin_project_lite::pin_project! {
    /// The events of a body arriving as a stream of chunks. The body's first error is passed on
    /// and ends the reading.
    pub struct Events<S> {
        #[pin]
        body: S,
        parser: Parser,
        ready: std::collections::VecDeque<Event>,
        scratch: Vec<Event>,
        ended: bool,
    }
}

impl<S> Events<S> {
    /// The events of `body`.
    pub fn new(body: S) -> Events<S> {
        Events {
            body,
            parser: Parser::new(),
            ready: std::collections::VecDeque::new(),
            scratch: Vec::new(),
            ended: false,
        }
    }
}

impl<S, E> Stream for Events<S>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    type Item = Result<Event, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if *this.ended {
                return Poll::Ready(None);
            }
            match this.body.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.parser.feed(&chunk, this.scratch);
                    this.ready.extend(this.scratch.drain(..));
                }
                Poll::Ready(Some(Err(e))) => {
                    *this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => *this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: Option<&str>, id: Option<&str>, retry: Option<u64>) -> Event {
        Event { event: event.map(str::to_owned), data: data.map(str::to_owned), id: id.map(str::to_owned), retry }
    }

    #[test]
    fn unknown_fields_and_lines_without_a_colon_are_ignored() {
        let body = "foo: bar\nevent: message\nx-custom:1\ndata: {\"a\":1}\nnocolon\n\n";
        assert_eq!(parse(body.as_bytes()), [ev(Some("message"), Some("{\"a\":1}"), None, None)]);
        // A line that is only a field's name is that field with an empty value.
        assert_eq!(parse(b"data\ndata\n\n"), [ev(None, Some("\n"), None, None)]);
        assert_eq!(parse(b"data: x\nevent\n\n"), [ev(None, Some("x"), None, None)]);
    }

    #[test]
    fn repeated_fields_keep_their_last_value_and_invalid_ones_are_ignored() {
        let body = "event: a\nevent: b\nid: 1\nid: 2\nretry: 10\nretry: 20\ndata: x\n\n";
        assert_eq!(parse(body.as_bytes()), [ev(Some("b"), Some("x"), Some("2"), Some(20))]);
        let body = "id: 7\nid: bad\0id\nretry: 1s\nretry: -5\nretry\nretry: 99999999999999999999999\ndata: y\n\n";
        assert_eq!(parse(body.as_bytes()), [ev(None, Some("y"), Some("7"), None)]);
    }

    #[test]
    fn a_byte_order_mark_comments_and_text_that_is_not_utf8() {
        assert_eq!(parse(b"\xEF\xBB\xBFdata: a\n\n"), [ev(None, Some("a"), None, None)]);
        assert_eq!(parse(b": hi\n:\n\n"), []);
        assert_eq!(parse(b"data: \xFF\n\n"), [ev(None, Some("\u{FFFD}"), None, None)]);
        // A cut event at the end of the body is no event.
        assert_eq!(parse(b"data: a\n\ndata: b\n"), [ev(None, Some("a"), None, None)]);
    }

    #[test]
    fn a_crlf_cut_between_chunks_is_one_line_end() {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for piece in [&b"data: a\r"[..], b"\n\r", b"\ndata: b\r", b"\r"] {
            p.feed(piece, &mut out);
        }
        assert_eq!(out, [ev(None, Some("a"), None, None), ev(None, Some("b"), None, None)]);
    }
}
