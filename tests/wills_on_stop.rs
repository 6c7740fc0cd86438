//! A graceful stop publishes the wills of the devices it disconnects (`[mqtt]
//! wills_on_stop`, MQTT 5 §3.1.2.5: the server closed the connection without the
//! client's DISCONNECT): a 3.1.1 device's (retained, so kept across the restart by the
//! store), an MQTT 5 device's whose delay has not passed, and the will of an offline
//! session still waiting out its delay; not the will of a device that sent DISCONNECT.
//! With `wills_on_stop = false` none is published. Real gateway processes, rumqttc
//! clients; a persistent subscriber gets what it missed after the restart.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fleet::disconnect;
use common::store::{stop, store_toml};
use common::{tempdir, v4, v5, wait_metric, GatewayProcess};

const T: Duration = Duration::from_secs(10);

/// The persistent subscriber to `will/#` (subscribed at its first connection).
async fn watcher(gw: &GatewayProcess) -> v4::Client {
    let mut o = v4::options(gw.mqtt, "watcher");
    o.set_clean_session(false);
    v4::connect(o).await
}

/// A 3.1.1 device whose will is retained on `will/<id>`, payload `id`.
async fn v4_with_will(gw: &GatewayProcess, id: &str) -> v4::Client {
    let mut o = v4::options(gw.mqtt, id);
    let will = v4::LastWill::new(format!("will/{id}"), id, v4::QoS::AtLeastOnce, true);
    o.set_last_will(will);
    v4::connect(o).await
}

/// Adds the payloads of what `c` receives until `quiet` passes without anything, or
/// until `want` are all in.
async fn collect(c: &mut v4::Client, got: &mut BTreeSet<String>, want: usize, quiet: Duration) {
    while got.len() < want {
        let Some(p) = c.next_publish(quiet).await else {
            return;
        };
        got.insert(String::from_utf8_lossy(&p.payload).into_owned());
    }
}

/// Four devices and a persistent subscriber, then SIGTERM and a restart on the same
/// store: the wills the subscriber got (before the stop or queued for it after), and
/// whether a new subscriber finds dev1's retained will.
async fn wills_of_a_stop(wills_on_stop: bool) -> (BTreeSet<String>, bool) {
    let dir = tempdir::Dir::new("wills-on-stop");
    let config = format!(
        "{}[mqtt]\nwills_on_stop = {wills_on_stop}\n",
        store_toml(&dir)
    );
    let mut gw = GatewayProcess::start(&config);
    let mut w = watcher(&gw).await;
    w.subscribe("will/#", v4::QoS::AtLeastOnce).await;
    let _dev1 = v4_with_will(&gw, "dev1").await;
    let _dev2 = v5::connect_with_will(gw.mqtt, "dev2", 60, 300).await;
    // dev3's connection breaks: its will waits 60 s, its session 300 s.
    let dev3 = v5::connect_with_will(gw.mqtt, "dev3", 60, 300).await;
    dev3.task.abort();
    // dev4 says DISCONNECT: its will is gone.
    disconnect(v4_with_will(&gw, "dev4").await).await;
    let open = wait_metric(gw.http, "gateway_connections", T, |v| v == 3.0).await;
    assert_eq!(open, 3.0, "dev3 and dev4 still connected");
    let mut got = BTreeSet::new();
    collect(&mut w, &mut got, 4, Duration::from_millis(300)).await;
    assert!(got.is_empty(), "wills before the stop: {got:?}");

    stop(&mut gw);
    collect(&mut w, &mut got, 4, Duration::from_millis(200)).await;
    w.task.abort();
    let gw = GatewayProcess::start(&config);
    let mut w = watcher(&gw).await;
    let quiet = if wills_on_stop {
        T
    } else {
        Duration::from_secs(1)
    };
    collect(&mut w, &mut got, 3, quiet).await;
    // Nothing more (dev4's will) comes late.
    collect(&mut w, &mut got, 4, Duration::from_millis(500)).await;

    let mut late = v4::connect(v4::options(gw.mqtt, "late")).await;
    late.subscribe("will/dev1", v4::QoS::AtLeastOnce).await;
    let retained = late.next_publish(Duration::from_secs(1)).await;
    let retained = retained.is_some_and(|p| p.retain && &p.payload[..] == b"dev1");
    (got, retained)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_publishes_the_wills_of_the_devices_it_disconnects() {
    let (got, retained) = wills_of_a_stop(true).await;
    let want: BTreeSet<String> = ["dev1", "dev2", "dev3"].map(String::from).into();
    assert_eq!(got, want);
    assert!(
        retained,
        "dev1's retained will was not kept across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wills_on_stop_off_a_graceful_stop_publishes_none() {
    let (got, retained) = wills_of_a_stop(false).await;
    assert!(got.is_empty(), "wills published: {got:?}");
    assert!(!retained, "a retained will was set");
}
