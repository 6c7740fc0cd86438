//! `[mqtt]`: the MQTT listeners (plain, TLS, PROXY, WebSocket) and the protocol limits
//! they enforce.
//!
//! MQTT's 16-bit quantities (keep-alive, Receive Maximum, window, topic aliases, client
//! id and topic lengths) are `u16` here, as the protocol and the shard use them, so a
//! value the protocol cannot carry is refused while the file is read, naming its key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    at_least, empty_addr_as_none, empty_path_as_none, in_range, invalid, listeners_collide,
    ConfigError, Section, MIN_CLIENT_ID_LEN, MIN_PACKET_SIZE, MQTT_MAX_PACKET_SIZE,
};

/// `[mqtt]`: the MQTT listener and the protocol limits it enforces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    /// Bytes, whole packet; also announced as the v5 Maximum Packet Size.
    pub max_packet_size: u32,
    pub max_client_id_len: u16,
    pub connect_timeout_secs: u32,
    pub max_keepalive_secs: u16,
    /// What a CONNECT with keep-alive 0 gets.
    pub keepalive_zero: KeepaliveZero,
    pub keepalive_jitter_pct: u8,
    pub duplicate_client_id: DuplicateClientId,
    pub max_connections: u32,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub max_queued_messages: u32,
    pub max_session_expiry_secs: u32,
    pub write_stall_timeout_secs: u32,
    /// After the gateway ends a connection with something to say (a DISCONNECT, a
    /// refusing CONNACK, pending output), how long it keeps reading and discarding before
    /// it closes, so the client's late packets do not reset the socket (0 = no grace).
    pub close_grace_ms: u32,
    /// The most bytes discarded in that grace before the socket is closed anyway.
    pub close_grace_bytes: u32,
    /// Whether a graceful stop publishes the wills of the devices it disconnects (and
    /// the delayed wills of offline sessions), early if they have a delay.
    pub wills_on_stop: bool,
    pub retain_available: bool,
    pub max_retained_messages: u32,
    /// Bytes (topic + payload) of all retained messages; 0 = no bound.
    pub max_retained_bytes: u64,
    /// Bytes of the retained messages one client set; 0 = no bound.
    pub max_retained_bytes_per_client: u64,
    /// Topic Alias Maximum announced to MQTT 5 clients (0 = none accepted).
    pub topic_alias_maximum: u16,
    /// Outbound topic aliases per connection, least recently used replaced (0 = never
    /// assign; the client's own Topic Alias Maximum caps it).
    pub outbound_topic_aliases: u16,
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
    /// Issue TLS session tickets, so a reconnecting device resumes (no full handshake).
    pub tls_session_tickets: bool,
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
    /// Longest topic name or filter accepted, in bytes (at least 1).
    pub max_topic_len: u16,
    /// Most subscriptions one session may hold (at least 1).
    pub max_subscriptions_per_client: u32,
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

impl MqttConfig {
    /// `connect_timeout_secs` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.connect_timeout_secs))
    }
}

impl Section for MqttConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        validate_protocol(self)?;
        validate_tls_and_proxy(self)?;
        validate_ws(self)?;
        validate_client_certs(self)
    }
}

/// The protocol limits: sizes, timeouts, windows. The 16-bit ones need only a lower bound.
fn validate_protocol(m: &MqttConfig) -> Result<(), ConfigError> {
    in_range(
        "mqtt.max_packet_size",
        m.max_packet_size,
        MIN_PACKET_SIZE,
        MQTT_MAX_PACKET_SIZE,
    )?;
    at_least(
        "mqtt.max_client_id_len",
        m.max_client_id_len,
        MIN_CLIENT_ID_LEN,
    )?;
    at_least("mqtt.connect_timeout_secs", m.connect_timeout_secs, 1)?;
    at_least("mqtt.max_keepalive_secs", m.max_keepalive_secs, 1)?;
    in_range("mqtt.keepalive_jitter_pct", m.keepalive_jitter_pct, 0, 50)?;
    at_least("mqtt.max_connections", m.max_connections, 1)?;
    at_least("mqtt.receive_maximum", m.receive_maximum, 1)?;
    at_least("mqtt.max_inflight", m.max_inflight, 1)?;
    at_least(
        "mqtt.write_stall_timeout_secs",
        m.write_stall_timeout_secs,
        1,
    )?;
    in_range("mqtt.close_grace_ms", m.close_grace_ms, 0, 60_000)?;
    in_range("mqtt.close_grace_bytes", m.close_grace_bytes, 0, 16 << 20)?;
    at_least("mqtt.max_topic_len", m.max_topic_len, 1)?;
    at_least(
        "mqtt.max_subscriptions_per_client",
        m.max_subscriptions_per_client,
        1,
    )
}

/// TLS needs its certificate and its own port; PROXY needs trusted peers.
fn validate_tls_and_proxy(m: &MqttConfig) -> Result<(), ConfigError> {
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
    Ok(())
}

/// Asking for, or naming clients by, client certificates needs the CA that signs them.
fn validate_client_certs(m: &MqttConfig) -> Result<(), ConfigError> {
    for (key, on) in [
        ("mqtt.tls_require_client_cert", m.tls_require_client_cert),
        ("mqtt.use_cn_as_client_id", m.use_cn_as_client_id),
    ] {
        if on && m.tls_client_ca.is_none() {
            return Err(invalid(key, "needs mqtt.tls_client_ca".into()));
        }
    }
    Ok(())
}

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
