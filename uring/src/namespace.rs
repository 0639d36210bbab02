//! An NVMe namespace opened through its generic char device (`/dev/ngXnY`), with what the
//! controller says about it (Identify Controller/Namespace through admin passthrough).

use crate::abi::{self, NVME_IOCTL_ID};
use crate::buf::{AlignedBuf, IoBuf};
use crate::cmd::NvmeCommand;
use crate::error::{Errno, Error, Result};
use crate::ring::{uring_cmd_sqe, FileRef};
use crate::status::NvmeStatus;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// What Identify Controller says (the fields this crate uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    /// Serial number (SN), trimmed.
    pub serial: String,
    /// Model number (MN), trimmed.
    pub model: String,
    /// Firmware revision (FR), trimmed.
    pub firmware: String,
    /// Maximum Data Transfer Size as a power of two of the controller page (0: no limit).
    pub mdts: u8,
    /// Volatile write cache present (VWC bit 0): a flush is needed for durability.
    pub volatile_write_cache: bool,
    /// Optional NVM Command Support (ONCS).
    pub oncs: u16,
}

impl ControllerInfo {
    /// Parses a 4096-byte Identify Controller data structure.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when `data` is shorter than 4096 bytes.
    pub fn parse(data: &[u8]) -> Result<Self> {
        if data.len() < abi::IDENTIFY_LEN {
            return Err(Error::invalid(
                "parse identify controller",
                format!("{} bytes, need 4096", data.len()),
            ));
        }
        let text = |r: std::ops::Range<usize>| {
            String::from_utf8_lossy(&data[r])
                .trim_matches(|c: char| c == ' ' || c == '\0')
                .to_string()
        };
        Ok(ControllerInfo {
            serial: text(4..24),
            model: text(24..64),
            firmware: text(64..72),
            mdts: data[77],
            volatile_write_cache: data[525] & 1 != 0,
            oncs: u16::from_le_bytes([data[520], data[521]]),
        })
    }
    /// MDTS in bytes (assuming the 4 KiB minimum controller page), `None` when unlimited.
    pub fn mdts_bytes(&self) -> Option<u64> {
        (self.mdts != 0).then(|| abi::CTRL_PAGE_SIZE << self.mdts.min(40))
    }
    /// ONCS bit 2: Dataset Management supported.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }
    /// ONCS bit 3: Write Zeroes supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
}

/// The active LBA format of a namespace, from Identify Namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaFormat {
    /// Namespace size (NSZE) in logical blocks.
    pub nlba: u64,
    /// Index of the active format (FLBAS bits 3:0, plus bits 6:5 as bits 5:4 when the
    /// namespace has more than 16 formats).
    pub index: u8,
    /// Logical block size in bytes (2^LBADS).
    pub lba_size: u32,
    /// Metadata bytes per block (MS).
    pub metadata_size: u16,
    /// Metadata transferred at the end of each block (FLBAS bit 4) instead of separately.
    pub extended_lba: bool,
}

impl LbaFormat {
    /// Parses a 4096-byte Identify Namespace data structure.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a short buffer, an active format index beyond NLBAF or an
    /// impossible LBADS (< 9 or > 31).
    pub fn parse(data: &[u8]) -> Result<Self> {
        const OP: &str = "parse identify namespace";
        if data.len() < abi::IDENTIFY_LEN {
            return Err(Error::invalid(
                OP,
                format!("{} bytes, need 4096", data.len()),
            ));
        }
        let nsze = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
        let nlbaf = data[25]; // 0-based count of formats
        let flbas = data[26];
        let mut index = flbas & 0x0f;
        if nlbaf >= 16 {
            index |= ((flbas >> 5) & 0x3) << 4;
        }
        if index > nlbaf {
            return Err(Error::invalid(
                OP,
                format!("active LBA format {index} beyond NLBAF {nlbaf}"),
            ));
        }
        let off = 128 + 4 * index as usize;
        let lbaf = u32::from_le_bytes(data[off..off + 4].try_into().expect("4 bytes"));
        let lbads = (lbaf >> 16) & 0xff;
        if !(9..=31).contains(&lbads) {
            return Err(Error::invalid(
                OP,
                format!("LBA format {index} has LBADS {lbads} (namespace not formatted?)"),
            ));
        }
        Ok(LbaFormat {
            nlba: nsze,
            index,
            lba_size: 1 << lbads,
            metadata_size: (lbaf & 0xffff) as u16,
            extended_lba: flbas & (1 << 4) != 0,
        })
    }
}

/// Everything the ring needs to validate commands for a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace ID.
    pub nsid: u32,
    /// Active LBA format.
    pub format: LbaFormat,
    /// Identify Controller fields.
    pub controller: ControllerInfo,
    /// `/sys/block/<name>/queue/max_hw_sectors_kb` in bytes, when readable.
    pub sysfs_max_hw_bytes: Option<u64>,
    /// `/sys/block/<name>/queue/max_segments`, when readable.
    pub sysfs_max_segments: Option<u64>,
    /// The largest transfer one passthrough command may carry: the smallest of MDTS, the
    /// kernel's max_hw_sectors, and max_segments pages (the kernel never splits passthrough).
    pub max_transfer: u32,
    /// Required buffer address alignment (`dma_alignment + 1`); less aligned buffers would be
    /// copied through a kernel bounce buffer.
    pub dma_alignment: usize,
}

impl NamespaceInfo {
    /// Logical block size in bytes.
    pub fn lba_size(&self) -> u32 {
        self.format.lba_size
    }
    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.format.nlba * u64::from(self.format.lba_size)
    }

    /// Combines Identify data with the kernel's queue limits.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for formats with metadata (extended LBAs or a separate metadata
    /// buffer): this crate moves data only.
    pub fn new(
        nsid: u32,
        format: LbaFormat,
        controller: ControllerInfo,
        sysfs_max_hw_bytes: Option<u64>,
        sysfs_max_segments: Option<u64>,
        dma_alignment: usize,
    ) -> Result<Self> {
        if format.metadata_size != 0 {
            return Err(Error::unsupported(
                "open namespace",
                format!(
                    "LBA format {} has {} metadata bytes per block ({}): reformat the namespace \
                     to a format without metadata (e.g. `nvme format --lbaf=<n>` with ms=0)",
                    format.index,
                    format.metadata_size,
                    if format.extended_lba {
                        "extended LBAs"
                    } else {
                        "separate metadata buffer"
                    }
                ),
            ));
        }
        let mut max = u64::from(u32::MAX) & !(u64::from(format.lba_size) - 1);
        if let Some(m) = controller.mdts_bytes() {
            max = max.min(m);
        }
        if let Some(m) = sysfs_max_hw_bytes {
            max = max.min(m);
        }
        if let Some(s) = sysfs_max_segments {
            // A page-aligned user buffer may need one segment per page.
            max = max.min(s.saturating_mul(4096));
        }
        // Also bounded by the 16-bit NLB field.
        max = max.min(abi::MAX_NLB * u64::from(format.lba_size));
        let max = max - max % u64::from(format.lba_size);
        Ok(NamespaceInfo {
            nsid,
            format,
            controller,
            sysfs_max_hw_bytes,
            sysfs_max_segments,
            max_transfer: max.max(u64::from(format.lba_size)) as u32,
            dma_alignment: dma_alignment.max(1),
        })
    }
}

/// An open NVMe namespace (`/dev/ngXnY`).
#[derive(Debug)]
pub struct Namespace {
    file: File,
    controller_file: File,
    path: PathBuf,
    block_name: String,
    writable: bool,
    info: NamespaceInfo,
}

/// Maps `/dev/nvmeXnY` (block) to `/dev/ngXnY` (generic char device); other paths unchanged.
pub fn char_device_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    match name {
        Some(n) if n.starts_with("nvme") && n.contains('n') && n[4..].contains('n') => {
            path.with_file_name(n.replacen("nvme", "ng", 1))
        }
        _ => path.to_path_buf(),
    }
}

/// `/dev/nvmeX` of the controller behind block device `nvmeXnY` (from sysfs, else the name).
fn controller_path(block_name: &str) -> PathBuf {
    let from_sysfs = std::fs::read_link(format!("/sys/block/{block_name}/device"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("nvme"));
    let name = from_sysfs.unwrap_or_else(|| {
        let rest = block_name.trim_start_matches("nvme");
        format!("nvme{}", rest.split('n').next().unwrap_or("0"))
    });
    Path::new("/dev").join(name)
}

fn sysfs_u64(block: &str, attr: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/block/{block}/queue/{attr}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Namespace {
    /// Opens a namespace by its char device (`/dev/ng1n1`) or block device (`/dev/nvme1n1`,
    /// mapped to the char device), read-write when permitted, else read-only, and identifies it.
    ///
    /// # Errors
    ///
    /// - [`Error::Os`] `open namespace` / `open controller` with ENOENT (no such device),
    ///   EACCES (not root);
    ///   `NVME_IOCTL_ID` with ENOTTY when the path is not an NVMe namespace.
    /// - [`Error::Invalid`] when the path is not a character device.
    /// - [`Error::Nvme`]/[`Error::Os`] from the Identify commands.
    /// - [`Error::Unsupported`] for namespaces formatted with metadata.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        const OP: &str = "open namespace";
        let path = char_device_path(path.as_ref());
        let (file, writable) = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => (f, true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS)) => {
                let f = File::open(&path).map_err(|e| Error::from_io(OP, &e))?;
                (f, false)
            }
            Err(e) => return Err(Error::from_io(OP, &e)),
        };
        let ft = file.metadata().map_err(|e| Error::from_io(OP, &e))?;
        if !ft.file_type().is_char_device() {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} is not an NVMe generic char device: use /dev/ngXnY, or FileTarget for \
                     files and block devices",
                    path.display()
                ),
            ));
        }
        // SAFETY: NVME_IOCTL_ID takes no argument and only returns a value.
        let nsid = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ID as _) };
        if nsid < 0 {
            return Err(Error::last_os("NVME_IOCTL_ID"));
        }
        let nsid = nsid as u32;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let block_name = name.replacen("ng", "nvme", 1);
        // Admin commands go to the controller's char device (/dev/nvmeX): the namespace
        // device only takes I/O commands (ENOTTY otherwise).
        let ctrl_path = controller_path(&block_name);
        let controller_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ctrl_path)
            .or_else(|_| File::open(&ctrl_path))
            .map_err(|e| Error::from_io("open controller", &e))?;
        let ctrl = identify(controller_file.as_fd(), NvmeCommand::identify_controller())?;
        let controller = ControllerInfo::parse(&ctrl)?;
        let ns = identify(
            controller_file.as_fd(),
            NvmeCommand::identify_namespace(nsid),
        )?;
        let format = LbaFormat::parse(&ns)?;
        let max_hw = sysfs_u64(&block_name, "max_hw_sectors_kb").map(|kb| kb * 1024);
        let max_segs = sysfs_u64(&block_name, "max_segments");
        let dma_align = sysfs_u64(&block_name, "dma_alignment").map_or(4, |a| a as usize + 1);
        let info = NamespaceInfo::new(nsid, format, controller, max_hw, max_segs, dma_align)?;
        if let (Some(m), Some(hw)) = (info.controller.mdts_bytes(), max_hw) {
            if m != hw {
                tracing::debug!(
                    mdts_bytes = m,
                    max_hw_bytes = hw,
                    "MDTS and max_hw_sectors differ; using the smaller"
                );
            }
        }
        Ok(Namespace {
            file,
            controller_file,
            path,
            block_name,
            writable,
            info,
        })
    }

    /// Namespace ID.
    pub fn nsid(&self) -> u32 {
        self.info.nsid
    }
    /// Identify-derived facts and limits.
    pub fn info(&self) -> &NamespaceInfo {
        &self.info
    }
    /// The char device path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The block device name (`nvme1n1`).
    pub fn block_name(&self) -> &str {
        &self.block_name
    }
    /// Whether it was opened read-write.
    pub fn writable(&self) -> bool {
        self.writable
    }
    /// Whether the kernel has NVMe poll queues for this device (needed for IOPOLL).
    pub fn has_poll_queues(&self) -> bool {
        sysfs_u64(&self.block_name, "io_poll") == Some(1)
    }
    /// The open char device.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// The controller's char device (`/dev/nvmeX`), where admin commands go.
    pub fn controller_file(&self) -> &File {
        &self.controller_file
    }
}

impl AsFd for Namespace {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Runs one Identify through a private two-entry ring and returns the 4096 data bytes.
fn identify(fd: BorrowedFd<'_>, mut c: NvmeCommand) -> Result<AlignedBuf> {
    const OP: &str = "identify";
    let mut buf = AlignedBuf::new(abi::IDENTIFY_LEN);
    c.cmd.addr = buf.as_mut_ptr() as u64;
    c.cmd.data_len = abi::IDENTIFY_LEN as u32;
    let mut ring: io_uring::IoUring<io_uring::squeue::Entry128, io_uring::cqueue::Entry32> =
        io_uring::IoUring::builder()
            .build(2)
            .map_err(|e| Error::from_io("io_uring_setup (SQE128/CQE32)", &e))?;
    let sqe = uring_cmd_sqe(FileRef::Fd(fd.as_raw_fd()), false, &c, None).user_data(1);
    // SAFETY: the SQE points at `buf`, which lives until after the completion is reaped below
    // (or is leaked if waiting fails).
    unsafe {
        ring.submission()
            .push(&sqe)
            .map_err(|_| Error::invalid(OP, "submission queue full"))?;
    }
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                // The command may still be in flight: never free its buffer.
                std::mem::forget(buf);
                std::mem::forget(ring);
                return Err(Error::from_io("io_uring_enter", &e));
            }
        }
    }
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| Error::invalid(OP, "no completion after wait"))?;
    match cqe.result() {
        0 => Ok(buf),
        r if r < 0 => Err(Error::Os {
            op: OP,
            errno: Errno(-r),
        }),
        r => Err(Error::Nvme {
            op: OP,
            status: NvmeStatus::from_res(r),
        }),
    }
}
