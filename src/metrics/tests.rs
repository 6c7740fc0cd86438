//! Unit tests of the metrics: the shard collector, the exposition text and its rewrite,
//! the push and process metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::exposition::{render, to_prometheus_text};
use super::labels::{DisconnectReason, DropReason};
use super::process::{cpu_ticks, render_process, stat_fields};
use super::push::{PushMetrics, PUSH_STATUSES};
use super::shard::ShardMetrics;

/// The value of the sample line `sample` (name and labels exactly as written).
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn renders_per_shard_and_totals() {
    let a = Arc::new(ShardMetrics::default());
    let b = Arc::new(ShardMetrics::default());
    ShardMetrics::set(&a.connections, 3);
    ShardMetrics::set(&b.connections, 4);
    ShardMetrics::add(&a.connects[0], 2);
    ShardMetrics::add(&b.connects[2], 5);
    a.disconnect(DisconnectReason::Keepalive);
    b.disconnect(DisconnectReason::Keepalive);
    a.drop_msg(DropReason::MailboxFull, 7);
    a.packet_in(12);
    ShardMetrics::set(&b.pool_hits, 9);
    // A TLS handshake thread's counts: in the totals, under no shard label.
    let off = Arc::new(ShardMetrics::default());
    off.disconnect(DisconnectReason::Keepalive);
    ShardMetrics::set(&off.connections, 100);
    let mut s = String::new();
    render(&[a, b], &[off], &mut s);
    assert_eq!(value(&s, "gateway_connections{shard=\"0\"}"), Some(3.0));
    assert_eq!(value(&s, "gateway_connections{shard=\"1\"}"), Some(4.0));
    assert_eq!(value(&s, "gateway_connections{shard=\"2\"}"), None);
    assert_eq!(
        value(&s, "gateway_connects_total{transport=\"tcp\"}"),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "gateway_connects_total{transport=\"ws\"}"),
        Some(5.0)
    );
    assert_eq!(
        value(&s, "gateway_disconnects_total{reason=\"keepalive\"}"),
        Some(3.0)
    );
    assert_eq!(
        value(&s, "gateway_disconnects_total{reason=\"client\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "gateway_messages_dropped_total{reason=\"mailbox_full\"}"
        ),
        Some(7.0)
    );
    assert_eq!(
        value(&s, "gateway_packets_received_total{type=\"pingreq\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "gateway_buffer_pool_takes_total{result=\"hit\"}"),
        Some(9.0)
    );
    assert_eq!(
        value(&s, "gateway_shard_polls_total{shard=\"1\"}"),
        Some(0.0)
    );
    assert!(s.contains("# TYPE gateway_connects_total counter\n"), "{s}");
    assert!(
        s.contains("# HELP gateway_connects_total Accepted CONNECTs, by transport"),
        "{s}"
    );
    assert!(s.contains("# TYPE gateway_connections gauge\n"), "{s}");
    assert!(!s.contains("# EOF"), "{s}");
}

#[test]
fn connection_age_buckets_are_summed_over_shards_and_cumulative() {
    let a = Arc::new(ShardMetrics::default());
    let b = Arc::new(ShardMetrics::default());
    a.observe_connection_age(0.5);
    a.observe_connection_age(30.0);
    b.observe_connection_age(1_000_000.0);
    b.observe_connection_age(f64::NAN);
    let mut s = String::new();
    render(&[a, b], &[], &mut s);
    let bucket = |le: &str| {
        value(
            &s,
            &format!("gateway_connection_age_seconds_bucket{{le=\"{le}\"}}"),
        )
    };
    assert_eq!(bucket("1.0"), Some(2.0), "{s}");
    assert_eq!(bucket("10.0"), Some(2.0), "{s}");
    assert_eq!(bucket("60.0"), Some(3.0), "{s}");
    assert_eq!(bucket("604800.0"), Some(3.0), "{s}");
    assert_eq!(bucket("+Inf"), Some(4.0), "{s}");
    assert_eq!(value(&s, "gateway_connection_age_seconds_count"), Some(4.0));
    assert_eq!(
        value(&s, "gateway_connection_age_seconds_sum"),
        Some(1_000_030.5)
    );
    assert!(s.contains("# TYPE gateway_connection_age_seconds histogram\n"));
}

#[test]
fn busy_ratio_is_poll_time_over_wall_time_since_the_last_scrape() {
    let m = ShardMetrics::default();
    let t0 = m.busy.lock().unwrap().at;
    let ms = Duration::from_millis;
    assert_eq!(m.busy_ratio(t0 + ms(1000), ms(250)), 0.25);
    // Too close to the previous scrape: the previous ratio, and the sample is kept.
    assert_eq!(m.busy_ratio(t0 + ms(1050), ms(1000)), 0.25);
    assert_eq!(m.busy_ratio(t0 + ms(2000), ms(1000)), 0.75);
    // Never above 1, never negative.
    assert_eq!(m.busy_ratio(t0 + ms(2500), ms(5000)), 1.0);
    assert_eq!(m.busy_ratio(t0 + ms(3500), ms(5000)), 0.0);
}

#[tokio::test]
async fn shard_polls_come_from_the_task_monitor() {
    let m = Arc::new(ShardMetrics::default());
    let monitor = m.monitor.clone();
    monitor
        .instrument(async {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        })
        .await;
    let mut s = String::new();
    render(&[m], &[], &mut s);
    assert_eq!(
        value(&s, "gateway_shard_polls_total{shard=\"0\"}"),
        Some(4.0),
        "{s}"
    );
    let ratio = value(&s, "gateway_shard_busy_ratio{shard=\"0\"}").unwrap();
    assert!((0.0..=1.0).contains(&ratio), "{s}");
}

#[test]
fn push_metrics_count_statuses_and_latency() {
    let p = PushMetrics::default();
    p.record("sent", Some(0.0003));
    p.record("sent", Some(2.0));
    p.record("overloaded", None);
    p.record("no_such_status", None);
    let mut s = String::new();
    p.render(&mut s);
    assert_eq!(
        value(&s, "gateway_push_messages_total{status=\"sent\"}"),
        Some(2.0),
        "{s}"
    );
    assert_eq!(
        value(&s, "gateway_push_messages_total{status=\"overloaded\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "gateway_push_messages_total{status=\"other\"}"),
        Some(1.0)
    );
    for status in PUSH_STATUSES {
        let sample = format!("gateway_push_messages_total{{status=\"{status}\"}}");
        assert!(value(&s, &sample).is_some(), "{sample} missing:\n{s}");
    }
    let bucket = |le: &str| {
        value(
            &s,
            &format!("gateway_push_duration_seconds_bucket{{le=\"{le}\"}}"),
        )
    };
    assert_eq!(bucket("0.00025"), Some(0.0), "{s}");
    assert_eq!(bucket("0.0005"), Some(1.0), "{s}");
    assert_eq!(bucket("2.5"), Some(2.0), "{s}");
    assert_eq!(bucket("+Inf"), Some(2.0), "{s}");
    assert_eq!(value(&s, "gateway_push_duration_seconds_count"), Some(2.0));
    for family in ["gateway_push_requests_total", "gateway_push_messages_total"] {
        assert!(s.contains(&format!("# TYPE {family} counter\n")), "{s}");
    }
    p.record_request("batch", 413);
    let mut s = String::new();
    p.render(&mut s);
    let req = |endpoint: &str, code: u16| {
        value(
            &s,
            &format!("gateway_push_requests_total{{endpoint=\"{endpoint}\",code=\"{code}\"}}"),
        )
    };
    assert_eq!(req("batch", 413), Some(1.0), "{s}");
    assert_eq!(req("push", 200), Some(0.0), "{s}");
}

#[test]
fn process_metrics_are_read_from_proc() {
    let mut s = String::new();
    render_process(&mut s, 42, Instant::now());
    assert_eq!(value(&s, "gateway_log_lines_dropped_total"), Some(42.0));
    assert!(
        value(&s, "process_resident_memory_bytes").unwrap() > 0.0,
        "{s}"
    );
    assert!(value(&s, "process_open_fds").unwrap() >= 3.0, "{s}");
    assert!(value(&s, "process_max_fds").unwrap() > 0.0, "{s}");
    assert!(value(&s, "process_cpu_seconds_total").is_some(), "{s}");
    let start = value(&s, "process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(start > 1.0e9 && start <= now + 1.0, "{start} vs {now}");
    assert!(
        s.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{s}"
    );
}

#[test]
fn openmetrics_counters_become_prometheus_0_0_4_counters() {
    let om = "# HELP a_total Already suffixed.\n# TYPE a_total counter\na_total 1\n\
              # HELP b Plain.\n# TYPE b counter\nb_total 2\n\
              # HELP c A gauge.\n# TYPE c gauge\nc 3\n# EOF\n";
    let mut out = String::new();
    to_prometheus_text(om, &mut out);
    assert_eq!(
        out,
        "# HELP a_total Already suffixed.\n# TYPE a_total counter\na_total 1\n\
         # HELP b_total Plain.\n# TYPE b_total counter\nb_total 2\n\
         # HELP c A gauge.\n# TYPE c gauge\nc 3\n"
    );
}

#[test]
fn stat_fields_parse_after_the_command_name() {
    let stat = "123 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 4200 0";
    assert_eq!(cpu_ticks(stat), Some(300));
    assert_eq!(stat_fields(stat).unwrap()[19], "4200");
}
