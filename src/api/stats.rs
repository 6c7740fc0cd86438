//! `GET /v1/stats`: this node's connections, sessions, subscriptions and queued
//! messages, in all and per shard, read from the shards' single-writer counters; with
//! `?scope=fleet`, every node holding a lease answers its own (`Service::Stats` over
//! NATS, all asked at once, each within `cluster.request_timeout_ms`) and the totals
//! are their sum. A node that does not answer in time is listed with its error and left
//! out of the totals, so one dead node does not hold the answer. The leases are listed
//! per request; when that fails, the node's own last look at them stands in, and only
//! without a recent one is the answer a 503.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::cluster::{RequestError, Service};

use super::clients::{checked_query, RawQuery};
use super::error::ApiError;
use super::fleet::fleet_unavailable;
use super::{ApiState, Inner};

/// The counters summed into the totals.
const TOTALS: [&str; 4] = [
    "connections",
    "sessions",
    "subscriptions",
    "queued_messages",
];

/// What `scope` asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Node,
    Fleet,
}

pub(super) async fn stats(State(s): State<ApiState>, query: RawQuery) -> Response {
    let scope = match scope(query) {
        Ok(scope) => scope,
        Err(e) => return e.into_response(),
    };
    let body = match scope {
        Scope::Node => local(&s.inner),
        Scope::Fleet => match fleet(&s.inner).await {
            Ok(body) => body,
            Err(e) => return e.into_response(),
        },
    };
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// `?scope=node` (the default) or `?scope=fleet`; anything else is a 400 naming it.
fn scope(query: RawQuery) -> Result<Scope, ApiError> {
    match checked_query(query, &["scope"])?.pop() {
        None => Ok(Scope::Node),
        Some((_, v)) if v == "node" => Ok(Scope::Node),
        Some((_, v)) if v == "fleet" => Ok(Scope::Fleet),
        Some((k, _)) => Err(ApiError::bad(k, "`scope` must be node or fleet")),
    }
}

/// This node's figures, per shard and summed.
pub(super) fn local(inner: &Inner) -> Value {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let shards: Vec<Value> = inner
        .shards
        .iter()
        .enumerate()
        .map(|(i, m)| {
            json!({
                "shard": i,
                "connections": load(&m.connections),
                "sessions": load(&m.sessions),
                "subscriptions": load(&m.subscriptions),
                "queued_messages": load(&m.queued_messages),
                "wheel_entries": load(&m.wheel_entries),
            })
        })
        .collect();
    let mut body = json!({ "shards": shards });
    for key in TOTALS {
        body[key] = sum(body["shards"].as_array().into_iter().flatten(), key).into();
    }
    body
}

/// `key` summed over `items`.
fn sum<'a>(items: impl Iterator<Item = &'a Value>, key: &str) -> u64 {
    items.map(|v| v[key].as_u64().unwrap_or(0)).sum()
}

/// Every live node's figures (this one's read here), and their totals. Without a
/// fleet, this node alone.
async fn fleet(inner: &Inner) -> Result<Value, ApiError> {
    let Some(fleet) = &inner.fleet else {
        let here = inner.config.cluster.node();
        return Ok(totalled(vec![with_node(&here, local(inner))]));
    };
    let mut nodes = vec![with_node(&fleet.node, local(inner))];
    let live = fleet
        .live_nodes()
        .await
        .map_err(|e| fleet_unavailable(format!("listing the node leases: {e}")))?;
    let timeout = inner.config.cluster.request_timeout();
    let others = live.iter().filter(|n| **n != *fleet.node);
    let asks = others.map(|node| async move {
        let answer = fleet
            .request(node, Service::Stats, Bytes::new(), timeout)
            .await;
        (node, answer)
    });
    for (node, answer) in futures_util::future::join_all(asks).await {
        nodes.push(answered(node, answer));
    }
    Ok(totalled(nodes))
}

/// `nodes` and the totals of those that answered.
fn totalled(nodes: Vec<Value>) -> Value {
    let answered = nodes.iter().filter(|n| n.get("error").is_none());
    let mut body = json!({});
    for key in TOTALS {
        body[key] = sum(answered.clone(), key).into();
    }
    body["nodes"] = Value::Array(nodes);
    body
}

/// A node's figures with its id.
fn with_node(node: &str, mut figures: Value) -> Value {
    figures["node"] = node.into();
    figures
}

/// Another node's answer, or its error in its place.
fn answered(node: &str, answer: Result<Bytes, RequestError>) -> Value {
    let error = match answer {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(figures) if figures.is_object() => return with_node(node, figures),
            _ => "unreadable answer".to_string(),
        },
        Err(RequestError::NoResponders) => "no_responders".into(),
        Err(RequestError::TimedOut) => "timeout".into(),
        Err(RequestError::Nats(e)) => e,
    };
    json!({ "node": node, "error": error })
}

/// Answers another node's `?scope=fleet` question with this node's figures.
pub(super) async fn serve_stats(state: ApiState, _request: Bytes) -> Bytes {
    Bytes::from(serde_json::to_vec(&local(&state.inner)).unwrap_or_default())
}
