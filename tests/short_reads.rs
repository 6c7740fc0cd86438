//! A shard ends a readiness event's reads at the first short read (the socket had no
//! more), sparing the read that would only say `WouldBlock` — unless the event also
//! reported the peer's close: then it reads on to the end of stream, as no later event
//! would report it. Here each device sends its last PUBLISH and its FIN back to back,
//! so the data and the close usually arrive in one event: the PUBLISH must be delivered
//! and the close seen at once (the gateway closes its side), not at the keep-alive
//! deadline (90 s here).

mod common;

use std::time::Duration;

use common::{connect_from, Raw, TestServer};
use mqttbytes::v4::Packet;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(10);

async fn device(gw: &TestServer, i: usize, id: &str) -> Raw {
    let mut raw = Raw::from_stream(connect_from(i, gw.mqtt).await.expect("connect"));
    raw.send(&Raw::connect_v4(id, 60, true)).await;
    assert!(matches!(raw.recv_v4(T).await, Ok(Packet::ConnAck(_))));
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_bytes_and_the_close_in_one_go_are_both_handled_at_once() {
    let gw = TestServer::start("[limits]\npublish_rate = 0\nbytes_rate = 0\n");
    let mut watcher = device(&gw, 0, "watcher").await;
    watcher.send(&Raw::subscribe_v4("last/#", 0, 1)).await;
    assert!(matches!(watcher.recv_v4(T).await, Ok(Packet::SubAck(_))));
    for round in 0..20 {
        let id = format!("leaving-{round}");
        let mut dev = device(&gw, round + 1, &id).await;
        let topic = format!("last/{round}");
        let mut bytes = Raw::publish_v4(&topic, 0, 0, b"bye");
        // A PINGREQ too, so the last read is not one whole PUBLISH by chance.
        bytes.extend_from_slice(&[0xc0, 0x00]);
        dev.send(&bytes).await;
        dev.stream.shutdown().await.expect("FIN");
        match watcher.recv_v4(T).await {
            Ok(Packet::Publish(p)) => assert_eq!(p.topic, topic),
            other => panic!("round {round}: no PUBLISH on {topic}: {other:?}"),
        }
        assert!(
            dev.closed_within(T).await,
            "round {round}: the gateway did not see the close that followed the data"
        );
    }
}
