//! The process around the gateway, tested on the real binary: graceful shutdown on SIGTERM
//! and SIGINT (MQTT 5 clients told 0x8B, everyone closed, exit 0 within the drain
//! timeout), config errors that exit 2 naming the key, `check-config`, `doctor`, and the
//! RLIMIT_NOFILE raise at startup.

mod common;

use std::ffi::OsStr;
use std::time::Duration;

use common::{connect5, run_gateway, tempdir, GatewayProcess, Raw};

const T: Duration = Duration::from_secs(5);
/// `drain_timeout_secs` of the shutdown tests, and the margin the exit may take beyond it
/// (runtime teardown and the logger flush, on a loaded machine).
const DRAIN_SECS: u64 = 3;
const EXIT_MARGIN: Duration = Duration::from_secs(10);

/// A v5 and a v4 client connected, then `signal`: the v5 client is told DISCONNECT 0x8B,
/// both sockets are closed, and the process exits 0 within the drain timeout.
async fn graceful_shutdown_on(signal: i32) {
    let mut gw = GatewayProcess::start(&format!("[shards]\ndrain_timeout_secs = {DRAIN_SECS}"));
    let (mut v5, _) = Raw::connected_v5(gw.mqtt, &connect5("bye-v5", 60, true, None)).await;
    let mut v4 = Raw::connect(gw.mqtt).await;
    v4.send(&Raw::connect_v4("bye-v4", 60, true)).await;
    assert!(matches!(
        v4.next_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    assert_eq!(gw.metric("gateway_connections").await, 2.0);

    gw.signal(signal);
    assert_eq!(
        v5.expect_disconnect_v5(T).await,
        0x8B,
        "MQTT 5 client told: server shutting down"
    );
    assert!(v5.wait_closed(T).await, "v5 socket closed after 0x8B");
    assert!(v4.wait_closed(T).await, "v4 socket closed");

    let status = tokio::task::spawn_blocking(move || {
        gw.wait_exit(Duration::from_secs(DRAIN_SECS) + EXIT_MARGIN)
    })
    .await
    .unwrap()
    .expect("gateway exits within drain_timeout_secs + margin");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[tokio::test]
async fn sigterm_tells_v5_clients_0x8b_closes_everyone_and_exits_0() {
    graceful_shutdown_on(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_shuts_down_the_same_way() {
    graceful_shutdown_on(libc::SIGINT).await;
}

/// Writes `text` to a config file in a scratch directory.
fn config_file(dir: &tempdir::Dir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.0.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Invalid files, each with the key the error must name. The listeners that are not under
/// test are on loopback port 0, so a gateway that wrongly started would not clash.
const INVALID: [(&str, &str); 3] = [
    (
        "[mqtt]\nlisen = \"x\"\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        "mqtt.lisen",
    ),
    (
        "[mqtt]\nmax_packet_size = \"big\"\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        "mqtt.max_packet_size",
    ),
    (
        "[mqtt]\nlisten = \"nope\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        "mqtt.listen",
    ),
];

#[test]
fn invalid_config_exits_2_naming_the_key() {
    let dir = tempdir::Dir::new("badcfg");
    for (i, (text, key)) in INVALID.iter().enumerate() {
        let path = config_file(&dir, &format!("bad{i}.toml"), text);
        let (code, _out, err) = run_gateway(&[OsStr::new("--config"), path.as_os_str()], T);
        assert_eq!(code, Some(2), "exit code for {key}; stderr: {err}");
        assert!(
            err.contains(&format!("`{key}`")),
            "stderr names `{key}`: {err}"
        );
    }
}

#[test]
fn check_config_accepts_the_reference_file_and_rejects_bad_ones() {
    let reference = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    let (code, out, err) = run_gateway(&[OsStr::new("check-config"), reference.as_os_str()], T);
    assert_eq!(code, Some(0), "config/gateway.toml is valid; stderr: {err}");
    assert!(out.contains("OK"), "{out}");

    let dir = tempdir::Dir::new("checkcfg");
    for (i, (text, key)) in INVALID.iter().enumerate() {
        let path = config_file(&dir, &format!("bad{i}.toml"), text);
        let (code, _out, err) = run_gateway(&[OsStr::new("check-config"), path.as_os_str()], T);
        assert_eq!(
            code,
            Some(2),
            "check-config exit code for {key}; stderr: {err}"
        );
        assert!(
            err.contains(&format!("`{key}`")),
            "stderr names `{key}`: {err}"
        );
    }
}

#[test]
fn check_config_does_not_start_listeners() {
    // Both addresses of the file are held by this test without SO_REUSEPORT: a gateway that
    // started would fail to bind (exit 1) or keep running (killed: panic). check-config
    // only validates, so it exits 0 at once, and nobody connected to our listeners.
    let mqtt = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    mqtt.set_nonblocking(true).unwrap();
    let dir = tempdir::Dir::new("checklisten");
    let path = config_file(
        &dir,
        "held.toml",
        &format!(
            "[mqtt]\nlisten = \"{}\"\n[http]\nlisten = \"{}\"\n",
            mqtt.local_addr().unwrap(),
            http.local_addr().unwrap()
        ),
    );
    let (code, out, err) = run_gateway(&[OsStr::new("check-config"), path.as_os_str()], T);
    assert_eq!(code, Some(0), "stdout: {out} stderr: {err}");
    assert!(!err.contains("cannot start"), "{err}");
    assert!(
        mqtt.accept().is_err(),
        "nothing connects to the MQTT address"
    );
}

/// The names `gateway doctor` must report (src/doctor/mod.rs), each with a status word.
const DOCTOR_CHECKS: [&str; 11] = [
    "RLIMIT_NOFILE soft",
    "RLIMIT_NOFILE hard",
    "fs.file-max",
    "fs.nr_open",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.ip_local_port_range",
    "net.core.netdev_max_backlog",
];

#[test]
fn doctor_prints_every_check_with_a_status_and_the_fixes() {
    let (code, out, err) = run_gateway(&[OsStr::new("doctor")], Duration::from_secs(20));
    // Exit 1 exactly when something is LOW (tests/operator.rs checks both ways).
    assert_eq!(code, common::doctor_exit_code(&out), "stderr: {err}\n{out}");
    assert!(out.contains("limits for 1000000 connections"), "{out}");
    let mut failing = Vec::new();
    for name in DOCTOR_CHECKS {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("doctor reports {name}:\n{out}"));
        let status = line.split_whitespace().last().unwrap();
        assert!(
            ["OK", "LOW", "HIGH", "N/A"].contains(&status),
            "{name}: status {status:?} in {line:?}"
        );
        if status == "LOW" || status == "HIGH" {
            failing.push(name);
        }
    }
    if failing.is_empty() {
        assert!(
            out.contains("All limits that could be read are sufficient"),
            "{out}"
        );
    } else {
        let fixes = out.split("To fix:").nth(1).unwrap_or_else(|| {
            panic!("{failing:?} are not OK but there is no fix section:\n{out}")
        });
        for name in failing {
            assert!(
                fixes.contains(&format!("  {name}: ")),
                "a fix for {name}:\n{out}"
            );
        }
    }

    // A tiny target: any hard RLIMIT_NOFILE holds 10 connections (+10%), so the verdicts
    // follow --connections.
    let (code, small, _) = run_gateway(
        &[
            OsStr::new("doctor"),
            OsStr::new("--connections"),
            OsStr::new("10"),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, common::doctor_exit_code(&small), "{small}");
    assert!(small.contains("limits for 10 connections"), "{small}");
    let hard = small
        .lines()
        .find(|l| l.starts_with("RLIMIT_NOFILE hard "))
        .unwrap();
    assert!(
        hard.ends_with("OK") || hard.ends_with("N/A"),
        "10 connections fit any hard limit: {hard}"
    );
}

/// (soft, hard) "Max open files" of a process, from /proc/<pid>/limits.
fn max_open_files(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let f: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    (f[0].to_string(), f[1].to_string())
}

#[tokio::test]
async fn startup_raises_the_soft_fd_limit_to_the_hard_limit() {
    let (_, hard) = max_open_files(std::process::id());
    let low: libc::rlim_t = 256;
    // The lowering works: a shell started the same way sees the low soft limit.
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "ulimit -S -n"]);
    common::limit_nofile(&mut sh, low, false);
    let shown = String::from_utf8(sh.output().expect("sh runs").stdout).unwrap();
    let expected = if hard == "unlimited" {
        low.to_string()
    } else {
        low.min(hard.parse().unwrap()).to_string()
    };
    assert_eq!(shown.trim(), expected, "pre_exec lowers the soft limit");

    let gw = GatewayProcess::start_with("", move |cmd| common::limit_nofile(cmd, low, false));
    let (soft_now, hard_now) = max_open_files(gw.pid());
    assert_eq!(hard_now, hard, "the hard limit is inherited unchanged");
    assert_eq!(
        soft_now, hard_now,
        "the gateway (started with soft {expected}) raised its soft RLIMIT_NOFILE to the \
         hard limit"
    );
    // And it serves connections afterwards.
    let (mut c, _) = Raw::connected_v5(gw.mqtt, &connect5("after-raise", 30, true, None)).await;
    assert!(c.ping_v5(T).await);
}
