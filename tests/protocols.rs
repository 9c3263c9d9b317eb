//! Protocols, end to end against the real `cutoff` binary: HTTPS upstreams (trusted by
//! `ca_file`, or not), the TLS listener with ALPN h2, h2c downstream, HTTP/2 upstreams with
//! one shared connection, gRPC through it, WebSocket tunnels, and certificate reload.
//!
//! As in the other suites, what counts is what the UPSTREAM observed: an HTTP/1.1
//! upstream sees its connection closed; an HTTP/2 upstream sees its handler future or
//! response body dropped by hyper (the stream was reset) while its one TCP connection
//! lives on; a WebSocket upstream sees its connection end. Certificates are made by rcgen
//! for each test (a CA, and leaves for `localhost`/`127.0.0.1` signed by it), written to
//! a temp dir; see `common_tls/mod.rs` for the test upstreams and clients.

mod common;
mod common_tls;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{
    Client, Proxy, Upstream, WAIT, access_line, assert_access, assert_closed_promptly,
    config_with_server, http_get, http_url, log_path, single_route_config, unique_temp_dir,
    wait_log_count, within,
};
use common_tls::*;
use http::{HeaderValue, Version};
use http_body_util::BodyExt;

/// How soon after its cause (a reset stream, a client gone) the upstream must see the
/// cancellation. Propagation takes milliseconds; the bound is generous for a loaded 2-core
/// machine running other suites.
const PROPAGATION: Duration = Duration::from_secs(2);

/// A config with one upstream `up` at `url` and one catch-all route `r`, JSON logs, an
/// admin listener, and a TLS listener when `tls` gives a cert and key.
fn config(
    url: &str,
    upstream_extra: &str,
    route_extra: &str,
    tls: Option<(&Path, &Path)>,
) -> String {
    let tls = tls
        .map(|(cert, key)| {
            format!(
                "\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                cert.display(),
                key.display()
            )
        })
        .unwrap_or_default();
    single_route_config(
        &tls,
        &format!("url = \"{url}\"\n{upstream_extra}"),
        route_extra,
    )
}

fn ca_file(pki: &Pki) -> String {
    format!("ca_file = \"{}\"", pki.ca_pem.display())
}

/// A gRPC request: `application/grpc`, `te: trailers`, one message.
fn grpc_req(scheme: &str, path: &str, msg: &[u8]) -> http::Request<ClientBody> {
    let mut req = h2_req("POST", scheme, path, grpc_frame(msg));
    let h = req.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("te", HeaderValue::from_static("trailers"));
    req
}

fn grpc_messages(body: &[u8]) -> Vec<String> {
    let mut buf = BytesMut::from(body);
    let mut out = Vec::new();
    while let Some(m) = grpc_take(&mut buf) {
        out.push(String::from_utf8_lossy(&m).into_owned());
    }
    assert!(
        buf.is_empty(),
        "trailing bytes after the gRPC messages: {buf:?}"
    );
    out
}

// ------------------------------------------------------------------------------------------
// HTTPS upstreams
// ------------------------------------------------------------------------------------------

/// An HTTPS upstream offering `alpn`, with a certificate for `localhost` signed by the CA
/// of a fresh [`Pki`]; returns the `Pki`, the upstream and its `https://localhost:PORT`.
async fn https_upstream(alpn: &[&[u8]]) -> (Pki, HyperUpstream, String) {
    let pki = Pki::new(unique_temp_dir("pki"));
    let up = HyperUpstream::start(UpstreamOptions {
        tls: Some(server_config(&pki.leaf(1), alpn)),
        ..Default::default()
    })
    .await;
    let url = format!("https://localhost:{}", up.addr().port());
    (pki, up, url)
}

#[tokio::test]
async fn https_upstream_trusted_through_ca_file_is_forwarded() {
    let (pki, up, url) = https_upstream(&[b"http/1.1"]).await;
    // One worker: idle upstream connections are kept per worker thread, and this test
    // counts the connections one worker's sequential calls need.
    let config =
        config(&url, &ca_file(&pki), "", None).replacen("[server]\n", "[server]\nworkers = 1\n", 1);
    let proxy = Proxy::start(&config).await;

    let resp = within(
        WAIT,
        "GET through the https upstream",
        http_get(proxy.addr(), "/bytes/tls?n=100000"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.body == pattern(100_000), "the body changed on the way");
    let call = up.wait_call("/bytes/tls", WAIT).await;
    assert_eq!(call.version, Version::HTTP_11, "ALPN offered only http/1.1");
    let line = access_line(&proxy, "/bytes/tls").await;
    assert_access(&line, 200, "ok", None);

    // Idle TLS connections are pooled and reused like plain ones.
    for i in 0..3 {
        let path = format!("/bytes/tls-again-{i}?n=10");
        let resp = within(WAIT, format!("GET {path}"), http_get(proxy.addr(), &path)).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(
        up.accepted(),
        1,
        "sequential calls should reuse the pooled TLS connection: {}",
        up.summary()
    );
}

#[tokio::test]
async fn https_upstream_with_an_unknown_ca_is_a_502_with_the_tls_reason() {
    let (_pki, up, url) = https_upstream(&[b"http/1.1"]).await;
    // No ca_file: the system roots do not know the test CA.
    let proxy = Proxy::start(&config(&url, "", "", None)).await;

    let resp = within(
        WAIT,
        "GET through the untrusted https upstream",
        http_get(proxy.addr(), "/untrusted"),
    )
    .await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let line = access_line(&proxy, "/untrusted").await;
    assert_access(&line, 502, "upstream_error", None);
    let reason = line["reason"].as_str().unwrap_or("").to_ascii_lowercase();
    assert!(
        reason.contains("tls") || reason.contains("certificate"),
        "the reason should name the TLS/certificate failure: {line}"
    );
    assert!(
        up.calls().is_empty(),
        "no request may reach an untrusted upstream: {}",
        up.summary()
    );
}

#[tokio::test]
async fn https_upstream_negotiates_h2_by_alpn_with_protocol_auto() {
    let (pki, up, url) = https_upstream(&[b"h2", b"http/1.1"]).await;
    let proxy = Proxy::start(&config(&url, &ca_file(&pki), "", None)).await;

    for i in 0..3 {
        let path = format!("/bytes/alpn-{i}?n=50000");
        let resp = within(WAIT, format!("GET {path}"), http_get(proxy.addr(), &path)).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert!(resp.body == pattern(50_000), "the body changed on the way");
    }
    let calls = up.calls();
    assert_eq!(calls.len(), 3, "{}", up.summary());
    for c in &calls {
        assert_eq!(
            c.version,
            Version::HTTP_2,
            "ALPN offered h2: {}",
            up.summary()
        );
    }
    // Whichever connection negotiated h2 is the endpoint's one HTTP/2 connection; at most
    // the first, ALPN-probing connection is extra.
    assert!(
        up.accepted() <= 2,
        "{} connections: {}",
        up.accepted(),
        up.summary()
    );
}

/// README: "Each endpoint has one shared connection". With `protocol = "auto"` over TLS
/// the protocol is learnt from the first connection's ALPN; a burst of first requests
/// must not open a connection each.
#[tokio::test]
async fn https_upstream_auto_h2_burst_shares_one_connection() {
    const N: usize = 20;
    let (pki, up, url) = https_upstream(&[b"h2", b"http/1.1"]).await;
    let proxy = Proxy::start(&config(&url, &ca_file(&pki), "", None)).await;
    let tasks: Vec<_> = (0..N)
        .map(|i| spawn_call(proxy.addr(), format!("/slow/burst-{i}?ms=200")))
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let resp = call_ended(WAIT, &format!("call {i}"), t).await;
        assert_eq!(resp.status, 200, "call {i}: {}", resp.text());
    }
    assert!(
        up.accepted() <= 2,
        "{N} concurrent first calls opened {} TLS connections to an h2 endpoint: {}",
        up.accepted(),
        up.summary()
    );
}

// ------------------------------------------------------------------------------------------
// TLS listener and HTTP/2 downstream
// ------------------------------------------------------------------------------------------

/// Large bodies both ways come through byte for byte, over `h2` to the proxy.
async fn assert_bodies_intact(h2: &H2Sender, scheme: &str, get_path: &str, expect: &[u8]) {
    let resp = send(h2, h2_req("GET", scheme, get_path, Bytes::new()), WAIT).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body.len(), expect.len(), "GET {get_path}: body length");
    assert!(
        resp.body == expect,
        "GET {get_path}: the body changed on the way"
    );

    let body = pattern(256 * 1024 + 7);
    let resp = send(h2, h2_req("POST", scheme, "/echo/h2", body.clone()), WAIT).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body.len(), body.len(), "POST /echo: body length");
    assert!(resp.body == body, "POST /echo: the body changed on the way");
}

/// Opens stream A (a call that only a cancellation ends) and stream B (a short call) on
/// one client connection, waits until `arrived_a` says the upstream has A, then drops A's
/// response future: that resets the stream. Returns when A was dropped, and B's task.
async fn reset_one_of_two(
    h2: &H2Sender,
    scheme: &str,
    path_a: &str,
    path_b: &str,
    arrived: impl Future<Output = ()>,
) -> (Instant, tokio::task::JoinHandle<Collected>) {
    let mut sender_a = h2.clone();
    let req_a = h2_req("GET", scheme, path_a, Bytes::new());
    let a = tokio::spawn(async move { sender_a.send_request(req_a).await });
    let sender_b = h2.clone();
    let req_b = h2_req("GET", scheme, path_b, Bytes::new());
    let b = tokio::spawn(async move { send(&sender_b, req_b, WAIT).await });
    arrived.await;
    let t0 = Instant::now();
    a.abort();
    (t0, b)
}

/// Reads until the first body frame, then drops the response: the stream is reset.
async fn read_one_frame_then_reset(h2: &H2Sender, scheme: &str, path: &str) -> Instant {
    let mut sender = h2.clone();
    let resp = within(
        WAIT,
        format!("response head of {path}"),
        sender.send_request(h2_req("GET", scheme, path, Bytes::new())),
    )
    .await
    .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(resp.status(), 200, "{path}");
    let mut body = resp.into_body();
    let frame = within(WAIT, format!("first body frame of {path}"), body.frame())
        .await
        .expect("a frame, not the end")
        .expect("a frame, not an error");
    assert!(frame.is_data(), "{path}: first frame is data");
    drop(body);
    Instant::now()
}

/// A TLS connection to `proxy` whose client offers only HTTP/1.1.
async fn tls_h1_connect(
    proxy: &Proxy,
    pki: &Pki,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    within(
        WAIT,
        "TLS handshake",
        tls_connect(proxy.addr(), pki.client_config(&[b"http/1.1"])),
    )
    .await
    .expect("TLS handshake")
}

async fn tls_proxy_for(url: &str, upstream_extra: &str) -> (Pki, Proxy) {
    let pki = Pki::new(unique_temp_dir("pki"));
    let proxy = tls_proxy_serving(&pki, &pki.leaf(1), url, upstream_extra).await;
    (pki, proxy)
}

/// A proxy whose TLS listener serves `leaf` (installed under `pki`'s names), in front of
/// the upstream at `url`.
async fn tls_proxy_serving(pki: &Pki, leaf: &Leaf, url: &str, upstream_extra: &str) -> Proxy {
    let (cert, key) = pki.install(leaf);
    Proxy::start(&config(url, upstream_extra, "", Some((&cert, &key)))).await
}

#[tokio::test]
async fn tls_listener_h2_client_to_http1_upstream() {
    let up = Upstream::start().await;
    let (pki, proxy) = tls_proxy_for(&http_url(up.addr()), "").await;
    let h2 = h2_tls_connect(proxy.addr(), &pki).await;

    assert_bodies_intact(&h2, "https", "/big/h2?bytes=300000", &[b'z'; 300_000]).await;
    let rec = up.wait_request("/big/h2", WAIT).await;
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"), "{rec:?}");

    // Two streams on one connection; reset A before its response head.
    let (t0, b) = reset_one_of_two(
        &h2,
        "https",
        "/delay/reset-a?ms=30000",
        "/delay/reset-b?ms=600",
        async {
            up.wait_request("/delay/reset-a", WAIT).await;
            up.wait_request("/delay/reset-b", WAIT).await;
        },
    )
    .await;
    let rec_a = up.wait_request("/delay/reset-a", WAIT).await;
    let rec_a = up.wait_closed(rec_a.id, PROPAGATION * 2).await;
    assert_closed_promptly(&rec_a, t0, PROPAGATION);
    let b = within(WAIT, "stream B", b).await.expect("stream B's task");
    assert_eq!(b.status, 200, "stream B: {}", b.text());
    assert_eq!(b.text(), "done");

    // Reset C while its body streams.
    let t1 = read_one_frame_then_reset(&h2, "https", "/stream/reset-c?chunks=100&every=100").await;
    let rec_c = up.wait_request("/stream/reset-c", WAIT).await;
    let rec_c = up.wait_closed(rec_c.id, PROPAGATION * 2).await;
    assert_closed_promptly(&rec_c, t1, PROPAGATION);

    // The client's connection lives on.
    let after = send(
        &h2,
        h2_req("GET", "https", "/delay/after?ms=0", Bytes::new()),
        WAIT,
    )
    .await;
    assert_eq!(after.status, 200, "{}", after.text());

    assert_access(
        &access_line(&proxy, "/delay/reset-a").await,
        499,
        "client_closed",
        Some("client"),
    );
    assert_access(
        &access_line(&proxy, "/delay/reset-b").await,
        200,
        "ok",
        None,
    );
    assert_access(
        &access_line(&proxy, "/stream/reset-c").await,
        499,
        "client_closed",
        Some("client"),
    );
}

#[tokio::test]
async fn tls_listener_h2_client_to_h2_upstream() {
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let (pki, proxy) = tls_proxy_for(&http_url(up.addr()), "protocol = \"h2\"").await;
    let h2 = h2_tls_connect(proxy.addr(), &pki).await;

    assert_bodies_intact(&h2, "https", "/bytes/h2?n=300000", &pattern(300_000)).await;

    let (t0, b) = reset_one_of_two(
        &h2,
        "https",
        "/slow/reset-a?ms=30000",
        "/slow/reset-b?ms=600",
        async {
            up.wait_call("/slow/reset-a", WAIT).await;
            up.wait_call("/slow/reset-b", WAIT).await;
        },
    )
    .await;
    let a = up.wait_call("/slow/reset-a", WAIT).await;
    let a = up.wait_end(a.id, PROPAGATION * 2).await;
    assert_eq!(a.ended(), Some(End::HandlerDropped), "{}", up.summary());
    let lag = a.end.expect("ended").0.saturating_duration_since(t0);
    assert!(
        lag <= PROPAGATION,
        "the upstream saw the reset {lag:?} after it"
    );
    let b = within(WAIT, "stream B", b).await.expect("stream B's task");
    assert_eq!(b.status, 200, "stream B: {}", b.text());
    assert_eq!(b.text(), "slow done");

    let t1 = read_one_frame_then_reset(&h2, "https", "/drip/reset-c?chunks=100&every=100").await;
    let c = up.wait_call("/drip/reset-c", WAIT).await;
    let c = up.wait_end(c.id, PROPAGATION * 2).await;
    assert_eq!(c.ended(), Some(End::BodyDropped), "{}", up.summary());
    let lag = c.end.expect("ended").0.saturating_duration_since(t1);
    assert!(
        lag <= PROPAGATION,
        "the upstream saw the reset {lag:?} after it"
    );

    let after = send(
        &h2,
        h2_req("GET", "https", "/slow/after?ms=0", Bytes::new()),
        WAIT,
    )
    .await;
    assert_eq!(after.status, 200, "{}", after.text());

    // Every call went over HTTP/2, on one upstream connection that survived the resets.
    for call in up.calls() {
        assert_eq!(call.version, Version::HTTP_2, "{}", up.summary());
        assert_eq!(call.conn, 0, "{}", up.summary());
    }
    assert_eq!(up.accepted(), 1, "{}", up.summary());

    assert_access(
        &access_line(&proxy, "/slow/reset-a").await,
        499,
        "client_closed",
        Some("client"),
    );
    assert_access(&access_line(&proxy, "/slow/reset-b").await, 200, "ok", None);
    assert_access(
        &access_line(&proxy, "/drip/reset-c").await,
        499,
        "client_closed",
        Some("client"),
    );
}

#[tokio::test]
async fn tls_listener_still_speaks_http1_by_alpn() {
    let up = Upstream::start().await;
    let (pki, proxy) = tls_proxy_for(&http_url(up.addr()), "").await;
    let tls = tls_h1_connect(&proxy, &pki).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, ClientBody>(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/big/h1tls?bytes=100000")
        .header("host", "localhost")
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    let resp = within(WAIT, "GET over TLS + HTTP/1.1", async {
        collect(sender.send_request(req).await.expect("response"))
            .await
            .expect("body")
    })
    .await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.body == [b'z'; 100_000][..],
        "the body changed on the way"
    );
}

/// Over TLS too, an answer that comes before the body (a 400 for two `Host` lines) closes
/// with TLS's close and a FIN after the client's last byte, not a reset: the client writes
/// its whole 16 MiB, then reads the 400 to a clean end (`linger.rs`).
#[tokio::test]
async fn tls_answer_before_the_body_closes_cleanly_after_the_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let (pki, proxy) = tls_proxy_for(&http_url(up.addr()), "").await;
    let mut tls = tls_h1_connect(&proxy, &pki).await;
    const BODY: usize = 16 << 20;
    let head =
        format!("POST /tls-early HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: {BODY}\r\n\r\n");
    let written = within(
        Duration::from_secs(30),
        "writing the whole request",
        async {
            tls.write_all(head.as_bytes()).await?;
            tls.write_all(&vec![b'b'; BODY]).await?;
            tls.flush().await
        },
    )
    .await;
    let mut answer = Vec::new();
    let read = within(
        WAIT,
        "reading the answer to its end",
        tls.read_to_end(&mut answer),
    )
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(written.is_ok(), "the client's writes failed: {written:?}");
    assert!(read.is_ok(), "the answer ended with {read:?}: {text}");
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(up.records().is_empty(), "{}", up.summary());
}

/// A request with a body, over TLS, slower than `header_read_timeout`, is never cut by it.
/// Body bytes that hyper reads after announcing the request but before its handler runs
/// (nothing is in flight yet) could start the head clock; the unit tests in
/// `head_timer.rs` pin that order down, which this end-to-end case does not reproduce
/// every time.
#[tokio::test]
async fn tls_request_slower_than_header_read_timeout_is_not_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let pki = Pki::new(unique_temp_dir("pki"));
    let (cert, key) = pki.install(&pki.leaf(1));
    let text = config(&http_url(up.addr()), "", "", Some((&cert, &key))).replacen(
        "[server]\n",
        "[server]\nheader_read_timeout = \"300ms\"\n",
        1,
    );
    let proxy = Proxy::start(&text).await;
    let mut tls = tls_h1_connect(&proxy, &pki).await;
    // Head and body as two records (one per write), in one flush: they arrive together.
    let head = "POST /delay/slow?ms=900 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n";
    tls.write_all(head.as_bytes()).await.expect("head");
    tls.write_all(b"hello").await.expect("body");
    tls.flush().await.expect("flush");
    let mut got = Vec::new();
    within(Duration::from_secs(10), "the response", async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200"),
        "a request in flight was cut: {got:?}"
    );
}

#[tokio::test]
async fn tls_listener_cuts_a_client_that_never_starts_its_handshake() {
    let up = Upstream::start().await;
    let pki = Pki::new(unique_temp_dir("pki"));
    let (cert, key) = pki.install(&pki.leaf(1));
    let text = config(&http_url(up.addr()), "", "", Some((&cert, &key))).replacen(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nheader_read_timeout = \"300ms\"\n",
        1,
    );
    let proxy = Proxy::start(&text).await;
    let mut silent = Client::connect(proxy.addr()).await;
    let started = Instant::now();
    let end = silent.wait_closed_by_peer(Duration::from_secs(5)).await;
    assert_ne!(
        end,
        common::ReadEnd::TimedOut,
        "a silent TLS client holds its slot forever"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "cut after {took:?}, before the timeout"
    );
    // The listener still serves.
    let h2 = h2_tls_connect(proxy.addr(), &pki).await;
    let resp = send(
        &h2,
        h2_req("GET", "https", "/after-silent", Bytes::new()),
        WAIT,
    )
    .await;
    assert_eq!(resp.status, 200);
}

#[tokio::test]
async fn h2c_prior_knowledge_downstream() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&http_url(up.addr()), "", "", None)).await;
    let h2 = h2c_connect(proxy.addr()).await;

    assert_bodies_intact(&h2, "http", "/big/h2c?bytes=300000", &[b'z'; 300_000]).await;

    let (t0, b) = reset_one_of_two(
        &h2,
        "http",
        "/delay/h2c-a?ms=30000",
        "/delay/h2c-b?ms=600",
        async {
            up.wait_request("/delay/h2c-a", WAIT).await;
            up.wait_request("/delay/h2c-b", WAIT).await;
        },
    )
    .await;
    let rec_a = up.wait_request("/delay/h2c-a", WAIT).await;
    let rec_a = up.wait_closed(rec_a.id, PROPAGATION * 2).await;
    assert_closed_promptly(&rec_a, t0, PROPAGATION);
    let b = within(WAIT, "stream B", b).await.expect("stream B's task");
    assert_eq!(b.status, 200, "stream B: {}", b.text());

    // The same listener still serves plain HTTP/1.1.
    let resp = within(WAIT, "GET over HTTP/1.1", http_get(proxy.addr(), "/plain")).await;
    assert_eq!(resp.status, 200);
    assert_access(
        &access_line(&proxy, "/delay/h2c-a").await,
        499,
        "client_closed",
        Some("client"),
    );
}

/// HTTP/2 streams still waiting for response headers when the shutdown's grace runs out
/// get a 503 each, and their upstream calls are closed. hyper runs each stream's request
/// in a task of its own, which the forced end must reach without the connection's task
/// (an HTTP/1.1 request is polled by that task, and needs no wait of its own).
#[tokio::test]
async fn h2_streams_waiting_at_the_forced_end_get_503s() {
    const N: usize = 3;
    let up = Upstream::start().await;
    let config = config_with_server("shutdown_grace = \"300ms\"", up.addr());
    let proxy = Proxy::start(&config).await;
    let h2 = h2c_connect(proxy.addr()).await;
    let calls: Vec<_> = (0..N)
        .map(|i| {
            let h2 = h2.clone();
            let req = h2_req(
                "GET",
                "http",
                &format!("/delay/cut-{i}?ms=30000"),
                Bytes::new(),
            );
            tokio::spawn(async move { send(&h2, req, WAIT * 2).await })
        })
        .collect();
    up.wait_for("the calls", WAIT, |rs| {
        rs.iter()
            .filter(|r| r.path.starts_with("/delay/cut-"))
            .count()
            == N
    })
    .await;

    proxy.signal(libc::SIGTERM);
    for call in calls {
        let resp = within(WAIT, "the answer at the forced end", call)
            .await
            .expect("the stream's task");
        assert_eq!(resp.status, 503);
    }
    for i in 0..N {
        let rec = up.wait_request(&format!("/delay/cut-{i}"), WAIT).await;
        let rec = up.wait_closed(rec.id, WAIT).await;
        assert!(rec.finished.is_none(), "{rec:?}");
    }
    let lines = proxy
        .wait_for_access_logs(N, |v| log_path(v).starts_with("/delay/cut-"), WAIT)
        .await;
    for line in &lines {
        assert_access(line, 503, "shutdown", Some("shutdown"));
    }
}

#[tokio::test]
async fn h2_client_closing_its_connection_cancels_every_stream() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&http_url(up.addr()), "", "", None)).await;
    let (h2, socket) = h2c_connect_killable(proxy.addr()).await;
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let mut sender = h2.clone();
            let req = h2_req(
                "GET",
                "http",
                &format!("/delay/gone-{i}?ms=30000"),
                Bytes::new(),
            );
            tokio::spawn(async move { sender.send_request(req).await })
        })
        .collect();
    up.wait_for("three calls", WAIT, |rs| {
        rs.iter()
            .filter(|r| r.path.starts_with("/delay/gone-"))
            .count()
            == 3
    })
    .await;
    let t0 = Instant::now();
    socket.shutdown(std::net::Shutdown::Both).expect("shutdown");
    for i in 0..3 {
        let rec = up.wait_request(&format!("/delay/gone-{i}"), WAIT).await;
        let rec = up.wait_closed(rec.id, PROPAGATION * 2).await;
        assert_closed_promptly(&rec, t0, PROPAGATION);
    }
    drop(calls);
    let lines = proxy
        .wait_for_access_logs(3, |v| log_path(v).starts_with("/delay/gone-"), WAIT)
        .await;
    for line in &lines {
        assert_access(line, 499, "client_closed", Some("client"));
    }
}

// ------------------------------------------------------------------------------------------
// HTTP/2 upstreams: one shared connection
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_hundred_calls_half_leave_on_one_connection() {
    const N: usize = 100;
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let proxy = Proxy::start(&config(&http_url(up.addr()), "protocol = \"h2\"", "", None)).await;

    let tasks: Vec<_> = (0..N)
        .map(|i| spawn_call(proxy.addr(), format!("/hold/{i}")))
        .collect();
    up.wait_for(&format!("{N} calls"), Duration::from_secs(20), |cs, _| {
        cs.len() >= N
    })
    .await;

    // The odd ones leave.
    let t0 = Instant::now();
    for (i, t) in tasks.iter().enumerate() {
        if i % 2 == 1 {
            t.abort();
        }
    }
    let calls = up
        .wait_for(
            "the departed half reset",
            Duration::from_secs(10),
            |cs, _| {
                cs.iter()
                    .filter(|c| c.ended() == Some(End::HandlerDropped))
                    .count()
                    >= N / 2
            },
        )
        .await;
    for c in calls
        .iter()
        .filter(|c| c.ended() == Some(End::HandlerDropped))
    {
        let lag = c.end.expect("ended").0.saturating_duration_since(t0);
        assert!(
            lag <= PROPAGATION * 2,
            "{} reset {lag:?} after its client left",
            c.path
        );
    }

    up.release();
    for (i, t) in tasks.into_iter().enumerate() {
        if i % 2 == 0 {
            let resp = within(WAIT, format!("call {i}"), t)
                .await
                .expect("the call's task")
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            assert_eq!(resp.status, 200, "call {i}: {}", resp.text());
            assert_eq!(resp.text(), "released", "call {i}");
        }
    }
    up.wait_for("every call ended", WAIT, |cs, _| {
        cs.iter().all(|c| c.end.is_some())
    })
    .await;
    // Give a stray late call or reset a moment to show up before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = up.calls();

    let index = |c: &Call| -> usize {
        c.path_only()
            .trim_start_matches("/hold/")
            .parse()
            .unwrap_or_else(|_| panic!("unexpected call {}", c.path))
    };
    let dropped: BTreeSet<usize> = calls
        .iter()
        .filter(|c| c.ended() == Some(End::HandlerDropped))
        .map(index)
        .collect();
    let completed: BTreeSet<usize> = calls
        .iter()
        .filter(|c| c.ended() == Some(End::Completed))
        .map(index)
        .collect();
    let odd: BTreeSet<usize> = (0..N).filter(|i| i % 2 == 1).collect();
    let even: BTreeSet<usize> = (0..N).filter(|i| i % 2 == 0).collect();
    assert_eq!(
        calls.len(),
        N,
        "each call reached the upstream once: {}",
        up.summary()
    );
    assert_eq!(
        dropped,
        odd,
        "exactly the departed calls were reset: {}",
        up.summary()
    );
    assert_eq!(completed, even, "the others completed: {}", up.summary());
    assert!(
        calls
            .iter()
            .all(|c| c.version == Version::HTTP_2 && c.conn == 0),
        "{}",
        up.summary()
    );
    assert_eq!(
        up.accepted(),
        1,
        "one upstream connection: {}",
        up.summary()
    );

    let lines = proxy
        .wait_for_access_logs(N, |v| log_path(v).starts_with("/hold/"), WAIT)
        .await;
    let outcomes = |o: &str| lines.iter().filter(|v| v["outcome"] == o).count();
    assert_eq!(outcomes("ok"), N / 2, "access log");
    assert_eq!(outcomes("client_closed"), N / 2, "access log");
}

/// A request cancelled while the first HTTP/2 connection is being set up must not fail the
/// requests waiting for the same connection.
async fn cancelled_during_set_up(tls: bool) {
    let pki = Pki::new(unique_temp_dir("pki"));
    let up = HyperUpstream::start(UpstreamOptions {
        tls: tls.then(|| server_config(&pki.leaf(1), &[b"h2"])),
        accept_delay: Duration::from_millis(300),
    })
    .await;
    let (url, extra) = if tls {
        (
            format!("https://localhost:{}", up.addr().port()),
            format!("protocol = \"h2\"\n{}", ca_file(&pki)),
        )
    } else {
        (http_url(up.addr()), "protocol = \"h2\"".to_string())
    };
    let proxy = Proxy::start(&config(&url, &extra, "", None)).await;

    // A starts the set-up: the upstream accepts its TCP connection, then waits 300 ms.
    let mut a = Client::connect(proxy.addr()).await;
    a.get("/slow/setup-a?ms=0").await;
    up.wait_accepted(1, WAIT).await;
    // B waits for the same connection.
    let mut b = Client::connect(proxy.addr()).await;
    b.get("/slow/setup-b?ms=0").await;
    // Let the proxy take B's request in, well within the 300 ms set-up; then A leaves.
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.close_rst();

    let resp = b.read_response(WAIT).await;
    assert_eq!(
        resp.status,
        200,
        "B after A left during the set-up: {}",
        resp.text()
    );
    assert_eq!(resp.text(), "slow done");
    assert_access(&access_line(&proxy, "/slow/setup-b").await, 200, "ok", None);
    assert_access(
        &access_line(&proxy, "/slow/setup-a").await,
        499,
        "client_closed",
        Some("client"),
    );
    // The set-up was not abandoned and redone: one connection.
    assert_eq!(up.accepted(), 1, "{}", up.summary());
}

#[tokio::test]
async fn h2c_set_up_survives_the_first_request_leaving() {
    cancelled_during_set_up(false).await;
}

#[tokio::test]
async fn h2_tls_set_up_survives_the_first_request_leaving() {
    cancelled_during_set_up(true).await;
}

#[tokio::test]
async fn h2_upstream_timeout_resets_only_the_stream() {
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let proxy = Proxy::start(&config(
        &http_url(up.addr()),
        "protocol = \"h2\"",
        "timeout = \"500ms\"",
        None,
    ))
    .await;
    let h2 = h2c_connect(proxy.addr()).await;

    // Before the head: the timer resets the stream, the client gets a 504.
    let resp = send(
        &h2,
        h2_req("GET", "http", "/slow/t-head?ms=30000", Bytes::new()),
        WAIT,
    )
    .await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    let call = up.wait_call("/slow/t-head", WAIT).await;
    let call = up.wait_end(call.id, PROPAGATION).await;
    assert_eq!(call.ended(), Some(End::HandlerDropped), "{}", up.summary());

    // While the body streams: the stream is reset.
    let mut sender = h2.clone();
    let resp = within(
        WAIT,
        "the drip's head",
        sender.send_request(h2_req(
            "GET",
            "http",
            "/drip/t-body?chunks=100&every=100",
            Bytes::new(),
        )),
    )
    .await
    .expect("the drip's head");
    assert_eq!(resp.status(), 200);
    let body = within(WAIT, "the drip's end", resp.into_body().collect()).await;
    assert!(
        body.is_err(),
        "a stream cut by the timeout must not end cleanly"
    );
    let call = up.wait_call("/drip/t-body", WAIT).await;
    let call = up.wait_end(call.id, PROPAGATION).await;
    assert_eq!(call.ended(), Some(End::BodyDropped), "{}", up.summary());

    // The connection was not burnt.
    let resp = send(
        &h2,
        h2_req("GET", "http", "/slow/t-after?ms=0", Bytes::new()),
        WAIT,
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(up.accepted(), 1, "{}", up.summary());
    assert_access(
        &access_line(&proxy, "/slow/t-head").await,
        504,
        "timeout",
        Some("timeout"),
    );
    assert_access(
        &access_line(&proxy, "/drip/t-body").await,
        504,
        "timeout",
        Some("timeout"),
    );
}

#[tokio::test]
async fn h2_upstream_reconnects_after_its_connection_closed() {
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let addr = up.addr();
    let proxy = Proxy::start(&config(
        &format!("http://{addr}"),
        "protocol = \"h2\"",
        "",
        None,
    ))
    .await;
    let resp = within(
        WAIT,
        "first call",
        http_get(proxy.addr(), "/slow/before?ms=0"),
    )
    .await;
    assert_eq!(resp.status, 200);

    // The upstream restarts: its connections close, a new process listens on the port.
    drop(up);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let up = HyperUpstream::start_at(addr, UpstreamOptions::default()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let resp = within(
        WAIT,
        "call after the restart",
        http_get(proxy.addr(), "/slow/after?ms=0"),
    )
    .await;
    assert_eq!(
        resp.status,
        200,
        "after the upstream restarted: {}",
        resp.text()
    );
    assert_eq!(up.accepted(), 1, "{}", up.summary());
}

/// README: an endpoint is ejected "after its second failure in a row". One failed HTTP/2
/// connection set-up is one failure, however many requests were waiting for it.
#[tokio::test]
async fn h2_connect_failure_counts_once_against_the_endpoint() {
    let dead = common::refused_addr();
    let proxy = Proxy::start(&config(
        &format!("http://{dead}"),
        "protocol = \"h2\"",
        "",
        None,
    ))
    .await;
    let resp = within(
        WAIT,
        "a call to a refused endpoint",
        http_get(proxy.addr(), "/refused"),
    )
    .await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_access(
        &access_line(&proxy, "/refused").await,
        502,
        "upstream_error",
        None,
    );
    let text = proxy.metrics_text().await;
    let ejections = common::metric_value(
        &text,
        "cutoff_endpoint_ejections_total",
        &[("upstream", "up")],
    );
    assert_eq!(
        ejections,
        Some(0.0),
        "one refused connection must not eject the endpoint; stderr:\n{}",
        proxy.stderr()
    );
}

// ------------------------------------------------------------------------------------------
// gRPC
// ------------------------------------------------------------------------------------------

async fn grpc_calls(h2: &H2Sender, scheme: &str, up: &HyperUpstream, proxy: &Proxy) {
    // Unary: the message and its trailers arrive intact.
    let resp = send(h2, grpc_req(scheme, "/test.Echo/Unary", b"hello"), WAIT).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.headers.get("content-type").map(HeaderValue::as_bytes),
        Some(&b"application/grpc"[..])
    );
    assert_eq!(grpc_messages(&resp.body), ["echo: hello"]);
    let trailers = resp.trailers.expect("the unary call's trailers");
    assert_eq!(
        trailers.get("grpc-status").map(HeaderValue::as_bytes),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    let call = up.wait_call("/test.Echo/Unary", WAIT).await;
    assert_eq!(call.version, Version::HTTP_2);
    assert_eq!(
        call.headers.get("te").map(HeaderValue::as_bytes),
        Some(&b"trailers"[..]),
        "`te: trailers` must reach a gRPC upstream: {:?}",
        call.headers
    );

    // A trailers-only error: grpc-status in the head, no body.
    let resp = send(h2, grpc_req(scheme, "/test.Echo/Unimplemented", b"?"), WAIT).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.headers.get("grpc-status").map(HeaderValue::as_bytes),
        Some(&b"12"[..]),
        "a trailers-only answer keeps grpc-status: {:?}",
        resp.headers
    );
    assert!(resp.body.is_empty());

    // Server streaming to the end: every message, then the trailers.
    let resp = send(
        h2,
        grpc_req(scheme, "/test.Echo/Stream/all?n=5&every=20", b"go"),
        WAIT,
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        grpc_messages(&resp.body),
        ["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"]
    );
    let trailers = resp.trailers.expect("the streaming call's trailers");
    assert_eq!(
        trailers.get("grpc-status").map(HeaderValue::as_bytes),
        Some(&b"0"[..])
    );

    // Server streaming, cancelled by the client after two messages.
    let mut sender = h2.clone();
    let resp = within(
        WAIT,
        "the streaming call's head",
        sender.send_request(grpc_req(
            scheme,
            "/test.Echo/Stream/cancel?n=1000&every=50",
            b"go",
        )),
    )
    .await
    .expect("the streaming call's head");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 2 {
        let frame = within(WAIT, "a message", body.frame())
            .await
            .expect("more frames")
            .expect("a frame");
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
        while let Some(m) = grpc_take(&mut buf) {
            got.push(m);
        }
    }
    assert_eq!(&got[..2], [Bytes::from("msg-0"), Bytes::from("msg-1")]);
    drop(body);
    let t0 = Instant::now();
    let call = up.wait_call("/test.Echo/Stream/cancel", WAIT).await;
    let call = up.wait_end(call.id, PROPAGATION * 2).await;
    assert_eq!(call.ended(), Some(End::BodyDropped), "{}", up.summary());
    let lag = call.end.expect("ended").0.saturating_duration_since(t0);
    assert!(
        lag <= PROPAGATION,
        "the service saw the cancellation {lag:?} after it"
    );
    assert!(call.sent < 1000, "{}", up.summary());
    assert_access(
        &access_line(proxy, "/test.Echo/Stream/cancel").await,
        499,
        "client_closed",
        Some("client"),
    );
}

#[tokio::test]
async fn grpc_over_h2c_unary_streaming_and_cancel() {
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let proxy = Proxy::start(&config(&http_url(up.addr()), "protocol = \"h2\"", "", None)).await;
    let h2 = h2c_connect(proxy.addr()).await;
    grpc_calls(&h2, "http", &up, &proxy).await;
    assert_eq!(up.accepted(), 1, "{}", up.summary());
}

#[tokio::test]
async fn grpc_over_tls_unary_streaming_and_cancel() {
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let (pki, proxy) = tls_proxy_for(&http_url(up.addr()), "protocol = \"h2\"").await;
    let h2 = h2_tls_connect(proxy.addr(), &pki).await;
    grpc_calls(&h2, "https", &up, &proxy).await;
    assert_eq!(up.accepted(), 1, "{}", up.summary());
}

/// `grpc-timeout` in milliseconds, whatever unit the proxy chose.
fn grpc_timeout_ms(v: &HeaderValue) -> f64 {
    let s = v.to_str().expect("ASCII");
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: f64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("grpc-timeout {s:?}"));
    n * match unit {
        "H" => 3_600_000.0,
        "M" => 60_000.0,
        "S" => 1_000.0,
        "m" => 1.0,
        "u" => 0.001,
        "n" => 0.000_001,
        _ => panic!("grpc-timeout {s:?}: unknown unit"),
    }
}

/// The README: "`grpc-timeout` shortens the route's timeout and is rewritten with the
/// remaining budget when the call is dispatched". A client asking for 10 s on a route cut
/// at 2 s must not make the upstream believe it has 10 s.
async fn grpc_timeout_rewritten(route_extra: &str) {
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let proxy = Proxy::start(&config(
        &http_url(up.addr()),
        "protocol = \"h2\"",
        route_extra,
        None,
    ))
    .await;
    let h2 = h2c_connect(proxy.addr()).await;

    let mut req = grpc_req("http", "/test.Echo/Unary", b"deadline");
    req.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("10S"));
    let resp = send(&h2, req, WAIT).await;
    assert_eq!(resp.status, 200);
    let call = up.wait_call("/test.Echo/Unary", WAIT).await;
    let v = call
        .headers
        .get("grpc-timeout")
        .expect("grpc-timeout reaches the upstream");
    let ms = grpc_timeout_ms(v);
    assert!(
        ms <= 2_000.0 && ms > 1_000.0,
        "the upstream got grpc-timeout {v:?} ({ms} ms); the route's budget was 2 s"
    );

    // A client's shorter grpc-timeout is kept (and counts down).
    let mut req = grpc_req("http", "/test.Echo/Unary/short", b"deadline");
    req.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("500m"));
    let resp = send(&h2, req, WAIT).await;
    assert_eq!(resp.status, 200);
    let call = up.wait_call("/test.Echo/Unary/short", WAIT).await;
    let v = call
        .headers
        .get("grpc-timeout")
        .expect("grpc-timeout reaches the upstream");
    let ms = grpc_timeout_ms(v);
    assert!(ms <= 500.0 && ms > 100.0, "grpc-timeout {v:?} ({ms} ms)");
}

#[tokio::test]
async fn grpc_timeout_is_rewritten_with_the_remaining_budget() {
    grpc_timeout_rewritten("timeout = \"2s\"").await;
}

#[tokio::test]
async fn grpc_timeout_is_rewritten_with_a_deadline_header_too() {
    grpc_timeout_rewritten("timeout = \"2s\"\ndeadline_header = \"x-request-timeout-ms\"").await;
}

#[tokio::test]
async fn grpc_timeout_shortens_the_route_timeout() {
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let proxy = Proxy::start(&config(
        &http_url(up.addr()),
        "protocol = \"h2\"",
        "timeout = \"30s\"",
        None,
    ))
    .await;
    let h2 = h2c_connect(proxy.addr()).await;
    let mut req = grpc_req("http", "/slow/grpc-deadline?ms=30000", b"x");
    req.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("300m"));
    let started = Instant::now();
    let resp = send(&h2, req, WAIT).await;
    let took = started.elapsed();
    assert_ne!(resp.status, 200, "the call must be cut at its grpc-timeout");
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    let call = up.wait_call("/slow/grpc-deadline", WAIT).await;
    let call = up.wait_end(call.id, PROPAGATION).await;
    assert_eq!(call.ended(), Some(End::HandlerDropped), "{}", up.summary());
    let line = access_line(&proxy, "/slow/grpc-deadline").await;
    assert_eq!(line["outcome"], "timeout", "{line}");
}

// ------------------------------------------------------------------------------------------
// WebSocket tunnels
// ------------------------------------------------------------------------------------------

async fn ws_pair(route_extra: &str) -> (WsUpstream, Proxy) {
    let up = WsUpstream::start().await;
    let proxy = Proxy::start(&config(&http_url(up.addr()), "", route_extra, None)).await;
    (up, proxy)
}

async fn echo(ws: &mut WsClient, text: &str) {
    ws.send_text(text).await;
    let (op, payload) = ws
        .recv(WAIT)
        .await
        .unwrap_or_else(|e| panic!("no echo of {text:?}: {e:?}"));
    assert_eq!(op, OP_TEXT);
    assert_eq!(String::from_utf8_lossy(&payload), text);
}

#[tokio::test]
async fn websocket_echo_then_client_leaves_closes_upstream() {
    let (up, proxy) = ws_pair("").await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/echo").await;
    assert_eq!(status, 101);
    echo(&mut ws, "hello through cutoff").await;
    let big = "x".repeat(70_000);
    echo(&mut ws, &big).await;
    let conns = up.conns();
    assert_eq!(conns.len(), 1);
    let head = conns[0].head.to_ascii_lowercase();
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("sec-websocket-key:"), "{head}");

    leave_tunnel(ws, &up, &proxy, (101, "ok", None)).await;
}

/// Drops the client `ws` of the only tunnel through `proxy` to `up`: the upstream must see
/// its side close within [`PROPAGATION`], and the tunnel end with `(status, outcome,
/// cancelled_by)`, counted as such.
async fn leave_tunnel(
    ws: WsClient,
    up: &WsUpstream,
    proxy: &Proxy,
    (status, outcome, cancelled_by): (u64, &str, Option<&str>),
) {
    let t0 = Instant::now();
    drop(ws);
    let conn = up.wait_closed(0, PROPAGATION * 2).await;
    let lag = conn.closed.expect("closed").saturating_duration_since(t0);
    assert!(
        lag <= PROPAGATION,
        "the upstream saw the close {lag:?} after the client left"
    );
    let line = access_line(proxy, "/ws/echo").await;
    assert_access(&line, status, outcome, cancelled_by);
    assert_tunnel_accounting(proxy, cancelled_by).await;
}

/// A client that sends its last frames and then half-closes (FIN) has them delivered: once
/// the HTTP connection became a tunnel, the FIN is the tunnel's to read, after everything
/// sent before it (a WebSocket close frame, say), not a hang-up that drops what is unread.
#[tokio::test]
async fn websocket_last_frames_before_the_client_fin_reach_the_upstream() {
    let (up, proxy) = ws_pair("").await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/echo").await;
    assert_eq!(status, 101);
    echo(&mut ws, "the tunnel is up").await;
    for i in 0..20 {
        ws.send_text(&format!("last words {i}")).await;
    }
    tokio::io::AsyncWriteExt::shutdown(&mut ws.tcp)
        .await
        .expect("half-close");
    up.wait_for("all 21 frames", WAIT, |cs| cs[0].received >= 21)
        .await;
}

/// A client that stops reading while the tunnel has bytes for it makes no progress, and
/// `idle_timeout` ends the tunnel, although what hangs is the proxy's write to that client.
#[tokio::test]
async fn websocket_client_that_stops_reading_is_cut_by_idle_timeout() {
    let (up, proxy) = ws_pair("idle_timeout = \"500ms\"").await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/echo").await;
    assert_eq!(status, 101);
    // Echoes pile up unread until every buffer on the way back is full and the proxy's
    // write to the client blocks; then the client's own writes stall too.
    let frame = ws_encode(OP_TEXT, &[b'x'; 64 * 1024], Some(*b"\x12\x34\x56\x78"));
    let started = Instant::now();
    loop {
        let write = tokio::io::AsyncWriteExt::write_all(&mut ws.tcp, &frame);
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(Ok(())) => {}
            // Stalled, or the proxy already cut the tunnel.
            Ok(Err(_)) | Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the tunnel never stalled"
        );
    }
    let line = access_line(&proxy, "/ws/echo").await;
    assert_access(&line, 504, "timeout", Some("timeout"));
    up.wait_closed(0, WAIT).await;
    assert_tunnel_accounting(&proxy, Some("timeout")).await;
}

/// A cut tunnel is a cancelled upstream call; no tunnel's length is ever wasted or saved
/// time, nor an upstream duration that would inflate the route's typical completion time.
async fn assert_tunnel_accounting(proxy: &Proxy, cancelled_by: Option<&str>) {
    let m = common::Scrape::take(proxy).await;
    let r = [("route", "r")];
    for by in ["client", "timeout", "shutdown"] {
        let labels = [
            ("route", "r"),
            ("cancelled_by", by),
            ("phase", "streaming_body"),
        ];
        let want = if cancelled_by == Some(by) { 1.0 } else { 0.0 };
        m.expect("cutoff_upstream_cancelled_total", &labels, want);
    }
    m.expect("cutoff_upstream_wasted_seconds_total", &r, 0.0);
    m.expect("cutoff_upstream_saved_seconds_total", &r, 0.0);
    m.expect("cutoff_upstream_duration_seconds_count", &r, 0.0);
    let cut = if cancelled_by.is_some() { 1.0 } else { 0.0 };
    m.expect("cutoff_cancel_propagation_seconds_count", &r, cut);
}

/// An upstream at a fresh port that answers any request head with a 101, then hands the
/// socket to `after_101`.
async fn raw_ws_upstream(
    after_101: impl FnOnce(tokio::net::TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>>
    + Send
    + 'static,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        let mut buf = BytesMut::new();
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if tcp.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Accept: x=\r\n\r\n";
        if tcp.write_all(head.as_bytes()).await.is_ok() {
            after_101(tcp).await;
        }
    });
    addr
}

/// A TLS client that closes normally while the upstream still answers (its close frame)
/// ends an `ok` tunnel: passing the upstream's FIN on means a close_notify to a client
/// whose socket is gone, and that failure is nobody's departure.
#[tokio::test]
async fn websocket_tls_client_close_is_ok() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = raw_ws_upstream(|mut tcp| {
        Box::pin(async move {
            let mut b = [0u8; 1024];
            while tcp.read(&mut b).await.is_ok_and(|n| n > 0) {}
            let _ = tcp.write_all(&ws_encode(OP_CLOSE, b"", None)).await;
        })
    })
    .await;
    let pki = Pki::new(unique_temp_dir("pki"));
    let proxy = tls_proxy_serving(&pki, &pki.leaf(1), &http_url(addr), "").await;
    let mut tls = tls_h1_connect(&proxy, &pki).await;
    tls.write_all(
        b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("upgrade request");
    let mut head = BytesMut::new();
    within(WAIT, "the 101", async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if tls.read_buf(&mut head).await.unwrap_or(0) == 0 {
                break;
            }
        }
    })
    .await;
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    drop(tls);
    let line = access_line(&proxy, "/ws/echo").await;
    assert_access(&line, 101, "ok", None);
    assert_tunnel_accounting(&proxy, None).await;
}

/// An upstream that resets its side of a tunnel is the upstream's failure.
#[tokio::test]
async fn websocket_upstream_reset_is_upstream_error() {
    use tokio::io::AsyncReadExt;
    let addr = raw_ws_upstream(|mut tcp| {
        Box::pin(async move {
            // After the client's first frame, a reset.
            let mut b = [0u8; 1024];
            let _ = tcp.read(&mut b).await;
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            drop(tcp);
        })
    })
    .await;
    let proxy = Proxy::start(&config(&http_url(addr), "", "", None)).await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/echo").await;
    assert_eq!(status, 101);
    ws.send_text("anyone there?").await;
    let line = access_line(&proxy, "/ws/echo").await;
    assert_access(&line, 502, "upstream_error", None);
    assert_tunnel_accounting(&proxy, None).await;
}

/// A tunnel open at SIGTERM gets the drain's grace like any request, then is cut: the
/// upstream's side closes and the access log says `shutdown`.
#[tokio::test]
async fn websocket_tunnel_is_cut_when_the_shutdown_grace_ends() {
    let up = WsUpstream::start().await;
    let config = config_with_server("shutdown_grace = \"300ms\"", up.addr());
    let mut proxy = Proxy::start(&config).await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/echo").await;
    assert_eq!(status, 101);
    echo(&mut ws, "before the drain").await;
    proxy.signal(libc::SIGTERM);
    let conn = up.wait_closed(0, WAIT).await;
    assert!(conn.closed.is_some());
    let line = access_line(&proxy, "/ws/echo").await;
    assert_access(&line, 503, "shutdown", Some("shutdown"));
    let exit = proxy.wait_exit(WAIT).await;
    assert!(exit.success(), "{exit:?}");
}

/// A client that vanishes mid-tunnel (a reset, as when its network drops) is a departure:
/// the upstream's side is closed at once and the tunnel ends `client_closed`, not `ok`.
#[tokio::test]
async fn websocket_client_reset_is_a_departure() {
    let (up, proxy) = ws_pair("").await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/echo").await;
    assert_eq!(status, 101);
    echo(&mut ws, "still here").await;
    socket2::SockRef::from(&ws.tcp)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    leave_tunnel(ws, &up, &proxy, (499, "client_closed", Some("client"))).await;
}

/// Both directions move at once: a client that streams into an echo while reading the
/// echoes must never wait on the proxy, whichever direction's buffers fill first.
#[tokio::test]
async fn websocket_streams_both_ways_at_once() {
    let (_up, proxy) = ws_pair("idle_timeout = \"10s\"").await;
    let (ws, status) = WsClient::connect(proxy.addr(), "/ws/echo").await;
    assert_eq!(status, 101);
    const FRAMES: usize = 300;
    let frame = ws_encode(OP_TEXT, &[b'x'; 64 * 1024], Some(*b"\x12\x34\x56\x78"));
    let mut tcp = ws.tcp;
    let (mut rx, mut tx) = tcp.split();
    let send = async {
        for _ in 0..FRAMES {
            tokio::io::AsyncWriteExt::write_all(&mut tx, &frame)
                .await
                .expect("write a frame");
        }
    };
    let receive = async {
        let mut buf = bytes::BytesMut::with_capacity(256 * 1024);
        let mut echoed = 0;
        while echoed < FRAMES {
            while let Some((op, payload)) = ws_decode(&mut buf) {
                assert_eq!((op, payload.len()), (OP_TEXT, 64 * 1024));
                echoed += 1;
            }
            if echoed < FRAMES {
                let n = tokio::io::AsyncReadExt::read_buf(&mut rx, &mut buf)
                    .await
                    .expect("read an echo");
                assert!(n > 0, "the tunnel closed after {echoed} echoes");
            }
        }
    };
    bounded(
        Duration::from_secs(30),
        "20 MB each way through the tunnel",
        async { tokio::join!(send, receive) },
    )
    .await;
}

/// Sends a close frame, which the `/ws/close` upstream answers before closing its side;
/// the proxy passes on the answer, then the close.
async fn close_handshake(ws: &mut WsClient) {
    let frame = ws_encode(OP_CLOSE, &[0x03, 0xe8], Some(*b"abcd"));
    tokio::io::AsyncWriteExt::write_all(&mut ws.tcp, &frame)
        .await
        .expect("write close");
    let (op, _) = ws.recv(WAIT).await.expect("the close answer");
    assert_eq!(op, OP_CLOSE);
    assert_eq!(
        ws.recv(WAIT).await,
        Err(WsEnd::Closed),
        "the proxy closes the client side"
    );
}

#[tokio::test]
async fn websocket_upstream_close_closes_client() {
    let (_up, proxy) = ws_pair("").await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/close").await;
    assert_eq!(status, 101);
    echo(&mut ws, "before the close").await;
    close_handshake(&mut ws).await;
    // The client closes its half in turn, as clients do on the server's FIN.
    tokio::io::AsyncWriteExt::shutdown(&mut ws.tcp)
        .await
        .expect("half-close");
    assert_access(&access_line(&proxy, "/ws/close").await, 101, "ok", None);
}

/// A client that never closes its half after the upstream closed is not waited for beyond
/// the grace: the tunnel ends, and its client connection with it.
#[tokio::test]
async fn websocket_half_closed_tunnel_ends_after_the_grace() {
    let (_up, proxy) = ws_pair("").await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/close").await;
    assert_eq!(status, 101);
    close_handshake(&mut ws).await;
    // The client says nothing more and keeps its half open.
    let line = proxy
        .wait_for_access_log(
            |v| common::log_path_is(v, "/ws/close"),
            cutoff::tunnel::HALF_CLOSE_GRACE + WAIT,
        )
        .await;
    assert_access(&line, 101, "ok", None);
    assert_eq!(
        line["reason"], "one side closed; the other went quiet without closing",
        "{line}"
    );
}

#[tokio::test]
async fn websocket_route_timeout_does_not_cut_a_healthy_tunnel() {
    let (up, proxy) = ws_pair("timeout = \"300ms\"").await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/healthy").await;
    assert_eq!(status, 101);
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_millis(1200) {
        echo(&mut ws, &format!("tick {i}")).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(i >= 5, "only {i} round trips");
    assert!(
        up.conns()[0].closed.is_none(),
        "the upstream side was closed during a healthy tunnel"
    );
    drop(ws);
    up.wait_closed(0, PROPAGATION * 2).await;
    let line = access_line(&proxy, "/ws/healthy").await;
    assert_access(&line, 101, "ok", None);
    assert!(
        line["duration_ms"].as_f64().unwrap_or(0.0) >= 1000.0,
        "the tunnel lived over 1 s: {line}"
    );
}

#[tokio::test]
async fn websocket_idle_timeout_cuts_an_idle_tunnel() {
    let (up, proxy) = ws_pair("idle_timeout = \"300ms\"").await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/idle").await;
    assert_eq!(status, 101);
    echo(&mut ws, "one").await;
    let last = Instant::now();
    // Then silence: the tunnel must end about 300 ms later.
    let end = ws.recv(Duration::from_secs(5)).await;
    assert_eq!(end, Err(WsEnd::Closed), "the idle tunnel must be closed");
    let idle = last.elapsed();
    assert!(
        // The timer starts at the proxy's write of the echo, a little before this client
        // reads it; on a loaded machine, much before.
        idle >= Duration::from_millis(150),
        "cut after {idle:?}, before idle_timeout"
    );
    let conn = up.wait_closed(0, PROPAGATION * 2).await;
    let lag = conn.closed.expect("closed").saturating_duration_since(last);
    assert!(
        lag <= Duration::from_millis(300) + PROPAGATION,
        "upstream closed after {lag:?}"
    );
    let line = access_line(&proxy, "/ws/idle").await;
    assert_access(&line, 504, "timeout", Some("timeout"));
}

#[tokio::test]
async fn websocket_client_leaving_before_the_101_closes_upstream() {
    let (up, proxy) = ws_pair("").await;
    let mut c = Client::connect(proxy.addr()).await;
    c.send_head(
        "GET",
        "/ws/slow101",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    .await;
    up.wait_for("the upgrade request", WAIT, |cs| {
        cs.first().is_some_and(|c| !c.head.is_empty())
    })
    .await;
    let t0 = Instant::now();
    c.close_rst();
    let conn = up.wait_closed(0, PROPAGATION * 2).await;
    let lag = conn.closed.expect("closed").saturating_duration_since(t0);
    assert!(
        lag <= PROPAGATION,
        "the upstream saw the close {lag:?} after the client left"
    );
    assert_access(
        &access_line(&proxy, "/ws/slow101").await,
        499,
        "client_closed",
        Some("client"),
    );
}

#[tokio::test]
async fn websocket_route_timeout_covers_the_handshake() {
    let (up, proxy) = ws_pair("timeout = \"300ms\"").await;
    let (_ws, status) = WsClient::connect(proxy.addr(), "/ws/slow101").await;
    assert_eq!(status, 504, "no 101 within the route's timeout");
    up.wait_closed(0, PROPAGATION * 2).await;
    assert_access(
        &access_line(&proxy, "/ws/slow101").await,
        504,
        "timeout",
        Some("timeout"),
    );
}

#[tokio::test]
async fn websocket_through_an_https_upstream() {
    let pki = Pki::new(unique_temp_dir("pki"));
    let up = WsUpstream::start_tls(server_config(&pki.leaf(1), &[b"http/1.1"])).await;
    let url = format!("https://localhost:{}", up.addr().port());
    let proxy = Proxy::start(&config(&url, &ca_file(&pki), "", None)).await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/wss").await;
    assert_eq!(status, 101);
    echo(&mut ws, "over TLS").await;
}

/// With `protocol = "auto"` (the default) over TLS, cutoff offers h2 by ALPN. A server
/// that supports both (most do) then picks h2, and an HTTP/1.1 upgrade sent on that
/// connection is a protocol error. Upgrades must negotiate http/1.1.
#[tokio::test]
async fn websocket_through_an_https_upstream_that_prefers_h2() {
    let pki = Pki::new(unique_temp_dir("pki"));
    let up = WsUpstream::start_tls(server_config(&pki.leaf(1), &[b"h2", b"http/1.1"])).await;
    let url = format!("https://localhost:{}", up.addr().port());
    let proxy = Proxy::start(&config(&url, &ca_file(&pki), "", None)).await;
    let (mut ws, status) = WsClient::connect(proxy.addr(), "/ws/wss-h2").await;
    assert_eq!(
        status,
        101,
        "the upgrade failed; the upstream saw: {:?}",
        up.conns()
    );
    echo(&mut ws, "over TLS").await;
}

#[tokio::test]
async fn upgrade_declined_by_the_upstream_is_an_ordinary_response() {
    let (up, proxy) = ws_pair("").await;
    let mut c = Client::connect(proxy.addr()).await;
    c.send_head(
        "GET",
        "/ws/declined",
        &[("Upgrade", "something-else"), ("Connection", "Upgrade")],
    )
    .await;
    let resp = c.read_response(WAIT).await;
    assert_eq!(resp.status, 400, "the upstream's answer: {}", resp.text());
    up.wait_closed(0, WAIT).await;
    assert_access(&access_line(&proxy, "/ws/declined").await, 400, "ok", None);
}

// ------------------------------------------------------------------------------------------
// Certificate reload
// ------------------------------------------------------------------------------------------

async fn wait_reloads(proxy: &Proxy, n: usize) {
    wait_log_count(
        proxy,
        n,
        "`config reloaded`",
        Duration::from_secs(10),
        |v| v["fields"]["message"] == "config reloaded" || v["message"] == "config reloaded",
    )
    .await;
}

/// A reload asked for as soon as the proxy says it is listening (a deploy script that
/// starts it, then pushes a config) must reload, not kill it.
#[tokio::test]
async fn sighup_right_after_listening_reloads_and_does_not_kill() {
    let up = Upstream::start().await;
    let pki = Pki::new(unique_temp_dir("pki"));
    let proxy = tls_proxy_serving(&pki, &pki.leaf(4001), &http_url(up.addr()), "").await;
    proxy.signal(libc::SIGHUP);
    proxy
        .wait_for_log(|v| v["message"] == "config reloaded", WAIT)
        .await;
    let h2 = h2_tls_connect(proxy.addr(), &pki).await;
    let resp = send(
        &h2,
        h2_req("GET", "https", "/after-early-hup", Bytes::new()),
        WAIT,
    )
    .await;
    assert_eq!(resp.status, 200);
}

#[tokio::test]
async fn certificate_reload_on_sighup_and_on_config_change() {
    let up = Upstream::start().await;
    let pki = Pki::new(unique_temp_dir("pki"));
    let first = pki.leaf(1001);
    let proxy = tls_proxy_serving(&pki, &first, &http_url(up.addr()), "").await;
    let cc = pki.client_config(&[b"h2"]);
    assert!(peer_certificate(proxy.addr(), cc.clone()).await == first.der);

    // A renewal: new files under the same names, then SIGHUP.
    let second = pki.leaf(1002);
    pki.install(&second);
    proxy.signal(libc::SIGHUP);
    wait_reloads(&proxy, 1).await;
    assert!(
        peer_certificate(proxy.addr(), cc.clone()).await == second.der,
        "after SIGHUP a new connection must see the new certificate"
    );
    let h2 = h2_tls_connect(proxy.addr(), &pki).await;
    let resp = send(
        &h2,
        h2_req("GET", "https", "/after-sighup", Bytes::new()),
        WAIT,
    )
    .await;
    assert_eq!(resp.status, 200);

    // Another renewal, then an edit of proxy.toml.
    let third = pki.leaf(1003);
    pki.install(&third);
    let mut text = std::fs::read_to_string(proxy.config_path()).expect("read the config");
    text.push_str("\n# certificates renewed\n");
    write_atomically(proxy.config_path(), text.as_bytes());
    wait_reloads(&proxy, 2).await;
    assert!(
        peer_certificate(proxy.addr(), cc.clone()).await == third.der,
        "after the config changed a new connection must see the new certificate"
    );
}

#[tokio::test]
async fn certificate_reload_keeps_the_old_certificate_when_the_new_one_is_broken() {
    let up = Upstream::start().await;
    let pki = Pki::new(unique_temp_dir("pki"));
    let first = pki.leaf(2001);
    let (cert, key) = pki.install(&first);
    let proxy = Proxy::start(&config(&http_url(up.addr()), "", "", Some((&cert, &key)))).await;
    let cc = pki.client_config(&[b"h2"]);
    write_atomically(
        &cert,
        b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    proxy.signal(libc::SIGHUP);
    proxy
        .wait_for_log(
            |v| v["message"] == "config reload failed; the previous routes keep serving",
            WAIT,
        )
        .await;
    assert!(
        peer_certificate(proxy.addr(), cc).await == first.der,
        "a broken renewal must leave the old certificate serving"
    );
}

/// Polls new TLS connections until they are served `want`, for at most 5 s.
async fn wait_for_certificate(
    proxy: &Proxy,
    cc: std::sync::Arc<rustls::ClientConfig>,
    want: &Leaf,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while peer_certificate(proxy.addr(), cc.clone()).await != want.der {
        assert!(
            Instant::now() < deadline,
            "5 s after {what} new connections still get the old certificate; stderr:\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The certificate files usually live elsewhere than `proxy.toml` (a renewal tool's
/// folder): renewing them is enough, without SIGHUP or an edit of the config.
#[tokio::test]
async fn certificate_renewal_in_another_folder_is_picked_up_on_its_own() {
    let up = Upstream::start().await;
    let pki = Pki::new(unique_temp_dir("pki"));
    let first = pki.leaf(5001);
    let proxy = tls_proxy_serving(&pki, &first, &http_url(up.addr()), "").await;
    let cc = pki.client_config(&[b"h2"]);
    assert!(peer_certificate(proxy.addr(), cc.clone()).await == first.der);
    assert_ne!(pki.dir, proxy.config_path().parent().expect("a folder"));

    let second = pki.leaf(5002);
    pki.install(&second);
    wait_for_certificate(&proxy, cc, &second, "the renewal").await;
}

/// An upstream's `ca_file` replaced (a CA rotation) is trusted from then on: the watch
/// sees the file, and the reload rebuilds the upstream, whose config (the path) is
/// unchanged.
#[tokio::test]
async fn a_rotated_upstream_ca_file_is_trusted_after_it_changes() {
    let (pki, up, url) = https_upstream(&[b"http/1.1"]).await;
    let other = Pki::new(unique_temp_dir("other-ca"));
    let ca_dir = unique_temp_dir("ca");
    let ca = ca_dir.join("upstream-ca.pem");
    std::fs::copy(&other.ca_pem, &ca).expect("copy the other CA");
    let proxy = Proxy::start(&config(
        &url,
        &format!("ca_file = \"{}\"", ca.display()),
        "",
        None,
    ))
    .await;
    let r = within(WAIT, "GET before", http_get(proxy.addr(), "/before")).await;
    assert_eq!(
        r.status,
        502,
        "the upstream's CA is not trusted yet: {}",
        r.text()
    );

    write_atomically(&ca, &std::fs::read(&pki.ca_pem).expect("read the CA"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = within(WAIT, "GET after", http_get(proxy.addr(), "/after")).await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "5 s after the CA file changed the upstream is still not trusted: {} {}\n{}",
            r.status,
            r.text(),
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    up.wait_call("/after", WAIT).await;
    drop(proxy);
    let _ = std::fs::remove_dir_all(&ca_dir);
}

/// A certificate renewal followed by `touch proxy.toml` (mtime only, same content), the
/// usual way to poke a file-watching server without SIGHUP.
#[tokio::test]
async fn certificate_reload_on_touching_the_config() {
    let up = Upstream::start().await;
    let pki = Pki::new(unique_temp_dir("pki"));
    let first = pki.leaf(3001);
    let proxy = tls_proxy_serving(&pki, &first, &http_url(up.addr()), "").await;
    let cc = pki.client_config(&[b"h2"]);
    assert!(peer_certificate(proxy.addr(), cc.clone()).await == first.der);

    let second = pki.leaf(3002);
    pki.install(&second);
    std::fs::File::options()
        .write(true)
        .open(proxy.config_path())
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .expect("touch proxy.toml");
    wait_for_certificate(&proxy, cc, &second, "`touch proxy.toml`").await;
}

// ------------------------------------------------------------------------------------------
// Review 4: HTTP/2 upstream GOAWAY, flow control, bidirectional streams
// ------------------------------------------------------------------------------------------

/// A minimal h2c upstream whose connections can be told to shut down gracefully (GOAWAY),
/// as an upstream does on a rolling restart. Records each call as (connection, path).
/// `/hold...` waits until `release`, everything else answers 200 `ok` at once.
struct GoawayUpstream {
    addr: std::net::SocketAddr,
    calls: std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>,
    changed: tokio::sync::watch::Sender<u64>,
    goaway: tokio::sync::watch::Sender<bool>,
    release: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl GoawayUpstream {
    async fn start() -> GoawayUpstream {
        Self::start_with(None).await
    }

    /// With `SETTINGS_MAX_CONCURRENT_STREAMS = max_streams` when given.
    async fn start_with(max_streams: Option<u32>) -> GoawayUpstream {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let changed = tokio::sync::watch::channel(0u64).0;
        let goaway = tokio::sync::watch::channel(false).0;
        let release = tokio::sync::watch::channel(false).0;
        let task = tokio::spawn({
            let (calls, changed, goaway, release) = (
                calls.clone(),
                changed.clone(),
                goaway.clone(),
                release.clone(),
            );
            async move {
                let mut conns = tokio::task::JoinSet::new();
                for conn in 0.. {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let (calls, changed, release) =
                        (calls.clone(), changed.clone(), release.clone());
                    let mut goaway = goaway.subscribe();
                    // Only the first connection is ever told to go away.
                    let told = conn == 0;
                    conns.spawn(async move {
                        let service = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let (calls, changed, release) =
                                    (calls.clone(), changed.clone(), release.clone());
                                async move {
                                    let path = req.uri().path().to_string();
                                    calls.lock().unwrap().push((conn, path.clone()));
                                    changed.send_modify(|n| *n += 1);
                                    if path.starts_with("/hold") {
                                        let mut rx = release.subscribe();
                                        let _ = rx.wait_for(|r| *r).await;
                                    }
                                    Ok::<_, std::convert::Infallible>(http::Response::new(
                                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                                    ))
                                }
                            },
                        );
                        let mut builder =
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                        if let Some(n) = max_streams {
                            builder.max_concurrent_streams(n);
                        }
                        let conn_fut = builder.serve_connection(TokioIo::new(tcp), service);
                        tokio::pin!(conn_fut);
                        let mut sent = false;
                        loop {
                            tokio::select! {
                                _ = conn_fut.as_mut() => return,
                                _ = goaway.wait_for(|g| *g), if told && !sent => {
                                    conn_fut.as_mut().graceful_shutdown();
                                    sent = true;
                                }
                            }
                        }
                    });
                }
            }
        });
        GoawayUpstream {
            addr,
            calls,
            changed,
            goaway,
            release,
            task,
        }
    }

    async fn wait_call(&self, path: &str) -> (usize, String) {
        let mut rx = self.changed.subscribe();
        within(WAIT, format!("the upstream to see {path}"), async {
            loop {
                if let Some(c) = self.calls.lock().unwrap().iter().find(|c| c.1 == path) {
                    return c.clone();
                }
                let _ = rx.changed().await;
            }
        })
        .await
    }
}

impl Drop for GoawayUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/2 upstream that shuts its connection down gracefully (GOAWAY, as servers do on
/// a rolling restart) while a long stream is still running on it: the stream finishes on
/// the old connection, and every new call goes to a new connection. None of them may get
/// a 502: a request that the old connection refused to open was never sent, so it is safe
/// to send on a new connection, and the endpoint did nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_goaway_with_a_stream_in_flight_does_not_fail_new_calls() {
    let up = GoawayUpstream::start().await;
    let proxy = Proxy::start(&config(&http_url(up.addr), "protocol = \"h2\"", "", None)).await;

    // A long call on connection 0.
    let held = spawn_call(proxy.addr(), "/hold/long");
    assert_eq!(up.wait_call("/hold/long").await.0, 0);

    // The upstream starts its graceful shutdown of connection 0.
    up.goaway.send_replace(true);

    // New calls, one after the other, until one reaches the new connection; each must be
    // served.
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    loop {
        let path = format!("/after-goaway/{i}");
        let resp = within(WAIT, format!("call {path}"), http_get(proxy.addr(), &path)).await;
        assert_eq!(
            resp.status,
            200,
            "{path} after the upstream's GOAWAY: {}; access log: {}",
            resp.text(),
            access_line(&proxy, &path).await
        );
        if up.wait_call(&path).await.0 > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no call ever reached a new connection"
        );
        i += 1;
    }

    // The long call finishes on the old connection.
    up.release.send_replace(true);
    let resp = call_ended(WAIT, "the long call", held).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

/// The same graceful shutdown on a connection whose every stream is taken (the upstream
/// allows one, and a long call holds it): a new call must go to a new connection at once,
/// not wait for a stream the old connection will never open again. Nothing in hyper's
/// client says a connection received GOAWAY while its streams run, so a call waiting for
/// a stream there used to wait until the long call ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_goaway_on_a_saturated_connection_sends_waiting_calls_to_a_new_one() {
    let up = GoawayUpstream::start_with(Some(1)).await;
    // At debug level the proxy says when a call starts waiting for a stream.
    let proxy = Proxy::start(
        &config(&http_url(up.addr), "protocol = \"h2\"", "", None).replace(
            "level = \"info\"",
            "level = \"info,cutoff::upstream=debug\"",
        ),
    )
    .await;
    // Warm the connection (its one-stream limit is known from here on), then hold it.
    let resp = within(WAIT, "warm-up", http_get(proxy.addr(), "/warm")).await;
    assert_eq!(resp.status, 200);
    let held = spawn_call(proxy.addr(), "/hold/only-stream");
    assert_eq!(up.wait_call("/hold/only-stream").await.0, 0);

    // One call already waits for the stream when the GOAWAY comes, one comes after it.
    let waiting = spawn_call(proxy.addr(), "/waiting");
    proxy
        .wait_for_log(
            |v| v["message"] == "waiting for a stream of the HTTP/2 connection",
            WAIT,
        )
        .await;
    up.goaway.send_replace(true);
    for (path, call) in [
        ("/waiting", waiting),
        ("/after-goaway", spawn_call(proxy.addr(), "/after-goaway")),
    ] {
        let resp = call_ended(WAIT, path, call).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        assert_eq!(
            up.wait_call(path).await.0,
            1,
            "{path} went to a new connection"
        );
    }

    // The long call still finishes on the old connection.
    up.release.send_replace(true);
    let resp = call_ended(WAIT, "the long call", held).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

/// A burst of calls on a new HTTP/2 connection to an upstream that allows one stream at a
/// time: every call is served, one after the other, on that one connection. Streams
/// opened before the upstream's SETTINGS were read would go by hyper's default limit
/// (100), and the upstream refuses those beyond its own (`REFUSED_STREAM`): 502s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_burst_on_a_new_connection_keeps_to_the_upstreams_stream_limit() {
    const BURST: usize = 8;
    let up = GoawayUpstream::start_with(Some(1)).await;
    let proxy = Proxy::start(&config(&http_url(up.addr), "protocol = \"h2\"", "", None)).await;
    let calls: Vec<_> = (0..BURST)
        .map(|i| spawn_call(proxy.addr(), format!("/burst/{i}")))
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let resp = call_ended(WAIT, &format!("/burst/{i}"), call).await;
        assert_eq!(resp.status, 200, "/burst/{i}: {}", resp.text());
    }
    let calls = up.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), BURST, "{calls:?}");
    assert!(calls.iter().all(|c| c.0 == 0), "one connection: {calls:?}");
}

/// An upstream set to `protocol = "h2"` that answers in HTTP/1.1 and keeps its socket
/// open: hyper's HTTP/2 client fails on the first bytes, and the call must get its 502
/// at once. cutoff waits for an upstream's first SETTINGS before using a new connection,
/// and that wait must end with the connection, not run out `connect_timeout` (a 504,
/// 30 s here): a protocol error stops hyper's reads before any end of stream shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_that_answers_in_http1_fails_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            held.push(tcp);
        }
    });
    let proxy = Proxy::start(&config(
        &http_url(addr),
        "protocol = \"h2\"\nconnect_timeout = \"30s\"",
        "",
        None,
    ))
    .await;
    let resp = within(
        WAIT,
        "a call to an HTTP/1.1 upstream set up as HTTP/2",
        http_get(proxy.addr(), "/x"),
    )
    .await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    server.abort();
}

/// An HTTP/2 upstream that refuses a stream before doing anything with it (RST_STREAM
/// with REFUSED_STREAM, RFC 9113 section 8.7, as servers do under load). A bodiless call
/// is sent once more and served, even a POST: the upstream did nothing with it. A call
/// with a body, which goes out once, gets its 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_refused_stream_is_sent_once_more_when_bodiless() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let server = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let path = req.uri().path().to_string();
                        let first = {
                            let mut seen = seen.lock().unwrap();
                            seen.push(path.clone());
                            seen.iter().filter(|p| **p == path).count() == 1
                        };
                        if first {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        } else if let Ok(mut body) =
                            respond.send_response(http::Response::new(()), false)
                        {
                            let _ = body.send_data(Bytes::from_static(b"ok"), true);
                        }
                    }
                });
            }
        }
    });
    let proxy = Proxy::start(&config(&http_url(addr), "protocol = \"h2\"", "", None)).await;
    let count = |path: &str| seen.lock().unwrap().iter().filter(|p| *p == path).count();

    for method in ["GET", "POST"] {
        let path = format!("/refused/{method}");
        let resp = within(
            WAIT,
            format!("{method} {path}"),
            common::request(proxy.addr(), method, &path, &[], b""),
        )
        .await;
        assert_eq!(resp.status, 200, "{method} {path}: {}", resp.text());
        assert_eq!(resp.text(), "ok");
        assert_eq!(count(&path), 2, "refused once, then served");
    }

    let path = "/refused/with-a-body";
    let resp = within(
        WAIT,
        "a POST with a body",
        common::request(proxy.addr(), "POST", path, &[], b"a body"),
    )
    .await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(count(path), 1, "a body goes out once");
    server.abort();
}

/// One HTTP/2 connection carries every call to the endpoint, so its flow-control windows
/// are shared: a few clients that stop reading large responses must not stall the
/// connection for everybody else. (hyper's client defaults: 2 MiB per stream, 5 MiB for
/// the connection; data read from the upstream but not yet taken by a client keeps its
/// share of the connection window. Three stalled streams hold more than 5 MiB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_slow_readers_do_not_stall_other_calls_on_the_shared_connection() {
    const STALLED: usize = 4;
    let up = HyperUpstream::start(UpstreamOptions::default()).await;
    let proxy = Proxy::start(&config(&http_url(up.addr()), "protocol = \"h2\"", "", None)).await;

    // Clients that read the response head, then nothing.
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let mut c = Client::connect(proxy.addr()).await;
        socket2::SockRef::from(c.stream())
            .set_recv_buffer_size(64 * 1024)
            .expect("SO_RCVBUF");
        c.get(&format!("/bytes/stalled-{i}?n={}", 24 << 20)).await;
        let head = c.read_head(WAIT).await;
        assert_eq!(head.status, 200);
        stalled.push(c);
    }
    assert_eq!(up.accepted(), 1, "{}", up.summary());

    // Meanwhile other clients keep calling: each small call must be served at once, for as
    // long as the stalled clients hold their streams. (A stall has no event to wait for;
    // the calls are repeated for 1.5 s, long after the windows would have filled.)
    let until = Instant::now() + Duration::from_millis(1500);
    let mut i = 0;
    while Instant::now() < until {
        let path = format!("/bytes/probe-{i}?n=1000");
        let resp = within(
            Duration::from_secs(3),
            format!("{path}, with {STALLED} slow readers on the shared connection"),
            http_get(proxy.addr(), &path),
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body.len(), 1000);
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stalled);
}

/// An HTTP/2 upstream (the h2 crate's server, to see its flow control) that answers its
/// first call with a head, then waits until its stream's send capacity reaches `want`
/// bytes and reports the capacity it then has: how much of the response it may send
/// before the proxy passes any of it on. No data is sent, so nothing is released, and the
/// capacity stops at the stream's window: above `want` at once if the window is larger,
/// never reaching it (the test's bound) if smaller.
async fn window_reporting_upstream(
    want: usize,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("upstream address");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        // The h2 crate caps a stream's capacity at its send buffer (400 KiB by default).
        let mut conn = h2::server::Builder::new()
            .max_send_buffer_size(64 << 20)
            .handshake::<_, Bytes>(tcp)
            .await
            .expect("h2 handshake");
        let Some(Ok((_req, mut respond))) = conn.accept().await else {
            return;
        };
        // The connection must go on being polled for the client's WINDOW_UPDATEs.
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut stream = respond
            .send_response(http::Response::new(()), false)
            .expect("response head");
        stream.reserve_capacity(64 << 20);
        // Capacity comes as the client's windows open: the connection's (65 535 until the
        // client's first WINDOW_UPDATE), then the stream's.
        while let Some(Ok(n)) = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            if n >= want {
                let _ = tx.send(n);
                break;
            }
        }
        // Hold the stream open while the test looks.
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    (addr, rx)
}

/// `h2_stream_window` is the window the proxy grants each stream of an HTTP/2 upstream:
/// what the upstream may send of a response before the proxy passes any of it on, and so
/// what a client that stops reading can hold in the proxy. 1 MiB by default; 64 KiB here
/// when set so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_stream_window_is_what_the_upstream_may_send_ahead() {
    for (extra, want) in [("", 1 << 20), ("h2_stream_window = 65536", 64 << 10)] {
        let (addr, granted) = window_reporting_upstream(want).await;
        let upstream = format!("protocol = \"h2\"\n{extra}");
        let proxy = Proxy::start(&config(&http_url(addr), &upstream, "", None)).await;
        let mut c = Client::connect(proxy.addr()).await;
        c.get("/big").await;
        let head = c.read_head(WAIT).await;
        assert_eq!(head.status, 200);
        let granted = within(WAIT, "the upstream's send capacity", granted)
            .await
            .expect("the upstream reported its capacity");
        assert_eq!(granted, want, "upstream settings: {extra:?}");
    }
}

/// An HTTP/2 upstream that allows one stream at a time (`SETTINGS_MAX_CONCURRENT_STREAMS =
/// 1`), busy with a long call. A second call waits for a stream; its route timeout fires
/// (504). That call is over: when the long call ends and a stream frees, the upstream must
/// never receive it (SPEC: a cancelled upstream call is never retried; README: a call
/// whose client is gone is never dispatched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_call_timed_out_waiting_for_a_stream_is_never_sent() {
    let up = GoawayUpstream::start_with(Some(1)).await;
    let proxy = Proxy::start(&config(
        &http_url(up.addr),
        "protocol = \"h2\"",
        // The held call outlives the waiting one, whose client asks for 300 ms: the stream
        // must not free (the held call timing out) just before the waiting call's end.
        "timeout = \"5s\"\naccept_deadline_header = \"x-request-timeout-ms\"",
        None,
    ))
    .await;
    // Warm the connection (the upstream's SETTINGS are known from here on), then hold its
    // only stream.
    let resp = within(WAIT, "warm-up", http_get(proxy.addr(), "/warm")).await;
    assert_eq!(resp.status, 200);
    let held = spawn_call(proxy.addr(), "/hold/only-stream");
    up.wait_call("/hold/only-stream").await;

    // This one waits for a stream, and times out.
    let resp = within(
        WAIT,
        "the waiting call",
        common::request(
            proxy.addr(),
            "GET",
            "/waiting",
            &[("x-request-timeout-ms", "300")],
            b"",
        ),
    )
    .await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert_access(
        &access_line(&proxy, "/waiting").await,
        504,
        "timeout",
        Some("timeout"),
    );

    // The stream frees; a later call goes through.
    up.release.send_replace(true);
    let _ = within(WAIT, "the long call", held).await;
    let resp = within(WAIT, "a later call", http_get(proxy.addr(), "/later")).await;
    assert_eq!(resp.status, 200);
    up.wait_call("/later").await;
    let calls = up.calls.lock().unwrap().clone();
    assert!(
        !calls.iter().any(|c| c.1 == "/waiting"),
        "the upstream received a call that had timed out (504) before a stream freed: {calls:?}"
    );
}
