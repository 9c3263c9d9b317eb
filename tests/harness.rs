//! Self-tests of the test harness in `common/`, without the proxy: the recording upstream
//! must notice a client (standing in for the proxy) leaving, with a FIN or a RST, whatever
//! it is doing at that moment, or the cancellation tests would prove nothing. Also checks
//! that each upstream behaviour speaks correct HTTP/1.1, and that `HangingListener` really
//! makes connects hang.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The bound on the upstream noticing a close: the kernel tells it at once, so 1 s is
/// plenty even on a loaded machine.
const NOTICE: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_fin_during_delay() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.get("/delay?ms=5000").await;
    let rec = up.wait_request("/delay", WAIT).await;

    let left = Instant::now();
    c.close_fin().await;

    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, NOTICE);
    assert_eq!(rec.closed.unwrap().1, CloseKind::Eof, "{rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_rst_during_delay() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.get("/delay?ms=5000").await;
    let rec = up.wait_request("/delay", WAIT).await;

    let left = Instant::now();
    c.close_rst();

    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, NOTICE);
    // Either is acceptable; say which this kernel gave.
    eprintln!("a RST was recorded as {:?}", rec.closed.unwrap().1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_fin_while_body_is_held_unread() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.send_head(
        "POST",
        "/hold-body?ms=30000",
        &[("Content-Length", "1048576")],
    )
    .await;
    // Small enough to fit in the upstream's receive window, so that the FIN behind it is
    // delivered although the upstream reads nothing.
    c.send(&[b'x'; 32 * 1024]).await;
    let rec = up.wait_request("/hold-body", WAIT).await;

    let left = Instant::now();
    c.close_fin().await;

    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, NOTICE);
    assert_eq!(rec.body_bytes, 0, "the held body must stay unread: {rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_rst_while_body_is_held_unread() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.send_head(
        "POST",
        "/hold-body?ms=30000",
        &[("Content-Length", "67108864")],
    )
    .await;
    let written = c
        .write_until_stalled(64 << 20, Duration::from_millis(300))
        .await;
    let rec = up.wait_request("/hold-body", WAIT).await;

    let left = Instant::now();
    c.close_rst();

    let rec = up.wait_closed(rec.id, WAIT).await;
    assert_closed_promptly(&rec, left, NOTICE);
    eprintln!(
        "wrote {written} bytes before stalling; the RST was recorded as {:?}",
        rec.closed.unwrap().1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reads_a_held_body_afterwards() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.send_head(
        "POST",
        "/hold-body?ms=200",
        &[("Content-Length", "1000000")],
    )
    .await;
    c.send(&vec![b'x'; 1_000_000]).await;
    let resp = c.read_response(WAIT).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "1000000"));
    let rec = up.wait_finished(0, WAIT).await;
    assert!(rec.body_complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_close_while_streaming() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.get("/stream?chunks=100&every=50").await;
    let head = c.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    let mut dec = BodyDecoder::new(head.framing());
    let mut got = 0;
    while got < 3 * 16 {
        got += c.next_piece(&mut dec, WAIT).await.unwrap().unwrap().len();
    }
    let left = Instant::now();
    c.close_fin().await;
    let rec = up.wait_closed(0, WAIT).await;
    assert_closed_promptly(&rec, left, NOTICE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_serves_two_requests_on_one_connection() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.get("/delay/one?ms=10").await;
    let r1 = c.read_response(WAIT).await;
    c.get("/anything").await;
    let r2 = c.read_response(WAIT).await;
    assert_eq!((r1.status, r1.text().as_str()), (200, "done"));
    assert_eq!((r2.status, r2.text().as_str()), (200, "ok"));
    let recs = up
        .wait_for("two finished requests", WAIT, |rs| {
            rs.len() == 2 && rs.iter().all(|r| r.finished.is_some())
        })
        .await;
    assert_eq!(up.connections_accepted(), 1);
    assert_eq!((recs[0].conn, recs[1].conn), (0, 0));
    assert_eq!(recs[0].path, "/delay/one?ms=10");
    assert_eq!(recs[0].path_only(), "/delay/one");
    assert_eq!(recs[1].header("host"), Some("cutoff-test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_served_in_order() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.send(b"GET /delay?ms=50 HTTP/1.1\r\nHost: t\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    assert_eq!(c.read_response(WAIT).await.text(), "done");
    assert_eq!(c.read_response(WAIT).await.text(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_sends_chunks() {
    let up = Upstream::start().await;
    let resp = http_get(up.addr(), "/stream?chunks=3&every=10&size=5").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.text(), "aaaaabbbbbccccc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_sends_exactly_n_bytes() {
    let up = Upstream::start().await;
    let resp = http_get(up.addr(), "/big?bytes=1000001").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), Some("1000001"));
    assert_eq!(resp.body.len(), 1_000_001);
    assert!(resp.body.iter().all(|&b| b == b'z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_the_body() {
    let up = Upstream::start().await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let resp = request(up.addr(), "POST", "/echo", &[], &body).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, body);

    // Chunked request body, chunked echo.
    let mut c = Client::connect(up.addr()).await;
    c.send_head("POST", "/echo", &[("Transfer-Encoding", "chunked")])
        .await;
    let mut wire = chunk(b"hello ");
    wire.extend(chunk(b"world"));
    wire.extend(b"0\r\n\r\n");
    c.send(&wire).await;
    let resp = c.read_response(WAIT).await;
    assert_eq!(resp.text(), "hello world");
    assert_eq!(up.wait_finished(1, WAIT).await.body_bytes, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_counts_a_chunked_body() {
    let up = Upstream::start().await;
    let mut c = Client::connect(up.addr()).await;
    c.send_head("POST", "/sink", &[("Transfer-Encoding", "chunked")])
        .await;
    let mut wire = Vec::new();
    for i in 0..100 {
        wire.extend(chunk(&vec![b'q'; 1000 + i]));
    }
    wire.extend(b"0\r\nX-Trailer: yes\r\n\r\n");
    c.send(&wire).await;
    let resp = c.read_response(WAIT).await;
    let expected: usize = (0..100).map(|i| 1000 + i).sum();
    assert_eq!(resp.text(), expected.to_string());
    let rec = up.wait_finished(0, WAIT).await;
    assert_eq!(rec.body_bytes, expected as u64);
    assert!(rec.body_complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_times_out_with_the_records() {
    let up = Upstream::start().await;
    http_get(up.addr(), "/seen").await;
    let waited = tokio::spawn(async move {
        up.wait_for("the impossible", Duration::from_millis(100), |_| false)
            .await;
    })
    .await;
    let panic = waited.expect_err("wait_for must panic on timeout");
    let msg = panic
        .into_panic()
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(
        msg.contains("the impossible") && msg.contains("/seen"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_listener_makes_connects_hang() {
    let hang = HangingListener::start().await;
    let r = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(hang.addr()),
    )
    .await;
    assert!(r.is_err(), "a connect completed: {r:?}");
}

#[tokio::test]
async fn refused_addr_refuses() {
    let addr = refused_addr();
    let r = within(
        WAIT,
        "a refused connect",
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn metric_value_parses_prometheus_text() {
    let text = "# HELP x y\n# TYPE cutoff_requests_total counter\n\
        cutoff_requests_total{route=\"r\",outcome=\"ok\"} 3\n\
        cutoff_requests_total{route=\"r\",outcome=\"client_closed\"} 2\n\
        cutoff_upstream_inflight{route=\"a,b\"} 0\n\
        plain_metric 7.5\n";
    let v = |n, l: &[(&str, &str)]| metric_value(text, n, l);
    assert_eq!(
        v("cutoff_requests_total", &[("outcome", "client_closed")]),
        Some(2.0)
    );
    assert_eq!(v("cutoff_requests_total", &[("route", "r")]), Some(3.0));
    assert_eq!(
        v("cutoff_upstream_inflight", &[("route", "a,b")]),
        Some(0.0)
    );
    assert_eq!(v("plain_metric", &[]), Some(7.5));
    assert_eq!(v("cutoff_requests_total", &[("outcome", "timeout")]), None);
}

#[test]
fn body_decoder_handles_split_input() {
    let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let mut dec = BodyDecoder::new(Framing::Chunked);
    let mut buf = bytes::BytesMut::new();
    let mut out = Vec::new();
    for &b in wire.iter() {
        buf.extend_from_slice(&[b]);
        while let Step::Data(d) = dec.step(&mut buf).unwrap() {
            out.extend_from_slice(&d);
        }
    }
    assert!(dec.is_done());
    assert_eq!(out, b"hello world");
}
