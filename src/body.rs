//! Body wrappers: where body-level limits and the response half of a request's story live.
//!
//! [`RequestBody`] carries the client's upload to the upstream. It records whether the
//! upload completed or was cut short by the client (so that a client's departure is never
//! mistaken for an upstream failure, and a half request is never completed upstream), and
//! it enforces the body read timeout, counted only while the upstream is actually waiting
//! for the client's bytes.
//!
//! [`UpstreamBody`] streams the upstream's response to the client. It owns the upstream
//! connection (which it keeps driving), the whole-exchange deadline, the idle timer and the
//! request's [`InFlight`] guard, declared in that order so that dropping the body closes
//! the upstream before the guard records the outcome. Chunks are passed through as the
//! upstream produced them: no copy, no buffering beyond hyper's own read buffer, and
//! back-pressure is hyper polling us only when the client's socket can take more.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::deadline::Deadline;
use crate::outcome::{CancelledBy, ClientConn, InFlight, Outcome};
use crate::upstream::Conn;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A request's whole-exchange deadline, armed once and handed from the handler to the
/// response body, so that one timer covers the exchange from start to last byte.
pub type DeadlineTimer = Option<Deadline>;

pub fn deadline_timer(deadline: Option<Instant>) -> DeadlineTimer {
    deadline.map(Deadline::new)
}

/// Resolves with the moment the deadline fired; never, without a deadline.
pub async fn fired(timer: &mut DeadlineTimer) -> Instant {
    match timer.as_mut() {
        Some(t) => {
            std::future::poll_fn(|cx| t.poll_fired(cx)).await;
            Instant::now()
        }
        None => std::future::pending().await,
    }
}

/// The client went away (or stopped sending) in the middle of its request body.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("the client left while sending the request body")]
    Gone,
    #[error("the client sent no request body bytes for {0:?}")]
    TooSlow(Duration),
    #[error("the client sent a malformed request body")]
    Malformed,
}

/// A timer of the route fired while the response streamed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StreamTimeout(pub &'static str);

/// What one request's parts share: the upload's progress (written by the body inside the
/// upstream connection, read by the guard and the handler), and the moment the request was
/// dropped from outside, stamped before the drop closes its upstream call, so that
/// cancellation propagation can be measured from it.
#[derive(Default)]
pub struct RequestState {
    upload: AtomicU8,
    dropped_at: std::sync::OnceLock<Instant>,
    /// The request's number on its connection (see [`ClientConn::mark_request`]).
    number: u64,
}

const UPLOADING: u8 = 0;
const DONE: u8 = 1;
const CLIENT_GONE: u8 = 2;
const CLIENT_SLOW: u8 = 3;
const CLIENT_MALFORMED: u8 = 4;

impl RequestState {
    /// The state of request `number` of its connection.
    pub fn new(number: u64) -> RequestState {
        RequestState {
            number,
            ..RequestState::default()
        }
    }

    pub fn is_done(&self) -> bool {
        self.upload.load(Ordering::Acquire) == DONE
    }

    /// The request is being dropped from outside (its client left, or the shutdown forced
    /// the end): called before anything it owns is dropped.
    pub fn stamp_dropped(&self) {
        let _ = self.dropped_at.set(Instant::now());
    }

    pub fn dropped_at(&self) -> Option<Instant> {
        self.dropped_at.get().copied()
    }

    /// Why the client's upload failed, if it did.
    pub fn client_failure(&self) -> Option<ClientBodyError> {
        match self.upload.load(Ordering::Acquire) {
            CLIENT_GONE => Some(ClientBodyError::Gone),
            CLIENT_SLOW => Some(ClientBodyError::TooSlow(Duration::ZERO)),
            CLIENT_MALFORMED => Some(ClientBodyError::Malformed),
            _ => None,
        }
    }

    fn set(&self, state: u8) {
        let _ = self
            .upload
            .compare_exchange(UPLOADING, state, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The client's request body on its way upstream.
///
/// One pointer wide, and no allocation at all for a request without a body: the request
/// travels to the upstream connection through hyper's dispatch channel, whose first block
/// holds 32 requests and is allocated with the connection. With the upload's state inline
/// (104 bytes) that block was 11 040 bytes, a 12 KiB allocation for every upstream
/// connection; boxed, it is 7 968 bytes and fits 8 KiB.
pub struct RequestBody(Option<Box<Upload>>);

struct Upload {
    inner: Option<Incoming>,
    upload: Arc<RequestState>,
    /// Told when the body was read to its end (see [`ClientConn::body_left`]).
    client: Arc<ClientConn>,
    /// Declared `Content-Length`, to catch an upload that ended short.
    expected: Option<u64>,
    received: u64,
    read_timeout: Duration,
    /// Armed only while we wait for the client with the upstream wanting bytes.
    timer: Option<Pin<Box<Sleep>>>,
    timer_armed: bool,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        upload: Arc<RequestState>,
        client: &Arc<ClientConn>,
        read_timeout: Duration,
    ) -> RequestBody {
        if inner.is_end_stream() {
            upload.set(DONE);
            return RequestBody(None);
        }
        RequestBody(Some(Box::new(Upload {
            expected: inner.size_hint().exact(),
            inner: Some(inner),
            upload,
            client: client.clone(),
            received: 0,
            read_timeout,
            timer: None,
            timer_armed: false,
        })))
    }

    /// An empty body: for sending a bodiless request again.
    pub fn finished(&self) -> RequestBody {
        RequestBody(None)
    }
}

impl Upload {
    fn done(&mut self) {
        self.upload.set(DONE);
        self.client.body_read(self.upload.number);
        self.inner = None;
    }

    fn fail(&mut self, state: u8) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.upload.set(state);
        self.inner = None;
        Poll::Ready(Some(Err(match state {
            CLIENT_SLOW => Box::new(ClientBodyError::TooSlow(self.read_timeout)),
            CLIENT_MALFORMED => Box::new(ClientBodyError::Malformed),
            _ => Box::new(ClientBodyError::Gone),
        })))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(this) = self.get_mut().0.as_deref_mut() else {
            return Poll::Ready(None);
        };
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                this.timer_armed = false;
                // A body of known length ends with its last byte: hyper's client sees
                // that (`is_end_stream`) and polls no further, so the end is noted here.
                if inner.is_end_stream() {
                    this.done();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // A body hyper could not decode (a bad chunk size) is the client's malformed
            // request; every other body error is its connection going away.
            Poll::Ready(Some(Err(e))) if malformed(&e) => this.fail(CLIENT_MALFORMED),
            Poll::Ready(Some(Err(_))) => this.fail(CLIENT_GONE),
            Poll::Ready(None) => {
                // hyper reports a connection dropped mid-body as an error; the length
                // check is a second line of defence that costs one comparison.
                if this.expected.is_some_and(|n| this.received < n) {
                    return this.fail(CLIENT_GONE);
                }
                this.done();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.read_timeout;
                if this.read_timeout == Duration::MAX {
                    return Poll::Pending;
                }
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.timer_armed {
                    timer.as_mut().reset(deadline);
                    this.timer_armed = true;
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(CLIENT_SLOW),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|u| u.inner.as_ref().is_none_or(|b| b.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        match self.0.as_ref().and_then(|u| u.inner.as_ref()) {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

/// hyper reports a body it cannot decode as a body error caused by an `InvalidInput` or
/// `InvalidData` I/O error; a vanished client is an incomplete message or a reset.
fn malformed(e: &hyper::Error) -> bool {
    if e.is_parse() {
        return true;
    }
    causes(e)
        .find_map(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            )
        })
}

/// The chain of causes below an error (its sources, nearest first).
pub fn causes<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(e.source(), |&s| s.source())
}

/// The upstream's response body on its way to the client. See the module comment.
pub struct UpstreamBody {
    conn: Option<Conn>,
    body: Option<Incoming>,
    deadline: DeadlineTimer,
    idle: Option<Idle>,
    guard: Box<InFlight>,
    status: u16,
    finished: bool,
    /// Held to the client's pace by its connection's write gate: HTTP/1 clients (see
    /// `write_gate.rs`). Known from the response's start.
    gated: bool,
}

/// `idle_timeout`: the upstream's silence, counted from when the client asks for more,
/// so that the time hyper spends writing the last chunk to a slow reader is never held
/// against the upstream.
struct Idle {
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Armed for the current wait; false once a frame went out.
    waiting: bool,
}

impl UpstreamBody {
    pub fn new(
        conn: Conn,
        body: Incoming,
        deadline: DeadlineTimer,
        idle_timeout: Option<Duration>,
        guard: Box<InFlight>,
        status: u16,
    ) -> UpstreamBody {
        // Watched by the connection too: a client that stops reading stops hyper from
        // polling this body, and with it this body's own check of the deadline.
        let client = guard.client();
        client.streaming_until(deadline.as_ref().map(Deadline::at));
        let gated = !client.is_h2();
        if gated {
            client.writes().restart();
        }
        let idle = idle_timeout.map(|limit| Idle {
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            waiting: true,
        });
        UpstreamBody {
            conn: Some(conn),
            body: Some(body),
            deadline,
            idle,
            guard,
            status,
            finished: false,
            gated,
        }
    }

    /// A timer fired: the response is cut short and the upstream call closed now.
    fn abort_timeout(
        &mut self,
        what: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.guard.decide_at(
            Outcome::Timeout,
            504,
            Some(CancelledBy::Timeout),
            Instant::now(),
        );
        self.close_upstream();
        self.guard.reason(what);
        self.finish();
        Poll::Ready(Some(Err(Box::new(StreamTimeout(what)))))
    }

    /// Settled, one way or another: the connection stops watching this response's
    /// deadline.
    fn finish(&mut self) {
        self.finished = true;
        self.guard.client().streaming_until(None);
    }

    fn close_upstream(&mut self) {
        self.conn = None;
        self.body = None;
        self.guard.upstream_aborted();
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(d) = this.deadline.as_mut()
            && d.poll_fired(cx).is_ready()
        {
            let what = if this.guard.client().writes().is_behind() {
                "route timeout fired while the client was not reading"
            } else {
                "route timeout fired while streaming the response"
            };
            return this.abort_timeout(what);
        }
        let behind = this.gated && this.guard.client().writes().poll_room(cx).is_pending();
        if let Some(conn) = this.conn.as_mut()
            && (!behind || this.guard.uploading())
        {
            // An error here surfaces through the body below, with more context. Driven
            // while the client is behind only as long as its upload goes on: the rest of
            // it must still go out (an upstream that answers as it reads, a client that
            // reads only once it has sent everything). Driven after that, hyper would
            // read one more chunk of the response for a client that is not reading
            // (measured: 8 KiB more per stalled download).
            let _ = conn.poll_drive(cx);
        }
        if behind {
            // The client's socket is behind: the next chunk waits in the upstream's socket
            // (see `write_gate.rs`). The upstream is not silent meanwhile, only unread:
            // its silence is counted afresh once the client takes writes again.
            if let Some(idle) = this.idle.as_mut() {
                idle.waiting = false;
            }
            return Poll::Pending;
        }
        if let Some(idle) = this.idle.as_mut()
            && !idle.waiting
        {
            idle.sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + idle.limit);
            idle.waiting = true;
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.guard.add_bytes_out(data.len() as u64);
                    if this.gated {
                        this.guard.client().writes().handed(data.len());
                    }
                }
                if let Some(idle) = this.idle.as_mut() {
                    idle.waiting = false;
                }
                // hyper stops polling once a body's declared length has been written, so
                // the end must be noticed with the last frame, not after it.
                if this.body.as_ref().is_some_and(|b| b.is_end_stream()) {
                    this.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard.decide(Outcome::UpstreamError, 502, None);
                this.guard
                    .reason(format!("upstream response body failed: {e}"));
                this.close_upstream();
                this.finish();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.complete();
                Poll::Ready(None)
            }
            // Checked only when nothing came: a frame that is ready goes out, however long
            // the client took to ask for it.
            Poll::Pending => {
                let idle_over = this
                    .idle
                    .as_mut()
                    .is_some_and(|idle| idle.sleep.as_mut().poll(cx).is_ready());
                if idle_over {
                    return this.abort_timeout("idle_timeout fired between response chunks");
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

/// Dropped before its end (the client left, or the shutdown forced it): stamp the moment
/// first, then the fields drop in order, closing the upstream before the guard records.
impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Dropped past its deadline: the connection's task ended a response whose client
        // stopped reading (see `ClientConn::streaming_until`). That is the timer's doing,
        // not the client's leaving.
        let now = Instant::now();
        if self.deadline.as_ref().is_some_and(|d| d.at() <= now) {
            let _ = self.abort_timeout("route timeout fired while the client was not reading");
        } else {
            self.guard.stamp_dropped();
            self.guard.client().streaming_until(None);
        }
    }
}

impl UpstreamBody {
    /// The upstream's last byte arrived and was handed on: the exchange is a success,
    /// and a clean connection goes back to the pool. Also called at once for a response
    /// that has no body at all (HEAD, 204, 304, `Content-Length: 0`), which hyper may
    /// never poll.
    pub fn complete(&mut self) {
        let now = self.guard.upstream_completed();
        if let Some(conn) = self.conn.as_mut() {
            conn.exchanged(now, self.guard.upload_finished());
        }
        self.conn = None;
        self.body = None;
        self.guard.decide_at(Outcome::Ok, self.status, None, now);
        self.finish();
    }
}

/// Every response the proxy sends: the upstream's, or one it made itself.
pub enum ProxyBody {
    Local(Option<Bytes>),
    /// Boxed: it holds the upstream connection and the guard, about a kilobyte, and
    /// responses move by value through hyper.
    Upstream(Box<UpstreamBody>),
    Protected(crate::protected::ProtectedBody),
}

impl ProxyBody {
    pub fn text(s: &'static str) -> ProxyBody {
        ProxyBody::Local(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(b) => Pin::new(b.as_mut()).poll_frame(cx),
            ProxyBody::Protected(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(b) => b.is_none(),
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Protected(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Protected(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RequestBody;

    /// Every upstream connection allocates hyper's dispatch block: 32 requests, each a
    /// `Request<RequestBody>` beside hyper's callback. Grown by a field, the body takes that
    /// block (and every held request's memory) up a size class.
    #[test]
    fn the_request_body_is_one_pointer_wide() {
        assert_eq!(
            std::mem::size_of::<RequestBody>(),
            std::mem::size_of::<usize>()
        );
    }
}
