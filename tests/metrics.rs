//! The metrics contract, checked against the real binary and a recording upstream.
//!
//! A known mix of traffic goes through the proxy, each kind on a route of its own (same
//! upstream, different prefixes) so that every number is unambiguous:
//!
//! | route | traffic | what it shows |
//! |---|---|---|
//! | `ok` | 5 completed calls of 100 ms | counts and durations of completed calls, nothing wasted |
//! | `cold` | 2 clients leave ~150 ms after the upstream saw their request, before any call on the route completed | saved = route timeout - time spent |
//! | `warm` | 3 completed calls (300, 400, 1200 ms), then 2 clients leave at ~150 ms | saved = median of completed - time spent |
//! | `to` | 3 calls to a 5 s upstream cut by `timeout = "300ms"` | 504s, cancelled by the timer |
//! | `idle` | nothing | every series stays at zero |
//!
//! Exact counts are asserted exactly. The two float counters are compared with what the
//! test upstream itself observed (request arrived → connection closed, request arrived →
//! last byte written), through the estimator that the README documents, within 10% (plus
//! a few milliseconds for sums that are near zero by construction).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    Client, Proxy, RequestRecord, Scrape, Upstream, WAIT, config_head, http_get, log_path,
};

// ------------------------------------------------------------------------------------------
// The traffic mix
// ------------------------------------------------------------------------------------------

const ROUTES: [&str; 5] = ["ok", "cold", "warm", "to", "idle"];
const OUTCOMES: [&str; 6] = [
    "ok",
    "client_closed",
    "timeout",
    "upstream_error",
    "shutdown",
    "no_route",
];
const CANCELLED_BY: [&str; 3] = ["client", "timeout", "shutdown"];
const PHASES: [&str; 5] = [
    "queued",
    "connecting",
    "awaiting_headers",
    "streaming_body",
    "uploading",
];

/// Timeouts of the routes whose saved work the test computes.
const COLD_TIMEOUT: Duration = Duration::from_secs(2);
const WARM_TIMEOUT: Duration = Duration::from_secs(2);
const TO_TIMEOUT: Duration = Duration::from_millis(300);
/// When the leaving clients leave, after the upstream saw their request.
const LEAVE_AFTER: Duration = Duration::from_millis(150);

fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"{head}
[upstreams.up]
url = "http://{upstream}"

[[routes]]
name = "ok"
path_prefix = "/delay/ok/"
upstream = "up"
timeout = "5s"

[[routes]]
name = "cold"
path_prefix = "/delay/cold/"
upstream = "up"
timeout = "2s"

[[routes]]
name = "warm"
path_prefix = "/delay/warm/"
upstream = "up"
timeout = "2s"

[[routes]]
name = "to"
path_prefix = "/delay/to/"
upstream = "up"
timeout = "300ms"

[[routes]]
name = "idle"
path_prefix = "/idle/"
upstream = "up"
"#,
        head = config_head("")
    )
}

/// Sends `GET path`, waits until the upstream saw it arrive, leaves (FIN) `after` that
/// moment, and returns the upstream's record once it saw the proxy close the call.
async fn leave_after(proxy: &Proxy, up: &Upstream, path: &str, after: Duration) -> RequestRecord {
    let mut client = Client::connect(proxy.addr()).await;
    client.get(path).await;
    let prefix = path.split('?').next().unwrap_or(path);
    let arrived = up.wait_request(prefix, WAIT).await;
    tokio::time::sleep_until(tokio::time::Instant::from_std(arrived.arrived + after)).await;
    client.close_fin().await;
    up.wait_closed(arrived.id, WAIT).await
}

/// Runs `paths` at once, each with `http_get`, and checks every status.
async fn get_all(proxy: &Proxy, paths: &[String], status: u16) {
    let mut set = tokio::task::JoinSet::new();
    for p in paths {
        let (addr, p) = (proxy.addr(), p.clone());
        set.spawn(async move { (http_get(addr, &p).await, p) });
    }
    while let Some(done) = set.join_next().await {
        let (resp, path) = done.expect("request task");
        assert_eq!(resp.status, status, "GET {path}: {}", resp.text());
    }
}

/// Upstream time an aborted call cost, as the upstream saw it: arrived → closed.
fn spent(r: &RequestRecord) -> Duration {
    let (closed, _) = r.closed.expect("an aborted call was closed");
    closed.saturating_duration_since(r.arrived)
}

/// How long a completed call took, as the upstream saw it: arrived → last byte written.
fn took(r: &RequestRecord) -> Duration {
    r.finished
        .expect("a completed call finished")
        .saturating_duration_since(r.arrived)
}

/// The README's estimator, from the test's own measurements: the median (upper middle) of
/// the completed durations so far, or the route timeout before any; capped by the timeout;
/// minus the time spent; floored at zero.
fn estimated_saved(completed: &[Duration], timeout: Duration, spent: Duration) -> Duration {
    let typical = if completed.is_empty() {
        timeout
    } else {
        let mut sorted = completed.to_vec();
        sorted.sort();
        sorted[sorted.len() / 2].min(timeout)
    };
    typical.saturating_sub(spent)
}

/// `got` within 10% of `want`, or within `floor` seconds for values near zero.
fn assert_close(what: &str, got: f64, want: f64, floor: f64) {
    let tolerance = (want.abs() * 0.10).max(floor);
    eprintln!("{what}: /metrics {got:.4}, expected {want:.4} ± {tolerance:.4}");
    assert!(
        (got - want).abs() <= tolerance,
        "{what}: /metrics says {got:.4}, the upstream's own measurements give {want:.4} \
         (tolerance {tolerance:.4})"
    );
}

fn secs(ds: impl IntoIterator<Item = Duration>) -> f64 {
    ds.into_iter()
        .map(|d| d.as_secs_f64())
        .fold(0.0, |a, b| a + b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_of_a_configured_route_exists_at_zero_before_traffic() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr())).await;
    let m = Scrape::take(&proxy).await;

    for route in ROUTES {
        let r = [("route", route)];
        for outcome in OUTCOMES {
            let ro = [("route", route), ("outcome", outcome)];
            m.expect("cutoff_requests_total", &ro, 0.0);
            m.expect("cutoff_request_duration_seconds_count", &ro, 0.0);
            m.expect("cutoff_request_duration_seconds_sum", &ro, 0.0);
            m.expect(
                "cutoff_request_duration_seconds_bucket",
                &[("route", route), ("outcome", outcome), ("le", "+Inf")],
                0.0,
            );
        }
        for by in CANCELLED_BY {
            for phase in PHASES {
                m.expect(
                    "cutoff_upstream_cancelled_total",
                    &[("route", route), ("cancelled_by", by), ("phase", phase)],
                    0.0,
                );
            }
        }
        for name in [
            "cutoff_upstream_duration_seconds_count",
            "cutoff_upstream_duration_seconds_sum",
            "cutoff_upstream_inflight",
            "cutoff_cancel_propagation_seconds_count",
            "cutoff_cancel_propagation_seconds_sum",
            "cutoff_upstream_wasted_seconds_total",
            "cutoff_upstream_saved_seconds_total",
            "cutoff_discarded_bytes_total",
            "cutoff_protected_completed_total",
        ] {
            m.expect(name, &r, 0.0);
        }
        for name in [
            "cutoff_upstream_duration_seconds_bucket",
            "cutoff_cancel_propagation_seconds_bucket",
        ] {
            m.expect(name, &[("route", route), ("le", "+Inf")], 0.0);
        }
    }
    for result in ["ok", "error"] {
        m.expect("cutoff_config_reloads_total", &[("result", result)], 0.0);
    }
    let endpoint = format!("http://{}", up.addr());
    let ep = [("upstream", "up"), ("endpoint", endpoint.as_str())];
    m.expect("cutoff_endpoint_inflight", &ep, 0.0);
    m.expect("cutoff_endpoint_ejections_total", &ep, 0.0);
    m.expect("cutoff_queue_length", &[("upstream", "up")], 0.0);
    m.expect(
        "cutoff_queue_wait_seconds_count",
        &[("upstream", "up")],
        0.0,
    );

    // The float counters are typed like the others, so that Prometheus treats them so.
    for name in [
        "cutoff_upstream_wasted_seconds_total",
        "cutoff_upstream_saved_seconds_total",
    ] {
        assert!(
            m.text.contains(&format!("# TYPE {name} counter")),
            "no `# TYPE {name} counter` line:\n{}",
            m.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_mix_gives_exact_counts_and_measured_waste_and_savings() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr())).await;

    // `ok`: five completed calls of 100 ms, at once.
    let ok_paths: Vec<String> = (0..5).map(|i| format!("/delay/ok/{i}?ms=100")).collect();
    get_all(&proxy, &ok_paths, 200).await;

    // `cold`: two clients leave before any call on the route completed.
    let mut cold = Vec::new();
    for tag in ["a", "b"] {
        let path = format!("/delay/cold/{tag}?ms=5000");
        cold.push(leave_after(&proxy, &up, &path, LEAVE_AFTER).await);
    }

    // `warm`: three completed calls seed the estimator, then two clients leave.
    let seed_paths: Vec<String> = [300, 400, 1200]
        .iter()
        .enumerate()
        .map(|(i, ms)| format!("/delay/warm/seed{i}?ms={ms}"))
        .collect();
    get_all(&proxy, &seed_paths, 200).await;
    // The guard records after the last byte went out: wait until it has, so that the
    // estimator holds all three before the aborts.
    proxy
        .wait_for_access_logs(3, |v| log_path(v).starts_with("/delay/warm/seed"), WAIT)
        .await;
    let mut warm = Vec::new();
    for tag in ["a", "b"] {
        let path = format!("/delay/warm/leave-{tag}?ms=5000");
        warm.push(leave_after(&proxy, &up, &path, LEAVE_AFTER).await);
    }

    // `to`: three calls cut by the route's 300 ms timeout.
    let to_paths: Vec<String> = (0..3).map(|i| format!("/delay/to/{i}?ms=5000")).collect();
    get_all(&proxy, &to_paths, 504).await;

    // Every request recorded (metrics are recorded just before the access-log line).
    proxy
        .wait_for_access_logs(
            15,
            |v| v["route"].as_str().is_some_and(|r| !r.is_empty()),
            WAIT,
        )
        .await;
    let m = Scrape::take(&proxy).await;

    // Requests by outcome, exactly.
    let mut want: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    want.insert(("ok", "ok"), 5.0);
    want.insert(("cold", "client_closed"), 2.0);
    want.insert(("warm", "ok"), 3.0);
    want.insert(("warm", "client_closed"), 2.0);
    want.insert(("to", "timeout"), 3.0);
    for route in ROUTES {
        for outcome in OUTCOMES {
            let n = want.get(&(route, outcome)).copied().unwrap_or(0.0);
            let ro = [("route", route), ("outcome", outcome)];
            m.expect("cutoff_requests_total", &ro, n);
            m.expect("cutoff_request_duration_seconds_count", &ro, n);
        }
    }

    // Cancellations by who and where, exactly.
    let mut want: BTreeMap<(&str, &str, &str), f64> = BTreeMap::new();
    want.insert(("cold", "client", "awaiting_headers"), 2.0);
    want.insert(("warm", "client", "awaiting_headers"), 2.0);
    want.insert(("to", "timeout", "awaiting_headers"), 3.0);
    for route in ROUTES {
        for by in CANCELLED_BY {
            for phase in PHASES {
                let n = want.get(&(route, by, phase)).copied().unwrap_or(0.0);
                m.expect(
                    "cutoff_upstream_cancelled_total",
                    &[("route", route), ("cancelled_by", by), ("phase", phase)],
                    n,
                );
            }
        }
    }

    // Completed calls and aborted ones, exactly; nothing left in flight or discarded.
    for (route, completed, aborted) in [
        ("ok", 5.0, 0.0),
        ("cold", 0.0, 2.0),
        ("warm", 3.0, 2.0),
        ("to", 0.0, 3.0),
        ("idle", 0.0, 0.0),
    ] {
        let r = [("route", route)];
        m.expect("cutoff_upstream_duration_seconds_count", &r, completed);
        m.expect("cutoff_cancel_propagation_seconds_count", &r, aborted);
        m.expect("cutoff_upstream_inflight", &r, 0.0);
        m.expect("cutoff_discarded_bytes_total", &r, 0.0);
        m.expect("cutoff_protected_completed_total", &r, 0.0);
    }

    // What the upstream observed.
    let ok_records = up.records_for("/delay/ok/");
    let seed_records = up.records_for("/delay/warm/seed");
    let to_records = up.records_for("/delay/to/");
    assert_eq!(ok_records.len(), 5, "{}", up.summary());
    assert_eq!(seed_records.len(), 3, "{}", up.summary());
    assert_eq!(to_records.len(), 3, "{}", up.summary());
    for r in &to_records {
        assert!(
            r.closed.is_some() && r.finished.is_none(),
            "the timeout closed #{}: {r:?}",
            r.id
        );
    }
    let ok_took: Vec<Duration> = ok_records.iter().map(took).collect();
    let seed_took: Vec<Duration> = seed_records.iter().map(took).collect();

    // Durations of completed calls: the histogram's sum matches the upstream's view.
    assert_close(
        "cutoff_upstream_duration_seconds_sum{route=\"ok\"}",
        m.value("cutoff_upstream_duration_seconds_sum", &[("route", "ok")]),
        secs(ok_took.iter().copied()),
        // The proxy reads the last byte a little after the upstream wrote it: on a loaded
        // machine that is tens of milliseconds of scheduling, so allow 50 ms per call.
        0.25,
    );
    assert_close(
        "cutoff_upstream_duration_seconds_sum{route=\"warm\"}",
        m.value("cutoff_upstream_duration_seconds_sum", &[("route", "warm")]),
        secs(seed_took.iter().copied()),
        0.15,
    );

    // Wasted: the elapsed upstream time of every aborted call; nothing on routes where
    // every call completed for its client.
    for (route, aborted) in [
        ("ok", &Vec::new()),
        ("cold", &cold),
        ("warm", &warm),
        ("to", &to_records),
        ("idle", &Vec::new()),
    ] {
        assert_close(
            &format!("cutoff_upstream_wasted_seconds_total{{route=\"{route}\"}}"),
            m.value("cutoff_upstream_wasted_seconds_total", &[("route", route)]),
            secs(aborted.iter().map(spent)),
            // Both clocks see the close a little late on a loaded machine: 20 ms per call.
            0.001 + 0.02 * aborted.len() as f64,
        );
    }

    // Saved: the documented estimator over the test's own measurements.
    let cold_saved = secs(
        cold.iter()
            .map(|r| estimated_saved(&[], COLD_TIMEOUT, spent(r))),
    );
    let warm_saved = secs(
        warm.iter()
            .map(|r| estimated_saved(&seed_took, WARM_TIMEOUT, spent(r))),
    );
    let to_saved = secs(
        to_records
            .iter()
            .map(|r| estimated_saved(&[], TO_TIMEOUT, spent(r))),
    );
    // Sanity of the scenario itself: the three branches give clearly different numbers.
    assert!(
        cold_saved > 3.0,
        "cold: 2 × (2 s - ~150 ms), got {cold_saved}"
    );
    assert!(
        (0.3..1.0).contains(&warm_saved),
        "warm: 2 × (median ~400 ms - ~150 ms), got {warm_saved}"
    );
    for (route, want, floor) in [
        ("ok", 0.0, 0.001),
        ("cold", cold_saved, 0.04),
        ("warm", warm_saved, 0.04),
        // A call cut by the timeout had spent about the whole timeout: little is left.
        ("to", to_saved, 0.06),
        ("idle", 0.0, 0.001),
    ] {
        assert_close(
            &format!("cutoff_upstream_saved_seconds_total{{route=\"{route}\"}}"),
            m.value("cutoff_upstream_saved_seconds_total", &[("route", route)]),
            want,
            floor,
        );
    }

    // No label carries anything unbounded: routes are the configured names.
    for s in &m.samples {
        if let Some(route) = s.labels.get("route") {
            assert!(
                ROUTES.contains(&route.as_str()) || route.is_empty(),
                "unexpected route label {route:?} on {s:?}"
            );
        }
    }
}

/// The accounting's other branches: a protected call that completes for a client already
/// gone (all of it wasted), a call whose client leaves while it is queued (never sent: its
/// whole typical duration saved, nothing wasted), and a stream cut mid-body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_queued_and_streaming_calls_are_accounted_as_documented() {
    let up = Upstream::start().await;
    let config = format!(
        r#"{head}
[upstreams.up]
url = "http://{up}"

[upstreams.narrow]
url = "http://{up}"
max_inflight = 1
queue_timeout = "10s"

[[routes]]
name = "keep"
path_prefix = "/delay/keep/"
upstream = "up"
timeout = "5s"
on_client_disconnect = "continue"

[[routes]]
name = "q"
path_prefix = "/delay/q/"
upstream = "narrow"
timeout = "3s"

[[routes]]
name = "st"
path_prefix = "/stream/st/"
upstream = "up"
timeout = "5s"
"#,
        head = config_head(""),
        up = up.addr()
    );
    let proxy = Proxy::start(&config).await;

    // `keep`: the client leaves at ~100 ms, the upstream finishes its 400 ms anyway.
    let mut client = Client::connect(proxy.addr()).await;
    client.get("/delay/keep/a?ms=400").await;
    let rec = up.wait_request("/delay/keep/a", WAIT).await;
    tokio::time::sleep_until(tokio::time::Instant::from_std(
        rec.arrived + Duration::from_millis(100),
    ))
    .await;
    client.close_fin().await;
    let kept = up.wait_finished(rec.id, WAIT).await;
    let line = proxy
        .wait_for_access_log(|v| common::log_path_is(v, "/delay/keep/a"), WAIT)
        .await;
    assert_eq!(line["protected"], true, "{line}");

    // `q`: one completed call seeds the estimator; then one call holds the only slot and
    // a second waits behind it until its client leaves; then the holder leaves too.
    assert_eq!(
        http_get(proxy.addr(), "/delay/q/seed?ms=200").await.status,
        200
    );
    proxy
        .wait_for_access_log(|v| common::log_path_is(v, "/delay/q/seed"), WAIT)
        .await;
    let seed = up.records_for("/delay/q/seed").remove(0);
    let mut holder = Client::connect(proxy.addr()).await;
    holder.get("/delay/q/hold?ms=30000").await;
    let held = up.wait_request("/delay/q/hold", WAIT).await;
    let mut queued = Client::connect(proxy.addr()).await;
    queued.get("/delay/q/queued?ms=10").await;
    proxy
        .wait_for_metric(
            "cutoff_queue_length",
            &[("upstream", "narrow")],
            |v| v == 1.0,
            WAIT,
        )
        .await;
    queued.close_fin().await;
    proxy
        .wait_for_access_log(|v| common::log_path_is(v, "/delay/q/queued"), WAIT)
        .await;
    holder.close_fin().await;
    let held = up.wait_closed(held.id, WAIT).await;

    // `st`: the client takes three chunks of a stream, then leaves.
    let mut client = Client::connect(proxy.addr()).await;
    client
        .get("/stream/st/a?chunks=200&every=20&size=512")
        .await;
    let head = client.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    let mut dec = common::BodyDecoder::new(head.framing());
    let mut got = 0;
    while got < 3 * 512 {
        let piece = client.next_piece(&mut dec, WAIT).await;
        got += piece.expect("a chunk").expect("the stream goes on").len();
    }
    client.close_fin().await;
    let rec = up.wait_request("/stream/st/a", WAIT).await;
    let streamed = up.wait_closed(rec.id, WAIT).await;

    proxy
        .wait_for_access_logs(
            5,
            |v| v["route"].as_str().is_some_and(|r| !r.is_empty()),
            WAIT,
        )
        .await;
    let m = Scrape::take(&proxy).await;

    // keep: 499 at INFO, completed for nobody: protected, all of it wasted, nothing saved.
    m.expect(
        "cutoff_requests_total",
        &[("route", "keep"), ("outcome", "client_closed")],
        1.0,
    );
    m.expect(
        "cutoff_protected_completed_total",
        &[("route", "keep")],
        1.0,
    );
    m.expect(
        "cutoff_upstream_duration_seconds_count",
        &[("route", "keep")],
        1.0,
    );
    m.expect(
        "cutoff_cancel_propagation_seconds_count",
        &[("route", "keep")],
        0.0,
    );
    for by in CANCELLED_BY {
        for phase in PHASES {
            let labels = [("route", "keep"), ("cancelled_by", by), ("phase", phase)];
            m.expect("cutoff_upstream_cancelled_total", &labels, 0.0);
        }
    }
    assert_close(
        "cutoff_upstream_wasted_seconds_total{route=\"keep\"}",
        m.value("cutoff_upstream_wasted_seconds_total", &[("route", "keep")]),
        took(&kept).as_secs_f64(),
        0.05,
    );
    m.expect(
        "cutoff_upstream_saved_seconds_total",
        &[("route", "keep")],
        0.0,
    );

    // q: the queued call never reached the upstream: it saved the typical duration (the
    // one completed call, 200 ms) and wasted nothing; the holder wasted what it ran.
    assert!(
        up.records_for("/delay/q/queued").is_empty(),
        "the queued call was sent: {}",
        up.summary()
    );
    m.expect(
        "cutoff_requests_total",
        &[("route", "q"), ("outcome", "ok")],
        1.0,
    );
    m.expect(
        "cutoff_requests_total",
        &[("route", "q"), ("outcome", "client_closed")],
        2.0,
    );
    for (phase, n) in [("queued", 1.0), ("awaiting_headers", 1.0)] {
        let labels = [("route", "q"), ("cancelled_by", "client"), ("phase", phase)];
        m.expect("cutoff_upstream_cancelled_total", &labels, n);
    }
    m.expect(
        "cutoff_upstream_duration_seconds_count",
        &[("route", "q")],
        1.0,
    );
    // Only the holder had an upstream connection to close.
    m.expect(
        "cutoff_cancel_propagation_seconds_count",
        &[("route", "q")],
        1.0,
    );
    assert_close(
        "cutoff_upstream_wasted_seconds_total{route=\"q\"}",
        m.value("cutoff_upstream_wasted_seconds_total", &[("route", "q")]),
        spent(&held).as_secs_f64(),
        0.02,
    );
    let typical = [took(&seed)];
    let timeout = Duration::from_secs(3);
    assert_close(
        "cutoff_upstream_saved_seconds_total{route=\"q\"}",
        m.value("cutoff_upstream_saved_seconds_total", &[("route", "q")]),
        (estimated_saved(&typical, timeout, Duration::ZERO)
            + estimated_saved(&typical, timeout, spent(&held)))
        .as_secs_f64(),
        0.02,
    );
    let waits = m.value("cutoff_queue_wait_seconds_count", &[("upstream", "narrow")]);
    assert_eq!(waits, 1.0, "one call waited in the queue");
    m.expect("cutoff_queue_length", &[("upstream", "narrow")], 0.0);

    // st: cut while streaming the body, by the client.
    m.expect(
        "cutoff_requests_total",
        &[("route", "st"), ("outcome", "client_closed")],
        1.0,
    );
    m.expect(
        "cutoff_upstream_cancelled_total",
        &[
            ("route", "st"),
            ("cancelled_by", "client"),
            ("phase", "streaming_body"),
        ],
        1.0,
    );
    m.expect(
        "cutoff_cancel_propagation_seconds_count",
        &[("route", "st")],
        1.0,
    );
    assert_close(
        "cutoff_upstream_wasted_seconds_total{route=\"st\"}",
        m.value("cutoff_upstream_wasted_seconds_total", &[("route", "st")]),
        spent(&streamed).as_secs_f64(),
        0.02,
    );
    assert_close(
        "cutoff_upstream_saved_seconds_total{route=\"st\"}",
        m.value("cutoff_upstream_saved_seconds_total", &[("route", "st")]),
        estimated_saved(&[], Duration::from_secs(5), spent(&streamed)).as_secs_f64(),
        0.02,
    );
    for route in ["keep", "q", "st"] {
        m.expect("cutoff_upstream_inflight", &[("route", route)], 0.0);
    }
}
