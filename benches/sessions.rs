//! One shard's session state at 1,000,000 devices, in process: what a million idle
//! connections cost in user space beyond the kernel's socket memory.
//!
//! Builds, the way `on_connect` and `on_subscribe` do, 1M sessions with 20-character
//! client ids, one QoS 1 subscription each to `devices/{id}/cmd`, and one wheel entry
//! each, in the shard's real types (`Slab<Session>`, the hashbrown client-id map, the
//! `SubscriptionIndex`, the `TimingWheel`). A counting allocator measures the heap; the
//! connection's own slab entry (`size_of::<Conn>()`) is added for the per-connection
//! figure. Then it looks every device up (id → session, topic → subscriber) and tears
//! everything down, checking the heap returns to where it started.
//!
//! Run: `cargo bench --bench sessions` (prints a Markdown table and one JSON line).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use gateway::codec::Version;
use gateway::session::{ClientIds, Session};
use gateway::shard::Conn;
use gateway::topic::{Subscriber, SubscriptionIndex};
use gateway::wheel::{TimerId, TimingWheel};
use slab::Slab;

struct Counting;
static HEAP: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HEAP.fetch_add(l.size() as isize, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HEAP.fetch_sub(l.size() as isize, Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HEAP.fetch_add(new as isize - l.size() as isize, Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const N: usize = 1_000_000;

fn client_id(i: usize) -> String {
    format!("dev-{i:016}") // 20 characters
}

fn main() {
    let base = HEAP.load(Relaxed);
    let t = Instant::now();
    let mut sessions: Slab<Session> = Slab::new();
    let mut by_client = ClientIds::default();
    let mut index = SubscriptionIndex::new();
    let mut wheel: TimingWheel<u32> = TimingWheel::new(0);
    let mut timers: Vec<TimerId> = Vec::with_capacity(N);
    for i in 0..N {
        let id: Arc<str> = Arc::from(client_id(i));
        let filter: Arc<str> = Arc::from(format!("devices/{id}/cmd"));
        let key = sessions.insert(Session::new(id, Version::V311));
        by_client.insert(key as u32, &sessions);
        sessions[key].subs.reserve_exact(1);
        sessions[key].subs.push((filter.clone(), 1, 0));
        index.insert(
            &filter,
            Subscriber {
                session: key as u32,
                options: 1,
                sub_id: 0,
            },
        );
        // One keep-alive entry per connection, spread over 270 s (1.5 × 180 s).
        timers.push(wheel.insert(1 + (i as u64 % 270), key as u32));
    }
    let build = t.elapsed();
    // `timers` stands in for the TimerId each Conn holds (already counted in size_of Conn).
    let timers_vec = (timers.capacity() * std::mem::size_of::<TimerId>()) as isize;
    let heap = HEAP.load(Relaxed) - base - timers_vec;
    let conn = std::mem::size_of::<Option<Conn>>(); // a slab entry
    let per_session = heap as f64 / N as f64;

    let t = Instant::now();
    let mut found = 0usize;
    for i in 0..N {
        let id = client_id(i);
        if let Some(k) = by_client.get(&id, &sessions) {
            let topic = format!("devices/{id}/cmd");
            index.for_each_match(&topic, |s| {
                if s.session == k {
                    found += 1;
                }
            });
        }
    }
    let lookup = t.elapsed();
    assert_eq!(found, N, "every device found by id and by topic");

    let t = Instant::now();
    for (i, timer) in timers.drain(..).enumerate() {
        let id = client_id(i);
        let key = by_client.remove(&id, &sessions).expect("session") as usize;
        let s = sessions.remove(key);
        for (filter, ..) in &s.subs {
            index.remove(filter, key as u32);
        }
        wheel.cancel(timer);
    }
    let teardown = t.elapsed();
    assert!(index.is_empty() && by_client.is_empty() && sessions.is_empty() && wheel.is_empty());
    drop(black_box((sessions, by_client, index, wheel, timers)));
    let left = HEAP.load(Relaxed) - base;

    println!("| 1,000,000 sessions in one shard's data structures | value |");
    println!("|---|---|");
    println!(
        "| heap per session (session, id map, subscription, wheel entry) | {per_session:.0} B |"
    );
    println!("| + connection slab entry (size_of Option<Conn>) | {conn} B |");
    println!(
        "| = user-space bytes per idle connection (excl. kernel socket) | {:.0} B |",
        per_session + conn as f64
    );
    println!("| size_of Session | {} B |", std::mem::size_of::<Session>());
    println!(
        "| build 1M | {:.2} s ({:.0} ns/session) |",
        build.as_secs_f64(),
        build.as_nanos() as f64 / N as f64
    );
    println!(
        "| look up 1M (id map + topic match) | {:.2} s ({:.0} ns/device) |",
        lookup.as_secs_f64(),
        lookup.as_nanos() as f64 / N as f64
    );
    println!(
        "| tear down 1M | {:.2} s ({:.0} ns/session) |",
        teardown.as_secs_f64(),
        teardown.as_nanos() as f64 / N as f64
    );
    println!("| heap left after teardown | {left} B |");
    println!(
        "{{\"bench\":\"sessions\",\"sessions\":{N},\"heap_bytes_per_session\":{per_session:.1},\"conn_slab_entry_bytes\":{conn},\"bytes_per_idle_connection\":{:.1},\"build_s\":{:.3},\"lookup_s\":{:.3},\"teardown_s\":{:.3},\"heap_left_bytes\":{left}}}",
        per_session + conn as f64,
        build.as_secs_f64(),
        lookup.as_secs_f64(),
        teardown.as_secs_f64()
    );
}
