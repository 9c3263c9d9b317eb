//! A route's deadline, kept to within tens of microseconds instead of milliseconds.
//!
//! tokio's timers tick in whole milliseconds, a deadline rounded up to the next tick, and
//! a worker with nothing to do sleeps in `epoll_wait` for whole milliseconds, rounded up
//! again. So a tokio sleep fires up to about 2 ms late: measured on the timeout benchmark,
//! cutoff's 504s left 1.4 ms late at the median and 2.3 ms at p99 (nginx: 0.5 and 1.2).
//! A route's `timeout` is a promise to the client and to the upstream, so the last stretch
//! before it is timed by the kernel instead. tokio wakes the request [`LEAD`] early, and
//! a `timerfd` set for what is left finishes the wait: the kernel's high-resolution timers
//! are not rounded, and the worker wakes the moment the descriptor turns readable.
//!
//! Only a request still running [`LEAD`] before its deadline pays for this: five system
//! calls (create, set, register, deregister, close) and one descriptor, given back when
//! the deadline fires and is polled, or when the request ends: for [`LEAD`], unless the
//! request is no longer polled (an HTTP/2 stream whose client stopped reading keeps it
//! until the stream ends). Every other request stays in tokio's timer wheel alone, as
//! before. At most [`MAX_FINE`] descriptors are armed at once in the process; past that (a
//! burst of requests all timing out together, or many such streams), or if the kernel
//! refuses one (no descriptors left), a deadline falls back to tokio's timer: late by a
//! millisecond or two, never early, never lost.

use std::os::fd::{FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Sleep;

/// How long before the deadline tokio hands over to the kernel's timer. Longer than
/// tokio's lateness (up to ~2 ms, see above), so that the hand-over happens before the
/// deadline on a machine that is not overloaded.
pub const LEAD: Duration = Duration::from_millis(3);

/// The most `timerfd`s armed at once, process-wide: a bound on the descriptors this takes.
pub const MAX_FINE: usize = 1024;

static ARMED: AtomicUsize = AtomicUsize::new(0);

/// A deadline that fires at its instant, not up to 2 ms after it.
pub struct Deadline {
    /// Set for [`LEAD`] before the deadline while `Stage::Early`, for the deadline itself
    /// once `Stage::Coarse`.
    sleep: Pin<Box<Sleep>>,
    stage: Stage,
}

enum Stage {
    /// In tokio's wheel, until [`LEAD`] before the deadline.
    Early,
    /// The last stretch, in the kernel's timer.
    Fine(Box<Fine>),
    /// In tokio's wheel until the deadline itself: no `timerfd` could be had.
    Coarse,
    /// Fired, the sleep still set where it was (`LEAD` or nothing before the deadline);
    /// the `timerfd`, if any, is closed.
    Fired(Duration),
}

impl Deadline {
    pub fn new(at: Instant) -> Deadline {
        // A deadline less than LEAD away starts in the past, and the first poll hands over.
        match at.checked_sub(LEAD) {
            Some(early) => Deadline {
                sleep: Box::pin(tokio::time::sleep_until(early.into())),
                stage: Stage::Early,
            },
            // Within LEAD of the clock's start (the machine's boot): tokio's timer alone.
            None => Deadline {
                sleep: Box::pin(tokio::time::sleep_until(at.into())),
                stage: Stage::Coarse,
            },
        }
    }

    /// The deadline itself.
    pub fn at(&self) -> Instant {
        let set = self.sleep.deadline().into_std();
        match self.stage {
            Stage::Early | Stage::Fine(_) => set + LEAD,
            Stage::Coarse => set,
            Stage::Fired(offset) => set + offset,
        }
    }

    /// Ready once the deadline has passed, and on every poll after that.
    pub fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.stage {
                Stage::Early => {
                    ready!(self.sleep.as_mut().poll(cx));
                    let at = self.at();
                    let Some(left) = at.checked_duration_since(Instant::now()) else {
                        self.fire();
                        return Poll::Ready(());
                    };
                    self.stage = match Fine::arm(at, left) {
                        Some(fine) => Stage::Fine(Box::new(fine)),
                        None => {
                            self.sleep.as_mut().reset(at.into());
                            Stage::Coarse
                        }
                    };
                }
                Stage::Fine(fine) => match ready!(fine.fd.poll_read_ready(cx)) {
                    // The timer was set after `left` was measured, so it cannot expire
                    // before the deadline; the clock is read anyway, because tokio allows
                    // a readiness that is not real, and firing early is the one thing a
                    // deadline must never do.
                    Ok(mut ready) => {
                        if Instant::now() >= fine.at {
                            self.fire();
                            return Poll::Ready(());
                        }
                        ready.clear_ready();
                    }
                    // Only while the runtime shuts down, which drops every task first, and
                    // whose timer is already gone (polling it would panic): wait no more.
                    Err(_) => return Poll::Pending,
                },
                Stage::Coarse => {
                    ready!(self.sleep.as_mut().poll(cx));
                    self.stage = Stage::Fired(Duration::ZERO);
                    return Poll::Ready(());
                }
                Stage::Fired(_) => return Poll::Ready(()),
            }
        }
    }

    /// Marks the deadline passed (from `Early` or `Fine`), closing the `timerfd` now
    /// rather than with the request.
    fn fire(&mut self) {
        self.stage = Stage::Fired(LEAD);
    }
}

/// One armed `timerfd`, the deadline it stands for, and its place under [`MAX_FINE`].
struct Fine {
    fd: AsyncFd<OwnedFd>,
    at: Instant,
    _permit: Permit,
}

impl Fine {
    /// A `timerfd` readable once `left` has passed, `left` being what remains until `at`;
    /// `None` if none can be had.
    fn arm(at: Instant, left: Duration) -> Option<Fine> {
        let permit = Permit::take()?;
        // SAFETY: timerfd_create has no memory-safety preconditions; the result is checked.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: left.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                // An all-zero value would disarm the timer instead of firing it now.
                tv_nsec: left.subsec_nanos().max(1).into(),
            },
        };
        // SAFETY: `fd` is a timerfd; `spec` is a valid itimerspec; the old value is not
        // asked for.
        let set = unsafe {
            libc::timerfd_settime(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if set < 0 {
            return None;
        }
        // SAFETY: the `OwnedFd` keeps the descriptor open, and the same, until the
        // `AsyncFd` that owns it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()?;
        Some(Fine {
            fd,
            at,
            _permit: permit,
        })
    }
}

/// A unit of [`ARMED`], given back when dropped.
struct Permit;

impl Permit {
    fn take() -> Option<Permit> {
        ARMED
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_FINE).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        ARMED.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permits are the process's: tests that arm or take them must not overlap when
    /// `cargo test` runs them as threads of one process.
    static PERMITS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn wait(d: &mut Deadline) -> Instant {
        std::future::poll_fn(|cx| d.poll_fired(cx)).await;
        Instant::now()
    }

    /// Never before the deadline, in the kernel's timer and in tokio's, and `at` is the
    /// deadline whatever the stage.
    #[tokio::test]
    async fn fires_at_its_deadline_never_before() {
        let _alone = PERMITS.lock().await;
        for wait_for in [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_millis(20),
        ] {
            let at = Instant::now() + wait_for;
            let mut d = Deadline::new(at);
            assert_eq!(d.at(), at);
            let fired = tokio::time::timeout(Duration::from_secs(10), wait(&mut d))
                .await
                .expect("the deadline fired");
            assert!(fired >= at, "fired {:?} early", at - fired);
            assert_eq!(d.at(), at);
            assert!(matches!(d.stage, Stage::Fired(_)));
            // Stays fired.
            assert!(
                d.poll_fired(&mut Context::from_waker(std::task::Waker::noop()))
                    .is_ready()
            );
        }
    }

    /// With every permit taken, a deadline falls back to tokio's timer and still fires,
    /// not early.
    #[tokio::test]
    async fn without_a_timerfd_falls_back_to_tokio() {
        let _alone = PERMITS.lock().await;
        let at = Instant::now() + Duration::from_millis(10);
        let mut d = Deadline::new(at);
        // Runs the early stage by hand, with no permit to be had.
        let held: Vec<Permit> = std::iter::from_fn(Permit::take).collect();
        tokio::time::sleep_until((at - LEAD).into()).await;
        let pending = d.poll_fired(&mut Context::from_waker(std::task::Waker::noop()));
        if pending.is_pending() {
            assert!(matches!(d.stage, Stage::Coarse));
        }
        drop(held);
        let fired = tokio::time::timeout(Duration::from_secs(10), wait(&mut d))
            .await
            .expect("the deadline fired");
        assert!(fired >= at);
        assert_eq!(d.at(), at);
    }

    /// Every permit comes back: deadlines dropped while armed, and deadlines fired.
    #[tokio::test]
    async fn permits_come_back() {
        let _alone = PERMITS.lock().await;
        let before = ARMED.load(Ordering::Relaxed);
        let noop = &mut Context::from_waker(std::task::Waker::noop());
        // Within LEAD: the first poll arms the timerfd.
        let mut armed: Vec<Deadline> = (0..50)
            .map(|_| Deadline::new(Instant::now() + Duration::from_millis(2)))
            .collect();
        for d in &mut armed {
            let _ = d.poll_fired(noop);
        }
        let fine = armed
            .iter()
            .filter(|d| matches!(d.stage, Stage::Fine(_)))
            .count();
        assert!(fine > 0, "no deadline was handed to a timerfd");
        assert_eq!(ARMED.load(Ordering::Relaxed), before + fine);
        let (fire, drop_armed) = armed.split_at_mut(25);
        for d in fire.iter_mut() {
            tokio::time::timeout(Duration::from_secs(10), wait(d))
                .await
                .expect("the deadline fired");
        }
        let left = drop_armed.len();
        assert!(ARMED.load(Ordering::Relaxed) <= before + left);
        drop(armed);
        assert_eq!(ARMED.load(Ordering::Relaxed), before);
    }
}
