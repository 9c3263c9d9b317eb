//! What recording the metrics costs a request, on the hot path (`cargo bench --bench
//! metrics_cost`).
//!
//! The guard in `src/outcome.rs` records every metric in its `Drop`. This bench repeats
//! exactly the operations that guard performs, with the same handles, for a completed and
//! for an aborted request, and reports nanoseconds per request:
//!
//! - completed: in-flight gauge up (when the call starts) and down, request counter and
//!   request-duration histogram, upstream-duration histogram, estimator record;
//! - aborted: in-flight gauge up and down, the cancelled counter, the wasted and saved
//!   float counters (the saved estimate reads the estimator's window), the propagation
//!   histogram, request counter and histogram.
//!
//! Each is timed twice: with handles registered before any recorder exists (the `metrics`
//! facade hands out no-op handles: the baseline, the cost of the guard's own arithmetic and
//! the estimator) and with cutoff's real Prometheus recorder installed. Histogram samples go
//! to a lock-free buffer that the exporter folds into buckets during upkeep (every 5 s in
//! the proxy) or a scrape; that folding is work too, so it is timed separately and reported
//! per sample. Finally one `/metrics` render with 50 routes registered.
//!
//! Only `std::time::Instant`: no bench framework, so it runs on stable with `harness = false`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutoff::metrics::{Exporter, RouteMetrics};
use cutoff::outcome::{CancelledBy, Outcome, Phase};

/// Requests per measured run.
const N: u64 = 1_000_000;
/// Histogram samples are folded into buckets between batches of this many requests, outside
/// the timed region, so that the sample buffer stays as small as in the proxy.
const BATCH: u64 = 50_000;
/// Requests per timed chunk: well under a scheduler time slice, so that on a busy machine
/// the fastest chunks still ran undisturbed.
const CHUNK: u64 = 10_000;
/// Runs per measurement.
const RUNS: usize = 3;

/// One completed request, as `InFlight::record` sees it.
#[inline(never)]
fn completed(m: &RouteMetrics, i: u64) {
    // `set_phase(Connecting)` when the call starts.
    m.inflight.increment(1.0);
    let took = Duration::from_nanos(80_000_000 + (i % 1024) * 37_000);
    m.upstream_duration.record(took.as_secs_f64());
    m.estimator.record(took);
    m.inflight.decrement(1.0);
    m.request(Outcome::Ok, took + Duration::from_micros(150));
}

/// One aborted request (the client left while the call awaited headers).
#[inline(never)]
fn aborted(m: &RouteMetrics, i: u64, timeout: Option<Duration>) {
    m.inflight.increment(1.0);
    let spent = Duration::from_nanos(20_000_000 + (i % 1024) * 11_000);
    m.cancelled(CancelledBy::Client, Phase::AwaitingHeaders);
    m.wasted.add(spent.as_secs_f64());
    m.saved.add(m.estimator.saved(spent, timeout).as_secs_f64());
    m.propagation.record(0.000_04);
    m.inflight.decrement(1.0);
    m.request(Outcome::ClientClosed, spent + Duration::from_micros(60));
}

/// Nanoseconds per request over many chunks: the fastest chunk (the cost on a quiet core)
/// and the median chunk (what a busy machine gives).
struct Timing {
    min: f64,
    median: f64,
    /// Folding histogram samples into buckets, per request (median over the upkeeps).
    upkeep: f64,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn fastest(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn measure(
    what: &str,
    exporter: Option<&Exporter>,
    mut one: impl FnMut(u64),
    samples_per_request: u32,
) -> Timing {
    // Warm-up: caches, the estimator's window, the first sample buffers.
    for i in 0..BATCH {
        one(i);
    }
    if let Some(e) = exporter {
        e.run_upkeep();
    }
    let mut chunks = Vec::new();
    let mut upkeeps = Vec::new();
    for _ in 0..RUNS {
        for batch in (0..N).step_by(BATCH as usize) {
            for c in (batch..batch + BATCH).step_by(CHUNK as usize) {
                let t = Instant::now();
                for j in c..c + CHUNK {
                    one(black_box(j));
                }
                chunks.push(t.elapsed().as_nanos() as f64 / CHUNK as f64);
            }
            if let Some(e) = exporter {
                let t = Instant::now();
                e.run_upkeep();
                upkeeps.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
            }
        }
    }
    let timing = Timing {
        min: fastest(&chunks),
        median: median(&mut chunks),
        upkeep: median(&mut upkeeps),
    };
    println!(
        "{what:<38} min {:>6.1}  median {:>6.1} ns/request  (+ {:.1} folding {samples_per_request} histogram samples)",
        timing.min, timing.median, timing.upkeep
    );
    timing
}

/// The same work on `threads` threads at once against one route: the atomics contend.
fn measure_contended(what: &str, m: &Arc<RouteMetrics>, exporter: &Exporter, threads: u64) {
    let per_thread = N / threads;
    let mut best = f64::INFINITY;
    for _ in 0..RUNS {
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let m = m.clone();
                s.spawn(move || {
                    for i in 0..per_thread {
                        let k = black_box(t * per_thread + i);
                        if k.is_multiple_of(4) {
                            aborted(&m, k, Some(Duration::from_secs(3)));
                        } else {
                            completed(&m, k);
                        }
                    }
                });
            }
        });
        // Wall time per request over all threads: throughput, not latency.
        best = best.min(start.elapsed().as_nanos() as f64 / (per_thread * threads) as f64);
        exporter.run_upkeep();
    }
    println!("{what:<38} best {best:>6.1} ns/request of wall time (3 completed : 1 aborted)");
}

/// Each primitive the guard uses, alone, with the real recorder: where the time goes.
fn breakdown(m: &RouteMetrics, exporter: &Exporter) {
    let time = |what: &str, f: &dyn Fn(u64)| {
        let mut chunks = Vec::new();
        for c in (0..N).step_by(CHUNK as usize) {
            let t = Instant::now();
            for i in c..c + CHUNK {
                f(black_box(i));
            }
            chunks.push(t.elapsed().as_nanos() as f64 / CHUNK as f64);
            if c % BATCH == 0 {
                exporter.run_upkeep();
            }
        }
        let min = fastest(&chunks);
        println!(
            "  {what:<36} min {min:>6.1}  median {:>6.1} ns",
            median(&mut chunks)
        );
    };
    println!("per operation, Prometheus recorder:");
    time("counter increment", &|_| m.discarded_bytes.increment(1));
    time("gauge increment + decrement", &|_| {
        m.inflight.increment(1.0);
        m.inflight.decrement(1.0);
    });
    time("histogram record", &|i| {
        m.propagation.record((i % 100) as f64 * 1e-6);
    });
    time("float counter add", &|i| {
        m.wasted.add((i % 7) as f64 * 1e-3)
    });
    time("estimator record", &|i| {
        m.estimator.record(Duration::from_micros(i % 1000));
    });
    time("estimator saved (median of 64)", &|i| {
        black_box(m.estimator.saved(Duration::from_micros(i % 1000), None));
    });
    time("Instant::now()", &|_| {
        black_box(Instant::now());
    });
    exporter.run_upkeep();
}

fn main() {
    println!(
        "cutoff metrics cost: {RUNS} runs of {N} requests, timed in chunks of {CHUNK}, {} build",
        if cfg!(debug_assertions) {
            "debug (numbers are meaningless: run `cargo bench`)"
        } else {
            "optimized"
        }
    );
    let timeout = Some(Duration::from_secs(3));

    // Registered before any recorder exists: every handle is a no-op.
    let noop = RouteMetrics::register("bench-noop");
    for i in 0..64 {
        noop.estimator.record(Duration::from_millis(80 + i));
    }

    let exporter = cutoff::metrics::install().expect("install the Prometheus recorder");
    let real = Arc::new(RouteMetrics::register("bench"));
    for i in 0..64 {
        real.estimator.record(Duration::from_millis(80 + i));
    }

    println!();
    let base_ok = measure(
        "completed, no-op recorder (baseline)",
        None,
        |i| completed(&noop, i),
        0,
    );
    let real_ok = measure(
        "completed, Prometheus recorder",
        Some(&exporter),
        |i| completed(&real, i),
        2,
    );
    let base_ab = measure(
        "aborted, no-op recorder (baseline)",
        None,
        |i| aborted(&noop, i, timeout),
        0,
    );
    let real_ab = measure(
        "aborted, Prometheus recorder",
        Some(&exporter),
        |i| aborted(&real, i, timeout),
        2,
    );
    println!();
    for (what, base, real) in [
        ("completed", &base_ok, &real_ok),
        ("aborted", &base_ab, &real_ab),
    ] {
        println!(
            "{what:<10} the recorder adds {:.1} ns/request (fastest chunks; {:.1} median); \
             {:.1} ns/request in all with upkeep (median), {:.1}x the no-op baseline",
            real.min - base.min,
            real.median - base.median,
            real.median + real.upkeep,
            real.min / base.min.max(0.1),
        );
    }
    // The verdict is on the fastest chunks (what the code costs on a core of its own); the
    // median shows what a busy machine makes of it.
    let worst = |t: &Timing, v: f64| v + t.upkeep;
    let quiet = worst(&real_ok, real_ok.min).max(worst(&real_ab, real_ab.min));
    let busy = worst(&real_ok, real_ok.median).max(worst(&real_ab, real_ab.median));
    println!(
        "goal: under 1000 ns/request, upkeep included: {} ({quiet:.1} ns/request at worst on \
         the fastest chunks; {busy:.1} on the median chunk)",
        if quiet < 1000.0 { "met" } else { "NOT met" }
    );

    println!();
    breakdown(&real, &exporter);

    println!();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
    measure_contended(
        &format!("mixed, {threads} threads, one route"),
        &real,
        &exporter,
        threads,
    );

    // One scrape with 50 routes, each with some traffic (the two above count too).
    let routes: Vec<RouteMetrics> = (0..48)
        .map(|i| RouteMetrics::register(&format!("route-{i:02}")))
        .collect();
    for (i, m) in routes.iter().enumerate() {
        for k in 0..100u64 {
            completed(m, k + i as u64);
            if k.is_multiple_of(10) {
                aborted(m, k, timeout);
            }
        }
    }
    exporter.run_upkeep();
    let mut renders = Vec::new();
    let mut bytes = 0;
    for _ in 0..21 {
        let t = Instant::now();
        let text = black_box(exporter.render());
        renders.push(t.elapsed().as_secs_f64() * 1e3);
        bytes = text.len();
    }
    let series = exporter
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    println!();
    println!(
        "/metrics render, 50 routes: min {:.2} ms, median {:.2} ms ({series} series, {} KiB)",
        fastest(&renders),
        median(&mut renders),
        bytes / 1024
    );
}
