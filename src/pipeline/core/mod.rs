//! The pipeline's rules as state machines without I/O (the *cores*), testable on any host and
//! driven by the randomized simulator in `tests/pipeline_cores.rs` and the fuzz targets.
//!
//! "Primary" and "replica" each exist at three layers; this is the middle one:
//!
//! | layer | primary | replica | what it knows |
//! |---|---|---|---|
//! | wire ([`crate::protocol`]) | `PrimarySide` | `ReplicaSide` | one connection's messages and their order |
//! | core (here) | [`PrimaryCore`] | [`ReplicaCore`] | the whole run: blocks, buffers, fan-out, verdict |
//! | engine ([`crate::pipeline::engine`]) | `PrimaryEngine` | `ReplicaEngine` | drives, rings, RDMA links, timeouts |
//!
//! A core consumes messages and I/O completions and emits actions ([`PrimaryAction`],
//! [`ReplicaAction`]) for its engine to carry out. The primary core keeps its per-block state
//! in a [`Ledger`] and bounds the blocks in flight with a [`Window`].

mod error;
mod flow;
mod ledger;
mod primary;
mod replica;

pub use error::{BoxError, Failure, ReplicaError};
pub use flow::{Window, WindowFull};
pub use ledger::{BlockState, Ledger, LedgerError, Mismatches};
pub use primary::{Outcome, PrimaryAction, PrimaryCore, Remote};
pub use replica::{ReplicaAction, ReplicaCore};
