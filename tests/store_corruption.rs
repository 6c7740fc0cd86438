//! A damaged or empty store file stops the start with a clear error, even where redb
//! panics on it; a record whose bytes changed on disk is refused and counted while the
//! good ones load.

mod common;

use std::ffi::OsStr;
use std::time::Duration;

use common::store::*;
use common::{tempdir, v4, GatewayProcess};
use serde_json::json;

/// Writes a config for the store in `dir` and runs the gateway (or `args` after it) to its
/// exit: the exit code and stderr.
fn run_on_store(dir: &tempdir::Dir, args: &[&str]) -> (Option<i32>, String) {
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n{}",
            store_toml(dir)
        ),
    )
    .unwrap();
    let mut argv = vec![OsStr::new("--config"), config.as_os_str()];
    argv.extend(args.iter().map(OsStr::new));
    let (code, _out, err) = common::run_gateway(&argv, Duration::from_secs(20));
    (code, err)
}

/// The documented store error: exit 1, the file named, repair and moving it aside offered,
/// no panic message.
fn assert_store_error(code: Option<i32>, err: &str, file: &std::path::Path) {
    assert_eq!(code, Some(1), "{err}");
    let path = file.display().to_string();
    assert!(err.contains(&path), "names the file: {err}");
    assert!(err.contains("gateway store-repair"), "offers repair: {err}");
    assert!(
        err.contains(&format!("mv {path}")),
        "offers moving it aside: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Replaces every occurrence of `from` in `file` by `to` (same length); returns how many.
fn patch_file(file: &std::path::Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(file).expect("store file");
    let mut count = 0;
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(from.len()).position(|w| w == from) {
        bytes[at + i..at + i + to.len()].copy_from_slice(to);
        at += i + from.len();
        count += 1;
    }
    std::fs::write(file, bytes).expect("write store file");
    count
}

#[test]
fn a_corrupt_store_file_stops_the_start_with_a_clear_error() {
    let dir = tempdir::Dir::new("corrupt");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("gateway.redb");
    let garbage: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&file, garbage).unwrap();

    let (code, err) = run_on_store(&dir, &[]);
    assert_store_error(code, &err, &file);

    // The repair command says it cannot help with this one, and fails.
    let (code, err) = run_on_store(&dir, &["store-repair"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");

    // Moved aside, the gateway starts with an empty store.
    std::fs::rename(&file, data.join("gateway.redb.broken")).unwrap();
    let gw = GatewayProcess::start(&store_toml(&dir));
    drop(gw);
}

/// Issue 17 item 9: an empty store file is not taken for a new store (it may be one a
/// failed disk or copy truncated): the start stops with the store error and leaves it.
#[test]
fn a_zero_byte_store_file_stops_the_start_with_the_store_error() {
    let dir = tempdir::Dir::new("empty-store");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("gateway.redb");
    std::fs::write(&file, b"").unwrap();

    let (code, err) = run_on_store(&dir, &[]);
    assert_store_error(code, &err, &file);
    assert!(err.contains("empty (0 bytes)"), "says why: {err}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0, "left as it was");
    let (code, err) = run_on_store(&dir, &["store-repair"]);
    assert_eq!(code, Some(1), "store-repair on an empty file: {err}");
}

/// Issue 17 item 9: a key that is no longer UTF-8 makes redb panic while the start reads
/// the store (it unwraps the key's UTF-8); the start ends with the store error, exit 1,
/// not a panic (exit 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_redb_panics_on_stops_the_start_with_the_store_error() {
    let dir = tempdir::Dir::new("panic-store");
    let mut gw = GatewayProcess::start(&store_toml(&dir));
    let (mut c, _) = connect_device(&gw, "panic-key-0001").await;
    c.subscribe("panic/key", v4::QoS::AtLeastOnce).await;
    disconnect(c).await;
    stop(&mut gw);
    let file = dir.0.join("data").join("gateway.redb");
    assert!(patch_file(&file, b"panic-key-0001", b"panic-key-\xff001") > 0);

    let (code, err) = run_on_store(&dir, &[]);
    assert_store_error(code, &err, &file);
    let (code, err) = run_on_store(&dir, &["store-repair"]);
    assert_eq!(code, Some(1), "store-repair: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Issue 17 item 9: a stored message whose payload bytes changed on disk is refused, not
/// delivered: counted in `gateway_store_corrupt_records_total` and deleted, while the
/// other sessions and messages of the store load and are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_on_disk_is_refused_and_counted_while_the_good_ones_load() {
    let dir = tempdir::Dir::new("corrupt-record");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let ids = ["rec-a", "rec-b", "rec-c"];
    for id in ids {
        let (mut c, _) = connect_device(&gw, id).await;
        c.subscribe(&format!("rec/{id}"), v4::QoS::AtLeastOnce)
            .await;
        disconnect(c).await;
        let push = json!({"client_id": id, "topic": format!("rec/{id}"),
                          "payload": format!("payload-of-{id}-0123456789"), "qos": 1});
        let (code, body) = post(&gw, "/v1/push", push).await;
        assert_eq!((code, &body["status"]), (200, &json!("queued")), "{body}");
    }
    stop(&mut gw);
    let file = dir.0.join("data").join("gateway.redb");
    let changed = patch_file(
        &file,
        b"payload-of-rec-b-0123456789",
        b"payload-of-rec-b-0123456788",
    );
    assert!(changed > 0, "the payload is in the file");

    let gw = GatewayProcess::start(&extra);
    for id in ids {
        let (mut c, present) = connect_device(&gw, id).await;
        assert!(present, "{id}: the session loaded");
        let got = c.next_publish(Duration::from_millis(if id == "rec-b" {
            500
        } else {
            10_000
        }));
        match (id, got.await) {
            ("rec-b", None) => {}
            ("rec-b", Some(p)) => panic!("the corrupt message was delivered: {p:?}"),
            (_, Some(p)) => assert_eq!(p.payload, format!("payload-of-{id}-0123456789")),
            (_, None) => panic!("{id}: its message did not come"),
        }
        c.task.abort();
    }
    assert_eq!(gw.metric("gateway_store_corrupt_records_total").await, 1.0);
}
