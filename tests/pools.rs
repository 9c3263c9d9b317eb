//! Upstream pools, end to end: the real `cutoff` binary in front of several endpoints.
//!
//! - Balancing (power of two choices over requests in flight) gives a slow endpoint less
//!   work.
//! - Passive health: an endpoint that refuses connections is ejected, its requests go to
//!   the others (no client sees an error), and it gets traffic again once it recovers.
//! - A client's departure is never the endpoint's failure: 100 clients leaving never eject
//!   anything.
//! - The admission queue never dispatches a call whose client already left, answers 503 at
//!   once when full, and 503 when the wait runs out.
//! - Deadlines travel upstream: the remaining budget is sent at dispatch (after any queue
//!   wait), a client's deadline header or `grpc-timeout` shortens the route's timeout.
//!
//! Every wait is bounded; timing bounds are generous for a loaded 2-core machine.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

// ------------------------------------------------------------------------------------------
// Private helpers
// ------------------------------------------------------------------------------------------

/// A minimal keep-alive HTTP/1.1 upstream that answers every request `200 ok` after a
/// fixed delay of its own, whatever the path, and counts the requests it received. Unlike
/// the harness's [`Upstream`], its delay is per instance (so one of several endpoints can
/// be slow on the same path), and it can bind a given address (to bring a refused port
/// back to life).
struct FixedUpstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FixedUpstream {
    async fn start(delay: Duration) -> FixedUpstream {
        FixedUpstream::bind("127.0.0.1:0".parse().expect("address"), delay).await
    }

    async fn bind(addr: SocketAddr, delay: Duration) -> FixedUpstream {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().expect("address");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            conns.spawn(fixed_serve(stream, delay, counter.clone()));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        FixedUpstream { addr, hits, task }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for FixedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fixed_serve(mut stream: TcpStream, delay: Duration, hits: Arc<AtomicUsize>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        // The tests send bodiless requests; skip a body if one is announced anyway.
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            match stream.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        buf.drain(..len);
        hits.fetch_add(1, Ordering::SeqCst);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let close = head
            .lines()
            .any(|l| l.starts_with("connection:") && l.contains("close"));
        let resp: &[u8] = if close {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        };
        if stream.write_all(resp).await.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// The lines that say an endpoint was ejected.
fn ejection_lines(proxy: &Proxy) -> Vec<Value> {
    proxy
        .logs()
        .into_iter()
        .filter(|v| v["message"] == "endpoint ejected")
        .collect()
}

/// A raw client that has sent `GET path` (keep-alive) with extra headers.
async fn send_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Client {
    let mut c = Client::connect(addr).await;
    c.send_head("GET", path, headers).await;
    c
}

/// The number in a deadline header (milliseconds).
fn header_ms(rec: &RequestRecord, name: &str) -> u64 {
    let v = rec
        .header(name)
        .unwrap_or_else(|| panic!("the upstream got no {name} header: {rec:?}"));
    v.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {v:?} is not a number of ms ({e}): {rec:?}"))
}

// ------------------------------------------------------------------------------------------
// Balancing
// ------------------------------------------------------------------------------------------

/// Three endpoints, one of them slow (200 ms a request, the others 5 ms): a burst of 300
/// requests at concurrency 30 sends clearly fewer to the slow one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoint_gets_less_work() {
    let fast_a = FixedUpstream::start(Duration::from_millis(5)).await;
    let fast_b = FixedUpstream::start(Duration::from_millis(5)).await;
    let slow = FixedUpstream::start(Duration::from_millis(200)).await;
    let urls = [
        http_url(fast_a.addr),
        http_url(fast_b.addr),
        http_url(slow.addr),
    ];
    let proxy = Proxy::start(&pool_config(&urls, "", "")).await;
    let addr = proxy.addr();

    const TOTAL: usize = 300;
    const CONCURRENCY: usize = 30;
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for w in 0..CONCURRENCY {
        workers.spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..TOTAL / CONCURRENCY {
                let r = http_get(addr, &format!("/balance/{w}-{i}")).await;
                statuses.push(r.status);
            }
            statuses
        });
    }
    let statuses: Vec<u16> = within(
        Duration::from_secs(60),
        "the burst of 300 requests",
        async {
            let mut all = Vec::new();
            while let Some(r) = workers.join_next().await {
                all.extend(r.expect("a worker panicked"));
            }
            all
        },
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(statuses.len(), TOTAL);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request succeeds: {statuses:?}"
    );

    let (a, b, s) = (fast_a.hits(), fast_b.hits(), slow.hits());
    eprintln!(
        "[pools] balancing split over {TOTAL} requests in {elapsed:?}: fast_a {a}, fast_b {b}, slow {s}"
    );
    assert_eq!(
        a + b + s,
        TOTAL,
        "every request reached exactly one endpoint"
    );
    let fast_avg = (a + b) as f64 / 2.0;
    assert!(
        (s as f64) < 0.6 * fast_avg,
        "the slow endpoint got {s} requests, not clearly fewer than the fast ones' average \
         {fast_avg} (fast_a {a}, fast_b {b})"
    );
    assert!(a > 0 && b > 0, "both fast endpoints get work: {a}, {b}");
}

// ------------------------------------------------------------------------------------------
// Passive health
// ------------------------------------------------------------------------------------------

/// An endpoint that refuses connections, among two good ones: it is ejected, no client sees
/// an error, and once something listens on its port again it gets traffic after the
/// back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_endpoint_is_ejected_and_comes_back() {
    let good_a = FixedUpstream::start(Duration::ZERO).await;
    let good_b = FixedUpstream::start(Duration::ZERO).await;
    let dead = RefusedPort::reserve();
    let dead_url = http_url(dead.addr);
    let urls = [
        http_url(good_a.addr),
        http_url(good_b.addr),
        dead_url.clone(),
    ];
    let proxy = Proxy::start(&pool_config(&urls, "", "")).await;

    // 50 requests, 5 at a time.
    let addr = proxy.addr();
    let mut workers = JoinSet::new();
    for w in 0..5 {
        workers.spawn(async move {
            for i in 0..10 {
                let r = http_get(addr, &format!("/health/{w}-{i}")).await;
                assert_eq!(
                    r.status,
                    200,
                    "request {w}-{i} while an endpoint refuses: {}",
                    r.text()
                );
            }
        });
    }
    within(Duration::from_secs(30), "50 requests", async {
        while let Some(r) = workers.join_next().await {
            r.expect("a client saw an error");
        }
    })
    .await;
    assert_eq!(
        good_a.hits() + good_b.hits(),
        50,
        "the good endpoints served all 50 requests"
    );
    let lines = proxy
        .wait_for_access_logs(50, |v| log_path(v).starts_with("/health/"), WAIT)
        .await;
    for v in &lines {
        assert_access(v, 200, "ok", None);
    }

    let ejected = proxy
        .wait_for_log(
            |v| v["message"] == "endpoint ejected" && v["endpoint"] == dead_url.as_str(),
            WAIT,
        )
        .await;
    assert_eq!(ejected["level"], "WARN", "{ejected}");
    let text = proxy.metrics_text().await;
    let ejections = metric(
        &text,
        "cutoff_endpoint_ejections_total",
        &[("upstream", "up"), ("endpoint", &dead_url)],
    );
    assert!(
        ejections >= 1.0,
        "the refusing endpoint's ejections: {ejections}"
    );
    for good in [&urls[0], &urls[1]] {
        let n = metric(
            &text,
            "cutoff_endpoint_ejections_total",
            &[("upstream", "up"), ("endpoint", good)],
        );
        assert_eq!(n, 0.0, "a good endpoint ({good}) was ejected");
    }

    // It recovers: something listens on its port again. Within the back-off (at most a few
    // seconds after so few failures) it gets real traffic again.
    let revived = FixedUpstream::bind(dead.release(), Duration::ZERO).await;
    let recovered = Instant::now();
    within(
        Duration::from_secs(10),
        "the recovered endpoint to get traffic again",
        async {
            let mut i = 0;
            while revived.hits() == 0 {
                let r = http_get(proxy.addr(), &format!("/again/{i}")).await;
                assert_eq!(r.status, 200, "request {i} after recovery: {}", r.text());
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!(
                "[pools] the recovered endpoint got traffic {:?} after it listened again, \
                 after {i} requests",
                recovered.elapsed()
            );
        },
    )
    .await;
}

/// 100 clients leave (FIN) while a pool of two endpoints works on their slow calls: every
/// upstream call is seen closing, and no endpoint is blamed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_departures_never_eject_endpoints() {
    let up_a = Upstream::start().await;
    let up_b = Upstream::start().await;
    let urls = [http_url(up_a.addr()), http_url(up_b.addr())];
    let proxy = Proxy::start(&pool_config(&urls, BURST_CONNECT_TIMEOUT, "")).await;

    const N: usize = 100;
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        clients.push(send_get(proxy.addr(), &format!("/delay/leave-{i}?ms=30000"), &[]).await);
    }
    let arrived = |up: &Upstream| up.records_for("/delay/leave-").len();
    poll_until(
        Duration::from_secs(15),
        "all 100 calls to reach the upstreams",
        || arrived(&up_a) + arrived(&up_b) == N,
    )
    .await;
    eprintln!(
        "[pools] the 100 slow calls were split {} / {}",
        arrived(&up_a),
        arrived(&up_b)
    );

    let left = Instant::now();
    for c in clients {
        c.close_fin().await;
    }
    for up in [&up_a, &up_b] {
        up.wait_for(
            "every call whose client left closed",
            Duration::from_secs(15),
            |rs| {
                rs.iter()
                    .filter(|r| r.path_only().starts_with("/delay/leave-"))
                    .all(|r| r.closed.is_some() || r.finished.is_some())
            },
        )
        .await;
        for r in up.records_for("/delay/leave-") {
            assert!(
                r.closed.is_some() && r.finished.is_none(),
                "call #{} was not cut off: {r:?}",
                r.id
            );
        }
    }
    eprintln!(
        "[pools] all 100 upstream calls closed within {:?} of the clients leaving",
        left.elapsed()
    );

    let lines = proxy
        .wait_for_access_logs(
            N,
            |v| log_path(v).starts_with("/delay/leave-"),
            Duration::from_secs(10),
        )
        .await;
    for v in &lines {
        assert_access(v, 499, "client_closed", Some("client"));
    }

    let text = proxy.metrics_text().await;
    for u in &urls {
        let n = metric(
            &text,
            "cutoff_endpoint_ejections_total",
            &[("upstream", "up"), ("endpoint", u)],
        );
        assert_eq!(n, 0.0, "endpoint {u} was ejected for clients leaving");
        let inflight = metric(
            &text,
            "cutoff_endpoint_inflight",
            &[("upstream", "up"), ("endpoint", u)],
        );
        assert_eq!(inflight, 0.0, "endpoint {u} still counts calls in flight");
    }
    let ejected = ejection_lines(&proxy);
    assert!(
        ejected.is_empty(),
        "endpoints were ejected for clients leaving: {ejected:?}"
    );

    // The pool still serves, on both endpoints' terms.
    let r = http_get(proxy.addr(), "/delay/after?ms=0").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Route timeouts are not the endpoints' failures either: calls cut off by a 300 ms route
/// timeout while connecting (to an endpoint whose connects hang) or while awaiting headers
/// (from a slow endpoint) never eject anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeouts_never_eject_endpoints() {
    let hanging = HangingListener::start().await;
    let slow = Upstream::start().await;
    let urls = [http_url(hanging.addr()), http_url(slow.addr())];
    let proxy = Proxy::start(&pool_config(
        &urls,
        "connect_timeout = \"10s\"",
        "timeout = \"300ms\"",
    ))
    .await;

    const N: usize = 10;
    let addr = proxy.addr();
    let mut clients = JoinSet::new();
    for i in 0..N {
        clients.spawn(async move { http_get(addr, &format!("/delay/to-{i}?ms=30000")).await });
    }
    within(
        Duration::from_secs(20),
        "10 requests that time out",
        async {
            while let Some(r) = clients.join_next().await {
                let r = r.expect("a client panicked");
                assert_eq!(r.status, 504, "{}", r.text());
            }
        },
    )
    .await;
    let lines = proxy
        .wait_for_access_logs(N, |v| log_path(v).starts_with("/delay/to-"), WAIT)
        .await;
    for v in &lines {
        assert_access(v, 504, "timeout", Some("timeout"));
    }

    let text = proxy.metrics_text().await;
    let by_phase = |phase: &str| {
        metric(
            &text,
            "cutoff_upstream_cancelled_total",
            &[
                ("route", "r"),
                ("phase", phase),
                ("cancelled_by", "timeout"),
            ],
        )
    };
    let (connecting, awaiting) = (by_phase("connecting"), by_phase("awaiting_headers"));
    eprintln!("[pools] timed out while connecting {connecting}, awaiting headers {awaiting}");
    assert_eq!(connecting + awaiting, N as f64, "{text}");
    assert!(
        connecting >= 1.0 && awaiting >= 1.0,
        "both endpoints took calls that timed out: connecting {connecting}, awaiting {awaiting}"
    );
    for u in &urls {
        let n = metric(
            &text,
            "cutoff_endpoint_ejections_total",
            &[("upstream", "up"), ("endpoint", u)],
        );
        assert_eq!(n, 0.0, "endpoint {u} was ejected for route timeouts");
    }
    let ejected = ejection_lines(&proxy);
    assert!(
        ejected.is_empty(),
        "endpoints were ejected for route timeouts: {ejected:?}"
    );
}

// ------------------------------------------------------------------------------------------
// Admission queue
// ------------------------------------------------------------------------------------------

/// Ten calls, two at a time: five of the eight queued clients leave, and the upstream only
/// ever sees the other five. The five are counted as cancelled while queued, and their work
/// as saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_whose_client_left_are_never_dispatched() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config_for_url(
        &http_url(up.addr()),
        "max_inflight = 2\nmax_queue = 100\nqueue_timeout = \"10s\"",
        "",
    ))
    .await;
    let saved_labels = [("route", "r")];
    let before = proxy.metrics_text().await;
    let saved_before = metric(
        &before,
        "cutoff_upstream_saved_seconds_total",
        &saved_labels,
    );

    let mut clients: Vec<(usize, Client)> = Vec::new();
    for i in 0..10 {
        clients.push((
            i,
            send_get(proxy.addr(), &format!("/delay/q{i}?ms=1500"), &[]).await,
        ));
    }
    let first = up
        .wait_for("the first two calls", WAIT, |rs| {
            rs.iter()
                .filter(|r| r.path_only().starts_with("/delay/q"))
                .count()
                >= 2
        })
        .await;
    proxy
        .wait_for_metric(
            "cutoff_queue_length",
            &[("upstream", "up")],
            |v| v == 8.0,
            WAIT,
        )
        .await;
    let dispatched: Vec<String> = first
        .iter()
        .filter(|r| r.path_only().starts_with("/delay/q"))
        .map(|r| r.path_only().to_string())
        .collect();
    assert_eq!(
        dispatched.len(),
        2,
        "exactly two calls dispatched at first: {}",
        up.summary()
    );

    // Five of the queued clients leave.
    let mut leaving = Vec::new();
    let mut staying = Vec::new();
    for (i, c) in clients {
        let path = format!("/delay/q{i}");
        if !dispatched.contains(&path) && leaving.len() < 5 {
            leaving.push((path, c));
        } else {
            staying.push((path, c));
        }
    }
    let left_paths: Vec<String> = leaving.iter().map(|(p, _)| p.clone()).collect();
    for (_, c) in leaving {
        c.close_fin().await;
    }
    let lines = proxy
        .wait_for_access_logs(5, |v| left_paths.iter().any(|p| log_path_is(v, p)), WAIT)
        .await;
    for v in &lines {
        assert_access(v, 499, "client_closed", Some("client"));
        assert_eq!(v["phase"], "queued", "left while queued: {v}");
    }
    proxy
        .wait_for_metric(
            "cutoff_queue_length",
            &[("upstream", "up")],
            |v| v == 3.0,
            WAIT,
        )
        .await;

    // The five that stayed are all served (two, two, then one, 1.5 s each).
    for (path, mut c) in staying {
        let r = within(
            Duration::from_secs(20),
            format!("the response to {path}"),
            c.read_response(Duration::from_secs(20)),
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.text(), "done");
    }
    let seen: Vec<String> = up
        .records_for("/delay/q")
        .iter()
        .map(|r| r.path_only().to_string())
        .collect();
    assert_eq!(
        seen.len(),
        5,
        "the upstream sees exactly the five calls whose clients stayed: {}",
        up.summary()
    );
    for p in &left_paths {
        assert!(
            !seen.contains(p),
            "{p} was dispatched although its client left while queued: {}",
            up.summary()
        );
    }

    let text = proxy.metrics_text().await;
    let queued_cancelled = metric(
        &text,
        "cutoff_upstream_cancelled_total",
        &[
            ("route", "r"),
            ("phase", "queued"),
            ("cancelled_by", "client"),
        ],
    );
    assert_eq!(queued_cancelled, 5.0, "cancelled while queued, by clients");
    let saved_after = metric(&text, "cutoff_upstream_saved_seconds_total", &saved_labels);
    assert!(
        saved_after > saved_before,
        "saved seconds grew: {saved_before} -> {saved_after}"
    );
    eprintln!("[pools] saved seconds {saved_before} -> {saved_after}");
    assert_eq!(
        metric(&text, "cutoff_queue_length", &[("upstream", "up")]),
        0.0
    );
    // Every wait is measured, the abandoned ones included.
    let waits = metric(
        &text,
        "cutoff_queue_wait_seconds_count",
        &[("upstream", "up")],
    );
    assert!(waits >= 8.0, "queue waits measured: {waits}");
}

/// `max_inflight = 1`, `max_queue = 1`: with one call in flight and one queued, a third is
/// answered 503 at once, with outcome `upstream_error` and the queue in the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_at_once() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config_for_url(
        &http_url(up.addr()),
        "max_inflight = 1\nmax_queue = 1\nqueue_timeout = \"10s\"",
        "",
    ))
    .await;

    let _busy = send_get(proxy.addr(), "/delay/busy?ms=5000", &[]).await;
    up.wait_request("/delay/busy", WAIT).await;
    let _waiting = send_get(proxy.addr(), "/delay/waiting?ms=0", &[]).await;
    proxy
        .wait_for_metric(
            "cutoff_queue_length",
            &[("upstream", "up")],
            |v| v == 1.0,
            WAIT,
        )
        .await;

    let t0 = Instant::now();
    let r = within(
        WAIT,
        "the third request",
        http_get(proxy.addr(), "/delay/third?ms=0"),
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(r.status, 503, "a full queue: {}", r.text());
    assert!(
        took < Duration::from_secs(1),
        "a full queue answers at once, not after {took:?}"
    );
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/delay/third"), WAIT)
        .await;
    assert_access(&line, 503, "upstream_error", None);
    let reason = line["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("queue"),
        "the reason mentions the queue: {line}"
    );
    assert!(
        up.records_for("/delay/third").is_empty(),
        "the refused call never reached the upstream: {}",
        up.summary()
    );
}

/// `queue_timeout = "200ms"`: a call that waits that long for a slot gets 503, outcome
/// `upstream_error`, and never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_answers_503() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config_for_url(
        &http_url(up.addr()),
        "max_inflight = 1\nmax_queue = 10\nqueue_timeout = \"200ms\"",
        "",
    ))
    .await;

    let _busy = send_get(proxy.addr(), "/delay/busy?ms=5000", &[]).await;
    up.wait_request("/delay/busy", WAIT).await;

    let t0 = Instant::now();
    let r = within(
        WAIT,
        "the queued request",
        http_get(proxy.addr(), "/delay/late?ms=0"),
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(r.status, 503, "a queue wait that ran out: {}", r.text());
    assert!(
        took >= Duration::from_millis(180) && took < Duration::from_millis(1500),
        "503 after about 200 ms, not {took:?}"
    );
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/delay/late"), WAIT)
        .await;
    assert_access(&line, 503, "upstream_error", None);
    let reason = line["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("queue"),
        "the reason mentions the queue: {line}"
    );
    assert!(
        up.records_for("/delay/late").is_empty(),
        "the timed-out call never reached the upstream: {}",
        up.summary()
    );
}

// ------------------------------------------------------------------------------------------
// Deadlines
// ------------------------------------------------------------------------------------------

const DEADLINE_ROUTE: &str = "timeout = \"5s\"\ndeadline_header = \"x-request-timeout-ms\"\n\
                              accept_deadline_header = \"x-request-timeout-ms\"";

/// Sends `GET path` with `header` (a client deadline of 300 ms) and asserts that it is
/// answered 504 after about 300 ms, not after the route's 5 s.
async fn assert_504_after_300ms(proxy: &Proxy, path: &str, header: (&str, &str), what: &str) {
    let t0 = Instant::now();
    let r = within(
        WAIT,
        what,
        request(proxy.addr(), "GET", path, &[header], b""),
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        took >= Duration::from_millis(250) && took <= Duration::from_secs(2),
        "504 after about 300 ms, not {took:?}"
    );
}

/// A client's deadline header shortens the route's 5 s timeout to 300 ms: 504 after about
/// 300 ms, the upstream told less than 300 ms remain, and its call closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadline_shortens_timeout_and_travels_upstream() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config_for(up.addr(), DEADLINE_ROUTE)).await;

    assert_504_after_300ms(
        &proxy,
        "/delay/short?ms=3000",
        ("x-request-timeout-ms", "300"),
        "the request with a 300 ms deadline",
    )
    .await;
    let rec = up.wait_request("/delay/short", WAIT).await;
    let ms = header_ms(&rec, "x-request-timeout-ms");
    assert!(
        ms > 0 && ms < 300,
        "the upstream is told the remaining budget (0 < ms < 300): {ms}"
    );
    up.wait_closed(rec.id, WAIT).await;
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/delay/short"), WAIT)
        .await;
    assert_access(&line, 504, "timeout", Some("timeout"));

    // Without the header, the route's own 5 s travel.
    let r = http_get(proxy.addr(), "/delay/plain?ms=0").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up.wait_request("/delay/plain", WAIT).await;
    let ms = header_ms(&rec, "x-request-timeout-ms");
    assert!(
        ms > 4000 && ms <= 5000,
        "the route's timeout travels (4000 < ms <= 5000): {ms}"
    );

    // A client may shorten, never lengthen.
    let r = request(
        proxy.addr(),
        "GET",
        "/delay/longer?ms=0",
        &[("x-request-timeout-ms", "60000")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up.wait_request("/delay/longer", WAIT).await;
    let ms = header_ms(&rec, "x-request-timeout-ms");
    assert!(
        ms > 4000 && ms <= 5000,
        "a longer client deadline never lengthens the route's (4000 < ms <= 5000): {ms}"
    );
}

/// On a route with `timeout = "off"` any client deadline is taken, even one far past the end
/// of the clock: it is served, as if no deadline had been asked for, and never panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_client_deadline_on_a_route_without_timeout_is_served() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config_for(
        up.addr(),
        "timeout = \"off\"\naccept_deadline_header = \"x-request-timeout-ms\"",
    ))
    .await;
    for (path, header) in [
        (
            "/delay/endless?ms=0",
            ("x-request-timeout-ms", "18446744073709551615"),
        ),
        ("/delay/grpc?ms=0", ("grpc-timeout", "99999999H")),
    ] {
        let r = within(
            WAIT,
            path,
            request(proxy.addr(), "GET", path, &[header], b""),
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
}

/// The budget sent upstream is computed at dispatch: a call that waited ~500 ms in the
/// admission queue is told about that much less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_is_recomputed_after_the_queue_wait() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config_for_url(
        &http_url(up.addr()),
        "max_inflight = 1\nmax_queue = 10\nqueue_timeout = \"5s\"",
        DEADLINE_ROUTE,
    ))
    .await;

    let mut hold = send_get(proxy.addr(), "/delay/hold?ms=500", &[]).await;
    up.wait_request("/delay/hold", WAIT).await;

    let sent = Instant::now();
    let r = within(
        WAIT,
        "the queued request",
        http_get(proxy.addr(), "/delay/queued?ms=0"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = up.wait_request("/delay/queued", WAIT).await;
    let waited = rec.arrived.saturating_duration_since(sent);
    let waited_ms = waited.as_millis() as u64;
    let ms = header_ms(&rec, "x-request-timeout-ms");
    eprintln!("[pools] waited {waited:?} before dispatch; the upstream was told {ms} ms remain");
    assert!(
        waited >= Duration::from_millis(300),
        "the second call waited for the first (500 ms): {waited:?}"
    );
    // The proxy's clock started after `sent` and it dispatched before `arrived`, so what it
    // promises is at least 5000 - waited (ms rounding aside), and about that much.
    assert!(
        ms + waited_ms + 5 >= 5000,
        "the budget sent ({ms} ms) is more than the wait ({waited_ms} ms) accounts for"
    );
    assert!(
        ms + waited_ms <= 5000 + 250,
        "the budget sent ({ms} ms) ignores the queue wait ({waited_ms} ms)"
    );
    let first = hold.read_response(WAIT).await;
    assert_eq!(first.status, 200);
}

/// `grpc-timeout: 300m` shortens the route's timeout like the deadline header, and the
/// upstream receives it rewritten to the remaining budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_shortens_and_is_rewritten() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config_for(
        up.addr(),
        "timeout = \"5s\"\ndeadline_header = \"x-request-timeout-ms\"",
    ))
    .await;

    assert_504_after_300ms(
        &proxy,
        "/delay/grpc?ms=3000",
        ("grpc-timeout", "300m"),
        "the request with grpc-timeout",
    )
    .await;
    let rec = up.wait_request("/delay/grpc", WAIT).await;
    let grpc = rec
        .header("grpc-timeout")
        .unwrap_or_else(|| panic!("no grpc-timeout upstream: {rec:?}"));
    let n: u64 = grpc
        .strip_suffix('m')
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("grpc-timeout is not `<digits>m`: {grpc:?}"));
    assert!(
        n > 0 && n < 300,
        "grpc-timeout is rewritten to the remaining budget: {grpc}"
    );
    let ms = header_ms(&rec, "x-request-timeout-ms");
    assert!(ms > 0 && ms < 300, "x-request-timeout-ms: {ms}");
    up.wait_closed(rec.id, WAIT).await;
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/delay/grpc"), WAIT)
        .await;
    assert_access(&line, 504, "timeout", Some("timeout"));
}
