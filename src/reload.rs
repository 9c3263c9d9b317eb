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

pub async fn watch(shared: Arc<Shared>, mut current: Config) {
    let path = current.source.clone();
    // `true` for SIGHUP: an explicit request reloads even an unchanged file.
    let (tx, mut rx) = mpsc::channel::<bool>(4);
    let _watcher = file_watcher(&path, tx.clone());
    let hup = tokio::spawn(sighup(tx));
    let mut last_text = std::fs::read(&path).ok();
    while let Some(mut forced) = rx.recv().await {
        // Coalesce: wait until the events stop for a moment.
        while let Ok(Some(f)) = tokio::time::timeout(SETTLE, rx.recv()).await {
            forced |= f;
        }
        let text = std::fs::read(&path).ok();
        if !forced && text.is_some() && text == last_text {
            // A touch, or an editor's intermediate write that ended where it began.
            tracing::debug!(path = %path.display(), "config file unchanged");
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
    hup.abort();
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
fn file_watcher(path: &Path, tx: mpsc::Sender<bool>) -> Option<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path.file_name()?.to_os_string();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()))
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

async fn sighup(tx: mpsc::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        let _ = tx.send(true).await;
    }
}
