//! The zero-copy replication pipeline: NVMe -> p2pmem -> RDMA WRITE -> remote p2pmem ->
//! remote NVMe, with no CPU copy of the payload inside peerpipe.
//!
//! Where things live: the rules in I/O-free state machines, the *cores* (`pipeline/core/`:
//! [`PrimaryCore`], [`ReplicaCore`], [`Ledger`], [`Window`]), above the per-connection wire
//! validators of [`crate::protocol`] (`PrimarySide`, `ReplicaSide`); the *engines*
//! (`pipeline/engine/`: [`engine::PrimaryEngine`], [`engine::ReplicaEngine`]) carry out the
//! cores' actions with one io_uring ring per process (NVMe
//! passthrough or O_DIRECT), RDMA connections whose completions are waited for in that same
//! ring ([`engine::WaitMode`]), and a p2p-alloc buffer pool.
//!
//! # Stages
//!
//! A run replicates one byte range of a source (NVMe namespace via passthrough, or a file /
//! block device via O_DIRECT) to N >= 1 replicas. The range is split into fixed-size blocks
//! ([`Layout`]); block `seq` covers `offset + seq * block_size` for `block_size` bytes, the last
//! one possibly shorter. Each block moves through these stages:
//!
//! 1. **Alloc** (primary): take a free buffer from the pool. Buffers come from a
//!    `peerpipe_p2p_alloc::Pool` whose chunks were registered once as RDMA memory regions
//!    (p2pmem when a provider is usable by both the NVMe and the NIC, else host memory: the
//!    same code path; the choice and its reason are reported at start).
//! 2. **Read** (primary): NVMe read (passthrough or O_DIRECT) from the source into the buffer,
//!    submitted on the engine's io_uring.
//! 3. **Send** (primary, fan-out): when every replica has advertised a buffer for `seq`
//!    (`BufferReady`), post one RDMA WRITE from the *same* local buffer to each replica,
//!    each followed on its queue pair by a `BlockSent` SEND. RC ordering guarantees the
//!    replica sees the SEND only after the WRITE's data is placed.
//! 4. **Write** (replica): on `BlockSent`, revoke the window, write the buffer to the drive
//!    at the block's offset, flush if the drive has a volatile write cache (NVMe: the
//!    controller's VWC bit; block device: sysfs `queue/write_cache` is "write back"; a regular
//!    file: always, fdatasync), then ack with
//!    `BlockWritten{status}` and re-advertise the buffer for a later block.
//! 5. **Retire** (primary): the source buffer is freed when every replica's WRITE completed
//!    locally (its work completion) — not before, since the NIC reads it until then. The block
//!    counts as replicated when every replica acked it with `Ok` ([`Ledger`]).
//!
//! # Bounded in-flight blocks and backpressure
//!
//! The primary keeps at most `window` blocks between Alloc and Retire ([`Window`]); a block
//! cannot be read before a slot is free, so a slow replica or drive stalls reads instead of
//! growing memory. Each replica grants its own window in `HelloAck` (<= proposed) and never
//! advertises more buffers than that; the primary treats an extra advertisement as a protocol
//! violation. The pool is sized for `window` blocks on both sides, so allocation never waits
//! on anything but in-flight blocks.
//!
//! # Completion ordering rules
//!
//! - Blocks are *started* in sequence order; reads, writes and acks may *complete* in any
//!   order. Nothing relies on completion order except the RC guarantees below.
//! - On one queue pair, WRITE then SEND are executed in order: a `BlockSent` is never seen
//!   before its data. The primary posts `BlockSent` only after posting the WRITE on the same
//!   QP, and frees the source buffer only after the WRITE's completion.
//! - A replica acks a block only after the drive write (and flush, if needed) completed with
//!   success; an ack with an error status is recorded as a failure, never as replicated.
//! - `BufferReady` messages arrive in sequence order, at most `window` unacked at a time.
//! - Each sequence number is sent, received and acked exactly once per replica
//!   (`protocol::PrimarySide` / `ReplicaSide` enforce this).
//!
//! # The zero-copy claim
//!
//! Every payload byte the CPU copies inside peerpipe goes through [`CopyMeter::copy`], which
//! counts it. In zero-copy mode the payload is only touched by DMA (NVMe into the buffer, the
//! NIC out of it and into the peer's buffer, the peer's NVMe out of it) and the count is 0; the
//! tests assert it. `--copy bounce` (the naive design: read into host memory, memcpy into a
//! registered send buffer, and the mirror on the replica) counts 2 x bytes per replica hop.
//! Control messages (64 bytes) and checksums (reads, not copies) are not payload copies.
//!
//! # Failure semantics
//!
//! - If a replica's connection fails (disconnect event, a WRITE/SEND completion error, a
//!   protocol violation, an abort, a timeout), every block not acked by that replica is marked
//!   failed for it ([`Ledger::fail_replica`]). The run continues to the surviving replicas
//!   (their data stays useful) and then ends with failure, listing the unreplicated ranges
//!   ([`Ledger::unreplicated`], coalesced byte ranges; per replica too).
//! - Success is reported only when every block is acked `Ok` by every replica (and, with
//!   `--verify`, every read-back checksum matched). Unacked data is never reported as
//!   replicated: a block whose WRITE completed but whose ack did not arrive is unreplicated.
//! - A replica that sees its primary go away before `Fin` (disconnect event, a completion
//!   error, or silence from the primary for the run's timeout: a link that went down delivers
//!   no event to a replica with nothing to send) stops, waits for its in-flight drive I/O,
//!   reports how many blocks it wrote and exits in order with a status *distinct from success*
//!   (the replicator example exits 3; 0 is kept for "the primary sent `Fin`"). Nothing is
//!   lost by stopping: blocks it acked are on its drive, blocks it never acked were never
//!   claimed as replicated by the primary. It is not 0 because this replica does not hold the
//!   whole range; it is not an error code (2) because the replica did nothing wrong.
//! - Malformed or out-of-order messages end that connection with a typed
//!   [`crate::protocol::ProtocolError`] (the offender is sent an `Abort`); they never cause a
//!   write outside the configured range: the replica writes only at the offset and length it
//!   computes itself from the validated configuration and sequence number.
//!
//! # Least-privilege remote access
//!
//! A replica registers its buffer chunks once with local access plus `MW_BIND` only — the MR's
//! rkey grants nothing remotely. For each block it binds a type-2 memory window over exactly
//! the block's target buffer (exactly the block's length, remote write only), and advertises
//! that window's rkey. The primary sends `BlockSent` with SEND_WITH_INVALIDATE of that rkey
//! (protocol version 3); when the receive completion says the NIC invalidated exactly the
//! slot's current key the replica writes at once, else (a plain SEND, another key) it refuses
//! the block as a protocol error and ends the connection, writing nothing of it. It never
//! posts a LOCAL_INV: on Linux 6.12 soft-RoCE a LOCAL_INV of a window a peer's SEND_WITH_INV
//! already invalidated crashes the kernel (`rxe_invalidate_mw`), a race a crafted primary
//! could start. So the key dies before the drive write starts, and a late or rogue WRITE
//! cannot change data in flight to the drive.
//! Each re-bind changes the key's low 8 bits, so old keys do not come back to life for 256
//! binds. The primary never exposes remote access to its own memory.

mod checksum;
mod copy;
mod core;
pub mod engine;
mod range;
mod stats;

pub use self::core::{
    BlockState, BoxError, Failure, Ledger, LedgerError, Mismatches, Outcome, PrimaryAction,
    PrimaryCore, Remote, ReplicaAction, ReplicaCore, ReplicaError, Window, WindowFull,
};
pub use checksum::{crc32c, Crc32c};
pub use copy::CopyMeter;
pub use range::{coalesce, Block, ByteRange, Layout, LayoutError};
pub use stats::{LatencyHistogram, Percentiles};
