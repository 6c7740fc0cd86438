//! Joining the fleet at start: connect to NATS, open the buckets, take this node's lease.
//!
//! A node often starts while NATS is not there yet (both restarted together, or NATS in
//! maintenance). Exiting at once would leave the restart to a supervisor's back-off,
//! which may keep the node down for minutes after NATS is back; so the start keeps
//! trying for `cluster.startup_wait_secs`, logging each attempt, and then gives up with
//! the last error. What waiting cannot fix — a refused token or certificate, the TLS
//! files, a bucket or stream JetStream refuses — ends the start at once
//! ([`JoinError::Fatal`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::ConnectErrorKind;
use tokio_util::sync::CancellationToken;

use super::{handover, routing, sessions, sweep, Fleet, Registry};
use crate::config::ClusterConfig;

/// Longest one attempt may take (NATS, then each bucket); later attempts get at most
/// the time left, but never less than [`MIN_ATTEMPT`].
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_ATTEMPT: Duration = Duration::from_secs(2);
/// The first pause between attempts; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Why one attempt to join failed.
#[derive(Debug)]
enum JoinError {
    /// NATS unreachable, JetStream not ready, a timeout: worth another attempt.
    Again(String),
    /// Refused credentials, unreadable TLS files: no point in waiting.
    Fatal(String),
}

impl JoinError {
    /// A bucket, stream or lease that could not be had once NATS answered: worth
    /// waiting for when JetStream is not there yet — no responders or "jetstream
    /// unavailable" (a server still starting), "temporarily unavailable" (10008: no
    /// meta leader yet) or not enough servers (10005) while a NATS cluster restarts, no
    /// stream yet for the lease, a timeout, the connection lost; not when JetStream
    /// refused the request for good (more replicas than a single server has, a bucket
    /// of another shape), which the next attempt would meet again.
    fn of_bucket(e: String) -> JoinError {
        let text = e.to_ascii_lowercase();
        let transient = [
            "no responders",
            "unavailable",
            "10008",
            "10005",
            "not enough",
            "no stream found",
            "timed out",
            "timeout",
            "disconnected",
            "not connected",
            "broken pipe",
            "connection reset",
        ];
        if transient.iter().any(|t| text.contains(t)) {
            JoinError::Again(e)
        } else {
            JoinError::Fatal(e)
        }
    }
}

impl Fleet {
    /// Joins the fleet on `runtime`, trying again for up to `cluster.startup_wait_secs`
    /// while NATS cannot be reached (each failed attempt logged with the time left); an
    /// error names what failed last.
    pub fn connect(
        config: &ClusterConfig,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<Fleet>, String> {
        let wait = config.startup_wait();
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let mut limit = ATTEMPT_TIMEOUT;
        for attempt in 1u32.. {
            let error = match Self::attempt(config, runtime, limit) {
                Ok(fleet) => return Ok(fleet),
                Err(JoinError::Fatal(e)) => return Err(e),
                Err(JoinError::Again(e)) => e,
            };
            let waited = started.elapsed();
            let left = wait.saturating_sub(waited);
            if left.is_zero() {
                return Err(match attempt {
                    1 => error,
                    n => format!(
                        "{error} (gave up after {n} attempts in {} s: cluster.startup_wait_secs)",
                        waited.as_secs()
                    ),
                });
            }
            let this_pause = pause.min(left);
            tracing::warn!(
                attempt,
                error = %error,
                retry_in_ms = this_pause.as_millis() as u64,
                gives_up_in_s = left.as_secs(),
                "cluster: cannot join the fleet yet, trying again"
            );
            // The start runs on the main thread, before any shard: nothing else waits.
            std::thread::sleep(this_pause);
            pause = (pause * 2).min(MAX_PAUSE);
            let left = wait.saturating_sub(started.elapsed());
            limit = ATTEMPT_TIMEOUT.min(left).max(MIN_ATTEMPT);
        }
        unreachable!("the attempts end by returning")
    }

    /// One attempt, bounded by `limit`.
    fn attempt(
        config: &ClusterConfig,
        runtime: &tokio::runtime::Handle,
        limit: Duration,
    ) -> Result<Arc<Fleet>, JoinError> {
        // The timer is made inside the runtime (it needs its clock).
        let joining = async { tokio::time::timeout(limit, Fleet::join(config)).await };
        runtime.block_on(joining).unwrap_or_else(|_| {
            Err(JoinError::Again(format!(
                "cluster: no answer from NATS ({}) within {} s",
                config.nats_url,
                limit.as_secs()
            )))
        })
    }

    async fn join(config: &ClusterConfig) -> Result<Arc<Fleet>, JoinError> {
        let node: Arc<str> = config.node().into();
        let tls = config
            .tls_files()
            .client_config()
            .map_err(|e| JoinError::Fatal(format!("cluster: {e}")))?;
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("gateway-fleet-{node}"))
            .tls_client_config((*tls).clone())
            .connection_timeout(Duration::from_secs(2))
            // A server that stops answering (hung, or cut off without a reset) counts as
            // away after about three unanswered pings, so the fleet's callers fail fast
            // instead of each waiting out its own timeout.
            .ping_interval(config.request_timeout().max(Duration::from_secs(1)));
        if !config.nats_token.is_empty() {
            options = options.token(config.nats_token.clone());
        }
        let client = options.connect(config.urls()).await.map_err(|e| {
            let message = connect_error(config, &e.to_string());
            let unreachable = matches!(
                e.kind(),
                ConnectErrorKind::Io
                    | ConnectErrorKind::TimedOut
                    | ConnectErrorKind::Dns
                    | ConnectErrorKind::MaxReconnects
            );
            if unreachable && !tls_refused(&e) {
                JoinError::Again(message)
            } else {
                JoinError::Fatal(message)
            }
        })?;
        let registry = Registry::open(&client, config, node.clone())
            .await
            .map_err(JoinError::of_bucket)?;
        let registry = Arc::new(registry);
        let link = handover::Link::new(&client, config, &registry, &node);
        let sessions = sessions::SessionStore::open(&client, config, link)
            .await
            .map_err(JoinError::of_bucket)?;
        let _ = registry.sessions.set(Arc::downgrade(&sessions));
        let retained = routing::retained::open(&client, config)
            .await
            .map_err(JoinError::of_bucket)?;
        // The lease last: an attempt that fails leaves no lease naming a node that is
        // not there.
        registry.renew_lease().await.map_err(|e| {
            JoinError::of_bucket(format!("cluster: cannot take this node's lease: {e}"))
        })?;
        tracing::info!(node = %node, nats = %config.nats_url, "joined the fleet");
        let routing = routing::Router::new(config, &node, retained, tls);
        let sweep = sweep::Sweeper::new(config, registry.clone(), sessions.clone());
        Ok(Arc::new(Fleet {
            node,
            sweep,
            registry,
            metrics: Arc::default(),
            sessions,
            routing,
            client,
            prefix: config.subject_prefix.clone(),
            lease: config.lease(),
            request_timeout: config.request_timeout(),
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            routing_task: Mutex::new(None),
        }))
    }
}

/// Whether a connect error is TLS refusing the peer (a certificate not trusted, ...):
/// async-nats reports those as IO errors carrying rustls' error.
fn tls_refused(e: &async_nats::ConnectError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        cause = c.source();
    }
    e.to_string().contains("certificate")
}

/// Why the fleet's client could not connect; a certificate error says what it was
/// checked against.
fn connect_error(config: &ClusterConfig, e: &str) -> String {
    let hint = if e.contains("certificate") {
        match &config.nats_ca_file {
            Some(ca) => format!(" (checked against cluster.nats_ca_file {})", ca.display()),
            None => " (checked against the system's roots: cluster.nats_ca_file is empty)".into(),
        }
    } else {
        String::new()
    };
    format!(
        "cluster: cannot connect to NATS ({}): {e}{hint}",
        config.nats_url
    )
}
