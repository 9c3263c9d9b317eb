//! Idle keep-alive client connections are closed after `keepalive_timeout`, so that they
//! cannot hold slots of `max_connections` forever; a connection with a request in flight
//! is never cut by it.

mod common;

use std::time::Duration;

use common::{Client, Proxy, ReadEnd, Upstream, config_for};

fn with_keepalive(config: String, timeout: &str) -> String {
    config.replacen(
        "[server]\n",
        &format!("[server]\nkeepalive_timeout = \"{timeout}\"\n"),
        1,
    )
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
