//! Who may call `/v1`: bearer tokens (compared in constant time) once `[http] tokens` is
//! set, otherwise only the `tokenless_networks` sources (loopback by default); and the
//! middleware that counts push requests.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::http::Network;

use super::error::ApiError;
use super::ApiState;

// ---------------------------------------------------------------------------------------
// Auth: bearer tokens for every /v1 route, compared in constant time; without tokens,
// only the `tokenless_networks` sources (loopback by default) are answered.

/// Who may use `/v1`, from `[http]`.
pub(super) struct Access {
    tokens: Vec<String>,
    tokenless: Vec<Network>,
    allow_remote: bool,
}

/// Why a `/v1` request is refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Tokens are set and the request has none, or a wrong one.
    Unauthorized,
    /// No tokens are set and the source is not in `tokenless_networks`.
    RemoteWithoutToken,
}

impl Access {
    pub(super) fn from_config(h: &crate::config::HttpConfig) -> Access {
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
    pub(super) fn check(
        &self,
        peer: Option<IpAddr>,
        authorization: Option<&str>,
    ) -> Result<(), Refusal> {
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
pub(super) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

pub(super) async fn auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
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
pub(super) async fn count_push_requests(
    State(s): State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
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
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
