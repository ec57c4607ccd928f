//! The accept loop and each connection: HTTP/1.1 and HTTP/2 (hyper-util's `auto` builder),
//! with the limits that belong to connections rather than requests:
//!
//! - at most `limits.max_connections` open at once; one more is closed as it is accepted;
//! - `limits.header_read_timeout`: a request's headers must arrive within it, counted from
//!   the connection's opening for its first request and from the first byte of each later
//!   one;
//! - `limits.idle_timeout`: a connection with no request in progress and no byte sent either
//!   way for that long is closed. On HTTP/2 the bytes of control frames (PING, SETTINGS,
//!   WINDOW_UPDATE) do not count: once its first request has come, an HTTP/2 connection is
//!   idle from the end of its last request, whatever the client sends meanwhile, and is closed
//!   with GOAWAY once that has lasted `idle_timeout`. (A request's HEADERS frame arrives whole
//!   and starts the request, so a slow client of an HTTP/2 connection is only ever timed by
//!   the idle timeout: a client that is in the middle of a request, however slowly it sends or
//!   reads it, is never cut.)
//!
//! Both timeouts are kept by one watcher per connection rather than by hyper's own
//! `header_read_timeout`, which also runs while a kept-alive connection waits for its next
//! request (so it cannot tell a slow client from an idle one), and which does not cover the
//! first bytes the `auto` builder reads to tell HTTP/1.1 from HTTP/2. A connection closed by
//! the watcher has no request in progress.
//!
//! The watcher costs a request nothing beyond two clock reads (its headers' first byte, the
//! end of its answer) and a few atomic operations: nothing wakes it. It wakes on its own, at
//! the deadline it knows of or after the shorter of the two timeouts at the latest, and looks
//! at what happened meanwhile. A deadline is always at least that long after the event that
//! set it, so an event after one look is seen at the next look, before its deadline: the
//! timeouts are kept to the millisecond, with one timer per connection and, while requests
//! keep coming, one wake-up per period.
//!
//! HTTP/2 comes as h2c with prior knowledge (or over TLS in front of the gateway); a
//! request's `:authority` is its `Host`.
//!
//! On shutdown the loop stops accepting, asks every connection to finish gracefully (HTTP/1.1:
//! after its current response; HTTP/2: GOAWAY) and returns once all have closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::limits::Limits;

/// What the listener enforces on each connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Open connections at most.
    pub max_connections: usize,
    /// Longest wait for a request's headers.
    pub header_read_timeout: Duration,
    /// Longest idle time.
    pub idle_timeout: Duration,
}

impl From<&Limits> for Settings {
    fn from(l: &Limits) -> Settings {
        Settings {
            max_connections: l.max_connections,
            header_read_timeout: l.header_read_timeout,
            idle_timeout: l.idle_timeout,
        }
    }
}

/// Serves `listener` until `shutdown` is cancelled and every connection has closed. `service`
/// makes the service of one connection from its peer's address (see `layers::stack`).
pub async fn serve<M, S, B>(listener: TcpListener, settings: Settings, service: M, shutdown: CancellationToken)
where
    M: Fn(SocketAddr) -> S,
    S: tower::Service<Request, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    let open = Arc::new(AtomicUsize::new(0));
    let gauge = metrics::gauge!("portcullis_connections_open");
    // Connection tasks are aborted if this future is dropped (a shutdown past its grace).
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= settings.max_connections {
            metrics::counter!("portcullis_connections_closed_total", "reason" => "limit").increment(1);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let slot = Slot::new(&open, &gauge);
        connections.spawn(connection(stream, settings, service(peer), shutdown.clone(), slot));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// One open connection, counted until dropped.
struct Slot {
    open: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
}

impl Slot {
    fn new(open: &Arc<AtomicUsize>, gauge: &metrics::Gauge) -> Slot {
        open.fetch_add(1, Ordering::Relaxed);
        gauge.increment(1.0);
        Slot { open: open.clone(), gauge: gauge.clone() }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
    }
}

async fn connection<S, B>(stream: TcpStream, settings: Settings, service: S, shutdown: CancellationToken, _slot: Slot)
where
    S: tower::Service<Request, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    let service = Tracked { inner: service, activity: activity.clone() };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    // The watcher and the shutdown signal wake rarely; the connection's task wakes several
    // times per request. They are polled only when they woke it themselves.
    let ending = OnWake::new(async {
        tokio::select! {
            reason = activity.expired(settings) => Some(reason),
            () = shutdown.cancelled() => None,
        }
    });
    tokio::pin!(ending);
    let closed = tokio::select! {
        biased;
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        ending = ending => match ending {
            Some(reason) => {
                if activity.h2.load(Ordering::Acquire) {
                    // No stream is open: GOAWAY tells the client that nothing it sent was taken.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(settings.header_read_timeout, conn.as_mut()).await;
                }
                reason
            }
            None => {
                conn.as_mut().graceful_shutdown();
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
        },
    };
    metrics::counter!("portcullis_connections_closed_total", "reason" => closed).increment(1);
}

pin_project_lite::pin_project! {
    /// A future polled only on its first poll and after it woke its task itself, not each
    /// time something else in the same task did.
    struct OnWake<F> {
        #[pin]
        inner: F,
        flag: Arc<WakeFlag>,
        waker: Waker,
    }
}

/// Whether an [`OnWake`] future woke its task, and the task to wake.
struct WakeFlag {
    woken: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> OnWake<F> {
    fn new(inner: F) -> OnWake<F> {
        let flag = Arc::new(WakeFlag { woken: AtomicBool::new(true), task: futures::task::AtomicWaker::new() });
        OnWake { inner, waker: Waker::from(flag.clone()), flag }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read, so a wake in between is not lost.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

/// What a connection is doing, shared by its socket, its service and its watcher. Times are
/// milliseconds since `start`, plus one (zero means "none").
struct Activity {
    start: Instant,
    /// Requests in progress (until their response body ends).
    in_flight: AtomicUsize,
    /// When the headers now awaited began: the connection's opening, or the first byte read
    /// while no request was in progress.
    head_since: AtomicU64,
    /// The last byte read or written while no request was in progress, or the end of the last
    /// request (while one is in progress, the connection is not idle whatever its bytes do; on
    /// HTTP/2, only the end of the last request).
    last_io: AtomicU64,
    /// The connection speaks HTTP/2 (known from its first request).
    h2: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            head_since: AtomicU64::new(1),
            last_io: AtomicU64::new(1),
            h2: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms.saturating_sub(1))
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    fn read(&self) {
        // On HTTP/2, frames between requests are no request's headers, and do not keep it
        // busy. On HTTP/1.1 only the first byte of a request's headers is timed; the clock is
        // not read for the others.
        if self.h2.load(Ordering::Relaxed) {
            return;
        }
        if self.idle() && self.head_since.load(Ordering::Acquire) == 0 {
            let now = self.now();
            self.last_io.store(now, Ordering::Relaxed);
            let _ = self.head_since.compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        if self.idle() && !self.h2.load(Ordering::Relaxed) {
            self.last_io.store(self.now(), Ordering::Relaxed);
        }
    }

    fn request_started(&self, version: http::Version) {
        if version == http::Version::HTTP_2 {
            self.h2.store(true, Ordering::Release);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
    }

    fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.last_io.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Completes when the connection has broken a timeout, with the reason.
    ///
    /// It looks at the connection at the deadline it knows of, and at least every `period`
    /// (the shorter timeout). Every deadline lies at least `period` after the event that set
    /// it (a first byte, an answer's end), so an event after one look is seen at the next,
    /// before its deadline passes; nothing needs to wake the watcher early.
    async fn expired(&self, settings: Settings) -> &'static str {
        let period = settings.header_read_timeout.min(settings.idle_timeout).max(Duration::from_millis(10));
        let timer = tokio::time::sleep(period);
        tokio::pin!(timer);
        loop {
            let now = Instant::now();
            let due = match self.head_since.load(Ordering::Acquire) {
                _ if !self.idle() => None,
                0 => Some((self.at(self.last_io.load(Ordering::Relaxed)) + settings.idle_timeout, "idle_timeout")),
                since => Some((self.at(since) + settings.header_read_timeout, "header_timeout")),
            };
            let next = match due {
                Some((deadline, reason)) if deadline <= now => return reason,
                Some((deadline, _)) => deadline.min(now + period),
                None => now + period,
            };
            timer.as_mut().reset(next);
            timer.as_mut().await;
        }
    }
}

/// The socket, noting each byte's time in the connection's [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connection's service: a request is in progress from its call until its response body
/// ends or is dropped.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for Tracked<S>
where
    S: tower::Service<Request, Response = http::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Ended<B>>;
    type Error = Infallible;
    type Future = Answer<S::Future, B>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        self.activity.request_started(request.version());
        authority_as_host(&mut request);
        let ended = Ended { inner: None, activity: Some(self.activity.clone()) };
        // The layers' services are always ready (they refuse rather than wait).
        let answer = tower::Service::call(&mut self.inner.clone(), request.map(Body::new));
        Answer { answer, ended: Some(ended) }
    }
}

pin_project_lite::pin_project! {
    /// The answer to one request, its body made to tell the connection when it ends.
    struct Answer<F, B> {
        #[pin]
        answer: F,
        ended: Option<Ended<B>>,
    }
}

impl<F, B> Future for Answer<F, B>
where
    F: Future<Output = Result<http::Response<B>, Infallible>>,
{
    type Output = Result<http::Response<Ended<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Poll::Ready(Ok(resp)) = this.answer.poll(cx) else { return Poll::Pending };
        let mut ended = this.ended.take().unwrap_or(Ended { inner: None, activity: None });
        Poll::Ready(Ok(resp.map(|body| {
            ended.inner = Some(body);
            ended
        })))
    }
}

/// An HTTP/2 request names its host in `:authority`, which stands for `Host` (RFC 9113
/// §8.3.1) and which HTTP/2 clients send instead of it: it becomes the `Host` header, so that
/// the one `Host` check (DNS rebinding) sees what the client, a browser included, asked for.
fn authority_as_host<B>(request: &mut http::Request<B>) {
    if request.version() != http::Version::HTTP_2 {
        return;
    }
    let Some(host) = request.uri().authority().and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()) else {
        return;
    };
    request.headers_mut().insert(http::header::HOST, host);
}

/// A response body that tells the connection's [`Activity`] when it ends (or, if the answer
/// never came, when the request is dropped).
struct Ended<B> {
    inner: Option<B>,
    activity: Option<Arc<Activity>>,
}

impl<B> Ended<B> {
    fn end(&mut self) {
        if let Some(a) = self.activity.take() {
            a.request_ended();
        }
    }
}

impl<B> Drop for Ended<B> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<B> http_body::Body for Ended<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map(http_body::Body::size_hint).unwrap_or_default()
    }
}
