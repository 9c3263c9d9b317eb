//! Noticing that a client hung up, without reading its socket, and acting at once.
//!
//! hyper learns that a client left only when it reads: a client that closes while its
//! request waits for the upstream is noticed late or never if unread bytes (a pipelined
//! request, the rest of an upload) sit in front of the FIN. The kernel knows at once: a
//! socket whose peer sent FIN or RST reports `EPOLLRDHUP`/`EPOLLHUP` whatever data is
//! queued. So every client socket is registered, for hang-ups only (`EPOLLRDHUP`,
//! one-shot), in one epoll set of the process, separate from tokio's. Request bytes do not
//! match that interest: they wake nothing, so the watch costs nothing per request, only an
//! `epoll_ctl` when a connection opens and one when it closes, and no extra descriptor.
//!
//! One thread of its own waits on that set. When a client hangs up it runs the
//! connection's [`OnHangup`] right there, which drops the connection and with it every
//! request and upstream call. It does not wait for the connection's task to be polled: on
//! a worker busy with other connections (say, forwarding uploads) that task may sit behind
//! hundreds of others in the run queue, and every millisecond there is upstream work
//! nobody will use. Nor does it wait for a poll of that connection under way: the task
//! then drops the connection itself when its poll ends, and the poll ends sooner because
//! [`Hook::stop_reads`] makes the client socket read as closed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether the hang-up thread asks for real-time priority (`[server] hangup_realtime`).
static REALTIME: AtomicBool = AtomicBool::new(true);

/// Sets whether the hang-up thread asks for real-time priority. Read when the thread
/// starts, with the first connection: the value the process started with.
pub fn set_realtime(on: bool) {
    REALTIME.store(on, Ordering::Relaxed);
}

/// What a connection does when its client hangs up. Runs on the hang-up thread, so it
/// must be quick: it never waits for the connection's task, to be scheduled or to finish
/// a poll.
pub trait OnHangup: Send + Sync {
    fn hung_up(&self);
}

/// The process's hang-up set and who is registered in it.
struct Registry {
    epoll: OwnedFd,
    /// Keyed by a number never reused, so that a late event for a closed connection finds
    /// nothing. Locked briefly, never across a call into a connection.
    hooks: Mutex<Hooks>,
    next: AtomicU64,
}

type Hooks = HashMap<u64, Arc<Hook>, std::hash::BuildHasherDefault<KeyHasher>>;

/// Hashes the registry's keys with one multiplication rather than SipHash, which cost
/// about 300 instructions a connection (an insert and a removal). The keys are a counter's
/// values, never anyone's input, so nothing can be gained by choosing them; the odd
/// multiplier spreads consecutive keys over the table's low bits and its high ones alike.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    /// Only `u64` keys are hashed; anything else still gets a well-mixed value.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }
}

fn registry() -> Option<&'static Registry> {
    static REGISTRY: OnceLock<Option<Registry>> = OnceLock::new();
    static THREAD: std::sync::Once = std::sync::Once::new();
    let registry = REGISTRY
        .get_or_init(|| match Registry::new() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch client connections for hang-ups");
                None
            }
        })
        .as_ref()?;
    THREAD.call_once(|| {
        // Started before the hang-up thread, which must know whether to hand off, and
        // which is not to spend its real time creating threads.
        let hand_off = crate::access_log::start_log_thread();
        let spawned = std::thread::Builder::new()
            .name("cutoff-hangup".into())
            .spawn(move || {
                if hand_off {
                    crate::access_log::hand_off_this_thread();
                }
                registry.run()
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the hang-up thread");
        }
    });
    Some(registry)
}

impl Registry {
    fn new() -> io::Result<Registry> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Registry {
            // SAFETY: `fd` was just created and is owned by nothing else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            hooks: Mutex::default(),
            next: AtomicU64::new(0),
        })
    }

    /// The hang-up thread: for the life of the process.
    fn run(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut priority = Priority::start(REALTIME.load(Ordering::Relaxed));
        loop {
            // SAFETY: `events` is a valid buffer of `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    -1,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "hang-up watch stopped");
                return;
            }
            let began = priority.batch(n as usize == events.len());
            for ev in &events[..n as usize] {
                let key = ev.u64;
                let hook = self.lock().get(&key).cloned();
                if let Some(hook) = hook {
                    // A panic while dropping one connection is a bug, but it must not end
                    // the watch for every other connection of the process.
                    let fired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        hook.fire();
                    }));
                    if fired.is_err() {
                        tracing::error!("panic while cancelling a departed client's work");
                    }
                }
            }
            priority.worked(began);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hooks> {
        self.hooks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The hang-up thread's place in the scheduler.
///
/// It shares its core with a worker. When a client leaves while that worker is busy
/// (forwarding uploads, say), a thread of normal priority that wakes waits for the
/// worker's time slice to end: measured with 100 uploads in flight and clients leaving
/// 1 ms apart, cancellation p99 was 0.38–1.8 ms and the worst 2.6–8 ms. At real-time
/// priority (`SCHED_FIFO`, the lowest level) it runs the moment it wakes: p99 0.11–0.16
/// ms, worst 0.2–0.8 ms, in runs alternating with the former on the same process.
///
/// Real time needs `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO`), and a real-time budget where
/// cgroups ration it; without it the thread stays at normal priority, which is said once
/// in the log. Its real time is bounded, so that departures, however many, cannot keep a
/// core from the workers and every other process: a burst (a full batch of events) runs at
/// normal priority, and so does all its work once it has used [`RT_BUDGET`] of each
/// [`RT_WINDOW`], until the next window.
struct Priority {
    realtime: bool,
    demoted: bool,
    window: Instant,
    busy: Duration,
}

/// At most this much work at real-time priority...
const RT_BUDGET: Duration = Duration::from_millis(10);
/// ...in each window of this length: a tenth of a core.
const RT_WINDOW: Duration = Duration::from_millis(100);

impl Priority {
    fn start(wanted: bool) -> Priority {
        if !wanted {
            tracing::info!("the hang-up thread runs at normal priority (hangup_realtime = false)");
        }
        let realtime = wanted
            && match fifo(true) {
                Ok(()) => {
                    tracing::info!("the hang-up thread runs at real-time priority (SCHED_FIFO 1)");
                    true
                }
                Err(e) => {
                    tracing::info!(
                        error = %e,
                        "the hang-up thread runs at normal priority (real time was refused: \
                         it needs CAP_SYS_NICE, and a real-time budget where cgroups ration \
                         it): under load a departure may wait for a worker's time slice"
                    );
                    false
                }
            };
        Priority {
            realtime,
            demoted: false,
            window: Instant::now(),
            busy: Duration::ZERO,
        }
    }

    /// Before a batch of events (`full`: as many as fit, a burst). Returns when it began.
    fn batch(&mut self, full: bool) -> Instant {
        let now = Instant::now();
        if !self.realtime {
            return now;
        }
        if now.duration_since(self.window) >= RT_WINDOW {
            self.window = now;
            self.busy = Duration::ZERO;
        }
        let demote = full || self.busy >= RT_BUDGET;
        if demote != self.demoted && fifo(!demote).is_ok() {
            self.demoted = demote;
        }
        now
    }

    /// After the batch that began at `began`.
    fn worked(&mut self, began: Instant) {
        if self.realtime {
            self.busy += began.elapsed();
        }
    }
}

/// Moves the calling thread to `SCHED_FIFO` 1, or back to the normal policy.
fn fifo(on: bool) -> io::Result<()> {
    let (policy, level) = if on {
        // Reset on fork: nothing started from this thread inherits real time.
        (libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, 1)
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let param = libc::sched_param {
        sched_priority: level,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where a hang-up goes. The socket is registered as soon as it is accepted, before the
/// connection that will serve it exists (TLS first shakes hands): a hang-up in between is
/// remembered and delivered when the connection is attached.
pub struct Hook {
    gone: AtomicBool,
    target: OnceLock<Weak<dyn OnHangup>>,
    /// Who reads the socket, and whether a hang-up stopped that. Changed by the connection,
    /// not by the hang-up itself: once the HTTP connection is over (an upgrade handed the
    /// socket to a tunnel), a FIN is the tunnel's to read, along with whatever came before
    /// it (a WebSocket close frame). One atomic, so that a hang-up racing the hand-over
    /// cannot stop the tunnel's reads after the hand-over.
    reads: AtomicU8,
    /// The socket, kept from closing for a lingering close (see `linger.rs`): put here as
    /// hyper's connection drops it, taken by the connection's task.
    parked: Mutex<Option<Parked>>,
}

/// A client socket handed back for a lingering close: the server knows its type.
pub type Parked = Box<dyn std::any::Any + Send>;

/// [`Hook::reads`]: hyper's connection owns the socket and reads it.
const READS_OPEN: u8 = 0;
/// The client hung up: the socket reads as closed.
const READS_STOPPED: u8 = 1;
/// hyper's connection is over (an upgrade gave the socket to a tunnel): reads are the
/// tunnel's, and a hang-up no longer stops them.
const READS_HANDED_OVER: u8 = 2;
/// hyper's connection is over and the client may still be sending: the socket, when
/// dropped, is parked in the hook instead of closed. Set only once hyper is done with the
/// socket, so nothing reads it or shuts it down meanwhile.
const READS_LINGER: u8 = 3;

impl Hook {
    fn new() -> Hook {
        Hook {
            gone: AtomicBool::new(false),
            target: OnceLock::new(),
            reads: AtomicU8::new(READS_OPEN),
            parked: Mutex::new(None),
        }
    }

    fn fire(&self) {
        self.gone.store(true, Ordering::SeqCst);
        // With the fence in `attach`: at least one of the two sees the other's store, so a
        // hang-up racing the attachment is delivered at least once.
        fence(Ordering::SeqCst);
        if let Some(t) = self.target.get().and_then(Weak::upgrade) {
            t.hung_up();
        }
    }

    /// From now on the client's socket reads as closed: the connection calls this when
    /// its client hung up, after recording the departure.
    /// Does nothing once the socket was handed over.
    pub fn stop_reads(&self) {
        let _ = self.reads.compare_exchange(
            READS_OPEN,
            READS_STOPPED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// hyper's connection is over: from now on the socket reads normally, whatever a
    /// hang-up handled at the same moment did, and whatever one does later.
    pub fn hand_over(&self) {
        self.reads.store(READS_HANDED_OVER, Ordering::Release);
    }

    /// hyper's connection is over (handed over) with the client possibly still sending:
    /// when the connection drops the socket, it is parked here instead of closed. Refused
    /// (false) unless hyper's connection is over and the socket is not a tunnel's.
    pub fn linger_on_close(&self) -> bool {
        self.reads
            .compare_exchange(
                READS_HANDED_OVER,
                READS_LINGER,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The socket parked since [`Hook::linger_on_close`], if dropping hyper's connection
    /// dropped it. If not (an upgrade gave it to a tunnel, or the hang-up thread holds the
    /// connection a moment longer), the socket goes back to being closed when dropped.
    /// Under the slot's lock, which `Watched`'s drop takes to park: a socket is either
    /// taken here or closed, never parked after this gave up on it.
    pub fn take_parked(&self) -> Option<Parked> {
        let mut slot = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let parked = slot.take();
        if parked.is_none() {
            let _ = self.reads.compare_exchange(
                READS_LINGER,
                READS_HANDED_OVER,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        parked
    }

    /// Attaches the connection; if the client already left, tells it now (on the caller's
    /// thread). `hung_up` may then run twice, and must not mind.
    pub fn attach(&self, target: Weak<dyn OnHangup>) {
        let _ = self.target.set(target);
        fence(Ordering::SeqCst);
        if self.gone.load(Ordering::SeqCst)
            && let Some(t) = self.target.get().and_then(Weak::upgrade)
        {
            t.hung_up();
        }
    }
}

/// A client socket registered in the hang-up set for as long as it lives.
///
/// The kernel takes the registration out when the socket closes (cutoff holds its only
/// descriptor: nothing dups it, nothing forks), so `Drop` only forgets the key, and a
/// connection costs one system call less than with an explicit `EPOLL_CTL_DEL`. The key
/// goes first: an event already on its way for this socket then finds nothing.
pub struct Watched<T: AsRawFd + Send + 'static> {
    /// Taken in `Drop`, after the registration is gone; see [`upstreams_first`].
    io: ManuallyDrop<T>,
    key: Option<u64>,
    /// Once the connection stops its reads, the socket reads as closed: see `poll_read`.
    hook: Option<Arc<Hook>>,
}

/// Closing one client socket, put off by [`upstreams_first`].
type Close = Box<dyn FnOnce()>;

thread_local! {
    /// Client sockets whose closing waits until [`upstreams_first`] is done.
    static DEFERRED: RefCell<Option<Vec<Close>>> = const { RefCell::new(None) };
    /// The list [`upstreams_first`] used last, emptied, kept for the next call: a new one
    /// each time cost an allocation, a growth and a free per connection.
    static SPARE: std::cell::Cell<Vec<Close>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The longest list [`SPARE`] keeps: past a burst, the memory goes back.
const SPARE_AT_MOST: usize = 64;

/// Runs `f` (which drops client connections), closing their client sockets only after it
/// returns. hyper's connection drops its socket before its requests, so closing the
/// client's side (deregistration, the FIN through loopback) would otherwise come before
/// the upstream calls are reset, and delay exactly what the hang-up is for.
pub fn upstreams_first<R>(f: impl FnOnce() -> R) -> R {
    if DEFERRED.with(|d| d.borrow().is_some()) {
        // Nested: the outer call closes them.
        return f();
    }
    let list = SPARE.take();
    DEFERRED.with(|d| *d.borrow_mut() = Some(list));
    // Closes what was put off even if `f` panics, so that later drops on this thread are
    // not put off forever.
    struct Flush;
    impl Drop for Flush {
        fn drop(&mut self) {
            let Some(mut list) = DEFERRED.with(|d| d.borrow_mut().take()) else {
                return;
            };
            for close in list.drain(..) {
                close();
            }
            if list.capacity() <= SPARE_AT_MOST {
                SPARE.set(list);
            }
        }
    }
    let _flush = Flush;
    f()
}

impl<T: AsRawFd + Send + 'static> Watched<T> {
    /// Registers `io`. Without a registration (logged, never fatal) hyper's own detection
    /// remains, and no hook is returned.
    pub fn new(io: T) -> (Watched<T>, Option<Arc<Hook>>) {
        let Some(registry) = registry() else {
            return (Watched::unregistered(io), None);
        };
        let key = registry.next.fetch_add(1, Ordering::Relaxed);
        let hook = Arc::new(Hook::new());
        registry.lock().insert(key, hook.clone());
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: key,
        };
        // SAFETY: `io` is an open socket owned by the returned value; `ev` is valid.
        let rc = unsafe {
            libc::epoll_ctl(
                registry.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                io.as_raw_fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            registry.lock().remove(&key);
            tracing::warn!(error = %e, "cannot watch a client connection for hang-ups");
            return (Watched::unregistered(io), None);
        }
        let watched = Watched {
            io: ManuallyDrop::new(io),
            key: Some(key),
            hook: Some(hook.clone()),
        };
        (watched, Some(hook))
    }

    /// Takes the socket out of the hang-up set now rather than at its close.
    fn unwatch(&mut self) {
        if let (Some(key), Some(registry)) = (self.key.take(), registry()) {
            // SAFETY: the socket is open: `self` owns it.
            unsafe {
                libc::epoll_ctl(
                    registry.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    self.io.as_raw_fd(),
                    std::ptr::null_mut(),
                );
            }
            registry.lock().remove(&key);
        }
    }

    fn unregistered(io: T) -> Watched<T> {
        Watched {
            io: ManuallyDrop::new(io),
            key: None,
            hook: None,
        }
    }
}

impl<T: AsRawFd + Send + 'static> Drop for Watched<T> {
    fn drop(&mut self) {
        if let Some(hook) = self
            .hook
            .take_if(|h| h.reads.load(Ordering::Acquire) == READS_LINGER)
        {
            // Checked again under the slot's lock: see `Hook::take_parked`.
            let mut slot = hook.parked.lock().unwrap_or_else(|e| e.into_inner());
            if hook.reads.load(Ordering::Acquire) == READS_LINGER {
                // Not closed: nothing for the upstream calls' resets to wait on. Out of
                // the hang-up set first: the client's FIN, which the lingering close waits
                // for, must not wake the hang-up thread (hyper takes the socket out as it
                // shuts down, which it skips after an I/O error).
                self.unwatch();
                // SAFETY: taken once, here, and never used again.
                let io = unsafe { ManuallyDrop::take(&mut self.io) };
                *slot = Some(Box::new(io));
                return;
            }
        }
        // SAFETY: taken once, here, and never used again.
        let io = unsafe { ManuallyDrop::take(&mut self.io) };
        let key = self.key;
        let close = move || {
            if let (Some(key), Some(registry)) = (key, registry()) {
                registry.lock().remove(&key);
            }
            drop(io);
        };
        DEFERRED.with(|d| match d.borrow_mut().as_mut() {
            Some(later) => later.push(Box::new(close)),
            None => close(),
        });
    }
}

impl<T: AsRawFd + Send + 'static + AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // The client left: whatever it sent before its FIN (the rest of an upload, say)
        // would only be forwarded to an upstream call about to be reset, by a worker that
        // holds the connection meanwhile. hyper sees the end of the stream instead: a
        // quiet close between requests, an incomplete body or head within one.
        if self
            .hook
            .as_ref()
            .is_some_and(|h| h.reads.load(Ordering::Acquire) == READS_STOPPED)
        {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl<T: AsRawFd + Send + 'static + AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    /// A connection that closes its side has nothing left for a hang-up to cancel, and
    /// the client's answering FIN, often quicker than the worker's own close, must not
    /// wake the hang-up thread (measured with one request per connection on one core, a
    /// quarter of the connections did, each wake-up preempting the worker).
    ///
    /// So the socket leaves the hang-up set here, at once: left to the close, which
    /// follows within the same poll but after the whole connection is dropped, it let the
    /// client's FIN wake the hang-up thread for one connection in fifteen.
    ///
    /// While hyper owns the connection (after a `Connection: close` response, an HTTP/2
    /// GOAWAY, a drain), it shuts down only as it ends, dropping the connection and
    /// closing its socket in the same poll, and the close sends the FIN: the `shutdown`
    /// system call would only send it a few microseconds sooner. A tunnel (the socket
    /// handed over) passes on the upstream's FIN and goes on reading, so it shuts down for
    /// real.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.unwatch();
        if self
            .hook
            .as_ref()
            .is_some_and(|h| h.reads.load(Ordering::Acquire) != READS_HANDED_OVER)
        {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl OnHangup for Count {
        fn hung_up(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn hook() -> Hook {
        Hook::new()
    }

    #[test]
    fn a_hang_up_before_the_connection_is_attached_is_delivered_on_attach() {
        let count = Arc::new(Count::default());
        let h = hook();
        h.fire();
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        h.attach(Arc::downgrade(&count) as Weak<dyn OnHangup>);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_hang_up_after_attach_is_delivered_once() {
        let count = Arc::new(Count::default());
        let h = hook();
        h.attach(Arc::downgrade(&count) as Weak<dyn OnHangup>);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        h.fire();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    /// Inside `upstreams_first`, a dropped client socket stays open (its peer reads no
    /// EOF yet); it closes when the closure has returned.
    #[test]
    fn client_sockets_close_after_the_rest() {
        let (ours, mut peer) = UnixStream::pair().expect("socket pair");
        peer.set_nonblocking(true).expect("non-blocking");
        let (watched, _hook) = Watched::new(ours);
        let mut buf = [0u8; 1];
        upstreams_first(|| {
            drop(watched);
            let r = peer.read(&mut buf);
            assert!(
                matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
                "closed too early: {r:?}"
            );
        });
        assert_eq!(peer.read(&mut buf).expect("EOF"), 0, "closed after");
    }

    /// A shutdown leaves the hang-up set at once. While hyper owns the connection the FIN
    /// waits for the close that follows; a tunnel's shutdown sends it.
    #[test]
    fn closing_our_side_leaves_the_hang_up_set() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let registered = |key| registry().expect("registry").lock().contains_key(&key);
            // The peer, read without tokio's readiness: EOF (0) or nothing yet.
            let pair = || {
                let (ours, peer) = UnixStream::pair().expect("socket pair");
                ours.set_nonblocking(true).expect("non-blocking");
                peer.set_nonblocking(true).expect("non-blocking");
                let ours = tokio::net::UnixStream::from_std(ours).expect("register");
                (ours, peer)
            };
            let eof = |mut peer: &UnixStream| matches!(peer.read(&mut [0; 8]), Ok(0));

            let (ours, peer) = pair();
            let (mut watched, _hook) = Watched::new(ours);
            let key = watched.key.expect("registered");
            assert!(registered(key));
            tokio::io::AsyncWriteExt::shutdown(&mut watched)
                .await
                .expect("shutdown");
            assert!(!registered(key));
            assert!(!eof(&peer), "no FIN before the close");
            drop(watched);
            assert!(eof(&peer), "the close sends the FIN");

            let (ours, peer) = pair();
            let (mut watched, hook) = Watched::new(ours);
            let key = watched.key.expect("registered");
            hook.expect("registered").hand_over();
            tokio::io::AsyncWriteExt::shutdown(&mut watched)
                .await
                .expect("shutdown");
            assert!(watched.key.is_none());
            assert!(!registered(key));
            assert!(eof(&peer), "a tunnel's FIN goes out at its shutdown");
        });
    }

    /// The real thing: a registered socket whose peer leaves reaches its target through
    /// the hang-up thread.
    #[test]
    fn a_peer_that_leaves_is_reported_by_the_hang_up_thread() {
        struct Tell(Mutex<std::sync::mpsc::Sender<()>>);
        impl OnHangup for Tell {
            fn hung_up(&self) {
                let _ = self.0.lock().expect("sender").send(());
            }
        }
        let (ours, peer) = UnixStream::pair().expect("socket pair");
        let (watched, hook) = Watched::new(ours);
        let (tx, rx) = std::sync::mpsc::channel();
        let target = Arc::new(Tell(Mutex::new(tx)));
        hook.expect("registered")
            .attach(Arc::downgrade(&target) as Weak<dyn OnHangup>);
        drop(peer);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the hang-up within 5 s");
        drop(watched);
        assert!(rx.try_recv().is_err(), "one-shot: reported once");
    }

    /// Real time is bounded: a burst, and any work beyond the budget of a window, run at
    /// normal priority, as the kernel reports it; a quiet new window returns to real time.
    /// On a thread of its own, whose policy dies with it.
    #[test]
    fn real_time_is_bounded_by_bursts_and_budget() {
        std::thread::spawn(|| {
            // SAFETY: sched_getscheduler(0) has no memory-safety preconditions.
            let policy = || unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
            let mut p = Priority::start(true);
            if !p.realtime {
                // Not permitted here: the thread stays normal whatever comes.
                p.batch(true);
                p.batch(false);
                assert_eq!(policy(), libc::SCHED_OTHER);
                return;
            }
            assert_eq!(policy(), libc::SCHED_FIFO);
            p.batch(true);
            assert_eq!(
                policy(),
                libc::SCHED_OTHER,
                "a full batch runs at normal priority"
            );
            let began = p.batch(false);
            assert_eq!(
                policy(),
                libc::SCHED_FIFO,
                "the next batch is back to real time"
            );
            // A batch that used more than the budget: the next one is normal.
            p.worked(began - RT_BUDGET);
            p.batch(false);
            assert_eq!(policy(), libc::SCHED_OTHER, "the budget is spent");
            // The window over: real time again.
            p.window -= RT_WINDOW;
            p.batch(false);
            assert_eq!(policy(), libc::SCHED_FIFO, "a new window");
        })
        .join()
        .expect("the test thread");
    }
}
