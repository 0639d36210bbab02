//! The crate's error type: every variant names the operation, the object and the errno.

use std::path::PathBuf;

/// Errors of discovery, mapping, allocation and probing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sysfs or device file could not be read/opened. `errno` is the OS error
    /// (ENOENT: not present on this kernel; EACCES: run as root or fix permissions).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A sysfs attribute held something unexpected.
    #[error("cannot parse {path}: {what} (got {value:?})")]
    Parse {
        path: PathBuf,
        what: &'static str,
        value: String,
    },
    /// A system call failed. `errno` is the raw OS error number.
    #[error("{op} failed: {} (errno {errno})", std::io::Error::from_raw_os_error(*errno))]
    Sys { op: &'static str, errno: i32 },
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
        provider: String,
        requested: u64,
        available: u64,
        pool_free: u64,
    },
    /// Host memory could not be mapped for the pool (errno ENOMEM also when the pool's
    /// `max_host_bytes` limit is reached).
    #[error("out of host memory: need {requested} bytes (errno {errno})")]
    HostOutOfMemory { requested: u64, errno: i32 },
    /// The request cannot be satisfied by this pool's configuration.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The caller's new-chunk hook (e.g. RDMA MR registration) refused the chunk.
    #[error("new-chunk hook refused chunk {chunk}: {reason}")]
    HookFailed { chunk: u32, reason: String },
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
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
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
            Error::HookFailed { chunk, reason } => Error::HookFailed {
                chunk: *chunk,
                reason: reason.clone(),
            },
        }
    }

    /// The errno carried by this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            Error::Sys { errno, .. } | Error::HostOutOfMemory { errno, .. } => Some(*errno),
            Error::OutOfMemory { .. } => Some(libc::ENOMEM),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
