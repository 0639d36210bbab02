//! In-flight bookkeeping: what each posted work request holds (regions, a window) until its
//! completion is reaped, per QP (send and receive queues) and per SRQ. A completion queue
//! releases entries as it polls ([`QpShared::release`]); a queue pair records them as it
//! posts. Depends on neither, so neither depends on the other through it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::mr::MemoryRegion;
use crate::mw::MemoryWindow;

/// Buffers (and windows) a posted work request holds until its completion is reaped.
pub(crate) struct InFlight {
    pub(crate) wr_id: u64,
    /// Whether this WR produces a completion on success (receives always do). Ids need not
    /// be unique, so a success completion is matched to the oldest *signalled* entry.
    pub(crate) signaled: bool,
    _regions: Held,
    _window: Option<MemoryWindow>,
}

impl InFlight {
    /// The entry for a WR with `wr_id` naming `regions` (and binding `window`).
    pub(crate) fn new<'a>(
        wr_id: u64,
        signaled: bool,
        regions: impl Iterator<Item = &'a MemoryRegion>,
        window: Option<MemoryWindow>,
    ) -> InFlight {
        InFlight {
            wr_id,
            signaled,
            _regions: Held::of(regions),
            _window: window,
        }
    }
}

impl InFlight {
    /// Lets go of the window this WR binds (see `QueuePair`'s `Drop`).
    pub(crate) fn take_window(&mut self) -> Option<MemoryWindow> {
        self._window.take()
    }
}

/// The regions one WR keeps alive. Most WRs name zero or one region; holding those inline
/// keeps posting free of heap allocations.
#[allow(dead_code)] // the regions are held for their Drop, never read
enum Held {
    None,
    One(MemoryRegion),
    Many(Vec<MemoryRegion>),
}

impl Held {
    fn of<'a>(mut mrs: impl Iterator<Item = &'a MemoryRegion>) -> Held {
        match (mrs.next(), mrs.next()) {
            (None, _) => Held::None,
            (Some(a), None) => Held::One(a.clone()),
            (Some(a), Some(b)) => {
                let mut v = vec![a.clone(), b.clone()];
                v.extend(mrs.cloned());
                Held::Many(v)
            }
        }
    }
}

/// The in-flight entries of one work queue (a QP's send or receive queue, or an SRQ), in
/// posting order.
pub(crate) type InFlightQueue = Mutex<VecDeque<InFlight>>;

/// Locks a mutex, ignoring poisoning (the tables stay consistent: every update is one call).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the entry a completion with `wr_id` belongs to (and, for an in-order queue,
/// everything before it: earlier unsignalled WRs are complete once a later one is). A success
/// completion belongs to the oldest signalled entry with that id; an error completion (also
/// produced for unsignalled WRs) to the oldest entry with that id. Returns whether one was
/// found.
fn release_in(q: &mut VecDeque<InFlight>, wr_id: u64, in_order: bool, success: bool) -> bool {
    match q
        .iter()
        .position(|e| e.wr_id == wr_id && (e.signaled || !success))
    {
        Some(pos) if in_order => {
            q.drain(..=pos);
            true
        }
        Some(pos) => {
            q.remove(pos);
            true
        }
        None => false,
    }
}

/// Per-QP state shared with the CQs (weakly) so reaping a completion releases its buffers.
pub(crate) struct QpShared {
    pub(crate) send: InFlightQueue,
    pub(crate) recv: InFlightQueue,
    /// The SRQ's table when the QP takes its receives from one (unordered: many QPs share it).
    srq: Option<Arc<InFlightQueue>>,
    /// Send and receive completions arrive on one CQ.
    same_cq: bool,
}

impl QpShared {
    /// Empty tables for a QP; `srq` is the table of its shared receive queue, if any.
    pub(crate) fn new(srq: Option<Arc<InFlightQueue>>, same_cq: bool) -> QpShared {
        QpShared {
            send: Mutex::new(VecDeque::new()),
            recv: Mutex::new(VecDeque::new()),
            srq,
            same_cq,
        }
    }

    /// Releases what the WR of a completion held: `wr_id` and `success` as polled, `is_recv`
    /// the completion's opcode class (meaningless for error completions, which carry no
    /// opcode).
    pub(crate) fn release(&self, wr_id: u64, success: bool, is_recv: bool) {
        let recv_side = if success {
            is_recv
        } else if self.same_cq {
            // error completions carry no opcode: a send WR if we have one with that id
            !lock(&self.send).iter().any(|e| e.wr_id == wr_id)
        } else {
            false // decided below: a send unless the send queue has no such entry
        };
        if recv_side {
            self.release_recv(wr_id, success);
        } else if !release_in(&mut lock(&self.send), wr_id, true, success) && !self.same_cq {
            // A separate recv CQ delivered an error completion: it is a receive.
            self.release_recv(wr_id, success);
        }
    }

    fn release_recv(&self, wr_id: u64, success: bool) {
        match &self.srq {
            Some(srq) => release_in(&mut lock(srq), wr_id, false, success),
            None => release_in(&mut lock(&self.recv), wr_id, true, success),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(wr_id: u64, signaled: bool) -> InFlight {
        InFlight::new(wr_id, signaled, std::iter::empty(), None)
    }

    #[test]
    fn success_belongs_to_the_oldest_signalled_entry_with_its_id() {
        // unsignalled control SENDs share the id of the signalled one that follows them
        let mut q: VecDeque<_> = [
            entry(7, false),
            entry(7, false),
            entry(9, true),
            entry(7, true),
            entry(7, false),
        ]
        .into();
        assert!(release_in(&mut q, 7, true, true));
        assert_eq!(q.len(), 1, "everything up to the signalled 7 is complete");
        assert!(
            !release_in(&mut q, 7, true, true),
            "no success completion belongs to an unsignalled WR"
        );
        assert!(
            release_in(&mut q, 7, true, false),
            "an error completion does"
        );
        assert!(q.is_empty());
    }

    #[test]
    fn unordered_queues_release_only_the_matching_entry() {
        let mut q: VecDeque<_> = [entry(1, true), entry(2, true), entry(3, true)].into();
        assert!(release_in(&mut q, 2, false, true));
        assert_eq!(q.iter().map(|e| e.wr_id).collect::<Vec<_>>(), [1, 3]);
        assert!(!release_in(&mut q, 2, false, true));
    }

    #[test]
    fn error_completions_find_their_queue() {
        // one CQ for both directions: an error completion with a send's id releases the send
        let srq = Arc::new(Mutex::new(VecDeque::from([entry(5, true)])));
        let qp = QpShared::new(Some(srq.clone()), true);
        lock(&qp.send).push_back(entry(4, true));
        qp.release(4, false, false);
        assert!(lock(&qp.send).is_empty());
        // no send with that id: it was a receive, taken from the SRQ's table
        qp.release(5, false, false);
        assert!(lock(&srq).is_empty());
        // separate CQs: an error the send queue does not know is a receive
        let qp = QpShared::new(None, false);
        lock(&qp.recv).push_back(entry(6, true));
        qp.release(6, false, false);
        assert!(lock(&qp.recv).is_empty());
        // success: the opcode decides
        lock(&qp.recv).push_back(entry(8, true));
        lock(&qp.send).push_back(entry(8, true));
        qp.release(8, true, true);
        assert!(lock(&qp.recv).is_empty());
        assert_eq!(lock(&qp.send).len(), 1);
    }
}
