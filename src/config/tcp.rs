//! `[tcp]`: socket options for listeners and accepted connections, kept within what
//! Linux's `listen(2)` and `setsockopt(2)` accept.

use std::time::Duration;

use serde::Deserialize;

use super::{in_range, ConfigError, Section};

/// Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at this many seconds.
pub const MAX_TCP_KEEPALIVE_SECS: u32 = 32_767;
/// Linux caps TCP_KEEPCNT at this many probes.
pub const MAX_TCP_KEEPALIVE_RETRIES: u8 = 127;

/// `[tcp]`: socket options applied to every accepted connection and listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    pub nodelay: bool,
    pub backlog: u32,
    /// 0 = kernel default (autotuning).
    pub send_buffer_bytes: u32,
    /// 0 = kernel default (autotuning).
    pub recv_buffer_bytes: u32,
    /// 0 disables TCP keepalive probes.
    pub keepalive_idle_secs: u32,
    pub keepalive_interval_secs: u32,
    pub keepalive_retries: u8,
    /// TCP_USER_TIMEOUT; 0 disables.
    pub user_timeout_secs: u32,
    /// After `accept()` fails for want of a file descriptor, retry this often.
    pub accept_retry_ms: u32,
}

impl TcpConfig {
    /// `accept_retry_ms` as a duration.
    pub fn accept_retry(&self) -> Duration {
        Duration::from_millis(u64::from(self.accept_retry_ms))
    }
}

impl Section for TcpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let t = self;
        // listen(2) and setsockopt(2) take a C int.
        in_range("tcp.backlog", t.backlog, 1, i32::MAX as u32)?;
        in_range("tcp.accept_retry_ms", t.accept_retry_ms, 1, 10_000)?;
        in_range(
            "tcp.send_buffer_bytes",
            t.send_buffer_bytes,
            0,
            i32::MAX as u32,
        )?;
        in_range(
            "tcp.recv_buffer_bytes",
            t.recv_buffer_bytes,
            0,
            i32::MAX as u32,
        )?;
        in_range(
            "tcp.keepalive_idle_secs",
            t.keepalive_idle_secs,
            0,
            MAX_TCP_KEEPALIVE_SECS,
        )?;
        if t.keepalive_idle_secs > 0 {
            in_range(
                "tcp.keepalive_interval_secs",
                t.keepalive_interval_secs,
                1,
                MAX_TCP_KEEPALIVE_SECS,
            )?;
            in_range(
                "tcp.keepalive_retries",
                t.keepalive_retries,
                1,
                MAX_TCP_KEEPALIVE_RETRIES,
            )?;
        }
        // TCP_USER_TIMEOUT is an unsigned int of milliseconds.
        in_range(
            "tcp.user_timeout_secs",
            t.user_timeout_secs,
            0,
            u32::MAX / 1000,
        )
    }
}
