//! Connection setup with rdma_cm: listener/acceptor, connector, private data, timeouts,
//! disconnect, and the CM event stream.
//!
//! Every connection id gets its own event channel (a non-blocking fd), so a connection's
//! events (disconnected, device removal, timewait exit) can be watched without a shared
//! dispatcher, and every wait has a timeout.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdma_sys::*;

use crate::cq::{wait_readable, Completion, CompletionQueue};
use crate::device::Context;
use crate::error::{Error, Result};
use crate::qp::{QpInit, QueuePair};

/// Kind of an rdma_cm event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmEventKind {
    AddrResolved,
    AddrError,
    RouteResolved,
    RouteError,
    ConnectRequest,
    ConnectResponse,
    ConnectError,
    Unreachable,
    Rejected,
    Established,
    Disconnected,
    DeviceRemoval,
    MulticastJoin,
    MulticastError,
    AddrChange,
    TimewaitExit,
    Other(u32),
}

impl CmEventKind {
    pub fn from_raw(v: u32) -> CmEventKind {
        use CmEventKind::*;
        match v {
            0 => AddrResolved,
            1 => AddrError,
            2 => RouteResolved,
            3 => RouteError,
            4 => ConnectRequest,
            5 => ConnectResponse,
            6 => ConnectError,
            7 => Unreachable,
            8 => Rejected,
            9 => Established,
            10 => Disconnected,
            11 => DeviceRemoval,
            12 => MulticastJoin,
            13 => MulticastError,
            14 => AddrChange,
            15 => TimewaitExit,
            o => Other(o),
        }
    }
    /// Upper-case name as rdma_event_str prints it, without the prefix.
    pub fn name(self) -> &'static str {
        use CmEventKind::*;
        match self {
            AddrResolved => "ADDR_RESOLVED",
            AddrError => "ADDR_ERROR",
            RouteResolved => "ROUTE_RESOLVED",
            RouteError => "ROUTE_ERROR",
            ConnectRequest => "CONNECT_REQUEST",
            ConnectResponse => "CONNECT_RESPONSE",
            ConnectError => "CONNECT_ERROR",
            Unreachable => "UNREACHABLE",
            Rejected => "REJECTED",
            Established => "ESTABLISHED",
            Disconnected => "DISCONNECTED",
            DeviceRemoval => "DEVICE_REMOVAL",
            MulticastJoin => "MULTICAST_JOIN",
            MulticastError => "MULTICAST_ERROR",
            AddrChange => "ADDR_CHANGE",
            TimewaitExit => "TIMEWAIT_EXIT",
            Other(_) => "UNKNOWN",
        }
    }
}

/// One CM event (already acknowledged; the data is copied out).
#[derive(Debug, Clone)]
pub struct CmEvent {
    pub kind: CmEventKind,
    /// Event status (negative errno for errors, reject reason for REJECTED).
    pub status: i32,
    pub private_data: Vec<u8>,
    /// The peer's requested responder_resources / initiator_depth (connect request/response).
    pub responder_resources: u8,
    pub initiator_depth: u8,
    /// The id the event is for (address; only used inside the crate).
    id: usize,
}

pub(crate) struct EventChannel {
    ch: *mut rdma_event_channel,
}
// SAFETY: an rdma_event_channel is an fd; librdmacm calls on it are thread-safe.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: created by rdma_create_event_channel; every id on it is destroyed (ids hold
        // an Arc to the channel).
        unsafe { rdma_destroy_event_channel(self.ch) };
    }
}

impl EventChannel {
    fn new() -> Result<Arc<EventChannel>> {
        // SAFETY: plain constructor.
        let ch = unsafe { rdma_create_event_channel() };
        if ch.is_null() {
            return Err(Error::last_os("rdma_create_event_channel"));
        }
        let c = EventChannel { ch };
        crate::cq::set_nonblocking(c.fd())?;
        Ok(Arc::new(c))
    }

    fn fd(&self) -> RawFd {
        // SAFETY: valid channel.
        unsafe { (*self.ch).fd }
    }

    /// Next event if one is queued (non-blocking).
    fn try_next(&self) -> Result<Option<CmEvent>> {
        let mut ev: *mut rdma_cm_event = std::ptr::null_mut();
        // SAFETY: valid channel; non-blocking fd.
        let rc = unsafe { rdma_get_cm_event(self.ch, &mut ev) };
        if rc != 0 {
            let errno = crate::error::last_errno();
            if errno == libc::EAGAIN || errno == libc::EWOULDBLOCK {
                return Ok(None);
            }
            return Err(Error::Verbs {
                op: "rdma_get_cm_event",
                errno,
            });
        }
        // SAFETY: ev is a valid event until acked; copy everything we need first.
        let out = unsafe {
            let e = &*ev;
            let conn = &e.param.conn;
            let pd = if conn.private_data.is_null() || conn.private_data_len == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(
                    conn.private_data.cast::<u8>(),
                    conn.private_data_len as usize,
                )
                .to_vec()
            };
            CmEvent {
                kind: CmEventKind::from_raw(e.event),
                status: e.status,
                private_data: pd,
                responder_resources: conn.responder_resources,
                initiator_depth: conn.initiator_depth,
                id: e.id as usize,
            }
        };
        // SAFETY: acked exactly once.
        unsafe { rdma_ack_cm_event(ev) };
        Ok(Some(out))
    }

    /// Waits up to `timeout` for the next event.
    fn next(&self, op: &'static str, timeout: Duration) -> Result<CmEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_next()? {
                return Ok(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout { op, after: timeout });
            }
            wait_readable(&[self.fd()], left)?;
        }
    }
}

/// An rdma_cm id and the channel its events arrive on.
pub(crate) struct CmIdInner {
    id: *mut rdma_cm_id,
    channel: Arc<EventChannel>,
}
// SAFETY: librdmacm ids may be used from any thread.
unsafe impl Send for CmIdInner {}
// SAFETY: as above.
unsafe impl Sync for CmIdInner {}

impl Drop for CmIdInner {
    fn drop(&mut self) {
        // SAFETY: every event of this id was acked when read; the QP (if any) was destroyed
        // first because the QueuePair holds an Arc to us.
        let rc = unsafe { rdma_destroy_id(self.id) };
        if rc != 0 {
            tracing::warn!(errno = crate::error::last_errno(), "rdma_destroy_id failed");
        }
    }
}

impl CmIdInner {
    fn create(channel: Arc<EventChannel>) -> Result<Arc<CmIdInner>> {
        let mut id: *mut rdma_cm_id = std::ptr::null_mut();
        // SAFETY: valid channel and out pointer.
        let rc = unsafe {
            rdma_create_id(
                channel.ch,
                &mut id,
                std::ptr::null_mut(),
                rdma_port_space::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            return Err(Error::last_os("rdma_create_id"));
        }
        Ok(Arc::new(CmIdInner { id, channel }))
    }
    pub(crate) fn raw(&self) -> *mut rdma_cm_id {
        self.id
    }
    fn context(&self) -> Result<Context> {
        // SAFETY: valid id.
        let verbs = unsafe { (*self.id).verbs };
        if verbs.is_null() {
            return Err(Error::InvalidArgument {
                op: "rdma_cm",
                reason: "id not bound to a device yet".into(),
            });
        }
        Context::from_cm_verbs(verbs)
    }
}

fn to_sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: zeroed sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    ss
}

fn from_sockaddr(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: sa points to a sockaddr of the family it announces.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let s = &*(sa as *const libc::sockaddr_in);
                Some(SocketAddr::new(
                    IpAddr::from(s.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(s.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let s = &*(sa as *const libc::sockaddr_in6);
                Some(SocketAddr::new(
                    IpAddr::from(s.sin6_addr.s6_addr),
                    u16::from_be(s.sin6_port),
                ))
            }
            _ => None,
        }
    }
}

fn ms(d: Duration) -> i32 {
    d.as_millis().clamp(1, i32::MAX as u128) as i32
}

/// Checks an event is the expected one; maps error events to typed errors.
fn expect(op: &'static str, ev: CmEvent, want: CmEventKind) -> Result<CmEvent> {
    if ev.kind == want {
        return Ok(ev);
    }
    Err(match ev.kind {
        CmEventKind::Rejected => Error::Rejected {
            status: ev.status,
            private_data: ev.private_data,
        },
        CmEventKind::Disconnected => Error::Disconnected { op },
        CmEventKind::DeviceRemoval => Error::DeviceRemoved { op },
        other => Error::Cm {
            op,
            event: other.name(),
            status: ev.status,
        },
    })
}

/// Connection parameters (both sides).
#[derive(Debug, Clone)]
pub struct ConnParams {
    /// Sent to the peer in the connect request / accept reply (at most 56 / 196 bytes).
    pub private_data: Vec<u8>,
    /// Outstanding RDMA READs the peer may have against us / we may have against it.
    /// Clamped to the device limits.
    pub responder_resources: u8,
    pub initiator_depth: u8,
    /// Transport retries before a send fails with `RetryExceeded` (0..7).
    pub retry_count: u8,
    /// Receiver-not-ready retries (7 = infinite).
    pub rnr_retry_count: u8,
    /// Timeout for each phase: address resolution, route resolution, connect/accept.
    pub timeout: Duration,
    /// Local ACK timeout of the QP as the verbs exponent (0..=31): a packet not acknowledged
    /// within 4.096 us * 2^n is retransmitted. `None` keeps rdma_cm's default, which on RoCE
    /// is 17 (about 0.5 s, from a packet lifetime of 16), so one lost packet stalls the QP
    /// that long. perftest sets 14 (67 ms). Lower values recover faster from loss but give up
    /// sooner on a slow peer (`retry_count` times this).
    pub ack_timeout: Option<u8>,
}

impl Default for ConnParams {
    fn default() -> ConnParams {
        ConnParams {
            private_data: Vec::new(),
            responder_resources: 16,
            initiator_depth: 16,
            retry_count: 7,
            rnr_retry_count: 7,
            timeout: Duration::from_secs(5),
            ack_timeout: None,
        }
    }
}

// rdma-sys 0.3 does not export librdmacm's option enums; values from <rdma/rdma_cma.h>.
const RDMA_OPTION_ID: i32 = 0;
const RDMA_OPTION_ID_ACK_TIMEOUT: i32 = 3;

/// Sets the QP's local ACK timeout on `id` (before rdma_connect / rdma_accept, which move the
/// QP to RTS with it).
fn set_ack_timeout(id: *mut rdma_cm_id, p: &ConnParams) -> Result<()> {
    let Some(mut t) = p.ack_timeout else {
        return Ok(());
    };
    if t > 31 {
        return Err(Error::InvalidArgument {
            op: "rdma_set_option(ACK_TIMEOUT)",
            reason: format!("ack_timeout {t} is not a verbs timeout exponent (0..=31)"),
        });
    }
    // SAFETY: valid id; optval points to one byte that lives across the call.
    let rc = unsafe {
        rdma_set_option(
            id,
            RDMA_OPTION_ID,
            RDMA_OPTION_ID_ACK_TIMEOUT,
            (&mut t as *mut u8).cast(),
            1,
        )
    };
    if rc != 0 {
        return Err(Error::last_os("rdma_set_option(ACK_TIMEOUT)"));
    }
    Ok(())
}

fn raw_conn_param(p: &ConnParams, ctx: &Context, max_pd: usize) -> Result<rdma_conn_param> {
    if p.private_data.len() > max_pd {
        return Err(Error::InvalidArgument {
            op: "rdma_cm private data",
            reason: format!("{} bytes, at most {max_pd} allowed", p.private_data.len()),
        });
    }
    let attr = ctx.attributes()?;
    Ok(rdma_conn_param {
        private_data: if p.private_data.is_empty() {
            std::ptr::null()
        } else {
            p.private_data.as_ptr().cast()
        },
        private_data_len: p.private_data.len() as u8,
        responder_resources: (p.responder_resources as u32).min(attr.max_qp_rd_atom) as u8,
        initiator_depth: (p.initiator_depth as u32).min(attr.max_qp_init_rd_atom) as u8,
        flow_control: 1,
        retry_count: p.retry_count.min(7),
        rnr_retry_count: p.rnr_retry_count.min(7),
        srq: 0,
        qp_num: 0,
    })
}

/// Client side, after address and route resolution: create the PD/CQs on
/// [`context`](Self::context), then [`connect`](Self::connect).
pub struct Connector {
    id: Arc<CmIdInner>,
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
        let id = CmIdInner::create(ch)?;
        let mut dsts = to_sockaddr(dst);
        let mut srcs = src.map(|ip| to_sockaddr(SocketAddr::new(ip, 0)));
        let srcp = srcs.as_mut().map_or(std::ptr::null_mut(), |s| {
            (s as *mut libc::sockaddr_storage).cast()
        });
        // SAFETY: valid id; sockaddrs live across the call.
        let rc = unsafe {
            rdma_resolve_addr(
                id.id,
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
        let rc = unsafe { rdma_resolve_route(id.id, ms(timeout.max(Duration::from_secs(2)))) };
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
        set_ack_timeout(self.id.id, params)?;
        let mut cp = raw_conn_param(params, &self.ctx, 56)?;
        // SAFETY: valid id with a QP; cp and its private data live across the call.
        let rc = unsafe { rdma_connect(self.id.id, &mut cp) };
        if rc != 0 {
            return Err(Error::last_os("rdma_connect"));
        }
        let ev = self.id.channel.next("connect", params.timeout)?;
        let ev = expect("connect", ev, CmEventKind::Established)?;
        Ok(Connection::new(qp, self.id, self.ctx, ev.private_data))
    }
}

/// Creates the id's QP on `ctx` (after checking `init` belongs to it) and runs `prepare` on it
/// before anything goes to the peer: the shared first half of connect and accept.
fn prepared_qp(
    id: &Arc<CmIdInner>,
    ctx: &Context,
    init: &QpInit,
    prepare: impl FnOnce(&QueuePair) -> Result<()>,
) -> Result<QueuePair> {
    check_device(ctx, init)?;
    let qp = QueuePair::create_on_cm(id.clone(), init)?;
    prepare(&qp)?;
    Ok(qp)
}

fn check_device(ctx: &Context, init: &QpInit) -> Result<()> {
    let ok = init.pd.context().same_device(ctx)
        && init.send_cq.context().same_device(ctx)
        && init.recv_cq.context().same_device(ctx);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op: "rdma_create_qp",
            reason: format!(
                "the PD and CQs must be created on the connection's device {} (use its context())",
                ctx.name()
            ),
        })
    }
}

/// A listening rdma_cm id.
pub struct Listener {
    id: Arc<CmIdInner>,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port) and listens.
    ///
    /// # Errors
    /// `Verbs { op: "rdma_bind_addr" }`: EADDRINUSE, EADDRNOTAVAIL (no such local address);
    /// `Verbs { op: "rdma_listen" }`.
    pub fn bind(addr: SocketAddr, backlog: i32) -> Result<Listener> {
        let ch = EventChannel::new()?;
        let id = CmIdInner::create(ch)?;
        let mut sa = to_sockaddr(addr);
        // SAFETY: valid id and sockaddr.
        if unsafe { rdma_bind_addr(id.id, (&mut sa as *mut libc::sockaddr_storage).cast()) } != 0 {
            return Err(Error::last_os("rdma_bind_addr"));
        }
        // SAFETY: valid bound id.
        if unsafe { rdma_listen(id.id, backlog) } != 0 {
            return Err(Error::last_os("rdma_listen"));
        }
        Ok(Listener { id })
    }

    /// The bound address (with the chosen port).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: valid id; the src address lives in the id.
        from_sockaddr(unsafe { rdma_get_local_addr(&*self.id.id) })
    }

    /// The fd that becomes readable when a connect request (or other listener event) is queued.
    pub fn fd(&self) -> RawFd {
        self.id.channel.fd()
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
        if unsafe { rdma_migrate_id(ev.id as *mut rdma_cm_id, ch.ch) } != 0 {
            let e = Error::last_os("rdma_migrate_id");
            // SAFETY: we own the child id and destroy it once.
            unsafe { rdma_reject(ev.id as *mut rdma_cm_id, std::ptr::null(), 0) };
            // SAFETY: as above.
            unsafe { rdma_destroy_id(ev.id as *mut rdma_cm_id) };
            return Err(e);
        }
        let id = Arc::new(CmIdInner {
            id: ev.id as *mut rdma_cm_id,
            channel: ch,
        });
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

/// A pending connection request: accept or reject it (dropping it rejects).
pub struct ConnectRequest {
    id: Arc<CmIdInner>,
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
    /// The client's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: valid id.
        from_sockaddr(unsafe { rdma_get_peer_addr(&*self.id.id) })
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
        set_ack_timeout(self.id.id, params)?;
        let mut p = params.clone();
        p.responder_resources = p.responder_resources.min(self.peer_initiator_depth);
        p.initiator_depth = p.initiator_depth.min(self.peer_responder_resources);
        let mut cp = raw_conn_param(&p, &self.ctx, 196)?;
        // SAFETY: valid id with a QP; cp lives across the call.
        if unsafe { rdma_accept(self.id.id, &mut cp) } != 0 {
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
        let rc = unsafe { rdma_reject(self.id.id, private_data.as_ptr().cast(), len as u8) };
        let _ = self.disarm();
        if rc != 0 {
            return Err(Error::last_os("rdma_reject"));
        }
        Ok(())
    }

    /// Marks the request handled so Drop does not reject it.
    fn disarm(self) -> Arc<CmIdInner> {
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
        if unsafe { rdma_reject(self.id.id, std::ptr::null(), 0) } != 0 {
            tracing::debug!(
                errno = crate::error::last_errno(),
                "rdma_reject on drop failed"
            );
        }
    }
}

/// A connected RC queue pair with its rdma_cm id.
///
/// Dereferences to the [`QueuePair`] for posting. Dropping it disconnects (the kernel sends
/// the disconnect request) and destroys QP then id.
pub struct Connection {
    // Field order: the QP is destroyed before the id.
    qp: QueuePair,
    id: Arc<CmIdInner>,
    ctx: Context,
    peer_private_data: Vec<u8>,
    disconnected: AtomicBool,
    disconnect_sent: AtomicBool,
    events: Mutex<Vec<CmEvent>>,
}

impl std::ops::Deref for Connection {
    type Target = QueuePair;
    fn deref(&self) -> &QueuePair {
        &self.qp
    }
}

impl Connection {
    fn new(
        qp: QueuePair,
        id: Arc<CmIdInner>,
        ctx: Context,
        peer_private_data: Vec<u8>,
    ) -> Connection {
        Connection {
            qp,
            id,
            ctx,
            peer_private_data,
            disconnected: AtomicBool::new(false),
            disconnect_sent: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
        }
    }

    pub fn qp(&self) -> &QueuePair {
        &self.qp
    }
    pub fn context(&self) -> &Context {
        &self.ctx
    }
    /// The private data the peer sent (connect request on the server, accept reply on the
    /// client). The transport may pad it with zeros (IB CM: to 56 / 196 bytes), so encode
    /// lengths inside it.
    pub fn peer_private_data(&self) -> &[u8] {
        &self.peer_private_data
    }
    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: valid id.
        from_sockaddr(unsafe { rdma_get_local_addr(&*self.id.id) })
    }
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: valid id.
        from_sockaddr(unsafe { rdma_get_peer_addr(&*self.id.id) })
    }
    /// The CM event fd of this connection (readable when an event is queued).
    pub fn event_fd(&self) -> RawFd {
        self.id.channel.fd()
    }

    /// Reads queued CM events without blocking, records them, and returns them.
    ///
    /// # Errors
    /// `Verbs { op: "rdma_get_cm_event" }`.
    pub fn poll_events(&self) -> Result<Vec<CmEvent>> {
        let mut out = Vec::new();
        while let Some(ev) = self.id.channel.try_next()? {
            if matches!(
                ev.kind,
                CmEventKind::Disconnected | CmEventKind::DeviceRemoval
            ) {
                self.disconnected.store(true, Ordering::Release);
            }
            if ev.kind == CmEventKind::Disconnected {
                // The peer's disconnect request (IB CM DREQ) is only answered (DREP) when this
                // side calls rdma_disconnect too (or destroys its id). Without the answer the
                // peer's own DISCONNECTED arrives only after its DREQ retries time out.
                self.answer_disconnect();
            }
            self.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ev.clone());
            out.push(ev);
        }
        Ok(out)
    }

    /// Waits up to `timeout` for an event of `kind` (earlier recorded events count).
    ///
    /// # Errors
    /// `Timeout`.
    pub fn wait_event(&self, kind: CmEventKind, timeout: Duration) -> Result<CmEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_events()?;
            if let Some(e) = self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|e| e.kind == kind)
            {
                return Ok(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    op: "wait for CM event",
                    after: timeout,
                });
            }
            wait_readable(&[self.event_fd()], left)?;
        }
    }

    /// Ok while connected; `Disconnected`/`DeviceRemoved` once the peer went away.
    ///
    /// # Errors
    /// `Disconnected`, `DeviceRemoved`, `Verbs`.
    pub fn check(&self) -> Result<()> {
        self.poll_events()?;
        if self.disconnected.load(Ordering::Acquire) {
            let removed = self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|e| e.kind == CmEventKind::DeviceRemoval);
            return Err(if removed {
                Error::DeviceRemoved { op: "connection" }
            } else {
                Error::Disconnected { op: "connection" }
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for completions on `cq`, and notices the peer going away: returns
    /// `Disconnected` if the connection dropped and no completion is pending. Uses the CQ's
    /// channel if it has one (sleeping), else busy-polls with a spin-wait hint between empty
    /// polls and a yield every 4096.
    ///
    /// # Errors
    /// `Timeout { op: "wait for completion" }`, `Disconnected`, `DeviceRemoved`.
    pub fn wait_completions(
        &self,
        cq: &CompletionQueue,
        out: &mut [Completion],
        timeout: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        if cq.channel().is_some() {
            loop {
                let n = cq.poll(out)?;
                if n > 0 {
                    return Ok(n);
                }
                // Completions first (flushes after a disconnect), then the connection state: a
                // connection already known to be gone must not wait for the timeout.
                self.check()?;
                let left = deadline.saturating_duration_since(Instant::now());
                match cq.wait_with(out, left, &[self.event_fd()]) {
                    Ok((n, _)) if n > 0 => return Ok(n),
                    Ok(_) => self.check()?,
                    Err(e) => return Err(e),
                }
            }
        }
        let mut spins = 0u32;
        loop {
            let n = cq.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            // PAUSE between empty polls (see `CompletionQueue::poll_blocking`)
            std::hint::spin_loop();
            spins += 1;
            if spins % 4096 == 0 {
                self.check()?;
                if Instant::now() > deadline {
                    return Err(Error::Timeout {
                        op: "wait for completion",
                        after: timeout,
                    });
                }
                std::thread::yield_now();
            }
        }
    }

    /// Starts disconnecting: moves the QP to the error state (posted WRs flush) and sends the
    /// disconnect request. Does not wait; use [`disconnect`](Self::disconnect)
    /// or [`wait_event`](Self::wait_event) for the DISCONNECTED event. It arrives when the
    /// peer answers, which a peer `Connection` does as soon as it reads the request (any of
    /// `poll_events`, `check`, `wait_event`, `wait_completions`) or is dropped; a peer that
    /// never looks costs the CM's disconnect-request timeout instead.
    ///
    /// # Errors
    /// `Verbs { op: "rdma_disconnect" }`.
    pub fn start_disconnect(&self) -> Result<()> {
        if self.disconnect_sent.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // SAFETY: valid connected id.
        if unsafe { rdma_disconnect(self.id.id) } != 0 {
            let errno = crate::error::last_errno();
            // EINVAL: already disconnected by the peer
            if errno != libc::EINVAL {
                return Err(Error::Verbs {
                    op: "rdma_disconnect",
                    errno,
                });
            }
        }
        Ok(())
    }

    /// Answers the peer's disconnect request once; errors are only logged (the id may
    /// already be gone with its device).
    fn answer_disconnect(&self) {
        if self.disconnect_sent.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: valid id; rdma_disconnect on a disconnecting id sends the DREP.
        if unsafe { rdma_disconnect(self.id.id) } != 0 {
            tracing::debug!(
                errno = crate::error::last_errno(),
                "rdma_disconnect answering the peer failed"
            );
        }
    }

    /// [`start_disconnect`](Self::start_disconnect), then waits up to `timeout` for the
    /// DISCONNECTED event (the peer's answer).
    ///
    /// # Errors
    /// `Verbs { op: "rdma_disconnect" }`, `Timeout`.
    pub fn disconnect(&self, timeout: Duration) -> Result<()> {
        self.start_disconnect()?;
        self.wait_event(CmEventKind::Disconnected, timeout)
            .map(|_| ())
    }

    /// True once a DISCONNECTED or DEVICE_REMOVAL event was seen.
    pub fn is_disconnected(&self) -> bool {
        self.disconnected.load(Ordering::Acquire)
    }
}
