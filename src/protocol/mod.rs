//! The replicator wire protocol: fixed-size (64-byte) little-endian control messages sent
//! over the RC queue pair next to the RDMA writes that carry the payload.
//!
//! Every message is [`MSG_LEN`] bytes: an 8-byte header (`magic`, `version`, `kind`, two
//! zero bytes) and a 56-byte body whose unused tail must be zero. [`Message::decode`] checks
//! the header, the kind, reserved bytes and per-field bounds that need no context;
//! [`PrimarySide`] and [`ReplicaSide`] check everything that depends on the negotiated
//! [`Config`], on the replica's target ([`ReplicaTarget`]) and on what was said before
//! (sequence numbers, offsets, lengths, who may end the run when). Any failed check is a
//! [`ProtocolError`]; the connection that produced it must be ended, because a peer that sends
//! one malformed message cannot be trusted to describe buffers correctly.
//!
//! Messages travel in SENDs of 1 to [`MAX_PACKED`] messages each (one SEND and its ACK per
//! batch, not per message: on soft-RoCE a SEND's fixed cost is that of many payload packets).
//!
//! Conversation (primary `P`, replica `R`; `seq` is the block index inside the range):
//! ```text
//! P -> R  Hello{config}                      R -> P  HelloAck{granted window, capacity}
//! R -> P  BufferReady{seq, addr, rkey, len}  (one per block, in seq order, <= window open)
//! P: RDMA WRITE block seq into (addr, rkey); then
//! P -> R  BlockSent{seq, offset, len}        (RC ordering: the write is placed before this;
//!                                            sent as SEND_WITH_INV of rkey)
//! R: rkey invalidated (else protocol error), write to drive, flush if volatile cache, then
//! R -> P  BlockWritten{seq, status}          (any order, each seq exactly once)
//! P -> R  VerifyRequest{seq}   R -> P VerifyResult{seq, len, crc}   (only with --verify)
//! P -> R  Fin{blocks, bytes}                 R -> P Fin{blocks, bytes}
//! either  Abort{code, seq}                   ends the connection
//! ```
//!
//! # Rules beyond the message format
//!
//! - **Hello** is checked against the replica's real target ([`ReplicaTarget`]): the range
//!   must end within its capacity, the range offset, length and block size must be multiples
//!   of its logical block size (else its direct I/O could not write them), and a block must fit
//!   one of its buffers. The replica grants `min(proposed window, its buffers)`.
//! - **Bounded state**: neither side allocates per block of the range. What is kept per block
//!   is bounded by the granted window (advertised, sent, being read back), plus one entry per
//!   block this side itself acked `Ok` and that still awaits its `VerifyRequest` (verify only).
//!   A Hello naming billions of blocks costs nothing until that many blocks were written.
//! - **VerifyRequest** is only valid when the Hello carried [`flags::VERIFY`], only for a block
//!   the replica acked `Ok`, once per block, and with at most `window` read-backs outstanding
//!   (the primary queues the rest); anything else is refused, so a peer cannot make a replica
//!   read back without bound.
//! - **Fin**: the primary sends it only when every block is acked by that replica and every
//!   read-back it asked for was answered; a replica refuses an earlier one. The replica sends
//!   its own `Fin` only in answer, with the blocks and bytes it acked `Ok`; the primary refuses
//!   a replica `Fin` before its own (a violation of that replica alone: the run continues to
//!   the others) and one whose counts differ from the `Ok` acks it received. The primary's
//!   counts (blocks replicated to every replica) may not exceed what the replica acked `Ok`.
//! - **No unchecked fields**: `BlockSent` carries no checksum (version 1 did, and nobody
//!   checked it); end-to-end integrity is `--verify`'s read-back. Its offset and length are
//!   checked against the replica's own layout, which is what it writes by.
//! - **Failed blocks**: a `BlockWritten` with a non-`Ok` status (a failed or short drive
//!   write) settles that block as failed: it is never counted as replicated, never verified,
//!   and does not keep the run from ending.

use std::fmt;

/// Size of every message on the wire.
pub const MSG_LEN: usize = 64;
/// `b"PPRP"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PPRP");
/// Protocol version spoken by this build (2: `BlockSent` lost its unchecked checksum; 3:
/// `BlockSent` is a SEND_WITH_INV of the window key its block was written through, so the
/// replica need not invalidate the window itself; a version-2 replica would invalidate it a
/// second time, which soft-RoCE does not survive, hence the bump). A version-3 replica never
/// invalidates a window itself: a `BlockSent` that did not invalidate its window's key is a
/// [`ProtocolError::NotInvalidating`].
pub const VERSION: u8 = 3;
/// Most messages one SEND carries (version 3): a SEND's payload is 1 to `MAX_PACKED` whole
/// messages, back to back, handled in order as if each had come alone. A sender packs the
/// messages it has ready at once (a replica's acks and advertisements after a flush); a
/// receiver posts receive buffers of `MAX_PACKED * MSG_LEN` bytes. A payload that is not a
/// whole number of messages is malformed.
pub const MAX_PACKED: usize = 8;
/// Largest block size a peer may propose (the receive side must size buffers for it).
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Largest number of blocks in flight per replica a peer may propose.
pub const MAX_WINDOW: u32 = 4096;

const HEADER_LEN: usize = 8;

mod error;
mod session;
mod wire;

pub use error::ProtocolError;
pub use session::{PrimarySide, ReplicaSide, ReplicaTarget};
pub use wire::{Message, MessageKind};

/// Hello flags.
pub mod flags {
    /// The primary will ask for read-back checksums ([`super::Message::VerifyRequest`]).
    pub const VERIFY: u32 = 1 << 0;
    /// Every flag this version understands.
    pub const ALL: u32 = VERIFY;
}

/// What the primary proposes; the replica must accept it as is (except the window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which replica this connection feeds (0-based, chosen by the primary).
    pub replica_id: u32,
    /// Bytes per block (the last block may be shorter); a multiple of `lba_size`.
    pub block_size: u32,
    /// Device logical block size: offsets and lengths are multiples of it.
    pub lba_size: u32,
    /// Most blocks the primary wants in flight to this replica.
    pub window: u32,
    /// Byte offset of the range on the drive (same offset on primary and replica).
    pub range_offset: u64,
    /// Byte length of the range.
    pub range_len: u64,
    /// [`flags`] bits.
    pub flags: u32,
}

impl Config {
    /// Number of blocks the range splits into (the last may be short).
    pub fn blocks(&self) -> u64 {
        self.range_len.div_ceil(u64::from(self.block_size))
    }

    /// Byte length of block `seq`, or `None` if `seq` is outside the range.
    pub fn block_len(&self, seq: u64) -> Option<u32> {
        let bs = u64::from(self.block_size);
        let start = seq.checked_mul(bs)?;
        if start >= self.range_len {
            return None;
        }
        // Fits in u32: at most block_size.
        Some((self.range_len - start).min(bs) as u32)
    }

    /// Drive byte offset of block `seq` (caller checked `seq` with [`Config::block_len`]).
    pub fn block_offset(&self, seq: u64) -> u64 {
        self.range_offset + seq * u64::from(self.block_size)
    }

    /// Checks the values themselves (no peer state).
    ///
    /// # Errors
    /// [`ProtocolError::BadConfig`] naming the first offending field.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |what: &'static str| Err(ProtocolError::BadConfig { what });
        if self.lba_size == 0 || !self.lba_size.is_power_of_two() {
            return bad("lba_size must be a power of two");
        }
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return bad("block_size must be 1..=64 MiB");
        }
        if self.block_size % self.lba_size != 0 {
            return bad("block_size must be a multiple of lba_size");
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return bad("window must be 1..=4096");
        }
        if self.range_len == 0 {
            return bad("range_len must not be 0");
        }
        if self.range_offset % u64::from(self.lba_size) != 0
            || self.range_len % u64::from(self.lba_size) != 0
        {
            return bad("range offset and length must be multiples of lba_size");
        }
        if self.range_offset.checked_add(self.range_len).is_none() {
            return bad("range end overflows u64");
        }
        if self.flags & !flags::ALL != 0 {
            return bad("unknown flags");
        }
        Ok(())
    }
}

/// Outcome of a replica's write or of a whole run, carried in acks and aborts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok,
    /// A system call failed with this errno.
    Errno(u16),
    /// The NVMe device returned this status (SCT << 8 | SC).
    Nvme(u16),
    /// The peer broke the protocol (the value is a [`ProtocolError::code`]).
    Protocol(u16),
    /// The range does not fit the replica's target, or other configuration refusal.
    Refused(u16),
}

impl Status {
    /// Wire form: kind in the high 16 bits, value in the low 16.
    pub fn to_wire(self) -> u32 {
        let (k, v) = match self {
            Status::Ok => (0u32, 0u16),
            Status::Errno(v) => (1, v),
            Status::Nvme(v) => (2, v),
            Status::Protocol(v) => (3, v),
            Status::Refused(v) => (4, v),
        };
        k << 16 | u32::from(v)
    }

    /// Parses the wire form.
    ///
    /// # Errors
    /// [`ProtocolError::BadStatus`] for an unknown kind or a non-zero value with `Ok`.
    pub fn from_wire(w: u32) -> Result<Status, ProtocolError> {
        let v = (w & 0xffff) as u16;
        Ok(match w >> 16 {
            0 if v == 0 => Status::Ok,
            1 => Status::Errno(v),
            2 => Status::Nvme(v),
            3 => Status::Protocol(v),
            4 => Status::Refused(v),
            _ => return Err(ProtocolError::BadStatus { got: w }),
        })
    }

    /// True for [`Status::Ok`].
    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => write!(f, "ok"),
            Status::Errno(e) => write!(
                f,
                "errno {e} ({})",
                std::io::Error::from_raw_os_error(i32::from(*e))
            ),
            Status::Nvme(s) => write!(f, "NVMe status {s:#06x}"),
            Status::Protocol(c) => write!(f, "protocol violation code {c}"),
            Status::Refused(c) => write!(f, "refused (code {c})"),
        }
    }
}
