//! The backend's HTTP push API (`/v1/*`), served on the business pool.
//!
//! Handlers never touch shard state: they validate the request, address the client id's
//! home shard (or every shard, for a topic) through its bounded mailbox with `try_send`,
//! and await the shard's answer on a oneshot channel. A full mailbox is answered 503 with
//! `Retry-After`; nothing here can stall an IO shard. The contract is in `docs/API.md`
//! and `docs/openapi.json` (served at `/v1/openapi.json`).
//!
//! It also decides who may use `/v1` (`Access`: a bearer token once `[http] tokens`
//! is set, otherwise only the `tokenless_networks` sources, loopback by default), bounds
//! request bodies (one per-message size rule, a permit for each large body, a read
//! timeout), and runs keyed pushes through [`crate::idempotency`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::config::Config;
use crate::http::Network;
use crate::idempotency::{self, Claim, Keys};
use crate::mailbox::{home_shard, ClientPush, Mailboxes, PushOutcome, PushStatus, ShardMsg};
use crate::message::{Message, Origin};
use crate::metrics::{PushMetrics, ShardMetrics};
use crate::push_json::{BatchBody, Field, MaybeObject, Object};
use crate::topic;

/// The OpenAPI 3 description of this API.
pub const OPENAPI: &str = include_str!("../docs/openapi.json");

/// Default and largest `timeout_ms` for `wait_ack`.
const DEFAULT_TIMEOUT_MS: u64 = 5_000;
const MAX_TIMEOUT_MS: u64 = 300_000;
/// Longest accepted `idempotency_key`.
const MAX_IDEMPOTENCY_KEY: usize = 256;

#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    access: Access,
    mailboxes: Mailboxes,
    shards: Vec<Arc<ShardMetrics>>,
    push_metrics: Arc<PushMetrics>,
    idempotency: Mutex<Keys<Progress>>,
    /// Permits for reading bodies over [`LARGE_BODY`] (`http.max_large_bodies`).
    large_bodies: tokio::sync::Semaphore,
    ids: AtomicU64,
    id_prefix: u64,
}

impl ApiState {
    pub fn new(
        config: Arc<Config>,
        mailboxes: Mailboxes,
        shards: Vec<Arc<ShardMetrics>>,
        push_metrics: Arc<PushMetrics>,
    ) -> Self {
        let id_prefix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        ApiState {
            inner: Arc::new(Inner {
                access: Access::from_config(&config.http),
                large_bodies: tokio::sync::Semaphore::new(config.http.max_large_bodies as usize),
                config,
                mailboxes,
                shards,
                push_metrics,
                idempotency: Mutex::new(Keys::default()),
                ids: AtomicU64::new(0),
                id_prefix,
            }),
        }
    }
}

impl ApiState {
    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/push", post(push))
        .route("/v1/push/batch", post(push_batch))
        .route(
            "/v1/clients/{client_id}",
            get(get_client).delete(delete_client),
        )
        .route(
            "/v1/clients",
            get(get_client_by_query).delete(delete_client_by_query),
        )
        .route("/v1/stats", get(stats))
        .route("/v1/openapi.json", get(openapi))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_push_requests,
        ))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------
// Errors: `{"error": {"code", "message", "field"?}}`.

#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    fn bad(field: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message).field(field)
    }

    /// The shard (or, for `queued`, the durable store behind it) did not answer in time.
    fn answer_timeout(after: Duration) -> Self {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "answer_timeout",
            format!(
                "no answer from the gateway within {} ms (a busy shard or a slow store); the push may still be delivered: retry with the same idempotency_key to learn its outcome",
                after.as_millis()
            ),
        )
    }

    fn overloaded() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "a shard mailbox is full; retry later",
        )
    }

    fn body(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(f) = &self.field {
            e["field"] = json!(f);
        }
        json!({ "error": e })
    }

    /// The `status` label of `gateway_push_messages_total` for this error.
    fn metric_status(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::GATEWAY_TIMEOUT => "timeout",
            StatusCode::NOT_FOUND => "not_found",
            _ => "bad_request",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

// ---------------------------------------------------------------------------------------
// Auth: bearer tokens for every /v1 route, compared in constant time; without tokens,
// only the `tokenless_networks` sources (loopback by default) are answered.

/// Who may use `/v1`, from `[http]`.
struct Access {
    tokens: Vec<String>,
    tokenless: Vec<Network>,
    allow_remote: bool,
}

/// Why a `/v1` request is refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Tokens are set and the request has none, or a wrong one.
    Unauthorized,
    /// No tokens are set and the source is not in `tokenless_networks`.
    RemoteWithoutToken,
}

impl Access {
    fn from_config(h: &crate::config::HttpConfig) -> Access {
        Access {
            tokens: h.tokens.clone(),
            // Validated by `Config::validate`; a bad entry cannot open anything.
            tokenless: h
                .tokenless_networks
                .iter()
                .filter_map(|n| Network::parse(n).ok())
                .collect(),
            allow_remote: h.allow_remote_without_token,
        }
    }

    /// The decision for one request from `peer` with this `Authorization` header.
    fn check(&self, peer: Option<IpAddr>, authorization: Option<&str>) -> Result<(), Refusal> {
        if self.tokens.is_empty() {
            let local = peer.is_some_and(|ip| self.tokenless.iter().any(|n| n.contains(ip)));
            return if local || self.allow_remote {
                Ok(())
            } else {
                Err(Refusal::RemoteWithoutToken)
            };
        }
        let presented = authorization.and_then(bearer_token);
        let ok = presented.is_some_and(|p| {
            self.tokens.iter().fold(false, |acc, t| {
                acc | constant_time_eq(t.as_bytes(), p.as_bytes())
            })
        });
        if ok {
            Ok(())
        } else {
            Err(Refusal::Unauthorized)
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

async fn auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let refusal = match s.inner.access.check(peer, authorization) {
        Ok(()) => return next.run(req).await,
        Err(r) => r,
    };
    if req.uri().path().starts_with("/v1/push") {
        s.inner.push_metrics.record("unauthorized", None);
    }
    match refusal {
        Refusal::Unauthorized => {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            )
            .field("Authorization")
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
        Refusal::RemoteWithoutToken => {
            // Debug, not warn: anyone can send these, and the 403 says why.
            tracing::debug!(peer = ?peer, "/v1 request from outside http.tokenless_networks refused: no tokens are set");
            ApiError::new(
                StatusCode::FORBIDDEN,
                "remote_api_disabled",
                "the /v1 API answers only local clients while [http] tokens is empty: set [http] tokens (and send Authorization: Bearer <token>), add this source to [http] tokenless_networks, or set [http] allow_remote_without_token = true",
            )
            .into_response()
        }
    }
}

/// Counts each request to the push endpoints by its answer's code
/// (`gateway_push_requests_total`), refusals included; messages are counted apart.
async fn count_push_requests(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        "/v1/push" => Some("push"),
        "/v1/push/batch" => Some("batch"),
        _ => None,
    };
    let resp = next.run(req).await;
    if let Some(endpoint) = endpoint {
        s.inner
            .push_metrics
            .record_request(endpoint, resp.status().as_u16());
    }
    resp
}

/// Equal-length comparison whose time does not depend on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------
// Request bodies.

/// Bodies over this many bytes are "large": at most `http.max_large_bodies` of them are
/// read at once, so concurrent big batches cannot take the memory with them.
const LARGE_BODY: usize = 64 << 10;

/// The body limit of one push message, single or in a batch: its payload (at most
/// `max_packet_size` bytes) and topic JSON-escaped at up to 6 bytes each (`\u0001`),
/// plus the other fields.
fn message_body_limit(config: &Config) -> usize {
    (config.mqtt.max_packet_size as usize + config.mqtt.max_topic_len as usize) * 6 + 4096
}

/// The body limit of a batch: `max_batch` messages, at most `http.max_batch_body_bytes`
/// but never less than one message's (what `POST /v1/push` accepts, a batch does too).
pub fn batch_body_limit(config: &Config) -> usize {
    let one = message_body_limit(config);
    one.saturating_mul(config.http.max_batch as usize)
        .min(config.http.max_batch_body_bytes as usize)
        .max(one)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body over {limit} bytes"),
    )
}

/// `application/json`, with or without parameters (`; charset=utf-8`), in any case.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// A request body, with the permit that a large one holds while the caller uses it.
type ReadBody<'a> = (Bytes, Option<tokio::sync::SemaphorePermit<'a>>);

/// Reads a JSON body: 415 unless `Content-Type: application/json`, 413 over `limit`
/// bytes (at once when `Content-Length` says so, before reading any of it), 408 when it
/// takes longer than `http.body_timeout_ms`. The caller parses it (see `push_json`)
/// while holding the permit.
async fn json_body<'a>(
    inner: &'a Inner,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<ReadBody<'a>, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        )
        .field("Content-Type"));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let timeout = Duration::from_millis(u64::from(inner.config.http.body_timeout_ms));
    let read = read_body(
        body,
        limit,
        declared.unwrap_or(0) as usize,
        &inner.large_bodies,
    );
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        )
    })?
}

/// Collects a body of at most `limit` bytes, holding a `large` permit from the moment it
/// is (or is declared) over [`LARGE_BODY`].
async fn read_body(
    body: Body,
    limit: usize,
    declared: usize,
    large: &tokio::sync::Semaphore,
) -> Result<ReadBody<'_>, ApiError> {
    use http_body_util::BodyExt as _;
    let acquire = || async { large.acquire().await.map_err(|_| shutting_down()) };
    let mut body = body;
    // A body declared large waits for its permit before any of it is read.
    let mut permit = match declared > LARGE_BODY {
        true => Some(acquire().await?),
        false => None,
    };
    let mut buf = bytes::BytesMut::with_capacity(declared.min(LARGE_BODY));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "body_read_failed",
                format!("cannot read the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let size = buf.len() + data.len();
        if size > limit {
            return Err(too_large(limit));
        }
        // The frame that makes the body large is kept only once the permit is held.
        if permit.is_none() && size > LARGE_BODY {
            permit = Some(acquire().await?);
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), permit))
}

/// 400 for a body that is not JSON at all.
fn malformed_json(e: serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        format!("malformed JSON: {e}"),
    )
}

/// 400 for a JSON body that is not an object.
fn not_an_object() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        "the body must be a JSON object",
    )
}

/// One validated push.
struct PushSpec {
    client_id: Option<String>,
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    ttl_secs: Option<u32>,
    wait_ack: bool,
    timeout: Duration,
    idempotency_key: Option<String>,
}

/// The answer to one accepted push, as `docs/API.md` documents it: built and
/// serialized without a JSON value tree (a batch answers up to `max_batch` of them).
#[derive(Clone, Debug)]
enum PushAnswer {
    /// `{"id", "status"}`, plus `"reason"` when the status is `dropped`.
    Client {
        id: String,
        status: &'static str,
        reason: Option<&'static str>,
    },
    /// `{"id", "matched"}`.
    Topic { id: String, matched: usize },
}

impl PushAnswer {
    /// The `status` label of `gateway_push_messages_total`.
    fn status(&self) -> &'static str {
        match self {
            PushAnswer::Client { status, .. } => status,
            PushAnswer::Topic { .. } => "matched",
        }
    }
}

impl serde::Serialize for PushAnswer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self {
            PushAnswer::Client { id, status, reason } => {
                m.serialize_entry("id", id)?;
                m.serialize_entry("status", status)?;
                if let Some(r) = reason {
                    m.serialize_entry("reason", r)?;
                }
            }
            PushAnswer::Topic { id, matched } => {
                m.serialize_entry("id", id)?;
                m.serialize_entry("matched", matched)?;
            }
        }
        m.end()
    }
}

/// One item of a batch's `results`: its answer, or its error object.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum BatchResult {
    Answer(PushAnswer),
    Error(Value),
}

#[derive(serde::Serialize)]
struct BatchAnswer<'a> {
    results: &'a [BatchResult],
}

const PUSH_FIELDS: [&str; 10] = [
    "client_id",
    "topic",
    "payload",
    "encoding",
    "qos",
    "retain",
    "ttl_secs",
    "wait_ack",
    "timeout_ms",
    "idempotency_key",
];

/// Validates a push object; errors name the field (`messages[3].qos` for item 3 of a
/// batch). The field name is only formatted when there is an error.
fn parse_push(m: &Object, config: &Config, index: Option<usize>) -> Result<PushSpec, ApiError> {
    let f = |name: &str| match index {
        Some(i) => format!("messages[{i}].{name}"),
        None => name.to_owned(),
    };
    if let Some(k) = m.unknown(&PUSH_FIELDS) {
        return Err(ApiError::bad(&f(k), format!("unknown field `{k}`")));
    }
    // A field is given or omitted: `null` is refused (the OpenAPI types are not nullable).
    let get = |name: &str| -> Result<Option<&Field>, ApiError> {
        match m.get(name) {
            Some(Field::Null) => Err(ApiError::bad(
                &f(name),
                format!("`{name}` must not be null (omit it instead)"),
            )),
            v => Ok(v),
        }
    };
    let string = |name: &str| -> Result<Option<&str>, ApiError> {
        match get(name)? {
            None => Ok(None),
            Some(Field::Str(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::bad(
                &f(name),
                format!("`{name}` must be a string"),
            )),
        }
    };
    let boolean = |name: &str| -> Result<bool, ApiError> {
        match get(name)? {
            None => Ok(false),
            Some(Field::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::bad(
                &f(name),
                format!("`{name}` must be true or false"),
            )),
        }
    };
    let integer = |name: &str, min: u64, max: u64| -> Result<Option<u64>, ApiError> {
        match get(name)? {
            None => Ok(None),
            Some(Field::UInt(n)) if (min..=max).contains(n) => Ok(Some(*n)),
            Some(_) => Err(ApiError::bad(
                &f(name),
                format!("`{name}` must be an integer in {min}..={max}"),
            )),
        }
    };

    let client_id = match string("client_id")? {
        Some("") => {
            return Err(ApiError::bad(
                &f("client_id"),
                "`client_id` must not be empty",
            ))
        }
        Some(c) if c.contains('\0') => {
            return Err(ApiError::bad(
                &f("client_id"),
                "`client_id` must not contain NUL (U+0000)",
            ))
        }
        Some(c) if c.len() > config.mqtt.max_client_id_len as usize => {
            return Err(ApiError::bad(
                &f("client_id"),
                format!(
                    "`client_id` is longer than {} bytes",
                    config.mqtt.max_client_id_len
                ),
            ))
        }
        c => c.map(str::to_owned),
    };
    let topic =
        string("topic")?.ok_or_else(|| ApiError::bad(&f("topic"), "`topic` is required"))?;
    if !topic::valid_topic_name(topic) {
        return Err(ApiError::bad(
            &f("topic"),
            "`topic` must be a valid MQTT topic name (non-empty, no `+` or `#`)",
        ));
    }
    if topic.len() > config.mqtt.max_topic_len as usize {
        return Err(ApiError::bad(
            &f("topic"),
            format!(
                "`topic` is longer than mqtt.max_topic_len ({} bytes)",
                config.mqtt.max_topic_len
            ),
        ));
    }
    let raw =
        string("payload")?.ok_or_else(|| ApiError::bad(&f("payload"), "`payload` is required"))?;
    let payload = match string("encoding")?.unwrap_or("utf8") {
        "utf8" => Bytes::copy_from_slice(raw.as_bytes()),
        "base64" => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(raw)
                .map_err(|e| {
                    ApiError::bad(&f("payload"), format!("`payload` is not valid base64: {e}"))
                })?,
        ),
        _ => {
            return Err(ApiError::bad(
                &f("encoding"),
                "`encoding` must be \"utf8\" or \"base64\"",
            ))
        }
    };
    let max = config.mqtt.max_packet_size as usize;
    if payload.len() + topic.len() + 16 > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the message would exceed max_packet_size ({max} bytes)"),
        )
        .field(f("payload")));
    }
    let qos = integer("qos", 0, 1)?.unwrap_or(0) as u8;
    let retain = boolean("retain")?;
    if retain && client_id.is_some() {
        return Err(ApiError::bad(
            &f("retain"),
            "`retain` applies to topic pushes; omit it when `client_id` is set",
        ));
    }
    let ttl_secs = integer("ttl_secs", 1, u64::from(u32::MAX))?.map(|n| n as u32);
    let wait_ack = boolean("wait_ack")?;
    if wait_ack && (qos != 1 || client_id.is_none()) {
        return Err(ApiError::bad(
            &f("wait_ack"),
            "`wait_ack` needs `qos`: 1 and a `client_id`",
        ));
    }
    let timeout = Duration::from_millis(
        integer("timeout_ms", 1, MAX_TIMEOUT_MS)?.unwrap_or(DEFAULT_TIMEOUT_MS),
    );
    let idempotency_key = match string("idempotency_key")? {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY => {
            return Err(ApiError::bad(
                &f("idempotency_key"),
                format!("`idempotency_key` must be 1..={MAX_IDEMPOTENCY_KEY} bytes"),
            ))
        }
        k => k.map(str::to_owned),
    };
    Ok(PushSpec {
        client_id,
        topic: topic.to_owned(),
        payload,
        qos,
        retain,
        ttl_secs,
        wait_ack,
        timeout,
        idempotency_key,
    })
}

// ---------------------------------------------------------------------------------------
// Pushing.

impl Inner {
    fn next_id(&self) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n:x}", self.id_prefix)
    }

    fn message(&self, spec: &PushSpec, received: Instant) -> Arc<Message> {
        let mut m = Message::new(
            Arc::from(spec.topic.as_str()),
            spec.payload.clone(),
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
    async fn answer<T>(&self, rx: oneshot::Receiver<T>, since: Instant) -> Result<T, ApiError> {
        let limit = self.config.http.answer_timeout();
        match tokio::time::timeout_at((since + limit).into(), rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(shutting_down()),
            Err(_) => Err(ApiError::answer_timeout(limit)),
        }
    }

    /// Hands a topic push to every shard; their match counts come on the receivers.
    fn send_topic(&self, msg: Arc<Message>) -> Result<Vec<oneshot::Receiver<usize>>, ApiError> {
        let mut replies = Vec::with_capacity(self.mailboxes.len());
        for shard in 0..self.mailboxes.len() {
            let (tx, rx) = oneshot::channel();
            let push = ShardMsg::PushTopic {
                msg: msg.clone(),
                reply: tx,
            };
            self.mailboxes
                .try_send(shard, push)
                .map_err(|_| ApiError::overloaded())?;
            replies.push(rx);
        }
        Ok(replies)
    }

    /// Hands a client push to its home shard; its outcome comes on the receiver.
    fn send_client(
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
    async fn finish(
        &self,
        id: String,
        spec: &PushSpec,
        outcome: PushOutcome,
    ) -> Result<PushAnswer, ApiError> {
        match settle(id, outcome) {
            Settled::Answer(a) => Ok(a),
            Settled::AwaitAck { id, status, ack } => {
                match tokio::time::timeout(spec.timeout, ack).await {
                    Ok(Ok(())) => Ok(acked(id)),
                    _ => Err(ack_timeout(status, spec.timeout)),
                }
            }
        }
    }

    fn record(&self, result: &Result<PushAnswer, ApiError>, received: Instant) {
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
        spec: PushSpec,
        received: Instant,
    ) -> Result<PushAnswer, ApiError> {
        let Some(key) = &spec.idempotency_key else {
            let r = self.push_now(&spec, received).await;
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

    fn answer_limit(&self) -> Duration {
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
            let mut matched = 0;
            for rx in self.send_topic(msg)? {
                matched += rx.await.map_err(|_| shutting_down())?;
            }
            return Ok(PushAnswer::Topic { id, matched });
        };
        let rx = self.send_client(client_id, msg, spec.wait_ack)?;
        let outcome = rx.await.map_err(|_| shutting_down())?;
        match settle(id, outcome.into_iter().next().ok_or_else(shutting_down)?) {
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

    async fn push_now(&self, spec: &PushSpec, received: Instant) -> Result<PushAnswer, ApiError> {
        let id = self.next_id();
        let msg = self.message(spec, received);
        match &spec.client_id {
            None => {
                let mut matched = 0;
                for rx in self.send_topic(msg)? {
                    matched += self.answer(rx, received).await?;
                }
                tracing::debug!(message_id = %id, topic = %spec.topic, matched, "topic push");
                Ok(PushAnswer::Topic { id, matched })
            }
            Some(client_id) => {
                let rx = self.send_client(client_id, msg, spec.wait_ack)?;
                let outcome = self
                    .answer(rx, received)
                    .await?
                    .pop()
                    .ok_or_else(shutting_down)?;
                let r = self.finish(id.clone(), spec, outcome).await;
                tracing::debug!(message_id = %id, client_id = %client_id, status = r.as_ref().map_or_else(|e| e.code, PushAnswer::status), "client push");
                r
            }
        }
    }
}

/// What a keyed push has come to, as every request holding its key sees it.
#[derive(Clone)]
enum Progress {
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
async fn follow(
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
async fn next(
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
enum Settled {
    Answer(PushAnswer),
    AwaitAck {
        id: String,
        status: &'static str,
        ack: oneshot::Receiver<()>,
    },
}

fn settle(id: String, outcome: PushOutcome) -> Settled {
    let status = match outcome.status {
        PushStatus::Sent => "sent",
        PushStatus::Queued => "queued",
        PushStatus::Offline => "offline",
        PushStatus::Dropped(reason) => {
            return Settled::Answer(PushAnswer::Client {
                id,
                status: "dropped",
                reason: Some(reason),
            })
        }
    };
    match outcome.ack {
        Some(ack) => Settled::AwaitAck { id, status, ack },
        None => Settled::Answer(PushAnswer::Client {
            id,
            status,
            reason: None,
        }),
    }
}

fn acked(id: String) -> PushAnswer {
    PushAnswer::Client {
        id,
        status: "acked",
        reason: None,
    }
}

fn ack_timeout(status: &str, after: Duration) -> ApiError {
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
fn key_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this idempotency_key was used within the idempotency window for a different push to the same client id (or topic): use a new key for a new push",
    )
    .field("idempotency_key")
}

/// What makes two pushes with one key the same push: everything but `timeout_ms` (and
/// the key itself).
fn fingerprint(spec: &PushSpec) -> u64 {
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

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the gateway is shutting down",
    )
}

async fn push(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    let received = Instant::now();
    let inner = &s.inner;
    let limit = message_body_limit(&inner.config);
    let result = async {
        let (bytes, _permit) = json_body(inner, &headers, body, limit).await?;
        match serde_json::from_slice::<MaybeObject>(&bytes).map_err(malformed_json)? {
            MaybeObject::Object(m) => parse_push(&m, &inner.config, None),
            MaybeObject::NotObject => Err(not_an_object()),
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

async fn push_batch(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    let received = Instant::now();
    let inner = &s.inner;
    let config = &inner.config;
    let (bytes, _permit) = match json_body(inner, &headers, body, batch_body_limit(config)).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let (messages, unknown) = match serde_json::from_slice::<BatchBody>(&bytes) {
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
    let shards = inner.mailboxes.len();
    let mut per_shard: Vec<Vec<(usize, PushSpec)>> = (0..shards).map(|_| Vec::new()).collect();
    let mut singles = Vec::new();
    for (i, item) in messages.into_iter().enumerate() {
        let spec = match item {
            MaybeObject::Object(obj) => parse_push(&obj, config, Some(i)),
            MaybeObject::NotObject => Err(ApiError::bad(
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

    let mut waits = Vec::new();
    for (shard, group) in per_shard.into_iter().enumerate() {
        if group.is_empty() {
            continue;
        }
        let ids: Vec<String> = group.iter().map(|_| inner.next_id()).collect();
        let items = group
            .iter()
            .map(|(_, spec)| ClientPush {
                client_id: spec.client_id.clone().unwrap_or_default(),
                msg: inner.message(spec, received),
                wait_ack: spec.wait_ack,
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
                inner.record(&r, received);
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
                    inner.record(&r, received);
                    results[i] = Some(r);
                }
            }
            Err(e) => {
                for (i, _) in group {
                    let r = Err(e.clone());
                    inner.record(&r, received);
                    results[i] = Some(r);
                }
            }
        }
    }
    for (i, spec) in singles {
        results[i] = Some(inner.push_once(spec, received).await);
    }
    let results: Vec<BatchResult> = results
        .into_iter()
        .map(|r| match r {
            Some(Ok(a)) => BatchResult::Answer(a),
            Some(Err(e)) => {
                let mut b = e.body();
                b["error"]["status"] = json!(e.status.as_u16());
                BatchResult::Error(b)
            }
            None => {
                BatchResult::Error(json!({"error": {"code": "internal", "message": "no answer"}}))
            }
        })
        .collect();
    (
        StatusCode::OK,
        axum::Json(BatchAnswer { results: &results }),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Clients and stats.

async fn ask_home<T>(
    s: &ApiState,
    client_id: &str,
    make: impl FnOnce(oneshot::Sender<T>) -> ShardMsg,
) -> Result<T, ApiError> {
    let inner = &s.inner;
    let shard = home_shard(client_id, inner.mailboxes.len());
    let (tx, rx) = oneshot::channel();
    inner
        .mailboxes
        .try_send(shard, make(tx))
        .map_err(|_| ApiError::overloaded())?;
    inner.answer(rx, Instant::now()).await
}

fn not_found(client_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no session for client id `{client_id}`"),
    )
    .field("client_id")
}

/// The query of a `/v1/clients` route, each parameter at most once.
#[derive(Default)]
struct ClientQuery {
    client_id: Option<String>,
    clear_session: bool,
}

type RawQuery = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// Parses `query`, refusing parameters not in `allowed`, repeated ones and bad values
/// with a JSON 400 naming the parameter.
fn client_query(query: RawQuery, allowed: &[&str]) -> Result<ClientQuery, ApiError> {
    let Query(pairs) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("malformed query string: {e}"),
        )
    })?;
    let mut out = ClientQuery::default();
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in &pairs {
        let Some(name) = allowed.iter().find(|a| **a == k.as_str()) else {
            return Err(ApiError::bad(k, format!("unknown query parameter `{k}`")));
        };
        if seen.contains(name) {
            return Err(ApiError::bad(k, format!("`{k}` is given more than once")));
        }
        seen.push(name);
        match *name {
            "client_id" if v.is_empty() => {
                return Err(ApiError::bad(k, "`client_id` must not be empty"))
            }
            "client_id" => out.client_id = Some(v.clone()),
            _ => {
                out.clear_session = match v.as_str() {
                    "false" => false,
                    "true" => true,
                    _ => return Err(ApiError::bad(k, "`clear_session` must be true or false")),
                }
            }
        }
    }
    Ok(out)
}

/// The client id of `/v1/clients/{client_id}`, or a JSON 400.
fn path_client_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::bad("client_id", format!("bad client id in the path: {e}")))
}

/// The target of `/v1/clients` (no id in the path): the `client_id` query parameter, or
/// a JSON body `{"client_id", "clear_session"?}` for an id too long for a URI (HTTP/1
/// URIs end at 65,534 bytes; MQTT allows 65,535-byte client ids).
async fn unpathed_target(
    s: &ApiState,
    query: RawQuery,
    headers: &HeaderMap,
    body: Body,
    kick: bool,
) -> Result<(String, bool), ApiError> {
    let allowed: &[&str] = if kick {
        &["client_id", "clear_session"]
    } else {
        &["client_id"]
    };
    let q = client_query(query, allowed)?;
    if let Some(id) = q.client_id {
        return Ok((id, q.clear_session));
    }
    if headers.get(header::CONTENT_TYPE).is_none() {
        return Err(ApiError::bad(
            "client_id",
            "give the client id as the `client_id` query parameter or in a JSON body",
        ));
    }
    let limit = s.inner.config.mqtt.max_client_id_len as usize * 6 + 1024;
    let (bytes, _permit) = json_body(&s.inner, headers, body, limit).await?;
    let MaybeObject::Object(m) = serde_json::from_slice(&bytes).map_err(malformed_json)? else {
        return Err(not_an_object());
    };
    if let Some(k) = m.unknown(allowed) {
        return Err(ApiError::bad(k, format!("unknown field `{k}`")));
    }
    let client_id = match m.get("client_id") {
        Some(Field::Str(id)) if !id.is_empty() => id.to_string(),
        _ => {
            return Err(ApiError::bad(
                "client_id",
                "`client_id` must be a non-empty string",
            ))
        }
    };
    let clear_session = match m.get("clear_session") {
        None => false,
        Some(Field::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad(
                "clear_session",
                "`clear_session` must be true or false",
            ))
        }
    };
    Ok((client_id, clear_session))
}

async fn get_client(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: RawQuery,
) -> Response {
    let target = client_query(query, &[]).and_then(|_| path_client_id(path));
    answer_or_error(target, |id| client_info(s, id)).await
}

async fn get_client_by_query(
    State(s): State<ApiState>,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = unpathed_target(&s, query, &headers, body, false).await;
    answer_or_error(target, |(id, _)| client_info(s, id)).await
}

async fn delete_client(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: RawQuery,
) -> Response {
    let target = client_query(query, &["clear_session"])
        .and_then(|q| Ok((path_client_id(path)?, q.clear_session)));
    answer_or_error(target, |(id, clear)| kick(s, id, clear)).await
}

async fn delete_client_by_query(
    State(s): State<ApiState>,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = unpathed_target(&s, query, &headers, body, true).await;
    answer_or_error(target, |(id, clear)| kick(s, id, clear)).await
}

/// The error of a bad request, or what `then` answers for its target.
async fn answer_or_error<T, F: std::future::Future<Output = Response>>(
    target: Result<T, ApiError>,
    then: impl FnOnce(T) -> F,
) -> Response {
    match target {
        Ok(t) => then(t).await,
        Err(e) => e.into_response(),
    }
}

async fn client_info(s: ApiState, client_id: String) -> Response {
    let id = client_id.clone();
    match ask_home(&s, &client_id, |reply| ShardMsg::ClientInfo {
        client_id: id,
        reply,
    })
    .await
    {
        Ok(Some(info)) => (StatusCode::OK, axum::Json(info)).into_response(),
        Ok(None) => not_found(&client_id).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Disconnects a client (if online) and, with `clear_session`, ends its session;
/// `disconnected` says whether a connection was closed.
async fn kick(s: ApiState, client_id: String, clear_session: bool) -> Response {
    let id = client_id.clone();
    match ask_home(&s, &client_id, |reply| ShardMsg::Kick {
        client_id: id,
        clear_session,
        reply,
    })
    .await
    {
        Ok(Some(was_online)) => (
            StatusCode::OK,
            axum::Json(json!({"client_id": client_id, "disconnected": was_online, "session_cleared": clear_session})),
        )
            .into_response(),
        Ok(None) => not_found(&client_id).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn stats(State(s): State<ApiState>) -> Response {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let shards: Vec<Value> = s
        .inner
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
    let sum = |k: &str| {
        shards
            .iter()
            .map(|v| v[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let body = json!({
        "connections": sum("connections"),
        "sessions": sum("sessions"),
        "subscriptions": sum("subscriptions"),
        "queued_messages": sum("queued_messages"),
        "shards": shards,
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    fn cfg() -> Config {
        Config::default()
    }

    fn access(toml: &str) -> Access {
        Access::from_config(&Config::from_toml_str(toml).unwrap().http)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    /// A body over `LARGE_BODY` waits for a permit; a small one does not need one.
    #[tokio::test]
    async fn large_bodies_wait_for_a_permit() {
        let none = tokio::sync::Semaphore::new(0);
        let small = Body::from(vec![b'x'; 1000]);
        let (got, _) = read_body(small, 1 << 20, 1000, &none).await.unwrap();
        assert_eq!(got.len(), 1000);
        let large = || Body::from(vec![b'x'; LARGE_BODY + 1]);
        let waiting = read_body(large(), 1 << 20, 0, &none);
        let r = tokio::time::timeout(Duration::from_millis(50), waiting).await;
        assert!(r.is_err(), "read a large body without a permit");
        let one = tokio::sync::Semaphore::new(1);
        let (got, permit) = read_body(large(), 1 << 20, 0, &one).await.unwrap();
        assert_eq!(got.len(), LARGE_BODY + 1);
        assert_eq!(one.available_permits(), 0, "held while the body is used");
        drop(permit);
        assert_eq!(one.available_permits(), 1, "then given back");
        let over = read_body(large(), LARGE_BODY, 0, &one).await;
        assert_eq!(
            over.err().map(|e| e.status),
            Some(StatusCode::PAYLOAD_TOO_LARGE)
        );
    }

    #[test]
    fn the_default_api_answers_only_loopback() {
        let a = access("");
        assert_eq!(a.check(ip("127.0.0.1"), None), Ok(()));
        assert_eq!(a.check(ip("127.0.0.2"), None), Ok(()));
        assert_eq!(a.check(ip("::1"), None), Ok(()));
        assert_eq!(a.check(ip("::ffff:127.0.0.1"), None), Ok(()));
        for remote in ["192.0.2.2", "10.0.0.1", "fd00::2", "::ffff:192.0.2.2"] {
            assert_eq!(
                a.check(ip(remote), None),
                Err(Refusal::RemoteWithoutToken),
                "{remote}"
            );
        }
        assert_eq!(a.check(None, None), Err(Refusal::RemoteWithoutToken));
        let open = access("[http]\nallow_remote_without_token = true\n");
        assert_eq!(open.check(ip("192.0.2.2"), None), Ok(()));
    }

    #[test]
    fn tokens_are_needed_from_every_source_once_set() {
        let a = access("[http]\ntokens = [\"t0k\"]\nallow_remote_without_token = true\n");
        for peer in ["127.0.0.1", "192.0.2.2"] {
            assert_eq!(a.check(ip(peer), None), Err(Refusal::Unauthorized));
            assert_eq!(
                a.check(ip(peer), Some("Bearer nope")),
                Err(Refusal::Unauthorized)
            );
            assert_eq!(
                a.check(ip(peer), Some("Basic t0k")),
                Err(Refusal::Unauthorized)
            );
            for ok in ["Bearer t0k", "bearer t0k", "BEARER  t0k "] {
                assert_eq!(a.check(ip(peer), Some(ok)), Ok(()), "{ok}");
            }
        }
    }

    fn parse(v: Value) -> Result<PushSpec, ApiError> {
        let text = v.to_string();
        match serde_json::from_str::<MaybeObject>(&text).unwrap() {
            MaybeObject::Object(m) => parse_push(&m, &cfg(), None),
            MaybeObject::NotObject => panic!("not an object: {text}"),
        }
    }

    #[test]
    fn push_validation_names_the_field() {
        let field = |v: Value| parse(v).err().and_then(|e| e.field).unwrap_or_default();
        assert_eq!(field(json!({"payload": "x"})), "topic");
        assert_eq!(field(json!({"topic": "a/+", "payload": "x"})), "topic");
        assert_eq!(field(json!({"topic": "a", "payload": 5})), "payload");
        assert_eq!(
            field(json!({"topic": "a", "payload": "x", "qos": 2})),
            "qos"
        );
        assert_eq!(
            field(json!({"topic": "a", "payload": "!!", "encoding": "base64"})),
            "payload"
        );
        assert_eq!(
            field(json!({"topic": "a", "payload": "x", "encoding": "hex"})),
            "encoding"
        );
        assert_eq!(
            field(json!({"topic": "a", "payload": "x", "ttl_secs": 0})),
            "ttl_secs"
        );
        assert_eq!(
            field(json!({"topic": "a", "payload": "x", "wait_ack": true})),
            "wait_ack"
        );
        assert_eq!(
            field(json!({"topic": "a", "payload": "x", "colour": 1})),
            "colour"
        );
        assert_eq!(
            field(json!({"topic": "a", "payload": "x", "client_id": ""})),
            "client_id"
        );
        let ok = parse(json!({"client_id": "d", "topic": "a", "payload": "aGk=", "encoding": "base64", "qos": 1, "wait_ack": true})).unwrap();
        assert_eq!(&ok.payload[..], b"hi");
        assert!(ok.wait_ack);
    }
}
