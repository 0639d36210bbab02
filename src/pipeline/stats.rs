//! Per-block latency recording and percentiles for the run summary: an HDR histogram
//! (`hdrhistogram`, 3 significant digits), so memory stays constant however long the run.

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

/// Records block latencies from 1 ns to 1 hour with 3 significant digits (values are exact
/// to within 0.1 %; longer ones count as 1 hour).
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    h: hdrhistogram::Histogram<u64>,
}

/// The longest latency recorded as itself: 1 hour, in nanoseconds.
const MAX_NS: u64 = 3_600 * 1_000_000_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl LatencyHistogram {
    /// Empty.
    pub fn new() -> LatencyHistogram {
        LatencyHistogram {
            // 1 ns .. 1 h at 3 significant digits are valid bounds: this cannot fail.
            h: hdrhistogram::Histogram::new_with_bounds(1, MAX_NS, 3)
                .expect("valid histogram bounds"),
        }
    }

    /// Adds one block's latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.h.saturating_record(ns.clamp(1, MAX_NS));
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        usize::try_from(self.h.len()).unwrap_or(usize::MAX)
    }

    /// True if no samples.
    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }

    /// Percentiles (all zero when empty).
    pub fn percentiles(&self) -> Percentiles {
        if self.h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50_us: us(self.h.value_at_quantile(0.50)),
            p99_us: us(self.h.value_at_quantile(0.99)),
            p999_us: us(self.h.value_at_quantile(0.999)),
            max_us: us(self.h.max()),
            count: self.h.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within the histogram's 3 significant digits.
    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= want * 1e-3
    }

    #[test]
    fn percentiles_within_three_significant_digits() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.percentiles(), Percentiles::default());
        // 1..=1000 us, shuffled order.
        for i in (1..=1000u64).rev() {
            h.record(Duration::from_micros(i));
        }
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert!(close(p.p50_us, 500.0), "{p:?}");
        assert!(close(p.p99_us, 990.0), "{p:?}");
        assert!(close(p.p999_us, 999.0), "{p:?}");
        assert!(close(p.max_us, 1000.0), "{p:?}");
        let mut one = LatencyHistogram::new();
        one.record(Duration::from_nanos(1500));
        assert!(close(one.percentiles().p999_us, 1.5));
        // An hour and more count as an hour; zero as 1 ns.
        one.record(Duration::from_secs(7200));
        one.record(Duration::ZERO);
        assert_eq!(one.len(), 3);
        assert!(close(one.percentiles().max_us, 3.6e9));
    }
}
