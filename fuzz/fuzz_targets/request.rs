//! Any bytes a client sends reach the proxy's real request path (hyper's HTTP/1.1 server,
//! route matching, header rewriting, the outcome guard, an upstream call) and end with a
//! response or a closed connection, never a panic.
//!
//! The connection is an in-memory duplex; the upstream is a closed loopback port, so every
//! routed request takes the upstream-failure path and answers 502 quickly.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cutoff::headers::ClientInfo;
use cutoff::body::RequestState;
use cutoff::outcome::{ClientConn, Stamped};
use cutoff::proxy::{self, ConnContext, Shared};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[upstreams.closed]
url = "http://127.0.0.1:1/base"
connect_timeout = "50ms"
[[routes]]
name = "news"
path_prefix = "/news/"
strip_prefix = true
upstream = "closed"
timeout = "200ms"
accept_deadline_header = "x-request-timeout-ms"
deadline_header = "x-request-timeout-ms"
[[routes]]
name = "protected"
path_prefix = "/p/"
upstream = "closed"
on_client_disconnect = "continue"
timeout = "200ms"
"#;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn shared() -> Arc<Shared> {
    static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let config = cutoff::config::parse(std::path::Path::new("fuzz.toml"), CONFIG)
                .expect("fuzz config is valid");
            let table = runtime()
                .block_on(async { cutoff::routes::RouteTable::build(&config, None) })
                .expect("table");
            Arc::new(Shared {
                table: arc_swap::ArcSwap::from_pointee(table),
                lifecycle: Arc::new(cutoff::shutdown::Lifecycle::default()),
                body_read_timeout: Duration::from_millis(100),
                tasks: tokio_util::task::TaskTracker::new(),
                tls: arc_swap::ArcSwapOption::empty(),
            })
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let shared = shared();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let cx = Arc::new(ConnContext {
            shared,
            client: Arc::new(ClientConn::default()),
            info: ClientInfo::new([127, 0, 0, 1].into(), false),
        });
        let service = service_fn(move |req| {
            let state = Arc::new(RequestState::default());
            Stamped::new(proxy::handle(req, cx.clone(), state.clone()), state)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(100))
            .serve_connection(TokioIo::new(server), service);
        let drive = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::join!(conn, drive)
        })
        .await;
    });
});
