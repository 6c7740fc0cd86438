//! The NATS sink against a real `nats-server` with JetStream (started by each test on a
//! free loopback port, killed by its PID): events on their subjects, in the stream once
//! acknowledged, nothing lost when NATS is down at start or killed mid-way, and what it
//! acknowledged kept when the gateway itself is killed.

mod common;
mod events_support;

use std::time::Duration;

use common::nats::{free_port, NatsServer};
use events_support::{connected, numbered, start, wait_until, DEADLINE};
use gateway::events::{Event, EventKind, SeqGen};
use gateway::metrics::DisconnectReason;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_events_arrive_on_their_subjects() {
    use futures_util::StreamExt;
    let nats = NatsServer::start("core");
    let watcher = nats.client().await;
    let mut sub = watcher.subscribe("gw.events.>").await.unwrap();
    watcher.flush().await.unwrap();
    let events = start(&format!(
        "nats_url = \"{}\"\nnats_subject_prefix = \"gw\"\nlinger_ms = 0\n",
        nats.url()
    ));
    let mut seq = SeqGen::default();
    events.sender.try_emit(connected(&mut seq, "dev.1", false));
    events.sender.try_emit(Event::now(
        seq.next_seq(),
        "dev.1".into(),
        EventKind::Disconnected {
            reason: DisconnectReason::Keepalive,
        },
    ));
    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(DEADLINE, sub.next())
            .await
            .expect("an event on NATS")
            .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        got.push((msg.subject.to_string(), v));
    }
    assert_eq!(got[0].0, "gw.events.connected.dev%2E1");
    assert_eq!(got[0].1["client_id"], "dev.1");
    assert_eq!(got[1].0, "gw.events.disconnected.dev%2E1");
    assert_eq!(got[1].1["reason"], "keepalive");
    let m = events.sink("nats").unwrap().clone();
    wait_until("sent counted", || m.sent.get() == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_holds_every_acknowledged_event() {
    let nats = NatsServer::start("js");
    let client = nats.client().await;
    let events = start(&format!(
        "nats_url = \"{}\"\njetstream = true\njetstream_stream = \"EVT\"\nbatch_max = 20\nlinger_ms = 10\n",
        nats.url()
    ));
    let mut seq = SeqGen::default();
    for i in 0..100 {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    let m = events.sink("nats").unwrap().clone();
    wait_until("100 acknowledged events", || m.sent.get() == 100).await;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("EVT").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 100);
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(&*first.subject, "gateway.events.session_expired.dev-0");
    let v: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(v["kind"], "session_expired");
}

/// NATS is down when the gateway starts and while events queue: the client keeps trying,
/// the stream is created once the server is up, and every event is acknowledged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_started_late_still_gets_every_event_once() {
    let port = free_port();
    let events = start(&format!(
        "nats_url = \"nats://127.0.0.1:{port}\"\njetstream = true\nbatch_max = 7\nlinger_ms = 0\nretry_max_backoff_ms = 200\n"
    ));
    let mut seq = SeqGen::default();
    for i in 0..30 {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    let m = events.sink("nats").unwrap().clone();
    // Down for a while: the client's first connection attempts fail.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(m.sent.get(), 0);
    let nats = NatsServer::start_on("late", port);
    let client = nats.client().await;
    wait_until("30 acknowledged events", || m.sent.get() == 30).await;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("GATEWAY_EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 30);
    for reason in gateway::events::metrics::DROP_REASONS {
        assert_eq!(m.dropped_count(reason), 0, "{reason}");
    }
}

/// JetStream goes away in the middle (killed) and comes back on the same store: the
/// events published meanwhile are retried until acknowledged, and the stream holds each
/// event exactly once (a repeat carries the same Nats-Msg-Id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_outage_loses_nothing() {
    let mut nats = NatsServer::start("outage");
    let client = nats.client().await;
    drop(client);
    let events = start(&format!(
        "nats_url = \"{}\"\njetstream = true\nbatch_max = 5\nlinger_ms = 0\nretry_max_backoff_ms = 200\n",
        nats.url()
    ));
    let m = events.sink("nats").unwrap().clone();
    let mut seq = SeqGen::default();
    for i in 0..10 {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    wait_until("the first 10 acknowledged", || m.sent.get() == 10).await;
    nats.kill();
    for i in 10..20 {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    // Down longer than JetStream's publish timeout (5 s): the unacknowledged
    // events are published again.
    tokio::time::sleep(Duration::from_millis(7000)).await;
    assert_eq!(m.sent.get(), 10);
    nats.respawn();
    wait_until("all 20 acknowledged", || m.sent.get() == 20).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("GATEWAY_EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 20);
    assert!(m.retried.get() >= 1, "the outage made publishes fail");
}

/// A gateway process with a JetStream sink is killed with SIGKILL while devices connect
/// and disconnect in a loop: every event JetStream had acknowledged before the kill
/// (`gateway_events_sent_total{sink="nats"}`, read just before it) is in the stream, once,
/// as the shards produced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_keeps_every_acknowledged_event_across_a_gateway_kill_9() {
    use common::v4;
    let nats = NatsServer::start("kill9");
    let mut gw = common::GatewayProcess::start(&format!(
        "[events]\nnats_url = \"{}\"\njetstream = true\njetstream_stream = \"K9\"\nlinger_ms = 5\n",
        nats.url()
    ));
    let mqtt = gw.mqtt;
    let churn = tokio::spawn(async move {
        for i in 0.. {
            let mut c = v4::connect(v4::options(mqtt, &format!("k-{i}"))).await;
            let _ = c.client.disconnect().await;
            c.wait_closed(Duration::from_secs(5)).await;
        }
    });
    let sent = "gateway_events_sent_total{sink=\"nats\"}";
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut acked = 0.0;
    while acked < 60.0 {
        assert!(
            tokio::time::Instant::now() < end,
            "events acknowledged: {acked}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        acked = gw.metric(sent).await;
    }
    gw.signal(libc::SIGKILL);
    let _ = gw.child.wait();
    churn.abort();

    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("K9").await.unwrap();
    let messages = stream.info().await.unwrap().state.messages;
    assert!(
        messages as f64 >= acked,
        "{messages} in the stream, {acked} acknowledged"
    );
    let mut seen = std::collections::HashSet::new();
    for n in 1..=messages {
        let m = stream.get_raw_message(n).await.unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let id = (v["client_id"].to_string(), v["seq"].as_u64().unwrap());
        assert!(seen.insert(id.clone()), "{id:?} twice in the stream");
        assert!(v["client_id"].as_str().unwrap().starts_with("k-"), "{v}");
    }
}

/// A JetStream batch larger than the 5,000 publishes async-nats lets wait for their acks
/// (`batch_max = 6000`) is delivered whole: its acks are awaited a chunk at a time (before,
/// the 5,001st publish waited for good and the sink delivered nothing more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_takes_a_batch_larger_than_the_acks_in_flight() {
    const EVENTS: usize = 6000;
    let nats = NatsServer::start("js-big");
    let client = nats.client().await;
    let events = start(&format!(
        "nats_url = \"{}\"\njetstream = true\njetstream_stream = \"BIG\"\nbatch_max = {EVENTS}\nlinger_ms = 500\n",
        nats.url()
    ));
    let mut seq = SeqGen::default();
    for i in 0..EVENTS {
        events.sender.try_emit(numbered(&mut seq, i));
    }
    let m = events.sink("nats").unwrap().clone();
    wait_until("6,000 acknowledged events", || {
        m.sent.get() == EVENTS as u64
    })
    .await;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("BIG").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, EVENTS as u64);
}

/// JetStream hangs with a whole batch of 500 events published and not acknowledged,
/// and is then killed, so none of those acks ever comes; once it is back the batch is
/// published again and arrives whole. The sink awaits the batch's acks together: one at
/// a time, each ack's timeout (5 s) started only when it was awaited, the batch took
/// 500 × 5 s (about 40 minutes) to fail before its retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_lost_acks_of_a_whole_batch_cost_one_timeout() {
    const EVENTS: u64 = 500;
    let mut nats = NatsServer::start("js-lost-acks");
    let events = start(&format!(
        "nats_url = \"{}\"\njetstream = true\njetstream_stream = \"LOST\"\nbatch_max = {EVENTS}\nlinger_ms = 200\nretry_max_backoff_ms = 200\n",
        nats.url()
    ));
    let m = events.sink("nats").unwrap().clone();
    let mut seq = SeqGen::default();
    events.sender.try_emit(numbered(&mut seq, 0));
    wait_until("the first event acknowledged", || m.sent.get() == 1).await;
    nats.pause();
    for i in 1..=EVENTS {
        events.sender.try_emit(numbered(&mut seq, i as usize));
    }
    // The batch goes out into the hung server's socket; its acks never come.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nats.resume();
    nats.kill();
    nats.respawn();
    wait_until("the whole batch acknowledged", || {
        m.sent.get() == EVENTS + 1
    })
    .await;
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("LOST").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, EVENTS + 1);
}
