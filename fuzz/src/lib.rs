//! Shared pieces of the fuzz targets: an allocation-measuring global allocator and
//! arbitrary protocol messages.
//!
//! The stated allocation bound: while a core handles fuzzer input (Hello included), no single
//! allocation exceeds [`ALLOC_BOUND`] and the live heap never grows by more than
//! [`ALLOC_BOUND`] above where it was before the input. A per-block allocation sized from a
//! peer's Hello (e.g. one byte per block of a 1 TiB range) breaks both.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use arbitrary::Arbitrary;
use peerpipe::protocol::{Config, Message, Status};

pub mod primary;
pub mod replica;

/// Largest single allocation, and largest growth of the live heap, allowed per input.
pub const ALLOC_BOUND: usize = 4 << 20;

/// Forwards to the system allocator, recording the live heap, its peak and the largest
/// single request.
pub struct Measuring;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    LARGEST.fetch_max(size, Ordering::Relaxed);
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated.
unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        // SAFETY: the caller upholds `alloc`'s contract for `l`.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        grew(new);
        // SAFETY: `p` was allocated by `System` with `l`; `new` is the caller's valid size.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Measuring = Measuring;

/// Measures the allocations of one input.
pub struct AllocProbe {
    base: usize,
}

impl AllocProbe {
    /// Starts measuring from the current live heap.
    pub fn start() -> AllocProbe {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        LARGEST.store(0, Ordering::Relaxed);
        AllocProbe { base }
    }

    /// Panics (a fuzz finding) if the bound was exceeded since [`AllocProbe::start`].
    pub fn check(&self, what: &str) {
        let largest = LARGEST.load(Ordering::Relaxed);
        let growth = PEAK.load(Ordering::Relaxed).saturating_sub(self.base);
        assert!(
            largest <= ALLOC_BOUND && growth <= ALLOC_BOUND,
            "{what}: allocation bound exceeded (largest {largest}, growth {growth}, bound {ALLOC_BOUND})"
        );
    }
}

/// A message as the fuzzer builds it (any field values; the wire encoding is the crate's).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum ArbMessage {
    /// [`Message::Hello`].
    Hello {
        /// Fields of [`Config`].
        replica_id: u32,
        /// Block size.
        block_size: u32,
        /// LBA size.
        lba_size: u32,
        /// Window.
        window: u32,
        /// Range offset.
        range_offset: u64,
        /// Range length.
        range_len: u64,
        /// Flags.
        flags: u32,
    },
    /// [`Message::HelloAck`].
    HelloAck {
        /// Replica id.
        replica_id: u32,
        /// Window.
        window: u32,
        /// Capacity.
        capacity: u64,
    },
    /// [`Message::BufferReady`].
    BufferReady {
        /// Block.
        seq: u64,
        /// Address.
        addr: u64,
        /// Key.
        rkey: u32,
        /// Length.
        len: u32,
    },
    /// [`Message::BlockSent`].
    BlockSent {
        /// Block.
        seq: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// [`Message::BlockWritten`].
    BlockWritten {
        /// Block.
        seq: u64,
        /// Wire status.
        status: u32,
    },
    /// [`Message::VerifyRequest`].
    VerifyRequest {
        /// Block.
        seq: u64,
    },
    /// [`Message::VerifyResult`].
    VerifyResult {
        /// Block.
        seq: u64,
        /// Length.
        len: u32,
        /// Checksum.
        crc: u32,
        /// Wire status.
        status: u32,
    },
    /// [`Message::Fin`].
    Fin {
        /// Blocks.
        blocks: u64,
        /// Bytes.
        bytes: u64,
    },
    /// [`Message::Abort`].
    Abort {
        /// Wire status.
        status: u32,
        /// Block.
        seq: u64,
    },
    /// Raw bytes (any length up to 80).
    Raw(RawBytes),
}

/// Up to 80 arbitrary bytes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct RawBytes {
    /// Bytes.
    pub bytes: [u8; 80],
    /// How many of them to send.
    pub len: u8,
}

/// A status from its wire form, or an errno if the form is invalid.
pub fn status(w: u32) -> Status {
    Status::from_wire(w).unwrap_or(Status::Errno(5))
}

impl ArbMessage {
    /// The bytes a peer would put on the wire for this message.
    pub fn wire(&self) -> Vec<u8> {
        let m = match *self {
            ArbMessage::Hello {
                replica_id,
                block_size,
                lba_size,
                window,
                range_offset,
                range_len,
                flags,
            } => {
                // The typed encoder writes any values; the decoder judges them.
                Message::Hello(Config {
                    replica_id,
                    block_size,
                    lba_size,
                    window,
                    range_offset,
                    range_len,
                    flags,
                })
            }
            ArbMessage::HelloAck {
                replica_id,
                window,
                capacity,
            } => Message::HelloAck {
                replica_id,
                window,
                capacity,
            },
            ArbMessage::BufferReady {
                seq,
                addr,
                rkey,
                len,
            } => Message::BufferReady {
                seq,
                addr,
                rkey,
                len,
            },
            ArbMessage::BlockSent { seq, offset, len } => Message::BlockSent { seq, offset, len },
            ArbMessage::BlockWritten { seq, status: s } => Message::BlockWritten {
                seq,
                status: status(s),
            },
            ArbMessage::VerifyRequest { seq } => Message::VerifyRequest { seq },
            ArbMessage::VerifyResult {
                seq,
                len,
                crc,
                status: s,
            } => Message::VerifyResult {
                seq,
                len,
                crc,
                status: status(s),
            },
            ArbMessage::Fin { blocks, bytes } => Message::Fin { blocks, bytes },
            ArbMessage::Abort { status: s, seq } => Message::Abort {
                status: status(s),
                seq,
            },
            ArbMessage::Raw(r) => {
                return r.bytes[..usize::from(r.len).min(r.bytes.len())].to_vec();
            }
        };
        m.encode().to_vec()
    }
}
