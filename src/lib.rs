//! cutoff: a reverse proxy that stops upstream work the moment nobody can use its result.
//!
//! The library's one door is [`run`]: it takes a checked [`config::Config`], listeners
//! that are already bound (tests bind `127.0.0.1:0`), and the [`shutdown::Lifecycle`] that
//! signals drive. Everything else is one concern per module:
//!
//! | module | concern |
//! |---|---|
//! | `config` | `proxy.toml`: types, defaults, validation, errors with line and key |
//! | `routes` | the route table and longest-prefix matching |
//! | `server` | accept loop, connection tasks |
//! | `hangup` | a client's FIN or RST, noticed without reading and acted on at once |
//! | `linger` | a connection that answered early closes without resetting the answer |
//! | `head_timer` | `header_read_timeout`: a request head timed from its first bytes |
//! | `proxy` | the story of one request, top to bottom |
//! | `protected` | `continue` routes: calls that outlive their client |
//! | `headers` | hop-by-hop removal, `X-Forwarded-*`, `Host`, paths |
//! | `body` | body wrappers: deadlines, idle timer, upload tracking |
//! | `deadline` | a route timeout kept to its instant: tokio's wheel, then a `timerfd` |
//! | `outcome` | the guard: one outcome per request, recorded on drop |
//! | `access_log` | the access-log line |
//! | `metrics` | metric names, buckets, handles, the saved-work estimator |
//! | `upstream` | endpoints, idle connections, one HTTP/1.1 exchange |
//! | `admin` | `/metrics`, `/healthz`, `/readyz` |
//! | `reload` | file watch, SIGHUP, validate-then-swap |
//! | `shutdown` | signals, drain, cancel after grace |
//! | `news_api` | the demo upstream |

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod deadline;
pub mod hangup;
pub mod head_timer;
pub mod headers;
pub mod linger;
pub mod logging;
pub mod metrics;
pub mod news_api;
pub mod outcome;
pub mod protected;
pub mod proxy;
pub mod read_cap;
pub mod reload;
pub mod routes;
pub mod send_queue;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod write_gate;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::metrics::Exporter;
use crate::proxy::Shared;
use crate::routes::RouteTable;
use crate::server::ServerSettings;
use crate::shutdown::Lifecycle;

/// Periodic housekeeping: fold histogram samples, so that memory stays bounded even when
/// nobody scrapes.
async fn upkeep(exporter: Exporter) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        exporter.run_upkeep();
    }
}

/// How often each worker looks through its idle upstream connections.
const POOL_SWEEP: Duration = Duration::from_secs(1);

/// Closes this worker's idle upstream connections that the upstream closed (or that
/// outlived `pool_idle_timeout`). An idle connection is polled by nobody, so an upstream's
/// close (its keep-alive timeout, a restart) is seen only here: until then the descriptor
/// sits in CLOSE_WAIT. Every 5 s from one task, as before, the soak's descriptors took
/// 4.2 s to come back, against 0.1 s for nginx and HAProxy, which watch idle connections.
/// Each worker sweeps its own lists, under locks nobody else takes (up to 8 workers, see
/// `POOL_SHARDS`), so a sweep never holds up another worker's check-out; a second's sweep
/// of 256 idle connections costs about 0.2 million instructions.
async fn sweep_pools(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(POOL_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let table = shared.table.load_full();
        for upstream in table.upstreams.values() {
            for endpoint in upstream.endpoints() {
                endpoint.sweep_here();
            }
        }
    }
}

/// A thread with its own single-threaded runtime, accepting from a duplicate of the
/// listening socket (one accept queue, so no connection is stranded when a worker stops).
///
/// Why a runtime per core rather than one work-stealing runtime: a request's whole life
/// (client connection, upstream connection, timers) stays on one thread, so wake-ups never
/// cross cores and nothing contends on a shared run queue. Balance comes from the accept
/// queue: an idle worker takes the next connection first.
fn spawn_worker(
    index: usize,
    listener: &TcpListener,
    shared: Arc<Shared>,
    settings: ServerSettings,
) -> Result<(), String> {
    let std_listener = socket2::SockRef::from(listener)
        .try_clone()
        .map_err(|e| format!("cannot share the listening socket: {e}"))?;
    let std_listener: std::net::TcpListener = std_listener.into();
    std::thread::Builder::new()
        .name(format!("cutoff-worker-{index}"))
        .spawn(move || {
            upstream::set_worker_index(index);
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a worker runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(std_listener) else {
                    return;
                };
                tokio::spawn(shutdown::relay_to_this_worker(shared.lifecycle.clone()));
                tokio::spawn(sweep_pools(shared.clone()));
                server::serve(listener, shared.clone(), settings).await;
                // Keep this runtime, and the connections it drives, alive through the
                // drain; the main thread decides when the process ends.
                let lifecycle = shared.lifecycle.clone();
                tokio::select! {
                    _ = shared.tasks.wait() => {}
                    _ = async {
                        lifecycle.forced().await;
                        tokio::time::sleep(FORCED_EXIT_WAIT).await;
                    } => {}
                }
            });
        })
        .map_err(|e| format!("cannot start worker thread {index}: {e}"))?;
    Ok(())
}

/// Sockets bound before [`run`], so that the caller learns the real ports.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
}

/// How long after the forced end connection tasks have to wind down before `run` returns.
const FORCED_EXIT_WAIT: Duration = Duration::from_millis(700);

/// How long the exit waits for access-log lines still queued for the log thread (the
/// last departures' lines; the queue is empty unless the log's reader is behind). Short:
/// a slow reader must not delay the exit by much.
const LOG_FLUSH_WAIT: Duration = Duration::from_millis(250);

/// Serves until `lifecycle` drains, gives in-flight work `shutdown_grace`, then forces
/// the end (cancelling every upstream call still running) and returns. `reload_signal`
/// (SIGHUP, registered by the caller) triggers a reload like a change of the file.
///
/// Runs on a current-thread runtime, whose thread becomes worker 0: a worker's
/// connections and the shutdown's word to them stay on its thread (`shutdown::Seat`).
pub async fn run(
    config: Config,
    listeners: Listeners,
    exporter: Option<Exporter>,
    lifecycle: Arc<Lifecycle>,
    reload_signal: Option<tokio::signal::unix::Signal>,
) -> Result<(), String> {
    if tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::CurrentThread
    {
        return Err("cutoff::run needs a current-thread tokio runtime".into());
    }
    // Read before the TLS material is loaded: a renewal saved from here on is seen as a
    // change by the reload watch, never mistaken for what is already serving.
    let applied_certs = reload::cert_bytes(&config);
    hangup::set_realtime(config.server.hangup_realtime);
    send_queue::limit_clients(config.server.tcp_notsent_lowat, &listeners.proxy);
    let table = RouteTable::build(&config, None)?;
    let tls = config
        .server
        .tls
        .as_ref()
        .map(|t| tls::server_config(t).map(|c| Arc::new(tokio_rustls::TlsAcceptor::from(c))))
        .transpose()?;
    let shared = Arc::new(Shared {
        tls: arc_swap::ArcSwapOption::new(tls),
        table: arc_swap::ArcSwap::from_pointee(table),
        lifecycle: lifecycle.clone(),
        body_read_timeout: config.server.body_read_timeout,
        tasks: tokio_util::task::TaskTracker::new(),
    });
    // Ready: the routes and the TLS material loaded. Tests and operators wait for these
    // lines, so they come only now (the sockets were bound earlier, by the caller).
    cli::log_listening("proxy", &listeners.proxy);
    if let Some(admin) = listeners.admin {
        cli::log_listening("admin", &admin);
        tokio::spawn(admin::serve(admin, exporter.clone(), lifecycle.clone()));
    }
    if let Some(exporter) = exporter {
        tokio::spawn(upkeep(exporter));
    }
    let grace = config.server.shutdown_grace;
    let settings = ServerSettings::new(
        config.server.header_read_timeout,
        config.server.keepalive_timeout,
        config.server.max_header_bytes,
        config.server.max_connections,
    );
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let reload = tokio::spawn(reload::watch(
        shared.clone(),
        config,
        applied_certs,
        reload_signal,
    ));
    for i in 1..workers {
        spawn_worker(i, &listeners.proxy, shared.clone(), settings.clone())?;
    }
    // This thread is worker 0.
    tokio::spawn(shutdown::relay_to_this_worker(lifecycle.clone()));
    tokio::spawn(sweep_pools(shared.clone()));
    server::serve(listeners.proxy, shared.clone(), settings).await;
    // Draining: the listener is closed. Wait for in-flight work, at most the grace.
    shared.tasks.close();
    let in_flight = shared.tasks.len();
    tracing::info!(in_flight, grace_ms = grace.as_millis() as u64, "draining");
    tokio::select! {
        _ = shared.tasks.wait() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(remaining = shared.tasks.len(), "grace ran out: cancelling what is left");
            lifecycle.force();
        }
        _ = lifecycle.forced() => {}
    }
    if lifecycle.is_forced() {
        let _ = tokio::time::timeout(FORCED_EXIT_WAIT, shared.tasks.wait()).await;
    }
    reload.abort();
    // The lines of the last departures the hang-up thread handled, still to be written.
    access_log::flush(LOG_FLUSH_WAIT).await;
    tracing::info!("shutdown complete");
    Ok(())
}
