//! RC queue pairs: posting work requests (chained, one doorbell per batch) with buffer
//! ownership held until completion, and shared receive queues.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rdma_sys::*;

use crate::cm::CmId;
use crate::cq::CompletionQueue;
use crate::error::{Error, Result};
use crate::inflight::{lock, InFlight, InFlightQueue, QpShared};
use crate::mr::MemoryRegion;
use crate::mw::MemoryWindow;
use crate::pd::ProtectionDomain;
use crate::wr::{RecvRequest, SendOp, SendRequest};

/// Queue sizes of a QP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Most outstanding send work requests.
    pub max_send_wr: u32,
    /// Most outstanding receive work requests (0 with an SRQ).
    pub max_recv_wr: u32,
    /// Most SGEs per send work request.
    pub max_send_sge: u32,
    /// Most SGEs per receive work request.
    pub max_recv_sge: u32,
    /// Most bytes of inline data per send work request.
    pub max_inline_data: u32,
}

impl Default for QpCaps {
    fn default() -> QpCaps {
        QpCaps {
            max_send_wr: 64,
            max_recv_wr: 64,
            max_send_sge: 4,
            max_recv_sge: 4,
            max_inline_data: 64,
        }
    }
}

/// What a QP is made of: the PD and CQs must belong to the connection's device
/// (`Connector::context()` / `ConnectRequest::context()`).
#[derive(Clone)]
pub struct QpInit {
    /// The protection domain of the QP and of every region it posts.
    pub pd: ProtectionDomain,
    /// The CQ send completions go to.
    pub send_cq: CompletionQueue,
    /// The CQ receive completions go to (may be `send_cq`).
    pub recv_cq: CompletionQueue,
    /// Where receives come from, when shared with other QPs.
    pub srq: Option<SharedReceiveQueue>,
    /// The queue sizes asked for.
    pub caps: QpCaps,
}

impl QpInit {
    /// One CQ for both directions, default caps.
    pub fn new(pd: &ProtectionDomain, cq: &CompletionQueue) -> QpInit {
        QpInit {
            pd: pd.clone(),
            send_cq: cq.clone(),
            recv_cq: cq.clone(),
            srq: None,
            caps: QpCaps::default(),
        }
    }
    /// With these queue sizes.
    pub fn caps(mut self, caps: QpCaps) -> QpInit {
        self.caps = caps;
        self
    }
    /// Taking receives from `srq` (then `post_recv` on the QP is refused).
    pub fn srq(mut self, srq: &SharedReceiveQueue) -> QpInit {
        self.srq = Some(srq.clone());
        self
    }
    pub(crate) fn raw_attr(&self) -> ibv_qp_init_attr {
        // SAFETY: plain C struct, zero is valid for every field.
        let mut a: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        a.send_cq = self.send_cq.as_raw();
        a.recv_cq = self.recv_cq.as_raw();
        a.srq = self
            .srq
            .as_ref()
            .map_or(std::ptr::null_mut(), |s| s.as_raw());
        a.qp_type = ibv_qp_type::IBV_QPT_RC;
        a.cap.max_send_wr = self.caps.max_send_wr;
        a.cap.max_recv_wr = if self.srq.is_some() {
            0
        } else {
            self.caps.max_recv_wr
        };
        a.cap.max_send_sge = self.caps.max_send_sge;
        a.cap.max_recv_sge = if self.srq.is_some() {
            0
        } else {
            self.caps.max_recv_sge
        };
        a.cap.max_inline_data = self.caps.max_inline_data;
        a
    }
}

/// Refuses a chain that binds the same window twice. The provider builds every WQE of a
/// chain from the window's key as it is at post time, and the device checks that key
/// against the window's current one, so a second bind of the window in the same chain
/// would fail at completion (rxe: a bind error that moves the QP to the error state).
fn check_one_bind_per_window(wrs: &[SendRequest]) -> Result<()> {
    // Chains are short: compare each bind with the WRs before it rather than collect the
    // windows (no allocation on the post path).
    let bound = |w: &SendRequest| match &w.op {
        SendOp::BindWindow { window, .. } => Some(window.as_raw()),
        _ => None,
    };
    for (i, w) in wrs.iter().enumerate() {
        let Some(mw) = bound(w) else { continue };
        if wrs[..i].iter().any(|earlier| bound(earlier) == Some(mw)) {
            return Err(Error::InvalidArgument {
                op: "ibv_post_send",
                reason: "the chain binds one memory window twice: post the second bind \
                         in a later post_send, after the first"
                    .into(),
            });
        }
    }
    Ok(())
}

/// Points each WR of a filled chain at its SGEs (consecutive in `sges`, `num_sge` each) and
/// links it to the next. Returns the head to post: every pointer in the chain, and the head,
/// derive from the same two base pointers and nothing writes through the slices afterwards.
macro_rules! link_chain {
    ($sges:expr, $raw:expr) => {{
        let base = $sges.as_mut_ptr();
        let len = $raw.len();
        let head = $raw.as_mut_ptr();
        let mut at = 0usize;
        for i in 0..len {
            // SAFETY: i < len: an element of the slice `head` came from; no other reference
            // to it is used from here on.
            let r = unsafe { &mut *head.add(i) };
            let n = r.num_sge as usize;
            r.sg_list = if n == 0 {
                std::ptr::null_mut()
            } else {
                base.wrapping_add(at)
            };
            at += n;
            if i + 1 < len {
                r.next = head.wrapping_add(i + 1);
            }
        }
        head
    }};
}

/// How many WRs / SGEs a chain may have before its C structs go to the heap instead of the
/// stack. The hot paths post one to a few WRs at a time.
const STACK_CHAIN: usize = 16;

/// Runs `f` on `n` zeroed `T`s: on the stack when `n <= STACK_CHAIN`, else on the heap.
///
/// # Safety
/// `T` must be a plain C struct for which all-zero bytes are a valid value (`ibv_sge`,
/// `ibv_send_wr`, `ibv_recv_wr`).
unsafe fn with_zeroed<T, R>(n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    if n <= STACK_CHAIN {
        let mut a: [std::mem::MaybeUninit<T>; STACK_CHAIN] =
            [const { std::mem::MaybeUninit::uninit() }; STACK_CHAIN];
        for slot in &mut a[..n] {
            // SAFETY (caller): zero is a valid T.
            slot.write(unsafe { std::mem::zeroed() });
        }
        // SAFETY: the first n elements were just initialized; MaybeUninit<T> has T's layout.
        let init = unsafe { &mut *(&mut a[..n] as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
        f(init)
    } else {
        // SAFETY (caller): zero is a valid T.
        let mut v: Vec<T> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        f(&mut v)
    }
}

/// A reliable-connected queue pair (created through rdma_cm: [`crate::Connector`] /
/// [`crate::ConnectRequest`]).
///
/// Posting is thread-safe. Buffers named in a posted WR are held (by `MemoryRegion` clone)
/// until its completion is reaped from the CQ, or the QP is destroyed.
pub struct QueuePair {
    qp: *mut ibv_qp,
    shared: Arc<QpShared>,
    /// The rdma_cm id the QP was created on (and is destroyed through).
    id: Arc<CmId>,
    init: QpInit,
    caps: QpCaps,
}
// SAFETY: verbs QPs are thread-safe; the in-flight tables are behind mutexes.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // A bound type-2 window holds a reference to its QP in soft-RoCE, whose destroy then
        // waits for it (about a minute) and fails; and the binds still counted in flight here
        // hold their windows. So: stop the QP (error state: nothing queued is executed any
        // more, it is flushed), let go of those windows (a window is no buffer: releasing it
        // frees no memory the NIC could touch; a window the application still holds stays),
        // then destroy the QP.
        // SAFETY: a plain C struct; all zeroes is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
        // SAFETY: a live QP; attr is a valid attribute struct naming only the state.
        let rc =
            unsafe { ibv_modify_qp(self.qp, &mut attr, ibv_qp_attr_mask::IBV_QP_STATE.0 as i32) };
        if rc != 0 {
            tracing::debug!(errno = rc, "ibv_modify_qp(ERR) before destroy");
        }
        let windows: Vec<_> = lock(&self.shared.send)
            .iter_mut()
            .filter_map(InFlight::take_window)
            .collect();
        drop(windows);
        // SAFETY: the QP was created on this id by rdma_create_qp; destroyed once. After this
        // the NIC no longer touches the buffers of in-flight WRs, so releasing them is safe.
        unsafe { rdma_destroy_qp(self.id.as_raw()) };
        let num = self.qp_num();
        for cq in [&self.init.send_cq, &self.init.recv_cq] {
            lock(&cq.inner.qps).remove(&num);
        }
        lock(&self.shared.send).clear();
        lock(&self.shared.recv).clear();
    }
}

impl QueuePair {
    /// Creates the QP on a cm id (its device must be the PD's).
    pub(crate) fn create_on_cm(id: Arc<CmId>, init: &QpInit) -> Result<QueuePair> {
        let mut attr = init.raw_attr();
        // SAFETY: valid id and PD; attr points to live CQs/SRQ which `init` keeps alive.
        let rc = unsafe { rdma_create_qp(id.as_raw(), init.pd.as_raw(), &mut attr) };
        if rc != 0 {
            return Err(Error::from_ret("rdma_create_qp", rc));
        }
        // SAFETY: rdma_create_qp set id->qp.
        let qp = unsafe { (*id.as_raw()).qp };
        let caps = QpCaps {
            max_send_wr: attr.cap.max_send_wr,
            max_recv_wr: attr.cap.max_recv_wr,
            max_send_sge: attr.cap.max_send_sge,
            max_recv_sge: attr.cap.max_recv_sge,
            max_inline_data: attr.cap.max_inline_data,
        };
        let shared = Arc::new(QpShared::new(
            init.srq.as_ref().map(|s| s.inner.inflight.clone()),
            Arc::ptr_eq(&init.send_cq.inner, &init.recv_cq.inner),
        ));
        // SAFETY: qp valid.
        let num = unsafe { (*qp).qp_num };
        for cq in [&init.send_cq, &init.recv_cq] {
            lock(&cq.inner.qps).insert(num, Arc::downgrade(&shared));
        }
        Ok(QueuePair {
            qp,
            shared,
            id,
            init: init.clone(),
            caps,
        })
    }

    /// The raw handle (the `ibv_qp`), for verbs calls this crate does not wrap. Valid while
    /// `self` lives; do not destroy or modify its state (the connection owns that).
    pub fn as_raw(&self) -> *mut ibv_qp {
        self.qp
    }

    /// The QP number.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: qp valid while self lives.
        unsafe { (*self.qp).qp_num }
    }

    /// The capabilities the device granted (may exceed the request).
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// The protection domain the QP was created in.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.init.pd
    }
    /// The CQ send completions arrive on.
    pub fn send_cq(&self) -> &CompletionQueue {
        &self.init.send_cq
    }
    /// The CQ receive completions arrive on.
    pub fn recv_cq(&self) -> &CompletionQueue {
        &self.init.recv_cq
    }

    /// The QP's local ACK timeout exponent (a packet is resent after 4.096 us * 2^n without
    /// an ACK; 0 = never), as the device reports it.
    ///
    /// # Errors
    /// `Verbs { op: "ibv_query_qp" }`.
    pub fn ack_timeout(&self) -> Result<u8> {
        // SAFETY: plain C structs; zero is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid QP; both out-structs live across the call.
        let rc = unsafe {
            ibv_query_qp(
                self.qp,
                &mut attr,
                ibv_qp_attr_mask::IBV_QP_TIMEOUT.0 as i32,
                &mut init,
            )
        };
        if rc != 0 {
            return Err(Error::from_ret("ibv_query_qp", rc));
        }
        Ok(attr.timeout)
    }

    /// Number of posted send WRs whose buffers are still held (not yet reaped).
    pub fn send_in_flight(&self) -> usize {
        lock(&self.shared.send).len()
    }
    /// Number of posted receive WRs not yet reaped.
    pub fn recv_in_flight(&self) -> usize {
        lock(&self.shared.recv).len()
    }

    /// Posts a chain of send WRs with one `ibv_post_send` (one doorbell).
    ///
    /// On error nothing from the first failing WR on was posted (earlier ones were).
    ///
    /// # Errors
    /// * `InvalidArgument`: more SGEs than `max_send_sge`, inline data larger than
    ///   `max_inline_data`, a region from another PD.
    /// * `Verbs { op: "ibv_post_send", errno }`: ENOMEM send queue full (reap completions,
    ///   signal more often), EINVAL bad WR for the QP state (not connected / error state).
    pub fn post_send(&self, wrs: &[SendRequest]) -> Result<()> {
        if wrs.is_empty() {
            return Ok(());
        }
        for w in wrs {
            self.check_send(w)?;
        }
        check_one_bind_per_window(wrs)?;
        let nsge: usize = wrs
            .iter()
            .map(|w| if w.inline.is_some() { 1 } else { w.sges.len() })
            .sum();
        // SAFETY: ibv_sge and ibv_send_wr are plain C structs; zero is valid.
        unsafe {
            with_zeroed(nsge, |sges: &mut [ibv_sge]| {
                with_zeroed(wrs.len(), |raw: &mut [ibv_send_wr]| {
                    self.post_send_chain(wrs, sges, raw)
                })
            })
        }
    }

    /// Fills `sges` and `raw` (zeroed, sized for `wrs`) from `wrs`, records what each WR
    /// holds and posts the chain.
    fn post_send_chain(
        &self,
        wrs: &[SendRequest],
        sges: &mut [ibv_sge],
        raw: &mut [ibv_send_wr],
    ) -> Result<()> {
        let mut binds: Vec<(usize, MemoryWindow, u32)> = Vec::new();
        let mut q = lock(&self.shared.send);
        let before = q.len();
        let mut sge_at = 0usize;
        for (i, w) in wrs.iter().enumerate() {
            let first = sge_at;
            if let Some(data) = &w.inline {
                sges[sge_at] = ibv_sge {
                    addr: data.as_ptr() as u64,
                    length: data.len() as u32,
                    lkey: 0,
                };
                sge_at += 1;
            } else {
                for s in &w.sges {
                    sges[sge_at] = s.raw();
                    sge_at += 1;
                }
            }
            let n = sge_at - first;
            let r = &mut raw[i];
            r.wr_id = w.wr_id;
            r.num_sge = n as i32;
            let mut flags = 0u32;
            if w.signaled {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            if w.fence {
                flags |= ibv_send_flags::IBV_SEND_FENCE.0;
            }
            if w.solicited {
                flags |= ibv_send_flags::IBV_SEND_SOLICITED.0;
            }
            if w.inline.is_some() {
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
            }
            r.send_flags = flags;
            let mut window = None;
            let mut bound_mr = None;
            match &w.op {
                SendOp::Send => r.opcode = ibv_wr_opcode::IBV_WR_SEND,
                SendOp::SendWithImm(imm) => {
                    r.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
                    r.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                }
                SendOp::SendWithInv(rkey) => {
                    r.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_INV;
                    r.imm_data_invalidated_rkey_union.invalidated_rkey = *rkey;
                }
                SendOp::Write(rb) => {
                    r.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                    r.wr.rdma = rdma_t {
                        remote_addr: rb.addr,
                        rkey: rb.rkey,
                    };
                }
                SendOp::WriteWithImm(rb, imm) => {
                    r.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                    r.wr.rdma = rdma_t {
                        remote_addr: rb.addr,
                        rkey: rb.rkey,
                    };
                    r.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                }
                SendOp::Read(rb) => {
                    r.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
                    r.wr.rdma = rdma_t {
                        remote_addr: rb.addr,
                        rkey: rb.rkey,
                    };
                }
                SendOp::LocalInv(rkey) => {
                    r.opcode = ibv_wr_opcode::IBV_WR_LOCAL_INV;
                    r.imm_data_invalidated_rkey_union.invalidated_rkey = *rkey;
                }
                SendOp::BindWindow {
                    window: mw,
                    mr,
                    offset,
                    len,
                    access,
                } => {
                    r.opcode = ibv_wr_opcode::IBV_WR_BIND_MW;
                    let (_, next) = mw.next_rkey();
                    r.bind_mw_tso_union.bind_mw = bind_mw_t {
                        mw: mw.as_raw(),
                        rkey: next,
                        bind_info: ibv_mw_bind_info {
                            mr: mr.as_raw(),
                            addr: mr.iova() + offset,
                            length: *len,
                            mw_access_flags: access.bits(),
                        },
                    };
                    binds.push((i, mw.clone(), next));
                    window = Some(mw.clone());
                    bound_mr = Some(mr);
                }
            }
            q.push_back(InFlight::new(
                w.wr_id,
                w.signaled,
                w.sges.iter().map(|s| &s.mr).chain(bound_mr),
                window,
            ));
        }
        let head = link_chain!(sges, raw);
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the chain, its SGLs and inline data live until the call returns; the
        // memory the SGEs name is kept alive by the in-flight entries just recorded.
        let rc = unsafe { ibv_post_send(self.qp, head, &mut bad) };
        if rc != 0 {
            let posted = if bad.is_null() {
                0
            } else {
                // SAFETY: bad points into the chain starting at `head`.
                unsafe { bad.offset_from(head) as usize }
            };
            q.truncate(before + posted);
            // binds before the failing WR were posted: their windows now have the new key
            for (_, mw, key) in binds.into_iter().filter(|b| b.0 < posted) {
                mw.set_rkey(key);
            }
            return Err(Error::from_ret("ibv_post_send", rc));
        }
        drop(q);
        for (_, mw, key) in binds {
            mw.set_rkey(key);
        }
        Ok(())
    }

    fn check_send(&self, w: &SendRequest) -> Result<()> {
        if let Some(d) = &w.inline {
            if d.len() > self.caps.max_inline_data as usize {
                return Err(Error::InvalidArgument {
                    op: "ibv_post_send",
                    reason: format!(
                        "{} bytes inline exceed this QP's max_inline_data {}",
                        d.len(),
                        self.caps.max_inline_data
                    ),
                });
            }
            if matches!(w.op, SendOp::Read(_)) {
                return Err(Error::InvalidArgument {
                    op: "ibv_post_send",
                    reason: "RDMA READ cannot be inline".into(),
                });
            }
        } else if w.sges.len() > self.caps.max_send_sge as usize {
            return Err(Error::InvalidArgument {
                op: "ibv_post_send",
                reason: format!(
                    "{} SGEs exceed max_send_sge {}",
                    w.sges.len(),
                    self.caps.max_send_sge
                ),
            });
        }
        self.check_pd(w.sges.iter().map(|s| &s.mr))
    }

    fn check_pd<'a>(&self, mrs: impl Iterator<Item = &'a MemoryRegion>) -> Result<()> {
        for mr in mrs {
            if !Arc::ptr_eq(&mr.pd().inner, &self.init.pd.inner) {
                return Err(Error::InvalidArgument {
                    op: "post work request",
                    reason: "a memory region belongs to another protection domain".into(),
                });
            }
        }
        Ok(())
    }

    /// Posts a chain of receive WRs with one `ibv_post_recv`.
    ///
    /// # Errors
    /// `InvalidArgument` if the QP uses an SRQ (post there) or too many SGEs;
    /// `Verbs { op: "ibv_post_recv" }`: ENOMEM receive queue full.
    pub fn post_recv(&self, wrs: &[RecvRequest]) -> Result<()> {
        if self.init.srq.is_some() {
            return Err(Error::InvalidArgument {
                op: "ibv_post_recv",
                reason: "this QP takes receives from its shared receive queue".into(),
            });
        }
        for w in wrs {
            if w.sges.len() > self.caps.max_recv_sge as usize {
                return Err(Error::InvalidArgument {
                    op: "ibv_post_recv",
                    reason: format!(
                        "{} SGEs exceed max_recv_sge {}",
                        w.sges.len(),
                        self.caps.max_recv_sge
                    ),
                });
            }
            self.check_pd(w.sges.iter().map(|s| &s.mr))?;
        }
        post_recv_chain(
            wrs,
            &self.shared.recv,
            |wr, bad| {
                // SAFETY: valid QP; chain valid for the call.
                unsafe { ibv_post_recv(self.qp, wr, bad) }
            },
            "ibv_post_recv",
        )
    }
}

fn post_recv_chain(
    wrs: &[RecvRequest],
    table: &InFlightQueue,
    post: impl FnOnce(*mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> i32,
    op: &'static str,
) -> Result<()> {
    if wrs.is_empty() {
        return Ok(());
    }
    let nsge: usize = wrs.iter().map(|w| w.sges.len()).sum();
    let chain = |sges: &mut [ibv_sge], raw: &mut [ibv_recv_wr]| -> Result<()> {
        let mut at = 0;
        for (i, w) in wrs.iter().enumerate() {
            raw[i].wr_id = w.wr_id;
            raw[i].num_sge = w.sges.len() as i32;
            for s in &w.sges {
                sges[at] = s.raw();
                at += 1;
            }
        }
        let head = link_chain!(sges, raw);
        let mut q = lock(table);
        let before = q.len();
        q.extend(
            wrs.iter()
                .map(|w| InFlight::new(w.wr_id, true, w.sges.iter().map(|s| &s.mr), None)),
        );
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        let rc = post(head, &mut bad);
        if rc != 0 {
            let posted = if bad.is_null() {
                0
            } else {
                // SAFETY: bad points into the chain starting at `head`.
                unsafe { bad.offset_from(head) as usize }
            };
            q.truncate(before + posted);
            return Err(Error::from_ret(op, rc));
        }
        Ok(())
    };
    // SAFETY: ibv_sge and ibv_recv_wr are plain C structs; zero is valid.
    unsafe { with_zeroed(nsge, |sges| with_zeroed(wrs.len(), |raw| chain(sges, raw))) }
}

/// A shared receive queue: one pool of receive buffers for many QPs. Cheap to clone.
#[derive(Clone)]
pub struct SharedReceiveQueue {
    pub(crate) inner: Arc<SrqInner>,
}

pub(crate) struct SrqInner {
    srq: *mut ibv_srq,
    /// Shared with the QPs using this SRQ, whose CQs release receives from it.
    pub(crate) inflight: Arc<InFlightQueue>,
    pd: ProtectionDomain,
    max_sge: u32,
}
// SAFETY: verbs SRQs are thread-safe; the table is behind a mutex.
unsafe impl Send for SrqInner {}
// SAFETY: as above.
unsafe impl Sync for SrqInner {}

impl Drop for SrqInner {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_srq, destroyed once; QPs using it hold an Arc.
        let rc = unsafe { ibv_destroy_srq(self.srq) };
        if rc != 0 {
            tracing::warn!(errno = rc, "ibv_destroy_srq failed");
        }
        lock(&self.inflight).clear();
    }
}

impl SharedReceiveQueue {
    /// Creates an SRQ holding up to `max_wr` receives of up to `max_sge` entries.
    ///
    /// # Errors
    /// `Verbs { op: "ibv_create_srq" }`: EINVAL beyond the device's max_srq_wr / max_sge.
    pub fn new(pd: &ProtectionDomain, max_wr: u32, max_sge: u32) -> Result<SharedReceiveQueue> {
        // SAFETY: plain C struct.
        let mut attr: ibv_srq_init_attr = unsafe { std::mem::zeroed() };
        attr.attr.max_wr = max_wr;
        attr.attr.max_sge = max_sge;
        // SAFETY: valid PD and attr.
        let srq = unsafe { ibv_create_srq(pd.as_raw(), &mut attr) };
        if srq.is_null() {
            return Err(Error::last_os("ibv_create_srq"));
        }
        Ok(SharedReceiveQueue {
            inner: Arc::new(SrqInner {
                srq,
                inflight: Arc::new(Mutex::new(VecDeque::new())),
                pd: pd.clone(),
                max_sge,
            }),
        })
    }

    /// The raw handle (the `ibv_srq`), for verbs calls this crate does not wrap. Valid while
    /// `self` (or a clone) lives; do not destroy it.
    pub fn as_raw(&self) -> *mut ibv_srq {
        self.inner.srq
    }

    /// Receives posted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.inflight).len()
    }

    /// Posts receives (one doorbell).
    ///
    /// # Errors
    /// `InvalidArgument` for too many SGEs or a region of another PD;
    /// `Verbs { op: "ibv_post_srq_recv" }`: ENOMEM queue full.
    pub fn post_recv(&self, wrs: &[RecvRequest]) -> Result<()> {
        for w in wrs {
            if w.sges.len() > self.inner.max_sge as usize {
                return Err(Error::InvalidArgument {
                    op: "ibv_post_srq_recv",
                    reason: format!(
                        "{} SGEs exceed the SRQ's max_sge {}",
                        w.sges.len(),
                        self.inner.max_sge
                    ),
                });
            }
            if w.sges
                .iter()
                .any(|s| !Arc::ptr_eq(&s.mr.pd().inner, &self.inner.pd.inner))
            {
                return Err(Error::InvalidArgument {
                    op: "ibv_post_srq_recv",
                    reason: "a memory region belongs to another protection domain".into(),
                });
            }
        }
        post_recv_chain(
            wrs,
            &self.inner.inflight,
            |wr, bad| {
                // SAFETY: valid SRQ; chain valid for the call.
                unsafe { ibv_post_srq_recv(self.inner.srq, wr, bad) }
            },
            "ibv_post_srq_recv",
        )
    }
}
