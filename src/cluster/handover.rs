//! Moving a persistent session between two live nodes (issue 19 point 4): a device that
//! resumes its session on node B while node A holds it.
//!
//! Before B reads the session from JetStream (`sessions`), it asks the node the registry
//! names for the client id, on `<subject_prefix>.node.<A>.handover`, to let it go. A's
//! home shard closes the connection, if any, with MQTT 5 DISCONNECT 0x8E and without
//! publishing its will (the device lives on, on B), and ends the session there without
//! purging the fleet's copy; A answers once its mirror has written everything the
//! session had before that end, so B reads all of it. A node that is gone ("no
//! responders") has nothing to hand over: B reads what the fleet kept. A node that does
//! not answer within `request_timeout_ms` makes B refuse the CONNECT as unavailable
//! (the device retries) rather than resume a session two nodes would then hold.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Request, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::ClusterConfig;
use crate::mailbox::{home_shard, Mailboxes, ShardMsg};

use super::registry::Registry;
use super::sessions::SessionStore;

/// What a handover needs from the fleet: NATS, the registry and this node's name.
pub struct Link {
    client: async_nats::Client,
    pub(super) registry: Arc<Registry>,
    pub(super) node: Arc<str>,
    prefix: String,
    pub(super) timeout: Duration,
}

impl Link {
    pub fn new(
        client: &async_nats::Client,
        config: &ClusterConfig,
        registry: &Arc<Registry>,
        node: &Arc<str>,
    ) -> Link {
        Link {
            client: client.clone(),
            registry: registry.clone(),
            node: node.clone(),
            prefix: config.subject_prefix.clone(),
            timeout: config.request_timeout(),
        }
    }
}

impl Link {
    /// Whether this node's NATS connection is up now.
    pub(super) fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// The subject on which `node` hands its sessions over.
pub fn subject(prefix: &str, node: &str) -> String {
    format!("{prefix}.node.{node}.handover")
}

impl SessionStore {
    /// Before a CONNECT here resumes (or cleanly restarts) `client_id`'s session: the
    /// node the registry names for it, if another, lets it go first.
    pub(super) async fn take_from_holder(&self, client_id: &str) -> Result<(), String> {
        let link = &self.link;
        let holder = link
            .registry
            .holder(client_id)
            .await
            .map_err(|e| format!("registry: {e}"))?;
        let Some(node) = holder.filter(|n| **n != *link.node) else {
            return Ok(());
        };
        let request = Request::new()
            .payload(Bytes::copy_from_slice(client_id.as_bytes()))
            .timeout(Some(link.timeout));
        match link
            .client
            .send_request(subject(&link.prefix, &node), request)
            .await
        {
            Ok(m) if m.payload.is_empty() => Ok(()),
            Ok(m) => Err(format!(
                "node {node} did not hand the session over: {}",
                String::from_utf8_lossy(&m.payload)
            )),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(format!("node {node} did not hand the session over: {e}")),
        }
    }

    /// Answers other nodes' handover requests, each in its own task.
    pub(super) async fn serve_handovers(
        self: Arc<Self>,
        mut sub: async_nats::Subscriber,
        shards: Mailboxes,
    ) {
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply else { continue };
            let client_id = String::from_utf8_lossy(&msg.payload).into_owned();
            let (this, shards) = (self.clone(), shards.clone());
            tokio::spawn(async move {
                let answer = match this.hand_over(client_id, &shards).await {
                    true => Bytes::new(),
                    false => Bytes::from_static(b"its shard's mailbox is full"),
                };
                let _ = this.link.client.publish(reply, answer).await;
            });
        }
    }

    /// Lets `client_id`'s session here go, and waits (at most the request timeout) until
    /// what it held is in JetStream. False if its shard could not be asked.
    async fn hand_over(&self, client_id: String, shards: &Mailboxes) -> bool {
        let deadline = tokio::time::Instant::now() + self.link.timeout;
        self.settled(&client_id).await;
        let id: Arc<str> = Arc::from(client_id.as_str());
        let (done, written) = tokio::sync::oneshot::channel();
        self.seqs().moving.insert(id.clone(), done);
        let _ = self.link.registry.left(&client_id);
        let (reply, stored) = tokio::sync::oneshot::channel();
        let home = home_shard(&client_id, shards.len());
        let asked = shards.try_send(home, ShardMsg::HandOver { client_id, reply });
        let wait = async {
            if asked.is_ok() && stored.await == Ok(true) {
                self.metrics.handed_over.inc();
                let _ = written.await;
            }
        };
        if tokio::time::timeout_at(deadline, wait).await.is_err() {
            tracing::warn!(client_id = %id, "cluster: the session handed over was not written to JetStream in time");
        }
        self.seqs().moving.remove(&id);
        asked.is_ok()
    }
}
