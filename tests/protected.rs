//! Protected routes (`on_client_disconnect = "continue"`), against the real binary: the
//! upstream call outlives its client and the recording upstream sees it finish; what still
//! stops it (a half upload, the route's timeout); and a plain route in the same config
//! still cancels.
//!
//! Requests are tagged (`/pay/delay/left?ms=800`) so that records and log lines of one
//! scenario are easy to pick out. The `pay` route strips its prefix, so the upstream sees
//! `/delay/left?ms=800`; the access log keeps the client's path.

mod common;

use std::time::{Duration, Instant};

use common::*;
use socket2::SockRef;

/// A config with a protected route `pay` (`/pay/`, prefix stripped, `timeout`) and a plain
/// route `plain` (`/`, default `cancel`), both to `upstream`.
fn protected_config(upstream: std::net::SocketAddr, timeout: &str) -> String {
    format!(
        r#"{head}
[upstreams.up]
url = "http://{upstream}"

[[routes]]
name = "pay"
path_prefix = "/pay/"
strip_prefix = true
upstream = "up"
timeout = "{timeout}"
on_client_disconnect = "continue"

[[routes]]
name = "plain"
path_prefix = "/"
upstream = "up"
"#,
        head = config_head("")
    )
}

async fn start(timeout: &str) -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&protected_config(up.addr(), timeout)).await;
    (up, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_call_finishes_after_the_client_leaves_and_plain_route_still_cancels() {
    let (up, proxy) = start("10s").await;

    // The protected call: the client leaves (FIN) once the upstream has the request.
    let mut c = Client::connect(proxy.addr()).await;
    c.get("/pay/delay/left?ms=800").await;
    let rec = up.wait_request("/delay/left", WAIT).await;
    c.close_fin().await;

    // The upstream works to the end: never closed early, finished after its delay.
    let rec = up.wait_finished(rec.id, Duration::from_secs(10)).await;
    assert!(rec.closed.is_none(), "closed early: {rec:?}");
    let took = rec.finished.expect("finished").duration_since(rec.arrived);
    assert!(
        took >= Duration::from_millis(750),
        "the upstream finished after {took:?}, not its 800 ms of work: {rec:?}"
    );

    let line = access_line(&proxy, "/pay/delay/left").await;
    assert_eq!(line["status"].as_u64(), Some(499), "{line}");
    assert_eq!(line["outcome"], "client_closed", "{line}");
    assert_eq!(line["protected"], true, "{line}");
    assert_eq!(line["route"], "pay", "{line}");
    assert_eq!(
        line["level"], "INFO",
        "a client leaving is never an error: {line}"
    );
    assert_eq!(line["bytes_out"].as_u64(), Some(0), "{line}");

    proxy
        .wait_for_metric(
            "cutoff_protected_completed_total",
            &[("route", "pay")],
            |v| v == 1.0,
            WAIT,
        )
        .await;
    proxy
        .wait_for_metric(
            "cutoff_discarded_bytes_total",
            &[("route", "pay")],
            |v| v > 0.0,
            WAIT,
        )
        .await;
    proxy
        .wait_for_metric(
            "cutoff_requests_total",
            &[("route", "pay"), ("outcome", "client_closed")],
            |v| v == 1.0,
            WAIT,
        )
        .await;
    // Not a cancellation: nothing was aborted.
    let metrics = proxy.metrics_text().await;
    for phase in [
        "awaiting_headers",
        "streaming_body",
        "uploading",
        "connecting",
    ] {
        let v = metric_value(
            &metrics,
            "cutoff_upstream_cancelled_total",
            &[("route", "pay"), ("phase", phase)],
        )
        .unwrap_or(0.0);
        assert_eq!(v, 0.0, "pay counted a cancellation in phase {phase}");
    }

    // The plain route of the same config still cancels when its client leaves.
    let mut c = Client::connect(proxy.addr()).await;
    c.get("/delay/plain?ms=30000").await;
    let rec = up.wait_request("/delay/plain", WAIT).await;
    let left = Instant::now();
    c.close_fin().await;
    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, PROPAGATION);
    let line = access_line(&proxy, "/delay/plain").await;
    assert_access(&line, 499, "client_closed", Some("client"));
    assert_eq!(line["route"], "plain", "{line}");
    assert_eq!(line["protected"], false, "{line}");
    proxy
        .wait_for_metric(
            "cutoff_protected_completed_total",
            &[("route", "plain")],
            |v| v == 0.0,
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_call_is_stopped_when_the_client_leaves_mid_upload() {
    let (up, proxy) = start("10s").await;
    let total: u64 = 10 * 1024 * 1024;
    let sent: u64 = 1024 * 1024;

    let mut c = Client::connect(proxy.addr()).await;
    c.send_head(
        "POST",
        "/pay/sink/half",
        &[("Content-Length", &total.to_string())],
    )
    .await;
    let rec = up.wait_request("/sink/half", WAIT).await;
    c.send(&vec![b'u'; sent as usize]).await;
    // The upstream has the first megabyte: the upload is well under way.
    up.wait_for("the first megabyte of the upload", WAIT, |rs| {
        rs[rec.id].body_bytes >= sent || rs[rec.id].closed.is_some()
    })
    .await;
    let left = Instant::now();
    c.close_fin().await;

    // A half request is never completed: the upstream sees its connection close.
    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, PROPAGATION);
    assert!(!rec.body_complete, "{rec:?}");
    assert!(rec.body_bytes < total, "{rec:?}");

    let line = access_line(&proxy, "/pay/sink/half").await;
    assert_eq!(line["status"].as_u64(), Some(499), "{line}");
    assert_eq!(line["outcome"], "client_closed", "{line}");
    assert_eq!(line["route"], "pay", "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    let reason = line["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("request body"),
        "the reason should say the client left during its upload: {line}"
    );
    // It does not count as a protected completion.
    proxy
        .wait_for_metric(
            "cutoff_protected_completed_total",
            &[("route", "pay")],
            |v| v == 0.0,
            WAIT,
        )
        .await;
    // Still serving.
    let resp = within(WAIT, "a request after", http_get(proxy.addr(), "/pay/ok")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    // `protected` means "finished its upstream call after the client left" (SPEC): this
    // call was stopped, so its line must not claim that.
    assert_eq!(line["protected"], false, "{line}");
}

/// A client that stays gets an ordinary exchange. Two shapes of response: one with a
/// `Content-Length` (hyper stops polling a body once its declared length is written, so
/// the end must be noticed with the last frame) and a chunked stream (whose end hyper
/// polls for, to write the last chunk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_route_whose_client_stays_is_a_normal_ok_streamed() {
    let (up, proxy) = start("10s").await;
    let resp = within(
        WAIT,
        "a protected streamed request",
        http_get(proxy.addr(), "/pay/stream/stay?chunks=3&every=20&size=8"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "aaaaaaaabbbbbbbbcccccccc");
    let rec = up.wait_request("/stream/stay", WAIT).await;
    up.wait_finished(rec.id, WAIT).await;

    let line = access_line(&proxy, "/pay/stream/stay").await;
    assert_access(&line, 200, "ok", None);
    assert_eq!(line["route"], "pay", "{line}");
    assert_eq!(line["protected"], false, "{line}");
    assert_eq!(line["bytes_out"].as_u64(), Some(24), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_route_whose_client_stays_is_a_normal_ok() {
    let (up, proxy) = start("10s").await;
    let resp = within(
        WAIT,
        "a protected request",
        http_get(proxy.addr(), "/pay/delay/stay?ms=200"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "done");
    let rec = up.wait_request("/delay/stay", WAIT).await;
    up.wait_finished(rec.id, WAIT).await;

    let line = access_line(&proxy, "/pay/delay/stay").await;
    assert_access(&line, 200, "ok", None);
    assert_eq!(line["route"], "pay", "{line}");
    assert_eq!(line["protected"], false, "{line}");
    assert_eq!(line["bytes_out"].as_u64(), Some(4), "{line}");
    proxy
        .wait_for_metric(
            "cutoff_requests_total",
            &[("route", "pay"), ("outcome", "ok")],
            |v| v == 1.0,
            WAIT,
        )
        .await;
    let metrics = proxy.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "cutoff_protected_completed_total",
            &[("route", "pay")]
        ),
        Some(0.0),
        "a call whose client stayed is not a protected completion"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "cutoff_discarded_bytes_total",
            &[("route", "pay")]
        ),
        Some(0.0),
        "nothing was discarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_call_is_bounded_by_the_route_timeout() {
    let (up, proxy) = start("500ms").await;
    let mut c = Client::connect(proxy.addr()).await;
    let sent = Instant::now();
    c.get("/pay/delay/bounded?ms=5000").await;
    let rec = up.wait_request("/delay/bounded", WAIT).await;
    c.close_fin().await;

    // The client left; the call goes on, but only until the route's timeout.
    let rec = up.wait_closed(rec.id, Duration::from_secs(5)).await;
    let (closed_at, _) = rec.closed.expect("closed");
    let after = closed_at.duration_since(sent);
    assert!(
        after >= Duration::from_millis(450),
        "the upstream saw the close {after:?} after the request: before the 500 ms timeout, \
         so the protected call did not continue: {rec:?}"
    );
    assert!(
        after <= Duration::from_millis(500) + PROPAGATION,
        "the upstream saw the close {after:?} after the request; the timeout is 500 ms: {rec:?}"
    );

    let line = access_line(&proxy, "/pay/delay/bounded").await;
    assert_access(&line, 504, "timeout", Some("timeout"));
    assert_eq!(line["route"], "pay", "{line}");
    proxy
        .wait_for_metric(
            "cutoff_upstream_cancelled_total",
            &[
                ("route", "pay"),
                ("cancelled_by", "timeout"),
                ("phase", "awaiting_headers"),
            ],
            |v| v == 1.0,
            WAIT,
        )
        .await;
    let metrics = proxy.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "cutoff_protected_completed_total",
            &[("route", "pay")]
        ),
        Some(0.0)
    );
    // The call did not finish, so its line must not say `protected` (SPEC: true when a
    // `continue` route finished its upstream call after the client left).
    assert_eq!(line["protected"], false, "{line}");
}

/// A protected chunked response that the route's timeout cuts while its client is not
/// reading: the task's last frames find the channel to the client full, and the channel
/// closes. That must reach the client as a body cut short (no final chunk), never as a
/// whole one. (The connection's own watch of the deadline ends it too, so this passes
/// without `ProtectedBody`'s check that the task saw the response's end; that check is
/// for an `idle_timeout` firing just when the channel is full, which no test can time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_response_cut_while_its_client_is_behind_ends_unfinished() {
    let (up, proxy) = start("500ms").await;
    let mut c = Client::over(connect_small_receiver(proxy.addr()).await);
    c.get("/pay/stream/cut?chunks=1000000&every=0&size=4096")
        .await;
    up.wait_request("/stream/cut", WAIT).await;
    // The client reads nothing until the call is over.
    let line = access_line(&proxy, "/pay/stream/cut").await;
    assert_eq!(line["outcome"], "timeout", "{line}");
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.framing(), Framing::Chunked, "{head:?}");
    let (body, end) = c.read_body_until_end(&head, WAIT).await;
    assert!(
        end.is_err(),
        "the client got a whole chunked body ({} bytes) of a response the timeout cut",
        body.len()
    );
}

/// `idle_timeout` holds on a protected route too: an upstream silent for longer between two
/// chunks is cut (504 `timeout`), whether or not its client stays, instead of holding the
/// call until the route's whole timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_call_is_bounded_by_the_idle_timeout() {
    let up = Upstream::start().await;
    let config = protected_config(up.addr(), "30s").replace(
        "on_client_disconnect = \"continue\"",
        "on_client_disconnect = \"continue\"\nidle_timeout = \"200ms\"",
    );
    let proxy = Proxy::start(&config).await;
    let mut c = Client::connect(proxy.addr()).await;
    c.get("/pay/stream/idle?chunks=10&every=2000").await;
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    let mut dec = BodyDecoder::new(head.framing());
    let first = c.next_piece(&mut dec, WAIT).await;
    assert!(matches!(first, Ok(Some(_))), "the first chunk: {first:?}");
    c.assert_body_cut_short(&mut dec, WAIT, "idle_timeout")
        .await;
    let rec = up.wait_request("/stream/idle", WAIT).await;
    let rec = up.wait_closed(rec.id, WAIT).await;
    assert!(
        rec.finished.is_none(),
        "the upstream was cut, not finished: {rec:?}"
    );
    let line = access_line(&proxy, "/pay/stream/idle").await;
    assert_access(&line, 504, "timeout", Some("timeout"));
    assert!(
        line["reason"]
            .as_str()
            .unwrap_or("")
            .contains("idle_timeout"),
        "{line}"
    );
}

/// `idle_timeout` on a protected route bounds the upstream's silences, not the client's
/// pauses: an upstream that has the whole response ready at once, read by a client that
/// pauses now and then for longer than the idle timeout, is delivered whole. (While the
/// client pauses, the call waits to hand it the next chunk; the idle timer must not run
/// on through that wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_idle_timeout_does_not_count_a_slow_clients_pauses() {
    let up = Upstream::start().await;
    let config = protected_config(up.addr(), "30s").replace(
        "on_client_disconnect = \"continue\"",
        "on_client_disconnect = \"continue\"\nidle_timeout = \"100ms\"",
    );
    let proxy = Proxy::start(&config).await;
    let total: usize = 24 << 20;
    let mut c = Client::connect(proxy.addr()).await;
    // A small receive window, so that a pause soon backs up to the proxy.
    SockRef::from(c.stream())
        .set_recv_buffer_size(64 * 1024)
        .expect("SO_RCVBUF");
    c.get(&format!("/pay/noise/slow-reader?bytes={total}"))
        .await;
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    let mut dec = BodyDecoder::new(head.framing());
    // The client's own pauses, the behaviour under test.
    let got = c
        .read_body_pausing(&mut dec, 1536 * 1024, Duration::from_millis(300))
        .await;
    if let Err((end, got)) = got {
        let line = access_line(&proxy, "/pay/noise/slow-reader").await;
        panic!(
            "the body was cut short ({end:?}) after {got} of {total} bytes; \
             the upstream never paused: {line}"
        );
    }
    let want = fnv1a(FNV_OFFSET, &Noise::bytes(total));
    assert_eq!(got, Ok((total, want)), "length and digest of the body");
    let line = access_line(&proxy, "/pay/noise/slow-reader").await;
    assert_access(&line, 200, "ok", None);
}
