//! The testbed itself: devices present, fabric up, peer tools working, and the p2pmem
//! capability matrix of the testbed kernel (its three patches). A kernel change that moves a
//! cell of the matrix shows up here as a failing test.
//!
//! These tests talk to the kernel directly (rdma-sys, io-uring, libc) on purpose: they
//! check the platform the library stands on, not the library.

use peerpipe_testbed::*;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1 << 20;
const CMB_BYTES: u64 = 64 << 20;

/// The sysfs p2pmem directories of all providers.
fn sysfs_providers() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/sys/bus/pci/devices")
        .expect("sysfs")
        .flatten()
        .map(|e| e.path().join("p2pmem"))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

fn read_u64(p: PathBuf) -> u64 {
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn p2pmem_char_device_and_sysfs_provider_are_64_mib() {
    require_testbed();
    let providers = sysfs_providers();
    assert_eq!(
        providers.len(),
        1,
        "one provider (the CMB drive): {providers:?}"
    );
    let dir = &providers[0];
    assert_eq!(read_u64(dir.join("size")), CMB_BYTES);
    assert_eq!(read_u64(dir.join("published")), 1);
    assert!(dir.join("allocate").exists());

    let meta = std::fs::metadata("/dev/p2pmem0").expect("/dev/p2pmem0");
    assert!(meta.file_type().is_char_device());
    // The char device belongs to the same PCI function as the sysfs provider.
    let cdev_pci = std::fs::canonicalize("/sys/class/misc/p2pmem0/device").expect("misc parent");
    assert_eq!(
        cdev_pci,
        std::fs::canonicalize(dir.parent().unwrap()).unwrap()
    );
    // ... and that function is the NVMe controller with serial p2p0.
    let serial = std::fs::read_to_string(
        std::fs::read_dir(cdev_pci.join("nvme"))
            .expect("nvme class dir under the provider")
            .flatten()
            .next()
            .expect("controller")
            .path()
            .join("serial"),
    )
    .unwrap();
    assert_eq!(serial.trim(), "p2p0");
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn every_drive_has_a_passthrough_char_device() {
    require_testbed();
    let drives = drives();
    assert_eq!(drives.len(), drive_count(), "{drives:?}");
    for d in &drives {
        let m = std::fs::metadata(&d.ng).unwrap_or_else(|e| panic!("{}: {e}", d.ng.display()));
        assert!(m.file_type().is_char_device(), "{}", d.ng.display());
        assert!(d.ng.to_string_lossy().ends_with("n1"));
    }
    assert!(drives.iter().any(|d| d.serial == "p2p0"));
    assert!(drives.iter().any(|d| d.serial == "data1"));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn rxe_ports_are_active() {
    require_testbed();
    for dev in ["rxe0", "rxe1"] {
        let state = std::fs::read_to_string(format!("/sys/class/infiniband/{dev}/ports/1/state"))
            .unwrap_or_else(|e| panic!("{dev}: {e}"));
        assert!(state.contains("ACTIVE"), "{dev}: {state}");
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn rping_round_trip_between_rxe0_and_rxe1() {
    require_testbed();
    let (a0, a1) = addrs();
    let server = spawn(Command::new("rping").args(["-s", "-a", &a1, "-C", "4", "-v"]));
    std::thread::sleep(Duration::from_millis(500));
    let client = run(
        Command::new("rping").args(["-c", "-I", &a0, "-a", &a1, "-C", "4", "-S", "64", "-v"]),
        Duration::from_secs(60),
    );
    let server = wait(server, Duration::from_secs(30), "rping -s");
    assert!(client.status.success(), "client: {}", text(&client));
    assert!(server.status.success(), "server: {}", text(&server));
    let out = String::from_utf8_lossy(&client.stdout);
    assert_eq!(out.matches("ping data: rdma-ping-").count(), 4, "{out}");
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn ib_write_bw_into_dev_p2pmem0_completes() {
    require_testbed();
    let (a0, a1) = addrs();
    let common = ["-R", "-F", "-s", "65536", "-n", "200", "-p", "18515"];
    let server = spawn(
        Command::new("ib_write_bw")
            .args(["-d", "rxe1"])
            .args(common)
            .arg("--mmap=/dev/p2pmem0"),
    );
    std::thread::sleep(Duration::from_secs(1));
    let client = run(
        Command::new("ib_write_bw")
            .args(["-d", "rxe0"])
            .args(common)
            .args(["--source_ip", &a0, &a1]),
        Duration::from_secs(120),
    );
    let server = wait(server, Duration::from_secs(30), "ib_write_bw server");
    assert!(client.status.success(), "client: {}", text(&client));
    assert!(server.status.success(), "server: {}", text(&server));
    // The result row: "#bytes #iterations BW peak BW average MsgRate".
    let out = String::from_utf8_lossy(&client.stdout);
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with("65536"))
        .unwrap_or_else(|| panic!("no result row:\n{out}"));
    let bw_avg: f64 = row.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(bw_avg > 0.0, "{row}");
    println!("ib_write_bw 64 KiB into /dev/p2pmem0: {bw_avg} MB/s");
}

// ---- the p2pmem capability matrix -------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Iface {
    /// `/dev/p2pmem0` (testbed patch 0003).
    CharDev,
    /// `/sys/bus/pci/devices/<bdf>/p2pmem/allocate` (upstream).
    Sysfs,
}

/// A fresh p2pmem allocation through `iface`.
fn p2p_map(iface: Iface, len: usize) -> P2pMap {
    match iface {
        Iface::CharDev => P2pMap::new(Path::new("/dev/p2pmem0"), len),
        Iface::Sysfs => P2pMap::new(&sysfs_allocate(), len),
    }
}

/// Host memory aligned for O_DIRECT.
struct HostBuf(*mut u8, usize);
impl HostBuf {
    fn new(len: usize) -> HostBuf {
        let mut p = std::ptr::null_mut();
        // SAFETY: posix_memalign with a power-of-two alignment.
        assert_eq!(unsafe { libc::posix_memalign(&mut p, 4096, len) }, 0);
        HostBuf(p.cast(), len)
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: owned allocation of self.1 bytes.
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}
impl Drop for HostBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by posix_memalign.
        unsafe { libc::free(self.0.cast()) }
    }
}

const IO_BYTES: usize = 64 * 1024;

fn pattern(seed: u8) -> Vec<u8> {
    (0..IO_BYTES)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Writes `data` at offset 0 of the drive through its block device with O_DIRECT.
fn write_block_dev(drive: &Drive, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&drive.block)
        .expect("open block device");
    let mut buf = HostBuf::new(data.len());
    buf.bytes().copy_from_slice(data);
    // SAFETY: buf is live and data.len() bytes long.
    let n = unsafe { libc::pwrite(f.as_raw_fd(), buf.0.cast(), data.len(), 0) };
    assert_eq!(
        n,
        data.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    f.sync_all().unwrap();
}

fn cpu_access(iface: Iface) {
    let mut m = p2p_map(iface, MIB);
    let p = pattern(7);
    for chunk in m.bytes().chunks_mut(IO_BYTES) {
        chunk.copy_from_slice(&p);
    }
    assert!(m.bytes().chunks(IO_BYTES).all(|c| c == p.as_slice()));
}

fn o_direct_pread(iface: Iface) {
    let drive = drive("data1");
    let p = pattern(0x5a);
    write_block_dev(&drive, &p);
    let mut m = p2p_map(iface, MIB);
    m.bytes().fill(0);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&drive.block)
        .unwrap();
    // SAFETY: m maps at least IO_BYTES bytes and outlives the call.
    let n = unsafe { libc::pread(f.as_raw_fd(), m.as_mut_ptr().cast(), IO_BYTES, 0) };
    assert_eq!(n, IO_BYTES as isize, "{}", std::io::Error::last_os_error());
    assert_eq!(&m.bytes()[..IO_BYTES], p.as_slice());
}

/// `NVME_URING_CMD_IO`: `_IOWR('N', 0x80, struct nvme_uring_cmd)` (72 bytes).
const NVME_URING_CMD_IO: u32 = 0xC048_4E80;
/// `NVME_IOCTL_ID`: `_IO('N', 0x40)`.
const NVME_IOCTL_ID: libc::c_ulong = 0x4E40;

fn passthrough_read(iface: Iface) {
    use io_uring::{cqueue, opcode, squeue, types, IoUring};
    let drive = drive("data1");
    let p = pattern(0xc3);
    write_block_dev(&drive, &p);
    let mut m = p2p_map(iface, MIB);
    m.bytes().fill(0);

    let ng = File::open(&drive.ng).unwrap();
    // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id.
    let nsid = unsafe { libc::ioctl(ng.as_raw_fd(), NVME_IOCTL_ID as _) };
    assert!(
        nsid > 0,
        "NVME_IOCTL_ID: {}",
        std::io::Error::last_os_error()
    );
    let nlb = (IO_BYTES as u64 / drive.lba_size) as u32;

    // struct nvme_uring_cmd: opcode, flags, rsvd1, nsid, cdw2, cdw3, metadata, addr,
    // metadata_len, data_len, cdw10..cdw15, timeout_ms, rsvd2.
    let mut cmd = [0u8; 80];
    cmd[0] = 0x02; // NVMe Read
    cmd[4..8].copy_from_slice(&(nsid as u32).to_le_bytes());
    cmd[24..32].copy_from_slice(&(m.as_mut_ptr() as u64).to_le_bytes());
    cmd[36..40].copy_from_slice(&(IO_BYTES as u32).to_le_bytes());
    // cdw10/11 = starting LBA 0; cdw12 = number of LBAs - 1.
    cmd[48..52].copy_from_slice(&(nlb - 1).to_le_bytes());

    let mut ring: IoUring<squeue::Entry128, cqueue::Entry32> = IoUring::builder()
        .build(4)
        .expect("io_uring with big SQEs/CQEs");
    let sqe = opcode::UringCmd80::new(types::Fd(ng.as_raw_fd()), NVME_URING_CMD_IO)
        .cmd(cmd)
        .build()
        .user_data(1);
    // SAFETY: the buffer (m) and the fd outlive the submission: we wait for the completion.
    unsafe { ring.submission().push(&sqe).expect("sq has room") };
    ring.submit_and_wait(1).expect("submit");
    let cqe = ring.completion().next().expect("a completion");
    assert_eq!(
        cqe.result(),
        0,
        "passthrough read result (errno<0, NVMe status>0)"
    );
    assert_eq!(&m.bytes()[..IO_BYTES], p.as_slice());
}

/// `ibv_reg_mr` on rxe0 over a p2pmem mapping: Ok, or the errno.
fn reg_mr(iface: Iface) -> Result<(), i32> {
    use rdma_sys::*;
    let mut m = p2p_map(iface, MIB);
    // SAFETY: plain verbs calls on objects created and destroyed here, in order.
    unsafe {
        let mut n = 0;
        let list = ibv_get_device_list(&mut n);
        assert!(!list.is_null() && n > 0, "no RDMA devices");
        let dev = (0..n as usize)
            .map(|i| *list.add(i))
            .find(|d| CStr::from_ptr(ibv_get_device_name(*d)).to_bytes() == b"rxe0")
            .expect("rxe0");
        let ctx = ibv_open_device(dev);
        ibv_free_device_list(list);
        assert!(!ctx.is_null());
        let pd = ibv_alloc_pd(ctx);
        assert!(!pd.is_null());
        let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0 as i32;
        let mr = ibv_reg_mr(pd, m.as_mut_ptr().cast(), m.len(), access);
        let result = if mr.is_null() {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            ibv_dereg_mr(mr);
            Ok(())
        };
        ibv_dealloc_pd(pd);
        ibv_close_device(ctx);
        result
    }
}

/// `io_uring_register_buffers` over a p2pmem mapping: Ok, or the errno.
fn register_buffer(iface: Iface) -> Result<(), i32> {
    let mut m = p2p_map(iface, MIB);
    let ring = io_uring::IoUring::new(4).unwrap();
    let iov = libc::iovec {
        iov_base: m.as_mut_ptr().cast(),
        iov_len: m.len(),
    };
    // SAFETY: the mapping outlives the registration (unregistered when the ring drops first).
    let r = unsafe { ring.submitter().register_buffers(&[iov]) };
    drop(ring);
    r.map_err(|e| e.raw_os_error().unwrap_or(0))
}

macro_rules! matrix_cell {
    ($name:ident, $body:expr) => {
        #[test]
        #[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
        fn $name() {
            require_testbed();
            $body;
        }
    };
}

matrix_cell!(dev_p2pmem_cpu_access_works, cpu_access(Iface::CharDev));
matrix_cell!(sysfs_allocate_cpu_access_works, cpu_access(Iface::Sysfs));
matrix_cell!(
    dev_p2pmem_o_direct_pread_works,
    o_direct_pread(Iface::CharDev)
);
matrix_cell!(
    sysfs_allocate_o_direct_pread_works,
    o_direct_pread(Iface::Sysfs)
);
matrix_cell!(
    dev_p2pmem_nvme_passthrough_read_works,
    passthrough_read(Iface::CharDev)
);
matrix_cell!(
    sysfs_allocate_nvme_passthrough_read_works,
    passthrough_read(Iface::Sysfs)
);
matrix_cell!(
    dev_p2pmem_ibv_reg_mr_works,
    assert_eq!(reg_mr(Iface::CharDev), Ok(()))
);
matrix_cell!(
    sysfs_allocate_ibv_reg_mr_fails_efault,
    assert_eq!(reg_mr(Iface::Sysfs), Err(libc::EFAULT))
);
matrix_cell!(
    dev_p2pmem_io_uring_register_buffers_fails_eremoteio,
    assert_eq!(register_buffer(Iface::CharDev), Err(libc::EREMOTEIO))
);
matrix_cell!(
    sysfs_allocate_io_uring_register_buffers_fails_efault,
    assert_eq!(register_buffer(Iface::Sysfs), Err(libc::EFAULT))
);

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn p2pmem_available_returns_after_unmap() {
    require_testbed();
    let avail = || read_u64(sysfs_providers()[0].join("available"));
    let before = avail();
    {
        let _a = p2p_map(Iface::CharDev, 4 * MIB);
        let _b = p2p_map(Iface::Sysfs, 2 * MIB);
        assert_eq!(avail(), before - 6 * MIB as u64);
    }
    assert_eq!(avail(), before);
}
