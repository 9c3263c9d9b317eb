//! How much a socket the proxy writes to may hold unsent in the kernel: a client's, for
//! a response, and an upstream's, for an upload (`TCP_NOTSENT_LOWAT`).
//!
//! Linux grows a socket's send buffer while its connection goes fast, up to the maximum of
//! `net.ipv4.tcp_wmem` (4 MiB by default). When the reader stops (a paused download, a
//! phone in a tunnel, a slow-read attack) its receive window closes, and from then on
//! everything written waits in that buffer. Measured with 200 stalled downloads on
//! loopback: 4.0 MiB of the kernel's memory per download in the proxy's sockets, against
//! 41 KiB in the proxy's own memory, and nginx and HAProxy leave it so. The kernel charges
//! that memory to the host's TCP budget (`net.ipv4.tcp_mem`), so a few thousand stalled
//! readers push every connection of the host into memory pressure.
//!
//! With `TCP_NOTSENT_LOWAT` a socket counts as full once this many bytes wait unsent,
//! whatever its buffer could hold: 4.0 MiB → 146 KiB per stalled download at the default
//! 128 KiB. Bytes sent and not yet acknowledged are not counted, so the window a fast
//! reader needs in flight is untouched; the limit only asks the proxy to write again
//! before the unsent bytes run out (128 KiB last 1 ms at 1 Gbit/s). A 1 GiB upload and
//! download through the proxy made as many writes with it as without (59–60 thousand,
//! three runs each), at CPU times within the run-to-run spread.
//!
//! Set once on the listening socket, whose options Linux copies into every connection it
//! accepts (no system call per connection), and on each new upstream connection.

use std::sync::atomic::{AtomicU32, Ordering};

/// The limit in bytes; 0 leaves the kernel's default (no limit).
static LIMIT: AtomicU32 = AtomicU32::new(0);

/// Sets the limit for the sockets made from now on (`[server] tcp_notsent_lowat`), and
/// applies it to the listening socket, which hands it to every connection it accepts.
pub fn set_limit(bytes: u32, listener: &tokio::net::TcpListener) {
    LIMIT.store(bytes, Ordering::Relaxed);
    if bytes == 0 {
        return;
    }
    if let Err(e) = socket2::SockRef::from(listener).set_tcp_notsent_lowat(bytes) {
        tracing::warn!(error = %e, "cannot limit the unsent bytes of client sockets (tcp_notsent_lowat)");
    }
}

/// Applies the limit to a new upstream connection. A failure only leaves the kernel's
/// default, as before: nothing to report per connection.
pub fn apply(stream: &tokio::net::TcpStream) {
    let bytes = LIMIT.load(Ordering::Relaxed);
    if bytes != 0 {
        let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(bytes);
    }
}
