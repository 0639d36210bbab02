//! RDMA devices: listing, opening, attributes, ports and GID tables.
//!
//! Contexts come from `rdma_get_devices`, i.e. they are the very `ibv_context`s librdmacm uses
//! for its connection ids. That is what lets a protection domain or CQ made here be used with a
//! QP created through rdma_cm (`rdma_create_qp` requires `pd->context == id->verbs`).

use std::ffi::CStr;
use std::net::Ipv4Addr;
use std::sync::Arc;

use rdma_sys::*;

use crate::error::{Error, Result};

/// An open RDMA device (cheap to clone; the device stays open while any clone, PD, CQ, ... lives).
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) ctx: *mut ibv_context,
    list: *mut *mut ibv_context,
    name: String,
}

// SAFETY: ibv_context is thread-safe per libibverbs' documented threading model.
unsafe impl Send for ContextInner {}
// SAFETY: as above.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: `list` came from rdma_get_devices and is freed exactly once here.
        unsafe { rdma_free_devices(self.list) };
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.inner.name)
            .finish()
    }
}

struct DeviceList {
    list: *mut *mut ibv_context,
    ctxs: Vec<*mut ibv_context>,
}

fn device_list() -> Result<DeviceList> {
    let mut n = 0;
    // SAFETY: plain FFI call with a valid out pointer.
    let list = unsafe { rdma_get_devices(&mut n) };
    if list.is_null() {
        return Err(Error::last_os("rdma_get_devices"));
    }
    let ctxs = (0..n as usize)
        // SAFETY: the array holds `n` valid entries.
        .map(|i| unsafe { *list.add(i) })
        .collect();
    Ok(DeviceList { list, ctxs })
}

fn ctx_name(ctx: *mut ibv_context) -> String {
    // SAFETY: ctx is a live context from rdma_get_devices; its device name is a C string.
    unsafe { CStr::from_ptr(ibv_get_device_name((*ctx).device)) }
        .to_string_lossy()
        .into_owned()
}

/// Names of all RDMA devices (e.g. `["rxe0", "rxe1"]`). Empty if there are none.
///
/// # Errors
/// `Verbs { op: "rdma_get_devices" }` with ENOSYS/ENODEV when the kernel has no RDMA support.
pub fn device_names() -> Result<Vec<String>> {
    let l = match device_list() {
        Ok(l) => l,
        Err(Error::Verbs { errno, .. }) if errno == libc::ENODEV => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let names = l.ctxs.iter().map(|&c| ctx_name(c)).collect();
    // SAFETY: freed once.
    unsafe { rdma_free_devices(l.list) };
    Ok(names)
}

impl Context {
    /// Opens the device called `name` (as in `ibv_devices` / `rdma link`).
    ///
    /// # Errors
    /// `NoSuchDevice` if no device has that name; `Verbs` if the device list cannot be read.
    pub fn open(name: &str) -> Result<Context> {
        let l = device_list()?;
        match l.ctxs.iter().find(|&&c| ctx_name(c) == name) {
            Some(&ctx) => Ok(Context {
                inner: Arc::new(ContextInner {
                    ctx,
                    list: l.list,
                    name: name.to_string(),
                }),
            }),
            None => {
                let present = l.ctxs.iter().map(|&c| ctx_name(c)).collect();
                // SAFETY: freed once.
                unsafe { rdma_free_devices(l.list) };
                Err(Error::NoSuchDevice {
                    name: name.to_string(),
                    present,
                })
            }
        }
    }

    /// The context librdmacm chose for a connection id.
    pub(crate) fn from_cm_verbs(verbs: *mut ibv_context) -> Result<Context> {
        let l = device_list()?;
        if !l.ctxs.contains(&verbs) {
            // SAFETY: freed once.
            unsafe { rdma_free_devices(l.list) };
            return Err(Error::InvalidArgument {
                op: "rdma_cm",
                reason: "connection id has a device context not in rdma_get_devices".into(),
            });
        }
        Ok(Context {
            inner: Arc::new(ContextInner {
                ctx: verbs,
                list: l.list,
                name: ctx_name(verbs),
            }),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The raw handle (the `ibv_context`), for verbs calls this crate does not wrap. Valid while
    /// `self` (or a clone) lives; do not destroy it.
    pub fn as_raw(&self) -> *mut ibv_context {
        self.inner.ctx
    }

    /// True if both handles are the same device context.
    pub fn same_device(&self, other: &Context) -> bool {
        self.inner.ctx == other.inner.ctx
    }

    /// Device attributes and limits.
    ///
    /// # Errors
    /// `Verbs { op: "ibv_query_device" }`.
    pub fn attributes(&self) -> Result<DeviceAttributes> {
        // SAFETY: zeroed POD out-struct, valid context.
        let mut a: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe { ibv_query_device(self.as_raw(), &mut a) };
        if rc != 0 {
            return Err(Error::from_ret("ibv_query_device", rc));
        }
        let caps = a.device_cap_flags;
        let mw2 = ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW_TYPE_2A.0
            | ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW_TYPE_2B.0;
        // SAFETY: fw_ver is a NUL-terminated char array filled by the driver.
        let fw = unsafe { CStr::from_ptr(a.fw_ver.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(DeviceAttributes {
            fw_ver: fw,
            vendor_id: a.vendor_id,
            vendor_part_id: a.vendor_part_id,
            max_mr_size: a.max_mr_size,
            max_qp: a.max_qp as u32,
            max_qp_wr: a.max_qp_wr as u32,
            max_sge: a.max_sge as u32,
            max_sge_rd: a.max_sge_rd as u32,
            max_cq: a.max_cq as u32,
            max_cqe: a.max_cqe as u32,
            max_mr: a.max_mr as u32,
            max_pd: a.max_pd as u32,
            max_qp_rd_atom: a.max_qp_rd_atom as u32,
            max_qp_init_rd_atom: a.max_qp_init_rd_atom as u32,
            max_srq: a.max_srq as u32,
            max_srq_wr: a.max_srq_wr as u32,
            max_mw: a.max_mw as u32,
            mw_type1: caps & ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW.0 != 0,
            mw_type2: caps & mw2 != 0,
            phys_port_cnt: a.phys_port_cnt,
        })
    }

    /// Port attributes (ports are numbered from 1).
    ///
    /// # Errors
    /// `Verbs { op: "ibv_query_port" }`, EINVAL for a port that does not exist.
    pub fn port(&self, port: u8) -> Result<PortAttributes> {
        // SAFETY: zeroed POD out-struct.
        let mut a: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out pointer.
        let rc = unsafe { ___ibv_query_port(self.as_raw(), port, &mut a) };
        if rc != 0 {
            return Err(Error::from_ret("ibv_query_port", rc));
        }
        Ok(PortAttributes {
            port,
            state: PortState::from_raw(a.state),
            max_mtu: mtu_bytes(a.max_mtu),
            active_mtu: mtu_bytes(a.active_mtu),
            gid_tbl_len: a.gid_tbl_len as u32,
            max_msg_sz: a.max_msg_sz,
            link_layer_ethernet: a.link_layer == 2, // IBV_LINK_LAYER_ETHERNET
        })
    }

    /// The non-empty entries of a port's GID table, with their type (RoCE v1/v2) from sysfs.
    ///
    /// # Errors
    /// `Verbs { op: "ibv_query_port" | "ibv_query_gid" }`.
    pub fn gids(&self, port: u8) -> Result<Vec<GidEntry>> {
        let pa = self.port(port)?;
        let mut out = Vec::new();
        for index in 0..pa.gid_tbl_len {
            // SAFETY: zeroed union of plain bytes.
            let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
            // SAFETY: valid context and out pointer.
            let rc = unsafe { ibv_query_gid(self.as_raw(), port, index as i32, &mut gid) };
            if rc != 0 {
                continue; // empty / invalid slots answer an error on some kernels
            }
            // SAFETY: the raw view of the union is always valid.
            let raw = unsafe { gid.raw };
            if raw == [0u8; 16] {
                continue;
            }
            let base = format!("/sys/class/infiniband/{}/ports/{port}", self.name());
            let kind = std::fs::read_to_string(format!("{base}/gid_attrs/types/{index}"))
                .map(|s| GidType::from_sysfs(s.trim()))
                .unwrap_or(GidType::Unknown);
            let netdev = std::fs::read_to_string(format!("{base}/gid_attrs/ndevs/{index}"))
                .ok()
                .map(|s| s.trim().to_string());
            out.push(GidEntry {
                index,
                gid: raw,
                kind,
                netdev,
            });
        }
        Ok(out)
    }

    /// Largest inline payload an RC QP on this device accepts (found by creating a probe QP:
    /// verbs has no query for it).
    ///
    /// # Errors
    /// `Verbs` if not even a QP without inline data can be created.
    pub fn max_inline_data(&self) -> Result<u32> {
        let pd = crate::ProtectionDomain::new(self)?;
        let cq = crate::CompletionQueue::new(self, 4)?;
        let mut want = 4096u32;
        loop {
            // SAFETY: zeroed init attr filled below with live CQ pointers.
            let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
            attr.send_cq = cq.as_raw();
            attr.recv_cq = cq.as_raw();
            attr.qp_type = ibv_qp_type::IBV_QPT_RC;
            attr.cap.max_send_wr = 1;
            attr.cap.max_recv_wr = 1;
            attr.cap.max_send_sge = 1;
            attr.cap.max_recv_sge = 1;
            attr.cap.max_inline_data = want;
            // SAFETY: valid PD and attr.
            let qp = unsafe { ibv_create_qp(pd.as_raw(), &mut attr) };
            if !qp.is_null() {
                let got = attr.cap.max_inline_data;
                // SAFETY: qp was just created and is destroyed once.
                unsafe { ibv_destroy_qp(qp) };
                return Ok(got);
            }
            if want == 0 {
                return Err(Error::last_os("ibv_create_qp"));
            }
            want /= 2;
        }
    }
}

/// The vendor id soft-RoCE (the kernel's `rdma_rxe`) reports.
pub const RXE_VENDOR_ID: u32 = 0xFF_FFFF;

/// Device limits and capabilities (`ibv_query_device`).
#[derive(Debug, Clone)]
pub struct DeviceAttributes {
    /// Firmware version.
    pub fw_ver: String,
    /// IEEE OUI of the vendor (soft-RoCE: [`RXE_VENDOR_ID`]).
    pub vendor_id: u32,
    /// The vendor's part number.
    pub vendor_part_id: u32,
    /// Largest memory region, in bytes.
    pub max_mr_size: u64,
    /// Most QPs.
    pub max_qp: u32,
    /// Most work requests per queue.
    pub max_qp_wr: u32,
    /// Most SGEs per send or receive work request.
    pub max_sge: u32,
    /// Most SGEs per RDMA READ.
    pub max_sge_rd: u32,
    /// Most CQs.
    pub max_cq: u32,
    /// Most entries per CQ.
    pub max_cqe: u32,
    /// Most memory regions.
    pub max_mr: u32,
    /// Most protection domains.
    pub max_pd: u32,
    /// Most RDMA READs (and atomics) a QP answers at once (responder resources).
    pub max_qp_rd_atom: u32,
    /// Most RDMA READs (and atomics) a QP has outstanding (initiator depth).
    pub max_qp_init_rd_atom: u32,
    /// Most shared receive queues.
    pub max_srq: u32,
    /// Most work requests per SRQ.
    pub max_srq_wr: u32,
    /// Most memory windows.
    pub max_mw: u32,
    /// Memory windows type 1 supported.
    pub mw_type1: bool,
    /// Memory windows type 2 (2A or 2B) supported.
    pub mw_type2: bool,
    /// Number of physical ports.
    pub phys_port_cnt: u8,
}

/// Logical port state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// The link is down.
    Down,
    /// The link is up, not yet configured by the subnet manager.
    Init,
    /// Configured, not yet active.
    Armed,
    /// Up and passing traffic.
    Active,
    /// Active, deferring to the subnet manager.
    ActiveDefer,
    /// A state this crate does not know.
    Other(u32),
}

impl PortState {
    fn from_raw(v: u32) -> PortState {
        match v {
            1 => PortState::Down,
            2 => PortState::Init,
            3 => PortState::Armed,
            4 => PortState::Active,
            5 => PortState::ActiveDefer,
            o => PortState::Other(o),
        }
    }
}

/// Port attributes (`ibv_query_port`).
#[derive(Debug, Clone)]
pub struct PortAttributes {
    /// Port number (from 1).
    pub port: u8,
    /// Logical state.
    pub state: PortState,
    /// MTU in bytes (256..4096).
    pub max_mtu: u32,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    /// Entries in the GID table.
    pub gid_tbl_len: u32,
    /// Largest message, in bytes.
    pub max_msg_sz: u32,
    /// RoCE (Ethernet) rather than InfiniBand.
    pub link_layer_ethernet: bool,
}

/// Maps `enum ibv_mtu` to bytes.
pub fn mtu_bytes(m: u32) -> u32 {
    match m {
        1..=5 => 128 << m,
        _ => 0,
    }
}

/// Kind of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    /// InfiniBand or RoCE v1 (`IB/RoCE v1` in sysfs).
    IbRoceV1,
    /// RoCE v2 (UDP/IP encapsulated; what rdma_cm uses over IP).
    RoceV2,
    /// sysfs reported another type, or none.
    Unknown,
}

impl GidType {
    fn from_sysfs(s: &str) -> GidType {
        match s {
            "RoCE v2" => GidType::RoceV2,
            "IB/RoCE v1" => GidType::IbRoceV1,
            _ => GidType::Unknown,
        }
    }
}

/// One GID table entry.
#[derive(Debug, Clone)]
pub struct GidEntry {
    /// Index in the port's GID table.
    pub index: u32,
    /// The GID (network byte order).
    pub gid: [u8; 16],
    /// Its type.
    pub kind: GidType,
    /// The network device this GID belongs to (RoCE), from sysfs.
    pub netdev: Option<String>,
}

impl GidEntry {
    /// The IPv4 address for an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        let g = &self.gid;
        if g[..10] == [0; 10] && g[10] == 0xff && g[11] == 0xff {
            Some(Ipv4Addr::new(g[12], g[13], g[14], g[15]))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_mapping() {
        assert_eq!(mtu_bytes(1), 256);
        assert_eq!(mtu_bytes(3), 1024);
        assert_eq!(mtu_bytes(5), 4096);
        assert_eq!(mtu_bytes(0), 0);
    }

    #[test]
    fn gid_ipv4_mapped() {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 77, 0, 1]);
        let e = GidEntry {
            index: 1,
            gid,
            kind: GidType::RoceV2,
            netdev: None,
        };
        assert_eq!(e.ipv4(), Some(Ipv4Addr::new(10, 77, 0, 1)));
        let e = GidEntry {
            index: 0,
            gid: [0xfe; 16],
            kind: GidType::IbRoceV1,
            netdev: None,
        };
        assert_eq!(e.ipv4(), None);
        assert_eq!(GidType::from_sysfs("RoCE v2"), GidType::RoceV2);
    }

    #[test]
    fn open_missing_device_is_typed() {
        // On a host without RDMA this is a Verbs/NoSuchDevice error, never a panic.
        match Context::open("no-such-device-xyz") {
            Err(Error::NoSuchDevice { name, .. }) => assert_eq!(name, "no-such-device-xyz"),
            Err(Error::Verbs { op, .. }) => assert_eq!(op, "rdma_get_devices"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
