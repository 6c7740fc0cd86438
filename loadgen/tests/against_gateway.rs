//! Every loadgen subcommand, run as the real binary against a real gateway on loopback.
//!
//! Each test starts its own gateway inside the test process (ephemeral ports, two
//! shards), runs `loadgen ... --json --quiet` as a subprocess with small, bounded numbers,
//! and asserts the summary line — and, where loadgen could be wrong about it, what the
//! gateway itself reports on `/metrics`, so a loadgen that miscounts fails here.

use std::net::TcpListener;
use std::time::Duration;

mod common;

use common::gateway::Gateway;
use common::{loadgen, u};

/// Where a test's `--plot` goes (removed again by [`take_plot`]).
fn plot_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("loadgen-{name}-{}.svg", std::process::id()))
}

/// The SVG loadgen wrote, removed from disk.
fn take_plot(path: &std::path::Path) -> String {
    let svg = std::fs::read_to_string(path).expect("plot written");
    let _ = std::fs::remove_file(path);
    svg
}

#[test]
fn connect_holds_every_connection_and_the_gateway_sees_them() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let metrics = gw.metrics_url();
    let pid = std::process::id().to_string();
    let plot = plot_path("connect");
    let out = loadgen(&[
        "connect",
        "--target",
        &target,
        "--conns",
        "500",
        "--rate",
        "5000",
        "--hold",
        "2",
        "--metrics-url",
        &metrics,
        "--server-pid",
        &pid,
        "--plot",
        plot.to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(s["command"], "connect");
    assert_eq!(u(&s["connected"]), 500, "{s}");
    assert_eq!(u(&s["failed"]), 0, "{s}");
    assert_eq!(u(&s["live_at_end"]), 500, "{s}");
    assert_eq!(u(&s["dropped"]), 0, "{s}");
    assert_eq!(u(&s["latency_ms"]["count"]), 500, "{s}");
    assert_eq!(u(&s["subscribe_latency_ms"]["count"]), 500, "{s}");
    let p50 = s["latency_ms"]["p50"].as_f64().unwrap();
    let max = s["latency_ms"]["max"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= max, "{s}");
    assert!(s["connect_rate"].as_f64().unwrap() > 0.0, "{s}");
    // What the gateway itself counted while loadgen held the connections.
    assert_eq!(s["server"]["connections_loaded"], 500.0, "{s}");
    assert!(s["server"]["rss_before_mb"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["server"]["bytes_per_conn"].is_number(), "{s}");
    assert_eq!(
        gw.wait_metric("gateway_connections", 0.0, Duration::from_secs(10)),
        0.0
    );
    assert!(gw.metric("gateway_connects_total") >= 500.0);

    let svg = take_plot(&plot);
    assert!(svg.starts_with("<svg"));
    assert!(svg.contains("connections over time") && svg.contains("CONNACK latency"));
}

#[test]
fn connect_v5_over_two_processes_answers_keepalive() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    // Keep-alive 1 s: the gateway closes a connection silent for 1.5 s, so the 3 s hold
    // only keeps them all if loadgen's shared ticker sends PINGREQs.
    let out = loadgen(&[
        "connect",
        "--target",
        &target,
        "--conns",
        "300",
        "--rate",
        "3000",
        "--hold",
        "3",
        "--protocol",
        "5",
        "--keepalive",
        "1",
        "--procs",
        "2",
        "--source-range",
        "127.0.0.2-127.0.0.9",
        "--client-id",
        "v5dev-{i}",
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["procs"]), 2, "{s}");
    assert_eq!(u(&s["protocol"]), 5, "{s}");
    assert_eq!(u(&s["source_addresses"]), 8, "{s}");
    assert_eq!(u(&s["connected"]), 300, "{s}");
    assert_eq!(u(&s["dropped"]), 0, "{s}");
    assert_eq!(u(&s["live_at_end"]), 300, "{s}");
    assert!(
        u(&s["pongs"]) >= 600,
        "every device pings at least twice in 3 s: {s}"
    );
    assert_eq!(
        gw.metric("gateway_disconnects_total{reason=\"keepalive\"}"),
        0.0,
        "no keep-alive expiry on the gateway"
    );
}

#[test]
fn connect_failures_are_counted_by_cause() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("127.0.0.1:{port}");
    let out = loadgen(&[
        "connect", "--target", &target, "--conns", "50", "--rate", "1000", "--hold", "0", "--json",
        "--quiet",
    ]);
    // The summary still says what happened, but a run that measured nothing fails.
    assert_eq!(out.code, 3, "stderr: {}", out.stderr);
    assert!(out.stderr.contains("measured nothing"), "{}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["connected"]), 0, "{s}");
    assert_eq!(u(&s["failed"]), 50, "{s}");
    assert_eq!(u(&s["failures"]["tcp_refused"]), 50, "{s}");
    assert!(s["latency_ms"].is_null(), "{s}");
}

#[test]
fn limits_are_checked_before_anything_connects() {
    let out = loadgen(&[
        "connect",
        "--target",
        "127.0.0.1:1",
        "--conns",
        "2000000000",
        "--procs",
        "1",
        "--json",
    ]);
    assert_eq!(out.code, 2, "stdout: {}", out.stdout);
    assert!(
        out.stderr.contains("RLIMIT_NOFILE") && out.stderr.contains("--procs"),
        "explains the open-files limit and the way out: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty());

    let out = loadgen(&["connect", "--target", "192.0.2.1:1883", "--conns", "1"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("--allow-remote"), "{}", out.stderr);

    let out = loadgen(&[
        "connect",
        "--target",
        "127.0.0.1:1",
        "--conns",
        "10",
        "--source-range",
        "10.0.0.1-10.0.0.5",
    ]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("127.0.0.0/8"), "{}", out.stderr);
}

#[test]
fn push_delivers_every_accepted_message_once() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let http = format!("http://{}", gw.http);
    let out = loadgen(&[
        "push",
        "--target",
        &target,
        "--http",
        &http,
        "--conns",
        "200",
        "--rate",
        "400",
        "--duration",
        "2",
        "--qos",
        "1",
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["devices_connected"]), 200, "{s}");
    assert_eq!(u(&s["sent"]), 800, "{s}");
    assert_eq!(u(&s["accepted"]), 800, "{s}");
    assert_eq!(u(&s["statuses"]["sent"]), 800, "{s}");
    assert_eq!(u(&s["delivered"]), 800, "{s}");
    assert_eq!(u(&s["lost"]), 0, "{s}");
    assert_eq!(u(&s["duplicated"]), 0, "{s}");
    assert_eq!(u(&s["latency_ms"]["count"]), 800, "{s}");
    for k in ["p50", "p90", "p99", "p999", "max"] {
        assert!(s["latency_ms"][k].as_f64().unwrap() >= 0.0, "{k}: {s}");
    }
    assert_eq!(s["endpoint"], "/v1/push");
}

#[test]
fn push_batches_at_qos0_without_loss() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let http = format!("http://{}", gw.http);
    let out = loadgen(&[
        "push",
        "--target",
        &target,
        "--http",
        &http,
        "--conns",
        "100",
        "--rate",
        "1000",
        "--duration",
        "2",
        "--batch",
        "50",
        "--qos",
        "0",
        "--size",
        "100",
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(s["endpoint"], "/v1/push/batch");
    assert_eq!(u(&s["sent"]), 2000, "{s}");
    assert_eq!(u(&s["accepted"]), 2000, "{s}");
    assert_eq!(u(&s["delivered"]), 2000, "{s}");
    assert_eq!(u(&s["lost"]), 0, "{s}");
    assert_eq!(u(&s["duplicated"]), 0, "{s}");
    assert!(u(&s["http_latency_ms"]["count"]) >= 40, "{s}");
}

#[test]
fn push_counts_match_what_the_gateway_wrote() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let http = format!("http://{}", gw.http);
    let out = loadgen(&[
        "push",
        "--target",
        &target,
        "--http",
        &http,
        "--conns",
        "10",
        "--rate",
        "50",
        "--duration",
        "1",
        "--qos",
        "0",
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["sent"]), 50, "{s}");
    assert_eq!(u(&s["delivered"]), 50, "{s}");
    assert_eq!(u(&s["delivered"]) + u(&s["lost"]), u(&s["accepted"]), "{s}");
    // Cross-check with the gateway's own count of PUBLISHes written to devices.
    assert_eq!(
        gw.metric("gateway_packets_sent_total{type=\"publish\"}"),
        50.0,
        "the gateway wrote exactly the PUBLISHes loadgen counted"
    );
}

#[test]
fn fanout_reaches_every_subscriber() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let out = loadgen(&[
        "fanout",
        "--target",
        &target,
        "--subscribers",
        "40",
        "--rate",
        "100",
        "--duration",
        "2",
        "--qos",
        "1",
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["subscribed"]), 40, "{s}");
    assert_eq!(u(&s["published"]), 200, "{s}");
    assert_eq!(u(&s["publish_acked"]), 200, "{s}");
    assert_eq!(u(&s["expected"]), 8000, "{s}");
    assert_eq!(u(&s["delivered"]), 8000, "{s}");
    assert_eq!(u(&s["lost"]), 0, "{s}");
    assert_eq!(u(&s["duplicated"]), 0, "{s}");
    assert_eq!(u(&s["latency_ms"]["count"]), 8000, "{s}");
}

/// `--topic` with `{id}`: each subscriber has its own topic, the publisher goes round
/// robin, and each subscriber expects only its share.
#[test]
fn fanout_to_per_device_topics_sends_each_message_to_one_subscriber() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let out = loadgen(&[
        "fanout",
        "--target",
        &target,
        "--subscribers",
        "30",
        "--topic",
        "dev/{id}/cmd",
        "--rate",
        "100",
        "--duration",
        "2",
        "--qos",
        "1",
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["published"]), 200, "{s}");
    assert_eq!(u(&s["expected"]), 200, "{s}");
    assert_eq!(u(&s["delivered"]), 200, "{s}");
    assert_eq!(u(&s["lost"]), 0, "{s}");
    assert_eq!(u(&s["lost_per_subscriber"]["with_loss"]), 0, "{s}");
}

#[test]
fn fanout_burst_to_qos2_v311_subscribers_reports_loss_per_subscriber() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let plot = plot_path("fanout");
    // What issue 18's benchmark does, small: a publisher speaking MQTT 5 sends a burst
    // with a bounded window to 3.1.1 subscribers holding QoS 2 subscriptions. At QoS 2
    // both sides run the PUBREC/PUBREL/PUBCOMP exchange.
    let out = loadgen(&[
        "fanout",
        "--target",
        &target,
        "--subscribers",
        "5",
        "--protocol",
        "5",
        "--sub-version",
        "4",
        "--qos",
        "2",
        "--sub-qos",
        "2",
        "--window",
        "8",
        "--burst",
        "300",
        "--client-id",
        "burst-{i}",
        "--expect-no-loss",
        "--drain",
        "30",
        "--plot",
        plot.to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(
        (u(&s["sub_qos"]), u(&s["sub_protocol"]), u(&s["protocol"])),
        (2, 4, 5),
        "{s}"
    );
    assert_eq!((u(&s["window"]), u(&s["burst"])), (8, 300), "{s}");
    assert_eq!(u(&s["subscribed"]), 5, "{s}");
    assert_eq!(u(&s["published"]), 300, "{s}");
    assert_eq!(u(&s["publish_acked"]), 300, "{s}");
    assert_eq!(u(&s["delivered"]), 1500, "{s}");
    assert_eq!((u(&s["lost"]), u(&s["duplicated"])), (0, 0), "{s}");
    let per = &s["lost_per_subscriber"];
    assert_eq!(u(&per["subscribers"]), 5, "{s}");
    assert_eq!((u(&per["max"]), u(&per["with_loss"])), (0, 0), "{s}");
    // The gateway itself completed a QoS 2 exchange for every PUBLISH it took and every
    // one it delivered.
    assert_eq!(
        gw.metric("gateway_packets_received_total{type=\"pubrel\"}"),
        300.0
    );
    assert_eq!(
        gw.metric("gateway_packets_received_total{type=\"pubcomp\"}"),
        1500.0
    );
    assert_eq!(
        gw.metric("gateway_packets_sent_total{type=\"publish\"}"),
        1500.0,
        "the gateway wrote exactly the deliveries loadgen counted"
    );
    let svg = take_plot(&plot);
    assert!(svg.contains("fanout: messages per second") && svg.contains("delivered/s"));
}

#[test]
fn fanout_with_nobody_subscribed_fails() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    // Every SUBSCRIBE is to an invalid filter: the gateway refuses it, nobody listens.
    let out = loadgen(&[
        "fanout",
        "--target",
        &target,
        "--subscribers",
        "3",
        "--topic",
        "bad/#/filter",
        "--burst",
        "10",
        "--drain",
        "1",
        "--json",
        "--quiet",
    ]);
    assert_eq!(
        out.code, 3,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert_eq!(u(&out.summary()["subscribed"]), 0);
}

#[test]
fn churn_probes_leave_no_connection_behind() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let metrics = gw.metrics_url();
    let plot = plot_path("churn");
    let out = loadgen(&[
        "churn",
        "--target",
        &target,
        "--count",
        "400",
        "--rate",
        "2000",
        "--mode",
        "both",
        "--metrics-url",
        &metrics,
        "--plot",
        plot.to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    let svg = take_plot(&plot);
    assert!(svg.contains("probes/s") && svg.contains("failures/s"));
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let s = out.summary();
    assert_eq!(u(&s["probes"]), 400, "{s}");
    assert_eq!(u(&s["completed"]), 400, "{s}");
    assert_eq!(u(&s["failed"]), 0, "{s}");
    assert_eq!(u(&s["latency_ms"]["count"]), 400, "{s}");
    // Half the probes sent CONNECT and reset: the gateway accepted them and must have
    // cleaned every one up.
    assert_eq!(
        gw.wait_metric("gateway_connections", 0.0, Duration::from_secs(10)),
        0.0
    );
    assert!(gw.metric("gateway_connects_total") >= 200.0);
}

#[test]
fn storm_brings_every_device_back_with_and_without_backoff() {
    let gw = Gateway::start();
    let target = gw.mqtt.to_string();
    let metrics = gw.metrics_url();
    let plot = plot_path("storm");
    // Without --json: the Markdown table comes first, the JSON line last.
    let out = loadgen(&[
        "storm",
        "--target",
        &target,
        "--conns",
        "200",
        "--connect-rate",
        "4000",
        "--backoff",
        "both",
        "--backoff-base-ms",
        "50",
        "--backoff-max-ms",
        "500",
        "--round-timeout",
        "30",
        "--settle",
        "0",
        "--metrics-url",
        &metrics,
        "--plot",
        plot.to_str().unwrap(),
        "--quiet",
    ]);
    // Each round is drawn from its own events, however short it was.
    let svg = take_plot(&plot);
    for label in [
        "round 1 drop",
        "round 2 drop",
        "round 1 back",
        "round 2 all back",
    ] {
        assert!(svg.contains(label), "{label} missing from the plot");
    }
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert!(
        out.stdout.starts_with("| metric | value |"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("| connected | 200 |"), "{}", out.stdout);
    let s = out.summary();
    assert_eq!(u(&s["connected"]), 200, "{s}");
    let rounds = s["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{s}");
    assert_eq!(rounds[0]["backoff"], "none");
    assert_eq!(rounds[1]["backoff"], "jitter");
    for r in rounds {
        assert_eq!(u(&r["dropped"]), 200, "{r}");
        assert_eq!(u(&r["back"]), 200, "{r}");
        assert_eq!(r["all_back"], true, "{r}");
        assert!(r["time_to_all_back_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(u(&r["attempts"]) >= 200, "{r}");
        assert_eq!(u(&r["reconnect_ms"]["count"]), 200, "{r}");
    }
    assert_eq!(s["server"]["connections_loaded"], 200.0, "{s}");
    // 200 initial connects and 200 reconnects per round.
    assert!(gw.metric("gateway_connects_total") >= 600.0);
    assert_eq!(
        gw.wait_metric("gateway_connections", 0.0, Duration::from_secs(10)),
        0.0
    );
}
