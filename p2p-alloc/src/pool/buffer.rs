//! [`Buffer`]: a handle on a block of a pool chunk, returned to the pool on drop.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use crossbeam::utils::CachePadded;

use super::arena::{Block, Chunk};
use super::counters::{bump, shard_ref};
use super::ShardHandle;
use crate::mapping::Backing;

/// A buffer from a [`Pool`](super::Pool); returns to the pool on drop. The memory stays
/// valid while the handle lives (its chunk is unmapped only after every buffer and the pool
/// are gone).
pub struct Buffer {
    pub(super) shard: Arc<CachePadded<ShardHandle>>,
    /// Moved back into the pool's free lists on drop (hence `ManuallyDrop`).
    pub(super) chunk: ManuallyDrop<Arc<Chunk>>,
    pub(super) offset: usize,
    pub(super) order: u8,
    pub(super) len: usize,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("addr", &self.addr())
            .field("len", &self.len)
            .field("chunk", &self.chunk.id)
            .field("offset", &self.offset)
            .field("backing", self.chunk.map.backing())
            .finish()
    }
}

impl Buffer {
    /// Start address (for DMA descriptors; keep the handle alive while a device uses it).
    pub fn addr(&self) -> *mut u8 {
        // The offset is within the chunk by construction.
        self.chunk.map.addr().wrapping_add(self.offset)
    }

    /// Requested length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the requested length is 0 (never: zero-length requests are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Usable length (the block size, >= `len`).
    pub fn capacity(&self) -> usize {
        1 << self.order
    }

    /// The chunk this buffer lives in (register chunks, not buffers).
    pub fn chunk_id(&self) -> u32 {
        self.chunk.id
    }

    /// Offset of the buffer inside its chunk.
    pub fn offset_in_chunk(&self) -> usize {
        self.offset
    }

    /// Where the memory comes from.
    pub fn backing(&self) -> &Backing {
        self.chunk.map.backing()
    }

    /// The provider's PCI address when this is p2pmem.
    pub fn provider(&self) -> Option<&str> {
        match self.chunk.map.backing() {
            Backing::P2p { provider, .. } => Some(provider),
            Backing::Host { .. } => None,
        }
    }

    /// CPU view of the `len` bytes. p2pmem is read over PCIe (slow, uncached).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: [addr, addr+len) lies in a live mapping (our chunk Arc keeps it), is
        // handed out to this handle only, and mutation needs `&mut self`.
        unsafe { std::slice::from_raw_parts(self.addr(), self.len) }
    }

    /// Mutable CPU view of the `len` bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.addr(), self.len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let order = u32::from(self.order);
        let pool = &self.shard.pool;
        let c = &pool.counters;
        let shard = shard_ref();
        bump(&c.ops[shard.index].frees[order as usize], shard);
        // SAFETY: `chunk` is taken exactly once, here, and never used afterwards.
        let chunk = unsafe { ManuallyDrop::take(&mut self.chunk) };
        if let Some(arena) = &pool.arenas[chunk.arena()] {
            arena.free(
                shard,
                Block {
                    chunk,
                    offset: self.offset,
                },
                order,
                c,
            );
        }
    }
}
