//! Upgraded connections (WebSocket, `Connection: upgrade`): the 101 is passed on, then bytes
//! flow both ways, each direction copied on its own. A side that closes (FIN) has its
//! close passed on after its last bytes, and the tunnel ends once both sides closed; a
//! reset or error on either side ends it at once.
//!
//! A tunnel is long-lived by design, so the route's `timeout` covers only the handshake
//! (until the 101); after it, only `idle_timeout` applies (no bytes either way for that
//! long ends the tunnel), and a forced shutdown. The tunnel runs in a tracked task that
//! owns the request's guard: a normal close by either side is `ok`, an idle tunnel is
//! `timeout`, a shutdown is `shutdown`, a client's reset is `client_closed` and an
//! upstream's is `upstream_error`. A tunnel cut short counts as a cancelled upstream call
//! (phase `streaming_body`), but never as wasted or saved time: a session has no result
//! to waste and no typical length to save.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::header::{CONNECTION, HeaderValue, UPGRADE};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::body::{ProxyBody, deadline_timer};
use crate::outcome::{CancelledBy, InFlight, Outcome, Phase};
use crate::proxy::{self, ConnContext};
use crate::routes::Route;
use crate::shutdown::Lifecycle;

/// Whether the client asks to switch protocols (HTTP/1.1 `Upgrade`).
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

pub async fn forward(
    mut req: Request<Incoming>,
    route: &Arc<Route>,
    mut guard: Box<InFlight>,
    deadline: Option<Instant>,
    cx: &ConnContext,
    upload: Arc<crate::body::RequestState>,
) -> Response<ProxyBody> {
    let protocol = req.headers().get(UPGRADE).cloned();
    let client_side = hyper::upgrade::on(&mut req);
    let mut up_req = proxy::prepare(req, route, cx, &upload);
    if let Some(p) = protocol {
        up_req.headers_mut().insert(UPGRADE, p);
        up_req
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut timer = deadline_timer(deadline);
    let result = {
        let call = std::pin::pin!(route.upstream.upgrade(up_req, &mut guard, &route.config));
        proxy::until_headers(call, &mut timer, cx).await
    };
    let (mut resp, conn) = match result {
        Ok(exchange) => exchange,
        Err(stop) => return proxy::stopped(&mut guard, &upload, stop),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The upstream declined: an ordinary response.
        return proxy::respond(resp, conn, timer, route, guard);
    }
    let upstream_side = hyper::upgrade::on(&mut resp);
    let (parts, _) = resp.into_parts();
    guard.set_phase(Phase::StreamingBody);
    guard.tunnel_opened();
    let idle = route.config.idle_timeout;
    let lifecycle = cx.shared.lifecycle.clone();
    cx.shared.tasks.spawn(async move {
        // Holding `conn` keeps the endpoint's in-flight count and admission slot.
        let _conn = conn;
        match tokio::join!(client_side, upstream_side) {
            (Ok(client), Ok(upstream)) => {
                pump(
                    TokioIo::new(client),
                    TokioIo::new(upstream),
                    idle,
                    &lifecycle,
                    &mut guard,
                )
                .await;
            }
            (Err(e), _) => guard.reason(format!("client upgrade failed: {e}")),
            (_, Err(e)) => {
                guard.decide(Outcome::UpstreamError, 502, None);
                guard.reason(format!("upstream upgrade failed: {e}"));
            }
        }
    });
    Response::from_parts(parts, ProxyBody::Local(None))
}

/// How long the other side has to finish once one side closed its half of a tunnel.
///
/// A FIN is the end of what that side sends, not a reset: it goes on to the other side
/// after everything sent before it (a WebSocket close frame, say), and the answer still
/// flows back, as a WebSocket close handshake needs. A side that neither closes its own
/// half after that nor sends anything is not waited for longer than this.
pub const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Copies both ways, each direction on its own so that a peer that writes only once it
/// can read (an echo) never waits on the other direction's write. A side's FIN is passed
/// on as a FIN once everything before it was delivered; the tunnel ends when both sides
/// have closed, at an error or reset of either, at a forced shutdown, when no byte moved
/// for `idle_timeout` (a write to a peer that stopped reading moves none), or
/// [`HALF_CLOSE_GRACE`] after the first close with no byte moved meanwhile.
///
/// Not `tokio::io::copy_bidirectional`, which does the same copying and FIN passing but
/// cannot tell when a byte last moved, the one thing the idle limit and the grace need.
async fn pump<C, U>(
    client: C,
    upstream: U,
    idle: Option<Duration>,
    lifecycle: &Lifecycle,
    guard: &mut InFlight,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    let activity = Activity::new();
    let bytes_out = AtomicU64::new(0);
    let end = {
        let up = copy_half(
            &mut client_rx,
            &mut upstream_tx,
            Side::Client,
            &activity,
            None,
        );
        let down = copy_half(
            &mut upstream_rx,
            &mut client_tx,
            Side::Upstream,
            &activity,
            Some(&bytes_out),
        );
        tokio::select! {
            // Both halves closed, or one failed (a reset): the tunnel is over either way.
            r = async { tokio::try_join!(up, down) } => match r {
                Ok(_) => End::Closed,
                Err(broken) => End::Broken(broken),
            },
            cut = activity.expired(idle) => cut,
            _ = lifecycle.forced() => End::Forced,
        }
    };
    guard.add_bytes_out(bytes_out.load(Ordering::Relaxed));
    // Whether the session ran its course (both sides closed, or one closed and the other
    // went quiet) rather than being cut short.
    let session_ended = match &end {
        End::Closed => true,
        End::Idle if activity.closed.load(Ordering::Acquire) == 0 => {
            guard.decide(Outcome::Timeout, 504, Some(CancelledBy::Timeout));
            guard.reason("tunnel idle_timeout");
            false
        }
        End::Idle => {
            guard.reason("one side closed; the other went quiet without closing");
            true
        }
        End::Forced => {
            // The cause is the shutdown's forced end, not this task's waking up to it.
            let at = lifecycle.forced_at().unwrap_or_else(Instant::now);
            guard.decide_at(Outcome::Shutdown, 503, Some(CancelledBy::Shutdown), at);
            false
        }
        // A client that vanishes mid-tunnel (a reset, not a close) is a departure like
        // any other; an upstream that does is the upstream's failure.
        End::Broken(Broken {
            side: Side::Client,
            error,
        }) => {
            guard.decide(Outcome::ClientClosed, 499, Some(CancelledBy::Client));
            guard.reason(format!("client reset the tunnel: {error}"));
            false
        }
        End::Broken(Broken {
            side: Side::Upstream,
            error,
        }) => {
            guard.decide(Outcome::UpstreamError, 502, None);
            guard.reason(format!("upstream reset the tunnel: {error}"));
            false
        }
    };
    if !session_ended {
        // Cut short: the upstream's side is closed first and at once (dropped, not shut
        // down: a peer blocked writing to us learns nothing from a FIN), then the client's.
        drop(upstream_rx);
        drop(upstream_tx);
        guard.upstream_aborted();
        // After a forced cut the client is just closed: no close_notify.
        if !matches!(end, End::Forced) {
            // Bounded: over TLS a shutdown writes, and the client may be the one not reading.
            let _ = tokio::time::timeout(SHUTDOWN_WAIT, client_tx.shutdown()).await;
        }
        return;
    }
    // Bounded: over TLS a shutdown writes, and a peer may be the one not reading.
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, async {
        tokio::join!(client_tx.shutdown(), upstream_tx.shutdown())
    })
    .await;
    let now = guard.upstream_completed();
    guard.decide_at(Outcome::Ok, 101, None, now);
}

/// How long the last shutdowns of a tunnel may take (a TLS close_notify to each side).
const SHUTDOWN_WAIT: Duration = Duration::from_millis(250);

/// One direction of a tunnel, until its reader's end (then a FIN to its writer) or an
/// error, which names the side it came from. A TLS peer that closes without
/// close_notify ends its direction like a FIN.
async fn copy_half<R, W>(
    from: &mut R,
    to: &mut W,
    from_side: Side,
    activity: &Activity,
    counted: Option<&AtomicU64>,
) -> Result<(), Broken>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let to_side = from_side.other();
    // As large as a read of either side can be (see `read_cap.rs`).
    let mut buf = vec![0u8; crate::read_cap::MAX_READ];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(from_side.broken(e)),
        };
        activity.moved();
        let mut done = 0;
        while done < n {
            let k = to
                .write(&buf[done..n])
                .await
                .map_err(|e| to_side.broken(e))?;
            if k == 0 {
                return Err(to_side.broken(std::io::ErrorKind::WriteZero.into()));
            }
            done += k;
            activity.moved();
            if let Some(c) = counted {
                c.fetch_add(k as u64, Ordering::Relaxed);
            }
        }
        to.flush().await.map_err(|e| to_side.broken(e))?;
    }
    activity.side_closed();
    // Everything this side sent was delivered: a FIN that cannot be passed on (the peer
    // already gone, a close_notify to a TLS peer that reset) loses nothing, and is no
    // failure of either side.
    let _ = to.shutdown().await;
    Ok(())
}

/// The two peers of a tunnel.
#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    fn broken(self, error: std::io::Error) -> Broken {
        Broken { side: self, error }
    }
}

/// A tunnel's socket failed (a reset, mostly): whose, and how.
#[derive(Debug)]
struct Broken {
    side: Side,
    error: std::io::Error,
}

/// When a tunnel last moved a byte, and how many of its sides have closed.
struct Activity {
    since: tokio::time::Instant,
    /// Nanoseconds after `since`.
    last: AtomicU64,
    closed: AtomicU8,
    /// A side closed: the limit shortens to the grace.
    changed: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            since: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            closed: AtomicU8::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn side_closed(&self) {
        // The grace counts from the close, not from the last byte before it.
        self.moved();
        self.closed.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    fn moved(&self) {
        let at = self.since.elapsed().as_nanos() as u64;
        self.last.fetch_max(at, Ordering::Relaxed);
    }

    /// Resolves once no byte moved for the limit: `idle` while both sides are open (never,
    /// without one), [`HALF_CLOSE_GRACE`] at most once a side closed.
    async fn expired(&self, idle: Option<Duration>) -> End {
        loop {
            let limit = match (idle, self.closed.load(Ordering::Acquire)) {
                (idle, 0) => idle,
                (Some(idle), _) => Some(idle.min(HALF_CLOSE_GRACE)),
                (None, _) => Some(HALF_CLOSE_GRACE),
            };
            let Some(limit) = limit else {
                self.changed.notified().await;
                continue;
            };
            let last = self.since + Duration::from_nanos(self.last.load(Ordering::Relaxed));
            let deadline = last + limit;
            if tokio::time::Instant::now() >= deadline {
                return End::Idle;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.changed.notified() => {}
            }
        }
    }
}

/// How a tunnel's copying ended.
enum End {
    /// Both sides closed their halves.
    Closed,
    /// No byte moved for the limit (`idle_timeout`, or the grace after a close).
    Idle,
    /// A forced shutdown.
    Forced,
    Broken(Broken),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_grace_counts_from_the_first_close() {
        let activity = Activity::new();
        // Quiet for longer than the grace, then one side closes.
        tokio::time::advance(Duration::from_secs(10)).await;
        activity.side_closed();
        let closed = tokio::time::Instant::now();
        let cut = activity.expired(Some(Duration::from_secs(60))).await;
        assert!(matches!(cut, End::Idle));
        assert_eq!(closed.elapsed(), HALF_CLOSE_GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_is_measured_from_the_last_byte_moved() {
        let activity = Activity::new();
        let idle = Duration::from_secs(30);
        tokio::time::advance(Duration::from_secs(20)).await;
        activity.moved();
        let moved = tokio::time::Instant::now();
        let cut = activity.expired(Some(idle)).await;
        assert!(matches!(cut, End::Idle));
        assert_eq!(moved.elapsed(), idle);
    }
}
