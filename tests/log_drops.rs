//! The lossy logger behind a writer that blocks: the gateway keeps serving MQTT promptly
//! and counts the lines it could not queue in `gateway_log_lines_dropped_total`.
//!
//! A test binary of its own because it installs the process-wide tracing subscriber.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::v4::{self, QoS};
use common::{Raw, TestServer};
use mqttbytes::v4::{ConnectReturnCode, Packet};

/// One connection per iteration; each logs "connected" and "connection closed" at debug.
const FLOOD: usize = 200;

/// The gateway's own events at debug (so every connect and close logs), everything else
/// (the test's HTTP client) at warn; a queue of four lines.
const EXTRA: &str = r#"
[log]
level = "gateway=debug,warn"
queue_lines = 4
"#;

/// Shuts until opened; shared by the test and the writer.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn wait_open(&self) {
        let (open, cv) = &*self.0;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
    }
    fn open(&self) {
        let (open, cv) = &*self.0;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// A log destination that hangs (like a full pipe or a stuck disk) until its gate opens.
struct StuckWriter {
    gate: Gate,
    writes: Arc<AtomicUsize>,
    entered: mpsc::Sender<()>,
}

impl Write for StuckWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let _ = self.entered.send(());
        self.gate.wait_open();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the scenario on a thread of its own: a gateway that blocked on its logger would
/// hang it, and the test must then fail rather than hang.
#[test]
fn a_blocked_log_writer_never_slows_mqtt_and_its_drops_are_counted() {
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(scenario());
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the scenario failed; its panic is printed above")
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("no result in 60 s: the scenario hung on the stuck log writer (any panic of its is printed above)")
        }
    }
}

async fn scenario() {
    // The config's level, not the caller's environment, decides what logs. (Edition 2021:
    // safe; this is the only test in this binary.)
    std::env::remove_var("RUST_LOG");
    let cfg = common::config(EXTRA);
    let gate = Gate::default();
    let writes = Arc::new(AtomicUsize::new(0));
    let (entered_tx, entered_rx) = mpsc::channel();
    let guard = gateway::logging::init_with(
        &cfg.log,
        StuckWriter {
            gate: gate.clone(),
            writes: writes.clone(),
            entered: entered_tx,
        },
    );
    let gw = TestServer::start_with_log(EXTRA, &guard);

    // The writer thread takes the first line (a shard starting, the listening line) and
    // hangs in write() from then on.
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the log writer got its first line");
    let before = gw.metric("gateway_log_lines_dropped_total").await;

    // Each connection is answered at once although none of its lines can be written.
    let flood_started = Instant::now();
    for i in 0..FLOOD {
        let mut raw = Raw::connect(gw.mqtt).await;
        raw.send(&Raw::connect_v4(&format!("flood-{i}"), 30, true))
            .await;
        match raw.recv_v4(Duration::from_secs(5)).await {
            Ok(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => {}
            other => panic!("connection {i}: expected CONNACK within 5 s, got {other:?}"),
        }
        raw.send(&[0xE0, 0x00]).await; // DISCONNECT
    }

    let flood_took = flood_started.elapsed();

    // With the log queue full and the writer stuck, a client still gets CONNACK, SUBACK and
    // its own QoS 1 message back promptly.
    let t = Instant::now();
    let mut c = v4::connect(v4::options(gw.mqtt, "probe")).await;
    c.subscribe("probe/echo", QoS::AtLeastOnce).await;
    c.client
        .publish("probe/echo", QoS::AtLeastOnce, false, "still here")
        .await
        .expect("publish request");
    let p = c
        .next_publish(Duration::from_secs(5))
        .await
        .expect("the probe's message comes back");
    assert_eq!(&p.payload[..], b"still here");
    let probe_took = t.elapsed();
    assert!(
        probe_took < Duration::from_secs(5),
        "CONNACK + SUBACK + PUBLISH took {probe_took:?} with a stuck log writer"
    );

    // Every connection logged at least one line the queue had no room for.
    let after = gw
        .wait_metric(
            "gateway_log_lines_dropped_total",
            Duration::from_secs(5),
            |v| v - before >= FLOOD as f64,
        )
        .await;
    assert!(
        after - before >= FLOOD as f64,
        "dropped lines went from {before} to {after} over {FLOOD} connections"
    );
    eprintln!(
        "{FLOOD} connect/CONNACK/DISCONNECT in {flood_took:?} and a probe round trip in {:?} \
         with the log writer stuck; {} lines dropped",
        probe_took,
        after - before
    );
    // /metrics reports the guard's own counter.
    assert!(guard.dropped_lines() as f64 >= after);
    // All of the above happened while the writer was stuck in its first write.
    assert_eq!(
        writes.load(Ordering::SeqCst),
        1,
        "the writer was not stuck throughout"
    );

    // Unstick the writer so that dropping the guard flushes at once.
    gate.open();
    drop(c);
    drop(gw);
    drop(guard);
}
