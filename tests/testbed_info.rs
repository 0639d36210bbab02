//! `peerpipe info` on the testbed VM: the JSON report parsed and checked against the
//! devices, and the capability probe (with RDMA MR and io_uring checks plugged in) matching
//! the testbed's p2pmem capability matrix.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::process::Command;
use std::time::Duration;

use peerpipe::p2p_alloc::{discover, Interface, Outcome, Prober, SysRoot};
use peerpipe_testbed::*;

/// A parsed JSON value (a small reader for checking our own output).
#[derive(Debug, Clone, PartialEq)]
enum J {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(BTreeMap<String, J>),
}

impl J {
    fn get(&self, k: &str) -> &J {
        match self {
            J::Obj(m) => m
                .get(k)
                .unwrap_or_else(|| panic!("no field {k} in {self:?}")),
            _ => panic!("not an object: {self:?}"),
        }
    }
    fn arr(&self) -> &[J] {
        match self {
            J::Arr(v) => v,
            _ => panic!("not an array: {self:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            J::Str(s) => s,
            _ => panic!("not a string: {self:?}"),
        }
    }
    fn num(&self) -> f64 {
        match self {
            J::Num(n) => *n,
            _ => panic!("not a number: {self:?}"),
        }
    }
}

fn parse(s: &str) -> J {
    let b = s.as_bytes();
    let mut i = 0;
    let v = value(b, &mut i);
    ws(b, &mut i);
    assert_eq!(i, b.len(), "trailing data at {i}");
    v
}

fn ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn value(b: &[u8], i: &mut usize) -> J {
    ws(b, i);
    match b[*i] {
        b'{' => {
            *i += 1;
            let mut m = BTreeMap::new();
            ws(b, i);
            if b[*i] == b'}' {
                *i += 1;
                return J::Obj(m);
            }
            loop {
                ws(b, i);
                let J::Str(k) = value(b, i) else {
                    panic!("object key at {i}")
                };
                ws(b, i);
                assert_eq!(b[*i], b':', "colon at {i}");
                *i += 1;
                m.insert(k, value(b, i));
                ws(b, i);
                *i += 1;
                match b[*i - 1] {
                    b',' => continue,
                    b'}' => return J::Obj(m),
                    c => panic!("unexpected {} at {i}", c as char),
                }
            }
        }
        b'[' => {
            *i += 1;
            let mut v = Vec::new();
            ws(b, i);
            if b[*i] == b']' {
                *i += 1;
                return J::Arr(v);
            }
            loop {
                v.push(value(b, i));
                ws(b, i);
                *i += 1;
                match b[*i - 1] {
                    b',' => continue,
                    b']' => return J::Arr(v),
                    c => panic!("unexpected {} at {i}", c as char),
                }
            }
        }
        b'"' => {
            *i += 1;
            let mut s = String::new();
            loop {
                let c = b[*i];
                *i += 1;
                match c {
                    b'"' => return J::Str(s),
                    b'\\' => {
                        let e = b[*i];
                        *i += 1;
                        match e {
                            b'n' => s.push('\n'),
                            b't' => s.push('\t'),
                            b'r' => s.push('\r'),
                            b'u' => {
                                let h = std::str::from_utf8(&b[*i..*i + 4]).unwrap();
                                s.push(
                                    char::from_u32(u32::from_str_radix(h, 16).unwrap()).unwrap(),
                                );
                                *i += 4;
                            }
                            c => s.push(c as char),
                        }
                    }
                    _ => {
                        // Multi-byte UTF-8: copy the whole sequence.
                        let start = *i - 1;
                        let mut end = *i;
                        while end < b.len() && (b[end] & 0xc0) == 0x80 {
                            end += 1;
                        }
                        s.push_str(std::str::from_utf8(&b[start..end]).unwrap());
                        *i = end;
                    }
                }
            }
        }
        b't' if b[*i..].starts_with(b"true") => {
            *i += 4;
            J::Bool(true)
        }
        b'f' if b[*i..].starts_with(b"false") => {
            *i += 5;
            J::Bool(false)
        }
        b'n' if b[*i..].starts_with(b"null") => {
            *i += 4;
            J::Null
        }
        _ => {
            let start = *i;
            while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                *i += 1;
            }
            J::Num(
                std::str::from_utf8(&b[start..*i])
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|e| panic!("number at {start}: {e}")),
            )
        }
    }
}

#[test]
fn json_reader_reads_what_it_should() {
    let v = parse(r#" {"a":[1,-2.5e1,true,false,null],"b":"x\"\u00e9y","c":{}} "#);
    assert_eq!(v.get("a").arr()[1], J::Num(-25.0));
    assert_eq!(v.get("b").str(), "x\"éy");
    assert_eq!(v.get("c"), &J::Obj(BTreeMap::new()));
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

    let providers = j.get("providers").arr();
    assert_eq!(providers.len(), 1);
    let p = &providers[0];
    assert_eq!(p.get("pci").str(), "0000:03:00.0");
    assert_eq!(p.get("size").num(), CMB);
    assert_eq!(
        p.get("available").num(),
        CMB,
        "probe mappings were returned"
    );
    assert_eq!(p.get("published"), &J::Bool(true));
    assert_eq!(p.get("chardev").str(), "/dev/p2pmem0");
    let ifaces: Vec<&str> = p.get("interfaces").arr().iter().map(J::str).collect();
    assert_eq!(ifaces, ["chardev", "sysfs"]);

    // NVMe: one controller per drive, serials and namespaces as the testbed made them.
    let nvme = j.get("nvme").arr();
    assert_eq!(nvme.len(), drive_count());
    let mut by_serial = BTreeMap::new();
    for c in nvme {
        by_serial.insert(c.get("serial").str().to_string(), c);
        let ns = c.get("namespaces").arr();
        assert_eq!(ns.len(), 1, "{c:?}");
        let d = drive(c.get("serial").str());
        assert_eq!(ns[0].get("block_dev").str(), d.block.to_str().unwrap());
        assert_eq!(ns[0].get("char_dev").str(), d.ng.to_str().unwrap());
        assert_eq!(ns[0].get("lba_size").num(), d.lba_size as f64);
        assert_eq!(ns[0].get("capacity_bytes").num(), (1u64 << 30) as f64);
    }
    assert_eq!(by_serial["p2p0"].get("pci").str(), "0000:03:00.0");
    assert!(by_serial.contains_key("data1"));

    // RDMA: rxe0/rxe1 on the veths, port active, the RoCE v2 GID of their IPv4 address.
    let rdma = j.get("rdma").arr();
    let (a0, a1) = addrs();
    for (name, netdev, addr) in [("rxe0", "veth0", &a0), ("rxe1", "veth1", &a1)] {
        let d = rdma
            .iter()
            .find(|d| d.get("name").str() == name)
            .unwrap_or_else(|| panic!("{name} missing: {rdma:?}"));
        assert_eq!(d.get("pci"), &J::Null);
        assert_eq!(d.get("netdev").str(), netdev);
        let port = &d.get("ports").arr()[0];
        assert!(port.get("state").str().contains("ACTIVE"), "{port:?}");
        let ip: std::net::Ipv4Addr = addr.parse().unwrap();
        let o = ip.octets();
        let want = format!("ffff:{:02x}{:02x}:{:02x}{:02x}", o[0], o[1], o[2], o[3]);
        assert!(
            port.get("gids")
                .arr()
                .iter()
                .any(|g| g.get("gid").str().ends_with(&want)),
            "{name}: no GID for {addr}: {port:?}"
        );
    }

    // Matrix: same device for the CMB drive, bus-addr via the switch for the others,
    // CPU copy for rxe.
    let matrix = j.get("matrix").arr();
    assert_eq!(matrix.len(), drive_count() + rdma.len());
    for v in matrix {
        let client = v.get("client").str();
        let map = v.get("map").str();
        if v.get("client_kind").str() == "rdma" {
            assert_eq!(map, "cpu-copy", "{v:?}");
            assert_eq!(v.get("distance"), &J::Null);
            continue;
        }
        assert_eq!(map, "bus-addr", "{v:?}");
        let serial = nvme
            .iter()
            .find(|c| c.get("name").str() == client)
            .unwrap()
            .get("serial")
            .str();
        let want = if serial == "p2p0" { 0.0 } else { 4.0 };
        assert_eq!(v.get("distance").num(), want, "{v:?}");
    }

    // Probe: the binary's cells (cpu, o_direct, uring_fixed) match the matrix.
    let probes = j.get("probes").arr();
    assert_eq!(probes.len(), 2);
    for p in probes {
        let cell = |n: &str| {
            p.get("cells")
                .arr()
                .iter()
                .find(|c| c.get("name").str() == n)
                .unwrap_or_else(|| panic!("no cell {n}: {p:?}"))
                .get("result")
                .str()
                .to_string()
        };
        assert_eq!(cell("cpu"), "ok", "{p:?}");
        assert_eq!(cell("o_direct"), "ok", "{p:?}");
        assert_eq!(cell("nvme_passthrough"), "ok", "{p:?}");
        let want = match p.get("interface").str() {
            "chardev" => "EREMOTEIO",
            _ => "EFAULT",
        };
        assert_eq!(cell("uring_fixed"), want, "{p:?}");
        let mr_want = match p.get("interface").str() {
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
    assert_eq!(j.get("providers").arr()[0].get("size").num(), CMB);
    let v = j
        .get("matrix")
        .arr()
        .iter()
        .find(|v| v.get("client").str() == "nvme1")
        .unwrap();
    assert_eq!(v.get("map").str(), "not-supported");
    assert_eq!(v.get("usable"), &J::Bool(false));
    assert!(v.get("reason").str().contains("ACS redirect"), "{v:?}");
    assert_eq!(j.get("probes").arr().len(), 0);
    let bad = run(
        Command::new(env!("CARGO_BIN_EXE_peerpipe")).args(["info", "--bogus"]),
        Duration::from_secs(60),
    );
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
}
