//! The primary's engine: reads blocks from the source into pool buffers, RDMA-writes each
//! buffer to every replica, and collects the acks (the I/O side of [`PrimaryCore`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::pipeline::{
    crc32c, CopyMeter, Failure, Layout, Outcome, Percentiles, PrimaryAction, PrimaryCore,
};
use crate::protocol::Message;
use crate::rdma::{self, Completion as WorkCompletion, SendOp, SendRequest, WcOpcode, WcStatus};

use super::drive::{Backend, Drive};
use super::link::{self, Link, WR_MASK, WR_RECV, WR_WRITE};
use super::pace::Pacer;
use super::slots::{BufferInfo, DriveBuf, Slots};
use super::turn::{self, Idle, Next, Role};
use super::wait::Waiter;
use super::{
    cpu_time, wait_bound, CopyMode, EngineError, Event, MessageCounts, PrimaryConfig, WaitMode,
};
use crate::uring::{AlignedBuf, Completion};

/// The result of a primary run. `outcome.success` is true only when every block was acked
/// by every replica (and, with verify, every read-back matched).
#[derive(Clone, Debug)]
pub struct PrimaryReport {
    /// The verdict, unreplicated ranges, per-replica errors and mismatches.
    pub outcome: Outcome,
    /// Per-block latency (read start to the last replica's ack).
    pub latency: Percentiles,
    /// Wall time from the first read to the end.
    pub elapsed: Duration,
    /// CPU time (user + system) of the thread that ran the engine, during the run
    /// (`RUSAGE_THREAD`: other threads of the process are not counted).
    pub cpu: Duration,
    /// Payload bytes the CPU copied (0 in zero-copy mode).
    pub payload_bytes_copied: u64,
    /// Control messages sent to the replicas, and the SENDs that carried them.
    pub messages: MessageCounts,
    /// Blocks in flight at most.
    pub window: u32,
    /// The range and its blocks.
    pub layout: Layout,
    /// Which buffers were used and why.
    pub buffers: BufferInfo,
    /// Zero-copy or bounce.
    pub copy: CopyMode,
    /// How the loop waited.
    pub wait: WaitMode,
}

/// A primary set up to replicate one range: the source is open, the range checked and the
/// buffers allocated; [`PrimaryEngine::run`] connects and replicates.
pub struct PrimaryEngine {
    // Links (with their memory regions) are created in run() and dropped there, before these.
    // The drive first: dropping its ring waits for what is in flight (which owns its buffers).
    drive: Drive,
    cfg: PrimaryConfig,
    layout: Layout,
    window: u32,
    /// Bounce mode: one host buffer per slot, `None` while a read owns it.
    bounce: Vec<Option<AlignedBuf>>,
    slots: Slots,
}

impl PrimaryEngine {
    /// Opens the source, checks the range against it and allocates the buffers.
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] (see [`PrimaryConfig::validate`]),
    /// [`EngineError::Open`] / [`EngineError::Ring`] for the source,
    /// [`EngineError::Range`] when the range is empty, not LBA-aligned, beyond the source or
    /// the block size is invalid, [`EngineError::NoP2pMem`] / [`EngineError::Buffers`].
    pub fn new(cfg: PrimaryConfig) -> Result<PrimaryEngine, EngineError> {
        cfg.validate()?;
        // The ring holds the window's reads plus two polls per replica (events mode).
        let drive = Drive::open(
            &cfg.source,
            false,
            cfg.window as usize + 2 * cfg.replicas.len(),
        )?;
        let len = cfg.len.unwrap_or(drive.capacity.saturating_sub(cfg.offset));
        let layout = Layout::new(cfg.offset, len, cfg.block_size, drive.lba, drive.capacity)?;
        let window = cfg.window.min(layout.blocks().min(1024) as u32).max(1);
        let bs = layout.block_size() as usize;
        let slots = Slots::alloc(cfg.buffers, window as usize, bs)?;
        // Bounce mode: reads land in plain host memory and are copied into the registered slot.
        let bounce = match cfg.copy {
            CopyMode::Bounce => (0..window).map(|_| Some(AlignedBuf::new(bs))).collect(),
            CopyMode::None => Vec::new(),
        };
        Ok(PrimaryEngine {
            cfg,
            layout,
            window,
            bounce,
            drive,
            slots,
        })
    }

    /// The range in blocks.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// Blocks in flight at most (the configured window, capped at the block count).
    pub fn window(&self) -> u32 {
        self.window
    }
    /// Which buffers and why.
    pub fn buffers(&self) -> &BufferInfo {
        &self.slots.info
    }
    /// How the source is accessed.
    pub fn backend(&self) -> Backend {
        self.drive.backend
    }
    /// The configuration.
    pub fn config(&self) -> &PrimaryConfig {
        &self.cfg
    }

    /// Connects to every replica and replicates; see [`PrimaryEngine::run_with`].
    ///
    /// # Errors
    /// As [`PrimaryEngine::run_with`].
    pub fn run(self) -> Result<PrimaryReport, EngineError> {
        self.run_with(&mut |_| {})
    }

    /// Connects to every replica (retrying rejections until the timeout), replicates, and
    /// reports. A replica that fails mid-run does not make this an error: the report then
    /// says `success: false` and names the unreplicated ranges. `observe` gets
    /// [`Event::Connected`] and about one [`Event::Progress`] per second.
    ///
    /// # Errors
    /// [`EngineError::Connect`] / [`EngineError::Rdma`] while connecting;
    /// [`EngineError::Ring`] when the drive's ring itself fails; [`EngineError::Internal`].
    pub fn run_with(
        mut self,
        observe: &mut dyn FnMut(Event),
    ) -> Result<PrimaryReport, EngineError> {
        let cfg = &self.cfg;
        let _run =
            tracing::info_span!("run", role = "primary", replicas = cfg.replicas.len()).entered();
        let mut links = Vec::with_capacity(cfg.replicas.len());
        for (r, dst) in cfg.replicas.iter().enumerate() {
            links.push(Link::connect(
                r,
                cfg.bind,
                *dst,
                cfg.timeout,
                cfg.wait,
                &self.slots,
                cfg.secret.as_ref(),
            )?);
        }
        observe(Event::Connected);
        let mut waiter = Waiter::new(cfg.wait, cfg.busy_poll, links.len());
        let result = self.run_loop(&mut links, &mut waiter, observe);
        // Reads (and polls) still in flight finish before the buffers and links go away.
        waiter.drain(&mut self.drive.ring);
        // Dropping a connection disconnects it (the replicas see the DISCONNECTED event).
        drop(links);
        result
    }

    fn run_loop(
        &mut self,
        links: &mut [Link],
        waiter: &mut Waiter,
        observe: &mut dyn FnMut(Event),
    ) -> Result<PrimaryReport, EngineError> {
        let n = links.len();
        let layout = self.layout;
        let cfg = &self.cfg;
        let core = PrimaryCore::new(layout, n, self.window, cfg.verify)
            .map_err(|_| EngineError::Internal("the layout cannot be expressed on the wire"))?;
        let t0 = Instant::now();
        let cpu0 = cpu_time();
        let free = (0..self.slots.len()).rev().collect();
        let mut role = PrimaryRole {
            cfg,
            layout,
            slots: &mut self.slots,
            bounce: &mut self.bounce,
            meter: CopyMeter::new(),
            core,
            free,
            slot_of: HashMap::new(),
            actions: VecDeque::new(),
            out: Vec::new(),
            quiet_since: vec![Instant::now(); n],
            pacer: Pacer::new(cfg.rate, t0),
            paced: VecDeque::new(),
            written: vec![None; n],
            t0,
            last_report: Instant::now(),
            observe,
        };
        role.core.start(&mut role.out);
        role.actions.extend(role.out.drain(..));
        turn::run(&mut role, links, &mut self.drive, waiter)?;
        let elapsed = t0.elapsed();
        let cpu = cpu_time().saturating_sub(cpu0);
        Ok(PrimaryReport {
            outcome: role.core.outcome(),
            latency: role.core.latency().percentiles(),
            elapsed,
            cpu,
            payload_bytes_copied: role.meter.bytes(),
            messages: MessageCounts::of(links),
            window: self.window,
            layout,
            buffers: role.slots.info.clone(),
            copy: cfg.copy,
            wait: cfg.wait,
        })
    }
}

/// The primary's handlers for the engine loop ([`turn::run`]) and the state they share.
struct PrimaryRole<'a> {
    cfg: &'a PrimaryConfig,
    layout: Layout,
    slots: &'a mut Slots,
    /// Bounce mode: one host buffer per slot, `None` while a read owns it.
    bounce: &'a mut Vec<Option<AlignedBuf>>,
    meter: CopyMeter,
    core: PrimaryCore,
    /// Slots no block holds.
    free: Vec<usize>,
    /// The slot of each block between its read and its release.
    slot_of: HashMap<u64, usize>,
    /// The core's actions, carried out at the next turn.
    actions: VecDeque<PrimaryAction>,
    out: Vec<PrimaryAction>,
    /// Per replica: since when it has owed us an answer (an ack, a buffer) without a word.
    /// A replica that owes nothing is never stalled: with the shared window, a healthy
    /// replica waiting behind a stalled one is quiet too, and must not be failed with it.
    quiet_since: Vec<Instant>,
    pacer: Pacer,
    /// Reads the pacer holds back, in order; they go once it says they are due.
    paced: VecDeque<PrimaryAction>,
    /// Per replica: the block whose WRITE was queued last and the window key it used, for
    /// the `BlockSent` the core asks for right after it.
    written: Vec<Option<(u64, u32)>>,
    t0: Instant,
    last_report: Instant,
    observe: &'a mut dyn FnMut(Event),
}

impl PrimaryRole<'_> {
    /// Queues what the core answered.
    fn take_out(&mut self) {
        self.actions.extend(self.out.drain(..));
    }

    /// Carries out one action of the core.
    fn carry_out(
        &mut self,
        a: PrimaryAction,
        links: &mut [Link],
        drive: &mut Drive,
    ) -> Result<(), EngineError> {
        let core = &mut self.core;
        let out = &mut self.out;
        match a {
            PrimaryAction::Send { replica, msg } => {
                // A block's BlockSent follows its WRITE: it invalidates the window the WRITE
                // went through (SEND_WITH_INV), which a replica requires before it writes the
                // block to its drive (it never invalidates a window itself).
                let inv = match (&msg, self.written[replica].take()) {
                    (Message::BlockSent { seq, .. }, Some((s, rkey))) if *seq == s => Some(rkey),
                    _ => None,
                };
                if links[replica].alive {
                    match inv {
                        Some(rkey) => links[replica].queue_msg_invalidating(&msg, rkey),
                        None => links[replica].queue_msg(&msg),
                    }
                }
            }
            PrimaryAction::Read { seq, offset, len } => {
                let _block = tracing::debug_span!("block", seq).entered();
                tracing::debug!(offset, len, "read from the source");
                let s = self
                    .free
                    .pop()
                    .ok_or(EngineError::Internal("no free slot within the window"))?;
                self.slot_of.insert(seq, s);
                let buf = if self.cfg.copy == CopyMode::Bounce {
                    let h = self.bounce[s]
                        .take()
                        .ok_or(EngineError::Internal("a bounce buffer lent twice"))?;
                    DriveBuf::host(s, h, len as usize)
                } else {
                    self.slots.take(s, len as usize)?
                };
                if let Err(rej) = drive.ring.read(drive.t, offset, buf, seq) {
                    let why = Failure::op("submitting the read", rej.error);
                    if let Some(b) = rej.bufs.into_single() {
                        if let Some(h) = self.slots.give_back(b) {
                            self.bounce[s] = Some(h);
                        }
                    }
                    core.on_read_done(seq, Err(why), out);
                }
            }
            PrimaryAction::Write {
                replica,
                seq,
                remote,
            } => {
                let _block = tracing::debug_span!("block", seq).entered();
                tracing::debug!(replica, len = remote.len, "RDMA WRITE to the replica");
                let s = *self
                    .slot_of
                    .get(&seq)
                    .ok_or(EngineError::Internal("write of a block without a slot"))?;
                let (chunk, at) = self.slots.chunk_of(s);
                let link = &links[replica];
                let mr = link
                    .mrs
                    .get(&chunk)
                    .ok_or(EngineError::Internal("slot chunk not registered"))?;
                // Queued: posted with the BlockSent the core asks for next, in one chain (RC
                // keeps them in order on the QP).
                match mr.sge(at, remote.len as usize) {
                    Ok(sge) => {
                        self.written[replica] = Some((seq, remote.rkey));
                        link.queue(SendRequest::new(
                            WR_WRITE | seq,
                            SendOp::Write(rdma::RemoteBuf {
                                addr: remote.addr,
                                len: remote.len,
                                rkey: remote.rkey,
                            }),
                            vec![sge],
                        ))
                    }
                    Err(e) => {
                        let why = Failure::op("describing the write's source", e);
                        core.on_write_done(replica, seq, Err(why), out)
                    }
                }
            }
            PrimaryAction::Release { seq } => {
                if let Some(s) = self.slot_of.remove(&seq) {
                    self.free.push(s);
                }
            }
            PrimaryAction::Disconnect { replica } => {
                let link = &mut links[replica];
                if link.alive {
                    // What was queued before (a Fin) leaves first.
                    let _ = link.flush();
                    link.alive = false;
                    let _ = link.conn.disconnect(Duration::from_millis(500));
                }
            }
        }
        Ok(())
    }
}

impl Role for PrimaryRole<'_> {
    fn finished(&self) -> bool {
        self.core.is_finished()
    }

    fn act(&mut self, links: &mut [Link], drive: &mut Drive) -> Result<bool, EngineError> {
        let mut busy = false;
        if !self.paced.is_empty() && self.pacer.due(Instant::now()) {
            self.actions.extend(self.paced.drain(..));
        }
        while let Some(a) = self.actions.pop_front() {
            if let PrimaryAction::Read { len, .. } = a {
                if !self.paced.is_empty() || !self.pacer.admit(u64::from(len), Instant::now()) {
                    self.paced.push_back(a);
                    continue;
                }
            }
            busy = true;
            self.carry_out(a, links, drive)?;
            self.take_out();
        }
        Ok(busy)
    }

    fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    fn post_failed(&mut self, r: usize, e: rdma::Error) -> Result<(), EngineError> {
        let why = Failure::op("posting work requests", e);
        self.core.on_replica_lost(r, why, &mut self.out);
        self.take_out();
        Ok(())
    }

    fn on_completion(
        &mut self,
        r: usize,
        wc: &WorkCompletion,
        links: &mut [Link],
        _drive: &mut Drive,
    ) -> Result<Next, EngineError> {
        self.quiet_since[r] = Instant::now();
        let core = &mut self.core;
        let out = &mut self.out;
        if wc.status != WcStatus::Success {
            let why = Failure::Completion {
                opcode: wc.opcode,
                status: wc.status,
            };
            if wc.wr_id & WR_MASK == WR_WRITE {
                core.on_write_done(r, wc.wr_id & !WR_MASK, Err(why), out);
            } else {
                core.on_replica_lost(r, why, out);
            }
        } else {
            match wc.wr_id & WR_MASK {
                WR_WRITE => core.on_write_done(r, wc.wr_id & !WR_MASK, Ok(()), out),
                WR_RECV if wc.opcode == WcOpcode::Recv => {
                    match links[r].take_recv(wc.wr_id, wc.byte_len) {
                        Ok(b) => {
                            // A violation ends the replica in the core; what followed it
                            // in the same SEND is not looked at.
                            for m in link::messages(&b) {
                                if !core.is_alive(r) {
                                    break;
                                }
                                core.on_message(r, m, out);
                            }
                        }
                        Err(e) => {
                            core.on_replica_lost(r, Failure::op("receiving a message", e), out)
                        }
                    }
                }
                _ => {}
            }
        }
        self.take_out();
        Ok(Next::Go)
    }

    fn on_drive(&mut self, c: Completion<DriveBuf>, _drive: &mut Drive) -> Result<(), EngineError> {
        // Source reads.
        let seq = c.tag;
        let want = self.layout.block(seq).map_or(0, |b| b.len as usize);
        // The read's buffer comes back with its completion, on every path.
        let Some(buf) = c.bufs.into_single() else {
            return Err(EngineError::Internal("a read completed without its buffer"));
        };
        let s = buf.slot();
        if self.cfg.copy == CopyMode::Bounce {
            // The block's bytes go into the registered slot (no WRITE reads it yet).
            if matches!(c.result, Ok(got) if got == want) {
                self.meter.copy(self.slots.bytes_mut(s, want)?, buf.bytes());
            }
        }
        if let Some(h) = self.slots.give_back(buf) {
            self.bounce[s] = Some(h);
        }
        let res = match c.result {
            Ok(got) if got == want => Ok(if self.cfg.verify {
                crc32c(self.slots.bytes(s, got)?)
            } else {
                0
            }),
            Ok(got) => Err(Failure::Short {
                op: "read",
                got,
                want,
            }),
            Err(e) => Err(Failure::Lower(Box::new(e))),
        };
        self.core.on_read_done(seq, res, &mut self.out);
        self.take_out();
        Ok(())
    }

    fn after_events(
        &mut self,
        links: &mut [Link],
        _drive: &mut Drive,
        busy: &mut bool,
    ) -> Result<Next, EngineError> {
        for (r, link) in links.iter().enumerate() {
            if link.alive {
                if let Err(e) = link.conn.check() {
                    self.core
                        .on_replica_lost(r, Failure::op("connection", e), &mut self.out);
                }
            }
        }
        // A replica that owes an answer (the core says which: acks, read-backs, a buffer it
        // has room for) for longer than the timeout is failed alone; the others go on.
        let now = Instant::now();
        for (r, (link, quiet)) in links.iter().zip(self.quiet_since.iter_mut()).enumerate() {
            if !link.alive || !self.core.is_alive(r) {
                continue;
            }
            if !self.core.awaits(r) {
                *quiet = now;
            } else if now.duration_since(*quiet) > self.cfg.timeout {
                *busy = true;
                let why = Failure::Stalled {
                    timeout: self.cfg.timeout,
                };
                self.core.on_replica_lost(r, why, &mut self.out);
            }
        }
        self.take_out();
        Ok(Next::Go)
    }

    fn idle(&mut self, since_progress: Duration) -> Result<Idle, EngineError> {
        let cfg = self.cfg;
        // Nothing moved and no replica owes an answer (those are failed above, one by one):
        // the source is stuck, and the run cannot finish. Reads held by the pacer are this
        // side's choice, not a stall.
        if since_progress > cfg.timeout && self.paced.is_empty() {
            for r in 0..self.quiet_since.len() {
                let why = Failure::SourceStalled {
                    timeout: cfg.timeout,
                };
                self.core.on_replica_lost(r, why, &mut self.out);
            }
            self.take_out();
            if self.actions.is_empty() && !self.core.is_finished() {
                return Ok(Idle::Stop);
            }
            return Ok(Idle::Again);
        }
        let mut bound = wait_bound(
            since_progress,
            cfg.timeout,
            cfg.progress_every.min(Duration::from_secs(1)),
        );
        if !self.paced.is_empty() {
            bound = self
                .pacer
                .bound(Instant::now(), bound)
                .max(Duration::from_micros(50));
        }
        Ok(Idle::Wait(bound))
    }

    fn end_of_turn(&mut self) {
        if self.last_report.elapsed() >= self.cfg.progress_every {
            self.last_report = Instant::now();
            let ledger = self.core.ledger();
            let (blocks, bytes) = ledger.replicated_blocks_bytes();
            let per_replica = (0..ledger.replicas())
                .map(|r| ledger.acked_blocks(r))
                .collect();
            (self.observe)(Event::Progress {
                blocks,
                bytes,
                elapsed: self.t0.elapsed(),
                per_replica,
            });
        }
    }
}
