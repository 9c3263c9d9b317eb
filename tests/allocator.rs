//! The binary's allocator starts with cutoff's own options (`src/main.rs` says why and
//! what they save). jemalloc reads them from a symbol whose name depends on the crate's
//! symbol prefix: a wrong name is no error, the options are silently not applied, so this
//! asks jemalloc itself what it runs with, and checks what the options are for: memory
//! that a burst took goes back to the system once the proxy is idle.

#![cfg(feature = "jemalloc")]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs the binary with `_RJEM_MALLOC_CONF=env` and checks that jemalloc, printing its
/// options at exit, reports `line`.
fn assert_reports(env: &str, line: &str) {
    let out = Command::new(BIN)
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", env)
        .output()
        .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    assert!(out.status.success(), "{BIN} --version failed: {out:?}");
    let opts = String::from_utf8_lossy(&out.stderr);
    assert!(
        opts.contains(line),
        "with _RJEM_MALLOC_CONF={env}, no {line:?}; jemalloc reported:\n{opts}"
    );
}

#[test]
fn jemalloc_runs_with_cutoffs_options() {
    for line in [
        "opt.background_thread: true",
        "opt.tcache_gc_incr_bytes: 4194304",
    ] {
        assert_reports("stats_print:true", line);
    }
}

#[test]
fn the_environment_still_overrides_them() {
    assert_reports(
        "stats_print:true,tcache_gc_incr_bytes:65536",
        "opt.tcache_gc_incr_bytes: 65536",
    );
}

/// A burst of held requests, then all of them gone: the memory they took goes back to the
/// system within jemalloc's decay time (10 s), though nothing more happens in the proxy.
/// Without jemalloc's background thread the decay only advances when the proxy allocates
/// or frees, so an idle proxy kept a burst's memory: 160 MiB after 9 000 held requests
/// stayed at 141–160 MiB over 25 s (release build, 2026-12-08), against 15 MiB within
/// 10 s with the thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursts_memory_goes_back_once_idle() {
    const N: usize = 400;
    const SENT: usize = 64 * 1024;
    /// How much a burst of N held uploads must take at least, for the test to mean
    /// anything (about 11 MiB in the debug build the tests run).
    const BURST_AT_LEAST_KIB: u64 = 4 * 1024;
    let (up, proxy) = burst_pair().await;
    let base = rss_baseline(&proxy).await;

    let clients = hold_uploads(&proxy, &up, "burst", N, SENT).await;
    let peak = proxy.rss_kib();
    let burst = peak.saturating_sub(base);
    assert!(
        burst >= BURST_AT_LEAST_KIB,
        "{N} held uploads took only {burst} KiB ({base} → {peak} KiB): nothing to give back"
    );

    drop(clients);
    // Every call closed at the upstream: the proxy has dropped them all.
    up.wait_for("every call closed", WAIT * 2, |records| {
        records
            .iter()
            .filter(|r| r.path.starts_with("/sink/burst-") && r.closed.is_some())
            .count()
            == N
    })
    .await;
    let goal = base + burst / 2;
    poll_until(
        Duration::from_secs(40),
        &format!("the proxy's memory to fall from {peak} KiB to {goal} KiB or less (base {base})"),
        || proxy.rss_kib() <= goal,
    )
    .await;
    let back = proxy.rss_kib();
    eprintln!("RSS {base} → {peak} → {back} KiB");
}
