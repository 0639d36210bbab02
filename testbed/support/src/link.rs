//! Link faults for testbed tests: take a veth down mid-run and put the fabric back afterwards
//! (routes, rxe devices whose GSI QP a link down left in ERR, ACTIVE ports).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{addrs, run, text};

/// Runs `ip ...` and asserts it worked.
pub fn ip(args: &[&str]) {
    let o = run(Command::new("ip").args(args), Duration::from_secs(10));
    assert!(o.status.success(), "ip {args:?}: {}", text(&o));
}

/// Number of rdma links in state ACTIVE.
pub fn active_rxe_ports() -> usize {
    let o = run(
        Command::new("rdma").args(["link", "show"]),
        Duration::from_secs(10),
    );
    text(&o).matches("state ACTIVE").count()
}

/// `(rxe device, netdev)` for every rxe whose GSI QP (rdma_cm's MAD QP) is in the ERR state.
pub fn gsi_qps_in_error() -> Vec<(String, String)> {
    let qps = run(
        Command::new("rdma").args(["res", "show", "qp"]),
        Duration::from_secs(10),
    );
    let links = run(
        Command::new("rdma").args(["link", "show"]),
        Duration::from_secs(10),
    );
    let links = text(&links);
    text(&qps)
        .lines()
        .filter(|l| l.contains("type GSI") && l.contains("state ERR"))
        .filter_map(|l| {
            // "link rxe1/1 lqpn 1 type GSI state ERR ..."
            let dev = l.split_whitespace().nth(1)?.split('/').next()?.to_string();
            // "link rxe1/1 state ACTIVE physical_state LINK_UP netdev veth1"
            let netdev = links
                .lines()
                .find(|k| k.starts_with(&format!("link {dev}/")))?
                .split_whitespace()
                .skip_while(|w| *w != "netdev")
                .nth(1)?
                .to_string();
            Some((dev, netdev))
        })
        .collect()
}

/// The character device through which userspace uses rxe device `rxe` (`/dev/infiniband/uverbsN`,
/// named by `/sys/class/infiniband_verbs/uverbsN/ibdev`).
fn verbs_node(rxe: &str) -> Option<PathBuf> {
    std::fs::read_dir("/sys/class/infiniband_verbs")
        .ok()?
        .flatten()
        .find(|e| std::fs::read_to_string(e.path().join("ibdev")).is_ok_and(|d| d.trim() == rxe))
        .map(|e| Path::new("/dev/infiniband").join(e.file_name()))
}

/// The processes `(pid, command name)` holding rxe device `rxe` open from userspace.
///
/// Deleting an rxe device (`rdma link delete`) waits, uninterruptibly, until every such process
/// has closed it: rxe cannot detach userspace contexts as hardware drivers do. librdmacm opens
/// every device a process's rdma_cm IDs used and keeps it open until the process exits, so a
/// test process that used rdma_cm itself (a crafted peer) holds the device for good.
pub fn verbs_holders(rxe: &str) -> Vec<(u32, String)> {
    let Some(node) = verbs_node(rxe) else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut holders = Vec::new();
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == node))
        {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            holders.push((pid, comm.trim().to_string()));
        }
    }
    holders
}

/// How long [`LinkDown`]'s drop waits for other processes to let go of a device it must
/// recreate: rxe's QP destroy can stall 50 s after a fault.
const HOLDERS_BOUND: Duration = Duration::from_secs(90);

/// Waits until no process holds `rxe` open, so deleting it cannot block for ever. Panics at
/// once if the calling process holds it (it would wait for itself), and after
/// [`HOLDERS_BOUND`] if others still do.
fn await_released(rxe: &str) {
    let until = Instant::now() + HOLDERS_BOUND;
    loop {
        let holders = verbs_holders(rxe);
        if holders.is_empty() {
            return;
        }
        assert!(
            !holders.iter().any(|(pid, _)| *pid == std::process::id()),
            "{rxe} must be recreated (its GSI QP is in ERR), but this test process holds it \
             open (librdmacm keeps every device it used open until exit), and deleting it \
             would wait for ever: run link-fault tests in a test binary whose process never \
             uses rdma_cm itself; holders: {holders:?}"
        );
        assert!(
            Instant::now() < until,
            "{rxe} must be recreated, but {holders:?} still hold it open {HOLDERS_BOUND:?} \
             after the link came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Takes a veth down for a test and, on drop (also when the test fails), brings it back with
/// the testbed's policy routes (testbed/guest/setup.sh: an admin-down device loses its routes in
/// tables 100/101 and the kernel does not re-add them) and waits for both rxe ports to be
/// ACTIVE again, so later tests in the same VM find a working fabric.
///
/// A device whose GSI QP the fault left in ERR is recreated, which needs every userspace user
/// of it gone first (see [`verbs_holders`]): the drop waits for other processes, and fails
/// (rather than hang) if the test's own process holds the device, as it does once it has used
/// rdma_cm. Link-fault tests therefore live in test binaries that only spawn RDMA programs.
pub struct LinkDown(&'static str);

impl LinkDown {
    /// Takes `dev` down now; it comes back up (routes and ACTIVE rxe ports) on drop.
    pub fn new(dev: &'static str) -> LinkDown {
        ip(&["link", "set", dev, "down"]);
        LinkDown(dev)
    }

    /// Brings the link and its policy routes back (idempotent); the drop does this too, then
    /// repairs the rxe devices.
    pub fn link_up(&self) {
        let (a0, a1) = addrs();
        ip(&["link", "set", self.0, "up"]);
        ip(&[
            "route", "replace", &a1, "dev", "veth0", "src", &a0, "table", "100",
        ]);
        ip(&[
            "route", "replace", &a0, "dev", "veth1", "src", &a1, "table", "101",
        ]);
    }
}

impl Drop for LinkDown {
    fn drop(&mut self) {
        self.link_up();
        // Measured on 6.12 rxe: CM MADs sent while the port is down move that device's GSI
        // QP (QP1) to ERR and nothing brings it back, so every later rdma_cm connect on the
        // device times out. Only recreating the rxe device gives it a fresh QP1.
        for (rxe, netdev) in gsi_qps_in_error() {
            // `rdma link delete` of a device still open sleeps uninterruptibly: no timeout
            // could kill it.
            await_released(&rxe);
            let o = run(
                Command::new("rdma").args(["link", "delete", &rxe]),
                Duration::from_secs(30),
            );
            assert!(o.status.success(), "rdma link delete {rxe}: {}", text(&o));
            let o = run(
                Command::new("rdma").args(["link", "add", &rxe, "type", "rxe", "netdev", &netdev]),
                Duration::from_secs(30),
            );
            assert!(o.status.success(), "rdma link add {rxe}: {}", text(&o));
            eprintln!("recreated {rxe} on {netdev}: its GSI QP was left in ERR by the link down");
        }
        let until = Instant::now() + Duration::from_secs(30);
        while active_rxe_ports() < 2 {
            assert!(
                Instant::now() < until,
                "rxe ports not ACTIVE 30 s after bringing {} back up",
                self.0
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
