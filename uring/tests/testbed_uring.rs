//! peerpipe-uring against the testbed's emulated NVMe drives: passthrough commands with data
//! verified through the block device (O_DIRECT pread/pwrite), validation and decoded NVMe
//! statuses, p2pmem buffers, IOPOLL and fixed buffers.

use peerpipe_testbed::{drive, drives, require_testbed, sysfs_allocate, Drive, P2pMap};
use peerpipe_uring::sc;
use peerpipe_uring::{
    AlignedBuf, Error, Feature, FileOptions, FileTarget, IoBuf, Namespace, NvmeCommand, OpKind,
    Rejected, Ring, TargetId,
};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

const MIB: u64 = 1 << 20;
/// Tests write here (512 MiB into each 1 GiB drive), away from LBA 0.
const BASE: u64 = 512 * MIB;

type AnyRing = Ring<Box<dyn IoBuf>>;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn host(data: &[u8]) -> Box<dyn IoBuf> {
    let mut b = AlignedBuf::new(data.len());
    b.copy_from_slice(data);
    Box::new(b)
}

fn bytes(b: &dyn IoBuf) -> &[u8] {
    // SAFETY: the buffer came back with its completion: nothing else accesses it now.
    unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) }
}

fn block(d: &Drive) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&d.block)
        .unwrap_or_else(|e| panic!("{}: {e}", d.block.display()))
}

/// Reads through the block layer (a path independent of passthrough).
fn block_read(d: &Drive, off: u64, len: usize) -> Vec<u8> {
    let mut b = AlignedBuf::new(len);
    block(d).read_exact_at(&mut b, off).unwrap();
    b.to_vec()
}

fn block_write(d: &Drive, off: u64, data: &[u8]) {
    let mut b = AlignedBuf::new(data.len());
    b.copy_from_slice(data);
    let f = block(d);
    f.write_all_at(&b, off).unwrap();
    f.sync_all().unwrap();
}

fn one(ring: &mut AnyRing) -> peerpipe_uring::Completion<Box<dyn IoBuf>> {
    let mut out = Vec::new();
    ring.wait(1, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

fn open(d: &Drive) -> (Namespace, AnyRing, TargetId) {
    let ns = Namespace::open(&d.ng).unwrap_or_else(|e| panic!("{}: {e}", d.ng.display()));
    let mut ring: AnyRing = Ring::builder().entries(64).build().unwrap();
    let t = ring.add_namespace(&ns).unwrap();
    (ns, ring, t)
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_identify_every_drive() {
    require_testbed();
    let all = drives();
    assert_eq!(all.len(), peerpipe_testbed::drive_count());
    for d in &all {
        let ns = Namespace::open(&d.ng).unwrap();
        let i = ns.info();
        println!("{} {}: {:?}", d.serial, d.ng.display(), i);
        assert_eq!(ns.nsid(), 1);
        assert_eq!(i.controller.serial, d.serial);
        assert_eq!(u64::from(i.lba_size()), d.lba_size);
        let sysfs_sectors: u64 =
            std::fs::read_to_string(format!("/sys/block/{}/size", ns.block_name()))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        assert_eq!(
            i.capacity(),
            sysfs_sectors * 512,
            "capacity agrees with the block layer"
        );
        if d.serial.starts_with("data") {
            assert_eq!(i.capacity(), 1 << 30);
        }
        let hw = i.sysfs_max_hw_bytes.expect("max_hw_sectors_kb readable");
        assert!(u64::from(i.max_transfer) <= hw);
        if let Some(m) = i.controller.mdts_bytes() {
            assert!(u64::from(i.max_transfer) <= m);
        }
        assert!(i.controller.supports_write_zeroes() && i.controller.supports_dsm());
        // The block device path maps to the same namespace.
        let same = Namespace::open(&d.block).unwrap();
        assert_eq!(same.path(), d.ng.as_path());
        assert_eq!(same.info(), i);
    }
    // A block device is not a char device: a typed error that says what to use.
    let e = Namespace::open("/dev/null").unwrap_err();
    assert!(
        matches!(
            e,
            Error::Os {
                op: "NVME_IOCTL_ID",
                ..
            }
        ),
        "{e}"
    );
    let e = Namespace::open("/dev/ng9n9").unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_passthrough_read_write_flush_every_drive() {
    require_testbed();
    for (n, d) in drives().iter().enumerate() {
        let (ns, mut ring, t) = open(d);
        let max = ns.info().max_transfer as usize;
        // Larger than one command: split by the ring.
        let len = 2 * max + 4096;
        let data = pattern(len, n as u64 + 1);
        ring.write(t, BASE, host(&data), 1).unwrap();
        let c = one(&mut ring);
        assert_eq!(
            (c.kind, c.result.clone().unwrap()),
            (OpKind::Write, len),
            "{}",
            d.serial
        );
        ring.flush(t, 2).unwrap();
        assert_eq!(one(&mut ring).result.unwrap(), 0);
        assert_eq!(
            block_read(d, BASE, len),
            data,
            "{}: passthrough write seen by the block layer",
            d.serial
        );

        let other = pattern(64 * 1024, 100 + n as u64);
        block_write(d, BASE + 4 * MIB, &other);
        ring.read(t, BASE + 4 * MIB, Box::new(AlignedBuf::new(other.len())), 3)
            .unwrap();
        let c = one(&mut ring);
        assert_eq!(c.result.unwrap(), other.len());
        assert_eq!(
            bytes(&*c.bufs.into_single().unwrap()),
            &other[..],
            "{}: block write seen by passthrough",
            d.serial
        );

        // Vectored: 3 page-aligned buffers, one command.
        let bufs: Vec<Box<dyn IoBuf>> = vec![
            Box::new(AlignedBuf::new(8192)),
            Box::new(AlignedBuf::new(4096)),
            Box::new(AlignedBuf::new(4096)),
        ];
        ring.readv(t, BASE + 4 * MIB, bufs, 4)
            .map_err(|r| r.error)
            .unwrap();
        let c = one(&mut ring);
        assert_eq!(c.result.unwrap(), 16384);
        let got: Vec<u8> = c.bufs.iter().flat_map(|b| bytes(&**b).to_vec()).collect();
        assert_eq!(got, &other[..16384]);
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_write_zeroes_and_deallocate_every_drive() {
    require_testbed();
    for (n, d) in drives().iter().enumerate() {
        let (_ns, mut ring, t) = open(d);
        let off = BASE + 8 * MIB;
        let data = pattern(256 * 1024, 200 + n as u64);
        block_write(d, off, &data);
        ring.write_zeroes(t, off, 128 * 1024, 1).unwrap();
        let c = one(&mut ring);
        assert_eq!(c.kind, OpKind::WriteZeroes);
        c.result.unwrap();
        let back = block_read(d, off, data.len());
        assert!(
            back[..128 * 1024].iter().all(|&b| b == 0),
            "{}: zeroed",
            d.serial
        );
        assert_eq!(
            &back[128 * 1024..],
            &data[128 * 1024..],
            "{}: rest untouched",
            d.serial
        );

        // Deallocate two ranges. Whether deallocated blocks read back as zeroes depends on
        // the device (QEMU's backend may ignore discards): the data must be zero or intact.
        ring.deallocate(
            t,
            &[(off + 128 * 1024, 64 * 1024), (off + 192 * 1024, 64 * 1024)],
            2,
        )
        .unwrap();
        let c = one(&mut ring);
        assert_eq!(c.kind, OpKind::Deallocate);
        c.result.unwrap();
        let back = block_read(d, off + 128 * 1024, 128 * 1024);
        assert!(
            back.iter().all(|&b| b == 0) || back == data[128 * 1024..],
            "{}: deallocated range is neither zero nor the old data",
            d.serial
        );
        println!(
            "{}: deallocated range reads back {}",
            d.serial,
            if back.iter().all(|&b| b == 0) {
                "zeroed"
            } else {
                "unchanged (discard ignored by the backend)"
            }
        );
        // Ranges past the end are refused before submission (QEMU itself ignores them).
        let nlba = _ns.info().format.nlba;
        let e = ring
            .deallocate(t, &[(nlba * d.lba_size, 4096)], 3)
            .unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_out_of_range_and_oversize_rejected_then_decoded_when_forced() {
    require_testbed();
    let d = drive("data1");
    let (ns, mut ring, t) = open(&d);
    let i = ns.info().clone();
    let lba = u64::from(i.lba_size());
    // Rejected before submission, buffer handed back.
    let r = ring
        .read(
            t,
            i.capacity() - lba,
            Box::new(AlignedBuf::new(2 * lba as usize)),
            1,
        )
        .unwrap_err();
    assert!(matches!(r.error, Error::Invalid { .. }), "{}", r.error);
    assert!(
        r.error.to_string().contains("outside the namespace"),
        "{}",
        r.error
    );
    assert!(r.bufs.single().is_some());
    let r = ring
        .read(t, 1, Box::new(AlignedBuf::new(4096)), 1)
        .unwrap_err();
    assert!(
        r.error.to_string().contains("multiples of the LBA size"),
        "{}",
        r.error
    );
    let big = i.max_transfer as usize + 4096;
    let bufs: Vec<Box<dyn IoBuf>> = vec![Box::new(AlignedBuf::new(big))];
    let Rejected {
        error: e,
        bufs: back,
    } = ring.readv(t, 0, bufs, 1).unwrap_err();
    assert!(e.to_string().contains("max transfer"), "{e}");
    assert_eq!(back.len(), 1);
    // Misaligned buffer (would be bounced: a silent copy).
    let r = ring
        .read(
            t,
            0,
            Box::new(peerpipe_uring::Slice::new(AlignedBuf::new(8192), 2, 4096)),
            1,
        )
        .unwrap_err();
    assert!(r.error.to_string().contains("bounce"), "{}", r.error);
    // Vectored with an inner boundary off a page: the kernel would bounce, so refused.
    let bufs: Vec<Box<dyn IoBuf>> = vec![
        Box::new(peerpipe_uring::Slice::new(AlignedBuf::new(8192), 0, 2048)),
        Box::new(AlignedBuf::new(2048)),
    ];
    let Rejected {
        error: e,
        bufs: back,
    } = ring.readv(t, 0, bufs, 1).unwrap_err();
    assert!(e.to_string().contains("bounces"), "{e}");
    assert_eq!(back.len(), 2);
    assert_eq!(ring.in_flight(), 0);

    // Forced through as raw commands: the controller answers with a decoded status.
    ring.nvme_command(
        t,
        NvmeCommand::read(i.nsid, i.format.nlba, 1),
        Some(Box::new(AlignedBuf::new(lba as usize))),
        2,
    )
    .unwrap();
    let e = one(&mut ring).result.unwrap_err();
    let s = e
        .nvme_status()
        .unwrap_or_else(|| panic!("expected an NVMe status, got {e}"));
    assert!(s.is_generic(sc::LBA_OUT_OF_RANGE), "{e}");
    assert!(s.dnr());
    println!("out of range, forced: {e}");
    // NLB beyond MDTS while data_len stays small: the controller refuses (Invalid Field).
    let mdts = i.controller.mdts_bytes().expect("QEMU reports MDTS");
    let nlb = (mdts / lba + 1) as u32;
    let mut c = NvmeCommand::read(i.nsid, 0, nlb);
    c.cmd.data_len = 4096;
    ring.nvme_command(t, c, Some(Box::new(AlignedBuf::new(4096))), 3)
        .unwrap();
    let e = one(&mut ring).result.unwrap_err();
    let s = e
        .nvme_status()
        .unwrap_or_else(|| panic!("expected an NVMe status, got {e}"));
    assert!(s.is_generic(sc::INVALID_FIELD), "{e}");
    println!("oversize, forced: {e}");
    // A data_len bigger than the kernel allows: the kernel refuses with EINVAL.
    let huge = (i.sysfs_max_hw_bytes.unwrap() + 4096) as usize;
    let mut c = NvmeCommand::read(i.nsid, 0, (huge as u64 / lba) as u32);
    c.cmd.data_len = huge as u32;
    ring.nvme_command(t, c, Some(Box::new(AlignedBuf::new(huge))), 4)
        .unwrap();
    let e = one(&mut ring).result.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    // Raw Identify returns data and the command result.
    ring.nvme_command(
        t,
        NvmeCommand::identify_controller(),
        Some(Box::new(AlignedBuf::new(4096))),
        5,
    )
    .unwrap();
    let c = one(&mut ring);
    assert_eq!(c.result.unwrap(), 4096);
    let ctrl =
        peerpipe_uring::ControllerInfo::parse(bytes(&*c.bufs.into_single().unwrap())).unwrap();
    assert_eq!(ctrl.serial, "data1");
}

/// A p2pmem mapping as an I/O buffer (what the root crate adapts from p2p-alloc).
struct P2pBuf(P2pMap);

// SAFETY: the mapping lives as long as the value and does not move with it.
unsafe impl IoBuf for P2pBuf {
    fn as_ptr(&self) -> *const u8 {
        self.0.as_ptr()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

fn p2pmem_read(path: PathBuf, expect_errno: i32) {
    let d = drive("data2");
    let (_ns, mut ring, t) = open(&d);
    let len = 256 * 1024;
    let data = pattern(len, 77);
    block_write(&d, BASE + 16 * MIB, &data);
    let mut map = P2pBuf(P2pMap::new(&path, len));
    // Registration fails on this kernel; the ring reports it and uses the address unregistered.
    // SAFETY: the mapping outlives the ring's use of it (the ring is dropped first below).
    let e = unsafe { ring.register_buffer(map.as_mut_ptr(), len) }.unwrap_err();
    assert_eq!(e.errno(), Some(expect_errno), "{}: {e}", path.display());
    assert_eq!(ring.capabilities().unregistered_buffers.len(), 1);
    println!("{}", ring.capabilities());
    ring.read(t, BASE + 16 * MIB, Box::new(map), 1).unwrap();
    let c = one(&mut ring);
    assert_eq!(c.result.unwrap(), len);
    let map = c.bufs.into_single().unwrap();
    assert_eq!(
        bytes(&*map),
        &data[..],
        "{}: passthrough read into p2pmem",
        path.display()
    );
    drop(ring);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_passthrough_read_into_dev_p2pmem0() {
    require_testbed();
    p2pmem_read(PathBuf::from("/dev/p2pmem0"), libc::EREMOTEIO);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_passthrough_read_into_sysfs_allocate() {
    require_testbed();
    p2pmem_read(sysfs_allocate(), libc::EFAULT);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_iopoll_and_fixed_buffers() {
    require_testbed();
    let d = drive("data3");
    let ns = Namespace::open(&d.ng).unwrap();
    assert!(
        ns.has_poll_queues(),
        "testbed boots with nvme.poll_queues=1"
    );
    let mut ring: Ring = Ring::builder().iopoll(true).entries(32).build().unwrap();
    println!("{}", ring.capabilities());
    assert_eq!(ring.capabilities().iopoll, Feature::On);
    assert_eq!(ring.capabilities().fixed_buffers, Feature::On);
    assert_eq!(ring.capabilities().registered_files, Feature::On);
    let t = ring.add_namespace(&ns).unwrap();
    let data = pattern(128 * 1024, 5);
    let mut b = AlignedBuf::new(data.len());
    b.copy_from_slice(&data);
    // SAFETY: `b` is handed to the ring and only dropped after unregister_buffers.
    unsafe { ring.register_buffer(b.as_mut_ptr(), b.len()) }.unwrap();
    ring.write(t, BASE + 32 * MIB, b, 1).unwrap();
    let mut out = Vec::new();
    ring.wait(1, &mut out).unwrap();
    let c = out.pop().unwrap();
    assert_eq!(c.result.unwrap(), data.len());
    let mut b = c.bufs.into_single().unwrap();
    b.fill(0);
    ring.read(t, BASE + 32 * MIB, b, 2).unwrap();
    ring.wait(1, &mut out).unwrap();
    let c = out.pop().unwrap();
    assert_eq!(c.result.unwrap(), data.len());
    let b = c.bufs.into_single().unwrap();
    assert_eq!(&b[..], &data[..], "polled fixed-buffer read");
    assert_eq!(block_read(&d, BASE + 32 * MIB, data.len()), data);
    ring.unregister_buffers().unwrap();
    drop(b);
    // Many in flight, reaped by polling.
    for i in 0..32u64 {
        ring.read(t, i * 4096, AlignedBuf::new(4096), i).unwrap();
    }
    let mut got = 0;
    while got < 32 {
        got += ring.wait(32 - got, &mut out).unwrap();
    }
    assert!(out
        .iter()
        .all(|c| c.result.as_ref().is_ok_and(|&n| n == 4096)));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_block_device_file_backend() {
    require_testbed();
    let d = drive("data3");
    let f = FileTarget::open(
        &d.block,
        FileOptions {
            write: true,
            create: false,
            direct: true,
        },
    )
    .unwrap();
    assert!(f.is_block_device());
    assert_eq!(f.size(), 1 << 30);
    let mut ring: AnyRing = Ring::new().unwrap();
    let t = ring.add_file(&f).unwrap();
    let data = pattern(64 * 1024, 9);
    ring.write(t, BASE + 40 * MIB, host(&data), 1).unwrap();
    one(&mut ring).result.unwrap();
    ring.flush(t, 2).unwrap();
    one(&mut ring).result.unwrap();
    let (_ns, mut pring, pt) = open(&d);
    pring
        .read(
            pt,
            BASE + 40 * MIB,
            Box::new(AlignedBuf::new(data.len())),
            3,
        )
        .unwrap();
    let c = one(&mut pring);
    assert_eq!(
        bytes(&*c.bufs.into_single().unwrap()),
        &data[..],
        "block write seen by passthrough"
    );
    let r = ring
        .read(t, (1 << 30) - 4096, Box::new(AlignedBuf::new(8192)), 4)
        .unwrap_err();
    assert!(
        r.error.to_string().contains("outside the block device"),
        "{}",
        r.error
    );
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_uring_drop_with_passthrough_in_flight() {
    require_testbed();
    let d = drive("data1");
    let ns = Namespace::open(&d.ng).unwrap();
    for submit in [false, true] {
        let mut ring: Ring = Ring::builder().entries(32).build().unwrap();
        let t = ring.add_namespace(&ns).unwrap();
        for i in 0..32u64 {
            ring.read(t, i * 131072, AlignedBuf::new(131072), i)
                .unwrap();
        }
        if submit {
            ring.submit().unwrap();
        }
        assert_eq!(ring.in_flight(), 32);
        let start = std::time::Instant::now();
        drop(ring); // waits for the 32 reads before their buffers are freed
        println!(
            "drop with 32 x 128 KiB in flight (submitted: {submit}): {:?}",
            start.elapsed()
        );
    }
    // The device is still fine afterwards.
    let (_ns, mut ring, t) = open(&d);
    ring.read(t, 0, Box::new(AlignedBuf::new(4096)), 1).unwrap();
    one(&mut ring).result.unwrap();
}
