//! Lingering close: a connection that answered before reading all its client sent is shut
//! down for writing, then read and discarded until the client closes, not closed at once.
//!
//! cutoff answers some requests before their body is read: a 404 or 400 of its own, a 504
//! whose timer fired mid-upload, an upstream's early 413 passed on; hyper answers a
//! malformed head with a 4xx. hyper then closes the connection, since the rest of the body
//! cannot be told from the next request. But closing a socket with unread bytes in its
//! receive queue, or with bytes still arriving, makes the kernel send a reset instead of a
//! FIN. The client's next write fails (a client that sends its whole body before reading,
//! as most libraries do, reports the reset, not the answer), and a reset that overtakes the
//! answer on a real network, or meets a client's stack that drops unread data on a reset,
//! loses the answer itself. nginx (`lingering_close`) and Apache do the same as here.
//!
//! The linger ends with the client's FIN or reset, after [`QUIET`] without a byte, after
//! [`AT_MOST`] in all, or when the drain begins: it is a courtesy to a client already
//! answered, and holds the connection's slot of `max_connections` meanwhile. Bytes are
//! discarded by the kernel (`MSG_TRUNC`), without a copy.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::shutdown::{Seat, Stage};

/// How long the client may stay silent: nginx's `lingering_timeout`.
pub const QUIET: Duration = Duration::from_secs(5);
/// How long a linger lasts at most: nginx's `lingering_time`.
pub const AT_MOST: Duration = Duration::from_secs(30);

/// How a linger ended, for the debug log (`lingering close ended`, field `ended`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed (FIN or reset): the normal end.
    ClientClosed,
    Quiet,
    TooLong,
    Drain,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::ClientClosed => "client_closed",
            Ended::Quiet => "quiet",
            Ended::TooLong => "too_long",
            Ended::Drain => "drain",
        }
    }
}

thread_local! {
    /// What `recv` is given to discard into. With `MSG_TRUNC` a TCP socket writes nothing
    /// to it; it only has to be valid memory of its length. One per worker thread.
    static SINK: RefCell<Box<[u8]>> = RefCell::new(vec![0; 64 * 1024].into_boxed_slice());
}

/// Shuts `stream` down for writing (the FIN follows the answer already sent) and discards
/// what the client still sends, until it closes or a bound is reached. Returns how it
/// ended and the bytes discarded.
pub async fn linger(stream: TcpStream, seat: &mut Seat) -> (Ended, u64) {
    linger_within(stream, seat, QUIET, AT_MOST).await
}

/// [`linger`] with its bounds as arguments, for the tests.
async fn linger_within(
    stream: TcpStream,
    seat: &mut Seat,
    quiet_for: Duration,
    at_most: Duration,
) -> (Ended, u64) {
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    let mut discarded = 0u64;
    let until = tokio::time::Instant::now() + at_most;
    let quiet = tokio::time::sleep(quiet_for.min(at_most));
    let mut quiet = std::pin::pin!(quiet);
    loop {
        tokio::select! {
            biased;
            _ = std::future::poll_fn(|cx| seat.poll_past(cx, Stage::Serving)) => {
                return (Ended::Drain, discarded);
            }
            // Before the timer: bytes that came while this task waited to run mean the
            // client was not quiet.
            ready = stream.ready(Interest::READABLE) => {
                // Only if the runtime is going away.
                if ready.is_err() {
                    return (Ended::Drain, discarded);
                }
                match stream.try_io(Interest::READABLE, || discard(&stream)) {
                    Ok(0) => return (Ended::ClientClosed, discarded),
                    Ok(n) => {
                        discarded += n as u64;
                        let now = tokio::time::Instant::now();
                        if now >= until {
                            return (Ended::TooLong, discarded);
                        }
                        quiet.as_mut().reset((now + quiet_for).min(until));
                    }
                    // The readiness was stale; tokio cleared it.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    // A reset.
                    Err(_) => return (Ended::ClientClosed, discarded),
                }
            }
            _ = &mut quiet => {
                let now = tokio::time::Instant::now();
                return (if now >= until { Ended::TooLong } else { Ended::Quiet }, discarded);
            }
        }
    }
}

/// One `recv` that drops what it takes: the count of bytes the kernel let go, 0 at the
/// client's FIN.
fn discard(stream: &TcpStream) -> std::io::Result<usize> {
    SINK.with_borrow_mut(|sink| {
        // SAFETY: `sink` is valid for its length; the descriptor is `stream`'s, open.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                sink.as_mut_ptr().cast(),
                sink.len(),
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Long enough never to be what ends a linger on a loaded machine.
    const NEVER: Duration = Duration::from_secs(60);

    /// A connected pair on loopback: (cutoff's side, the client's).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        (ours, client)
    }

    #[tokio::test]
    async fn the_client_sees_a_fin_can_finish_sending_and_ends_it_by_closing() {
        let (ours, mut client) = pair().await;
        let lingering =
            tokio::spawn(async move { linger_within(ours, &mut Seat::new(), NEVER, NEVER).await });
        // The FIN comes first: the answer before it is whole.
        let mut buf = [0u8; 16];
        assert_eq!(client.read(&mut buf).await.expect("read"), 0);
        // More than the socket buffers hold: written only if the linger reads.
        client.write_all(&vec![7u8; 16 << 20]).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let (ended, bytes) = lingering.await.expect("join");
        assert_eq!((ended, bytes), (Ended::ClientClosed, 16 << 20));
    }

    #[tokio::test]
    async fn a_silent_client_is_left_after_the_quiet_time() {
        let (ours, _client) = pair().await;
        let quiet = Duration::from_millis(50);
        let (ended, bytes) = linger_within(ours, &mut Seat::new(), quiet, NEVER).await;
        assert_eq!((ended, bytes), (Ended::Quiet, 0));
    }

    #[tokio::test]
    async fn a_client_that_never_stops_is_left_after_at_most() {
        let (ours, mut client) = pair().await;
        let trickle = tokio::spawn(async move {
            while client.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        // A quiet time the trickle keeps resetting, and a bound that ends it anyway.
        let (quiet, at_most) = (Duration::from_millis(500), Duration::from_millis(1500));
        let (ended, bytes) = linger_within(ours, &mut Seat::new(), quiet, at_most).await;
        assert_eq!(ended, Ended::TooLong);
        assert!(bytes > 0);
        trickle.abort();
    }
}
