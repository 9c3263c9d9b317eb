//! Noticing that a client hung up, without reading its socket.
//!
//! hyper learns that a client left only when it reads: a client that closes while its
//! request waits for the upstream is noticed late or never if unread bytes (a pipelined
//! request, the rest of an upload) sit in front of the FIN. The kernel knows at once: a
//! socket whose peer sent FIN or RST reports `EPOLLRDHUP`/`EPOLLHUP` whatever data is
//! queued. So each worker thread keeps one epoll set of its own in which every client
//! socket of that worker is registered for hang-ups only (`EPOLLRDHUP`, one-shot). Request
//! bytes arriving on a socket do not match that interest: they wake nothing here, so the
//! watch costs nothing per request, only an `epoll_ctl` when a connection opens and one
//! when it closes. hyper's own registration (in tokio's epoll set) is a different one,
//! untouched. The epoll set itself is registered with tokio, readable whenever one of
//! its sockets hung up; a small task per worker drains it and wakes those connections.
//!
//! Why not a `dup` of each socket registered with tokio for readability (what cutoff did
//! first): it costs a third descriptor per held request, and every request's bytes woke
//! the connection twice.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// One worker thread's epoll set of client sockets, and who waits on which.
struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    /// Keyed by a number never reused, so that a late event for a closed connection
    /// finds nothing. Locked briefly, never across an await, and only when a connection
    /// opens, closes or hangs up.
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    next: u64,
    waiting: HashMap<u64, Slot>,
}

#[derive(Default)]
struct Slot {
    gone: bool,
    waker: Option<Waker>,
}

thread_local! {
    /// Connection tasks run on their worker's current-thread runtime, so each worker has
    /// exactly one watcher, created with the first connection.
    static WATCHER: std::cell::RefCell<Option<Arc<Watcher>>> = const { std::cell::RefCell::new(None) };
}

fn watcher() -> io::Result<Arc<Watcher>> {
    WATCHER.with(|w| {
        if let Some(w) = &*w.borrow() {
            return Ok(w.clone());
        }
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let watcher = Arc::new(Watcher {
            // SAFETY: the epoll descriptor is owned by this `AsyncFd` for its whole life.
            epoll: unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? },
            slots: Mutex::default(),
        });
        tokio::spawn(drive(watcher.clone()));
        *w.borrow_mut() = Some(watcher.clone());
        Ok(watcher)
    })
}

/// Drains the epoll set whenever it is readable and wakes the connections that hung up.
/// Lives as long as its worker's runtime.
async fn drive(watcher: Arc<Watcher>) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        let Ok(mut guard) = watcher.epoll.readable().await else {
            return;
        };
        // SAFETY: `events` is a valid buffer of `events.len()` entries; timeout 0 never
        // blocks.
        let n = unsafe {
            libc::epoll_wait(
                watcher.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "hang-up watch stopped");
                return;
            }
            continue;
        }
        let n = n as usize;
        {
            let mut slots = watcher.slots.lock().unwrap_or_else(|e| e.into_inner());
            for ev in &events[..n] {
                let key = ev.u64;
                if let Some(slot) = slots.waiting.get_mut(&key) {
                    slot.gone = true;
                    if let Some(w) = slot.waker.take() {
                        w.wake();
                    }
                }
            }
        }
        if n < events.len() {
            guard.clear_ready();
        }
    }
}

/// One client socket's registration in its worker's watcher.
pub struct HangupWatch {
    watcher: Arc<Watcher>,
    key: u64,
    fd: RawFd,
}

impl HangupWatch {
    /// `None` if the socket cannot be registered (hyper's own detection then remains);
    /// that is logged, never fatal.
    ///
    /// Dropping the watch after its socket closed is fine: the kernel removes a closed
    /// socket from the set by itself, and the `EPOLL_CTL_DEL` in `Drop` then finds
    /// nothing. It cannot remove another connection's registration either: only this
    /// thread adds to this set, and it does not accept between the close and the drop.
    pub fn new(socket: &impl AsRawFd) -> Option<HangupWatch> {
        match Self::register(socket.as_raw_fd()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch a client connection for hang-ups");
                None
            }
        }
    }

    fn register(fd: RawFd) -> io::Result<HangupWatch> {
        let watcher = watcher()?;
        let key = {
            let mut slots = watcher.slots.lock().unwrap_or_else(|e| e.into_inner());
            let key = slots.next;
            slots.next += 1;
            slots.waiting.insert(key, Slot::default());
            key
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: key,
        };
        // SAFETY: `fd` is an open socket borrowed from the caller; `ev` is valid.
        let rc =
            unsafe { libc::epoll_ctl(watcher.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        let watch = HangupWatch { watcher, key, fd };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(watch)
    }

    /// Resolves once the peer has closed its side or reset the connection.
    pub async fn hung_up(&self) {
        std::future::poll_fn(|cx| self.poll_hung_up(cx)).await
    }

    fn poll_hung_up(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut slots = self.watcher.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.waiting.get_mut(&self.key) {
            Some(slot) if slot.gone => Poll::Ready(()),
            Some(slot) => {
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for HangupWatch {
    fn drop(&mut self) {
        // SAFETY: removing a registration has no memory-safety preconditions; ENOENT (the
        // socket already closed) is expected and ignored.
        unsafe {
            libc::epoll_ctl(
                self.watcher.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                self.fd,
                std::ptr::null_mut(),
            );
        }
        let mut slots = self.watcher.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.waiting.remove(&self.key);
    }
}
