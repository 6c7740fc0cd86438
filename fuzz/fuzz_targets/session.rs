//! Fuzzes the session state machine through the real server: the gateway is started once,
//! in this process, on loopback, and every input is written to a fresh TCP connection.
//!
//! Each input is a script: the first byte picks a prologue (none, a valid MQTT 3.1.1
//! CONNECT, or a valid MQTT 5 CONNECT, so the fuzzer reaches the packets after CONNECT
//! without having to find one first), the rest is sent as is, in chunks cut at 0xFE
//! bytes so frames also arrive split across reads. The client then half-closes and reads
//! until the server closes, so each input runs to its end.
//!
//! After every input two honest clients, one homed on each shard, must still get their
//! own PUBLISH back. A panic on a shard thread aborts the process (libFuzzer's panic
//! hook), a shard that stops serving fails the honest round trip; both are crashes.

#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use gateway::config::Config;
use gateway::mailbox::home_shard;
use gateway::server::Server;
use libfuzzer_sys::fuzz_target;

const SHARDS: usize = 2;
/// Generous: a stalled shard is what is being detected, not a slow one.
const HONEST_TIMEOUT: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
[mqtt]
listen = "127.0.0.1:0"
# A fuzz input must not take over an honest client's id.
duplicate_client_id = "reject"
connect_timeout_secs = 2
max_packet_size = 65536
max_session_expiry_secs = 2
max_queued_messages = 16
[http]
listen = "127.0.0.1:0"
[shards]
count = 2
[log]
level = "off"
"#;

struct Gateway {
    _server: Server,
    addr: SocketAddr,
    honest: Vec<Honest>,
}

static GATEWAY: OnceLock<Mutex<Gateway>> = OnceLock::new();

fn gateway() -> &'static Mutex<Gateway> {
    GATEWAY.get_or_init(|| {
        let config = Config::from_toml_str(CONFIG).expect("fuzz config");
        let server = Server::start(config, None).expect("gateway starts");
        let addr = server.mqtt_addr;
        let honest = (0..SHARDS).map(|s| Honest::connect(addr, s)).collect();
        Mutex::new(Gateway {
            _server: server,
            addr,
            honest,
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut gw = gateway().lock().unwrap_or_else(|e| e.into_inner());
    let Some((&prologue, script)) = data.split_first() else {
        return;
    };
    if let Ok(mut s) = TcpStream::connect(gw.addr) {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut ok = match prologue % 3 {
            1 => s.write_all(&connect_v311("fuzz-v4")).is_ok(),
            2 => s.write_all(&connect_v5("fuzz-v5")).is_ok(),
            _ => true,
        };
        for chunk in script.split(|&b| b == 0xFE) {
            if !ok {
                break;
            }
            ok = s.write_all(chunk).is_ok();
        }
        let _ = s.shutdown(Shutdown::Write);
        // Drain until the server closes (it must: EOF is a close, a bad packet is a close).
        let mut sink = [0u8; 4096];
        loop {
            match s.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    panic!("the server kept a half-closed fuzz connection open for 30 s")
                }
                Err(_) => break,
            }
        }
    }
    let n = gw.honest.len();
    for i in 0..n {
        gw.honest[i].round_trip();
    }
});

/// A well-behaved MQTT 3.1.1 client subscribed to its own topic.
struct Honest {
    stream: TcpStream,
    topic: String,
    seq: u64,
    buf: Vec<u8>,
}

impl Honest {
    fn connect(addr: SocketAddr, shard: usize) -> Honest {
        let id = (0..)
            .map(|i| format!("honest-{shard}-{i}"))
            .find(|id| home_shard(id, SHARDS) == shard)
            .expect("an id for every shard");
        let mut stream = TcpStream::connect(addr).expect("honest client connects");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(HONEST_TIMEOUT)).unwrap();
        // Keep-alive 0 is capped at max_keepalive_secs (180 s); round trips keep it fresh.
        stream.write_all(&connect_v311(&id)).unwrap();
        let topic = format!("honest/{id}");
        let mut h = Honest {
            stream,
            topic,
            seq: 0,
            buf: Vec::new(),
        };
        let connack = h.packet();
        assert_eq!(connack, [0x20, 2, 0, 0], "honest CONNACK");
        let mut sub = vec![0x82];
        let body_len = 2 + 2 + h.topic.len() + 1;
        sub.push(body_len as u8);
        sub.extend_from_slice(&[0, 1]);
        sub.extend_from_slice(&(h.topic.len() as u16).to_be_bytes());
        sub.extend_from_slice(h.topic.as_bytes());
        sub.push(0);
        h.stream.write_all(&sub).unwrap();
        assert_eq!(h.packet(), [0x90, 3, 0, 1, 0], "honest SUBACK");
        h
    }

    /// Publishes to its own topic and waits for the message to come back.
    fn round_trip(&mut self) {
        self.seq += 1;
        let payload = self.seq.to_be_bytes();
        let mut p = vec![0x30, (2 + self.topic.len() + payload.len()) as u8];
        p.extend_from_slice(&(self.topic.len() as u16).to_be_bytes());
        p.extend_from_slice(self.topic.as_bytes());
        p.extend_from_slice(&payload);
        self.stream
            .write_all(&p)
            .expect("honest client can still write");
        // Fuzz inputs may publish to this topic too (or leave wills there): skip theirs.
        while self.packet() != p {}
    }

    /// Reads one whole packet.
    fn packet(&mut self) -> Vec<u8> {
        loop {
            if let Ok(Some(len)) = gateway::codec::frame_len(&self.buf, usize::MAX) {
                if self.buf.len() >= len {
                    return self.buf.drain(..len).collect();
                }
            }
            let mut tmp = [0u8; 1024];
            match self.stream.read(&mut tmp) {
                Ok(0) => panic!("the gateway closed an honest client"),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) => panic!("honest client not served: {e}"),
            }
        }
    }
}

fn connect_v311(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut f = vec![0x10, body.len() as u8];
    f.extend_from_slice(&body);
    f
}

fn connect_v5(id: &str) -> Vec<u8> {
    // Session Expiry 1 s, so the sessions fuzz inputs leave behind go away.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30];
    body.extend_from_slice(&[5, 0x11, 0, 0, 0, 1]);
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut f = vec![0x10, body.len() as u8];
    f.extend_from_slice(&body);
    f
}
