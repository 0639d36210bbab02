//! Protection domains.

use std::sync::Arc;

use rdma_sys::*;

use crate::device::Context;
use crate::error::{Error, Result};

/// A protection domain: MRs, MWs, QPs and SRQs that work together must share one.
/// Cheap to clone; the PD is deallocated when the last clone and every object made from it is
/// gone (children hold a reference), so drop order never matters.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

pub(crate) struct PdInner {
    pd: *mut ibv_pd,
    ctx: Context,
}

// SAFETY: verbs objects are thread-safe; the pointer is owned by this struct.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: pd was allocated by ibv_alloc_pd and is freed once; all children hold an Arc
        // to us, so none is left.
        let rc = unsafe { ibv_dealloc_pd(self.pd) };
        if rc != 0 {
            tracing::warn!(
                errno = rc,
                device = self.ctx.name(),
                "ibv_dealloc_pd failed"
            );
        }
    }
}

impl ProtectionDomain {
    /// Allocates a protection domain on `ctx`.
    ///
    /// # Errors
    /// `Verbs { op: "ibv_alloc_pd" }`: ENOMEM when the device is out of PDs.
    pub fn new(ctx: &Context) -> Result<ProtectionDomain> {
        // SAFETY: valid context.
        let pd = unsafe { ibv_alloc_pd(ctx.as_raw()) };
        if pd.is_null() {
            return Err(Error::last_os("ibv_alloc_pd"));
        }
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                pd,
                ctx: ctx.clone(),
            }),
        })
    }

    /// The device this PD belongs to.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    /// The raw handle (the `ibv_pd`), for verbs calls this crate does not wrap. Valid while
    /// `self` (or a clone) lives; do not destroy it.
    pub fn as_raw(&self) -> *mut ibv_pd {
        self.inner.pd
    }
}

impl std::fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.inner.ctx.name())
            .finish()
    }
}
