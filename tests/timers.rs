//! Time on a whole gateway: that its real clock and tick drive the timers (a silent
//! client closed, an offline session ended, polled with generous deadlines), keep-alive
//! jitter and the keep-alive cap, session expiry 0, and the rule that connections own no
//! timers (one shard-level wakeup only).
//!
//! The timers' rules themselves (keep-alive at 1.5 x, keep-alive 0, the connect timeout,
//! a mass expiry in bounded batches, session expiry to the tick, will delay, write stall)
//! are tested on a manual clock, without sleeping: `src/shard/sim/timed/`
//! (`cargo test --lib shard::sim::timed`).

mod common;

use std::time::{Duration, Instant};

use common::{connect5, encode, session_expiry_props, Raw, TestServer};
use mqttbytes::v5::SubscribeFilter;
use mqttbytes::QoS;

const T: Duration = Duration::from_secs(5);

fn disconnect_v5() -> Vec<u8> {
    encode(|b| mqttbytes::v5::Disconnect::new().write(b))
}

// ---------------------------------------------------------------------------------------
// The real clock.

/// On a real gateway, a silent MQTT 5 client (keep-alive 1 s) is told 0x8D and closed,
/// and an offline session of expiry 1 s ends: each polled with a generous deadline, and
/// neither sooner than its time (a late poll only makes the figure larger).
#[tokio::test]
async fn a_real_gateway_closes_a_silent_client_and_ends_an_expired_session() {
    let gw = TestServer::start("[shards]\ntick_ms = 100");
    // Each instant is taken before the gateway can start its timer (before the CONNECT,
    // before the DISCONNECT is sent): a test thread preempted after the send cannot make
    // a timer that ran its full time look early.
    let connected = Instant::now();
    let (mut silent, _) = Raw::connected_v5(gw.mqtt, &connect5("rt-silent", 1, true, None)).await;
    let c = connect5("rt-session", 30, true, Some(session_expiry_props(1)));
    let (mut dev, _) = Raw::connected_v5(gw.mqtt, &c).await;
    let offline = Instant::now();
    dev.send(&disconnect_v5()).await;
    assert!(dev.wait_closed(T).await);

    let code = silent.expect_disconnect_v5(Duration::from_secs(30)).await;
    assert_eq!(code, 0x8D, "keep-alive timeout");
    let waited = connected.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed {waited:?} after the CONNECT, before 1.5 x 1 s"
    );
    assert!(silent.wait_closed(T).await);

    let sessions = gw
        .wait_metric("gateway_sessions", Duration::from_secs(30), |v| v == 0.0)
        .await;
    assert_eq!(sessions, 0.0, "the offline session ended");
    let gone = offline.elapsed();
    assert!(
        gone >= Duration::from_millis(900),
        "session of expiry 1 s gone {gone:?} after its DISCONNECT"
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

// ---------------------------------------------------------------------------------------
// Session expiry.

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
    // Every file of the shard but mod.rs (checked below: its loop is what sleeps),
    // settings.rs (it reads the config; its TCP keepalive interval and user timeout are
    // socket options, not timers) and the test-only sim/.
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
                // The simulation and its timer rig are test-only harnesses (they decode
                // MQTT 5 properties such as message_expiry_interval).
                let test_only = rel.starts_with("src/shard/sim/");
                if rel != "src/shard/mod.rs" && rel != "src/shard/settings.rs" && !test_only {
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
