//! `gateway doctor` and the startup file-descriptor check.
//!
//! A million connections fail first on limits outside the process: "too many open files"
//! (RLIMIT_NOFILE, fs.nr_open, fs.file-max), a listen backlog the kernel silently caps
//! (somaxconn), TCP memory pressure that makes the kernel drop data (tcp_mem), or a full
//! conntrack table that drops new SYNs. This module reads each of those limits, sizes what
//! they should be for a target number of connections, and says what to set.
//!
//! The recommendations here are the ones `config/sysctl-1m.conf` and
//! `config/limits-1m.conf` apply for a million connections; a test checks that those files
//! satisfy them. Everything reads `/proc/sys` with plain blocking `std::fs`: this runs from
//! the CLI and once at startup, never on an IO shard.

use std::fmt::Write as _;
use std::io;

/// One limit, what it is, what it should be, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The sysctl key (`net.core.somaxconn`) or `RLIMIT_NOFILE soft` / `RLIMIT_NOFILE hard`.
    pub name: String,
    /// The current value, or `unavailable (why)` when it could not be read.
    pub value: String,
    /// What it should be for the target, e.g. `>= 1100000`.
    pub recommended: String,
    /// False only when the value was read and misses the recommendation.
    pub ok: bool,
    /// The command or config line that fixes it (empty when `ok`).
    pub fix: String,
}

/// Outcome of one check; the report shows it in its STATUS column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    /// Below what the target needs.
    Low,
    /// Above what is sensible for the target (per-socket buffer defaults).
    High,
    /// Could not be read; not counted as a failure.
    Unavailable,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Low => "LOW",
            Verdict::High => "HIGH",
            Verdict::Unavailable => "N/A",
        }
    }
}

/// What the kernel and process limits should be for `target` connections.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recommendation {
    /// RLIMIT_NOFILE, soft and hard: the connections plus 10% for listeners, epoll, the
    /// HTTP API, log files and connections that are closing.
    nofile: u64,
    /// fs.file-max is system-wide: room for the gateway plus everything else on the node
    /// (a load generator on the same host holds another socket per connection).
    file_max: u64,
    /// fs.nr_open caps what RLIMIT_NOFILE can be raised to.
    nr_open: u64,
    /// Caps every listen backlog; the gateway asks for `tcp.backlog` = 4096 per shard.
    somaxconn: u64,
    /// Half-open connections the kernel queues during a reconnect storm.
    syn_backlog: u64,
    /// Packets queued per CPU between the NIC and the TCP stack during a storm.
    netdev_backlog: u64,
    /// net.ipv4.tcp_mem: min, pressure and max, in pages.
    tcp_mem_pages: [u64; 3],
    /// The largest default (middle value) of tcp_rmem / tcp_wmem that is sensible.
    socket_buffer_default_max: u64,
    /// The smallest max (third value) of tcp_rmem / tcp_wmem, so one MQTT packet of the
    /// default `max_packet_size` can be in flight on a busy socket.
    socket_buffer_max_min: u64,
    /// Ephemeral ports per source address (load generator side).
    port_range_width: u64,
    /// net.netfilter.nf_conntrack_max when conntrack is loaded: every connection is a
    /// flow, and a full table drops new SYNs. 2x leaves room for flows in TIME_WAIT.
    conntrack_max: u64,
}

/// Bytes of queued data budgeted per socket at the tcp_mem pressure threshold.
///
/// tcp_mem counts memory in socket send and receive queues, not the socket structs
/// themselves (those are slab memory, ~4 KiB per TCP socket, outside tcp_mem). A mostly
/// idle MQTT connection has empty queues, but a topic fan-out or a reconnect storm gives
/// every socket a small skb at once, and the kernel charges each socket with queued data
/// in whole pages. So budget one 4 KiB page per socket before pressure and two as the
/// hard max: for 1,000,000 sockets that is 1,000,000 pages (~3.8 GiB) at pressure and
/// 2,000,000 pages (~7.6 GiB) max, with min at half the pressure value. Stock kernels
/// size tcp_mem from RAM (max ~9% of it: ~2.2 GiB on 24 GiB), too little for 1M sockets.
const TCP_MEM_BYTES_PER_SOCKET: u64 = 4096;

impl Recommendation {
    fn for_target(target: u64, page_size: u64) -> Recommendation {
        let nofile = recommended_nofile(target);
        let pressure = target
            .saturating_mul(TCP_MEM_BYTES_PER_SOCKET)
            .div_ceil(page_size.max(1));
        Recommendation {
            nofile,
            file_max: target.saturating_mul(2),
            nr_open: nofile,
            somaxconn: 4096,
            syn_backlog: 8192,
            netdev_backlog: 16_384,
            tcp_mem_pages: [pressure / 2, pressure, pressure.saturating_mul(2)],
            socket_buffer_default_max: 16_384,
            socket_buffer_max_min: 1 << 20,
            port_range_width: 50_000,
            conntrack_max: target.saturating_mul(2),
        }
    }
}

/// Open files the gateway needs for `connections`: the connections plus 10%.
pub fn recommended_nofile(connections: u64) -> u64 {
    connections.saturating_add(connections.div_ceil(10))
}

/// The startup fd check: a warning when the soft RLIMIT_NOFILE (after
/// [`raise_nofile_limit`]) cannot hold `max_connections` with the 10% headroom.
pub fn fd_limit_warning(nofile_soft: u64, max_connections: u64) -> Option<String> {
    let needed = recommended_nofile(max_connections);
    (nofile_soft < needed).then(|| {
        format!(
            "RLIMIT_NOFILE is {nofile_soft}, below the {needed} that mqtt.max_connections = \
             {max_connections} needs: connections beyond ~{} will fail with \"too many open \
             files\"; run `gateway doctor`, or set mqtt.max_connections to what this node \
             should hold",
            nofile_soft.saturating_sub(nofile_soft.div_ceil(10))
        )
    })
}

/// Reads the process and kernel limits that matter for a million connections: RLIMIT_NOFILE
/// (soft and hard), fs.file-max, fs.nr_open, net.core.somaxconn, net.ipv4.tcp_max_syn_backlog,
/// net.ipv4.tcp_mem / tcp_rmem / tcp_wmem, net.ipv4.ip_local_port_range,
/// net.netfilter.nf_conntrack_max (only when the file exists), net.core.netdev_max_backlog.
/// Missing/unreadable → the check says "unavailable" and is not OK-failed (see `value`).
pub fn checks(target_connections: u64) -> Vec<Check> {
    evaluate_system(target_connections)
        .into_iter()
        .map(|(c, _)| c)
        .collect()
}

/// The checks as a table (NAME, VALUE, RECOMMENDED, STATUS) followed by the command or
/// config line for each one that is LOW or HIGH. Returns the text; the caller prints it.
#[must_use]
pub fn report(target_connections: u64) -> String {
    render(target_connections, &evaluate_system(target_connections))
}

/// `gateway doctor`: the report, and whether any item is LOW (the command then exits 1).
#[must_use]
pub fn report_and_low(target_connections: u64) -> (String, bool) {
    let results = evaluate_system(target_connections);
    let low = results.iter().any(|(_, v)| *v == Verdict::Low);
    (render(target_connections, &results), low)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft_before, soft_after, hard).
pub fn raise_nofile_limit() -> io::Result<(u64, u64, u64)> {
    let (before, hard) = nofile_limit()?;
    if before < hard {
        set_nofile_soft(hard)?;
    }
    let (after, hard) = nofile_limit()?;
    Ok((before, after, hard))
}

/// RLIMIT_NOFILE as (soft, hard).
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, but not on every target
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the `rlimit` we pass, which lives on our stack for the
    // whole call. FFI is the only way to read a resource limit with std and libc.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur as u64, limit.rlim_max as u64))
}

fn set_nofile_soft(soft: u64) -> io::Result<()> {
    let (_, hard) = nofile_limit()?;
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the `rlimit` we pass, valid for the whole call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Reads a sysctl such as `net.core.somaxconn` from `/proc/sys/net/core/somaxconn`.
fn read_sysctl(key: &str) -> io::Result<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
}

fn evaluate_system(target: u64) -> Vec<(Check, Verdict)> {
    let nofile = nofile_limit().map_err(|e| format!("getrlimit failed: {e}"));
    evaluate(target, page_size(), nofile, &read_sysctl)
}

/// All checks against the given readings. `read` is [`read_sysctl`] in production and a
/// fake in the tests.
fn evaluate(
    target: u64,
    page_size: u64,
    nofile: Result<(u64, u64), String>,
    read: &dyn Fn(&str) -> io::Result<String>,
) -> Vec<(Check, Verdict)> {
    let rec = Recommendation::for_target(target, page_size);
    let mut out = Vec::new();

    let nofile_fix = |n: u64| {
        format!(
            "add `gateway soft nofile {n}` and `gateway hard nofile {n}` to \
             /etc/security/limits.d/ (config/limits-1m.conf), or LimitNOFILE={n} in the \
             systemd unit; it cannot exceed fs.nr_open"
        )
    };
    match nofile {
        Ok((soft, hard)) => {
            out.push(scalar_check(
                "RLIMIT_NOFILE soft",
                soft,
                rec.nofile,
                format!(
                    "the gateway raises its soft limit to the hard limit at startup; \
                     elsewhere: ulimit -n {}",
                    rec.nofile
                ),
            ));
            out.push(scalar_check(
                "RLIMIT_NOFILE hard",
                hard,
                rec.nofile,
                nofile_fix(rec.nofile),
            ));
        }
        Err(why) => {
            for name in ["RLIMIT_NOFILE soft", "RLIMIT_NOFILE hard"] {
                out.push(unavailable(name, format!(">= {}", rec.nofile), &why));
            }
        }
    }

    let scalars = [
        ("fs.file-max", rec.file_max),
        ("fs.nr_open", rec.nr_open),
        ("net.core.somaxconn", rec.somaxconn),
        ("net.ipv4.tcp_max_syn_backlog", rec.syn_backlog),
        ("net.core.netdev_max_backlog", rec.netdev_backlog),
    ];
    for (key, min) in scalars {
        out.push(match read(key) {
            Err(e) => unavailable(key, format!(">= {min}"), &read_error(key, &e)),
            Ok(raw) => match parse_u64(&raw) {
                None => unavailable(
                    key,
                    format!(">= {min}"),
                    &format!("cannot parse {:?}", raw.trim()),
                ),
                Some(value) => scalar_check(key, value, min, format!("sysctl -w {key}={min}")),
            },
        });
    }

    let key = "net.ipv4.tcp_mem";
    let [min, pressure, max] = rec.tcp_mem_pages;
    let recommended = format!("pressure >= {pressure}, max >= {max} pages");
    out.push(match read(key).map(|raw| parse_triple(&raw)) {
        Err(e) => unavailable(key, recommended, &read_error(key, &e)),
        Ok(None) => unavailable(key, recommended, "cannot parse three numbers"),
        Ok(Some(current)) => {
            let verdict = judge_tcp_mem(current, rec.tcp_mem_pages);
            // Never lower a value that is already larger than recommended.
            let set = [
                current[0].max(min),
                current[1].max(pressure),
                current[2].max(max),
            ];
            let value = format!(
                "{} {} {} pages ({} MiB max)",
                current[0],
                current[1],
                current[2],
                current[2].saturating_mul(page_size) >> 20
            );
            let fix = format!("sysctl -w {key}=\"{} {} {}\"", set[0], set[1], set[2]);
            finish(key, value, recommended, verdict, fix)
        }
    });

    for key in ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"] {
        let recommended = format!(
            "default <= {}, max >= {}",
            rec.socket_buffer_default_max, rec.socket_buffer_max_min
        );
        out.push(match read(key).map(|raw| parse_triple(&raw)) {
            Err(e) => unavailable(key, recommended, &read_error(key, &e)),
            Ok(None) => unavailable(key, recommended, "cannot parse three numbers"),
            Ok(Some(current)) => {
                let verdict = judge_socket_buffers(
                    current,
                    rec.socket_buffer_default_max,
                    rec.socket_buffer_max_min,
                );
                let set = [
                    current[0].min(rec.socket_buffer_default_max),
                    current[1].min(rec.socket_buffer_default_max),
                    current[2].max(rec.socket_buffer_max_min),
                ];
                let value = format!("{} {} {}", current[0], current[1], current[2]);
                let fix = format!("sysctl -w {key}=\"{} {} {}\"", set[0], set[1], set[2]);
                finish(key, value, recommended, verdict, fix)
            }
        });
    }

    // Ephemeral ports are used by outgoing connections only: the gateway accepts, so this
    // limits a load generator (or bridge) on this host, per source address.
    let key = "net.ipv4.ip_local_port_range";
    let recommended = format!(
        ">= {} ports (load generator host only)",
        rec.port_range_width
    );
    out.push(match read(key).map(|raw| parse_port_range(&raw)) {
        Err(e) => unavailable(key, recommended, &read_error(key, &e)),
        Ok(None) => unavailable(key, recommended, "cannot parse a port range"),
        Ok(Some((low, high))) => {
            let verdict = judge_port_range((low, high), rec.port_range_width);
            let value = format!("{low}-{high} ({} ports)", port_range_width((low, high)));
            let fix = format!(
                "sysctl -w {key}=\"10000 65535\" (only where the load generator runs; \
                 the gateway itself does not use ephemeral ports)"
            );
            finish(key, value, recommended, verdict, fix)
        }
    });

    // Only present when the conntrack module is loaded; without it there is no table to fill.
    let key = "net.netfilter.nf_conntrack_max";
    match read(key) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => out.push(unavailable(
            key,
            format!(">= {}", rec.conntrack_max),
            &read_error(key, &e),
        )),
        Ok(raw) => out.push(match parse_u64(&raw) {
            None => unavailable(
                key,
                format!(">= {}", rec.conntrack_max),
                &format!("cannot parse {:?}", raw.trim()),
            ),
            Some(value) => scalar_check(
                key,
                value,
                rec.conntrack_max,
                format!("sysctl -w {key}={}", rec.conntrack_max),
            ),
        }),
    }
    out
}

fn read_error(key: &str, e: &io::Error) -> String {
    format!("cannot read /proc/sys/{}: {e}", key.replace('.', "/"))
}

fn scalar_check(name: &str, value: u64, min: u64, fix: String) -> (Check, Verdict) {
    finish(
        name,
        value.to_string(),
        format!(">= {min}"),
        judge_at_least(value, min),
        fix,
    )
}

fn unavailable(name: &str, recommended: String, why: &str) -> (Check, Verdict) {
    finish(
        name,
        format!("unavailable ({why})"),
        recommended,
        Verdict::Unavailable,
        String::new(),
    )
}

fn finish(
    name: &str,
    value: String,
    recommended: String,
    verdict: Verdict,
    fix: String,
) -> (Check, Verdict) {
    let ok = matches!(verdict, Verdict::Ok | Verdict::Unavailable);
    let check = Check {
        name: name.to_string(),
        value,
        recommended,
        ok,
        fix: if ok { String::new() } else { fix },
    };
    (check, verdict)
}

fn render(target: u64, results: &[(Check, Verdict)]) -> String {
    let header = ["NAME", "VALUE", "RECOMMENDED", "STATUS"];
    let width = |column: fn(&Check) -> &str, title: &str| {
        results
            .iter()
            .map(|(c, _)| column(c).len())
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let name_w = width(|c| &c.name, header[0]);
    let value_w = width(|c| &c.value, header[1]);
    let rec_w = width(|c| &c.recommended, header[2]);

    let mut out = String::new();
    let _ = writeln!(out, "gateway doctor: limits for {target} connections\n");
    let _ = writeln!(
        out,
        "{:name_w$}  {:value_w$}  {:rec_w$}  {}",
        header[0], header[1], header[2], header[3]
    );
    for (c, verdict) in results {
        let _ = writeln!(
            out,
            "{:name_w$}  {:value_w$}  {:rec_w$}  {}",
            c.name,
            c.value,
            c.recommended,
            verdict.word()
        );
    }
    let failing: Vec<&Check> = results.iter().map(|(c, _)| c).filter(|c| !c.ok).collect();
    if failing.is_empty() {
        let _ = writeln!(out, "\nAll limits that could be read are sufficient.");
    } else {
        let _ = writeln!(out, "\nTo fix:");
        for c in failing {
            let _ = writeln!(out, "  {}: {}", c.name, c.fix);
        }
        let _ = writeln!(
            out,
            "\nTo keep the settings across reboots, install config/sysctl-1m.conf in \
             /etc/sysctl.d/ and config/limits-1m.conf in /etc/security/limits.d/ \
             (systemd services: LimitNOFILE= in the unit)."
        );
    }
    out
}

fn judge_at_least(value: u64, min: u64) -> Verdict {
    if value >= min {
        Verdict::Ok
    } else {
        Verdict::Low
    }
}

/// tcp_mem is OK when its pressure and max thresholds reach the recommendation; the min
/// (below which the kernel does not reclaim at all) matters less.
fn judge_tcp_mem(current: [u64; 3], recommended: [u64; 3]) -> Verdict {
    if current[1] >= recommended[1] && current[2] >= recommended[2] {
        Verdict::Ok
    } else {
        Verdict::Low
    }
}

/// tcp_rmem / tcp_wmem: a small default keeps a million sockets from each queueing a lot
/// when they all get data at once; a large max lets a busy socket carry a big packet.
/// A max that is too small is the worse problem, so it is reported first.
fn judge_socket_buffers(current: [u64; 3], default_max: u64, max_min: u64) -> Verdict {
    if current[2] < max_min {
        Verdict::Low
    } else if current[1] > default_max {
        Verdict::High
    } else {
        Verdict::Ok
    }
}

fn port_range_width((low, high): (u16, u16)) -> u64 {
    (u64::from(high) + 1).saturating_sub(u64::from(low))
}

fn judge_port_range(range: (u16, u16), min_width: u64) -> Verdict {
    judge_at_least(port_range_width(range), min_width)
}

/// A single number, as in `/proc/sys/fs/file-max`.
fn parse_u64(raw: &str) -> Option<u64> {
    raw.trim().parse().ok()
}

/// Exactly three whitespace-separated numbers, as in tcp_mem, tcp_rmem and tcp_wmem.
fn parse_triple(raw: &str) -> Option<[u64; 3]> {
    let mut numbers = raw.split_whitespace().map(|s| s.parse::<u64>().ok());
    let triple = [numbers.next()??, numbers.next()??, numbers.next()??];
    numbers.next().is_none().then_some(triple)
}

/// `low high`, as in ip_local_port_range.
fn parse_port_range(raw: &str) -> Option<(u16, u16)> {
    let mut numbers = raw.split_whitespace().map(|s| s.parse::<u16>().ok());
    let range = (numbers.next()??, numbers.next()??);
    (numbers.next().is_none() && range.0 <= range.1).then_some(range)
}

#[cfg(test)]
mod tests;
