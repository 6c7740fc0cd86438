//! The shard's settings: every configuration value a shard uses, read from the config
//! once when the shard starts, in the types and units the shard works in (durations in
//! wheel ticks, MQTT 16-bit values as `u16`). The shard keeps no `Config`.

use std::time::Duration;

use mio::net::TcpStream;

use crate::buffer::PoolConfig;
use crate::config::{Config, DuplicateClientId, KeepaliveZero, SlowConsumer};
use crate::limits::{Gcra, InboundLimits};
use crate::proxy::TrustedProxies;

pub struct Settings {
    pub max_packet_size: usize,
    pub max_client_id_len: usize,
    pub connect_timeout_ticks: u32,
    /// The same timeout as a duration, for the authentication deadline.
    pub connect_timeout: Duration,
    /// The longest a SUBACK waits for the fleet to hold its filters
    /// (`cluster.request_timeout_ms`, see `fleet_route.rs`).
    pub fleet_suback_wait: Duration,
    pub max_keepalive_secs: u16,
    /// What a CONNECT with keep-alive 0 is granted (`mqtt.keepalive_zero`).
    pub keepalive_zero: KeepaliveZero,
    pub keepalive_jitter_pct: u8,
    pub takeover: bool,
    pub max_connections: usize,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub max_queued: usize,
    pub max_session_expiry_secs: u32,
    pub write_stall_ticks: u32,
    /// `mqtt.close_grace_ms` in ticks (0 = no grace), and `mqtt.close_grace_bytes`.
    pub close_grace_ticks: u32,
    /// The close grace at shutdown: cut so that it ends (one tick late at most, and a
    /// tick to spare) within `shards.drain_timeout_secs`.
    pub shutdown_grace_ticks: u32,
    /// `shards.drain_timeout_secs`: how long a stopped shard waits for the others.
    pub drain_timeout: Duration,
    pub close_grace_bytes: u32,
    /// `mqtt.wills_on_stop`: a graceful stop publishes the wills (`Shard::begin_shutdown`).
    pub wills_on_stop: bool,
    pub retain_available: bool,
    pub max_retained: usize,
    /// `mqtt.max_retained_bytes` and `mqtt.max_retained_bytes_per_client`.
    pub max_retained_bytes: u64,
    pub max_retained_bytes_per_client: u64,
    pub topic_alias_maximum: u16,
    pub outbound_topic_aliases: u16,
    pub high_watermark: usize,
    pub low_watermark: usize,
    /// `slow_consumer = "pace"`: pace the publishers of congested subscribers instead
    /// of dropping QoS 0 (`pacing.rs`).
    pub pace: bool,
    /// With pace: a QoS 1/2 queue this long congests its connection; below half of it
    /// (and below the low watermark) the connection is no longer congested.
    pub pace_queued: usize,
    /// With pace: the most QoS 1/2 messages a connected session's queue holds.
    pub paced_max_queued: usize,
    /// With pace: the most output one connection holds.
    pub outbound_max: usize,
    /// `output_max_bytes` over the shard count: the most unsent output of this shard.
    pub output_max: usize,
    /// `shards.mailbox_max_bytes`: the most message bytes waiting in one mailbox.
    pub mailbox_max_bytes: usize,
    pub expiry_batch: usize,
    pub max_topic_len: usize,
    pub max_subscriptions: usize,
    pub tick: Duration,
    pub proxy_protocol: bool,
    pub proxy_header_max: usize,
    /// `mqtt.proxy_trusted`: who may send the PROXY header.
    pub proxy_trusted: TrustedProxies,
    /// Per shard; 0 = unlimited.
    pub max_handshaking: usize,
    /// `limits.tls_handshakes_per_turn`: TLS handshake steps per loop turn; 0 = unlimited.
    pub tls_handshakes_per_turn: u32,
    /// `max_connect_rate` and `connect_burst` (connections per second per shard).
    pub connect_rate: u32,
    pub connect_burst: u32,
    pub inbound: InboundLimits,
    pub use_cn_as_client_id: bool,
    pub require_client_cert: bool,
    pub tls_buffer: usize,
    /// Capacity of each shard's mailbox: the most one cross-shard batch holds.
    pub mailbox_capacity: usize,
    pub scratch_bytes: usize,
    pub pool: PoolConfig,
    pub socket: SocketOptions,
    /// How often accepting is retried after it ran out of file descriptors.
    pub accept_retry: Duration,
    /// The WebSocket upgrade's rules (`ws_path`, `ws_allowed_origins`,
    /// `ws_max_handshake_bytes`).
    pub ws: WsSettings,
}

pub struct WsSettings {
    pub path: String,
    pub allowed_origins: Vec<String>,
    pub max_handshake_bytes: usize,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        let tick = c.shards.tick();
        let ticks = |secs: u64| -> u32 { secs_to_ticks(secs as f64, tick) };
        Settings {
            max_packet_size: c.mqtt.max_packet_size as usize,
            max_client_id_len: usize::from(c.mqtt.max_client_id_len),
            connect_timeout_ticks: ticks(c.mqtt.connect_timeout_secs as u64),
            connect_timeout: c.mqtt.connect_timeout(),
            fleet_suback_wait: c.cluster.request_timeout(),
            max_keepalive_secs: c.mqtt.max_keepalive_secs,
            keepalive_zero: c.mqtt.keepalive_zero,
            keepalive_jitter_pct: c.mqtt.keepalive_jitter_pct,
            takeover: matches!(c.mqtt.duplicate_client_id, DuplicateClientId::Takeover),
            max_connections: c.mqtt.max_connections as usize,
            receive_maximum: c.mqtt.receive_maximum,
            max_inflight: c.mqtt.max_inflight,
            max_queued: c.mqtt.max_queued_messages as usize,
            max_session_expiry_secs: c.mqtt.max_session_expiry_secs,
            write_stall_ticks: ticks(c.mqtt.write_stall_timeout_secs as u64),
            close_grace_ticks: close_grace_ticks(c, tick),
            shutdown_grace_ticks: close_grace_ticks(c, tick).min(
                (u64::from(c.shards.drain_timeout_secs) * 1000 / tick.as_millis().max(1) as u64)
                    .saturating_sub(2) as u32,
            ),
            close_grace_bytes: c.mqtt.close_grace_bytes,
            drain_timeout: Duration::from_secs(u64::from(c.shards.drain_timeout_secs)),
            wills_on_stop: c.mqtt.wills_on_stop,
            retain_available: c.mqtt.retain_available,
            max_retained: c.mqtt.max_retained_messages as usize,
            max_retained_bytes: c.mqtt.max_retained_bytes,
            max_retained_bytes_per_client: c.mqtt.max_retained_bytes_per_client,
            topic_alias_maximum: c.mqtt.topic_alias_maximum,
            outbound_topic_aliases: c.mqtt.outbound_topic_aliases,
            high_watermark: c.buffers.outbound_high_watermark as usize,
            low_watermark: c.buffers.outbound_low_watermark as usize,
            pace: c.buffers.slow_consumer == SlowConsumer::Pace,
            pace_queued: c.buffers.pace_queued_messages as usize,
            paced_max_queued: (c.buffers.paced_max_queued_messages as usize)
                .max(c.mqtt.max_queued_messages as usize),
            outbound_max: c.buffers.outbound_max_bytes as usize,
            output_max: (c.buffers.output_max_bytes / c.shard_count().max(1) as u64)
                .try_into()
                .unwrap_or(usize::MAX),
            mailbox_max_bytes: c.shards.mailbox_max_bytes.try_into().unwrap_or(usize::MAX),
            expiry_batch: (c.shards.expiry_batch as usize).max(1),
            max_topic_len: usize::from(c.mqtt.max_topic_len),
            max_subscriptions: c.mqtt.max_subscriptions_per_client as usize,
            tick,
            proxy_protocol: c.mqtt.proxy_protocol,
            proxy_header_max: c.mqtt.proxy_header_max_bytes as usize,
            // Validated by Config::validate.
            proxy_trusted: TrustedProxies::parse(&c.mqtt.proxy_trusted).unwrap_or_default(),
            max_handshaking: c.limits.max_handshaking as usize,
            tls_handshakes_per_turn: c.limits.tls_handshakes_per_turn,
            connect_rate: c.limits.max_connect_rate,
            connect_burst: c.limits.connect_burst,
            inbound: InboundLimits {
                msgs: Gcra::new(c.limits.publish_rate, c.limits.publish_burst),
                bytes: Gcra::new(c.limits.bytes_rate, c.limits.bytes_burst),
            },
            use_cn_as_client_id: c.mqtt.use_cn_as_client_id,
            require_client_cert: c.mqtt.tls_require_client_cert,
            tls_buffer: c.mqtt.tls_buffer_bytes as usize,
            mailbox_capacity: c.shards.mailbox_capacity as usize,
            scratch_bytes: c.buffers.scratch_bytes as usize,
            pool: PoolConfig {
                max_pooled_bytes: c.buffers.pool_max_bytes as usize,
                idle_ticks: u64::from(secs_to_ticks(c.buffers.pool_idle_secs as f64, tick)),
            },
            socket: SocketOptions::from_config(c),
            accept_retry: c.tcp.accept_retry(),
            ws: WsSettings {
                path: c.mqtt.ws_path.clone(),
                allowed_origins: c.mqtt.ws_allowed_origins.clone(),
                max_handshake_bytes: c.mqtt.ws_max_handshake_bytes as usize,
            },
        }
    }

    /// Whole ticks covering `secs`, rounded up so a timer never fires early.
    pub fn ticks(&self, secs: f64) -> u32 {
        secs_to_ticks(secs, self.tick)
    }
}

/// Whole ticks covering `secs`, rounded up so a timer never fires early.
fn close_grace_ticks(c: &Config, tick: Duration) -> u32 {
    secs_to_ticks(f64::from(c.mqtt.close_grace_ms) / 1000.0, tick)
}

fn secs_to_ticks(secs: f64, tick: Duration) -> u32 {
    let t = (secs * 1000.0 / tick.as_millis().max(1) as f64).ceil();
    t.clamp(0.0, f64::from(u32::MAX / 2)) as u32
}

/// TCP options from `[tcp]` for every accepted socket.
#[derive(Clone, Debug)]
pub struct SocketOptions {
    pub nodelay: bool,
    /// TCP keepalive probes: idle, interval, retries (off when `None`).
    pub keepalive: Option<(Duration, Duration, u32)>,
    pub user_timeout: Option<Duration>,
    pub send_buffer: usize,
    pub recv_buffer: usize,
}

impl SocketOptions {
    fn from_config(c: &Config) -> Self {
        let t = &c.tcp;
        SocketOptions {
            nodelay: t.nodelay,
            keepalive: (t.keepalive_idle_secs > 0).then(|| {
                (
                    Duration::from_secs(t.keepalive_idle_secs as u64),
                    Duration::from_secs(t.keepalive_interval_secs as u64),
                    t.keepalive_retries as u32,
                )
            }),
            user_timeout: (t.user_timeout_secs > 0)
                .then(|| Duration::from_secs(t.user_timeout_secs as u64)),
            send_buffer: t.send_buffer_bytes as usize,
            recv_buffer: t.recv_buffer_bytes as usize,
        }
    }

    /// No delay, keepalive probes and TCP_USER_TIMEOUT to find half-open peers, and
    /// buffer sizes when set. Best effort: a refused option leaves the kernel default.
    pub fn apply(&self, socket: &TcpStream) {
        let s = socket2::SockRef::from(socket);
        let _ = s.set_nodelay(self.nodelay);
        if let Some((idle, interval, retries)) = self.keepalive {
            let ka = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(retries);
            let _ = s.set_tcp_keepalive(&ka);
        }
        if let Some(t) = self.user_timeout {
            let _ = s.set_tcp_user_timeout(Some(t));
        }
        if self.send_buffer > 0 {
            let _ = s.set_send_buffer_size(self.send_buffer);
        }
        if self.recv_buffer > 0 {
            let _ = s.set_recv_buffer_size(self.recv_buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grace(toml: &str) -> (u32, u32) {
        let s = Settings::from_config(&Config::from_toml_str(toml).unwrap());
        (s.close_grace_ticks, s.shutdown_grace_ticks)
    }

    #[test]
    fn the_close_grace_at_shutdown_ends_within_the_drain_timeout() {
        // Defaults: 1000 ms at 1 s ticks; at most 2 ticks of a 5 s drain.
        assert_eq!(grace(""), (1, 1));
        let long = "[mqtt]\nclose_grace_ms = 60000\n[shards]\ndrain_timeout_secs = 5";
        assert_eq!(grace(long), (60, 3));
        // A tick that does not fit twice in the drain timeout: no grace at shutdown.
        assert_eq!(grace("[shards]\ndrain_timeout_secs = 1"), (1, 0));
        assert_eq!(grace("[shards]\ntick_ms = 10000"), (1, 0));
        assert_eq!(grace("[mqtt]\nclose_grace_ms = 0"), (0, 0));
        // Finer ticks: the grace rounds up to whole ticks.
        assert_eq!(
            grace("[mqtt]\nclose_grace_ms = 250\n[shards]\ntick_ms = 100"),
            (3, 3)
        );
    }
}
