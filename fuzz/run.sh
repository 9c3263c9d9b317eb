#!/usr/bin/env bash
# Runs cutoff's fuzz targets (libFuzzer via libfuzzer-sys) on the stable toolchain.
#
#   fuzz/run.sh            20 s per target (what CI runs)
#   fuzz/run.sh 3600       an hour per target
#   fuzz/run.sh 600 request
#
# Coverage instrumentation is added to cutoff's own code by sancov-rustc.sh. Findings
# (crashes, timeouts) land in fuzz/artifacts/TARGET/ and make this script fail; the
# growing corpus is kept in fuzz/corpus/TARGET/ (git-ignored), seeded from fuzz/seeds/.
# With cargo-fuzz installed, `cargo fuzz run -s none config` works on the same targets.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
targets="${2:-config request}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/../target/fuzz}"
export RUSTC_WRAPPER="$PWD/sancov-rustc.sh"
# Same dependency versions as the main crate.
cp ../Cargo.lock Cargo.lock
cargo build --quiet --bins
status=0
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== fuzzing $t for ${secs}s"
  if ! "$CARGO_TARGET_DIR/debug/$t" "corpus/$t" "seeds/$t" \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>"corpus/$t.log"; then
    tail -40 "corpus/$t.log"
    status=1
  else
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done)" "corpus/$t.log" || tail -3 "corpus/$t.log"
  fi
done
exit $status
