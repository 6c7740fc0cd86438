//! `[limits]`: overload protection: the connect rate, handshakes in progress, connections
//! per IP, and each connection's publish and byte rates. `crate::limits` holds the rate
//! limiters and the per-IP counter that enforce it.

use serde::Deserialize;

use super::{invalid, ConfigError, Section};

/// `[limits]`: overload protection (connect rate, handshakes, per-IP, inbound rate).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Accepts per second per shard; 0 = unlimited.
    pub max_connect_rate: u32,
    pub connect_burst: u32,
    /// Per shard; 0 = unlimited.
    pub max_handshaking: u32,
    /// TLS handshake steps a shard runs per loop turn; 0 = unlimited.
    pub tls_handshakes_per_turn: u32,
    /// Threads that run the TLS handshakes off the shards; 0 = one per shard.
    pub tls_handshake_threads: u32,
    /// Run the TLS handshakes on the shards instead (under `tls_handshakes_per_turn`).
    pub tls_handshakes_on_shards: bool,
    /// Their nice value (0 = the shards' priority, 19 = the lowest).
    pub tls_handshake_nice: i32,
    /// Gateway-wide; 0 = unlimited.
    pub max_connections_per_ip: u32,
    /// PUBLISH packets per second per connection; 0 = unlimited.
    pub publish_rate: u32,
    pub publish_burst: u32,
    /// Inbound bytes per second per connection; 0 = unlimited.
    pub bytes_rate: u32,
    pub bytes_burst: u32,
}

impl Section for LimitsConfig {
    /// A rate needs a burst of at least one, or nothing would ever pass.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_handshake_threads > 64 {
            return Err(invalid(
                "limits.tls_handshake_threads",
                format!("{} is more than 64", self.tls_handshake_threads),
            ));
        }
        if !(0..=19).contains(&self.tls_handshake_nice) {
            return Err(invalid(
                "limits.tls_handshake_nice",
                format!("{} is outside 0..=19", self.tls_handshake_nice),
            ));
        }
        for (key, rate, burst_key, burst) in [
            (
                "limits.max_connect_rate",
                self.max_connect_rate,
                "limits.connect_burst",
                self.connect_burst,
            ),
            (
                "limits.publish_rate",
                self.publish_rate,
                "limits.publish_burst",
                self.publish_burst,
            ),
            (
                "limits.bytes_rate",
                self.bytes_rate,
                "limits.bytes_burst",
                self.bytes_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return Err(invalid(
                    burst_key,
                    format!("must be at least 1 when {key} is set"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn the_tls_handshake_budget_defaults_to_16_and_0_is_unlimited() {
        assert_eq!(Config::default().limits.tls_handshakes_per_turn, 16);
        let c = Config::from_toml_str("[limits]\ntls_handshakes_per_turn = 0\n").unwrap();
        assert_eq!(c.limits.tls_handshakes_per_turn, 0);
    }

    #[test]
    fn tls_handshakes_run_on_a_low_priority_thread_per_shard_by_default() {
        let d = Config::default();
        assert_eq!(
            (d.limits.tls_handshake_threads, d.limits.tls_handshake_nice),
            (0, 10)
        );
        assert!(!d.limits.tls_handshakes_on_shards);
        assert_eq!(d.tls_handshake_threads(), Some(d.shard_count()));
        let c = Config::from_toml_str("[limits]\ntls_handshake_threads = 3\n").unwrap();
        assert_eq!(c.tls_handshake_threads(), Some(3));
        let c = Config::from_toml_str("[limits]\ntls_handshakes_on_shards = true\n").unwrap();
        assert_eq!(c.tls_handshake_threads(), None);
        for (bad, key) in [
            ("tls_handshake_threads = 65", "limits.tls_handshake_threads"),
            ("tls_handshake_nice = 20", "limits.tls_handshake_nice"),
            ("tls_handshake_nice = -1", "limits.tls_handshake_nice"),
        ] {
            let e = Config::from_toml_str(&format!("[limits]\n{bad}\n")).unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }
}
