//! Why an operation a core asked for failed, as its engine reports it back.

use std::time::Duration;

use crate::rdma::{WcOpcode, WcStatus};

/// A lower layer's error, boxed (io_uring, verbs, rdma_cm, or a test's own).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a source read or an RDMA write failed, or why a replica's connection was lost: what
/// an engine passes to [`PrimaryCore::on_read_done`](super::PrimaryCore::on_read_done),
/// [`PrimaryCore::on_write_done`](super::PrimaryCore::on_write_done) and
/// [`PrimaryCore::on_replica_lost`](super::PrimaryCore::on_replica_lost). The core reports
/// it (as text) in the run's [`Outcome`](super::Outcome).
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
}
