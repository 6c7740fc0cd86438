//! The MQTT conversation on a shard: CONNECT and where it goes, every later packet, and
//! the session's life when its connection ends (will, expiry).
//!
//! Shared subscriptions are kept in the session like any other (under their full
//! `$share/...` filter) but not in the shard's index: the group's owner shard routes them
//! (see `shared.rs`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::acl::{ConnAcl, Who};
use crate::auth::{Request, Verdict};
use crate::codec::{self, reason, ConnAckProps, Connect, Packet, Publish, Version, Will};
use crate::mailbox::{home_shard, AuthDone, Handoff, ShardMsg};
use crate::message::{Message, Origin};
use crate::metrics::{DisconnectReason, RefuseReason, ShardMetrics};
use crate::session::{InflightState, Queued, Session, NEVER_EXPIRES, NO_CONN};
use crate::topic::{self, Subscriber};
use crate::wheel::TimerId;

use super::{ConnState, Shard, NO_SESSION, SESSION_TIMER};

/// CONNACK return codes of MQTT 3.1.1.
const V3_IDENTIFIER_REJECTED: u8 = 0x02;
const V3_SERVER_UNAVAILABLE: u8 = 0x03;

/// A CONNECT whose credentials are being checked off the shard.
pub(super) struct PendingAuth {
    /// Tells this connection's answer from one for an earlier connection with the same key.
    token: u64,
    connect: Box<Connect>,
    assigned: bool,
    /// Bytes that followed the CONNECT in the same read; ingested once accepted.
    rest: Vec<u8>,
}

impl Shard {
    /// One whole frame from a connection. `rest` are the bytes after it in this read (a
    /// CONNECT handed to another shard takes them along). False when the connection is gone.
    ///
    /// Only a whole packet counts as a sign of life: the keep-alive (and, before CONNECT,
    /// the connect timeout) is measured from the last complete frame, not the last byte,
    /// as MQTT words it ("does not receive a Control Packet"). A peer trickling one byte
    /// at a time cannot hold a connection open past either timer (slowloris).
    pub(super) fn handle_frame(&mut self, key: usize, frame: &[u8], rest: &[u8]) -> bool {
        self.metrics.packet_in(frame[0] >> 4);
        if self.conns[key].state == ConnState::Active {
            self.conns[key].last_seen = self.now32();
        }
        if self.conns[key].state == ConnState::Handshake {
            return match codec::decode_connect(frame) {
                Ok(connect) => self.route_connect(key, connect, rest),
                Err(e) => {
                    let peer = self.conns[key].peer.addr();
                    tracing::info!(shard = self.id, %peer, error = %e.error, "bad CONNECT, closing");
                    match e.version {
                        Some(v) => {
                            self.conns[key].version = v;
                            let code = e.connack_code();
                            self.refuse(key, code, code, RefuseReason::Protocol)
                        }
                        None => {
                            self.metrics.refuse(RefuseReason::Protocol);
                            self.close_conn(key, DisconnectReason::ProtocolError, None);
                            false
                        }
                    }
                }
            };
        }
        if self.conns[key].state != ConnState::Active {
            // Bytes of a connection still waiting for its authentication verdict (or its
            // PROXY header) are never decoded as packets: there is no session yet.
            self.close_conn(key, DisconnectReason::ProtocolError, None);
            return false;
        }
        let version = self.conns[key].version;
        match codec::decode(frame, version) {
            Ok(packet) => self.handle_packet(key, packet),
            Err(e) => self.protocol_error(key, &e),
        }
    }

    /// Sends the connection to its client id's home shard, or serves it here.
    fn route_connect(&mut self, key: usize, mut connect: Connect, rest: &[u8]) -> bool {
        // Identity from the verified client certificate comes first: it decides the home.
        if self.limits.use_cn_as_client_id && self.conns[key].is_tls() {
            match self.peer_cn(key) {
                Some(cn) => connect.client_id = cn,
                None if self.limits.require_client_cert => {
                    self.conns[key].version = connect.version;
                    tracing::info!(shard = self.id, peer = %self.conns[key].peer, "client certificate has no CN, refused");
                    return self.refuse(
                        key,
                        V3_IDENTIFIER_REJECTED,
                        reason::CLIENT_ID_NOT_VALID,
                        RefuseReason::ClientId,
                    );
                }
                None => {}
            }
        }
        let mut assigned = false;
        if connect.client_id.is_empty() {
            if connect.version != Version::V5 && !connect.clean_start {
                // 3.1.1 [MQTT-3.1.3-8]: an empty id needs clean session.
                self.conns[key].version = connect.version;
                return self.refuse(
                    key,
                    V3_IDENTIFIER_REJECTED,
                    reason::CLIENT_ID_NOT_VALID,
                    RefuseReason::ClientId,
                );
            }
            connect.client_id = self.assign_client_id();
            assigned = true;
        }
        let home = home_shard(&connect.client_id, self.mailboxes.len());
        if home == self.id {
            return self.on_connect(key, connect, assigned, rest);
        }
        let mut conn = self.conns.remove(key);
        // Stop counting it here before the home shard can count it.
        ShardMetrics::set(&self.metrics.connections, self.conns.len() as u64);
        self.handshaking = self.handshaking.saturating_sub(1);
        let _ = self.poll.registry().deregister(&mut conn.socket);
        self.wheel.cancel(conn.timer);
        let mut tls = None;
        if let Some(b) = conn.bufs.take() {
            let b = *b;
            self.pool.give(b.inbuf, self.now);
            self.pool.give(b.out, self.now);
            tls = b.tls;
        }
        let accepted_at = self.started + self.limits.tick * conn.accepted_at;
        let version = connect.version;
        let handoff = Handoff {
            socket: conn.socket,
            peer: conn.peer.addr(),
            connect,
            rest: rest.to_vec(),
            accepted_at,
            tls,
        };
        if let Err(ShardMsg::Handoff(h)) = self
            .mailboxes
            .try_send(home, ShardMsg::Handoff(Box::new(handoff)))
        {
            // The home shard is overloaded: tell the client to come back later.
            let mut out = Vec::with_capacity(16);
            let code = if version == Version::V5 {
                reason::SERVER_UNAVAILABLE
            } else {
                V3_SERVER_UNAVAILABLE
            };
            codec::encode_connack(&mut out, version, false, code, &ConnAckProps::default());
            let mut h = h;
            match h.tls.as_mut() {
                Some(tls) => {
                    let _ = std::io::Write::write_all(&mut tls.writer(), &out);
                    tls.send_close_notify();
                    let _ = tls.write_tls(&mut &h.socket);
                }
                None => {
                    let _ = std::io::Write::write(&mut &h.socket, &out);
                }
            }
            self.per_ip.release(h.peer.ip());
            self.open_connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.metrics.refuse(RefuseReason::Busy);
            self.metrics.disconnect(DisconnectReason::Refused);
            tracing::warn!(shard = self.id, home, client_id = %h.connect.client_id, "home shard mailbox full, connection refused");
        }
        false
    }

    /// The subject CN of the client certificate rustls verified on this connection.
    fn peer_cn(&self, key: usize) -> Option<String> {
        let tls = self.conns[key].bufs.as_ref()?.tls.as_ref()?;
        let cert = tls.peer_certificates()?.first()?;
        crate::tls::subject_cn(cert)
    }

    /// A client id that homes on this shard, for a client that sent an empty one.
    fn assign_client_id(&mut self) -> String {
        loop {
            self.next_auto_id += 1;
            let salt = self.started.elapsed().as_nanos() as u64;
            let id = format!(
                "auto-{:x}-{:x}-{:x}",
                self.id,
                self.next_auto_id,
                salt & 0xffff_ffff
            );
            if home_shard(&id, self.mailboxes.len()) == self.id {
                return id;
            }
        }
    }

    /// Writes a CONNACK with an error and closes. Always false.
    fn refuse(&mut self, key: usize, v3_code: u8, v5_code: u8, why: RefuseReason) -> bool {
        let v = self.conns[key].version;
        let code = if v == Version::V5 { v5_code } else { v3_code };
        self.output(key, 64, |out| {
            codec::encode_connack(out, v, false, code, &ConnAckProps::default())
        });
        self.metrics.packet_out(2);
        self.metrics.refuse(why);
        self.flush_conn(key);
        self.close_conn(key, DisconnectReason::Refused, None);
        false
    }

    /// A CONNECT on its home shard: checks, then authentication. Cheap providers decide
    /// here and the CONNECT is accepted or refused at once; otherwise the providers run on
    /// the business runtime, the connection waits (not read from) in
    /// `ConnState::Authenticating`, `rest` (bytes after the CONNECT) waits with it, and
    /// the answer arrives as `ShardMsg::AuthDone`. True only if accepted now: false means
    /// refused, or waiting — either way the caller stops ingesting.
    pub(super) fn on_connect(
        &mut self,
        key: usize,
        c: Connect,
        assigned: bool,
        rest: &[u8],
    ) -> bool {
        let v = c.version;
        self.conns[key].version = v;
        if v == Version::V5 && c.auth_method.is_some() {
            return self.refuse(key, 0, reason::BAD_AUTH_METHOD, RefuseReason::Auth);
        }
        if c.will
            .as_ref()
            .is_some_and(|w| w.topic.len() > self.limits.max_topic_len)
        {
            tracing::info!(shard = self.id, client_id = %c.client_id, "will topic longer than max_topic_len, refused");
            if v != Version::V5 {
                // 3.1.1 has no return code for it: close without a CONNACK.
                self.metrics.refuse(RefuseReason::Protocol);
                self.close_conn(key, DisconnectReason::ProtocolError, None);
                return false;
            }
            return self.refuse(key, 0, reason::TOPIC_NAME_INVALID, RefuseReason::Protocol);
        }
        if c.client_id.len() > self.limits.max_client_id_len {
            return self.refuse(
                key,
                V3_IDENTIFIER_REJECTED,
                reason::CLIENT_ID_NOT_VALID,
                RefuseReason::ClientId,
            );
        }
        let peer = self.conns[key].peer.addr();
        if let Some(verdict) = self
            .auth
            .fast(c.username.as_deref(), c.password.as_deref(), peer)
        {
            return self.conclude_auth(key, c, assigned, verdict);
        }
        self.next_auth_token += 1;
        let token = self.next_auth_token;
        let req = Request {
            client_id: c.client_id.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
            peer,
        };
        self.auth_pending.insert(
            key,
            PendingAuth {
                token,
                connect: Box::new(c),
                assigned,
                rest: rest.to_vec(),
            },
        );
        self.conns[key].state = ConnState::Authenticating;
        // The connect timeout runs from accept; past it the connection is gone.
        let deadline = self.started
            + self.limits.tick * self.conns[key].accepted_at
            + Duration::from_secs(u64::from(self.config.mqtt.connect_timeout_secs));
        crate::auth::check_in_background(
            self.auth.clone(),
            &self.business,
            req,
            self.mailboxes.clone(),
            self.id,
            key,
            token,
            deadline,
        );
        false
    }

    /// An authentication answer from the business runtime.
    pub(super) fn on_auth_done(&mut self, d: AuthDone) {
        let key = d.conn;
        match self.auth_pending.get(&key) {
            Some(p) if p.token == d.token => {}
            // The connection closed (and its key may have been reused) meanwhile.
            _ => return,
        }
        let Some(p) = self.auth_pending.remove(&key) else {
            return;
        };
        if self.superseded(key, &p.connect.client_id) {
            // The device gave up on this connection and came back on a newer one that
            // is already in: a late verdict must not take that one over.
            tracing::info!(shard = self.id, client_id = %p.connect.client_id, "authentication answered after a newer connection of the client id, closing the older one");
            self.close_conn(key, DisconnectReason::Takeover, None);
            return;
        }
        self.conns[key].state = ConnState::Handshake;
        if !matches!(d.verdict, Verdict::Allow(_)) {
            self.discard_input(key);
        }
        if self.conclude_auth(key, *p.connect, p.assigned, d.verdict) {
            if !p.rest.is_empty() && !self.ingest_bytes(key, &p.rest) {
                return;
            }
            // Plaintext rustls decrypted after the CONNECT is still inside it.
            if self.conns[key].is_tls() && !self.tls_process(key) {
                return;
            }
            // It was not read from while waiting.
            self.reread.push(key as u32);
        }
    }

    /// True when `client_id` already has a live connection accepted after `key`.
    fn superseded(&self, key: usize, client_id: &str) -> bool {
        let Some(skey) = self.by_client.get(client_id, &self.sessions) else {
            return false;
        };
        let old = self.sessions[skey as usize].conn;
        let mine = self.conns[key].accepted_at;
        old != NO_CONN
            && old as usize != key
            && self
                .conns
                .get(old as usize)
                .is_some_and(|o| o.accepted_at > mine)
    }

    /// Reads and drops what a refused client sent after its CONNECT, so closing does not
    /// reset the connection before it reads its CONNACK.
    fn discard_input(&mut self, key: usize) {
        for _ in 0..4 {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            match std::io::Read::read(&mut conn.socket, &mut self.scratch) {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }

    /// Acts on an authentication verdict; true if the connection was accepted.
    fn conclude_auth(&mut self, key: usize, c: Connect, assigned: bool, verdict: Verdict) -> bool {
        let peer = self.conns[key].peer.addr();
        match verdict {
            Verdict::Allow(acl) => self.accept_connect(key, c, assigned, acl),
            Verdict::Deny(why) => {
                tracing::info!(shard = self.id, client_id = %c.client_id, %peer, reason = %why, "authentication failed, connection refused");
                self.refuse(
                    key,
                    reason::V3_NOT_AUTHORIZED,
                    reason::BAD_USERNAME_OR_PASSWORD,
                    RefuseReason::Auth,
                )
            }
            Verdict::Unavailable(why) => {
                tracing::warn!(shard = self.id, client_id = %c.client_id, %peer, reason = %why, "authentication unavailable, connection refused");
                self.refuse(
                    key,
                    V3_SERVER_UNAVAILABLE,
                    reason::SERVER_UNAVAILABLE,
                    RefuseReason::AuthUnavailable,
                )
            }
        }
    }

    /// Accepts an authenticated CONNECT: will ACL, duplicate policy, session, keep-alive,
    /// CONNACK, then redelivery. False if the connection was refused.
    fn accept_connect(
        &mut self,
        key: usize,
        c: Connect,
        assigned: bool,
        conn_acl: Option<Box<ConnAcl>>,
    ) -> bool {
        let v = c.version;
        // %u is the authenticated name (the verdict's, else the certificate CN).
        let cert_cn = self.limits.use_cn_as_client_id.then(|| self.peer_cn(key));
        let conn_acl = crate::auth::session_acl(&self.acl, conn_acl, cert_cn.flatten());
        if self.acl.enabled() {
            if let Some(w) = &c.will {
                let who = Who {
                    client_id: &c.client_id,
                    username: conn_acl.as_ref().and_then(|a| a.username.as_deref()),
                };
                if !self.acl.may_publish(&who, conn_acl.as_deref(), &w.topic) {
                    self.metrics.acl_denied(false);
                    tracing::info!(shard = self.id, client_id = %c.client_id, topic = %w.topic, "will topic denied by the ACL, connection refused");
                    return self.refuse(
                        key,
                        reason::V3_NOT_AUTHORIZED,
                        reason::NOT_AUTHORIZED,
                        RefuseReason::Auth,
                    );
                }
            }
        }
        if let Some(skey) = self.by_client.get(&c.client_id, &self.sessions) {
            let old = self.sessions[skey as usize].conn;
            if old != NO_CONN {
                if !self.limits.takeover {
                    tracing::info!(shard = self.id, client_id = %c.client_id, "duplicate client id refused");
                    return self.refuse(
                        key,
                        V3_IDENTIFIER_REJECTED,
                        reason::CLIENT_ID_NOT_VALID,
                        RefuseReason::Duplicate,
                    );
                }
                tracing::info!(shard = self.id, client_id = %c.client_id, "session taken over by a new connection");
                self.close_conn(
                    old as usize,
                    DisconnectReason::Takeover,
                    Some(reason::SESSION_TAKEN_OVER),
                );
            }
        }
        // Closing the old connection may have ended a session with expiry 0.
        let existing = self.by_client.get(&c.client_id, &self.sessions);
        let (skey, present) = match existing {
            Some(s) if !c.clean_start => (s as usize, true),
            Some(s) => {
                self.end_session(s as usize);
                (self.new_session(&c.client_id, v), false)
            }
            None => (self.new_session(&c.client_id, v), false),
        };
        let limits = &self.limits;
        let expiry = match v {
            Version::V5 => c.session_expiry.min(limits.max_session_expiry_secs),
            _ if c.clean_start => 0,
            _ => limits.max_session_expiry_secs,
        };
        let requested_ka = c.keep_alive;
        let cap = limits.max_keepalive_secs;
        let mut keep_alive = limits.keepalive_zero.granted(requested_ka, cap);
        if v == Version::V5 && limits.keepalive_jitter_pct > 0 && keep_alive != 0 {
            keep_alive = self.jitter(keep_alive);
        }
        // Keep-alive 0 granted (`keepalive_zero = "off"`): no idle deadline.
        let idle_ticks = match keep_alive {
            0 => u32::MAX,
            ka => self.limits.ticks(f64::from(ka) * 1.5),
        };
        let window = c.receive_maximum.min(self.limits.max_inflight).max(1);

        // Attach the session.
        if let Some(t) = self.sessions[skey].timer.take() {
            self.wheel.cancel(t);
        }
        let s = &mut self.sessions[skey];
        s.conn = key as u32;
        s.version = v;
        s.expiry_secs = expiry;
        if let Some(st) = s.extra.as_mut() {
            // Reconnected in time: a delayed will is not sent, the expiry is off.
            st.will = None;
            st.will_due = None;
            st.expires_at = None;
            // Topic aliases belong to a connection (MQTT 5 3.3.2.3.4).
            st.aliases = None;
            st.acl = None;
        }
        s.alias_max = if v == Version::V5 {
            c.topic_alias_max.min(self.limits.outbound_topic_aliases)
        } else {
            0
        };
        if let Some(w) = c.will {
            s.state().will = Some(w);
        }
        if conn_acl.is_some() {
            s.state().acl = conn_acl;
        }
        s.compact();
        let client_id = s.client_id.clone();
        self.store_session(skey, true);

        let now = self.now32();
        let conn = &mut self.conns[key];
        conn.state = ConnState::Active;
        self.handshaking = self.handshaking.saturating_sub(1);
        conn.session = skey as u32;
        conn.keep_alive = keep_alive;
        conn.idle_ticks = idle_ticks;
        conn.last_seen = now;
        conn.max_packet = c.max_packet_size;
        conn.window = window;
        let deadline = u64::from(now) + u64::from(idle_ticks) + 1;
        let timer = conn.timer;
        if !self.wheel.reset(timer, deadline) {
            self.conns[key].timer = self.wheel.insert(deadline, key as u32);
        }

        let props = ConnAckProps {
            assigned_client_id: assigned.then_some(&*client_id),
            server_keep_alive: (v == Version::V5 && keep_alive != requested_ka)
                .then_some(keep_alive),
            session_expiry: (v == Version::V5 && expiry != c.session_expiry).then_some(expiry),
            receive_maximum: self.limits.receive_maximum,
            max_packet_size: self.limits.max_packet_size as u32,
            topic_alias_max: self.limits.topic_alias_maximum,
            retain_available: self.limits.retain_available,
            wildcard_available: true,
            subscription_ids_available: true,
            shared_subscriptions_available: true,
            ..ConnAckProps::default()
        };
        self.output(key, 128, |out| {
            codec::encode_connack(out, v, present, 0, &props)
        });
        self.metrics.packet_out(2);
        ShardMetrics::add(&self.metrics.connects, 1);
        tracing::debug!(shard = self.id, client_id = %client_id, peer = %self.conns[key].peer, keep_alive, session_present = present, "connected");
        if present {
            self.resend_inflight(skey);
        }
        true
    }

    /// Spreads keep-alives by up to ±`keepalive_jitter_pct` so reconnect herds drift apart.
    fn jitter(&mut self, ka: u16) -> u16 {
        self.next_auto_id = self
            .next_auto_id
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (self.next_auto_id >> 33) as f64 / f64::from(1u32 << 31); // 0..1
        let pct = f64::from(self.limits.keepalive_jitter_pct) / 100.0;
        let k = f64::from(ka) * (1.0 + pct * (2.0 * r - 1.0));
        (k.round() as u32).clamp(1, u32::from(self.limits.max_keepalive_secs)) as u16
    }

    pub(super) fn new_session(&mut self, client_id: &str, v: Version) -> usize {
        let id: Arc<str> = Arc::from(client_id);
        let skey = self.sessions.insert(Session::new(id, v));
        self.by_client.insert(skey as u32, &self.sessions);
        skey
    }

    fn handle_packet(&mut self, key: usize, packet: Packet) -> bool {
        let skey = self.conns[key].session as usize;
        let v = self.conns[key].version;
        match packet {
            Packet::Publish(p) => return self.on_publish(key, skey, p),
            Packet::PubAck { pkid, .. } => self.on_puback(skey, pkid),
            Packet::PubRec { pkid, reason: code } => self.on_pubrec(key, skey, pkid, code),
            Packet::PubComp { pkid, .. } => self.on_pubcomp(skey, pkid),
            Packet::PubRel { pkid, .. } => {
                let known = match self.sessions[skey].extra.as_mut() {
                    Some(st) => match st.inbound_qos2.iter().position(|&p| p == pkid) {
                        Some(i) => {
                            st.inbound_qos2.swap_remove(i);
                            true
                        }
                        None => false,
                    },
                    None => false,
                };
                self.sessions[skey].compact();
                let code = if known {
                    0
                } else {
                    reason::PACKET_ID_NOT_FOUND
                };
                self.output(key, 16, |out| codec::encode_pubcomp(out, v, pkid, code));
                self.metrics.packet_out(7);
            }
            Packet::Subscribe {
                pkid,
                filters,
                subscription_id,
            } => return self.on_subscribe(key, skey, pkid, filters, subscription_id),
            Packet::Unsubscribe { pkid, filters } => {
                let mut codes = Vec::with_capacity(filters.len());
                for f in &filters {
                    codes.push(if self.unsubscribe(skey, f) {
                        0
                    } else {
                        reason::NO_SUBSCRIPTION_EXISTED
                    });
                }
                self.output(key, 16 + codes.len(), |out| {
                    codec::encode_unsuback(out, v, pkid, &codes)
                });
                self.metrics.packet_out(11);
            }
            Packet::PingReq => {
                self.output(key, 2, codec::encode_pingresp);
                self.metrics.packet_out(13);
            }
            Packet::Disconnect {
                reason: code,
                session_expiry,
            } => {
                let s = &mut self.sessions[skey];
                if let Some(e) = session_expiry {
                    if s.expiry_secs == 0 && e != 0 {
                        // [MQTT-3.14.2-2]: cannot turn a session that ends into one that lasts.
                        return self.close_protocol(
                            key,
                            reason::PROTOCOL_ERROR,
                            "session expiry set on DISCONNECT after 0 at CONNECT",
                        );
                    }
                    s.expiry_secs = e.min(self.limits.max_session_expiry_secs);
                }
                // Only "disconnect with will message" (0x04) keeps the will; it is then
                // treated as after an abnormal close (Will Delay Interval included). It is
                // taken out before the close, which drops any will of a client that sent
                // DISCONNECT, and placed once the session is detached.
                let will = s.extra.as_mut().and_then(|st| st.will.take());
                let session_ends = s.expiry_secs == 0;
                self.close_conn(key, DisconnectReason::Client, None);
                if let Some(w) = will.filter(|_| code == reason::DISCONNECT_WITH_WILL) {
                    self.publish_or_delay_will((!session_ends).then_some(skey), w);
                }
                return false;
            }
            Packet::Auth => {
                return self.close_protocol(
                    key,
                    reason::PROTOCOL_ERROR,
                    "AUTH without enhanced authentication",
                );
            }
        }
        true
    }

    /// Closes for a protocol breach found above the codec, with an MQTT 5 reason code.
    fn close_protocol(&mut self, key: usize, code: u8, why: &str) -> bool {
        let client = self.client_id_of(key);
        tracing::info!(shard = self.id, client_id = %client, error = why, "protocol error, closing");
        self.close_conn(key, DisconnectReason::ProtocolError, Some(code));
        false
    }

    fn on_publish(&mut self, key: usize, skey: usize, p: Publish) -> bool {
        let v = self.conns[key].version;
        if p.topic.len() > self.limits.max_topic_len {
            return self.close_protocol(
                key,
                reason::TOPIC_NAME_INVALID,
                "topic name longer than max_topic_len",
            );
        }
        let topic: Arc<str> = match p.topic_alias {
            None => Arc::from(p.topic),
            Some(a) if a == 0 || a > self.limits.topic_alias_maximum => {
                return self.close_protocol(
                    key,
                    reason::TOPIC_ALIAS_INVALID,
                    "topic alias 0 or above our Topic Alias Maximum",
                );
            }
            Some(a) => {
                let aliases = self.sessions[skey]
                    .state()
                    .aliases
                    .get_or_insert_with(Default::default);
                if p.topic.is_empty() {
                    match aliases.inbound(a) {
                        Some(t) => t,
                        None => {
                            return self.close_protocol(
                                key,
                                reason::PROTOCOL_ERROR,
                                "topic alias used before it was set",
                            )
                        }
                    }
                } else {
                    aliases.set_inbound(a, &p.topic);
                    Arc::from(p.topic)
                }
            }
        };
        if p.retain && !self.limits.retain_available {
            return self.close_protocol(
                key,
                reason::RETAIN_NOT_SUPPORTED,
                "retain is not available",
            );
        }
        let refusal = if !self.publish_allowed(skey, &topic) {
            Some(reason::NOT_AUTHORIZED)
        } else if p.retain && !self.retained_admitted(skey, &topic, &p.payload) {
            Some(reason::QUOTA_EXCEEDED)
        } else {
            None
        };
        if let Some(v5_code) = refusal {
            // 3.1.1 has no way to refuse: acknowledge and drop. MQTT 5: the reason.
            let code = if v == Version::V5 { v5_code } else { 0 };
            match p.qos {
                1 => {
                    self.output(key, 16, |out| codec::encode_puback(out, v, p.pkid, code));
                    self.metrics.packet_out(4);
                }
                2 => {
                    if v != Version::V5 {
                        // The client will PUBREL it; answer that as for any message.
                        let max = usize::from(self.limits.receive_maximum);
                        let st = self.sessions[skey].state();
                        if !st.inbound_qos2.contains(&p.pkid) && st.inbound_qos2.len() < max {
                            st.inbound_qos2.push(p.pkid);
                        }
                    }
                    self.output(key, 16, |out| codec::encode_pubrec(out, v, p.pkid, code));
                    self.metrics.packet_out(5);
                }
                _ => {}
            }
            return true;
        }
        if p.qos == 2 {
            let max = usize::from(self.limits.receive_maximum);
            let st = self.sessions[skey].state();
            if st.inbound_qos2.contains(&p.pkid) {
                // A resend of a message we already have: acknowledge, do not route again.
                self.output(key, 16, |out| codec::encode_pubrec(out, v, p.pkid, 0));
                self.metrics.packet_out(5);
                return true;
            }
            if st.inbound_qos2.len() >= max {
                return self.close_protocol(
                    key,
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "more QoS 2 messages in flight than Receive Maximum",
                );
            }
            st.inbound_qos2.push(p.pkid);
        }
        let expiry = p.props.as_ref().and_then(|pr| pr.message_expiry);
        let mut msg = Message::new(
            topic,
            p.payload,
            p.qos,
            p.retain,
            Origin::Device {
                shard: self.id as u16,
                session: skey as u32,
            },
        )
        .with_expiry_secs(expiry);
        msg.props = p.props;
        self.publish(Arc::new(msg));
        match p.qos {
            1 => {
                self.output(key, 16, |out| codec::encode_puback(out, v, p.pkid, 0));
                self.metrics.packet_out(4);
            }
            2 => {
                self.output(key, 16, |out| codec::encode_pubrec(out, v, p.pkid, 0));
                self.metrics.packet_out(5);
            }
            _ => {}
        }
        true
    }

    /// SUBSCRIBE: each filter granted or refused in the SUBACK. False if the connection
    /// was closed (No Local on a shared subscription is a protocol error, 3.8.3.1).
    fn on_subscribe(
        &mut self,
        key: usize,
        skey: usize,
        pkid: u16,
        filters: Vec<codec::SubscribeFilter>,
        subscription_id: Option<u32>,
    ) -> bool {
        let v = self.conns[key].version;
        let sub_id = subscription_id.unwrap_or(0);
        let invalid = if v == Version::V5 {
            reason::TOPIC_FILTER_INVALID
        } else {
            reason::V3_SUBACK_FAILURE
        };
        let mut codes = Vec::with_capacity(filters.len());
        let mut wanted_retained = Vec::new();
        let mut quota_logged = false;
        for f in filters {
            if f.filter.len() > self.limits.max_topic_len {
                codes.push(invalid);
                continue;
            }
            let shared = if f.filter.starts_with("$share/") {
                match topic::parse_shared(&f.filter) {
                    Some((g, inner)) if topic::valid_topic_filter(inner) => Some((g, inner)),
                    _ => {
                        codes.push(invalid);
                        continue;
                    }
                }
            } else {
                None
            };
            if !topic::valid_topic_filter(&f.filter) {
                codes.push(invalid);
                continue;
            }
            if shared.is_some() && f.no_local {
                return self.close_protocol(
                    key,
                    reason::PROTOCOL_ERROR,
                    "no local on a shared subscription",
                );
            }
            let inner = shared.map_or(f.filter.as_str(), |(_, inner)| inner);
            let Some(acl_bits) = self.subscribe_allowed(skey, inner, shared.is_some()) else {
                codes.push(if v == Version::V5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::V3_SUBACK_FAILURE
                });
                continue;
            };
            let qos = f.qos.min(2);
            let options = qos
                | (u8::from(f.no_local) << 2)
                | (u8::from(f.retain_as_published) << 3)
                | ((f.retain_handling & 3) << 4)
                | acl_bits;
            let s = &mut self.sessions[skey];
            let existing = s.subs.iter().position(|(fl, _)| **fl == *f.filter);
            if existing.is_none() && s.subs.len() >= self.limits.max_subscriptions {
                // MQTT 5 0x97 Quota exceeded; encode_suback sends 0x80 to 3.1.1 clients.
                if !quota_logged {
                    quota_logged = true;
                    tracing::info!(shard = self.id, client_id = %s.client_id, max = self.limits.max_subscriptions, "max_subscriptions_per_client reached, subscription refused");
                }
                codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            let filter: Arc<str> = match existing {
                Some(i) => {
                    s.subs[i].1 = options;
                    s.subs[i].0.clone()
                }
                None => {
                    let a: Arc<str> = Arc::from(f.filter.as_str());
                    // Most devices subscribe once: no spare capacity (Vec would take 4).
                    s.subs.reserve_exact(1);
                    s.subs.push((a.clone(), options));
                    self.subs_total += 1;
                    a
                }
            };
            codes.push(qos);
            self.store_sub(skey, &filter, options, sub_id);
            self.attach_subscription(skey, &filter, shared, options, sub_id);
            if shared.is_some() {
                // Retained messages are not sent for shared subscriptions (4.8.2).
                continue;
            }
            // Retain Handling: 0 send retained, 1 only for a new subscription, 2 never.
            let handling = (options >> 4) & 3;
            if handling == 0 || (handling == 1 && existing.is_none()) {
                wanted_retained.push((filter, qos));
            }
        }
        self.output(key, 16 + codes.len(), |out| {
            codec::encode_suback(out, v, pkid, &codes)
        });
        self.metrics.packet_out(9);
        for (filter, qos) in wanted_retained {
            self.send_retained(skey, &filter, qos, sub_id);
        }
        true
    }

    /// Puts a subscription of session `skey` where routing finds it: its shared group
    /// (`shared` = group and inner filter of a `$share/` filter), or the shard's index.
    /// SUBSCRIBE and the restore of stored sessions both come through here.
    pub(super) fn attach_subscription(
        &mut self,
        skey: usize,
        filter: &Arc<str>,
        shared: Option<(&str, &str)>,
        options: u8,
        sub_id: u32,
    ) {
        match shared {
            Some((group, inner)) => self.join_shared(skey, group, inner, options, sub_id),
            None => {
                self.subs.insert(
                    filter,
                    Subscriber {
                        session: skey as u32,
                        options,
                        sub_id,
                    },
                );
            }
        }
    }

    /// The ACL's word on a PUBLISH to `topic` from session `skey`; a refusal is counted.
    fn publish_allowed(&mut self, skey: usize, topic: &str) -> bool {
        self.acl_allows(skey, None, topic).is_some()
    }

    /// The ACL's word on a SUBSCRIBE filter (`shared`: inside `$share/`) from session
    /// `skey`: the bits to add to the subscription's options (0, or `ACL_FILTERED`), or
    /// None when refused (counted).
    fn subscribe_allowed(&mut self, skey: usize, filter: &str, shared: bool) -> Option<u8> {
        self.acl_allows(skey, Some(shared), filter)
    }

    /// Asks the ACL about a SUBSCRIBE filter (`subscribe` = Some(shared)) or a PUBLISH
    /// topic. A refused SUBSCRIBE is logged at info; a refused PUBLISH only at debug, so a
    /// device publishing where it may not cannot flood the log. Both are counted.
    fn acl_allows(&mut self, skey: usize, subscribe: Option<bool>, topic: &str) -> Option<u8> {
        if !self.acl.enabled() {
            return Some(0);
        }
        let s = &self.sessions[skey];
        let conn_acl = s.extra.as_ref().and_then(|st| st.acl.as_deref());
        let who = Who {
            client_id: &s.client_id,
            username: conn_acl.and_then(|a| a.username.as_deref()),
        };
        let allowed = match subscribe {
            Some(shared) => self
                .acl
                .may_subscribe(&who, conn_acl, topic)
                .option_bits(shared),
            None => self.acl.may_publish(&who, conn_acl, topic).then_some(0),
        };
        if allowed.is_some() {
            return allowed;
        }
        self.metrics.acl_denied(subscribe.is_some());
        if subscribe.is_some() {
            tracing::info!(shard = self.id, client_id = %s.client_id, filter = topic, "SUBSCRIBE filter denied by the ACL");
        } else {
            tracing::debug!(shard = self.id, client_id = %s.client_id, topic, "PUBLISH denied by the ACL");
        }
        None
    }

    /// Whether session `skey` may set `topic` to a retained `payload` within the retained
    /// byte bounds (an empty payload deletes: always). A refusal is logged.
    fn retained_admitted(&self, skey: usize, topic: &str, payload: &[u8]) -> bool {
        if payload.is_empty() {
            return true;
        }
        let client = &self.sessions[skey].client_id;
        let cost = crate::retained_budget::cost(topic, payload);
        let Err(over) = self.retained_budget.admit(client, topic, cost) else {
            return true;
        };
        tracing::info!(shard = self.id, client_id = %client, topic, bytes = cost, bound = over.key(), "retained PUBLISH refused: retained byte bound reached");
        false
    }

    /// Whether a message on `topic` may reach session `skey` through a subscription
    /// marked `ACL_FILTERED` (a deny rule overlaps its filter).
    pub(super) fn acl_receives(&self, skey: usize, topic: &str) -> bool {
        let s = &self.sessions[skey];
        let conn_acl = s.extra.as_ref().and_then(|st| st.acl.as_deref());
        let who = Who {
            client_id: &s.client_id,
            username: conn_acl.and_then(|a| a.username.as_deref()),
        };
        self.acl.may_receive(&who, topic)
    }

    /// Removes one subscription of a session; true if it existed. Leaving a shared group
    /// hands the group's messages still queued for the session back to the group.
    fn unsubscribe(&mut self, skey: usize, filter: &str) -> bool {
        let s = &mut self.sessions[skey];
        let Some(i) = s.subs.iter().position(|(f, _)| &**f == filter) else {
            return false;
        };
        s.subs.swap_remove(i);
        self.subs_total -= 1;
        self.store_unsub(skey, filter);
        let s = &mut self.sessions[skey];
        match filter.strip_prefix("$share/") {
            Some(key) => {
                let key: Arc<str> = Arc::from(key);
                let client_id = s.client_id.clone();
                let mut items = Vec::new();
                if let Some(st) = s.extra.as_mut() {
                    let (theirs, ours): (VecDeque<Queued>, VecDeque<Queued>) =
                        std::mem::take(&mut st.queue)
                            .into_iter()
                            .partition(|q| q.shared.as_ref() == Some(&key));
                    st.queue = ours;
                    items = Vec::from(theirs);
                }
                self.queued_total -= items.len() as u64;
                s.compact();
                for item in &items {
                    self.store_forget(skey, item);
                }
                self.leave_shared(&key, &client_id, items);
            }
            None => {
                self.subs.remove(filter, skey as u32);
            }
        }
        true
    }

    fn on_puback(&mut self, skey: usize, pkid: u16) {
        let done = self.sessions[skey].extra.as_mut().and_then(|st| {
            let i = st
                .inflight
                .iter()
                .position(|f| f.pkid == pkid && f.item.qos == 1)?;
            st.inflight.remove(i)
        });
        if let Some(mut f) = done {
            if let Some(w) = f.item.waiter.take() {
                let _ = w.send(());
            }
            self.store_forget(skey, &f.item);
        }
        self.refill(skey);
    }

    fn on_pubrec(&mut self, key: usize, skey: usize, pkid: u16, code: u8) {
        let v = self.conns[key].version;
        let mut found = false;
        let mut refused = None;
        if let Some(st) = self.sessions[skey].extra.as_mut() {
            if let Some(i) = st
                .inflight
                .iter()
                .position(|f| f.pkid == pkid && f.item.qos == 2)
            {
                found = true;
                if code >= 0x80 {
                    // The receiver refused it; the exchange ends here (MQTT 5 4.3.3).
                    refused = st.inflight.remove(i);
                } else {
                    st.inflight[i].state = InflightState::Released;
                }
            }
        }
        if let Some(f) = refused {
            self.store_forget(skey, &f.item);
        }
        if code < 0x80 {
            let rc = if found {
                0
            } else {
                reason::PACKET_ID_NOT_FOUND
            };
            self.output(key, 16, |out| codec::encode_pubrel(out, v, pkid, rc));
            self.metrics.packet_out(6);
        } else {
            self.refill(skey);
        }
    }

    fn on_pubcomp(&mut self, skey: usize, pkid: u16) {
        let done = self.sessions[skey].extra.as_mut().and_then(|st| {
            let i = st
                .inflight
                .iter()
                .position(|f| f.pkid == pkid && f.state == InflightState::Released)?;
            st.inflight.remove(i)
        });
        if let Some(mut f) = done {
            if let Some(w) = f.item.waiter.take() {
                let _ = w.send(());
            }
            self.store_forget(skey, &f.item);
        }
        self.refill(skey);
    }

    /// The session's connection ended. Publishes or schedules the will, and ends the
    /// session now or arms its expiry.
    pub(super) fn detach_session(&mut self, skey: usize, will_allowed: bool) {
        let now = self.now;
        let s = &mut self.sessions[skey];
        s.conn = NO_CONN;
        s.alias_max = 0;
        if let Some(st) = s.extra.as_mut() {
            st.aliases = None;
            st.acl = None;
        }
        let will: Option<Box<Will>> = s.extra.as_mut().and_then(|st| st.will.take());
        let will = will.filter(|_| will_allowed);
        if s.expiry_secs == 0 {
            if let Some(w) = will {
                self.publish_will(*w);
            }
            self.end_session(skey);
            return;
        }
        let expiry = s.expiry_secs;
        if expiry != NEVER_EXPIRES {
            let at = self.offline_deadline(now, expiry);
            self.sessions[skey].state().expires_at = Some(at);
        }
        self.store_session(skey, false);
        self.sessions[skey].compact();
        self.arm_session_timer(skey);
        if let Some(w) = will {
            self.publish_or_delay_will(Some(skey), w);
        }
    }

    /// The tick by which `secs` have surely passed since `now`. `now` is the current tick
    /// rounded down, so one more tick is added: a session deadline is never early, and at
    /// most one tick late (as the connection deadlines in `Shard::conn_deadline`).
    pub(super) fn offline_deadline(&self, now: u64, secs: u32) -> u64 {
        now + u64::from(self.limits.ticks(f64::from(secs))) + 1
    }

    /// A will whose connection ended: published now, or, with a Will Delay Interval and a
    /// session `skey` that lives on offline, at the delay or when the session ends,
    /// whichever is first.
    fn publish_or_delay_will(&mut self, skey: Option<usize>, w: Box<Will>) {
        let Some(skey) = skey.filter(|_| w.delay_secs > 0) else {
            self.publish_will(*w);
            return;
        };
        let delay = w.delay_secs.min(self.sessions[skey].expiry_secs);
        let due = self.offline_deadline(self.now, delay);
        let st = self.sessions[skey].state();
        st.will = Some(w);
        st.will_due = Some(due);
        self.arm_session_timer(skey);
    }

    pub(super) fn arm_session_timer(&mut self, skey: usize) {
        let s = &mut self.sessions[skey];
        if let Some(t) = s.timer.take() {
            self.wheel.cancel(t);
        }
        let due = s
            .extra
            .as_ref()
            .and_then(|st| match (st.will_due, st.expires_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            });
        if let Some(at) = due {
            s.timer = Some(self.wheel.insert(at, skey as u32 | SESSION_TIMER));
        }
    }

    pub(super) fn on_session_timer(&mut self, skey: usize, id: TimerId) {
        let Some(s) = self.sessions.get_mut(skey) else {
            return;
        };
        if s.timer != Some(id) || s.is_online() {
            return;
        }
        s.timer = None;
        let now = self.now;
        let (will_due, expires_at) = s
            .extra
            .as_ref()
            .map_or((None, None), |st| (st.will_due, st.expires_at));
        if will_due.is_some_and(|d| d <= now) {
            let st = s.state();
            st.will_due = None;
            if let Some(w) = st.will.take() {
                self.publish_will(*w);
            }
        }
        if expires_at.is_some_and(|d| d <= now) {
            tracing::debug!(shard = self.id, client_id = %self.sessions[skey].client_id, "session expired");
            self.end_session(skey);
            return;
        }
        self.sessions[skey].compact();
        self.arm_session_timer(skey);
    }

    /// Removes a session and everything it holds; a pending will is published now.
    pub(super) fn end_session(&mut self, skey: usize) {
        let Some(id) = self.sessions.get(skey).map(|s| s.client_id.clone()) else {
            return;
        };
        // The index compares against the session's own id: remove it first.
        self.by_client.remove(&id, &self.sessions);
        let s = self.sessions.remove(skey);
        self.store_session_ended(&s.client_id, s.stored);
        let mut groups: Vec<Arc<str>> = Vec::new();
        for (filter, _) in &s.subs {
            match filter.strip_prefix("$share/") {
                Some(key) => groups.push(Arc::from(key)),
                None => {
                    self.subs.remove(filter, skey as u32);
                }
            }
        }
        self.subs_total -= s.subs.len() as u64;
        if let Some(t) = s.timer {
            self.wheel.cancel(t);
        }
        // QoS 1/2 messages of shared groups that were not finished go to other members:
        // queued ones and those sent but not acknowledged (a QoS 2 message the client
        // has acknowledged with PUBREC is its own).
        let mut unfinished: Vec<Queued> = Vec::new();
        if let Some(st) = s.extra {
            self.queued_total -= st.queue.len() as u64;
            if !groups.is_empty() {
                let sent = st
                    .inflight
                    .into_iter()
                    .filter(|f| f.state == InflightState::Published)
                    .map(|f| f.item);
                unfinished.extend(
                    sent.chain(st.queue)
                        .filter(|q| q.shared.is_some() && q.qos > 0),
                );
            }
            if st.will_due.is_some() {
                if let Some(w) = st.will {
                    self.publish_will(*w);
                }
            }
        }
        for key in groups {
            let items = unfinished
                .iter()
                .filter(|q| q.shared.as_ref() == Some(&key))
                .map(|q| Queued {
                    msg: q.msg.clone(),
                    qos: q.qos,
                    retain: q.retain,
                    sub_ids: None,
                    shared: None,
                    waiter: None,
                    seq: 0,
                    dup: false,
                })
                .collect();
            self.leave_shared(&key, &s.client_id, items);
        }
        debug_assert!(
            s.conn == NO_CONN
                || self
                    .conns
                    .get(s.conn as usize)
                    .is_none_or(|c| c.session == NO_SESSION)
        );
    }

    fn publish_will(&mut self, w: Will) {
        let expiry = w.props.as_ref().and_then(|p| p.message_expiry);
        let mut msg = Message::new(
            Arc::from(w.topic),
            w.payload,
            w.qos,
            w.retain,
            Origin::Gateway,
        )
        .with_expiry_secs(expiry);
        msg.props = w.props;
        self.publish(Arc::new(msg));
    }
}
