//! Minimal client-side HTTP/1.1 over raw sockets, the two ways of leaving, and /proc.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const HOST: &str = "bench.local";

pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A parsed response head.
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    pub close: bool,
    pub chunked: bool,
}

pub fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut h = Head {
        status,
        content_length: None,
        close: false,
        chunked: false,
    };
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        match k.as_str() {
            "content-length" => h.content_length = v.parse().ok(),
            "connection" => h.close = v.contains("close"),
            "transfer-encoding" => h.chunked = v.contains("chunked"),
            _ => {}
        }
    }
    Some(h)
}

/// A request head's `Content-Length`, 0 without one.
pub fn request_content_length(head: &[u8]) -> usize {
    let text = String::from_utf8_lossy(head);
    text.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads until `buf` holds a complete head; returns the head's length (including the
/// blank line). `Ok(None)` on EOF first.
pub async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut tmp = [0u8; 8192];
    for _ in 0..1024 {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Err(io::Error::other("response head too large"))
}

/// Reads one whole response with a Content-Length body (all the soak's upstream sends).
/// Returns (status, connection: close).
pub async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(u16, bool)> {
    let n = read_head(s, buf)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a response"))?;
    let head = parse_head(&buf[..n]).ok_or_else(|| io::Error::other("bad response head"))?;
    if head.chunked {
        // Read until the last-chunk marker; good enough for small bodies.
        let mut tmp = [0u8; 8192];
        for _ in 0..4096 {
            if find(&buf[n..], b"0\r\n\r\n").is_some() {
                buf.clear();
                return Ok((head.status, head.close));
            }
            let k = s.read(&mut tmp).await?;
            if k == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&tmp[..k]);
        }
        return Err(io::Error::other("chunked body too long"));
    }
    let want = n + head.content_length.unwrap_or(0);
    let mut tmp = [0u8; 8192];
    while buf.len() < want {
        let k = s.read(&mut tmp).await?;
        if k == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..k]);
    }
    buf.drain(..want);
    Ok((head.status, head.close))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Leave {
    /// shutdown(SHUT_WR) then close: the peer sees a FIN.
    Fin,
    /// SO_LINGER 0 then close: the peer sees a RST.
    Rst,
}

/// Leaves the connection; returns the instant just before the departing syscall.
/// Bytes already received are drained first, so that a FIN departure is not turned into
/// a RST by unread data.
pub fn leave(s: TcpStream, how: Leave) -> Instant {
    let mut tmp = [0u8; 8192];
    for _ in 0..64 {
        match s.try_read(&mut tmp) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let Ok(std) = s.into_std() else {
        return Instant::now();
    };
    match how {
        Leave::Fin => {
            let t0 = Instant::now();
            let _ = std.shutdown(Shutdown::Write);
            drop(std);
            t0
        }
        Leave::Rst => {
            let _ = socket2::SockRef::from(&std).set_linger(Some(Duration::ZERO));
            let t0 = Instant::now();
            drop(std);
            t0
        }
    }
}

pub async fn write_all(s: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    s.write_all(data).await
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The bytes the kernel holds in the proxy's sockets, as `(send, receive)` queue sums from
/// `/proc/net/tcp`: memory that the proxy's VmRSS does not show. The proxy's sockets are
/// the connected ones on its port `proxy_port` (to its clients) and those connected to
/// `upstream` from any other port (to the upstream; the upstream's own have its port).
pub fn proxy_socket_queues(proxy_port: u16, upstream: std::net::SocketAddr) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else {
        return (0, 0);
    };
    let hex_port = |a: &str| {
        a.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    let up_port = upstream.port();
    let (mut send, mut recv) = (0, 0);
    for line in text.lines().skip(1) {
        // `sl local remote st tx_queue:rx_queue …`; st 01 is ESTABLISHED (a listener's
        // queues count its backlog instead).
        let f: Vec<&str> = line.split_whitespace().take(5).collect();
        let [_, local, remote, "01", queues] = f[..] else {
            continue;
        };
        let (Some(lp), Some(rp)) = (hex_port(local), hex_port(remote)) else {
            continue;
        };
        if lp != proxy_port && (rp != up_port || lp == up_port) {
            continue;
        }
        if let Some((tx, rx)) = queues.split_once(':') {
            send += u64::from_str_radix(tx, 16).unwrap_or(0);
            recv += u64::from_str_radix(rx, 16).unwrap_or(0);
        }
    }
    (send, recv)
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> Result<u64, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))
}

pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
