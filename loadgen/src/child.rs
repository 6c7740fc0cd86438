//! The child role: run one slice of the devices (or probes) and report to the parent.
//!
//! A child owns its own multi-thread tokio runtime (`--threads` workers), raises its
//! open-files limit, ramps its slice at its share of the rate, and prints [`Event`] lines
//! on stdout every 200 ms until the parent says stop (or closes stdin). See
//! [`crate::proto`] for the protocol.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use crate::cli::{Command, ProbeMode};
use crate::fleet::{DeviceCfg, Fleet};
use crate::limits::raise_nofile;
use crate::proto::{Control, Event, WorkOrder};

/// Longest a child waits for its connections to close after `stop`.
const STOP_GRACE: Duration = Duration::from_secs(10);
const REPORT_EVERY: Duration = Duration::from_millis(200);

fn emit(ev: &Event) {
    let mut line = serde_json::to_string(ev).expect("events serialize");
    line.push('\n');
    let mut out = std::io::stdout().lock();
    // The parent is gone if this fails; the stdin EOF will stop us.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

pub fn run(order_json: &str) -> ExitCode {
    let order: WorkOrder = match serde_json::from_str(order_json) {
        Ok(o) => o,
        Err(e) => {
            emit(&Event::Error {
                message: format!("bad work order: {e}"),
            });
            return ExitCode::from(2);
        }
    };
    raise_nofile();
    let threads = order
        .command
        .common()
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("loadgen-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            emit(&Event::Error {
                message: format!("runtime: {e}"),
            });
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(main(order));
    // Device tasks still running after the grace period are abandoned, not awaited.
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn main(order: WorkOrder) -> ExitCode {
    let cfg = match DeviceCfg::from_order(&order) {
        Ok(c) => c,
        Err(message) => {
            emit(&Event::Error { message });
            return ExitCode::from(2);
        }
    };
    let fleet = Fleet::new(cfg, order.max_pending);

    // Commands from the parent; end of input means stop.
    let control = fleet.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<Control>(&line) {
                    Ok(c) => control.control(c),
                    Err(e) => emit(&Event::Error {
                        message: format!("bad control line {line:?}: {e}"),
                    }),
                },
                Ok(None) | Err(_) => {
                    control.control(Control::Stop);
                    return;
                }
            }
        }
    });

    let ramp = fleet.clone();
    let (first, count, rate) = (order.first, order.count, order.rate);
    match &order.command {
        Command::Churn(a) => {
            let (mode, wait) = (a.mode, a.wait_connack);
            tokio::spawn(async move {
                ramp.ramp(first, count, rate, move |f, i| {
                    let mqtt = match mode {
                        ProbeMode::Tcp => false,
                        ProbeMode::Mqtt => true,
                        ProbeMode::Both => i % 2 == 1,
                    };
                    f.probe(i, mqtt, wait)
                })
                .await
            });
        }
        _ => {
            tokio::spawn(async move { ramp.ramp(first, count, rate, Fleet::device).await });
        }
    }

    report(&fleet, count).await;
    emit(&Event::Final(Box::new(fleet.final_report())));
    ExitCode::SUCCESS
}

/// Reports until stopped and every task ended (or the grace period passed).
async fn report(fleet: &Arc<Fleet>, count: u64) {
    let mut ready_sent = false;
    let mut stop_seen: Option<Instant> = None;
    let mut iv = tokio::time::interval(REPORT_EVERY);
    loop {
        iv.tick().await;
        let snap = fleet.snapshot();
        if !ready_sent && snap.settled >= count {
            ready_sent = true;
            emit(&Event::Ready(snap.clone()));
        } else {
            emit(&Event::Progress(snap));
        }
        if let Some(round) = fleet.finished_round() {
            emit(&Event::Round(round));
        }
        if fleet.stopping() {
            let since = *stop_seen.get_or_insert_with(Instant::now);
            if fleet.tasks() == 0 || since.elapsed() > STOP_GRACE {
                return;
            }
        }
    }
}
