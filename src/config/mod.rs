//! Configuration: the typed form of `config/gateway.toml`, loading and validation.
//!
//! `config/gateway.toml` is both the documented reference and the compiled-in defaults
//! ([`DEFAULT_TOML`]). A user file is deep-merged over those defaults table by table, so
//! it only has to name what it changes; the merged table is then deserialized into
//! [`Config`] and checked by [`Config::validate`]: each section validates itself
//! ([`Section`], one file per section in this folder), then the rules that tie sections
//! together are checked here.
//!
//! Every mistake is reported with the key it concerns (`mqtt.listen`, `http.tokens[0]`),
//! because an operator editing a config for a million devices should never have to guess.
//! Unknown keys are errors rather than ignored: a misspelt `max_keepalive_sec` that
//! silently kept the default would be found only in production.
//!
//! Loading runs once at startup (and in `gateway check-config`); nothing here is on an
//! IO shard's path.

mod buffers;
mod cluster;
mod http;
mod limits;
mod load;
mod log;
mod mqtt;
mod shards;
mod store;
mod tcp;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use toml::{Table, Value};

pub use buffers::{BuffersConfig, SlowConsumer, MAX_SCRATCH_BYTES};
pub use cluster::ClusterConfig;
pub use http::HttpConfig;
pub use limits::LimitsConfig;
pub use log::{LogConfig, LogFormat};
pub use mqtt::{DuplicateClientId, KeepaliveZero, MqttConfig};
pub use shards::ShardsConfig;
pub use store::{StoreConfig, StoreDurability};
pub use tcp::{TcpConfig, MAX_TCP_KEEPALIVE_RETRIES, MAX_TCP_KEEPALIVE_SECS};

use load::{deserialize_error, edit_distance, merge, reject_unknown_keys};

/// The reference configuration, compiled in as the defaults.
pub const DEFAULT_TOML: &str = include_str!("../../config/gateway.toml");

/// Largest packet MQTT can express: a Remaining Length of 268,435,455 bytes.
pub const MQTT_MAX_PACKET_SIZE: u32 = 268_435_455;
/// Smallest `max_packet_size` accepted: room for a CONNECT with a short client id.
pub const MIN_PACKET_SIZE: u32 = 16;
/// MQTT requires servers to accept client ids of 1 to 23 bytes, so the cap cannot be lower.
pub const MIN_CLIENT_ID_LEN: u16 = 23;
/// Upper bound on `shards.count` and `http.business_threads`; more is a typo, not a machine.
pub const MAX_THREADS: usize = 1024;

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
    pub cluster: ClusterConfig,
}

/// A section of the configuration that checks its own keys, naming the key of each
/// mistake. Rules that involve two sections are [`Config::validate`]'s.
pub trait Section {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Sections kept beside the code they configure, whose inherent `validate` reports a
/// mistake as `(key, message)`.
macro_rules! keyed_section {
    ($($section:ty),* $(,)?) => {$(
        impl Section for $section {
            fn validate(&self) -> Result<(), ConfigError> {
                <$section>::validate(self).map_err(|(key, message)| invalid(&key, message))
            }
        }
    )*};
}

keyed_section!(crate::auth::AuthConfig, crate::events::EventsConfig);

impl Section for crate::acl::AclConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        crate::acl::Acl::from_config(self)
            .map(drop)
            .map_err(|message| invalid("acl.rules", message))
    }
}

pub(crate) fn empty_path_as_none<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<PathBuf>, D::Error> {
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

    /// Checks the rules a type cannot express: each section's own ranges, then the keys
    /// that must agree across sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Every section, in file order: a new section is one more line here.
        let sections: [&dyn Section; _] = [
            &self.mqtt,
            &self.limits,
            &self.tcp,
            &self.shards,
            &self.buffers,
            &self.http,
            &self.log,
            &self.auth,
            &self.acl,
            &self.store,
            &self.events,
            &self.cluster,
        ];
        for section in sections {
            section.validate()?;
        }
        self.validate_across_sections()
    }

    /// The rules that tie one section to another.
    fn validate_across_sections(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        // A tick coarser than the shortest timeout would stretch that timeout to the tick.
        let shortest_timeout_ms = u64::from(m.connect_timeout_secs) * 1000;
        if u64::from(self.shards.tick_ms) > shortest_timeout_ms {
            return Err(invalid(
                "shards.tick_ms",
                format!(
                    "{} ms is coarser than mqtt.connect_timeout_secs ({} ms), the shortest timeout it must time",
                    self.shards.tick_ms, shortest_timeout_ms
                ),
            ));
        }
        if self.buffers.pace_queued_messages >= m.max_queued_messages {
            // The queue must congest its connection before it drops anything.
            return Err(invalid(
                "buffers.pace_queued_messages",
                format!(
                    "must be less than mqtt.max_queued_messages ({}), got {}",
                    m.max_queued_messages, self.buffers.pace_queued_messages
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
        Ok(())
    }

    /// IO shards to start: `shards.count`, or one per available core when it is 0.
    pub fn shard_count(&self) -> usize {
        or_cores(self.shards.count)
    }

    /// TLS handshake threads: `limits.tls_handshake_threads`, or one per shard when 0;
    /// `None` when handshakes run on the shards (`limits.tls_handshakes_on_shards`).
    pub fn tls_handshake_threads(&self) -> Option<usize> {
        match (
            self.limits.tls_handshakes_on_shards,
            self.limits.tls_handshake_threads,
        ) {
            (true, _) => None,
            (false, 0) => Some(self.shard_count()),
            (false, n) => Some(n as usize),
        }
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
fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
