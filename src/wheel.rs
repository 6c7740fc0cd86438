//! The shard's timing wheel: every timer of every connection and session on a shard.
//!
//! A million idle connections each need a deadline (connect timeout, keep-alive, write stall,
//! session expiry), yet almost none of them ever fires: traffic only moves a connection's
//! `last_seen`, and when the wheel does fire the shard checks it and re-arms lazily. So what
//! matters is what *holding* a timer costs — one 24-byte slab entry, no allocation, no task —
//! and that firing a million at once happens in small batches instead of one long stall.
//!
//! The design follows tokio's `runtime/time/wheel`:
//!
//! * Time is counted in abstract `u64` ticks. Level `L` has 64 slots of `64^L` ticks each;
//!   eleven levels cover the whole `u64` range, so every deadline is kept exactly. There is
//!   no horizon: nothing is ever clamped except a deadline already in the past, which is
//!   moved up to the current tick ([`TimingWheel::insert`]).
//! * A timer sits in the level of the highest 6-bit digit in which its deadline differs from
//!   the wheel's cursor (`elapsed`), in the slot named by that digit. Each level keeps a `u64`
//!   bitfield of occupied slots, so the next slot to visit is one `trailing_zeros` away:
//!   jumping from tick 0 to tick 10^9 costs what the timers in between cost, never 10^9 steps.
//! * When the cursor reaches a slot above level 0 its timers are *cascaded*: placed again
//!   relative to the new cursor, which puts each in a lower level. A level-0 slot holds the
//!   timers of one exact tick; when the cursor reaches it, it becomes the due list.
//! * Timers live in a slab (a `Vec` of entries plus a free list); slot lists are doubly linked
//!   through `u32` indices. The `prev` link of a list's first entry names the list itself, so
//!   cancel unlinks in O(1) without working out where the timer is.
//! * A [`TimerId`] carries the generation of its entry, bumped whenever the entry is freed, so
//!   the id of a timer that fired or was cancelled never reaches a newer timer in that entry.
//! * [`TimingWheel::advance`] does at most `max` units of work per call — a timer fired or a
//!   timer cascaded — so a mass expiry, and the cascade that comes before it, is spread over
//!   bounded batches.

use std::fmt;
use std::mem::{replace, size_of};

/// Bits of a deadline per level: 64 slots a level.
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// ceil(64 / 6): the top level holds bits 60..=63 of a deadline, so no deadline is too far.
const LEVELS: usize = 11;

/// End of a list.
const NIL: u32 = u32::MAX;
/// Set in an entry's `prev` when it names the list the entry heads rather than an entry.
const LIST_REF: u32 = 1 << 31;
/// Entry indices stay below `LIST_REF` so the two kinds of `prev` cannot be confused.
const MAX_ENTRIES: usize = LIST_REF as usize;
/// List ids: `level * SLOTS + slot` for the wheel's slots, then these two.
/// The due list holds timers whose deadline is exactly `elapsed`, waiting to be returned.
const DUE: u32 = (LEVELS * SLOTS) as u32;
/// The cascade list holds the timers of the slot being cascaded until each is placed again,
/// which may take several calls when `max` runs out.
const CASCADE: u32 = DUE + 1;
/// The `prev` of an entry on the free list: no live timer has it.
const FREE: u32 = LIST_REF | (CASCADE + 1);

/// Handle to a timer on a [`TimingWheel`].
///
/// It names a slab entry and the generation that entry had when the timer was inserted; once
/// the timer fires or is cancelled the id is stale and every call with it is a no-op.
/// `TimerId::default()` is never the id of a live timer (live generations are never 0), so it
/// serves as "no timer".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

/// One timer in the slab, or a free slot in it.
///
/// With a `u32` payload this is 8 + 4 + 4 + 4 + 4 = 24 bytes: an exact deadline, two links,
/// a generation and the payload, with no padding and no tag. Nothing here can go without
/// giving up O(1) cancel, stale-id safety or exact deadlines.
#[derive(Clone, Copy)]
struct Entry<T> {
    /// The tick the timer is due at (after clamping).
    deadline: u64,
    /// Next entry in the same list, or `NIL`; the free list links through this too.
    next: u32,
    /// Previous entry, or `LIST_REF | list id` for a list's first entry, or `FREE`.
    prev: u32,
    /// Generation of the live timer's id; bumped when the entry is freed.
    generation: u32,
    /// The caller's payload. A free entry keeps its last (dead) payload: `T` is `Copy`, so
    /// there is nothing to drop and no `Option` tag to pay for.
    value: T,
}

/// The generation after `generation`: wraps, and skips 0 so that `TimerId::default()` stays
/// stale forever.
fn next_generation(generation: u32) -> u32 {
    match generation.wrapping_add(1) {
        0 => 1,
        g => g,
    }
}

/// The level where a timer due at `deadline` (> `elapsed`) belongs: the highest 6-bit digit in
/// which the two differ.
fn level_for(elapsed: u64, deadline: u64) -> usize {
    debug_assert!(deadline > elapsed);
    let highest_differing_bit = 63 - (elapsed ^ deadline).leading_zeros();
    (highest_differing_bit / SLOT_BITS) as usize
}

/// A hierarchical timing wheel holding timers with a `T` payload each. See the module docs.
pub struct TimingWheel<T: Copy> {
    entries: Vec<Entry<T>>,
    /// First free entry, linked through `next`.
    free_head: u32,
    /// Live timers.
    live: usize,
    /// The clock: the last tick `advance` moved to.
    now: u64,
    /// The cursor the levels are laid out against; `elapsed <= now`. Every timer in a slot is
    /// due after `elapsed`; every timer on the due list is due exactly at `elapsed`. The cursor
    /// only moves while the due and cascade lists are empty.
    elapsed: u64,
    /// Bit `s` of `occupied[l]` is set when slot `s` of level `l` holds a timer.
    occupied: [u64; LEVELS],
    /// First entry of each slot's list, indexed by `level * SLOTS + slot`.
    slot_heads: Box<[u32; LEVELS * SLOTS]>,
    due_head: u32,
    cascade_head: u32,
}

impl<T: Copy> TimingWheel<T> {
    /// An empty wheel whose clock reads `now`.
    pub fn new(now: u64) -> Self {
        Self::with_capacity(now, 0)
    }

    /// An empty wheel with room for `cap` timers before the slab grows.
    pub fn with_capacity(now: u64, cap: usize) -> Self {
        TimingWheel {
            entries: Vec::with_capacity(cap.min(MAX_ENTRIES)),
            free_head: NIL,
            live: 0,
            now,
            elapsed: now,
            occupied: [0; LEVELS],
            slot_heads: Box::new([NIL; LEVELS * SLOTS]),
            due_head: NIL,
            cascade_head: NIL,
        }
    }

    /// Bytes of one slab entry: what each timer costs.
    pub const fn entry_size() -> usize {
        size_of::<Entry<T>>()
    }

    /// The last tick the wheel advanced to.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Live timers.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bytes the wheel has allocated: the slab's capacity and the slot heads.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * Self::entry_size() + size_of::<[u32; LEVELS * SLOTS]>()
    }

    /// Adds a timer due at `deadline` and returns its id.
    ///
    /// A deadline at or before [`now`](Self::now) is moved up to `now`: the timer fires on
    /// the next `advance`, after every timer due earlier, and [`deadline`](Self::deadline)
    /// reports `now`. Any later deadline, up to `u64::MAX`, is kept exactly.
    ///
    /// # Panics
    ///
    /// If 2^31 timers are live at once (about 40 GiB of entries).
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerId {
        let deadline = deadline.max(self.now);
        let index = match self.free_head {
            NIL => {
                let index = self.entries.len();
                assert!(index < MAX_ENTRIES, "timing wheel full: 2^31 live timers");
                self.entries.push(Entry {
                    deadline,
                    next: NIL,
                    prev: NIL,
                    generation: 1,
                    value,
                });
                index as u32
            }
            index => {
                let entry = &mut self.entries[index as usize];
                self.free_head = entry.next;
                entry.deadline = deadline;
                entry.value = value;
                index
            }
        };
        self.live += 1;
        self.place(index);
        TimerId {
            index,
            generation: self.entries[index as usize].generation,
        }
    }

    /// Removes a timer and returns its payload; `None` if the id is stale.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let index = self.lookup(id)?;
        self.unlink(index);
        let value = self.entries[index as usize].value;
        self.release(index);
        Some(value)
    }

    /// Moves a timer to `deadline` (clamped to `now` like [`insert`](Self::insert)), keeping
    /// its id; `false` if the id is stale.
    pub fn reset(&mut self, id: TimerId, deadline: u64) -> bool {
        let Some(index) = self.lookup(id) else {
            return false;
        };
        self.unlink(index);
        self.entries[index as usize].deadline = deadline.max(self.now);
        self.place(index);
        true
    }

    /// The deadline of a live timer (after clamping); `None` if the id is stale.
    pub fn deadline(&self, id: TimerId) -> Option<u64> {
        self.lookup(id)
            .map(|index| self.entries[index as usize].deadline)
    }

    /// The earliest deadline of any live timer (after clamping).
    ///
    /// The occupied-slot bitfields find the slot holding it. When that slot is on level 0
    /// (the timer is due in the cursor's current 64-tick window) the answer is the slot's tick and
    /// costs O(levels); otherwise the one slot's list is walked for its minimum. While an
    /// `advance` is unfinished (it returned `true`) this may also walk the timers of a
    /// partly cascaded slot. Use [`next_wakeup`](Self::next_wakeup) for a bound that always
    /// costs O(levels).
    pub fn next_deadline(&self) -> Option<u64> {
        if self.due_head != NIL {
            return Some(self.elapsed);
        }
        let cascading = self.list_min(self.cascade_head);
        let in_slots = self.next_slot().map(|(level, slot, start)| {
            if level == 0 {
                start
            } else {
                self.list_min(self.slot_heads[level * SLOTS + slot])
                    .unwrap_or(start)
            }
        });
        match (cascading, in_slots) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The earliest tick at which [`advance`](Self::advance) may have work, from the bitfields
    /// alone, in O(levels): at most [`next_deadline`](Self::next_deadline), and equal to it
    /// when that timer is due within the cursor's 64-tick window. At or before `now` while an
    /// `advance` is unfinished. This is what a poll timeout should be computed from.
    pub fn next_wakeup(&self) -> Option<u64> {
        if self.due_head != NIL || self.cascade_head != NIL {
            return Some(self.elapsed);
        }
        self.next_slot().map(|(_, _, start)| start)
    }

    /// Moves the clock to `now` (never backwards: an earlier `now` counts as the current
    /// clock) and appends up to `max` expired timers (deadline <= now) to `out`, in
    /// non-decreasing deadline order. Fired timers are removed: their ids become stale.
    ///
    /// Each call does at most `max` units of work, a unit being one timer fired or one timer
    /// cascaded to a lower level, plus O(levels) per slot visited. Returns `true` when it
    /// stopped with work left — expired timers remain, or part of a slot's cascade does —
    /// so call again with the same `now`. `false` means every timer due by `now` has been
    /// returned. (After a cut-short cascade the next call may find nothing due after all.)
    pub fn advance(&mut self, now: u64, max: usize, out: &mut Vec<(TimerId, T)>) -> bool {
        self.now = self.now.max(now);
        let now = self.now;
        let mut budget = max;
        loop {
            // Everything on the due list is due exactly at `elapsed`, the earliest deadline.
            while self.due_head != NIL {
                if budget == 0 {
                    return true;
                }
                budget -= 1;
                let index = self.due_head;
                self.unlink(index);
                let entry = &self.entries[index as usize];
                debug_assert_eq!(entry.deadline, self.elapsed);
                out.push((
                    TimerId {
                        index,
                        generation: entry.generation,
                    },
                    entry.value,
                ));
                self.release(index);
            }
            // Cascade the slot just reached, or what an earlier call left of it, before the cursor
            // moves on.
            if self.cascade_head != NIL {
                while self.cascade_head != NIL {
                    if budget == 0 {
                        return true;
                    }
                    budget -= 1;
                    let index = self.cascade_head;
                    self.unlink(index);
                    self.place(index);
                }
                continue;
            }
            match self.next_slot() {
                Some((level, slot, start)) if start <= now => {
                    self.elapsed = start;
                    let to = if level == 0 { DUE } else { CASCADE };
                    self.take_slot(level, slot, to);
                }
                _ => {
                    self.elapsed = now;
                    return false;
                }
            }
        }
    }

    /// The slab index of a live timer, or `None` for a stale id.
    fn lookup(&self, id: TimerId) -> Option<u32> {
        let entry = self.entries.get(id.index as usize)?;
        (entry.prev != FREE && entry.generation == id.generation).then_some(id.index)
    }

    /// Puts an unlinked live entry where its deadline belongs relative to `elapsed`.
    fn place(&mut self, index: u32) {
        let deadline = self.entries[index as usize].deadline;
        if deadline <= self.elapsed {
            // Clamping to `now` and `elapsed <= now` leave only `deadline == elapsed` here.
            debug_assert_eq!(deadline, self.elapsed);
            self.push(DUE, index);
        } else {
            let level = level_for(self.elapsed, deadline);
            let slot = (deadline >> (SLOT_BITS * level as u32)) & SLOT_MASK;
            self.push((level * SLOTS) as u32 + slot as u32, index);
        }
    }

    /// The first occupied slot after the cursor: `(level, slot, first tick it covers)`.
    ///
    /// Every occupied slot of a level lies after the cursor's own digit on that level, and
    /// every slot of a lower level comes before any slot of a higher one, so the lowest set
    /// bit of the lowest non-empty level is the next slot.
    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        let level = self.occupied.iter().position(|&bits| bits != 0)?;
        let slot = self.occupied[level].trailing_zeros();
        let shift = SLOT_BITS * level as u32;
        debug_assert!(u64::from(slot) > (self.elapsed >> shift) & SLOT_MASK);
        // The ticks of the cursor above this level, which the slot shares.
        let above = shift + SLOT_BITS;
        let base = if above >= 64 {
            0
        } else {
            self.elapsed >> above << above
        };
        Some((level, slot as usize, base + (u64::from(slot) << shift)))
    }

    /// The smallest deadline on a list, walking it.
    fn list_min(&self, mut index: u32) -> Option<u64> {
        let mut min = None;
        while index != NIL {
            let entry = &self.entries[index as usize];
            let deadline = entry.deadline;
            min = Some(min.map_or(deadline, |m: u64| m.min(deadline)));
            index = entry.next;
        }
        min
    }

    fn head_mut(&mut self, list: u32) -> &mut u32 {
        match list {
            DUE => &mut self.due_head,
            CASCADE => &mut self.cascade_head,
            slot => &mut self.slot_heads[slot as usize],
        }
    }

    /// Links an unlinked entry at the front of `list`.
    fn push(&mut self, list: u32, index: u32) {
        let old_head = replace(self.head_mut(list), index);
        if old_head != NIL {
            self.entries[old_head as usize].prev = index;
        }
        let entry = &mut self.entries[index as usize];
        entry.prev = LIST_REF | list;
        entry.next = old_head;
        if list < DUE {
            self.occupied[list as usize / SLOTS] |= 1 << (list as usize % SLOTS);
        }
    }

    /// Takes a live entry off whatever list holds it.
    fn unlink(&mut self, index: u32) {
        let Entry { prev, next, .. } = self.entries[index as usize];
        if prev & LIST_REF != 0 {
            let list = prev & !LIST_REF;
            *self.head_mut(list) = next;
            if next == NIL && list < DUE {
                self.occupied[list as usize / SLOTS] &= !(1 << (list as usize % SLOTS));
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }

    /// Moves a whole slot's list to the (empty) due or cascade list in O(1).
    fn take_slot(&mut self, level: usize, slot: usize, to: u32) {
        let head = replace(&mut self.slot_heads[level * SLOTS + slot], NIL);
        self.occupied[level] &= !(1 << slot);
        debug_assert!(head != NIL);
        debug_assert_eq!(*self.head_mut(to), NIL);
        *self.head_mut(to) = head;
        self.entries[head as usize].prev = LIST_REF | to;
    }

    /// Frees an unlinked entry, staling its id.
    fn release(&mut self, index: u32) {
        let entry = &mut self.entries[index as usize];
        entry.generation = next_generation(entry.generation);
        entry.prev = FREE;
        entry.next = self.free_head;
        self.free_head = index;
        self.live -= 1;
    }
}

impl<T: Copy> fmt::Debug for TimingWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimingWheel")
            .field("now", &self.now)
            .field("elapsed", &self.elapsed)
            .field("len", &self.live)
            .field("capacity", &self.entries.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests;
