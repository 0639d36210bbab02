//! Carrying out the core's actions for one command: the command table, RDMA READ of host
//! data, backend I/O, RDMA WRITE of read data and the response SEND; commands that find no
//! pool memory or READ credit wait in order (parked) and restart as resources free up.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{rdma_err, recv_request, Queue, QueueError, SQE_LEN, WR_READ, WR_SEND, WR_WRITE};
use crate::nvmf::backend::{IoDone, IoRequest, PoolBuf};
use crate::nvmf::{Action, Command, Completion, IoCommand, IoFailure, IoOp, Sgl};
use crate::p2p_alloc::Buffer;
use crate::rdma::{RemoteBuf, SendOp, SendRequest};
use crate::uring;

/// The nsid of a Flush of every namespace.
const ALL_NAMESPACES: u32 = 0xFFFF_FFFF;

/// A command from its capsule until its response SEND completed.
pub(super) struct Cmd {
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
    io_err: Option<IoFailure>,
}

pub(super) enum Stage {
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
pub(super) enum Started {
    Yes,
    /// No memory or READ credit: park it.
    Blocked(Action),
}

impl Queue<'_> {
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

    pub(super) fn drop_cmd(&mut self, idx: usize) {
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

    pub(super) fn on_capsule(&mut self, slot: usize, byte_len: usize) -> Result<(), QueueError> {
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
        let _cmd = tracing::trace_span!(
            "cmd",
            qid = self.qid,
            cid = cmd.cid(),
            opcode = cmd.opcode()
        )
        .entered();
        tracing::trace!(len = byte_len, "capsule");
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
    pub(super) fn resume(&mut self) -> Result<(), QueueError> {
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

    /// Allocates the command's buffer and queues the RDMA READ of its keyed SGL (posted by
    /// [`Queue::flush_sends`]); false when out of READ credits or memory (nothing queued).
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
        self.sends
            .push(SendRequest::read(WR_READ | idx as u64, vec![sge], remote));
        self.reads_out += 1;
        self.shared
            .stats
            .rdma_read_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(true)
    }

    pub(super) fn on_read_done(&mut self, idx: usize) -> Result<(), QueueError> {
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
            let c = self
                .core
                .on_io_done(io.cid, Err(IoFailure::Errno(libc::ENODEV)));
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

    pub(super) fn on_io_done(&mut self, d: IoDone) -> Result<(), QueueError> {
        let idx = d.tag as usize;
        let qid = self.qid;
        let cmd = self.cmd(idx)?;
        let _cmd = tracing::trace_span!("cmd", qid, cid = cmd.cid).entered();
        tracing::trace!(result = ?d.result, "backend I/O done");
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

    /// Releases the receive slot, then queues the RDMA WRITE of the command's buffer to
    /// `data` (if any) and the SEND of the completion, with invalidate when the SGL asked
    /// (posted by [`Queue::flush_sends`]).
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
            self.sends
                .push(SendRequest::write(WR_WRITE | idx as u64, vec![sge], remote).unsignaled());
            self.shared
                .stats
                .rdma_write_bytes
                .fetch_add(u64::from(remote.len), Ordering::Relaxed);
        }
        self.sends
            .push(SendRequest::new(WR_SEND | idx as u64, op, Vec::new()).with_inline(&c.encode()));
        Ok(())
    }

    /// Posts the RDMA READs, WRITEs and SENDs queued since the last call, in order, with one
    /// `ibv_post_send` (one doorbell). Called before the queue waits or reaps.
    pub(super) fn flush_sends(&mut self) -> Result<(), QueueError> {
        if self.sends.is_empty() {
            return Ok(());
        }
        let r = self.conn.post_send(&self.sends);
        self.sends.clear();
        r.map_err(rdma_err("ibv_post_send"))
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
