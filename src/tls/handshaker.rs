//! TLS handshakes off the IO shards (`[limits] tls_handshake_threads`, one per shard by
//! default; shard i's go to thread i mod threads).
//!
//! A full handshake is the most CPU a connection ever costs (key exchange, and a
//! signature with the certificate's key). After a network flap thousands arrive at once;
//! run on a shard, they delay every established connection of that shard, however the
//! work is sliced per loop turn, because the shard thread's time is the established
//! connections' time. So a shard that accepts a TLS connection hands the socket and its
//! fresh rustls session to a handshake thread, which runs at a lower scheduling priority
//! (`tls_handshake_nice`): when the cores are busy, the shards run first and the storm
//! waits; when they are idle, the storm gets them all.
//!
//! A handshake thread has its own `mio::Poll`, a slab of the connections it is shaking
//! hands with and their connect deadlines, oldest first (every one has the same timeout,
//! so the queue is in deadline order). Once rustls finishes, the connection goes back to
//! the shard that accepted it (`ShardMsg::Handshaken`), which reads the CONNECT as usual;
//! the ciphertext read past the handshake travels with it. A handshake that fails, times
//! out, or whose shard's mailbox is full is closed here, with the per-IP and connection
//! counts released as the shard would. The thread counts what it sees in a
//! `ShardMetrics` of its own (a shard's counters have one writer, the shard), which the
//! exposition adds to the totals.
//!
//! Each shard's handshakes handed out and not yet back (`ShardMetrics::tls_handshaking`,
//! the one gauge two threads write, with atomic adds) count against its
//! `max_handshaking`, so its admission limits hold as before.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::limits::PerIpLimit;
use crate::mailbox::{Mailboxes, ShardMsg};
use crate::metrics::{DisconnectReason, RefuseReason, ShardMetrics};
use crate::shard::Link;
use crate::tls::record::Cursor;
use crate::tls::traffic_secret::{take_logged, LoggedSecrets};

const WAKER: Token = Token(usize::MAX);
/// Socket events handled per poll.
const EVENTS: usize = 256;
/// Reads of one connection per readiness event before others are served.
const READS_PER_EVENT: usize = 4;
/// One read's size: a ClientHello, a client certificate chain and its Finished fit.
const SCRATCH: usize = 16 * 1024;
/// How soon a hand-back that found its shard's mailbox full is tried again.
const RETRY_HAND_BACK: Duration = Duration::from_millis(2);
/// Handshakes' worth of capacity kept between storms.
const KEEP_CAPACITY: usize = 1024;

/// A connection a shard accepted, for a handshake thread.
pub struct Arrival {
    pub socket: TcpStream,
    /// The client's address (the PROXY header's, behind a proxy); counted per IP.
    pub peer: SocketAddr,
    pub link: Link,
    pub tls: Box<rustls::ServerConnection>,
    pub accepted_at: Instant,
    /// The shard that accepted it, and gets it back.
    pub shard: usize,
    /// Ciphertext already read (what followed a PROXY header).
    pub early: Vec<u8>,
}

/// A connection whose TLS handshake finished, back to the shard that accepted it.
pub struct Handshaken {
    pub socket: TcpStream,
    pub peer: SocketAddr,
    pub link: Link,
    pub tls: Box<rustls::ServerConnection>,
    /// Where in its record the ciphertext given to rustls ends.
    pub tls_cursor: Cursor,
    /// Its TLS 1.3 traffic secrets, from rustls' key log.
    pub tls_secrets: Option<Box<LoggedSecrets>>,
    pub accepted_at: Instant,
    /// Ciphertext read after the handshake that rustls did not take.
    pub rest: Vec<u8>,
}

/// What the handshake threads share with the rest of the gateway.
pub struct Shared {
    pub mailboxes: Mailboxes,
    /// The shards' metrics, by shard id: only their `tls_handshaking` gauge is written here.
    pub shards: Vec<Arc<ShardMetrics>>,
    pub per_ip: Arc<PerIpLimit>,
    pub open_connections: Arc<std::sync::atomic::AtomicUsize>,
    pub connect_timeout: Duration,
}

impl Shared {
    /// A connection of `shard`'s that a handshake thread held is gone: its handshake in
    /// progress, its per-IP count and its place among the open connections.
    fn forget(&self, shard: usize, peer: SocketAddr) {
        self.shards[shard]
            .tls_handshaking
            .fetch_sub(1, Ordering::Relaxed);
        self.per_ip.release(peer.ip());
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One thread's inbox: arrivals (`None` once the thread takes no more), and whether to
/// stop.
struct Inbox {
    arrivals: Mutex<Option<Vec<Arrival>>>,
    waker: Waker,
    stop: AtomicBool,
}

/// The handle shards submit connections through; cloned into every shard.
#[derive(Clone)]
pub struct Handshakers {
    inboxes: Arc<[Arc<Inbox>]>,
}

/// The running threads, joined at shutdown.
pub struct HandshakeThreads {
    handle: Handshakers,
    threads: Vec<JoinHandle<()>>,
    /// Each thread's counts, for the exposition's totals.
    pub metrics: Vec<Arc<ShardMetrics>>,
}

/// Starts `threads` handshake threads at scheduling priority `nice`.
pub fn start(threads: usize, nice: i32, shared: Shared) -> io::Result<HandshakeThreads> {
    let shared = Arc::new(shared);
    let mut inboxes = Vec::with_capacity(threads);
    let mut handles = Vec::with_capacity(threads);
    let mut metrics = Vec::with_capacity(threads);
    // Each thread says when it runs at its priority: the gateway announces itself after.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for i in 0..threads {
        let poll = Poll::new()?;
        let inbox = Arc::new(Inbox {
            arrivals: Mutex::new(Some(Vec::new())),
            waker: Waker::new(poll.registry(), WAKER)?,
            stop: AtomicBool::new(false),
        });
        metrics.push(Arc::new(ShardMetrics::default()));
        let worker = Worker::new(poll, inbox.clone(), shared.clone(), metrics[i].clone());
        let closer = CloseOnExit(inbox.clone(), shared.clone());
        let ready = ready_tx.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("tls-handshake-{i}"))
                .spawn(move || {
                    let _closer = closer;
                    lower_priority(nice);
                    let _ = ready.send(());
                    worker.run();
                })?,
        );
        inboxes.push(inbox);
    }
    drop(ready_tx);
    let _ = ready_rx.iter().take(threads).count();
    Ok(HandshakeThreads {
        handle: Handshakers {
            inboxes: inboxes.into(),
        },
        threads: handles,
        metrics,
    })
}

/// However a handshake thread ends (a panic included), its inbox takes no more: the
/// shards close what they would submit (and release its counts) instead of leaving it
/// unread; what was waiting in it is released here.
struct CloseOnExit(Arc<Inbox>, Arc<Shared>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        let left = self
            .0
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        for a in left.unwrap_or_default() {
            self.1.forget(a.shard, a.peer);
        }
    }
}

/// Sets the calling thread's nice value (Linux: per thread). Raising it needs no
/// privilege; a failure is logged and the thread runs at normal priority.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority on the calling thread's own id; no memory is passed.
    let rc = unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::gettid() as libc::id_t,
            nice as libc::c_int,
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        tracing::warn!(nice, %error, "cannot lower the TLS handshake thread's priority");
    }
}

impl Handshakers {
    /// Hands `a` to the handshake thread of its shard; gives it back when that thread
    /// takes no more (it stopped: the gateway is shutting down).
    pub fn submit(&self, a: Arrival) -> Result<(), Box<Arrival>> {
        let inbox = &self.inboxes[a.shard % self.inboxes.len()];
        match inbox
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(arrivals) => arrivals.push(a),
            None => return Err(Box::new(a)),
        }
        if let Err(error) = inbox.waker.wake() {
            tracing::error!(%error, "cannot wake a TLS handshake thread");
        }
        Ok(())
    }
}

impl HandshakeThreads {
    pub fn handle(&self) -> Handshakers {
        self.handle.clone()
    }

    /// Closes every handshake under way and joins the threads.
    pub fn stop(self) {
        for inbox in self.handle.inboxes.iter() {
            inbox.stop.store(true, Ordering::Release);
            let _ = inbox.waker.wake();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A connection in its handshake on this thread.
struct Pending {
    socket: TcpStream,
    peer: SocketAddr,
    link: Link,
    tls: Box<rustls::ServerConnection>,
    cursor: Cursor,
    /// The TLS 1.3 traffic secrets, once its key log gave them.
    secrets: Option<Box<LoggedSecrets>>,
    accepted_at: Instant,
    shard: usize,
    /// Tells this connection's deadline entry from one of an earlier occupant of its key.
    serial: u64,
}

/// How feeding ciphertext to a handshake ended.
enum Fed {
    /// Still in the handshake.
    More,
    /// Finished; the connection went back to its shard.
    Done,
    /// Closed.
    Gone,
}

struct Worker {
    poll: Poll,
    inbox: Arc<Inbox>,
    shared: Arc<Shared>,
    /// This thread's counts.
    metrics: Arc<ShardMetrics>,
    conns: Slab<Pending>,
    /// (key, serial, deadline), in deadline order.
    deadlines: VecDeque<(usize, u64, Instant)>,
    serial: u64,
    scratch: Vec<u8>,
    /// Connections read [`READS_PER_EVENT`] times with more waiting: read again next.
    reread: Vec<usize>,
    /// Finished handshakes whose shard's mailbox was full, oldest first, with their
    /// connect deadline: still counted in the shard's `tls_handshaking` until delivered.
    undelivered: VecDeque<(Instant, Box<Handshaken>, usize)>,
}

impl Worker {
    fn new(poll: Poll, inbox: Arc<Inbox>, shared: Arc<Shared>, metrics: Arc<ShardMetrics>) -> Self {
        Worker {
            poll,
            inbox,
            shared,
            metrics,
            conns: Slab::new(),
            deadlines: VecDeque::new(),
            serial: 0,
            scratch: vec![0; SCRATCH],
            reread: Vec::new(),
            undelivered: VecDeque::new(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "TLS handshake thread cannot poll; it stops");
                    return self.close_all();
                }
            }
            if self.inbox.stop.load(Ordering::Acquire) {
                return self.close_all();
            }
            for event in events.iter() {
                if event.token() != WAKER {
                    self.drive(event.token().0);
                }
            }
            for key in std::mem::take(&mut self.reread) {
                self.drive(key);
            }
            for a in self.take_arrivals(false) {
                self.admit(a);
            }
            self.expire(Instant::now());
            self.retry_undelivered(Instant::now());
            self.shrink_after_a_storm();
        }
    }

    /// Until the next connect deadline; at once with connections to read again; soon
    /// with hand-backs waiting for room.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.reread.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadline = self
            .deadlines
            .front()
            .map(|d| d.2.saturating_duration_since(now));
        match self.undelivered.is_empty() {
            true => deadline,
            false => Some(deadline.map_or(RETRY_HAND_BACK, |d| d.min(RETRY_HAND_BACK))),
        }
    }

    /// The connections the shards submitted since the last look; with `close`, the
    /// inbox takes no more (a later `submit` gets its arrival back).
    fn take_arrivals(&self, close: bool) -> Vec<Arrival> {
        let mut arrivals = self
            .inbox
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match close {
            true => arrivals.take().unwrap_or_default(),
            false => arrivals.as_mut().map(std::mem::take).unwrap_or_default(),
        }
    }

    /// Once a storm is over, gives back what its peak took (the slab and the deadline
    /// queue keep their capacity otherwise).
    fn shrink_after_a_storm(&mut self) {
        if self.conns.is_empty() && self.conns.capacity() > KEEP_CAPACITY {
            self.conns = Slab::new();
        }
        if self.deadlines.capacity() > KEEP_CAPACITY && self.deadlines.len() < KEEP_CAPACITY / 4 {
            self.deadlines.shrink_to(KEEP_CAPACITY / 2);
        }
    }

    /// Takes a connection on: registered (epoll reports bytes already waiting), its
    /// deadline queued, and any early ciphertext fed.
    fn admit(&mut self, mut a: Arrival) {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut a.socket,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(peer = %a.peer, error = %e, "cannot register a TLS handshake");
            return self.release(
                a.shard,
                a.peer,
                a.accepted_at,
                DisconnectReason::SocketError,
            );
        }
        self.serial += 1;
        let deadline = a.accepted_at + self.shared.connect_timeout;
        self.deadlines.push_back((key, self.serial, deadline));
        entry.insert(Pending {
            socket: a.socket,
            peer: a.peer,
            link: a.link,
            tls: a.tls,
            cursor: Cursor::default(),
            secrets: None,
            accepted_at: a.accepted_at,
            shard: a.shard,
            serial: self.serial,
        });
        if !a.early.is_empty() {
            self.feed(key, &a.early);
        }
    }

    /// A readiness event: read what arrived into rustls, write what it answers.
    fn drive(&mut self, key: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        for read in 1..=READS_PER_EVENT {
            let Some(p) = self.conns.get_mut(key) else {
                break;
            };
            match p.socket.read(&mut scratch) {
                Ok(0) => {
                    self.close(key, DisconnectReason::CloseWait);
                    break;
                }
                Ok(n) => match self.feed(key, &scratch[..n]) {
                    // More may wait (edge-triggered: no new event says so).
                    Fed::More if n == scratch.len() && read == READS_PER_EVENT => {
                        self.reread.push(key)
                    }
                    Fed::More if n == scratch.len() => continue,
                    _ => break,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.flush(key);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key, DisconnectReason::SocketError);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Gives `data` to connection `key`'s rustls session, a record at a time as rustls
    /// takes it; hands the connection back once the handshake is done.
    fn feed(&mut self, key: usize, data: &[u8]) -> Fed {
        let mut at = 0;
        while at < data.len() {
            let p = &mut self.conns[key];
            let taken = match p.tls.read_tls(&mut &data[at..]) {
                Ok(0) => return self.fail(key, "closed during the handshake"),
                Ok(n) => n,
                Err(e) => return self.fail(key, &e.to_string()),
            };
            p.cursor.advance(&data[at..at + taken]);
            at += taken;
            let processed = p.tls.process_new_packets().map(drop);
            if let Some(logged) = take_logged() {
                p.secrets = Some(logged);
            }
            let outcome = crate::tls::handshake_outcome(true, &p.tls, processed.is_err());
            if let Some(kind) = outcome {
                self.metrics.tls_handshake(kind);
            }
            if let Err(e) = processed {
                // rustls has queued an alert for the peer; one best-effort write of it.
                let _ = p.tls.write_tls(&mut p.socket);
                return self.fail(key, &e.to_string());
            }
            if !p.tls.is_handshaking() {
                self.flush(key);
                return self.hand_back(key, data[at..].to_vec());
            }
        }
        self.flush(key);
        Fed::More
    }

    /// Writes what rustls has for the peer, as far as the socket takes it (the rest on
    /// the next writable event).
    fn flush(&mut self, key: usize) {
        let Some(p) = self.conns.get_mut(key) else {
            return;
        };
        while p.tls.wants_write() {
            match p.tls.write_tls(&mut p.socket) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key, DisconnectReason::SocketError);
                    return;
                }
            }
        }
        let _ = p.socket.flush();
    }

    /// The handshake is done: the connection goes back to the shard that accepted it.
    fn hand_back(&mut self, key: usize, rest: Vec<u8>) -> Fed {
        let Some(mut p) = self.conns.try_remove(key) else {
            return Fed::Gone;
        };
        let _ = self.poll.registry().deregister(&mut p.socket);
        let deadline = p.accepted_at + self.shared.connect_timeout;
        let done = Handshaken {
            socket: p.socket,
            peer: p.peer,
            link: p.link,
            tls: p.tls,
            tls_cursor: p.cursor,
            tls_secrets: p.secrets,
            accepted_at: p.accepted_at,
            rest,
        };
        if let Err(h) = self.deliver(p.shard, Box::new(done)) {
            // The shard's mailbox is full: tried again shortly, until the deadline.
            self.undelivered.push_back((deadline, h, p.shard));
        }
        Fed::Done
    }

    /// Sends a finished handshake to its shard; gives it back when the mailbox is full
    /// (or closed: the shard stopped).
    ///
    /// The shard's gauge drops before the send, so that once the shard has the
    /// connection it is no longer counted here (this thread, at a low priority, may be
    /// preempted right after the send); a failed send counts it again.
    fn deliver(&mut self, shard: usize, h: Box<Handshaken>) -> Result<(), Box<Handshaken>> {
        let in_progress = &self.shared.shards[shard].tls_handshaking;
        in_progress.fetch_sub(1, Ordering::Relaxed);
        match self
            .shared
            .mailboxes
            .try_send(shard, ShardMsg::Handshaken(h))
        {
            Ok(()) => Ok(()),
            Err(ShardMsg::Handshaken(h)) => {
                in_progress.fetch_add(1, Ordering::Relaxed);
                Err(h)
            }
            Err(_) => unreachable!("try_send gives back what it was given"),
        }
    }

    /// Tries the waiting hand-backs again, oldest first; one whose connect deadline
    /// passed is closed ("server busy": its shard was too loaded to take it in time).
    fn retry_undelivered(&mut self, now: Instant) {
        for _ in 0..self.undelivered.len() {
            let Some((deadline, h, shard)) = self.undelivered.pop_front() else {
                break;
            };
            let Err(h) = self.deliver(shard, h) else {
                continue;
            };
            if now < deadline {
                self.undelivered.push_back((deadline, h, shard));
                continue;
            }
            self.metrics.refuse(RefuseReason::Busy);
            tracing::warn!(shard, peer = %h.peer, "shard mailbox full until the connect timeout after a TLS handshake, connection closed");
            self.release(shard, h.peer, h.accepted_at, DisconnectReason::Refused);
        }
    }

    /// The handshake failed: counted, logged once, closed.
    fn fail(&mut self, key: usize, error: &str) -> Fed {
        let p = &self.conns[key];
        ShardMetrics::add(&self.metrics.tls_failures, 1);
        tracing::info!(shard = p.shard, peer = %p.peer, %error, "TLS failed, closing");
        self.close(key, DisconnectReason::ProtocolError);
        Fed::Gone
    }

    /// Closes the connection `key` (the socket is dropped) and releases its counts.
    fn close(&mut self, key: usize, reason: DisconnectReason) {
        let Some(mut p) = self.conns.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut p.socket);
        self.release(p.shard, p.peer, p.accepted_at, reason);
    }

    /// A connection this thread held is gone: the shard's counts, as `close_conn` would,
    /// and this thread's own.
    fn release(&self, shard: usize, peer: SocketAddr, accepted: Instant, reason: DisconnectReason) {
        self.shared.forget(shard, peer);
        self.metrics.disconnect(reason.counted(false));
        self.metrics
            .observe_connection_age(accepted.elapsed().as_secs_f64());
        tracing::debug!(shard, %peer, reason = reason.as_str(), "connection closed in its TLS handshake");
    }

    /// Closes the handshakes whose connect timeout passed, and drops the entries of
    /// those already gone from the front (handshakes end mostly in the order they
    /// began, so the queue stays about as long as the handshakes under way).
    fn expire(&mut self, now: Instant) {
        while let Some(&(key, serial, deadline)) = self.deadlines.front() {
            let live = self.conns.get(key).is_some_and(|p| p.serial == serial);
            if live && deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if live {
                self.close(key, DisconnectReason::ConnectTimeout);
            }
        }
    }

    /// At shutdown: every handshake under way is closed.
    fn close_all(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, DisconnectReason::Shutdown);
        }
        while let Some((_, h, shard)) = self.undelivered.pop_front() {
            self.release(shard, h.peer, h.accepted_at, DisconnectReason::Shutdown);
        }
        for a in self.take_arrivals(true) {
            self.release(a.shard, a.peer, a.accepted_at, DisconnectReason::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A server session (nothing here reads it) and a loopback socket.
    fn handshaken() -> Box<Handshaken> {
        let (cert, key) = crate::tls::localhost_cert();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        Box::new(Handshaken {
            socket: TcpStream::from_std(client),
            peer: "127.0.0.1:1".parse().unwrap(),
            link: Link::Tls,
            tls: Box::new(rustls::ServerConnection::new(Arc::new(config)).unwrap()),
            tls_cursor: Cursor::default(),
            tls_secrets: None,
            accepted_at: Instant::now(),
            rest: Vec::new(),
        })
    }

    /// A worker for one shard whose mailbox holds one message, and that mailbox.
    fn worker() -> (Worker, tokio::sync::mpsc::Receiver<ShardMsg>) {
        let (mailboxes, mut rx) = Mailboxes::new(1, 1);
        let shared = Arc::new(Shared {
            mailboxes,
            shards: vec![Arc::new(ShardMetrics::default())],
            per_ip: Arc::new(PerIpLimit::new(0)),
            open_connections: Arc::new(AtomicUsize::new(1)),
            connect_timeout: Duration::from_secs(10),
        });
        shared.shards[0].tls_handshaking.store(1, Ordering::Relaxed);
        let poll = Poll::new().unwrap();
        let inbox = Arc::new(Inbox {
            arrivals: Mutex::new(Some(Vec::new())),
            waker: Waker::new(poll.registry(), WAKER).unwrap(),
            stop: AtomicBool::new(false),
        });
        let metrics = Arc::new(ShardMetrics::default());
        (Worker::new(poll, inbox, shared, metrics), rx.remove(0))
    }

    fn in_progress(w: &Worker) -> u64 {
        w.shared.shards[0].tls_handshaking.load(Ordering::Relaxed)
    }

    #[test]
    fn a_hand_back_to_a_full_mailbox_waits_and_goes_once_there_is_room() {
        let (mut w, mut rx) = worker();
        let filled = w.shared.mailboxes.try_send(0, ShardMsg::Shutdown);
        assert!(filled.is_ok(), "the mailbox takes one message");
        let h = w.deliver(0, handshaken()).unwrap_err();
        let deadline = Instant::now() + Duration::from_secs(10);
        w.undelivered.push_back((deadline, h, 0));
        assert_eq!(w.poll_timeout(Instant::now()), Some(RETRY_HAND_BACK));
        w.retry_undelivered(Instant::now());
        assert_eq!((w.undelivered.len(), in_progress(&w)), (1, 1), "still full");
        assert!(matches!(rx.try_recv(), Ok(ShardMsg::Shutdown)));
        w.retry_undelivered(Instant::now());
        assert_eq!((w.undelivered.len(), in_progress(&w)), (0, 0));
        assert!(matches!(rx.try_recv(), Ok(ShardMsg::Handshaken(_))));
        assert_eq!(w.shared.open_connections.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_hand_back_still_waiting_at_its_deadline_is_closed_and_released() {
        let (mut w, _rx) = worker();
        let filled = w.shared.mailboxes.try_send(0, ShardMsg::Shutdown);
        assert!(filled.is_ok(), "the mailbox takes one message");
        let h = w.deliver(0, handshaken()).unwrap_err();
        let deadline = Instant::now();
        w.undelivered.push_back((deadline, h, 0));
        w.retry_undelivered(deadline + Duration::from_millis(1));
        assert_eq!((w.undelivered.len(), in_progress(&w)), (0, 0));
        assert_eq!(w.shared.open_connections.load(Ordering::Relaxed), 0);
        assert_eq!(
            w.metrics.refused[RefuseReason::Busy as usize].load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_closed_inbox_gives_arrivals_back() {
        let (w, _rx) = worker();
        assert!(w.take_arrivals(true).is_empty());
        let handshakers = Handshakers {
            inboxes: vec![w.inbox.clone()].into(),
        };
        let h = handshaken();
        let a = Arrival {
            socket: h.socket,
            peer: h.peer,
            link: h.link,
            tls: h.tls,
            accepted_at: h.accepted_at,
            shard: 0,
            early: Vec::new(),
        };
        assert!(handshakers.submit(a).is_err());
    }
}
