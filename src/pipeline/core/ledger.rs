//! Per-block, per-replica replication state, and the "unreplicated ranges" report.

use crate::pipeline::range::{coalesce, ByteRange, Layout};
use crate::protocol::Status;

/// Where one block stands with one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Not sent yet.
    Pending,
    /// RDMA-written and announced; no ack yet.
    Sent,
    /// The replica acked a successful, durable write.
    Acked,
    /// The replica reported an error for it, or the replica was lost before acking it.
    Failed,
}

/// A ledger update that contradicts the recorded state (a bug or a misbehaving peer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Sequence number or replica index outside the ledger.
    #[error(
        "block {seq} / replica {replica} is outside the run ({blocks} blocks, {replicas} replicas)"
    )]
    OutOfRange {
        /// Block.
        seq: u64,
        /// Replica.
        replica: usize,
        /// Blocks in the run.
        blocks: u64,
        /// Replicas in the run.
        replicas: usize,
    },
    /// The transition is not allowed from the current state.
    #[error("block {seq} on replica {replica}: cannot go from {from:?} to {to:?}")]
    Transition {
        /// Block.
        seq: u64,
        /// Replica.
        replica: usize,
        /// Current state.
        from: BlockState,
        /// Requested state.
        to: BlockState,
    },
}

/// Tracks which blocks every replica holds.
///
/// A block is *replicated* only when every replica acked it with [`Status::Ok`]; the run
/// succeeds only when every block is. Nothing else counts: a block that was sent but not
/// acked when a replica died is reported unreplicated.
#[derive(Debug, Clone)]
pub struct Ledger {
    layout: Layout,
    replicas: usize,
    /// `states[seq * replicas + r]`.
    states: Vec<BlockState>,
    /// Number of (block, replica) pairs acked.
    acked: u64,
    /// Blocks acked `Ok` per replica.
    acked_by: Vec<u64>,
    /// First error status seen per replica (for the report).
    first_error: Vec<Option<(u64, Status)>>,
}

impl Ledger {
    /// A ledger for `replicas` replicas of `layout`, all blocks pending.
    pub fn new(layout: Layout, replicas: usize) -> Ledger {
        let n = usize::try_from(layout.blocks()).unwrap_or(usize::MAX);
        Ledger {
            layout,
            replicas,
            states: vec![BlockState::Pending; n.saturating_mul(replicas)],
            acked: 0,
            acked_by: vec![0; replicas],
            first_error: vec![None; replicas],
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of replicas.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    fn index(&self, seq: u64, replica: usize) -> Result<usize, LedgerError> {
        if seq >= self.layout.blocks() || replica >= self.replicas {
            return Err(LedgerError::OutOfRange {
                seq,
                replica,
                blocks: self.layout.blocks(),
                replicas: self.replicas,
            });
        }
        Ok(seq as usize * self.replicas + replica)
    }

    /// State of `seq` on `replica`.
    ///
    /// # Errors
    /// [`LedgerError::OutOfRange`].
    pub fn state(&self, seq: u64, replica: usize) -> Result<BlockState, LedgerError> {
        Ok(self.states[self.index(seq, replica)?])
    }

    fn transition(
        &mut self,
        seq: u64,
        replica: usize,
        from: BlockState,
        to: BlockState,
    ) -> Result<(), LedgerError> {
        let i = self.index(seq, replica)?;
        let cur = self.states[i];
        if cur != from {
            return Err(LedgerError::Transition {
                seq,
                replica,
                from: cur,
                to,
            });
        }
        self.states[i] = to;
        Ok(())
    }

    /// `seq` was written to `replica` and announced.
    ///
    /// # Errors
    /// [`LedgerError`] unless the block was pending.
    pub fn sent(&mut self, seq: u64, replica: usize) -> Result<(), LedgerError> {
        self.transition(seq, replica, BlockState::Pending, BlockState::Sent)
    }

    /// `replica` answered for `seq` with `status`.
    ///
    /// # Errors
    /// [`LedgerError`] unless the block was sent and not yet answered.
    pub fn acked(&mut self, seq: u64, replica: usize, status: Status) -> Result<(), LedgerError> {
        if status.is_ok() {
            self.transition(seq, replica, BlockState::Sent, BlockState::Acked)?;
            self.acked += 1;
            self.acked_by[replica] += 1;
        } else {
            self.transition(seq, replica, BlockState::Sent, BlockState::Failed)?;
            if self.first_error[replica].is_none() {
                self.first_error[replica] = Some((seq, status));
            }
        }
        Ok(())
    }

    /// `replica` is gone: everything it did not ack is failed. Returns how many blocks that
    /// affected.
    pub fn fail_replica(&mut self, replica: usize) -> u64 {
        if replica >= self.replicas {
            return 0;
        }
        let mut n = 0;
        for i in (replica..self.states.len()).step_by(self.replicas) {
            if matches!(self.states[i], BlockState::Pending | BlockState::Sent) {
                self.states[i] = BlockState::Failed;
                n += 1;
            }
        }
        n
    }

    /// Blocks `replica` acked `Ok` so far (0 for a replica out of range).
    pub fn acked_blocks(&self, replica: usize) -> u64 {
        self.acked_by.get(replica).copied().unwrap_or(0)
    }

    /// True when `seq` is acked by every replica.
    pub fn is_replicated(&self, seq: u64) -> bool {
        (0..self.replicas).all(|r| self.state(seq, r) == Ok(BlockState::Acked))
    }

    /// True when nothing is pending or sent (every pair acked or failed).
    pub fn is_settled(&self) -> bool {
        self.states
            .iter()
            .all(|s| matches!(s, BlockState::Acked | BlockState::Failed))
    }

    /// True only if every block is acked `Ok` by every replica.
    pub fn all_replicated(&self) -> bool {
        self.replicas > 0 && self.acked == self.states.len() as u64
    }

    /// Blocks acked by every replica and their byte count.
    pub fn replicated_blocks_bytes(&self) -> (u64, u64) {
        self.layout
            .iter()
            .filter(|b| self.is_replicated(b.seq))
            .fold((0, 0), |(n, bytes), b| (n + 1, bytes + u64::from(b.len)))
    }

    /// Coalesced byte ranges not acked by every replica.
    pub fn unreplicated(&self) -> Vec<ByteRange> {
        coalesce(
            self.layout
                .iter()
                .filter(|b| !self.is_replicated(b.seq))
                .map(|b| b.range()),
        )
    }

    /// Coalesced byte ranges `replica` has not acked.
    pub fn unreplicated_on(&self, replica: usize) -> Vec<ByteRange> {
        coalesce(
            self.layout
                .iter()
                .filter(|b| self.state(b.seq, replica) != Ok(BlockState::Acked))
                .map(|b| b.range()),
        )
    }

    /// First error status `replica` reported, with its block.
    pub fn first_error(&self, replica: usize) -> Option<(u64, Status)> {
        self.first_error.get(replica).copied().flatten()
    }
}

/// Blocks whose read-back checksum did not match, per replica (for `--verify`).
#[derive(Debug, Clone, Default)]
pub struct Mismatches {
    per_replica: Vec<Vec<ByteRange>>,
    checked: u64,
}

impl Mismatches {
    /// Empty record for `replicas` replicas.
    pub fn new(replicas: usize) -> Mismatches {
        Mismatches {
            per_replica: vec![Vec::new(); replicas],
            checked: 0,
        }
    }

    /// Records the comparison of `range` on `replica`; returns whether it matched.
    pub fn check(
        &mut self,
        replica: usize,
        range: ByteRange,
        source: u32,
        replica_crc: u32,
    ) -> bool {
        self.checked += 1;
        let ok = source == replica_crc;
        if !ok {
            if let Some(v) = self.per_replica.get_mut(replica) {
                v.push(range);
            }
        }
        ok
    }

    /// Records a range that could not be read back (counts as mismatching).
    pub fn unreadable(&mut self, replica: usize, range: ByteRange) {
        self.checked += 1;
        if let Some(v) = self.per_replica.get_mut(replica) {
            v.push(range);
        }
    }

    /// Number of comparisons made.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Coalesced mismatching ranges of `replica`.
    pub fn ranges(&self, replica: usize) -> Vec<ByteRange> {
        coalesce(self.per_replica.get(replica).cloned().unwrap_or_default())
    }

    /// True if nothing mismatched.
    pub fn is_clean(&self) -> bool {
        self.per_replica.iter().all(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        // 10 blocks of 4 KiB at offset 1 MiB, last one 1 KiB.
        Layout::new(1 << 20, 9 * 4096 + 1024, 4096, 512, 1 << 30).unwrap()
    }

    fn r(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    #[test]
    fn success_requires_every_replica_ack() {
        let l = layout();
        let mut g = Ledger::new(l, 2);
        assert!(!g.all_replicated());
        assert_eq!(g.unreplicated(), vec![l.range()]);
        for seq in 0..l.blocks() {
            g.sent(seq, 0).unwrap();
            g.sent(seq, 1).unwrap();
            g.acked(seq, 0, Status::Ok).unwrap();
        }
        assert!(!g.all_replicated(), "replica 1 has acked nothing");
        assert_eq!((g.acked_blocks(0), g.acked_blocks(1)), (10, 0));
        assert_eq!(g.acked_blocks(2), 0, "no such replica");
        assert!(g.unreplicated_on(0).is_empty());
        assert_eq!(g.unreplicated_on(1), vec![l.range()]);
        for seq in 0..l.blocks() {
            g.acked(seq, 1, Status::Ok).unwrap();
        }
        assert!(g.all_replicated());
        assert!(g.is_settled());
        assert!(g.unreplicated().is_empty());
        assert_eq!(g.replicated_blocks_bytes(), (10, l.len()));
    }

    #[test]
    fn dead_replica_reports_coalesced_unacked_ranges() {
        let l = layout();
        let base = l.offset();
        let mut g = Ledger::new(l, 2);
        // Replica 0 acks everything; replica 1 acks 0..=2 and 5, has 3,4 in flight, dies.
        for seq in 0..l.blocks() {
            g.sent(seq, 0).unwrap();
            g.acked(seq, 0, Status::Ok).unwrap();
        }
        for seq in 0..=5 {
            g.sent(seq, 1).unwrap();
        }
        for seq in [0, 1, 2, 5] {
            g.acked(seq, 1, Status::Ok).unwrap();
        }
        assert_eq!(g.fail_replica(1), 6, "2 sent + 4 pending");
        assert!(g.is_settled());
        assert!(!g.all_replicated());
        let end = l.range().end;
        assert_eq!(
            g.unreplicated(),
            vec![r(base + 3 * 4096, base + 5 * 4096), r(base + 6 * 4096, end)]
        );
        // Late ack after failure is refused, not counted.
        assert!(matches!(
            g.acked(3, 1, Status::Ok),
            Err(LedgerError::Transition { .. })
        ));
        assert!(!g.all_replicated());
    }

    #[test]
    fn error_ack_is_failure_not_success() {
        let l = layout();
        let mut g = Ledger::new(l, 1);
        for seq in 0..l.blocks() {
            g.sent(seq, 0).unwrap();
            let st = if seq == 4 {
                Status::Errno(5)
            } else {
                Status::Ok
            };
            g.acked(seq, 0, st).unwrap();
        }
        assert!(!g.all_replicated());
        assert_eq!(g.first_error(0), Some((4, Status::Errno(5))));
        let b = l.block(4).unwrap();
        assert_eq!(g.unreplicated(), vec![b.range()]);
    }

    #[test]
    fn invalid_transitions_and_indices_are_errors() {
        let mut g = Ledger::new(layout(), 1);
        assert!(matches!(
            g.acked(0, 0, Status::Ok),
            Err(LedgerError::Transition { .. })
        ));
        g.sent(0, 0).unwrap();
        assert!(g.sent(0, 0).is_err());
        assert!(matches!(g.sent(10, 0), Err(LedgerError::OutOfRange { .. })));
        assert!(matches!(g.sent(0, 1), Err(LedgerError::OutOfRange { .. })));
        assert_eq!(g.fail_replica(7), 0);
    }

    #[test]
    fn mismatches_coalesce_per_replica() {
        let mut m = Mismatches::new(2);
        assert!(m.check(0, r(0, 10), 1, 1));
        assert!(!m.check(1, r(10, 20), 1, 2));
        assert!(!m.check(1, r(0, 10), 3, 4));
        m.unreadable(1, r(30, 40));
        assert_eq!(m.checked(), 4);
        assert!(!m.is_clean());
        assert!(m.ranges(0).is_empty());
        assert_eq!(m.ranges(1), vec![r(0, 20), r(30, 40)]);
    }
}
