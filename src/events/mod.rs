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
        let node: Arc<str> = node.into();
        let metrics = Arc::new(EventsMetrics::default());
        let stop = CancellationToken::new();
        let mut events = Events {
            sender: EventSender::disabled(),
            metrics: metrics.clone(),
            sinks: Vec::new(),
            stop: stop.clone(),
            tasks: Vec::new(),
        };
        let mut queues = Vec::new();
        if !config.webhook_url.is_empty() {
            let webhook = webhook::Webhook {
                client: crate::https_client::HttpsClient::new(config.webhook_ca_file.as_deref())?,
                url: config.webhook_url.clone(),
                secret: config.webhook_secret.clone().into_bytes(),
                timeout: Duration::from_millis(u64::from(config.webhook_timeout_ms)),
                node: node.clone(),
            };
            let b = events.batcher("webhook", config, &mut queues);
            events.tasks.push(runtime.spawn(webhook.run(b)));
        }
        if !config.nats_url.is_empty() {
            let sink = nats::NatsSink {
                urls: config
                    .nats_url
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect(),
                prefix: config.nats_subject_prefix.clone(),
                stream: config.jetstream.then(|| config.jetstream_stream.clone()),
                node: node.clone(),
            };
            let b = events.batcher("nats", config, &mut queues);
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
        queues: &mut Vec<SinkQueue>,
    ) -> Batcher {
        let capacity = config.queue_capacity as usize;
        let ring = Arc::new(crossbeam_queue::ArrayQueue::new(capacity.max(1)));
        let sink_metrics = self.metrics.sink(name, ring.clone());
        self.sinks.push((name, sink_metrics.clone()));
        let queue = SinkQueue {
            ring,
            notify: Default::default(),
            policy: config.drop_policy,
            metrics: sink_metrics,
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
