//! Keep-alive and the connect timeout on a manual clock: a silent connection is closed at
//! 1.5 × its keep-alive (told 0x8D in MQTT 5), keep-alive 0 means the cap, PINGREQs keep
//! a connection open, a socket that never sends CONNECT is closed at the connect timeout,
//! thousands expiring at once are closed in bounded batches without starving a live
//! client, and a publisher the shard holds (pacing) is not closed for its silence.

use crate::metrics::DisconnectReason;

use super::{assert_on_time, ping, spec, to_phase, Got, Rig};

#[test]
fn keep_alive_zero_means_the_cap_and_a_v5_client_is_told_0x8d() {
    let mut rig = Rig::new("[mqtt]\nmax_keepalive_secs = 2\n[shards]\ntick_ms = 100");
    let (dev, _, keep_alive) = rig.connected(&spec("ka-zero", true, true, 0, 0));
    assert_eq!(
        keep_alive,
        Some(2),
        "keep-alive 0 is replaced by max_keepalive_secs"
    );
    let at = rig.until(50, 10_000, |r| {
        r.disconnects(DisconnectReason::Keepalive) > 0
    });
    assert_on_time("keep-alive close", at, 3000, &rig, 50);
    let got = rig.take(dev);
    assert!(
        matches!(got.as_slice(), [Got::Disconnect(0x8D)]),
        "DISCONNECT 0x8D (keep-alive timeout), got {got:?}"
    );
    // It lingers in its close grace at most, then its socket is closed.
    rig.advance(2000);
    assert!(rig.closed(dev), "socket closed after the DISCONNECT");
    assert_eq!(rig.connections(), 0);
}

#[test]
fn a_silent_client_expires_at_one_and_a_half_keep_alives_at_any_phase_of_the_tick() {
    // The default tick of 1 s: a deadline rounded the wrong way would be most of a tick
    // early.
    let mut rig = Rig::new("");
    assert_eq!(rig.tick_ms(), 1000);
    for (n, phase) in [0, 300, 600, 999].into_iter().enumerate() {
        to_phase(&mut rig, phase);
        let id = format!("silent-{n}");
        let (dev, ..) = rig.connected(&spec(&id, false, true, 2, 0));
        let at = rig.until(100, 8000, |r| r.closed(dev));
        assert_on_time(
            &format!("{id} (phase {phase} ms) closed"),
            at,
            3000,
            &rig,
            100,
        );
        assert_eq!(
            rig.disconnects(DisconnectReason::Keepalive),
            n as u64 + 1,
            "closed for keep-alive"
        );
    }
}

#[test]
fn a_client_that_pings_within_its_keep_alive_stays_connected() {
    let mut rig = Rig::new("");
    let (dev, ..) = rig.connected(&spec("pinger", false, true, 2, 0));
    // A PINGREQ every 2.9 s (under 1.5 × 2 s) for 20 s.
    for _ in 0..7 {
        rig.advance(2900);
        assert!(!rig.closed(dev), "closed while pinging at {} ms", rig.now);
        ping(&mut rig, dev);
    }
    assert_eq!(rig.disconnects(DisconnectReason::Keepalive), 0);
    assert_eq!(rig.connections(), 1);
    // And silent from now on, it goes 1.5 × 2 s after its last PINGREQ.
    let at = rig.until(100, 8000, |r| r.closed(dev));
    assert_on_time("closed after the last PINGREQ", at, 3000, &rig, 100);
}

#[test]
fn a_socket_that_sends_no_connect_is_closed_after_connect_timeout_secs() {
    let mut rig = Rig::new("[mqtt]\nconnect_timeout_secs = 1\n[shards]\ntick_ms = 100");
    to_phase(&mut rig, 50);
    let dev = rig.open(false);
    let at = rig.until(50, 5000, |r| r.closed(dev));
    assert_on_time("silent socket closed", at, 1000, &rig, 50);
    assert_eq!(rig.disconnects(DisconnectReason::ConnectTimeout), 1);
    assert_eq!(rig.connections(), 0);
}

/// 2,000 clients with keep-alive 1 s go silent at the same moment on a shard whose wheel
/// fires at most 64 timers per batch; one live client pings through the storm.
#[test]
fn a_mass_keep_alive_expiry_closes_all_in_bounded_batches_and_never_starves_a_live_client() {
    const N: usize = 2000;
    const BATCH: u64 = 64;
    // 2,000 client sockets and 2,000 shard sockets live in this process.
    let _ = crate::doctor::raise_nofile_limit();
    let mut rig = Rig::new(
        "[shards]\ntick_ms = 100\nexpiry_batch = 64\n[limits]\nmax_connect_rate = 0\nmax_handshaking = 0",
    );
    let (live, ..) = rig.connected(&spec("live", false, true, 5, 0));
    let silent = rig.connect_many(N, |k| (format!("silent-{k}"), 1));
    for i in silent.clone() {
        assert!(
            matches!(rig.take(i).as_slice(), [Got::ConnAck { code: 0, .. }]),
            "silent-{i} accepted"
        );
    }
    assert_eq!(rig.connections(), N + 1);
    // Just before 1.5 s of silence nothing is due; then all are at once.
    rig.advance(1500);
    assert_eq!(rig.disconnects(DisconnectReason::Keepalive), 0);
    ping(&mut rig, live);
    rig.move_clock(100);
    // Turn by turn: at most one batch closed per turn, and the live client's PINGREQ,
    // sent before each turn, answered by the end of it.
    let mut turns = 0;
    while rig.disconnects(DisconnectReason::Keepalive) < N as u64 {
        let before = rig.disconnects(DisconnectReason::Keepalive);
        rig.client(live).send_ping();
        rig.turn();
        rig.pump();
        turns += 1;
        let closed = rig.disconnects(DisconnectReason::Keepalive) - before;
        assert!(
            closed <= BATCH,
            "turn {turns} closed {closed}, batch {BATCH}"
        );
        let got = rig.take(live);
        assert!(
            matches!(got.as_slice(), [Got::Other(s)] if s == "PingResp"),
            "turn {turns} ({before} closed before it): live client got {got:?}"
        );
        assert!(turns < 10 * N, "the storm never ends");
    }
    assert!(
        turns as u64 >= N as u64 / BATCH,
        "{N} closed in {turns} turns: more than a batch of {BATCH} a turn"
    );
    rig.settle();
    assert!(
        silent.clone().all(|i| rig.closed(i)),
        "every silent client saw its socket closed"
    );
    ping(&mut rig, live);
    assert_eq!(rig.connections(), 1, "only the live client is left");
}

/// A publisher held at a PUBLISH for a congested subscriber (`pacing.rs`) is silent
/// because of the shard: held longer than 1.5 × its keep-alive, it is neither closed for
/// keep-alive nor shed, and everything arrives once the subscriber reads.
#[test]
fn a_held_publisher_of_large_messages_is_neither_timed_out_nor_shed() {
    const N: u32 = 24;
    let mut rig = Rig::new(
        "[tcp]\nsend_buffer_bytes = 4096\n[buffers]\noutbound_high_watermark = 8192\noutbound_low_watermark = 2048\n[limits]\npublish_rate = 0\nbytes_rate = 0",
    );
    let (sub, ..) = rig.connected(&spec("slowpoke", false, true, 60, 0));
    super::subscribe(&mut rig, sub, "flood", 0);
    rig.set_reading(sub, false);
    // A publisher with a 2 s keep-alive that never sends PINGREQ. Frames of 100 KiB span
    // reads (a read takes at most 64 KiB): each must wait as a whole.
    let (publisher, ..) = rig.connected(&spec("bigpub", false, true, 2, 0));
    let mut payload = vec![7u8; 100 * 1024];
    for i in 0..N {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        let frame = rig.client(publisher).publish_frame("flood", 0, 0, &payload);
        rig.queue(publisher, &frame);
    }
    rig.settle();
    let metrics = rig.shard.services.metrics.clone();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        load(&metrics.publisher_pauses) >= 1,
        "the publisher is held"
    );
    // Held for longer than 1.5 times its keep-alive, and not closed for it.
    for _ in 0..40 {
        rig.advance(100);
        assert!(
            !rig.closed(publisher),
            "held publisher closed at {} ms",
            rig.now
        );
    }
    let handled = load(&metrics.packets_received[3]);
    assert!(
        handled < u64::from(N),
        "the publisher is still held ({handled} read)"
    );
    assert_eq!(rig.disconnects(DisconnectReason::Keepalive), 0);
    // The subscriber reads: everything arrives, in order, nothing shed.
    rig.set_reading(sub, true);
    let mut got = Vec::new();
    for _ in 0..100 {
        rig.settle();
        for g in rig.take(sub) {
            if let Got::Publish { payload, .. } = g {
                got.push(u32::from_be_bytes(payload[..4].try_into().expect("id")));
            }
        }
        if got.len() == N as usize {
            break;
        }
        rig.advance(100);
    }
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    let shed = load(&metrics.dropped[crate::metrics::DropReason::SlowConsumer as usize]);
    assert_eq!(shed, 0, "nothing shed");
}
