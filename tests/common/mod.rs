//! The harness shared by cutoff's integration tests: each test file says `mod common;`.
//!
//! What is here, and why:
//!
//! - [`within`]: every wait in these tests is bounded, so that a broken build fails fast
//!   with a message that says what it was waiting for, instead of hanging.
//! - [`Proxy`]: runs the real `cutoff` binary as a child process, with a config written to
//!   a fresh temp dir. It learns the listeners' ports from the JSON `listening` lines on
//!   stderr (every config here listens on port 0), collects stderr (echoed to the test's
//!   stderr, so a failing test shows the proxy's own story), and offers waits on log lines,
//!   signals, the exit status, RSS and metrics.
//! - [`Upstream`]: a recording HTTP/1.1 upstream on raw tokio sockets. Per request it notes
//!   when the request arrived, how much body it read, and whether the proxy closed the
//!   connection (and when, FIN or RST) before it wrote its whole response. That is what
//!   cancellation tests assert on: what the upstream observed, not what the proxy claims.
//!   Its behaviour is chosen by the first path segment, so one upstream serves every test
//!   and a test can tag its requests (`/delay/fin-1?ms=30000`); see [`Upstream`].
//! - [`Client`]: a raw HTTP/1.1 client that can leave at any moment, with a FIN
//!   ([`Client::close_fin`]) or a RST ([`Client::close_rst`]), and read responses piece by
//!   piece ([`BodyDecoder`] is shared with the upstream).
//! - Configs: [`config_head`] (the `[server]`/`[admin]`/`[log]` head every test config
//!   shares), [`config_for`], [`config_for_url`], [`pool_config`], [`single_route_config`].
//! - Polling waits, for what has no change event: [`poll_until`], [`wait_log_count`],
//!   [`wait_started`] (the proxy's signal handlers and config watch are installed).
//! - Prometheus text parsing, in `metrics.rs`: [`metric_value`], [`metric`], [`Scrape`].
//! - The kernel's socket queues, in `kernel.rs`: [`kernel_sockets`], [`settled_send_queue`].
//! - Bursts of held requests: [`burst_pair`], [`hold_uploads`], [`rss_baseline`].
//! - Waits: [`within`] (any future, bounded), [`settled`] (a reading that stops moving),
//!   [`wait_blocked`] (a [`flooding_upstream`]'s connections stalled by the proxy).
//! - Small helpers: [`refused_addr`], [`HangingListener`] (a loopback address whose
//!   connects hang), access-log assertions and [`access_line`].
//!
//! Conventions: no fixed ports; waits are on events (a `watch` channel bumped at every
//! record or log change), never on sleeps; every wait has a bound.

#![allow(dead_code)]

mod kernel;
mod metrics;

// Not every test file reads the kernel's queues.
#[allow(unused_imports)]
pub use kernel::*;
pub use metrics::*;

use std::fmt::{Display, Write as _};
use std::future::Future;
use std::io::{self, BufRead, Read, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use serde_json::Value;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cutoff");

/// How long the proxy may take to print both `listening` lines.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The default bound for things that should take milliseconds: generous, so that a loaded
/// 2-core machine never fails a correct build, short enough that a broken one fails fast.
pub const WAIT: Duration = Duration::from_secs(5);

/// How soon after its cause (the client leaving, a timer firing, an answer that frees an
/// upload) the upstream or the client must see its effect. Propagation is event-driven and
/// takes milliseconds; the bound is generous for a loaded 2-core machine.
pub const PROPAGATION: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------------------------------
// Bounded waits
// ------------------------------------------------------------------------------------------

/// Awaits `fut` for at most `dur`, panicking with `what` if it takes longer.
pub async fn within<F: Future>(dur: Duration, what: impl Display, fut: F) -> F::Output {
    match tokio::time::timeout(dur, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {dur:?}: {what}"),
    }
}

/// Reads `read` every 100 ms until it stops moving: `times` readings in a row within
/// `tolerance` of the one before, and not zero (a queue still empty has not filled yet).
/// Bounded by twice [`WAIT`].
pub async fn settled(
    what: impl Display,
    tolerance: u64,
    times: u32,
    read: impl Fn() -> u64,
) -> u64 {
    within(WAIT * 2, format!("{what} to settle"), async {
        let mut last = read();
        let mut same = 0;
        while same < times {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = read();
            same = if now != 0 && now.abs_diff(last) <= tolerance {
                same + 1
            } else {
                0
            };
            last = now;
        }
        last
    })
    .await
}

/// A fresh, empty directory under the system temp dir, unique to this process and call.
pub fn unique_temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "cutoff-test-{tag}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ------------------------------------------------------------------------------------------
// Configs
// ------------------------------------------------------------------------------------------

/// `http://ADDR`, the URL of an upstream listening on `addr`.
pub fn http_url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// The head every test config starts with: `[server]` listening on `listen` plus
/// `server_extra` (TOML lines, or tables such as `[server.tls]`), `[admin]` on port 0, and
/// JSON logs at info. Upstream and route tables follow it.
pub fn config_head_on(listen: &str, server_extra: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"
{server_extra}

[admin]
listen = "127.0.0.1:0"

[log]
format = "json"
level = "info"
"#
    )
}

/// `config` with its logs at DEBUG instead of INFO (`lingering close ended`, say).
pub fn with_debug_logs(config: &str) -> String {
    let out = config.replacen("level = \"info\"", "level = \"debug\"", 1);
    assert_ne!(out, config, "the config has no `level = \"info\"` line");
    out
}

/// A connection that posts to `path` with a second `Host` line, announcing `announced`
/// body bytes and sending `sent` of them: cutoff answers 400 before the body, then shuts
/// its side down (the FIN, read here) and lingers. Returns the connection, still open.
pub async fn answered_before_its_body(
    addr: SocketAddr,
    path: &str,
    announced: usize,
    sent: usize,
) -> Client {
    let mut client = Client::connect(addr).await;
    let len = announced.to_string();
    client
        .send_head(
            "POST",
            path,
            &[("Host", "second.example"), ("Content-Length", &len)],
        )
        .await;
    client.send(&vec![b'b'; sent]).await;
    let head = client.try_read_head(WAIT).await;
    assert_eq!(head.map(|h| h.status).ok(), Some(400), "{path}");
    assert_eq!(
        client.wait_closed_by_peer(WAIT).await,
        ReadEnd::Eof,
        "{path}: the 400 was not followed by a FIN"
    );
    client
}

/// [`config_head_on`] with the proxy on port 0, as in almost every test.
pub fn config_head(server_extra: &str) -> String {
    config_head_on("127.0.0.1:0", server_extra)
}

/// A config with one upstream `up` and one route `r` on `/`: [`config_head`] with
/// `server_extra`, then `[upstreams.up]` with `upstream_lines` (its `url` or `urls` and
/// any extra keys), then the route with `route_extra` (TOML lines such as
/// `timeout = "300ms"`).
pub fn single_route_config(server_extra: &str, upstream_lines: &str, route_extra: &str) -> String {
    format!(
        r#"{head}
[upstreams.up]
{upstream_lines}

[[routes]]
name = "r"
path_prefix = "/"
upstream = "up"
{route_extra}
"#,
        head = config_head(server_extra)
    )
}

/// The typical test config: proxy and admin on port 0, JSON logs at info, one upstream `up`
/// at `upstream`, one route `r` with `path_prefix = "/"` plus `route_extra` (TOML lines
/// such as `timeout = "300ms"`).
pub fn config_for(upstream: SocketAddr, route_extra: &str) -> String {
    config_for_url(&http_url(upstream), "", route_extra)
}

/// Like [`config_for`], with extra lines for the `[server]` table instead (such as
/// `workers = 1`).
pub fn config_with_server(server_extra: &str, upstream: SocketAddr) -> String {
    single_route_config(
        server_extra,
        &format!("url = \"{}\"", http_url(upstream)),
        "",
    )
}

/// Like [`config_for`], with the upstream given by URL and extra lines for the upstream
/// table too (such as `connect_timeout = "200ms"`).
pub fn config_for_url(url: &str, upstream_extra: &str, route_extra: &str) -> String {
    single_route_config(
        "",
        &format!("url = \"{url}\"\n{upstream_extra}"),
        route_extra,
    )
}

/// Upstream lines for a test that opens a burst of upstream connections at once.
///
/// On a loaded machine the recording upstream can fall behind on accepting, and where the
/// kernel's accept queue is short (`net.core.somaxconn`) a burst overflows it: the kernel
/// drops the SYN and the proxy's connect is retried one second later, exactly the default
/// `connect_timeout`, so the call would end in a 504 that has nothing to do with the test.
/// Room for the SYN's retransmissions (at 1, 3 and 7 s) keeps such a test about what it
/// tests.
pub const BURST_CONNECT_TIMEOUT: &str = "connect_timeout = \"10s\"";

/// Like [`config_for_url`], with a pool: upstream `up` balances over `urls`.
pub fn pool_config(urls: &[String], upstream_extra: &str, route_extra: &str) -> String {
    let list = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    single_route_config(
        "",
        &format!("urls = [{list}]\n{upstream_extra}"),
        route_extra,
    )
}

// ------------------------------------------------------------------------------------------
// The proxy under test
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct Captured {
    /// Every stderr line, as printed.
    lines: Vec<String>,
    /// The lines that parsed as JSON objects, in order.
    json: Vec<Value>,
    /// stderr reached end of file (the process exited or closed it).
    closed: bool,
}

struct LogState {
    captured: Mutex<Captured>,
    changed: watch::Sender<u64>,
    /// Set while a test keeps the proxy's stderr unread (see [`Proxy::stall_log_pipe`]).
    reading: Mutex<Reading>,
    reading_changed: Condvar,
}

#[derive(Default)]
struct Reading {
    paused: bool,
    /// The reader thread is waiting for `paused` to clear, between two lines.
    parked: bool,
    /// The reader thread is gone (stderr closed).
    ended: bool,
    /// Newlines a stall wrote into the pipe, still to be skipped.
    filler: usize,
}

impl LogState {
    /// The reader thread, before each line: waits while reading is paused.
    fn before_line(&self) {
        let mut r = lock(&self.reading);
        while r.paused {
            r.parked = true;
            self.reading_changed.notify_all();
            r = self
                .reading_changed
                .wait(r)
                .unwrap_or_else(|e| e.into_inner());
        }
        r.parked = false;
    }

    /// Whether an empty line is a stall's filler (skipped), not the proxy's.
    fn is_filler(&self) -> bool {
        let mut r = lock(&self.reading);
        let filler = r.filler > 0;
        r.filler = r.filler.saturating_sub(1);
        filler
    }

    fn reader_ended(&self) {
        lock(&self.reading).ended = true;
        self.reading_changed.notify_all();
    }

    fn push(&self, line: String) {
        let json = serde_json::from_str::<Value>(&line)
            .ok()
            .filter(Value::is_object);
        {
            let mut c = lock(&self.captured);
            if let Some(v) = json {
                c.json.push(v);
            }
            c.lines.push(line);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn close(&self) {
        lock(&self.captured).closed = true;
        self.changed.send_modify(|n| *n += 1);
    }

    fn stderr(&self) -> String {
        lock(&self.captured).lines.join("\n")
    }

    /// Waits until `f` finds what it looks for in the captured output. Panics on timeout,
    /// or when stderr closed (the process exited) without `f` finding it.
    async fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Captured) -> Option<T>,
    ) -> T {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.mark_unchanged();
            {
                let c = lock(&self.captured);
                if let Some(v) = f(&c) {
                    return v;
                }
                if c.closed {
                    panic!(
                        "cutoff's stderr closed (it exited) while waiting for {what}; stderr:\n{}",
                        c.lines.join("\n")
                    );
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; cutoff's stderr so far:\n{}",
                    self.stderr()
                );
            }
        }
    }
}

/// The `cutoff` binary, running as a child process. Killed (SIGKILL) when dropped.
pub struct Proxy {
    child: tokio::process::Child,
    pid: i32,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    dir: PathBuf,
    config_path: PathBuf,
    logs: Arc<LogState>,
}

/// The proxy's stderr, full and unread, until dropped (see [`Proxy::stall_log_pipe`]).
pub struct LogStall {
    logs: Arc<LogState>,
}

impl Drop for LogStall {
    fn drop(&mut self) {
        lock(&self.logs.reading).paused = false;
        self.logs.reading_changed.notify_all();
    }
}

impl Proxy {
    /// Starts `cutoff --config PATH` with `config` written to a fresh temp dir, and waits
    /// (at most [`STARTUP_TIMEOUT`]) for its `listening` lines: the proxy's, and the
    /// admin's when the config has an `[admin]` table.
    pub async fn start(config: &str) -> Proxy {
        Self::start_with_args(config, &[]).await
    }

    /// Like [`Proxy::start`], with extra command-line arguments after `--config PATH`.
    pub async fn start_with_args(config: &str, args: &[&str]) -> Proxy {
        let dir = unique_temp_dir("proxy");
        let config_path = dir.join("proxy.toml");
        std::fs::write(&config_path, config).expect("write the config");
        Self::start_from(dir, config_path, args).await
    }

    /// Like [`Proxy::start`], with a config file the test laid out itself (behind a
    /// symlink, say) at `config_path`; the process runs in `dir`, removed on drop.
    pub async fn start_from(dir: PathBuf, config_path: PathBuf, args: &[&str]) -> Proxy {
        let config = std::fs::read_to_string(&config_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", config_path.display()));
        eprintln!(
            "[harness] starting {BIN} --config {}:\n{config}",
            config_path.display()
        );

        let mut child = tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .current_dir(&dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        let pid = child.id().expect("a running child has a pid") as i32;

        let (changed, _) = watch::channel(0);
        let logs = Arc::new(LogState {
            captured: Mutex::new(Captured::default()),
            changed,
            reading: Mutex::new(Reading::default()),
            reading_changed: Condvar::new(),
        });
        // A plain thread, so that stderr is drained (and the proxy never blocks on a full
        // pipe) whatever the test's runtime is doing.
        let stderr = child.stderr.take().expect("stderr is piped");
        let file = std::fs::File::from(stderr.into_owned_fd().expect("stderr fd"));
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut reader = io::BufReader::new(file);
            let mut buf = Vec::new();
            loop {
                sink.before_line();
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(1) if buf == b"\n" && sink.is_filler() => {}
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        eprintln!("[cutoff {pid}] {line}");
                        sink.push(line);
                    }
                }
            }
            sink.reader_ended();
            sink.close();
        });

        let want_admin = config.contains("[admin]");
        let (addr, admin_addr) = logs
            .wait_until(STARTUP_TIMEOUT, "the `listening` log lines", |c| {
                let find = |name: &str| -> Option<SocketAddr> {
                    c.json
                        .iter()
                        .find(|v| v["message"] == "listening" && v["listener"] == name)
                        .and_then(|v| v["addr"].as_str()?.parse().ok())
                };
                let admin = if want_admin {
                    Some(find("admin")?)
                } else {
                    None
                };
                Some((find("proxy")?, admin))
            })
            .await;

        Proxy {
            child,
            pid,
            addr,
            admin_addr,
            dir,
            config_path,
            logs,
        }
    }

    /// The proxy listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address (panics when the config had no `[admin]`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr.expect("the config has no [admin] listener")
    }

    /// `http://ADDR{path}` for the proxy listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Where the config was written, so that a reload test can rewrite it.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Stops reading the proxy's stderr and fills the pipe to it, so that the proxy's next
    /// write to stderr blocks: a log shipper that fell behind. Reading resumes when the
    /// returned value is dropped (the filler is skipped), and nothing the proxy wrote is
    /// lost.
    pub async fn stall_log_pipe(&self) -> LogStall {
        lock(&self.logs.reading).paused = true;
        // From here on, however this ends, reading resumes.
        let stall = LogStall {
            logs: self.logs.clone(),
        };
        // A second description of the same pipe, non-blocking without making the proxy's
        // own writes non-blocking.
        let path = format!("/proc/{}/fd/2", self.pid);
        let mut pipe = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        // Wakes the reader if it waits in `read`; it parks before its next line.
        lock(&self.logs.reading).filler += 1;
        pipe.write_all(b"\n").expect("write to the log pipe");
        let logs = self.logs.clone();
        let parked = tokio::task::spawn_blocking(move || {
            let r = lock(&logs.reading);
            let (r, _) = logs
                .reading_changed
                .wait_timeout_while(r, STARTUP_TIMEOUT, |r| !r.parked && !r.ended)
                .unwrap_or_else(|e| e.into_inner());
            r.parked
        })
        .await
        .expect("the parking wait");
        assert!(
            parked,
            "the log reader did not park (the proxy's stderr closed?)"
        );
        let filler = [b'\n'; 4096];
        for chunk in [&filler[..], &filler[..1]] {
            loop {
                match pipe.write(chunk) {
                    Ok(n) => lock(&self.logs.reading).filler += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("fill the log pipe: {e}"),
                }
            }
        }
        stall
    }

    /// Everything the proxy printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.logs.stderr()
    }

    /// All JSON log lines so far.
    pub fn logs(&self) -> Vec<Value> {
        lock(&self.logs.captured).json.clone()
    }

    /// The access-log lines so far (`"target":"cutoff::access"`).
    pub fn access_logs(&self) -> Vec<Value> {
        lock(&self.logs.captured)
            .json
            .iter()
            .filter(|v| is_access_log(v))
            .cloned()
            .collect()
    }

    /// Waits for the first access-log line matching `pred` (lines already printed count).
    pub async fn wait_for_access_log(
        &self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        self.logs
            .wait_until(timeout, "an access-log line matching the predicate", |c| {
                c.json.iter().find(|v| is_access_log(v) && pred(v)).cloned()
            })
            .await
    }

    /// Waits until at least `n` access-log lines match `pred`, and returns them.
    pub async fn wait_for_access_logs(
        &self,
        n: usize,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Vec<Value> {
        self.logs
            .wait_until(
                timeout,
                &format!("{n} access-log lines matching the predicate"),
                |c| {
                    let found: Vec<Value> = c
                        .json
                        .iter()
                        .filter(|v| is_access_log(v) && pred(v))
                        .cloned()
                        .collect();
                    (found.len() >= n).then_some(found)
                },
            )
            .await
    }

    /// Waits for the first JSON log line (of any target) matching `pred`.
    pub async fn wait_for_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        self.logs
            .wait_until(timeout, "a log line matching the predicate", |c| {
                c.json.iter().find(|v| pred(v)).cloned()
            })
            .await
    }

    /// Sends `sig` (such as `libc::SIGTERM`, `libc::SIGHUP`) to the proxy.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
        // not yet reaped while `self.child` has not been waited for.
        let rc = unsafe { libc::kill(self.pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid,
            io::Error::last_os_error()
        );
    }

    /// Waits for the proxy to exit and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let stderr = self.logs.clone();
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for cutoff"),
            Err(_) => panic!(
                "cutoff did not exit within {timeout:?}; stderr:\n{}",
                stderr.stderr()
            ),
        }
    }

    /// The proxy's resident set size in KiB (VmRSS in /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {path}:\n{status}"))
    }

    /// How many descriptors the proxy has open (/proc/PID/fd).
    pub fn open_fds(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid);
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {dir}: {e}"))
            .count()
    }

    /// How many open client connections each worker serves, most first, workers serving
    /// none left out. Read from the kernel: every client socket is in the hang-up set
    /// (registered for `EPOLLRDHUP | EPOLLONESHOT`) and in the epoll set of the worker
    /// whose runtime serves it (`/proc/PID/fdinfo` lists an epoll set's descriptors).
    pub fn client_connections_per_worker(&self) -> Vec<usize> {
        const EPOLLRDHUP: u32 = 0x2000;
        const EPOLLONESHOT: u32 = 1 << 30;
        let dir = format!("/proc/{}/fd", self.pid);
        let mut sets: Vec<Vec<(u32, u32)>> = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}")) {
            let fd = entry.expect("fd entry").file_name();
            let link = std::fs::read_link(format!("{dir}/{}", fd.to_string_lossy()));
            if !link.is_ok_and(|l| l.to_string_lossy().contains("eventpoll")) {
                continue;
            }
            let info = format!("/proc/{}/fdinfo/{}", self.pid, fd.to_string_lossy());
            let Ok(info) = std::fs::read_to_string(&info) else {
                continue;
            };
            // `tfd:       12 events:       19 data: ...`
            let mut set: Vec<(u32, u32)> = info
                .lines()
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next()? == "tfd:").then_some(())?;
                    let tfd = w.next()?.parse().ok()?;
                    (w.next()? == "events:").then_some(())?;
                    Some((tfd, u32::from_str_radix(w.next()?, 16).ok()?))
                })
                .collect();
            set.sort_unstable();
            // Two descriptors of one epoll set list the same.
            if !sets.contains(&set) {
                sets.push(set);
            }
        }
        let is_hangup = |set: &Vec<(u32, u32)>| {
            !set.is_empty()
                && set
                    .iter()
                    .all(|&(_, ev)| ev & (EPOLLRDHUP | EPOLLONESHOT) == EPOLLRDHUP | EPOLLONESHOT)
        };
        let clients: Vec<u32> = sets
            .iter()
            .filter(|s| is_hangup(s))
            .flat_map(|s| s.iter().map(|&(fd, _)| fd))
            .collect();
        let mut per_worker: Vec<usize> = sets
            .iter()
            .filter(|s| !is_hangup(s))
            .map(|s| s.iter().filter(|(fd, _)| clients.contains(fd)).count())
            .filter(|&n| n > 0)
            .collect();
        per_worker.sort_unstable_by(|a, b| b.cmp(a));
        per_worker
    }

    /// `GET /metrics` on the admin listener; panics unless it answers 200.
    pub async fn metrics_text(&self) -> String {
        let r = http_get(self.admin_addr(), "/metrics").await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        r.text()
    }

    /// Polls `GET /metrics` until the sample of `name` with `labels` satisfies `pred`;
    /// returns its value. Prometheus text has no change events, so this is the one wait
    /// that polls (every 25 ms), bounded by `timeout`.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics_text().await;
            let value = metric_value(&text, name, labels);
            if let Some(v) = value
                && pred(v)
            {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "after {timeout:?}, {name} {labels:?} is {value:?}, not as expected; /metrics:\n{text}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------------------------------------
// Polling waits on the proxy (for what has no change event to wait on)
// ------------------------------------------------------------------------------------------

/// Polls `cond` every 10 ms until it holds; panics after `timeout` with `what`.
pub async fn poll_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    within(timeout, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Waits until at least `n` JSON log lines match `pred`; returns them. The harness wakes
/// waiters of single lines only, so this counting wait polls the captured lines (every
/// 10 ms), bounded by `timeout`; `what` names the lines in the panic message.
pub async fn wait_log_count(
    proxy: &Proxy,
    n: usize,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let found: Vec<Value> = proxy.logs().into_iter().filter(|v| pred(v)).collect();
        if found.len() >= n {
            return found;
        }
        if Instant::now() >= deadline {
            panic!(
                "after {timeout:?}: {} of {n} log lines for {what}; stderr:\n{}",
                found.len(),
                proxy.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the proxy's signal handlers and config watch are surely installed: its
/// admin listener answered `GET /readyz` with 200. The main runtime spawns the signal and
/// reload tasks before the admin listener, and tasks of a current-thread runtime first run
/// in the order they were spawned, so once the admin answered they have been polled.
/// Without this, a signal sent right after the `listening` lines kills the process, and an
/// edit saved before that point is lost: see `sigterm_right_after_startup_drains_instead_of_killing`
/// (shutdown.rs) and `an_edit_saved_right_after_startup_is_not_lost` (reload.rs).
pub async fn wait_started(proxy: &Proxy) {
    let r = within(WAIT, "GET /readyz", http_get(proxy.admin_addr(), "/readyz")).await;
    assert_eq!(
        r.status,
        200,
        "/readyz before any signal or edit: {}",
        r.text()
    );
}

// ------------------------------------------------------------------------------------------
// Access-log helpers
// ------------------------------------------------------------------------------------------

pub fn is_access_log(v: &Value) -> bool {
    v["target"] == "cutoff::access"
}

/// The access log's `path`, without a query string if the proxy logged one.
pub fn log_path(v: &Value) -> &str {
    let p = v["path"].as_str().unwrap_or("");
    p.split('?').next().unwrap_or(p)
}

/// True when the access log's `path` (query ignored) is `path`.
pub fn log_path_is(v: &Value, path: &str) -> bool {
    is_access_log(v) && log_path(v) == path
}

/// Waits (at most [`WAIT`]) for the access-log line of the request for `path` (query
/// ignored).
pub async fn access_line(proxy: &Proxy, path: &str) -> Value {
    proxy
        .wait_for_access_log(|v| log_path_is(v, path), WAIT)
        .await
}

/// Checks an access-log line: status, outcome, `cancelled_by` (absent or null when
/// `None`), the level the outcome deserves, and the types of the other fields.
pub fn assert_access(v: &Value, status: u64, outcome: &str, cancelled_by: Option<&str>) {
    assert!(is_access_log(v), "not an access-log line: {v}");
    assert_eq!(v["message"], "access", "message: {v}");
    assert_eq!(v["status"].as_u64(), Some(status), "status: {v}");
    assert_eq!(v["outcome"].as_str(), Some(outcome), "outcome: {v}");
    match cancelled_by {
        Some(by) => assert_eq!(v["cancelled_by"].as_str(), Some(by), "cancelled_by: {v}"),
        None => assert!(
            v.get("cancelled_by").is_none_or(Value::is_null),
            "cancelled_by should be absent: {v}"
        ),
    }
    let level = match outcome {
        "ok" | "client_closed" | "no_route" => "INFO",
        _ => "WARN",
    };
    assert_eq!(v["level"].as_str(), Some(level), "level: {v}");
    assert!(v["route"].is_string(), "route is a string: {v}");
    assert!(v["method"].is_string(), "method is a string: {v}");
    assert!(v["path"].is_string(), "path is a string: {v}");
    assert!(v["duration_ms"].is_number(), "duration_ms is a number: {v}");
    assert!(v["bytes_out"].is_u64(), "bytes_out is an integer: {v}");
    assert!(v["protected"].is_boolean(), "protected is a bool: {v}");
    if let Some(u) = v.get("upstream_ms") {
        assert!(u.is_number() || u.is_null(), "upstream_ms is a number: {v}");
    }
}

// ------------------------------------------------------------------------------------------
// HTTP/1.1 body framing, shared by the upstream (request bodies) and the client (responses)
// ------------------------------------------------------------------------------------------

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    UntilEof,
}

impl Framing {
    /// The framing that `headers` announce; `default` when neither Transfer-Encoding nor
    /// Content-Length is present.
    pub fn from_headers(headers: &[(String, String)], default: Framing) -> Framing {
        let chunked = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        });
        if chunked {
            return Framing::Chunked;
        }
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .map_or(default, Framing::Length)
    }
}

/// An incremental body decoder: [`BodyDecoder::step`] takes bytes from the front of a
/// buffer and says whether it produced data, needs more input, or reached the end.
#[derive(Clone, Debug)]
pub struct BodyDecoder {
    state: Dec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dec {
    Length(u64),
    UntilEof,
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailer,
    Done,
}

/// What one [`BodyDecoder::step`] produced.
#[derive(Debug)]
pub enum Step {
    Data(Bytes),
    NeedMore,
    Done,
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> BodyDecoder {
        let state = match framing {
            Framing::Length(0) => Dec::Done,
            Framing::Length(n) => Dec::Length(n),
            Framing::Chunked => Dec::ChunkSize,
            Framing::UntilEof => Dec::UntilEof,
        };
        BodyDecoder { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == Dec::Done
    }

    /// The connection ended: true when that completes the body (only an until-EOF body).
    pub fn on_eof(&mut self) -> bool {
        if self.state == Dec::UntilEof {
            self.state = Dec::Done;
        }
        self.is_done()
    }

    /// Decodes from the front of `buf`, consuming what it used.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, String> {
        loop {
            match self.state {
                Dec::Done => return Ok(Step::Done),
                Dec::Length(n) | Dec::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (Dec::Length(_), 0) => Dec::Done,
                        (Dec::Length(_), l) => Dec::Length(l),
                        (_, 0) => Dec::ChunkDataEnd,
                        (_, l) => Dec::ChunkData(l),
                    };
                    return Ok(Step::Data(data));
                }
                Dec::UntilEof => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Dec::ChunkSize => {
                    let Some(pos) = find_crlf(buf) else {
                        if buf.len() > 4096 {
                            return Err("chunk-size line longer than 4 KiB".into());
                        }
                        return Ok(Step::NeedMore);
                    };
                    let line = String::from_utf8_lossy(&buf[..pos]).into_owned();
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|e| format!("bad chunk size {line:?}: {e}"))?;
                    buf.advance(pos + 2);
                    self.state = if size == 0 {
                        Dec::Trailer
                    } else {
                        Dec::ChunkData(size)
                    };
                }
                Dec::ChunkDataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(format!("chunk data not followed by CRLF: {:?}", &buf[..2]));
                    }
                    buf.advance(2);
                    self.state = Dec::ChunkSize;
                }
                Dec::Trailer => {
                    let Some(pos) = find_crlf(buf) else {
                        return Ok(Step::NeedMore);
                    };
                    buf.advance(pos + 2);
                    if pos == 0 {
                        self.state = Dec::Done;
                    }
                }
            }
        }
    }
}

/// Encodes `data` as one HTTP/1.1 chunk.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
    )
}

// ------------------------------------------------------------------------------------------
// The recording upstream
// ------------------------------------------------------------------------------------------

/// How the upstream learnt that the proxy closed the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseKind {
    /// An orderly close (FIN): read() returned 0 or the socket reported read-closed.
    Eof,
    /// A reset (RST): ECONNRESET, or the socket went to TCP state CLOSE.
    Reset,
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// Index in the upstream's log, from 0, in order of arrival.
    pub id: usize,
    /// Index of the connection it came on, from 0, in order of accept.
    pub conn: usize,
    pub method: String,
    /// The request target as sent, query included.
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// When its head was parsed.
    pub arrived: Instant,
    /// Request body bytes read so far.
    pub body_bytes: u64,
    /// The whole request body was read.
    pub body_complete: bool,
    /// The first sign that the proxy closed the connection before the response was
    /// finished, with when it was seen. The upstream stops working on the request then.
    pub closed: Option<(Instant, CloseKind)>,
    /// When the upstream wrote the last byte of its response.
    pub finished: Option<Instant>,
    /// A protocol error the upstream gave up on (a malformed head or chunk).
    pub error: Option<String>,
}

impl RequestRecord {
    /// The path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }

    /// A request header's value (first match, case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct UpShared {
    started: Instant,
    records: Mutex<Vec<RequestRecord>>,
    changed: watch::Sender<u64>,
    accepted: AtomicUsize,
}

impl UpShared {
    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn push(&self, mut rec: RequestRecord) -> usize {
        let id = {
            let mut records = lock(&self.records);
            rec.id = records.len();
            records.push(rec);
            records.len() - 1
        };
        self.notify();
        id
    }

    fn update(&self, id: usize, f: impl FnOnce(&mut RequestRecord)) {
        f(&mut lock(&self.records)[id]);
        self.notify();
    }

    fn summary(&self, records: &[RequestRecord]) -> String {
        let t = |i: Instant| {
            format!(
                "{:.3}s",
                i.saturating_duration_since(self.started).as_secs_f64()
            )
        };
        let mut out = String::new();
        let skip = records.len().saturating_sub(60);
        if skip > 0 {
            let _ = writeln!(out, "  ... {skip} earlier records");
        }
        for r in &records[skip..] {
            let _ = writeln!(
                out,
                "  #{} conn {} {} {} arrived {} body {}{} closed {:?} finished {:?}{}",
                r.id,
                r.conn,
                r.method,
                r.path,
                t(r.arrived),
                r.body_bytes,
                if r.body_complete { " (complete)" } else { "" },
                r.closed.map(|(i, k)| (t(i), k)),
                r.finished.map(t),
                r.error
                    .as_deref()
                    .map(|e| format!(" error {e}"))
                    .unwrap_or_default(),
            );
        }
        out
    }
}

/// FNV-1a's 64-bit offset basis: the hash of nothing.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 over `bytes`, from `hash` (start at [`FNV_OFFSET`]): the upstream's `/digest`,
/// for a test to tell a body that arrived byte for byte from one that only arrived whole.
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Bytes that never repeat a block (xorshift64), so that a chunk dropped, doubled or moved
/// changes their hash: what `/noise` sends and what a test checks it against.
pub struct Noise(u64);

impl Default for Noise {
    fn default() -> Noise {
        Noise(0x9e37_79b9_7f4a_7c15)
    }
}

impl Noise {
    /// Fills `out` with the next bytes. Every call but the last must fill a multiple of 8.
    pub fn fill(&mut self, out: &mut [u8]) {
        for word in out.chunks_mut(8) {
            let x = &mut self.0;
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }

    /// The first `len` bytes.
    pub fn bytes(len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        Noise::default().fill(&mut out);
        out
    }
}

/// A recording HTTP/1.1 upstream on 127.0.0.1, port chosen by the OS.
///
/// Behaviour by the first path segment (a test may add more segments as a tag, as in
/// `/delay/fin?ms=30000`), for any method:
///
/// | path | behaviour |
/// |---|---|
/// | `/delay?ms=N` | read the body, wait N ms, answer 200 `done` |
/// | `/stream?chunks=N&every=MS&size=B` | read the body, answer 200 chunked: N chunks of B bytes (default 10, 100, 16), the first at once, then one every MS ms; chunk i is B copies of `b'a' + i % 26` |
/// | `/big?bytes=N` | read the body, answer 200 with Content-Length N, `z` bytes written from one reused 64 KiB buffer |
/// | `/noise?bytes=N` | the same, with the first N bytes of [`Noise`] |
/// | `/echo` | stream the body back as it reads it, same length (Content-Length if the request had one, else chunked) |
/// | `/sink` | read and count the whole body, answer 200 with the count in decimal |
/// | `/digest` | read the whole body, answer 200 `LEN HASH`: its length and its FNV-1a 64 hash (see [`fnv1a`]) in hex |
/// | `/hold-body?ms=N` | leave the body unread for N ms, then read it and answer 200 with its length |
/// | anything else | read the body, answer 200 `ok` |
///
/// While it waits, holds a body or writes, it watches the socket: the first sign that the
/// proxy closed the connection (read-closed readiness, which EPOLLRDHUP gives even with
/// unread bytes queued; read() == 0; ECONNRESET) is recorded in `closed`, and the request
/// is abandoned (never `finished`). Connections are kept alive for further requests
/// unless the request said `Connection: close`.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<UpShared>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(UpShared {
            started: Instant::now(),
            records: Mutex::new(Vec::new()),
            changed,
            accepted: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Upstream { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// A snapshot of every request record.
    pub fn records(&self) -> Vec<RequestRecord> {
        lock(&self.shared.records).clone()
    }

    pub fn record(&self, id: usize) -> RequestRecord {
        lock(&self.shared.records)[id].clone()
    }

    /// The records whose path (query ignored) starts with `prefix`.
    pub fn records_for(&self, prefix: &str) -> Vec<RequestRecord> {
        lock(&self.shared.records)
            .iter()
            .filter(|r| r.path_only().starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Waits until a record whose path (without its query) is `path` satisfies `pred`;
    /// returns the first such record. Panics on timeout with `what` and the records.
    pub async fn wait_record(
        &self,
        path: &str,
        what: &str,
        pred: impl Fn(&RequestRecord) -> bool,
    ) -> RequestRecord {
        let is = |r: &RequestRecord| r.path_only() == path && pred(r);
        self.wait_for(what, WAIT, |rs| rs.iter().any(is))
            .await
            .into_iter()
            .find(is)
            .expect("the record the wait found")
    }

    /// Waits until `pred` holds over the records, woken at every change; returns the
    /// records it held over. Panics on timeout with `what` and the records.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[RequestRecord]) -> bool,
    ) -> Vec<RequestRecord> {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.mark_unchanged();
            {
                let records = lock(&self.shared.records);
                if pred(&records) {
                    return records.clone();
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let records = self.records();
                panic!(
                    "timed out after {timeout:?} waiting for the upstream to see {what}; \
                     {} connections accepted; records:\n{}",
                    self.connections_accepted(),
                    self.shared.summary(&records)
                );
            }
        }
    }

    /// Waits for the first request whose path (query ignored) starts with `prefix`.
    pub async fn wait_request(&self, prefix: &str, timeout: Duration) -> RequestRecord {
        let records = self
            .wait_for(&format!("a request for {prefix}"), timeout, |rs| {
                rs.iter().any(|r| r.path_only().starts_with(prefix))
            })
            .await;
        records
            .into_iter()
            .find(|r| r.path_only().starts_with(prefix))
            .expect("found above")
    }

    /// Waits until request `id` has seen its connection close; panics if it finished (or
    /// failed) instead.
    pub async fn wait_closed(&self, id: usize, timeout: Duration) -> RequestRecord {
        self.wait_for(&format!("request #{id} closed"), timeout, |rs| {
            let r = &rs[id];
            r.closed.is_some() || r.finished.is_some() || r.error.is_some()
        })
        .await;
        let r = self.record(id);
        assert!(
            r.closed.is_some() && r.finished.is_none(),
            "request #{id} was expected to be cut off by the proxy, but: {r:?}"
        );
        r
    }

    /// Waits until request `id` finished; panics if it was closed (or failed) instead.
    pub async fn wait_finished(&self, id: usize, timeout: Duration) -> RequestRecord {
        self.wait_for(&format!("request #{id} finished"), timeout, |rs| {
            let r = &rs[id];
            r.closed.is_some() || r.finished.is_some() || r.error.is_some()
        })
        .await;
        let r = self.record(id);
        assert!(
            r.finished.is_some() && r.error.is_none(),
            "request #{id} was expected to finish, but: {r:?}"
        );
        r
    }

    /// A readable account of every record, for assertion messages.
    pub fn summary(&self) -> String {
        self.shared.summary(&self.records())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet): aborting it ends them all.
        self.task.abort();
    }
}

/// Asserts that `rec` was closed by the proxy, not finished, and that the upstream saw the
/// close at most `bound` after `since` (the moment its cause happened).
pub fn assert_closed_promptly(rec: &RequestRecord, since: Instant, bound: Duration) {
    let Some((at, kind)) = rec.closed else {
        panic!("the upstream never saw request #{} closed: {rec:?}", rec.id);
    };
    assert!(
        rec.finished.is_none(),
        "request #{} finished: {rec:?}",
        rec.id
    );
    let lag = at.saturating_duration_since(since);
    assert!(
        lag <= bound,
        "the upstream saw request #{} closed ({kind:?}) {lag:?} after the cause; bound {bound:?}",
        rec.id
    );
}

async fn accept_loop(listener: TcpListener, shared: Arc<UpShared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = shared.accepted.fetch_add(1, Ordering::SeqCst);
                    shared.notify();
                    conns.spawn(serve_connection(stream, conn, shared.clone()));
                }
                Err(e) => {
                    // EMFILE and the like: back off briefly rather than spin.
                    eprintln!("[upstream] accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Why the upstream stopped working on a request.
enum Stop {
    Closed(CloseKind),
    Protocol(String),
}

struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    framing: Framing,
    close: bool,
}

struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    /// Bytes read from the socket and not yet consumed.
    buf: BytesMut,
    shared: Arc<UpShared>,
}

/// At most this much is read ahead (pipelined bytes) while the upstream watches the socket.
const WATCH_READ_AHEAD: usize = 1 << 20;

async fn serve_connection(stream: TcpStream, conn_id: usize, shared: Arc<UpShared>) {
    let (reader, writer) = stream.into_split();
    let mut conn = Conn {
        reader,
        writer,
        buf: BytesMut::with_capacity(64 * 1024),
        shared: shared.clone(),
    };
    loop {
        let head = match conn.read_head().await {
            Ok(Some(head)) => head,
            // Closed between requests, or mid-head: nothing to record.
            Ok(None) | Err(_) => return,
        };
        let id = shared.push(RequestRecord {
            id: 0,
            conn: conn_id,
            method: head.method.clone(),
            path: head.target.clone(),
            headers: head.headers.clone(),
            arrived: Instant::now(),
            body_bytes: 0,
            body_complete: false,
            closed: None,
            finished: None,
            error: None,
        });
        match conn.serve(id, &head).await {
            Ok(()) => {
                shared.update(id, |r| r.finished = Some(Instant::now()));
                if head.close {
                    let _ = conn.writer.shutdown().await;
                    return;
                }
            }
            Err(Stop::Closed(kind)) => {
                shared.update(id, |r| r.closed = Some((Instant::now(), kind)));
                return;
            }
            Err(Stop::Protocol(msg)) => {
                eprintln!("[upstream] request #{id}: {msg}");
                shared.update(id, |r| r.error = Some(msg));
                return;
            }
        }
    }
}

/// One non-blocking read(2) straight on the socket, bypassing tokio's readiness cache
/// (which may have been cleared while bytes were left unread on purpose).
fn direct_read(sock: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let mut tmp = [0u8; 64 * 1024];
    let sref = SockRef::from(sock);
    let n = (&*sref).read(&mut tmp)?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
}

/// The TCP state (`tcpi_state`, first byte of `struct tcp_info`), if it can be read.
fn tcp_state(sock: &TcpStream) -> Option<u8> {
    use std::os::fd::AsRawFd;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and outlives the call; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (rc == 0 && len > 0).then_some(info[0])
}

/// Classifies a connection whose read side is closed: RST or FIN.
fn close_kind(sock: &TcpStream) -> CloseKind {
    const TCP_CLOSE: u8 = 7;
    if let Ok(Some(e)) = SockRef::from(sock).take_error()
        && is_reset(&e)
    {
        return CloseKind::Reset;
    }
    if tcp_state(sock) == Some(TCP_CLOSE) {
        CloseKind::Reset
    } else {
        CloseKind::Eof
    }
}

fn error_kind(e: &io::Error) -> CloseKind {
    if is_reset(e) {
        CloseKind::Reset
    } else {
        CloseKind::Eof
    }
}

/// Returns when the peer closed the connection. With `read_ok`, bytes that arrive meanwhile
/// (pipelined requests) are read into `buf` (up to [`WATCH_READ_AHEAD`]); without it they
/// are left unread in the socket, and the readiness is cleared so that the next wake-up is
/// a new event (more bytes, or EPOLLRDHUP / EPOLLHUP).
async fn watch_close(reader: &OwnedReadHalf, buf: &mut BytesMut, read_ok: bool) -> CloseKind {
    let sock: &TcpStream = reader.as_ref();
    loop {
        let ready = match reader.ready(Interest::READABLE).await {
            Ok(ready) => ready,
            Err(e) => return error_kind(&e),
        };
        if ready.is_read_closed() {
            return close_kind(sock);
        }
        if read_ok && buf.len() < WATCH_READ_AHEAD {
            match sock.try_io(Interest::READABLE, || direct_read(sock, buf)) {
                Ok(0) => return close_kind(sock),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return error_kind(&e),
            }
        } else {
            let _ = sock.try_io(Interest::READABLE, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
        }
    }
}

fn query_u64(query: &str, key: &str, default: u64) -> u64 {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

impl Conn {
    /// Reads more bytes into `buf`. Err(Eof) on end of stream.
    async fn fill(&mut self) -> Result<(), CloseKind> {
        let sock: &TcpStream = self.reader.as_ref();
        loop {
            let r = match sock.try_io(Interest::READABLE, || direct_read(sock, &mut self.buf)) {
                // tokio believes there is nothing to read, but a hold may have cleared its
                // readiness with bytes still queued: look for ourselves.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => direct_read(sock, &mut self.buf),
                other => other,
            };
            match r {
                Ok(0) => return Err(CloseKind::Eof),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The queue is empty, so the next byte or FIN is a new readiness event.
                    self.reader.readable().await.map_err(|e| error_kind(&e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(error_kind(&e)),
            }
        }
    }

    async fn read_head(&mut self) -> Result<Option<Head>, Stop> {
        loop {
            if !self.buf.is_empty() {
                let parsed = {
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    let mut req = httparse::Request::new(&mut headers);
                    match req.parse(&self.buf) {
                        Ok(httparse::Status::Complete(len)) => {
                            let headers: Vec<(String, String)> = req
                                .headers
                                .iter()
                                .map(|h| {
                                    (
                                        h.name.to_string(),
                                        String::from_utf8_lossy(h.value).into_owned(),
                                    )
                                })
                                .collect();
                            let close = headers.iter().any(|(n, v)| {
                                n.eq_ignore_ascii_case("connection")
                                    && v.to_ascii_lowercase().contains("close")
                            });
                            Some((
                                Head {
                                    method: req.method.unwrap_or("").to_string(),
                                    target: req.path.unwrap_or("").to_string(),
                                    framing: Framing::from_headers(&headers, Framing::Length(0)),
                                    headers,
                                    close,
                                },
                                len,
                            ))
                        }
                        Ok(httparse::Status::Partial) => None,
                        Err(e) => return Err(Stop::Protocol(format!("bad request head: {e}"))),
                    }
                };
                if let Some((head, len)) = parsed {
                    self.buf.advance(len);
                    return Ok(Some(head));
                }
                if self.buf.len() > 64 * 1024 {
                    return Err(Stop::Protocol("request head over 64 KiB".into()));
                }
            }
            match self.fill().await {
                Ok(()) => {}
                Err(CloseKind::Eof) if self.buf.is_empty() => return Ok(None),
                Err(kind) => return Err(Stop::Closed(kind)),
            }
        }
    }

    async fn body_piece(&mut self, dec: &mut BodyDecoder) -> Result<Option<Bytes>, Stop> {
        loop {
            match dec.step(&mut self.buf).map_err(Stop::Protocol)? {
                Step::Data(b) => return Ok(Some(b)),
                Step::Done => return Ok(None),
                Step::NeedMore => self.fill().await.map_err(Stop::Closed)?,
            }
        }
    }

    fn count_body(&self, id: usize, n: usize) {
        self.shared.update(id, |r| r.body_bytes += n as u64);
    }

    fn body_complete(&self, id: usize) {
        self.shared.update(id, |r| r.body_complete = true);
    }

    /// Reads and counts the whole request body.
    async fn drain_body(&mut self, id: usize, dec: &mut BodyDecoder) -> Result<u64, Stop> {
        self.drain_body_each(id, dec, |_| {}).await
    }

    /// Reads the whole body, counting it and handing each piece to `each`; its length.
    async fn drain_body_each(
        &mut self,
        id: usize,
        dec: &mut BodyDecoder,
        mut each: impl FnMut(&[u8]),
    ) -> Result<u64, Stop> {
        let mut total = 0u64;
        while let Some(piece) = self.body_piece(dec).await? {
            total += piece.len() as u64;
            self.count_body(id, piece.len());
            each(&piece);
        }
        self.body_complete(id);
        Ok(total)
    }

    /// Waits `dur` while watching for the proxy closing the connection.
    async fn pause(&mut self, dur: Duration, read_ok: bool) -> Result<(), Stop> {
        let Conn { reader, buf, .. } = self;
        tokio::select! {
            _ = tokio::time::sleep(dur) => Ok(()),
            kind = watch_close(reader, buf, read_ok) => Err(Stop::Closed(kind)),
        }
    }

    /// Writes `data` while watching for the proxy closing the connection.
    async fn send(&mut self, data: &[u8]) -> Result<(), Stop> {
        let Conn {
            reader,
            writer,
            buf,
            ..
        } = self;
        tokio::select! {
            r = writer.write_all(data) => r.map_err(|e| Stop::Closed(error_kind(&e))),
            kind = watch_close(reader, buf, true) => Err(Stop::Closed(kind)),
        }
    }

    async fn respond(&mut self, body: &[u8]) -> Result<(), Stop> {
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        self.send(&out).await
    }

    async fn serve(&mut self, id: usize, head: &Head) -> Result<(), Stop> {
        let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
        let kind = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let q = |key: &str, default: u64| query_u64(query, key, default);
        let mut dec = BodyDecoder::new(head.framing);
        match kind {
            "delay" => {
                self.drain_body(id, &mut dec).await?;
                self.pause(Duration::from_millis(q("ms", 0)), true).await?;
                self.respond(b"done").await
            }
            "stream" => {
                self.drain_body(id, &mut dec).await?;
                let (chunks, every, size) =
                    (q("chunks", 10), q("every", 100), q("size", 16).max(1));
                self.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await?;
                for i in 0..chunks {
                    if i > 0 {
                        self.pause(Duration::from_millis(every), true).await?;
                    }
                    let fill = b'a' + (i % 26) as u8;
                    self.send(&chunk(&vec![fill; size as usize])).await?;
                }
                self.send(b"0\r\n\r\n").await
            }
            "big" | "noise" => {
                self.drain_body(id, &mut dec).await?;
                let total = q("bytes", 0);
                self.send(
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n")
                        .as_bytes(),
                )
                .await?;
                let mut block = vec![b'z'; 64 * 1024];
                let mut noise = (kind == "noise").then(Noise::default);
                let mut left = total;
                while left > 0 {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(block.len());
                    if let Some(noise) = noise.as_mut() {
                        noise.fill(&mut block[..n]);
                    }
                    self.send(&block[..n]).await?;
                    left -= n as u64;
                }
                Ok(())
            }
            "echo" => {
                match head.framing {
                    Framing::Length(n) => {
                        self.send(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
                        )
                        .await?;
                        while let Some(piece) = self.body_piece(&mut dec).await? {
                            self.count_body(id, piece.len());
                            self.send(&piece).await?;
                        }
                    }
                    _ => {
                        self.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                            .await?;
                        while let Some(piece) = self.body_piece(&mut dec).await? {
                            self.count_body(id, piece.len());
                            self.send(&chunk(&piece)).await?;
                        }
                        self.send(b"0\r\n\r\n").await?;
                    }
                }
                self.body_complete(id);
                Ok(())
            }
            "sink" => {
                let n = self.drain_body(id, &mut dec).await?;
                self.respond(n.to_string().as_bytes()).await
            }
            "digest" => {
                let mut hash = FNV_OFFSET;
                let n = self
                    .drain_body_each(id, &mut dec, |piece| hash = fnv1a(hash, piece))
                    .await?;
                self.respond(format!("{n} {hash:016x}").as_bytes()).await
            }
            // Answers before reading the body, then reads and drops it, as nginx's
            // `return` does: an upstream that needs none of the upload.
            "early" => {
                self.respond(b"early").await?;
                self.drain_body(id, &mut dec).await?;
                Ok(())
            }
            "hold-body" => {
                self.pause(Duration::from_millis(q("ms", 0)), false).await?;
                let n = self.drain_body(id, &mut dec).await?;
                self.respond(n.to_string().as_bytes()).await
            }
            _ => {
                self.drain_body(id, &mut dec).await?;
                self.respond(b"ok").await
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The raw client
// ------------------------------------------------------------------------------------------

/// How a read on the client ended, when it did not produce what was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadEnd {
    Eof,
    Reset,
    TimedOut,
}

/// A response status line and headers.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn framing(&self) -> Framing {
        if self.status == 204 || self.status == 304 || self.status < 200 {
            return Framing::Length(0);
        }
        Framing::from_headers(&self.headers, Framing::UntilEof)
    }
}

/// A whole response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads from `io` until `pending` holds a whole head, up to its blank line, and takes
/// that head out of it (what follows stays, for the next one); None if the peer closed or
/// failed first. For the raw peers of tests: an upstream reading a request, a client
/// reading a response.
pub async fn read_raw_head<R: AsyncRead + Unpin>(
    io: &mut R,
    pending: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(pending.drain(..i + 4).collect());
        }
        match io.read(&mut chunk).await {
            Ok(n) if n > 0 => pending.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// An upstream that sends an endless body (a 1 TiB `Content-Length`, in 64 KiB writes
/// as fast as its socket takes them), counting the connections whose writes blocked:
/// the proxy stopped reading from them.
pub async fn flooding_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("upstream address");
    let blocked = Arc::new(AtomicUsize::new(0));
    let counted = blocked.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let blocked = counted.clone();
            tokio::spawn(async move {
                if read_raw_head(&mut s, &mut Vec::new()).await.is_none() {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                let block = vec![b'f'; 64 * 1024];
                let mut counted_once = false;
                loop {
                    match s.try_write(&block) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if !counted_once {
                                counted_once = true;
                                blocked.fetch_add(1, Ordering::SeqCst);
                            }
                            if s.writable().await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    (addr, blocked)
}

/// Waits until `n` connections of a [`flooding_upstream`] have blocked: the proxy stopped
/// reading from them.
pub async fn wait_blocked(blocked: &AtomicUsize, n: usize) {
    within(
        WAIT * 2,
        format!("{n} upstream connections' writes to block"),
        async {
            while blocked.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
}

/// An upstream, and a proxy in front of it for bursts of held requests: the route has no
/// timeout, and its connects wait up to 10 s.
pub async fn burst_pair() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let config = config_for_url(
        &http_url(up.addr()),
        BURST_CONNECT_TIMEOUT,
        r#"timeout = "off""#,
    );
    let proxy = Proxy::start(&config).await;
    (up, proxy)
}

/// Warms the proxy up (one exchange through the route) and returns its RSS then.
pub async fn rss_baseline(proxy: &Proxy) -> u64 {
    let resp = http_get(proxy.addr(), "/warmup").await;
    assert_eq!(resp.status, 200);
    proxy.rss_kib()
}

/// Sends `n` uploads of `sent` bytes through `proxy` to `/sink/{tag}-{i}`, each one byte
/// short of its `Content-Length`, and waits until `up` has read all of them: `n` requests
/// held, each with its upload in flight. Dropping the clients lets them go.
pub async fn hold_uploads(
    proxy: &Proxy,
    up: &Upstream,
    tag: &str,
    n: usize,
    sent: usize,
) -> Vec<Client> {
    let body = vec![b'u'; sent];
    let declared = (sent + 1).to_string();
    let prefix = format!("/sink/{tag}-");
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = Client::connect(proxy.addr()).await;
        c.send_head(
            "POST",
            &format!("{prefix}{i}"),
            &[("Content-Length", &declared)],
        )
        .await;
        c.send(&body).await;
        clients.push(c);
    }
    up.wait_for("every upload but its last byte", WAIT * 2, |records| {
        records
            .iter()
            .filter(|r| r.path.starts_with(&prefix) && r.body_bytes == sent as u64)
            .count()
            == n
    })
    .await;
    clients
}

/// A connection to `addr` whose receive buffer is 4 KiB: a client that reads nothing
/// takes little of what it is sent into the kernel, so what is held for it shows in the
/// proxy.
pub async fn connect_small_receiver(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    within(WAIT, format!("connect to {addr}"), socket.connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A raw HTTP/1.1 client connection.
pub struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = within(WAIT, format!("connect to {addr}"), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        Client {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// A client on a stream already connected (say by [`connect_small_receiver`]).
    pub fn over(stream: TcpStream) -> Client {
        Client {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes all of `data` (bounded: 30 s).
    pub async fn send(&mut self, data: &[u8]) {
        within(
            Duration::from_secs(30),
            format!("writing {} bytes", data.len()),
            self.stream.write_all(data),
        )
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    }

    /// Writes a request head: `METHOD PATH HTTP/1.1`, `Host`, then `headers`.
    pub async fn send_head(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: cutoff-test\r\n");
        for (n, v) in headers {
            let _ = write!(head, "{n}: {v}\r\n");
        }
        head.push_str("\r\n");
        self.send(head.as_bytes()).await;
    }

    /// Writes `GET path` (keep-alive).
    pub async fn get(&mut self, path: &str) {
        self.send_head("GET", path, &[]).await;
    }

    /// Writes up to `max` bytes of `fill` bytes, stopping when one write makes no progress
    /// for `stall` (the pipe behind the socket is full). Returns the bytes written.
    pub async fn write_until_stalled(&mut self, max: u64, stall: Duration) -> u64 {
        let block = vec![b'u'; 64 * 1024];
        let mut written = 0u64;
        while written < max {
            let n = usize::try_from(max - written)
                .unwrap_or(usize::MAX)
                .min(block.len());
            // write() (unlike write_all) writes nothing when its future is dropped.
            match tokio::time::timeout(stall, self.stream.write(&block[..n])).await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => written += n as u64,
                Ok(Err(e)) => panic!("write after {written} bytes: {e}"),
            }
        }
        written
    }

    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<(), ReadEnd> {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Err(_) => Err(ReadEnd::TimedOut),
            Ok(Ok(0)) => Err(ReadEnd::Eof),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_reset(&e) => Err(ReadEnd::Reset),
            Ok(Err(_)) => Err(ReadEnd::Eof),
        }
    }

    /// Reads a response head, or says how the connection ended first.
    pub async fn try_read_head(&mut self, timeout: Duration) -> Result<ResponseHead, ReadEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.buf.is_empty() {
                let parsed = {
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    let mut resp = httparse::Response::new(&mut headers);
                    match resp.parse(&self.buf) {
                        Ok(httparse::Status::Complete(len)) => Some((
                            ResponseHead {
                                status: resp.code.unwrap_or(0),
                                headers: resp
                                    .headers
                                    .iter()
                                    .map(|h| {
                                        (
                                            h.name.to_string(),
                                            String::from_utf8_lossy(h.value).into_owned(),
                                        )
                                    })
                                    .collect(),
                            },
                            len,
                        )),
                        Ok(httparse::Status::Partial) => None,
                        Err(e) => panic!(
                            "malformed response head ({e}): {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    }
                };
                if let Some((head, len)) = parsed {
                    self.buf.advance(len);
                    return Ok(head);
                }
            }
            self.fill(deadline).await?;
        }
    }

    /// Reads a response head; panics if the connection ends first or `timeout` passes.
    pub async fn read_head(&mut self, timeout: Duration) -> ResponseHead {
        self.try_read_head(timeout)
            .await
            .unwrap_or_else(|end| panic!("no response head within {timeout:?}: {end:?}"))
    }

    /// Reads the whole body like a slow reader: a pause of `pause` after every `every`
    /// bytes. `Ok((total, its FNV-1a digest))`, or `Err((how it ended, bytes read))` if it
    /// was cut short.
    pub async fn read_body_pausing(
        &mut self,
        dec: &mut BodyDecoder,
        every: usize,
        pause: Duration,
    ) -> Result<(usize, u64), (ReadEnd, usize)> {
        let mut got = 0usize;
        let mut digest = FNV_OFFSET;
        let mut pause_at = every;
        loop {
            match self.next_piece(dec, WAIT).await {
                Ok(Some(b)) => {
                    got += b.len();
                    digest = fnv1a(digest, &b);
                }
                Ok(None) => return Ok((got, digest)),
                Err(end) => return Err((end, got)),
            }
            if got >= pause_at {
                tokio::time::sleep(pause).await;
                pause_at += every;
            }
        }
    }

    /// Reads the body on and asserts that it is cut short: the connection closed or reset
    /// before the body's end (never complete, never a `timeout` of silence).
    pub async fn assert_body_cut_short(
        &mut self,
        dec: &mut BodyDecoder,
        timeout: Duration,
        why: &str,
    ) {
        let end = loop {
            match self.next_piece(dec, timeout).await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert!(
            matches!(end, Err(ReadEnd::Eof | ReadEnd::Reset)),
            "the body should have been cut short by {why}, got {end:?}"
        );
    }

    /// The next piece of body: `Ok(Some)` data, `Ok(None)` the body is complete, `Err` the
    /// connection ended (or `timeout` passed) before it was.
    pub async fn next_piece(
        &mut self,
        dec: &mut BodyDecoder,
        timeout: Duration,
    ) -> Result<Option<Bytes>, ReadEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match dec.step(&mut self.buf) {
                Ok(Step::Data(b)) => return Ok(Some(b)),
                Ok(Step::Done) => return Ok(None),
                Ok(Step::NeedMore) => {}
                Err(e) => panic!("malformed response body: {e}"),
            }
            match self.fill(deadline).await {
                Ok(()) => {}
                Err(ReadEnd::Eof) if dec.on_eof() => return Ok(None),
                Err(end) => return Err(end),
            }
        }
    }

    /// Reads the body of the response `head` until it is complete or the connection ends:
    /// the bytes, and `Err` with how it ended if it was cut short.
    pub async fn read_body_until_end(
        &mut self,
        head: &ResponseHead,
        timeout: Duration,
    ) -> (Vec<u8>, Result<(), ReadEnd>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut dec = BodyDecoder::new(head.framing());
        let mut body = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_piece(&mut dec, left).await {
                Ok(Some(b)) => body.extend_from_slice(&b),
                Ok(None) => return (body, Ok(())),
                Err(end) => return (body, Err(end)),
            }
        }
    }

    /// Reads the whole body of the response `head`; panics if it is cut short.
    pub async fn read_body(&mut self, head: &ResponseHead, timeout: Duration) -> Vec<u8> {
        let (body, end) = self.read_body_until_end(head, timeout).await;
        if let Err(end) = end {
            panic!(
                "response body cut short ({end:?}) after {} bytes: {:?}",
                body.len(),
                String::from_utf8_lossy(&body)
            );
        }
        body
    }

    /// Reads a whole response.
    pub async fn read_response(&mut self, timeout: Duration) -> Response {
        let deadline = tokio::time::Instant::now() + timeout;
        let head = self.read_head(timeout).await;
        let body = self
            .read_body(
                &head,
                deadline.saturating_duration_since(tokio::time::Instant::now()),
            )
            .await;
        Response {
            status: head.status,
            headers: head.headers,
            body,
        }
    }

    /// Waits until the peer closes the connection, discarding anything it sends.
    pub async fn wait_closed_by_peer(&mut self, timeout: Duration) -> ReadEnd {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.buf.clear();
            if let Err(end) = self.fill(deadline).await {
                return end;
            }
        }
    }

    /// Leaves with a FIN: shuts down the write side, then drops the socket.
    pub async fn close_fin(mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Leaves with a RST: SO_LINGER 0, then drops the socket.
    pub fn close_rst(self) {
        SockRef::from(&self.stream)
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
    }
}

/// `GET path` on a fresh connection with `Connection: close`; the whole response (10 s).
pub async fn http_get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"").await
}

/// One request on a fresh connection with `Connection: close`; the whole response (10 s).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut c = Client::connect(addr).await;
    let len = body.len().to_string();
    let mut all: Vec<(&str, &str)> = vec![("Connection", "close")];
    if !body.is_empty() || method == "POST" || method == "PUT" {
        all.push(("Content-Length", &len));
    }
    all.extend_from_slice(headers);
    c.send_head(method, path, &all).await;
    if !body.is_empty() {
        c.send(body).await;
    }
    c.read_response(Duration::from_secs(10)).await
}

// ------------------------------------------------------------------------------------------
// Upstreams that fail
// ------------------------------------------------------------------------------------------

/// A loopback address where nothing listens, so connects are refused. The port stays
/// bound (never listening) for the life of the test process: a port merely released could
/// be taken by another test's listener running in parallel.
pub fn refused_addr() -> SocketAddr {
    let port = RefusedPort::reserve();
    let addr = port.addr;
    std::mem::forget(port.socket);
    addr
}

/// A port bound but not listening (connects are refused) until [`RefusedPort::release`],
/// for a test that later brings something up on it.
pub struct RefusedPort {
    pub addr: SocketAddr,
    socket: socket2::Socket,
}

impl RefusedPort {
    pub fn reserve() -> RefusedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let addr = socket
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("an IP address");
        RefusedPort { addr, socket }
    }

    /// Frees the port, to be bound at once by the caller.
    pub fn release(self) -> SocketAddr {
        drop(self.socket);
        self.addr
    }
}

/// A loopback listener whose connects hang: `listen(0)`, never accepted, its accept queue
/// filled by a connection of our own, so that the kernel drops further SYNs (Linux with
/// `tcp_abort_on_overflow = 0`, the default) and a connect waits for SYN retransmissions.
pub struct HangingListener {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
}

impl HangingListener {
    pub async fn start() -> HangingListener {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        let bind: SocketAddr = "127.0.0.1:0".parse().expect("address");
        sock.bind(&bind.into()).expect("bind");
        sock.listen(0).expect("listen(0)");
        let addr = sock
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("an inet address");
        let mut fillers = Vec::new();
        for _ in 0..8 {
            // A loopback connect completes in microseconds, or not until the SYN is
            // retransmitted (1 s later) when the queue is full: 1 s tells them apart.
            match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("filler connect to {addr}: {e}"),
                Err(_) => {
                    return HangingListener {
                        addr,
                        _listener: sock,
                        _fillers: fillers,
                    };
                }
            }
        }
        panic!(
            "{} connects to a listen(0) socket all completed: this kernel does not let a \
             full backlog make connects hang",
            fillers.len()
        );
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
