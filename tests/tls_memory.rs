//! What an idle TLS connection keeps on the heap: a rustls `ServerConnection` set up as
//! the gateway sets one up (ring, TLS 1.3, stateless tickets, the 16 KiB send limit),
//! driven in memory against a rustls client through the handshake and one MQTT
//! exchange (CONNECT in, CONNACK out), then left idle with every byte drained both ways.
//! A counting allocator (this thread's allocations only) says how many bytes it holds
//! at each step, and how many of them are the receive (deframer) buffer that the
//! buffered API keeps at its 4 KiB read size once the connection has been read.
//!
//! Since TLS 1.3 connections leave rustls once their CONNECT is answered (the shard's own
//! record layer, `tests/tls_idle.rs`), this is what a TLS 1.2 connection, or one in its
//! handshake, holds.
//!
//! The test pins the figures as a bound, so a rustls upgrade or a change in how the
//! shard drives rustls that makes idle TLS connections dearer fails here;
//! `-- --nocapture` prints them (docs/SECURITY.md, "Memory per TLS connection").

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// Counts live heap bytes by owner: each block carries a small header naming who was
/// running when it was allocated ([`as_server`] or not), so a block freed later is taken
/// off its owner's count whoever frees it.
struct Counting;

thread_local! {
    /// True while the server side (the `ServerConnection`) is being driven.
    static SERVER: Cell<bool> = const { Cell::new(false) };
}

/// Live heap bytes allocated while driving the server, and otherwise.
static LIVE: [AtomicIsize; 2] = [AtomicIsize::new(0), AtomicIsize::new(0)];

fn header(layout: Layout) -> usize {
    layout.align().max(16)
}

// SAFETY: every block is the system allocator's, `header` bytes larger and aligned as
// asked; the owner tag lives in the header, just before the pointer handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let h = header(layout);
        let Ok(full) = Layout::from_size_align(layout.size() + h, h) else {
            return std::ptr::null_mut();
        };
        let base = System.alloc(full);
        if base.is_null() {
            return base;
        }
        let owner = SERVER.try_with(|s| s.get()).unwrap_or(false) as usize;
        LIVE[owner].fetch_add(layout.size() as isize, Relaxed);
        let ptr = base.add(h);
        ptr.sub(8).cast::<usize>().write_unaligned(owner);
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let h = header(layout);
        let owner = ptr.sub(8).cast::<usize>().read_unaligned();
        LIVE[owner].fetch_sub(layout.size() as isize, Relaxed);
        System.dealloc(
            ptr.sub(h),
            Layout::from_size_align_unchecked(layout.size() + h, h),
        )
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live bytes allocated while driving the server.
fn live() -> isize {
    LIVE[1].load(Relaxed)
}

/// Runs `f` as the server: what it allocates is counted as the server's.
fn as_server<T>(f: impl FnOnce() -> T) -> T {
    SERVER.with(|s| s.set(true));
    let r = f();
    SERVER.with(|s| s.set(false));
    r
}

/// The gateway's server settings (src/tls/mod.rs) with a throwaway certificate, and a
/// client trusting it.
fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// Moves every TLS byte each side has for the other until neither has any.
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) {
    loop {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let c2s = !wire.is_empty();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            as_server(|| {
                server.read_tls(&mut rd).unwrap();
                server.process_new_packets().unwrap();
            });
        }
        let mut wire = Vec::new();
        while server.wants_write() {
            // The write buffer is the caller's (the shard's pooled output, already
            // counted as plain connections'): grow it first, outside the server's count.
            wire.reserve(32 * 1024);
            as_server(|| server.write_tls(&mut wire).unwrap());
        }
        let s2c = !wire.is_empty();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
        if !c2s && !s2c {
            return;
        }
    }
}

/// Reads all the plaintext `read` has.
fn drain(mut read: impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match read.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn an_idle_tls_connection_holds_its_4_kib_receive_buffer() {
    let (server_cfg, client_cfg) = configs();
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = ClientConnection::new(client_cfg, name).unwrap();

    let at_start = live();
    let mut server = as_server(|| {
        let mut s = Box::new(ServerConnection::new(server_cfg).unwrap());
        s.set_buffer_limit(Some(16 * 1024));
        s
    });
    let fresh = live() - at_start;
    pump(&mut client, &mut server);
    assert!(!server.is_handshaking() && !client.is_handshaking());
    let handshaken = live() - at_start;

    // CONNECT in, CONNACK out, both read: the connection is idle.
    client
        .writer()
        .write_all(&[
            0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'a',
        ])
        .unwrap();
    pump(&mut client, &mut server);
    let mut plain = Vec::with_capacity(256);
    as_server(|| plain.extend(drain(server.reader())));
    assert_eq!(plain.len(), 15);
    as_server(|| server.writer().write_all(&[0x20, 2, 0, 0]).unwrap());
    pump(&mut client, &mut server);
    assert_eq!(drain(client.reader()), [0x20, 2, 0, 0]);
    let idle = live() - at_start;

    println!(
        "ServerConnection: {} B inline (boxed); heap held: new {fresh} B, after the handshake \
         {handshaken} B, idle after one exchange {idle} B (of which the 4,096 B receive buffer)",
        std::mem::size_of::<ServerConnection>()
    );
    // The receive buffer is what the read left behind: 4 KiB held while idle.
    assert!(idle >= 4096, "idle connection holds {idle} B");
    // Pinned (rustls 0.23.46): about 4 KiB of buffer plus the connection's state.
    assert!(idle <= 8 * 1024, "idle connection holds {idle} B");
}
