//! The `peerpipe info --json` schema: serde views of a [`Report`] (field names are stable;
//! the README documents them).

use serde::Serialize;

use super::{errno_name, NamespaceInfo, NvmeInfo, Outcome, Report};

#[derive(Serialize)]
pub(super) struct Json<'a> {
    providers: Vec<Provider<'a>>,
    nvme: Vec<Nvme<'a>>,
    rdma: Vec<Rdma<'a>>,
    matrix: Vec<Verdict<'a>>,
    probes: Vec<Probe<'a>>,
    cpu_supports_p2pdma: bool,
}

#[derive(Serialize)]
struct Provider<'a> {
    pci: &'a str,
    interfaces: Vec<&'static str>,
    chardev: Option<String>,
    sysfs: Option<String>,
    size: Option<u64>,
    available: Option<u64>,
    published: Option<bool>,
    numa_node: Option<u32>,
}

#[derive(Serialize)]
struct Nvme<'a> {
    name: &'a str,
    serial: &'a str,
    model: &'a str,
    firmware: &'a str,
    transport: &'a str,
    pci: Option<&'a str>,
    numa_node: Option<u32>,
    namespaces: Vec<Namespace<'a>>,
}

#[derive(Serialize)]
struct Namespace<'a> {
    name: &'a str,
    block_dev: String,
    char_dev: String,
    lba_size: u64,
    capacity_bytes: u64,
}

#[derive(Serialize)]
struct Rdma<'a> {
    name: &'a str,
    node_guid: &'a str,
    pci: Option<&'a str>,
    netdev: Option<&'a str>,
    ports: Vec<Port<'a>>,
}

#[derive(Serialize)]
struct Port<'a> {
    port: u32,
    state: &'a str,
    phys_state: &'a str,
    link_layer: &'a str,
    rate: &'a str,
    gids: Vec<Gid<'a>>,
}

#[derive(Serialize)]
struct Gid<'a> {
    index: u32,
    gid: &'a str,
    #[serde(rename = "type")]
    kind: Option<&'a str>,
}

#[derive(Serialize)]
struct Verdict<'a> {
    provider: &'a str,
    client: &'a str,
    client_kind: &'static str,
    client_pci: Option<&'a str>,
    map: &'static str,
    usable: bool,
    distance: Option<u32>,
    reason: String,
    path: &'a [String],
    acs_unknown: &'a [String],
    host_bridge_whitelisted: Option<bool>,
    provider_numa: Option<u32>,
    client_numa: Option<u32>,
}

#[derive(Serialize)]
struct Probe<'a> {
    provider: &'a str,
    interface: &'static str,
    cells: Vec<Cell<'a>>,
}

#[derive(Serialize)]
struct Cell<'a> {
    name: &'a str,
    result: String,
    errno: Option<i32>,
    note: Option<&'a str>,
}

fn namespace(n: &NamespaceInfo) -> Namespace<'_> {
    Namespace {
        name: &n.name,
        block_dev: n.block_dev.display().to_string(),
        char_dev: n.char_dev.display().to_string(),
        lba_size: n.lba_size,
        capacity_bytes: n.capacity_bytes,
    }
}

fn nvme(c: &NvmeInfo) -> Nvme<'_> {
    Nvme {
        name: &c.name,
        serial: &c.serial,
        model: &c.model,
        firmware: &c.firmware,
        transport: &c.transport,
        pci: c.pci.as_deref(),
        numa_node: c.numa_node,
        namespaces: c.namespaces.iter().map(namespace).collect(),
    }
}

impl<'a> Json<'a> {
    pub(super) fn new(r: &'a Report) -> Json<'a> {
        let providers = r
            .providers
            .iter()
            .map(|p| {
                let pr = &p.provider;
                Provider {
                    pci: &pr.pci,
                    interfaces: pr.interfaces().iter().map(|i| i.name()).collect(),
                    chardev: pr.chardev.as_ref().map(|p| p.display().to_string()),
                    sysfs: pr.sysfs_dir.as_ref().map(|d| d.display().to_string()),
                    size: pr.size,
                    available: p.available,
                    published: pr.published,
                    numa_node: pr.numa_node,
                }
            })
            .collect();
        let rdma = r
            .rdma
            .iter()
            .map(|d| Rdma {
                name: &d.name,
                node_guid: &d.node_guid,
                pci: d.pci.as_deref(),
                netdev: d.netdev.as_deref(),
                ports: d
                    .ports
                    .iter()
                    .map(|p| Port {
                        port: p.port,
                        state: &p.state,
                        phys_state: &p.phys_state,
                        link_layer: &p.link_layer,
                        rate: &p.rate,
                        gids: p
                            .gids
                            .iter()
                            .map(|g| Gid {
                                index: g.index,
                                gid: &g.gid,
                                kind: g.kind.as_deref(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        let matrix = r
            .matrix
            .iter()
            .map(|v| Verdict {
                provider: &v.provider,
                client: &v.client.name,
                client_kind: v.client.kind.name(),
                client_pci: v.client.pci.as_deref(),
                map: v.map.name(),
                usable: v.map.usable(),
                distance: v.distance,
                reason: v.explain(),
                path: &v.path,
                acs_unknown: &v.acs_unknown,
                host_bridge_whitelisted: v.host_bridge_whitelisted,
                provider_numa: v.provider_numa,
                client_numa: v.client.numa_node,
            })
            .collect();
        let probes = r
            .probes
            .iter()
            .map(|p| Probe {
                provider: &p.provider,
                interface: p.interface.name(),
                cells: p
                    .cells
                    .iter()
                    .map(|c| {
                        let (result, errno, note) = match &c.outcome {
                            Outcome::Ok => ("ok".to_string(), None, None),
                            Outcome::Failed { errno } => (errno_name(*errno), Some(*errno), None),
                            Outcome::Skipped { why } => {
                                ("skipped".to_string(), None, Some(why.as_str()))
                            }
                        };
                        Cell {
                            name: &c.name,
                            result,
                            errno,
                            note,
                        }
                    })
                    .collect(),
            })
            .collect();
        Json {
            providers,
            nvme: r.nvme.iter().map(nvme).collect(),
            rdma,
            matrix,
            probes,
            cpu_supports_p2pdma: r.cpu_supports_p2pdma,
        }
    }
}
