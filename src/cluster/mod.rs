//! The fleet: several gateways sharing one NATS deployment, so that a push to any node
//! reaches a device connected to any node (`[cluster]`, off by default).
//!
//! What this owns, all on the business pool (never on an IO shard: shards only push
//! `connected` / `disconnected` into the registry's bounded lock-free queue, see
//! `crate::events`):
//!
//! - the NATS connection of this node ([`Fleet::connect`]; the gateway does not start
//!   when no NATS server answers);
//! - the registry of which node holds which client id ([`registry`]): a JetStream
//!   key-value bucket written as devices come and go here, and this node's lease in a
//!   second bucket whose entries age out, renewed by a heartbeat task;
//! - the node-addressed request subjects on which other nodes hand this node pushes for
//!   its devices and ask for a device's state ([`Service`]), and the requests this node
//!   sends them ([`Fleet::request`]). What a push means is the HTTP API's business (`crate::api`):
//!   this module moves bytes and tells "no responders" from a timeout;
//! - takeover across nodes: when a device connects here while the registry named another
//!   node, that node is asked (on its `takeover` subject) to close its connection, which
//!   its home shard does with MQTT 5 DISCONNECT 0x8E (`ShardMsg::TakenOver`; a stale
//!   offline copy there ends);
//! - a dead node's persistent sessions taken in by a survivor ([`take_in`]);
//! - topic routing between nodes ([`routing`]): messages published here reach the
//!   matching sessions of other nodes, through NATS subscriptions for the filters held;
//!   retained messages through a key-value bucket every node follows.

mod acker;
pub mod arbiter;
pub mod handover;
mod home;
mod join;
pub mod metrics;
pub mod ops_metrics;
pub mod registry;
mod rejoin;
pub mod restart;
pub mod restore;
pub mod routing;
mod session_changes;
pub mod session_leftover;
pub mod session_metrics;
mod session_qos2;
mod session_resync;
mod session_will;
pub mod sessions;
pub mod sweep;
pub mod take_in;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, Request, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::events::sink::Batcher;
use crate::mailbox::{home_shard, Mailboxes, ShardMsg};

pub use metrics::FleetMetrics;
pub use registry::{Located, Registry};

/// A short-lived pull consumer's settings that read the last value of each subject
/// under `filter` once (the sweep's pass over the registry, the leftover wills' read),
/// acknowledging at most `max_ack_pending` at a time.
fn last_per_subject(
    filter: String,
    max_ack_pending: i64,
) -> async_nats::jetstream::consumer::pull::Config {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
    async_nats::jetstream::consumer::pull::Config {
        deliver_policy: DeliverPolicy::LastPerSubject,
        filter_subject: filter,
        // nats-server 2.9 refuses a pull consumer without acknowledgements.
        ack_policy: AckPolicy::All,
        max_ack_pending,
        inactive_threshold: Duration::from_secs(60),
        ..Default::default()
    }
}

/// What a node does with a request another node sent it: the reply's bytes.
pub type Handler = Arc<dyn Fn(Bytes) -> Pin<Box<dyn Future<Output = Bytes> + Send>> + Send + Sync>;

/// What a node answers other nodes for its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Pushes to its devices (`POST /v1/push`, `/v1/push/batch`).
    Push,
    /// A device's state (`GET /v1/clients/{id}`).
    Client,
    /// Disconnecting a device (`DELETE /v1/clients/{id}`).
    Kick,
    /// Its figures (`GET /v1/stats?scope=fleet`).
    Stats,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Push => "push",
            Service::Client => "client",
            Service::Kick => "kick",
            Service::Stats => "stats",
        }
    }
}

/// Why a request to another node got no answer.
#[derive(Debug)]
pub enum RequestError {
    /// NATS says nobody listens on that node's subject: the node is gone.
    NoResponders,
    /// The node did not answer within the timeout.
    TimedOut,
    /// NATS itself failed (disconnected, or another error).
    Nats(String),
}

/// This node's membership of the fleet.
pub struct Fleet {
    /// This node's id (`cluster.node_id` or the host name).
    pub node: Arc<str>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<FleetMetrics>,
    /// The persistent sessions in JetStream (`sessions`).
    pub sessions: Arc<sessions::SessionStore>,
    /// Topic routing between nodes (its own NATS connections, see [`routing`]).
    pub routing: Arc<routing::Router>,
    /// Sweeping dead nodes' registry entries; its `dead_nodes()` says which node died.
    pub sweep: Arc<sweep::Sweeper>,
    client: Client,
    prefix: String,
    lease: Duration,
    request_timeout: Duration,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Message routing, which ends by itself once stopped, after its last words
    /// (`routing/last_words.rs`): `close` waits for it.
    routing_task: Mutex<Option<JoinHandle<()>>>,
}

impl Fleet {
    /// The subject on which `node` answers `service` for its devices.
    fn subject(&self, node: &str, service: Service) -> String {
        format!("{}.node.{node}.{}", self.prefix, service.name())
    }

    /// Starts the background work on `runtime`: the lease heartbeat, the registry writer
    /// draining `changes` (asking the `shards` whether a disconnected device's session
    /// lives on), and the answers to other nodes' requests, each service through its
    /// handler (subscribed before this returns; `confirm_subscribed`, before the node
    /// listens, waits until NATS routes requests to them).
    pub fn start(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        changes: Batcher,
        shards: Mailboxes,
        handlers: [(Service, Handler); 4],
    ) -> Result<(), String> {
        let mut served = Vec::with_capacity(handlers.len());
        for (service, handler) in handlers {
            served.push((
                self.subscribe(runtime, self.subject(&self.node, service))?,
                handler,
            ));
        }
        let _ = self.sessions.shards.set(shards.clone());
        let takeovers = self.subscribe(runtime, self.takeover_subject(&self.node))?;
        let handovers = self.subscribe(runtime, handover::subject(&self.prefix, &self.node))?;
        let fleet = self.clone();
        let taken = move |node: String, client_id: Arc<str>| {
            tokio::spawn(fleet.clone().take_over(node, client_id));
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for (subscriber, handler) in served {
            tasks.push(runtime.spawn(self.clone().serve(subscriber, handler)));
        }
        tasks.push(runtime.spawn(self.clone().serve_takeovers(takeovers, shards.clone())));
        tasks.push(runtime.spawn(self.clone().heartbeat(shards.clone())));
        let handing = self
            .sessions
            .clone()
            .serve_handovers(handovers, shards.clone());
        tasks.push(runtime.spawn(handing));
        let wills = self.sessions.clone().watch_wills(
            shards.clone(),
            self.routing.clone(),
            self.lease,
            self.stop.clone(),
        );
        tasks.push(runtime.spawn(wills));
        let stop = self.stop.clone();
        let routing = runtime.spawn(self.routing.clone().run(shards.clone(), stop));
        *self.routing_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(routing);
        tasks.push(runtime.spawn(self.sweep.clone().run(self.stop.clone())));
        tasks.push(runtime.spawn(self.clone().register_missed(shards.clone())));
        tasks.push(runtime.spawn(self.registry.clone().follow(changes, shards, taken)));
        Ok(())
    }

    /// Waits (at most `request_timeout_ms`) until the NATS server has read this node's
    /// subscriptions, so other nodes reach it: a message published to a fresh inbox
    /// subscribed after them comes back (the server reads a connection's commands in
    /// order). A flush only writes them out; the server could read them after another
    /// node's request ("no responders", seen a few milliseconds after a restarted node
    /// listened). Counts in no request metric.
    pub async fn confirm_subscribed(&self) {
        let inbox = self.client.new_inbox();
        let echoed = async {
            let mut probe = self.client.subscribe(inbox.clone()).await.ok()?;
            self.client.publish(inbox, Bytes::new()).await.ok()?;
            futures_util::StreamExt::next(&mut probe).await
        };
        if !matches!(
            tokio::time::timeout(self.request_timeout, echoed).await,
            Ok(Some(_))
        ) {
            tracing::warn!(node = %self.node, "cluster: NATS did not confirm this node's subscriptions at start; other nodes may not reach it for a moment");
        }
    }

    /// Whether this node's NATS connection is up now.
    pub fn nats_up(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Appends the fleet's metrics, with the NATS connection's state now.
    pub fn render_metrics(&self, out: &mut String) {
        self.metrics.nats_connected.set(i64::from(self.nats_up()));
        self.metrics.render(out);
        self.registry.metrics.render(out);
        self.sessions.metrics.render(out);
        self.routing.render_metrics(out);
        self.sweep.render_metrics(out);
    }

    fn subscribe(
        &self,
        runtime: &tokio::runtime::Handle,
        subject: String,
    ) -> Result<async_nats::Subscriber, String> {
        runtime
            .block_on(self.client.subscribe(subject.clone()))
            .map_err(|e| format!("cluster: cannot subscribe {subject}: {e}"))
    }

    /// The subject on which `node` hears that another node accepted one of its devices.
    fn takeover_subject(&self, node: &str) -> String {
        format!("{}.node.{node}.takeover", self.prefix)
    }

    /// Tells `node`, which held `client_id` before it connected here, to close its
    /// connection. A node that is gone has nothing to close.
    async fn take_over(self: Arc<Self>, node: String, client_id: Arc<str>) {
        self.metrics.takeovers.inc();
        let request = Request::new()
            .payload(Bytes::copy_from_slice(client_id.as_bytes()))
            .timeout(Some(self.request_timeout));
        let subject = self.takeover_subject(&node);
        match self.client.send_request(subject, request).await {
            Ok(_) => {
                tracing::debug!(%client_id, node, "cluster: took the client id over from another node")
            }
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {}
            Err(e) => {
                tracing::warn!(%client_id, node, error = %e, "cluster: the node that held this client id did not confirm the takeover")
            }
        }
    }

    /// Closes the local connection of each client id another node took over, unless the
    /// registry names this node again (the device came back here since).
    async fn serve_takeovers(self: Arc<Self>, mut sub: async_nats::Subscriber, shards: Mailboxes) {
        while let Some(msg) = tokio::select! {
            m = sub.next() => m,
            _ = self.stop.cancelled() => None,
        } {
            let client_id = String::from_utf8_lossy(&msg.payload).into_owned();
            let taking = self.sessions.taking(&client_id);
            let taking_over = (self.clone()).taken_over(client_id, msg.reply, shards.clone());
            if taking {
                // Its shard holds the session first (`take_in`): waited for aside.
                tokio::spawn(taking_over);
            } else {
                taking_over.await;
            }
        }
    }

    /// Another node took `client_id` over: its connection (or stale copy) here ends,
    /// unless the registry names this node again; then answers `reply`.
    async fn taken_over(
        self: Arc<Self>,
        client_id: String,
        reply: Option<async_nats::Subject>,
        shards: Mailboxes,
    ) {
        self.sessions.settled(&client_id).await;
        if !self.registry.names_this_node(&client_id).await {
            // Pushes here go to the other node from now on, not after the close.
            // Counted once per connection: a second request for one already gone
            // (the rejoin and a claim can both ask) finds it left.
            if self.registry.left(&client_id) {
                self.registry.metrics.lost.inc();
            }
            let home = home_shard(&client_id, shards.len());
            if let Err(msg) = shards.try_send(home, ShardMsg::TakenOver { client_id }) {
                // A full mailbox: waited for aside, not holding up the other takeovers.
                tokio::spawn(async move { shards.send(home, msg).await });
            }
        }
        if let Some(reply) = reply {
            let _ = self.client.publish(reply, Bytes::new()).await;
        }
    }

    /// Answers each request on this node's subject with `handler`, each in its own task.
    async fn serve(self: Arc<Self>, mut sub: async_nats::Subscriber, handler: Handler) {
        loop {
            let msg = tokio::select! {
                m = sub.next() => m,
                _ = self.stop.cancelled() => None,
            };
            let Some(msg) = msg else { break };
            let Some(reply) = msg.reply else { continue };
            let (client, handler) = (self.client.clone(), handler.clone());
            self.metrics.served.inc();
            tokio::spawn(async move {
                let answer = handler(msg.payload).await;
                if let Err(e) = client.publish(reply, answer).await {
                    tracing::warn!(error = %e, "cluster: cannot answer a push from another node");
                }
            });
        }
    }

    /// Renews this node's lease every third of `lease_secs` until stopped; after NATS
    /// failed (a renewal or a registry write), writes this node's devices again
    /// (`rejoin`, asking the `shards` when each connection was accepted), in a task of
    /// its own, one at a time, so the renewals go on meanwhile.
    async fn heartbeat(self: Arc<Self>, shards: Mailboxes) {
        let every = self.lease / 3;
        let mut failing = false;
        let mut rejoining: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.stop.cancelled() => {
                    rejoining.inspect(|t| t.abort());
                    return;
                }
            }
            let idle = rejoining.as_ref().is_none_or(|t| t.is_finished());
            match self.registry.renew_lease().await {
                Ok(()) if idle && (failing || self.registry.take_dirty()) => {
                    let (fleet, shards) = (self.clone(), shards.clone());
                    rejoining = Some(tokio::spawn(async move {
                        let n = fleet.rejoin(&shards).await;
                        tracing::info!(node = %fleet.node, devices = n, "cluster: NATS answers again; lease renewed and this node's devices written to the registry again");
                    }));
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    tracing::warn!(node = %self.node, error = %e, "cluster: cannot renew this node's lease; other nodes will count its devices offline once it expires");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    /// The nodes holding a lease (this one included), sorted: listed now, or as this
    /// node last looked when the listing fails.
    pub async fn live_nodes(&self) -> Result<Vec<String>, String> {
        self.sweep.live().await
    }

    /// Sends `payload` to `node`'s `service` subject and waits at most `timeout` for its
    /// answer.
    pub async fn request(
        &self,
        node: &str,
        service: Service,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        let request = Request::new().payload(payload).timeout(Some(timeout));
        let started = std::time::Instant::now();
        let answer = self
            .client
            .send_request(self.subject(node, service), request)
            .await;
        let (outcome, result) = match answer {
            Ok(m) => ("answered", Ok(m.payload)),
            Err(e) => match e.kind() {
                RequestErrorKind::NoResponders => {
                    ("no_responders", Err(RequestError::NoResponders))
                }
                RequestErrorKind::TimedOut => ("timeout", Err(RequestError::TimedOut)),
                _ => ("error", Err(RequestError::Nats(e.to_string()))),
            },
        };
        let took = result.is_ok().then(|| started.elapsed().as_secs_f64());
        self.metrics.request(outcome, took);
        result
    }

    /// Leaves the fleet, all within `timeout`: waits for the registry writer to finish
    /// (call after the events' `close`, which stops it once the shards' last
    /// `disconnected` are written) and for the session changes of the stop to be in
    /// JetStream (their wills' keys emptied: the stop published those wills), then gives
    /// up this node's lease, waits for message routing to have NATS read its last
    /// messages (the wills of the stop, `routing/last_words.rs`), and stops the other
    /// tasks.
    pub fn close(&self, runtime: &tokio::runtime::Handle, timeout: Duration) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let routing = (self.routing_task.lock())
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let took = || started.elapsed().as_millis() as u64;
        runtime.block_on(async {
            // The registry writer is the last task; it ends when the events stop.
            finished(tasks.last(), deadline).await;
            tracing::debug!(node = %self.node, ms = took(), "cluster: leaving: the registry writer is done");
            if !self.sessions.written(deadline).await {
                tracing::warn!(node = %self.node, "cluster: the stop's last session changes are not all in JetStream; another node may publish again wills this stop published");
            }
            tracing::debug!(node = %self.node, ms = took(), "cluster: leaving: the session changes are in JetStream");
            self.stop.cancel();
            let leaving = self.registry.drop_lease();
            if tokio::time::timeout_at(deadline, leaving).await.is_err() {
                tracing::warn!(node = %self.node, "cluster: could not give up the lease; it expires by itself");
            }
            let _ = tokio::time::timeout_at(deadline, self.client.flush()).await;
            tracing::debug!(node = %self.node, ms = took(), "cluster: leaving: the lease is given up");
            // The wills of the stop go out before the routing connection closes.
            finished(routing.as_ref(), deadline).await;
            tracing::debug!(node = %self.node, ms = took(), "cluster: left the fleet");
        });
        for t in tasks.into_iter().chain(routing) {
            t.abort();
        }
    }
}

/// Waits until `task` (if any) has finished, or until `deadline`.
async fn finished(task: Option<&JoinHandle<()>>, deadline: tokio::time::Instant) {
    let Some(task) = task else { return };
    while !task.is_finished() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
