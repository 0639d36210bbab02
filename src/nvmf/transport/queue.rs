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
//! Waiting: the CQ's completion channel fd and the connection's rdma_cm event fd are polled in
//! the queue's io_uring next to the backend I/O; the CQ is re-armed and polled once more before
//! each sleep (the replicator engine's race rule), and sleeps are bounded (100 ms) so a kill
//! from the listener is seen promptly.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nvmf::backend::{IoDone, IoRequest, PoolBuf, QueueIo};
use crate::nvmf::transport::{DeviceRes, QueueCtl, Shared};
use crate::nvmf::{
    cm_accept_data, Action, CmRequest, Command, Completion, IoCommand, IoOp, QueueCore, Sgl,
    SQE_LEN,
};
use crate::p2p_alloc::Buffer;
use crate::rdma::{
    self, Access, CompletionChannel, CompletionQueue, ConnParams, ConnectRequest, Connection,
    MemoryRegion, QpCaps, QpInit, RecvRequest, RemoteBuf, SendOp, SendRequest, WcOpcode, WcStatus,
    EMPTY_COMPLETION,
};
use crate::uring::{self, PollId};

/// The nsid of a Flush of every namespace.
const ALL_NAMESPACES: u32 = 0xFFFF_FFFF;
const WR_RECV: u64 = 1 << 60;
const WR_SEND: u64 = 2 << 60;
const WR_READ: u64 = 3 << 60;
const WR_WRITE: u64 = 4 << 60;
const WR_KIND: u64 = 0xf << 60;
/// Ring tags of the queue's polls (backend I/O is tagged with the command index).
const POLL_CQ: u64 = 1 << 63;
const POLL_CM: u64 = (1 << 63) | 1;
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

/// A command from its capsule until its response SEND completed.
struct Cmd {
    cid: u16,
    sgl: Sgl,
    /// The receive slot (with its in-capsule data) the command still holds.
    slot: Option<usize>,
    /// Its data buffer.
    buf: Option<PoolBuf>,
    stage: Stage,
    /// Backend operations still in flight (a Flush of every namespace has several), and the
    /// first error among those done.
    ios_left: u32,
    io_err: Option<i32>,
}

enum Stage {
    /// Waiting for pool memory or an RDMA READ credit.
    Parked(Action),
    /// RDMA READ of command data for the core (`on_data`).
    Fetch,
    /// RDMA READ of write data, then the backend write.
    WriteData { backend: usize, offset: u64 },
    /// Backend I/O in flight; `read` for a read (data to RDMA WRITE), `capsule` when its
    /// buffer is the receive slot's in-capsule data buffer.
    Io { read: bool, capsule: bool },
    /// Response posted.
    Sending,
}

/// Outcome of trying to start an action.
enum Started {
    Yes,
    /// No memory or READ credit: park it.
    Blocked(Action),
}

struct Queue<'a> {
    // Field order is drop order: the QP goes first (the NIC stops using the buffers), then
    // the CQ, the ring (waits for backend I/O), and the buffers.
    conn: Connection,
    cq: CompletionQueue,
    io: QueueIo,
    sqes: MemoryRegion,
    recv_data: Vec<Option<Buffer>>,
    cmds: Vec<Option<Cmd>>,
    free: Vec<usize>,
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
    armed: bool,
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

impl<'a> Queue<'a> {
    fn accept(
        req: ConnectRequest,
        cm: CmRequest,
        shared: &'a Shared,
        ctl: &'a QueueCtl,
    ) -> Result<Queue<'a>, QueueError> {
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
        let ch = CompletionChannel::new(&ctx).map_err(rdma_err("ibv_create_comp_channel"))?;
        let cq = CompletionQueue::with_channel(&ctx, max_send + n as u32 + 16, &ch)
            .map_err(rdma_err("ibv_create_cq"))?;
        let sqes = MemoryRegion::alloc(&dev.pd, n * SQE_LEN, Access::local_read().local_write())
            .map_err(rdma_err("receive buffers"))?;
        let mut recv_data = Vec::with_capacity(n);
        for _ in 0..n {
            recv_data.push(if inline > 0 {
                Some(shared.pool.alloc(inline).map_err(|e| {
                    QueueError::Protocol(format!("no pool memory for receive buffers: {e}"))
                })?)
            } else {
                None
            });
        }
        let init = QpInit::new(&dev.pd, &cq).caps(QpCaps {
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
        let conn = req
            .accept_with(&init, &params, |qp| qp.post_recv(&recvs))
            .map_err(rdma_err("rdma_accept"))?;
        let io = QueueIo::new(&shared.backends, 2 * n)
            .map_err(|e| QueueError::Protocol(format!("backend ring: {e}")))?;
        Ok(Queue {
            conn,
            cq,
            io,
            sqes,
            recv_data,
            cmds: Vec::new(),
            free: Vec::new(),
            parked: VecDeque::new(),
            reads_out: 0,
            max_reads,
            core: QueueCore::new(&shared.core, &cm),
            dev,
            shared,
            ctl,
            qid: cm.qid,
            cq_poll: None,
            cm_poll: None,
            armed: false,
        })
    }

    fn serve(&mut self) -> Result<End, QueueError> {
        let mut wcs = [EMPTY_COMPLETION; 32];
        let mut done = Vec::new();
        loop {
            if self.ctl.kill.load(Ordering::Acquire) {
                return Ok(End::Killed);
            }
            let n = self.cq.poll(&mut wcs).map_err(rdma_err("ibv_poll_cq"))?;
            for wc in &wcs[..n] {
                self.on_wc(wc)?;
            }
            // Connect (on_command or on_data) names the controller: publish it for the
            // listener's keep-alive teardown.
            if let Some(c) = self.core.cntlid() {
                self.ctl.cntlid.store(u32::from(c), Ordering::Release);
            }
            done.clear();
            self.io
                .ring()
                .reap(&mut done)
                .map_err(|source| QueueError::Ring { op: "reap", source })?;
            let reaped = done.len();
            self.on_ring(&mut done)?;
            if n > 0 || reaped > 0 {
                continue;
            }
            if !self.armed {
                // Arm, then poll once more: a completion that arrived before the arm raises
                // no channel event.
                self.cq.arm(false).map_err(rdma_err("ibv_req_notify_cq"))?;
                self.armed = true;
                continue;
            }
            self.watch()?;
            done.clear();
            self.io
                .ring()
                .wait_timeout(1, IDLE_WAIT, &mut done)
                .map_err(|source| QueueError::Ring { op: "wait", source })?;
            self.on_ring(&mut done)?;
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
            // Memory freed by other queues may unblock parked commands.
            self.resume()?;
        }
    }

    /// Arms the ring polls of the completion channel and the rdma_cm event fd.
    fn watch(&mut self) -> Result<(), QueueError> {
        let ring_err = |source| QueueError::Ring {
            op: "poll_add",
            source,
        };
        if self.cq_poll.is_none() {
            let ch = self
                .cq
                .channel()
                .map(CompletionChannel::fd)
                .ok_or_else(|| QueueError::Protocol("completion queue without a channel".into()))?;
            // SAFETY: the channel fd stays open while the CQ lives, which outlives the ring's
            // polls (teardown removes them and the ring drops before the CQ... it is declared
            // after it, and Drop cancels polls still armed).
            let fd = unsafe { BorrowedFd::borrow_raw(ch) };
            self.cq_poll = Some(
                self.io
                    .ring()
                    .poll_add(fd, libc::POLLIN, false, POLL_CQ)
                    .map_err(ring_err)?,
            );
        }
        if self.cm_poll.is_none() {
            // SAFETY: as above, for the connection's event channel.
            let fd = unsafe { BorrowedFd::borrow_raw(self.conn.event_fd()) };
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
                    while self.cq.take_event().map_err(rdma_err("ibv_get_cq_event"))? {}
                    self.armed = false;
                }
                POLL_CM if c.kind == uring::OpKind::Poll => self.cm_poll = None,
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
                QueueError::Protocol("work requests flushed: the QP went to the error state".into())
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

    fn cmd(&mut self, idx: usize) -> Result<&mut Cmd, QueueError> {
        cmd_mut(&mut self.cmds, idx)
    }

    fn new_cmd(&mut self, c: Cmd) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.cmds[i] = Some(c);
                i
            }
            None => {
                self.cmds.push(Some(c));
                self.cmds.len() - 1
            }
        }
    }

    fn drop_cmd(&mut self, idx: usize) {
        if let Some(c) = self.cmds.get_mut(idx).and_then(Option::take) {
            debug_assert!(
                c.slot.is_none(),
                "receive slot released before the response"
            );
            self.free.push(idx);
        }
    }

    /// Posts receive slot `slot` again.
    fn repost(&mut self, slot: usize) -> Result<(), QueueError> {
        let r = recv_request(&self.dev, self.shared, &self.sqes, &self.recv_data, slot)
            .map_err(rdma_err("receive buffer"))?;
        self.conn.post_recv(&[r]).map_err(rdma_err("ibv_post_recv"))
    }

    /// Gives the command's receive slot back (reposts it), if it holds one.
    fn release_slot(&mut self, idx: usize) -> Result<(), QueueError> {
        if let Some(slot) = self.cmd(idx)?.slot.take() {
            self.repost(slot)?;
        }
        Ok(())
    }

    fn on_capsule(&mut self, slot: usize, byte_len: usize) -> Result<(), QueueError> {
        if byte_len < SQE_LEN {
            return Err(QueueError::Protocol(format!(
                "a {byte_len}-byte capsule (an SQE is {SQE_LEN})"
            )));
        }
        let mut raw = [0u8; SQE_LEN];
        self.sqes
            .read_at(slot * SQE_LEN, &mut raw)
            .map_err(rdma_err("read SQE"))?;
        let cmd = Command::parse(&raw).map_err(|e| QueueError::Protocol(e.to_string()))?;
        self.shared.stats.commands.fetch_add(1, Ordering::Relaxed);
        let data_len = byte_len - SQE_LEN;
        let idx = self.new_cmd(Cmd {
            cid: cmd.cid(),
            sgl: cmd.sgl(),
            slot: Some(slot),
            buf: None,
            stage: Stage::Sending,
            ios_left: 0,
            io_err: None,
        });
        let in_capsule: &[u8] = match (&self.recv_data[slot], data_len) {
            (Some(b), n) if n > 0 => &b.as_slice()[..n.min(b.len())],
            _ => &[],
        };
        let action = self.core.on_command(&cmd, in_capsule, Instant::now());
        if data_len == 0 {
            self.release_slot(idx)?;
        }
        if !self.parked.is_empty() && needs_resources(&action) {
            self.park(idx, action)
        } else {
            self.dispatch(idx, action)
        }
    }

    fn park(&mut self, idx: usize, action: Action) -> Result<(), QueueError> {
        self.cmd(idx)?.stage = Stage::Parked(action);
        self.parked.push_back(idx);
        Ok(())
    }

    fn dispatch(&mut self, idx: usize, action: Action) -> Result<(), QueueError> {
        match self.start(idx, action)? {
            Started::Yes => Ok(()),
            Started::Blocked(a) => self.park(idx, a),
        }
    }

    /// Restarts parked commands in order, until one blocks again.
    fn resume(&mut self) -> Result<(), QueueError> {
        while let Some(&idx) = self.parked.front() {
            let stage = std::mem::replace(&mut self.cmd(idx)?.stage, Stage::Sending);
            let Stage::Parked(action) = stage else {
                self.parked.pop_front();
                continue;
            };
            match self.start(idx, action)? {
                Started::Yes => {
                    self.parked.pop_front();
                }
                Started::Blocked(a) => {
                    self.cmd(idx)?.stage = Stage::Parked(a);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn alloc(&self, len: usize) -> Option<Buffer> {
        match self.shared.pool.alloc(len.max(1)) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::debug!(len, error = %e, "pool memory short: the command waits");
                None
            }
        }
    }

    fn start(&mut self, idx: usize, action: Action) -> Result<Started, QueueError> {
        match action {
            Action::Complete(c) => self.respond(idx, c, None).map(|_| Started::Yes),
            Action::Hold => {
                self.release_slot(idx)?;
                self.drop_cmd(idx);
                Ok(Started::Yes)
            }
            Action::ReturnData { data, completion } => {
                let sgl = self.cmd(idx)?.sgl;
                let (Sgl::Keyed { addr, len, key, .. }, false) = (sgl, data.is_empty()) else {
                    return self.respond(idx, completion, None).map(|_| Started::Yes);
                };
                let n = data.len().min(len as usize);
                let Some(mut b) = self.alloc(n) else {
                    return Ok(Started::Blocked(Action::ReturnData { data, completion }));
                };
                b.as_mut_slice()[..n].copy_from_slice(&data[..n]);
                let remote = RemoteBuf {
                    addr,
                    len: n as u32,
                    rkey: key,
                };
                self.cmd(idx)?.buf = Some(PoolBuf::range(b, 0, n));
                self.respond(idx, completion, Some(remote))
                    .map(|_| Started::Yes)
            }
            Action::FetchData { cid, len } => {
                let (sgl, slot) = {
                    let c = self.cmd(idx)?;
                    (c.sgl, c.slot)
                };
                match sgl {
                    Sgl::Keyed { .. } => {
                        if !self.post_read(idx, len as usize)? {
                            return Ok(Started::Blocked(Action::FetchData { cid, len }));
                        }
                        self.cmd(idx)?.stage = Stage::Fetch;
                        Ok(Started::Yes)
                    }
                    Sgl::InCapsule { offset, len: l } => {
                        let data: &[u8] = match slot.and_then(|s| self.recv_data[s].as_ref()) {
                            Some(b) => {
                                let s = b.as_slice();
                                let from = (offset as usize).min(s.len());
                                &s[from..(from + l.min(len) as usize).min(s.len())]
                            }
                            None => &[],
                        };
                        let next = self.core.on_data(cid, data, Instant::now());
                        self.release_slot(idx)?;
                        self.start(idx, next)
                    }
                    _ => {
                        let next = self.core.on_data(cid, &[], Instant::now());
                        self.start(idx, next)
                    }
                }
            }
            Action::Io(io) => self.start_io(idx, io),
        }
    }

    /// Allocates the command's buffer and posts the RDMA READ of its keyed SGL; false when
    /// out of READ credits or memory (nothing posted).
    fn post_read(&mut self, idx: usize, len: usize) -> Result<bool, QueueError> {
        if self.reads_out >= self.max_reads {
            return Ok(false);
        }
        let Sgl::Keyed { addr, key, .. } = self.cmd(idx)?.sgl else {
            return Err(QueueError::Protocol("READ without a keyed SGL".into()));
        };
        let Some(b) = self.alloc(len) else {
            return Ok(false);
        };
        let sge = self
            .dev
            .sge(&self.shared.pool, &b, 0, len)
            .map_err(rdma_err("register pool chunk"))?;
        let remote = RemoteBuf {
            addr,
            len: len as u32,
            rkey: key,
        };
        self.cmd(idx)?.buf = Some(PoolBuf::range(b, 0, len));
        self.conn
            .post_send(&[SendRequest::read(WR_READ | idx as u64, vec![sge], remote)])
            .map_err(rdma_err("post RDMA READ"))?;
        self.reads_out += 1;
        self.shared
            .stats
            .rdma_read_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(true)
    }

    fn on_read_done(&mut self, idx: usize) -> Result<(), QueueError> {
        let cmd = self.cmd(idx)?;
        match std::mem::replace(&mut cmd.stage, Stage::Sending) {
            Stage::Fetch => {
                let cid = cmd.cid;
                let buf = cmd.buf.take();
                let data = buf.as_ref().map_or(&[][..], |b| {
                    &b.buffer().as_slice()[b.start()..b.start() + uring::IoBuf::len(b)]
                });
                let next = self.core.on_data(cid, data, Instant::now());
                drop(buf);
                self.dispatch(idx, next)
            }
            Stage::WriteData { backend, offset } => {
                let buf = cmd.buf.take().ok_or_else(|| {
                    QueueError::Protocol("write data READ without a buffer".into())
                })?;
                cmd.stage = Stage::Io {
                    read: false,
                    capsule: false,
                };
                let req = IoRequest::Write { offset, buf };
                if let Err(d) = self.io.submit(backend, req, idx as u64) {
                    self.on_io_done(d)?;
                }
                Ok(())
            }
            _ => Err(QueueError::Protocol(format!(
                "READ completion for command {idx} not reading"
            ))),
        }
    }

    fn start_io(&mut self, idx: usize, io: IoCommand) -> Result<Started, QueueError> {
        let tag = idx as u64;
        if io.nsid == ALL_NAMESPACES && io.op == IoOp::Flush {
            // Flush every namespace of the subsystem; complete when all are done.
            let all: Vec<usize> = self
                .shared
                .namespaces
                .iter()
                .filter(|((sub, _), _)| *sub == io.subsystem)
                .map(|(_, &b)| b)
                .collect();
            let cmd = self.cmd(idx)?;
            cmd.stage = Stage::Io {
                read: false,
                capsule: false,
            };
            cmd.ios_left = all.len() as u32 + 1;
            for b in all {
                if let Err(d) = self.io.submit(b, IoRequest::Flush, tag) {
                    self.on_io_done(d)?;
                }
            }
            // The extra count keeps the command alive until every flush is queued.
            return self
                .on_io_done(IoDone {
                    tag,
                    result: Ok(()),
                    buf: None,
                })
                .map(|_| Started::Yes);
        }
        let Some(&backend) = self.shared.namespaces.get(&(io.subsystem, io.nsid)) else {
            let c = self.core.on_io_done(io.cid, Err(libc::ENODEV));
            return self.respond(idx, c, None).map(|_| Started::Yes);
        };
        self.cmd(idx)?.ios_left = 1;
        let req = match &io.op {
            IoOp::Read { offset, len } => {
                let Some(b) = self.alloc(*len as usize) else {
                    return Ok(Started::Blocked(Action::Io(io)));
                };
                self.cmd(idx)?.stage = Stage::Io {
                    read: true,
                    capsule: false,
                };
                IoRequest::Read {
                    offset: *offset,
                    buf: PoolBuf::range(b, 0, *len as usize),
                }
            }
            IoOp::Write { offset, len } => match io.sgl {
                Sgl::InCapsule { offset: at, .. } => {
                    let slot = self.cmd(idx)?.slot.ok_or_else(|| {
                        QueueError::Protocol("in-capsule write without its capsule".into())
                    })?;
                    let data = self.recv_data[slot].take().ok_or_else(|| {
                        QueueError::Protocol("in-capsule write without capsule data".into())
                    })?;
                    let align = self.shared.backends[backend].mem_align().max(1);
                    let capsule = at as usize % align == 0;
                    self.cmd(idx)?.stage = Stage::Io {
                        read: false,
                        capsule,
                    };
                    let buf = if capsule {
                        PoolBuf::range(data, at as usize, *len as usize)
                    } else {
                        // Not aligned for the backend: copy (counted; the Linux host always
                        // puts its data at offset 0).
                        let Some(mut b) = self.alloc(*len as usize) else {
                            self.recv_data[slot] = Some(data);
                            return Ok(Started::Blocked(Action::Io(io)));
                        };
                        let n = *len as usize;
                        let src = &data.as_slice()[at as usize..at as usize + n];
                        b.as_mut_slice()[..n].copy_from_slice(src);
                        self.recv_data[slot] = Some(data);
                        self.shared
                            .stats
                            .copied_bytes
                            .fetch_add(n as u64, Ordering::Relaxed);
                        PoolBuf::range(b, 0, n)
                    };
                    IoRequest::Write {
                        offset: *offset,
                        buf,
                    }
                }
                _ => {
                    if !self.post_read(idx, *len as usize)? {
                        return Ok(Started::Blocked(Action::Io(io)));
                    }
                    self.cmd(idx)?.stage = Stage::WriteData {
                        backend,
                        offset: *offset,
                    };
                    return Ok(Started::Yes);
                }
            },
            IoOp::Flush => IoRequest::Flush,
            IoOp::WriteZeroes { offset, len } => IoRequest::WriteZeroes {
                offset: *offset,
                len: *len,
            },
            IoOp::Deallocate { ranges } => IoRequest::Deallocate {
                ranges: ranges.clone(),
            },
        };
        if !matches!(io.op, IoOp::Read { .. } | IoOp::Write { .. }) {
            self.cmd(idx)?.stage = Stage::Io {
                read: false,
                capsule: false,
            };
        }
        if let Err(d) = self.io.submit(backend, req, tag) {
            self.on_io_done(d)?;
        }
        Ok(Started::Yes)
    }

    fn on_io_done(&mut self, d: IoDone) -> Result<(), QueueError> {
        let idx = d.tag as usize;
        let cmd = self.cmd(idx)?;
        cmd.ios_left = cmd.ios_left.saturating_sub(1);
        if let Err(e) = d.result {
            cmd.io_err.get_or_insert(e);
        }
        if cmd.ios_left > 0 {
            return Ok(());
        }
        let result = cmd.io_err.map_or(Ok(()), Err);
        let (read, capsule) = match cmd.stage {
            Stage::Io { read, capsule } => (read, capsule),
            _ => (false, false),
        };
        let (cid, sgl, slot) = (cmd.cid, cmd.sgl, cmd.slot);
        let mut buf = d.buf;
        if let (true, Some(slot)) = (capsule, slot) {
            // The in-capsule data buffer goes back to its receive slot.
            self.recv_data[slot] = buf.take().map(PoolBuf::into_buffer);
        }
        let c = self.core.on_io_done(cid, result);
        let remote = match (read, result, sgl, &buf) {
            (true, Ok(()), Sgl::Keyed { addr, key, .. }, Some(b)) => Some(RemoteBuf {
                addr,
                len: uring::IoBuf::len(b) as u32,
                rkey: key,
            }),
            _ => None,
        };
        self.cmd(idx)?.buf = buf;
        self.respond(idx, c, remote)
    }

    /// Releases the receive slot, then posts the RDMA WRITE of the command's buffer to
    /// `data` (if any) and the SEND of the completion, with invalidate when the SGL asked.
    fn respond(
        &mut self,
        idx: usize,
        c: Completion,
        data: Option<RemoteBuf>,
    ) -> Result<(), QueueError> {
        self.release_slot(idx)?;
        let cmd = cmd_mut(&mut self.cmds, idx)?;
        cmd.stage = Stage::Sending;
        let op = match cmd.sgl {
            Sgl::Keyed {
                key,
                invalidate: true,
                len,
                ..
            } if len > 0 => SendOp::SendWithInv(key),
            _ => SendOp::Send,
        };
        let mut wrs = Vec::with_capacity(2);
        if let Some(remote) = data {
            let b = cmd
                .buf
                .as_ref()
                .ok_or_else(|| QueueError::Protocol("data to return without a buffer".into()))?;
            let sge = self
                .dev
                .sge(
                    &self.shared.pool,
                    b.buffer(),
                    b.start(),
                    remote.len as usize,
                )
                .map_err(rdma_err("register pool chunk"))?;
            wrs.push(SendRequest::write(WR_WRITE | idx as u64, vec![sge], remote).unsignaled());
            self.shared
                .stats
                .rdma_write_bytes
                .fetch_add(u64::from(remote.len), Ordering::Relaxed);
        }
        wrs.push(SendRequest::new(WR_SEND | idx as u64, op, Vec::new()).with_inline(&c.encode()));
        self.conn.post_send(&wrs).map_err(rdma_err("post response"))
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
        // Drop order (fields): QP, CQ, ring (waits for anything left), buffers.
    }
}

fn cmd_mut(cmds: &mut [Option<Cmd>], idx: usize) -> Result<&mut Cmd, QueueError> {
    cmds.get_mut(idx)
        .and_then(Option::as_mut)
        .ok_or_else(|| QueueError::Protocol(format!("no command in slot {idx}")))
}

/// Whether starting `a` may need pool memory or an RDMA READ credit.
fn needs_resources(a: &Action) -> bool {
    matches!(
        a,
        Action::Io(_) | Action::FetchData { .. } | Action::ReturnData { .. }
    )
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
