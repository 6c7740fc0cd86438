//! TLS handshakes on their own low-priority threads (`[limits] tls_handshake_threads`,
//! `tls_handshake_nice`), against the real gateway binary: one thread per shard by
//! default, at its priority, and the devices they shake hands with are served; their
//! handshakes count against `max_handshaking` and release their counts when they time
//! out; a shutdown with handshakes under way ends; and `tls_handshakes_on_shards`
//! keeps them on the shards.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::tls::{Pki, TlsClient};
use common::GatewayProcess;

/// The name and nice value of each of process `pid`'s TLS handshake threads, by name.
fn handshake_threads(pid: u32) -> Vec<(String, i32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = comm.trim().to_owned();
        if !name.starts_with("tls-handshake-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
        // Fields after the parenthesised command name: state is field 3, nice field 19.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        threads.push((name, after.split(' ').nth(16).unwrap().parse().unwrap()));
    }
    threads.sort();
    threads
}

/// Waits until `n` handshakes are on the handshake thread.
async fn wait_in_progress(gw: &GatewayProcess, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("gateway_tls_handshakes_in_progress").await < n {
        assert!(
            Instant::now() < deadline,
            "the handshakes never reached the thread"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True once the server closed `s` (within `timeout`).
fn closed_within(s: &mut std::net::TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn handshakes_run_on_a_low_priority_thread_and_devices_are_served() {
    let pki = Pki::new();
    let gw = GatewayProcess::start(&format!("{}\n[shards]\ncount = 2\n", pki.toml("")));
    assert_eq!(
        handshake_threads(gw.pid()),
        [
            ("tls-handshake-0".to_owned(), 10),
            ("tls-handshake-1".to_owned(), 10)
        ],
        "one handshake thread per shard, at the default nice 10"
    );
    let cfg = pki.client_config(None, false);
    let tls = gw.tls.unwrap();
    let mut sub = TlsClient::connect(tls, cfg.clone(), b"").unwrap();
    assert_eq!(sub.mqtt_connect("hs-sub"), Ok(0));
    sub.send(&common::frame(0x82, &[0, 1, 0, 3, b'h', b'/', b's', 1]))
        .unwrap();
    assert!(matches!(
        sub.recv(Duration::from_secs(10)),
        Ok(mqttbytes::v4::Packet::SubAck(_))
    ));
    let mut publisher = TlsClient::connect(tls, cfg, b"").unwrap();
    assert_eq!(publisher.mqtt_connect("hs-pub"), Ok(0));
    publisher
        .send(&common::frame(0x30, &[0, 3, b'h', b'/', b's', b'h', b'i']))
        .unwrap();
    let p = sub.expect_publish(Duration::from_secs(10)).unwrap();
    assert_eq!(&p.payload[..], b"hi");
    // The thread's counts reach the totals (the second device resumed with the ticket
    // the first got); none is left in progress.
    for kind in ["full", "resumed"] {
        let sample = format!("gateway_tls_handshakes_total{{kind=\"{kind}\"}}");
        assert_eq!(gw.metric(&sample).await, 1.0, "{kind}");
    }
    assert_eq!(gw.metric("gateway_tls_handshakes_in_progress").await, 0.0);
    assert_eq!(
        gw.metric("gateway_tls_handshakes_deferred_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_threads_handshakes_count_against_max_handshaking_and_are_released() {
    let pki = Pki::new();
    let gw = GatewayProcess::start(&format!(
        "{}\n[shards]\ncount = 1\n[limits]\nmax_handshaking = 2\nmax_connections_per_ip = 2\n",
        pki.toml("connect_timeout_secs = 3")
    ));
    let tls = gw.tls.unwrap();
    let opened = Instant::now();
    let mut stalled = [pki.stalled_handshake(tls), pki.stalled_handshake(tls)];
    wait_in_progress(&gw, 2.0).await;
    // A third device waits in the backlog until the stalled two time out: it takes
    // both the handshake slot and the per-IP count they held.
    let cfg = pki.client_config(None, false);
    let third = std::thread::spawn(move || {
        let mut c = TlsClient::connect(tls, cfg, b"").unwrap();
        (c.mqtt_connect("third"), Instant::now())
    });
    for s in &mut stalled {
        assert!(
            closed_within(s, Duration::from_secs(15)),
            "stalled one open"
        );
    }
    let (code, served_at) = third.join().unwrap();
    assert_eq!(code, Ok(0));
    assert!(
        served_at.duration_since(opened) >= Duration::from_secs(2),
        "the third was let in while max_handshaking were under way"
    );
    assert!(
        gw.metric("gateway_accept_paused_total{reason=\"handshaking\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"connect_timeout\"}")
            .await,
        2.0
    );
    assert_eq!(gw.metric("gateway_tls_handshakes_in_progress").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_handshakes_under_way() {
    let pki = Pki::new();
    let mut gw = GatewayProcess::start(&pki.toml("connect_timeout_secs = 60"));
    let mut stalled = pki.stalled_handshake(gw.tls.unwrap());
    wait_in_progress(&gw, 1.0).await;
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .expect("the gateway exits");
    assert!(status.success(), "{status:?}");
    assert!(closed_within(&mut stalled, Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread")]
async fn handshakes_can_run_on_a_set_number_of_threads_or_on_the_shards() {
    let pki = Pki::new();
    let threads =
        "[shards]\ncount = 2\n[limits]\ntls_handshake_threads = 1\ntls_handshake_nice = 19\n";
    let gw = GatewayProcess::start(&format!("{}\n{threads}", pki.toml("")));
    assert_eq!(
        handshake_threads(gw.pid()),
        [("tls-handshake-0".to_owned(), 19)]
    );
    drop(gw);
    let gw = GatewayProcess::start(&format!(
        "{}\n[limits]\ntls_handshakes_on_shards = true\n",
        pki.toml("")
    ));
    assert!(handshake_threads(gw.pid()).is_empty());
    let mut c = TlsClient::connect(gw.tls.unwrap(), pki.client_config(None, false), b"").unwrap();
    assert_eq!(c.mqtt_connect("on-the-shard"), Ok(0));
    assert_eq!(
        gw.metric("gateway_tls_handshakes_total{kind=\"full\"}")
            .await,
        1.0
    );
}
