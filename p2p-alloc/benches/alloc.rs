//! Allocation + free throughput: the pool (host memory; p2pmem too when a provider exists
//! and `PEERPIPE_BENCH_P2P=1`) against the system allocator, 4 KiB..1 MiB buffers, one and
//! two threads. Each op = one allocation + one free; a thread keeps a window of 16 live
//! buffers (sizes cycling 4 KiB, 8 KiB, ..., 1 MiB) so frees interleave with allocations.
//! Prints the median of RUNS runs per row (ops/s) and the ratio to the system allocator.
//!
//! Run: `cargo bench -p peerpipe-p2p-alloc --bench alloc` (or benches/alloc-host.sh).

use std::alloc::{alloc, dealloc, Layout};
use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Instant;

use peerpipe_p2p_alloc::{discover, Placement, Pool, SysRoot};

const SIZES: [usize; 9] = [
    4 << 10,
    8 << 10,
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
];
const WINDOW: usize = 16;

fn ops_per_thread() -> usize {
    std::env::var("PEERPIPE_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000)
}

fn runs() -> usize {
    std::env::var("PEERPIPE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7)
}

/// The same pattern for every allocator: a sliding window of live buffers.
fn pattern<B>(ops: usize, mut a: impl FnMut(usize) -> B, mut touch: impl FnMut(&B)) {
    let mut live: VecDeque<B> = VecDeque::with_capacity(WINDOW + 1);
    for i in 0..ops {
        let b = a(SIZES[i % SIZES.len()]);
        touch(&b);
        live.push_back(b);
        if live.len() > WINDOW {
            drop(live.pop_front());
        }
    }
}

struct SysBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl Drop for SysBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `alloc` with this layout, freed once.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

fn system(ops: usize, align: usize) {
    pattern(
        ops,
        |len| {
            let layout = Layout::from_size_align(len, align).unwrap();
            // SAFETY: non-zero size.
            let ptr = unsafe { alloc(layout) };
            assert!(!ptr.is_null());
            SysBuf { ptr, layout }
        },
        |b| {
            black_box(b.ptr);
        },
    );
}

fn pool_run(pool: &Pool, ops: usize) {
    pattern(
        ops,
        |len| pool.alloc(len).unwrap(),
        |b| {
            black_box(b.addr());
        },
    );
}

/// Ops/s of `f` run on `threads` threads at once (each doing `ops` ops).
fn measure(threads: usize, ops: usize, f: &(dyn Fn(usize) + Sync)) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| f(ops));
        }
    });
    (threads * ops) as f64 / start.elapsed().as_secs_f64()
}

/// One allocator under test: runs the pattern for the given number of ops.
type Workload = Box<dyn Fn(usize) + Sync>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let ops = ops_per_thread();
    let runs = runs();
    let host = Pool::builder(Placement::HostOnly)
        .chunk_size(4 << 20)
        .build()
        .unwrap();
    let mut rows: Vec<(String, Workload)> = vec![
        (
            "system (malloc, 16 B align)".into(),
            Box::new(|n| system(n, 16)),
        ),
        (
            "system (posix_memalign 4 KiB)".into(),
            Box::new(|n| system(n, 4096)),
        ),
        ("pool host".into(), Box::new(move |n| pool_run(&host, n))),
    ];
    if std::env::var_os("PEERPIPE_BENCH_P2P").is_some() {
        if let Some(p) = discover(&SysRoot::live())
            .ok()
            .and_then(|v| v.into_iter().next())
        {
            let pool = Pool::builder(Placement::P2pRequired)
                .provider(p.clone())
                .chunk_size(4 << 20)
                .build()
                .unwrap();
            rows.push((
                format!("pool p2pmem {}", p.pci),
                Box::new(move |n| pool_run(&pool, n)),
            ));
        }
    }
    println!("ops/thread {ops}, runs {runs}, sizes 4 KiB..1 MiB, window {WINDOW}");
    println!(
        "{:<34} {:>8} {:>14} {:>10}",
        "allocator", "threads", "ops/s (median)", "vs malloc"
    );
    let threads_list: Vec<usize> = std::env::var("PEERPIPE_BENCH_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    for threads in threads_list {
        for (_, f) in &rows {
            // Warm up (maps chunks, grows glibc's heap) before timing.
            f(ops / 4);
        }
        // Interleave the rows run by run so load from other processes hits all alike.
        let mut samples = vec![Vec::new(); rows.len()];
        for _ in 0..runs {
            for (i, (_, f)) in rows.iter().enumerate() {
                samples[i].push(measure(threads, ops, f.as_ref()));
            }
        }
        let base = median(samples[0].clone());
        for ((name, _), s) in rows.iter().zip(samples) {
            let m = median(s);
            println!("{name:<34} {threads:>8} {m:>14.0} {:>9.2}x", m / base);
        }
    }
}
