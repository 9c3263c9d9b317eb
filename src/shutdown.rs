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
//!
//! Client connections do not wait on the tokens themselves: one task of each worker does,
//! and tells that worker's connections ([`relay_to_this_worker`], [`Seat`]).

use std::cell::RefCell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
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
}

/// How far the shutdown has gone, as one worker has told its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Stage {
    #[default]
    Serving,
    Draining,
    Forced,
}

thread_local! {
    /// This worker's stage and the wakers of the connection tasks waiting for the next.
    static BOARD: RefCell<Board> = RefCell::new(Board::default());
    /// Which thread's board this is: a number no other thread gets (an address could be
    /// reused by a later thread).
    static BOARD_ID: usize = NEXT_BOARD.fetch_add(1, Ordering::Relaxed);
}

static NEXT_BOARD: AtomicUsize = AtomicUsize::new(1);

/// The shutdown as one worker's connections see it.
///
/// Each connection task used to wait on the process's two tokens itself. Each wait is a
/// place on the token's waiter list, joined and left under a lock: about 700 instructions
/// for every connection. But a worker's connections all run on its thread. So one task
/// of the worker waits on the tokens ([`relay_to_this_worker`]) and wakes them, and a
/// connection only looks at a value of its thread.
#[derive(Default)]
struct Board {
    stage: Stage,
    waiting: slab::Slab<Waker>,
}

/// Waits on the process's tokens and tells this worker's connections of each step. To
/// be spawned once on each worker's runtime, which must run its tasks on its own thread
/// (a current-thread runtime): the board is that thread's.
pub async fn relay_to_this_worker(lifecycle: std::sync::Arc<Lifecycle>) {
    // A board left at the end by an earlier run on this thread, with nobody seated.
    BOARD.with(|b| {
        let mut b = b.borrow_mut();
        if b.waiting.is_empty() {
            b.stage = Stage::Serving;
        }
    });
    lifecycle.draining().await;
    tell_this_worker(Stage::Draining);
    lifecycle.forced().await;
    tell_this_worker(Stage::Forced);
}

/// Moves this worker to `stage` (never back) and wakes every connection task waiting
/// for it.
fn tell_this_worker(stage: Stage) {
    let wake: Vec<Waker> = BOARD.with(|b| {
        let mut b = b.borrow_mut();
        if b.stage >= stage {
            return Vec::new();
        }
        b.stage = stage;
        b.waiting.iter().map(|(_, w)| w.clone()).collect()
    });
    // Outside the borrow: a waker is free to do anything, even look at the board.
    for w in wake {
        w.wake();
    }
}

/// A connection task's place on its worker's [`Board`], given up when dropped.
///
/// Polled and dropped on the worker that runs the task. A task is `Send`, so the seat
/// must be too; a seat polled or dropped on another thread (which the current-thread
/// workers never do) leaves its place alone rather than touch another connection's.
/// Wakers replaced or removed are dropped outside the board's borrow: dropping a waker
/// may free a task, and with it a seat that looks at the board.
pub struct Seat {
    key: Option<usize>,
    /// Which thread's board the place is on, once taken.
    board: usize,
}

impl Seat {
    pub fn new() -> Seat {
        Seat {
            key: None,
            board: 0,
        }
    }

    /// Ready with this worker's stage once it is past `known`; until then the task is
    /// woken when the worker moves on.
    pub fn poll_past(&mut self, cx: &mut Context<'_>, known: Stage) -> Poll<Stage> {
        let here = board_id();
        let (poll, _replaced) = BOARD.with(|b| {
            let mut b = b.borrow_mut();
            if b.stage > known {
                return (Poll::Ready(b.stage), None);
            }
            let replaced = match self.key {
                Some(key) if self.board == here => match b.waiting.get_mut(key) {
                    Some(w) if !w.will_wake(cx.waker()) => {
                        Some(std::mem::replace(w, cx.waker().clone()))
                    }
                    _ => None,
                },
                // Polled on another thread than the one it first waited on: its place
                // stays there.
                Some(_) => None,
                None => {
                    self.key = Some(b.waiting.insert(cx.waker().clone()));
                    self.board = here;
                    None
                }
            };
            (Poll::Pending, replaced)
        });
        poll
    }
}

impl Default for Seat {
    fn default() -> Seat {
        Seat::new()
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        if self.board != board_id() {
            return;
        }
        let _removed: Option<Waker> = BOARD
            .try_with(|b| b.try_borrow_mut().ok()?.waiting.try_remove(key))
            .ok()
            .flatten();
    }
}

fn board_id() -> usize {
    BOARD_ID.try_with(|id| *id).unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn waiting() -> usize {
        BOARD.with(|b| b.borrow().waiting.len())
    }

    /// Each cargo test runs on a thread of its own, so each starts with a fresh board.
    #[test]
    fn a_worker_wakes_its_waiting_connections_once_per_stage() {
        let counts: Vec<Arc<Count>> = (0..3).map(|_| Arc::default()).collect();
        let wakers: Vec<Waker> = counts.iter().map(|c| Waker::from(c.clone())).collect();
        let mut seats: Vec<Seat> = (0..3).map(|_| Seat::new()).collect();
        for (seat, w) in seats.iter_mut().zip(&wakers) {
            let cx = &mut Context::from_waker(w);
            assert!(seat.poll_past(cx, Stage::Serving).is_pending());
            // Polled again with the same waker: still one place.
            assert!(seat.poll_past(cx, Stage::Serving).is_pending());
        }
        assert_eq!(waiting(), 3);
        // A connection that ended gives its place up, and is not woken.
        drop(seats.pop());
        assert_eq!(waiting(), 2);

        tell_this_worker(Stage::Draining);
        let woken = |c: &Arc<Count>| c.0.load(Ordering::Relaxed);
        assert_eq!(counts.iter().map(woken).collect::<Vec<_>>(), [1, 1, 0]);
        // Telling the same stage again wakes nobody.
        tell_this_worker(Stage::Draining);
        assert_eq!(counts.iter().map(woken).collect::<Vec<_>>(), [1, 1, 0]);

        let cx = &mut Context::from_waker(&wakers[0]);
        assert_eq!(
            seats[0].poll_past(cx, Stage::Serving),
            Poll::Ready(Stage::Draining)
        );
        assert!(seats[0].poll_past(cx, Stage::Draining).is_pending());
        tell_this_worker(Stage::Forced);
        assert_eq!(
            seats[0].poll_past(cx, Stage::Draining),
            Poll::Ready(Stage::Forced)
        );
        // Never back.
        tell_this_worker(Stage::Draining);
        assert_eq!(
            seats[1].poll_past(cx, Stage::Serving),
            Poll::Ready(Stage::Forced)
        );
        drop(seats);
        assert_eq!(waiting(), 0);
    }

    /// A seat first polled after the worker moved on is ready at once and takes no place.
    #[test]
    fn a_connection_opened_after_the_drain_sees_it_at_once() {
        tell_this_worker(Stage::Draining);
        let mut seat = Seat::new();
        let cx = &mut Context::from_waker(Waker::noop());
        assert_eq!(
            seat.poll_past(cx, Stage::Serving),
            Poll::Ready(Stage::Draining)
        );
        assert!(seat.poll_past(cx, Stage::Draining).is_pending());
        assert_eq!(waiting(), 1);
        drop(seat);
        assert_eq!(waiting(), 0);
    }

    /// Boards are per thread: another worker's drain wakes nobody here.
    #[test]
    fn another_workers_drain_is_not_this_ones() {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut seat = Seat::new();
        assert!(
            seat.poll_past(&mut Context::from_waker(&waker), Stage::Serving)
                .is_pending()
        );
        std::thread::spawn(|| tell_this_worker(Stage::Forced))
            .join()
            .expect("the other worker");
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        assert!(
            seat.poll_past(&mut Context::from_waker(&waker), Stage::Serving)
                .is_pending()
        );
    }
}
