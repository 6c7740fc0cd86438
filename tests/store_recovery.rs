//! The store after a real write failure, without a restart (issue 24.3): a file size
//! limit put on the running gateway (`prlimit`, as its own user: no privilege needed)
//! makes every store write fail with EFBIG, as a full disk would. Then commits fail, the
//! store is down (`gateway_store_up 0`, `/readyz` says so), and a QoS 1 push to a
//! persistent session is refused with 503 `store_unavailable`; once the limit is lifted
//! the writer's reopen succeeds and pushes are `queued` again, and every push answered
//! `queued` (before and after) is delivered after a `kill -9` and restart.

mod common;

use std::time::Duration;

use common::{http_get, post_json, tempdir, v4, GatewayProcess};
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
