//! Drives a [`ReplicaCore`] with an arbitrary primary: a Hello (fitting or not), arbitrary or
//! nearly-valid messages, and drive completions in any order. Checks after every step that
//! the replica never writes outside the negotiated range, never advertises more than its
//! buffers hold, reads back only blocks it acked, and stays within the allocation bound.

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use peerpipe::pipeline::{ReplicaAction, ReplicaCore};
use peerpipe::protocol::{flags, Config, Message, ReplicaTarget, Status, MAX_BLOCK_SIZE};

use crate::{AllocProbe, ArbMessage};

/// One fuzz case.
#[derive(Arbitrary, Debug)]
pub struct ReplicaInput {
    /// Target capacity; `None`: 1 PiB.
    pub capacity: Option<u64>,
    /// Logical block size `512 << (lba_shift % 4)`.
    pub lba_shift: u8,
    /// Buffers `1 + slots % 16`.
    pub slots: u8,
    /// Bytes per buffer `512 << (slot_shift % 12)`.
    pub slot_shift: u8,
    /// The first message.
    pub hello: HelloPick,
    /// What follows.
    pub steps: Vec<ReplicaStep>,
}

/// The Hello.
#[derive(Arbitrary, Debug)]
pub enum HelloPick {
    /// Built from small numbers so that it often fits the target.
    Fitting {
        /// Block size in units of 512 bytes (plus one).
        block_units: u8,
        /// Whole blocks in the range (a huge count is allowed: nothing may be sized by it).
        blocks: u64,
        /// Extra 512-byte units in a short last block.
        tail_units: u8,
        /// Range offset in 512-byte units.
        offset_units: u16,
        /// Proposed window.
        window: u16,
        /// Ask for verify.
        verify: bool,
    },
    /// Anything.
    Any(ArbMessage),
}

/// One step after the Hello.
#[derive(Arbitrary, Debug)]
pub enum ReplicaStep {
    /// An arbitrary message.
    Msg(ArbMessage),
    /// The correct `BlockSent` for the oldest advertised block not yet sent.
    SendNext,
    /// A `BlockSent` for an advertised block with skewed fields.
    SendSkewed {
        /// Which advertised block.
        pick: u8,
        /// Added to the right offset.
        offset_delta: i64,
        /// Length to claim.
        len: u32,
    },
    /// A drive write finishes.
    WriteDone {
        /// Which one.
        pick: u8,
        /// Success, else an errno.
        ok: bool,
    },
    /// A read-back finishes.
    ReadbackDone {
        /// Which one.
        pick: u8,
        /// Checksum.
        crc: u32,
    },
    /// A `VerifyRequest` for a block acked `Ok` (possibly again).
    VerifyAcked {
        /// Which acked block.
        pick: u8,
    },
    /// A `Fin` with the replica's own counts.
    Fin,
}

#[derive(Default)]
struct Model {
    cfg: Option<Config>,
    /// Advertised, not yet sent: seq -> (slot, len).
    advertised: BTreeMap<u64, (usize, u32)>,
    /// Which block each busy slot holds.
    busy: BTreeMap<usize, u64>,
    /// Writes handed to the drive: (slot, seq).
    writing: Vec<(usize, u64)>,
    written: BTreeSet<u64>,
    acked_ok: Vec<u64>,
    readbacks: Vec<(u64, u32)>,
    fin: bool,
}

/// Runs one case.
pub fn run(input: ReplicaInput) {
    let lba = 512u32 << (input.lba_shift % 4);
    let slots = 1 + u32::from(input.slots % 16);
    let slot_bytes = 512u32 << (input.slot_shift % 12);
    let capacity = input.capacity.unwrap_or(1 << 50);
    let target = ReplicaTarget::new(capacity, lba, slots, slot_bytes);
    let probe = AllocProbe::start();
    let mut rep = ReplicaCore::with_target(target);
    let mut m = Model::default();
    let hello = match input.hello {
        HelloPick::Fitting {
            block_units,
            blocks,
            tail_units,
            offset_units,
            window,
            verify,
        } => {
            let bs = 512 * (u32::from(block_units) + 1);
            let len = blocks
                .checked_mul(u64::from(bs))
                .and_then(|l| l.checked_add(512 * u64::from(tail_units) % u64::from(bs)))
                .unwrap_or(u64::from(bs));
            Message::Hello(Config {
                replica_id: 0,
                block_size: bs,
                lba_size: 512,
                window: u32::from(window),
                range_offset: 512 * u64::from(offset_units),
                range_len: len,
                flags: if verify { flags::VERIFY } else { 0 },
            })
            .encode()
            .to_vec()
        }
        HelloPick::Any(a) => a.wire(),
    };
    if !deliver(&mut rep, &mut m, &target, &hello) {
        probe.check("replica hello");
        return;
    }
    for step in input.steps {
        let mut out = Vec::new();
        match step {
            ReplicaStep::Msg(a) => {
                if !deliver(&mut rep, &mut m, &target, &a.wire()) {
                    break;
                }
            }
            ReplicaStep::SendNext => {
                let (Some(c), Some(&seq)) = (m.cfg, m.advertised.keys().next()) else {
                    continue;
                };
                let len = c.block_len(seq).unwrap_or(0);
                let msg = Message::BlockSent {
                    seq,
                    offset: c.block_offset(seq),
                    len,
                };
                if !deliver(&mut rep, &mut m, &target, &msg.encode()) {
                    break;
                }
            }
            ReplicaStep::SendSkewed {
                pick,
                offset_delta,
                len,
            } => {
                let Some(c) = m.cfg else { continue };
                if m.advertised.is_empty() {
                    continue;
                }
                let i = usize::from(pick) % m.advertised.len();
                let seq = m.advertised.keys().nth(i).copied().unwrap_or(0);
                let offset = c.block_offset(seq).wrapping_add_signed(offset_delta);
                let msg = Message::BlockSent { seq, offset, len };
                if !deliver(&mut rep, &mut m, &target, &msg.encode()) {
                    break;
                }
            }
            ReplicaStep::WriteDone { pick, ok } => {
                if m.writing.is_empty() {
                    continue;
                }
                let (slot, seq) = m.writing.remove(usize::from(pick) % m.writing.len());
                let st = if ok { Status::Ok } else { Status::Errno(5) };
                rep.on_write_done(seq, st, &mut out)
                    .expect("the core asked for this write");
                m.busy.remove(&slot);
                if ok {
                    m.acked_ok.push(seq);
                }
                check(&mut m, &target, &out);
            }
            ReplicaStep::ReadbackDone { pick, crc } => {
                if m.readbacks.is_empty() {
                    continue;
                }
                let (seq, len) = m.readbacks.remove(usize::from(pick) % m.readbacks.len());
                rep.on_readback_done(seq, len, crc, Status::Ok, &mut out);
                assert_eq!(out.len(), 1, "one verify result per read-back");
            }
            ReplicaStep::VerifyAcked { pick } => {
                if m.acked_ok.is_empty() {
                    continue;
                }
                let seq = m.acked_ok[usize::from(pick) % m.acked_ok.len()];
                let msg = Message::VerifyRequest { seq };
                if !deliver(&mut rep, &mut m, &target, &msg.encode()) {
                    break;
                }
            }
            ReplicaStep::Fin => {
                let (blocks, bytes) = rep.written();
                let msg = Message::Fin { blocks, bytes };
                if !deliver(&mut rep, &mut m, &target, &msg.encode()) {
                    break;
                }
            }
        }
    }
    probe.check("replica core");
}

/// Hands `bytes` to the core; false if it ended the connection (then it did nothing).
fn deliver(rep: &mut ReplicaCore, m: &mut Model, t: &ReplicaTarget, bytes: &[u8]) -> bool {
    let mut out = Vec::new();
    match rep.on_message(bytes, &mut out) {
        Ok(()) => {
            if m.cfg.is_none() {
                if let Ok(Message::Hello(c)) = Message::decode(bytes) {
                    m.cfg = Some(c);
                }
            }
            check(m, t, &out);
            true
        }
        Err(_) => {
            assert!(out.is_empty(), "a rejected message caused {out:?}");
            false
        }
    }
}

/// The safety properties of every action.
fn check(m: &mut Model, t: &ReplicaTarget, out: &[ReplicaAction]) {
    let lba = u64::from(t.lba_size);
    for a in out {
        let c = m.cfg.expect("no action before an accepted hello");
        match *a {
            ReplicaAction::Send(Message::HelloAck { window, .. }) => {
                assert!(window >= 1 && window <= t.slots && window <= c.window);
            }
            ReplicaAction::Send(Message::Fin { .. }) => {
                assert!(!m.fin, "one fin");
                assert!(m.writing.is_empty() && m.readbacks.is_empty() && m.busy.is_empty());
                m.fin = true;
            }
            ReplicaAction::Send(_) => {}
            ReplicaAction::Advertise { slot, seq, len } => {
                assert!(slot < t.slots as usize, "slot {slot} of {}", t.slots);
                assert!(len <= t.slot_bytes && len <= MAX_BLOCK_SIZE);
                assert_eq!(Some(len), c.block_len(seq));
                assert!(m.busy.insert(slot, seq).is_none(), "slot {slot} reused");
                assert!(m.advertised.insert(seq, (slot, len)).is_none());
            }
            ReplicaAction::Write {
                slot,
                seq,
                offset,
                len,
            } => {
                let (aslot, alen) = m
                    .advertised
                    .remove(&seq)
                    .expect("write of an advertised block");
                assert_eq!((slot, len), (aslot, alen));
                let start = c.range_offset;
                let end = c.range_offset + c.range_len;
                let wend = offset.checked_add(u64::from(len)).expect("no overflow");
                assert!(
                    offset >= start && wend <= end && wend <= t.capacity,
                    "write {offset}+{len} outside {start}..{end}"
                );
                assert!(
                    offset % lba == 0 && u64::from(len) % lba == 0,
                    "unaligned write"
                );
                assert_eq!(offset, c.block_offset(seq));
                assert!(m.written.insert(seq), "block {seq} written twice");
                m.writing.push((slot, seq));
            }
            ReplicaAction::ReadBack { seq, offset, len } => {
                assert!(c.flags & flags::VERIFY != 0, "read-back without verify");
                assert!(
                    m.acked_ok.contains(&seq),
                    "read-back of a block not acked ok"
                );
                assert_eq!((offset, Some(len)), (c.block_offset(seq), c.block_len(seq)));
                m.readbacks.push((seq, len));
                assert!(
                    m.readbacks.len() <= t.slots as usize,
                    "read-backs beyond the window"
                );
            }
        }
    }
}
