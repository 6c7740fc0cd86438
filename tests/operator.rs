//! The operator's side against the real binary: a second gateway on a port or store in
//! use is refused with a message naming the address or the process; errors name their
//! subject and exit with the documented codes; the command line takes the config the
//! same way everywhere.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{merge_toml, run_gateway, tempdir, v4, GatewayProcess, BASE};

const T: Duration = Duration::from_secs(20);

/// Writes BASE + `extra` (with `[store] path` in `dir` unless `extra` names one) as
/// `dir/name` and returns its path.
fn write_config(dir: &tempdir::Dir, name: &str, extra: &str) -> PathBuf {
    let path = dir.0.join(name);
    let text = merge_toml(BASE, &common::with_store_dir(extra, &dir.0));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `gateway --config FILE [args]` to completion: (exit code, stdout, stderr).
fn gateway_with(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec![OsStr::new("--config"), config.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    run_gateway(&all, T)
}

/// A device still gets in (the first gateway still serves its port).
async fn still_serves(gw: &GatewayProcess) {
    let c = v4::connect(v4::options(gw.mqtt, "still-here")).await;
    c.task.abort();
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_mqtt_port_exits_naming_the_address() {
    let first = GatewayProcess::start("");
    let dir = tempdir::Dir::new("second-mqtt");
    let config = write_config(
        &dir,
        "second.toml",
        &format!("[mqtt]\nlisten = \"{}\"\n", first.mqtt),
    );
    let (code, _out, err) = gateway_with(&config, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("mqtt.listen") && err.contains(&first.mqtt.to_string()),
        "names the key and the address: {err}"
    );
    assert!(err.contains("already in use"), "{err}");
    still_serves(&first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_bind_error_names_the_address() {
    let first = GatewayProcess::start("");
    let dir = tempdir::Dir::new("second-http");
    let config = write_config(
        &dir,
        "second.toml",
        &format!("[http]\nlisten = \"{}\"\n", first.http),
    );
    let (code, _out, err) = gateway_with(&config, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("http.listen") && err.contains(&first.http.to_string()),
        "names the key and the address: {err}"
    );
    still_serves(&first).await;
}

/// The PID-naming, never-move-it message of a store some process holds.
fn assert_in_use_message(err: &str, pid: u32) {
    assert!(err.contains("in use"), "{err}");
    assert!(
        err.contains(&format!("PID {pid}")),
        "names the holder: {err}"
    );
    assert!(
        !err.contains("mv "),
        "never suggests moving a live store: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_repair_and_a_second_gateway_on_a_held_store_name_the_holder() {
    let dir = tempdir::Dir::new("held-store");
    let store = format!("[store]\npath = {}\n", toml_str(&dir.0.join("data")));
    let first = GatewayProcess::start(&store);
    let config = write_config(&dir, "gateway.toml", &store);

    let (code, _out, err) = gateway_with(&config, &["store-repair"]);
    assert_eq!(code, Some(3), "store-repair on a held store: {err}");
    assert_in_use_message(&err, first.pid());

    let (code, _out, err) = gateway_with(&config, &[]);
    assert_eq!(code, Some(3), "a second gateway on a held store: {err}");
    assert_in_use_message(&err, first.pid());
    still_serves(&first).await;
}

/// A password file that does not exist: `run` refuses it like `check-config` (exit 2, the
/// same message) and creates nothing on disk first (not the store directory).
#[test]
fn a_bad_password_file_exits_2_from_run_as_from_check_config_and_creates_no_store() {
    let dir = tempdir::Dir::new("bad-passwd");
    let store = dir.0.join("never-created");
    let config = write_config(
        &dir,
        "gateway.toml",
        &format!(
            "[auth]\nproviders = [\"password_file\"]\n[auth.password_file]\npath = {}\n\
             [store]\npath = {}\n",
            toml_str(&dir.0.join("missing.passwd")),
            toml_str(&store)
        ),
    );
    let (code, _out, checked) = gateway_with(&config, &["check-config"]);
    assert_eq!(code, Some(2), "{checked}");
    let message = checked.trim();
    assert!(message.contains("missing.passwd"), "{message}");

    let (code, _out, err) = gateway_with(&config, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(message),
        "the same message as check-config: {err}"
    );
    assert!(
        !store.exists(),
        "the store directory was created before the check"
    );
}

#[test]
fn check_config_takes_the_file_as_argument_or_with_config() {
    let dir = tempdir::Dir::new("check-config");
    let config = write_config(&dir, "gateway.toml", "");
    let (code, out, err) = gateway_with(&config, &["check-config"]);
    assert_eq!(code, Some(0), "--config FILE check-config: {err}");
    assert!(out.contains(": OK"), "{out}");
    let (code, _out, err) = run_gateway(&[OsStr::new("check-config"), config.as_os_str()], T);
    assert_eq!(code, Some(0), "check-config FILE: {err}");
    let (code, _out, err) = run_gateway(
        &[
            OsStr::new("store-repair"),
            OsStr::new("--config"),
            config.as_os_str(),
        ],
        T,
    );
    // No store file yet: not repairable (1), but the config was taken.
    assert_eq!(code, Some(1), "store-repair --config FILE: {err}");
    assert!(err.contains("no such file"), "{err}");
}

#[test]
fn usage_errors_exit_64_not_the_invalid_config_code() {
    for args in [
        vec!["--no-such-flag"],
        vec!["no-such-command"],
        vec!["check-config"],
        vec!["passwd"],
    ] {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let (code, _out, err) = run_gateway(&args, T);
        assert_eq!(code, Some(64), "{args:?}: {err}");
    }
    let (code, out, _) = run_gateway(&[OsStr::new("--help")], T);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn doctor_exits_1_when_an_item_is_low() {
    // Nothing is sized for a trillion connections.
    let (code, out, _) = run_gateway(
        &[
            OsStr::new("doctor"),
            OsStr::new("--connections"),
            OsStr::new("1000000000000"),
        ],
        T,
    );
    assert!(out.contains("LOW"), "{out}");
    assert_eq!(code, Some(1), "{out}");
    // And 0 exactly when nothing is LOW.
    let (code, out, _) = run_gateway(
        &[
            OsStr::new("doctor"),
            OsStr::new("--connections"),
            OsStr::new("1"),
        ],
        T,
    );
    assert_eq!(code, common::doctor_exit_code(&out), "{out}");
}

/// Runs `gateway ARGS` on a pseudo-terminal (through `script`), typing each answer once
/// the output shows its prompt; returns the exit code and everything the terminal showed.
fn on_a_terminal(args: &str, dialogue: &[(&str, &str)]) -> (Option<i32>, String) {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let command = format!("{} {args}", env!("CARGO_BIN_EXE_gateway"));
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn script");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut shown = String::new();
    let mut stdin = child.stdin.take().unwrap();
    let deadline = std::time::Instant::now() + T;
    for (prompt, answer) in dialogue {
        while !shown.contains(prompt) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(bytes) => shown.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("no prompt {prompt:?} on the terminal; it showed {shown:?}");
                }
            }
        }
        shown = shown.replacen(prompt, "<asked>", 1);
        writeln!(stdin, "{answer}").unwrap();
    }
    let status = child.wait().expect("script exits");
    while let Ok(bytes) = rx.recv_timeout(Duration::from_millis(200)) {
        shown.push_str(&String::from_utf8_lossy(&bytes));
    }
    (status.code(), shown)
}

#[test]
fn passwd_on_a_terminal_asks_twice_without_echo() {
    if !common::have_binary("script", "bsdutils") {
        return;
    }
    let dir = tempdir::Dir::new("passwd-tty");
    let file = dir.0.join("users");
    let args = format!("passwd {} alice", file.display());
    let (code, shown) = on_a_terminal(
        &args,
        &[
            ("Password: ", "s3cret-tty"),
            ("Reenter password: ", "s3cret-tty"),
        ],
    );
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        !shown.contains("s3cret-tty"),
        "the password was echoed: {shown}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("alice:$argon2id$"), "{text}");

    // Two different entries: refused, the file unchanged.
    let args = format!("passwd {} bob", file.display());
    let (code, shown) = on_a_terminal(
        &args,
        &[("Password: ", "one"), ("Reenter password: ", "two")],
    );
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("do not match"), "{shown}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
}

#[test]
fn passwd_from_a_pipe_reads_the_first_line_without_a_prompt() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempdir::Dir::new("passwd-pipe");
    let file = dir.0.join("users");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("passwd")
        .arg(&file)
        .arg("carol")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "from-a-script").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("Password"), "prompted a script: {err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("carol:$argon2id$"), "{text}");
}

/// Closes `stream` with a reset (SO_LINGER 0), as a health checker often does.
fn reset(stream: std::net::TcpStream) {
    let s = socket2::Socket::from(stream);
    s.set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
}

const PROBE: &str = "gateway_disconnects_total{reason=\"probe\"}";
const SOCKET_ERROR: &str = "gateway_disconnects_total{reason=\"socket_error\"}";
const CLOSE_WAIT: &str = "gateway_disconnects_total{reason=\"close_wait\"}";

/// Load-balancer health checks (a TCP connect then a close or a reset; a PROXY v2 LOCAL
/// header then a reset) are counted as `probe`, not as network errors; a device that
/// resets after its CONNECT still counts as `socket_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_counted_as_probes_not_socket_errors() {
    use std::io::Write;
    let gw = common::TestServer::start("[mqtt]\nproxy_protocol = true\n");
    let wait = Duration::from_secs(10);

    // Connect, then FIN; connect, then RST.
    drop(std::net::TcpStream::connect(gw.mqtt).unwrap());
    reset(std::net::TcpStream::connect(gw.mqtt).unwrap());
    // PROXY v2 LOCAL (a balancer's own check), then RST.
    let mut s = std::net::TcpStream::connect(gw.mqtt).unwrap();
    s.write_all(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00")
        .unwrap();
    reset(s);
    assert_eq!(gw.wait_metric(PROBE, wait, |v| v >= 3.0).await, 3.0);
    assert_eq!(gw.metric(SOCKET_ERROR).await, 0.0);
    assert_eq!(gw.metric(CLOSE_WAIT).await, 0.0);

    // A device that sent CONNECT and then resets is a real network error.
    let mut s = std::net::TcpStream::connect(gw.mqtt).unwrap();
    s.write_all(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00")
        .unwrap();
    s.write_all(&common::Raw::connect_v4("resets", 60, true))
        .unwrap();
    let mut ack = [0u8; 4];
    std::io::Read::read_exact(&mut s, &mut ack).unwrap();
    assert_eq!(ack[0], 0x20, "CONNACK");
    reset(s);
    assert_eq!(gw.wait_metric(SOCKET_ERROR, wait, |v| v >= 1.0).await, 1.0);
    assert_eq!(gw.metric(PROBE).await, 3.0);
}

/// Connects a v3.1.1 device by raw TCP: the stream, and whether CONNACK came in `wait`.
async fn device_connects(
    addr: std::net::SocketAddr,
    id: &str,
    wait: Duration,
) -> (common::Raw, bool) {
    let mut raw = common::Raw::connect(addr).await;
    raw.send(&common::Raw::connect_v4(id, 600, true)).await;
    let acked = matches!(
        raw.recv_v4(wait).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    );
    (raw, acked)
}

/// How many of `gw`'s open fds have a number below `limit`.
fn fds_below(gw: &GatewayProcess, limit: usize) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .filter(|&fd| fd < limit)
        .count()
}

/// Out of file descriptors, accept() fails and the device stays in the kernel backlog.
/// The listener is edge-triggered, so once fds are free again the shard must retry on
/// its own: the waiting device gets in without another SYN arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_waiting_while_fds_ran_out_gets_in_once_some_are_free() {
    const LIMIT: usize = 48;
    let gw = GatewayProcess::start_with("[tcp]\naccept_retry_ms = 50\n", |cmd| {
        common::limit_nofile(cmd, LIMIT as libc::rlim_t, true)
    });
    let mut devices = Vec::new();
    // Full when every fd number below the limit is taken (fds inherited above it, such as
    // cargo's jobserver pipe, do not count).
    while fds_below(&gw, LIMIT) < LIMIT {
        let id = format!("fill-{}", devices.len());
        let (raw, acked) = device_connects(gw.mqtt, &id, T).await;
        assert!(acked, "{id} got no CONNACK with {} fds open", gw.open_fds());
        devices.push(raw);
        assert!(
            devices.len() < LIMIT,
            "the fds never ran out: {:?}",
            gw.fd_targets()
        );
    }
    // Full: the next device waits in the backlog (its accept failed with EMFILE).
    let (mut waiting, acked) =
        device_connects(gw.mqtt, "waiting", Duration::from_millis(500)).await;
    assert!(
        !acked,
        "served although every fd was in use: {} devices, {} fds: {:?}",
        devices.len(),
        gw.open_fds(),
        gw.fd_targets()
    );

    // Two devices leave (one fd for the waiting device, one for the metrics scrape).
    devices.truncate(devices.len() - 2);
    let got_in = matches!(
        waiting.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    );
    assert!(got_in, "the waiting device was stranded in the backlog");
    let paused = "gateway_accept_paused_total{reason=\"fd_exhausted\"}";
    assert!(gw.metric(paused).await >= 1.0);
}

/// A raw v3.1.1 device that sends nothing after its CONNECT (a receive-only device).
async fn silent_v4(addr: std::net::SocketAddr, id: &str, keep_alive: u16) -> common::Raw {
    let mut raw = common::Raw::connect(addr).await;
    raw.send(&common::Raw::connect_v4(id, keep_alive, true))
        .await;
    assert!(
        matches!(raw.recv_v4(T).await, Ok(mqttbytes::v4::Packet::ConnAck(_))),
        "{id}: no CONNACK"
    );
    raw
}

/// Keep-alive 0 with `keepalive_zero = "max"` (the default): the cap applies, and a
/// silent 3.1.1 device is closed like one that asked for the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_max_closes_a_silent_311_device_at_the_cap() {
    let gw = common::TestServer::start("[mqtt]\nmax_keepalive_secs = 1\n");
    let mut zero = silent_v4(gw.mqtt, "ka-zero", 0).await;
    assert!(zero.closed_within(T).await, "keep-alive 0 got no deadline");
}

/// With `keepalive_zero = "off"` a 3.1.1 device asking for 0 has no keep-alive deadline
/// (MQTT 3.1.1 §3.1.2.10): it outlives a device that asked for the cap, connected at
/// the same time, by well more than the deadline, and is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_off_keeps_a_silent_311_device() {
    let gw =
        common::TestServer::start("[mqtt]\nmax_keepalive_secs = 1\nkeepalive_zero = \"off\"\n");
    let mut zero = silent_v4(gw.mqtt, "ka-zero", 0).await;
    let mut capped = silent_v4(gw.mqtt, "ka-one", 1).await;
    assert!(
        capped.closed_within(T).await,
        "the keep-alive 1 device was not reaped"
    );
    // Two more keep-alive periods than the capped device had.
    assert!(
        !zero.closed_within(Duration::from_secs(2)).await,
        "keep-alive 0 was closed although keepalive_zero = \"off\""
    );
    zero.send(&[0xC0, 0x00]).await; // PINGREQ
    assert!(
        matches!(zero.recv_v4(T).await, Ok(mqttbytes::v4::Packet::PingResp)),
        "no PINGRESP"
    );
}

/// A relative `[store] path` depends on the working directory: the start logs the
/// absolute path it resolved to (here before the open fails on a file in its way).
#[test]
fn the_start_logs_the_absolute_store_path() {
    let dir = tempdir::Dir::new("store-path");
    std::fs::write(dir.0.join("in-the-way"), "not a directory").unwrap();
    let config = dir.0.join("gateway.toml");
    let text = merge_toml(
        BASE,
        "[log]\nlevel = \"info\"\n[store]\npath = \"in-the-way\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&config)
        .current_dir(&dir.0)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let absolute = dir.0.join("in-the-way").display().to_string();
    assert!(
        stdout.contains(&format!("path={absolute}")),
        "no absolute store path in: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{absolute}/gateway.redb")),
        "the error names the absolute file: {stderr}"
    );
}
