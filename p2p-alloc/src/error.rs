//! The crate's error type: every variant names the operation, the object and the errno; and
//! [`Errno`], the OS error number as an error source, shared by the crates above.

use std::fmt;
use std::path::PathBuf;

/// An OS error number (`errno`, positive), as the [`source`](std::error::Error::source) of
/// an error that names the failed operation. Shared by the workspace's crates (rdma and
/// io_uring errors carry it too). Compares equal to the bare number (`errno == libc::EFAULT`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current `errno` (`EIO` when the OS reports none).
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }

    /// The number.
    pub fn get(self) -> i32 {
        self.0
    }
}

impl fmt::Display for Errno {
    /// The system's text for the number, without the number (`Bad address`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0).to_string();
        // std appends " (os error N)"; the errors carrying an Errno print the number.
        f.write_str(text.split(" (os error").next().unwrap_or(&text))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({})", self.0)
    }
}

impl std::error::Error for Errno {}

impl From<i32> for Errno {
    fn from(errno: i32) -> Errno {
        Errno(errno)
    }
}

impl From<Errno> for i32 {
    fn from(e: Errno) -> i32 {
        e.0
    }
}

impl PartialEq<i32> for Errno {
    fn eq(&self, other: &i32) -> bool {
        self.0 == *other
    }
}

/// Errors of discovery, mapping, allocation and probing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A sysfs or device file could not be read/opened. `errno` is the OS error
    /// (ENOENT: not present on this kernel; EACCES: run as root or fix permissions).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`open`, `read`, ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A sysfs attribute held something unexpected.
    #[error("cannot parse {path}: {what} (got {value:?})")]
    Parse {
        /// The attribute file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
        /// What the file held.
        value: String,
    },
    /// A system call failed.
    #[error("{op} failed: {errno} (errno {})", errno.0)]
    Sys {
        /// The system call (and what it was for).
        op: &'static str,
        /// The OS error number.
        #[source]
        errno: Errno,
    },
    /// The provider has no room left for another chunk (required placement).
    /// Free buffers, use smaller chunks, or allow host fallback (`Placement::P2pPreferred`).
    /// `available` is the provider's free space (sysfs `available`) and `pool_free` the
    /// bytes free but fragmented inside the pool's chunks.
    #[error(
        "out of p2pmem on provider {provider}: need {requested} bytes, provider has {available} \
         bytes free, pool has {pool_free} bytes free in its chunks; free buffers or allow host \
         fallback (Placement::P2pPreferred)"
    )]
    OutOfMemory {
        /// The provider's PCI address.
        provider: String,
        /// Bytes asked for.
        requested: u64,
        /// The provider's free space.
        available: u64,
        /// Bytes free (fragmented) inside the pool's chunks.
        pool_free: u64,
    },
    /// Host memory could not be mapped for the pool (errno ENOMEM also when the pool's
    /// `max_host_bytes` limit is reached).
    #[error("out of host memory: need {requested} bytes (errno {})", errno.0)]
    HostOutOfMemory {
        /// Bytes asked for.
        requested: u64,
        /// The OS error number (ENOMEM, also for the pool's own limit).
        #[source]
        errno: Errno,
    },
    /// The request cannot be satisfied by this pool's configuration.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The caller's new-chunk hook (e.g. RDMA MR registration) refused the chunk.
    #[error("new-chunk hook refused chunk {chunk}: {source}")]
    HookFailed {
        /// The chunk's id.
        chunk: u32,
        /// The hook's error (shared, so the pool can keep it as the reason its memory kind
        /// is closed).
        #[source]
        source: std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The last OS error as a [`Error::Sys`].
    pub(crate) fn last_sys(op: &'static str) -> Self {
        Error::Sys {
            op,
            errno: Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
        }
    }

    /// A copy of this error (`std::io::Error` is not `Clone`: its kind and errno are kept).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Io { op, path, source } => Error::Io {
                op,
                path: path.clone(),
                source: match source.raw_os_error() {
                    Some(e) => std::io::Error::from_raw_os_error(e),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::Parse { path, what, value } => Error::Parse {
                path: path.clone(),
                what,
                value: value.clone(),
            },
            Error::Sys { op, errno } => Error::Sys { op, errno: *errno },
            Error::OutOfMemory {
                provider,
                requested,
                available,
                pool_free,
            } => Error::OutOfMemory {
                provider: provider.clone(),
                requested: *requested,
                available: *available,
                pool_free: *pool_free,
            },
            Error::HostOutOfMemory { requested, errno } => Error::HostOutOfMemory {
                requested: *requested,
                errno: *errno,
            },
            Error::Invalid(s) => Error::Invalid(s.clone()),
            Error::HookFailed { chunk, source } => Error::HookFailed {
                chunk: *chunk,
                source: source.clone(),
            },
        }
    }

    /// The errno carried by this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            Error::Sys { errno, .. } | Error::HostOutOfMemory { errno, .. } => Some(errno.0),
            Error::OutOfMemory { .. } => Some(libc::ENOMEM),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errno_is_the_source_and_compares_to_the_number() {
        let e = Error::Sys {
            op: "mmap p2pmem",
            errno: Errno(libc::ENOMEM),
        };
        let text = e.to_string();
        assert!(text.starts_with("mmap p2pmem failed: "), "{text}");
        assert!(
            text.ends_with(&format!("(errno {})", libc::ENOMEM)),
            "{text}"
        );
        let src = e.source().expect("the errno is the source");
        let errno = src.downcast_ref::<Errno>().expect("an Errno");
        assert_eq!(*errno, libc::ENOMEM);
        assert_eq!(i32::from(*errno), libc::ENOMEM);
        assert!(!src.to_string().contains("os error"), "{src}");
        assert_eq!(e.errno(), Some(libc::ENOMEM));
        let e = Error::HostOutOfMemory {
            requested: 4096,
            errno: Errno(libc::ENOMEM),
        };
        assert!(e.source().is_some());
        assert_eq!(e.duplicate().errno(), Some(libc::ENOMEM));
    }
}
