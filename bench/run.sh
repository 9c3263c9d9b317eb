#!/usr/bin/env bash
# cutoff's benchmark suite, one command: bench/run.sh [--save]
#
# Builds cutoff and bench/loadgen, installs nginx, haproxy, wrk and valgrind if missing,
# and measures cutoff against nginx and HAProxy on 127.0.0.1 only: cancellation
# propagation, timeout precision, throughput (keep-alive, and one request per connection),
# bulk transfer, instructions per request (callgrind), memory per held request and a soak.
# Writes
# bench/results/latest.md (and prints it); --save also copies it to bench/RESULTS.md.
# Throughput and memory also measure `loadgen floor` ("hyper-floor"), a bare hyper
# forwarding loop: a baseline for what hyper alone costs, never an incumbent.
# See bench/README.md for what each number means.
#
# Knobs (environment): PROXIES="cutoff nginx haproxy"  SOAK_PROXIES="$PROXIES"
#   SOAK_N=100000  RSS_HELD=9000  WRK_SECONDS=5  TIMEOUT_N=1000  QUICK=1 (a smoke run:
#   few samples)
#   CUTOFF_BIN=path (skip `cargo build --release` and measure that binary)  KEEP=1 (keep
#   the temp dir with configs and logs)
#   SECTIONS="cancel timeout throughput close bulk instructions rss soak" (run only the
#   sections named)  IC_SECONDS=5 (each measured wrk run under callgrind)
#   RSS_UPLOAD_HELD=1000  RSS_DOWNLOAD_HELD=200  BULK_GIB=1
#   AWAKE=1 (the default; 0 turns it off): during the cancellation and timeout sections a
#   nice-19 busy loop keeps the proxy's core from halting between departures, so that
#   what is measured is the proxy, not how long an idle core of this VM takes to wake
#   (see bench/README.md)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
RESULTS="$HERE/results"
SAVE=0
[[ "${1:-}" == "--save" ]] && SAVE=1

PROXIES=${PROXIES:-"cutoff nginx haproxy"}
SOAK_PROXIES=${SOAK_PROXIES:-$PROXIES}
SOAK_N=${SOAK_N:-100000}
RSS_HELD=${RSS_HELD:-9000}
WRK_SECONDS=${WRK_SECONDS:-5}
IC_SECONDS=${IC_SECONDS:-5}
QUICK=${QUICK:-0}
SECTIONS=${SECTIONS:-"cancel timeout throughput close bulk instructions rss soak"}
RSS_UPLOAD_HELD=${RSS_UPLOAD_HELD:-1000}
RSS_DOWNLOAD_HELD=${RSS_DOWNLOAD_HELD:-200}
BULK_GIB=${BULK_GIB:-1}
AWAKE=${AWAKE:-1}
section() { [[ " $SECTIONS " == *" $1 "* ]]; }
HELDS="1 100 1000"
PHASES="headers body upload"
TIMEOUT_N=${TIMEOUT_N:-1000}
if [[ "$QUICK" == 1 ]]; then
  HELDS="1 100"; SOAK_N=5000; RSS_HELD=500; WRK_SECONDS=2; IC_SECONDS=2; TIMEOUT_N=100
  RSS_UPLOAD_HELD=100; RSS_DOWNLOAD_HELD=50
fi
SUITE_START=$(date +%s)

say() { printf '\n== %s\n' "$*"; }

# --- tools -------------------------------------------------------------------------------
need_apt=()
for t in nginx haproxy wrk valgrind; do command -v "$t" >/dev/null || need_apt+=("$t"); done
command -v taskset >/dev/null || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
  say "installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need_apt[@]}" >/dev/null ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq "${need_apt[@]}" >/dev/null; }
fi
# Any nginx or HAProxy service the packages run is left alone: every process measured
# here is started by this script, on ports it picked free.
ulimit -n "$(ulimit -Hn)"

# --- builds ------------------------------------------------------------------------------
if [[ -n "${CUTOFF_BIN:-}" ]]; then
  CUTOFF=$CUTOFF_BIN
else
  say "cargo build --release (cutoff)"
  (cd "$ROOT" && cargo build --release --quiet)
  CUTOFF="$ROOT/target/release/cutoff"
fi
say "building bench/loadgen"
CARGO_TARGET_DIR="$ROOT/target/bench-loadgen" cargo build --release --quiet \
  --manifest-path "$HERE/loadgen/Cargo.toml"
LG="$ROOT/target/bench-loadgen/release/loadgen"

# --- workspace, ports, configs -------------------------------------------------------------
WORK=$(mktemp -d /tmp/cutoff-bench.XXXXXX)
mkdir -p "$RESULTS" "$WORK/nginx/tmp" "$WORK/origin/tmp" "$WORK/www/w"
RES="$WORK/results.jsonl"
: >"$RES"
declare -A PID=()
declare -A PORT=()

cleanup() {
  awake_off
  for p in "${!PID[@]}"; do stop "$p"; done
  if [[ "${KEEP:-0}" == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

read -r UP_PORT ORIGIN_PORT PORT[cutoff] PORT[nginx] PORT[haproxy] ADMIN_PORT PORT[hyper-floor] \
  < <("$LG" ports 7)
UP="127.0.0.1:$UP_PORT"
# Where the hyper-floor baseline forwards everything (set before each start: the nginx
# origin for throughput, the loadgen upstream for memory).
FLOOR_UP=""

# a ~100-byte static body
printf 'cutoff bench: a small static body served by the nginx origin, about one hundred bytes long.\n' \
  >"$WORK/www/w/hello.txt"

cat >"$WORK/origin.conf" <<EOF
worker_processes 1;
daemon off;
user root;
pid $WORK/origin/nginx.pid;
error_log $WORK/origin/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/origin/tmp/body;
  proxy_temp_path $WORK/origin/tmp/proxy;
  fastcgi_temp_path $WORK/origin/tmp/fastcgi;
  uwsgi_temp_path $WORK/origin/tmp/uwsgi;
  scgi_temp_path $WORK/origin/tmp/scgi;
  server {
    listen 127.0.0.1:$ORIGIN_PORT backlog=4096;
    root $WORK/www;
    location / { default_type text/plain; }
  }
}
EOF

# Routes, the same in all three proxies:
#   /c/ → the loadgen upstream, 30 s   (cancel, rss, soak)
#   /t/ → the loadgen upstream, 200 ms (timeout)
#   /w/ → the nginx origin, 30 s       (wrk)
cat >"$WORK/cutoff.toml" <<EOF
[server]
listen = "127.0.0.1:${PORT[cutoff]}"
shutdown_grace = "500ms"
workers = 1
${CUTOFF_SERVER_EXTRA:-}

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[log]
format = "json"
level = "warn"

[upstreams.lg]
url = "http://$UP"

[upstreams.origin]
url = "http://127.0.0.1:$ORIGIN_PORT"

[[routes]]
name = "c"
path_prefix = "/c/"
upstream = "lg"
timeout = "30s"

[[routes]]
name = "t"
path_prefix = "/t/"
upstream = "lg"
timeout = "200ms"

[[routes]]
name = "w"
path_prefix = "/w/"
upstream = "origin"
timeout = "30s"
EOF

# nginx streams both ways on the loadgen routes (as cutoff does), takes bodies of any size
# (its default 1m limit would answer the 100 MB upload with 413 before the upstream sees
# it) and never retries a request that reached the upstream; /w/ keeps nginx's defaults.
cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
user root;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 19000; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  upstream lg { server $UP; keepalive 128; keepalive_requests 1000000; }
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 128; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  # The forwarding headers cutoff adds to every request (see the top-level README).
  proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
  proxy_set_header X-Forwarded-Proto \$scheme;
  proxy_set_header X-Forwarded-Host \$http_host;
  server {
    listen 127.0.0.1:${PORT[nginx]} backlog=4096;
    location /c/ {
      proxy_pass http://lg;
      proxy_read_timeout 30s;
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_next_upstream off;
      client_max_body_size 0;
    }
    location /t/ {
      proxy_pass http://lg;
      proxy_read_timeout 200ms;
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_next_upstream off;
    }
    location /w/ { proxy_pass http://origin; }
  }
}
EOF

# HAProxy: keep-alive to servers (http-server-close NOT set), abortonclose on.
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 9000

defaults
  mode http
  option abortonclose
  timeout connect 5s
  timeout client 30s
  timeout server 30s

frontend fe
  bind 127.0.0.1:${PORT[haproxy]}
  # The forwarding headers cutoff adds to every request (see the top-level README).
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  use_backend be_t if { path_beg /t/ }
  use_backend be_w if { path_beg /w/ }
  default_backend be_c

# http-no-delay on the streaming route: without it HAProxy sends a small chunk of an
# unfinished response with MSG_MORE and the kernel holds it ~200 ms (measured: the body
# phase's first chunk took 207 ms to reach the client), which would make the body-phase
# rounds 200 ms each. nginx and cutoff send such chunks at once.
backend be_c
  option http-no-delay
  server lg $UP

backend be_t
  timeout server 200ms
  server lg $UP

backend be_w
  server origin 127.0.0.1:$ORIGIN_PORT
EOF

"$CUTOFF" check --config "$WORK/cutoff.toml" >/dev/null
nginx -t -q -p "$WORK/nginx/" -e "$WORK/nginx/error.log" -c "$WORK/nginx.conf"
haproxy -c -q -f "$WORK/haproxy.cfg"

# --- processes -----------------------------------------------------------------------------
# The proxy's core kept busy at the lowest priority (AWAKE=1): the proxy preempts the loop
# as soon as it wakes, and the core never halts, whose wake-up on this VM takes longer
# than any proxy's cancellation (measured: every proxy's median 300 µs with it halting,
# 12-34 µs kept awake).
AWAKE_PID=""
awake_on() {
  [[ "$AWAKE" == 1 ]] || return 0
  taskset -c 1 nice -n 19 bash -c 'while :; do :; done' &
  AWAKE_PID=$!
}
awake_off() {
  [[ -n "$AWAKE_PID" ]] || return 0
  kill "$AWAKE_PID" 2>/dev/null || true
  wait "$AWAKE_PID" 2>/dev/null || true
  AWAKE_PID=""
}

lg() { taskset -c 0 "$LG" "$@"; }

# The command line of target $1 (into CMD): what `start` runs, and the callgrind runs too.
proxy_cmd() {
  case $1 in
    cutoff) CMD=("$CUTOFF" --config "$WORK/cutoff.toml") ;;
    nginx) CMD=(nginx -p "$WORK/nginx/" -e "$WORK/nginx/error.log" -c "$WORK/nginx.conf") ;;
    haproxy) CMD=(haproxy -db -f "$WORK/haproxy.cfg") ;;
    hyper-floor) CMD=("$LG" floor --listen "127.0.0.1:${PORT[hyper-floor]}" --upstream "$FLOOR_UP") ;;
    origin) CMD=(nginx -p "$WORK/origin/" -e "$WORK/origin/error.log" -c "$WORK/origin.conf") ;;
  esac
}

start() {
  local p=$1
  proxy_cmd "$p"
  case $p in
    cutoff) env -u RUST_LOG taskset -c 1 "${CMD[@]}" 2>>"$WORK/cutoff.log" & ;;
    nginx) taskset -c 1 "${CMD[@]}" 2>>"$WORK/nginx/stderr.log" & ;;
    haproxy) taskset -c 1 "${CMD[@]}" >>"$WORK/haproxy.log" 2>&1 & ;;
    hyper-floor) taskset -c 1 "${CMD[@]}" 2>>"$WORK/hyper-floor.log" & ;;
    origin) taskset -c 0 "${CMD[@]}" 2>>"$WORK/origin/stderr.log" & ;;
  esac
  PID[$p]=$!
  local port=${PORT[$p]:-$ORIGIN_PORT}
  if ! lg wait-port "127.0.0.1:$port" --timeout-ms 10000 >/dev/null 2>&1; then
    echo "$p did not start listening on $port" >&2
    return 1
  fi
}

stop() {
  local p=$1 pid=${PID[$1]:-}
  [[ -z "$pid" ]] && return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PID[$p]"
}

# The process whose memory and descriptors we read: nginx's one worker, else the process.
measured_pid() {
  local pid=${PID[$1]}
  if [[ $1 == nginx ]]; then
    for _ in $(seq 1 50); do
      local w; w=$(pgrep -P "$pid" | head -n1 || true)
      [[ -n "$w" ]] && { echo "$w"; return; }
      sleep 0.1
    done
  fi
  echo "$pid"
}

# A process's CPU time so far, user + system, in clock ticks (fields 14 and 15 of
# /proc/PID/stat; the command name before them is in parentheses and may hold spaces).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}'; }

json_str() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }
meta() { printf '{"bench":"meta","key":"%s","value":"%s"}\n' "$(json_str "$1")" "$(json_str "$2")" >>"$RES"; }
event() {
  printf '{"bench":"event","proxy":"%s","msg":"%s"}\n' "$(json_str "$1")" "$(json_str "$2")" >>"$RES"
  echo "  !! $1: $2"
}

# Runs loadgen, shows its human lines, keeps its RESULT line; a failure is an event, never
# the end of the suite.
record() {
  local who=$1; shift
  local out rc=0
  out=$(lg "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v '^RESULT ' | sed 's/^/  /' || true
  printf '%s\n' "$out" | sed -n 's/^RESULT //p' >>"$RES"
  ((rc == 0)) || event "$who" "loadgen $1 exited $rc: $(printf '%s' "$out" | tail -n1)"
}

# A proxy that died is an event (cutoff: with the panic, if any) and is started again.
check_alive() {
  local p=$1 what=$2
  if [[ -n "${PID[$p]:-}" ]] && ! kill -0 "${PID[$p]}" 2>/dev/null; then
    local why=""
    [[ $p == cutoff ]] && why=$(grep -m1 -i 'panick' "$WORK/cutoff.log" || true)
    event "$p" "process exited during $what ${why:+($why)}"
    unset "PID[$p]"
    start "$p" || true
  fi
}

# Sets ORDERED to the proxy list (or the list given) rotated one further each call, so
# that no proxy always runs first (no subshell: ROT must survive).
ROT=0
ORDERED=()
rotate() {
  local arr=(${1:-$PROXIES}) n i
  n=${#arr[@]}
  ORDERED=()
  for ((i = 0; i < n; i++)); do ORDERED+=("${arr[$(((i + ROT) % n))]}"); done
  ROT=$((ROT + 1))
}

meta "date" "$(date -u '+%Y-%m-%d %H:%M UTC')"
meta "machine" "$(nproc) cores, $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
meta "cutoff" "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (+ uncommitted changes to src/)')"
meta "nginx" "$(nginx -v 2>&1 | sed 's/.*version: //')"
meta "haproxy" "$(haproxy -v | head -n1 | awk '{print $3}')"
meta "wrk" "$(wrk -v 2>&1 | head -n1 | awk '{print $2}')"
meta "pinning" "proxy under test on core 1; loadgen, wrk and the nginx origin on core 0"
if [[ "$AWAKE" == 1 ]]; then
  meta "proxy's core during cancellation and timeout" "kept awake (a nice-19 busy loop on core 1)"
else
  meta "proxy's core during cancellation and timeout" "left to halt when idle (AWAKE=0)"
fi
meta "load average at start" "$(cut -d' ' -f1-3 /proc/loadavg)"

# --- A: cancellation, timeout, throughput (all proxies up, idle when not under test) -------
start origin
for p in $PROXIES; do start "$p"; done

if section cancel || section timeout; then awake_on; fi
if section cancel; then
  say "cancellation propagation (departures by FIN, spaced 1 ms; bound 2 s)"
  for phase in $PHASES; do
    for held in $HELDS; do
      if ((held == 1)); then rounds=500; else rounds=$(((500 + held - 1) / held)); fi
      [[ "$QUICK" == 1 ]] && rounds=$(((rounds + 9) / 10))
      rotate
      for p in "${ORDERED[@]}"; do
        record "$p" cancel --proxy "127.0.0.1:${PORT[$p]}" --upstream "$UP" --held "$held" \
          --rounds "$rounds" --phase "$phase" --close fin --bound-ms 2000 --budget-s 15 --label "$p"
        check_alive "$p" "cancel $phase held=$held"
      done
    done
  done

  # The same upload run once more, but departures start only after 300 ms of quiet: set
  # against the row above, it separates cancellation latency from the cost of the proxy
  # still forwarding the 100 × 64 KiB of uploads when the first clients leave.
  if [[ " $HELDS " == *" 100 "* ]]; then
    rotate
    for p in "${ORDERED[@]}"; do
      record "$p" cancel --proxy "127.0.0.1:${PORT[$p]}" --upstream "$UP" --held 100 --rounds 5 \
        --phase upload --settle-ms 300 --close fin --bound-ms 2000 --budget-s 15 --label "$p"
      check_alive "$p" "cancel upload held=100 settled"
    done
  fi
fi

if section timeout; then
  say "timeout precision (200 ms route timeout)"
  rotate
  for p in "${ORDERED[@]}"; do
    record "$p" timeout --proxy "127.0.0.1:${PORT[$p]}" --upstream "$UP" --n "$TIMEOUT_N" --concurrency 50 \
      --timeout-ms 200 --label "$p"
    check_alive "$p" "timeout"
  done
fi
awake_off

if [[ -n "${PID[cutoff]:-}" ]]; then
  curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" >"$WORK/cutoff-metrics-after-cancel.txt" || true
fi

# Two interleaved wrk passes over the targets ($1: keepalive or close), direct first and
# last; each target's own CPU time is read around its measured pass.
wrk_passes() {
  local mode=$1 targets=$2 target port url out res cpu cpu_pid t0 t1
  local hdr=()
  [[ $mode == close ]] && hdr=(-H 'Connection: close')
  rotate "$targets"; local first=("${ORDERED[@]}")
  rotate "$targets"; local second=("${ORDERED[@]}")
  for target in direct "${first[@]}" "${second[@]}" direct; do
    if [[ $target == direct ]]; then port=$ORIGIN_PORT; else port=${PORT[$target]}; fi
    url="http://127.0.0.1:$port/w/hello.txt"
    taskset -c 0 wrk -t1 -c64 -d1s "${hdr[@]}" "$url" >/dev/null 2>&1 || true
    cpu=()
    if [[ $target != direct ]]; then cpu_pid=$(measured_pid "$target"); t0=$(cpu_ticks "$cpu_pid"); fi
    out=$(taskset -c 0 wrk -t1 -c64 -d"${WRK_SECONDS}s" --latency "${hdr[@]}" "$url" 2>&1) || true
    if [[ $target != direct ]]; then
      t1=$(cpu_ticks "$cpu_pid")
      [[ -n "$t0" && -n "$t1" ]] && cpu=(--cpu-ticks "$((t1 - t0))" --hz "$(getconf CLK_TCK)")
    fi
    printf '%s\n' "$out" >>"$WORK/wrk-$mode-$target.txt"
    res=$(printf '%s\n' "$out" | "$LG" wrk-parse --label "$target" --mode "$mode" "${cpu[@]}" 2>&1) ||
      event "$target" "wrk ($mode) failed: $(printf '%s' "$out" | tail -n1)"
    printf '%s\n' "$res" | grep -v '^RESULT ' | sed 's/^/  /' || true
    printf '%s\n' "$res" | sed -n 's/^RESULT //p' >>"$RES"
    if [[ $target != direct ]]; then check_alive "$target" "wrk $mode"; fi
  done
}

if section throughput; then
  say "throughput: wrk -t1 -c64 -d${WRK_SECONDS}s, 2 interleaved passes (1 s warm-up each)"
  # The hyper-floor baseline runs in the passes like a proxy, forwarding /w/hello.txt
  # unchanged to the origin (which serves it at that path, as for direct).
  WRK_TARGETS=$PROXIES
  FLOOR_UP="127.0.0.1:$ORIGIN_PORT"
  if start hyper-floor; then
    WRK_TARGETS="$PROXIES hyper-floor"
  else
    event hyper-floor "did not start for wrk"
  fi
  wrk_passes keepalive "$WRK_TARGETS"
  stop hyper-floor
fi

# The same with a new connection for every request (`Connection: close`), as health checks,
# scripts and clients without keep-alive make them: what accepting, setting up and tearing
# down a client connection costs. hyper-floor is left out: it opens an upstream connection
# per client connection, so it would measure something else.
if section close; then
  say "throughput, one request per connection: wrk -H 'Connection: close', 2 interleaved passes"
  wrk_passes close "$PROXIES"
fi

if section bulk; then
  say "bulk transfer: $BULK_GIB GiB up, then down, through each (and direct)"
  record direct bulk --proxy "$UP" --upstream "$UP" --gib "$BULK_GIB" --label direct
  rotate
  for p in "${ORDERED[@]}"; do
    record "$p" bulk --proxy "127.0.0.1:${PORT[$p]}" --upstream "$UP" \
      --pid "$(measured_pid "$p")" --gib "$BULK_GIB" --label "$p"
    check_alive "$p" "bulk"
  done
fi

for p in $PROXIES; do stop "$p"; done

# --- instructions: userland work per request, counted by callgrind (no clock involved) -----
# Each target runs once more under valgrind's callgrind, counting nothing until the load
# starts: wrk -c64 (keep-alive, then one request per connection) through it to the origin,
# and instructions ÷ requests served. Unlike CPU time this does not move with the rest of
# the machine (three runs agree within 0.5 %), so it shows what a change to the code costs
# or saves where CPU time is lost in noise. It counts the process's user-space instructions
# only: the kernel's work (the system calls, which are alike, see bench/README.md) is not
# in it, nor how fast each instruction runs.
# $1: the target; sets IC_PID.
ic_start() {
  local p=$1
  proxy_cmd "$p"
  # nginx's one worker is the process itself, so that valgrind sees it.
  [[ $p == nginx ]] && CMD+=(-g 'master_process off;')
  env -u RUST_LOG taskset -c 1 valgrind --tool=callgrind --instr-atstart=no \
    "--callgrind-out-file=$WORK/cg-$p.%p" "${CMD[@]}" >>"$WORK/callgrind-$p.log" 2>&1 &
  IC_PID=$!
  lg wait-port "127.0.0.1:${PORT[$p]}" --timeout-ms 60000 >/dev/null 2>&1
}

# One measured wrk run against target $1 in mode $2 (its valgrind is $IC_PID); the counts
# go to the dump numbered $3.
ic_measure() {
  local p=$1 mode=$2 n=$3 out reqs ins
  local hdr=()
  [[ $mode == close ]] && hdr=(-H 'Connection: close')
  local url="http://127.0.0.1:${PORT[$p]}/w/hello.txt"
  callgrind_control -i on "$IC_PID" >/dev/null
  out=$(taskset -c 0 wrk -t1 -c64 -d"${IC_SECONDS}s" "${hdr[@]}" "$url" 2>&1) || true
  callgrind_control -i off "$IC_PID" >/dev/null
  callgrind_control -d "$IC_PID" >/dev/null
  reqs=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
  ins=$(awk '/^totals:/ {print $2; exit}' "$WORK/cg-$p.$IC_PID.$n" 2>/dev/null || true)
  if [[ -z "$reqs" || -z "$ins" || "$reqs" == 0 ]] || printf '%s' "$out" | grep -q 'Non-2xx'; then
    event "$p" "callgrind ($mode): no clean count ($(printf '%s' "$out" | grep -m1 'Non-2xx\|requests in' || echo 'no output'))"
    return 0
  fi
  if printf '%s' "$out" | grep -q 'Socket errors'; then
    event "$p" "callgrind ($mode): wrk $(printf '%s' "$out" | grep -m1 'Socket errors' | sed 's/^ *//')"
  fi
  printf '{"bench":"instructions","proxy":"%s","mode":"%s","requests":%s,"instructions":%s}\n' \
    "$p" "$mode" "$reqs" "$ins" >>"$RES"
  echo "  $p ($mode): $((ins / reqs)) instructions per request over $reqs requests"
}

if section instructions; then
  if command -v valgrind >/dev/null && command -v callgrind_control >/dev/null; then
    say "instructions per request (callgrind, wrk -t1 -c64 -d${IC_SECONDS}s through each)"
    # hyper-floor forwards /w/hello.txt to the origin, as in the throughput passes.
    FLOOR_UP="127.0.0.1:$ORIGIN_PORT"
    rotate "$PROXIES hyper-floor"
    for p in "${ORDERED[@]}"; do
      if ! ic_start "$p"; then
        event "$p" "did not start under valgrind"
      else
        # A warm-up outside the count: the pool filled, the code paths paged in.
        taskset -c 0 wrk -t1 -c64 -d2s "http://127.0.0.1:${PORT[$p]}/w/hello.txt" >/dev/null 2>&1 || true
        ic_measure "$p" keepalive 1
        # hyper-floor opens an upstream connection per client connection (see `close`).
        [[ $p != hyper-floor ]] && ic_measure "$p" close 2
      fi
      kill -TERM "$IC_PID" 2>/dev/null || true
      wait "$IC_PID" 2>/dev/null || true
    done
  else
    event callgrind "valgrind not installed: instructions section skipped"
  fi
fi

# --- B: memory per held request (a fresh process each) --------------------------------------
# One rss round: each proxy and hyper-floor in a fresh process, holding $1 requests;
# $2 names the round in events, the rest goes to `loadgen rss`.
rss_round() {
  local held=$1 what=$2
  shift 2
  rotate "$PROXIES hyper-floor"
  for p in "${ORDERED[@]}"; do
    start "$p" || { event "$p" "did not start for $what"; continue; }
    record "$p" rss --proxy "127.0.0.1:${PORT[$p]}" --upstream "$UP" --pid "$(measured_pid "$p")" \
      --held "$held" "$@" --label "$p"
    check_alive "$p" "$what"
    stop "$p"
  done
}

if section rss; then
  # hyper-floor (the baseline) forwards the /c/ requests unchanged to the loadgen upstream.
  FLOOR_UP=$UP
  say "memory per held request ($RSS_HELD held)"
  rss_round "$RSS_HELD" "rss"
  # The same with a body in each direction: requests held after a 64 KiB upload, and
  # downloads whose clients read nothing (what a proxy keeps for a slow client).
  say "memory per held request after a 64 KiB upload ($RSS_UPLOAD_HELD held)"
  rss_round "$RSS_UPLOAD_HELD" "rss (upload)" --upload 65536
  say "memory per stalled download ($RSS_DOWNLOAD_HELD held)"
  rss_round "$RSS_DOWNLOAD_HELD" "rss (download)" --download 1
fi

# --- C: soak (a fresh process each) -----------------------------------------------------------
if section soak; then
  say "soak: $SOAK_N requests, 64 at a time, half abandoned mid-wait"
  for p in $SOAK_PROXIES; do
    start "$p" || { event "$p" "did not start for soak"; continue; }
    record "$p" soak --proxy "127.0.0.1:${PORT[$p]}" --upstream "$UP" --pid "$(measured_pid "$p")" \
      --n "$SOAK_N" --concurrency 64 --delay-ms 10 --budget-s 60 --label "$p"
    check_alive "$p" "soak"
    stop "$p"
  done
fi
stop origin

# --- report -------------------------------------------------------------------------------------
if grep -qi 'panick' "$WORK/cutoff.log" 2>/dev/null; then
  event cutoff "panic in the log: $(grep -m1 -i 'panick' "$WORK/cutoff.log")"
fi
# What cutoff logged at WARN or above (its access log is INFO, so with level = "warn" only
# timeouts — expected, 100 from the timeout run — and anything unexpected show up here).
if [[ -s "$WORK/cutoff.log" ]]; then
  grep -o '"level":"\(WARN\|ERROR\)","message":"[^"]*"' "$WORK/cutoff.log" |
    sed 's/"level":"\([A-Z]*\)","message":"\(.*\)"/\1 \2/' | sort | uniq -c |
    while read -r n level msg; do
      event cutoff "logged $n × $level \"$msg\" (bench/results/logs/cutoff.log)"
    done
fi
meta "suite duration" "$(($(date +%s) - SUITE_START)) s"
meta "load average at end" "$(cut -d' ' -f1-3 /proc/loadavg)"

{
  echo "# cutoff benchmarks"
  echo
  echo "Produced by \`bench/run.sh\`; how to read it: \`bench/README.md\`."
  echo
  "$LG" report "$RES"
  if [[ -s "$WORK/cutoff-metrics-after-cancel.txt" ]]; then
    echo "## cutoff's own counters after the cancellation and timeout runs"
    echo
    echo '```'
    grep -E '^cutoff_(upstream_cancelled_total|requests_total)\{' "$WORK/cutoff-metrics-after-cancel.txt" |
      grep -v ' 0$' || true
    echo '```'
  fi
} >"$RESULTS/latest.md"
mkdir -p "$RESULTS/logs"
cp "$RES" "$RESULTS/latest.jsonl"
cp "$WORK"/cutoff.log "$WORK"/haproxy.log "$WORK"/wrk-*.txt "$RESULTS/logs/" 2>/dev/null || true
cp "$WORK/nginx/error.log" "$RESULTS/logs/nginx-error.log" 2>/dev/null || true

say "results (bench/results/latest.md)"
cat "$RESULTS/latest.md"
if ((SAVE)); then
  cp "$RESULTS/latest.md" "$HERE/RESULTS.md"
  echo "saved to bench/RESULTS.md"
fi
