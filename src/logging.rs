//! Logging that can never block an IO shard.
//!
//! Lines go through tracing-appender's `non_blocking` writer in lossy mode with a bounded
//! queue (`[log] queue_lines`): when the writer thread cannot keep up (slow disk, blocked
//! stdout) new lines are dropped and counted (`gateway_log_lines_dropped_total`) instead
//! of stalling the thread that logged them. A stalled IO thread is how push servers pile
//! up CLOSE_WAIT sockets.
//!
//! Lines go to stdout or to a daily-rolling file (`[log] file`), as text or JSON
//! (`[log] format`); the filter is `RUST_LOG` when set, else `[log] level`.

use std::io::{IsTerminal, Write};
use std::path::Path;

use tracing::Dispatch;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogConfig, LogFormat};

/// Keeps the writer thread alive; dropping it flushes what is queued (waiting at most about
/// a second for a stuck writer).
pub struct LogGuard {
    _guard: WorkerGuard,
    dropped: ErrorCounter,
}

impl LogGuard {
    /// The counter of dropped lines, for `/metrics`.
    pub fn dropped_counter(&self) -> ErrorCounter {
        self.dropped.clone()
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.dropped_lines() as u64
    }
}

/// The filter: `rust_log` (the value of `RUST_LOG`) when set and non-empty, else `level`.
fn filter(level: &str, rust_log: Option<&str>) -> EnvFilter {
    rust_log
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(level))
}

/// A subscriber writing through a lossy non-blocking queue to `writer`, not yet installed.
fn build<W: Write + Send + 'static>(
    cfg: &LogConfig,
    rust_log: Option<&str>,
    writer: W,
    ansi: bool,
) -> (Dispatch, LogGuard) {
    let (nb, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit((cfg.queue_lines as usize).max(1))
        .thread_name("log-writer")
        .finish(writer);
    let dropped = nb.error_counter();
    let builder = fmt()
        .with_env_filter(filter(&cfg.level, rust_log))
        .with_writer(nb)
        .with_target(false)
        .with_ansi(ansi);
    let dispatch = match cfg.format {
        LogFormat::Json => Dispatch::new(builder.json().flatten_event(true).finish()),
        LogFormat::Text => Dispatch::new(builder.finish()),
    };
    (
        dispatch,
        LogGuard {
            _guard: guard,
            dropped,
        },
    )
}

fn install<W: Write + Send + 'static>(cfg: &LogConfig, writer: W, ansi: bool) -> LogGuard {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (dispatch, guard) = build(cfg, rust_log.as_deref(), writer, ansi);
    if let Err(e) = dispatch.try_init() {
        eprintln!("logging already initialised: {e}");
    }
    guard
}

/// Installs the global subscriber writing to `writer` (a file, a pipe, or anything else in
/// tests), without colours. `RUST_LOG` overrides `[log] level`.
pub fn init_with<W: Write + Send + 'static>(cfg: &LogConfig, writer: W) -> LogGuard {
    install(cfg, writer, false)
}

/// The daily-rolling file for `[log] file = path`: `path`'s directory, and its file name
/// as the prefix of `name.YYYY-MM-DD`.
fn rolling_file(path: &Path) -> tracing_appender::rolling::RollingFileAppender {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "gateway.log".into());
    tracing_appender::rolling::daily(dir, name)
}

/// Logging as configured: stdout (coloured only on a terminal, and not with `NO_COLOR`),
/// or a daily-rolling file when `[log] file` is set.
pub fn init(cfg: &LogConfig) -> LogGuard {
    match cfg.file.as_deref() {
        Some(path) => install(cfg, rolling_file(path), false),
        None => {
            let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            install(cfg, std::io::stdout(), ansi)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into shared memory.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn cfg(level: &str, format: LogFormat) -> LogConfig {
        LogConfig {
            level: level.into(),
            format,
            file: None,
            queue_lines: 1000,
        }
    }

    /// Logs through a subscriber built from `cfg`, then flushes and returns what was written.
    fn capture(cfg: &LogConfig, rust_log: Option<&str>, log: impl FnOnce()) -> String {
        let buf = Buf::default();
        let (dispatch, guard) = build(cfg, rust_log, buf.clone(), false);
        tracing::dispatcher::with_default(&dispatch, log);
        drop(guard);
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_lines_respect_the_configured_level_and_have_no_colours() {
        let out = capture(&cfg("warn", LogFormat::Text), None, || {
            tracing::info!("not shown");
            tracing::warn!(shard = 3, "shown");
        });
        assert!(out.contains("shown") && out.contains("shard=3"), "{out}");
        assert!(!out.contains("not shown"), "{out}");
        assert!(!out.contains('\u{1b}'), "ANSI escapes in {out:?}");
    }

    #[test]
    fn rust_log_overrides_the_configured_level() {
        let out = capture(&cfg("warn", LogFormat::Text), Some("debug"), || {
            tracing::debug!("debug line")
        });
        assert!(out.contains("debug line"), "{out}");
        let out = capture(&cfg("debug", LogFormat::Text), Some("  "), || {
            tracing::debug!("empty RUST_LOG keeps the config level")
        });
        assert!(out.contains("empty RUST_LOG"), "{out}");
    }

    #[test]
    fn json_lines_are_one_object_each_with_flattened_fields() {
        let out = capture(&cfg("info", LogFormat::Json), None, || {
            tracing::info!(client_id = "dev-1", "connected");
            tracing::error!("second");
        });
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["message"], "connected");
        assert_eq!(lines[0]["client_id"], "dev-1");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[1]["level"], "ERROR");
    }

    #[test]
    fn a_file_path_rolls_daily_in_its_directory() {
        let dir = std::env::temp_dir().join(format!("gateway-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (dispatch, guard) = build(
            &cfg("info", LogFormat::Text),
            None,
            rolling_file(&dir.join("gw.log")),
            false,
        );
        tracing::dispatcher::with_default(&dispatch, || tracing::info!("to the file"));
        drop(guard);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let text: Vec<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap_or_default())
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        // gw.log.YYYY-MM-DD
        assert!(
            name.starts_with("gw.log.") && name.len() == "gw.log.".len() + 10,
            "{name}"
        );
        assert!(text[0].contains("to the file"), "{text:?}");
    }
}
