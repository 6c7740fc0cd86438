//! Starting and stopping the whole gateway.
//!
//! `Server::start` binds one SO_REUSEPORT listener per shard on the same address (so the
//! kernel spreads accepts), starts each shard on its own OS thread, and starts the business
//! pool — a multi-thread tokio runtime for the HTTP API and metrics — so no HTTP load can
//! stall device IO. `shutdown` asks every shard to close its connections and waits at most
//! `drain_timeout_secs`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::ApiState;
use crate::auth::Authenticator;
use crate::cluster::Fleet;
use crate::config::Config;
use crate::events::{EventSender, Events};
use crate::http::{self, AdminState};
use crate::listen::{bind_group, BindError};
use crate::logging::LogGuard;
use crate::mailbox::{Mailboxes, ShardMsg};
use crate::metrics::{PushMetrics, ShardMetrics};
use crate::reload::Reloader;
use crate::shard::{self, ShardContext};
use crate::store::{self, Store};
use crate::tls::handshaker::HandshakeThreads;

/// The longest a stopping fleet node takes to leave the fleet after its shards stopped
/// (`Fleet::close`: its last session changes in JetStream, its lease given up, its last
/// messages read by NATS); a second or less when NATS answers.
const FLEET_CLOSE: Duration = Duration::from_secs(5);

pub struct Server {
    pub mqtt_addr: SocketAddr,
    /// The TLS listener's address when `tls_listen` is set.
    pub tls_addr: Option<SocketAddr>,
    /// The WebSocket listeners' addresses when `ws_listen` / `wss_listen` are set.
    pub ws_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    config: Arc<Config>,
    mailboxes: Mailboxes,
    shards: Vec<JoinHandle<()>>,
    business: tokio::runtime::Runtime,
    ready: Arc<AtomicBool>,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    store: Option<Store>,
    events: Events,
    fleet: Option<Arc<Fleet>>,
    reloader: Arc<Reloader>,
    /// The TLS handshake threads (`[limits] tls_handshake_threads`), with a TLS listener.
    handshakers: Option<HandshakeThreads>,
}

/// Why the gateway could not start; each kind has its exit code ([`StartError::exit_code`]).
#[derive(Debug)]
pub enum StartError {
    /// A file the config names (password file, JWT key, TLS certificate) is unusable:
    /// the config is invalid, as `gateway check-config` would say.
    Config(String),
    /// The durable store cannot be opened (damaged, or held by another process).
    Store(store::OpenError),
    /// A listener cannot be bound (the address is in use, or not ours).
    Bind(BindError),
    /// `[cluster] enabled` and NATS or its buckets cannot be reached.
    Fleet(String),
    Io(io::Error),
}

/// Exit code of an invalid config (`check-config`, and `run` with the same config).
pub const EXIT_INVALID_CONFIG: u8 = 2;
/// Exit code of a store held by another process (`run` and `store-repair`).
pub const EXIT_STORE_IN_USE: u8 = 3;

impl StartError {
    /// The process exit code: 2 invalid config, 3 store in use, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) => EXIT_INVALID_CONFIG,
            StartError::Store(e) if e.in_use() => EXIT_STORE_IN_USE,
            _ => 1,
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(m) => write!(f, "{m}"),
            StartError::Store(e) => write!(f, "{e}"),
            StartError::Bind(e) => write!(f, "{e}"),
            StartError::Fleet(m) => write!(f, "{m}"),
            StartError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        StartError::Io(e)
    }
}

impl From<BindError> for StartError {
    fn from(e: BindError) -> Self {
        StartError::Bind(e)
    }
}

/// Checks the files the config names (the password file and keys the auth providers need,
/// the TLS certificate and key) and builds what they configure. `gateway check-config` and
/// the start share it, so both refuse a bad file with the same message; the start calls it
/// before it creates anything on disk.
#[allow(clippy::type_complexity)]
pub fn load_config_files(
    config: &Config,
) -> Result<
    (
        Authenticator,
        Option<(Arc<rustls::ServerConfig>, Arc<crate::tls::TlsReload>)>,
    ),
    String,
> {
    let auth = Authenticator::from_config(&config.auth, config.business_threads())
        .map_err(|e| format!("config error: {e}"))?;
    let tls = match config.mqtt.tls_listen.or(config.mqtt.wss_listen) {
        Some(_) => Some(
            crate::tls::server_config(&config.mqtt)
                .map_err(|e| format!("config error: TLS: {e}"))?,
        ),
        None => None,
    };
    Ok((auth, tls))
}

/// One SO_REUSEPORT socket per shard on `addr` when it is set (`None` for every shard
/// otherwise), and the address they listen on.
#[allow(clippy::type_complexity)]
fn bind_optional(
    key: &'static str,
    addr: Option<SocketAddr>,
    n: usize,
    backlog: i32,
) -> Result<(Option<SocketAddr>, Vec<Option<std::net::TcpListener>>), StartError> {
    let Some(addr) = addr else {
        return Ok((None, (0..n).map(|_| None).collect()));
    };
    let group = bind_group(key, addr, n, backlog)?;
    let bound = group[0].local_addr()?;
    Ok((Some(bound), group.into_iter().map(Some).collect()))
}

/// Starts the TLS handshake threads when there is a TLS listener and
/// `[limits] tls_handshake_threads` is above 0.
fn start_handshakers(
    config: &Config,
    tls_config: &Option<Arc<rustls::ServerConfig>>,
    mailboxes: &Mailboxes,
    metrics: &[Arc<ShardMetrics>],
    per_ip: &Arc<crate::limits::PerIpLimit>,
    open: &Arc<AtomicUsize>,
) -> io::Result<Option<HandshakeThreads>> {
    let Some(threads) = config
        .tls_handshake_threads()
        .filter(|_| tls_config.is_some())
    else {
        return Ok(None);
    };
    let shared = crate::tls::handshaker::Shared {
        mailboxes: mailboxes.clone(),
        shards: metrics.to_vec(),
        per_ip: per_ip.clone(),
        open_connections: open.clone(),
        connect_timeout: config.mqtt.connect_timeout(),
    };
    let nice = config.limits.tls_handshake_nice;
    crate::tls::handshaker::start(threads, nice, shared).map(Some)
}

/// After a crash (now or before an earlier start that did not handle it), before any
/// device connects: notes up to where the bucket holds the last run's wills, published
/// once the fleet runs (`cluster::session_leftover`). A failure leaves them to the next
/// start.
fn note_leftover_wills(fleet: &Fleet, marker: PathBuf, runtime: &tokio::runtime::Handle) {
    let note = async {
        let attempts = async {
            let mut failed = String::new();
            for _ in 0..3 {
                match fleet.sessions.note_leftover_wills(marker.clone()).await {
                    Ok(()) => return Ok(()),
                    Err(e) => failed = e,
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(failed)
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), attempts).await
    };
    match runtime.block_on(note) {
        Ok(Ok(())) => tracing::info!("cluster: the last run ended without letting go of the store; its devices' wills are published once this node runs"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cluster: cannot note the wills the last run left; the next start tries again"),
        Err(_) => tracing::warn!("cluster: the wills the last run left were not noted within 10 s; the next start tries again"),
    }
}

/// Logs where the store lives as an absolute path: a relative `[store] path` depends on
/// the working directory the gateway was started in.
fn log_store_path(path: &Path) {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    tracing::info!(
        path = %absolute.display(),
        configured = %path.display(),
        "store path (a relative [store] path is relative to the working directory)"
    );
}

impl Server {
    /// Binds, starts the shards and the business pool, and returns once all accept.
    /// Without a config file to read again, a reload answers that it cannot.
    pub fn start(config: Config, log: Option<&LogGuard>) -> Result<Server, StartError> {
        Server::start_from(config, None, log)
    }

    /// Like [`Server::start`] for a config read from `path`, which a reload (SIGHUP,
    /// `POST /v1/admin/reload`) reads again.
    pub fn start_from(
        config: Config,
        path: Option<PathBuf>,
        log: Option<&LogGuard>,
    ) -> Result<Server, StartError> {
        let config = Arc::new(config);
        let n = config.shard_count();
        let backlog = config.tcp.backlog as i32;
        let started = Instant::now();

        // The files the config names are checked before anything is created on disk.
        let (auth, tls) = load_config_files(&config).map_err(StartError::Config)?;
        let auth = Arc::new(auth);
        let (tls_config, tls_reload) = tls.unzip();

        // The store is loaded before anything listens: a restarted gateway serves its
        // devices their sessions from the first CONNECT.
        let (store, mut restore, retained) = if config.store.enabled {
            log_store_path(&config.store.path);
            let (store, loaded) = store::open(&config.store, n).map_err(StartError::Store)?;
            (Some(store), loaded.sessions, loaded.retained)
        } else {
            ((None), (0..n).map(|_| Vec::new()).collect(), Vec::new())
        };
        let retained = Arc::new(retained);

        // Bind all listeners before any shard runs; each group refuses an address another
        // process already listens on, and port 0 resolves once for the whole group.
        let listeners = bind_group("mqtt.listen", config.mqtt.listen, n, backlog)?;
        let mqtt_addr = listeners[0].local_addr()?;
        // The TLS listener, likewise one socket per shard, and its rustls config.
        let mut tls_listeners: Vec<Option<(std::net::TcpListener, _)>> =
            (0..n).map(|_| None).collect();
        let mut tls_addr = None;
        if let (Some(addr), Some(tls_config)) = (config.mqtt.tls_listen, &tls_config) {
            let group = bind_group("mqtt.tls_listen", addr, n, backlog)?;
            tls_addr = Some(group[0].local_addr()?);
            for (slot, l) in tls_listeners.iter_mut().zip(group) {
                *slot = Some((l, tls_config.clone()));
            }
        }
        // The WebSocket listeners, likewise (wss with the same rustls config).
        let (ws_addr, ws_listeners) =
            bind_optional("mqtt.ws_listen", config.mqtt.ws_listen, n, backlog)?;
        let (wss_addr, wss_listeners) =
            bind_optional("mqtt.wss_listen", config.mqtt.wss_listen, n, backlog)?;
        let wss_listeners = wss_listeners
            .into_iter()
            .map(|l| l.and_then(|l| tls_config.clone().map(|c| (l, c))));
        let per_ip = Arc::new(crate::limits::PerIpLimit::new(
            config.limits.max_connections_per_ip,
        ));

        // The business pool first: shards hand it slow authentication.
        let business = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.business_threads())
            .thread_name("business")
            .enable_all()
            .build()?;

        // The fleet's NATS before any device: the registry must hear every connect.
        let fleet = match config.cluster.enabled {
            true => Some(
                Fleet::connect(&config.cluster, business.handle()).map_err(StartError::Fleet)?,
            ),
            false => None,
        };
        // With the store, persistent sessions are also kept in the fleet's JetStream.
        let fleet_sessions = match (&fleet, &store) {
            (Some(f), Some(s)) => {
                let stale = crate::cluster::restart::drop_stale(
                    f,
                    &config.cluster,
                    &mut restore,
                    business.handle(),
                )
                .map_err(StartError::Fleet)?;
                s.forget_local(stale);
                if s.previous_run_crashed {
                    let store_file = crate::store::file_of(&config.store);
                    let marker = crate::lockholder::crash_marker_of(&store_file);
                    note_leftover_wills(f, marker, business.handle());
                }
                s.set_mirror(f.sessions.start(business.handle(), &restore));
                Some(f.sessions.clone())
            }
            _ => None,
        };
        // The event sinks run on the business pool; shards get their sender (which also
        // feeds the fleet's registry).
        let node = match &fleet {
            Some(f) => f.node.to_string(),
            None => crate::events::host_name(),
        };
        let registry_queue = fleet
            .as_ref()
            .map(|_| config.cluster.registry_queue_capacity as usize);
        let mut events =
            Events::start_with_registry(&config.events, &node, business.handle(), registry_queue)?;

        let (mailboxes, receivers) = Mailboxes::new(n, config.shards.mailbox_capacity as usize);
        let mailboxes = mailboxes.with_interest(config.shards.interest_buckets as usize);
        let metrics: Vec<Arc<ShardMetrics>> =
            (0..n).map(|_| Arc::new(ShardMetrics::default())).collect();
        let open = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(n));
        let handshakers =
            start_handshakers(&config, &tls_config, &mailboxes, &metrics, &per_ip, &open)?;
        let mut shards = Vec::with_capacity(n);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let clock_start = shard::ClockStart::now();
        let per_shard = listeners
            .into_iter()
            .zip(tls_listeners)
            .zip(ws_listeners.into_iter().zip(wss_listeners))
            .zip(receivers);
        for (id, (((listener, tls), (ws, wss)), mailbox)) in per_shard.enumerate() {
            shards.push(shard::spawn(ShardContext {
                id,
                clock_start,
                config: config.clone(),
                listener,
                tls,
                ws,
                wss,
                per_ip: per_ip.clone(),
                mailbox,
                mailboxes: mailboxes.clone(),
                metrics: metrics[id].clone(),
                open_connections: open.clone(),
                shards_running: running.clone(),
                auth: auth.clone(),
                business: business.handle().clone(),
                store: store.as_ref().and_then(Store::handle),
                restore: std::mem::take(&mut restore[id]),
                restored_after_crash: store.as_ref().is_some_and(|s| s.previous_run_crashed),
                sessions: fleet_sessions.clone(),
                retained: retained.clone(),
                ready: ready_tx.clone(),
                events: events.sender.clone(),
                fleet_route: fleet.as_ref().map(|f| f.routing.handle()),
                handshakers: handshakers.as_ref().map(HandshakeThreads::handle),
            })?);
        }
        drop(ready_tx);
        // Every shard has its sessions before the gateway says it listens.
        let restored: usize = ready_rx.iter().take(n).sum();
        drop(retained);

        let http_listener =
            std::net::TcpListener::bind(config.http.listen).map_err(|error| BindError {
                key: "http.listen",
                addr: config.http.listen,
                error,
            })?;
        http_listener.set_nonblocking(true)?;
        let http_addr = http_listener.local_addr()?;
        let ready = Arc::new(AtomicBool::new(true));
        let push = Arc::new(PushMetrics::default());
        let reloader = Arc::new(Reloader::new(
            path,
            config.clone(),
            auth.clone(),
            tls_reload,
            mailboxes.clone(),
        ));
        let api = ApiState::new(
            reloader.clone(),
            config.clone(),
            mailboxes.clone(),
            metrics.clone(),
            push.clone(),
            fleet.clone(),
        );
        if let (Some(fleet), Some(changes)) = (&fleet, events.registry.take()) {
            fleet
                .start(
                    business.handle(),
                    changes,
                    mailboxes.clone(),
                    api.fleet_handlers(),
                )
                .map_err(StartError::Fleet)?;
            // The node is reachable once it listens: its subscriptions are on NATS, not
            // only on their way, so a push from another node right after finds it.
            business.block_on(fleet.confirm_subscribed());
        }
        let state = AdminState {
            store: store.as_ref().map(|s| s.metrics.clone()),
            shards: metrics,
            off_shard: handshakers
                .as_ref()
                .map(|h| h.metrics.clone())
                .unwrap_or_default(),
            ready: ready.clone(),
            log_dropped: log.map(|g| g.dropped_counter()),
            push,
            events: (config.events.enabled() || config.cluster.enabled)
                .then(|| events.metrics.clone()),
            fleet: fleet.clone(),
            reloads: reloader.metrics.clone(),
            started: Instant::now(),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let listener = {
            let _enter = business.enter();
            tokio::net::TcpListener::from_std(http_listener)?
        };
        business.spawn(http::serve(listener, state, api, stop_rx));

        tracing::info!(
            %mqtt_addr,
            tls_addr = tls_addr.map(tracing::field::display),
            ws_addr = ws_addr.map(tracing::field::display),
            wss_addr = wss_addr.map(tracing::field::display),
            %http_addr,
            shards = n,
            restored_sessions = restored,
            startup_ms = started.elapsed().as_millis() as u64,
            "gateway listening"
        );
        Ok(Server {
            mqtt_addr,
            tls_addr,
            ws_addr,
            wss_addr,
            http_addr,
            config,
            mailboxes,
            shards,
            business,
            ready,
            http_stop: Some(stop_tx),
            store,
            events,
            fleet,
            reloader,
            handshakers,
        })
    }

    /// The handle through which shards emit events (disabled when `[events]` names no
    /// sink).
    pub fn event_sender(&self) -> EventSender {
        self.events.sender.clone()
    }

    /// Blocks until SIGINT or SIGTERM; each SIGHUP reloads the config meanwhile.
    pub fn wait_for_signal(&self) {
        self.business.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (mut term, mut hup) = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) {
                (Ok(t), Ok(h)) => (t, h),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot install SIGTERM/SIGHUP handler");
                    return;
                }
            };
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {
                        tracing::info!("SIGINT received, shutting down");
                        return;
                    }
                    _ = term.recv() => {
                        tracing::info!("SIGTERM received, shutting down");
                        return;
                    }
                    // The reload logs its outcome itself.
                    _ = hup.recv() => drop(self.reloader.reload("SIGHUP").await),
                }
            }
        });
    }

    /// Graceful shutdown: stop accepting, send MQTT 5 clients DISCONNECT 0x8B, close every
    /// connection, and wait at most `drain_timeout_secs` for the shards to finish.
    pub fn shutdown(mut self) {
        self.ready.store(false, Ordering::Relaxed);
        let deadline =
            Instant::now() + Duration::from_secs(self.config.shards.drain_timeout_secs as u64);
        for shard in 0..self.mailboxes.len() {
            // A full mailbox is drained by its shard; retry until the deadline.
            while self.mailboxes.try_send(shard, ShardMsg::Shutdown).is_err()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // The shards stop accepting; the handshakes under way end here. A shard that has
        // not yet read its Shutdown and submits one more gets it back and closes it; one
        // handed back to a stopping shard is closed there.
        if let Some(h) = self.handshakers.take() {
            h.stop();
        }
        for handle in self.shards.drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                tracing::warn!("a shard did not finish within drain_timeout_secs");
            }
        }
        if let Some(store) = self.store.take() {
            // The shards have handed over their last changes; let the writer commit them.
            store
                .close(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5));
        }
        // The shards' last events (disconnected: shutdown) get one delivery attempt.
        self.events
            .close(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1));
        // The registry writer has the shards' last `disconnected`; then the lease goes.
        if let Some(fleet) = self.fleet.take() {
            fleet.close(self.business.handle(), FLEET_CLOSE);
        }
        if let Some(tx) = self.http_stop.take() {
            let _ = tx.send(());
        }
        self.business.shutdown_timeout(Duration::from_secs(1));
        tracing::info!("gateway stopped");
    }
}
