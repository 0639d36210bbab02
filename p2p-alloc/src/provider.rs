//! p2pmem providers: PCI functions whose BAR memory the kernel publishes for peer-to-peer
//! DMA, reachable through `/dev/p2pmemN` and/or `/sys/bus/pci/devices/<bdf>/p2pmem/`.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::sysfs::{is_bdf, list_dir, natural_cmp, read_opt, read_u64, SysRoot};

/// How a provider's memory is mapped. Both interfaces accept only `MAP_SHARED` at
/// offset 0, and every mmap allocates fresh memory from the provider's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interface {
    /// `/dev/p2pmemN` (the p2pmem RFC's char device).
    CharDev,
    /// `/sys/bus/pci/devices/<bdf>/p2pmem/allocate` (upstream, Linux 6.2+).
    Sysfs,
}

impl Interface {
    /// Short name used in output (`chardev`, `sysfs`).
    pub fn name(self) -> &'static str {
        match self {
            Interface::CharDev => "chardev",
            Interface::Sysfs => "sysfs",
        }
    }
}

/// One p2pmem provider (a PCI function), with the interfaces it can be mapped through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// PCI address, e.g. `0000:03:00.0`.
    pub pci: String,
    /// `/dev/p2pmemN`, when the char device interface exists.
    pub chardev: Option<PathBuf>,
    /// The `p2pmem/` sysfs directory, when the upstream interface exists.
    pub sysfs_dir: Option<PathBuf>,
    /// Total bytes published (from `p2pmem/size`), if known.
    pub size: Option<u64>,
    /// Whether the provider is published for use by other drivers (`p2pmem/published`).
    pub published: Option<bool>,
    /// NUMA node of the PCI function (`None` when the platform reports -1).
    pub numa_node: Option<u32>,
}

impl Provider {
    /// The interfaces this provider offers, char device first.
    pub fn interfaces(&self) -> Vec<Interface> {
        let mut v = Vec::new();
        if self.chardev.is_some() {
            v.push(Interface::CharDev);
        }
        if self.sysfs_dir.is_some() {
            v.push(Interface::Sysfs);
        }
        v
    }

    /// The interface a pool uses by default: the char device when present (on the testbed
    /// kernel only its mappings can be registered as RDMA MRs), else sysfs.
    pub fn default_interface(&self) -> Option<Interface> {
        self.interfaces().first().copied()
    }

    /// Free bytes right now (`p2pmem/available`, read live).
    ///
    /// # Errors
    /// [`Error::Invalid`] when the provider has no sysfs directory; [`Error::Io`] when the
    /// attribute cannot be read (ENOENT: the device went away).
    pub fn available(&self) -> Result<u64> {
        let dir = self.sysfs_dir.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "provider {} has no sysfs p2pmem directory to read `available` from",
                self.pci
            ))
        })?;
        read_u64(&dir.join("available"))
    }

    /// The file to mmap for `iface`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the provider does not offer `iface`.
    pub fn map_path(&self, iface: Interface) -> Result<PathBuf> {
        match iface {
            Interface::CharDev => self.chardev.clone(),
            Interface::Sysfs => self.sysfs_dir.as_ref().map(|d| d.join("allocate")),
        }
        .ok_or_else(|| {
            Error::Invalid(format!(
                "provider {} has no {} interface",
                self.pci,
                iface.name()
            ))
        })
    }

    /// Opens the file to mmap for `iface` read-write.
    ///
    /// # Errors
    /// [`Error::Io`] with EACCES (run as root or grant access to the device file) or
    /// ENOENT (the interface is gone), or [`Error::Invalid`] as in [`Provider::map_path`].
    pub fn open(&self, iface: Interface) -> Result<File> {
        let path = self.map_path(iface)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open", path, e))
    }
}

/// Finds all p2pmem providers below `root`, ordered by PCI address.
///
/// Looks at `sys/bus/pci/devices/*/p2pmem/` and at `sys/class/misc/p2pmem*` (each char
/// device is mapped to its PCI function through its `device` link; the device node is
/// `dev/p2pmemN` below `root`). A kernel without p2pdma simply yields no providers.
///
/// # Errors
/// [`Error::Io`]/[`Error::Parse`] when a provider's `size` attribute exists but cannot be
/// read or parsed.
pub fn discover(root: &SysRoot) -> Result<Vec<Provider>> {
    let mut out: Vec<Provider> = Vec::new();
    let pci_devices = root.path("sys/bus/pci/devices");
    for bdf in list_dir(&pci_devices) {
        let dir = pci_devices.join(&bdf).join("p2pmem");
        if !dir.is_dir() {
            continue;
        }
        let size = match dir.join("size").exists() {
            true => Some(read_u64(&dir.join("size"))?),
            false => None,
        };
        out.push(Provider {
            published: read_opt(&dir.join("published")).map(|s| s == "1"),
            numa_node: numa_node(root, &bdf),
            pci: bdf,
            chardev: None,
            sysfs_dir: Some(dir),
            size,
        });
    }
    let misc = root.path("sys/class/misc");
    for name in list_dir(&misc) {
        if !name.starts_with("p2pmem") {
            continue;
        }
        let Ok(target) = std::fs::canonicalize(misc.join(&name).join("device")) else {
            continue;
        };
        let bdf = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !is_bdf(&bdf) {
            continue;
        }
        let node = root.path("dev").join(&name);
        match out.iter_mut().find(|p| p.pci == bdf) {
            Some(p) => {
                // Several char devices per function are not expected; keep the first.
                if p.chardev.is_none() {
                    p.chardev = Some(node);
                }
            }
            None => out.push(Provider {
                numa_node: numa_node(root, &bdf),
                pci: bdf,
                chardev: Some(node),
                sysfs_dir: None,
                size: None,
                published: None,
            }),
        }
    }
    out.sort_by(|a, b| natural_cmp(&a.pci, &b.pci));
    Ok(out)
}

/// NUMA node of a PCI function; `None` for -1 (no affinity) or when unknown.
pub(crate) fn numa_node(root: &SysRoot, bdf: &str) -> Option<u32> {
    read_opt(&root.path("sys/bus/pci/devices").join(bdf).join("numa_node"))
        .and_then(|s| s.parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok())
}
