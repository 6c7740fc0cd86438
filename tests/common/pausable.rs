//! A TCP forwarder on loopback that a test can pause: while paused it moves no bytes
//! either way (they wait in the kernel and in its buffer), as a network path that hangs
//! would, for one client of a server the others still reach directly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

pub struct PausableProxy {
    pub addr: SocketAddr,
    paused: Arc<AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl PausableProxy {
    /// Forwards each connection made to `addr` to `target`.
    pub async fn to(target: SocketAddr) -> PausableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let p = paused.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                tokio::spawn(pipe(cr, sw, p.clone()));
                tokio::spawn(pipe(sr, cw, p.clone()));
            }
        });
        PausableProxy {
            addr,
            paused,
            accept,
        }
    }

    /// A fresh `nats-server` (accepting connections) and a proxy to it: a node whose
    /// `nats_url` is [`PausableProxy::url`] can have its path to NATS hang alone.
    pub async fn nats(tag: &str) -> (super::nats::NatsServer, PausableProxy) {
        let nats = super::nats::NatsServer::start(tag);
        drop(nats.client().await);
        let to: SocketAddr = format!("127.0.0.1:{}", nats.port()).parse().unwrap();
        let proxy = PausableProxy::to(to).await;
        (nats, proxy)
    }

    /// The proxy's NATS URL.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for PausableProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, paused: Arc<AtomicBool>) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        hold(&paused).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just as the pause began wait too.
        hold(&paused).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn hold(paused: &AtomicBool) {
    while paused.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
