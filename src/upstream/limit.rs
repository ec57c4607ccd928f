//! The size limit on what an upstream sends (`max_response_bytes`): a JSON body, one SSE event
//! or one stdio line larger than the limit is refused while it is read, so the excess is never
//! buffered; the caller gets a JSON-RPC error naming the server.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

use super::UpstreamError;

/// An upstream body as it arrives, cut off with [`UpstreamError::TooLarge`] once an event (SSE)
/// or the whole body grows past the limit.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// The refusal of an answer over `limit` bytes, counted per server.
pub fn too_large(server: &str, limit: usize) -> UpstreamError {
    metrics::counter!("portcullis_upstream_too_large_total", "server" => server.to_owned()).increment(1);
    tracing::warn!(server, limit, "an upstream answer exceeded max_response_bytes and was refused");
    UpstreamError::TooLarge { server: server.to_owned(), limit }
}

fn read_error(server: &str, e: &reqwest::Error) -> UpstreamError {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    UpstreamError::Unreachable { server: server.to_owned(), cause: cause.to_string() }
}

/// Reads a whole (non-SSE) body of at most `limit` bytes: one whose `Content-Length` is larger
/// is refused before any of it is read, one of unknown length as soon as it grows past it.
pub async fn read_body(resp: reqwest::Response, server: &str, limit: usize) -> Result<Bytes, UpstreamError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large(server, limit));
    }
    let capacity = resp.content_length().map_or(0, |n| usize::try_from(n).unwrap_or(0));
    let mut body = resp.bytes_stream();
    // The first piece is kept as it came: most answers arrive in one, which then costs no
    // copy. Pieces are joined only when a second one comes.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut len = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| read_error(server, &e))?;
        len += chunk.len();
        if len > limit {
            return Err(too_large(server, limit));
        }
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            None => buf.extend_from_slice(&chunk),
            Some(piece) => {
                buf.reserve(capacity.max(len));
                buf.extend_from_slice(&piece);
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Reads at most `max` bytes of a body (for error excerpts); the rest is never read.
pub async fn read_prefix(resp: reqwest::Response, max: usize) -> Bytes {
    let mut buf = BytesMut::new();
    let mut body = resp.bytes_stream();
    while let Some(Ok(chunk)) = body.next().await {
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= max {
            break;
        }
    }
    buf.freeze()
}

/// An SSE body whose events may each be at most `limit` bytes long (line ends excluded). Each
/// event is passed on once it is complete, so a refused one never reaches the client in part;
/// it is held as the chunks it arrived in, so refusing it frees small allocations only (a
/// large one freed would teach the C allocator to keep such buffers for good).
pub fn sse_body(resp: reqwest::Response, server: Arc<str>, limit: usize) -> ByteStream {
    Box::pin(EventLimit::new(resp.bytes_stream().boxed(), server, limit))
}

/// Parsed SSE events of a limited body (see [`super::event_stream`]).
pub type Events = Pin<Box<dyn Stream<Item = Result<super::event_stream::Event, UpstreamError>> + Send>>;

/// The events of `body`.
pub fn events(body: ByteStream) -> Events {
    Box::pin(super::event_stream::Events::new(body))
}

type Reqwest = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Counts the bytes of the current SSE event (an event ends at an empty line: `\n`, `\r\n`
/// or `\r` twice), holds them until it ends, and fails once one grows past the limit.
struct EventLimit {
    inner: Reqwest,
    server: Arc<str>,
    limit: usize,
    event_bytes: usize,
    line_start: bool,
    prev_cr: bool,
    /// Whether the current line is a comment (`:`), and every line of the event so far was.
    comment: bool,
    only_comments: bool,
    /// The chunks of the event not yet complete.
    held: Vec<Bytes>,
    /// Complete events' chunks, to pass on.
    ready: std::collections::VecDeque<Bytes>,
    failed: bool,
}

impl EventLimit {
    /// Passes `inner`'s events on while each stays within `limit` bytes.
    fn new(inner: Reqwest, server: Arc<str>, limit: usize) -> EventLimit {
        EventLimit {
            inner,
            server,
            limit,
            event_bytes: 0,
            line_start: true,
            prev_cr: false,
            comment: false,
            only_comments: true,
            held: Vec::new(),
            ready: std::collections::VecDeque::new(),
            failed: false,
        }
    }
}

impl EventLimit {
    /// Takes in `chunk`: what completes events moves to `ready`, the rest is held. `false`
    /// when the current event has grown past the limit.
    fn hold(&mut self, chunk: Bytes) -> bool {
        let mut end = None;
        let bytes = &chunk[..];
        let mut i = 0;
        while i < bytes.len() {
            let next = memchr::memchr2(b'\n', b'\r', &bytes[i..]).map_or(bytes.len(), |k| i + k);
            if next > i {
                // The content of a line.
                if self.line_start {
                    self.comment = bytes[i] == b':';
                    self.only_comments &= self.comment;
                }
                self.line_start = false;
                self.prev_cr = false;
                self.event_bytes += next - i;
                if self.event_bytes > self.limit {
                    self.held = Vec::new();
                    return false;
                }
            }
            let Some(&b) = bytes.get(next) else { break };
            if b == b'\n' && self.prev_cr {
                if end == Some(next) {
                    // The `\n` of a `\r\n` that ended the event belongs to it.
                    end = Some(next + 1);
                }
            } else {
                if self.line_start || (self.comment && self.only_comments) {
                    // The end of an event, or a comment line before any field of one
                    // (a keep-alive): everything so far can go.
                    self.event_bytes = 0;
                    self.only_comments = true;
                    end = Some(next + 1);
                }
                self.line_start = true;
            }
            self.prev_cr = b == b'\r';
            i = next + 1;
        }
        match end {
            Some(n) => {
                self.ready.extend(self.held.drain(..));
                let mut chunk = chunk;
                let rest = chunk.split_off(n);
                self.ready.push_back(chunk);
                if !rest.is_empty() {
                    self.held.push(rest);
                }
            }
            None if !chunk.is_empty() => self.held.push(chunk),
            None => {}
        }
        true
    }

    #[cfg(test)]
    fn within(&mut self, chunk: &[u8]) -> bool {
        self.hold(Bytes::copy_from_slice(chunk))
    }
}

impl Stream for EventLimit {
    type Item = Result<Bytes, UpstreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(chunk) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            if self.failed {
                return Poll::Ready(None);
            }
            match self.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    if !self.hold(chunk) {
                        self.failed = true;
                        self.ready.clear();
                        return Poll::Ready(Some(Err(too_large(&self.server, self.limit))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.failed = true;
                    return Poll::Ready(Some(Err(read_error(&self.server, &e))));
                }
                Poll::Ready(None) => {
                    // An event cut off by the end of the body is passed on as it is.
                    self.failed = true;
                    let held: Vec<Bytes> = self.held.drain(..).collect();
                    self.ready.extend(held);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Reads newline-delimited messages of at most `limit` bytes each from `reader`. A longer line
/// is skipped up to its newline without being kept, and reported as [`Line::TooLong`]. A line
/// is gathered in pieces of at most [`PIECE`] bytes and joined once complete, so a refused one
/// frees small allocations only.
pub struct Lines<R> {
    reader: R,
    limit: usize,
    pieces: Vec<Vec<u8>>,
    len: usize,
    skipping: bool,
}

/// The size of the pieces a line is gathered in.
const PIECE: usize = 64 * 1024;

/// One line read by [`Lines`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line (without its line end).
    Text(Vec<u8>),
    /// A line longer than the limit was skipped.
    TooLong,
}

impl<R: tokio::io::AsyncBufRead + Unpin> Lines<R> {
    /// Lines of at most `limit` bytes from `reader`.
    pub fn new(reader: R, limit: usize) -> Lines<R> {
        Lines { reader, limit, pieces: Vec::new(), len: 0, skipping: false }
    }

    fn append(pieces: &mut Vec<Vec<u8>>, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if pieces.last().is_none_or(|p| p.len() >= PIECE) {
                pieces.push(Vec::with_capacity(PIECE.min(bytes.len().max(256))));
            }
            let Some(piece) = pieces.last_mut() else { return };
            let n = (PIECE - piece.len()).min(bytes.len());
            piece.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
    }

    fn line(&mut self) -> Vec<u8> {
        self.len = 0;
        let mut pieces = std::mem::take(&mut self.pieces);
        if pieces.len() == 1 {
            return pieces.pop().unwrap_or_default();
        }
        pieces.concat()
    }

    /// The next line; `None` at the end of the input (or on a read error).
    pub async fn next_line(&mut self) -> Option<Line> {
        use tokio::io::AsyncBufReadExt;
        loop {
            let buf = match self.reader.fill_buf().await {
                Ok([]) | Err(_) => {
                    // A last line without a newline still counts.
                    if self.skipping {
                        self.skipping = false;
                        return Some(Line::TooLong);
                    }
                    return (self.len > 0).then(|| Line::Text(self.line()));
                }
                Ok(buf) => buf,
            };
            let (taken, end) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            if !self.skipping {
                if self.len + taken > self.limit {
                    self.skipping = true;
                    self.pieces = Vec::new();
                    self.len = 0;
                } else {
                    self.len += taken;
                    Self::append(&mut self.pieces, &buf[..taken]);
                }
            }
            self.reader.consume(if end { taken + 1 } else { taken });
            if end {
                if std::mem::take(&mut self.skipping) {
                    return Some(Line::TooLong);
                }
                return Some(Line::Text(self.line()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(n: usize) -> EventLimit {
        EventLimit::new(futures::stream::empty().boxed(), Arc::from("s"), n)
    }

    #[test]
    fn events_are_counted_from_one_blank_line_to_the_next_whatever_the_line_ends() {
        for sep in ["\n", "\r\n", "\r"] {
            let mut l = limit(12);
            let event = format!("data: 123456{sep}{sep}");
            for _ in 0..100 {
                assert!(l.within(event.as_bytes()), "{sep:?}: each event is within the limit");
            }
            let long = format!("data: 1234{sep}data: 5678{sep}{sep}");
            assert!(!l.within(long.as_bytes()), "{sep:?}: two lines of one event add up");
        }
        // Split anywhere, even between \r and \n; events are passed on whole, as they end.
        let mut l = limit(7);
        let mut passed = Vec::new();
        for piece in ["data", ": 1\r", "\n\r", "\ndata: 2\r\n", "\r\n: x"] {
            assert!(l.within(piece.as_bytes()));
            passed.extend(l.ready.drain(..).flat_map(|b| b.to_vec()));
        }
        assert_eq!(String::from_utf8_lossy(&passed), "data: 1\r\n\r\ndata: 2\r\n\r\n");
        assert_eq!(l.held, [Bytes::from_static(b": x")]);
        // A keep-alive comment goes at once; a comment inside an event waits for the event.
        assert!(l.within(b"\n"));
        assert_eq!(l.ready.drain(..).flat_map(|b| b.to_vec()).collect::<Vec<_>>(), b": x\n");
        let mut l = limit(100);
        assert!(l.within(b"data: 3\n: y\n"));
        assert!(l.ready.is_empty());
        assert!(l.within(b"\n"));
        assert_eq!(l.ready.drain(..).flat_map(|b| b.to_vec()).collect::<Vec<_>>(), b"data: 3\n: y\n\n");
    }

    #[tokio::test]
    async fn an_over_long_line_is_skipped_and_reported_and_reading_goes_on() {
        let input = format!("short\n{}\nafter\n{}", "x".repeat(100), "y".repeat(50));
        let mut lines = Lines::new(tokio::io::BufReader::with_capacity(8, input.as_bytes()), 10);
        assert_eq!(lines.next_line().await, Some(Line::Text(b"short".to_vec())));
        assert_eq!(lines.next_line().await, Some(Line::TooLong));
        assert_eq!(lines.next_line().await, Some(Line::Text(b"after".to_vec())));
        assert_eq!(lines.next_line().await, Some(Line::TooLong));
        assert_eq!(lines.next_line().await, None);
    }

    proptest::proptest! {
        /// However the body is cut into chunks, the same bytes are passed on, whole events
        /// only until the end, and an event over the limit is refused.
        #[test]
        fn chunking_changes_nothing(
            events in proptest::collection::vec(("[a-z: ]{0,40}", 0usize..3), 0..8),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let sep = ["\n", "\r\n", "\r"];
            let body: String = events.iter().map(|(text, s)| format!("data: {text}{}{}", sep[*s], sep[*s])).collect();
            let longest = events.iter().map(|(text, _)| 6 + text.len()).max().unwrap_or(0);
            let run = |pieces: Vec<&[u8]>| {
                let mut l = limit(30);
                let mut passed = Vec::new();
                for p in pieces {
                    if !l.within(p) {
                        return None;
                    }
                    passed.extend(l.ready.drain(..).flat_map(|b| b.to_vec()));
                }
                Some(passed)
            };
            let whole = run(vec![body.as_bytes()]);
            let mut at: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            at.sort_unstable();
            let mut pieces = Vec::new();
            let mut from = 0;
            for c in at {
                pieces.push(&body.as_bytes()[from..c]);
                from = c;
            }
            pieces.push(&body.as_bytes()[from..]);
            let cut = run(pieces);
            proptest::prop_assert_eq!(whole.is_none(), longest > 30);
            if let (Some(whole), Some(cut)) = (&whole, &cut) {
                // A `\r\n` split between chunks may leave its `\n` for later; nothing else.
                let strip = |v: &Vec<u8>| v.iter().copied().filter(|b| *b != b'\n').collect::<Vec<u8>>();
                proptest::prop_assert_eq!(strip(whole), strip(cut));
                proptest::prop_assert_eq!(strip(whole), strip(&body.as_bytes().to_vec()));
            } else {
                proptest::prop_assert_eq!(whole.is_none(), cut.is_none());
            }
        }
    }
}
