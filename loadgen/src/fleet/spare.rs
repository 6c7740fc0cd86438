//! One spare read buffer per worker thread, lent to the device whose socket became
//! readable and taken back once the device holds no partial packet.
//!
//! A device keeps no buffer while idle (a process holds ~20,000 of them), yet reads at
//! least `READ_CHUNK` at a time when busy; without the spare, a device receiving one
//! message per read would allocate and free a `READ_CHUNK` buffer per message, which in
//! a push run costs the measuring tool more than some of the gateway's own work.

use std::cell::Cell;

use bytes::BytesMut;

thread_local! {
    static SPARE: Cell<Option<BytesMut>> = const { Cell::new(None) };
}

/// A buffer with no content: this thread's spare if it has one, else a new empty one
/// (the read reserves its room).
pub(super) fn lend() -> BytesMut {
    SPARE.with(Cell::take).unwrap_or_default()
}

/// Takes `buf`'s allocation back when it holds nothing, leaving the device without one
/// (kept as this thread's spare unless it already has one); a buffer holding a partial
/// packet stays with its device.
pub(super) fn give_back(buf: &mut BytesMut) {
    if !buf.is_empty() {
        return;
    }
    // Taken even at capacity 0: a buffer whose every byte was split off still holds
    // its allocation until the last piece goes.
    let b = std::mem::take(buf);
    if b.capacity() == 0 {
        return;
    }
    SPARE.with(|s| {
        let kept = s.take().unwrap_or(b);
        s.set(Some(kept));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_buffer_is_lent_again_and_a_partial_one_stays() {
        let mut b = lend();
        b.reserve(16 * 1024);
        let ptr = b.as_ptr();
        give_back(&mut b);
        assert_eq!(
            b.capacity(),
            0,
            "the device holds nothing once it gave it back"
        );
        let again = lend();
        assert_eq!(again.as_ptr(), ptr, "the same allocation comes back");
        assert!(again.capacity() >= 16 * 1024 && again.is_empty());
        let mut partial = again;
        partial.extend_from_slice(b"\x30");
        give_back(&mut partial);
        assert_eq!(
            &partial[..],
            b"\x30",
            "a partial packet stays with its device"
        );
        assert_eq!(lend().capacity(), 0, "no spare left: a new, empty buffer");
    }
}
