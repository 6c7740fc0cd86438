//! The timing wheel at a million timers: what holding, re-arming and cancelling a timer costs,
//! how many bytes each one takes, and how long the worst batch of a mass expiry stalls a shard.
//!
//! A plain binary (`harness = false`): run with `cargo bench --bench wheel`. It prints a
//! Markdown table and then one JSON line with the same figures for scripts.

use std::hint::black_box;
use std::time::{Duration, Instant};

use gateway::wheel::{TimerId, TimingWheel};

const ENTRIES: usize = 1_000_000;
/// Batch size of the mass expiry, as a shard would drain it.
const BATCH: usize = 4096;
/// The tick every timer of the mass expiry is due at.
const MASS_DEADLINE: u64 = 300;

/// xorshift64*: deterministic spread of deadlines and access order without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn ns_per_op(elapsed: Duration, ops: usize) -> f64 {
    elapsed.as_nanos() as f64 / ops as f64
}

/// Drains every timer due by `now` in batches of `BATCH`, timing each call.
struct Drain {
    fired: usize,
    batches: usize,
    longest: Duration,
    total: Duration,
}

fn drain(wheel: &mut TimingWheel<u32>, now: u64, into: &mut Drain) {
    let mut out = Vec::with_capacity(BATCH);
    loop {
        out.clear();
        let start = Instant::now();
        let more = wheel.advance(now, BATCH, &mut out);
        let took = start.elapsed();
        black_box(&out);
        into.fired += out.len();
        into.batches += 1;
        into.longest = into.longest.max(took);
        into.total += took;
        if !more {
            break;
        }
    }
}

fn mass_expiry(tick_by_tick: bool) -> Drain {
    let mut wheel = TimingWheel::new(0);
    for i in 0..ENTRIES {
        wheel.insert(MASS_DEADLINE, i as u32);
    }
    let mut result = Drain {
        fired: 0,
        batches: 0,
        longest: Duration::ZERO,
        total: Duration::ZERO,
    };
    if tick_by_tick {
        for tick in 1..=MASS_DEADLINE {
            drain(&mut wheel, tick, &mut result);
        }
    } else {
        drain(&mut wheel, MASS_DEADLINE, &mut result);
    }
    assert_eq!(result.fired, ENTRIES, "every timer must fire");
    assert!(wheel.is_empty());
    result
}

fn main() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Idle deadlines spread over the next ~17 minutes at 1 s ticks (levels 0 and 1).
    let deadlines: Vec<u64> = (0..ENTRIES).map(|_| 1 + rng.below(1_000)).collect();
    // Activity touches connections in no particular order.
    let mut order: Vec<usize> = (0..ENTRIES).collect();
    for i in (1..ENTRIES).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }

    let mut wheel = TimingWheel::new(0);
    let mut ids: Vec<TimerId> = Vec::with_capacity(ENTRIES);
    let start = Instant::now();
    for (i, &deadline) in deadlines.iter().enumerate() {
        ids.push(wheel.insert(deadline, i as u32));
    }
    let insert_ns = ns_per_op(start.elapsed(), ENTRIES);
    let heap_bytes = wheel.heap_bytes();
    let bytes_per_entry = heap_bytes as f64 / ENTRIES as f64;
    let entry_size = TimingWheel::<u32>::entry_size();

    // Lazy touch, first form: move the live timer later, keeping its id.
    let start = Instant::now();
    for &i in &order {
        black_box(wheel.reset(ids[i], deadlines[i] + 300));
    }
    let reset_ns = ns_per_op(start.elapsed(), ENTRIES);

    // Lazy touch, second form: drop the timer and insert a new one (a new id).
    let start = Instant::now();
    for &i in &order {
        black_box(wheel.cancel(ids[i]));
        ids[i] = wheel.insert(deadlines[i] + 600, i as u32);
    }
    let cancel_insert_ns = ns_per_op(start.elapsed(), ENTRIES);

    let start = Instant::now();
    for &i in &order {
        black_box(wheel.cancel(ids[i]));
    }
    let cancel_ns = ns_per_op(start.elapsed(), ENTRIES);
    assert!(wheel.is_empty());
    drop(wheel);

    let jump = mass_expiry(false);
    let ticking = mass_expiry(true);

    // A far jump with few timers must not walk the ticks in between.
    let mut far = TimingWheel::new(0);
    for i in 0..1_000u32 {
        far.insert(1 + rng.below(1_000_000_000), i);
    }
    let mut out = Vec::new();
    let start = Instant::now();
    while far.advance(1_000_000_000, BATCH, &mut out) {}
    let far_jump_us = start.elapsed().as_secs_f64() * 1e6;
    assert_eq!(out.len(), 1_000);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("| timing wheel, {ENTRIES} timers (T = u32) | value |");
    println!("|---|---|");
    println!("| insert | {insert_ns:.1} ns/op |");
    println!("| touch re-arm: reset to a later deadline | {reset_ns:.1} ns/op |");
    println!("| touch re-arm: cancel + insert | {cancel_insert_ns:.1} ns/op |");
    println!("| cancel | {cancel_ns:.1} ns/op |");
    println!("| size_of entry | {entry_size} B |");
    println!(
        "| heap bytes / entry after {ENTRIES} inserts | {bytes_per_entry:.2} B ({heap_bytes} B) |"
    );
    for (name, d) in [("jump to the tick", &jump), ("tick by tick", &ticking)] {
        println!(
            "| mass expiry ({name}), batches of {BATCH} | {:.2} ms total, {} batches, longest {:.0} µs |",
            ms(d.total),
            d.batches,
            us(d.longest)
        );
    }
    println!("| 1000 timers, advance 0 → 10^9 | {far_jump_us:.0} µs |");
    println!();
    println!(
        "{{\"bench\":\"wheel\",\"entries\":{ENTRIES},\"insert_ns\":{insert_ns:.1},\
         \"reset_later_ns\":{reset_ns:.1},\"cancel_insert_ns\":{cancel_insert_ns:.1},\
         \"cancel_ns\":{cancel_ns:.1},\"entry_size\":{entry_size},\
         \"heap_bytes_per_entry\":{bytes_per_entry:.2},\"batch\":{BATCH},\
         \"mass_expiry_total_ms\":{:.2},\"mass_expiry_batches\":{},\
         \"mass_expiry_max_batch_us\":{:.0},\"mass_expiry_ticking_total_ms\":{:.2},\
         \"mass_expiry_ticking_batches\":{},\"mass_expiry_ticking_max_batch_us\":{:.0},\
         \"far_jump_us\":{far_jump_us:.0}}}",
        ms(jump.total),
        jump.batches,
        us(jump.longest),
        ms(ticking.total),
        ticking.batches,
        us(ticking.longest)
    );
}
