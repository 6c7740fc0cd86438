//! Unit tests of the verdict, the per-subscriber loss and the fanout options.

use clap::Parser;
use serde_json::json;

use super::summary::{loss_per_subscriber, verdict, Summary, EXIT_LOST, EXIT_MEASURED_NOTHING};
use crate::cli::Command;
use crate::proto::DeviceCount;

fn cmd(args: &[&str]) -> Command {
    let mut argv = vec!["loadgen"];
    argv.extend_from_slice(args);
    crate::cli::Cli::try_parse_from(argv)
        .unwrap()
        .command
        .unwrap()
}

fn summary(fields: &[(&str, u64)]) -> Summary {
    let mut s = Summary::default();
    for (k, v) in fields {
        s.put(k, *v);
    }
    s
}

#[test]
fn a_run_that_measured_nothing_fails() {
    let connect = cmd(&["connect"]);
    let nothing = summary(&[("connected", 0), ("failed", 50)]);
    let (code, why) = verdict(&connect, &nothing).unwrap();
    assert_eq!(code, EXIT_MEASURED_NOTHING);
    assert!(why.contains("connected is 0"), "{why}");
    assert_eq!(verdict(&connect, &summary(&[("connected", 1)])), None);

    let fanout = cmd(&["fanout"]);
    let no_delivery = summary(&[("subscribed", 5), ("published", 10), ("delivered", 0)]);
    assert_eq!(
        verdict(&fanout, &no_delivery).unwrap().0,
        EXIT_MEASURED_NOTHING
    );
    let churn = cmd(&["churn"]);
    assert_eq!(
        verdict(&churn, &summary(&[("completed", 0)])).unwrap().0,
        EXIT_MEASURED_NOTHING
    );
}

#[test]
fn loss_fails_only_when_no_loss_was_expected() {
    let lossy = summary(&[
        ("subscribed", 2),
        ("published", 10),
        ("expected", 20),
        ("delivered", 19),
        ("lost", 1),
    ]);
    assert_eq!(verdict(&cmd(&["fanout"]), &lossy), None);
    let (code, why) = verdict(&cmd(&["fanout", "--expect-no-loss"]), &lossy).unwrap();
    assert_eq!(code, EXIT_LOST);
    assert!(why.contains("1 of 20"), "{why}");
}

#[test]
fn loss_is_reported_per_subscriber() {
    let d = |index, unique, duplicates| DeviceCount {
        index,
        unique,
        duplicates,
    };
    let v = loss_per_subscriber(|_| 10, &[d(0, 10, 0), d(1, 7, 2), d(2, 9, 0)], "s-{i}");
    assert_eq!(v["subscribers"], 3);
    assert_eq!((v["min"].as_u64(), v["max"].as_u64()), (Some(0), Some(3)));
    assert_eq!(v["mean"], 1.333);
    assert_eq!(v["with_loss"], 2);
    assert_eq!(v["with_duplicates"], 1);
    assert_eq!(v["worst"], json!({"s-1": 3, "s-2": 1}));
    assert!(loss_per_subscriber(|_| 10, &[], "s-{i}")["max"].is_null());
}

#[test]
fn fanout_options_for_a_plain_mqtt_burst() {
    let Command::Fanout(a) = cmd(&[
        "fanout",
        "--qos",
        "1",
        "--sub-qos",
        "2",
        "--protocol",
        "5",
        "--sub-version",
        "4",
        "--window",
        "100",
        "--burst",
        "20000",
    ]) else {
        panic!()
    };
    assert_eq!((a.sub_qos(), a.sub_version(), a.window), (2, 4, 100));
    assert_eq!(a.planned(), 20000);
    let Command::Fanout(b) = cmd(&["fanout", "--rate", "50", "--duration", "3"]) else {
        panic!()
    };
    assert_eq!((b.sub_qos(), b.sub_version(), b.planned()), (0, 4, 150));
    let err = cmd(&["fanout", "--rate", "0"]).validate().unwrap_err();
    assert!(err.contains("--burst"), "{err}");
    assert!(cmd(&["fanout", "--rate", "0", "--burst", "5"])
        .validate()
        .is_ok());
}
