//! The commands: run (optionally with the demo API), `check`, `news-api`.
//!
//! Everything that touches the outside world before serving lives here: reading the
//! config, binding sockets (so that the log can name the real ports, including `:0`
//! ones), installing the metrics recorder and the signal handlers, building the runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::shutdown::{self, Lifecycle};

/// A reverse proxy that stops upstream work the moment nobody can use its result.
#[derive(Parser)]
#[command(name = "cutoff", version, about)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Also run the demo news API on 127.0.0.1:9000, which the shipped proxy.toml uses.
    #[arg(long)]
    demo: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print the route table; on error print PATH:LINE:COL.
    Check,
    /// Run only the demo news API.
    NewsApi {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
}

pub const DEMO_API_ADDR: &str = "127.0.0.1:9000";

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::NewsApi { listen }) => {
            crate::logging::init(&config::LogConfig {
                format: config::LogFormat::Text,
                level: "info".into(),
            });
            runtime().block_on(async {
                match TcpListener::bind(listen).await {
                    Ok(l) => {
                        log_listening("news_api", &l);
                        let _ = crate::news_api::serve(l, std::future::pending()).await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("cutoff: cannot listen on {listen}: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        None => match config::load(&cli.config) {
            Ok(config) => {
                crate::logging::init(&config.log);
                let rt = runtime();
                let code = rt.block_on(serve(config, cli.demo));
                // Whatever is still parked (the admin listener, a DNS lookup) must not
                // hold the exit: the drain already ran.
                rt.shutdown_timeout(std::time::Duration::from_millis(100));
                code
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let table = config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            crate::routes::RouteTable::build(&config, None)
                .map(|t| (config, t))
                .map_err(|e| format!("{}: {e}", path.display()))
        });
    match table {
        Ok((config, table)) => {
            println!(
                "{}: ok, listening on {}",
                path.display(),
                config.server.listen
            );
            print!("{}", table.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// The main thread's runtime: single-threaded, like every worker's (see `lib.rs`).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

async fn serve(config: Config, demo: bool) -> ExitCode {
    let mut signals = match shutdown::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cutoff: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exporter = match crate::metrics::install() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the metrics recorder");
            None
        }
    };
    let proxy = match bind("proxy", config.server.listen).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let admin = match &config.admin {
        Some(a) => match bind("admin", a.listen).await {
            Ok(l) => Some(l),
            Err(code) => return code,
        },
        None => None,
    };
    if demo {
        let addr: SocketAddr = DEMO_API_ADDR.parse().expect("valid constant");
        match bind("news_api", addr).await {
            Ok(l) => {
                log_listening("news_api", &l);
                tokio::spawn(crate::news_api::serve(l, std::future::pending()));
            }
            Err(code) => return code,
        }
    }
    let lifecycle = Arc::new(Lifecycle::default());
    let hup = signals.hup.take();
    tokio::spawn(signals.drive(lifecycle.clone()));
    match crate::run(
        config,
        crate::Listeners { proxy, admin },
        exporter,
        lifecycle,
        hup,
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cutoff: {e}");
            ExitCode::from(2)
        }
    }
}

/// Listening sockets get a deep accept backlog: a burst of connects beyond the default
/// 128 would otherwise be dropped by the kernel and retried by clients a second later.
const BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Binds without announcing it: the proxy and admin listeners say "listening" only once
/// everything they serve with (routes, TLS material) has loaded, so that whoever waits for
/// that line can rely on it.
async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, ExitCode> {
    match listen(addr) {
        Ok(l) => Ok(l),
        Err(e) => {
            tracing::error!(listener = what, %addr, error = %e, "cannot listen");
            eprintln!("cutoff: cannot listen on {addr} ({what}): {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

pub(crate) fn log_listening(what: &str, l: &TcpListener) {
    if let Ok(addr) = l.local_addr() {
        tracing::info!(target: "cutoff::server", listener = what, addr = %addr, "listening");
    }
}
