//! Signals, drain, and the cancellation of what is left after the grace.
//!
//! Shutdown has two steps, each a [`CancellationToken`] so that any number of tasks can
//! wait on it without polling:
//!
//! 1. *drain* (first SIGTERM or SIGINT): stop accepting, `/readyz` turns 503, idle
//!    keep-alive connections are closed, in-flight requests may finish;
//! 2. *force* (the grace ran out, or a second signal): requests still waiting for response
//!    headers answer 503, every other connection task is dropped, which closes its
//!    upstream connections. Guards dropped after this point record `shutdown`, because
//!    they ask [`Lifecycle::is_forced`] who cancelled them.

use std::sync::OnceLock;
use std::time::Instant;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Where the process is in its life: serving, draining, or forcing the end.
#[derive(Default)]
pub struct Lifecycle {
    drain: CancellationToken,
    force: CancellationToken,
    forced_at: OnceLock<Instant>,
}

impl Lifecycle {
    pub fn start_drain(&self) {
        self.drain.cancel();
    }

    pub fn force(&self) {
        let _ = self.forced_at.set(Instant::now());
        self.drain.cancel();
        self.force.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Asked by every request's wait for its response headers, at each poll (see
    /// `proxy::ForcedEnd`), and by every guard: one atomic load, where the token's own
    /// `is_cancelled` takes its lock. `forced_at` is set before the token is cancelled, so
    /// whatever the cancellation wakes sees it.
    pub fn is_forced(&self) -> bool {
        self.forced_at.get().is_some()
    }

    pub fn forced_at(&self) -> Option<Instant> {
        self.forced_at.get().copied()
    }

    pub fn draining(&self) -> WaitForCancellationFuture<'_> {
        self.drain.cancelled()
    }

    pub fn forced(&self) -> WaitForCancellationFuture<'_> {
        self.force.cancelled()
    }

    pub fn force_token(&self) -> &CancellationToken {
        &self.force
    }
}

/// The process's signal streams, registered before the listeners are bound: a signal that
/// arrives as soon as the proxy says "listening" must find its handler, not the default
/// action (which would kill the process).
pub struct Signals {
    term: Signal,
    int: Signal,
    /// SIGHUP, handed to the reload watcher.
    pub hup: Option<Signal>,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: Some(signal(SignalKind::hangup())?),
        })
    }

    /// Resolves at the first SIGTERM or SIGINT by starting the drain, and forces at the
    /// second: an operator who signals twice wants the process gone now.
    pub async fn drive(mut self, lifecycle: std::sync::Arc<Lifecycle>) {
        let mut first = true;
        loop {
            let name = tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            };
            if first {
                tracing::info!(
                    signal = name,
                    "draining: no new connections; in-flight requests may finish"
                );
                lifecycle.start_drain();
                first = false;
            } else {
                tracing::warn!(
                    signal = name,
                    "second signal: cancelling everything still in flight"
                );
                lifecycle.force();
                return;
            }
        }
    }
}
