//! Backpressure from a slow HTTP/1 client to its upstream, ahead of hyper's write queue.
//!
//! hyper queues a response's body chunks for the client until the queue holds 16 of them
//! or `max_buf_size` bytes (64 KiB by default), and polls the body for more while there
//! is room. For a client that reads slower than its upstream sends (a phone on a weak
//! network, a paused download), that queue fills and stays full: measured, 94 KiB of
//! memory per stalled download (49 in another run), against 12 for nginx, which reads
//! from the upstream only what it can write. The kernel's socket buffer already holds
//! what the client has not read yet; a second buffer in the proxy adds memory, not speed.
//!
//! So the response body hands hyper no more than [`AHEAD`] bytes beyond what the client's
//! socket has taken: [`WriteGate`] counts the bytes the body handed over and the bytes
//! written to the client, and a body that is ahead waits, to be woken by the write that
//! brings it back within bounds. Until then the upstream's bytes stay in the kernel, and
//! TCP slows the upstream down. Counting only at the gate is enough because hyper pulls
//! chunks from the body before it flushes any: a gate that closed only when a write
//! blocked would close with hyper's queue already full.
//!
//! A write that finds the client's socket full narrows the gate to nothing: the body then
//! waits until hyper has written all it holds, and only then hands it more. A client that
//! has stopped reading is thus left holding the tail of one batch, not a batch and a
//! half: on average 4.4 KiB less per stalled download, 10 % (48.7 → 44.4 KiB, release
//! build, four alternating runs of 200). A client that keeps up pays nothing to measure:
//! its socket fills 34 to 106 times per GiB, against 44 000 writes, and each time costs
//! one more write, of that tail alone.
//!
//! HTTP/1 clients only: an HTTP/2 connection carries many streams, each held by hyper's
//! send buffer for it instead, which `server.rs` limits to [`AHEAD`] too (hyper's 400 KiB
//! let a client that grants a large window and reads nothing pin 512 KiB per stream). Over TLS the count is of what rustls took, so rustls's
//! own buffer of records is limited to [`AHEAD`] too (`server.rs`). A protected route's
//! body (`protected.rs`) is gated the same way; its frames wait in the channel from the
//! task that reads the upstream, one at a time.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

/// How far a response body may be ahead of the client's socket. A read from an HTTP/1
/// upstream is at most 8 KiB (see `read_cap.rs`), so hyper holds at most about 24 KiB of
/// a response (an HTTP/2 upstream's frames are up to 16 KiB: 32 KiB; its connection
/// reads on into the stream's window, which bounds that side instead). When the client
/// keeps up, the body waits once per 16 to 24 KiB, for the flush that follows.
///
/// Measured and not taken (2026-12-07, 200 stalled downloads, six alternating 1 GiB
/// downloads per build, while a stalled download held 55 KiB): 8 KiB took it to 47 KiB,
/// at 15 % more CPU per GiB downloaded (0.73 → 0.84 s: half the batch per write). The
/// same 8 KiB then came for nothing from `body.rs`: a body behind its client no longer
/// drives the upstream connection once the upload is over, which had let hyper read one
/// more chunk for a client that was not reading. Holding the body back once a write found
/// the socket full was measured then at 9 % more CPU (0.68 → 0.74 s) and not taken; on
/// 2026-12-08 a count of the writes showed that cost to be noise (the module's doc), and
/// it is in.
pub const AHEAD: usize = 16 * 1024;

#[derive(Default)]
pub struct WriteGate {
    /// Body bytes handed to hyper and not yet written to the client, as far as the count
    /// can tell: every byte written counts (heads and chunk sizes too), so it errs
    /// towards zero.
    queued: AtomicUsize,
    /// A write found the client's socket full while body bytes were queued: until hyper's
    /// queue is empty again, the body waits, whatever [`AHEAD`] allows.
    full: AtomicBool,
    /// The response body waiting for room.
    waiting: Mutex<Option<Waker>>,
}

impl WriteGate {
    /// A response body handed hyper `n` bytes. (Only the connection's own task counts,
    /// so a load and a store do: no read-modify-write.)
    #[inline]
    pub fn handed(&self, n: usize) {
        let queued = self.queued.load(Ordering::Relaxed);
        self.queued.store(queued + n, Ordering::Relaxed);
    }

    /// A new response starts: whatever the count says of the last one is forgotten. If
    /// hyper dropped bytes of it unwritten (a body longer than the length it was framed
    /// by), they would otherwise count against every later response of the connection.
    /// What is forgotten of a tail still queued errs towards zero.
    pub fn restart(&self) {
        self.queued.store(0, Ordering::Relaxed);
        self.full.store(false, Ordering::Relaxed);
    }

    /// How far ahead of the socket the body may be now.
    #[inline]
    fn limit(&self) -> usize {
        if self.full.load(Ordering::Relaxed) {
            0
        } else {
            AHEAD
        }
    }

    /// Takes note of a write to the client.
    #[inline]
    pub fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        let queued = self.queued.load(Ordering::Relaxed);
        if queued == 0 {
            return;
        }
        let left = match polled {
            Poll::Ready(Ok(n)) => queued.saturating_sub(*n),
            // The socket is full: whatever is queued is what a client that stopped
            // reading will be left holding, so nothing is added to it.
            Poll::Pending => {
                self.full.store(true, Ordering::Relaxed);
                return;
            }
            // The connection is ending: whoever waits must get to see it.
            Poll::Ready(Err(_)) => 0,
        };
        self.queued.store(left, Ordering::Relaxed);
        let limit = self.limit();
        if left == 0 {
            self.full.store(false, Ordering::Relaxed);
        }
        if queued > limit && left <= limit {
            let waiting = self
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(w) = waiting {
                w.wake();
            }
        }
    }

    /// The body is further ahead than the gate allows: the client is not taking what it
    /// is sent.
    pub fn is_behind(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > self.limit()
    }

    /// Ready while the body is within [`AHEAD`] of the client's socket (and, after a write
    /// found the socket full, once hyper's queue is empty); otherwise `cx` is woken when
    /// it is again.
    #[inline]
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.queued.load(Ordering::Relaxed) <= self.limit() {
            return Poll::Ready(());
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match waiting.as_mut() {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waiting = Some(cx.waker().clone()),
        }
        // Looked at again under the lock, which a write that makes room takes after it.
        if self.queued.load(Ordering::Relaxed) > self.limit() {
            Poll::Pending
        } else {
            waiting.take();
            Poll::Ready(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    #[test]
    fn a_body_ahead_of_the_socket_waits_for_the_write_that_makes_room() {
        let gate = WriteGate::default();
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        gate.handed(AHEAD);
        assert!(gate.poll_room(&mut cx).is_ready());
        gate.handed(8000);
        assert!(gate.poll_room(&mut cx).is_pending());
        gate.wrote(&Poll::Ready(Ok(1000)));
        assert!(gate.poll_room(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        gate.wrote(&Poll::Ready(Ok(7000)));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the body is woken");
        assert!(gate.poll_room(&mut cx).is_ready());
        // Heads and chunk sizes count as written too: the count stops at zero.
        gate.wrote(&Poll::Ready(Ok(10 * AHEAD)));
        gate.handed(AHEAD);
        assert!(gate.poll_room(&mut cx).is_ready());
    }

    #[test]
    fn a_full_socket_holds_the_body_back_until_the_queue_is_empty() {
        let gate = WriteGate::default();
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        gate.handed(8000);
        // A write the socket took part of, then one that found it full.
        gate.wrote(&Poll::Ready(Ok(3000)));
        assert!(
            gate.poll_room(&mut cx).is_ready(),
            "within AHEAD, the socket not full"
        );
        gate.wrote(&Poll::Pending);
        assert!(
            gate.poll_room(&mut cx).is_pending(),
            "5000 queued, the socket full"
        );
        assert!(gate.is_behind());
        gate.wrote(&Poll::Ready(Ok(4000)));
        assert!(gate.poll_room(&mut cx).is_pending(), "1000 still queued");
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        gate.wrote(&Poll::Ready(Ok(1000)));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the body is woken");
        // Empty again: back to AHEAD.
        gate.handed(AHEAD);
        assert!(gate.poll_room(&mut cx).is_ready());
        // A socket found full with nothing of the body queued narrows nothing.
        gate.restart();
        gate.wrote(&Poll::Pending);
        gate.handed(AHEAD);
        assert!(gate.poll_room(&mut cx).is_ready());
        // A new response forgets the last one's full socket.
        gate.wrote(&Poll::Pending);
        assert!(gate.poll_room(&mut cx).is_pending());
        gate.restart();
        gate.handed(8000);
        assert!(gate.poll_room(&mut cx).is_ready());
    }

    #[test]
    fn a_failed_write_lets_the_body_go_on() {
        let gate = WriteGate::default();
        let mut cx = Context::from_waker(Waker::noop());
        gate.handed(2 * AHEAD);
        assert!(gate.poll_room(&mut cx).is_pending());
        gate.wrote(&Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())));
        assert!(gate.poll_room(&mut cx).is_ready());
    }
}
