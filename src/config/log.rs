//! `[log]`: the lossy, non-blocking logger: level, format, destination and queue.

use std::path::PathBuf;

use serde::Deserialize;

use super::{at_least, empty_path_as_none, invalid, ConfigError, Section};

/// `[log]`: the lossy, non-blocking logger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    /// `None` = stdout; otherwise the path prefix of a daily-rolling file (`""` in TOML).
    #[serde(deserialize_with = "empty_path_as_none")]
    pub file: Option<PathBuf>,
    pub queue_lines: u32,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Section for LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.level.trim().is_empty() {
            return Err(invalid(
                "log.level",
                "must not be empty (e.g. \"info\")".to_string(),
            ));
        }
        if let Some(file) = &self.file {
            if file.file_name().is_none() {
                return Err(invalid(
                    "log.file",
                    format!(
                        "{} names a directory; give a file prefix such as gateway.log",
                        file.display()
                    ),
                ));
            }
        }
        at_least("log.queue_lines", self.queue_lines, 1)
    }
}
