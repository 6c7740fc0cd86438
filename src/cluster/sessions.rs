//! Persistent sessions in JetStream, so that a device's session survives the loss of the
//! node that held it (issue 20): any node restores it when the device connects there.
//!
//! **What is written, and when.** Nothing here runs on an IO shard. The store writer
//! hands every commit group's session changes to `SessionMirror` (`session_changes`)
//! after committing them to the local redb file (`crate::store::mirror`); one task
//! applies them to NATS in order, batched (publishes pipelined, their acks awaited
//! together before anything that depends on them), and only then sends the push answers
//! that promised `queued`. MQTT acknowledgements to devices never wait for NATS: they
//! wait for the local commit only.
//!
//! **Layout** (no consumer per device: restores read with direct gets):
//! - key-value bucket `cluster.session_bucket` (stream `KV_<bucket>`): `<id>.rec` → the
//!   session's one record (version, expiry, offline since, its subscriptions and the
//!   inbound QoS 2 packet ids awaiting PUBREL), rewritten whole when any of them changes
//!   (`Op::FleetRecord`), so that reading it back is one direct get: listing subjects by
//!   a filter costs nats-server 2.9 a scan of the whole bucket; `<id>.q2out.<sequence>`
//!   the outbound QoS 2 state of a queued message (`session_qos2`); `<id>` escaped as
//!   registry keys are (`=XX`). Sessions written before the one-key record (`<id>.meta`,
//!   `<id>.sub.<filter>`, `<id>.q2in.<pkid>`) are still read (`restore`);
//! - stream `cluster.session_stream`: the session's queued and unacknowledged QoS 1/2
//!   messages on subject `<subject_prefix>.smsg.<id>`, in delivery order. An acknowledged
//!   message is deleted by its stream sequence (kept here in memory per stored message);
//!   an ended session's messages are found by direct gets and deleted so, then its record
//!   emptied ([`SessionStore::purge`]: no purge by subject, which nats-server 2.9 answers
//!   by scanning the stream).
//!
//! The values are the local store's own checksummed records (`store::mirror`).
//!
//! **Restore.** A CONNECT that resumes a session (clean start 0) for which this node has
//! none is held, like a slow authentication, while [`SessionStore::load`] reads the
//! record, subscriptions and messages; the shard adopts them (`shard/adopt.rs`) under its
//! own message sequences and stores them locally, and the mirror maps those sequences to
//! the messages already in the stream instead of publishing them again. A clean start
//! for which this node has no session purges what the fleet kept for the client id
//! (`restore`). The sessions a node restores from its own store at start are written to
//! the fleet again first ([`SessionStore::start`]).

use std::collections::HashMap;
use std::future::IntoFuture;
use std::mem::take;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use bytes::Bytes;

use crate::config::ClusterConfig;
use crate::events::nats::escape;
use crate::store::mirror::{self, Mirror};
use crate::store::{DeferredReply, StoredSession};

use super::acker::Ack;
use super::session_changes::{cancel_acked, Change, SessionMirror};

/// The header of a session record naming the node that wrote it: a node tells its own
/// writes from other nodes' (`restore::Written`).
pub(super) const WRITER: &str = "Gateway-Node";

/// Commit groups waiting for the mirror task; past this the store writer waits.
const QUEUE: usize = 64;

/// Publishes whose acks are handed to the acknowledging task at once, within a group
/// (well under async-nats's 5,000 publishes awaiting their acks per context).
const ACK_PART: usize = 1024;

/// Publishes whose acks are awaited together: a message's (client id, local sequence),
/// or `None` for a key-value put.
pub(super) type Pending = Vec<(Option<(Arc<str>, u64)>, PublishAckFuture)>;

/// Why a group's changes did not reach JetStream: a client id it concerned (`-` for
/// none in particular) and the error.
pub(super) type Failed = (Arc<str>, String);

/// What the mirror task takes, in the store writer's order.
pub(super) enum Work {
    /// One commit group's changes (maybe none), handed over as the writer commits them.
    Changes(Vec<Change>),
    /// The answers waiting for the group just before, once it is committed locally.
    Answers(Vec<DeferredReply>),
}

/// The stream sequences of this node's stored messages (of messages adopted from the
/// fleet too, from the moment the shard adopts them).
#[derive(Default)]
pub(super) struct Seqs {
    pub(super) stored: HashMap<Arc<str>, HashMap<u64, u64>>,
    /// The stored messages whose QoS 2 state is in the bucket (`session_qos2`).
    pub(super) qos2_out: HashMap<Arc<str>, std::collections::HashSet<u64>>,
    /// Sessions being handed over to another node (`handover`): their end here keeps
    /// the fleet's copy, and is reported once everything before it is in JetStream.
    pub(super) moving: HashMap<Arc<str>, tokio::sync::oneshot::Sender<()>>,
    /// Sessions of dead nodes being taken in here (`take_in`): a handover of one waits
    /// until its shard has it.
    pub(super) taking_in: std::collections::HashSet<Arc<str>>,
}

/// Sessions of a restart's rewrite ended at once (`resets_first`).
const RESETS_AT_ONCE: usize = 64;

/// Wills of dead nodes published (looked up, then handed to the shards) at once.
const WILLS_AT_ONCE: usize = 256;

/// The fleet's copy of the persistent sessions.
pub struct SessionStore {
    pub(super) js: jetstream::Context,
    pub(super) kv: stream::Stream,
    pub(super) msgs: stream::Stream,
    /// `$KV.<bucket>`.
    pub(super) kv_prefix: String,
    /// `<subject_prefix>.smsg`.
    msg_prefix: String,
    seqs: Mutex<Seqs>,
    /// What a handover between nodes needs (`handover`).
    pub(super) link: super::handover::Link,
    pub metrics: super::session_metrics::SessionMetrics,
    /// Changes JetStream did not take, written again once NATS is back.
    pub(super) resync: super::session_resync::Resync,
    /// The wills the last run left, noted at start after a crash (`session_leftover`).
    pub(super) leftover_wills: Mutex<Option<super::session_leftover::Pending>>,
    /// Wills of dead nodes (or of the last run) being published at once: a node with a
    /// million devices dying must not start a million lookups and publications at once.
    pub(super) will_permits: Arc<tokio::sync::Semaphore>,
    /// Commit groups handed to the mirror task, and those it finished (written, or kept
    /// for the re-sync): a stopping node waits for them to meet (`acker::written`).
    pub(super) groups_handed: AtomicU64,
    pub(super) groups_done: AtomicU64,
    /// The shards (set when the fleet starts), and whether this node keeps sessions in
    /// the fleet (the store is on: [`SessionStore::start`] ran): a dead node's sessions
    /// are taken in only then (`take_in`).
    pub(super) shards: std::sync::OnceLock<crate::mailbox::Mailboxes>,
    pub(super) keeps: std::sync::atomic::AtomicBool,
    /// `cluster.clock_skew_ms` (the re-sync's stale records, `session_resync`).
    pub(super) clock_skew_ms: u64,
}

/// A session's key (its client id escaped).
pub(super) fn key(client_id: &str) -> String {
    let k = escape(client_id, '=');
    // `will.` and `wnode.` hold the wills (`session_will`): a client id spelled so has its
    // first letter escaped, so that purging its keys (`<key>.>`) never purges theirs.
    match k.as_str() {
        "will" | "wnode" => format!("={:02X}{}", k.as_bytes()[0], &k[1..]),
        _ => k,
    }
}

/// Opens stream `config.name`, creating it if it does not exist yet.
async fn open_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, String> {
    let config_replicas = config.num_replicas;
    if let Ok(s) = js.get_stream(&config.name).await {
        return Ok(s);
    }
    let name = config.name.clone();
    let created = js.create_stream(config).await;
    // Another node may have created it in between: open it either way.
    js.get_stream(&name).await.map_err(|e| {
        let why = created
            .err()
            .map_or_else(|| e.to_string(), |c| c.to_string());
        format!(
            "cluster: cannot open the session stream {name} with {} replica(s) (cluster.session_replicas): {why}",
            config_replicas
        )
    })
}

impl SessionStore {
    /// Opens (or creates, with `session_replicas`) the bucket and the stream.
    pub async fn open(
        client: &async_nats::Client,
        config: &ClusterConfig,
        link: super::handover::Link,
    ) -> Result<Arc<SessionStore>, String> {
        let js = jetstream::new(client.clone());
        let replicas = config.session_replicas as usize;
        let bucket = &config.session_bucket;
        let kv = open_stream(
            &js,
            stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                allow_rollup: true,
                allow_direct: true,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let msg_prefix = format!("{}.smsg", config.subject_prefix);
        let msgs = open_stream(
            &js,
            stream::Config {
                name: config.session_stream.clone(),
                subjects: vec![format!("{msg_prefix}.>")],
                allow_direct: true,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Arc::new(SessionStore {
            js,
            kv,
            msgs,
            kv_prefix: format!("$KV.{bucket}"),
            msg_prefix,
            seqs: Mutex::default(),
            link,
            metrics: Default::default(),
            resync: super::session_resync::Resync::new(config.session_resync_max_mib),
            leftover_wills: Mutex::default(),
            will_permits: Arc::new(tokio::sync::Semaphore::new(WILLS_AT_ONCE)),
            groups_handed: AtomicU64::new(0),
            groups_done: AtomicU64::new(0),
            shards: std::sync::OnceLock::new(),
            keeps: std::sync::atomic::AtomicBool::new(false),
            clock_skew_ms: config.clock_skew_ms(),
        }))
    }

    pub(super) fn seqs(&self) -> std::sync::MutexGuard<'_, Seqs> {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The headers of a session record this node writes: [`WRITER`] names the node.
    pub(super) fn record_headers(&self) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(WRITER, &*self.link.node);
        headers
    }

    /// The session's one record: session fields, subscriptions, inbound QoS 2 ids.
    pub(super) fn record_subject(&self, client_id: &str) -> String {
        format!("{}.{}.rec", self.kv_prefix, key(client_id))
    }

    /// The session record as gateways before the one-key record wrote it (read only).
    pub(super) fn old_meta_subject(&self, client_id: &str) -> String {
        format!("{}.{}.meta", self.kv_prefix, key(client_id))
    }

    pub(super) fn msg_subject(&self, client_id: &str) -> String {
        format!("{}.{}", self.msg_prefix, key(client_id))
    }

    /// Starts the task that applies the store writer's changes on `runtime`; the mirror
    /// to give the store (`Store::set_mirror`).
    ///
    /// The sessions `restored` from the local store at start are written again first,
    /// as this node holds them (before any change the shards make to them).
    pub fn start(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        restored: &[Vec<StoredSession>],
    ) -> Box<dyn Mirror> {
        self.keeps.store(true, Ordering::Release);
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let mut again: Vec<Change> = vec![self.will_node_change()];
        again.extend(restored.iter().flatten().flat_map(|s| self.again(s)));
        if tx.try_send(Work::Changes(again)).is_ok() {
            self.groups_handed.fetch_add(1, Ordering::AcqRel);
        }
        runtime.spawn(self.clone().apply_all(rx));
        Box::new(SessionMirror {
            store: self.clone(),
            tx,
        })
    }

    /// A session restored from the local store, written to the fleet again.
    fn again(&self, s: &StoredSession) -> Vec<Change> {
        let id = &s.client_id;
        let mut changes = Vec::with_capacity(2 + s.messages.len());
        let made_ms = crate::store::now_ms();
        changes.push(Change::Reset {
            client_id: id.clone(),
            made_ms,
        });
        let record = mirror::FleetRecord {
            client_id: id.clone(),
            version: s.version,
            expiry_secs: s.expiry_secs,
            offline_since_ms: s.offline_since_ms,
            subs: s.subs.clone(),
            inbound_qos2: s.inbound_qos2.clone(),
        };
        changes.push(Change::Record {
            client_id: id.clone(),
            value: mirror::fleet_record_bytes(&record).into(),
            made_ms,
        });
        for m in &s.messages {
            changes.push(Change::Msg {
                client_id: id.clone(),
                seq: m.seq,
                value: mirror::message_bytes(id, &m.msg, m.qos, m.retain).into(),
            });
        }
        let qos2 = mirror::qos2_ops(s);
        changes.extend(qos2.iter().filter_map(|op| self.change(op)));
        changes
    }

    /// Applies each commit group's changes in order; the acks of its publishes are
    /// awaited, and the pushes waiting for it answered, by a task of their own (`acker`).
    async fn apply_all(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<Work>) {
        let (acks, acked) = tokio::sync::mpsc::channel(QUEUE);
        tokio::spawn(self.clone().ack_all(acked));
        let mut tick = tokio::time::interval(super::session_resync::TICK);
        loop {
            let work = tokio::select! {
                work = rx.recv() => work,
                _ = tick.tick() => {
                    self.resync_step(&acks).await;
                    continue;
                }
            };
            let Some(work) = work else { return };
            let ack = match work {
                Work::Changes(changes) => self.apply_group(changes, &acks).await,
                Work::Answers(replies) => Ack::Answers(replies),
            };
            if acks.send(ack).await.is_err() {
                return;
            }
        }
    }

    /// Applies one commit group, or, while changes wait for the re-sync, puts it behind
    /// them; a group JetStream does not take is kept for the re-sync (`session_resync`).
    async fn apply_group(
        &self,
        changes: Vec<Change>,
        acks: &tokio::sync::mpsc::Sender<Ack>,
    ) -> Ack {
        let n = changes.len();
        if self.resync.waiting() {
            let result = Err((
                Arc::from("-"),
                "kept for the re-sync after a NATS outage".into(),
            ));
            return Ack::End {
                changes: n,
                result,
                kept: Some(changes),
            };
        }
        let kept = Some(changes.clone());
        let result = self.apply(changes, acks).await;
        Ack::End {
            changes: n,
            result,
            kept,
        }
    }

    /// Applies one group's changes in order: publishes are pipelined, their acks awaited
    /// by the acknowledging task, and everything acked before a delete or purge (which
    /// may concern what they wrote).
    pub(super) async fn apply(
        &self,
        changes: Vec<Change>,
        acks: &tokio::sync::mpsc::Sender<Ack>,
    ) -> Result<(), Failed> {
        if !self.link.connected() {
            // Failed at once: a queue of groups each waiting out its ack timeout would
            // stall the store writer, and with it the shards.
            return Err((Arc::from("-"), "NATS is unreachable".into()));
        }
        let changes = cancel_acked(changes, |id, seq| self.in_stream(id, seq));
        let changes = self.resets_first(changes, acks).await?;
        let mut pending: Pending = Vec::new();
        let mut deletes: Vec<u64> = Vec::new();
        let mut finished_qos2: Vec<String> = Vec::new();
        let fail = |id: &Arc<str>| {
            let id = id.clone();
            move |e: String| (id, e)
        };
        for change in changes {
            match change {
                Change::Put { subject, value } => {
                    self.flush_deletes(&mut deletes).await?;
                    self.put(subject, value, &mut pending).await?;
                }
                Change::Record {
                    client_id, value, ..
                } => {
                    self.flush_deletes(&mut deletes).await?;
                    self.put_record(&client_id, value, &mut pending).await?;
                }
                Change::Qos2Out {
                    client_id,
                    seq,
                    pkid,
                    released,
                } => {
                    let state = (seq, pkid, released);
                    let put = self.qos2_out_put(&client_id, state, acks, &mut pending);
                    if let Some((subject, value)) = put.await? {
                        self.flush_deletes(&mut deletes).await?;
                        self.put(subject, value, &mut pending).await?;
                    }
                }
                Change::Adopted {
                    client_id,
                    local_and_stream,
                    qos2_out,
                } => self.adopted(&client_id, &local_and_stream, &qos2_out),
                Change::Msg {
                    client_id,
                    seq,
                    value,
                } => {
                    if self.in_stream(&client_id, seq) {
                        // Adopted from the fleet: the stream has it already.
                        continue;
                    }
                    self.flush_deletes(&mut deletes).await?;
                    let subject = self.msg_subject(&client_id);
                    let ack = self.publish(subject, value).await;
                    if let Some(ack) = ack.map_err(fail(&client_id))? {
                        pending.push((Some((client_id, seq)), ack));
                    }
                }
                Change::Acked { client_id, seq } => {
                    self.barrier(acks, &mut pending).await?;
                    if let Some(js_seq) = self.forget_seq(&client_id, seq) {
                        finished_qos2.extend(self.qos2_out_done(&client_id, seq, js_seq));
                        deletes.push(js_seq);
                    }
                }
                // Done before the rest of the group (`resets_first`).
                Change::Reset { .. } => {}
                Change::Forget { client_id } => {
                    // After the acks of its messages before it, which remember them.
                    self.barrier(acks, &mut pending).await?;
                    self.forget_client(&client_id);
                }
                Change::Gone { client_id } => {
                    self.barrier(acks, &mut pending).await?;
                    self.flush_deletes(&mut deletes).await?;
                    self.gone(&client_id).await?;
                }
            }
            // Each publish holds one of the JetStream context's 5,000 permits until its
            // ack is awaited: a group larger than that (a stop detaching 10,000 devices
            // with wills) would wait for a permit forever with the acks still here.
            if pending.len() >= ACK_PART && acks.send(Ack::Part(take(&mut pending))).await.is_err()
            {
                return Err((Arc::from("-"), "the mirror is stopping".into()));
            }
        }
        self.flush_deletes(&mut deletes).await?;
        self.remove_finished_qos2(finished_qos2).await;
        if !pending.is_empty() && acks.send(Ack::Part(pending)).await.is_err() {
            return Err((Arc::from("-"), "the mirror is stopping".into()));
        }
        Ok(())
    }

    /// The group's `Reset`s done first, [`RESETS_AT_ONCE`] at a time (once everything
    /// before is acked); the rest of the group, in order. Only a restart's rewrite of
    /// its restored sessions has them ([`SessionStore::start`]), each before all of its
    /// session's changes; each reads and deletes what JetStream held of one session,
    /// and one after the other they kept a node with thousands of sessions from
    /// answering pushes for seconds after its start.
    async fn resets_first(
        &self,
        changes: Vec<Change>,
        acks: &tokio::sync::mpsc::Sender<Ack>,
    ) -> Result<Vec<Change>, Failed> {
        if !changes.iter().any(|c| matches!(c, Change::Reset { .. })) {
            return Ok(changes);
        }
        self.barrier(acks, &mut Vec::new()).await?;
        let (resets, rest): (Vec<_>, Vec<_>) =
            (changes.into_iter()).partition(|c| matches!(c, Change::Reset { .. }));
        let purges = resets.into_iter().filter_map(|c| match c {
            Change::Reset { client_id, .. } => {
                Some(async move { self.purge(&client_id).await.map_err(|e| (client_id, e)) })
            }
            _ => None,
        });
        let mut purges = futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(purges),
            RESETS_AT_ONCE,
        );
        while let Some(done) = futures_util::StreamExt::next(&mut purges).await {
            done?;
        }
        Ok(rest)
    }

    /// Publishes a key-value put; its ack is awaited with the others in `pending`.
    async fn put(
        &self,
        subject: String,
        value: Bytes,
        pending: &mut Pending,
    ) -> Result<(), Failed> {
        let ack = self.publish(subject, value).await;
        if let Some(ack) = ack.map_err(|e| (Arc::from("-"), e))? {
            pending.push((None, ack));
        }
        Ok(())
    }

    /// Publishes `client_id`'s record. One NATS refuses as too large is written empty
    /// instead: the fleet then keeps no session for the client id (a resume on another
    /// node starts afresh) rather than an older record of it (older subscriptions, and
    /// online since, which never expires), until a record of it fits again.
    async fn put_record(
        &self,
        client_id: &Arc<str>,
        value: Bytes,
        pending: &mut Pending,
    ) -> Result<(), Failed> {
        let subject = self.record_subject(client_id);
        let headers = Some(self.record_headers());
        let ack = self.publish_with(subject.clone(), headers, value).await;
        let ack = match ack.map_err(|e| (client_id.clone(), e))? {
            Some(ack) => ack,
            None => (self.empty_record(client_id).await).map_err(|e| (client_id.clone(), e))?,
        };
        pending.push((None, ack));
        Ok(())
    }

    /// Publishes `value` on `subject`; `None` when NATS refuses it for good, larger than
    /// the server's `max_payload` (a session with many long subscriptions, a message
    /// near `max_packet_size`): logged and skipped, so that one value cannot hold the
    /// mirror and its re-sync forever. The fleet's copy then lacks that change.
    async fn publish(
        &self,
        subject: String,
        value: Bytes,
    ) -> Result<Option<PublishAckFuture>, String> {
        self.publish_with(subject, None, value).await
    }

    /// [`SessionStore::publish`], with `headers`.
    async fn publish_with(
        &self,
        subject: String,
        headers: Option<async_nats::HeaderMap>,
        value: Bytes,
    ) -> Result<Option<PublishAckFuture>, String> {
        let size = value.len();
        let sent = match headers {
            Some(h) => {
                self.js
                    .publish_with_headers(subject.clone(), h, value)
                    .await
            }
            None => self.js.publish(subject.clone(), value).await,
        };
        match sent {
            Ok(ack) => Ok(Some(ack)),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                self.metrics.too_large();
                tracing::error!(%subject, size, "cluster: a session change is larger than NATS's max_payload and is not kept in the fleet (raise max_payload in nats-server, or lower [mqtt] max_packet_size / max_subscriptions_per_client)");
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Awaits the acks of the publishes in flight and remembers the stream sequence of
    /// each message.
    ///
    /// `patience`: how long each ack is awaited at most, once the group failed anyway
    /// (an ack's timeout starts only when it is awaited: a hung NATS would otherwise
    /// cost each later part of the group its full timeout); an ack that does not come
    /// by then counts as failed.
    pub(super) async fn settle(
        &self,
        pending: Pending,
        patience: Option<std::time::Duration>,
    ) -> Result<(), Failed> {
        let (keys, acks): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
        let acked = futures_util::future::join_all(acks.into_iter().map(|a| async move {
            let ack = a.into_future();
            match patience {
                None => ack.await.map_err(|e| e.to_string()),
                Some(d) => match tokio::time::timeout(d, ack).await {
                    Ok(ack) => ack.map_err(|e| e.to_string()),
                    Err(_) => Err("no ack after the group failed".to_string()),
                },
            }
        }));
        let mut first_failure = Ok(());
        // Every message JetStream took is remembered, after a failure too: the re-sync
        // then skips it rather than storing it twice (the first copy never deleted).
        for (key, ack) in keys.into_iter().zip(acked.await) {
            match (ack, key) {
                (Ok(ack), Some((client_id, seq))) => self.remember(&client_id, seq, ack.sequence),
                (Ok(_), None) => {}
                (Err(e), key) if first_failure.is_ok() => {
                    let who = key.map_or_else(|| Arc::from("-"), |k| k.0);
                    first_failure = Err((who, e));
                }
                (Err(_), _) => {}
            }
        }
        first_failure
    }

    /// Deletes the messages of stream sequences `deletes` (acknowledged), all at once.
    async fn flush_deletes(&self, deletes: &mut Vec<u64>) -> Result<(), Failed> {
        let deleted = self.delete_messages(deletes.drain(..)).await;
        deleted.map_err(|e| (Arc::from("-"), e))
    }

    /// Removes the QoS 2 keys of finished messages, all at once. One that stays (NATS
    /// away) is only a stale key: it names a stream sequence no message has any more.
    async fn remove_finished_qos2(&self, subjects: Vec<String>) {
        let removed = subjects.into_iter().map(|s| self.remove_key(s));
        for r in futures_util::future::join_all(removed).await {
            if let Err(e) = r {
                tracing::debug!(error = %e, "cluster: a finished QoS 2 key stays in the bucket");
            }
        }
    }

    /// Deletes the stream's messages of sequences `seqs`, all at once.
    pub(super) async fn delete_messages(
        &self,
        seqs: impl Iterator<Item = u64>,
    ) -> Result<(), String> {
        let sent = seqs.map(|s| self.msgs.delete_message(s));
        for r in futures_util::future::join_all(sent).await {
            // Already gone (its session ended, or deleted before) is fine.
            if let Err(e) = r {
                if !e.to_string().contains("no message found") {
                    return Err(e.to_string());
                }
            }
        }
        Ok(())
    }

    fn remember(&self, client_id: &Arc<str>, seq: u64, js_seq: u64) {
        let mut seqs = self.seqs();
        let of = seqs.stored.entry(client_id.clone()).or_default();
        of.insert(seq, js_seq);
    }

    fn forget_seq(&self, client_id: &str, seq: u64) -> Option<u64> {
        let mut seqs = self.seqs();
        let of = seqs.stored.get_mut(client_id)?;
        let js_seq = of.remove(&seq);
        if of.is_empty() {
            seqs.stored.remove(client_id);
        }
        js_seq
    }

    /// Whether message `seq` of `client_id` is in the stream already.
    fn in_stream(&self, client_id: &str, seq: u64) -> bool {
        let seqs = self.seqs();
        seqs.stored
            .get(client_id)
            .is_some_and(|of| of.contains_key(&seq))
    }

    /// A shard adopted `client_id`'s session from the fleet (`shard/adopt.rs`,
    /// `Op::Adopted`): its messages, now under the local sequences given, are the
    /// stream's messages of the stream sequences given, and those of `qos2_out` have
    /// their QoS 2 state in the bucket.
    fn adopted(&self, client_id: &Arc<str>, local_and_stream: &[(u64, u64)], qos2_out: &[u64]) {
        let mut seqs = self.seqs();
        if !local_and_stream.is_empty() {
            let of = seqs.stored.entry(client_id.clone()).or_default();
            of.extend(local_and_stream.iter().copied());
        }
        if !qos2_out.is_empty() {
            let of = seqs.qos2_out.entry(client_id.clone()).or_default();
            of.extend(qos2_out.iter().copied());
        }
    }

    /// `client_id`'s session ended here: the fleet's copy is purged if it is this
    /// node's; a session handed over, or a stale copy (the registry names another node),
    /// leaves it, and only what this node knew of its stream messages goes.
    async fn gone(&self, client_id: &Arc<str>) -> Result<(), Failed> {
        if self.moved(client_id) {
            return Ok(());
        }
        if self.still_ours(client_id).await? {
            self.purge(client_id)
                .await
                .map_err(|e| (client_id.clone(), e))?;
        } else {
            self.forget_client(client_id);
        }
        Ok(())
    }

    /// What this node knows of `client_id`'s messages in the stream, forgotten.
    fn forget_client(&self, client_id: &str) {
        let mut seqs = self.seqs();
        seqs.stored.remove(client_id);
        seqs.qos2_out.remove(client_id);
    }

    /// Whether `client_id`'s session ended here because another node resumes it: then
    /// what this node wrote for it is all in JetStream by now, which the handover hears.
    fn moved(&self, client_id: &str) -> bool {
        let Some(done) = self.seqs().moving.remove(client_id) else {
            return false;
        };
        self.forget_client(client_id);
        let _ = done.send(());
        true
    }

    /// Whether the fleet's copy of `client_id`'s session, which ended here, is this
    /// node's to purge: the registry names this node or nobody. A node that held a stale
    /// copy (cut off from NATS while another node resumed the session) leaves the live
    /// one alone.
    async fn still_ours(&self, client_id: &Arc<str>) -> Result<bool, Failed> {
        let holder = self.link.registry.holder(client_id).await;
        let holder = holder.map_err(|e| (client_id.clone(), format!("registry: {e}")))?;
        let ours = holder.is_none_or(|n| *n == *self.link.node);
        if !ours {
            tracing::info!(%client_id, "cluster: a stale copy of a session resumed on another node ended here; the fleet's copy stays");
        }
        Ok(ours)
    }

    /// Ends everything the fleet keeps for `client_id`: each of its queued messages
    /// deleted by its stream sequence (and the outbound QoS 2 key of a QoS 2 one
    /// removed), then its record emptied (which also hides a record of the older form,
    /// left in place).
    ///
    /// No purge by subject: nats-server 2.9 answers one by scanning the stream (10 ms
    /// for one subject, 27 ms for a session's prefix, at 100,000 keys; measured), which
    /// a restart's rewrite of every session, or a storm of ended sessions, would pay per
    /// session. These are direct operations: ~0.2 ms each at any size.
    pub async fn purge(&self, client_id: &str) -> Result<(), String> {
        self.forget_client(client_id);
        let queued = self.stream_messages(client_id).await?;
        let qos2 = queued.iter().filter_map(|(js_seq, payload)| {
            let (_, qos) = mirror::parse_message(payload, client_id)?;
            (qos == 2).then(|| self.remove_key(self.qos2_out_subject(client_id, *js_seq)))
        });
        let deletes = self.delete_messages(queued.iter().map(|(js_seq, _)| *js_seq));
        let (removed, deleted) = futures_util::join!(futures_util::future::join_all(qos2), deletes);
        deleted?;
        removed.into_iter().collect::<Result<(), String>>()?;
        // The record last: a purge that fails before it leaves the session in the
        // fleet, so the next one (a clean start again, the re-sync) tries again.
        let ack = self.empty_record(client_id).await?;
        ack.await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Publishes `client_id`'s record emptied (the fleet keeps no session for it, and
    /// older keys of it are hidden), with this node as its writer.
    async fn empty_record(&self, client_id: &str) -> Result<PublishAckFuture, String> {
        let subject = self.record_subject(client_id);
        let sent = (self.js).publish_with_headers(subject, self.record_headers(), Bytes::new());
        sent.await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_client_id_keys_fall_under_the_wills() {
        assert_eq!(super::key("will"), "=77ill");
        assert_eq!(super::key("wnode"), "=77node");
        assert_eq!(super::key("wills"), "wills");
        assert_eq!(super::key("w.ill"), "w=2Eill");
        assert_ne!(super::key("=77ill"), super::key("will"));
    }
}
