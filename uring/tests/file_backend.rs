//! The file backend on the host: O_DIRECT reads/writes through the ring with data verified,
//! short reads, alignment errors, fsync/fdatasync, zeroing/punching, batching, ring limits,
//! fixed buffers, vectored I/O, caller-managed (raw) buffers.

use peerpipe_uring::{
    AlignedBuf, Completion, Error, Feature, FileOptions, FileTarget, IoBuf, OpKind, RawBuf,
    Rejected, Ring, Slice,
};
use std::path::PathBuf;

struct TempFile(PathBuf);
impl TempFile {
    fn new(name: &str) -> Self {
        // /tmp on this machine is ext4 (O_DIRECT capable); tmpfs also supports it on 6.6+.
        let p = std::env::temp_dir().join(format!("peerpipe-uring-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        TempFile(p)
    }
}
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn rw_file(tf: &TempFile) -> FileTarget {
    FileTarget::open(
        &tf.0,
        FileOptions {
            write: true,
            create: true,
            direct: true,
        },
    )
    .unwrap()
}

fn one<B: IoBuf>(ring: &mut Ring<B>) -> Completion<B> {
    let mut out = Vec::new();
    assert_eq!(ring.wait(1, &mut out).unwrap(), 1);
    out.pop().unwrap()
}

#[test]
fn write_then_read_back_verified() {
    let tf = TempFile::new("rw");
    let f = rw_file(&tf);
    assert!(f.is_direct());
    let mut ring: Ring = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    let data = pattern(64 * 1024, 7);
    let mut b = AlignedBuf::new(data.len());
    b.copy_from_slice(&data);
    ring.write(t, 4096, b, 11).unwrap();
    let c = one(&mut ring);
    assert_eq!((c.tag, c.kind), (11, OpKind::Write));
    assert_eq!(c.result.unwrap(), data.len());
    assert!(
        c.bufs.single().is_some(),
        "the buffer comes back with the completion"
    );
    ring.flush(t, 12).unwrap();
    assert_eq!(one(&mut ring).result.unwrap(), 0);
    // Verify through a different path (std read, page cache).
    let disk = std::fs::read(&tf.0).unwrap();
    assert_eq!(disk.len(), 4096 + data.len());
    assert_eq!(&disk[4096..], &data[..]);
    assert!(disk[..4096].iter().all(|&x| x == 0));
    // And back through the ring, split into 4 KiB parts to exercise splitting.
    ring.set_file_max_transfer(4096);
    ring.read(t, 4096, AlignedBuf::new(data.len()), 13).unwrap();
    let c = one(&mut ring);
    assert_eq!(c.result.unwrap(), data.len());
    assert_eq!(&c.bufs.into_single().unwrap()[..], &data[..]);
}

#[test]
fn raw_buf_reads_into_caller_managed_memory() {
    let tf = TempFile::new("raw");
    let data = pattern(3 * 4096, 9);
    std::fs::write(&tf.0, &data).unwrap();
    let f = rw_file(&tf);
    // One aligned arena the caller keeps; the ring reads into its middle 8 KiB by address.
    let mut arena = AlignedBuf::new(4 * 4096);
    arena.fill(0xee);
    let mut ring: Ring<RawBuf> = Ring::builder().build().unwrap();
    let t = ring.add_file(&f).unwrap();
    // SAFETY: `arena` outlives the operation (reaped below) and is not touched meanwhile.
    let view = unsafe { RawBuf::new(arena.as_mut_ptr().add(4096), 2 * 4096) };
    ring.read(t, 4096, view, 5).unwrap();
    let c = one(&mut ring);
    assert_eq!(c.result.unwrap(), 2 * 4096);
    assert_eq!(c.bufs.into_single().map(|b| b.len()), Some(2 * 4096));
    assert_eq!(&arena[4096..3 * 4096], &data[4096..3 * 4096]);
    assert!(arena[..4096]
        .iter()
        .chain(&arena[3 * 4096..])
        .all(|&x| x == 0xee));
}

#[test]
fn short_reads_at_end_of_file() {
    let tf = TempFile::new("short");
    std::fs::write(&tf.0, pattern(5000, 3)).unwrap();
    let f = FileTarget::open(&tf.0, FileOptions::default()).unwrap();
    let mut ring: Ring = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    ring.read(t, 0, AlignedBuf::new(8192), 1).unwrap();
    let c = one(&mut ring);
    assert_eq!(c.result.unwrap(), 5000, "short read at EOF");
    assert_eq!(
        &c.bufs.into_single().unwrap()[..5000],
        &pattern(5000, 3)[..]
    );
    ring.read(t, 8192, AlignedBuf::new(4096), 2).unwrap();
    assert_eq!(one(&mut ring).result.unwrap(), 0, "read past EOF");
}

#[test]
fn alignment_errors_are_rejected_before_submission() {
    let tf = TempFile::new("align");
    std::fs::write(&tf.0, pattern(16384, 1)).unwrap();
    let f = FileTarget::open(&tf.0, FileOptions::default()).unwrap();
    let align = f.mem_align() as usize;
    let mut ring: Ring<Slice<AlignedBuf>> = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    if align > 1 {
        // Misaligned buffer address.
        let r = ring
            .read(t, 0, Slice::new(AlignedBuf::new(8192), 1, 4096), 1)
            .unwrap_err();
        assert!(
            matches!(r.error, Error::Invalid { op: "read", .. }),
            "{}",
            r.error
        );
        assert!(
            r.error.to_string().contains("AlignedBuf"),
            "says what to do: {}",
            r.error
        );
        assert_eq!(
            r.bufs.into_single().unwrap().start(),
            1,
            "the buffer is handed back"
        );
    }
    // Misaligned offset and length.
    let r = ring
        .read(t, 100, Slice::new(AlignedBuf::new(4096), 0, 4096), 2)
        .unwrap_err();
    assert!(matches!(r.error, Error::Invalid { .. }));
    let r = ring
        .read(t, 0, Slice::new(AlignedBuf::new(4096), 0, 100), 3)
        .unwrap_err();
    assert!(matches!(r.error, Error::Invalid { .. }));
    assert_eq!(ring.in_flight(), 0);
    // Forced through: the kernel says EINVAL, decoded with a hint.
    ring.set_alignment_checks(false);
    ring.read(t, 100, Slice::new(AlignedBuf::new(4096), 0, 4096), 4)
        .unwrap();
    let c = one(&mut ring);
    let e = c.result.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(e.op(), "read");
    assert!(e.to_string().contains("alignment"), "{e}");
}

#[test]
fn read_only_target_refuses_writes() {
    let tf = TempFile::new("ro");
    std::fs::write(&tf.0, pattern(4096, 1)).unwrap();
    let f = FileTarget::open(&tf.0, FileOptions::default()).unwrap();
    let mut ring: Ring = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    let r = ring.write(t, 0, AlignedBuf::new(4096), 1).unwrap_err();
    assert!(r.error.to_string().contains("read-only"), "{}", r.error);
}

#[test]
fn fsync_zero_range_and_punch_hole() {
    let tf = TempFile::new("zero");
    let f = rw_file(&tf);
    let mut ring: Ring = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    let data = pattern(3 * 4096, 9);
    let mut b = AlignedBuf::new(data.len());
    b.copy_from_slice(&data);
    ring.write(t, 0, b, 1).unwrap();
    assert_eq!(one(&mut ring).result.unwrap(), data.len());
    ring.fsync(t, 2).unwrap();
    let c = one(&mut ring);
    assert_eq!((c.kind, c.result.unwrap()), (OpKind::Fsync, 0));
    ring.write_zeroes(t, 0, 4096, 3).unwrap();
    ring.deallocate(t, &[(8192, 4096)], 4).unwrap();
    let mut out = Vec::new();
    while out.len() < 2 {
        ring.wait(2 - out.len(), &mut out).unwrap();
    }
    for c in &out {
        assert!(c.result.is_ok(), "{:?}", c.result);
    }
    let disk = std::fs::read(&tf.0).unwrap();
    assert_eq!(disk.len(), data.len(), "KEEP_SIZE");
    assert!(disk[..4096].iter().all(|&x| x == 0));
    assert_eq!(&disk[4096..8192], &data[4096..8192]);
    assert!(disk[8192..].iter().all(|&x| x == 0));
    // Range errors are typed.
    assert!(matches!(
        ring.write_zeroes(t, 1, 4096, 5),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        ring.deallocate(t, &[], 5),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn batching_submits_many_sqes_in_one_call_and_ring_full_hands_buffer_back() {
    let tf = TempFile::new("batch");
    std::fs::write(&tf.0, pattern(32 * 4096, 5)).unwrap();
    let f = FileTarget::open(&tf.0, FileOptions::default()).unwrap();
    let mut ring: Ring = Ring::builder().entries(32).build().unwrap();
    assert_eq!(ring.capacity(), 32);
    let t = ring.add_file(&f).unwrap();
    for i in 0..32u64 {
        ring.read(t, i * 4096, AlignedBuf::new(4096), i).unwrap();
    }
    let r = ring.read(t, 0, AlignedBuf::new(4096), 99).unwrap_err();
    assert!(
        matches!(r.error, Error::RingFull { in_flight: 32, .. }),
        "{}",
        r.error
    );
    assert_eq!(r.bufs.into_single().unwrap().len(), 4096);
    assert_eq!(ring.submit().unwrap(), 32, "one io_uring_enter for 32 SQEs");
    let mut out = Vec::new();
    while out.len() < 32 {
        ring.wait(32 - out.len(), &mut out).unwrap();
    }
    let data = pattern(32 * 4096, 5);
    for c in out {
        let i = c.tag as usize;
        assert_eq!(c.result.unwrap(), 4096);
        assert_eq!(
            &c.bufs.into_single().unwrap()[..],
            &data[i * 4096..(i + 1) * 4096]
        );
    }
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn vectored_write_and_read() {
    let tf = TempFile::new("vec");
    let f = rw_file(&tf);
    let mut ring: Ring = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    let data = pattern(3 * 4096, 2);
    let bufs: Vec<AlignedBuf> = data
        .chunks(4096)
        .map(|c| {
            let mut b = AlignedBuf::new(4096);
            b.copy_from_slice(c);
            b
        })
        .collect();
    ring.writev(t, 0, bufs, 1).unwrap();
    let c = one(&mut ring);
    assert_eq!(c.result.unwrap(), data.len());
    assert_eq!(c.bufs.len(), 3);
    let bufs = vec![AlignedBuf::new(8192), AlignedBuf::new(4096)];
    ring.readv(t, 0, bufs, 2).unwrap();
    let c = one(&mut ring);
    assert_eq!(c.result.unwrap(), data.len());
    let got: Vec<u8> = c.bufs.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(got, data);
    let Rejected {
        error: e,
        bufs: back,
    } = ring.readv(t, 0, vec![], 3).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }));
    assert!(back.is_empty());
}

#[test]
fn fixed_buffers_are_used_and_bad_registrations_reported() {
    let tf = TempFile::new("fixed");
    std::fs::write(&tf.0, pattern(8192, 4)).unwrap();
    let f = FileTarget::open(&tf.0, FileOptions::default()).unwrap();
    let mut ring: Ring<Slice<AlignedBuf>> = Ring::new().unwrap();
    let caps = ring.capabilities().clone();
    println!("{caps}");
    assert_eq!(
        caps.fixed_buffers,
        Feature::On,
        "host kernel supports fixed buffers"
    );
    assert_eq!(caps.registered_files, Feature::On);
    let t = ring.add_file(&f).unwrap();
    let mut arena = AlignedBuf::new(16384);
    // SAFETY: `arena` outlives its registration: we unregister before dropping it below.
    let idx = unsafe { ring.register_buffer(arena.as_mut_ptr(), arena.len()) }.unwrap();
    assert_eq!(idx, 0);
    ring.read(t, 0, Slice::new(arena, 4096, 8192), 1).unwrap();
    let c = one(&mut ring);
    assert_eq!(c.result.unwrap(), 8192);
    let arena = c.bufs.into_single().unwrap().into_inner();
    assert_eq!(&arena[4096..12288], &pattern(8192, 4)[..]);
    // An unmapped address cannot be pinned: EFAULT, carried in the error and the report.
    // SAFETY: registration fails; nothing is ever read through this address.
    let e = unsafe { ring.register_buffer(0x1000 as *mut u8, 4096) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EFAULT), "{e}");
    assert_eq!(
        ring.capabilities().unregistered_buffers,
        vec![(0x1000, 4096, libc::EFAULT)]
    );
    assert!(ring.capabilities().to_string().contains("not registered"));
    ring.unregister_buffers().unwrap();
    drop(arena);
}

#[test]
fn capability_report_lists_every_feature() {
    let ring: Ring = Ring::builder().sqpoll(Some(10)).build().unwrap();
    let caps = ring.capabilities();
    let text = caps.to_string();
    for k in [
        "URING_CMD",
        "POLL_ADD",
        "IOPOLL",
        "SQPOLL",
        "COOP_TASKRUN",
        "SINGLE_ISSUER",
        "DEFER_TASKRUN",
        "registered files",
        "fixed buffers",
    ] {
        assert!(text.contains(k), "{k} missing from\n{text}");
    }
    assert!(caps.uring_cmd);
    assert_ne!(caps.sqpoll, Feature::Off, "requested, so on or unavailable");
    assert_eq!(
        caps.defer_taskrun,
        Feature::Off,
        "DEFER_TASKRUN is not combined with SQPOLL"
    );
}

#[test]
fn sqpoll_ring_does_io() {
    let tf = TempFile::new("sqpoll");
    std::fs::write(&tf.0, pattern(4096, 8)).unwrap();
    let f = FileTarget::open(&tf.0, FileOptions::default()).unwrap();
    let mut ring: Ring = Ring::builder().sqpoll(Some(50)).build().unwrap();
    let t = ring.add_file(&f).unwrap();
    ring.read(t, 0, AlignedBuf::new(4096), 1).unwrap();
    let c = one(&mut ring);
    assert_eq!(&c.bufs.into_single().unwrap()[..], &pattern(4096, 8)[..]);
}

#[test]
fn unknown_target_is_rejected() {
    let mut a: Ring = Ring::new().unwrap();
    let tf = TempFile::new("other");
    std::fs::write(&tf.0, [0u8; 4096]).unwrap();
    let f = FileTarget::open(&tf.0, FileOptions::default()).unwrap();
    let mut b: Ring = Ring::new().unwrap();
    let t2 = b.add_file(&f).unwrap();
    let _ = a.add_file(&f).unwrap();
    // Same index (0) in both rings: still refused by the other ring.
    let r = a.read(t2, 0, AlignedBuf::new(4096), 0).unwrap_err();
    assert!(r.error.to_string().contains("unknown target"));
}
