//! The counting filter against the exact matcher: no false negatives, and removal undoes.

use proptest::prelude::*;

use super::*;
use crate::topic::matches;

/// Levels drawn from a small alphabet so filters and topics collide often.
fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("a".to_string()),
        Just("b".to_string()),
        Just("dev".to_string()),
        Just("$SYS".to_string()),
        "[a-c]{1,3}",
    ]
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..6).prop_map(|v| v.join("/"))
}

fn filter() -> impl Strategy<Value = String> {
    let part = prop_oneof![4 => level(), 1 => Just("+".to_string())];
    (prop::collection::vec(part, 1..6), any::<bool>()).prop_map(|(mut v, hash)| {
        if hash {
            v.push("#".to_string());
        }
        v.join("/")
    })
}

proptest! {
    #[test]
    fn a_matching_subscription_is_always_found(f in filter(), t in topic(), shards in 1usize..4, home in 0usize..4) {
        let home = home % shards;
        // Few buckets: collisions are frequent, and must never hide a match.
        let interest = ShardInterest::new(shards, 64);
        interest.add(home, &f);
        let keys = TopicKeys::of(&t);
        if matches(&f, &t) {
            prop_assert!(interest.may_match(home, &keys), "{f} matches {t} but shard {home} was skipped");
        }
        interest.remove(home, &f);
        prop_assert_eq!(interest.occupied(home), 0);
    }

    #[test]
    fn with_many_buckets_an_unrelated_exact_topic_is_skipped(a in "[a-z]{4,12}", b in "[a-z]{4,12}") {
        prop_assume!(a != b);
        let interest = ShardInterest::new(2, 1 << 16);
        interest.add(1, &format!("devices/{a}/cmd"));
        let keys = TopicKeys::of(&format!("devices/{b}/cmd"));
        // A collision is possible but rare at 65,536 buckets; tolerate it only when one
        // of the topic's keys (the exact one or a prefix's) really lands in the bucket of
        // the subscribed filter's key.
        if interest.may_match(1, &keys) {
            let taken = interest.bucket(filter_key(&format!("devices/{a}/cmd")));
            prop_assert!(keys.keys[..keys.len].iter().any(|&h| interest.bucket(h) == taken));
        }
        prop_assert!(!interest.may_match(0, &keys), "shard 0 has no subscription at all");
    }
}

#[test]
fn wildcards_cover_what_they_match_and_nothing_else_on_other_shards() {
    let interest = ShardInterest::new(3, 1 << 12);
    interest.add(0, "sensors/+/temp");
    interest.add(1, "alerts/#");
    interest.add(2, "#");
    let on = |t: &str| -> Vec<bool> {
        let k = TopicKeys::of(t);
        (0..3).map(|s| interest.may_match(s, &k)).collect()
    };
    assert_eq!(on("sensors/kitchen/temp"), [true, false, true]);
    assert_eq!(on("alerts"), [false, true, true]);
    assert_eq!(on("alerts/fire/now"), [false, true, true]);
    assert_eq!(on("other"), [false, false, true]);
    interest.remove(2, "#");
    assert_eq!(on("other"), [false, false, false]);
}

#[test]
fn a_shared_subscription_counts_on_its_groups_owner_shard() {
    let shards = 4;
    let interest = ShardInterest::new(shards, 1 << 12);
    let owner = home_shard("g/jobs/+", shards);
    let member_home = (owner + 1) % shards;
    interest.add(member_home, "$share/g/jobs/+");
    let keys = TopicKeys::of("jobs/1");
    for s in 0..shards {
        assert_eq!(interest.may_match(s, &keys), s == owner, "shard {s}");
    }
    interest.remove(member_home, "$share/g/jobs/+");
    assert!(!interest.may_match(owner, &keys));
}

#[test]
fn off_or_too_deep_means_every_shard() {
    let off = ShardInterest::off();
    assert!(off.may_match(5, &TopicKeys::of("a/b")));
    let on = ShardInterest::new(2, 1 << 10);
    let deep = vec!["x"; MAX_LEVELS + 1].join("/");
    assert!(on.may_match(0, &TopicKeys::of(&deep)));
    let just_fits = vec!["x"; MAX_LEVELS].join("/");
    assert!(!on.may_match(0, &TopicKeys::of(&just_fits)));
    on.add(1, &just_fits);
    assert!(on.may_match(1, &TopicKeys::of(&just_fits)));
}

#[test]
fn a_bucket_shared_by_more_than_255_subscriptions_stays_busy_rather_than_wrap() {
    let interest = ShardInterest::new(1, 1 << 10);
    let keys = TopicKeys::of("broadcast/all");
    for _ in 0..300 {
        interest.add(0, "broadcast/all");
    }
    for _ in 0..299 {
        interest.remove(0, "broadcast/all");
    }
    // One subscription is left: it must still be found (a wrapped counter would read 0
    // after 256 adds).
    assert!(interest.may_match(0, &keys));
    interest.remove(0, "broadcast/all");
    assert!(interest.may_match(0, &keys), "stuck at 255: busy for good");
    assert_eq!(interest.occupied(0), 1);
}
