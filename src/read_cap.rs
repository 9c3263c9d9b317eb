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
//! system call per 8 KiB of a large body instead of per 64 KiB (1 MiB upstream); nginx
//! reads unbuffered bodies 16 KiB at a time and unbuffered responses 4 KiB at a time.
//!
//! Except for bulk uploads: a client connection whose reads have filled the cap
//! [`BULK_AFTER`] times (1 MiB that arrived faster than 8 KiB reads drained it) is read
//! [`BULK_READ`] bytes at a time from then on, and hyper's buffer grows to 64 KiB for it.
//! Measured on a 1 GiB upload, release build: 1.50 s of CPU at 8 KiB a read, 0.59 s at
//! 64 KiB (nginx, 16 KiB at a time: 1.2 s), nearly all of it the kernel's, per system
//! call. A request held after a partial upload of less than that (the memory benchmark's
//! 64 KiB) keeps the 8 KiB buffer, and so does a connection of many small requests, whose
//! reads never fill the cap. What it costs: such a connection keeps its 64 KiB buffer
//! until it closes. Upstream reads stay capped: a download gains less (0.81 → 0.65 s per
//! GiB), and there a larger read is a larger chunk that a client reading nothing pins.
//! The same switch after 1 MiB on upstream connections was measured and not taken: a
//! client that never reads lets more than 1 MiB through before its stall shows (the
//! kernel's socket buffers take it), so it switched too: 163 KiB per stalled download,
//! for about 5 % less CPU per GiB downloaded.
//!
//! HTTP/2 is read without a cap: the h2 crate sizes its buffer by frame, not by read. A
//! client connection whose protocol is not known before its first bytes (TLS without
//! ALPN, or a cleartext one whose first bytes may begin the HTTP/2 preface) is capped
//! from the first byte that is not the preface's ([`Cap::Undecided`]).

use std::io;
use std::task::Poll;

use tokio::io::ReadBuf;

/// One byte short of hyper's first buffer size (8 KiB), so that hyper never doubles it.
pub const MAX_READ: usize = 8 * 1024 - 1;

/// A bulk upload's reads: one byte short of 64 KiB, where hyper's buffer then stops (it
/// doubles after a read that fills it, and none does), whatever `max_header_bytes` is.
pub const BULK_READ: usize = 64 * 1024 - 1;

/// How many reads must fill [`MAX_READ`] before a connection's reads are [`BULK_READ`]:
/// 1 MiB of bytes that arrived faster than they were read.
pub const BULK_AFTER: u8 = 128;

/// The HTTP/2 connection preface (RFC 9113, 3.4): what an h2c client with prior knowledge
/// sends first, and any HTTP/2 client after its TLS handshake.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a client connection's reads are capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// HTTP/1: capped at [`MAX_READ`]; this many reads so far filled it.
    On(u8),
    /// HTTP/1 carrying a bulk upload: capped at [`BULK_READ`].
    Bulk,
    /// HTTP/2: not capped.
    Off,
    /// Not known yet: this many bytes read so far, all of them the preface's. Reads are
    /// not capped until a byte differs (HTTP/1, [`Cap::On`]) or the whole preface has
    /// arrived ([`Cap::Off`]); hyper-util reads those first bytes 24 at most at a time.
    Undecided(u8),
}

impl Cap {
    /// The most a read may ask for, if it is capped.
    #[inline]
    pub fn limit(self) -> Option<usize> {
        match self {
            Cap::On(_) => Some(MAX_READ),
            Cap::Bulk => Some(BULK_READ),
            Cap::Off | Cap::Undecided(_) => None,
        }
    }

    /// Takes note of bytes just read: the protocol, while it is not known, and on HTTP/1
    /// whether the read filled its cap.
    #[inline]
    pub fn read(&mut self, bytes: &[u8]) {
        match self {
            Cap::Undecided(_) => self.saw(bytes),
            Cap::On(full) if bytes.len() == MAX_READ => {
                *full += 1;
                if *full >= BULK_AFTER {
                    *self = Cap::Bulk;
                }
            }
            Cap::On(_) | Cap::Bulk | Cap::Off => {}
        }
    }

    /// Takes note of bytes just read before the protocol is known.
    pub fn saw(&mut self, bytes: &[u8]) {
        let Cap::Undecided(seen) = *self else {
            return;
        };
        let seen = usize::from(seen);
        let n = bytes.len().min(H2_PREFACE.len() - seen);
        *self = if bytes[..n] != H2_PREFACE[seen..seen + n] {
            Cap::On(0)
        } else if seen + n == H2_PREFACE.len() {
            Cap::Off
        } else {
            // Below the preface's 24 bytes, so it fits.
            Cap::Undecided((seen + n) as u8)
        };
    }
}

/// Runs `read` on at most `limit` bytes of `buf`'s unfilled part, and counts what it
/// filled as filled in `buf`. Inlined: hyper polls an upstream connection's reads about
/// seven times per exchange, most finding nothing.
#[inline]
pub fn poll_capped(
    buf: &mut ReadBuf<'_>,
    limit: usize,
    read: impl FnOnce(&mut ReadBuf<'_>) -> Poll<io::Result<()>>,
) -> Poll<io::Result<()>> {
    if buf.remaining() <= limit {
        return read(buf);
    }
    let mut part = buf.take(limit);
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
        let polled = poll_capped(&mut buf, MAX_READ, |part| {
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
        let _ = poll_capped(&mut buf, MAX_READ, |part| {
            assert_eq!(part.remaining(), 4096);
            part.put_slice(b"abc");
            Poll::Ready(Ok(()))
        });
        assert_eq!(buf.filled(), b"abc");
    }

    #[test]
    fn http1_is_capped_from_its_first_byte_that_is_not_the_prefaces() {
        let mut cap = Cap::Undecided(0);
        cap.saw(b"P");
        assert_eq!(cap, Cap::Undecided(1));
        cap.saw(b"RI * HTTP/1.1\r\n");
        assert_eq!(cap, Cap::On(0));
        let mut cap = Cap::Undecided(0);
        cap.saw(b"GET / HTTP/1.1\r\n");
        assert_eq!(cap, Cap::On(0));
    }

    #[test]
    fn http2_is_not_capped() {
        let mut cap = Cap::Undecided(0);
        cap.saw(&H2_PREFACE[..5]);
        cap.saw(&H2_PREFACE[5..]);
        assert_eq!(cap, Cap::Off);
        let mut cap = Cap::Undecided(0);
        // The preface and the first frame in one read.
        cap.saw(&[H2_PREFACE, &[0, 0, 18, 4]].concat());
        assert_eq!(cap, Cap::Off);
        cap.saw(b"GET");
        assert_eq!(cap, Cap::Off);
    }

    #[test]
    fn nothing_filled_on_pending() {
        let mut storage = vec![0u8; 32 * 1024];
        let mut buf = ReadBuf::new(&mut storage);
        assert!(poll_capped(&mut buf, MAX_READ, |_| Poll::Pending).is_pending());
        assert!(buf.filled().is_empty());
    }

    #[test]
    fn reads_that_fill_the_cap_make_a_connection_bulk() {
        let mut cap = Cap::On(0);
        // Reads that do not fill the cap never count, however many.
        for _ in 0..1000 {
            cap.read(&[0; MAX_READ - 1]);
        }
        assert_eq!(cap, Cap::On(0));
        for _ in 1..BULK_AFTER {
            cap.read(&[0; MAX_READ]);
        }
        assert_eq!(cap, Cap::On(BULK_AFTER - 1));
        assert_eq!(cap.limit(), Some(MAX_READ));
        cap.read(&[0; MAX_READ]);
        assert_eq!(cap, Cap::Bulk);
        assert_eq!(cap.limit(), Some(BULK_READ));
        // And it stays bulk.
        cap.read(&[0; 10]);
        assert_eq!(cap, Cap::Bulk);
        assert_eq!(Cap::Off.limit(), None);
        assert_eq!(Cap::Undecided(3).limit(), None);
    }
}
