//! Buffer pools: large chunks mapped once (p2pmem or host memory) and sub-allocated by a
//! buddy allocator per chunk, with lock-free per-size-class free lists in front so the common
//! allocate/free path takes no lock at all. Threads use separate shards (free lists and
//! counters) so they do not contend on shared cache lines.
//!
//! Chunks are the unit of registration: the pool calls a hook for every new chunk (e.g. to
//! register it once as an RDMA MR) and lists its chunks; a [`Buffer`] names its chunk.
//!
//! Here: the policy ([`Placement`]), the builder and the [`Pool`]; `arena`: the chunks of one
//! memory kind and their free lists; `counters`: statistics and per-thread shards;
//! `buffer`: the [`Buffer`] handle.

mod arena;
mod buffer;
mod counters;

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam::utils::CachePadded;

use crate::buddy::MIN_ORDER;
use crate::error::{Error, Result};
use crate::mapping::Backing;
use crate::provider::{Interface, Provider};
use arena::{order_for, Arena, Block, Source, HOST, P2P};
pub use buffer::Buffer;
use counters::{bump, shard_ref, Counters, OpCounts, ShardRef, SHARDS};

/// Where buffers may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Only p2pmem; exhaustion is an [`Error::OutOfMemory`].
    P2pRequired,
    /// p2pmem, falling back to host memory when it runs out (counted in
    /// [`PoolStats::fallbacks`]).
    P2pPreferred,
    /// Only host memory.
    HostOnly,
}

/// A chunk as seen by registration code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Unique within the pool.
    pub id: u32,
    /// Virtual start address.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
    /// Where its memory comes from.
    pub backing: Backing,
}

/// Called once per new chunk before any buffer in it is handed out. Returning `Err`
/// refuses the chunk: it is unmapped and this memory kind is not used again by the pool
/// (with [`Placement::P2pPreferred`] the pool falls back to host memory), and the error is
/// the source of the pool's [`Error::HookFailed`].
pub type ChunkHook = Arc<dyn Fn(&ChunkInfo) -> std::result::Result<(), HookError> + Send + Sync>;

/// Why a [`ChunkHook`] refused a chunk: any error (e.g. the RDMA layer's registration error),
/// boxed; a `&str` or `String` converts with `.into()`.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Counters of one pool (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes in live buffers (rounded up to their block size).
    pub bytes_in_use: u64,
    /// High-water mark of bytes taken out of the chunks: buffers in use plus free blocks
    /// parked in the lock-free free lists. At least the peak of `bytes_in_use` (exact when
    /// the free lists are empty; the fast path does not touch a shared counter, so the
    /// exact peak of `bytes_in_use` is not tracked).
    pub peak_bytes: u64,
    /// Successful allocations.
    pub allocations: u64,
    /// Buffers returned.
    pub frees: u64,
    /// Allocations that failed.
    pub failures: u64,
    /// Allocations served from host memory because p2pmem was exhausted or refused.
    pub fallbacks: u64,
    /// Chunks mapped (p2pmem and host).
    pub chunks: u64,
    /// Bytes mapped from the provider.
    pub p2p_bytes_mapped: u64,
    /// Bytes of host memory mapped.
    pub host_bytes_mapped: u64,
}

/// Configures and builds a [`Pool`].
pub struct PoolBuilder {
    placement: Placement,
    provider: Option<Provider>,
    interface: Option<Interface>,
    chunk_size: usize,
    max_p2p_bytes: Option<u64>,
    max_host_bytes: Option<u64>,
    numa_node: Option<u32>,
    hook: Option<ChunkHook>,
}

impl PoolBuilder {
    /// The p2pmem provider (required unless [`Placement::HostOnly`]).
    pub fn provider(mut self, p: Provider) -> Self {
        self.provider = Some(p);
        self
    }

    /// Which provider interface to map (default: [`Provider::default_interface`]).
    pub fn interface(mut self, i: Interface) -> Self {
        self.interface = Some(i);
        self
    }

    /// Chunk size: a power of two >= 4 KiB (default 4 MiB). Also the largest buffer.
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// Cap on p2pmem mapped by this pool (default: as much as the provider gives).
    pub fn max_p2p_bytes(mut self, bytes: u64) -> Self {
        self.max_p2p_bytes = Some(bytes);
        self
    }

    /// Cap on host memory mapped by this pool (default: unlimited).
    pub fn max_host_bytes(mut self, bytes: u64) -> Self {
        self.max_host_bytes = Some(bytes);
        self
    }

    /// NUMA node for host memory (default: the provider's node). Use the node of the
    /// clients (NVMe, NIC) that DMA into the buffers.
    pub fn numa_node(mut self, node: u32) -> Self {
        self.numa_node = Some(node);
        self
    }

    /// A hook called for each new chunk (see [`ChunkHook`]).
    pub fn on_new_chunk(
        mut self,
        f: impl Fn(&ChunkInfo) -> std::result::Result<(), HookError> + Send + Sync + 'static,
    ) -> Self {
        self.hook = Some(Arc::new(f));
        self
    }

    /// Builds the pool. No memory is mapped until the first allocation.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a chunk size that is not a power of two >= 4 KiB, a p2pmem
    /// placement without a provider, or an interface the provider does not offer.
    pub fn build(self) -> Result<Pool> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || cs < (1 << MIN_ORDER) {
            return Err(Error::Invalid(format!(
                "chunk size {cs} must be a power of two >= 4096"
            )));
        }
        let max_order = cs.trailing_zeros();
        let p2p = match self.placement {
            Placement::HostOnly => None,
            _ => {
                let provider = self.provider.clone().ok_or_else(|| {
                    Error::Invalid(format!(
                        "placement {:?} needs a p2pmem provider (PoolBuilder::provider)",
                        self.placement
                    ))
                })?;
                let iface = match self.interface {
                    Some(i) => i,
                    None => provider.default_interface().ok_or_else(|| {
                        Error::Invalid(format!("provider {} has no interface", provider.pci))
                    })?,
                };
                provider.map_path(iface)?;
                Some(Arena::new(
                    Source::P2p { provider, iface },
                    max_order,
                    self.max_p2p_bytes,
                ))
            }
        };
        let host = match self.placement {
            Placement::P2pRequired => None,
            _ => Some(Arena::new(
                Source::Host {
                    numa_node: self
                        .numa_node
                        .or(self.provider.as_ref().and_then(|p| p.numa_node)),
                },
                max_order,
                self.max_host_bytes,
            )),
        };
        let inner = Arc::new(PoolInner {
            placement: self.placement,
            chunk_size: cs,
            arenas: [p2p, host],
            counters: Counters::default(),
            next_chunk: AtomicU32::new(0),
            hook: self.hook,
        });
        let handles = (0..SHARDS)
            .map(|_| {
                Arc::new(CachePadded::new(ShardHandle {
                    pool: inner.clone(),
                }))
            })
            .collect();
        Ok(Pool { inner, handles })
    }
}

/// A thread-safe buffer pool. Cheap to clone (shared).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
    /// One keep-alive handle per shard: a buffer holds its shard's handle, so threads
    /// on different shards never bump the same reference count.
    handles: Arc<[Arc<CachePadded<ShardHandle>>]>,
}

/// Keeps the pool alive for the buffers of one shard.
struct ShardHandle {
    pool: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("placement", &self.inner.placement)
            .field("chunk_size", &self.inner.chunk_size)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    /// Starts configuring a pool with the given placement policy.
    pub fn builder(placement: Placement) -> PoolBuilder {
        PoolBuilder {
            placement,
            provider: None,
            interface: None,
            chunk_size: 4 << 20,
            max_p2p_bytes: None,
            max_host_bytes: None,
            numa_node: None,
            hook: None,
        }
    }

    /// Allocates a buffer of `len` bytes aligned to 4 KiB.
    ///
    /// # Errors
    /// As [`Pool::alloc_aligned`].
    pub fn alloc(&self, len: usize) -> Result<Buffer> {
        self.alloc_aligned(len, 1 << MIN_ORDER)
    }

    /// Allocates a buffer of `len` bytes whose address is a multiple of `align` (a power of
    /// two; at most the chunk size). Blocks are powers of two, so `len` is rounded up.
    ///
    /// # Errors
    /// - [`Error::Invalid`]: `len` is 0 or larger than the chunk size, or a bad `align`.
    /// - [`Error::OutOfMemory`] (p2pmem required): the provider has no room for another
    ///   chunk and the pool's chunks have no free block of this size.
    /// - [`Error::HostOutOfMemory`]: host memory could not be mapped, or the pool's
    ///   `max_host_bytes` is reached (errno ENOMEM).
    /// - [`Error::HookFailed`]: the new-chunk hook refused the chunk (p2pmem required).
    pub fn alloc_aligned(&self, len: usize, align: usize) -> Result<Buffer> {
        let inner = &self.inner;
        let order = match order_for(len, align, inner.chunk_size) {
            Ok(o) => o,
            Err(e) => {
                inner.counters.failures.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let shard = shard_ref();
        let mut p2p_err = None;
        if let Some(a) = &inner.arenas[P2P] {
            match a.alloc(shard, order, inner) {
                Ok(b) => return Ok(self.hand_out(shard, b, order, len)),
                Err(e) => p2p_err = Some(e),
            }
        }
        let Some(host) = &inner.arenas[HOST] else {
            inner.counters.failures.fetch_add(1, Ordering::Relaxed);
            return Err(p2p_err.unwrap_or_else(|| Error::Invalid("pool has no memory".into())));
        };
        match host.alloc(shard, order, inner) {
            Ok(b) => {
                if let Some(e) = p2p_err {
                    inner.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, len, "p2pmem allocation fell back to host memory");
                }
                Ok(self.hand_out(shard, b, order, len))
            }
            Err(e) => {
                inner.counters.failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn hand_out(&self, shard: ShardRef, block: Block, order: u32, len: usize) -> Buffer {
        let c = &self.inner.counters;
        bump(&c.ops[shard.index].allocs[order as usize], shard);
        Buffer {
            shard: self.handles[shard.index].clone(),
            chunk: ManuallyDrop::new(block.chunk),
            offset: block.offset,
            order: order as u8,
            len,
        }
    }

    /// The chunks mapped so far (p2pmem first), for registration.
    pub fn chunks(&self) -> Vec<ChunkInfo> {
        self.inner
            .arenas
            .iter()
            .flatten()
            .flat_map(|a| {
                a.chunks
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|c| c.info())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (mut allocations, mut alloc_bytes, mut frees, mut free_bytes) = (0, 0u64, 0, 0u64);
        for o in &c.ops {
            let (n, b) = OpCounts::sum(&o.allocs);
            allocations += n;
            alloc_bytes = alloc_bytes.wrapping_add(b);
            let (n, b) = OpCounts::sum(&o.frees);
            frees += n;
            free_bytes = free_bytes.wrapping_add(b);
        }
        PoolStats {
            bytes_in_use: alloc_bytes.wrapping_sub(free_bytes),
            peak_bytes: l(&c.peak),
            allocations,
            frees,
            failures: l(&c.failures),
            fallbacks: l(&c.fallbacks),
            chunks: l(&c.chunks),
            p2p_bytes_mapped: l(&c.p2p_mapped),
            host_bytes_mapped: l(&c.host_mapped),
        }
    }

    /// Emits the counters as a `tracing` event (target `peerpipe_p2p_alloc::pool`).
    pub fn trace_stats(&self) {
        let s = self.stats();
        tracing::info!(
            bytes_in_use = s.bytes_in_use,
            peak_bytes = s.peak_bytes,
            allocations = s.allocations,
            frees = s.frees,
            failures = s.failures,
            fallbacks = s.fallbacks,
            chunks = s.chunks,
            p2p_bytes_mapped = s.p2p_bytes_mapped,
            host_bytes_mapped = s.host_bytes_mapped,
            "pool stats"
        );
    }

    /// The placement policy.
    pub fn placement(&self) -> Placement {
        self.inner.placement
    }

    /// The chunk size (also the largest buffer).
    pub fn chunk_size(&self) -> usize {
        self.inner.chunk_size
    }
}

struct PoolInner {
    placement: Placement,
    chunk_size: usize,
    /// [p2pmem, host]
    arenas: [Option<Arena>; 2],
    counters: Counters,
    next_chunk: AtomicU32,
    hook: Option<ChunkHook>,
}
