//! Upgraded connections (WebSocket, `Connection: upgrade`): the 101 is passed on, then bytes
//! flow both ways. A side that closes (FIN) has its close passed on after its last bytes,
//! and the tunnel ends once both sides closed; a reset or error on either side ends it at
//! once.
//!
//! A tunnel is long-lived by design, so the route's `timeout` covers only the handshake
//! (until the 101); after it, only `idle_timeout` applies (no bytes either way for that
//! long ends the tunnel), and a forced shutdown. The tunnel runs in a tracked task that
//! owns the request's guard: a normal close by either side is `ok`, an idle tunnel is
//! `timeout`, and a shutdown is `shutdown`.

use std::sync::Arc;
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
        let call = std::pin::pin!(route.upstream.upgrade(up_req, &mut guard));
        proxy::until_headers(call, &mut timer, &cx.forced).await
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

/// Copies both ways with one reused buffer per direction. A side's FIN is passed on as a
/// FIN once everything before it was delivered; the tunnel ends when both sides have
/// closed, at an error or reset of either, when no byte moved for `idle_timeout` (a peer
/// that stops reading counts: a write to it makes no progress either), at a forced
/// shutdown, or [`HALF_CLOSE_GRACE`] after the first close with nothing sent meanwhile.
async fn pump<C, U>(
    mut client: C,
    mut upstream: U,
    idle: Option<Duration>,
    lifecycle: &Lifecycle,
    guard: &mut InFlight,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut up_buf = vec![0u8; 16 * 1024];
    let mut down_buf = vec![0u8; 16 * 1024];
    let mut idle_limit = idle.unwrap_or(Duration::from_secs(u64::MAX / 4));
    let sleep = tokio::time::sleep(idle_limit);
    tokio::pin!(sleep);
    let (mut client_open, mut upstream_open) = (true, true);
    // Each write or FIN is raced against the same timer and the forced shutdown as the
    // reads: a peer that stops reading must not hold the tunnel past either.
    let cut = loop {
        if !(client_open || upstream_open) {
            break None;
        }
        let moved = tokio::select! {
            r = client.read(&mut up_buf), if client_open => match r {
                Ok(0) => {
                    client_open = false;
                    bounded(upstream.shutdown(), sleep.as_mut(), lifecycle).await
                }
                Err(_) => Ok(false),
                Ok(n) => bounded(upstream.write_all(&up_buf[..n]), sleep.as_mut(), lifecycle).await,
            },
            r = upstream.read(&mut down_buf), if upstream_open => match r {
                Ok(0) => {
                    upstream_open = false;
                    bounded(client.shutdown(), sleep.as_mut(), lifecycle).await
                }
                Err(_) => Ok(false),
                Ok(n) => {
                    let r = bounded(client.write_all(&down_buf[..n]), sleep.as_mut(), lifecycle).await;
                    if matches!(r, Ok(true)) {
                        guard.add_bytes_out(n as u64);
                    }
                    r
                }
            },
            _ = &mut sleep => Err(Cut::Idle),
            _ = lifecycle.forced() => Err(Cut::Forced),
        };
        match moved {
            Ok(true) => {}
            Ok(false) => break None,
            Err(cut) => break Some(cut),
        }
        if !(client_open && upstream_open) {
            idle_limit = idle_limit.min(HALF_CLOSE_GRACE);
        }
        sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + idle_limit);
    };
    match cut {
        Some(Cut::Idle) if client_open && upstream_open => {
            guard.decide(Outcome::Timeout, 504, Some(CancelledBy::Timeout));
            guard.reason("tunnel idle_timeout");
        }
        Some(Cut::Idle) => guard.reason("one side closed; the other went quiet without closing"),
        Some(Cut::Forced) => guard.decide(Outcome::Shutdown, 503, Some(CancelledBy::Shutdown)),
        None => {}
    }
    // Bounded too: over TLS a shutdown writes, and the peer may be the one not reading.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = client.shutdown().await;
        let _ = upstream.shutdown().await;
    })
    .await;
    guard.upstream_completed();
    guard.decide(Outcome::Ok, 101, None);
}

/// Why a tunnel stopped before its peers were done.
enum Cut {
    Idle,
    Forced,
}

/// One write (or FIN) of a tunnel, unless the tunnel's timer fires or a forced shutdown
/// comes first. `Ok(false)`: the peer failed it.
async fn bounded(
    io: impl std::future::Future<Output = std::io::Result<()>>,
    sleep: std::pin::Pin<&mut tokio::time::Sleep>,
    lifecycle: &Lifecycle,
) -> Result<bool, Cut> {
    tokio::select! {
        r = io => Ok(r.is_ok()),
        _ = sleep => Err(Cut::Idle),
        _ = lifecycle.forced() => Err(Cut::Forced),
    }
}
