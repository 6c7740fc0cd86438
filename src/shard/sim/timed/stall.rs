//! The write stall on a manual clock: a subscriber that stops reading is closed
//! `write_stall_timeout_secs` after its socket stopped taking bytes, and no one else.

use crate::metrics::{DisconnectReason, DropReason};

use super::{assert_on_time, ping, spec, subscribe, Rig};

#[test]
fn a_subscriber_that_stops_reading_is_closed_for_write_stall() {
    // No inbound rate limits: on a clock that stands still the publisher would be
    // paused for good.
    let mut rig = Rig::new(
        "[mqtt]\nwrite_stall_timeout_secs = 2\n[shards]\ntick_ms = 100\n[tcp]\nsend_buffer_bytes = 4096\n[buffers]\nslow_consumer = \"drop\"\n[limits]\npublish_rate = 0\nbytes_rate = 0",
    );
    let (stalled, ..) = rig.connected(&spec("stalled", false, true, 60, 0));
    subscribe(&mut rig, stalled, "firehose", 0);
    rig.set_reading(stalled, false);
    let (publisher, ..) = rig.connected(&spec("firehose-pub", false, true, 0, 0));
    // Far more than the stalled client's socket buffers and the shard's watermarks hold.
    let payload = vec![0x42u8; 8 * 1024];
    for _ in 0..200 {
        for _ in 0..10 {
            rig.client(publisher)
                .send_publish("firehose", 0, 0, &payload);
        }
        rig.settle();
    }
    let slow = rig.shard.services.metrics.dropped[DropReason::SlowConsumer as usize]
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        slow > 0,
        "QoS 0 above the high watermark is dropped and counted"
    );
    let at = rig.until(50, 15_000, |r| {
        r.disconnects(DisconnectReason::WriteStall) > 0
    });
    assert_on_time("write stall close", at, 2000, &rig, 50);
    assert_eq!(rig.disconnects(DisconnectReason::WriteStall), 1);
    // The publisher is still served.
    ping(&mut rig, publisher);
    // The stalled connection lingers in its close grace until it ends (it never closes
    // its side), then only the publisher is left.
    rig.advance(1100);
    assert_eq!(rig.connections(), 1, "only the stalled one was closed");
}
