//! `[cluster]`: joining a fleet of gateways on NATS (see `crate::cluster`): this node's
//! name, the NATS servers, the subjects and the registry bucket, the node's lease and how
//! long a push forwarded to another node may wait.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{in_range, invalid, ConfigError, Section};

/// Longest `node_id`: it is one subject token and part of registry values.
pub(crate) const MAX_NODE_ID_LEN: usize = 64;

/// `[cluster]`: the fleet on NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub enabled: bool,
    /// Empty = the host name ([`ClusterConfig::node`]).
    pub node_id: String,
    /// One or more NATS URLs, comma-separated.
    pub nats_url: String,
    /// The server's authorization token; empty = none.
    pub nats_token: String,
    /// TLS to NATS (`crate::nats_tls`): the PEM CA bundle trusted for the NATS
    /// servers' certificates (`None` = the system's roots), and a client certificate and
    /// key for servers that verify clients (mutual TLS), given together.
    #[serde(deserialize_with = "crate::config::empty_path_as_none")]
    pub nats_ca_file: Option<PathBuf>,
    #[serde(deserialize_with = "crate::config::empty_path_as_none")]
    pub nats_cert_file: Option<PathBuf>,
    #[serde(deserialize_with = "crate::config::empty_path_as_none")]
    pub nats_key_file: Option<PathBuf>,
    pub subject_prefix: String,
    pub registry_bucket: String,
    pub lease_secs: u32,
    /// How long a start keeps trying to join while NATS cannot be reached
    /// (`crate::cluster::join`); 0 = one attempt.
    pub startup_wait_secs: u32,
    pub request_timeout_ms: u32,
    pub registry_queue_capacity: u32,
    /// Registry entries a node sweeping a dead node's entries reads per second at most
    /// (`crate::cluster::sweep`); 0 = no sweeping.
    pub registry_sweep_rate: u32,
    pub takeover_min_interval_ms: u32,
    /// How far apart the nodes' and the NATS servers' clocks may be (ms): another node's
    /// write of a session counts as newer than a change here only beyond this
    /// (`crate::cluster::restore::Written`).
    pub clock_skew_ms: u32,
    /// Persistent sessions in JetStream (`crate::cluster::sessions`): the key-value
    /// bucket of their records and subscriptions, the stream of their queued messages,
    /// and the replicas of both.
    pub session_bucket: String,
    pub session_stream: String,
    pub session_replicas: u32,
    /// Session changes kept while NATS is away, for the re-sync (`cluster::session_resync`).
    pub session_resync_max_mib: u32,
    /// Messages waiting to be published to other nodes (`crate::cluster::routing`).
    pub routing_queue_capacity: u32,
    /// NATS queue subscriptions a node holds per shared group at most: one per member
    /// here, so nodes share a group's messages by their members (`crate::cluster::routing`).
    pub shared_group_subscriptions: u32,
}

/// Whether `s` is a node id: letters, digits, `-` and `_`, 1 to [`MAX_NODE_ID_LEN`].
fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ClusterConfig {
    /// This node's id: `node_id`, or the host name with other characters as `-`.
    pub fn node(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host: String = crate::events::host_name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .take(MAX_NODE_ID_LEN)
            .collect();
        if host.is_empty() {
            "node".into()
        } else {
            host
        }
    }

    /// The NATS URLs, trimmed.
    pub fn urls(&self) -> Vec<String> {
        self.nats_url
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The TLS files of the fleet's NATS connections.
    pub(crate) fn tls_files(&self) -> crate::nats_tls::TlsFiles<'_> {
        crate::nats_tls::TlsFiles {
            section: "cluster",
            ca: self.nats_ca_file.as_deref(),
            cert: self.nats_cert_file.as_deref(),
            key: self.nats_key_file.as_deref(),
        }
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(u64::from(self.lease_secs))
    }

    /// `clock_skew_ms` in milliseconds.
    pub fn clock_skew_ms(&self) -> u64 {
        u64::from(self.clock_skew_ms)
    }

    pub fn takeover_min_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.takeover_min_interval_ms))
    }

    /// `startup_wait_secs` as a duration.
    pub fn startup_wait(&self) -> Duration {
        Duration::from_secs(u64::from(self.startup_wait_secs))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.request_timeout_ms))
    }

    fn validate_names(&self) -> Result<(), ConfigError> {
        if !self.node_id.is_empty() && !valid_node_id(&self.node_id) {
            return Err(invalid(
                "cluster.node_id",
                format!(
                    "{:?} must be 1 to {MAX_NODE_ID_LEN} letters, digits, - or _",
                    self.node_id
                ),
            ));
        }
        if !crate::events::config::valid_subject(&self.subject_prefix) {
            return Err(invalid(
                "cluster.subject_prefix",
                format!(
                    "{:?} must be dot-separated subject tokens without spaces or wildcards",
                    self.subject_prefix
                ),
            ));
        }
        // `_nodes` is appended for the lease bucket.
        if !valid_node_id(&self.registry_bucket) || self.registry_bucket.len() > 200 {
            return Err(invalid(
                "cluster.registry_bucket",
                format!(
                    "{:?} must be letters, digits, - or _ (a JetStream key-value bucket name)",
                    self.registry_bucket
                ),
            ));
        }
        for (key, name) in [
            ("cluster.session_bucket", &self.session_bucket),
            ("cluster.session_stream", &self.session_stream),
        ] {
            if !valid_node_id(name) || name.len() > 200 {
                return Err(invalid(
                    key,
                    format!("{name:?} must be letters, digits, - or _ (a JetStream name)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_urls(&self) -> Result<(), ConfigError> {
        let urls = self.urls();
        if self.enabled && urls.is_empty() {
            return Err(invalid(
                "cluster.nats_url",
                "names no NATS server; a fleet needs one".into(),
            ));
        }
        for server in urls {
            let addr = server.parse::<async_nats::ServerAddr>().map_err(|e| {
                invalid(
                    "cluster.nats_url",
                    format!("{server:?} is not a NATS URL: {e}"),
                )
            })?;
            if addr.host().is_empty() {
                return Err(invalid(
                    "cluster.nats_url",
                    format!("{server:?} names no host"),
                ));
            }
            // Message routing speaks the NATS protocol itself, over `nats://` or `tls://`.
            if let Err(why) = crate::cluster::routing::proto::address(&server) {
                return Err(invalid("cluster.nats_url", why));
            }
        }
        Ok(())
    }
}

impl Section for ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_names()?;
        self.validate_urls()?;
        self.tls_files()
            .check()
            .map_err(|e| invalid(&e.key, e.message))?;
        in_range("cluster.lease_secs", self.lease_secs, 3, 300)?;
        in_range(
            "cluster.startup_wait_secs",
            self.startup_wait_secs,
            0,
            86_400,
        )?;
        in_range(
            "cluster.request_timeout_ms",
            self.request_timeout_ms,
            100,
            60_000,
        )?;
        in_range(
            "cluster.takeover_min_interval_ms",
            self.takeover_min_interval_ms,
            0,
            600_000,
        )?;
        in_range("cluster.clock_skew_ms", self.clock_skew_ms, 0, 60_000)?;
        in_range(
            "cluster.registry_queue_capacity",
            self.registry_queue_capacity,
            1,
            10_000_000,
        )?;
        in_range(
            "cluster.registry_sweep_rate",
            self.registry_sweep_rate,
            0,
            1_000_000,
        )?;
        in_range("cluster.session_replicas", self.session_replicas, 1, 5)?;
        in_range(
            "cluster.session_resync_max_mib",
            self.session_resync_max_mib,
            1,
            65_536,
        )?;
        in_range(
            "cluster.routing_queue_capacity",
            self.routing_queue_capacity,
            1,
            10_000_000,
        )?;
        in_range(
            "cluster.shared_group_subscriptions",
            self.shared_group_subscriptions,
            1,
            1_000,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::invalid_key;
    use crate::config::Config;

    #[test]
    fn the_defaults_are_off_and_valid() {
        let c = Config::default().cluster;
        assert!(!c.enabled);
        assert_eq!(c.node_id, "");
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.subject_prefix, "gateway.fleet");
        assert_eq!(c.registry_bucket, "gateway_registry");
        assert_eq!(c.lease_secs, 10);
        assert_eq!(c.startup_wait_secs, 60);
        assert_eq!(c.request_timeout_ms, 2000);
        assert_eq!(c.registry_queue_capacity, 100_000);
        assert_eq!(c.registry_sweep_rate, 10_000);
        assert_eq!(c.takeover_min_interval_ms, 1000);
        assert_eq!(c.clock_skew_ms, 1000);
        assert_eq!(c.session_bucket, "gateway_sessions");
        assert_eq!(c.session_stream, "gateway_session_messages");
        assert_eq!(c.session_replicas, 1);
        assert_eq!(c.session_resync_max_mib, 256);
        assert_eq!(c.routing_queue_capacity, 65_536);
        assert_eq!(c.shared_group_subscriptions, 64);
        assert!(!c.node().is_empty());
        assert!(super::valid_node_id(&c.node()));
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases = [
            ("node_id = \"a.b\"", "cluster.node_id"),
            ("node_id = \"has space\"", "cluster.node_id"),
            ("nats_url = \"nats://\"", "cluster.nats_url"),
            ("nats_url = \"ws://h:4222\"", "cluster.nats_url"),
            (
                "nats_ca_file = \"/nonexistent/ca.pem\"",
                "cluster.nats_ca_file",
            ),
            (
                "nats_cert_file = \"/etc/hostname\"",
                "cluster.nats_key_file",
            ),
            (
                "nats_key_file = \"/etc/hostname\"",
                "cluster.nats_cert_file",
            ),
            (
                "nats_cert_file = \"/nonexistent/c.pem\"\nnats_key_file = \"/nonexistent/k.pem\"",
                "cluster.nats_cert_file",
            ),
            ("enabled = true\nnats_url = \"\"", "cluster.nats_url"),
            ("subject_prefix = \"a.*\"", "cluster.subject_prefix"),
            ("subject_prefix = \"\"", "cluster.subject_prefix"),
            ("registry_bucket = \"a.b\"", "cluster.registry_bucket"),
            ("lease_secs = 2", "cluster.lease_secs"),
            ("lease_secs = 301", "cluster.lease_secs"),
            ("startup_wait_secs = 86401", "cluster.startup_wait_secs"),
            ("request_timeout_ms = 99", "cluster.request_timeout_ms"),
            (
                "registry_queue_capacity = 0",
                "cluster.registry_queue_capacity",
            ),
            (
                "registry_sweep_rate = 1000001",
                "cluster.registry_sweep_rate",
            ),
            (
                "takeover_min_interval_ms = 600001",
                "cluster.takeover_min_interval_ms",
            ),
            ("clock_skew_ms = 60001", "cluster.clock_skew_ms"),
            ("session_bucket = \"a.b\"", "cluster.session_bucket"),
            ("session_stream = \"\"", "cluster.session_stream"),
            ("session_replicas = 0", "cluster.session_replicas"),
            ("session_replicas = 6", "cluster.session_replicas"),
            (
                "session_resync_max_mib = 0",
                "cluster.session_resync_max_mib",
            ),
            (
                "routing_queue_capacity = 0",
                "cluster.routing_queue_capacity",
            ),
            (
                "routing_queue_capacity = 10000001",
                "cluster.routing_queue_capacity",
            ),
            (
                "shared_group_subscriptions = 0",
                "cluster.shared_group_subscriptions",
            ),
            (
                "shared_group_subscriptions = 1001",
                "cluster.shared_group_subscriptions",
            ),
        ];
        for (body, key) in cases {
            assert_eq!(invalid_key(&format!("[cluster]\n{body}\n")), key, "{body}");
        }
    }

    #[test]
    fn a_fleet_node_parses() {
        let c = Config::from_toml_str(
            "[cluster]\nenabled = true\nnode_id = \"node-a_1\"\nnats_url = \"nats://10.0.0.1:4222, nats://10.0.0.2:4222\"\n",
        )
        .unwrap()
        .cluster;
        assert_eq!(c.node(), "node-a_1");
        assert_eq!(c.urls().len(), 2);
    }

    /// `tls://` URLs, a CA file and a client certificate with its key are accepted; a
    /// key that is not a key is refused under its own name.
    #[test]
    fn tls_to_nats_parses_and_its_files_are_read() {
        let dir = std::env::temp_dir().join(format!("cluster-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["nats".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let toml = |key_file: &std::path::Path| {
            format!(
                "[cluster]\nnats_url = \"tls://n1:4222,nats://n2\"\nnats_ca_file = {c:?}\nnats_cert_file = {c:?}\nnats_key_file = {key_file:?}\n"
            )
        };
        let config = Config::from_toml_str(&toml(&k)).unwrap().cluster;
        assert_eq!(config.nats_cert_file.as_deref(), Some(c.as_path()));
        assert!(config.tls_files().client_config().is_ok());
        assert_eq!(invalid_key(&toml(&c)), "cluster.nats_key_file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
