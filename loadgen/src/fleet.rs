//! The simulated devices of one child process: connect, subscribe, hold, receive, storm.
//!
//! Each device is a tokio task owning a `TcpStream` and a read buffer that is empty while
//! idle. A device is blocked on its socket and on the [`Ticker`] slot of its next
//! PINGREQ, never on a timer of its own; handshake deadlines and reconnect backoffs park
//! on the same ring. The parent steers all devices at once through a `watch` of the
//! [`Phase`] (run, storm drop, stop). Counters are atomics and histograms sit behind
//! mutexes, so the reporter can snapshot them at any time without stopping a device.
//!
//! The devices' fixed settings are in `cfg`, the receiving side's counting in `inbox`,
//! the storm reconnect in `storm`, the TLS handshake (each device's own tickets) in `tls`.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::cli::{expand, Transport};
use crate::codec::{self, Incoming};
use crate::limits::bind_address_no_port;
use crate::proto::{Control, DeviceCount, FinalReport, RoundReport, Snapshot};
use crate::stats::Histogram;
use crate::ticker::Ticker;
use crate::ws::{Link, Wire};

mod cfg;
mod inbox;
mod spare;
mod storm;
mod tls;

pub(crate) use storm::Rng;

pub use cfg::DeviceCfg;
use inbox::{Dedup, Inbox, Tally};

/// Bytes a device reads at a time once its socket is readable (the buffer is released
/// again when it holds no partial packet).
const READ_CHUNK: usize = 16 * 1024;

/// What all devices of this process are told to do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    Run,
    Drop {
        round: u32,
        jitter: bool,
        base_ms: u64,
        max_ms: u64,
        deadline_tick: u64,
        at: Instant,
    },
    Stop,
}

#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    settled: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    live: AtomicU64,
    dropped: AtomicU64,
    pings: AtomicU64,
    pongs: AtomicU64,
    pongs_missing: AtomicU64,
    received: AtomicU64,
    unique: AtomicU64,
    duplicates: AtomicU64,
    foreign: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[derive(Default)]
struct RoundState {
    report: RoundReport,
    /// Devices live when the drop was ordered: the round is over when they are all
    /// back or gave up.
    expected: u64,
    gave_up: u64,
    reported: bool,
}

/// One child's devices (or probes) and everything they count.
pub struct Fleet {
    pub cfg: DeviceCfg,
    pub ticker: Arc<Ticker>,
    c: Counters,
    failures: Mutex<BTreeMap<String, u64>>,
    drops: Mutex<BTreeMap<String, u64>>,
    connect_hist: Mutex<Histogram>,
    subscribe_hist: Mutex<Histogram>,
    message_hist: Mutex<Histogram>,
    pending: Semaphore,
    phase: watch::Sender<Phase>,
    round: Mutex<RoundState>,
    /// Device (or probe) tasks still running.
    tasks: AtomicU64,
    /// When the ramp started, how many it starts, and how long until the last settled.
    ramp_start: std::sync::OnceLock<Instant>,
    ramp_count: AtomicU64,
    ramp_us: AtomicU64,
    /// When the last stamped message arrived (ns since the UNIX epoch).
    last_rx_ns: AtomicU64,
    /// What each subscriber received, recorded when its task ends (`fanout` only).
    per_device: Mutex<Vec<DeviceCount>>,
    /// Each device's TLS sessions and the handshake counts (`tls`).
    tls: tls::TlsDevices,
    /// Devices connected on their first attempt, per target (`--targets`).
    per_node: Vec<AtomicU64>,
}

/// An established device connection.
struct Conn {
    link: Link,
    buf: BytesMut,
}

enum End {
    Stop,
    Drop(Phase),
    Lost(String),
}

fn count(map: &Mutex<BTreeMap<String, u64>>, cause: String) {
    *map.lock().unwrap().entry(cause).or_default() += 1;
}

/// A short, stable name for an IO error at a stage, e.g. `tcp_refused`.
pub fn io_cause(stage: &str, e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    let what = match (e.kind(), e.raw_os_error()) {
        (_, Some(libc::EMFILE | libc::ENFILE)) => "too_many_open_files".to_string(),
        (_, Some(libc::EADDRNOTAVAIL)) => "addr_not_available".to_string(),
        (_, Some(libc::ENOBUFS | libc::ENOMEM)) => "no_buffers".to_string(),
        (K::ConnectionRefused, _) => "refused".to_string(),
        (K::ConnectionReset, _) => "reset".to_string(),
        (K::ConnectionAborted, _) => "aborted".to_string(),
        (K::BrokenPipe, _) => "broken_pipe".to_string(),
        (K::TimedOut, _) => "timeout".to_string(),
        (K::UnexpectedEof, _) => "closed".to_string(),
        (kind, _) => format!("{kind:?}").to_lowercase(),
    };
    format!("{stage}_{what}")
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Fleet {
    pub fn new(cfg: DeviceCfg, max_pending: usize) -> Arc<Fleet> {
        let per_node = cfg.targets.iter().map(|_| AtomicU64::new(0)).collect();
        Arc::new(Fleet {
            cfg,
            ticker: Ticker::start(),
            c: Counters::default(),
            failures: Mutex::default(),
            drops: Mutex::default(),
            connect_hist: Mutex::default(),
            subscribe_hist: Mutex::default(),
            message_hist: Mutex::default(),
            pending: Semaphore::new(max_pending.max(1)),
            phase: watch::channel(Phase::Run).0,
            round: Mutex::default(),
            tasks: AtomicU64::new(0),
            ramp_start: std::sync::OnceLock::new(),
            ramp_count: AtomicU64::new(u64::MAX),
            ramp_us: AtomicU64::new(0),
            last_rx_ns: AtomicU64::new(0),
            per_device: Mutex::default(),
            tls: tls::TlsDevices::default(),
            per_node,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.c;
        Snapshot {
            attempted: get(&c.attempted),
            settled: get(&c.settled),
            connected: get(&c.connected),
            failed: get(&c.failed),
            live: get(&c.live),
            dropped: get(&c.dropped),
            pings: get(&c.pings),
            pongs: get(&c.pongs),
            pongs_missing: get(&c.pongs_missing),
            received: get(&c.received),
            unique: get(&c.unique),
            duplicates: get(&c.duplicates),
            foreign: get(&c.foreign),
            ramp_us: get(&self.ramp_us),
            last_rx_ns: get(&self.last_rx_ns),
            tls_full: get(&self.tls.full),
            tls_resumed: get(&self.tls.resumed),
        }
    }

    /// Counts one initial attempt as settled; the last one fixes the ramp duration.
    fn settle(&self) {
        let n = self.c.settled.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.ramp_count.load(Ordering::Relaxed) {
            if let Some(start) = self.ramp_start.get() {
                let us = start.elapsed().as_micros() as u64;
                self.ramp_us.store(us.max(1), Ordering::Relaxed);
            }
        }
    }

    pub fn final_report(&self) -> FinalReport {
        FinalReport {
            snapshot: self.snapshot(),
            failures: self.failures.lock().unwrap().clone(),
            drops: self.drops.lock().unwrap().clone(),
            connect_hist: self.connect_hist.lock().unwrap().clone(),
            subscribe_hist: self.subscribe_hist.lock().unwrap().clone(),
            message_hist: self.message_hist.lock().unwrap().clone(),
            per_device: self.per_device.lock().unwrap().clone(),
            per_node: self.per_node.iter().map(get).collect(),
        }
    }

    pub fn tasks(&self) -> u64 {
        get(&self.tasks)
    }

    pub fn stopping(&self) -> bool {
        *self.phase.borrow() == Phase::Stop
    }

    pub fn control(&self, c: Control) {
        match c {
            Control::Stop => {
                self.phase.send_replace(Phase::Stop);
            }
            Control::Drop {
                round,
                jitter,
                base_ms,
                max_ms,
                timeout_secs,
            } => {
                {
                    let mut r = self.round.lock().unwrap();
                    *r = RoundState {
                        report: RoundReport {
                            round,
                            ..RoundReport::default()
                        },
                        expected: get(&self.c.live),
                        gave_up: 0,
                        reported: false,
                    };
                }
                self.phase.send_replace(Phase::Drop {
                    round,
                    jitter,
                    base_ms,
                    max_ms,
                    deadline_tick: self.ticker.after(Duration::from_secs(timeout_secs)),
                    at: Instant::now(),
                });
            }
        }
    }

    /// The current round's report once every dropped device is back or gave up (once).
    pub fn finished_round(&self) -> Option<RoundReport> {
        let mut r = self.round.lock().unwrap();
        let done = r.report.round > 0
            && !r.reported
            && r.report.dropped >= r.expected
            && r.report.back + r.gave_up >= r.report.dropped;
        if done {
            r.reported = true;
            Some(r.report.clone())
        } else {
            None
        }
    }

    /// Starts `count` tasks from index `first` at `rate` per second (all at once when
    /// the rate is not positive), stopping early on `Stop`.
    pub async fn ramp<F, Fut>(self: &Arc<Self>, first: u64, count: u64, rate: f64, task: F)
    where
        F: Fn(Arc<Fleet>, u64) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let start = *self.ramp_start.get_or_init(Instant::now);
        self.ramp_count.store(count, Ordering::Relaxed);
        let mut k = 0;
        let mut iv = tokio::time::interval(Duration::from_millis(5));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while k < count && !self.stopping() {
            iv.tick().await;
            let due = if rate > 0.0 && rate.is_finite() {
                ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(count)
            } else {
                count
            };
            while k < due {
                inc(&self.c.attempted);
                inc(&self.tasks);
                let fut = task(self.clone(), first + k);
                let me = self.clone();
                tokio::spawn(async move {
                    fut.await;
                    me.tasks.fetch_sub(1, Ordering::Relaxed);
                });
                k += 1;
            }
        }
    }

    /// Waits for `fut` until tick `deadline`, turning a timeout into `cause`.
    async fn timed<T>(
        &self,
        deadline: u64,
        cause: &str,
        fut: impl Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        tokio::select! {
            r = fut => r,
            _ = self.ticker.until(deadline) => Err(cause.to_string()),
        }
    }

    /// A TCP connection from device `i`'s source address.
    pub async fn tcp_connect(&self, i: u64, deadline: u64) -> Result<TcpStream, String> {
        let target = self.cfg.target(i);
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| io_cause("socket", &e))?;
        if let Some(ip) = self.cfg.sources.for_index(i) {
            bind_address_no_port(&socket);
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| io_cause("bind", &e))?;
        }
        let stream = self
            .timed(deadline, "tcp_timeout", async {
                socket
                    .connect(target)
                    .await
                    .map_err(|e| io_cause("tcp", &e))
            })
            .await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A connection from device `i` to the target over the configured transport (TCP, or
    /// TCP and the WebSocket upgrade).
    pub async fn link_connect(&self, i: u64, deadline: u64) -> Result<Link, String> {
        let stream = self.tcp_connect(i, deadline).await?;
        let wire = match &self.cfg.tls {
            None => Wire::tcp(stream),
            Some(tls) => self.tls_connect(i, tls, stream, deadline).await?,
        };
        match self.cfg.transport {
            Transport::Tcp | Transport::Tls => Ok(Link::plain(wire)),
            Transport::Ws | Transport::Wss => {
                let host = self.cfg.target(i).to_string();
                let seed = i ^ now_ns();
                self.timed(deadline, "ws_timeout", async {
                    Link::upgrade(wire, &host, &self.cfg.ws_path, seed).await
                })
                .await
            }
        }
    }

    /// Reads until one whole packet is there.
    async fn read_packet(&self, conn: &mut Conn, stage: &str) -> Result<Incoming, String> {
        loop {
            if let Some(p) = codec::next(self.cfg.protocol, &mut conn.buf)
                .map_err(|_| format!("{stage}_protocol_error"))?
            {
                return Ok(p);
            }
            match conn.link.read_buf(&mut conn.buf).await {
                Ok(0) => return Err(format!("{stage}_closed")),
                Ok(_) => {}
                Err(e) => return Err(io_cause(stage, &e)),
            }
        }
    }

    /// Writes CONNECT and waits for a successful CONNACK; returns when it came.
    pub async fn mqtt_connect(
        &self,
        link: Link,
        client_id: &str,
        deadline: u64,
    ) -> Result<(Link, BytesMut), String> {
        let cfg = &self.cfg;
        let mut out = BytesMut::new();
        let will = cfg
            .will_topic
            .as_ref()
            .map(|t| t.replace("{id}", client_id));
        let fields = codec::ConnectFields {
            client_id,
            keep_alive: cfg.keepalive,
            clean: cfg.clean,
            login: cfg.login.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
            session_expiry: (!cfg.clean).then_some(u32::MAX),
            will: will.as_deref(),
        };
        codec::connect(cfg.protocol, &fields, &mut out).map_err(|e| format!("encode_{e}"))?;
        let mut conn = Conn {
            link,
            buf: BytesMut::new(),
        };
        conn.link
            .write_all(&out)
            .await
            .map_err(|e| io_cause("connect_write", &e))?;
        let code = self
            .timed(deadline, "connack_timeout", async {
                match self.read_packet(&mut conn, "connack").await? {
                    Incoming::ConnAck { code } => Ok(code),
                    other => Err(format!("connack_unexpected_{}", packet_name(&other))),
                }
            })
            .await?;
        if code != 0 {
            return Err(format!("connack_refused_0x{code:02x}"));
        }
        Ok((conn.link, conn.buf))
    }

    /// Connect, CONNECT/CONNACK and SUBSCRIBE/SUBACK for device `i`, recording latencies.
    async fn establish(&self, i: u64, throttle: bool) -> Result<Conn, String> {
        let _permit = if throttle {
            Some(
                self.pending
                    .acquire()
                    .await
                    .map_err(|_| "closed".to_string())?,
            )
        } else {
            None
        };
        let t0 = Instant::now();
        let deadline = self.ticker.after(self.cfg.connect_timeout);
        let client_id = self.cfg.client_id(i);
        let link = self.link_connect(i, deadline).await?;
        let (link, buf) = self.mqtt_connect(link, &client_id, deadline).await?;
        let t_connack = Instant::now();
        let mut conn = Conn { link, buf };
        if let Some(pattern) = &self.cfg.topic {
            let topic = expand(pattern, i, &client_id);
            let mut out = BytesMut::new();
            codec::subscribe(self.cfg.protocol, 1, &topic, self.cfg.sub_qos, &mut out)
                .map_err(|e| format!("encode_{e}"))?;
            conn.link
                .write_all(&out)
                .await
                .map_err(|e| io_cause("subscribe_write", &e))?;
            let codes = self
                .timed(deadline, "suback_timeout", async {
                    loop {
                        match self.read_packet(&mut conn, "suback").await? {
                            Incoming::SubAck { codes, .. } => return Ok(codes),
                            // A retained message may come before the SUBACK.
                            Incoming::Publish { .. } => {}
                            other => {
                                return Err(format!("suback_unexpected_{}", packet_name(&other)))
                            }
                        }
                    }
                })
                .await?;
            match codes.first() {
                Some(&c) if c < 0x80 => {}
                Some(&c) => return Err(format!("suback_refused_0x{c:02x}")),
                None => return Err("suback_empty".into()),
            }
            let us = t_connack.elapsed().as_micros() as u64;
            self.subscribe_hist.lock().unwrap().record(us);
        }
        let us = (t_connack - t0).as_micros() as u64;
        self.connect_hist.lock().unwrap().record(us);
        // Nothing needed stays in the buffer: give its memory back while idle.
        if conn.buf.is_empty() {
            conn.buf = BytesMut::new();
        }
        Ok(conn)
    }

    /// The life of one device: connect once, then hold, reconnecting only in a storm.
    pub async fn device(self: Arc<Self>, i: u64) {
        let mut phase = self.phase.subscribe();
        let mut inbox = Inbox {
            dedup: if self.cfg.ordered {
                Dedup::Ordered(None)
            } else {
                Dedup::Set(HashSet::new())
            },
            unique: 0,
            duplicates: 0,
        };
        let first = self.establish(i, true).await;
        self.settle();
        let mut conn = match first {
            Ok(c) => {
                inc(&self.c.connected);
                inc(&self.per_node[self.cfg.node_of(i)]);
                c
            }
            Err(cause) => {
                inc(&self.c.failed);
                count(&self.failures, cause);
                return;
            }
        };
        loop {
            inc(&self.c.live);
            let end = self.session(conn, &mut phase, &mut inbox).await;
            self.c.live.fetch_sub(1, Ordering::Relaxed);
            match end {
                End::Stop => break,
                End::Lost(cause) => {
                    inc(&self.c.dropped);
                    count(&self.drops, cause);
                    break;
                }
                End::Drop(p) => match self.reconnect(i, p, &mut phase).await {
                    Some(c) => conn = c,
                    None => break,
                },
            }
        }
        if self.cfg.ordered {
            self.per_device.lock().unwrap().push(DeviceCount {
                index: i,
                unique: inbox.unique,
                duplicates: inbox.duplicates,
            });
        }
    }

    /// Holds an established connection until the phase changes or it is lost; the socket
    /// closes when this returns.
    async fn session(
        &self,
        mut conn: Conn,
        phase: &mut watch::Receiver<Phase>,
        inbox: &mut Inbox,
    ) -> End {
        let period = self.cfg.ping_period(&self.ticker);
        let mut next_ping = period.map(|p| self.ticker.now() + p);
        let mut awaiting_pong = false;
        let mut out = BytesMut::new();
        loop {
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    let p = if changed.is_err() { Phase::Stop } else { *phase.borrow_and_update() };
                    match p {
                        Phase::Run => {}
                        Phase::Stop => {
                            conn.link.close(&codec::DISCONNECT).await;
                            return End::Stop;
                        }
                        Phase::Drop { .. } => {
                            // A network flap: the connection dies with a reset.
                            let _ = conn.link.stream().set_zero_linger();
                            let mut r = self.round.lock().unwrap();
                            r.report.dropped += 1;
                            return End::Drop(p);
                        }
                    }
                }
                ready = conn.link.readable() => {
                    if let Err(e) = ready {
                        return End::Lost(io_cause("read", &e));
                    }
                    // The buffer is taken only once the socket has data (the worker
                    // thread's spare, `spare.rs`), and at least READ_CHUNK at a time: an
                    // idle device holds none, a busy one reads many packets per syscall
                    // (the measuring tool must not be the bottleneck of a fan-out run).
                    // `out`, the PUBACKs of one read, keeps its few bytes of capacity.
                    if conn.buf.capacity() == 0 {
                        conn.buf = spare::lend();
                    }
                    match conn.link.try_read_buf(&mut conn.buf, READ_CHUNK) {
                        Ok(0) => return End::Lost("closed_by_server".into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            spare::give_back(&mut conn.buf);
                            continue;
                        }
                        Err(e) => return End::Lost(io_cause("read", &e)),
                    }
                    // One clock reading and one counter/histogram update per read.
                    let mut tally = Tally::new(now_ns());
                    loop {
                        match codec::next(self.cfg.protocol, &mut conn.buf) {
                            Ok(None) => break,
                            Ok(Some(Incoming::PingResp)) => {
                                inc(&self.c.pongs);
                                awaiting_pong = false;
                            }
                            Ok(Some(Incoming::Publish { qos, pkid, stamp })) => {
                                tally.message(stamp, inbox);
                                match qos {
                                    1 => out.extend_from_slice(&codec::puback(pkid)),
                                    2 => out.extend_from_slice(&codec::pubrec(pkid)),
                                    _ => {}
                                }
                            }
                            Ok(Some(Incoming::PubRel { pkid })) => {
                                out.extend_from_slice(&codec::pubcomp(pkid));
                            }
                            Ok(Some(Incoming::Disconnect { reason })) => {
                                self.add_tally(&mut tally);
                                return End::Lost(format!("disconnect_0x{reason:02x}"));
                            }
                            Ok(Some(_)) => {}
                            Err(_) => return End::Lost("protocol_error".into()),
                        }
                    }
                    self.add_tally(&mut tally);
                    if !out.is_empty() {
                        if let Err(e) = conn.link.write_all(&out).await {
                            return End::Lost(io_cause("write", &e));
                        }
                        out.clear();
                    }
                    if conn.link.has_replies() {
                        if let Err(e) = conn.link.flush_replies().await {
                            return End::Lost(io_cause("write", &e));
                        }
                    }
                    spare::give_back(&mut conn.buf);
                }
                _ = self.ticker.until(next_ping.unwrap_or(u64::MAX)), if next_ping.is_some() => {
                    if awaiting_pong {
                        inc(&self.c.pongs_missing);
                    }
                    if let Err(e) = conn.link.write_all(&codec::PINGREQ).await {
                        return End::Lost(io_cause("ping", &e));
                    }
                    inc(&self.c.pings);
                    awaiting_pong = true;
                    next_ping = period.map(|p| self.ticker.now() + p);
                }
            }
        }
    }

    /// Adds what one read brought to the fleet's counters and latency histogram.
    fn add_tally(&self, t: &mut Tally) {
        if t.received == 0 {
            return;
        }
        self.c.received.fetch_add(t.received, Ordering::Relaxed);
        self.c.unique.fetch_add(t.unique, Ordering::Relaxed);
        self.c.duplicates.fetch_add(t.duplicates, Ordering::Relaxed);
        self.c.foreign.fetch_add(t.foreign, Ordering::Relaxed);
        if t.unique > 0 {
            self.last_rx_ns.fetch_max(t.now_ns, Ordering::Relaxed);
        }
        let mut h = self.message_hist.lock().unwrap();
        for &us in &t.latencies_us {
            h.record(us);
        }
        drop(h);
        *t = Tally::new(t.now_ns);
    }

    /// Churn: one load-balancer-style probe. `mqtt` sends CONNECT (and with
    /// `wait_connack` reads the answer) before closing with a reset; otherwise the probe
    /// is a bare TCP connect closed with FIN.
    pub async fn probe(self: Arc<Self>, i: u64, mqtt: bool, wait_connack: bool) {
        let result = async {
            let _permit = self
                .pending
                .acquire()
                .await
                .map_err(|_| "closed".to_string())?;
            let t0 = Instant::now();
            let deadline = self.ticker.after(self.cfg.connect_timeout);
            let mut link = self.link_connect(i, deadline).await?;
            if mqtt {
                let client_id = self.cfg.client_id(i);
                if wait_connack {
                    link = self.mqtt_connect(link, &client_id, deadline).await?.0;
                } else {
                    let mut out = BytesMut::new();
                    let fields = codec::ConnectFields {
                        client_id: &client_id,
                        keep_alive: self.cfg.keepalive,
                        clean: true,
                        login: None,
                        session_expiry: None,
                        will: None,
                    };
                    codec::connect(self.cfg.protocol, &fields, &mut out)
                        .map_err(|e| format!("encode_{e}"))?;
                    link.write_all(&out)
                        .await
                        .map_err(|e| io_cause("connect_write", &e))?;
                }
                let _ = link.stream().set_zero_linger();
            }
            let us = t0.elapsed().as_micros() as u64;
            self.connect_hist.lock().unwrap().record(us);
            drop(link);
            Ok::<(), String>(())
        }
        .await;
        self.settle();
        match result {
            Ok(()) => inc(&self.c.connected),
            Err(cause) => {
                inc(&self.c.failed);
                count(&self.failures, cause);
            }
        }
    }
}

fn packet_name(p: &Incoming) -> &'static str {
    match p {
        Incoming::ConnAck { .. } => "connack",
        Incoming::SubAck { .. } => "suback",
        Incoming::Publish { .. } => "publish",
        Incoming::PubAck { .. } => "puback",
        Incoming::PubRec { .. } => "pubrec",
        Incoming::PubRel { .. } => "pubrel",
        Incoming::PubComp { .. } => "pubcomp",
        Incoming::PingResp => "pingresp",
        Incoming::Disconnect { .. } => "disconnect",
        Incoming::Other(_) => "other",
    }
}

#[cfg(test)]
mod tests;
