//! The rdma_cm id (with the event channel its events arrive on) and socket-address
//! conversions. A QP created through rdma_cm lives on an id, so the queue pair holds one.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rdma_sys::*;

use super::event::EventChannel;
use crate::device::Context;
use crate::error::{Error, Result};

/// An rdma_cm id and the channel its events arrive on.
pub(crate) struct CmId {
    id: *mut rdma_cm_id,
    pub(super) channel: Arc<EventChannel>,
}
// SAFETY: librdmacm ids may be used from any thread.
unsafe impl Send for CmId {}
// SAFETY: as above.
unsafe impl Sync for CmId {}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: every event of this id was acked when read; the QP (if any) was destroyed
        // first because the QueuePair holds an Arc to us.
        let rc = unsafe { rdma_destroy_id(self.id) };
        if rc != 0 {
            tracing::warn!(errno = crate::error::last_errno(), "rdma_destroy_id failed");
        }
    }
}

impl CmId {
    /// A new id (RDMA_PS_TCP: reliable connected) whose events arrive on `channel`.
    ///
    /// # Errors
    /// `Verbs { op: "rdma_create_id" }`.
    pub(super) fn create(channel: Arc<EventChannel>) -> Result<Arc<CmId>> {
        let mut id: *mut rdma_cm_id = std::ptr::null_mut();
        // SAFETY: valid channel and out pointer.
        let rc = unsafe {
            rdma_create_id(
                channel.as_raw(),
                &mut id,
                std::ptr::null_mut(),
                rdma_port_space::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            return Err(Error::last_os("rdma_create_id"));
        }
        Ok(Arc::new(CmId { id, channel }))
    }
    /// Takes over an id librdmacm created (a connection request's child id, already
    /// migrated to `channel`).
    ///
    /// # Safety
    /// `id` is a live id owned by nobody else, its events arrive on `channel`, and every one
    /// of them so far was acknowledged.
    pub(super) unsafe fn from_raw(id: *mut rdma_cm_id, channel: Arc<EventChannel>) -> Arc<CmId> {
        Arc::new(CmId { id, channel })
    }
    /// The raw id; valid while `self` lives.
    pub(crate) fn as_raw(&self) -> *mut rdma_cm_id {
        self.id
    }
    /// The address bound to the id (with the chosen port, for a listener).
    pub(super) fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: valid id; the address lives in the id.
        from_sockaddr(unsafe { rdma_get_local_addr(&*self.id) })
    }
    /// The peer's address (connected or requesting ids).
    pub(super) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: valid id; the address lives in the id.
        from_sockaddr(unsafe { rdma_get_peer_addr(&*self.id) })
    }
    /// The device the id is bound to (after address resolution, binding or a request).
    ///
    /// # Errors
    /// `InvalidArgument` while the id has no device; errors of reading the device list.
    pub(super) fn context(&self) -> Result<Context> {
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

/// `addr` as a C socket address.
pub(super) fn to_sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
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

/// A C socket address (IPv4 or IPv6) as a Rust one; `None` for null or other families.
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

/// A timeout in whole milliseconds for librdmacm (at least 1).
pub(super) fn ms(d: Duration) -> i32 {
    d.as_millis().clamp(1, i32::MAX as u128) as i32
}
