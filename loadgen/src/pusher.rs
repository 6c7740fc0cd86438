//! `push`: the backend's side, sending pushes through the gateway's HTTP API at a rate.
//!
//! Messages go round-robin over the devices, one per `/v1/push` request or `--batch` per
//! `/v1/push/batch` request, with at most `--concurrency` requests in flight (if the
//! server is slower than the rate, the achieved rate says so), in turn to each `--http`
//! URL when several are given (the nodes of a fleet). Every payload starts with
//! `"<seq>:<send ns>"`; the devices parse it, so latency is measured send-to-receipt
//! across processes on one clock. A 503 is retried after its `Retry-After`, up to
//! `--max-retries` times, and counted.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::cli::{expand, PushArgs};
use crate::codec::stamp_into;
use crate::fleet::now_ns;
use crate::stats::Histogram;

/// Live counters, read by the progress bar.
#[derive(Default)]
pub struct PushCounters {
    /// Messages handed to the API (each once, retries not counted).
    pub sent: AtomicU64,
    /// Messages the API answered `sent`, `acked` or `queued`.
    pub accepted: AtomicU64,
}

#[derive(Default, Debug)]
pub struct PushResult {
    pub sent: u64,
    pub accepted: u64,
    /// Answers per status (`sent`, `queued`, `offline`, ...).
    pub statuses: BTreeMap<String, u64>,
    /// Messages that got no status: HTTP errors by code, per-item error codes, network.
    pub errors: BTreeMap<String, u64>,
    pub retries_503: u64,
    /// Request round trips, microseconds.
    pub http_hist: Histogram,
    pub elapsed: Duration,
}

/// Pushes for `args.duration` seconds to devices `0..args.conns`.
pub async fn run(args: &PushArgs, counters: Arc<PushCounters>) -> Result<PushResult, String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let path = match args.batch > 1 {
        true => "/v1/push/batch",
        false => "/v1/push",
    };
    let urls: Vec<String> = args
        .http
        .split(',')
        .map(|base| format!("{}{path}", base.trim().trim_end_matches('/')))
        .collect();
    let ctx = Arc::new(Ctx {
        client,
        urls,
        token: args.token.clone(),
        batch: args.batch > 1,
        max_retries: args.max_retries,
        result: Mutex::new(PushResult::default()),
        counters,
    });
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let devices = args.conns.max(1);
    let planned = (args.rate * args.duration as f64).round() as u64;
    let batch = args.batch.max(1);
    let start = Instant::now();
    let mut seq = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut bodies = Bodies::new(args, devices);
    let mut iv = tokio::time::interval(Duration::from_millis(2));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while seq < planned {
        iv.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due = ((elapsed * args.rate) as u64 + 1).min(planned);
        let last_call = due == planned;
        while seq < due && (due - seq >= batch || last_call) {
            let n = batch.min(due - seq);
            let permit = sem.clone().acquire_owned().await.expect("never closed");
            let body = bodies.next(seq..seq + n, ctx.batch);
            let url = ctx.urls[(seq / batch) as usize % ctx.urls.len()].clone();
            seq += n;
            ctx.counters.sent.fetch_add(n, Ordering::Relaxed);
            let ctx = ctx.clone();
            tasks.spawn(async move {
                ctx.request(&url, body, n).await;
                drop(permit);
            });
        }
        // Reap finished requests so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut result = std::mem::take(&mut *ctx.result.lock().unwrap());
    result.sent = seq;
    result.accepted = ctx.counters.accepted.load(Ordering::Relaxed);
    result.elapsed = start.elapsed();
    Ok(result)
}

struct Ctx {
    client: reqwest::Client,
    /// The push endpoint on each `--http` base URL, taken in turn per request.
    urls: Vec<String>,
    token: Option<String>,
    batch: bool,
    max_retries: u32,
    result: Mutex<PushResult>,
    counters: Arc<PushCounters>,
}

impl Ctx {
    async fn request(&self, url: &str, body: Bytes, n: u64) {
        let mut attempt = 0;
        loop {
            let t0 = Instant::now();
            let mut req = self
                .client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await;
            let us = t0.elapsed().as_micros() as u64;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    let what = if e.is_timeout() {
                        "http_timeout"
                    } else if e.is_connect() {
                        "http_connect"
                    } else {
                        "http_error"
                    };
                    self.error(what, n);
                    return;
                }
            };
            let code = resp.status().as_u16();
            if code == 503 {
                let wait = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .min(30);
                self.result.lock().unwrap().retries_503 += 1;
                if attempt >= self.max_retries {
                    self.error("http_503", n);
                    return;
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            let text = resp.bytes().await.unwrap_or_default();
            self.result.lock().unwrap().http_hist.record(us);
            if !(200..300).contains(&code) {
                self.error(&format!("http_{code}"), n);
                return;
            }
            self.answer(&text, n);
            return;
        }
    }

    /// Counts the statuses of a 2xx answer to `n` pushes (one lock for the whole answer).
    fn answer(&self, text: &[u8], n: u64) {
        let items = match self.batch {
            true => serde_json::from_slice::<BatchAnswer>(text).map(|a| a.results),
            false => serde_json::from_slice::<Outcome>(text).map(|o| vec![o]),
        };
        let Ok(items) = items else {
            self.error("bad_json_answer", n);
            return;
        };
        let accepted = items.iter().filter(|i| i.accepted()).count() as u64;
        self.counters
            .accepted
            .fetch_add(accepted, Ordering::Relaxed);
        let mut r = self.result.lock().unwrap();
        for item in &items {
            match (&item.status, &item.error) {
                (Some(status), _) => bump(&mut r.statuses, status, 1),
                (None, Some(e)) => {
                    let code = e.code.as_deref().unwrap_or("unknown");
                    bump(&mut r.errors, &format!("item_{code}"), 1)
                }
                (None, None) => bump(&mut r.errors, "item_unknown", 1),
            }
        }
        let missing = n.saturating_sub(items.len() as u64);
        if missing > 0 {
            bump(&mut r.errors, "missing_result", missing);
        }
    }

    fn error(&self, what: &str, n: u64) {
        bump(&mut self.result.lock().unwrap().errors, what, n);
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str, n: u64) {
    match map.get_mut(key) {
        Some(c) => *c += n,
        None => {
            map.insert(key.to_owned(), n);
        }
    }
}

/// One push of a request body, serialized from borrowed fields.
#[derive(Serialize)]
struct Push<'a> {
    client_id: &'a str,
    topic: &'a str,
    payload: &'a str,
    qos: u8,
}

/// The request bodies: each device's client id and topic expanded once, the pushes
/// serialized straight into the body (the measuring tool's cost per push is small beside
/// the gateway's).
struct Bodies {
    /// Per device: (client id, topic).
    devices: Vec<(String, String)>,
    qos: u8,
    size: usize,
    /// The payload of the push being written (reused).
    payload: String,
}

impl Bodies {
    fn new(args: &PushArgs, devices: u64) -> Bodies {
        let devices = (0..devices)
            .map(|i| {
                let id = expand(&args.mqtt.client_id, i, "");
                let topic = expand(&args.topic, i, &id);
                (id, topic)
            })
            .collect();
        Bodies {
            devices,
            qos: args.qos,
            size: args.size,
            payload: String::new(),
        }
    }

    /// The body of the pushes `seqs` (round robin over the devices): a batch
    /// (`{"messages":[…]}`) or, with `batch` false, the one push object.
    fn next(&mut self, seqs: std::ops::Range<u64>, batch: bool) -> Bytes {
        let mut out = Vec::with_capacity(seqs.end.saturating_sub(seqs.start) as usize * 128 + 16);
        if batch {
            out.extend_from_slice(b"{\"messages\":[");
        }
        for s in seqs {
            if batch && out.last() != Some(&b'[') {
                out.push(b',');
            }
            let (client_id, topic) = &self.devices[(s % self.devices.len() as u64) as usize];
            self.payload.clear();
            stamp_into(&mut self.payload, s, now_ns(), self.size);
            let push = Push {
                client_id,
                topic,
                payload: &self.payload,
                qos: self.qos,
            };
            serde_json::to_writer(&mut out, &push).expect("writing to a Vec cannot fail");
        }
        if batch {
            out.extend_from_slice(b"]}");
        }
        Bytes::from(out)
    }
}

/// `/v1/push/batch`'s answer: one outcome per push, in order.
#[derive(Deserialize)]
struct BatchAnswer<'a> {
    #[serde(borrow)]
    results: Vec<Outcome<'a>>,
}

/// One push's outcome: a status (`sent`, `acked`, `queued`, `offline`, …) or an error.
#[derive(Deserialize)]
struct Outcome<'a> {
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    error: Option<ItemError<'a>>,
}

#[derive(Deserialize)]
struct ItemError<'a> {
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

impl Outcome<'_> {
    /// The gateway took the push: sent, acknowledged or queued.
    fn accepted(&self) -> bool {
        matches!(self.status.as_deref(), Some("sent" | "acked" | "queued"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use serde_json::{json, Value};

    fn push_args(extra: &[&str]) -> PushArgs {
        let args = ["loadgen", "push", "--conns", "3", "--client-id", "d-{i}"];
        let cli = Cli::try_parse_from(args.iter().chain(extra)).expect("parses");
        match cli.command {
            Some(Command::Push(a)) => a,
            _ => panic!("push"),
        }
    }

    fn ctx(batch: bool) -> Ctx {
        Ctx {
            client: reqwest::Client::new(),
            urls: vec![],
            token: None,
            batch,
            max_retries: 0,
            result: Mutex::new(PushResult::default()),
            counters: Arc::default(),
        }
    }

    #[test]
    fn a_batch_body_is_the_pushes_round_robin_as_json() {
        let a = push_args(&["--topic", "devices/{id}/cmd", "--size", "40", "--qos", "0"]);
        let mut bodies = Bodies::new(&a, 3);
        let body: Value = serde_json::from_slice(&bodies.next(2..6, true)).expect("JSON");
        let messages = body["messages"].as_array().expect("messages");
        let ids: Vec<_> = messages.iter().map(|m| m["client_id"].clone()).collect();
        assert_eq!(
            ids,
            [json!("d-2"), json!("d-0"), json!("d-1"), json!("d-2")]
        );
        assert_eq!(messages[1]["topic"], "devices/d-0/cmd");
        assert_eq!(messages[1]["qos"], 0);
        let payload = messages[1]["payload"].as_str().unwrap();
        assert_eq!(payload.len(), 40);
        let (seq, _) = crate::codec::parse_stamp(payload.as_bytes()).expect("stamped");
        assert_eq!(seq, 3);
        let single: Value = serde_json::from_slice(&bodies.next(7..8, false)).expect("JSON");
        assert_eq!(single["client_id"], "d-1");
        assert_eq!(single["qos"], 0);
    }

    #[test]
    fn an_answer_counts_statuses_item_errors_and_missing_results() {
        let c = ctx(true);
        let answer = json!({"results": [
            {"status": "sent", "message_id": "x"},
            {"status": "queued"},
            {"status": "offline"},
            {"error": {"code": "bad_topic", "message": "…"}},
            {"error": {"message": "no code"}},
            {}
        ]});
        c.answer(answer.to_string().as_bytes(), 7);
        c.answer(b"{\"nope\": 1}", 2);
        let r = c.result.lock().unwrap();
        assert_eq!(c.counters.accepted.load(Ordering::Relaxed), 2);
        let statuses: Vec<_> = r.statuses.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(statuses, [("offline", 1), ("queued", 1), ("sent", 1)]);
        let errors: Vec<_> = r.errors.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            errors,
            [
                ("bad_json_answer", 2),
                ("item_bad_topic", 1),
                ("item_unknown", 2),
                ("missing_result", 1)
            ]
        );
        let single = ctx(false);
        single.answer(b"{\"status\":\"acked\"}", 1);
        assert_eq!(single.counters.accepted.load(Ordering::Relaxed), 1);
    }
}
