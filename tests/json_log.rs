//! The JSON log carries values as fields, not Rust debug strings: a push logs
//! `"status": "offline"`, not `"result": "Ok(\"offline\")"`.
//!
//! A test binary of its own because it installs the process-wide tracing subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{post_json, TestServer};
use gateway::config::{LogConfig, LogFormat};
use serde_json::{json, Value};

/// A log destination in memory.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// The JSON line whose message is `message`, once written.
    fn find(&self, message: &str) -> Option<Value> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == message)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_logs_its_status_as_a_plain_field() {
    let lines = Lines::default();
    let cfg = LogConfig {
        level: "gateway=debug,warn".into(),
        format: LogFormat::Json,
        file: None,
        queue_lines: 10_000,
    };
    let _guard = gateway::logging::init_with(&cfg, lines.clone());
    let gw = TestServer::start("");
    let (code, answer) = post_json(
        gw.http,
        "/v1/push",
        &json!({ "client_id": "nobody-here", "topic": "t", "payload": "x" }),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["status"], "offline", "{answer}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(l) = lines.find("client push") {
            break l;
        }
        assert!(Instant::now() < deadline, "no \"client push\" line logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(line["status"], "offline", "{line}");
    assert_eq!(line["client_id"], "nobody-here", "{line}");
    assert!(line.get("result").is_none(), "a debug string field: {line}");
}
