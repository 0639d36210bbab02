//! p2pmem discovery, pools, topology and probe on the testbed VM's real devices
//! (run: `cargo xtask test --vm-only -- testbed_p2p`).

use std::time::Duration;

use peerpipe_p2p_alloc::{
    clients, discover, Backing, Buffer, Error, Interface, MapType, Outcome, Placement, Pool,
    Prober, Provider, Reason, SysRoot, Topology,
};
use peerpipe_testbed::*;

const MIB: usize = 1 << 20;
const CMB: u64 = 64 << 20;

fn provider() -> Provider {
    let p = discover(&SysRoot::live()).expect("discover");
    assert_eq!(p.len(), 1, "one provider on the testbed: {p:?}");
    p.into_iter().next().unwrap()
}

/// `available` settles asynchronously only on munmap; poll briefly.
fn wait_available(p: &Provider, want: u64) -> u64 {
    let mut got = p.available().unwrap();
    for _ in 0..50 {
        if got == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        got = p.available().unwrap();
    }
    got
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn both_interfaces_found_with_64_mib() {
    require_testbed();
    let p = provider();
    assert_eq!(p.pci, "0000:03:00.0");
    assert_eq!(p.interfaces(), vec![Interface::CharDev, Interface::Sysfs]);
    assert_eq!(
        p.chardev.as_deref(),
        Some(std::path::Path::new("/dev/p2pmem0"))
    );
    assert_eq!(p.size, Some(CMB));
    assert_eq!(p.published, Some(true));
    assert_eq!(p.available().unwrap(), CMB);
}

fn available_drops_and_returns(iface: Interface) {
    let p = provider();
    let start = wait_available(&p, CMB);
    assert_eq!(start, CMB);
    let pool = Pool::builder(Placement::P2pRequired)
        .provider(p.clone())
        .interface(iface)
        .chunk_size(4 * MIB)
        .build()
        .unwrap();
    // 3 x 2 MiB + 4 x 1 MiB = 10 MiB -> 3 chunks of 4 MiB.
    let mut bufs: Vec<Buffer> = (0..3).map(|_| pool.alloc(2 * MIB).unwrap()).collect();
    bufs.extend((0..4).map(|_| pool.alloc(MIB).unwrap()));
    assert_eq!(pool.stats().chunks, 3);
    assert_eq!(p.available().unwrap(), CMB - 12 * MIB as u64);
    for (i, b) in bufs.iter_mut().enumerate() {
        assert_eq!(b.provider(), Some("0000:03:00.0"));
        assert!(matches!(b.backing(), Backing::P2p { interface, .. } if *interface == iface));
        b.as_mut_slice().fill(i as u8 + 1);
    }
    for (i, b) in bufs.iter().enumerate() {
        assert!(
            b.as_slice().iter().all(|&x| x == i as u8 + 1),
            "p2pmem data"
        );
    }
    drop(bufs);
    // Buffers returned, chunks still mapped by the pool.
    assert_eq!(p.available().unwrap(), CMB - 12 * MIB as u64);
    drop(pool);
    assert_eq!(
        wait_available(&p, CMB),
        CMB,
        "all chunks returned to the provider"
    );
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn chardev_pool_available_drops_and_returns() {
    require_testbed();
    available_drops_and_returns(Interface::CharDev);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn sysfs_pool_available_drops_and_returns() {
    require_testbed();
    available_drops_and_returns(Interface::Sysfs);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn required_pool_runs_out_with_a_typed_error() {
    require_testbed();
    let p = provider();
    assert_eq!(wait_available(&p, CMB), CMB);
    let pool = Pool::builder(Placement::P2pRequired)
        .provider(p.clone())
        .chunk_size(4 * MIB)
        .build()
        .unwrap();
    let mut bufs = Vec::new();
    let err = loop {
        match pool.alloc(4 * MIB) {
            Ok(b) => bufs.push(b),
            Err(e) => break e,
        }
        assert!(bufs.len() <= 16, "more than 64 MiB handed out");
    };
    assert_eq!(bufs.len(), 16, "the whole CMB in 4 MiB chunks");
    match &err {
        Error::OutOfMemory {
            provider,
            available,
            pool_free,
            ..
        } => {
            assert_eq!(provider, "0000:03:00.0");
            assert_eq!(*available, 0);
            assert_eq!(*pool_free, 0);
        }
        e => panic!("expected OutOfMemory, got {e}"),
    }
    assert!(err.to_string().contains("0000:03:00.0"), "{err}");
    assert_eq!(pool.stats().failures, 1);
    // Freeing one buffer makes room again without new mappings.
    bufs.pop();
    let again = pool.alloc(MIB).unwrap();
    assert_eq!(again.provider(), Some("0000:03:00.0"));
    drop((bufs, again, pool));
    assert_eq!(wait_available(&p, CMB), CMB);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn preferred_pool_falls_back_to_host_memory_and_counts_it() {
    require_testbed();
    let p = provider();
    assert_eq!(wait_available(&p, CMB), CMB);
    let pool = Pool::builder(Placement::P2pPreferred)
        .provider(p.clone())
        .chunk_size(4 * MIB)
        .build()
        .unwrap();
    let bufs: Vec<Buffer> = (0..20).map(|_| pool.alloc(4 * MIB).unwrap()).collect();
    let p2p = bufs.iter().filter(|b| b.provider().is_some()).count();
    assert_eq!(p2p, 16);
    let host: Vec<&Buffer> = bufs.iter().filter(|b| b.provider().is_none()).collect();
    assert_eq!(host.len(), 4);
    let s = pool.stats();
    assert_eq!(s.fallbacks, 4);
    assert_eq!(s.failures, 0);
    assert_eq!(s.p2p_bytes_mapped, CMB);
    assert_eq!(s.host_bytes_mapped, 16 * MIB as u64);
    assert_eq!(p.available().unwrap(), 0);
    drop(bufs);
    drop(pool);
    assert_eq!(wait_available(&p, CMB), CMB);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn distances_from_the_cmb_drive() {
    require_testbed();
    let root = SysRoot::live();
    let p = provider();
    let topo = Topology::new(&root);
    let clients = clients(&root);
    let nvme: Vec<_> = clients
        .iter()
        .filter(|c| c.kind == peerpipe_p2p_alloc::ClientKind::Nvme)
        .collect();
    assert_eq!(nvme.len(), drive_count(), "{clients:?}");
    let mut same = 0;
    let mut common_ports = std::collections::HashSet::new();
    for c in &nvme {
        let serial = std::fs::read_to_string(format!("/sys/class/nvme/{}/serial", c.name))
            .unwrap()
            .trim()
            .to_string();
        let v = topo.verdict(&p.pci, c);
        println!(
            "{} ({serial}): {:?} {:?} {:?}",
            c.name, v.map, v.distance, v.path
        );
        assert_eq!(v.map, MapType::BusAddr, "{serial}: {}", v.explain());
        if serial == "p2p0" {
            assert_eq!(v.reason, Reason::SameDevice);
            assert_eq!(v.distance, Some(0));
            same += 1;
        } else {
            // Endpoint -> downstream port -> upstream port, on both sides.
            assert_eq!(v.distance, Some(4), "{serial}: {v:?}");
            match &v.reason {
                Reason::CommonUpstream { bridge } => common_ports.insert(bridge.clone()),
                r => panic!("{serial}: {r:?}"),
            };
        }
    }
    assert_eq!(same, 1);
    assert_eq!(
        common_ports.len(),
        1,
        "all drives meet at one switch: {common_ports:?}"
    );
    for rxe in ["rxe0", "rxe1"] {
        let c = clients.iter().find(|c| c.name == rxe).expect(rxe);
        assert_eq!(c.pci, None);
        let v = topo.verdict(&p.pci, c);
        assert_eq!(v.map, MapType::CpuCopy);
        assert_eq!(v.reason, Reason::SoftwareDevice);
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn probe_cpu_and_o_direct_on_both_interfaces() {
    require_testbed();
    let p = provider();
    let data1 = drive("data1");
    let prober = Prober::new()
        .o_direct_from(&data1.block)
        .check("always_efault", |_, _| Err(libc::EFAULT));
    for iface in [Interface::CharDev, Interface::Sysfs] {
        let r = prober.probe(&p, iface);
        assert_eq!(r.cell("cpu"), Some(&Outcome::Ok), "{iface:?}: {r:?}");
        assert_eq!(r.cell("o_direct"), Some(&Outcome::Ok), "{iface:?}: {r:?}");
        assert_eq!(
            r.cell("always_efault"),
            Some(&Outcome::Failed {
                errno: libc::EFAULT
            })
        );
        // Cached: the same report object comes back.
        assert!(std::sync::Arc::ptr_eq(&r, &prober.probe(&p, iface)));
    }
    assert_eq!(wait_available(&p, CMB), CMB, "probe mappings returned");
}
