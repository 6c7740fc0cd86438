//! The shard's timers, tested on a manual clock (`rig.rs`) instead of wall time: keep-alive
//! (`keepalive.rs`: the 1.5 × rule, keep-alive 0, PINGREQ, the connect timeout, a mass
//! expiry in bounded batches), session expiry (`expiry.rs`), will delay (`will.rs`),
//! message expiry (`message.rs`) and the write stall (`stall.rs`). Each test moves the clock in small steps and asserts
//! when, to the step, a timer acted: never before its time, at most a tick after it.
//!
//! Run with `cargo test --lib shard::sim::timed`.

mod expiry;
mod keepalive;
mod message;
mod stall;
mod will;

use super::client::ConnectSpec;
use super::rig::{Got, Rig};

/// A CONNECT without a will (Receive Maximum 10 in MQTT 5).
fn spec(client_id: &str, v5: bool, clean: bool, keep_alive: u16, expiry: u32) -> ConnectSpec<'_> {
    ConnectSpec {
        client_id,
        v5,
        clean,
        keep_alive,
        expiry,
        receive_max: 10,
        will: None,
    }
}

/// Client `i` subscribes to `filter` at `qos` and gets its SUBACK.
fn subscribe(rig: &mut Rig, i: usize, filter: &str, qos: u8) {
    rig.client(i).send_subscribe(1, filter, qos);
    rig.settle();
    let got = rig.take(i);
    assert!(
        matches!(got.as_slice(), [Got::Other(s)] if s.starts_with("SubAck")),
        "SUBACK for {filter}: {got:?}"
    );
}

/// Publishes one QoS 1 message from a short-lived MQTT 3.1.1 client (whose session ends
/// with it), and checks its PUBACK.
fn publish_once(rig: &mut Rig, topic: &str, payload: &[u8]) {
    let (p, ..) = rig.connected(&spec("", false, true, 30, 0));
    rig.client(p).send_publish(topic, 1, 1, payload);
    rig.settle();
    let got = rig.take(p);
    assert!(
        matches!(got.as_slice(), [Got::Other(s)] if s.starts_with("PubAck")),
        "PUBACK: {got:?}"
    );
    rig.client(p).send_disconnect();
    rig.settle();
}

/// The payloads of the PUBLISHes client `i` got since the last `take`; acknowledges
/// each QoS 1 one.
fn publishes(rig: &mut Rig, i: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for g in rig.take(i) {
        if let Got::Publish {
            qos, pkid, payload, ..
        } = g
        {
            if qos == 1 {
                rig.client(i).send_ack(0x40, pkid);
            }
            out.push(payload);
        }
    }
    rig.settle();
    out
}

/// Client `i` sends PINGREQ and gets PINGRESP.
fn ping(rig: &mut Rig, i: usize) {
    rig.client(i).send_ping();
    rig.settle();
    let got = rig.take(i);
    assert!(
        matches!(got.as_slice(), [Got::Other(s)] if s == "PingResp"),
        "PINGRESP at {} ms, got {got:?}",
        rig.now
    );
}

/// Moves the clock so that it is `phase` ms into a tick.
fn to_phase(rig: &mut Rig, phase: u64) {
    let tick = rig.tick_ms();
    let ms = (tick + phase - rig.now % tick) % tick;
    if ms > 0 {
        rig.advance(ms);
    }
}

/// Asserts a timer acted `at` ms after its start: not before `due` ms, at most one
/// tick (plus the test's step) after.
fn assert_on_time(what: &str, at: Option<u64>, due: u64, rig: &Rig, step: u64) {
    let at = at.unwrap_or_else(|| panic!("{what}: never happened"));
    let tick = rig.tick_ms();
    assert!(
        (due..=due + tick + step).contains(&at),
        "{what} after {at} ms: due at {due} ms, at most one tick ({tick} ms) late"
    );
}
