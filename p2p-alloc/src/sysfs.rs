//! Reading sysfs (and /dev, /proc) below a configurable root, so that tests can run the
//! same code on recorded trees (`tests/fixtures/<layout>/`) that runs on `/` in production.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The root below which `sys/`, `dev/` and `proc/` are looked up (`/` on a live system).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysRoot {
    root: PathBuf,
}

impl Default for SysRoot {
    fn default() -> Self {
        SysRoot::live()
    }
}

impl SysRoot {
    /// The running system (`/`).
    pub fn live() -> Self {
        SysRoot { root: "/".into() }
    }

    /// A recorded tree (a directory holding `sys/`, maybe `dev/` and `proc/`).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        SysRoot { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` (e.g. `"sys/class/nvme"`) below the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// Whether this root is the running system.
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// Reads a sysfs attribute, trimmed.
pub(crate) fn read_attr(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io("read", path, e))
}

/// Reads an attribute if present.
pub(crate) fn read_opt(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Reads a decimal or `0x` hexadecimal integer attribute.
pub(crate) fn read_u64(path: &Path) -> Result<u64> {
    let s = read_attr(path)?;
    parse_u64(&s).ok_or_else(|| Error::Parse {
        path: path.into(),
        what: "an integer",
        value: s,
    })
}

pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Names of the entries of a directory, sorted; empty when it does not exist.
pub(crate) fn list_dir(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| natural_cmp(a, b));
    v
}

/// Orders `nvme2` before `nvme10`.
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| {
        let d = s.trim_end_matches(|c: char| c.is_ascii_digit());
        (d.to_string(), s[d.len()..].parse::<u64>().unwrap_or(0))
    };
    split(a).cmp(&split(b)).then_with(|| a.cmp(b))
}

/// Whether `s` looks like a PCI address `DDDD:BB:DD.F`.
pub(crate) fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && s.chars()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// The PCI function a class device (`.../device` symlink) belongs to, if it is one.
pub(crate) fn pci_function_of(class_dev: &Path) -> Option<String> {
    let target = std::fs::canonicalize(class_dev.join("device")).ok()?;
    let name = target.file_name()?.to_string_lossy().into_owned();
    // Only a PCI function has a BDF name and a `config` file.
    (is_bdf(&name) && target.join("config").exists()).then_some(name)
}
