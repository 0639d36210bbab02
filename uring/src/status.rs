//! NVMe completion status as the kernel hands it back in a passthrough CQE (`res > 0`):
//! the CQE status field shifted right by one (phase bit dropped), so bits 7:0 are the status
//! code (SC), 10:8 the status code type (SCT), 12:11 CRD, 13 More, 14 Do Not Retry.

use std::fmt;

/// A decoded NVMe status (never "success": a zero status is not an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NvmeStatus(pub u16);

/// Status code types (SCT).
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status.
    pub const PATH: u8 = 3;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// Common generic status codes (SCT 0).
pub mod sc {
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// Invalid Field in Command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// Internal Error.
    pub const INTERNAL_ERROR: u8 = 0x06;
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Capacity Exceeded.
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
}

impl NvmeStatus {
    /// Decodes a positive `res` of a passthrough completion.
    pub fn from_res(res: i32) -> Self {
        NvmeStatus((res & 0x7fff) as u16)
    }
    /// Status Code (SC).
    pub fn sc(self) -> u8 {
        (self.0 & 0xff) as u8
    }
    /// Status Code Type (SCT).
    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }
    /// Command Retry Delay index.
    pub fn crd(self) -> u8 {
        ((self.0 >> 11) & 0x3) as u8
    }
    /// More: the controller has more status in the Error Information log page.
    pub fn more(self) -> bool {
        self.0 & (1 << 13) != 0
    }
    /// Do Not Retry: the same command will fail again.
    pub fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    /// Whether this is (SCT 0, SC) for the given generic status code.
    pub fn is_generic(self, code: u8) -> bool {
        self.sct() == sct::GENERIC && self.sc() == code
    }
    /// Spec name of the status, when it is one of the common ones.
    pub fn name(self) -> Option<&'static str> {
        Some(match (self.sct(), self.sc()) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x05) => "Commands Aborted due to Power Loss Notification",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x08) => "Command Aborted due to SQ Deletion",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x0c) => "Command Sequence Error",
            (0, 0x0f) => "Data SGL Length Invalid",
            (0, 0x12) => "Invalid Use of Controller Memory Buffer",
            (0, 0x13) => "PRP Offset Invalid",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (0, 0x83) => "Reservation Conflict",
            (0, 0x84) => "Format In Progress",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x0a) => "Invalid Format",
            (1, 0x80) => "Conflicting Attributes",
            (1, 0x81) => "Invalid Protection Information",
            (1, 0x82) => "Attempted Write to Read Only Range",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x82) => "End-to-end Guard Check Error",
            (2, 0x83) => "End-to-end Application Tag Check Error",
            (2, 0x84) => "End-to-end Reference Tag Check Error",
            (2, 0x85) => "Compare Failure",
            (2, 0x86) => "Access Denied",
            (2, 0x87) => "Deallocated or Unwritten Logical Block",
            (3, 0x00) => "Internal Path Error",
            (3, 0x70) => "Host Path Error",
            (3, 0x71) => "Command Aborted By Host",
            _ => return None,
        })
    }
    /// What the caller should do about this status.
    pub fn hint(self) -> &'static str {
        match (self.sct(), self.sc()) {
            (0, 0x01) => "the controller does not implement this command (check Identify ONCS)",
            (0, 0x02) => "a command field is invalid for this controller, e.g. a transfer larger than MDTS or an unsupported flag: check the command against Namespace::info()",
            (0, 0x04) => "the controller could not move the data: check the buffer memory (p2pmem provider, IOMMU)",
            (0, 0x0b) => "wrong nsid or unsupported LBA format: use Namespace::nsid()",
            (0, 0x80) => "the LBA range ends past the namespace: keep slba + nlb <= Namespace::info().nlba",
            (0, 0x81) | (0, 0x82) | (0, 0x84) => "the namespace is not usable now: retry later",
            (2, _) => "media error: the data in this range is damaged; do not retry blindly",
            (3, _) => "the path to the controller failed (reset/removal): retry after the controller is back",
            _ if self.dnr() => "the controller says retrying will not help",
            _ => "see the NVMe base specification for this status",
        }
    }
}

impl fmt::Display for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (SCT {:#x}, SC {:#04x}{}{})",
            self.name().unwrap_or("unknown status"),
            self.sct(),
            self.sc(),
            if self.dnr() { ", DNR" } else { "" },
            if self.more() { ", More" } else { "" }
        )
    }
}
