//! Queueing: pushing SQEs (flushing a full submission queue), splitting an operation into
//! parts under one slot, [`Ring::submit`], and the operations that move data through buffers
//! the operation owns: read, write, readv, writev and raw NVMe commands. Each refuses with a
//! [`Rejected`] that hands the buffers back.

use super::sqe::{uring_cmd_sqe, FileOp};
use super::target::{Target, TargetId, TargetKind};
use super::{OpKind, Ring, Sqe};
use crate::buf::{Buffers, IoBuf};
use crate::cmd::{Direction, NvmeCommand};
use crate::error::{Error, Rejected, Result};

/// Parameters of one read/write part.
struct Part {
    offset: u64,
    addr: *mut u8,
    len: usize,
}

/// The SQE of one part of a read or write of target `t`.
fn rw_sqe(t: &Target, write: bool, p: &Part, fixed: Option<u16>) -> Sqe {
    match &t.kind {
        TargetKind::Nvme(info) => {
            let lba = u64::from(info.lba_size());
            let nlb = (p.len as u64 / lba) as u32;
            let mut c = if write {
                NvmeCommand::write(info.nsid, p.offset / lba, nlb)
            } else {
                NvmeCommand::read(info.nsid, p.offset / lba, nlb)
            };
            c.cmd.addr = p.addr as u64;
            c.cmd.data_len = p.len as u32;
            uring_cmd_sqe(t.file_ref(), false, &c, fixed)
        }
        TargetKind::File { .. } => {
            let (addr, len, offset, buf_index) = (p.addr, p.len as u32, p.offset, fixed);
            let op = if write {
                FileOp::Write {
                    addr,
                    len,
                    offset,
                    buf_index,
                }
            } else {
                FileOp::Read {
                    addr,
                    len,
                    offset,
                    buf_index,
                }
            };
            op.sqe(t.file_ref())
        }
    }
}

impl<B: IoBuf> Ring<B> {
    /// Pushes one SQE, flushing the submission queue to the kernel when it is full.
    pub(super) fn push(&mut self, sqe: &Sqe) -> Result<()> {
        loop {
            // SAFETY: every SQE built by this ring points only at memory owned by a live
            // slot (buffer, aux buffer, iovec array) that stays put until its CQE is reaped.
            let r = unsafe { self.uring.submission().push(sqe) };
            if r.is_ok() {
                return Ok(());
            }
            self.uring
                .submit()
                .map_err(|e| Error::from_io("io_uring_enter", &e))?;
        }
    }

    /// Queues SQEs produced by `make(i)` for `n` parts of slot `s`. On a push failure the
    /// parts already queued keep the slot alive and it completes with that error.
    pub(super) fn queue_parts(
        &mut self,
        s: u32,
        n: usize,
        mut make: impl FnMut(&Self, usize) -> Sqe,
    ) -> Result<()> {
        for i in 0..n {
            let sqe = make(self, i).user_data(u64::from(s));
            if let Err(e) = self.push(&sqe) {
                if i == 0 {
                    return Err(e);
                }
                self.slots.queued(s, i, Some(e));
                return Ok(());
            }
        }
        self.slots.queued(s, n, None);
        if self.submit_batch > 0 && self.uring.submission().len() >= self.submit_batch {
            // The SQEs are queued and owned by the slot: a failed enter leaves them queued
            // for the next submit/wait, which reports the error then. GETEVENTS also posts
            // completions that are ready (like fio's commit), so the next wait finds them.
            let _ = self.enter_getevents(0);
        }
        Ok(())
    }

    /// Sends all queued SQEs to the kernel in one system call; returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `io_uring_enter` (EBUSY: too many completions pending, reap first;
    /// EEXIST: used from a second thread with SINGLE_ISSUER).
    pub fn submit(&mut self) -> Result<usize> {
        loop {
            match self.uring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => return r.map_err(|e| Error::from_io("io_uring_enter", &e)),
            }
        }
    }

    fn rw(
        &mut self,
        t: TargetId,
        offset: u64,
        mut buf: B,
        tag: u64,
        write: bool,
    ) -> Result<(), Rejected<B>> {
        let kind = if write { OpKind::Write } else { OpKind::Read };
        let op = kind.name();
        let addr = buf.as_mut_ptr();
        let len = buf.len();
        let prepared = (|| {
            let tg = self.targets.get(op, t)?;
            tg.check_rw(op, offset, addr as usize, len, write, self.check_alignment)?;
            let (chunk, nvme) = (tg.max_part(self.file_max_transfer), tg.nsid().is_some());
            let s = self.slots.alloc(op)?;
            Ok((s, chunk, nvme))
        })();
        let (s, chunk, nvme) = match prepared {
            Ok(v) => v,
            Err(error) => {
                return Err(Rejected {
                    error,
                    bufs: Buffers::One(buf),
                })
            }
        };
        let fixed = self.fixed_index(addr as usize, len);
        self.slots.start(s, tag, kind, nvme);
        self.slots.get_mut(s).bufs = Buffers::One(buf);
        let n = len.div_ceil(chunk);
        let r = self.queue_parts(s, n, |ring, i| {
            let off = i * chunk;
            let p = Part {
                offset: offset + off as u64,
                // SAFETY: off < len, inside the buffer.
                addr: unsafe { addr.add(off) },
                len: chunk.min(len - off),
            };
            rw_sqe(ring.targets.checked(t), write, &p, fixed)
        });
        if let Err(error) = r {
            let slot = self.slots.release(s);
            return Err(Rejected {
                error,
                bufs: slot.bufs,
            });
        }
        if nvme {
            // Passthrough completes with res 0: count the bytes up front.
            self.slots.get_mut(s).bytes = len;
        }
        Ok(())
    }

    /// Queues a read of `buf.len()` bytes at byte `offset` of target `t` into `buf`, split
    /// into several commands when larger than the namespace's max transfer. The buffer comes
    /// back in the [`Completion`](super::Completion); reads of files may be short at end of
    /// file.
    ///
    /// # Errors
    ///
    /// Rejected before submission, with the buffer returned: [`Error::Invalid`] (unknown
    /// target, zero length, offset/length not multiples of the LBA size or DIO alignment,
    /// range beyond the namespace, misaligned buffer that would be bounced),
    /// [`Error::RingFull`] (reap first), [`Error::Os`] `io_uring_enter` when flushing a full
    /// submission queue failed.
    pub fn read(&mut self, t: TargetId, offset: u64, buf: B, tag: u64) -> Result<(), Rejected<B>> {
        self.rw(t, offset, buf, tag, false)
    }

    /// Queues a write of all of `buf` at byte `offset` of target `t`.
    ///
    /// # Errors
    ///
    /// As [`Ring::read`], plus [`Error::Invalid`] when the target was opened read-only.
    pub fn write(&mut self, t: TargetId, offset: u64, buf: B, tag: u64) -> Result<(), Rejected<B>> {
        self.rw(t, offset, buf, tag, true)
    }

    /// Queues a vectored read at byte `offset` into `bufs` in order (one command: the total
    /// must fit the max transfer). For NVMe, every buffer but the first must start on a 4 KiB
    /// boundary and every buffer but the last must end on one, or the kernel would bounce.
    ///
    /// # Errors
    ///
    /// As [`Ring::read`], plus [`Error::Invalid`] when the total exceeds the max transfer or
    /// buffer boundaries would make the kernel bounce; the buffers come back in the
    /// [`Rejected`].
    pub fn readv(
        &mut self,
        t: TargetId,
        offset: u64,
        bufs: Vec<B>,
        tag: u64,
    ) -> Result<(), Rejected<B>> {
        self.rwv(t, offset, bufs, tag, false)
    }

    /// Queues a vectored write from `bufs` in order at byte `offset`.
    ///
    /// # Errors
    ///
    /// As [`Ring::readv`].
    pub fn writev(
        &mut self,
        t: TargetId,
        offset: u64,
        bufs: Vec<B>,
        tag: u64,
    ) -> Result<(), Rejected<B>> {
        self.rwv(t, offset, bufs, tag, true)
    }

    /// Checks the buffers of a vectored transfer of `total` bytes to `tg`.
    fn check_rwv(
        &self,
        op: &'static str,
        tg: &Target,
        offset: u64,
        iov: &[libc::iovec],
        total: usize,
        write: bool,
    ) -> Result<()> {
        if iov.is_empty() || iov.len() > 1024 {
            return Err(Error::invalid(op, "between 1 and 1024 buffers"));
        }
        // Whole-transfer rules (range, multiples, read-only) on the sum, address on each.
        tg.check_rw(
            op,
            offset,
            iov[0].iov_base as usize,
            total,
            write,
            self.check_alignment,
        )?;
        let max = tg.max_part(self.file_max_transfer);
        if total > max {
            return Err(Error::invalid(
                op,
                format!("{total} bytes exceed the max transfer {max}: split it into several calls"),
            ));
        }
        for (i, v) in iov.iter().enumerate() {
            let a = v.iov_base as usize;
            if v.iov_len == 0 {
                return Err(Error::invalid(op, "empty buffer in the vector"));
            }
            if !self.check_alignment {
                continue;
            }
            match &tg.kind {
                TargetKind::Nvme(info) => {
                    let bad_start = i > 0 && a % 4096 != 0;
                    let bad_end = i + 1 < iov.len() && (a + v.iov_len) % 4096 != 0;
                    if a % info.dma_alignment != 0 || bad_start || bad_end {
                        return Err(Error::invalid(
                            op,
                            format!("buffer {i} at {a:#x}+{}: inner buffer boundaries must be 4 KiB aligned or the kernel bounces the data", v.iov_len),
                        ));
                    }
                }
                TargetKind::File {
                    offset_align,
                    mem_align,
                    ..
                } => {
                    if a % *mem_align as usize != 0 || v.iov_len % *offset_align as usize != 0 {
                        return Err(Error::invalid(
                            op,
                            format!("buffer {i} at {a:#x}+{}: O_DIRECT needs addresses aligned to {mem_align} and lengths to {offset_align}", v.iov_len),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn rwv(
        &mut self,
        t: TargetId,
        offset: u64,
        mut bufs: Vec<B>,
        tag: u64,
        write: bool,
    ) -> Result<(), Rejected<B>> {
        let kind = if write { OpKind::Writev } else { OpKind::Readv };
        let op = kind.name();
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let prepared = (|| {
            let tg = self.targets.get(op, t)?;
            self.check_rwv(op, tg, offset, &iov, total, write)?;
            let nvme = tg.nsid().is_some();
            let s = self.slots.alloc(op)?;
            Ok((s, nvme))
        })();
        let (s, nvme) = match prepared {
            Ok(v) => v,
            Err(error) => {
                return Err(Rejected {
                    error,
                    bufs: Buffers::Many(bufs),
                })
            }
        };
        self.slots.start(s, tag, kind, nvme);
        {
            let slot = self.slots.get_mut(s);
            slot.iov = iov;
            slot.bufs = Buffers::Many(std::mem::take(&mut bufs));
        }
        let r = self.queue_parts(s, 1, |ring, _| {
            let tg = ring.targets.checked(t);
            let slot = ring.slots.get(s);
            let iovp = slot.iov.as_ptr();
            let n = slot.iov.len();
            match &tg.kind {
                TargetKind::Nvme(info) => {
                    let lba = u64::from(info.lba_size());
                    let nlb = (total as u64 / lba) as u32;
                    let mut c = if write {
                        NvmeCommand::write(info.nsid, offset / lba, nlb)
                    } else {
                        NvmeCommand::read(info.nsid, offset / lba, nlb)
                    };
                    c.cmd.addr = iovp as u64;
                    c.cmd.data_len = n as u32;
                    uring_cmd_sqe(tg.file_ref(), true, &c, None)
                }
                TargetKind::File { .. } => {
                    let (iov, n) = (iovp, n as u32);
                    let op = if write {
                        FileOp::Writev { iov, n, offset }
                    } else {
                        FileOp::Readv { iov, n, offset }
                    };
                    op.sqe(tg.file_ref())
                }
            }
        });
        if let Err(error) = r {
            let slot = self.slots.release(s);
            return Err(Rejected {
                error,
                bufs: slot.bufs,
            });
        }
        if nvme {
            self.slots.get_mut(s).bytes = total;
        }
        Ok(())
    }

    /// Queues a raw NVMe command (power users); admin commands go to the namespace's
    /// controller device (`/dev/nvmeX`), I/O commands to the namespace. With a buffer,
    /// `cmd.addr` is set to it and `cmd.data_len` defaults to its length (a smaller nonzero
    /// `data_len` is kept); no range or size checks are made, so the controller's status
    /// comes back as [`Error::Nvme`]. The command result (DW0/DW1) is in
    /// [`Completion::cmd_result`](super::Completion::cmd_result).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] (with the buffer returned) when the target is not a namespace,
    /// `cmd.addr`/`cmd.metadata` are nonzero (they would let the device write arbitrary
    /// memory), or `data_len` exceeds the buffer; [`Error::RingFull`].
    pub fn nvme_command(
        &mut self,
        t: TargetId,
        mut c: NvmeCommand,
        mut buf: Option<B>,
        tag: u64,
    ) -> Result<(), Rejected<B>> {
        const OP: &str = "nvme command";
        let checked = (|| {
            let tg = self.targets.get(OP, t)?;
            if tg.nsid().is_none() {
                return Err(Error::invalid(
                    OP,
                    "raw NVMe commands need a namespace target",
                ));
            }
            if c.cmd.addr != 0 || c.cmd.metadata != 0 || c.cmd.metadata_len != 0 {
                return Err(Error::invalid(
                    OP,
                    "leave cmd.addr/metadata zero: pass the data buffer as `buf`",
                ));
            }
            match &mut buf {
                Some(b) => {
                    if c.cmd.data_len == 0 {
                        c.cmd.data_len = u32::try_from(b.len())
                            .map_err(|_| Error::invalid(OP, "buffer larger than 4 GiB"))?;
                    } else if c.cmd.data_len as usize > b.len() {
                        return Err(Error::invalid(
                            OP,
                            format!(
                                "data_len {} exceeds the {}-byte buffer",
                                c.cmd.data_len,
                                b.len()
                            ),
                        ));
                    }
                    c.cmd.addr = b.as_mut_ptr() as u64;
                }
                None if c.cmd.data_len != 0 => {
                    return Err(Error::invalid(OP, "data_len without a buffer"));
                }
                None => {}
            }
            if c.direction() == Direction::ToDevice && !tg.writable {
                return Err(Error::invalid(
                    OP,
                    "data-out command on a namespace opened read-only",
                ));
            }
            self.slots.alloc(OP)
        })();
        let s = match checked {
            Ok(s) => s,
            Err(error) => {
                return Err(Rejected {
                    error,
                    bufs: buf.into(),
                })
            }
        };
        let fixed = buf
            .as_ref()
            .and_then(|b| self.fixed_index(b.as_ptr() as usize, c.cmd.data_len as usize));
        self.slots.start(s, tag, OpKind::Nvme, true);
        self.slots.get_mut(s).bufs = buf.into();
        let r = self.queue_parts(s, 1, |ring, _| {
            let file = ring.targets.checked(t).command_file(c.queue);
            uring_cmd_sqe(file, false, &c, fixed)
        });
        if let Err(error) = r {
            let slot = self.slots.release(s);
            return Err(Rejected {
                error,
                bufs: slot.bufs,
            });
        }
        self.slots.get_mut(s).bytes = c.cmd.data_len as usize;
        Ok(())
    }
}
