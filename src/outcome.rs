//! The guard that gives every request exactly one outcome.
//!
//! Cancellation in Rust is a dropped future: when a client leaves, hyper drops the
//! handler's future (or the response body), and no code after the current `.await` ever
//! runs. So the bookkeeping cannot live in the happy path. [`InFlight`] is created when a
//! request arrives and travels with it (in the handler, then inside the response body);
//! whatever ends the request, its `Drop` runs and records the outcome, the metrics and the
//! one access-log line.
//!
//! The first cause wins: the proxy's own code decides `timeout`, `upstream_error`,
//! `shutdown` or `ok` explicitly with [`InFlight::decide`] the moment it sees them. A guard
//! dropped undecided was dropped from outside: by the shutdown's forced end (the shared
//! [`Lifecycle`] says so), otherwise by hyper because the client left (`client_closed`).
//!
//! Ordering guarantee relied on for `cutoff_cancel_propagation_seconds`: the owner of an
//! upstream call drops it (closing the connection or resetting the stream) before the
//! guard, so the guard's drop time is the moment the upstream learnt of the cancellation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Uri};

use crate::access_log::{self, AccessRecord};
use crate::body::RequestState;
use crate::metrics::RouteMetrics;
use crate::shutdown::Lifecycle;
use crate::write_gate::WriteGate;

/// How a request ended. The discriminant indexes the per-route metric handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    ClientClosed = 1,
    Timeout = 2,
    UpstreamError = 3,
    Shutdown = 4,
    NoRoute = 5,
    /// An extension of the contract's outcomes: a request the proxy refused as malformed
    /// (smuggling shape, a broken chunked body). Neither an error of the proxy nor of
    /// the upstream.
    BadRequest = 6,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::ClientClosed,
        Outcome::Timeout,
        Outcome::UpstreamError,
        Outcome::Shutdown,
        Outcome::NoRoute,
        Outcome::BadRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientClosed => "client_closed",
            Outcome::Timeout => "timeout",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Shutdown => "shutdown",
            Outcome::NoRoute => "no_route",
            Outcome::BadRequest => "bad_request",
        }
    }
}

/// Who stopped the request: never confuse a client's departure with an upstream failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelledBy {
    Client = 0,
    Timeout = 1,
    Shutdown = 2,
}

impl CancelledBy {
    pub const ALL: [CancelledBy; 3] = [
        CancelledBy::Client,
        CancelledBy::Timeout,
        CancelledBy::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CancelledBy::Client => "client",
            CancelledBy::Timeout => "timeout",
            CancelledBy::Shutdown => "shutdown",
        }
    }
}

/// Where the upstream call was when it was aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued = 0,
    Connecting = 1,
    AwaitingHeaders = 2,
    StreamingBody = 3,
    Uploading = 4,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Queued,
        Phase::Connecting,
        Phase::AwaitingHeaders,
        Phase::StreamingBody,
        Phase::Uploading,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Connecting => "connecting",
            Phase::AwaitingHeaders => "awaiting_headers",
            Phase::StreamingBody => "streaming_body",
            Phase::Uploading => "uploading",
        }
    }
}

/// What the route contributes to the record: its name, handles and timeout.
#[derive(Clone)]
pub struct RouteInfo {
    pub name: Arc<str>,
    pub metrics: Arc<RouteMetrics>,
    pub timeout: Option<Duration>,
    pub protected: bool,
}

/// Per downstream connection: whether and when its client was seen leaving (set by the
/// hang-up watch, read by the guards of its requests), how busy it is (for the keep-alive
/// idle timeout), and whether a request head is on its way (for `header_read_timeout`).
pub struct ClientConn {
    gone_at: std::sync::OnceLock<Instant>,
    /// Request heads read on this connection so far.
    requests: AtomicU64,
    /// Bytes arrived while no request was in flight, and no head was complete since: the
    /// start of a request head, which `header_read_timeout` bounds.
    head_pending: AtomicBool,
    /// HTTP/2: bytes between requests are frames of the connection (pings, window
    /// updates), not the start of a head.
    h2: AtomicBool,
    /// Requests of this connection whose guard is alive (until their last byte).
    active: AtomicUsize,
    opened: Instant,
    /// Nanoseconds after `opened` when the last request ended.
    last_ended: AtomicU64,
    /// HTTP/1.1: when the response now streaming must be over, in nanoseconds after
    /// `opened`, plus one (0: none). A client that stops reading blocks hyper's writes, and
    /// hyper then stops polling the response body, whose own timer can only wake the
    /// connection: the connection's task looks here and ends the exchange.
    response_deadline: AtomicU64,
    /// The number (from 1, see `requests`) of the request now or last on this HTTP/1
    /// connection if its body was not yet read to its end, else 0: see
    /// [`Self::body_left`]. A number, not a flag: an upload can end after its response,
    /// when the next request already arrived, and must not clear that one's.
    body_left: AtomicU64,
    /// Closed while the client's socket is full (see `write_gate.rs`).
    writes: WriteGate,
}

impl Default for ClientConn {
    fn default() -> ClientConn {
        ClientConn {
            gone_at: std::sync::OnceLock::new(),
            requests: AtomicU64::new(0),
            head_pending: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            opened: Instant::now(),
            last_ended: AtomicU64::new(0),
            response_deadline: AtomicU64::new(0),
            body_left: AtomicU64::new(0),
            writes: WriteGate::default(),
        }
    }
}

impl ClientConn {
    /// A request head was read in full; `has_body`: a body follows it. Returns the
    /// request's number on this connection, from 1.
    pub fn mark_request(&self, version: http::Version, has_body: bool) -> u64 {
        if version == http::Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.head_pending.store(false, Ordering::Relaxed);
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.body_left
            .store(if has_body { n } else { 0 }, Ordering::Release);
        n
    }

    /// How far the response body now streaming is ahead of the client's socket (HTTP/1).
    pub fn writes(&self) -> &WriteGate {
        &self.writes
    }

    /// An HTTP/2 connection: its requests run in tasks of their own, one per stream.
    pub fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    /// The client sent bytes: with no request in flight, they start a request head.
    pub fn bytes_arrived(&self) {
        if self.active.load(Ordering::Relaxed) == 0 && !self.h2.load(Ordering::Relaxed) {
            self.head_pending.store(true, Ordering::Relaxed);
        }
    }

    /// How many request heads were read in full.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Part of a request head has arrived, and not the rest yet.
    pub fn head_pending(&self) -> bool {
        self.head_pending.load(Ordering::Relaxed)
    }

    pub fn mark_gone(&self) {
        let _ = self.gone_at.set(Instant::now());
    }

    pub fn gone_at(&self) -> Option<Instant> {
        self.gone_at.get().copied()
    }

    /// How long the connection has had no request in flight; `None` while it has one.
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        if self.active.load(Ordering::Acquire) != 0 {
            return None;
        }
        let ended = std::time::Duration::from_nanos(self.last_ended.load(Ordering::Relaxed));
        Some(self.opened.elapsed().saturating_sub(ended))
    }

    /// Also the end of any head: hyper may read the first body bytes (TLS hands them over
    /// one record per read) after announcing the request and before its handler runs,
    /// while nothing is in flight yet.
    pub(crate) fn request_started(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_pending.store(false, Ordering::Relaxed);
    }

    /// A request is in flight: hyper's HTTP/1.1 reads no head meanwhile.
    pub fn in_flight(&self) -> bool {
        self.active.load(Ordering::Acquire) != 0
    }

    /// The response now streaming must be over by `deadline` (`None`: it has none, or it
    /// is over). HTTP/2 streams share the connection, so they have their own ways.
    pub fn streaming_until(&self, deadline: Option<Instant>) {
        if self.h2.load(Ordering::Relaxed) {
            return;
        }
        let at = deadline.map_or(0, |d| {
            d.saturating_duration_since(self.opened).as_nanos() as u64 + 1
        });
        self.response_deadline.store(at, Ordering::Relaxed);
    }

    /// When the response streaming now must be over, if it must.
    pub fn response_due(&self) -> Option<Instant> {
        match self.response_deadline.load(Ordering::Relaxed) {
            0 => None,
            at => Some(self.opened + Duration::from_nanos(at - 1)),
        }
    }

    /// Request `n`'s body was read to its end (by the upload to the upstream, which may
    /// run on another thread).
    pub fn body_read(&self, n: u64) {
        let _ = self
            .body_left
            .compare_exchange(n, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// The last request's body was not read to its end: it was answered first (a 404 or
    /// 400 of cutoff's own, a 504 mid-upload, an upstream's early answer), or its client
    /// stalled or left. A connection closing now may have the rest of it arriving, and
    /// lingers (see `linger.rs`). Stale on a connection kept alive after hyper drained a
    /// small unread body, until the next request: a linger then only reads the client's
    /// FIN.
    pub fn body_left(&self) -> bool {
        self.body_left.load(Ordering::Acquire) != 0
    }

    /// `now`: the clock was just read by the guard; reading it again costs ~90 instructions.
    fn request_ended(&self, now: Instant) {
        let now = now.saturating_duration_since(self.opened).as_nanos() as u64;
        self.last_ended.fetch_max(now, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Decision {
    outcome: Outcome,
    status: u16,
    cancelled_by: Option<CancelledBy>,
    /// When the cause was seen; the start of cancellation propagation.
    cause_at: Instant,
}

/// One request in flight. See the module comment.
pub struct InFlight {
    route: Option<RouteInfo>,
    method: Method,
    /// The request's path, for the access log: a copy, not the `Uri` hyper parsed, whose
    /// bytes are a slice of the connection's 8 KiB read buffer. Held for the whole
    /// exchange, such a slice kept that buffer (the page the head was read into) alive,
    /// where hyper would otherwise have freed it for a fresh, untouched one.
    path: Box<str>,
    started: Instant,
    client: Arc<ClientConn>,
    lifecycle: Arc<Lifecycle>,

    phase: Phase,
    /// Set when the upstream call was dispatched (the request handed to a connection).
    dispatched: Option<Instant>,
    /// Set when the upstream's last response byte was read.
    upstream_done: Option<Instant>,
    /// The in-flight gauge was raised and must be lowered exactly once.
    counted_inflight: bool,
    /// Set when the proxy closed the upstream call itself (timeout, failure, shutdown).
    upstream_closed_at: Option<Instant>,
    /// Shared with the request's other parts: the upload's progress (to tell `uploading`
    /// from `awaiting_headers`) and the moment the request was dropped from outside.
    state: Option<Arc<RequestState>>,

    bytes_out: u64,
    discarded: u64,
    /// A `continue` route whose client left: the call goes on without it.
    client_left: Option<Instant>,
    /// The upstream answered 101: from then on this is a tunnel, whose length is the
    /// session's, not the upstream's work.
    tunnel: bool,
    reason: Option<String>,
    decision: Option<Decision>,
}

impl InFlight {
    pub fn new(
        route: Option<RouteInfo>,
        method: Method,
        uri: Uri,
        client: Arc<ClientConn>,
        lifecycle: Arc<Lifecycle>,
    ) -> InFlight {
        client.request_started();
        InFlight {
            route,
            method,
            path: uri.path().into(),
            started: Instant::now(),
            client,
            lifecycle,
            phase: Phase::Connecting,
            dispatched: None,
            upstream_done: None,
            counted_inflight: false,
            upstream_closed_at: None,
            state: None,
            bytes_out: 0,
            discarded: 0,
            client_left: None,
            tunnel: false,
            reason: None,
            decision: None,
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        if phase == Phase::Connecting
            && !self.counted_inflight
            && let Some(r) = &self.route
        {
            r.metrics.inflight.increment(1.0);
            self.counted_inflight = true;
        }
    }

    /// The request was handed to an upstream connection: upstream time starts now.
    pub fn dispatched(&mut self, phase: Phase) {
        self.dispatched = Some(Instant::now());
        self.set_phase(phase);
    }

    /// The upstream's response is complete (its last byte read).
    /// Returns the moment recorded (the first call's), for the caller's other records of
    /// the same moment: each clock read is a few dozen instructions per request.
    pub fn upstream_completed(&mut self) -> Instant {
        *self.upstream_done.get_or_insert_with(Instant::now)
    }

    /// The proxy closed the upstream call (the connection or stream is gone as of now).
    pub fn upstream_aborted(&mut self) {
        if self.upstream_closed_at.is_none() {
            self.upstream_closed_at = Some(Instant::now());
        }
    }

    pub fn watch(&mut self, state: Arc<RequestState>) {
        self.state = Some(state);
    }

    /// The client's upload has not been read to its end (it may still be sending).
    pub fn uploading(&self) -> bool {
        self.state.as_ref().is_some_and(|s| !s.is_done())
    }

    /// See [`RequestState::stamp_dropped`].
    /// The connection this request came on.
    pub fn client(&self) -> &Arc<ClientConn> {
        &self.client
    }

    pub fn stamp_dropped(&self) {
        if let Some(s) = &self.state {
            s.stamp_dropped();
        }
    }

    /// Whether the client's upload was read to its end (or there was none).
    pub fn upload_finished(&self) -> bool {
        self.state.as_ref().is_none_or(|s| s.is_done())
    }

    /// The phase as of now: an upload that finished means the call awaits headers.
    fn current_phase(&self) -> Phase {
        match (&self.state, self.phase) {
            (Some(u), Phase::Uploading) if u.is_done() => Phase::AwaitingHeaders,
            (_, p) => p,
        }
    }

    pub fn add_bytes_out(&mut self, n: u64) {
        self.bytes_out += n;
    }

    pub fn add_discarded(&mut self, n: u64) {
        self.discarded += n;
    }

    /// On a `continue` route: the client left (at `at`) but the call goes on.
    pub fn client_left(&mut self, at: Instant) {
        if self.client_left.is_none() {
            self.client_left = Some(at);
        }
    }

    /// The exchange became a tunnel (the upstream's 101 is passed on): a tunnel cut
    /// short still counts as a cancelled call and its propagation is measured, but its
    /// time is neither wasted nor a completion time for the saved-work estimator.
    pub fn tunnel_opened(&mut self) {
        self.tunnel = true;
    }

    pub fn has_client_left(&self) -> bool {
        self.client_left.is_some()
    }

    /// A reason for the access log (why an upstream failed, why a call was cancelled).
    pub fn reason(&mut self, reason: impl Into<String>) {
        if self.reason.is_none() {
            self.reason = Some(reason.into());
        }
    }

    /// Decides the outcome unless a cause was already recorded: the first cause wins.
    pub fn decide(&mut self, outcome: Outcome, status: u16, cancelled_by: Option<CancelledBy>) {
        self.decide_at(outcome, status, cancelled_by, Instant::now());
    }

    /// As [`InFlight::decide`], for a cause seen at `cause_at` (a timer's firing).
    pub fn decide_at(
        &mut self,
        outcome: Outcome,
        status: u16,
        cancelled_by: Option<CancelledBy>,
        cause_at: Instant,
    ) {
        if self.decision.is_none() {
            self.decision = Some(Decision {
                outcome,
                status,
                cancelled_by,
                cause_at,
            });
        }
    }

    /// The guard's verdict for a request dropped from outside.
    fn undecided_cause(&self) -> Decision {
        if self.lifecycle.is_forced() {
            Decision {
                outcome: Outcome::Shutdown,
                status: 503,
                cancelled_by: Some(CancelledBy::Shutdown),
                cause_at: self.lifecycle.forced_at().unwrap_or_else(Instant::now),
            }
        } else {
            Decision {
                outcome: Outcome::ClientClosed,
                status: 499,
                cancelled_by: Some(CancelledBy::Client),
                // The earliest sign: the hang-up watch, else the moment the request was
                // dropped (stamped before its upstream call was closed).
                cause_at: self
                    .client_left
                    .or_else(|| self.client.gone_at())
                    .or_else(|| self.state.as_ref().and_then(|s| s.dropped_at()))
                    .unwrap_or_else(Instant::now),
            }
        }
    }

    /// Returns the moment it recorded as the end.
    fn record(&mut self) -> Instant {
        let now = Instant::now();
        let total = now.saturating_duration_since(self.started);
        let d = match self.decision.take() {
            Some(d) => d,
            None => self.undecided_cause(),
        };
        // Protected means: a `continue` call that completed its upstream work after its client
        // left. A protected call stopped by a half upload, the timer or a shutdown is not.
        let protected = self.route.as_ref().is_some_and(|r| r.protected)
            && self.client_left.is_some()
            && self.upstream_done.is_some();
        let upstream_ms = self.dispatched.map(|t| {
            self.upstream_done
                .unwrap_or(now)
                .saturating_duration_since(t)
                .as_secs_f64()
                * 1e3
        });
        if let Some(r) = &self.route {
            let m = &r.metrics;
            let aborted = self.counted_inflight && self.upstream_done.is_none();
            if let (true, Some(by)) = (aborted, d.cancelled_by) {
                m.cancelled(by, self.current_phase());
                if !self.tunnel {
                    // The call never completed: everything it cost was wasted, and what
                    // it would typically have gone on to cost was saved. A tunnel has
                    // no result to waste and no typical length to save.
                    let spent = self
                        .dispatched
                        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                    m.wasted.add(spent.as_secs_f64());
                    m.saved
                        .add(m.estimator.saved(spent, r.timeout).as_secs_f64());
                }
                let closed = self.upstream_closed_at.unwrap_or(now);
                m.propagation
                    .record(closed.saturating_duration_since(d.cause_at).as_secs_f64());
            } else if self.tunnel {
                // A tunnel's length is its session's: kept out of the upstream durations
                // so that it cannot inflate the route's typical completion time.
            } else if let (Some(t0), Some(t1)) = (self.dispatched, self.upstream_done) {
                let took = t1.saturating_duration_since(t0);
                m.upstream_duration.record(took.as_secs_f64());
                m.estimator.record(took);
                if d.outcome != Outcome::Ok {
                    // Completed for nobody: a protected call whose client left, or a race
                    // where the client left just as the upstream finished.
                    m.wasted.add(took.as_secs_f64());
                }
                if protected {
                    m.protected_completed.increment(1);
                }
            }
            if let (Phase::Queued, Some(by)) = (self.phase, d.cancelled_by) {
                // Never dispatched: it cost the upstream nothing, and saved all of it.
                m.cancelled(by, Phase::Queued);
                m.saved
                    .add(m.estimator.saved(Duration::ZERO, r.timeout).as_secs_f64());
            }
            if self.counted_inflight {
                m.inflight.decrement(1.0);
            }
            if self.discarded > 0 {
                m.discarded_bytes.increment(self.discarded);
            }
            m.request(d.outcome, total);
        } else {
            RouteMetrics::unrouted().request(d.outcome, total);
        }
        access_log::write(&AccessRecord {
            route: self.route.as_ref().map_or("", |r| &r.name),
            method: self.method.as_str(),
            path: &self.path,
            status: d.status,
            outcome: d.outcome,
            duration_ms: total.as_secs_f64() * 1e3,
            upstream_ms,
            bytes_out: self.bytes_out,
            cancelled_by: d.cancelled_by,
            protected,
            phase: (d.cancelled_by.is_some() && self.upstream_done.is_none())
                .then(|| self.current_phase()),
            reason: self.reason.as_deref(),
        });
        now
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.record();
        self.client.request_ended(now);
    }
}

pin_project_lite::pin_project! {
    /// Wraps a request's handler future: if hyper drops it before it completes, the drop
    /// time is stamped first, then the handler (and the upstream call it owns) is dropped.
    /// That stamp is where `cutoff_cancel_propagation_seconds` starts for departures hyper
    /// noticed itself (HTTP/1.1 EOF, an HTTP/2 stream reset).
    pub struct Stamped<F> {
        #[pin]
        inner: F,
        state: Arc<RequestState>,
        done: bool,
    }

    impl<F> PinnedDrop for Stamped<F> {
        fn drop(this: Pin<&mut Self>) {
            if !this.done {
                this.state.stamp_dropped();
            }
        }
    }
}

impl<F> Stamped<F> {
    pub fn new(inner: F, state: Arc<RequestState>) -> Stamped<F> {
        Stamped {
            inner,
            state,
            done: false,
        }
    }
}

impl<F: std::future::Future> std::future::Future for Stamped<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        *this.done = true;
        std::task::Poll::Ready(out)
    }
}
