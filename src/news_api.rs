//! A demo upstream for `cutoff`, shaped like a top-headlines news API.
//!
//! It exists so that cancellation can be *seen*: every request that does "work"
//! (waits out a `delay`, or streams events over time) holds a guard that counts
//! it as `completed` when the work finishes, or as `cancelled` (and logs it) when
//! hyper drops the work because the client went away first. Put the proxy in
//! front of it, let the proxy time out or the client hang up, and `/stats` plus
//! the log show whether the abandonment actually reached the upstream.
//!
//! Endpoints:
//! - `GET /v2/top-headlines?country=us&delay=2s&pageSize=5`: JSON after `delay`.
//! - `GET /v2/stream?every=500ms&count=20`: server-sent events, one per `every`.
//! - `GET /stats`: `{"completed":N,"cancelled":M}`.
//! - `GET /healthz`: `ok`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};

const LOG_TARGET: &str = "cutoff::news_api";

const DEFAULT_DELAY: Duration = Duration::from_secs(2);
const DEFAULT_EVERY: Duration = Duration::from_millis(500);
/// A demo should never pin a connection for longer than someone will watch it.
const MAX_DURATION: Duration = Duration::from_secs(10 * 60);
/// `tokio::time::interval` panics on a zero period, and a zero-period stream
/// would only spin; a millisecond is still "as fast as you like" for a demo.
const MIN_EVERY: Duration = Duration::from_millis(1);
const DEFAULT_COUNT: u64 = 20;
const MAX_COUNT: u64 = 10_000;
const DEFAULT_PAGE_SIZE: usize = 5;

type ResponseBody = Either<Full<Bytes>, SseBody>;

/// Serves the demo news API on `listener` until `shutdown` resolves.
///
/// Counters live per call, not in statics, so several servers in one process
/// (tests, `--demo`) each report only their own work. Connections still open
/// at shutdown are dropped rather than drained: the demo has nothing worth
/// finishing, and waiting on a slow stream would hold up the caller.
///
/// Accept errors are logged and retried rather than returned, because a demo
/// should outlive a burst of EMFILE; so in practice this returns `Ok(())`.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let state = Arc::new(State::default());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&state)));
                }
                Err(err) if is_connection_error(&err) => {
                    tracing::debug!(target: LOG_TARGET, error = %err, "accept failed for one connection");
                }
                Err(err) => {
                    // Typically EMFILE/ENFILE: retrying at once would spin while
                    // nothing can change, so give other tasks a moment to close fds.
                    tracing::warn!(target: LOG_TARGET, error = %err, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(err) = joined
                    && err.is_panic()
                {
                    tracing::error!(target: LOG_TARGET, error = %err, "connection task panicked");
                }
            }
        }
    }

    // Work torn down by our own shutdown is not a client going away; the flag
    // keeps it out of the `cancelled` count and its log line.
    state.shutting_down.store(true, Ordering::SeqCst);
    connections.shutdown().await;
    Ok(())
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    // Streamed events are small and latency is the point of the demo.
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(target: LOG_TARGET, error = %err, "could not set TCP_NODELAY");
    }
    let service = service_fn(move |req| {
        let work = route(&req, &state);
        async move { Ok::<_, Infallible>(work.run().await) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        // A client hanging up mid-request is the normal case here, not a fault.
        tracing::debug!(target: LOG_TARGET, error = %err, "connection ended with an error");
    }
}

#[derive(Default)]
struct State {
    completed: AtomicU64,
    cancelled: AtomicU64,
    shutting_down: AtomicBool,
}

/// Counts one piece of work exactly once: as completed if `finish` is called,
/// otherwise as cancelled when dropped.
///
/// Drop is the only signal hyper gives that a client left: it drops the
/// service future (while the handler waits) or the response body (while it
/// streams) once the connection closes, and runs no other code on our behalf.
struct WorkGuard {
    state: Arc<State>,
    path: String,
    started: Instant,
    finished: bool,
}

impl WorkGuard {
    fn new(state: &Arc<State>, path: &str) -> Self {
        Self {
            state: Arc::clone(state),
            path: path.to_owned(),
            started: Instant::now(),
            finished: false,
        }
    }

    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.state.completed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if self.state.shutting_down.load(Ordering::SeqCst) {
            tracing::debug!(
                target: LOG_TARGET,
                path = %self.path,
                elapsed_ms,
                "work abandoned: the server shut down"
            );
            return;
        }
        self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        tracing::info!(
            target: LOG_TARGET,
            path = %self.path,
            elapsed_ms,
            "work abandoned: the connection closed first"
        );
    }
}

/// What a request turned into, decided synchronously when hyper hands it over.
///
/// The guard is created here rather than inside the async block so that a
/// future dropped before its first poll is still counted as cancelled.
enum Work {
    Ready(Response<ResponseBody>),
    Headlines {
        delay: Duration,
        page_size: usize,
        guard: WorkGuard,
    },
}

impl Work {
    async fn run(self) -> Response<ResponseBody> {
        match self {
            Work::Ready(response) => response,
            Work::Headlines {
                delay,
                page_size,
                mut guard,
            } => {
                tokio::time::sleep(delay).await;
                guard.finish();
                let articles: Vec<Article> = (0..page_size).map(Article::nth).collect();
                json_response(
                    StatusCode::OK,
                    &Headlines {
                        status: "ok",
                        total_results: articles.len(),
                        articles,
                    },
                )
            }
        }
    }
}

/// The paths this server answers, so that "unknown path" and "wrong method"
/// can be told apart before any parameter is looked at.
#[derive(Clone, Copy)]
enum Endpoint {
    TopHeadlines,
    Stream,
    Stats,
    Healthz,
}

impl Endpoint {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v2/top-headlines" => Some(Self::TopHeadlines),
            "/v2/stream" => Some(Self::Stream),
            "/stats" => Some(Self::Stats),
            "/healthz" => Some(Self::Healthz),
            _ => None,
        }
    }
}

fn route(req: &Request<Incoming>, state: &Arc<State>) -> Work {
    let path = req.uri().path();
    let Some(endpoint) = Endpoint::from_path(path) else {
        return Work::Ready(error_response(
            StatusCode::NOT_FOUND,
            "notFound",
            &format!("No route for {path}. Try /v2/top-headlines, /v2/stream, /stats or /healthz."),
        ));
    };
    if req.method() != Method::GET {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "methodNotAllowed",
            &format!("{path} only answers GET."),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return Work::Ready(response);
    }
    let query = Query::parse(req.uri().query().unwrap_or(""));
    match route_get(endpoint, path, &query, state) {
        Ok(work) => work,
        Err(message) => Work::Ready(error_response(
            StatusCode::BAD_REQUEST,
            "parameterInvalid",
            &message,
        )),
    }
}

fn route_get(
    endpoint: Endpoint,
    path: &str,
    query: &Query,
    state: &Arc<State>,
) -> Result<Work, String> {
    let work = match endpoint {
        Endpoint::TopHeadlines => {
            let delay = query.duration("delay", DEFAULT_DELAY)?.min(MAX_DURATION);
            let page_size = query
                .number("pageSize", DEFAULT_PAGE_SIZE)?
                .min(HEADLINES.len());
            Work::Headlines {
                delay,
                page_size,
                guard: WorkGuard::new(state, path),
            }
        }
        Endpoint::Stream => {
            let every = query
                .duration("every", DEFAULT_EVERY)?
                .clamp(MIN_EVERY, MAX_DURATION);
            let count = query.number("count", DEFAULT_COUNT)?.min(MAX_COUNT);
            let body = SseBody::new(every, count, WorkGuard::new(state, path));
            let mut response = Response::new(Either::Right(body));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            Work::Ready(response)
        }
        Endpoint::Stats => Work::Ready(json_response(
            StatusCode::OK,
            &Stats {
                completed: state.completed.load(Ordering::SeqCst),
                cancelled: state.cancelled.load(Ordering::SeqCst),
            },
        )),
        Endpoint::Healthz => {
            let mut response = Response::new(Either::Left(Full::new(Bytes::from_static(b"ok"))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Work::Ready(response)
        }
    };
    Ok(work)
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Left(Full::new(to_json(value))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    json_response(
        status,
        &ApiError {
            status: "error",
            code,
            message,
        },
    )
}

/// Serializes with a canned fallback instead of an `unwrap`: these plain
/// structs cannot fail to serialize, but a request must never be able to
/// panic the connection task.
fn to_json(value: &impl Serialize) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(json) => Bytes::from(json),
        Err(err) => {
            tracing::error!(target: LOG_TARGET, error = %err, "could not serialize a response");
            Bytes::from_static(
                br#"{"status":"error","code":"unexpectedError","message":"could not serialize the response"}"#,
            )
        }
    }
}

// Response shapes. Structs rather than `json!` so that fields come out in the
// order a reader of the real API expects ("status" first), without turning on
// serde_json's `preserve_order`.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Headlines {
    status: &'static str,
    total_results: usize,
    articles: Vec<Article>,
}

#[derive(Serialize)]
struct Stats {
    completed: u64,
    cancelled: u64,
}

#[derive(Serialize)]
struct ApiError<'a> {
    status: &'static str,
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Article {
    source: Source,
    author: Option<&'static str>,
    title: &'static str,
    description: &'static str,
    url: String,
    published_at: String,
}

#[derive(Serialize)]
struct Source {
    id: Option<&'static str>,
    name: &'static str,
}

/// Decoded query parameters; the first occurrence of a name wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        let pairs = raw
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(name), percent_decode(value))
            })
            .collect();
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn duration(&self, name: &str, default: Duration) -> Result<Duration, String> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => humantime::parse_duration(raw.trim()).map_err(|err| {
                format!("The {name} parameter is invalid: {raw:?} is not a duration like 2s or 500ms ({err}).")
            }),
        }
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|_| {
                format!("The {name} parameter is invalid: {raw:?} is not a non-negative integer.")
            }),
        }
    }
}

/// Minimal `application/x-www-form-urlencoded` decoding, so `delay=1%20s` and
/// `delay=1+s` work; malformed escapes are kept literally rather than rejected.
fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex_value(bytes.get(i + 1)), hex_value(bytes.get(i + 2))) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(byte: Option<&u8>) -> Option<u8> {
    let digit = char::from(*byte?).to_digit(16)?;
    u8::try_from(digit).ok()
}

/// A server-sent-events body that produces one headline per tick.
///
/// It is a hand-written `Body` rather than a buffered response so that each
/// event leaves when its tick fires, and so that hyper dropping it mid-stream
/// (the client left) drops the guard and is counted.
struct SseBody {
    ticks: Interval,
    sent: usize,
    remaining: u64,
    guard: WorkGuard,
}

impl SseBody {
    fn new(every: Duration, count: u64, mut guard: WorkGuard) -> Self {
        // hyper drops an already-ended body without polling it, so an empty
        // stream has to count as finished from the start.
        if count == 0 {
            guard.finish();
        }
        // The first event comes after one period, not immediately, so that
        // `every` reads as the pace of the work.
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        // A slow reader should get a slower stream, not a burst of catch-up events.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            ticks,
            sent: 0,
            remaining: count,
            guard,
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            this.guard.finish();
            return Poll::Ready(None);
        }
        ready!(this.ticks.poll_tick(cx));
        let json = to_json(&Article::nth(this.sent));
        let mut event = Vec::with_capacity(json.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&json);
        event.extend_from_slice(b"\n\n");
        this.sent += 1;
        this.remaining -= 1;
        if this.remaining == 0 {
            // hyper sees `is_end_stream` and drops the body without polling
            // again, so the last event is where the work counts as done.
            this.guard.finish();
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

struct Headline {
    source: &'static str,
    author: Option<&'static str>,
    title: &'static str,
    description: &'static str,
    slug: &'static str,
}

const HEADLINES: &[Headline] = &[
    Headline {
        source: "The Daily Packet",
        author: Some("Ada Lindqvist"),
        title: "City council approves late-night bus network after two-year trial",
        description: "Routes that ran as a pilot since 2023 become permanent, with service every 20 minutes until 3 a.m.",
        slug: "city-council-approves-late-night-bus-network",
    },
    Headline {
        source: "Harbor Ledger",
        author: Some("Marcus Obi"),
        title: "Port traffic rebounds as new container cranes come online",
        description: "Officials say turnaround times fell by a third in the first month of operation.",
        slug: "port-traffic-rebounds-new-cranes",
    },
    Headline {
        source: "Northern Wire",
        author: None,
        title: "Early frost expected across the northern plains this weekend",
        description: "Forecasters urge gardeners to cover tender plants as overnight lows dip below freezing.",
        slug: "early-frost-northern-plains",
    },
    Headline {
        source: "Tech Evening",
        author: Some("Priya Raman"),
        title: "Open-source maintainers propose shared fund for critical libraries",
        description: "The plan would pool contributions from companies that depend on small, under-staffed projects.",
        slug: "open-source-shared-fund-critical-libraries",
    },
    Headline {
        source: "Field & Court",
        author: Some("Jonah Reyes"),
        title: "Underdog club clinches playoff spot on final day of season",
        description: "A stoppage-time goal sealed a result few predicted in the spring.",
        slug: "underdog-club-clinches-playoff-spot",
    },
    Headline {
        source: "The Daily Packet",
        author: Some("Helen Park"),
        title: "Library system extends weekend hours at twelve branches",
        description: "The change follows a survey in which most respondents asked for Sunday afternoon access.",
        slug: "library-extends-weekend-hours",
    },
    Headline {
        source: "Science Notes",
        author: Some("Tomas Varga"),
        title: "Researchers map migration route of rare mountain butterfly",
        description: "Tiny radio tags revealed a journey of more than 400 kilometers across three valleys.",
        slug: "rare-mountain-butterfly-migration-mapped",
    },
    Headline {
        source: "Market Brief",
        author: None,
        title: "Small businesses report steadier supply costs for third quarter",
        description: "A regional survey finds fewer owners expecting price increases before the holidays.",
        slug: "small-business-supply-costs-steady",
    },
    Headline {
        source: "Harbor Ledger",
        author: Some("Lena Fischer"),
        title: "Restored lighthouse opens to visitors after decade-long effort",
        description: "Volunteers raised funds to repair the lantern room and reinstall the original lens.",
        slug: "restored-lighthouse-opens",
    },
    Headline {
        source: "Tech Evening",
        author: Some("Sam Okafor"),
        title: "Regional rail operator trials real-time seat availability app",
        description: "Commuters on two lines can now see which carriages have room before the train arrives.",
        slug: "rail-operator-seat-availability-app",
    },
    Headline {
        source: "Northern Wire",
        author: Some("Grace Holm"),
        title: "Community orchard harvest feeds hundreds at autumn festival",
        description: "Apples from trees planted fifteen years ago were pressed into cider on site.",
        slug: "community-orchard-autumn-festival",
    },
    Headline {
        source: "Science Notes",
        author: None,
        title: "Amateur astronomers spot brightening comet ahead of forecasts",
        description: "The comet may be visible with binoculars before dawn later this month.",
        slug: "amateur-astronomers-brightening-comet",
    },
];

impl Article {
    /// The `index`-th article, cycling through the built-in list, stamped a
    /// little further in the past for each position so the list reads like a
    /// live feed.
    fn nth(index: usize) -> Self {
        let position = index % HEADLINES.len();
        let headline = &HEADLINES[position];
        let minutes_ago = u64::try_from(position).unwrap_or(0) * 17 + 3;
        let published = SystemTime::now()
            .checked_sub(Duration::from_secs(minutes_ago * 60))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Self {
            source: Source {
                id: None,
                name: headline.source,
            },
            author: headline.author,
            title: headline.title,
            description: headline.description,
            url: format!("https://news.example.com/{}", headline.slug),
            published_at: humantime::format_rfc3339_seconds(published).to_string(),
        }
    }
}
