//! Observability of a live gateway: the `/metrics` exposition (every family the gateway
//! promises, valid for `promtool check metrics`), the shipped alert rules and Prometheus
//! config (`promtool check rules` / `check config`), and a real Prometheus that scrapes the
//! gateway, evaluates every alert rule and answers every query of the Grafana dashboard.
//!
//! `prometheus` and `promtool` come from the Debian package `prometheus`: tests needing them
//! are skipped with a printed reason when they are missing locally, and fail under CI (`CI`
//! set), where `.ci/run` installs them.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::v4::{self, QoS};
use common::{tempdir, TestServer};
use serde_json::Value;

/// Every family the gateway exports, with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("gateway_connections", "gauge"),
    ("gateway_sessions", "gauge"),
    ("gateway_subscriptions", "gauge"),
    ("gateway_queued_messages", "gauge"),
    ("gateway_wheel_entries", "gauge"),
    ("gateway_connects_total", "counter"),
    ("gateway_connect_refused_total", "counter"),
    ("gateway_disconnects_total", "counter"),
    ("gateway_packets_received_total", "counter"),
    ("gateway_packets_sent_total", "counter"),
    ("gateway_bytes_received_total", "counter"),
    ("gateway_bytes_sent_total", "counter"),
    ("gateway_messages_dropped_total", "counter"),
    ("gateway_push_requests_total", "counter"),
    ("gateway_push_messages_total", "counter"),
    ("gateway_push_duration_seconds", "histogram"),
    ("gateway_connection_age_seconds", "histogram"),
    ("gateway_buffer_pool_bytes", "gauge"),
    ("gateway_buffer_pool_takes_total", "counter"),
    ("gateway_log_lines_dropped_total", "counter"),
    ("gateway_shard_busy_ratio", "gauge"),
    ("gateway_shard_busy_seconds_total", "counter"),
    ("gateway_shard_polls_total", "counter"),
    ("gateway_uptime_seconds", "gauge"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_start_time_seconds", "gauge"),
];

/// Families with one sample per shard.
const PER_SHARD: &[&str] = &[
    "gateway_connections",
    "gateway_sessions",
    "gateway_wheel_entries",
    "gateway_shard_busy_ratio",
    "gateway_shard_busy_seconds_total",
    "gateway_shard_polls_total",
];

/// The prefix of the families only a fleet node exports (`[cluster] enabled`).
const FLEET: &str = "gateway_fleet_";

/// The alerts operators were promised (dashboards/alerts.yml).
const ALERTS: &[&str] = &[
    "GatewayConnectionsDroppingFast",
    "GatewayDisconnectsSpiking",
    "GatewayMessageDropsRising",
    "GatewaySlowConsumers",
    "GatewayShardBusy",
    "GatewayFdsNearLimit",
    "GatewayLogLinesDropped",
    "GatewayEventsDropped",
];

/// A webhook that takes every batch (a real HTTP server on a free loopback port), and the
/// `[events]` section sending to it: the traffic's events are delivered, so the
/// `gateway_events_*` families the panels and the alert use have data.
async fn events_sink() -> String {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/hook", post(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("[events]\nwebhook_url = \"http://{addr}/hook\"\nlinger_ms = 10\n")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn have(bin: &str) -> bool {
    common::have_binary(bin, "prometheus")
}

/// Some MQTT and push traffic, so that counters, histograms and per-type labels move.
/// Returns the client, still connected.
async fn traffic(gw: &TestServer) -> v4::Client {
    let mut c = v4::connect(v4::options(gw.mqtt, "observer")).await;
    c.subscribe("obs/+", QoS::AtLeastOnce).await;
    c.client
        .publish("obs/a", QoS::AtLeastOnce, false, "one")
        .await
        .expect("publish");
    assert!(c.next_publish(Duration::from_secs(5)).await.is_some());
    let (code, body) = common::post_json(
        gw.http,
        "/v1/push",
        &serde_json::json!({"client_id": "observer", "topic": "obs/push", "payload": "two", "qos": 1}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(c.next_publish(Duration::from_secs(5)).await.is_some());
    // A second client that comes and goes: a connect, a DISCONNECT, a closed connection.
    let mut brief = v4::connect(v4::options(gw.mqtt, "brief")).await;
    brief.client.disconnect().await.expect("disconnect");
    brief.wait_closed(Duration::from_secs(5)).await;
    c
}

/// `# TYPE` lines: family name → type.
fn types(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

/// Sample names (histograms contribute `_bucket`, `_sum` and `_count`).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every metric name a file mentions: `gateway_…` and `process_…` identifiers.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let end = (i..bytes.len())
                .find(|&j| !ident(bytes[j]))
                .unwrap_or(bytes.len());
            let word = &text[i..end];
            if word.starts_with("gateway_") || word.starts_with("process_") {
                names.insert(word.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test]
async fn every_family_is_exported_with_its_type_and_moves_with_traffic() {
    let gw = TestServer::start("");
    let _c = traffic(&gw).await;
    let disconnects = gw
        .wait_metric(
            "gateway_disconnects_total{reason=\"client\"}",
            Duration::from_secs(5),
            |v| v >= 1.0,
        )
        .await;
    assert!(disconnects >= 1.0);
    let text = gw.metrics().await;

    let declared = types(&text);
    for (name, kind) in FAMILIES {
        let found: Vec<_> = declared.iter().filter(|(n, _)| n == name).collect();
        assert_eq!(found.len(), 1, "one # TYPE line for {name} in:\n{text}");
        assert_eq!(found[0].1, *kind, "type of {name}");
    }
    for name in PER_SHARD {
        for shard in ["0", "1"] {
            common::metric_value(&text, &format!("{name}{{shard=\"{shard}\"}}"));
        }
    }
    for (sample, at_least) in [
        ("gateway_connections", 1.0),
        ("gateway_sessions", 1.0),
        ("gateway_subscriptions", 1.0),
        ("gateway_connects_total", 2.0),
        ("gateway_packets_received_total{type=\"connect\"}", 2.0),
        ("gateway_packets_received_total{type=\"subscribe\"}", 1.0),
        ("gateway_packets_received_total{type=\"publish\"}", 1.0),
        ("gateway_packets_sent_total{type=\"connack\"}", 2.0),
        ("gateway_packets_sent_total{type=\"publish\"}", 2.0),
        ("gateway_bytes_received_total", 10.0),
        ("gateway_bytes_sent_total", 10.0),
        ("gateway_push_messages_total{status=\"sent\"}", 1.0),
        (
            "gateway_push_requests_total{endpoint=\"push\",code=\"200\"}",
            1.0,
        ),
        ("gateway_push_duration_seconds_count", 1.0),
        ("process_resident_memory_bytes", 1.0),
        ("process_open_fds", 3.0),
        ("process_max_fds", 3.0),
    ] {
        let v = common::metric_value(&text, sample);
        assert!(v >= at_least, "{sample} = {v}, expected >= {at_least}");
    }
    for histogram in [
        "gateway_push_duration_seconds",
        "gateway_connection_age_seconds",
    ] {
        let inf = common::metric_value(&text, &format!("{histogram}_bucket{{le=\"+Inf\"}}"));
        let count = common::metric_value(&text, &format!("{histogram}_count"));
        assert_eq!(inf, count, "{histogram}: +Inf bucket and _count differ");
        common::metric_value(&text, &format!("{histogram}_sum"));
    }
    for state in ["pooled", "lent"] {
        common::metric_value(
            &text,
            &format!("gateway_buffer_pool_bytes{{state=\"{state}\"}}"),
        );
    }
}

/// Needs the shard to run its loop under `ShardMetrics::monitor`, to call
/// `observe_connection_age` when it closes a connection, and to publish its buffer pool's
/// hits and misses (src/shard/mod.rs).
#[tokio::test]
async fn shard_loop_connection_age_and_pool_takes_are_measured() {
    let gw = TestServer::start("");
    let _c = traffic(&gw).await;
    let polls = gw
        .wait_metric("gateway_shard_polls_total", Duration::from_secs(5), |v| {
            v > 0.0
        })
        .await;
    assert!(
        polls > 0.0,
        "no shard polls counted: shard::spawn must run `monitor.instrument(shard.run(rx))`"
    );
    let busy = gw.metric("gateway_shard_busy_seconds_total").await;
    assert!(busy > 0.0, "polls counted but no busy time");
    // "brief" connected and disconnected in traffic().
    let aged = gw
        .wait_metric(
            "gateway_connection_age_seconds_count",
            Duration::from_secs(5),
            |v| v >= 1.0,
        )
        .await;
    assert!(
        aged >= 1.0,
        "no connection age observed: Shard::close_conn must call observe_connection_age"
    );
    let young = gw
        .metric("gateway_connection_age_seconds_bucket{le=\"60.0\"}")
        .await;
    assert!(young >= 1.0, "a connection of a few seconds is in le=60");
    let takes = gw.metric("gateway_buffer_pool_takes_total").await;
    assert!(
        takes >= 1.0,
        "no buffer pool takes: publish_gauges must set pool_hits and pool_misses"
    );
    let text = gw.metrics().await;
    for shard in ["0", "1"] {
        let ratio = common::metric_value(
            &text,
            &format!("gateway_shard_busy_ratio{{shard=\"{shard}\"}}"),
        );
        assert!((0.0..=1.0).contains(&ratio), "busy ratio {ratio}");
    }
}

#[tokio::test]
async fn promtool_check_metrics_passes_on_a_live_scrape() {
    if !have("promtool") {
        return;
    }
    let gw = TestServer::start("");
    let _c = traffic(&gw).await;
    let text = gw.metrics().await;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .expect("scrape to promtool");
    let out = child.wait_with_output().expect("promtool finishes");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\non:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_alert_rules_and_the_prometheus_config() {
    if !have("promtool") {
        return;
    }
    for args in [
        ["check", "rules", "dashboards/alerts.yml"],
        // Also checks the rule files the config loads.
        ["check", "config", "dashboards/prometheus.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A Prometheus server started for one test; killed (by its pid) and reaped on drop,
/// panics included.
struct Prometheus {
    child: Child,
    base: String,
    http: reqwest::Client,
    dir: tempdir::Dir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second (job `gateway`) with `rules`
    /// evaluated every second, on a free loopback port; waits until it is ready.
    async fn start(target: SocketAddr, rules: &Path) -> Prometheus {
        let dir = tempdir::Dir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules = rules.display()
            ),
        )
        .expect("prometheus.yml");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let mut p = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            let ready = p
                .http
                .get(format!("{}/-/ready", p.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 60 s:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .send()
            .await
            .expect("prometheus answers");
        resp.json().await.expect("JSON from the prometheus API")
    }

    /// An instant query: `(status, result)`; status is "success" or the error.
    async fn query(&self, expr: &str) -> (String, Vec<Value>) {
        let v = self.api("/api/v1/query", &[("query", expr)]).await;
        let status = match v["status"].as_str() {
            Some("success") => "success".to_owned(),
            _ => format!("{}: {}", v["errorType"], v["error"]),
        };
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        (status, result)
    }

    /// Waits until `expr` returns a sample whose value satisfies `pred`.
    async fn wait_for(&self, expr: &str, timeout: Duration, pred: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, result) = self.query(expr).await;
            let value = result
                .first()
                .and_then(|r| r["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok());
            if value.is_some_and(&pred) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} never satisfied the condition (last {value:?});\nprometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Every PromQL expression of a Grafana dashboard (row panels nest theirs).
fn dashboard_exprs(panels: &[Value], out: &mut Vec<(String, String)>) {
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?").to_owned();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has an expr");
            out.push((title.clone(), expr.to_owned()));
        }
        if let Some(nested) = p["panels"].as_array() {
            dashboard_exprs(nested, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_gateway_and_evaluates_every_dashboard_query_and_alert_rule() {
    if !have("prometheus") {
        return;
    }
    let gw = TestServer::start(&events_sink().await);
    let _c = traffic(&gw).await;
    // The traffic's events: observer and brief connected, brief disconnected.
    let sent = "gateway_events_sent_total{sink=\"webhook\"}";
    let delivered = gw
        .wait_metric(sent, Duration::from_secs(20), |v| v >= 3.0)
        .await;
    assert!(
        delivered >= 3.0,
        "events delivered to the webhook: {delivered}"
    );
    let scrape = gw.metrics().await;
    let mut exported = sample_names(&scrape);
    exported.extend(types(&scrape).into_iter().map(|(name, _)| name));

    // Only metrics the gateway exports, anywhere in the dashboards and the rules.
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("dashboards"))
        .expect("dashboards/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards/*.json");
    files.push(repo("dashboards/alerts.yml"));
    let mut used = BTreeSet::new();
    for f in &files {
        let names = metric_names_in(&std::fs::read_to_string(f).expect("readable"));
        // The fleet's families exist only on a fleet node: tests/fleet_observability.rs.
        let unknown: Vec<_> = names
            .difference(&exported)
            .filter(|n| !n.starts_with(FLEET))
            .collect();
        assert!(
            unknown.is_empty(),
            "{} uses unexported metrics {unknown:?}",
            f.display()
        );
        used.extend(names);
    }
    // The dashboard covers what operators asked for.
    for needed in [
        "gateway_connections",
        "gateway_sessions",
        "gateway_connects_total",
        "gateway_disconnects_total",
        "gateway_packets_received_total",
        "gateway_packets_sent_total",
        "gateway_bytes_received_total",
        "gateway_bytes_sent_total",
        "gateway_push_requests_total",
        "gateway_push_messages_total",
        "gateway_push_duration_seconds_bucket",
        "gateway_messages_dropped_total",
        "gateway_congested_connections",
        "gateway_publisher_pauses_total",
        "gateway_publisher_pause_seconds_total",
        "gateway_paced_publishers",
        "gateway_output_buffer_bytes",
        "process_resident_memory_bytes",
        "gateway_shard_busy_ratio",
        "gateway_log_lines_dropped_total",
        "process_open_fds",
        "gateway_events_sent_total",
        "gateway_events_retried_total",
        "gateway_events_dropped_total",
        "gateway_events_queue_depth",
        "gateway_events_delivery_seconds_bucket",
        "gateway_tls_handshakes_total",
        "gateway_tls_handshakes_in_progress",
    ] {
        assert!(used.contains(needed), "no panel or rule uses {needed}");
    }

    let prom = Prometheus::start(gw.http, &repo("dashboards/alerts.yml")).await;
    prom.wait_for("up{job=\"gateway\"}", Duration::from_secs(60), |v| v == 1.0)
        .await;
    // Enough scrapes for rate() over any window.
    prom.wait_for(
        "count_over_time(gateway_uptime_seconds{job=\"gateway\"}[5m])",
        Duration::from_secs(60),
        |v| v >= 3.0,
    )
    .await;

    // Every dashboard query, as Grafana sends it with job "gateway" and all instances.
    let mut exprs = Vec::new();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "json"))
    {
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(f).expect("readable")).expect("JSON");
        dashboard_exprs(dashboard["panels"].as_array().expect("panels"), &mut exprs);
    }
    assert!(exprs.len() >= 20, "only {} dashboard queries", exprs.len());
    let mut failures = Vec::new();
    for (title, expr) in &exprs {
        let promql = expr.replace("$job", "gateway").replace("$instance", ".*");
        if promql.contains(FLEET) {
            continue;
        }
        assert!(!promql.contains('$'), "{title}: unknown variable in {expr}");
        let (status, result) = prom.query(&promql).await;
        if status != "success" || result.is_empty() {
            failures.push(format!(
                "{title}: {promql}\n  -> {status}, {} series",
                result.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries without data:\n{}",
        failures.join("\n")
    );

    // Every alert rule loaded, and evaluated without error.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = prom.api("/api/v1/rules", &[]).await;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        for r in &rules {
            assert_ne!(
                r["health"], "err",
                "rule {} failed: {}",
                r["name"], r["lastError"]
            );
        }
        let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
        for alert in ALERTS {
            assert!(
                names.contains(alert),
                "alert {alert} missing from {names:?}"
            );
        }
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated in 60 s: {rules:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Each rule's expression also answers as a plain query.
    let v = prom.api("/api/v1/rules", &[]).await;
    for g in v["data"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            let expr = r["query"].as_str().expect("rule query");
            let (status, _) = prom.query(expr).await;
            assert_eq!(status, "success", "rule {}: {expr}", r["name"]);
        }
    }
}
