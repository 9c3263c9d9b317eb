//! `rss`: memory per held request. Read the proxy's VmRSS and open descriptors, hold
//! `held` requests that the upstream never answers, read them again once every request
//! has reached the upstream and the memory has stopped moving, and report the difference
//! per held request.
//!
//! `--upload BYTES`: each request is a POST that sends BYTES of its body (one byte short of
//! what it declares), then holds. `--download 1`: the upstream answers at once with an
//! endless body, which the client never reads: a download stalled by its client.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::http::{self, HOST};
use crate::upstream::{Mode, Upstream};
use crate::{Args, emit};

const OPEN_PARALLEL: usize = 128;

pub async fn run(args: &Args) -> Result<(), String> {
    let proxy = args.addr("proxy")?;
    let up_addr = args.addr("upstream")?;
    let pid: u32 = args.num("pid", None)?;
    let held: u64 = args.num("held", None)?;
    let label = args.str("label", "proxy");
    let upload: usize = args.num("upload", Some(0))?;
    let download = args.num::<u8>("download", Some(0))? == 1;
    if held == 0 || held > 20_000 {
        return Err("--held 1..20000".into());
    }
    if upload > 0 && download {
        return Err("--upload or --download, not both".into());
    }
    let kind = match (upload, download) {
        (0, false) => "bodiless".to_string(),
        (0, true) => "stalled download".to_string(),
        (n, _) => format!("after a {} KiB upload", n / 1024),
    };
    let mode = if download { Mode::Flood } else { Mode::Hold };
    let up = Upstream::start(up_addr, mode).await?;
    let started = Instant::now();

    // Warm-up: a few held-and-released requests, so lazily built state is in the baseline.
    let warm = hold(proxy, 1_000_000, 50, upload).await;
    let warm_ids: Vec<u64> = warm.iter().map(|(id, _)| *id).collect();
    up.wait_arrived(&warm_ids, Instant::now() + Duration::from_secs(5))
        .await;
    drop(warm);
    up.release_all();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let rss0 = http::rss_kib(pid)?;
    let fd0 = http::fd_count(pid)?;
    // Held in two halves, each read once the memory is still. The second half's growth
    // is the headline: the first half takes up what the allocator kept of the warm-up
    // (freed pages it has not handed back to the kernel yet, a varying amount), which
    // would otherwise be counted as free.
    let first = (held / 2).max(1);
    let one = hold_batch(&up, proxy, pid, 1, first, upload, download).await?;
    let two = hold_batch(&up, proxy, pid, 1 + first, held - first, upload, download).await?;
    let (rss_half, rss1, settle_s) = (one.rss_kib, two.rss_kib, two.settle_s);
    let (arrived_2, arrived) = (two.arrived, one.arrived + two.arrived);
    // The time to hold them all: each half's, from its first connect to its last arrival.
    let open_s = one.open_s + two.open_s;
    let mut conns = one.conns;
    conns.extend(two.conns);
    let ids: Vec<u64> = conns.iter().map(|(id, _)| *id).collect();
    let fd1 = http::fd_count(pid)?;
    let (kernel_send, kernel_recv) = http::proxy_socket_queues(proxy.port(), up_addr);
    let n = conns.len() as u64;
    drop(conns);
    // The proxy closes the calls of the clients that left; only then does the upstream let
    // go of the rest. Released first, a download would end under a proxy still sending
    // it, which the proxy rightly logs as the upstream's failure.
    up.wait_until(Instant::now() + Duration::from_secs(3), |r| {
        ids.iter()
            .all(|id| r.get(id).is_none_or(|x| x.closed.is_some()))
    })
    .await;
    up.release_all();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss2 = http::rss_kib(pid).unwrap_or(0);
    let fd2 = http::fd_count(pid).unwrap_or(0);
    // Only for the bodiless round, the headline: up to 11 s per proxy.
    let idle = if upload == 0 && !download {
        Some(idle_rss(pid, rss0, rss2).await)
    } else {
        None
    };

    let per_of = |from: u64, to: u64, n: usize| {
        if n > 0 {
            (to as f64 - from as f64) / n as f64
        } else {
            0.0
        }
    };
    let (per, per_all) = if arrived_2 > 0 {
        (
            per_of(rss_half, rss1, arrived_2),
            per_of(rss0, rss1, arrived),
        )
    } else {
        let all = per_of(rss0, rss1, arrived);
        (all, all)
    };
    let kernel_kib = if arrived > 0 {
        (kernel_send + kernel_recv) as f64 / 1024.0 / arrived as f64
    } else {
        0.0
    };
    let idle_text = idle.map_or("not read".to_string(), |(kib, secs)| {
        format!("VmRSS {kib} KiB {secs:.1}s after the release")
    });
    println!(
        "rss {label} pid={pid}: held {arrived}/{held} (opened {n} in {open_s:.1}s); \
         VmRSS {rss0} → {rss_half} → {rss1} KiB (settled {settle_s:.1}s after the last \
         arrival) = {per:.2} KiB per held request of the second half ({per_all:.2} over \
         all); fds {fd0} → {fd1}; after release: VmRSS {rss2} KiB, fds {fd2}; \
         idle: {idle_text}; \
         in the kernel's socket queues meanwhile: {kernel_kib:.1} KiB per held request \
         ({kernel_send} bytes to send, {kernel_recv} unread)"
    );
    emit(json!({
        "bench": "rss",
        "proxy": label,
        "kind": kind,
        "held": held,
        "held_ok": arrived,
        "rss_before_kib": rss0,
        "rss_half_kib": rss_half,
        "rss_held_kib": rss1,
        "rss_after_kib": rss2,
        "rss_idle_kib": idle.map(|(kib, _)| kib),
        "idle_s": idle.map(|(_, secs)| crate::stats::round1(secs)),
        "kib_per_request": (per * 100.0).round() / 100.0,
        "kib_per_request_all": (per_all * 100.0).round() / 100.0,
        "kernel_kib_per_request": (kernel_kib * 10.0).round() / 10.0,
        "kernel_send_bytes": kernel_send,
        "kernel_recv_bytes": kernel_recv,
        "fds_before": fd0,
        "fds_held": fd1,
        "fds_after": fd2,
        "open_s": crate::stats::round1(open_s),
        "settle_s": crate::stats::round1(settle_s),
        "seconds": crate::stats::round1(started.elapsed().as_secs_f64()),
    }));
    Ok(())
}

/// One batch of held requests, once the proxy's memory settled.
struct Batch {
    conns: Vec<(u64, TcpStream)>,
    /// Requests that reached the upstream.
    arrived: usize,
    /// The proxy's settled VmRSS.
    rss_kib: u64,
    /// From the last arrival to that reading.
    settle_s: f64,
    /// From the first connect to the last arrival.
    open_s: f64,
}

/// Holds `n` more requests (ids from `first`) and waits until they have all reached the
/// upstream (and, for downloads, stalled), then for the proxy's memory to settle.
async fn hold_batch(
    up: &Upstream,
    proxy: std::net::SocketAddr,
    pid: u32,
    first: u64,
    n: u64,
    upload: usize,
    download: bool,
) -> Result<Batch, String> {
    let stalled_before = up.stalled.load(Ordering::Relaxed);
    let t_open = Instant::now();
    let conns = hold(proxy, first, n, upload).await;
    let ids: Vec<u64> = conns.iter().map(|(id, _)| *id).collect();
    let arrived = up
        .wait_arrived(&ids, Instant::now() + Duration::from_secs(20))
        .await;
    let t_arrived = Instant::now();
    let open_s = t_open.elapsed().as_secs_f64();
    if download {
        // Until the proxy stops reading the floods, it forwards them into the kernel's
        // buffers, which can take a while and keeps its memory still: a reading then is
        // of a proxy still forwarding, not of one holding stalled downloads.
        let want = stalled_before + arrived as u64;
        let stalled = up
            .wait_until(Instant::now() + Duration::from_secs(20), |_| {
                up.stalled.load(Ordering::Relaxed) >= want
            })
            .await;
        if !stalled {
            eprintln!(
                "rss: only {} of {want} downloads stalled within 20 s",
                up.stalled.load(Ordering::Relaxed)
            );
        }
    }
    let rss_kib = settled_rss(pid).await?;
    Ok(Batch {
        conns,
        arrived,
        rss_kib,
        settle_s: t_arrived.elapsed().as_secs_f64(),
        open_s,
    })
}

/// The proxy's VmRSS once it stops moving: read every 100 ms
/// until three readings in a row are within 64 KiB of the one before (at most 5 s). A
/// request's arrival at the upstream does not end what the proxy does for it: a stalled
/// download goes on filling buffers until the proxy stops reading, and a fixed pause read
/// that at a different point in different runs.
async fn settled_rss(pid: u32) -> Result<u64, String> {
    let start = Instant::now();
    let mut last = http::rss_kib(pid)?;
    let mut same = 0;
    while same < 3 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = http::rss_kib(pid)?;
        same = if now.abs_diff(last) <= 64 {
            same + 1
        } else {
            0
        };
        last = now;
    }
    Ok(last)
}

/// Opens `n` connections with one unanswered request each, ids from `first`: a GET, or a
/// POST that sends `upload` bytes of its body and holds before the last one.
async fn hold(
    proxy: std::net::SocketAddr,
    first: u64,
    n: u64,
    upload: usize,
) -> Vec<(u64, TcpStream)> {
    let body: Arc<[u8]> = vec![b'u'; upload].into();
    let sem = Arc::new(Semaphore::new(OPEN_PARALLEL));
    let mut set = JoinSet::new();
    for id in first..first + n {
        let sem = sem.clone();
        let body = body.clone();
        set.spawn(async move {
            let _p = sem.acquire_owned().await;
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                let mut s = http::connect(proxy).await?;
                let head = if body.is_empty() {
                    format!("GET /c/{id} HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
                } else {
                    let declared = body.len() + 1;
                    format!(
                        "POST /c/{id} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {declared}\r\n\r\n"
                    )
                };
                http::write_all(&mut s, head.as_bytes()).await?;
                http::write_all(&mut s, &body).await?;
                Ok::<_, std::io::Error>(s)
            })
            .await;
            (id, r)
        });
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut failed = 0;
    while let Some(j) = set.join_next().await {
        match j {
            Ok((id, Ok(Ok(s)))) => out.push((id, s)),
            _ => failed += 1,
        }
    }
    if failed > 0 {
        eprintln!("rss: {failed} connections failed to open");
    }
    out
}

/// The proxy's memory once it has sat idle after the release, and after how long: read
/// every half second until it is back within 2 % of `before` (nothing left to give back)
/// or for 11 s after the release. What a burst leaves behind differs by allocator: nginx's
/// pools and glibc keep it, jemalloc hands it back over its decay time (10 s) but only
/// while something drives it, as cutoff's background thread does; the reading 1 s after
/// the release (`rss_after_kib`) shows none of that.
async fn idle_rss(pid: u32, before: u64, after_release: u64) -> (u64, f64) {
    // The release was 1 s before `after_release` was read.
    const SINCE_RELEASE: f64 = 1.0;
    let start = Instant::now();
    let mut last = after_release;
    while last as f64 > before as f64 * 1.02 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match http::rss_kib(pid) {
            Ok(now) => last = now,
            Err(_) => break,
        }
    }
    (last, SINCE_RELEASE + start.elapsed().as_secs_f64())
}
