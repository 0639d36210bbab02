//! Topology verdicts on recorded sysfs trees (tests/fixtures/<layout>, made by
//! make_fixtures.py; `testbed` recorded from the testbed VM by record_sysfs.sh).

use peerpipe_p2p_alloc::{
    discover, Acs, Client, ClientKind, Interface, MapType, Reason, SysRoot, Topology,
};

fn fixture(name: &str) -> SysRoot {
    SysRoot::at(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures").to_string() + "/" + name)
}

fn client(root: &SysRoot, name: &str) -> Client {
    peerpipe_p2p_alloc::clients(root)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no client {name}"))
}

#[test]
fn switch_layout_finds_one_provider_with_both_interfaces() {
    let root = fixture("switch");
    let p = discover(&root).unwrap();
    assert_eq!(p.len(), 1, "{p:?}");
    let p = &p[0];
    assert_eq!(p.pci, "0000:03:00.0");
    assert_eq!(p.size, Some(64 << 20));
    assert_eq!(p.published, Some(true));
    assert_eq!(p.available().unwrap(), 64 << 20);
    assert_eq!(p.interfaces(), vec![Interface::CharDev, Interface::Sysfs]);
    assert!(p.chardev.as_ref().unwrap().ends_with("dev/p2pmem0"));
    assert!(p
        .map_path(Interface::Sysfs)
        .unwrap()
        .ends_with("0000:03:00.0/p2pmem/allocate"));
    assert_eq!(p.numa_node, Some(0));
}

#[test]
fn clients_are_nvme_controllers_and_rdma_devices() {
    let root = fixture("switch");
    let c = peerpipe_p2p_alloc::clients(&root);
    let names: Vec<(&str, ClientKind, Option<&str>)> = c
        .iter()
        .map(|c| (c.name.as_str(), c.kind, c.pci.as_deref()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("nvme0", ClientKind::Nvme, Some("0000:03:00.0")),
            ("nvme1", ClientKind::Nvme, Some("0000:04:00.0")),
            ("mlx5_0", ClientKind::Rdma, Some("0000:05:00.0")),
            ("rxe0", ClientKind::Rdma, None),
        ]
    );
}

#[test]
fn same_device_is_distance_zero() {
    let root = fixture("switch");
    let v = Topology::new(&root).verdict("0000:03:00.0", &client(&root, "nvme0"));
    assert_eq!(v.map, MapType::BusAddr);
    assert_eq!(v.reason, Reason::SameDevice);
    assert_eq!(v.distance, Some(0));
    assert_eq!(v.path, vec!["0000:03:00.0"]);
}

#[test]
fn drives_under_one_switch_meet_at_the_upstream_port() {
    let root = fixture("switch");
    let v = Topology::new(&root).verdict("0000:03:00.0", &client(&root, "nvme1"));
    assert_eq!(v.map, MapType::BusAddr);
    assert_eq!(
        v.reason,
        Reason::CommonUpstream {
            bridge: "0000:01:00.0".into()
        }
    );
    assert_eq!(v.distance, Some(4));
    assert_eq!(
        v.path,
        vec![
            "0000:03:00.0",
            "0000:02:00.0",
            "0000:01:00.0",
            "0000:02:01.0",
            "0000:04:00.0"
        ]
    );
    assert!(v.acs_unknown.is_empty());
    assert_eq!(v.host_bridge_whitelisted, None);
}

#[test]
fn unreadable_acs_is_reported_not_assumed() {
    let root = fixture("switch");
    let v = Topology::new(&root).verdict("0000:03:00.0", &client(&root, "mlx5_0"));
    assert_eq!(v.map, MapType::BusAddr);
    assert_eq!(v.acs_unknown, vec!["0000:02:02.0"]);
    assert_eq!(v.distance, Some(4));
}

#[test]
fn software_rdma_device_is_a_cpu_copy() {
    let root = fixture("switch");
    let v = Topology::new(&root).verdict("0000:03:00.0", &client(&root, "rxe0"));
    assert_eq!(v.map, MapType::CpuCopy);
    assert_eq!(v.reason, Reason::SoftwareDevice);
    assert_eq!(v.distance, None);
    assert!(v.explain().contains("CPU"));
}

#[test]
fn acs_redirect_on_the_switch_blocks_p2p_under_a_non_whitelisted_root() {
    let root = fixture("acs");
    let v = Topology::new(&root).verdict("0000:03:00.0", &client(&root, "nvme1"));
    assert_eq!(
        v.reason,
        Reason::AcsRedirect {
            bridges: vec!["0000:02:00.0".into(), "0000:02:01.0".into()]
        }
    );
    assert_eq!(v.map, MapType::NotSupported);
    assert_eq!(v.host_bridge_whitelisted, Some(false));
    assert_eq!(v.distance, Some(4));
    assert!(
        v.explain()
            .contains("pci=disable_acs_redir=0000:02:00.0;0000:02:01.0"),
        "{}",
        v.explain()
    );
    // The same device is unaffected by ACS.
    let same = Topology::new(&root).verdict("0000:03:00.0", &client(&root, "nvme0"));
    assert_eq!(same.map, MapType::BusAddr);
}

#[test]
fn acs_control_register_is_parsed_from_config_space() {
    let root = fixture("acs");
    let cfg = std::fs::read(root.path("sys/bus/pci/devices/0000:02:00.0/config")).unwrap();
    assert_eq!(Acs::from_config(&cfg), Acs::Present { ctrl: 0x001d });
    assert!(Acs::from_config(&cfg).redirects());
    let plain = std::fs::read(root.path("sys/bus/pci/devices/0000:03:00.0/config")).unwrap();
    assert_eq!(Acs::from_config(&plain), Acs::Absent);
    assert_eq!(Acs::from_config(&plain[..64]), Acs::Unreadable);
    // Source Validation alone does not redirect.
    assert!(!Acs::Present { ctrl: 0x0001 }.redirects());
}

#[test]
fn root_ports_of_a_whitelisted_root_complex_go_through_the_host_bridge() {
    let root = fixture("rootcomplex");
    let v = Topology::new(&root).verdict("0000:01:00.0", &client(&root, "mlx5_0"));
    assert_eq!(v.reason, Reason::NoCommonUpstream);
    assert_eq!(v.map, MapType::ThroughHostBridge);
    assert_eq!(v.host_bridge_whitelisted, Some(true));
    assert_eq!(v.distance, Some(4));
    assert_eq!(
        v.path,
        vec![
            "0000:01:00.0",
            "0000:00:01.0",
            "pci0000:00",
            "0000:00:02.0",
            "0000:02:00.0"
        ]
    );
}

#[test]
fn different_root_complexes_need_a_whitelist_without_same_bridge_requirement() {
    let root = fixture("rootcomplex");
    let c = client(&root, "nvme1");
    assert_eq!(c.numa_node, Some(1));
    let v = Topology::new(&root).verdict("0000:01:00.0", &c);
    assert_eq!(v.reason, Reason::NoCommonUpstream);
    // 8086:2f00 is whitelisted only when both ends share the host bridge.
    assert_eq!(v.map, MapType::NotSupported);
    assert_eq!(v.host_bridge_whitelisted, Some(false));
    assert_eq!(v.provider_numa, Some(0));
    assert!(v.path.contains(&"pci0000:80".to_string()));
}

#[test]
fn amd_zen_cpus_route_p2p_through_any_root_complex() {
    // Copy the rootcomplex tree's cpuinfo decision by pointing at an AMD cpuinfo: build a
    // scratch root holding a symlink to the fixture's sys/ and an AMD proc/cpuinfo.
    let scratch = std::env::temp_dir().join(format!("p2p-alloc-amd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("proc")).unwrap();
    std::os::unix::fs::symlink(fixture("rootcomplex").path("sys"), scratch.join("sys")).unwrap();
    std::fs::write(
        scratch.join("proc/cpuinfo"),
        "vendor_id\t: AuthenticAMD\ncpu family\t: 25\n",
    )
    .unwrap();
    let root = SysRoot::at(&scratch);
    let topo = Topology::new(&root);
    assert!(topo.cpu_supports_p2pdma());
    let v = topo.verdict("0000:01:00.0", &client(&root, "nvme1"));
    assert_eq!(v.map, MapType::ThroughHostBridge);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn missing_provider_is_reported() {
    let root = fixture("switch");
    let v = Topology::new(&root).verdict("0000:09:00.0", &client(&root, "nvme1"));
    assert_eq!(v.map, MapType::NotSupported);
    assert!(matches!(v.reason, Reason::NotFound { .. }));
}

#[test]
fn a_tree_without_p2pdma_has_no_providers() {
    let root = fixture("rootcomplex");
    let p = discover(&root).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].interfaces(), vec![Interface::Sysfs]);
    let empty = SysRoot::at("/nonexistent-root");
    assert!(discover(&empty).unwrap().is_empty());
}

// ---- the testbed VM's real tree (recorded with record_sysfs.py) -------------------------

#[test]
fn recorded_testbed_tree_matches_the_vm() {
    let root = fixture("testbed");
    let p = discover(&root).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].pci, "0000:03:00.0");
    assert_eq!(p[0].size, Some(64 << 20));
    assert_eq!(
        p[0].interfaces(),
        vec![Interface::CharDev, Interface::Sysfs]
    );
    // QEMU's Q35 host bridge is not on the kernel's whitelist; the CPU is not AMD Zen.
    let topo = Topology::new(&root);
    assert!(!topo.cpu_supports_p2pdma());
    // The root port has an ACS capability with nothing enabled.
    let rp = std::fs::read(root.path("sys/bus/pci/devices/0000:00:0a.0/config")).unwrap();
    assert_eq!(Acs::from_config(&rp), Acs::Present { ctrl: 0 });
    let clients = peerpipe_p2p_alloc::clients(&root);
    assert_eq!(clients.len(), 6, "{clients:?}");
    for c in &clients {
        let v = topo.verdict("0000:03:00.0", c);
        match (c.kind, c.pci.as_deref()) {
            (ClientKind::Rdma, None) => assert_eq!(v.map, MapType::CpuCopy),
            (ClientKind::Nvme, Some("0000:03:00.0")) => {
                assert_eq!(v.reason, Reason::SameDevice);
                assert_eq!(v.distance, Some(0));
            }
            (ClientKind::Nvme, Some(_)) => {
                assert_eq!(v.map, MapType::BusAddr, "{v:?}");
                assert_eq!(
                    v.reason,
                    Reason::CommonUpstream {
                        bridge: "0000:01:00.0".into()
                    }
                );
                assert_eq!(v.distance, Some(4));
                assert!(v.acs_unknown.is_empty());
            }
            _ => panic!("unexpected client {c:?}"),
        }
    }
}
