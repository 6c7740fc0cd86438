//! Session expiry on a manual clock: an offline MQTT 5 session lives exactly its Session
//! Expiry Interval (to the tick, at any phase of a coarse tick), and a 3.1.1 persistent
//! session lasts `max_session_expiry_secs`; what was queued while it was offline is
//! delivered when it comes back in time.

use super::{assert_on_time, publish_once, publishes, spec, subscribe, to_phase, Rig};

/// Connects `id` (persistent), expects `present`, and returns the connection.
fn back(rig: &mut Rig, id: &str, v5: bool, expiry: u32, present: bool) -> usize {
    let (dev, got_present, _) = rig.connected(&spec(id, v5, false, 30, expiry));
    assert_eq!(
        got_present, present,
        "{id}: session present at {} ms",
        rig.now
    );
    dev
}

/// Disconnects `dev`, then moves the clock until `id`'s session is gone: after how long.
fn gone_after_disconnect(rig: &mut Rig, dev: usize, id: &str) -> Option<u64> {
    rig.client(dev).send_disconnect();
    rig.settle();
    assert!(rig.has_session(id), "{id}: session ended at the DISCONNECT");
    rig.until(10, 5000, |r| !r.has_session(id))
}

/// The life of a persistent session of expiry 2 s: kept across an absence of 1 s with
/// its queued message, ended 2 s after the next DISCONNECT (not a tick earlier).
fn two_second_session(rig: &mut Rig, id: &str, v5: bool) {
    // (Clean start in MQTT 5, where the expiry keeps the session; not in 3.1.1.)
    let (dev, present, _) = rig.connected(&spec(id, v5, v5, 30, 2));
    assert!(!present);
    subscribe(rig, dev, "sx/t", 1);
    rig.client(dev).send_disconnect();
    rig.settle();
    publish_once(rig, "sx/t", b"while-offline");

    rig.advance(1000);
    let dev = back(rig, id, v5, 2, true);
    assert_eq!(publishes(rig, dev), vec![b"while-offline".to_vec()]);

    let at = gone_after_disconnect(rig, dev, id);
    assert_on_time(&format!("{id}: session ended"), at, 2000, rig, 10);
    back(rig, id, v5, 2, false);
}

#[test]
fn a_v5_session_ends_at_its_expiry_to_the_tick() {
    let mut rig = Rig::new("[shards]\ntick_ms = 100");
    to_phase(&mut rig, 40);
    two_second_session(&mut rig, "sx-5", true);
}

#[test]
fn a_v311_persistent_session_lasts_max_session_expiry_secs() {
    let mut rig = Rig::new("[mqtt]\nmax_session_expiry_secs = 2\n[shards]\ntick_ms = 100");
    to_phase(&mut rig, 70);
    two_second_session(&mut rig, "sx-4", false);
}

#[test]
fn offline_session_timers_never_fire_early_with_a_coarse_tick() {
    // The default tick of 1 s: an expiry of 1 s must not end the session sooner, at
    // whatever phase of the tick the client leaves.
    let mut rig = Rig::new("");
    for phase in [0, 330, 660, 990] {
        to_phase(&mut rig, phase);
        let (dev, ..) = rig.connected(&spec("coarse", true, true, 30, 1));
        let at = gone_after_disconnect(&mut rig, dev, "coarse");
        assert_on_time(
            &format!("phase {phase} ms: session ended"),
            at,
            1000,
            &rig,
            10,
        );
    }
}
