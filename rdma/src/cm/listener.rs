//! The server side: a listening id, and the connection requests it yields (accept or reject).

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use rdma_sys::*;

use super::connection::Connection;
use super::event::{expect, CmEventKind, EventChannel};
use super::id::{to_sockaddr, CmId};
use super::params::{prepared_qp, raw_conn_param, set_ack_timeout, ConnParams};
use crate::device::Context;
use crate::error::{Error, Result};
use crate::qp::{QpInit, QueuePair};

/// A listening rdma_cm id.
pub struct Listener {
    id: Arc<CmId>,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port) and listens.
    ///
    /// # Errors
    /// `Verbs { op: "rdma_bind_addr" }`: EADDRINUSE, EADDRNOTAVAIL (no such local address);
    /// `Verbs { op: "rdma_listen" }`.
    pub fn bind(addr: SocketAddr, backlog: i32) -> Result<Listener> {
        let ch = EventChannel::new()?;
        let id = CmId::create(ch)?;
        let mut sa = to_sockaddr(addr);
        // SAFETY: valid id and sockaddr.
        if unsafe { rdma_bind_addr(id.as_raw(), (&mut sa as *mut libc::sockaddr_storage).cast()) }
            != 0
        {
            return Err(Error::last_os("rdma_bind_addr"));
        }
        // SAFETY: valid bound id.
        if unsafe { rdma_listen(id.as_raw(), backlog) } != 0 {
            return Err(Error::last_os("rdma_listen"));
        }
        Ok(Listener { id })
    }

    /// The bound address (with the chosen port).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.id.local_addr()
    }

    /// The fd that becomes readable when a connect request (or other listener event) is
    /// queued (non-blocking; the same as [`AsFd::as_fd`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.id.channel.as_fd()
    }

    /// The listening `rdma_cm_id`, for librdmacm calls this crate does not wrap; valid while
    /// `self` lives.
    pub fn as_raw(&self) -> *mut rdma_cm_id {
        self.id.as_raw()
    }

    /// Waits up to `timeout` for a connection request.
    ///
    /// # Errors
    /// `Timeout`; `DeviceRemoved`; `Cm` for unexpected listener events.
    pub fn get_request(&self, timeout: Duration) -> Result<ConnectRequest> {
        let ev = self.id.channel.next("wait for connect request", timeout)?;
        let ev = expect("wait for connect request", ev, CmEventKind::ConnectRequest)?;
        // Give the new id its own channel so its events don't mix with the listener's.
        let ch = EventChannel::new()?;
        // SAFETY: ev.id is the new child id; all its events so far were acked.
        if unsafe { rdma_migrate_id(ev.id as *mut rdma_cm_id, ch.as_raw()) } != 0 {
            let e = Error::last_os("rdma_migrate_id");
            // SAFETY: we own the child id and destroy it once.
            unsafe { rdma_reject(ev.id as *mut rdma_cm_id, std::ptr::null(), 0) };
            // SAFETY: as above.
            unsafe { rdma_destroy_id(ev.id as *mut rdma_cm_id) };
            return Err(e);
        }
        // SAFETY: the child id is ours alone, now on `ch`, its events so far acknowledged.
        let id = unsafe { CmId::from_raw(ev.id as *mut rdma_cm_id, ch) };
        let ctx = id.context()?;
        Ok(ConnectRequest {
            id,
            ctx,
            private_data: ev.private_data,
            // The CM reports a request from the receiver's side (ib_cm swaps the REQ's two
            // fields): `initiator_depth` is the READs the peer will answer for us (its
            // responder resources), `responder_resources` the READs it wants to issue.
            peer_responder_resources: ev.initiator_depth,
            peer_initiator_depth: ev.responder_resources,
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

/// A pending connection request: accept or reject it (dropping it rejects).
pub struct ConnectRequest {
    id: Arc<CmId>,
    ctx: Context,
    private_data: Vec<u8>,
    peer_responder_resources: u8,
    peer_initiator_depth: u8,
}

impl ConnectRequest {
    /// The device the request arrived on: create the PD, CQs and MRs on it.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
    /// The private data the client sent (possibly zero-padded by the transport).
    pub fn private_data(&self) -> &[u8] {
        &self.private_data
    }
    /// RDMA READs the client lets us have outstanding against it (its responder
    /// resources); [`accept`](Self::accept) limits our initiator depth to this.
    pub fn peer_responder_resources(&self) -> u8 {
        self.peer_responder_resources
    }
    /// The request's `rdma_cm_id`, for librdmacm calls this crate does not wrap; valid
    /// while `self` lives.
    pub fn as_raw(&self) -> *mut rdma_cm_id {
        self.id.as_raw()
    }
    /// The client's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.id.peer_addr()
    }

    /// Creates the QP, accepts, and waits up to `params.timeout` for the connection to be
    /// established. Responder resources / initiator depth are matched to the client's.
    ///
    /// # Errors
    /// `Timeout`, `Disconnected`, `InvalidArgument` (PD/CQ of another device, private data over
    /// 196 bytes, `ack_timeout` over 31), `Verbs { op: "rdma_create_qp" |
    /// "rdma_set_option(ACK_TIMEOUT)" | "rdma_accept" }`.
    pub fn accept(self, init: &QpInit, params: &ConnParams) -> Result<Connection> {
        self.accept_with(init, params, |_| Ok(()))
    }

    /// Like [`accept`](Self::accept), running `prepare` on the new QP before accepting (post
    /// receives there so the client's first SEND finds one).
    ///
    /// # Errors
    /// As for `accept`, plus whatever `prepare` returns.
    pub fn accept_with(
        self,
        init: &QpInit,
        params: &ConnParams,
        prepare: impl FnOnce(&QueuePair) -> Result<()>,
    ) -> Result<Connection> {
        let qp = prepared_qp(&self.id, &self.ctx, init, prepare)?;
        set_ack_timeout(self.id.as_raw(), params)?;
        let mut p = params.clone();
        p.responder_resources = p.responder_resources.min(self.peer_initiator_depth);
        p.initiator_depth = p.initiator_depth.min(self.peer_responder_resources);
        let mut cp = raw_conn_param(&p, &self.ctx, 196)?;
        // SAFETY: valid id with a QP; cp lives across the call.
        if unsafe { rdma_accept(self.id.as_raw(), &mut cp) } != 0 {
            return Err(Error::last_os("rdma_accept"));
        }
        let ev = self.id.channel.next("accept", params.timeout)?;
        expect("accept", ev, CmEventKind::Established)?;
        let pd = self.private_data.clone();
        let ctx = self.ctx.clone();
        let id = self.disarm();
        Ok(Connection::new(qp, id, ctx, pd))
    }

    /// Rejects with optional private data (at most 148 bytes).
    ///
    /// # Errors
    /// `Verbs { op: "rdma_reject" }`.
    pub fn reject(self, private_data: &[u8]) -> Result<()> {
        let len = private_data.len().min(148);
        // SAFETY: valid id; data lives across the call.
        let rc = unsafe { rdma_reject(self.id.as_raw(), private_data.as_ptr().cast(), len as u8) };
        let _ = self.disarm();
        if rc != 0 {
            return Err(Error::last_os("rdma_reject"));
        }
        Ok(())
    }

    /// Marks the request handled so Drop does not reject it.
    fn disarm(self) -> Arc<CmId> {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: fields read once out of a ManuallyDrop that is never used again.
        unsafe {
            drop(std::ptr::read(&me.ctx));
            drop(std::ptr::read(&me.private_data));
            std::ptr::read(&me.id)
        }
    }
}

impl Drop for ConnectRequest {
    fn drop(&mut self) {
        // SAFETY: valid id not yet accepted.
        if unsafe { rdma_reject(self.id.as_raw(), std::ptr::null(), 0) } != 0 {
            tracing::debug!(
                errno = crate::error::last_errno(),
                "rdma_reject on drop failed"
            );
        }
    }
}
