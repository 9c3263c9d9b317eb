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

use std::sync::{Arc, Mutex};

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;

use super::UpstreamError;
use super::endpoint::{Endpoint, UpstreamIo};
use crate::body::RequestBody;

type Sender = SendRequest<RequestBody>;
/// What set-up produced: a sender, or (status, reason) of its failure.
type SetUp = Option<Result<Sender, (u16, String)>>;

#[derive(Default)]
pub struct H2Pool {
    state: Mutex<State>,
}

#[derive(Default)]
enum State {
    #[default]
    Empty,
    Connecting(watch::Receiver<SetUp>),
    Ready(Sender),
}

impl H2Pool {
    /// A sender on the endpoint's connection, opening one if there is none.
    pub(super) async fn sender(&self, endpoint: &Arc<Endpoint>) -> Result<Sender, UpstreamError> {
        let mut rx = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match &*state {
                State::Ready(s) if !s.is_closed() => return Ok(s.clone()),
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
    ) -> Result<Sender, UpstreamError> {
        let sender = handshake(io)
            .await
            .map_err(|(status, reason)| UpstreamError::H2 { status, reason })?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(&*state, State::Ready(s) if !s.is_closed()) {
            *state = State::Ready(sender.clone());
        }
        let _ = endpoint;
        Ok(sender)
    }

    fn settle(&self, result: &Result<Sender, (u16, String)>) {
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

async fn handshake(io: UpstreamIo) -> Result<Sender, (u16, String)> {
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, RequestBody>(TokioIo::new(io))
        .await
        .map_err(|e| (502, format!("HTTP/2 handshake failed: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}
