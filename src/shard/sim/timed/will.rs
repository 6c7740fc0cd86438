//! Will delay on a manual clock: a will waits its Will Delay Interval after an abnormal
//! close (not a tick less, at the coarse default tick), a client back within the delay
//! cancels it, and a session that ends before the delay sends it then (at once for a
//! session that ends with its connection).

use super::super::client::ConnectSpec;
use super::{assert_on_time, publishes, spec, subscribe, to_phase, Rig};

/// A watcher subscribed to `will/#`, and `id` connected with a QoS 1 will on
/// `will/<id>` of delay `delay` s and session expiry `expiry` s: (watcher, device).
fn watched_device(rig: &mut Rig, id: &str, delay: u32, expiry: u32) -> (usize, usize) {
    let (watcher, ..) = rig.connected(&spec("watcher", true, true, 0, 0));
    subscribe(rig, watcher, "will/#", 1);
    let topic = format!("will/{id}");
    let device = ConnectSpec {
        will: Some((&topic, 1, format!("will-of-{id}").into_bytes(), delay)),
        ..spec(id, true, true, 60, expiry)
    };
    let (dev, ..) = rig.connected(&device);
    (watcher, dev)
}

/// Moves the clock in steps of 100 ms until `watcher` gets a PUBLISH: after how long,
/// and their payloads.
fn wait_for_will(rig: &mut Rig, watcher: usize) -> (Option<u64>, Vec<Vec<u8>>) {
    let mut wills = Vec::new();
    let at = rig.until(100, 8000, |r| {
        wills.extend(publishes(r, watcher));
        !wills.is_empty()
    });
    (at, wills)
}

#[test]
fn a_will_waits_its_will_delay() {
    // The default 1 s tick, closed in the middle of a tick: a deadline rounded down to
    // the current tick would fire most of a tick early.
    let mut rig = Rig::new("");
    let (watcher, dev) = watched_device(&mut rig, "wd-1", 2, 10);
    to_phase(&mut rig, 600);
    rig.hang_up(dev);
    let (at, wills) = wait_for_will(&mut rig, watcher);
    assert_on_time("the delayed will", at, 2000, &rig, 100);
    assert_eq!(wills, vec![b"will-of-wd-1".to_vec()]);
}

#[test]
fn reconnecting_within_the_will_delay_cancels_the_will() {
    let mut rig = Rig::new("[shards]\ntick_ms = 100");
    let (watcher, dev) = watched_device(&mut rig, "wc-1", 2, 10);
    rig.hang_up(dev);
    rig.advance(500);
    let (_dev, present, _) = rig.connected(&spec("wc-1", true, false, 60, 10));
    assert!(present, "back within the session expiry");
    // Past the delay, and a few ticks: still no will.
    for _ in 0..40 {
        rig.advance(100);
        assert_eq!(
            publishes(&mut rig, watcher),
            Vec::<Vec<u8>>::new(),
            "will sent at {} ms although the client came back within the delay",
            rig.now
        );
    }
}

#[test]
fn the_will_is_sent_at_once_when_the_session_ends_before_the_delay() {
    let mut rig = Rig::new("[shards]\ntick_ms = 100");
    let (watcher, dev) = watched_device(&mut rig, "we-1", 5, 0);
    rig.hang_up(dev);
    // Session expiry 0 ends the session with its connection, so the will (delay 5 s)
    // goes then: within a tick, not after its delay.
    let mut wills = publishes(&mut rig, watcher);
    if wills.is_empty() {
        let (at, later) = wait_for_will(&mut rig, watcher);
        assert_on_time("the will of an ended session", at, 0, &rig, 100);
        wills = later;
    }
    assert_eq!(wills, vec![b"will-of-we-1".to_vec()]);
}

#[test]
fn a_will_waits_no_longer_than_its_session() {
    // Delay 5 s, session expiry 1 s: the will goes when the session ends.
    let mut rig = Rig::new("[shards]\ntick_ms = 100");
    let (watcher, dev) = watched_device(&mut rig, "wx-1", 5, 1);
    to_phase(&mut rig, 30);
    rig.hang_up(dev);
    let (at, wills) = wait_for_will(&mut rig, watcher);
    assert_on_time("the will at the session's end", at, 1000, &rig, 100);
    assert!(!rig.has_session("wx-1"), "the session ended with it");
    assert_eq!(wills, vec![b"will-of-wx-1".to_vec()]);
}
