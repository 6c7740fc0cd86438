//! What one shard waking another costs this machine in CPU time: the price of the
//! cross-shard hop at low rates, where each batch handed to the other shard finds it
//! asleep (issue 25's per-device benchmark: ~5 messages per wake-up).
//!
//! A shard waits in `epoll_wait` and is woken through an eventfd (tokio's driver does
//! exactly this under its current-thread runtime: `mio::Poll` and `mio::Waker`). Here a
//! "sleeper" thread waits the same way and a "waker" thread sleeps `WAKE_GAP_US`
//! (2,000 µs: a publisher's tick in the per-device benchmark) and then wakes it, `N`
//! times. The same run without the wake is the baseline: the waker's own timer sleep
//! costs it something too, which is not the hop's. Each thread's CPU time comes from
//! `CLOCK_THREAD_CPUTIME_ID`. With `WAKE_BUSY=2`, two threads spin meanwhile, as the load
//! generator keeps both cores busy in the real run, so that a wake must also preempt.
//!
//! ```sh
//! cargo bench --bench thread_wake                     # 5,000 wakes, 3 rounds
//! WAKE_BUSY=2 WAKE_N=5000 WAKE_ROUNDS=3 cargo bench --bench thread_wake
//! WAKE_PER_MESSAGES=10 cargo bench --bench thread_wake  # what it costs per 100k messages
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mio::{Events, Poll, Token, Waker};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One run: CPU ns of the sleeper and of the waker, and the wakes the sleeper saw.
struct Run {
    sleeper_ns: u64,
    waker_ns: u64,
    woken: u64,
}

fn run(n: u64, gap: Duration, wake: bool) -> Run {
    let mut poll = Poll::new().expect("epoll");
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("eventfd"));
    let stop = Arc::new(AtomicBool::new(false));
    let woken = Arc::new(AtomicU64::new(0));
    let (s, w) = (stop.clone(), woken.clone());
    let sleeper = std::thread::spawn(move || {
        let start = thread_cpu_ns();
        let mut events = Events::with_capacity(16);
        while !s.load(Ordering::Acquire) {
            poll.poll(&mut events, None).expect("epoll_wait");
            if !events.is_empty() {
                w.fetch_add(1, Ordering::Relaxed);
            }
        }
        thread_cpu_ns() - start
    });
    std::thread::sleep(Duration::from_millis(20));
    let start = thread_cpu_ns();
    for _ in 0..n {
        std::thread::sleep(gap);
        if wake {
            waker.wake().expect("eventfd write");
        }
    }
    let waker_ns = thread_cpu_ns() - start;
    stop.store(true, Ordering::Release);
    waker.wake().expect("eventfd write");
    let sleeper_ns = sleeper.join().expect("sleeper");
    Run {
        sleeper_ns,
        waker_ns,
        woken: woken.load(Ordering::Relaxed).saturating_sub(1),
    }
}

fn main() {
    let n = env("WAKE_N", 5_000);
    let gap = Duration::from_micros(env("WAKE_GAP_US", 2_000));
    let rounds = env("WAKE_ROUNDS", 3);
    let busy = env("WAKE_BUSY", 0);
    // Messages delivered per wake of the other shard: 10 in the per-device benchmark
    // (5,000 wakes of the second shard for the 50,000 messages of a 10 s window).
    let per = env("WAKE_PER_MESSAGES", 10);
    let spin = Arc::new(AtomicBool::new(true));
    let spinners: Vec<_> = (0..busy)
        .map(|_| {
            let spin = spin.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while spin.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    println!(
        "thread_wake: {n} wakes {} µs apart, {busy} spinning threads, {rounds} rounds",
        gap.as_micros()
    );
    let mut per_wake = Vec::new();
    for round in 1..=rounds {
        let base = run(n, gap, false);
        let woke = run(n, gap, true);
        assert_eq!(base.woken, 0, "the baseline woke its sleeper");
        let sleeper = woke.sleeper_ns as f64 / woke.woken.max(1) as f64 / 1e3;
        let waker = (woke.waker_ns as f64 - base.waker_ns as f64) / n as f64 / 1e3;
        per_wake.push(sleeper + waker);
        println!(
            "  round {round}: {} wakes seen; per wake: sleeper {sleeper:.2} µs, waker {waker:+.2} µs \
             over its baseline ({:.2} µs per timer sleep alone), together {:.2} µs",
            woke.woken,
            base.waker_ns as f64 / n as f64 / 1e3,
            sleeper + waker
        );
    }
    spin.store(false, Ordering::Relaxed);
    for s in spinners {
        s.join().expect("spinner");
    }
    per_wake.sort_by(f64::total_cmp);
    let median = per_wake[per_wake.len() / 2];
    println!(
        "one cross-thread wake: {median:.2} µs of CPU (median of {rounds}); at one wake per \
         {per} messages delivered that is {:.3} s of CPU per 100k messages",
        median * (100_000 / per.max(1)) as f64 / 1e6
    );
}
