//! The most QoS 1 messages per second this machine can move to individual devices over
//! loopback TCP, with no gateway at all: the ceiling any push gateway meets here.
//!
//! Two processes, as the gateway and the load generator share the box in `loadgen push`
//! (each holds one end of each connection, so 10,000 devices, the push benchmark's
//! count, fit under a 20,000 open-files cap): the "server" writes one PUBLISH frame per
//! message to a different device socket each time (one `write` per message, as a
//! gateway must when consecutive pushes go to different devices) and reads the PUBACKs;
//! the "devices" read whatever arrived on a socket and answer with one `write` of all
//! its PUBACKs. No HTTP, no JSON, no routing, no histogram: only the system calls and
//! loopback TCP that every real run also pays. The device count matters: spread over
//! more devices, each socket sees messages further apart than TCP's delayed-ACK timer,
//! so more messages cost a pure ACK segment besides the PUBLISH and the PUBACK.
//! Each device has at most `WINDOW` messages unacknowledged, like a client's in-flight
//! window. With `FLOOR_QOS=0` the devices send nothing back and the count is of messages
//! the devices read (the server writes whenever the socket takes it).
//!
//! ```sh
//! cargo bench --bench loopback_floor            # QoS 1, 10,000 devices, 5 s
//! FLOOR_QOS=0 FLOOR_DEVICES=2000 FLOOR_SECS=10 cargo bench --bench loopback_floor
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// Unacknowledged messages per device.
const WINDOW: u32 = 32;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A QoS 1 PUBLISH of about the size `loadgen push` sends (topic `devices/d-NNNNN/cmd`,
/// a 48-byte payload).
fn publish_frame(device: usize, qos: u8, pkid: u16) -> Vec<u8> {
    let topic = format!("devices/d-{device:05}/cmd");
    let payload = [b'x'; 48];
    let id_len = if qos > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + id_len + payload.len();
    let mut f = vec![0x30 | (qos << 1), remaining as u8];
    f.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    f.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        f.extend_from_slice(&pkid.to_be_bytes());
    }
    f.extend_from_slice(&payload);
    f
}

/// `n` device sockets connected to `addr`, non-blocking, spread over source addresses
/// like loadgen's so ports never run out.
fn connect_devices(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let src = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 200) as u8);
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.bind(&SocketAddr::new(src.into(), 0).into())
                .expect("bind");
            s.connect(&addr.into()).expect("connect");
            s.set_nodelay(true).unwrap();
            let device: std::net::TcpStream = s.into();
            device.set_nonblocking(true).unwrap();
            TcpStream::from_std(device)
        })
        .collect()
}

/// The server's ends of `n` connections accepted on `listener`, non-blocking.
fn accept_servers(listener: &TcpListener, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let (server, _) = listener.accept().expect("accept");
            server.set_nodelay(true).unwrap();
            server.set_nonblocking(true).unwrap();
            TcpStream::from_std(server)
        })
        .collect()
}

/// MQTT frames in `buf[..len]` (all of them fixed 1-byte remaining lengths here).
fn count_frames(buf: &[u8]) -> (u32, usize) {
    let (mut n, mut at) = (0, 0);
    while at + 2 <= buf.len() && at + 2 + buf[at + 1] as usize <= buf.len() {
        at += 2 + buf[at + 1] as usize;
        n += 1;
    }
    (n, at)
}

fn main() {
    let devices = env("FLOOR_DEVICES", 10_000) as usize;
    let secs = env("FLOOR_SECS", 5);
    let qos = env("FLOOR_QOS", 1).min(1) as u8;
    println!("loopback floor: QoS {qos}, {devices} devices, {secs} s, window {WINDOW}");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let counted = SharedCounter::new();
    // Forked while this process has one thread: the child only connects and serves.
    // SAFETY: no other thread exists yet, so the child starts from a consistent state.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        // SAFETY: asks the kernel to end this process when its parent ends.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        drop(listener);
        run_devices(connect_devices(addr, devices), qos, counted.get());
        std::process::exit(0);
    }
    let servers = accept_servers(&listener, devices);
    let stop = Arc::new(AtomicBool::new(false));
    let server_thread = {
        let stop = stop.clone();
        std::thread::spawn(move || run_server(servers, qos, counted.get(), &stop))
    };

    // Warm up for a second, then measure.
    std::thread::sleep(Duration::from_secs(1));
    let acked = counted.get();
    let cpu0 = cpu_seconds() + child_cpu_seconds(child);
    let (t0, a0) = (Instant::now(), acked.load(Ordering::Relaxed));
    let what = if qos == 0 { "received" } else { "acked" };
    for s in 1..=secs {
        std::thread::sleep(Duration::from_secs(1));
        let rate = (acked.load(Ordering::Relaxed) - a0) as f64 / t0.elapsed().as_secs_f64();
        eprintln!("  {s}/{secs} s: {rate:.0} {what} messages/s so far");
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let total = acked.load(Ordering::Relaxed) - a0;
    let cpu = cpu_seconds() + child_cpu_seconds(child) - cpu0;
    stop.store(true, Ordering::Relaxed);
    server_thread.join().unwrap();
    // SAFETY: ends and reaps the child this process forked.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    let rate = total as f64 / elapsed;
    println!(
        "{{\"qos\": {qos}, \"devices\": {devices}, \"secs\": {elapsed:.2}, \"{what}\": {total}, \"messages_per_sec\": {rate:.0}, \"cpu_seconds\": {cpu:.2}, \"cpu_us_per_message\": {:.2}}}",
        cpu * 1e6 / total.max(1) as f64
    );
    println!();
    println!("| QoS | devices | {what} messages/s | CPU µs per message (both processes) |");
    println!("|---|---|---|---|");
    println!(
        "| {qos} | {devices} | {rate:.0} | {:.2} |",
        cpu * 1e6 / total.max(1) as f64
    );
}

/// A counter both processes see: a shared anonymous mapping made before the fork.
#[derive(Clone, Copy)]
struct SharedCounter(*const AtomicU64);

// SAFETY: the mapping lives as long as the process and holds one atomic.
unsafe impl Send for SharedCounter {}

impl SharedCounter {
    fn new() -> SharedCounter {
        // SAFETY: a fresh shared anonymous mapping of one page, zero-filled, never unmapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap failed");
        SharedCounter(p as *const AtomicU64)
    }

    fn get(self) -> &'static AtomicU64 {
        // SAFETY: zeroed memory is a valid AtomicU64, and the mapping is never unmapped.
        unsafe { &*self.0 }
    }
}

/// The devices: read whatever arrived on a socket and answer with one `write` of all its
/// PUBACKs (at QoS 0, only count what was read). Returns when the server goes away.
fn run_devices(mut socks: Vec<TcpStream>, qos: u8, received: &AtomicU64) {
    let poll = register(&mut socks);
    let mut poll = poll;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let mut acks = Vec::new();
    loop {
        poll.poll(&mut events, Some(Duration::from_millis(10)))
            .unwrap();
        for e in events.iter() {
            let i = e.token().0;
            loop {
                let n = match socks[i].read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => return,
                };
                let p = &mut partial[i];
                p.extend_from_slice(&buf[..n]);
                let (frames, used) = count_frames(p);
                p.drain(..used);
                if qos == 0 {
                    received.fetch_add(u64::from(frames), Ordering::Relaxed);
                    continue;
                }
                acks.clear();
                for _ in 0..frames {
                    acks.extend_from_slice(&[0x40, 0x02, 0x00, 0x01]);
                }
                if !acks.is_empty() && socks[i].write_all(&acks).is_err() {
                    return;
                }
            }
        }
    }
}

/// The server: bursts of one PUBLISH `write` per message, each to the next device with
/// room in its window, then whatever PUBACKs arrived (counted in `acked` at QoS 1).
fn run_server(mut socks: Vec<TcpStream>, qos: u8, acked: &AtomicU64, stop: &AtomicBool) {
    let mut poll = register(&mut socks);
    let frames: Vec<Vec<u8>> = (0..socks.len()).map(|d| publish_frame(d, qos, 1)).collect();
    let mut in_flight = vec![0u32; socks.len()];
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            let d = next;
            next = (next + 1) % socks.len();
            if qos > 0 && in_flight[d] >= WINDOW {
                continue;
            }
            match socks[d].write(&frames[d]) {
                Ok(_) => in_flight[d] += u32::from(qos),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("server write: {e}"),
            }
        }
        poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
        for e in events.iter() {
            let d = e.token().0;
            loop {
                match socks[d].read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let n = (n / 4) as u32;
                        in_flight[d] = in_flight[d].saturating_sub(n);
                        acked.fetch_add(u64::from(n), Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("server read: {e}"),
                }
            }
        }
    }
}

/// A poll with every socket registered for reads, token = index.
fn register(socks: &mut [TcpStream]) -> Poll {
    let poll = Poll::new().unwrap();
    for (i, s) in socks.iter_mut().enumerate() {
        poll.registry()
            .register(s, Token(i), Interest::READABLE)
            .unwrap();
    }
    poll
}

/// User + system CPU seconds of process `pid` so far (`/proc/PID/stat`).
fn child_cpu_seconds(pid: libc::pid_t) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name's closing parenthesis; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let r = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(r.ru_utime) + tv(r.ru_stime)
}
