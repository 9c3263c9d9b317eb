//! The upstream client: choosing an endpoint, admission, and one exchange.
//!
//! HTTP/1.1: cutoff drives each upstream connection inside the request that uses it (no
//! background task per connection). That is what makes cancellation exact: the connection
//! is owned by the request's future and then by its response body, so dropping either one
//! closes the socket in the same instant, and a cancelled connection can never find its way
//! back into the pool. Only a connection whose exchange ended cleanly, with nothing left
//! unread and keep-alive agreed, returns to its endpoint's idle list.
//!
//! HTTP/2 (`protocol = "h2"`, or negotiated by ALPN with `auto`): one shared connection per
//! endpoint (`h2.rs`); cancelling a call resets its stream and nothing else.
//!
//! Endpoint choice is least-requests-in-flight over two random picks (power of two
//! choices): cheap, no global lock, and a slow instance gets less work because its calls
//! stay in flight longer. A connect failure is retried once on another endpoint, only when
//! nothing was sent (the request is still whole), and never after the client left (the
//! retry lives in the request's future, which is gone by then).

mod admission;
mod endpoint;
mod frames;
mod h2;

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderName};
use http::uri::{PathAndQuery, Scheme as UriScheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;

use self::admission::Admission;
use self::endpoint::Idle;
use self::endpoint::Slot;
pub use self::endpoint::{Endpoint, UpstreamIo, set_worker_index};

type H1Conn = http1::Connection<TokioIo<UpstreamIo>, RequestBody>;
type H1Sender = http1::SendRequest<RequestBody>;
use crate::body::RequestBody;
use crate::config::{RouteConfig, Scheme, UpstreamConfig};
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
    #[error("TLS handshake with {endpoint} failed: {source}")]
    Tls {
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
    #[error("{reason}")]
    H2 { status: u16, reason: String },
    #[error("{endpoint}: the connection closed before a response")]
    ClosedEarly { endpoint: String },
    #[error("admission queue full ({queued} waiting, max_queue = {max})")]
    QueueFull { queued: usize, max: usize },
    #[error("waited {0:?} in the admission queue (queue_timeout) without a free slot")]
    QueueTimeout(Duration),
}

impl UpstreamError {
    /// The status the client gets: a connect timeout is a gateway timeout, a full or slow
    /// queue is unavailability, the rest are bad gateways.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::ConnectTimeout { .. } => 504,
            UpstreamError::QueueFull { .. } | UpstreamError::QueueTimeout(_) => 503,
            UpstreamError::H2 { status, .. } => *status,
            _ => 502,
        }
    }

    /// Nothing reached the upstream: safe to try another endpoint.
    fn nothing_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Connect { .. }
                | UpstreamError::Tls { .. }
                | UpstreamError::H2 { .. }
        )
    }

    /// A failure of the endpoint itself, which counts towards its ejection.
    fn blames_endpoint(&self) -> bool {
        match self {
            UpstreamError::QueueFull { .. } | UpstreamError::QueueTimeout(_) => false,
            // The request body failed: the client left, stalled or sent garbage mid-upload.
            // That aborts the exchange, but it is the client's doing, never the endpoint's.
            UpstreamError::Http { source, .. } => !caused_by_client_body(source),
            _ => true,
        }
    }
}

fn caused_by_client_body(e: &hyper::Error) -> bool {
    crate::body::causes(e).any(|s| s.is::<crate::body::ClientBodyError>())
}

/// One configured upstream: its endpoints and how to talk to them.
pub struct Upstream {
    pub config: UpstreamConfig,
    /// The bytes of `ca_file` this upstream trusts: a reload rebuilds the upstream when
    /// they change, though its config (which names only the path) did not.
    pub ca_pem: Option<Vec<u8>>,
    endpoints: Vec<Arc<Endpoint>>,
    http1: http1::Builder,
    admission: Admission,
}

fn read_ca(config: &UpstreamConfig) -> Result<Option<Vec<u8>>, String> {
    config
        .ca_file
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|e| {
                format!(
                    "upstream `{}`: {}: cannot read CA certificates: {e}",
                    config.name,
                    path.display()
                )
            })
        })
        .transpose()
}

impl Upstream {
    /// Fails only on TLS material that cannot be loaded.
    pub fn new(config: UpstreamConfig) -> Result<Upstream, String> {
        let ca_pem = read_ca(&config)?;
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| Endpoint::new(&config, ca_pem.as_deref(), e.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("upstream `{}`: {e}", config.name))?;
        let mut http1 = http1::Builder::new();
        http1.max_buf_size(1024 * 1024);
        Ok(Upstream {
            admission: Admission::new(&config),
            ca_pem,
            config,
            endpoints,
            http1,
        })
    }

    /// Whether this upstream can serve `config` as it is on disk now: same settings, same
    /// CA certificates. A reload keeps such an upstream, with its warm connections.
    pub fn serves(&self, config: &UpstreamConfig) -> bool {
        self.config == *config && read_ca(config).is_ok_and(|pem| pem == self.ca_pem)
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// A reload replaced this upstream: see [`Endpoint::retire`].
    pub fn retire(&self) {
        for e in &self.endpoints {
            e.retire();
        }
    }

    /// Power of two choices among endpoints not ejected (and not `avoid`); if every one is
    /// ejected, the one whose ejection ends first: a guess beats refusing every request.
    fn pick(&self, avoid: Option<&Arc<Endpoint>>) -> Option<Arc<Endpoint>> {
        let eps = &self.endpoints;
        let allowed = |e: &&Arc<Endpoint>| avoid.is_none_or(|a| !Arc::ptr_eq(a, e));
        if eps.len() == 1 {
            return eps.iter().find(allowed).cloned();
        }
        let now = Instant::now();
        let healthy = |e: &&Arc<Endpoint>| allowed(e) && !e.is_ejected(now);
        // Two distinct draws: the same endpoint twice would bypass the comparison and give
        // a slow endpoint a floor of 1/n² of the traffic.
        let n = eps.len();
        let i = fastrand::usize(..n);
        let j = (i + 1 + fastrand::usize(..n - 1)) % n;
        let (a, b) = (&eps[i], &eps[j]);
        let chosen = match (healthy(&a), healthy(&b)) {
            (true, true) if !Arc::ptr_eq(a, b) => {
                Some(if b.inflight() < a.inflight() { b } else { a })
            }
            (true, false) | (true, true) => Some(a),
            (false, true) => Some(b),
            (false, false) => None,
        };
        chosen
            .or_else(|| {
                // Both draws were unusable: take the least loaded healthy one, if any.
                eps.iter().filter(healthy).min_by_key(|e| e.inflight())
            })
            .or_else(|| eps.iter().filter(allowed).min_by_key(|e| e.ejected_until()))
            .cloned()
    }

    /// Sends the request and resolves when response headers arrive, with the connection
    /// that must keep being driven while the body streams.
    ///
    /// Cancel-safety: dropping this future at any point (queued, connecting, uploading,
    /// awaiting headers) closes whatever connection or stream it holds; nothing is left
    /// running, and nothing is counted against the endpoint.
    pub async fn send(
        &self,
        mut req: Box<Request<RequestBody>>,
        guard: &mut InFlight,
        deadline: Option<Instant>,
        route: &RouteConfig,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        let permit = self.admission.admit(guard).await?;
        guard.set_phase(Phase::Connecting);
        let mut endpoint = self.pick(None).ok_or(UpstreamError::NoEndpoint)?;
        let mut retried = false;
        let (link, slot) = loop {
            let slot = endpoint.enter();
            // The HTTP/2 branches are boxed, like every connect below: their futures are
            // large, and a request's future is as large as its largest branch, copied and
            // kept for every request, including the common pooled HTTP/1.1 one.
            let link = match endpoint.uses_h2() || endpoint.protocol_unknown() {
                true => match Box::pin(endpoint.h2.sender(&endpoint)).await {
                    Err(UpstreamError::H2 {
                        status: h2::NOT_H2, ..
                    }) => endpoint
                        .checkout(false)
                        .await
                        .map(|(io, old)| Link::H1(io, old)),
                    other => other.map(Link::H2),
                },
                false => match endpoint.checkout(false).await {
                    // `auto` found HTTP/2 on a new connection after all.
                    Ok((Idle::Io(io), _)) if io.alpn_h2() => {
                        Box::pin(endpoint.h2.adopt(&endpoint, io))
                            .await
                            .map(Link::H2)
                    }
                    other => other.map(|(io, old)| Link::H1(io, old)),
                },
            };
            match link {
                Ok(link) => break (link, slot),
                Err(e) => {
                    // An HTTP/2 set-up failure was counted once by the set-up task, not
                    // once per request that waited for it.
                    if !matches!(e, UpstreamError::H2 { .. }) {
                        endpoint.failed(&e);
                    }
                    let other = (!retried && e.nothing_sent())
                        .then(|| self.pick(Some(&endpoint)))
                        .flatten();
                    match other {
                        Some(next) => {
                            tracing::info!(error = %e, next = %next.config.url,
                                "retrying on another endpoint");
                            endpoint = next;
                            retried = true;
                        }
                        None => return Err(e),
                    }
                }
            }
        };

        crate::headers::set_host(
            req.headers_mut(),
            &endpoint.host_header,
            route.preserve_host,
        );
        if !endpoint.config.base_path.is_empty() {
            *req.uri_mut() = crate::headers::with_base_path(req.uri(), &endpoint.config.base_path);
        }
        if let Some(at) = deadline {
            set_remaining(&mut req, route.deadline_header.as_ref(), at);
        }
        let phase = if http_body::Body::is_end_stream(req.body()) {
            Phase::AwaitingHeaders
        } else {
            Phase::Uploading
        };
        let result = match link {
            Link::H1(io, may_be_closing) => {
                let replay = may_be_closing.then(|| Replay::of(&req)).flatten();
                self.exchange_h1(&endpoint, io, req, replay, guard, phase)
                    .await
            }
            Link::H2(sender) => Box::pin(exchange_h2(&endpoint, sender, *req, guard, phase)).await,
        };
        match result {
            Ok((resp, mut conn)) => {
                endpoint.succeeded();
                conn.slot = Some(slot);
                conn.permit = permit;
                Ok((resp, conn))
            }
            Err(e) => {
                // A reset or garbage from the upstream counts against it. Our own
                // cancellations never reach this line: the future is dropped instead.
                if e.blames_endpoint() {
                    endpoint.failed(&e);
                }
                Err(e)
            }
        }
    }

    async fn exchange_h1(
        &self,
        endpoint: &Arc<Endpoint>,
        idle: Idle,
        req: Box<Request<RequestBody>>,
        mut replay: Option<Box<Replay>>,
        guard: &mut InFlight,
        phase: Phase,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        let http_err = |source| UpstreamError::Http {
            endpoint: endpoint.config.url.clone(),
            source,
        };
        // Kept: a connection from the idle list, not polled since it went idle (see
        // `Endpoint::checkout`).
        let mut kept = matches!(idle, Idle::Ready(..));
        let (mut sender, conn) = match idle {
            Idle::Ready(sender, conn) => (sender, conn),
            Idle::Io(io) => Box::pin(self.handshake(io)).await.map_err(http_err)?,
        };
        let mut conn = Conn::new(endpoint, Some(conn));
        guard.dispatched(phase);
        // Attempts on new connections after the first: a kept connection that hands the
        // request back untouched (it was closed while idle) is not one, since each takes
        // one off the idle list, whose length bounds them.
        let mut attempt = 0;
        // The box is freed as the request goes to hyper (`unbox`), not kept empty for the
        // whole exchange (328 bytes per request in flight); a request handed back, a rare
        // event, is boxed again.
        let mut req = Some(req);
        let resp = loop {
            // The request handed back by a connection that did not take it. Assigned in one
            // statement, so that nothing of the attempt (the response future, the result)
            // outlives it: a future keeps room for every local that lives across an await,
            // and the reconnection below held them beside the request's copy, in the
            // future of every request (1 744 → 1 256 bytes).
            let back = {
                // Unconstrained: once the connection is done, its end has filled the
                // response's one-shot (the answer, an error, or the request handed back),
                // and the poll below must read it at once. Under tokio's budget it could
                // read `Pending`, which the `conn.done` arm takes for a connection that
                // closed without a word: an answered request replayed or failed, a request
                // never sent failed.
                let mut response = std::pin::pin!(tokio::task::unconstrained(
                    sender.try_send_request(unbox(&mut req))
                ));
                let r = poll_fn(|cx| {
                    if !conn.done {
                        // An error here reaches the response future too, with more context.
                        let _ = conn.poll_drive(cx);
                    }
                    match response.as_mut().poll(cx) {
                        // Boxed: the error carries the whole request back, and the future
                        // of every request would otherwise keep room for it.
                        Poll::Ready(r) => Poll::Ready(Some(r.map_err(Box::new))),
                        Poll::Pending if conn.done => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await;
                // `true`: handed back untouched, nothing of it sent.
                match r {
                    Some(Ok(resp)) => break resp,
                    Some(Err(mut e)) if attempt == 0 => match e.take_message() {
                        Some(back) => {
                            if kept {
                                tracing::debug!(endpoint = %endpoint.config.url, error = %e.error(),
                                    "a kept connection was closed while idle; trying the next one");
                            }
                            (back, true)
                        }
                        None => match replay.take() {
                            Some(replay) if closed_under_us(e.error()) => {
                                tracing::debug!(error = %e.error(), "a kept connection closed as the request went out; sending it again on a new one");
                                (replay.request(), false)
                            }
                            _ => return Err(http_err(e.into_error())),
                        },
                    },
                    Some(Err(e)) => return Err(http_err(e.into_error())),
                    None => match replay.take() {
                        Some(replay) if attempt == 0 => (replay.request(), false),
                        _ => {
                            return Err(UpstreamError::ClosedEarly {
                                endpoint: endpoint.config.url.clone(),
                            });
                        }
                    },
                }
            };
            let (back, untouched) = back;
            req = Some(Box::new(back));
            // A kept connection that never took the request: the next kept one, checked
            // this time, or a new one. Anything else goes on a new connection.
            let (next, may_be_closing) = if kept && untouched {
                Box::pin(endpoint.checkout(true)).await?
            } else {
                attempt += 1;
                (Idle::Io(Box::pin(endpoint.connect()).await?), false)
            };
            // The copy goes with the connection that may be closing under the request:
            // one reused within a second, or a new one, is sent on once, as ever.
            replay = match may_be_closing {
                true => replay.or_else(|| req.as_deref().and_then(Replay::of)),
                false => None,
            };
            kept = matches!(next, Idle::Ready(..));
            let (s, c) = match next {
                Idle::Ready(s, c) => (s, c),
                Idle::Io(io) => Box::pin(self.handshake(io)).await.map_err(http_err)?,
            };
            sender = s;
            conn = Conn::new(endpoint, Some(c));
        };
        conn.reusable = keep_alive(&resp);
        conn.uploads = phase == Phase::Uploading;
        conn.sender = Some(sender);
        Ok((resp, conn))
    }

    /// Boxed: a hyper connection is several hundred bytes, and it moves between the
    /// request, its body and the idle list.
    async fn handshake(&self, io: UpstreamIo) -> Result<(H1Sender, Box<H1Conn>), hyper::Error> {
        let (sender, conn) = self
            .http1
            .handshake::<_, RequestBody>(TokioIo::new(io))
            .await?;
        Ok((sender, Box::new(conn)))
    }
}

impl Upstream {
    /// Starts an HTTP/1.1 upgrade (WebSocket and the like) on a fresh connection, which is
    /// never pooled. The connection is driven by a task of its own, as hyper's upgrade
    /// machinery needs; dropping the response before it arrives still closes it.
    pub async fn upgrade(
        &self,
        mut req: Request<RequestBody>,
        guard: &mut InFlight,
        route: &RouteConfig,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        let permit = self.admission.admit(guard).await?;
        guard.set_phase(Phase::Connecting);
        let endpoint = self.pick(None).ok_or(UpstreamError::NoEndpoint)?;
        let slot = endpoint.enter();
        let io = match endpoint.connect_http1().await {
            Ok(io) => io,
            Err(e) => {
                endpoint.failed(&e);
                return Err(e);
            }
        };
        crate::headers::set_host(
            req.headers_mut(),
            &endpoint.host_header,
            route.preserve_host,
        );
        if !endpoint.config.base_path.is_empty() {
            *req.uri_mut() = crate::headers::with_base_path(req.uri(), &endpoint.config.base_path);
        }
        let http_err = |source| UpstreamError::Http {
            endpoint: endpoint.config.url.clone(),
            source,
        };
        let (mut sender, conn) = self
            .http1
            .handshake::<_, RequestBody>(TokioIo::new(io))
            .await
            .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        guard.dispatched(Phase::AwaitingHeaders);
        let resp = sender.send_request(req).await.map_err(http_err)?;
        endpoint.succeeded();
        let mut conn = Conn::new(&endpoint, None);
        conn.slot = Some(slot);
        conn.permit = permit;
        Ok((resp, conn))
    }
}

/// A copy of a request that may be sent again if the kept connection it goes out on turns
/// out to have been closed by the upstream as it was sent: the one failure a client must
/// never see for a request the upstream would have served (nginx retries it too). Taken
/// only when that can happen (the connection sat idle for [`endpoint::MAY_BE_CLOSING`]) and
/// is allowed to be mended: an idempotent method (RFC 9110 section 9.2.2) and no body, so
/// that the copy is the whole request. The busy path, a connection reused within a second,
/// pays nothing.
///
/// HTTP/2 takes one of every bodiless call, whatever its method ([`Replay::of_bodiless`]):
/// a stream the upstream refuses with `REFUSED_STREAM` was not processed (RFC 9113,
/// section 8.7), so it is sent once more, which hyper cannot do since it does not hand
/// the request back.
struct Replay {
    method: http::Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: RequestBody,
}

impl Replay {
    fn of(req: &Request<RequestBody>) -> Option<Box<Replay>> {
        use http::Method;
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        idempotent.then(|| Replay::of_bodiless(req)).flatten()
    }

    fn of_bodiless(req: &Request<RequestBody>) -> Option<Box<Replay>> {
        http_body::Body::is_end_stream(req.body()).then(|| {
            Box::new(Replay {
                method: req.method().clone(),
                uri: req.uri().clone(),
                headers: req.headers().clone(),
                body: req.body().finished(),
            })
        })
    }

    fn request(self: Box<Replay>) -> Request<RequestBody> {
        let Replay {
            method,
            uri,
            headers,
            body,
        } = *self;
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req
    }
}

/// The connection was closed or reset before any byte of the response: what a request
/// that crossed the upstream's closing of an idle connection meets.
fn closed_under_us(e: &hyper::Error) -> bool {
    e.is_incomplete_message()
        || crate::body::causes(e)
            .filter_map(|s| s.downcast_ref::<io::Error>())
            .any(|io| {
                matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionAborted
                )
            })
}

/// The request out of its box, the box freed.
fn unbox<T>(b: &mut Option<Box<T>>) -> T {
    *b.take().expect("a request to send")
}

/// How the call reaches its endpoint.
enum Link {
    /// With whether the connection was kept long enough that the upstream may be closing
    /// it (a new one: false).
    H1(Idle, bool),
    H2(h2::H2Sender),
}

async fn exchange_h2(
    endpoint: &Arc<Endpoint>,
    sender: h2::H2Sender,
    mut req: Request<RequestBody>,
    guard: &mut InFlight,
    phase: Phase,
) -> Result<(Response<Incoming>, Conn), UpstreamError> {
    // HTTP/2 carries the authority as a pseudo-header: an absolute URI, no Host header.
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| h.to_str().ok().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| {
            endpoint
                .config
                .authority
                .parse()
                .expect("validated at load")
        });
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let scheme = match endpoint.config.scheme {
        Scheme::Http => UriScheme::HTTP,
        Scheme::Https => UriScheme::HTTPS,
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    parts.path_and_query = Some(pq);
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
    let (mut sender, mut stream) = h2::live_stream(endpoint, sender).await?;
    guard.dispatched(phase);
    let http_err = |source| UpstreamError::Http {
        endpoint: endpoint.config.url.clone(),
        source,
    };
    let refused_copy = Replay::of_bodiless(&req);
    let resp = match sender.sender.try_send_request(req).await {
        Ok(resp) => resp,
        // Handed back unsent: the connection is going away (GOAWAY) and opened no stream
        // for it. Nothing reached the upstream, so even a POST goes out once more, on a
        // new connection; a 502 here would fail every call that raced an upstream's
        // graceful restart.
        Err(mut e) => match e.take_message() {
            Some(req) => {
                sender.going_away();
                (sender, stream) = h2::live_stream(endpoint, sender).await?;
                sender.sender.send_request(req).await.map_err(http_err)?
            }
            None => {
                let e = e.into_error();
                let Some(copy) = refused_copy.filter(|_| refused_unprocessed(&e)) else {
                    return Err(http_err(e));
                };
                tracing::info!(endpoint = %endpoint.config.url,
                    "the upstream refused a stream unprocessed; sending it once more");
                // The refused stream's slot first: on a connection that allows one
                // stream, the copy would wait for it.
                drop(stream);
                (sender, stream) = h2::live_stream(endpoint, sender).await?;
                sender
                    .sender
                    .send_request(copy.request())
                    .await
                    .map_err(http_err)?
            }
        },
    };
    let mut conn = Conn::new(endpoint, None);
    conn.stream = Some(stream);
    Ok((resp, conn))
}

/// The upstream reset the stream with `REFUSED_STREAM`: it did nothing with the request.
fn refused_unprocessed(e: &hyper::Error) -> bool {
    crate::body::causes(e)
        .filter_map(|s| s.downcast_ref::<::h2::Error>())
        .any(|h| h.is_remote() && h.reason() == Some(::h2::Reason::REFUSED_STREAM))
}

/// Tells the upstream how much time is left, computed now, at dispatch, so that time spent
/// queued or connecting is not promised to the upstream: in the route's `deadline_header`,
/// and in `grpc-timeout` whenever the client sent one (gRPC servers honour it).
fn set_remaining(req: &mut Request<RequestBody>, header: Option<&HeaderName>, deadline: Instant) {
    let grpc = &crate::headers::GRPC_TIMEOUT;
    let has_grpc = req.headers().contains_key(grpc);
    if header.is_none() && !has_grpc {
        // Nothing to tell: spare the clock read on every plain request.
        return;
    }
    let ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    if has_grpc && let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
        req.headers_mut().insert(grpc.clone(), v);
    }
    if let Some(name) = header {
        req.headers_mut()
            .insert(name.clone(), HeaderValue::from(ms));
    }
}

/// Whether the upstream agreed to keep the connection open after this response.
fn keep_alive(resp: &Response<Incoming>) -> bool {
    resp.version() == http::Version::HTTP_11
        && !resp
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// An upstream call in progress. Dropping it closes the HTTP/1.1 connection (or, for
/// HTTP/2, lets the dropped response body reset the stream) and releases the endpoint's
/// in-flight count and the admission slot.
///
/// An HTTP/1.1 connection dropped before its exchange finished is *reset* (a RST, see
/// [`UpstreamIo::reset`]), not closed with a FIN: a FIN queues behind any request bytes
/// still unsent, and an upstream that is not reading (busy, or slow to take a large
/// upload) would never see it. A reset reaches it at once, whatever is queued.
pub struct Conn {
    conn: Option<Box<H1Conn>>,
    /// Kept with the connection so that both can serve the next exchange.
    sender: Option<H1Sender>,
    endpoint: Arc<Endpoint>,
    slot: Option<Slot>,
    permit: Option<OwnedSemaphorePermit>,
    /// HTTP/2: the stream this exchange holds on the shared connection.
    stream: Option<h2::StreamSlot>,
    reusable: bool,
    done: bool,
    /// The whole response was read: closing now is a plain close, not an abort.
    exchanged: bool,
    /// The request had a body, whose end hyper may still be writing when the response
    /// ends (see [`Conn::exchanged`]).
    uploads: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.exchanged {
            return;
        }
        if let Some(conn) = self.conn.take() {
            conn.into_parts().io.inner().reset();
        }
    }
}

impl Conn {
    fn new(endpoint: &Arc<Endpoint>, conn: Option<Box<H1Conn>>) -> Conn {
        Conn {
            done: conn.is_none(),
            conn,
            sender: None,
            endpoint: endpoint.clone(),
            slot: None,
            permit: None,
            stream: None,
            reusable: false,
            exchanged: false,
            uploads: false,
        }
    }

    /// The upstream's response ended cleanly. A connection that agreed to keep-alive goes
    /// back to the endpoint's idle list (with its hyper state), where the check-out makes
    /// sure it is still open and ready for another request; any other is closed politely.
    /// `at`: when the exchange ended, which starts the connection's idle time.
    ///
    /// `upload_read`: the request's body was read from the client to its end (what hyper
    /// still has of it is written before the connection is checked in: see
    /// [`finish_upload`]). An upstream may answer before it has the whole body (nginx's
    /// `return`, an early 413): the rest of the upload is then still on its way through
    /// hyper's connection, and an idle connection is polled by nobody. Checked in, it held
    /// the client's upload until the next use or the pool's sweep: measured, a 1 GiB
    /// upload that got its 200 at once stalled for 4 to 5 s, the client's window shut.
    /// Such a connection is reset instead (its upstream gets no truncated body it could
    /// take for a whole one), which ends the upload: an HTTP/1 client connection closes
    /// after its answer and discards the rest (a lingering close, see `linger.rs`).
    pub fn exchanged(&mut self, at: Instant, upload_read: bool) {
        if !upload_read {
            // Dropped unexchanged: reset.
            return;
        }
        self.exchanged = true;
        if self.done {
            return;
        }
        let (true, Some(sender), Some(conn)) =
            (self.reusable, self.sender.take(), self.conn.take())
        else {
            return;
        };
        self.done = true;
        if self.uploads {
            finish_upload(self.endpoint.clone(), sender, conn, at);
        } else {
            // Checked in without another poll: the poll that read the response's end has
            // made hyper ready for the next request already, and the next exchange's first
            // poll notices a close that came while it sat idle (see `Endpoint::checkout`).
            // A poll here cost about 900 instructions per request.
            self.endpoint.checkin(Idle::Ready(sender, conn), at);
        }
    }

    /// Drives reads and writes. Ready once the connection has closed (an error, or the
    /// upstream's `Connection: close`).
    pub fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let r = std::task::ready!(conn.poll_without_shutdown(cx));
        self.done = true;
        self.conn = None;
        Poll::Ready(r)
    }
}

/// How long the end of an upload may take to reach an upstream that has already answered
/// (it is a few KiB: what hyper had queued when the response ended). An upstream that
/// reads it no faster is not waited for longer: its connection is closed.
const UPLOAD_TAIL_BOUND: Duration = Duration::from_secs(10);

/// Checks in a connection whose request had a body, once hyper has written all of it.
///
/// An upstream may answer before it has read the whole body (nginx's `return`, an early
/// 413, one that answers as it reads): the response can end while the last of the upload,
/// read from the client already, still waits in hyper's write queue for the upstream's
/// socket to take it. An idle connection is polled by nobody, so checked in as it was,
/// that tail waited for the next request or the pool's sweep, which found the connection
/// not ready for another request and closed it: the upstream got the upload cut short
/// (measured: in 6 runs of 24 of the tests that upload 64 MiB to an upstream answering
/// 4 MiB at once). One poll here finishes the usual case; the rest is driven by a task of
/// its own until hyper is ready for another request.
fn finish_upload(endpoint: Arc<Endpoint>, sender: H1Sender, mut conn: Box<H1Conn>, at: Instant) {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match endpoint::poll_ready_for_more(&sender, &mut conn, &mut cx) {
        Poll::Ready(true) => endpoint.checkin(Idle::Ready(sender, conn), at),
        // Closed (by the upstream, or on an error): nothing to keep.
        Poll::Ready(false) => {}
        Poll::Pending => {
            tokio::spawn(async move {
                let ready = tokio::time::timeout(
                    UPLOAD_TAIL_BOUND,
                    poll_fn(|cx| endpoint::poll_ready_for_more(&sender, &mut conn, cx)),
                )
                .await;
                if ready == Ok(true) {
                    endpoint.checkin(Idle::Ready(sender, conn), Instant::now());
                }
            });
        }
    }
}
