//! The rig of the scripted timer tests (`timers.rs`): one real shard on a manual clock,
//! loopback clients the test drives by hand, and `settle` (loop turns and client reads
//! until nothing moves, as in the seeded simulation) after every step. A test moves the
//! clock, lets the shard turn, and asserts what its timers did: who was closed, with
//! which reason and MQTT 5 reason code, which will was published, which session ended,
//! and at what time on the clock. Nothing waits on wall time, so the results do not
//! depend on the machine's speed.
//!
//! Also [`manual_shard`], the shard on a manual clock that the simulation's world uses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::mailbox::{Mailboxes, ShardMsg};
use crate::metrics::{DisconnectReason, ShardMetrics};

use super::super::clock::Clock;
use super::super::{Shard, ShardContext};
use super::client::{Client, ConnectSpec};

/// Loop turns `settle` may take before the rig calls the shard stuck.
const MAX_SETTLE_TURNS: usize = 10_000;

/// A real shard (id 0 of 1) on a manual clock, listening on a free loopback port, with
/// no TLS, WebSocket, store or restored state; `business` runs its blocking work.
pub(super) fn manual_shard(
    config: Config,
    business: tokio::runtime::Handle,
) -> (Shard, mpsc::Receiver<ShardMsg>, SocketAddr) {
    let (shard, rx, addr, _) = manual_shard_tls(config, business, None);
    (shard, rx, addr)
}

/// [`manual_shard`], and with `tls` also a TLS listener on a free loopback port serving
/// that rustls configuration (its address last).
pub(super) fn manual_shard_tls(
    config: Config,
    business: tokio::runtime::Handle,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (
    Shard,
    mpsc::Receiver<ShardMsg>,
    SocketAddr,
    Option<SocketAddr>,
) {
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let tls = tls.map(|cfg| {
        (
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind tls"),
            cfg,
        )
    });
    let tls_addr = tls
        .as_ref()
        .map(|(l, _)| l.local_addr().expect("tls address"));
    let (mailboxes, mut rxs) = Mailboxes::new(1, 64);
    // Few buckets: the simulation checks the counts (`check::interest`), not the spread.
    let mailboxes = mailboxes.with_interest(1024);
    let auth = crate::auth::Authenticator::from_config(&config.auth, 1).expect("auth");
    let ctx = ShardContext {
        id: 0,
        clock_start: crate::shard::ClockStart::now(),
        config: config.clone(),
        listener,
        tls,
        ws: None,
        wss: None,
        per_ip: Arc::new(crate::limits::PerIpLimit::new(0)),
        mailbox: rxs.remove(0),
        mailboxes,
        metrics: Arc::new(ShardMetrics::default()),
        open_connections: Arc::new(AtomicUsize::new(0)),
        shards_running: Arc::new(AtomicUsize::new(1)),
        handshakers: None,
        auth: Arc::new(auth),
        business,
        store: None,
        restore: Vec::new(),
        restored_after_crash: false,
        sessions: None,
        retained: Arc::new(Vec::new()),
        ready: std::sync::mpsc::channel().0,
        events: crate::events::EventSender::disabled(),
        fleet_route: None,
    };
    let (shard, rx) = Shard::with_clock(ctx, Clock::manual).expect("shard");
    (shard, rx, addr, tls_addr)
}

/// What a client got from the server, decoded by `mqttbytes` (MQTT 3.1.1 or 5).
#[derive(Debug)]
pub(super) enum Got {
    ConnAck {
        present: bool,
        code: u8,
        /// MQTT 5 Server Keep Alive.
        keep_alive: Option<u16>,
    },
    Publish {
        qos: u8,
        pkid: u16,
        payload: Vec<u8>,
        /// MQTT 5 Message Expiry Interval.
        expiry: Option<u32>,
    },
    /// DISCONNECT with its reason code (MQTT 5).
    Disconnect(u8),
    /// Anything else, by name (PINGRESP, SUBACK, PUBACK ...).
    Other(String),
}

/// One client of the rig.
struct Peer {
    /// `None` once the test hung it up.
    client: Option<Client>,
    v5: bool,
    input: BytesMut,
    got: Vec<Got>,
    /// False: the client does not read its socket (a stalled subscriber).
    reading: bool,
    /// Bytes queued by `queue`, written as the socket takes them.
    out: Vec<u8>,
}

pub(super) struct Rig {
    pub shard: Shard,
    rx: mpsc::Receiver<ShardMsg>,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    peers: Vec<Peer>,
    /// The manual clock, ms since the shard started.
    pub now: u64,
}

impl Rig {
    /// A shard with `toml` over the compiled-in defaults, no ACL and no store.
    pub(super) fn new(toml: &str) -> Rig {
        let mut config = Config::from_toml_str(toml).expect("test config");
        config.acl.enabled = false;
        config.store.enabled = false;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (shard, rx, addr) = manual_shard(config, rt.handle().clone());
        let mut rig = Rig {
            shard,
            rx,
            addr,
            rt,
            peers: Vec::new(),
            now: 0,
        };
        rig.settle();
        rig
    }

    /// The shard's tick, ms.
    pub(super) fn tick_ms(&self) -> u64 {
        self.shard.clock.tick.as_millis() as u64
    }

    /// Opens a connection that sends nothing yet; its index.
    pub(super) fn open(&mut self, v5: bool) -> usize {
        self.peers.push(Peer {
            client: Some(Client::connect(self.addr, v5)),
            v5,
            input: BytesMut::new(),
            got: Vec::new(),
            reading: true,
            out: Vec::new(),
        });
        self.settle();
        self.peers.len() - 1
    }

    /// Connects many clients at once (in rounds the listen backlog holds), each with
    /// the CONNECT `spec` makes of its number; their indexes. The CONNACKs are in `take`.
    pub(super) fn connect_many(
        &mut self,
        n: usize,
        spec: impl Fn(usize) -> (String, u16),
    ) -> std::ops::Range<usize> {
        let first = self.peers.len();
        for round in (0..n).collect::<Vec<_>>().chunks(64) {
            for &k in round {
                let (id, keep_alive) = spec(k);
                let mut client = Client::connect(self.addr, false);
                client.send_connect(&ConnectSpec {
                    client_id: &id,
                    v5: false,
                    clean: true,
                    keep_alive,
                    expiry: 0,
                    receive_max: 0,
                    will: None,
                });
                self.peers.push(Peer {
                    client: Some(client),
                    v5: false,
                    input: BytesMut::new(),
                    got: Vec::new(),
                    reading: true,
                    out: Vec::new(),
                });
            }
            self.settle();
        }
        first..self.peers.len()
    }

    /// Opens a connection and sends CONNECT; its index. The CONNACK is in `take`.
    pub(super) fn connect(&mut self, spec: &ConnectSpec) -> usize {
        let i = self.open(spec.v5);
        self.client(i).send_connect(spec);
        self.settle();
        i
    }

    /// Like [`Rig::connect`], and checks the CONNACK accepted it; (index, session
    /// present, Server Keep Alive). What came after the CONNACK is left for `take`.
    pub(super) fn connected(&mut self, spec: &ConnectSpec) -> (usize, bool, Option<u16>) {
        let i = self.connect(spec);
        let got = &mut self.peers[i].got;
        match got.first() {
            Some(&Got::ConnAck {
                present,
                code: 0,
                keep_alive,
            }) => {
                got.remove(0);
                (i, present, keep_alive)
            }
            _ => panic!(
                "{}: expected an accepting CONNACK, got {got:?}",
                spec.client_id
            ),
        }
    }

    /// Client `i`, to send with (then `settle`).
    pub(super) fn client(&mut self, i: usize) -> &mut Client {
        self.peers[i].client.as_mut().expect("a client not hung up")
    }

    /// Client `i` closes its socket without DISCONNECT (an abnormal close), then settles.
    pub(super) fn hang_up(&mut self, i: usize) {
        self.peers[i].client = None;
        self.settle();
    }

    /// Queues `bytes` for client `i` to write as its socket takes them (while the shard
    /// does not read it, more than the kernel holds).
    pub(super) fn queue(&mut self, i: usize, bytes: &[u8]) {
        self.peers[i].out.extend_from_slice(bytes);
    }

    /// Client `i` stops (false) or resumes (true) reading its socket.
    pub(super) fn set_reading(&mut self, i: usize, reading: bool) {
        self.peers[i].reading = reading;
    }

    /// What client `i` got since the last `take`.
    pub(super) fn take(&mut self, i: usize) -> Vec<Got> {
        std::mem::take(&mut self.peers[i].got)
    }

    /// The server closed client `i`'s connection (as far as the client has read).
    pub(super) fn closed(&self, i: usize) -> bool {
        self.peers[i].client.as_ref().is_none_or(|c| c.closed)
    }

    /// Moves the clock on by `ms`, then settles.
    pub(super) fn advance(&mut self, ms: u64) {
        self.move_clock(ms);
        self.settle();
    }

    /// Moves the clock on by `ms`, without turning the shard.
    pub(super) fn move_clock(&mut self, ms: u64) {
        self.now += ms;
        self.shard.clock.advance(Duration::from_millis(ms));
    }

    /// Moves the clock on in steps of `step` ms until `done` holds, at most `limit` ms;
    /// how many ms it took (`None` if it never held).
    pub(super) fn until(
        &mut self,
        step: u64,
        limit: u64,
        mut done: impl FnMut(&mut Rig) -> bool,
    ) -> Option<u64> {
        let start = self.now;
        while self.now - start < limit {
            self.advance(step);
            if done(self) {
                return Some(self.now - start);
            }
        }
        None
    }

    /// Connections closed for `reason` so far.
    pub(super) fn disconnects(&self, reason: DisconnectReason) -> u64 {
        self.shard.services.metrics.disconnects[reason as usize].load(Ordering::Relaxed)
    }

    /// The shard holds a session for `client_id`.
    pub(super) fn has_session(&self, client_id: &str) -> bool {
        self.shard.sessions.find(client_id).is_some()
    }

    /// Connections on the shard, in their close grace or not.
    pub(super) fn connections(&self) -> usize {
        self.shard.wire.conns.len()
    }

    /// Loop turns and client reads until two quiet rounds in a row (see the simulation's
    /// `World::settle`: loopback delivers within the syscall, so quiet means done).
    pub(super) fn settle(&mut self) {
        let mut quiet = 0;
        for _ in 0..MAX_SETTLE_TURNS {
            let busy = self.turn();
            if busy | self.pump() {
                quiet = 0;
            } else {
                quiet += 1;
                if quiet == 2 {
                    return;
                }
            }
        }
        panic!("not settled after {MAX_SETTLE_TURNS} turns");
    }

    /// One loop turn of the shard; true if it was busy.
    pub(super) fn turn(&mut self) -> bool {
        let _in_rt = self.rt.enter();
        self.shard.turn(&mut self.rx).expect("turn").busy
    }

    /// Writes what clients have queued and reads every client that reads; true if
    /// anything moved.
    pub(super) fn pump(&mut self) -> bool {
        let mut moved = false;
        for p in self.peers.iter_mut().filter(|p| !p.out.is_empty()) {
            if let Some(client) = p.client.as_mut() {
                let n = client.write_some(&p.out);
                p.out.drain(..n);
                moved |= n > 0;
            }
        }
        for p in self.peers.iter_mut().filter(|p| p.reading) {
            let Some(client) = p.client.as_mut() else {
                continue;
            };
            moved |= client.fill();
            p.input.extend_from_slice(&client.take_input());
            while let Some(got) = decode(&mut p.input, p.v5) {
                p.got.push(got);
            }
        }
        moved
    }
}

/// One whole packet off the front of `input`, if there is one.
fn decode(input: &mut BytesMut, v5: bool) -> Option<Got> {
    use mqttbytes::Error::InsufficientBytes;
    if v5 {
        match mqttbytes::v5::read(input, usize::MAX) {
            Ok(p) => Some(Got::from_v5(p)),
            Err(InsufficientBytes(_)) => None,
            Err(e) => panic!("undecodable MQTT 5 packet from the server: {e:?}"),
        }
    } else {
        match mqttbytes::v4::read(input, usize::MAX) {
            Ok(p) => Some(Got::from_v4(p)),
            Err(InsufficientBytes(_)) => None,
            Err(e) => panic!("undecodable MQTT 3.1.1 packet from the server: {e:?}"),
        }
    }
}

impl Got {
    fn from_v5(p: mqttbytes::v5::Packet) -> Got {
        use mqttbytes::v5::Packet as P;
        match p {
            P::ConnAck(a) => Got::ConnAck {
                present: a.session_present,
                code: a.code as u8,
                keep_alive: a.properties.and_then(|p| p.server_keep_alive),
            },
            P::Publish(p) => Got::Publish {
                qos: p.qos as u8,
                pkid: p.pkid,
                payload: p.payload.to_vec(),
                expiry: p.properties.and_then(|p| p.message_expiry_interval),
            },
            P::Disconnect(d) => Got::Disconnect(d.reason_code as u8),
            other => Got::Other(format!("{other:?}")),
        }
    }

    fn from_v4(p: mqttbytes::v4::Packet) -> Got {
        use mqttbytes::v4::Packet as P;
        match p {
            P::ConnAck(a) => Got::ConnAck {
                present: a.session_present,
                code: a.code as u8,
                keep_alive: None,
            },
            P::Publish(p) => Got::Publish {
                qos: p.qos as u8,
                pkid: p.pkid,
                payload: p.payload.to_vec(),
                expiry: None,
            },
            P::Disconnect => Got::Disconnect(0),
            other => Got::Other(format!("{other:?}")),
        }
    }
}
