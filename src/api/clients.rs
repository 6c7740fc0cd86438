//! The clients routes (`/v1/clients`: look up or disconnect a client id on its home
//! shard).

use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::oneshot;

use crate::mailbox::{home_shard, ShardMsg};
use crate::push_json::{Field, MaybeObject};

use super::body::{json_body, malformed_json, not_an_object};
use super::error::ApiError;
use super::ApiState;

// ---------------------------------------------------------------------------------------
// Clients and stats.

pub(super) async fn ask_home<T>(
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

pub(super) fn not_found(client_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no session for client id `{client_id}`"),
    )
    .field("client_id")
}

/// The query of a `/v1/clients` route, each parameter at most once.
#[derive(Default)]
pub(super) struct ClientQuery {
    client_id: Option<String>,
    clear_session: bool,
}

pub(super) type RawQuery = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The query's parameters, each one of `allowed` and given at most once, or a JSON 400
/// naming the first that is not.
pub(super) fn checked_query<'a>(
    query: RawQuery,
    allowed: &[&'a str],
) -> Result<Vec<(&'a str, String)>, ApiError> {
    let Query(pairs) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("malformed query string: {e}"),
        )
    })?;
    let mut out: Vec<(&str, String)> = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        let Some(name) = allowed.iter().find(|a| **a == k.as_str()) else {
            return Err(ApiError::bad(&k, format!("unknown query parameter `{k}`")));
        };
        if out.iter().any(|(n, _)| n == name) {
            return Err(ApiError::bad(&k, format!("`{k}` is given more than once")));
        }
        out.push((name, v));
    }
    Ok(out)
}

/// Parses `query`, refusing parameters not in `allowed`, repeated ones and bad values
/// with a JSON 400 naming the parameter.
pub(super) fn client_query(query: RawQuery, allowed: &[&str]) -> Result<ClientQuery, ApiError> {
    let mut out = ClientQuery::default();
    for (k, v) in checked_query(query, allowed)? {
        match k {
            "client_id" if v.is_empty() => {
                return Err(ApiError::bad(k, "`client_id` must not be empty"))
            }
            "client_id" => out.client_id = Some(v),
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
pub(super) fn path_client_id(
    path: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::bad("client_id", format!("bad client id in the path: {e}")))
}

/// The target of `/v1/clients` (no id in the path): the `client_id` query parameter, or
/// a JSON body `{"client_id", "clear_session"?}` for an id too long for a URI (HTTP/1
/// URIs end at 65,534 bytes; MQTT allows 65,535-byte client ids).
pub(super) async fn unpathed_target(
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

pub(super) async fn get_client(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: RawQuery,
) -> Response {
    let target = client_query(query, &[]).and_then(|_| path_client_id(path));
    answer_or_error(target, |id| client_info(s, id)).await
}

pub(super) async fn get_client_by_query(
    State(s): State<ApiState>,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = unpathed_target(&s, query, &headers, body, false).await;
    answer_or_error(target, |(id, _)| client_info(s, id)).await
}

pub(super) async fn delete_client(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: RawQuery,
) -> Response {
    let target = client_query(query, &["clear_session"])
        .and_then(|q| Ok((path_client_id(path)?, q.clear_session)));
    answer_or_error(target, |(id, clear)| kick(s, id, clear)).await
}

pub(super) async fn delete_client_by_query(
    State(s): State<ApiState>,
    query: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = unpathed_target(&s, query, &headers, body, true).await;
    answer_or_error(target, |(id, clear)| kick(s, id, clear)).await
}

/// The error of a bad request, or what `then` answers for its target.
pub(super) async fn answer_or_error<T, F: std::future::Future<Output = Response>>(
    target: Result<T, ApiError>,
    then: impl FnOnce(T) -> F,
) -> Response {
    match target {
        Ok(t) => then(t).await,
        Err(e) => e.into_response(),
    }
}

pub(super) async fn client_info(s: ApiState, client_id: String) -> Response {
    if s.inner.fleet.is_some() {
        return match s.inner.fleet_client_info(&s, &client_id).await {
            Ok(Some(info)) => (StatusCode::OK, axum::Json(info)).into_response(),
            Ok(None) => not_found(&client_id).into_response(),
            Err(e) => e.into_response(),
        };
    }
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
pub(super) async fn kick(s: ApiState, client_id: String, clear_session: bool) -> Response {
    let id = client_id.clone();
    let kicked = match &s.inner.fleet {
        Some(_) => s.inner.fleet_kick(&s, &client_id, clear_session).await,
        None => {
            let ask = |reply| ShardMsg::Kick {
                client_id: id,
                clear_session,
                reply,
            };
            ask_home(&s, &client_id, ask).await
        }
    };
    match kicked {
        Ok(Some(was_online)) => (
            StatusCode::OK,
            axum::Json(json!({"client_id": client_id, "disconnected": was_online, "session_cleared": clear_session})),
        )
            .into_response(),
        Ok(None) => not_found(&client_id).into_response(),
        Err(e) => e.into_response(),
    }
}
