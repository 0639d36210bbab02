//! Why an operation a core asked for failed, as its engine reports it back.

use std::sync::Arc;
use std::time::Duration;

use crate::pipeline::range::ByteRange;
use crate::protocol::{ProtocolError, Status};
use crate::rdma::{WcOpcode, WcStatus};

/// A lower layer's error, boxed (io_uring, verbs, rdma_cm, or a test's own).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a source read or an RDMA write failed, or why a replica's connection was lost: what
/// an engine passes to [`PrimaryCore::on_read_done`](super::PrimaryCore::on_read_done),
/// [`PrimaryCore::on_write_done`](super::PrimaryCore::on_write_done) and
/// [`PrimaryCore::on_replica_lost`](super::PrimaryCore::on_replica_lost). The core keeps
/// it, shared, in the [`ReplicaError`] the run's [`Outcome`](super::Outcome) reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// `op` moved fewer bytes than the block holds.
    #[error("short {op}: {got} of {want} bytes")]
    Short {
        /// The operation (`"read"`).
        op: &'static str,
        /// Bytes moved.
        got: usize,
        /// Bytes the block holds.
        want: usize,
    },
    /// `op` failed in the layer below (with its errno / NVMe status / verbs error).
    #[error("{op}: {source}")]
    Op {
        /// What was being done.
        op: &'static str,
        /// The lower layer's error.
        #[source]
        source: BoxError,
    },
    /// An error of the layer below that names its operation itself.
    #[error(transparent)]
    Lower(BoxError),
    /// A work request completed with an error status.
    #[error("{opcode:?} completion failed: {status:?} (the replica died or the link is down)")]
    Completion {
        /// The work request's kind.
        opcode: WcOpcode,
        /// The status it completed with.
        status: WcStatus,
    },
    /// The replica owed answers (acks, buffers, read-backs) and said nothing for `timeout`.
    #[error(
        "no answer for {timeout:?} while blocks waited on it: the replica or its link stalled"
    )]
    Stalled {
        /// The run's timeout.
        timeout: Duration,
    },
    /// Nothing moved for `timeout` while no replica owed an answer: the source stalled.
    #[error("no progress for {timeout:?} with no replica owing an answer: the source stalled")]
    SourceStalled {
        /// The run's timeout.
        timeout: Duration,
    },
}

impl Failure {
    /// `op` failed with `source`.
    pub fn op(op: &'static str, source: impl Into<BoxError>) -> Failure {
        Failure::Op {
            op,
            source: source.into(),
        }
    }
}

/// Why a replica was lost or failed a block, first reason only: one entry of
/// [`Outcome::replica_errors`](super::Outcome::replica_errors). Display gives the text the
/// replicator prints.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The source read of `seq` failed and ended the run (reported for replicas that had
    /// no error of their own).
    #[error("source read of block {seq} ({}) failed: {source}", .range.map_or(String::new(), |r| r.to_string()))]
    SourceRead {
        /// The block.
        seq: u64,
        /// Its bytes on the source.
        range: Option<ByteRange>,
        /// Why the read failed.
        #[source]
        source: Arc<Failure>,
    },
    /// The replica was sent an abort because a source read failed.
    #[error("aborted: source read failed")]
    SourceAborted,
    /// The RDMA WRITE of `seq` to the replica failed (its connection is broken).
    #[error("RDMA write of block {seq} failed: {source}")]
    Write {
        /// The block.
        seq: u64,
        /// Why the write failed.
        #[source]
        source: Arc<Failure>,
    },
    /// The replica acked `seq` with an error status (its drive write failed).
    #[error("replica {replica} failed to write block {seq}: {status}")]
    BlockFailed {
        /// Replica index.
        replica: usize,
        /// The block.
        seq: u64,
        /// The status it sent.
        status: Status,
    },
    /// The replica broke the protocol (it was sent an abort), or aborted itself.
    #[error("replica {replica}: {source}")]
    Protocol {
        /// Replica index.
        replica: usize,
        /// The violation, or the replica's abort.
        #[source]
        source: ProtocolError,
    },
    /// The engine reported the connection lost (disconnect, timeout, failed completion).
    #[error(transparent)]
    Lost(Arc<Failure>),
    /// A block the replica had a buffer for could not be sent to it: the connection's
    /// validator or the ledger refused it (a bug; the replica is dropped rather than guessed
    /// about).
    #[error("internal: block {seq} could not be sent")]
    NotSent {
        /// The block.
        seq: u64,
    },
    /// The ledger was settled but the replica's connection refused the `Fin` (a bug).
    #[error("internal: fin to replica {replica} refused: {source}")]
    FinRefused {
        /// Replica index.
        replica: usize,
        /// What the connection's validator said.
        #[source]
        source: ProtocolError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_render_what_failed() {
        let short = Failure::Short {
            op: "read",
            got: 512,
            want: 4096,
        };
        assert_eq!(short.to_string(), "short read: 512 of 4096 bytes");
        let e = Failure::op(
            "posting work requests",
            std::io::Error::from_raw_os_error(5),
        );
        assert!(e.to_string().starts_with("posting work requests: "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        let lower = Failure::Lower("disconnected".into());
        assert_eq!(lower.to_string(), "disconnected");
        let stalled = Failure::Stalled {
            timeout: Duration::from_secs(2),
        };
        assert!(stalled.to_string().contains("stalled"), "{stalled}");
    }

    #[test]
    fn replica_errors_render_and_keep_their_source() {
        let read = ReplicaError::SourceRead {
            seq: 3,
            range: Some(ByteRange {
                start: 12288,
                end: 16384,
            }),
            source: Arc::new(Failure::Short {
                op: "read",
                got: 0,
                want: 4096,
            }),
        };
        assert_eq!(
            read.to_string(),
            format!(
                "source read of block 3 ({}) failed: short read: 0 of 4096 bytes",
                ByteRange {
                    start: 12288,
                    end: 16384
                }
            )
        );
        let source = std::error::Error::source(&read).expect("the failure is the source");
        assert_eq!(source.to_string(), "short read: 0 of 4096 bytes");
        let unknown = ReplicaError::SourceRead {
            seq: 9,
            range: None,
            source: Arc::new(Failure::Lower("gone".into())),
        };
        assert_eq!(
            unknown.to_string(),
            "source read of block 9 () failed: gone"
        );
        let write = ReplicaError::Write {
            seq: 7,
            source: Arc::new(Failure::Completion {
                opcode: WcOpcode::RdmaWrite,
                status: WcStatus::RetryExceeded,
            }),
        };
        assert!(
            write
                .to_string()
                .starts_with("RDMA write of block 7 failed: "),
            "{write}"
        );
        let lost = ReplicaError::Lost(Arc::new(Failure::Lower("disconnected".into())));
        assert_eq!(lost.to_string(), "disconnected");
    }
}
