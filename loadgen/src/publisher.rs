//! `fanout`: the one MQTT publisher, run by the parent once every subscriber is up.
//!
//! It publishes `rate` messages a second for `duration` seconds to one topic (or round
//! robin to each subscriber's own topic, `--topic` with `{i}`) — or, with
//! `--burst N`, N messages as fast as the broker takes them — each payload stamped with
//! its sequence number and send time. At QoS 1 and 2 it keeps at most `--window` PUBLISHes
//! unacknowledged (a reader task returns a permit per PUBACK, at QoS 2 per PUBCOMP after
//! answering the PUBREC) and waits for the last one before it disconnects, so the count
//! it reports is what the broker took.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};

use crate::cli::FanoutArgs;
use crate::codec::{self, Incoming, Protocol};
use crate::fleet::now_ns;

/// Messages a burst encodes per socket write (bounds the publisher's own buffer).
const BURST_CHUNK: u64 = 256;

#[derive(Default)]
pub struct PubCounters {
    pub published: AtomicU64,
    pub acked: AtomicU64,
}

#[derive(Debug)]
pub struct PubResult {
    pub published: u64,
    pub acked: u64,
    pub elapsed: Duration,
}

pub async fn run(args: &FanoutArgs, counters: Arc<PubCounters>) -> Result<PubResult, String> {
    let p = Protocol::from_level(args.mqtt.protocol).ok_or("bad --protocol")?;
    let mut stream = TcpStream::connect(args.publisher_target.unwrap_or(args.common.target))
        .await
        .map_err(|e| format!("publisher connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let client_id = format!("loadgen-pub-{}", std::process::id());
    let mut out = BytesMut::new();
    let login = match (&args.mqtt.username, &args.mqtt.password) {
        (Some(u), p) => Some((u.as_str(), p.as_deref().unwrap_or(""))),
        _ => None,
    };
    codec::connect(
        p,
        &codec::ConnectFields {
            client_id: &client_id,
            // Some brokers (rumqttd) refuse keep-alive 0; the publisher's steady traffic
            // keeps the connection alive, and the drain is far shorter than 1.5 × this.
            keep_alive: args.mqtt.keepalive.max(1),
            clean: true,
            login,
            session_expiry: None,
            will: None,
        },
        &mut out,
    )?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("publisher write: {e}"))?;
    let mut buf = BytesMut::new();
    let code = loop {
        if let Some(pkt) = codec::next(p, &mut buf)? {
            match pkt {
                Incoming::ConnAck { code } => break code,
                other => return Err(format!("publisher got {other:?} before CONNACK")),
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut buf))
            .await
            .map_err(|_| "publisher: no CONNACK in 10 s".to_string())?
            .map_err(|e| format!("publisher read: {e}"))?;
        if n == 0 {
            return Err("publisher: closed before CONNACK".into());
        }
    };
    if code != 0 {
        return Err(format!("publisher: CONNACK refused with 0x{code:02x}"));
    }

    let (rd, wr) = stream.into_split();
    // Shared with the reader, which answers each PUBREC with a PUBREL.
    let wr = Arc::new(Mutex::new(wr));
    let window_size = args.window as u32;
    let window = Arc::new(Semaphore::new(window_size as usize));
    let reader = tokio::spawn(read_acks(
        p,
        rd,
        buf,
        wr.clone(),
        window.clone(),
        counters.clone(),
    ));

    let planned = args.planned();
    let start = Instant::now();
    let mut seq = 0u64;
    let mut pkid: u16 = 0;
    let mut iv = tokio::time::interval(Duration::from_millis(2));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while seq < planned {
        let due = if args.burst.is_some() {
            // As fast as the socket (and at QoS 1 the window) allows.
            (seq + BURST_CHUNK).min(planned)
        } else {
            iv.tick().await;
            ((start.elapsed().as_secs_f64() * args.rate) as u64 + 1).min(planned)
        };
        out.clear();
        while seq < due {
            if args.qos > 0 {
                if out.is_empty() {
                    window.acquire().await.map_err(|e| e.to_string())?.forget();
                } else {
                    match window.try_acquire() {
                        Ok(permit) => permit.forget(),
                        // Window full: send what we have, then wait.
                        Err(_) => break,
                    }
                }
                pkid = pkid % u16::MAX + 1;
            }
            let payload = Bytes::from(codec::stamp(seq, now_ns(), args.size));
            codec::publish(p, &args.topic_of(seq), args.qos, pkid, payload, &mut out)?;
            seq += 1;
        }
        if !out.is_empty() {
            wr.lock()
                .await
                .write_all(&out)
                .await
                .map_err(|e| format!("publisher write: {e}"))?;
        }
        counters.published.store(seq, Ordering::Relaxed);
    }
    if args.qos > 0 {
        // Every permit back means every PUBLISH was acknowledged.
        let _ =
            tokio::time::timeout(Duration::from_secs(30), window.acquire_many(window_size)).await;
    }
    let elapsed = start.elapsed();
    let mut wr = wr.lock().await;
    let _ = wr.write_all(&codec::DISCONNECT).await;
    let _ = wr.shutdown().await;
    drop(wr);
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    Ok(PubResult {
        published: seq,
        acked: counters.acked.load(Ordering::Relaxed),
        elapsed,
    })
}

/// Reads the broker's acknowledgements until the connection closes: a PUBACK (QoS 1) or
/// PUBCOMP (QoS 2) frees a window slot; a PUBREC is answered with PUBREL.
async fn read_acks(
    p: Protocol,
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    wr: Arc<Mutex<OwnedWriteHalf>>,
    window: Arc<Semaphore>,
    counters: Arc<PubCounters>,
) {
    loop {
        while let Ok(Some(pkt)) = codec::next(p, &mut buf) {
            match pkt {
                Incoming::PubAck { .. } | Incoming::PubComp { .. } => {
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
                Incoming::PubRec { pkid } => {
                    let sent = wr.lock().await.write_all(&codec::pubrel(pkid)).await;
                    if sent.is_err() {
                        return;
                    }
                }
                _ => {}
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
