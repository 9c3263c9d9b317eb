//! Reads of at most [`MAX_READ`] bytes, so that an HTTP/1 connection's read buffer stays
//! at 8 KiB however fast its peer sends.
//!
//! hyper reads an HTTP/1 connection into a buffer that doubles each time a read fills it,
//! up to `max_buf_size`, which is also the largest head it accepts: 64 KiB for clients by
//! default (`max_header_bytes`), 1 MiB for upstreams. A body streaming in at loopback speed
//! fills every read, so the buffer grows to that bound, and each growth is a fresh
//! allocation (the last one is still shared with the chunk being forwarded). Measured
//! with 1 000 clients each holding a 64 KiB upload in flight: 107 KiB of memory per
//! request against 19 KiB for a request without a body, and nginx 18 KiB (it reads a body
//! into a 16 KiB buffer). All of that memory is dirty, and when the requests end, the
//! worker hands it back to the kernel (jemalloc's purge, `madvise`) in the middle of
//! serving others: that is what made the cancellation benchmark's upload rows slower at
//! p99 than the other phases.
//!
//! A read one byte short of a power of two never fills the buffer's next step, so hyper's
//! buffer stays at its first size, 8 KiB. A head larger than that still arrives whole: hyper
//! reads on until the head is complete or `max_buf_size` is reached. What it costs is a
//! system call per 8 KiB of a large body instead of per 64 KiB; nginx reads unbuffered
//! bodies 16 KiB at a time and unbuffered responses 4 KiB at a time.
//!
//! HTTP/2 is read without a cap: the h2 crate sizes its buffer by frame, not by read.

use std::io;
use std::task::Poll;

use tokio::io::ReadBuf;

/// One byte short of hyper's first buffer size (8 KiB), so that hyper never doubles it.
pub const MAX_READ: usize = 8 * 1024 - 1;

/// Runs `read` on at most [`MAX_READ`] bytes of `buf`'s unfilled part, and counts what it
/// filled as filled in `buf`.
pub fn poll_capped(
    buf: &mut ReadBuf<'_>,
    read: impl FnOnce(&mut ReadBuf<'_>) -> Poll<io::Result<()>>,
) -> Poll<io::Result<()>> {
    if buf.remaining() <= MAX_READ {
        return read(buf);
    }
    let mut part = buf.take(MAX_READ);
    let start = part.filled().as_ptr();
    let polled = read(&mut part);
    // A reader may not swap the buffer it was given (tokio's `Take` checks the same).
    assert_eq!(
        start,
        part.filled().as_ptr(),
        "the reader swapped its buffer"
    );
    let n = part.filled().len();
    // SAFETY: `part` is the start of `buf`'s unfilled part, and `read` filled (so
    // initialized) its first `n` bytes.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    polled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_buffer_is_read_in_capped_parts() {
        let mut storage = vec![0u8; 64 * 1024];
        let mut buf = ReadBuf::new(&mut storage);
        let polled = poll_capped(&mut buf, |part| {
            assert_eq!(part.remaining(), MAX_READ);
            part.put_slice(&[7; 100]);
            Poll::Ready(Ok(()))
        });
        assert!(matches!(polled, Poll::Ready(Ok(()))));
        assert_eq!(buf.filled(), &[7; 100][..]);
        assert_eq!(buf.remaining(), 64 * 1024 - 100);
    }

    #[test]
    fn a_small_buffer_is_read_whole() {
        let mut storage = vec![0u8; 4096];
        let mut buf = ReadBuf::new(&mut storage);
        let _ = poll_capped(&mut buf, |part| {
            assert_eq!(part.remaining(), 4096);
            part.put_slice(b"abc");
            Poll::Ready(Ok(()))
        });
        assert_eq!(buf.filled(), b"abc");
    }

    #[test]
    fn nothing_filled_on_pending() {
        let mut storage = vec![0u8; 32 * 1024];
        let mut buf = ReadBuf::new(&mut storage);
        assert!(poll_capped(&mut buf, |_| Poll::Pending).is_pending());
        assert!(buf.filled().is_empty());
    }
}
