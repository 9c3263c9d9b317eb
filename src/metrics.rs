//! Metric names, buckets, per-route handles and the saved-work estimator.
//!
//! Every series a configured route, upstream or endpoint can produce is registered when its
//! config is loaded, so that it exists at zero before the first request: dashboards and
//! alerts never see gaps. Registration hands back handles (atomics behind an `Arc`), so that
//! recording a request on the hot path is a few atomic operations: no label formatting, no
//! map lookup, no allocation.
//!
//! Two counters of the contract are in seconds and fractional
//! (`cutoff_upstream_wasted_seconds_total`, `cutoff_upstream_saved_seconds_total`). The
//! `metrics` facade only has integer counters, so those two are kept here as `f64` atomics
//! and appended to the exporter's text by [`Exporter::render`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::outcome::{CancelledBy, Outcome, Phase};

pub const REQUESTS: &str = "cutoff_requests_total";
pub const REQUEST_DURATION: &str = "cutoff_request_duration_seconds";
pub const UPSTREAM_DURATION: &str = "cutoff_upstream_duration_seconds";
pub const UPSTREAM_INFLIGHT: &str = "cutoff_upstream_inflight";
pub const UPSTREAM_CANCELLED: &str = "cutoff_upstream_cancelled_total";
pub const CANCEL_PROPAGATION: &str = "cutoff_cancel_propagation_seconds";
pub const WASTED: &str = "cutoff_upstream_wasted_seconds_total";
pub const SAVED: &str = "cutoff_upstream_saved_seconds_total";
pub const DISCARDED_BYTES: &str = "cutoff_discarded_bytes_total";
pub const PROTECTED_COMPLETED: &str = "cutoff_protected_completed_total";
pub const CONFIG_RELOADS: &str = "cutoff_config_reloads_total";
pub const ENDPOINT_INFLIGHT: &str = "cutoff_endpoint_inflight";
pub const ENDPOINT_EJECTIONS: &str = "cutoff_endpoint_ejections_total";
pub const QUEUE_LENGTH: &str = "cutoff_queue_length";
pub const QUEUE_WAIT: &str = "cutoff_queue_wait_seconds";

/// Durations a person waits for: a millisecond to five minutes.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Cancellation is meant to take microseconds; anything past 10 ms is a finding.
const PROPAGATION_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1, 0.5, 1.0,
];
/// Queue waits are bounded by `queue_timeout`, typically under a few seconds.
const QUEUE_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The Prometheus side: the installed recorder's handle plus cutoff's own float counters.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
}

/// Installs the process-wide recorder. Called once by the binary; `cutoff check` never
/// calls it, so registration there is a no-op.
pub fn install() -> Result<Exporter, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), REQUEST_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(UPSTREAM_DURATION.into()), REQUEST_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(CANCEL_PROPAGATION.into()),
                PROPAGATION_BUCKETS,
            )
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), QUEUE_BUCKETS))
        .and_then(|b| b.install_recorder())
        .map_err(|e| e.to_string())?;
    for result in ["ok", "error"] {
        counter!(CONFIG_RELOADS, "result" => result).absolute(0);
    }
    Ok(Exporter { handle })
}

impl Exporter {
    /// Prometheus text: everything the `metrics` facade holds, then the float counters.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        render_float_counters(&mut out);
        out
    }

    /// Folds histogram samples into buckets. Run periodically so that memory stays bounded
    /// even when nobody scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

pub fn config_reload(ok: bool) {
    counter!(CONFIG_RELOADS, "result" => if ok { "ok" } else { "error" }).increment(1);
}

// ---------------------------------------------------------------------------------------
// Float counters.

/// A monotonically increasing `f64`, stored as bits in an atomic (compare-and-swap add).
#[derive(Clone, Default)]
pub struct FloatCounter(Arc<AtomicU64>);

impl FloatCounter {
    pub fn add(&self, v: f64) {
        if v <= 0.0 || !v.is_finite() {
            return;
        }
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// (metric name, route) → counter. Bounded by the routes ever configured in this process.
type FloatRegistry = Mutex<Vec<(&'static str, String, FloatCounter)>>;

fn floats() -> &'static FloatRegistry {
    static REGISTRY: OnceLock<FloatRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

/// The same counter for the same (name, route), so that a reload keeps counting.
fn float_counter(name: &'static str, route: &str) -> FloatCounter {
    let mut reg = floats().lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, c)) = reg.iter().find(|(n, r, _)| *n == name && r == route) {
        return c.clone();
    }
    let c = FloatCounter::default();
    reg.push((name, route.to_string(), c.clone()));
    c
}

fn render_float_counters(out: &mut String) {
    let reg = floats().lock().unwrap_or_else(|e| e.into_inner());
    for name in [WASTED, SAVED] {
        let _ = writeln!(out, "# TYPE {name} counter");
        for (_, route, c) in reg.iter().filter(|(n, _, _)| *n == name) {
            let _ = writeln!(
                out,
                "{name}{{route=\"{}\"}} {}",
                escape_label(route),
                c.get()
            );
        }
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

// ---------------------------------------------------------------------------------------
// Per-route handles.

/// Every series of one route, registered at load. Indexing by enum discriminant keeps the
/// hot path free of label handling.
pub struct RouteMetrics {
    requests: [Counter; Outcome::ALL.len()],
    duration: [Histogram; Outcome::ALL.len()],
    pub upstream_duration: Histogram,
    pub inflight: Gauge,
    cancelled: [[Counter; Phase::ALL.len()]; CancelledBy::ALL.len()],
    pub propagation: Histogram,
    pub wasted: FloatCounter,
    pub saved: FloatCounter,
    pub discarded_bytes: Counter,
    pub protected_completed: Counter,
    pub estimator: Estimator,
}

impl RouteMetrics {
    pub fn register(route: &str) -> RouteMetrics {
        let route = route.to_string();
        let requests = Outcome::ALL.map(|o| {
            let c = counter!(REQUESTS, "route" => route.clone(), "outcome" => o.as_str());
            c.increment(0);
            c
        });
        let duration = Outcome::ALL.map(
            |o| histogram!(REQUEST_DURATION, "route" => route.clone(), "outcome" => o.as_str()),
        );
        let cancelled = CancelledBy::ALL.map(|by| {
            Phase::ALL.map(|p| {
                let c = counter!(UPSTREAM_CANCELLED, "route" => route.clone(),
                    "cancelled_by" => by.as_str(), "phase" => p.as_str());
                c.increment(0);
                c
            })
        });
        let inflight = gauge!(UPSTREAM_INFLIGHT, "route" => route.clone());
        inflight.increment(0.0);
        let discarded_bytes = counter!(DISCARDED_BYTES, "route" => route.clone());
        discarded_bytes.increment(0);
        let protected_completed = counter!(PROTECTED_COMPLETED, "route" => route.clone());
        protected_completed.increment(0);
        RouteMetrics {
            requests,
            duration,
            upstream_duration: histogram!(UPSTREAM_DURATION, "route" => route.clone()),
            inflight,
            cancelled,
            propagation: histogram!(CANCEL_PROPAGATION, "route" => route.clone()),
            wasted: float_counter(WASTED, &route),
            saved: float_counter(SAVED, &route),
            discarded_bytes,
            protected_completed,
            estimator: Estimator::default(),
        }
    }

    /// The metrics of requests that matched no route (`route=""`).
    pub fn unrouted() -> Arc<RouteMetrics> {
        static NO_ROUTE: OnceLock<Arc<RouteMetrics>> = OnceLock::new();
        NO_ROUTE
            .get_or_init(|| Arc::new(RouteMetrics::register("")))
            .clone()
    }

    pub fn request(&self, outcome: Outcome, duration: Duration) {
        self.requests[outcome as usize].increment(1);
        self.duration[outcome as usize].record(duration.as_secs_f64());
    }

    pub fn cancelled(&self, by: CancelledBy, phase: Phase) {
        self.cancelled[by as usize][phase as usize].increment(1);
    }
}

/// Per upstream endpoint, for pools.
pub struct EndpointMetrics {
    pub inflight: Gauge,
    pub ejections: Counter,
}

impl EndpointMetrics {
    pub fn register(upstream: &str, endpoint: &str) -> EndpointMetrics {
        let inflight = gauge!(ENDPOINT_INFLIGHT, "upstream" => upstream.to_string(),
            "endpoint" => endpoint.to_string());
        inflight.increment(0.0);
        let ejections = counter!(ENDPOINT_EJECTIONS, "upstream" => upstream.to_string(),
            "endpoint" => endpoint.to_string());
        ejections.increment(0);
        EndpointMetrics {
            inflight,
            ejections,
        }
    }
}

/// Per upstream admission queue.
pub struct QueueMetrics {
    pub length: Gauge,
    pub wait: Histogram,
}

impl QueueMetrics {
    pub fn register(upstream: &str) -> QueueMetrics {
        let length = gauge!(QUEUE_LENGTH, "upstream" => upstream.to_string());
        length.increment(0.0);
        QueueMetrics {
            length,
            wait: histogram!(QUEUE_WAIT, "upstream" => upstream.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The saved-work estimator.

/// How long a route's upstream calls typically take: the median of the last
/// [`Estimator::WINDOW`] completed calls.
///
/// Why a windowed median: upstream latency is skewed (a few very slow calls), and a mean or
/// EWMA is dragged up by that tail, overstating what aborting saved. The median of a recent
/// window is robust to the tail, follows a change of regime within a window's worth of
/// calls, and is usable from the first completed call, which seeds it. Recording is one
/// atomic increment and one store (lock-free, on every completed call); reading copies the
/// window and selects the middle (only on aborted calls).
pub struct Estimator {
    next: AtomicUsize,
    samples: [AtomicU64; Estimator::WINDOW],
}

impl Default for Estimator {
    fn default() -> Estimator {
        Estimator {
            next: AtomicUsize::new(0),
            samples: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Estimator {
    pub const WINDOW: usize = 64;

    pub fn record(&self, d: Duration) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % Self::WINDOW;
        self.samples[i].store(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// `None` until a call completed.
    pub fn typical(&self) -> Option<Duration> {
        let n = self.next.load(Ordering::Relaxed).min(Self::WINDOW);
        if n == 0 {
            return None;
        }
        let mut window = [0u64; Self::WINDOW];
        for (w, s) in window.iter_mut().zip(&self.samples).take(n) {
            *w = s.load(Ordering::Relaxed);
        }
        let window = &mut window[..n];
        let mid = n / 2;
        let (_, m, _) = window.select_nth_unstable(mid);
        Some(Duration::from_nanos(*m))
    }

    /// Upstream time that aborting a call after `spent` avoided: the typical duration capped
    /// by the route timeout, minus what was already spent, floored at zero. Before any call
    /// completed, the typical duration is taken to be the whole timeout (the most the call
    /// could have cost); with neither, nothing is claimed.
    pub fn saved(&self, spent: Duration, timeout: Option<Duration>) -> Duration {
        let typical = match (self.typical(), timeout) {
            (Some(t), Some(limit)) => t.min(limit),
            (Some(t), None) => t,
            (None, Some(limit)) => limit,
            (None, None) => return Duration::ZERO,
        };
        typical.saturating_sub(spent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimator_median_and_caps() {
        let e = Estimator::default();
        let t = Some(Duration::from_secs(3));
        assert_eq!(e.saved(Duration::from_secs(1), t), Duration::from_secs(2));
        assert_eq!(e.saved(Duration::ZERO, None), Duration::ZERO);
        e.record(Duration::from_millis(500));
        assert_eq!(e.typical(), Some(Duration::from_millis(500)));
        e.record(Duration::from_millis(100));
        e.record(Duration::from_secs(60));
        assert_eq!(e.typical(), Some(Duration::from_millis(500)));
        assert_eq!(
            e.saved(Duration::from_millis(200), t),
            Duration::from_millis(300)
        );
        assert_eq!(e.saved(Duration::from_secs(1), t), Duration::ZERO);
        for _ in 0..Estimator::WINDOW {
            e.record(Duration::from_secs(10));
        }
        assert_eq!(e.saved(Duration::ZERO, t), Duration::from_secs(3));
    }

    #[test]
    fn float_counter_adds() {
        let c = FloatCounter::default();
        c.add(0.25);
        c.add(0.5);
        c.add(-1.0);
        assert!((c.get() - 0.75).abs() < 1e-12);
    }
}
