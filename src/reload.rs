//! Live reload of `proxy.toml`: on SIGHUP and when the file changes on disk.
//!
//! Validate, then swap: the new file is parsed and checked completely before anything
//! changes, and the route table is replaced in one atomic store, so a request sees either
//! the old table or the new one, never a mix, and requests in flight finish on the routes
//! they started with. A file that fails is logged at ERROR with its line and key, counted
//! as `cutoff_config_reloads_total{result="error"}`, and the old table keeps serving.
//!
//! The watch is on folders, not files: editors that save by writing a new file and renaming
//! it over the old one replace the inode a file watch would be attached to, and Kubernetes
//! updates a mounted ConfigMap by swapping a `..data` symlink next to the file, an event
//! that names neither the file nor anything under it. So the folders where a watched
//! file's path can change are watched (see [`Folders::follow`]); a name created, removed
//! or renamed there, or a write to a watched file, wakes the watch, and the files' bytes
//! then decide whether anything changed. Writes to other files (a log beside the config)
//! are let pass, or each round's own log line would start the next.
//! Bursts of events (an editor writes, truncates, renames) are coalesced: a reload runs
//! once the folders have been quiet for [`SETTLE`], or longer while a file is still open
//! for writing, so that a slow writer's half-written file is not applied, and never later
//! than [`MAX_SETTLE`] after the first event, so that a busy folder cannot starve it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, Config};
use crate::proxy::Shared;
use crate::routes::RouteTable;

const SETTLE: Duration = Duration::from_millis(150);
/// How long a file written in place may stay quiet between two writes and still be waited
/// for, as long as it has not been closed.
const WRITE_SETTLE: Duration = Duration::from_secs(1);
const MAX_SETTLE: Duration = Duration::from_secs(3);

/// What the watch saw, as far as reloading cares.
#[derive(Debug, PartialEq)]
enum Seen {
    /// SIGHUP: an explicit request reloads even an unchanged file.
    Signal,
    Change,
    /// Data written to this file, which is still open for writing.
    Writing(PathBuf),
    /// This file, open for writing, was closed.
    Written(PathBuf),
}

/// `applied_certs` are the certificate files' bytes as read just before the listener's
/// TLS material was loaded ([`cert_bytes`]).
pub async fn watch(
    shared: Arc<Shared>,
    mut current: Config,
    applied_certs: Option<Vec<u8>>,
    hup: Option<tokio::signal::unix::Signal>,
) {
    let path = current.source.clone();
    let (tx, mut rx) = mpsc::channel::<Seen>(64);
    let mut folders = Folders::new(tx.clone());
    folders.follow(&watched_files(&current));
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
            let _ = tx.try_send(Seen::Change);
            None
        }
    };
    let hup = hup.map(|h| tokio::spawn(sighup(h, tx)));
    while let Some(first) = rx.recv().await {
        let forced = settle(first, &mut rx).await;
        // Watch where the files are now before reading them: a write to a folder that a
        // swapped symlink just brought in is then seen, even one landing during the read.
        folders.follow(&watched_files(&current));
        let previous = current.clone();
        let job = {
            let shared = shared.clone();
            move || {
                round(&shared, &mut current, &mut last_text, forced);
                (current, last_text)
            }
        };
        (current, last_text) = match tokio::task::spawn_blocking(job).await {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; the previous routes keep serving");
                (previous, None)
            }
        };
        // A new certificate path moves what must be watched.
        folders.follow(&watched_files(&current));
    }
    if let Some(h) = hup {
        h.abort();
    }
}

/// One round, on the blocking pool rather than a serving thread: reading the files and
/// building TLS configurations (the system's roots are parsed again for each rebuilt HTTPS
/// endpoint, about 2 ms each) would otherwise hold up the requests of that thread.
fn round(shared: &Shared, current: &mut Config, last_text: &mut Option<Vec<u8>>, forced: bool) {
    let text = fingerprint(current);
    if !forced && text.is_some() && text == *last_text {
        // A touch, a neighbour's file, or an editor's intermediate write that ended where
        // it began.
        tracing::debug!(path = %current.source.display(), "config and certificates unchanged");
        return;
    }
    *last_text = text;
    let result = config::load(&current.source)
        .map_err(|e| e.to_string())
        .and_then(|new| apply(shared, current, &new).map(|()| new));
    match result {
        Ok(new) => *current = new,
        Err(e) => {
            crate::metrics::config_reload(false);
            tracing::error!(error = %e, "config reload failed; the previous routes keep serving");
        }
    }
}

/// Waits until the events stop: [`SETTLE`] of quiet, or [`WRITE_SETTLE`] while a watched
/// file is written in place and still open, at most [`MAX_SETTLE`] in all. True if SIGHUP
/// came.
async fn settle(first: Seen, rx: &mut mpsc::Receiver<Seen>) -> bool {
    let give_up = tokio::time::Instant::now() + MAX_SETTLE;
    let mut forced = false;
    let mut open: HashSet<PathBuf> = HashSet::new();
    let mut next = Some(first);
    while let Some(seen) = next.take() {
        match seen {
            Seen::Signal => forced = true,
            Seen::Change => {}
            Seen::Writing(p) => {
                open.insert(p);
            }
            Seen::Written(p) => {
                open.remove(&p);
            }
        }
        let quiet = if open.is_empty() {
            SETTLE
        } else {
            WRITE_SETTLE
        };
        let until = (tokio::time::Instant::now() + quiet).min(give_up);
        if let Ok(Some(seen)) = tokio::time::timeout_at(until, rx.recv()).await {
            next = Some(seen);
        }
    }
    forced
}

/// The config file, then the certificate files: the listener's and the upstreams' CA files.
/// A renewed certificate is picked up when its files change, without an edit of the config.
fn watched_files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.source.clone()];
    if let Some(tls) = &config.server.tls {
        files.push(tls.cert.clone());
        files.push(tls.key.clone());
    }
    files.extend(config.upstreams.values().filter_map(|u| u.ca_file.clone()));
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

/// The certificate files, as they are now (empty without any); `None` if one cannot be
/// read.
pub fn cert_bytes(config: &Config) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    for f in watched_files(config).iter().skip(1) {
        all.extend(std::fs::read(f).ok()?);
        all.push(0);
    }
    Some(all)
}

fn apply(shared: &Shared, old: &Config, new: &Config) -> Result<(), String> {
    let previous = shared.table.load_full();
    let table = RouteTable::build(new, Some(&previous))?;
    // Certificates reload with the config (a renewed cert keeps its file name). Enabling
    // or disabling TLS changes the listener, which needs a restart.
    let acceptor = match (&old.server.tls, &new.server.tls) {
        (Some(_), Some(t)) => Some(Arc::new(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config(t)?,
        ))),
        _ => None,
    };
    let routes = table.routes().len();
    let replaced: Vec<_> = previous
        .upstreams
        .values()
        .filter(|u| !table.upstreams.values().any(|n| Arc::ptr_eq(u, n)))
        .cloned()
        .collect();
    shared.table.store(Arc::new(table));
    drop(previous);
    for upstream in replaced {
        upstream.retire();
    }
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

/// The folders watched, kept in step with the files' current locations.
struct Folders {
    /// `None` (logged once) if watching is impossible; SIGHUP still works then.
    watcher: Option<notify::RecommendedWatcher>,
    /// Each watched folder, with the (device, inode) it had when watched: inotify watches
    /// an inode, so a folder swapped in under the same name needs a watch of its own.
    watched: BTreeMap<PathBuf, (u64, u64)>,
    /// The watched files, as named and as resolved. Shared with the event handler, which
    /// lets writes to other files (a log beside the config) pass without waking anyone.
    files: Arc<Mutex<HashSet<PathBuf>>>,
}

impl Folders {
    fn new(tx: mpsc::Sender<Seen>) -> Folders {
        let files: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        let ours = files.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            use notify::EventKind;
            use notify::event::{AccessKind, AccessMode, ModifyKind};
            let Ok(event) = event else { return };
            let watched = || {
                let files = ours.lock().unwrap_or_else(|e| e.into_inner());
                event.paths.iter().find(|p| files.contains(*p)).cloned()
            };
            let seen = match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => match watched() {
                    Some(p) => Seen::Written(p),
                    None => return,
                },
                EventKind::Access(_) => return,
                EventKind::Modify(ModifyKind::Data(_)) => match watched() {
                    Some(p) => Seen::Writing(p),
                    None => return,
                },
                // `touch proxy.toml` asks for a look; a chmod of a neighbour does not.
                EventKind::Modify(ModifyKind::Metadata(_)) if watched().is_none() => return,
                // A name created, removed or renamed may change where a watched path
                // leads (a swapped symlink, a folder renamed into place).
                _ => Seen::Change,
            };
            // A full channel already holds a pending reload; only a `Written` could be
            // lost, which costs a wait of WRITE_SETTLE, not a reload.
            let _ = tx.try_send(seen);
        };
        let watcher = notify::recommended_watcher(handler)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot watch the config file; SIGHUP still reloads");
            })
            .ok();
        Folders {
            watcher,
            watched: BTreeMap::new(),
            files,
        }
    }

    /// Watches the folders where the files' paths can change: each file's folder, the
    /// folder it resolves to, and the folder holding any symlinked folder on its path
    /// (`current -> releases/v1`). A folder that is gone is watched through its nearest
    /// existing ancestor, which sees it come back.
    fn follow(&mut self, files: &[PathBuf]) {
        let mut want = BTreeSet::new();
        let mut names = HashSet::new();
        for f in files {
            // Canonical folders: inotify gives one watch per inode, so two names for one
            // folder (a relative and an absolute path) must not be watched twice.
            let dir = canonical(folder_of(f));
            names.insert(dir.join(f.file_name().unwrap_or_default()));
            want.insert(dir);
            if let Ok(real) = std::fs::canonicalize(f) {
                want.insert(folder_of(&real));
                names.insert(real);
            }
            for a in f.ancestors().skip(1) {
                if a.as_os_str().is_empty() {
                    break;
                }
                if std::fs::symlink_metadata(a).is_ok_and(|m| m.file_type().is_symlink()) {
                    want.insert(canonical(folder_of(a)));
                }
            }
        }
        *self.files.lock().unwrap_or_else(|e| e.into_inner()) = names;
        let Some(watcher) = &mut self.watcher else {
            return;
        };
        let want: BTreeSet<PathBuf> = want.into_iter().map(existing).collect();
        for (dir, id) in &self.watched {
            if !want.contains(dir) || identity(dir) != Some(*id) {
                // Fails for a folder already removed, whose watch went with it.
                let _ = watcher.unwatch(dir);
            }
        }
        let mut watched = BTreeMap::new();
        for dir in want {
            let Some(id) = identity(&dir) else { continue };
            if self.watched.get(&dir) == Some(&id) {
                watched.insert(dir, id);
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir, id);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    dir = %dir.display(),
                    "cannot watch this folder; SIGHUP still reloads"
                ),
            }
        }
        self.watched = watched;
    }
}

fn canonical(dir: PathBuf) -> PathBuf {
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// `dir`, or its nearest ancestor that exists.
fn existing(dir: PathBuf) -> PathBuf {
    dir.ancestors()
        .find(|a| a.is_dir())
        .map_or(dir.clone(), Path::to_path_buf)
}

fn identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

fn folder_of(file: &Path) -> PathBuf {
    file.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

async fn sighup(mut hup: tokio::signal::unix::Signal, tx: mpsc::Sender<Seen>) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        let _ = tx.send(Seen::Signal).await;
    }
}
