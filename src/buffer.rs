//! Per-shard IO buffers: a size-classed `BufferPool` and a one-byte `ReadSizePredictor`.
//!
//! A million idle connections must cost almost nothing, so an idle connection holds no
//! buffer at all. Reads land in the shard's scratch buffer; a connection borrows a buffer
//! from its shard's pool only while it has a partial inbound frame or unsent outbound
//! bytes, and gives it back as soon as that is over. (The field report this answers: fixed
//! 10 KB receive buffers per connection wasted about 4.8 GB at 1M connections.)
//!
//! The pool keeps power-of-two size classes from `MIN_CLASS` to `MAX_CLASS`, each a LIFO
//! free list that remembers the tick every buffer came back. Reuse takes the most recently
//! returned (warm in cache); `shrink`, called once per shard tick, frees from the other end
//! whatever has sat idle too long, so the pool gives memory back after a burst instead of
//! holding its high-water mark forever. A byte cap bounds what the pool may keep.
//!
//! Each shard owns its pool outright: no locks, no atomics, and `BufferPool` is not `Sync`
//! by design.
//!
//! `ReadSizePredictor` picks the size of the next inbound buffer from what recent reads
//! returned, following Netty's `AdaptiveRecvByteBufAllocator`: grow fast when a read fills
//! the offer, shrink one step only after two small reads in a row. Its whole state is one
//! byte, because it lives in every connection.

use std::collections::VecDeque;
use std::fmt;

/// Smallest size class, in bytes. Smaller requests are rounded up to it.
pub const MIN_CLASS: usize = 256;
/// Largest size class, in bytes. Larger requests are allocated exactly and never pooled.
pub const MAX_CLASS: usize = 64 * 1024;

/// Number of size classes: 256, 512, 1 Ki, 2 Ki, 4 Ki, 8 Ki, 16 Ki, 32 Ki, 64 Ki.
const CLASS_COUNT: usize = (MAX_CLASS.trailing_zeros() - MIN_CLASS.trailing_zeros() + 1) as usize;

const _: () = assert!(MIN_CLASS.is_power_of_two() && MAX_CLASS.is_power_of_two());
const _: () = assert!(MIN_CLASS <= MAX_CLASS);

/// Capacity in bytes of the buffers in class `class`.
const fn class_size(class: usize) -> usize {
    MIN_CLASS << class
}

/// The class a request for `min_capacity` bytes is served from, or `None` above `MAX_CLASS`.
fn class_for_request(min_capacity: usize) -> Option<usize> {
    if min_capacity > MAX_CLASS {
        return None;
    }
    let size = min_capacity.max(MIN_CLASS).next_power_of_two();
    Some((size.trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize)
}

/// The class a buffer of exactly `capacity` bytes belongs to, or `None` if that is not a
/// class size (such a buffer is never pooled).
fn class_of_capacity(capacity: usize) -> Option<usize> {
    if capacity.is_power_of_two() && (MIN_CLASS..=MAX_CLASS).contains(&capacity) {
        Some((capacity.trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize)
    } else {
        None
    }
}

/// Limits for one shard's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most bytes (sum of capacities) the pool keeps on its free lists. Returns that would
    /// exceed it are freed at once.
    pub max_pooled_bytes: usize,
    /// A pooled buffer unused for more than this many ticks is freed by `shrink`.
    pub idle_ticks: u64,
}

impl Default for PoolConfig {
    /// 32 MiB kept per shard, buffers freed after 30 idle ticks (30 s at a 1 s tick).
    fn default() -> Self {
        PoolConfig {
            max_pooled_bytes: 32 * 1024 * 1024,
            idle_ticks: 30,
        }
    }
}

/// A snapshot of a pool's accounting, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Sum of the capacities of the buffers kept on the free lists.
    pub pooled_bytes: usize,
    /// Sum of the capacities of the buffers out on loan.
    pub lent_bytes: usize,
    /// `take`s served from a free list.
    pub hits: u64,
    /// `take`s that had to allocate.
    pub misses: u64,
    /// Buffers the pool deallocated: over the cap, not a class size, or idle too long.
    pub freed: u64,
}

/// A buffer on a free list, with the tick it was returned.
struct FreeBuffer {
    buf: Vec<u8>,
    returned_at: u64,
}

/// One shard's pool of IO buffers. See the module docs.
///
/// Callers must not let a lent `Vec` reallocate by itself (no `push` past capacity): grow
/// it with [`BufferPool::reserve`] so that `lent_bytes` stays exact.
///
/// Foreign buffers (not taken from this pool) may be given back. One with capacity 0 is
/// simply dropped. Any other is treated as if it had been lent: `lent_bytes` is reduced by
/// its capacity, saturating at zero, and it is then pooled or freed like any returned
/// buffer. Stats never underflow, but `lent_bytes` then under-reports what is still out.
pub struct BufferPool {
    cfg: PoolConfig,
    /// One free list per class. Back = most recently returned, front = oldest; the
    /// `returned_at` ticks never decrease from front to back.
    free: [VecDeque<FreeBuffer>; CLASS_COUNT],
    stats: PoolStats,
}

impl BufferPool {
    /// An empty pool; it allocates nothing until the first `take`.
    pub fn new(cfg: PoolConfig) -> Self {
        BufferPool {
            cfg,
            free: std::array::from_fn(|_| VecDeque::new()),
            stats: PoolStats::default(),
        }
    }

    /// An empty Vec with capacity >= `min_capacity`, rounded up to a size class. Larger than
    /// `MAX_CLASS`: allocated exactly (not pooled, still counted as lent). Hit = reused from
    /// the pool.
    ///
    /// # Panics
    ///
    /// Like `Vec::with_capacity`, if `min_capacity` exceeds `isize::MAX`. Callers bound
    /// frame sizes (maximum packet size) far below that before asking.
    pub fn take(&mut self, min_capacity: usize) -> Vec<u8> {
        let buf = match class_for_request(min_capacity) {
            Some(class) => match self.free[class].pop_back() {
                Some(free) => {
                    self.stats.hits += 1;
                    self.stats.pooled_bytes -= free.buf.capacity();
                    free.buf
                }
                None => {
                    self.stats.misses += 1;
                    Vec::with_capacity(class_size(class))
                }
            },
            None => {
                self.stats.misses += 1;
                Vec::with_capacity(min_capacity)
            }
        };
        self.stats.lent_bytes = self.stats.lent_bytes.saturating_add(buf.capacity());
        buf
    }

    /// Returns a buffer; it is cleared and kept if its capacity is exactly a class size and
    /// the pool stays within `max_pooled_bytes`, else freed. `now` is the current tick (for
    /// idle aging); a `now` earlier than the newest return in its class counts as that
    /// return's tick, so each free list stays ordered by age.
    pub fn give(&mut self, mut buf: Vec<u8>, now: u64) {
        let capacity = buf.capacity();
        if capacity == 0 {
            return;
        }
        self.stats.lent_bytes = self.stats.lent_bytes.saturating_sub(capacity);
        let room = self
            .cfg
            .max_pooled_bytes
            .saturating_sub(self.stats.pooled_bytes);
        match class_of_capacity(capacity) {
            Some(class) if capacity <= room => {
                buf.clear();
                let list = &mut self.free[class];
                let returned_at = list
                    .back()
                    .map_or(now, |newest| newest.returned_at.max(now));
                list.push_back(FreeBuffer { buf, returned_at });
                self.stats.pooled_bytes += capacity;
            }
            _ => self.stats.freed += 1,
        }
    }

    /// Grows a lent buffer so that `additional` more bytes fit, moving its contents into a
    /// buffer of a larger class (the old one goes back to the pool). Callers never let a lent
    /// Vec reallocate by itself, so lent accounting stays exact.
    ///
    /// The new capacity is at least double the old one, so growing past `MAX_CLASS` a few
    /// bytes at a time still copies in amortised linear time. `buf` may be an empty
    /// `Vec::new()`: then this is a `take`.
    ///
    /// # Panics
    ///
    /// As [`BufferPool::take`], if the needed capacity exceeds `isize::MAX`.
    pub fn reserve(&mut self, buf: &mut Vec<u8>, additional: usize, now: u64) {
        if buf.capacity() - buf.len() >= additional {
            return;
        }
        let needed = buf.len().saturating_add(additional);
        let target = needed.max(buf.capacity().saturating_mul(2));
        let mut bigger = self.take(target);
        bigger.extend_from_slice(buf);
        let old = std::mem::replace(buf, bigger);
        self.give(old, now);
    }

    /// Frees pooled buffers idle for more than `idle_ticks` (and any excess over the cap,
    /// which only a lowered cap via `set_config` can leave, oldest first). Called once per
    /// shard tick; costs O(buffers freed + classes) (the rare cap trim looks at the front
    /// of each of the nine classes per buffer it frees).
    pub fn shrink(&mut self, now: u64) {
        let idle_ticks = self.cfg.idle_ticks;
        for class in 0..CLASS_COUNT {
            while let Some(oldest) = self.free[class].front() {
                if now.saturating_sub(oldest.returned_at) <= idle_ticks {
                    break;
                }
                self.free_oldest(class);
            }
        }
        while self.stats.pooled_bytes > self.cfg.max_pooled_bytes {
            let oldest_class = (0..CLASS_COUNT)
                .filter_map(|class| Some((self.free[class].front()?.returned_at, class)))
                .min();
            match oldest_class {
                Some((_, class)) => self.free_oldest(class),
                None => break,
            }
        }
    }

    /// Replaces the limits (e.g. on config reload). A lower cap is enforced at the next
    /// `shrink`; returns already respect it.
    pub fn set_config(&mut self, cfg: PoolConfig) {
        self.cfg = cfg;
    }

    /// The current accounting.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Frees the oldest buffer of `class`, if any.
    fn free_oldest(&mut self, class: usize) {
        if let Some(oldest) = self.free[class].pop_front() {
            self.stats.pooled_bytes -= oldest.buf.capacity();
            self.stats.freed += 1;
        }
    }
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pooled_per_class: Vec<usize> = self.free.iter().map(VecDeque::len).collect();
        f.debug_struct("BufferPool")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats)
            .field("pooled_per_class", &pooled_per_class)
            .finish()
    }
}

/// Number of entries in `READ_SIZES`: four steps per doubling from 64 B to 64 KiB.
const READ_SIZE_COUNT: usize = 41;

/// The sizes a `ReadSizePredictor` can offer: 64, 80, 96, 112, 128, 160, ... 57344, 65536.
/// Quarter-octave steps make a single step down a gentle (at most 20 %) shrink, while
/// `INDEX_INCREMENT` steps up double the offer.
const READ_SIZES: [usize; READ_SIZE_COUNT] = read_size_table();

const fn read_size_table() -> [usize; READ_SIZE_COUNT] {
    let mut table = [0; READ_SIZE_COUNT];
    let mut i = 0;
    while i < READ_SIZE_COUNT - 1 {
        let base = 64 << (i / 4);
        table[i] = base + base * (i % 4) / 4;
        i += 1;
    }
    table[READ_SIZE_COUNT - 1] = 64 << ((READ_SIZE_COUNT - 1) / 4);
    table
}

/// Index of 512 B, where every connection starts.
const INITIAL_INDEX: u8 = 12;
/// Steps up after a read that filled the offer (Netty's INDEX_INCREMENT).
const INDEX_INCREMENT: u8 = 4;
/// Steps down after two small reads in a row (Netty's INDEX_DECREMENT).
const INDEX_DECREMENT: u8 = 1;
/// Largest valid index.
const MAX_INDEX: u8 = (READ_SIZE_COUNT - 1) as u8;
/// Low seven bits: index into `READ_SIZES`.
const INDEX_MASK: u8 = 0x7f;
/// High bit: the last read was small; one more small read shrinks the offer.
const DECREASE_PENDING: u8 = 0x80;

const _: () = assert!(READ_SIZE_COUNT <= INDEX_MASK as usize + 1);
const _: () = assert!(READ_SIZES[0] == 64 && READ_SIZES[READ_SIZE_COUNT - 1] == 64 * 1024);
const _: () = assert!(READ_SIZES[INITIAL_INDEX as usize] == 512);

/// Predicts how large the next inbound buffer should be, from the sizes of recent reads
/// (Netty's `AdaptiveRecvByteBufAllocator` rule). One byte: seven bits of index into a
/// table of sizes from 64 B to 64 KiB, one bit "decrease pending".
///
/// - A read that fills the offered size jumps `INDEX_INCREMENT` (4) steps up, doubling it.
/// - A read smaller than the size one step below the offer shrinks it one step, but only on
///   the second such read in a row; a read in between (or a growing one) breaks the run.
/// - The offer never leaves the table.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReadSizePredictor(u8);

impl ReadSizePredictor {
    /// Smallest size ever offered, in bytes.
    pub const MIN_SIZE: usize = READ_SIZES[0];
    /// Largest size ever offered, in bytes.
    pub const MAX_SIZE: usize = READ_SIZES[READ_SIZE_COUNT - 1];
    /// Size offered before any read has been recorded, in bytes.
    pub const INITIAL_SIZE: usize = READ_SIZES[INITIAL_INDEX as usize];

    /// A predictor offering `INITIAL_SIZE` (512 B).
    pub fn new() -> Self {
        ReadSizePredictor(INITIAL_INDEX)
    }

    /// The size in bytes to offer the next read.
    pub fn next_size(self) -> usize {
        READ_SIZES[usize::from(self.index())]
    }

    /// Feeds back how many bytes the last read returned.
    pub fn record(&mut self, bytes_read: usize) {
        let index = self.index();
        let one_step_down = READ_SIZES[usize::from(index.saturating_sub(INDEX_DECREMENT))];
        if bytes_read >= READ_SIZES[usize::from(index)] {
            self.0 = index.saturating_add(INDEX_INCREMENT).min(MAX_INDEX);
        } else if bytes_read < one_step_down {
            if self.0 & DECREASE_PENDING != 0 {
                self.0 = index.saturating_sub(INDEX_DECREMENT);
            } else {
                self.0 |= DECREASE_PENDING;
            }
        } else {
            self.0 = index;
        }
    }

    /// The table index, clamped so that no bit pattern can index out of bounds.
    fn index(self) -> u8 {
        (self.0 & INDEX_MASK).min(MAX_INDEX)
    }
}

impl Default for ReadSizePredictor {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ReadSizePredictor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadSizePredictor")
            .field("next_size", &self.next_size())
            .field("decrease_pending", &(self.0 & DECREASE_PENDING != 0))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const ALL_CLASSES: [usize; CLASS_COUNT] = [
        256,
        512,
        1024,
        2048,
        4096,
        8192,
        16 * 1024,
        32 * 1024,
        64 * 1024,
    ];

    fn pool(max_pooled_bytes: usize, idle_ticks: u64) -> BufferPool {
        BufferPool::new(PoolConfig {
            max_pooled_bytes,
            idle_ticks,
        })
    }

    #[test]
    fn requests_round_up_to_power_of_two_classes() {
        assert_eq!(CLASS_COUNT, ALL_CLASSES.len());
        for (class, &size) in ALL_CLASSES.iter().enumerate() {
            assert_eq!(class_size(class), size);
            assert_eq!(class_for_request(size), Some(class));
            assert_eq!(class_of_capacity(size), Some(class));
        }
        assert_eq!(class_for_request(0), Some(0));
        assert_eq!(class_for_request(1), Some(0));
        assert_eq!(class_for_request(257), Some(1));
        assert_eq!(class_for_request(4097), Some(5));
        assert_eq!(class_for_request(MAX_CLASS + 1), None);
        assert_eq!(class_for_request(usize::MAX), None);
        assert_eq!(class_of_capacity(128), None);
        assert_eq!(class_of_capacity(300), None);
        assert_eq!(class_of_capacity(2 * MAX_CLASS), None);

        let mut p = pool(1 << 20, 10);
        let small = p.take(0);
        assert_eq!(small.capacity(), MIN_CLASS);
        assert!(small.is_empty());
        assert_eq!(p.take(1000).capacity(), 1024);
        assert_eq!(p.take(MAX_CLASS).capacity(), MAX_CLASS);
        let big = p.take(70_000);
        assert!(big.capacity() >= 70_000 && big.capacity() < 2 * MAX_CLASS);
        assert_eq!(
            p.stats().lent_bytes,
            MIN_CLASS + 1024 + MAX_CLASS + big.capacity()
        );
    }

    #[test]
    fn reuse_counts_hits_and_misses() {
        let mut p = pool(1 << 20, 10);
        let a = p.take(300);
        let a_ptr = a.as_ptr();
        assert_eq!(p.stats().misses, 1);
        p.give(a, 0);
        assert_eq!(p.stats().pooled_bytes, 512);
        assert_eq!(p.stats().lent_bytes, 0);

        let again = p.take(400);
        assert_eq!(again.as_ptr(), a_ptr, "same class reuses the pooled buffer");
        let other = p.take(300);
        assert_ne!(other.as_ptr(), a_ptr);
        let different_class = p.take(2000);
        assert_eq!(
            p.stats(),
            PoolStats {
                pooled_bytes: 0,
                lent_bytes: 512 + 512 + 2048,
                hits: 1,
                misses: 3,
                freed: 0,
            }
        );
        drop((again, other, different_class));
    }

    #[test]
    fn free_lists_are_lifo_and_returned_buffers_are_cleared() {
        let mut p = pool(1 << 20, 10);
        let mut first = p.take(256);
        let second = p.take(256);
        first.extend_from_slice(b"leftover");
        let (first_ptr, second_ptr) = (first.as_ptr(), second.as_ptr());
        p.give(first, 0);
        p.give(second, 1);
        let newest = p.take(100);
        assert_eq!(newest.as_ptr(), second_ptr);
        let oldest = p.take(100);
        assert_eq!(oldest.as_ptr(), first_ptr);
        assert!(oldest.is_empty(), "a pooled buffer comes back cleared");
    }

    #[test]
    fn cap_bounds_pooled_bytes() {
        let mut p = pool(1024, 10);
        let bufs = [p.take(512), p.take(512), p.take(256)];
        for buf in bufs {
            p.give(buf, 0);
        }
        let stats = p.stats();
        assert_eq!(stats.pooled_bytes, 1024);
        assert_eq!(stats.freed, 1);
        assert_eq!(stats.lent_bytes, 0);

        let mut none = pool(0, 10);
        let buf = none.take(256);
        none.give(buf, 0);
        assert_eq!(none.stats().pooled_bytes, 0);
        assert_eq!(none.stats().freed, 1);
    }

    #[test]
    fn oversized_buffers_are_lent_but_never_pooled() {
        let mut p = pool(1 << 20, 10);
        let big = p.take(100_000);
        assert!(big.capacity() >= 100_000);
        assert_eq!(p.stats().lent_bytes, big.capacity());
        assert_eq!(p.stats().misses, 1);
        p.give(big, 0);
        assert_eq!(
            p.stats(),
            PoolStats {
                pooled_bytes: 0,
                lent_bytes: 0,
                hits: 0,
                misses: 1,
                freed: 1,
            }
        );
    }

    #[test]
    fn foreign_buffers_never_underflow_stats() {
        let mut p = pool(1 << 20, 10);
        p.give(Vec::new(), 0);
        assert_eq!(
            p.stats(),
            PoolStats::default(),
            "capacity 0 is just dropped"
        );

        // Not a class size: freed; lent saturates at zero.
        p.give(Vec::with_capacity(300), 0);
        assert_eq!(p.stats().lent_bytes, 0);
        assert_eq!(p.stats().pooled_bytes, 0);
        assert_eq!(p.stats().freed, 1);

        // A class size: adopted as if it had been lent.
        let lent = p.take(1024);
        let mut foreign = Vec::with_capacity(512);
        foreign.extend_from_slice(b"not ours");
        assert_eq!(foreign.capacity(), 512);
        p.give(foreign, 0);
        assert_eq!(p.stats().lent_bytes, 1024 - 512);
        assert_eq!(p.stats().pooled_bytes, 512);
        let adopted = p.take(512);
        assert!(adopted.is_empty());
        assert_eq!(p.stats().hits, 1);
        p.give(adopted, 0);
        p.give(lent, 0);
        p.give(Vec::with_capacity(4096), 0);
        assert_eq!(p.stats().lent_bytes, 0, "saturates instead of underflowing");
    }

    #[test]
    fn reserve_moves_contents_to_a_larger_class() {
        let mut p = pool(1 << 20, 10);
        let mut buf = p.take(256);
        let old_ptr = buf.as_ptr();
        buf.extend_from_slice(&[7; 200]);

        p.reserve(&mut buf, 50, 0);
        assert_eq!(buf.as_ptr(), old_ptr, "enough room: nothing moves");
        assert_eq!(buf.capacity(), 256);

        p.reserve(&mut buf, 1000, 3);
        assert_eq!(buf.capacity(), 2048);
        assert_eq!(buf, vec![7; 200]);
        let stats = p.stats();
        assert_eq!(stats.lent_bytes, 2048);
        assert_eq!(
            stats.pooled_bytes, 256,
            "the old buffer went back to the pool"
        );
        let reused = p.take(10);
        assert_eq!(reused.as_ptr(), old_ptr);
    }

    #[test]
    fn reserve_on_an_empty_vec_takes_and_past_max_class_doubles() {
        let mut p = pool(1 << 20, 10);
        let mut buf = Vec::new();
        p.reserve(&mut buf, 3000, 0);
        assert_eq!(buf.capacity(), 4096);
        assert_eq!(p.stats().lent_bytes, 4096);

        let mut big = p.take(MAX_CLASS);
        big.resize(MAX_CLASS, 1);
        p.reserve(&mut big, 1, 0);
        assert!(big.capacity() >= 2 * MAX_CLASS);
        assert_eq!(big.len(), MAX_CLASS);
        assert!(big.iter().all(|&b| b == 1));
        assert_eq!(p.stats().lent_bytes, 4096 + big.capacity());
        assert_eq!(p.stats().pooled_bytes, MAX_CLASS);
    }

    #[test]
    fn shrink_frees_only_buffers_idle_too_long() {
        let mut p = pool(1 << 20, 3);
        let bufs = [p.take(256), p.take(256), p.take(4096)];
        let [a, b, c] = bufs;
        p.give(a, 0);
        p.give(b, 5);
        p.give(c, 2);

        p.shrink(3);
        assert_eq!(p.stats().freed, 0, "idle exactly idle_ticks is kept");
        p.shrink(4);
        assert_eq!(p.stats().freed, 1);
        assert_eq!(p.stats().pooled_bytes, 256 + 4096);
        p.shrink(6);
        assert_eq!(p.stats().pooled_bytes, 256);
        p.shrink(9);
        assert_eq!(p.stats().pooled_bytes, 0);
        assert_eq!(p.stats().freed, 3);
    }

    #[test]
    fn shrink_keeps_recently_reused_buffers() {
        let mut p = pool(1 << 20, 3);
        let a = p.take(256);
        let b = p.take(256);
        let b_ptr = b.as_ptr();
        p.give(a, 0);
        p.give(b, 0);
        // Busy again at tick 10: the warm buffer is reused and returned.
        let warm = p.take(256);
        assert_eq!(warm.as_ptr(), b_ptr);
        p.give(warm, 10);
        p.shrink(10);
        assert_eq!(p.stats().pooled_bytes, 256);
        let kept = p.take(256);
        assert_eq!(
            kept.as_ptr(),
            b_ptr,
            "the warm one stayed, the idle one was freed"
        );
    }

    #[test]
    fn an_earlier_now_keeps_free_lists_ordered() {
        let mut p = pool(1 << 20, 3);
        let a = p.take(256);
        let b = p.take(256);
        p.give(a, 10);
        p.give(b, 5);
        p.shrink(13);
        assert_eq!(p.stats().pooled_bytes, 512);
        p.shrink(14);
        assert_eq!(p.stats().pooled_bytes, 0);
    }

    #[test]
    fn shrink_trims_a_lowered_cap_oldest_first() {
        let mut p = pool(1 << 20, 100);
        let bufs = [p.take(1024), p.take(256), p.take(256)];
        let keep_ptr = bufs[2].as_ptr();
        for (tick, buf) in (0..).zip(bufs) {
            p.give(buf, tick);
        }
        p.set_config(PoolConfig {
            max_pooled_bytes: 300,
            idle_ticks: 100,
        });
        p.shrink(3);
        assert_eq!(p.stats().pooled_bytes, 256);
        assert_eq!(p.stats().freed, 2);
        let kept = p.take(256);
        assert_eq!(kept.as_ptr(), keep_ptr);
    }

    #[test]
    fn predictor_is_one_byte_and_starts_small() {
        assert_eq!(std::mem::size_of::<ReadSizePredictor>(), 1);
        assert_eq!(std::mem::size_of::<Option<ReadSizePredictor>>(), 2);
        assert_eq!(ReadSizePredictor::new().next_size(), 512);
        assert_eq!(ReadSizePredictor::default(), ReadSizePredictor::new());
        assert!(READ_SIZES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ReadSizePredictor::MIN_SIZE, 64);
        assert_eq!(ReadSizePredictor::MAX_SIZE, 64 * 1024);
    }

    #[test]
    fn predictor_grows_on_a_full_read_and_clamps_at_the_top() {
        let mut p = ReadSizePredictor::new();
        p.record(512);
        assert_eq!(p.next_size(), 1024);
        p.record(5000);
        assert_eq!(p.next_size(), 2048);
        for _ in 0..20 {
            let size = p.next_size();
            p.record(size);
        }
        assert_eq!(p.next_size(), 64 * 1024);
        p.record(usize::MAX);
        assert_eq!(p.next_size(), 64 * 1024);
    }

    #[test]
    fn predictor_shrinks_only_after_two_small_reads_in_a_row() {
        let mut p = ReadSizePredictor::new();
        p.record(10);
        assert_eq!(p.next_size(), 512, "one small read is not enough");
        p.record(10);
        assert_eq!(p.next_size(), 448);

        // A read between one step down and the offer breaks the run.
        let mut p = ReadSizePredictor::new();
        p.record(10);
        p.record(480);
        p.record(10);
        assert_eq!(p.next_size(), 512);
        p.record(10);
        assert_eq!(p.next_size(), 448);

        // A growing read clears a pending decrease.
        let mut p = ReadSizePredictor::new();
        p.record(10);
        p.record(512);
        p.record(10);
        assert_eq!(p.next_size(), 1024);

        // A read of exactly one step down is not small.
        let mut p = ReadSizePredictor::new();
        p.record(448);
        p.record(448);
        assert_eq!(p.next_size(), 512);
    }

    #[test]
    fn predictor_clamps_at_the_bottom() {
        let mut p = ReadSizePredictor::new();
        for _ in 0..200 {
            p.record(0);
        }
        assert_eq!(p.next_size(), 64);
        p.record(63);
        p.record(63);
        assert_eq!(p.next_size(), 64);
        p.record(64);
        assert_eq!(p.next_size(), 128);
    }

    /// One step of a random pool workload.
    #[derive(Clone, Debug)]
    enum Op {
        /// Take `size` bytes and fill `fill_percent` of the request with a marker.
        Take {
            size: usize,
            fill_percent: usize,
        },
        /// Give back the outstanding buffer at `pick` (modulo how many are out).
        Give {
            pick: usize,
        },
        /// Give back a `Vec::new()` that never came from the pool.
        GiveForeignEmpty,
        /// Reserve `additional` bytes in the outstanding buffer at `pick`.
        Reserve {
            pick: usize,
            additional: usize,
        },
        Shrink,
        Advance {
            ticks: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..70_000, 0usize..=100)
                .prop_map(|(size, fill_percent)| Op::Take { size, fill_percent }),
            1 => (MAX_CLASS..200_000, 0usize..=100)
                .prop_map(|(size, fill_percent)| Op::Take { size, fill_percent }),
            4 => any::<usize>().prop_map(|pick| Op::Give { pick }),
            1 => Just(Op::GiveForeignEmpty),
            2 => (any::<usize>(), 0usize..80_000)
                .prop_map(|(pick, additional)| Op::Reserve { pick, additional }),
            2 => Just(Op::Shrink),
            2 => (0u64..4).prop_map(|ticks| Op::Advance { ticks }),
        ]
    }

    /// The pool as a model: per class, a stack of return ticks; plus counters.
    struct Model {
        max_pooled_bytes: usize,
        idle_ticks: u64,
        free: Vec<Vec<u64>>,
        hits: u64,
        misses: u64,
        freed: u64,
    }

    impl Model {
        fn pooled_bytes(&self) -> usize {
            self.free
                .iter()
                .zip(ALL_CLASSES)
                .map(|(list, size)| list.len() * size)
                .sum()
        }

        /// Expected capacity of a `take(size)`: `Some(class size)`, or `None` when exact.
        fn take(&mut self, size: usize) -> Option<usize> {
            match ALL_CLASSES.iter().position(|&class| class >= size) {
                Some(class) => {
                    if self.free[class].pop().is_some() {
                        self.hits += 1;
                    } else {
                        self.misses += 1;
                    }
                    Some(ALL_CLASSES[class])
                }
                None => {
                    self.misses += 1;
                    None
                }
            }
        }

        fn give(&mut self, capacity: usize, now: u64) {
            if capacity == 0 {
                return;
            }
            let class = ALL_CLASSES.iter().position(|&class| class == capacity);
            match class {
                Some(class) if self.pooled_bytes() + capacity <= self.max_pooled_bytes => {
                    self.free[class].push(now)
                }
                _ => self.freed += 1,
            }
        }

        fn shrink(&mut self, now: u64) {
            for list in &mut self.free {
                let before = list.len();
                list.retain(|&returned_at| now - returned_at <= self.idle_ticks);
                self.freed += (before - list.len()) as u64;
            }
        }
    }

    fn marker(id: u64) -> u8 {
        (id % 251) as u8
    }

    proptest! {
        #[test]
        fn pool_matches_model(
            max_pooled_bytes in 0usize..300_000,
            idle_ticks in 0u64..6,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut pool = pool(max_pooled_bytes, idle_ticks);
            let mut model = Model {
                max_pooled_bytes,
                idle_ticks,
                free: vec![Vec::new(); CLASS_COUNT],
                hits: 0,
                misses: 0,
                freed: 0,
            };
            // Outstanding buffers: (buffer, requested capacity, marker of its contents).
            let mut out: Vec<(Vec<u8>, usize, u8)> = Vec::new();
            let mut now = 0u64;
            let mut next_id = 0u64;

            for op in ops {
                match op {
                    Op::Take { size, fill_percent } => {
                        let mut buf = pool.take(size);
                        prop_assert!(buf.is_empty());
                        prop_assert!(buf.capacity() >= size);
                        if let Some(class) = model.take(size) {
                            prop_assert_eq!(buf.capacity(), class);
                        }
                        let mark = marker(next_id);
                        next_id += 1;
                        buf.resize(size * fill_percent / 100, mark);
                        out.push((buf, size, mark));
                    }
                    Op::Give { pick } => {
                        if !out.is_empty() {
                            let (buf, _, _) = out.swap_remove(pick % out.len());
                            model.give(buf.capacity(), now);
                            pool.give(buf, now);
                            prop_assert!(pool.stats().pooled_bytes <= max_pooled_bytes);
                        }
                    }
                    Op::GiveForeignEmpty => pool.give(Vec::new(), now),
                    Op::Reserve { pick, additional } => {
                        if !out.is_empty() {
                            let index = pick % out.len();
                            let (buf, requested, mark) = &mut out[index];
                            let (len, capacity) = (buf.len(), buf.capacity());
                            pool.reserve(buf, additional, now);
                            if capacity - len < additional {
                                let needed = (len + additional).max(capacity * 2);
                                if let Some(class) = model.take(needed) {
                                    prop_assert_eq!(buf.capacity(), class);
                                }
                                model.give(capacity, now);
                                *requested = needed;
                            } else {
                                prop_assert_eq!(buf.capacity(), capacity);
                            }
                            prop_assert!(buf.capacity() - buf.len() >= additional);
                            prop_assert_eq!(buf.len(), len);
                            prop_assert!(buf.iter().all(|b| b == mark));
                        }
                    }
                    Op::Shrink => {
                        pool.shrink(now);
                        model.shrink(now);
                    }
                    Op::Advance { ticks } => now += ticks,
                }

                let stats = pool.stats();
                let lent: usize = out.iter().map(|(buf, _, _)| buf.capacity()).sum();
                prop_assert_eq!(stats.lent_bytes, lent);
                prop_assert_eq!(stats.pooled_bytes, model.pooled_bytes());
                prop_assert_eq!(stats.hits, model.hits);
                prop_assert_eq!(stats.misses, model.misses);
                prop_assert_eq!(stats.freed, model.freed);
                prop_assert!(stats.pooled_bytes <= max_pooled_bytes);

                let mut seen = HashSet::new();
                for (buf, requested, _) in &out {
                    prop_assert!(buf.capacity() >= *requested);
                    prop_assert!(seen.insert(buf.as_ptr()), "a buffer was handed out twice");
                }
            }
        }
    }
}
