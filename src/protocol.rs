//! The replicator wire protocol: fixed-size (64-byte) little-endian control messages sent
//! over the RC queue pair next to the RDMA writes that carry the payload.
//!
//! Every message is [`MSG_LEN`] bytes: an 8-byte header (`magic`, `version`, `kind`, two
//! zero bytes) and a 56-byte body whose unused tail must be zero. [`Message::decode`] checks
//! the header, the kind, reserved bytes and per-field bounds that need no context;
//! [`PrimarySide`] and [`ReplicaSide`] check everything that depends on the negotiated
//! [`Config`] and on what was said before (sequence numbers, offsets, lengths). Any failed
//! check is a [`ProtocolError`]; the connection that produced it must be ended, because a peer
//! that sends one malformed message cannot be trusted to describe buffers correctly.
//!
//! Conversation (primary `P`, replica `R`; `seq` is the block index inside the range):
//! ```text
//! P -> R  Hello{config}                      R -> P  HelloAck{granted window, capacity}
//! R -> P  BufferReady{seq, addr, rkey, len}  (one per block, in seq order, <= window open)
//! P: RDMA WRITE block seq into (addr, rkey); then
//! P -> R  BlockSent{seq, offset, len, crc}   (RC ordering: the write is placed before this)
//! R: invalidate rkey, write to drive, flush if volatile cache, then
//! R -> P  BlockWritten{seq, status}          (any order, each seq exactly once)
//! P -> R  VerifyRequest{seq}   R -> P VerifyResult{seq, len, crc}   (only with --verify)
//! P -> R  Fin{blocks, bytes}                 R -> P Fin{blocks, bytes}
//! either  Abort{code, seq}                   ends the connection
//! ```

use std::fmt;

/// Size of every message on the wire.
pub const MSG_LEN: usize = 64;
/// `b"PPRP"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PPRP");
/// Protocol version spoken by this build.
pub const VERSION: u8 = 1;
/// Largest block size a peer may propose (the receive side must size buffers for it).
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Largest number of blocks in flight per replica a peer may propose.
pub const MAX_WINDOW: u32 = 4096;

const HEADER_LEN: usize = 8;

/// Hello flags.
pub mod flags {
    /// The primary will ask for read-back checksums ([`super::Message::VerifyRequest`]).
    pub const VERIFY: u32 = 1 << 0;
    /// Every flag this version understands.
    pub const ALL: u32 = VERIFY;
}

/// What the primary proposes; the replica must accept it as is (except the window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which replica this connection feeds (0-based, chosen by the primary).
    pub replica_id: u32,
    /// Bytes per block (the last block may be shorter); a multiple of `lba_size`.
    pub block_size: u32,
    /// Device logical block size: offsets and lengths are multiples of it.
    pub lba_size: u32,
    /// Most blocks the primary wants in flight to this replica.
    pub window: u32,
    /// Byte offset of the range on the drive (same offset on primary and replica).
    pub range_offset: u64,
    /// Byte length of the range.
    pub range_len: u64,
    /// [`flags`] bits.
    pub flags: u32,
}

impl Config {
    /// Number of blocks the range splits into (the last may be short).
    pub fn blocks(&self) -> u64 {
        self.range_len.div_ceil(u64::from(self.block_size))
    }

    /// Byte length of block `seq`, or `None` if `seq` is outside the range.
    pub fn block_len(&self, seq: u64) -> Option<u32> {
        let bs = u64::from(self.block_size);
        let start = seq.checked_mul(bs)?;
        if start >= self.range_len {
            return None;
        }
        // Fits in u32: at most block_size.
        Some((self.range_len - start).min(bs) as u32)
    }

    /// Drive byte offset of block `seq` (caller checked `seq` with [`Config::block_len`]).
    pub fn block_offset(&self, seq: u64) -> u64 {
        self.range_offset + seq * u64::from(self.block_size)
    }

    /// Checks the values themselves (no peer state).
    ///
    /// # Errors
    /// [`ProtocolError::BadConfig`] naming the first offending field.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |what: &'static str| Err(ProtocolError::BadConfig { what });
        if self.lba_size == 0 || !self.lba_size.is_power_of_two() {
            return bad("lba_size must be a power of two");
        }
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return bad("block_size must be 1..=64 MiB");
        }
        if self.block_size % self.lba_size != 0 {
            return bad("block_size must be a multiple of lba_size");
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return bad("window must be 1..=4096");
        }
        if self.range_len == 0 {
            return bad("range_len must not be 0");
        }
        if self.range_offset % u64::from(self.lba_size) != 0
            || self.range_len % u64::from(self.lba_size) != 0
        {
            return bad("range offset and length must be multiples of lba_size");
        }
        if self.range_offset.checked_add(self.range_len).is_none() {
            return bad("range end overflows u64");
        }
        if self.flags & !flags::ALL != 0 {
            return bad("unknown flags");
        }
        Ok(())
    }
}

/// Outcome of a replica's write or of a whole run, carried in acks and aborts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok,
    /// A system call failed with this errno.
    Errno(u16),
    /// The NVMe device returned this status (SCT << 8 | SC).
    Nvme(u16),
    /// The peer broke the protocol (the value is a [`ProtocolError::code`]).
    Protocol(u16),
    /// The range does not fit the replica's target, or other configuration refusal.
    Refused(u16),
}

impl Status {
    /// Wire form: kind in the high 16 bits, value in the low 16.
    pub fn to_wire(self) -> u32 {
        let (k, v) = match self {
            Status::Ok => (0u32, 0u16),
            Status::Errno(v) => (1, v),
            Status::Nvme(v) => (2, v),
            Status::Protocol(v) => (3, v),
            Status::Refused(v) => (4, v),
        };
        k << 16 | u32::from(v)
    }

    /// Parses the wire form.
    ///
    /// # Errors
    /// [`ProtocolError::BadField`] for an unknown kind or a non-zero value with `Ok`.
    pub fn from_wire(w: u32) -> Result<Status, ProtocolError> {
        let v = (w & 0xffff) as u16;
        Ok(match w >> 16 {
            0 if v == 0 => Status::Ok,
            1 => Status::Errno(v),
            2 => Status::Nvme(v),
            3 => Status::Protocol(v),
            4 => Status::Refused(v),
            _ => {
                return Err(ProtocolError::BadField {
                    kind: "status",
                    what: "unknown status kind",
                })
            }
        })
    }

    /// True for [`Status::Ok`].
    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => write!(f, "ok"),
            Status::Errno(e) => write!(
                f,
                "errno {e} ({})",
                std::io::Error::from_raw_os_error(i32::from(*e))
            ),
            Status::Nvme(s) => write!(f, "NVMe status {s:#06x}"),
            Status::Protocol(c) => write!(f, "protocol violation code {c}"),
            Status::Refused(c) => write!(f, "refused (code {c})"),
        }
    }
}

/// One protocol message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// Primary -> replica: the run's parameters.
    Hello(Config),
    /// Replica -> primary: accepted; `window` <= proposed; `capacity` = target size in bytes.
    HelloAck {
        /// Echo of the replica id.
        replica_id: u32,
        /// Blocks the replica will keep advertised at once (1..=proposed).
        window: u32,
        /// Byte size of the replica's target (the range must fit).
        capacity: u64,
    },
    /// Replica -> primary: block `seq` may be RDMA-written to `len` bytes at `addr` with `rkey`
    /// (a memory window over exactly that buffer).
    BufferReady {
        /// Block index.
        seq: u64,
        /// Remote virtual address (or zero-based offset for windows bound zero-based).
        addr: u64,
        /// Remote key of the window.
        rkey: u32,
        /// Bytes granted; equals the block's length.
        len: u32,
    },
    /// Primary -> replica: block `seq` was written into its advertised buffer.
    BlockSent {
        /// Block index.
        seq: u64,
        /// Drive byte offset (must equal the range offset + seq * block size).
        offset: u64,
        /// Block length.
        len: u32,
        /// CRC32C of the payload as read on the primary (0 unless verifying).
        crc: u32,
    },
    /// Replica -> primary: block `seq` is on the replica's drive (flushed) or failed.
    BlockWritten {
        /// Block index.
        seq: u64,
        /// Outcome of the drive write (and flush).
        status: Status,
    },
    /// Primary -> replica: read back block `seq` and return its checksum.
    VerifyRequest {
        /// Block index.
        seq: u64,
    },
    /// Replica -> primary: checksum of block `seq` as read back from the drive.
    VerifyResult {
        /// Block index.
        seq: u64,
        /// Block length read.
        len: u32,
        /// CRC32C of what was read.
        crc: u32,
        /// Outcome of the read.
        status: Status,
    },
    /// Orderly end: the sender saw `blocks` blocks / `bytes` bytes complete.
    Fin {
        /// Blocks completed.
        blocks: u64,
        /// Bytes completed.
        bytes: u64,
    },
    /// Disorderly end; the connection is closed after this.
    Abort {
        /// Why.
        status: Status,
        /// The block concerned, or `u64::MAX` if none.
        seq: u64,
    },
}

/// Wire type codes.
mod kind {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const BUFFER_READY: u8 = 3;
    pub const BLOCK_SENT: u8 = 4;
    pub const BLOCK_WRITTEN: u8 = 5;
    pub const VERIFY_REQUEST: u8 = 6;
    pub const VERIFY_RESULT: u8 = 7;
    pub const FIN: u8 = 8;
    pub const ABORT: u8 = 9;
}

/// Why a message or a conversation step was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Fewer or more than [`MSG_LEN`] bytes arrived.
    #[error("message is {got} bytes, expected {MSG_LEN}: the peer is not a peerpipe replicator or the link truncated it")]
    BadLength {
        /// Bytes received.
        got: usize,
    },
    /// The magic number is wrong.
    #[error("bad magic {got:#010x}: the peer is not a peerpipe replicator")]
    BadMagic {
        /// Value received.
        got: u32,
    },
    /// The version is not ours.
    #[error(
        "protocol version {got}, this build speaks {VERSION}: run the same peerpipe on both ends"
    )]
    BadVersion {
        /// Version received.
        got: u8,
    },
    /// Unknown message type.
    #[error("unknown message type {got}")]
    UnknownKind {
        /// Type code received.
        got: u8,
    },
    /// Reserved or padding bytes are not zero.
    #[error("non-zero reserved bytes in a {kind} message")]
    Reserved {
        /// Message kind.
        kind: &'static str,
    },
    /// A field is out of its range regardless of context.
    #[error("{kind}: {what}")]
    BadField {
        /// Message kind.
        kind: &'static str,
        /// What is wrong.
        what: &'static str,
    },
    /// The proposed configuration is invalid.
    #[error("bad configuration: {what}")]
    BadConfig {
        /// What is wrong.
        what: &'static str,
    },
    /// The message is not allowed in the current state (e.g. data before hello).
    #[error("unexpected {got} message while {state}")]
    Unexpected {
        /// Message kind received.
        got: &'static str,
        /// What the receiver was waiting for.
        state: &'static str,
    },
    /// A sequence number is outside the range, repeated, or out of the required order.
    #[error("{kind}: sequence {seq} rejected: {why}")]
    BadSequence {
        /// Message kind.
        kind: &'static str,
        /// Sequence number received.
        seq: u64,
        /// Why.
        why: &'static str,
    },
    /// An offset/length does not match the block it names.
    #[error("{kind} seq {seq}: {what} is {got}, expected {expected}")]
    Mismatch {
        /// Message kind.
        kind: &'static str,
        /// Block.
        seq: u64,
        /// Field.
        what: &'static str,
        /// Value received.
        got: u64,
        /// Value required.
        expected: u64,
    },
    /// The peer aborted.
    #[error("peer aborted: {status} (block {seq})")]
    PeerAborted {
        /// Peer's reason.
        status: Status,
        /// Block concerned, `u64::MAX` if none.
        seq: u64,
    },
}

impl ProtocolError {
    /// Small stable number for [`Status::Protocol`] in an abort sent to the offender.
    pub fn code(&self) -> u16 {
        match self {
            ProtocolError::BadLength { .. } => 1,
            ProtocolError::BadMagic { .. } => 2,
            ProtocolError::BadVersion { .. } => 3,
            ProtocolError::UnknownKind { .. } => 4,
            ProtocolError::Reserved { .. } => 5,
            ProtocolError::BadField { .. } => 6,
            ProtocolError::BadConfig { .. } => 7,
            ProtocolError::Unexpected { .. } => 8,
            ProtocolError::BadSequence { .. } => 9,
            ProtocolError::Mismatch { .. } => 10,
            ProtocolError::PeerAborted { .. } => 11,
        }
    }
}

/// Little-endian writer into a fixed message buffer.
struct Writer {
    buf: [u8; MSG_LEN],
    at: usize,
}

impl Writer {
    fn new(k: u8) -> Writer {
        let mut buf = [0u8; MSG_LEN];
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[4] = VERSION;
        buf[5] = k;
        Writer {
            buf,
            at: HEADER_LEN,
        }
    }
    fn u32(mut self, v: u32) -> Self {
        self.buf[self.at..self.at + 4].copy_from_slice(&v.to_le_bytes());
        self.at += 4;
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.buf[self.at..self.at + 8].copy_from_slice(&v.to_le_bytes());
        self.at += 8;
        self
    }
}

/// Little-endian reader that ends by checking the unused tail is zero.
struct Reader<'a> {
    buf: &'a [u8; MSG_LEN],
    at: usize,
    kind: &'static str,
}

impl Reader<'_> {
    fn u32(&mut self) -> u32 {
        let v = u32::from_le_bytes(self.buf[self.at..self.at + 4].try_into().unwrap_or([0; 4]));
        self.at += 4;
        v
    }
    fn u64(&mut self) -> u64 {
        let v = u64::from_le_bytes(self.buf[self.at..self.at + 8].try_into().unwrap_or([0; 8]));
        self.at += 8;
        v
    }
    fn status(&mut self) -> Result<Status, ProtocolError> {
        Status::from_wire(self.u32()).map_err(|_| ProtocolError::BadField {
            kind: self.kind,
            what: "unknown status kind",
        })
    }
    fn finish(self) -> Result<(), ProtocolError> {
        if self.buf[self.at..].iter().any(|&b| b != 0) {
            return Err(ProtocolError::Reserved { kind: self.kind });
        }
        Ok(())
    }
}

impl Message {
    /// Short name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::HelloAck { .. } => "hello-ack",
            Message::BufferReady { .. } => "buffer-ready",
            Message::BlockSent { .. } => "block-sent",
            Message::BlockWritten { .. } => "block-written",
            Message::VerifyRequest { .. } => "verify-request",
            Message::VerifyResult { .. } => "verify-result",
            Message::Fin { .. } => "fin",
            Message::Abort { .. } => "abort",
        }
    }

    /// Serialises into the fixed wire form.
    pub fn encode(&self) -> [u8; MSG_LEN] {
        let w = match *self {
            Message::Hello(c) => Writer::new(kind::HELLO)
                .u32(c.replica_id)
                .u32(c.block_size)
                .u32(c.lba_size)
                .u32(c.window)
                .u64(c.range_offset)
                .u64(c.range_len)
                .u32(c.flags),
            Message::HelloAck {
                replica_id,
                window,
                capacity,
            } => Writer::new(kind::HELLO_ACK)
                .u32(replica_id)
                .u32(window)
                .u64(capacity),
            Message::BufferReady {
                seq,
                addr,
                rkey,
                len,
            } => Writer::new(kind::BUFFER_READY)
                .u64(seq)
                .u64(addr)
                .u32(rkey)
                .u32(len),
            Message::BlockSent {
                seq,
                offset,
                len,
                crc,
            } => Writer::new(kind::BLOCK_SENT)
                .u64(seq)
                .u64(offset)
                .u32(len)
                .u32(crc),
            Message::BlockWritten { seq, status } => Writer::new(kind::BLOCK_WRITTEN)
                .u64(seq)
                .u32(status.to_wire()),
            Message::VerifyRequest { seq } => Writer::new(kind::VERIFY_REQUEST).u64(seq),
            Message::VerifyResult {
                seq,
                len,
                crc,
                status,
            } => Writer::new(kind::VERIFY_RESULT)
                .u64(seq)
                .u32(len)
                .u32(crc)
                .u32(status.to_wire()),
            Message::Fin { blocks, bytes } => Writer::new(kind::FIN).u64(blocks).u64(bytes),
            Message::Abort { status, seq } => {
                Writer::new(kind::ABORT).u32(status.to_wire()).u64(seq)
            }
        };
        w.buf
    }

    /// Parses and checks one message (context-free checks only; see [`PrimarySide`] and
    /// [`ReplicaSide`] for the rest).
    ///
    /// # Errors
    /// A [`ProtocolError`] describing the first defect found. Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
        let buf: &[u8; MSG_LEN] = bytes
            .try_into()
            .map_err(|_| ProtocolError::BadLength { got: bytes.len() })?;
        let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { got: magic });
        }
        if buf[4] != VERSION {
            return Err(ProtocolError::BadVersion { got: buf[4] });
        }
        let k = buf[5];
        let name = match k {
            kind::HELLO => "hello",
            kind::HELLO_ACK => "hello-ack",
            kind::BUFFER_READY => "buffer-ready",
            kind::BLOCK_SENT => "block-sent",
            kind::BLOCK_WRITTEN => "block-written",
            kind::VERIFY_REQUEST => "verify-request",
            kind::VERIFY_RESULT => "verify-result",
            kind::FIN => "fin",
            kind::ABORT => "abort",
            got => return Err(ProtocolError::UnknownKind { got }),
        };
        if buf[6] != 0 || buf[7] != 0 {
            return Err(ProtocolError::Reserved { kind: name });
        }
        let mut r = Reader {
            buf,
            at: HEADER_LEN,
            kind: name,
        };
        let bad = |what| ProtocolError::BadField { kind: name, what };
        let msg = match k {
            kind::HELLO => {
                let c = Config {
                    replica_id: r.u32(),
                    block_size: r.u32(),
                    lba_size: r.u32(),
                    window: r.u32(),
                    range_offset: r.u64(),
                    range_len: r.u64(),
                    flags: r.u32(),
                };
                c.validate()?;
                Message::Hello(c)
            }
            kind::HELLO_ACK => {
                let m = Message::HelloAck {
                    replica_id: r.u32(),
                    window: r.u32(),
                    capacity: r.u64(),
                };
                if let Message::HelloAck { window, .. } = m {
                    if window == 0 || window > MAX_WINDOW {
                        return Err(bad("window must be 1..=4096"));
                    }
                }
                m
            }
            kind::BUFFER_READY => {
                let (seq, addr, rkey, len) = (r.u64(), r.u64(), r.u32(), r.u32());
                if len == 0 || len > MAX_BLOCK_SIZE {
                    return Err(bad("len must be 1..=64 MiB"));
                }
                if addr.checked_add(u64::from(len)).is_none() {
                    return Err(bad("addr + len overflows"));
                }
                Message::BufferReady {
                    seq,
                    addr,
                    rkey,
                    len,
                }
            }
            kind::BLOCK_SENT => {
                let (seq, offset, len, crc) = (r.u64(), r.u64(), r.u32(), r.u32());
                if len == 0 || len > MAX_BLOCK_SIZE {
                    return Err(bad("len must be 1..=64 MiB"));
                }
                Message::BlockSent {
                    seq,
                    offset,
                    len,
                    crc,
                }
            }
            kind::BLOCK_WRITTEN => {
                let seq = r.u64();
                let status = r.status()?;
                Message::BlockWritten { seq, status }
            }
            kind::VERIFY_REQUEST => Message::VerifyRequest { seq: r.u64() },
            kind::VERIFY_RESULT => {
                let (seq, len, crc) = (r.u64(), r.u32(), r.u32());
                let status = r.status()?;
                if len > MAX_BLOCK_SIZE {
                    return Err(bad("len must be <= 64 MiB"));
                }
                Message::VerifyResult {
                    seq,
                    len,
                    crc,
                    status,
                }
            }
            kind::FIN => Message::Fin {
                blocks: r.u64(),
                bytes: r.u64(),
            },
            _ => {
                let status = r.status()?;
                Message::Abort {
                    status,
                    seq: r.u64(),
                }
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Tracks per-block protocol state for one side: which sequence numbers were seen.
///
/// Uses one byte per block; ranges are at most a few million blocks.
#[derive(Debug)]
struct SeqStates {
    state: Vec<u8>,
}

impl SeqStates {
    fn new(blocks: u64) -> SeqStates {
        SeqStates {
            state: vec![0; usize::try_from(blocks).unwrap_or(usize::MAX).min(1 << 32)],
        }
    }
    fn get(&self, seq: u64) -> Option<u8> {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.state.get(i).copied())
    }
    fn set(&mut self, seq: u64, v: u8) {
        if let Some(s) = usize::try_from(seq)
            .ok()
            .and_then(|i| self.state.get_mut(i))
        {
            *s = v;
        }
    }
    /// `Ok` if `seq` is in state `want`, else the [`ProtocolError::BadSequence`] for a `kind`
    /// message, saying `why`.
    fn expect(
        &self,
        seq: u64,
        want: u8,
        kind: &'static str,
        why: &'static str,
    ) -> Result<(), ProtocolError> {
        if self.get(seq) == Some(want) {
            Ok(())
        } else {
            Err(ProtocolError::BadSequence { kind, seq, why })
        }
    }
    /// [`expect`](Self::expect) `from`, then move `seq` to `to`.
    fn advance(
        &mut self,
        seq: u64,
        from: u8,
        to: u8,
        kind: &'static str,
        why: &'static str,
    ) -> Result<(), ProtocolError> {
        self.expect(seq, from, kind, why)?;
        self.set(seq, to);
        Ok(())
    }
}

// Primary-side block states.
// 0: not advertised yet.
const P_ADVERTISED: u8 = 1;
const P_SENT: u8 = 2;
const P_ACKED: u8 = 3;
const P_VERIFY_ASKED: u8 = 4;
const P_VERIFIED: u8 = 5;

/// Validates what a primary receives from one replica.
#[derive(Debug)]
pub struct PrimarySide {
    config: Config,
    window: Option<u32>,
    next_advert: u64,
    /// Advertised but not yet acked blocks (must stay <= window).
    open: u64,
    states: SeqStates,
    finished: bool,
}

impl PrimarySide {
    /// Starts a conversation the primary opened with `Hello(config)`.
    ///
    /// # Errors
    /// [`ProtocolError::BadConfig`] if `config` is invalid.
    pub fn new(config: Config) -> Result<PrimarySide, ProtocolError> {
        config.validate()?;
        Ok(PrimarySide {
            config,
            window: None,
            next_advert: 0,
            open: 0,
            states: SeqStates::new(config.blocks()),
            finished: false,
        })
    }

    /// The configuration sent.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Records that the primary sent `BlockSent` for `seq` (after its RDMA write).
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if `seq` was not advertised or was already sent; this is
    /// a bug on the primary, reported rather than sent.
    pub fn on_sent(&mut self, seq: u64) -> Result<(), ProtocolError> {
        self.states.advance(
            seq,
            P_ADVERTISED,
            P_SENT,
            "block-sent",
            "not advertised or already sent",
        )?;
        Ok(())
    }

    /// Records that the primary sent `VerifyRequest` for `seq`.
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if `seq` is not acked yet or was already asked.
    pub fn on_verify_request(&mut self, seq: u64) -> Result<(), ProtocolError> {
        self.states.advance(
            seq,
            P_ACKED,
            P_VERIFY_ASKED,
            "verify-request",
            "block not acked or already verified",
        )?;
        Ok(())
    }

    /// Checks a message received from the replica against everything said so far.
    ///
    /// # Errors
    /// The [`ProtocolError`] to end the connection with ([`ProtocolError::PeerAborted`] for
    /// an abort).
    pub fn on_receive(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        let unexpected = |state| {
            Err(ProtocolError::Unexpected {
                got: msg.name(),
                state,
            })
        };
        if let Message::Abort { status, seq } = *msg {
            return Err(ProtocolError::PeerAborted { status, seq });
        }
        let Some(window) = self.window else {
            let Message::HelloAck {
                replica_id,
                window,
                capacity,
            } = *msg
            else {
                return unexpected("waiting for hello-ack");
            };
            if replica_id != self.config.replica_id {
                return Err(ProtocolError::Mismatch {
                    kind: "hello-ack",
                    seq: 0,
                    what: "replica_id",
                    got: replica_id.into(),
                    expected: self.config.replica_id.into(),
                });
            }
            if window > self.config.window {
                return Err(ProtocolError::Mismatch {
                    kind: "hello-ack",
                    seq: 0,
                    what: "window (more than proposed)",
                    got: window.into(),
                    expected: self.config.window.into(),
                });
            }
            let end = self.config.range_offset + self.config.range_len;
            if capacity < end {
                return Err(ProtocolError::Mismatch {
                    kind: "hello-ack",
                    seq: 0,
                    what: "capacity (range end beyond replica target)",
                    got: capacity,
                    expected: end,
                });
            }
            self.window = Some(window);
            return Ok(());
        };
        if self.finished {
            return unexpected("finished");
        }
        match *msg {
            Message::BufferReady { seq, len, .. } => {
                let Some(want) = self.config.block_len(seq) else {
                    return Err(ProtocolError::BadSequence {
                        kind: "buffer-ready",
                        seq,
                        why: "beyond the last block",
                    });
                };
                if seq != self.next_advert {
                    return Err(ProtocolError::BadSequence {
                        kind: "buffer-ready",
                        seq,
                        why: "advertisements must come in sequence order",
                    });
                }
                if len != want {
                    return Err(ProtocolError::Mismatch {
                        kind: "buffer-ready",
                        seq,
                        what: "len",
                        got: len.into(),
                        expected: want.into(),
                    });
                }
                if self.open >= u64::from(window) {
                    return Err(ProtocolError::BadSequence {
                        kind: "buffer-ready",
                        seq,
                        why: "more buffers advertised than the granted window",
                    });
                }
                self.states.set(seq, P_ADVERTISED);
                self.next_advert += 1;
                self.open += 1;
                Ok(())
            }
            Message::BlockWritten { seq, .. } => {
                self.states.advance(
                    seq,
                    P_SENT,
                    P_ACKED,
                    "block-written",
                    "block was not sent or was already acked",
                )?;
                self.open -= 1;
                Ok(())
            }
            Message::VerifyResult { seq, len, .. } => {
                self.states.expect(
                    seq,
                    P_VERIFY_ASKED,
                    "verify-result",
                    "no verify request outstanding for this block",
                )?;
                let want = self.config.block_len(seq).unwrap_or(0);
                if len != want {
                    return Err(ProtocolError::Mismatch {
                        kind: "verify-result",
                        seq,
                        what: "len",
                        got: len.into(),
                        expected: want.into(),
                    });
                }
                self.states.set(seq, P_VERIFIED);
                Ok(())
            }
            Message::Fin { .. } => {
                self.finished = true;
                Ok(())
            }
            _ => unexpected("replicating"),
        }
    }
}

// Replica-side block states.
const R_NONE: u8 = 0;
const R_ADVERTISED: u8 = 1;
const R_RECEIVED: u8 = 2;
const R_ACKED: u8 = 3;

/// Validates what a replica receives from the primary.
#[derive(Debug)]
pub struct ReplicaSide {
    config: Option<Config>,
    capacity: u64,
    states: SeqStates,
    finished: bool,
}

impl ReplicaSide {
    /// A replica whose target holds `capacity` bytes.
    pub fn new(capacity: u64) -> ReplicaSide {
        ReplicaSide {
            config: None,
            capacity,
            states: SeqStates::new(0),
            finished: false,
        }
    }

    /// The accepted configuration, once hello arrived.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// Records that the replica advertised `seq`.
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if `seq` is outside the range or already advertised.
    pub fn on_advertise(&mut self, seq: u64) -> Result<(), ProtocolError> {
        self.states.advance(
            seq,
            R_NONE,
            R_ADVERTISED,
            "buffer-ready",
            "outside the range or already advertised",
        )?;
        Ok(())
    }

    /// Records that the replica acked `seq`.
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if `seq` was not received.
    pub fn on_ack(&mut self, seq: u64) -> Result<(), ProtocolError> {
        self.states.advance(
            seq,
            R_RECEIVED,
            R_ACKED,
            "block-written",
            "block not received or already acked",
        )?;
        Ok(())
    }

    /// Checks a message received from the primary.
    ///
    /// # Errors
    /// The [`ProtocolError`] to end the connection with.
    pub fn on_receive(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        let unexpected = |state| {
            Err(ProtocolError::Unexpected {
                got: msg.name(),
                state,
            })
        };
        if let Message::Abort { status, seq } = *msg {
            return Err(ProtocolError::PeerAborted { status, seq });
        }
        let Some(config) = self.config else {
            let Message::Hello(c) = *msg else {
                return unexpected("waiting for hello");
            };
            c.validate()?;
            let end = c.range_offset + c.range_len;
            if end > self.capacity {
                return Err(ProtocolError::Mismatch {
                    kind: "hello",
                    seq: 0,
                    what: "range end (beyond this replica's target)",
                    got: end,
                    expected: self.capacity,
                });
            }
            self.states = SeqStates::new(c.blocks());
            self.config = Some(c);
            return Ok(());
        };
        if self.finished {
            return unexpected("finished");
        }
        match *msg {
            Message::BlockSent {
                seq, offset, len, ..
            } => {
                let Some(want) = config.block_len(seq) else {
                    return Err(ProtocolError::BadSequence {
                        kind: "block-sent",
                        seq,
                        why: "beyond the last block",
                    });
                };
                self.states.expect(
                    seq,
                    R_ADVERTISED,
                    "block-sent",
                    "no buffer advertised for it, or already received",
                )?;
                let want_off = config.block_offset(seq);
                if offset != want_off {
                    return Err(ProtocolError::Mismatch {
                        kind: "block-sent",
                        seq,
                        what: "offset",
                        got: offset,
                        expected: want_off,
                    });
                }
                if len != want {
                    return Err(ProtocolError::Mismatch {
                        kind: "block-sent",
                        seq,
                        what: "len",
                        got: len.into(),
                        expected: want.into(),
                    });
                }
                self.states.set(seq, R_RECEIVED);
                Ok(())
            }
            Message::VerifyRequest { seq } => {
                self.states
                    .expect(seq, R_ACKED, "verify-request", "block not written here")?;
                Ok(())
            }
            Message::Fin { .. } => {
                self.finished = true;
                Ok(())
            }
            _ => unexpected("replicating"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            replica_id: 1,
            block_size: 8192,
            lba_size: 512,
            window: 4,
            range_offset: 4096,
            range_len: 3 * 8192 + 1024,
            flags: flags::VERIFY,
        }
    }

    fn all_kinds() -> Vec<Message> {
        vec![
            Message::Hello(cfg()),
            Message::HelloAck {
                replica_id: 1,
                window: 4,
                capacity: 1 << 30,
            },
            Message::BufferReady {
                seq: 3,
                addr: 0x7f00_0000_1000,
                rkey: 0xdead_beef,
                len: 1024,
            },
            Message::BlockSent {
                seq: 3,
                offset: 4096 + 3 * 8192,
                len: 1024,
                crc: 0x1234_5678,
            },
            Message::BlockWritten {
                seq: 7,
                status: Status::Nvme(0x0281),
            },
            Message::VerifyRequest { seq: 9 },
            Message::VerifyResult {
                seq: 9,
                len: 8192,
                crc: 1,
                status: Status::Ok,
            },
            Message::Fin {
                blocks: 4,
                bytes: 3 * 8192 + 1024,
            },
            Message::Abort {
                status: Status::Errno(5),
                seq: u64::MAX,
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for m in all_kinds() {
            let wire = m.encode();
            assert_eq!(wire.len(), MSG_LEN);
            assert_eq!(&wire[0..4], b"PPRP");
            assert_eq!(Message::decode(&wire), Ok(m), "{}", m.name());
        }
    }

    #[test]
    fn encoding_is_little_endian_and_fixed() {
        let w = Message::BufferReady {
            seq: 0x0102,
            addr: 0x0a0b,
            rkey: 0x11223344,
            len: 512,
        }
        .encode();
        assert_eq!(w[5], 3);
        assert_eq!(&w[8..16], &[0x02, 0x01, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&w[16..24], &[0x0b, 0x0a, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&w[24..28], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&w[28..32], &[0, 2, 0, 0]);
        assert!(w[32..].iter().all(|&b| b == 0));
    }

    #[test]
    fn truncated_and_oversized_are_rejected() {
        let w = Message::VerifyRequest { seq: 1 }.encode();
        for n in [0, 1, 8, 63] {
            assert_eq!(
                Message::decode(&w[..n]),
                Err(ProtocolError::BadLength { got: n })
            );
        }
        let mut long = w.to_vec();
        long.push(0);
        assert_eq!(
            Message::decode(&long),
            Err(ProtocolError::BadLength { got: 65 })
        );
    }

    #[test]
    fn header_defects_are_rejected() {
        let good = Message::Fin {
            blocks: 1,
            bytes: 2,
        }
        .encode();
        let mut w = good;
        w[0] ^= 1;
        assert!(matches!(
            Message::decode(&w),
            Err(ProtocolError::BadMagic { .. })
        ));
        let mut w = good;
        w[4] = 2;
        assert_eq!(
            Message::decode(&w),
            Err(ProtocolError::BadVersion { got: 2 })
        );
        for k in [0u8, 10, 200, 255] {
            let mut w = good;
            w[5] = k;
            assert_eq!(
                Message::decode(&w),
                Err(ProtocolError::UnknownKind { got: k })
            );
        }
        let mut w = good;
        w[7] = 1;
        assert_eq!(
            Message::decode(&w),
            Err(ProtocolError::Reserved { kind: "fin" })
        );
        // Padding after the body must be zero too.
        let mut w = good;
        w[63] = 1;
        assert_eq!(
            Message::decode(&w),
            Err(ProtocolError::Reserved { kind: "fin" })
        );
    }

    #[test]
    fn field_bounds_are_checked() {
        let mut w = Message::BufferReady {
            seq: 0,
            addr: u64::MAX - 10,
            rkey: 1,
            len: 512,
        }
        .encode();
        assert!(matches!(
            Message::decode(&w),
            Err(ProtocolError::BadField { .. })
        ));
        w = Message::BlockSent {
            seq: 0,
            offset: 0,
            len: 0,
            crc: 0,
        }
        .encode();
        assert!(matches!(
            Message::decode(&w),
            Err(ProtocolError::BadField { .. })
        ));
        w = Message::BlockWritten {
            seq: 0,
            status: Status::Ok,
        }
        .encode();
        w[16..20].copy_from_slice(&(9u32 << 16).to_le_bytes());
        assert!(matches!(
            Message::decode(&w),
            Err(ProtocolError::BadField { .. })
        ));
        // Bad configurations.
        for c in [
            Config {
                block_size: 1000,
                ..cfg()
            },
            Config {
                lba_size: 3,
                ..cfg()
            },
            Config { window: 0, ..cfg() },
            Config {
                range_len: 0,
                ..cfg()
            },
            Config {
                range_offset: 100,
                ..cfg()
            },
            Config {
                range_offset: u64::MAX - 511,
                ..cfg()
            },
            Config {
                flags: 1 << 7,
                ..cfg()
            },
            Config {
                block_size: MAX_BLOCK_SIZE * 2,
                ..cfg()
            },
        ] {
            assert!(
                matches!(
                    Message::decode(&Message::Hello(c).encode()),
                    Err(ProtocolError::BadConfig { .. })
                ),
                "{c:?}"
            );
        }
    }

    #[test]
    fn status_wire_form() {
        for s in [
            Status::Ok,
            Status::Errno(28),
            Status::Nvme(0x4002),
            Status::Protocol(9),
            Status::Refused(1),
        ] {
            assert_eq!(Status::from_wire(s.to_wire()), Ok(s));
        }
        assert!(Status::from_wire(5).is_err(), "ok kind with a value");
        assert!(Status::Errno(5).to_string().contains("errno 5"));
    }

    /// A complete, well-behaved conversation with a short final block.
    #[test]
    fn conversation_in_order_is_accepted() {
        let c = cfg();
        assert_eq!(c.blocks(), 4);
        assert_eq!(c.block_len(3), Some(1024));
        assert_eq!(c.block_len(4), None);
        let mut p = PrimarySide::new(c).unwrap();
        let mut r = ReplicaSide::new(1 << 20);
        r.on_receive(&Message::Hello(c)).unwrap();
        p.on_receive(&Message::HelloAck {
            replica_id: 1,
            window: 2,
            capacity: 1 << 20,
        })
        .unwrap();
        for seq in 0..c.blocks() {
            let len = c.block_len(seq).unwrap();
            r.on_advertise(seq).unwrap();
            p.on_receive(&Message::BufferReady {
                seq,
                addr: 0x1000,
                rkey: 5,
                len,
            })
            .unwrap();
            p.on_sent(seq).unwrap();
            r.on_receive(&Message::BlockSent {
                seq,
                offset: c.block_offset(seq),
                len,
                crc: 0,
            })
            .unwrap();
            r.on_ack(seq).unwrap();
            p.on_receive(&Message::BlockWritten {
                seq,
                status: Status::Ok,
            })
            .unwrap();
            p.on_verify_request(seq).unwrap();
            r.on_receive(&Message::VerifyRequest { seq }).unwrap();
            p.on_receive(&Message::VerifyResult {
                seq,
                len,
                crc: 0,
                status: Status::Ok,
            })
            .unwrap();
        }
        r.on_receive(&Message::Fin {
            blocks: 4,
            bytes: c.range_len,
        })
        .unwrap();
        p.on_receive(&Message::Fin {
            blocks: 4,
            bytes: c.range_len,
        })
        .unwrap();
        // Nothing may follow fin.
        assert!(matches!(
            p.on_receive(&Message::BlockWritten {
                seq: 0,
                status: Status::Ok
            }),
            Err(ProtocolError::Unexpected { .. })
        ));
    }

    fn primary_ready(window: u32) -> PrimarySide {
        let mut p = PrimarySide::new(cfg()).unwrap();
        p.on_receive(&Message::HelloAck {
            replica_id: 1,
            window,
            capacity: 1 << 20,
        })
        .unwrap();
        p
    }

    #[test]
    fn primary_rejects_bad_replica_behaviour() {
        // Data before hello-ack.
        let mut p = PrimarySide::new(cfg()).unwrap();
        let adv0 = Message::BufferReady {
            seq: 0,
            addr: 0,
            rkey: 1,
            len: 8192,
        };
        assert!(matches!(
            p.on_receive(&adv0),
            Err(ProtocolError::Unexpected { .. })
        ));
        // Hello-ack with wrong id / too big window / too small capacity.
        for (id, w, cap) in [(2, 4, 1 << 20), (1, 5, 1 << 20), (1, 4, 8192)] {
            let mut p = PrimarySide::new(cfg()).unwrap();
            assert!(matches!(
                p.on_receive(&Message::HelloAck {
                    replica_id: id,
                    window: w,
                    capacity: cap
                }),
                Err(ProtocolError::Mismatch { .. })
            ));
        }
        // Out of order advertisement.
        let mut p = primary_ready(4);
        let adv = |seq, len| Message::BufferReady {
            seq,
            addr: 0,
            rkey: 1,
            len,
        };
        assert!(matches!(
            p.on_receive(&adv(1, 8192)),
            Err(ProtocolError::BadSequence { .. })
        ));
        // Wrong length (the short last block must be advertised exactly).
        let mut p = primary_ready(4);
        assert!(matches!(
            p.on_receive(&adv(0, 4096)),
            Err(ProtocolError::Mismatch { .. })
        ));
        for s in 0..3 {
            p.on_receive(&adv(s, 8192)).unwrap();
        }
        assert!(matches!(
            p.on_receive(&adv(3, 8192)),
            Err(ProtocolError::Mismatch { .. })
        ));
        // Beyond the range.
        p.on_receive(&adv(3, 1024)).unwrap();
        assert!(matches!(
            p.on_receive(&adv(4, 1024)),
            Err(ProtocolError::BadSequence { .. })
        ));
        // Window overrun.
        let mut p = primary_ready(2);
        p.on_receive(&adv(0, 8192)).unwrap();
        p.on_receive(&adv(1, 8192)).unwrap();
        assert!(matches!(
            p.on_receive(&adv(2, 8192)),
            Err(ProtocolError::BadSequence { .. })
        ));
        // An ack frees a window slot.
        p.on_sent(0).unwrap();
        let ack0 = Message::BlockWritten {
            seq: 0,
            status: Status::Ok,
        };
        p.on_receive(&ack0).unwrap();
        p.on_receive(&adv(2, 8192)).unwrap();
        // Duplicate ack, ack of an unsent block.
        assert!(matches!(
            p.on_receive(&ack0),
            Err(ProtocolError::BadSequence { .. })
        ));
        assert!(matches!(
            p.on_receive(&Message::BlockWritten {
                seq: 1,
                status: Status::Ok
            }),
            Err(ProtocolError::BadSequence { .. })
        ));
        // Primary-side misuse: sending an unadvertised block.
        assert!(p.on_sent(3).is_err());
        // Verify result without request.
        assert!(matches!(
            p.on_receive(&Message::VerifyResult {
                seq: 0,
                len: 8192,
                crc: 0,
                status: Status::Ok
            }),
            Err(ProtocolError::BadSequence { .. })
        ));
        // Messages a replica never sends.
        assert!(matches!(
            p.on_receive(&Message::Hello(cfg())),
            Err(ProtocolError::Unexpected { .. })
        ));
        // Abort surfaces as such.
        assert_eq!(
            p.on_receive(&Message::Abort {
                status: Status::Errno(5),
                seq: 2
            }),
            Err(ProtocolError::PeerAborted {
                status: Status::Errno(5),
                seq: 2
            })
        );
    }

    #[test]
    fn replica_rejects_bad_primary_behaviour() {
        let c = cfg();
        let mut r = ReplicaSide::new(1 << 20);
        let sent0 = Message::BlockSent {
            seq: 0,
            offset: c.range_offset,
            len: 8192,
            crc: 0,
        };
        assert!(matches!(
            r.on_receive(&sent0),
            Err(ProtocolError::Unexpected { .. })
        ));
        // Range beyond the replica's target.
        let mut small = ReplicaSide::new(8192);
        assert!(matches!(
            small.on_receive(&Message::Hello(c)),
            Err(ProtocolError::Mismatch { .. })
        ));
        r.on_receive(&Message::Hello(c)).unwrap();
        // Not advertised yet.
        assert!(matches!(
            r.on_receive(&sent0),
            Err(ProtocolError::BadSequence { .. })
        ));
        r.on_advertise(0).unwrap();
        assert!(r.on_advertise(0).is_err(), "double advertisement");
        assert!(r.on_advertise(4).is_err(), "beyond the range");
        // Offset outside the block: would write outside the target range.
        assert!(matches!(
            r.on_receive(&Message::BlockSent {
                seq: 0,
                offset: 0,
                len: 8192,
                crc: 0
            }),
            Err(ProtocolError::Mismatch { what: "offset", .. })
        ));
        assert!(matches!(
            r.on_receive(&Message::BlockSent {
                seq: 0,
                offset: c.range_offset,
                len: 4096,
                crc: 0
            }),
            Err(ProtocolError::Mismatch { what: "len", .. })
        ));
        r.on_receive(&sent0).unwrap();
        assert!(
            matches!(r.on_receive(&sent0), Err(ProtocolError::BadSequence { .. })),
            "duplicate"
        );
        assert!(matches!(
            r.on_receive(&Message::VerifyRequest { seq: 0 }),
            Err(ProtocolError::BadSequence { .. })
        ));
        r.on_ack(0).unwrap();
        assert!(r.on_ack(0).is_err());
        r.on_receive(&Message::VerifyRequest { seq: 0 }).unwrap();
        assert!(matches!(
            r.on_receive(&Message::HelloAck {
                replica_id: 1,
                window: 1,
                capacity: 0
            }),
            Err(ProtocolError::Unexpected { .. })
        ));
    }

    /// Tiny xorshift generator: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Random bytes, random lengths and mutated valid messages: decode and the state machines
    /// never panic; anything decoded re-encodes to the same bytes (canonical form).
    #[test]
    fn fuzz_random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = all_kinds();
        let mut p = primary_ready(4);
        let mut r = ReplicaSide::new(1 << 20);
        r.on_receive(&Message::Hello(cfg())).unwrap();
        let mut decoded = 0;
        for i in 0..200_000u32 {
            let mut buf = match i % 3 {
                0 => {
                    let mut b = vec![0u8; (rng.next() % 80) as usize];
                    b.iter_mut().for_each(|x| *x = rng.next() as u8);
                    b
                }
                _ => {
                    let mut b = seeds[(rng.next() % seeds.len() as u64) as usize]
                        .encode()
                        .to_vec();
                    for _ in 0..=(rng.next() % 3) {
                        let at = (rng.next() % MSG_LEN as u64) as usize;
                        b[at] = rng.next() as u8;
                    }
                    b
                }
            };
            if i % 7 == 0 {
                buf.truncate((rng.next() % 65) as usize);
            }
            if let Ok(m) = Message::decode(&buf) {
                decoded += 1;
                assert_eq!(&m.encode()[..], &buf[..], "non-canonical accept");
                let _ = p.on_receive(&m);
                let _ = r.on_receive(&m);
            }
        }
        assert!(decoded > 1000, "mutations should often stay valid");
    }
}
