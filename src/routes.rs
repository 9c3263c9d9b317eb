//! The route table: which route serves a request, and the upstreams routes point at.
//!
//! A table is immutable once built. Reload builds a new one and swaps it in whole, so a
//! request sees one consistent table from start to end, and requests in flight keep the
//! routes (and upstream pools) they started with through their `Arc`s. Building reuses what
//! a route or upstream already had when its config did not change: upstream pools keep
//! their warm connections, and routes keep their metric handles and saved-work estimator.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use http::Method;

use crate::config::{Config, OnDisconnect, RouteConfig};
use crate::metrics::RouteMetrics;
use crate::outcome::RouteInfo;
use crate::upstream::Upstream;

pub struct Route {
    pub config: RouteConfig,
    pub info: RouteInfo,
    pub upstream: Arc<Upstream>,
}

pub struct RouteTable {
    /// Longest prefix first; among equal prefixes, file order.
    routes: Vec<Arc<Route>>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
}

impl RouteTable {
    /// Fails only when an upstream's TLS material cannot be loaded.
    pub fn build(config: &Config, previous: Option<&RouteTable>) -> Result<RouteTable, String> {
        let mut upstreams: BTreeMap<String, Arc<Upstream>> = BTreeMap::new();
        for (name, cfg) in &config.upstreams {
            let reused = previous
                .and_then(|p| p.upstreams.get(name))
                .filter(|u| u.serves(cfg))
                .cloned();
            let upstream = match reused {
                Some(u) => u,
                None => Arc::new(Upstream::new(cfg.clone())?),
            };
            upstreams.insert(name.clone(), upstream);
        }
        let mut routes: Vec<Arc<Route>> = config
            .routes
            .iter()
            .map(|rc| {
                let metrics = previous
                    .and_then(|p| p.routes.iter().find(|r| r.config.name == rc.name))
                    .map(|r| r.info.metrics.clone())
                    .unwrap_or_else(|| Arc::new(RouteMetrics::register(&rc.name)));
                Arc::new(Route {
                    info: RouteInfo {
                        name: Arc::from(rc.name.as_str()),
                        metrics,
                        timeout: rc.timeout,
                        protected: rc.on_client_disconnect == OnDisconnect::Continue,
                    },
                    // Validation guarantees the upstream exists.
                    upstream: upstreams[&rc.upstream].clone(),
                    config: rc.clone(),
                })
            })
            .collect();
        // Stable sort: equal prefixes keep file order.
        routes.sort_by_key(|r| std::cmp::Reverse(r.config.path_prefix.len()));
        Ok(RouteTable { routes, upstreams })
    }

    /// The route with the longest prefix of `path` that accepts `method`. Prefixes are
    /// plain string prefixes, as in nginx's `location /prefix`: `/news` also matches
    /// `/newsletter`; write `/news/` to match a path segment.
    pub fn find(&self, path: &str, method: &Method) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| {
            path.starts_with(r.config.path_prefix.as_str())
                && r.config
                    .methods
                    .as_ref()
                    .is_none_or(|ms| ms.contains(method))
        })
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The table as `cutoff check` prints it, in matching order.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<20} {:<10} {:<12} {:<8} {:<8} {:<9} UPSTREAM",
            "ROUTE", "PREFIX", "METHODS", "STRIP", "TIMEOUT", "IDLE", "ON_LEAVE"
        );
        for r in &self.routes {
            let c = &r.config;
            let methods = c.methods.as_ref().map_or("any".to_string(), |ms| {
                ms.iter().map(Method::as_str).collect::<Vec<_>>().join(",")
            });
            let dur = |d: Option<std::time::Duration>| {
                d.map_or("off".to_string(), |d| {
                    humantime::format_duration(d).to_string()
                })
            };
            let urls: Vec<&str> = r
                .upstream
                .config
                .endpoints
                .iter()
                .map(|e| e.url.as_str())
                .collect();
            let _ = writeln!(
                out,
                "{:<16} {:<20} {:<10} {:<12} {:<8} {:<8} {:<9} {} ({})",
                c.name,
                c.path_prefix,
                methods,
                if c.strip_prefix { "strip" } else { "keep" },
                dur(c.timeout),
                if c.idle_timeout.is_some() {
                    dur(c.idle_timeout)
                } else {
                    "-".into()
                },
                match c.on_client_disconnect {
                    OnDisconnect::Cancel => "cancel",
                    OnDisconnect::Continue => "continue",
                },
                c.upstream,
                urls.join(", ")
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_and_methods() {
        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            r#"
[server]
listen = "127.0.0.1:0"
[upstreams.a]
url = "http://127.0.0.1:1"
[[routes]]
name = "all"
path_prefix = "/"
upstream = "a"
[[routes]]
name = "news-post"
path_prefix = "/news/"
methods = ["POST"]
upstream = "a"
[[routes]]
name = "news"
path_prefix = "/news/"
upstream = "a"
[[routes]]
name = "deep"
path_prefix = "/news/deep/"
methods = ["GET"]
upstream = "a"
"#,
        )
        .unwrap();
        let t = RouteTable::build(&cfg, None).unwrap();
        let name = |p: &str, m: Method| t.find(p, &m).map(|r| r.config.name.clone());
        assert_eq!(name("/x", Method::GET).as_deref(), Some("all"));
        assert_eq!(name("/news/1", Method::GET).as_deref(), Some("news"));
        assert_eq!(name("/news/deep/1", Method::GET).as_deref(), Some("deep"));
        assert_eq!(name("/news/deep/1", Method::PUT).as_deref(), Some("news"));
        assert_eq!(name("/news/1", Method::POST).as_deref(), Some("news-post"));
        assert!(t.describe().contains("news-post"));
    }
}
