//! Graceful shutdown, against the real binary: on SIGTERM the listener closes, `/readyz`
//! says 503, idle keep-alive connections close, in-flight requests (protected ones too)
//! get `shutdown_grace` to finish; what is left when it runs out is cancelled (the
//! upstream sees its connection close) and the process exits 0 soon after. A second
//! signal ends the grace at once; the drain ends a lingering close at once.
//!
//! What the upstream observed is asserted, not only what the proxy says. Requests are
//! tagged (`/delay/long?ms=30000`) so that records and log lines are easy to pick out.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The slack on top of the grace the README promises for the exit ("within about 1 s of
/// the grace's end").
const EXIT_AFTER_GRACE: Duration = Duration::from_secs(1);

/// `config` with `shutdown_grace = grace` in its `[server]` table.
fn with_grace(config: &str, grace: &str) -> String {
    let out = config.replacen(
        "[server]\n",
        &format!("[server]\nshutdown_grace = \"{grace}\"\n"),
        1,
    );
    assert_ne!(out, config, "the config has no [server] table");
    out
}

/// Polls `GET /readyz` on the admin listener until it answers 503 (the drain has begun).
/// Returns how long after `since` it first did. There are no change events to wait on
/// from outside the process, so this is a bounded poll.
async fn wait_readyz_503(proxy: &Proxy, since: Instant) -> Duration {
    let admin = proxy.admin_addr();
    within(WAIT, "/readyz to answer 503 after SIGTERM", async {
        loop {
            let r = http_get(admin, "/readyz").await;
            match r.status {
                503 => return since.elapsed(),
                200 => tokio::time::sleep(Duration::from_millis(5)).await,
                other => panic!("/readyz answered {other}: {}", r.text()),
            }
        }
    })
    .await
}

/// Asserts that a new connection to the proxy gets no service: the connect is refused, or
/// the connection is closed without a response.
async fn assert_no_new_connections(addr: SocketAddr) {
    let got = late_connect(addr).await;
    assert!(
        !matches!(got, LateConnect::Served(_)),
        "a connection made after /readyz turned 503 was served: {got:?}"
    );
}

/// What a connection made after the drain began got.
#[derive(Debug, PartialEq, Eq)]
enum LateConnect {
    Refused,
    ClosedWithoutResponse,
    Served(String),
}

/// Connects to `addr`, sends a request, and says what happened.
async fn late_connect(addr: SocketAddr) -> LateConnect {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await;
    let mut stream = match connect {
        Err(_) => panic!("connect to {addr} after SIGTERM neither completed nor failed"),
        Ok(Err(e)) => {
            // Refused, or reset as the listener closed with the connection in its queue.
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ),
                "connect after SIGTERM failed, but not by refusal: {e}"
            );
            return LateConnect::Refused;
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream
        .write_all(b"GET /delay/after-term?ms=0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    match read {
        Err(_) => panic!("a connection made after SIGTERM stayed open 5 s"),
        Ok(_) if buf.is_empty() => LateConnect::ClosedWithoutResponse,
        Ok(_) => LateConnect::Served(String::from_utf8_lossy(&buf).into_owned()),
    }
}

/// Waits for the proxy to exit by `deadline`; asserts exit code 0. Returns the exit time.
async fn assert_exits_zero_by(proxy: &mut Proxy, deadline: Instant, what: &str) -> Instant {
    let left = deadline.saturating_duration_since(Instant::now());
    let status = proxy.wait_exit(left).await;
    let at = Instant::now();
    assert_eq!(status.code(), Some(0), "{what}: exit status {status:?}");
    at
}

fn find_access(proxy: &Proxy, path: &str) -> Value {
    let lines: Vec<Value> = proxy
        .access_logs()
        .into_iter()
        .filter(|v| log_path_is(v, path))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one access-log line for {path}: {lines:?}"
    );
    lines.into_iter().next().expect("one")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_short_requests_finish_and_cuts_the_rest_at_the_grace() {
    let up = Upstream::start().await;
    let grace = Duration::from_secs(1);
    let mut proxy = Proxy::start(&with_grace(&config_for(up.addr(), ""), "1s")).await;

    // Two that cannot finish within the grace: one waiting for headers, one streaming.
    let mut long = Client::connect(proxy.addr()).await;
    long.get("/delay/long?ms=30000").await;
    let long_rec = up.wait_request("/delay/long", WAIT).await;

    let mut stream = Client::connect(proxy.addr()).await;
    stream
        .get("/stream/long?chunks=1000&every=200&size=16")
        .await;
    let stream_head = stream.read_head(WAIT).await;
    assert_eq!(stream_head.status, 200);
    let mut dec = BodyDecoder::new(stream_head.framing());
    let first = stream.next_piece(&mut dec, WAIT).await;
    assert!(
        matches!(first, Ok(Some(_))),
        "first chunk of the stream: {first:?}"
    );
    let stream_rec = up.wait_request("/stream/long", WAIT).await;

    // One that finishes inside the grace.
    let mut short = Client::connect(proxy.addr()).await;
    short.get("/delay/short?ms=300").await;
    let short_rec = up.wait_request("/delay/short", WAIT).await;

    wait_started(&proxy).await;
    let t0 = Instant::now();
    proxy.signal(libc::SIGTERM);

    let ready_after = wait_readyz_503(&proxy, t0).await;
    assert!(
        ready_after < grace,
        "/readyz turned 503 only {ready_after:?} after SIGTERM"
    );
    assert_no_new_connections(proxy.addr()).await;

    // The short one gets its whole response, and it was in flight at the signal.
    let resp = short.read_response(Duration::from_secs(5)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "done");
    let short_rec = up.wait_finished(short_rec.id, WAIT).await;
    assert!(
        short_rec.finished.expect("finished") > t0,
        "the short request had finished before SIGTERM, so it tested nothing: {short_rec:?}"
    );

    // The long one is answered 503 when the grace runs out.
    let head = long.try_read_head(Duration::from_secs(5)).await;
    match head {
        Ok(h) => assert_eq!(h.status, 503, "the request cut by the shutdown: {h:?}"),
        Err(end) => panic!("the request cut by the shutdown got no 503: {end:?}"),
    }
    // The stream is aborted: the connection ends without the last chunk.
    let end = within(Duration::from_secs(5), "the end of the stream", async {
        loop {
            match stream.next_piece(&mut dec, Duration::from_secs(5)).await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await;
    assert!(
        matches!(end, Err(ReadEnd::Eof | ReadEnd::Reset)),
        "the stream should be aborted at the grace's end, not completed or left hanging: {end:?}"
    );

    // Their upstream calls were closed, at the end of the grace, not before.
    for id in [long_rec.id, stream_rec.id] {
        let rec = up.wait_closed(id, WAIT).await;
        let (at, _) = rec.closed.expect("closed");
        let after = at.duration_since(t0);
        assert!(
            after >= grace - Duration::from_millis(100),
            "request #{id} was closed {after:?} after SIGTERM, before the grace ran out: {rec:?}"
        );
        assert!(
            after <= grace + EXIT_AFTER_GRACE,
            "request #{id} was closed {after:?} after SIGTERM: {rec:?}"
        );
    }

    assert_exits_zero_by(&mut proxy, t0 + grace + EXIT_AFTER_GRACE, "after SIGTERM").await;

    let line = find_access(&proxy, "/delay/short");
    assert_access(&line, 200, "ok", None);
    let line = find_access(&proxy, "/delay/long");
    assert_access(&line, 503, "shutdown", Some("shutdown"));
    let line = find_access(&proxy, "/stream/long");
    assert_access(&line, 503, "shutdown", Some("shutdown"));
    assert!(
        line["bytes_out"].as_u64().unwrap_or(0) > 0,
        "the stream had delivered bytes: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_grace_at_once() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&with_grace(&config_for(up.addr(), ""), "30s")).await;

    let mut c = Client::connect(proxy.addr()).await;
    c.get("/delay/second?ms=30000").await;
    let rec = up.wait_request("/delay/second", WAIT).await;

    wait_started(&proxy).await;
    let t0 = Instant::now();
    proxy.signal(libc::SIGTERM);
    // The first signal has been handled (two pending signals could merge into one).
    wait_readyz_503(&proxy, t0).await;
    proxy
        .wait_for_log(|v| v["message"].as_str() == Some("draining"), WAIT)
        .await;

    let t1 = Instant::now();
    proxy.signal(libc::SIGTERM);
    let exited = assert_exits_zero_by(
        &mut proxy,
        t1 + Duration::from_secs(3),
        "after the second SIGTERM",
    )
    .await;
    assert!(
        exited.duration_since(t0) < Duration::from_secs(10),
        "exit {:?} after the first signal; the grace is 30 s",
        exited.duration_since(t0)
    );

    let head = c.try_read_head(WAIT).await;
    match head {
        Ok(h) => assert_eq!(h.status, 503, "{h:?}"),
        Err(end) => panic!("the cut request got no 503: {end:?}"),
    }
    let rec = up.wait_closed(rec.id, WAIT).await;
    let (at, _) = rec.closed.expect("closed");
    assert!(at >= t1, "closed before the second signal: {rec:?}");
    let line = find_access(&proxy, "/delay/second");
    assert_access(&line, 503, "shutdown", Some("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_at_the_drain() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&with_grace(&config_for(up.addr(), ""), "10s")).await;

    // An idle keep-alive connection: one exchange done, the connection held open.
    let mut idle = Client::connect(proxy.addr()).await;
    idle.get("/delay/idle?ms=0").await;
    let resp = idle.read_response(WAIT).await;
    assert_eq!(resp.status, 200);
    assert!(
        !resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "the connection should be kept alive: {resp:?}"
    );

    // A connection that has sent nothing yet. It was accepted before the busy one below
    // (the listener takes connections in order), whose request reaching the upstream
    // proves that.
    let mut silent = Client::connect(proxy.addr()).await;

    // A busy one keeps the process in its drain for a while.
    let mut busy = Client::connect(proxy.addr()).await;
    busy.get("/delay/busy?ms=2500").await;
    let busy_rec = up.wait_request("/delay/busy", WAIT).await;

    wait_started(&proxy).await;
    let t0 = Instant::now();
    proxy.signal(libc::SIGTERM);
    let end = idle.wait_closed_by_peer(Duration::from_secs(2)).await;
    let closed_after = t0.elapsed();
    assert_ne!(
        end,
        ReadEnd::TimedOut,
        "the idle keep-alive connection was not closed within 2 s of SIGTERM"
    );
    assert_eq!(
        silent.wait_closed_by_peer(Duration::from_secs(2)).await,
        ReadEnd::Eof,
        "a connection that had sent nothing was not closed at the drain"
    );
    // Closed by the drain, not by the process ending: the busy request is still running.
    let busy_now = up.record(busy_rec.id);
    assert!(
        busy_now.finished.is_none() && busy_now.closed.is_none(),
        "the idle connection was closed only after the busy request ended ({closed_after:?}): \
         {busy_now:?}"
    );
    assert!(
        closed_after < Duration::from_millis(1500),
        "the idle connection closed {closed_after:?} after SIGTERM"
    );

    let resp = busy.read_response(Duration::from_secs(5)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "done");
    up.wait_finished(busy_rec.id, WAIT).await;
    assert_exits_zero_by(&mut proxy, Instant::now() + WAIT, "after the drain").await;
    let line = find_access(&proxy, "/delay/busy");
    assert_access(&line, 200, "ok", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_calls_in_flight_get_the_grace_too() {
    let up = Upstream::start().await;
    let grace = Duration::from_secs(3);
    let config = with_grace(
        &config_for(
            up.addr(),
            "on_client_disconnect = \"continue\"\ntimeout = \"60s\"",
        ),
        "3s",
    );
    let mut proxy = Proxy::start(&config).await;

    // A protected call whose client stays (a chunked stream of about 600 ms).
    let mut stays = Client::connect(proxy.addr()).await;
    stays.get("/stream/stays?chunks=4&every=200&size=8").await;
    let stays_rec = up.wait_request("/stream/stays", WAIT).await;
    // A protected call whose client already left.
    let mut left = Client::connect(proxy.addr()).await;
    left.get("/delay/left?ms=800").await;
    let left_rec = up.wait_request("/delay/left", WAIT).await;
    left.close_fin().await;
    proxy
        .wait_for_log(
            |v| v["message"].as_str() == Some("client left; protected call continues"),
            WAIT,
        )
        .await;
    // A protected call longer than the grace, whose client stays.
    let mut long = Client::connect(proxy.addr()).await;
    long.get("/delay/plong?ms=30000").await;
    let long_rec = up.wait_request("/delay/plong", WAIT).await;

    wait_started(&proxy).await;
    let t0 = Instant::now();
    proxy.signal(libc::SIGTERM);

    let resp = stays.read_response(Duration::from_secs(5)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "aaaaaaaabbbbbbbbccccccccdddddddd");
    let rec = up.wait_finished(stays_rec.id, WAIT).await;
    assert!(rec.finished.expect("finished") > t0, "{rec:?}");
    // The call whose client left runs to its end too, inside the grace.
    let rec = up.wait_finished(left_rec.id, WAIT).await;
    assert!(rec.finished.expect("finished") > t0, "{rec:?}");

    // The long one is cut when the grace runs out: 503, the upstream sees the close.
    let head = long.try_read_head(grace + Duration::from_secs(3)).await;
    match head {
        Ok(h) => assert_eq!(h.status, 503, "{h:?}"),
        Err(end) => panic!("the protected call cut by the shutdown got no 503: {end:?}"),
    }
    let rec = up.wait_closed(long_rec.id, WAIT).await;
    let after = rec.closed.expect("closed").0.duration_since(t0);
    assert!(
        after >= grace - Duration::from_millis(100),
        "the long protected call was closed {after:?} after SIGTERM, before the grace ran out"
    );

    assert_exits_zero_by(&mut proxy, t0 + grace + EXIT_AFTER_GRACE, "after SIGTERM").await;

    let line = find_access(&proxy, "/stream/stays");
    assert_access(&line, 200, "ok", None);
    assert_eq!(line["protected"], false, "{line}");
    let line = find_access(&proxy, "/delay/left");
    assert_eq!(line["status"].as_u64(), Some(499), "{line}");
    assert_eq!(line["outcome"], "client_closed", "{line}");
    assert_eq!(line["protected"], true, "{line}");
    let line = find_access(&proxy, "/delay/plong");
    assert_access(&line, 503, "shutdown", Some("shutdown"));
}

/// The drain's "new connections are refused" has no window: a connection made once
/// `/readyz` says 503 is never served. A race here is narrow (it needs the connection to
/// arrive between the drain starting and the listener closing), so the scenario is
/// repeated on fresh processes to make it show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_made_after_the_drain_began_are_never_served() {
    let up = Upstream::start().await;
    let config = with_grace(&config_for(up.addr(), ""), "5s");
    const LATE_CONNECTS: usize = 4;
    let rounds = 100;
    let mut served = Vec::new();
    for round in 0..rounds {
        let proxy = Proxy::start(&config).await;
        // Something in flight, so that the process stays in its drain.
        let mut c = Client::connect(proxy.addr()).await;
        let tag = format!("/delay/hold-{round}");
        c.get(&format!("{tag}?ms=3000")).await;
        up.wait_request(&tag, WAIT).await;
        wait_started(&proxy).await;
        let t0 = Instant::now();
        proxy.signal(libc::SIGTERM);
        wait_readyz_503(&proxy, t0).await;
        // A few at once, so that more than one may be queued when the listener closes.
        let mut late = tokio::task::JoinSet::new();
        for _ in 0..LATE_CONNECTS {
            late.spawn(late_connect(proxy.addr()));
        }
        while let Some(got) = late.join_next().await {
            if let LateConnect::Served(resp) = got.expect("a late connect") {
                served.push((round, resp));
            }
        }
        // Dropping the proxy kills it.
    }
    assert!(
        served.is_empty(),
        "{} of {} connections made after /readyz turned 503 were served (round, response): \
         {served:?}",
        served.len(),
        rounds * LATE_CONNECTS
    );
}

/// The `listening` lines say the proxy is up, and supervisors send SIGTERM whenever they
/// like: a SIGTERM right after them must be a graceful drain (exit 0), never the default
/// disposition that kills the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_startup_drains_instead_of_killing() {
    use std::os::unix::process::ExitStatusExt;
    let up = Upstream::start().await;
    let config = config_for(up.addr(), "");
    let rounds = 10;
    let mut killed = Vec::new();
    for round in 0..rounds {
        let mut proxy = Proxy::start(&config).await;
        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit(WAIT).await;
        if status.code() != Some(0) {
            killed.push((round, status, status.signal()));
        }
    }
    assert!(
        killed.is_empty(),
        "{} of {rounds} proxies sent SIGTERM right after their `listening` lines did not \
         exit 0 (round, status, signal): {killed:?}",
        killed.len()
    );
}

/// Each worker tells its own connections of the drain and of the forced end
/// (`shutdown::Seat`). With four workers, twelve idle keep-alive connections all close at
/// the drain and twelve requests waiting for headers all get a 503 at the grace's end,
/// their upstream calls closed: none of the workers they landed on (at least two, read
/// from the kernel's epoll sets) missed either step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_tells_its_own_connections() {
    const EACH: usize = 12;
    let up = Upstream::start().await;
    let config = with_grace(&config_with_server("workers = 4", up.addr()), "1s");
    let mut proxy = Proxy::start(&config).await;

    let mut idle = Vec::new();
    for i in 0..EACH {
        let mut c = Client::connect(proxy.addr()).await;
        c.get(&format!("/delay/idle-{i}?ms=0")).await;
        assert_eq!(c.read_response(WAIT).await.status, 200);
        idle.push(c);
    }
    let mut waiting = Vec::new();
    for i in 0..EACH {
        let mut c = Client::connect(proxy.addr()).await;
        let path = format!("/delay/held-{i}");
        c.get(&format!("{path}?ms=30000")).await;
        waiting.push((c, up.wait_request(&path, WAIT).await));
    }

    // The test means something only if the connections landed on more than one worker.
    let spread = proxy.client_connections_per_worker();
    assert!(
        spread.len() >= 2 && spread.iter().sum::<usize>() == 2 * EACH,
        "the {} connections should be spread over the workers: {spread:?}",
        2 * EACH
    );

    wait_started(&proxy).await;
    let t0 = Instant::now();
    proxy.signal(libc::SIGTERM);
    for (i, c) in idle.iter_mut().enumerate() {
        assert_ne!(
            c.wait_closed_by_peer(Duration::from_secs(2)).await,
            ReadEnd::TimedOut,
            "idle connection {i} was not closed within 2 s of SIGTERM"
        );
    }
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "the idle connections closed only {:?} after SIGTERM, near the grace's end",
        t0.elapsed()
    );
    for (i, (c, rec)) in waiting.iter_mut().enumerate() {
        match c.try_read_head(Duration::from_secs(5)).await {
            Ok(h) => assert_eq!(h.status, 503, "held request {i}: {h:?}"),
            Err(end) => panic!("held request {i} got no 503 at the grace's end: {end:?}"),
        }
        up.wait_closed(rec.id, WAIT).await;
    }
    assert_exits_zero_by(&mut proxy, Instant::now() + WAIT, "after the grace").await;
}

/// A connection that answered before reading its request's body lingers, reading and
/// dropping what its client still sends (see `linger.rs`), for up to 5 s of silence. The
/// drain ends that at once: the answer went out, and a silent client must not hold the
/// process for the rest of its linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_a_lingering_close() {
    let up = Upstream::start().await;
    let config = with_debug_logs(&with_grace(&config_for(up.addr(), ""), "20s"));
    let mut proxy = Proxy::start(&config).await;
    // Only a part of the body is sent; the client then stays, silent.
    let client = answered_before_its_body(proxy.addr(), "/lingering", 1_000_000, 1000).await;

    wait_started(&proxy).await;
    proxy.signal(libc::SIGTERM);
    let line = proxy
        .wait_for_log(
            |v| v["message"].as_str() == Some("lingering close ended"),
            WAIT,
        )
        .await;
    assert_eq!(line["ended"], "drain", "{line}");
    assert_exits_zero_by(&mut proxy, Instant::now() + WAIT, "after the drain").await;
    assert!(up.records().is_empty(), "{}", up.summary());
    drop(client);
}
