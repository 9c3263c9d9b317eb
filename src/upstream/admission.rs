//! The optional admission queue of an upstream (`max_inflight`, `max_queue`,
//! `queue_timeout`).
//!
//! A semaphore hands out `max_inflight` slots in FIFO order. A waiter whose client leaves
//! is a dropped `acquire` future, which tokio removes from the wait list at once: a call
//! whose client is gone is never dispatched, and the guard records it as cancelled in
//! phase `queued`, its whole typical duration saved.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::UpstreamError;
use crate::config::UpstreamConfig;
use crate::metrics::QueueMetrics;
use crate::outcome::{InFlight, Phase};

pub(super) struct Admission {
    slots: Option<Arc<Semaphore>>,
    max_queue: usize,
    queue_timeout: Duration,
    queued: Arc<AtomicUsize>,
    metrics: Arc<QueueMetrics>,
}

impl Admission {
    pub(super) fn new(config: &UpstreamConfig) -> Admission {
        Admission {
            slots: config.max_inflight.map(|n| Arc::new(Semaphore::new(n))),
            max_queue: config.max_queue,
            queue_timeout: config.queue_timeout,
            queued: Arc::new(AtomicUsize::new(0)),
            metrics: Arc::new(QueueMetrics::register(&config.name)),
        }
    }

    /// A slot, held until the call ends; `None` when the upstream has no limit.
    pub(super) async fn admit(
        &self,
        guard: &mut InFlight,
    ) -> Result<Option<OwnedSemaphorePermit>, UpstreamError> {
        let Some(slots) = &self.slots else {
            return Ok(None);
        };
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        let queued = self.queued.fetch_add(1, Ordering::AcqRel);
        if queued >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(UpstreamError::QueueFull {
                queued,
                max: self.max_queue,
            });
        }
        self.metrics.length.increment(1.0);
        let _leave = Dequeue {
            queued: &self.queued,
            metrics: &self.metrics,
            started: Instant::now(),
        };
        guard.set_phase(Phase::Queued);
        match tokio::time::timeout(self.queue_timeout, slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Some(p)),
            // The semaphore is never closed; were it, waiting longer would not help.
            Ok(Err(_)) | Err(_) => Err(UpstreamError::QueueTimeout(self.queue_timeout)),
        }
    }
}

/// Leaves the queue however the wait ends: admitted, timed out, or dropped because the
/// client left. Every wait is measured, including the abandoned ones.
struct Dequeue<'a> {
    queued: &'a AtomicUsize,
    metrics: &'a QueueMetrics,
    started: Instant,
}

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.metrics.length.decrement(1.0);
        self.metrics
            .wait
            .record(self.started.elapsed().as_secs_f64());
    }
}
