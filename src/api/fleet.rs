//! Pushes across the fleet (`[cluster] enabled`, see `crate::cluster`): a client push
//! whose device the registry places on another node is sent to that node over NATS
//! (request/reply); that node delivers it through the device's home shard exactly as its
//! own API would and answers the outcome, which this node answers its caller.
//!
//! - `sent`, `queued`, `offline`, `dropped` and `acked` (with `wait_ack`: the holding node
//!   waits for the PUBACK) come back as the holding node decided them, and its errors
//!   (`overloaded`, `answer_timeout`, `ack_timeout`) with their HTTP status.
//! - "No responders" (nobody listens on the node's subject: it is gone): if the node's
//!   lease has expired, the device's persistent session, if the fleet keeps one, is
//!   taken in here (`crate::cluster::take_in`) and the push goes to it (`queued`);
//!   without one the registry entry is stale, removed, and the push answers `offline`;
//!   while the lease still runs, `503 node_unreachable` (the device may come back on
//!   another node: retry).
//! - No answer within `cluster.request_timeout_ms` (plus `timeout_ms` with `wait_ack`):
//!   `504 answer_timeout`; NATS unreachable: `503 fleet_unavailable`.
//!
//! Batches: items are grouped by the node that holds their device, one request per node,
//! and every item keeps its own answer in its own place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::cluster::take_in::TakeIn;
use crate::cluster::{Handler, Located, RequestError, Service};
use crate::mailbox::{home_shard, ShardMsg};
use futures_util::StreamExt;

use super::clients::ask_home;
use super::error::ApiError;
use super::message_id::MessageId;
use super::push::{push_grouped, shutting_down};
use super::spec::{PushAnswer, PushSpec};
use super::{ApiState, Inner};

/// One push as it travels to the holding node.
#[derive(Serialize, Deserialize)]
struct WireItem {
    client_id: String,
    topic: String,
    /// Base64.
    payload: String,
    qos: u8,
    retain: bool,
    ttl_secs: Option<u32>,
    wait_ack: bool,
    timeout_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct WireRequest {
    /// Milliseconds since the push reached the first node (TTLs and timeouts count from
    /// then).
    age_ms: u64,
    items: Vec<WireItem>,
}

/// One item's outcome: `status` (and `reason`), or `error`.
#[derive(Serialize, Deserialize, Default)]
struct WireResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<WireError>,
}

#[derive(Serialize, Deserialize)]
struct WireError {
    http: u16,
    code: String,
    message: String,
}

#[derive(Serialize, Deserialize)]
struct WireReply {
    results: Vec<WireResult>,
}

/// A client push whose device another node holds, by the registry entry of `revision`.
pub(super) struct Remote {
    pub(super) node: String,
    pub(super) revision: u64,
}

/// The error codes another node may answer; any other is `remote_error`.
const CODES: [&str; 6] = [
    "overloaded",
    "answer_timeout",
    "ack_timeout",
    "shutting_down",
    "invalid_field",
    "fleet_unavailable",
];
/// The statuses and drop reasons a node answers.
const STATUSES: [&str; 5] = ["sent", "queued", "offline", "acked", "dropped"];
const REASONS: [&str; 6] = [
    "slow_consumer",
    "queue_full",
    "expired",
    "too_large",
    "mailbox_full",
    "offline",
];

fn known(list: &[&'static str], s: &str) -> Option<&'static str> {
    list.iter().find(|k| **k == s).copied()
}

pub(super) fn fleet_unavailable(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "fleet_unavailable",
        format!("the fleet's NATS cannot be reached ({what}); retry later"),
    )
}

fn node_unreachable(node: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "node_unreachable",
        format!("node {node} holds this device but does not answer (its lease has not expired yet); the push was not delivered: retry"),
    )
}

impl Inner {
    /// Where a push to `client_id` goes: `None` for this node (no fleet, the device is
    /// here, or the registry knows it nowhere), else the node holding it.
    pub(super) async fn remote_home(&self, client_id: &str) -> Result<Option<Remote>, ApiError> {
        let Some(fleet) = &self.fleet else {
            return Ok(None);
        };
        match fleet.registry.locate(client_id).await {
            Ok(Located::Here) => Ok(None),
            Ok(Located::Elsewhere { node, revision }) => Ok(Some(Remote { node, revision })),
            Err(e) => Err(fleet_unavailable(e)),
        }
    }

    /// One client push to the node holding its device.
    pub(super) async fn push_remote_one(
        &self,
        id: MessageId,
        spec: &PushSpec,
        remote: Remote,
        received: Instant,
    ) -> Result<PushAnswer, ApiError> {
        let node = remote.node.clone();
        let mut r = self
            .push_remote(&node, vec![(spec, remote.revision)], vec![id], received)
            .await;
        r.pop().unwrap_or_else(|| Err(remote_error("no answer")))
    }

    /// Pushes `items` (each with its registry revision) to `node` in one request: one
    /// result per item, in order, with the `ids` this node gave them.
    pub(super) async fn push_remote(
        &self,
        node: &str,
        items: Vec<(&PushSpec, u64)>,
        ids: Vec<MessageId>,
        received: Instant,
    ) -> Vec<Result<PushAnswer, ApiError>> {
        let Some(fleet) = &self.fleet else {
            return ids.iter().map(|_| Err(remote_error("no fleet"))).collect();
        };
        let waits = items
            .iter()
            .filter(|(s, _)| s.wait_ack)
            .map(|(s, _)| s.timeout);
        let timeout = self.config.cluster.request_timeout() + waits.max().unwrap_or_default();
        let request = WireRequest {
            age_ms: received.elapsed().as_millis() as u64,
            items: items.iter().map(|(s, _)| wire_item(s)).collect(),
        };
        let payload = Bytes::from(serde_json::to_vec(&request).unwrap_or_default());
        let answer = fleet.request(node, Service::Push, payload, timeout).await;
        let reply = match answer {
            Ok(bytes) => serde_json::from_slice::<WireReply>(&bytes)
                .map_err(|e| remote_error(&format!("unreadable answer from node {node}: {e}"))),
            Err(RequestError::NoResponders) => {
                return self.node_gone(node, &items, ids, received).await;
            }
            Err(RequestError::TimedOut) => Err(ApiError::answer_timeout(timeout)),
            Err(RequestError::Nats(e)) => Err(fleet_unavailable(e)),
        };
        match reply {
            Ok(reply) => {
                let mut results = reply.results.into_iter();
                ids.into_iter()
                    .map(|id| match results.next() {
                        Some(r) => from_wire(id, r),
                        None => Err(remote_error(&format!("node {node} answered too few items"))),
                    })
                    .collect()
            }
            Err(e) => ids.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Nobody answers on `node`'s subject: with its lease expired, each device's
    /// persistent session is taken in here (`cluster::take_in`) and the push goes to it;
    /// an entry without one is stale (removed; the push is `offline`). With the lease
    /// still there, `503 node_unreachable`.
    async fn node_gone(
        &self,
        node: &str,
        items: &[(&PushSpec, u64)],
        ids: Vec<MessageId>,
        received: Instant,
    ) -> Vec<Result<PushAnswer, ApiError>> {
        let Some(fleet) = &self.fleet else {
            return Vec::new();
        };
        match fleet.registry.alive(node).await {
            Ok(false) => {
                tracing::info!(
                    node,
                    "cluster: node is gone and its lease expired; its devices' sessions are taken in here"
                );
                self.push_orphans(node, items, ids, received).await
            }
            Ok(true) => {
                tracing::warn!(
                    node,
                    "cluster: node holds a lease but nobody answers on its subject"
                );
                ids.iter().map(|_| Err(node_unreachable(node))).collect()
            }
            Err(e) => ids.iter().map(|_| Err(fleet_unavailable(&e))).collect(),
        }
    }

    /// Answers another node's request: its pushes delivered through their home shards
    /// here, one result per item, in order.
    async fn serve_remote(&self, bytes: Bytes) -> Bytes {
        let results = match serde_json::from_slice::<WireRequest>(&bytes) {
            Ok(request) => self.deliver_here(request).await,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: unreadable push request from another node");
                Vec::new()
            }
        };
        let reply = WireReply {
            results: results.into_iter().map(to_wire).collect(),
        };
        Bytes::from(serde_json::to_vec(&reply).unwrap_or_default())
    }

    async fn deliver_here(&self, request: WireRequest) -> Vec<Result<PushAnswer, ApiError>> {
        let now = Instant::now();
        let received = now
            .checked_sub(Duration::from_millis(request.age_ms))
            .unwrap_or(now);
        let n = request.items.len();
        let shards = self.mailboxes.len();
        let mut results: Vec<Option<Result<PushAnswer, ApiError>>> = (0..n).map(|_| None).collect();
        let mut per_shard: Vec<Vec<(usize, PushSpec)>> = (0..shards).map(|_| Vec::new()).collect();
        for (i, item) in request.items.into_iter().enumerate() {
            match spec_of(item) {
                Ok(spec) => {
                    let c = spec.client_id.as_deref().unwrap_or_default();
                    per_shard[home_shard(c, shards)].push((i, spec));
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        // The first node counts the push in its metrics; this one does not again.
        push_grouped(self, per_shard, received, &mut results, false).await;
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(remote_error("no answer"))))
            .collect()
    }
}

/// A device's state as another node answers it: `info` (`null`: no session there), or
/// `error`.
#[derive(Serialize, Deserialize, Default)]
struct WireClient {
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<WireError>,
}

impl Inner {
    /// `GET /v1/clients/{id}` in a fleet: the state from the node holding the device, or
    /// from this node, with `node` saying which.
    pub(super) async fn fleet_client_info(
        &self,
        state: &ApiState,
        client_id: &str,
    ) -> Result<Option<serde_json::Value>, ApiError> {
        let payload = Bytes::copy_from_slice(client_id.as_bytes());
        let local = self.local_client_info(state, client_id);
        self.ask_holder(client_id, Service::Client, payload, local)
            .await
    }

    /// `DELETE /v1/clients/{id}` in a fleet: done by the node holding the device (or
    /// here); `None` when nobody has a session, else whether a connection was closed.
    pub(super) async fn fleet_kick(
        &self,
        state: &ApiState,
        client_id: &str,
        clear_session: bool,
    ) -> Result<Option<bool>, ApiError> {
        let request = WireKick {
            client_id: client_id.to_string(),
            clear_session,
        };
        let payload = Bytes::from(serde_json::to_vec(&request).unwrap_or_default());
        let local = local_kick(state, request);
        let answer = self.ask_holder(client_id, Service::Kick, payload, local);
        Ok(answer.await?.map(|v| v["disconnected"] == true))
    }

    /// `service` for `client_id` from the node the registry names, or `local` when that
    /// is this node (or none): the answer's JSON, `None` for no session.
    async fn ask_holder(
        &self,
        client_id: &str,
        service: Service,
        payload: Bytes,
        local: impl std::future::Future<Output = Result<Option<serde_json::Value>, ApiError>>,
    ) -> Result<Option<serde_json::Value>, ApiError> {
        let (Some(fleet), Some(remote)) = (&self.fleet, self.remote_home(client_id).await?) else {
            return local.await;
        };
        let timeout = self.config.cluster.request_timeout();
        let node = &remote.node;
        match fleet.request(node, service, payload, timeout).await {
            Ok(bytes) => {
                let answer: WireClient = serde_json::from_slice(&bytes).map_err(|e| {
                    remote_error(&format!("unreadable answer from node {node}: {e}"))
                })?;
                match answer.error {
                    Some(e) => Err(wire_error(e)),
                    None => Ok(answer.info),
                }
            }
            Err(RequestError::NoResponders) => match fleet.registry.alive(node).await {
                Ok(false) => match self.take_in(client_id, node, remote.revision).await? {
                    true => local.await,
                    false => Ok(None),
                },
                Ok(true) => Err(node_unreachable(node)),
                Err(e) => Err(fleet_unavailable(e)),
            },
            Err(RequestError::TimedOut) => Err(ApiError::answer_timeout(timeout)),
            Err(RequestError::Nats(e)) => Err(fleet_unavailable(e)),
        }
    }

    /// Client pushes whose devices' node `dead` died (each with its registry entry's
    /// revision): each device's session is taken in here (all devices at once), then
    /// the pushes go to them in the batch's order; `offline` for a device the fleet
    /// keeps no session of.
    async fn push_orphans(
        &self,
        dead: &str,
        items: &[(&PushSpec, u64)],
        ids: Vec<MessageId>,
        received: Instant,
    ) -> Vec<Result<PushAnswer, ApiError>> {
        // Each device once (a batch may push several messages to one), by its place.
        let (mut devices, mut place) = (Vec::new(), HashMap::new());
        for (spec, revision) in items {
            let client_id = spec.client_id.as_deref().unwrap_or_default();
            place.entry(client_id).or_insert_with(|| {
                devices.push((client_id, *revision));
                devices.len() - 1
            });
        }
        let mut taking = Vec::with_capacity(devices.len());
        for &(client_id, revision) in &devices {
            taking.push(self.take_in(client_id, dead, revision));
        }
        let taking = futures_util::stream::iter(taking).buffered(crate::cluster::take_in::AT_ONCE);
        // Bounded by the answer timeout; the take-ins under way go on by themselves.
        let limit = self.answer_limit();
        let Ok(taken) = tokio::time::timeout(limit, taking.collect::<Vec<_>>()).await else {
            return ids
                .iter()
                .map(|_| Err(ApiError::answer_timeout(limit)))
                .collect();
        };
        let sent: Vec<_> = (items.iter().zip(ids))
            .map(|((spec, _), id)| {
                let client_id = spec.client_id.as_deref().unwrap_or_default();
                let here = match place.get(client_id).map(|&i| &taken[i]) {
                    Some(Ok(here)) => *here,
                    Some(Err(e)) => return (id, *spec, Err(e.clone())),
                    None => false,
                };
                let rx = here.then(|| {
                    let msg = self.message(spec, received);
                    self.send_client(client_id, msg, spec.wait_ack)
                });
                (id, *spec, rx.transpose())
            })
            .collect();
        let answers = sent.into_iter().map(|(id, spec, rx)| async move {
            let Some(rx) = rx? else {
                return Ok(client_answer(id, "offline", None));
            };
            let outcome = self.answer(rx, received).await?;
            let outcome = outcome.into_iter().next().ok_or_else(shutting_down)?;
            self.finish(id, spec, outcome).await
        });
        futures_util::future::join_all(answers).await
    }

    /// Takes in `client_id`'s session from `dead`, the node its registry entry (at
    /// `revision`) names: true if it is here now; false (the entry removed) when the
    /// fleet keeps none. Another node that holds it now: `503 moved`, to retry there;
    /// a take-in that failed: `503 fleet_unavailable` (the entry stays the dead node's).
    async fn take_in(&self, client_id: &str, dead: &str, revision: u64) -> Result<bool, ApiError> {
        let Some(fleet) = &self.fleet else {
            return Ok(false);
        };
        match fleet.sessions.take_in(client_id, dead, revision).await {
            Ok(TakeIn::Here) => Ok(true),
            Ok(TakeIn::Offline) => Ok(false),
            Ok(TakeIn::Elsewhere) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "moved",
                "the device's node died and another node holds its session now: retry".to_string(),
            )),
            Err(e) => {
                tracing::warn!(client_id, node = dead, error = %e, "cluster: a dead node's persistent session could not be taken in");
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "fleet_unavailable",
                    format!("the device's node died and its session could not be taken in here ({e}); nothing was sent: retry"),
                ))
            }
        }
    }

    /// This node's own answer for `client_id`, with `node` set to this node.
    async fn local_client_info(
        &self,
        state: &ApiState,
        client_id: &str,
    ) -> Result<Option<serde_json::Value>, ApiError> {
        let id = client_id.to_string();
        let info = ask_home(state, client_id, |reply| ShardMsg::ClientInfo {
            client_id: id,
            reply,
        })
        .await?;
        Ok(info.map(|i| {
            let mut v = serde_json::to_value(i).unwrap_or_default();
            if let Some(fleet) = &self.fleet {
                v["node"] = serde_json::Value::from(&*fleet.node);
            }
            v
        }))
    }
}

/// A `DELETE /v1/clients` for a device another node holds.
#[derive(Serialize, Deserialize)]
struct WireKick {
    client_id: String,
    clear_session: bool,
}

/// The kick done here: `{"disconnected": …}`, `None` for no session.
async fn local_kick(
    state: &ApiState,
    request: WireKick,
) -> Result<Option<serde_json::Value>, ApiError> {
    let client_id = request.client_id.clone();
    let kicked = ask_home(state, &client_id, |reply| ShardMsg::Kick {
        client_id: request.client_id,
        clear_session: request.clear_session,
        reply,
    })
    .await?;
    Ok(kicked.map(|was_online| serde_json::json!({ "disconnected": was_online })))
}

/// Another node's answer as the bytes of a [`WireClient`].
fn client_reply(r: Result<Option<serde_json::Value>, ApiError>) -> Bytes {
    let answer = match r {
        Ok(info) => WireClient { info, error: None },
        Err(e) => WireClient {
            info: None,
            error: Some(to_wire_error(&e)),
        },
    };
    Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
}

/// Answers another node's question about a device held here.
async fn serve_client_info(state: ApiState, bytes: Bytes) -> Bytes {
    let client_id = String::from_utf8_lossy(&bytes);
    client_reply(state.inner.local_client_info(&state, &client_id).await)
}

/// Disconnects a device held here for another node.
async fn serve_kick(state: ApiState, bytes: Bytes) -> Bytes {
    match serde_json::from_slice::<WireKick>(&bytes) {
        Ok(request) => client_reply(local_kick(&state, request).await),
        Err(e) => client_reply(Err(remote_error(&format!("unreadable kick request: {e}")))),
    }
}

impl ApiState {
    /// What this node answers to other nodes' requests (`crate::cluster`): pushes, a
    /// device's state, kicks, and its figures.
    pub(crate) fn fleet_handlers(&self) -> [(Service, Handler); 4] {
        let push_inner = self.inner.clone();
        let push: Handler = Arc::new(move |bytes| {
            let inner = push_inner.clone();
            Box::pin(async move { inner.serve_remote(bytes).await })
        });
        let state = self.clone();
        let client: Handler =
            Arc::new(move |bytes| Box::pin(serve_client_info(state.clone(), bytes)));
        let state = self.clone();
        let kick: Handler = Arc::new(move |bytes| Box::pin(serve_kick(state.clone(), bytes)));
        let state = self.clone();
        let stats: Handler =
            Arc::new(move |bytes| Box::pin(super::stats::serve_stats(state.clone(), bytes)));
        [
            (Service::Push, push),
            (Service::Client, client),
            (Service::Kick, kick),
            (Service::Stats, stats),
        ]
    }
}

/// Groups the client pushes of a batch whose devices other nodes hold by node, taking
/// them out of `per_shard`; a registry that cannot be read answers the item.
pub(super) async fn split_remote(
    inner: &Inner,
    per_shard: &mut [Vec<(usize, PushSpec)>],
    results: &mut [Option<Result<PushAnswer, ApiError>>],
) -> HashMap<String, Vec<(usize, PushSpec, u64)>> {
    let mut remote: HashMap<String, Vec<(usize, PushSpec, u64)>> = HashMap::new();
    if inner.fleet.is_none() {
        return remote;
    }
    // Every item's lookup at once.
    let lookups = per_shard
        .iter()
        .flatten()
        .map(|(_, spec)| inner.remote_home(spec.client_id.as_deref().unwrap_or_default()));
    let mut homes = futures_util::future::join_all(lookups).await.into_iter();
    for group in per_shard.iter_mut() {
        let mut local = Vec::with_capacity(group.len());
        for ((i, spec), home) in group.drain(..).zip(homes.by_ref()) {
            match home {
                Ok(None) => local.push((i, spec)),
                Ok(Some(r)) => remote
                    .entry(r.node)
                    .or_default()
                    .push((i, spec, r.revision)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        *group = local;
    }
    remote
}

/// Sends each node its group of a batch, all at once, and writes each item's result.
pub(super) async fn push_remote_groups(
    inner: &Inner,
    remote: HashMap<String, Vec<(usize, PushSpec, u64)>>,
    received: Instant,
    results: &mut [Option<Result<PushAnswer, ApiError>>],
) {
    let sends = remote.iter().map(|(node, group)| {
        let ids = group.iter().map(|_| inner.next_id()).collect();
        let items = group.iter().map(|(_, s, rev)| (s, *rev)).collect();
        inner.push_remote(node, items, ids, received)
    });
    let answers = futures_util::future::join_all(sends).await;
    for (group, answers) in remote.values().zip(answers) {
        for ((i, _, _), r) in group.iter().zip(answers) {
            inner.record(&r, received);
            results[*i] = Some(r);
        }
    }
}

fn remote_error(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "remote_error",
        format!("the node holding the device gave no usable answer: {what}"),
    )
}

fn client_answer(id: MessageId, status: &'static str, reason: Option<&'static str>) -> PushAnswer {
    PushAnswer::Client { id, status, reason }
}

fn wire_item(s: &PushSpec) -> WireItem {
    WireItem {
        client_id: s.client_id.clone().unwrap_or_default(),
        topic: s.topic.to_string(),
        payload: BASE64.encode(&s.payload),
        qos: s.qos,
        retain: s.retain,
        ttl_secs: s.ttl_secs,
        wait_ack: s.wait_ack,
        timeout_ms: s.timeout.as_millis() as u64,
    }
}

fn spec_of(item: WireItem) -> Result<PushSpec, ApiError> {
    let payload = BASE64
        .decode(item.payload.as_bytes())
        .map_err(|e| ApiError::bad("payload", format!("not base64 from another node: {e}")))?;
    Ok(PushSpec {
        client_id: Some(item.client_id),
        topic: Arc::from(item.topic),
        payload: Bytes::from(payload),
        qos: item.qos,
        retain: item.retain,
        ttl_secs: item.ttl_secs,
        wait_ack: item.wait_ack,
        timeout: Duration::from_millis(item.timeout_ms),
        idempotency_key: None,
    })
}

fn to_wire(r: Result<PushAnswer, ApiError>) -> WireResult {
    match r {
        Ok(PushAnswer::Client { status, reason, .. }) => WireResult {
            status: Some(status.into()),
            reason: reason.map(Into::into),
            error: None,
        },
        Ok(PushAnswer::Topic { .. }) => WireResult::default(),
        Err(e) => WireResult {
            error: Some(to_wire_error(&e)),
            ..Default::default()
        },
    }
}

fn to_wire_error(e: &ApiError) -> WireError {
    WireError {
        http: e.status.as_u16(),
        code: e.code.into(),
        message: e.message().into(),
    }
}

/// An error another node answered, with its status and (known) code.
fn wire_error(e: WireError) -> ApiError {
    let status = StatusCode::from_u16(e.http).unwrap_or(StatusCode::BAD_GATEWAY);
    let code = known(&CODES, &e.code).unwrap_or("remote_error");
    ApiError::new(status, code, e.message)
}

fn from_wire(id: MessageId, r: WireResult) -> Result<PushAnswer, ApiError> {
    if let Some(e) = r.error {
        return Err(wire_error(e));
    }
    let status = r.status.as_deref().and_then(|s| known(&STATUSES, s));
    let reason = r.reason.as_deref().and_then(|s| known(&REASONS, s));
    match status {
        Some(status) => Ok(client_answer(id, status, reason)),
        None => Err(remote_error("an unknown status")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_errors_cross_the_wire_unchanged() {
        let answers = [
            Ok(client_answer(MessageId::new(1, 1), "sent", None)),
            Ok(client_answer(MessageId::new(1, 2), "acked", None)),
            Ok(client_answer(
                MessageId::new(1, 3),
                "dropped",
                Some("too_large"),
            )),
            Err(ApiError::overloaded()),
        ];
        for a in answers {
            let want = format!(
                "{:?}",
                a.as_ref().map(PushAnswer::status).map_err(|e| e.code)
            );
            let json = serde_json::to_vec(&to_wire(a)).unwrap();
            let back = from_wire(MessageId::new(1, 4), serde_json::from_slice(&json).unwrap());
            let got = format!(
                "{:?}",
                back.as_ref().map(PushAnswer::status).map_err(|e| e.code)
            );
            assert_eq!(got, want);
        }
        let unknown = WireResult {
            status: Some("teleported".into()),
            ..Default::default()
        };
        assert_eq!(
            from_wire(MessageId::new(1, 4), unknown).unwrap_err().code,
            "remote_error"
        );
    }
}
