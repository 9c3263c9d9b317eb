//! The binary's allocator starts with cutoff's own options (`src/main.rs` says why and
//! what they save). jemalloc reads them from a symbol whose name depends on the crate's
//! symbol prefix: a wrong name is no error, the options are silently not applied, so this
//! asks jemalloc itself what it runs with.

#![cfg(feature = "jemalloc")]

mod common;

use std::process::Command;

use common::BIN;

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
    assert_reports("stats_print:true", "opt.tcache_gc_incr_bytes: 4194304");
}

#[test]
fn the_environment_still_overrides_them() {
    assert_reports(
        "stats_print:true,tcache_gc_incr_bytes:65536",
        "opt.tcache_gc_incr_bytes: 65536",
    );
}
