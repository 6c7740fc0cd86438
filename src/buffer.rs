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
pub(crate) const MIN_CLASS: usize = 256;
/// Largest size class, in bytes. Larger requests are allocated exactly and never pooled.
pub(crate) const MAX_CLASS: usize = 64 * 1024;

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
pub(crate) struct PoolStats {
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
pub(crate) struct BufferPool {
    cfg: PoolConfig,
    /// One free list per class. Back = most recently returned, front = oldest; the
    /// `returned_at` ticks never decrease from front to back.
    free: [VecDeque<FreeBuffer>; CLASS_COUNT],
    stats: PoolStats,
}

impl BufferPool {
    /// An empty pool; it allocates nothing until the first `take`.
    pub(crate) fn new(cfg: PoolConfig) -> Self {
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
    pub(crate) fn take(&mut self, min_capacity: usize) -> Vec<u8> {
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
    pub(crate) fn give(&mut self, mut buf: Vec<u8>, now: u64) {
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
    pub(crate) fn reserve(&mut self, buf: &mut Vec<u8>, additional: usize, now: u64) {
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
    pub(crate) fn shrink(&mut self, now: u64) {
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

    #[cfg(test)]
    /// Replaces the limits (e.g. on config reload). A lower cap is enforced at the next
    /// `shrink`; returns already respect it.
    pub(crate) fn set_config(&mut self, cfg: PoolConfig) {
        self.cfg = cfg;
    }

    /// The current accounting.
    pub(crate) fn stats(&self) -> PoolStats {
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
mod tests;
