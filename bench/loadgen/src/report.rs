//! `wrk-parse` (wrk's text → a RESULT line) and `report` (RESULT lines → markdown).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Read;

use serde_json::{Value, json};

use crate::{Args, emit};

/// The proxies under test, in the order tables list them; `cutoff` is the candidate and
/// the others are the incumbents it is compared with, except the two baselines: `direct`
/// (no proxy) and `hyper-floor` (`loadgen floor`, the bare hyper forwarding loop).
const ORDER: &[&str] = &["direct", FLOOR, "cutoff", "nginx", "haproxy"];
const CANDIDATE: &str = "cutoff";
const FLOOR: &str = "hyper-floor";

pub fn wrk_parse(args: &Args) -> Result<(), String> {
    let label = args.str("label", "proxy");
    // `keepalive` (wrk's default) or `close` (a new connection for every request).
    let mode = args.str("mode", "keepalive");
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    let mut v = json!({"bench": "wrk", "proxy": label, "mode": mode});
    let mut socket_errors = 0u64;
    for line in text.lines() {
        let l = line.trim();
        let words: Vec<&str> = l.split_whitespace().collect();
        if let Some(rest) = l.strip_prefix("Requests/sec:") {
            v["rps"] = json!(rest.trim().parse::<f64>().unwrap_or(0.0));
        } else if words.len() == 2 && ["50%", "75%", "90%", "99%"].contains(&words[0]) {
            let key = format!("p{}_us", words[0].trim_end_matches('%'));
            v[key] = json!(duration_us(words[1]));
        } else if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            v["non2xx"] = json!(rest.trim().parse::<u64>().unwrap_or(0));
        } else if let Some(rest) = l.strip_prefix("Socket errors:") {
            socket_errors = rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if l.contains("requests in") {
            v["requests"] = json!(
                words
                    .first()
                    .and_then(|w| w.parse::<u64>().ok())
                    .unwrap_or(0)
            );
        }
    }
    v["socket_errors"] = json!(socket_errors);
    if v.get("rps").is_none() {
        return Err("no Requests/sec line in wrk's output".into());
    }
    // The proxy's own CPU time over the run (user + system, in clock ticks, from
    // /proc/PID/stat), per request served: what "per core" means, and much steadier than
    // req/s on a machine whose neighbours come and go.
    if let (Some(ticks), Some(hz)) = (args.flags.get("cpu-ticks"), args.flags.get("hz")) {
        let ticks: f64 = ticks.parse().map_err(|_| "--cpu-ticks: bad number")?;
        let hz: f64 = hz.parse().map_err(|_| "--hz: bad number")?;
        let requests = v["requests"].as_u64().unwrap_or(0);
        if requests > 0 && hz > 0.0 {
            v["cpu_us_per_req"] = json!(ticks / hz * 1e6 / requests as f64);
        }
    }
    println!(
        "wrk {label}: {} req/s, p50 {} µs, p99 {} µs, non-2xx {}, socket errors {socket_errors}{}",
        v["rps"],
        v["p50_us"],
        v["p99_us"],
        v.get("non2xx").unwrap_or(&json!(0)),
        f(&v["cpu_us_per_req"]).map_or(String::new(), |c| format!(", CPU {c:.1} µs/request"))
    );
    emit(v);
    Ok(())
}

/// `620.23us`, `1.20ms`, `2.00s`, `1.00m` → microseconds.
fn duration_us(s: &str) -> f64 {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().map(|x| x * mult).unwrap_or(f64::NAN)
}

pub fn render(args: &Args) -> Result<(), String> {
    let path = args.positional.first().ok_or("report FILE.jsonl")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of = |bench: &str| -> Vec<&Value> { rows.iter().filter(|r| r["bench"] == bench).collect() };
    let mut out = String::new();

    let meta = of("meta");
    if !meta.is_empty() {
        out.push_str("| run | |\n|---|---|\n");
        for m in meta {
            let _ = writeln!(out, "| {} | {} |", s(&m["key"]), s(&m["value"]));
        }
        out.push('\n');
    }

    cancel_table(&mut out, &of("cancel"));
    timeout_table(&mut out, &of("timeout"));
    let wrk = of("wrk");
    let (close, keepalive): (Vec<&Value>, Vec<&Value>) =
        wrk.into_iter().partition(|r| r["mode"] == "close");
    wrk_table(&mut out, &keepalive, WrkMode::KeepAlive);
    wrk_table(&mut out, &close, WrkMode::Close);
    instructions_table(&mut out, &of("instructions"));
    let rss = of("rss");
    // Runs before `kind` existed held bodiless requests.
    let kind_of = |r: &Value| r["kind"].as_str().unwrap_or("bodiless").to_string();
    let mut kinds: Vec<String> = Vec::new();
    for r in &rss {
        let k = kind_of(r);
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    for k in &kinds {
        let rows: Vec<&Value> = rss.iter().copied().filter(|r| kind_of(r) == *k).collect();
        rss_table(&mut out, &rows, k);
    }
    bulk_table(&mut out, &of("bulk"));
    soak_table(&mut out, &of("soak"));

    let events = of("event");
    if !events.is_empty() {
        out.push_str("## Events during the run\n\n");
        for e in events {
            let _ = writeln!(out, "- **{}**: {}", s(&e["proxy"]), s(&e["msg"]));
        }
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn num0(v: &Value) -> String {
    f(v).map_or("—".into(), |x| format!("{x:.0}"))
}

fn ms1(v: &Value) -> String {
    f(v).map_or("—".into(), |x| format!("{:.2}", x / 1000.0))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn rank(proxy: &str) -> usize {
    ORDER
        .iter()
        .position(|p| *p == proxy)
        .unwrap_or(ORDER.len())
}

fn sorted(mut v: Vec<&Value>) -> Vec<&Value> {
    v.sort_by_key(|r| rank(r["proxy"].as_str().unwrap_or("")));
    v
}

fn incumbents<'a>(rows: &[&'a Value]) -> Vec<&'a Value> {
    rows.iter()
        .copied()
        .filter(|r| r["proxy"] != CANDIDATE && r["proxy"] != "direct" && r["proxy"] != FLOOR)
        .collect()
}

/// A line under a table: cutoff's `key` ÷ hyper-floor's, when both rows are present.
fn floor_note(out: &mut String, rows: &[&Value], key: &str, unit: &str) {
    let of = |who: &str| {
        rows.iter()
            .find(|r| r["proxy"] == who)
            .and_then(|r| f(&r[key]))
    };
    if let (Some(c), Some(fl)) = (of(CANDIDATE), of(FLOOR))
        && fl > 0.0
    {
        let _ = writeln!(
            out,
            "\n{CANDIDATE} ÷ {FLOOR}: {} {unit}",
            ratio(Some(c), Some(fl))
        );
    }
}

fn cancel_table(out: &mut String, rows: &[&Value]) {
    if rows.is_empty() {
        return;
    }
    out.push_str("## Cancellation propagation (client leaves → upstream connection closed)\n\n");
    out.push_str(
        "Latency is t1 − t0: t0 just before the client's departing syscall, t1 when the \
         upstream sees the proxy's FIN/RST. \"cancelled\" is the share of departed clients whose \
         upstream call was closed within the bound; the rest were never cancelled. Ratios: \
         cutoff ÷ the best incumbent at that percentile, among the incumbents that cancelled \
         the largest share (named in brackets); below 1× is better. — means no incumbent \
         cancelled anything there. \"time to phase\" is the median time from connect until \
         the request was in its phase (body: the first chunk reached the client).\n\n",
    );
    out.push_str("| phase | held | proxy | departures | cancelled | p50 µs | p99 µs | max µs | p50 vs best | p99 vs best | time to phase p50 ms | notes |\n");
    out.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let phases = ["headers", "body", "upload"];
    let helds: BTreeSet<u64> = rows.iter().filter_map(|r| r["held"].as_u64()).collect();
    let settles: BTreeSet<u64> = rows
        .iter()
        .map(|r| r["settle_ms"].as_u64().unwrap_or(0))
        .collect();
    for (phase, settle) in phases
        .iter()
        .flat_map(|p| settles.iter().map(move |s| (*p, *s)))
    {
        for &held in &helds {
            let group: Vec<&Value> = rows
                .iter()
                .copied()
                .filter(|r| {
                    r["phase"] == phase
                        && r["held"].as_u64() == Some(held)
                        && r["settle_ms"].as_u64().unwrap_or(0) == settle
                })
                .collect();
            let phase = if settle > 0 {
                format!("{phase}, settled {settle} ms")
            } else {
                phase.to_string()
            };
            if group.is_empty() {
                continue;
            }
            // The incumbents that cancelled the largest share (within half a point); each
            // latency ratio is against the best of them at that percentile.
            let inc = incumbents(&group);
            let top = inc
                .iter()
                .filter(|r| r["cancelled"].as_u64().unwrap_or(0) > 0)
                .filter_map(|r| f(&r["cancelled_share"]))
                .max_by(|a, b| a.total_cmp(b));
            let best_at = |k: &str| -> Option<(f64, String)> {
                let top = top?;
                inc.iter()
                    .filter(|r| f(&r["cancelled_share"]).is_some_and(|x| x >= top - 0.005))
                    .filter_map(|r| Some((f(&r["latency_us"][k])?, s(&r["proxy"]))))
                    .min_by(|a, b| a.0.total_cmp(&b.0))
            };
            for r in sorted(group.clone()) {
                let lat = &r["latency_us"];
                let is_c = r["proxy"] == CANDIDATE;
                let vs = |k: &str| match (is_c, best_at(k)) {
                    (true, Some((b, who))) => format!("{} ({who})", ratio(f(&lat[k]), Some(b))),
                    _ => "—".into(),
                };
                let (r50, r99) = (vs("p50"), vs("p99"));
                let mut notes = Vec::new();
                if r["stop"] != "rounds done" {
                    notes.push(s(&r["stop"]));
                }
                for k in [
                    "not_arrived",
                    "open_failed",
                    "closed_before_client",
                    "no_first_chunk",
                ] {
                    if r[k].as_u64().unwrap_or(0) > 0 {
                        notes.push(format!("{k}={}", r[k]));
                    }
                }
                let share = f(&r["cancelled_share"]).unwrap_or(0.0) * 100.0;
                let _ = writeln!(
                    out,
                    "| {phase} | {held} | {} | {} | {share:.1}% | {} | {} | {} | {r50} | {r99} | {} | {} |",
                    if is_c {
                        format!("**{}**", s(&r["proxy"]))
                    } else {
                        s(&r["proxy"])
                    },
                    s(&r["departed"]),
                    num0(&lat["p50"]),
                    num0(&lat["p99"]),
                    num0(&lat["max"]),
                    ms1(&r["open_us"]["p50"]),
                    notes.join("; "),
                );
            }
        }
    }
    out.push('\n');
}

fn timeout_table(out: &mut String, rows: &[&Value]) {
    if rows.is_empty() {
        return;
    }
    let rows = sorted(rows.to_vec());
    out.push_str("## Timeout precision (route timeout 200 ms, upstream never answers)\n\n");
    out.push_str(
        "Lateness in ms past the timeout, measured from the instant the request was written: \
         when the client got its response, and when the upstream saw its call closed. Ratio: \
         cutoff's p99 response lateness ÷ the best incumbent's.\n\n",
    );
    out.push_str("| proxy | requests | statuses | response late p50 ms | p99 ms | max ms | upstream close late p50 ms | p99 ms | never closed | p99 vs best |\n");
    out.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let best = incumbents(&rows)
        .into_iter()
        .filter_map(|r| f(&r["late_response_us"]["p99"]))
        .min_by(|a, b| a.total_cmp(b));
    for r in rows {
        let lr = &r["late_response_us"];
        let lc = &r["late_close_us"];
        let vs = if r["proxy"] == CANDIDATE {
            ratio(f(&lr["p99"]), best)
        } else {
            "—".into()
        };
        let statuses = r["statuses"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}×{v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {statuses} | {} | {} | {} | {} | {} | {} | {vs} |",
            s(&r["proxy"]),
            s(&r["n"]),
            ms1(&lr["p50"]),
            ms1(&lr["p99"]),
            ms1(&lr["max"]),
            ms1(&lc["p50"]),
            ms1(&lc["p99"]),
            s(&r["upstream_never_closed"]),
        );
    }
    out.push('\n');
}

#[derive(PartialEq)]
enum WrkMode {
    KeepAlive,
    Close,
}

fn wrk_table(out: &mut String, rows: &[&Value], mode: WrkMode) {
    if rows.is_empty() {
        return;
    }
    // Several interleaved passes per target: keep each target's best (the one least
    // disturbed by the rest of the machine) and show the others' req/s beside it.
    let mut best: Vec<&Value> = Vec::new();
    let mut others: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for r in rows {
        let who = s(&r["proxy"]);
        match best.iter().position(|b| b["proxy"] == r["proxy"]) {
            Some(i) if f(&best[i]["rps"]) < f(&r["rps"]) => {
                others.entry(who).or_default().extend(f(&best[i]["rps"]));
                best[i] = r;
            }
            Some(_) => others.entry(who).or_default().extend(f(&r["rps"])),
            None => best.push(r),
        }
    }
    let rows = sorted(best);
    if mode == WrkMode::Close {
        out.push_str(
            "## Throughput, one request per connection (wrk -H 'Connection: close')\n\n\
             The same, with every request on a new client connection: accepting, setting up \
             and closing a connection, as health checks and clients without keep-alive cost \
             a proxy. The upstream side stays pooled. hyper-floor is not run here (it opens \
             an upstream connection per client connection).\n\n",
        );
    } else {
        out.push_str(
            "## Throughput (wrk -t1 -c64 -d5s, small static body from an nginx origin)\n\n",
        );
    }
    out.push_str(
        "\"vs direct\" divides by wrk straight to the origin (req/s: higher is better; \
         latency: lower is better). \"req/s vs best\" is cutoff ÷ the faster incumbent. \
         Each target ran in interleaved passes; the table shows each one's best pass, and \
         the other passes' req/s in the last column. hyper-floor is a baseline (a bare hyper \
         forwarding loop), never an incumbent. \"CPU µs/req\" is the proxy process's own \
         CPU time (user + system) during that pass divided by the requests it served; \
         \"CPU vs best\" is cutoff's ÷ the leaner incumbent's (below 1× is better).\n\n",
    );
    out.push_str("| target | req/s | req/s vs direct | p50 ms | p50 vs direct | p99 ms | p99 vs direct | req/s vs best | CPU µs/req | CPU vs best | non-2xx | socket errors | other passes req/s |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let direct = rows.iter().find(|r| r["proxy"] == "direct").copied();
    let d = |k: &str| direct.and_then(|r| f(&r[k]));
    let best = incumbents(&rows)
        .into_iter()
        .filter_map(|r| f(&r["rps"]))
        .max_by(|a, b| a.total_cmp(b));
    let leanest = incumbents(&rows)
        .into_iter()
        .filter_map(|r| f(&r["cpu_us_per_req"]))
        .min_by(|a, b| a.total_cmp(b));
    for r in &rows {
        let (vs_best, cpu_vs_best) = if r["proxy"] == CANDIDATE {
            (
                ratio(f(&r["rps"]), best),
                ratio(f(&r["cpu_us_per_req"]), leanest),
            )
        } else {
            ("—".into(), "—".into())
        };
        let cpu = f(&r["cpu_us_per_req"]).map_or("—".into(), |c| format!("{c:.1}"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {vs_best} | {cpu} | {cpu_vs_best} | {} | {} | {} |",
            s(&r["proxy"]),
            num0(&r["rps"]),
            ratio(f(&r["rps"]), d("rps")),
            ms1(&r["p50_us"]),
            ratio(f(&r["p50_us"]), d("p50_us")),
            ms1(&r["p99_us"]),
            ratio(f(&r["p99_us"]), d("p99_us")),
            r.get("non2xx").map_or("0".into(), s),
            s(&r["socket_errors"]),
            others
                .get(&s(&r["proxy"]))
                .map(|v| v
                    .iter()
                    .map(|x| format!("{x:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
        );
    }
    floor_note(out, &rows, "rps", "req/s");
    floor_note(out, &rows, "cpu_us_per_req", "CPU per request");
    out.push('\n');
}

/// Instructions per request under callgrind, per target and mode: the table's one row
/// per target, a column pair per mode.
fn instructions_table(out: &mut String, rows: &[&Value]) {
    if rows.is_empty() {
        return;
    }
    out.push_str("## Instructions per request (callgrind, wrk -t1 -c64 to the origin)\n\n");
    out.push_str(
        "User-space instructions each proxy process executed while serving the requests, \
         ÷ requests served, counted by valgrind's callgrind from the start of the measured \
         run to its end. It moves with the code, not with the machine (repeat runs agree \
         within a few per cent, cutoff's within 0.5 %), so it shows what CPU time hides in \
         noise; it leaves out the kernel's share of the CPU (the system calls) and how fast \
         each instruction runs. \
         Ratio: cutoff ÷ the leaner incumbent (below 1× is better).\n\n",
    );
    out.push_str("| target | keep-alive instructions / request | vs best | one request per connection | vs best |\n");
    out.push_str("|---|---:|---:|---:|---:|\n");
    let per_request = |r: &Value| match (f(&r["instructions"]), f(&r["requests"])) {
        (Some(i), Some(n)) if n > 0.0 => Some(i / n),
        _ => None,
    };
    let of = |who: &str, mode: &str| {
        rows.iter()
            .find(|r| r["proxy"] == who && r["mode"] == mode)
            .and_then(|r| per_request(r))
    };
    let leanest = |mode: &str| {
        incumbents(rows)
            .into_iter()
            .filter(|r| r["mode"] == mode)
            .filter_map(per_request)
            .min_by(|a, b| a.total_cmp(b))
    };
    let mut targets: Vec<&Value> = Vec::new();
    for r in rows {
        if !targets.iter().any(|t| t["proxy"] == r["proxy"]) {
            targets.push(r);
        }
    }
    for r in sorted(targets) {
        let who = s(&r["proxy"]);
        let mut line = format!("| {who} |");
        for mode in ["keepalive", "close"] {
            let n = of(&who, mode);
            let vs = if who == CANDIDATE {
                ratio(n, leanest(mode))
            } else {
                "—".into()
            };
            let _ = write!(
                line,
                " {} | {vs} |",
                n.map_or("—".into(), |n| format!("{n:.0}"))
            );
        }
        let _ = writeln!(out, "{line}");
    }
    if let (Some(c), Some(fl)) = (of(CANDIDATE, "keepalive"), of(FLOOR, "keepalive")) {
        let _ = writeln!(
            out,
            "\n{CANDIDATE} ÷ {FLOOR}, keep-alive: {} instructions per request ({:+.0})",
            ratio(Some(c), Some(fl)),
            c - fl
        );
    }
    out.push('\n');
}

fn mib(v: &Value) -> String {
    f(v).map_or("—".into(), |x| format!("{:.1}", x / 1024.0))
}

fn rss_table(out: &mut String, rows: &[&Value], kind: &str) {
    if rows.is_empty() {
        return;
    }
    let rows = sorted(rows.to_vec());
    match kind {
        "bodiless" => out.push_str("## Memory per held request (upstream never answers)\n\n"),
        "stalled download" => out.push_str(
            "## Memory per stalled download (the upstream sends an endless body, the client \
             reads none of it)\n\n",
        ),
        other => {
            let _ = write!(
                out,
                "## Memory per held request, {other} (the upstream never answers)\n\n"
            );
        }
    }
    out.push_str(
        "VmRSS of the proxy process (nginx: its one worker) before and while holding the \
         requests; KiB per held request = (held − before) ÷ requests that reached the \
         upstream. Ratio: cutoff ÷ the leaner incumbent; hyper-floor (a bare hyper forwarding \
         loop) is a baseline, never an incumbent. Kernel KiB: what the proxy's sockets held \
         in their send and receive queues meanwhile (`/proc/net/tcp`), ÷ the same count: \
         memory of the host that VmRSS does not show. RSS after release: 1 s after the \
         held requests ended; RSS idle, bodiless rounds only: once back within 2 % of \
         RSS before, or 11 s after the release, whichever came first (seconds since the \
         release in brackets).\n\n",
    );
    out.push_str("| proxy | held | time to hold all s | RSS before MiB | RSS held MiB | KiB / held request | vs best | kernel KiB / held request | fds before → held → after | RSS after release MiB | RSS idle MiB (s) |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|\n");
    let best = incumbents(&rows)
        .into_iter()
        .filter_map(|r| f(&r["kib_per_request"]))
        .min_by(|a, b| a.total_cmp(b));
    for r in &rows {
        let vs = if r["proxy"] == CANDIDATE {
            ratio(f(&r["kib_per_request"]), best)
        } else {
            "—".into()
        };
        let _ = writeln!(
            out,
            "| {} | {}/{} | {} | {} | {} | {:.1} | {vs} | {} | {} → {} → {} | {} | {} ({}) |",
            s(&r["proxy"]),
            s(&r["held_ok"]),
            s(&r["held"]),
            s(&r["open_s"]),
            mib(&r["rss_before_kib"]),
            mib(&r["rss_held_kib"]),
            f(&r["kib_per_request"]).unwrap_or(f64::NAN),
            f(&r["kernel_kib_per_request"]).map_or("—".into(), |k| format!("{k:.1}")),
            s(&r["fds_before"]),
            s(&r["fds_held"]),
            s(&r["fds_after"]),
            mib(&r["rss_after_kib"]),
            mib(&r["rss_idle_kib"]),
            s(&r["idle_s"]),
        );
    }
    floor_note(out, &rows, "kib_per_request", "KiB per held request");
    out.push('\n');
}

fn bulk_table(out: &mut String, rows: &[&Value]) {
    if rows.is_empty() {
        return;
    }
    let rows = sorted(rows.to_vec());
    out.push_str("## Bulk transfer (one large upload, then one large download, each alone)\n\n");
    out.push_str(
        "The upload goes to the loadgen upstream, which reads it whole before it answers; \
         the download comes from it, as fast as the proxy takes it. GiB/s is wall-clock \
         (direct: no proxy); CPU s/GiB is the proxy process's own \
         CPU time (user + system) per GiB moved. Ratios: cutoff ÷ the leaner incumbent \
         (below 1× is better).\n\n",
    );
    out.push_str("| proxy | GiB | upload GiB/s | upload CPU s/GiB | vs best | download GiB/s | download CPU s/GiB | vs best |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let best = |key: &str| {
        incumbents(&rows)
            .into_iter()
            .filter_map(|r| f(&r[key]))
            .min_by(|a, b| a.total_cmp(b))
    };
    let (best_up, best_down) = (best("upload_cpu_s_per_gib"), best("download_cpu_s_per_gib"));
    let two = |v: &Value| f(v).map_or("—".into(), |x| format!("{x:.2}"));
    for r in &rows {
        let candidate = r["proxy"] == CANDIDATE;
        let vs = |key: &str, best: Option<f64>| {
            if candidate {
                ratio(f(&r[key]), best)
            } else {
                "—".into()
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s(&r["proxy"]),
            s(&r["upload_gib"]),
            two(&r["upload_gib_per_s"]),
            two(&r["upload_cpu_s_per_gib"]),
            vs("upload_cpu_s_per_gib", best_up),
            two(&r["download_gib_per_s"]),
            two(&r["download_cpu_s_per_gib"]),
            vs("download_cpu_s_per_gib", best_down),
        );
    }
    out.push('\n');
}

fn soak_table(out: &mut String, rows: &[&Value]) {
    if rows.is_empty() {
        return;
    }
    let rows = sorted(rows.to_vec());
    out.push_str("## Soak (half the requests abandoned while the upstream works)\n\n");
    out.push_str(
        "The upstream answers after 10 ms; odd requests leave (FIN) at 5 ms. For the abandoned \
         ones: \"never sent\" never reached the upstream, \"closed early\" were closed by \
         the proxy before the upstream answered (together: work avoided, as a share of the \
         abandoned), \"answered anyway\" cost the upstream its full 10 ms. \"completed but \
         closed\" counts requests the client waited for whose upstream call was closed \
         anyway (must be 0). Descriptors and RSS: in the fresh process, after a warm-up of 400 completed \
         requests, 1 s after the soak, and once the upstream has closed all its idle keep-alive \
         connections (polled up to 6 s until the fresh count is back; the time it took in \
         brackets). Growth in that last column is a leak or a descriptor held in CLOSE_WAIT.\n\n",
    );
    out.push_str("| proxy | requests | req/s | ok | abandoned | errors + non-200 | upstream conns / requests | abandoned: never sent + closed early = avoided | answered anyway | completed but closed | fds fresh → warmed → 1 s after → released | RSS MiB fresh → warmed → 1 s after → released | alive |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|---|\n");
    for r in rows {
        let errs = r["errors"].as_u64().unwrap_or(0) + r["non200"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {errs} | {} / {} | {} + {} = {:.1}% | {} | {} | {} → {} → {} → {} ({} s) | {} → {} → {} → {} | {} |",
            s(&r["proxy"]),
            s(&r["requests"]),
            num0(&r["rps"]),
            s(&r["ok"]),
            s(&r["abandoned"]),
            s(&r["upstream_connections"]),
            s(&r["upstream_requests"]),
            s(&r["abandoned_never_sent"]),
            s(&r["abandoned_cancelled"]),
            f(&r["abandoned_cancelled_share"]).unwrap_or(0.0) * 100.0,
            s(&r["abandoned_answered"]),
            s(&r["completed_but_closed"]),
            s(&r["fds_fresh"]),
            s(&r["fds_before"]),
            s(&r["fds_after_1s"]),
            s(&r["fds_after_release"]),
            s(&r["fds_settle_s"]),
            mib(&r["rss_fresh_kib"]),
            mib(&r["rss_before_kib"]),
            mib(&r["rss_after_1s_kib"]),
            mib(&r["rss_after_release_kib"]),
            s(&r["alive"]),
        );
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::duration_us;

    #[test]
    fn wrk_units() {
        assert_eq!(duration_us("620.00us"), 620.0);
        assert_eq!(duration_us("1.50ms"), 1500.0);
        assert_eq!(duration_us("2.00s"), 2e6);
    }
}
