//! One instance of an upstream: how to connect to it, its idle HTTP/1.1 connections, its
//! shared HTTP/2 connection, and its health.
//!
//! Health is passive: an endpoint that refuses, times out or resets connections is
//! ejected for a back-off that doubles while it keeps failing (1 s, 2 s, 4 s… 30 s), then
//! gets real traffic again. Only failures of the endpoint itself count; callers never
//! report a call that was cancelled by its client, its timer or a shutdown.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::HeaderValue;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::h2::H2Pool;
use super::{H1Conn, H1Sender, UpstreamError};
use crate::config::{EndpointConfig, Protocol, Scheme, UpstreamConfig};
use crate::metrics::EndpointMetrics;

/// A connection to an endpoint, plain or TLS.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamIo {
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamIo::Plain(s) => s,
            UpstreamIo::Tls(s) => s.get_ref().0,
        }
    }

    /// Aborts the connection now: the upstream gets a RST. `connect` with `AF_UNSPEC`
    /// makes Linux abort a TCP connection on the spot (`tcp_disconnect`), before tokio
    /// deregisters the descriptor and closes it. `SO_LINGER` 0 sends the same RST, but
    /// only at that close, two system calls later, on the path of every cancellation.
    /// Falls back to it where the abort is refused.
    pub(super) fn reset(&self) {
        use std::os::fd::AsRawFd;
        let tcp = self.tcp();
        // SAFETY: a zeroed `sockaddr` with family AF_UNSPEC is a valid argument, and the
        // descriptor is open for as long as `tcp` is borrowed.
        let aborted = unsafe {
            let mut unspec: libc::sockaddr = std::mem::zeroed();
            unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
            libc::connect(
                tcp.as_raw_fd(),
                &unspec,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            ) == 0
        };
        if !aborted {
            let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
        }
    }

    /// Whether TLS negotiated HTTP/2 by ALPN.
    pub fn alpn_h2(&self) -> bool {
        match self {
            UpstreamIo::Plain(_) => false,
            UpstreamIo::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl UpstreamIo {
    /// A read as large as `buf`: for HTTP/2, whose reads are not capped (see `read_cap.rs`).
    #[inline]
    pub fn poll_read_uncapped(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

/// Capped: hyper's HTTP/1 client reads through this (see `read_cap.rs`).
impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        crate::read_cap::poll_capped(buf, crate::read_cap::MAX_READ, |buf| {
            this.poll_read_uncapped(cx, buf)
        })
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Idle lists per endpoint; workers beyond this share them.
const POOL_SHARDS: usize = 8;

thread_local! {
    /// The index of the worker thread this code runs on (0: the main thread).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Called once at the start of each worker thread.
pub fn set_worker_index(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// Which protocol the endpoint speaks, once known.
const PROTO_UNKNOWN: u8 = 0;
const PROTO_H1: u8 = 1;
const PROTO_H2: u8 = 2;

pub struct Endpoint {
    pub config: EndpointConfig,
    pub(super) host_header: HeaderValue,
    pub(super) connect_timeout: Duration,
    /// `h2_stream_window`: the window each HTTP/2 stream is granted.
    pub(super) h2_stream_window: u32,
    pool_idle_timeout: Duration,
    pool_max_idle: usize,
    protocol: Protocol,
    /// The connector offering what `protocol` allows, and one offering only HTTP/1.1 (for
    /// upgrades, which HTTP/2 cannot carry), with the server name for SNI.
    tls: Option<(TlsConnector, TlsConnector, ServerName<'static>)>,
    /// Idle HTTP/1.1 connections, most recently used last (LIFO keeps the warm ones warm
    /// and lets the cold ones time out). The lock is never held across an await.
    ///
    /// One list per worker thread: a connection goes back to the worker that drove it, so
    /// its readiness events keep coming from that worker's own reactor (no wake-up crosses
    /// threads).
    idle: [Mutex<Vec<(Idle, Instant)>>; POOL_SHARDS],
    pub(super) h2: H2Pool,
    negotiated: AtomicU8,
    inflight: AtomicUsize,
    /// Consecutive failures; drives the ejection back-off.
    failures: AtomicU32,
    /// Nanoseconds since `epoch` until which the endpoint is ejected (0: not ejected).
    ejected_until: AtomicU64,
    epoch: Instant,
    pub(super) metrics: EndpointMetrics,
    upstream: String,
    /// Replaced by a reload: its idle connections are closed, and no more are kept.
    retired: AtomicBool,
}

impl Endpoint {
    pub(super) fn new(
        upstream: &UpstreamConfig,
        ca_pem: Option<&[u8]>,
        config: EndpointConfig,
    ) -> Result<Endpoint, String> {
        let host_header = HeaderValue::from_str(&config.authority)
            .map_err(|_| format!("{}: invalid host", config.url))?;
        let tls = match config.scheme {
            Scheme::Http => None,
            Scheme::Https => {
                let ca = upstream.ca_file.as_deref().zip(ca_pem);
                let cc = crate::tls::client_config(ca, upstream.protocol)?;
                let h1 = crate::tls::client_config(ca, Protocol::Http1)?;
                let name = ServerName::try_from(config.host.clone())
                    .map_err(|e| format!("{}: invalid TLS server name: {e}", config.url))?;
                Some((TlsConnector::from(cc), TlsConnector::from(h1), name))
            }
        };
        let negotiated = match (upstream.protocol, config.scheme) {
            (Protocol::Http1, _) | (Protocol::Auto, Scheme::Http) => PROTO_H1,
            (Protocol::H2, _) => PROTO_H2,
            (Protocol::Auto, Scheme::Https) => PROTO_UNKNOWN,
        };
        Ok(Endpoint {
            metrics: EndpointMetrics::register(&upstream.name, &config.url),
            upstream: upstream.name.clone(),
            host_header,
            connect_timeout: upstream.connect_timeout,
            h2_stream_window: upstream.h2_stream_window,
            pool_idle_timeout: upstream.pool_idle_timeout,
            pool_max_idle: upstream.pool_max_idle,
            protocol: upstream.protocol,
            tls,
            idle: std::array::from_fn(|_| Mutex::new(Vec::new())),
            h2: H2Pool::default(),
            negotiated: AtomicU8::new(negotiated),
            inflight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            epoch: Instant::now(),
            retired: AtomicBool::new(false),
            config,
        })
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// This worker's idle list.
    fn idle_here(&self) -> &Mutex<Vec<(Idle, Instant)>> {
        &self.idle[WORKER.with(Cell::get) % POOL_SHARDS]
    }

    /// Speaks HTTP/2: configured so, or negotiated by ALPN on an earlier connection.
    pub(super) fn uses_h2(&self) -> bool {
        self.negotiated.load(Ordering::Relaxed) == PROTO_H2
    }

    /// `auto` over TLS before the first handshake told which protocol the upstream
    /// speaks: the first connection is set up once, and every call waits for it, so a
    /// burst of first calls does not open one connection each.
    pub(super) fn protocol_unknown(&self) -> bool {
        self.negotiated.load(Ordering::Relaxed) == PROTO_UNKNOWN
    }

    /// Whether ALPN decides this endpoint's protocol (`auto` over TLS).
    pub(super) fn negotiates(&self) -> bool {
        self.protocol == Protocol::Auto && self.tls.is_some()
    }

    pub(super) fn enter(self: &Arc<Self>) -> Slot {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.metrics.inflight.increment(1.0);
        Slot(self.clone())
    }

    pub(super) fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && (now.saturating_duration_since(self.epoch).as_nanos() as u64) < until
    }

    pub(super) fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Relaxed)
    }

    pub(super) fn failed(&self, why: &UpstreamError) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        // One failure may be bad luck; from the second in a row, eject.
        if n >= 2 {
            let backoff = Duration::from_secs(1 << (n - 2).min(5)).min(Duration::from_secs(30));
            let until = Instant::now().saturating_duration_since(self.epoch) + backoff;
            self.ejected_until
                .store(until.as_nanos() as u64, Ordering::Relaxed);
            self.metrics.ejections.increment(1);
            tracing::warn!(upstream = %self.upstream, endpoint = %self.config.url,
                failures = n, backoff_ms = backoff.as_millis() as u64, error = %why,
                "endpoint ejected");
        }
    }

    pub(super) fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// A kept connection (with whether it sat idle long enough that the upstream may be
    /// closing it right now, see [`MAY_BE_CLOSING`]), else a new one.
    ///
    /// A bare kept socket is checked for a close here. A kept hyper connection is checked
    /// only with `check`: the exchange's first poll reads a close that came while it sat
    /// idle before it writes anything, and hyper then hands the request back untouched,
    /// whereupon the exchange checks out again, with `check` (`exchange_h1`, in `mod.rs`).
    /// Polling every one here too cost a pass of hyper's dispatcher per request (about 800
    /// of a keep-alive request's 35 000 instructions), for the rare connection that the
    /// upstream closed and the sweep has not closed yet.
    pub(super) async fn checkout(&self, check: bool) -> Result<(Idle, bool), UpstreamError> {
        loop {
            let candidate = {
                let mut idle = self.idle_here().lock().unwrap_or_else(|e| e.into_inner());
                idle.pop()
            };
            let Some((mut conn, since)) = candidate else {
                break;
            };
            let idle_for = since.elapsed();
            if idle_for >= self.pool_idle_timeout {
                continue;
            }
            // Unchecked, a kept hyper connection still has to want a request: one that
            // does not would hand it back as well, but while open, and be closed for it.
            let unchecked = !check && matches!(&conn, Idle::Ready(sender, _) if sender.is_ready());
            if unchecked || conn.still_open() {
                return Ok((conn, idle_for >= MAY_BE_CLOSING));
            }
        }
        // Boxed: a connect (with its TLS handshake) is kilobytes of future that the common
        // case, an idle connection, must not carry in every request.
        Box::pin(self.connect())
            .await
            .map(|io| (Idle::Io(io), false))
    }

    /// Closes this worker's idle connections that the upstream closed or that outlived
    /// `pool_idle_timeout`, so that the pool never holds a dead connection for long (and
    /// no descriptor lingers in CLOSE_WAIT). Run by each worker, every second.
    pub fn sweep_here(&self) {
        let mut idle = self.idle_here().lock().unwrap_or_else(|e| e.into_inner());
        if idle.is_empty() {
            return;
        }
        let now = Instant::now();
        idle.retain_mut(|(conn, since)| {
            now.saturating_duration_since(*since) < self.pool_idle_timeout && conn.still_open()
        });
    }

    /// `at`: when the connection fell idle (its exchange's end), the start of its idle time.
    pub(super) fn checkin(&self, conn: Idle, at: Instant) {
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        let mut idle = self.idle_here().lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.pool_max_idle {
            idle.push((conn, at));
        }
    }

    /// A reload replaced this endpoint (its upstream's config changed). Calls still in
    /// flight on it finish, but the sweep no longer sees it, and whatever holds it (a
    /// tunnel, a stream of hours) would keep its idle connections open as long: they are
    /// closed now, and later check-ins close theirs.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        for shard in &self.idle {
            let idle = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
            // Closed outside the lock.
            drop(idle);
        }
    }

    /// TCP, then TLS for https, both within `connect_timeout`.
    pub(super) async fn connect(&self) -> Result<UpstreamIo, UpstreamError> {
        self.connect_with(false).await
    }

    /// A connection that speaks HTTP/1.1 whatever the upstream prefers (for upgrades).
    pub(super) async fn connect_http1(&self) -> Result<UpstreamIo, UpstreamError> {
        self.connect_with(true).await
    }

    async fn connect_with(&self, http1_only: bool) -> Result<UpstreamIo, UpstreamError> {
        let url = &self.config.url;
        let connect = async {
            let tcp = TcpStream::connect((self.config.host.as_str(), self.config.port))
                .await
                .map_err(|source| UpstreamError::Connect {
                    endpoint: url.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => Ok(UpstreamIo::Plain(tcp)),
                Some((any, h1, name)) => {
                    let connector = if http1_only { h1 } else { any };
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|source| UpstreamError::Tls {
                            endpoint: url.clone(),
                            source,
                        })?;
                    Ok(UpstreamIo::Tls(Box::new(tls)))
                }
            }
        };
        let io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    endpoint: url.clone(),
                    timeout: self.connect_timeout,
                });
            }
        };
        if self.negotiates() && !http1_only {
            let p = if io.alpn_h2() { PROTO_H2 } else { PROTO_H1 };
            self.negotiated.store(p, Ordering::Relaxed);
        }
        Ok(io)
    }
}

/// An idle HTTP/1.1 connection: a bare socket, or one whose hyper connection (buffers,
/// dispatcher) is kept for the next exchange, which saves setting those up per request.
pub enum Idle {
    Io(UpstreamIo),
    Ready(H1Sender, Box<H1Conn>),
}

impl Idle {
    /// An idle HTTP/1.1 connection has nothing to say: if it is readable, the upstream
    /// closed it (or sent garbage), and either way it must not carry a request.
    fn still_open(&mut self) -> bool {
        match self {
            Idle::Io(io) => still_open(io.tcp()),
            Idle::Ready(sender, conn) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                poll_ready_for_more(sender, conn, &mut cx) == Poll::Ready(true)
            }
        }
    }
}

/// Whether a kept hyper connection can carry another request: `Ready(false)` once it has
/// closed, `Ready(true)` once hyper wants a request again, `Pending` while it is still
/// busy with the last one (writing the end of its body, say). The poll also lets hyper
/// notice a close and settle a finished exchange.
pub(super) fn poll_ready_for_more(
    sender: &H1Sender,
    conn: &mut H1Conn,
    cx: &mut Context<'_>,
) -> Poll<bool> {
    match conn.poll_without_shutdown(cx) {
        Poll::Ready(_) => Poll::Ready(false),
        Poll::Pending if sender.is_ready() => Poll::Ready(true),
        Poll::Pending => Poll::Pending,
    }
}

/// How long a kept connection must have been idle before the upstream could be closing
/// it as we send: servers close idle connections after a keep-alive timeout of a second or
/// more (Node and Apache 5 s, nginx 75 s), and such a close can cross our request on the
/// wire, after every check we can make. Below this, a close is a crash or a restart, not
/// a timeout, and the request is not kept for a second try.
pub(super) const MAY_BE_CLOSING: Duration = Duration::from_secs(1);

/// Holds one unit of an endpoint's in-flight count for as long as a call uses it.
pub(super) struct Slot(Arc<Endpoint>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.inflight.decrement(1.0);
    }
}

/// An idle HTTP/1.1 connection has nothing to say; if it is readable, the upstream closed
/// it (or sent garbage), and either way it must not carry a request.
fn still_open(io: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(io.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}
