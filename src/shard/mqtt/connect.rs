//! CONNECT: where it goes (the client id's home shard), its authentication off the
//! shard, and its acceptance under the negotiated terms (`negotiate.rs`).

use crate::acl::{ConnAcl, Who};
use crate::auth::{Request, Verdict};
use crate::codec::{self, reason, ConnAckProps, Connect, Version, Will};
use crate::mailbox::{home_shard, AuthDone, Handoff, ShardMsg};
use crate::metrics::{DisconnectReason, RefuseReason, ShardMetrics};
use crate::session::{Attach, ConnKey, SessionKey};

use crate::shard::negotiate::{negotiate, Terms};
use crate::shard::{packet, ConnState, Shard};

/// CONNACK return codes of MQTT 3.1.1.
pub(super) const V3_IDENTIFIER_REJECTED: u8 = 0x02;
pub(super) const V3_SERVER_UNAVAILABLE: u8 = 0x03;

/// A CONNECT whose credentials are being checked off the shard.
pub(in crate::shard) struct PendingAuth {
    /// Tells this connection's answer from one for an earlier connection with the same key.
    token: u64,
    connect: Box<Connect>,
    assigned: bool,
    /// Bytes that followed the CONNECT in the same read; ingested once accepted.
    rest: Vec<u8>,
}

impl Shard {
    /// Sends the connection to its client id's home shard, or serves it here.
    pub(in crate::shard) fn route_connect(
        &mut self,
        key: usize,
        mut connect: Connect,
        rest: &[u8],
    ) -> bool {
        let assigned = match self.resolve_client_id(key, &mut connect) {
            Ok(assigned) => assigned,
            Err(alive) => return alive,
        };
        let home = home_shard(&connect.client_id, self.services.mailboxes.len());
        if home == self.id {
            return self.on_connect(key, connect, assigned, rest);
        }
        self.hand_off(key, home, connect, rest);
        false
    }

    /// The client id the connection goes by: its certificate's CN when so configured,
    /// else its own, else one we assign (true). `Err(alive)` when it is refused.
    fn resolve_client_id(&mut self, key: usize, connect: &mut Connect) -> Result<bool, bool> {
        // Identity from the verified client certificate comes first: it decides the home.
        if self.settings.use_cn_as_client_id && self.wire.conns[key].is_tls() {
            match self.peer_cn(key) {
                Some(cn) => connect.client_id = cn,
                None if self.settings.require_client_cert => {
                    self.wire.conns[key].version = connect.version;
                    tracing::info!(shard = self.id, peer = %self.wire.conns[key].peer, "client certificate has no CN, refused");
                    return Err(self.refuse(
                        key,
                        V3_IDENTIFIER_REJECTED,
                        reason::CLIENT_ID_NOT_VALID,
                        RefuseReason::ClientId,
                    ));
                }
                None => {}
            }
        }
        if !connect.client_id.is_empty() {
            return Ok(false);
        }
        if connect.version != Version::V5 && !connect.clean_start {
            // 3.1.1 [MQTT-3.1.3-8]: an empty id needs clean session.
            self.wire.conns[key].version = connect.version;
            return Err(self.refuse(
                key,
                V3_IDENTIFIER_REJECTED,
                reason::CLIENT_ID_NOT_VALID,
                RefuseReason::ClientId,
            ));
        }
        connect.client_id = self.assign_client_id();
        Ok(true)
    }

    /// Takes the connection off this shard and posts it, with its CONNECT, to shard
    /// `home` (once `tls_feed` has added the ciphertext rustls has not taken, when it is
    /// feeding this connection).
    fn hand_off(&mut self, key: usize, home: usize, connect: Connect, rest: &[u8]) {
        let d = self.detach(key);
        let handoff = Box::new(Handoff {
            socket: d.socket,
            peer: d.peer,
            connect,
            rest: rest.to_vec(),
            accepted_at: d.accepted_at,
            tls: d.tls,
            tls_cursor: d.tls_cursor,
            tls_secrets: d.tls_secrets,
            tls_in: d.tls_in,
            link: d.link,
            ws: d.ws,
        });
        match self.wire.tls_feeding == Some(key) {
            true => self.wire.deferred_handoff = Some((home, handoff)),
            false => self.post_handoff(home, handoff),
        }
    }

    /// Posts a hand-off to shard `home`; refuses the connection (server unavailable)
    /// when that shard's mailbox is full.
    pub(in crate::shard) fn post_handoff(&mut self, home: usize, handoff: Box<Handoff>) {
        if let Err(ShardMsg::Handoff(h)) = self
            .services
            .mailboxes
            .try_send(home, ShardMsg::Handoff(handoff))
        {
            self.refuse_handoff(home, *h);
        }
    }

    /// The home shard is overloaded: tells the client to come back later, and closes.
    fn refuse_handoff(&mut self, home: usize, mut h: Handoff) {
        let version = h.connect.version;
        let mut out = Vec::with_capacity(16);
        let code = if version == Version::V5 {
            reason::SERVER_UNAVAILABLE
        } else {
            V3_SERVER_UNAVAILABLE
        };
        codec::encode_connack(&mut out, version, false, code, &ConnAckProps::default());
        if h.link.is_ws() {
            crate::ws::frame::frame_in_place(&mut out, 0);
        }
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
        self.release_detached(h.peer);
        self.services.metrics.refuse(RefuseReason::Busy);
        self.services.metrics.disconnect(DisconnectReason::Refused);
        tracing::warn!(shard = self.id, home, client_id = %h.connect.client_id, "home shard mailbox full, connection refused");
    }

    /// The subject CN of the client certificate rustls verified on this connection.
    pub(in crate::shard) fn peer_cn(&self, key: usize) -> Option<String> {
        let tls = self.wire.conns[key].bufs.as_ref()?.tls.as_ref()?;
        let cert = tls.peer_certificates()?.first()?;
        crate::tls::subject_cn(cert)
    }

    /// A client id that homes on this shard, for a client that sent an empty one.
    pub(in crate::shard) fn assign_client_id(&mut self) -> String {
        loop {
            self.admission.next_auto_id += 1;
            let salt = self.clock.started.elapsed().as_nanos() as u64;
            let id = format!(
                "auto-{:x}-{:x}-{:x}",
                self.id,
                self.admission.next_auto_id,
                salt & 0xffff_ffff
            );
            if home_shard(&id, self.services.mailboxes.len()) == self.id {
                return id;
            }
        }
    }

    /// Answers with a CONNACK with an error and closes. Always false.
    pub(in crate::shard) fn refuse(
        &mut self,
        key: usize,
        v3_code: u8,
        v5_code: u8,
        why: RefuseReason,
    ) -> bool {
        let v = self.wire.conns[key].version;
        let code = if v == Version::V5 { v5_code } else { v3_code };
        self.wire.output(&self.clock, key, 64, |out| {
            codec::encode_connack(out, v, false, code, &ConnAckProps::default())
        });
        self.services.metrics.packet_out(packet::CONNACK);
        self.services.metrics.refuse(why);
        // close_conn writes the CONNACK, then the close grace lets the client read it.
        self.close_conn(key, DisconnectReason::Refused, None);
        false
    }

    /// A CONNECT on its home shard: checks, then authentication. Cheap providers decide
    /// here and the CONNECT is accepted or refused at once; otherwise the providers run on
    /// the business runtime, the connection waits (not read from) in
    /// `ConnState::Authenticating`, `rest` (bytes after the CONNECT) waits with it, and
    /// the answer arrives as `ShardMsg::AuthDone`. True only if accepted now: false means
    /// refused, or waiting — either way the caller stops ingesting.
    pub(in crate::shard) fn on_connect(
        &mut self,
        key: usize,
        c: Connect,
        assigned: bool,
        rest: &[u8],
    ) -> bool {
        let v = c.version;
        self.wire.conns[key].version = v;
        if v == Version::V5 && c.auth_method.is_some() {
            return self.refuse(key, 0, reason::BAD_AUTH_METHOD, RefuseReason::Auth);
        }
        if c.will
            .as_ref()
            .is_some_and(|w| w.topic.len() > self.settings.max_topic_len)
        {
            tracing::info!(shard = self.id, client_id = %c.client_id, "will topic longer than max_topic_len, refused");
            if v != Version::V5 {
                // 3.1.1 has no return code for it: close without a CONNACK.
                self.services.metrics.refuse(RefuseReason::Protocol);
                self.close_conn(key, DisconnectReason::ProtocolError, None);
                return false;
            }
            return self.refuse(key, 0, reason::TOPIC_NAME_INVALID, RefuseReason::Protocol);
        }
        if c.client_id.len() > self.settings.max_client_id_len {
            return self.refuse(
                key,
                V3_IDENTIFIER_REJECTED,
                reason::CLIENT_ID_NOT_VALID,
                RefuseReason::ClientId,
            );
        }
        let peer = self.wire.conns[key].peer.addr();
        // A session the fleet may hold is read off the shard, after the verdict.
        let fleet = self.fleet_step(&c);
        if let Some(verdict) = self
            .services
            .auth
            .fast(c.username.as_deref(), c.password.as_deref(), peer)
            .filter(|_| fleet.is_none())
        {
            return self.conclude_auth(key, c, assigned, verdict);
        }
        self.admission.next_auth_token += 1;
        let token = self.admission.next_auth_token;
        let req = Request {
            client_id: c.client_id.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
            peer,
        };
        self.admission.auth_pending.insert(
            key,
            PendingAuth {
                token,
                connect: Box::new(c),
                assigned,
                rest: rest.to_vec(),
            },
        );
        self.wire.conns[key].state = ConnState::Authenticating;
        // The connect timeout runs from accept; past it the connection is gone.
        let deadline =
            self.clock.instant_of(self.wire.conns[key].accepted_at) + self.settings.connect_timeout;
        crate::auth::check_in_background(
            self.services.auth.clone(),
            &self.services.business,
            req,
            self.services.mailboxes.clone(),
            self.id,
            key,
            token,
            deadline,
            fleet,
        );
        false
    }

    /// An authentication answer from the business runtime.
    pub(in crate::shard) fn on_auth_done(&mut self, d: AuthDone) {
        let key = d.conn;
        match self.admission.auth_pending.get(&key) {
            Some(p) if p.token == d.token => {}
            // The connection closed (and its key may have been reused) meanwhile.
            _ => return,
        }
        let Some(p) = self.admission.auth_pending.remove(&key) else {
            return;
        };
        if self.superseded(key, &p.connect.client_id) {
            // The device gave up on this connection and came back on a newer one that
            // is already in: a late verdict must not take that one over.
            tracing::info!(shard = self.id, client_id = %p.connect.client_id, "authentication answered after a newer connection of the client id, closing the older one");
            self.close_conn(key, DisconnectReason::Takeover, None);
            return;
        }
        self.wire.conns[key].state = ConnState::Handshake;
        if !matches!(d.verdict, Verdict::Allow(_)) {
            self.discard_input(key);
        } else if let Some(session) = d.session {
            self.adopt_session(*session);
        }
        if self.conclude_auth(key, *p.connect, p.assigned, d.verdict) {
            if !p.rest.is_empty() && !self.ingest_bytes(key, &p.rest) {
                return;
            }
            // Plaintext rustls decrypted after the CONNECT is still inside it, and the
            // ciphertext another shard read past it came along (`adopt`).
            if self.wire.conns[key].is_tls()
                && !(self.tls_process(key) && self.tls_carried_kept(key))
            {
                return;
            }
            // It was not read from while waiting.
            self.wire.reread.push(key as u32);
        }
    }

    /// True when `client_id` already has a live connection accepted after `key`.
    pub(in crate::shard) fn superseded(&self, key: usize, client_id: &str) -> bool {
        let Some(skey) = self.sessions.find(client_id) else {
            return false;
        };
        let Some(old) = self.sessions[skey as usize].conn.map(ConnKey::index) else {
            return false;
        };
        let mine = self.wire.conns[key].accepted_at;
        old != key
            && self
                .wire
                .conns
                .get(old)
                .is_some_and(|o| o.accepted_at > mine)
    }

    /// Reads and drops what a refused client sent after its CONNECT, so closing does not
    /// reset the connection before it reads its CONNACK.
    pub(in crate::shard) fn discard_input(&mut self, key: usize) {
        for _ in 0..4 {
            let Some(conn) = self.wire.conns.get_mut(key) else {
                return;
            };
            match std::io::Read::read(&mut conn.socket, &mut self.wire.scratch) {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }

    /// Acts on an authentication verdict; true if the connection was accepted.
    pub(in crate::shard) fn conclude_auth(
        &mut self,
        key: usize,
        c: Connect,
        assigned: bool,
        verdict: Verdict,
    ) -> bool {
        let peer = self.wire.conns[key].peer.addr();
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

    /// Accepts an authenticated CONNECT: will ACL, duplicate policy, session, the
    /// negotiated terms (see `negotiate.rs`), CONNACK, then redelivery. False if the
    /// connection was refused.
    pub(in crate::shard) fn accept_connect(
        &mut self,
        key: usize,
        mut c: Connect,
        assigned: bool,
        conn_acl: Option<Box<ConnAcl>>,
    ) -> bool {
        // A CONNACK for a session that was stored (or changed) waits for the commit.
        let mark = self.durable_mark(key);
        let Ok(conn_acl) = self.connect_acl(key, &c, conn_acl) else {
            return false;
        };
        if !self.settle_duplicate(key, &c.client_id) {
            return false;
        }
        let (skey, present) = self.open_session(&c);
        let terms = negotiate(&c, &self.settings, || {
            draw(&mut self.admission.next_auto_id)
        });
        self.attach_session(skey, key, &terms, c.will.take(), conn_acl);
        self.activate_conn(key, skey, &terms);
        let client_id = self.sessions[skey].client_id.clone();
        let props = terms.connack_props(&self.settings, assigned.then_some(&*client_id));
        let connack_at = self.output_len(key);
        self.wire.output(&self.clock, key, 128, |out| {
            codec::encode_connack(out, terms.version, present, 0, &props)
        });
        self.hold_if_durable(key, mark);
        // A resumed session's filters (adopted from another node, new here) reach the
        // fleet before its CONNACK, as a SUBSCRIBE's before its SUBACK.
        if present && !self.sessions[skey].subs.is_empty() {
            self.fleet_barrier(key, connack_at);
        }
        self.services.metrics.packet_out(packet::CONNACK);
        let link = self.wire.conns[key].link as usize;
        ShardMetrics::add(&self.services.metrics.connects[link], 1);
        self.emit_connected(key, skey, &c, &terms, present);
        tracing::debug!(shard = self.id, client_id = %client_id, peer = %self.wire.conns[key].peer, keep_alive = terms.keep_alive, session_present = present, "connected");
        if present {
            self.resend_inflight(skey);
        }
        true
    }

    /// The connection's ACL state, with `%u` the authenticated name (the verdict's, else
    /// the certificate CN), after checking its will topic. `Err` when the will is denied
    /// (refused).
    pub(in crate::shard) fn connect_acl(
        &mut self,
        key: usize,
        c: &Connect,
        conn_acl: Option<Box<ConnAcl>>,
    ) -> Result<Option<Box<ConnAcl>>, ()> {
        let cert_cn = self
            .settings
            .use_cn_as_client_id
            .then(|| self.peer_cn(key))
            .flatten();
        let conn_acl = crate::auth::session_acl(&self.services.acl, conn_acl, cert_cn);
        if !self.services.acl.enabled() {
            return Ok(conn_acl);
        }
        let Some(w) = &c.will else {
            return Ok(conn_acl);
        };
        let who = Who {
            client_id: &c.client_id,
            username: conn_acl.as_ref().and_then(|a| a.username.as_deref()),
        };
        if self
            .services
            .acl
            .may_publish(&who, conn_acl.as_deref(), &w.topic)
        {
            return Ok(conn_acl);
        }
        self.services.metrics.acl_denied(false);
        tracing::info!(shard = self.id, client_id = %c.client_id, topic = %w.topic, "will topic denied by the ACL, connection refused");
        self.refuse(
            key,
            reason::V3_NOT_AUTHORIZED,
            reason::NOT_AUTHORIZED,
            RefuseReason::Auth,
        );
        Err(())
    }

    /// Applies `duplicate_client_id` when `client_id` is connected already: takes the
    /// session over (closing the old connection) or refuses. False when refused.
    pub(in crate::shard) fn settle_duplicate(&mut self, key: usize, client_id: &str) -> bool {
        let Some(skey) = self.sessions.find(client_id) else {
            return true;
        };
        let Some(old) = self.sessions[skey as usize].conn.map(ConnKey::index) else {
            return true;
        };
        if !self.settings.takeover {
            tracing::info!(shard = self.id, client_id = %client_id, "duplicate client id refused");
            return self.refuse(
                key,
                V3_IDENTIFIER_REJECTED,
                reason::CLIENT_ID_NOT_VALID,
                RefuseReason::Duplicate,
            );
        }
        tracing::info!(shard = self.id, client_id = %client_id, "session taken over by a new connection");
        self.close_conn(
            old,
            DisconnectReason::Takeover,
            Some(reason::SESSION_TAKEN_OVER),
        );
        true
    }

    /// The session the CONNECT resumes, or a new one (a clean start ends the old one):
    /// `(session key, session present)`.
    pub(in crate::shard) fn open_session(&mut self, c: &Connect) -> (usize, bool) {
        // Closing an old connection may have ended a session with expiry 0.
        match self.sessions.find(&c.client_id) {
            Some(s) if !c.clean_start => (s as usize, true),
            Some(s) => {
                self.end_session(s as usize);
                (self.sessions.open(&c.client_id, c.version), false)
            }
            None => (self.sessions.open(&c.client_id, c.version), false),
        }
    }

    /// Attaches session `skey` to connection `key` under `terms`, with the connection's
    /// will and ACL state, and stores it.
    pub(in crate::shard) fn attach_session(
        &mut self,
        skey: usize,
        key: usize,
        terms: &Terms,
        will: Option<Box<Will>>,
        conn_acl: Option<Box<ConnAcl>>,
    ) {
        let offline_timer = self.sessions[skey].attach(Attach {
            conn: ConnKey::new(key),
            version: terms.version,
            expiry_secs: terms.session_expiry,
            alias_max: terms.alias_max,
            will,
            acl: conn_acl,
        });
        if let Some(t) = offline_timer {
            self.timers.wheel.cancel(t);
        }
        self.store_session(skey, true);
    }

    /// The connection is active under `terms`: its keep-alive deadline replaces the
    /// connect timeout.
    pub(in crate::shard) fn activate_conn(&mut self, key: usize, skey: usize, terms: &Terms) {
        let now = self.clock.now32();
        let conn = &mut self.wire.conns[key];
        conn.state = ConnState::Active;
        self.admission.handshaking = self.admission.handshaking.saturating_sub(1);
        conn.session = Some(SessionKey::new(skey));
        conn.keep_alive = terms.keep_alive;
        conn.idle_ticks = terms.idle_ticks;
        conn.last_seen = now;
        conn.max_packet = terms.max_packet;
        conn.window = terms.window;
        let deadline = u64::from(now) + u64::from(terms.idle_ticks) + 1;
        let timer = conn.timer;
        if !self.timers.wheel.reset(timer, deadline) {
            self.wire.conns[key].timer = self.timers.wheel.insert(deadline, key as u32);
        }
    }
}

/// A pseudo-random draw in [0, 1) for the keep-alive jitter, from the shard's LCG `state`
/// (which also numbers assigned client ids).
fn draw(state: &mut u64) -> f64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 33) as f64 / f64::from(1u32 << 31)
}
