//! Namespace backends of the NVMe-oF target: what a namespace is stored on, and the I/O the
//! transport runs on it.
//!
//! A [`Backend`] is opened once per namespace ([`Backend::open`]):
//! - an NVMe generic char device `/dev/ngXnY`: NVMe passthrough (`IORING_OP_URING_CMD`), the
//!   namespace's own Identify data answers the LBA size, capacity, volatile write cache and
//!   ONCS (Dataset Management, Write Zeroes);
//! - a block device: O_DIRECT, opened `O_EXCL` (a mounted or otherwise claimed device is
//!   refused with EBUSY), its sysfs queue attributes answer the write cache and discard;
//! - a regular file: O_DIRECT (writes need an fdatasync, so it reports a volatile cache).
//!
//! Each transport thread adds the shared backends to its own io_uring ([`QueueIo`]), and
//! submits reads and writes into pool buffers ([`PoolBuf`]): the ring owns a buffer from
//! submission until the completion is reaped, so an in-flight I/O can never lose its memory.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::pipeline::engine::write_cache_from_sysfs;
use crate::uring::{self, FileTarget, Namespace, Ring, TargetId};

mod io;
pub use io::{errno_of, IoDone, IoRequest, PoolBuf, QueueIo};

/// Why a backend could not be opened or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// Opening or identifying the namespace path failed.
    #[error("namespace {}: {source}", path.display())]
    Open {
        /// The configured path.
        path: PathBuf,
        /// What failed, with its errno.
        source: uring::Error,
    },
    /// The path is something a namespace cannot be stored on.
    #[error("namespace {}: {reason}", path.display())]
    Unsupported {
        /// The configured path.
        path: PathBuf,
        /// Why, and what to use instead.
        reason: String,
    },
    /// Setting up a transport thread's io_uring failed.
    #[error("io_uring for namespace I/O: {op}: {source}")]
    Ring {
        /// The ring operation.
        op: &'static str,
        /// The error with its errno.
        source: uring::Error,
    },
}

/// How a namespace is accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// NVMe passthrough on `/dev/ngXnY`.
    Passthrough,
    /// O_DIRECT on a block device (opened O_EXCL).
    BlockDevice,
    /// O_DIRECT on a regular file.
    File,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Passthrough => "nvme passthrough",
            BackendKind::BlockDevice => "block device, O_DIRECT",
            BackendKind::File => "file, O_DIRECT",
        })
    }
}

/// What a backend can do and how big it is (the transport turns it into the core's
/// `NamespaceInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendGeometry {
    /// Logical block size in bytes.
    pub lba_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
    /// Writes may sit in a volatile cache until a flush.
    pub volatile_write_cache: bool,
    /// Deallocate (Dataset Management) is supported.
    pub supports_deallocate: bool,
    /// Write Zeroes is supported.
    pub supports_write_zeroes: bool,
    /// Where the write cache answer came from (for the start-up report).
    pub cache_source: String,
}

enum Handle {
    Ns(Namespace),
    File(FileTarget),
}

/// An open namespace backend, shared by the transport threads.
pub struct Backend {
    path: PathBuf,
    kind: BackendKind,
    geometry: BackendGeometry,
    handle: Handle,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("geometry", &self.geometry)
            .finish()
    }
}

/// Reads a sysfs attribute of the block device `rdev` (or of its parent for a partition).
fn block_attr(rdev: u64, name: &str) -> Option<(PathBuf, String)> {
    let dev = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    [
        dev.join("queue").join(name),
        dev.join("../queue").join(name),
    ]
    .into_iter()
    .find_map(|p| std::fs::read_to_string(&p).ok().map(|s| (p, s)))
}

fn block_geometry(file: &FileTarget, rdev: u64) -> BackendGeometry {
    let lba = file.offset_align().max(512);
    let (volatile, cache_source) = match block_attr(rdev, "write_cache") {
        Some((p, s)) => match write_cache_from_sysfs(&s) {
            Some(v) => (v, format!("{}: {}", p.display(), s.trim())),
            None => (true, format!("{}: {:?}: assuming volatile", p.display(), s)),
        },
        None => (
            true,
            "queue/write_cache unreadable: assuming volatile".into(),
        ),
    };
    let positive = |name| {
        block_attr(rdev, name)
            .and_then(|(_, s)| s.trim().parse::<u64>().ok())
            .is_some_and(|v| v > 0)
    };
    BackendGeometry {
        lba_size: lba,
        blocks: file.size() / u64::from(lba),
        volatile_write_cache: volatile,
        // fallocate(PUNCH_HOLE) on a block device issues Write Zeroes without fallback.
        supports_deallocate: positive("write_zeroes_max_bytes"),
        // fallocate(ZERO_RANGE) falls back to writing zeroes: always available.
        supports_write_zeroes: true,
        cache_source,
    }
}

impl Backend {
    /// Opens a namespace path: `/dev/ngXnY` (passthrough), a block device (O_DIRECT,
    /// O_EXCL) or a regular file (O_DIRECT), read-write.
    ///
    /// # Errors
    /// [`BackendError::Open`]: ENOENT, EACCES (not root), EBUSY (block device mounted or
    /// claimed), EINVAL (a file system without O_DIRECT), ENOTTY (a char device that is no
    /// NVMe namespace), Unsupported (a namespace formatted with metadata);
    /// [`BackendError::Unsupported`]: a read-only namespace, an empty device, or another kind
    /// of file.
    pub fn open(path: &Path) -> Result<Backend, BackendError> {
        let open_err = |source| BackendError::Open {
            path: path.to_path_buf(),
            source,
        };
        let unsupported = |reason: String| BackendError::Unsupported {
            path: path.to_path_buf(),
            reason,
        };
        let meta =
            std::fs::metadata(path).map_err(|e| open_err(uring::Error::from_io("stat", &e)))?;
        let ft = meta.file_type();
        let b = if ft.is_char_device() {
            let ns = Namespace::open(path).map_err(open_err)?;
            if !ns.writable() {
                return Err(unsupported("opened read-only: run as root".into()));
            }
            let info = ns.info();
            let c = &info.controller;
            let geometry = BackendGeometry {
                lba_size: info.lba_size(),
                blocks: info.format.nlba,
                volatile_write_cache: c.volatile_write_cache,
                supports_deallocate: c.supports_dsm(),
                supports_write_zeroes: c.supports_write_zeroes(),
                cache_source: format!("Identify Controller VWC of {}", ns.block_name()),
            };
            Backend {
                path: path.to_path_buf(),
                kind: BackendKind::Passthrough,
                geometry,
                handle: Handle::Ns(ns),
            }
        } else if ft.is_block_device() || ft.is_file() {
            let mut flags = libc::O_DIRECT;
            if ft.is_block_device() {
                flags |= libc::O_EXCL;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
                .map_err(|e| open_err(uring::Error::from_io("open", &e)))?;
            let target = FileTarget::from_file(file, true).map_err(open_err)?;
            let (kind, geometry) = if ft.is_block_device() {
                (
                    BackendKind::BlockDevice,
                    block_geometry(&target, meta.rdev()),
                )
            } else {
                let lba = target.offset_align().max(512);
                (
                    BackendKind::File,
                    BackendGeometry {
                        lba_size: lba,
                        blocks: target.size() / u64::from(lba),
                        volatile_write_cache: true,
                        supports_deallocate: true,
                        supports_write_zeroes: true,
                        cache_source: "regular file: fdatasync".into(),
                    },
                )
            };
            Backend {
                path: path.to_path_buf(),
                kind,
                geometry,
                handle: Handle::File(target),
            }
        } else {
            return Err(unsupported(
                "not a block device, regular file or NVMe generic char device (/dev/ngXnY)".into(),
            ));
        };
        if b.geometry.blocks == 0 {
            return Err(unsupported(format!(
                "smaller than one {}-byte block",
                b.geometry.lba_size
            )));
        }
        Ok(b)
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How it is accessed.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Size and capabilities.
    pub fn geometry(&self) -> &BackendGeometry {
        &self.geometry
    }

    /// Required alignment of buffer addresses (pool buffers are 4 KiB aligned).
    pub fn mem_align(&self) -> usize {
        match &self.handle {
            Handle::Ns(ns) => ns.info().dma_alignment,
            Handle::File(f) => f.mem_align() as usize,
        }
    }

    pub(super) fn add_to(&self, ring: &mut Ring<PoolBuf>) -> Result<TargetId, BackendError> {
        match &self.handle {
            Handle::Ns(ns) => ring.add_namespace(ns),
            Handle::File(f) => ring.add_file(f),
        }
        .map_err(|source| BackendError::Ring {
            op: "add namespace backend",
            source,
        })
    }
}
