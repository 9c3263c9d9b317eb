//! loadgen: the measuring half of cutoff's benchmark suite (`bench/run.sh`).
//!
//! Every measuring subcommand runs its own recording upstream (a raw TCP server on the
//! `--upstream` address, which the proxy under test is configured to forward to) in the
//! same process as its clients, so that client-side and upstream-side timestamps share one
//! monotonic clock. It prints human-readable lines and, last, one `RESULT {json}` line that
//! `run.sh` collects and `loadgen report` turns into markdown.
//!
//! Everything is loopback-only and bounded: every loop has a count and a time budget.

/// cutoff's allocator: hyper-floor is compared with cutoff, so it must not pay for another.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bulk;
mod cancel;
mod floor;
mod http;
mod report;
mod rss;
mod soak;
mod stats;
mod timeout;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
loadgen SUBCOMMAND [--flag value ...]

  ports N                         print N distinct free 127.0.0.1 ports
  wait-port ADDR [--timeout-ms 5000]
                                  wait until ADDR accepts TCP connections
  cancel  --proxy ADDR --upstream ADDR --held N --rounds R --phase headers|body|upload
          [--close fin|rst|mixed] [--gap-ms 1] [--bound-ms 2000] [--budget-s 20]
          [--settle-ms 0] [--label NAME]
  timeout --proxy ADDR --upstream ADDR --n N [--concurrency 10] [--timeout-ms 200]
          [--label NAME]
  rss     --proxy ADDR --upstream ADDR --pid PID --held N [--upload BYTES | --download 1]
          [--label NAME]
  bulk    --proxy ADDR --upstream ADDR [--pid PID] [--gib 1] [--label NAME]
                                  one large upload, then one large download (--proxy the
                                  upstream's own ADDR, without --pid: the direct baseline)
  soak    --proxy ADDR --upstream ADDR --pid PID --n 100000 --concurrency 64
          [--delay-ms 10] [--budget-s 60] [--label NAME]
  floor   --listen ADDR --upstream ADDR
                                  the thinnest hyper HTTP/1.1 forwarding loop (a baseline
                                  for the throughput and memory runs; runs until killed)
  wrk-parse --label NAME < wrk-output  turn `wrk --latency` output into a RESULT line
  report FILE.jsonl               render collected RESULT lines as markdown

ADDR is host:port and must be a loopback address (127.0.0.0/8 or ::1).
";

/// `--name value` flags after the subcommand, plus positional words.
pub struct Args {
    flags: HashMap<String, String>,
    pub positional: Vec<String>,
}

impl Args {
    fn parse(words: &[String]) -> Result<Args, String> {
        let mut flags = HashMap::new();
        let mut positional = Vec::new();
        let mut i = 0;
        while i < words.len() {
            let w = &words[i];
            if let Some(name) = w.strip_prefix("--") {
                let v = words
                    .get(i + 1)
                    .ok_or_else(|| format!("--{name} needs a value"))?;
                flags.insert(name.to_string(), v.clone());
                i += 2;
            } else {
                positional.push(w.clone());
                i += 1;
            }
        }
        Ok(Args { flags, positional })
    }

    pub fn str(&self, name: &str, default: &str) -> String {
        self.flags
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    pub fn req(&self, name: &str) -> Result<String, String> {
        self.flags
            .get(name)
            .cloned()
            .ok_or_else(|| format!("--{name} is required"))
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T, String> {
        match self.flags.get(name) {
            Some(v) => v.parse().map_err(|_| format!("--{name}: bad number {v:?}")),
            None => default.ok_or_else(|| format!("--{name} is required")),
        }
    }

    /// A loopback socket address; anything else is refused.
    pub fn addr(&self, name: &str) -> Result<SocketAddr, String> {
        loopback(&self.req(name)?)
    }

    pub fn ms(&self, name: &str, default: u64) -> Result<Duration, String> {
        Ok(Duration::from_millis(self.num(name, Some(default))?))
    }
}

pub fn loopback(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s.parse().map_err(|_| format!("bad address {s:?}"))?;
    if !a.ip().is_loopback() {
        return Err(format!("{a}: only loopback addresses are allowed"));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = words.first().cloned() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    if cmd == "--help" || cmd == "-h" || cmd == "help" {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(&words[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r: Result<(), String> = rt.block_on(async {
        match cmd.as_str() {
            "ports" => ports(&args),
            "wait-port" => wait_port(&args).await,
            "cancel" => cancel::run(&args).await,
            "timeout" => timeout::run(&args).await,
            "rss" => rss::run(&args).await,
            "bulk" => bulk::run(&args).await,
            "soak" => soak::run(&args).await,
            "floor" => floor::run(&args).await,
            "wrk-parse" => report::wrk_parse(&args),
            "report" => report::render(&args),
            other => Err(format!("unknown subcommand {other:?}\n\n{USAGE}")),
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds N listeners on 127.0.0.1:0 at once (so the ports are distinct), prints the
/// ports, and lets them go.
fn ports(args: &Args) -> Result<(), String> {
    let n: usize = args
        .positional
        .first()
        .ok_or("ports N")?
        .parse()
        .map_err(|_| "ports N: N must be a number")?;
    let ls: Vec<std::net::TcpListener> = (0..n.min(64))
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let ports: Vec<String> = ls
        .iter()
        .map(|l| l.local_addr().map(|a| a.port().to_string()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    println!("{}", ports.join(" "));
    Ok(())
}

async fn wait_port(args: &Args) -> Result<(), String> {
    let addr = loopback(args.positional.first().ok_or("wait-port ADDR")?)?;
    let limit = args.ms("timeout-ms", 5000)?;
    let end = std::time::Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() >= end {
            return Err(format!(
                "{addr} did not accept connections within {limit:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints the machine-readable line that run.sh collects.
pub fn emit(v: serde_json::Value) {
    println!("RESULT {v}");
}
