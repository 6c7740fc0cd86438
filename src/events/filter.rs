//! Which device PUBLISHes become `uplink` events: the `[events] uplink_filters`, matched
//! with the same MQTT rules as subscriptions ([`crate::topic::matches`]).
//!
//! A shard asks once per accepted PUBLISH, so the empty list (the default) must cost one
//! branch, and a short list a few level comparisons. Operators configure a handful of
//! filters; a linear scan of them beats building a trie.

use crate::topic;

/// The compiled `uplink_filters`.
#[derive(Debug, Clone, Default)]
pub struct UplinkFilter {
    filters: Box<[Box<str>]>,
}

impl UplinkFilter {
    /// The filters must be valid (checked by `EventsConfig::validate`).
    pub fn new(filters: &[String]) -> UplinkFilter {
        UplinkFilter {
            filters: filters.iter().map(|f| f.as_str().into()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Whether a PUBLISH to `topic` is forwarded.
    pub fn matches(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| topic::matches(f, topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_with_mqtt_rules_and_nothing_when_empty() {
        let f = UplinkFilter::new(&["devices/+/telemetry".into(), "alarms/#".into()]);
        assert!(f.matches("devices/d1/telemetry"));
        assert!(f.matches("alarms"));
        assert!(f.matches("alarms/fire/1"));
        assert!(!f.matches("devices/d1/status"));
        assert!(!f.matches("devices/d1/telemetry/x"));
        let none = UplinkFilter::new(&[]);
        assert!(none.is_empty());
        assert!(!none.matches("devices/d1/telemetry"));
    }
}
