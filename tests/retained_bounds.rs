//! Byte bounds on retained messages (issue 17.8): per client and gateway-wide, answered
//! with 0x97 Quota exceeded in MQTT 5, acknowledged and dropped in 3.1.1; replacing one's
//! own message counts the difference, deleting frees.

mod common;

use std::time::Duration;

use common::*;
use mqttbytes::v5::PubAckReason;
use mqttbytes::QoS;

const T: Duration = Duration::from_secs(10);

/// One shard, so every retained update is seen by the deciding shard at once.
const BOUNDS: &str = "[shards]\ncount = 1\n[mqtt]\nmax_retained_bytes = 2500\nmax_retained_bytes_per_client = 1000\n";

/// A retained QoS 1 PUBLISH of `len` bytes from a v5 client; the PUBACK reason.
async fn retain_v5(c: &mut Raw, topic: &str, len: usize, pkid: u16) -> PubAckReason {
    let mut p = mqttbytes::v5::Publish::new(topic, QoS::AtLeastOnce, vec![b'x'; len]);
    p.retain = true;
    p.pkid = pkid;
    c.send(&encode(|b| p.write(b))).await;
    match c.next_v5(T).await {
        Ok(mqttbytes::v5::Packet::PubAck(a)) => {
            assert_eq!(a.pkid, pkid);
            a.reason
        }
        other => panic!("expected PUBACK for {topic}, got {other:?}"),
    }
}

/// The retained topics a fresh subscriber to `filter` is given: waits up to `T` for
/// each of the `expected` first ones (a loaded machine may pause between them), then
/// 300 ms for one more.
async fn retained_topics(s: &TestServer, filter: &str, expected: usize) -> Vec<String> {
    let (mut c, _) = Raw::connected_v5(s.mqtt, &connect5("probe", 30, true, None)).await;
    let f = mqttbytes::v5::SubscribeFilter::new(filter.into(), QoS::AtMostOnce);
    c.subscribe_v5(1, vec![f]).await;
    let mut topics = vec![];
    loop {
        let wait = if topics.len() < expected {
            T
        } else {
            Duration::from_millis(300)
        };
        let Some(p) = c.next_publish_v5(wait).await else {
            break;
        };
        topics.push(p.topic);
    }
    topics.sort();
    topics
}

#[tokio::test]
async fn retained_bytes_are_bounded_per_client_and_gateway_wide() {
    use PubAckReason::{QuotaExceeded, Success};
    let s = TestServer::start(BOUNDS);
    let (mut a, _) = Raw::connected_v5(s.mqtt, &connect5("a", 30, true, None)).await;
    // Costs are topic + payload: "r/a1" + 596 = 600.
    assert_eq!(retain_v5(&mut a, "r/a1", 596, 1).await, Success);
    assert_eq!(retain_v5(&mut a, "r/a2", 596, 2).await, QuotaExceeded);
    // Replacing its own message counts the difference only; deleting frees.
    assert_eq!(retain_v5(&mut a, "r/a1", 896, 3).await, Success);
    assert_eq!(retain_v5(&mut a, "r/a1", 0, 4).await, Success);
    assert_eq!(retain_v5(&mut a, "r/a2", 596, 5).await, Success);
    // Gateway-wide: 600 + 900 + 900 = 2400; another 900 would pass 2500.
    for (id, topic) in [("b", "r/b1"), ("c", "r/c1")] {
        let (mut c, _) = Raw::connected_v5(s.mqtt, &connect5(id, 30, true, None)).await;
        assert_eq!(retain_v5(&mut c, topic, 896, 1).await, Success, "{id}");
    }
    let (mut d, _) = Raw::connected_v5(s.mqtt, &connect5("d", 30, true, None)).await;
    assert_eq!(retain_v5(&mut d, "r/d1", 896, 1).await, QuotaExceeded);
    // 3.1.1 cannot be refused: acknowledged, but neither retained nor delivered.
    let mut v3 = Raw::connect(s.mqtt).await;
    v3.send(&Raw::connect_v4("e", 30, true)).await;
    assert!(matches!(
        v3.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    let mut p = mqttbytes::v4::Publish::new("r/e1", QoS::AtLeastOnce, vec![b'x'; 896]);
    p.retain = true;
    p.pkid = 1;
    v3.send(&encode(|b| p.write(b))).await;
    assert!(matches!(
        v3.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::PubAck(_))
    ));
    assert_eq!(
        retained_topics(&s, "r/#", 3).await,
        ["r/a2", "r/b1", "r/c1"]
    );
}
