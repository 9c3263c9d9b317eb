//! Integration tests for the demo news API over real sockets: each test runs
//! its own server on an ephemeral port, so counters never leak between tests.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// Bounds every wait in these tests: a broken server fails a test, never hangs it.
const DEADLINE: Duration = Duration::from_secs(3);

struct Server {
    addr: SocketAddr,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cutoff::news_api::serve(listener, async move {
            let _ = stopped.await;
        }));
        // No proxy: a proxy from the environment must not intercept 127.0.0.1.
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        Self {
            addr,
            client,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    async fn get(&self, path_and_query: &str) -> reqwest::Response {
        timeout(DEADLINE, self.client.get(self.url(path_and_query)).send())
            .await
            .expect("request timed out")
            .expect("request failed")
    }

    async fn get_json(&self, path_and_query: &str) -> (reqwest::StatusCode, Value) {
        let response = self.get(path_and_query).await;
        let status = response.status();
        let body = timeout(DEADLINE, response.bytes())
            .await
            .expect("body timed out")
            .expect("body failed");
        let json = serde_json::from_slice(&body).expect("body is JSON");
        (status, json)
    }

    async fn stats(&self) -> (u64, u64) {
        let (status, json) = self.get_json("/stats").await;
        assert_eq!(status, 200);
        let field = |name: &str| {
            json[name]
                .as_u64()
                .unwrap_or_else(|| panic!("{name} missing in {json}"))
        };
        (field("completed"), field("cancelled"))
    }

    /// Polls `/stats` until `cancelled` reaches `want`, failing at the deadline.
    async fn wait_for_cancelled(&self, want: u64) -> (u64, u64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let stats = self.stats().await;
            if stats.1 >= want {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "cancelled never reached {want}; last stats (completed, cancelled) = {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = timeout(DEADLINE, &mut self.task)
            .await
            .expect("serve did not return after shutdown")
            .expect("serve task panicked");
        result.expect("serve returned an error");
    }
}

/// Reads SSE events from a streaming response until `want` complete events
/// arrived or the body ended; returns the `data:` payloads seen.
async fn read_events(response: &mut reqwest::Response, want: usize) -> Vec<String> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < want {
        let chunk = timeout(DEADLINE, response.chunk())
            .await
            .expect("stream stalled")
            .expect("stream failed");
        let Some(chunk) = chunk else { break };
        buffer.push_str(std::str::from_utf8(&chunk).expect("utf-8 event"));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let data = event
                .trim_end()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"));
            events.push(data.to_owned());
        }
    }
    events
}

#[tokio::test]
async fn top_headlines_returns_articles_and_counts_completion() {
    let server = Server::start().await;

    let response = server
        .get("/v2/top-headlines?country=us&delay=50ms&pageSize=3")
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "content type"
    );
    let json: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
    assert_eq!(json["status"], "ok");
    let articles = json["articles"].as_array().expect("articles array");
    assert_eq!(articles.len(), 3);
    assert_eq!(json["totalResults"], 3);
    for article in articles {
        assert!(article["title"].is_string(), "title in {article}");
        assert!(article["source"]["name"].is_string(), "source in {article}");
        assert!(article["url"].is_string(), "url in {article}");
        assert!(
            article["publishedAt"].is_string(),
            "publishedAt in {article}"
        );
    }

    assert_eq!(server.stats().await, (1, 0));
    server.stop().await;
}

#[tokio::test]
async fn page_size_is_capped_at_the_list_size() {
    let server = Server::start().await;
    let (status, json) = server
        .get_json("/v2/top-headlines?delay=0s&pageSize=1000")
        .await;
    assert_eq!(status, 200);
    let count = json["articles"].as_array().expect("articles").len();
    assert!((1..1000).contains(&count), "got {count} articles");
    server.stop().await;
}

thread_local! {
    /// Log output of the current thread, while a `LogCapture` is alive on it.
    static CAPTURED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Captures what the server logs on this thread.
///
/// The subscriber is global and the buffer thread-local, rather than a scoped
/// `tracing::subscriber::set_default`: with a single scoped dispatcher,
/// tracing-core caches each callsite's interest from whichever thread hits it
/// first, so another test thread logging the same line without a subscriber
/// would silence it here. The default current-thread runtime keeps the
/// server's tasks on the test thread, so their events land in this buffer.
struct LogCapture;

impl LogCapture {
    fn start() -> Self {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(|| ThreadLocalWriter)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber");
        });
        CAPTURED.with(|captured| *captured.borrow_mut() = Some(Vec::new()));
        Self
    }

    fn contents(&self) -> String {
        CAPTURED.with(|captured| {
            String::from_utf8_lossy(captured.borrow().as_deref().unwrap_or_default()).into_owned()
        })
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        CAPTURED.with(|captured| *captured.borrow_mut() = None);
    }
}

struct ThreadLocalWriter;

impl std::io::Write for ThreadLocalWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.with(|captured| {
            if let Some(captured) = captured.borrow_mut().as_mut() {
                captured.extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn client_closing_during_delay_counts_as_cancelled() {
    let logs = LogCapture::start();
    let server = Server::start().await;

    let mut socket = TcpStream::connect(server.addr).await.expect("connect");
    socket
        .write_all(b"GET /v2/top-headlines?delay=5s HTTP/1.1\r\nHost: news\r\n\r\n")
        .await
        .expect("write request");
    // The scenario, not synchronization: the client gives up while the server waits.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(socket);

    let (completed, cancelled) = server.wait_for_cancelled(1).await;
    assert_eq!((completed, cancelled), (0, 1));
    server.stop().await;

    let logs = logs.contents();
    let abandoned: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("work abandoned: the connection closed first"))
        .collect();
    assert_eq!(abandoned.len(), 1, "logs:\n{logs}");
    assert!(
        abandoned[0].contains("cutoff::news_api"),
        "{}",
        abandoned[0]
    );
    assert!(
        abandoned[0].contains("path=/v2/top-headlines"),
        "{}",
        abandoned[0]
    );
    assert!(abandoned[0].contains("elapsed_ms="), "{}", abandoned[0]);
}

#[tokio::test]
async fn stream_delivers_count_events_then_ends() {
    let server = Server::start().await;

    let mut response = server.get("/v2/stream?every=10ms&count=5").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = read_events(&mut response, usize::MAX).await;
    assert_eq!(events.len(), 5);
    for data in &events {
        let article: Value = serde_json::from_str(data).expect("event is JSON");
        assert!(article["title"].is_string(), "title in {article}");
    }

    assert_eq!(server.stats().await, (1, 0));
    server.stop().await;
}

#[tokio::test]
async fn dropping_a_stream_midway_counts_as_cancelled() {
    let server = Server::start().await;

    let mut response = server.get("/v2/stream?every=10ms&count=1000").await;
    assert_eq!(response.status(), 200);
    let events = read_events(&mut response, 2).await;
    assert!(events.len() >= 2, "got {} events", events.len());
    drop(response);

    let (completed, cancelled) = server.wait_for_cancelled(1).await;
    assert_eq!((completed, cancelled), (0, 1));
    server.stop().await;
}

#[tokio::test]
async fn bad_parameters_are_rejected_with_400() {
    let server = Server::start().await;

    for path in [
        "/v2/top-headlines?delay=abc",
        "/v2/stream?every=soon",
        "/v2/stream?count=-1",
    ] {
        let (status, json) = server.get_json(path).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(json["status"], "error", "{path}");
        assert_eq!(json["code"], "parameterInvalid", "{path}");
        assert!(json["message"].is_string(), "{path}");
    }

    assert_eq!(server.stats().await, (0, 0));
    server.stop().await;
}

#[tokio::test]
async fn url_encoded_durations_are_accepted() {
    let server = Server::start().await;
    for path in [
        "/v2/top-headlines?delay=10+ms&pageSize=1",
        "/v2/top-headlines?delay=10%20ms&pageSize=1",
    ] {
        let (status, json) = server.get_json(path).await;
        assert_eq!(status, 200, "{path}: {json}");
    }
    assert_eq!(server.stats().await, (2, 0));
    server.stop().await;
}

#[tokio::test]
async fn unknown_paths_get_404_and_healthz_answers() {
    let server = Server::start().await;

    let (status, json) = server.get_json("/v2/everything").await;
    assert_eq!(status, 404);
    assert_eq!(json["status"], "error");
    assert_eq!(json["code"], "notFound");

    let response = server.get("/healthz").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "ok");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_returns_even_with_a_connection_in_flight() {
    let server = Server::start().await;

    let mut socket = TcpStream::connect(server.addr).await.expect("connect");
    socket
        .write_all(b"GET /v2/top-headlines?delay=10m HTTP/1.1\r\nHost: news\r\n\r\n")
        .await
        .expect("write request");
    // Another client's answer shows the server is up. Whether or not the slow
    // request was dispatched yet, shutdown must not wait for it.
    assert_eq!(server.stats().await, (0, 0));

    server.stop().await;
    // The in-flight connection was dropped with the server, so the client sees EOF.
    let mut rest = Vec::new();
    let read = timeout(DEADLINE, socket.read_to_end(&mut rest))
        .await
        .expect("socket still open after shutdown");
    assert!(read.is_ok() || rest.is_empty());
}
