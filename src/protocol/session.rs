//! Per-connection validators: what each side may receive, given the negotiated [`Config`],
//! the replica's target and what was said before.
//!
//! Neither side allocates per block of the range: blocks below the advertising cursor that
//! are not tracked are settled. Tracked per block are only the blocks advertised and not yet
//! acked (at most the granted window), the read-backs outstanding (at most the window) and,
//! with verify, the blocks acked `Ok` whose `VerifyRequest` has not come yet (one entry per
//! block this side itself wrote or saw acked, never per block a peer merely named).

use std::collections::{BTreeMap, BTreeSet};

use super::{
    flags, Config, Message, MessageKind, ProtocolError, Status, MAX_BLOCK_SIZE, MAX_WINDOW,
};

/// What a replica's target and buffers can take; every `Hello` is checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaTarget {
    /// Bytes the target holds: the range must end within it.
    pub capacity: u64,
    /// The target's logical block size (its direct I/O unit, a power of two): the range
    /// offset, length and block size must be multiples of it.
    pub lba_size: u32,
    /// Block buffers the replica has: the most it grants as window.
    pub slots: u32,
    /// Bytes per buffer: the largest block it can receive.
    pub slot_bytes: u32,
}

impl ReplicaTarget {
    /// A target of `capacity` bytes with `lba_size`-byte logical blocks, served through
    /// `slots` buffers of `slot_bytes` bytes each.
    pub fn new(capacity: u64, lba_size: u32, slots: u32, slot_bytes: u32) -> ReplicaTarget {
        ReplicaTarget {
            capacity,
            lba_size,
            slots,
            slot_bytes,
        }
    }

    /// Checks `c` (already [`Config::validate`]d) against this target.
    fn check(&self, c: &Config) -> Result<(), ProtocolError> {
        let lba = u64::from(self.lba_size.max(1));
        if c.range_offset % lba != 0 || c.range_len % lba != 0 || u64::from(c.block_size) % lba != 0
        {
            return Err(ProtocolError::Mismatch {
                kind: MessageKind::Hello,
                seq: 0,
                what: "lba_size (range offset, length and block size must be multiples of this replica's logical block size)",
                got: c.lba_size.into(),
                expected: lba,
            });
        }
        let end = c.range_offset.saturating_add(c.range_len);
        if end > self.capacity {
            return Err(ProtocolError::Mismatch {
                kind: MessageKind::Hello,
                seq: 0,
                what: "range end (beyond this replica's target)",
                got: end,
                expected: self.capacity,
            });
        }
        if c.block_size > self.slot_bytes.min(MAX_BLOCK_SIZE) {
            return Err(ProtocolError::Mismatch {
                kind: MessageKind::Hello,
                seq: 0,
                what: "block_size (larger than this replica's buffers)",
                got: c.block_size.into(),
                expected: self.slot_bytes.into(),
            });
        }
        Ok(())
    }
}

/// Where a block that was advertised and not yet acked stands.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    /// `BufferReady` went (or came); no `BlockSent` yet.
    Advertised,
    /// `BlockSent` went (or came); no `BlockWritten` yet.
    Sent,
}

/// Block progress shared by both sides: the advertising cursor, the open blocks, the verify
/// bookkeeping and the `Ok` totals.
#[derive(Debug)]
struct Blocks {
    config: Config,
    window: u32,
    next_advert: u64,
    /// Advertised and not yet acked.
    open: BTreeMap<u64, Open>,
    /// Acked `Ok`, read-back not asked yet (verify only).
    verifiable: BTreeSet<u64>,
    /// Read-back asked, not answered.
    verifying: BTreeSet<u64>,
    ok_blocks: u64,
    ok_bytes: u64,
}

impl Blocks {
    fn new(config: Config, window: u32) -> Blocks {
        Blocks {
            config,
            window,
            next_advert: 0,
            open: BTreeMap::new(),
            verifiable: BTreeSet::new(),
            verifying: BTreeSet::new(),
            ok_blocks: 0,
            ok_bytes: 0,
        }
    }

    fn verify(&self) -> bool {
        self.config.flags & flags::VERIFY != 0
    }

    /// Records an advertisement of `seq` (`len` bytes if given).
    fn advertise(
        &mut self,
        seq: u64,
        len: Option<u32>,
        kind: MessageKind,
    ) -> Result<(), ProtocolError> {
        let bad = |why| Err(ProtocolError::BadSequence { kind, seq, why });
        let Some(want) = self.config.block_len(seq) else {
            return bad("beyond the last block");
        };
        if seq != self.next_advert {
            return bad("advertisements must come in sequence order, each once");
        }
        if let Some(len) = len.filter(|&l| l != want) {
            return Err(ProtocolError::Mismatch {
                kind,
                seq,
                what: "len",
                got: len.into(),
                expected: want.into(),
            });
        }
        if self.open.len() >= self.window as usize {
            return bad("more buffers advertised than the granted window");
        }
        self.open.insert(seq, Open::Advertised);
        self.next_advert += 1;
        Ok(())
    }

    /// Records the `BlockSent` of `seq` (sent by the primary, received by the replica).
    fn sent(&mut self, seq: u64, kind: MessageKind) -> Result<(), ProtocolError> {
        match self.open.get_mut(&seq) {
            Some(s @ Open::Advertised) => {
                *s = Open::Sent;
                Ok(())
            }
            _ => Err(ProtocolError::BadSequence {
                kind,
                seq,
                why: "no buffer advertised for it, or already sent",
            }),
        }
    }

    /// Records the ack of `seq` with `status`.
    fn acked(&mut self, seq: u64, status: Status, kind: MessageKind) -> Result<(), ProtocolError> {
        if self.open.get(&seq) != Some(&Open::Sent) {
            return Err(ProtocolError::BadSequence {
                kind,
                seq,
                why: "block was not sent or was already acked",
            });
        }
        self.open.remove(&seq);
        if status.is_ok() {
            self.ok_blocks += 1;
            self.ok_bytes += u64::from(self.config.block_len(seq).unwrap_or(0));
            if self.verify() {
                self.verifiable.insert(seq);
            }
        }
        Ok(())
    }

    /// Records a `VerifyRequest` for `seq`.
    fn verify_asked(&mut self, seq: u64) -> Result<(), ProtocolError> {
        let kind = MessageKind::VerifyRequest;
        if !self.verify() {
            return Err(ProtocolError::Unexpected {
                got: kind,
                state: "verify was not negotiated in the hello",
            });
        }
        if !self.verifiable.contains(&seq) {
            return Err(ProtocolError::BadSequence {
                kind,
                seq,
                why: "block not acked ok, or already verified",
            });
        }
        if self.verifying.len() >= self.window as usize {
            return Err(ProtocolError::BadSequence {
                kind,
                seq,
                why: "more read-backs outstanding than the granted window",
            });
        }
        self.verifiable.remove(&seq);
        self.verifying.insert(seq);
        Ok(())
    }

    /// Records the `VerifyResult` for `seq`.
    fn verify_answered(&mut self, seq: u64) -> Result<(), ProtocolError> {
        if self.verifying.remove(&seq) {
            Ok(())
        } else {
            Err(ProtocolError::BadSequence {
                kind: MessageKind::VerifyResult,
                seq,
                why: "no verify request outstanding for this block",
            })
        }
    }

    /// Every block advertised and acked, every read-back asked and answered.
    fn settled(&self) -> bool {
        self.next_advert == self.config.blocks()
            && self.open.is_empty()
            && self.verifying.is_empty()
            && self.verifiable.is_empty()
    }
}

/// Validates what a primary receives from one replica, and what it may send.
#[derive(Debug)]
pub struct PrimarySide {
    config: Config,
    /// Set by the hello-ack.
    blocks: Option<Blocks>,
    fin_sent: bool,
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
            blocks: None,
            fin_sent: false,
            finished: false,
        })
    }

    /// The configuration sent.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The window the replica granted, once its hello-ack arrived.
    pub fn window(&self) -> Option<u32> {
        self.blocks.as_ref().map(|b| b.window)
    }

    /// True if another `VerifyRequest` may be sent now (fewer than `window` outstanding).
    pub fn can_verify(&self) -> bool {
        self.blocks
            .as_ref()
            .is_some_and(|b| b.verifying.len() < b.window as usize)
    }

    /// True once the replica answered the primary's `Fin` with its own.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Answers the replica owes: an ack for each block sent to it and not acked, and a
    /// result for each read-back asked and not answered.
    pub fn owed_answers(&self) -> usize {
        self.blocks.as_ref().map_or(0, |b| {
            b.open.values().filter(|s| **s == Open::Sent).count() + b.verifying.len()
        })
    }

    /// True while the replica should advertise another buffer: its hello-ack has not come
    /// yet, or fewer than its granted window of blocks are advertised and not acked while
    /// blocks are left to advertise. False once it answered the primary's `Fin`.
    pub fn expects_advert(&self) -> bool {
        if self.finished {
            return false;
        }
        match &self.blocks {
            None => true,
            Some(b) => b.open.len() < b.window as usize && b.next_advert < b.config.blocks(),
        }
    }

    fn blocks_mut(&mut self, kind: MessageKind) -> Result<&mut Blocks, ProtocolError> {
        self.blocks.as_mut().ok_or(ProtocolError::Unexpected {
            got: kind,
            state: "waiting for hello-ack",
        })
    }

    /// Records that the primary sent `BlockSent` for `seq` (after its RDMA write).
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if `seq` was not advertised or was already sent; this is
    /// a bug on the primary, reported rather than sent.
    pub fn on_sent(&mut self, seq: u64) -> Result<(), ProtocolError> {
        self.blocks_mut(MessageKind::BlockSent)?
            .sent(seq, MessageKind::BlockSent)
    }

    /// Records that the primary sent `VerifyRequest` for `seq`.
    ///
    /// # Errors
    /// [`ProtocolError::Unexpected`] without verify; [`ProtocolError::BadSequence`] if `seq`
    /// is not acked `Ok`, was already asked, or `window` read-backs are outstanding
    /// (see [`PrimarySide::can_verify`]).
    pub fn on_verify_request(&mut self, seq: u64) -> Result<(), ProtocolError> {
        self.blocks_mut(MessageKind::VerifyRequest)?
            .verify_asked(seq)
    }

    /// Records that the primary sends `Fin`.
    ///
    /// # Errors
    /// [`ProtocolError::Unexpected`] unless every block was acked by this replica and every
    /// read-back answered (the replica would refuse the `Fin`), or if `Fin` was sent already.
    pub fn on_fin_sent(&mut self) -> Result<(), ProtocolError> {
        let settled = self.blocks.as_ref().is_some_and(Blocks::settled);
        if !settled || self.fin_sent {
            return Err(ProtocolError::Unexpected {
                got: MessageKind::Fin,
                state: "blocks still in flight to this replica, or fin already sent",
            });
        }
        self.fin_sent = true;
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
                got: msg.kind(),
                state,
            })
        };
        if let Message::Abort { status, seq } = *msg {
            return Err(ProtocolError::PeerAborted { status, seq });
        }
        let Some(blocks) = self.blocks.as_mut() else {
            let Message::HelloAck {
                replica_id,
                window,
                capacity,
            } = *msg
            else {
                return unexpected("waiting for hello-ack");
            };
            return self.on_hello_ack(replica_id, window, capacity);
        };
        if self.finished {
            return unexpected("finished");
        }
        match *msg {
            Message::BufferReady { seq, len, .. } => {
                blocks.advertise(seq, Some(len), MessageKind::BufferReady)
            }
            Message::BlockWritten { seq, status } => {
                blocks.acked(seq, status, MessageKind::BlockWritten)
            }
            Message::VerifyResult { seq, len, .. } => {
                blocks.verify_answered(seq)?;
                let want = self.config.block_len(seq).unwrap_or(0);
                if len != want {
                    return Err(ProtocolError::Mismatch {
                        kind: MessageKind::VerifyResult,
                        seq,
                        what: "len",
                        got: len.into(),
                        expected: want.into(),
                    });
                }
                Ok(())
            }
            Message::Fin {
                blocks: n,
                bytes: b,
            } => {
                if !self.fin_sent {
                    return unexpected("replicating (a replica sends fin only in answer)");
                }
                let fin_mismatch = |what, got, expected| {
                    Err(ProtocolError::Mismatch {
                        kind: MessageKind::Fin,
                        seq: 0,
                        what,
                        got,
                        expected,
                    })
                };
                if n != blocks.ok_blocks {
                    return fin_mismatch("blocks (acked ok)", n, blocks.ok_blocks);
                }
                if b != blocks.ok_bytes {
                    return fin_mismatch("bytes (acked ok)", b, blocks.ok_bytes);
                }
                self.finished = true;
                Ok(())
            }
            _ => unexpected("replicating"),
        }
    }

    fn on_hello_ack(
        &mut self,
        replica_id: u32,
        window: u32,
        capacity: u64,
    ) -> Result<(), ProtocolError> {
        let mismatch = |what, got, expected| {
            Err(ProtocolError::Mismatch {
                kind: MessageKind::HelloAck,
                seq: 0,
                what,
                got,
                expected,
            })
        };
        let c = &self.config;
        if replica_id != c.replica_id {
            return mismatch("replica_id", replica_id.into(), c.replica_id.into());
        }
        if window == 0 || window > c.window.min(MAX_WINDOW) {
            return mismatch(
                "window (0 or more than proposed)",
                window.into(),
                c.window.into(),
            );
        }
        let end = c.range_offset + c.range_len;
        if capacity < end {
            return mismatch("capacity (range end beyond replica target)", capacity, end);
        }
        self.blocks = Some(Blocks::new(*c, window));
        Ok(())
    }
}

/// Validates what a replica receives from the primary, and what it may do.
#[derive(Debug)]
pub struct ReplicaSide {
    target: ReplicaTarget,
    /// Set by the hello.
    blocks: Option<Blocks>,
    finished: bool,
}

impl ReplicaSide {
    /// A replica serving `target`.
    pub fn new(target: ReplicaTarget) -> ReplicaSide {
        ReplicaSide {
            target,
            blocks: None,
            finished: false,
        }
    }

    /// The accepted configuration, once hello arrived.
    pub fn config(&self) -> Option<&Config> {
        self.blocks.as_ref().map(|b| &b.config)
    }

    /// The window granted (`min(proposed, buffers)`), once hello arrived.
    pub fn window(&self) -> Option<u32> {
        self.blocks.as_ref().map(|b| b.window)
    }

    /// Blocks and bytes acked `Ok` so far (what this replica's `Fin` reports).
    pub fn acked_ok(&self) -> (u64, u64) {
        self.blocks
            .as_ref()
            .map_or((0, 0), |b| (b.ok_blocks, b.ok_bytes))
    }

    fn blocks_mut(&mut self, kind: MessageKind) -> Result<&mut Blocks, ProtocolError> {
        self.blocks.as_mut().ok_or(ProtocolError::Unexpected {
            got: kind,
            state: "waiting for hello",
        })
    }

    /// Records that the replica advertised `seq`.
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if `seq` is outside the range, not the next in order,
    /// or the granted window is full.
    pub fn on_advertise(&mut self, seq: u64) -> Result<(), ProtocolError> {
        self.blocks_mut(MessageKind::BufferReady)?
            .advertise(seq, None, MessageKind::BufferReady)
    }

    /// Records that the replica acked `seq` with `status` (a non-`Ok` status settles the
    /// block as failed: it is not counted, and not verified).
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if `seq` was not received or was already acked.
    pub fn on_ack(&mut self, seq: u64, status: Status) -> Result<(), ProtocolError> {
        self.blocks_mut(MessageKind::BlockWritten)?
            .acked(seq, status, MessageKind::BlockWritten)
    }

    /// Records that the replica answered the `VerifyRequest` for `seq`.
    ///
    /// # Errors
    /// [`ProtocolError::BadSequence`] if no read-back of `seq` was asked.
    pub fn on_verify_done(&mut self, seq: u64) -> Result<(), ProtocolError> {
        self.blocks_mut(MessageKind::VerifyResult)?
            .verify_answered(seq)
    }

    /// Checks a message received from the primary.
    ///
    /// # Errors
    /// The [`ProtocolError`] to end the connection with.
    pub fn on_receive(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        let unexpected = |state| {
            Err(ProtocolError::Unexpected {
                got: msg.kind(),
                state,
            })
        };
        if let Message::Abort { status, seq } = *msg {
            return Err(ProtocolError::PeerAborted { status, seq });
        }
        let Some(blocks) = self.blocks.as_mut() else {
            let Message::Hello(c) = *msg else {
                return unexpected("waiting for hello");
            };
            c.validate()?;
            self.target.check(&c)?;
            let window = c.window.min(self.target.slots.max(1));
            self.blocks = Some(Blocks::new(c, window));
            return Ok(());
        };
        if self.finished {
            return unexpected("finished");
        }
        match *msg {
            Message::BlockSent { seq, offset, len } => {
                let Some(want) = blocks.config.block_len(seq) else {
                    return Err(ProtocolError::BadSequence {
                        kind: MessageKind::BlockSent,
                        seq,
                        why: "beyond the last block",
                    });
                };
                if blocks.open.get(&seq) != Some(&Open::Advertised) {
                    return Err(ProtocolError::BadSequence {
                        kind: MessageKind::BlockSent,
                        seq,
                        why: "no buffer advertised for it, or already received",
                    });
                }
                let mismatch = |what, got, expected| {
                    Err(ProtocolError::Mismatch {
                        kind: MessageKind::BlockSent,
                        seq,
                        what,
                        got,
                        expected,
                    })
                };
                let want_off = blocks.config.block_offset(seq);
                if offset != want_off {
                    return mismatch("offset", offset, want_off);
                }
                if len != want {
                    return mismatch("len", len.into(), want.into());
                }
                blocks.sent(seq, MessageKind::BlockSent)
            }
            Message::VerifyRequest { seq } => blocks.verify_asked(seq),
            Message::Fin {
                blocks: n,
                bytes: b,
            } => {
                if !blocks.settled() {
                    return unexpected(
                        "blocks still in flight or awaiting verification (fin comes last)",
                    );
                }
                if n > blocks.ok_blocks || b > blocks.ok_bytes {
                    return Err(ProtocolError::Mismatch {
                        kind: MessageKind::Fin,
                        seq: 0,
                        what: "blocks replicated (more than this replica acked ok)",
                        got: n,
                        expected: blocks.ok_blocks,
                    });
                }
                self.finished = true;
                Ok(())
            }
            _ => unexpected("replicating"),
        }
    }
}
