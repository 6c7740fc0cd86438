//! Never panic: valid frames of every kind, mangled and random bytes; every outcome is a
//! packet or a typed error.

use super::*;

/// Deterministic xorshift64: the same "random" frames on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Valid frames of every kind, the seeds for mutation.
fn seeds() -> Vec<(Vec<u8>, Version)> {
    let will_props = cat(&[&[0x18, 0, 0, 0, 30, 0x01, 1, 0x09], &s(b"cd")]);
    let props5 = cat(&[
        &[0x11, 0, 0, 0, 9, 0x21, 0, 10],
        &[0x26],
        &s(b"k"),
        &s(b"v"),
    ]);
    let pub_props = cat(&[&[0x01, 1, 0x02, 0, 0, 0, 5, 0x23, 0, 2, 0x08], &s(b"r")]);
    vec![
        (
            connect(
                b"MQTT",
                4,
                0b1110_1110,
                &cat(&[&s(b"id"), &s(b"w"), &s(b"p"), &s(b"u"), &s(b"pw")]),
            ),
            Version::V311,
        ),
        (connect(b"MQIsdp", 3, 2, &s(b"id")), Version::V31),
        (
            connect(
                b"MQTT",
                5,
                0b1100_1110,
                &cat(&[
                    &[props5.len() as u8],
                    &props5,
                    &s(b"id"),
                    &[will_props.len() as u8],
                    &will_props,
                    &s(b"w"),
                    &s(b"p"),
                    &s(b"u"),
                    &s(&[0, 0xFF]),
                ]),
            ),
            Version::V5,
        ),
        (
            frame(0x33, &cat(&[&s(b"a/b"), &[0, 1], b"payload"])),
            Version::V311,
        ),
        (
            frame(
                0x3D,
                &cat(&[
                    &s(b"a/b"),
                    &[1, 2],
                    &[pub_props.len() as u8],
                    &pub_props,
                    b"payload",
                ]),
            ),
            Version::V5,
        ),
        (vec![0x40, 2, 0, 1], Version::V311),
        (
            frame(0x50, &cat(&[&[0, 1, 0x10, 4, 0x1F], &s(b"x")])),
            Version::V5,
        ),
        (vec![0x62, 3, 0, 1, 0x92], Version::V5),
        (
            frame(0x82, &cat(&[&[0, 1], &s(b"a/+"), &[1], &s(b"#"), &[2]])),
            Version::V311,
        ),
        (
            frame(0x82, &cat(&[&[0, 1, 2, 0x0B, 7], &s(b"a/+"), &[0x2D]])),
            Version::V5,
        ),
        (
            frame(0xA2, &cat(&[&[0, 1], &s(b"a"), &s(b"b")])),
            Version::V311,
        ),
        (frame(0xA2, &cat(&[&[0, 1, 0], &s(b"a")])), Version::V5),
        (vec![0xC0, 0], Version::V311),
        (vec![0xE0, 7, 0x04, 5, 0x11, 0, 0, 0, 1], Version::V5),
        (
            frame(0xF0, &cat(&[&[0x18, 8, 0x15], &s(b"SCRAM")])),
            Version::V5,
        ),
    ]
}

/// Re-frames a body mutated in place so its fixed header matches again, so the
/// mutation reaches the packet parsers instead of stopping at the frame check.
fn reframe(f: &[u8]) -> Vec<u8> {
    match fixed_header(f) {
        Ok(Some((len, _))) if len <= f.len() => frame(f[0], &f[len..]),
        _ => f.to_vec(),
    }
}

fn check_outcome(f: &[u8], v: Version) {
    let _ = frame_len(f, 1 << 20);
    match decode(f, v) {
        Ok(Packet::Publish(p)) => {
            assert!(!p.topic.contains(['+', '#', '\0']));
            assert!(p.qos <= 2 && (p.qos == 0) == (p.pkid == 0));
            assert!(!p.topic.is_empty() || p.topic_alias.is_some());
        }
        Ok(Packet::Subscribe { pkid, filters, .. }) => {
            assert!(pkid != 0 && !filters.is_empty());
            assert!(filters.iter().all(|f| f.qos <= 2 && f.retain_handling <= 2));
        }
        Ok(Packet::Unsubscribe { pkid, filters }) => assert!(pkid != 0 && !filters.is_empty()),
        Ok(_) => {}
        Err(e) => {
            assert!(e.reason_code() >= 0x80);
            assert!(!e.to_string().is_empty());
        }
    }
    match decode_connect(f) {
        Ok(c) => {
            assert!(c.receive_maximum != 0 && c.max_packet_size != 0);
            if let Some(w) = c.will {
                assert!(w.qos <= 2 && !w.topic.is_empty() && !w.topic.contains(['+', '#']));
            }
        }
        Err(e) => assert!(e.error.reason_code() >= 0x80),
    }
}

#[test]
fn seeds_are_valid() {
    for (f, v) in seeds() {
        if f[0] >> 4 == 1 {
            decode_connect(&f).unwrap();
        } else {
            decode(&f, v).unwrap();
        }
    }
}

#[test]
fn mangled_frames_never_panic() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let seeds = seeds();
    let mut decoded = 0;
    for round in 0..60_000 {
        let (seed, v) = &seeds[round % seeds.len()];
        let mut f = seed.clone();
        match rng.below(4) {
            // Flip a few bytes anywhere, header included.
            0 => {
                for _ in 0..=rng.below(3) {
                    let i = rng.below(f.len());
                    f[i] ^= 1 << rng.below(8);
                }
            }
            // Overwrite body bytes with anything, then make the header agree.
            1 => {
                for _ in 0..=rng.below(4) {
                    let i = rng.below(f.len());
                    f[i] = rng.next() as u8;
                }
                f = reframe(&f);
            }
            // Truncate, with and without a header that agrees.
            2 => {
                f.truncate(rng.below(f.len() + 1));
                if rng.below(2) == 0 {
                    f = reframe(&f);
                }
            }
            // Insert a random byte somewhere in the body and re-frame.
            _ => {
                let i = 2 + rng.below(f.len() - 1);
                f.insert(i.min(f.len()), rng.next() as u8);
                f = reframe(&f);
            }
        }
        // Every version reads every frame; a 3.1.1 parser must survive v5 bytes too.
        for v in [*v, Version::V311, Version::V5] {
            check_outcome(&f, v);
        }
        decoded += usize::from(decode(&f, *v).is_ok());
    }
    // The mutations must not all be rejected at the door, or they test nothing deep.
    assert!(decoded > 1_000, "only {decoded} mangled frames decoded");
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift(42);
    for _ in 0..20_000 {
        let len = rng.below(40);
        let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 {
            f = reframe(&f);
        }
        for v in [Version::V311, Version::V5] {
            check_outcome(&f, v);
        }
    }
}
