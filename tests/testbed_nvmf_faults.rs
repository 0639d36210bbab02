//! Fault tests of `peerpipe target` in the testbed: the link between the kernel nvme-rdma host
//! (rxe0) and the target (rxe1) goes down mid-I/O. Run with
//! `cargo xtask test --vm-only -- nvmf`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use peerpipe_testbed as tb;

mod nvmf_tb;
use nvmf_tb::*;

/// Userspace objects in `rdma res show KIND` (qp, cq, mr, cm_id): the target's, as it is the
/// only userspace rdma user while this test runs (the kernel host's objects and the GSI QPs
/// are the kernel's, `comm [name]`). Not matched by pid: rdma prints the creating thread
/// (pid = its thread id), and no pid or comm at all once that thread has exited, which is
/// exactly how an object a finished queue thread leaked would look.
fn rdma_objects(kind: &str) -> usize {
    let o = tb::run(
        Command::new("rdma").args(["res", "show", kind]),
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "rdma res show {kind}: {}", tb::text(&o));
    stdout(&o)
        .lines()
        .filter(|l| (l.starts_with("link ") || l.starts_with("dev ")) && !l.contains(" comm ["))
        .count()
}

/// What the target holds: its rdma objects and the free p2pmem of every provider.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    qp: usize,
    cq: usize,
    mr: usize,
    cm_id: usize,
    p2pmem_available: u64,
}

fn p2pmem_available() -> u64 {
    let mut sum = 0;
    for e in std::fs::read_dir("/sys/bus/pci/devices").unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("p2pmem/available")) {
            sum += s.trim().parse::<u64>().unwrap();
        }
    }
    sum
}

fn held() -> Held {
    Held {
        qp: rdma_objects("qp"),
        cq: rdma_objects("cq"),
        mr: rdma_objects("mr"),
        cm_id: rdma_objects("cm_id"),
        p2pmem_available: p2pmem_available(),
    }
}

/// Polls `held` until `done` holds or `bound` passes; the last value.
fn await_held(bound: Duration, done: impl Fn(&Held) -> bool) -> Held {
    let end = Instant::now() + bound;
    loop {
        let h = held();
        if done(&h) || Instant::now() >= end {
            return h;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// fio writing sequentially with verification: the same peak buffer use for every session.
fn fio_write(dev: &Path, size: &str) -> Command {
    fio_verify_cmd(
        dev,
        "fault",
        &[
            "--rw=write",
            "--bs=128k",
            "--iodepth=8",
            &format!("--size={size}"),
            "--offset=32M",
        ],
    )
}

const PORT: u16 = 4426;

fn start(drive: &tb::Drive, n: &str) -> tb::Watched {
    start_target(PORT, n, &drive.block, &["--buffers", "p2p"])
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_link_down_mid_io_frees_the_controller_and_host_reconnects() {
    tb::require_testbed();
    let n = nqn("linkdown");
    let drive = tb::drive("data3");
    let mut t = start(&drive, &n);
    let before_any = held();
    eprintln!("held before any host: {before_any:?}");

    // A clean session first, with the I/O pattern of the faulted one: the buffer pool maps
    // its chunks (kept for reuse) and registers them; the queues go away on disconnect.
    let host = Host::connect(PORT, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let connected = held();
    eprintln!("held with a host connected: {connected:?}");
    assert!(
        connected.qp > before_any.qp && connected.cm_id > before_any.cm_id,
        "a connected host holds queues: {connected:?}"
    );
    let o = tb::run(&mut fio_write(&host.dev, "8M"), Duration::from_secs(600));
    fio_passed(&o, "warm-up");
    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    let base = await_held(Duration::from_secs(60), |h| {
        (h.qp, h.cq, h.cm_id) == (before_any.qp, before_any.cq, before_any.cm_id)
    });
    assert_eq!(
        (base.qp, base.cq, base.cm_id),
        (before_any.qp, before_any.cq, before_any.cm_id),
        "a clean disconnect gives back the queues: {base:?} vs {before_any:?}"
    );
    eprintln!("held after a clean session: {base:?}");

    // The faulted session: fio writes through the fabric; the link goes down once the
    // backing drive has seen 8 MiB more written.
    let host = Host::connect(PORT, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let ctrl = host.ctrl.clone();
    let start_sectors = sectors_written(&drive.block);
    let fio = tb::spawn(&mut fio_write(&host.dev, "512M"));
    let end = Instant::now() + Duration::from_secs(300);
    while sectors_written(&drive.block) < start_sectors + 16384 {
        assert!(Instant::now() < end, "fio wrote no 8 MiB in 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let down = tb::LinkDown::new("veth1");
    let t0 = Instant::now();
    // The host gives up after --ctrl-loss-tmo=5 and deletes the controller; the target
    // notices the silent controller (keep-alive / transport errors) and tears it down. The
    // link comes back after at most 25 s, whatever happened: rxe 6.12 frees a QP whose destroy
    // stalled 50 s with packets still queued, and a link still down then crashes the guest
    // (see tb::LinkDown and tests/replicator_tb/faults.rs).
    let mut after = held();
    while t0.elapsed() < Duration::from_secs(25) {
        after = held();
        if !ctrl.exists() && after == base {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "link down for {:?}; host controller gone: {}; target holds {after:?}",
        t0.elapsed(),
        !ctrl.exists()
    );
    down.link_up();
    let fo = tb::wait(fio, Duration::from_secs(180), "fio through the failed link");
    assert!(
        !fo.status.success(),
        "fio passed although the link went down: {}",
        tb::text(&fo)
    );
    let end = Instant::now() + Duration::from_secs(60);
    while ctrl.exists() {
        assert!(
            Instant::now() < end,
            "the host kept {} past ctrl-loss-tmo",
            ctrl.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::mem::forget(host);
    // rxe's QP destroy may stall 50 s: the bound covers it.
    let after = await_held(Duration::from_secs(150), |h| h == &base);
    assert_eq!(
        after, base,
        "the target gives back the faulted controller's queues, regions and p2pmem"
    );
    assert!(!t.has_exited(), "the target died: {}", t.so_far());
    // Every queue that came up (warm-up and faulted sessions) has ended, and the faulted
    // controller was torn down by the target, not merely abandoned.
    let log = t.so_far();
    let ends = log.matches("queue closed").count() + log.matches("queue torn down").count();
    assert_eq!(log.matches("queue up").count(), ends, "{log}");
    let reasons: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("queue torn down") || l.contains("keep-alive expired"))
        .collect();
    assert!(!reasons.is_empty(), "no teardown logged: {log}");
    eprintln!("target teardown:\n{}", reasons.join("\n"));

    // The fabric comes back; a device whose GSI QP the fault left in ERR is recreated. If that
    // is the target's (rxe1), the target must let go of it first: restart it then.
    let (_, a1) = tb::addrs();
    let target_dev_broken = tb::gsi_qps_in_error()
        .iter()
        .any(|(_, netdev)| netdev == "veth1");
    eprintln!(
        "GSI QPs in ERR after the fault: {:?} (target {a1})",
        tb::gsi_qps_in_error()
    );
    if target_dev_broken {
        let o = stop_target(t);
        assert!(o.status.success(), "{}", tb::text(&o));
        drop(down);
        t = start(&drive, &n);
    } else {
        drop(down);
    }
    let host = Host::connect(PORT, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let o = tb::run(&mut fio_write(&host.dev, "8M"), Duration::from_secs(600));
    fio_passed(&o, "after the link came back");
    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    if !target_dev_broken {
        let h = await_held(Duration::from_secs(60), |h| h == &base);
        assert_eq!(h, base, "a session after the fault leaks nothing either");
    }
    let o = stop_target(t);
    assert!(o.status.success(), "{}", tb::text(&o));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_p2pmem_exhausted_at_start_p2p_refused_auto_falls_back() {
    use peerpipe::p2p_alloc::{discover, SysRoot};
    tb::require_testbed();
    let (_, a1) = tb::addrs();
    let provider = || discover(&SysRoot::live()).expect("discover").remove(0);
    let chardev = provider().chardev.expect("/dev/p2pmemN");
    let avail = || provider().available().expect("available");
    let n = nqn("exhausted");
    let drive = tb::drive("data3");
    // All but 1 MiB of the CMB is held by another user: less than one pool chunk (4 MiB).
    let _hold = tb::P2pMap::new(&chardev, (avail() - (1 << 20)) as usize);
    let o = tb::run(
        Command::new(env!("CARGO_BIN_EXE_peerpipe"))
            .args(["target", "--listen", &format!("{a1}:4427"), "--nqn", &n])
            .arg("--ns")
            .arg(&drive.block)
            .args(["--buffers", "p2p"]),
        Duration::from_secs(60),
    );
    assert_eq!(o.status.code(), Some(1), "{}", tb::text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("--buffers p2p") && err.contains("out of p2pmem"),
        "{}",
        tb::text(&o)
    );
    assert!(!err.contains("listening"), "{err}");

    // auto: host memory, saying why, and it serves.
    let t = start_target(4427, &n, &drive.block, &["--buffers", "auto"]);
    let so_far = t.so_far();
    assert!(
        so_far.contains("target: buffers host (p2pmem not usable")
            && so_far.contains("out of p2pmem"),
        "{so_far}"
    );
    let host = Host::connect(4427, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let o = tb::run(&mut fio_write(&host.dev, "4M"), Duration::from_secs(600));
    fio_passed(&o, "host-buffer fallback");
    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    let o = stop_target(t);
    assert!(o.status.success(), "{}", tb::text(&o));
}
