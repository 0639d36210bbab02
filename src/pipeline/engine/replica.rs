//! A replica's engine: grants the primary a memory window per block, writes each received
//! block from its buffer to the drive, flushes when the drive has a volatile write cache, and
//! acks (the I/O side of [`ReplicaCore`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::pipeline::{crc32c, CopyMeter, ReplicaAction, ReplicaCore};
use crate::protocol::{Message, ProtocolError, ReplicaTarget, Status};
use crate::rdma::{
    self, Completion as WorkCompletion, Listener, MemoryWindow, SendRequest, WcOpcode, WcStatus,
    WindowAccess,
};

use super::auth::{AuthError, Verdict};
use super::drive::{Backend, Drive, WriteCache};
use super::link::{self, Link, WR_BIND, WR_MASK, WR_RECV};
use super::slots::{BufferInfo, DriveBuf, Slots};
use super::turn::{self, Idle, Next, Role};
use super::wait::Waiter;
use super::{cpu_time, wait_bound, CopyMode, EngineError, Event, MessageCounts, ReplicaConfig};
use crate::uring::{AlignedBuf, Completion};

/// How a replica's run ended (both are orderly ends; errors are [`EngineError`]s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaEnd {
    /// The primary sent `Fin`: every block this replica acked is on its drive.
    Fin,
    /// The primary went away before `Fin` (disconnect, completion error, or silence for the
    /// timeout); the text says how. Blocks acked are on the drive; the others were never
    /// claimed as replicated by the primary.
    PrimaryGone(String),
}

/// What a replica did.
#[derive(Clone, Debug)]
pub struct ReplicaReport {
    /// Why the run ended.
    pub end: ReplicaEnd,
    /// Blocks written (and flushed when needed) and acked.
    pub blocks_written: u64,
    /// Bytes of those blocks.
    pub bytes_written: u64,
    /// Blocks whose drive write failed (acked with the error status).
    pub failed_blocks: u64,
    /// Payload bytes the CPU copied (0 in zero-copy mode).
    pub payload_bytes_copied: u64,
    /// CPU time (user + system) of the thread that ran the engine, from the connection to the
    /// end (`RUSAGE_THREAD`: other threads of the process are not counted).
    pub cpu: Duration,
    /// Control messages sent to the primary, and the SENDs that carried them.
    pub messages: MessageCounts,
    /// Blocks whose window the primary's `BlockSent` invalidated (SEND_WITH_INV). A replica
    /// never invalidates a window itself: a `BlockSent` that did not is a protocol error.
    pub windows_invalidated_by_primary: u64,
}

/// A drive operation in flight. Its buffer is not here: the ring owns it until the completion
/// hands it back, so no return path can free memory the drive may still write.
enum Io {
    Write { seq: u64, len: u32 },
    Flush,
    ReadBack { seq: u64, len: u32 },
}

/// The slot index of a read-back buffer (which serves no slot).
const READ_BACK: usize = usize::MAX;

/// A replica listening for its primary, with its target open and buffers allocated.
pub struct ReplicaEngine {
    // The drive first: dropping its ring waits for what is in flight (which owns its buffers).
    drive: Drive,
    cfg: ReplicaConfig,
    listener: Listener,
    /// Bounce mode: one host buffer per slot, `None` while a write owns it.
    bounce: Vec<Option<AlignedBuf>>,
    slots: Slots,
}

impl ReplicaEngine {
    /// Opens the target read-write, decides on flushing, allocates the buffers and starts
    /// listening.
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] (see [`ReplicaConfig::validate`]),
    /// [`EngineError::Open`] / [`EngineError::Ring`] for the target,
    /// [`EngineError::NoP2pMem`] / [`EngineError::Buffers`], [`EngineError::Rdma`] for the
    /// listener (EADDRINUSE: the port is taken; EADDRNOTAVAIL: no RDMA device has that address).
    pub fn new(cfg: ReplicaConfig) -> Result<ReplicaEngine, EngineError> {
        cfg.validate()?;
        // The ring holds a write and a read-back per buffer, a flush and two polls.
        let drive = Drive::open(&cfg.target, true, cfg.window as usize * 2 + 3)?;
        let slots = Slots::alloc(cfg.buffers, cfg.window as usize, cfg.block_size as usize)?;
        let bounce = match cfg.copy {
            CopyMode::Bounce => (0..cfg.window)
                .map(|_| Some(AlignedBuf::new(cfg.block_size as usize)))
                .collect(),
            CopyMode::None => Vec::new(),
        };
        let listener = Listener::bind(cfg.listen, 4)
            .map_err(|e| EngineError::rdma(format!("listen {}", cfg.listen), e))?;
        Ok(ReplicaEngine {
            cfg,
            listener,
            bounce,
            drive,
            slots,
        })
    }

    /// Target capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.drive.capacity
    }
    /// How the target is accessed.
    pub fn backend(&self) -> Backend {
        self.drive.backend
    }
    /// Whether writes are flushed before they are acked, and why.
    pub fn write_cache(&self) -> &WriteCache {
        &self.drive.cache
    }
    /// Which buffers and why.
    pub fn buffers(&self) -> &BufferInfo {
        &self.slots.info
    }
    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    /// Waits for the primary, then serves it until `Fin` or until it goes away.
    ///
    /// # Errors
    /// [`EngineError::NoPrimary`] (nobody connected within the accept timeout),
    /// [`EngineError::NoHello`], [`EngineError::Protocol`] (a malformed or out-of-order
    /// message: the primary was sent an abort), [`EngineError::BlockTooLarge`],
    /// [`EngineError::Rdma`] / [`EngineError::Ring`] when a local resource fails.
    pub fn run_with(
        mut self,
        observe: &mut dyn FnMut(Event),
    ) -> Result<ReplicaReport, EngineError> {
        let _run = tracing::info_span!("run", role = "replica").entered();
        let deadline = Instant::now() + self.cfg.accept_timeout;
        // Connections that are refused (address, proof) do not end the wait for the primary.
        let link = loop {
            let req = match self.listener.get_request(Duration::from_secs(1)) {
                Ok(r) => r,
                Err(rdma::Error::Timeout { .. }) if Instant::now() < deadline => continue,
                Err(e) => return Err(EngineError::NoPrimary(Box::new(e))),
            };
            let peer = req.peer_addr().map(|a| a.ip());
            let (private_data, expect) = match self.cfg.access.judge(peer, req.private_data())? {
                Verdict::Reject { private_data, why } => {
                    let _ = req.reject(&private_data);
                    observe(Event::Refused(why));
                    continue;
                }
                Verdict::Accept {
                    private_data,
                    expect,
                } => (private_data, expect),
            };
            let link = Link::accept(
                req,
                self.cfg.timeout,
                self.cfg.wait,
                &self.slots,
                private_data,
            )?;
            if let Some(expect) = expect {
                let checked = link.first_message(self.cfg.timeout).and_then(|m| {
                    if self.cfg.access.check_proof(&expect, &m) {
                        Ok(())
                    } else {
                        Err(AuthError::WrongPrimaryProof)
                    }
                });
                if let Err(why) = checked {
                    let who = peer.map_or("?".to_string(), |p| p.to_string());
                    observe(Event::Refused(format!("hung up on {who}: {why}")));
                    let _ = link.conn.disconnect(Duration::from_millis(500));
                    continue;
                }
            }
            break link;
        };
        let mws = (0..self.slots.len())
            .map(|_| MemoryWindow::alloc(&link.pd))
            .collect::<rdma::Result<Vec<_>>>()
            .map_err(|e| {
                EngineError::rdma("memory windows (needed for least-privilege access)", e)
            })?;
        observe(Event::Connected);
        let mut waiter = Waiter::new(self.cfg.wait, self.cfg.busy_poll, 1);
        let mut links = [link];
        let result = self.run_loop(&mut links, &mws, &mut waiter);
        // Drive I/O still in flight finishes before the buffers go away.
        waiter.drain(&mut self.drive.ring);
        let _ = links[0].conn.disconnect(Duration::from_millis(500));
        drop(mws);
        result
    }

    /// [`ReplicaEngine::run_with`] without an observer.
    ///
    /// # Errors
    /// As [`ReplicaEngine::run_with`].
    pub fn run(self) -> Result<ReplicaReport, EngineError> {
        self.run_with(&mut |_| {})
    }

    fn run_loop(
        &mut self,
        links: &mut [Link],
        mws: &[MemoryWindow],
        waiter: &mut Waiter,
    ) -> Result<ReplicaReport, EngineError> {
        let cfg = &self.cfg;
        let drive = &mut self.drive;
        // The hello is checked against this target's real size, LBA size and buffers.
        let core = ReplicaCore::with_target(ReplicaTarget::new(
            drive.capacity,
            drive.lba,
            self.slots.len() as u32,
            cfg.block_size as u32,
        ));
        let allowed = {
            let (off, len) = cfg.bounds;
            let end = len.map_or(drive.capacity, |l| {
                off.saturating_add(l).min(drive.capacity)
            });
            (off, end)
        };
        let cpu0 = cpu_time();
        let mut role = ReplicaRole {
            cfg,
            mws,
            slots: &mut self.slots,
            bounce: &mut self.bounce,
            flush: drive.cache.volatile,
            allowed,
            meter: CopyMeter::new(),
            core,
            out: Vec::new(),
            actions: VecDeque::new(),
            invalidated_by_peer: vec![false; mws.len()],
            invalidated: 0,
            ios: HashMap::new(),
            next_tag: 1,
            unflushed: Vec::new(),
            flushing: None,
            end: ReplicaEnd::Fin,
            fin_sent_at: None,
        };
        turn::run(&mut role, links, drive, waiter)?;
        let (blocks_written, bytes_written) = role.core.written();
        Ok(ReplicaReport {
            end: role.end,
            blocks_written,
            bytes_written,
            failed_blocks: role.core.failed_blocks(),
            payload_bytes_copied: role.meter.bytes(),
            cpu: cpu_time().saturating_sub(cpu0),
            messages: MessageCounts::of(&links[..]),
            windows_invalidated_by_primary: role.invalidated,
        })
    }
}

/// A replica's handlers for the engine loop ([`turn::run`]) and the state they share.
struct ReplicaRole<'a> {
    cfg: &'a ReplicaConfig,
    mws: &'a [MemoryWindow],
    slots: &'a mut Slots,
    /// Bounce mode: one host buffer per slot, `None` while a write owns it.
    bounce: &'a mut Vec<Option<AlignedBuf>>,
    /// The drive caches writes: ack only after a flush that started after the write.
    flush: bool,
    /// The byte range this replica accepts (`--offset` / `--len`, within the target).
    allowed: (u64, u64),
    meter: CopyMeter,
    core: ReplicaCore,
    out: Vec<ReplicaAction>,
    /// The core's actions, carried out at the next turn.
    actions: VecDeque<ReplicaAction>,
    /// Per slot: the primary's `BlockSent` came as a SEND_WITH_INV of the slot's current
    /// window key, so the window is dead and its block may go to the drive (checked when the
    /// core asks for the write, taken when it is carried out).
    invalidated_by_peer: Vec<bool>,
    /// Windows the primary invalidated (all of them: a replica never invalidates one itself).
    invalidated: u64,
    /// Drive operations in flight, by tag.
    ios: HashMap<u64, Io>,
    next_tag: u64,
    /// Writes done and waiting for the next flush.
    unflushed: Vec<(u64, Status)>,
    /// Writes the flush in flight covers.
    flushing: Option<Vec<(u64, Status)>>,
    end: ReplicaEnd,
    fin_sent_at: Option<Instant>,
}

impl ReplicaRole<'_> {
    /// Queues what the core answered.
    fn take_out(&mut self) {
        self.actions.extend(self.out.drain(..));
    }

    fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    fn write_done(&mut self, seq: u64, status: Status) -> Result<(), EngineError> {
        self.core
            .on_write_done(seq, status, &mut self.out)
            .map_err(|_| EngineError::Internal("write result for an unknown block"))
    }

    /// Carries out one action of the core.
    fn carry_out(
        &mut self,
        a: ReplicaAction,
        link: &Link,
        drive: &mut Drive,
    ) -> Result<(), EngineError> {
        let block_max = self.cfg.block_size;
        match a {
            ReplicaAction::Send(m) => {
                link.queue_msg(&m);
                if matches!(m, Message::Fin { .. }) {
                    self.fin_sent_at = Some(Instant::now());
                }
            }
            ReplicaAction::Advertise { slot, seq, len } => {
                let _block = tracing::debug_span!("block", seq).entered();
                tracing::debug!(slot, len, "advertise a buffer");
                if u64::from(len) > block_max {
                    let m = Message::Abort {
                        status: Status::Refused(1),
                        seq,
                    };
                    let _ = link.send(&m);
                    return Err(EngineError::BlockTooLarge {
                        got: len,
                        max: block_max,
                    });
                }
                let (chunk, at) = self.slots.chunk_of(slot);
                let mr = link
                    .mrs
                    .get(&chunk)
                    .ok_or(EngineError::Internal("slot chunk not registered"))?;
                let mw = &self.mws[slot];
                // A new key: whatever the peer invalidated before was an older one.
                self.invalidated_by_peer[slot] = false;
                let bind = SendRequest::bind_window(
                    WR_BIND | slot as u64,
                    mw,
                    mr,
                    at as u64,
                    u64::from(len),
                    WindowAccess::none().remote_write(),
                )
                .unsignaled();
                // Posted in one chain with the bind, so name the key it will set.
                let rkey = mw.next_bind_rkey();
                link.queue(bind);
                link.queue_msg(&Message::BufferReady {
                    seq,
                    addr: self.slots.remote_addr(slot),
                    rkey,
                    len,
                });
            }
            ReplicaAction::Write {
                slot,
                seq,
                offset,
                len,
            } => {
                let _block = tracing::debug_span!("block", seq).entered();
                tracing::debug!(slot, offset, len, "write to the drive");
                // The window must be dead before the drive reads the buffer: the primary's
                // SEND_WITH_INV killed it (checked by `check_invalidated` when the BlockSent
                // arrived; a replica never posts a LOCAL_INV, see there).
                if !std::mem::take(&mut self.invalidated_by_peer[slot]) {
                    return Err(EngineError::Internal(
                        "a drive write of a block whose window is open",
                    ));
                }
                self.write(slot, seq, offset, len, drive)?;
            }
            ReplicaAction::ReadBack { seq, offset, len } => {
                let buf = DriveBuf::host(READ_BACK, AlignedBuf::new(len as usize), len as usize);
                let tag = self.tag();
                match drive.ring.read(drive.t, offset, buf, tag) {
                    Ok(()) => {
                        self.ios.insert(tag, Io::ReadBack { seq, len });
                    }
                    Err(rej) => {
                        let st = status_of(&rej.error);
                        self.core.on_readback_done(seq, len, 0, st, &mut self.out);
                    }
                }
            }
        }
        Ok(())
    }

    /// A message from the primary.
    fn on_message(&mut self, link: &Link, bytes: &[u8]) -> Result<(), EngineError> {
        let had_layout = self.core.layout().is_some();
        let res = self.core.on_message(bytes, &mut self.out);
        if let (Ok(()), false, Some(l)) = (&res, had_layout, self.core.layout()) {
            // The hello: its range must lie within what this replica accepts. Nothing it
            // asked for has been done yet.
            let (start, end) = (l.offset(), l.offset() + l.len());
            let (a, b) = self.allowed;
            if start < a || end > b {
                self.out.clear();
                let m = Message::Abort {
                    status: Status::Refused(2),
                    seq: 0,
                };
                let _ = link.send(&m);
                std::thread::sleep(Duration::from_millis(100));
                let _ = link.conn.disconnect(Duration::from_millis(500));
                return Err(EngineError::RangeRefused {
                    start,
                    end,
                    allowed_start: a,
                    allowed_end: b,
                });
            }
        }
        match res {
            Ok(()) => Ok(()),
            Err(e) => Err(refuse(link, e)),
        }
    }

    /// The drive writes the core asked for in `self.out[from..]` (answering one message of a
    /// receive) need their windows dead: each must be the window `dead` names, the slot whose
    /// current key the SEND_WITH_INV that brought the message invalidated (one block per
    /// invalidation). Anything else (a plain SEND, another key, a second block) is a protocol
    /// error: the primary is sent an abort and nothing of the block reaches the drive.
    ///
    /// A replica never invalidates a window itself. A LOCAL_INV of a type-2 window that the
    /// peer's SEND_WITH_INV invalidated already crashes Linux 6.12 soft-RoCE
    /// (`rxe_invalidate_mw` does not check the window's state and dereferences NULL), and a
    /// crafted primary could race the two; so a `BlockSent` that left its window open is
    /// refused rather than repaired.
    fn check_invalidated(
        &mut self,
        link: &Link,
        from: usize,
        dead: &mut Option<usize>,
    ) -> Result<(), EngineError> {
        for i in from..self.out.len() {
            if let ReplicaAction::Write { slot, seq, .. } = self.out[i] {
                if dead.take() != Some(slot) {
                    self.out.truncate(from);
                    return Err(refuse(link, ProtocolError::NotInvalidating { seq }));
                }
                self.invalidated_by_peer[slot] = true;
                self.invalidated += 1;
            }
        }
        Ok(())
    }

    /// Writes block `seq` from `slot` (its window is dead) to the drive.
    fn write(
        &mut self,
        slot: usize,
        seq: u64,
        offset: u64,
        len: u32,
        drive: &mut Drive,
    ) -> Result<(), EngineError> {
        // The slot is not re-advertised before this block is acked.
        let buf = if self.cfg.copy == CopyMode::Bounce {
            let mut h = self.bounce[slot]
                .take()
                .ok_or(EngineError::Internal("a bounce buffer lent twice"))?;
            self.meter.copy(
                &mut h.as_mut_slice()[..len as usize],
                self.slots.bytes(slot, len as usize)?,
            );
            DriveBuf::host(slot, h, len as usize)
        } else {
            self.slots.take(slot, len as usize)?
        };
        let tag = self.tag();
        match drive.ring.write(drive.t, offset, buf, tag) {
            Ok(()) => {
                self.ios.insert(tag, Io::Write { seq, len });
            }
            Err(rej) => {
                if let Some(h) = rej.bufs.into_single().and_then(|b| self.slots.give_back(b)) {
                    self.bounce[slot] = Some(h);
                }
                self.write_done(seq, status_of(&rej.error))?;
            }
        }
        Ok(())
    }
}

impl Role for ReplicaRole<'_> {
    fn finished(&self) -> bool {
        // The run ends by the handlers' verdict (fin sent and gone, the primary gone).
        false
    }

    fn act(&mut self, links: &mut [Link], drive: &mut Drive) -> Result<bool, EngineError> {
        let mut busy = false;
        while let Some(a) = self.actions.pop_front() {
            busy = true;
            self.carry_out(a, &links[0], drive)?;
            self.take_out();
        }
        Ok(busy)
    }

    fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    fn post_failed(&mut self, _r: usize, e: rdma::Error) -> Result<(), EngineError> {
        Err(EngineError::rdma("posting work requests", e))
    }

    fn on_completion(
        &mut self,
        r: usize,
        wc: &WorkCompletion,
        links: &mut [Link],
        _drive: &mut Drive,
    ) -> Result<Next, EngineError> {
        if wc.status != WcStatus::Success {
            if !self.core.is_finished() {
                self.end = ReplicaEnd::PrimaryGone(format!(
                    "{:?} completion failed ({:?}) before fin: the primary went away",
                    wc.opcode, wc.status
                ));
            }
            return Ok(Next::Stop);
        }
        let link = &links[r];
        match wc.wr_id & WR_MASK {
            WR_RECV if wc.opcode == WcOpcode::Recv => {
                // Only the key a slot's window holds now counts: the NIC invalidated exactly
                // that window, so the block of a BlockSent in this receive may go to the drive.
                let mut dead = wc
                    .invalidated_rkey
                    .and_then(|k| self.mws.iter().position(|mw| mw.rkey() == k));
                let b = link
                    .take_recv(wc.wr_id, wc.byte_len)
                    .map_err(|e| EngineError::rdma("receiving a message", e))?;
                for m in link::messages(&b) {
                    let from = self.out.len();
                    self.on_message(link, m)?;
                    self.check_invalidated(link, from, &mut dead)?;
                }
            }
            _ => {}
        }
        self.take_out();
        Ok(Next::Go)
    }

    fn on_drive(&mut self, c: Completion<DriveBuf>, _drive: &mut Drive) -> Result<(), EngineError> {
        // Writes are acked only after a flush that started after them (when the drive has a
        // volatile write cache). The buffer comes back with its completion: to its slot, its
        // bounce place, or (a read-back) to be checked and freed.
        let mut read_back = None;
        if let Some(b) = c.bufs.into_single() {
            let slot = b.slot();
            if slot == READ_BACK {
                read_back = Some(b);
            } else if let Some(h) = self.slots.give_back(b) {
                self.bounce[slot] = Some(h);
            }
        }
        let io = self.ios.remove(&c.tag);
        // A short transfer fails the block: only the whole block counts.
        let want = match &io {
            Some(Io::Write { len, .. } | Io::ReadBack { len, .. }) => Some(*len as usize),
            _ => None,
        };
        let status = match &c.result {
            Ok(got) if want.is_some_and(|w| *got != w) => Status::Errno(libc::EIO as u16),
            Ok(_) => Status::Ok,
            Err(e) => status_of(e),
        };
        match io {
            Some(Io::Write { seq, .. }) if self.flush => self.unflushed.push((seq, status)),
            Some(Io::Write { seq, .. }) => self.write_done(seq, status)?,
            Some(Io::Flush) => {
                for (seq, st) in self.flushing.take().unwrap_or_default() {
                    let st = if st.is_ok() { status } else { st };
                    self.write_done(seq, st)?;
                }
            }
            Some(Io::ReadBack { seq, len }) => {
                let crc = match (&read_back, status.is_ok()) {
                    (Some(b), true) => crc32c(b.bytes()),
                    _ => 0,
                };
                self.core
                    .on_readback_done(seq, len, crc, status, &mut self.out);
            }
            None => {}
        }
        Ok(())
    }

    fn after_events(
        &mut self,
        links: &mut [Link],
        drive: &mut Drive,
        _busy: &mut bool,
    ) -> Result<Next, EngineError> {
        if self.flushing.is_none() && !self.unflushed.is_empty() {
            let tag = self.tag();
            drive
                .ring
                .flush(drive.t, tag)
                .map_err(|e| EngineError::ring("flush", e))?;
            self.ios.insert(tag, Io::Flush);
            self.flushing = Some(std::mem::take(&mut self.unflushed));
        }
        self.take_out();
        let link = &links[0];
        if let Err(e) = link.conn.check() {
            if !self.core.is_finished() {
                self.end = ReplicaEnd::PrimaryGone(format!("connection ended before fin: {e}"));
            }
            return Ok(Next::Stop);
        }
        if let Some(t) = self.fin_sent_at {
            // Give the fin time to leave, then hang up.
            if t.elapsed() > Duration::from_millis(200) || link.conn.is_disconnected() {
                return Ok(Next::Stop);
            }
        }
        Ok(Next::Go)
    }

    fn idle(&mut self, since_progress: Duration) -> Result<Idle, EngineError> {
        let timeout = self.cfg.timeout;
        if self.core.layout().is_none() && since_progress > timeout {
            return Err(EngineError::NoHello(timeout));
        }
        // A link that went down delivers no event to a replica that has nothing to send:
        // silence from the primary for the timeout mid-run means it is gone.
        if !self.core.is_finished() && since_progress > timeout {
            self.end = ReplicaEnd::PrimaryGone(format!(
                "nothing from the primary for {timeout:?} before fin: the primary or the link went away"
            ));
            return Ok(Idle::Stop);
        }
        let cap = if self.fin_sent_at.is_some() {
            Duration::from_millis(20)
        } else {
            Duration::from_secs(1)
        };
        Ok(Idle::Wait(wait_bound(since_progress, timeout, cap)))
    }
}

/// Ends the connection for the primary's protocol violation `e`: sends it an abort (unless
/// it aborted itself), lets that leave, hangs up.
fn refuse(link: &Link, e: ProtocolError) -> EngineError {
    if !matches!(e, ProtocolError::PeerAborted { .. }) {
        let _ = link.send(&ReplicaCore::abort_for(&e));
    }
    // Let the abort leave before hanging up.
    std::thread::sleep(Duration::from_millis(100));
    let _ = link.conn.disconnect(Duration::from_millis(500));
    EngineError::Protocol(e)
}

/// The wire status of a failed drive operation: the NVMe status, else the errno.
fn status_of(e: &crate::uring::Error) -> Status {
    match e.nvme_status() {
        Some(s) => Status::Nvme(s.0),
        None => Status::Errno(e.errno().unwrap_or(libc::EIO) as u16),
    }
}
