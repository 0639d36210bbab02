//! The engine's typed errors: each names the operation and carries the errno / NVMe status /
//! work-completion status of the layer below, and says what to do.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::pipeline::LayoutError;
use crate::protocol::ProtocolError;

/// Why an engine could not be set up or a run had to stop.
///
/// Replica losses, drive errors of single blocks and verify mismatches are *not* errors: they
/// end in a [`super::PrimaryReport`] with `success == false`. These are the cases where no
/// meaningful report exists (bad configuration, setup failures, a broken local resource, or a
/// protocol violation that ends a replica's only connection).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A configuration value is out of range or missing.
    #[error("{what}: {reason}")]
    InvalidConfig {
        /// The setting, named like the [`PrimaryConfig`](super::PrimaryConfig) /
        /// [`ReplicaConfig`](super::ReplicaConfig) field (`source`, `replicas`, `target`,
        /// `block_size`, `window`, `timeout`, `buffers`, `copy`, `wait`).
        what: &'static str,
        /// What is wrong and what to use instead.
        reason: String,
    },
    /// The byte range does not fit the source or its block size.
    #[error("range: {0}")]
    Range(#[from] LayoutError),
    /// Opening the source/target failed (ENOENT: no such path; EACCES: run as root; ENOTTY:
    /// a char device that is not an NVMe namespace).
    #[error("opening {}: {source}", path.display())]
    Open {
        /// The path given.
        path: PathBuf,
        /// The io_uring layer's error (with its errno / NVMe status).
        #[source]
        source: Box<crate::uring::Error>,
    },
    /// A writable target's block device is mounted or claimed by something else (EBUSY on
    /// an O_EXCL open): writing under a file system would corrupt it.
    #[error("{}: {} is in use (mounted, or claimed by another program); refusing to write to it", path.display(), device.display())]
    InUse {
        /// The path given.
        path: PathBuf,
        /// The block device that is in use.
        device: PathBuf,
    },
    /// An io_uring operation failed as a whole (setup, submission, or waiting).
    #[error("io_uring {op}: {source}")]
    Ring {
        /// What the engine was doing.
        op: &'static str,
        /// The io_uring layer's error.
        #[source]
        source: Box<crate::uring::Error>,
    },
    /// The buffer pool could not be created or could not hold the window.
    #[error("{what}: {source}")]
    Buffers {
        /// What was being allocated.
        what: String,
        /// The allocator's error (with errno, or the provider's free space).
        #[source]
        source: crate::p2p_alloc::Error,
    },
    /// p2p buffers were asked for, but no provider can serve them.
    #[error("p2p buffers: {0}; use host buffers")]
    NoP2pMem(String),
    /// An RDMA setup or posting step failed.
    #[error("{op}: {source}")]
    Rdma {
        /// What the engine was doing.
        op: String,
        /// The verbs / rdma_cm error (with errno or work-completion status).
        #[source]
        source: Box<crate::rdma::Error>,
    },
    /// Connecting to a replica failed (ECONNREFUSED / rejected: nothing listens there;
    /// timeout: no route, or the replica is not up yet).
    #[error("replica {replica} ({addr}): {op}: {source}")]
    Connect {
        /// Index of the replica (command-line order).
        replica: usize,
        /// Its address.
        addr: SocketAddr,
        /// `resolve` or `connect`.
        op: &'static str,
        /// The rdma_cm error.
        #[source]
        source: Box<crate::rdma::Error>,
    },
    /// A replica refused this primary, or failed to prove the shared secret.
    #[error("replica {replica} ({addr}): {reason}")]
    Refused {
        /// Index of the replica (command-line order).
        replica: usize,
        /// Its address.
        addr: SocketAddr,
        /// Why (the replica's stated reason, or the failed proof).
        reason: String,
    },
    /// The primary's hello asked for a range outside what this replica accepts.
    #[error("the primary asked for bytes {start}..{end}, outside the range this replica accepts ({allowed_start}..{allowed_end})")]
    RangeRefused {
        /// First byte asked for.
        start: u64,
        /// End (exclusive) asked for.
        end: u64,
        /// First byte accepted.
        allowed_start: u64,
        /// End (exclusive) accepted.
        allowed_end: u64,
    },
    /// No primary connected to the replica in time.
    #[error("waiting for the primary: {0}")]
    NoPrimary(#[source] Box<crate::rdma::Error>),
    /// The primary connected but sent no hello within the timeout.
    #[error("no hello from the primary within {0:?}")]
    NoHello(Duration),
    /// The primary broke the protocol (malformed or out-of-order message); it was sent an abort.
    #[error("protocol error from the primary: {0}")]
    Protocol(#[source] ProtocolError),
    /// The primary's blocks are larger than this replica's buffers.
    #[error("the primary's block size {got} exceeds this replica's largest block size {max}: start the replica with a block size of {got} or more")]
    BlockTooLarge {
        /// The primary's block size.
        got: u32,
        /// This replica's buffer size.
        max: u64,
    },
    /// An engine invariant broke (a bug): the message says which.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl EngineError {
    pub(crate) fn rdma(op: impl Into<String>, source: crate::rdma::Error) -> EngineError {
        EngineError::Rdma {
            op: op.into(),
            source: Box::new(source),
        }
    }
    pub(crate) fn ring(op: &'static str, source: crate::uring::Error) -> EngineError {
        EngineError::Ring {
            op,
            source: Box::new(source),
        }
    }
    pub(crate) fn config(what: &'static str, reason: impl Into<String>) -> EngineError {
        EngineError::InvalidConfig {
            what,
            reason: reason.into(),
        }
    }
}
