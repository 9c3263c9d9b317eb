//! The accept loop and one task per client connection.
//!
//! hyper tells a handler that its client left only by dropping the handler's future, and
//! it notices a departure only when it happens to be reading the socket. It is not reading
//! when pipelined bytes sit in its buffer, nor while a large request body waits unread
//! behind a slow upstream. So every connection also has a [`HangupWatch`] (`hangup.rs`),
//! woken by the kernel's `EPOLLRDHUP`/`EPOLLHUP`, which arrive with the client's FIN or
//! RST whatever data is still queued in front of them. When it fires, the connection task
//! drops hyper's connection, which drops every request future and response body of that
//! connection, which closes their upstream calls.
//!
//! Consequence, documented in the README: a client that half-closes its side (sends FIN)
//! while waiting for a response counts as gone, as with hyper's default and nginx.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::body::RequestState;
use crate::hangup::HangupWatch;
use crate::headers::ClientInfo;
use crate::outcome::{ClientConn, Stamped};
use crate::proxy::{self, ConnContext, Shared};

/// Settings of the client-facing listener; changing them needs a restart.
#[derive(Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    /// One pool of connection slots for the whole process (every worker takes from it):
    /// `max_connections` bounds the process, not each worker.
    pub slots: Arc<Semaphore>,
}

/// How long connections may go on writing the 503s of a forced shutdown before they are
/// dropped.
const FORCED_WRITE_WINDOW: Duration = Duration::from_millis(250);

/// Accepts until the drain starts. Beyond `max_connections` it stops accepting, so that
/// new connections wait in the kernel's backlog instead of the process running out of
/// descriptors; they are served as soon as a slot frees.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, settings: ServerSettings) {
    let slots = settings.slots.clone();
    let lifecycle = shared.lifecycle.clone();
    loop {
        let permit = tokio::select! {
            biased;
            _ = lifecycle.draining() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = lifecycle.draining() => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin; the backlog holds the
                    // connection until we can take it.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if lifecycle.is_draining() {
            // Accepted in the same instant the drain began: refuse rather than serve.
            break;
        }
        let shared = shared.clone();
        let settings = settings.clone();
        shared.tasks.clone().spawn(async move {
            connection(stream, peer, shared, &settings).await;
            drop(permit);
        });
    }
    // Dropping the listener closes the socket: new connections are refused from now on.
    drop(listener);
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    settings: &ServerSettings,
) {
    let _ = stream.set_nodelay(true);
    let watch = HangupWatch::new(&stream);
    let acceptor = shared.tls.load_full();
    let client = Arc::new(ClientConn::default());
    let cx = Arc::new(ConnContext {
        shared: shared.clone(),
        client: client.clone(),
        info: ClientInfo::new(peer.ip(), acceptor.is_some()),
        forced: shared.lifecycle.force_token().child_token(),
    });
    match acceptor {
        None => serve_io(TokioIo::new(stream), cx, &watch, settings).await,
        // Boxed: a TLS session is kilobytes, which every plain connection's task would
        // otherwise reserve too (a future is as large as its largest branch).
        Some(acceptor) => Box::pin(serve_tls(stream, peer, acceptor, cx, &watch, settings)).await,
    }
}

async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Arc<tokio_rustls::TlsAcceptor>,
    cx: Arc<ConnContext>,
    watch: &Option<HangupWatch>,
    settings: &ServerSettings,
) {
    // The handshake is bounded like a request head: a client that connects and says
    // nothing must not hold a slot.
    let handshake = tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream));
    let tls = tokio::select! {
        r = handshake => r,
        _ = cx.shared.lifecycle.draining() => return,
    };
    match tls {
        Ok(Ok(tls)) => serve_io(TokioIo::new(tls), cx, watch, settings).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 (by ALPN or the h2c preface) on one
/// connection until it ends, its client hangs up, or the shutdown forces the end.
async fn serve_io<I>(
    io: I,
    cx: Arc<ConnContext>,
    watch: &Option<HangupWatch>,
    settings: &ServerSettings,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let client = cx.client.clone();
    let lifecycle = cx.shared.lifecycle.clone();
    let service = service_fn(move |req| {
        cx.client.mark_request();
        let state = Arc::new(RequestState::default());
        Stamped::new(proxy::handle(req, cx.clone(), state.clone()), state)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(256);
    let conn = builder.serve_connection_with_upgrades(io, service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    let mut forced_window = None;
    // hyper's header timer starts only once the protocol is known (hyper-util's auto
    // builder first reads the preface with no timer): a client that connects and says
    // nothing is cut off here.
    let first_request = tokio::time::sleep(settings.header_read_timeout);
    let first_request = std::pin::pin!(first_request);
    let mut spoke = false;
    // Created once, not per wake-up: each of these registers with a shared waiter list,
    // and re-registering on every poll of a busy connection costs a lock each time.
    let drain_started = std::pin::pin!(lifecycle.draining());
    let force_started = std::pin::pin!(lifecycle.forced());
    let hangup = std::pin::pin!(hung_up(watch));
    let idle_check = std::pin::pin!(tokio::time::sleep(settings.keepalive_timeout));
    let mut drain_started = Gated::new(drain_started);
    let mut force_started = Gated::new(force_started);
    let mut hangup = Gated::new(hangup);
    let mut first_request = Gated::new(first_request);
    let mut idle_check = Gated::new(idle_check);
    loop {
        tokio::select! {
            // The drain comes first: a request read after it began must see the
            // connection closing, not be served as if nothing happened.
            biased;
            _ = &mut drain_started, if !draining => {
                // Idle keep-alive connections close now; busy ones after their response.
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                break;
            }
            _ = &mut hangup => {
                client.mark_gone();
                break;
            }
            _ = &mut first_request, if !spoke => {
                if !client.has_spoken() {
                    tracing::debug!("client sent no request within header_read_timeout");
                    break;
                }
                spoke = true;
            }
            _ = &mut idle_check, if !draining => {
                match client.idle_for() {
                    Some(idle) if idle >= settings.keepalive_timeout => {
                        // hyper closes an idle keep-alive connection at once.
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    idle => {
                        let wait = settings.keepalive_timeout - idle.unwrap_or_default();
                        idle_check.rearm().as_mut().reset(tokio::time::Instant::now() + wait);
                    }
                }
            }
            _ = &mut force_started, if forced_window.is_none() => {
                forced_window = Some(Box::pin(tokio::time::sleep(FORCED_WRITE_WINDOW)));
            }
            _ = async { forced_window.as_mut().expect("guarded").await }, if forced_window.is_some() => {
                break;
            }
        }
    }
}

async fn hung_up(watch: &Option<HangupWatch>) {
    match watch {
        Some(w) => w.hung_up().await,
        None => std::future::pending().await,
    }
}

/// A future polled only after its own waker fired.
///
/// A connection task is polled on every socket event, several times per request, and
/// `select!` then polls each of its branches. All but hyper's connection wait for rare
/// events (a drain, a hang-up, a timer), yet polling them is not free: a cancellation
/// token's future takes a lock, a timer re-checks its entry. Gated, such a branch costs an
/// atomic swap per poll, and its future runs only when it asked to be woken.
struct Gated<F> {
    inner: F,
    gate: Arc<Gate>,
    waker: std::task::Waker,
}

struct Gate {
    woken: std::sync::atomic::AtomicBool,
    task: atomic_waker::AtomicWaker,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl<F: std::future::Future + Unpin> Gated<F> {
    fn new(inner: F) -> Gated<F> {
        let gate = Arc::new(Gate {
            // Polled once at first, so that the future can register what it waits for.
            woken: std::sync::atomic::AtomicBool::new(true),
            task: atomic_waker::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(gate.clone());
        Gated { inner, gate, waker }
    }

    /// The inner future, to be changed; it is polled again at the next poll (a timer that
    /// was reset must register its new deadline).
    fn rearm(&mut self) -> &mut F {
        self.gate
            .woken
            .store(true, std::sync::atomic::Ordering::Release);
        &mut self.inner
    }
}

impl<F: std::future::Future + Unpin> std::future::Future for Gated<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = &mut *self;
        this.gate.task.register(cx.waker());
        if !this
            .gate
            .woken
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return std::task::Poll::Pending;
        }
        let mut own = std::task::Context::from_waker(&this.waker);
        std::pin::Pin::new(&mut this.inner).poll(&mut own)
    }
}
