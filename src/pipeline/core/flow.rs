//! Bounded in-flight blocks: the window that turns a slow stage into backpressure.

use std::collections::BTreeSet;

/// Returned when the window is full: wait for a completion before starting another block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{in_flight} blocks in flight (the window): wait for a completion")]
pub struct WindowFull {
    /// Blocks currently in flight.
    pub in_flight: usize,
}

/// Hands out sequence numbers in order, at most `capacity` outstanding; retires them in any
/// order. The lowest unretired sequence number is the "low-water mark": every block below it
/// has completed.
#[derive(Debug)]
pub struct Window {
    capacity: usize,
    next: u64,
    end: u64,
    in_flight: BTreeSet<u64>,
}

impl Window {
    /// A window over sequence numbers `0..end` with at most `capacity` in flight.
    ///
    /// `capacity` of 0 is treated as 1 (a window must let something through).
    pub fn new(capacity: usize, end: u64) -> Window {
        Window {
            capacity: capacity.max(1),
            next: 0,
            end,
            in_flight: BTreeSet::new(),
        }
    }

    /// Capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// True when every sequence number was started.
    pub fn all_started(&self) -> bool {
        self.next >= self.end
    }

    /// True when every sequence number was started and retired.
    pub fn is_done(&self) -> bool {
        self.all_started() && self.in_flight.is_empty()
    }

    /// Starts the next block, if any.
    ///
    /// # Errors
    /// [`WindowFull`] when `capacity` blocks are in flight (backpressure).
    pub fn start(&mut self) -> Result<Option<u64>, WindowFull> {
        if self.all_started() {
            return Ok(None);
        }
        if self.in_flight.len() >= self.capacity {
            return Err(WindowFull {
                in_flight: self.in_flight.len(),
            });
        }
        let s = self.next;
        self.next += 1;
        self.in_flight.insert(s);
        Ok(Some(s))
    }

    /// Retires `seq`; returns false if it was not in flight (a duplicate or a bug).
    pub fn retire(&mut self, seq: u64) -> bool {
        self.in_flight.remove(&seq)
    }

    /// Every block below this has been retired.
    pub fn low_water(&self) -> u64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backpressure_and_out_of_order_retire() {
        let mut w = Window::new(3, 5);
        assert_eq!(w.start(), Ok(Some(0)));
        assert_eq!(w.start(), Ok(Some(1)));
        assert_eq!(w.start(), Ok(Some(2)));
        assert_eq!(w.start(), Err(WindowFull { in_flight: 3 }));
        // Completion out of order frees a slot but not the low-water mark.
        assert!(w.retire(1));
        assert!(!w.retire(1), "duplicate retire");
        assert_eq!(w.low_water(), 0);
        assert_eq!(w.start(), Ok(Some(3)));
        assert!(w.retire(0));
        assert_eq!(w.low_water(), 2);
        assert_eq!(w.start(), Ok(Some(4)));
        assert_eq!(w.start(), Ok(None), "range exhausted, not full");
        assert!(!w.is_done());
        for s in [4, 2, 3] {
            assert!(w.retire(s));
        }
        assert!(w.is_done());
        assert_eq!(w.low_water(), 5);
        assert!(!w.retire(9));
    }

    #[test]
    fn zero_capacity_still_progresses() {
        let mut w = Window::new(0, 2);
        assert_eq!(w.capacity(), 1);
        assert_eq!(w.start(), Ok(Some(0)));
        assert!(w.start().is_err());
    }
}
