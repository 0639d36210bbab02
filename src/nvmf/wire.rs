//! NVMe over Fabrics (RDMA) wire formats: the 64-byte submission queue entry ([`Command`]),
//! its SGL descriptor ([`Sgl`]), the 16-byte completion ([`Completion`]) and the rdma_cm
//! private data exchanged when a queue connects ([`CmRequest`], [`cm_accept_data`],
//! [`CmReject`]). Everything is little-endian; layouts follow the NVMe base and NVMe-oF
//! specifications (and Linux's `include/linux/nvme.h` / `nvme-rdma.h`).

use super::status::Status;

/// Bytes in a submission queue entry (command capsule header).
pub const SQE_LEN: usize = 64;
/// Bytes in a completion queue entry (response capsule).
pub const CQE_LEN: usize = 16;
/// Bytes of rdma_cm private data in a connect request / accept.
pub const CM_PRIVATE_LEN: usize = 32;
/// Admin queue depth the host uses and the target accepts at most (`NVME_AQ_DEPTH`).
pub const ADMIN_QUEUE_SIZE: u16 = 32;
/// Largest I/O queue (entries) [`CmRequest::parse`] accepts. The controller's CAP.MQES is
/// usually lower (`TargetConfig::queue_depth_max`) and is enforced at Connect.
pub const IO_QUEUE_SIZE_MAX: u16 = 1024;

/// Opcodes.
pub mod opcode {
    /// Fabrics command (admin and I/O queues); the type is in byte 4 (`fctype`).
    pub const FABRICS: u8 = 0x7f;
    /// Admin: Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Admin: Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Admin: Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Admin: Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Admin: Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Admin: Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// I/O: Flush.
    pub const FLUSH: u8 = 0x00;
    /// I/O: Write.
    pub const WRITE: u8 = 0x01;
    /// I/O: Read.
    pub const READ: u8 = 0x02;
    /// I/O: Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// I/O: Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Fabrics command types (`fctype`, byte 4 of a fabrics SQE).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
}

/// A malformed capsule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The capsule is shorter than an SQE.
    #[error("capsule is {got} bytes, an NVMe command needs {SQE_LEN}")]
    Short {
        /// Bytes received.
        got: usize,
    },
}

/// SGL descriptor types (byte 15 of the descriptor: type in bits 7:4, subtype in 3:0).
mod sgl_type {
    pub const DATA_BLOCK_OFFSET: u8 = 0x01; // data block, subtype offset (in-capsule)
    pub const KEYED: u8 = 0x40; // keyed data block, subtype address
    pub const KEYED_INVALIDATE: u8 = 0x4f; // keyed data block, subtype invalidate key
}

/// The data pointer of a command (SGL1). Only what the Linux host sends is understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sgl {
    /// Keyed data block with length 0 (the host's "no data").
    NoData,
    /// Host memory reachable by RDMA READ/WRITE: `addr`, `len` bytes, remote key `key`;
    /// `invalidate` when the host asked for the key's invalidation (SEND with invalidate).
    Keyed {
        /// Host virtual address.
        addr: u64,
        /// Bytes (24 bits on the wire).
        len: u32,
        /// Remote key.
        key: u32,
        /// Subtype 0xF: the host asks the target to invalidate `key` remotely.
        invalidate: bool,
    },
    /// Data carried in the command capsule, `offset` bytes after the SQE.
    InCapsule {
        /// Offset from the start of the in-capsule data.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Anything else (segment descriptors, unknown types, PSDT not 01b):
    /// SGL Descriptor Type Invalid.
    Invalid {
        /// The descriptor's type byte (or the flags byte's PSDT bits for a non-SGL command).
        type_byte: u8,
    },
}

impl Sgl {
    /// Data bytes this descriptor describes (0 for no data and invalid ones).
    pub fn len(&self) -> u32 {
        match *self {
            Sgl::Keyed { len, .. } | Sgl::InCapsule { len, .. } => len,
            Sgl::NoData | Sgl::Invalid { .. } => 0,
        }
    }

    /// Whether the descriptor carries no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A 64-byte NVMe command (copied out of the receive buffer).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Command {
    raw: [u8; SQE_LEN],
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("sgl", &self.sgl())
            .finish()
    }
}

impl Command {
    /// Copies the first 64 bytes of a capsule.
    ///
    /// # Errors
    /// [`WireError::Short`] if fewer than [`SQE_LEN`] bytes are given.
    pub fn parse(bytes: &[u8]) -> Result<Command, WireError> {
        let raw: [u8; SQE_LEN] = bytes
            .get(..SQE_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(WireError::Short { got: bytes.len() })?;
        Ok(Command { raw })
    }

    /// A command from exactly 64 bytes.
    pub fn from_bytes(raw: [u8; SQE_LEN]) -> Command {
        Command { raw }
    }

    /// The raw SQE.
    pub fn as_bytes(&self) -> &[u8; SQE_LEN] {
        &self.raw
    }

    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.raw[off], self.raw[off + 1]])
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.raw[off],
            self.raw[off + 1],
            self.raw[off + 2],
            self.raw[off + 3],
        ])
    }

    fn u64_at(&self, off: usize) -> u64 {
        u64::from(self.u32_at(off)) | (u64::from(self.u32_at(off + 4)) << 32)
    }

    /// Opcode (byte 0).
    pub fn opcode(&self) -> u8 {
        self.raw[0]
    }

    /// Flags byte (byte 1: FUSE bits 1:0, PSDT bits 7:6).
    pub fn flags(&self) -> u8 {
        self.raw[1]
    }

    /// Command identifier.
    pub fn cid(&self) -> u16 {
        self.u16_at(2)
    }

    /// Namespace identifier.
    pub fn nsid(&self) -> u32 {
        self.u32_at(4)
    }

    /// Command dword `n` (0..=15); cdw10..cdw15 are the command-specific ones.
    /// Out-of-range `n` reads as 0.
    pub fn cdw(&self, n: usize) -> u32 {
        if n < 16 {
            self.u32_at(n * 4)
        } else {
            0
        }
    }

    /// Whether this is a fabrics command (opcode 0x7F).
    pub fn is_fabrics(&self) -> bool {
        self.opcode() == opcode::FABRICS
    }

    /// Fabrics command type (byte 4), meaningful when [`Command::is_fabrics`].
    pub fn fctype(&self) -> u8 {
        self.raw[4]
    }

    /// The first SGL descriptor (bytes 24..40). PSDT (flags bits 7:6) must be 01b
    /// (SGL for data, metadata contiguous), else [`Sgl::Invalid`].
    pub fn sgl(&self) -> Sgl {
        let psdt = self.flags() >> 6;
        let type_byte = self.raw[39];
        if psdt != 0b01 {
            return Sgl::Invalid { type_byte };
        }
        match type_byte {
            sgl_type::KEYED | sgl_type::KEYED_INVALIDATE => {
                let addr = self.u64_at(24);
                let len = u32::from_le_bytes([self.raw[32], self.raw[33], self.raw[34], 0]);
                let key = self.u32_at(35);
                if len == 0 {
                    Sgl::NoData
                } else {
                    Sgl::Keyed {
                        addr,
                        len,
                        key,
                        invalidate: type_byte == sgl_type::KEYED_INVALIDATE,
                    }
                }
            }
            sgl_type::DATA_BLOCK_OFFSET => Sgl::InCapsule {
                offset: self.u64_at(24),
                len: self.u32_at(32),
            },
            _ => Sgl::Invalid { type_byte },
        }
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command specific result (dwords 0 and 1).
    pub result: u64,
    /// Submission queue head pointer.
    pub sqhd: u16,
    /// Submission queue identifier (the queue's qid).
    pub sqid: u16,
    /// The command's identifier.
    pub cid: u16,
    /// Status (phase bit 0 on the wire).
    pub status: Status,
}

impl Completion {
    /// The 16 bytes to SEND.
    pub fn encode(&self) -> [u8; CQE_LEN] {
        let mut b = [0u8; CQE_LEN];
        b[0..8].copy_from_slice(&self.result.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_cqe_field().to_le_bytes());
        b
    }

    /// Reads 16 bytes back (for tests and tools).
    pub fn decode(b: &[u8; CQE_LEN]) -> Completion {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let mut r = [0u8; 8];
        r.copy_from_slice(&b[0..8]);
        Completion {
            result: u64::from_le_bytes(r),
            sqhd: u16_at(8),
            sqid: u16_at(10),
            cid: u16_at(12),
            status: Status::from_cqe_field(u16_at(14)),
        }
    }
}

/// Why a queue's rdma_cm connect request is rejected (`nvme_rdma_cm_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CmReject {
    /// Private data shorter than 32 bytes.
    #[error("invalid private data length")]
    InvalidLength = 1,
    /// Record format is not 0.
    #[error("invalid record format")]
    InvalidRecfmt = 2,
    /// Queue id beyond what this target serves.
    #[error("invalid queue id")]
    InvalidQid = 3,
    /// Host send queue size out of range.
    #[error("invalid host SQ size")]
    InvalidHsqsize = 4,
    /// Host receive queue size out of range.
    #[error("invalid host RQ size")]
    InvalidHrqsize = 5,
    /// No resources for another queue.
    #[error("no resources")]
    NoResources = 6,
    /// Unacceptable initiator depth.
    #[error("invalid IRD")]
    InvalidIrd = 7,
    /// Unacceptable responder resources.
    #[error("invalid ORD")]
    InvalidOrd = 8,
}

impl CmReject {
    /// The reject private data: `{recfmt le16 = 0, sts le16}`.
    pub fn encode(self) -> [u8; 4] {
        let sts = self as u16;
        let mut b = [0u8; 4];
        b[2..4].copy_from_slice(&sts.to_le_bytes());
        b
    }
}

/// The host's rdma_cm connect private data (`struct nvme_rdma_cm_req`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmRequest {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue id: 0 admin, 1.. I/O.
    pub qid: u16,
    /// Host receive queue size (responses the host can take).
    pub hrqsize: u16,
    /// Host send queue size, 0's based (the SQ size - 1).
    pub hsqsize: u16,
    /// Controller id (I/O queues, Linux 6.12+; 0 otherwise).
    pub cntlid: u16,
}

impl CmRequest {
    /// Parses and validates the private data: recfmt 0; admin queue: 1 <= hsqsize + 1 <= 32;
    /// I/O queue: 1 <= hsqsize + 1 <= [`IO_QUEUE_SIZE_MAX`]; 1 <= hrqsize <= the same bound.
    ///
    /// # Errors
    /// The [`CmReject`] reason to send back.
    pub fn parse(private_data: &[u8]) -> Result<CmRequest, CmReject> {
        let b = private_data
            .get(..10)
            .filter(|_| private_data.len() >= CM_PRIVATE_LEN)
            .ok_or(CmReject::InvalidLength)?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let req = CmRequest {
            recfmt: u16_at(0),
            qid: u16_at(2),
            hrqsize: u16_at(4),
            hsqsize: u16_at(6),
            cntlid: u16_at(8),
        };
        if req.recfmt != 0 {
            return Err(CmReject::InvalidRecfmt);
        }
        let max = if req.qid == 0 {
            ADMIN_QUEUE_SIZE
        } else {
            IO_QUEUE_SIZE_MAX
        };
        if req.hsqsize == 0 || u32::from(req.hsqsize) + 1 > u32::from(max) {
            return Err(CmReject::InvalidHsqsize);
        }
        if req.hrqsize == 0 || req.hrqsize > max {
            return Err(CmReject::InvalidHrqsize);
        }
        Ok(req)
    }

    /// The submission queue size in entries (hsqsize + 1): receives to post before accepting.
    pub fn sq_entries(&self) -> u32 {
        u32::from(self.hsqsize) + 1
    }

    /// The 32 bytes a host would send (for tests and tools).
    pub fn encode(&self) -> [u8; CM_PRIVATE_LEN] {
        let mut b = [0u8; CM_PRIVATE_LEN];
        for (i, v) in [
            self.recfmt,
            self.qid,
            self.hrqsize,
            self.hsqsize,
            self.cntlid,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 2..i * 2 + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// The accept private data (`struct nvme_rdma_cm_rep`): recfmt 0 and the controller's
/// receive queue size.
pub fn cm_accept_data(crqsize: u16) -> [u8; CM_PRIVATE_LEN] {
    let mut b = [0u8; CM_PRIVATE_LEN];
    b[2..4].copy_from_slice(&crqsize.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqe(flags: u8, sgl: [u8; 16]) -> Command {
        let mut raw = [0u8; SQE_LEN];
        raw[1] = flags;
        raw[2..4].copy_from_slice(&7u16.to_le_bytes());
        raw[24..40].copy_from_slice(&sgl);
        Command::from_bytes(raw)
    }

    #[test]
    fn keyed_sgl_fields() {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        d[8..11].copy_from_slice(&[0x00, 0x10, 0x00]); // 4096, 24-bit
        d[11..15].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        d[15] = 0x4f;
        let c = sqe(0x40, d);
        assert_eq!(
            c.sgl(),
            Sgl::Keyed {
                addr: 0x1122_3344_5566_7788,
                len: 4096,
                key: 0xdead_beef,
                invalidate: true
            }
        );
        assert_eq!(c.cid(), 7);
        d[15] = 0x40;
        d[8..11].copy_from_slice(&[0, 0, 0]);
        assert_eq!(sqe(0x40, d).sgl(), Sgl::NoData);
        // PSDT 00 (PRP) is not accepted on fabrics.
        assert!(matches!(sqe(0x00, d).sgl(), Sgl::Invalid { .. }));
        d[15] = 0x02; // segment descriptor
        assert_eq!(sqe(0x40, d).sgl(), Sgl::Invalid { type_byte: 0x02 });
    }

    #[test]
    fn in_capsule_sgl() {
        let mut d = [0u8; 16];
        d[8..12].copy_from_slice(&512u32.to_le_bytes());
        d[15] = 0x01;
        assert_eq!(
            sqe(0x40, d).sgl(),
            Sgl::InCapsule {
                offset: 0,
                len: 512
            }
        );
    }

    #[test]
    fn short_capsule_is_an_error() {
        assert_eq!(
            Command::parse(&[0u8; 63]),
            Err(WireError::Short { got: 63 })
        );
        assert!(Command::parse(&[0u8; 80]).is_ok());
    }

    #[test]
    fn completion_layout() {
        let c = Completion {
            result: 0x0102_0304_0506_0708,
            sqhd: 0x0a0b,
            sqid: 3,
            cid: 0x1234,
            status: Status::INVALID_FIELD.with_dnr(),
        };
        let b = c.encode();
        assert_eq!(b[0], 0x08);
        assert_eq!(&b[8..10], &[0x0b, 0x0a]);
        assert_eq!(&b[12..14], &[0x34, 0x12]);
        assert_eq!(u16::from_le_bytes([b[14], b[15]]), 0x4002 << 1);
        assert_eq!(Completion::decode(&b), c);
    }

    #[test]
    fn cm_request_validation() {
        let admin = CmRequest {
            recfmt: 0,
            qid: 0,
            hrqsize: 32,
            hsqsize: 31,
            cntlid: 0,
        };
        assert_eq!(CmRequest::parse(&admin.encode()), Ok(admin));
        assert_eq!(
            CmRequest::parse(&admin.encode()[..31]),
            Err(CmReject::InvalidLength)
        );
        let big = CmRequest {
            hsqsize: 32,
            ..admin
        };
        assert_eq!(
            CmRequest::parse(&big.encode()),
            Err(CmReject::InvalidHsqsize)
        );
        let fmt = CmRequest { recfmt: 1, ..admin };
        assert_eq!(
            CmRequest::parse(&fmt.encode()),
            Err(CmReject::InvalidRecfmt)
        );
        let io = CmRequest {
            recfmt: 0,
            qid: 1,
            hrqsize: 128,
            hsqsize: 127,
            cntlid: 1,
        };
        assert_eq!(CmRequest::parse(&io.encode()), Ok(io));
        let zero_rq = CmRequest { hrqsize: 0, ..io };
        assert_eq!(
            CmRequest::parse(&zero_rq.encode()),
            Err(CmReject::InvalidHrqsize)
        );
        let huge = CmRequest {
            hsqsize: 1024,
            ..io
        };
        assert_eq!(
            CmRequest::parse(&huge.encode()),
            Err(CmReject::InvalidHsqsize)
        );
        assert_eq!(CmReject::InvalidHsqsize.encode(), [0, 0, 4, 0]);
        assert_eq!(&cm_accept_data(128)[..4], &[0, 0, 128, 0]);
    }
}
