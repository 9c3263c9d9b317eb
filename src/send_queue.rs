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
//! write again before the unsent bytes run out (512 KiB last 4 ms at 1 Gbit/s).
//!
//! What it costs a client that keeps up, measured on loopback (2026-12-08, 1 GiB
//! downloads through a release build, the limit against the limit off): a loopback client
//! still finds the socket full now and then, and each time the proxy waits for room.
//! Full sockets per GiB: 76–196 off, 184–406 at 512 KiB, 776–934 at 128 KiB. CPU per GiB,
//! which moves ±15 % from run to run on these machines: at 128 KiB 1.105 s against 0.94
//! (medians of eight alternating runs each); at 512 KiB 0.905 against 0.915 in one such
//! series and 1.10× in another of sixteen back-to-back pairs (quartiles 0.85–1.23×). So
//! 512 KiB costs at most about a tenth on a download that runs at loopback speed, and
//! holds a stalled download to a sixth of what the kernel would.
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
