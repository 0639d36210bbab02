//! Memory regions over caller memory (host, hugepage, p2pmem mappings) and owned buffers.
//!
//! The memory of a region is shared with the NIC (and, with remote rights, with the peer), so
//! this API never hands out Rust references into it: data moves in and out by copy
//! ([`MemoryRegion::read_at`], [`MemoryRegion::write_at`]) or through raw pointers.

use std::sync::Arc;

use peerpipe_p2p_alloc::{AlignedBuf, Error as AllocError, PAGE_ALIGN};

use rdma_sys::*;

use crate::access::Access;
use crate::error::{mapping_path, reg_mr_error, Errno, Error, MemoryKind, Result};
use crate::pd::ProtectionDomain;

/// A registered memory region. Cheap to clone; work requests hold a clone while in flight, so
/// the region (and the memory it owns) stays alive until their completions are reaped.
#[derive(Clone)]
pub struct MemoryRegion {
    pub(crate) inner: Arc<MrInner>,
}

pub(crate) struct MrInner {
    mr: *mut ibv_mr,
    addr: usize,
    /// The address peers and memory windows name the region by (the virtual address, unless
    /// registered with an explicit IOVA).
    iova: u64,
    len: usize,
    access: Access,
    pd: ProtectionDomain,
    /// Keeps the memory alive until after deregistration (owned buffers, mapping guards).
    owner: Option<Box<dyn Send + Sync>>,
}

// SAFETY: the ibv_mr is only read after creation; the memory is accessed through copies.
unsafe impl Send for MrInner {}
// SAFETY: as above.
unsafe impl Sync for MrInner {}

impl Drop for MrInner {
    fn drop(&mut self) {
        // SAFETY: mr came from ibv_reg_mr* and is deregistered once; no WR holds us any more.
        let rc = unsafe { ibv_dereg_mr(self.mr) };
        if rc != 0 {
            tracing::warn!(errno = rc, "ibv_dereg_mr failed");
        }
        // `owner` (the memory) is dropped after this, never before.
        drop(self.owner.take());
    }
}

/// Where a peer may access a buffer: what goes into a buffer advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuf {
    /// The peer's address of the buffer (an IOVA or a virtual address).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The remote key.
    pub rkey: u32,
}

impl RemoteBuf {
    /// The sub-range `[offset, offset+len)` of this remote buffer (not checked: the peer's NIC
    /// checks it, and an out-of-range access completes with a remote access error).
    pub fn slice(&self, offset: u64, len: u32) -> RemoteBuf {
        RemoteBuf {
            addr: self.addr + offset,
            len,
            rkey: self.rkey,
        }
    }
}

impl MemoryRegion {
    /// Registers `len` bytes at `ptr`.
    ///
    /// `kind` says whether this is peer (p2pmem) memory; with [`MemoryKind::Detect`] the
    /// mapping is looked up in /proc/self/maps when registration fails.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and must not be freed or remapped until this region and
    /// every clone of it are dropped (work requests in flight hold clones until their
    /// completions are reaped). The memory is shared with the NIC: concurrent DMA may change it
    /// at any time, so the caller must not hold Rust references into it while it can be
    /// written by the NIC or the peer.
    ///
    /// # Errors
    /// * `PeerMemoryNotPinnable` when the kernel cannot pin peer memory (EFAULT/EREMOTEIO on a
    ///   p2pmem mapping): use /dev/p2pmemN rather than sysfs `allocate`, or a patched kernel.
    /// * `Verbs { op: "ibv_reg_mr", errno }`: EFAULT range not mapped, ENOMEM memlock limit,
    ///   EINVAL bad flags or zero length, EPERM no permission.
    pub unsafe fn register_raw(
        pd: &ProtectionDomain,
        ptr: *mut u8,
        len: usize,
        access: Access,
        kind: MemoryKind,
    ) -> Result<MemoryRegion> {
        // SAFETY: forwarded to the caller's contract.
        unsafe { Self::register_with_owner(pd, ptr, len, access, kind, None) }
    }

    /// Like [`register_raw`](Self::register_raw), but peers (and memory windows bound over
    /// the region) address it by `iova` instead of its virtual address
    /// (`ibv_reg_mr_iova`), so what is handed out reveals nothing of this process's address
    /// layout. `iova` must have the same offset within a page as `ptr`.
    ///
    /// # Safety
    /// As for [`register_raw`](Self::register_raw).
    ///
    /// # Errors
    /// As for `register_raw`, with `ibv_reg_mr_iova` as the operation; EINVAL also for an
    /// `iova` whose page offset differs from `ptr`'s.
    pub unsafe fn register_raw_iova(
        pd: &ProtectionDomain,
        ptr: *mut u8,
        len: usize,
        iova: u64,
        access: Access,
        kind: MemoryKind,
    ) -> Result<MemoryRegion> {
        // SAFETY: forwarded to the caller's contract.
        unsafe { Self::register_inner(pd, ptr, len, Some(iova), access, kind, None) }
    }

    /// Like [`register_raw`](Self::register_raw), and keeps `owner` (e.g. a mapping guard that
    /// unmaps on drop) alive until after deregistration.
    ///
    /// # Safety
    /// As for `register_raw`, except the memory only needs to stay valid while `owner` lives.
    ///
    /// # Errors
    /// As for `register_raw`.
    pub unsafe fn register_with_owner(
        pd: &ProtectionDomain,
        ptr: *mut u8,
        len: usize,
        access: Access,
        kind: MemoryKind,
        owner: Option<Box<dyn Send + Sync>>,
    ) -> Result<MemoryRegion> {
        // SAFETY: forwarded to the caller's contract.
        unsafe { Self::register_inner(pd, ptr, len, None, access, kind, owner) }
    }

    /// `ibv_reg_mr`, or `ibv_reg_mr_iova` with an `iova`.
    ///
    /// # Safety
    /// As for [`register_with_owner`](Self::register_with_owner).
    unsafe fn register_inner(
        pd: &ProtectionDomain,
        ptr: *mut u8,
        len: usize,
        iova: Option<u64>,
        access: Access,
        kind: MemoryKind,
        owner: Option<Box<dyn Send + Sync>>,
    ) -> Result<MemoryRegion> {
        let op = if iova.is_some() {
            "ibv_reg_mr_iova"
        } else {
            "ibv_reg_mr"
        };
        if len == 0 {
            return Err(Error::InvalidArgument {
                op,
                reason: "zero length".into(),
            });
        }
        if iova.is_some_and(|v| (v ^ ptr as u64) & 0xfff != 0) {
            return Err(Error::InvalidArgument {
                op,
                reason: format!(
                    "iova {:#x} and address {:#x} differ in their offset within a page",
                    iova.unwrap_or_default(),
                    ptr as usize
                ),
            });
        }
        let flags = access.bits() as i32;
        // SAFETY: valid PD; the range is the caller's responsibility.
        let mr = unsafe {
            match iova {
                Some(v) => ibv_reg_mr_iova(pd.as_raw(), ptr.cast(), len, v, flags),
                None => ibv_reg_mr(pd.as_raw(), ptr.cast(), len, flags),
            }
        };
        if mr.is_null() {
            let errno = crate::error::last_errno();
            let mapping = match kind {
                MemoryKind::Host => None,
                _ => mapping_path(ptr as usize),
            };
            return Err(reg_mr_error(errno, kind, ptr as usize, len, mapping));
        }
        Ok(MemoryRegion {
            inner: Arc::new(MrInner {
                mr,
                addr: ptr as usize,
                iova: iova.unwrap_or(ptr as u64),
                len,
                access,
                pd: pd.clone(),
                owner,
            }),
        })
    }

    /// Allocates a zeroed, page-aligned buffer of `len` bytes and registers it.
    ///
    /// # Errors
    /// As for [`register_raw`](Self::register_raw); `InvalidArgument` for zero length.
    pub fn alloc(pd: &ProtectionDomain, len: usize, access: Access) -> Result<MemoryRegion> {
        if len == 0 {
            return Err(Error::InvalidArgument {
                op: "ibv_reg_mr",
                reason: "zero length".into(),
            });
        }
        let mut buf = AlignedBuf::try_with_align(len, PAGE_ALIGN).map_err(|e| match e {
            AllocError::Invalid(reason) => Error::InvalidArgument {
                op: "MemoryRegion::alloc",
                reason,
            },
            _ => Error::Verbs {
                op: "alloc",
                errno: Errno(libc::ENOMEM),
            },
        })?;
        let ptr = buf.as_mut_ptr();
        // SAFETY: the buffer is owned by the region (its heap memory does not move with the
        // box) and freed after deregistration.
        unsafe {
            Self::register_with_owner(pd, ptr, len, access, MemoryKind::Host, Some(Box::new(buf)))
        }
    }

    /// Registers an owned `Vec<u8>` (moved into the region).
    ///
    /// # Errors
    /// As for [`alloc`](Self::alloc).
    pub fn from_vec(pd: &ProtectionDomain, mut v: Vec<u8>, access: Access) -> Result<MemoryRegion> {
        let ptr = v.as_mut_ptr();
        let len = v.len();
        // SAFETY: the Vec's heap buffer does not move when the Vec is moved into the box, and
        // it is dropped after deregistration.
        unsafe {
            Self::register_with_owner(pd, ptr, len, access, MemoryKind::Host, Some(Box::new(v)))
        }
    }

    /// Registers a dma-buf (`ibv_reg_dmabuf_mr`): `len` bytes at `offset` in dma-buf `fd`,
    /// addressed by the peer as `iova`.
    ///
    /// # Safety
    /// `fd` must be a dma-buf that stays valid while the region lives.
    ///
    /// # Errors
    /// `Unsupported` when the device has no dma-buf support (rxe: EOPNOTSUPP/EPROTONOSUPPORT);
    /// `Verbs { op: "ibv_reg_dmabuf_mr" }` otherwise (EBADF: not a dma-buf).
    pub unsafe fn register_dmabuf(
        pd: &ProtectionDomain,
        fd: i32,
        offset: u64,
        len: usize,
        iova: u64,
        access: Access,
    ) -> Result<MemoryRegion> {
        // SAFETY: valid PD; fd validity is the caller's contract.
        let mr =
            unsafe { ibv_reg_dmabuf_mr(pd.as_raw(), offset, len, iova, fd, access.bits() as i32) };
        if mr.is_null() {
            let errno = crate::error::last_errno();
            if matches!(
                errno,
                libc::EOPNOTSUPP | libc::EPROTONOSUPPORT | libc::ENOSYS
            ) {
                return Err(Error::Unsupported {
                    op: "ibv_reg_dmabuf_mr",
                    device: pd.context().name().to_string(),
                    reason: format!(
                        "the driver cannot register dma-buf memory (errno {errno}); register a \
                         CPU mapping with MemoryRegion::register_raw instead"
                    ),
                });
            }
            return Err(Error::Verbs {
                op: "ibv_reg_dmabuf_mr",
                errno: Errno(errno),
            });
        }
        Ok(MemoryRegion {
            inner: Arc::new(MrInner {
                mr,
                addr: iova as usize,
                iova,
                len,
                access,
                pd: pd.clone(),
                owner: None,
            }),
        })
    }

    /// Start address (also the address peers use: regions are registered with iova = address).
    pub fn addr(&self) -> u64 {
        self.inner.addr as u64
    }
    /// The address peers and memory windows name this region by: [`addr`](Self::addr),
    /// unless it was registered with an explicit IOVA
    /// ([`register_raw_iova`](Self::register_raw_iova)).
    pub fn iova(&self) -> u64 {
        self.inner.iova
    }
    /// Start of the registered memory in this process (a dma-buf region: its IOVA). Copy
    /// through it only with raw pointer copies: the NIC and the peer may write it any time.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.addr as *mut u8
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }
    /// Whether the length is 0.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
    /// The local key (for SGEs naming the region).
    pub fn lkey(&self) -> u32 {
        // SAFETY: mr is valid while self lives; lkey is immutable.
        unsafe { (*self.inner.mr).lkey }
    }
    /// The remote key (for peers naming the region).
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.inner.mr).rkey }
    }
    /// The access rights it was registered with.
    pub fn access(&self) -> Access {
        self.inner.access
    }
    /// The protection domain it belongs to.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.inner.pd
    }
    /// The raw handle (the `ibv_mr`), for verbs calls this crate does not wrap. Valid while
    /// `self` (or a clone) lives; do not destroy it.
    pub fn as_raw(&self) -> *mut ibv_mr {
        self.inner.mr
    }

    /// The whole region as a remote buffer advertisement (meaningful with remote rights).
    pub fn remote(&self) -> RemoteBuf {
        RemoteBuf {
            addr: self.iova(),
            len: self.len() as u32,
            rkey: self.rkey(),
        }
    }

    fn check(&self, op: &'static str, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).map_or(true, |end| end > self.len()) {
            return Err(Error::InvalidArgument {
                op,
                reason: format!(
                    "range {offset}+{len} outside region of {} bytes",
                    self.len()
                ),
            });
        }
        Ok(())
    }

    /// Copies bytes out of the region.
    ///
    /// # Errors
    /// `InvalidArgument` if the range is outside the region.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check("MemoryRegion::read_at", offset, out.len())?;
        // SAFETY: in bounds of a live registered range; a raw copy (no reference into memory
        // that DMA may change concurrently).
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Copies bytes into the region.
    ///
    /// # Errors
    /// `InvalidArgument` if the range is outside the region.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check("MemoryRegion::write_at", offset, data.len())?;
        // SAFETY: as in read_at.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies the whole region into a new Vec.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len()];
        self.read_at(0, &mut v).expect("whole region is in range");
        v
    }

    /// Reads one byte with a volatile load (for polling memory the peer writes into).
    ///
    /// # Errors
    /// `InvalidArgument` if out of range.
    pub fn read_volatile(&self, offset: usize) -> Result<u8> {
        self.check("MemoryRegion::read_volatile", offset, 1)?;
        // SAFETY: in bounds; volatile so each poll really reads memory.
        Ok(unsafe { std::ptr::read_volatile(self.as_ptr().add(offset)) })
    }

    /// A scatter/gather entry for `[offset, offset+len)` of this region.
    ///
    /// # Errors
    /// `InvalidArgument` if the range is outside the region.
    pub fn sge(&self, offset: usize, len: usize) -> Result<Sge> {
        self.check("MemoryRegion::sge", offset, len)?;
        Ok(Sge {
            mr: self.clone(),
            offset,
            len: len as u32,
        })
    }

    /// The whole region as one scatter/gather entry.
    pub fn sge_all(&self) -> Sge {
        Sge {
            mr: self.clone(),
            offset: 0,
            len: self.len() as u32,
        }
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .field("access", &self.access())
            .finish()
    }
}

/// A scatter/gather entry: a checked range of a registered region (holds the region alive).
#[derive(Clone, Debug)]
pub struct Sge {
    pub(crate) mr: MemoryRegion,
    pub(crate) offset: usize,
    pub(crate) len: u32,
}

impl Sge {
    /// Length in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }
    /// Whether the length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The region the entry lies in.
    pub fn region(&self) -> &MemoryRegion {
        &self.mr
    }
    pub(crate) fn raw(&self) -> ibv_sge {
        // Local access names the region by its IOVA too (the VA unless registered with one).
        ibv_sge {
            addr: self.mr.iova() + self.offset as u64,
            length: self.len,
            lkey: self.mr.lkey(),
        }
    }
}
