//! The push handlers (`/v1/push`, `/v1/push/batch`): addressing the home shard (or every
//! shard, for a topic) through its mailbox, waiting for the acknowledgement, and keyed
//! pushes through [`crate::idempotency`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::{oneshot, watch};

use crate::idempotency::{self, Claim};
use crate::interest::TopicKeys;
use crate::mailbox::{home_shard, ClientPush, PushOutcome, PushStatus, ShardMsg};
use crate::message::{Message, Origin};
use crate::push_json::{BatchBody, MaybePush};

use super::body::{
    batch_body_limit, json_body, json_text, malformed_json, message_body_limit, not_an_object,
};
use super::error::ApiError;
use super::fleet::{push_remote_groups, split_remote};
use super::message_id::MessageId;
use super::spec::{parse_push, BatchAnswer, BatchResult, PushAnswer, PushSpec};
use super::{ApiState, Inner};

// ---------------------------------------------------------------------------------------
// Pushing.

impl Inner {
    pub(super) fn next_id(&self) -> MessageId {
        MessageId::new(self.id_prefix, self.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// The message of `spec`, sharing its topic and payload.
    pub(super) fn message(&self, spec: &PushSpec, received: Instant) -> Arc<Message> {
        self.message_with(spec, spec.payload.clone(), received)
    }

    /// The message of `spec` with `payload`: a batch moves each item's payload in (a
    /// clone of a `Bytes` fresh from the body allocates its shared header).
    pub(super) fn message_with(
        &self,
        spec: &PushSpec,
        payload: Bytes,
        received: Instant,
    ) -> Arc<Message> {
        let mut m = Message::new(
            spec.topic.clone(),
            payload,
            spec.qos,
            spec.retain,
            Origin::Gateway,
        );
        // The TTL counts from when the HTTP request arrived.
        m.created = received;
        Arc::new(m.with_expiry_secs(spec.ttl_secs))
    }

    /// A shard's answer, or 504 once `answer_timeout_ms` has passed since `since` (the
    /// request's arrival): a stalled store must not hold requests forever.
    pub(super) async fn answer<T>(
        &self,
        rx: oneshot::Receiver<T>,
        since: Instant,
    ) -> Result<T, ApiError> {
        let limit = self.config.http.answer_timeout();
        match tokio::time::timeout_at((since + limit).into(), rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(shutting_down()),
            Err(_) => Err(ApiError::answer_timeout(limit)),
        }
    }

    /// Hands a topic push to every shard whose subscriptions may match it (every shard,
    /// when retained: they all keep it) or to none (issue 17.11: a 503 after some shards
    /// delivered made the backend's retry a duplicate); their match counts come on the
    /// receivers.
    fn send_topic(&self, msg: Arc<Message>) -> Result<Vec<oneshot::Receiver<usize>>, ApiError> {
        let mut replies = Vec::with_capacity(self.mailboxes.len());
        let keys = TopicKeys::of(&msg.topic);
        let interest = self.mailboxes.interest();
        self.mailboxes
            .try_send_to(
                |shard| msg.retain || interest.may_match(shard, &keys),
                |_| {
                    let (tx, rx) = oneshot::channel();
                    replies.push(rx);
                    ShardMsg::PushTopic {
                        msg: msg.clone(),
                        reply: tx,
                    }
                },
            )
            .map_err(|_| ApiError::overloaded())?;
        // In a fleet, the other nodes' subscribers too (their matches are not counted).
        if let Some(fleet) = &self.fleet {
            fleet.routing.handle().offer(&msg);
        }
        Ok(replies)
    }

    /// Hands a client push to its home shard; its outcome comes on the receiver.
    pub(super) fn send_client(
        &self,
        client_id: &str,
        msg: Arc<Message>,
        wait_ack: bool,
    ) -> Result<oneshot::Receiver<Vec<PushOutcome>>, ApiError> {
        let shard = home_shard(client_id, self.mailboxes.len());
        let (tx, rx) = oneshot::channel();
        let items = vec![ClientPush {
            client_id: client_id.to_owned(),
            msg,
            wait_ack,
        }];
        self.mailboxes
            .try_send(shard, ShardMsg::Push { items, reply: tx })
            .map_err(|_| ApiError::overloaded())?;
        Ok(rx)
    }

    /// Answers one client push: its status, or 504 when `wait_ack` times out.
    pub(super) async fn finish(
        &self,
        id: MessageId,
        spec: &PushSpec,
        outcome: PushOutcome,
    ) -> Result<PushAnswer, ApiError> {
        match settle(id, outcome)? {
            Settled::Answer(a) => Ok(a),
            Settled::AwaitAck { id, status, ack } => {
                match tokio::time::timeout(spec.timeout, ack).await {
                    Ok(Ok(())) => Ok(acked(id)),
                    _ => Err(ack_timeout(status, spec.timeout)),
                }
            }
        }
    }

    pub(super) fn record(&self, result: &Result<PushAnswer, ApiError>, received: Instant) {
        match result {
            Ok(a) => {
                let status = a.status();
                let took = matches!(status, "sent" | "acked" | "matched")
                    .then(|| received.elapsed().as_secs_f64());
                self.push_metrics.record(status, took);
            }
            Err(e) => self.push_metrics.record(e.metric_status(), None),
        }
    }

    /// One push, remembered under its idempotency key if it has one.
    async fn push_once(
        self: &Arc<Self>,
        mut spec: PushSpec,
        received: Instant,
    ) -> Result<PushAnswer, ApiError> {
        let Some(key) = &spec.idempotency_key else {
            let r = self.push_now(&mut spec, received).await;
            self.record(&r, received);
            return r;
        };
        let scoped = match &spec.client_id {
            Some(c) => idempotency::scoped("client", c, key),
            None => idempotency::scoped("topic", &spec.topic, key),
        };
        let claim = self
            .idempotency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .claim(scoped.clone(), fingerprint(&spec), self.window(), || {
                Progress::Waiting
            });
        let ack_wait = spec.timeout;
        let progress = match claim {
            Claim::Mismatch => {
                let e = key_reused();
                self.push_metrics.record(e.metric_status(), None);
                return Err(e);
            }
            Claim::Follower(rx) => {
                tracing::debug!(idempotency_key = %key, "repeated push follows the first one's outcome");
                rx
            }
            Claim::Owner(tx) => {
                let rx = tx.subscribe();
                tokio::spawn(self.clone().own(spec, received, scoped, tx));
                rx
            }
        };
        follow(progress, self.answer_limit(), ack_wait, received).await
    }

    fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.http.idempotency_window_secs))
    }

    pub(super) fn answer_limit(&self) -> Duration {
        self.config.http.answer_timeout()
    }

    /// Runs a keyed push to its outcome, whether or not the request that started it is
    /// still there (for at most the key's window), and publishes it to the key. A push
    /// that sent nothing (503) releases the key, so a retry sends afresh.
    async fn own(
        self: Arc<Self>,
        spec: PushSpec,
        received: Instant,
        key: String,
        progress: idempotency::Progress<Progress>,
    ) {
        let window = self.window();
        let tracked = self.push_tracked(&spec, received, &progress);
        let r = tokio::time::timeout(window, tracked)
            .await
            .unwrap_or_else(|_| Err(ApiError::answer_timeout(window)));
        self.record(&r, received);
        match r {
            Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                self.idempotency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release(&key, &progress);
                progress.send_replace(Progress::NotSent(e));
            }
            r => {
                progress.send_replace(Progress::Final(r));
            }
        }
    }

    /// One push, waiting for its outcome without the request's timeouts and telling
    /// `progress` when it waits for the device's PUBACK.
    async fn push_tracked(
        &self,
        spec: &PushSpec,
        received: Instant,
        progress: &watch::Sender<Progress>,
    ) -> Result<PushAnswer, ApiError> {
        let id = self.next_id();
        let msg = self.message(spec, received);
        let Some(client_id) = &spec.client_id else {
            let replies = self.send_topic(msg)?.into_iter();
            let matched =
                topic_matched(replies.map(|rx| async { rx.await.map_err(|_| shutting_down()) }))
                    .await?;
            return Ok(PushAnswer::Topic { id, matched });
        };
        if let Some(remote) = self.remote_home(client_id).await? {
            if spec.wait_ack {
                // The other node waits for the PUBACK; its answer is the final one.
                progress.send_replace(Progress::AwaitingAck("forwarded to another node"));
            }
            return self.push_remote_one(id, spec, remote, received).await;
        }
        let rx = self.send_client(client_id, msg, spec.wait_ack)?;
        let outcome = rx.await.map_err(|_| shutting_down())?;
        match settle(id, outcome.into_iter().next().ok_or_else(shutting_down)?)? {
            Settled::Answer(a) => Ok(a),
            Settled::AwaitAck { id, status, ack } => {
                progress.send_replace(Progress::AwaitingAck(status));
                match ack.await {
                    Ok(()) => Ok(acked(id)),
                    Err(_) => Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "ack_timeout",
                        format!("the device's session ended before it acknowledged (the message was {status})"),
                    )),
                }
            }
        }
    }

    /// One push without an idempotency key; its payload moves into the message.
    async fn push_now(
        &self,
        spec: &mut PushSpec,
        received: Instant,
    ) -> Result<PushAnswer, ApiError> {
        let id = self.next_id();
        let payload = std::mem::take(&mut spec.payload);
        match &spec.client_id {
            None => {
                let msg = self.message_with(spec, payload, received);
                let replies = self.send_topic(msg)?.into_iter();
                let matched = topic_matched(replies.map(|rx| self.answer(rx, received))).await?;
                tracing::debug!(message_id = %id, topic = %spec.topic, matched, "topic push");
                Ok(PushAnswer::Topic { id, matched })
            }
            Some(client_id) => {
                if let Some(remote) = self.remote_home(client_id).await? {
                    spec.payload = payload;
                    let r = self.push_remote_one(id, spec, remote, received).await;
                    tracing::debug!(message_id = %id, client_id = %client_id, status = r.as_ref().map_or_else(|e| e.code, PushAnswer::status), "client push to another node");
                    return r;
                }
                let msg = self.message_with(spec, payload, received);
                let rx = self.send_client(client_id, msg, spec.wait_ack)?;
                let outcome = self
                    .answer(rx, received)
                    .await?
                    .pop()
                    .ok_or_else(shutting_down)?;
                let r = self.finish(id, spec, outcome).await;
                tracing::debug!(message_id = %id, client_id = %client_id, status = r.as_ref().map_or_else(|e| e.code, PushAnswer::status), "client push");
                r
            }
        }
    }
}

/// The sum of the shards' answers to a topic push. A shard that ended before it answered
/// (the gateway is shutting down) delivered nothing and counts 0: the push is answered
/// 503 `shutting_down` only when no shard answered, never once some shard delivered it
/// (issue 17.11). Any other error (504 `answer_timeout`) is the answer. No answers at
/// all (no shard's subscriptions may match the topic, so none was asked) is 0 matched.
pub(super) async fn topic_matched<F>(answers: impl Iterator<Item = F>) -> Result<usize, ApiError>
where
    F: std::future::Future<Output = Result<usize, ApiError>>,
{
    let mut answers = answers.peekable();
    if answers.peek().is_none() {
        return Ok(0);
    }
    let (mut matched, mut answered) = (0, false);
    for answer in answers {
        match answer.await {
            Ok(n) => (matched, answered) = (matched + n, true),
            Err(e) if e.code == "shutting_down" => {}
            Err(e) => return Err(e),
        }
    }
    answered.then_some(matched).ok_or_else(shutting_down)
}

/// What a keyed push has come to, as every request holding its key sees it.
#[derive(Clone)]
pub(super) enum Progress {
    /// Handed to the shard(s); no answer yet.
    Waiting,
    /// The shard answered this status; the device's PUBACK is awaited (`wait_ack`).
    AwaitingAck(&'static str),
    /// The outcome, answered to every repeat within the window.
    Final(Result<PushAnswer, ApiError>),
    /// Nothing was sent (e.g. a full mailbox); the key was released.
    NotSent(ApiError),
}

/// A request's answer from its key's progress: the outcome once known; 504 when the
/// shard has not answered within `answer_limit` of `received`, or the PUBACK has not
/// come within `ack_wait` (the push goes on: a retry with the key learns its outcome).
pub(super) async fn follow(
    mut rx: watch::Receiver<Progress>,
    answer_limit: Duration,
    ack_wait: Duration,
    received: Instant,
) -> Result<PushAnswer, ApiError> {
    let answered = |p: &Progress| !matches!(p, Progress::Waiting);
    let first = tokio::time::timeout_at((received + answer_limit).into(), next(&mut rx, answered))
        .await
        .map_err(|_| ApiError::answer_timeout(answer_limit))??;
    let Progress::AwaitingAck(status) = first else {
        return first.into_result();
    };
    let done = |p: &Progress| matches!(p, Progress::Final(_) | Progress::NotSent(_));
    tokio::time::timeout(ack_wait, next(&mut rx, done))
        .await
        .map_err(|_| ack_timeout(status, ack_wait))??
        .into_result()
}

/// The first progress that satisfies `pred`.
pub(super) async fn next(
    rx: &mut watch::Receiver<Progress>,
    pred: impl FnMut(&Progress) -> bool,
) -> Result<Progress, ApiError> {
    rx.wait_for(pred)
        .await
        .map(|p| p.clone())
        .map_err(|_| shutting_down())
}

impl Progress {
    fn into_result(self) -> Result<PushAnswer, ApiError> {
        match self {
            Progress::Final(r) => r,
            Progress::NotSent(e) => Err(e),
            Progress::Waiting | Progress::AwaitingAck(_) => Err(shutting_down()),
        }
    }
}

/// A shard's outcome for one client push: the answer, or its status and the PUBACK
/// still awaited.
pub(super) enum Settled {
    Answer(PushAnswer),
    AwaitAck {
        id: MessageId,
        status: &'static str,
        ack: oneshot::Receiver<()>,
    },
}

/// A push the store would have to hold but cannot take now is refused with 503 (nothing
/// was stored or sent); every other outcome is an answer.
pub(super) fn settle(id: MessageId, outcome: PushOutcome) -> Result<Settled, ApiError> {
    let status = match outcome.status {
        PushStatus::Sent => "sent",
        PushStatus::Queued => "queued",
        PushStatus::Offline => "offline",
        PushStatus::Dropped(reason) if ApiError::is_store_refusal(reason) => {
            return Err(ApiError::store_refused(reason))
        }
        PushStatus::Dropped(reason) => {
            return Ok(Settled::Answer(PushAnswer::Client {
                id,
                status: "dropped",
                reason: Some(reason),
            }))
        }
    };
    Ok(match outcome.ack {
        Some(ack) => Settled::AwaitAck { id, status, ack },
        None => Settled::Answer(PushAnswer::Client {
            id,
            status,
            reason: None,
        }),
    })
}

pub(super) fn acked(id: MessageId) -> PushAnswer {
    PushAnswer::Client {
        id,
        status: "acked",
        reason: None,
    }
}

pub(super) fn ack_timeout(status: &str, after: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "ack_timeout",
        format!(
            "the device did not acknowledge within {} ms (the message was {status}); retry with the same idempotency_key to learn whether it does",
            after.as_millis()
        ),
    )
}

/// 422: the key names a different push of the same target.
pub(super) fn key_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this idempotency_key was used within the idempotency window for a different push to the same client id (or topic): use a new key for a new push",
    )
    .field("idempotency_key")
}

/// What makes two pushes with one key the same push: everything but `timeout_ms` (and
/// the key itself).
pub(super) fn fingerprint(spec: &PushSpec) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (
        &spec.client_id,
        &spec.topic,
        &spec.payload[..],
        spec.qos,
        spec.retain,
        spec.ttl_secs,
        spec.wait_ack,
    )
        .hash(&mut h);
    h.finish()
}

pub(super) fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the gateway is shutting down",
    )
}

/// The request's headers are read in place (axum's `HeaderMap` extractor clones them).
pub(super) async fn push(State(s): State<ApiState>, req: Request) -> Response {
    let received = Instant::now();
    let inner = &s.inner;
    let limit = message_body_limit(&inner.config);
    let (parts, body) = req.into_parts();
    let result = async {
        let (bytes, _permit) = json_body(inner, &parts.headers, body, limit).await?;
        match serde_json::from_str::<MaybePush>(json_text(&bytes)?).map_err(malformed_json)? {
            MaybePush::Object(m) => parse_push(&m, &inner.config, None),
            MaybePush::NotObject => Err(not_an_object()),
        }
    }
    .await;
    let spec = match result {
        Ok(spec) => spec,
        Err(e) => {
            inner.push_metrics.record(e.metric_status(), None);
            return e.into_response();
        }
    };
    match inner.push_once(spec, received).await {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn push_batch(State(s): State<ApiState>, req: Request) -> Response {
    let received = Instant::now();
    let inner = &s.inner;
    let config = &inner.config;
    let (parts, body) = req.into_parts();
    let limit = batch_body_limit(config);
    let (bytes, _permit) = match json_body(inner, &parts.headers, body, limit).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let text = match json_text(&bytes) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let (messages, unknown) = match serde_json::from_str::<BatchBody>(text) {
        Err(e) => return malformed_json(e).into_response(),
        Ok(BatchBody::NotObject) => return not_an_object().into_response(),
        Ok(BatchBody::Batch { messages, unknown }) => (messages, unknown),
    };
    if let Some(k) = unknown {
        return ApiError::bad(&k, format!("unknown field `{k}`")).into_response();
    }
    let Some(Some(messages)) = messages else {
        return ApiError::bad("messages", "`messages` must be an array").into_response();
    };
    if messages.len() > config.http.max_batch as usize {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("at most {} messages per batch", config.http.max_batch),
        )
        .field("messages")
        .into_response();
    }

    // Validate each item; client pushes without an idempotency key go to their home shard
    // in one mailbox message per shard, everything else one by one.
    let n = messages.len();
    let mut results: Vec<Option<Result<PushAnswer, ApiError>>> = (0..n).map(|_| None).collect();
    let (mut per_shard, singles) = sort_batch(inner, messages, &mut results);
    let remote = split_remote(inner, &mut per_shard, &mut results).await;
    push_remote_groups(inner, remote, received, &mut results).await;
    push_grouped(inner, per_shard, received, &mut results, true).await;
    for (i, spec) in singles {
        results[i] = Some(inner.push_once(spec, received).await);
    }
    let results: Vec<BatchResult> = results.into_iter().map(batch_result).collect();
    let json = BatchAnswer { results: &results }.to_json();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        json,
    )
        .into_response()
}

/// Items of a batch with their index in it.
type Indexed = Vec<(usize, PushSpec)>;

/// Validates each item of a batch and sorts it: client pushes without an idempotency key
/// grouped by home shard, everything else (topic pushes, keyed pushes) to go one by one.
/// An invalid item gets its error in `results` here.
fn sort_batch(
    inner: &Inner,
    messages: Vec<MaybePush<'_>>,
    results: &mut [Option<Result<PushAnswer, ApiError>>],
) -> (Vec<Indexed>, Indexed) {
    let config = &inner.config;
    let shards = inner.mailboxes.len();
    let mut per_shard: Vec<Indexed> = (0..shards).map(|_| Vec::new()).collect();
    let mut singles = Vec::new();
    for (i, item) in messages.into_iter().enumerate() {
        let spec = match item {
            MaybePush::Object(obj) => parse_push(&obj, config, Some(i)),
            MaybePush::NotObject => Err(ApiError::bad(
                &format!("messages[{i}]"),
                "each message must be an object",
            )),
        };
        match spec {
            Err(e) => {
                inner.push_metrics.record(e.metric_status(), None);
                results[i] = Some(Err(e));
            }
            Ok(spec) => match (&spec.client_id, &spec.idempotency_key) {
                (Some(c), None) => per_shard[home_shard(c, shards)].push((i, spec)),
                _ => singles.push((i, spec)),
            },
        }
    }
    (per_shard, singles)
}

/// Sends each shard its group of client pushes in one mailbox message and waits for the
/// answers, writing each item's result (counted in the push metrics with `record`).
pub(super) async fn push_grouped(
    inner: &Inner,
    per_shard: Vec<Indexed>,
    received: Instant,
    results: &mut [Option<Result<PushAnswer, ApiError>>],
    record: bool,
) {
    let mut waits = Vec::new();
    for (shard, mut group) in per_shard.into_iter().enumerate() {
        if group.is_empty() {
            continue;
        }
        let ids: Vec<MessageId> = group.iter().map(|_| inner.next_id()).collect();
        // The client id and payload move into the mailbox message: what is left of each
        // spec answers for it (its timeout).
        let items = group
            .iter_mut()
            .map(|(_, spec)| {
                let payload = std::mem::take(&mut spec.payload);
                ClientPush {
                    client_id: spec.client_id.take().unwrap_or_default(),
                    msg: inner.message_with(spec, payload, received),
                    wait_ack: spec.wait_ack,
                }
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        if inner
            .mailboxes
            .try_send(shard, ShardMsg::Push { items, reply: tx })
            .is_err()
        {
            for (i, _) in group {
                let r = Err(ApiError::overloaded());
                if record {
                    inner.record(&r, received);
                }
                results[i] = Some(r);
            }
            continue;
        }
        waits.push((group, ids, rx));
    }
    for (group, ids, rx) in waits {
        match inner.answer(rx, received).await {
            Ok(outcomes) => {
                for (((i, spec), id), outcome) in group.into_iter().zip(ids).zip(outcomes) {
                    let r = inner.finish(id, &spec, outcome).await;
                    if record {
                        inner.record(&r, received);
                    }
                    results[i] = Some(r);
                }
            }
            Err(e) => {
                for (i, _) in group {
                    let r = Err(e.clone());
                    if record {
                        inner.record(&r, received);
                    }
                    results[i] = Some(r);
                }
            }
        }
    }
}

/// One item's entry in the batch answer.
fn batch_result(r: Option<Result<PushAnswer, ApiError>>) -> BatchResult {
    match r {
        Some(Ok(a)) => BatchResult::Answer(a),
        Some(Err(e)) => {
            let mut b = e.body();
            b["error"]["status"] = json!(e.status.as_u16());
            BatchResult::Error(b)
        }
        None => BatchResult::Error(json!({"error": {"code": "internal", "message": "no answer"}})),
    }
}
