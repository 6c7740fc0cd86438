//! The listings (`GET /v1/clients` without a client id, `GET /v1/retained`) and
//! `DELETE /v1/retained`.
//!
//! Each shard answers for its own part through its mailbox (its sessions; the retained
//! topics homed on it), one bounded page at a time (`shard/listing.rs`); this module
//! asks every shard and merges their pages in key order. A page's `next_cursor` is the
//! last key it covered, so paging is stable while clients come and go: nothing is listed
//! twice and nothing that existed throughout is skipped.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::mailbox::{ListRequest, Page, PushStatus, RetainedDeleted, ShardMsg};
use crate::message::Message;
use crate::topic;

use super::clients::{checked_query, get_client_by_query, RawQuery};
use super::error::ApiError;
use super::{ApiState, Inner};

/// Entries on a page when the request gives no `limit` (at most `http.list_max_limit`).
const DEFAULT_LIMIT: u32 = 100;

/// A listing's parameters, checked.
#[derive(Default)]
struct ListQuery {
    cursor: Option<Arc<str>>,
    limit: usize,
    online: Option<bool>,
    filter: Option<Arc<str>>,
    topic: Option<Arc<str>>,
}

/// Parses the parameters in `allowed`, each at most once; a bad one is a 400 naming it.
fn list_query(inner: &Inner, query: RawQuery, allowed: &[&str]) -> Result<ListQuery, ApiError> {
    let max = inner.config.http.list_max_limit;
    let mut q = ListQuery {
        limit: DEFAULT_LIMIT.min(max) as usize,
        ..ListQuery::default()
    };
    for (k, v) in checked_query(query, allowed)? {
        match k {
            "cursor" => q.cursor = (!v.is_empty()).then(|| Arc::from(v.as_str())),
            "limit" => q.limit = parse_limit(&v, max)?,
            "online" => q.online = Some(parse_bool("online", &v)?),
            "filter" if topic::valid_topic_filter(&v) => q.filter = Some(Arc::from(v.as_str())),
            "filter" => {
                return Err(ApiError::bad(
                    k,
                    "`filter` must be a valid MQTT topic filter",
                ))
            }
            _ if topic::valid_topic_name(&v) => q.topic = Some(Arc::from(v.as_str())),
            _ => {
                return Err(ApiError::bad(
                    k,
                    "`topic` must be a valid MQTT topic name (no wildcards)",
                ))
            }
        }
    }
    Ok(q)
}

fn parse_limit(v: &str, max: u32) -> Result<usize, ApiError> {
    match v.parse::<u32>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n as usize),
        _ => Err(ApiError::bad(
            "limit",
            format!("`limit` must be an integer from 1 to {max} (http.list_max_limit)"),
        )),
    }
}

fn parse_bool(field: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ApiError::bad(
            field,
            format!("`{field}` must be true or false"),
        )),
    }
}

impl Inner {
    /// What one shard is asked to list for a page of `q`.
    fn list_request(&self, q: &ListQuery) -> ListRequest {
        ListRequest {
            after: q.cursor.clone(),
            limit: q.limit,
            scan: self.config.http.list_scan_max as usize,
            bytes: self.config.http.list_page_bytes as usize,
        }
    }

    /// Sends `make(shard)` to every shard (or, a mailbox being full, to none: 503) and
    /// waits for every answer.
    async fn ask_all<T>(
        &self,
        mut make: impl FnMut(oneshot::Sender<T>) -> ShardMsg,
    ) -> Result<Vec<T>, ApiError> {
        let received = Instant::now();
        let mut replies = Vec::with_capacity(self.mailboxes.len());
        self.mailboxes
            .try_send_all(|_| {
                let (tx, rx) = oneshot::channel();
                replies.push(rx);
                make(tx)
            })
            .map_err(|_| ApiError::overloaded())?;
        let mut answers = Vec::with_capacity(replies.len());
        for rx in replies {
            answers.push(self.answer(rx, received).await?);
        }
        Ok(answers)
    }
}

/// The shards' pages merged into one of at most `limit` entries in key order, and the
/// cursor of the next page (`None`: this was the last). Only entries up to the smallest
/// key some shard stopped at are kept: beyond it that shard has not looked yet.
fn merge<T>(
    pages: Vec<Page<T>>,
    limit: usize,
    key: impl Fn(&T) -> &str,
) -> (Vec<T>, Option<String>) {
    let bound = pages.iter().filter_map(|p| p.covered.clone()).min();
    let mut items: Vec<T> = pages
        .into_iter()
        .flat_map(|p| p.items)
        .filter(|t| bound.as_deref().is_none_or(|b| key(t) <= b))
        .collect();
    items.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    if items.len() > limit {
        items.truncate(limit);
        let last = items.last().map(|t| key(t).to_owned());
        return (items, last);
    }
    (items, bound.map(|b| b.to_string()))
}

/// `GET /v1/clients`: one client by `client_id` (query or JSON body), or else a page of
/// all of them.
pub(super) async fn get_clients(
    state: State<ApiState>,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let by_id = headers.contains_key(header::CONTENT_TYPE)
        || query
            .as_ref()
            .is_ok_and(|Query(pairs)| pairs.iter().any(|(k, _)| k == "client_id"));
    if by_id {
        return get_client_by_query(state, query, headers, body).await;
    }
    let State(s) = state;
    let inner = &s.inner;
    let result = async {
        let q = list_query(inner, query, &["cursor", "limit", "online"])?;
        let (req, online) = (inner.list_request(&q), q.online);
        let pages = inner
            .ask_all(|reply| ShardMsg::ListClients {
                req: req.clone(),
                online,
                reply,
            })
            .await?;
        let (clients, next) = merge(pages, q.limit, |c| c.client_id.as_str());
        Ok(json!({"clients": clients, "next_cursor": next}))
    }
    .await;
    json_answer(result)
}

/// `GET /v1/retained`: a page of the retained messages.
pub(super) async fn list_retained(State(s): State<ApiState>, query: RawQuery) -> Response {
    let inner = &s.inner;
    let result = async {
        let q = list_query(inner, query, &["cursor", "limit", "filter"])?;
        let req = inner.list_request(&q);
        let pages = inner
            .ask_all(|reply| ShardMsg::ListRetained {
                req: req.clone(),
                filter: q.filter.clone(),
                reply,
            })
            .await?;
        let (messages, next) = merge(pages, q.limit, |m| &*m.topic);
        let retained: Vec<Value> = messages.iter().map(|m| retained_json(m)).collect();
        Ok(json!({"retained": retained, "next_cursor": next}))
    }
    .await;
    json_answer(result)
}

/// One retained message as the API shows it: the payload as text when it is UTF-8,
/// else base64 (`encoding` says which, as in a push).
fn retained_json(m: &Message) -> Value {
    let (payload, encoding) = match std::str::from_utf8(&m.payload) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&m.payload),
            "base64",
        ),
    };
    json!({
        "topic": &*m.topic,
        "qos": m.qos,
        "payload_size": m.payload.len(),
        "payload": payload,
        "encoding": encoding,
    })
}

/// `DELETE /v1/retained?topic=`: forgets the topic's retained message on every shard and
/// deletes it from the store; answered once the store committed the deletion.
pub(super) async fn delete_retained(State(s): State<ApiState>, query: RawQuery) -> Response {
    let inner = &s.inner;
    let result = async {
        let q = list_query(inner, query, &["topic"])?;
        let topic = q.topic.ok_or_else(|| {
            ApiError::bad(
                "topic",
                "give the retained message's topic as the `topic` query parameter",
            )
        })?;
        let answers = inner
            .ask_all(|reply| ShardMsg::DeleteRetained {
                topic: topic.clone(),
                reply,
            })
            .await?;
        let existed = answers.iter().any(|a| a.existed);
        await_commit(inner, answers).await?;
        // In a fleet, every node forgets it too (the fleet's retained messages bucket).
        if let Some(fleet) = &inner.fleet {
            fleet.routing.clear_retained(&topic).await.map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "fleet_unavailable",
                    format!(
                        "deleted on this node, but the fleet's NATS cannot be reached ({e}); retry"
                    ),
                )
            })?;
        }
        if !existed {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no retained message for topic `{topic}`"),
            )
            .field("topic"));
        }
        tracing::info!(topic = %topic, "retained message deleted through the API");
        Ok(json!({"topic": &*topic, "deleted": true}))
    }
    .await;
    json_answer(result)
}

/// Waits for the store to commit a deletion (from the topic's home shard's answer).
async fn await_commit(inner: &Inner, answers: Vec<RetainedDeleted>) -> Result<(), ApiError> {
    let Some(rx) = answers.into_iter().find_map(|a| a.committed) else {
        return Ok(());
    };
    let outcome = inner.answer(rx, Instant::now()).await?;
    if outcome.iter().all(|o| o.status == PushStatus::Queued) {
        return Ok(());
    }
    tracing::warn!("the store could not commit a retained message's deletion");
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "store_error",
        "deleted in memory, but the store could not commit the deletion: it may come back after a restart",
    ))
}

fn json_answer(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(keys: &[&str], covered: Option<&str>) -> Page<String> {
        Page {
            items: keys.iter().map(|k| k.to_string()).collect(),
            covered: covered.map(Arc::from),
        }
    }

    #[test]
    fn merged_pages_stop_where_the_least_advanced_shard_stopped() {
        // Shard 0 looked up to "c"; shard 1 reached its end.
        let pages = vec![page(&["a", "c"], Some("c")), page(&["b", "d"], None)];
        let (items, next) = merge(pages, 10, |s| s.as_str());
        assert_eq!(items, ["a", "b", "c"]);
        assert_eq!(next.as_deref(), Some("c"));
    }

    #[test]
    fn a_full_merged_page_continues_after_its_last_entry() {
        let pages = vec![page(&["a", "c"], Some("c")), page(&["b", "d"], Some("d"))];
        let (items, next) = merge(pages, 2, |s| s.as_str());
        assert_eq!(items, ["a", "b"]);
        assert_eq!(next.as_deref(), Some("b"));
    }

    #[test]
    fn the_last_page_has_no_cursor() {
        let pages = vec![page(&["a"], None), page(&[], None)];
        assert_eq!(merge(pages, 2, |s| s.as_str()), (vec!["a".into()], None));
    }
}
