//! The framer: plaintext bytes in, whole MQTT frames out. Pure: no sockets, no buffers of
//! its own, no clock.
//!
//! The shard frames straight from the bytes it just read, so whole frames are never
//! copied; only a trailing partial frame is kept (in the connection's `inbuf`, borrowed
//! from the pool), and it is completed from the next read by [`fill`]. Every frame is
//! checked against the maximum packet size as soon as its fixed header is known.
//!
//! The two steps, [`fill`] for a held partial frame and [`split`] for fresh bytes, are
//! what the read path (`read.rs`) composes with its gate between frames; the tests'
//! `Framer` composes them the same way over an owned buffer, without the gate.

use crate::codec::{self, ProtocolError};

/// A fixed header is at most 5 bytes: the type byte and up to 4 of remaining length.
const MAX_HEADER: usize = 5;

/// What [`fill`] found: append `take` bytes of the new data to the partial frame; then
/// the frame is whole when `complete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Fill {
    pub take: usize,
    pub complete: bool,
}

/// How many bytes of `data` complete the partial frame `partial` (which holds less than
/// one frame). A header still incomplete after `data` takes all of `data`.
pub(super) fn fill(partial: &[u8], data: &[u8], max: usize) -> Result<Fill, ProtocolError> {
    let mut header = [0u8; MAX_HEADER];
    let from_partial = partial.len().min(MAX_HEADER);
    header[..from_partial].copy_from_slice(&partial[..from_partial]);
    let from_data = (MAX_HEADER - from_partial).min(data.len());
    header[from_partial..from_partial + from_data].copy_from_slice(&data[..from_data]);
    match codec::frame_len(&header[..from_partial + from_data], max)? {
        None => Ok(Fill {
            take: data.len(),
            complete: false,
        }),
        Some(len) => {
            let take = (len - partial.len().min(len)).min(data.len());
            Ok(Fill {
                take,
                complete: partial.len() + take >= len,
            })
        }
    }
}

/// What the front of some fresh (non-empty) bytes holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Split {
    /// A whole frame of this many bytes.
    Whole(usize),
    /// Only the start of a frame: keep all of it, in a buffer of at least `want` bytes
    /// (the whole frame's size when its header is known).
    Partial { want: usize },
}

/// Splits the front of `data` (non-empty) into a whole frame or a partial one.
pub(super) fn split(data: &[u8], max: usize) -> Result<Split, ProtocolError> {
    match codec::frame_len(data, max)? {
        Some(len) if len <= data.len() => Ok(Split::Whole(len)),
        known => Ok(Split::Partial {
            want: known.unwrap_or(data.len()).max(data.len()),
        }),
    }
}

/// The two steps composed over an owned partial frame, as the read path composes them
/// (without its gate): the property test's model of a connection's byte stream.
#[cfg(test)]
#[derive(Debug, Default)]
pub(super) struct Framer {
    partial: Vec<u8>,
}

#[cfg(test)]
impl Framer {
    /// Feeds bytes; calls `frame` with each whole frame, in order. On an error the framer
    /// is left as it was when the bad frame began.
    pub(super) fn push(
        &mut self,
        mut data: &[u8],
        max: usize,
        mut frame: impl FnMut(&[u8]),
    ) -> Result<(), ProtocolError> {
        if !self.partial.is_empty() {
            let f = fill(&self.partial, data, max)?;
            self.partial.extend_from_slice(&data[..f.take]);
            data = &data[f.take..];
            if !f.complete {
                return Ok(());
            }
            frame(&self.partial);
            self.partial.clear();
        }
        while !data.is_empty() {
            match split(data, max)? {
                Split::Whole(len) => {
                    frame(&data[..len]);
                    data = &data[len..];
                }
                Split::Partial { .. } => {
                    self.partial.extend_from_slice(data);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Bytes of a frame begun and not yet whole.
    pub(super) fn partial_len(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A frame of packet type `kind` with `body` bytes of payload.
    fn frame(kind: u8, body: usize) -> Vec<u8> {
        let mut f = vec![kind << 4];
        let mut rest = body;
        loop {
            let mut b = (rest % 128) as u8;
            rest /= 128;
            if rest > 0 {
                b |= 0x80;
            }
            f.push(b);
            if rest == 0 {
                break;
            }
        }
        f.extend((0..body).map(|i| i as u8));
        f
    }

    fn frames_of(chunks: &[&[u8]], max: usize) -> Result<(Vec<Vec<u8>>, usize), ProtocolError> {
        let mut framer = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            framer.push(c, max, |f| out.push(f.to_vec()))?;
        }
        Ok((out, framer.partial_len()))
    }

    #[test]
    fn split_finds_whole_and_partial_frames() {
        let f = frame(3, 10);
        assert_eq!(split(&f, 1024), Ok(Split::Whole(12)));
        assert_eq!(split(&f[..5], 1024), Ok(Split::Partial { want: 12 }));
        // Header incomplete: keep what there is.
        assert_eq!(split(&[0x30], 1024), Ok(Split::Partial { want: 1 }));
    }

    #[test]
    fn fill_takes_only_what_completes_the_frame() {
        let f = frame(3, 10);
        let two = [f.clone(), f.clone()].concat();
        assert_eq!(
            fill(&two[..1], &two[1..], 1024),
            Ok(Fill {
                take: 11,
                complete: true
            })
        );
        assert_eq!(
            fill(&two[..4], &two[4..8], 1024),
            Ok(Fill {
                take: 4,
                complete: false
            })
        );
    }

    #[test]
    fn fill_completes_a_header_split_inside_its_length() {
        let f = frame(3, 300); // 2 length bytes
        assert_eq!(
            fill(&f[..2], &f[2..], 1024),
            Ok(Fill {
                take: f.len() - 2,
                complete: true
            })
        );
        // Still no whole header: all of the data is taken.
        assert_eq!(
            fill(&[0x30], &[0x80], 1024),
            Ok(Fill {
                take: 1,
                complete: false
            })
        );
    }

    #[test]
    fn too_large_is_an_error_as_soon_as_the_header_says_so() {
        let f = frame(3, 200);
        assert!(matches!(
            split(&f[..3], 100),
            Err(ProtocolError::PacketTooLarge { .. })
        ));
        assert!(matches!(
            fill(&f[..1], &f[1..3], 100),
            Err(ProtocolError::PacketTooLarge { .. })
        ));
    }

    #[test]
    fn overlong_remaining_length_is_malformed() {
        let bad = [0x30, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert!(frames_of(&[&bad], 1 << 20).is_err());
        assert!(frames_of(&[&bad[..2], &bad[2..]], 1 << 20).is_err());
    }

    #[test]
    fn only_a_trailing_partial_frame_is_kept() {
        let f = frame(12, 0);
        let g = frame(3, 20);
        let bytes = [f.clone(), g.clone()].concat();
        let (out, partial) = frames_of(&[&bytes[..bytes.len() - 3]], 1024).unwrap();
        assert_eq!(out, vec![f]);
        assert_eq!(partial, g.len() - 3);
    }

    proptest! {
        /// A byte stream split at any points yields the same frames as unsplit.
        #[test]
        fn split_points_do_not_change_the_frames(
            sizes in proptest::collection::vec((1u8..15, 0usize..400), 1..12),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let frames: Vec<Vec<u8>> = sizes.iter().map(|&(k, n)| frame(k, n)).collect();
            let stream = frames.concat();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            points.dedup();
            let mut chunks = Vec::new();
            let mut at = 0;
            for p in points {
                chunks.push(&stream[at..p]);
                at = p;
            }
            chunks.push(&stream[at..]);
            let (whole, _) = frames_of(&[&stream], 1 << 20).unwrap();
            let (cut, partial) = frames_of(&chunks, 1 << 20).unwrap();
            prop_assert_eq!(&whole, &frames);
            prop_assert_eq!(cut, whole);
            prop_assert_eq!(partial, 0);
        }
    }
}
