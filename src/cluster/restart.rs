//! A node that starts again after it died (`kill -9`, a lost machine brought back) must
//! not bring back from its local store the sessions that other nodes resumed meanwhile:
//! their state lives on in JetStream, and a stale copy here would deliver acknowledged
//! messages again and, once it expired, purge the fleet's live copy.
//!
//! So at start, before any shard runs and before the store's mirror is set, the local
//! sessions are kept only where the registry still names this node (nobody resumed them
//! elsewhere); the others are deleted from the local file only. The registry is read in
//! one pass (its entries' last values through one short-lived ordered consumer), not
//! one request per session.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::config::ClusterConfig;
use crate::store::StoredSession;

use super::Fleet;

/// How long the start waits for the registry's read.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Removes from `restore` (sessions by home shard) those the registry does not name this
/// node for, and returns their client ids.
pub fn drop_stale(
    fleet: &Fleet,
    config: &ClusterConfig,
    restore: &mut [Vec<StoredSession>],
    runtime: &tokio::runtime::Handle,
) -> Result<Vec<Arc<str>>, String> {
    if restore.iter().all(Vec::is_empty) {
        return Ok(Vec::new());
    }
    let read = async { tokio::time::timeout(READ_TIMEOUT, held_here(fleet, config)).await };
    let here = runtime
        .block_on(read)
        .map_err(|_| "cluster: the registry was not read within 60 s".to_string())??;
    let mut stale = Vec::new();
    for sessions in restore.iter_mut() {
        sessions.retain(|s| {
            let keep = here.contains(&super::registry::key(&s.client_id));
            if !keep {
                stale.push(s.client_id.clone());
            }
            keep
        });
    }
    if !stale.is_empty() {
        tracing::info!(node = %fleet.node, sessions = stale.len(), "cluster: local sessions resumed on other nodes meanwhile (or ended there) are not restored");
    }
    Ok(stale)
}

/// The registry keys that name this node.
async fn held_here(fleet: &Fleet, config: &ClusterConfig) -> Result<HashSet<String>, String> {
    let js = async_nats::jetstream::new(fleet.client.clone());
    let why = |e: &dyn std::fmt::Display| format!("cluster: cannot read the registry: {e}");
    let kv = js
        .get_key_value(&config.registry_bucket)
        .await
        .map_err(|e| why(&e))?;
    let mut here = HashSet::new();
    if kv.status().await.map_err(|e| why(&e))?.values() == 0 {
        return Ok(here);
    }
    let mut entries = kv.watch_with_history(">").await.map_err(|e| why(&e))?;
    while let Some(entry) = entries.next().await {
        let entry = entry.map_err(|e| why(&e))?;
        let put = entry.operation == async_nats::jetstream::kv::Operation::Put;
        if put && *entry.value == *fleet.node.as_bytes() {
            here.insert(entry.key);
        }
        if entry.delta == 0 {
            break;
        }
    }
    Ok(here)
}
