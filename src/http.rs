//! The HTTP side, served on the business pool: health, readiness, Prometheus metrics, and
//! the push API of [`crate::api`].
//!
//! Nothing here touches a shard's state directly: metrics are read from each shard's
//! single-writer counters, so a scrape never stops an IO shard.
//!
//! It also owns the HTTP connections themselves ([`serve`]): at most
//! `http.max_connections` at once, each closed when its headers take longer than
//! `http.header_timeout_ms` or when its answer makes no progress for
//! `http.write_timeout_ms` ([`write_deadline`]), so slow or half-sent requests and
//! clients that never read cannot use up the file descriptors the MQTT listeners need;
//! and the source networks ([`Network`]) the tokenless `/v1` API answers.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::{self, ApiState};
use crate::metrics::{self, PushMetrics, ShardMetrics};

mod write_deadline;
use write_deadline::WriteDeadline;

#[derive(Clone)]
pub(crate) struct AdminState {
    pub shards: Vec<Arc<ShardMetrics>>,
    /// What threads count on the shards' behalf (the TLS handshake threads): in totals.
    pub off_shard: Vec<Arc<ShardMetrics>>,
    pub ready: Arc<AtomicBool>,
    /// Lines the lossy logger dropped (None when logging is not set up, e.g. in tests).
    pub log_dropped: Option<tracing_appender::non_blocking::ErrorCounter>,
    pub push: Arc<PushMetrics>,
    /// The durable store's metrics (`None` when the store is off).
    pub store: Option<Arc<crate::store::StoreMetrics>>,
    /// The event sinks' metrics (`None` when `[events]` names no sink).
    pub events: Option<Arc<crate::events::EventsMetrics>>,
    /// The fleet, for its metrics (`None` unless `[cluster] enabled`).
    pub fleet: Option<Arc<crate::cluster::Fleet>>,
    /// `gateway_config_reloads_total`.
    pub reloads: Arc<crate::reload::ReloadMetrics>,
    pub started: Instant,
}

/// `/healthz`, `/readyz` and `/metrics` (open), merged with the `/v1` API (token-guarded).
pub(crate) fn router(state: AdminState, api: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
        .merge(api::router(api))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn method_not_allowed() -> Response {
    json(
        StatusCode::METHOD_NOT_ALLOWED,
        r#"{"error":{"code":"method_not_allowed","message":"this route does not take this method"}}"#,
    )
}

/// Says at startup who the `/v1` API answers; loudly when it is open to every source.
fn log_api_access(h: &crate::config::HttpConfig) {
    if !h.tokens.is_empty() {
        tracing::info!(tokens = h.tokens.len(), "/v1 API: bearer token required");
    } else if h.allow_remote_without_token {
        tracing::warn!("[http] allow_remote_without_token = true and tokens is empty: the /v1 API is OPEN TO EVERY SOURCE that reaches {}: anyone can push to any device, kick devices and wipe their sessions; set [http] tokens", h.listen);
    } else if let Some(wide) = h
        .tokenless_networks
        .iter()
        .find(|n| Network::parse(n).is_ok_and(|n| !n.is_loopback_only()))
    {
        tracing::warn!(network = %wide, "[http] tokenless_networks reaches beyond loopback and tokens is empty: every source in it can push to any device, kick devices and wipe their sessions without a token");
    } else {
        tracing::info!(networks = ?h.tokenless_networks, "/v1 API: no tokens set, answering only http.tokenless_networks (others get 403)");
    }
}

async fn not_found() -> Response {
    json(
        StatusCode::NOT_FOUND,
        r#"{"error":{"code":"not_found","message":"no such route"}}"#,
    )
}

/// Serves `listener` until `stop` fires: one task per connection, at most
/// `http.max_connections` of them (the next accept waits for a free slot), each with
/// hyper's header read timeout and a write deadline. On `stop`, open connections finish
/// their request.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    api: ApiState,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let config = api.config().clone();
    let h = &config.http;
    log_api_access(h);
    let slots = Arc::new(tokio::sync::Semaphore::new(connection_cap(
        h.max_connections,
    )));
    let timeouts = Timeouts {
        header: Duration::from_millis(u64::from(h.header_timeout_ms)),
        write: Duration::from_millis(u64::from(h.write_timeout_ms)),
    };
    let app = router(state, api);
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let app = app.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, app, timeouts, stopped).await;
            drop(permit);
        });
    }
    let _ = stopping.send(true);
}

/// `http.max_connections`, but at most a quarter of RLIMIT_NOFILE: however many slow
/// HTTP clients come, three quarters of the file descriptors stay for MQTT devices.
fn connection_cap(configured: u32) -> usize {
    let configured = configured as usize;
    let Ok((soft, _)) = crate::doctor::nofile_limit() else {
        return configured;
    };
    let share = usize::try_from(soft / 4).unwrap_or(usize::MAX).max(1);
    if configured > share {
        tracing::warn!(
            max_connections = configured,
            rlimit_nofile = soft,
            cap = share,
            "http.max_connections lowered to a quarter of RLIMIT_NOFILE, to keep descriptors for MQTT"
        );
    }
    configured.min(share)
}

/// An accept error (EMFILE, ECONNABORTED, ...): logged, then a short pause so a process
/// out of file descriptors does not spin on it.
async fn accept_failed(e: &std::io::Error) {
    tracing::warn!(error = %e, "HTTP accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// How long one connection may take to send its headers, and to take its answer.
#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    write: Duration,
}

/// One HTTP/1 connection; the router sees the peer as `ConnectInfo<SocketAddr>`.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    timeouts: Timeouts,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |mut req: axum::http::Request<_>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        tower::Service::call(&mut app.clone(), req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    let io = TokioIo::new(WriteDeadline::new(stream, timeouts.write));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection closed");
    }
}

/// An IP network (`10.0.0.0/8`, `::1/128`, or one address), as `http.tokenless_networks`
/// lists them. An IPv4-mapped IPv6 peer matches as its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub(crate) fn parse(s: &str) -> Result<Network, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0..={max}"))?,
        };
        Ok(Network { addr, prefix })
    }

    /// True if every address of the network is a loopback address.
    pub(crate) fn is_loopback_only(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => a.is_loopback() && self.prefix >= 8,
            IpAddr::V6(a) => a.is_loopback() && self.prefix == 128,
        }
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let host_bits = u32::from(width - self.prefix);
        let shift = host_bits + if ip.is_ipv4() { 96 } else { 0 };
        let mask = u128::MAX.checked_shl(shift).unwrap_or(0);
        bits(ip) & mask == bits(self.addr) & mask
    }
}

async fn healthz() -> Response {
    json(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// Ready until shutdown. A store that is down (reopening after a failed commit) keeps
/// the node ready (its connections and non-durable traffic work) and is named in the
/// body; `gateway_store_up` is what to alert on. So does a fleet node whose NATS is
/// away (it serves its own devices; `gateway_fleet_nats_connected`).
async fn readyz(State(s): State<AdminState>) -> Response {
    let store_down = s.store.as_ref().is_some_and(|st| !st.up());
    let nats_down = s.fleet.as_ref().is_some_and(|f| !f.nats_up());
    if s.ready.load(Ordering::Relaxed) {
        let body = match (store_down, nats_down) {
            (true, true) => r#"{"status":"ready","store":"down","nats":"down"}"#,
            (true, false) => r#"{"status":"ready","store":"down"}"#,
            (false, true) => r#"{"status":"ready","nats":"down"}"#,
            (false, false) => r#"{"status":"ready"}"#,
        };
        json(StatusCode::OK, body)
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
    metrics::render(&s.shards, &s.off_shard, &mut out);
    s.push.render(&mut out);
    if let Some(st) = &s.store {
        st.render(&mut out);
    }
    if let Some(ev) = &s.events {
        ev.render(&mut out);
    }
    if let Some(f) = &s.fleet {
        f.render_metrics(&mut out);
    }
    s.reloads.render(&mut out);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_match_their_addresses() {
        let lo = Network::parse("127.0.0.0/8").unwrap();
        assert!(lo.contains(ip("127.0.0.1")));
        assert!(lo.contains(ip("127.255.0.9")));
        assert!(lo.contains(ip("::ffff:127.0.0.1")), "IPv4-mapped");
        assert!(!lo.contains(ip("192.0.2.2")));
        assert!(!lo.contains(ip("::1")));
        let one = Network::parse("::1").unwrap();
        assert!(one.contains(ip("::1")));
        assert!(!one.contains(ip("::2")));
        let all = Network::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("203.0.113.7")));
        let host = Network::parse("10.1.2.3").unwrap();
        assert!(host.contains(ip("10.1.2.3")) && !host.contains(ip("10.1.2.4")));
        let v6 = Network::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fd00::2")) && !v6.contains(ip("fe80::1")));
        let loopback = |s: &str| Network::parse(s).unwrap().is_loopback_only();
        assert!(loopback("127.0.0.0/8") && loopback("127.0.0.2") && loopback("::1"));
        assert!(!loopback("0.0.0.0/0") && !loopback("127.0.0.0/7") && !loopback("10.0.0.0/8"));
    }

    #[test]
    fn bad_networks_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/x",
            "host",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }
}
