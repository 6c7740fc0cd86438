//! Time on the gateway: keep-alive expiry of many connections at once in bounded batches,
//! keep-alive jitter and the keep-alive cap, session expiry to the tick (MQTT 5 and 3.1.1),
//! and the rule that connections own no timers (one shard-level wakeup only).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect5, connect_from, encode, session_expiry_props, Raw, TestServer};
use mqttbytes::v5::SubscribeFilter;
use mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Mass expiry.

/// 2,000 clients with keep-alive 1 s go silent at the same moment on one shard whose wheel
/// fires at most 64 timers per batch; one live client keeps pinging through the storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_keepalive_expiry_closes_all_and_never_starves_a_live_client() {
    const N: usize = 2000;
    // 2,000 client sockets and 2,000 gateway sockets live in this process.
    let _ = gateway::doctor::raise_nofile_limit();
    let gw = TestServer::start("[shards]\ncount = 1\ntick_ms = 100\nexpiry_batch = 64");
    let addr = gw.mqtt;

    // The live client: PINGREQ every 200 ms, each answered within a generous timeout.
    let (live_stop_tx, mut live_stop) = tokio::sync::watch::channel(false);
    let mut live = Raw::connect(addr).await;
    live.send(&Raw::connect_v4("live", 5, true)).await;
    assert!(matches!(
        live.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    let live_task = tokio::spawn(async move {
        let mut rtts = Vec::new();
        loop {
            let sent = Instant::now();
            live.send(&[0xc0, 0x00]).await;
            match live.next_v4(Duration::from_secs(10)).await {
                Ok(mqttbytes::v4::Packet::PingResp) => rtts.push(sent.elapsed()),
                other => return Err(format!("live client after {} pings: {other:?}", rtts.len())),
            }
            tokio::select! {
                _ = live_stop.changed() => return Ok((rtts, live)),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });

    // The silent-to-be clients keep themselves alive with pings until `stop`, then go quiet
    // together and wait for the gateway to close them.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let ready = Arc::new(AtomicUsize::new(0));
    let connecting = Arc::new(tokio::sync::Semaphore::new(200));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut stop = stop.clone();
        let ready = ready.clone();
        let connecting = connecting.clone();
        tasks.spawn(async move {
            let permit = connecting.acquire().await.unwrap();
            let mut s = connect_from(i, addr).await.expect("connect");
            s.write_all(&Raw::connect_v4(&format!("silent-{i}"), 1, true))
                .await
                .unwrap();
            let mut connack = [0u8; 4];
            s.read_exact(&mut connack).await.expect("CONNACK");
            assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
            drop(permit);
            ready.fetch_add(1, Ordering::Relaxed);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        if s.write_all(&[0xc0, 0x00]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // Silent now: the gateway must close us (PINGRESPs before the EOF are skipped).
            let mut rest = Vec::new();
            matches!(
                tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut rest)).await,
                Ok(Ok(_)) | Ok(Err(_))
            )
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::Relaxed) < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready.load(Ordering::Relaxed), N, "all clients connected");
    let silent_at = Instant::now();
    stop_tx.send(true).unwrap();

    let expired = gw
        .wait_metric(
            "gateway_disconnects_total{reason=\"keepalive\"}",
            Duration::from_secs(60),
            |v| v >= N as f64,
        )
        .await;
    assert_eq!(
        expired, N as f64,
        "every silent client expired by keep-alive"
    );
    let all_expired_after = silent_at.elapsed();
    let mut closed = 0;
    while let Some(r) = tasks.join_next().await {
        closed += usize::from(r.expect("client task"));
    }
    assert_eq!(closed, N, "every silent client saw its socket closed");

    live_stop_tx.send(true).unwrap();
    let (rtts, mut live) = live_task
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("live client starved: {e}"));
    live.send(&[0xc0, 0x00]).await;
    assert!(
        matches!(live.next_v4(T).await, Ok(mqttbytes::v4::Packet::PingResp)),
        "live client still connected after the storm"
    );
    assert_eq!(gw.metric("gateway_connections").await, 1.0);
    let max = rtts.iter().max().copied().unwrap_or_default();
    println!(
        "mass expiry: {N} expired {all_expired_after:?} after going silent; live client {} \
         pings, max PINGREQ->PINGRESP {max:?}",
        rtts.len()
    );
}

// ---------------------------------------------------------------------------------------
// Keep-alive negotiation.

/// The CONNACK of a raw MQTT 5 client asking for `keep_alive`.
async fn connack_for(gw: &TestServer, id: &str, keep_alive: u16) -> mqttbytes::v5::ConnAck {
    let (_raw, ack) = Raw::connected_v5(gw.mqtt, &connect5(id, keep_alive, true, None)).await;
    ack
}

#[tokio::test]
async fn keepalive_jitter_spreads_server_keep_alive_below_the_cap() {
    let gw = TestServer::start("[mqtt]\nkeepalive_jitter_pct = 20\nmax_keepalive_secs = 100");
    let mut values = Vec::new();
    for i in 0..200 {
        let ack = connack_for(&gw, &format!("jit-{i}"), 100).await;
        // No Server Keep Alive means the gateway kept the client's 100 (MQTT 5 3.2.2.3.14).
        let ka = ack
            .properties
            .and_then(|p| p.server_keep_alive)
            .unwrap_or(100);
        assert!((80..=100).contains(&ka), "client {i}: keep-alive {ka}");
        values.push(ka);
    }
    let min = values.iter().min().unwrap();
    let max = values.iter().max().unwrap();
    assert!(min < max, "jitter changed nothing: all {min}");
    assert!(
        values.iter().filter(|&&v| v < 100).count() >= 20,
        "jitter of ±20% under a cap of 100 moves many below 100: {values:?}"
    );

    let plain = TestServer::start("[mqtt]\nkeepalive_jitter_pct = 0\nmax_keepalive_secs = 100");
    let ack = connack_for(&plain, "no-jitter", 100).await;
    assert_eq!(
        ack.properties.and_then(|p| p.server_keep_alive),
        None,
        "keep-alive unchanged: no Server Keep Alive"
    );
}

#[tokio::test]
async fn keepalive_zero_means_the_cap() {
    let gw = TestServer::start("[mqtt]\nmax_keepalive_secs = 2\n[shards]\ntick_ms = 100");
    let (mut raw, ack) = Raw::connected_v5(gw.mqtt, &connect5("ka-zero", 0, true, None)).await;
    let connected = Instant::now();
    assert_eq!(
        ack.properties.and_then(|p| p.server_keep_alive),
        Some(2),
        "keep-alive 0 is replaced by max_keepalive_secs"
    );
    let code = raw.expect_disconnect_v5(Duration::from_secs(10)).await;
    let waited = connected.elapsed();
    assert_eq!(code, 0x8D, "keep-alive timeout");
    assert!(
        waited >= Duration::from_millis(2900),
        "closed before 1.5 × 2 s: {waited:?}"
    );
    assert!(waited <= Duration::from_secs(6), "closed late: {waited:?}");
    assert!(raw.wait_closed(T).await);
}

// ---------------------------------------------------------------------------------------
// Session expiry.

/// Publishes one QoS 1 message from a short-lived 3.1.1 client (whose session ends with it).
async fn publish_once(gw: &TestServer, topic: &str, payload: &[u8]) {
    let mut p = Raw::connect(gw.mqtt).await;
    p.send(&Raw::connect_v4("", 30, true)).await;
    assert!(matches!(
        p.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    p.send(&Raw::publish_v4(topic, 1, 1, payload)).await;
    assert!(matches!(
        p.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::PubAck(_))
    ));
    p.send(&[0xe0, 0x00]).await;
    assert!(p.wait_closed(T).await);
}

/// Polls `gateway_sessions` until it is 0; how long after `since` that was first seen.
/// A late poll only makes the figure larger, so a lower bound on it is robust.
async fn sessions_gone_after(gw: &TestServer, since: Instant, timeout: Duration) -> Duration {
    let deadline = since + timeout;
    loop {
        if gw.metric("gateway_sessions").await == 0.0 {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "session still there after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(t.into()).await;
}

fn disconnect_v5() -> Vec<u8> {
    encode(|b| mqttbytes::v5::Disconnect::new().write(b))
}

#[tokio::test]
async fn v5_session_expiry_is_exact_to_the_tick() {
    let gw = TestServer::start("[shards]\ntick_ms = 100");
    let persistent = |clean| connect5("sx-5", 30, clean, Some(session_expiry_props(2)));

    let (mut dev, ack) = Raw::connected_v5(gw.mqtt, &persistent(true)).await;
    assert!(!ack.session_present);
    dev.subscribe_v5(
        1,
        vec![SubscribeFilter::new("sx/5".into(), QoS::AtLeastOnce)],
    )
    .await;
    dev.send(&disconnect_v5()).await;
    let offline = Instant::now();
    assert!(dev.wait_closed(T).await);
    publish_once(&gw, "sx/5", b"while-offline").await;
    assert_eq!(
        gw.wait_metric("gateway_queued_messages", T, |v| v == 1.0)
            .await,
        1.0
    );

    // Back after 1 s: the session and its message are there.
    sleep_until(offline + Duration::from_secs(1)).await;
    let (mut dev, ack) = Raw::connected_v5(gw.mqtt, &persistent(false)).await;
    assert!(ack.session_present, "reconnected within the expiry");
    let m = dev.next_publish_v5(T).await.expect("queued message");
    assert_eq!(&m.payload[..], b"while-offline");

    // Away for 3.5 s: the session ends 2 s after the disconnect, not a tick earlier.
    dev.send(&disconnect_v5()).await;
    let offline = Instant::now();
    assert!(dev.wait_closed(T).await);
    let gone = sessions_gone_after(&gw, offline, Duration::from_millis(3500)).await;
    assert!(
        gone >= Duration::from_millis(1950),
        "session ended {gone:?} after the disconnect, before its 2 s expiry"
    );
    sleep_until(offline + Duration::from_millis(3500)).await;
    let (_dev, ack) = Raw::connected_v5(gw.mqtt, &persistent(false)).await;
    assert!(!ack.session_present, "session expired");
    println!("v5 session of expiry 2 s ended {gone:?} after DISCONNECT");
}

#[tokio::test]
async fn offline_session_timers_never_fire_early_with_a_coarse_tick() {
    // Default tick of 1 s: an expiry of 1 s must not end the session sooner.
    let gw = TestServer::start("");
    for round in 0..3 {
        let c = connect5("coarse", 30, true, Some(session_expiry_props(1)));
        let (mut dev, _) = Raw::connected_v5(gw.mqtt, &c).await;
        dev.send(&disconnect_v5()).await;
        let offline = Instant::now();
        assert!(dev.wait_closed(T).await);
        let gone = sessions_gone_after(&gw, offline, Duration::from_secs(4)).await;
        assert!(
            gone >= Duration::from_millis(950),
            "round {round}: session of expiry 1 s ended {gone:?} after the disconnect"
        );
        // Start the next round at a different phase of the tick.
        tokio::time::sleep(Duration::from_millis(330)).await;
    }
}

#[tokio::test]
async fn v5_session_expiry_0_ends_the_session_at_once() {
    let gw = TestServer::start("[shards]\ntick_ms = 100");
    let (mut dev, _) = Raw::connected_v5(gw.mqtt, &connect5("sx-0", 30, false, None)).await;
    dev.subscribe_v5(
        1,
        vec![SubscribeFilter::new("sx/0".into(), QoS::AtLeastOnce)],
    )
    .await;
    assert_eq!(gw.metric("gateway_sessions").await, 1.0);
    dev.send(&disconnect_v5()).await;
    assert!(dev.wait_closed(T).await);
    assert_eq!(
        gw.wait_metric("gateway_sessions", T, |v| v == 0.0).await,
        0.0,
        "session with expiry 0 ends with its connection"
    );
    assert_eq!(gw.metric("gateway_subscriptions").await, 0.0);
    let (_dev, ack) = Raw::connected_v5(gw.mqtt, &connect5("sx-0", 30, false, None)).await;
    assert!(!ack.session_present);
}

/// A 3.1.1 CONNECT of "sx-4" with clean session 0; its CONNACK's session present flag.
async fn connect(raw: &mut Raw) -> bool {
    raw.send(&Raw::connect_v4("sx-4", 30, false)).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::ConnAck(a)) => a.session_present,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn v311_persistent_sessions_last_max_session_expiry_secs() {
    let gw = TestServer::start("[mqtt]\nmax_session_expiry_secs = 2\n[shards]\ntick_ms = 100");
    let mut dev = Raw::connect(gw.mqtt).await;
    assert!(!connect(&mut dev).await);
    dev.send(&Raw::subscribe_v4("sx/4", 1, 1)).await;
    assert!(matches!(
        dev.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::SubAck(_))
    ));
    dev.send(&[0xe0, 0x00]).await;
    let offline = Instant::now();
    assert!(dev.wait_closed(T).await);
    publish_once(&gw, "sx/4", b"v4-offline").await;

    sleep_until(offline + Duration::from_secs(1)).await;
    let mut dev = Raw::connect(gw.mqtt).await;
    assert!(connect(&mut dev).await, "session kept for 2 s");
    match dev.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"v4-offline");
            dev.send(&[0x40, 0x02, (p.pkid >> 8) as u8, p.pkid as u8])
                .await;
        }
        other => panic!("expected the queued PUBLISH, got {other:?}"),
    }
    dev.send(&[0xe0, 0x00]).await;
    let offline = Instant::now();
    assert!(dev.wait_closed(T).await);
    let gone = sessions_gone_after(&gw, offline, Duration::from_millis(3500)).await;
    assert!(
        gone >= Duration::from_millis(1950),
        "3.1.1 session ended {gone:?} after the disconnect"
    );
    sleep_until(offline + Duration::from_millis(3500)).await;
    let mut dev = Raw::connect(gw.mqtt).await;
    assert!(!connect(&mut dev).await, "session expired");
}

// ---------------------------------------------------------------------------------------
// No timers per connection.

/// Source text without `//` comments, so prose about intervals and timeouts is ignored.
fn code_of(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn connections_own_no_timers_only_the_shard_loop_sleeps() {
    // The rule (docs/ARCHITECTURE.md, README "One timer per connection on the wheel"): a
    // connection or session never has a tokio timer, sleep, interval or timeout of its own;
    // all their deadlines live on the shard's timing wheel, and the only thing that sleeps
    // is the shard loop itself waiting for its next tick.
    // Every file of the shard but mod.rs (checked below: its loop is what sleeps) and
    // settings.rs (it reads the config; its TCP keepalive interval and user timeout are
    // socket options, not timers).
    let mut files = vec!["src/session.rs".to_string()];
    let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/shard")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/shard") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                    .expect("under the crate")
                    .to_string_lossy()
                    .into_owned();
                if rel != "src/shard/mod.rs" && rel != "src/shard/settings.rs" {
                    files.push(rel);
                }
            }
        }
    }
    assert!(files.len() > 10, "found the shard's files: {files:?}");
    for file in &files {
        let code = code_of(file);
        for banned in ["tokio::time::sleep", "interval", "timeout(", "Sleep"] {
            assert!(
                !code.contains(banned),
                "{file} uses `{banned}`: connection-path code must put its deadlines on the \
                 shard's timing wheel, never a tokio timer per connection"
            );
        }
    }

    let code = code_of("src/shard/mod.rs");
    let start = code
        .find("async fn run(")
        .expect("Shard::run in src/shard/mod.rs");
    // The body of `run` ends at the first line that closes a method (4-space indent).
    let end = start + code[start..].find("\n    }\n").expect("end of Shard::run");
    let sleeps: Vec<usize> = code
        .match_indices("tokio::time::sleep")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        sleeps.len(),
        3,
        "src/shard/mod.rs must sleep in exactly three places, all in Shard::run: the \
         sleep_until of the next tick, the outbox retry and, after the loop, the shutdown \
         drain's wait for the other shards; found {}",
        sleeps.len()
    );
    assert!(
        sleeps.iter().all(|&i| (start..end).contains(&i)),
        "tokio::time::sleep outside Shard::run: only the shard loop may wait on a timer"
    );
    assert!(
        code[start..end].contains("tokio::time::sleep_until(next_tick"),
        "the shard loop wakes for its tick with sleep_until"
    );
    // (`set_tcp_user_timeout(` and `with_interval(` there are socket options, not timers.)
    for banned in [
        "tokio::time::timeout",
        "tokio::time::interval",
        "use tokio::time",
        "Sleep",
    ] {
        assert!(
            !code.contains(banned),
            "src/shard/mod.rs uses `{banned}`: the shard has one wakeup, the tick"
        );
    }
}
