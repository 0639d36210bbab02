//! The replica's side of a run as a state machine without I/O: it consumes control messages
//! and I/O completions and emits [`ReplicaAction`]s for an adapter (RDMA + io_uring) to carry
//! out. Keeping I/O out makes every rule testable on a host.

use crate::pipeline::range::Layout;
use crate::protocol::{
    Message, MessageKind, ProtocolError, ReplicaSide, ReplicaTarget, Status, MAX_BLOCK_SIZE,
};

/// What the adapter must do next, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaAction {
    /// Send this control message.
    Send(Message),
    /// Grant the primary write access to exactly `len` bytes of buffer `slot` (bind a memory
    /// window) and send `BufferReady { seq, addr, rkey, len }` for it.
    Advertise {
        /// Buffer slot (0..window).
        slot: usize,
        /// Block that will land there.
        seq: u64,
        /// Bytes granted.
        len: u32,
    },
    /// The block is in `slot`: check that its window is revoked (protocol version 3: the
    /// `BlockSent` that asked for this was a SEND_WITH_INV of its key; else the adapter ends
    /// the connection with [`ProtocolError::NotInvalidating`]), write `len` bytes at drive
    /// `offset`, flush if the drive caches writes, then call [`ReplicaCore::on_write_done`].
    Write {
        /// Buffer slot.
        slot: usize,
        /// Block.
        seq: u64,
        /// Drive byte offset (computed here from the validated configuration).
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Read back `len` bytes at `offset`, checksum them, call
    /// [`ReplicaCore::on_readback_done`]. At most the granted window of these is outstanding
    /// (the protocol refuses more), so read-back buffers are bounded by `window * block_size`.
    ReadBack {
        /// Block.
        seq: u64,
        /// Drive byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
    },
}

/// Replica state: configuration, buffer slots and progress.
#[derive(Debug)]
pub struct ReplicaCore {
    capacity: u64,
    side: ReplicaSide,
    layout: Option<Layout>,
    /// Which block each slot holds (advertised or being written).
    slots: Vec<Option<u64>>,
    next_advert: u64,
    written_blocks: u64,
    written_bytes: u64,
    failed_blocks: u64,
    finished: bool,
}

impl ReplicaCore {
    /// A replica whose target holds `capacity` bytes and which has `slots` block buffers of
    /// unknown size, on a target of unknown logical block size: the Hello is checked against
    /// 512-byte logical blocks (the smallest Linux knows) and [`MAX_BLOCK_SIZE`] buffers.
    /// Prefer [`ReplicaCore::with_target`], which checks against the real values.
    pub fn new(capacity: u64, slots: usize) -> ReplicaCore {
        let slots = u32::try_from(slots).unwrap_or(u32::MAX);
        ReplicaCore::with_target(ReplicaTarget::new(capacity, 512, slots, MAX_BLOCK_SIZE))
    }

    /// A replica serving `target`: its real capacity, logical block size (the direct I/O
    /// unit), number of block buffers and bytes per buffer. A Hello whose range does not fit
    /// the capacity, is not aligned to the logical block size, or whose blocks do not fit a
    /// buffer is refused; the window granted is `min(proposed, target.slots)`.
    pub fn with_target(target: ReplicaTarget) -> ReplicaCore {
        ReplicaCore {
            capacity: target.capacity,
            side: ReplicaSide::new(target),
            layout: None,
            slots: Vec::new(),
            next_advert: 0,
            written_blocks: 0,
            written_bytes: 0,
            failed_blocks: 0,
            finished: false,
        }
    }

    /// The accepted layout, once hello arrived.
    pub fn layout(&self) -> Option<&Layout> {
        self.layout.as_ref()
    }

    /// True after the primary's `Fin` was answered.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Blocks and bytes written (acked `Ok`).
    pub fn written(&self) -> (u64, u64) {
        (self.written_blocks, self.written_bytes)
    }

    /// Blocks whose write failed.
    pub fn failed_blocks(&self) -> u64 {
        self.failed_blocks
    }

    /// The message to send the primary before closing after `err`.
    pub fn abort_for(err: &ProtocolError) -> Message {
        Message::Abort {
            status: Status::Protocol(err.code()),
            seq: u64::MAX,
        }
    }

    fn advertise_free(&mut self, out: &mut Vec<ReplicaAction>) -> Result<(), ProtocolError> {
        let Some(layout) = self.layout else {
            return Ok(());
        };
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                continue;
            }
            let Some(b) = layout.block(self.next_advert) else {
                break;
            };
            self.side.on_advertise(b.seq)?;
            self.slots[slot] = Some(b.seq);
            self.next_advert += 1;
            out.push(ReplicaAction::Advertise {
                slot,
                seq: b.seq,
                len: b.len,
            });
        }
        Ok(())
    }

    /// Handles raw bytes received from the primary.
    ///
    /// # Errors
    /// The [`ProtocolError`] for which the connection must be ended (send
    /// [`ReplicaCore::abort_for`] first, unless it is a `PeerAborted`).
    pub fn on_message(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<ReplicaAction>,
    ) -> Result<(), ProtocolError> {
        let msg = Message::decode(bytes)?;
        self.side.on_receive(&msg)?;
        match msg {
            Message::Hello(c) => {
                let layout = Layout::from_config(&c, self.capacity).map_err(|_| {
                    ProtocolError::BadConfig {
                        what: "range does not fit this replica's target",
                    }
                })?;
                let window = self.side.window().unwrap_or(1);
                self.layout = Some(layout);
                self.slots = vec![None; window as usize];
                out.push(ReplicaAction::Send(Message::HelloAck {
                    replica_id: c.replica_id,
                    window,
                    capacity: self.capacity,
                }));
                self.advertise_free(out)?;
            }
            Message::BlockSent { seq, .. } => {
                let layout = self.layout.ok_or(ProtocolError::Unexpected {
                    got: MessageKind::BlockSent,
                    state: "waiting for hello",
                })?;
                let slot = self.slots.iter().position(|s| *s == Some(seq)).ok_or(
                    ProtocolError::BadSequence {
                        kind: MessageKind::BlockSent,
                        seq,
                        why: "no buffer holds it",
                    },
                )?;
                // Offset and length from our own layout: the message's copies were checked
                // equal, but we never write where the peer says, only where we computed.
                let b = layout.block(seq).ok_or(ProtocolError::BadSequence {
                    kind: MessageKind::BlockSent,
                    seq,
                    why: "beyond the last block",
                })?;
                out.push(ReplicaAction::Write {
                    slot,
                    seq,
                    offset: b.offset,
                    len: b.len,
                });
            }
            Message::VerifyRequest { seq } => {
                let b =
                    self.layout
                        .and_then(|l| l.block(seq))
                        .ok_or(ProtocolError::BadSequence {
                            kind: MessageKind::VerifyRequest,
                            seq,
                            why: "beyond the last block",
                        })?;
                out.push(ReplicaAction::ReadBack {
                    seq,
                    offset: b.offset,
                    len: b.len,
                });
            }
            Message::Fin { .. } => {
                // The side accepted it: every block is acked and every read-back answered.
                self.finished = true;
                out.push(ReplicaAction::Send(Message::Fin {
                    blocks: self.written_blocks,
                    bytes: self.written_bytes,
                }));
            }
            // ReplicaSide::on_receive already rejected everything else.
            other => {
                return Err(ProtocolError::Unexpected {
                    got: other.kind(),
                    state: "replicating",
                })
            }
        }
        Ok(())
    }

    /// The drive write (and flush) of `seq` finished with `status`: ack it and reuse its slot.
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if `seq` was not being written (adapter bug).
    pub fn on_write_done(
        &mut self,
        seq: u64,
        status: Status,
        out: &mut Vec<ReplicaAction>,
    ) -> Result<(), ProtocolError> {
        self.side.on_ack(seq, status)?;
        if let Some(s) = self.slots.iter_mut().find(|s| **s == Some(seq)) {
            *s = None;
        }
        if status.is_ok() {
            self.written_blocks += 1;
            let len = self.layout.and_then(|l| l.block(seq)).map_or(0, |b| b.len);
            self.written_bytes += u64::from(len);
        } else {
            self.failed_blocks += 1;
        }
        out.push(ReplicaAction::Send(Message::BlockWritten { seq, status }));
        self.advertise_free(out)
    }

    /// The status to ack block `seq` with, given what the drive did: `Ok(bytes)` counts only
    /// if it moved the whole block; a short write (fewer bytes, e.g. the end of a device or
    /// an interrupted O_DIRECT write) fails the block with `EIO`, like any drive error
    /// (`Err(status)`). Pass the result to [`ReplicaCore::on_write_done`].
    pub fn write_status(&self, seq: u64, result: Result<usize, Status>) -> Status {
        let want = self
            .layout
            .and_then(|l| l.block(seq))
            .map(|b| b.len as usize);
        match result {
            Ok(n) if Some(n) == want => Status::Ok,
            Ok(_) => Status::Errno(libc::EIO as u16),
            Err(s) if s.is_ok() => Status::Errno(libc::EIO as u16),
            Err(s) => s,
        }
    }

    /// A read-back for `--verify` finished. A result for a block whose read-back was not
    /// asked (an adapter bug) is dropped: the primary only accepts answers to its requests.
    pub fn on_readback_done(
        &mut self,
        seq: u64,
        len: u32,
        crc: u32,
        status: Status,
        out: &mut Vec<ReplicaAction>,
    ) {
        if self.side.on_verify_done(seq).is_err() {
            return;
        }
        out.push(ReplicaAction::Send(Message::VerifyResult {
            seq,
            len,
            crc,
            status,
        }));
    }
}
