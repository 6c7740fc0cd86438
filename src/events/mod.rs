//! Events to the backend: lifecycle events (`connected`, `disconnected`,
//! `session_expired`, `subscribed`, `unsubscribed`) and device PUBLISHes matching
//! `[events] uplink_filters` (`uplink`), delivered to a webhook and/or NATS.
//!
//! The pipeline runs from the IO shards outwards, and nothing in it can stall a shard:
//!
//! 1. A shard calls one of [`produce`]'s methods on its [`EventSender`] (`connected`,
//!    `disconnected`, `uplink`, …), which builds an [`Event`] ([`model`]) only if it is
//!    wanted, with a sequence number from the shard's [`SeqGen`], and hands it to
//!    [`EventSender::try_emit`] ([`queue`]): into each sink's bounded lock-free queue, or
//!    dropped by the `drop_policy` — never waits.
//! 2. Each sink is a task on the business pool ([`sink`]): it gathers batches, delivers
//!    them ([`webhook`], [`nats`]) and retries with capped exponential backoff.
//! 3. [`metrics`] counts what was sent, retried and dropped, per sink.
//!
//! [`Events::start`] builds the sinks `[events]` configures ([`config`]); with none it
//! hands out a disabled sender, for which every "wants" question is a single branch.

pub mod config;
pub mod filter;
pub mod metrics;
pub mod model;
pub mod nats;
pub mod produce;
pub mod queue;
pub mod sink;
pub mod webhook;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{DropPolicy, EventsConfig};
pub use metrics::{EventsMetrics, SinkMetrics};
pub use model::{Connected, Event, EventKind, SeqGen};
pub use queue::EventSender;

use filter::UplinkFilter;
use queue::SinkQueue;
use sink::Batcher;

/// The running pipeline: the sender for the shards, the metrics, and the sink tasks.
pub struct Events {
    pub sender: EventSender,
    pub metrics: Arc<EventsMetrics>,
    /// Each sink's metrics by name (`webhook`, `nats`), for tests and logs.
    pub sinks: Vec<(&'static str, SinkMetrics)>,
    /// The fleet registry's queue of `connected` / `disconnected` / `session_expired`, when
    /// [`Events::start_with_registry`] asked for one: taken by `crate::cluster`.
    pub registry: Option<Batcher>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Events {
    /// Starts the sinks `config` names on `runtime` (the business pool). `node` names this
    /// gateway in every event. With no sink configured the sender is disabled.
    pub fn start(
        config: &EventsConfig,
        node: &str,
        runtime: &tokio::runtime::Handle,
    ) -> io::Result<Events> {
        Events::start_with_registry(config, node, runtime, None)
    }

    /// Like [`Events::start`], plus, with `registry` (a queue capacity), a queue of
    /// `connected`, `disconnected` and `session_expired` for the fleet's registry
    /// (`Events::registry`), which
    /// turns lifecycle events on even with no sink configured.
    pub fn start_with_registry(
        config: &EventsConfig,
        node: &str,
        runtime: &tokio::runtime::Handle,
        registry: Option<usize>,
    ) -> io::Result<Events> {
        let node: Arc<str> = node.into();
        let metrics = Arc::new(EventsMetrics::default());
        let stop = CancellationToken::new();
        let mut events = Events {
            sender: EventSender::disabled(),
            metrics: metrics.clone(),
            sinks: Vec::new(),
            registry: None,
            stop: stop.clone(),
            tasks: Vec::new(),
        };
        let mut queues = Vec::new();
        if let Some(capacity) = registry {
            // Its own capacity; a full ring drops the oldest change.
            let q = QueueSpec::new(capacity, DropPolicy::DropOldest, true);
            let mut b = events.batcher("registry", config, q, &mut queues);
            // A device is reachable from other nodes once written: no lingering.
            b.linger = Duration::ZERO;
            events.registry = Some(b);
        }
        if !config.webhook_url.is_empty() {
            let webhook = webhook::Webhook {
                client: crate::https_client::HttpsClient::new(config.webhook_ca_file.as_deref())?,
                url: config.webhook_url.clone(),
                secret: config.webhook_secret.clone().into_bytes(),
                timeout: Duration::from_millis(u64::from(config.webhook_timeout_ms)),
                node: node.clone(),
            };
            let b = events.batcher("webhook", config, QueueSpec::sink(config), &mut queues);
            events.tasks.push(runtime.spawn(webhook.run(b)));
        }
        if !config.nats_url.is_empty() {
            let tls = config
                .nats_tls_files()
                .client_config()
                .map_err(|e| io::Error::other(e.to_string()))?;
            let sink = nats::NatsSink {
                tls,
                urls: config
                    .nats_url
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect(),
                prefix: config.nats_subject_prefix.clone(),
                stream: config.jetstream.then(|| config.jetstream_stream.clone()),
                node: node.clone(),
            };
            let b = events.batcher("nats", config, QueueSpec::sink(config), &mut queues);
            events.tasks.push(runtime.spawn(sink.run(b)));
        }
        events.sender = EventSender::new(
            queues,
            UplinkFilter::new(&config.uplink_filters),
            config.include_subscriptions,
        );
        Ok(events)
    }

    /// A new sink's queue (added to `queues`) and its batcher.
    fn batcher(
        &mut self,
        name: &'static str,
        config: &EventsConfig,
        spec: QueueSpec,
        queues: &mut Vec<SinkQueue>,
    ) -> Batcher {
        let ring = Arc::new(crossbeam_queue::ArrayQueue::new(spec.capacity.max(1)));
        let sink_metrics = self.metrics.sink(name, ring.clone());
        self.sinks.push((name, sink_metrics.clone()));
        let queue = SinkQueue {
            ring,
            notify: Default::default(),
            policy: spec.policy,
            metrics: sink_metrics,
            presence_only: spec.presence_only,
            newest_dropped_ms: Default::default(),
        };
        queues.push(queue.clone());
        Batcher {
            name,
            queue,
            max: config.batch_max as usize,
            linger: Duration::from_millis(u64::from(config.linger_ms)),
            max_backoff: Duration::from_millis(u64::from(config.retry_max_backoff_ms)),
            stop: self.stop.clone(),
        }
    }

    /// The metrics of sink `name`.
    pub fn sink(&self, name: &str) -> Option<&SinkMetrics> {
        self.sinks.iter().find(|(n, _)| *n == name).map(|(_, m)| m)
    }

    /// Asks the sinks to deliver what is queued (one attempt per batch) and waits at most
    /// `timeout` for them. Call after the shards stopped emitting.
    pub fn close(self, timeout: Duration) {
        self.stop.cancel();
        let deadline = Instant::now() + timeout;
        for task in &self.tasks {
            while !task.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !task.is_finished() {
                tracing::warn!("an event sink did not finish within the drain timeout");
                task.abort();
            }
        }
    }
}

/// A sink queue's size, drop policy and what it takes.
struct QueueSpec {
    capacity: usize,
    policy: DropPolicy,
    presence_only: bool,
}

impl QueueSpec {
    fn new(capacity: usize, policy: DropPolicy, presence_only: bool) -> QueueSpec {
        QueueSpec {
            capacity,
            policy,
            presence_only,
        }
    }

    /// A backend sink's queue, as `[events]` configures it.
    fn sink(config: &EventsConfig) -> QueueSpec {
        QueueSpec::new(config.queue_capacity as usize, config.drop_policy, false)
    }
}

/// This machine's host name, the default `node` of events.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
