//! Topic names, topic filters, and the shard's subscription index.
//!
//! Every IO shard owns one [`SubscriptionIndex`] for the sessions it homes. When a message
//! arrives for a topic, the shard asks its index which of its sessions want it.
//!
//! The index is shaped by the common IoT case: a million devices, each subscribed to its own
//! exact topic such as `devices/{id}/cmd`. Those filters contain no wildcard, so they live in a
//! hashbrown map keyed by the filter string itself, an `Arc<str>` shared with the session that
//! holds the subscription. The map value keeps its first subscriber inline, so a filter with a
//! single subscriber costs one 32-byte bucket and no allocation of its own.
//!
//! Filters with `+` or `#` go into a trie with one node per level. A topic is matched against
//! both: one hash lookup for the exact map, then an iterative walk of the trie (the trie is
//! empty when nobody uses wildcards, and the walk is skipped).
//!
//! Removal gives memory back: an exact entry goes with its last subscriber, trie nodes left
//! empty are pruned up the path, and maps that fall far below their capacity are shrunk.
//!
//! Nothing here recurses over levels. A peer may send a 65,535-byte topic or filter made of
//! slashes, which is 65,536 levels; matching, insertion, removal and even dropping the trie use
//! loops and explicit stacks so that such input cannot overflow a shard's stack.

use std::fmt;
use std::sync::Arc;

use hashbrown::HashMap;

/// Longest topic name or topic filter: MQTT strings carry a two-byte length.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// One subscriber of one filter: the session's slab key on this shard and its subscription
/// options byte (bits 0-1 max QoS, bit 2 no_local, bit 3 retain_as_published, bits 4-5 retain
/// handling — the MQTT 5 subscription-options byte layout; the index does not interpret it),
/// and the MQTT 5 Subscription Identifier of the subscription (0 = none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscriber {
    pub session: u32,
    pub options: u8,
    pub sub_id: u32,
}

/// Whether `topic` may be used as the topic of a PUBLISH: non-empty, at most 65,535 bytes,
/// and free of the wildcards `+` and `#` and of U+0000 (MQTT 4.7.3, 1.5.4).
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && !topic.bytes().any(|b| matches!(b, b'+' | b'#' | 0))
}

/// Whether `filter` may be used in a SUBSCRIBE: non-empty, at most 65,535 bytes, no U+0000,
/// `+` only as a whole level and `#` only as the whole last level (MQTT 4.7.1).
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "+" => {}
            "#" => return levels.peek().is_none(),
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether the topic filter `filter` matches the topic name `topic` (MQTT 4.7).
///
/// `+` matches exactly one level (possibly empty), `#` matches the rest of the topic including
/// the parent level itself (`sport/#` matches `sport`), and a filter whose first level is a
/// wildcard does not match topics starting with `$` (4.7.2). Both arguments are expected to be
/// valid; for invalid ones the answer is unspecified but the function does not panic.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && matches!(first_level(filter), "+" | "#") {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(wanted), Some(level)) if wanted == level => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Splits a shared subscription `$share/{group}/{filter}` into `(group, filter)`.
///
/// Returns `None` for anything else, including a `$share/` filter with an empty group, a group
/// containing a wildcard, or an empty inner filter (MQTT 5 4.8.2). The inner filter is not
/// validated here; pass it to [`valid_topic_filter`]. The index itself stores shared
/// subscriptions under their full string like any other filter.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return None;
    }
    Some((group, inner))
}

fn first_level(filter: &str) -> &str {
    filter.split_once('/').map_or(filter, |(first, _)| first)
}

/// Whether a filter needs the trie: some level is exactly `+` or `#`.
fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|level| level == "+" || level == "#")
}

/// A filter with more subscribers than this keeps them in a map instead of a `Vec`, so that
/// adding or removing one of a million subscribers of a broadcast topic is not a linear scan.
const FEW_MAX: usize = 32;

/// A map of subscribers that shrinks to this many goes back to a `Vec` (below [`FEW_MAX`], so a
/// filter hovering around the limit does not convert back and forth on every change).
const FEW_AGAIN: usize = 16;

/// The subscribers of one filter.
///
/// Nearly every filter has exactly one, held inline; the rare shared filters spill to the heap.
/// The boxes keep the enum at 16 bytes, so an exact-map bucket (`Arc<str>` + this) is 32;
/// an unboxed `Vec` would make every bucket 40 to serve the rare filter with many subscribers.
#[allow(clippy::box_collection)]
enum Subscribers {
    One(Subscriber),
    Few(Box<Vec<Subscriber>>),
    /// session → (options, subscription identifier).
    Many(Box<HashMap<u32, (u8, u32)>>),
}

/// What [`Subscribers::remove`] did.
enum Removal {
    NotFound,
    /// Removed; others remain.
    Removed(u8),
    /// It was the only subscriber. `self` is left unchanged: the caller drops the whole value.
    Last(u8),
}

impl Subscribers {
    fn for_each(&self, f: &mut impl FnMut(Subscriber)) {
        match self {
            Subscribers::One(sub) => f(*sub),
            Subscribers::Few(list) => list.iter().for_each(|sub| f(*sub)),
            Subscribers::Many(map) => map.iter().for_each(|(&session, &(options, sub_id))| {
                f(Subscriber {
                    session,
                    options,
                    sub_id,
                });
            }),
        }
    }

    /// Adds `sub`, or updates its options if its session is already here. True if it is new.
    fn upsert(&mut self, sub: Subscriber) -> bool {
        match self {
            Subscribers::One(existing) if existing.session == sub.session => {
                *existing = sub;
                false
            }
            Subscribers::One(existing) => {
                let first = *existing;
                *self = Subscribers::Few(Box::new(vec![first, sub]));
                true
            }
            Subscribers::Few(list) => {
                if let Some(existing) = list.iter_mut().find(|s| s.session == sub.session) {
                    *existing = sub;
                    return false;
                }
                if list.len() < FEW_MAX {
                    list.push(sub);
                } else {
                    let map = list
                        .iter()
                        .chain(std::iter::once(&sub))
                        .map(|s| (s.session, (s.options, s.sub_id)))
                        .collect();
                    *self = Subscribers::Many(Box::new(map));
                }
                true
            }
            Subscribers::Many(map) => map.insert(sub.session, (sub.options, sub.sub_id)).is_none(),
        }
    }

    fn remove(&mut self, session: u32) -> Removal {
        match self {
            Subscribers::One(sub) if sub.session == session => Removal::Last(sub.options),
            Subscribers::One(_) => Removal::NotFound,
            Subscribers::Few(list) => {
                let Some(at) = list.iter().position(|s| s.session == session) else {
                    return Removal::NotFound;
                };
                let removed = list.swap_remove(at);
                if let [only] = list.as_slice() {
                    *self = Subscribers::One(*only);
                }
                Removal::Removed(removed.options)
            }
            Subscribers::Many(map) => {
                let Some((options, _)) = map.remove(&session) else {
                    return Removal::NotFound;
                };
                if map.len() <= FEW_AGAIN {
                    let list = map
                        .iter()
                        .map(|(&session, &(options, sub_id))| Subscriber {
                            session,
                            options,
                            sub_id,
                        })
                        .collect();
                    *self = Subscribers::Few(Box::new(list));
                } else {
                    shrink_if_sparse(map);
                }
                Removal::Removed(options)
            }
        }
    }
}

/// Gives memory back once a map is down to a quarter of its capacity. Halving happens only
/// after three quarters of the entries went, so the rehash is paid for by those removals.
fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// Adds `sub` to a trie slot. Returns (new subscriber, new filter).
fn slot_upsert(slot: &mut Option<Subscribers>, sub: Subscriber) -> (bool, bool) {
    match slot {
        Some(subs) => (subs.upsert(sub), false),
        None => {
            *slot = Some(Subscribers::One(sub));
            (true, true)
        }
    }
}

/// One level of the wildcard trie.
///
/// The path from the root spells a filter prefix. `+` children are kept apart from literal
/// ones, and a trailing `#` is not a node at all: its subscribers sit in `hash` of the node
/// for the levels before it (`#` alone: the root's).
#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscribers of `<this path>/#`.
    hash: Option<Subscribers>,
    /// Subscribers of `<this path>` exactly.
    subs: Option<Subscribers>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
            && self.subs.is_none()
    }

    /// Whether this node must stay even if its child on a removal path goes: it has
    /// subscribers of its own or another child.
    fn needed_besides_one_child(&self) -> bool {
        let branches = self.children.len() + usize::from(self.plus.is_some());
        self.hash.is_some() || self.subs.is_some() || branches > 1
    }

    /// The child a filter level leads to.
    fn child(&self, level: &str) -> Option<&Node> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node {
        if level == "+" {
            self.plus.get_or_insert_with(Box::default)
        } else {
            self.children.entry_ref(level).or_default()
        }
    }

    fn remove_child(&mut self, level: &str) {
        if level == "+" {
            self.plus = None;
        } else {
            self.children.remove(level);
            shrink_if_sparse(&mut self.children);
        }
    }

    /// Moves this node's children onto `stack`, leaving it a leaf.
    fn detach_children(&mut self, stack: &mut Vec<Node>) {
        stack.extend(self.children.drain().map(|(_, child)| child));
        if let Some(plus) = self.plus.take() {
            stack.push(*plus);
        }
    }
}

impl Drop for Node {
    /// Tears the subtree down with a loop: the default drop recurses once per level, and a
    /// hostile filter such as 65,533 slashes and `#` is that many levels deep.
    fn drop(&mut self) {
        if self.children.is_empty() && self.plus.is_none() {
            return;
        }
        let mut stack = Vec::new();
        self.detach_children(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.detach_children(&mut stack);
        }
    }
}

/// Which slot of its node a wildcard filter's subscribers live in.
enum Slot {
    /// `<path>`: the node's `subs`.
    Exact,
    /// `<path>/#`: the node's `hash`.
    Hash,
}

/// Splits a wildcard filter into the node path (`None` is the root) and the slot.
fn trie_path(filter: &str) -> (Option<&str>, Slot) {
    if filter == "#" {
        (None, Slot::Hash)
    } else if let Some(path) = filter.strip_suffix("/#") {
        (Some(path), Slot::Hash)
    } else {
        (Some(filter), Slot::Exact)
    }
}

fn levels(path: Option<&str>) -> impl Iterator<Item = &str> {
    path.into_iter().flat_map(|path| path.split('/'))
}

/// `position` of a trie walk state whose topic levels are all consumed.
const ALL_LEVELS: usize = usize::MAX;

/// Work stack of the trie walk: a trie node and the byte offset in the topic where the next
/// level starts (or [`ALL_LEVELS`]). Holds up to 16 states inline, so an ordinary match does
/// not allocate; deeper walks spill to a `Vec`.
struct WorkStack<'a> {
    inline: [(&'a Node, usize); 16],
    inline_len: usize,
    spill: Vec<(&'a Node, usize)>,
}

impl<'a> WorkStack<'a> {
    fn new(root: &'a Node) -> Self {
        WorkStack {
            inline: [(root, 0); 16],
            inline_len: 1,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, state: (&'a Node, usize)) {
        if self.inline_len < self.inline.len() {
            self.inline[self.inline_len] = state;
            self.inline_len += 1;
        } else {
            self.spill.push(state);
        }
    }

    fn pop(&mut self) -> Option<(&'a Node, usize)> {
        if let Some(state) = self.spill.pop() {
            return Some(state);
        }
        self.inline_len = self.inline_len.checked_sub(1)?;
        Some(self.inline[self.inline_len])
    }
}

/// The subscriptions of the sessions homed on one shard.
pub struct SubscriptionIndex {
    /// Filters without wildcards, keyed by the filter string shared with the session.
    exact: HashMap<Arc<str>, Subscribers>,
    /// Root of the trie of filters with `+` or `#`.
    wildcard: Node,
    /// Distinct filters in the trie.
    wildcard_filters: usize,
    /// (filter, session) entries in both.
    entries: usize,
}

impl SubscriptionIndex {
    pub fn new() -> Self {
        SubscriptionIndex {
            exact: HashMap::new(),
            wildcard: Node::default(),
            wildcard_filters: 0,
            entries: 0,
        }
    }

    /// Adds or replaces (same filter + same session → options updated). Returns true if new.
    ///
    /// `filter` should satisfy [`valid_topic_filter`]; the index does not check it again.
    pub fn insert(&mut self, filter: &Arc<str>, sub: Subscriber) -> bool {
        let new = if has_wildcard(filter) {
            let (path, slot) = trie_path(filter);
            let mut node = &mut self.wildcard;
            for level in levels(path) {
                node = node.child_or_insert(level);
            }
            let slot = match slot {
                Slot::Exact => &mut node.subs,
                Slot::Hash => &mut node.hash,
            };
            let (new_sub, new_filter) = slot_upsert(slot, sub);
            self.wildcard_filters += usize::from(new_filter);
            new_sub
        } else {
            match self.exact.get_mut(&**filter) {
                Some(subs) => subs.upsert(sub),
                None => {
                    self.exact.insert(Arc::clone(filter), Subscribers::One(sub));
                    true
                }
            }
        };
        self.entries += usize::from(new);
        new
    }

    /// Removes `session` from `filter`. Returns the removed subscriber's options if it was there.
    pub fn remove(&mut self, filter: &str, session: u32) -> Option<u8> {
        let removed = if has_wildcard(filter) {
            self.remove_wildcard(filter, session)
        } else {
            let subs = self.exact.get_mut(filter)?;
            match subs.remove(session) {
                Removal::NotFound => None,
                Removal::Removed(options) => Some(options),
                Removal::Last(options) => {
                    self.exact.remove(filter);
                    shrink_if_sparse(&mut self.exact);
                    Some(options)
                }
            }
        };
        if removed.is_some() {
            self.entries -= 1;
        }
        removed
    }

    fn remove_wildcard(&mut self, filter: &str, session: u32) -> Option<u8> {
        let (path, slot) = trie_path(filter);

        // Walk down and take the subscriber out of its slot.
        let mut node = &mut self.wildcard;
        for level in levels(path) {
            node = node.child_mut(level)?;
        }
        let slot = match slot {
            Slot::Exact => &mut node.subs,
            Slot::Hash => &mut node.hash,
        };
        let options = match slot.as_mut()?.remove(session) {
            Removal::NotFound => return None,
            Removal::Removed(options) => return Some(options),
            Removal::Last(options) => options,
        };
        *slot = None;
        self.wildcard_filters -= 1;
        if !node.is_empty() {
            return Some(options);
        }

        // The end node is now empty. Find the deepest node on the path that must stay
        // (the root always does) and cut the dead branch below it.
        let mut keep_depth = 0;
        let mut node = &self.wildcard;
        for (depth, level) in levels(path).enumerate() {
            if depth > 0 && node.needed_besides_one_child() {
                keep_depth = depth;
            }
            let Some(child) = node.child(level) else {
                return Some(options);
            };
            node = child;
        }
        let mut path_levels = levels(path);
        let mut node = &mut self.wildcard;
        for level in path_levels.by_ref().take(keep_depth) {
            let Some(child) = node.child_mut(level) else {
                return Some(options);
            };
            node = child;
        }
        if let Some(level) = path_levels.next() {
            node.remove_child(level);
        }
        Some(options)
    }

    /// Calls `f` for every (filter-entry) subscriber whose filter matches `topic`. A session
    /// subscribed through several matching filters is reported once per filter (the caller merges).
    ///
    /// `topic` should satisfy [`valid_topic_name`]. Apart from a work stack that spills to the
    /// heap only past 16 pending trie states, this does not allocate.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(Subscriber)) {
        if let Some(subs) = self.exact.get(topic) {
            subs.for_each(&mut f);
        }
        if self.wildcard.is_empty() {
            return;
        }
        let dollar_topic = topic.starts_with('$');
        let mut stack = WorkStack::new(&self.wildcard);
        while let Some((node, position)) = stack.pop() {
            // Only the root is visited at position 0; its wildcards skip `$` topics (4.7.2).
            let wildcards_allowed = !(position == 0 && dollar_topic);
            if wildcards_allowed {
                if let Some(subs) = &node.hash {
                    subs.for_each(&mut f);
                }
            }
            if position == ALL_LEVELS {
                if let Some(subs) = &node.subs {
                    subs.for_each(&mut f);
                }
                continue;
            }
            let rest = &topic[position..];
            let (level, next) = match rest.find('/') {
                Some(slash) => (&rest[..slash], position + slash + 1),
                None => (rest, ALL_LEVELS),
            };
            if let Some(child) = node.children.get(level) {
                stack.push((child, next));
            }
            if wildcards_allowed {
                if let Some(plus) = node.plus.as_deref() {
                    stack.push((plus, next));
                }
            }
        }
    }

    /// Whether some session subscribed to exactly `filter`.
    pub fn has_filter(&self, filter: &str) -> bool {
        if !has_wildcard(filter) {
            return self.exact.contains_key(filter);
        }
        let (path, slot) = trie_path(filter);
        let mut node = &self.wildcard;
        for level in levels(path) {
            match node.child(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        match slot {
            Slot::Exact => node.subs.is_some(),
            Slot::Hash => node.hash.is_some(),
        }
    }

    /// Number of (filter, session) entries.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Number of distinct filters.
    pub fn filters(&self) -> usize {
        self.exact.len() + self.wildcard_filters
    }

    /// Trie nodes below the root.
    #[cfg(test)]
    fn trie_nodes(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![&self.wildcard];
        while let Some(node) = stack.pop() {
            stack.extend(node.children.values());
            stack.extend(node.plus.as_deref());
            count += 1;
        }
        count - 1
    }
}

impl Default for SubscriptionIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SubscriptionIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionIndex")
            .field("entries", &self.entries)
            .field("exact_filters", &self.exact.len())
            .field("wildcard_filters", &self.wildcard_filters)
            .finish()
    }
}

#[cfg(test)]
mod tests;
