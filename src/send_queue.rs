//! How much of a response a client's socket may hold unsent in the kernel
//! (`TCP_NOTSENT_LOWAT`).
//!
//! Linux grows a socket's send buffer while its connection goes fast, up to the maximum of
//! `net.ipv4.tcp_wmem` (4 MiB by default). When the client stops reading (a paused
//! download, a phone in a tunnel, a slow-read attack) its receive window closes, and from
//! then on everything written waits in that buffer. Measured with 200 stalled downloads on
//! loopback: 4.0 MiB of the kernel's memory per download in the proxy's sockets, against
//! 41 KiB in the proxy's own memory, and nginx and HAProxy leave it so. The kernel charges
//! that memory to the host's TCP budget (`net.ipv4.tcp_mem`), so a few thousand stalled
//! readers push every connection of the host into memory pressure.
//!
//! With `TCP_NOTSENT_LOWAT` a socket counts as full once this many bytes wait unsent,
//! whatever its buffer could hold. Bytes sent and not yet acknowledged are not counted, so
//! the window a fast client needs in flight is untouched; the limit only asks the proxy to
//! write again before the unsent bytes run out (512 KiB last 4 ms at 1 Gbit/s). The
//! default is the smallest whose cost the measurements could not see (2026-12-08, 1 GiB
//! downloads alternating with the limit off, eight each): 512 KiB, 0.905 s of CPU per GiB
//! against 0.915 (medians); 128 KiB, 1.105 against 0.94, since a loopback client that
//! keeps up still finds the socket full now and then, and each time costs a wait.
//!
//! Client sockets only. On an upstream's socket the same limit bounds an upload to an
//! upstream that reads slowly (4 MiB held without it), but an upstream that reads slower
//! than the proxy writes makes every upload meet it: 512 KiB cost 20 % more CPU per GiB
//! uploaded (0.76 s against 0.635, medians of eight), 128 KiB 60 %. The upstream is the
//! operator's own service; the client is anyone.
//!
//! Set once, on the listening socket, whose options Linux copies into every connection it
//! accepts: no system call per connection.

/// Applies `bytes` (`[server] tcp_notsent_lowat`; 0 leaves the kernel's default, no limit)
/// to the listening socket, which hands it to every connection it accepts.
pub fn limit_clients(bytes: u32, listener: &tokio::net::TcpListener) {
    if bytes == 0 {
        return;
    }
    if let Err(e) = socket2::SockRef::from(listener).set_tcp_notsent_lowat(bytes) {
        tracing::warn!(error = %e, "cannot limit the unsent bytes of client sockets (tcp_notsent_lowat)");
    }
}
