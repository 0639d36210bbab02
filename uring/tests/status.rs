//! NVMe status and errno decoding.

use peerpipe_uring::{ControllerInfo, LbaFormat, NamespaceInfo};
use peerpipe_uring::{Errno, Error, NvmeStatus};

#[test]
fn decodes_lba_out_of_range_with_dnr() {
    // Kernel passthrough res: (CQE status >> 1) = DNR | SCT 0 | SC 0x80.
    let s = NvmeStatus::from_res(0x4080);
    assert_eq!(s.sct(), 0);
    assert_eq!(s.sc(), 0x80);
    assert!(s.dnr());
    assert!(!s.more());
    assert_eq!(s.name(), Some("LBA Out of Range"));
    assert!(s.is_generic(peerpipe_uring::sc::LBA_OUT_OF_RANGE));
    let e = Error::Nvme {
        op: "read",
        status: s,
    };
    let text = e.to_string();
    assert!(
        text.contains("read") && text.contains("LBA Out of Range") && text.contains("DNR"),
        "{text}"
    );
    assert!(text.contains("namespace"), "says what to do: {text}");
    assert_eq!(e.nvme_status(), Some(s));
}

#[test]
fn decodes_fields() {
    let s = NvmeStatus::from_res(0x2000 | 0x0281 | 0x1800);
    assert_eq!(s.sct(), 2);
    assert_eq!(s.sc(), 0x81);
    assert_eq!(s.crd(), 3);
    assert!(s.more());
    assert!(!s.dnr());
    assert_eq!(s.name(), Some("Unrecovered Read Error"));
    assert_eq!(
        NvmeStatus::from_res(0x4002).name(),
        Some("Invalid Field in Command")
    );
    assert_eq!(
        NvmeStatus::from_res(0x0001).name(),
        Some("Invalid Command Opcode")
    );
    assert_eq!(NvmeStatus::from_res(0x0370).name(), Some("Host Path Error"));
    assert_eq!(NvmeStatus::from_res(0x07ff).name(), None);
    assert!(NvmeStatus::from_res(0x07ff).to_string().contains("unknown"));
}

#[test]
fn errno_errors_carry_op_errno_and_hint() {
    let e = Error::Os {
        op: "io_uring_register_buffers",
        errno: Errno(libc::EREMOTEIO),
    };
    assert_eq!(e.errno(), Some(libc::EREMOTEIO));
    assert_eq!(e.op(), "io_uring_register_buffers");
    let t = e.to_string();
    assert!(
        t.contains("io_uring_register_buffers") && t.contains("unregistered"),
        "{t}"
    );
    let t = Error::Os {
        op: "read",
        errno: Errno(libc::EINVAL),
    }
    .to_string();
    assert!(t.contains("alignment"), "{t}");
}

fn identify_ns(nsze: u64, nlbaf: u8, flbas: u8, formats: &[(u8, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; 4096];
    d[0..8].copy_from_slice(&nsze.to_le_bytes());
    d[25] = nlbaf;
    d[26] = flbas;
    for &(i, v) in formats {
        let o = 128 + 4 * i as usize;
        d[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    d
}

#[test]
fn lba_format_low_bits() {
    // Format 1: LBADS 12 (4096), no metadata.
    let d = identify_ns(1000, 3, 0x01, &[(0, 9 << 16), (1, 12 << 16)]);
    let f = LbaFormat::parse(&d).unwrap();
    assert_eq!(
        (f.nlba, f.index, f.lba_size, f.metadata_size, f.extended_lba),
        (1000, 1, 4096, 0, false)
    );
}

#[test]
fn lba_format_high_bits_when_more_than_16_formats() {
    // NLBAF 63 (64 formats); FLBAS low nibble 2, bits 6:5 = 01 -> index 0x12 = 18.
    let d = identify_ns(10, 63, 0x02 | (1 << 5), &[(2, 9 << 16), (18, 12 << 16)]);
    let f = LbaFormat::parse(&d).unwrap();
    assert_eq!(f.index, 18);
    assert_eq!(f.lba_size, 4096);
    // With 16 formats or fewer, bits 6:5 are reserved and ignored.
    let d = identify_ns(10, 15, 0x02 | (1 << 5), &[(2, 9 << 16)]);
    let f = LbaFormat::parse(&d).unwrap();
    assert_eq!((f.index, f.lba_size), (2, 512));
}

#[test]
fn lba_format_rejects_nonsense() {
    assert!(
        LbaFormat::parse(&identify_ns(10, 0, 0x01, &[(0, 9 << 16)])).is_err(),
        "index > nlbaf"
    );
    assert!(
        LbaFormat::parse(&identify_ns(10, 0, 0x00, &[(0, 0)])).is_err(),
        "LBADS 0"
    );
    assert!(LbaFormat::parse(&[0u8; 100]).is_err());
}

fn ctrl(mdts: u8) -> ControllerInfo {
    let mut d = vec![0u8; 4096];
    d[4..8].copy_from_slice(b"ser1");
    d[8..24].fill(b' ');
    d[24..29].copy_from_slice(b"model");
    d[77] = mdts;
    d[520] = 0x0c;
    d[525] = 1;
    ControllerInfo::parse(&d).unwrap()
}

#[test]
fn controller_fields_and_limits() {
    let c = ctrl(7);
    assert_eq!(c.serial, "ser1");
    assert_eq!(c.model, "model");
    assert!(c.volatile_write_cache);
    assert!(c.supports_dsm() && c.supports_write_zeroes());
    assert_eq!(c.mdts_bytes(), Some(512 * 1024));
    assert_eq!(ctrl(0).mdts_bytes(), None);
    let f = LbaFormat::parse(&identify_ns(2048, 0, 0, &[(0, 9 << 16)])).unwrap();
    // max transfer: min(MDTS 512K, max_hw 256K, 128 segments * 4K).
    let i = NamespaceInfo::new(1, f, c.clone(), Some(256 * 1024), Some(128), 4).unwrap();
    assert_eq!(i.max_transfer, 256 * 1024);
    assert_eq!(i.capacity(), 2048 * 512);
    let i = NamespaceInfo::new(1, f, ctrl(0), None, None, 4).unwrap();
    assert_eq!(i.max_transfer as u64, 65536 * 512, "NLB field bound");
}

#[test]
fn metadata_formats_are_refused() {
    let c = ctrl(7);
    let f = LbaFormat::parse(&identify_ns(10, 1, 0x11, &[(1, (12 << 16) | 8)])).unwrap();
    assert!(f.extended_lba);
    let e = NamespaceInfo::new(1, f, c.clone(), None, None, 4).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }));
    assert!(e.to_string().contains("extended LBAs"), "{e}");
    let f = LbaFormat::parse(&identify_ns(10, 1, 0x01, &[(1, (12 << 16) | 8)])).unwrap();
    let e = NamespaceInfo::new(1, f, c, None, None, 4).unwrap_err();
    assert!(e.to_string().contains("separate metadata"), "{e}");
}

#[test]
fn block_path_maps_to_char_device() {
    use peerpipe_uring::char_device_path;
    use std::path::Path;
    assert_eq!(
        char_device_path(Path::new("/dev/nvme1n1")),
        Path::new("/dev/ng1n1")
    );
    assert_eq!(
        char_device_path(Path::new("/dev/ng2n3")),
        Path::new("/dev/ng2n3")
    );
    assert_eq!(
        char_device_path(Path::new("/dev/nvme0")),
        Path::new("/dev/nvme0")
    );
}
