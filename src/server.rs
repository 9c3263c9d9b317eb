//! The accept loop and one task per client connection.
//!
//! hyper tells a handler that its client left only by dropping the handler's future, and
//! it notices a departure only when it happens to be reading the socket. It is not reading
//! when pipelined bytes sit in its buffer, nor while a large request body waits unread
//! behind a slow upstream. So every client socket is also [`Watched`] (`hangup.rs`): the
//! kernel's `EPOLLRDHUP`/`EPOLLHUP` arrive with the client's FIN or RST whatever data is
//! still queued in front of them, and the hang-up thread then drops hyper's connection
//! (kept in a [`Connection`] for that reason; if the connection's task is polling it at
//! that moment, the task drops it as its poll ends), which drops every request future
//! and response body of that connection, which closes their upstream calls.
//!
//! Consequence, documented in the README: a client that half-closes its side (sends FIN)
//! while waiting for a response counts as gone, as with hyper's default and nginx.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::body::RequestState;
use crate::deadline::{Deadline, LEAD};
use crate::hangup::{Hook, OnHangup, Watched};
use crate::head_timer::{HeadBytes, HeadTimeout, HeadTimer};
use crate::headers::ClientInfo;
use crate::outcome::{ClientConn, Stamped};
use crate::proxy::{self, ConnContext, Shared};
use crate::read_cap::{Cap, H2_PREFACE};
use crate::shutdown::{Seat, Stage};
use bytes::Bytes;

/// Settings of the client-facing listener; changing them needs a restart.
#[derive(Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    /// One pool of connection slots for the whole process (every worker takes from it):
    /// `max_connections` bounds the process, not each worker.
    pub slots: Arc<Semaphore>,
    /// hyper's connection builder, made once. It lives as long as the process (leaked once
    /// per [`crate::run`]): a connection borrows its builder, and a connection must be
    /// droppable from the hang-up thread, which needs it to borrow nothing shorter. It
    /// reads the first bytes itself to tell HTTP/1.1 from HTTP/2 (see [`Speaks`]).
    builder: &'static auto::Builder<TokioExecutor>,
    /// HTTP/1 alone, for a socket known to speak it and watched for hang-ups. hyper's own
    /// end-of-stream probe during a request stays on, though the hang-up watch does that
    /// job already: its read makes hyper take a fresh 8 KiB read buffer, which stays
    /// untouched while the request is held, and free the one the head was read into (a
    /// dirty page), now that nothing of the request keeps a slice of it (the guard copies
    /// the path). With the probe off (`half_close`), hyper's buffer kept that page for the
    /// whole exchange: about 4 KiB per held request (jemalloc, 2 000 held: 24.7 → 21.0
    /// KiB with the path copied). (Before the guard stopped
    /// pinning the head's bytes, the probe cost a second buffer instead: 34.6 → 31.4 KiB
    /// the other way.) A client's FIN ends its requests either way.
    /// Leaked like `builder`, so that cloning the settings for a connection stays cheap.
    http1: &'static hyper::server::conn::http1::Builder,
    /// HTTP/1 alone with hyper's probe, for a socket the hang-up set could not take.
    http1_probing: &'static hyper::server::conn::http1::Builder,
}

impl ServerSettings {
    pub fn new(
        header_read_timeout: Duration,
        keepalive_timeout: Duration,
        max_header_bytes: usize,
        max_connections: usize,
    ) -> ServerSettings {
        let max_buf = max_header_bytes.max(8192);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // Kept by the connection instead: see `head_timer.rs`.
            .header_read_timeout(None)
            .max_buf_size(max_buf)
            .keep_alive(true);
        let mut http1_probing = hyper::server::conn::http1::Builder::new();
        http1_probing
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(max_buf)
            .keep_alive(true);
        // The probe stays on here too: see `http1`.
        let http1 = http1_probing.clone();
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(max_header_bytes.min(u32::MAX as usize) as u32)
            .max_concurrent_streams(256)
            // What a stream may have queued for a client's socket, as the write gate
            // allows an HTTP/1 response (`write_gate.rs`). hyper's 400 KiB a stream let
            // a client that grants a large window and reads nothing pin 512 KiB per
            // stream, 128 MiB over one connection's 256 streams.
            .max_send_buf_size(crate::write_gate::AHEAD);
        ServerSettings {
            header_read_timeout,
            keepalive_timeout,
            slots: Arc::new(Semaphore::new(max_connections)),
            builder: Box::leak(Box::new(builder)),
            http1: Box::leak(Box::new(http1)),
            http1_probing: Box::leak(Box::new(http1_probing)),
        }
    }
}

/// The most rounds of one poll of hyper's connection (see `Connection::poll_rounds`):
/// enough for an exchange's own wake-ups, few enough that a connection that keeps waking
/// itself still yields to the others.
const POLL_ROUNDS: u32 = 2;

/// How long connections may go on writing the 503s of a forced shutdown before they are
/// dropped.
const FORCED_WRITE_WINDOW: Duration = Duration::from_millis(250);

/// Accepts until the drain starts. Beyond `max_connections` it stops accepting, so that
/// new connections wait in the kernel's backlog instead of the process running out of
/// descriptors; they are served as soon as a slot frees.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, settings: ServerSettings) {
    let nodelay_inherited = nodelay_for_every_connection(&listener);
    let slots = settings.slots.clone();
    let lifecycle = shared.lifecycle.clone();
    // One wait for the drain, registered once, and polled only when there is nothing to
    // accept (a poll takes the token's lock): a connection accepted as the drain begins
    // is caught just below.
    let mut draining = std::pin::pin!(lifecycle.draining());
    loop {
        let permit = tokio::select! {
            biased;
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut draining => break,
        };
        let (stream, peer) = tokio::select! {
            biased;
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin; the backlog holds the
                    // connection until we can take it.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = &mut draining => break,
                    }
                }
            },
            _ = &mut draining => break,
        };
        if lifecycle.is_draining() {
            // Accepted in the same instant the drain began: refuse rather than serve.
            break;
        }
        let tasks = shared.tasks.clone();
        let shared = shared.clone();
        let settings = settings.clone();
        // The connection's future (about 2.7 KiB) is boxed once here rather than copied
        // into the task several times over by the spawn.
        tasks.spawn(async move {
            Box::pin(connection(
                stream,
                peer,
                shared,
                &settings,
                nodelay_inherited,
            ))
            .await;
            drop(permit);
        });
    }
    // Dropping the listener closes the socket: new connections are refused from now on.
    drop(listener);
}

/// Sets `TCP_NODELAY` on the listening socket, so that every connection accepted from it
/// starts with it (Linux copies a listener's options into the connections it accepts): a
/// `setsockopt` spared per connection, one of the 14 system calls a one-request
/// connection cost. Returns whether that held, checked once on the listener itself;
/// otherwise each connection sets it.
fn nodelay_for_every_connection(listener: &TcpListener) -> bool {
    let sock = socket2::SockRef::from(listener);
    sock.set_tcp_nodelay(true).is_ok() && sock.tcp_nodelay().unwrap_or(false)
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    settings: &ServerSettings,
    nodelay_inherited: bool,
) {
    if !nodelay_inherited {
        // Responses and streamed chunks go out as written, not held back by Nagle.
        let _ = stream.set_nodelay(true);
    }
    let acceptor = shared.tls.load_full();
    let client = Arc::new(ClientConn::default());
    let mut waits = Waits {
        head_timer: HeadTimer::new(settings.header_read_timeout),
        seat: Seat::new(),
    };
    let (speaks, first) = match acceptor {
        Some(_) => (Speaks::Unsure, Bytes::new()),
        None => tokio::select! {
            biased;
            sniffed = sniff(&mut stream) => match sniffed {
                Ok(sniffed) => sniffed,
                Err(_) => return,
            },
            cut = std::future::poll_fn(|cx| waits.head_timer.poll(cx, &client)) => {
                log_head_timeout(cut);
                return;
            }
            _ = std::future::poll_fn(|cx| waits.seat.poll_past(cx, Stage::Serving)) => return,
        },
    };
    let (stream, hook) = Watched::new(stream);
    let cx = Arc::new(ConnContext {
        shared: shared.clone(),
        client,
        info: ClientInfo::new(peer.ip(), acceptor.is_some()),
    });
    match acceptor {
        None => serve_io(stream, speaks, first, waits, cx, hook, settings).await,
        // Boxed: a TLS session is kilobytes, which every plain connection's task would
        // otherwise reserve too (a future is as large as its largest branch).
        Some(acceptor) => {
            Box::pin(serve_tls(
                stream, peer, acceptor, waits.seat, cx, hook, settings,
            ))
            .await
        }
    }
}

async fn serve_tls(
    stream: Watched<TcpStream>,
    peer: SocketAddr,
    acceptor: Arc<tokio_rustls::TlsAcceptor>,
    mut seat: Seat,
    cx: Arc<ConnContext>,
    hook: Option<Arc<Hook>>,
    settings: &ServerSettings,
) {
    // The handshake is bounded like a request head: a client that connects and says
    // nothing must not hold a slot.
    let handshake = tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream));
    let tls = tokio::select! {
        r = handshake => r,
        _ = std::future::poll_fn(|cx| seat.poll_past(cx, Stage::Serving)) => return,
    };
    match tls {
        Ok(Ok(mut tls)) => {
            // rustls keeps up to 64 KiB of records for a socket that is full; the write
            // gate (see `write_gate.rs`) counts what rustls took, so that would be on top.
            tls.get_mut()
                .1
                .set_buffer_limit(Some(crate::write_gate::AHEAD));
            let speaks = match tls.get_ref().1.alpn_protocol() {
                Some(b"http/1.1") => Speaks::Http1,
                _ => Speaks::Unsure,
            };
            let waits = Waits {
                head_timer: HeadTimer::new(settings.header_read_timeout),
                seat,
            };
            serve_io(tls, speaks, Bytes::new(), waits, cx, hook, settings).await
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

fn log_head_timeout(cut: HeadTimeout) {
    match cut {
        HeadTimeout::Silent => {
            tracing::debug!("client sent no request within header_read_timeout");
        }
        HeadTimeout::Slow => {
            tracing::debug!("request head not complete within header_read_timeout");
        }
    }
}

/// What a connection's task watches besides hyper's connection, from its first byte on:
/// the head timer (`header_read_timeout`, then between requests) and its worker's word on
/// the shutdown.
struct Waits {
    head_timer: HeadTimer,
    seat: Seat,
}

/// What a connection speaks, as far as is known before hyper reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    /// Served by hyper's HTTP/1 connection directly.
    Http1,
    /// HTTP/1.1 or HTTP/2: hyper-util reads the first bytes to tell.
    Unsure,
}

/// Tells a cleartext HTTP/1 connection by its first bytes, read here and handed to hyper
/// with [`HeadBytes`] at its first read.
///
/// hyper-util's version detection reads 24 bytes itself, which hyper then gets back
/// through a rewind layer, and hyper, having room left for only 8 168 more in its 8 KiB
/// read buffer, reallocates it to 16 KiB, copying all 8: about 8 000 instructions for
/// every new connection. A peek avoided that for a system call of its own. This read is
/// the one hyper would make anyway, up to the size of its buffer, which the bytes are
/// then copied into whole. Bytes that may still begin the preface (a lone `P`) are left
/// to hyper-util.
async fn sniff(stream: &mut TcpStream) -> std::io::Result<(Speaks, Bytes)> {
    let first = std::future::poll_fn(|cx| poll_first_read(stream, cx)).await?;
    let n = first.len().min(H2_PREFACE.len());
    // Nothing at all (the client left without a word) is HTTP/1's: hyper sees the end.
    let speaks = if n > 0 && first[..n] == H2_PREFACE[..n] {
        Speaks::Unsure
    } else {
        Speaks::Http1
    };
    Ok((speaks, first))
}

/// As large as any later read (see `read_cap.rs`): handed to hyper as its first read, a
/// full 8 KiB would double its buffer for the rest of the connection.
const FIRST_READ: usize = crate::read_cap::MAX_READ;

/// Reads what has arrived into a buffer on this call's stack, not in the connection's
/// future, which would carry it for the connection's whole life, and keeps only the
/// bytes read. Through tokio's `poll_read`, which marks the socket drained after a read
/// shorter than the buffer: hyper's next read then waits for readiness instead of
/// making a system call that finds nothing.
fn poll_first_read(
    stream: &mut TcpStream,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<Bytes>> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
    let mut read = tokio::io::ReadBuf::uninit(&mut buf);
    std::task::ready!(tokio::io::AsyncRead::poll_read(
        Pin::new(stream),
        cx,
        &mut read
    ))?;
    std::task::Poll::Ready(Ok(Bytes::copy_from_slice(read.filled())))
}

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 (by ALPN or the h2c preface) on one
/// connection until it ends, its client hangs up, or the shutdown forces the end.
async fn serve_io<I>(
    io: I,
    speaks: Speaks,
    first: Bytes,
    waits: Waits,
    cx: Arc<ConnContext>,
    hook: Option<Arc<Hook>>,
    settings: &ServerSettings,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let client = cx.client.clone();
    let cap = match speaks {
        Speaks::Http1 => Cap::On(0),
        Speaks::Unsure => Cap::Undecided(0),
    };
    let io = TokioIo::new(HeadBytes::new(io, first, client.clone(), cap));
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let number = cx
            .client
            .mark_request(req.version(), !http_body::Body::is_end_stream(req.body()));
        let state = Arc::new(RequestState::new(number));
        Stamped::new(proxy::handle(req, cx.clone(), state.clone()), state)
    });
    match speaks {
        Speaks::Http1 => {
            let http1 = match hook {
                Some(_) => settings.http1,
                None => settings.http1_probing,
            };
            let conn = Box::pin(http1.serve_connection(io, service).with_upgrades());
            drive(conn, client, hook, waits, settings).await;
        }
        Speaks::Unsure => {
            let conn = Box::pin(settings.builder.serve_connection_with_upgrades(io, service));
            drive(conn, client, hook, waits, settings).await;
        }
    }
}

/// Ready once the response streaming on this connection is past its route timeout.
///
/// The response body's own [`Deadline`] wakes this task, but it wakes it first
/// [`LEAD`] early (see `deadline.rs`) and goes on to the exact instant only when polled
/// again, which a body hyper no longer polls is not. So within [`LEAD`] of the deadline
/// this task keeps a deadline of its own.
fn poll_overdue(
    client: &ClientConn,
    own: &mut Option<Deadline>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    let Some(due) = client.response_due() else {
        *own = None;
        return std::task::Poll::Pending;
    };
    // An earlier response's, with its descriptor: not kept until this one's last stretch.
    if own.as_ref().is_some_and(|d| d.at() != due) {
        *own = None;
    }
    let now = Instant::now();
    if now >= due {
        return std::task::Poll::Ready(());
    }
    if due - now > LEAD {
        return std::task::Poll::Pending;
    }
    own.get_or_insert_with(|| Deadline::new(due)).poll_fired(cx)
}

/// The life of one client connection around hyper's: the hang-up watch, the drain, the
/// head and keep-alive timers, the forced end.
async fn drive<C, E>(
    // Boxed by the caller: a future keeps room for its arguments, and hyper's connection
    // is about a kilobyte that every connection's task would otherwise carry twice.
    conn: Pin<Box<C>>,
    client: Arc<ClientConn>,
    hook: Option<Arc<Hook>>,
    waits: Waits,
    settings: &ServerSettings,
) where
    C: std::future::Future<Output = Result<(), E>> + GracefulShutdown + Send + 'static,
    E: std::fmt::Display,
{
    let gate = Arc::new(TaskGate::new());
    let conn = Arc::new(Connection {
        conn: Mutex::new(Some(conn)),
        waker: std::task::Waker::from(gate.clone()),
        gate,
        hook: hook.clone(),
        client: client.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    if let Some(hook) = &hook {
        hook.attach(Arc::downgrade(&conn) as Weak<dyn OnHangup>);
    }
    let Waits {
        mut head_timer,
        mut seat,
    } = waits;
    let mut draining = false;
    let mut forced_window = None;
    let mut overdue = None;
    // hyper ended the connection itself, and whether with an error (a malformed head).
    let mut ended = None;
    // What this connection has learnt of the shutdown, from its worker (see `Seat`).
    let mut known = Stage::Serving;
    // Created once, not per wake-up: a timer re-registered on every poll of a busy
    // connection re-checks its entry each time.
    let idle_check = std::pin::pin!(tokio::time::sleep(settings.keepalive_timeout));
    let mut idle_check = Gated::new(idle_check);
    loop {
        tokio::select! {
            // The shutdown comes first: a request read after the drain began must see the
            // connection closing, not be served as if nothing happened.
            biased;
            stage = std::future::poll_fn(|cx| seat.poll_past(cx, known)), if known < Stage::Forced => {
                known = stage;
                if !draining {
                    // Idle keep-alive connections close now; busy ones after their response.
                    conn.graceful_shutdown();
                    draining = true;
                }
                if stage == Stage::Forced {
                    forced_window = Some(Box::pin(tokio::time::sleep(FORCED_WRITE_WINDOW)));
                }
            }
            r = std::future::poll_fn(|cx| conn.poll(cx)) => {
                if let Some(Err(e)) = &r {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                ended = r.map(|r| r.is_err());
                // `None`: the client hung up, and the hang-up thread dropped the rest.
                break;
            }
            // The route timeout of a response whose client stopped reading: hyper waits on
            // its blocked writes and polls the body no more, so the body's timer, which
            // wakes this task, cannot act itself. Ending the connection ends the exchange
            // (the body, dropped past its deadline, is logged as a timeout).
            _ = std::future::poll_fn(|cx| poll_overdue(&client, &mut overdue, cx)) => {
                break;
            }
            // Not gated: what it watches changes during hyper's poll just above.
            cut = std::future::poll_fn(|cx| head_timer.poll(cx, &client)) => {
                log_head_timeout(cut);
                break;
            }
            _ = &mut idle_check, if !draining => {
                match client.idle_for() {
                    Some(idle) if idle >= settings.keepalive_timeout => {
                        // hyper closes an idle keep-alive connection at once.
                        conn.graceful_shutdown();
                        draining = true;
                    }
                    idle => {
                        let wait = settings.keepalive_timeout - idle.unwrap_or_default();
                        idle_check.rearm().as_mut().reset(tokio::time::Instant::now() + wait);
                    }
                }
            }
            _ = async { forced_window.as_mut().expect("guarded").await }, if forced_window.is_some() => {
                break;
            }
        }
    }
    // An answer sent before the client finished sending (hyper's to a malformed head, or
    // one before the request's body was read): the socket is kept from closing as hyper's
    // connection drops it, to linger (see `linger.rs`).
    // Not after an idle close (hyper closes only between requests then, when nothing is
    // unread, whatever a stale flag says), nor in the drain, which ends a linger at once:
    // both set `draining`.
    let linger = hook.filter(|hook| {
        ended.is_some_and(|error| error || client.body_left())
            && !client.is_h2()
            && !draining
            && hook.linger_on_close()
    });
    // However the connection ended (hyper saw the client leave, a timer, a shutdown), its
    // upstream calls are reset before the client's socket is torn down. Taken out here,
    // on this worker: the hang-up thread may hold the last reference to `conn` a moment
    // longer, and must not be the one to drop a connection it left to this task.
    crate::hangup::upstreams_first(move || {
        let inner = conn.lock().take();
        drop(inner);
        drop(conn);
    });
    if let Some(socket) = linger.and_then(|hook| hook.take_parked())
        && let Ok(socket) = socket.downcast::<TcpStream>()
    {
        // Boxed: only a connection that lingers pays for the linger's future.
        let (ended, bytes) = Box::pin(crate::linger::linger(*socket, &mut seat)).await;
        tracing::debug!(ended = ended.as_str(), bytes, "lingering close ended");
    }
}

/// One client connection, shared with the hang-up thread, which may drop it.
///
/// hyper's connection holds every request of the client and, through them, every upstream
/// call: dropping it cancels them all. The lock is taken by this connection's task for
/// each poll and tried by the hang-up thread once; it is never held across an await.
struct Connection<C> {
    conn: Mutex<Option<Pin<Box<C>>>>,
    gate: Arc<TaskGate>,
    /// `gate` as a waker: what hyper's connection is polled with, every time.
    waker: std::task::Waker,
    /// The client socket's registration, whose reads stop when the client hangs up.
    hook: Option<Arc<Hook>>,
    client: Arc<ClientConn>,
    /// The worker runtime whose sockets and timers the connection uses: they are dropped
    /// inside its context.
    runtime: tokio::runtime::Handle,
}

impl<C> Connection<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pin<Box<C>>>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<C: std::future::Future + GracefulShutdown> Connection<C> {
    /// Polls hyper's connection, again at once while it woke itself during the poll.
    ///
    /// An HTTP/1.1 exchange is driven inside this poll, and wakes its own task as it goes:
    /// the upstream's response handed over through a channel, the body's call for more.
    /// Each such wake-up used to cost a whole extra poll of the task, scheduled through
    /// the runtime and polling every branch of the connection's loop, after a poll that
    /// had already taken what the wake-up announced. Now the poll goes round again only
    /// while it was woken, at most [`POLL_ROUNDS`] times; a wake-up still pending after
    /// that, or one that crossed the poll's end, wakes the task as before.
    fn poll_rounds(
        &self,
        mut conn: Pin<&mut C>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<C::Output> {
        let gate = &self.gate;
        // Cleared before the poll begins, then taken (swapped) after each round: a wake-up
        // from another thread is never overwritten, only taken or left for the end.
        gate.rewoken.store(false, Ordering::SeqCst);
        gate.polling.store(true, Ordering::SeqCst);
        let mut owed = false;
        let mut rounds = 0;
        let polled = loop {
            let polled = conn
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&self.waker));
            rounds += 1;
            if polled.is_ready() || !gate.rewoken.swap(false, Ordering::SeqCst) {
                break polled;
            }
            // Woken during this round. Not again past the rounds, for a client that left,
            // or with the task's budget spent (tokio's resources would only refuse and
            // wake it once more): the task is woken instead.
            if rounds == POLL_ROUNDS
                || gate.gone.load(Ordering::Acquire)
                || !tokio::task::coop::has_budget_remaining()
            {
                owed = true;
                break polled;
            }
        };
        gate.polling.store(false, Ordering::SeqCst);
        if polled.is_pending() && (owed || gate.rewoken.load(Ordering::SeqCst)) {
            cx.waker().wake_by_ref();
        }
        polled
    }

    /// `None` once the client hung up. hyper's connection is polled with `gate`'s waker
    /// (the same one every time), never with the task's own.
    fn poll(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<C::Output>> {
        self.gate.task.register(cx.waker());
        if self.gate.gone.load(Ordering::Acquire) {
            return std::task::Poll::Ready(None);
        }
        let mut slot = self.lock();
        let Some(conn) = slot.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let polled = self.poll_rounds(conn.as_mut(), cx);
        if let (true, Some(hook)) = (polled.is_ready(), &self.hook) {
            // hyper is done with the socket; after an upgrade it is a tunnel's, whose
            // reads a hang-up handled during this very poll must not end.
            hook.hand_over();
        }
        if self.gate.gone.load(Ordering::Acquire) {
            // The client left during this poll, and the hang-up thread, finding the
            // connection busy, left the drop to this task rather than wait for it.
            let conn = slot.take();
            drop(slot);
            crate::hangup::upstreams_first(|| drop(conn));
            return std::task::Poll::Ready(None);
        }
        polled.map(Some)
    }

    fn graceful_shutdown(&self) {
        if let Some(conn) = self.lock().as_mut() {
            conn.as_mut().shutdown_gracefully();
        }
    }
}

impl<C: Send> OnHangup for Connection<C> {
    fn hung_up(&self) {
        // The cause first, so that every request's guard records the client leaving.
        self.client.mark_gone();
        // Closed before the drop: whatever it wakes waits until the upstream calls are reset.
        self.gate.gone.store(true, Ordering::Release);
        if let Some(hook) = &self.hook {
            hook.stop_reads();
        }
        // A connection its task is polling right now is left to that task, which checks
        // `gone` when its poll ends (and at the next poll, which the wake below brings):
        // waiting here would hold up every other departure behind one busy connection.
        let conn = match self.conn.try_lock() {
            Ok(mut slot) => slot.take(),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().take(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if conn.is_some() {
            let _runtime = self.runtime.enter();
            crate::hangup::upstreams_first(|| drop(conn));
        }
        self.gate.task.wake();
    }
}

/// The waker of everything inside one client connection: it wakes the connection's task,
/// unless the hang-up thread is dropping that connection.
///
/// Dropping a request wakes the task that polls it (hyper's response channel does so on
/// close). From the hang-up thread, that wake is a write to the worker's event descriptor,
/// made before the upstream socket is closed, and the woken worker may take the core (and
/// the connection's lock) ahead of the hang-up thread: a syscall and a possible context
/// switch on the path the client's departure takes to the upstream, for a task with
/// nothing left to do. Gated, the hang-up thread closes first and wakes the task itself,
/// once, after the drop.
///
/// One waker for the connection's whole life also lets tokio and hyper skip re-storing
/// it (`will_wake` holds on every poll): about 500 fewer instructions per request.
///
/// While the task polls hyper's connection, wake-ups are held back from the task and
/// make the poll go round again instead (`Connection::poll_rounds`).
struct TaskGate {
    gone: AtomicBool,
    task: atomic_waker::AtomicWaker,
    /// Set while the task polls hyper's connection.
    polling: AtomicBool,
    /// A wake-up came since the poll began: the poll goes round again.
    rewoken: AtomicBool,
}

impl TaskGate {
    fn new() -> TaskGate {
        TaskGate {
            gone: AtomicBool::new(false),
            task: atomic_waker::AtomicWaker::new(),
            polling: AtomicBool::new(false),
            rewoken: AtomicBool::new(false),
        }
    }
}

impl std::task::Wake for TaskGate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.gone.load(Ordering::Acquire) {
            return;
        }
        // Woken from inside the poll (see `Connection::poll_rounds`): the poll goes round
        // again. The poll's end clears `polling` before it looks at `rewoken`, and this
        // sets `rewoken` before it looks at `polling`: one of the two sees the other.
        self.rewoken.store(true, Ordering::SeqCst);
        if self.polling.load(Ordering::SeqCst) {
            return;
        }
        self.task.wake();
    }
}

/// hyper-util's `graceful_shutdown`, named so that [`Connection`] can be generic.
trait GracefulShutdown {
    fn shutdown_gracefully(self: Pin<&mut Self>);
}

impl<I, S, E, B> GracefulShutdown for auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> GracefulShutdown for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A future polled only after its own waker fired.
///
/// A connection task is polled on every socket event, several times per request, and
/// `select!` then polls each of its branches. The keep-alive timer waits for a rare event,
/// yet polling it is not free: a timer re-checks its entry. Gated, it costs an atomic swap
/// per poll, and the timer runs only when it asked to be woken. (The shutdown's branch
/// needs no gate: it looks at a value of the worker's thread, `shutdown::Seat`.)
struct Gated<F> {
    inner: F,
    gate: Arc<Gate>,
    waker: std::task::Waker,
}

struct Gate {
    woken: AtomicBool,
    task: atomic_waker::AtomicWaker,
}

impl std::task::Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: std::future::Future + Unpin> Gated<F> {
    fn new(inner: F) -> Gated<F> {
        let gate = Arc::new(Gate {
            // Polled once at first, so that the future can register what it waits for.
            woken: AtomicBool::new(true),
            task: atomic_waker::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(gate.clone());
        Gated { inner, gate, waker }
    }

    /// The inner future, to be changed; it is polled again at the next poll (a timer that
    /// was reset must register its new deadline).
    fn rearm(&mut self) -> &mut F {
        self.gate.woken.store(true, Ordering::Release);
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
        if !this.gate.woken.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Pending;
        }
        let mut own = std::task::Context::from_waker(&this.waker);
        std::pin::Pin::new(&mut this.inner).poll(&mut own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Runs a test's sockets on a runtime of its own.
    fn on_loopback<F: std::future::Future>(test: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test)
    }

    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The listener's `TCP_NODELAY` reaches the connections it accepts: what lets
    /// `connection` skip setting it on each.
    #[test]
    fn accepted_connections_inherit_nodelay_from_the_listener() {
        on_loopback(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            assert!(nodelay_for_every_connection(&listener));
            let addr = listener.local_addr().unwrap();
            let _client = TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap());
        });
    }

    /// What `sniff` makes of a connection's first bytes, over real loopback sockets.
    #[test]
    fn first_bytes_tell_http1_from_a_possible_preface() {
        use tokio::io::AsyncWriteExt;
        on_loopback(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            for (first, speaks) in [
                (&b"GET / HTTP/1.1\r\n"[..], Speaks::Http1),
                (b"POST /upload HTTP/1.1\r\n", Speaks::Http1),
                (b"P", Speaks::Unsure),
                (b"PRI * HTTP/2.0\r\n", Speaks::Unsure),
                (H2_PREFACE, Speaks::Unsure),
                (b"", Speaks::Http1),
            ] {
                let mut client = TcpStream::connect(addr).await.unwrap();
                let (mut server, _) = listener.accept().await.unwrap();
                client.write_all(first).await.unwrap();
                if first.is_empty() {
                    client.shutdown().await.unwrap();
                }
                let (got, read) = tokio::time::timeout(Duration::from_secs(10), sniff(&mut server))
                    .await
                    .expect("sniff never returned")
                    .unwrap();
                assert_eq!(got, speaks, "{:?}", String::from_utf8_lossy(first));
                // Kept whole, for hyper.
                assert_eq!(&read[..], first);
            }
        });
    }

    #[test]
    fn a_departing_connection_wakes_its_task_only_after_the_drop() {
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let task = std::task::Waker::from(woken.clone());
        let gate = Arc::new(TaskGate::new());
        let inner = std::task::Waker::from(gate.clone());

        gate.task.register(&task);
        inner.wake_by_ref();
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            1,
            "a live connection wakes its task"
        );

        gate.task.register(&task);
        gate.gone.store(true, Ordering::SeqCst);
        inner.wake_by_ref();
        let stored = inner.clone();
        stored.wake();
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            1,
            "no wake while it is being dropped"
        );

        gate.task.wake();
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            2,
            "the hang-up thread's own wake"
        );
    }

    /// Wakes itself in each of its first `wakes` polls (as an exchange does when the
    /// upstream's response is handed over), then, if `done`, completes. `from_thread`: the
    /// wake-up comes from another thread, during the poll. `leaves`: the client is marked
    /// gone during the first poll, as the hang-up thread does.
    #[derive(Default)]
    struct SelfWaking {
        polls: usize,
        wakes: usize,
        done: bool,
        from_thread: bool,
        leaves: Option<Arc<TaskGate>>,
        /// Counts the polls where the stand-in itself is dropped before they can be read.
        seen: Arc<AtomicUsize>,
    }

    impl std::future::Future for SelfWaking {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
            self.polls += 1;
            self.seen.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = self.leaves.take() {
                gate.gone.store(true, Ordering::Release);
            }
            if self.polls <= self.wakes {
                if self.from_thread {
                    let waker = cx.waker().clone();
                    std::thread::spawn(move || waker.wake()).join().unwrap();
                } else {
                    cx.waker().wake_by_ref();
                }
                return std::task::Poll::Pending;
            }
            if self.done {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        }
    }

    impl GracefulShutdown for SelfWaking {
        fn shutdown_gracefully(self: Pin<&mut Self>) {}
    }

    fn self_waking(stand_in: SelfWaking) -> Connection<SelfWaking> {
        let gate = Arc::new(TaskGate::new());
        let leaves = stand_in.leaves.is_some().then(|| gate.clone());
        Connection {
            conn: Mutex::new(Some(Box::pin(SelfWaking { leaves, ..stand_in }))),
            waker: std::task::Waker::from(gate.clone()),
            gate,
            hook: None,
            client: Arc::new(ClientConn::default()),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn polls(conn: &Connection<SelfWaking>) -> usize {
        conn.lock().as_ref().map_or(0, |c| c.polls)
    }

    /// A wake-up from inside the poll makes the poll go round again, without waking the
    /// task, whether it comes from the poll itself or from another thread; past
    /// `POLL_ROUNDS` rounds the task is woken, once, as before; and a wake-up between
    /// polls still wakes it.
    #[tokio::test]
    async fn wake_ups_from_inside_a_poll_go_round_again_not_through_the_task() {
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let task = std::task::Waker::from(woken.clone());
        let cx = &mut std::task::Context::from_waker(&task);
        let count = || woken.0.load(Ordering::SeqCst);

        for from_thread in [false, true] {
            let conn = self_waking(SelfWaking {
                wakes: POLL_ROUNDS as usize - 1,
                done: true,
                from_thread,
                ..SelfWaking::default()
            });
            assert!(conn.poll(cx).is_ready(), "done within one poll of the task");
            assert_eq!(count(), 0);
        }

        let conn = self_waking(SelfWaking {
            wakes: usize::MAX,
            ..SelfWaking::default()
        });
        assert!(conn.poll(cx).is_pending());
        assert_eq!(polls(&conn), POLL_ROUNDS as usize);
        assert_eq!(count(), 1, "woken once past the rounds");

        let conn = self_waking(SelfWaking::default());
        assert!(conn.poll(cx).is_pending());
        assert_eq!(polls(&conn), 1);
        assert_eq!(count(), 1);
        conn.waker.wake_by_ref();
        assert_eq!(count(), 2, "a wake-up between polls");
    }

    /// No second round for a client that left during the first (the connection is
    /// over), nor with the task's budget spent (the task is woken instead).
    #[tokio::test]
    async fn no_second_round_once_the_client_left_or_the_budget_is_spent() {
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let task = std::task::Waker::from(woken.clone());
        let cx = &mut std::task::Context::from_waker(&task);

        let seen = Arc::new(AtomicUsize::new(0));
        let conn = self_waking(SelfWaking {
            wakes: usize::MAX,
            leaves: Some(Arc::new(TaskGate::new())),
            seen: seen.clone(),
            ..SelfWaking::default()
        });
        assert_eq!(conn.poll(cx), std::task::Poll::Ready(None));
        assert!(conn.lock().is_none(), "dropped: the client left");
        assert_eq!(seen.load(Ordering::SeqCst), 1, "one round");

        std::future::poll_fn(|outer| {
            // Spends the task's budget, as a busy exchange does.
            while std::pin::pin!(tokio::task::coop::consume_budget())
                .poll(outer)
                .is_ready()
            {}
            assert!(!tokio::task::coop::has_budget_remaining());
            let conn = self_waking(SelfWaking {
                wakes: usize::MAX,
                ..SelfWaking::default()
            });
            let before = woken.0.load(Ordering::SeqCst);
            assert!(conn.poll(cx).is_pending());
            assert_eq!(polls(&conn), 1);
            assert_eq!(woken.0.load(Ordering::SeqCst), before + 1);
            std::task::Poll::Ready(())
        })
        .await;
    }

    /// A hyper connection stand-in whose poll blocks until released, as a worker busy
    /// forwarding an upload does while holding the connection.
    struct Busy {
        entered: std::sync::mpsc::SyncSender<()>,
        release: std::sync::mpsc::Receiver<()>,
        dropped: Arc<AtomicBool>,
    }

    impl std::future::Future for Busy {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<()> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            std::task::Poll::Pending
        }
    }

    impl GracefulShutdown for Busy {
        fn shutdown_gracefully(self: Pin<&mut Self>) {}
    }

    impl Drop for Busy {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_hang_up_thread_leaves_a_busy_connection_to_its_task() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (release, release_rx) = std::sync::mpsc::sync_channel(1);
        let dropped = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(TaskGate::new());
        let conn = Arc::new(Connection {
            conn: Mutex::new(Some(Box::pin(Busy {
                entered: entered_tx,
                release: release_rx,
                dropped: dropped.clone(),
            }))),
            waker: std::task::Waker::from(gate.clone()),
            gate,
            hook: None,
            client: Arc::new(ClientConn::default()),
            runtime: rt.handle().clone(),
        });

        // The connection's task, inside a poll that will not end until released.
        let task = std::thread::spawn({
            let conn = conn.clone();
            move || {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                conn.poll(&mut cx).is_ready()
            }
        });
        entered.recv_timeout(Duration::from_secs(10)).unwrap();

        // The departure: it must return at once, without the connection.
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn({
            let conn = conn.clone();
            move || {
                conn.hung_up();
                let _ = done_tx.send(());
            }
        });
        done.recv_timeout(Duration::from_secs(10))
            .expect("the hang-up thread waited for a busy connection");
        assert!(!dropped.load(Ordering::SeqCst));

        // The task's poll ends, sees the departure and drops the connection itself.
        release.send(()).unwrap();
        assert!(task.join().unwrap(), "the poll reports the connection over");
        assert!(dropped.load(Ordering::SeqCst));
    }
}
