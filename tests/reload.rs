//! Live reload of `proxy.toml`, against the real binary: edits saved the way editors do
//! (a temp file renamed over, or truncate and write in place) and SIGHUP swap the route
//! table while requests flow; a broken edit is rejected with file, line and key while the
//! old routes keep serving; requests in flight finish on the routes they started with;
//! `[server]` changes need a restart and say so.
//!
//! Every route strips its prefix, so `/slow/delay/t?ms=2000` reaches the recording
//! upstream as `/delay/t?ms=2000` and picks its behaviour there.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A reload takes the watcher's settle time (150 ms) plus parsing; bounded generously.
const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// A full config: `[server]` listening on `listen`, admin, JSON logs, upstream `up`, then
/// `routes` (TOML `[[routes]]` tables).
fn config_with(listen: &str, upstream: SocketAddr, routes: &str) -> String {
    format!(
        "{}\n[upstreams.up]\nurl = \"http://{upstream}\"\n{routes}",
        config_head_on(listen, "")
    )
}

/// A `[[routes]]` table: `name` at `/name/`, prefix stripped, to `up`, plus `extra` lines.
fn route(name: &str, extra: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}/\"\nstrip_prefix = true\nupstream = \"up\"\n{extra}\n"
    )
}

/// Saves like editors that write a new file and rename it over the old one.
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_file_name(".proxy.toml.swp-new");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
}

/// Saves like editors that truncate the file and write it in place.
fn save_in_place(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn is_reloaded(v: &Value) -> bool {
    v["message"] == "config reloaded"
}

fn is_reload_error(v: &Value) -> bool {
    v["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("config reload failed"))
}

/// Waits for the `n`th successful reload: its log line, and the counter.
async fn wait_reloads(proxy: &Proxy, n: usize) {
    wait_log_count(proxy, n, "`config reloaded`", RELOAD_WAIT, is_reloaded).await;
    proxy
        .wait_for_metric(
            "cutoff_config_reloads_total",
            &[("result", "ok")],
            |v| v >= n as f64,
            WAIT,
        )
        .await;
}

async fn get(proxy: &Proxy, path: &str) -> Response {
    within(
        Duration::from_secs(15),
        format!("GET {path}"),
        http_get(proxy.addr(), path),
    )
    .await
}

/// Sequential requests to `path` on fresh connections until stopped; every one must get
/// 200. Returns (successes, failures).
struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl Traffic {
    fn start(addr: SocketAddr, path: &'static str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut ok = 0u64;
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !flag.load(Ordering::SeqCst) {
                i += 1;
                // A request of its own task, so that a panic in the harness's client (a
                // reset, a timeout) is counted as a failure instead of ending the loop.
                match tokio::spawn(http_get(addr, path)).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failures.push(format!("request {i}: {} {}", r.status, r.text())),
                    Err(e) => failures.push(format!("request {i}: {e}")),
                }
                // Pacing: a steady flow, not a load test.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failures)
        });
        Traffic { stop, task }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        within(
            Duration::from_secs(20),
            "the traffic loop to stop",
            self.task,
        )
        .await
        .expect("the traffic loop")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_apply_while_requests_flow() {
    let up = Upstream::start().await;
    let steady = route("steady", "");
    let slow_5s = route("slow", "timeout = \"5s\"");
    let slow_300ms = route("slow", "timeout = \"300ms\"");
    let doomed = route("doomed", "");
    let fresh = route("fresh", "");
    let listen = "127.0.0.1:0";
    let proxy = Proxy::start(&config_with(
        listen,
        up.addr(),
        &format!("{steady}{slow_5s}{doomed}"),
    ))
    .await;
    let path = proxy.config_path().to_path_buf();
    wait_started(&proxy).await;

    // Before: no /fresh/, /slow/ allows more than 300 ms, /doomed/ serves.
    assert_eq!(get(&proxy, "/fresh/before").await.status, 404);
    let r = get(&proxy, "/slow/delay/before?ms=600").await;
    assert_eq!((r.status, r.text().as_str()), (200, "done"));
    assert_eq!(get(&proxy, "/doomed/before").await.status, 200);

    let traffic = Traffic::start(proxy.addr(), "/steady/flow");

    // 1. Add a route; saved by rename.
    save_by_rename(
        &path,
        &config_with(
            listen,
            up.addr(),
            &format!("{steady}{slow_5s}{doomed}{fresh}"),
        ),
    );
    wait_reloads(&proxy, 1).await;
    let r = get(&proxy, "/fresh/after").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "the new route");
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/fresh/after"), WAIT)
        .await;
    assert_access(&line, 200, "ok", None);
    assert_eq!(line["route"], "fresh", "{line}");

    // 2. Shorten a timeout; saved in place.
    save_in_place(
        &path,
        &config_with(
            listen,
            up.addr(),
            &format!("{steady}{slow_300ms}{doomed}{fresh}"),
        ),
    );
    wait_reloads(&proxy, 2).await;
    let sent = Instant::now();
    let r = get(&proxy, "/slow/delay/cut?ms=2000").await;
    assert_eq!(r.status, 504, "the shortened timeout: {}", r.text());
    assert!(
        sent.elapsed() < Duration::from_millis(1500),
        "the 504 came {:?} after the request; the timeout is 300 ms",
        sent.elapsed()
    );
    let rec = up.wait_request("/delay/cut", WAIT).await;
    up.wait_closed(rec.id, WAIT).await;
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/slow/delay/cut"), WAIT)
        .await;
    assert_access(&line, 504, "timeout", Some("timeout"));

    // 3. Remove a route; saved by rename again.
    save_by_rename(
        &path,
        &config_with(listen, up.addr(), &format!("{steady}{slow_300ms}{fresh}")),
    );
    wait_reloads(&proxy, 3).await;
    let r = get(&proxy, "/doomed/after").await;
    assert_eq!(r.status, 404, "the removed route: {}", r.text());
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/doomed/after"), WAIT)
        .await;
    assert_access(&line, 404, "no_route", None);
    assert_eq!(line["route"], "", "{line}");

    let (ok, failures) = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reloads: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
    assert!(ok >= 5, "only {ok} requests flowed during the reloads");

    let metrics = proxy.metrics_text().await;
    assert_eq!(
        metric_value(&metrics, "cutoff_config_reloads_total", &[("result", "ok")]),
        Some(3.0),
        "one reload per save"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "cutoff_config_reloads_total",
            &[("result", "error")]
        ),
        Some(0.0),
        "no save was seen half-written"
    );
    // The new route's series exist from its load.
    assert!(
        metric_value(
            &metrics,
            "cutoff_requests_total",
            &[("route", "fresh"), ("outcome", "ok")]
        )
        .is_some_and(|v| v >= 1.0),
        "cutoff_requests_total for the new route:\n{metrics}"
    );
}

/// The 1-based number of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
        + 1
}

/// Waits for the `n`th rejected reload (`what` names it) and checks it: logged at ERROR
/// with the file, line `line_no` and `key` in the error, and counted.
async fn assert_nth_reload_error(proxy: &Proxy, n: usize, what: &str, line_no: usize, key: &str) {
    let errors = wait_log_count(proxy, n, what, RELOAD_WAIT, is_reload_error).await;
    let e = &errors[n - 1];
    assert_eq!(e["level"], "ERROR", "{e}");
    let msg = e["error"].as_str().unwrap_or_default();
    assert!(msg.contains("proxy.toml"), "the error names the file: {e}");
    assert!(
        msg.contains(&format!(":{line_no}:")),
        "the error names line {line_no}: {e}"
    );
    assert!(msg.contains(key), "the error names the key: {e}");
    proxy
        .wait_for_metric(
            "cutoff_config_reloads_total",
            &[("result", "error")],
            |v| v == n as f64,
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edits_are_rejected_and_the_old_routes_keep_serving() {
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let good = config_with(listen, up.addr(), &route("api", "timeout = \"3s\""));
    let proxy = Proxy::start(&good).await;
    let path = proxy.config_path().to_path_buf();
    wait_started(&proxy).await;
    assert_eq!(get(&proxy, "/api/before").await.status, 200);

    // A bad duration.
    let bad = config_with(listen, up.addr(), &route("api", "timeout = \"3x\""));
    let line_no = line_of(&bad, "\"3x\"");
    save_in_place(&path, &bad);
    assert_nth_reload_error(&proxy, 1, "the reload error", line_no, "timeout").await;
    let r = get(&proxy, "/api/after-bad-duration").await;
    assert_eq!(r.status, 200, "the old routes keep serving: {}", r.text());
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/api/after-bad-duration"), WAIT)
        .await;
    assert_eq!(line["route"], "api", "{line}");

    // An unknown key, saved by rename.
    let bad = config_with(
        listen,
        up.addr(),
        &route("api", "timeout = \"3s\"\nretries = 3"),
    );
    let line_no = line_of(&bad, "retries");
    save_by_rename(&path, &bad);
    assert_nth_reload_error(&proxy, 2, "the second reload error", line_no, "retries").await;
    assert_eq!(get(&proxy, "/api/after-unknown-key").await.status, 200);

    // Neither was swapped in: the route's 3 s timeout still holds (a 1 s call succeeds).
    let r = get(&proxy, "/api/delay/still-3s?ms=1000").await;
    assert_eq!((r.status, r.text().as_str()), (200, "done"));
    let metrics = proxy.metrics_text().await;
    assert_eq!(
        metric_value(&metrics, "cutoff_config_reloads_total", &[("result", "ok")]),
        Some(0.0)
    );

    // A fixed file is taken again.
    let fixed = config_with(
        listen,
        up.addr(),
        &format!("{}{}", route("api", "timeout = \"3s\""), route("new", "")),
    );
    save_in_place(&path, &fixed);
    wait_reloads(&proxy, 1).await;
    assert_eq!(get(&proxy, "/new/after-fix").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let one = route("one", "");
    let proxy = Proxy::start(&config_with(listen, up.addr(), &one)).await;
    let path = proxy.config_path().to_path_buf();
    wait_started(&proxy).await;

    // A first reload from the file watch: the reload task (and its SIGHUP handler) runs.
    let two = route("two", "");
    save_in_place(
        &path,
        &config_with(listen, up.addr(), &format!("{one}{two}")),
    );
    wait_reloads(&proxy, 1).await;
    assert_eq!(get(&proxy, "/two/x").await.status, 200);

    // SIGHUP with the file unchanged: an explicit request reloads anyway.
    proxy.signal(libc::SIGHUP);
    wait_log_count(&proxy, 1, "the SIGHUP line", RELOAD_WAIT, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("SIGHUP"))
    })
    .await;
    wait_reloads(&proxy, 2).await;
    assert_eq!(get(&proxy, "/one/x").await.status, 200);
    assert_eq!(get(&proxy, "/two/x").await.status, 200);

    // A change written, then SIGHUP (the file watch sees it too; one reload or two, never
    // an error).
    let three = route("three", "");
    save_by_rename(
        &path,
        &config_with(listen, up.addr(), &format!("{one}{three}")),
    );
    proxy.signal(libc::SIGHUP);
    wait_log_count(&proxy, 2, "the second SIGHUP line", RELOAD_WAIT, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("SIGHUP"))
    })
    .await;
    wait_reloads(&proxy, 3).await;
    assert_eq!(get(&proxy, "/three/x").await.status, 200);
    assert_eq!(get(&proxy, "/two/x").await.status, 404);
    let metrics = proxy.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "cutoff_config_reloads_total",
            &[("result", "error")]
        ),
        Some(0.0)
    );
    assert!(
        proxy.logs().iter().all(|v| v["level"] != "ERROR"),
        "no ERROR line:\n{}",
        proxy.stderr()
    );
}

/// SIGHUP means "reload", whenever it comes: one sent right after the `listening` lines
/// must not kill the process (the default disposition of SIGHUP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_right_after_startup_reloads_instead_of_killing() {
    let up = Upstream::start().await;
    let rounds = 10;
    let mut died = Vec::new();
    for round in 0..rounds {
        let mut proxy = Proxy::start(&config_for(up.addr(), "")).await;
        proxy.signal(libc::SIGHUP);
        // Either it reloads and keeps serving, or it is dead: a request tells.
        let alive = tokio::spawn(http_get(proxy.admin_addr(), "/healthz"))
            .await
            .is_ok_and(|r| r.status == 200);
        if alive {
            wait_reloads(&proxy, 1).await;
        } else {
            let status = proxy.wait_exit(WAIT).await;
            died.push((round, status));
        }
    }
    assert!(
        died.is_empty(),
        "{} of {rounds} proxies sent SIGHUP right after their `listening` lines died \
         (round, status): {died:?}",
        died.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_on_the_routes_they_started_with() {
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let a = route("a", "timeout = \"10s\"");
    let keep = route("keep", "");
    let proxy = Proxy::start(&config_with(listen, up.addr(), &format!("{a}{keep}"))).await;
    let path = proxy.config_path().to_path_buf();
    wait_started(&proxy).await;

    let mut c = Client::connect(proxy.addr()).await;
    c.get("/a/delay/inflight?ms=1500").await;
    let rec = up.wait_request("/delay/inflight", WAIT).await;

    // Remove route a while its request is in flight.
    save_by_rename(&path, &config_with(listen, up.addr(), &keep));
    wait_reloads(&proxy, 1).await;
    assert_eq!(
        get(&proxy, "/a/new").await.status,
        404,
        "route a is gone for new requests"
    );
    let rec_now = up.record(rec.id);
    assert!(
        rec_now.finished.is_none() && rec_now.closed.is_none(),
        "the slow request ended before the reload, so this tested nothing: {rec_now:?}"
    );

    // The request that started on route a completes there.
    let resp = c.read_response(Duration::from_secs(10)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "done");
    up.wait_finished(rec.id, WAIT).await;
    let line = proxy
        .wait_for_access_log(|v| log_path_is(v, "/a/delay/inflight"), WAIT)
        .await;
    assert_access(&line, 200, "ok", None);
    assert_eq!(line["route"], "a", "{line}");
    assert_eq!(get(&proxy, "/keep/x").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listen_address_needs_a_restart() {
    let up = Upstream::start().await;
    let r = route("r", "");
    let proxy = Proxy::start(&config_with("127.0.0.1:0", up.addr(), &r)).await;
    let path = proxy.config_path().to_path_buf();
    wait_started(&proxy).await;

    let new_addr = refused_addr();
    let with_new = route("r2", "");
    save_in_place(
        &path,
        &config_with(&new_addr.to_string(), up.addr(), &format!("{r}{with_new}")),
    );
    let warn = proxy
        .wait_for_log(
            |v| {
                v["level"] == "WARN"
                    && v["section"] == "[server]"
                    && v["message"].as_str().is_some_and(|m| m.contains("restart"))
            },
            RELOAD_WAIT,
        )
        .await;
    assert!(
        warn["message"]
            .as_str()
            .is_some_and(|m| m.contains("restart")),
        "{warn}"
    );

    wait_reloads(&proxy, 1).await;
    // Still serving on the old address (the rest of the file was taken).
    assert_eq!(get(&proxy, "/r/x").await.status, 200);
    assert_eq!(get(&proxy, "/r2/x").await.status, 200);
    // And not on the new one.
    let connect = within(WAIT, "connect to the new address", async {
        tokio::net::TcpStream::connect(new_addr).await
    })
    .await;
    assert!(
        connect.is_err(),
        "the proxy started listening on {new_addr} without a restart"
    );
}

/// The `listening` lines say the proxy runs with the file as it was; an edit saved right
/// after them must be picked up like any other, never silently lost (which leaves the
/// proxy running a config that differs from the file, with nothing in the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_saved_right_after_startup_is_not_lost() {
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let rounds = 5;
    let mut lost = Vec::new();
    for round in 0..rounds {
        let first = route("first", "");
        let proxy = Proxy::start(&config_with(listen, up.addr(), &first)).await;
        let path = proxy.config_path().to_path_buf();
        save_in_place(
            &path,
            &config_with(
                listen,
                up.addr(),
                &format!("{first}{}", route("second", "")),
            ),
        );
        // Give it the settle time many times over, then look.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !proxy.logs().iter().any(is_reloaded) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = get(&proxy, "/second/x").await.status;
        if status != 200 {
            lost.push((round, status));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {rounds} edits saved right after the `listening` lines were never applied \
         (round, status of the new route): {lost:?}",
        lost.len()
    );
}

/// How Kubernetes updates a mounted ConfigMap: the file is a symlink through `..data`, a
/// symlink to a timestamped folder; an update writes a new folder and renames a new
/// `..data` over the old one. No event names `proxy.toml`, yet the edit must be applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_configmap_update_is_reloaded() {
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let one = route("one", "");
    let dir = unique_temp_dir("configmap");
    let publish = |version: &str, text: &str| {
        let data = dir.join(version);
        std::fs::create_dir(&data).expect("create the data folder");
        std::fs::write(data.join("proxy.toml"), text).expect("write the config");
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(version, &tmp).expect("symlink ..data_tmp");
        std::fs::rename(&tmp, dir.join("..data")).expect("rename ..data_tmp over ..data");
    };
    publish("..2026_12_02_01", &config_with(listen, up.addr(), &one));
    let config_path = dir.join("proxy.toml");
    std::os::unix::fs::symlink("..data/proxy.toml", &config_path).expect("symlink proxy.toml");
    let proxy = Proxy::start_from(dir.clone(), config_path, &[]).await;
    wait_started(&proxy).await;
    assert_eq!(get(&proxy, "/two/x").await.status, 404);

    publish(
        "..2026_12_02_02",
        &config_with(listen, up.addr(), &format!("{one}{}", route("two", ""))),
    );
    std::fs::remove_dir_all(dir.join("..2026_12_02_01")).expect("remove the old version");
    wait_reloads(&proxy, 1).await;
    assert_eq!(get(&proxy, "/two/x").await.status, 200);

    // The watch follows the new version: a second update is applied too.
    publish(
        "..2026_12_02_03",
        &config_with(listen, up.addr(), &format!("{one}{}", route("three", ""))),
    );
    wait_reloads(&proxy, 2).await;
    assert_eq!(get(&proxy, "/three/x").await.status, 200);
    assert_eq!(get(&proxy, "/two/x").await.status, 404);
}

/// `proxy.toml` may be a symlink to a file kept in another folder (a checkout, a shared
/// volume): an edit of that file in place is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_a_symlinked_file_in_another_folder_is_reloaded() {
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let one = route("one", "");
    let elsewhere = unique_temp_dir("elsewhere");
    let real = elsewhere.join("cutoff.toml");
    std::fs::write(&real, config_with(listen, up.addr(), &one)).expect("write the config");
    let dir = unique_temp_dir("linked");
    let config_path = dir.join("proxy.toml");
    std::os::unix::fs::symlink(&real, &config_path).expect("symlink proxy.toml");
    let proxy = Proxy::start_from(dir, config_path, &[]).await;
    wait_started(&proxy).await;

    save_in_place(
        &real,
        &config_with(listen, up.addr(), &format!("{one}{}", route("two", ""))),
    );
    wait_reloads(&proxy, 1).await;
    assert_eq!(get(&proxy, "/two/x").await.status, 200);
    let _ = std::fs::remove_dir_all(&elsewhere);
}

/// A writer that pauses half way (a slow upload, a script writing in pieces) leaves a
/// file that is valid but not what it means; only the whole file is applied, once it is
/// closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_still_being_written_is_not_applied_half_way() {
    use std::io::Write;
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let one = route("one", "");
    let proxy = Proxy::start(&config_with(listen, up.addr(), &one)).await;
    let path = proxy.config_path().to_path_buf();
    wait_started(&proxy).await;

    let half = config_with(listen, up.addr(), &format!("{one}{}", route("two", "")));
    let rest = route("three", "");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("open the config");
    f.write_all(half.as_bytes()).expect("write the first half");
    f.flush().expect("flush");
    // Longer than the settle time of a closed file, many times over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    f.write_all(rest.as_bytes()).expect("write the rest");
    drop(f);

    wait_reloads(&proxy, 1).await;
    let reloads: Vec<Value> = proxy.logs().into_iter().filter(is_reloaded).collect();
    assert_eq!(
        reloads[0]["routes"], 3,
        "the first reload applied a half-written file: {reloads:?}"
    );
    assert_eq!(get(&proxy, "/three/x").await.status, 200);
}

/// A deploy that swaps the config's whole folder (a new folder renamed into place, the old
/// one renamed away) is applied, and so is every later edit of the file in the new folder:
/// the watch must follow the folder that now holds the file, not the inode it started on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_after_the_config_folder_was_swapped_are_reloaded() {
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let one = route("one", "");
    let dir = unique_temp_dir("swapped-folder");
    let conf = dir.join("conf");
    std::fs::create_dir(&conf).expect("create conf");
    let config_path = conf.join("proxy.toml");
    std::fs::write(&config_path, config_with(listen, up.addr(), &one)).expect("write");
    let proxy = Proxy::start_from(dir.clone(), config_path.clone(), &[]).await;
    wait_started(&proxy).await;

    // The swap: conf.new holds the next version; conf goes away, conf.new takes its name.
    let next = dir.join("conf.new");
    std::fs::create_dir(&next).expect("create conf.new");
    std::fs::write(
        next.join("proxy.toml"),
        config_with(listen, up.addr(), &format!("{one}{}", route("two", ""))),
    )
    .expect("write the next version");
    std::fs::rename(&conf, dir.join("conf.old")).expect("rename conf away");
    std::fs::rename(&next, &conf).expect("rename conf.new into place");
    wait_reloads(&proxy, 1).await;
    assert_eq!(get(&proxy, "/two/x").await.status, 200);

    // An ordinary edit of the file, now in the new folder.
    save_in_place(
        &config_path,
        &config_with(listen, up.addr(), &format!("{one}{}", route("three", ""))),
    );
    wait_reloads(&proxy, 2).await;
    assert_eq!(get(&proxy, "/three/x").await.status, 200);
}

/// A config reached through a symlinked folder, as with a `current -> releases/v1`
/// deploy: switching the symlink to the next release is a change of the config, though
/// no event happens in the folder the file resolved to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switched_release_symlink_is_reloaded() {
    let up = Upstream::start().await;
    let listen = "127.0.0.1:0";
    let one = route("one", "");
    let dir = unique_temp_dir("releases");
    for (release, routes) in [
        ("v1", one.clone()),
        ("v2", format!("{one}{}", route("two", ""))),
    ] {
        let folder = dir.join("releases").join(release);
        std::fs::create_dir_all(&folder).expect("create the release");
        std::fs::write(
            folder.join("proxy.toml"),
            config_with(listen, up.addr(), &routes),
        )
        .expect("write the release's config");
    }
    std::os::unix::fs::symlink("releases/v1", dir.join("current")).expect("symlink current");
    let proxy = Proxy::start_from(dir.clone(), dir.join("current").join("proxy.toml"), &[]).await;
    wait_started(&proxy).await;
    assert_eq!(get(&proxy, "/two/x").await.status, 404);

    // `ln -sfn releases/v2 current`, atomically: a new symlink renamed over the old one.
    let tmp = dir.join("current.tmp");
    std::os::unix::fs::symlink("releases/v2", &tmp).expect("symlink current.tmp");
    std::fs::rename(&tmp, dir.join("current")).expect("rename current.tmp over current");
    wait_reloads(&proxy, 1).await;
    assert_eq!(get(&proxy, "/two/x").await.status, 200);
}

/// `cutoff --config proxy.toml 2>>cutoff.log`, run in the config's folder at debug level:
/// the proxy's own log lines are writes in the watched folder. Writing to a file the watch
/// does not care about must not wake it, or every round logs a line that starts the next:
/// a reload round every 150 ms, forever, with no edit at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_log_beside_the_config_does_not_keep_the_watch_busy() {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let up = Upstream::start().await;
    let dir = unique_temp_dir("own-log");
    let config = config_with("127.0.0.1:0", up.addr(), &route("one", ""))
        .replace("level = \"info\"", "level = \"debug\"");
    std::fs::write(dir.join("proxy.toml"), &config).expect("write the config");
    let log_path = dir.join("cutoff.log");
    let log = std::fs::File::create(&log_path).expect("create the log");
    let _proxy = Kill(
        std::process::Command::new(BIN)
            .args(["--config", "proxy.toml"])
            .current_dir(&dir)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn cutoff"),
    );
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    poll_until(
        STARTUP_TIMEOUT,
        "the `listening` line in cutoff.log",
        || read_log().contains("\"listening\""),
    )
    .await;
    // One neighbour's change, so that the watch runs one round.
    std::fs::write(dir.join("notes.txt"), "hello").expect("write a neighbour");

    let rounds = || {
        read_log()
            .matches("config and certificates unchanged")
            .count()
    };
    let window = Instant::now() + Duration::from_secs(3);
    while Instant::now() < window {
        let n = rounds();
        assert!(
            n < 5,
            "{n} reload rounds within 3 s of an idle proxy, each woken by the log line of \
             the one before:\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload that replaces an upstream (its settings changed) closes the old pool's idle
/// connections at once, even while a long response (a stream of hours, a tunnel) still
/// holds the old upstream: nothing else would, since the pool's sweep looks at the current
/// table only. The long response itself goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_upstreams_idle_connections_are_closed_at_the_reload() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("upstream address");
    // The first path each upstream connection carried, sent when the proxy closes it.
    let (tx, mut closed) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut first = None;
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 4096];
                while let Some(head) = read_raw_head(&mut s, &mut pending).await {
                    let text = String::from_utf8_lossy(&head);
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    first.get_or_insert(path.clone());
                    if path.contains("stream") {
                        // Held until the proxy closes it.
                        let head =
                            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                        if s.write_all(head.as_bytes()).await.is_ok() {
                            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                        }
                        break;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        break;
                    }
                }
                let _ = tx.send(first.unwrap_or_default());
            });
        }
    });
    let listen = "127.0.0.1:0";
    let one = route("one", "");
    let proxy = Proxy::start(&config_with(listen, addr, &one)).await;
    let path = proxy.config_path().to_path_buf();
    wait_started(&proxy).await;
    // A long response holds the route, and with it the upstream and its pool.
    let mut stream = Client::connect(proxy.addr()).await;
    stream.send_head("GET", "/one/stream", &[]).await;
    let head = stream.read_head(WAIT).await;
    assert_eq!(head.status, 200);
    // A second connection upstream, which goes back to the pool, idle.
    assert_eq!(get(&proxy, "/one/idle").await.status, 200);
    // A changed setting of the upstream: the reload builds a new pool.
    let changed = format!("pool_idle_timeout = \"59s\"\n{one}");
    save_by_rename(&path, &config_with(listen, addr, &changed));
    wait_reloads(&proxy, 1).await;
    let first = within(WAIT, "the old pool's idle connection closed", closed.recv()).await;
    assert_eq!(first.as_deref(), Some("/idle"));
    assert!(
        closed.try_recv().is_err(),
        "the long response's upstream call was closed by the reload"
    );
    assert_eq!(get(&proxy, "/one/after").await.status, 200);
    drop(stream);
}
