//! Allocator properties on host memory (no device needed).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use peerpipe_p2p_alloc::{Backing, Buffer, Error, Placement, Pool};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn host_pool(chunk: usize, max: u64) -> Pool {
    Pool::builder(Placement::HostOnly)
        .chunk_size(chunk)
        .max_host_bytes(max)
        .build()
        .unwrap()
}

fn ranges_disjoint(bufs: &[Buffer]) {
    let mut r: Vec<(usize, usize)> = bufs
        .iter()
        .map(|b| (b.addr() as usize, b.addr() as usize + b.capacity()))
        .collect();
    r.sort();
    for w in r.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlap: {:x?} and {:x?}", w[0], w[1]);
    }
}

#[test]
fn buffers_do_not_overlap_and_are_4k_aligned() {
    let pool = host_pool(MIB, 16 * MIB as u64);
    let sizes = [1, 4096, 4097, 10_000, 65536, 300_000, MIB];
    let bufs: Vec<Buffer> = (0..40)
        .map(|i| pool.alloc(sizes[i % sizes.len()]).unwrap())
        .collect();
    for b in &bufs {
        assert_eq!(b.addr() as usize % 4096, 0, "{b:?}");
        assert!(b.capacity() >= b.len());
        assert!(b.capacity().is_power_of_two());
        assert!(b.provider().is_none());
        assert!(matches!(b.backing(), Backing::Host { .. }));
    }
    ranges_disjoint(&bufs);
}

#[test]
fn larger_alignment_on_request() {
    let pool = host_pool(4 * MIB, 16 * MIB as u64);
    let _small = pool.alloc(4096).unwrap();
    for align in [8 * KIB, 64 * KIB, MIB, 2 * MIB] {
        let b = pool.alloc_aligned(4096, align).unwrap();
        assert_eq!(b.addr() as usize % align, 0, "align {align}: {b:?}");
    }
    assert!(matches!(
        pool.alloc_aligned(4096, 3000),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        pool.alloc_aligned(4096, 8 * MIB),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn bad_requests_are_typed_errors() {
    let pool = host_pool(MIB, 4 * MIB as u64);
    let e = pool.alloc(0).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    let e = pool.alloc(MIB + 1).unwrap_err();
    assert!(e.to_string().contains("chunk_size"), "{e}");
    assert_eq!(pool.stats().failures, 2);
    assert!(Pool::builder(Placement::HostOnly)
        .chunk_size(3 * MIB)
        .build()
        .is_err());
    let e = Pool::builder(Placement::P2pRequired).build().unwrap_err();
    assert!(e.to_string().contains("provider"), "{e}");
}

#[test]
fn memory_is_writable_and_reused_after_free() {
    let pool = host_pool(MIB, MIB as u64);
    let mut b = pool.alloc(64 * KIB).unwrap();
    b.as_mut_slice().fill(0x5a);
    assert!(b.as_slice().iter().all(|&x| x == 0x5a));
    let addr = b.addr();
    drop(b);
    let b2 = pool.alloc(64 * KIB).unwrap();
    assert_eq!(b2.addr(), addr, "freed block comes back first");
    assert_eq!(pool.stats().chunks, 1);
}

#[test]
fn exhaustion_then_recovery_after_free() {
    // One 1 MiB chunk at most: 16 x 64 KiB fill it.
    let pool = host_pool(MIB, MIB as u64);
    let mut bufs: Vec<Buffer> = (0..16).map(|_| pool.alloc(64 * KIB).unwrap()).collect();
    let e = pool.alloc(4096).unwrap_err();
    assert!(
        matches!(e, Error::HostOutOfMemory { errno, .. } if errno == libc::ENOMEM),
        "{e}"
    );
    ranges_disjoint(&bufs);
    // Freed small blocks merge back: after freeing everything, the whole chunk fits.
    bufs.clear();
    let whole = pool.alloc(MIB).unwrap();
    assert_eq!(whole.capacity(), MIB);
    let s = pool.stats();
    assert_eq!(s.failures, 1);
    assert_eq!(s.chunks, 1);
    assert_eq!(s.allocations, 17);
}

#[test]
fn stats_track_use_peak_and_frees() {
    let pool = host_pool(MIB, 4 * MIB as u64);
    let a = pool.alloc(4096).unwrap();
    let b = pool.alloc(5000).unwrap(); // rounds to 8 KiB
    let s = pool.stats();
    assert_eq!(s.bytes_in_use, 12 * KIB as u64);
    assert_eq!(s.peak_bytes, 12 * KIB as u64);
    assert_eq!(s.allocations, 2);
    assert_eq!(s.host_bytes_mapped, MIB as u64);
    drop(a);
    drop(b);
    let s = pool.stats();
    assert_eq!(s.bytes_in_use, 0);
    assert_eq!(s.peak_bytes, 12 * KIB as u64);
    assert_eq!(s.frees, 2);
    assert_eq!(s.fallbacks, 0);
}

#[test]
fn new_chunk_hook_sees_every_chunk_once() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let pool = Pool::builder(Placement::HostOnly)
        .chunk_size(256 * KIB)
        .on_new_chunk(move |c| {
            s2.lock().unwrap().push((c.id, c.addr, c.len));
            Ok(())
        })
        .build()
        .unwrap();
    let bufs: Vec<Buffer> = (0..10).map(|_| pool.alloc(128 * KIB).unwrap()).collect();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5);
    let chunks = pool.chunks();
    assert_eq!(
        chunks
            .iter()
            .map(|c| (c.id, c.addr, c.len))
            .collect::<Vec<_>>(),
        seen
    );
    for b in &bufs {
        let c = chunks.iter().find(|c| c.id == b.chunk_id()).unwrap();
        assert_eq!(b.addr() as usize, c.addr + b.offset_in_chunk());
        assert!(b.offset_in_chunk() + b.capacity() <= c.len);
    }
}

#[test]
fn hook_refusal_is_a_typed_error() {
    let pool = Pool::builder(Placement::HostOnly)
        .chunk_size(64 * KIB)
        .on_new_chunk(|_| Err("ibv_reg_mr: EFAULT".into()))
        .build()
        .unwrap();
    let e = pool.alloc(4096).unwrap_err();
    assert!(matches!(e, Error::HookFailed { .. }), "{e}");
    assert!(e.to_string().contains("EFAULT"));
    let source = std::error::Error::source(&e).expect("the hook's error is the source");
    assert_eq!(source.to_string(), "ibv_reg_mr: EFAULT");
    assert!(pool.chunks().is_empty());
}

#[test]
fn concurrent_alloc_free_from_several_threads() {
    let pool = host_pool(MIB, 64 * MIB as u64);
    let live = Arc::new(Mutex::new(HashSet::new()));
    let overlaps = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..4 {
            let pool = pool.clone();
            let live = live.clone();
            let overlaps = overlaps.clone();
            s.spawn(move || {
                let mut mine: Vec<Buffer> = Vec::new();
                for i in 0..2000usize {
                    let len = 4096 << ((i + t) % 6);
                    let mut b = pool.alloc(len).unwrap();
                    // Every 4 KiB page of a live buffer belongs to exactly one buffer.
                    let mut l = live.lock().unwrap();
                    for p in (0..b.capacity()).step_by(4096) {
                        if !l.insert(b.addr() as usize + p) {
                            overlaps.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(l);
                    b.as_mut_slice()[0] = t as u8;
                    mine.push(b);
                    if mine.len() > 8 {
                        let old = mine.remove(i % 8);
                        assert_eq!(old.as_slice()[0], t as u8, "someone wrote into my buffer");
                        let mut l = live.lock().unwrap();
                        for p in (0..old.capacity()).step_by(4096) {
                            l.remove(&(old.addr() as usize + p));
                        }
                    }
                }
                let mut l = live.lock().unwrap();
                for b in mine {
                    for p in (0..b.capacity()).step_by(4096) {
                        l.remove(&(b.addr() as usize + p));
                    }
                }
            });
        }
    });
    assert_eq!(overlaps.load(Ordering::Relaxed), 0);
    let s = pool.stats();
    assert_eq!(s.allocations, 8000);
    assert_eq!(s.frees, 8000);
    assert_eq!(s.bytes_in_use, 0);
    assert_eq!(s.failures, 0);
}

#[test]
fn buffers_are_send_and_outlive_the_pool_handle() {
    fn is_send<T: Send>() {}
    is_send::<Buffer>();
    let pool = host_pool(MIB, MIB as u64);
    let mut b = pool.alloc(4096).unwrap();
    drop(pool);
    b.as_mut_slice().fill(7);
    let h = std::thread::spawn(move || b.as_slice().iter().map(|&x| x as u32).sum::<u32>());
    assert_eq!(h.join().unwrap(), 7 * 4096);
}

/// A stand-in provider for placement-policy tests on the host: a file in /dev/shm mapped
/// MAP_SHARED like a p2pmem interface. (Real p2pmem semantics are covered by the testbed
/// tests; here only the pool's policy is under test.)
fn shm_provider(name: &str, len: u64) -> (peerpipe_p2p_alloc::Provider, std::path::PathBuf) {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/p2p-alloc-test-{name}-{}",
        std::process::id()
    ));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(len).unwrap();
    let p = peerpipe_p2p_alloc::Provider {
        pci: "0000:99:00.0".into(),
        chardev: Some(path.clone()),
        sysfs_dir: None,
        size: Some(len),
        published: Some(true),
        numa_node: None,
    };
    (p, path)
}

#[test]
fn preferred_placement_falls_back_to_host_and_counts_it() {
    let (prov, path) = shm_provider("pref", 4 * MIB as u64);
    let pool = Pool::builder(Placement::P2pPreferred)
        .provider(prov)
        .chunk_size(MIB)
        .max_p2p_bytes(2 * MIB as u64)
        .build()
        .unwrap();
    let bufs: Vec<Buffer> = (0..4).map(|_| pool.alloc(MIB).unwrap()).collect();
    let p2p = bufs
        .iter()
        .filter(|b| b.provider() == Some("0000:99:00.0"))
        .count();
    assert_eq!(p2p, 2);
    let s = pool.stats();
    assert_eq!(s.fallbacks, 2);
    assert_eq!(s.failures, 0);
    assert_eq!(s.p2p_bytes_mapped, 2 * MIB as u64);
    assert_eq!(s.host_bytes_mapped, 2 * MIB as u64);
    // A freed p2p buffer is preferred again over host memory.
    let first_p2p = bufs.iter().position(|b| b.provider().is_some()).unwrap();
    let mut bufs = bufs;
    bufs.remove(first_p2p);
    assert!(pool.alloc(MIB).unwrap().provider().is_some());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn required_placement_reports_out_of_memory_with_the_provider() {
    let (prov, path) = shm_provider("req", 4 * MIB as u64);
    let pool = Pool::builder(Placement::P2pRequired)
        .provider(prov)
        .chunk_size(MIB)
        .max_p2p_bytes(MIB as u64)
        .build()
        .unwrap();
    let _a = pool.alloc(MIB).unwrap();
    match pool.alloc(4096).unwrap_err() {
        Error::OutOfMemory {
            provider,
            requested,
            pool_free,
            ..
        } => {
            assert_eq!(provider, "0000:99:00.0");
            assert_eq!(requested, 4096);
            assert_eq!(pool_free, 0);
        }
        e => panic!("{e}"),
    }
    assert_eq!(pool.stats().failures, 1);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn hook_refusing_p2p_chunks_sends_preferred_pools_to_host() {
    let (prov, path) = shm_provider("hook", 4 * MIB as u64);
    let pool = Pool::builder(Placement::P2pPreferred)
        .provider(prov)
        .chunk_size(MIB)
        .on_new_chunk(|c| match c.backing.is_p2p() {
            true => Err("ibv_reg_mr: EFAULT".into()),
            false => Ok(()),
        })
        .build()
        .unwrap();
    let b = pool.alloc(4096).unwrap();
    assert!(b.provider().is_none());
    let b2 = pool.alloc(4096).unwrap();
    assert!(b2.provider().is_none());
    assert_eq!(pool.stats().fallbacks, 2);
    assert!(pool.chunks().iter().all(|c| !c.backing.is_p2p()));
    std::fs::remove_file(path).unwrap();
}
