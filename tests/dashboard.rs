//! `dashboards/cutoff.json` imports as is, and every query in it names metrics that the
//! proxy really exports.
//!
//! The first test reads the file alone: the shape Grafana needs (panels with a type, a
//! position and non-empty queries, the `datasource` and `route` variables). The second
//! runs the proxy (with a pool upstream, so that queue and endpoint series exist), drives
//! a little traffic through it, and checks every `cutoff_*` name in every query against a
//! real scrape. `tests/prometheus.rs` goes further and runs each query through Prometheus.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Client, Proxy, Upstream, WAIT, config_head, http_get, log_path_is};
use serde_json::Value;

const DASHBOARD: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dashboards/cutoff.json"
));

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("dashboards/cutoff.json is valid JSON")
}

fn panels(d: &Value) -> &[Value] {
    d["panels"]
        .as_array()
        .map(Vec::as_slice)
        .expect("the dashboard has a `panels` array")
}

fn variable<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["templating"]["list"]
        .as_array()
        .expect("the dashboard has templating variables")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no template variable named `{name}`"))
}

/// Every PromQL expression of every panel, with the panel's title.
fn exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((title.clone(), t["expr"].as_str().unwrap_or("").to_string()));
        }
    }
    out
}

/// The `cutoff_*` metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("cutoff_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if !before.is_some_and(is_ident) {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_has_the_shape_grafana_imports() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(
        (36..=41).contains(&schema),
        "schemaVersion {schema}: expected a current Grafana schema"
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "uid");

    // The data source is chosen at import or on the dashboard, never hard-wired.
    let ds = variable(&d, "datasource");
    assert_eq!(ds["type"], "datasource", "datasource variable: {ds}");
    assert_eq!(ds["query"], "prometheus", "datasource variable: {ds}");

    // `route`: every route the proxy reports, several at once, with "All".
    let route = variable(&d, "route");
    assert_eq!(route["type"], "query", "route variable: {route}");
    let query = route["query"]["query"]
        .as_str()
        .or(route["query"].as_str())
        .unwrap_or("");
    assert_eq!(
        query, "label_values(cutoff_requests_total, route)",
        "route variable: {route}"
    );
    assert_eq!(route["multi"], true, "route variable is multi-valued");
    assert_eq!(route["includeAll"], true, "route variable includes All");
    // `.*` also matches the unrouted requests (route="", absent in Prometheus).
    assert_eq!(route["allValue"], ".*", "route variable's All value");
    assert_eq!(route["datasource"]["uid"], "${datasource}");

    let ps = panels(&d);
    assert!(ps.len() >= 12, "only {} panels", ps.len());
    let mut ids = BTreeSet::new();
    let mut cells: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    for p in ps {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "a panel without a title: {p}");
        let kind = p["type"].as_str().unwrap_or("");
        assert!(
            ["timeseries", "stat"].contains(&kind),
            "panel {title:?} has type {kind:?}"
        );
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no id"));
        assert!(ids.insert(id), "panel id {id} is used twice");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} uses the datasource variable"
        );
        let g = &p["gridPos"];
        let pos = |k: &str| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("panel {title:?}: gridPos.{k} missing: {g}"))
        };
        let (x, y, w, h) = (pos("x"), pos("y"), pos("w"), pos("h"));
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "panel {title:?}: gridPos {g}"
        );
        for (ox, oy, ow, oh, other) in &cells {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "panels {title:?} and {other:?} overlap");
        }
        cells.push((x, y, w, h, title.to_string()));

        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.trim().is_empty(), "panel {title:?}: empty expr: {t}");
            assert!(
                ref_ids.insert(t["refId"].as_str().unwrap_or("").to_string()),
                "panel {title:?}: duplicate refId"
            );
            for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
                assert_eq!(
                    expr.matches(open).count(),
                    expr.matches(close).count(),
                    "panel {title:?}: unbalanced {open}{close} in {expr}"
                );
            }
            assert_eq!(
                expr.matches('"').count() % 2,
                0,
                "panel {title:?}: unbalanced quotes in {expr}"
            );
            // A per-route metric always honours the route selector.
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {title:?}: no cutoff metric in {expr}"
            );
            let per_route = names.iter().any(|n| {
                !n.starts_with("cutoff_queue_")
                    && !n.starts_with("cutoff_endpoint_")
                    && n != "cutoff_config_reloads_total"
            });
            if per_route {
                assert!(
                    expr.contains("route=~\"$route\""),
                    "panel {title:?} ignores the route variable: {expr}"
                );
            }
        }
    }

    // The headline comes first and spans the width: wasted against saved.
    let first = &ps[0];
    let first_exprs: String = first["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["expr"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(first["gridPos"]["y"], 0, "the headline panel is at the top");
    assert_eq!(
        first["gridPos"]["w"], 24,
        "the headline panel is full width"
    );
    assert!(
        first_exprs.contains("cutoff_upstream_wasted_seconds_total")
            && first_exprs.contains("cutoff_upstream_saved_seconds_total"),
        "the first panel shows wasted vs saved: {first_exprs}"
    );

    // What the issue asks to see, somewhere on the dashboard.
    let all: String = exprs(&d)
        .into_iter()
        .map(|(_, e)| e)
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "outcome=\"client_closed\"",
        "outcome=\"timeout\"",
        "histogram_quantile(0.5, sum by (le) (rate(cutoff_cancel_propagation_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(cutoff_cancel_propagation_seconds_bucket",
        "cutoff_upstream_duration_seconds_sum",
        "cutoff_upstream_inflight",
        "sum by (cancelled_by, phase)",
        "cutoff_discarded_bytes_total",
        "cutoff_protected_completed_total",
        "sum by (result)",
        "phase=\"queued\"",
        "cutoff_queue_length",
        "cutoff_queue_wait_seconds_bucket",
        "cutoff_endpoint_inflight",
        "cutoff_endpoint_ejections_total",
    ] {
        assert!(all.contains(needle), "no panel query contains {needle:?}");
    }
}

fn config(
    up: std::net::SocketAddr,
    pool_a: std::net::SocketAddr,
    pool_b: std::net::SocketAddr,
) -> String {
    format!(
        r#"{head}
[upstreams.up]
url = "http://{up}"

[upstreams.pool]
urls = ["http://{pool_a}", "http://{pool_b}"]
max_inflight = 2
queue_timeout = "10s"

[[routes]]
name = "api"
path_prefix = "/delay/api/"
upstream = "up"
timeout = "300ms"

[[routes]]
name = "pooled"
path_prefix = "/delay/pool/"
upstream = "pool"
timeout = "10s"
"#,
        head = config_head("")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let up = Upstream::start().await;
    let (pool_a, pool_b) = (Upstream::start().await, Upstream::start().await);
    let proxy = Proxy::start(&config(up.addr(), pool_a.addr(), pool_b.addr())).await;

    // Some traffic: completed, timed out, a client gone while its call waited in the queue
    // behind two that hold the pool's two slots.
    assert_eq!(
        http_get(proxy.addr(), "/delay/api/ok?ms=10").await.status,
        200
    );
    assert_eq!(
        http_get(proxy.addr(), "/delay/api/slow?ms=5000")
            .await
            .status,
        504
    );
    let mut holders = Vec::new();
    for i in 0..2 {
        let mut holder = Client::connect(proxy.addr()).await;
        holder.get(&format!("/delay/pool/hold{i}?ms=30000")).await;
        holders.push(holder);
    }
    proxy
        .wait_for_metric(
            "cutoff_upstream_inflight",
            &[("route", "pooled")],
            |v| v == 2.0,
            WAIT,
        )
        .await;
    let mut queued = Client::connect(proxy.addr()).await;
    queued.get("/delay/pool/queued?ms=10").await;
    proxy
        .wait_for_metric(
            "cutoff_queue_length",
            &[("upstream", "pool")],
            |v| v == 1.0,
            WAIT,
        )
        .await;
    queued.close_fin().await;
    let leave = proxy
        .wait_for_access_log(|v| log_path_is(v, "/delay/pool/queued"), WAIT)
        .await;
    assert_eq!(leave["outcome"], "client_closed", "{leave}");
    // The holders leave too: cancelled while awaiting headers.
    for h in holders {
        h.close_fin().await;
    }
    proxy
        .wait_for_access_logs(5, |v| v["route"] == "pooled" || v["route"] == "api", WAIT)
        .await;
    proxy
        .wait_for_metric(
            "cutoff_upstream_cancelled_total",
            &[
                ("route", "pooled"),
                ("cancelled_by", "client"),
                ("phase", "queued"),
            ],
            |v| v == 1.0,
            Duration::from_secs(1),
        )
        .await;
    let never_sent = pool_a.records_for("/delay/pool/queued").len()
        + pool_b.records_for("/delay/pool/queued").len();
    assert_eq!(never_sent, 0, "the queued call reached an endpoint");

    let text = proxy.metrics_text().await;
    let mut exported = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some("histogram")) = (parts.next(), parts.next()) {
                histograms.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            exported.insert(line[..end].to_string());
        }
    }

    let d = dashboard();
    let mut used: Vec<(String, String)> = exprs(&d);
    for var in ["route", "upstream"] {
        let v = variable(&d, var);
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or("");
        used.push((format!("variable {var}"), q.to_string()));
    }
    let mut missing = Vec::new();
    for (title, expr) in &used {
        for name in metric_names(expr) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| histograms.contains(*b));
            if let Some(base) = base {
                assert!(
                    exported.contains(&name),
                    "histogram {base} has no {name} series"
                );
            } else if !exported.contains(&name) {
                missing.push(format!("{name} (panel {title:?})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the proxy does not export:\n  {}\n/metrics:\n{text}",
        missing.join("\n  ")
    );
}
