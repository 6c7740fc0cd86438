//! MQTT acknowledgements wait for the store commit (issue 17 item 2): each scenario kills
//! the gateway the moment the acknowledgement is read, restarts it, and checks that what
//! was acknowledged is there.

mod common;

use std::time::Duration;

use common::store::*;
use common::{tempdir, GatewayProcess, Raw};
use mqttbytes::v4::Packet as P4;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// A publisher id and a subscriber id homed on the same shard of `shards`, or (`same`
/// false) on different ones: then the subscriber's copy is stored by another shard than
/// the one that acknowledges the PUBLISH.
fn publisher_and_subscriber(prefix: &str, shards: usize, same: bool) -> (String, String) {
    let a = format!("{prefix}-pub");
    let home = gateway::mailbox::home_shard(&a, shards);
    let b = (0..)
        .map(|i| format!("{prefix}-sub-{i}"))
        .find(|b| (gateway::mailbox::home_shard(b, shards) == home) == same)
        .expect("some id has the home wanted");
    (a, b)
}

const SHARDS: usize = 2;

fn acks_toml(dir: &tempdir::Dir) -> String {
    format!("{}\n[shards]\ncount = {SHARDS}\n", store_toml(dir))
}

/// Subscribes `id` (persistent) to `filter` at QoS 1, disconnects it, and waits until
/// that is durable: a push queued for it afterwards is answered after a later commit of
/// the same shard (one writer, commits in order). Its reconnection skips that push.
async fn offline_subscriber(gw: &GatewayProcess, id: &str, filter: &str) {
    let (mut r, _) = raw_connect(gw, id, false).await;
    r.send(&Raw::subscribe_v4(filter, 1, 1)).await;
    expect_v4(&mut r, "SUBACK", |p| matches!(p, P4::SubAck(_))).await;
    r.send(&[0xe0, 0]).await;
    assert!(r.closed_within(T).await);
    let (code, body) = post(
        gw,
        "/v1/push",
        json!({"client_id": id, "topic": "sync", "payload": "sync", "qos": 1}),
    )
    .await;
    assert_eq!((code, &body["status"]), (200, &json!("queued")), "{body}");
}

/// Reconnects persistent `id` and collects the payloads queued for it (but the sync
/// push), acknowledging each, until `n` arrived or nothing more comes.
async fn queued_payloads(gw: &GatewayProcess, id: &str, n: usize) -> Vec<String> {
    let (mut r, present) = raw_connect(gw, id, false).await;
    assert!(present, "{id}: session present after restart");
    let mut got = Vec::new();
    while got.len() < n {
        let Ok(P4::Publish(p)) = r.recv_v4(Duration::from_secs(3)).await else {
            break;
        };
        r.send(&common::encode(|b| {
            mqttbytes::v4::PubAck::new(p.pkid).write(b)
        }))
        .await;
        let payload = String::from_utf8_lossy(&p.payload).to_string();
        if payload != "sync" {
            got.push(payload);
        }
    }
    got
}

/// A QoS 1 push to `topic`: the number of sessions it matched.
async fn topic_push(gw: &GatewayProcess, topic: &str, payload: &str) -> u64 {
    let (code, body) = post(
        gw,
        "/v1/push",
        json!({"topic": topic, "payload": payload, "qos": 1}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    body["matched"].as_u64().expect("matched")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_means_the_message_for_an_offline_subscriber_survives_kill_9() {
    puback_survives_kill_9(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_for_a_subscriber_homed_on_another_shard_survives_kill_9() {
    puback_survives_kill_9(false).await;
}

/// One QoS 1 PUBLISH, `kill -9` once its PUBACK is read, three times: the offline
/// subscriber (on the publisher's home shard, or `same` false: on another) gets it.
async fn puback_survives_kill_9(same: bool) {
    for trial in 0..3 {
        let dir = tempdir::Dir::new("puback");
        let extra = acks_toml(&dir);
        let mut gw = GatewayProcess::start(&extra);
        let (publisher, sub) = publisher_and_subscriber(&format!("pa{trial}"), SHARDS, same);
        offline_subscriber(&gw, &sub, "acks/one").await;

        let (mut p, _) = raw_connect(&gw, &publisher, true).await;
        p.send(&Raw::publish_v4("acks/one", 1, 7, b"acknowledged"))
            .await;
        expect_v4(
            &mut p,
            "PUBACK",
            |p| matches!(p, P4::PubAck(a) if a.pkid == 7),
        )
        .await;
        kill9(&mut gw);

        let gw = GatewayProcess::start(&extra);
        let got = queued_payloads(&gw, &sub, 1).await;
        assert_eq!(
            got,
            ["acknowledged"],
            "trial {trial}: a PUBACKed message was lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_pubacked_messages_survives_kill_9_after_the_last_puback() {
    pubacked_stream_survives_kill_9(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubacked_stream_to_a_subscriber_homed_on_another_shard_survives_kill_9() {
    pubacked_stream_survives_kill_9(false).await;
}

/// 300 QoS 1 PUBLISHes in one write, `kill -9` once the last PUBACK is read: the offline
/// subscriber (on the publisher's home shard, or `same` false: on another) gets them all.
async fn pubacked_stream_survives_kill_9(same: bool) {
    const N: u16 = 300;
    let dir = tempdir::Dir::new("pubstream");
    let extra = acks_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let (publisher, sub) = publisher_and_subscriber("ps", SHARDS, same);
    offline_subscriber(&gw, &sub, "acks/stream").await;

    let (mut p, _) = raw_connect(&gw, &publisher, true).await;
    let mut burst = Vec::new();
    for i in 1..=N {
        burst.extend(Raw::publish_v4(
            "acks/stream",
            1,
            i,
            format!("m{i}").as_bytes(),
        ));
    }
    p.send(&burst).await;
    let mut acked = 0;
    while acked < N {
        expect_v4(&mut p, "PUBACK", |p| matches!(p, P4::PubAck(_))).await;
        acked += 1;
    }
    kill9(&mut gw);

    let gw = GatewayProcess::start(&extra);
    let got = queued_payloads(&gw, &sub, N as usize).await;
    let want: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "PUBACKed messages lost: the last one received is {:?}",
        got.last()
    );
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacked_streams_from_every_shard_survive_kill_9() {
    // Three shards: a message is routed only to the shards whose subscriptions may match
    // it, so some publishers' shards hand it to one shard and not the other.
    const SHARDS: usize = 3;
    const PUBLISHERS: usize = 6;
    const N: u16 = 100;
    let dir = tempdir::Dir::new("pubmany");
    let extra = format!("{}\n[shards]\ncount = {SHARDS}\n", store_toml(&dir));
    let mut gw = GatewayProcess::start(&extra);
    offline_subscriber(&gw, "many-sub", "acks/many").await;
    let mut tasks = Vec::new();
    for k in 0..PUBLISHERS {
        // Publisher k is homed on shard k % SHARDS: they publish on every shard at once.
        let id = (0..)
            .map(|j| format!("many-pub-{k}-{j}"))
            .find(|id| gateway::mailbox::home_shard(id, SHARDS) == k % SHARDS)
            .expect("an id for each shard");
        let (mut p, _) = raw_connect(&gw, &id, true).await;
        tasks.push(tokio::spawn(async move {
            let mut burst = Vec::new();
            for i in 1..=N {
                let payload = format!("{k}-{i}");
                burst.extend(Raw::publish_v4("acks/many", 1, i, payload.as_bytes()));
            }
            p.send(&burst).await;
            for _ in 0..N {
                expect_v4(&mut p, "PUBACK", |p| matches!(p, P4::PubAck(_))).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    kill9(&mut gw);

    let gw = GatewayProcess::start(&extra);
    let total = PUBLISHERS * N as usize;
    let got = queued_payloads(&gw, "many-sub", total).await;
    assert_eq!(got.len(), total, "PUBACKed messages lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connack_and_suback_mean_the_session_and_subscription_survive_kill_9() {
    for trial in 0..3 {
        let dir = tempdir::Dir::new("suback");
        let extra = acks_toml(&dir);
        let mut gw = GatewayProcess::start(&extra);
        let id = format!("sa{trial}");
        let mut r = Raw::connect(gw.mqtt).await;
        // CONNECT and SUBSCRIBE in one write: the SUBACK is read right after the CONNACK.
        let mut both = Raw::connect_v4(&id, 60, false);
        both.extend(Raw::subscribe_v4("acks/sub", 1, 3));
        r.send(&both).await;
        expect_v4(&mut r, "CONNACK", |p| matches!(p, P4::ConnAck(_))).await;
        expect_v4(&mut r, "SUBACK", |p| matches!(p, P4::SubAck(_))).await;
        kill9(&mut gw);

        let gw = GatewayProcess::start(&extra);
        let matched = topic_push(&gw, "acks/sub", "after").await;
        assert_eq!(matched, 1, "trial {trial}: subscription lost");
        let got = queued_payloads(&gw, &id, 1).await;
        assert_eq!(got, ["after"], "trial {trial}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsuback_means_the_subscription_stays_gone_after_kill_9() {
    for trial in 0..3 {
        let dir = tempdir::Dir::new("unsuback");
        let extra = acks_toml(&dir);
        let mut gw = GatewayProcess::start(&extra);
        let id = format!("ua{trial}");
        offline_subscriber(&gw, &id, "acks/unsub").await;
        let (mut r, _) = raw_connect(&gw, &id, false).await;
        let unsub = mqttbytes::v4::Unsubscribe {
            pkid: 4,
            topics: vec!["acks/unsub".into()],
        };
        r.send(&common::encode(|b| unsub.write(b))).await;
        expect_v4(&mut r, "UNSUBACK", |p| matches!(p, P4::UnsubAck(_))).await;
        kill9(&mut gw);

        let gw = GatewayProcess::start(&extra);
        let matched = topic_push(&gw, "acks/unsub", "x").await;
        assert_eq!(matched, 0, "trial {trial}: unsubscribed yet matched");
    }
}

/// QoS 1 PUBLISH → PUBACK round trips to a topic nobody subscribes (nothing stored), to
/// one with an offline persistent subscriber on the publisher's home shard and to one with
/// a subscriber homed on the other shard (each stores a message): the latency the commit
/// wait adds. Prints p50/p90/p99 of each and the store's mean commit time.
/// `cargo test --test store_acks measure_qos1_round_trip -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_qos1_round_trip_with_a_persistent_subscriber() {
    let dir = tempdir::Dir::new("rtt");
    // No inbound publish rate (its 100/s default would pace the round trips).
    let gw = GatewayProcess::start(&format!("{}[limits]\npublish_rate = 0\n", acks_toml(&dir)));
    let (publisher, near) = publisher_and_subscriber("rtt", SHARDS, true);
    let (_, far) = publisher_and_subscriber("rtt", SHARDS, false);
    offline_subscriber(&gw, &near, "acks/near").await;
    offline_subscriber(&gw, &far, "acks/far").await;
    let (mut p, _) = raw_connect(&gw, &publisher, true).await;
    p.stream.set_nodelay(true).expect("nodelay");
    for topic in ["acks/nobody", "acks/near", "acks/far"] {
        let commits = gw.metric("gateway_store_commit_seconds_count").await;
        let secs = gw.metric("gateway_store_commit_seconds_sum").await;
        let rtt = round_trips(&mut p, topic, 500).await;
        let commits = gw.metric("gateway_store_commit_seconds_count").await - commits;
        let secs = gw.metric("gateway_store_commit_seconds_sum").await - secs;
        let at = |q: f64| rtt[((rtt.len() as f64 * q) as usize).min(rtt.len() - 1)];
        println!(
            "QoS 1 round trip to {topic}, {} sequential: p50 {:?} p90 {:?} p99 {:?}; \
             {commits} commits, mean {:.2} ms",
            rtt.len(),
            at(0.5),
            at(0.9),
            at(0.99),
            secs * 1000.0 / commits.max(1.0)
        );
    }
}

/// `n` sequential QoS 1 PUBLISH → PUBACK round trips, sorted.
async fn round_trips(p: &mut Raw, topic: &str, n: u16) -> Vec<Duration> {
    let mut rtt = Vec::with_capacity(n as usize);
    for pkid in 1..=n {
        let t = std::time::Instant::now();
        p.send(&Raw::publish_v4(topic, 1, pkid, b"x")).await;
        expect_v4(p, "PUBACK", |p| matches!(p, P4::PubAck(_))).await;
        rtt.push(t.elapsed());
    }
    rtt.sort();
    rtt
}

/// Makes `cmd` start with writes past `bytes` of any file failing (EFBIG; SIGXFSZ
/// ignored), so the store's commits fail once its file must grow beyond that.
fn limit_file_size(cmd: &mut std::process::Command, bytes: libc::rlim_t) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls: signal, setrlimit.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_closes_the_connection_without_its_puback() {
    const PAYLOAD: usize = 900 * 1024;
    let dir = tempdir::Dir::new("efbig");
    let extra = format!(
        "{}[limits]\npublish_rate = 0\nbytes_rate = 0\n",
        acks_toml(&dir)
    );
    let mut gw = GatewayProcess::start_with(&extra, |c| limit_file_size(c, 16 << 20));
    let (publisher, sub) = publisher_and_subscriber("efbig", SHARDS, true);
    offline_subscriber(&gw, &sub, "acks/big").await;
    let (mut p, _) = raw_connect(&gw, &publisher, true).await;
    let mut acked = Vec::new();
    let mut closed = false;
    for i in 1..=40u16 {
        let mut payload = vec![b'.'; PAYLOAD];
        payload[..8].copy_from_slice(format!("{i:08}").as_bytes());
        p.send(&Raw::publish_v4("acks/big", 1, i, &payload)).await;
        match p.recv_v4(T).await {
            Ok(P4::PubAck(a)) => acked.push(a.pkid),
            Err("closed") => {
                closed = true;
                break;
            }
            other => panic!("publish {i}: {other:?}"),
        }
    }
    assert!(
        closed,
        "the store never failed: every publish was acknowledged"
    );
    let refused = gw
        .metric("gateway_disconnects_total{reason=\"store_error\"}")
        .await;
    assert_eq!(refused, 1.0, "counted as a store error");
    kill9(&mut gw);

    // Without the limit: every acknowledged message is there.
    let gw = GatewayProcess::start(&extra);
    let got = queued_payloads(&gw, &sub, acked.len() + 1).await;
    let got: Vec<u16> = got.iter().map(|p| p[..8].parse().unwrap()).collect();
    for pkid in &acked {
        assert!(
            got.contains(pkid),
            "PUBACKed message {pkid} lost: got {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_eventual_durability_a_puback_does_not_wait_and_a_graceful_stop_keeps_it() {
    let dir = tempdir::Dir::new("eventual-ack");
    // An fsync only every minute: a PUBACK that waited for it would not come within T.
    let extra = format!(
        "{}durability = \"eventual\"\nsync_interval_ms = 60000\n[shards]\ncount = {SHARDS}\n",
        store_toml(&dir)
    );
    let mut gw = GatewayProcess::start(&extra);
    let (publisher, sub) = publisher_and_subscriber("ev", SHARDS, false);
    let (mut s, _) = raw_connect(&gw, &sub, false).await;
    s.send(&Raw::subscribe_v4("acks/eventual", 1, 1)).await;
    expect_v4(&mut s, "SUBACK", |p| matches!(p, P4::SubAck(_))).await;
    s.send(&[0xe0, 0]).await;
    assert!(s.closed_within(T).await);

    let (mut p, _) = raw_connect(&gw, &publisher, true).await;
    p.send(&Raw::publish_v4("acks/eventual", 1, 9, b"kept"))
        .await;
    expect_v4(
        &mut p,
        "PUBACK",
        |p| matches!(p, P4::PubAck(a) if a.pkid == 9),
    )
    .await;
    stop(&mut gw);

    let gw = GatewayProcess::start(&extra);
    let got = queued_payloads(&gw, &sub, 1).await;
    assert_eq!(got, ["kept"], "a graceful stop keeps what was acknowledged");
}
