//! Errors and their answers: `{"error": {"code", "message", "field"?}}` with the status,
//! and the `status` label each one counts under in the push metrics.

use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// Errors: `{"error": {"code", "message", "field"?}}`.

#[derive(Debug, Clone)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    message: String,
    pub(super) field: Option<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub(super) fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub(super) fn bad(field: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message).field(field)
    }

    /// The shard (or, for `queued`, the durable store behind it) did not answer in time.
    pub(super) fn answer_timeout(after: Duration) -> Self {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "answer_timeout",
            format!(
                "no answer from the gateway within {} ms (a busy shard or a slow store); the push may still be delivered: retry with the same idempotency_key to learn its outcome",
                after.as_millis()
            ),
        )
    }

    pub(super) fn overloaded() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "a shard mailbox is full; retry later",
        )
    }

    pub(super) fn message(&self) -> &str {
        &self.message
    }

    /// Whether a shard's `dropped` reason is the store refusing a push it would have to
    /// hold (answered 503, not `dropped`).
    pub(super) fn is_store_refusal(reason: &str) -> bool {
        reason == crate::store::REFUSED_DOWN || reason == crate::store::REFUSED_BACKLOG
    }

    /// 503: the push needs the store (QoS 1/2 to a persistent session) and the store
    /// cannot take it now; nothing was stored or sent.
    pub(super) fn store_refused(code: &'static str) -> Self {
        let why = if code == crate::store::REFUSED_BACKLOG {
            "the durable store is behind: this device's shard holds [store] backlog_max_bytes of changes not yet committed"
        } else {
            "the durable store is down after a failed commit and is being reopened"
        };
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            format!("{why}: a QoS 1/2 push to a persistent session cannot be stored now; nothing was stored or sent, retry later"),
        )
    }

    pub(super) fn body(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(f) = &self.field {
            e["field"] = json!(f);
        }
        json!({ "error": e })
    }

    /// The `status` label of `gateway_push_messages_total` for this error.
    pub(super) fn metric_status(&self) -> &'static str {
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
