//! End to end with a real Prometheus: it scrapes the admin listener, and every query of
//! `dashboards/cutoff.json` runs through its HTTP API and returns data.
//!
//! Needs `/usr/bin/prometheus` (Debian's `prometheus` package; `.ci/run` installs it). When
//! it is not installed the test prints `SKIP: prometheus not installed` and passes.
//!
//! Waiting on Prometheus means polling its HTTP API (it has no events to subscribe to):
//! every poll is bounded, and the conditions are exact (it answers ready; it holds a
//! sample taken after the traffic), never a fixed sleep.

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Proxy, Upstream, WAIT, config_head, http_get, unique_temp_dir};
use serde_json::Value;

const DASHBOARD: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dashboards/cutoff.json"
));

/// How long Prometheus may take to start, and to scrape what the test waits for.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

fn find_prometheus() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/bin/prometheus");
    if fixed.is_file() {
        return Some(fixed);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file())
}

/// A free loopback port: bind :0, note the port, release it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The Prometheus child process; killed (and its data removed) however the test ends.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(bin: &Path, target: SocketAddr) -> Prometheus {
        let dir = unique_temp_dir("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: cutoff\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create the log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        eprintln!(
            "[prometheus] pid {} on {addr}, scraping {target}",
            child.id()
        );
        Prometheus { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Panics with Prometheus's own log if it exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("prometheus exited ({status}); its log:\n{}", self.log());
        }
    }

    /// Waits until Prometheus answers `/-/ready` with 200.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            self.check_alive();
            // A refused connect means it is not listening yet: no panic, try again.
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                let r = http_get(self.addr, "/-/ready").await;
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after {PROMETHEUS_WAIT:?}; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs an instant query; returns the whole JSON answer.
    async fn query(&self, promql: &str) -> Value {
        let r = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .await;
        serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "query {promql:?}: HTTP {} with a body that is not JSON ({e}): {}",
                r.status,
                r.text()
            )
        })
    }

    /// Waits until `promql` returns exactly one sample whose value satisfies `pred`.
    async fn wait_value(&mut self, promql: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            self.check_alive();
            let answer = self.query(promql).await;
            let value = single_value(&answer);
            if let Some(v) = value
                && pred(v)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "after {PROMETHEUS_WAIT:?}, {promql} gives {answer}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query-string value (everything but RFC 3986 unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The value of a one-sample vector answer.
fn single_value(answer: &Value) -> Option<f64> {
    let result = answer["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

/// A panel query as Grafana would send it, with the variables set to `route`/`upstream`
/// and every interval to one minute.
fn interpolate(expr: &str, route: &str, upstream: &str) -> String {
    let out = expr
        .replace("${route}", route)
        .replace("$route", route)
        .replace("${upstream}", upstream)
        .replace("$upstream", upstream)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1m");
    assert!(
        !out.contains('$'),
        "a dashboard variable the test does not know: {out}"
    );
    out
}

fn config(up: SocketAddr) -> String {
    format!(
        r#"{head}
[upstreams.up]
url = "http://{up}"

[[routes]]
name = "api"
path_prefix = "/delay/api/"
upstream = "up"
timeout = "5s"

[[routes]]
name = "slow"
path_prefix = "/delay/slow/"
upstream = "up"
timeout = "300ms"
"#,
        head = config_head("")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_proxy_and_every_dashboard_query_returns_data() {
    let Some(bin) = find_prometheus() else {
        println!("SKIP: prometheus not installed (apt-get install prometheus; .ci/run does)");
        return;
    };
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(up.addr())).await;
    let mut prom = Prometheus::start(&bin, proxy.admin_addr());
    prom.wait_ready().await;

    // A sample before any traffic, so that rates after it see the increase.
    prom.wait_value(r#"cutoff_requests_total{route="api",outcome="ok"}"#, |v| {
        v == 0.0
    })
    .await;

    // Completed calls (they seed the estimator), clients who leave, calls that time out.
    let mut ok = tokio::task::JoinSet::new();
    for i in 0..3 {
        let addr = proxy.addr();
        ok.spawn(async move { http_get(addr, &format!("/delay/api/ok{i}?ms=400")).await });
    }
    while let Some(r) = ok.join_next().await {
        assert_eq!(r.expect("request task").status, 200);
    }
    for tag in ["a", "b"] {
        let mut c = Client::connect(proxy.addr()).await;
        c.get(&format!("/delay/api/leave-{tag}?ms=5000")).await;
        let rec = up
            .wait_request(&format!("/delay/api/leave-{tag}"), WAIT)
            .await;
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            rec.arrived + Duration::from_millis(100),
        ))
        .await;
        c.close_fin().await;
        up.wait_closed(rec.id, WAIT).await;
    }
    for i in 0..2 {
        let r = http_get(proxy.addr(), &format!("/delay/slow/{i}?ms=5000")).await;
        assert_eq!(r.status, 504, "{}", r.text());
    }
    proxy
        .wait_for_access_logs(7, |v| v["route"] == "api" || v["route"] == "slow", WAIT)
        .await;

    // Prometheus has scraped after the traffic: it holds the final counts.
    prom.wait_value(r#"sum(cutoff_requests_total{route=~"api|slow"})"#, |v| {
        v == 7.0
    })
    .await;
    prom.wait_value(r#"sum(cutoff_upstream_cancelled_total)"#, |v| v == 4.0)
        .await;

    // Every panel query, as Grafana sends it with "All" selected and with a multi-select.
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut failures = Vec::new();
    let mut ran = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or("");
            for (route, upstream) in [(".*", ".*"), ("(api|slow)", "(up)")] {
                let promql = interpolate(expr, route, upstream);
                let answer = prom.query(&promql).await;
                ran += 1;
                let ok = answer["status"] == "success"
                    && answer["data"]["result"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty());
                if !ok {
                    failures.push(format!("panel {title:?}: {promql}\n    -> {answer}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} dashboard queries failed or returned nothing:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );

    // The headline has something to show: work was wasted and work was saved.
    let headline = |name: &str| format!(r#"sum(rate({name}{{route=~".*"}}[1m]))"#);
    let wasted = prom
        .wait_value(&headline("cutoff_upstream_wasted_seconds_total"), |v| {
            v > 0.0
        })
        .await;
    let saved = prom
        .wait_value(&headline("cutoff_upstream_saved_seconds_total"), |v| {
            v > 0.0
        })
        .await;
    eprintln!("headline over the last minute: wasted {wasted:.4}/s, saved {saved:.4}/s");
    let share = prom
        .wait_value(
            r#"sum(increase(cutoff_upstream_wasted_seconds_total[1m])) / (sum(increase(cutoff_upstream_wasted_seconds_total[1m])) + sum(increase(cutoff_upstream_duration_seconds_sum[1m])))"#,
            |v| v.is_finite(),
        )
        .await;
    assert!(
        share > 0.0 && share < 1.0,
        "wasted share {share}: some calls completed, some were aborted"
    );
}
