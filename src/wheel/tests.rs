//! Unit tests of the timer wheel, with a property test against a sorted-list model.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// Advances to `now` until nothing is left, in batches of `max`; returns the fired timers.
fn drain(wheel: &mut TimingWheel<u32>, now: u64, max: usize) -> Vec<(TimerId, u32)> {
    let mut out = Vec::new();
    let mut calls = 0;
    while wheel.advance(now, max, &mut out) {
        calls += 1;
        assert!(calls < 1_000_000, "advance never finished");
    }
    out
}

fn values(fired: &[(TimerId, u32)]) -> Vec<u32> {
    fired.iter().map(|&(_, v)| v).collect()
}

#[test]
fn entry_is_compact() {
    assert!(TimingWheel::<u32>::entry_size() <= 24);
    assert_eq!(TimingWheel::<u32>::entry_size(), 24);
}

#[test]
fn fires_at_the_exact_tick() {
    let mut wheel = TimingWheel::new(0);
    let id = wheel.insert(10, 7);
    assert_eq!(wheel.len(), 1);
    assert!(drain(&mut wheel, 9, 16).is_empty());
    assert_eq!(wheel.now(), 9);
    assert_eq!(drain(&mut wheel, 10, 16), vec![(id, 7)]);
    assert!(wheel.is_empty());
    assert_eq!(wheel.next_deadline(), None);
}

#[test]
fn every_level_fires_exactly_and_in_order() {
    let mut wheel = TimingWheel::new(3);
    let deadlines = [
        4,
        66,
        67,
        4_095,
        4_096,
        262_145,
        1 << 30,
        (1 << 30) + 1,
        (1 << 36) + 5,
        1 << 50,
        u64::MAX - 1,
        u64::MAX,
    ];
    for (i, &d) in deadlines.iter().enumerate().rev() {
        wheel.insert(d, i as u32);
    }
    for (i, &d) in deadlines.iter().enumerate() {
        assert_eq!(wheel.next_deadline(), Some(d));
        assert!(wheel.next_wakeup().unwrap() <= d);
        assert!(drain(&mut wheel, d - 1, 4).is_empty(), "{d} fired early");
        assert_eq!(values(&drain(&mut wheel, d, 4)), vec![i as u32]);
    }
    assert!(wheel.is_empty());
}

#[test]
fn one_jump_fires_everything_in_deadline_order() {
    let mut wheel = TimingWheel::new(0);
    let deadlines = [900, 5, 1 << 40, 64, 70_000, 63, 5, 1 << 20];
    for (i, &d) in deadlines.iter().enumerate() {
        wheel.insert(d, i as u32);
    }
    let fired = drain(&mut wheel, u64::MAX, 3);
    let got: Vec<u64> = values(&fired)
        .iter()
        .map(|&i| deadlines[i as usize])
        .collect();
    let mut want = deadlines.to_vec();
    want.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(wheel.now(), u64::MAX);
}

#[test]
fn cancel_returns_the_payload_and_the_timer_never_fires() {
    let mut wheel = TimingWheel::new(0);
    let a = wheel.insert(100, 1);
    let b = wheel.insert(100, 2);
    let c = wheel.insert(5_000, 3);
    assert_eq!(wheel.cancel(a), Some(1));
    assert_eq!(wheel.cancel(a), None);
    assert_eq!(wheel.cancel(c), Some(3));
    assert_eq!(wheel.len(), 1);
    assert_eq!(wheel.next_deadline(), Some(100));
    assert_eq!(drain(&mut wheel, 10_000, 8), vec![(b, 2)]);
}

#[test]
fn stale_id_after_fire_is_ignored() {
    let mut wheel = TimingWheel::new(0);
    let id = wheel.insert(1, 9);
    assert_eq!(drain(&mut wheel, 1, 8).len(), 1);
    assert_eq!(wheel.cancel(id), None);
    assert_eq!(wheel.deadline(id), None);
    assert!(!wheel.reset(id, 50));
    assert!(wheel.is_empty());
    assert!(drain(&mut wheel, 100, 8).is_empty());
}

#[test]
fn stale_id_never_touches_the_timer_reusing_its_entry() {
    let mut wheel = TimingWheel::new(0);
    let old = wheel.insert(10, 1);
    wheel.cancel(old);
    let new = wheel.insert(20, 2);
    assert_eq!(new.index, old.index, "the entry should be reused");
    assert_ne!(new, old);
    assert_eq!(wheel.cancel(old), None);
    assert!(!wheel.reset(old, 1_000));
    assert_eq!(wheel.deadline(old), None);
    assert_eq!(wheel.deadline(new), Some(20));
    assert_eq!(drain(&mut wheel, 20, 8), vec![(new, 2)]);
}

#[test]
fn default_id_is_always_stale() {
    let mut wheel = TimingWheel::new(0);
    let id = wheel.insert(10, 1);
    assert_eq!(id.index, 0);
    assert_eq!(wheel.cancel(TimerId::default()), None);
    assert!(!wheel.reset(TimerId::default(), 3));
    assert_eq!(wheel.deadline(id), Some(10));
}

#[test]
fn generations_wrap_and_skip_zero() {
    let mut wheel = TimingWheel::new(0);
    let first = wheel.insert(10, 1);
    wheel.entries[first.index as usize].generation = u32::MAX;
    let at_max = TimerId {
        index: first.index,
        generation: u32::MAX,
    };
    assert_eq!(wheel.cancel(at_max), Some(1));
    // The free entry's generation has wrapped round to `first`'s: still no timer there.
    assert_eq!(wheel.deadline(first), None);
    assert_eq!(wheel.cancel(first), None);
    assert!(wheel.is_empty());
    let wrapped = wheel.insert(10, 2);
    assert_eq!(wrapped.index, first.index);
    assert_eq!(wrapped.generation, 1);
    assert_eq!(wheel.cancel(at_max), None);
    assert_eq!(wheel.cancel(TimerId::default()), None);
    assert_eq!(wheel.cancel(wrapped), Some(2));
}

#[test]
fn reset_earlier_and_later_keeps_the_id() {
    let mut wheel = TimingWheel::new(0);
    let id = wheel.insert(5_000, 1);
    assert!(wheel.reset(id, 30));
    assert_eq!(wheel.deadline(id), Some(30));
    assert_eq!(wheel.next_deadline(), Some(30));
    assert!(drain(&mut wheel, 29, 8).is_empty());
    assert!(wheel.reset(id, 200_000));
    assert!(drain(&mut wheel, 199_999, 8).is_empty());
    assert_eq!(wheel.deadline(id), Some(200_000));
    assert_eq!(drain(&mut wheel, 200_000, 8), vec![(id, 1)]);
}

#[test]
fn a_due_timer_can_still_be_reset_or_cancelled_between_batches() {
    let mut wheel = TimingWheel::new(0);
    let timers: Vec<(TimerId, u32)> = (0..4).map(|v| (wheel.insert(10, v), v)).collect();
    let mut out = Vec::new();
    assert!(wheel.advance(10, 1, &mut out));
    let fired = out[0].0;
    let pending: Vec<(TimerId, u32)> = timers.into_iter().filter(|&(id, _)| id != fired).collect();
    assert!(wheel.reset(pending[0].0, 50));
    assert_eq!(wheel.cancel(pending[1].0), Some(pending[1].1));
    assert_eq!(drain(&mut wheel, 10, 8), vec![pending[2]]);
    assert_eq!(wheel.deadline(pending[0].0), Some(50));
}

#[test]
fn past_deadlines_are_clamped_to_now_and_fire_next() {
    let mut wheel = TimingWheel::new(0);
    drain(&mut wheel, 1_000, 8);
    let later = wheel.insert(1_001, 1);
    let past = wheel.insert(3, 2);
    assert_eq!(wheel.deadline(past), Some(1_000));
    assert_eq!(wheel.next_deadline(), Some(1_000));
    // Same `now` again: the overdue timer fires, the future one does not.
    assert_eq!(drain(&mut wheel, 1_000, 8), vec![(past, 2)]);
    assert!(wheel.reset(later, 0));
    assert_eq!(wheel.deadline(later), Some(1_000));
    assert_eq!(drain(&mut wheel, 900, 8), vec![(later, 1)]);
    assert_eq!(wheel.now(), 1_000, "the clock never runs backwards");
}

#[test]
fn overdue_insert_during_an_unfinished_advance_keeps_order() {
    let mut wheel = TimingWheel::new(0);
    for i in 0..3 {
        wheel.insert(40, i);
    }
    wheel.insert(70, 10);
    let mut out = Vec::new();
    assert!(wheel.advance(100, 1, &mut out));
    // Clamped to now = 100: after the timers due at 40 and 70.
    let late = wheel.insert(1, 20);
    assert_eq!(wheel.deadline(late), Some(100));
    while wheel.advance(100, 1, &mut out) {}
    assert_eq!(values(&out)[3..], [10, 20]);
}

#[test]
fn next_deadline_is_exact_above_level_zero() {
    let mut wheel = TimingWheel::new(0);
    wheel.insert(1_500, 1);
    let early = wheel.insert(1_030, 2);
    wheel.insert(90_000, 3);
    assert_eq!(wheel.next_deadline(), Some(1_030));
    assert_eq!(wheel.next_wakeup(), Some(1_024));
    wheel.cancel(early);
    assert_eq!(wheel.next_deadline(), Some(1_500));
    drain(&mut wheel, 1_500, 8);
    assert_eq!(wheel.next_deadline(), Some(90_000));
    assert_eq!(TimingWheel::<u32>::new(5).next_deadline(), None);
    assert_eq!(TimingWheel::<u32>::new(5).next_wakeup(), None);
}

#[test]
fn mass_expiry_drains_in_batches_of_max() {
    let mut wheel = TimingWheel::new(0);
    let n = 10_000;
    for i in 0..n {
        wheel.insert(300, i);
    }
    let mut out = Vec::new();
    let mut calls = 0;
    let mut seen = 0;
    loop {
        let more = wheel.advance(300, 64, &mut out);
        calls += 1;
        assert!(out.len() - seen <= 64, "batch larger than max");
        seen = out.len();
        if !more {
            break;
        }
    }
    let mut got = values(&out);
    got.sort_unstable();
    assert_eq!(got, (0..n).collect::<Vec<_>>());
    // One cascade (level 1 to 0) and one fire per timer, 64 at a time.
    assert!(calls >= 2 * n as usize / 64, "{calls} calls");
    assert!(calls <= 2 * n as usize / 64 + 2, "{calls} calls");
    assert!(wheel.is_empty());
}

#[test]
fn a_long_cascade_is_cut_short_too() {
    let mut wheel = TimingWheel::new(0);
    for i in 0..1_000 {
        wheel.insert(5_000 + u64::from(i % 7), i);
    }
    // Tick 4_096 reaches the level-2 slot holding them all; none is due yet.
    let mut out = Vec::new();
    let mut calls = 0;
    while wheel.advance(4_096, 10, &mut out) {
        calls += 1;
    }
    assert!(out.is_empty());
    assert!(calls >= 99, "the cascade ran in {calls} calls");
    assert_eq!(wheel.next_deadline(), Some(5_000));
    assert_eq!(drain(&mut wheel, 5_006, 100).len(), 1_000);
}

#[test]
fn max_zero_does_no_work() {
    let mut wheel = TimingWheel::new(0);
    let id = wheel.insert(5, 1);
    let mut out = Vec::new();
    assert!(wheel.advance(5, 0, &mut out));
    assert!(out.is_empty());
    assert_eq!(wheel.deadline(id), Some(5));
    assert!(!wheel.advance(5, 1, &mut out));
    assert_eq!(out, vec![(id, 1)]);
    assert!(!wheel.advance(6, 0, &mut out));
}

#[test]
fn entries_are_reused_and_heap_bytes_tracks_capacity() {
    let mut wheel = TimingWheel::with_capacity(0, 8);
    let empty = wheel.heap_bytes();
    assert_eq!(empty, 8 * 24 + LEVELS * SLOTS * 4);
    for round in 0..100 {
        let ids: Vec<TimerId> = (0..8).map(|i| wheel.insert(round * 10 + 5, i)).collect();
        for id in ids {
            assert!(wheel.cancel(id).is_some());
        }
    }
    assert_eq!(wheel.heap_bytes(), empty, "freed entries must be reused");
    for i in 0..9 {
        wheel.insert(1, i);
    }
    assert_eq!(wheel.heap_bytes(), 16 * 24 + LEVELS * SLOTS * 4);
}

#[derive(Clone, Debug)]
enum Op {
    Insert { deadline: Deadline, value: u32 },
    Cancel { pick: usize },
    Reset { pick: usize, deadline: Deadline },
    Advance { by: u64, max: usize },
}

/// A deadline relative to the clock at the time the op runs.
#[derive(Clone, Copy, Debug)]
enum Deadline {
    /// `now + delta`, saturating; negative deltas are in the past.
    Near(i64),
    Far(u64),
    Absolute(u64),
}

impl Deadline {
    fn at(self, now: u64) -> u64 {
        match self {
            Deadline::Near(delta) => now.saturating_add_signed(delta),
            Deadline::Far(delta) => now.saturating_add(delta),
            Deadline::Absolute(tick) => tick,
        }
    }
}

fn deadline_strategy() -> impl Strategy<Value = Deadline> {
    prop_oneof![
        6 => (-5i64..300).prop_map(Deadline::Near),
        2 => (0u32..40).prop_flat_map(|bits| 0..=1u64 << bits).prop_map(Deadline::Far),
        1 => prop_oneof![
            Just(Deadline::Absolute(u64::MAX)),
            Just(Deadline::Absolute(0)),
            any::<u64>().prop_map(Deadline::Absolute),
        ],
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (deadline_strategy(), any::<u32>())
            .prop_map(|(deadline, value)| Op::Insert { deadline, value }),
        3 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        3 => (any::<usize>(), deadline_strategy())
            .prop_map(|(pick, deadline)| Op::Reset { pick, deadline }),
        5 => (
            prop_oneof![
                12 => 0u64..80,
                4 => 0u64..5_000,
                3 => (0u32..40).prop_flat_map(|bits| 0..=1u64 << bits),
                1 => (40u32..64).prop_map(|bits| 1u64 << bits),
                1 => Just(u64::MAX),
            ],
            prop_oneof![1usize..4, 1usize..64],
        )
            .prop_map(|(by, max)| Op::Advance { by, max }),
    ]
}

/// The model: live timers by id as `(deadline, value)`, with past deadlines clamped to now.
#[derive(Default)]
struct Model {
    now: u64,
    timers: BTreeMap<(u32, u32), (u64, u32)>,
    /// The latest deadline fired so far: firing never goes back in time.
    last_fired: u64,
}

fn key(id: TimerId) -> (u32, u32) {
    (id.index, id.generation)
}

fn check_agrees(wheel: &TimingWheel<u32>, model: &Model, issued: &[TimerId]) {
    assert_eq!(wheel.now(), model.now);
    assert_eq!(wheel.len(), model.timers.len());
    assert_eq!(wheel.is_empty(), model.timers.is_empty());
    let earliest = model.timers.values().map(|&(d, _)| d).min();
    assert_eq!(wheel.next_deadline(), earliest);
    match (wheel.next_wakeup(), earliest) {
        (Some(w), Some(e)) => assert!(w <= e),
        (None, None) => {}
        other => panic!("next_wakeup/next_deadline disagree: {other:?}"),
    }
    for &id in issued {
        assert_eq!(
            wheel.deadline(id),
            model.timers.get(&key(id)).map(|&(d, _)| d)
        );
    }
}

fn run_ops(ops: &[Op]) {
    let mut wheel = TimingWheel::new(0);
    let mut model = Model::default();
    let mut issued: Vec<TimerId> = Vec::new();
    let mut out = Vec::new();
    for op in ops {
        match *op {
            Op::Insert { deadline, value } => {
                let deadline = deadline.at(model.now);
                let id = wheel.insert(deadline, value);
                let clamped = deadline.max(model.now);
                assert!(model.timers.insert(key(id), (clamped, value)).is_none());
                assert!(!issued.contains(&id), "an id was handed out twice");
                issued.push(id);
            }
            Op::Cancel { pick } if !issued.is_empty() => {
                let id = issued[pick % issued.len()];
                let want = model.timers.remove(&key(id)).map(|(_, v)| v);
                assert_eq!(wheel.cancel(id), want);
            }
            Op::Reset { pick, deadline } if !issued.is_empty() => {
                let id = issued[pick % issued.len()];
                let deadline = deadline.at(model.now);
                let live = model.timers.get_mut(&key(id));
                let want = live.is_some();
                if let Some(timer) = live {
                    timer.0 = deadline.max(model.now);
                }
                assert_eq!(wheel.reset(id, deadline), want);
            }
            Op::Cancel { .. } | Op::Reset { .. } => {}
            Op::Advance { by, max } => {
                let now = model.now.saturating_add(by);
                model.now = now;
                out.clear();
                let more = wheel.advance(now, max, &mut out);
                assert!(out.len() <= max);
                for &(id, value) in &out {
                    let (deadline, want) = model
                        .timers
                        .remove(&key(id))
                        .expect("fired a timer the model does not hold");
                    assert_eq!(value, want);
                    assert!(deadline <= now, "fired {deadline} at {now}");
                    assert!(deadline >= model.last_fired, "fired out of order");
                    model.last_fired = deadline;
                }
                // What fired were the earliest timers.
                if let Some(&(d, _)) = model.timers.values().min() {
                    assert!(d >= model.last_fired);
                }
                if !more {
                    assert!(
                        model.timers.values().all(|&(d, _)| d > now),
                        "advance stopped with expired timers left"
                    );
                }
            }
        }
        check_agrees(&wheel, &model, &issued);
    }
    // Finally everything fires, in order, at the end of time.
    let rest = drain(&mut wheel, u64::MAX, 7);
    let mut last = model.last_fired;
    for (id, value) in rest {
        let (deadline, want) = model.timers.remove(&key(id)).expect("unknown timer");
        assert_eq!(value, want);
        assert!(deadline >= last);
        last = deadline;
    }
    assert!(model.timers.is_empty());
    assert!(wheel.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn matches_a_btreemap_model(ops in proptest::collection::vec(op_strategy(), 1..=200)) {
        run_ops(&ops);
    }
}
