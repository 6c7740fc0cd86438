//! Unit tests of the store: value encodings round-trip, ops survive a reopen, a start
//! purges what expired.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{PublishProps, Version};
use crate::config::{StoreConfig, StoreDurability};
use crate::message::{Message, Origin};

use super::handle::Op;
use super::open::{now_ms, open};
use super::records::{
    decode_message, decode_session, decode_sub, encode_message, encode_session, encode_sub,
    RecordError,
};

#[test]
fn message_round_trips_with_props_and_expiry() {
    let now = Instant::now();
    let wall = now_ms();
    let mut m = Message::new(
        "a/b".into(),
        Bytes::from_static(b"hi"),
        1,
        false,
        Origin::Gateway,
    )
    .with_expiry_secs(Some(60));
    m.props = Some(Box::new(PublishProps {
        payload_format_indicator: Some(1),
        message_expiry: None,
        content_type: Some("text/plain".into()),
        response_topic: None,
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user_properties: vec![("k".into(), "v".into())],
    }));
    let mut buf = Vec::new();
    let key: [&[u8]; 2] = [b"dev-1", &7u64.to_le_bytes()];
    encode_message(&mut buf, &key, &m, 1, true, now, wall);
    let (back, qos) = decode_message(&buf, &key, now, wall).expect("decodes");
    assert_eq!(qos, 1);
    assert!(back.retain);
    assert_eq!(&*back.topic, "a/b");
    assert_eq!(&back.payload[..], b"hi");
    assert_eq!(back.props, m.props);
    let left = back.remaining_expiry_secs(now).expect("has expiry");
    assert!((59..=60).contains(&left), "{left}");
    // A truncated value is refused, not misread.
    let truncated = decode_message(&buf[..buf.len() - 1], &key, now, wall);
    assert_eq!(truncated.err(), Some(RecordError::Checksum));
}

#[test]
fn a_changed_byte_or_another_key_fails_the_checksum() {
    let (now, wall) = (Instant::now(), now_ms());
    let key: [&[u8]; 2] = [b"dev-1", &7u64.to_le_bytes()];
    let mut buf = Vec::new();
    encode_message(&mut buf, &key, &msg("a/b", None), 1, false, now, wall);
    let payload_at = buf.len() - 2; // the payload "p", before the "no properties" byte
    buf[payload_at] ^= 0x01;
    let refused = decode_message(&buf, &key, now, wall);
    assert_eq!(refused.err(), Some(RecordError::Checksum));
    buf[payload_at] ^= 0x01;
    let other: [&[u8]; 2] = [b"dev-1", &8u64.to_le_bytes()];
    let moved = decode_message(&buf, &other, now, wall);
    assert_eq!(moved.err(), Some(RecordError::Checksum));
    assert!(decode_message(&buf, &key, now, wall).is_ok());
    buf[0] = 9;
    let unknown = decode_message(&buf, &key, now, wall);
    assert_eq!(unknown.err(), Some(RecordError::Format(9)));

    encode_sub(&mut buf, "dev-1", "a/#", 1, 7);
    assert_eq!(decode_sub(&buf, "dev-1", "a/#"), Ok((1, 7)));
    assert_eq!(decode_sub(&buf, "dev-1", "b/#"), Err(RecordError::Checksum));
}

/// Values of a store written before checksums (format 1, 5-byte subscriptions) still
/// load, without a check.
#[test]
fn values_written_before_checksums_still_decode() {
    let (now, wall) = (Instant::now(), now_ms());
    let key: [&[u8]; 1] = [b"r/1"];
    let mut buf = Vec::new();
    encode_message(&mut buf, &key, &msg("r/1", None), 1, true, now, wall);
    let old = unchecked(&buf);
    let (m, qos) = decode_message(&old, &[b"anything"], now, wall).expect("format 1 decodes");
    assert_eq!((&*m.topic, &m.payload[..], qos), ("r/1", &b"p"[..], 1));
    encode_session(&mut buf, "dev-1", Version::V311, 60, 5);
    let s = decode_session(&unchecked(&buf), "dev-1").expect("format 1 decodes");
    assert_eq!(
        (s.version, s.expiry_secs, s.offline_since_ms),
        (Version::V311, 60, 5)
    );
    assert_eq!(decode_sub(&[1, 7, 0, 0, 0], "dev-1", "a/#"), Ok((1, 7)));
}

/// The format 1 form of a value encoded now: format byte 1, no checksum.
fn unchecked(value: &[u8]) -> Vec<u8> {
    let mut old = vec![1u8];
    old.extend_from_slice(&value[5..]);
    old
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        enabled: true,
        path: dir.to_path_buf(),
        durability: StoreDurability::Immediate,
        max_batch: 10_000,
        commit_interval_ms: 0,
        sync_interval_ms: 1000,
        queue_batches: 16,
        reopen_backoff_min_ms: 10,
        reopen_backoff_max_ms: 100,
        backlog_max_bytes: 16 << 20,
    }
}

fn msg(topic: &str, ttl: Option<u32>) -> Arc<Message> {
    Arc::new(
        Message::new(
            topic.into(),
            Bytes::from_static(b"p"),
            1,
            false,
            Origin::Gateway,
        )
        .with_expiry_secs(ttl),
    )
}

#[test]
fn ops_survive_reopen_and_start_purges_what_expired() {
    let dir = std::env::temp_dir().join(format!("gateway-store-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = config(&dir);
    let (store, loaded) = open(&cfg, 2).expect("opens");
    assert!(loaded.sessions.iter().all(Vec::is_empty));
    let mut h = store.handle().expect("handle");
    let id = |s: &str| -> Arc<str> { Arc::from(s) };
    let session = |c: &str, expiry: u32, since: u64| Op::Session {
        client_id: id(c),
        version: Version::V5,
        expiry_secs: expiry,
        offline_since_ms: since,
    };
    // "a" keeps a subscription and two of its three messages (one acknowledged).
    h.push(session("a", 3600, now_ms()));
    h.push(Op::Sub {
        client_id: id("a"),
        filter: id("a/#"),
        options: 1,
        sub_id: 7,
    });
    for (seq, t) in [(1, "a/1"), (2, "a/2"), (3, "a/3")] {
        h.push(Op::Message {
            client_id: id("a"),
            seq,
            msg: msg(t, None),
            qos: 1,
            retain: false,
        });
    }
    h.push(Op::DeleteMessage {
        client_id: id("a"),
        seq: 2,
    });
    // "b" ended: its rows go with it. "c" expired while offline. "d"'s message expired.
    h.push(session("b", 3600, 0));
    h.push(Op::Sub {
        client_id: id("b"),
        filter: id("b/x"),
        options: 1,
        sub_id: 0,
    });
    h.push(Op::DeleteSession(id("b")));
    h.push(session("c", 1, 1));
    h.push(session("d", crate::session::NEVER_EXPIRES, 1));
    h.push(Op::Message {
        client_id: id("d"),
        seq: 9,
        msg: msg("d/1", Some(0)),
        qos: 1,
        retain: false,
    });
    h.push(Op::Retained(msg("r/1", None)));
    h.push(Op::Retained(msg("r/2", None)));
    h.push(Op::DeleteRetained(id("r/2")));
    h.close();
    store.close(Duration::from_secs(10));

    let (store, loaded) = open(&cfg, 1).expect("reopens");
    let sessions = &loaded.sessions[0];
    let names: Vec<&str> = sessions.iter().map(|s| &*s.client_id).collect();
    assert_eq!(names, ["a", "d"]);
    let a = &sessions[0];
    assert_eq!(a.expiry_secs, 3600);
    assert_eq!(a.subs.len(), 1);
    assert_eq!((&*a.subs[0].0, a.subs[0].1, a.subs[0].2), ("a/#", 1, 7));
    let seqs: Vec<u64> = a.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 3]);
    assert_eq!(&*a.messages[1].msg.topic, "a/3");
    assert!(sessions[1].messages.is_empty(), "expired message purged");
    assert_eq!(loaded.retained.len(), 1);
    assert_eq!(&*loaded.retained[0].topic, "r/1");
    assert_eq!(
        loaded.next_seq, 10,
        "sequences continue after the highest seen"
    );
    store.close(Duration::from_secs(10));
    // The purge was committed: a third open finds the same, and no "c" or "d/1".
    let (store, again) = open(&cfg, 1).expect("opens again");
    assert_eq!(again.sessions[0].len(), 2);
    store.close(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn session_round_trips() {
    let mut buf = Vec::new();
    encode_session(&mut buf, "dev-1", Version::V5, 3600, 12345);
    let r = decode_session(&buf, "dev-1").expect("decodes");
    assert_eq!(r.version, Version::V5);
    assert_eq!(r.expiry_secs, 3600);
    assert_eq!(r.offline_since_ms, 12345);
    assert_eq!(
        decode_session(&[9, 5], "dev-1").err(),
        Some(RecordError::Format(9))
    );
}

/// A store of `n` persistent sessions, each with a subscription and one queued message
/// whose payload is 200 × `A`, closed; returns the file's bytes.
fn store_of_sessions(dir: &Path, n: u64) -> Vec<u8> {
    let (store, _) = open(&config(dir), 1).expect("opens");
    let mut h = store.handle().expect("handle");
    for i in 0..n {
        let id: Arc<str> = Arc::from(format!("dev-{i:04}").as_str());
        h.push(Op::Session {
            client_id: id.clone(),
            version: Version::V311,
            expiry_secs: 3600,
            offline_since_ms: now_ms(),
        });
        h.push(Op::Sub {
            client_id: id.clone(),
            filter: Arc::from(format!("cmd/{i}").as_str()),
            options: 1,
            sub_id: 0,
        });
        let m = Message::new(
            "cmd/x".into(),
            Bytes::from(vec![b'A'; 200]),
            1,
            false,
            Origin::Gateway,
        );
        h.push(Op::Message {
            client_id: id,
            seq: i + 1,
            msg: Arc::new(m),
            qos: 1,
            retain: false,
        });
    }
    h.close();
    store.close(Duration::from_secs(10));
    std::fs::read(dir.join(super::FILE_NAME)).expect("store file")
}

/// Issue 17 item 9: random damage to a real store file. redb panics on some of it (an
/// index past a page, a key that is not UTF-8): each such open must come back as the
/// store error, and a store that does open must not hand out a changed payload.
#[test]
fn random_damage_never_panics_out_of_open_nor_loads_a_changed_payload() {
    let base = std::env::temp_dir().join(format!("gateway-store-damage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let original = store_of_sessions(&base.join("original"), 300);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut opened, mut caught) = (0, 0);
    for trial in 0..40 {
        let mut bytes = original.clone();
        for _ in 0..16 {
            let at = random() as usize % bytes.len();
            bytes[at] = random() as u8;
        }
        let dir = base.join(format!("trial-{trial}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(super::FILE_NAME), &bytes).expect("write");
        match open(&config(&dir), 1) {
            Ok((store, loaded)) => {
                opened += 1;
                store.close(Duration::from_secs(10));
                for m in loaded.sessions[0].iter().flat_map(|s| &s.messages) {
                    assert_eq!(&m.msg.payload[..], &[b'A'; 200][..], "trial {trial}");
                }
            }
            Err(e) => {
                assert!(!e.in_use(), "trial {trial}: {e}");
                caught += usize::from(e.message.starts_with("reading it failed"));
            }
        }
    }
    assert!(
        caught > 0,
        "no redb panic was caught: the test lost its point"
    );
    assert!(
        opened > 0,
        "no damaged store opened: the payload check lost its point"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// QoS 2 state (issue 24 part 3): the packet id and PUBREL state of an outbound message
/// and the inbound packet ids survive a reopen; a message's state goes with the message;
/// state whose message or session is gone is deleted at start.
#[test]
fn qos2_state_survives_reopen_and_goes_with_its_message() {
    let dir = std::env::temp_dir().join(format!("gateway-store-qos2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = config(&dir);
    let (store, _) = open(&cfg, 1).expect("opens");
    let mut h = store.handle().expect("handle");
    let id = |s: &str| -> Arc<str> { Arc::from(s) };
    h.push(Op::Session {
        client_id: id("q"),
        version: Version::V311,
        expiry_secs: crate::session::NEVER_EXPIRES,
        offline_since_ms: now_ms(),
    });
    for seq in [1, 2, 3] {
        let m = Message::new("q/t".into(), Bytes::new(), 2, false, Origin::Gateway);
        h.push(Op::Message {
            client_id: id("q"),
            seq,
            msg: Arc::new(m),
            qos: 2,
            retain: false,
        });
    }
    let out = |seq: u64, pkid: u16, released: bool| Op::Qos2Out {
        client_id: id("q"),
        seq,
        pkid,
        released,
    };
    h.push(out(1, 41, false));
    h.push(out(1, 41, true));
    h.push(out(2, 42, false));
    h.push(out(3, 43, false));
    h.push(Op::DeleteMessage {
        client_id: id("q"),
        seq: 3,
    });
    h.push(out(9, 49, false)); // no such message: deleted at start
    for pkid in [7, 8] {
        h.push(Op::Qos2In {
            client_id: id("q"),
            pkid,
        });
    }
    h.push(Op::DeleteQos2In {
        client_id: id("q"),
        pkid: 8,
    });
    h.push(Op::Qos2In {
        client_id: id("gone"),
        pkid: 5,
    });
    h.close();
    store.close(Duration::from_secs(10));

    for _ in 0..2 {
        let (store, loaded) = open(&cfg, 1).expect("reopens");
        let q = &loaded.sessions[0][0];
        let state: Vec<(u64, Option<(u16, bool)>)> =
            q.messages.iter().map(|m| (m.seq, m.inflight)).collect();
        assert_eq!(state, [(1, Some((41, true))), (2, Some((42, false)))]);
        assert_eq!(q.inbound_qos2, [7]);
        store.close(Duration::from_secs(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shard's backlog: past `backlog_max_bytes` (this turn's ops counted) pushes are
/// refused with `store_backlog`, and the shard hears once when the writer's commits
/// brought it back under; a store that is down is named first.
#[test]
fn a_backlog_past_its_bound_refuses_until_the_writer_finishes_it() {
    use std::sync::atomic::Ordering::Relaxed;

    use super::handle::{CommitSignal, StoreHandle, REFUSED_BACKLOG, REFUSED_DOWN};
    use super::metrics::StoreMetrics;

    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let metrics = Arc::new(StoreMetrics::new("x".into()));
    let mut h = StoreHandle {
        tx,
        pending: Default::default(),
        backlog: Default::default(),
        next_seq: 0,
        puts: 0,
        batch_seq: 0,
        signal: Arc::new(CommitSignal::default()),
        metrics: metrics.clone(),
        pending_bytes: 0,
        pending_fleet_only: 0,
        backlog_max: 1000,
        was_over: false,
    };
    let op = |n: u64| Op::Message {
        client_id: "c".into(),
        seq: n,
        msg: msg("t", None),
        qos: 1,
        retain: false,
    };
    for n in 0..10 {
        h.push(op(n));
    }
    assert_eq!(h.refusal(), None, "10 small ops are under 1000 bytes");
    for n in 10..20 {
        h.push(op(n));
    }
    assert_eq!(h.refusal(), Some(REFUSED_BACKLOG), "this turn's ops count");
    assert!(!h.flush(), "the channel took the batch");
    assert!(!h.back_under_bound(), "still over once handed over");
    assert_eq!(h.refusal(), Some(REFUSED_BACKLOG));
    metrics.set_up(false);
    assert_eq!(h.refusal(), Some(REFUSED_DOWN), "down is named first");
    metrics.set_up(true);
    // The writer commits it.
    let batch = rx.try_recv().expect("batch");
    assert_eq!(batch.ops.len(), 20);
    let mut text = String::new();
    metrics.render(&mut text);
    // 20 × (client id, topic, payload: 1 byte each, + 64).
    assert!(
        text.contains("gateway_store_backlog_bytes 1340\n"),
        "{text}"
    );
    batch.finish(true, &metrics);
    text.clear();
    metrics.render(&mut text);
    assert!(text.contains("gateway_store_backlog_bytes 0\n"), "{text}");
    assert!(
        text.contains("gateway_store_backlog_peak_bytes 1340\n"),
        "{text}"
    );
    assert_eq!(h.signal().outstanding_bytes.load(Relaxed), 0);
    assert_eq!(h.refusal(), None);
    assert!(h.back_under_bound(), "told once");
    assert!(!h.back_under_bound());
}

/// A will is the fleet's copy only (`Op::Will`): a CONNACK does not wait for it (it is
/// not counted as a change of this turn), and a group of nothing else commits nothing.
#[test]
fn a_will_alone_is_not_waited_for_and_commits_nothing() {
    use std::sync::atomic::Ordering::Relaxed;

    let dir = std::env::temp_dir().join(format!("gateway-store-will-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (store, _) = open(&config(&dir), 1).expect("opens");
    let mut h = store.handle().expect("handle");
    let will = |w: Option<&str>| Op::Will {
        client_id: Arc::from("c"),
        will: w.map(|t| {
            Box::new(crate::codec::Will {
                topic: t.into(),
                payload: Default::default(),
                qos: 1,
                retain: false,
                delay_secs: 0,
                props: None,
            })
        }),
    };
    let finished = |h: &super::handle::StoreHandle, seq: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.signal.done.load(Relaxed) < seq {
            assert!(
                std::time::Instant::now() < deadline,
                "batch {seq} never finished"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    h.push(will(Some("w/c")));
    h.push(will(None));
    assert_eq!(h.pending_ops(), 0, "a will is not a durable change");
    let seq = h.pending_seq();
    assert!(!h.flush(), "the channel took the batch");
    finished(&h, seq);
    assert_eq!(h.metrics.commits.get(), 0, "a transaction for wills alone");
    h.push(will(Some("w/c")));
    h.push(Op::DeleteSession(Arc::from("c")));
    assert_eq!(h.pending_ops(), 1, "the session's deletion is");
    let seq = h.pending_seq();
    assert!(!h.flush());
    finished(&h, seq);
    assert_eq!(h.metrics.commits.get(), 1);
    h.close();
    store.close(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Records the kinds of the ops the writer hands its mirror.
struct Recording(
    std::sync::Mutex<Vec<&'static str>>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl super::mirror::Mirror for Arc<Recording> {
    fn changes(&self, ops: &[&Op]) {
        let kinds = ops.iter().map(|op| match op {
            Op::LocalOnly(_) => "local only",
            Op::Adopted { .. } => "adopted",
            _ => "other",
        });
        self.0.lock().unwrap().extend(kinds);
        self.1.store(true, std::sync::atomic::Ordering::Release);
    }
    fn answers(&self, _: Vec<super::DeferredReply>) {}
}

/// A session adopted from the fleet (`shard/adopt.rs`): its `LocalOnly` ops are written
/// to the file like any, and handed to the mirror as such (which writes nothing of them
/// back to the fleet); `Adopted` goes to the mirror only and is no durable change.
#[test]
fn an_adopted_sessions_ops_are_written_here_and_only_its_mapping_reaches_the_mirror() {
    let dir = std::env::temp_dir().join(format!("gateway-store-adopt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = config(&dir);
    let (store, _) = open(&cfg, 1).expect("opens");
    let seen = Arc::new(Recording(Default::default(), Default::default()));
    store.set_mirror(Box::new(seen.clone()));
    let mut h = store.handle().expect("handle");
    let id: Arc<str> = Arc::from("adopted");
    let local = |op| Op::LocalOnly(Box::new(op));
    h.push(Op::Adopted {
        client_id: id.clone(),
        local_and_stream: vec![(5, 77)],
        qos2_out: Vec::new(),
    });
    assert_eq!(h.pending_ops(), 0, "the mapping is the mirror's only");
    h.push(local(Op::Session {
        client_id: id.clone(),
        version: Version::V5,
        expiry_secs: 3600,
        offline_since_ms: now_ms(),
    }));
    h.push(local(Op::Sub {
        client_id: id.clone(),
        filter: Arc::from("t/#"),
        options: 1,
        sub_id: 0,
    }));
    h.push(local(Op::Message {
        client_id: id.clone(),
        seq: 5,
        msg: msg("t/1", None),
        qos: 1,
        retain: false,
    }));
    assert_eq!(h.pending_ops(), 3);
    assert_eq!(h.puts, 1, "a message stored, wrapped or not");
    h.close();
    store.close(Duration::from_secs(10));
    assert!(seen.1.load(std::sync::atomic::Ordering::Acquire));
    let kinds = seen.0.lock().unwrap().clone();
    assert_eq!(kinds, ["adopted", "local only", "local only", "local only"]);

    let (store, loaded) = open(&cfg, 1).expect("reopens");
    let s = &loaded.sessions[0][0];
    assert_eq!(
        (&*s.client_id, s.expiry_secs, s.subs.len()),
        ("adopted", 3600, 1)
    );
    assert_eq!(s.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [5]);
    store.close(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}
