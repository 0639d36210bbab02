//! NVMe command builders: each returns an [`NvmeCommand`] (queue + `nvme_uring_cmd`) with the
//! exact dwords the controller sees. The data buffer address/length are filled in by the ring
//! from the buffer the operation owns.

use crate::abi::{self, admin_opcode, io_opcode, NvmeUringCmd};

/// Which NVMe queue a command goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// Admin queue (`NVME_URING_CMD_ADMIN`).
    Admin,
    /// I/O queue (`NVME_URING_CMD_IO`).
    Io,
}

impl Queue {
    /// The uring `cmd_op` for this queue (vectored or not).
    pub fn cmd_op(self, vectored: bool) -> u32 {
        match (self, vectored) {
            (Queue::Admin, false) => abi::NVME_URING_CMD_ADMIN,
            (Queue::Admin, true) => abi::NVME_URING_CMD_ADMIN_VEC,
            (Queue::Io, false) => abi::NVME_URING_CMD_IO,
            (Queue::Io, true) => abi::NVME_URING_CMD_IO_VEC,
        }
    }
}

/// Direction of the data transfer of a command (decides whether the buffer is read or
/// written by the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// No data.
    None,
    /// Device writes host memory (read, identify).
    FromDevice,
    /// Device reads host memory (write, DSM ranges).
    ToDevice,
}

/// An NVMe command ready for passthrough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvmeCommand {
    /// Admin or I/O queue.
    pub queue: Queue,
    /// The kernel command structure.
    pub cmd: NvmeUringCmd,
}

impl NvmeCommand {
    /// An arbitrary admin command (power users): set the dwords on `cmd` yourself.
    pub fn admin(cmd: NvmeUringCmd) -> Self {
        NvmeCommand {
            queue: Queue::Admin,
            cmd,
        }
    }
    /// An arbitrary I/O command (power users).
    pub fn io(cmd: NvmeUringCmd) -> Self {
        NvmeCommand {
            queue: Queue::Io,
            cmd,
        }
    }
    fn rw(opcode: u8, nsid: u32, slba: u64, nblocks: u32) -> Self {
        debug_assert!(nblocks >= 1 && u64::from(nblocks) <= abi::MAX_NLB);
        Self::io(NvmeUringCmd {
            opcode,
            nsid,
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            cdw12: nblocks.saturating_sub(1) & 0xffff,
            ..Default::default()
        })
    }
    /// Read `nblocks` (1..=65536) logical blocks starting at `slba`.
    pub fn read(nsid: u32, slba: u64, nblocks: u32) -> Self {
        Self::rw(io_opcode::READ, nsid, slba, nblocks)
    }
    /// Write `nblocks` (1..=65536) logical blocks starting at `slba`.
    pub fn write(nsid: u32, slba: u64, nblocks: u32) -> Self {
        Self::rw(io_opcode::WRITE, nsid, slba, nblocks)
    }
    /// Flush the volatile write cache of namespace `nsid`.
    pub fn flush(nsid: u32) -> Self {
        Self::io(NvmeUringCmd {
            opcode: io_opcode::FLUSH,
            nsid,
            ..Default::default()
        })
    }
    /// Write Zeroes over `nblocks` (1..=65536) blocks at `slba`; `deallocate` sets DEAC (the
    /// controller may deallocate instead of writing).
    pub fn write_zeroes(nsid: u32, slba: u64, nblocks: u32, deallocate: bool) -> Self {
        let mut c = Self::rw(io_opcode::WRITE_ZEROES, nsid, slba, nblocks);
        if deallocate {
            c.cmd.cdw12 |= 1 << 25;
        }
        c
    }
    /// Dataset Management with the Deallocate attribute over `nranges` (1..=256) ranges; the
    /// data buffer holds the range descriptors (see [`dsm_ranges`]).
    pub fn deallocate(nsid: u32, nranges: u32) -> Self {
        debug_assert!(nranges >= 1 && nranges as usize <= abi::DSM_MAX_RANGES);
        Self::io(NvmeUringCmd {
            opcode: io_opcode::DSM,
            nsid,
            cdw10: nranges.saturating_sub(1) & 0xff,
            cdw11: abi::DSM_ATTR_DEALLOCATE,
            ..Default::default()
        })
    }
    /// Identify with the given CNS (4096-byte data buffer).
    pub fn identify(nsid: u32, cns: u32) -> Self {
        Self::admin(NvmeUringCmd {
            opcode: admin_opcode::IDENTIFY,
            nsid,
            cdw10: cns,
            ..Default::default()
        })
    }
    /// Identify Controller.
    pub fn identify_controller() -> Self {
        Self::identify(0, abi::cns::CONTROLLER)
    }
    /// Identify Namespace `nsid`.
    pub fn identify_namespace(nsid: u32) -> Self {
        Self::identify(nsid, abi::cns::NAMESPACE)
    }
    /// Data direction, from the opcode's low two bits (NVMe: 01 host-to-controller,
    /// 10 controller-to-host).
    pub fn direction(&self) -> Direction {
        match self.cmd.opcode & 3 {
            1 => Direction::ToDevice,
            2 => Direction::FromDevice,
            3 => Direction::FromDevice, // bidirectional: the device may write
            _ => Direction::None,
        }
    }
}

/// Encodes Dataset Management range descriptors: each `(slba, nblocks)` becomes
/// context attributes (0), length in blocks (1-based), starting LBA.
pub fn dsm_ranges(ranges: &[(u64, u32)], out: &mut [u8]) {
    for (i, &(slba, nlb)) in ranges.iter().enumerate() {
        let d = &mut out[i * abi::DSM_RANGE_LEN..(i + 1) * abi::DSM_RANGE_LEN];
        d[0..4].copy_from_slice(&0u32.to_le_bytes());
        d[4..8].copy_from_slice(&nlb.to_le_bytes());
        d[8..16].copy_from_slice(&slba.to_le_bytes());
    }
}
