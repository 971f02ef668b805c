//! Logging: one line per event, human-readable or JSON (`LOG_FORMAT`), filtered by `RUST_LOG`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; a second call (tests) keeps the first.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// How often one kind of recurring failure (a database or Redis outage) is logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs one kind of failure at most once per [`LOG_INTERVAL`], however many requests or
/// tasks run into it.
#[derive(Default)]
pub struct Throttle {
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    pub fn warn(&self, log: impl FnOnce()) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| now.duration_since(at) >= LOG_INTERVAL) {
            *last = Some(now);
            drop(last);
            log();
        }
    }
}
