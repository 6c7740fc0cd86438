//! The decoder against frames made by an independent client encoder (tungstenite's), and
//! the encoder's frames read back by tungstenite's parser.

use std::io::Cursor;

use proptest::prelude::*;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

use super::*;

const MAX: u32 = 1 << 20;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame as tungstenite writes it: masked with `MASK`.
fn client(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        is_final: fin,
        opcode,
        mask: Some(MASK),
        ..FrameHeader::default()
    };
    let f = Frame::from_payload(header, payload.to_vec().into());
    let mut out = Vec::new();
    f.format(&mut out).unwrap();
    out
}

fn binary(fin: bool, payload: &[u8]) -> Vec<u8> {
    client(OpCode::Data(Data::Binary), fin, payload)
}

fn continuation(fin: bool, payload: &[u8]) -> Vec<u8> {
    client(OpCode::Data(Data::Continue), fin, payload)
}

fn ping(payload: &[u8]) -> Vec<u8> {
    client(OpCode::Control(Control::Ping), true, payload)
}

/// What a connection saw: the plaintext, the replies and how it ended.
#[derive(Debug, Default, PartialEq)]
struct Seen {
    plain: Vec<u8>,
    replies: Vec<u8>,
    end: Option<End>,
}

/// Feeds `chunks` as successive reads, honouring the contract: unconsumed bytes are passed
/// again in front of the next read.
fn feed(dec: &mut Decoder, chunks: &[&[u8]], max: u32) -> Seen {
    let mut seen = Seen::default();
    let mut carry = Vec::new();
    for chunk in chunks {
        let mut buf = std::mem::take(&mut carry);
        buf.extend_from_slice(chunk);
        let d = dec.decode(&mut buf, max, &mut seen.replies);
        assert!(d.plain <= d.used && d.used <= buf.len());
        seen.plain.extend_from_slice(&buf[..d.plain]);
        carry = buf[d.used..].to_vec();
        assert!(
            carry.len() <= MAX_CONTROL_PAYLOAD,
            "kept {} bytes",
            carry.len()
        );
        if d.end.is_some() {
            seen.end = d.end;
        }
    }
    seen
}

fn feed_one(bytes: &[u8]) -> Seen {
    feed(&mut Decoder::default(), &[bytes], MAX)
}

/// The frames in `bytes` (server frames: unmasked), as (opcode, payload).
fn server_frames(bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
    let mut cur = Cursor::new(bytes);
    let mut frames = Vec::new();
    while (cur.position() as usize) < bytes.len() {
        let (header, len) = FrameHeader::parse(&mut cur).unwrap().expect("whole header");
        assert!(header.mask.is_none() && header.is_final);
        let at = cur.position() as usize;
        frames.push((header.opcode, bytes[at..at + len as usize].to_vec()));
        cur.set_position((at + len as usize) as u64);
    }
    frames
}

fn close_code_of(replies: &[u8]) -> Option<u16> {
    match server_frames(replies).last() {
        Some((OpCode::Control(Control::Close), p)) if p.len() >= 2 => {
            Some(u16::from_be_bytes([p[0], p[1]]))
        }
        _ => None,
    }
}

fn refused(bytes: &[u8], max: u32) -> (u16, Seen) {
    let seen = feed(&mut Decoder::default(), &[bytes], max);
    match seen.end {
        Some(End::Refused { code, .. }) => {
            assert_eq!(close_code_of(&seen.replies), Some(code));
            (code, seen)
        }
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn decoder_state_is_a_few_bytes() {
    let size = std::mem::size_of::<Decoder>();
    let optional = std::mem::size_of::<Option<Decoder>>();
    println!("size_of::<ws::Decoder>() = {size}, as an Option in the connection: {optional}");
    assert!(size <= 24, "{size}");
    // The budget: at most 64 bytes more per idle connection than TCP.
    assert!(optional <= 64, "{optional}");
}

#[test]
fn one_frame_with_two_mqtt_packets() {
    let packets = [0xC0, 0x00, 0x30, 0x03, 0x00, 0x01, b't'];
    let seen = feed_one(&binary(true, &packets));
    assert_eq!(seen.plain, packets);
    assert!(seen.replies.is_empty() && seen.end.is_none());
}

#[test]
fn seven_sixteen_and_sixty_four_bit_lengths() {
    for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let seen = feed_one(&binary(true, &payload));
        assert_eq!(seen.plain, payload, "len {len}");
        assert!(seen.end.is_none());
    }
}

#[test]
fn a_packet_split_over_fragments_with_a_ping_between() {
    let mut bytes = binary(false, &[0x30, 0x05, 0x00]);
    bytes.extend(ping(b"hi"));
    bytes.extend(continuation(false, &[0x01, b'a']));
    bytes.extend(continuation(true, b"bc"));
    bytes.extend(binary(true, &[0xC0, 0x00]));
    let seen = feed_one(&bytes);
    assert_eq!(
        seen.plain,
        [0x30, 0x05, 0x00, 0x01, b'a', b'b', b'c', 0xC0, 0x00]
    );
    assert_eq!(
        server_frames(&seen.replies),
        vec![(OpCode::Control(Control::Pong), b"hi".to_vec())]
    );
}

#[test]
fn pongs_are_ignored() {
    let mut bytes = client(OpCode::Control(Control::Pong), true, b"x");
    bytes.extend(binary(true, &[0xC0, 0x00]));
    let seen = feed_one(&bytes);
    assert_eq!(seen.plain, [0xC0, 0x00]);
    assert!(seen.replies.is_empty());
}

#[test]
fn a_ping_split_over_reads_is_kept_and_answered_whole() {
    let bytes = ping(b"0123456789");
    for cut in 0..bytes.len() {
        let mut dec = Decoder::default();
        let seen = feed(&mut dec, &[&bytes[..cut], &bytes[cut..]], MAX);
        assert_eq!(
            server_frames(&seen.replies),
            vec![(OpCode::Control(Control::Pong), b"0123456789".to_vec())],
            "cut at {cut}"
        );
        assert!(dec.is_idle());
    }
}

#[test]
fn close_is_echoed_after_the_data_before_it() {
    let mut bytes = binary(true, &[0xE0, 0x00]);
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    bytes.extend(client(OpCode::Control(Control::Close), true, &close));
    bytes.extend(binary(true, &[0xC0, 0x00])); // after the close: ignored
    let seen = feed_one(&bytes);
    assert_eq!(seen.plain, [0xE0, 0x00]);
    assert_eq!(seen.end, Some(End::Closed { code: Some(1000) }));
    assert_eq!(close_code_of(&seen.replies), Some(1000));

    let seen = feed_one(&client(OpCode::Control(Control::Close), true, &[]));
    assert_eq!(seen.end, Some(End::Closed { code: None }));
    assert_eq!(
        server_frames(&seen.replies),
        vec![(OpCode::Control(Control::Close), vec![])]
    );
}

#[test]
fn nothing_is_decoded_after_the_end() {
    let mut dec = Decoder::default();
    let first = feed(
        &mut dec,
        &[&client(OpCode::Data(Data::Text), true, b"x")],
        MAX,
    );
    assert!(first.end.is_some());
    let again = feed(&mut dec, &[&binary(true, &[0xC0, 0x00])], MAX);
    assert_eq!(again, Seen::default());
}

#[test]
fn protocol_violations_close_with_their_code() {
    let close = |p: &[u8]| client(OpCode::Control(Control::Close), true, p);
    let mut unmasked = Vec::new();
    Frame::message(vec![0xC0, 0x00], OpCode::Data(Data::Binary), true)
        .format(&mut unmasked)
        .unwrap();
    let mut rsv = binary(true, &[0xC0, 0x00]);
    rsv[0] |= 0x40;
    let mut big_ping = ping(&[0; 125]);
    big_ping[1] = 0x80 | 126; // declares a 16-bit length
    let mut high_bit = binary(true, &[]);
    high_bit.splice(1..2, [0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", unmasked, code::PROTOCOL_ERROR),
        (
            "text",
            client(OpCode::Data(Data::Text), true, b"{}"),
            code::UNSUPPORTED_DATA,
        ),
        ("reserved bit", rsv, code::PROTOCOL_ERROR),
        (
            "opcode 3",
            client(OpCode::Data(Data::Reserved(3)), true, b""),
            code::PROTOCOL_ERROR,
        ),
        (
            "opcode 0xB",
            client(OpCode::Control(Control::Reserved(0xB)), true, b""),
            code::PROTOCOL_ERROR,
        ),
        (
            "fragmented ping",
            client(OpCode::Control(Control::Ping), false, b"x"),
            code::PROTOCOL_ERROR,
        ),
        ("ping over 125 bytes", big_ping, code::PROTOCOL_ERROR),
        (
            "continuation first",
            continuation(true, b"x"),
            code::PROTOCOL_ERROR,
        ),
        (
            "binary inside a fragmented message",
            [binary(false, b"x"), binary(true, b"y")].concat(),
            code::PROTOCOL_ERROR,
        ),
        (
            "64-bit length with the high bit",
            high_bit,
            code::PROTOCOL_ERROR,
        ),
        ("close of one byte", close(&[3]), code::PROTOCOL_ERROR),
        (
            "close code 1005",
            close(&1005u16.to_be_bytes()),
            code::PROTOCOL_ERROR,
        ),
        (
            "close code 999",
            close(&999u16.to_be_bytes()),
            code::PROTOCOL_ERROR,
        ),
        (
            "close reason not UTF-8",
            close(&[0x03, 0xE8, 0xFF]),
            code::INVALID_PAYLOAD,
        ),
    ];
    for (name, bytes, want) in cases {
        let (got, _) = refused(&bytes, MAX);
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn an_oversized_frame_is_refused_from_its_header_alone() {
    let frame = binary(true, &[7u8; 1001]);
    // Only the header (2 + 2 length + 4 mask) is fed: the refusal needs nothing more.
    let (code, seen) = refused(&frame[..8], 1000);
    assert_eq!(code, code::TOO_BIG);
    assert!(seen.plain.is_empty());
    // At the limit it is fine.
    let seen = feed(
        &mut Decoder::default(),
        &[&binary(true, &[7u8; 1000])],
        1000,
    );
    assert_eq!((seen.end, seen.plain.len()), (None, 1000));
}

#[test]
fn server_headers_parse_back_with_their_lengths() {
    for len in [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20] {
        let mut out = Vec::new();
        write_binary(&mut out, &vec![9; len]);
        let mut cur = Cursor::new(&out);
        let (h, n) = FrameHeader::parse(&mut cur).unwrap().unwrap();
        assert_eq!(
            (h.opcode, h.is_final, h.mask, n),
            (OpCode::Data(Data::Binary), true, None, len as u64)
        );
        assert_eq!(cur.position() as usize + len, out.len(), "len {len}");
    }
}

#[test]
fn frame_in_place_wraps_what_was_appended() {
    let mut out = b"prev".to_vec();
    out.extend_from_slice(&[0xD0, 0x00, 0x90, 0x03, 0, 1, 0]);
    frame_in_place(&mut out, 4);
    assert_eq!(&out[..4], b"prev");
    assert_eq!(
        server_frames(&out[4..]),
        vec![(
            OpCode::Data(Data::Binary),
            vec![0xD0, 0x00, 0x90, 0x03, 0, 1, 0]
        )]
    );
    let before = out.clone();
    let end = out.len();
    frame_in_place(&mut out, end);
    assert_eq!(out, before);
    let mut close = Vec::new();
    write_close(&mut close, Some(code::TOO_BIG));
    assert_eq!(close_code_of(&close), Some(1009));
}

/// One message of the model stream: its MQTT bytes, in how many frames, and a ping
/// (with this payload) sent after its first frame.
type Message = (Vec<u8>, usize, Option<Vec<u8>>);

fn messages() -> impl Strategy<Value = Vec<Message>> {
    prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..300),
            1usize..4,
            prop::option::of(prop::collection::vec(any::<u8>(), 0..=125)),
        ),
        1..12,
    )
}

/// The client byte stream for `msgs`, and the plaintext and pong payloads it must give.
fn stream(msgs: &[Message]) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
    let (mut wire, mut plain, mut pongs) = (Vec::new(), Vec::new(), Vec::new());
    for (data, frames, ping_payload) in msgs {
        plain.extend_from_slice(data);
        let step = data.len().div_ceil(*frames).max(1);
        let pieces: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(step).collect()
        };
        for (i, piece) in pieces.iter().enumerate() {
            let fin = i + 1 == pieces.len();
            wire.extend(if i == 0 {
                binary(fin, piece)
            } else {
                continuation(fin, piece)
            });
            if let (0, Some(p)) = (i, ping_payload) {
                wire.extend(ping(p));
                pongs.push(p.clone());
            }
        }
    }
    (wire, plain, pongs)
}

/// `bytes` cut at the given points (sorted, deduplicated, clamped).
fn cut<'a>(bytes: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = points.iter().map(|p| p % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut parts = Vec::new();
    let mut from = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        parts.push(&bytes[from..p]);
        from = p;
    }
    parts
}

proptest! {
    /// MQTT bytes framed by a real client encoder (fragmented, pings between), cut into
    /// reads at random points, decode to the same byte stream and the same pongs.
    #[test]
    fn random_streams_cut_anywhere_decode_to_the_same_bytes(
        msgs in messages(),
        points in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let (wire, plain, pongs) = stream(&msgs);
        let mut dec = Decoder::default();
        let seen = feed(&mut dec, &cut(&wire, &points), MAX);
        prop_assert_eq!(seen.end, None);
        prop_assert_eq!(seen.plain, plain);
        let got: Vec<Vec<u8>> = server_frames(&seen.replies).into_iter().map(|(_, p)| p).collect();
        prop_assert_eq!(got, pongs);
        prop_assert!(dec.is_idle());
    }

    /// A frame cut at any two points of its header (7-, 16- and 64-bit lengths) decodes
    /// the same as whole.
    #[test]
    fn split_headers_decode_the_same(
        len in prop_oneof![0usize..=125, 126usize..=300, 65_530usize..=65_540],
        a in 0usize..15,
        b in 0usize..15,
    ) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let frame = binary(true, &payload);
        let seen = feed(&mut Decoder::default(), &cut(&frame, &[a, b]), MAX);
        prop_assert_eq!(seen.end, None);
        prop_assert_eq!(seen.plain, payload);
    }

    /// Arbitrary bytes never panic, never keep more than a control payload, and never
    /// yield more plaintext than they hold.
    #[test]
    fn arbitrary_bytes_are_handled(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        points in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let seen = feed(&mut Decoder::default(), &cut(&bytes, &points), 200);
        prop_assert!(seen.plain.len() <= bytes.len());
    }
}
