//! Idle keep-alive client connections are closed after `keepalive_timeout`, so that they
//! cannot hold slots of `max_connections` forever; a connection with a request in flight
//! is never cut by it. `header_read_timeout` times a request head from its first bytes:
//! it never cuts an idle keep-alive connection early, but does cut a slow second head.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Proxy, ReadEnd, Upstream, config_for};

fn with_keepalive(config: String, timeout: &str) -> String {
    config.replacen(
        "[server]\n",
        &format!("[server]\nkeepalive_timeout = \"{timeout}\"\n"),
        1,
    )
}

/// A proxy with `keepalive_timeout` and `header_read_timeout = "300ms"`, and a client
/// connection to it whose first request was answered.
async fn after_one_request(keepalive: &str) -> (Upstream, Proxy, Client) {
    let up = Upstream::start().await;
    let config = with_keepalive(config_for(up.addr(), ""), keepalive).replacen(
        "[server]\n",
        "[server]\nheader_read_timeout = \"300ms\"\n",
        1,
    );
    let proxy = Proxy::start(&config).await;
    let mut client = Client::connect(proxy.addr()).await;
    client.send_head("GET", "/ok/first", &[]).await;
    let resp = client.read_response(Duration::from_secs(5)).await;
    assert_eq!(resp.status, 200);
    (up, proxy, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_is_closed_after_the_timeout() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&with_keepalive(config_for(up.addr(), ""), "300ms")).await;
    let mut client = Client::connect(proxy.addr()).await;
    client.send_head("GET", "/ok/first", &[]).await;
    let resp = client.read_response(Duration::from_secs(5)).await;
    assert_eq!(resp.status, 200);
    // Now idle: the proxy closes it after about 300 ms (bounded wait, generous bound).
    let end = client.wait_closed_by_peer(Duration::from_secs(5)).await;
    assert_ne!(
        end,
        ReadEnd::TimedOut,
        "an idle keep-alive connection stayed open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connection_is_not_cut_by_the_keepalive_timeout() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&with_keepalive(config_for(up.addr(), ""), "200ms")).await;
    let mut client = Client::connect(proxy.addr()).await;
    // The request outlives the keep-alive timeout several times over.
    client.send_head("GET", "/delay/busy?ms=900", &[]).await;
    let resp = client.read_response(Duration::from_secs(5)).await;
    assert_eq!(
        resp.status, 200,
        "a request in flight was cut by the idle timeout"
    );
    assert_eq!(resp.text(), "done");
}

/// hyper's own header timer ran from the end of each response, so an idle keep-alive
/// connection was closed after `header_read_timeout` (10 s by default) instead of
/// `keepalive_timeout` (75 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_never_cuts_an_idle_keep_alive_connection() {
    let (_up, _proxy, mut client) = after_one_request("1500ms").await;
    let idle_since = Instant::now();
    let end = client.wait_closed_by_peer(Duration::from_secs(10)).await;
    let idle = idle_since.elapsed();
    assert_ne!(end, ReadEnd::TimedOut, "never closed by keepalive_timeout");
    assert!(
        idle >= Duration::from_millis(1200),
        "closed after {idle:?} of idleness: header_read_timeout (300 ms) cut it, \
         not keepalive_timeout (1.5 s)"
    );
}

/// A slow head on a connection that already served a request is cut off like a first one,
/// long before `keepalive_timeout`, and never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_second_head_is_cut_by_header_read_timeout() {
    let (up, _proxy, mut client) = after_one_request("60s").await;
    let started = Instant::now();
    client
        .send(b"GET /ok/second HTTP/1.1\r\nHost: cutoff-test\r\nX-Slow: ")
        .await;
    let end = client.wait_closed_by_peer(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_ne!(
        end,
        ReadEnd::TimedOut,
        "a half-sent head held the connection"
    );
    assert!(
        took >= Duration::from_millis(250),
        "cut after {took:?}, before header_read_timeout"
    );
    assert!(up.records_for("/ok/second").is_empty(), "{}", up.summary());
}
