//! Unit tests of the buffer pool and the connection buffers.

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
