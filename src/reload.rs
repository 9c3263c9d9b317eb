//! Live reload of `proxy.toml`: on SIGHUP and when the file changes on disk.
//!
//! Validate, then swap: the new file is parsed and checked completely before anything
//! changes, and the route table is replaced in one atomic store, so a request sees either
//! the old table or the new one, never a mix, and requests in flight finish on the routes
//! they started with. A file that fails is logged at ERROR with its line and key, counted
//! as `cutoff_config_reloads_total{result="error"}`, and the old table keeps serving.
//!
//! The watch is on the file's folder, filtered by file name, because editors that save by
//! writing a new file and renaming it over the old one replace the inode a file watch
//! would be attached to. Bursts of events (an editor writes, truncates, renames) are
//! coalesced: a reload runs once the file has been quiet for [`SETTLE`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, Config};
use crate::proxy::Shared;
use crate::routes::RouteTable;

const SETTLE: Duration = Duration::from_millis(150);

/// `applied_certs` are the certificate files' bytes as read just before the listener's
/// TLS material was loaded ([`cert_bytes`]).
pub async fn watch(
    shared: Arc<Shared>,
    mut current: Config,
    applied_certs: Option<Vec<u8>>,
    hup: Option<tokio::signal::unix::Signal>,
) {
    let path = current.source.clone();
    // `true` for SIGHUP: an explicit request reloads even an unchanged file.
    let (tx, mut rx) = mpsc::channel::<bool>(4);
    let _watcher = file_watcher(&path, &watched_files(&current), tx.clone());
    // The files may have changed between their first load and this watch (an edit or a
    // renewed certificate saved right after startup): then the first round reloads
    // whatever is there. One read of each serves both the comparison and the fingerprint:
    // reading twice would let an edit land in between and be mistaken for the state
    // already applied.
    let initial = std::fs::read(&path).ok();
    let certs = cert_bytes(&current);
    let unchanged = initial
        .as_deref()
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|t| config::parse(&path, t).ok())
        .is_some_and(|now| now == current)
        && certs.is_some()
        && certs == applied_certs;
    let mut last_text = match (unchanged, initial, certs) {
        (true, Some(text), Some(certs)) => Some(fingerprint_of(text, certs)),
        _ => {
            let _ = tx.try_send(false);
            None
        }
    };
    let hup = hup.map(|h| tokio::spawn(sighup(h, tx)));
    while let Some(mut forced) = rx.recv().await {
        // Coalesce: wait until the events stop for a moment.
        while let Ok(Some(f)) = tokio::time::timeout(SETTLE, rx.recv()).await {
            forced |= f;
        }
        let text = fingerprint(&current);
        if !forced && text.is_some() && text == last_text {
            // A touch, or an editor's intermediate write that ended where it began.
            tracing::debug!(path = %path.display(), "config and certificates unchanged");
            continue;
        }
        last_text = text;
        let result = config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|new| apply(&shared, &current, &new).map(|()| new));
        match result {
            Ok(new) => current = new,
            Err(e) => {
                crate::metrics::config_reload(false);
                tracing::error!(error = %e, "config reload failed; the previous routes keep serving");
            }
        }
    }
    if let Some(h) = hup {
        h.abort();
    }
}

/// The config file and the listener's certificate files: a renewed certificate is picked
/// up when its files change, without an edit of the config.
fn watched_files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.source.clone()];
    if let Some(tls) = &config.server.tls {
        files.push(tls.cert.clone());
        files.push(tls.key.clone());
    }
    files
}

/// The bytes of every watched file; a reload runs only when they changed (or on SIGHUP).
fn fingerprint(config: &Config) -> Option<Vec<u8>> {
    Some(fingerprint_of(
        std::fs::read(&config.source).ok()?,
        cert_bytes(config)?,
    ))
}

fn fingerprint_of(mut config_text: Vec<u8>, certs: Vec<u8>) -> Vec<u8> {
    config_text.push(0);
    config_text.extend(certs);
    config_text
}

/// The listener's certificate and key files, as they are now (empty without TLS); `None`
/// if one cannot be read.
pub fn cert_bytes(config: &Config) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    for f in watched_files(config).iter().skip(1) {
        all.extend(std::fs::read(f).ok()?);
        all.push(0);
    }
    Some(all)
}

fn apply(shared: &Shared, old: &Config, new: &Config) -> Result<(), String> {
    let table = {
        let previous = shared.table.load();
        RouteTable::build(new, Some(&previous))?
    };
    // Certificates reload with the config (a renewed cert keeps its file name). Enabling
    // or disabling TLS changes the listener, which needs a restart.
    let acceptor = match (&old.server.tls, &new.server.tls) {
        (Some(_), Some(t)) => Some(Arc::new(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config(t)?,
        ))),
        _ => None,
    };
    let routes = table.routes().len();
    shared.table.store(Arc::new(table));
    if let Some(a) = acceptor {
        shared.tls.store(Some(a));
    }
    crate::metrics::config_reload(true);
    tracing::info!(path = %new.source.display(), routes, "config reloaded");
    for (what, changed) in [
        ("[server]", {
            let (mut a, mut b) = (old.server.clone(), new.server.clone());
            a.tls = a.tls.map(|_| Default::default());
            b.tls = b.tls.map(|_| Default::default());
            a != b
        }),
        ("[admin]", old.admin != new.admin),
        ("[log]", old.log != new.log),
    ] {
        if changed {
            tracing::warn!(
                section = what,
                "changed settings of this section take effect only after a restart"
            );
        }
    }
    Ok(())
}

/// Forwards file events for `path` into `tx`; `None` (logged) if watching is impossible,
/// in which case SIGHUP still works.
fn file_watcher(
    path: &Path,
    files: &[PathBuf],
    tx: mpsc::Sender<bool>,
) -> Option<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter(|f| f.parent().unwrap_or(Path::new("")) == path.parent().unwrap_or(Path::new("")))
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| names.iter().any(|w| w == n)))
        {
            // A full channel already holds a pending reload: nothing is lost.
            let _ = tx.try_send(false);
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; SIGHUP still reloads");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config folder; SIGHUP still reloads");
        return None;
    }
    Some(watcher)
}

async fn sighup(mut hup: tokio::signal::unix::Signal, tx: mpsc::Sender<bool>) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        let _ = tx.send(true).await;
    }
}
