#!/usr/bin/env bash
# The core cancellation benchmark on its own, cutoff only:
#
#   bench/cancel-latency.sh [HELD] [ROUNDS]     (default: 500 held at once, 2 rounds)
#
# Holds HELD requests in flight through cutoff (the upstream, bench/loadgen's recording
# server, never answers), then closes the clients one by one (FIN) and prints, over all
# departures, the latency from each client's close to the moment the upstream saw its
# connection closed: p50, p99, max, and the share cancelled at all. Loopback only.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HELD=${1:-500}
ROUNDS=${2:-2}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# CUTOFF_BIN=path measures that binary instead of building this tree's.
if [[ -z "${CUTOFF_BIN:-}" ]]; then
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
fi
CUTOFF=${CUTOFF_BIN:-$ROOT/target/release/cutoff}
CARGO_TARGET_DIR="$ROOT/target/bench-loadgen" cargo build --release --quiet \
  --manifest-path "$HERE/loadgen/Cargo.toml"
LG="$ROOT/target/bench-loadgen/release/loadgen"

WORK=$(mktemp -d /tmp/cutoff-cancel.XXXXXX)
read -r UP_PORT PROXY_PORT < <("$LG" ports 2)
cat >"$WORK/cutoff.toml" <<EOF
[server]
listen = "127.0.0.1:$PROXY_PORT"
workers = 1
[log]
level = "warn"
[upstreams.up]
url = "http://127.0.0.1:$UP_PORT"
[[routes]]
name = "c"
path_prefix = "/c/"
upstream = "up"
timeout = "30s"
EOF
taskset -c 1 "$CUTOFF" --config "$WORK/cutoff.toml" 2>"$WORK/cutoff.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$LG" wait-port "127.0.0.1:$PROXY_PORT" --timeout-ms 10000 >/dev/null
for phase in headers body upload; do
  taskset -c 0 "$LG" cancel --proxy "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$UP_PORT" \
    --held "$HELD" --rounds "$ROUNDS" --phase "$phase" --close fin --bound-ms 2000 \
    --budget-s 60 --label cutoff | grep -v '^RESULT '
done
