//! Owned memory mappings: one p2pmem mmap (fresh provider memory) or one host-memory region
//! (huge pages when available, locked, bound to a NUMA node). Unmapped on drop, which
//! returns p2pmem to the provider.

use std::os::fd::AsRawFd;

use crate::error::{Errno, Error, Result};
use crate::provider::{Interface, Provider};

/// Where a mapping's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// p2pmem of a provider, through one of its interfaces.
    P2p {
        /// The provider's PCI address.
        provider: String,
        /// The interface the memory was mapped through.
        interface: Interface,
    },
    /// Host DRAM.
    Host {
        /// Backed by 2 MiB huge pages (`MAP_HUGETLB`); else 4 KiB pages.
        huge_pages: bool,
        /// `mlock` succeeded (else RLIMIT_MEMLOCK was too low; the memory may be paged).
        locked: bool,
        /// NUMA node the memory was bound to with `mbind`, if any.
        numa_node: Option<u32>,
    },
}

impl Backing {
    /// Whether this is p2pmem.
    pub fn is_p2p(&self) -> bool {
        matches!(self, Backing::P2p { .. })
    }
}

/// One mmap'd region, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    backing: Backing,
}

// SAFETY: the mapping is plain memory owned by this value; no thread-affine state.
unsafe impl Send for Mapping {}
// SAFETY: `Mapping` hands out only the address; access discipline is the owner's (pool's).
unsafe impl Sync for Mapping {}

const HUGE_PAGE: usize = 2 << 20;

impl Mapping {
    /// Maps `len` bytes of fresh p2pmem from `provider` through `iface` (MAP_SHARED, offset 0,
    /// the only mode both interfaces accept). The virtual address is aligned to
    /// `align` (a power of two >= 4096) by reserving an aligned window first.
    ///
    /// # Errors
    /// [`Error::Io`] when the interface cannot be opened; [`Error::Sys`] from `mmap`:
    /// ENOMEM when the provider has less than `len` bytes free (the caller turns this into
    /// [`Error::OutOfMemory`]), EINVAL for a bad length.
    pub fn p2p(provider: &Provider, iface: Interface, len: usize, align: usize) -> Result<Self> {
        let file = provider.open(iface)?;
        let window = reserve_aligned(len, align)?;
        // SAFETY: MAP_FIXED over our own PROT_NONE reservation `window` of `len` bytes,
        // which nothing else references; the fd is valid for the call.
        let ptr = unsafe {
            libc::mmap(
                window.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let err = Error::last_sys("mmap p2pmem");
            // SAFETY: the reservation is ours and unused.
            unsafe { libc::munmap(window.cast(), len) };
            return Err(err);
        }
        // The mapping keeps the provider memory alive after the fd closes.
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            backing: Backing::P2p {
                provider: provider.pci.clone(),
                interface: iface,
            },
        })
    }

    /// Maps `len` bytes of host memory aligned to `align`: 2 MiB huge pages when `len` is a
    /// multiple of 2 MiB and the system has free huge pages, else 4 KiB pages; bound to
    /// `numa_node` (MPOL_PREFERRED) and locked when RLIMIT_MEMLOCK permits.
    ///
    /// # Errors
    /// [`Error::HostOutOfMemory`] when no memory can be mapped (errno ENOMEM).
    pub fn host(len: usize, align: usize, numa_node: Option<u32>) -> Result<Self> {
        let oom = |errno: i32| Error::HostOutOfMemory {
            requested: len as u64,
            errno: Errno(errno),
        };
        let try_huge = len % HUGE_PAGE == 0;
        let window_align = if try_huge {
            align.max(HUGE_PAGE)
        } else {
            align
        };
        let window = reserve_aligned(len, window_align)
            .map_err(|e| oom(e.errno().unwrap_or(libc::ENOMEM)))?;
        let map = |extra: libc::c_int| {
            // SAFETY: replaces our own PROT_NONE reservation `window` (len bytes) with
            // read-write anonymous memory; nothing else references it.
            unsafe {
                libc::mmap(
                    window.cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | extra,
                    -1,
                    0,
                )
            }
        };
        // Huge pages only when the system has some reserved (else MAP_HUGETLB fails: ENOMEM).
        let huge = try_huge && map(libc::MAP_HUGETLB) != libc::MAP_FAILED;
        if !huge && map(0) == libc::MAP_FAILED {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            // SAFETY: the reservation is ours and unused.
            unsafe { libc::munmap(window.cast(), len) };
            return Err(oom(errno));
        }
        let ptr = window;
        let numa_node = numa_node.filter(|&n| mbind_preferred(ptr, len, n));
        // SAFETY: [ptr, ptr+len) is our mapping.
        let locked = unsafe { libc::mlock(ptr.cast(), len) } == 0;
        if !locked {
            tracing::debug!(len, "mlock of host pool memory failed (RLIMIT_MEMLOCK?)");
        }
        Ok(Mapping {
            ptr,
            len,
            backing: Backing::Host {
                huge_pages: huge,
                locked,
                numa_node,
            },
        })
    }

    /// Start address.
    pub fn addr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have a non-zero length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the memory comes from.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping; every user (buffer handle) holds a reference that
        // keeps the mapping alive, so none remains when this runs.
        let rc = unsafe { libc::munmap(self.ptr.cast(), self.len) };
        if rc != 0 {
            tracing::warn!(
                err = %std::io::Error::last_os_error(),
                "munmap of a pool chunk failed"
            );
        }
    }
}

/// Reserves `len` bytes of address space (PROT_NONE) starting at a multiple of `align`.
fn reserve_aligned(len: usize, align: usize) -> Result<*mut u8> {
    let align = align.max(4096);
    let span = len + align;
    // SAFETY: anonymous PROT_NONE reservation; touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::last_sys("mmap reserve"));
    }
    let start = p as usize;
    let aligned = (start + align - 1) & !(align - 1);
    // Trim the unaligned head and the tail so only [aligned, aligned+len) stays reserved.
    // SAFETY: both ranges lie inside the reservation we just made.
    unsafe {
        if aligned > start {
            libc::munmap(p, aligned - start);
        }
        let end = aligned + len;
        if start + span > end {
            libc::munmap(end as *mut libc::c_void, start + span - end);
        }
    }
    Ok(aligned as *mut u8)
}

/// Binds [ptr, ptr+len) to `node` with MPOL_PREFERRED; false when the kernel refuses
/// (no NUMA support, node offline).
fn mbind_preferred(ptr: *mut u8, len: usize, node: u32) -> bool {
    const MPOL_PREFERRED: libc::c_long = 1;
    if node >= 64 {
        return false;
    }
    let mask: libc::c_ulong = 1 << node;
    // SAFETY: mbind on our own mapping with a one-word node mask of 64 bits.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            ptr,
            len,
            MPOL_PREFERRED,
            &mask as *const libc::c_ulong,
            64 as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    rc == 0
}
