//! The operations without data buffers: flush/fsync, write zeroes, deallocate (TRIM) and
//! polls of foreign fds. They refuse with a plain [`Error`]: there is nothing to hand back.

use super::sqe::{uring_cmd_sqe, FileOp};
use super::target::{TargetId, TargetKind};
use super::{OpKind, PollId, Ring, Sqe, INTERNAL};
use crate::abi;
use crate::buf::{AlignedBuf, IoBuf};
use crate::capability::Feature;
use crate::cmd::{dsm_ranges, NvmeCommand};
use crate::error::{Error, Result};
use io_uring::{opcode, types};
use std::os::fd::{AsFd, AsRawFd};

impl<B: IoBuf> Ring<B> {
    /// Queues `sqes` as the parts of one operation on target `t`; `aux` is memory they
    /// point into, owned by the slot until completion.
    fn no_data_op(
        &mut self,
        t: TargetId,
        tag: u64,
        kind: OpKind,
        sqes: Vec<Sqe>,
        aux: Option<AlignedBuf>,
    ) -> Result<()> {
        let op = kind.name();
        let nvme = self.targets.get(op, t)?.nsid().is_some();
        let s = self.slots.alloc(op)?;
        self.slots.start(s, tag, kind, nvme);
        self.slots.get_mut(s).aux = aux;
        let r = self.queue_parts(s, sqes.len(), |_, i| sqes[i].clone());
        if let Err(e) = r {
            self.slots.release(s);
            return Err(e);
        }
        Ok(())
    }

    /// Queues a flush: NVMe Flush (makes the volatile write cache durable) or fdatasync.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] (unknown target), [`Error::Unsupported`] (file on an IOPOLL ring),
    /// [`Error::RingFull`], [`Error::Os`] `io_uring_enter`.
    pub fn flush(&mut self, t: TargetId, tag: u64) -> Result<()> {
        self.sync(t, tag, true)
    }

    /// Queues an fsync (files: data and metadata; NVMe: same as [`Ring::flush`]).
    ///
    /// # Errors
    ///
    /// As [`Ring::flush`].
    pub fn fsync(&mut self, t: TargetId, tag: u64) -> Result<()> {
        self.sync(t, tag, false)
    }

    fn sync(&mut self, t: TargetId, tag: u64, datasync: bool) -> Result<()> {
        let kind = if datasync {
            OpKind::Flush
        } else {
            OpKind::Fsync
        };
        let tg = self.targets.get(kind.name(), t)?;
        self.no_fs_sync_on_iopoll(kind.name(), tg)?;
        let sqe = match &tg.kind {
            TargetKind::Nvme(info) => {
                uring_cmd_sqe(tg.file_ref(), false, &NvmeCommand::flush(info.nsid), None)
            }
            TargetKind::File { .. } => FileOp::Fsync { datasync }.sqe(tg.file_ref()),
        };
        self.no_data_op(t, tag, kind, vec![sqe], None)
    }

    /// Queues zeroing `len` bytes at `offset` (NVMe Write Zeroes, split at 65536 blocks;
    /// files: fallocate ZERO_RANGE|KEEP_SIZE).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for ranges outside the namespace, not LBA/DIO multiples, or a
    /// read-only target; [`Error::Unsupported`] when the controller lacks Write Zeroes (ONCS)
    /// or a file on an IOPOLL ring; [`Error::RingFull`].
    pub fn write_zeroes(&mut self, t: TargetId, offset: u64, len: u64, tag: u64) -> Result<()> {
        self.range_op(t, &[(offset, len)], tag, OpKind::WriteZeroes)
    }

    /// Queues deallocation (TRIM) of the byte ranges `(offset, len)`: NVMe Dataset Management
    /// with Deallocate (up to 256 ranges per command), files: fallocate PUNCH_HOLE|KEEP_SIZE.
    /// Deallocated blocks read back as zeroes on most devices (not guaranteed by NVMe).
    ///
    /// # Errors
    ///
    /// As [`Ring::write_zeroes`] (Unsupported when the controller lacks DSM).
    pub fn deallocate(&mut self, t: TargetId, ranges: &[(u64, u64)], tag: u64) -> Result<()> {
        self.range_op(t, ranges, tag, OpKind::Deallocate)
    }

    fn range_op(
        &mut self,
        t: TargetId,
        ranges: &[(u64, u64)],
        tag: u64,
        kind: OpKind,
    ) -> Result<()> {
        let op = kind.name();
        let tg = self.targets.get(op, t)?;
        if ranges.is_empty() {
            return Err(Error::invalid(op, "no ranges"));
        }
        for &(off, len) in ranges {
            if len > usize::MAX as u64 {
                return Err(Error::invalid(op, "range too long"));
            }
            // The range checks of a write; address 0 passes the buffer alignment check.
            tg.check_rw(op, off, 0, len as usize, true, self.check_alignment)?;
        }
        let mut aux = None;
        let sqes = match &tg.kind {
            TargetKind::Nvme(info) => {
                let lba = u64::from(info.lba_size());
                let mut v = Vec::new();
                if kind == OpKind::WriteZeroes {
                    if !info.controller.supports_write_zeroes() {
                        return Err(Error::unsupported(op, "the controller does not support Write Zeroes (ONCS bit 3): write a zeroed buffer instead"));
                    }
                    let (off, len) = ranges[0];
                    let mut b = off / lba;
                    let end = (off + len) / lba;
                    while b < end {
                        let n = (end - b).min(abi::MAX_NLB);
                        v.push(uring_cmd_sqe(
                            tg.file_ref(),
                            false,
                            &NvmeCommand::write_zeroes(info.nsid, b, n as u32, false),
                            None,
                        ));
                        b += n;
                    }
                } else {
                    if !info.controller.supports_dsm() {
                        return Err(Error::unsupported(
                            op,
                            "the controller does not support Dataset Management (ONCS bit 2)",
                        ));
                    }
                    let mut list = Vec::new();
                    for &(off, len) in ranges {
                        let mut b = off / lba;
                        let end = (off + len) / lba;
                        while b < end {
                            let n = (end - b).min(u64::from(u32::MAX));
                            list.push((b, n as u32));
                            b += n;
                        }
                    }
                    let mut buf = AlignedBuf::new(
                        list.len().div_ceil(abi::DSM_MAX_RANGES)
                            * abi::DSM_MAX_RANGES
                            * abi::DSM_RANGE_LEN,
                    );
                    for (ci, chunk) in list.chunks(abi::DSM_MAX_RANGES).enumerate() {
                        let base = ci * abi::DSM_MAX_RANGES * abi::DSM_RANGE_LEN;
                        let bytes = chunk.len() * abi::DSM_RANGE_LEN;
                        dsm_ranges(chunk, &mut buf[base..base + bytes]);
                        let mut c = NvmeCommand::deallocate(info.nsid, chunk.len() as u32);
                        // SAFETY: base is inside buf, which the slot owns until completion.
                        c.cmd.addr = unsafe { buf.as_mut_ptr().add(base) } as u64;
                        c.cmd.data_len = bytes as u32;
                        v.push(uring_cmd_sqe(tg.file_ref(), false, &c, None));
                    }
                    aux = Some(buf);
                }
                v
            }
            TargetKind::File { .. } => {
                self.no_fs_sync_on_iopoll(op, tg)?;
                let mode = libc::FALLOC_FL_KEEP_SIZE
                    | if kind == OpKind::WriteZeroes {
                        libc::FALLOC_FL_ZERO_RANGE
                    } else {
                        libc::FALLOC_FL_PUNCH_HOLE
                    };
                ranges
                    .iter()
                    .map(|&(off, len)| {
                        FileOp::Fallocate {
                            offset: off,
                            len,
                            mode,
                        }
                        .sqe(tg.file_ref())
                    })
                    .collect()
            }
        };
        self.no_data_op(t, tag, kind, sqes, aux)
    }

    /// Polls a foreign fd (e.g. an RDMA completion channel, an eventfd) in this ring for
    /// `events` (`libc::POLLIN`...). A oneshot poll completes once; a multishot poll
    /// completes each time the fd becomes ready (with [`Completion::more`](super::Completion::more) set) until
    /// [`Ring::poll_remove`]. The completion's result is the ready events.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] on an IOPOLL ring (the kernel refuses polls there) or a kernel
    /// without POLL_ADD; [`Error::RingFull`]; [`Error::Os`] `io_uring_enter`.
    pub fn poll_add(
        &mut self,
        fd: impl AsFd,
        events: i16,
        multishot: bool,
        tag: u64,
    ) -> Result<PollId> {
        const OP: &str = "poll";
        if self.caps.iopoll == Feature::On {
            return Err(Error::unsupported(
                OP,
                "an IOPOLL ring cannot poll fds: use a second ring without IOPOLL",
            ));
        }
        if !self.caps.poll_add {
            return Err(Error::unsupported(
                OP,
                "this kernel has no IORING_OP_POLL_ADD",
            ));
        }
        let raw = fd.as_fd().as_raw_fd();
        let s = self.slots.alloc(OP)?;
        self.slots.start(s, tag, OpKind::Poll, false);
        let sqe: Sqe = opcode::PollAdd::new(types::Fd(raw), events as u16 as u32)
            .multi(multishot)
            .build()
            .into();
        if let Err(e) = self.queue_parts(s, 1, |_, _| sqe.clone()) {
            self.slots.release(s);
            return Err(e);
        }
        Ok(PollId(s))
    }

    /// Removes an armed poll; its final completion (ECANCELED, or a last event) still comes.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when the id is not a live poll; [`Error::Os`] `io_uring_enter`.
    pub fn poll_remove(&mut self, id: PollId) -> Result<()> {
        if !self.slots.is_live_poll(id.0) {
            return Err(Error::invalid(
                "poll remove",
                "not a live poll of this ring",
            ));
        }
        let sqe: Sqe = opcode::PollRemove::new(u64::from(id.0))
            .build()
            .user_data(INTERNAL)
            .into();
        self.push(&sqe)
    }
}
