//! What the machine allows, checked before a single socket opens, and the plan that fits.
//!
//! Two limits decide whether tens of thousands of connections can be opened from one
//! machine: open files per process (here 20,000, and it cannot be raised) and ephemeral
//! ports per (source address, destination) pair (about 28,000). loadgen answers the
//! first with child processes (`--procs`, default from RLIMIT_NOFILE) and the second by
//! binding each socket to one of many 127.0.0.0/8 source addresses, round-robin, with
//! `IP_BIND_ADDRESS_NO_PORT` so the port is picked at connect time per 4-tuple.
//! When a target cannot be reached this module says which knob to turn.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use crate::cli::Command;

/// File descriptors a child keeps for itself (runtime, pipes, epoll, stdio).
const FD_RESERVE: u64 = 128;

/// The source addresses to bind, round-robin by device index.
#[derive(Clone, Debug, PartialEq)]
pub enum Sources {
    /// Let the kernel choose (one source address: its ephemeral ports are the limit).
    Kernel,
    /// `first..=last` as host-order integers.
    Range { first: u32, last: u32 },
}

impl Sources {
    pub fn parse(text: &str) -> Result<Sources, String> {
        if text.eq_ignore_ascii_case("none") {
            return Ok(Sources::Kernel);
        }
        let (a, b) = text.split_once('-').unwrap_or((text, text));
        let a: Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|_| format!("--source-range: `{a}` is not an IPv4 address"))?;
        let b: Ipv4Addr = b
            .trim()
            .parse()
            .map_err(|_| format!("--source-range: `{b}` is not an IPv4 address"))?;
        let (first, last) = (u32::from(a), u32::from(b));
        if first > last {
            return Err(format!("--source-range: {a} comes after {b}"));
        }
        Ok(Sources::Range { first, last })
    }

    pub fn len(&self) -> u64 {
        match self {
            Sources::Kernel => 1,
            Sources::Range { first, last } => u64::from(last - first) + 1,
        }
    }

    /// The address device `i` binds, if any.
    pub fn for_index(&self, i: u64) -> Option<IpAddr> {
        match self {
            Sources::Kernel => None,
            Sources::Range { first, .. } => {
                let offset = (i % self.len()) as u32;
                Some(IpAddr::V4(Ipv4Addr::from(first + offset)))
            }
        }
    }

    fn all_loopback(&self) -> bool {
        match self {
            Sources::Kernel => true,
            Sources::Range { first, last } => {
                Ipv4Addr::from(*first).is_loopback() && Ipv4Addr::from(*last).is_loopback()
            }
        }
    }
}

/// Marks a socket so `bind(addr, 0)` leaves the port to `connect`, which can then reuse
/// a port for different destinations: without it every bound socket burns a port of
/// the source address even though the 4-tuple would be unique.
pub fn bind_address_no_port(fd: &impl AsRawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to a live c_int of the given size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Raises the soft open-files limit to the hard one; returns `(soft, hard)` after.
pub fn raise_nofile() -> (u64, u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return (1024, 1024);
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
    }
    (rl.rlim_cur, rl.rlim_max)
}

fn read_sys(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Ports in `net.ipv4.ip_local_port_range`.
fn ephemeral_ports() -> u64 {
    read_sys("/proc/sys/net/ipv4/ip_local_port_range")
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some((it.next()??, it.next()??))
        })
        .map_or(28_232, |(lo, hi)| hi.saturating_sub(lo) + 1)
}

/// The soft "Max open files" of another process, from /proc/PID/limits.
pub fn process_nofile(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// How the work is split: `procs` children, child `k` taking `slices[k] = (first, count)`.
#[derive(Debug, Clone)]
pub struct Plan {
    pub procs: usize,
    pub slices: Vec<(u64, u64)>,
    pub sources: Sources,
    pub fd_limit: u64,
    /// Things that may go wrong but do not stop the run, to print on stderr.
    pub warnings: Vec<String>,
}

/// Checks the limits for `cmd` and plans processes; `Err` explains what to change.
pub fn plan(cmd: &Command) -> Result<Plan, String> {
    let common = cmd.common();
    let sources = Sources::parse(&common.source_range)?;
    let mut warnings = Vec::new();
    // The devices' addresses and the publisher's (--target).
    for target in common.device_targets().into_iter().chain([common.target]) {
        if !target.ip().is_loopback() && !common.allow_remote {
            return Err(format!(
                "target {target} is outside 127.0.0.0/8; pass --allow-remote if you really mean \
                 to load another machine (and a --source-range of addresses you own, or `none`)"
            ));
        }
        if target.ip().is_loopback() && !sources.all_loopback() {
            return Err(format!(
                "--source-range {} is not inside 127.0.0.0/8, so it cannot reach the loopback \
                 target {target}; use e.g. 127.0.0.2-127.0.0.254",
                common.source_range
            ));
        }
        if let (Sources::Range { .. }, IpAddr::V6(_)) = (&sources, target.ip()) {
            return Err("an IPv6 target needs --source-range none".into());
        }
        check_bind(&sources, target)?;
    }
    let target = common.target;

    let sockets = cmd.sockets();
    let units = cmd.units().max(1);
    let (soft, hard) = raise_nofile();
    let per_proc = soft.saturating_sub(FD_RESERVE).max(1);
    let procs = match common.procs {
        Some(0) => return Err("--procs must be at least 1".into()),
        Some(p) => {
            let need = sockets.div_ceil(p as u64) + FD_RESERVE;
            if need > soft {
                let min = sockets.div_ceil(per_proc);
                return Err(format!(
                    "{sockets} sockets over {p} process(es) need {need} open files each, but \
                     RLIMIT_NOFILE is {soft} (hard limit {hard}). Use --procs {min} or more, \
                     or raise the limit (`ulimit -n`, LimitNOFILE= in systemd, nofile in \
                     /etc/security/limits.conf) if the hard limit allows."
                ));
            }
            p
        }
        None => sockets.div_ceil(per_proc).max(1) as usize,
    };
    let procs = procs.min(units as usize).max(1);

    // Ephemeral ports: every socket to the one target needs a distinct (source, port).
    let ports = ephemeral_ports();
    let capacity = ports * sources.len();
    if sockets > capacity {
        return Err(format!(
            "{sockets} connections to {target} need {sockets} distinct (source address, port) \
             pairs but {} source address(es) x {ports} ephemeral ports give {capacity}. Widen \
             --source-range (e.g. 127.0.0.2-127.0.0.254) or net.ipv4.ip_local_port_range.",
            sources.len()
        ));
    }
    if let Command::Churn(a) = cmd {
        // A client that closes first keeps the 4-tuple in TIME_WAIT for 60 s.
        let per_minute = (a.rate * 60.0) as u64;
        if a.mode != crate::cli::ProbeMode::Mqtt && per_minute.min(a.count) > capacity {
            warnings.push(format!(
                "{} probes a minute leave that many sockets in TIME_WAIT, more than the {capacity} \
                 (source, port) pairs; widen --source-range or lower --rate",
                per_minute
            ));
        }
    }

    // System-wide open files: on loopback both ends of every connection are files.
    let both_ends = if target.ip().is_loopback() { 2 } else { 1 };
    if let Some(nr) = read_sys("/proc/sys/fs/file-nr") {
        let v: Vec<u64> = nr
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [used, _, max] = v[..] {
            if used + sockets * both_ends > max {
                warnings.push(format!(
                    "fs.file-max is {max} with {used} in use; {} more files may not fit \
                     (sysctl -w fs.file-max=...)",
                    sockets * both_ends
                ));
            }
        }
    }
    if let Some(max) =
        read_sys("/proc/sys/net/netfilter/nf_conntrack_max").and_then(|s| s.parse::<u64>().ok())
    {
        if sockets > max {
            warnings.push(format!(
                "net.netfilter.nf_conntrack_max is {max}: connections beyond it are dropped \
                 while conntrack is loaded (sysctl -w net.netfilter.nf_conntrack_max=...)"
            ));
        }
    }
    if let Some(pid) = common.server_pid {
        match process_nofile(pid) {
            Some(limit) if limit < sockets + 64 => warnings.push(format!(
                "the server (pid {pid}) may open only {limit} files: it cannot hold {sockets} \
                 connections; raise its LimitNOFILE / ulimit -n"
            )),
            Some(_) => {}
            None => warnings.push(format!("cannot read /proc/{pid}/limits")),
        }
    }

    // Split the units evenly; the first `rem` children take one more.
    let base = units / procs as u64;
    let rem = units % procs as u64;
    let mut slices = Vec::with_capacity(procs);
    let mut first = 0;
    for k in 0..procs as u64 {
        let count = base + u64::from(k < rem);
        slices.push((first, count));
        first += count;
    }
    Ok(Plan {
        procs,
        slices,
        sources,
        fd_limit: soft,
        warnings,
    })
}

/// Binds one socket to the first and the last source address, so a range the kernel
/// cannot use fails here with a message instead of as thousands of connect errors.
fn check_bind(sources: &Sources, target: SocketAddr) -> Result<(), String> {
    let Sources::Range { first, last } = *sources else {
        return Ok(());
    };
    for a in [first, last] {
        let ip = Ipv4Addr::from(a);
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(target),
            socket2::Type::STREAM,
            None,
        )
        .map_err(|e| format!("socket(): {e}"))?;
        bind_address_no_port(&socket);
        socket
            .bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())
            .map_err(|e| {
                format!(
                    "cannot bind source address {ip}: {e}. On Linux all of 127.0.0.0/8 is \
                     local; elsewhere add the addresses to lo or pass --source-range none"
                )
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ranges_parse_and_rotate() {
        let s = Sources::parse("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(s.len(), 3);
        let ips: Vec<_> = (0..4)
            .map(|i| s.for_index(i).unwrap().to_string())
            .collect();
        assert_eq!(ips, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2"]);
        assert_eq!(Sources::parse("none").unwrap(), Sources::Kernel);
        assert_eq!(Sources::parse("127.0.0.9").unwrap().len(), 1);
        assert!(Sources::parse("127.0.0.9-127.0.0.2").is_err());
        assert!(Sources::parse("localhost").is_err());
    }

    #[test]
    fn plans_split_evenly_and_refuse_too_few_processes() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            crate::cli::Cli::try_parse_from(args)
                .unwrap()
                .command
                .unwrap()
        };
        let cmd = parse(&["loadgen", "connect", "--conns", "10", "--procs", "3"]);
        let p = plan(&cmd).unwrap();
        assert_eq!(p.slices, vec![(0, 4), (4, 3), (7, 3)]);

        let (soft, _) = raise_nofile();
        let too_many = (soft * 3).to_string();
        let cmd = parse(&["loadgen", "connect", "--conns", &too_many, "--procs", "1"]);
        let err = plan(&cmd).unwrap_err();
        assert!(
            err.contains("--procs 4") || err.contains("--procs 3"),
            "{err}"
        );
        let cmd = parse(&["loadgen", "connect", "--conns", &too_many]);
        assert!(plan(&cmd).unwrap().procs >= 3);

        let cmd = parse(&["loadgen", "connect", "--target", "192.0.2.1:1883"]);
        assert!(plan(&cmd).unwrap_err().contains("--allow-remote"));
    }
}
