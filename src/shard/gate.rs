//! The gate: whether the shard reads a connection now. Pure decisions from the facts the
//! read path gathers (rate debt, watermarks, whether the connection's publishes are
//! paced), so each rule is tested as a table and the read path only acts on the answer.
//!
//! Three moments ask: before a socket read ([`before_read`]), before handling a whole
//! frame just framed ([`before_frame`]), and when a paused connection is looked at again
//! ([`on_recheck`]).

/// What the gate knows about one connection at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Facts {
    /// CONNECT read, authentication answer pending.
    pub authenticating: bool,
    /// CONNACK sent (rate limits apply only then).
    pub active: bool,
    /// Unsent output, against `high_watermark`.
    pub outbound: usize,
    pub high_watermark: usize,
    /// Nanoseconds until the connection is back under its inbound rate (0 = it is).
    pub over_ns: u64,
    /// Whole frames read earlier and held (paused mid-read).
    pub holding: bool,
    /// The held bytes are below the most a paced connection may hold: reading on lets the
    /// acknowledgements behind its held PUBLISH through (`pacing.rs`).
    pub held_room: bool,
    /// Its PUBLISH packets must wait: a subscriber they reach is congested (`pacing.rs`).
    pub paced: bool,
    /// What the connection holds or is about to handle is a PUBLISH.
    pub publish: bool,
}

/// The gate's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Read (or handle the frame).
    Go,
    /// Leave the bytes in the kernel; TCP backpressure stops the peer. Something else
    /// wakes the connection: the authentication answer, or its output draining.
    Wait,
    /// Over its inbound rate: pause reads for this many nanoseconds.
    Pause(u64),
    /// A PUBLISH while it is paced: hold it until the subscribers drain.
    Hold,
}

/// Before reading a connection's socket.
pub(super) fn before_read(f: &Facts) -> Verdict {
    let held_publish = f.paced && f.publish;
    if held_publish && !(f.holding && f.held_room) {
        // The rest of a PUBLISH larger than one read waits too, and so does everything
        // once the held bytes are full.
        return Verdict::Hold;
    }
    if f.authenticating {
        // Read again once accepted.
        return Verdict::Wait;
    }
    if f.outbound >= f.high_watermark {
        // Answers pile up unread (say a PINGREQ flood from a peer that never reads):
        // leave its bytes in the kernel until the output drains below the low watermark.
        return Verdict::Wait;
    }
    if f.active && (f.over_ns > 0 || (f.holding && !held_publish)) {
        return Verdict::Pause(f.over_ns);
    }
    Verdict::Go
}

/// Before handling a whole frame of an active connection, when rate limits or pacing
/// are in force.
pub(super) fn before_frame(f: &Facts) -> Verdict {
    if !f.active {
        return Verdict::Go;
    }
    if f.over_ns > 0 {
        return Verdict::Pause(f.over_ns);
    }
    if f.publish && f.paced {
        return Verdict::Hold;
    }
    Verdict::Go
}

/// When a connection paused for its rate is looked at again: `Go` resumes it.
pub(super) fn on_recheck(f: &Facts) -> Verdict {
    if f.over_ns > 0 {
        return Verdict::Pause(f.over_ns);
    }
    if f.paced && f.publish {
        return Verdict::Hold;
    }
    Verdict::Go
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    fn facts(spec: &str, outbound: usize, over_ns: u64) -> Facts {
        Facts {
            authenticating: spec.contains("auth"),
            active: spec.contains("active"),
            holding: spec.contains("holding"),
            held_room: spec.contains("room"),
            paced: spec.contains("paced"),
            publish: spec.contains("pub"),
            outbound,
            high_watermark: 100,
            over_ns,
        }
    }

    #[test]
    fn before_read_table() {
        let rows: &[(&str, usize, u64, Verdict)] = &[
            ("active", 0, 0, Go),
            ("", 0, 0, Go),
            ("auth", 0, 0, Wait),
            ("active", 100, 0, Wait),
            ("active", 99, 0, Go),
            ("active", 0, 5, Pause(5)),
            ("active holding", 0, 0, Pause(0)),
            // Rate debt before the CONNACK does not pause (it is not charged then).
            ("", 0, 5, Go),
            ("active paced pub", 0, 5, Hold),
            ("auth paced pub", 0, 0, Hold),
            ("active paced", 0, 0, Go),
            ("active pub", 0, 0, Go),
            ("active paced pub", 100, 0, Hold),
            // Held at a PUBLISH with room: read on, the acknowledgements behind it pass.
            ("active paced pub holding room", 0, 0, Go),
            ("active paced pub holding room", 0, 5, Pause(5)),
            ("active paced pub holding room", 100, 0, Wait),
            ("active paced pub holding", 0, 0, Hold),
            // Held for its rate, not paced: resumed when looked at again.
            ("active pub holding room", 0, 0, Pause(0)),
        ];
        for &(spec, out, over, want) in rows {
            assert_eq!(
                before_read(&facts(spec, out, over)),
                want,
                "{spec} {out} {over}"
            );
        }
    }

    #[test]
    fn before_frame_table() {
        let rows: &[(&str, u64, Verdict)] = &[
            ("active", 0, Go),
            ("active pub", 0, Go),
            ("active paced", 0, Go),
            ("active paced pub", 0, Hold),
            ("active", 7, Pause(7)),
            ("active paced pub", 7, Pause(7)),
            ("paced pub", 7, Go),
        ];
        for &(spec, over, want) in rows {
            assert_eq!(before_frame(&facts(spec, 0, over)), want, "{spec} {over}");
        }
    }

    #[test]
    fn on_recheck_table() {
        let rows: &[(&str, u64, Verdict)] = &[
            ("active", 0, Go),
            ("active", 3, Pause(3)),
            ("active paced pub", 0, Hold),
            ("active paced pub", 3, Pause(3)),
            ("active paced", 0, Go),
            ("active pub", 0, Go),
        ];
        for &(spec, over, want) in rows {
            assert_eq!(on_recheck(&facts(spec, 0, over)), want, "{spec} {over}");
        }
    }
}
