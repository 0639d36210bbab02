//! [`AlignedBuf`]: zeroed host memory on the heap with a chosen alignment, owned by one value.
//! The one aligned host buffer of the workspace: io_uring operations own it while in flight
//! (O_DIRECT and NVMe PRP rules want page alignment), RDMA memory regions own it for as long
//! as they are registered.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::error::{Errno, Error, Result};

/// The default alignment: a page, which satisfies O_DIRECT, NVMe PRP entries and
/// `ibv_reg_mr`, so no bounce copies are needed.
pub const PAGE_ALIGN: usize = 4096;

/// Zeroed host memory with a chosen alignment (default [`PAGE_ALIGN`]). The memory does not
/// move when the value does, so its address may be handed to the kernel or a device while the
/// value is kept alive. Length, address and contents come through `Deref<Target = [u8]>`
/// (`len()`, `as_ptr()`, `as_mut_ptr()`, indexing).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// The requested length (may be 0) and the alignment; the allocation holds at least one
    /// byte (see [`AlignedBuf::alloc_layout`]).
    layout: Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes aligned to [`PAGE_ALIGN`].
    ///
    /// # Panics
    ///
    /// On allocation failure (like `Vec`); [`AlignedBuf::try_with_align`] returns an error
    /// instead.
    pub fn new(len: usize) -> Self {
        Self::with_align(len, PAGE_ALIGN)
    }

    /// `len` zeroed bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    ///
    /// When `align` is not a power of two, or on allocation failure;
    /// [`AlignedBuf::try_with_align`] returns errors instead.
    pub fn with_align(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len, align).expect("power-of-two alignment");
        Self::alloc(layout).unwrap_or_else(|| alloc::handle_alloc_error(Self::alloc_layout(layout)))
    }

    /// `len` zeroed bytes aligned to `align`, or an error.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `align` is not a power of two or `len` rounded up to it
    /// overflows; [`Error::HostOutOfMemory`] (ENOMEM) when the allocator has no memory.
    pub fn try_with_align(len: usize, align: usize) -> Result<Self> {
        let layout = Layout::from_size_align(len, align).map_err(|e| {
            Error::Invalid(format!(
                "aligned buffer of {len} bytes aligned to {align}: {e}"
            ))
        })?;
        Self::alloc(layout).ok_or(Error::HostOutOfMemory {
            requested: len as u64,
            errno: Errno(libc::ENOMEM),
        })
    }

    /// What is really allocated for `layout`: at least one byte (zero-sized allocations are
    /// not allowed).
    fn alloc_layout(layout: Layout) -> Layout {
        // Cannot fail: the size only grows from 0 to 1, which a valid alignment always fits.
        Layout::from_size_align(layout.size().max(1), layout.align()).unwrap_or(layout)
    }

    fn alloc(layout: Layout) -> Option<Self> {
        // SAFETY: the allocated layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(Self::alloc_layout(layout)) };
        NonNull::new(p).map(|ptr| AlignedBuf { ptr, layout })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives unique access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The alignment it was allocated with.
    pub fn align(&self) -> usize {
        self.layout.align()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `alloc`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::alloc_layout(self.layout)) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("addr", &self.ptr)
            .field("len", &self.layout.size())
            .field("align", &self.layout.align())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_stable_across_moves() {
        for (len, align) in [
            (0, 4096),
            (1, 4096),
            (5000, 4096),
            (100, 64),
            (8192, 1 << 16),
        ] {
            let mut b = AlignedBuf::with_align(len, align);
            assert_eq!(b.len(), len);
            assert_eq!(b.is_empty(), len == 0);
            assert_eq!(b.align(), align);
            assert_eq!(
                b.as_ptr() as usize % align,
                0,
                "{len} bytes aligned to {align}"
            );
            assert!(b.iter().all(|&x| x == 0), "zeroed");
            if len > 0 {
                b[len - 1] = 7;
            }
            let addr = b.as_ptr();
            let moved = Box::new(b);
            assert_eq!(
                moved.as_ptr(),
                addr,
                "the memory does not move with the value"
            );
            assert_eq!(moved.as_slice().last().copied(), (len > 0).then_some(7));
        }
        assert_eq!(AlignedBuf::new(10).align(), PAGE_ALIGN);
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let e = AlignedBuf::try_with_align(4096, 3).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        let e = AlignedBuf::try_with_align(usize::MAX - 10, 4096).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        let b = AlignedBuf::try_with_align(64, 512).unwrap();
        assert_eq!((b.len(), b.as_ptr() as usize % 512), (64, 0));
    }
}
