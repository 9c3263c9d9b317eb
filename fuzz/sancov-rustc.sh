#!/usr/bin/env bash
# RUSTC_WRAPPER for fuzzing on the stable toolchain: adds libFuzzer's coverage
# instrumentation (SanitizerCoverage) to cutoff's own crate and the fuzz targets only, so
# the fuzzer is guided by coverage of the code under test while dependencies build as usual.
rustc="$1"; shift
case " $* " in
  *" --crate-name cutoff "*|*" --crate-name config "*|*" --crate-name request "*)
    exec "$rustc" "$@" --cfg fuzzing \
      -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares \
      -Cdebug-assertions -Coverflow-checks ;;
  *) exec "$rustc" "$@" ;;
esac
