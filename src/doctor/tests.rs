//! Unit tests of `crate::doctor`: parsing `/proc` formats, the ok/low/high decisions and
//! the report, over a fake `/proc/sys` (never the real host's), and that the shipped
//! `config/sysctl-1m.conf` and `config/limits-1m.conf` pass every check.

use super::*;
use std::collections::HashMap;

const SYSCTL_1M: &str = include_str!("../../config/sysctl-1m.conf");
const LIMITS_1M: &str = include_str!("../../config/limits-1m.conf");

/// `key = value` lines of a sysctl.d file (a leading `-` only means "ignore errors").
fn sysctl_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().trim_start_matches('-').to_string(),
                v.trim().to_string(),
            )
        })
        .collect()
}

/// (soft, hard) nofile from a limits.conf file.
fn limits_conf_nofile(text: &str) -> (u64, u64) {
    let mut soft = 0;
    let mut hard = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [_, kind, "nofile", value] = fields[..] {
            let value: u64 = value.parse().unwrap();
            match kind {
                "soft" => soft = value,
                "hard" => hard = value,
                "-" => (soft, hard) = (value, value),
                _ => {}
            }
        }
    }
    (soft, hard)
}

fn fake(values: &[(&str, &str)]) -> impl Fn(&str) -> io::Result<String> {
    let map: HashMap<String, String> = values
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |key: &str| {
        map.get(key)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "No such file or directory"))
    }
}

fn find<'a>(results: &'a [(Check, Verdict)], name: &str) -> &'a (Check, Verdict) {
    results
        .iter()
        .find(|(c, _)| c.name == name)
        .unwrap_or_else(|| panic!("no check named {name}"))
}

/// The /proc values of a stock kernel on a 24 GiB machine.
const STOCK: &[(&str, &str)] = &[
    ("fs.file-max", "2466170\n"),
    ("fs.nr_open", "1048576\n"),
    ("net.core.somaxconn", "4096\n"),
    ("net.ipv4.tcp_max_syn_backlog", "2048\n"),
    ("net.ipv4.tcp_mem", "287898\t383867\t575796\n"),
    ("net.ipv4.tcp_rmem", "4096\t131072\t33554432\n"),
    ("net.ipv4.tcp_wmem", "4096\t16384\t4194304\n"),
    ("net.ipv4.ip_local_port_range", "32768\t60999\n"),
    ("net.netfilter.nf_conntrack_max", "262144\n"),
    ("net.core.netdev_max_backlog", "1000\n"),
];

#[test]
fn parses_proc_formats() {
    assert_eq!(parse_u64("1048576\n"), Some(1_048_576));
    assert_eq!(
        parse_u64("9223372036854775807\n"),
        Some(9_223_372_036_854_775_807)
    );
    assert_eq!(parse_u64("abc"), None);
    assert_eq!(parse_u64(""), None);
    assert_eq!(
        parse_triple("287898\t383867\t575796\n"),
        Some([287_898, 383_867, 575_796])
    );
    assert_eq!(
        parse_triple("4096 131072 6291456"),
        Some([4096, 131_072, 6_291_456])
    );
    assert_eq!(parse_triple("1 2"), None);
    assert_eq!(parse_triple("1 2 3 4"), None);
    assert_eq!(parse_triple("1 x 3"), None);
    assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
    assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
    assert_eq!(parse_port_range("60999 32768"), None);
    assert_eq!(parse_port_range("1024 70000"), None);
    assert_eq!(parse_port_range("1024"), None);
}

#[test]
fn ok_low_high_decisions() {
    assert_eq!(judge_at_least(4096, 4096), Verdict::Ok);
    assert_eq!(judge_at_least(4095, 4096), Verdict::Low);
    let rec = [500_000, 1_000_000, 2_000_000];
    assert_eq!(
        judge_tcp_mem([524_288, 1_048_576, 2_097_152], rec),
        Verdict::Ok
    );
    assert_eq!(
        judge_tcp_mem([1, 1_000_000, 2_000_000], rec),
        Verdict::Ok,
        "min is advisory"
    );
    assert_eq!(
        judge_tcp_mem([287_898, 383_867, 575_796], rec),
        Verdict::Low
    );
    assert_eq!(
        judge_tcp_mem([500_000, 1_000_000, 1_999_999], rec),
        Verdict::Low
    );
    assert_eq!(
        judge_socket_buffers([4096, 16_384, 4_194_304], 16_384, 1 << 20),
        Verdict::Ok
    );
    assert_eq!(
        judge_socket_buffers([4096, 131_072, 33_554_432], 16_384, 1 << 20),
        Verdict::High
    );
    assert_eq!(
        judge_socket_buffers([4096, 16_384, 65_536], 16_384, 1 << 20),
        Verdict::Low
    );
    assert_eq!(port_range_width((32768, 60999)), 28_232);
    assert_eq!(port_range_width((0, 65535)), 65_536);
    assert_eq!(judge_port_range((32768, 60999), 50_000), Verdict::Low);
    assert_eq!(judge_port_range((10000, 65535), 50_000), Verdict::Ok);
}

#[test]
fn recommendations_scale_with_the_target() {
    let r = Recommendation::for_target(1_000_000, 4096);
    assert_eq!(r.nofile, 1_100_000);
    assert_eq!(r.file_max, 2_000_000);
    assert!(r.nr_open >= r.nofile);
    assert_eq!(r.tcp_mem_pages, [500_000, 1_000_000, 2_000_000]);
    assert_eq!(r.conntrack_max, 2_000_000);
    // Bigger pages mean fewer of them for the same bytes.
    assert_eq!(
        Recommendation::for_target(1_000_000, 65536).tcp_mem_pages[1],
        62_500
    );
    assert_eq!(recommended_nofile(10), 11);
    assert_eq!(recommended_nofile(1), 2);
    assert_eq!(recommended_nofile(u64::MAX), u64::MAX);
}

#[test]
fn a_stock_kernel_is_flagged_with_fixes() {
    let results = evaluate(1_000_000, 4096, Ok((1024, 20_000)), &fake(STOCK));
    for (name, verdict) in [
        ("RLIMIT_NOFILE soft", Verdict::Low),
        ("RLIMIT_NOFILE hard", Verdict::Low),
        ("fs.file-max", Verdict::Ok),
        ("fs.nr_open", Verdict::Low),
        ("net.core.somaxconn", Verdict::Ok),
        ("net.ipv4.tcp_max_syn_backlog", Verdict::Low),
        ("net.ipv4.tcp_mem", Verdict::Low),
        ("net.ipv4.tcp_rmem", Verdict::High),
        ("net.ipv4.tcp_wmem", Verdict::Ok),
        ("net.ipv4.ip_local_port_range", Verdict::Low),
        ("net.netfilter.nf_conntrack_max", Verdict::Low),
        ("net.core.netdev_max_backlog", Verdict::Low),
    ] {
        let (check, got) = find(&results, name);
        assert_eq!(*got, verdict, "{name}: {check:?}");
        assert_eq!(check.ok, verdict == Verdict::Ok, "{name}");
        assert_eq!(
            check.fix.is_empty(),
            check.ok,
            "{name}: a fix exactly when not OK"
        );
    }
    assert_eq!(
        find(&results, "fs.nr_open").0.fix,
        "sysctl -w fs.nr_open=1100000"
    );
    // The fix never lowers a component that is already high enough.
    assert_eq!(
        find(&results, "net.ipv4.tcp_rmem").0.fix,
        "sysctl -w net.ipv4.tcp_rmem=\"4096 16384 33554432\""
    );
    assert_eq!(
        find(&results, "net.ipv4.tcp_mem").0.fix,
        "sysctl -w net.ipv4.tcp_mem=\"500000 1000000 2000000\""
    );
    assert!(find(&results, "RLIMIT_NOFILE hard")
        .0
        .fix
        .contains("LimitNOFILE=1100000"));
}

#[test]
fn missing_values_are_unavailable_not_failures() {
    let results = evaluate(1_000_000, 4096, Err("getrlimit failed".into()), &fake(&[]));
    // Conntrack is skipped entirely when its file does not exist.
    assert!(results
        .iter()
        .all(|(c, _)| c.name != "net.netfilter.nf_conntrack_max"));
    assert_eq!(results.len(), 11);
    for (check, verdict) in &results {
        assert_eq!(*verdict, Verdict::Unavailable, "{check:?}");
        assert!(check.ok, "{check:?}");
        assert!(check.value.starts_with("unavailable ("), "{check:?}");
    }
    let garbled = evaluate(
        1_000_000,
        4096,
        Ok((1, 1)),
        &fake(&[("net.ipv4.tcp_mem", "1 2")]),
    );
    let (check, verdict) = find(&garbled, "net.ipv4.tcp_mem");
    assert_eq!(*verdict, Verdict::Unavailable);
    assert!(
        check.ok && check.value.contains("cannot parse"),
        "{check:?}"
    );
}

#[test]
fn a_permission_error_on_conntrack_is_reported_as_unavailable() {
    let read = |key: &str| -> io::Result<String> {
        if key == "net.netfilter.nf_conntrack_max" {
            Err(io::Error::new(io::ErrorKind::PermissionDenied, "denied"))
        } else {
            fake(STOCK)(key)
        }
    };
    let results = evaluate(1_000_000, 4096, Ok((1, 1)), &read);
    let (check, verdict) = find(&results, "net.netfilter.nf_conntrack_max");
    assert_eq!(*verdict, Verdict::Unavailable);
    assert!(check.value.contains("denied"), "{check:?}");
}

/// The shipped config files must satisfy the doctor for a million connections.
#[test]
fn the_shipped_1m_files_pass_every_check() {
    let sysctl = sysctl_file(SYSCTL_1M);
    let pairs: Vec<(&str, &str)> = sysctl
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (soft, hard) = limits_conf_nofile(LIMITS_1M);
    let results = evaluate(1_000_000, 4096, Ok((soft, hard)), &fake(&pairs));
    assert_eq!(results.len(), 12, "every check, conntrack included");
    for (check, verdict) in &results {
        assert_eq!(*verdict, Verdict::Ok, "{check:?}");
    }
    // RLIMIT_NOFILE cannot be raised above fs.nr_open.
    assert!(hard <= parse_u64(&sysctl["fs.nr_open"]).unwrap());
    // The systemd note in limits-1m.conf names the same number.
    assert!(LIMITS_1M.contains(&format!("LimitNOFILE={hard}")));
}

#[test]
fn report_lists_every_check_and_the_fixes() {
    let results = evaluate(1_000_000, 4096, Ok((1024, 20_000)), &fake(STOCK));
    let text = render(1_000_000, &results);
    for (check, _) in &results {
        assert!(
            text.contains(&check.name),
            "{} missing from:\n{text}",
            check.name
        );
    }
    assert!(text.contains("NAME") && text.contains("RECOMMENDED") && text.contains("STATUS"));
    assert!(text.contains("LOW") && text.contains("HIGH"));
    assert!(
        text.contains("sysctl -w net.core.netdev_max_backlog=16384"),
        "{text}"
    );
    // The real system: every check it produced appears in the report.
    let text = report(1_000_000);
    for check in checks(1_000_000) {
        assert!(
            text.contains(&check.name),
            "{} missing from:\n{text}",
            check.name
        );
    }
}

#[test]
fn report_says_so_when_everything_is_fine() {
    let results = evaluate(10, 4096, Ok((1_000, 1_000)), &fake(&[]));
    let text = render(10, &results);
    assert!(text.contains("N/A"));
    assert!(
        text.contains("All limits that could be read are sufficient."),
        "{text}"
    );
    assert!(!text.contains("To fix:"));
}

#[test]
fn raise_nofile_limit_leaves_soft_equal_to_hard() {
    // Lower the soft limit by one first, so there is something to raise.
    let (_, hard) = nofile_limit().unwrap();
    set_nofile_soft(hard - 1).unwrap();
    assert_eq!(nofile_limit().unwrap(), (hard - 1, hard));
    let (before, after, hard_after) = raise_nofile_limit().unwrap();
    assert_eq!((before, after, hard_after), (hard - 1, hard, hard));
    assert_eq!(nofile_limit().unwrap(), (hard, hard));
    // Raising again is a no-op.
    assert_eq!(raise_nofile_limit().unwrap(), (hard, hard, hard));
}

#[test]
fn fd_warning_only_below_the_need() {
    assert_eq!(fd_limit_warning(1_100_000, 1_000_000), None);
    let warning = fd_limit_warning(20_000, 1_000_000).unwrap();
    assert!(
        warning.contains("20000") && warning.contains("1100000"),
        "{warning}"
    );
    assert!(warning.contains("gateway doctor"), "{warning}");
}
