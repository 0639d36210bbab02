//! rdma_cm events: their kinds, the copied-out event, the (non-blocking) event channel each
//! id gets, and the mapping of unexpected events to typed errors.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys::*;

use crate::error::{Errno, Error, Result};
use crate::fd::{set_nonblocking, wait_readable};

/// Kind of an rdma_cm event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmEventKind {
    /// Address resolution finished.
    AddrResolved,
    /// Address resolution failed.
    AddrError,
    /// Route resolution finished.
    RouteResolved,
    /// Route resolution failed.
    RouteError,
    /// A client asks to connect (listener side).
    ConnectRequest,
    /// The server answered (for ids without a QP).
    ConnectResponse,
    /// The connection could not be established.
    ConnectError,
    /// The peer did not answer.
    Unreachable,
    /// The peer rejected the connection.
    Rejected,
    /// The connection is up.
    Established,
    /// The connection went down (either side disconnected).
    Disconnected,
    /// The RDMA device is being removed.
    DeviceRemoval,
    /// A multicast join finished.
    MulticastJoin,
    /// A multicast join failed.
    MulticastError,
    /// The id's address changed (e.g. bonding failover).
    AddrChange,
    /// The connection left the timewait state (its QP number may be reused).
    TimewaitExit,
    /// An event number this crate does not know.
    Other(u32),
}

impl CmEventKind {
    /// Maps the raw `enum rdma_cm_event_type` value.
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
    /// What happened.
    pub kind: CmEventKind,
    /// Event status (negative errno for errors, reject reason for REJECTED).
    pub status: i32,
    /// The private data that came with a connect request, accept or reject.
    pub private_data: Vec<u8>,
    /// The peer's requested responder_resources / initiator_depth (connect request/response).
    pub responder_resources: u8,
    /// See `responder_resources`.
    pub initiator_depth: u8,
    /// The id the event is for (address; only used inside the crate).
    pub(super) id: usize,
}

/// An rdma_cm event channel with a non-blocking fd; each id gets its own.
pub(super) struct EventChannel {
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
    /// A new channel, its fd set non-blocking.
    ///
    /// # Errors
    /// `Verbs { op: "rdma_create_event_channel" | "fcntl" }`.
    pub(super) fn new() -> Result<Arc<EventChannel>> {
        // SAFETY: plain constructor.
        let ch = unsafe { rdma_create_event_channel() };
        if ch.is_null() {
            return Err(Error::last_os("rdma_create_event_channel"));
        }
        let c = EventChannel { ch };
        set_nonblocking(c.as_fd())?;
        Ok(Arc::new(c))
    }

    /// The channel itself, for `rdma_create_id` / `rdma_migrate_id`.
    pub(super) fn as_raw(&self) -> *mut rdma_event_channel {
        self.ch
    }

    /// Next event if one is queued (non-blocking).
    pub(super) fn try_next(&self) -> Result<Option<CmEvent>> {
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
                errno: Errno(errno),
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
    pub(super) fn next(&self, op: &'static str, timeout: Duration) -> Result<CmEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_next()? {
                return Ok(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout { op, after: timeout });
            }
            wait_readable(&[self.as_fd()], left)?;
        }
    }
}

impl AsFd for EventChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel's fd stays open until rdma_destroy_event_channel in Drop, which
        // the borrow of self outlives.
        unsafe { BorrowedFd::borrow_raw((*self.ch).fd) }
    }
}

/// Checks an event is the expected one; maps error events to typed errors.
pub(super) fn expect(op: &'static str, ev: CmEvent, want: CmEventKind) -> Result<CmEvent> {
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
