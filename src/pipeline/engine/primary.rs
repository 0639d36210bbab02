//! The primary's engine: reads blocks from the source into pool buffers, RDMA-writes each
//! buffer to every replica, and collects the acks (the I/O side of [`PrimaryCore`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::pipeline::{
    crc32c, CopyMeter, Failure, Layout, Outcome, Percentiles, PrimaryAction, PrimaryCore,
};
use crate::protocol::MSG_LEN;
use crate::rdma::{self, SendOp, SendRequest, WcOpcode, WcStatus};

use super::drive::{Backend, Drive};
use super::link::{Link, WR_MASK, WR_RECV, WR_WRITE};
use super::pace::Pacer;
use super::slots::{BufferInfo, DriveBuf, Slots};
use super::wait::Waiter;
use super::{cpu_time, wait_bound, CopyMode, EngineError, Event, PrimaryConfig, WaitMode};
use crate::uring::AlignedBuf;

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
    /// CPU time (user + system) of the process during the run.
    pub cpu: Duration,
    /// Payload bytes the CPU copied (0 in zero-copy mode).
    pub payload_bytes_copied: u64,
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
        let mut waiter = Waiter::new(cfg.wait, links.len());
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
        let drive = &mut self.drive;
        let slots = &mut self.slots;
        let bounce = &mut self.bounce;
        let bouncing = cfg.copy == CopyMode::Bounce;
        let meter = CopyMeter::new();
        let mut core = PrimaryCore::new(layout, n, self.window, cfg.verify)
            .map_err(|_| EngineError::Internal("the layout cannot be expressed on the wire"))?;
        let mut free: Vec<usize> = (0..slots.len()).rev().collect();
        let mut slot_of: HashMap<u64, usize> = HashMap::new();
        let mut actions: VecDeque<PrimaryAction> = VecDeque::new();
        let mut out = Vec::new();
        let t0 = Instant::now();
        let cpu0 = cpu_time();
        core.start(&mut out);
        actions.extend(out.drain(..));
        let mut done = Vec::new();
        let mut wcs = vec![rdma::EMPTY_COMPLETION; 64];
        let mut last_progress = Instant::now();
        let mut last_report = Instant::now();
        // Per replica: since when it has owed us an answer (an ack, a buffer) without a word.
        // A replica that owes nothing is never stalled: with the shared window, a healthy
        // replica waiting behind a stalled one is quiet too, and must not be failed with it.
        let mut quiet_since = vec![Instant::now(); n];
        let mut pacer = Pacer::new(cfg.rate, t0);
        // Reads the pacer holds back, in order; they go once it says they are due.
        let mut paced: VecDeque<PrimaryAction> = VecDeque::new();

        while !core.is_finished() {
            let mut busy = false;
            if !paced.is_empty() && pacer.due(Instant::now()) {
                actions.extend(paced.drain(..));
            }
            while let Some(a) = actions.pop_front() {
                if let PrimaryAction::Read { len, .. } = a {
                    if !paced.is_empty() || !pacer.admit(u64::from(len), Instant::now()) {
                        paced.push_back(a);
                        continue;
                    }
                }
                busy = true;
                match a {
                    PrimaryAction::Send { replica, msg } => {
                        if links[replica].alive {
                            links[replica].queue_msg(&msg);
                        }
                    }
                    PrimaryAction::Read { seq, offset, len } => {
                        let s = free
                            .pop()
                            .ok_or(EngineError::Internal("no free slot within the window"))?;
                        slot_of.insert(seq, s);
                        let buf = if bouncing {
                            let h = bounce[s]
                                .take()
                                .ok_or(EngineError::Internal("a bounce buffer lent twice"))?;
                            DriveBuf::host(s, h, len as usize)
                        } else {
                            slots.take(s, len as usize)?
                        };
                        if let Err(rej) = drive.ring.read(drive.t, offset, buf, seq) {
                            let why = Failure::op("submitting the read", rej.error);
                            if let Some(b) = rej.bufs.into_single() {
                                if let Some(h) = slots.give_back(b) {
                                    bounce[s] = Some(h);
                                }
                            }
                            core.on_read_done(seq, Err(why), &mut out);
                        }
                    }
                    PrimaryAction::Write {
                        replica,
                        seq,
                        remote,
                    } => {
                        let s = *slot_of
                            .get(&seq)
                            .ok_or(EngineError::Internal("write of a block without a slot"))?;
                        let (chunk, at) = slots.chunk_of(s);
                        let link = &links[replica];
                        let mr = link
                            .mrs
                            .get(&chunk)
                            .ok_or(EngineError::Internal("slot chunk not registered"))?;
                        // Queued: posted with the BlockSent the core asks for next, in one
                        // chain (RC keeps them in order on the QP).
                        match mr.sge(at, remote.len as usize) {
                            Ok(sge) => link.queue(SendRequest::new(
                                WR_WRITE | seq,
                                SendOp::Write(rdma::RemoteBuf {
                                    addr: remote.addr,
                                    len: remote.len,
                                    rkey: remote.rkey,
                                }),
                                vec![sge],
                            )),
                            Err(e) => {
                                let why = Failure::op("describing the write's source", e);
                                core.on_write_done(replica, seq, Err(why), &mut out)
                            }
                        }
                    }
                    PrimaryAction::Release { seq } => {
                        if let Some(s) = slot_of.remove(&seq) {
                            free.push(s);
                        }
                    }
                    PrimaryAction::Disconnect { replica } => {
                        if links[replica].alive {
                            // What was queued before (a Fin) leaves first.
                            let _ = links[replica].flush();
                            links[replica].alive = false;
                            let _ = links[replica].conn.disconnect(Duration::from_millis(500));
                        }
                    }
                }
                actions.extend(out.drain(..));
            }
            // One doorbell per replica for everything this round queued.
            for (r, link) in links.iter().enumerate() {
                if link.alive {
                    if let Err(e) = link.flush() {
                        busy = true;
                        let why = Failure::op("posting work requests", e);
                        core.on_replica_lost(r, why, &mut out);
                    }
                }
            }
            actions.extend(out.drain(..));
            // Source reads (some may have arrived while waiting).
            drive
                .ring
                .reap(&mut done)
                .map_err(|e| EngineError::ring("reap", e))?;
            waiter.filter(links, &mut done)?;
            for c in done.drain(..) {
                busy = true;
                let seq = c.tag;
                let want = layout.block(seq).map_or(0, |b| b.len as usize);
                // The read's buffer comes back with its completion, on every path.
                let Some(buf) = c.bufs.into_single() else {
                    return Err(EngineError::Internal("a read completed without its buffer"));
                };
                let s = buf.slot();
                if bouncing {
                    // The block's bytes go into the registered slot (no WRITE reads it yet).
                    if matches!(c.result, Ok(got) if got == want) {
                        meter.copy(slots.bytes_mut(s, want)?, buf.bytes());
                    }
                }
                if let Some(h) = slots.give_back(buf) {
                    bounce[s] = Some(h);
                }
                let res = match c.result {
                    Ok(got) if got == want => Ok(if cfg.verify {
                        crc32c(slots.bytes(s, got)?)
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
                core.on_read_done(seq, res, &mut out);
            }
            actions.extend(out.drain(..));
            // RDMA completions and connection events.
            for (r, (link, quiet)) in links.iter_mut().zip(quiet_since.iter_mut()).enumerate() {
                if !link.alive {
                    continue;
                }
                loop {
                    let got = link
                        .cq
                        .poll(&mut wcs)
                        .map_err(|e| EngineError::rdma("polling a completion queue", e))?;
                    for wc in &wcs[..got] {
                        busy = true;
                        *quiet = Instant::now();
                        if wc.status != WcStatus::Success {
                            let why = Failure::Completion {
                                opcode: wc.opcode,
                                status: wc.status,
                            };
                            if wc.wr_id & WR_MASK == WR_WRITE {
                                core.on_write_done(r, wc.wr_id & !WR_MASK, Err(why), &mut out);
                            } else {
                                core.on_replica_lost(r, why, &mut out);
                            }
                            continue;
                        }
                        match wc.wr_id & WR_MASK {
                            WR_WRITE => {
                                core.on_write_done(r, wc.wr_id & !WR_MASK, Ok(()), &mut out)
                            }
                            WR_RECV if wc.opcode == WcOpcode::Recv => {
                                match link.take_recv(wc.wr_id) {
                                    Ok(b) => {
                                        let m = &b[..wc.byte_len.min(MSG_LEN as u32) as usize];
                                        core.on_message(r, m, &mut out)
                                    }
                                    Err(e) => core.on_replica_lost(
                                        r,
                                        Failure::op("receiving a message", e),
                                        &mut out,
                                    ),
                                }
                            }
                            _ => {}
                        }
                    }
                    // Poll dry: in events mode no new event comes for what is already queued.
                    if got < wcs.len().min(32) {
                        break;
                    }
                }
                if link.alive {
                    if let Err(e) = link.conn.check() {
                        core.on_replica_lost(r, Failure::op("connection", e), &mut out);
                    }
                }
            }
            // A replica that owes an answer (the core says which: acks, read-backs, a buffer it
            // has room for) for longer than the timeout is failed alone; the others go on.
            let now = Instant::now();
            for (r, (link, quiet)) in links.iter().zip(quiet_since.iter_mut()).enumerate() {
                if !link.alive || !core.is_alive(r) {
                    continue;
                }
                if !core.awaits(r) {
                    *quiet = now;
                } else if now.duration_since(*quiet) > cfg.timeout {
                    busy = true;
                    let why = Failure::Stalled {
                        timeout: cfg.timeout,
                    };
                    core.on_replica_lost(r, why, &mut out);
                }
            }
            actions.extend(out.drain(..));
            if busy {
                last_progress = Instant::now();
                waiter.busy();
            } else if actions.is_empty() && !core.is_finished() {
                // Nothing moved and no replica owes an answer (those are failed above, one by
                // one): the source is stuck, and the run cannot finish. Reads held by the pacer
                // are this side's choice, not a stall.
                if last_progress.elapsed() > cfg.timeout && paced.is_empty() {
                    for r in 0..n {
                        let why = Failure::SourceStalled {
                            timeout: cfg.timeout,
                        };
                        core.on_replica_lost(r, why, &mut out);
                    }
                    actions.extend(out.drain(..));
                    if actions.is_empty() && !core.is_finished() {
                        break;
                    }
                    continue;
                }
                let mut bound = wait_bound(
                    last_progress.elapsed(),
                    cfg.timeout,
                    cfg.progress_every.min(Duration::from_secs(1)),
                );
                if !paced.is_empty() {
                    bound = pacer
                        .bound(Instant::now(), bound)
                        .max(Duration::from_micros(50));
                }
                waiter.idle(links, &mut drive.ring, bound, &mut done)?;
            }
            if last_report.elapsed() >= cfg.progress_every {
                last_report = Instant::now();
                let (blocks, bytes) = core.ledger().replicated_blocks_bytes();
                observe(Event::Progress {
                    blocks,
                    bytes,
                    elapsed: t0.elapsed(),
                });
            }
        }
        let elapsed = t0.elapsed();
        let cpu = cpu_time().saturating_sub(cpu0);
        Ok(PrimaryReport {
            outcome: core.outcome(),
            latency: core.latency().percentiles(),
            elapsed,
            cpu,
            payload_bytes_copied: meter.bytes(),
            window: self.window,
            layout,
            buffers: slots.info.clone(),
            copy: cfg.copy,
            wait: cfg.wait,
        })
    }
}
