//! `soak`: many requests, half of them abandoned while the upstream is still working.
//!
//! The upstream answers each request after `delay`. Even ids complete (on a kept-alive
//! client connection); odd ids are abandoned at `delay / 2` (FIN) and the worker opens a
//! new connection. Before and after, read the proxy's descriptors and VmRSS; report them,
//! the upstream connections accepted against requests, and how many abandoned calls the
//! upstream saw closed before it answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpStream;

use crate::http::{self, HOST, Leave};
use crate::upstream::{Mode, Upstream};
use crate::{Args, emit};

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    non200: AtomicU64,
    abandoned: AtomicU64,
    errors: AtomicU64,
    connects: AtomicU64,
}

pub async fn run(args: &Args) -> Result<(), String> {
    let proxy = args.addr("proxy")?;
    let up_addr = args.addr("upstream")?;
    let pid: u32 = args.num("pid", None)?;
    let n: u64 = args.num("n", Some(100_000))?;
    let conc: u64 = args.num("concurrency", Some(64))?;
    let delay = args.ms("delay-ms", 10)?;
    let budget = Duration::from_secs(args.num("budget-s", Some(60))?);
    let label = args.str("label", "proxy");
    if n == 0 || n > 10_000_000 || conc == 0 || conc > 4096 {
        return Err("--n 1..10000000, --concurrency 1..4096".into());
    }
    let up = Upstream::start(up_addr, Mode::Respond { delay }).await?;

    let fd_fresh = http::fd_count(pid)?;
    let rss_fresh = http::rss_kib(pid)?;
    // Warm-up with completed requests only, then let every connection go.
    let warm = Arc::new(Counts::default());
    drive(
        proxy,
        1_000_000_000,
        400,
        8,
        delay,
        false,
        Instant::now() + Duration::from_secs(10),
        warm.clone(),
    )
    .await;
    up.release_all();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fd0 = http::fd_count(pid)?;
    let rss0 = http::rss_kib(pid)?;
    let acc0 = up.accepted.load(Ordering::Relaxed);
    let req0 = up.requests.load(Ordering::Relaxed);

    let started = Instant::now();
    let counts = Arc::new(Counts::default());
    drive(
        proxy,
        0,
        n,
        conc,
        delay,
        true,
        started + budget,
        counts.clone(),
    )
    .await;
    let secs = started.elapsed().as_secs_f64();
    let accepted = up.accepted.load(Ordering::Relaxed) - acc0;
    let seen = up.requests.load(Ordering::Relaxed) - req0;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let alive = http::alive(pid);
    let fd1 = http::fd_count(pid).unwrap_or(0);
    let rss1 = http::rss_kib(pid).unwrap_or(0);
    // The upstream closes every idle keep-alive connection; wait (at most 6 s) for the
    // proxy's descriptors to come back to where the fresh process started.
    up.release_all();
    let released = Instant::now();
    let mut fd2 = http::fd_count(pid).unwrap_or(0);
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fd2 = http::fd_count(pid).unwrap_or(0);
        if fd2 <= fd_fresh {
            break;
        }
    }
    let settle_s = released.elapsed().as_secs_f64();
    let rss2 = http::rss_kib(pid).unwrap_or(0);

    // Per request, from the upstream's records: what became of the abandoned calls, and
    // whether any completed request had its upstream call closed (it never should).
    let (mut never_sent, mut cut, mut wasted, mut wrongly_closed, mut pending) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    {
        let recs = up.recs();
        for id in 0..n {
            let r = recs.get(&id).copied().unwrap_or_default();
            if id % 2 == 1 {
                match (r.arrived, r.closed, r.responded) {
                    (None, _, _) => never_sent += 1,
                    (Some(_), Some(_), _) => cut += 1,
                    (Some(_), None, Some(_)) => wasted += 1,
                    (Some(_), None, None) => pending += 1,
                }
            } else if r.closed.is_some() {
                wrongly_closed += 1;
            }
        }
    }
    let ok = counts.ok.load(Ordering::Relaxed);
    let non200 = counts.non200.load(Ordering::Relaxed);
    let abandoned = counts.abandoned.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    let total = ok + non200 + abandoned + errors;
    // Work avoided: the call never reached the upstream, or was closed before its answer.
    let cancelled_share = if abandoned > 0 {
        (never_sent + cut) as f64 / abandoned as f64
    } else {
        0.0
    };
    println!(
        "soak {label}: {total} requests in {secs:.1}s ({:.0}/s): ok={ok} non200={non200} \
         abandoned={abandoned} errors={errors}; upstream saw {seen} requests on {accepted} \
         connections; abandoned calls: {never_sent} never sent + {cut} closed before the \
         upstream answered ({:.1}% avoided), {wasted} answered anyway, {pending} unresolved; completed requests whose \
         upstream call was closed: {wrongly_closed}; fds {fd_fresh} (fresh) → {fd0} (warmed) → {fd1} (1 s after) → {fd2} \
         ({settle_s:.1} s after the upstream closed its idle conns); VmRSS {rss_fresh} → \
         {rss0} → {rss1} → {rss2} KiB; proxy alive: {alive}",
        total as f64 / secs,
        cancelled_share * 100.0,
    );
    emit(json!({
        "bench": "soak",
        "proxy": label,
        "n": n,
        "concurrency": conc,
        "delay_ms": delay.as_millis() as u64,
        "requests": total,
        "seconds": crate::stats::round1(secs),
        "rps": (total as f64 / secs).round(),
        "ok": ok,
        "non200": non200,
        "abandoned": abandoned,
        "errors": errors,
        "client_connects": counts.connects.load(Ordering::Relaxed),
        "upstream_requests": seen,
        "upstream_connections": accepted,
        "abandoned_never_sent": never_sent,
        "abandoned_cancelled": cut,
        "abandoned_answered": wasted,
        "abandoned_unresolved": pending,
        "completed_but_closed": wrongly_closed,
        "abandoned_cancelled_share": (cancelled_share * 1000.0).round() / 1000.0,
        "fds_fresh": fd_fresh,
        "fds_before": fd0,
        "fds_after_1s": fd1,
        "fds_after_release": fd2,
        "fds_settle_s": crate::stats::round1(settle_s),
        "rss_fresh_kib": rss_fresh,
        "rss_before_kib": rss0,
        "rss_after_1s_kib": rss1,
        "rss_after_release_kib": rss2,
        "alive": alive,
    }));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    proxy: SocketAddr,
    first: u64,
    n: u64,
    conc: u64,
    delay: Duration,
    abandon_odd: bool,
    end: Instant,
    counts: Arc<Counts>,
) {
    let next = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let (next, counts) = (next.clone(), counts.clone());
        set.spawn(async move {
            let mut conn: Option<TcpStream> = None;
            let mut buf = Vec::new();
            for _ in 0..n {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n || Instant::now() >= end {
                    break;
                }
                let id = first + k;
                if conn.is_none() {
                    counts.connects.fetch_add(1, Ordering::Relaxed);
                    match http::connect(proxy).await {
                        Ok(s) => conn = Some(s),
                        Err(_) => {
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                    }
                }
                let mut s = conn.take().expect("connected above");
                let req = format!("GET /c/{id} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
                if http::write_all(&mut s, req.as_bytes()).await.is_err() {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if abandon_odd && id % 2 == 1 {
                    tokio::time::sleep(delay / 2).await;
                    http::leave(s, Leave::Fin);
                    counts.abandoned.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                buf.clear();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    http::read_response(&mut s, &mut buf),
                )
                .await;
                match r {
                    Ok(Ok((status, close))) => {
                        if status == 200 {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            counts.non200.fetch_add(1, Ordering::Relaxed);
                        }
                        if !close {
                            conn = Some(s);
                        }
                    }
                    _ => {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}
