//! `proxy.toml`: its types, defaults and validation.
//!
//! Loading happens in two passes. serde reads the file into `Raw*` structs that keep the
//! span of every value (`toml::Spanned`), rejecting unknown keys and wrong types; then
//! [`validate`] turns those into the checked [`Config`] the proxy runs on, resolving names,
//! durations, addresses and URLs. Both passes report errors the same way, as
//! `PATH:LINE:COL: KEY: what is wrong`, because the user's next step is to open the file at
//! that line. A config that fails either pass is never started and never swapped in.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, Uri};
use serde::Deserialize;
use toml::Spanned;

/// Defaults named once, so that the README and the code cannot disagree.
pub mod defaults {
    use std::time::Duration;
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
    pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
    pub const MAX_HEADER_BYTES: usize = 64 * 1024;
    pub const MAX_CONNECTIONS: usize = 10_000;
    pub const MAX_QUEUE: usize = 1000;
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
    pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const POOL_MAX_IDLE: usize = 256;
    /// What an HTTP/2 upstream may send of one response ahead of its client (see
    /// `upstream/h2.rs`).
    pub const H2_STREAM_WINDOW: usize = 1 << 20;
    /// What a client's socket may hold unsent (see `send_queue.rs`).
    pub const TCP_NOTSENT_LOWAT: usize = 512 * 1024;
}

/// Upper bounds that no working setup comes near. A value beyond them is a typo, and taking
/// it would turn into a panic later (a deadline past the end of the clock, a semaphore
/// larger than tokio allows, a thread per unit), so the file is refused instead.
pub mod limits {
    use std::time::Duration;
    /// A year as humantime reads `1y` (365.25 days) and `12months`, and a little more.
    pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
    pub const MAX_COUNT: usize = 1 << 24;
    pub const MAX_WORKERS: usize = 1024;
    pub const MAX_HEADER_BYTES: usize = 16 << 20;
    /// One HTTP/2 frame of the default size, and 256 MiB: the window is memory the
    /// upstream may fill for a client that stopped reading.
    pub const MIN_H2_STREAM_WINDOW: usize = 16 * 1024;
    pub const MAX_H2_STREAM_WINDOW: usize = 256 << 20;
    /// Beyond the kernel's largest send buffer by default (4 MiB), many times over.
    pub const MAX_TCP_NOTSENT_LOWAT: usize = 256 << 20;
}

/// A configuration error, located in the file so that it can be fixed in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending key, such as `routes[2].timeout`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.path.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The checked configuration the proxy runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was read from: reload watches this file.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub log: LogConfig,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// In file order; the route table orders them by prefix length.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub shutdown_grace: Duration,
    /// Connections served at once; beyond it the accept loop stops accepting, so new
    /// connections wait in the kernel backlog instead of exhausting file descriptors.
    pub max_connections: usize,
    /// Threads serving clients, each with its own single-threaded runtime; 0 means one
    /// per core the process may run on.
    pub workers: usize,
    pub header_read_timeout: Duration,
    /// A client connection with no request in flight for this long is closed, so that idle
    /// keep-alive connections do not hold slots of `max_connections` forever.
    pub keepalive_timeout: Duration,
    /// Longest gap between two reads of a request body before the client counts as gone.
    pub body_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Whether the hang-up thread asks for real-time priority (see `hangup.rs`).
    pub hangup_realtime: bool,
    /// Bytes a client's socket may hold unsent; 0 leaves the kernel's default (see
    /// `send_queue.rs`).
    pub tcp_notsent_lowat: u32,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,cutoff::access=warn`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// One instance of an upstream, as its URL named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// The URL as written, used as the `endpoint` label (bounded by the config).
    pub url: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, sent as `Host` unless the route preserves the client's.
    pub authority: String,
    /// Path part of the URL without a trailing slash (`""` for none), prepended to every
    /// forwarded path.
    pub base_path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub endpoints: Vec<EndpointConfig>,
    pub connect_timeout: Duration,
    pub protocol: Protocol,
    pub ca_file: Option<PathBuf>,
    /// Calls at once across the upstream's endpoints; `None` means no admission queue.
    pub max_inflight: Option<usize>,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// The flow-control window granted to each stream of an HTTP/2 upstream, in bytes.
    pub h2_stream_window: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    Cancel,
    Continue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    /// `None` accepts every method.
    pub methods: Option<Vec<Method>>,
    pub strip_prefix: bool,
    pub upstream: String,
    /// `None` when the file says `timeout = "off"`.
    pub timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub on_client_disconnect: OnDisconnect,
    pub preserve_host: bool,
    pub deadline_header: Option<HeaderName>,
    pub accept_deadline_header: Option<HeaderName>,
}

// ---------------------------------------------------------------------------------------
// Pass one: what serde reads. Every value that needs a semantic check keeps its span.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    admin: Option<RawAdmin>,
    log: Option<RawLog>,
    #[serde(default)]
    upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Spanned<String>,
    shutdown_grace: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    workers: Option<Spanned<i64>>,
    header_read_timeout: Option<Spanned<String>>,
    keepalive_timeout: Option<Spanned<String>>,
    body_read_timeout: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<i64>>,
    hangup_realtime: Option<bool>,
    tcp_notsent_lowat: Option<Spanned<i64>>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Spanned<String>>,
    level: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<Spanned<String>>,
    urls: Option<Spanned<Vec<Spanned<String>>>>,
    connect_timeout: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    max_inflight: Option<Spanned<i64>>,
    max_queue: Option<Spanned<i64>>,
    queue_timeout: Option<Spanned<String>>,
    pool_idle_timeout: Option<Spanned<String>>,
    pool_max_idle: Option<Spanned<i64>>,
    h2_stream_window: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    path_prefix: Spanned<String>,
    methods: Option<Vec<Spanned<String>>>,
    strip_prefix: Option<bool>,
    upstream: Spanned<String>,
    timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    on_client_disconnect: Option<Spanned<String>>,
    preserve_host: Option<bool>,
    deadline_header: Option<Spanned<String>>,
    accept_deadline_header: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("cannot read the file: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and validates `text` as if read from `path` (which only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let at = Locator { path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        at.error(offset, e.message().trim_end().to_string())
    })?;
    validate(&at, raw)
}

/// Turns byte offsets into `PATH:LINE:COL` and names the key found there.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn error(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = before[line_start..].chars().count() + 1;
        ConfigError {
            path: self.path.to_path_buf(),
            line,
            column,
            key: self.key_at(offset),
            message: message.into(),
        }
    }

    fn spanned<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(value.span().start, message)
    }

    /// The dotted key at `offset`: the nearest table header above it (with the index of an
    /// array of tables, as in `routes[1]`) and the key that starts the line. A heuristic
    /// for messages only; it never decides validity.
    fn key_at(&self, offset: usize) -> String {
        let mut table = String::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        // The last `key =` seen in this table: the key of a value on a continuation line
        // of a multi-line array.
        let mut key = String::new();
        let mut pos = 0;
        for line in self.text.split_inclusive('\n') {
            let end = pos + line.len();
            let trimmed = line.trim();
            if let Some(name) = trimmed
                .strip_prefix("[[")
                .and_then(|s| s.split("]]").next())
            {
                let name = name.trim().to_string();
                let n = counts.entry(name.clone()).or_insert(0);
                table = format!("{name}[{n}]");
                *n += 1;
                key.clear();
            } else if let Some(name) = trimmed.strip_prefix('[').and_then(|s| s.split(']').next()) {
                table = name.trim().to_string();
                key.clear();
            } else if let Some((k, _)) = trimmed.split_once('=')
                && !trimmed.starts_with('#')
                && !trimmed.starts_with('"')
            {
                key = k.trim().trim_matches('"').to_string();
            }
            if offset < end || end == self.text.len() {
                break;
            }
            pos = end;
        }
        match (table.is_empty(), key.is_empty()) {
            (true, _) => key,
            (false, true) => table,
            (false, false) => format!("{table}.{key}"),
        }
    }
}

fn validate(at: &Locator<'_>, raw: RawConfig) -> Result<Config, ConfigError> {
    let s = raw.server;
    let server = ServerConfig {
        listen: socket_addr(at, &s.listen)?,
        // Zero is a real choice here: cancel everything in flight at once on SIGTERM.
        shutdown_grace: s
            .shutdown_grace
            .as_ref()
            .map_or(Ok(defaults::SHUTDOWN_GRACE), |v| duration_or_zero(at, v))?,
        max_connections: count_or(
            at,
            &s.max_connections,
            defaults::MAX_CONNECTIONS,
            1,
            limits::MAX_COUNT,
        )?,
        workers: count_or(at, &s.workers, 0, 0, limits::MAX_WORKERS)?,
        header_read_timeout: duration_or(
            at,
            &s.header_read_timeout,
            defaults::HEADER_READ_TIMEOUT,
        )?,
        keepalive_timeout: duration_or(at, &s.keepalive_timeout, defaults::KEEPALIVE_TIMEOUT)?,
        body_read_timeout: duration_or(at, &s.body_read_timeout, defaults::BODY_READ_TIMEOUT)?,
        // hyper's read buffer cannot be smaller than 8192 bytes.
        max_header_bytes: count_or(
            at,
            &s.max_header_bytes,
            defaults::MAX_HEADER_BYTES,
            8192,
            limits::MAX_HEADER_BYTES,
        )?,
        hangup_realtime: s.hangup_realtime.unwrap_or(true),
        tcp_notsent_lowat: count_or(
            at,
            &s.tcp_notsent_lowat,
            defaults::TCP_NOTSENT_LOWAT,
            0,
            limits::MAX_TCP_NOTSENT_LOWAT,
        )? as u32,
        tls: s
            .tls
            .map(|t| -> Result<TlsConfig, ConfigError> {
                Ok(TlsConfig {
                    cert: existing_file(at, &t.cert)?,
                    key: existing_file(at, &t.key)?,
                })
            })
            .transpose()?,
    };

    let admin = raw
        .admin
        .map(|a| socket_addr(at, &a.listen).map(|listen| AdminConfig { listen }))
        .transpose()?;

    let log = match raw.log {
        None => LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        },
        Some(l) => LogConfig {
            format: match &l.format {
                None => LogFormat::Text,
                Some(f) => match f.get_ref().as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    other => {
                        return Err(at.spanned(
                            f,
                            format!("unknown format `{other}`, expected \"text\" or \"json\""),
                        ));
                    }
                },
            },
            level: match &l.level {
                None => "info".into(),
                Some(v) => {
                    tracing_subscriber::EnvFilter::try_new(v.get_ref())
                        .map_err(|e| at.spanned(v, format!("invalid log level: {e}")))?;
                    v.get_ref().clone()
                }
            },
        },
    };

    let mut upstreams = BTreeMap::new();
    for (name, u) in raw.upstreams {
        upstreams.insert(name.clone(), upstream(at, name, u)?);
    }

    let mut routes = Vec::with_capacity(raw.routes.len());
    let mut names = HashSet::new();
    for r in raw.routes {
        let name = r.name.get_ref().clone();
        if name.is_empty() {
            return Err(at.spanned(&r.name, "a route name cannot be empty"));
        }
        if !names.insert(name.clone()) {
            return Err(at.spanned(
                &r.name,
                format!("duplicate route name `{name}`: names must be unique"),
            ));
        }
        let prefix = r.path_prefix.get_ref();
        if !prefix.starts_with('/') {
            return Err(at.spanned(
                &r.path_prefix,
                format!("path_prefix `{prefix}` must start with `/`"),
            ));
        }
        if !upstreams.contains_key(r.upstream.get_ref()) {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            return Err(at.spanned(
                &r.upstream,
                format!(
                    "no upstream named `{}` (defined: {})",
                    r.upstream.get_ref(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        let methods = r
            .methods
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        let upper = m.get_ref().to_ascii_uppercase();
                        if upper.is_empty() || !upper.bytes().all(|b| b.is_ascii_alphabetic()) {
                            return Err(at.spanned(m, format!("invalid method `{}`", m.get_ref())));
                        }
                        Method::from_bytes(upper.as_bytes())
                            .map_err(|_| at.spanned(m, format!("invalid method `{}`", m.get_ref())))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        // The table tries equal prefixes in file order, so an earlier route with the same
        // prefix that takes every method of this one leaves it nothing: almost always a
        // copy-paste slip, and one that silently sends traffic to the wrong upstream.
        if let Some(earlier) = routes.iter().find(|e: &&RouteConfig| {
            e.path_prefix == *prefix
                && match (&e.methods, &methods) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(theirs), Some(ours)) => ours.iter().all(|m| theirs.contains(m)),
                }
        }) {
            return Err(at.spanned(
                &r.path_prefix,
                format!(
                    "route `{name}` can never match: route `{}` comes first with the same \
                     path_prefix and takes all of its methods (put the narrower route first)",
                    earlier.name
                ),
            ));
        }
        let timeout = match &r.timeout {
            None => Some(defaults::ROUTE_TIMEOUT),
            Some(v) if v.get_ref() == "off" => None,
            Some(v) => Some(duration(at, v)?),
        };
        let on_client_disconnect = match &r.on_client_disconnect {
            None => OnDisconnect::Cancel,
            Some(v) => match v.get_ref().as_str() {
                "cancel" => OnDisconnect::Cancel,
                "continue" => OnDisconnect::Continue,
                other => {
                    return Err(at.spanned(
                        v,
                        format!("unknown value `{other}`, expected \"cancel\" or \"continue\""),
                    ));
                }
            },
        };
        routes.push(RouteConfig {
            name,
            path_prefix: prefix.clone(),
            methods,
            strip_prefix: r.strip_prefix.unwrap_or(false),
            upstream: r.upstream.get_ref().clone(),
            timeout,
            idle_timeout: r
                .idle_timeout
                .as_ref()
                .map(|v| duration(at, v))
                .transpose()?,
            on_client_disconnect,
            preserve_host: r.preserve_host.unwrap_or(false),
            deadline_header: header_name(at, &r.deadline_header)?,
            accept_deadline_header: header_name(at, &r.accept_deadline_header)?,
        });
    }

    Ok(Config {
        source: at.path.to_path_buf(),
        server,
        admin,
        log,
        upstreams,
        routes,
    })
}

fn upstream(at: &Locator<'_>, name: String, u: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
    let endpoints = match (&u.url, &u.urls) {
        (Some(url), None) => vec![endpoint(at, url)?],
        (None, Some(urls)) => {
            if urls.get_ref().is_empty() {
                return Err(at.spanned(urls, "`urls` needs at least one URL"));
            }
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for url in urls.get_ref() {
                if !seen.insert(url.get_ref().clone()) {
                    return Err(at.spanned(url, format!("duplicate URL `{}`", url.get_ref())));
                }
                out.push(endpoint(at, url)?);
            }
            out
        }
        (Some(url), Some(_)) => {
            return Err(at.spanned(url, "give either `url` or `urls`, not both"));
        }
        (None, None) => {
            // The table's header, however its name is quoted (serde keeps no span for it).
            let header = [
                format!("[upstreams.{name}]"),
                format!("[upstreams.\"{name}\"]"),
                format!("[upstreams.'{name}']"),
            ]
            .iter()
            .find_map(|h| at.text.find(h.as_str()));
            return Err(at.error(
                header.unwrap_or(0),
                format!("upstream `{name}` needs `url` or `urls`"),
            ));
        }
    };
    let protocol = match &u.protocol {
        None => Protocol::Auto,
        Some(p) => match p.get_ref().as_str() {
            "http1" => Protocol::Http1,
            "h2" => Protocol::H2,
            "auto" => Protocol::Auto,
            other => {
                return Err(at.spanned(
                    p,
                    format!("unknown protocol `{other}`, expected \"http1\", \"h2\" or \"auto\""),
                ));
            }
        },
    };
    Ok(UpstreamConfig {
        name,
        endpoints,
        connect_timeout: duration_or(at, &u.connect_timeout, defaults::CONNECT_TIMEOUT)?,
        protocol,
        ca_file: u
            .ca_file
            .as_ref()
            .map(|f| existing_file(at, f))
            .transpose()?,
        max_inflight: u
            .max_inflight
            .as_ref()
            .map(|v| count(at, v, 1, limits::MAX_COUNT))
            .transpose()?,
        max_queue: count_or(at, &u.max_queue, defaults::MAX_QUEUE, 0, limits::MAX_COUNT)?,
        queue_timeout: duration_or(at, &u.queue_timeout, defaults::QUEUE_TIMEOUT)?,
        pool_idle_timeout: duration_or(at, &u.pool_idle_timeout, defaults::POOL_IDLE_TIMEOUT)?,
        pool_max_idle: count_or(
            at,
            &u.pool_max_idle,
            defaults::POOL_MAX_IDLE,
            0,
            limits::MAX_COUNT,
        )?,
        // Within the bounds, which are below HTTP/2's 2^31 - 1.
        h2_stream_window: count_or(
            at,
            &u.h2_stream_window,
            defaults::H2_STREAM_WINDOW,
            limits::MIN_H2_STREAM_WINDOW,
            limits::MAX_H2_STREAM_WINDOW,
        )? as u32,
    })
}

fn endpoint(at: &Locator<'_>, url: &Spanned<String>) -> Result<EndpointConfig, ConfigError> {
    let text = url.get_ref();
    let bad = |why: &str| at.spanned(url, format!("invalid URL `{text}`: {why}"));
    let uri: Uri = text.parse().map_err(|_| bad("not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        Some(other) => return Err(bad(&format!("scheme `{other}` is not http or https"))),
        None => return Err(bad("it needs http:// or https://")),
    };
    let authority = uri.authority().ok_or_else(|| bad("it has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info is not supported"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("it has no host"));
    }
    if uri.query().is_some() {
        return Err(bad("a query is not allowed"));
    }
    // http::Uri drops a fragment without a word; it would be dropped from every request.
    if text.contains('#') {
        return Err(bad("a fragment is not allowed"));
    }
    // Read the port from the text: `Authority::port` answers None for one that does not
    // fit in 16 bits, which would silently become the scheme's default.
    let port_text = authority
        .as_str()
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.contains(']'));
    let port = match port_text {
        None => match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        },
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| bad("the port must be 1 to 65535"))?,
    };
    Ok(EndpointConfig {
        url: text.clone(),
        scheme,
        host: host.to_string(),
        port,
        authority: authority.as_str().to_string(),
        base_path: uri.path().trim_end_matches('/').to_string(),
    })
}

fn socket_addr(at: &Locator<'_>, v: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
    v.get_ref().parse().map_err(|_| {
        at.spanned(
            v,
            format!(
                "invalid address `{}`: expected IP:PORT such as \"127.0.0.1:8080\"",
                v.get_ref()
            ),
        )
    })
}

/// A positive duration of at most a year. Zero is refused because every duration but the
/// shutdown grace is a timeout or a wait, where zero means "fail at once" and is never what
/// was meant (a connection is turned away before it can be read, a queue never admits).
fn duration(at: &Locator<'_>, v: &Spanned<String>) -> Result<Duration, ConfigError> {
    let d = duration_or_zero(at, v)?;
    if d.is_zero() {
        return Err(at.spanned(v, "must be longer than zero"));
    }
    Ok(d)
}

fn duration_or_zero(at: &Locator<'_>, v: &Spanned<String>) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(v.get_ref()).map_err(|e| {
        at.spanned(
            v,
            format!(
                "invalid duration `{}`: {e} (write it like \"250ms\", \"3s\" or \"1m\")",
                v.get_ref()
            ),
        )
    })?;
    if d > limits::MAX_DURATION {
        return Err(at.spanned(v, format!("`{}` is longer than a year", v.get_ref())));
    }
    Ok(d)
}

fn duration_or(
    at: &Locator<'_>,
    v: &Option<Spanned<String>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    v.as_ref().map_or(Ok(default), |v| duration(at, v))
}

/// A whole number in `min..=max`; the bounds are part of the message so that the fix is
/// in the error.
fn count(at: &Locator<'_>, v: &Spanned<i64>, min: usize, max: usize) -> Result<usize, ConfigError> {
    let n = *v.get_ref();
    match usize::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ if n < min as i64 => Err(at.spanned(v, format!("must be at least {min}, not {n}"))),
        _ => Err(at.spanned(v, format!("must be at most {max}, not {n}"))),
    }
}

fn count_or(
    at: &Locator<'_>,
    v: &Option<Spanned<i64>>,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    v.as_ref().map_or(Ok(default), |v| count(at, v, min, max))
}

fn header_name(
    at: &Locator<'_>,
    v: &Option<Spanned<String>>,
) -> Result<Option<HeaderName>, ConfigError> {
    v.as_ref()
        .map(|v| {
            HeaderName::from_bytes(v.get_ref().as_bytes())
                .map_err(|_| at.spanned(v, format!("invalid header name `{}`", v.get_ref())))
        })
        .transpose()
}

/// A file the config names, which must exist now: a missing certificate is a config
/// error (with its line), not a failure at the first handshake.
fn existing_file(at: &Locator<'_>, v: &Spanned<String>) -> Result<PathBuf, ConfigError> {
    let path = relative_to(at.path, v.get_ref());
    if !path.is_file() {
        return Err(at.spanned(v, format!("no such file `{}`", path.display())));
    }
    Ok(path)
}

/// Files named in the config are relative to the config's own folder, so that the config
/// means the same whatever directory the proxy was started from.
fn relative_to(config: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("proxy.toml"), text)
    }

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"

[upstreams.news]
url = "http://127.0.0.1:9000/api/"

[[routes]]
name = "headlines"
path_prefix = "/news/"
upstream = "news"
"#;

    #[test]
    fn defaults_apply() {
        let c = check(BASE).unwrap();
        assert_eq!(c.server.shutdown_grace, defaults::SHUTDOWN_GRACE);
        let r = &c.routes[0];
        assert_eq!(r.timeout, Some(defaults::ROUTE_TIMEOUT));
        assert_eq!(r.on_client_disconnect, OnDisconnect::Cancel);
        let e = &c.upstreams["news"].endpoints[0];
        assert_eq!(e.base_path, "/api");
        assert_eq!(e.authority, "127.0.0.1:9000");
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = BASE.replace("upstream = \"news\"", "upstream = \"nope\"");
        let e = check(&text).unwrap_err();
        assert_eq!(e.line, 11);
        assert_eq!(e.key, "routes[0].upstream");
        assert!(
            e.to_string()
                .starts_with("proxy.toml:11:12: routes[0].upstream: ")
        );

        let text = format!("{BASE}timeout = \"3x\"\n");
        let e = check(&text).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (12, "routes[0].timeout"));

        let text = BASE.replace("[server]\n", "[server]\nlisten_on = 1\n");
        let e = check(&text).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("listen_on"), "{e}");
    }

    #[test]
    fn zero_grace_means_cancel_at_once() {
        let text = BASE.replace("[server]\n", "[server]\nshutdown_grace = \"0s\"\n");
        let c = check(&text).unwrap();
        assert_eq!(c.server.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn ports() {
        let url = |u: &str| BASE.replace("http://127.0.0.1:9000/api/", u);
        let c = check(&url("https://[::1]/api/")).unwrap();
        let e = &c.upstreams["news"].endpoints[0];
        assert_eq!(
            (e.host.as_str(), e.port, e.base_path.as_str()),
            ("::1", 443, "/api")
        );
        let c = check(&url("http://[::1]:65535")).unwrap();
        assert_eq!(c.upstreams["news"].endpoints[0].port, 65535);
        let e = check(&url("http://[::1]:65536")).unwrap_err();
        assert!(e.message.contains("1 to 65535"), "{e}");
    }

    #[test]
    fn a_quoted_upstream_without_url_is_located() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n\n[upstreams.\"news\"]\nconnect_timeout = \"1s\"\n";
        let e = check(text).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("needs `url`"), "{e}");
    }

    #[test]
    fn a_value_on_a_continuation_line_names_its_key() {
        let text = BASE.replace(
            "url = \"http://127.0.0.1:9000/api/\"",
            "urls = [\n  \"http://127.0.0.1:9000\",\n  \"http://127.0.0.1:99999\",\n]",
        );
        let e = check(&text).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (8, "upstreams.news.urls"), "{e}");
        let e = check(&BASE.replace("[server]\n", "[server]\nworkers = -1\n")).unwrap_err();
        assert_eq!(e.key, "server.workers", "{e}");
    }

    #[test]
    fn tcp_notsent_lowat_defaults_to_512_kib_and_0_turns_it_off() {
        let with = |v: &str| {
            BASE.replace(
                "[server]\n",
                &format!("[server]\ntcp_notsent_lowat = {v}\n"),
            )
        };
        assert_eq!(check(BASE).unwrap().server.tcp_notsent_lowat, 512 * 1024);
        assert_eq!(check(&with("0")).unwrap().server.tcp_notsent_lowat, 0);
        assert_eq!(
            check(&with("1048576")).unwrap().server.tcp_notsent_lowat,
            1 << 20
        );
        for bad in ["-1", "268435457", "\"128k\""] {
            let e = check(&with(bad)).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (3, "server.tcp_notsent_lowat"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn hangup_realtime_defaults_on_and_takes_a_bool() {
        assert!(check(BASE).unwrap().server.hangup_realtime);
        let off = BASE.replace("[server]\n", "[server]\nhangup_realtime = false\n");
        assert!(!check(&off).unwrap().server.hangup_realtime);
        let bad = BASE.replace("[server]\n", "[server]\nhangup_realtime = \"yes\"\n");
        let e = check(&bad).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (3, "server.hangup_realtime"),
            "{e}"
        );
    }

    #[test]
    fn timeout_off() {
        let c = check(&format!("{BASE}timeout = \"off\"\n")).unwrap();
        assert_eq!(c.routes[0].timeout, None);
    }
}
