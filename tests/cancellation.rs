//! The core cancellation tests: the real `cutoff` binary between a raw client and the
//! recording upstream (see `common/mod.rs`). Each test makes the client leave, or a timer
//! fire, at a chosen point of the exchange and asserts what the UPSTREAM observed: its
//! connection closed promptly and its response never finished. Then the access log line,
//! and that the route still works.
//!
//! Requests are tagged with a second path segment (`/delay/fin?ms=30000`) so that the
//! upstream records and access-log lines of one scenario are easy to pick out.

mod common;

use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

/// A long upstream call that only a cancellation can end within a test's lifetime.
const LONG_MS: u64 = 30_000;

async fn pair(route_extra: &str) -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config_for(up.addr(), route_extra)).await;
    (up, proxy)
}

/// After a cancellation the route must still serve: a fresh request gets a 200, and the
/// upstream finishes it.
async fn assert_route_still_serves(proxy: &Proxy, up: &Upstream, tag: &str) {
    let path = format!("/delay/{tag}?ms=0");
    let resp = within(
        WAIT,
        "a request after the cancellation",
        http_get(proxy.addr(), &path),
    )
    .await;
    assert_eq!(resp.status, 200, "after the cancellation: {}", resp.text());
    assert_eq!(resp.text(), "done");
    let rec = up.wait_request(&format!("/delay/{tag}"), WAIT).await;
    up.wait_finished(rec.id, WAIT).await;
}

/// The line the hang-up thread logs when it starts (with the proxy's first connection),
/// saying at which priority it runs.
async fn hangup_thread_started(proxy: &Proxy) -> serde_json::Value {
    proxy
        .wait_for_log(
            |v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("the hang-up thread runs at"))
            },
            WAIT,
        )
        .await
}

/// The access-log line of a client that left.
async fn assert_client_closed_logged(proxy: &Proxy, path: &str) -> serde_json::Value {
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, path), WAIT)
        .await;
    assert_access(&line, 499, "client_closed", Some("client"));
    assert_eq!(line["route"], "r", "{line}");
    assert_eq!(line["protected"], false, "{line}");
    line
}

/// The client sends `GET path`, waits for the upstream to have the request, and leaves by
/// `leave`. Returns the upstream's record once it saw the close, checked for promptness.
async fn leave_during_long_call(
    up: &Upstream,
    proxy: &Proxy,
    path: &str,
    leave: impl AsyncFnOnce(Client),
) -> RequestRecord {
    let mut c = Client::connect(proxy.addr()).await;
    c.get(path).await;
    let prefix = path.split('?').next().unwrap();
    let rec = up.wait_request(prefix, WAIT).await;
    let left = Instant::now();
    leave(c).await;
    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, PROPAGATION);
    rec
}

/// Waits for `cutoff_upstream_cancelled_total` of route `r` to count one call cancelled
/// by its client in `phase`.
async fn wait_one_cancelled_by_the_client(proxy: &Proxy, phase: &str) {
    let cancelled = [("route", "r"), ("cancelled_by", "client"), ("phase", phase)];
    proxy
        .wait_for_metric(
            "cutoff_upstream_cancelled_total",
            &cancelled,
            |v| v == 1.0,
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fin_while_upstream_works_cancels_it() {
    let (up, proxy) = pair("").await;
    let path = format!("/delay/fin?ms={LONG_MS}");
    leave_during_long_call(&up, &proxy, &path, async |c: Client| c.close_fin().await).await;
    assert_client_closed_logged(&proxy, "/delay/fin").await;
    let client_closed = [("route", "r"), ("outcome", "client_closed")];
    proxy
        .wait_for_metric("cutoff_requests_total", &client_closed, |v| v == 1.0, WAIT)
        .await;
    wait_one_cancelled_by_the_client(&proxy, "awaiting_headers").await;
    assert_route_still_serves(&proxy, &up, "after-fin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rst_while_upstream_works_cancels_it() {
    let (up, proxy) = pair("").await;
    let path = format!("/delay/rst?ms={LONG_MS}");
    leave_during_long_call(&up, &proxy, &path, async |c: Client| c.close_rst()).await;
    assert_client_closed_logged(&proxy, "/delay/rst").await;
    assert_route_still_serves(&proxy, &up, "after-rst").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_during_upload_cancels_it() {
    let (up, proxy) = pair("").await;
    let mut c = Client::connect(proxy.addr()).await;
    let total: u64 = 10 * 1024 * 1024;
    c.send_head(
        "POST",
        "/sink/upload",
        &[("Content-Length", &total.to_string())],
    )
    .await;
    // Part of the body, which the upstream reads as it comes.
    c.send(&vec![b'u'; 1024 * 1024]).await;
    let rec = up
        .wait_record(
            "/sink/upload",
            "the first body bytes of /sink/upload",
            |r| r.body_bytes > 0,
        )
        .await;

    let left = Instant::now();
    c.close_fin().await;

    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, PROPAGATION);
    assert!(!rec.body_complete && rec.body_bytes < total, "{rec:?}");
    assert_client_closed_logged(&proxy, "/sink/upload").await;
    assert_route_still_serves(&proxy, &up, "after-upload").await;
}

/// A client that sent its whole body and leaves while the upstream works left in phase
/// `awaiting_headers`, not `uploading`: hyper's client stops polling a body of known length
/// after its last byte, so the upload's end is noted there, not at a poll that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_after_its_whole_upload_is_counted_awaiting_headers() {
    let (up, proxy) = pair("").await;
    let mut c = Client::connect(proxy.addr()).await;
    let path = format!("/delay/posted?ms={LONG_MS}");
    c.send_head("POST", &path, &[("Content-Length", "1000")])
        .await;
    c.send(&[b'p'; 1000]).await;
    let rec = up
        .wait_record("/delay/posted", "the whole body of /delay/posted", |r| {
            r.body_bytes == 1000
        })
        .await;
    let left = Instant::now();
    c.close_fin().await;
    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, PROPAGATION);
    let line = access_line(&proxy, "/delay/posted").await;
    assert_eq!(line["phase"], "awaiting_headers", "{line}");
    wait_one_cancelled_by_the_client(&proxy, "awaiting_headers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_stream_cancels_it() {
    let (up, proxy) = pair("").await;
    let mut c = Client::connect(proxy.addr()).await;
    c.get("/stream/half?chunks=100&every=50").await;
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    // Client-side pacing: read three chunks' worth (16 bytes each), then leave.
    let mut dec = BodyDecoder::new(head.framing());
    let mut received = 0usize;
    while received < 3 * 16 {
        let piece = c.next_piece(&mut dec, WAIT).await;
        received += piece
            .unwrap_or_else(|end| panic!("stream ended early: {end:?}"))
            .expect("the stream has 100 chunks")
            .len();
    }
    let rec = up.wait_request("/stream/half", WAIT).await;

    let left = Instant::now();
    c.close_fin().await;

    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, PROPAGATION);
    let line = assert_client_closed_logged(&proxy, "/stream/half").await;
    assert!(
        line["bytes_out"].as_u64().unwrap() >= received as u64,
        "bytes_out below what the client received ({received}): {line}"
    );
    assert_route_still_serves(&proxy, &up, "after-stream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_with_a_pipelined_request_cancels_both() {
    let (up, proxy) = pair("").await;
    let mut c = Client::connect(proxy.addr()).await;
    c.send(
        format!(
            "GET /delay/pipe1?ms={LONG_MS} HTTP/1.1\r\nHost: t\r\n\r\n\
             GET /delay/pipe2?ms={LONG_MS} HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let rec = up.wait_request("/delay/pipe1", WAIT).await;

    let left = Instant::now();
    c.close_fin().await;

    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, PROPAGATION);
    assert_client_closed_logged(&proxy, "/delay/pipe1").await;
    assert_route_still_serves(&proxy, &up, "after-pipe").await;
    // The pipelined request's client is gone too: if the proxy forwarded it at all, that
    // call must be cut off as well, never completed.
    for r in up.records_for("/delay/pipe2") {
        up.wait_closed(r.id, WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_while_upstream_holds_the_body_cancels_it() {
    let (up, proxy) = pair("").await;
    let mut c = Client::connect(proxy.addr()).await;
    let total: u64 = 64 * 1024 * 1024;
    c.send_head(
        "POST",
        &format!("/hold-body/h?ms={LONG_MS}"),
        &[("Content-Length", &total.to_string())],
    )
    .await;
    c.send(&vec![b'u'; 64 * 1024]).await;
    let rec = up.wait_request("/hold-body/h", WAIT).await;
    // Fill every buffer between the client and the upstream, which reads nothing: the
    // client's send buffer, the proxy's, the upstream's receive window.
    let written = c
        .write_until_stalled(total - 64 * 1024, Duration::from_millis(500))
        .await;
    assert!(
        written < total - 64 * 1024,
        "the whole body went through a held upstream"
    );

    // A RST: a FIN would queue behind the unsent body bytes and never reach the proxy.
    // For the same reason the proxy must abort its upstream connection (SO_LINGER 0):
    // a FIN from it would queue behind body bytes the upstream's full window refuses.
    let left = Instant::now();
    c.close_rst();

    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, PROPAGATION);
    assert_eq!(rec.body_bytes, 0, "{rec:?}");
    assert_client_closed_logged(&proxy, "/hold-body/h").await;
    assert_route_still_serves(&proxy, &up, "after-hold").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_gives_504_and_cancels_the_upstream() {
    let (up, proxy) = pair(r#"timeout = "300ms""#).await;
    let started = Instant::now();
    let resp = within(
        WAIT,
        "the 504",
        http_get(proxy.addr(), "/delay/slow?ms=5000"),
    )
    .await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    let rec = up.wait_request("/delay/slow", WAIT).await;
    let rec = up.wait_closed(rec.id, WAIT).await;
    let (closed_at, _) = rec.closed.unwrap();
    assert!(
        closed_at.duration_since(started) < Duration::from_secs(3),
        "the upstream saw the close {:?} after the request started, timeout 300ms",
        closed_at.duration_since(started)
    );
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/delay/slow"), WAIT)
        .await;
    assert_access(&line, 504, "timeout", Some("timeout"));
    assert_route_still_serves(&proxy, &up, "after-timeout").await;
}

/// A route timeout is timed to the instant (`src/deadline.rs`: tokio wakes the request
/// early, the kernel's timer finishes the wait), and the early part must never show: no
/// 504, and no upstream close, before the timeout has passed since the client wrote its
/// request. Before the response headers and mid-stream, many at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_never_fires_early() {
    const TIMEOUT: Duration = Duration::from_millis(150);
    let (up, proxy) = pair(r#"timeout = "150ms""#).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let addr = proxy.addr();
        calls.push(tokio::spawn(async move {
            let path = if i % 2 == 0 {
                format!("/delay/early-{i}?ms=5000")
            } else {
                format!("/stream/early-{i}?chunks=100&every=20")
            };
            let mut c = Client::connect(addr).await;
            let wrote = Instant::now();
            c.get(&path).await;
            let head = c.read_head(WAIT).await;
            if i % 2 == 0 {
                assert_eq!(head.status, 504, "{path}");
                let late = wrote.elapsed();
                assert!(
                    late >= TIMEOUT,
                    "{path}: 504 after {late:?}, timeout {TIMEOUT:?}"
                );
            } else {
                assert_eq!(head.status, 200, "{path}");
                let mut dec = BodyDecoder::new(head.framing());
                // The stream is cut at the deadline: its end comes as an error, not a
                // clean last chunk.
                let end = loop {
                    match c.next_piece(&mut dec, WAIT).await {
                        Ok(Some(_)) => {}
                        end => break end,
                    }
                };
                assert!(end.is_err(), "{path}: the cut stream ended cleanly");
            }
            (path, wrote)
        }));
    }
    for call in calls {
        let (path, wrote) = within(WAIT, "a timed-out call", call)
            .await
            .expect("the call");
        let tag = path.split('?').next().unwrap_or(&path).to_string();
        let rec = up.wait_request(&tag, WAIT).await;
        let rec = up.wait_closed(rec.id, WAIT).await;
        let (closed_at, _) = rec.closed.expect("closed");
        let after = closed_at.saturating_duration_since(wrote);
        assert!(
            after >= TIMEOUT,
            "{path}: upstream closed {after:?} after the write"
        );
        assert!(
            rec.finished.is_none(),
            "{path}: the upstream finished anyway"
        );
    }
}

/// `idle_timeout` measures the upstream's silences, not the client's: a response the
/// upstream sends as fast as it can, read by a client that pauses for longer than the idle
/// timeout (so that the proxy's writes block and it stops asking the upstream for more),
/// is delivered whole, byte for byte: each pause fills the client's socket, which holds
/// the body back until hyper's queue is empty (`write_gate.rs`), and the body must go on
/// from exactly there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_does_not_count_a_slow_readers_pauses() {
    let (_up, proxy) = pair(r#"idle_timeout = "100ms""#).await;
    let total: usize = 16 << 20;
    let mut c = Client::connect(proxy.addr()).await;
    // A small receive window, so that a pause soon backs up to the proxy.
    socket2::SockRef::from(c.stream())
        .set_recv_buffer_size(64 * 1024)
        .expect("SO_RCVBUF");
    c.get(&format!("/noise/slow-reader?bytes={total}")).await;
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    let mut dec = BodyDecoder::new(head.framing());
    let got = c
        .read_body_pausing(&mut dec, 2 << 20, Duration::from_millis(300))
        .await;
    if let Err((end, got)) = got {
        let line = proxy
            .wait_for_access_log(|v| log_path_is(v, "/noise/slow-reader"), WAIT)
            .await;
        panic!("the body was cut short ({end:?}) after {got} of {total} bytes: {line}");
    }
    let want = fnv1a(FNV_OFFSET, &Noise::bytes(total));
    assert_eq!(got, Ok((total, want)), "length and digest of the body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_cuts_the_stream_and_cancels_the_upstream() {
    let (up, proxy) = pair(r#"idle_timeout = "200ms""#).await;
    let mut c = Client::connect(proxy.addr()).await;
    c.get("/stream/idle?chunks=10&every=1000").await;
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    let mut dec = BodyDecoder::new(head.framing());
    let first = c.next_piece(&mut dec, WAIT).await;
    assert!(
        matches!(first, Ok(Some(_))),
        "the first chunk comes at once: {first:?}"
    );
    // The next chunk is 1 s away; idle_timeout is 200ms: the body must be cut short (the
    // connection closed without the terminating chunk).
    c.assert_body_cut_short(&mut dec, WAIT, "idle_timeout")
        .await;
    let rec = up.wait_request("/stream/idle", WAIT).await;
    let rec = up.wait_closed(rec.id, WAIT).await;
    assert!(rec.closed.is_some() && rec.finished.is_none());
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/stream/idle"), WAIT)
        .await;
    assert_access(&line, 504, "timeout", Some("timeout"));
    assert_route_still_serves(&proxy, &up, "after-idle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_gives_502() {
    let proxy = Proxy::start(&config_for(refused_addr(), "")).await;
    let resp = within(WAIT, "the 502", http_get(proxy.addr(), "/refused")).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/refused"), WAIT)
        .await;
    assert_access(&line, 502, "upstream_error", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_gives_504() {
    let hang = HangingListener::start().await;
    let config = config_for_url(
        &format!("http://{}", hang.addr()),
        r#"connect_timeout = "200ms""#,
        "",
    );
    let proxy = Proxy::start(&config).await;
    let started = Instant::now();
    let resp = within(WAIT, "the 504", http_get(proxy.addr(), "/hanging")).await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "connect_timeout 200ms took {:?}",
        started.elapsed()
    );
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/hanging"), WAIT)
        .await;
    assert_access(&line, 504, "upstream_error", None);
}

/// A log reader that stops reading (a stuck log shipper) must not hold up cancellation:
/// with the proxy's stderr full, clients leave and every upstream call is still closed.
/// Once the log is read again, every departure's line is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departures_are_cancelled_while_the_log_pipe_is_full() {
    const N: usize = 8;
    // One worker: a worker that notices a departure itself (hyper reads the client's EOF)
    // closes that call and then blocks on its own line, so with the lines written on the
    // hang-up thread at most two of the eight calls would be closed.
    let up = Upstream::start().await;
    let config = config_with_server("workers = 1", up.addr());
    let proxy = Proxy::start(&config).await;
    // The first connection starts the hang-up thread, which says so: a line to be out of
    // the way before the pipe is stalled.
    let resp = http_get(proxy.addr(), "/delay/warm?ms=0").await;
    assert_eq!(resp.status, 200);
    hangup_thread_started(&proxy).await;
    proxy
        .wait_for_access_log(|v| log_path_is(v, "/delay/warm"), WAIT)
        .await;

    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let mut c = Client::connect(proxy.addr()).await;
        c.get(&format!("/delay/stalled-{i}?ms={LONG_MS}")).await;
        clients.push(c);
    }
    let is_stalled = |r: &RequestRecord| r.path_only().starts_with("/delay/stalled-");
    up.wait_for("the held calls", WAIT, |rs| {
        rs.iter().filter(|r| is_stalled(r)).count() == N
    })
    .await;

    let stall = proxy.stall_log_pipe().await;
    let left = Instant::now();
    for c in clients {
        c.close_fin().await;
    }
    let recs = up
        .wait_for("every held call closed, the log unread", WAIT, |rs| {
            rs.iter()
                .filter(|r| is_stalled(r) && r.closed.is_some())
                .count()
                == N
        })
        .await;
    eprintln!(
        "all {N} upstream calls closed {:?} after their clients left, the log pipe full",
        left.elapsed()
    );
    assert!(
        recs.iter()
            .filter(|r| is_stalled(r))
            .all(|r| r.finished.is_none())
    );

    drop(stall);
    let lines = proxy
        .wait_for_access_logs(N, |v| log_path(v).starts_with("/delay/stalled-"), WAIT)
        .await;
    for line in &lines {
        assert_access(line, 499, "client_closed", Some("client"));
    }
    assert_route_still_serves(&proxy, &up, "after-stall").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_leaving_cancel_two_hundred_calls() {
    const N: usize = 200;
    let up = Upstream::start().await;
    let config = config_for_url(&http_url(up.addr()), BURST_CONNECT_TIMEOUT, "");
    let proxy = Proxy::start(&config).await;
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let mut c = Client::connect(proxy.addr()).await;
        c.get(&format!("/delay/many-{i}?ms={LONG_MS}")).await;
        clients.push(c);
    }
    let is_many = |r: &RequestRecord| r.path_only().starts_with("/delay/many-");
    up.wait_for("all 200 requests", Duration::from_secs(20), |rs| {
        rs.iter().filter(|r| is_many(r)).count() == N
    })
    .await;

    let left = Instant::now();
    for c in clients {
        c.close_fin().await;
    }

    let recs = up
        .wait_for("all 200 calls closed", Duration::from_secs(10), |rs| {
            rs.iter()
                .filter(|r| is_many(r) && r.closed.is_some())
                .count()
                == N
        })
        .await;
    let many: Vec<_> = recs.iter().filter(|r| is_many(r)).collect();
    assert!(many.iter().all(|r| r.finished.is_none()));
    let slowest = many
        .iter()
        .map(|r| r.closed.unwrap().0.saturating_duration_since(left))
        .max()
        .unwrap();
    eprintln!("the last of {N} upstream calls saw its close {slowest:?} after the clients left");
    assert!(slowest < Duration::from_secs(5), "{slowest:?}");

    let lines = proxy
        .wait_for_access_logs(
            N,
            |v| log_path(v).starts_with("/delay/many-"),
            Duration::from_secs(10),
        )
        .await;
    for line in &lines {
        assert_access(line, 499, "client_closed", Some("client"));
    }
    assert_route_still_serves(&proxy, &up, "after-many").await;
}

const GIB: u64 = 1 << 30;
/// How much the proxy's RSS may grow while a transfer is in flight.
const RSS_GROWTH_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_through_in_bounded_memory() {
    let (up, proxy) = pair(r#"timeout = "off""#).await;
    let base = rss_baseline(&proxy).await;
    let mut peak = base;

    let mut c = Client::connect(proxy.addr()).await;
    c.send_head("POST", "/sink/gib", &[("Content-Length", &GIB.to_string())])
        .await;
    let block = vec![b'u'; 256 * 1024];
    let mut sent = 0u64;
    while sent < GIB {
        c.send(&block).await;
        sent += block.len() as u64;
        if sent.is_multiple_of(32 << 20) {
            peak = peak.max(proxy.rss_kib());
        }
    }
    let resp = c.read_response(Duration::from_secs(60)).await;
    peak = peak.max(proxy.rss_kib());
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), GIB.to_string(), "bytes the upstream counted");

    let rec = up.wait_request("/sink/gib", WAIT).await;
    let rec = up.wait_finished(rec.id, WAIT).await;
    assert_eq!(rec.body_bytes, GIB);
    assert!(
        peak - base < RSS_GROWTH_KIB,
        "the proxy's RSS grew by {} KiB (from {base} to {peak} KiB) during a 1 GiB upload",
        peak - base
    );
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/sink/gib"), WAIT)
        .await;
    assert_access(&line, 200, "ok", None);
}

/// A large upload comes through byte for byte. Its client connection switches to 64 KiB
/// reads partway (after 1 MiB read in full 8 KiB reads, see `read_cap.rs`), and hyper's
/// buffer grows under it: the upstream's digest of the body covers the bytes before,
/// across and after the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_upload_arrives_byte_for_byte() {
    const LEN: usize = 24 << 20;
    let (up, proxy) = pair(r#"timeout = "off""#).await;
    let body = Noise::bytes(LEN);
    let want = format!("{LEN} {:016x}", fnv1a(FNV_OFFSET, &body));

    let mut c = Client::connect(proxy.addr()).await;
    c.send_head(
        "POST",
        "/digest/bulk",
        &[("Content-Length", &LEN.to_string())],
    )
    .await;
    for block in body.chunks(256 * 1024) {
        c.send(block).await;
    }
    let resp = c.read_response(Duration::from_secs(60)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.text(),
        want,
        "the upstream's length and digest of the body"
    );
    let rec = up.wait_request("/digest/bulk", WAIT).await;
    up.wait_finished(rec.id, WAIT).await;
}

/// A large download comes through byte for byte, and its upstream connection is kept:
/// the digest catches a chunk dropped, doubled or moved on the way, and the next requests
/// (another bulk download, then a small one) ride the same upstream connection.
///
/// Upstream reads stay at 8 KiB however long the download (`read_cap.rs`). Switching them
/// to 64 KiB after 1 MiB, as a bulk upload does, was measured and not taken: a client that
/// reads nothing lets more than 1 MiB through before its stall shows (the kernel's socket
/// buffers take it), so its download switched too, and the stalled-download tests below
/// saw 163 KiB per download against their 80 KiB bound, for 5 % less CPU per GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_download_arrives_byte_for_byte_and_keeps_its_connection() {
    const LEN: usize = 24 << 20;
    let (up, proxy) = pair(r#"timeout = "off""#).await;
    let want = fnv1a(FNV_OFFSET, &Noise::bytes(LEN));

    let mut c = Client::connect(proxy.addr()).await;
    for round in 0..2 {
        c.get(&format!("/noise/bulk{round}?bytes={LEN}")).await;
        let resp = c.read_response(Duration::from_secs(60)).await;
        assert_eq!(resp.status, 200, "round {round}");
        assert_eq!(resp.body.len(), LEN, "round {round}: bytes downloaded");
        assert_eq!(
            fnv1a(FNV_OFFSET, &resp.body),
            want,
            "round {round}: the digest of the bytes downloaded"
        );
    }
    c.get("/delay/after-bulk?ms=0").await;
    let resp = c.read_response(WAIT).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "done"));
    let conns: Vec<usize> = up.records().iter().map(|r| r.conn).collect();
    assert_eq!(
        conns, [conns[0]; 3],
        "every request on the one kept upstream connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_download_streams_through_in_bounded_memory() {
    let (up, proxy) = pair(r#"timeout = "off""#).await;
    let base = rss_baseline(&proxy).await;
    let mut peak = base;

    let mut c = Client::connect(proxy.addr()).await;
    c.get(&format!("/big/gib?bytes={GIB}")).await;
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    let mut dec = BodyDecoder::new(head.framing());
    let mut received = 0u64;
    let mut next_sample = 0u64;
    loop {
        // Each piece must come within 30 s: the transfer moves or the test fails.
        match c.next_piece(&mut dec, Duration::from_secs(30)).await {
            Ok(Some(piece)) => {
                // Spot checks: a per-byte scan of 1 GiB costs seconds in a debug build.
                assert!(
                    piece.first() == Some(&b'z') && piece.last() == Some(&b'z'),
                    "corrupted body at {received}"
                );
                received += piece.len() as u64;
                if received >= next_sample {
                    peak = peak.max(proxy.rss_kib());
                    next_sample += 32 << 20;
                }
            }
            Ok(None) => break,
            Err(end) => panic!("download cut short after {received} bytes: {end:?}"),
        }
    }
    assert_eq!(received, GIB);

    let rec = up.wait_request("/big/gib", WAIT).await;
    up.wait_finished(rec.id, WAIT).await;
    assert!(
        peak - base < RSS_GROWTH_KIB,
        "the proxy's RSS grew by {} KiB (from {base} to {peak} KiB) during a 1 GiB download",
        peak - base
    );
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/big/gib"), WAIT)
        .await;
    assert_access(&line, 200, "ok", None);
    let bytes_out = line["bytes_out"].as_u64().unwrap();
    assert!(
        (GIB..GIB + 64 * 1024).contains(&bytes_out),
        "bytes_out {bytes_out} for a 1 GiB body"
    );
}

/// The proxy's memory grew by less than `per_kib` for each of `n` requests.
fn assert_little_memory_each(grown_kib: u64, n: usize, per_kib: u64, what: &str) {
    let each = grown_kib / n as u64;
    eprintln!("{n} {what}: {grown_kib} KiB, {each} KiB each");
    assert!(
        grown_kib < per_kib * n as u64,
        "the proxy's RSS grew by {grown_kib} KiB for {n} {what}: {each} KiB each"
    );
}

/// Requests held after an upload keep little memory each. hyper's read buffer doubles
/// after every read that fills it, up to the head limit (64 KiB here), and an upload on
/// loopback fills every read: 107 KiB of memory per request held after a 64 KiB upload,
/// measured in a release build before reads were capped (see `read_cap.rs`); 29 KiB
/// after. The bound sits between the two, with room for a debug build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_uploads_keep_little_memory_each() {
    const N: usize = 200;
    const SENT: usize = 64 * 1024;
    const PER_REQUEST_KIB: u64 = 64;
    let (up, proxy) = burst_pair().await;
    let base = rss_baseline(&proxy).await;
    // Every upload has reached the upstream, all but its last byte: all N are held.
    let clients = hold_uploads(&proxy, &up, "held", N, SENT).await;
    let grown = proxy.rss_kib().saturating_sub(base);
    assert_little_memory_each(grown, N, PER_REQUEST_KIB, "held uploads of 64 KiB");
    drop(clients);
}

/// Downloads whose clients read nothing keep little memory each. hyper queues up to
/// 64 KiB of a response for a client that does not read; the body now hands it at most
/// 16 KiB beyond what the client's socket took (see `write_gate.rs`). Measured in a
/// release build with a client receive buffer of 4 KiB: 102 KiB per stalled download
/// before, 51 after. The clients here have that receive buffer, so that the kernel's
/// share stays small; the bound sits between the two, with room for a debug build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_downloads_keep_little_memory_each() {
    stalled_downloads(r#"timeout = "off""#, "stalled downloads", 80).await;
}

/// The same on a protected route (`on_client_disconnect = "continue"`), whose response
/// comes from a task of its own through a channel (`protected.rs`): its body is held to
/// the client's socket the same way. The channel's frame and the one the task waits to
/// send add two reads of 8 KiB, and the bound has room for two more. Debug build, eight runs each: 83–147 KiB per
/// download before (over the bound in half the runs), 62–87 with the gate and a channel
/// of one frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_protected_downloads_keep_little_memory_each() {
    stalled_downloads(
        "timeout = \"off\"\non_client_disconnect = \"continue\"",
        "stalled downloads on a protected route",
        80 + 32,
    )
    .await;
}

/// Waits until every upstream connection of a [`flooding_upstream`] has blocked, then for
/// the proxy's memory to stop growing; returns it. A write can block for a moment while
/// the proxy is busy with other connections, so the count alone may come early.
async fn stalled_rss(proxy: &Proxy, blocked: &AtomicUsize, n: usize) -> u64 {
    wait_blocked(blocked, n).await;
    settled_rss(proxy).await
}

/// The proxy's RSS once three readings 100 ms apart are within 64 KiB of each other.
async fn settled_rss(proxy: &Proxy) -> u64 {
    settled("the proxy's memory", 64, 3, || proxy.rss_kib()).await
}

/// Streams of one HTTP/2 connection whose client grants the largest windows HTTP/2
/// allows and reads nothing, through a 4 KiB receive buffer: hyper's HTTP/2 server keeps
/// each stream's frames for a socket that takes none of them, up to its send buffer
/// (400 KiB a stream by default). It is limited to the write gate's 16 KiB (`server.rs`):
/// 512 KiB per stalled stream before (debug build), 70–82 after, over an upstream
/// connection of its own each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_streams_keep_little_memory_each() {
    const N: usize = 100;
    const PER_STREAM_KIB: u64 = 128;
    let (addr, blocked) = flooding_upstream().await;
    let config = config_for_url(&http_url(addr), BURST_CONNECT_TIMEOUT, r#"timeout = "off""#);
    let proxy = Proxy::start(&config).await;
    let base = proxy.rss_kib();
    let tcp = connect_small_receiver(proxy.addr()).await;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("HTTP/2 handshake");
    // The client's connection is driven until every response head is in, then held
    // unpolled: it reads nothing more, so its socket fills and the proxy's stall.
    let (pause, paused) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut conn = conn;
        tokio::select! {
            _ = &mut conn => {}
            _ = paused => std::future::pending::<()>().await,
        }
    });
    let mut heads = Vec::with_capacity(N);
    for i in 0..N {
        let mut client = within(WAIT, "a stream", client.clone().ready())
            .await
            .expect("a stream");
        let req = http::Request::get(format!("http://t/flood-{i}"))
            .body(())
            .expect("request");
        let (resp, _) = client.send_request(req, true).expect("send");
        heads.push(resp);
    }
    let mut bodies = Vec::with_capacity(N);
    for resp in heads {
        let resp = within(WAIT, "a response head", resp).await.expect("head");
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    let _ = pause.send(());
    let grown = stalled_rss(&proxy, &blocked, N).await.saturating_sub(base);
    assert_little_memory_each(grown, N, PER_STREAM_KIB, "stalled HTTP/2 streams");
    drop(bodies);
}

/// 200 clients with a 4 KiB receive buffer ask a flooding upstream through a route with
/// `route_extra`, and read nothing; the proxy's memory per download once it settles must
/// stay under `per_request_kib`.
async fn stalled_downloads(route_extra: &str, what: &str, per_request_kib: u64) {
    const N: usize = 200;
    let (addr, blocked) = flooding_upstream().await;
    let config = config_for_url(&http_url(addr), BURST_CONNECT_TIMEOUT, route_extra);
    let proxy = Proxy::start(&config).await;
    let base = proxy.rss_kib();
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let mut c = connect_small_receiver(proxy.addr()).await;
        let req = format!("GET /flood-{i} HTTP/1.1\r\nHost: t\r\n\r\n");
        c.write_all(req.as_bytes()).await.expect("request");
        clients.push(c);
    }
    // The proxy stopped reading from every upstream connection: all N are stalled.
    let grown = stalled_rss(&proxy, &blocked, N).await.saturating_sub(base);
    eprintln!("[cancellation] {what}: {} KiB each", grown / N as u64);
    assert_little_memory_each(grown, N, per_request_kib, what);
    drop(clients);
}

/// Exercises the rest of the harness against the real binary: admin endpoints, metrics,
/// a signal and the exit status. An idle proxy drains at once on SIGTERM and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_smoke_admin_metrics_and_sigterm() {
    let (up, mut proxy) = pair("").await;
    let health = http_get(proxy.admin_addr(), "/healthz").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_route_still_serves(&proxy, &up, "smoke").await;
    let ok = [("route", "r"), ("outcome", "ok")];
    proxy
        .wait_for_metric("cutoff_requests_total", &ok, |v| v >= 1.0, WAIT)
        .await;
    assert!(proxy.url("/x").starts_with("http://127.0.0.1:"));
    assert!(proxy.config_path().exists());
    assert!(proxy.rss_kib() > 0);

    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "exit after SIGTERM: {status:?}\n{}",
        proxy.stderr()
    );
}

/// The route `timeout` is "the whole exchange, until the last response byte" (SPEC). A
/// client that reads the response head and then stops reading (its TCP window closes, the
/// proxy's writes block) must not hold the upstream call past the timeout: the upstream
/// must see its connection closed about `timeout` after the request started, and the
/// access log must say 504 `timeout`. (The idle timer deliberately ignores a slow reader's
/// pauses; the whole-exchange deadline does not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_cuts_a_response_the_client_stopped_reading() {
    let (up, proxy) = pair(r#"timeout = "1s""#).await;
    let total: u64 = 1 << 30;
    let mut c = Client::connect(proxy.addr()).await;
    socket2::SockRef::from(c.stream())
        .set_recv_buffer_size(64 * 1024)
        .expect("SO_RCVBUF");
    let t0 = Instant::now();
    c.get(&format!("/big/not-reading?bytes={total}")).await;
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    // From here on the client reads nothing: its window closes, the proxy's socket buffer
    // fills, hyper stops polling the response body.
    let rec = up.wait_request("/big/not-reading", WAIT).await;
    // 1 s of timeout plus a generous margin: a deadline that still fires would have closed
    // the upstream long before.
    let rec = up.wait_closed(rec.id, Duration::from_secs(6)).await;
    let (closed_at, _) = rec.closed.expect("closed");
    assert!(
        closed_at.saturating_duration_since(t0) < Duration::from_secs(3),
        "the upstream was closed only {:?} after the request started (timeout = 1s)",
        closed_at.saturating_duration_since(t0)
    );
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/big/not-reading"), WAIT)
        .await;
    assert_access(&line, 504, "timeout", Some("timeout"));
    drop(c);
}

/// The hang-up thread's scheduling policy, as the kernel reports it for the running
/// proxy: `SCHED_FIFO` by default where real time is permitted (as root in CI), the normal
/// policy with `hangup_realtime = false` or where it is not; the log says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_thread_runs_at_real_time_priority_where_permitted() {
    // Whether this machine lets a thread of ours take real time, tried on a thread that
    // ends right after.
    let permitted = std::thread::spawn(|| {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: pid 0 is the calling thread; `param` is valid.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
    })
    .join()
    .expect("the probe thread");
    for (extra, wanted) in [("", true), ("hangup_realtime = false", false)] {
        let up = Upstream::start().await;
        let proxy = Proxy::start(&config_with_server(extra, up.addr())).await;
        // The thread starts with the first connection.
        let resp = within(
            WAIT,
            "a request",
            http_get(proxy.addr(), "/delay/prio?ms=0"),
        )
        .await;
        assert_eq!(resp.status, 200);
        let line = hangup_thread_started(&proxy).await;
        let tasks = format!("/proc/{}/task", proxy.pid());
        let tid: i32 = std::fs::read_dir(&tasks)
            .expect("the proxy's threads")
            .filter_map(|e| e.ok())
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "cutoff-hangup")
            })
            .and_then(|e| e.file_name().to_str()?.parse().ok())
            .expect("a thread named cutoff-hangup");
        // SAFETY: sched_getscheduler has no memory-safety preconditions.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        let realtime = wanted && permitted;
        // Real time is asked for with reset-on-fork: nothing it starts inherits it.
        let expected = if realtime {
            libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK
        } else {
            libc::SCHED_OTHER
        };
        assert_eq!(
            policy, expected,
            "config {extra:?}, permitted {permitted}: {line}"
        );
        let says_realtime = line["message"]
            .as_str()
            .is_some_and(|m| m.contains("real-time priority"));
        if wanted {
            assert_eq!(says_realtime, realtime, "{line}");
        }
    }
}
