//! The shared HTTP/2 connection of an endpoint.
//!
//! HTTP/2 multiplexes: one connection carries every call to the endpoint, and cancelling a
//! call resets its stream (RST_STREAM with CANCEL, sent by hyper when the response future
//! or body is dropped) while the connection lives on. Cancellation must never burn the
//! connection, and must never fail the other calls.
//!
//! The connection is set up by a task of its own, never inside a request's future: the
//! first request to find no connection starts the task, and every request (that one
//! included) waits on a `watch` channel for its result. A request that is cancelled while
//! waiting only stops waiting; the set-up goes on for the others (a known pitfall when
//! set-up runs inside the first request's future).
//!
//! Two things hyper's client does not tell in time are read from the upstream's frames
//! as they arrive (`frames.rs`): its stream limit, which a new connection learns from
//! the upstream's first SETTINGS before any call is let through (calls beyond the limit
//! would be refused, 502s), and its GOAWAY. An upstream that restarts sends GOAWAY and
//! finishes its open streams on the old connection, which hyper reports only when the
//! connection ends, minutes away if its streams are long; from the GOAWAY on, calls go to
//! a new connection, those already waiting for a stream on the old one included.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};

use super::UpstreamError;
use super::endpoint::{Endpoint, UpstreamIo};
use super::frames::FrameWatch;
use crate::body::RequestBody;

type Sender = SendRequest<RequestBody>;

/// What set-up produced: a sender, or (status, reason) of its failure.
type SetUp = Option<Result<H2Sender, (u16, String)>>;

/// A sender on one of the endpoint's connections, with that connection's number: clones
/// of a `SendRequest` cannot tell whether they share a connection, and [`H2Pool::forget`]
/// must drop only the connection that refused.
#[derive(Clone)]
pub struct H2Sender {
    pub sender: Sender,
    id: u64,
    streams: Arc<Streams>,
}

/// The streams of one connection: how many are open, and how many the upstream allows
/// (its `SETTINGS_MAX_CONCURRENT_STREAMS`, read from its frames as it changes).
///
/// hyper waits for a free stream inside its connection task, where a call that is
/// cancelled meanwhile is still sent once a stream frees (and reset at once): upstream
/// work for nobody. So a call waits for a stream here, in its own future, and is handed to
/// hyper only when the upstream will open it at once; dropping it while it waits is the
/// end of it.
struct Streams {
    open: AtomicUsize,
    max: AtomicUsize,
    /// The upstream sent GOAWAY, or the connection ended: it opens no new stream.
    going_away: AtomicBool,
    /// The upstream's first SETTINGS frame was read.
    settled: AtomicBool,
    /// `settled` or `going_away` became true.
    news: Notify,
    /// A stream freed, the limit rose, or the connection is going away.
    freed: Notify,
}

impl Streams {
    fn go_away(&self) {
        if !self.going_away.swap(true, Ordering::AcqRel) {
            self.freed.notify_waiters();
            self.news.notify_waiters();
        }
    }

    fn settle(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.news.notify_waiters();
        }
    }

    /// Until the upstream's first SETTINGS are read; false if the connection went away
    /// first.
    async fn settled(&self) -> bool {
        loop {
            let news = self.news.notified();
            let mut news = std::pin::pin!(news);
            news.as_mut().enable();
            if self.settled.load(Ordering::Acquire) {
                return true;
            }
            if self.going_away() {
                return false;
            }
            news.await;
        }
    }

    /// The upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`, which it may raise or lower at
    /// any time.
    fn set_max(&self, max: usize) {
        if self.max.swap(max, Ordering::AcqRel) < max {
            self.freed.notify_waiters();
        }
    }

    fn going_away(&self) -> bool {
        self.going_away.load(Ordering::Acquire)
    }
}

/// One open stream of a connection, freed on drop (the response read to its end, or the
/// stream reset).
pub struct StreamSlot(Arc<Streams>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

impl H2Sender {
    /// This connection takes no new stream: hyper handed a call back unsent. Its waiters,
    /// and the next [`live_stream`] on it, move to a new connection.
    pub(super) fn going_away(&self) {
        self.streams.go_away();
    }

    /// Waits until the upstream allows one more stream on this connection; `None` once
    /// the connection is going away, whose streams will never free for a new call.
    pub(super) async fn stream_slot(&self) -> Option<StreamSlot> {
        let s = &self.streams;
        let mut first = true;
        loop {
            let freed = s.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the checks, so that a slot freed (or a GOAWAY read) in
            // between is not missed.
            freed.as_mut().enable();
            if s.going_away() {
                return None;
            }
            let mut open = s.open.load(Ordering::Acquire);
            while open < s.max.load(Ordering::Acquire) {
                match s.open.compare_exchange_weak(
                    open,
                    open + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Some(StreamSlot(s.clone())),
                    Err(now) => open = now,
                }
            }
            if std::mem::take(&mut first) {
                tracing::debug!(open, "waiting for a stream of the HTTP/2 connection");
            }
            freed.await;
        }
    }
}

/// `Streams::max` until the upstream's SETTINGS set a limit: none. HTTP/2 starts
/// unlimited, and h2 goes by the same rule once it has applied SETTINGS that name no
/// limit. No call sees the connection before its first SETTINGS are read.
const UNLIMITED: usize = usize::MAX;

/// How many connections in a row one call may find going away before it gets a stream:
/// an upstream that answers every new connection with GOAWAY gets a 502, not a loop.
const GOING_AWAY_TRIES: usize = 3;

/// A stream for one call on a connection that is not going away: `sender`'s, or that of
/// a new connection of the endpoint's once `sender`'s has received GOAWAY.
pub(super) async fn live_stream(
    endpoint: &Arc<Endpoint>,
    mut sender: H2Sender,
) -> Result<(H2Sender, StreamSlot), UpstreamError> {
    for _ in 0..GOING_AWAY_TRIES {
        if let Some(slot) = sender.stream_slot().await {
            return Ok((sender, slot));
        }
        endpoint.h2.forget(&sender);
        sender = successor(endpoint).await?;
    }
    Err(UpstreamError::H2 {
        status: 502,
        reason: format!(
            "{GOING_AWAY_TRIES} HTTP/2 connections in a row went away (GOAWAY) before opening a stream"
        ),
    })
}

/// A sender on a new connection of the endpoint, for a call whose connection went away.
/// The call is already made out for HTTP/2: if the new connection chose HTTP/1.1 (ALPN
/// `auto`), the call fails with a 502 rather than a status nobody can read.
async fn successor(endpoint: &Arc<Endpoint>) -> Result<H2Sender, UpstreamError> {
    match Box::pin(endpoint.h2.sender(endpoint)).await {
        Err(UpstreamError::H2 {
            status: NOT_H2,
            reason,
        }) => Err(UpstreamError::H2 {
            status: 502,
            reason: format!(
                "the HTTP/2 connection went away, and the new one is not HTTP/2: {reason}"
            ),
        }),
        other => other,
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
pub struct H2Pool {
    state: Mutex<State>,
}

#[derive(Default)]
enum State {
    #[default]
    Empty,
    Connecting(watch::Receiver<SetUp>),
    Ready(H2Sender),
}

impl State {
    fn ready(&self) -> Option<&H2Sender> {
        match self {
            State::Ready(s) if !s.sender.is_closed() && !s.streams.going_away() => Some(s),
            _ => None,
        }
    }
}

impl H2Pool {
    /// A sender on the endpoint's connection, opening one if there is none.
    pub(super) async fn sender(&self, endpoint: &Arc<Endpoint>) -> Result<H2Sender, UpstreamError> {
        let mut rx = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = state.ready() {
                return Ok(s.clone());
            }
            match &*state {
                // A set-up task that ended without a word (it panicked, or the runtime
                // is going down) would otherwise leave every later call waiting on its
                // closed channel, and failing: one starts again instead.
                State::Connecting(rx) if rx.has_changed().is_ok() => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    *state = State::Connecting(rx.clone());
                    tokio::spawn(set_up(endpoint.clone(), tx));
                    rx
                }
            }
        };
        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| UpstreamError::H2 {
                status: 502,
                reason: "HTTP/2 connection set-up was abandoned".into(),
            })?
            .clone();
        match result {
            Some(Ok(s)) => Ok(s),
            Some(Err((status, reason))) => Err(UpstreamError::H2 { status, reason }),
            None => unreachable!("wait_for returned a value that fails its predicate"),
        }
    }

    /// Hands an already connected stream that negotiated h2 to the pool (ALPN `auto`).
    pub(super) async fn adopt(
        &self,
        endpoint: &Arc<Endpoint>,
        io: UpstreamIo,
    ) -> Result<H2Sender, UpstreamError> {
        let sender = handshake(io, endpoint.connect_timeout, endpoint.h2_stream_window)
            .await
            .map_err(|(status, reason)| UpstreamError::H2 { status, reason })
            // No set-up task counts this one against the endpoint (see `set_up`).
            .inspect_err(|e| endpoint.failed(e))?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.ready().is_none() {
            *state = State::Ready(sender.clone());
        }
        Ok(sender)
    }

    /// Drops the cached connection, which is going away (the upstream sent GOAWAY)
    /// though it lives on until its last stream ends and so still looks open to hyper.
    /// The next call opens a new one. A connection opened meanwhile by another call is
    /// kept: `refused` is the old one.
    pub(super) fn forget(&self, refused: &H2Sender) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let State::Ready(s) = &*state
            && s.id == refused.id
        {
            *state = State::Empty;
        }
    }

    fn settle(&self, result: &Result<H2Sender, (u16, String)>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = match result {
            Ok(s) => State::Ready(s.clone()),
            Err(_) => State::Empty,
        };
    }
}

/// Status of a set-up whose TLS handshake chose HTTP/1.1 (`auto`): not a failure; the
/// connection went to the HTTP/1.1 idle list and the waiters use HTTP/1.1.
pub(super) const NOT_H2: u16 = 0;

async fn set_up(endpoint: Arc<Endpoint>, tx: watch::Sender<SetUp>) {
    let result = match endpoint.connect().await {
        Ok(io) if !io.alpn_h2() && endpoint.negotiates() => {
            endpoint.checkin(super::endpoint::Idle::Io(io), Instant::now());
            Err((NOT_H2, "the upstream chose HTTP/1.1".to_string()))
        }
        Ok(io) => handshake(io, endpoint.connect_timeout, endpoint.h2_stream_window).await,
        Err(e) => Err((e.status(), e.to_string())),
    };
    match &result {
        Ok(_) | Err((NOT_H2, _)) => endpoint.succeeded(),
        Err((_, reason)) => {
            endpoint.failed(&UpstreamError::H2 {
                status: 502,
                reason: reason.clone(),
            });
        }
    }
    endpoint.h2.settle(&result);
    let _ = tx.send(Some(result));
}

/// hyper's handshake, then the upstream's SETTINGS (within `settings_within`): a call let
/// through before they are read would go by hyper's default stream limit, and one beyond
/// the upstream's own is refused (`REFUSED_STREAM`, a 502 here).
async fn handshake(
    io: UpstreamIo,
    settings_within: Duration,
    stream_window: u32,
) -> Result<H2Sender, (u16, String)> {
    let streams = Arc::new(Streams {
        open: AtomicUsize::new(0),
        max: AtomicUsize::new(UNLIMITED),
        going_away: AtomicBool::new(false),
        settled: AtomicBool::new(false),
        news: Notify::new(),
        freed: Notify::new(),
    });
    let io = WatchedIo {
        io,
        frames: FrameWatch::default(),
        streams: streams.clone(),
    };
    // Flow control: data read from the upstream and not yet taken by its client keeps its
    // share of the connection's window, which every call to the endpoint shares. With
    // hyper's defaults (2 MiB per stream, 5 MiB per connection) three clients that stop
    // reading stalled every other call. So the connection's window is as large as HTTP/2
    // allows, and each stream's is what bounds what a slow reader can hold: the upstream's
    // `h2_stream_window` (1 MiB by default). A stream's throughput is at most its window
    // per round trip, so a distant upstream wants more, and a near one does with less.
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, RequestBody>(TokioIo::new(io))
        .await
        .map_err(|e| (502, format!("HTTP/2 handshake failed: {e}")))?;
    let settled = tokio::time::timeout(settings_within, streams.settled()).await;
    match settled {
        Ok(true) => {}
        Ok(false) => {
            return Err((
                502,
                "the upstream closed the HTTP/2 connection before its SETTINGS".into(),
            ));
        }
        Err(_) => {
            return Err((
                504,
                format!(
                    "the upstream sent no HTTP/2 SETTINGS within {settings_within:?} (connect_timeout)"
                ),
            ));
        }
    }
    // The connection's end reaches its waiters through `WatchedIo`'s drop.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(H2Sender {
        sender,
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        streams,
    })
}

/// An upstream connection as hyper's HTTP/2 client reads it, watched for the upstream's
/// stream limit and its GOAWAY, which it reports to the connection's [`Streams`], as it
/// does the connection's end when h2 drops it.
struct WatchedIo {
    io: UpstreamIo,
    frames: FrameWatch,
    streams: Arc<Streams>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = this.io.poll_read_uncapped(cx, buf);
        if !this.streams.going_away() {
            let seen = this.frames.read(&buf.filled()[before..]);
            if let Some(max) = seen.max_streams {
                this.streams.set_max(max as usize);
            }
            if seen.settings {
                this.streams.settle();
            }
            if seen.goaway {
                this.streams.go_away();
            }
        }
        r
    }
}

/// h2 drops the connection's I/O when its connection ends, whatever ended it: a protocol
/// error stops its reads before any end of stream shows, and a call waiting for the
/// first SETTINGS must not wait out `connect_timeout` for a connection already gone.
impl Drop for WatchedIo {
    fn drop(&mut self) {
        self.streams.go_away();
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
