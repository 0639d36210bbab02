//! NVMe completion status values ([`Status`]) and the errno mapping used for backend errors.
//!
//! A [`Status`] holds the 15-bit status field the way the Linux host reads it (the CQE's
//! status halfword shifted right by one, dropping the phase bit): SC in bits 7:0, SCT in bits
//! 10:8, CRD in 12:11, More in 13, DNR in 14. [`Status::to_cqe_field`] puts it back on the
//! wire (phase 0: fabrics completions carry no phase).

use std::fmt;

/// An NVMe status field (SCT/SC/More/DNR), without the phase bit.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(pub u16);

/// Status code type 0: generic command status.
const GENERIC: u16 = 0x000;
/// Status code type 1: command specific status.
const CMD_SPECIFIC: u16 = 0x100;
/// Status code type 2: media and data integrity errors.
const MEDIA: u16 = 0x200;

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status(GENERIC);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Status = Status(GENERIC | 0x01);
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Status = Status(GENERIC | 0x02);
    /// Command ID Conflict.
    pub const CMDID_CONFLICT: Status = Status(GENERIC | 0x03);
    /// Data Transfer Error.
    pub const DATA_XFER_ERROR: Status = Status(GENERIC | 0x04);
    /// Internal Error.
    pub const INTERNAL: Status = Status(GENERIC | 0x06);
    /// Invalid Namespace or Format.
    pub const INVALID_NS: Status = Status(GENERIC | 0x0b);
    /// Command Sequence Error.
    pub const CMD_SEQ_ERROR: Status = Status(GENERIC | 0x0c);
    /// Data SGL Length Invalid.
    pub const SGL_INVALID_DATA_LEN: Status = Status(GENERIC | 0x0f);
    /// SGL Descriptor Type Invalid.
    pub const SGL_INVALID_TYPE: Status = Status(GENERIC | 0x11);
    /// SGL Offset Invalid.
    pub const SGL_INVALID_OFFSET: Status = Status(GENERIC | 0x16);
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: Status = Status(GENERIC | 0x80);
    /// Capacity Exceeded.
    pub const CAP_EXCEEDED: Status = Status(GENERIC | 0x81);
    /// Namespace Not Ready.
    pub const NS_NOT_READY: Status = Status(GENERIC | 0x82);
    /// Invalid Queue Identifier (command specific).
    pub const INVALID_QUEUE_ID: Status = Status(CMD_SPECIFIC | 0x01);
    /// Invalid Queue Size (command specific).
    pub const INVALID_QUEUE_SIZE: Status = Status(CMD_SPECIFIC | 0x02);
    /// Asynchronous Event Request Limit Exceeded (command specific).
    pub const ASYNC_LIMIT: Status = Status(CMD_SPECIFIC | 0x05);
    /// Invalid Log Page (command specific).
    pub const INVALID_LOG_PAGE: Status = Status(CMD_SPECIFIC | 0x09);
    /// Feature Identifier Not Saveable (command specific).
    pub const FEATURE_NOT_SAVEABLE: Status = Status(CMD_SPECIFIC | 0x0d);
    /// Connect: Incompatible Format.
    pub const CONNECT_FORMAT: Status = Status(CMD_SPECIFIC | 0x80);
    /// Connect: Controller Busy.
    pub const CONNECT_CTRL_BUSY: Status = Status(CMD_SPECIFIC | 0x81);
    /// Connect: Invalid Parameters (result carries IATTR/IPO).
    pub const CONNECT_INVALID_PARAM: Status = Status(CMD_SPECIFIC | 0x82);
    /// Connect: Invalid Host (result carries IATTR/IPO).
    pub const CONNECT_INVALID_HOST: Status = Status(CMD_SPECIFIC | 0x84);
    /// Write Fault (media error).
    pub const WRITE_FAULT: Status = Status(MEDIA | 0x80);
    /// Unrecovered Read Error (media error).
    pub const UNRECOVERED_READ: Status = Status(MEDIA | 0x81);

    /// Do Not Retry bit.
    pub const DNR_BIT: u16 = 0x4000;

    /// This status with Do Not Retry set.
    pub const fn with_dnr(self) -> Status {
        Status(self.0 | Self::DNR_BIT)
    }

    /// Whether Do Not Retry is set.
    pub const fn dnr(self) -> bool {
        self.0 & Self::DNR_BIT != 0
    }

    /// Status Code Type (bits 10:8).
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Status Code (bits 7:0).
    pub const fn sc(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    /// SCT and SC only (no DNR/More/CRD): compare against the constants with this.
    pub const fn code(self) -> Status {
        Status(self.0 & 0x7ff)
    }

    /// Whether this is a success.
    pub const fn is_success(self) -> bool {
        self.code().0 == 0
    }

    /// The CQE's 16-bit status field (this status shifted left by one; phase bit 0).
    pub const fn to_cqe_field(self) -> u16 {
        (self.0 & 0x7fff) << 1
    }

    /// Reads a CQE status field back (drops the phase bit).
    pub const fn from_cqe_field(field: u16) -> Status {
        Status(field >> 1)
    }

    /// A generic mapping of a backend errno (positive `E*` value) to a status:
    /// `ENOSPC` -> Capacity Exceeded, `EAGAIN`/`EBUSY` -> Namespace Not Ready (retryable),
    /// `EINVAL` -> Invalid Field, `EOPNOTSUPP` -> Invalid Opcode, `EIO`/anything else ->
    /// Internal Error. All but Namespace Not Ready carry DNR. For Read/Write, use
    /// [`Status::from_io_errno`] which knows the direction.
    pub fn from_errno(errno: i32) -> Status {
        match errno.unsigned_abs() as i32 {
            libc::ENOSPC => Status::CAP_EXCEEDED.with_dnr(),
            libc::EAGAIN | libc::EBUSY => Status::NS_NOT_READY,
            libc::EINVAL => Status::INVALID_FIELD.with_dnr(),
            libc::EOPNOTSUPP => Status::INVALID_OPCODE.with_dnr(),
            _ => Status::INTERNAL.with_dnr(),
        }
    }

    /// Backend errno of a data command: `EIO` becomes Write Fault (`is_write`) or Unrecovered
    /// Read Error, the rest as [`Status::from_errno`].
    pub fn from_io_errno(errno: i32, is_write: bool) -> Status {
        if errno.unsigned_abs() as i32 == libc::EIO {
            if is_write {
                Status::WRITE_FAULT.with_dnr()
            } else {
                Status::UNRECOVERED_READ.with_dnr()
            }
        } else {
            Status::from_errno(errno)
        }
    }

    /// A status a backend NVMe device returned (passthrough), as the target reports it:
    /// its type, code, retry delay and DNR kept, More dropped (the target's own error log
    /// does not hold the device's entry).
    pub const fn from_device(raw: u16) -> Status {
        Status(raw & !(1 << 13) & 0x7fff)
    }

    fn name(self) -> &'static str {
        match self.code() {
            Status::SUCCESS => "success",
            Status::INVALID_OPCODE => "invalid opcode",
            Status::INVALID_FIELD => "invalid field",
            Status::CMDID_CONFLICT => "command id conflict",
            Status::DATA_XFER_ERROR => "data transfer error",
            Status::INTERNAL => "internal error",
            Status::INVALID_NS => "invalid namespace",
            Status::CMD_SEQ_ERROR => "command sequence error",
            Status::SGL_INVALID_DATA_LEN => "SGL data length invalid",
            Status::SGL_INVALID_TYPE => "SGL descriptor type invalid",
            Status::SGL_INVALID_OFFSET => "SGL offset invalid",
            Status::LBA_OUT_OF_RANGE => "LBA out of range",
            Status::CAP_EXCEEDED => "capacity exceeded",
            Status::NS_NOT_READY => "namespace not ready",
            Status::INVALID_QUEUE_ID => "invalid queue id",
            Status::INVALID_QUEUE_SIZE => "invalid queue size",
            Status::ASYNC_LIMIT => "async event request limit exceeded",
            Status::INVALID_LOG_PAGE => "invalid log page",
            Status::FEATURE_NOT_SAVEABLE => "feature not saveable",
            Status::CONNECT_FORMAT => "connect: incompatible format",
            Status::CONNECT_CTRL_BUSY => "connect: controller busy",
            Status::CONNECT_INVALID_PARAM => "connect: invalid parameters",
            Status::CONNECT_INVALID_HOST => "connect: invalid host",
            Status::WRITE_FAULT => "write fault",
            Status::UNRECOVERED_READ => "unrecovered read error",
            _ => "status",
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sct {:#x} sc {:#04x}{})",
            self.name(),
            self.sct(),
            self.sc(),
            if self.dnr() { " dnr" } else { "" }
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How a backend operation failed: an errno (block device, file, or the system call), or the
/// NVMe status the backing device itself returned (passthrough), which the target passes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoFailure {
    /// A positive errno (a negative one is accepted too).
    Errno(i32),
    /// The device's NVMe status.
    Device(Status),
}

impl IoFailure {
    /// The status to complete a command with: the device's own status as it was (see
    /// [`Status::from_device`]), or an errno mapped by [`Status::from_io_errno`].
    pub fn status(self, is_write: bool) -> Status {
        match self {
            IoFailure::Errno(e) => Status::from_io_errno(e, is_write),
            IoFailure::Device(s) => s,
        }
    }
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoFailure::Errno(e) => {
                write!(
                    f,
                    "{}",
                    std::io::Error::from_raw_os_error(e.unsigned_abs() as i32)
                )
            }
            IoFailure::Device(s) => write!(f, "the device returned NVMe status {s}"),
        }
    }
}

impl From<i32> for IoFailure {
    fn from(errno: i32) -> IoFailure {
        IoFailure::Errno(errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cqe_field_round_trips_and_matches_linux_values() {
        // Linux NVME_SC_CONNECT_INVALID_PARAM = 0x182, NVME_STATUS_DNR = 0x4000.
        let s = Status::CONNECT_INVALID_PARAM.with_dnr();
        assert_eq!(s.0, 0x4182);
        assert_eq!(s.to_cqe_field(), 0x8304);
        assert_eq!(Status::from_cqe_field(s.to_cqe_field() | 1), s);
        assert_eq!(s.sct(), 1);
        assert_eq!(s.sc(), 0x82);
        assert!(s.dnr());
        assert_eq!(s.code(), Status::CONNECT_INVALID_PARAM);
        assert_eq!(Status::WRITE_FAULT.0, 0x280);
        assert_eq!(Status::LBA_OUT_OF_RANGE.0, 0x80);
    }

    #[test]
    fn device_status_passes_through() {
        // Deallocated or Unwritten Logical Block (SCT 2, SC 0x87) with DNR and More set.
        let raw = (1 << 14) | (1 << 13) | (2 << 8) | 0x87;
        let s = IoFailure::Device(Status::from_device(raw)).status(false);
        assert_eq!((s.sct(), s.sc(), s.dnr()), (2, 0x87, true));
        assert_eq!(s.0 & (1 << 13), 0, "More is dropped");
        assert_eq!(
            IoFailure::from(libc::EIO).status(true),
            Status::WRITE_FAULT.with_dnr()
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            Status::from_io_errno(libc::EIO, true).code(),
            Status::WRITE_FAULT
        );
        assert_eq!(
            Status::from_io_errno(-libc::EIO, false).code(),
            Status::UNRECOVERED_READ
        );
        assert_eq!(
            Status::from_io_errno(libc::ENOSPC, true).code(),
            Status::CAP_EXCEEDED
        );
        assert_eq!(Status::from_errno(libc::EPERM).code(), Status::INTERNAL);
        assert!(!Status::from_errno(libc::EAGAIN).dnr());
    }
}
