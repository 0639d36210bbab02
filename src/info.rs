//! `peerpipe info`: what a machine offers for p2p pipelines — p2pmem providers, NVMe
//! controllers and namespaces, RDMA devices, the provider x client PCI verdict matrix and
//! the capability probe — as text for humans and as JSON for tools.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use peerpipe_p2p_alloc::{
    clients, discover, errno_name, Outcome, ProbeReport, Prober, Provider, SysRoot, Topology,
    Verdict,
};

/// A p2pmem provider with its live free space.
#[derive(Debug, Clone)]
pub struct ProviderInfo {
    /// The provider (PCI device, interfaces, size).
    pub provider: Provider,
    /// `p2pmem/available` now (`None` without the sysfs interface).
    pub available: Option<u64>,
}

/// An NVMe namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Block device name (`nvme1n1`).
    pub name: String,
    /// Block device path (`/dev/nvme1n1`).
    pub block_dev: PathBuf,
    /// Passthrough char device (`/dev/ng1n1`).
    pub char_dev: PathBuf,
    /// LBA size in bytes.
    pub lba_size: u64,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
}

/// An NVMe controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeInfo {
    /// Controller name (`nvme1`).
    pub name: String,
    /// Serial number.
    pub serial: String,
    /// Model string.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Transport (`pcie`, `rdma`, ...).
    pub transport: String,
    /// PCI address, for a PCIe controller.
    pub pci: Option<String>,
    /// NUMA node of the controller, when the kernel reports one.
    pub numa_node: Option<u32>,
    /// Its namespaces.
    pub namespaces: Vec<NamespaceInfo>,
}

/// One GID table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidInfo {
    /// Index in the port's GID table.
    pub index: u32,
    /// The GID, as sysfs prints it.
    pub gid: String,
    /// `RoCE v2`, `IB/RoCE v1`, ... when known.
    pub kind: Option<String>,
}

/// One RDMA port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Port number (from 1).
    pub port: u32,
    /// Logical state (sysfs `state`, e.g. `4: ACTIVE`).
    pub state: String,
    /// Physical state (sysfs `phys_state`, e.g. `5: LinkUp`).
    pub phys_state: String,
    /// Link layer (`Ethernet`, `InfiniBand`).
    pub link_layer: String,
    /// Rate (sysfs `rate`).
    pub rate: String,
    /// The populated GID table entries.
    pub gids: Vec<GidInfo>,
}

/// An RDMA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaInfo {
    /// Device name (`rxe0`, `mlx5_0`).
    pub name: String,
    /// Node GUID.
    pub node_guid: String,
    /// PCI address of a hardware device.
    pub pci: Option<String>,
    /// The network device a software RDMA device (rxe, siw) runs on.
    pub netdev: Option<String>,
    /// Its ports.
    pub ports: Vec<PortInfo>,
}

/// Everything `peerpipe info` reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// p2pmem providers.
    pub providers: Vec<ProviderInfo>,
    /// NVMe controllers.
    pub nvme: Vec<NvmeInfo>,
    /// RDMA devices.
    pub rdma: Vec<RdmaInfo>,
    /// One verdict per (provider, client).
    pub matrix: Vec<Verdict>,
    /// Probe reports per (provider, interface); empty when probing was not requested.
    pub probes: Vec<ProbeReport>,
    /// Whether the CPU routes peer-to-peer through any root complex (the kernel's
    /// `cpu_supports_p2pdma()`: AMD Zen or newer).
    pub cpu_supports_p2pdma: bool,
}

/// Gathers the report below `root`; probes each provider interface with `prober` if given.
///
/// # Errors
/// [`peerpipe_p2p_alloc::Error`] when a provider's sysfs attributes cannot be read.
pub fn gather(root: &SysRoot, prober: Option<&Prober>) -> peerpipe_p2p_alloc::Result<Report> {
    let providers: Vec<ProviderInfo> = discover(root)?
        .into_iter()
        .map(|p| ProviderInfo {
            available: p.available().ok(),
            provider: p,
        })
        .collect();
    let topo = Topology::new(root);
    let clients = clients(root);
    let matrix = providers
        .iter()
        .flat_map(|p| clients.iter().map(|c| topo.verdict(&p.provider.pci, c)))
        .collect();
    let probes = match prober {
        Some(pr) => providers
            .iter()
            .flat_map(|p| {
                p.provider
                    .interfaces()
                    .into_iter()
                    .map(|i| (*pr.probe(&p.provider, i)).clone())
                    .collect::<Vec<_>>()
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(Report {
        nvme: nvme_controllers(root),
        rdma: rdma_devices(root),
        providers,
        matrix,
        probes,
        cpu_supports_p2pdma: topo.cpu_supports_p2pdma(),
    })
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn list(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // nvme2 before nvme10.
    v.sort_by_key(|s| {
        let stem = s.trim_end_matches(|c: char| c.is_ascii_digit());
        (
            stem.to_string(),
            s[stem.len()..].parse::<u64>().unwrap_or(0),
            s.clone(),
        )
    });
    v
}

fn pci_of(class_dev: &Path) -> Option<String> {
    let t = std::fs::canonicalize(class_dev.join("device")).ok()?;
    let n = t.file_name()?.to_string_lossy().into_owned();
    (t.join("config").exists() && n.len() == 12 && n.as_bytes()[4] == b':').then_some(n)
}

/// Whether `s` is `nvme<digits>n<digits>` (a namespace block device, not a partition or a
/// hidden multipath path `nvme0c0n1`).
fn is_ns_name(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("nvme") else {
        return false;
    };
    let Some((a, b)) = rest.split_once('n') else {
        return false;
    };
    !a.is_empty()
        && !b.is_empty()
        && a.bytes().all(|c| c.is_ascii_digit())
        && b.bytes().all(|c| c.is_ascii_digit())
}

/// NVMe controllers from `sys/class/nvme`, with their namespaces from `sys/block`.
pub fn nvme_controllers(root: &SysRoot) -> Vec<NvmeInfo> {
    let class = root.path("sys/class/nvme");
    let mut ctrls: Vec<NvmeInfo> = list(&class)
        .into_iter()
        .map(|name| {
            let d = class.join(&name);
            let pci = pci_of(&d);
            let numa_node = pci.as_ref().and_then(|b| {
                read(&root.path("sys/bus/pci/devices").join(b).join("numa_node"))
                    .and_then(|s| s.parse::<u32>().ok())
            });
            NvmeInfo {
                serial: read(&d.join("serial")).unwrap_or_default(),
                model: read(&d.join("model")).unwrap_or_default(),
                firmware: read(&d.join("firmware_rev")).unwrap_or_default(),
                transport: read(&d.join("transport")).unwrap_or_default(),
                name,
                pci,
                numa_node,
                namespaces: Vec::new(),
            }
        })
        .collect();
    let block = root.path("sys/block");
    for ns in list(&block).into_iter().filter(|n| is_ns_name(n)) {
        let d = block.join(&ns);
        // `device` is the controller, or the subsystem under native multipath.
        let Ok(parent) = std::fs::canonicalize(d.join("device")) else {
            continue;
        };
        let pname = parent
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let owners: Vec<String> = if pname.starts_with("nvme-subsys") {
            list(&parent)
                .into_iter()
                .filter(|n| n.starts_with("nvme") && n[4..].bytes().all(|c| c.is_ascii_digit()))
                .collect()
        } else {
            vec![pname]
        };
        let info = NamespaceInfo {
            block_dev: root.path("dev").join(&ns),
            char_dev: root.path("dev").join(ns.replacen("nvme", "ng", 1)),
            lba_size: read(&d.join("queue/logical_block_size"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(512),
            capacity_bytes: read(&d.join("size"))
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                * 512,
            name: ns,
        };
        for c in ctrls.iter_mut().filter(|c| owners.contains(&c.name)) {
            c.namespaces.push(info.clone());
        }
    }
    ctrls
}

/// RDMA devices from `sys/class/infiniband`.
pub fn rdma_devices(root: &SysRoot) -> Vec<RdmaInfo> {
    let class = root.path("sys/class/infiniband");
    list(&class)
        .into_iter()
        .map(|name| {
            let d = class.join(&name);
            let ports = list(&d.join("ports"))
                .into_iter()
                .filter_map(|p| {
                    let port: u32 = p.parse().ok()?;
                    let pd = d.join("ports").join(&p);
                    let gids = list(&pd.join("gids"))
                        .into_iter()
                        .filter_map(|i| {
                            let index: u32 = i.parse().ok()?;
                            // Unused entries read as zeros (or fail to read).
                            let gid = read(&pd.join("gids").join(&i))?;
                            if gid.bytes().all(|c| c == b'0' || c == b':') {
                                return None;
                            }
                            let kind = read(&pd.join("gid_attrs/types").join(&i));
                            Some(GidInfo { index, gid, kind })
                        })
                        .collect();
                    Some(PortInfo {
                        port,
                        state: read(&pd.join("state")).unwrap_or_default(),
                        phys_state: read(&pd.join("phys_state")).unwrap_or_default(),
                        link_layer: read(&pd.join("link_layer")).unwrap_or_default(),
                        rate: read(&pd.join("rate")).unwrap_or_default(),
                        gids,
                    })
                })
                .collect();
            RdmaInfo {
                node_guid: read(&d.join("node_guid")).unwrap_or_default(),
                pci: pci_of(&d),
                netdev: read(&d.join("parent")),
                name,
                ports,
            }
        })
        .collect()
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Ok => "ok".into(),
        Outcome::Failed { errno } => errno_name(*errno),
        Outcome::Skipped { why } => format!("skipped ({why})"),
    }
}

fn bytes(n: u64) -> String {
    if n >= 1 << 30 && n % (1 << 30) == 0 {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |v| v.to_string())
}

/// The human-readable report.
pub fn render_text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "p2pmem providers:");
    if r.providers.is_empty() {
        let _ = writeln!(
            o,
            "  none (no /dev/p2pmem* and no /sys/bus/pci/devices/*/p2pmem: kernel without \
             CONFIG_PCI_P2PDMA, or no device publishes p2pmem, e.g. an NVMe CMB)"
        );
    }
    for p in &r.providers {
        let pr = &p.provider;
        let ifaces: Vec<&str> = pr.interfaces().iter().map(|i| i.name()).collect();
        let _ = writeln!(
            o,
            "  {}  size {}  available {}  published {}  numa {}  interfaces: {}",
            pr.pci,
            pr.size.map_or("-".into(), bytes),
            p.available.map_or("-".into(), bytes),
            opt(&pr.published),
            opt(&pr.numa_node),
            ifaces.join(", ")
        );
        if let Some(c) = &pr.chardev {
            let _ = writeln!(o, "      chardev {}", c.display());
        }
        if let Some(d) = &pr.sysfs_dir {
            let _ = writeln!(o, "      sysfs   {}", d.join("allocate").display());
        }
    }
    let _ = writeln!(o, "\nNVMe controllers:");
    for c in &r.nvme {
        let _ = writeln!(
            o,
            "  {:<8} {:<6} serial {:<12} model {:<20} fw {:<8} pci {} numa {}",
            c.name,
            c.transport,
            c.serial,
            c.model,
            c.firmware,
            opt(&c.pci),
            opt(&c.numa_node)
        );
        for n in &c.namespaces {
            let _ = writeln!(
                o,
                "      {:<10} {}  {}  LBA {} B  capacity {}",
                n.name,
                n.block_dev.display(),
                n.char_dev.display(),
                n.lba_size,
                bytes(n.capacity_bytes)
            );
        }
    }
    let _ = writeln!(o, "\nRDMA devices:");
    for d in &r.rdma {
        let _ = writeln!(
            o,
            "  {:<8} guid {}  {}",
            d.name,
            d.node_guid,
            match (&d.pci, &d.netdev) {
                (Some(p), _) => format!("pci {p}"),
                (None, Some(n)) => format!("software device on {n}"),
                (None, None) => "no PCI function".into(),
            }
        );
        for p in &d.ports {
            let _ = writeln!(
                o,
                "      port {}  {}  {}  {}  {}",
                p.port, p.state, p.phys_state, p.link_layer, p.rate
            );
            for g in &p.gids {
                let _ = writeln!(
                    o,
                    "        gid[{}] {}  {}",
                    g.index,
                    g.gid,
                    g.kind.as_deref().unwrap_or("")
                );
            }
        }
    }
    let _ = writeln!(
        o,
        "\nPCI peer-to-peer (provider -> client){}:",
        if r.cpu_supports_p2pdma {
            "  [CPU: AMD Zen, any root complex allowed]"
        } else {
            ""
        }
    );
    for v in &r.matrix {
        let _ = writeln!(
            o,
            "  {} -> {:<8} {:<13} dist {:<2} {}",
            v.provider,
            v.client.name,
            v.map.name(),
            opt(&v.distance),
            v.explain()
        );
        if !v.path.is_empty() {
            let _ = writeln!(o, "      path {}", v.path.join(" > "));
        }
        if !v.acs_unknown.is_empty() {
            let _ = writeln!(
                o,
                "      ACS unknown at {} (config space not readable: run as root)",
                v.acs_unknown.join(", ")
            );
        }
    }
    let _ = writeln!(o, "\nCapability probe:");
    if r.probes.is_empty() {
        let _ = writeln!(o, "  not run");
    }
    for p in &r.probes {
        let cells: Vec<String> = p
            .cells
            .iter()
            .map(|c| format!("{} {}", c.name, outcome_text(&c.outcome)))
            .collect();
        let _ = writeln!(
            o,
            "  {} {:<8} {}",
            p.provider,
            p.interface.name(),
            cells.join(", ")
        );
    }
    o
}

mod json;

/// The report as one JSON object (stable field names, documented in the README), through
/// serde_json.
pub fn render_json(r: &Report) -> serde_json::Result<String> {
    serde_json::to_string(&json::Json::new(r))
}

/// The block device for the O_DIRECT probe: the first NVMe namespace whose controller is
/// not a p2pmem provider (reading a drive into its own CMB is a different case).
pub fn default_probe_dev(root: &SysRoot) -> Option<PathBuf> {
    let providers: Vec<String> = discover(root)
        .map(|v| v.into_iter().map(|p| p.pci).collect())
        .unwrap_or_default();
    let ctrls = nvme_controllers(root);
    let pick = |skip_providers: bool| {
        ctrls
            .iter()
            .filter(|c| !skip_providers || !c.pci.as_ref().is_some_and(|p| providers.contains(p)))
            .flat_map(|c| c.namespaces.iter())
            .map(|n| n.block_dev.clone())
            .next()
    };
    pick(true).or_else(|| pick(false))
}

/// Adds the probe cells this crate can run through its own layers: `rdma_mr:<dev>` (RDMA
/// memory registration on each device in `rdma_devs`, via peerpipe-rdma), `uring_fixed`
/// (io_uring fixed-buffer registration via peerpipe-uring) and, when `passthrough_ns` (an
/// NVMe passthrough char device such as `/dev/ng1n1`) is given, `nvme_passthrough` (an NVMe
/// read command through io_uring into the provider memory).
pub fn with_default_checks(
    mut p: Prober,
    rdma_devs: &[String],
    passthrough_ns: Option<PathBuf>,
) -> Prober {
    for dev in rdma_devs {
        let d = dev.clone();
        p = p.check(&format!("rdma_mr:{dev}"), move |addr, len| {
            rdma_mr_check(&d, addr, len)
        });
    }
    let p = p.check("uring_fixed", uring_fixed_check);
    match passthrough_ns {
        Some(ns) => p.check("nvme_passthrough", move |addr, len| {
            passthrough_check(&ns, addr, len)
        }),
        None => p,
    }
}

/// The passthrough char device of an NVMe namespace block device
/// (`/dev/nvme1n1` -> `/dev/ng1n1`).
pub fn passthrough_dev_for(block_dev: &Path) -> Option<PathBuf> {
    let name = block_dev
        .file_name()?
        .to_string_lossy()
        .replacen("nvme", "ng", 1);
    Some(block_dev.with_file_name(name))
}

/// Registers `[addr, addr+len)` as an RDMA memory region (remote read/write) on `dev`.
fn rdma_mr_check(dev: &str, addr: *mut u8, len: usize) -> Result<(), i32> {
    use peerpipe_rdma::{Access, Context, MemoryKind, MemoryRegion, ProtectionDomain};
    let errno = |e: peerpipe_rdma::Error| e.errno().unwrap_or(libc::EIO);
    let ctx = Context::open(dev).map_err(errno)?;
    let pd = ProtectionDomain::new(&ctx).map_err(errno)?;
    // SAFETY: the probe's mapping stays mapped until after the region is dropped here.
    let mr = unsafe {
        MemoryRegion::register_raw(&pd, addr, len, Access::remote_rw(), MemoryKind::Peer)
    };
    mr.map(drop).map_err(errno)
}

/// Registers `[addr, addr+len)` as an io_uring fixed buffer on a fresh ring, then drops the
/// ring (which unregisters it).
fn uring_fixed_check(addr: *mut u8, len: usize) -> Result<(), i32> {
    let mut ring: peerpipe_uring::Ring =
        peerpipe_uring::Ring::new().map_err(|e| e.errno().unwrap_or(libc::EIO))?;
    // SAFETY: the probe's mapping outlives this call and the ring (dropped before return).
    let r = unsafe { ring.register_buffer(addr, len) };
    r.map(|_| ())
        .map_err(|e| e.errno().unwrap_or(libc::EOPNOTSUPP))
}

/// One NVMe read command (4 KiB at LBA 0) from `ns` into the provider memory.
fn passthrough_check(ns: &Path, addr: *mut u8, len: usize) -> Result<(), i32> {
    let errno = |e: peerpipe_uring::Error| e.errno().unwrap_or(libc::EIO);
    let namespace = peerpipe_uring::Namespace::open(ns).map_err(errno)?;
    let mut ring: peerpipe_uring::Ring<peerpipe_uring::RawBuf> =
        peerpipe_uring::Ring::builder().build().map_err(errno)?;
    let t = ring.add_namespace(&namespace).map_err(errno)?;
    // SAFETY: the range is the prober's live mapping, which stays mapped until this function
    // returns; the ring, and with it the operation, is dropped before that.
    let buf = unsafe { peerpipe_uring::RawBuf::new(addr, len.min(4096)) };
    ring.read(t, 0, buf, 1).map_err(|r| errno(r.error))?;
    let mut done = Vec::new();
    ring.wait(1, &mut done).map_err(errno)?;
    match done.pop().map(|c| c.result) {
        Some(Ok(n)) if n == len.min(4096) => Ok(()),
        Some(Ok(_)) => Err(libc::EIO),
        Some(Err(e)) => Err(errno(e)),
        None => Err(libc::EIO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> SysRoot {
        SysRoot::at(format!(
            "{}/p2p-alloc/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
    }

    #[test]
    fn switch_fixture_report() {
        let r = gather(&fixture("switch"), None).unwrap();
        assert_eq!(r.providers.len(), 1);
        assert_eq!(r.providers[0].available, Some(64 << 20));
        assert_eq!(r.nvme.len(), 2);
        assert_eq!(r.nvme[0].serial, "p2p0");
        assert_eq!(r.nvme[1].namespaces.len(), 1);
        let ns = &r.nvme[1].namespaces[0];
        assert_eq!(ns.name, "nvme1n1");
        assert_eq!(ns.lba_size, 4096);
        assert_eq!(ns.capacity_bytes, 1 << 30);
        assert!(ns.char_dev.ends_with("dev/ng1n1"));
        assert_eq!(r.rdma.len(), 2);
        let rxe = &r.rdma[1];
        assert_eq!(rxe.netdev.as_deref(), Some("veth0"));
        assert_eq!(rxe.ports[0].gids.len(), 2, "zero GID skipped");
        assert_eq!(r.matrix.len(), 4);
        let text = render_text(&r);
        assert!(text.contains("0000:03:00.0 -> nvme1"), "{text}");
        assert!(text.contains("software device on veth0"), "{text}");
    }

    #[test]
    fn json_parses_with_the_documented_fields() {
        let r = gather(&fixture("acs"), None).unwrap();
        let j = render_json(&r).unwrap();
        assert!(
            j.starts_with("{\"providers\":[{\"pci\":\"0000:03:00.0\""),
            "{j}"
        );
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["cpu_supports_p2pdma"], false);
        let m = v["matrix"].as_array().unwrap();
        assert!(m.iter().any(|x| x["map"] == "not-supported"), "{j}");
        assert!(m.iter().all(|x| x["usable"].is_boolean()), "{j}");
        assert!(v["providers"][0]["interfaces"].is_array(), "{j}");
        assert!(v["probes"].as_array().unwrap().is_empty(), "{j}");
    }
}
