//! One RDMA connection of the pipeline (primary -> replica or replica -> primary): the
//! connection, its CQ (on a completion channel in [`WaitMode::Events`]), and its ring of
//! posted receives for 64-byte control messages.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::protocol::{Message, MAX_PACKED, MSG_LEN};
use crate::rdma::{
    self, Access, CompletionChannel, CompletionQueue, ConnParams, ConnectRequest, Connection,
    Connector, Context, MemoryRegion, ProtectionDomain, QpCaps, QpInit, RecvRequest, SendOp,
    SendRequest,
};

use super::auth::{self, AuthError, Secret};
use super::slots::Slots;
use super::{EngineError, MessageCounts, WaitMode};

/// Receives kept posted per connection.
pub(crate) const RECV_DEPTH: usize = 256;
/// CQ entries per connection: the send queue plus the receive ring, with room to spare.
const CQ_DEPTH: u32 = 2048;
/// Work request ids: the kind in the top 4 bits, the slot / sequence / receive index below.
pub(crate) const WR_RECV: u64 = 1 << 60;
pub(crate) const WR_SEND: u64 = 2 << 60;
pub(crate) const WR_WRITE: u64 = 3 << 60;
pub(crate) const WR_BIND: u64 = 5 << 60;
pub(crate) const WR_MASK: u64 = 0xf << 60;

/// Bytes of one receive buffer: the most messages a SEND may carry.
const RECV_LEN: usize = MAX_PACKED * MSG_LEN;

/// How many messages this side packs into one inline SEND on `ctx`'s device: as many as
/// [`MAX_PACKED`] and the device's inline limit allow (at least one).
fn pack_for(ctx: &Context) -> usize {
    let inline = ctx.max_inline_data().unwrap_or(MSG_LEN as u32) as usize;
    (inline / MSG_LEN).clamp(1, MAX_PACKED)
}

fn caps(pack: usize) -> QpCaps {
    QpCaps {
        max_send_wr: 1024,
        max_recv_wr: RECV_DEPTH as u32,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: (pack * MSG_LEN) as u32,
    }
}

/// The messages a received payload carries, in order (an empty payload yields itself, so
/// that decoding it reports it as malformed; so does a tail shorter than a message).
pub(crate) fn messages(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let empty = payload.is_empty().then_some(payload);
    empty.into_iter().chain(payload.chunks(MSG_LEN))
}

fn params(timeout: Duration, private_data: Vec<u8>) -> ConnParams {
    ConnParams {
        private_data,
        // 7 = retry forever on receiver-not-ready: a peer busy writing is not an error.
        rnr_retry_count: 7,
        retry_count: 7,
        timeout,
        ..Default::default()
    }
}

/// A connection with its CQ, receive buffers and the regions of the local slots.
pub(crate) struct Link {
    // Drop order: the connection (QP) before the CQ and the regions it uses.
    pub(crate) conn: Connection,
    pub(crate) cq: CompletionQueue,
    recv: MemoryRegion,
    /// Chunk id -> region of the engine's slots, registered on this link's PD.
    pub(crate) mrs: HashMap<u32, MemoryRegion>,
    pub(crate) pd: ProtectionDomain,
    pub(crate) alive: bool,
    /// Send-queue WRs queued by one round of the engine loop, posted together by
    /// [`flush`](Link::flush): one `ibv_post_send` (one doorbell, one system call on rxe)
    /// for a block's WRITE and its `BlockSent`, or a window bind and its `BufferReady`.
    pending: RefCell<Vec<SendRequest>>,
    /// Unsignalled WRs queued since the last signalled one (see [`queue`](Link::queue)).
    unsignalled: Cell<u32>,
    /// Control messages queued since the last SEND was made of them, encoded back to back.
    msgs: RefCell<Vec<u8>>,
    /// Messages per SEND (see [`pack_for`]).
    pack: usize,
    /// Control messages queued and SENDs that carried them, since the link was made.
    counts: Cell<MessageCounts>,
}

/// At most this many unsignalled WRs in a row: their send-queue slots are freed only by a
/// later signalled completion, and a replica's read-back phase sends only messages.
const SIGNAL_EVERY: u32 = 64;

/// The PD, CQ (with a channel in events mode) and receive region for a new QP on `ctx`.
fn resources(
    ctx: &Context,
    wait: WaitMode,
) -> Result<(ProtectionDomain, CompletionQueue, MemoryRegion), EngineError> {
    let pd = ProtectionDomain::new(ctx).map_err(|e| EngineError::rdma("ibv_alloc_pd", e))?;
    let cq = match wait {
        WaitMode::Events => {
            let ch = CompletionChannel::new(ctx)
                .map_err(|e| EngineError::rdma("completion channel", e))?;
            CompletionQueue::with_channel(ctx, CQ_DEPTH, &ch)
        }
        WaitMode::BusyPoll => CompletionQueue::new(ctx, CQ_DEPTH),
    }
    .map_err(|e| EngineError::rdma("completion queue", e))?;
    let recv = MemoryRegion::alloc(
        &pd,
        RECV_DEPTH * RECV_LEN,
        Access::local_read().local_write(),
    )
    .map_err(|e| EngineError::rdma("receive buffers", e))?;
    Ok((pd, cq, recv))
}

fn recv_wr(mr: &MemoryRegion, i: usize) -> rdma::Result<RecvRequest> {
    Ok(RecvRequest::new(
        WR_RECV | i as u64,
        vec![mr.sge(i * RECV_LEN, RECV_LEN)?],
    ))
}

fn post_all_recvs(qp: &rdma::QueuePair, mr: &MemoryRegion) -> rdma::Result<()> {
    let wrs = (0..RECV_DEPTH)
        .map(|i| recv_wr(mr, i))
        .collect::<rdma::Result<Vec<_>>>()?;
    qp.post_recv(&wrs)
}

impl Link {
    /// Connects to replica `r` at `dst` from `bind`, retrying while the replica rejects (it
    /// is still starting) until `timeout`. Our slots are registered for local access only:
    /// only our own NIC reads them.
    ///
    /// # Errors
    /// [`EngineError::Connect`] (resolve/connect failures and rejections after the timeout),
    /// [`EngineError::Rdma`] for the verbs resources.
    ///
    /// With a `secret`, the replica must prove it in its accept data, and the link's first
    /// message proves it to the replica (see [`auth`]); a replica that refuses this primary
    /// (by address or for want of a proof) ends the attempt at once with
    /// [`EngineError::Refused`].
    pub(crate) fn connect(
        r: usize,
        bind: Option<IpAddr>,
        dst: SocketAddr,
        timeout: Duration,
        wait: WaitMode,
        slots: &Slots,
        secret: Option<&Secret>,
    ) -> Result<Link, EngineError> {
        let _setup = tracing::info_span!("connect", replica = r, %dst).entered();
        let give_up = Instant::now() + timeout;
        loop {
            let err = |op, source| EngineError::Connect {
                replica: r,
                addr: dst,
                op,
                source: Box::new(source),
            };
            let refused = |reason: String| EngineError::Refused {
                replica: r,
                addr: dst,
                reason,
            };
            let c = Connector::resolve(bind, dst, timeout).map_err(|e| err("resolve", e))?;
            let (pd, cq, recv) = resources(c.context(), wait)?;
            // SAFETY: the regions live in the Link, which the engine drops before its slots.
            let mrs = unsafe { slots.register(&pd, Access::local_read().local_write(), false)? };
            let pack = pack_for(c.context());
            let init = QpInit::new(&pd, &cq).caps(caps(pack));
            let nonce_p = auth::nonce()?;
            let pd_out = secret.map_or(Vec::new(), |_| auth::request(&nonce_p));
            match c.connect_with(&init, &params(timeout, pd_out), |qp| {
                post_all_recvs(qp, &recv)
            }) {
                Ok(conn) => {
                    let link = Link::established(conn, cq, recv, mrs, pd, pack);
                    if let Some(s) = secret {
                        let proof = auth::primary_proof(s, &nonce_p, link.conn.peer_private_data())
                            .map_err(|why| refused(why.to_string()))?;
                        link.queue(SendRequest::send_inline(WR_SEND, &proof));
                        link.flush()
                            .map_err(|e| EngineError::rdma("sending the proof of the secret", e))?;
                    }
                    return Ok(link);
                }
                Err(rdma::Error::Rejected { private_data, .. })
                    if auth::reject_reason(&private_data).is_some() =>
                {
                    let why = auth::reject_reason(&private_data).unwrap_or_default();
                    return Err(refused(why.to_string()));
                }
                Err(rdma::Error::Rejected { .. }) if Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(err("connect", e)),
            }
        }
    }

    /// Accepts the primary's request. The slots are registered for local access plus window
    /// binding only: the regions' own rkeys grant nothing remotely.
    ///
    /// # Errors
    /// [`EngineError::Rdma`] (verbs resources, `rdma_accept`).
    pub(crate) fn accept(
        req: ConnectRequest,
        timeout: Duration,
        wait: WaitMode,
        slots: &Slots,
        private_data: Vec<u8>,
    ) -> Result<Link, EngineError> {
        let _setup = tracing::info_span!("accept", peer = ?req.peer_addr()).entered();
        let (pd, cq, recv) = resources(req.context(), wait)?;
        // SAFETY: the regions live in the Link, which the engine drops before its slots.
        // Offset-based addresses: the windows the primary writes through name no VA of ours.
        let mrs =
            unsafe { slots.register(&pd, Access::local_read().local_write().mw_bind(), true)? };
        let pack = pack_for(req.context());
        let init = QpInit::new(&pd, &cq).caps(caps(pack));
        let conn = req
            .accept_with(&init, &params(timeout, private_data), |qp| {
                post_all_recvs(qp, &recv)
            })
            .map_err(|e| EngineError::rdma("accept", e))?;
        Ok(Link::established(conn, cq, recv, mrs, pd, pack))
    }

    /// A live link over a just-established connection, with nothing queued.
    fn established(
        conn: Connection,
        cq: CompletionQueue,
        recv: MemoryRegion,
        mrs: HashMap<u32, MemoryRegion>,
        pd: ProtectionDomain,
        pack: usize,
    ) -> Link {
        Link {
            conn,
            cq,
            recv,
            mrs,
            pd,
            alive: true,
            pending: RefCell::new(Vec::new()),
            unsignalled: Cell::new(0),
            msgs: RefCell::new(Vec::new()),
            pack,
            counts: Cell::new(MessageCounts::default()),
        }
    }

    /// Queues a work request for the next [`flush`](Self::flush). Every
    /// [`SIGNAL_EVERY`]th WR in a row of unsignalled ones is signalled.
    pub(crate) fn queue(&self, mut wr: SendRequest) {
        if wr.signaled || self.unsignalled.get() + 1 >= SIGNAL_EVERY {
            wr.signaled = true;
            self.unsignalled.set(0);
        } else {
            self.unsignalled.set(self.unsignalled.get() + 1);
        }
        self.pending.borrow_mut().push(wr);
    }

    /// Queues a control message. Messages queued before a [`flush`](Self::flush) travel
    /// packed, up to `pack` per inline SEND (unsignalled: its send-queue slot is freed by the
    /// next signalled WR's completion, as RC completes in order; a failure still produces an
    /// error completion), in the order they were queued, after the other WRs queued by
    /// then. Moving a message behind WRs queued after it only delays it: no WR depends on
    /// a message having gone first (a window's bind must precede the message naming its key,
    /// and still does).
    pub(crate) fn queue_msg(&self, m: &Message) {
        self.msgs.borrow_mut().extend_from_slice(&m.encode());
        self.count(1, 0);
    }

    fn count(&self, messages: u64, sends: u64) {
        let c = self.counts.get();
        self.counts.set(MessageCounts {
            messages: c.messages + messages,
            sends: c.sends + sends,
        });
    }

    /// Queues the messages waiting to be packed, as SENDs, behind the WRs queued so far.
    fn pack_msgs(&self) {
        let msgs = std::mem::take(&mut *self.msgs.borrow_mut());
        for chunk in msgs.chunks(self.pack * MSG_LEN) {
            self.queue(SendRequest::send_inline(WR_SEND, chunk).unsignaled());
            self.count(0, 1);
        }
    }

    /// Queues a control message alone, as an inline SEND_WITH_INV of `rkey` (the window of
    /// the peer's that the WRITE before it went through), after the messages queued before
    /// it; unsignalled like [`queue_msg`](Self::queue_msg).
    pub(crate) fn queue_msg_invalidating(&self, m: &Message, rkey: u32) {
        self.pack_msgs();
        let mut wr = SendRequest::send_inline(WR_SEND, &m.encode()).unsignaled();
        wr.op = SendOp::SendWithInv(rkey);
        self.queue(wr);
        self.count(1, 1);
    }

    /// Control messages queued and the SENDs that carried them, since the link was made.
    pub(crate) fn message_counts(&self) -> MessageCounts {
        self.counts.get()
    }

    /// Posts everything queued, in order, as one chain (the messages packed at its end).
    ///
    /// # Errors
    /// The verbs error of `ibv_post_send` (EINVAL: the QP is in the error state; ENOMEM:
    /// send queue full). WRs before the failing one were posted.
    pub(crate) fn flush(&self) -> Result<(), rdma::Error> {
        self.pack_msgs();
        let mut q = self.pending.borrow_mut();
        if q.is_empty() {
            return Ok(());
        }
        let r = self.conn.post_send(&q);
        q.clear();
        r
    }

    /// Posts a control message now (after anything queued).
    ///
    /// # Errors
    /// As for [`flush`](Self::flush).
    pub(crate) fn send(&self, m: &Message) -> Result<(), rdma::Error> {
        self.queue_msg(m);
        self.flush()
    }

    /// A received SEND's payload (`len` bytes, at most a receive buffer's): copies it out
    /// and re-posts the receive. Split it with [`messages`].
    ///
    /// # Errors
    /// The verbs error of reading the buffer or re-posting.
    pub(crate) fn take_recv(&self, wr_id: u64, len: u32) -> Result<Vec<u8>, rdma::Error> {
        let i = (wr_id & !WR_MASK) as usize;
        let mut b = vec![0u8; (len as usize).min(RECV_LEN)];
        self.recv.read_at(i * RECV_LEN, &mut b)?;
        self.conn.post_recv(&[recv_wr(&self.recv, i)?])?;
        Ok(b)
    }
}

impl Link {
    /// Waits up to `timeout` for the first received message and returns its bytes (the
    /// primary's proof of the secret, before anything else is read).
    ///
    /// # Errors
    /// [`AuthError::NoPrimaryProof`] (nothing arrived), [`AuthError::Completion`] (a failed
    /// completion) or [`AuthError::Rdma`] (a verbs error).
    pub(crate) fn first_message(&self, timeout: Duration) -> Result<[u8; MSG_LEN], AuthError> {
        let end = Instant::now() + timeout;
        // One completion at a time: what follows the proof (the hello) stays in the CQ for
        // the engine's loop.
        let mut wcs = [rdma::EMPTY_COMPLETION; 1];
        loop {
            let got = self.cq.poll(&mut wcs)?;
            for wc in &wcs[..got] {
                if wc.status != rdma::WcStatus::Success {
                    return Err(AuthError::Completion {
                        opcode: wc.opcode,
                        status: wc.status,
                    });
                }
                if wc.wr_id & WR_MASK == WR_RECV {
                    // The proof travels alone; anything else is not a proof.
                    let b = self.take_recv(wc.wr_id, wc.byte_len)?;
                    let mut m = [0u8; MSG_LEN];
                    if b.len() == MSG_LEN {
                        m.copy_from_slice(&b);
                    }
                    return Ok(m);
                }
            }
            if Instant::now() > end {
                return Err(AuthError::NoPrimaryProof(timeout));
            }
            if got == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_splits_into_whole_messages_and_a_short_tail_is_kept_to_be_refused() {
        let payload: Vec<u8> = (0..3 * MSG_LEN + 10).map(|i| i as u8).collect();
        let parts: Vec<&[u8]> = messages(&payload).collect();
        assert_eq!(parts.len(), 4);
        assert!(parts[..3].iter().all(|p| p.len() == MSG_LEN));
        assert_eq!(parts[1][0], MSG_LEN as u8);
        assert_eq!(parts[3].len(), 10);
        // An empty SEND yields one empty message, which decoding refuses.
        let empty: Vec<&[u8]> = messages(&[]).collect();
        assert_eq!(empty, vec![&[] as &[u8]]);
        assert!(Message::decode(empty[0]).is_err());
    }

    #[test]
    fn receive_buffers_hold_the_most_a_send_may_carry() {
        assert_eq!(RECV_LEN, MAX_PACKED * MSG_LEN);
        assert_eq!(caps(MAX_PACKED).max_inline_data as usize, RECV_LEN);
    }
}
