//! The writer thread and the queue that feeds it.
//!
//! Requests hand their record to [`AuditLog::send`], which never blocks:
//! the record goes into a queue of at most `capacity` records. One thread
//! takes everything queued, chains it and writes it to every sink in one
//! write per sink. A sink that fails keeps its chain where it was; the
//! records are held and the write is retried every second, so a disk that
//! fills and empties again loses nothing and breaks nothing. While a sink
//! fails, or the queue is three-quarters full, [`AuditLog::admit`] refuses
//! new requests (503 `audit_unavailable`) unless `on_error: allow`. When
//! the queue is full, records are dropped and counted, and the next write
//! begins with an `audit_gap` record saying how many.

use super::chain::Sealer;
use super::file::{FileOptions, FileSink};
use crate::metrics;
use filters::OnError;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Seconds between attempts while a sink fails.
const RETRY: Duration = Duration::from_secs(1);
/// Attempts made at shutdown before held records are given up to stderr.
const CLOSE_ATTEMPTS: u32 = 5;
/// Records written in one go at most.
const MAX_BATCH: usize = 4096;

/// Where records go, and what happens when they cannot.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub file: Option<FileOptions>,
    pub stdout: bool,
    pub redis: Option<super::redis::RedisOptions>,
    pub sealer: Sealer,
    /// Records the queue holds at most (queued and held for a retry).
    pub capacity: usize,
    pub on_error: OnError,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            file: None,
            stdout: false,
            redis: None,
            sealer: Sealer::default(),
            capacity: 10_000,
            on_error: OnError::Deny,
        }
    }
}

/// A destination of records with its own chain.
pub trait Sink: Send {
    fn name(&self) -> String;
    /// Write `records` in order, chained to what this sink wrote before.
    /// All or nothing: after an error the sink and its chain are as they
    /// were, and the same records can be written again.
    fn write(&mut self, records: &[Value]) -> Result<(), String>;
    /// Make written records durable when due (or now, with `force`).
    fn sync_if_due(&mut self, _force: bool) -> Result<(), String> {
        Ok(())
    }
    /// When [`Sink::sync_if_due`] next has work.
    fn sync_deadline(&self) -> Option<Instant> {
        None
    }
}

/// Records as lines on standard output (for a log collector).
struct StdoutSink {
    sealer: Sealer,
    prev: String,
}

impl Sink for StdoutSink {
    fn name(&self) -> String {
        "audit stdout".into()
    }

    fn write(&mut self, records: &[Value]) -> Result<(), String> {
        let (buf, prev) = self.sealer.seal_lines(records, &self.prev);
        let mut out = std::io::stdout().lock();
        out.write_all(buf.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| e.to_string())?;
        self.prev = prev;
        Ok(())
    }
}

struct Shared {
    /// Records queued or held, not yet written by every sink.
    depth: AtomicUsize,
    capacity: usize,
    dropped: AtomicU64,
    failing: AtomicBool,
    why: Mutex<String>,
    on_error: OnError,
}

enum Msg {
    Record(Value),
    Close,
}

/// The sending side, cheap to clone, safe to share between threads.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// Owns the writer thread; [`AuditWriter::close`] drains and joins it.
pub struct AuditWriter {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Queue a record. Never blocks; when the queue is full the record is
    /// dropped, counted, and reported by an `audit_gap` record.
    pub fn send<T: Serialize>(&self, record: &T) {
        let value = match serde_json::to_value(record) {
            Ok(v) => v,
            Err(e) => {
                metrics::AUDIT_WRITE_ERRORS.inc();
                log::error!("audit record not serializable: {e}");
                return;
            }
        };
        let s = &self.shared;
        if s.depth.fetch_add(1, Ordering::AcqRel) >= s.capacity {
            s.depth.fetch_sub(1, Ordering::AcqRel);
            self.drop_one("the queue is full");
            return;
        }
        metrics::AUDIT_QUEUE_DEPTH.inc();
        if self.tx.send(Msg::Record(value)).is_err() {
            s.depth.fetch_sub(1, Ordering::AcqRel);
            metrics::AUDIT_QUEUE_DEPTH.dec();
            self.drop_one("the writer has stopped");
        }
    }

    fn drop_one(&self, why: &str) {
        self.shared.dropped.fetch_add(1, Ordering::AcqRel);
        metrics::AUDIT_DROPPED.inc();
        log::error!("audit record dropped: {why}");
    }

    /// `Err(why)` when a new request must be refused (503
    /// `audit_unavailable`): a sink fails or the queue is nearly full,
    /// and `on_error` is `deny`.
    pub fn admit(&self) -> Result<(), String> {
        if self.shared.on_error == OnError::Allow {
            return Ok(());
        }
        if let Some(why) = self.failure() {
            return Err(why);
        }
        let depth = self.shared.depth.load(Ordering::Acquire);
        if depth >= self.shared.capacity / 4 * 3 {
            return Err(format!(
                "audit queue nearly full ({depth} of {} records)",
                self.shared.capacity
            ));
        }
        Ok(())
    }

    /// Why a sink cannot be written, while it cannot.
    pub fn failure(&self) -> Option<String> {
        if !self.shared.failing.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.shared
                .why
                .lock()
                .map(|w| w.clone())
                .unwrap_or_default(),
        )
    }
}

impl AuditWriter {
    /// Open every sink and start the writer thread. Fails when a sink
    /// cannot be opened (the file is locked by another process, its last
    /// line is not a record, Redis refuses the connection).
    pub fn start(opts: AuditOptions) -> anyhow::Result<(AuditWriter, AuditLog)> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        if let Some(f) = &opts.file {
            sinks.push(Box::new(FileSink::open(f.clone(), opts.sealer.clone())?));
        }
        if let Some(r) = &opts.redis {
            sinks.push(Box::new(super::redis::RedisSink::open(
                r.clone(),
                opts.sealer.clone(),
            )?));
        }
        if opts.stdout {
            sinks.push(Box::new(StdoutSink {
                sealer: opts.sealer.clone(),
                prev: super::chain::GENESIS.into(),
            }));
        }
        Ok(Self::start_with(sinks, opts))
    }

    /// Start the writer thread over sinks already opened.
    pub fn start_with(sinks: Vec<Box<dyn Sink>>, opts: AuditOptions) -> (AuditWriter, AuditLog) {
        let shared = Arc::new(Shared {
            depth: AtomicUsize::new(0),
            capacity: opts.capacity.max(1),
            dropped: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            why: Mutex::new(String::new()),
            on_error: opts.on_error,
        });
        let (tx, rx) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || Writer::new(sinks, shared).run(rx))
        };
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log::error!("audit writer thread: {e}");
                if let Ok(mut w) = shared.why.lock() {
                    *w = format!("the audit writer could not start: {e}");
                }
                shared.failing.store(true, Ordering::Release);
                None
            }
        };
        (
            AuditWriter {
                tx: tx.clone(),
                thread,
            },
            AuditLog { tx, shared },
        )
    }

    /// Write everything queued so far, fsync, and stop the thread.
    pub fn close(mut self) {
        let _ = self.tx.send(Msg::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One sink as the writer drives it.
struct SinkRun {
    sink: Box<dyn Sink>,
    /// How many of `held` this sink has written.
    done: usize,
    /// After a failed write: not before this.
    retry_at: Option<Instant>,
    /// Why the last write or fsync failed, while it does.
    error: Option<String>,
}

struct Writer {
    runs: Vec<SinkRun>,
    held: VecDeque<Value>,
    shared: Arc<Shared>,
}

/// However the writer thread ends (a panic included), new requests are
/// refused from then on under `on_error: deny`: nothing writes records.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.why.lock() {
            *w = "the audit writer has stopped".into();
        }
        self.0.failing.store(true, Ordering::Release);
    }
}

/// How long the writer keeps taking records after `Close` once they stop
/// coming (requests cut off while the runtimes stop still send theirs).
const CLOSE_QUIET: Duration = Duration::from_millis(200);

impl Writer {
    fn new(sinks: Vec<Box<dyn Sink>>, shared: Arc<Shared>) -> Self {
        Self {
            runs: sinks
                .into_iter()
                .map(|sink| SinkRun {
                    sink,
                    done: 0,
                    retry_at: None,
                    error: None,
                })
                .collect(),
            held: VecDeque::new(),
            shared,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let _guard = ExitGuard(self.shared.clone());
        let mut closing = false;
        while !closing {
            let first = match self.deadline() {
                None => Some(rx.recv().unwrap_or(Msg::Close)),
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => Some(Msg::Close),
                },
            };
            let mut next = first;
            let mut taken = 0;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record(v) => self.held.push_back(v),
                    Msg::Close => closing = true,
                }
                taken += 1;
                if taken < MAX_BATCH && !closing {
                    next = rx.try_recv().ok();
                }
            }
            self.step(closing);
        }
        // Records still on their way (a request cut off while the runtimes
        // stop sends its record from its destructor).
        while let Ok(msg) = rx.recv_timeout(CLOSE_QUIET) {
            if let Msg::Record(v) = msg {
                self.held.push_back(v);
            }
        }
        self.step(true);
        for attempt in 1..=CLOSE_ATTEMPTS {
            if self.held.is_empty() && self.runs.iter().all(|r| r.error.is_none()) {
                return;
            }
            std::thread::sleep(RETRY);
            log::warn!(
                "audit: {} records still unwritten (attempt {attempt})",
                self.held.len()
            );
            self.step(true);
        }
        // The last resort: the records go to the log rather than nowhere.
        for r in &self.held {
            eprintln!("portcullis: unwritten audit record: {r}");
        }
        log::error!(
            "audit: {} records could not be written before exit; they were logged to stderr",
            self.held.len()
        );
    }

    fn deadline(&self) -> Option<Instant> {
        // A sink waiting for its retry is not synced before it (its sync
        // deadline may be long past: waking for it would spin).
        self.runs
            .iter()
            .filter_map(|r| r.retry_at.or_else(|| r.sink.sync_deadline()))
            .min()
    }

    /// Write what is held to every sink that is due, and settle the
    /// bookkeeping. A failing sink waits for its retry; the others go on.
    fn step(&mut self, force: bool) {
        let dropped = self.shared.dropped.swap(0, Ordering::AcqRel);
        if dropped > 0 {
            self.shared.depth.fetch_add(1, Ordering::AcqRel);
            self.held.push_back(json!({
                "kind": "audit_gap",
                "ts": crate::clock::timestamp(),
                "dropped": dropped,
                "reason": "records were dropped because the audit queue was full",
            }));
        }
        let now = Instant::now();
        let records = self.held.make_contiguous();
        for run in &mut self.runs {
            let due = force || run.retry_at.is_none_or(|t| now >= t);
            if run.done < records.len() && due {
                match run.sink.write(&records[run.done..]) {
                    Ok(()) => {
                        run.done = records.len();
                        run.retry_at = None;
                        run.error = None;
                    }
                    Err(e) => {
                        metrics::AUDIT_WRITE_ERRORS.inc();
                        run.retry_at = Some(now + RETRY);
                        run.error = Some(format!("{}: {e}", run.sink.name()));
                    }
                }
            }
            if run.retry_at.is_none() {
                match run.sink.sync_if_due(force) {
                    Ok(()) => run.error = None,
                    Err(e) => run.error = Some(format!("{}: {e}", run.sink.name())),
                }
            }
        }
        let n = self
            .runs
            .iter()
            .map(|r| r.done)
            .min()
            .unwrap_or(self.held.len());
        self.held.drain(..n);
        for run in &mut self.runs {
            run.done -= n;
        }
        if n > 0 {
            self.shared.depth.fetch_sub(n, Ordering::AcqRel);
            metrics::AUDIT_RECORDS_WRITTEN.inc_by(n as u64);
        }
        metrics::AUDIT_QUEUE_DEPTH.set(self.shared.depth.load(Ordering::Acquire) as i64);
        let errors: Vec<&str> = self
            .runs
            .iter()
            .filter_map(|r| r.error.as_deref())
            .collect();
        if errors.is_empty() {
            if self.shared.failing.swap(false, Ordering::AcqRel) {
                log::info!("audit: writing again");
            }
            metrics::AUDIT_SINK_FAILING.set(0);
        } else {
            metrics::AUDIT_SINK_FAILING.set(1);
            let why = errors.join("; ");
            // The reason first, then the flag: a request refused in
            // between must never be told an empty reason.
            if let Ok(mut w) = self.shared.why.lock() {
                w.clone_from(&why);
            }
            if !self.shared.failing.swap(true, Ordering::AcqRel) {
                log::error!("audit: cannot write ({why}); records are held and retried");
            }
        }
    }
}
