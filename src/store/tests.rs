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
use super::records::{decode_message, decode_session, encode_message, encode_session};

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
    encode_message(&mut buf, &m, 1, true, now, wall);
    let (back, qos) = decode_message(&buf, now, wall).expect("decodes");
    assert_eq!(qos, 1);
    assert!(back.retain);
    assert_eq!(&*back.topic, "a/b");
    assert_eq!(&back.payload[..], b"hi");
    assert_eq!(back.props, m.props);
    let left = back.remaining_expiry_secs(now).expect("has expiry");
    assert!((59..=60).contains(&left), "{left}");
    // A truncated value is refused, not misread.
    assert!(decode_message(&buf[..buf.len() - 1], now, wall).is_none());
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
    encode_session(&mut buf, Version::V5, 3600, 12345);
    let r = decode_session(&buf).expect("decodes");
    assert_eq!(r.version, Version::V5);
    assert_eq!(r.expiry_secs, 3600);
    assert_eq!(r.offline_since_ms, 12345);
    assert!(decode_session(&[9, 5]).is_none());
}
