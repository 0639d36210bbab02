//! Completion queues: busy/batch polling, and event-driven waits through a completion channel
//! whose (non-blocking) fd any event loop can poll (epoll, io_uring `POLL_ADD`).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdma_sys::*;

use crate::device::Context;
use crate::error::{Errno, Error, Result, WcStatus};
use crate::fd::{set_nonblocking, wait_readable};
use crate::inflight::QpShared;

/// A completion channel: the fd becomes readable when an armed CQ has a new completion.
#[derive(Clone)]
pub struct CompletionChannel {
    inner: Arc<ChannelInner>,
}

struct ChannelInner {
    ch: *mut ibv_comp_channel,
    _ctx: Context,
}
// SAFETY: verbs objects are thread-safe.
unsafe impl Send for ChannelInner {}
// SAFETY: as above.
unsafe impl Sync for ChannelInner {}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_comp_channel; CQs using it hold an Arc, so none is left.
        let rc = unsafe { ibv_destroy_comp_channel(self.ch) };
        if rc != 0 {
            tracing::warn!(errno = rc, "ibv_destroy_comp_channel failed");
        }
    }
}

impl CompletionChannel {
    /// Creates a channel; its fd is set non-blocking.
    ///
    /// # Errors
    /// `Verbs { op: "ibv_create_comp_channel" | "fcntl" }`.
    pub fn new(ctx: &Context) -> Result<CompletionChannel> {
        // SAFETY: valid context.
        let ch = unsafe { ibv_create_comp_channel(ctx.as_raw()) };
        if ch.is_null() {
            return Err(Error::last_os("ibv_create_comp_channel"));
        }
        let c = CompletionChannel {
            inner: Arc::new(ChannelInner {
                ch,
                _ctx: ctx.clone(),
            }),
        };
        set_nonblocking(c.fd())?;
        Ok(c)
    }

    /// The fd to poll for readability (non-blocking; the same as [`AsFd::as_fd`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel's fd stays open until ibv_destroy_comp_channel, which runs when
        // the last clone is dropped; the borrow of self outlives neither.
        unsafe { BorrowedFd::borrow_raw((*self.inner.ch).fd) }
    }

    /// The raw handle (the `ibv_comp_channel`), for verbs calls this crate does not wrap. Valid while
    /// `self` (or a clone) lives; do not destroy it.
    pub fn as_raw(&self) -> *mut ibv_comp_channel {
        self.inner.ch
    }

    /// Consumes one pending event, if any, acknowledges it, and says which CQ it was for
    /// (compare with [`CompletionQueue::id`]): the way to serve several CQs that share one
    /// channel. Returns `None` when no event is pending (the fd is non-blocking).
    ///
    /// # Errors
    /// `Verbs { op: "ibv_get_cq_event" }`.
    pub fn take_event(&self) -> Result<Option<CqId>> {
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: valid channel; non-blocking fd so this returns EAGAIN when empty.
        let rc = unsafe { ibv_get_cq_event(self.as_raw(), &mut cq, &mut ctx) };
        if rc != 0 {
            let errno = crate::error::last_errno();
            if errno == libc::EAGAIN {
                return Ok(None);
            }
            return Err(Error::Verbs {
                op: "ibv_get_cq_event",
                errno: Errno(errno),
            });
        }
        // Acknowledge at once so destroying the CQ never waits for unacked events.
        // SAFETY: cq is the CQ the event belongs to; it is alive, since it holds this channel.
        unsafe { ibv_ack_cq_events(cq, 1) };
        Ok(Some(CqId(cq as usize)))
    }
}

impl AsFd for CompletionChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

/// Which completion queue a channel event was for ([`CompletionChannel::take_event`],
/// [`CompletionQueue::id`]); only an identity, it cannot reach the CQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CqId(usize);

/// Opcode of a completion (`enum ibv_wc_opcode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    /// A SEND (any flavour) finished.
    Send,
    /// An RDMA WRITE finished.
    RdmaWrite,
    /// An RDMA READ finished.
    RdmaRead,
    /// An atomic compare-and-swap finished.
    CompSwap,
    /// An atomic fetch-and-add finished.
    FetchAdd,
    /// A memory window bind finished.
    BindMw,
    /// A local invalidate finished.
    LocalInv,
    /// A receive took an incoming SEND.
    Recv,
    /// A receive was consumed by an RDMA WRITE with immediate data.
    RecvRdmaWithImm,
    /// An opcode this crate does not know.
    Other(u32),
}

impl WcOpcode {
    fn from_raw(v: u32) -> WcOpcode {
        match v {
            0 => WcOpcode::Send,
            1 => WcOpcode::RdmaWrite,
            2 => WcOpcode::RdmaRead,
            3 => WcOpcode::CompSwap,
            4 => WcOpcode::FetchAdd,
            5 => WcOpcode::BindMw,
            6 => WcOpcode::LocalInv,
            128 => WcOpcode::Recv,
            129 => WcOpcode::RecvRdmaWithImm,
            o => WcOpcode::Other(o),
        }
    }
    /// True for receive-side completions.
    pub fn is_recv(self) -> bool {
        matches!(self, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm)
    }
    fn name(self) -> &'static str {
        match self {
            WcOpcode::Send => "SEND",
            WcOpcode::RdmaWrite => "RDMA_WRITE",
            WcOpcode::RdmaRead => "RDMA_READ",
            WcOpcode::BindMw => "BIND_MW",
            WcOpcode::LocalInv => "LOCAL_INV",
            WcOpcode::Recv | WcOpcode::RecvRdmaWithImm => "RECV",
            _ => "work request",
        }
    }
}

/// One work completion.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The id the work request was posted with.
    pub wr_id: u64,
    /// Success or why the work request failed.
    pub status: WcStatus,
    /// Valid only for successful completions (error completions carry no opcode).
    pub opcode: WcOpcode,
    /// Bytes received (valid for receive completions).
    pub byte_len: u32,
    /// Immediate data (host byte order) of a SEND/WRITE_WITH_IMM.
    pub imm: Option<u32>,
    /// The rkey the peer invalidated with SEND_WITH_INV.
    pub invalidated_rkey: Option<u32>,
    /// The QP the work request belonged to.
    pub qp_num: u32,
    /// The provider's own error code (error completions).
    pub vendor_err: u32,
}

impl Completion {
    /// Ok(self) for a successful completion, else the typed error.
    ///
    /// # Errors
    /// `Completion { status, .. }` with the work completion status.
    pub fn ok(self) -> Result<Completion> {
        if self.status == WcStatus::Success {
            Ok(self)
        } else {
            Err(Error::Completion {
                op: self.opcode.name(),
                wr_id: self.wr_id,
                status: self.status,
                vendor_err: self.vendor_err,
            })
        }
    }

    fn from_raw(wc: &ibv_wc, inv_flags: u32) -> Completion {
        let flags = wc.wc_flags;
        // SAFETY: reading a plain u32 union field; which one is meaningful depends on flags.
        let union_val = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
        let with_imm = flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        let with_inv = flags & inv_flags != 0 && WcOpcode::from_raw(wc.opcode).is_recv();
        Completion {
            wr_id: wc.wr_id,
            status: WcStatus::from_raw(wc.status),
            opcode: WcOpcode::from_raw(wc.opcode),
            byte_len: wc.byte_len,
            imm: with_imm.then(|| u32::from_be(union_val)),
            invalidated_rkey: with_inv.then_some(union_val),
            qp_num: wc.qp_num,
            vendor_err: wc.vendor_err,
        }
    }
}

/// The `wc_flags` bits that report a remote invalidation on `ctx`'s device:
/// `IBV_WC_WITH_INV`, and on soft-RoCE also bit 2. rxe (Linux 6.12,
/// `drivers/infiniband/sw/rxe/rxe_resp.c`) writes the kernel's `IB_WC_WITH_INVALIDATE`
/// (`1 << 2`) unconverted into the CQE it shares with userspace, where libibverbs calls that
/// bit `IBV_WC_IP_CSUM_OK` and expects `IBV_WC_WITH_INV` (`1 << 3`); it never sets a checksum
/// flag on a receive there. Without this, a receiver on rxe cannot tell that its window is
/// already dead, and its own LOCAL_INV of it then crashes that kernel (`rxe_invalidate_mw`
/// does not check the window's state).
fn inv_flags(ctx: &Context) -> u32 {
    let inv = ibv_wc_flags::IBV_WC_WITH_INV.0;
    match ctx.attributes() {
        Ok(a) if a.vendor_id == crate::device::RXE_VENDOR_ID => {
            inv | ibv_wc_flags::IBV_WC_IP_CSUM_OK.0
        }
        _ => inv,
    }
}

/// A completion queue. Cheap to clone. QPs using it hold a clone.
#[derive(Clone)]
pub struct CompletionQueue {
    pub(crate) inner: Arc<CqInner>,
}

pub(crate) struct CqInner {
    cq: *mut ibv_cq,
    ctx: Context,
    channel: Option<CompletionChannel>,
    /// The `wc_flags` bits that mean "the peer's SEND_WITH_INV invalidated a key" on this
    /// device (see [`inv_flags`]).
    inv_flags: u32,
    /// QPs (by number) posting to this CQ, to release their in-flight buffers on completion.
    pub(crate) qps: Mutex<HashMap<u32, Weak<QpShared>>>,
}
// SAFETY: verbs CQs are thread-safe (polling is serialized by the provider's lock).
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: cq created by ibv_create_cq; every QP using it holds an Arc, so none is left;
        // every channel event was acked when it was read.
        let rc = unsafe { ibv_destroy_cq(self.cq) };
        if rc != 0 {
            tracing::warn!(
                errno = rc,
                device = self.ctx.name(),
                "ibv_destroy_cq failed"
            );
        }
    }
}

impl CompletionQueue {
    /// A CQ with room for `entries` completions, polled only.
    ///
    /// # Errors
    /// `Verbs { op: "ibv_create_cq" }`: EINVAL if `entries` exceeds the device's max_cqe.
    pub fn new(ctx: &Context, entries: u32) -> Result<CompletionQueue> {
        Self::create(ctx, entries, None)
    }

    /// A CQ whose completions can also be waited for through `channel`.
    ///
    /// # Errors
    /// As for [`new`](Self::new).
    pub fn with_channel(
        ctx: &Context,
        entries: u32,
        channel: &CompletionChannel,
    ) -> Result<CompletionQueue> {
        Self::create(ctx, entries, Some(channel.clone()))
    }

    fn create(
        ctx: &Context,
        entries: u32,
        channel: Option<CompletionChannel>,
    ) -> Result<CompletionQueue> {
        let ch = channel
            .as_ref()
            .map_or(std::ptr::null_mut(), |c| c.as_raw());
        // SAFETY: valid context and (optional) channel of the same device.
        let cq =
            unsafe { ibv_create_cq(ctx.as_raw(), entries as i32, std::ptr::null_mut(), ch, 0) };
        if cq.is_null() {
            return Err(Error::last_os("ibv_create_cq"));
        }
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                cq,
                ctx: ctx.clone(),
                channel,
                inv_flags: inv_flags(ctx),
                qps: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The raw handle (the `ibv_cq`), for verbs calls this crate does not wrap. Valid while
    /// `self` (or a clone) lives; do not destroy it.
    pub fn as_raw(&self) -> *mut ibv_cq {
        self.inner.cq
    }

    /// The device.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    /// This CQ's identity, as [`CompletionChannel::take_event`] reports it.
    pub fn id(&self) -> CqId {
        CqId(self.inner.cq as usize)
    }

    /// The completion channel, if any.
    pub fn channel(&self) -> Option<&CompletionChannel> {
        self.inner.channel.as_ref()
    }

    /// Polls up to `out.len()` completions without blocking (one `ibv_poll_cq`). Returns how
    /// many were written. Error completions are returned too (check `status` or use `ok()`).
    ///
    /// # Errors
    /// `Verbs { op: "ibv_poll_cq" }` if the CQ itself failed (overrun).
    pub fn poll(&self, out: &mut [Completion]) -> Result<usize> {
        const BATCH: usize = 32;
        // Not zeroed: an empty poll (the common case in a busy loop) then costs no memset.
        let mut wcs = [const { std::mem::MaybeUninit::<ibv_wc>::uninit() }; BATCH];
        let want = out.len().min(BATCH);
        // SAFETY: valid CQ, array of at least `want` entries.
        let n = unsafe { ibv_poll_cq(self.as_raw(), want as i32, wcs[0].as_mut_ptr()) };
        if n < 0 {
            return Err(Error::Verbs {
                op: "ibv_poll_cq",
                errno: Errno(-n),
            });
        }
        let n = n as usize;
        if n > 0 {
            let qps = self.inner.qps.lock().unwrap_or_else(|e| e.into_inner());
            for (i, wc) in wcs[..n].iter().enumerate() {
                // SAFETY: ibv_poll_cq wrote the first n entries.
                let c = Completion::from_raw(unsafe { wc.assume_init_ref() }, self.inner.inv_flags);
                if let Some(qp) = qps.get(&c.qp_num).and_then(Weak::upgrade) {
                    qp.release(c.wr_id, c.status == WcStatus::Success, c.opcode.is_recv());
                }
                out[i] = c;
            }
        }
        Ok(n)
    }

    /// Polls one completion without blocking.
    ///
    /// # Errors
    /// As for [`poll`](Self::poll).
    pub fn poll_one(&self) -> Result<Option<Completion>> {
        let mut c = [EMPTY];
        Ok((self.poll(&mut c)? == 1).then_some(c[0]))
    }

    /// Busy-polls until at least one completion arrives or `timeout` passes; returns how many
    /// were written into `out`. Between empty polls it issues a spin-wait hint (PAUSE on
    /// x86) and, every 1024 of them, yields the CPU.
    ///
    /// # Errors
    /// `Timeout { op: "poll completion queue" }`; errors of [`poll`](Self::poll).
    pub fn poll_blocking(&self, out: &mut [Completion], timeout: Duration) -> Result<usize> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let n = self.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            // A spin-wait hint (PAUSE on x86) between empty polls, as a spin-wait should have:
            // it costs tens of cycles and hands the core to the other hardware thread, which
            // may be the one doing the work we wait for (with soft-RoCE, the rxe kernel
            // worker). QEMU's TCG also switches to another vCPU on PAUSE: without it a
            // spinning vCPU keeps the emulator until its next timer tick (~1 ms).
            std::hint::spin_loop();
            spins += 1;
            if spins % 1024 == 0 {
                if start.elapsed() > timeout {
                    return Err(Error::Timeout {
                        op: "poll completion queue",
                        after: timeout,
                    });
                }
                std::thread::yield_now();
            }
        }
    }

    /// Arms the CQ: the channel fd becomes readable on the next completion (or the next
    /// solicited one). Poll the CQ again after arming to close the race with completions that
    /// arrived before.
    ///
    /// # Errors
    /// `Verbs { op: "ibv_req_notify_cq" }`.
    pub fn arm(&self, solicited_only: bool) -> Result<()> {
        // SAFETY: valid CQ.
        let rc = unsafe { ibv_req_notify_cq(self.as_raw(), solicited_only as i32) };
        if rc != 0 {
            return Err(Error::from_ret("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Consumes the pending channel event of this CQ, if any, and acknowledges it. Call after
    /// the channel fd polled readable. Returns true if an event was consumed.
    ///
    /// # Errors
    /// `InvalidArgument` if the CQ has no channel; `Verbs { op: "ibv_get_cq_event" }`.
    pub fn take_event(&self) -> Result<bool> {
        let ch = self
            .inner
            .channel
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument {
                op: "ibv_get_cq_event",
                reason: "this CQ was created without a completion channel".into(),
            })?;
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: valid channel; non-blocking fd so this returns EAGAIN when empty.
        let rc = unsafe { ibv_get_cq_event(ch.as_raw(), &mut cq, &mut ctx) };
        if rc != 0 {
            let errno = crate::error::last_errno();
            if errno == libc::EAGAIN {
                return Ok(false);
            }
            return Err(Error::Verbs {
                op: "ibv_get_cq_event",
                errno: Errno(errno),
            });
        }
        // Acknowledge at once so destroy never waits for unacked events. (If the channel is
        // shared by several CQs the event may be for another CQ; ack that one.)
        // SAFETY: cq is the CQ the event belongs to, alive (it holds the channel).
        unsafe { ibv_ack_cq_events(cq, 1) };
        Ok(true)
    }

    /// Waits (sleeping on the channel fd) until at least one completion arrives or `timeout`
    /// passes. Returns how many were written into `out`.
    ///
    /// # Errors
    /// `Timeout { op: "wait for completion" }`; `InvalidArgument` without a channel.
    pub fn wait(&self, out: &mut [Completion], timeout: Duration) -> Result<usize> {
        self.wait_with(out, timeout, &[]).map(|(n, _)| n)
    }

    /// Like [`wait`](Self::wait), also waking when one of `extra_fds` is readable; returns
    /// (completions, which extra fds were readable). With no completion and an extra fd ready,
    /// returns (0, ready).
    pub(crate) fn wait_with(
        &self,
        out: &mut [Completion],
        timeout: Duration,
        extra_fds: &[BorrowedFd<'_>],
    ) -> Result<(usize, Vec<bool>)> {
        let fd = match &self.inner.channel {
            Some(c) => c.fd(),
            None => {
                return Err(Error::InvalidArgument {
                    op: "wait for completion",
                    reason: "this CQ was created without a completion channel; use poll_blocking"
                        .into(),
                })
            }
        };
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.poll(out)?;
            if n > 0 {
                return Ok((n, vec![false; extra_fds.len()]));
            }
            self.arm(false)?;
            let n = self.poll(out)?;
            if n > 0 {
                return Ok((n, vec![false; extra_fds.len()]));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    op: "wait for completion",
                    after: timeout,
                });
            }
            let mut fds = vec![fd.as_fd()];
            fds.extend_from_slice(extra_fds);
            let ready = wait_readable(&fds, left)?;
            if ready[0] {
                while self.take_event()? {}
            }
            if ready[1..].iter().any(|&r| r) {
                let n = self.poll(out)?;
                return Ok((n, ready[1..].to_vec()));
            }
        }
    }
}

/// A placeholder completion for initialising output arrays.
pub const EMPTY: Completion = Completion {
    wr_id: 0,
    status: WcStatus::Success,
    opcode: WcOpcode::Other(0),
    byte_len: 0,
    imm: None,
    invalidated_rkey: None,
    qp_num: 0,
    vendor_err: 0,
};
