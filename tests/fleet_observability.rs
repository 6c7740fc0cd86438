//! The fleet on the shipped dashboard and alerts (issue 19 point 7): every `gateway_fleet_*`
//! family the Grafana dashboard and the alert rules use is exported by a real fleet node
//! (tests/observability.rs checks the rest on a single node, where these do not exist),
//! the dashboard covers the fleet's metrics, and the fleet alerts fire on the series they
//! are meant for (`promtool test rules dashboards/alerts_test.yml`).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `gateway_fleet_*` word in `text`.
fn fleet_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("gateway_fleet_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_use_what_a_fleet_node_exports() {
    let (_nats, gw, _kv) = common::fleet::start("fleet-obs", &["node-a"], "").await;
    let scrape = common::http_get(gw[0].http, "/metrics").await.1;
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(fleet_names)
        .collect();
    let mut used = BTreeSet::new();
    for file in ["dashboards/gateway.json", "dashboards/alerts.yml"] {
        let names = fleet_names(&std::fs::read_to_string(repo(file)).expect(file));
        let unknown: Vec<_> = names.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} uses unexported {unknown:?}");
        used.extend(names);
    }
    for needed in [
        "gateway_fleet_nats_connected",
        "gateway_fleet_requests_total",
        "gateway_fleet_request_seconds_bucket",
        "gateway_fleet_requests_served_total",
        "gateway_fleet_registry_ops_total",
        "gateway_fleet_registry_swept_total",
        "gateway_fleet_takeovers_total",
        "gateway_fleet_arbitration_lost_total",
        "gateway_fleet_takeovers_throttled_total",
    ] {
        assert!(used.contains(needed), "no panel or rule uses {needed}");
    }
}

#[test]
fn the_fleet_alerts_fire_on_nats_down_and_registry_churn() {
    if !common::have_binary("promtool", "prometheus") {
        return;
    }
    let out = Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(repo("dashboards"))
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
