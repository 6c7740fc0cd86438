//! Retained messages across the fleet: a retained message published on one node is
//! delivered to a later subscriber on any node, and a clear (an empty retained payload)
//! on one node clears it on all.
//!
//! The fleet's retained messages live in a JetStream key-value bucket,
//! `<registry_bucket>_retained` (one value per key: a stream keeping the last message of
//! each subject). The routing task that publishes a node's messages also puts each
//! retained one there, on the same connection (`PUB $KV.<bucket>.<key>`, the topic with
//! bytes other than letters, digits, `-`, `_` as `=XX`); a clear is put as an empty
//! payload. Every node watches the bucket from its last value of each key on
//! ([`follow`]) and hands each update to the topic's home shard
//! (`ShardMsg::FleetRetained`), which applies it to its retained store as it applies its
//! own devices' (`shard/retained.rs`: in order, within its share of
//! `max_retained_messages` and the byte bounds, stored, then copied to the other shards).
//!
//! The stream gives all updates of a topic one order, and every node applies them in
//! that order, so concurrent updates on two nodes end with one value everywhere. A node
//! applies its own devices' updates at once and again when they come back from the
//! bucket, so its copy may briefly go back to an older value of a topic updated twice in
//! quick succession before it settles. Live delivery is separate (the message itself is
//! routed as any other). In the bucket, the envelope's `seq` holds the put's wall-clock
//! time (ms since the epoch), so a node reading it later knows how much of its message
//! expiry is left.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::store::now_ms;

use crate::config::ClusterConfig;
use crate::mailbox::{home_shard, Mailboxes, ShardMsg};
use crate::message::{Message, Origin};

use super::envelope::Envelope;
use super::metrics::{RouteDrop, RouteMetrics};

/// The bucket of the fleet's retained messages.
pub fn bucket(config: &ClusterConfig) -> String {
    format!("{}_retained", config.registry_bucket)
}

/// The bucket key of `topic`.
pub fn key(topic: &str) -> String {
    crate::events::nats::escape(topic, '=')
}

/// The topic of a bucket key made by [`key`].
pub fn topic_of(key: &str) -> Option<String> {
    crate::events::nats::unescape(key, b'=').filter(|t| !t.is_empty())
}

/// Opens (or creates) the bucket.
pub async fn open(
    client: &async_nats::Client,
    config: &ClusterConfig,
) -> Result<kv::Store, String> {
    let js = async_nats::jetstream::new(client.clone());
    super::super::registry::open_bucket(&js, &bucket(config), Duration::ZERO).await
}

/// Clears `topic`'s retained message fleet-wide (`DELETE /v1/retained` in a fleet): an
/// empty payload put into the bucket, as a device's clear is.
pub async fn clear(kv: &kv::Store, topic: &str, origin: &str) -> Result<(), String> {
    let body = Envelope {
        origin: origin.to_string(),
        seq: now_ms(),
        qos: 0,
        retain: true,
        expiry_ms: None,
        props: None,
        payload: Default::default(),
    }
    .encode();
    kv.put(key(topic), body)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Applies every value of the bucket, then every update, until `stop`; watches again
/// (from each key's last value) after an error.
pub async fn follow(
    kv: kv::Store,
    shards: Mailboxes,
    metrics: Arc<RouteMetrics>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let mut watch = match kv.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot watch the retained messages bucket; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                e = watch.next() => e,
                _ = stop.cancelled() => return,
            };
            match entry {
                Some(Ok(entry)) => {
                    let Some(msg) = message(&entry, now_ms()) else {
                        metrics.drop_msg(RouteDrop::Malformed);
                        continue;
                    };
                    metrics.retained_in();
                    let home = home_shard(&msg.topic, shards.len());
                    if shards
                        .send(home, ShardMsg::FleetRetained(msg))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cluster: the retained messages watch failed; watching again");
                    break;
                }
                None => break,
            }
        }
    }
}

/// The retained update an entry carries (an empty payload clears the topic).
fn message(entry: &kv::Entry, now_ms: u64) -> Option<Arc<Message>> {
    let topic: Arc<str> = topic_of(&entry.key)?.into();
    let clear = || {
        Arc::new(Message::new(
            topic.clone(),
            Default::default(),
            0,
            true,
            Origin::Gateway,
        ))
    };
    if entry.operation != kv::Operation::Put {
        return Some(clear());
    }
    let env = Envelope::decode(entry.value.clone()).ok()?;
    let left = env
        .expiry_ms
        .map(|ms| ms.saturating_sub(now_ms.saturating_sub(env.seq)));
    if left == Some(0) {
        return Some(clear());
    }
    let mut msg = Message::new(topic, env.payload, env.qos, true, Origin::Gateway);
    msg.props = env.props;
    msg.expires = left.map(|ms| msg.created + Duration::from_millis(ms));
    Some(Arc::new(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for t in ["a/b", "$SYS/x y", "é/=/", "/"] {
            assert_eq!(topic_of(&key(t)).as_deref(), Some(t));
        }
        assert_eq!(key("a/b.c"), "a=2Fb=2Ec");
        assert_eq!(topic_of("=2"), None);
        assert_eq!(topic_of(""), None);
    }
}
