//! When an idle queue busy-polls before it sleeps (`TargetConfig::busy_poll`): adaptive, so
//! polling goes where it pays.
//!
//! A queue polls only when at most one command is in the works (see `Queue::should_spin`):
//! the latency-bound case, where the host waits for each command's wake-ups. A poll that
//! finds work within the budget keeps polling on; one that runs out (the host had nothing
//! to send: a queue of a lightly used CPU, the end of a burst) makes the queue sleep at once
//! for the next 1, 2, 4, ... up to [`MAX_BACKOFF`] times it runs idle, so a queue that rarely
//! sees a command costs no CPU, and one serving a steady stream of commands one at a time
//! keeps polling.

use std::time::Duration;

/// Most sleeps skipped after polls that found nothing.
pub(super) const MAX_BACKOFF: u32 = 64;

/// The polling budget and the backoff state of one queue.
#[derive(Debug)]
pub(super) struct SpinPolicy {
    budget: Duration,
    /// Sleeps still to take without polling.
    skip: u32,
    /// Sleeps to skip after the next miss.
    backoff: u32,
}

impl SpinPolicy {
    /// A policy polling for up to `budget` (zero: never).
    pub(super) fn new(budget: Duration) -> SpinPolicy {
        SpinPolicy {
            budget,
            skip: 0,
            backoff: 1,
        }
    }

    /// How long one poll may last.
    pub(super) fn budget(&self) -> Duration {
        self.budget
    }

    /// Called when the queue is about to sleep in the latency-bound case: poll first?
    pub(super) fn try_poll(&mut self) -> bool {
        if self.budget.is_zero() {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// The poll found work: keep polling.
    pub(super) fn hit(&mut self) {
        self.backoff = 1;
    }

    /// The poll ran out of budget: skip the next `backoff` chances, twice as many next time.
    pub(super) fn miss(&mut self) {
        self.skip = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_budget_never_polls() {
        let mut p = SpinPolicy::new(Duration::ZERO);
        assert!((0..10).all(|_| !p.try_poll()));
    }

    #[test]
    fn hits_keep_polling_and_misses_back_off_exponentially_up_to_the_cap() {
        let mut p = SpinPolicy::new(Duration::from_micros(100));
        for _ in 0..5 {
            assert!(p.try_poll());
            p.hit();
        }
        // Misses in a row: skip 1, 2, 4, ... chances between polls.
        let mut skipped = Vec::new();
        for _ in 0..9 {
            assert!(p.try_poll());
            p.miss();
            let mut n = 0;
            while !p.try_poll() {
                n += 1;
            }
            skipped.push(n);
            // That successful try_poll was a poll: it missed too (the loop goes on with it).
        }
        assert_eq!(skipped, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
        // One hit resets the backoff.
        p.hit();
        p.miss();
        assert!(!p.try_poll());
        assert!(p.try_poll());
    }
}
