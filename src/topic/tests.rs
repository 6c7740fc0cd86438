//! Unit tests of topic validation, matching and the subscription index, with property
//! tests of the index against a plain list of filters.

use super::*;
use proptest::prelude::*;
use std::collections::HashMap as StdHashMap;

fn sub(session: u32, options: u8) -> Subscriber {
    Subscriber {
        session,
        options,
        sub_id: 0,
    }
}

fn arc(s: &str) -> Arc<str> {
    Arc::from(s)
}

/// Matches as (session, options) pairs, sorted.
fn matched(index: &SubscriptionIndex, topic: &str) -> Vec<(u32, u8)> {
    let mut out = Vec::new();
    index.for_each_match(topic, |s| out.push((s.session, s.options)));
    out.sort_unstable();
    out
}

#[test]
fn validates_topic_filters_like_the_spec() {
    for valid in [
        "sport/tennis/player1/#",
        "sport/tennis/#",
        "sport/#",
        "#",
        "+",
        "+/tennis/#",
        "sport/+/player1",
        "sport/+",
        "/+",
        "+/+",
        "/finance",
        "sport//x",
        "/",
        "$SYS/#",
        "$SYS/monitor/+",
        "$share/group/a/+",
    ] {
        assert!(valid_topic_filter(valid), "{valid:?} should be valid");
    }
    for invalid in [
        "",
        "sport/tennis#",
        "sport/tennis/#/ranking",
        "sport+",
        "sport/+x/a",
        "#/a",
        "##",
        "++",
        "a\0b",
    ] {
        assert!(
            !valid_topic_filter(invalid),
            "{invalid:?} should be invalid"
        );
    }
    assert!(valid_topic_filter(&"a".repeat(MAX_TOPIC_LEN)));
    assert!(!valid_topic_filter(&"a".repeat(MAX_TOPIC_LEN + 1)));
}

#[test]
fn validates_topic_names() {
    for valid in ["sport/tennis", "/", "//", "$SYS/broker/load", "a b/ü"] {
        assert!(valid_topic_name(valid), "{valid:?} should be valid");
    }
    for invalid in ["", "sport/+", "sport/#", "+", "#", "a\0"] {
        assert!(!valid_topic_name(invalid), "{invalid:?} should be invalid");
    }
    assert!(valid_topic_name(&"/".repeat(MAX_TOPIC_LEN)));
    assert!(!valid_topic_name(&"/".repeat(MAX_TOPIC_LEN + 1)));
}

#[test]
fn matches_the_spec_examples() {
    let cases = [
        ("sport/tennis/player1/#", "sport/tennis/player1", true),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking",
            true,
        ),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon",
            true,
        ),
        ("sport/#", "sport", true),
        ("#", "sport/tennis", true),
        ("sport/tennis/+", "sport/tennis/player1", true),
        ("sport/tennis/+", "sport/tennis/player1/ranking", false),
        ("sport/+", "sport", false),
        ("sport/+", "sport/", true),
        ("+/+", "/finance", true),
        ("/+", "/finance", true),
        ("+", "/finance", false),
        ("sport/tennis", "sport/tennis", true),
        ("sport/tennis", "sport/tennis/", false),
        ("sport/tennis", "Sport/tennis", false),
        ("+/tennis/#", "sport/tennis", true),
        ("sport/+/player1", "sport/golf/player1", true),
        ("sport/+/player1", "sport/golf/player2", false),
    ];
    for (filter, topic, expected) in cases {
        assert_eq!(matches(filter, topic), expected, "{filter:?} vs {topic:?}");
    }
}

#[test]
fn wildcards_in_the_first_level_skip_dollar_topics() {
    assert!(!matches("#", "$SYS/broker"));
    assert!(!matches("+/broker", "$SYS/broker"));
    assert!(!matches("+", "$SYS"));
    assert!(matches("$SYS/#", "$SYS/broker"));
    assert!(matches("$SYS/+", "$SYS/broker"));
    assert!(matches("$SYS/broker", "$SYS/broker"));
    assert!(matches("a/+", "a/$x"));
    assert!(matches("#", "a/$x"));
}

#[test]
fn parses_shared_subscriptions() {
    assert_eq!(parse_shared("$share/g1/a/b"), Some(("g1", "a/b")));
    assert_eq!(parse_shared("$share/g/#"), Some(("g", "#")));
    assert_eq!(parse_shared("$share/g//"), Some(("g", "/")));
    assert_eq!(parse_shared("$share//a"), None);
    assert_eq!(parse_shared("$share/g"), None);
    assert_eq!(parse_shared("$share/g/"), None);
    assert_eq!(parse_shared("$share/g+/a"), None);
    assert_eq!(parse_shared("$share"), None);
    assert_eq!(parse_shared("$SHARE/g/a"), None);
    assert_eq!(parse_shared("a/b"), None);
}

#[test]
fn subscribers_stay_small() {
    assert_eq!(std::mem::size_of::<Subscriber>(), 12);
    assert_eq!(std::mem::size_of::<Subscribers>(), 16);
    assert_eq!(std::mem::size_of::<Option<Subscribers>>(), 16);
    assert_eq!(std::mem::size_of::<(Arc<str>, Subscribers)>(), 32);
}

#[test]
fn insert_replace_and_remove_exact() {
    let mut index = SubscriptionIndex::new();
    let filter = arc("devices/d1/cmd");
    assert!(index.is_empty());
    assert!(index.insert(&filter, sub(1, 1)));
    assert!(!index.insert(&filter, sub(1, 2)), "same session replaces");
    assert_eq!(index.len(), 1);
    assert_eq!(matched(&index, "devices/d1/cmd"), [(1, 2)]);
    assert_eq!(matched(&index, "devices/d2/cmd"), []);

    assert!(index.insert(&filter, sub(2, 0)));
    assert_eq!((index.len(), index.filters()), (2, 1));
    assert_eq!(matched(&index, "devices/d1/cmd"), [(1, 2), (2, 0)]);

    assert_eq!(index.remove("devices/d1/cmd", 3), None);
    assert_eq!(index.remove("devices/other", 1), None);
    assert_eq!(index.remove("devices/d1/cmd", 1), Some(2));
    assert_eq!(index.remove("devices/d1/cmd", 1), None);
    assert_eq!(matched(&index, "devices/d1/cmd"), [(2, 0)]);
    assert_eq!(index.remove("devices/d1/cmd", 2), Some(0));
    assert!(index.is_empty());
    assert_eq!(index.filters(), 0);
    assert!(index.exact.is_empty());
}

#[test]
fn subscription_ids_are_kept_and_replaced_in_every_shape() {
    let ids = |index: &SubscriptionIndex, topic: &str| {
        let mut out = Vec::new();
        index.for_each_match(topic, |s| out.push((s.session, s.sub_id)));
        out.sort_unstable();
        out
    };
    let mut index = SubscriptionIndex::new();
    let filter = arc("ids/+");
    let with_id = |session, sub_id| Subscriber {
        session,
        options: 1,
        sub_id,
    };
    index.insert(&filter, with_id(1, 7));
    assert_eq!(ids(&index, "ids/x"), [(1, 7)]);
    index.insert(&filter, with_id(1, 0));
    assert_eq!(
        ids(&index, "ids/x"),
        [(1, 0)],
        "a SUBSCRIBE without an id removes it"
    );
    // Few, then Many (more than FEW_MAX), then back: the ids stay with their sessions.
    for session in 2..=40 {
        index.insert(&filter, with_id(session, session * 10));
    }
    let got = ids(&index, "ids/x");
    assert_eq!(got.len(), 40);
    assert!(got[1..].iter().all(|&(s, id)| id == s * 10));
    for session in 10..=40 {
        index.remove(&filter, session);
    }
    assert_eq!(
        ids(&index, "ids/x")[1..],
        [
            (2, 20),
            (3, 30),
            (4, 40),
            (5, 50),
            (6, 60),
            (7, 70),
            (8, 80),
            (9, 90)
        ]
    );
}

#[test]
fn index_shares_the_filter_string() {
    let mut index = SubscriptionIndex::new();
    let filter = arc("devices/d1/cmd");
    index.insert(&filter, sub(1, 0));
    assert_eq!(Arc::strong_count(&filter), 2);
    index.remove(&filter, 1);
    assert_eq!(Arc::strong_count(&filter), 1);
}

#[test]
fn insert_replace_and_remove_wildcards() {
    let mut index = SubscriptionIndex::new();
    assert!(index.insert(&arc("sport/+/player1"), sub(1, 0)));
    assert!(index.insert(&arc("sport/#"), sub(2, 1)));
    assert!(index.insert(&arc("#"), sub(3, 0)));
    assert!(index.insert(&arc("sport/tennis/player1"), sub(4, 0)));
    assert!(!index.insert(&arc("sport/#"), sub(2, 2)));
    assert_eq!((index.len(), index.filters()), (4, 4));

    assert_eq!(
        matched(&index, "sport/tennis/player1"),
        [(1, 0), (2, 2), (3, 0), (4, 0)]
    );
    assert_eq!(matched(&index, "sport"), [(2, 2), (3, 0)]);
    assert_eq!(matched(&index, "news"), [(3, 0)]);
    assert_eq!(matched(&index, "$SYS/x"), []);

    assert_eq!(index.remove("sport/#", 9), None);
    assert_eq!(index.remove("sport/+/player2", 1), None);
    assert_eq!(index.remove("sport/#", 2), Some(2));
    assert_eq!(matched(&index, "sport"), [(3, 0)]);
    assert_eq!(index.len(), 3);
}

#[test]
fn one_session_through_several_filters_is_reported_per_filter() {
    let mut index = SubscriptionIndex::new();
    index.insert(&arc("a/b"), sub(7, 0));
    index.insert(&arc("a/+"), sub(7, 1));
    index.insert(&arc("a/#"), sub(7, 2));
    assert_eq!(matched(&index, "a/b"), [(7, 0), (7, 1), (7, 2)]);
}

#[test]
fn removing_everything_prunes_the_trie() {
    let filters = [
        "a/+/c",
        "a/+/c/#",
        "a/b/+",
        "a/#",
        "+",
        "#",
        "+/+/+/+/x",
        "//+",
        "a/+/c/d/e/f/+",
    ];
    let mut index = SubscriptionIndex::new();
    for (session, filter) in filters.iter().enumerate() {
        index.insert(&arc(filter), sub(session as u32, 0));
        index.insert(&arc(filter), sub(100, 0));
    }
    assert!(index.trie_nodes() > 0);
    // Remove in an order that leaves shared prefixes behind for a while.
    for (session, filter) in filters.iter().enumerate().rev() {
        assert_eq!(index.remove(filter, session as u32), Some(0));
    }
    for filter in filters {
        assert_eq!(index.remove(filter, 100), Some(0));
    }
    assert!(index.is_empty());
    assert_eq!(index.filters(), 0);
    assert_eq!(index.trie_nodes(), 0);
    assert!(index.wildcard.is_empty());
}

#[test]
fn pruning_keeps_nodes_still_in_use() {
    let mut index = SubscriptionIndex::new();
    index.insert(&arc("a/b/+/d"), sub(1, 0));
    index.insert(&arc("a/#"), sub(2, 0));
    assert_eq!(index.trie_nodes(), 4);
    index.remove("a/b/+/d", 1);
    // `a` holds the `a/#` subscribers; `b`, `+`, `d` are gone.
    assert_eq!(index.trie_nodes(), 1);
    assert_eq!(matched(&index, "a/b/c"), [(2, 0)]);
    index.remove("a/#", 2);
    assert_eq!(index.trie_nodes(), 0);
}

#[test]
fn big_fan_out_moves_to_a_map_and_back() {
    let mut index = SubscriptionIndex::new();
    let filter = arc("broadcast/all");
    let total = 1000u32;
    for session in 0..total {
        assert!(index.insert(&filter, sub(session, (session % 3) as u8)));
    }
    assert!(!index.insert(&filter, sub(5, 9)));
    assert!(matches!(
        index.exact.get("broadcast/all"),
        Some(Subscribers::Many(_))
    ));
    let got = matched(&index, "broadcast/all");
    assert_eq!(got.len(), total as usize);
    assert_eq!(got[5], (5, 9));

    for session in 0..total - 1 {
        assert!(index.remove("broadcast/all", session).is_some());
    }
    assert!(matches!(
        index.exact.get("broadcast/all"),
        Some(Subscribers::One(_))
    ));
    assert_eq!(
        matched(&index, "broadcast/all"),
        [(total - 1, ((total - 1) % 3) as u8)]
    );
}

#[test]
fn hostile_depth_does_not_overflow_the_stack() {
    // Run on a small stack so recursion per level would fail loudly.
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let deep_plus = arc(&["+"; 32_768].join("/"));
            let deep_literal: Arc<str> = arc(&format!("{}/#", "a/".repeat(30_000)));
            assert!(valid_topic_filter(&deep_plus) && valid_topic_filter(&deep_literal));
            let slashes = "/".repeat(MAX_TOPIC_LEN);

            let mut index = SubscriptionIndex::new();
            index.insert(&deep_plus, sub(1, 0));
            index.insert(&deep_literal, sub(2, 0));
            assert_eq!(matched(&index, &slashes), []);
            let deep_topic = ["x"; 32_768].join("/");
            assert_eq!(matched(&index, &deep_topic), [(1, 0)]);
            assert!(matches(&deep_plus, &deep_topic));

            index.remove(&deep_plus, 1);
            index.remove(&deep_literal, 2);
            assert_eq!(index.trie_nodes(), 0);

            // Dropping a deep trie must not recurse either.
            index.insert(&deep_plus, sub(1, 0));
            index.insert(&deep_literal, sub(2, 0));
            drop(index);
        })
        .expect("spawn")
        .join()
        .expect("deep filters handled without overflow");
}

/// Heap bytes of a hashbrown table, from its capacity (buckets * 7/8 once past 8 buckets).
fn table_bytes<K, V>(map: &HashMap<K, V>) -> usize {
    let buckets = (map.capacity() * 8 / 7).next_power_of_two();
    buckets * (std::mem::size_of::<(K, V)>() + 1) + 16
}

#[test]
fn heap_bytes_of_100k_exact_subscriptions() {
    let count = 100_000;
    let mut index = SubscriptionIndex::new();
    let mut filters = Vec::with_capacity(count);
    for n in 0..count {
        let filter = arc(&format!("devices/{n:020}/cmd"));
        index.insert(&filter, sub(n as u32, 1));
        filters.push(filter);
    }
    assert_eq!(index.len(), count);
    assert_eq!(index.trie_nodes(), 0);

    let table = table_bytes(&index.exact);
    // ArcInner: two counters + the bytes, rounded to the allocator's 8-byte granule.
    let filter_len = "devices/".len() + 20 + "/cmd".len();
    let strings = count * (16 + filter_len).next_multiple_of(8);
    println!(
        "100k exact subscriptions: index table {table} B ({} B/sub); filter strings \
         {strings} B ({} B/sub, shared with the sessions)",
        table / count,
        strings / count
    );
    // 131,072 buckets of 33 bytes: about 43 bytes per subscription.
    assert!(
        table / count <= 48,
        "table costs {} B per subscription",
        table / count
    );

    for (n, filter) in filters.iter().enumerate() {
        assert_eq!(index.remove(filter, n as u32), Some(1));
    }
    assert!(
        index.exact.capacity() <= 64,
        "emptied map gave its memory back"
    );
}

// ---- property tests ----

/// An independent matcher: the spec's rules, recursively over level slices.
fn reference_matches(filter: &str, topic: &str) -> bool {
    fn go(filter: &[&str], topic: &[&str]) -> bool {
        match (filter, topic) {
            ([], []) => true,
            (["#"], _) => true,
            (["+", filter_rest @ ..], [_, topic_rest @ ..]) => go(filter_rest, topic_rest),
            ([wanted, filter_rest @ ..], [level, topic_rest @ ..]) => {
                wanted == level && go(filter_rest, topic_rest)
            }
            _ => false,
        }
    }
    let filter: Vec<&str> = filter.split('/').collect();
    let topic: Vec<&str> = topic.split('/').collect();
    if topic[0].starts_with('$') && (filter[0] == "+" || filter[0] == "#") {
        return false;
    }
    go(&filter, &topic)
}

fn topic_strategy() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "", "$x"]), 1..5)
        .prop_map(|levels| levels.join("/"))
}

fn filter_strategy() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "", "$x", "+"]), 0..4),
        any::<bool>(),
    )
        .prop_filter_map("empty filter", |(mut levels, hash)| {
            if hash {
                levels.push("#");
            }
            let filter = levels.join("/");
            (!filter.is_empty()).then_some(filter)
        })
}

/// An insert (true) or remove of one of the test's filters for a session.
type Op = (bool, prop::sample::Index, u32, u8);

fn op_strategy() -> impl Strategy<Value = Op> {
    (
        any::<bool>(),
        any::<prop::sample::Index>(),
        0..4u32,
        any::<u8>(),
    )
}

proptest! {
    #[test]
    fn matches_agrees_with_reference(filter in filter_strategy(), topic in topic_strategy()) {
        prop_assert!(valid_topic_filter(&filter));
        prop_assert_eq!(matches(&filter, &topic), reference_matches(&filter, &topic));
    }

    #[test]
    fn index_agrees_with_brute_force(
        filters in prop::collection::vec(filter_strategy(), 1..8),
        ops in prop::collection::vec(op_strategy(), 1..80),
        topics in prop::collection::vec(topic_strategy(), 1..10),
    ) {
        let mut index = SubscriptionIndex::new();
        let mut model: StdHashMap<(String, u32), u8> = StdHashMap::new();
        for (is_insert, which, session, options) in ops {
            let filter = which.get(&filters);
            if is_insert {
                let new = model.insert((filter.clone(), session), options).is_none();
                prop_assert_eq!(index.insert(&arc(filter), sub(session, options)), new);
            } else {
                let expected = model.remove(&(filter.clone(), session));
                prop_assert_eq!(index.remove(filter, session), expected);
            }
            prop_assert_eq!(index.len(), model.len());
            let distinct: std::collections::HashSet<&String> =
                model.keys().map(|(filter, _)| filter).collect();
            prop_assert_eq!(index.filters(), distinct.len());
            for f in &filters {
                prop_assert_eq!(index.has_filter(f), distinct.contains(f), "filter {:?}", f);
            }
        }
        for topic in &topics {
            let mut expected: Vec<(u32, u8)> = model
                .iter()
                .filter(|((filter, _), _)| matches(filter, topic))
                .map(|((_, session), options)| (*session, *options))
                .collect();
            expected.sort_unstable();
            prop_assert_eq!(matched(&index, topic), expected, "topic {:?}", topic);
        }
        let remaining: Vec<(String, u32)> = model.keys().cloned().collect();
        for (filter, session) in remaining {
            prop_assert!(index.remove(&filter, session).is_some());
        }
        prop_assert!(index.is_empty());
        prop_assert_eq!(index.filters(), 0);
        prop_assert_eq!(index.trie_nodes(), 0);
        prop_assert!(index.exact.is_empty());
    }
}
