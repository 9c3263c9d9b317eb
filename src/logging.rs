//! Logs to stderr, as text or as one JSON object per line.
//!
//! With `format = "json"` event fields are flattened to the top level of each object, so
//! an access-log line is `{"timestamp":..,"level":"INFO","target":"cutoff::access",
//! "route":..,"status":499,..}` and log shippers need no nested paths. `RUST_LOG`, when
//! set, overrides `[log] level` (handy for a one-off debug session).

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(config: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}
