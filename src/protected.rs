//! Protected routes (`on_client_disconnect = "continue"`): work that must never be
//! interrupted once started, such as a payment or a large write.
//!
//! hyper drops a handler's future when its client leaves, so a call that must outlive its
//! client cannot live in that future. Here the upstream call runs in a task of its own,
//! which owns the request's [`InFlight`] guard and hands the response head and body frames
//! to the client through channels. When the client leaves, the channels close and the
//! task goes on: it reads the rest of the response and drops it (counting the discarded
//! bytes), bounded by the route's timeout like any call.
//!
//! Two things still stop a protected call: a client that leaves in the middle of its
//! upload (a half request must never be completed, so the upstream connection is closed
//! and the log says why), and the end of a shutdown's grace. The tasks are tracked, so
//! that a drain waits for them.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot};

use crate::body::{BoxError, DeadlineTimer, StreamTimeout, deadline_timer, fired};
use crate::headers;
use crate::outcome::{CancelledBy, InFlight, Outcome, Phase};
use crate::proxy::{self, ConnContext};
use crate::routes::Route;

/// One frame for the client, and whether the upstream's body ends with it.
struct Item {
    frame: Result<Frame<Bytes>, BoxError>,
    last: bool,
}

/// The client's side of a protected response: frames from the task.
pub struct ProtectedBody {
    rx: mpsc::Receiver<Item>,
    /// Signals the task that the client received the end of the body; dropped unsent when
    /// the client left first.
    delivered: Option<oneshot::Sender<()>>,
    size_hint: SizeHint,
    ended: bool,
    /// An HTTP/1 client's connection, whose write gate holds this body to the client's
    /// socket as any response body (`write_gate.rs`): the task's frames wait in the
    /// channel, then in the upstream's socket. Its count restarts at the first poll, on
    /// the connection's own task (the only one that counts).
    gated: Option<Arc<crate::outcome::ClientConn>>,
    started: bool,
    /// Set by the task once the upstream's response is complete. A channel that closes
    /// without it is a response cut short (a timeout, a shutdown, an upstream failure
    /// whose error frame found the channel full): it must end in an error, never as a
    /// whole body, which for a chunked response would hand the client a clean end.
    complete: Arc<AtomicBool>,
}

impl Body for ProtectedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(client) = &this.gated {
            if !this.started {
                this.started = true;
                client.writes().restart();
            }
            if client.writes().poll_room(cx).is_pending() {
                return Poll::Pending;
            }
        }
        match std::task::ready!(this.rx.poll_recv(cx)) {
            Some(Item { frame, last }) => {
                if let (Some(client), Ok(f)) = (&this.gated, &frame)
                    && let Some(data) = f.data_ref()
                {
                    client.writes().handed(data.len());
                }
                // hyper stops polling once a declared length is written: the end must be
                // confirmed with the last frame, not after it.
                if last {
                    this.ended = true;
                    if let Some(d) = this.delivered.take() {
                        let _ = d.send(());
                    }
                }
                Poll::Ready(Some(frame))
            }
            None if !this.complete.load(Ordering::Acquire) => {
                this.ended = true;
                Poll::Ready(Some(Err(Box::new(StreamTimeout(
                    "protected call stopped before its response's end",
                )))))
            }
            None => {
                this.ended = true;
                if let Some(d) = this.delivered.take() {
                    let _ = d.send(());
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

pub async fn forward(
    req: Request<Incoming>,
    route: Arc<Route>,
    guard: Box<InFlight>,
    deadline: Option<Instant>,
    cx: &ConnContext,
    upload: Arc<crate::body::RequestState>,
) -> Response<crate::body::ProxyBody> {
    let up_req = proxy::prepare(req, &route, cx, &upload);
    let (head_tx, head_rx) = oneshot::channel();
    let lifecycle = cx.shared.lifecycle.clone();
    cx.shared.tasks.spawn(async move {
        let mut call = Call {
            route,
            guard,
            head_tx: Some(head_tx),
        };
        call.run(up_req, upload, deadline, lifecycle).await;
    });
    match head_rx.await {
        Ok(resp) => resp,
        Err(_) => proxy::local(StatusCode::BAD_GATEWAY, "bad gateway\n"),
    }
}

struct Call {
    route: Arc<Route>,
    guard: Box<InFlight>,
    head_tx: Option<oneshot::Sender<Response<crate::body::ProxyBody>>>,
}

impl Call {
    async fn run(
        &mut self,
        up_req: Request<crate::body::RequestBody>,
        upload: Arc<crate::body::RequestState>,
        deadline: Option<Instant>,
        lifecycle: Arc<crate::shutdown::Lifecycle>,
    ) {
        let mut timer = deadline_timer(deadline);

        // Until response headers: the upstream call, the timer, a forced shutdown. The
        // client leaving is only noted; it stops nothing.
        let route = self.route.clone();
        let (sent, client_left_at) = {
            let head_closed = async {
                if let Some(tx) = self.head_tx.as_mut() {
                    tx.closed().await;
                }
                Instant::now()
            };
            let mut head_closed = std::pin::pin!(head_closed);
            let mut client_left_at = None;
            let send =
                route
                    .upstream
                    .send(Box::new(up_req), &mut self.guard, deadline, &route.config);
            let mut send = std::pin::pin!(send);
            let r = loop {
                tokio::select! {
                    r = &mut send => break Ok(r),
                    at = fired(&mut timer) => break Err((CancelledBy::Timeout, at)),
                    _ = lifecycle.forced() => break Err((CancelledBy::Shutdown, Instant::now())),
                    at = &mut head_closed, if client_left_at.is_none() => {
                        client_left_at = Some(at);
                        tracing::info!(route = %self.route.config.name,
                            "client left; protected call continues");
                    }
                }
            };
            (r, client_left_at)
        };
        if let Some(at) = client_left_at {
            self.guard.client_left(at);
        }
        let (resp, mut conn) = match sent {
            Ok(Ok(exchange)) => exchange,
            Ok(Err(e)) => {
                let resp = proxy::upstream_failed(&mut self.guard, &upload, e);
                self.answer(resp);
                return;
            }
            Err((by, at)) => {
                let resp = proxy::cancelled(&mut self.guard, by, at);
                self.answer(resp);
                return;
            }
        };

        self.guard.set_phase(Phase::StreamingBody);
        let (mut parts, mut body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, false);
        let status = parts.status.as_u16();
        // One frame: with the one the task waits to send, two reads of the upstream are
        // between it and the client's write gate.
        let (tx, rx) = mpsc::channel(1);
        let (delivered_tx, delivered_rx) = oneshot::channel();
        let client_conn = self.guard.client();
        let gated = (!client_conn.is_h2()).then(|| client_conn.clone());
        let complete = Arc::new(AtomicBool::new(false));
        let client_body = ProtectedBody {
            rx,
            delivered: Some(delivered_tx),
            size_hint: body.size_hint(),
            ended: false,
            gated,
            started: false,
            complete: complete.clone(),
        };
        self.answer(Response::from_parts(
            parts,
            crate::body::ProxyBody::Protected(client_body),
        ));
        let mut client = (!self.guard.has_client_left()).then_some(tx);
        // The route's `idle_timeout` bounds the upstream's silences here as on any route:
        // a stalled upstream is no reason to hold the call until the whole timeout. Only
        // the upstream's gaps count, not the time a slow client takes to read.
        let idle_timeout = self.route.config.idle_timeout;
        let mut idle = std::pin::pin!(tokio::time::sleep(
            idle_timeout.unwrap_or(std::time::Duration::MAX)
        ));

        loop {
            let next = tokio::select! {
                f = poll_fn(|cx| {
                    let _ = conn.poll_drive(cx);
                    Pin::new(&mut body).poll_frame(cx)
                }) => f,
                _ = fired(&mut timer) => {
                    self.stop(Outcome::Timeout, 504, CancelledBy::Timeout, client.take()).await;
                    return;
                }
                _ = &mut idle, if idle_timeout.is_some() => {
                    self.stop(Outcome::Timeout, 504, CancelledBy::Timeout, client.take()).await;
                    self.guard.reason("idle_timeout fired between response chunks");
                    return;
                }
                _ = lifecycle.forced() => {
                    self.stop(Outcome::Shutdown, 503, CancelledBy::Shutdown, client.take()).await;
                    return;
                }
            };
            match next {
                Some(Ok(frame)) => {
                    let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                    let last = body.is_end_stream();
                    let item = Item {
                        frame: Ok(frame),
                        last,
                    };
                    let delivered = match &client {
                        Some(tx) => tokio::select! {
                            r = tx.send(item) => r.is_ok(),
                            // A client behind on its download may still be uploading: the
                            // rest of its upload goes on out meanwhile (as in `body.rs`).
                            () = poll_fn(|cx| {
                                if self.guard.uploading() {
                                    let _ = conn.poll_drive(cx);
                                }
                                Poll::Pending
                            }) => unreachable!("never ready"),
                            _ = fired(&mut timer) => {
                                self.stop(Outcome::Timeout, 504, CancelledBy::Timeout, client.take()).await;
                                return;
                            }
                        },
                        None => false,
                    };
                    // The upstream's silence counts from here: the wait for a slow client
                    // to take the frame is not part of it.
                    if let Some(d) = idle_timeout {
                        idle.as_mut().reset(tokio::time::Instant::now() + d);
                    }
                    if delivered {
                        self.guard.add_bytes_out(n);
                    } else {
                        if client.take().is_some() {
                            self.guard.client_left(Instant::now());
                        }
                        self.guard.add_discarded(n);
                    }
                    if last {
                        self.finish(conn, client, &complete, delivered_rx, &mut timer, status)
                            .await;
                        return;
                    }
                }
                Some(Err(e)) => {
                    self.guard.decide(Outcome::UpstreamError, 502, None);
                    self.guard
                        .reason(format!("upstream response body failed: {e}"));
                    // Not waited for: a client that is not reading would hold the call
                    // (the channel closing unfinished ends its body in an error anyway).
                    if let Some(tx) = client.take() {
                        let _ = tx.try_send(Item {
                            frame: Err(Box::new(e)),
                            last: true,
                        });
                    }
                    return;
                }
                None => {
                    self.finish(conn, client, &complete, delivered_rx, &mut timer, status)
                        .await;
                    return;
                }
            }
        }
    }

    /// The upstream's response is complete: the call is `ok` once the client has taken
    /// the last frame, otherwise it completed for nobody (protected).
    async fn finish(
        &mut self,
        mut conn: crate::upstream::Conn,
        client: Option<mpsc::Sender<Item>>,
        complete: &AtomicBool,
        delivered_rx: oneshot::Receiver<()>,
        timer: &mut DeadlineTimer,
        status: u16,
    ) {
        let now = self.guard.upstream_completed();
        conn.exchanged(now, self.guard.upload_finished());
        drop(conn);
        let still_there = client.is_some();
        complete.store(true, Ordering::Release);
        drop(client);
        let delivered = still_there
            && tokio::select! {
                r = delivered_rx => r.is_ok(),
                _ = fired(timer) => false,
            };
        if delivered {
            self.guard.decide(Outcome::Ok, status, None);
        } else {
            self.guard.client_left(Instant::now());
        }
    }

    fn answer(&mut self, resp: Response<crate::body::ProxyBody>) {
        if let Some(tx) = self.head_tx.take()
            && tx.send(resp).is_err()
        {
            self.guard.client_left(Instant::now());
        }
    }

    /// The timer or a shutdown ends the call mid-body: the upstream is closed (the caller
    /// drops the connection on return) and the client's stream is aborted.
    async fn stop(
        &mut self,
        outcome: Outcome,
        status: u16,
        by: CancelledBy,
        client: Option<mpsc::Sender<Item>>,
    ) {
        self.guard.decide(outcome, status, Some(by));
        if let Some(tx) = client {
            let _ = tx.try_send(Item {
                frame: Err(Box::new(StreamTimeout("protected call stopped"))),
                last: true,
            });
        }
    }
}
