//! Buffer pools: large chunks mapped once (p2pmem or host memory) and sub-allocated by a
//! buddy allocator per chunk, with lock-free per-size-class free lists in front so the common
//! allocate/free path takes no lock at all. Threads use separate shards (free lists and
//! counters) so they do not contend on shared cache lines.
//!
//! Chunks are the unit of registration: the pool calls a hook for every new chunk (e.g. to
//! register it once as an RDMA MR) and lists its chunks; a [`Buffer`] names its chunk.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam::queue::ArrayQueue;
use crossbeam::utils::CachePadded;

use crate::buddy::{Buddy, MIN_ORDER};
use crate::error::{Errno, Error, Result};
use crate::mapping::{Backing, Mapping};
use crate::provider::{Interface, Provider};

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
/// (with [`Placement::P2pPreferred`] the pool falls back to host memory).
pub type ChunkHook = Arc<dyn Fn(&ChunkInfo) -> std::result::Result<(), String> + Send + Sync>;

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

/// Pool counters. The per-operation counts are striped per shard so threads do not
/// contend on one cache line; `held`/`peak` change only on the slow path.
#[derive(Default)]
struct Counters {
    /// Bytes out of the chunks' buddies (in use + cached free blocks).
    held: AtomicU64,
    peak: AtomicU64,
    ops: [CachePadded<OpCounts>; SHARDS],
    failures: AtomicU64,
    fallbacks: AtomicU64,
    chunks: AtomicU64,
    p2p_mapped: AtomicU64,
    host_mapped: AtomicU64,
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
        f: impl Fn(&ChunkInfo) -> std::result::Result<(), String> + Send + Sync + 'static,
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

/// How long an arena whose source ran out waits before trying to map again.
const RETRY_AFTER_ENOMEM: Duration = Duration::from_millis(100);

const P2P: usize = 0;
const HOST: usize = 1;

struct OpCounts {
    /// Allocations and frees per buddy order (one counter bump per operation; bytes follow
    /// from the order).
    allocs: [AtomicU64; ORDERS],
    frees: [AtomicU64; ORDERS],
}

/// Orders counted per stripe (blocks up to 2^47 bytes).
const ORDERS: usize = 48;

impl Default for OpCounts {
    fn default() -> Self {
        OpCounts {
            allocs: std::array::from_fn(|_| AtomicU64::new(0)),
            frees: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl OpCounts {
    fn sum(v: &[AtomicU64; ORDERS]) -> (u64, u64) {
        v.iter().enumerate().fold((0, 0), |(n, b), (o, c)| {
            let k = c.load(Ordering::Relaxed);
            (n + k, b.wrapping_add(k << o))
        })
    }
}

impl Counters {
    /// Bytes moved out of (`+`) or back into (`-`) the buddies.
    fn held_add(&self, bytes: u64) {
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn held_sub(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Number of shards (free-list sets and counter stripes). Shards 0..SHARDS-1 are claimed
/// exclusively by one thread at a time; threads beyond that share the last one.
const SHARDS: usize = 9;
const SHARED_SHARD: usize = SHARDS - 1;

/// Which shard the calling thread uses, and whether it owns it alone.
#[derive(Clone, Copy)]
struct ShardRef {
    index: usize,
    exclusive: bool,
}

/// A thread's claim on an exclusive shard, released when the thread exits.
struct ShardClaim(ShardRef);

/// Bit i set: exclusive shard i is owned by a live thread.
static SHARD_CLAIMS: AtomicU32 = AtomicU32::new(0);

impl ShardClaim {
    fn claim() -> ShardClaim {
        let mut cur = SHARD_CLAIMS.load(Ordering::Relaxed);
        loop {
            let free = (!cur).trailing_zeros() as usize;
            if free >= SHARED_SHARD {
                return ShardClaim(ShardRef {
                    index: SHARED_SHARD,
                    exclusive: false,
                });
            }
            // Acquire: see the previous owner's counter writes before writing our own.
            match SHARD_CLAIMS.compare_exchange_weak(
                cur,
                cur | (1 << free),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return ShardClaim(ShardRef {
                        index: free,
                        exclusive: true,
                    })
                }
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for ShardClaim {
    fn drop(&mut self) {
        if self.0.exclusive {
            // Release: our counter writes happen before the next owner's.
            SHARD_CLAIMS.fetch_and(!(1 << self.0.index), Ordering::Release);
        }
    }
}

/// The calling thread's shard (the shared one while the thread is being torn down).
fn shard_ref() -> ShardRef {
    thread_local!(static CLAIM: ShardClaim = ShardClaim::claim());
    CLAIM.try_with(|c| c.0).unwrap_or(ShardRef {
        index: SHARED_SHARD,
        exclusive: false,
    })
}

/// Bumps a per-shard counter: a plain load/store when this thread owns the shard (it is
/// the only writer), an atomic add otherwise.
fn bump(counter: &AtomicU64, shard: ShardRef) {
    if shard.exclusive {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    } else {
        counter.fetch_add(1, Ordering::Relaxed);
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

enum Source {
    P2p {
        provider: Provider,
        iface: Interface,
    },
    Host {
        numa_node: Option<u32>,
    },
}

struct Chunk {
    id: u32,
    map: Mapping,
    buddy: Mutex<Buddy>,
}

impl Chunk {
    fn info(&self) -> ChunkInfo {
        ChunkInfo {
            id: self.id,
            addr: self.map.addr() as usize,
            len: self.map.len(),
            backing: self.map.backing().clone(),
        }
    }

    fn arena(&self) -> usize {
        if self.map.backing().is_p2p() {
            P2P
        } else {
            HOST
        }
    }
}

/// A free block: which chunk, where.
struct Block {
    chunk: Arc<Chunk>,
    offset: usize,
}

/// The chunks of one memory kind, with per-size-class caches of free blocks.
struct Arena {
    source: Source,
    max_order: u32,
    max_chunks: usize,
    chunks: RwLock<Vec<Arc<Chunk>>>,
    /// Serialises mapping new chunks (rare).
    grow: Mutex<()>,
    /// Set once the source failed for good (cannot open/map it, hook refused a chunk):
    /// stop asking, and report `closed_reason`.
    closed: AtomicBool,
    closed_reason: Mutex<Option<Error>>,
    /// After the source ran out (ENOMEM), do not try to map again before this instant
    /// (someone else may free provider memory; retrying on every allocation would cost a
    /// failing mmap each time).
    retry_after: Mutex<Option<Instant>>,
    /// Lock-free free lists per shard (threads spread over shards so they do not contend
    /// on one queue head), one list per order MIN_ORDER..=max_order.
    shards: Box<[CachePadded<Vec<ArrayQueue<Block>>>]>,
}

impl Arena {
    fn new(source: Source, max_order: u32, max_bytes: Option<u64>) -> Arena {
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
    fn cache(&self, shard: ShardRef, order: u32) -> &ArrayQueue<Block> {
        &self.shards[shard.index][(order - MIN_ORDER) as usize]
    }

    fn alloc(&self, shard: ShardRef, order: u32, pool: &PoolInner) -> Result<Block> {
        // Fast path: a cached block of exactly this size, no lock.
        if let Some(b) = self.cache(shard, order).pop() {
            return Ok(b);
        }
        let b = self.alloc_slow(order, pool)?;
        pool.counters.held_add(1 << order);
        Ok(b)
    }

    /// From the buddies, mapping a new chunk if needed.
    fn alloc_slow(&self, order: u32, pool: &PoolInner) -> Result<Block> {
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

    fn take_from_chunks(&self, order: u32) -> Option<Block> {
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
    fn grow(&self, order: u32, pool: &PoolInner) -> Result<Option<Block>> {
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
            if let Err(reason) = hook(&chunk.info()) {
                let e = Error::HookFailed {
                    chunk: chunk.id,
                    reason,
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

    fn close(&self, why: Error) {
        self.closed.store(true, Ordering::Release);
        *self.closed_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Returns every cached block to its chunk's buddy so free neighbours merge.
    fn flush_caches(&self, counters: &Counters) {
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

    fn pool_free(&self) -> u64 {
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

    fn exhausted(&self, order: u32) -> Error {
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

    fn free(&self, shard: ShardRef, block: Block, order: u32, counters: &Counters) {
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
fn order_for(len: usize, align: usize, chunk: usize) -> Result<u32> {
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

/// A buffer from a [`Pool`]; returns to the pool on drop. The memory stays valid while
/// the handle lives (its chunk is unmapped only after every buffer and the pool are gone).
pub struct Buffer {
    shard: Arc<CachePadded<ShardHandle>>,
    /// Moved back into the pool's free lists on drop (hence `ManuallyDrop`).
    chunk: ManuallyDrop<Arc<Chunk>>,
    offset: usize,
    order: u8,
    len: usize,
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
