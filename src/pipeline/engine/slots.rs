//! Block buffers: one p2p-alloc pool sized for the window, whose chunks are registered once
//! as RDMA memory regions per connection, and [`DriveBuf`], the owned buffer a drive
//! operation holds while it is in flight.
//!
//! Ownership rule: a drive read or write *moves* its buffer (a slot's pool buffer, or a host
//! bounce / read-back buffer) into the io_uring ring, which hands it back only with the
//! completion. No return path of an engine can free memory the kernel may still write: a
//! buffer in flight is owned by the ring, whose drop waits for (or, failing that, leaks) what
//! is in flight. RDMA access to slots goes through the pool chunks' memory regions, which live
//! as long as the pool's chunks, and is ordered by the cores (a slot is advertised or written
//! only when no drive operation holds it).

use std::collections::HashMap;
use std::fmt;

use crate::p2p_alloc::{self as alloc, AlignedBuf, Placement, Pool};
use crate::rdma::{Access, MemoryKind, MemoryRegion, ProtectionDomain};
use crate::uring::IoBuf;

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

/// Where a slot's memory is, kept while its buffer is lent to a drive operation.
struct SlotMeta {
    len: usize,
    chunk_id: u32,
    offset_in_chunk: usize,
}

/// `n` block buffers from one pool. A slot's buffer is `None` while a drive operation owns it.
pub(crate) struct Slots {
    // Buffers before the pool: they return their space to it when dropped.
    bufs: Vec<Option<alloc::Buffer>>,
    meta: Vec<SlotMeta>,
    pool: Pool,
    pub(crate) info: BufferInfo,
}

/// The memory of a [`DriveBuf`]: both kinds are p2p-alloc buffers, and both are [`IoBuf`]s.
enum Mem {
    Slot(alloc::Buffer),
    Host(AlignedBuf),
}

impl Mem {
    fn io(&self) -> &dyn IoBuf {
        match self {
            Mem::Slot(b) => b,
            Mem::Host(b) => b,
        }
    }
    fn io_mut(&mut self) -> &mut dyn IoBuf {
        match self {
            Mem::Slot(b) => b,
            Mem::Host(b) => b,
        }
    }
}

/// A buffer a drive operation owns while in flight: the first `len` bytes of a slot's pool
/// buffer, or of a host buffer (bounce copies, read-backs). The ring gives it back with the
/// completion; then [`Slots::give_back`] returns a slot buffer to its slot and a host buffer to
/// the caller.
pub(crate) struct DriveBuf {
    mem: Mem,
    len: usize,
    slot: usize,
}

impl DriveBuf {
    /// The first `len` bytes of `buf`, on behalf of slot `slot` (a bounce or read-back buffer).
    pub(crate) fn host(slot: usize, buf: AlignedBuf, len: usize) -> DriveBuf {
        assert!(len <= buf.len(), "a block fits its host buffer");
        DriveBuf {
            mem: Mem::Host(buf),
            len,
            slot,
        }
    }
    /// The slot this buffer serves.
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }
    /// The bytes (the operation that owned the buffer has completed: the ring gave it back).
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.mem {
            Mem::Slot(b) => &b.as_slice()[..self.len],
            Mem::Host(b) => &b[..self.len],
        }
    }
}

// SAFETY: the first `len` bytes of an IoBuf (both kinds are, see uring's impls) that the value
// owns: `len` never exceeds the inner buffer (checked at construction), and its memory does not
// move when the value moves; as_ptr and as_mut_ptr are the inner buffer's (the same address).
unsafe impl IoBuf for DriveBuf {
    fn as_ptr(&self) -> *const u8 {
        self.mem.io().as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.mem.io_mut().as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
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
                "asked for".to_string(),
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
        let mut meta = Vec::with_capacity(n);
        for _ in 0..n {
            let b = pool.alloc(block).map_err(|source| EngineError::Buffers {
                what: format!("allocating {n} x {block} B {want} buffers"),
                source,
            })?;
            meta.push(SlotMeta {
                len: b.len(),
                chunk_id: b.chunk_id(),
                offset_in_chunk: b.offset_in_chunk(),
            });
            bufs.push(Some(b));
        }
        Ok(Slots {
            bufs,
            meta,
            pool,
            info: BufferInfo { kind: want, reason },
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.bufs.len()
    }

    /// The pool chunk slot `i` lies in (its memory region) and its offset there.
    pub(crate) fn chunk_of(&self, i: usize) -> (u32, usize) {
        (self.meta[i].chunk_id, self.meta[i].offset_in_chunk)
    }

    /// Lends the first `len` bytes of slot `i`'s buffer to one drive operation.
    ///
    /// # Errors
    /// [`EngineError::Internal`] when the slot is already lent (a bookkeeping bug: refused
    /// rather than letting two operations share memory) or `len` exceeds the slot.
    pub(crate) fn take(&mut self, i: usize, len: usize) -> Result<DriveBuf, EngineError> {
        if len > self.meta[i].len {
            return Err(EngineError::Internal("a block larger than its slot"));
        }
        let b = self.bufs[i]
            .take()
            .ok_or(EngineError::Internal("a slot lent to two drive operations"))?;
        Ok(DriveBuf {
            mem: Mem::Slot(b),
            len,
            slot: i,
        })
    }

    /// The first `len` bytes of slot `i` (while no drive operation holds it).
    ///
    /// # Errors
    /// [`EngineError::Internal`] when the slot is lent to a drive operation.
    pub(crate) fn bytes(&self, i: usize, len: usize) -> Result<&[u8], EngineError> {
        match &self.bufs[i] {
            Some(b) if len <= b.len() => Ok(&b.as_slice()[..len]),
            Some(_) => Err(EngineError::Internal("a block larger than its slot")),
            None => Err(EngineError::Internal(
                "a slot read while a drive operation holds it",
            )),
        }
    }

    /// The first `len` bytes of slot `i`, writable (while no drive operation holds it).
    ///
    /// # Errors
    /// As [`Slots::bytes`].
    pub(crate) fn bytes_mut(&mut self, i: usize, len: usize) -> Result<&mut [u8], EngineError> {
        match &mut self.bufs[i] {
            Some(b) if len <= b.len() => Ok(&mut b.as_mut_slice()[..len]),
            Some(_) => Err(EngineError::Internal("a block larger than its slot")),
            None => Err(EngineError::Internal(
                "a slot written while a drive operation holds it",
            )),
        }
    }

    /// Returns a completed operation's buffer: a slot buffer to its slot; a host buffer is
    /// handed back to the caller.
    pub(crate) fn give_back(&mut self, b: DriveBuf) -> Option<AlignedBuf> {
        match b.mem {
            Mem::Slot(buf) => {
                self.bufs[b.slot] = Some(buf);
                None
            }
            Mem::Host(h) => Some(h),
        }
    }

    /// The address a peer names slot `i` by when the chunks are registered with
    /// `offsets` (see [`Slots::register`]).
    pub(crate) fn remote_addr(&self, i: usize) -> u64 {
        chunk_iova(self.meta[i].chunk_id) + self.meta[i].offset_in_chunk as u64
    }

    /// Registers every chunk of the pool once with `pd`; returns chunk id -> region. With
    /// `offsets`, peers name each chunk by an offset-based address ([`chunk_iova`]) instead of
    /// its virtual address, so what a replica advertises reveals nothing of its address
    /// layout.
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
        offsets: bool,
    ) -> Result<HashMap<u32, MemoryRegion>, EngineError> {
        let kind = match self.info.kind {
            BufferChoice::P2p => MemoryKind::Peer,
            BufferChoice::Host => MemoryKind::Host,
        };
        let mut out = HashMap::new();
        for c in self.pool.chunks() {
            // SAFETY: the chunk stays mapped while the pool lives; the caller drops the region
            // before the slots (this function's contract).
            let ptr = c.addr as *mut u8;
            let mr = unsafe {
                if offsets {
                    MemoryRegion::register_raw_iova(pd, ptr, c.len, chunk_iova(c.id), access, kind)
                } else {
                    MemoryRegion::register_raw(pd, ptr, c.len, access, kind)
                }
            }
            .map_err(|e| {
                EngineError::rdma(format!("registering {} chunk {}", self.info.kind, c.id), e)
            })?;
            out.insert(c.id, mr);
        }
        Ok(out)
    }
}

/// The offset-based address of pool chunk `id`: chunk `id` starts at `(id + 1) << 32` (a chunk
/// is at most 64 MiB; the `+ 1` keeps 0 unused).
pub(crate) fn chunk_iova(id: u32) -> u64 {
    (u64::from(id) + 1) << 32
}
