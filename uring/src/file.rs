//! Files and block devices as I/O targets (O_DIRECT by default), so the same ring API works
//! on machines without NVMe.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How to open a [`FileTarget`].
#[derive(Debug, Clone, Copy)]
pub struct FileOptions {
    /// Open for writing too.
    pub write: bool,
    /// Create the file if missing (implies `write`).
    pub create: bool,
    /// Use O_DIRECT (no page cache; buffers and offsets must be aligned).
    pub direct: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            write: false,
            create: false,
            direct: true,
        }
    }
}

/// A regular file or block device with its direct-I/O alignment rules.
#[derive(Debug)]
pub struct FileTarget {
    file: File,
    path: PathBuf,
    is_block: bool,
    direct: bool,
    writable: bool,
    size: u64,
    offset_align: u32,
    mem_align: u32,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const STATX_DIOALIGN: u32 = 0x2000;

/// `statx(STATX_DIOALIGN)`: (dio_mem_align, dio_offset_align), `None` when not reported.
fn dio_align(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    // struct statx is 256 bytes; stx_mask at 0, stx_dio_mem_align at 152, stx_dio_offset_align
    // at 156 (stable kernel ABI, not in every libc's struct definition).
    let mut raw = [0u64; 32];
    // SAFETY: `raw` is 256 writable bytes, the size of struct statx; the path is a valid
    // C string and AT_EMPTY_PATH makes statx use the fd.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            raw.as_mut_ptr().cast(),
        )
    };
    if r != 0 {
        return None;
    }
    let mask = raw[0] as u32;
    let mem = raw[19] as u32;
    let off = (raw[19] >> 32) as u32;
    (mask & STATX_DIOALIGN != 0 && off != 0).then_some((mem.max(1), off))
}

impl FileTarget {
    /// Opens `path` with `opts`.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `open file`: ENOENT (missing), EACCES (permissions), EINVAL (the file
    /// system does not support O_DIRECT: open with `direct: false`).
    pub fn open(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self> {
        let path = path.as_ref();
        let mut o = OpenOptions::new();
        o.read(true)
            .write(opts.write || opts.create)
            .create(opts.create);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|e| Error::from_io("open file", &e))?;
        let mut t = Self::from_file(file, opts.direct)?;
        t.path = path.to_path_buf();
        t.writable = opts.write || opts.create;
        Ok(t)
    }

    /// Wraps an already open file; `direct` says whether it was opened with O_DIRECT.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] from fstat or the block device size ioctl.
    pub fn from_file(file: File, direct: bool) -> Result<Self> {
        let md = file.metadata().map_err(|e| Error::from_io("fstat", &e))?;
        let is_block = md.file_type().is_block_device();
        let mut size = md.len();
        let mut lbs = 512u32;
        if is_block {
            let mut sz: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut sz) } != 0 {
                return Err(Error::last_os("BLKGETSIZE64"));
            }
            size = sz;
            let mut ss: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int through the pointer.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut ss) } == 0 && ss > 0 {
                lbs = ss as u32;
            }
        }
        let (mem_align, offset_align) = if !direct {
            (1, 1)
        } else {
            // Without statx's answer, be strict: 4096 satisfies every device.
            dio_align(file.as_fd()).unwrap_or((if is_block { lbs } else { 4096 }, 4096.max(lbs)))
        };
        Ok(FileTarget {
            file,
            path: PathBuf::new(),
            is_block,
            direct,
            writable: true,
            size,
            offset_align,
            mem_align,
        })
    }
    /// Size in bytes when opened (block devices: their capacity).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Whether it is a block device.
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }
    /// Whether it was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
    /// Offsets and lengths must be multiples of this (1 without O_DIRECT).
    pub fn offset_align(&self) -> u32 {
        self.offset_align
    }
    /// Buffer addresses must be multiples of this (1 without O_DIRECT).
    pub fn mem_align(&self) -> u32 {
        self.mem_align
    }
    /// The path it was opened with (empty for [`FileTarget::from_file`]).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Whether writes are allowed.
    pub fn writable(&self) -> bool {
        self.writable
    }
    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl AsFd for FileTarget {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
