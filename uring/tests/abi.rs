//! The ABI mirror checked against the installed kernel header (<linux/nvme_ioctl.h>, compiled
//! with the host C compiler) and the exact bytes of commands and SQEs.

use peerpipe_uring::abi::{self, NvmeUringCmd};
use peerpipe_uring::NvmeCommand;
use peerpipe_uring::{dsm_ranges, uring_cmd_sqe, Direction, FileRef};
use std::mem::{offset_of, size_of};
use std::process::Command;

/// Compiles a C program against the kernel header and returns its `name value` lines.
fn kernel_header_facts() -> Vec<(String, u64)> {
    let dir = std::env::temp_dir().join(format!("peerpipe-uring-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("abi.c");
    let exe = dir.join("abi");
    std::fs::write(
        &src,
        r#"
#include <stdio.h>
#include <stddef.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/nvme_ioctl.h>
#define OFF(f) printf(#f " %zu\n", offsetof(struct nvme_uring_cmd, f))
int main(void) {
    printf("size %zu\n", sizeof(struct nvme_uring_cmd));
    OFF(opcode); OFF(flags); OFF(rsvd1); OFF(nsid); OFF(cdw2); OFF(cdw3); OFF(metadata);
    OFF(addr); OFF(metadata_len); OFF(data_len); OFF(cdw10); OFF(cdw11); OFF(cdw12);
    OFF(cdw13); OFF(cdw14); OFF(cdw15); OFF(timeout_ms); OFF(rsvd2);
    printf("NVME_URING_CMD_IO %lu\n", (unsigned long)NVME_URING_CMD_IO);
    printf("NVME_URING_CMD_IO_VEC %lu\n", (unsigned long)NVME_URING_CMD_IO_VEC);
    printf("NVME_URING_CMD_ADMIN %lu\n", (unsigned long)NVME_URING_CMD_ADMIN);
    printf("NVME_URING_CMD_ADMIN_VEC %lu\n", (unsigned long)NVME_URING_CMD_ADMIN_VEC);
    printf("NVME_IOCTL_ID %lu\n", (unsigned long)NVME_IOCTL_ID);
    return 0;
}
"#,
    )
    .unwrap();
    let cc = Command::new("cc")
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("a C compiler (`cc`) is needed to check the ABI against the kernel header");
    assert!(
        cc.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn nvme_uring_cmd_matches_kernel_header() {
    let facts = kernel_header_facts();
    let get = |k: &str| {
        facts
            .iter()
            .find(|(n, _)| n == k)
            .unwrap_or_else(|| panic!("{k}"))
            .1
    };
    assert_eq!(get("size"), 72);
    assert_eq!(size_of::<NvmeUringCmd>() as u64, get("size"));
    let ours = [
        ("opcode", offset_of!(NvmeUringCmd, opcode)),
        ("flags", offset_of!(NvmeUringCmd, flags)),
        ("rsvd1", offset_of!(NvmeUringCmd, rsvd1)),
        ("nsid", offset_of!(NvmeUringCmd, nsid)),
        ("cdw2", offset_of!(NvmeUringCmd, cdw2)),
        ("cdw3", offset_of!(NvmeUringCmd, cdw3)),
        ("metadata", offset_of!(NvmeUringCmd, metadata)),
        ("addr", offset_of!(NvmeUringCmd, addr)),
        ("metadata_len", offset_of!(NvmeUringCmd, metadata_len)),
        ("data_len", offset_of!(NvmeUringCmd, data_len)),
        ("cdw10", offset_of!(NvmeUringCmd, cdw10)),
        ("cdw11", offset_of!(NvmeUringCmd, cdw11)),
        ("cdw12", offset_of!(NvmeUringCmd, cdw12)),
        ("cdw13", offset_of!(NvmeUringCmd, cdw13)),
        ("cdw14", offset_of!(NvmeUringCmd, cdw14)),
        ("cdw15", offset_of!(NvmeUringCmd, cdw15)),
        ("timeout_ms", offset_of!(NvmeUringCmd, timeout_ms)),
        ("rsvd2", offset_of!(NvmeUringCmd, rsvd2)),
    ];
    for (name, off) in ours {
        assert_eq!(off as u64, get(name), "offset of {name}");
    }
    assert_eq!(u64::from(abi::NVME_URING_CMD_IO), get("NVME_URING_CMD_IO"));
    assert_eq!(
        u64::from(abi::NVME_URING_CMD_IO_VEC),
        get("NVME_URING_CMD_IO_VEC")
    );
    assert_eq!(
        u64::from(abi::NVME_URING_CMD_ADMIN),
        get("NVME_URING_CMD_ADMIN")
    );
    assert_eq!(
        u64::from(abi::NVME_URING_CMD_ADMIN_VEC),
        get("NVME_URING_CMD_ADMIN_VEC")
    );
    assert_eq!(u64::from(abi::NVME_IOCTL_ID), get("NVME_IOCTL_ID"));
    assert_eq!(abi::NVME_URING_CMD_IO, 0xC048_4E80);
}

/// `to_bytes` agrees with the in-memory layout of the repr(C) struct.
#[test]
fn to_bytes_is_the_memory_layout() {
    let c = NvmeUringCmd {
        opcode: 1,
        flags: 2,
        rsvd1: 0x0403,
        nsid: 0x08070605,
        cdw2: 0x0c0b0a09,
        cdw3: 0x100f0e0d,
        metadata: 0x1817161514131211,
        addr: 0x201f1e1d1c1b1a19,
        metadata_len: 0x24232221,
        data_len: 0x28272625,
        cdw10: 0x2c2b2a29,
        cdw11: 0x302f2e2d,
        cdw12: 0x34333231,
        cdw13: 0x38373635,
        cdw14: 0x3c3b3a39,
        cdw15: 0x403f3e3d,
        timeout_ms: 0x44434241,
        rsvd2: 0x48474645,
    };
    let bytes = c.to_bytes();
    let expect: Vec<u8> = (1..=72).collect();
    assert_eq!(&bytes[..], &expect[..]);
    // SAFETY: NvmeUringCmd is repr(C), 72 bytes, no padding (checked above).
    let mem: [u8; 72] = unsafe { std::mem::transmute(c) };
    assert_eq!(mem, bytes);
}

fn dw(b: &[u8; 72], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn read_write_bytes() {
    let r = NvmeCommand::read(3, 0x1122_3344_5566_7788, 8);
    let b = r.cmd.to_bytes();
    assert_eq!(b[0], 0x02);
    assert_eq!(dw(&b, 4), 3);
    assert_eq!(dw(&b, 40), 0x5566_7788);
    assert_eq!(dw(&b, 44), 0x1122_3344);
    assert_eq!(dw(&b, 48), 7, "NLB is 0-based");
    assert_eq!(r.direction(), Direction::FromDevice);
    let w = NvmeCommand::write(1, 5, 65536);
    let b = w.cmd.to_bytes();
    assert_eq!(b[0], 0x01);
    assert_eq!(dw(&b, 40), 5);
    assert_eq!(dw(&b, 48), 0xffff);
    assert_eq!(w.direction(), Direction::ToDevice);
    assert_eq!(w.queue.cmd_op(false), 0xC048_4E80);
}

#[test]
fn flush_write_zeroes_dsm_identify_bytes() {
    let f = NvmeCommand::flush(9).cmd.to_bytes();
    assert_eq!(f[0], 0);
    assert_eq!(dw(&f, 4), 9);
    assert!(f[8..].iter().all(|&x| x == 0));

    let z = NvmeCommand::write_zeroes(1, 0x1_0000_0002, 16, true)
        .cmd
        .to_bytes();
    assert_eq!(z[0], 0x08);
    assert_eq!(dw(&z, 40), 2);
    assert_eq!(dw(&z, 44), 1);
    assert_eq!(dw(&z, 48), 15 | (1 << 25), "NLB 0-based + DEAC");

    let d = NvmeCommand::deallocate(2, 3);
    let b = d.cmd.to_bytes();
    assert_eq!(b[0], 0x09);
    assert_eq!(dw(&b, 40), 2, "NR is 0-based");
    assert_eq!(dw(&b, 44), 1 << 2, "AD attribute");
    assert_eq!(d.direction(), Direction::ToDevice);
    let mut ranges = [0u8; 32];
    dsm_ranges(&[(0x0102_0304_0506_0708, 9), (1, 2)], &mut ranges);
    assert_eq!(&ranges[0..4], &[0, 0, 0, 0]);
    assert_eq!(&ranges[4..8], &9u32.to_le_bytes());
    assert_eq!(&ranges[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&ranges[20..24], &2u32.to_le_bytes());

    let ic = NvmeCommand::identify_controller();
    assert_eq!(ic.queue.cmd_op(false), 0xC048_4E82);
    let b = ic.cmd.to_bytes();
    assert_eq!(b[0], 0x06);
    assert_eq!(dw(&b, 4), 0);
    assert_eq!(dw(&b, 40), 1);
    let ins = NvmeCommand::identify_namespace(4).cmd.to_bytes();
    assert_eq!(dw(&ins, 4), 4);
    assert_eq!(dw(&ins, 40), 0);
    assert_eq!(
        NvmeCommand::identify_controller().direction(),
        Direction::FromDevice
    );
}

fn sqe_bytes(e: io_uring::squeue::Entry128) -> [u8; 128] {
    assert_eq!(size_of::<io_uring::squeue::Entry128>(), 128);
    // SAFETY: Entry128 is repr(C): a 64-byte io_uring_sqe followed by 64 bytes.
    unsafe { std::mem::transmute(e) }
}

#[test]
fn sqe_bytes_for_passthrough() {
    let mut c = NvmeCommand::read(1, 0x42, 8);
    c.cmd.addr = 0xdead_b000;
    c.cmd.data_len = 4096;
    let b = sqe_bytes(uring_cmd_sqe(FileRef::Fd(7), false, &c, None));
    assert_eq!(b[0], abi::IORING_OP_URING_CMD);
    assert_eq!(b[1], 0, "no IOSQE flags for a plain fd");
    assert_eq!(i32::from_le_bytes(b[4..8].try_into().unwrap()), 7, "fd");
    assert_eq!(
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        abi::NVME_URING_CMD_IO
    );
    assert_eq!(
        u32::from_le_bytes(b[28..32].try_into().unwrap()),
        0,
        "uring_cmd_flags"
    );
    assert_eq!(
        &b[48..120],
        &c.cmd.to_bytes()[..],
        "nvme_uring_cmd in the SQE cmd area"
    );
    assert!(b[120..].iter().all(|&x| x == 0));

    let b = sqe_bytes(uring_cmd_sqe(FileRef::Fixed(3), true, &c, Some(5)));
    assert_eq!(b[1] & 1, 1, "IOSQE_FIXED_FILE");
    assert_eq!(
        i32::from_le_bytes(b[4..8].try_into().unwrap()),
        3,
        "registered file index"
    );
    assert_eq!(
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        abi::NVME_URING_CMD_IO_VEC
    );
    assert_eq!(
        u32::from_le_bytes(b[28..32].try_into().unwrap()),
        abi::IORING_URING_CMD_FIXED
    );
    assert_eq!(
        u16::from_le_bytes(b[40..42].try_into().unwrap()),
        5,
        "buf_index"
    );
}
