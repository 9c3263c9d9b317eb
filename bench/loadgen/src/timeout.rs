//! `timeout`: precision of a route timeout. The upstream never answers requests to
//! `/t/{id}`; per request, relative to the instant its bytes were written, note when the
//! proxy's response (expected 504) arrives and when the upstream saw its call closed.
//! Reported as lateness: arrival − timeout and close − timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::http::{self, HOST};
use crate::stats;
use crate::upstream::{Mode, Upstream};
use crate::{Args, emit};

struct Sample {
    id: u64,
    start: Instant,
    arrival: Option<Instant>,
    status: Option<u16>,
}

pub async fn run(args: &Args) -> Result<(), String> {
    let proxy = args.addr("proxy")?;
    let up_addr = args.addr("upstream")?;
    let n: u64 = args.num("n", None)?;
    let conc: u64 = args.num("concurrency", Some(10))?;
    let timeout = args.ms("timeout-ms", 200)?;
    let label = args.str("label", "proxy");
    if n == 0 || n > 100_000 || conc == 0 || conc > 1000 {
        return Err("--n 1..100000, --concurrency 1..1000".into());
    }
    let up = Upstream::start(up_addr, Mode::Hold).await?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(1));
    let wait_limit = timeout * 10 + Duration::from_secs(5);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..conc {
        let next = next.clone();
        tasks.spawn(async move {
            // Stagger the workers over one timeout so requests are not in lock-step.
            tokio::time::sleep(timeout * w as u32 / conc as u32).await;
            let mut out = Vec::new();
            for _ in 0..n {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id > n {
                    break;
                }
                out.push(one(proxy, id, wait_limit).await);
            }
            out
        });
    }
    let mut samples: Vec<Sample> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        samples.extend(r.map_err(|e| e.to_string())?);
    }
    // Give the upstream side a moment to see closes that come after the response.
    let ids: Vec<u64> = samples.iter().map(|s| s.id).collect();
    up.wait_until(Instant::now() + Duration::from_secs(1), |r| {
        ids.iter().all(|id| {
            r.get(id)
                .is_none_or(|x| x.arrived.is_none() || x.closed.is_some())
        })
    })
    .await;

    let t_us = timeout.as_secs_f64() * 1e6;
    let mut late_resp = Vec::new();
    let mut late_close = Vec::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let (mut not_arrived, mut never_closed) = (0u64, 0u64);
    for s in &samples {
        let key = s.status.map_or("none".to_string(), |c| c.to_string());
        *statuses.entry(key).or_default() += 1;
        if let Some(a) = s.arrival {
            late_resp.push((a - s.start).as_secs_f64() * 1e6 - t_us);
        }
        let rec = up.get(s.id);
        match (rec.arrived, rec.closed) {
            (None, _) => not_arrived += 1,
            (Some(_), Some(c)) => {
                late_close.push((c.max(s.start) - s.start).as_secs_f64() * 1e6 - t_us)
            }
            (Some(_), None) => never_closed += 1,
        }
    }
    up.release_all();
    let sr = stats::summarize(&late_resp);
    let sc = stats::summarize(&late_close);
    println!(
        "timeout {label} ({timeout:?}, n={n}, concurrency={conc}): response − timeout: {}; \
         upstream close − timeout: {}; statuses {statuses:?}; not_arrived={not_arrived} \
         upstream_never_closed={never_closed}",
        stats::fmt(sr),
        stats::fmt(sc),
    );
    emit(json!({
        "bench": "timeout",
        "proxy": label,
        "timeout_ms": timeout.as_millis() as u64,
        "n": n,
        "concurrency": conc,
        "statuses": statuses,
        "not_arrived": not_arrived,
        "upstream_never_closed": never_closed,
        "late_response_us": stats::to_json(sr),
        "late_close_us": stats::to_json(sc),
        "seconds": stats::round1(started.elapsed().as_secs_f64()),
    }));
    Ok(())
}

async fn one(proxy: SocketAddr, id: u64, limit: Duration) -> Sample {
    let mut sample = Sample {
        id,
        start: Instant::now(),
        arrival: None,
        status: None,
    };
    let Ok(mut s) = http::connect(proxy).await else {
        return sample;
    };
    sample.start = Instant::now();
    let req = format!("GET /t/{id} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    if http::write_all(&mut s, req.as_bytes()).await.is_err() {
        return sample;
    }
    let mut buf = Vec::new();
    if let Ok(Ok(Some(n))) = tokio::time::timeout(limit, http::read_head(&mut s, &mut buf)).await {
        sample.arrival = Some(Instant::now());
        sample.status = http::parse_head(&buf[..n]).map(|h| h.status);
    }
    sample
}
