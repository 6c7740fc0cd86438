//! `[events]`: where lifecycle and uplink events go, and the limits of their queues.
//!
//! Kept beside the sinks it configures; `crate::config` embeds it and calls
//! [`EventsConfig::validate`], which names the key of every mistake.

use std::path::PathBuf;

use hyper::Uri;
use serde::{Deserialize, Deserializer};

use crate::topic;

/// What a sink does with a new event when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Discard the oldest queued event to make room (a backend prefers fresh state).
    DropOldest,
    /// Discard the new event (what is queued is delivered in order, without holes).
    DropNewest,
}

impl DropPolicy {
    /// The `reason` label of `gateway_events_dropped_total`.
    pub fn reason(self) -> &'static str {
        match self {
            DropPolicy::DropOldest => "queue_full_oldest",
            DropPolicy::DropNewest => "queue_full_newest",
        }
    }
}

/// `[events]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// "" = no webhook sink.
    pub webhook_url: String,
    /// "" = no `X-Gateway-Signature` header.
    pub webhook_secret: String,
    pub webhook_timeout_ms: u32,
    /// PEM CA bundle trusted for an `https://` webhook; `None` = the system roots.
    #[serde(deserialize_with = "empty_path_as_none")]
    pub webhook_ca_file: Option<PathBuf>,
    pub batch_max: u32,
    pub linger_ms: u32,
    pub retry_max_backoff_ms: u32,
    pub queue_capacity: u32,
    pub drop_policy: DropPolicy,
    pub uplink_filters: Vec<String>,
    pub include_subscriptions: bool,
    /// "" = no NATS sink.
    pub nats_url: String,
    /// TLS to the sink's NATS (`crate::nats_tls`): the CA trusted (`None` = the system's
    /// roots) and a client certificate and key for mutual TLS, given together.
    #[serde(deserialize_with = "empty_path_as_none")]
    pub nats_ca_file: Option<PathBuf>,
    #[serde(deserialize_with = "empty_path_as_none")]
    pub nats_cert_file: Option<PathBuf>,
    #[serde(deserialize_with = "empty_path_as_none")]
    pub nats_key_file: Option<PathBuf>,
    pub nats_subject_prefix: String,
    pub jetstream: bool,
    pub jetstream_stream: String,
}

fn empty_path_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

type Invalid = (String, String);

fn invalid(key: &str, message: String) -> Invalid {
    (format!("events.{key}"), message)
}

fn range(key: &str, v: u32, min: u32, max: u32) -> Result<(), Invalid> {
    if v < min || v > max {
        return Err(invalid(
            key,
            format!("must be between {min} and {max}, got {v}"),
        ));
    }
    Ok(())
}

/// Whether `s` is a NATS subject token or dot-separated tokens without wildcards.
pub(crate) fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty() && !t.contains(['*', '>']) && !t.chars().any(char::is_whitespace)
        })
}

impl EventsConfig {
    /// Whether any sink is configured.
    pub fn enabled(&self) -> bool {
        !self.webhook_url.is_empty() || !self.nats_url.is_empty()
    }

    /// The TLS files of the NATS sink's connection.
    pub(crate) fn nats_tls_files(&self) -> crate::nats_tls::TlsFiles<'_> {
        crate::nats_tls::TlsFiles {
            section: "events",
            ca: self.nats_ca_file.as_deref(),
            cert: self.nats_cert_file.as_deref(),
            key: self.nats_key_file.as_deref(),
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        if !self.webhook_url.is_empty() {
            self.validate_webhook_url()?;
        }
        range("webhook_timeout_ms", self.webhook_timeout_ms, 1, 300_000)?;
        range("batch_max", self.batch_max, 1, 10_000)?;
        range("linger_ms", self.linger_ms, 0, 60_000)?;
        range(
            "retry_max_backoff_ms",
            self.retry_max_backoff_ms,
            1,
            3_600_000,
        )?;
        range("queue_capacity", self.queue_capacity, 1, 10_000_000)?;
        if let Some(ca) = &self.webhook_ca_file {
            std::fs::metadata(ca)
                .map_err(|e| invalid("webhook_ca_file", format!("{}: {e}", ca.display())))?;
        }
        for (i, f) in self.uplink_filters.iter().enumerate() {
            if !topic::valid_topic_filter(f) || topic::parse_shared(f).is_some() {
                return Err(invalid(
                    &format!("uplink_filters[{i}]"),
                    format!("{f:?} is not a topic filter (shared subscriptions are not)"),
                ));
            }
        }
        self.validate_nats()
    }

    fn validate_webhook_url(&self) -> Result<(), Invalid> {
        let url = &self.webhook_url;
        let uri: Uri = url
            .parse()
            .map_err(|e| invalid("webhook_url", format!("{url:?} is not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(invalid(
                "webhook_url",
                format!("{url:?} must be an http:// or https:// URL with a host"),
            ));
        }
        Ok(())
    }

    fn validate_nats(&self) -> Result<(), Invalid> {
        for server in self.nats_url.split(',').filter(|s| !s.trim().is_empty()) {
            let addr = server
                .trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid("nats_url", format!("{server:?} is not a NATS URL: {e}")))?;
            if addr.host().is_empty() {
                return Err(invalid("nats_url", format!("{server:?} names no host")));
            }
        }
        if !valid_subject(&self.nats_subject_prefix) {
            return Err(invalid(
                "nats_subject_prefix",
                format!(
                    "{:?} must be dot-separated subject tokens without spaces or wildcards",
                    self.nats_subject_prefix
                ),
            ));
        }
        let stream = &self.jetstream_stream;
        if stream.is_empty()
            || stream.contains(['.', '*', '>', '/', '\\'])
            || stream.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "jetstream_stream",
                format!("{stream:?} is not a stream name (no dots, wildcards, slashes or spaces)"),
            ));
        }
        self.nats_tls_files()
            .check()
            .map_err(|e| (e.key, e.message))?;
        if self.jetstream && self.nats_url.is_empty() {
            return Err(invalid("jetstream", "needs events.nats_url".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    /// The key the error of `[events]` + `body` names.
    fn invalid_key(body: &str) -> String {
        match Config::from_toml_str(&format!("[events]\n{body}")) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{body}: expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_off_and_valid() {
        let c = Config::default().events;
        assert!(!c.enabled());
        assert_eq!(c.drop_policy, super::DropPolicy::DropOldest);
        assert!(c.uplink_filters.is_empty());
    }

    #[test]
    fn each_mistake_names_its_key() {
        for (body, key) in [
            ("webhook_url = \"ftp://x/y\"", "events.webhook_url"),
            ("webhook_url = \"not a url\"", "events.webhook_url"),
            ("webhook_timeout_ms = 0", "events.webhook_timeout_ms"),
            (
                "nats_ca_file = \"/nonexistent/ca.pem\"",
                "events.nats_ca_file",
            ),
            ("nats_cert_file = \"/etc/hostname\"", "events.nats_key_file"),
            (
                "webhook_ca_file = \"/nonexistent/ca.pem\"",
                "events.webhook_ca_file",
            ),
            ("batch_max = 0", "events.batch_max"),
            ("linger_ms = 60001", "events.linger_ms"),
            ("retry_max_backoff_ms = 0", "events.retry_max_backoff_ms"),
            ("queue_capacity = 0", "events.queue_capacity"),
            ("drop_policy = \"drop_random\"", "events.drop_policy"),
            (
                "uplink_filters = [\"a/#\", \"a/#/b\"]",
                "events.uplink_filters[1]",
            ),
            (
                "uplink_filters = [\"$share/g/a\"]",
                "events.uplink_filters[0]",
            ),
            ("nats_url = \"nats://\"", "events.nats_url"),
            (
                "nats_subject_prefix = \"a..b\"",
                "events.nats_subject_prefix",
            ),
            (
                "nats_subject_prefix = \"a.*\"",
                "events.nats_subject_prefix",
            ),
            ("jetstream_stream = \"a.b\"", "events.jetstream_stream"),
            ("jetstream = true", "events.jetstream"),
        ] {
            assert_eq!(invalid_key(body), key, "{body}");
        }
    }

    #[test]
    fn sinks_turn_events_on() {
        let c = Config::from_toml_str(
            "[events]\nwebhook_url = \"https://backend.example/hook\"\nnats_url = \"nats://127.0.0.1:4222, nats://127.0.0.1:4223\"\njetstream = true\n",
        )
        .unwrap()
        .events;
        assert!(c.enabled());
    }
}
