//! The pool's counters and the per-thread shards they (and the free lists) are striped by:
//! a thread claims an exclusive shard while it lives, so its counter bumps need no atomic
//! read-modify-write and no two threads share a cache line.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam::utils::CachePadded;

/// Pool counters. The per-operation counts are striped per shard so threads do not
/// contend on one cache line; `held`/`peak` change only on the slow path.
#[derive(Default)]
pub(super) struct Counters {
    /// Bytes out of the chunks' buddies (in use + cached free blocks).
    pub(super) held: AtomicU64,
    pub(super) peak: AtomicU64,
    pub(super) ops: [CachePadded<OpCounts>; SHARDS],
    pub(super) failures: AtomicU64,
    pub(super) fallbacks: AtomicU64,
    pub(super) chunks: AtomicU64,
    pub(super) p2p_mapped: AtomicU64,
    pub(super) host_mapped: AtomicU64,
}

pub(super) struct OpCounts {
    /// Allocations and frees per buddy order (one counter bump per operation; bytes follow
    /// from the order).
    pub(super) allocs: [AtomicU64; ORDERS],
    pub(super) frees: [AtomicU64; ORDERS],
}

/// Orders counted per stripe (blocks up to 2^47 bytes).
pub(super) const ORDERS: usize = 48;

impl Default for OpCounts {
    fn default() -> Self {
        OpCounts {
            allocs: std::array::from_fn(|_| AtomicU64::new(0)),
            frees: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl OpCounts {
    pub(super) fn sum(v: &[AtomicU64; ORDERS]) -> (u64, u64) {
        v.iter().enumerate().fold((0, 0), |(n, b), (o, c)| {
            let k = c.load(Ordering::Relaxed);
            (n + k, b.wrapping_add(k << o))
        })
    }
}

impl Counters {
    /// Bytes moved out of (`+`) or back into (`-`) the buddies.
    pub(super) fn held_add(&self, bytes: u64) {
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(super) fn held_sub(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Number of shards (free-list sets and counter stripes). Shards 0..SHARDS-1 are claimed
/// exclusively by one thread at a time; threads beyond that share the last one.
pub(super) const SHARDS: usize = 9;
pub(super) const SHARED_SHARD: usize = SHARDS - 1;

/// Which shard the calling thread uses, and whether it owns it alone.
#[derive(Clone, Copy)]
pub(super) struct ShardRef {
    pub(super) index: usize,
    pub(super) exclusive: bool,
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
pub(super) fn shard_ref() -> ShardRef {
    thread_local!(static CLAIM: ShardClaim = ShardClaim::claim());
    CLAIM.try_with(|c| c.0).unwrap_or(ShardRef {
        index: SHARED_SHARD,
        exclusive: false,
    })
}

/// Bumps a per-shard counter: a plain load/store when this thread owns the shard (it is
/// the only writer), an atomic add otherwise.
pub(super) fn bump(counter: &AtomicU64, shard: ShardRef) {
    if shard.exclusive {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    } else {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
