//! What a client that stops reading costs in the kernel: the bytes the proxy's own socket
//! holds for it, read from `/proc/net/tcp` (see `src/send_queue.rs`). A stalled download
//! leaves at most `tcp_notsent_lowat` unsent in the proxy's socket (512 KiB by default),
//! where the kernel's own limit, the send buffer it grows for a fast connection, is
//! megabytes.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;

/// The default limit, and room for the write that crosses it: a socket takes a whole write
/// while its unsent bytes are below the limit (hyper writes up to 24 KiB at once).
const BOUND: u64 = 512 * 1024 + 64 * 1024;

fn within_the_limit(what: &str, held: u64) {
    eprintln!("[send_queue] {what}: {} KiB unsent", held / 1024);
    assert!(
        held <= BOUND,
        "for {what} the proxy's socket holds {held} bytes (bound {BOUND})"
    );
}

/// With the limit off the kernel takes far more, so the limit is what bounds the tests
/// that stay within it. (The kernel's own limit is the maximum of `net.ipv4.tcp_wmem`,
/// 4 MiB by default.)
fn beyond_the_limit(what: &str, held: u64) {
    eprintln!("[send_queue] {what}, no limit: {} KiB unsent", held / 1024);
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().last()?.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if wmem_max < 4 * BOUND {
        eprintln!(
            "[send_queue] net.ipv4.tcp_wmem allows {wmem_max} bytes a socket: too little \
             for the kernel's own limit to show; not checked"
        );
        return;
    }
    assert!(
        held > 2 * BOUND,
        "with tcp_notsent_lowat = 0 the socket held only {held} bytes for {what}: is the \
         limit still what bounds it?"
    );
}

/// A client that reads nothing of an endless download. Returns what the proxy's socket to
/// it holds once the proxy has stopped reading from the upstream and the queue settled.
async fn stalled_download(server_extra: &str) -> u64 {
    let (up, blocked) = flooding_upstream().await;
    let config = single_route_config(
        server_extra,
        &format!("url = \"{}\"", http_url(up)),
        r#"timeout = "off""#,
    );
    let proxy = Proxy::start(&config).await;
    let mut c = connect_small_receiver(proxy.addr()).await;
    c.write_all(b"GET /flood HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("request");
    wait_blocked(&blocked, 1).await;
    let client = c.local_addr().expect("client address");
    settled_send_queue(proxy.addr(), client).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_leaves_little_unsent_in_the_proxys_socket() {
    within_the_limit("a stalled download", stalled_download("").await);
}

/// The same with the limit off: the kernel's send buffer, grown while the download went
/// fast, takes far more (4 MiB per stalled download measured with the kernel's default
/// `tcp_wmem`). So the limit is what bounds the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_limit_a_stalled_download_fills_the_kernels_buffer() {
    beyond_the_limit(
        "a stalled download",
        stalled_download("tcp_notsent_lowat = 0").await,
    );
}

#[test]
fn the_harness_parses_a_line_of_proc_net_tcp() {
    let line = "   3: 0100007F:1F90 0100007F:D1A2 01 0001F000:00000010 00:00000000 00000000     0        0 12345 1 0000000000000000 20 4 30 10 -1";
    let s = parse_line(line).expect("parsed");
    assert_eq!(s.local, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(s.remote, "127.0.0.1:53666".parse().unwrap());
    assert_eq!((s.send_queue, s.recv_queue), (0x1F000, 0x10));
    assert_eq!(s.state, 0x01, "ESTABLISHED");
}
