//! The HTTP side, served on the business pool: health, readiness, Prometheus metrics, and
//! the push API of [`crate::api`].
//!
//! Nothing here touches a shard's state directly: metrics are read from each shard's
//! single-writer counters, so a scrape never stops an IO shard.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::{self, ApiState};
use crate::metrics::{self, PushMetrics, ShardMetrics};

#[derive(Clone)]
pub struct AdminState {
    pub shards: Vec<Arc<ShardMetrics>>,
    pub ready: Arc<AtomicBool>,
    /// Lines the lossy logger dropped (None when logging is not set up, e.g. in tests).
    pub log_dropped: Option<tracing_appender::non_blocking::ErrorCounter>,
    pub push: Arc<PushMetrics>,
    /// The durable store's metrics (`None` when the store is off).
    pub store: Option<Arc<crate::store::StoreMetrics>>,
    /// The event sinks' metrics (`None` when `[events]` names no sink).
    pub events: Option<Arc<crate::events::EventsMetrics>>,
    pub started: Instant,
}

/// `/healthz`, `/readyz` and `/metrics` (open), merged with the `/v1` API (token-guarded).
pub fn router(state: AdminState, api: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
        .merge(api::router(api))
        .fallback(not_found)
}

async fn not_found() -> Response {
    json(
        StatusCode::NOT_FOUND,
        r#"{"error":{"code":"not_found","message":"no such route"}}"#,
    )
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    api: ApiState,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let app = router(state, api);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = stop.await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

async fn healthz() -> Response {
    json(StatusCode::OK, r#"{"status":"ok"}"#)
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        json(StatusCode::OK, r#"{"status":"ready"}"#)
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"shutting_down"}"#,
        )
    }
}

fn json(code: StatusCode, body: &'static str) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    let mut out = String::with_capacity(8192);
    metrics::render(&s.shards, &mut out);
    s.push.render(&mut out);
    if let Some(st) = &s.store {
        st.render(&mut out);
    }
    if let Some(ev) = &s.events {
        ev.render(&mut out);
    }
    let dropped = s.log_dropped.as_ref().map_or(0, |c| c.dropped_lines());
    metrics::render_process(&mut out, dropped as u64, s.started);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
