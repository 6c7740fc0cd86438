//! Request bodies: the per-message and batch size limits, a permit for each large body
//! (`http.max_large_bodies`), the read timeout, and the JSON checks.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};

use crate::config::Config;

use super::error::ApiError;
use super::push::shutting_down;
use super::Inner;

// ---------------------------------------------------------------------------------------
// Request bodies.

/// Bodies over this many bytes are "large": at most `http.max_large_bodies` of them are
/// read at once, so concurrent big batches cannot take the memory with them.
pub(super) const LARGE_BODY: usize = 64 << 10;

/// The body limit of one push message, single or in a batch: its payload (at most
/// `max_packet_size` bytes) and topic JSON-escaped at up to 6 bytes each (`\u0001`),
/// plus the other fields.
pub(super) fn message_body_limit(config: &Config) -> usize {
    (config.mqtt.max_packet_size as usize + config.mqtt.max_topic_len as usize) * 6 + 4096
}

/// The body limit of a batch: `max_batch` messages, at most `http.max_batch_body_bytes`
/// but never less than one message's (what `POST /v1/push` accepts, a batch does too).
pub(super) fn batch_body_limit(config: &Config) -> usize {
    let one = message_body_limit(config);
    one.saturating_mul(config.http.max_batch as usize)
        .min(config.http.max_batch_body_bytes as usize)
        .max(one)
}

pub(super) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body over {limit} bytes"),
    )
}

/// `application/json`, with or without parameters (`; charset=utf-8`), in any case.
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// A request body, with the permit that a large one holds while the caller uses it.
pub(super) type ReadBody<'a> = (Bytes, Option<tokio::sync::SemaphorePermit<'a>>);

/// Reads a JSON body: 415 unless `Content-Type: application/json`, 413 over `limit`
/// bytes (at once when `Content-Length` says so, before reading any of it), 408 when it
/// takes longer than `http.body_timeout_ms`. The caller parses it (see `push_json`)
/// while holding the permit.
pub(super) async fn json_body<'a>(
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
pub(super) async fn read_body(
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

/// The body as text for `serde_json::from_str`, or 400 `invalid_json`: JSON is UTF-8
/// (a string with a bad byte is refused by any JSON parse, and outside strings only
/// ASCII is JSON), and one check of the whole body spares serde_json's check of every
/// string it reads from a slice, ~800 instructions per item of a batch.
pub(super) fn json_text(bytes: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("malformed JSON: the body is not UTF-8 ({e})"),
        )
    })
}

/// 400 for a body that is not JSON at all.
pub(super) fn malformed_json(e: serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        format!("malformed JSON: {e}"),
    )
}

/// 400 for a JSON body that is not an object.
pub(super) fn not_an_object() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_json",
        "the body must be a JSON object",
    )
}
