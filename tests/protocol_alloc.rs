//! State sized from peer input is bounded before allocation: a Hello naming a huge number of
//! blocks costs the replica (and the primary's validator) no per-block memory up front. A
//! counting global allocator records the largest single allocation while the Hello is handled.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use peerpipe::pipeline::ReplicaCore;
use peerpipe::protocol::{Config, Message, PrimarySide, ReplicaTarget};

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: AllocLayout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        }
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: AllocLayout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        }
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: AllocLayout) {
        // SAFETY: `p` came from `System` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: AllocLayout, new: usize) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new, Ordering::Relaxed);
        }
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Largest single allocation made by `f`.
fn largest_alloc(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    f();
    ARMED.store(false, Ordering::Relaxed);
    LARGEST.load(Ordering::Relaxed)
}

/// The bound: a few buffers' worth of bookkeeping, independent of the range's block count.
const BOUND: usize = 64 << 10;

#[test]
fn hello_naming_two_billion_blocks_allocates_nothing_per_block() {
    // 1 TiB in 512-byte blocks: 2^31 blocks, on a replica that really has 1 TiB.
    let c = Config {
        replica_id: 0,
        block_size: 512,
        lba_size: 512,
        window: 4096,
        range_offset: 0,
        range_len: 1 << 40,
        flags: 1,
    };
    let mut rep = ReplicaCore::with_target(ReplicaTarget::new(1 << 40, 512, 8, 512));
    let mut out = Vec::with_capacity(16);
    let got = largest_alloc(|| {
        rep.on_message(&Message::Hello(c).encode(), &mut out)
            .unwrap();
    });
    assert!(got <= BOUND, "replica allocated {got} bytes for a hello");
    assert_eq!(
        out.len(),
        1 + 8,
        "hello-ack and one advertisement per buffer"
    );
    let got = largest_alloc(|| {
        let p = PrimarySide::new(c).unwrap();
        drop(p);
    });
    assert!(got <= BOUND, "primary validator allocated {got} bytes");
}
