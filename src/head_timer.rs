//! `header_read_timeout`, kept by each client connection rather than by hyper.
//!
//! hyper's own header timer is wrong for cutoff in two ways. It starts as soon as hyper
//! waits for a head, which on a keep-alive connection is right after the previous
//! response: an idle connection was cut after `header_read_timeout` (10 s by default)
//! instead of `keepalive_timeout` (75 s). And it allocates and registers a timer for
//! every request, about 900 instructions each, although nearly every head arrives whole
//! in one read.
//!
//! Here the clock starts with the first bytes of a head: bytes read while no request is
//! in flight ([`HeadBytes`] reports them to [`ClientConn::bytes_arrived`]). A head that
//! arrives whole is complete in the same poll that read it, and the timer is never
//! touched; only a head split over several reads arms it. A connection that sends nothing
//! at all is bounded from its start. Idle time between requests is `keepalive_timeout`'s
//! business (`server.rs`), and a TLS handshake has its own bound.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::outcome::ClientConn;
use crate::read_cap::Cap;

/// What cut a connection off.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadTimeout {
    /// No request came within `header_read_timeout` of the connection's start.
    Silent,
    /// A request head began but was not complete within `header_read_timeout`.
    Slow,
}

/// The timer of one connection.
pub struct HeadTimer {
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
    /// The count of complete heads when the timer was armed: a head completed since
    /// disarms it. `None` while no head is pending.
    armed_for: Option<u64>,
}

impl HeadTimer {
    /// Armed from the start: the first request must come within `limit`.
    pub fn new(limit: Duration) -> HeadTimer {
        HeadTimer {
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            armed_for: Some(0),
        }
    }

    /// Ready when the connection must be cut off. Cheap while no head is pending (two
    /// atomic loads), so it is polled at every wake of the connection's task, right after
    /// hyper's connection (which is where bytes arrive).
    pub fn poll(&mut self, cx: &mut Context<'_>, client: &ClientConn) -> Poll<HeadTimeout> {
        loop {
            match self.armed_for {
                Some(seen) if client.requests() != seen => {
                    // A head completed since: this one is done. Left registered: it fires
                    // at most once more, and finds nothing to do.
                    self.armed_for = None;
                }
                Some(seen) => {
                    if self.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if seen == 0 && !client.head_pending() && !client.in_flight() {
                        return Poll::Ready(HeadTimeout::Silent);
                    }
                    if client.head_pending() && !client.in_flight() {
                        return Poll::Ready(HeadTimeout::Slow);
                    }
                    // What started the clock was no head after all (body bytes read just
                    // before their request's handler ran): never cut a request in flight.
                    self.armed_for = None;
                }
                None if client.head_pending() => {
                    self.armed_for = Some(client.requests());
                    let deadline = Instant::now() + self.limit;
                    self.sleep.as_mut().reset(deadline);
                }
                None => return Poll::Pending,
            }
        }
    }
}

/// A client stream that tells its [`ClientConn`] when bytes arrive.
///
/// It also hands hyper the connection's first bytes, read before hyper was there (to
/// tell HTTP/1 from HTTP/2, see `server::sniff`), at its first read, and caps the reads of
/// an HTTP/1 connection (see `read_cap.rs`), telling it by those bytes where the
/// protocol was not known before.
pub struct HeadBytes<T> {
    io: T,
    first: Bytes,
    client: std::sync::Arc<ClientConn>,
    cap: Cap,
}

impl<T> HeadBytes<T> {
    pub fn new(io: T, first: Bytes, client: std::sync::Arc<ClientConn>, cap: Cap) -> HeadBytes<T> {
        HeadBytes {
            io,
            first,
            client,
            cap,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadBytes<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.first.is_empty() {
            // A client that left before hyper read them: hyper sees the end of the stream
            // (from the socket, which reads as closed), and no request is sent on for it.
            if self.client.gone_at().is_none() {
                let n = self.first.len().min(buf.remaining());
                buf.put_slice(&self.first[..n]);
                let this = &mut *self;
                this.cap.saw(&this.first[..n]);
                if n == self.first.len() {
                    // Freed now, not kept with the connection.
                    self.first = Bytes::new();
                } else {
                    self.first.advance(n);
                }
                self.client.bytes_arrived();
                return Poll::Ready(Ok(()));
            }
            self.first = Bytes::new();
        }
        let before = buf.filled().len();
        let cap = self.cap;
        let io = Pin::new(&mut self.io);
        let polled = match cap.limit() {
            Some(limit) => crate::read_cap::poll_capped(buf, limit, |buf| io.poll_read(cx, buf)),
            None => io.poll_read(cx, buf),
        };
        if buf.filled().len() > before {
            self.cap.read(&buf.filled()[before..]);
            self.client.bytes_arrived();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadBytes<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.client.writes().wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.client.writes().wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(timer: &mut HeadTimer, client: &ClientConn) -> Poll<HeadTimeout> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        timer.poll(&mut cx, client)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_cut_at_the_limit() {
        let client = ClientConn::default();
        let mut timer = HeadTimer::new(Duration::from_secs(10));
        assert!(poll(&mut timer, &client).is_pending());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(poll(&mut timer, &client), Poll::Ready(HeadTimeout::Silent));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_not_the_timers_business() {
        let client = ClientConn::default();
        let mut timer = HeadTimer::new(Duration::from_secs(10));
        client.bytes_arrived();
        client.mark_request(http::Version::HTTP_11, false);
        assert!(poll(&mut timer, &client).is_pending());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(poll(&mut timer, &client).is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_is_timed_from_its_first_bytes() {
        let client = ClientConn::default();
        let mut timer = HeadTimer::new(Duration::from_secs(10));
        client.bytes_arrived();
        client.mark_request(http::Version::HTTP_11, false);
        assert!(poll(&mut timer, &client).is_pending());
        // Quiet for a while, then a second head starts and never ends.
        tokio::time::advance(Duration::from_secs(30)).await;
        client.bytes_arrived();
        assert!(poll(&mut timer, &client).is_pending());
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(poll(&mut timer, &client).is_pending());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(poll(&mut timer, &client), Poll::Ready(HeadTimeout::Slow));
    }

    /// hyper announces a request, may read its first body bytes (over TLS, a record
    /// per read) with nothing in flight yet, and only then runs the handler.
    #[tokio::test(start_paused = true)]
    async fn body_bytes_read_before_the_handler_runs_are_no_head() {
        let client = ClientConn::default();
        let mut timer = HeadTimer::new(Duration::from_secs(10));
        client.bytes_arrived();
        client.mark_request(http::Version::HTTP_11, false);
        client.bytes_arrived();
        client.request_started();
        assert!(poll(&mut timer, &client).is_pending());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(poll(&mut timer, &client).is_pending());
    }

    /// Whatever armed the clock, a request in flight when it runs out is never cut.
    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_cut() {
        let client = ClientConn::default();
        let mut timer = HeadTimer::new(Duration::from_secs(10));
        client.bytes_arrived();
        client.mark_request(http::Version::HTTP_11, false);
        client.bytes_arrived();
        assert!(poll(&mut timer, &client).is_pending());
        client.request_started();
        client.bytes_arrived();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(poll(&mut timer, &client).is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn http2_frames_between_requests_are_no_head() {
        let client = ClientConn::default();
        let mut timer = HeadTimer::new(Duration::from_secs(10));
        client.bytes_arrived();
        client.mark_request(http::Version::HTTP_2, false);
        client.bytes_arrived();
        assert!(poll(&mut timer, &client).is_pending());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(poll(&mut timer, &client).is_pending());
    }

    /// An HTTP/1 connection reads 8 KiB at a time until 1 MiB has come in reads that
    /// filled that, then 64 KiB at a time (see `read_cap.rs`). Through an in-memory pipe
    /// holding the whole upload, so that every read can fill what it asks for.
    #[tokio::test]
    async fn reads_grow_once_a_connection_carries_a_bulk_upload() {
        use crate::read_cap::{BULK_AFTER, BULK_READ, MAX_READ};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let total = 4 << 20;
        let (mut tx, rx) = tokio::io::duplex(total);
        tx.write_all(&vec![b'u'; total])
            .await
            .expect("fill the pipe");
        let client = std::sync::Arc::new(ClientConn::default());
        let mut io = HeadBytes::new(rx, Bytes::new(), client, Cap::On(0));
        let mut buf = vec![0u8; 256 * 1024];
        let mut sizes = Vec::new();
        let mut read = 0;
        while read < total {
            let n = io.read(&mut buf).await.expect("read");
            sizes.push(n);
            read += n;
        }
        let switch = usize::from(BULK_AFTER);
        assert!(sizes[..switch].iter().all(|&n| n == MAX_READ), "{sizes:?}");
        assert!(
            sizes[switch..sizes.len() - 1]
                .iter()
                .all(|&n| n == BULK_READ),
            "{sizes:?}"
        );
        assert_eq!(io.cap, Cap::Bulk);
    }
}
