//! `cutoff check --config PATH` on bad configs: each must exit non-zero and print
//! `PATH:LINE:COL:` pointing at the offending line, naming the key. And on a valid config
//! (the shape of the shipped example) it exits 0 and prints the route table.
//!
//! Each fixture marks the line the error must point at with a trailing `# <- here`
//! comment, so the expected line number is computed, never counted by hand. For a missing
//! required key the error points at the header of the table that lacks it.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{BIN, unique_temp_dir};

const MARK: &str = "# <- here";

/// Runs `cutoff check --config PATH`, bounded by 10 s (a `check` that starts serving
/// instead of returning must fail, not hang).
fn run_check(path: &Path) -> Output {
    let child = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(out) => out.expect("wait for cutoff check"),
        Err(_) => {
            // SAFETY: kill(2) has no memory-safety preconditions; the child is not yet
            // reaped (its waiter has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("`cutoff check` did not exit within 10 s");
        }
    }
}

/// Writes `text`, runs `check`, and asserts the failure names `PATH:LINE:COL:` at the
/// marked line and mentions `key`.
fn assert_rejected(name: &str, text: &str, key: &str) {
    let line = text
        .lines()
        .position(|l| l.contains(MARK))
        .unwrap_or_else(|| panic!("fixture {name} has no `{MARK}` marker"))
        + 1;
    let dir = unique_temp_dir("check");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write fixture");
    let out = run_check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    let context = format!(
        "fixture {name} (error expected at line {line}, naming `{key}`):\n{text}\n\
         --- exit: {:?}\n--- stderr:\n{stderr}\n--- stdout:\n{stdout}",
        out.status
    );

    assert!(
        !out.status.success(),
        "`check` accepted a bad config; {context}"
    );

    // Every `PATH:LINE:COL:` in stderr; one of them must be the marked line.
    let prefix = format!("{}:", path.display());
    let locations: Vec<(usize, usize)> = stderr
        .match_indices(&prefix)
        .filter_map(|(i, _)| {
            let rest = &stderr[i + prefix.len()..];
            let mut parts = rest.splitn(3, ':');
            let l = parts.next()?.parse().ok()?;
            let c = parts.next()?.parse().ok()?;
            parts.next()?;
            Some((l, c))
        })
        .collect();
    assert!(
        !locations.is_empty(),
        "no `PATH:LINE:COL:` location in stderr; {context}"
    );
    assert!(
        locations.iter().any(|&(l, c)| l == line && c >= 1),
        "located at {locations:?}, not at line {line}; {context}"
    );
    assert!(
        stderr.contains(key),
        "stderr does not name `{key}`; {context}"
    );
}

/// Writes `text`, runs `check`, asserts that it was accepted, and returns its stdout.
fn assert_accepted(what: &str, text: &str) -> String {
    let dir = unique_temp_dir("check-ok");
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).expect("write config");
    let out = run_check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "`check` rejected {what}: {:?}\n{text}\n--- stderr:\n{stderr}\n--- stdout:\n{stdout}",
        out.status
    );
    stdout
}

const HEAD: &str = r#"# a cutoff test config
[server]
listen = "127.0.0.1:0"

[upstreams.news]
url = "http://127.0.0.1:9000"
"#;

const ROUTE: &str = r#"
[[routes]]
name = "headlines"
path_prefix = "/news"
upstream = "news"
"#;

/// A config made of the common parts with `route_extra` appended to the route.
fn with_route_line(route_extra: &str) -> String {
    format!("{HEAD}{ROUTE}{route_extra}\n")
}

#[test]
fn unknown_top_level_key() {
    // Top-level keys come before the first table header.
    let text = HEAD.replacen(
        "[server]\n",
        &format!("colour = \"blue\" {MARK}\n\n[server]\n"),
        1,
    ) + ROUTE;
    assert_rejected("unknown_top_level_key", &text, "colour");
}

#[test]
fn unknown_key_in_server() {
    let text = HEAD.replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\nlisten_port = 8080 {MARK}\n"),
    ) + ROUTE;
    assert_rejected("unknown_key_in_server", &text, "listen_port");
}

#[test]
fn unknown_key_in_route() {
    let text = with_route_line(&format!("retries = 3 {MARK}"));
    assert_rejected("unknown_key_in_route", &text, "retries");
}

#[test]
fn unknown_key_in_upstream() {
    let text = HEAD.replace(
        "url = \"http://127.0.0.1:9000\"\n",
        &format!("url = \"http://127.0.0.1:9000\"\npool_size = 4 {MARK}\n"),
    ) + ROUTE;
    assert_rejected("unknown_key_in_upstream", &text, "pool_size");
}

#[test]
fn route_naming_a_missing_upstream() {
    let text = format!(
        "{HEAD}\n[[routes]]\nname = \"headlines\"\npath_prefix = \"/news\"\nupstream = \"nowhere\" {MARK}\n"
    );
    assert_rejected("route_naming_a_missing_upstream", &text, "upstream");
}

#[test]
fn duplicate_route_names() {
    let text = format!(
        "{HEAD}{ROUTE}\n[[routes]]\nname = \"headlines\" {MARK}\npath_prefix = \"/other\"\nupstream = \"news\"\n"
    );
    assert_rejected("duplicate_route_names", &text, "name");
}

#[test]
fn bad_route_timeout() {
    let text = with_route_line(&format!("timeout = \"soon\" {MARK}"));
    assert_rejected("bad_route_timeout", &text, "timeout");
}

#[test]
fn bad_idle_timeout() {
    let text = with_route_line(&format!("idle_timeout = \"10 parsecs\" {MARK}"));
    assert_rejected("bad_idle_timeout", &text, "idle_timeout");
}

#[test]
fn bad_connect_timeout() {
    let text = HEAD.replace(
        "url = \"http://127.0.0.1:9000\"\n",
        &format!("url = \"http://127.0.0.1:9000\"\nconnect_timeout = \"quickly\" {MARK}\n"),
    ) + ROUTE;
    assert_rejected("bad_connect_timeout", &text, "connect_timeout");
}

#[test]
fn bad_shutdown_grace_type() {
    let text = HEAD.replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\nshutdown_grace = 10 {MARK}\n"),
    ) + ROUTE;
    assert_rejected("bad_shutdown_grace_type", &text, "shutdown_grace");
}

#[test]
fn bad_listen_address() {
    let text = HEAD.replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:99999\" {MARK}\n"),
    ) + ROUTE;
    assert_rejected("bad_listen_address", &text, "listen");
}

#[test]
fn bad_admin_listen_address() {
    let text = format!("{HEAD}\n[admin]\nlisten = \"not an address\" {MARK}\n{ROUTE}");
    assert_rejected("bad_admin_listen_address", &text, "listen");
}

#[test]
fn upstream_url_with_ftp_scheme() {
    let text = HEAD.replace(
        "url = \"http://127.0.0.1:9000\"\n",
        &format!("url = \"ftp://127.0.0.1:21\" {MARK}\n"),
    ) + ROUTE;
    assert_rejected("upstream_url_with_ftp_scheme", &text, "url");
}

#[test]
fn upstream_url_garbage() {
    let text = HEAD.replace(
        "url = \"http://127.0.0.1:9000\"\n",
        &format!("url = \"::not a url::\" {MARK}\n"),
    ) + ROUTE;
    assert_rejected("upstream_url_garbage", &text, "url");
}

#[test]
fn missing_server_listen() {
    let text = HEAD.replace(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[server] {MARK}\nshutdown_grace = \"5s\"\n"),
    ) + ROUTE;
    assert_rejected("missing_server_listen", &text, "listen");
}

#[test]
fn bad_on_client_disconnect() {
    let text = with_route_line(&format!("on_client_disconnect = \"abort\" {MARK}"));
    assert_rejected("bad_on_client_disconnect", &text, "on_client_disconnect");
}

#[test]
fn bad_methods_entry() {
    let text = with_route_line(&format!("methods = [\"GET\", \"NOT A METHOD\"] {MARK}"));
    assert_rejected("bad_methods_entry", &text, "methods");
}

#[test]
fn path_prefix_without_leading_slash() {
    let text = format!(
        "{HEAD}\n[[routes]]\nname = \"headlines\"\npath_prefix = \"news\" {MARK}\nupstream = \"news\"\n"
    );
    assert_rejected("path_prefix_without_leading_slash", &text, "path_prefix");
}

#[test]
fn bad_log_format() {
    let text = format!("{HEAD}\n[log]\nformat = \"xml\" {MARK}\n{ROUTE}");
    assert_rejected("bad_log_format", &text, "format");
}

/// `HEAD` with `line` added to the `[server]` table.
fn with_server_line(line: &str) -> String {
    HEAD.replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!("listen = \"127.0.0.1:0\"\n{line} {MARK}\n"),
    ) + ROUTE
}

/// `HEAD` with `line` added to the upstream's table.
fn with_upstream_line(line: &str) -> String {
    HEAD.replace(
        "url = \"http://127.0.0.1:9000\"\n",
        &format!("url = \"http://127.0.0.1:9000\"\n{line} {MARK}\n"),
    ) + ROUTE
}

/// Values that parse but that no setup means, and that used to be taken and then panic
/// once serving: a deadline past the end of the clock, a semaphore beyond tokio's limit.
/// Each is refused by `check`, at its line.
#[test]
fn out_of_range_values() {
    let cases = [
        (
            "huge_route_timeout",
            with_route_line(&format!("timeout = \"18446744073709551615s\" {MARK}")),
            "timeout",
        ),
        (
            "zero_route_timeout",
            with_route_line(&format!("timeout = \"0s\" {MARK}")),
            "timeout",
        ),
        (
            "huge_idle_timeout",
            with_route_line(&format!("idle_timeout = \"400d\" {MARK}")),
            "idle_timeout",
        ),
        (
            "zero_keepalive_timeout",
            with_server_line("keepalive_timeout = \"0ms\""),
            "keepalive_timeout",
        ),
        (
            "huge_header_read_timeout",
            with_server_line("header_read_timeout = \"1000years\""),
            "header_read_timeout",
        ),
        (
            "huge_max_connections",
            with_server_line("max_connections = 9000000000000000000"),
            "max_connections",
        ),
        (
            "zero_max_connections",
            with_server_line("max_connections = 0"),
            "max_connections",
        ),
        (
            "huge_workers",
            with_server_line("workers = 100000"),
            "workers",
        ),
        (
            "small_max_header_bytes",
            with_server_line("max_header_bytes = 100"),
            "max_header_bytes",
        ),
        (
            "huge_tcp_notsent_lowat",
            with_server_line("tcp_notsent_lowat = 4294967296"),
            "tcp_notsent_lowat",
        ),
        (
            "negative_tcp_notsent_lowat",
            with_server_line("tcp_notsent_lowat = -1"),
            "tcp_notsent_lowat",
        ),
        (
            "huge_max_inflight",
            with_upstream_line("max_inflight = 9000000000000000000"),
            "max_inflight",
        ),
        (
            "negative_max_queue",
            with_upstream_line("max_queue = -1"),
            "max_queue",
        ),
        (
            "zero_queue_timeout",
            with_upstream_line("queue_timeout = \"0s\""),
            "queue_timeout",
        ),
        (
            "small_h2_stream_window",
            with_upstream_line("h2_stream_window = 1000"),
            "h2_stream_window",
        ),
        (
            "huge_h2_stream_window",
            with_upstream_line("h2_stream_window = 4294967296"),
            "h2_stream_window",
        ),
    ];
    for (name, text, key) in cases {
        assert_rejected(name, &text, key);
    }
}

/// An upstream URL whose port does not fit in 16 bits used to become port 80 without a
/// word; port 0 and a fragment (which `http::Uri` drops) are refused too.
#[test]
fn upstream_url_bad_port_or_fragment() {
    for (name, url) in [
        ("port_too_big", "http://127.0.0.1:70000"),
        ("port_zero", "http://127.0.0.1:0"),
        ("port_empty", "http://127.0.0.1:/"),
        ("fragment", "http://127.0.0.1:9000/base#part"),
    ] {
        let text = HEAD.replace(
            "url = \"http://127.0.0.1:9000\"\n",
            &format!("url = \"{url}\" {MARK}\n"),
        ) + ROUTE;
        assert_rejected(name, &text, "url");
    }
}

/// A route after one with the same prefix that takes all its methods can never match;
/// the error names both routes. The narrower route first is fine.
#[test]
fn route_shadowed_by_an_earlier_one() {
    let text = format!(
        "{HEAD}{ROUTE}\n[[routes]]\nname = \"news-post\"\npath_prefix = \"/news\" {MARK}\n\
         methods = [\"POST\"]\nupstream = \"news\"\n"
    );
    assert_rejected("route_shadowed", &text, "headlines");

    let text = format!(
        "{HEAD}\n[[routes]]\nname = \"reads\"\npath_prefix = \"/news\"\n\
         methods = [\"GET\", \"HEAD\"]\nupstream = \"news\"\n\
         [[routes]]\nname = \"gets\"\npath_prefix = \"/news\" {MARK}\n\
         methods = [\"get\"]\nupstream = \"news\"\n"
    );
    assert_rejected("route_shadowed_by_methods", &text, "reads");

    // The other way round each route has its own requests: accepted.
    let text = format!(
        "{HEAD}\n[[routes]]\nname = \"news-post\"\npath_prefix = \"/news\"\n\
         methods = [\"POST\"]\nupstream = \"news\"\n{ROUTE}"
    );
    assert_accepted("a narrower route before a wider one", &text);
}

/// The shape of the shipped `proxy.toml`: `check` accepts it and prints the route table.
#[test]
fn valid_config_prints_the_route_table() {
    let text = r#"[server]
listen = "127.0.0.1:8080"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:9901"

[log]
format = "text"
level = "info"

[upstreams.news]
url = "http://127.0.0.1:9000"
connect_timeout = "1s"

[[routes]]
name = "headlines"
path_prefix = "/news/"
methods = ["GET"]
strip_prefix = true
upstream = "news"
timeout = "3s"
idle_timeout = "10s"
on_client_disconnect = "cancel"

[[routes]]
name = "payments"
path_prefix = "/pay/"
strip_prefix = true
upstream = "news"
timeout = "30s"
on_client_disconnect = "continue"
"#;
    let stdout = assert_accepted("the shipped config's shape", text);
    for name in ["headlines", "payments"] {
        assert!(
            stdout.contains(name),
            "the route table on stdout lacks route `{name}`:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("/news/") && stdout.contains("/pay/"),
        "{stdout}"
    );
}

/// The rule is "longer than a year is refused": a year itself is not longer than a year.
/// humantime reads `1y` (and `12months`) as 365.25 days, a little over the 365-day
/// bound, and the error then says "`1y` is longer than a year".
#[test]
fn a_duration_of_one_year_is_accepted() {
    for year in ["1y", "1year", "12months"] {
        assert_accepted(
            &format!("`timeout = \"{year}\"`"),
            &with_route_line(&format!("timeout = \"{year}\"")),
        );
    }
}
