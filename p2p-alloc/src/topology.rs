//! PCI topology from sysfs and the peer-to-peer verdict between a provider and a client,
//! following the kernel's `pci_p2pdma_distance()` (drivers/pci/p2pdma.c): walk both
//! devices up through their upstream bridges, find the common one, count hops, and refuse
//! or reroute when an ACS redirect sits on the path or no common bridge exists.

use std::path::{Path, PathBuf};

use crate::sysfs::{is_bdf, list_dir, natural_cmp, pci_function_of, read_opt, SysRoot};

/// What kind of peer a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// An NVMe controller (`/sys/class/nvme/*`).
    Nvme,
    /// An RDMA device (`/sys/class/infiniband/*`).
    Rdma,
}

impl ClientKind {
    /// `nvme` or `rdma`.
    pub fn name(self) -> &'static str {
        match self {
            ClientKind::Nvme => "nvme",
            ClientKind::Rdma => "rdma",
        }
    }
}

/// A device that DMAs to or from p2pmem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Class device name (`nvme0`, `rxe0`, `mlx5_0`).
    pub name: String,
    /// What kind of device it is.
    pub kind: ClientKind,
    /// The PCI function; `None` for a software device (rxe, siw) that moves data with the CPU.
    pub pci: Option<String>,
    /// NUMA node of the PCI function (`None` when -1 or no PCI function).
    pub numa_node: Option<u32>,
}

/// NVMe controllers and RDMA devices below `root`, in name order.
pub fn clients(root: &SysRoot) -> Vec<Client> {
    let mut out = Vec::new();
    for (class, kind) in [
        ("sys/class/nvme", ClientKind::Nvme),
        ("sys/class/infiniband", ClientKind::Rdma),
    ] {
        let dir = root.path(class);
        for name in list_dir(&dir) {
            let pci = pci_function_of(&dir.join(&name));
            let numa_node = pci
                .as_deref()
                .and_then(|b| crate::provider::numa_node(root, b));
            out.push(Client {
                name,
                kind,
                pci,
                numa_node,
            });
        }
    }
    out
}

/// The ACS state of one PCI function, read from its config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acs {
    /// No ACS capability (or no extended config space).
    Absent,
    /// ACS capability present; `ctrl` is the ACS control register.
    Present {
        /// The ACS control register.
        ctrl: u16,
    },
    /// The config space beyond 64 bytes is not readable (not root): unknown.
    Unreadable,
}

/// ACS control bits that redirect peer traffic upstream (P2P Request/Completion Redirect,
/// Egress Control): the kernel's `pci_bridge_has_acs_redir()`.
const ACS_REDIRECT_BITS: u16 = 0x0004 | 0x0008 | 0x0020;
const ACS_EXT_CAP_ID: u32 = 0x000d;

impl Acs {
    /// Whether this state redirects peer-to-peer traffic.
    pub fn redirects(self) -> bool {
        matches!(self, Acs::Present { ctrl } if ctrl & ACS_REDIRECT_BITS != 0)
    }

    /// Parses the ACS capability out of a config space image.
    pub fn from_config(cfg: &[u8]) -> Acs {
        if cfg.len() < 256 {
            return Acs::Unreadable;
        }
        let mut pos = 0x100usize;
        // Bounded walk: a corrupt list must not loop forever.
        for _ in 0..64 {
            if pos < 0x100 || pos + 8 > cfg.len() {
                return Acs::Absent;
            }
            let hdr = u32::from_le_bytes(cfg[pos..pos + 4].try_into().unwrap_or_default());
            if hdr == 0 || hdr == 0xffff_ffff {
                return Acs::Absent;
            }
            if hdr & 0xffff == ACS_EXT_CAP_ID {
                let ctrl = u16::from_le_bytes([cfg[pos + 6], cfg[pos + 7]]);
                return Acs::Present { ctrl };
            }
            pos = (hdr >> 20) as usize & !3;
            if pos == 0 {
                return Acs::Absent;
            }
        }
        Acs::Absent
    }
}

/// One PCI function on a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciNode {
    /// The function's address (`0000:03:00.0`).
    pub bdf: String,
    /// PCI class code (e.g. `0x060400` for a PCI bridge / switch port / root port).
    pub class: u32,
    /// The function's ACS state.
    pub acs: Acs,
}

impl PciNode {
    fn read(dev_dir: &Path, bdf: &str) -> PciNode {
        let class = read_opt(&dev_dir.join("class"))
            .and_then(|s| crate::sysfs::parse_u64(&s))
            .unwrap_or(0) as u32;
        let acs = std::fs::read(dev_dir.join("config"))
            .map(|c| Acs::from_config(&c))
            .unwrap_or(Acs::Unreadable);
        PciNode {
            bdf: bdf.to_string(),
            class,
            acs,
        }
    }

    /// Whether this function is a bridge (switch port, root port).
    pub fn is_bridge(&self) -> bool {
        self.class >> 8 == 0x0604
    }
}

/// A PCI function with its upstream chain, as the kernel's `pci_upstream_bridge()` walk
/// sees it: `chain[0]` is the function itself, the last element sits on the root bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciChain {
    /// The host bridge (root complex) directory name, e.g. `pci0000:00`.
    pub host_bridge: String,
    /// The functions from the device up to the root bus (`chain[0]` is the device).
    pub chain: Vec<PciNode>,
    /// Canonical sysfs directory of the host bridge.
    host_dir: PathBuf,
}

impl PciChain {
    /// Reads the chain of the PCI function `bdf` below `root`; `None` when it does not exist.
    pub fn read(root: &SysRoot, bdf: &str) -> Option<PciChain> {
        let dev = std::fs::canonicalize(root.path("sys/bus/pci/devices").join(bdf)).ok()?;
        let mut chain = Vec::new();
        let mut dir = dev.as_path();
        loop {
            let name = dir.file_name()?.to_string_lossy().into_owned();
            if is_bdf(&name) {
                chain.push(PciNode::read(dir, &name));
                dir = dir.parent()?;
            } else if name.starts_with("pci") {
                return Some(PciChain {
                    host_bridge: name,
                    chain,
                    host_dir: dir.to_path_buf(),
                });
            } else {
                // Something non-PCI (e.g. a VMD domain) between: no p2pdma-visible chain.
                return None;
            }
        }
    }

    /// The function itself.
    pub fn bdf(&self) -> &str {
        &self.chain[0].bdf
    }
}

/// The kernel's mapping type for a provider/client pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    /// Peer-to-peer through a common switch (or the same device): PCI bus addresses.
    BusAddr,
    /// Through the root complex (allowed: whitelisted host bridge or AMD Zen CPU).
    ThroughHostBridge,
    /// The kernel refuses peer-to-peer DMA between these two.
    NotSupported,
    /// A software device (rxe, siw): no DMA at all, the CPU copies to/from the memory.
    CpuCopy,
}

impl MapType {
    /// Short name used in output.
    pub fn name(self) -> &'static str {
        match self {
            MapType::BusAddr => "bus-addr",
            MapType::ThroughHostBridge => "host-bridge",
            MapType::NotSupported => "not-supported",
            MapType::CpuCopy => "cpu-copy",
        }
    }

    /// Whether data can move between the two at all.
    pub fn usable(self) -> bool {
        !matches!(self, MapType::NotSupported)
    }
}

/// Why a verdict was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Provider and client are the same PCI function.
    SameDevice,
    /// They share an upstream bridge (a switch port) with no ACS redirect in between.
    CommonUpstream {
        /// The shared upstream bridge.
        bridge: String,
    },
    /// They share an upstream bridge but ACS redirects peer traffic at these functions
    /// (`pci=disable_acs_redir=<list>` on the kernel command line lifts it).
    AcsRedirect {
        /// The functions whose ACS redirects peer traffic.
        bridges: Vec<String>,
    },
    /// No common upstream bridge: traffic goes through the root complex(es).
    NoCommonUpstream,
    /// The client has no PCI function.
    SoftwareDevice,
    /// The provider or client is not a PCI function found in sysfs.
    NotFound {
        /// What could not be found.
        what: String,
    },
}

/// The verdict for one provider/client pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The provider's PCI address.
    pub provider: String,
    /// The client judged.
    pub client: Client,
    /// How the kernel would map p2pmem for this client.
    pub map: MapType,
    /// Why.
    pub reason: Reason,
    /// Hops as the kernel counts them (`dist_a + dist_b`); `None` for software clients.
    pub distance: Option<u32>,
    /// The functions traversed, provider first, client last; a host bridge appears as its
    /// `pciDDDD:BB` name when the path crosses the root complex.
    pub path: Vec<String>,
    /// Functions on the path whose ACS state could not be read (run as root to check).
    pub acs_unknown: Vec<String>,
    /// Whether the root complex(es) crossed are on the kernel's whitelist (or the CPU is
    /// AMD Zen). `None` when the path does not cross a root complex.
    pub host_bridge_whitelisted: Option<bool>,
    /// NUMA node of the provider, when the kernel reports one.
    pub provider_numa: Option<u32>,
}

impl Verdict {
    /// One-line explanation for humans.
    pub fn explain(&self) -> String {
        match &self.reason {
            Reason::SameDevice => "same PCI function".into(),
            Reason::CommonUpstream { bridge } => format!("common upstream bridge {bridge}"),
            Reason::AcsRedirect { bridges } => format!(
                "ACS redirect at {} routes peer traffic through the root complex ({}); \
                 kernel parameter pci=disable_acs_redir={} lifts it",
                bridges.join(", "),
                self.host_bridge_note(),
                bridges.join(";")
            ),
            Reason::NoCommonUpstream => {
                format!("no common upstream bridge ({})", self.host_bridge_note())
            }
            Reason::SoftwareDevice => {
                "software RDMA device (no PCI function): the CPU copies the data".into()
            }
            Reason::NotFound { what } => format!("{what} not found in sysfs"),
        }
    }

    fn host_bridge_note(&self) -> &'static str {
        match self.host_bridge_whitelisted {
            Some(true) => "root complex whitelisted for p2pdma",
            _ => "root complex not whitelisted for p2pdma",
        }
    }
}

/// Root complexes the kernel trusts for peer-to-peer through the host bridge:
/// (vendor, device, requires both ends under the same host bridge).
const HOST_BRIDGE_WHITELIST: &[(u16, u16, bool)] = &[
    (0x8086, 0x3c00, true),
    (0x8086, 0x3c01, true),
    (0x8086, 0x2f00, true),
    (0x8086, 0x2f01, true),
    (0x8086, 0x2030, false),
    (0x8086, 0x2031, false),
    (0x8086, 0x2032, false),
    (0x8086, 0x2033, false),
    (0x8086, 0x2020, false),
    (0x8086, 0x09a2, false),
];

/// Computes topology verdicts below one sysfs root.
#[derive(Debug, Clone)]
pub struct Topology {
    root: SysRoot,
    cpu_supports_p2pdma: bool,
}

impl Topology {
    /// Reads what the verdicts depend on globally (the CPU vendor from `proc/cpuinfo`).
    pub fn new(root: &SysRoot) -> Topology {
        Topology {
            cpu_supports_p2pdma: cpu_supports_p2pdma(&root.path("proc/cpuinfo")),
            root: root.clone(),
        }
    }

    /// Whether the CPU routes peer-to-peer through any root complex (AMD Zen or newer).
    pub fn cpu_supports_p2pdma(&self) -> bool {
        self.cpu_supports_p2pdma
    }

    /// The verdict between the provider at `provider_bdf` and `client`.
    pub fn verdict(&self, provider_bdf: &str, client: &Client) -> Verdict {
        let mut v = Verdict {
            provider: provider_bdf.to_string(),
            client: client.clone(),
            map: MapType::NotSupported,
            reason: Reason::SoftwareDevice,
            distance: None,
            path: Vec::new(),
            acs_unknown: Vec::new(),
            host_bridge_whitelisted: None,
            provider_numa: crate::provider::numa_node(&self.root, provider_bdf),
        };
        let Some(a) = PciChain::read(&self.root, provider_bdf) else {
            v.reason = Reason::NotFound {
                what: format!("provider {provider_bdf}"),
            };
            return v;
        };
        let Some(client_bdf) = client.pci.as_deref() else {
            v.map = MapType::CpuCopy;
            return v;
        };
        let Some(b) = PciChain::read(&self.root, client_bdf) else {
            v.reason = Reason::NotFound {
                what: format!("client {} ({client_bdf})", client.name),
            };
            return v;
        };
        self.judge(&a, &b, &mut v);
        v
    }

    /// The kernel's walk, on two chains.
    fn judge(&self, a: &PciChain, b: &PciChain, v: &mut Verdict) {
        let same_root = a.host_dir == b.host_dir;
        let mut acs = Vec::new();
        let note = |n: &PciNode, acs: &mut Vec<String>, unknown: &mut Vec<String>| match n.acs {
            x if x.redirects() => acs.push(n.bdf.clone()),
            Acs::Unreadable if n.is_bridge() => unknown.push(n.bdf.clone()),
            _ => {}
        };
        // Common upstream: the first node of a's chain that is also in b's chain (same
        // function only under the same host bridge).
        let common = a.chain.iter().enumerate().find_map(|(ia, na)| {
            let ib = same_root
                .then(|| b.chain.iter().position(|nb| nb.bdf == na.bdf))
                .flatten()?;
            Some((ia, ib))
        });
        match common {
            Some((ia, ib)) => {
                for n in &a.chain[..=ia] {
                    note(n, &mut acs, &mut v.acs_unknown);
                }
                for n in &b.chain[..ib] {
                    note(n, &mut acs, &mut v.acs_unknown);
                }
                v.distance = Some((ia + ib) as u32);
                v.path = a.chain[..=ia]
                    .iter()
                    .chain(b.chain[..ib].iter().rev())
                    .map(|n| n.bdf.clone())
                    .collect();
                if ia == 0 && ib == 0 {
                    v.reason = Reason::SameDevice;
                    v.map = MapType::BusAddr;
                    return;
                }
                if acs.is_empty() {
                    v.reason = Reason::CommonUpstream {
                        bridge: a.chain[ia].bdf.clone(),
                    };
                    v.map = MapType::BusAddr;
                    return;
                }
                v.reason = Reason::AcsRedirect { bridges: acs };
            }
            None => {
                for n in &a.chain {
                    note(n, &mut acs, &mut v.acs_unknown);
                }
                v.distance = Some((a.chain.len() + b.chain.len()) as u32);
                let mut path: Vec<String> = a.chain.iter().map(|n| n.bdf.clone()).collect();
                path.push(a.host_bridge.clone());
                if !same_root {
                    path.push(b.host_bridge.clone());
                }
                path.extend(b.chain.iter().rev().map(|n| n.bdf.clone()));
                v.path = path;
                v.reason = Reason::NoCommonUpstream;
            }
        }
        let whitelisted = self.host_bridge_whitelisted(a, b, same_root);
        v.host_bridge_whitelisted = Some(whitelisted);
        v.map = if self.cpu_supports_p2pdma || whitelisted {
            MapType::ThroughHostBridge
        } else {
            MapType::NotSupported
        };
    }

    fn host_bridge_whitelisted(&self, a: &PciChain, b: &PciChain, same: bool) -> bool {
        if same {
            return whitelisted(&a.host_dir, true);
        }
        whitelisted(&a.host_dir, false) && whitelisted(&b.host_dir, false)
    }
}

/// The kernel's `__host_bridge_whitelist()`: the first function on the root bus (devfn
/// 00.0, or a root port) identifies the root complex.
fn whitelisted(host_dir: &Path, same_host_bridge: bool) -> bool {
    let mut funcs: Vec<String> = list_dir(host_dir)
        .into_iter()
        .filter(|n| is_bdf(n))
        .collect();
    funcs.sort_by(|x, y| natural_cmp(x, y));
    let Some(first) = funcs.first() else {
        return false;
    };
    let dir = host_dir.join(first);
    let node = PciNode::read(&dir, first);
    if !first.ends_with(":00.0") && !node.is_bridge() {
        return false;
    }
    let id = |f: &str| {
        read_opt(&dir.join(f))
            .and_then(|s| crate::sysfs::parse_u64(&s))
            .unwrap_or(0) as u16
    };
    let (vendor, device) = (id("vendor"), id("device"));
    HOST_BRIDGE_WHITELIST
        .iter()
        .find(|(v, d, _)| *v == vendor && *d == device)
        .is_some_and(|(_, _, req_same)| !req_same || same_host_bridge)
}

/// The kernel's `cpu_supports_p2pdma()`: AMD family 0x17 (Zen) or newer.
fn cpu_supports_p2pdma(cpuinfo: &Path) -> bool {
    let Some(text) = read_opt(cpuinfo) else {
        return false;
    };
    let field = |key: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    field("vendor_id").as_deref() == Some("AuthenticAMD")
        && field("cpu family")
            .and_then(|f| f.parse::<u32>().ok())
            .is_some_and(|f| f >= 0x17)
}
