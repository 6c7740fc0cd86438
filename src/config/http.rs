//! `[http]`: the push API's listener, its tokens or tokenless networks, its request
//! limits, and the business pool that serves it. That its port is not MQTT's is a
//! cross-section rule, checked in `config/mod.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{at_least, in_range, invalid, ConfigError, Section, MAX_THREADS};

/// `[http]`: the push API and the business pool that serves it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Bearer tokens for `/v1/*`; empty = `/v1` answers only `tokenless_networks`.
    pub tokens: Vec<String>,
    /// With `tokens` empty: the source networks (CIDRs) whose requests `/v1` answers
    /// without a token; others get 403. Loopback by default.
    pub tokenless_networks: Vec<String>,
    /// With `tokens` empty: answer `/v1` from any source (logged loudly at startup).
    pub allow_remote_without_token: bool,
    /// Most HTTP connections open at once; beyond it new ones wait in the backlog, so
    /// half-sent requests cannot use up the file descriptors MQTT needs.
    pub max_connections: u32,
    /// Milliseconds a connection may take to send a request's headers (also the idle
    /// limit between keep-alive requests).
    pub header_timeout_ms: u32,
    /// Milliseconds a request may take to send its body.
    pub body_timeout_ms: u32,
    /// Milliseconds an answer may wait for the client to take any of it; then the
    /// connection is closed.
    pub write_timeout_ms: u32,
    /// Largest `POST /v1/push/batch` body, in bytes (never below one message's limit).
    pub max_batch_body_bytes: u32,
    /// Request bodies over 64 KiB read at once; more wait their turn.
    pub max_large_bodies: u32,
    /// 0 = one per available core; see [`Config::business_threads`].
    pub business_threads: usize,
    pub max_batch: u32,
    pub idempotency_window_secs: u32,
    /// Longest a request waits for a shard's answer (which, for `queued`, includes the
    /// store's commit), in milliseconds.
    pub answer_timeout_ms: u32,
    /// Most entries on one page of `GET /v1/clients` and `GET /v1/retained` (`limit`).
    pub list_max_limit: u32,
    /// Most keys (client ids, retained topics) one shard looks at for one page; a page
    /// whose filter skips more ends early with a cursor to go on from.
    pub list_scan_max: u32,
    /// A shard stops adding retained messages to a page once their payloads take this
    /// many bytes (a page always holds at least one).
    pub list_page_bytes: u32,
}

impl HttpConfig {
    /// `answer_timeout_ms` as a duration.
    pub fn answer_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.answer_timeout_ms))
    }
}

impl Section for HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let h = self;
        for (i, token) in h.tokens.iter().enumerate() {
            // A token travels in an HTTP header; whitespace or control bytes cannot match.
            if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    &format!("http.tokens[{i}]"),
                    "a token must be non-empty, without spaces or control characters".to_string(),
                ));
            }
        }
        for (i, net) in h.tokenless_networks.iter().enumerate() {
            crate::http::Network::parse(net)
                .map_err(|e| invalid(&format!("http.tokenless_networks[{i}]"), e))?;
        }
        in_range("http.max_connections", h.max_connections, 1, 1_000_000)?;
        in_range("http.header_timeout_ms", h.header_timeout_ms, 100, 600_000)?;
        in_range("http.body_timeout_ms", h.body_timeout_ms, 100, 600_000)?;
        in_range("http.write_timeout_ms", h.write_timeout_ms, 100, 600_000)?;
        at_least("http.max_batch_body_bytes", h.max_batch_body_bytes, 65_536)?;
        in_range("http.max_large_bodies", h.max_large_bodies, 1, 100_000)?;
        in_range("http.business_threads", h.business_threads, 0, MAX_THREADS)?;
        at_least("http.max_batch", h.max_batch, 1)?;
        in_range("http.answer_timeout_ms", h.answer_timeout_ms, 100, 600_000)?;
        in_range("http.list_max_limit", h.list_max_limit, 1, 100_000)?;
        in_range("http.list_scan_max", h.list_scan_max, 1, 10_000_000)?;
        at_least("http.list_page_bytes", h.list_page_bytes, 1)
    }
}
