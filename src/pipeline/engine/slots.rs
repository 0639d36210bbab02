//! Block buffers: one p2p-alloc pool sized for the window, whose chunks are registered once
//! as RDMA memory regions per connection, and the raw view io_uring gets of a slot.

use std::collections::HashMap;
use std::fmt;

use crate::p2p_alloc::{self as alloc, Placement, Pool};
use crate::rdma::{Access, MemoryKind, MemoryRegion, ProtectionDomain};
use crate::uring::RawBuf;

use super::{BufferChoice, EngineError};

/// Which memory the block buffers are in, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferInfo {
    /// `p2p` or `host`.
    pub kind: BufferChoice,
    /// Why: the provider and its device, or the configuration that asked for host memory.
    pub reason: String,
}

impl fmt::Display for BufferInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.reason)
    }
}

/// `n` block buffers from one pool.
pub(crate) struct Slots {
    // Buffers before the pool: they return their space to it when dropped.
    bufs: Vec<alloc::Buffer>,
    pool: Pool,
    pub(crate) info: BufferInfo,
}

/// The chunk size: a power of two holding at least one block, and at least 4 MiB so a
/// window of small blocks shares a few registrations.
fn chunk_size(block: usize) -> usize {
    block.next_power_of_two().max(4 << 20)
}

impl Slots {
    /// Allocates `n` buffers of `block` bytes.
    ///
    /// # Errors
    /// [`EngineError::NoP2pMem`] when `p2p` is asked for and no provider has a
    /// `/dev/p2pmemN` char device (the only interface `ibv_reg_mr` accepts);
    /// [`EngineError::Buffers`] when the pool cannot be created or is too small (ENOMEM, or
    /// the provider's free space).
    pub(crate) fn alloc(want: BufferChoice, n: usize, block: usize) -> Result<Slots, EngineError> {
        let chunk = chunk_size(block);
        let (pool, reason) = match want {
            BufferChoice::Host => (
                Pool::builder(Placement::HostOnly)
                    .chunk_size(chunk)
                    .build()
                    .map_err(|source| EngineError::Buffers {
                        what: "host buffer pool".into(),
                        source,
                    })?,
                "--buffers host".to_string(),
            ),
            BufferChoice::P2p => {
                let providers = alloc::discover(&alloc::SysRoot::live()).map_err(|source| {
                    EngineError::Buffers {
                        what: "p2pmem discovery".into(),
                        source,
                    }
                })?;
                // ibv_reg_mr works on the char device interface only (capability matrix).
                let p = providers
                    .into_iter()
                    .find(|p| p.chardev.is_some())
                    .ok_or_else(|| {
                        EngineError::NoP2pMem(
                            "no p2pmem provider with a /dev/p2pmemN char device".into(),
                        )
                    })?;
                let via = p
                    .chardev
                    .as_ref()
                    .map(|c| c.display().to_string())
                    .unwrap_or_default();
                let reason = format!("p2pmem of {} via {via}", p.pci);
                (
                    Pool::builder(Placement::P2pRequired)
                        .provider(p)
                        .interface(alloc::Interface::CharDev)
                        .chunk_size(chunk)
                        .build()
                        .map_err(|source| EngineError::Buffers {
                            what: "p2pmem buffer pool".into(),
                            source,
                        })?,
                    reason,
                )
            }
        };
        let mut bufs = Vec::with_capacity(n);
        for _ in 0..n {
            bufs.push(pool.alloc(block).map_err(|source| EngineError::Buffers {
                what: format!("allocating {n} x {block} B {want} buffers"),
                source,
            })?);
        }
        Ok(Slots {
            bufs,
            pool,
            info: BufferInfo { kind: want, reason },
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.bufs.len()
    }

    pub(crate) fn buf(&self, i: usize) -> &alloc::Buffer {
        &self.bufs[i]
    }

    pub(crate) fn ptr(&self, i: usize) -> *mut u8 {
        self.bufs[i].addr()
    }

    /// The first `len` bytes of slot `i`, for one io_uring operation.
    pub(crate) fn io_view(&self, i: usize, len: usize) -> RawBuf {
        debug_assert!(len <= self.bufs[i].len(), "a block is at most one slot");
        // SAFETY: a block is at most one slot (the engine's block size is the slot size). The
        // pool, and so every slot, outlives the ring's use of it: the engines drain the ring
        // before dropping their slots, bounce and read-back buffers. The slot bookkeeping of
        // the primary/replica loops never gives one slot to two operations at once, and
        // nothing else touches a slot while an operation owns it.
        unsafe { RawBuf::new(self.ptr(i), len) }
    }

    /// Registers every chunk of the pool once with `pd`; returns chunk id -> region.
    ///
    /// # Safety
    /// The caller drops every returned region before these slots (the chunks stay mapped
    /// while the pool lives).
    ///
    /// # Errors
    /// [`EngineError::Rdma`] from `ibv_reg_mr` (EFAULT: memory the NIC cannot map).
    pub(crate) unsafe fn register(
        &self,
        pd: &ProtectionDomain,
        access: Access,
    ) -> Result<HashMap<u32, MemoryRegion>, EngineError> {
        let kind = match self.info.kind {
            BufferChoice::P2p => MemoryKind::Peer,
            BufferChoice::Host => MemoryKind::Host,
        };
        let mut out = HashMap::new();
        for c in self.pool.chunks() {
            // SAFETY: the chunk stays mapped while the pool lives; the caller drops the region
            // before the slots (this function's contract).
            let mr =
                unsafe { MemoryRegion::register_raw(pd, c.addr as *mut u8, c.len, access, kind) }
                    .map_err(|e| {
                    EngineError::rdma(format!("registering {} chunk {}", self.info.kind, c.id), e)
                })?;
            out.insert(c.id, mr);
        }
        Ok(out)
    }
}

/// Host buffers with 4096-byte aligned views, for bounce copies and read-backs.
pub(crate) struct HostBuf(Vec<u8>);

impl HostBuf {
    pub(crate) fn new(len: usize) -> HostBuf {
        HostBuf(vec![0u8; len + 4096])
    }
    fn start(&self) -> usize {
        self.0.as_ptr().align_offset(4096)
    }
    /// The aligned first `len` bytes.
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        let a = self.start();
        &self.0[a..a + len]
    }
    /// The aligned first `len` bytes, writable.
    pub(crate) fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        let a = self.start();
        &mut self.0[a..a + len]
    }
    /// The aligned view for one io_uring operation.
    pub(crate) fn raw(&mut self, len: usize) -> RawBuf {
        let ptr = self.bytes_mut(len).as_mut_ptr();
        // SAFETY: see `io_view`; the engines hold bounce and read-back buffers like slots.
        unsafe { RawBuf::new(ptr, len) }
    }
}

/// Reads `len` bytes of a slot that no device is writing right now (checksums, bounce copies).
///
/// # Safety
/// `ptr..ptr+len` is a live slot whose DMA completed and which nothing writes until the
/// returned slice is dropped.
pub(crate) unsafe fn slot_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}
