//! What the run costs the server: RSS, CPU time, open files and connections, sampled
//! before, at load and after, from `/proc/PID` (`--server-pid`) and/or the server's
//! Prometheus endpoint (`--metrics-url`; the gateway exports `process_*` and
//! `gateway_connections`). The differences become bytes per connection and CPU seconds
//! per 100k connections or messages.

use serde_json::{json, Map, Value};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub rss_bytes: Option<f64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<f64>,
    /// `gateway_connections` summed over shards (metrics only).
    pub connections: Option<f64>,
}

pub struct Probe {
    pid: Option<u32>,
    metrics_url: Option<String>,
    http: reqwest::Client,
}

impl Probe {
    pub fn new(pid: Option<u32>, metrics_url: Option<String>) -> Option<Probe> {
        if pid.is_none() && metrics_url.is_none() {
            return None;
        }
        Some(Probe {
            pid,
            metrics_url,
            http: reqwest::Client::new(),
        })
    }

    pub fn source(&self) -> String {
        match (&self.pid, &self.metrics_url) {
            (Some(p), Some(u)) => format!("pid {p} + {u}"),
            (Some(p), None) => format!("pid {p}"),
            (None, Some(u)) => u.clone(),
            (None, None) => String::new(),
        }
    }

    pub async fn sample(&self) -> Sample {
        let mut s = Sample::default();
        if let Some(url) = &self.metrics_url {
            if let Ok(resp) = self.http.get(url).send().await {
                if let Ok(text) = resp.text().await {
                    s.rss_bytes = metric(&text, "process_resident_memory_bytes");
                    s.cpu_seconds = metric(&text, "process_cpu_seconds_total");
                    s.open_fds = metric(&text, "process_open_fds");
                    s.connections = metric(&text, "gateway_connections");
                }
            }
        }
        if let Some(pid) = self.pid {
            // /proc is exact and always there: it wins over the metrics.
            if let Some(rss) = proc_rss(pid) {
                s.rss_bytes = Some(rss);
            }
            if let Some(cpu) = proc_cpu(pid) {
                s.cpu_seconds = Some(cpu);
            }
            if let Some(fds) = proc_fds(pid) {
                s.open_fds = Some(fds);
            }
        }
        s
    }
}

/// The sum of every sample of metric `name` (all label sets), if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if series.split('{').next() == Some(name) {
            if let Ok(v) = value.parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    sum
}

fn proc_rss(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_from_stat(&stat, clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime from a /proc/PID/stat line. The command name may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn cpu_from_stat(stat: &str, ticks: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14, stime 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

fn proc_fds(pid: u32) -> Option<f64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as f64)
}

/// The `server` object of the summary.
///
/// `before` is taken before the first connection, `loaded` with every connection up
/// (at the end of the hold or of the messages), `after` once the clients have gone.
/// `conns` and `msgs` are what the server handled between `before` and `loaded`.
pub fn summarize(
    source: &str,
    before: &Sample,
    loaded: &Sample,
    after: &Sample,
    conns: u64,
    msgs: Option<(u64, &Sample, &Sample)>,
) -> Value {
    let mb = |v: Option<f64>| v.map(|b| (b / 1048576.0 * 10.0).round() / 10.0);
    let mut o = Map::new();
    o.insert("source".into(), json!(source));
    o.insert("rss_before_mb".into(), json!(mb(before.rss_bytes)));
    o.insert("rss_loaded_mb".into(), json!(mb(loaded.rss_bytes)));
    o.insert("rss_after_mb".into(), json!(mb(after.rss_bytes)));
    let per_conn = match (before.rss_bytes, loaded.rss_bytes) {
        (Some(b), Some(l)) if conns > 0 => Some(((l - b) / conns as f64).round()),
        _ => None,
    };
    o.insert("bytes_per_conn".into(), json!(per_conn));
    let cpu = |a: &Sample, b: &Sample| match (a.cpu_seconds, b.cpu_seconds) {
        (Some(x), Some(y)) => Some(((y - x) * 1000.0).round() / 1000.0),
        _ => None,
    };
    o.insert("cpu_seconds".into(), json!(cpu(before, after)));
    if conns > 0 && msgs.is_none() {
        let c =
            cpu(before, loaded).map(|s| (s / conns as f64 * 100_000.0 * 1000.0).round() / 1000.0);
        o.insert("cpu_s_per_100k_conns".into(), json!(c));
    }
    if let Some((n, start, end)) = msgs {
        let c = cpu(start, end)
            .filter(|_| n > 0)
            .map(|s| (s / n as f64 * 100_000.0 * 1000.0).round() / 1000.0);
        o.insert("cpu_s_per_100k_msgs".into(), json!(c));
    }
    o.insert("fds_before".into(), json!(before.open_fds));
    o.insert("fds_loaded".into(), json!(loaded.open_fds));
    o.insert("fds_after".into(), json!(after.open_fds));
    o.insert("connections_before".into(), json!(before.connections));
    o.insert("connections_loaded".into(), json!(loaded.connections));
    o.insert("connections_after".into(), json!(after.connections));
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_paren() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    3 0 100 1000 10 18446744073709551615";
        assert_eq!(cpu_from_stat(stat, 100.0), Some(3.0));
    }

    #[test]
    fn metrics_sum_label_sets() {
        let text =
            "# HELP x\ngateway_connections{shard=\"0\"} 3\ngateway_connections{shard=\"1\"} 4\n\
                    gateway_connections_total 99\nprocess_open_fds 12\n";
        assert_eq!(metric(text, "gateway_connections"), Some(7.0));
        assert_eq!(metric(text, "process_open_fds"), Some(12.0));
        assert_eq!(metric(text, "absent"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(proc_rss(pid).unwrap() > 0.0);
        assert!(proc_cpu(pid).is_some());
        assert!(proc_fds(pid).unwrap() >= 3.0);
    }

    #[test]
    fn summary_divides_by_connections() {
        let b = Sample {
            rss_bytes: Some(1_000_000.0),
            cpu_seconds: Some(1.0),
            ..Sample::default()
        };
        let l = Sample {
            rss_bytes: Some(2_000_000.0),
            cpu_seconds: Some(2.0),
            ..Sample::default()
        };
        let v = summarize("t", &b, &l, &l, 1000, None);
        assert_eq!(v["bytes_per_conn"], 1000.0);
        assert_eq!(v["cpu_s_per_100k_conns"], 100.0);
    }
}
