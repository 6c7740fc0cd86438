//! Sweeping a dead node's registry entries (`[cluster] registry_sweep_rate`).
//!
//! A node killed with `kill -9` leaves its entries in the registry bucket; without this
//! each one stays until a push or a reconnect of its device meets it. What this owns:
//!
//! - **Noticing.** Every node lists the leases every third of `lease_secs`. A node whose
//!   lease was there and is gone without a delete marker (it expired: the node did not
//!   leave cleanly) is dead: [`Sweeper::dead_nodes`] announces it (the hook for other
//!   work on a dead node's behalf, e.g. its devices' wills), and a sweep is due.
//! - **One sweeper.** The node that creates the marker key [`MARKER`] in the lease bucket
//!   sweeps; the marker ages out with the bucket's `max_age` (`lease_secs`) unless the
//!   sweeper renews it (by revision) at each step, so a sweeper that dies is replaced once
//!   its own lease expires and another node notices that. A node that finds the marker
//!   held by a live node leaves the sweep to it.
//! - **The sweep.** One pass over the bucket's latest entries (a pull consumer, last per
//!   subject), at most `registry_sweep_rate` entries read per second in steps of at most
//!   [`MAX_STEP`] ([`TAKE_IN_STEP`] when this node takes sessions in): each entry naming
//!   a node without a lease is deleted by its revision, so a device that reconnected
//!   meanwhile (a newer revision) keeps its entry. Counted in
//!   `gateway_fleet_registry_swept_total`. An entry whose persistent session the fleet
//!   keeps is not deleted: this node takes the session in (`take_in`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;

use super::registry::Registry;
use super::sessions::SessionStore;
use super::take_in::TakeIn;

/// The sweep marker's key in the lease bucket (a `.`: no node id has one).
pub const MARKER: &str = "sweep.marker";
/// Entries read per step at most (the consumer's unacknowledged limit).
pub const MAX_STEP: u32 = 1000;
/// Entries read per step at most when this node takes sessions in.
const TAKE_IN_STEP: u32 = 256;
/// Sweeps in a row that may fail before the sweeping waits for another death.
const SWEEP_TRIES: u32 = 5;

/// This node's part in sweeping dead nodes' registry entries.
pub struct Sweeper {
    registry: Arc<Registry>,
    /// Takes in the dead nodes' persistent sessions.
    sessions: Arc<SessionStore>,
    /// Entries read per second at most; 0 = no sweeping.
    rate: u32,
    every: Duration,
    /// How long one listing of the leases may take (`request_timeout_ms`).
    list_timeout: Duration,
    dead: broadcast::Sender<Arc<str>>,
    swept: AtomicU64,
    /// The last sweep failed (logged once until one succeeds).
    failing: AtomicBool,
    /// The leases of the last look (every `every`) and when it was taken: what
    /// `GET /v1/stats?scope=fleet` asks when listing them itself fails.
    seen: std::sync::Mutex<Option<(std::time::Instant, Vec<String>)>>,
}

impl Sweeper {
    pub fn new(
        config: &ClusterConfig,
        registry: Arc<Registry>,
        sessions: Arc<SessionStore>,
    ) -> Arc<Sweeper> {
        Arc::new(Sweeper {
            registry,
            sessions,
            rate: config.registry_sweep_rate,
            every: config.lease() / 3,
            list_timeout: config.request_timeout(),
            dead: broadcast::channel(64).0,
            swept: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            seen: std::sync::Mutex::new(None),
        })
    }

    /// "Node X is dead" (its lease expired), on every node that noticed it; a receiver
    /// that falls more than 64 behind misses the oldest.
    pub fn dead_nodes(&self) -> broadcast::Receiver<Arc<str>> {
        self.dead.subscribe()
    }

    /// Entries this node deleted as a dead node's.
    pub fn swept(&self) -> u64 {
        self.swept.load(Ordering::Relaxed)
    }

    /// Appends `gateway_fleet_registry_swept_total`.
    pub fn render_metrics(&self, out: &mut String) {
        out.push_str("# HELP gateway_fleet_registry_swept_total Registry entries of nodes whose lease expired, deleted by this node's sweep.\n");
        out.push_str("# TYPE gateway_fleet_registry_swept_total counter\n");
        out.push_str(&format!(
            "gateway_fleet_registry_swept_total {}\n",
            self.swept()
        ));
    }

    /// Watches the leases until `stop`; sweeps when a node died and this node holds the
    /// marker.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut known = self.look().await.unwrap_or_default();
        let (mut due, mut tries) = (false, 0);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.cancelled() => return,
            }
            let Ok(now) = self.look().await else {
                continue;
            };
            for gone in known.difference(&now) {
                if self.gone(gone).await {
                    (due, tries) = (true, 0);
                }
            }
            known = now;
            if due && self.rate > 0 {
                due = self.sweep_if_first().await;
                tries += 1;
                if due && tries >= SWEEP_TRIES {
                    // A failure that does not pass (a session record that does not
                    // decode): left to the pushes that meet those entries.
                    tracing::warn!(tries, "cluster: the registry sweep keeps failing; not tried again until another node dies");
                    due = false;
                }
            }
        }
    }

    /// The leases now, kept as the last look.
    async fn look(&self) -> Result<HashSet<String>, String> {
        let now = self.leases().await?;
        let mut sorted: Vec<String> = now.iter().cloned().collect();
        sorted.sort();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        *seen = Some((std::time::Instant::now(), sorted));
        Ok(now)
    }

    /// The node ids holding a lease, sorted: listed now, or, when that fails, as the
    /// last look saw them (at most a few periods old).
    pub(crate) async fn live(&self) -> Result<Vec<String>, String> {
        let listed = self.leases().await;
        let mut nodes: Vec<String> = match listed {
            Ok(now) => now.into_iter().collect(),
            Err(e) => {
                let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                match seen
                    .as_ref()
                    .filter(|(at, _)| at.elapsed() <= self.every * 4)
                {
                    Some((_, nodes)) => nodes.clone(),
                    None => return Err(e),
                }
            }
        };
        nodes.sort();
        Ok(nodes)
    }

    /// The node ids holding a lease now. Bounded: listing a bucket whose entries expire
    /// or are replaced meanwhile (leases do both) can wait for an entry that is gone
    /// (nats-io/nats.rs#642), and the sweeper looked no more: a node that died then was
    /// never swept. A listing cut off is tried again at the next look.
    async fn leases(&self) -> Result<HashSet<String>, String> {
        tokio::time::timeout(self.list_timeout, self.list_leases())
            .await
            .map_err(|_| format!("listing the leases took over {:?}", self.list_timeout))?
    }

    async fn list_leases(&self) -> Result<HashSet<String>, String> {
        let keys = self
            .registry
            .leases()
            .keys()
            .await
            .map_err(|e| e.to_string())?;
        let keys: Vec<_> = keys.collect().await;
        keys.into_iter()
            .map(|k| k.map_err(|e| e.to_string()))
            .filter(|k| k.as_ref().map_or(true, |k| !k.contains('.')))
            .collect()
    }

    /// `node`'s lease is gone: true if it expired (the node died) rather than was given
    /// up (a clean stop deletes its entries itself).
    async fn gone(&self, node: &str) -> bool {
        let left = match self.registry.leases().entry(node).await {
            Ok(Some(e)) => e.operation != kv::Operation::Put,
            Ok(None) => false,
            // Not known: no node is announced dead on a guess (the sweep itself deletes
            // only entries of nodes without a lease, whoever asked for it).
            Err(_) => true,
        };
        if left {
            return false;
        }
        tracing::info!(
            node,
            "cluster: a node's lease expired; its registry entries are swept"
        );
        let _ = self.dead.send(node.into());
        true
    }

    /// Sweeps if this node takes the marker; whether a sweep is still due (the sweep
    /// failed, or the marker is held by a node without a lease).
    async fn sweep_if_first(&self) -> bool {
        let me = self.registry.node_id();
        let leases = self.registry.leases();
        match leases.create(MARKER, me.as_bytes().to_vec().into()).await {
            Ok(revision) => {
                let swept = self.sweep(revision).await;
                let _ = leases.delete(MARKER).await;
                match swept {
                    Ok(()) => self.failing.store(false, Ordering::Relaxed),
                    Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                        tracing::warn!(error = %e, "cluster: the registry sweep failed; it is tried again a third of lease_secs later");
                    }
                    Err(_) => {}
                }
                self.failing.load(Ordering::Relaxed)
            }
            Err(_) => match leases.get(MARKER).await {
                Ok(Some(holder)) => {
                    let holder = String::from_utf8_lossy(&holder).into_owned();
                    !matches!(self.registry.alive(&holder).await, Ok(true))
                }
                // Gone in between: try again at the next look.
                _ => true,
            },
        }
    }

    /// One pass over the registry, deleting the entries of nodes without a lease.
    async fn sweep(&self, mut marker: u64) -> Result<(), String> {
        let stream = &self.registry.clients.stream;
        let consumer: PullConsumer = stream
            .create_consumer(super::last_per_subject(
                format!("{}>", self.registry.clients.prefix),
                i64::from(MAX_STEP),
            ))
            .await
            .map_err(|e| format!("sweep consumer: {e}"))?;
        let name = consumer.cached_info().name.clone();
        // Steps that take sessions in take longer: smaller ones keep the marker renewed
        // well within its age (`lease_secs`).
        let most = if self.sessions.keeps_sessions() {
            TAKE_IN_STEP
        } else {
            MAX_STEP
        };
        let step = (self.rate / 10).clamp(1, most);
        let pause = Duration::from_secs_f64(f64::from(step) / f64::from(self.rate.max(1)));
        // The entries there were when the pass began: what is written after (claims of
        // live nodes, this pass's own deletes) is not read, so a busy registry ends too.
        let mut left = consumer.cached_info().num_pending;
        let mut progress = Progress::new(left, self);
        let mut failed = 0;
        let result = async {
            loop {
                let (read, not_taken) = self.step(&consumer, step as usize).await?;
                failed += not_taken;
                left = left.saturating_sub(read);
                progress.step(read, self);
                if read == 0 || left == 0 {
                    if failed > 0 {
                        // Their entries still name the dead node: the next sweep (a third
                        // of lease_secs later) tries them again.
                        return Err(format!(
                            "{failed} sessions of dead nodes could not be taken in"
                        ));
                    }
                    return Ok(());
                }
                let renewed = self.registry.leases().update(
                    MARKER,
                    self.registry.node_id().as_bytes().to_vec().into(),
                    marker,
                );
                marker = renewed
                    .await
                    .map_err(|e| format!("the sweep marker: {e}"))?;
                tokio::time::sleep(pause).await;
            }
        }
        .await;
        let _ = stream.delete_consumer(&name).await;
        progress.done(self, result.is_ok());
        result
    }

    /// Reads up to `n` entries and deletes those of nodes without a lease (or takes
    /// their sessions in); how many it read, and how many take-ins failed.
    async fn step(&self, consumer: &PullConsumer, n: usize) -> Result<(u64, u64), String> {
        let fetch = consumer.fetch().max_messages(n).messages();
        let mut batch = fetch.await.map_err(|e| format!("sweep fetch: {e}"))?;
        let (mut entries, mut last, mut read) = (Vec::new(), None, 0);
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| format!("sweep read: {e}"))?;
            let info = m.info().map_err(|e| format!("sweep read: {e}"))?;
            read += 1;
            if let Some((key, node)) = held_entry(&m, &self.registry.clients.prefix) {
                entries.push((key, node, info.stream_sequence));
            }
            last = Some(m);
        }
        // Acknowledging the last acknowledges the step (`AckPolicy::All`).
        if let Some(m) = last {
            let _ = m.ack().await;
        }
        let dead = self.dead_among(&entries).await;
        let mut settling = Vec::new();
        for (key, node, revision) in entries {
            if dead.contains(node.as_str()) {
                settling.push(self.settle(key, node, revision));
            }
        }
        let settled =
            futures_util::stream::iter(settling).buffer_unordered(super::take_in::AT_ONCE);
        let failed = settled.filter(|ok| std::future::ready(!ok)).count().await;
        Ok((read, failed as u64))
    }

    /// A dead node's entry: its persistent session taken in here (`take_in`), or the
    /// entry deleted when the fleet keeps no session for it. False if the take-in
    /// failed (logged; the entry is left to the dead node).
    async fn settle(&self, key: String, dead: String, revision: u64) -> bool {
        let Some(client_id) = super::registry::client_id_of(&key) else {
            self.delete(&key, revision).await;
            return true;
        };
        match self.sessions.take_in(&client_id, &dead, revision).await {
            Ok(TakeIn::Offline) => {
                // Deleted by the take-in (by revision), as `delete` would.
                self.swept.fetch_add(1, Ordering::Relaxed);
                self.registry.metrics.count("delete", true);
            }
            Ok(TakeIn::Here | TakeIn::Elsewhere) => {}
            Err(e) => {
                tracing::warn!(%client_id, node = %dead, error = %e, "cluster: a dead node's persistent session could not be taken in; tried again at the next sweep");
                return false;
            }
        }
        true
    }

    /// The nodes named in `entries` that hold no lease (a read error counts as alive).
    async fn dead_among(&self, entries: &[(String, String, u64)]) -> HashSet<String> {
        let mut seen: HashMap<&str, bool> = HashMap::new();
        for (_, node, _) in entries {
            if !seen.contains_key(node.as_str()) {
                let alive = node.as_str() == &**self.registry.node_id()
                    || !matches!(self.registry.alive(node).await, Ok(false));
                seen.insert(node, alive);
            }
        }
        seen.into_iter()
            .filter(|(_, alive)| !alive)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Deletes `key` if it is still the entry of `revision`.
    async fn delete(&self, key: &str, revision: u64) {
        let clients = &self.registry.clients;
        match clients.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => {
                self.swept.fetch_add(1, Ordering::Relaxed);
                self.registry.metrics.count("delete", true);
            }
            // Claimed again meanwhile (a newer revision): the entry stays.
            Err(_) => self.registry.metrics.conflict_on("delete"),
        }
    }
}

/// `(key, node)` of a registry message that names a node (a put); `prefix` is the
/// bucket's subject prefix (`$KV.<bucket>.`).
fn held_entry(m: &async_nats::jetstream::Message, prefix: &str) -> Option<(String, String)> {
    let put = m
        .headers
        .as_ref()
        .and_then(|h| h.get("KV-Operation"))
        .is_none();
    let key = m.subject.as_str().strip_prefix(prefix)?;
    (put && !m.payload.is_empty()).then(|| {
        (
            key.to_string(),
            String::from_utf8_lossy(&m.payload).into_owned(),
        )
    })
}

/// A sweep's progress, logged every [`PROGRESS_EVERY`] and at its end: entries read of
/// those there were, deleted, and sessions taken in.
struct Progress {
    began: std::time::Instant,
    last_log: std::time::Instant,
    total: u64,
    read: u64,
    /// `swept` and `taken_in` when the pass began.
    swept: u64,
    taken_in: u64,
}

/// How often a long sweep logs how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    fn new(total: u64, sweeper: &Sweeper) -> Progress {
        let now = std::time::Instant::now();
        Progress {
            began: now,
            last_log: now,
            total,
            read: 0,
            swept: sweeper.swept(),
            taken_in: sweeper.sessions.metrics.taken_in.get(),
        }
    }

    fn step(&mut self, read: u64, sweeper: &Sweeper) {
        self.read += read;
        if self.last_log.elapsed() >= PROGRESS_EVERY {
            self.last_log = std::time::Instant::now();
            let (deleted, taken_in) = self.counts(sweeper);
            tracing::info!(
                read = self.read,
                of = self.total,
                deleted,
                taken_in,
                "cluster: registry sweep under way"
            );
        }
    }

    fn done(&self, sweeper: &Sweeper, ok: bool) {
        let (deleted, taken_in) = self.counts(sweeper);
        let secs = self.began.elapsed().as_secs_f64();
        tracing::info!(
            read = self.read,
            of = self.total,
            deleted,
            taken_in,
            secs,
            ok,
            "cluster: registry sweep ended"
        );
    }

    /// Entries deleted and sessions taken in (by the sweep or a push) since the pass began.
    fn counts(&self, sweeper: &Sweeper) -> (u64, u64) {
        let taken_in = sweeper.sessions.metrics.taken_in.get();
        (sweeper.swept() - self.swept, taken_in - self.taken_in)
    }
}
