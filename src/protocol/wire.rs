//! Message encoding and context-free decoding.

use std::fmt;

use super::{
    Config, ProtocolError, Status, HEADER_LEN, MAGIC, MAX_BLOCK_SIZE, MAX_WINDOW, MSG_LEN, VERSION,
};

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

/// The type code in byte 5 of every message header.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::HelloAck`].
    HelloAck = 2,
    /// [`Message::BufferReady`].
    BufferReady = 3,
    /// [`Message::BlockSent`].
    BlockSent = 4,
    /// [`Message::BlockWritten`].
    BlockWritten = 5,
    /// [`Message::VerifyRequest`].
    VerifyRequest = 6,
    /// [`Message::VerifyResult`].
    VerifyResult = 7,
    /// [`Message::Fin`].
    Fin = 8,
    /// [`Message::Abort`].
    Abort = 9,
}

impl MessageKind {
    /// Short name for errors and logs (`"block-sent"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Hello => "hello",
            MessageKind::HelloAck => "hello-ack",
            MessageKind::BufferReady => "buffer-ready",
            MessageKind::BlockSent => "block-sent",
            MessageKind::BlockWritten => "block-written",
            MessageKind::VerifyRequest => "verify-request",
            MessageKind::VerifyResult => "verify-result",
            MessageKind::Fin => "fin",
            MessageKind::Abort => "abort",
        }
    }
}

impl TryFrom<u8> for MessageKind {
    type Error = ProtocolError;

    /// The kind with wire code `code`; [`ProtocolError::UnknownKind`] for any other byte.
    fn try_from(code: u8) -> Result<MessageKind, ProtocolError> {
        Ok(match code {
            1 => MessageKind::Hello,
            2 => MessageKind::HelloAck,
            3 => MessageKind::BufferReady,
            4 => MessageKind::BlockSent,
            5 => MessageKind::BlockWritten,
            6 => MessageKind::VerifyRequest,
            7 => MessageKind::VerifyResult,
            8 => MessageKind::Fin,
            9 => MessageKind::Abort,
            got => return Err(ProtocolError::UnknownKind { got }),
        })
    }
}

impl From<MessageKind> for u8 {
    fn from(k: MessageKind) -> u8 {
        k as u8
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Little-endian writer into a fixed message buffer.
struct Writer {
    buf: [u8; MSG_LEN],
    at: usize,
}

impl Writer {
    fn new(k: MessageKind) -> Writer {
        let mut buf = [0u8; MSG_LEN];
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[4] = VERSION;
        buf[5] = k.into();
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
    kind: MessageKind,
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
    /// The message's kind (its wire type code).
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::HelloAck { .. } => MessageKind::HelloAck,
            Message::BufferReady { .. } => MessageKind::BufferReady,
            Message::BlockSent { .. } => MessageKind::BlockSent,
            Message::BlockWritten { .. } => MessageKind::BlockWritten,
            Message::VerifyRequest { .. } => MessageKind::VerifyRequest,
            Message::VerifyResult { .. } => MessageKind::VerifyResult,
            Message::Fin { .. } => MessageKind::Fin,
            Message::Abort { .. } => MessageKind::Abort,
        }
    }

    /// Short name for errors and logs.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Serialises into the fixed wire form.
    pub fn encode(&self) -> [u8; MSG_LEN] {
        let w = match *self {
            Message::Hello(c) => Writer::new(MessageKind::Hello)
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
            } => Writer::new(MessageKind::HelloAck)
                .u32(replica_id)
                .u32(window)
                .u64(capacity),
            Message::BufferReady {
                seq,
                addr,
                rkey,
                len,
            } => Writer::new(MessageKind::BufferReady)
                .u64(seq)
                .u64(addr)
                .u32(rkey)
                .u32(len),
            Message::BlockSent { seq, offset, len } => Writer::new(MessageKind::BlockSent)
                .u64(seq)
                .u64(offset)
                .u32(len),
            Message::BlockWritten { seq, status } => Writer::new(MessageKind::BlockWritten)
                .u64(seq)
                .u32(status.to_wire()),
            Message::VerifyRequest { seq } => Writer::new(MessageKind::VerifyRequest).u64(seq),
            Message::VerifyResult {
                seq,
                len,
                crc,
                status,
            } => Writer::new(MessageKind::VerifyResult)
                .u64(seq)
                .u32(len)
                .u32(crc)
                .u32(status.to_wire()),
            Message::Fin { blocks, bytes } => Writer::new(MessageKind::Fin).u64(blocks).u64(bytes),
            Message::Abort { status, seq } => Writer::new(MessageKind::Abort)
                .u32(status.to_wire())
                .u64(seq),
        };
        w.buf
    }

    /// Parses and checks one message (context-free checks only; see
    /// [`PrimarySide`](super::PrimarySide) and [`ReplicaSide`](super::ReplicaSide) for the
    /// rest).
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
        let k = MessageKind::try_from(buf[5])?;
        if buf[6] != 0 || buf[7] != 0 {
            return Err(ProtocolError::Reserved { kind: k });
        }
        let mut r = Reader {
            buf,
            at: HEADER_LEN,
            kind: k,
        };
        let bad = |what| ProtocolError::BadField { kind: k, what };
        let msg = match k {
            MessageKind::Hello => {
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
            MessageKind::HelloAck => {
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
            MessageKind::BufferReady => {
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
            MessageKind::BlockSent => {
                // Version 1 had a checksum here that nobody checked; it is reserved (zero) now.
                let (seq, offset, len) = (r.u64(), r.u64(), r.u32());
                if len == 0 || len > MAX_BLOCK_SIZE {
                    return Err(bad("len must be 1..=64 MiB"));
                }
                Message::BlockSent { seq, offset, len }
            }
            MessageKind::BlockWritten => {
                let seq = r.u64();
                let status = r.status()?;
                Message::BlockWritten { seq, status }
            }
            MessageKind::VerifyRequest => Message::VerifyRequest { seq: r.u64() },
            MessageKind::VerifyResult => {
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
            MessageKind::Fin => Message::Fin {
                blocks: r.u64(),
                bytes: r.u64(),
            },
            MessageKind::Abort => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::flags;

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
    fn message_kinds_round_trip_their_codes() {
        for m in all_kinds() {
            let k = m.kind();
            assert_eq!(MessageKind::try_from(u8::from(k)), Ok(k));
            assert_eq!(m.encode()[5], k as u8);
            assert_eq!(k.to_string(), m.name());
        }
        for got in [0u8, 10, 255] {
            assert_eq!(
                MessageKind::try_from(got),
                Err(ProtocolError::UnknownKind { got })
            );
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
        // Version 1 (with `BlockSent`'s unchecked checksum) is refused by name.
        for v in [1, VERSION + 1] {
            let mut w = good;
            w[4] = v;
            assert_eq!(
                Message::decode(&w),
                Err(ProtocolError::BadVersion { got: v })
            );
        }
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
            Err(ProtocolError::Reserved {
                kind: MessageKind::Fin
            })
        );
        // Padding after the body must be zero too.
        let mut w = good;
        w[63] = 1;
        assert_eq!(
            Message::decode(&w),
            Err(ProtocolError::Reserved {
                kind: MessageKind::Fin
            })
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

    /// Version 2 dropped `BlockSent`'s unchecked checksum: the bytes it used are reserved.
    #[test]
    fn block_sent_has_no_checksum_field() {
        let mut w = Message::BlockSent {
            seq: 1,
            offset: 4096,
            len: 512,
        }
        .encode();
        assert!(w[28..].iter().all(|&b| b == 0));
        w[28] = 0x78;
        assert_eq!(
            Message::decode(&w),
            Err(ProtocolError::Reserved {
                kind: MessageKind::BlockSent
            })
        );
    }
}
