//! The negotiation of a CONNECT: what the client asked for, clamped by the shard's
//! settings, gives the connection's terms (keep-alive, session expiry, in-flight window,
//! topic alias maximum) and the CONNACK properties that tell an MQTT 5 client what was
//! changed. Pure: `accept_connect` (in `mqtt/connect.rs`) applies the result.

use crate::codec::{ConnAckProps, Connect, Version};

use super::Settings;

/// The terms a connection runs under, as negotiated from its CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Terms {
    pub version: Version,
    /// Effective keep-alive in seconds: a client asking for none (0) gets the cap, or 0
    /// with `keepalive_zero = "off"`.
    pub keep_alive: u16,
    /// Ticks of silence allowed: 1.5 × keep-alive (`u32::MAX`, none, for keep-alive 0).
    pub idle_ticks: u32,
    /// Session expiry in seconds (MQTT 3.1.1: 0 for a clean session, else the cap).
    pub session_expiry: u32,
    /// Outbound QoS 1/2 window: min(client Receive Maximum, `max_inflight`), at least 1.
    pub window: u16,
    /// Outbound topic aliases we may use (MQTT 5 only).
    pub alias_max: u16,
    /// The client's Maximum Packet Size.
    pub max_packet: u32,
    /// The keep-alive the client asked for, and the expiry (for the CONNACK).
    requested_keep_alive: u16,
    requested_expiry: u32,
}

/// Negotiates `c` against `s`. `draw` gives a number in [0, 1) to pick the keep-alive
/// jitter; it is called only when there is one (MQTT 5 with `keepalive_jitter_pct`).
pub(super) fn negotiate(c: &Connect, s: &Settings, draw: impl FnOnce() -> f64) -> Terms {
    let v5 = c.version == Version::V5;
    let session_expiry = match c.version {
        Version::V5 => c.session_expiry.min(s.max_session_expiry_secs),
        _ if c.clean_start => 0,
        _ => s.max_session_expiry_secs,
    };
    let cap = s.max_keepalive_secs;
    let mut keep_alive = s.keepalive_zero.granted(c.keep_alive, cap);
    if v5 && s.keepalive_jitter_pct > 0 && keep_alive != 0 {
        keep_alive = jitter(keep_alive, s.keepalive_jitter_pct, cap, draw());
    }
    let idle_ticks = match keep_alive {
        0 => u32::MAX,
        ka => s.ticks(f64::from(ka) * 1.5),
    };
    Terms {
        version: c.version,
        keep_alive,
        idle_ticks,
        session_expiry,
        window: c.receive_maximum.min(s.max_inflight).max(1),
        alias_max: if v5 {
            c.topic_alias_max.min(s.outbound_topic_aliases)
        } else {
            0
        },
        max_packet: c.max_packet_size,
        requested_keep_alive: c.keep_alive,
        requested_expiry: c.session_expiry,
    }
}

/// Spreads a keep-alive by up to ±`pct` % (`draw` in [0, 1)), within 1..=`cap`, so
/// reconnect herds drift apart.
fn jitter(ka: u16, pct: u8, cap: u16, draw: f64) -> u16 {
    let pct = f64::from(pct) / 100.0;
    let k = f64::from(ka) * (1.0 + pct * (2.0 * draw - 1.0));
    (k.round() as u32).clamp(1, u32::from(cap)) as u16
}

impl Terms {
    /// The CONNACK properties: the server's limits, and what was changed from the
    /// client's asks (MQTT 5 only). `assigned` is a client id the server chose.
    pub(super) fn connack_props<'a>(
        &self,
        s: &Settings,
        assigned: Option<&'a str>,
    ) -> ConnAckProps<'a> {
        let v5 = self.version == Version::V5;
        ConnAckProps {
            assigned_client_id: assigned,
            server_keep_alive: (v5 && self.keep_alive != self.requested_keep_alive)
                .then_some(self.keep_alive),
            session_expiry: (v5 && self.session_expiry != self.requested_expiry)
                .then_some(self.session_expiry),
            receive_maximum: s.receive_maximum,
            max_packet_size: s.max_packet_size as u32,
            topic_alias_max: s.topic_alias_maximum,
            retain_available: s.retain_available,
            wildcard_available: true,
            subscription_ids_available: true,
            shared_subscriptions_available: true,
            ..ConnAckProps::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn settings(jitter_pct: u8) -> Settings {
        let mut s = Settings::from_config(&Config::default());
        s.max_keepalive_secs = 600;
        s.max_session_expiry_secs = 3600;
        s.max_inflight = 32;
        s.outbound_topic_aliases = 10;
        s.keepalive_jitter_pct = jitter_pct;
        s.tick = std::time::Duration::from_millis(100);
        s
    }

    fn connect(version: Version, clean: bool, ka: u16, expiry: u32, recv_max: u16) -> Connect {
        Connect {
            version,
            client_id: "c".into(),
            clean_start: clean,
            keep_alive: ka,
            username: None,
            password: None,
            will: None,
            session_expiry: expiry,
            receive_maximum: recv_max,
            max_packet_size: u32::MAX,
            topic_alias_max: 50,
            request_problem_info: true,
            auth_method: None,
            user_properties: Vec::new(),
        }
    }

    use Version::{V311, V5};

    #[test]
    fn negotiation_table() {
        // (version, clean, keep-alive asked, expiry asked, receive max)
        //   → (keep-alive, expiry, window, alias max, CONNACK keep-alive, CONNACK expiry)
        type Row = (
            Version,
            bool,
            u16,
            u32,
            u16,
            (u16, u32, u16, u16, Option<u16>, Option<u32>),
        );
        let rows: &[Row] = &[
            (V311, true, 60, 0, 65535, (60, 0, 32, 0, None, None)),
            // 3.1.1 persistent session: expiry is the cap.
            (V311, false, 60, 0, 65535, (60, 3600, 32, 0, None, None)),
            // Keep-alive 0 (none) and above the cap: the cap.
            (V311, true, 0, 0, 65535, (600, 0, 32, 0, None, None)),
            (V311, true, 601, 0, 65535, (600, 0, 32, 0, None, None)),
            (V5, true, 60, 0, 65535, (60, 0, 32, 10, None, None)),
            (V5, true, 0, 0, 65535, (600, 0, 32, 10, Some(600), None)),
            (V5, true, 700, 0, 65535, (600, 0, 32, 10, Some(600), None)),
            // Expiry clamped, and said so.
            (
                V5,
                false,
                60,
                7200,
                65535,
                (60, 3600, 32, 10, None, Some(3600)),
            ),
            (V5, false, 60, 100, 65535, (60, 100, 32, 10, None, None)),
            (
                V5,
                false,
                60,
                u32::MAX,
                65535,
                (60, 3600, 32, 10, None, Some(3600)),
            ),
            // The window is the smaller of the client's receive maximum and ours.
            (V5, true, 60, 0, 5, (60, 0, 5, 10, None, None)),
            (V5, true, 60, 0, 1, (60, 0, 1, 10, None, None)),
        ];
        let s = settings(0);
        for (i, &(v, clean, ka, exp, rm, want)) in rows.iter().enumerate() {
            let t = negotiate(&connect(v, clean, ka, exp, rm), &s, || 0.5);
            let p = t.connack_props(&s, None);
            let got = (
                t.keep_alive,
                t.session_expiry,
                t.window,
                t.alias_max,
                p.server_keep_alive,
                p.session_expiry,
            );
            assert_eq!(got, want, "row {i}");
            assert_eq!(t.idle_ticks, u32::from(t.keep_alive) * 15, "row {i}");
        }
    }

    #[test]
    fn keepalive_zero_off_grants_no_keep_alive_and_no_idle_deadline() {
        let mut s = settings(10);
        s.keepalive_zero = crate::config::KeepaliveZero::Off;
        for v in [V311, V5] {
            let t = negotiate(&connect(v, true, 0, 0, 10), &s, || 0.9);
            assert_eq!((t.keep_alive, t.idle_ticks), (0, u32::MAX), "{v:?}");
            assert_eq!(t.connack_props(&s, None).server_keep_alive, None);
        }
        // A non-zero request is still capped and jittered as usual.
        let t = negotiate(&connect(V311, true, 700, 0, 10), &s, || 0.9);
        assert_eq!(t.keep_alive, 600);
    }

    #[test]
    fn window_is_never_zero() {
        let mut s = settings(0);
        s.max_inflight = 0;
        assert_eq!(
            negotiate(&connect(V5, true, 60, 0, 10), &s, || 0.0).window,
            1
        );
    }

    #[test]
    fn jitter_stays_within_its_percentage_and_the_cap_and_is_said() {
        let s = settings(10);
        for (draw, want) in [(0.0, 54), (0.5, 60), (0.999_999, 66)] {
            let t = negotiate(&connect(V5, true, 60, 0, 10), &s, || draw);
            assert_eq!(t.keep_alive, want, "draw {draw}");
            let said = t.connack_props(&s, None).server_keep_alive;
            assert_eq!(said, (want != 60).then_some(want));
        }
        // Never above the cap, never 0.
        let t = negotiate(&connect(V5, true, 600, 0, 10), &s, || 0.999);
        assert_eq!(t.keep_alive, 600);
        let t = negotiate(&connect(V5, true, 1, 0, 10), &s, || 0.0);
        assert_eq!(t.keep_alive, 1);
        // MQTT 3.1.1 gets no jitter (it could not be told).
        let t = negotiate(&connect(V311, true, 60, 0, 10), &s, || 0.0);
        assert_eq!(t.keep_alive, 60);
    }

    #[test]
    fn connack_props_carry_the_server_limits_and_an_assigned_id() {
        let s = settings(0);
        let t = negotiate(&connect(V5, true, 60, 0, 10), &s, || 0.5);
        let p = t.connack_props(&s, Some("auto-1"));
        assert_eq!(p.assigned_client_id, Some("auto-1"));
        assert_eq!(p.receive_maximum, s.receive_maximum);
        assert_eq!(p.max_packet_size, s.max_packet_size as u32);
        assert_eq!(p.topic_alias_max, s.topic_alias_maximum);
        assert_eq!(p.retain_available, s.retain_available);
    }
}
