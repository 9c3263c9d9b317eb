//! What the kernel holds in a socket's queues, read from `/proc/net/tcp`: the proxy's
//! memory that its own RSS does not show.

use super::settled;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// One IPv4 TCP socket of the machine: its two ends, its state, and the bytes in its
/// send queue (written and not yet acknowledged, whether sent or not) and its receive
/// queue (arrived and not yet read).
#[derive(Debug, Clone, Copy)]
pub struct KernelSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's TCP state: [`CLOSE_WAIT`] once the peer's FIN has arrived.
    pub state: u8,
    pub send_queue: u64,
    pub recv_queue: u64,
}

/// Every IPv4 TCP socket of the machine (all network namespaces' are not: only ours).
pub fn kernel_sockets() -> Vec<KernelSocket> {
    let text = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    text.lines().skip(1).filter_map(parse_line).collect()
}

/// `  0: 0100007F:1F90 0100007F:D1A2 01 00000000:00000000 …`: addresses in hex, the
/// IPv4 address in the kernel's byte order, then the state and `tx_queue:rx_queue`.
pub fn parse_line(line: &str) -> Option<KernelSocket> {
    let mut fields = line.split_whitespace().skip(1);
    let local = parse_addr(fields.next()?)?;
    let remote = parse_addr(fields.next()?)?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    let (tx, rx) = fields.next()?.split_once(':')?;
    Some(KernelSocket {
        local,
        remote,
        state,
        send_queue: u64::from_str_radix(tx, 16).ok()?,
        recv_queue: u64::from_str_radix(rx, 16).ok()?,
    })
}

/// `TCP_CLOSE_WAIT` in the kernel's numbering: the peer has closed its side.
pub const CLOSE_WAIT: u8 = 0x08;

fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(ip)),
        port,
    )))
}

/// The send queue of the socket from `local` to `remote`, once it has stopped moving
/// (three readings 100 ms apart agree) and is not empty.
pub async fn settled_send_queue(local: SocketAddr, remote: SocketAddr) -> u64 {
    settled(
        format!("the send queue of {local} → {remote}"),
        0,
        2,
        || {
            kernel_sockets()
                .iter()
                .find(|s| s.local == local && s.remote == remote)
                .map_or(0, |s| s.send_queue)
        },
    )
    .await
}
