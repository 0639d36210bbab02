//! Drives a [`PrimaryCore`] with arbitrary replicas: arbitrary or nearly-valid messages from
//! each, source reads and RDMA write completions in any order, lost connections. Checks after
//! every step that the primary only writes a read block into the exact buffer a live replica
//! advertised for it, frees a buffer only when no live NIC reads it, bounds read-backs by the
//! granted window, sends `Fin` only when the replica is settled, never claims success for a
//! block a replica did not ack `Ok`, and stays within the allocation bound.

use std::collections::{BTreeSet, HashMap};

use arbitrary::Arbitrary;
use peerpipe::pipeline::{Failure, Layout, PrimaryAction, PrimaryCore, Remote};
use peerpipe::protocol::{Message, Status};

use crate::{status, AllocProbe, ArbMessage};

/// One fuzz case.
#[derive(Arbitrary, Debug)]
pub struct PrimaryInput {
    /// Replicas `1 + replicas % 3`.
    pub replicas: u8,
    /// Block size in 512-byte units (plus one).
    pub block_units: u8,
    /// Whole blocks `blocks % 24`.
    pub blocks: u8,
    /// 512-byte units in a short last block.
    pub tail_units: u8,
    /// Window `1 + window % 8`.
    pub window: u8,
    /// Run with verify.
    pub verify: bool,
    /// What happens.
    pub steps: Vec<PrimaryStep>,
}

/// One event.
#[derive(Arbitrary, Debug)]
pub enum PrimaryStep {
    /// An arbitrary message from a replica.
    Msg {
        /// From.
        replica: u8,
        /// What.
        msg: ArbMessage,
    },
    /// A correct hello-ack granting `1 + window % 8`.
    HelloAck {
        /// From.
        replica: u8,
        /// Window asked.
        window: u8,
    },
    /// The next advertisement in order, correct length.
    AdvertiseNext {
        /// From.
        replica: u8,
        /// Address.
        addr: u64,
        /// Key.
        rkey: u32,
    },
    /// An ack for a block the primary sent.
    Ack {
        /// From.
        replica: u8,
        /// Which sent block.
        pick: u8,
        /// Wire status.
        status: u32,
    },
    /// A verify result for a requested block.
    VerifyResult {
        /// From.
        replica: u8,
        /// Which request.
        pick: u8,
        /// Report the source checksum (else a wrong one).
        matches: bool,
    },
    /// The replica's fin with its true counts (or skewed).
    Fin {
        /// From.
        replica: u8,
        /// Add this to the block count.
        skew: u8,
    },
    /// A source read completes.
    ReadDone {
        /// Which.
        pick: u8,
        /// Success.
        ok: bool,
    },
    /// An RDMA write completes locally.
    WriteDone {
        /// Which.
        pick: u8,
        /// Success.
        ok: bool,
    },
    /// A replica's connection drops.
    Lost {
        /// Which.
        replica: u8,
    },
}

#[derive(Default, Clone)]
struct Rep {
    window: Option<u32>,
    next_advert: u64,
    adverts: HashMap<u64, Remote>,
    /// `BlockSent` seen, not acked.
    sent: Vec<u64>,
    ok: BTreeSet<u64>,
    ok_bytes: u64,
    settled: BTreeSet<u64>,
    verifying: Vec<u64>,
    verified_ok: BTreeSet<u64>,
    gone: bool,
}

struct Model {
    layout: Layout,
    verify: bool,
    reps: Vec<Rep>,
    reads: Vec<u64>,
    read_ok: BTreeSet<u64>,
    started: BTreeSet<u64>,
    live_bufs: BTreeSet<u64>,
    window: usize,
    /// Writes posted, not completed: (replica, seq).
    writes: Vec<(usize, u64)>,
    written: BTreeSet<(usize, u64)>,
}

fn crc_of(seq: u64) -> u32 {
    (seq as u32) ^ 0x5a5a_0000
}

/// Runs one case.
pub fn run(input: PrimaryInput) {
    let n = 1 + usize::from(input.replicas % 3);
    let bs = 512 * (u64::from(input.block_units) + 1);
    let len = bs * u64::from(input.blocks % 24) + (512 * u64::from(input.tail_units)) % bs;
    let Ok(layout) = Layout::new(0, len, bs, 512, 1 << 40) else {
        return;
    };
    let window = 1 + u32::from(input.window % 8);
    let probe = AllocProbe::start();
    let Ok(mut p) = PrimaryCore::new(layout, n, window, input.verify) else {
        return;
    };
    let mut m = Model {
        layout,
        verify: input.verify,
        reps: vec![Rep::default(); n],
        reads: Vec::new(),
        read_ok: BTreeSet::new(),
        started: BTreeSet::new(),
        live_bufs: BTreeSet::new(),
        window: window as usize,
        writes: Vec::new(),
        written: BTreeSet::new(),
    };
    let mut out = Vec::new();
    p.start(&mut out);
    check(&mut m, &out);
    for step in input.steps {
        let mut out = Vec::new();
        match step {
            PrimaryStep::Msg { replica, msg } => {
                let r = usize::from(replica) % n;
                deliver(&mut m, &mut p, r, &msg.wire(), &mut out);
            }
            PrimaryStep::HelloAck { replica, window } => {
                let r = usize::from(replica) % n;
                let msg = Message::HelloAck {
                    replica_id: r as u32,
                    window: 1 + u32::from(window % 8),
                    capacity: 1 << 40,
                };
                deliver(&mut m, &mut p, r, &msg.encode(), &mut out);
            }
            PrimaryStep::AdvertiseNext {
                replica,
                addr,
                rkey,
            } => {
                let r = usize::from(replica) % n;
                let seq = m.reps[r].next_advert;
                let Some(b) = layout.block(seq) else { continue };
                let msg = Message::BufferReady {
                    seq,
                    addr: addr >> 1,
                    rkey,
                    len: b.len,
                };
                deliver(&mut m, &mut p, r, &msg.encode(), &mut out);
            }
            PrimaryStep::Ack {
                replica,
                pick,
                status: s,
            } => {
                let r = usize::from(replica) % n;
                if m.reps[r].sent.is_empty() {
                    continue;
                }
                let i = usize::from(pick) % m.reps[r].sent.len();
                let seq = m.reps[r].sent[i];
                let msg = Message::BlockWritten {
                    seq,
                    status: status(s),
                };
                deliver(&mut m, &mut p, r, &msg.encode(), &mut out);
            }
            PrimaryStep::VerifyResult {
                replica,
                pick,
                matches,
            } => {
                let r = usize::from(replica) % n;
                if m.reps[r].verifying.is_empty() {
                    continue;
                }
                let i = usize::from(pick) % m.reps[r].verifying.len();
                let seq = m.reps[r].verifying[i];
                let crc = if matches { crc_of(seq) } else { !crc_of(seq) };
                let msg = Message::VerifyResult {
                    seq,
                    len: layout.block(seq).map_or(0, |b| b.len),
                    crc,
                    status: Status::Ok,
                };
                deliver(&mut m, &mut p, r, &msg.encode(), &mut out);
            }
            PrimaryStep::Fin { replica, skew } => {
                let r = usize::from(replica) % n;
                let msg = Message::Fin {
                    blocks: m.reps[r].ok.len() as u64 + u64::from(skew % 2),
                    bytes: m.reps[r].ok_bytes,
                };
                deliver(&mut m, &mut p, r, &msg.encode(), &mut out);
            }
            PrimaryStep::ReadDone { pick, ok } => {
                if m.reads.is_empty() {
                    continue;
                }
                let seq = m.reads.remove(usize::from(pick) % m.reads.len());
                let res = if ok {
                    m.read_ok.insert(seq);
                    Ok(crc_of(seq))
                } else {
                    Err(Failure::Lower("short read".into()))
                };
                p.on_read_done(seq, res, &mut out);
            }
            PrimaryStep::WriteDone { pick, ok } => {
                if m.writes.is_empty() {
                    continue;
                }
                let (r, seq) = m.writes.remove(usize::from(pick) % m.writes.len());
                let res = if ok {
                    Ok(())
                } else {
                    Err(Failure::Lower("retry exceeded".into()))
                };
                p.on_write_done(r, seq, res, &mut out);
            }
            PrimaryStep::Lost { replica } => {
                let r = usize::from(replica) % n;
                // The QP is destroyed before the core hears of it: its writes are over.
                m.writes.retain(|&(w, _)| w != r);
                p.on_replica_lost(r, Failure::Lower("lost".into()), &mut out);
            }
        }
        check(&mut m, &out);
    }
    let o = p.outcome();
    if o.success {
        for (r, rep) in m.reps.iter().enumerate() {
            assert_eq!(
                rep.ok.len() as u64,
                layout.blocks(),
                "success without replica {r}'s acks"
            );
            if m.verify {
                assert_eq!(
                    rep.verified_ok.len() as u64,
                    layout.blocks(),
                    "success unverified"
                );
            }
        }
    }
    probe.check("primary core");
}

/// Hands `bytes` from replica `r` to the core; if the core accepted them (the replica is
/// still connected, or it ended in order with its fin), the model learns what they said.
fn deliver(
    m: &mut Model,
    p: &mut PrimaryCore,
    r: usize,
    bytes: &[u8],
    out: &mut Vec<PrimaryAction>,
) {
    let was_alive = p.is_alive(r);
    p.on_message(r, bytes, out);
    let Ok(msg) = Message::decode(bytes) else {
        return;
    };
    let aborted = out.iter().any(|a| {
        matches!(a, PrimaryAction::Send { replica, msg: Message::Abort { .. } } if *replica == r)
    });
    let accepted = was_alive
        && !matches!(msg, Message::Abort { .. })
        && (p.is_alive(r) || (matches!(msg, Message::Fin { .. }) && !aborted));
    if !accepted {
        return;
    }
    let rep = &mut m.reps[r];
    match msg {
        Message::HelloAck { window, .. } => rep.window = Some(window),
        Message::BufferReady {
            seq,
            addr,
            rkey,
            len,
        } => {
            assert_eq!(seq, rep.next_advert, "advertisement out of order accepted");
            rep.next_advert += 1;
            rep.adverts.insert(seq, Remote { addr, rkey, len });
        }
        Message::BlockWritten { seq, status } => {
            let i = rep.sent.iter().position(|&s| s == seq);
            let i = i.expect("ack of a block not sent accepted");
            rep.sent.remove(i);
            assert!(rep.settled.insert(seq), "second ack accepted");
            if status.is_ok() {
                rep.ok.insert(seq);
                rep.ok_bytes += m.layout.block(seq).map_or(0, |b| u64::from(b.len));
            }
        }
        Message::VerifyResult {
            seq, crc, status, ..
        } => {
            let i = rep.verifying.iter().position(|&s| s == seq);
            rep.verifying
                .remove(i.expect("unrequested verify result accepted"));
            if status.is_ok() && crc == crc_of(seq) {
                rep.verified_ok.insert(seq);
            }
        }
        Message::Fin { .. } => {}
        _ => panic!("accepted {msg:?} from a replica"),
    }
}

/// The safety properties of every action.
fn check(m: &mut Model, out: &[PrimaryAction]) {
    let mut prev: Option<&PrimaryAction> = None;
    for a in out {
        match *a {
            PrimaryAction::Read { seq, offset, len } => {
                let b = m.layout.block(seq).expect("read inside the layout");
                assert_eq!((offset, len), (b.offset, b.len));
                assert!(m.started.insert(seq), "block {seq} read twice");
                assert!(m.live_bufs.insert(seq));
                assert!(
                    m.live_bufs.len() <= m.window,
                    "more buffers than the window"
                );
                m.reads.push(seq);
            }
            PrimaryAction::Write {
                replica,
                seq,
                remote,
            } => {
                assert!(
                    m.read_ok.contains(&seq),
                    "write of block {seq} before a good read"
                );
                assert!(m.live_bufs.contains(&seq), "write from a freed buffer");
                let rep = &mut m.reps[replica];
                assert!(!rep.gone, "write to a disconnected replica");
                let adv = rep
                    .adverts
                    .remove(&seq)
                    .expect("write into an advertised buffer");
                assert_eq!(adv, remote, "write into another buffer than advertised");
                assert!(
                    m.written.insert((replica, seq)),
                    "block {seq} written twice"
                );
                m.writes.push((replica, seq));
            }
            PrimaryAction::Send { replica, msg } => {
                let rep = &mut m.reps[replica];
                match msg {
                    Message::BlockSent { seq, offset, len } => {
                        assert!(
                            matches!(prev, Some(&PrimaryAction::Write { replica: pr, seq: ps, .. }) if pr == replica && ps == seq),
                            "block-sent right after its write"
                        );
                        let b = m.layout.block(seq).expect("sent block in layout");
                        assert_eq!((offset, len), (b.offset, b.len));
                        rep.sent.push(seq);
                    }
                    Message::VerifyRequest { seq } => {
                        assert!(m.verify, "verify request without verify");
                        assert!(rep.ok.contains(&seq), "verify of a block not acked ok");
                        rep.verifying.push(seq);
                        let w = rep.window.unwrap_or(0) as usize;
                        assert!(rep.verifying.len() <= w, "read-backs beyond the window");
                    }
                    Message::Fin { .. } => {
                        assert_eq!(rep.settled.len() as u64, m.layout.blocks(), "early fin");
                        assert!(rep.verifying.is_empty(), "fin with read-backs outstanding");
                    }
                    _ => {}
                }
            }
            PrimaryAction::Release { seq } => {
                assert!(m.live_bufs.remove(&seq), "double release of {seq}");
                assert!(
                    !m.writes.iter().any(|&(r, s)| s == seq && !m.reps[r].gone),
                    "buffer {seq} freed while a live replica's write reads it"
                );
            }
            PrimaryAction::Disconnect { replica } => {
                m.reps[replica].gone = true;
                m.writes.retain(|&(r, _)| r != replica);
            }
        }
        prev = Some(a);
    }
}
