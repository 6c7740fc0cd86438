//! Logging that can never block an IO shard.
//!
//! Lines go through tracing-appender's `non_blocking` writer in lossy mode with a bounded
//! queue (`[log] queue_lines`): when the writer thread cannot keep up (slow disk, blocked
//! stdout) new lines are dropped and counted (`gateway_log_lines_dropped_total`) instead
//! of stalling the thread that logged them. A stalled IO thread is how push servers pile
//! up CLOSE_WAIT sockets.

use std::io::Write;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogConfig, LogFormat};

/// Keeps the writer thread alive; dropping it flushes what is queued.
pub struct LogGuard {
    _guard: WorkerGuard,
    dropped: ErrorCounter,
}

impl LogGuard {
    pub fn dropped_counter(&self) -> ErrorCounter {
        self.dropped.clone()
    }
}

/// Installs the global subscriber writing to `writer` (stdout, a daily-rolling file, or
/// anything else in tests). `RUST_LOG` overrides `[log] level`.
pub fn init_with<W: Write + Send + 'static>(cfg: &LogConfig, writer: W) -> LogGuard {
    let (nb, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit((cfg.queue_lines as usize).max(1))
        .thread_name("log-writer")
        .finish(writer);
    let dropped = nb.error_counter();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(nb)
        .with_target(false);
    let result = match cfg.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
    LogGuard {
        _guard: guard,
        dropped,
    }
}

/// Logging as configured: stdout, or a daily-rolling file when `[log] file` is set.
pub fn init(cfg: &LogConfig) -> LogGuard {
    match cfg.file.as_deref() {
        Some(path) => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let name = path
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "gateway.log".into());
            init_with(cfg, tracing_appender::rolling::daily(dir, name))
        }
        None => init_with(cfg, std::io::stdout()),
    }
}
