//! The client side: resolve address and route, then connect.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys::*;

use super::connection::Connection;
use super::event::{expect, CmEventKind, EventChannel};
use super::id::{ms, to_sockaddr, CmId};
use super::params::{prepared_qp, raw_conn_param, set_ack_timeout, ConnParams};
use crate::device::Context;
use crate::error::{Error, Result};
use crate::qp::{QpInit, QueuePair};

/// Client side, after address and route resolution: create the PD/CQs on
/// [`context`](Self::context), then [`connect`](Self::connect).
pub struct Connector {
    id: Arc<CmId>,
    ctx: Context,
}

impl Connector {
    /// Resolves `dst` (binding the source address `src`, which picks the local device) and
    /// the route, each within `timeout`.
    ///
    /// # Errors
    /// `Cm { event: "ADDR_ERROR" | "ROUTE_ERROR", .. }`, `Timeout`, `Verbs { op:
    /// "rdma_resolve_addr" }` (EADDRNOTAVAIL: `src` is not a local address with an RDMA device).
    pub fn resolve(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Result<Connector> {
        let deadline = Instant::now() + timeout;
        loop {
            // The kernel only re-checks an unresolved neighbour when a resolve attempt times
            // out, so resolve in short attempts (as rping does with 2 s) until the deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.min(Duration::from_millis(1000));
            match Self::resolve_once(src, dst, attempt) {
                Err(Error::Cm {
                    event: "ADDR_ERROR",
                    status,
                    ..
                }) if status == -libc::ETIMEDOUT && Instant::now() + attempt / 2 < deadline => {
                    continue
                }
                other => return other,
            }
        }
    }

    fn resolve_once(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> Result<Connector> {
        let ch = EventChannel::new()?;
        let id = CmId::create(ch)?;
        let mut dsts = to_sockaddr(dst);
        let mut srcs = src.map(|ip| to_sockaddr(SocketAddr::new(ip, 0)));
        let srcp = srcs.as_mut().map_or(std::ptr::null_mut(), |s| {
            (s as *mut libc::sockaddr_storage).cast()
        });
        // SAFETY: valid id; sockaddrs live across the call.
        let rc = unsafe {
            rdma_resolve_addr(
                id.as_raw(),
                srcp,
                (&mut dsts as *mut libc::sockaddr_storage).cast(),
                ms(timeout),
            )
        };
        if rc != 0 {
            return Err(Error::last_os("rdma_resolve_addr"));
        }
        let ev = id
            .channel
            .next("resolve address", timeout + Duration::from_millis(500))?;
        expect("resolve address", ev, CmEventKind::AddrResolved)?;
        // SAFETY: valid id.
        let rc =
            unsafe { rdma_resolve_route(id.as_raw(), ms(timeout.max(Duration::from_secs(2)))) };
        if rc != 0 {
            return Err(Error::last_os("rdma_resolve_route"));
        }
        let ev = id.channel.next(
            "resolve route",
            timeout.max(Duration::from_secs(2)) + Duration::from_millis(500),
        )?;
        expect("resolve route", ev, CmEventKind::RouteResolved)?;
        let ctx = id.context()?;
        Ok(Connector { id, ctx })
    }

    /// The device the route goes through: create the PD, CQs and MRs on it.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The resolved `rdma_cm_id`, for librdmacm calls this crate does not wrap; valid while
    /// `self` lives.
    pub fn as_raw(&self) -> *mut rdma_cm_id {
        self.id.as_raw()
    }

    /// Creates the QP and connects, waiting up to `params.timeout` for the peer's answer.
    ///
    /// # Errors
    /// `Rejected` (with the peer's private data), `Cm { event: "UNREACHABLE" | "CONNECT_ERROR" }`,
    /// `Timeout`, `InvalidArgument` (PD/CQ of another device, private data over 56 bytes,
    /// `ack_timeout` over 31), `Verbs { op: "rdma_create_qp" | "rdma_set_option(ACK_TIMEOUT)" |
    /// "rdma_connect" }`.
    pub fn connect(self, init: &QpInit, params: &ConnParams) -> Result<Connection> {
        self.connect_with(init, params, |_| Ok(()))
    }

    /// Like [`connect`](Self::connect), running `prepare` on the new QP before the connect
    /// request goes out (post receives there so the peer's first SEND finds one).
    ///
    /// # Errors
    /// As for `connect`, plus whatever `prepare` returns.
    pub fn connect_with(
        self,
        init: &QpInit,
        params: &ConnParams,
        prepare: impl FnOnce(&QueuePair) -> Result<()>,
    ) -> Result<Connection> {
        let qp = prepared_qp(&self.id, &self.ctx, init, prepare)?;
        set_ack_timeout(self.id.as_raw(), params)?;
        let mut cp = raw_conn_param(params, &self.ctx, 56)?;
        // SAFETY: valid id with a QP; cp and its private data live across the call.
        let rc = unsafe { rdma_connect(self.id.as_raw(), &mut cp) };
        if rc != 0 {
            return Err(Error::last_os("rdma_connect"));
        }
        let ev = self.id.channel.next("connect", params.timeout)?;
        let ev = expect("connect", ev, CmEventKind::Established)?;
        Ok(Connection::new(qp, self.id, self.ctx, ev.private_data))
    }
}
