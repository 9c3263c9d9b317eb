//! The access-log line: one per request, target `cutoff::access`.
//!
//! Written only by the outcome guard, so that there is exactly one line whichever way the
//! request ended. Client departures are INFO: a user closing a tab is normal traffic, not
//! an error, and logging it as one buries real failures. Timeouts, upstream failures and
//! shutdown cancellations are WARN. With `format = "json"` the fields are the keys of one
//! JSON object per line (see `logging.rs`).
//!
//! Lines are written where the request ends, on its worker, as one `write` to stderr,
//! except on the hang-up thread (see [`hand_off_this_thread`]).

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::Duration;

use crate::outcome::{CancelledBy, Outcome, Phase};

pub const TARGET: &str = "cutoff::access";

pub struct AccessRecord<'a> {
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub outcome: Outcome,
    pub duration_ms: f64,
    pub upstream_ms: Option<f64>,
    pub bytes_out: u64,
    pub cancelled_by: Option<CancelledBy>,
    pub protected: bool,
    /// Where the upstream call was when it was cancelled (only for cancellations).
    pub phase: Option<Phase>,
    /// Why, when the outcome alone does not say (an upstream's error, a queue that was full).
    pub reason: Option<&'a str>,
}

/// Writes the record, on this thread, unless this thread must never wait for the log.
pub fn write(r: &AccessRecord<'_>) {
    // A line the filter drops (client departures under `level = "warn"`) is not worth
    // a copy, a queue and a wake-up of the log thread.
    if HANDS_OFF.get()
        && enabled(r.outcome)
        && let Some(tx) = HAND_OFF.get()
    {
        let line = Line::from(r);
        match tx.try_send(Msg::Line(line)) {
            Ok(()) => return,
            // More lines waiting than the queue holds: the log's reader has fallen far
            // behind. Waiting for room keeps both every line and the memory bounded.
            Err(TrySendError::Full(msg)) => {
                if tx.send(msg).is_ok() {
                    return;
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
    emit(r);
}

thread_local! {
    static HANDS_OFF: Cell<bool> = const { Cell::new(false) };
}

/// The log thread's queue, once started.
static HAND_OFF: OnceLock<SyncSender<Msg>> = OnceLock::new();

/// Lines waiting for the log thread, at most: 16 full batches of the hang-up thread's
/// events (a mass departure of a thousand clients) without its waiting, in about 200 KiB.
const HAND_OFF_QUEUE: usize = 1024;

enum Msg {
    Line(Line),
    /// Answered once every line queued before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Starts the log thread, once per process, on the calling thread's scheduling policy
/// (call it from a thread of normal priority). Returns false when no thread could start
/// (or one already had: the second ends at once): lines are then written where they end,
/// as everywhere else.
pub fn start_log_thread() -> bool {
    let (tx, rx) = mpsc::sync_channel::<Msg>(HAND_OFF_QUEUE);
    let spawned = std::thread::Builder::new()
        .name("cutoff-log".into())
        .spawn(move || {
            for msg in rx {
                match msg {
                    Msg::Line(line) => emit(&line.record()),
                    Msg::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
    match spawned {
        // Called once (with the hang-up thread): a second call's thread ends at once.
        Ok(_) => HAND_OFF.set(tx).is_ok(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the log thread");
            false
        }
    }
}

/// From now on, the calling thread hands its access-log lines to the log thread instead
/// of writing them.
///
/// For the hang-up thread. A line is a write to stderr, and stderr is often a pipe to a
/// log shipper: written there, a reader that falls behind would put the hang-up thread to
/// sleep in `write`, and the departures after it (the upstream calls it is there to
/// close) would wait for the log. Handed off, the thread only closes upstream calls, no
/// departure waits for another's line, and the log thread, of normal priority, formats and
/// writes them on whatever core is free. A line's `timestamp` is when it is written, so
/// behind a slow reader a departure's line may come after later lines of the workers.
pub fn hand_off_this_thread() {
    HANDS_OFF.set(true);
}

/// Waits, at most `wait`, until every line handed off so far is written: at shutdown,
/// before the process exits and takes the log thread's queue with it.
pub async fn flush(wait: Duration) {
    let Some(tx) = HAND_OFF.get() else {
        return;
    };
    let (done, written) = tokio::sync::oneshot::channel();
    let _ = tokio::time::timeout(wait, async {
        let mut msg = Msg::Flush(done);
        // A full queue (the log's reader far behind) is waited on here without blocking
        // a thread: the timeout must be able to end the wait.
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        let _ = written.await;
    })
    .await;
}

/// An [`AccessRecord`] that owns its strings, to be written by another thread.
struct Line {
    route: Box<str>,
    method: Box<str>,
    path: Box<str>,
    status: u16,
    outcome: Outcome,
    duration_ms: f64,
    upstream_ms: Option<f64>,
    bytes_out: u64,
    cancelled_by: Option<CancelledBy>,
    protected: bool,
    phase: Option<Phase>,
    reason: Option<Box<str>>,
}

impl Line {
    fn from(r: &AccessRecord<'_>) -> Line {
        Line {
            route: r.route.into(),
            method: r.method.into(),
            path: r.path.into(),
            status: r.status,
            outcome: r.outcome,
            duration_ms: r.duration_ms,
            upstream_ms: r.upstream_ms,
            bytes_out: r.bytes_out,
            cancelled_by: r.cancelled_by,
            protected: r.protected,
            phase: r.phase,
            reason: r.reason.map(Into::into),
        }
    }

    fn record(&self) -> AccessRecord<'_> {
        AccessRecord {
            route: &self.route,
            method: &self.method,
            path: &self.path,
            status: self.status,
            outcome: self.outcome,
            duration_ms: self.duration_ms,
            upstream_ms: self.upstream_ms,
            bytes_out: self.bytes_out,
            cancelled_by: self.cancelled_by,
            protected: self.protected,
            phase: self.phase,
            reason: self.reason.as_deref(),
        }
    }
}

/// Emits the record at the level its outcome deserves.
fn emit(r: &AccessRecord<'_>) {
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                target: "cutoff::access",
                $level,
                route = r.route,
                method = r.method,
                path = r.path,
                status = r.status,
                outcome = r.outcome.as_str(),
                duration_ms = round3(r.duration_ms),
                upstream_ms = r.upstream_ms.map(round3),
                bytes_out = r.bytes_out,
                cancelled_by = r.cancelled_by.map(CancelledBy::as_str),
                protected = r.protected,
                phase = r.phase.map(Phase::as_str),
                reason = r.reason,
                "access"
            )
        };
    }
    if is_warning(r.outcome) {
        emit!(tracing::Level::WARN)
    } else {
        emit!(tracing::Level::INFO)
    }
}

/// Timeouts, upstream failures and shutdown cancellations; the rest is normal traffic.
fn is_warning(outcome: Outcome) -> bool {
    match outcome {
        Outcome::Ok | Outcome::ClientClosed | Outcome::NoRoute | Outcome::BadRequest => false,
        Outcome::Timeout | Outcome::UpstreamError | Outcome::Shutdown => true,
    }
}

/// Whether the log's filter lets this outcome's line through.
fn enabled(outcome: Outcome) -> bool {
    if is_warning(outcome) {
        tracing::enabled!(target: "cutoff::access", tracing::Level::WARN)
    } else {
        tracing::enabled!(target: "cutoff::access", tracing::Level::INFO)
    }
}

/// Microsecond resolution is plenty in a log line and keeps it short.
fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}
