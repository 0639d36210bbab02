//! The source/target drive: an NVMe namespace through passthrough (`/dev/ngXnY`), or a block
//! device / file through O_DIRECT, on the engine's one io_uring; and whether its writes need a
//! flush before they may be acked.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::slots::DriveBuf;
use crate::uring::{FileOptions, FileTarget, Namespace, Ring, TargetId};

use super::EngineError;

/// How the drive is accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// NVMe passthrough on the namespace's generic char device (`IORING_OP_URING_CMD`).
    Passthrough,
    /// O_DIRECT reads/writes on a block device.
    BlockDevice,
    /// O_DIRECT reads/writes on a regular file.
    File,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Passthrough => "nvme passthrough",
            Backend::BlockDevice => "block device, O_DIRECT",
            Backend::File => "file, O_DIRECT",
        })
    }
}

/// Whether acknowledged writes can sit in a volatile cache (and so need a flush before the
/// ack), and where that was learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteCache {
    /// True: flush (NVMe Flush / fdatasync) before acking.
    pub volatile: bool,
    /// Where the answer came from.
    pub source: String,
}

impl fmt::Display for WriteCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.volatile {
            write!(f, "volatile, flush before ack ({})", self.source)
        } else {
            write!(f, "none ({})", self.source)
        }
    }
}

/// Parses `/sys/block/<dev>/queue/write_cache`: `Some(true)` for "write back" (a volatile
/// cache), `Some(false)` for "write through", `None` for anything else.
pub fn write_cache_from_sysfs(value: &str) -> Option<bool> {
    match value.trim() {
        "write back" => Some(true),
        "write through" => Some(false),
        _ => None,
    }
}

/// The block device's write cache from sysfs (through its dev_t, so symlinks and partitions
/// work); unknown counts as volatile, the safe answer.
fn block_write_cache(rdev: u64) -> WriteCache {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    // A partition has no queue/ of its own: its parent's applies.
    for p in [
        dev.join("queue/write_cache"),
        dev.join("../queue/write_cache"),
    ] {
        if let Ok(s) = std::fs::read_to_string(&p) {
            if let Some(v) = write_cache_from_sysfs(&s) {
                return WriteCache {
                    volatile: v,
                    source: format!("{}: {}", p.display(), s.trim()),
                };
            }
        }
    }
    WriteCache {
        volatile: true,
        source: format!(
            "{}/queue/write_cache unreadable: assuming volatile",
            dev.display()
        ),
    }
}

/// An open drive with its ring (the ring holds its own duplicate of the fd).
pub(crate) struct Drive {
    pub(crate) ring: Ring<DriveBuf>,
    /// A writable target's block device held open with O_EXCL for the run (for a passthrough
    /// namespace: its block device), so nothing mounts or claims it meanwhile.
    _claim: Option<std::fs::File>,
    pub(crate) t: TargetId,
    pub(crate) capacity: u64,
    pub(crate) lba: u32,
    pub(crate) backend: Backend,
    pub(crate) cache: WriteCache,
}

impl Drive {
    /// Opens `path` (read-only for a source, read-write for a target) on a new ring with room
    /// for `ops` operations plus the engine's polls.
    ///
    /// # Errors
    /// [`EngineError::Open`] (ENOENT, EACCES, ENOTTY for a char device that is not an NVMe
    /// namespace, Unsupported for namespaces with metadata), [`EngineError::Ring`] (io_uring
    /// setup: ENOSYS/EPERM when io_uring is disabled; no URING_CMD before Linux 5.19).
    pub(crate) fn open(path: &Path, write: bool, ops: usize) -> Result<Drive, EngineError> {
        let open_err = |source| EngineError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let meta = std::fs::metadata(path)
            .map_err(|e| open_err(crate::uring::Error::from_io("stat", &e)))?;
        let entries = (ops + 16).next_power_of_two().min(4096) as u32;
        // Not SINGLE_ISSUER (nor DEFER_TASKRUN, which needs it): an engine may be built on
        // one thread and run on another.
        let mut ring: Ring<DriveBuf> = Ring::builder()
            .entries(entries)
            .single_issuer(false)
            .defer_taskrun(false)
            .build()
            .map_err(|e| EngineError::ring("setup", e))?;
        if meta.file_type().is_char_device() {
            let ns = Namespace::open(path).map_err(open_err)?;
            if write && !ns.writable() {
                return Err(EngineError::config(
                    "target",
                    format!("{} opened read-only: run as root", path.display()),
                ));
            }
            // The namespace's block device, claimed so it cannot be mounted under us.
            let claim = if write {
                Some(claim_exclusive(
                    &Path::new("/dev").join(ns.block_name()),
                    path,
                )?)
            } else {
                None
            };
            let t = ring
                .add_namespace(&ns)
                .map_err(|e| EngineError::ring("add namespace", e))?;
            let info = ns.info();
            let cache = WriteCache {
                volatile: info.controller.volatile_write_cache,
                source: format!("Identify Controller VWC of {}", ns.block_name()),
            };
            return Ok(Drive {
                _claim: claim,
                capacity: info.capacity(),
                lba: info.lba_size(),
                backend: Backend::Passthrough,
                cache,
                t,
                ring,
            });
        }
        let file = if write && meta.file_type().is_block_device() {
            // O_EXCL on a block device: refused while it is mounted or claimed elsewhere.
            FileTarget::from_file(claim_exclusive(path, path)?, true).map_err(open_err)?
        } else {
            FileTarget::open(
                path,
                FileOptions {
                    write,
                    create: false,
                    direct: true,
                },
            )
            .map_err(open_err)?
        };
        let t = ring
            .add_file(&file)
            .map_err(|e| EngineError::ring("add file", e))?;
        let (backend, cache) = if file.is_block_device() {
            (Backend::BlockDevice, block_write_cache(meta.rdev()))
        } else {
            (
                Backend::File,
                WriteCache {
                    volatile: true,
                    source: "regular file: fdatasync".into(),
                },
            )
        };
        Ok(Drive {
            _claim: None,
            capacity: file.size(),
            lba: file.offset_align().max(512),
            backend,
            cache,
            t,
            ring,
        })
    }
}

/// Opens block device `dev` read-write with O_DIRECT | O_EXCL (the kernel refuses with EBUSY
/// while it is mounted, part of an md/dm device, or opened exclusively by anyone else).
///
/// # Errors
/// [`EngineError::InUse`] for EBUSY, else [`EngineError::Open`] naming `path`.
fn claim_exclusive(dev: &Path, path: &Path) -> Result<std::fs::File, EngineError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_EXCL)
        .open(dev)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                EngineError::InUse {
                    path: path.to_path_buf(),
                    device: dev.to_path_buf(),
                }
            } else {
                EngineError::Open {
                    path: path.to_path_buf(),
                    source: Box::new(crate::uring::Error::from_io("open O_EXCL", &e)),
                }
            }
        })
}
