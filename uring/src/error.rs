//! The crate's one error type: which operation failed, the errno or NVMe status, and what to
//! do about it.

use crate::buf::Buffers;
use crate::status::NvmeStatus;
use std::fmt;

pub use peerpipe_p2p_alloc::Errno;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call or an io_uring completion returned `-errno`.
    #[error("{op}: {} (errno {}): {}", strerror(errno.0), errno.0, errno_hint(errno.0))]
    Os {
        /// The operation that failed.
        op: &'static str,
        /// The positive errno value (the error's source).
        #[source]
        errno: Errno,
    },
    /// An NVMe passthrough command completed with a non-zero NVMe status.
    #[error("{op}: NVMe status {status}: {}", status.hint())]
    Nvme {
        /// The operation that failed.
        op: &'static str,
        /// The decoded status.
        status: NvmeStatus,
    },
    /// The request was rejected before submission (nothing reached the kernel).
    #[error("{op}: invalid request: {reason}")]
    Invalid {
        /// The operation that was rejected.
        op: &'static str,
        /// What is wrong and what to do instead.
        reason: String,
    },
    /// The device or kernel cannot do this (e.g. a namespace with metadata).
    #[error("{op}: unsupported: {reason}")]
    Unsupported {
        /// The operation that was refused.
        op: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },
    /// Every slot of the ring is in use: reap completions first.
    #[error("{op}: the ring is full ({in_flight} operations in flight): reap completions (Ring::wait/reap) before submitting more")]
    RingFull {
        /// The operation that did not fit.
        op: &'static str,
        /// Operations in flight.
        in_flight: usize,
    },
}

impl Error {
    /// An [`Error::Os`] from the calling thread's `errno`.
    pub fn last_os(op: &'static str) -> Self {
        Error::from_io(op, &std::io::Error::last_os_error())
    }
    /// An [`Error::Os`] from a `std::io::Error` (errno `EIO` when it carries none).
    pub fn from_io(op: &'static str, e: &std::io::Error) -> Self {
        Error::Os {
            op,
            errno: Errno(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            reason: reason.into(),
        }
    }
    pub(crate) fn unsupported(op: &'static str, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            op,
            reason: reason.into(),
        }
    }
    /// The operation that failed.
    pub fn op(&self) -> &'static str {
        match self {
            Error::Os { op, .. }
            | Error::Nvme { op, .. }
            | Error::Invalid { op, .. }
            | Error::Unsupported { op, .. }
            | Error::RingFull { op, .. } => op,
        }
    }
    /// The errno, for [`Error::Os`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Os { errno, .. } => Some(errno.0),
            _ => None,
        }
    }
    /// The NVMe status, for [`Error::Nvme`].
    pub fn nvme_status(&self) -> Option<NvmeStatus> {
        match self {
            Error::Nvme { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    // std appends " (os error N)"; the errno is printed separately.
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What to do about an errno returned by this crate's operations.
pub fn errno_hint(errno: i32) -> &'static str {
    match errno {
        libc::EINVAL => "the kernel rejected the request: check offset/length/buffer alignment (O_DIRECT needs the device's DIO alignment) and the transfer size",
        libc::EREMOTEIO => "this memory (a /dev/p2pmem0 mapping) cannot be registered as an io_uring fixed buffer on this kernel: use it unregistered",
        libc::EFAULT => "the kernel could not pin this memory (bad address, or a p2pmem sysfs mapping that cannot be pinned/registered): use an ordinary or unregistered buffer",
        libc::EOPNOTSUPP => "the kernel or driver does not support this operation (older kernel, no poll queues for IOPOLL, or a file system without O_DIRECT)",
        libc::EACCES | libc::EPERM => "permission denied: open the device read-write as root (admin passthrough needs CAP_SYS_ADMIN)",
        libc::ENOMEM => "out of memory or over RLIMIT_MEMLOCK: raise `ulimit -l` or register less memory",
        libc::ENOENT | libc::ENODEV | libc::ENXIO => "no such device: check the path (/dev/ngXnY) and that the driver is loaded",
        libc::EBADF => "bad file descriptor: the target was closed or opened without write access",
        libc::EAGAIN | libc::EBUSY | libc::EINTR => "transient: retry",
        libc::ECANCELED => "the operation was cancelled (ring shutdown or poll removal)",
        libc::EIO => "I/O error reported by the device: check dmesg",
        libc::ENOSPC => "no space left on the target",
        libc::EEXIST => "a ring set up with SINGLE_ISSUER was used from another thread: use each Ring from one thread",
        libc::ETIMEDOUT => "the command timed out: the controller may be resetting",
        _ => "see errno(3)",
    }
}

/// A submission that was rejected before it reached the kernel: the error and the buffer(s)
/// handed back to the caller. Every operation that takes buffers refuses with this type.
pub struct Rejected<B> {
    /// Why it was rejected.
    pub error: Error,
    /// The buffers the operation would have owned, returned unchanged.
    pub bufs: Buffers<B>,
}

impl<B> fmt::Debug for Rejected<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected")
            .field("error", &self.error)
            .field("bufs", &self.bufs.len())
            .finish()
    }
}

impl<B> fmt::Display for Rejected<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl<B> std::error::Error for Rejected<B> {}

impl<B> From<Rejected<B>> for Error {
    fn from(r: Rejected<B>) -> Self {
        r.error
    }
}

/// Result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn os_errors_carry_the_errno_as_source() {
        let e = Error::from_io("open", &std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(e.errno(), Some(libc::EACCES));
        let errno = e.source().and_then(|s| s.downcast_ref::<Errno>()).copied();
        assert_eq!(errno, Some(Errno(libc::EACCES)));
        assert!(
            e.to_string().contains(&format!("(errno {})", libc::EACCES)),
            "{e}"
        );
        assert!(Error::invalid("read", "bad").source().is_none());
    }
}
