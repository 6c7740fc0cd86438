//! How many events per second the event sinks deliver on this machine (docs/BENCHMARKS.md,
//! "Events"). The pipeline of `src/events/` runs as in the gateway (a multi-thread tokio
//! runtime as the business pool, the sink's batching and retries), fed by one thread
//! calling `EventSender::try_emit` like a shard; a `connected` event is ~250 bytes of JSON.
//!
//! ```text
//! cargo run --release --example events_throughput -- webhook <events> [batch_max]
//! cargo run --release --example events_throughput -- nats <nats url> <events> [batch_max] [jetstream]
//! cargo run --release --example events_throughput -- serve <addr>
//! ```
//!
//! `serve` is only the webhook receiver (for a whole gateway under load): it answers 200
//! to every POST on `/hook` and prints the events received so far each second.
//!
//! The webhook is an axum server in the same process on loopback answering 200; NATS is
//! whatever server the URL names. The time is from the first event emitted to the last
//! one counted as sent (acknowledged by the webhook or JetStream, or flushed to NATS).

use std::time::{Duration, Instant};

use gateway::codec::Version;
use gateway::config::Config;
use gateway::events::{Connected, Event, EventKind, Events, SeqGen};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: events_throughput webhook <events> [batch_max] | nats <url> <events> [batch_max] [jetstream]";
    let (sink, rest) = args.split_first().expect(usage);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if sink == "serve" {
        runtime.block_on(serve_counting(&rest[0]));
        return;
    }
    let (events_toml, n, batch) = match sink.as_str() {
        "webhook" => {
            let url = runtime.block_on(serve_webhook());
            (format!("webhook_url = \"{url}\"\n"), &rest[0], rest.get(1))
        }
        "nats" => {
            let js = rest.get(3).is_some_and(|a| a == "jetstream");
            (
                format!("nats_url = \"{}\"\njetstream = {js}\n", rest[0]),
                &rest[1],
                rest.get(2),
            )
        }
        _ => panic!("{usage}"),
    };
    let n: usize = n.parse().expect("events: a number");
    let batch = batch.map_or("100", |b| b.as_str());
    let config = Config::from_toml_str(&format!(
        "[events]\n{events_toml}batch_max = {batch}\nlinger_ms = 5\nqueue_capacity = {n}\n"
    ))
    .expect("config")
    .events;
    let events = Events::start(&config, "bench", runtime.handle()).expect("sinks start");
    let name = if sink == "webhook" { "webhook" } else { "nats" };
    let sent = events.sink(name).expect("sink").sent.clone();
    let started = Instant::now();
    let mut seq = SeqGen::default();
    for i in 0..n {
        events.sender.try_emit(connected(&mut seq, i));
    }
    let emitted = started.elapsed();
    while (sent.get() as usize) < n {
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = started.elapsed();
    println!(
        "{name} batch_max={batch}: {n} events in {:.2} s = {:.0} events/s (emitting took {:.3} s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        emitted.as_secs_f64()
    );
    events.close(Duration::from_secs(5));
}

/// A `connected` event of MQTT 5 client `dev-<i>`.
fn connected(seq: &mut SeqGen, i: usize) -> Event {
    let kind = EventKind::Connected(Box::new(Connected {
        username: Some(format!("user-{i}")),
        peer: "10.1.2.3:40000".parse().unwrap(),
        version: Version::V5,
        keep_alive: 60,
        clean_start: true,
        session_present: false,
    }));
    Event::now(seq.next_seq(), format!("dev-{i}").into(), kind)
}

/// A webhook on a free loopback port that takes every POST; its URL.
async fn serve_webhook() -> String {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/hook", post(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hook")
}

/// A webhook on `addr` that takes every POST and prints the events received each second.
async fn serve_counting(addr: &str) {
    use axum::routing::post;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| async move {
            let events = body.windows(7).filter(|w| *w == b"\"kind\":").count();
            counter.fetch_add(events as u64, Ordering::Relaxed);
            "ok"
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    tokio::spawn(async move { axum::serve(listener, app).await });
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("received {}", count.load(Ordering::Relaxed));
    }
}
