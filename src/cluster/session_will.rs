//! Wills that survive the node (issue 20): the will of every online session is kept in
//! the session bucket, so that when its node dies one surviving node publishes it, once
//! fleet-wide.
//!
//! **Kept.** The shard hands the will of the session's connection to the store when the
//! session comes online, and "none" when it goes offline (`Op::Will`, not written to the
//! local file): a clean DISCONNECT, a will the node published itself, a session handed
//! over, all leave nothing. A session that ends with its connection hands its will with
//! no delay, and nothing at all without a will (`shard/durable.rs`). The mirror writes
//! it to `will.<node>.<id>` (an empty value for none) and, once at start,
//! `wnode.<node>`, which lists the nodes that may leave wills behind.
//!
//! **Published.** Every `cluster.lease_secs` each node reads `wnode.>` and asks the
//! registry whether each other node still holds its lease. For a node that does not, it
//! takes each of its non-empty wills by compare-and-set on the key's revision (the value
//! `claimed`: two survivors never both win), waits the will's delay (MQTT 5 Will Delay
//! Interval), and publishes it as the node's own PUBLISH would (at most 256 at once; local
//! subscribers through the shards, other nodes through routing, retained if asked) —
//! unless the registry names another node for the client id by then (the device came
//! back elsewhere; not a node that only took its session in, `take_in`). Then the key
//! is purged; a dead node with no will left loses its `wnode` entry. A survivor that dies while it holds a claimed will (during its delay)
//! loses that will. A node back after a crash within its lease publishes its own
//! (`session_leftover`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::codec::Will;
use crate::mailbox::{Mailboxes, ShardMsg};
use crate::message::{Message, Origin};
use crate::store::mirror;

use super::routing::Router;
use super::session_changes::Change;
use super::sessions::{key, SessionStore};
use super::take_in::back_elsewhere;

/// The value of a will a survivor took (it is not a will: nobody else publishes it).
const CLAIMED: &[u8] = b"claimed";

/// Whether a will key's value is a claim (`claimed`, or a node's own unique
/// `claimed:…`, `session_leftover`): not a will.
pub(super) fn is_claim(value: &[u8]) -> bool {
    value.starts_with(CLAIMED)
}

impl SessionStore {
    /// The bucket key of `client_id`'s will on `node`.
    fn will_key(node: &str, client_id: &str) -> String {
        format!("will.{node}.{}", key(client_id))
    }

    /// The change that keeps (or, `None`, empties) `client_id`'s will.
    pub(super) fn will_change(&self, client_id: &str, will: Option<&Will>) -> Change {
        let subject = format!(
            "{}.{}",
            self.kv_prefix,
            Self::will_key(&self.link.node, client_id)
        );
        let value = will.map_or_else(Bytes::new, |w| will_bytes(client_id, w).into());
        Change::Put { subject, value }
    }

    /// The change that names this node among those that may leave wills behind.
    pub(super) fn will_node_change(&self) -> Change {
        Change::Put {
            subject: format!("{}.wnode.{}", self.kv_prefix, self.link.node),
            value: Bytes::copy_from_slice(self.link.node.as_bytes()),
        }
    }

    /// Looks for dead nodes' wills every `every`, until `stop`.
    pub async fn watch_wills(
        self: Arc<Self>,
        shards: Mailboxes,
        router: Arc<Router>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let leftover =
            self.clone()
                .handle_leftover_wills(shards.clone(), router.clone(), every, stop.clone());
        tokio::spawn(leftover);
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.link.connected() {
                continue;
            }
            if let Err(e) = self.sweep_wills(&shards, &router).await {
                tracing::debug!(error = %e, "cluster: looking for dead nodes' wills failed");
            }
        }
    }

    async fn sweep_wills(&self, shards: &Mailboxes, router: &Arc<Router>) -> Result<(), String> {
        let nodes = self
            .last_values(format!("{}.wnode.*", self.kv_prefix))
            .await?;
        for (subject, node) in nodes {
            let node = String::from_utf8_lossy(&node).into_owned();
            // An entry is `wnode.<node>` = `<node>`; anything else is not one.
            let named = subject.rsplit('.').next() == Some(node.as_str());
            if node.is_empty() || *node == *self.link.node || !named {
                continue;
            }
            let alive = self.link.registry.alive(&node).await;
            if !alive.map_err(|e| format!("lease of {node}: {e}"))? {
                self.take_wills(&node, shards, router).await?;
            }
        }
        Ok(())
    }

    /// Takes the wills dead `node` left, each by compare-and-set, and publishes them.
    async fn take_wills(
        &self,
        node: &str,
        shards: &Mailboxes,
        router: &Arc<Router>,
    ) -> Result<(), String> {
        let kv = self.will_bucket().await?;
        let prefix = format!("{}.will.{node}.", self.kv_prefix);
        let wills = self.last_values(format!("{prefix}*")).await?;
        let mut left = false;
        for (subject, value) in wills {
            // A claim left behind (its claimant died) is no will left: it does not keep
            // the node's `wnode` entry.
            if value.is_empty() || is_claim(&value) {
                continue;
            }
            left = true;
            let id_key = subject.trim_start_matches(&prefix);
            let key = format!("will.{node}.{id_key}");
            let Some(entry) = kv.entry(&key).await.map_err(|e| e.to_string())? else {
                continue;
            };
            if entry.value.is_empty() || is_claim(&entry.value) {
                continue;
            }
            let claim = kv.update(&key, Bytes::from_static(CLAIMED), entry.revision);
            let Ok(claimed) = claim.await else {
                continue; // another survivor took it
            };
            let taken = (key, claimed, entry.value);
            self.spawn_will(kv.clone(), taken, node, shards, router);
        }
        if !left {
            let _ = kv.purge(format!("wnode.{node}")).await;
        }
        Ok(())
    }

    pub(super) async fn will_bucket(&self) -> Result<kv::Store, String> {
        let bucket = self.kv_prefix.trim_start_matches("$KV.").to_string();
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| e.to_string())
    }

    /// Publishes a will taken from dead `node` after its delay, unless its client came
    /// back on a live node meanwhile; then purges its key, unless it changed since the
    /// `claimed` revision.
    fn spawn_will(
        &self,
        kv: kv::Store,
        (key, claimed, value): (String, u64, Bytes),
        node: &str,
        shards: &Mailboxes,
        router: &Arc<Router>,
    ) {
        let Some((client_id, will)) = parse_will(&value) else {
            tracing::warn!(key, "cluster: a dead node's will does not decode; dropped");
            tokio::spawn(async move { kv.purge_expect_revision(key, Some(claimed)).await });
            return;
        };
        let (shards, router) = (shards.clone(), router.clone());
        let (registry, dead) = (self.link.registry.clone(), node.to_string());
        let (bucket, kv_prefix) = (self.kv.clone(), self.kv_prefix.clone());
        let (metrics, permits) = (self.metrics.wills.clone(), self.will_permits.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(will.delay_secs))).await;
            let Ok(permit) = permits.acquire().await else {
                return;
            };
            let back = back_elsewhere(&registry, &bucket, &kv_prefix, &client_id, &dead);
            if back.await {
                tracing::info!(%client_id, node = %dead, "cluster: a dead node's will is not published: its client is back on another node");
                metrics.cancelled.inc();
            } else {
                tracing::info!(%client_id, node = %dead, topic = %will.topic, "cluster: publishing the will a dead node left");
                publish(&shards, &router, &will);
                metrics.published.inc();
            }
            drop(permit);
            // Only the claim: should the node be back under its id, a device of it
            // may have written a new will there meanwhile.
            let _ = kv.purge_expect_revision(key, Some(claimed)).await;
        });
    }
}

/// Publishes `will` here as a device's PUBLISH would be: every shard's subscribers (and
/// retained copy), and the other nodes through routing.
pub(super) fn publish(shards: &Mailboxes, router: &Arc<Router>, will: &Will) {
    let expiry = will.props.as_ref().and_then(|p| p.message_expiry);
    let msg = Arc::new(will_message(will).with_expiry_secs(expiry));
    let sent = shards.try_send_to(
        |_| true,
        |_| ShardMsg::PushTopic {
            msg: msg.clone(),
            reply: tokio::sync::oneshot::channel().0,
        },
    );
    if sent.is_err() {
        tracing::warn!(topic = %will.topic, "cluster: a dead node's will did not reach every shard (mailbox full)");
    }
    router.handle().offer(&msg);
}

/// The message `w` publishes (its expiry counted by the caller).
fn will_message(w: &Will) -> Message {
    let topic: Arc<str> = Arc::from(w.topic.as_str());
    let mut msg = Message::new(topic, w.payload.clone(), w.qos, w.retain, Origin::Gateway);
    msg.props = w.props.clone();
    msg
}

/// A will of `client_id`: the client id, the delay, then the message record.
fn will_bytes(client_id: &str, w: &Will) -> Vec<u8> {
    let msg = will_message(w);
    let record = mirror::message_bytes(client_id, &msg, w.qos, w.retain);
    let mut out = Vec::with_capacity(client_id.len() + record.len() + 8);
    out.extend_from_slice(&(client_id.len() as u32).to_le_bytes());
    out.extend_from_slice(client_id.as_bytes());
    out.extend_from_slice(&w.delay_secs.to_le_bytes());
    out.extend_from_slice(&record);
    out
}

/// The client id and will written by [`will_bytes`].
pub(super) fn parse_will(b: &[u8]) -> Option<(String, Will)> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let client_id = std::str::from_utf8(b.get(4..4 + len)?).ok()?.to_string();
    let rest = b.get(4 + len..)?;
    let delay_secs = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    let (msg, qos) = mirror::parse_message(rest.get(4..)?, &client_id)?;
    let will = Will {
        topic: msg.topic.to_string(),
        payload: msg.payload.clone(),
        qos,
        retain: msg.retain,
        delay_secs,
        props: msg.props.clone(),
    };
    Some((client_id, will))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_will_reads_back_as_written() {
        let w = Will {
            topic: "dev/gone".into(),
            payload: Bytes::from_static(b"bye"),
            qos: 1,
            retain: true,
            delay_secs: 7,
            props: Some(Box::new(crate::codec::PublishProps {
                content_type: Some("text/plain".into()),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            })),
        };
        let (id, back) = parse_will(&will_bytes("dev.1", &w)).expect("decodes");
        assert_eq!((id.as_str(), back), ("dev.1", w));
        assert!(parse_will(b"claimed").is_none());
    }
}
