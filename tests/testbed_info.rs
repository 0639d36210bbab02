//! `peerpipe info` on the testbed VM: the JSON report parsed and checked against the
//! devices, and the capability probe (with RDMA MR and io_uring checks plugged in) matching
//! the testbed's p2pmem capability matrix.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::process::Command;
use std::time::Duration;

use peerpipe::p2p_alloc::{discover, Interface, Outcome, Prober, SysRoot};
use peerpipe_testbed::*;

/// `peerpipe info --json` parsed by serde_json.
type J = serde_json::Value;

/// Panicking accessors that name what is missing (the tests check our own output).
trait JExt {
    fn at(&self, k: &str) -> &J;
    fn arr(&self) -> &[J];
    fn str(&self) -> &str;
    fn num(&self) -> f64;
}

impl JExt for J {
    fn at(&self, k: &str) -> &J {
        self.as_object()
            .unwrap_or_else(|| panic!("not an object: {self:?}"))
            .get(k)
            .unwrap_or_else(|| panic!("no field {k} in {self:?}"))
    }
    fn arr(&self) -> &[J] {
        self.as_array()
            .unwrap_or_else(|| panic!("not an array: {self:?}"))
    }
    fn str(&self) -> &str {
        self.as_str()
            .unwrap_or_else(|| panic!("not a string: {self:?}"))
    }
    fn num(&self) -> f64 {
        self.as_f64()
            .unwrap_or_else(|| panic!("not a number: {self:?}"))
    }
}

fn parse(s: &str) -> J {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn info_json() -> J {
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_peerpipe")).args(["info", "--json"]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", text(&out));
    parse(&String::from_utf8(out.stdout).unwrap())
}

const CMB: f64 = (64 << 20) as f64;

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn info_json_describes_the_testbed() {
    require_testbed();
    let j = info_json();

    let providers = j.at("providers").arr();
    assert_eq!(providers.len(), 1);
    let p = &providers[0];
    assert_eq!(p.at("pci").str(), "0000:03:00.0");
    assert_eq!(p.at("size").num(), CMB);
    assert_eq!(p.at("available").num(), CMB, "probe mappings were returned");
    assert_eq!(p.at("published"), &J::Bool(true));
    assert_eq!(p.at("chardev").str(), "/dev/p2pmem0");
    let ifaces: Vec<&str> = p.at("interfaces").arr().iter().map(J::str).collect();
    assert_eq!(ifaces, ["chardev", "sysfs"]);

    // NVMe: one controller per drive, serials and namespaces as the testbed made them.
    let nvme = j.at("nvme").arr();
    assert_eq!(nvme.len(), drive_count());
    let mut by_serial = BTreeMap::new();
    for c in nvme {
        by_serial.insert(c.at("serial").str().to_string(), c);
        let ns = c.at("namespaces").arr();
        assert_eq!(ns.len(), 1, "{c:?}");
        let d = drive(c.at("serial").str());
        assert_eq!(ns[0].at("block_dev").str(), d.block.to_str().unwrap());
        assert_eq!(ns[0].at("char_dev").str(), d.ng.to_str().unwrap());
        assert_eq!(ns[0].at("lba_size").num(), d.lba_size as f64);
        assert_eq!(ns[0].at("capacity_bytes").num(), (1u64 << 30) as f64);
    }
    assert_eq!(by_serial["p2p0"].at("pci").str(), "0000:03:00.0");
    assert!(by_serial.contains_key("data1"));

    // RDMA: rxe0/rxe1 on the veths, port active, the RoCE v2 GID of their IPv4 address.
    let rdma = j.at("rdma").arr();
    let (a0, a1) = addrs();
    for (name, netdev, addr) in [("rxe0", "veth0", &a0), ("rxe1", "veth1", &a1)] {
        let d = rdma
            .iter()
            .find(|d| d.at("name").str() == name)
            .unwrap_or_else(|| panic!("{name} missing: {rdma:?}"));
        assert_eq!(d.at("pci"), &J::Null);
        assert_eq!(d.at("netdev").str(), netdev);
        let port = &d.at("ports").arr()[0];
        assert!(port.at("state").str().contains("ACTIVE"), "{port:?}");
        let ip: std::net::Ipv4Addr = addr.parse().unwrap();
        let o = ip.octets();
        let want = format!("ffff:{:02x}{:02x}:{:02x}{:02x}", o[0], o[1], o[2], o[3]);
        assert!(
            port.at("gids")
                .arr()
                .iter()
                .any(|g| g.at("gid").str().ends_with(&want)),
            "{name}: no GID for {addr}: {port:?}"
        );
    }

    // Matrix: same device for the CMB drive, bus-addr via the switch for the others,
    // CPU copy for rxe.
    let matrix = j.at("matrix").arr();
    assert_eq!(matrix.len(), drive_count() + rdma.len());
    for v in matrix {
        let client = v.at("client").str();
        let map = v.at("map").str();
        if v.at("client_kind").str() == "rdma" {
            assert_eq!(map, "cpu-copy", "{v:?}");
            assert_eq!(v.at("distance"), &J::Null);
            continue;
        }
        assert_eq!(map, "bus-addr", "{v:?}");
        let serial = nvme
            .iter()
            .find(|c| c.at("name").str() == client)
            .unwrap()
            .at("serial")
            .str();
        let want = if serial == "p2p0" { 0.0 } else { 4.0 };
        assert_eq!(v.at("distance").num(), want, "{v:?}");
    }

    // Probe: the binary's cells (cpu, o_direct, uring_fixed) match the matrix.
    let probes = j.at("probes").arr();
    assert_eq!(probes.len(), 2);
    for p in probes {
        let cell = |n: &str| {
            p.at("cells")
                .arr()
                .iter()
                .find(|c| c.at("name").str() == n)
                .unwrap_or_else(|| panic!("no cell {n}: {p:?}"))
                .at("result")
                .str()
                .to_string()
        };
        assert_eq!(cell("cpu"), "ok", "{p:?}");
        assert_eq!(cell("o_direct"), "ok", "{p:?}");
        assert_eq!(cell("nvme_passthrough"), "ok", "{p:?}");
        let want = match p.at("interface").str() {
            "chardev" => "EREMOTEIO",
            _ => "EFAULT",
        };
        assert_eq!(cell("uring_fixed"), want, "{p:?}");
        let mr_want = match p.at("interface").str() {
            "chardev" => "ok",
            _ => "EFAULT",
        };
        for dev in ["rxe0", "rxe1"] {
            assert_eq!(cell(&format!("rdma_mr:{dev}")), mr_want, "{p:?}");
        }
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn info_text_names_everything() {
    require_testbed();
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_peerpipe")).args(["info"]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", text(&out));
    let t = String::from_utf8(out.stdout).unwrap();
    for want in [
        "0000:03:00.0  size 64 MiB",
        "chardev /dev/p2pmem0",
        "serial p2p0",
        "software device on veth0",
        "bus-addr",
        "cpu-copy",
        "uring_fixed EREMOTEIO",
        "uring_fixed EFAULT",
        "rdma_mr:rxe0 ok",
        "rdma_mr:rxe0 EFAULT",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
}

/// `ibv_reg_mr` on rxe0 over `(addr, len)`: the check the pipeline plugs into the probe.
fn rxe0_reg_mr(addr: *mut u8, len: usize) -> Result<(), i32> {
    use rdma_sys::*;
    // SAFETY: verbs objects created and destroyed here in order; the range is the probe's
    // live mapping.
    unsafe {
        let mut n = 0;
        let list = ibv_get_device_list(&mut n);
        if list.is_null() {
            return Err(libc::ENODEV);
        }
        let dev = (0..n.max(0) as usize)
            .map(|i| *list.add(i))
            .find(|d| CStr::from_ptr(ibv_get_device_name(*d)).to_bytes() == b"rxe0");
        let ctx = dev.map_or(std::ptr::null_mut(), |d| ibv_open_device(d));
        ibv_free_device_list(list);
        if ctx.is_null() {
            return Err(libc::ENODEV);
        }
        let pd = ibv_alloc_pd(ctx);
        let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0 as i32;
        let mr = ibv_reg_mr(pd, addr.cast(), len, access);
        let r = if mr.is_null() {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        } else {
            ibv_dereg_mr(mr);
            Ok(())
        };
        ibv_dealloc_pd(pd);
        ibv_close_device(ctx);
        r
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn probe_with_rdma_and_uring_checks_matches_the_capability_matrix() {
    require_testbed();
    let root = SysRoot::live();
    let p = discover(&root).unwrap().remove(0);
    let data1 = drive("data1");
    let prober = peerpipe::info::with_default_checks(
        Prober::new()
            .o_direct_from(&data1.block)
            .check("rdma_mr", rxe0_reg_mr),
        &["rxe0".to_string()],
        Some(data1.ng.clone()),
    );
    let ok = Outcome::Ok;
    let err = |errno| Outcome::Failed { errno };
    // (interface, rdma_mr, uring_fixed) from the testbed notes' matrix.
    for (iface, mr, uring) in [
        (Interface::CharDev, ok.clone(), err(libc::EREMOTEIO)),
        (Interface::Sysfs, err(libc::EFAULT), err(libc::EFAULT)),
    ] {
        let r = prober.probe(&p, iface);
        assert_eq!(r.cell("cpu"), Some(&Outcome::Ok), "{r:?}");
        assert_eq!(r.cell("o_direct"), Some(&Outcome::Ok), "{r:?}");
        assert_eq!(r.cell("nvme_passthrough"), Some(&Outcome::Ok), "{r:?}");
        assert_eq!(r.cell("rdma_mr"), Some(&mr), "{iface:?}: {r:?}");
        // The same registration through peerpipe-rdma agrees with the raw verbs call.
        assert_eq!(r.cell("rdma_mr:rxe0"), Some(&mr), "{iface:?}: {r:?}");
        assert_eq!(r.cell("uring_fixed"), Some(&uring), "{iface:?}: {r:?}");
    }
    assert_eq!(p.available().unwrap(), 64 << 20);
}

/// Host test: the binary on a recorded tree (no probe: it maps real memory only on `/`).
#[test]
fn info_json_on_a_recorded_tree() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/p2p-alloc/tests/fixtures/acs");
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_peerpipe")).args(["info", "--json", "--sysroot", root]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out));
    let j = parse(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(j.at("providers").arr()[0].at("size").num(), CMB);
    let v = j
        .at("matrix")
        .arr()
        .iter()
        .find(|v| v.at("client").str() == "nvme1")
        .unwrap();
    assert_eq!(v.at("map").str(), "not-supported");
    assert_eq!(v.at("usable"), &J::Bool(false));
    assert!(v.at("reason").str().contains("ACS redirect"), "{v:?}");
    assert_eq!(j.at("probes").arr().len(), 0);
    let bad = run(
        Command::new(env!("CARGO_BIN_EXE_peerpipe")).args(["info", "--bogus"]),
        Duration::from_secs(60),
    );
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
}
