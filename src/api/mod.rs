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
//!
//! The parts: `access` (who may call), `body` (size limits, permits, JSON checks),
//! `spec` (the validated push and its answers), `push` (the push handlers), `fleet`
//! (client pushes to devices on other nodes of a fleet), `clients` (the clients routes
//! and stats), `listing` (the paged lists of clients and retained messages, deleting a
//! retained message), `admin` (the config reload) and `error` (the error answers); this file holds the
//! shared state, the router and the OpenAPI document.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::cluster::Fleet;
use crate::config::Config;
use crate::idempotency::Keys;
use crate::mailbox::Mailboxes;
use crate::metrics::{PushMetrics, ShardMetrics};

mod access;
mod admin;
mod body;
mod clients;
mod error;
mod fleet;
mod listing;
mod message_id;
mod push;
mod spec;
mod stats;
#[cfg(test)]
mod tests;

use self::access::{auth, count_push_requests, Access};
use self::clients::{delete_client, delete_client_by_query, get_client};
use self::listing::{delete_retained, get_clients, list_retained};
use self::push::{push, push_batch, Progress};
use self::stats::stats;

/// The OpenAPI 3 description of this API.
pub(crate) const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Default and largest `timeout_ms` for `wait_ack`.
const DEFAULT_TIMEOUT_MS: u64 = 5_000;
const MAX_TIMEOUT_MS: u64 = 300_000;
/// Longest accepted `idempotency_key`.
const MAX_IDEMPOTENCY_KEY: usize = 256;

#[derive(Clone)]
pub(crate) struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    /// Reads the config file again (`POST /v1/admin/reload`).
    reloader: Arc<crate::reload::Reloader>,
    access: Access,
    mailboxes: Mailboxes,
    shards: Vec<Arc<ShardMetrics>>,
    push_metrics: Arc<PushMetrics>,
    /// This node's place in the fleet (`[cluster] enabled`): pushes to devices on other
    /// nodes go there (`fleet`).
    fleet: Option<Arc<Fleet>>,
    idempotency: Mutex<Keys<Progress>>,
    /// Permits for reading bodies over [`LARGE_BODY`] (`http.max_large_bodies`).
    large_bodies: tokio::sync::Semaphore,
    ids: AtomicU64,
    id_prefix: u64,
}

impl ApiState {
    pub(crate) fn new(
        reloader: Arc<crate::reload::Reloader>,
        config: Arc<Config>,
        mailboxes: Mailboxes,
        shards: Vec<Arc<ShardMetrics>>,
        push_metrics: Arc<PushMetrics>,
        fleet: Option<Arc<Fleet>>,
    ) -> Self {
        let id_prefix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        ApiState {
            inner: Arc::new(Inner {
                access: Access::from_config(&config.http),
                large_bodies: tokio::sync::Semaphore::new(config.http.max_large_bodies as usize),
                config,
                reloader,
                mailboxes,
                shards,
                push_metrics,
                fleet,
                idempotency: Mutex::new(Keys::default()),
                ids: AtomicU64::new(0),
                id_prefix,
            }),
        }
    }
}

impl ApiState {
    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }
}

pub(crate) fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/push", post(push))
        .route("/v1/push/batch", post(push_batch))
        .route(
            "/v1/clients/{client_id}",
            get(get_client).delete(delete_client),
        )
        .route(
            "/v1/clients",
            get(get_clients).delete(delete_client_by_query),
        )
        .route("/v1/retained", get(list_retained).delete(delete_retained))
        .route("/v1/stats", get(stats))
        .route("/v1/admin/reload", post(admin::reload))
        .route("/v1/openapi.json", get(openapi))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_push_requests,
        ))
        .with_state(state)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
