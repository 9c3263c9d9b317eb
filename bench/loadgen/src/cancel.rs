//! `cancel`: how long after a client leaves does the upstream see its call closed?
//!
//! Per round: open `held` client connections through the proxy, each with one request
//! `/c/{id}` in the chosen phase; wait until the upstream has seen every request (and, in
//! the body phase, until every client has received the first chunk); then the clients
//! leave one by one, `gap` apart, each noting t0 just before its departing syscall. The
//! upstream notes t1 when the proxy closes the matching connection. A departure whose
//! upstream call is closed within `bound` is a sample of t1 − t0; the rest are counted as
//! never cancelled. Rounds repeat until `rounds` are done or the time budget runs out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::http::{self, HOST, Leave};
use crate::stats;
use crate::upstream::{FIRST_CHUNK, Mode, Upstream};
use crate::{Args, emit};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Headers,
    Body,
    Upload,
}

/// What the upload phase announces, and what it actually sends before holding.
const UPLOAD_DECLARED: u64 = 100 * 1024 * 1024;
const UPLOAD_SENT: usize = 64 * 1024;
/// Client connects in flight at once while a round opens its connections.
const OPEN_PARALLEL: usize = 128;

pub async fn run(args: &Args) -> Result<(), String> {
    let proxy = args.addr("proxy")?;
    let up_addr = args.addr("upstream")?;
    let held: usize = args.num("held", None)?;
    let rounds: usize = args.num("rounds", Some(1))?;
    let phase = match args.req("phase")?.as_str() {
        "headers" => Phase::Headers,
        "body" => Phase::Body,
        "upload" => Phase::Upload,
        p => return Err(format!("--phase {p}: headers, body or upload")),
    };
    let close = args.str("close", "fin");
    let leave_of = |i: usize| match close.as_str() {
        "rst" => Leave::Rst,
        "mixed" if i % 2 == 1 => Leave::Rst,
        _ => Leave::Fin,
    };
    if !["fin", "rst", "mixed"].contains(&close.as_str()) {
        return Err("--close: fin, rst or mixed".into());
    }
    let gap = args.ms("gap-ms", 1)?;
    let settle = args.ms("settle-ms", 0)?;
    let bound = args.ms("bound-ms", 2000)?;
    let budget = Duration::from_secs(args.num("budget-s", Some(20))?);
    let label = args.str("label", "proxy");
    // Diagnosis: print the slowest N samples with where they fell (round, departure).
    let slowest: usize = args.num("slowest", Some(0))?;
    if held == 0 || held > 20_000 || rounds == 0 || rounds > 100_000 {
        return Err("--held 1..20000, --rounds 1..100000".into());
    }

    let mode = if phase == Phase::Body {
        Mode::BodyHold
    } else {
        Mode::Hold
    };
    let up = Upstream::start(up_addr, mode).await?;
    let started = Instant::now();
    let end = started + budget;

    let mut lat_us: Vec<f64> = Vec::new();
    // (latency µs, round, departure index in its round), for --slowest.
    let mut placed: Vec<(f64, usize, usize)> = Vec::new();
    // Per connection: connect + request written (+ first chunk received, body phase).
    let mut open_us: Vec<f64> = Vec::new();
    let (mut departed, mut never, mut not_arrived, mut open_failed, mut early, mut no_first) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    let mut rounds_run = 0;
    let mut stop = "rounds done";
    let mut next_id: u64 = 1;

    for _ in 0..rounds {
        if Instant::now() >= end {
            stop = "time budget";
            break;
        }
        rounds_run += 1;
        let ids: Vec<u64> = (next_id..next_id + held as u64).collect();
        next_id += held as u64;

        // Open every connection of the round.
        let sem = Arc::new(Semaphore::new(OPEN_PARALLEL));
        let mut set = JoinSet::new();
        for &id in &ids {
            let sem = sem.clone();
            set.spawn(async move {
                let _p = sem.acquire_owned().await;
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(5), open(proxy, id, phase)).await;
                (
                    id,
                    t.elapsed(),
                    r.unwrap_or_else(|_| Err("open timed out".into())),
                )
            });
        }
        let mut conns: Vec<(u64, TcpStream)> = Vec::with_capacity(held);
        while let Some(j) = set.join_next().await {
            match j {
                Ok((id, took, Ok((s, got_first)))) => {
                    open_us.push(took.as_secs_f64() * 1e6);
                    if phase == Phase::Body && !got_first {
                        no_first += 1;
                    }
                    conns.push((id, s));
                }
                Ok((_, _, Err(e))) => {
                    open_failed += 1;
                    if open_failed <= 3 {
                        eprintln!("open failed: {e}");
                    }
                }
                Err(_) => open_failed += 1,
            }
        }
        conns.sort_by_key(|(id, _)| *id);
        let opened: Vec<u64> = conns.iter().map(|(id, _)| *id).collect();
        let wait = Duration::from_secs(3) + Duration::from_millis(3 * held as u64);
        up.wait_arrived(&opened, Instant::now() + wait).await;
        if !settle.is_zero() {
            tokio::time::sleep(settle).await;
        }

        // Leave one by one.
        let mut t0s: Vec<(u64, Instant)> = Vec::with_capacity(conns.len());
        for (i, (id, s)) in conns.into_iter().enumerate() {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            t0s.push((id, http::leave(s, leave_of(i))));
        }
        let last = t0s.last().map(|(_, t)| *t).unwrap_or_else(Instant::now);
        let departed_ids: Vec<u64> = t0s.iter().map(|(id, _)| *id).collect();
        up.wait_until(last + bound, |r| {
            departed_ids.iter().all(|id| {
                r.get(id)
                    .is_none_or(|x| x.arrived.is_none() || x.closed.is_some())
            })
        })
        .await;

        let mut round_cancelled = 0;
        for (i, (id, t0)) in t0s.iter().enumerate() {
            let rec = up.get(*id);
            if rec.arrived.is_none() {
                not_arrived += 1;
                continue;
            }
            departed += 1;
            match rec.closed {
                Some(t1) if t1 < *t0 => early += 1,
                Some(t1) if t1 - *t0 <= bound => {
                    lat_us.push((t1 - *t0).as_secs_f64() * 1e6);
                    if slowest > 0 {
                        placed.push(((t1 - *t0).as_secs_f64() * 1e6, rounds_run, i));
                    }
                    round_cancelled += 1;
                }
                _ => never += 1,
            }
        }
        up.release_all();
        // Let the proxy see the released upstream connections before the next round.
        tokio::time::sleep(if held > 1 {
            Duration::from_millis(50)
        } else {
            Duration::from_micros(200)
        })
        .await;

        // A proxy that cancels nothing would make every round wait out the bound: once
        // three rounds (or 100 departures) show no cancellation at all, stop.
        if lat_us.is_empty() && round_cancelled == 0 && (rounds_run >= 3 || departed >= 100) {
            stop = "stopped early: nothing cancelled";
            break;
        }
    }

    if slowest > 0 {
        placed.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (us, round, i) in placed.iter().take(slowest) {
            eprintln!("slow: {us:.0} µs, round {round}, departure {i}");
        }
    }
    let s = stats::summarize(&lat_us);
    let cancelled = lat_us.len();
    let share = if departed > 0 {
        cancelled as f64 / departed as f64
    } else {
        0.0
    };
    println!(
        "cancel {label} phase={phase:?} held={held} close={close}: {rounds_run} rounds ({stop}), \
         {departed} departures, cancelled {:.1}% within {bound:?}; {}; never={never} \
         not_arrived={not_arrived} open_failed={open_failed} closed_before_client={early}{}; \
         opening (connect → request in phase): {}",
        share * 100.0,
        stats::fmt(s),
        if phase == Phase::Body {
            format!(" no_first_chunk={no_first}")
        } else {
            String::new()
        },
        stats::fmt(stats::summarize(&open_us)),
    );
    emit(json!({
        "bench": "cancel",
        "proxy": label,
        "phase": format!("{phase:?}").to_lowercase(),
        "held": held,
        "close": close,
        "gap_ms": gap.as_millis() as u64,
        "settle_ms": settle.as_millis() as u64,
        "bound_ms": bound.as_millis() as u64,
        "rounds": rounds_run,
        "stop": stop,
        "departed": departed,
        "cancelled": cancelled,
        "cancelled_share": stats::round1(share * 1000.0) / 1000.0,
        "never": never,
        "not_arrived": not_arrived,
        "open_failed": open_failed,
        "closed_before_client": early,
        "no_first_chunk": no_first,
        "latency_us": stats::to_json(s),
        "open_us": stats::to_json(stats::summarize(&open_us)),
        "seconds": stats::round1(started.elapsed().as_secs_f64()),
    }));
    Ok(())
}

/// Opens one connection and brings its request into the phase. Returns the stream and,
/// for the body phase, whether the first chunk reached the client.
async fn open(
    proxy: std::net::SocketAddr,
    id: u64,
    phase: Phase,
) -> Result<(TcpStream, bool), String> {
    let mut s = http::connect(proxy)
        .await
        .map_err(|e| format!("connect {proxy}: {e}"))?;
    let e = |e: std::io::Error| e.to_string();
    match phase {
        Phase::Headers => {
            http::write_all(
                &mut s,
                format!("GET /c/{id} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
            )
            .await
            .map_err(e)?;
            Ok((s, false))
        }
        Phase::Body => {
            http::write_all(
                &mut s,
                format!("GET /c/{id} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
            )
            .await
            .map_err(e)?;
            let mut got = Vec::new();
            let mut tmp = [0u8; 4096];
            let deadline = Instant::now() + Duration::from_secs(3);
            while http::find(&got, FIRST_CHUNK).is_none() && Instant::now() < deadline {
                match tokio::time::timeout_at(deadline.into(), s.read(&mut tmp)).await {
                    Ok(Ok(0)) => return Err("closed before the first chunk".into()),
                    Ok(Ok(n)) => got.extend_from_slice(&tmp[..n]),
                    Ok(Err(err)) => return Err(err.to_string()),
                    Err(_) => break,
                }
            }
            let first = http::find(&got, FIRST_CHUNK).is_some();
            Ok((s, first))
        }
        Phase::Upload => {
            let head = format!(
                "POST /c/{id} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/octet-stream\r\nContent-Length: {UPLOAD_DECLARED}\r\n\r\n"
            );
            http::write_all(&mut s, head.as_bytes()).await.map_err(e)?;
            http::write_all(&mut s, &vec![b'x'; UPLOAD_SENT])
                .await
                .map_err(e)?;
            Ok((s, false))
        }
    }
}
