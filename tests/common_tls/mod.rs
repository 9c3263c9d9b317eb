//! Helpers of the protocol tests (`tests/protocols.rs`): a test PKI, HTTP/2 clients, a
//! recording hyper upstream that speaks HTTP/1.1, h2c and h2 over TLS (with a small gRPC
//! service), and a minimal WebSocket echo upstream and client.
//!
//! What is here, and why:
//!
//! - [`Pki`]: a test CA and leaves for `localhost`/`127.0.0.1` signed by it, written as
//!   PEM files into a temp dir, so that the proxy reads them exactly as a user's would.
//!   rustls configs built from it use the `ring` provider explicitly, like the proxy.
//! - [`h2c_connect`], [`h2_tls_connect`], [`h1_call`]: clients built on hyper's connection
//!   API, so that a test decides exactly when a request future or a response body is
//!   dropped (which is how an HTTP/2 client resets a stream, and how an HTTP/1.1 client
//!   leaves).
//! - [`HyperUpstream`]: a hyper server (auto: HTTP/1.1 or HTTP/2 by preface, optionally
//!   behind TLS, optionally slow to start serving an accepted connection). It records each
//!   call: when it arrived, over which connection and protocol, and how it ended: completed,
//!   its handler future dropped (hyper drops it when the stream is reset before the
//!   response), or its response body dropped (reset while streaming). It also counts the
//!   TCP connections it accepted. That is what the tests assert on: what the upstream saw.
//! - [`WsUpstream`] and [`WsClient`]: RFC 6455 framing, just enough for an echo: the
//!   upstream answers the upgrade with 101 (its `Sec-WebSocket-Accept` is not computed;
//!   neither the proxy nor our client checks it), unmasks the client's frames and echoes
//!   their payload, and records when its connection closed.
//!
//! Every wait is bounded and woken by a `watch` channel bumped at every change.

#![allow(dead_code)]

use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `fut`, or a panic naming `what` once `dur` has passed.
pub async fn bounded<F: Future>(dur: Duration, what: impl Display, fut: F) -> F::Output {
    match tokio::time::timeout(dur, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {dur:?}: {what}"),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ------------------------------------------------------------------------------------------
// Test PKI
// ------------------------------------------------------------------------------------------

/// A leaf certificate for `localhost` and `127.0.0.1`, with its key.
pub struct Leaf {
    pub serial: u64,
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// A test CA in a temp dir: `ca.pem` is its certificate.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// The folder goes with the CA: every test that needs TLS makes one, and a run of the
/// suite would otherwise leave two dozen behind in the temp folder.
impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    pub fn new(dir: PathBuf) -> Pki {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "cutoff test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).expect("write ca.pem");
        Pki {
            dir,
            ca_pem,
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A new leaf for `localhost`/`127.0.0.1` signed by the CA, with serial `serial`.
    pub fn leaf(&self, serial: u64) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
            .expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.serial_number = Some(serial.into());
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        Leaf {
            serial,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// Writes `leaf` as `cert.pem`/`key.pem` in the PKI's dir, each by write-then-rename
    /// (as a certificate renewal tool would), and returns their paths.
    pub fn install(&self, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let cert = self.dir.join("cert.pem");
        let key = self.dir.join("key.pem");
        write_atomically(&key, leaf.key_pem.as_bytes());
        write_atomically(&cert, leaf.cert_pem.as_bytes());
        (cert, key)
    }

    /// A client config that trusts only the test CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add the test CA");
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

pub fn write_atomically(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// A server config with `leaf`, offering `alpn`.
pub fn server_config(leaf: &Leaf, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], leaf.key())
        .expect("server cert");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` for server name `localhost`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").expect("server name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The certificate the server presented on a new TLS connection to `addr`.
pub async fn peer_certificate(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> CertificateDer<'static> {
    let tls = bounded(
        Duration::from_secs(5),
        format!("TLS handshake with {addr}"),
        tls_connect(addr, config),
    )
    .await
    .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("the server presented certificates");
    certs[0].clone().into_owned()
}

// ------------------------------------------------------------------------------------------
// Clients
// ------------------------------------------------------------------------------------------

pub type ClientBody = Full<Bytes>;
pub type H2Sender = hyper::client::conn::http2::SendRequest<ClientBody>;

/// An HTTP/2 client over `io` (already connected; TLS already negotiated). The connection
/// is driven by a task of its own until the sender and every response are gone.
pub async fn h2_over<I>(io: I) -> H2Sender
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, ClientBody>(TokioIo::new(io))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("[h2 client] connection ended: {e}");
        }
    });
    sender
}

/// h2c to `addr`, plus a duplicate of the socket: `shutdown(Both)` on it ends the client's
/// whole connection (every stream at once) under hyper's feet, as a client crashing or
/// closing its connection does. (hyper drives the HTTP/2 connection from a task of its
/// own, so dropping our handles would not close it while streams are open.)
pub async fn h2c_connect_killable(addr: SocketAddr) -> (H2Sender, socket2::Socket) {
    use std::os::fd::AsFd;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let dup = tcp
        .as_fd()
        .try_clone_to_owned()
        .expect("duplicate the socket");
    (h2_over(tcp).await, socket2::Socket::from(dup))
}

/// HTTP/2 with prior knowledge over cleartext TCP (h2c).
pub async fn h2c_connect(addr: SocketAddr) -> H2Sender {
    let tcp = bounded(
        Duration::from_secs(5),
        format!("connect to {addr}"),
        TcpStream::connect(addr),
    )
    .await
    .expect("connect");
    let _ = tcp.set_nodelay(true);
    h2_over(tcp).await
}

/// HTTP/2 over TLS with ALPN `h2`, trusting `pki`'s CA; asserts that h2 was negotiated.
pub async fn h2_tls_connect(addr: SocketAddr, pki: &Pki) -> H2Sender {
    let tls = bounded(
        Duration::from_secs(5),
        format!("TLS handshake with {addr}"),
        tls_connect(addr, pki.client_config(&[b"h2"])),
    )
    .await
    .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the listener should negotiate h2 by ALPN"
    );
    h2_over(tls).await
}

/// A request with an absolute URI (HTTP/2 needs scheme and authority).
pub fn h2_req(
    method: &str,
    scheme: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<ClientBody> {
    Request::builder()
        .method(method)
        .uri(format!("{scheme}://localhost{path}"))
        .body(Full::new(body.into()))
        .expect("a valid request")
}

/// A whole response: status, headers, body and trailers.
#[derive(Debug)]
pub struct Collected {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Collected {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn collect(resp: Response<Incoming>) -> Result<Collected, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Collected {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// Sends `req` on `sender` and reads the whole response, within `timeout`.
pub async fn send(sender: &H2Sender, req: Request<ClientBody>, timeout: Duration) -> Collected {
    let what = format!("{} {}", req.method(), req.uri());
    let mut sender = sender.clone();
    bounded(timeout, format!("the response to {what}"), async move {
        let resp = sender
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        collect(resp)
            .await
            .unwrap_or_else(|e| panic!("{what}: body: {e}"))
    })
    .await
}

/// [`h1_call`] in a task of its own, for calls that must be under way at the same time;
/// aborting the task is the client leaving.
pub fn spawn_call(
    addr: SocketAddr,
    path: impl Into<String>,
) -> tokio::task::JoinHandle<Result<Collected, hyper::Error>> {
    let path = path.into();
    tokio::spawn(async move { h1_call(addr, &path).await })
}

/// The response of a [`spawn_call`], waited for up to `bound`; panics, naming `what`, if
/// the call failed or did not end.
pub async fn call_ended(
    bound: Duration,
    what: &str,
    call: tokio::task::JoinHandle<Result<Collected, hyper::Error>>,
) -> Collected {
    tokio::time::timeout(bound, call)
        .await
        .unwrap_or_else(|_| panic!("timed out after {bound:?}: {what}"))
        .unwrap_or_else(|e| panic!("{what}: the task: {e}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// One HTTP/1.1 request on a fresh connection, the connection driven inside this future:
/// dropping (aborting) the future closes the connection, as a departing client does.
pub async fn h1_call(addr: SocketAddr, path: &str) -> Result<Collected, hyper::Error> {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, ClientBody>(TokioIo::new(tcp)).await?;
    let req = Request::builder()
        .uri(path)
        .header(http::header::HOST, "cutoff-test")
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let call = async {
        let resp = sender.send_request(req).await?;
        collect(resp).await
    };
    tokio::pin!(conn);
    tokio::pin!(call);
    tokio::select! {
        r = &mut call => r,
        r = &mut conn => {
            r?;
            // The connection ended cleanly; the call resolves from what it read.
            call.await
        }
    }
}

/// `len` bytes of a pattern that catches reordered or dropped bytes.
pub fn pattern(len: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(len);
    for i in 0..len {
        out.put_u8((i % 251) as u8 ^ ((i / 251) % 256) as u8);
    }
    out.freeze()
}

// ------------------------------------------------------------------------------------------
// gRPC framing
// ------------------------------------------------------------------------------------------

/// One gRPC message: not compressed, 4-byte big-endian length, payload.
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + msg.len());
    out.put_u8(0);
    out.put_u32(msg.len() as u32);
    out.put_slice(msg);
    out.freeze()
}

/// Takes one whole gRPC message from the front of `buf`, if there is one.
pub fn grpc_take(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

// ------------------------------------------------------------------------------------------
// The recording hyper upstream
// ------------------------------------------------------------------------------------------

/// How a call ended, as the upstream saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The whole response was handed to hyper.
    Completed,
    /// hyper dropped the handler future before it answered (stream reset, or connection
    /// gone).
    HandlerDropped,
    /// hyper dropped the response body while it was streaming.
    BodyDropped,
}

/// What the upstream saw of one call.
#[derive(Clone, Debug)]
pub struct Call {
    pub id: usize,
    /// Index of the TCP connection it came on, in order of accept.
    pub conn: usize,
    pub method: String,
    /// Path and query.
    pub path: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub arrived: Instant,
    pub end: Option<(Instant, End)>,
    /// Messages (or chunks) of a streaming response handed to hyper.
    pub sent: usize,
}

impl Call {
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }

    pub fn ended(&self) -> Option<End> {
        self.end.map(|(_, e)| e)
    }
}

/// How a [`HyperUpstream`] serves its connections.
#[derive(Clone, Default)]
pub struct UpstreamOptions {
    /// TLS in front of HTTP (its ALPN decides what the proxy may negotiate).
    pub tls: Option<Arc<ServerConfig>>,
    /// How long to wait after accepting a TCP connection before serving it (before the
    /// TLS handshake too): a slow connection set-up.
    pub accept_delay: Duration,
}

struct UpShared {
    accepted: AtomicUsize,
    calls: Mutex<Vec<Call>>,
    changed: watch::Sender<u64>,
    release: watch::Sender<bool>,
}

impl UpShared {
    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn arrive(&self, conn: usize, req: &Request<Incoming>) -> usize {
        let id = {
            let mut calls = lock(&self.calls);
            let id = calls.len();
            calls.push(Call {
                id,
                conn,
                method: req.method().to_string(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| req.uri().path().to_string(), |pq| pq.to_string()),
                version: req.version(),
                headers: req.headers().clone(),
                arrived: Instant::now(),
                end: None,
                sent: 0,
            });
            id
        };
        self.notify();
        id
    }

    fn end(&self, id: usize, end: End) {
        {
            let mut calls = lock(&self.calls);
            if calls[id].end.is_none() {
                calls[id].end = Some((Instant::now(), end));
            }
        }
        self.notify();
    }

    fn sent_one(&self, id: usize) {
        lock(&self.calls)[id].sent += 1;
        self.notify();
    }
}

/// Records `HandlerDropped` unless the handler got to its answer.
struct HandlerGuard {
    shared: Arc<UpShared>,
    id: usize,
    answered: bool,
}

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.end(self.id, End::HandlerDropped);
        }
    }
}

/// A recording hyper upstream on 127.0.0.1 (HTTP/1.1 or HTTP/2 by preface, h2c or TLS).
///
/// Behaviour by the first path segment (more segments are a tag, as in `/slow/a?ms=100`):
///
/// | path | behaviour |
/// |---|---|
/// | `/slow?ms=N` | wait N ms, answer 200 `slow done` |
/// | `/hold` | wait until [`HyperUpstream::release`] (at most 30 s), answer 200 `released` |
/// | `/bytes?n=N` | answer 200 with [`pattern`]`(N)` |
/// | `/echo` | read the whole body, answer 200 with it |
/// | `/drip?chunks=N&every=MS` | answer 200, then N chunks `chunk-i\n`, one every MS ms |
/// | `/test.Echo/Unary` | gRPC: answer the one message prefixed with `echo: `, trailers `grpc-status: 0` |
/// | `/test.Echo/Stream?n=N&every=MS` | gRPC: N messages `msg-i`, one every MS ms, then `grpc-status: 0` |
/// | `/test.Echo/Unimplemented` | gRPC: a trailers-only answer, `grpc-status: 12` in the head |
/// | anything else | 200 `ok` |
pub struct HyperUpstream {
    addr: SocketAddr,
    shared: Arc<UpShared>,
    task: JoinHandle<()>,
}

impl HyperUpstream {
    pub async fn start(options: UpstreamOptions) -> HyperUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        Self::serve_on(listener, options)
    }

    /// Starts on `addr` (the address of an upstream that was just dropped: a restart),
    /// retrying the bind for up to 5 s while the old listener closes.
    pub async fn start_at(addr: SocketAddr, options: UpstreamOptions) -> HyperUpstream {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("[upstream] rebinding {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {addr}: {e}"),
            }
        };
        Self::serve_on(listener, options)
    }

    fn serve_on(listener: TcpListener, options: UpstreamOptions) -> HyperUpstream {
        let addr = listener.local_addr().expect("upstream address");
        let shared = Arc::new(UpShared {
            accepted: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
            release: watch::channel(false).0,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone(), options));
        HyperUpstream { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> Vec<Call> {
        lock(&self.shared.calls).clone()
    }

    pub fn call(&self, id: usize) -> Call {
        lock(&self.shared.calls)[id].clone()
    }

    /// Lets every `/hold` call answer.
    pub fn release(&self) {
        self.shared.release.send_replace(true);
    }

    /// Waits until `pred` holds over the calls and the accept count; returns the calls.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[Call], usize) -> bool,
    ) -> Vec<Call> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.mark_unchanged();
            {
                let calls = lock(&self.shared.calls);
                if pred(&calls, self.accepted()) {
                    return calls.clone();
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out after {timeout:?} waiting for the upstream to see {what}; \
                     {} connections accepted; calls:\n{}",
                    self.accepted(),
                    self.summary()
                );
            }
        }
    }

    /// Waits for the first call whose path (query ignored) starts with `prefix`.
    pub async fn wait_call(&self, prefix: &str, timeout: Duration) -> Call {
        let calls = self
            .wait_for(&format!("a call to {prefix}"), timeout, |cs, _| {
                cs.iter().any(|c| c.path_only().starts_with(prefix))
            })
            .await;
        calls
            .into_iter()
            .find(|c| c.path_only().starts_with(prefix))
            .expect("found above")
    }

    /// Waits until call `id` ended; returns it.
    pub async fn wait_end(&self, id: usize, timeout: Duration) -> Call {
        self.wait_for(&format!("call #{id} end"), timeout, |cs, _| {
            cs[id].end.is_some()
        })
        .await;
        self.call(id)
    }

    /// Waits until the connection accept count is at least `n`.
    pub async fn wait_accepted(&self, n: usize, timeout: Duration) {
        self.wait_for(&format!("{n} accepted connections"), timeout, |_, a| a >= n)
            .await;
    }

    pub fn summary(&self) -> String {
        let calls = self.calls();
        let start = calls.first().map(|c| c.arrived);
        let skip = calls.len().saturating_sub(120);
        let mut out = String::new();
        if skip > 0 {
            out.push_str(&format!("  ... {skip} earlier calls\n"));
        }
        for c in &calls[skip..] {
            let t = |i: Instant| {
                format!(
                    "{:.3}s",
                    i.saturating_duration_since(start.unwrap_or(i))
                        .as_secs_f64()
                )
            };
            out.push_str(&format!(
                "  #{} conn {} {:?} {} {} arrived {} sent {} end {:?}\n",
                c.id,
                c.conn,
                c.version,
                c.method,
                c.path,
                t(c.arrived),
                c.sent,
                c.end.map(|(i, e)| (t(i), e)),
            ));
        }
        out
    }
}

impl Drop for HyperUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<UpShared>, options: UpstreamOptions) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let conn = shared.accepted.fetch_add(1, Ordering::SeqCst);
                    shared.notify();
                    let shared = shared.clone();
                    let options = options.clone();
                    conns.spawn(async move {
                        if !options.accept_delay.is_zero() {
                            tokio::time::sleep(options.accept_delay).await;
                        }
                        match options.tls {
                            None => serve(tcp, conn, shared).await,
                            Some(config) => {
                                match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                                    Ok(tls) => serve(tls, conn, shared).await,
                                    Err(e) => eprintln!("[upstream] TLS handshake failed: {e}"),
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    eprintln!("[upstream] accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve<I>(io: I, conn: usize, shared: Arc<UpShared>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(req, conn, shared.clone()));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1000);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
        eprintln!("[upstream] connection {conn} ended: {e}");
    }
}

type UpBody = UnsyncBoxBody<Bytes, Infallible>;

/// A response body fed frame by frame through a channel; dropping it closes the channel,
/// which is how the feeding task learns that hyper gave up on the response.
pub struct ChannelBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut().rx.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn query(path: &str, key: &str, default: u64) -> u64 {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<UpBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp
}

fn grpc_trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    t.insert("grpc-message", HeaderValue::from_static(""));
    t
}

fn grpc_response(rx: mpsc::Receiver<Frame<Bytes>>) -> Response<UpBody> {
    let mut resp = Response::new(ChannelBody { rx }.boxed_unsync());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// Feeds `n` frames made by `make`, one every `every`, then `last` (trailers) if any;
/// records each one sent, and `BodyDropped` as soon as hyper drops the body.
fn feed(
    shared: Arc<UpShared>,
    id: usize,
    n: u64,
    every: Duration,
    make: impl Fn(u64) -> Frame<Bytes> + Send + 'static,
    last: Option<Frame<Bytes>>,
) -> mpsc::Receiver<Frame<Bytes>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for i in 0..n {
            if i > 0 {
                tokio::select! {
                    _ = tx.closed() => {
                        shared.end(id, End::BodyDropped);
                        return;
                    }
                    _ = tokio::time::sleep(every) => {}
                }
            }
            if tx.send(make(i)).await.is_err() {
                shared.end(id, End::BodyDropped);
                return;
            }
            shared.sent_one(id);
        }
        if let Some(last) = last
            && tx.send(last).await.is_err()
        {
            shared.end(id, End::BodyDropped);
            return;
        }
        drop(tx);
        shared.end(id, End::Completed);
    });
    rx
}

async fn handle(
    req: Request<Incoming>,
    conn: usize,
    shared: Arc<UpShared>,
) -> Result<Response<UpBody>, Infallible> {
    let id = shared.arrive(conn, &req);
    let mut guard = HandlerGuard {
        shared: shared.clone(),
        id,
        answered: false,
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |pq| pq.to_string());
    let first = path
        .trim_start_matches('/')
        .split(['/', '?'])
        .next()
        .unwrap_or("")
        .to_string();
    let mut streaming = false;
    let resp = match first.as_str() {
        "slow" => {
            tokio::time::sleep(Duration::from_millis(query(&path, "ms", 0))).await;
            full(StatusCode::OK, "slow done")
        }
        "hold" => {
            let mut rx = shared.release.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| *r)).await;
            full(StatusCode::OK, "released")
        }
        "bytes" => full(StatusCode::OK, pattern(query(&path, "n", 0) as usize)),
        "echo" => match req.into_body().collect().await {
            Ok(c) => full(StatusCode::OK, c.to_bytes()),
            Err(e) => full(StatusCode::BAD_REQUEST, format!("body: {e}")),
        },
        "drip" => {
            streaming = true;
            let rx = feed(
                shared.clone(),
                id,
                query(&path, "chunks", 10),
                Duration::from_millis(query(&path, "every", 100)),
                |i| Frame::data(Bytes::from(format!("chunk-{i}\n"))),
                None,
            );
            Response::new(ChannelBody { rx }.boxed_unsync())
        }
        "test.Echo" if path.starts_with("/test.Echo/Unary") => {
            let mut buf = match req.into_body().collect().await {
                Ok(c) => BytesMut::from(c.to_bytes()),
                Err(e) => {
                    guard.answered = true;
                    shared.end(id, End::Completed);
                    return Ok(full(StatusCode::BAD_REQUEST, format!("body: {e}")));
                }
            };
            let msg = grpc_take(&mut buf).unwrap_or_default();
            let mut reply = b"echo: ".to_vec();
            reply.extend_from_slice(&msg);
            let (tx, rx) = mpsc::channel(2);
            tx.try_send(Frame::data(grpc_frame(&reply)))
                .expect("room for the message");
            tx.try_send(Frame::trailers(grpc_trailers()))
                .expect("room for the trailers");
            grpc_response(rx)
        }
        "test.Echo" if path.starts_with("/test.Echo/Unimplemented") => {
            // A trailers-only response: grpc-status in the head, no body at all.
            let mut resp = full(StatusCode::OK, Bytes::new());
            let h = resp.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static("12"));
            h.insert("grpc-message", HeaderValue::from_static("not here"));
            resp
        }
        "test.Echo" if path.starts_with("/test.Echo/Stream") => {
            streaming = true;
            let rx = feed(
                shared.clone(),
                id,
                query(&path, "n", 100),
                Duration::from_millis(query(&path, "every", 50)),
                |i| Frame::data(grpc_frame(format!("msg-{i}").as_bytes())),
                Some(Frame::trailers(grpc_trailers())),
            );
            grpc_response(rx)
        }
        _ => full(StatusCode::OK, "ok"),
    };
    guard.answered = true;
    if !streaming {
        shared.end(id, End::Completed);
    }
    Ok(resp)
}

// ------------------------------------------------------------------------------------------
// WebSocket
// ------------------------------------------------------------------------------------------

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;

/// One frame, FIN set; masked with `mask` (clients must mask, servers must not).
pub fn ws_encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Takes one whole frame from the front of `buf`: its opcode and unmasked payload.
pub fn ws_decode(buf: &mut BytesMut) -> Option<(u8, Vec<u8>)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return None;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return None;
    }
    buf.advance(at);
    let mut payload = buf.split_to(len).to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some((opcode, payload))
}

/// What the WebSocket upstream saw of one connection.
#[derive(Clone, Debug)]
pub struct WsConn {
    pub accepted: Instant,
    /// The request head it received.
    pub head: String,
    /// When it answered 101.
    pub upgraded: Option<Instant>,
    /// Frames received (before any echo).
    pub received: usize,
    /// Frames echoed.
    pub echoed: usize,
    /// When it saw the connection end (EOF, reset, or a close frame), first sign only.
    pub closed: Option<Instant>,
    /// The protocol TLS negotiated by ALPN, if any.
    pub alpn: Option<String>,
}

struct WsShared {
    conns: Mutex<Vec<WsConn>>,
    changed: watch::Sender<u64>,
}

impl WsShared {
    fn update(&self, i: usize, f: impl FnOnce(&mut WsConn)) {
        f(&mut lock(&self.conns)[i]);
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A WebSocket echo upstream (HTTP/1.1 upgrade, then frame echo) on 127.0.0.1.
///
/// A request whose target contains `slow101` gets its 101 only after 30 s (or never, if
/// the proxy closes first). Behind TLS, a connection that negotiated `h2` by ALPN must
/// start with the HTTP/2 preface, as any real server that selected h2 requires; anything
/// else is a protocol error and the connection is closed without an answer.
pub struct WsUpstream {
    addr: SocketAddr,
    shared: Arc<WsShared>,
    task: JoinHandle<()>,
}

impl WsUpstream {
    pub async fn start() -> WsUpstream {
        Self::start_with(None).await
    }

    /// Behind TLS with `config` (its ALPN list decides what may be negotiated).
    pub async fn start_tls(config: Arc<ServerConfig>) -> WsUpstream {
        Self::start_with(Some(config)).await
    }

    async fn start_with(tls: Option<Arc<ServerConfig>>) -> WsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let shared = Arc::new(WsShared {
            conns: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
        });
        let task = tokio::spawn(ws_accept_loop(listener, shared.clone(), tls));
        WsUpstream { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn conns(&self) -> Vec<WsConn> {
        lock(&self.shared.conns).clone()
    }

    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[WsConn]) -> bool,
    ) -> Vec<WsConn> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.mark_unchanged();
            {
                let conns = lock(&self.shared.conns);
                if pred(&conns) {
                    return conns.clone();
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out after {timeout:?} waiting for the WebSocket upstream to see \
                     {what}; connections: {:#?}",
                    self.conns()
                );
            }
        }
    }

    /// Waits until connection `i` closed; returns it.
    pub async fn wait_closed(&self, i: usize, timeout: Duration) -> WsConn {
        let conns = self
            .wait_for(&format!("connection {i} closed"), timeout, |cs| {
                cs.get(i).is_some_and(|c| c.closed.is_some())
            })
            .await;
        conns[i].clone()
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ws_accept_loop(
    listener: TcpListener,
    shared: Arc<WsShared>,
    tls: Option<Arc<ServerConfig>>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    let i = {
                        let mut c = lock(&shared.conns);
                        c.push(WsConn {
                            accepted: Instant::now(),
                            head: String::new(),
                            upgraded: None,
                            received: 0,
                            echoed: 0,
                            closed: None,
                            alpn: None,
                        });
                        c.len() - 1
                    };
                    shared.changed.send_modify(|n| *n += 1);
                    let shared = shared.clone();
                    let tls = tls.clone();
                    conns.spawn(async move {
                        let Some(config) = tls else {
                            return ws_serve(tcp, i, shared, false).await;
                        };
                        match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                            Ok(tls) => {
                                let alpn = tls
                                    .get_ref()
                                    .1
                                    .alpn_protocol()
                                    .map(|p| String::from_utf8_lossy(p).into_owned());
                                let h2 = alpn.as_deref() == Some("h2");
                                shared.update(i, |c| c.alpn = alpn);
                                ws_serve(tls, i, shared, h2).await
                            }
                            Err(e) => {
                                eprintln!("[ws upstream] TLS handshake failed: {e}");
                                shared.update(i, |c| c.closed = Some(Instant::now()));
                            }
                        }
                    });
                }
                Err(e) => {
                    eprintln!("[ws upstream] accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn ws_serve<I>(mut tcp: I, i: usize, shared: Arc<WsShared>, h2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    if h2 {
        // ALPN chose h2: the peer must send the HTTP/2 preface.
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        while buf.len() < PREFACE.len() {
            match tcp.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if !buf.starts_with(PREFACE) {
            let n = buf.len().min(64);
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            eprintln!("[ws upstream] h2 was negotiated but the peer sent {head:?}");
            shared.update(i, |c| c.head = head);
            return shared.update(i, |c| c.closed = Some(Instant::now()));
        }
    }
    let closed = |shared: &WsShared| shared.update(i, |c| c.closed = Some(Instant::now()));
    // The request head.
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        match tcp.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return closed(&shared),
            Ok(_) => {}
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.advance(head_end);
    let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
    shared.update(i, |c| c.head = head.clone());
    if !upgrade {
        let _ = tcp
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return closed(&shared);
    }
    if head.contains("slow101") {
        let mut byte = [0u8; 1];
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            r = tcp.read(&mut byte) => if matches!(r, Ok(0) | Err(_)) {
                return closed(&shared);
            }
        }
    }
    let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: not-checked-by-anyone=\r\n\r\n";
    if tcp.write_all(answer.as_bytes()).await.is_err() {
        return closed(&shared);
    }
    shared.update(i, |c| c.upgraded = Some(Instant::now()));
    loop {
        while let Some((opcode, payload)) = ws_decode(&mut buf) {
            shared.update(i, |c| c.received += 1);
            if opcode == OP_CLOSE {
                let _ = tcp.write_all(&ws_encode(OP_CLOSE, &payload, None)).await;
                let _ = tcp.shutdown().await;
                return closed(&shared);
            }
            if tcp
                .write_all(&ws_encode(opcode, &payload, None))
                .await
                .is_err()
            {
                return closed(&shared);
            }
            shared.update(i, |c| c.echoed += 1);
        }
        match tcp.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return closed(&shared),
            Ok(_) => {}
        }
    }
}

/// A WebSocket client over a raw TCP connection.
pub struct WsClient {
    pub tcp: TcpStream,
    buf: BytesMut,
}

/// How a [`WsClient::recv`] ended without a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEnd {
    Closed,
    TimedOut,
}

impl WsClient {
    /// Connects to `addr` and upgrades `path`; returns the client and the response status.
    pub async fn connect(addr: SocketAddr, path: &str) -> (WsClient, u16) {
        let mut tcp = bounded(
            Duration::from_secs(5),
            format!("connect to {addr}"),
            TcpStream::connect(addr),
        )
        .await
        .expect("connect");
        let _ = tcp.set_nodelay(true);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: cutoff-test\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(req.as_bytes())
            .await
            .expect("write the upgrade");
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let status = bounded(Duration::from_secs(5), "the upgrade response", async {
            loop {
                if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let mut headers = [httparse::EMPTY_HEADER; 32];
                    let mut resp = httparse::Response::new(&mut headers);
                    resp.parse(&buf[..pos + 4]).expect("a valid response head");
                    let code = resp.code.unwrap_or(0);
                    buf.advance(pos + 4);
                    return code;
                }
                let n = tcp.read_buf(&mut buf).await.expect("read the response");
                assert!(n > 0, "the proxy closed before the upgrade response");
            }
        })
        .await;
        (WsClient { tcp, buf }, status)
    }

    pub async fn send_text(&mut self, text: &str) {
        let frame = ws_encode(OP_TEXT, text.as_bytes(), Some(*b"\x12\x34\x56\x78"));
        bounded(
            Duration::from_secs(5),
            "write a frame",
            self.tcp.write_all(&frame),
        )
        .await
        .expect("write a frame");
    }

    /// The next frame, or how the connection ended first.
    pub async fn recv(&mut self, timeout: Duration) -> Result<(u8, Vec<u8>), WsEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(frame) = ws_decode(&mut self.buf) {
                return Ok(frame);
            }
            match tokio::time::timeout_at(deadline, self.tcp.read_buf(&mut self.buf)).await {
                Err(_) => return Err(WsEnd::TimedOut),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(WsEnd::Closed),
                Ok(Ok(_)) => {}
            }
        }
    }
}
