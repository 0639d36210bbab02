//! Mirror of the kernel ABI this crate speaks: `struct nvme_uring_cmd` and the ioctl/uring
//! command numbers from `<linux/nvme_ioctl.h>`, NVMe opcodes, and the io_uring constants the
//! `io-uring` crate does not name. Checked against the installed kernel header by the tests.

/// `struct nvme_uring_cmd` (72 bytes): the command payload carried in the 80-byte `cmd` area of
/// a 128-byte SQE for `IORING_OP_URING_CMD` on an NVMe char device.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmeUringCmd {
    /// NVMe opcode (CDW0 bits 7:0).
    pub opcode: u8,
    /// CDW0 flags (fused operation / PSDT); the kernel requires 0.
    pub flags: u8,
    /// Reserved, must be 0.
    pub rsvd1: u16,
    /// Namespace ID.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// User address of the metadata buffer (0: none).
    pub metadata: u64,
    /// User address of the data buffer (or of an iovec array for the `_VEC` variants).
    pub addr: u64,
    /// Metadata length in bytes.
    pub metadata_len: u32,
    /// Data length in bytes (or number of iovecs for the `_VEC` variants).
    pub data_len: u32,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
    /// Timeout in milliseconds (0: the driver default).
    pub timeout_ms: u32,
    /// Reserved, must be 0.
    pub rsvd2: u32,
}

/// Size of [`NvmeUringCmd`] in bytes.
pub const NVME_URING_CMD_SIZE: usize = 72;
const _: () = assert!(std::mem::size_of::<NvmeUringCmd>() == NVME_URING_CMD_SIZE);

impl NvmeUringCmd {
    /// The command as the bytes the kernel reads (native endian, x86-64/aarch64: little).
    pub fn to_bytes(&self) -> [u8; NVME_URING_CMD_SIZE] {
        let mut b = [0u8; NVME_URING_CMD_SIZE];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.rsvd1.to_ne_bytes());
        let dwords = [
            (4, self.nsid),
            (8, self.cdw2),
            (12, self.cdw3),
            (32, self.metadata_len),
            (36, self.data_len),
            (40, self.cdw10),
            (44, self.cdw11),
            (48, self.cdw12),
            (52, self.cdw13),
            (56, self.cdw14),
            (60, self.cdw15),
            (64, self.timeout_ms),
            (68, self.rsvd2),
        ];
        for (off, v) in dwords {
            b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b[16..24].copy_from_slice(&self.metadata.to_ne_bytes());
        b[24..32].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}
const IOC_NONE: u32 = 0;
const IOC_RW: u32 = 3;

/// `NVME_IOCTL_ID`: `ioctl(fd, NVME_IOCTL_ID)` returns the namespace ID.
pub const NVME_IOCTL_ID: u32 = ioc(IOC_NONE, b'N', 0x40, 0);
/// `NVME_URING_CMD_IO`: I/O queue command, `addr`/`data_len` describe one buffer.
pub const NVME_URING_CMD_IO: u32 = ioc(IOC_RW, b'N', 0x80, NVME_URING_CMD_SIZE);
/// `NVME_URING_CMD_IO_VEC`: I/O queue command, `addr`/`data_len` describe an iovec array.
pub const NVME_URING_CMD_IO_VEC: u32 = ioc(IOC_RW, b'N', 0x81, NVME_URING_CMD_SIZE);
/// `NVME_URING_CMD_ADMIN`: admin queue command.
pub const NVME_URING_CMD_ADMIN: u32 = ioc(IOC_RW, b'N', 0x82, NVME_URING_CMD_SIZE);
/// `NVME_URING_CMD_ADMIN_VEC`: admin queue command with an iovec array.
pub const NVME_URING_CMD_ADMIN_VEC: u32 = ioc(IOC_RW, b'N', 0x83, NVME_URING_CMD_SIZE);

/// NVMe I/O command set opcodes (NVM Command Set spec, figure "Opcodes for NVM Commands").
pub mod io_opcode {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (deallocate = TRIM).
    pub const DSM: u8 = 0x09;
}

/// NVMe admin command opcodes.
pub mod admin_opcode {
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace (NVM command set).
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
}

/// Size of an Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;
/// Size of one Dataset Management range descriptor.
pub const DSM_RANGE_LEN: usize = 16;
/// Most ranges one Dataset Management command carries (NR is 8 bits, 0-based).
pub const DSM_MAX_RANGES: usize = 256;
/// DSM CDW11 attribute: deallocate.
pub const DSM_ATTR_DEALLOCATE: u32 = 1 << 2;
/// NLB fields are 16 bits, 0-based: at most this many blocks per read/write/write-zeroes.
pub const MAX_NLB: u64 = 1 << 16;
/// Controller memory page size assumed for MDTS (CAP.MPSMIN = 0, i.e. 4 KiB).
pub const CTRL_PAGE_SIZE: u64 = 4096;

/// `IORING_OP_URING_CMD`.
pub const IORING_OP_URING_CMD: u8 = 46;
/// `IORING_URING_CMD_FIXED`: the uring command uses a registered buffer (`buf_index`).
pub const IORING_URING_CMD_FIXED: u32 = 1 << 0;
/// `IORING_ENTER_GETEVENTS`: io_uring_enter also reaps (runs deferred completions, polls).
pub const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
