//! The upstream client: endpoints, their idle connections, and one HTTP/1.1 exchange.
//!
//! cutoff drives each upstream HTTP/1.1 connection inside the request that uses it (no
//! background task per connection). That is what makes cancellation exact: the connection
//! is owned by the request's future and then by its response body, so dropping either one
//! closes the socket in the same instant, and a cancelled connection can never find its way
//! back into the pool. Only a connection whose exchange ended cleanly, with nothing left
//! unread and keep-alive agreed, is returned to its endpoint's idle list.
//!
//! Endpoint choice is least-requests-in-flight over two random picks (power of two
//! choices): cheap, needs no global lock, and sends less work to a slow instance because
//! its calls stay in flight longer. An endpoint that refuses or resets connections is
//! ejected for a back-off that doubles while it keeps failing; cancellations by the client,
//! the timer or a shutdown are never held against it.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::HeaderName;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::config::{EndpointConfig, Scheme, UpstreamConfig};
use crate::metrics::EndpointMetrics;
use crate::outcome::{InFlight, Phase};

/// Why an upstream call failed, from the upstream's side. Client departures are not here:
/// they are cancellations, decided by the guard.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {endpoint} timed out after {timeout:?}")]
    ConnectTimeout { endpoint: String, timeout: Duration },
    #[error("connecting to {endpoint} failed: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("no healthy endpoint (all ejected after failures)")]
    NoEndpoint,
    #[error("{endpoint}: {source}")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{endpoint}: the connection closed before a response")]
    ClosedEarly { endpoint: String },
    #[error("https upstreams are not supported by this build")]
    TlsUnsupported,
}

impl UpstreamError {
    /// The status the client gets: a connect timeout is a gateway timeout, the rest are
    /// bad gateways.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::ConnectTimeout { .. } => 504,
            _ => 502,
        }
    }

    /// Nothing reached the upstream: safe to try another endpoint.
    fn nothing_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Connect { .. }
        )
    }
}

/// One configured upstream: its endpoints and how to talk to them.
pub struct Upstream {
    pub config: UpstreamConfig,
    endpoints: Vec<Arc<Endpoint>>,
    http1: http1::Builder,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Upstream {
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| Arc::new(Endpoint::new(&config, e.clone())))
            .collect();
        let mut http1 = http1::Builder::new();
        http1.max_buf_size(1024 * 1024);
        Upstream {
            config,
            endpoints,
            http1,
        }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Power of two choices among endpoints not ejected; if all are ejected, the one whose
    /// ejection ends first (a guess is better than refusing every request).
    fn pick(&self, avoid: Option<&Arc<Endpoint>>) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        let usable: Vec<&Arc<Endpoint>> = self
            .endpoints
            .iter()
            .filter(|e| !e.is_ejected(now) && avoid.is_none_or(|a| !Arc::ptr_eq(a, e)))
            .collect();
        match usable.len() {
            0 => self
                .endpoints
                .iter()
                .filter(|e| avoid.is_none_or(|a| !Arc::ptr_eq(a, e)))
                .min_by_key(|e| e.ejected_until.load(Ordering::Relaxed))
                .cloned(),
            1 => Some(usable[0].clone()),
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (usable[a], usable[b]);
                Some(
                    if eb.inflight() < ea.inflight() {
                        eb
                    } else {
                        ea
                    }
                    .clone(),
                )
            }
        }
    }

    /// Sends the request and resolves when response headers arrive, with the connection
    /// that must keep being driven while the body streams.
    ///
    /// Cancel-safety: dropping this future at any point closes whatever connection it
    /// holds; nothing is left running.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
        guard: &mut InFlight,
        deadline: Option<(HeaderName, Instant)>,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        guard.set_phase(Phase::Connecting);
        let mut endpoint = self.pick(None).ok_or(UpstreamError::NoEndpoint)?;
        let mut retried = false;
        let (io, reused, slot) = loop {
            let slot = endpoint.enter();
            match endpoint.checkout().await {
                Ok((io, reused)) => break (io, reused, slot),
                Err(e) => {
                    endpoint.failed();
                    // One retry on another endpoint, and only when nothing was sent.
                    let other = (!retried && e.nothing_sent())
                        .then(|| self.pick(Some(&endpoint)))
                        .flatten();
                    match other {
                        Some(next) => {
                            tracing::info!(error = %e, next = %next.config.url, "retrying on another endpoint");
                            endpoint = next;
                            retried = true;
                        }
                        None => return Err(e),
                    }
                }
            }
        };

        set_host(&mut req, &endpoint);
        if !endpoint.config.base_path.is_empty() {
            *req.uri_mut() = crate::headers::with_base_path(req.uri(), &endpoint.config.base_path);
        }
        if let Some((name, at)) = deadline {
            set_remaining(&mut req, name, at);
        }
        let has_body = !http_body::Body::is_end_stream(req.body());
        let phase = if has_body {
            Phase::Uploading
        } else {
            Phase::AwaitingHeaders
        };
        match self.exchange(&endpoint, io, req, guard, phase).await {
            Ok((resp, conn)) => {
                endpoint.succeeded();
                Ok((resp, conn.with_slot(slot, reused)))
            }
            Err(e) => {
                // A reset or garbage from the upstream counts against it; our own
                // cancellations never reach this line (the future is dropped instead).
                endpoint.failed();
                Err(e)
            }
        }
    }

    async fn exchange(
        &self,
        endpoint: &Arc<Endpoint>,
        io: TcpStream,
        req: Request<RequestBody>,
        guard: &mut InFlight,
        phase: Phase,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        let http_err = |source| UpstreamError::Http {
            endpoint: endpoint.config.url.clone(),
            source,
        };
        let (mut sender, conn) = self
            .http1
            .handshake::<_, RequestBody>(TokioIo::new(io))
            .await
            .map_err(http_err)?;
        let mut conn = Conn {
            conn: Some(conn),
            endpoint: endpoint.clone(),
            slot: None,
            reusable: false,
            done: false,
        };
        guard.dispatched(phase);
        let mut response = std::pin::pin!(sender.send_request(req));
        let resp = poll_fn(|cx| {
            if !conn.done {
                match conn.poll_drive(cx) {
                    Poll::Ready(Ok(())) => {}
                    // The response future carries the same error, more precisely.
                    Poll::Ready(Err(_)) | Poll::Pending => {}
                }
            }
            match response.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(r.map_err(http_err)),
                Poll::Pending if conn.done => Poll::Ready(Err(UpstreamError::ClosedEarly {
                    endpoint: endpoint.config.url.clone(),
                })),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        drop(sender);
        conn.reusable = keep_alive(&resp);
        Ok((resp, conn))
    }
}

fn set_host(req: &mut Request<RequestBody>, endpoint: &Endpoint) {
    if !req.headers().contains_key(http::header::HOST) {
        req.headers_mut()
            .insert(http::header::HOST, endpoint.host_header.clone());
    }
}

/// Tells the upstream how much time is left, computed now, at dispatch, so that time
/// spent connecting (or queued) is not promised to the upstream.
fn set_remaining(req: &mut Request<RequestBody>, name: HeaderName, deadline: Instant) {
    let ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    if req.headers().contains_key("grpc-timeout")
        && let Ok(v) = HeaderValue::from_str(&format!("{ms}m"))
    {
        req.headers_mut().insert("grpc-timeout", v);
    }
    req.headers_mut().insert(name, HeaderValue::from(ms));
}

/// Whether the upstream agreed to keep the connection open after this response.
fn keep_alive(resp: &Response<Incoming>) -> bool {
    if resp.version() != http::Version::HTTP_11 {
        return false;
    }
    !resp
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// An upstream connection in use by one exchange. Dropping it closes the socket.
pub struct Conn {
    conn: Option<http1::Connection<TokioIo<TcpStream>, RequestBody>>,
    endpoint: Arc<Endpoint>,
    slot: Option<Slot>,
    reusable: bool,
    done: bool,
}

impl Conn {
    fn with_slot(mut self, slot: Slot, _reused: bool) -> Conn {
        self.slot = Some(slot);
        self
    }

    /// Drives reads and writes. Ready once the exchange is over; then, if the connection is
    /// clean, it goes back to the endpoint's idle list.
    pub fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let r = std::task::ready!(conn.poll_without_shutdown(cx));
        self.done = true;
        let conn = self.conn.take();
        if r.is_ok()
            && self.reusable
            && let Some(conn) = conn
        {
            let parts = conn.into_parts();
            if parts.read_buf.is_empty() {
                self.endpoint.checkin(parts.io.into_inner());
            }
        }
        Poll::Ready(r)
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// Holds one unit of an endpoint's in-flight count for as long as a call uses it.
struct Slot(Arc<Endpoint>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.inflight.decrement(1.0);
    }
}

/// One instance of an upstream.
pub struct Endpoint {
    pub config: EndpointConfig,
    host_header: HeaderValue,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_max_idle: usize,
    /// Idle connections, most recently used last (LIFO keeps the warm ones warm and lets
    /// the cold ones time out). The lock is never held across an await.
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    inflight: AtomicUsize,
    /// Consecutive connection failures; drives the ejection back-off.
    failures: AtomicU32,
    /// Nanoseconds since `epoch` until which the endpoint is ejected (0: not ejected).
    ejected_until: AtomicU64,
    epoch: Instant,
    metrics: EndpointMetrics,
    upstream: String,
}

impl Endpoint {
    fn new(upstream: &UpstreamConfig, config: EndpointConfig) -> Endpoint {
        let host_header = HeaderValue::from_str(&config.authority)
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Endpoint {
            metrics: EndpointMetrics::register(&upstream.name, &config.url),
            upstream: upstream.name.clone(),
            host_header,
            connect_timeout: upstream.connect_timeout,
            pool_idle_timeout: upstream.pool_idle_timeout,
            pool_max_idle: upstream.pool_max_idle,
            idle: Mutex::new(Vec::new()),
            inflight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            epoch: Instant::now(),
            config,
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    fn enter(self: &Arc<Self>) -> Slot {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.metrics.inflight.increment(1.0);
        Slot(self.clone())
    }

    fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && (now.saturating_duration_since(self.epoch).as_nanos() as u64) < until
    }

    fn failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        // One failure may be bad luck; from the second in a row, eject for 1 s, 2 s, 4 s…
        // up to 30 s, then retry with real traffic.
        if n >= 2 {
            let backoff = Duration::from_secs(1 << (n - 2).min(5)).min(Duration::from_secs(30));
            let until = Instant::now().saturating_duration_since(self.epoch) + backoff;
            self.ejected_until
                .store(until.as_nanos() as u64, Ordering::Relaxed);
            self.metrics.ejections.increment(1);
            tracing::warn!(upstream = %self.upstream, endpoint = %self.config.url,
                failures = n, backoff_ms = backoff.as_millis() as u64, "endpoint ejected");
        }
    }

    fn succeeded(&self) {
        if self.failures.swap(0, Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }

    /// An idle connection that is still open, or a new one.
    async fn checkout(&self) -> Result<(TcpStream, bool), UpstreamError> {
        if self.config.scheme == Scheme::Https {
            return Err(UpstreamError::TlsUnsupported);
        }
        loop {
            let candidate = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.pop()
            };
            let Some((io, since)) = candidate else { break };
            if since.elapsed() < self.pool_idle_timeout && still_open(&io) {
                return Ok((io, true));
            }
        }
        let connect = TcpStream::connect((self.config.host.as_str(), self.config.port));
        let io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(io)) => io,
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect {
                    endpoint: self.config.url.clone(),
                    source,
                });
            }
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    endpoint: self.config.url.clone(),
                    timeout: self.connect_timeout,
                });
            }
        };
        let _ = io.set_nodelay(true);
        Ok((io, false))
    }

    fn checkin(&self, io: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.pool_max_idle {
            idle.push((io, Instant::now()));
        }
    }
}

/// An idle HTTP/1.1 connection has nothing to say; if it is readable, the upstream closed
/// it (or sent garbage), and either way it must not carry a request.
fn still_open(io: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(io.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}
