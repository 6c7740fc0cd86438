//! Latency histograms and their percentiles, mergeable across processes.
//!
//! Every child process records latencies (in microseconds) into a [`Histogram`] and sends
//! it to the parent, which merges them; so the histogram has to be small, exact where it
//! matters and additive. It is log-linear (HdrHistogram's idea with 64 sub-buckets per
//! power of two): values below 128 µs are counted exactly, larger values within 1/64
//! (1.6 %) of their true value. Percentiles use the nearest-rank definition and report
//! the upper edge of the bucket holding the rank, clamped to the exact minimum and
//! maximum, so `max` and small values are exact and nothing is ever under-reported.

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two (and the count of exact values below `2 * SUB`).
const SUB: u64 = 64;
const SUB_BITS: u32 = 6;

/// A log-linear histogram of `u64` samples (microseconds everywhere in loadgen).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Sparse on the wire: `(bucket index, count)` for every non-empty bucket.
    #[serde(with = "sparse")]
    counts: Vec<u64>,
    count: u64,
    /// Sum of all samples (saturating; 2^64 µs is half a million years).
    sum: u64,
    min: u64,
    max: u64,
}

/// The bucket a value falls in.
fn index(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= 7
    let shift = msb - SUB_BITS; // >= 1
    let mantissa = v >> shift; // 64..=127
    (2 * SUB + u64::from(shift - 1) * SUB + (mantissa - SUB)) as usize
}

/// The smallest and largest value of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < 2 * SUB {
        return (i, i);
    }
    let shift = (i - 2 * SUB) / SUB + 1;
    let mantissa = (i - 2 * SUB) % SUB + SUB;
    let low = mantissa << shift;
    let high = low.saturating_add((1u64 << shift) - 1);
    (low, high)
}

impl Histogram {
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, v: u64) {
        let i = index(v);
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        if self.count == 0 || v < self.min {
            self.min = v;
        }
        self.max = self.max.max(v);
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.min = if self.count == 0 {
            other.min
        } else {
            self.min.min(other.min)
        };
        self.max = self.max.max(other.max);
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    pub fn min(&self) -> Option<u64> {
        (self.count > 0).then_some(self.min)
    }

    #[cfg(test)]
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// The nearest-rank `p`-th percentile (0 < p <= 100): the smallest recorded value
    /// such that at least `p` % of the samples are at or below it, to within the bucket
    /// width (never below the true value). `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((p / 100.0) * self.count as f64)
            .ceil()
            .clamp(1.0, self.count as f64) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bounds(i).1.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// Non-empty buckets as `(low, high, count)`, in order: the distribution to draw.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                let (lo, hi) = bounds(i);
                (lo, hi, c)
            })
    }

    /// `{p50, p90, p99, p999, max, mean}` in milliseconds (three decimals), or JSON null
    /// when nothing was recorded.
    pub fn summary_ms(&self) -> serde_json::Value {
        if self.count == 0 {
            return serde_json::Value::Null;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let p = |q| ms(self.percentile(q).unwrap_or(0));
        serde_json::json!({
            "p50": p(50.0),
            "p90": p(90.0),
            "p99": p(99.0),
            "p999": p(99.9),
            "max": ms(self.max),
            "mean": (self.sum as f64 / self.count as f64).round() / 1000.0,
            "count": self.count,
        })
    }
}

/// Serde for the counts vector as `[[index, count], ...]` over non-empty buckets.
mod sparse {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(counts: &[u64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| (i as u64, c)),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        let pairs: Vec<(u64, u64)> = Vec::deserialize(d)?;
        let len = pairs
            .iter()
            .map(|&(i, _)| i as usize + 1)
            .max()
            .unwrap_or(0);
        if len > 1 << 16 {
            return Err(serde::de::Error::custom(
                "histogram bucket index out of range",
            ));
        }
        let mut counts = vec![0; len];
        for (i, c) in pairs {
            counts[i as usize] += c;
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact_nearest_rank() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.percentile(50.0), Some(50));
        assert_eq!(h.percentile(90.0), Some(90));
        assert_eq!(h.percentile(99.0), Some(99));
        assert_eq!(h.percentile(99.9), Some(100));
        assert_eq!(h.percentile(100.0), Some(100));
        assert_eq!(h.percentile(0.1), Some(1));
        assert_eq!(h.max(), Some(100));
        assert_eq!(h.min(), Some(1));
        assert_eq!(h.mean(), Some(50.5));
    }

    #[test]
    fn empty_has_no_percentiles() {
        let h = Histogram::new();
        assert_eq!(h.percentile(50.0), None);
        assert_eq!(h.max(), None);
        assert!(h.summary_ms().is_null());
    }

    #[test]
    fn single_sample_is_every_percentile() {
        let mut h = Histogram::new();
        h.record(123_456);
        for p in [0.1, 50.0, 99.9, 100.0] {
            assert_eq!(h.percentile(p), Some(123_456));
        }
    }

    #[test]
    fn every_value_lies_within_its_bucket_and_buckets_tile_the_line() {
        let mut next = 0;
        for i in 0..2000 {
            let (lo, hi) = bounds(i);
            assert_eq!(lo, next, "bucket {i} starts where the previous ended");
            assert!(hi >= lo);
            assert_eq!(index(lo), i);
            assert_eq!(index(hi), i);
            next = hi + 1;
        }
        for v in [
            0,
            1,
            127,
            128,
            129,
            255,
            256,
            1000,
            65_535,
            1 << 40,
            u64::MAX,
        ] {
            let (lo, hi) = bounds(index(v));
            assert!(lo <= v && v <= hi, "{v} in [{lo}, {hi}]");
        }
    }

    #[test]
    fn large_values_are_within_one_sixty_fourth() {
        // A geometric spread from 1 µs to ~1000 s, and a check of each percentile against
        // the exact nearest-rank value of the sorted samples.
        let mut samples: Vec<u64> = (0..10_000u64)
            .map(|k| (1.0015f64.powf(k as f64 * 1.38)) as u64)
            .collect();
        let mut h = Histogram::new();
        for &v in &samples {
            h.record(v);
        }
        samples.sort_unstable();
        for p in [50.0, 90.0, 99.0, 99.9, 100.0] {
            let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            let exact = samples[rank - 1];
            let got = h.percentile(p).unwrap();
            assert!(got >= exact, "p{p}: {got} < exact {exact}");
            assert!(
                (got - exact) as f64 <= exact as f64 / 64.0,
                "p{p}: {got} vs exact {exact}"
            );
        }
        assert_eq!(h.max(), Some(*samples.last().unwrap()));
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        let mut all = Histogram::new();
        for v in 0..5000u64 {
            let x = v * v % 100_003;
            if v % 3 == 0 {
                a.record(x);
            } else {
                b.record(x);
            }
            all.record(x);
        }
        let mut merged = Histogram::new();
        merged.merge(&a);
        merged.merge(&b);
        merged.merge(&Histogram::new());
        assert_eq!(merged, all);
    }

    #[test]
    fn survives_the_wire() {
        let mut h = Histogram::new();
        for v in [3, 3, 900, 70_000, 5_000_000] {
            h.record(v);
        }
        let text = serde_json::to_string(&h).unwrap();
        let back: Histogram = serde_json::from_str(&text).unwrap();
        assert_eq!(back, h);
        // 900 lies in the bucket [896, 903]: its upper edge is reported.
        assert_eq!(back.percentile(50.0), Some(903));
    }

    #[test]
    fn summary_reports_milliseconds() {
        let mut h = Histogram::new();
        for v in [1_000, 2_000, 3_000, 4_000] {
            h.record(v);
        }
        let s = h.summary_ms();
        let p50 = s["p50"].as_f64().unwrap();
        assert!((2.0..=2.0 + 2.0 / 64.0).contains(&p50), "{p50}");
        assert_eq!(s["max"], 4.0);
        assert_eq!(s["count"], 4);
    }
}
