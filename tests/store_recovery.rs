//! The store after a real write failure, without a restart (issue 24.3): a file size
//! limit put on the running gateway (`prlimit`, as its own user: no privilege needed)
//! makes every store write fail with EFBIG, as a full disk would. Then commits fail, the
//! store is down (`gateway_store_up 0`, `/readyz` says so), and a QoS 1 push to a
//! persistent session is refused with 503 `store_unavailable`; once the limit is lifted
//! the writer's reopen succeeds and pushes are `queued` again, and every push answered
//! `queued` (before and after) is delivered after a `kill -9` and restart.
//!
//! The same stalled store under a flood of persistent QoS 1 publishes: the shard's
//! backlog of changes for the writer stops near `[store] backlog_max_bytes` and the
//! publisher is paced (not read) instead; once the store is back it goes on, and every
//! PUBACKed message reaches every persistent subscriber after a restart.

mod common;

use std::time::Duration;

use common::{http_get, post_json, tempdir, v4, GatewayProcess};
use rumqttc::{Event, Packet};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

fn store_toml(dir: &tempdir::Dir) -> String {
    format!(
        "[store]\npath = \"{}\"\nreopen_backoff_min_ms = 20\nreopen_backoff_max_ms = 200\n",
        dir.0.join("data").display().to_string().replace('\\', "/")
    )
}

/// Sets the file size limit of process `pid` (bytes; None = unlimited).
fn limit_file_size(pid: u32, bytes: Option<u64>) {
    let lim = bytes.unwrap_or(libc::RLIM_INFINITY);
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the current limits of our own child into `old`.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(r, 0, "prlimit get: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: lim.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: sets the soft limit of our own child (same user), within its hard limit.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit set: {}", std::io::Error::last_os_error());
}

/// A v3.1.1 device with a persistent session; connects and waits for CONNACK.
async fn connect_device(gw: &GatewayProcess, id: &str) -> v4::Client {
    let mut o = v4::options(gw.mqtt, id);
    o.set_clean_session(false);
    let mut c = v4::connect_raw(o);
    assert!(
        c.wait_for(T, |p| matches!(p, v4::Packet::ConnAck(_))).await,
        "{id}: no CONNACK"
    );
    c
}

async fn push(gw: &GatewayProcess, payload: &str) -> (u16, Value) {
    let body = json!({"client_id": "dev", "topic": "dev/cmd", "payload": payload, "qos": 1});
    post_json(gw.http, "/v1/push", &body).await
}

/// Pushes `prefix-N` (N counting up) until one is answered as `want` says, within T;
/// returns the payloads answered `queued` on the way and the final answer.
async fn push_until(
    gw: &GatewayProcess,
    prefix: &str,
    want: impl Fn(u16, &Value) -> bool,
) -> (Vec<String>, (u16, Value)) {
    let deadline = tokio::time::Instant::now() + T;
    let mut queued = Vec::new();
    for n in 0.. {
        let payload = format!("{prefix}-{n}");
        let (code, body) = push(gw, &payload).await;
        if code == 200 && body["status"] == "queued" {
            queued.push(payload);
        }
        if want(code, &body) {
            return (queued, (code, body));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{prefix}: not reached, last {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_answers_503_then_the_store_reopens_without_a_restart() {
    let dir = tempdir::Dir::new("store-recovery");
    let mut gw = GatewayProcess::start(&store_toml(&dir));
    let mut dev = connect_device(&gw, "dev").await;
    dev.subscribe("dev/cmd", v4::QoS::AtLeastOnce).await;
    dev.client.disconnect().await.expect("disconnect");
    let _ = dev.wait_closed(T).await;
    dev.task.abort();

    let mut promised = Vec::new();
    for n in 0..5 {
        let (code, body) = push(&gw, &format!("before-{n}")).await;
        assert_eq!((code, &body["status"]), (200, &json!("queued")), "{body}");
        promised.push(format!("before-{n}"));
    }

    // The disk "fills": every store write fails from now on.
    limit_file_size(gw.pid(), Some(0));
    let is_refused = |code: u16, _: &Value| code == 503;
    let (queued, (_, body)) = push_until(&gw, "down", is_refused).await;
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(
        queued.is_empty(),
        "nothing is queued while commits fail: {queued:?}"
    );
    assert_eq!(gw.metric("gateway_store_up").await, 0.0);
    assert!(gw.metric("gateway_store_errors_total").await >= 1.0);
    let (code, ready) = http_get(gw.http, "/readyz").await;
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains(r#""store":"down""#), "{ready}");
    // Still refused while the fault lasts (the writer keeps reopening in the background).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = push(&gw, "still-down").await;
    assert_eq!(code, 503, "{body}");

    // The fault clears: the same process takes pushes again.
    limit_file_size(gw.pid(), None);
    let is_queued = |code: u16, body: &Value| code == 200 && body["status"] == "queued";
    let (queued, _) = push_until(&gw, "after", is_queued).await;
    promised.extend(queued);
    assert_eq!(gw.metric("gateway_store_up").await, 1.0);
    let (_, ready) = http_get(gw.http, "/readyz").await;
    assert!(!ready.contains("down"), "{ready}");
    for n in 0..5 {
        let payload = format!("later-{n}");
        let (code, body) = push(&gw, &payload).await;
        assert_eq!((code, &body["status"]), (200, &json!("queued")), "{body}");
        promised.push(payload);
    }

    // Everything answered `queued` is on disk: it survives kill -9.
    gw.signal(libc::SIGKILL);
    assert!(gw.wait_exit(T).is_some(), "gateway did not die");
    let gw = GatewayProcess::start(&store_toml(&dir));
    let mut dev = connect_device(&gw, "dev").await;
    let mut got = Vec::new();
    while let Some(p) = dev.next_publish(Duration::from_secs(3)).await {
        got.push(String::from_utf8_lossy(&p.payload).to_string());
    }
    for p in &promised {
        assert!(
            got.contains(p),
            "{p} was answered queued but is lost: {got:?}"
        );
    }
}

const SUBS: usize = 5;
const FLOOD: usize = 2000;
const BACKLOG_MAX: f64 = 65536.0;

/// One shard (the bound is per shard; a publisher and its subscribers share it), eventual
/// durability (PUBACKs do not wait for commits, so only the bound stops the flood), a
/// writer that keeps at most 50 changes of failed commits and a channel of 2 batches.
fn flood_toml(dir: &tempdir::Dir) -> String {
    format!(
        "{}durability = \"eventual\"\nsync_interval_ms = 50\nmax_batch = 50\nqueue_batches = 2\n\
         backlog_max_bytes = {}\n[shards]\ncount = 1\n[mqtt]\nmax_queued_messages = 10000\n\
         [limits]\npublish_rate = 0\nbytes_rate = 0\n",
        store_toml(dir),
        BACKLOG_MAX as u64
    )
}

/// Counts the PUBACKs the publisher gets while it publishes FLOOD messages.
fn count_pubacks(mut c: v4::Client) -> (tokio::sync::watch::Receiver<usize>, v4::Client) {
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let mut events = std::mem::replace(&mut c.events, tokio::sync::mpsc::unbounded_channel().1);
    tokio::spawn(async move {
        let mut n = 0;
        while let Some(Ok(ev)) = events.recv().await {
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                n += 1;
                let _ = tx.send(n);
            }
        }
    });
    (rx, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_against_a_stalled_store_is_paced_within_the_backlog_bound_and_loses_nothing() {
    let dir = tempdir::Dir::new("store-backlog");
    let mut gw = GatewayProcess::start(&flood_toml(&dir));
    for i in 0..SUBS {
        let mut s = connect_device(&gw, &format!("sub-{i}")).await;
        s.subscribe("flood/t", v4::QoS::AtLeastOnce).await;
        s.client.disconnect().await.expect("disconnect");
        let _ = s.wait_closed(T).await;
        s.task.abort();
    }

    // The store stalls (every write fails); a publisher floods 5 persistent subscribers.
    limit_file_size(gw.pid(), Some(0));
    let publisher = v4::connect(v4::options(gw.mqtt, "pub")).await;
    let (acks, publisher) = count_pubacks(publisher);
    let client = publisher.client.clone();
    let sender = tokio::spawn(async move {
        for n in 0..FLOOD {
            let payload = format!("{n:06}:{}", "x".repeat(1000));
            client
                .publish("flood/t", v4::QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish");
        }
    });

    // The shard reaches its bound and stops reading the publisher.
    let deadline = tokio::time::Instant::now() + T;
    while gw.metric("gateway_publisher_pauses_total").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher was never paced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = *acks.borrow();
    assert!(
        stalled < FLOOD,
        "the whole flood was taken by a stalled store"
    );
    let peak = gw.metric("gateway_store_backlog_peak_bytes").await;
    assert!(peak >= BACKLOG_MAX, "the bound was reached: {peak}");
    // One read's worth of publishes (the client's 100 in flight, ×5 copies) may pass it.
    assert!(
        peak < 2.0 * 1024.0 * 1024.0,
        "the backlog kept growing: peak {peak} bytes"
    );
    let (code, body) = post_json(
        gw.http,
        "/v1/push",
        &json!({"client_id": "sub-0", "topic": "flood/t", "payload": "p", "qos": 1}),
    )
    .await;
    assert_eq!(code, 503, "{body}");
    let why = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ["store_unavailable", "store_backlog"].contains(&why.as_str()),
        "{body}"
    );

    // The store is back: the flood goes on to its end, still within the bound.
    limit_file_size(gw.pid(), None);
    let mut acks = acks;
    tokio::time::timeout(Duration::from_secs(60), acks.wait_for(|&n| n == FLOOD))
        .await
        .expect("every publish is acknowledged once the store is back")
        .expect("publisher alive");
    sender.await.expect("sender");
    let peak = gw.metric("gateway_store_backlog_peak_bytes").await;
    assert!(
        peak < 2.0 * 1024.0 * 1024.0,
        "the backlog kept growing: peak {peak} bytes"
    );
    publisher.client.disconnect().await.expect("disconnect");

    // A graceful stop writes everything (eventual durability); after the restart every
    // subscriber gets every acknowledged message.
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_exit(T).is_some_and(|s| s.success()),
        "graceful stop"
    );
    let gw = GatewayProcess::start(&flood_toml(&dir));
    for i in 0..SUBS {
        let mut s = connect_device(&gw, &format!("sub-{i}")).await;
        let mut seen = std::collections::HashSet::new();
        while seen.len() < FLOOD {
            let Some(p) = s.next_publish(Duration::from_secs(5)).await else {
                break;
            };
            seen.insert(p.payload[..6].to_vec());
        }
        assert_eq!(seen.len(), FLOOD, "sub-{i}: acknowledged messages lost");
        s.task.abort();
    }
}
