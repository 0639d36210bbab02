//! Per-block latency recording and percentiles for the run summary.

use std::time::Duration;

/// p50 / p99 / p99.9 of recorded latencies, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest value.
    pub max_us: f64,
    /// Number of samples.
    pub count: u64,
}

/// Records every sample (blocks per run are at most a few million: 8 bytes each).
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    samples_ns: Vec<u64>,
}

impl LatencyHistogram {
    /// Empty.
    pub fn new() -> LatencyHistogram {
        LatencyHistogram::default()
    }

    /// Adds one block's latency.
    pub fn record(&mut self, d: Duration) {
        self.samples_ns
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples_ns.len()
    }

    /// True if no samples.
    pub fn is_empty(&self) -> bool {
        self.samples_ns.is_empty()
    }

    /// Nearest-rank percentiles (all zero when empty).
    pub fn percentiles(&self) -> Percentiles {
        if self.samples_ns.is_empty() {
            return Percentiles::default();
        }
        let mut v = self.samples_ns.clone();
        v.sort_unstable();
        let rank = |p: f64| {
            let n = v.len();
            // Nearest rank: ceil(p * n), 1-based.
            let k = ((p * n as f64).ceil() as usize).clamp(1, n);
            v[k - 1] as f64 / 1000.0
        };
        Percentiles {
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            p999_us: rank(0.999),
            max_us: v[v.len() - 1] as f64 / 1000.0,
            count: v.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.percentiles(), Percentiles::default());
        // 1..=1000 us, shuffled order.
        for i in (1..=1000u64).rev() {
            h.record(Duration::from_micros(i));
        }
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50_us, 500.0);
        assert_eq!(p.p99_us, 990.0);
        assert_eq!(p.p999_us, 999.0);
        assert_eq!(p.max_us, 1000.0);
        let mut one = LatencyHistogram::new();
        one.record(Duration::from_nanos(1500));
        assert_eq!(one.percentiles().p999_us, 1.5);
    }
}
