//! Pacing of the primary's source reads: at most `rate` bytes per second (fio's `--rate`,
//! DRBD's resync rate), so a replication leaves drive and link bandwidth to other work.
//!
//! The pacer only delays reads; everything after a read (WRITEs, acks, flushes) runs at full
//! speed. The first read goes at once; read k may start once `bytes issued before it / rate`
//! seconds have passed since the run began, so the long-run rate never exceeds `rate` and a
//! burst is at most one block.

use std::time::{Duration, Instant};

/// Admits reads at no more than a byte rate (or all at once when unpaced).
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: Option<u64>,
    t0: Instant,
    issued: u64,
}

impl Pacer {
    /// A pacer starting at `t0`; `rate` in bytes per second (`None` or 0: unpaced).
    pub(crate) fn new(rate: Option<u64>, t0: Instant) -> Pacer {
        Pacer {
            rate: rate.filter(|&r| r > 0),
            t0,
            issued: 0,
        }
    }

    /// When the next read may start (`None`: unpaced, always).
    pub(crate) fn due_at(&self) -> Option<Instant> {
        self.rate.map(|r| {
            let secs = self.issued as f64 / r as f64;
            self.t0 + Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX / 4)
        })
    }

    /// Whether a read may start at `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.due_at().map_or(true, |t| now >= t)
    }

    /// Admits a read of `len` bytes at `now` (and counts it), or says to hold it.
    pub(crate) fn admit(&mut self, len: u64, now: Instant) -> bool {
        if !self.due(now) {
            return false;
        }
        self.issued += len;
        true
    }

    /// How long an idle loop may sleep before the next held read is due (`cap` when
    /// nothing is due sooner).
    pub(crate) fn bound(&self, now: Instant, cap: Duration) -> Duration {
        match self.due_at() {
            Some(t) => t.saturating_duration_since(now).min(cap),
            None => cap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpaced_admits_everything() {
        let t0 = Instant::now();
        let mut p = Pacer::new(None, t0);
        assert!((0..1000).all(|_| p.admit(1 << 20, t0)));
        let mut z = Pacer::new(Some(0), t0);
        assert!(z.admit(1 << 30, t0) && z.admit(1 << 30, t0));
    }

    #[test]
    fn paced_reads_follow_the_rate_with_a_one_block_burst() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // 1 MB/s, 100 KB blocks: one block every 100 ms.
        let mut p = Pacer::new(Some(1_000_000), t0);
        assert!(p.admit(100_000, t0), "the first read goes at once");
        assert!(!p.admit(100_000, t0), "the second waits");
        assert_eq!(p.bound(t0, Duration::from_secs(1)), ms(100));
        assert!(!p.admit(100_000, t0 + ms(99)));
        assert!(p.admit(100_000, t0 + ms(100)));
        // A loop that wakes late catches up to the rate, never beyond it.
        assert!(p.admit(100_000, t0 + ms(1000)));
        assert!(p.admit(100_000, t0 + ms(1000)));
        // 4 blocks issued = 400 KB: the next is due at 400 ms, already past.
        assert!(p.due(t0 + ms(1000)));
        // Over any run the admitted bytes never exceed rate * elapsed + one block.
        let mut q = Pacer::new(Some(1_000_000), t0);
        let mut admitted = 0u64;
        for step in 0..2000u64 {
            let now = t0 + ms(step);
            while q.admit(100_000, now) {
                admitted += 100_000;
            }
            assert!(
                admitted <= 1_000 * step + 100_000,
                "step {step}: {admitted}"
            );
        }
        assert!(admitted >= 1_900_000, "{admitted}");
    }

    #[test]
    fn bound_caps_the_sleep() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(10), t0);
        assert!(p.admit(1000, t0));
        // Next due in 100 s: the cap wins.
        assert_eq!(p.bound(t0, Duration::from_secs(1)), Duration::from_secs(1));
    }
}
