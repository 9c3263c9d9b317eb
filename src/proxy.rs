//! The story of one request, top to bottom.
//!
//! 1. Match a route in the current table (404 `no_route` if none; 400 `bad_request` for a
//!    head with more than one `Host` line).
//! 2. Start the [`InFlight`] guard: from here on, however the request ends, it records one
//!    outcome, its metrics and one access-log line.
//! 3. Work out the deadline: the route's `timeout`, shortened by the client's deadline
//!    header when the route accepts one.
//! 4. Rewrite the head for the upstream and wrap the body ([`RequestBody`]).
//!
//! Those four are done in [`begin`], as hyper hands the request over; the rest in
//! [`forward`], the request's future.
//!
//! 5. Send it upstream, racing the deadline and a forced shutdown. A client that leaves
//!    needs no branch here: hyper (or the connection's hang-up watch) drops this future,
//!    which closes the upstream connection, and the guard records `client_closed`.
//! 6. Hand the response to the client inside [`UpstreamBody`], which owns the upstream
//!    connection, the timers and the guard for the rest of the exchange.
//!
//! Routes with `on_client_disconnect = "continue"` take the same steps 4–6 in a task of
//! their own (`protected.rs`), because their upstream call must outlive this future.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{
    ClientBodyError, DeadlineTimer, ProxyBody, RequestBody, RequestState, UpstreamBody,
    deadline_timer, fired,
};
use crate::headers::{self, ClientInfo};
use crate::outcome::{CancelledBy, ClientConn, InFlight, Outcome, Phase};
use crate::routes::{Route, RouteTable};
use crate::shutdown::Lifecycle;
use crate::upstream::{Conn, UpstreamError};

/// What every request of the process shares.
pub struct Shared {
    pub table: arc_swap::ArcSwap<RouteTable>,
    pub lifecycle: Arc<Lifecycle>,
    pub body_read_timeout: Duration,
    /// Connection tasks, protected calls and tunnels: a drain waits for all of them.
    pub tasks: tokio_util::task::TaskTracker,
    /// The TLS listener's acceptor, replaced when a reload brings new certificates.
    pub tls: arc_swap::ArcSwapOption<tokio_rustls::TlsAcceptor>,
}

/// What every request of one client connection shares.
pub struct ConnContext {
    pub shared: Arc<Shared>,
    pub client: Arc<ClientConn>,
    pub info: ClientInfo,
}

/// Serves one request. `state` is created by the caller, which stamps it if hyper drops
/// the returned future (see [`crate::outcome::Stamped`]).
///
/// Steps 1 to 4 run here, when hyper hands over the request, and the future keeps only
/// what the exchange needs: a future keeps room for everything it ever captured, and the
/// client's request head alone is 264 bytes, which an `async fn` taking it held three
/// times over for the whole exchange (its argument, its local, the next step's argument).
pub fn handle(
    req: Request<Incoming>,
    cx: Arc<ConnContext>,
    state: Arc<RequestState>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send {
    let start = begin(req, &cx, &state);
    async move {
        Ok(match start {
            Start::Answered(resp) => *resp,
            // Tunnels and protected calls are boxed: the future of every request is as
            // large as its largest branch, and these two would triple the plain forward's.
            Start::Tunnel(req, route, guard, deadline) => {
                let tunnel = crate::tunnel::forward(*req, &route, guard, deadline, &cx, state);
                Box::pin(tunnel).await
            }
            Start::Protected(req, route, guard, deadline) => {
                let call = crate::protected::forward(*req, route, guard, deadline, &cx, state);
                Box::pin(call).await
            }
            Start::Forward(up_req, route, guard, deadline) => {
                forward(up_req, &route, guard, deadline, &cx, state).await
            }
        })
    }
}

/// Where a request goes once steps 1 to 4 are done.
enum Start {
    /// No route, or a head refused: answered already. Boxed, as the rare case: the others
    /// are a few words.
    Answered(Box<Response<ProxyBody>>),
    Tunnel(
        Box<Request<Incoming>>,
        Arc<Route>,
        Box<InFlight>,
        Option<Instant>,
    ),
    Protected(
        Box<Request<Incoming>>,
        Arc<Route>,
        Box<InFlight>,
        Option<Instant>,
    ),
    /// The request as the upstream will get it.
    Forward(
        Box<Request<RequestBody>>,
        Arc<Route>,
        Box<InFlight>,
        Option<Instant>,
    ),
}

/// A request the proxy answers itself, before any route: its guard records it as it
/// goes out of scope.
fn answered(
    req: &Request<Incoming>,
    cx: &ConnContext,
    outcome: Outcome,
    resp: Response<ProxyBody>,
) -> Start {
    let mut guard = InFlight::new(
        None,
        req.method().clone(),
        req.uri().clone(),
        cx.client.clone(),
        cx.shared.lifecycle.clone(),
    );
    guard.decide(outcome, resp.status().as_u16(), None);
    Start::Answered(Box::new(resp))
}

/// Steps 1 to 4: the route, the guard, the deadline, the upstream's request head.
fn begin(req: Request<Incoming>, cx: &Arc<ConnContext>, state: &Arc<RequestState>) -> Start {
    let table = cx.shared.table.load_full();
    if headers::more_than_one_host(req.headers()) {
        let mut resp = local(StatusCode::BAD_REQUEST, "more than one Host header\n");
        // Closed afterwards, like every request hyper refuses as malformed. (HTTP/2 has no
        // such header: there the 400 ends the stream alone.)
        if req.version() <= http::Version::HTTP_11 {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        return answered(&req, cx, Outcome::BadRequest, resp);
    }
    let Some(route) = table.find(req.uri().path(), req.method()).cloned() else {
        let resp = local(StatusCode::NOT_FOUND, "no route matches this request\n");
        return answered(&req, cx, Outcome::NoRoute, resp);
    };
    // Boxed: it is moved through several futures, then into the response body.
    let mut guard = Box::new(InFlight::new(
        Some(route.info.clone()),
        req.method().clone(),
        req.uri().clone(),
        cx.client.clone(),
        cx.shared.lifecycle.clone(),
    ));
    guard.watch(state.clone());
    let deadline = deadline(&route, &req, guard.started());
    if crate::tunnel::is_upgrade(&req) {
        return Start::Tunnel(Box::new(req), route, guard, deadline);
    }
    if route.info.protected {
        return Start::Protected(Box::new(req), route, guard, deadline);
    }
    // Boxed: it passes through several futures, each of which would keep room for it.
    let up_req = Box::new(prepare(req, &route, cx, state));
    Start::Forward(up_req, route, guard, deadline)
}

async fn forward(
    up_req: Box<Request<RequestBody>>,
    route: &Route,
    mut guard: Box<InFlight>,
    deadline: Option<Instant>,
    cx: &ConnContext,
    upload: Arc<RequestState>,
) -> Response<ProxyBody> {
    let mut timer = deadline_timer(deadline);
    let result = {
        // Built in place and pinned where it stands: a future moved through locals and
        // arguments leaves a copy of itself in every frame it passed.
        let call = std::pin::pin!(
            route
                .upstream
                .send(up_req, &mut guard, deadline, &route.config)
        );
        until_headers(call, &mut timer, cx).await
    };
    match result {
        Ok((resp, conn)) => respond(resp, conn, timer, route, guard),
        Err(stop) => stopped(&mut guard, &upload, stop),
    }
}

/// Why an upstream call ended before its response headers.
pub(crate) enum Stopped {
    Failed(UpstreamError),
    Cancelled(CancelledBy, Instant),
}

/// Races an upstream call, up to its response headers, against the request's deadline
/// and a forced shutdown. Whatever loses the race is dropped before this returns: a
/// cancelled upstream call is already closed.
pub(crate) async fn until_headers<T>(
    call: std::pin::Pin<&mut impl std::future::Future<Output = Result<T, UpstreamError>>>,
    timer: &mut DeadlineTimer,
    cx: &ConnContext,
) -> Result<T, Stopped> {
    tokio::select! {
        // The call first: once its response is there, a timer that fired in the same
        // instant must not throw it away. (Biased also spares a random draw per poll.)
        biased;
        r = call => r.map_err(Stopped::Failed),
        at = fired(timer) => Err(Stopped::Cancelled(CancelledBy::Timeout, at)),
        _ = ForcedEnd::new(cx) => Err(Stopped::Cancelled(CancelledBy::Shutdown, Instant::now())),
    }
}

/// The shutdown's forced end, as a request waiting for response headers sees it.
///
/// An HTTP/1.1 request is polled by its connection's task (hyper's dispatcher polls the
/// request's future whenever the connection is polled), and its worker wakes that task
/// when the end is forced (`shutdown::Seat`): the task polls the connection, and this
/// looks at the process's flag. Only an HTTP/2 request, which hyper runs in a task of
/// its own (on the same worker), takes a seat of its own on the worker's board.
struct ForcedEnd<'a> {
    lifecycle: &'a crate::shutdown::Lifecycle,
    seat: Option<crate::shutdown::Seat>,
}

impl<'a> ForcedEnd<'a> {
    fn new(cx: &'a ConnContext) -> ForcedEnd<'a> {
        ForcedEnd {
            lifecycle: &cx.shared.lifecycle,
            seat: cx.client.is_h2().then(crate::shutdown::Seat::new),
        }
    }
}

impl std::future::Future for ForcedEnd<'_> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.get_mut();
        if this.lifecycle.is_forced() {
            return std::task::Poll::Ready(());
        }
        // Past the drain is the forced end.
        match this.seat.as_mut() {
            Some(seat) => seat
                .poll_past(cx, crate::shutdown::Stage::Draining)
                .map(|_| ()),
            None => std::task::Poll::Pending,
        }
    }
}

/// Decides the outcome of a call stopped before headers and makes the client's answer.
pub(crate) fn stopped(
    guard: &mut InFlight,
    upload: &RequestState,
    stop: Stopped,
) -> Response<ProxyBody> {
    match stop {
        Stopped::Failed(e) => upstream_failed(guard, upload, e),
        Stopped::Cancelled(by, at) => cancelled(guard, by, at),
    }
}

/// Rewrites the request for the upstream; the upload's progress goes to `state`.
pub(crate) fn prepare(
    req: Request<Incoming>,
    route: &Route,
    cx: &ConnContext,
    state: &Arc<RequestState>,
) -> Request<RequestBody> {
    let (mut parts, body) = req.into_parts();
    let c = &route.config;
    headers::to_upstream(
        &mut parts,
        &cx.info,
        &c.path_prefix,
        c.strip_prefix,
        c.preserve_host,
    );
    let body = RequestBody::new(body, state.clone(), &cx.client, cx.shared.body_read_timeout);
    Request::from_parts(parts, body)
}

/// Response headers arrived: the rest of the exchange lives in the body.
pub(crate) fn respond(
    resp: Response<Incoming>,
    conn: Conn,
    timer: DeadlineTimer,
    route: &Route,
    mut guard: Box<InFlight>,
) -> Response<ProxyBody> {
    guard.set_phase(Phase::StreamingBody);
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    let empty = http_body::Body::is_end_stream(&body);
    let mut body = UpstreamBody::new(
        conn,
        body,
        timer,
        route.config.idle_timeout,
        guard,
        parts.status.as_u16(),
    );
    if empty {
        body.complete();
    }
    Response::from_parts(parts, ProxyBody::Upstream(Box::new(body)))
}

/// The timer or a shutdown stopped the call before response headers.
pub(crate) fn cancelled(guard: &mut InFlight, by: CancelledBy, at: Instant) -> Response<ProxyBody> {
    guard.upstream_aborted();
    match by {
        CancelledBy::Timeout => {
            guard.decide_at(Outcome::Timeout, 504, Some(by), at);
            local(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
        }
        _ => {
            guard.decide_at(Outcome::Shutdown, 503, Some(by), at);
            local(StatusCode::SERVICE_UNAVAILABLE, "proxy is shutting down\n")
        }
    }
}

/// The call failed before response headers. If the client's own upload is what failed,
/// the client left (or stalled): that is never the upstream's fault.
pub(crate) fn upstream_failed(
    guard: &mut InFlight,
    upload: &RequestState,
    e: UpstreamError,
) -> Response<ProxyBody> {
    match upload.client_failure() {
        Some(ClientBodyError::Gone) => {
            guard.upstream_aborted();
            guard.decide(Outcome::ClientClosed, 499, Some(CancelledBy::Client));
            guard.reason("the client left while sending the request body");
            local(StatusCode::BAD_REQUEST, "incomplete request body\n")
        }
        Some(ClientBodyError::Malformed) => {
            guard.upstream_aborted();
            guard.decide(Outcome::BadRequest, 400, Some(CancelledBy::Client));
            guard.reason("the client sent a malformed request body");
            local(StatusCode::BAD_REQUEST, "malformed request body\n")
        }
        Some(ClientBodyError::TooSlow(_)) => {
            guard.upstream_aborted();
            guard.decide(Outcome::Timeout, 408, Some(CancelledBy::Timeout));
            guard.reason("the client stopped sending its request body (body_read_timeout)");
            local(StatusCode::REQUEST_TIMEOUT, "request body timed out\n")
        }
        None => {
            let status = e.status();
            guard.decide(Outcome::UpstreamError, status, None);
            guard.reason(e.to_string());
            tracing::debug!(error = %e, "upstream call failed");
            local(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                if status == 504 {
                    "upstream connect timed out\n"
                } else {
                    "bad gateway\n"
                },
            )
        }
    }
}

/// The route timeout, shortened (never lengthened) by the client's own deadline: the
/// route's `accept_deadline_header` in milliseconds, or gRPC's `grpc-timeout`.
fn deadline(route: &Route, req: &Request<Incoming>, started: Instant) -> Option<Instant> {
    let mut budget = route.config.timeout;
    let asked = route
        .config
        .accept_deadline_header
        .as_ref()
        .and_then(|h| req.headers().get(h))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .or_else(|| {
            req.headers()
                .get(&headers::GRPC_TIMEOUT)
                .and_then(|v| parse_grpc_timeout(v.as_bytes()))
        });
    if let Some(asked) = asked {
        budget = Some(budget.map_or(asked, |b| b.min(asked)));
    }
    // A client may ask for any number on a route with `timeout = "off"`: one past the end
    // of the clock means no deadline, not a panic.
    budget.and_then(|b| started.checked_add(b))
}

/// `grpc-timeout` is digits then a unit: H, M, S, m (ms), u (µs), n (ns).
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A response the proxy makes itself: short plain text, never cached.
pub fn local(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::text(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            parse_grpc_timeout(b"300m"),
            Some(Duration::from_millis(300))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"12x"), None);
        assert_eq!(parse_grpc_timeout(b"123456789S"), None);
    }
}
