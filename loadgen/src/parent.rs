//! The parent role: check limits, start the children, drive a scenario's phases,
//! aggregate what the children report, sample the server, and print the summary.
//!
//! The parent holds no device sockets itself (only the HTTP client of `push` and the one
//! publisher of `fanout`), so all the connections live in children sized to the
//! open-files limit. It re-executes its own binary with the hidden `--child` flag and
//! talks to each child over stdin/stdout (see [`crate::proto`]). Children run in their
//! own process group so a Ctrl-C reaches only the parent, which then stops them cleanly
//! and still prints what was measured.
//!
//! The scenarios' phases and summaries are in `scenarios`; the summary type, the verdict
//! behind the exit status and the derived figures in `summary`.

use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::cli::Command;
use crate::cost::{self, Sample};
use crate::limits::{self, Plan};
use crate::plot::{self, Point, RoundMark};
use crate::proto::{Control, Event, FinalReport, RoundReport, Snapshot, WorkOrder};
use crate::report::{self, Progress};

mod scenarios;
mod summary;

use summary::Summary;
use summary::{hints, round3, verdict};

/// How long the parent waits for the children's final reports after `stop`.
const FINAL_WAIT: Duration = Duration::from_secs(30);
/// Pause before the `after` sample, so the server has seen every close.
const AFTER_PAUSE: Duration = Duration::from_secs(1);

pub fn run(cmd: Command) -> ExitCode {
    if let Err(msg) = cmd.validate() {
        eprintln!("loadgen: {msg}");
        return ExitCode::from(2);
    }
    let plan = match limits::plan(&cmd) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("loadgen: cannot run this: {msg}");
            return ExitCode::from(2);
        }
    };
    for w in &plan.warnings {
        eprintln!("loadgen: warning: {w}");
    }
    let threads = cmd
        .common()
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("loadgen")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json_only = cmd.common().json;
    let order = cmd.clone();
    let result = rt.block_on(async move {
        let mut run = Run::start(cmd, plan).await?;
        let summary = run.scenario().await;
        run.ui.bar.finish();
        let summary = summary?;
        run.plot(&summary)?;
        Ok::<Summary, String>(summary)
    });
    match result {
        Ok(summary) => {
            report::print(summary.fields(), json_only);
            for h in hints(&summary) {
                eprintln!("loadgen: hint: {h}");
            }
            match verdict(&order, &summary) {
                Some((code, why)) => {
                    eprintln!("loadgen: {why}");
                    ExitCode::from(code)
                }
                None => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(Default)]
struct KidState {
    last: Snapshot,
    ready: bool,
    fin: Option<FinalReport>,
    rounds: Vec<RoundReport>,
    exited: bool,
}

struct Kids {
    children: Vec<Child>,
    stdin: Vec<Option<ChildStdin>>,
    rx: mpsc::UnboundedReceiver<(usize, Option<Event>)>,
    st: Vec<KidState>,
    errors: Vec<String>,
}

impl Kids {
    async fn spawn(cmd: &Command, plan: &Plan) -> Result<Kids, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let units = cmd.units().max(1) as f64;
        let (rate, pending) = match cmd {
            Command::Connect(a) => (a.rate, a.mqtt.max_pending),
            Command::Push(a) => (a.connect_rate, a.mqtt.max_pending),
            Command::Fanout(a) => (a.connect_rate, a.mqtt.max_pending),
            Command::Churn(a) => (a.rate, a.concurrency as usize),
            Command::Storm(a) => (a.connect_rate, a.mqtt.max_pending),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut stdin = Vec::new();
        for (k, &(first, count)) in plan.slices.iter().enumerate() {
            let order = WorkOrder {
                command: cmd.clone(),
                first,
                count,
                rate: rate * count as f64 / units,
                max_pending: (pending / plan.procs).max(1),
            };
            let json = serde_json::to_string(&order).map_err(|e| e.to_string())?;
            let mut child = tokio::process::Command::new(&exe)
                .arg("--child")
                .arg(json)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("starting child {k}: {e}"))?;
            let out = child.stdout.take().expect("piped");
            stdin.push(child.stdin.take());
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            let _ = tx.send((k, Some(ev)));
                        }
                        Err(e) => {
                            let _ = tx.send((
                                k,
                                Some(Event::Error {
                                    message: format!("unreadable line {line:?}: {e}"),
                                }),
                            ));
                        }
                    }
                }
                let _ = tx.send((k, None));
            });
            children.push(child);
        }
        let st = (0..children.len()).map(|_| KidState::default()).collect();
        Ok(Kids {
            children,
            stdin,
            rx,
            st,
            errors: Vec::new(),
        })
    }

    fn apply(&mut self, k: usize, ev: Option<Event>) {
        let s = &mut self.st[k];
        match ev {
            None => s.exited = true,
            Some(Event::Progress(snap)) => s.last = snap,
            Some(Event::Ready(snap)) => {
                s.last = snap;
                s.ready = true;
            }
            Some(Event::Round(r)) => s.rounds.push(r),
            Some(Event::Final(f)) => {
                s.last = f.snapshot.clone();
                s.fin = Some(*f);
            }
            Some(Event::Error { message }) => self.errors.push(format!("child {k}: {message}")),
        }
    }

    fn total(&self) -> Snapshot {
        let mut t = Snapshot::default();
        for s in &self.st {
            t.add(&s.last);
        }
        t
    }

    fn all_ready(&self) -> bool {
        self.st.iter().all(|s| s.ready || s.exited)
    }

    fn all_final(&self) -> bool {
        self.st.iter().all(|s| s.fin.is_some() || s.exited)
    }

    fn all_exited(&self) -> bool {
        self.st.iter().all(|s| s.exited)
    }

    fn round_done(&self, round: u32) -> bool {
        self.st
            .iter()
            .all(|s| s.exited || s.rounds.iter().any(|r| r.round == round))
    }

    async fn send(&mut self, c: Control) {
        let mut line = serde_json::to_string(&c).expect("controls serialize");
        line.push('\n');
        for stdin in self.stdin.iter_mut().flatten() {
            let _ = stdin.write_all(line.as_bytes()).await;
            let _ = stdin.flush().await;
        }
    }

    fn merged_final(&self) -> FinalReport {
        let mut m = FinalReport::default();
        for f in self.st.iter().filter_map(|s| s.fin.as_ref()) {
            m.snapshot.add(&f.snapshot);
            for (k, v) in &f.failures {
                *m.failures.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &f.drops {
                *m.drops.entry(k.clone()).or_default() += v;
            }
            m.connect_hist.merge(&f.connect_hist);
            m.subscribe_hist.merge(&f.subscribe_hist);
            m.message_hist.merge(&f.message_hist);
            m.per_device.extend_from_slice(&f.per_device);
            m.per_node.resize(m.per_node.len().max(f.per_node.len()), 0);
            for (sum, n) in m.per_node.iter_mut().zip(&f.per_node) {
                *sum += n;
            }
        }
        m.per_device.sort_by_key(|d| d.index);
        m
    }

    fn merged_round(&self, round: u32) -> RoundReport {
        let mut m = RoundReport {
            round,
            ..RoundReport::default()
        };
        for r in self
            .st
            .iter()
            .flat_map(|s| &s.rounds)
            .filter(|r| r.round == round)
        {
            m.dropped += r.dropped;
            m.back += r.back;
            m.attempts += r.attempts;
            m.refused += r.refused;
            m.last_back_us = m.last_back_us.max(r.last_back_us);
            m.back_hist.merge(&r.back_hist);
            for (k, v) in &r.causes {
                *m.causes.entry(k.clone()).or_default() += v;
            }
        }
        m
    }
}

/// Reads how many messages the pusher or publisher has sent so far.
type SentCounter = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The progress bar and the timeline for `--plot`.
struct Ui {
    bar: Progress,
    start: Instant,
    timeline: Vec<Point>,
    /// Storm rounds, drawn over the timeline.
    rounds: Vec<RoundMark>,
    /// Messages sent, while a pusher or publisher runs.
    sent: Option<SentCounter>,
    /// `(when, connected)` at the previous tick, for the connect rate.
    prev: (Instant, u64),
    rate: f64,
}

impl Ui {
    /// Seconds since the start of the run.
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn tick(&mut self, t: &Snapshot) {
        let now = Instant::now();
        let dt = now.duration_since(self.prev.0).as_secs_f64();
        if dt >= 0.2 {
            let fresh = t.connected.saturating_sub(self.prev.1) as f64 / dt;
            self.rate = if self.rate == 0.0 {
                fresh
            } else {
                0.5 * self.rate + 0.5 * fresh
            };
            self.prev = (now, t.connected);
        }
        let sent = self.sent.as_ref().map_or(0, |f| f());
        self.timeline.push(Point {
            t: self.now(),
            live: t.live as f64,
            failed: t.failed as f64,
            settled: t.settled as f64,
            sent: sent as f64,
            delivered: t.unique as f64,
        });
    }
}

type Status<'a> = &'a dyn Fn(&Snapshot, f64) -> (u64, String);

fn connect_status(t: &Snapshot, rate: f64) -> (u64, String) {
    (
        t.settled,
        format!(
            "{rate:.0} conn/s, {} up, {} failed, {} dropped",
            t.live, t.failed, t.dropped
        ),
    )
}

struct Run {
    cmd: Command,
    plan: Plan,
    kids: Kids,
    ui: Ui,
    probe: Option<cost::Probe>,
    interrupted: Arc<AtomicBool>,
    /// Set once the children were told to stop.
    stopping: bool,
}

impl Run {
    async fn start(cmd: Command, plan: Plan) -> Result<Run, String> {
        let common = cmd.common();
        let probe = cost::Probe::new(common.server_pid, common.metrics_url.clone());
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        tokio::spawn(async move {
            // The first Ctrl-C stops the run cleanly (summary included); a second one
            // exits at once, and the children stop when their stdin closes.
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let ui = Ui {
            bar: Progress::new(common.quiet),
            start: Instant::now(),
            timeline: Vec::new(),
            rounds: Vec::new(),
            sent: None,
            prev: (Instant::now(), 0),
            rate: 0.0,
        };
        // The children start in `scenario`, after the `before` sample.
        let kids = Kids {
            children: Vec::new(),
            stdin: Vec::new(),
            rx: mpsc::unbounded_channel().1,
            st: Vec::new(),
            errors: Vec::new(),
        };
        Ok(Run {
            cmd,
            plan,
            kids,
            ui,
            probe,
            interrupted,
            stopping: false,
        })
    }

    async fn sample(&self) -> Sample {
        match &self.probe {
            Some(p) => p.sample().await,
            None => Sample::default(),
        }
    }

    fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// Processes child events and redraws until `until` holds, `deadline` passes, the
    /// user interrupts (except while stopping: the final reports are still wanted), or
    /// every child has exited.
    async fn pump(
        &mut self,
        until: impl Fn(&Kids) -> bool,
        deadline: Option<Instant>,
        status: Status<'_>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            if until(&self.kids)
                || deadline.is_some_and(|d| Instant::now() >= d)
                || (self.interrupted() && !self.stopping)
                || self.kids.all_exited()
            {
                return;
            }
            tokio::select! {
                ev = self.kids.rx.recv() => match ev {
                    Some((k, ev)) => self.kids.apply(k, ev),
                    None => return,
                },
                _ = tick.tick() => {
                    let t = self.kids.total();
                    self.ui.tick(&t);
                    let (pos, msg) = status(&t, self.ui.rate);
                    self.ui.bar.update(pos, msg);
                    for e in self.kids.errors.drain(..) {
                        self.ui.bar.println(&format!("loadgen: {e}"));
                    }
                }
            }
        }
    }

    /// Runs `fut` (the pusher or the publisher) while keeping the children's events and
    /// the progress bar flowing; a Ctrl-C abandons it.
    async fn pump_while<T>(
        &mut self,
        fut: impl std::future::Future<Output = Result<T, String>>,
        status: Status<'_>,
    ) -> Result<T, String> {
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                r = &mut fut => return r,
                ev = self.kids.rx.recv() => {
                    if let Some((k, ev)) = ev {
                        self.kids.apply(k, ev);
                    }
                }
                _ = tick.tick() => {
                    if self.interrupted() {
                        return Err("interrupted".into());
                    }
                    let t = self.kids.total();
                    self.ui.tick(&t);
                    let (pos, msg) = status(&t, self.ui.rate);
                    self.ui.bar.update(pos, msg);
                }
            }
        }
    }

    /// Starts the children and waits until every initial attempt has settled.
    async fn ramp(&mut self, what: &str) -> Result<f64, String> {
        self.kids = Kids::spawn(&self.cmd, &self.plan).await?;
        self.ui.start = Instant::now();
        self.ui.prev = (Instant::now(), 0);
        self.ui.bar.phase(what, self.cmd.units());
        let t0 = Instant::now();
        self.pump(|k| k.all_ready(), None, &connect_status).await;
        let measured = self.kids.total().ramp_us;
        let secs = if measured > 0 {
            measured as f64 / 1e6
        } else {
            t0.elapsed().as_secs_f64()
        };
        if !self.kids.all_ready() && !self.interrupted() {
            return Err(format!(
                "children exited during the ramp: {}",
                self.kids.errors.join("; ")
            ));
        }
        Ok(secs)
    }

    /// Tells the children to stop and collects their final reports.
    async fn stop(&mut self) -> FinalReport {
        self.stopping = true;
        self.kids.send(Control::Stop).await;
        self.ui.bar.phase("stopping", 0);
        let deadline = Some(Instant::now() + FINAL_WAIT);
        self.pump(|k| k.all_final(), deadline, &connect_status)
            .await;
        for c in &mut self.kids.children {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
        for e in self.kids.errors.drain(..) {
            eprintln!("loadgen: {e}");
        }
        self.kids.merged_final()
    }

    /// Holds for `secs` while keeping the bar alive.
    async fn hold(&mut self, what: &str, secs: u64) {
        self.ui.bar.phase(what, secs);
        let start = Instant::now();
        let status = move |t: &Snapshot, _: f64| {
            (
                start.elapsed().as_secs(),
                format!(
                    "{} up, {} dropped, {} pings, {} pongs",
                    t.live, t.dropped, t.pings, t.pongs
                ),
            )
        };
        self.pump(|_| false, Some(start + Duration::from_secs(secs)), &status)
            .await;
    }

    fn head(&self, s: &mut Summary) {
        let common = self.cmd.common();
        s.put("command", self.cmd.name());
        s.put("target", common.target.to_string());
        s.put("protocol", self.cmd.mqtt().protocol);
        s.put("transport", self.cmd.mqtt().transport().name());
        s.put("procs", self.plan.procs as u64);
        s.put("source_addresses", self.plan.sources.len());
        s.put("fd_limit_per_proc", self.plan.fd_limit);
    }

    fn tail(&self, s: &mut Summary, server: Option<Value>) {
        if self.cmd.mqtt().transport().is_tls() {
            let t = self.kids.total();
            let resume = self.cmd.mqtt().tls_resume == crate::cli::OnOff::On;
            s.put(
                "tls_handshakes",
                serde_json::json!({"full": t.tls_full, "resumed": t.tls_resumed, "resume": resume}),
            );
        }
        // Probes (churn) are spread too but hold no device.
        let probes = matches!(self.cmd, crate::cli::Command::Churn(_));
        if !self.cmd.common().targets.is_empty() && !probes {
            s.put("devices_per_node", self.devices_per_node());
        }
        if self.probe.is_some() {
            s.put("server", server.unwrap_or(Value::Null));
        }
        s.put(
            "elapsed_secs",
            round3(self.ui.start.elapsed().as_secs_f64()),
        );
        if self.interrupted() {
            s.put("interrupted", true);
        }
    }

    /// `{"address": devices connected there on their first attempt}` over --targets.
    fn devices_per_node(&self) -> Value {
        let counts = self.kids.merged_final().per_node;
        let targets = self.cmd.common().device_targets();
        let per: serde_json::Map<String, Value> = targets
            .iter()
            .enumerate()
            .map(|(k, t)| (t.to_string(), counts.get(k).copied().unwrap_or(0).into()))
            .collect();
        Value::Object(per)
    }

    async fn scenario(&mut self) -> Result<Summary, String> {
        match self.cmd.clone() {
            Command::Connect(a) => self.connect(a.conns, a.hold).await,
            Command::Push(_) => self.push().await,
            Command::Fanout(_) => self.fanout().await,
            Command::Churn(_) => self.churn().await,
            Command::Storm(_) => self.storm().await,
        }
    }

    fn source(&self) -> String {
        self.probe.as_ref().map(|p| p.source()).unwrap_or_default()
    }

    fn plot(&self, s: &Summary) -> Result<(), String> {
        let Some(path) = &self.cmd.common().plot else {
            return Ok(());
        };
        let top = plot::panel(self.cmd.name(), &self.ui.timeline, &self.ui.rounds);
        plot::draw(path, &top, &s.plot_hist, &s.plot_label)
    }
}

#[cfg(test)]
mod tests;
