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

use crate::nvmf::backend::{PoolBuf, QueueIo};
use crate::nvmf::transport::{DeviceRes, QueueCtl, Shared};
use crate::nvmf::{cm_accept_data, CmReject, CmRequest, QueueCore, SQE_LEN};
use crate::p2p_alloc::Buffer;
use crate::rdma::{
    self, Access, CompletionChannel, CompletionQueue, ConnParams, ConnectRequest, Connection,
    MemoryRegion, QpCaps, QpInit, RecvRequest, WcOpcode, WcStatus, EMPTY_COMPLETION,
};
use crate::uring::{self, PollId};

mod exec;

use exec::Cmd;

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

/// What a queue needs before it accepts.
struct Prepared {
    dev: Arc<DeviceRes>,
    cq: CompletionQueue,
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
    /// admin queue), a CQ on a completion channel, the send queue for a READ or a WRITE plus
    /// SEND per command, the backend ring, and the initiator depth: min(the host's responder
    /// resources, the device's max_qp_init_rd_atom).
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
        let ch = CompletionChannel::new(&ctx).map_err(rdma_err("ibv_create_comp_channel"))?;
        let cq = CompletionQueue::with_channel(&ctx, max_send + n as u32 + 16, &ch)
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
        let io = QueueIo::new(&shared.backends, 2 * n)
            .map_err(|e| QueueError::Resources(format!("backend ring: {e}")))?;
        Ok(Prepared {
            dev,
            cq,
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
            cq: p.cq,
            io: p.io,
            sqes: p.sqes,
            recv_data: p.recv_data,
            cmds: Vec::new(),
            free: Vec::new(),
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
        // Drop order (fields): QP, CQ, ring (waits for anything left), buffers.
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
