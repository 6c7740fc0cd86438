//! Access control: which topics a connection may publish to and subscribe to.
//!
//! Rules come from `[acl] rules` and are evaluated in order; the first rule whose action
//! fits and whose topic applies decides, and `no_match` decides when none does. A rule's
//! topic is an MQTT filter whose whole levels may be the templates `%c` (the client id)
//! or `%u` (the username). Templates are expanded while matching, level by level, so the
//! default rule (`devices/%c/#`) costs no per-connection copy and no allocation per
//! PUBLISH: a million devices share the one compiled rule list of their shard.
//!
//! - A PUBLISH topic is allowed by a rule whose filter matches it.
//! - A SUBSCRIBE filter is allowed by an allow rule only if the rule *covers* it: every
//!   topic the filter can match, the rule matches too (so `devices/#` is not allowed to a
//!   client allowed `devices/%c/#`, but `devices/c1/+` is allowed to `c1`). A deny rule
//!   that covers the filter refuses it. A deny rule that only *overlaps* it (some topic
//!   matched by both, like `test/nosubscribe` and `#`) does not decide: the later rules
//!   and `no_match` do, and if they grant the filter it is granted *filtered*
//!   ([`SubscribeGrant::Filtered`]): the shard marks the subscription with
//!   [`ACL_FILTERED`] and checks each message for it with [`Acl::may_receive`], so the
//!   wildcard works but never delivers a denied topic. A subscription no deny rule
//!   overlaps carries no mark and costs nothing at delivery.
//!
//! A connection may carry its own allow lists from its JWT claims or the auth webhook
//! ([`ConnAcl`], kept behind an `Option<Box<_>>` in the session's rarely used state). A
//! list present for an action replaces the configured rules for that action: the listed
//! filters are allowed, everything else is denied.
//!
//! Messages pushed by the backend through the HTTP API are not checked: the backend is
//! trusted, and it is the one that decides what devices may receive.

use serde::Deserialize;

/// Bit 7 of a subscription's options byte (reserved in MQTT 5, refused from clients by
/// the decoder): the ACL granted the filter only in part, so each message delivered
/// through it is checked with [`Acl::may_receive`].
pub(crate) const ACL_FILTERED: u8 = 0x80;

/// The ACL's answer to a SUBSCRIBE filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeGrant {
    Refused,
    Granted,
    /// Granted, but a deny rule overlaps it: check each message ([`ACL_FILTERED`]).
    Filtered,
}

impl SubscribeGrant {
    /// The bits to add to the subscription's options byte, or None when refused. A
    /// shared subscription (`shared`) is never filtered per message (its group hands each
    /// message to one member): an overlapping deny rule refuses it, as before.
    pub fn option_bits(self, shared: bool) -> Option<u8> {
        match self {
            SubscribeGrant::Refused => None,
            SubscribeGrant::Granted => Some(0),
            SubscribeGrant::Filtered if shared => None,
            SubscribeGrant::Filtered => Some(ACL_FILTERED),
        }
    }
}

/// `[acl]` of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// false = every client may publish and subscribe to everything.
    pub enabled: bool,
    /// What happens when no rule applies.
    pub no_match: Permission,
    pub rules: Vec<RuleConfig>,
}

/// One `[[acl.rules]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub permission: Permission,
    pub action: RuleAction,
    pub topic: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Allow,
    Deny,
}

/// What a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Publish,
    Subscribe,
    /// Publish and subscribe.
    All,
}

/// One level of a rule's filter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(Box<str>),
    Plus,
    Hash,
    ClientId,
    Username,
}

/// A topic filter with `%c` / `%u` levels, compiled once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segs: Box<[Seg]>,
}

/// Whose request is checked: the values the templates expand to.
#[derive(Clone, Copy, Debug)]
pub struct Who<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
}

/// A level value that a template may stand for: a client id or username containing a
/// level separator or a wildcard could otherwise widen a rule, so such values never match.
fn usable_level(v: &str) -> bool {
    !v.is_empty() && !v.contains(['/', '+', '#'])
}

impl Pattern {
    /// Compiles a filter; `%c` and `%u` must fill a whole level.
    pub fn parse(filter: &str) -> Result<Pattern, String> {
        if filter.is_empty() {
            return Err("an empty topic filter".into());
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let mut segs = Vec::with_capacity(levels.len());
        for (i, level) in levels.iter().enumerate() {
            let seg = match *level {
                "+" => Seg::Plus,
                "#" if i + 1 == levels.len() => Seg::Hash,
                "#" => return Err(format!("`#` must be the last level in {filter:?}")),
                "%c" => Seg::ClientId,
                "%u" => Seg::Username,
                l if l.contains(['+', '#']) => {
                    return Err(format!("a wildcard must fill a whole level in {filter:?}"))
                }
                l if l.contains('%') && (l.contains("%c") || l.contains("%u")) => {
                    return Err(format!(
                        "%c and %u must fill a whole level (like devices/%c/#) in {filter:?}"
                    ))
                }
                l => Seg::Lit(l.into()),
            };
            segs.push(seg);
        }
        Ok(Pattern { segs: segs.into() })
    }

    /// True if the pattern uses `%u`.
    pub fn uses_username(&self) -> bool {
        self.segs.contains(&Seg::Username)
    }

    /// The literal a level stands for, or None for a wildcard. `Some(None)` is a template
    /// with no usable value: it matches nothing.
    fn literal<'a>(seg: &'a Seg, who: &Who<'a>) -> Option<Option<&'a str>> {
        match seg {
            Seg::Lit(l) => Some(Some(l)),
            Seg::ClientId => Some(Some(who.client_id).filter(|v| usable_level(v))),
            Seg::Username => Some(who.username.filter(|v| usable_level(v))),
            Seg::Plus | Seg::Hash => None,
        }
    }

    /// Whether the pattern matches topic name `topic` (MQTT 4.7 rules: `#` also matches
    /// the parent level; a first-level wildcard does not match a `$` topic).
    pub fn matches(&self, who: &Who, topic: &str) -> bool {
        let mut levels = topic.split('/');
        for (i, seg) in self.segs.iter().enumerate() {
            if i == 0 && matches!(seg, Seg::Plus | Seg::Hash) && topic.starts_with('$') {
                return false;
            }
            if *seg == Seg::Hash {
                return true;
            }
            let Some(level) = levels.next() else {
                return false;
            };
            match Self::literal(seg, who) {
                None => {}
                Some(Some(l)) if l == level => {}
                Some(_) => return false,
            }
        }
        levels.next().is_none()
    }

    /// Whether every topic that `filter` can match is matched by this pattern.
    pub fn covers(&self, who: &Who, filter: &str) -> bool {
        let mut levels = filter.split('/').peekable();
        for (i, seg) in self.segs.iter().enumerate() {
            if i == 0 && matches!(seg, Seg::Plus | Seg::Hash) {
                // The rule skips `$` topics; a filter naming one is not covered.
                if levels.peek().is_some_and(|l| l.starts_with('$')) {
                    return false;
                }
            }
            if *seg == Seg::Hash {
                return true;
            }
            let Some(level) = levels.next() else {
                return false; // the filter matches a shorter topic than the rule does
            };
            if level == "#" {
                // The filter reaches deeper than a non-`#` rule level. Only `+/#` still
                // covers a whole-tree `#`: both match every topic of one level or more.
                return i == 0 && *seg == Seg::Plus && self.segs.get(1) == Some(&Seg::Hash);
            }
            match Self::literal(seg, who) {
                None => {}                                        // `+` covers `+` and any literal
                Some(Some(l)) if level != "+" && l == level => {} // a literal covers itself only
                Some(_) => return false,
            }
        }
        levels.next().is_none()
    }

    /// Whether some topic is matched by both this pattern and `filter`.
    pub fn overlaps(&self, who: &Who, filter: &str) -> bool {
        let mut levels = filter.split('/').peekable();
        for (i, seg) in self.segs.iter().enumerate() {
            let level = levels.next();
            if i == 0 {
                // A first-level wildcard on one side against a `$` literal on the other.
                let rule_wild = matches!(seg, Seg::Plus | Seg::Hash);
                let filter_wild = matches!(level, Some("+") | Some("#"));
                let rule_dollar = Self::literal(seg, who)
                    .flatten()
                    .is_some_and(|l| l.starts_with('$'));
                let filter_dollar = level.is_some_and(|l| l.starts_with('$'));
                if (rule_wild && filter_dollar) || (filter_wild && rule_dollar) {
                    return false;
                }
            }
            if *seg == Seg::Hash || level == Some("#") {
                return true;
            }
            let Some(level) = level else {
                return false;
            };
            match Self::literal(seg, who) {
                None => {}
                Some(Some(_)) if level == "+" => {}
                Some(Some(l)) if l == level => {}
                Some(_) => return false,
            }
        }
        match levels.next() {
            None => true,
            // The rule ended; a filter `x/#` still matches `x` itself.
            Some("#") => levels.next().is_none(),
            Some(_) => false,
        }
    }
}

struct Rule {
    allow: bool,
    publish: bool,
    subscribe: bool,
    pattern: Pattern,
}

/// Allow lists carried by one connection (JWT claims or the auth webhook's answer).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnAcl {
    /// The name authentication vouched for (see [`crate::auth::session_acl`]), never
    /// the CONNECT's own username; kept only when some rule uses `%u` or the connection
    /// has its own lists.
    pub username: Option<Box<str>>,
    /// Replaces the configured rules for PUBLISH when present.
    pub publish: Option<Box<[Pattern]>>,
    /// Replaces the configured rules for SUBSCRIBE when present.
    pub subscribe: Option<Box<[Pattern]>>,
}

impl ConnAcl {
    /// Compiles allow lists from claims; `None` for an absent list.
    pub fn from_lists(
        publish: Option<Vec<String>>,
        subscribe: Option<Vec<String>>,
    ) -> Result<ConnAcl, String> {
        let compile = |l: Option<Vec<String>>| -> Result<Option<Box<[Pattern]>>, String> {
            l.map(|l| l.iter().map(|f| Pattern::parse(f)).collect())
                .transpose()
        };
        Ok(ConnAcl {
            username: None,
            publish: compile(publish)?,
            subscribe: compile(subscribe)?,
        })
    }

    /// No lists: only the authenticated username that `%u` stands for.
    pub fn named(username: &str) -> ConnAcl {
        ConnAcl {
            username: Some(username.into()),
            ..ConnAcl::default()
        }
    }

    /// These lists with `username` as the authenticated name (`None`: no `%u`).
    pub fn with_username(mut self, username: Option<&str>) -> ConnAcl {
        self.username = username.map(Into::into);
        self
    }

    pub fn has_lists(&self) -> bool {
        self.publish.is_some() || self.subscribe.is_some()
    }
}

/// The compiled `[acl]` section; one per shard.
pub struct Acl {
    enabled: bool,
    no_match_allow: bool,
    rules: Box<[Rule]>,
    uses_username: bool,
}

impl Acl {
    pub fn from_config(c: &AclConfig) -> Result<Acl, String> {
        let mut rules = Vec::with_capacity(c.rules.len());
        for (i, r) in c.rules.iter().enumerate() {
            let pattern = Pattern::parse(&r.topic).map_err(|e| format!("acl.rules[{i}]: {e}"))?;
            rules.push(Rule {
                allow: r.permission == Permission::Allow,
                publish: r.action != RuleAction::Subscribe,
                subscribe: r.action != RuleAction::Publish,
                pattern,
            });
        }
        Ok(Acl {
            enabled: c.enabled,
            no_match_allow: c.no_match == Permission::Allow,
            uses_username: rules.iter().any(|r| r.pattern.uses_username()),
            rules: rules.into(),
        })
    }

    /// Everything allowed (no `[acl]` enforcement).
    pub fn disabled() -> Acl {
        Acl {
            enabled: false,
            no_match_allow: true,
            rules: Box::new([]),
            uses_username: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether connections must keep their username for `%u` rules.
    pub fn uses_username(&self) -> bool {
        self.uses_username
    }

    /// May `who` publish to `topic`?
    pub fn may_publish(&self, who: &Who, conn: Option<&ConnAcl>, topic: &str) -> bool {
        if !self.enabled {
            return true;
        }
        if let Some(list) = conn.and_then(|c| c.publish.as_deref()) {
            return list.iter().any(|p| p.matches(who, topic));
        }
        for r in self.rules.iter().filter(|r| r.publish) {
            if r.pattern.matches(who, topic) {
                return r.allow;
            }
        }
        self.no_match_allow
    }

    /// May `who` subscribe to `filter` (a valid filter; for a shared subscription, the
    /// filter inside `$share/{group}/`)? See the module doc for `Filtered`.
    pub fn may_subscribe(&self, who: &Who, conn: Option<&ConnAcl>, filter: &str) -> SubscribeGrant {
        let grant = |filtered: bool| {
            if filtered {
                SubscribeGrant::Filtered
            } else {
                SubscribeGrant::Granted
            }
        };
        if !self.enabled {
            return SubscribeGrant::Granted;
        }
        if let Some(list) = conn.and_then(|c| c.subscribe.as_deref()) {
            return grant(false).only_if(list.iter().any(|p| p.covers(who, filter)));
        }
        let mut filtered = false;
        for r in self.rules.iter().filter(|r| r.subscribe) {
            if r.pattern.covers(who, filter) {
                return grant(filtered).only_if(r.allow);
            }
            if !r.allow && r.pattern.overlaps(who, filter) {
                filtered = true;
            }
        }
        grant(filtered).only_if(self.no_match_allow)
    }

    /// May a message on `topic` be delivered to `who` through a subscription granted
    /// [`SubscribeGrant::Filtered`]? The first subscribe rule matching the topic decides,
    /// else `no_match`. Always true with the ACL disabled (a restored subscription may
    /// carry the mark from a run that had it enabled).
    pub fn may_receive(&self, who: &Who, topic: &str) -> bool {
        if !self.enabled {
            return true;
        }
        for r in self.rules.iter().filter(|r| r.subscribe) {
            if r.pattern.matches(who, topic) {
                return r.allow;
            }
        }
        self.no_match_allow
    }
}

impl SubscribeGrant {
    fn only_if(self, ok: bool) -> SubscribeGrant {
        if ok {
            self
        } else {
            SubscribeGrant::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C1: Who = Who {
        client_id: "c1",
        username: Some("alice"),
    };

    impl Acl {
        fn allows_subscribe(&self, who: &Who, conn: Option<&ConnAcl>, filter: &str) -> bool {
            self.may_subscribe(who, conn, filter) != SubscribeGrant::Refused
        }
    }

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    fn acl(toml: &str) -> Acl {
        let c: AclConfig = toml::from_str(toml).unwrap();
        Acl::from_config(&c).unwrap()
    }

    const DEFAULT: &str = r#"
        enabled = true
        no_match = "deny"
        rules = [{ permission = "allow", action = "all", topic = "devices/%c/#" }]
    "#;

    #[test]
    fn default_rules_confine_a_device_to_its_own_tree() {
        let a = acl(DEFAULT);
        assert!(a.may_publish(&C1, None, "devices/c1/telemetry"));
        assert!(a.may_publish(&C1, None, "devices/c1"));
        assert!(!a.may_publish(&C1, None, "devices/c2/telemetry"));
        assert!(!a.may_publish(&C1, None, "other"));
        assert!(a.allows_subscribe(&C1, None, "devices/c1/+"));
        assert!(a.allows_subscribe(&C1, None, "devices/c1/#"));
        assert!(a.allows_subscribe(&C1, None, "devices/c1/cmd/x"));
        assert!(!a.allows_subscribe(&C1, None, "devices/#"));
        assert!(!a.allows_subscribe(&C1, None, "devices/+/cmd"));
        assert!(!a.allows_subscribe(&C1, None, "#"));
    }

    #[test]
    fn templates_never_widen_a_rule() {
        let a = acl(DEFAULT);
        for id in ["+", "#", "a/b", ""] {
            let who = Who {
                client_id: id,
                username: None,
            };
            assert!(!a.allows_subscribe(&who, None, "devices/+/x"), "{id}");
            assert!(!a.allows_subscribe(&who, None, "devices/#"), "{id}");
            assert!(!a.may_publish(&who, None, "devices/a/b/x"), "{id}");
        }
        // %u without a username matches nothing.
        let u = acl(r#"
            enabled = true
            no_match = "deny"
            rules = [{ permission = "allow", action = "publish", topic = "users/%u/#" }]
        "#);
        assert!(u.uses_username());
        assert!(u.may_publish(&C1, None, "users/alice/x"));
        let anon = Who {
            client_id: "c1",
            username: None,
        };
        assert!(!u.may_publish(&anon, None, "users//x"));
    }

    #[test]
    fn first_match_wins_and_deny_rules_block_overlapping_filters() {
        let a = acl(r##"
            enabled = true
            no_match = "allow"
            rules = [
              { permission = "deny", action = "all", topic = "devices/%c/secret" },
              { permission = "allow", action = "all", topic = "devices/%c/#" },
              { permission = "deny", action = "subscribe", topic = "#" },
            ]
        "##);
        assert!(!a.may_publish(&C1, None, "devices/c1/secret"));
        assert!(a.may_publish(&C1, None, "devices/c1/open"));
        // The deny rule overlaps devices/c1/+ without covering it: granted, filtered.
        assert_eq!(
            a.may_subscribe(&C1, None, "devices/c1/+"),
            SubscribeGrant::Filtered
        );
        assert!(!a.may_receive(&C1, "devices/c1/secret"));
        assert!(a.may_receive(&C1, "devices/c1/open"));
        assert_eq!(
            a.may_subscribe(&C1, None, "devices/c1/open/+"),
            SubscribeGrant::Granted
        );
        assert!(!a.allows_subscribe(&C1, None, "devices/c1/secret"));
        assert!(!a.allows_subscribe(&C1, None, "elsewhere"));
        // Publish-only deny rules do not apply to subscriptions, and no_match = allow.
        assert!(a.may_publish(&C1, None, "elsewhere"));
    }

    #[test]
    fn a_deny_rule_refuses_what_it_covers_and_filters_what_it_overlaps() {
        let a = acl(r#"
            enabled = true
            no_match = "allow"
            rules = [{ permission = "deny", action = "subscribe", topic = "test/nosubscribe" }]
        "#);
        let grant = |f: &str| a.may_subscribe(&C1, None, f);
        assert_eq!(grant("test/nosubscribe"), SubscribeGrant::Refused);
        assert_eq!(grant("#"), SubscribeGrant::Filtered);
        assert_eq!(grant("test/+"), SubscribeGrant::Filtered);
        assert_eq!(grant("TopicA"), SubscribeGrant::Granted);
        assert_eq!(grant("test/other/#"), SubscribeGrant::Granted);
        assert!(a.may_receive(&C1, "TopicA"));
        assert!(!a.may_receive(&C1, "test/nosubscribe"));
        // With no_match = deny the allow side stays strict: an overlap grants nothing.
        let strict = acl(r#"
            enabled = true
            no_match = "deny"
            rules = [
              { permission = "deny", action = "subscribe", topic = "a/secret" },
              { permission = "allow", action = "subscribe", topic = "a/#" },
            ]
        "#);
        assert_eq!(
            strict.may_subscribe(&C1, None, "a/#"),
            SubscribeGrant::Filtered
        );
        assert_eq!(
            strict.may_subscribe(&C1, None, "#"),
            SubscribeGrant::Refused
        );
        assert_eq!(
            strict.may_subscribe(&C1, None, "a/secret"),
            SubscribeGrant::Refused
        );
        assert_eq!(
            SubscribeGrant::Filtered.option_bits(false),
            Some(ACL_FILTERED)
        );
        assert_eq!(SubscribeGrant::Filtered.option_bits(true), None);
        assert_eq!(SubscribeGrant::Granted.option_bits(true), Some(0));
        assert_eq!(SubscribeGrant::Refused.option_bits(false), None);
    }

    #[test]
    fn connection_lists_replace_the_rules_for_their_action() {
        let a = acl(DEFAULT);
        let conn = ConnAcl::from_lists(Some(vec!["fleet/%c/up".into()]), None).unwrap();
        assert!(a.may_publish(&C1, Some(&conn), "fleet/c1/up"));
        assert!(!a.may_publish(&C1, Some(&conn), "devices/c1/up"));
        // No subscribe list: the configured rules still apply.
        assert!(a.allows_subscribe(&C1, Some(&conn), "devices/c1/#"));
        assert!(!a.allows_subscribe(&C1, Some(&conn), "fleet/c1/up"));
    }

    #[test]
    fn disabled_allows_everything() {
        let a = Acl::disabled();
        let off = acl(r#"
            enabled = false
            no_match = "deny"
            rules = [{ permission = "deny", action = "subscribe", topic = "x" }]
        "#);
        assert!(off.may_receive(&C1, "x"));
        assert!(a.may_publish(&C1, None, "any/thing"));
        assert!(a.allows_subscribe(&C1, None, "#"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "a/#/b", "a+/b", "dev-%c/x", "x/%u%c"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert!(Pattern::parse("a/%/b").is_ok());
    }

    #[test]
    fn dollar_topics_need_a_literal_first_level() {
        assert!(!p("#").matches(&C1, "$SYS/x"));
        assert!(!p("+/x").matches(&C1, "$SYS/x"));
        assert!(p("$SYS/#").matches(&C1, "$SYS/x"));
        assert!(!p("#").covers(&C1, "$SYS/#"));
        assert!(p("#").covers(&C1, "+/x"));
        assert!(!p("#").overlaps(&C1, "$SYS/#"));
        assert!(!p("$SYS/#").overlaps(&C1, "#"));
    }

    // Brute-force model: filters and topics over a tiny alphabet, checked against every
    // topic of up to `DEPTH` levels.
    const DEPTH: usize = 5;
    const WORDS: [&str; 3] = ["a", "b", "$s"];

    fn all_topics() -> Vec<String> {
        let mut out: Vec<Vec<&str>> = vec![];
        let mut frontier: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..DEPTH {
            let mut next = vec![];
            for t in &frontier {
                for w in WORDS {
                    let mut n = t.clone();
                    n.push(w);
                    next.push(n);
                }
            }
            out.extend(next.iter().cloned());
            frontier = next;
        }
        out.into_iter()
            .map(|t| t.join("/"))
            // `$` only makes sense as a first level prefix; keep it there.
            .filter(|t| !t.contains("/$"))
            .collect()
    }

    /// The MQTT matching rule written out plainly, independent of `Pattern`.
    fn model_match(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if topic.starts_with('$') && (f[0] == "+" || f[0] == "#") {
            return false;
        }
        let mut i = 0;
        while i < f.len() {
            if f[i] == "#" {
                return true;
            }
            if i >= t.len() || (f[i] != "+" && f[i] != t[i]) {
                return false;
            }
            i += 1;
        }
        i == t.len()
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("+".to_string())
        ];
        (
            prop_oneof![
                Just("a"),
                Just("b"),
                Just("$s"),
                Just("+"),
                Just("#"),
                Just("%c")
            ],
            proptest::collection::vec(level, 0..3),
            any::<bool>(),
        )
            .prop_map(|(first, rest, hash)| {
                let mut levels = vec![first.to_string()];
                if first != "#" {
                    levels.extend(rest);
                    if hash {
                        levels.push("#".into());
                    }
                }
                levels.join("/")
            })
    }

    proptest! {
        #[test]
        fn coverage_and_overlap_agree_with_brute_force(rule in filter_strategy(), f in filter_strategy()) {
            // %c stands for the client id "a" in the model.
            let who = Who { client_id: "a", username: None };
            let rule_model = rule.replace("%c", "a");
            let filter = f.replace("%c", "a");
            let pat = Pattern::parse(&rule).unwrap();
            let topics = all_topics();
            let matched: Vec<&String> = topics.iter().filter(|t| model_match(&filter, t)).collect();
            let covered = matched.iter().all(|t| model_match(&rule_model, t));
            let overlap = matched.iter().any(|t| model_match(&rule_model, t));
            prop_assert_eq!(pat.covers(&who, &filter), covered, "covers({}, {})", rule, filter);
            prop_assert_eq!(pat.overlaps(&who, &filter), overlap, "overlaps({}, {})", rule, filter);
            for t in &topics {
                prop_assert_eq!(pat.matches(&who, t), model_match(&rule_model, t), "matches({}, {})", rule, t);
            }
        }
    }
}
