//! The primary's side of a run as a state machine without I/O: reads, fan-out writes, acks,
//! verification and the final verdict. An adapter executes the [`PrimaryAction`]s and feeds
//! back completions; see the module docs of [`crate::pipeline`] for the rules enforced here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::error::{Failure, ReplicaError};
use super::flow::Window;
use super::ledger::{BlockState, Ledger, Mismatches};
use crate::pipeline::range::{ByteRange, Layout};
use crate::pipeline::stats::LatencyHistogram;
use crate::protocol::{flags, Message, MessageKind, PrimarySide, ProtocolError, Status};

/// Where a replica said a block may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remote {
    /// Remote address.
    pub addr: u64,
    /// Remote key (a memory window over exactly this buffer).
    pub rkey: u32,
    /// Bytes granted.
    pub len: u32,
}

/// What the adapter must do next, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Send a control message to `replica`.
    Send {
        /// Replica index.
        replica: usize,
        /// Message.
        msg: Message,
    },
    /// Allocate a buffer for block `seq` and read `len` bytes at `offset` into it; then call
    /// [`PrimaryCore::on_read_done`].
    Read {
        /// Block.
        seq: u64,
        /// Source byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// RDMA-write block `seq`'s buffer to `remote` on `replica`'s QP (the next action for that
    /// replica is the `BlockSent` SEND, which must follow on the same QP); report the local
    /// completion with [`PrimaryCore::on_write_done`].
    Write {
        /// Replica index.
        replica: usize,
        /// Block.
        seq: u64,
        /// Destination.
        remote: Remote,
    },
    /// Block `seq`'s buffer is no longer read by any NIC: free it.
    Release {
        /// Block.
        seq: u64,
    },
    /// Close the connection to `replica` (after sending what precedes this action).
    Disconnect {
        /// Replica index.
        replica: usize,
    },
}

#[derive(Debug)]
struct InFlight {
    read_done: bool,
    /// The source read succeeded (a failed one is never sent, so no buffer is owed for it).
    read_ok: bool,
    dispatched: bool,
    /// Replicas whose RDMA WRITE from this buffer has not completed locally.
    writing: Vec<usize>,
}

/// Final verdict of a run.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// True only if every block was acked `Ok` by every replica and (with verify) every
    /// read-back matched.
    pub success: bool,
    /// Byte ranges not acked by every replica.
    pub unreplicated: Vec<ByteRange>,
    /// Per replica: why it was lost or failed a block (first reason), if it was; a failed
    /// source read for replicas without a reason of their own.
    pub replica_errors: Vec<Option<ReplicaError>>,
    /// Per replica: ranges whose read-back checksum did not match.
    pub mismatches: Vec<Vec<ByteRange>>,
    /// Blocks and bytes replicated to every replica.
    pub replicated_blocks: u64,
    /// Bytes replicated to every replica.
    pub replicated_bytes: u64,
    /// Read-back comparisons made.
    pub verified_blocks: u64,
}

/// What the primary keeps per replica.
#[derive(Debug)]
struct Peer {
    /// The connection's validator.
    side: PrimarySide,
    /// Still connected.
    alive: bool,
    /// Why it was lost or failed a block, first reason only.
    error: Option<ReplicaError>,
    /// Buffers it advertised for blocks not sent yet.
    adverts: HashMap<u64, Remote>,
    /// Verify requests without an answer (at most its granted window).
    verify_outstanding: u64,
    /// Blocks acked `Ok` whose verify request waits for room in its window.
    verify_queue: VecDeque<u64>,
    /// It answered our `Fin`.
    fin: bool,
}

impl Peer {
    fn new(side: PrimarySide) -> Peer {
        Peer {
            side,
            alive: true,
            error: None,
            adverts: HashMap::new(),
            verify_outstanding: 0,
            verify_queue: VecDeque::new(),
            fin: false,
        }
    }
}

/// Primary state for one run to N replicas.
#[derive(Debug)]
pub struct PrimaryCore {
    layout: Layout,
    verify: bool,
    ledger: Ledger,
    window: Window,
    /// Per replica, by index.
    peers: Vec<Peer>,
    blocks: BTreeMap<u64, InFlight>,
    /// Source checksums (with verify).
    source_crc: HashMap<u64, u32>,
    /// Read start per block, until every replica acked it.
    started: HashMap<u64, Instant>,
    mismatches: Mismatches,
    latency: LatencyHistogram,
    source_failed: Option<ReplicaError>,
    fin_sent: bool,
}

impl PrimaryCore {
    /// A run of `layout` to `replicas` replicas with `window` blocks in flight.
    ///
    /// # Errors
    /// [`ProtocolError::BadConfig`] if the configuration cannot be expressed on the wire.
    pub fn new(
        layout: Layout,
        replicas: usize,
        window: u32,
        verify: bool,
    ) -> Result<PrimaryCore, ProtocolError> {
        if replicas == 0 {
            return Err(ProtocolError::BadConfig {
                what: "at least one replica is needed",
            });
        }
        let f = if verify { flags::VERIFY } else { 0 };
        let peers = (0..replicas)
            .map(|r| PrimarySide::new(layout.config(r as u32, window, f)).map(Peer::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PrimaryCore {
            layout,
            verify,
            ledger: Ledger::new(layout, replicas),
            window: Window::new(window as usize, layout.blocks()),
            peers,
            blocks: BTreeMap::new(),
            source_crc: HashMap::new(),
            started: HashMap::new(),
            mismatches: Mismatches::new(replicas),
            latency: LatencyHistogram::new(),
            source_failed: None,
            fin_sent: false,
        })
    }

    /// The ledger (per-block state).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Per-block latencies (read start to last ack).
    pub fn latency(&self) -> &LatencyHistogram {
        &self.latency
    }

    /// Replicas still connected.
    pub fn alive(&self) -> usize {
        self.peers.iter().filter(|p| p.alive).count()
    }

    /// Whether replica `r` is still connected.
    pub fn is_alive(&self, r: usize) -> bool {
        self.peers.get(r).is_some_and(|p| p.alive)
    }

    /// True while `replica` owes the primary an answer: an ack for a block written to it, a
    /// read-back result (verify), its hello-ack, or a buffer for a block that was read and
    /// waits to be sent while it has a buffer free. An engine fails a replica that is awaited
    /// and silent for the run's timeout (it stalled); one not awaited may be quiet for any
    /// time (it waits behind another replica, or for the source). Never true for a lost
    /// replica, and never for a block whose source read failed.
    pub fn awaits(&self, replica: usize) -> bool {
        let Some(peer) = self.peers.get(replica).filter(|p| p.alive) else {
            return false;
        };
        if peer.side.owed_answers() > 0 {
            return true;
        }
        if self.source_failed.is_some() || !peer.side.expects_advert() {
            return false;
        }
        self.blocks.iter().any(|(&seq, b)| {
            b.read_ok
                && !peer.adverts.contains_key(&seq)
                && self.ledger.state(seq, replica) == Ok(BlockState::Pending)
        })
    }

    /// Sends the hellos and starts the first reads.
    pub fn start(&mut self, out: &mut Vec<PrimaryAction>) {
        for (r, peer) in self.peers.iter().enumerate() {
            out.push(PrimaryAction::Send {
                replica: r,
                msg: Message::Hello(*peer.side.config()),
            });
        }
        self.pump(out);
    }

    /// Starts reads while the window has room and someone can receive them.
    fn pump(&mut self, out: &mut Vec<PrimaryAction>) {
        while self.alive() > 0 && self.source_failed.is_none() {
            let Ok(Some(seq)) = self.window.start() else {
                break;
            };
            let Some(b) = self.layout.block(seq) else {
                break;
            };
            self.started.insert(seq, Instant::now());
            self.blocks.insert(
                seq,
                InFlight {
                    read_done: false,
                    read_ok: false,
                    dispatched: false,
                    writing: Vec::new(),
                },
            );
            out.push(PrimaryAction::Read {
                seq,
                offset: b.offset,
                len: b.len,
            });
        }
        self.maybe_fin(out);
    }

    /// Sends a block to every live replica once it is read and every live replica has a
    /// buffer for it.
    fn dispatch(&mut self, seq: u64, out: &mut Vec<PrimaryAction>) {
        let Some(b) = self.blocks.get(&seq) else {
            return;
        };
        if !b.read_done || b.dispatched {
            return;
        }
        if self.source_failed.is_some() {
            // A failed (or short) read is never sent, nor is anything after it: the replicas
            // are being aborted. Found by the primary_core fuzz target.
            return self.maybe_release(seq, out);
        }
        let live: Vec<usize> = (0..self.peers.len())
            .filter(|&r| self.peers[r].alive)
            .collect();
        if !live
            .iter()
            .all(|&r| self.peers[r].adverts.contains_key(&seq))
        {
            return;
        }
        let len = self.layout.block(seq).map_or(0, |b| b.len);
        let offset = self.layout.block(seq).map_or(0, |b| b.offset);
        let mut writing = Vec::new();
        for &r in &live {
            let Some(remote) = self.peers[r].adverts.remove(&seq) else {
                continue;
            };
            if self.peers[r].side.on_sent(seq).is_err() || self.ledger.sent(seq, r).is_err() {
                // Internal inconsistency: treat the replica as lost rather than guess.
                self.lose(r, ReplicaError::NotSent { seq }, out);
                continue;
            }
            out.push(PrimaryAction::Write {
                replica: r,
                seq,
                remote,
            });
            out.push(PrimaryAction::Send {
                replica: r,
                msg: Message::BlockSent { seq, offset, len },
            });
            writing.push(r);
        }
        if let Some(b) = self.blocks.get_mut(&seq) {
            b.dispatched = true;
            b.writing = writing;
        }
        self.maybe_release(seq, out);
    }

    fn maybe_release(&mut self, seq: u64, out: &mut Vec<PrimaryAction>) {
        let done = self.blocks.get(&seq).is_some_and(|b| {
            b.read_done && (b.dispatched || self.alive() == 0) && b.writing.is_empty()
        });
        if done {
            self.blocks.remove(&seq);
            self.window.retire(seq);
            out.push(PrimaryAction::Release { seq });
            self.pump(out);
        }
    }

    /// The source read of `seq` completed: `Ok(crc)` (crc only used with verify) or why it
    /// failed. A failed source read ends the run: nothing more is sent.
    pub fn on_read_done(
        &mut self,
        seq: u64,
        result: Result<u32, Failure>,
        out: &mut Vec<PrimaryAction>,
    ) {
        let Some(b) = self.blocks.get_mut(&seq) else {
            return;
        };
        b.read_done = true;
        b.read_ok = result.is_ok();
        match result {
            Ok(crc) => {
                if self.verify {
                    self.source_crc.insert(seq, crc);
                }
                self.dispatch(seq, out);
            }
            Err(e) => {
                self.source_failed = Some(ReplicaError::SourceRead {
                    seq,
                    range: self.layout.block(seq).map(|b| b.range()),
                    source: Arc::new(e),
                });
                for r in 0..self.peers.len() {
                    if self.peers[r].alive {
                        out.push(PrimaryAction::Send {
                            replica: r,
                            msg: Message::Abort {
                                status: Status::Errno(libc::EIO as u16),
                                seq,
                            },
                        });
                        self.lose(r, ReplicaError::SourceAborted, out);
                    }
                }
                self.maybe_release(seq, out);
            }
        }
    }

    /// The local completion of the RDMA WRITE of `seq` to `replica`; `Err` (a work completion
    /// error) means the replica's connection is broken.
    pub fn on_write_done(
        &mut self,
        replica: usize,
        seq: u64,
        result: Result<(), Failure>,
        out: &mut Vec<PrimaryAction>,
    ) {
        if let Some(b) = self.blocks.get_mut(&seq) {
            b.writing.retain(|&r| r != replica);
        }
        if let Err(e) = result {
            let why = ReplicaError::Write {
                seq,
                source: Arc::new(e),
            };
            self.lose(replica, why, out);
        }
        self.maybe_release(seq, out);
    }

    /// Raw bytes received from `replica`.
    pub fn on_message(&mut self, replica: usize, bytes: &[u8], out: &mut Vec<PrimaryAction>) {
        if !self.is_alive(replica) {
            return;
        }
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => return self.violation(replica, e, out),
        };
        if let Err(e) = self.peers[replica].side.on_receive(&msg) {
            return self.violation(replica, e, out);
        }
        match msg {
            Message::BufferReady {
                seq,
                addr,
                rkey,
                len,
            } => {
                self.peers[replica]
                    .adverts
                    .insert(seq, Remote { addr, rkey, len });
                self.dispatch(seq, out);
            }
            Message::BlockWritten { seq, status } => {
                if self.ledger.acked(seq, replica, status).is_err() {
                    return self.violation(
                        replica,
                        ProtocolError::BadSequence {
                            kind: MessageKind::BlockWritten,
                            seq,
                            why: "not in flight",
                        },
                        out,
                    );
                }
                if status.is_ok() && self.verify {
                    self.peers[replica].verify_queue.push_back(seq);
                    self.pump_verify(replica, out);
                } else if !status.is_ok() {
                    self.peers[replica]
                        .error
                        .get_or_insert(ReplicaError::BlockFailed {
                            replica,
                            seq,
                            status,
                        });
                }
                if self.ledger.is_replicated(seq) {
                    if let Some(t) = self.started.remove(&seq) {
                        self.latency.record(t.elapsed());
                    }
                }
            }
            Message::VerifyResult {
                seq, crc, status, ..
            } => {
                let peer = &mut self.peers[replica];
                peer.verify_outstanding = peer.verify_outstanding.saturating_sub(1);
                let range = self.layout.block(seq).map(|b| b.range());
                let source = self.source_crc.get(&seq).copied();
                if let (Some(range), Some(src)) = (range, source) {
                    if status.is_ok() {
                        self.mismatches.check(replica, range, src, crc);
                    } else {
                        self.mismatches.unreadable(replica, range);
                    }
                }
                self.pump_verify(replica, out);
            }
            Message::Fin { .. } => {
                self.peers[replica].fin = true;
                out.push(PrimaryAction::Disconnect { replica });
                self.peers[replica].alive = false;
            }
            _ => {}
        }
        self.maybe_fin(out);
    }

    /// Sends queued verify requests to `replica` while its window of read-backs has room.
    fn pump_verify(&mut self, replica: usize, out: &mut Vec<PrimaryAction>) {
        let peer = &mut self.peers[replica];
        while peer.side.can_verify() {
            let Some(seq) = peer.verify_queue.pop_front() else {
                break;
            };
            if peer.side.on_verify_request(seq).is_ok() {
                peer.verify_outstanding += 1;
                out.push(PrimaryAction::Send {
                    replica,
                    msg: Message::VerifyRequest { seq },
                });
            }
        }
    }

    fn violation(&mut self, replica: usize, e: ProtocolError, out: &mut Vec<PrimaryAction>) {
        if !matches!(e, ProtocolError::PeerAborted { .. }) {
            out.push(PrimaryAction::Send {
                replica,
                msg: Message::Abort {
                    status: Status::Protocol(e.code()),
                    seq: u64::MAX,
                },
            });
        }
        self.lose(replica, ReplicaError::Protocol { replica, source: e }, out);
    }

    /// `replica`'s connection is gone (disconnect event, timeout, error). The adapter must
    /// call this only once its QP can no longer read our buffers (error state or destroyed).
    pub fn on_replica_lost(&mut self, replica: usize, why: Failure, out: &mut Vec<PrimaryAction>) {
        if self.is_alive(replica) {
            self.lose(replica, ReplicaError::Lost(Arc::new(why)), out);
        }
    }

    fn lose(&mut self, replica: usize, why: ReplicaError, out: &mut Vec<PrimaryAction>) {
        if !self.is_alive(replica) {
            return;
        }
        let peer = &mut self.peers[replica];
        peer.alive = false;
        peer.error.get_or_insert(why);
        peer.adverts.clear();
        peer.verify_outstanding = 0;
        peer.verify_queue.clear();
        self.ledger.fail_replica(replica);
        out.push(PrimaryAction::Disconnect { replica });
        // Its writes can no longer complete; blocks waiting for its buffers may now proceed.
        let seqs: Vec<u64> = self.blocks.keys().copied().collect();
        for seq in seqs {
            if let Some(b) = self.blocks.get_mut(&seq) {
                b.writing.retain(|&r| r != replica);
            }
            self.dispatch(seq, out);
            self.maybe_release(seq, out);
        }
        self.maybe_fin(out);
    }

    fn maybe_fin(&mut self, out: &mut Vec<PrimaryAction>) {
        if self.fin_sent || !self.blocks.is_empty() || !self.ledger.is_settled() {
            return;
        }
        if self
            .peers
            .iter()
            .any(|p| p.verify_outstanding > 0 || !p.verify_queue.is_empty())
        {
            return;
        }
        self.fin_sent = true;
        let (blocks, bytes) = self.ledger.replicated_blocks_bytes();
        for r in 0..self.peers.len() {
            if !self.peers[r].alive {
                continue;
            }
            if let Err(e) = self.peers[r].side.on_fin_sent() {
                // Settled in the ledger but not on the wire: never end a run on a guess.
                let why = ReplicaError::FinRefused {
                    replica: r,
                    source: e,
                };
                self.lose(r, why, out);
                continue;
            }
            out.push(PrimaryAction::Send {
                replica: r,
                msg: Message::Fin { blocks, bytes },
            });
        }
    }

    /// True when every block is settled, verification is done and the fins are exchanged
    /// (or the peers are gone).
    pub fn is_finished(&self) -> bool {
        self.fin_sent && self.alive() == 0
    }

    /// True when the verdict is known (fins may still be in flight).
    pub fn is_settled(&self) -> bool {
        self.fin_sent
    }

    /// The verdict. Never success unless every block is acked by every replica and verified.
    pub fn outcome(&self) -> Outcome {
        let (replicated_blocks, replicated_bytes) = self.ledger.replicated_blocks_bytes();
        let mut errors: Vec<Option<ReplicaError>> =
            self.peers.iter().map(|p| p.error.clone()).collect();
        if let Some(e) = &self.source_failed {
            for slot in errors.iter_mut() {
                slot.get_or_insert_with(|| e.clone());
            }
        }
        let mismatches: Vec<Vec<ByteRange>> = (0..self.peers.len())
            .map(|r| self.mismatches.ranges(r))
            .collect();
        let verified_ok = !self.verify
            || (self.mismatches.is_clean()
                && self.mismatches.checked() == self.layout.blocks() * self.peers.len() as u64);
        Outcome {
            success: self.ledger.all_replicated()
                && verified_ok
                && self.source_failed.is_none()
                && self.fin_sent,
            unreplicated: self.ledger.unreplicated(),
            replica_errors: errors,
            mismatches,
            replicated_blocks,
            replicated_bytes,
            verified_blocks: self.mismatches.checked(),
        }
    }

    /// State of block `seq` on `replica` (for tests and progress).
    pub fn state(&self, seq: u64, replica: usize) -> Option<BlockState> {
        self.ledger.state(seq, replica).ok()
    }
}
