//! The chunks of one memory kind (p2pmem or host): mapping them, the buddy allocator inside
//! each, and the lock-free per-shard free lists in front.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;
use crossbeam::utils::CachePadded;

use super::counters::{Counters, ShardRef, SHARDS};
use super::{ChunkInfo, PoolInner};
use crate::buddy::{Buddy, MIN_ORDER};
use crate::error::{Errno, Error, Result};
use crate::mapping::Mapping;
use crate::provider::{Interface, Provider};

/// How long an arena whose source ran out waits before trying to map again.
pub(super) const RETRY_AFTER_ENOMEM: Duration = Duration::from_millis(100);

pub(super) const P2P: usize = 0;
pub(super) const HOST: usize = 1;

pub(super) enum Source {
    P2p {
        provider: Provider,
        iface: Interface,
    },
    Host {
        numa_node: Option<u32>,
    },
}

pub(super) struct Chunk {
    pub(super) id: u32,
    pub(super) map: Mapping,
    pub(super) buddy: Mutex<Buddy>,
}

impl Chunk {
    pub(super) fn info(&self) -> ChunkInfo {
        ChunkInfo {
            id: self.id,
            addr: self.map.addr() as usize,
            len: self.map.len(),
            backing: self.map.backing().clone(),
        }
    }

    pub(super) fn arena(&self) -> usize {
        if self.map.backing().is_p2p() {
            P2P
        } else {
            HOST
        }
    }
}

/// A free block: which chunk, where.
pub(super) struct Block {
    pub(super) chunk: Arc<Chunk>,
    pub(super) offset: usize,
}

/// The chunks of one memory kind, with per-size-class caches of free blocks.
pub(super) struct Arena {
    pub(super) source: Source,
    pub(super) max_order: u32,
    pub(super) max_chunks: usize,
    pub(super) chunks: RwLock<Vec<Arc<Chunk>>>,
    /// Serialises mapping new chunks (rare).
    pub(super) grow: Mutex<()>,
    /// Set once the source failed for good (cannot open/map it, hook refused a chunk):
    /// stop asking, and report `closed_reason`.
    pub(super) closed: AtomicBool,
    pub(super) closed_reason: Mutex<Option<Error>>,
    /// After the source ran out (ENOMEM), do not try to map again before this instant
    /// (someone else may free provider memory; retrying on every allocation would cost a
    /// failing mmap each time).
    pub(super) retry_after: Mutex<Option<Instant>>,
    /// Lock-free free lists per shard (threads spread over shards so they do not contend
    /// on one queue head), one list per order MIN_ORDER..=max_order.
    pub(super) shards: Box<[CachePadded<Vec<ArrayQueue<Block>>>]>,
}

impl Arena {
    pub(super) fn new(source: Source, max_order: u32, max_bytes: Option<u64>) -> Arena {
        let chunk = 1u64 << max_order;
        let shards = (0..SHARDS)
            .map(|_| {
                CachePadded::new(
                    (MIN_ORDER..=max_order)
                        .map(|o| {
                            // Up to one chunk's worth per class and shard, 4..=128 blocks.
                            let n = (chunk >> o).clamp(4, 128) as usize;
                            ArrayQueue::new(n)
                        })
                        .collect(),
                )
            })
            .collect();
        Arena {
            source,
            max_order,
            max_chunks: max_bytes.map_or(usize::MAX, |b| (b / chunk) as usize),
            chunks: RwLock::new(Vec::new()),
            grow: Mutex::new(()),
            closed: AtomicBool::new(false),
            closed_reason: Mutex::new(None),
            retry_after: Mutex::new(None),
            shards,
        }
    }

    /// The free list for `order` of `shard`.
    pub(super) fn cache(&self, shard: ShardRef, order: u32) -> &ArrayQueue<Block> {
        &self.shards[shard.index][(order - MIN_ORDER) as usize]
    }

    pub(super) fn alloc(&self, shard: ShardRef, order: u32, pool: &PoolInner) -> Result<Block> {
        // Fast path: a cached block of exactly this size, no lock.
        if let Some(b) = self.cache(shard, order).pop() {
            return Ok(b);
        }
        let b = self.alloc_slow(order, pool)?;
        pool.counters.held_add(1 << order);
        Ok(b)
    }

    /// From the buddies, mapping a new chunk if needed.
    pub(super) fn alloc_slow(&self, order: u32, pool: &PoolInner) -> Result<Block> {
        if let Some(b) = self.take_from_chunks(order) {
            return Ok(b);
        }
        if let Some(b) = self.grow(order, pool)? {
            return Ok(b);
        }
        // Cached blocks of other sizes may merge into one that fits.
        self.flush_caches(&pool.counters);
        if let Some(b) = self.take_from_chunks(order) {
            return Ok(b);
        }
        Err(self.exhausted(order))
    }

    pub(super) fn take_from_chunks(&self, order: u32) -> Option<Block> {
        let chunks = self.chunks.read().unwrap_or_else(|p| p.into_inner());
        chunks.iter().find_map(|c| {
            let off = c
                .buddy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .alloc(order)?;
            Some(Block {
                chunk: c.clone(),
                offset: off,
            })
        })
    }

    /// Maps one more chunk and allocates from it; `Ok(None)` when no more chunks may be
    /// mapped (limit reached or the source refused before).
    pub(super) fn grow(&self, order: u32, pool: &PoolInner) -> Result<Option<Block>> {
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        // Another thread may have grown meanwhile.
        if let Some(b) = self.take_from_chunks(order) {
            return Ok(Some(b));
        }
        if self.closed.load(Ordering::Acquire) {
            return Ok(None);
        }
        if self.chunks.read().unwrap_or_else(|p| p.into_inner()).len() >= self.max_chunks {
            return Ok(None);
        }
        let mut retry = self.retry_after.lock().unwrap_or_else(|p| p.into_inner());
        if retry.is_some_and(|t| Instant::now() < t) {
            return Ok(None);
        }
        let len = 1usize << self.max_order;
        let map = match &self.source {
            Source::P2p { provider, iface } => Mapping::p2p(provider, *iface, len, len),
            Source::Host { numa_node } => Mapping::host(len, len, *numa_node),
        };
        let map = match map {
            Ok(m) => m,
            // The provider (or the host) has no room: serve from what we have for now.
            Err(e) if e.errno() == Some(libc::ENOMEM) => {
                tracing::debug!(error = %e, "memory source exhausted");
                *retry = Some(Instant::now() + RETRY_AFTER_ENOMEM);
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "memory source unusable; not trying it again");
                self.close(e.duplicate());
                return Err(e);
            }
        };
        *retry = None;
        drop(retry);
        let chunk = Arc::new(Chunk {
            id: pool.next_chunk.fetch_add(1, Ordering::Relaxed),
            buddy: Mutex::new(Buddy::new(self.max_order)),
            map,
        });
        if let Some(hook) = &pool.hook {
            if let Err(source) = hook(&chunk.info()) {
                let e = Error::HookFailed {
                    chunk: chunk.id,
                    source: source.into(),
                };
                tracing::warn!(error = %e, "new-chunk hook refused a chunk");
                self.close(e.duplicate());
                return Err(e);
            }
        }
        let c = &pool.counters;
        c.chunks.fetch_add(1, Ordering::Relaxed);
        match chunk.arena() {
            P2P => c.p2p_mapped.fetch_add(len as u64, Ordering::Relaxed),
            _ => c.host_mapped.fetch_add(len as u64, Ordering::Relaxed),
        };
        tracing::debug!(chunk = chunk.id, len, backing = ?chunk.map.backing(), "mapped chunk");
        let off = chunk
            .buddy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc(order);
        self.chunks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(chunk.clone());
        Ok(off.map(|offset| Block { chunk, offset }))
    }

    pub(super) fn close(&self, why: Error) {
        self.closed.store(true, Ordering::Release);
        *self.closed_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Returns every cached block to its chunk's buddy so free neighbours merge.
    pub(super) fn flush_caches(&self, counters: &Counters) {
        for (i, q) in self.shards.iter().flat_map(|s| s.iter().enumerate()) {
            while let Some(b) = q.pop() {
                counters.held_sub(1 << (MIN_ORDER + i as u32));
                b.chunk
                    .buddy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .free(b.offset, MIN_ORDER + i as u32);
            }
        }
    }

    pub(super) fn pool_free(&self) -> u64 {
        self.chunks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| {
                c.buddy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .free_bytes() as u64
            })
            .sum()
    }

    pub(super) fn exhausted(&self, order: u32) -> Error {
        let requested = 1u64 << order;
        match &self.source {
            Source::P2p { provider, .. } => {
                let reason = self.closed_reason.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(e) = reason.as_ref() {
                    return e.duplicate();
                }
                Error::OutOfMemory {
                    provider: provider.pci.clone(),
                    requested,
                    available: provider.available().unwrap_or(0),
                    pool_free: self.pool_free(),
                }
            }
            Source::Host { .. } => Error::HostOutOfMemory {
                requested,
                errno: Errno(libc::ENOMEM),
            },
        }
    }

    pub(super) fn free(&self, shard: ShardRef, block: Block, order: u32, counters: &Counters) {
        if let Err(b) = self.cache(shard, order).push(block) {
            counters.held_sub(1 << order);
            b.chunk
                .buddy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free(b.offset, order);
        }
    }
}

/// The buddy order for a request.
pub(super) fn order_for(len: usize, align: usize, chunk: usize) -> Result<u32> {
    if len == 0 {
        return Err(Error::Invalid("buffer length 0".into()));
    }
    if !align.is_power_of_two() || align > chunk {
        return Err(Error::Invalid(format!(
            "alignment {align} must be a power of two <= the chunk size {chunk}"
        )));
    }
    if len > chunk {
        return Err(Error::Invalid(format!(
            "buffer of {len} bytes exceeds the pool's chunk size {chunk}; build the pool \
             with a larger chunk_size"
        )));
    }
    let size = len.max(align).next_power_of_two();
    Ok(size.trailing_zeros().max(MIN_ORDER))
}
