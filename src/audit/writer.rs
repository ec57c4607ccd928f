//! The audit writer: the request path hands a [`Record`] over in a `try_send` and moves on; one
//! background task per process batches records into transactions and computes the chain.
//!
//! Sustained overload (see `docs/decisions/0011-audit-under-sustained-overload.md`): when the
//! bounded channel is full while the store is committing (the writer is behind, not failing),
//! an `async` call ([`AuditWriter::write`]) waits up to [`MAX_WAIT`] for room, so a client
//! faster than the store is slowed instead of the process's memory growing (counted by
//! `portcullis_audit_waits_total`). Records handed over where nobody can wait (an exchange
//! dropped when its client left, a streamed answer's end) and records that waited in vain go
//! on as below.
//!
//! Overflow policy: when the bounded channel is full, records spill into an overflow queue
//! (counted by `portcullis_audit_overflow_total`, logged once per episode) instead of blocking
//! the caller further. The overflow queue holds at most `max_overflow_bytes` (records estimated
//! by their fields). Past that, a `strict` record is refused ([`AuditError::Full`]: the call is
//! answered 503 with `Retry-After`), and an `async` one is shed: counted by
//! `portcullis_audit_shed_total` and `portcullis_audit_dropped_total`, logged once per episode,
//! and reported by a record of method [`super::SHED_METHOD`] (how many, from when to when)
//! written with the next batch, that is as soon as the store takes records again. The backlog
//! gauge `portcullis_audit_backlog` (channel + overflow + the batch being written) is what to
//! alert on. Otherwise a record is lost only when it arrives after [`AuditWriter::shutdown`]
//! began, or when the store still fails during shutdown; each loss is logged at error and
//! counted by `portcullis_audit_dropped_total`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::record::Entry;
use super::redact::Redactor;
use super::{AuditConfig, AuditError, Durability, Record};
use crate::audit::storage::AuditAppender;
use crate::store::Store;

/// A batch closes at this many records…
const MAX_BATCH: usize = 500;
/// …or this long after its first record, or at once when a strict caller or a flush waits.
const MAX_DELAY: Duration = Duration::from_millis(50);
/// Longest pause between retries of a failed batch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Failed attempts tolerated once shutdown has begun (across all batches) before the remaining
/// records are given up, loudly.
const SHUTDOWN_ATTEMPTS: u32 = 3;
/// Longest pause between those attempts.
const SHUTDOWN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest an `async` call waits for room in a full channel while the store commits, before
/// its record spills to the overflow queue. Longer than a batch takes to commit on a loaded
/// machine, so that a writer that is merely behind holds its callers back rather than letting
/// the queue grow; short enough that a stalled store costs each call little before the
/// overflow queue (and, past its cap, shedding) takes over.
pub const MAX_WAIT: Duration = Duration::from_millis(100);

type Done = oneshot::Sender<Result<i64, AuditError>>;

#[allow(
    clippy::large_enum_variant,
    reason = "nearly every message is a record; boxing would cost an allocation per request"
)]
enum Msg {
    Record(Record, Option<Done>),
    Flush(oneshot::Sender<()>),
}

/// Counters since the writer started (the same numbers the metrics carry).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records committed.
    pub written: u64,
    /// Transactions committed.
    pub batches: u64,
    /// `async` records whose caller waited for room in a full channel ([`MAX_WAIT`]).
    pub waited: u64,
    /// Records that went to the overflow queue because the channel was full.
    pub overflowed: u64,
    /// Records lost (shed past the overflow cap, after shutdown began, or the store failing
    /// during shutdown).
    pub dropped: u64,
    /// Of those, records shed because the overflow queue was full.
    pub shed: u64,
    /// Strict records refused because the overflow queue was full.
    pub refused: u64,
    /// Failed batch attempts.
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    batches: AtomicU64,
    waited: AtomicU64,
    overflowed: AtomicU64,
    dropped: AtomicU64,
    shed: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    /// Accepted and not yet committed or given up.
    backlog: AtomicU64,
}

/// Records that did not fit in the channel. `closed` is set under the same lock when the
/// writer has drained it for the last time, so nothing is pushed into a dead queue.
#[derive(Default)]
struct Overflow {
    queue: VecDeque<(Record, Option<Done>, usize)>,
    /// The estimated bytes of `queue`.
    bytes: usize,
    closed: bool,
    /// Whether this overflow episode has been logged.
    warned: bool,
    /// Whether this episode of a full overflow queue has been logged.
    warned_full: bool,
    /// Records shed and not yet reported by a record: how many, and the first and last time.
    shed: Option<Shed>,
}

/// Records shed since the last report.
#[derive(Debug, Clone, Copy)]
struct Shed {
    count: u64,
    from_ms: i64,
    to_ms: i64,
}

struct Shared {
    durability: Durability,
    /// Whether the last attempt to commit a batch failed: callers do not wait for a store
    /// that is not taking records.
    failing: std::sync::atomic::AtomicBool,
    /// Set once checkpoints run: whether the last one could not be written.
    checkpoints: std::sync::OnceLock<super::checkpoint::Health>,
    max_overflow_bytes: usize,
    overflow: Mutex<Overflow>,
    overflow_notify: Notify,
    /// Wakes the writer while it gathers a batch: a strict record or a flush waits, or the
    /// channel is half full. Other records do not wake it, so a busy gateway pays one wake-up
    /// per batch rather than one per request.
    ready: Notify,
    counters: Counters,
    stopping: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// The audit writer. Cheap to clone (put it in `AppState`); one per process and store.
#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("durability", &self.shared.durability)
            .field("stats", &self.stats())
            .finish()
    }
}

impl AuditWriter {
    /// Starts the writer task on the current Tokio runtime.
    pub fn start(store: Store, config: &AuditConfig) -> AuditWriter {
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        let shared = Arc::new(Shared {
            durability: config.durability,
            failing: std::sync::atomic::AtomicBool::new(false),
            checkpoints: std::sync::OnceLock::new(),
            max_overflow_bytes: config.max_overflow_bytes,
            overflow: Mutex::default(),
            overflow_notify: Notify::new(),
            ready: Notify::new(),
            counters: Counters::default(),
            stopping: CancellationToken::new(),
            task: Mutex::new(None),
        });
        let redactor = Redactor::new(&config.redact_keys);
        let task = Task {
            appender: store.audit_appender(),
            redactor,
            rx,
            shared: shared.clone(),
            shutdown_budget: SHUTDOWN_ATTEMPTS,
            spare: Buffers::default(),
        };
        let handle = tokio::spawn(task.run());
        *shared.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        AuditWriter { tx, shared }
    }

    /// The configured durability.
    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Queues `record` and returns at once: never blocks, never fails, never drops silently.
    pub fn record(&self, record: Record) {
        self.enqueue(record, None);
    }

    /// Queues `record` and waits until the batch holding it has committed; returns its seq.
    pub async fn record_durable(&self, record: Record) -> Result<i64, AuditError> {
        let (done, committed) = oneshot::channel();
        self.enqueue(record, Some(done));
        committed.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Records per the configured durability: `async` returns once the record is queued,
    /// `strict` waits for the commit. The request path calls this once per request, before
    /// answering.
    ///
    /// In `async`, a full channel while the store commits makes the call wait for room, up to
    /// [`MAX_WAIT`]; after that, or at once while the store fails, the record goes on as with
    /// [`AuditWriter::record`].
    pub async fn write(&self, record: Record) -> Result<(), AuditError> {
        match self.shared.durability {
            Durability::Async => {
                self.record_or_wait(record).await;
                Ok(())
            }
            Durability::Strict => self.record_durable(record).await.map(drop),
        }
    }

    async fn record_or_wait(&self, record: Record) {
        let permit = match self.tx.try_reserve() {
            Ok(permit) => Some(permit),
            Err(mpsc::error::TrySendError::Full(())) if !self.shared.failing.load(Ordering::Relaxed) => {
                self.shared.counters.waited.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("portcullis_audit_waits_total").increment(1);
                // The writer empties the channel a batch at a time; it is woken to do so now.
                self.shared.ready.notify_one();
                tokio::time::timeout(MAX_WAIT, self.tx.reserve()).await.ok().and_then(Result::ok)
            }
            Err(_) => None,
        };
        match permit {
            Some(permit) => {
                self.shared.counters.backlog.fetch_add(1, Ordering::Relaxed);
                permit.send(Msg::Record(record, None));
                if self.tx.capacity() <= self.tx.max_capacity() / 2 {
                    self.shared.ready.notify_one();
                }
            }
            None => self.enqueue(record, None),
        }
    }

    /// Waits until every record queued before this call has been committed (or given up).
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (done, flushed) = oneshot::channel();
        self.tx.send(Msg::Flush(done)).await.map_err(|_| AuditError::Closed)?;
        self.shared.ready.notify_one();
        flushed.await.map_err(|_| AuditError::Closed)
    }

    /// Whether the overflow queue is past its cap (`max_overflow_bytes`), so that a strict
    /// record would be refused now: a dispatch can refuse a call before forwarding it.
    pub fn is_full(&self) -> bool {
        let overflow = self.shared.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        overflow.bytes >= self.shared.max_overflow_bytes || overflow.warned_full
    }

    /// Why a `strict` call must be refused before it is forwarded, if it must: the overflow
    /// queue is full ([`AuditError::Full`], see [`AuditWriter::is_full`]), or the last
    /// checkpoint of the chain's head could not be written ([`AuditError::Unprotected`]: the
    /// log's tail is not protected; see `docs/audit.md`, Checkpoints).
    pub fn refuses_strict(&self) -> Option<AuditError> {
        if self.is_full() {
            Some(AuditError::Full)
        } else if self.shared.checkpoints.get().is_some_and(super::checkpoint::Health::failing) {
            Some(AuditError::Unprotected)
        } else {
            None
        }
    }

    /// Lets the writer see whether checkpoints are being written ([`AuditWriter::refuses_strict`]).
    /// Set once, when the checkpointer starts.
    pub fn watch_checkpoints(&self, health: super::checkpoint::Health) {
        let _ = self.shared.checkpoints.set(health);
    }

    /// Records accepted and not yet committed.
    pub fn backlog(&self) -> u64 {
        self.shared.counters.backlog.load(Ordering::Relaxed)
    }

    /// Counters since start.
    pub fn stats(&self) -> WriterStats {
        let c = &self.shared.counters;
        WriterStats {
            written: c.written.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            waited: c.waited.load(Ordering::Relaxed),
            overflowed: c.overflowed.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            shed: c.shed.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting records, commits everything already accepted, and waits for the task.
    /// Call it after the listeners have drained. Idempotent.
    pub async fn shutdown(&self) {
        self.shared.stopping.cancel();
        let handle = self.shared.task.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle
            && let Err(e) = handle.await
        {
            tracing::error!(error = %e, "audit writer task failed");
        }
    }

    fn enqueue(&self, record: Record, done: Option<Done>) {
        let c = &self.shared.counters;
        c.backlog.fetch_add(1, Ordering::Relaxed);
        let urgent = done.is_some();
        let (full, msg) = match self.tx.try_send(Msg::Record(record, done)) {
            Ok(()) => {
                if urgent || self.tx.capacity() <= self.tx.max_capacity() / 2 {
                    self.shared.ready.notify_one();
                }
                return;
            }
            Err(mpsc::error::TrySendError::Full(msg)) => (true, msg),
            Err(mpsc::error::TrySendError::Closed(msg)) => (false, msg),
        };
        // Only records travel by try_send.
        let Msg::Record(record, done) = msg else { return };
        if !full {
            return self.lost(&record, done);
        }
        let mut overflow = self.shared.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        if overflow.closed {
            drop(overflow);
            return self.lost(&record, done);
        }
        let size = record.approx_bytes();
        if overflow.bytes + size > self.shared.max_overflow_bytes {
            return self.over_cap(overflow, &record, done);
        }
        overflow.bytes += size;
        overflow.queue.push_back((record, done, size));
        if !overflow.warned {
            overflow.warned = true;
            tracing::warn!("audit channel full: records spill to the overflow queue (the store is slow or down)");
        }
        drop(overflow);
        c.overflowed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("portcullis_audit_overflow_total").increment(1);
        self.shared.overflow_notify.notify_one();
    }

    /// A record that found the overflow queue full: a strict caller is refused, an async
    /// record is shed; both counted, logged once per episode, and never silent.
    fn over_cap(&self, mut overflow: std::sync::MutexGuard<'_, Overflow>, record: &Record, done: Option<Done>) {
        let c = &self.shared.counters;
        c.backlog.fetch_sub(1, Ordering::Relaxed);
        let first = !overflow.warned_full;
        overflow.warned_full = true;
        match done {
            Some(done) => {
                drop(overflow);
                c.refused.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("portcullis_audit_refused_total").increment(1);
                let _ = done.send(Err(AuditError::Full));
            }
            None => {
                let shed =
                    overflow.shed.get_or_insert(Shed { count: 0, from_ms: record.time_ms, to_ms: record.time_ms });
                shed.count += 1;
                shed.from_ms = shed.from_ms.min(record.time_ms);
                shed.to_ms = shed.to_ms.max(record.time_ms);
                drop(overflow);
                c.shed.fetch_add(1, Ordering::Relaxed);
                c.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("portcullis_audit_shed_total").increment(1);
                metrics::counter!("portcullis_audit_dropped_total").increment(1);
            }
        }
        if first {
            tracing::warn!(
                max_overflow_bytes = self.shared.max_overflow_bytes,
                "the audit overflow queue is full (the store is slow or down): strict calls are refused, other records \
                 are shed and counted until it drains"
            );
        }
    }

    /// A record that arrived after shutdown: never silent.
    fn lost(&self, record: &Record, done: Option<Done>) {
        let c = &self.shared.counters;
        c.backlog.fetch_sub(1, Ordering::Relaxed);
        c.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("portcullis_audit_dropped_total").increment(1);
        tracing::error!(request_id = %record.request_id, method = %record.method, "audit record dropped: the writer has shut down");
        if let Some(done) = done {
            let _ = done.send(Err(AuditError::Closed));
        }
    }
}

/// The background task: owns the receiving end and the store.
struct Task {
    appender: AuditAppender,
    redactor: Redactor,
    rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    /// Failed attempts still tolerated after shutdown began.
    shutdown_budget: u32,
    /// The batch's buffers, kept from one batch to the next.
    spare: Buffers,
}

/// A batch's buffers (hundreds of kilobytes at full size). Kept and reused: freed after each
/// batch, they let glibc hand the top of its heap back to the kernel (`madvise`), and the next
/// batch faulted every page in again, about 0.2 page faults per record, which a flood of
/// refused requests paid for. A record becomes its stored form as it joins the batch, so the
/// batch is these two vectors and nothing else.
#[derive(Default)]
struct Buffers {
    entries: Vec<Entry>,
    waiters: Vec<Option<Done>>,
}

/// One batch being gathered: its records in their stored form, not yet chained, and who waits
/// for each.
#[derive(Default)]
struct Batch {
    entries: Vec<Entry>,
    waiters: Vec<Option<Done>>,
    flushes: Vec<oneshot::Sender<()>>,
    /// Someone waits for this batch (a strict record or a flush), so it should not linger.
    urgent: bool,
}

impl Batch {
    fn take(&mut self, msg: Msg, redactor: &Redactor) {
        match msg {
            Msg::Record(r, d) => self.push(r, d, redactor),
            Msg::Flush(f) => {
                self.urgent = true;
                self.flushes.push(f);
            }
        }
    }

    fn push(&mut self, record: Record, done: Option<Done>, redactor: &Redactor) {
        self.urgent |= done.is_some();
        self.entries.push(record.into_entry(redactor));
        self.waiters.push(done);
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The record that reports records shed past the overflow cap.
fn shed_record(shed: Shed) -> Record {
    let now = crate::clock::Clock::system().unix_millis();
    tracing::warn!(shed = shed.count, "the audit log records how many records were shed while its queue was full");
    Record {
        arguments: super::Arguments::new(serde_json::json!({
            "shed": shed.count,
            "from_ms": shed.from_ms,
            "to_ms": shed.to_ms,
            "reason": "audit.max_overflow_bytes",
        })),
        ..Record::new(now, uuid::Uuid::now_v7().to_string(), super::SHED_METHOD, super::Decision::Error)
    }
}

impl Task {
    async fn run(mut self) {
        loop {
            let mut batch = Batch {
                entries: std::mem::take(&mut self.spare.entries),
                waiters: std::mem::take(&mut self.spare.waiters),
                ..Batch::default()
            };
            let stopping = self.gather(&mut batch).await;
            if stopping {
                // No new records from here on; everything already accepted is written below.
                self.rx.close();
                while let Ok(msg) = self.rx.try_recv() {
                    batch.take(msg, &self.redactor);
                }
                self.take_overflow(&mut batch, usize::MAX, true);
            }
            // A flush answers only after everything queued before it (including the overflow)
            // is written, so drain the overflow too.
            if !batch.flushes.is_empty() {
                self.take_overflow(&mut batch, usize::MAX, false);
            }
            // Transactions of at most MAX_BATCH records (a batch is longer only when a flush or
            // shutdown drained the overflow queue into it).
            let (mut entries, mut waiters) = (std::mem::take(&mut batch.entries), std::mem::take(&mut batch.waiters));
            while entries.len() > MAX_BATCH {
                let (later, later_waiters) = (entries.split_off(MAX_BATCH), waiters.split_off(MAX_BATCH));
                self.write(&mut entries, &mut waiters).await;
                (entries, waiters) = (later, later_waiters);
            }
            if !entries.is_empty() {
                self.write(&mut entries, &mut waiters).await;
            }
            entries.clear();
            waiters.clear();
            (self.spare.entries, self.spare.waiters) = (entries, waiters);
            for f in batch.flushes {
                let _ = f.send(());
            }
            self.report_backlog();
            if stopping {
                return;
            }
        }
    }

    /// Fills `batch`; returns whether shutdown has begun.
    async fn gather(&mut self, batch: &mut Batch) -> bool {
        let stopping = self.shared.stopping.clone();
        tokio::select! {
            msg = self.rx.recv() => match msg {
                Some(msg) => batch.take(msg, &self.redactor),
                None => return true,
            },
            () = self.shared.overflow_notify.notified() => {}
            () = stopping.cancelled() => return true,
        }
        let deadline = Instant::now() + MAX_DELAY;
        loop {
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(msg) => batch.take(msg, &self.redactor),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return true,
                }
            }
            self.take_overflow(batch, MAX_BATCH.saturating_sub(batch.len()), false);
            if batch.len() >= MAX_BATCH || batch.urgent {
                return false;
            }
            tokio::select! {
                () = self.shared.ready.notified() => {}
                () = self.shared.overflow_notify.notified() => {}
                () = tokio::time::sleep_until(deadline) => {
                    // The records that came in meanwhile join this batch.
                    while batch.len() < MAX_BATCH {
                        match self.rx.try_recv() {
                            Ok(msg) => batch.take(msg, &self.redactor),
                            Err(_) => break,
                        }
                    }
                    return false;
                }
                () = stopping.cancelled() => return true,
            }
        }
    }

    fn take_overflow(&self, batch: &mut Batch, max: usize, close: bool) {
        let mut overflow = self.shared.overflow.lock().unwrap_or_else(PoisonError::into_inner);
        let n = max.min(overflow.queue.len());
        // Taken out under the lock, turned into entries (redacted) after it is released, so
        // that callers spilling meanwhile do not wait for the redaction.
        let taken: Vec<_> = overflow.queue.drain(..n).collect();
        overflow.bytes -= taken.iter().map(|(_, _, size)| size).sum::<usize>();
        if overflow.queue.is_empty() {
            overflow.warned = false;
        }
        if n > 0 || overflow.queue.is_empty() {
            overflow.warned_full = false;
        }
        if close {
            overflow.closed = true;
        }
        // The report of what was shed goes with the records that follow it.
        let shed = overflow.shed.take();
        drop(overflow);
        for (record, done, _) in taken {
            batch.push(record, done, &self.redactor);
        }
        if let Some(shed) = shed {
            self.shared.counters.backlog.fetch_add(1, Ordering::Relaxed);
            batch.push(shed_record(shed), None, &self.redactor);
        }
    }

    /// Writes one batch, retrying with backoff until it commits; during shutdown it gives up
    /// once the shutdown budget of failed attempts is spent, loudly.
    async fn write(&mut self, entries: &mut Vec<Entry>, waiters: &mut [Option<Done>]) {
        let n = entries.len() as u64;
        let c = &self.shared.counters;
        let mut attempt: u32 = 0;
        loop {
            let started = std::time::Instant::now();
            match self.appender.append(entries).await {
                Ok(()) => {
                    self.shared.failing.store(false, Ordering::Relaxed);
                    metrics::histogram!("portcullis_audit_batch_seconds").record(started.elapsed().as_secs_f64());
                    metrics::counter!("portcullis_audit_written_total").increment(n);
                    c.written.fetch_add(n, Ordering::Relaxed);
                    c.batches.fetch_add(1, Ordering::Relaxed);
                    c.backlog.fetch_sub(n, Ordering::Relaxed);
                    for (w, e) in waiters.iter_mut().zip(entries.iter()) {
                        if let Some(w) = w.take() {
                            let _ = w.send(Ok(e.seq));
                        }
                    }
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    self.shared.failing.store(true, Ordering::Relaxed);
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("portcullis_audit_write_errors_total").increment(1);
                    tracing::error!(error = %e, records = n, attempt, "audit batch failed; retrying");
                    // Strict callers learn of the failure now rather than after the outage;
                    // their records stay in the batch and are still written when the store recovers.
                    for w in waiters.iter_mut().filter_map(Option::take) {
                        let _ = w.send(Err(AuditError::NotCommitted(e.to_string())));
                    }
                    let stopping = self.shared.stopping.is_cancelled();
                    if stopping {
                        self.shutdown_budget = self.shutdown_budget.saturating_sub(1);
                    }
                    // An append hands its batch back on every error it can see; one that comes
                    // back emptied went down with a cancelled task, and retrying it would count
                    // records as written that were not.
                    let emptied = n > 0 && entries.is_empty();
                    if emptied || (stopping && self.shutdown_budget == 0) {
                        c.dropped.fetch_add(n, Ordering::Relaxed);
                        c.backlog.fetch_sub(n, Ordering::Relaxed);
                        metrics::counter!("portcullis_audit_dropped_total").increment(n);
                        let first = entries.first().map(|e| e.request_id.as_str()).unwrap_or_default();
                        let why = if emptied { "the append was cancelled" } else { "the store failed during shutdown" };
                        tracing::error!(error = %e, records = n, first_request_id = first, "audit records lost: {why}");
                        return;
                    }
                    self.report_backlog();
                    let backoff = MAX_BACKOFF.min(Duration::from_millis(50) * 2u32.saturating_pow(attempt.min(10)));
                    if stopping {
                        tokio::time::sleep(backoff.min(SHUTDOWN_BACKOFF)).await;
                    } else {
                        // Shutdown cuts a long pause short: from then on attempts are counted.
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = self.shared.stopping.cancelled() => {}
                        }
                    }
                }
            }
        }
    }

    fn report_backlog(&self) {
        metrics::gauge!("portcullis_audit_backlog").set(self.shared.counters.backlog.load(Ordering::Relaxed) as f64);
    }
}
