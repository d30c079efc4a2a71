//! Latency figures without keeping every sample: a pipelined run makes
//! millions of requests, and the percentiles only need ~1.6% precision.

use std::time::Duration;

/// Sub-buckets per power of two: 64 gives a relative error under 1/64.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Enough buckets for any `u64` of nanoseconds.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// A log-linear histogram of durations in nanoseconds (the HDR idea, small).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max_ns: 0,
        }
    }
}

fn index(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = ((ns >> shift) as usize) & (SUB - 1);
    (shift as usize + 1) * SUB + sub
}

/// The middle of bucket `i`'s range.
fn value(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let shift = (i / SUB - 1) as u32;
    let low = ((SUB + i % SUB) as u64) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Histogram {
    pub fn record(&mut self, duration: Duration) {
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.counts[index(ns)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1); `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                // Never above the largest sample actually seen.
                return Some(Duration::from_nanos(value(i).min(self.max_ns)));
            }
        }
        self.max()
    }

    pub fn max(&self) -> Option<Duration> {
        (self.total > 0).then(|| Duration::from_nanos(self.max_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_bucket_precision() {
        let mut h = Histogram::default();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let close = |got: Duration, want_us: f64| {
            let got = got.as_secs_f64() * 1e6;
            assert!((got - want_us).abs() / want_us < 0.02, "{got} vs {want_us}");
        };
        close(h.quantile(0.5).unwrap(), 5_000.0);
        close(h.quantile(0.99).unwrap(), 9_900.0);
        assert_eq!(h.max(), Some(Duration::from_micros(10_000)));
        assert_eq!(h.count(), 10_000);
        assert_eq!(Histogram::default().quantile(0.5), None);
        for ns in [0u64, 1, 63, 64, 65, 127, 128, 1 << 40, u64::MAX] {
            let v = value(index(ns));
            assert!(v.abs_diff(ns) <= ns / 64 + 1, "{ns} -> {v}");
        }
    }

    #[test]
    fn merging_adds_counts_and_keeps_the_max() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(3));
        b.record(Duration::from_millis(2));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.max(), Some(Duration::from_millis(3)));
    }
}
