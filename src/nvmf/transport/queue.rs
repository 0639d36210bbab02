//! One accepted queue (admin or I/O) on its own thread: receives command capsules, carries
//! out the core's actions with RDMA READ/WRITE and backend I/O, SENDs completions.
//!
//! Receive slot `i` is two scatter entries: the 64-byte SQE lands in a host-memory array,
//! in-capsule data in a pool buffer (4 KiB aligned, so a Linux host's in-capsule write goes to
//! the backend straight from where the NIC put it). A command that uses its in-capsule data
//! keeps the slot until the data is written; every other command gives the slot back (posts
//! the receive again) as soon as its SQE is parsed. A slot always goes back before the
//! command's response is sent, so the host, which sends its next command only after a
//! response, always finds a posted receive.
//!
//! Waiting: receives and sends complete on two CQs sharing one completion channel, whose fd and
//! the connection's rdma_cm event fd are polled in the queue's io_uring next to the backend
//! I/O. A CQ is re-armed and polled once more before each sleep (the replicator engine's race
//! rule), and sleeps are bounded (100 ms) so a kill from the listener is seen promptly.
//!
//! The receive CQ is always armed before a sleep: a new command must wake the queue. The send
//! CQ is armed only when the queue waits for it: an RDMA READ in flight (host write data), or
//! a command parked for pool memory or a READ credit. Otherwise SEND completions (which only
//! free the command's buffer) are reaped at the next wake-up, so a read command costs two
//! wake-ups (its capsule, its backend completion), not three. Per wake-up the queue makes one
//! `io_uring_enter` that submits what is queued and sleeps, and reads the channel or rdma_cm
//! fd only when its poll fired.
//!
//! Busy polling (`TargetConfig::busy_poll`, 1 ms by default, 0 turns it off): before it arms
//! and sleeps, a queue with at most one command in the works polls its CQs (and its ring, while
//! drive I/O is in flight) for up to the budget, with a PAUSE between empty polls, so at queue
//! depth 1 the next capsule or the drive completion is taken without a wake-up. The policy
//! backs off after polls that find nothing (`spin.rs`), so a rarely used queue sleeps at once.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nvmf::backend::{PoolBuf, QueueIo};
use crate::nvmf::transport::{DeviceRes, QueueCtl, Shared};
use crate::nvmf::{cm_accept_data, CmReject, CmRequest, QueueCore, SQE_LEN};
use crate::p2p_alloc::Buffer;
use crate::rdma::{
    self, Access, Completion, CompletionChannel, CompletionQueue, ConnParams, ConnectRequest,
    Connection, MemoryRegion, QpCaps, QpInit, RecvRequest, SendRequest, WcOpcode, WcStatus,
    EMPTY_COMPLETION,
};
use crate::uring::{self, PollId};

mod exec;
mod spin;

use exec::Cmd;
use spin::SpinPolicy;

const WR_RECV: u64 = 1 << 60;
const WR_SEND: u64 = 2 << 60;
const WR_READ: u64 = 3 << 60;
const WR_WRITE: u64 = 4 << 60;
const WR_KIND: u64 = 0xf << 60;
/// Ring tags of the queue's polls (backend I/O is tagged with the command index).
const POLL_CQ: u64 = 1 << 63;
const POLL_CM: u64 = (1 << 63) | 1;
/// Turns of the loop that may take RDMA completions before the ring is reaped.
const BUSY_TURNS: u32 = 4;
/// The longest sleep of an idle queue (bounds how late a kill is noticed).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Why a queue ends.
#[derive(Debug, thiserror::Error)]
enum QueueError {
    #[error("{op}: {source}")]
    Rdma {
        op: &'static str,
        source: rdma::Error,
    },
    #[error("{op}: {source}")]
    Ring {
        op: &'static str,
        source: uring::Error,
    },
    #[error("host protocol error: {0}")]
    Protocol(String),
    #[error("no resources: {0}")]
    Resources(String),
    #[error("the connection closed: work requests flushed")]
    Flushed,
}

fn rdma_err(op: &'static str) -> impl FnOnce(rdma::Error) -> QueueError {
    move |source| QueueError::Rdma { op, source }
}

/// How a queue's run ended (besides errors).
#[derive(Debug)]
enum End {
    Disconnected,
    Killed,
}

struct Queue<'a> {
    // Field order is drop order: the QP goes first (the NIC stops using the buffers), then
    // the CQs, the ring (waits for backend I/O), and the buffers.
    conn: Connection,
    /// Receive completions (command capsules).
    rcq: CompletionQueue,
    /// Send-queue completions: RDMA READs, response SENDs (RDMA WRITEs are unsignaled).
    scq: CompletionQueue,
    io: QueueIo,
    /// The channel both CQs report to (after the ring, which may hold a poll on its fd).
    channel: CompletionChannel,
    sqes: MemoryRegion,
    recv_data: Vec<Option<Buffer>>,
    cmds: Vec<Option<Cmd>>,
    free: Vec<usize>,
    /// Send-queue work requests queued by this turn of the loop ([`Queue::flush_sends`]).
    sends: Vec<SendRequest>,
    /// Turns of the loop in a row that found RDMA completions without reaping the ring.
    busy_turns: u32,
    parked: VecDeque<usize>,
    reads_out: u32,
    max_reads: u32,
    core: QueueCore,
    dev: Arc<DeviceRes>,
    shared: &'a Shared,
    ctl: &'a QueueCtl,
    qid: u16,
    cq_poll: Option<PollId>,
    cm_poll: Option<PollId>,
    /// The receive / send CQ is armed (its event not yet taken).
    rarmed: bool,
    sarmed: bool,
    /// The rdma_cm fd polled readable: read its events.
    cm_ready: bool,
    /// Whether and how long an idle queue polls before it sleeps.
    spin: SpinPolicy,
}

/// The queue thread's body: accept, serve, tear down. Errors are logged (they end only this
/// queue).
pub(crate) fn run(req: ConnectRequest, cm: CmRequest, shared: &Arc<Shared>, ctl: &QueueCtl) {
    let peer = req.peer_addr();
    let mut q = match Queue::accept(req, cm, shared, ctl) {
        Ok(q) => q,
        Err(e) => {
            tracing::warn!(?peer, qid = cm.qid, error = %e, "queue not established");
            return;
        }
    };
    shared.stats.queues_accepted.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        ?peer,
        qid = cm.qid,
        sq = cm.sq_entries(),
        reads = q.max_reads,
        "queue up"
    );
    match q.serve() {
        Ok(end) => tracing::info!(?peer, qid = cm.qid, ?end, "queue closed"),
        Err(e) => tracing::warn!(?peer, qid = cm.qid, error = %e, "queue torn down"),
    }
    q.teardown();
}

/// What a queue needs before it accepts.
struct Prepared {
    dev: Arc<DeviceRes>,
    rcq: CompletionQueue,
    scq: CompletionQueue,
    channel: CompletionChannel,
    io: QueueIo,
    sqes: MemoryRegion,
    recv_data: Vec<Option<Buffer>>,
    recvs: Vec<RecvRequest>,
    init: QpInit,
    params: ConnParams,
    max_reads: u32,
}

impl Prepared {
    /// Receive slots for `hsqsize + 1` commands (64 + inline bytes each; inline 0 on the
    /// admin queue), a receive CQ and a send CQ on one completion channel, the send queue for
    /// a READ or a WRITE plus SEND per command, the backend ring, and the initiator depth:
    /// min(the host's responder resources, the device's max_qp_init_rd_atom).
    ///
    /// The send CQ is polled until empty at every turn of the loop, and one turn posts at
    /// most two signaled work requests (READ, SEND) per command it handles: 32 capsules, 32
    /// send completions and up to `2n` backend completions, plus `n` resumed commands. It is
    /// sized for that, so it cannot overrun even while unarmed.
    fn new(req: &ConnectRequest, cm: &CmRequest, shared: &Shared) -> Result<Prepared, QueueError> {
        let ctx = req.context().clone();
        let attr = ctx.attributes().map_err(rdma_err("ibv_query_device"))?;
        let dev = shared.device(&ctx).map_err(rdma_err("ibv_alloc_pd"))?;
        let n = cm.sq_entries() as usize;
        let inline = if cm.qid == 0 {
            0
        } else {
            shared.core.inline_data_size() as usize
        };
        let max_send = (3 * n as u32 + 16).min(attr.max_qp_wr);
        let channel = CompletionChannel::new(&ctx).map_err(rdma_err("ibv_create_comp_channel"))?;
        let rcq = CompletionQueue::with_channel(&ctx, n as u32 + 16, &channel)
            .map_err(rdma_err("ibv_create_cq"))?;
        let scq_len = (2 * (32 + 32 + 3 * n as u32) + 32).max(max_send + 16);
        let scq = CompletionQueue::with_channel(&ctx, scq_len, &channel)
            .map_err(rdma_err("ibv_create_cq"))?;
        let sqes = MemoryRegion::alloc(&dev.pd, n * SQE_LEN, Access::local_read().local_write())
            .map_err(rdma_err("receive buffers"))?;
        let mut recv_data = Vec::with_capacity(n);
        for _ in 0..n {
            recv_data.push(if inline > 0 {
                Some(shared.pool.alloc(inline).map_err(|e| {
                    QueueError::Resources(format!("pool memory for receive buffers: {e}"))
                })?)
            } else {
                None
            });
        }
        let mut init = QpInit::new(&dev.pd, &rcq);
        init.send_cq = scq.clone();
        let init = init.caps(QpCaps {
            max_send_wr: max_send,
            max_recv_wr: n as u32,
            max_send_sge: 1,
            max_recv_sge: 2,
            max_inline_data: crate::nvmf::CQE_LEN as u32,
        });
        let wanted = attr.max_qp_init_rd_atom.min(255) as u8;
        let max_reads = u32::from(wanted.min(req.peer_responder_resources())).max(1);
        let params = ConnParams {
            private_data: cm_accept_data(n as u16).to_vec(),
            responder_resources: 0,
            initiator_depth: wanted,
            retry_count: 7,
            rnr_retry_count: 7,
            ..ConnParams::default()
        };
        let recvs = (0..n)
            .map(|i| recv_request(&dev, shared, &sqes, &recv_data, i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(rdma_err("receive buffers"))?;
        let mut io = QueueIo::new(&shared.backends, 2 * n)
            .map_err(|e| QueueError::Resources(format!("backend ring: {e}")))?;
        io.use_fixed_buffers(&shared.pool);
        Ok(Prepared {
            dev,
            rcq,
            scq,
            channel,
            io,
            sqes,
            recv_data,
            recvs,
            init,
            params,
            max_reads,
        })
    }
}

impl<'a> Queue<'a> {
    /// Creates the queue's resources and accepts; a request whose resources cannot be had
    /// is rejected with "no resources".
    fn accept(
        req: ConnectRequest,
        cm: CmRequest,
        shared: &'a Shared,
        ctl: &'a QueueCtl,
    ) -> Result<Queue<'a>, QueueError> {
        let p = match Prepared::new(&req, &cm, shared) {
            Ok(p) => p,
            Err(e) => {
                if let Err(re) = req.reject(&CmReject::NoResources.encode()) {
                    tracing::debug!(error = %re, "rdma_reject");
                }
                return Err(e);
            }
        };
        let recvs = &p.recvs;
        let conn = req
            .accept_with(&p.init, &p.params, |qp| qp.post_recv(recvs))
            .map_err(rdma_err("rdma_accept"))?;
        Ok(Queue {
            conn,
            rcq: p.rcq,
            scq: p.scq,
            channel: p.channel,
            io: p.io,
            sqes: p.sqes,
            recv_data: p.recv_data,
            cmds: Vec::new(),
            free: Vec::new(),
            sends: Vec::new(),
            busy_turns: 0,
            parked: VecDeque::new(),
            reads_out: 0,
            max_reads: p.max_reads,
            core: QueueCore::new(&shared.core, &cm),
            dev: p.dev,
            shared,
            ctl,
            qid: cm.qid,
            cq_poll: None,
            cm_poll: None,
            rarmed: false,
            sarmed: false,
            cm_ready: false,
            spin: SpinPolicy::new(shared.busy_poll),
        })
    }

    fn serve(&mut self) -> Result<End, QueueError> {
        let mut wcs = [EMPTY_COMPLETION; 32];
        let mut done = Vec::new();
        loop {
            if self.ctl.kill.load(Ordering::Acquire) {
                return Ok(End::Killed);
            }
            let n = self.poll_cqs(&mut wcs)?;
            self.flush_sends()?;
            // Connect (on_command or on_data) names the controller: publish it for the
            // listener's keep-alive teardown.
            if let Some(c) = self.core.cntlid() {
                self.ctl.cntlid.store(u32::from(c), Ordering::Release);
            }
            if n > 0 {
                // Keep taking RDMA completions; the backend I/O they queued is submitted by
                // the wait below, or by a reap after a few busy turns (so a steady stream of
                // completions never starves the ring).
                self.busy_turns += 1;
                if self.busy_turns < BUSY_TURNS {
                    continue;
                }
                self.busy_turns = 0;
                self.reap_ring(&mut done)?;
                continue;
            }
            self.busy_turns = 0;
            if self.should_spin() && self.spin(&mut wcs, &mut done)? {
                continue;
            }
            if self.arm()? {
                // Poll once more: a completion that arrived before the arm raises no event.
                continue;
            }
            self.watch()?;
            done.clear();
            self.io
                .ring()
                .wait_timeout(1, IDLE_WAIT, &mut done)
                .map_err(|source| QueueError::Ring { op: "wait", source })?;
            self.on_ring(&mut done)?;
            self.flush_sends()?;
            if std::mem::take(&mut self.cm_ready) {
                for ev in self
                    .conn
                    .poll_events()
                    .map_err(rdma_err("rdma_get_cm_event"))?
                {
                    if matches!(
                        ev.kind,
                        rdma::CmEventKind::Disconnected | rdma::CmEventKind::DeviceRemoval
                    ) {
                        return Ok(End::Disconnected);
                    }
                }
            }
            // Memory freed by other queues may unblock parked commands.
            self.resume()?;
            self.flush_sends()?;
        }
    }

    /// Handles the ready completions: a batch of receives, then the send CQ until empty
    /// (which bounds what it can hold, see [`Prepared::new`]). Returns how many.
    fn poll_cqs(&mut self, wcs: &mut [Completion; 32]) -> Result<usize, QueueError> {
        let n = self.rcq.poll(wcs).map_err(rdma_err("ibv_poll_cq"))?;
        for wc in &wcs[..n] {
            self.on_wc(wc)?;
        }
        let mut total = n;
        loop {
            let m = self.scq.poll(wcs).map_err(rdma_err("ibv_poll_cq"))?;
            for wc in &wcs[..m] {
                self.on_wc(wc)?;
            }
            total += m;
            if m < wcs.len() {
                return Ok(total);
            }
        }
    }

    /// Whether the queue polls before it sleeps: busy polling is on, the receive CQ is not
    /// armed yet (one spin per sleep), and at most one command is in the works (drive I/O,
    /// RDMA READ or parked). That is the latency-bound case, where a wake-up per command is
    /// what the host waits for; with more in the works the wake-ups are shared by many
    /// commands, and a spin would only take CPU time from the work the queue waits for.
    fn should_spin(&mut self) -> bool {
        !self.rarmed
            && self.backend_ios() + self.reads_out as usize + self.parked.len() <= 1
            && self.spin.try_poll()
    }

    /// Backend operations in flight: the ring's, less its polls of the channel and rdma_cm fds.
    fn backend_ios(&self) -> usize {
        let polls = usize::from(self.cq_poll.is_some()) + usize::from(self.cm_poll.is_some());
        self.io.in_flight().saturating_sub(polls)
    }

    /// Polls the CQs (and the ring, while backend I/O is in flight) for up to the policy's
    /// budget, with a PAUSE between empty polls; true when it found work.
    fn spin(
        &mut self,
        wcs: &mut [Completion; 32],
        done: &mut Vec<uring::Completion<PoolBuf>>,
    ) -> Result<bool, QueueError> {
        let found = self.poll_for(wcs, done)?;
        let stats = &self.shared.stats;
        if found {
            self.spin.hit();
            stats.busy_poll_hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.spin.miss();
            stats.busy_poll_misses.fetch_add(1, Ordering::Relaxed);
        }
        Ok(found)
    }

    /// The polling loop of [`Queue::spin`].
    fn poll_for(
        &mut self,
        wcs: &mut [Completion; 32],
        done: &mut Vec<uring::Completion<PoolBuf>>,
    ) -> Result<bool, QueueError> {
        let start = Instant::now();
        loop {
            if self.poll_cqs(wcs)? > 0 {
                self.flush_sends()?;
                return Ok(true);
            }
            if self.backend_ios() > 0 && self.reap_ring(done)? > 0 {
                return Ok(true);
            }
            if start.elapsed() >= self.spin.budget() || self.ctl.kill.load(Ordering::Acquire) {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Reaps the ring's ready completions without sleeping, handles them, and posts the work
    /// requests they queued; returns how many there were.
    fn reap_ring(
        &mut self,
        done: &mut Vec<uring::Completion<PoolBuf>>,
    ) -> Result<usize, QueueError> {
        done.clear();
        let n = self
            .io
            .ring()
            .reap(done)
            .map_err(|source| QueueError::Ring { op: "reap", source })?;
        self.on_ring(done)?;
        self.flush_sends()?;
        Ok(n)
    }

    /// Arms the CQs the queue must wake for: always the receive CQ, the send CQ while an RDMA
    /// READ is in flight or a command is parked. True if it armed one (poll again before
    /// sleeping).
    fn arm(&mut self) -> Result<bool, QueueError> {
        let mut armed = false;
        if !self.rarmed {
            self.rcq.arm(false).map_err(rdma_err("ibv_req_notify_cq"))?;
            self.rarmed = true;
            armed = true;
        }
        if !self.sarmed && (self.reads_out > 0 || !self.parked.is_empty()) {
            self.scq.arm(false).map_err(rdma_err("ibv_req_notify_cq"))?;
            self.sarmed = true;
            armed = true;
        }
        Ok(armed)
    }

    /// Arms the ring polls of the completion channel and the rdma_cm event fd.
    fn watch(&mut self) -> Result<(), QueueError> {
        let ring_err = |source| QueueError::Ring {
            op: "poll_add",
            source,
        };
        if self.cq_poll.is_none() {
            // Fd lifetime: the channel fd stays open while `self.channel` lives, which outlives the
            // ring's polls: teardown removes them, and the ring (declared before the channel)
            // drops first, cancelling any poll still armed.
            let fd = self.channel.fd();
            self.cq_poll = Some(
                self.io
                    .ring()
                    .poll_add(fd, libc::POLLIN, false, POLL_CQ)
                    .map_err(ring_err)?,
            );
        }
        if self.cm_poll.is_none() {
            // Fd lifetime: as above, for the connection's event channel.
            let fd = self.conn.event_fd();
            self.cm_poll = Some(
                self.io
                    .ring()
                    .poll_add(fd, libc::POLLIN, false, POLL_CM)
                    .map_err(ring_err)?,
            );
        }
        Ok(())
    }

    fn on_ring(&mut self, done: &mut Vec<uring::Completion<PoolBuf>>) -> Result<(), QueueError> {
        for c in done.drain(..) {
            match c.tag {
                POLL_CQ if c.kind == uring::OpKind::Poll => {
                    self.cq_poll = None;
                    // One event per wake-up: another one pending makes the next poll fire at
                    // once.
                    let ev = self
                        .channel
                        .take_event()
                        .map_err(rdma_err("ibv_get_cq_event"))?;
                    if ev == Some(self.rcq.id()) {
                        self.rarmed = false;
                    } else if ev == Some(self.scq.id()) {
                        self.sarmed = false;
                    }
                }
                POLL_CM if c.kind == uring::OpKind::Poll => {
                    self.cm_poll = None;
                    self.cm_ready = true;
                }
                _ => {
                    if let Some(d) = QueueIo::done(c) {
                        self.on_io_done(d)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_wc(&mut self, wc: &rdma::Completion) -> Result<(), QueueError> {
        if wc.status != WcStatus::Success {
            return Err(if wc.status == WcStatus::Flushed {
                QueueError::Flushed
            } else {
                QueueError::Rdma {
                    op: "work completion",
                    source: wc.ok().err().unwrap_or(rdma::Error::InvalidArgument {
                        op: "work completion",
                        reason: format!("{:?}", wc.status),
                    }),
                }
            });
        }
        let idx = (wc.wr_id & !WR_KIND) as usize;
        match wc.wr_id & WR_KIND {
            WR_RECV if wc.opcode == WcOpcode::Recv => self.on_capsule(idx, wc.byte_len as usize),
            WR_SEND => {
                self.drop_cmd(idx);
                self.resume()
            }
            WR_READ => {
                self.reads_out = self.reads_out.saturating_sub(1);
                self.on_read_done(idx)?;
                self.resume()
            }
            WR_WRITE => Ok(()),
            _ => Err(QueueError::Protocol(format!(
                "unexpected completion {:?} id {:#x}",
                wc.opcode, wc.wr_id
            ))),
        }
    }

    /// Disconnects, waits for the backend I/O in flight, and frees everything (the QP before
    /// the buffers its work requests name).
    fn teardown(mut self) {
        if let Err(e) = self.conn.start_disconnect() {
            tracing::debug!(error = %e, "rdma_disconnect");
        }
        for p in [self.cq_poll.take(), self.cm_poll.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = self.io.ring().poll_remove(p) {
                tracing::debug!(error = %e, "poll_remove");
            }
        }
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.io.in_flight() > 0 && Instant::now() < deadline {
            done.clear();
            if let Err(e) = self
                .io
                .ring()
                .wait_timeout(1, Duration::from_secs(1), &mut done)
            {
                tracing::warn!(error = %e, "draining backend I/O");
                break;
            }
            // Completions are dropped: their buffers go back to the pool (no RDMA work
            // request names a buffer while the ring owns it).
        }
        self.core.on_disconnect();
        tracing::debug!(qid = self.qid, "queue resources released");
        // Drop order (fields): QP, CQs, ring (waits for anything left), channel, buffers.
    }
}

/// The receive request of slot `i`: its SQE entry and its in-capsule data buffer.
fn recv_request(
    dev: &DeviceRes,
    shared: &Shared,
    sqes: &MemoryRegion,
    data: &[Option<Buffer>],
    i: usize,
) -> Result<RecvRequest, rdma::Error> {
    let mut sges = vec![sqes.sge(i * SQE_LEN, SQE_LEN)?];
    if let Some(b) = &data[i] {
        sges.push(dev.sge(&shared.pool, b, 0, b.len())?);
    }
    Ok(RecvRequest::new(WR_RECV | i as u64, sges))
}
