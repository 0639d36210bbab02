//! Capability probe: what can be done with a provider's memory on this machine, cell by
//! cell, with the errno seen. Built-in cells: CPU access and O_DIRECT reads into it;
//! further cells (RDMA MR registration, io_uring fixed buffers, ...) are supplied by the
//! caller as closures, so this crate stays independent of the RDMA and io_uring layers.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::mapping::Mapping;
use crate::provider::{Interface, Provider};

/// A caller-supplied check over a fresh mapping `(addr, len)` of provider memory:
/// `Ok(())` or the errno seen.
pub type Check = Arc<dyn Fn(*mut u8, usize) -> std::result::Result<(), i32> + Send + Sync>;

/// The outcome of one cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The operation succeeded.
    Ok,
    /// The operation failed with this errno.
    Failed {
        /// The positive errno value.
        errno: i32,
    },
    /// Not run, and why (e.g. no block device given, the mapping itself failed).
    Skipped {
        /// Why it was not run.
        why: String,
    },
}

impl Outcome {
    /// `ok`, `EFAULT`-style errno name, or `skipped`.
    pub fn short(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Failed { errno } => errno_name(*errno),
            Outcome::Skipped { .. } => "skipped".into(),
        }
    }
}

/// One capability cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// `cpu`, `o_direct`, or the caller's check name.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
}

/// The probe result for one provider interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The provider's PCI address.
    pub provider: String,
    /// The interface the memory was mapped through.
    pub interface: Interface,
    /// One cell per check, in the order run.
    pub cells: Vec<Cell>,
}

impl ProbeReport {
    /// The cell named `name`.
    pub fn cell(&self, name: &str) -> Option<&Outcome> {
        self.cells
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.outcome)
    }
}

/// Bytes mapped per probe (fresh provider memory, returned afterwards).
pub const PROBE_LEN: usize = 64 << 10;

/// Runs probes on demand and caches their reports per (provider, interface).
#[derive(Default)]
pub struct Prober {
    o_direct_dev: Option<PathBuf>,
    checks: Vec<(String, Check)>,
    cache: Mutex<HashMap<(String, Interface), Arc<ProbeReport>>>,
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("o_direct_dev", &self.o_direct_dev)
            .field(
                "checks",
                &self.checks.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Prober {
    /// A prober with only the CPU cell.
    pub fn new() -> Prober {
        Prober::default()
    }

    /// Enables the `o_direct` cell: an O_DIRECT `pread` of 4 KiB from `block_dev` (an NVMe
    /// namespace, e.g. `/dev/nvme1n1`) into the provider memory, checked against a
    /// buffered read of the same block.
    pub fn o_direct_from(mut self, block_dev: impl Into<PathBuf>) -> Prober {
        self.o_direct_dev = Some(block_dev.into());
        self
    }

    /// Adds a named check (e.g. `rdma_mr`, `uring_fixed`).
    pub fn check(
        mut self,
        name: &str,
        f: impl Fn(*mut u8, usize) -> std::result::Result<(), i32> + Send + Sync + 'static,
    ) -> Prober {
        self.checks.push((name.to_string(), Arc::new(f)));
        self
    }

    /// The report for `provider` through `iface`, probing on first use.
    pub fn probe(&self, provider: &Provider, iface: Interface) -> Arc<ProbeReport> {
        let key = (provider.pci.clone(), iface);
        if let Some(r) = self.lock().get(&key) {
            return r.clone();
        }
        let r = Arc::new(self.run(provider, iface));
        self.lock().insert(key, r.clone());
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Interface), Arc<ProbeReport>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, provider: &Provider, iface: Interface) -> ProbeReport {
        let mut cells = Vec::new();
        let names = std::iter::once("cpu".to_string())
            .chain(self.o_direct_dev.iter().map(|_| "o_direct".to_string()))
            .chain(self.checks.iter().map(|(n, _)| n.clone()));
        let map = match Mapping::p2p(provider, iface, PROBE_LEN, 4096) {
            Ok(m) => m,
            Err(e) => {
                let errno = e.errno().unwrap_or(libc::EIO);
                for (i, name) in names.enumerate() {
                    let outcome = if i == 0 {
                        Outcome::Failed { errno }
                    } else {
                        Outcome::Skipped {
                            why: format!("mapping the provider failed: {e}"),
                        }
                    };
                    cells.push(Cell { name, outcome });
                }
                return ProbeReport {
                    provider: provider.pci.clone(),
                    interface: iface,
                    cells,
                };
            }
        };
        cells.push(Cell {
            name: "cpu".into(),
            outcome: cpu_check(&map),
        });
        if let Some(dev) = &self.o_direct_dev {
            cells.push(Cell {
                name: "o_direct".into(),
                outcome: o_direct_check(&map, dev),
            });
        }
        for (name, f) in &self.checks {
            let outcome = match f(map.addr(), map.len()) {
                Ok(()) => Outcome::Ok,
                Err(errno) => Outcome::Failed { errno },
            };
            cells.push(Cell {
                name: name.clone(),
                outcome,
            });
        }
        ProbeReport {
            provider: provider.pci.clone(),
            interface: iface,
            cells,
        }
    }
}

/// Writes a pattern through the CPU and reads it back.
fn cpu_check(map: &Mapping) -> Outcome {
    // SAFETY: the mapping is ours, PROT_READ|WRITE, len bytes; no other view exists.
    let mem = unsafe { std::slice::from_raw_parts_mut(map.addr(), map.len()) };
    for (i, b) in mem.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let ok = mem.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8);
    if ok {
        Outcome::Ok
    } else {
        Outcome::Failed { errno: libc::EIO }
    }
}

/// O_DIRECT pread of 4 KiB into the mapping, compared against a buffered read.
fn o_direct_check(map: &Mapping, dev: &std::path::Path) -> Outcome {
    const LEN: usize = 4096;
    let errno_of = |e: std::io::Error| Outcome::Failed {
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    };
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
    {
        Ok(f) => f,
        Err(e) => return errno_of(e),
    };
    // Poison the target so a read that transfers nothing is caught.
    // SAFETY: our mapping, at least LEN bytes.
    unsafe { std::ptr::write_bytes(map.addr(), 0xa5, LEN) };
    // SAFETY: the kernel writes at most LEN bytes into our mapping.
    let n = unsafe { libc::pread(f.as_raw_fd(), map.addr().cast(), LEN, 0) };
    if n < 0 {
        return errno_of(std::io::Error::last_os_error());
    }
    if n as usize != LEN {
        return Outcome::Failed { errno: libc::EIO };
    }
    let expect = match std::fs::File::open(dev).and_then(|f| {
        let mut v = vec![0u8; LEN];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut v, 0).map(|_| v)
    }) {
        Ok(v) => v,
        Err(e) => {
            return Outcome::Skipped {
                why: format!(
                    "buffered read of {} for comparison failed: {e}",
                    dev.display()
                ),
            }
        }
    };
    // SAFETY: LEN bytes of our mapping, just written by the kernel.
    let got = unsafe { std::slice::from_raw_parts(map.addr(), LEN) };
    if got == expect.as_slice() {
        Outcome::Ok
    } else {
        Outcome::Failed { errno: libc::EIO }
    }
}

/// Symbolic errno name for the common cases (`EFAULT`), else the number.
pub fn errno_name(errno: i32) -> String {
    let n = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EREMOTEIO => "EREMOTEIO",
        libc::ENOSYS => "ENOSYS",
        _ => return format!("errno {errno}"),
    };
    n.to_string()
}
