//! Process-wide figures read at scrape time: CPU, memory and file descriptors from
//! /proc and the rlimits, and the lossy logger's dropped lines.

use std::fmt;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::exposition::{counter, encode_into, gauge};

/// Process-wide figures read at scrape time: /proc, rlimits, and the lossy logger's drops.
#[derive(Debug)]
pub(super) struct ProcessCollector {
    log_lines_dropped: u64,
    started: Instant,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        counter(
            e,
            "gateway_log_lines_dropped_total",
            "Log lines dropped because the log queue was full.",
            self.log_lines_dropped,
        )?;
        gauge(
            e,
            "gateway_uptime_seconds",
            "Seconds since the gateway started.",
            self.started.elapsed().as_secs_f64(),
        )?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        if let Some(rss_pages) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        {
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                rss_pages * page_size(),
            )?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle being read is one of the entries.
            let open = dir.count().saturating_sub(1) as u64;
            gauge(
                e,
                "process_open_fds",
                "Number of open file descriptors.",
                open,
            )?;
        }
        if let Some(limit) = max_fds() {
            gauge(
                e,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                limit,
            )?;
        }
        if let Some(ticks) = stat.as_deref().and_then(cpu_ticks) {
            counter(
                e,
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                ticks as f64 / clock_ticks_per_sec() as f64,
            )?;
        }
        if let Some(start) = stat.as_deref().and_then(start_time_secs) {
            gauge(
                e,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                start,
            )?;
        }
        Ok(())
    }
}

/// Process-wide figures from /proc: resident memory, open and maximum fds, CPU time, start
/// time, uptime, and the lines the lossy logger dropped. Read on the business pool at
/// scrape time; appended in the Prometheus text format 0.0.4.
pub fn render_process(out: &mut String, log_lines_dropped: u64, started: Instant) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector {
        log_lines_dropped,
        started,
    }));
    encode_into(&registry, out);
}

/// The fields of /proc/self/stat after the parenthesised command name (which may itself
/// contain spaces and parentheses), starting with field 3 (state).
pub(super) fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat[stat.rfind(')')? + 2..].split_whitespace().collect())
}

/// utime + stime from /proc/self/stat (fields 14 and 15).
pub(super) fn cpu_ticks(stat: &str) -> Option<u64> {
    let f = stat_fields(stat)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Process start time as seconds since the epoch: field 22 of /proc/self/stat (clock
/// ticks after boot) plus `btime` from /proc/stat.
pub(super) fn start_time_secs(stat: &str) -> Option<f64> {
    let ticks: u64 = stat_fields(stat)?.get(19)?.parse().ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(btime as f64 + ticks as f64 / clock_ticks_per_sec() as f64)
}

pub(super) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

pub(super) fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

pub(super) fn max_fds() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r.rlim_cur)
}
