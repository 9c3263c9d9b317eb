//! `loadgen floor`: the thinnest HTTP/1.1 forwarding loop hyper allows, as a baseline.
//!
//! cutoff is built on hyper (server and upstream client). This is what hyper alone costs:
//! one current-thread runtime, hyper's HTTP/1.1 server, and for every client connection one
//! upstream connection made with hyper's client, over which each request is sent as it
//! came (no routing, no header rewriting, no timers, no pool, no metrics, no logging, no
//! cancellation bookkeeping). It is not a proxy anyone should run: it is the floor under
//! any hyper-based one, measured in the same run as cutoff and the incumbents, so that the
//! report can say how much of cutoff's cost is hyper's and how much is cutoff's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::Args;

pub async fn run(args: &Args) -> Result<(), String> {
    let listen = args.addr("listen")?;
    let upstream = args.addr("upstream")?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    eprintln!("floor: listening on {listen}, forwarding to {upstream}");
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accept: {e}"))?;
        tokio::spawn(connection(stream, upstream));
    }
}

async fn connection(stream: TcpStream, upstream: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let Ok((sender, conn)) = client::handshake::<_, Incoming>(TokioIo::new(up)).await else {
        return;
    };
    tokio::spawn(conn);
    // One request at a time on a client connection, so this lock is never contended; it
    // only lets the service borrow the sender.
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            match sender.send_request(req).await {
                Ok(resp) => Ok::<_, Infallible>(resp.map(Either::Left)),
                Err(_) => {
                    let mut r = Response::new(Either::Right(Empty::<Bytes>::new()));
                    *r.status_mut() = StatusCode::BAD_GATEWAY;
                    Ok(r)
                }
            }
        }
    });
    let _ = server::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}
