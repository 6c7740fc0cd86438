//! No dead connection is ever left behind: peers that half-close and load-balancer probe
//! churn. Keep-alive expiry and subscribers that stop reading (write stall) are timers,
//! tested on a manual clock in `src/shard/sim/timed/`.

mod common;

use std::time::{Duration, Instant};

use common::{connect_from, GatewayProcess, Raw, TestServer};
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(5);

/// Counts sockets in CLOSE_WAIT whose local port is `port` (/proc/net/tcp, state 08).
fn close_wait_on(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "08"
                && f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

#[tokio::test]
async fn half_closed_peers_leave_no_close_wait() {
    let gw = TestServer::start("");
    let mut clients = Vec::new();
    for i in 0..1000 {
        let mut s = connect_from(i, gw.mqtt).await.expect("connect");
        // Half are MQTT sessions, half are bare sockets that never send CONNECT.
        if i % 2 == 1 {
            s.write_all(&Raw::connect_v4(&format!("half-{i}"), 60, true))
                .await
                .unwrap();
        }
        clients.push(s);
    }
    gw.wait_metric("gateway_connections", T, |v| v == 1000.0)
        .await;
    for s in &mut clients {
        s.shutdown().await.unwrap(); // FIN: half-close, keep our read side open
    }
    let started = Instant::now();
    let conns = gw
        .wait_metric("gateway_connections", Duration::from_secs(2), |v| v == 0.0)
        .await;
    assert_eq!(conns, 0.0, "connections left after half-close");
    while close_wait_on(gw.port()) > 0 && started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        close_wait_on(gw.port()),
        0,
        "CLOSE_WAIT sockets on the gateway port"
    );
    // The sessions' FIN counts as close_wait; the bare sockets never sent CONNECT, so
    // theirs counts as a probe (as a load balancer's health check would).
    let close_wait = gw
        .metric("gateway_disconnects_total{reason=\"close_wait\"}")
        .await;
    let probes = gw
        .metric("gateway_disconnects_total{reason=\"probe\"}")
        .await;
    assert!(probes >= 500.0, "{probes} probes");
    assert!(close_wait + probes >= 1000.0, "{close_wait} + {probes}");
    assert_eq!(gw.metric("gateway_sessions").await, 0.0);
}

#[tokio::test]
async fn probe_churn_returns_to_baseline() {
    let gw = GatewayProcess::start("");
    let addr = gw.mqtt;
    // Warm up the HTTP side so its own connections are part of the baseline.
    let _ = gw.metric("gateway_connections").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = gw.open_fds();

    // 20,000 load-balancer probes: TCP connect, then close, no MQTT at all.
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..100usize {
        tasks.spawn(async move {
            let mut ok = 0;
            for j in 0..200 {
                if connect_from(worker * 200 + j, addr).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut probes = 0;
    while let Some(n) = tasks.join_next().await {
        probes += n.unwrap();
    }
    assert_eq!(probes, 20_000);

    // 5,000 devices that CONNECT and then vanish with a RST.
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..50usize {
        tasks.spawn(async move {
            for j in 0..100 {
                let i = worker * 100 + j;
                let mut s = connect_from(i, addr).await.unwrap();
                s.write_all(&Raw::connect_v4(&format!("probe-{i}"), 60, true))
                    .await
                    .unwrap();
                let mut b = [0u8; 4];
                let _ = tokio::io::AsyncReadExt::read_exact(&mut s, &mut b).await; // CONNACK
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(s);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Count fds before scraping: the scrape's own HTTP connection is not a leak.
        let fds = gw.open_fds();
        let conns = gw.metric("gateway_connections").await;
        let sessions = gw.metric("gateway_sessions").await;
        if (conns == 0.0 && sessions == 0.0 && fds <= baseline) || Instant::now() > deadline {
            assert_eq!(conns, 0.0, "connections left behind");
            assert_eq!(sessions, 0.0, "sessions left behind");
            assert!(
                fds <= baseline,
                "fds {fds} above baseline {baseline}: {:?}",
                gw.fd_targets()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gw.metric("gateway_connects_total").await >= 5000.0);
}
