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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{Notify, watch};

use super::UpstreamError;
use super::endpoint::{Endpoint, UpstreamIo};
use crate::body::RequestBody;

type Sender = SendRequest<RequestBody>;

const STREAM_WINDOW: u32 = 1 << 20;
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
/// (its `SETTINGS_MAX_CONCURRENT_STREAMS`, read from hyper's connection as it changes).
///
/// hyper waits for a free stream inside its connection task, where a call that is
/// cancelled meanwhile is still sent once a stream frees (and reset at once): upstream
/// work for nobody. So a call waits for a stream here, in its own future, and is handed to
/// hyper only when the upstream will open it at once; dropping it while it waits is the
/// end of it.
struct Streams {
    open: AtomicUsize,
    max: AtomicUsize,
    freed: Notify,
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
    /// Waits until the upstream allows one more stream on this connection.
    pub(super) async fn stream_slot(&self) -> StreamSlot {
        let s = &self.streams;
        loop {
            let freed = s.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the check, so that a slot freed in between is not missed.
            freed.as_mut().enable();
            let mut open = s.open.load(Ordering::Acquire);
            while open < s.max.load(Ordering::Acquire) {
                match s.open.compare_exchange_weak(
                    open,
                    open + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return StreamSlot(s.clone()),
                    Err(now) => open = now,
                }
            }
            freed.await;
        }
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
            State::Ready(s) if !s.sender.is_closed() => Some(s),
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
                State::Connecting(rx) => rx.clone(),
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
        let sender = handshake(io)
            .await
            .map_err(|(status, reason)| UpstreamError::H2 { status, reason })?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.ready().is_none() {
            *state = State::Ready(sender.clone());
        }
        let _ = endpoint;
        Ok(sender)
    }

    /// Drops the cached connection, which refused a new stream: it is going away (the
    /// upstream sent GOAWAY), though it lives on until its last stream ends and so still
    /// looks open. The next call opens a new one. A connection opened meanwhile by another
    /// call is kept: `refused` is a stream the old one handed back.
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
            endpoint.checkin(super::endpoint::Idle::Io(io));
            Err((NOT_H2, "the upstream chose HTTP/1.1".to_string()))
        }
        Ok(io) => handshake(io).await,
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

async fn handshake(io: UpstreamIo) -> Result<H2Sender, (u16, String)> {
    // Flow control: data read from the upstream and not yet taken by its client keeps its
    // share of the connection's window, which every call to the endpoint shares. With
    // hyper's defaults (2 MiB per stream, 5 MiB per connection) three clients that stop
    // reading stalled every other call. So the connection's window is as large as HTTP/2
    // allows, and each stream's is what bounds what a slow reader can hold (1 MiB).
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, RequestBody>(TokioIo::new(io))
        .await
        .map_err(|e| (502, format!("HTTP/2 handshake failed: {e}")))?;
    let streams = Arc::new(Streams {
        open: AtomicUsize::new(0),
        max: AtomicUsize::new(conn.current_max_send_streams()),
        freed: Notify::new(),
    });
    let limits = streams.clone();
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        let ended = std::future::poll_fn(|cx| {
            let r = conn.as_mut().poll(cx);
            // The upstream's SETTINGS may raise or lower its limit at any time.
            let max = conn.current_max_send_streams();
            if limits.max.swap(max, Ordering::AcqRel) < max {
                limits.freed.notify_waiters();
            }
            r
        })
        .await;
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(H2Sender {
        sender,
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        streams,
    })
}
