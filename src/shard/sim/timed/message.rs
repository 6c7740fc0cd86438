//! Message expiry on a manual clock: a queued message's Message Expiry Interval counts
//! down while it waits for its offline session, and one that runs out is dropped and
//! counted, never sent.

use crate::metrics::DropReason;

use super::{spec, subscribe, Got, Rig};

/// A QoS 1 MQTT 5 PUBLISH (packet id 1) on `topic` with Message Expiry Interval `secs`.
fn expiring(topic: &str, payload: &str, secs: u32) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&1u16.to_be_bytes());
    // Properties: 5 bytes, Message Expiry Interval (0x02).
    body.extend_from_slice(&[5, 0x02]);
    body.extend_from_slice(&secs.to_be_bytes());
    body.extend_from_slice(payload.as_bytes());
    assert!(body.len() < 128, "a one-byte Remaining Length");
    let mut frame = vec![0x32, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

/// What `dev` got: (payload, remaining expiry) of each PUBLISH, each acknowledged.
fn received(rig: &mut Rig, dev: usize) -> Vec<(Vec<u8>, Option<u32>)> {
    let mut out = Vec::new();
    for g in rig.take(dev) {
        if let Got::Publish {
            pkid,
            payload,
            expiry,
            ..
        } = g
        {
            rig.client(dev).send_ack(0x40, pkid);
            out.push((payload, expiry));
        }
    }
    rig.settle();
    out
}

#[test]
fn message_expiry_counts_down_while_queued_and_expired_ones_are_dropped() {
    let mut rig = Rig::new("");
    let (dev, ..) = rig.connected(&spec("me-dev", true, true, 60, 60));
    subscribe(&mut rig, dev, "me/t", 1);
    rig.client(dev).send_disconnect();
    rig.settle();
    let (publisher, ..) = rig.connected(&spec("me-pub", true, true, 0, 0));
    rig.client(publisher)
        .send_frame(&expiring("me/t", "short-lived", 2));
    rig.settle();
    let dropped = |r: &Rig| {
        r.shard.services.metrics.dropped[DropReason::Expired as usize]
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    // Back after 1 s: delivered, with the interval minus the time it waited.
    rig.advance(1000);
    let (dev, present, _) = rig.connected(&spec("me-dev", true, false, 60, 60));
    assert!(present);
    assert_eq!(
        received(&mut rig, dev),
        vec![(b"short-lived".to_vec(), Some(1))],
        "remaining Message Expiry Interval after 1 s of 2"
    );
    rig.client(dev).send_disconnect();
    rig.settle();

    // Away for 3 s: the message expired in the queue and is never sent.
    rig.client(publisher)
        .send_frame(&expiring("me/t", "short-lived", 2));
    rig.settle();
    rig.advance(3000);
    let before = dropped(&rig);
    let (dev, present, _) = rig.connected(&spec("me-dev", true, false, 60, 60));
    assert!(present);
    assert_eq!(
        received(&mut rig, dev),
        vec![],
        "an expired message was delivered"
    );
    assert!(dropped(&rig) > before, "the expired message is counted");
}
