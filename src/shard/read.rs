//! The read path of a connection: ask the [`gate`](super::gate) whether to read, read once
//! through the [`transport`](super::transport), cut the plaintext into frames with the
//! [`framer`](super::framer) and hand each whole frame to the MQTT layer.
//!
//! Memory: whole frames are handled straight from the shard's scratch buffer (or the TLS
//! plaintext buffer). A connection borrows a pooled buffer only for a trailing partial
//! frame (`inbuf`) or for frames read past a pause (`held`), and gives it back as soon as
//! it holds nothing, so an idle connection holds no buffer.

use std::time::Duration;

use super::conn::ConnState;
use super::framer::{self, Split};
use super::gate::{self, Facts, Verdict};
use super::packet::{self, type_of};
use super::transport::{self, Transport};
use super::{Shard, READS_PER_EVENT};
use crate::codec;
use crate::metrics::{DisconnectReason, ShardMetrics};

impl Shard {
    /// Reads a ready connection, up to `READS_PER_EVENT` times, while the gate lets it.
    /// `stop_at_short_read`: a read that gets fewer bytes than it asked for ends the reads
    /// (the socket is empty, and edge-triggered readiness reports the next arrival), sparing
    /// the read that would only say `WouldBlock`. Only for a readiness event that did not
    /// also report the peer's close: that end of stream must be read now, as no later
    /// event would report it.
    pub(super) fn on_readable(&mut self, key: usize, stop_at_short_read: bool) {
        if self
            .wire
            .conns
            .get(key)
            .is_some_and(|c| c.state == ConnState::Closing)
        {
            return self.discard_closing(key);
        }
        if self.defer_handshake(key) {
            return;
        }
        for _ in 0..READS_PER_EVENT {
            let Some(facts) = self.read_facts(key) else {
                return;
            };
            match gate::before_read(&facts) {
                Verdict::Go => {}
                Verdict::Wait => return,
                Verdict::Pause(over) => return self.pause_reads(key, over),
                Verdict::Hold => return self.hold_publisher(key),
            }
            if !self.read_once(key, stop_at_short_read) {
                return;
            }
        }
        self.wire.reread.push(key as u32);
    }

    /// What the gate needs to know before reading connection `key` (`None`: it is gone).
    fn read_facts(&self, key: usize) -> Option<Facts> {
        let conn = self.wire.conns.get(key)?;
        let active = conn.state == ConnState::Active;
        let bufs = conn.bufs.as_ref().filter(|_| active);
        let paced = self.publish_paced(key);
        Some(Facts {
            authenticating: conn.state == ConnState::Authenticating,
            active,
            outbound: conn.outbound_len(),
            high_watermark: self.settings.high_watermark,
            over_ns: bufs.map_or(0, |b| {
                self.settings.inbound.over_by(&b.rate, self.clock.now_ns())
            }),
            holding: bufs.is_some_and(|b| !b.held.is_empty()),
            held_room: bufs.is_some_and(|b| b.held.len() < self.settings.high_watermark),
            paced,
            publish: paced && self.holds_publish(key),
        })
    }

    /// One read through the connection's transport, and the bytes on to the framer.
    /// True to read again; false when the socket has nothing more or the connection is gone.
    fn read_once(&mut self, key: usize, stop_at_short_read: bool) -> bool {
        let now_ns = self.clock.now_ns();
        let conn = &mut self.wire.conns[key];
        let state = conn.state;
        let transport::ReadResult { via, result, short } =
            transport::read(conn, &mut self.wire.scratch);
        let more = !(short && stop_at_short_read);
        match result {
            Ok(0) => {
                if self.handle_held_at_eof(key) {
                    self.close_conn(key, DisconnectReason::CloseWait, None);
                }
                false
            }
            Ok(n) => {
                ShardMetrics::add(&self.services.metrics.bytes_received, n as u64);
                if state == ConnState::Active {
                    if let Some(g) = self.settings.inbound.bytes {
                        let b = conn.bufs.get_or_insert_with(Default::default);
                        g.charge(&mut b.rate.bytes, now_ns, n as u64);
                    }
                }
                let alive = match via {
                    Transport::Tls => self.tls_read(key, n),
                    Transport::Records => self.records_read(key, n),
                    Transport::ProxyPrefix => self.ingest_proxy(key, n),
                    Transport::Plain | Transport::WebSocket => self.ingest(key, n),
                };
                alive && more
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(e) => {
                tracing::debug!(shard = self.id, error = %e, "read failed");
                self.close_conn(key, DisconnectReason::SocketError, None);
                false
            }
        }
    }

    /// The peer closed its side while frames it sent were held (paced or over its rate):
    /// they are handled now, in order, pacing or not (at most a high watermark's worth),
    /// so what it sent before closing is not lost and a DISCONNECT among them still
    /// discards its will. False when that closed the connection.
    fn handle_held_at_eof(&mut self, key: usize) -> bool {
        let held = self.wire.take_held(key);
        self.handle_held(key, held, |_| true)
    }

    /// Stops reading a connection over its inbound rate: its bytes wait in the kernel
    /// and then in the client (TCP backpressure) until `resume_paused` reads it again.
    fn pause_reads(&mut self, key: usize, over_ns: u64) {
        if self.wire.paused.insert(key as u32) {
            ShardMetrics::add(&self.services.metrics.rate_limit_pauses, 1);
            tracing::debug!(shard = self.id, client_id = %self.client_id_of(key), pause_ms = over_ns / 1_000_000, "inbound rate exceeded, pausing reads");
        }
        self.wake_no_later_than(self.clock.now_instant + Duration::from_nanos(over_ns));
    }

    /// Reads again the paused connections the gate lets go.
    pub(super) fn resume_paused(&mut self) {
        if self.wire.paused.is_empty() {
            return;
        }
        let now_ns = self.clock.now_ns();
        let keys: Vec<u32> = self.wire.paused.drain().collect();
        for key in keys {
            let Some(conn) = self.wire.conns.get(key as usize) else {
                continue;
            };
            let facts = Facts {
                over_ns: conn
                    .bufs
                    .as_ref()
                    .map_or(0, |b| self.settings.inbound.over_by(&b.rate, now_ns)),
                paced: self.publish_paced(key as usize),
                publish: self.holds_publish(key as usize),
                ..Facts::default()
            };
            match gate::on_recheck(&facts) {
                Verdict::Pause(over) => {
                    self.wire.paused.insert(key);
                    self.wake_no_later_than(self.clock.now_instant + Duration::from_nanos(over));
                }
                Verdict::Hold => self.hold_publisher(key as usize),
                Verdict::Go | Verdict::Wait => self.resume(key as usize),
            }
        }
    }

    /// Handles what a paused connection holds (frames, then TLS plaintext and ciphertext) and
    /// reads it again, unless that puts it over its rate once more.
    pub(super) fn resume(&mut self, key: usize) {
        if self.wire.conns[key].state != ConnState::Active {
            // A key freed and reused since it was paused: not the paused connection.
            return;
        }
        let held = self.wire.take_held(key);
        if !held.is_empty() {
            let alive = self.ingest_bytes(key, &held);
            self.wire.pool.give(held, self.clock.now);
            if !alive || self.wire.is_holding(key) {
                return;
            }
            // Everything held was handled: an idle connection keeps no box.
            self.wire.release_idle_bufs(&self.clock, key);
        }
        if !self.tls_continue(key) {
            return;
        }
        self.on_readable(key, false);
    }

    /// Frames the `n` bytes just read into the scratch buffer (through the WebSocket
    /// layer first on a WebSocket connection, which decodes them in place). False when
    /// the connection is gone (closed or handed to another shard).
    fn ingest(&mut self, key: usize, n: usize) -> bool {
        let mut scratch = std::mem::take(&mut self.wire.scratch);
        let alive = self.ingest_plaintext(key, &mut scratch[..n]);
        self.wire.scratch = scratch;
        alive
    }

    /// Plaintext bytes of a connection, in order: behind frames it holds (paused), else
    /// completing its partial frame, then framed in place. False when it is gone.
    pub(super) fn ingest_bytes(&mut self, key: usize, data: &[u8]) -> bool {
        if self.wire.is_holding(key) {
            // Paused with frames held: these bytes queue behind them, in order, and the
            // acknowledgements among them are handled now.
            let mut held = self.wire.take_held(key);
            self.wire
                .pool
                .reserve(&mut held, data.len(), self.clock.now);
            held.extend_from_slice(data);
            return self.hold_frames(key, held);
        }
        let has_partial = self.wire.conns[key]
            .bufs
            .as_ref()
            .is_some_and(|b| !b.inbuf.is_empty());
        let data = if has_partial {
            match self.complete_partial(key, data) {
                Ok(rest) => rest,
                Err(alive) => return alive,
            }
        } else {
            data
        };
        self.frame_in_place(key, data)
    }

    /// Completes the partial frame held from an earlier read and handles it. `Ok` with
    /// the bytes after it; `Err(alive)` when there is nothing more to do.
    fn complete_partial<'a>(&mut self, key: usize, data: &'a [u8]) -> Result<&'a [u8], bool> {
        let mut inbuf = match self.wire.conns[key].bufs.as_mut() {
            Some(b) => std::mem::take(&mut b.inbuf),
            None => Vec::new(),
        };
        let fill = match framer::fill(&inbuf, data, self.settings.max_packet_size) {
            Ok(f) => f,
            Err(e) => {
                self.wire.pool.give(inbuf, self.clock.now);
                return Err(self.protocol_error(key, &e));
            }
        };
        self.wire
            .pool
            .reserve(&mut inbuf, fill.take, self.clock.now);
        let (taken, rest) = data.split_at(fill.take);
        inbuf.extend_from_slice(taken);
        if !fill.complete {
            self.wire.put_inbuf(&self.clock, key, inbuf);
            return Err(true);
        }
        let alive = self.dispatch(key, &inbuf, rest);
        self.wire.pool.give(inbuf, self.clock.now);
        // The box may hold nothing now: an idle connection keeps none.
        self.wire.release_idle_bufs(&self.clock, key);
        if alive {
            Ok(rest)
        } else {
            Err(false)
        }
    }

    /// Handles every whole frame in `data` in place, asking the gate before each while
    /// rate limits or pacing are in force; a trailing partial frame, or the rest at a
    /// pause, is copied out.
    fn frame_in_place(&mut self, key: usize, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            match framer::split(data, self.settings.max_packet_size) {
                Err(e) => return self.protocol_error(key, &e),
                Ok(Split::Whole(len)) => {
                    if self.gate_frames() {
                        if let Some(alive) = self.frame_may_pass(key, data) {
                            return alive;
                        }
                    }
                    let (frame, rest) = data.split_at(len);
                    if !self.dispatch(key, frame, rest) {
                        return false;
                    }
                    data = rest;
                }
                Ok(Split::Partial { want }) => {
                    // Sized for the whole frame when its length is known.
                    let mut inbuf = self
                        .wire
                        .pool
                        .take(want.min(crate::buffer::MAX_CLASS).max(data.len()));
                    inbuf.extend_from_slice(data);
                    self.wire.put_inbuf(&self.clock, key, inbuf);
                    return true;
                }
            }
        }
        true
    }

    /// Asks the gate about the frame at the front of `data`: `None` to handle it. Over
    /// the inbound rate, or a PUBLISH while it is paced: keeps all of `data` for later
    /// (held; the acknowledgements in it are handled now) and says whether the
    /// connection is still alive.
    fn frame_may_pass(&mut self, key: usize, data: &[u8]) -> Option<bool> {
        let facts = Facts {
            active: self.wire.conns[key].state == ConnState::Active,
            over_ns: self.over_by(key),
            publish: type_of(data[0]) == packet::PUBLISH,
            paced: self.publish_paced(key),
            ..Facts::default()
        };
        let verdict = gate::before_frame(&facts);
        if verdict == Verdict::Go {
            return None;
        }
        match verdict {
            Verdict::Pause(over) => self.pause_reads(key, over),
            _ => self.hold_publisher(key),
        }
        let mut held = self.wire.pool.take(data.len());
        held.extend_from_slice(data);
        Some(self.hold_frames(key, held))
    }

    /// Keeps `held` (whole frames and maybe a partial one, in order) for when the
    /// connection is read again, handling at once the acknowledgements and PINGREQs among
    /// them: they answer what the gateway sent, so they need not wait behind a held
    /// PUBLISH, and a paced client that also subscribes keeps its window open. False when
    /// the connection is gone.
    fn hold_frames(&mut self, key: usize, held: Vec<u8>) -> bool {
        self.handle_held(key, held, |kind| {
            matches!(
                kind,
                packet::PUBACK
                    | packet::PUBREC
                    | packet::PUBREL
                    | packet::PUBCOMP
                    | packet::PINGREQ
            )
        })
    }

    /// Handles, in order, the whole frames of `held` whose packet type `now` accepts, and
    /// keeps the rest (and a trailing partial frame) held; a connection left holding
    /// nothing keeps no box. False when the connection is gone.
    fn handle_held(&mut self, key: usize, mut held: Vec<u8>, now: impl Fn(u8) -> bool) -> bool {
        let (mut at, mut kept) = (0, 0);
        while let Ok(Split::Whole(len)) = framer::split(&held[at..], self.settings.max_packet_size)
        {
            if now(type_of(held[at])) {
                if !self.dispatch(key, &held[at..at + len], &[]) {
                    self.wire.pool.give(held, self.clock.now);
                    return false;
                }
            } else {
                held.copy_within(at..at + len, kept);
                kept += len;
            }
            at += len;
        }
        held.copy_within(at.., kept);
        held.truncate(kept + held.len() - at);
        if held.is_empty() {
            self.wire.pool.give(held, self.clock.now);
            self.wire.release_idle_bufs(&self.clock, key);
        } else {
            self.wire.put_held(key, held);
        }
        true
    }

    /// One whole frame to the MQTT layer, after charging a PUBLISH to the connection's
    /// inbound message rate (the debt pauses reads; the frame itself is never dropped).
    fn dispatch(&mut self, key: usize, frame: &[u8], rest: &[u8]) -> bool {
        if let Some(g) = self.settings.inbound.msgs {
            let now_ns = self.clock.now_ns();
            let conn = &mut self.wire.conns[key];
            if type_of(frame[0]) == packet::PUBLISH && conn.state == ConnState::Active {
                let b = conn.bufs.get_or_insert_with(Default::default);
                g.charge(&mut b.rate.msgs, now_ns, 1);
            }
        }
        self.handle_frame(key, frame, rest)
    }

    /// Nanoseconds until the connection is back under its inbound rate (0 = it is).
    fn over_by(&self, key: usize) -> u64 {
        self.wire.conns[key].bufs.as_ref().map_or(0, |b| {
            self.settings.inbound.over_by(&b.rate, self.clock.now_ns())
        })
    }

    /// Closes a connection for a protocol error, telling an MQTT 5 client why.
    pub(super) fn protocol_error(&mut self, key: usize, e: &codec::ProtocolError) -> bool {
        let conn = &self.wire.conns[key];
        let client = self.client_id_of(key);
        tracing::info!(shard = self.id, client_id = %client, peer = %conn.peer, error = %e, "protocol error, closing");
        let reason = (conn.state == ConnState::Active).then(|| e.reason_code());
        self.close_conn(key, DisconnectReason::ProtocolError, reason);
        false
    }
}
