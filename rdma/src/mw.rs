//! Memory windows (type 2): give a peer access to exactly one sub-range for one transfer.
//!
//! Flow: register the region with `Access::mw_bind()` (plus local write if the window will
//! allow remote write), allocate a window, post [`SendRequest::bind_window`](crate::SendRequest::bind_window),
//! hand `window.rkey()` to the peer; afterwards revoke it with a `SendOp::LocalInv` or the
//! peer's `SendOp::SendWithInv`. Accesses with a revoked key fail with a remote access error.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use rdma_sys::*;

use crate::error::{Errno, Error, Result};
use crate::pd::ProtectionDomain;

/// A type-2 memory window. Cheap to clone.
#[derive(Clone)]
pub struct MemoryWindow {
    pub(crate) inner: Arc<MwInner>,
}

pub(crate) struct MwInner {
    mw: *mut ibv_mw,
    /// The key of the latest bind (the 8 low bits change on every bind).
    rkey: AtomicU32,
    _pd: ProtectionDomain,
}
// SAFETY: verbs objects are thread-safe; the rkey is atomic.
unsafe impl Send for MwInner {}
// SAFETY: as above.
unsafe impl Sync for MwInner {}

impl Drop for MwInner {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_mw; dealloc once; in-flight binds hold an Arc.
        let rc = unsafe { ibv_dealloc_mw(self.mw) };
        if rc != 0 {
            tracing::warn!(errno = rc, "ibv_dealloc_mw failed");
        }
    }
}

impl MemoryWindow {
    /// Allocates a type-2 window in `pd`.
    ///
    /// # Errors
    /// `Unsupported` if the device has no memory windows (EOPNOTSUPP);
    /// `Verbs { op: "ibv_alloc_mw" }` otherwise (ENOMEM: out of windows).
    pub fn alloc(pd: &ProtectionDomain) -> Result<MemoryWindow> {
        // SAFETY: valid PD.
        let mw = unsafe { ibv_alloc_mw(pd.as_raw(), ibv_mw_type::IBV_MW_TYPE_2) };
        let mw = match mw {
            Some(p) if !p.is_null() => p,
            _ => {
                let errno = crate::error::last_errno();
                if errno == libc::EOPNOTSUPP {
                    return Err(Error::Unsupported {
                        op: "ibv_alloc_mw",
                        device: pd.context().name().into(),
                        reason: "no type-2 memory windows".into(),
                    });
                }
                return Err(Error::Verbs {
                    op: "ibv_alloc_mw",
                    errno: Errno(errno),
                });
            }
        };
        // SAFETY: just created.
        let rkey = unsafe { (*mw).rkey };
        Ok(MemoryWindow {
            inner: Arc::new(MwInner {
                mw,
                rkey: AtomicU32::new(rkey),
                _pd: pd.clone(),
            }),
        })
    }

    /// The key of the latest posted bind (hand this to the peer once the bind completed).
    pub fn rkey(&self) -> u32 {
        self.inner.rkey.load(Ordering::Acquire)
    }

    /// The key the next bind posted on this window will give it. Lets a caller put the key
    /// in a message posted in the same chain as the bind (RC executes the bind first). A
    /// chain may bind a window only once (`post_send` refuses a second bind).
    pub fn next_bind_rkey(&self) -> u32 {
        self.next_rkey().1
    }

    /// The raw handle (the `ibv_mw`), for verbs calls this crate does not wrap. Valid while
    /// `self` (or a clone) lives; do not destroy it.
    pub fn as_raw(&self) -> *mut ibv_mw {
        self.inner.mw
    }

    /// Computes the key for the next bind and records it (called when posting a bind).
    pub(crate) fn next_rkey(&self) -> (u32, u32) {
        let cur = self.rkey();
        let next = (cur & !0xff) | (cur.wrapping_add(1) & 0xff);
        (cur, next)
    }

    pub(crate) fn set_rkey(&self, rkey: u32) {
        self.inner.rkey.store(rkey, Ordering::Release);
        // Providers (rxe) take the window's current key from ibv_mw.rkey when building the
        // bind WQE; keep it in step with the key the kernel now holds.
        // SAFETY: the mw is alive; rkey is a plain field only this crate writes after alloc.
        unsafe { (*self.inner.mw).rkey = rkey };
    }
}

impl std::fmt::Debug for MemoryWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWindow")
            .field("rkey", &format_args!("{:#x}", self.rkey()))
            .finish()
    }
}
