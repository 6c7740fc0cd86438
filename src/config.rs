//! Configuration: the typed form of `config/gateway.toml`, loading and validation.
//!
//! `config/gateway.toml` is both the documented reference and the compiled-in defaults
//! ([`DEFAULT_TOML`]). A user file is deep-merged over those defaults table by table, so
//! it only has to name what it changes; the merged table is then deserialized into
//! [`Config`] and checked by [`Config::validate`].
//!
//! Every mistake is reported with the key it concerns (`mqtt.listen`, `http.tokens[0]`),
//! because an operator editing a config for a million devices should never have to guess.
//! Unknown keys are errors rather than ignored: a misspelt `max_keepalive_sec` that
//! silently kept the default would be found only in production.
//!
//! Loading runs once at startup (and in `gateway check-config`); nothing here is on an
//! IO shard's path.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use toml::{Table, Value};

/// The reference configuration, compiled in as the defaults.
pub const DEFAULT_TOML: &str = include_str!("../config/gateway.toml");

/// Largest packet MQTT can express: a Remaining Length of 268,435,455 bytes.
pub const MQTT_MAX_PACKET_SIZE: u32 = 268_435_455;
/// Smallest `max_packet_size` accepted: room for a CONNECT with a short client id.
pub const MIN_PACKET_SIZE: u32 = 16;
/// MQTT requires servers to accept client ids of 1 to 23 bytes, so the cap cannot be lower.
pub const MIN_CLIENT_ID_LEN: u32 = 23;
/// Upper bound on `shards.count` and `http.business_threads`; more is a typo, not a machine.
pub const MAX_THREADS: usize = 1024;
/// Upper bound on `buffers.scratch_bytes`; each shard allocates it up front.
pub const MAX_SCRATCH_BYTES: u32 = 64 << 20;
/// Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at this many seconds.
pub const MAX_TCP_KEEPALIVE_SECS: u32 = 32_767;
/// Linux caps TCP_KEEPCNT at this many probes.
pub const MAX_TCP_KEEPALIVE_RETRIES: u8 = 127;

/// The whole gateway configuration, one field per section of `gateway.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub limits: LimitsConfig,
    pub tcp: TcpConfig,
    pub shards: ShardsConfig,
    pub buffers: BuffersConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub auth: crate::auth::AuthConfig,
    pub acl: crate::acl::AclConfig,
    pub store: StoreConfig,
    pub events: crate::events::EventsConfig,
}

/// `[mqtt]`: the MQTT listener and the protocol limits it enforces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    /// Bytes, whole packet; also announced as the v5 Maximum Packet Size.
    pub max_packet_size: u32,
    pub max_client_id_len: u32,
    pub connect_timeout_secs: u32,
    pub max_keepalive_secs: u32,
    /// What a CONNECT with keep-alive 0 gets.
    pub keepalive_zero: KeepaliveZero,
    pub keepalive_jitter_pct: u32,
    pub duplicate_client_id: DuplicateClientId,
    pub max_connections: u32,
    pub receive_maximum: u32,
    pub max_inflight: u32,
    pub max_queued_messages: u32,
    pub max_session_expiry_secs: u32,
    pub write_stall_timeout_secs: u32,
    /// After the gateway ends a connection with something to say (a DISCONNECT, a
    /// refusing CONNACK, pending output), how long it keeps reading and discarding before
    /// it closes, so the client's late packets do not reset the socket (0 = no grace).
    pub close_grace_ms: u32,
    /// The most bytes discarded in that grace before the socket is closed anyway.
    pub close_grace_bytes: u32,
    pub retain_available: bool,
    pub max_retained_messages: u32,
    /// Bytes (topic + payload) of all retained messages; 0 = no bound.
    pub max_retained_bytes: u64,
    /// Bytes of the retained messages one client set; 0 = no bound.
    pub max_retained_bytes_per_client: u64,
    /// Topic Alias Maximum announced to MQTT 5 clients (0..=65535; 0 = none accepted).
    pub topic_alias_maximum: u32,
    /// Outbound topic aliases per connection, least recently used replaced (0..=65535;
    /// 0 = never assign; the client's own Topic Alias Maximum caps it).
    pub outbound_topic_aliases: u32,
    /// The TLS listener; `None` (`""` in TOML) = no TLS.
    #[serde(deserialize_with = "empty_addr_as_none")]
    pub tls_listen: Option<SocketAddr>,
    #[serde(deserialize_with = "empty_path_as_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(deserialize_with = "empty_path_as_none")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle for client certificates; `None` = client certificates are not asked for.
    #[serde(deserialize_with = "empty_path_as_none")]
    pub tls_client_ca: Option<PathBuf>,
    pub tls_require_client_cert: bool,
    pub use_cn_as_client_id: bool,
    /// rustls `set_buffer_limit` per TLS connection, in bytes.
    pub tls_buffer_bytes: u32,
    /// Every connection starts with a PROXY protocol v1/v2 header.
    pub proxy_protocol: bool,
    pub proxy_header_max_bytes: u32,
    /// Peers (addresses / CIDR blocks) allowed to send a PROXY header.
    pub proxy_trusted: Vec<String>,
    /// The MQTT-over-WebSocket listener; `None` (`""` in TOML) = none.
    #[serde(deserialize_with = "empty_addr_as_none")]
    pub ws_listen: Option<SocketAddr>,
    /// The MQTT-over-WebSocket-over-TLS listener (the `tls_*` certificate); `None` = none.
    #[serde(deserialize_with = "empty_addr_as_none")]
    pub wss_listen: Option<SocketAddr>,
    /// The HTTP path of the WebSocket upgrade.
    pub ws_path: String,
    /// Origins a browser may connect from (`scheme://host[:port]`); empty = any.
    pub ws_allowed_origins: Vec<String>,
    /// Longest upgrade request accepted, in bytes.
    pub ws_max_handshake_bytes: u32,
    /// Longest topic name or filter accepted, in bytes (1..=65535).
    pub max_topic_len: u32,
    /// Most subscriptions one session may hold (at least 1).
    pub max_subscriptions_per_client: u32,
}

/// `[limits]`: overload protection (connect rate, handshakes, per-IP, inbound rate).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Accepts per second per shard; 0 = unlimited.
    pub max_connect_rate: u32,
    pub connect_burst: u32,
    /// Per shard; 0 = unlimited.
    pub max_handshaking: u32,
    /// Gateway-wide; 0 = unlimited.
    pub max_connections_per_ip: u32,
    /// PUBLISH packets per second per connection; 0 = unlimited.
    pub publish_rate: u32,
    pub publish_burst: u32,
    /// Inbound bytes per second per connection; 0 = unlimited.
    pub bytes_rate: u32,
    pub bytes_burst: u32,
}

/// What a client asking for keep-alive 0 ("no keep-alive") gets: `[mqtt] keepalive_zero`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepaliveZero {
    /// `max_keepalive_secs`, so a silent dead peer is found even without TCP keepalive
    /// (MQTT 5 clients are told in Server Keep Alive; 3.1.1 clients cannot be).
    Max,
    /// No keep-alive deadline, as MQTT 3.1.1 and 5 §3.1.2.10 say; dead peers are found
    /// only by TCP keepalive and `[tcp] user_timeout_secs`.
    Off,
}

impl KeepaliveZero {
    /// The keep-alive granted for `requested` seconds under the cap `max` (0 = none).
    pub fn granted(self, requested: u16, max: u16) -> u16 {
        match (requested, self) {
            (0, KeepaliveZero::Off) => 0,
            (0, KeepaliveZero::Max) => max,
            (r, _) => r.min(max),
        }
    }
}

/// What to do when a client id connects while a connection with that id is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DuplicateClientId {
    /// Close the old connection and keep the new one (the MQTT-specified behaviour).
    Takeover,
    /// Refuse the new connection.
    Reject,
}

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

/// `[shards]`: the IO threads and their timing wheels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardsConfig {
    /// 0 = one per available core; see [`Config::shard_count`].
    pub count: usize,
    pub mailbox_capacity: u32,
    pub tick_ms: u32,
    pub expiry_batch: u32,
    pub pin_cores: bool,
    pub drain_timeout_secs: u32,
}

/// `[buffers]`: the shard scratch buffer, the buffer pool and outbound queue limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuffersConfig {
    pub scratch_bytes: u32,
    pub pool_max_bytes: u64,
    pub pool_idle_secs: u32,
    pub outbound_high_watermark: u32,
    pub outbound_low_watermark: u32,
    pub slow_consumer: SlowConsumer,
    /// With `slow_consumer = "backpressure"`: the most output a connection holds.
    pub outbound_max_bytes: u32,
}

/// What a subscriber above its outbound high watermark costs (`[buffers] slow_consumer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Its QoS 0 messages are dropped; publishers never wait (the default).
    Drop,
    /// Its QoS 0 messages are still written (up to `outbound_max_bytes`) and PUBLISH
    /// packets are not read from any client until every subscriber is back under.
    Backpressure,
}

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
}

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

/// `[store]`: the durable store of persistent sessions, their messages and retained
/// messages (see `crate::store`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub enabled: bool,
    /// A directory; the database file `gateway.redb` is inside it.
    pub path: PathBuf,
    pub durability: StoreDurability,
    /// Most changes in one write transaction (one group commit).
    pub max_batch: u32,
    /// Extra milliseconds the writer waits to gather a bigger group (0 = commit at once).
    pub commit_interval_ms: u32,
    /// With `eventual`: milliseconds between the fsyncs that make commits durable.
    pub sync_interval_ms: u32,
    /// Shard batches the writer's channel holds before shards keep theirs for next turn.
    pub queue_batches: u32,
}

/// When a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDurability {
    /// Every commit is fsynced before anyone is told (a `queued` push is on disk).
    Immediate,
    /// Commits are not fsynced; an fsync follows within `sync_interval_ms`.
    Eventual,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

fn empty_path_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok(if s.is_empty() {
        None
    } else {
        Some(PathBuf::from(s))
    })
}

fn empty_addr_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not an address: {e}")))
}

/// Why a configuration could not be loaded.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML; `message` carries the line and column.
    Parse { path: PathBuf, message: String },
    /// A key that `gateway.toml` does not define. `known` lists the keys valid at that level.
    UnknownKey { key: String, known: Vec<String> },
    /// A key has the wrong type or a value outside its rules.
    Invalid { key: String, message: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Io { path, source } => {
                write!(f, "config error: cannot read {}: {source}", path.display())
            }
            ConfigError::Parse { path, message } => {
                write!(
                    f,
                    "config error: {} is not valid TOML: {}",
                    path.display(),
                    message.trim_end()
                )
            }
            ConfigError::UnknownKey { key, known } => {
                write!(f, "config error: unknown key `{key}` (")?;
                let last = key.rsplit('.').next().unwrap_or(key);
                if let Some(close) = known.iter().find(|k| edit_distance(k, last) <= 2) {
                    write!(f, "did you mean `{close}`? ")?;
                }
                write!(f, "known keys: {})", known.join(", "))
            }
            ConfigError::Invalid { key, message } if key.is_empty() => {
                write!(f, "config error: {message}")
            }
            ConfigError::Invalid { key, message } => {
                write!(f, "config error at key `{key}`: {message}")
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Default for Config {
    /// The embedded `config/gateway.toml`. It is valid by construction: the tests parse
    /// and validate it, so this cannot fail in a built binary.
    fn default() -> Self {
        match Config::from_table(Table::new()) {
            Ok(config) => config,
            Err(e) => panic!("the embedded config/gateway.toml is invalid: {e}"),
        }
    }
}

impl Config {
    /// Reads `path`, merges it over the defaults, and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Like [`Config::load`] for a TOML string: merged over the defaults, then validated.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("<string>"))
    }

    fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let user: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: origin.to_path_buf(),
                message: e.to_string(),
            })?;
        Config::from_table(user)
    }

    fn from_table(user: Table) -> Result<Config, ConfigError> {
        let mut merged: Table =
            DEFAULT_TOML
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: PathBuf::from("<embedded config/gateway.toml>"),
                    message: e.to_string(),
                })?;
        // The defaults name every key, so they double as the schema for unknown keys.
        reject_unknown_keys(&user, &merged, "")?;
        merge(&mut merged, user);
        let config: Config =
            serde_path_to_error::deserialize(Value::Table(merged)).map_err(deserialize_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules a type cannot express: ranges, and keys that must agree.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        in_range(
            "mqtt.max_packet_size",
            m.max_packet_size,
            MIN_PACKET_SIZE,
            MQTT_MAX_PACKET_SIZE,
        )?;
        in_range(
            "mqtt.max_client_id_len",
            m.max_client_id_len,
            MIN_CLIENT_ID_LEN,
            65_535,
        )?;
        at_least("mqtt.connect_timeout_secs", m.connect_timeout_secs, 1)?;
        in_range("mqtt.max_keepalive_secs", m.max_keepalive_secs, 1, 65_535)?;
        in_range("mqtt.keepalive_jitter_pct", m.keepalive_jitter_pct, 0, 50)?;
        at_least("mqtt.max_connections", m.max_connections, 1)?;
        in_range("mqtt.receive_maximum", m.receive_maximum, 1, 65_535)?;
        in_range("mqtt.max_inflight", m.max_inflight, 1, 65_535)?;
        in_range("mqtt.topic_alias_maximum", m.topic_alias_maximum, 0, 65_535)?;
        in_range(
            "mqtt.outbound_topic_aliases",
            m.outbound_topic_aliases,
            0,
            65_535,
        )?;
        at_least(
            "mqtt.write_stall_timeout_secs",
            m.write_stall_timeout_secs,
            1,
        )?;
        in_range("mqtt.close_grace_ms", m.close_grace_ms, 0, 60_000)?;
        in_range("mqtt.close_grace_bytes", m.close_grace_bytes, 0, 16 << 20)?;
        in_range("mqtt.max_topic_len", m.max_topic_len, 1, 65_535)?;
        at_least(
            "mqtt.max_subscriptions_per_client",
            m.max_subscriptions_per_client,
            1,
        )?;

        in_range("mqtt.tls_buffer_bytes", m.tls_buffer_bytes, 1024, 16 << 20)?;
        in_range(
            "mqtt.proxy_header_max_bytes",
            m.proxy_header_max_bytes,
            107,
            65_551,
        )?;
        crate::proxy::TrustedProxies::parse(&m.proxy_trusted)
            .map_err(|(i, e)| invalid(&format!("mqtt.proxy_trusted[{i}]"), e))?;
        if m.proxy_protocol && m.proxy_trusted.is_empty() {
            return Err(invalid(
                "mqtt.proxy_trusted",
                "proxy_protocol needs at least one trusted proxy address".into(),
            ));
        }
        if let Some(tls) = m.tls_listen {
            if m.tls_cert.is_none() {
                return Err(invalid(
                    "mqtt.tls_cert",
                    "required when mqtt.tls_listen is set".into(),
                ));
            }
            if m.tls_key.is_none() {
                return Err(invalid(
                    "mqtt.tls_key",
                    "required when mqtt.tls_listen is set".into(),
                ));
            }
            if listeners_collide(m.listen, tls) {
                return Err(invalid(
                    "mqtt.tls_listen",
                    format!("{tls} collides with mqtt.listen ({})", m.listen),
                ));
            }
        }
        validate_ws(m)?;
        for (key, on) in [
            ("mqtt.tls_require_client_cert", m.tls_require_client_cert),
            ("mqtt.use_cn_as_client_id", m.use_cn_as_client_id),
        ] {
            if on && m.tls_client_ca.is_none() {
                return Err(invalid(key, "needs mqtt.tls_client_ca".into()));
            }
        }
        let lim = &self.limits;
        for (key, rate, burst_key, burst) in [
            (
                "limits.max_connect_rate",
                lim.max_connect_rate,
                "limits.connect_burst",
                lim.connect_burst,
            ),
            (
                "limits.publish_rate",
                lim.publish_rate,
                "limits.publish_burst",
                lim.publish_burst,
            ),
            (
                "limits.bytes_rate",
                lim.bytes_rate,
                "limits.bytes_burst",
                lim.bytes_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return Err(invalid(
                    burst_key,
                    format!("must be at least 1 when {key} is set"),
                ));
            }
        }

        let t = &self.tcp;
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
        )?;

        let s = &self.shards;
        in_range("shards.count", s.count, 0, MAX_THREADS)?;
        at_least("shards.mailbox_capacity", s.mailbox_capacity, 1)?;
        in_range("shards.tick_ms", s.tick_ms, 100, 60_000)?;
        at_least("shards.expiry_batch", s.expiry_batch, 1)?;
        // A tick coarser than the shortest timeout would stretch that timeout to the tick.
        let shortest_timeout_ms = u64::from(m.connect_timeout_secs) * 1000;
        if u64::from(s.tick_ms) > shortest_timeout_ms {
            return Err(invalid(
                "shards.tick_ms",
                format!(
                    "{} ms is coarser than mqtt.connect_timeout_secs ({} ms), the shortest timeout it must time",
                    s.tick_ms, shortest_timeout_ms
                ),
            ));
        }

        let b = &self.buffers;
        in_range(
            "buffers.scratch_bytes",
            b.scratch_bytes,
            4096,
            MAX_SCRATCH_BYTES,
        )?;
        at_least(
            "buffers.outbound_high_watermark",
            b.outbound_high_watermark,
            1,
        )?;
        if b.outbound_low_watermark >= b.outbound_high_watermark {
            return Err(invalid(
                "buffers.outbound_low_watermark",
                format!(
                    "must be less than buffers.outbound_high_watermark ({}), got {}",
                    b.outbound_high_watermark, b.outbound_low_watermark
                ),
            ));
        }
        if b.outbound_max_bytes < b.outbound_high_watermark {
            return Err(invalid(
                "buffers.outbound_max_bytes",
                format!(
                    "must be at least buffers.outbound_high_watermark ({}), got {}",
                    b.outbound_high_watermark, b.outbound_max_bytes
                ),
            ));
        }

        let h = &self.http;
        if listeners_collide(m.listen, h.listen) {
            return Err(invalid(
                "http.listen",
                format!("{} collides with mqtt.listen ({})", h.listen, m.listen),
            ));
        }
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
        at_least("http.max_batch_body_bytes", h.max_batch_body_bytes, 65_536)?;
        in_range("http.max_large_bodies", h.max_large_bodies, 1, 100_000)?;
        in_range("http.business_threads", h.business_threads, 0, MAX_THREADS)?;
        at_least("http.max_batch", h.max_batch, 1)?;
        in_range("http.answer_timeout_ms", h.answer_timeout_ms, 100, 600_000)?;

        let l = &self.log;
        if l.level.trim().is_empty() {
            return Err(invalid(
                "log.level",
                "must not be empty (e.g. \"info\")".to_string(),
            ));
        }
        if let Some(file) = &l.file {
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
        at_least("log.queue_lines", l.queue_lines, 1)?;

        self.auth
            .validate()
            .map_err(|(key, message)| invalid(&key, message))?;
        let uses_webhook = self
            .auth
            .providers
            .contains(&crate::auth::ProviderKind::Http);
        if uses_webhook && u64::from(self.auth.http.timeout_ms) >= shortest_timeout_ms {
            // The connect timeout would close waiting clients before the webhook's
            // "server unavailable" could tell them to come back later.
            return Err(invalid(
                "auth.http.timeout_ms",
                format!(
                    "{} ms must be shorter than mqtt.connect_timeout_secs ({} ms)",
                    self.auth.http.timeout_ms, shortest_timeout_ms
                ),
            ));
        }
        crate::acl::Acl::from_config(&self.acl).map_err(|message| ConfigError::Invalid {
            key: "acl.rules".into(),
            message,
        })?;
        let st = &self.store;
        if st.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty".into()));
        }
        in_range("store.max_batch", st.max_batch, 1, 1_000_000)?;
        in_range("store.commit_interval_ms", st.commit_interval_ms, 0, 10_000)?;
        in_range("store.sync_interval_ms", st.sync_interval_ms, 1, 600_000)?;
        in_range("store.queue_batches", st.queue_batches, 1, 1_000_000)?;
        self.events
            .validate()
            .map_err(|(key, message)| invalid(&key, message))?;
        Ok(())
    }

    /// IO shards to start: `shards.count`, or one per available core when it is 0.
    pub fn shard_count(&self) -> usize {
        or_cores(self.shards.count)
    }

    /// Business pool threads: `http.business_threads`, or one per available core when 0.
    pub fn business_threads(&self) -> usize {
        or_cores(self.http.business_threads)
    }
}

fn or_cores(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

fn invalid(key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message,
    }
}

fn in_range<T: PartialOrd + fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

fn at_least<T: PartialOrd + fmt::Display>(key: &str, value: T, min: T) -> Result<(), ConfigError> {
    if value < min {
        return Err(invalid(key, format!("must be at least {min}, got {value}")));
    }
    Ok(())
}

/// Whether two listeners would fight over one port: same port, and the same address or
/// either one bound to every address. Port 0 asks the kernel for a free port, so never collides.
/// The WebSocket keys: a path, origins that are origins, listeners that need the TLS
/// certificate (wss) and do not collide with the other listeners.
fn validate_ws(m: &MqttConfig) -> Result<(), ConfigError> {
    let p = &m.ws_path;
    if !p.starts_with('/') || p.contains(|c: char| c == '?' || c == '#' || !c.is_ascii_graphic()) {
        return Err(invalid(
            "mqtt.ws_path",
            format!("{p:?} must be an absolute path like \"/mqtt\" (no query, no spaces)"),
        ));
    }
    if let Some(bad) = m.ws_allowed_origins.iter().find(|o| !is_origin(o)) {
        return Err(invalid(
            "mqtt.ws_allowed_origins",
            format!("{bad:?} is not an origin like \"https://dash.example.com\" or \"http://host:8080\""),
        ));
    }
    in_range(
        "mqtt.ws_max_handshake_bytes",
        m.ws_max_handshake_bytes,
        256,
        65_536,
    )?;
    if m.wss_listen.is_some() && (m.tls_cert.is_none() || m.tls_key.is_none()) {
        let key = if m.tls_cert.is_none() {
            "mqtt.tls_cert"
        } else {
            "mqtt.tls_key"
        };
        return Err(invalid(key, "required when mqtt.wss_listen is set".into()));
    }
    let others = [
        ("mqtt.listen", Some(m.listen)),
        ("mqtt.tls_listen", m.tls_listen),
    ];
    let ws = [
        ("mqtt.ws_listen", m.ws_listen),
        ("mqtt.wss_listen", m.wss_listen),
    ];
    for (i, (key, addr)) in ws.iter().enumerate() {
        let Some(addr) = addr else { continue };
        for (other, at) in others.iter().chain(&ws[..i]) {
            if let Some(at) = at.filter(|at| listeners_collide(*addr, *at)) {
                return Err(invalid(key, format!("{addr} collides with {other} ({at})")));
            }
        }
    }
    Ok(())
}

/// `scheme://host[:port]` as a browser sends it in `Origin`: no path, no spaces.
fn is_origin(o: &str) -> bool {
    match o.split_once("://") {
        Some((scheme, host)) => {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                && !host.is_empty()
                && !host.contains(|c: char| c == '/' || !c.is_ascii_graphic())
        }
        None => false,
    }
}

fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Fails on the first key in `user` that `defaults` does not have, naming its full path.
/// Only tables that are tables on both sides are descended into; a type clash (a table
/// where a value belongs) is left to deserialization, which names the key too.
fn reject_unknown_keys(user: &Table, defaults: &Table, prefix: &str) -> Result<(), ConfigError> {
    for (key, value) in user {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match defaults.get(key) {
            None => {
                return Err(ConfigError::UnknownKey {
                    key: path,
                    known: defaults.keys().cloned().collect(),
                })
            }
            Some(Value::Table(default_table)) => {
                if let Value::Table(user_table) = value {
                    reject_unknown_keys(user_table, default_table, &path)?;
                }
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Deep merge: tables merge key by key, anything else in `over` replaces what is in `base`.
fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_table)), Value::Table(over_table)) => {
                merge(base_table, over_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Turns a deserialization error into one that names the key. Unknown keys are caught
/// earlier by [`reject_unknown_keys`]; should one reach serde anyway, serde_path_to_error
/// 0.1.20 names it in full (`mqtt.lisen`), but a path that stops at the enclosing table
/// (`mqtt`) gets the field from serde's message appended, so the key is named either way.
fn deserialize_error(e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = e.path().to_string();
    // toml appends a line "in `mqtt.listen`"; the key is already named, so keep the first.
    let inner = e.inner().to_string();
    let message = inner.lines().next().unwrap_or_default().trim().to_string();
    let parent = if path == "." { String::new() } else { path };
    if let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        let named = parent == field || parent.ends_with(&format!(".{field}"));
        let key = if named {
            parent
        } else if parent.is_empty() {
            field.to_string()
        } else {
            format!("{parent}.{field}")
        };
        return ConfigError::Invalid { key, message };
    }
    ConfigError::Invalid {
        key: parent,
        message,
    }
}

/// Levenshtein distance, for the "did you mean" hint on unknown keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_key(toml: &str) -> String {
        match Config::from_toml_str(toml) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an Invalid error for {toml:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_parse_and_match_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.mqtt.listen, "0.0.0.0:1883".parse::<SocketAddr>().unwrap());
        assert_eq!(c.mqtt.max_packet_size, 1_048_576);
        assert_eq!(c.mqtt.max_client_id_len, 128);
        assert_eq!(c.mqtt.connect_timeout_secs, 10);
        assert_eq!(c.mqtt.max_keepalive_secs, 180);
        assert_eq!(c.mqtt.keepalive_jitter_pct, 0);
        assert_eq!(c.mqtt.duplicate_client_id, DuplicateClientId::Takeover);
        assert_eq!(c.mqtt.max_connections, 1_000_000);
        assert_eq!(c.mqtt.receive_maximum, 64);
        assert_eq!(c.mqtt.max_inflight, 32);
        assert_eq!(c.mqtt.max_queued_messages, 1000);
        assert_eq!(c.mqtt.max_session_expiry_secs, 604_800);
        assert_eq!(c.mqtt.write_stall_timeout_secs, 30);
        assert_eq!(c.mqtt.max_topic_len, 1024);
        assert_eq!(c.mqtt.max_subscriptions_per_client, 1000);
        assert!(c.mqtt.retain_available);
        assert_eq!(c.mqtt.max_retained_messages, 100_000);
        assert_eq!(c.mqtt.max_retained_bytes, 256 << 20);
        assert_eq!(c.mqtt.max_retained_bytes_per_client, 4 << 20);

        assert!(c.tcp.nodelay);
        assert_eq!(c.tcp.backlog, 4096);
        assert_eq!((c.tcp.send_buffer_bytes, c.tcp.recv_buffer_bytes), (0, 0));
        assert_eq!(c.tcp.keepalive_idle_secs, 120);
        assert_eq!(c.tcp.keepalive_interval_secs, 30);
        assert_eq!(c.tcp.keepalive_retries, 4);
        assert_eq!(c.tcp.user_timeout_secs, 60);

        assert_eq!(c.shards.count, 0);
        assert_eq!(c.shards.mailbox_capacity, 4096);
        assert_eq!(c.shards.tick_ms, 1000);
        assert_eq!(c.shards.expiry_batch, 1024);
        assert!(!c.shards.pin_cores);
        assert_eq!(c.shards.drain_timeout_secs, 5);

        assert_eq!(c.buffers.scratch_bytes, 65_536);
        assert_eq!(c.buffers.pool_max_bytes, 67_108_864);
        assert_eq!(c.buffers.pool_idle_secs, 30);
        assert_eq!(c.buffers.outbound_high_watermark, 65_536);
        assert_eq!(c.buffers.outbound_low_watermark, 16_384);
        assert_eq!(c.buffers.slow_consumer, SlowConsumer::Drop);
        assert_eq!(c.buffers.outbound_max_bytes, 4_194_304);

        assert_eq!(c.http.listen, "0.0.0.0:8080".parse::<SocketAddr>().unwrap());
        assert!(c.http.tokens.is_empty());
        assert_eq!(c.http.tokenless_networks, ["127.0.0.0/8", "::1/128"]);
        assert!(!c.http.allow_remote_without_token);
        assert_eq!(c.http.max_connections, 1024);
        assert_eq!(c.http.header_timeout_ms, 10_000);
        assert_eq!(c.http.body_timeout_ms, 30_000);
        assert_eq!(c.http.max_batch_body_bytes, 67_108_864);
        assert_eq!(c.http.max_large_bodies, 4);
        assert_eq!(c.http.business_threads, 2);
        assert_eq!(c.http.max_batch, 1000);
        assert_eq!(c.http.idempotency_window_secs, 300);
        assert_eq!(c.http.answer_timeout_ms, 10_000);

        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.file, None);
        assert_eq!(c.log.queue_lines, 65_536);
    }

    #[test]
    fn every_default_key_is_documented_by_a_comment() {
        // The reference file must explain each key: the line before it, or the line before
        // a run of related keys, is a comment.
        let lines: Vec<&str> = DEFAULT_TOML.lines().map(str::trim).collect();
        for (i, line) in lines.iter().enumerate() {
            if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            let documented = lines[..i]
                .iter()
                .rev()
                .take_while(|l| !l.is_empty())
                .any(|l| l.starts_with('#'));
            assert!(documented, "key line without a comment: {line}");
        }
    }

    #[test]
    fn a_partial_file_changes_only_what_it_names() {
        let c = Config::from_toml_str(
            "[mqtt]\nmax_keepalive_secs = 60\n[http]\ntokens = [\"abc\"]\n[log]\nfile = \"/var/log/gw/gateway.log\"\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.max_keepalive_secs, 60);
        assert_eq!(c.http.tokens, vec!["abc".to_string()]);
        assert_eq!(c.log.file, Some(PathBuf::from("/var/log/gw/gateway.log")));
        // Neighbours in the same sections keep their defaults.
        assert_eq!(c.mqtt.listen.port(), 1883);
        assert_eq!(c.mqtt.max_packet_size, 1_048_576);
        assert_eq!(c.http.listen.port(), 8080);
        assert_eq!(c.log.level, "info");
        assert_eq!(c.tcp.backlog, 4096);
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.mqtt.max_keepalive_secs, 180);
        assert_eq!(c.shards.tick_ms, 1000);
    }

    #[test]
    fn an_unknown_key_in_any_section_is_named_with_its_path() {
        for section in ["mqtt", "tcp", "shards", "buffers", "http", "log"] {
            let err = Config::from_toml_str(&format!("[{section}]\nbogus_key = 1\n")).unwrap_err();
            match &err {
                ConfigError::UnknownKey { key, known } => {
                    assert_eq!(key, &format!("{section}.bogus_key"));
                    assert!(!known.is_empty());
                }
                other => panic!("expected UnknownKey, got {other:?}"),
            }
            assert!(
                err.to_string().contains(&format!("`{section}.bogus_key`")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_misspelt_key_is_named_and_the_right_one_suggested() {
        let err = Config::from_toml_str("[mqtt]\nlisen = \"0.0.0.0:1\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("config error: unknown key `mqtt.lisen`"),
            "{text}"
        );
        assert!(
            text.contains("(did you mean `listen`? known keys: "),
            "{text}"
        );
        assert!(
            text.contains("max_packet_size"),
            "known keys are listed: {text}"
        );
    }

    #[test]
    fn an_unknown_section_is_named() {
        let err = Config::from_toml_str("[mqttt]\nlisten = \"0.0.0.0:1\"\n").unwrap_err();
        match &err {
            ConfigError::UnknownKey { key, known } => {
                assert_eq!(key, "mqttt");
                assert!(known.contains(&"mqtt".to_string()));
            }
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        let err = Config::from_toml_str("top_level = 1\n").unwrap_err();
        assert!(err.to_string().contains("`top_level`"), "{err}");
    }

    #[test]
    fn serde_unknown_field_errors_name_the_full_path() {
        // The fallback for keys the struct lacks, bypassing reject_unknown_keys.
        let mut table: Table = DEFAULT_TOML.parse().unwrap();
        if let Some(Value::Table(mqtt)) = table.get_mut("mqtt") {
            mqtt.insert("lisen".into(), Value::Integer(1));
        }
        let err = serde_path_to_error::deserialize::<_, Config>(Value::Table(table)).unwrap_err();
        match deserialize_error(err) {
            ConfigError::Invalid { key, message } => {
                assert_eq!(key, "mqtt.lisen");
                assert!(message.contains("unknown field"), "{message}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let err = Config::from_toml_str("[mqtt]\nmax_packet_size = \"big\"\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "mqtt.max_packet_size"),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("config error at key `mqtt.max_packet_size`:"),
            "{err}"
        );
        assert_eq!(invalid_key("[tcp]\nnodelay = 1\n"), "tcp.nodelay");
        assert_eq!(invalid_key("[http]\ntokens = \"abc\"\n"), "http.tokens");
        assert_eq!(
            invalid_key("[http]\ntokens = [\"a\", 2]\n"),
            "http.tokens[1]"
        );
        assert_eq!(invalid_key("mqtt = 5\n"), "mqtt");
        assert_eq!(invalid_key("[mqtt.listen]\nport = 1\n"), "mqtt.listen");
    }

    #[test]
    fn negative_and_oversized_integers_name_the_key() {
        assert_eq!(
            invalid_key("[mqtt]\nmax_connections = -1\n"),
            "mqtt.max_connections"
        );
        assert_eq!(
            invalid_key("[mqtt]\nmax_keepalive_secs = 5000000000\n"),
            "mqtt.max_keepalive_secs"
        );
    }

    #[test]
    fn a_bad_address_names_mqtt_listen() {
        let err = Config::from_toml_str("[mqtt]\nlisten = \"not an address\"\n").unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            "config error at key `mqtt.listen`: invalid socket address syntax"
        );
        assert_eq!(invalid_key("[http]\nlisten = \"0.0.0.0\"\n"), "http.listen");
    }

    #[test]
    fn enums_accept_only_their_names() {
        assert_eq!(
            invalid_key("[mqtt]\nduplicate_client_id = \"x\"\n"),
            "mqtt.duplicate_client_id"
        );
        assert_eq!(
            invalid_key("[mqtt]\nduplicate_client_id = \"Takeover\"\n"),
            "mqtt.duplicate_client_id"
        );
        assert_eq!(
            invalid_key("[mqtt]\nkeepalive_zero = \"never\"\n"),
            "mqtt.keepalive_zero"
        );
        let c = Config::from_toml_str("[mqtt]\nduplicate_client_id = \"reject\"\n").unwrap();
        assert_eq!(c.mqtt.duplicate_client_id, DuplicateClientId::Reject);
        assert_eq!(invalid_key("[log]\nformat = \"xml\"\n"), "log.format");
        let c = Config::from_toml_str("[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn invalid_toml_is_a_parse_error_with_a_position() {
        let err = Config::from_toml_str("[mqtt\nlisten = 1").unwrap_err();
        match &err {
            ConfigError::Parse { message, .. } => assert!(message.contains("line 1"), "{message}"),
            other => panic!("expected Parse, got {other:?}"),
        }
    }

    #[test]
    fn load_reads_a_file_and_names_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("gateway-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "[shards]\ncount = 3\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.shards.count, 3);
        assert_eq!(c.shard_count(), 3);

        std::fs::write(&path, "[shards]\ncount = \"x\"\n").unwrap();
        assert!(
            matches!(Config::load(&path), Err(ConfigError::Invalid { key, .. }) if key == "shards.count")
        );

        let missing = dir.join("missing.toml");
        match Config::load(&missing) {
            Err(e @ ConfigError::Io { .. }) => {
                assert!(e.to_string().contains("missing.toml"), "{e}")
            }
            other => panic!("expected Io, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn thread_counts_fall_back_to_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let c =
            Config::from_toml_str("[shards]\ncount = 0\n[http]\nbusiness_threads = 0\n").unwrap();
        assert_eq!(c.shard_count(), cores);
        assert_eq!(c.business_threads(), cores);
        let c = Config::from_toml_str("[http]\nbusiness_threads = 5\n").unwrap();
        assert_eq!(c.business_threads(), 5);
    }

    /// Each validation rule: the boundary that passes, and the first value that fails
    /// with the key it concerns.
    #[test]
    fn validate_rules_name_their_keys() {
        let ok = |toml: &str| {
            if let Err(e) = Config::from_toml_str(toml) {
                panic!("{toml:?} should be valid: {e}");
            }
        };
        let cases: &[(&str, &str, &str)] = &[
            (
                "[mqtt]\nmax_packet_size = 16",
                "[mqtt]\nmax_packet_size = 15",
                "mqtt.max_packet_size",
            ),
            (
                "[mqtt]\nmax_packet_size = 268435455",
                "[mqtt]\nmax_packet_size = 268435456",
                "mqtt.max_packet_size",
            ),
            (
                "[mqtt]\nmax_client_id_len = 23",
                "[mqtt]\nmax_client_id_len = 22",
                "mqtt.max_client_id_len",
            ),
            (
                "[mqtt]\nmax_client_id_len = 65535",
                "[mqtt]\nmax_client_id_len = 65536",
                "mqtt.max_client_id_len",
            ),
            (
                "[mqtt]\nclose_grace_ms = 60000",
                "[mqtt]\nclose_grace_ms = 60001",
                "mqtt.close_grace_ms",
            ),
            (
                "[mqtt]\nclose_grace_bytes = 16777216",
                "[mqtt]\nclose_grace_bytes = 16777217",
                "mqtt.close_grace_bytes",
            ),
            (
                "[mqtt]\nconnect_timeout_secs = 1",
                "[mqtt]\nconnect_timeout_secs = 0",
                "mqtt.connect_timeout_secs",
            ),
            (
                "[mqtt]\nmax_keepalive_secs = 1",
                "[mqtt]\nmax_keepalive_secs = 0",
                "mqtt.max_keepalive_secs",
            ),
            (
                "[mqtt]\nmax_keepalive_secs = 65535",
                "[mqtt]\nmax_keepalive_secs = 65536",
                "mqtt.max_keepalive_secs",
            ),
            (
                "[mqtt]\nkeepalive_jitter_pct = 50",
                "[mqtt]\nkeepalive_jitter_pct = 51",
                "mqtt.keepalive_jitter_pct",
            ),
            (
                "[mqtt]\nmax_connections = 1",
                "[mqtt]\nmax_connections = 0",
                "mqtt.max_connections",
            ),
            (
                "[mqtt]\ntopic_alias_maximum = 65535",
                "[mqtt]\ntopic_alias_maximum = 65536",
                "mqtt.topic_alias_maximum",
            ),
            (
                "[mqtt]\noutbound_topic_aliases = 0",
                "[mqtt]\noutbound_topic_aliases = 65536",
                "mqtt.outbound_topic_aliases",
            ),
            (
                "[mqtt]\nreceive_maximum = 1",
                "[mqtt]\nreceive_maximum = 0",
                "mqtt.receive_maximum",
            ),
            (
                "[mqtt]\nreceive_maximum = 65535",
                "[mqtt]\nreceive_maximum = 65536",
                "mqtt.receive_maximum",
            ),
            (
                "[mqtt]\nmax_inflight = 1",
                "[mqtt]\nmax_inflight = 0",
                "mqtt.max_inflight",
            ),
            (
                "[mqtt]\nmax_inflight = 65535",
                "[mqtt]\nmax_inflight = 65536",
                "mqtt.max_inflight",
            ),
            (
                "[mqtt]\nwrite_stall_timeout_secs = 1",
                "[mqtt]\nwrite_stall_timeout_secs = 0",
                "mqtt.write_stall_timeout_secs",
            ),
            (
                "[mqtt]\nmax_topic_len = 1",
                "[mqtt]\nmax_topic_len = 0",
                "mqtt.max_topic_len",
            ),
            (
                "[mqtt]\nmax_topic_len = 65535",
                "[mqtt]\nmax_topic_len = 65536",
                "mqtt.max_topic_len",
            ),
            (
                "[mqtt]\nmax_subscriptions_per_client = 1",
                "[mqtt]\nmax_subscriptions_per_client = 0",
                "mqtt.max_subscriptions_per_client",
            ),
            ("[tcp]\nbacklog = 1", "[tcp]\nbacklog = 0", "tcp.backlog"),
            (
                "[tcp]\naccept_retry_ms = 10000",
                "[tcp]\naccept_retry_ms = 0",
                "tcp.accept_retry_ms",
            ),
            (
                "[tcp]\nbacklog = 2147483647",
                "[tcp]\nbacklog = 2147483648",
                "tcp.backlog",
            ),
            (
                "[tcp]\nsend_buffer_bytes = 2147483647",
                "[tcp]\nsend_buffer_bytes = 2147483648",
                "tcp.send_buffer_bytes",
            ),
            (
                "[tcp]\nrecv_buffer_bytes = 2147483647",
                "[tcp]\nrecv_buffer_bytes = 2147483648",
                "tcp.recv_buffer_bytes",
            ),
            (
                "[tcp]\nkeepalive_idle_secs = 32767",
                "[tcp]\nkeepalive_idle_secs = 32768",
                "tcp.keepalive_idle_secs",
            ),
            (
                "[tcp]\nkeepalive_interval_secs = 1",
                "[tcp]\nkeepalive_interval_secs = 0",
                "tcp.keepalive_interval_secs",
            ),
            (
                "[tcp]\nkeepalive_retries = 127",
                "[tcp]\nkeepalive_retries = 128",
                "tcp.keepalive_retries",
            ),
            (
                "[tcp]\nuser_timeout_secs = 4294967",
                "[tcp]\nuser_timeout_secs = 4294968",
                "tcp.user_timeout_secs",
            ),
            (
                "[shards]\ncount = 1024",
                "[shards]\ncount = 1025",
                "shards.count",
            ),
            (
                "[shards]\nmailbox_capacity = 1",
                "[shards]\nmailbox_capacity = 0",
                "shards.mailbox_capacity",
            ),
            (
                "[shards]\ntick_ms = 100",
                "[shards]\ntick_ms = 99",
                "shards.tick_ms",
            ),
            (
                "[shards]\nexpiry_batch = 1",
                "[shards]\nexpiry_batch = 0",
                "shards.expiry_batch",
            ),
            (
                "[buffers]\nscratch_bytes = 4096",
                "[buffers]\nscratch_bytes = 4095",
                "buffers.scratch_bytes",
            ),
            (
                "[buffers]\nscratch_bytes = 67108864",
                "[buffers]\nscratch_bytes = 67108865",
                "buffers.scratch_bytes",
            ),
            (
                "[buffers]\noutbound_low_watermark = 65535",
                "[buffers]\noutbound_low_watermark = 65536",
                "buffers.outbound_low_watermark",
            ),
            (
                "[http]\ntokens = [\"t0k3n\"]",
                "[http]\ntokens = [\"ok\", \"\"]",
                "http.tokens[1]",
            ),
            (
                "[http]\ntokens = [\"a-b_c.d\"]",
                "[http]\ntokens = [\"has space\"]",
                "http.tokens[0]",
            ),
            (
                "[http]\ntokenless_networks = [\"10.0.0.0/8\", \"::1\"]",
                "[http]\ntokenless_networks = [\"::1\", \"10.0.0.0/33\"]",
                "http.tokenless_networks[1]",
            ),
            (
                "[http]\nmax_connections = 1",
                "[http]\nmax_connections = 0",
                "http.max_connections",
            ),
            (
                "[http]\nheader_timeout_ms = 100",
                "[http]\nheader_timeout_ms = 99",
                "http.header_timeout_ms",
            ),
            (
                "[http]\nmax_large_bodies = 1",
                "[http]\nmax_large_bodies = 0",
                "http.max_large_bodies",
            ),
            (
                "[http]\nmax_batch_body_bytes = 65536",
                "[http]\nmax_batch_body_bytes = 65535",
                "http.max_batch_body_bytes",
            ),
            (
                "[http]\nbody_timeout_ms = 600000",
                "[http]\nbody_timeout_ms = 600001",
                "http.body_timeout_ms",
            ),
            (
                "[http]\nbusiness_threads = 1024",
                "[http]\nbusiness_threads = 1025",
                "http.business_threads",
            ),
            (
                "[http]\nmax_batch = 1",
                "[http]\nmax_batch = 0",
                "http.max_batch",
            ),
            (
                "[log]\nlevel = \"warn\"",
                "[log]\nlevel = \" \"",
                "log.level",
            ),
            (
                "[log]\nfile = \"gateway.log\"",
                "[log]\nfile = \"/var/log/..\"",
                "log.file",
            ),
            (
                "[log]\nqueue_lines = 1",
                "[log]\nqueue_lines = 0",
                "log.queue_lines",
            ),
        ];
        for (good, bad, key) in cases {
            ok(good);
            assert_eq!(invalid_key(bad), *key, "for {bad:?}");
        }
    }

    #[test]
    fn websocket_keys() {
        let c = Config::default();
        assert!(c.mqtt.ws_listen.is_none() && c.mqtt.wss_listen.is_none());
        assert_eq!(c.mqtt.ws_path, "/mqtt");
        assert!(c.mqtt.ws_allowed_origins.is_empty());
        assert_eq!(c.mqtt.ws_max_handshake_bytes, 8192);
        let c = Config::from_toml_str(
            "[mqtt]\nws_listen = \"127.0.0.1:8083\"\nws_path = \"/ws/mqtt\"\n\
             ws_allowed_origins = [\"https://dash.example.com\", \"http://localhost:8080\"]\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.ws_listen, Some("127.0.0.1:8083".parse().unwrap()));
        assert_eq!(c.mqtt.ws_allowed_origins.len(), 2);
        let wss = "[mqtt]\nwss_listen = \"127.0.0.1:8084\"\n";
        Config::from_toml_str(&format!("{wss}tls_cert = \"c\"\ntls_key = \"k\"\n")).unwrap();
        let cases = [
            (wss.to_string(), "mqtt.tls_cert"),
            (format!("{wss}tls_cert = \"c\"\n"), "mqtt.tls_key"),
            ("[mqtt]\nws_listen = \"nope\"\n".into(), "mqtt.ws_listen"),
            (
                "[mqtt]\nws_listen = \"0.0.0.0:1883\"\n".into(),
                "mqtt.ws_listen",
            ),
            (
                "[mqtt]\nws_listen = \"127.0.0.1:8083\"\nwss_listen = \"0.0.0.0:8083\"\n\
                 tls_cert = \"c\"\ntls_key = \"k\"\n"
                    .into(),
                "mqtt.wss_listen",
            ),
            ("[mqtt]\nws_path = \"mqtt\"\n".into(), "mqtt.ws_path"),
            ("[mqtt]\nws_path = \"/mqtt?x=1\"\n".into(), "mqtt.ws_path"),
            ("[mqtt]\nws_path = \"/a b\"\n".into(), "mqtt.ws_path"),
            (
                "[mqtt]\nws_allowed_origins = [\"dash.example.com\"]\n".into(),
                "mqtt.ws_allowed_origins",
            ),
            (
                "[mqtt]\nws_allowed_origins = [\"https://dash.example.com/\"]\n".into(),
                "mqtt.ws_allowed_origins",
            ),
            (
                "[mqtt]\nws_max_handshake_bytes = 100\n".into(),
                "mqtt.ws_max_handshake_bytes",
            ),
        ];
        for (toml, key) in cases {
            assert_eq!(invalid_key(&toml), key, "for {toml:?}");
        }
    }

    #[test]
    fn tls_proxy_and_limits_keys() {
        let c = Config::default();
        assert!(c.mqtt.tls_listen.is_none() && c.mqtt.tls_client_ca.is_none());
        assert!(!c.mqtt.proxy_protocol);
        let c = Config::from_toml_str(
            "[mqtt]\ntls_listen = \"127.0.0.1:8883\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.tls_listen, Some("127.0.0.1:8883".parse().unwrap()));
        assert_eq!(
            invalid_key("[mqtt]\ntls_listen = \"127.0.0.1:8883\"\ntls_key = \"k.pem\"\n"),
            "mqtt.tls_cert"
        );
        assert_eq!(
            invalid_key("[mqtt]\ntls_listen = \"127.0.0.1:8883\"\ntls_cert = \"c.pem\"\n"),
            "mqtt.tls_key"
        );
        assert_eq!(
            invalid_key("[mqtt]\ntls_listen = \"nope\"\n"),
            "mqtt.tls_listen"
        );
        assert_eq!(
            invalid_key(
                "[mqtt]\ntls_listen = \"0.0.0.0:1883\"\ntls_cert = \"c\"\ntls_key = \"k\"\n"
            ),
            "mqtt.tls_listen"
        );
        assert_eq!(
            invalid_key("[mqtt]\nuse_cn_as_client_id = true\n"),
            "mqtt.use_cn_as_client_id"
        );
        assert_eq!(
            invalid_key("[mqtt]\ntls_require_client_cert = true\n"),
            "mqtt.tls_require_client_cert"
        );
        assert_eq!(
            invalid_key("[mqtt]\nproxy_header_max_bytes = 100\n"),
            "mqtt.proxy_header_max_bytes"
        );
        assert_eq!(
            invalid_key("[mqtt]\nproxy_trusted = [\"::1\", \"10.0.0.0/33\"]\n"),
            "mqtt.proxy_trusted[1]"
        );
        assert_eq!(
            invalid_key("[mqtt]\nproxy_protocol = true\nproxy_trusted = []\n"),
            "mqtt.proxy_trusted"
        );
        assert_eq!(
            invalid_key("[mqtt]\ntls_buffer_bytes = 10\n"),
            "mqtt.tls_buffer_bytes"
        );
        assert_eq!(
            invalid_key("[limits]\npublish_rate = 5\npublish_burst = 0\n"),
            "limits.publish_burst"
        );
        assert_eq!(
            invalid_key("[limits]\nmax_connect_rate = 5\nconnect_burst = 0\n"),
            "limits.connect_burst"
        );
        Config::from_toml_str("[limits]\nbytes_rate = 0\nbytes_burst = 0\n").unwrap();
    }

    #[test]
    fn validate_cross_field_rules() {
        // Keepalive interval and retries only matter when keepalive is on.
        Config::from_toml_str(
            "[tcp]\nkeepalive_idle_secs = 0\nkeepalive_interval_secs = 0\nkeepalive_retries = 0\n",
        )
        .unwrap();
        assert_eq!(
            invalid_key("[tcp]\nkeepalive_retries = 0\n"),
            "tcp.keepalive_retries"
        );

        // The wheel must be finer than the shortest timeout.
        Config::from_toml_str("[shards]\ntick_ms = 10000\n").unwrap();
        assert_eq!(invalid_key("[shards]\ntick_ms = 10001\n"), "shards.tick_ms");
        Config::from_toml_str("[shards]\ntick_ms = 20000\n[mqtt]\nconnect_timeout_secs = 20\n")
            .unwrap();

        // The low watermark must sit below the high one, whichever of them is moved.
        assert_eq!(
            invalid_key("[buffers]\noutbound_high_watermark = 16384\n"),
            "buffers.outbound_low_watermark"
        );
        Config::from_toml_str("[buffers]\noutbound_high_watermark = 16385\n").unwrap();
        assert_eq!(
            invalid_key("[buffers]\noutbound_max_bytes = 65535\n"),
            "buffers.outbound_max_bytes"
        );
        let c = Config::from_toml_str("[buffers]\nslow_consumer = \"backpressure\"\n").unwrap();
        assert_eq!(c.buffers.slow_consumer, SlowConsumer::Backpressure);

        // The two listeners must not claim the same port.
        assert_eq!(
            invalid_key("[http]\nlisten = \"0.0.0.0:1883\"\n"),
            "http.listen"
        );
        assert_eq!(
            invalid_key("[http]\nlisten = \"127.0.0.1:1883\"\n"),
            "http.listen"
        );
        assert_eq!(
            invalid_key("[mqtt]\nlisten = \"[::]:8080\"\n"),
            "http.listen"
        );
        Config::from_toml_str(
            "[mqtt]\nlisten = \"127.0.0.1:7000\"\n[http]\nlisten = \"127.0.0.2:7000\"\n",
        )
        .unwrap();
        Config::from_toml_str(
            "[mqtt]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        )
        .unwrap();
    }

    #[test]
    fn validate_on_a_modified_struct() {
        let mut c = Config::default();
        c.validate().unwrap();
        c.mqtt.keepalive_jitter_pct = 51;
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid { key, .. }) if key == "mqtt.keepalive_jitter_pct")
        );
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("max_inflight", "max_inflihgt"), 2);
        assert_eq!(edit_distance("max_inflight", "max_inflite"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
