//! 4 KiB (or --bs) random reads at a fixed queue depth through a peerpipe-uring Ring, on an
//! NVMe namespace (`/dev/ngXnY`, passthrough) or a file/block device (O_DIRECT).
//!
//! ```text
//! randread PATH [--qd 32] [--bs 4096] [--secs 5] [--size BYTES] [--iopoll]
//!               [--no-fixed] [--no-hints] [--no-regfiles] [--naive] [--batch] [--spin-us N]
//!               [--flags coop,single,defer]
//! ```
//! Prints one line `iops=<n> ...`. `--naive` runs the loop the issue measured at ~0.9x fio:
//! a fresh buffer per I/O, one io_uring_enter per completion, no fixed buffers/files.
//! `--batch` resubmits all reaped reads in one io_uring_enter instead of one by one.

use peerpipe_uring::{AlignedBuf, FileOptions, FileTarget, IoBuf, Namespace, Ring, TargetId};
use std::time::{Duration, Instant};

struct Args {
    path: String,
    qd: usize,
    bs: usize,
    secs: f64,
    size: Option<u64>,
    iopoll: bool,
    fixed: bool,
    hints: bool,
    regfiles: bool,
    naive: bool,
    flags: Option<String>,
    eager: bool,
    spin_us: u64,
}

fn parse() -> Args {
    let mut a = Args {
        path: String::new(),
        qd: 32,
        bs: 4096,
        secs: 5.0,
        size: None,
        iopoll: false,
        fixed: true,
        hints: true,
        regfiles: true,
        naive: false,
        flags: None,
        eager: true,
        spin_us: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{x} needs a value"));
        match x.as_str() {
            "--qd" => a.qd = val().parse().expect("--qd N"),
            "--bs" => a.bs = val().parse().expect("--bs BYTES"),
            "--secs" => a.secs = val().parse().expect("--secs S"),
            "--size" => a.size = Some(val().parse().expect("--size BYTES")),
            "--iopoll" => a.iopoll = true,
            "--no-fixed" => a.fixed = false,
            "--no-hints" => a.hints = false,
            "--no-regfiles" => a.regfiles = false,
            "--naive" => a.naive = true,
            "--batch" => a.eager = false,
            "--spin-us" => a.spin_us = val().parse().expect("--spin-us N"),
            "--flags" => a.flags = Some(val()),
            p if !p.starts_with("--") => a.path = p.to_string(),
            other => panic!("unknown option {other}"),
        }
    }
    assert!(
        !a.path.is_empty(),
        "usage: randread PATH [--qd N] [--bs B] [--secs S] ..."
    );
    a
}

/// xorshift64*: cheap, good enough to spread offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse();
    let mut b = Ring::builder()
        .entries(a.qd.next_power_of_two().max(2) as u32)
        .iopoll(a.iopoll)
        .single_thread_hints(a.hints && !a.naive);
    if let Some(f) = &a.flags {
        b = b
            .coop_taskrun(f.contains("coop"))
            .single_issuer(f.contains("single"))
            .defer_taskrun(f.contains("defer"));
    }
    if a.naive || !a.regfiles {
        b = b.file_slots(0);
    }
    if a.naive || !a.fixed {
        b = b.buffer_slots(0);
    }
    let mut ring: Ring<AlignedBuf> = b.build()?;
    let (t, size): (TargetId, u64) = if a.path.contains("/ng") {
        let ns = Namespace::open(&a.path)?;
        let t = ring.add_namespace(&ns)?;
        (t, ns.info().capacity())
    } else {
        let f = FileTarget::open(&a.path, FileOptions::default())?;
        let t = ring.add_file(&f)?;
        (t, f.size())
    };
    let size = a.size.unwrap_or(size).min(size);
    // Eager: each read goes to the kernel as soon as it is queued (like fio's default
    // iodepth_batch_submit=1); --batch: all resubmissions of one reap in one enter.
    ring.set_submit_batch(if a.eager && !a.naive { 1 } else { 0 });
    ring.set_spin(Duration::from_micros(a.spin_us));
    let blocks = size / a.bs as u64;
    assert!(blocks > 0, "target smaller than one block");
    // One arena, registered once, carved into qd buffers (fixed-buffer friendly).
    let mut bufs: Vec<AlignedBuf> = (0..a.qd).map(|_| AlignedBuf::new(a.bs)).collect();
    if a.fixed && !a.naive {
        for b in &mut bufs {
            // SAFETY: the buffers live until the end of main, after the ring is dropped.
            if let Err(e) = unsafe { ring.register_buffer(b.as_mut_ptr(), b.len()) } {
                eprintln!("fixed buffer: {e} (continuing unregistered)");
            }
        }
    }
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut out = Vec::with_capacity(a.qd);
    let dur = Duration::from_secs_f64(a.secs);
    let mut done: u64 = 0;
    let mut errors: u64 = 0;
    let start = Instant::now();
    for (i, b) in bufs.drain(..).enumerate() {
        ring.read(t, (rng.next() % blocks) * a.bs as u64, b, i as u64)?;
    }
    let mut check = 0u32;
    loop {
        ring.wait(1, &mut out)?;
        // Check the clock every 64 reaps, not per I/O.
        check += 1;
        let stop = check % 64 == 0 && start.elapsed() >= dur;
        for c in out.drain(..) {
            done += 1;
            if c.result.is_err() {
                errors += 1;
            }
            if stop {
                continue;
            }
            let b = if a.naive {
                AlignedBuf::new(a.bs)
            } else {
                c.bufs.into_single().expect("buffer back")
            };
            ring.read(t, (rng.next() % blocks) * a.bs as u64, b, c.tag)?;
            if a.naive {
                ring.submit()?;
            }
        }
        if stop {
            break;
        }
    }
    // Drain the rest so all counted I/O finished inside the timing.
    while ring.in_flight() > 0 {
        done += ring.wait(ring.in_flight(), &mut out)? as u64;
        out.clear();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "iops={:.0} ios={done} errors={errors} secs={secs:.2} qd={} bs={} path={} iopoll={} fixed={} regfiles={} hints={} naive={} eager={}",
        done as f64 / secs,
        a.qd,
        a.bs,
        a.path,
        ring.capabilities().iopoll == peerpipe_uring::Feature::On,
        a.fixed && !a.naive,
        a.regfiles && !a.naive,
        a.hints && !a.naive,
        a.naive,
        a.eager && !a.naive
    );
    if errors > 0 {
        return Err(format!("{errors} I/O errors").into());
    }
    Ok(())
}
