//! The recording upstream: a raw TCP HTTP/1.1 server that notes, per request id, when the
//! request arrived and when its connection was closed by the proxy.
//!
//! Requests carry their id as the last path segment (`/c/17`). A connection is watched
//! without being read (the body of an upload is left in the kernel's buffer, as a busy
//! upstream would): the descriptor is registered edge-triggered, readiness without a
//! hang-up is cleared, and `EPOLLRDHUP`/`EPOLLHUP`/`EPOLLERR` (the proxy's FIN or RST)
//! ends the wait. That instant is t1.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Read the request head, never answer, watch for the close.
    Hold,
    /// Answer a chunked 200 head and a first chunk (`first-chunk\n`), then hold.
    BodyHold,
    /// Answer `200` with a small body after `delay` (keep-alive), unless the connection
    /// closes first.
    Respond { delay: Duration },
    /// Read the whole body (its `Content-Length`), then answer `200` (keep-alive); a
    /// request whose target ends in `?bytes=N` is answered with a body of N bytes instead.
    Sink,
    /// Answer `200` with a 1 TiB `Content-Length` and send until the proxy stops taking
    /// it (its client does not read), then hold.
    Flood,
}

pub const FIRST_CHUNK: &[u8] = b"first-chunk\n";

#[derive(Default, Clone, Copy, Debug)]
pub struct Rec {
    pub arrived: Option<Instant>,
    /// The proxy closed the connection while this request was unanswered.
    pub closed: Option<Instant>,
    /// The upstream wrote its response (Respond mode).
    pub responded: Option<Instant>,
}

pub struct Upstream {
    mode: Mode,
    recs: Mutex<HashMap<u64, Rec>>,
    changed: Notify,
    release: watch::Sender<u64>,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Request heads read.
    pub requests: AtomicU64,
    /// Connections closed by the proxy while a request on them was unanswered.
    pub closed_unanswered: AtomicU64,
    /// Responses written.
    pub responded: AtomicU64,
    /// Flood connections whose writes have blocked for [`STALLED_AFTER`]: the proxy has
    /// stopped reading them (counted once per connection).
    pub stalled: AtomicU64,
}

/// How long a flood's write must wait for room before its connection counts as stalled.
/// A proxy busy with its other connections can leave one unread for a moment, so a
/// stall is no proof on its own: `rss` also waits for the memory to stop moving.
pub const STALLED_AFTER: Duration = Duration::from_millis(200);

impl Upstream {
    pub async fn start(addr: SocketAddr, mode: Mode) -> Result<Arc<Upstream>, String> {
        let listener = listen(addr).map_err(|e| format!("upstream {addr}: {e}"))?;
        let (release, _) = watch::channel(0u64);
        let up = Arc::new(Upstream {
            mode,
            recs: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            release,
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            closed_unanswered: AtomicU64::new(0),
            responded: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
        });
        let u = up.clone();
        // Lives as long as the subcommand (which is bounded in time).
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        u.accepted.fetch_add(1, Ordering::Relaxed);
                        let u = u.clone();
                        let rx = u.release.subscribe();
                        tokio::spawn(async move {
                            if let Ok(s) = s.into_std() {
                                let _ = serve(u, s, rx).await;
                            }
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Ok(up)
    }

    pub fn recs(&self) -> MutexGuard<'_, HashMap<u64, Rec>> {
        self.recs.lock().unwrap()
    }

    pub fn get(&self, id: u64) -> Rec {
        self.recs().get(&id).copied().unwrap_or_default()
    }

    /// Waits until `done` holds over the records, or `deadline`. Returns whether it held.
    pub async fn wait_until(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&HashMap<u64, Rec>) -> bool,
    ) -> bool {
        for _ in 0..10_000_000u64 {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if done(&self.recs()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout_at(deadline.into(), n).await;
        }
        false
    }

    /// Waits until all of `ids` have arrived (or `deadline`); returns how many did.
    pub async fn wait_arrived(&self, ids: &[u64], deadline: Instant) -> usize {
        self.wait_until(deadline, |r| {
            ids.iter()
                .all(|id| r.get(id).is_some_and(|x| x.arrived.is_some()))
        })
        .await;
        let r = self.recs();
        ids.iter()
            .filter(|id| r.get(id).is_some_and(|x| x.arrived.is_some()))
            .count()
    }

    /// Drops every connection the upstream holds (the next requests get new ones).
    pub fn release_all(&self) {
        self.release.send_modify(|e| *e += 1);
    }

    fn arrive(&self, id: u64) {
        let now = Instant::now();
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.recs().insert(
            id,
            Rec {
                arrived: Some(now),
                ..Rec::default()
            },
        );
        self.changed.notify_waiters();
    }

    fn responded(&self, id: u64) {
        self.responded.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = self.recs().get_mut(&id) {
            r.responded = Some(Instant::now());
        }
    }

    fn closed(&self, id: u64, at: Instant) {
        self.closed_unanswered.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = self.recs().get_mut(&id) {
            r.closed = Some(at);
        }
        self.changed.notify_waiters();
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(8192)?;
    s.set_nonblocking(true)?;
    TcpListener::from_std(s.into())
}

/// The id is the last path segment's leading digits; requests without one get a unique
/// id from the top of the range.
fn request_id(head: &[u8]) -> u64 {
    static ANON: AtomicU64 = AtomicU64::new(u64::MAX / 2);
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let path = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let last = path.rsplit(|&b| b == b'/').next().unwrap_or_default();
    let digits: Vec<u8> = last
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| ANON.fetch_add(1, Ordering::Relaxed))
}

async fn serve(
    up: Arc<Upstream>,
    s: TcpStream,
    mut release: watch::Receiver<u64>,
) -> io::Result<()> {
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    // SAFETY: the std TcpStream owns its descriptor, which stays open and unchanged for as
    // long as the AsyncFd owns the stream.
    let fd = unsafe { AsyncFd::register(s) }.map_err(|e| io::Error::other(e.to_string()))?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // One request per iteration (keep-alive in Respond mode); bounded.
    for _ in 0..1_000_000u32 {
        let head_len = tokio::select! {
            r = read_head(&fd, &mut buf) => match r? {
                Some(n) => n,
                None => return Ok(()),
            },
            _ = release.changed() => return Ok(()),
        };
        let id = request_id(&buf[..head_len]);
        let body_len = crate::http::request_content_length(&buf[..head_len]);
        let head: Vec<u8> = buf.drain(..head_len).collect();
        up.arrive(id);
        match up.mode {
            Mode::Hold => {}
            Mode::Sink => {
                let queued = buf.len().min(body_len);
                buf.drain(..queued);
                discard(&fd, body_len - queued).await?;
                match asked_bytes(&head) {
                    Some(n) => {
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
                        );
                        write_all(&fd, resp.as_bytes()).await?;
                        let block = vec![b'd'; 256 * 1024];
                        let mut left = n;
                        while left > 0 {
                            let k = left.min(block.len());
                            write_all(&fd, &block[..k]).await?;
                            left -= k;
                        }
                    }
                    None => {
                        let resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
                        write_all(&fd, resp).await?;
                    }
                }
                up.responded(id);
                continue;
            }
            Mode::Flood => {
                let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1099511627776\r\n\r\n";
                write_all(&fd, head).await?;
                let block = vec![b'f'; 256 * 1024];
                tokio::select! {
                    at = wait_closed(&fd) => up.closed(id, at),
                    _ = release.changed() => {}
                    _ = flood(&up, &fd, &block) => {}
                }
                return Ok(());
            }
            Mode::BodyHold => {
                let mut resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                resp.extend_from_slice(format!("{:x}\r\n", FIRST_CHUNK.len()).as_bytes());
                resp.extend_from_slice(FIRST_CHUNK);
                resp.extend_from_slice(b"\r\n");
                write_all(&fd, &resp).await?;
            }
            Mode::Respond { delay } => {
                tokio::select! {
                    // A close already seen wins over a timer that fired in the same poll.
                    biased;
                    at = wait_closed(&fd) => {
                        up.closed(id, at);
                        return Ok(());
                    }
                    _ = release.changed() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {
                        let resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
                        if write_all(&fd, resp).await.is_err() {
                            // The proxy closed just as the answer was due.
                            up.closed(id, Instant::now());
                            return Ok(());
                        }
                        up.responded(id);
                        continue;
                    }
                }
            }
        }
        // Hold: until the proxy closes, or the benchmark releases everything.
        tokio::select! {
            at = wait_closed(&fd) => up.closed(id, at),
            _ = release.changed() => {}
        }
        return Ok(());
    }
    Ok(())
}

/// Reads until `buf` holds a request head; `None` on EOF first. Tries one read before
/// waiting, so readiness cleared by [`wait_closed`] never hides bytes already queued.
async fn read_head(fd: &AsyncFd<TcpStream>, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut tmp = [0u8; 16384];
    let mut first = true;
    for _ in 0..4096 {
        if let Some(i) = crate::http::find(buf, b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        let r = if first {
            first = false;
            match fd.get_ref().read(&mut tmp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => r,
            }
        } else {
            let mut g = fd.readable().await?;
            match g.try_io(|s| s.get_ref().read(&mut tmp)) {
                Ok(r) => r,
                Err(_would_block) => continue,
            }
        };
        match r {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("request head too large or too slow"))
}

/// N from a request line whose target ends in `?bytes=N`.
fn asked_bytes(head: &[u8]) -> Option<usize> {
    let line = head.split(|&b| b == b'\r').next()?;
    let target = line.split(|&b| b == b' ').nth(1)?;
    let n = std::str::from_utf8(target).ok()?.split_once("?bytes=")?.1;
    n.parse().ok()
}

/// Reads and drops `n` bytes.
async fn discard(fd: &AsyncFd<TcpStream>, mut n: usize) -> io::Result<()> {
    let mut tmp = vec![0u8; 256 * 1024];
    while n > 0 {
        let mut g = fd.readable().await?;
        let want = n.min(tmp.len());
        match g.try_io(|s| s.get_ref().read(&mut tmp[..want])) {
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(k)) => n -= k,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Writes `block` after `block` until the connection fails; counts the connection in
/// `stalled` the first time a write of 16 KiB waits [`STALLED_AFTER`] for room (a proxy
/// that reads steadily takes that much sooner). A block cut short by that wait is not
/// resumed: what a flood sends does not matter, only that it never stops. Once counted,
/// the writes go on without a timer.
async fn flood(up: &Upstream, fd: &AsyncFd<TcpStream>, block: &[u8]) {
    let piece = &block[..block.len().min(16 * 1024)];
    loop {
        match tokio::time::timeout(STALLED_AFTER, write_all(fd, piece)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => break,
        }
    }
    up.stalled.fetch_add(1, Ordering::Relaxed);
    up.changed.notify_waiters();
    while write_all(fd, block).await.is_ok() {}
}

async fn write_all(fd: &AsyncFd<TcpStream>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut g = fd.writable().await?;
        match g.try_io(|s| s.get_ref().write(data)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Resolves when the peer's FIN or RST arrives, without reading (see the module comment).
async fn wait_closed(fd: &AsyncFd<TcpStream>) -> Instant {
    loop {
        let Ok(mut g) = fd.readable().await else {
            return Instant::now();
        };
        let r = g.ready();
        if r.is_read_closed() || r.is_error() {
            return Instant::now();
        }
        g.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::request_id;

    #[test]
    fn ids() {
        assert_eq!(request_id(b"GET /c/17 HTTP/1.1\r\nHost: x\r\n\r\n"), 17);
        assert_eq!(request_id(b"POST /t/9?x=1 HTTP/1.1\r\n\r\n"), 9);
        assert!(request_id(b"GET / HTTP/1.1\r\n\r\n") >= u64::MAX / 2);
    }
}
