//! The most QoS 1 messages per second this machine can move to individual devices over
//! loopback TCP, with no gateway at all: the ceiling any push gateway meets here.
//!
//! Two threads, as the gateway and the load generator share the box in `loadgen push`:
//! the "server" writes one PUBLISH frame per message to a different device socket each
//! time (one `write` per message, as a gateway must when consecutive pushes go to
//! different devices) and reads the PUBACKs; the "devices" read whatever arrived on a
//! socket and answer with one `write` of all its PUBACKs. No HTTP, no JSON, no routing,
//! no histogram: only the system calls and loopback TCP that every real run also pays.
//! Each device has at most `WINDOW` messages unacknowledged, like a client's in-flight
//! window. With `FLOOR_QOS=0` the devices send nothing back and the count is of messages
//! the devices read (the server writes whenever the socket takes it).
//!
//! ```sh
//! cargo bench --bench loopback_floor            # QoS 1, 5,000 devices, 5 s
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

/// `n` connected socket pairs on loopback: (server side, device side), non-blocking.
fn pairs(n: usize) -> Vec<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().unwrap();
    (0..n)
        .map(|i| {
            // Spread over source addresses like loadgen, so ports never run out.
            let src = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 200) as u8);
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.bind(&SocketAddr::new(src.into(), 0).into())
                .expect("bind");
            s.connect(&addr.into()).expect("connect");
            s.set_nodelay(true).unwrap();
            let device: std::net::TcpStream = s.into();
            let (server, _) = listener.accept().expect("accept");
            server.set_nodelay(true).unwrap();
            server.set_nonblocking(true).unwrap();
            device.set_nonblocking(true).unwrap();
            (TcpStream::from_std(server), TcpStream::from_std(device))
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
    let devices = env("FLOOR_DEVICES", 5000) as usize;
    let secs = env("FLOOR_SECS", 5);
    let qos = env("FLOOR_QOS", 1).min(1) as u8;
    println!("loopback floor: QoS {qos}, {devices} devices, {secs} s, window {WINDOW}");
    let (servers, device_socks): (Vec<_>, Vec<_>) = pairs(devices).into_iter().unzip();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));

    let device_thread = {
        let stop = stop.clone();
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut socks = device_socks;
            let mut poll = Poll::new().unwrap();
            for (i, s) in socks.iter_mut().enumerate() {
                poll.registry()
                    .register(s, Token(i), Interest::READABLE)
                    .unwrap();
            }
            let mut events = Events::with_capacity(1024);
            let mut buf = vec![0u8; 64 * 1024];
            let mut partial: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
            let mut acks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                poll.poll(&mut events, Some(Duration::from_millis(10)))
                    .unwrap();
                for e in events.iter() {
                    let i = e.token().0;
                    loop {
                        let n = match socks[i].read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) => panic!("device read: {e}"),
                        };
                        let p = &mut partial[i];
                        p.extend_from_slice(&buf[..n]);
                        let (frames, used) = count_frames(p);
                        p.drain(..used);
                        if qos == 0 {
                            acked.fetch_add(u64::from(frames), Ordering::Relaxed);
                            continue;
                        }
                        acks.clear();
                        for _ in 0..frames {
                            acks.extend_from_slice(&[0x40, 0x02, 0x00, 0x01]);
                        }
                        if !acks.is_empty() {
                            socks[i].write_all(&acks).expect("device write");
                        }
                    }
                }
            }
        })
    };

    let server_thread = {
        let stop = stop.clone();
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut socks = servers;
            let mut poll = Poll::new().unwrap();
            for (i, s) in socks.iter_mut().enumerate() {
                poll.registry()
                    .register(s, Token(i), Interest::READABLE)
                    .unwrap();
            }
            let frames: Vec<Vec<u8>> = (0..socks.len()).map(|d| publish_frame(d, qos, 1)).collect();
            let mut in_flight = vec![0u32; socks.len()];
            let mut events = Events::with_capacity(1024);
            let mut buf = vec![0u8; 64 * 1024];
            let mut next = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // A burst of sends, one write per message, each to the next device.
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
        })
    };

    // Warm up for a second, then measure.
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = cpu_seconds();
    let (t0, a0) = (Instant::now(), acked.load(Ordering::Relaxed));
    let what = if qos == 0 { "received" } else { "acked" };
    for s in 1..=secs {
        std::thread::sleep(Duration::from_secs(1));
        let rate = (acked.load(Ordering::Relaxed) - a0) as f64 / t0.elapsed().as_secs_f64();
        eprintln!("  {s}/{secs} s: {rate:.0} {what} messages/s so far");
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let total = acked.load(Ordering::Relaxed) - a0;
    let cpu = cpu_seconds() - cpu0;
    stop.store(true, Ordering::Relaxed);
    server_thread.join().unwrap();
    device_thread.join().unwrap();
    let rate = total as f64 / elapsed;
    println!(
        "{{\"qos\": {qos}, \"devices\": {devices}, \"secs\": {elapsed:.2}, \"{what}\": {total}, \"messages_per_sec\": {rate:.0}, \"cpu_seconds\": {cpu:.2}, \"cpu_us_per_message\": {:.2}}}",
        cpu * 1e6 / total.max(1) as f64
    );
    println!();
    println!("| QoS | devices | {what} messages/s | CPU µs per message (both threads) |");
    println!("|---|---|---|---|");
    println!(
        "| {qos} | {devices} | {rate:.0} | {:.2} |",
        cpu * 1e6 / total.max(1) as f64
    );
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
