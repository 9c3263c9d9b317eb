//! The access-log line: one per request, target `cutoff::access`.
//!
//! Written only by the outcome guard, so that there is exactly one line whichever way the
//! request ended. Client departures are INFO: a user closing a tab is normal traffic, not
//! an error, and logging it as one buries real failures. Timeouts, upstream failures and
//! shutdown cancellations are WARN. With `format = "json"` the fields are the keys of one
//! JSON object per line (see `logging.rs`).

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

/// Emits the record at the level its outcome deserves.
pub fn write(r: &AccessRecord<'_>) {
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
    match r.outcome {
        Outcome::Ok | Outcome::ClientClosed | Outcome::NoRoute | Outcome::BadRequest => {
            emit!(tracing::Level::INFO)
        }
        Outcome::Timeout | Outcome::UpstreamError | Outcome::Shutdown => {
            emit!(tracing::Level::WARN)
        }
    }
}

/// Microsecond resolution is plenty in a log line and keeps it short.
fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}
