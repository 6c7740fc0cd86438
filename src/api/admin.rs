//! `POST /v1/admin/reload`: reads the config file again (`src/reload.rs`), under the same
//! access rule as the rest of `/v1`. 200 with what was reloaded, what changed and what
//! needs a restart; 422 naming the invalid key (the old settings stay); 409 when the
//! gateway was started without a config file; 503 when a shard's mailbox stayed full.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::ApiState;
use crate::reload::ReloadError;

pub(super) async fn reload(State(state): State<ApiState>) -> Response {
    match state.inner.reloader.reload("http").await {
        Ok(report) => (StatusCode::OK, axum::Json(report)).into_response(),
        Err(e) => refusal(e).into_response(),
    }
}

fn refusal(e: ReloadError) -> ApiError {
    let message = e.to_string();
    match e {
        ReloadError::NoFile => ApiError::new(StatusCode::CONFLICT, "no_config_file", message),
        ReloadError::Invalid { key, .. } => {
            let err = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", message);
            match key {
                Some(k) => err.field(k),
                None => err,
            }
        }
        ReloadError::Busy(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
        }
    }
}
