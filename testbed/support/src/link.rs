//! Link faults for testbed tests: take a veth down mid-run and put the fabric back afterwards
//! (routes, rxe devices whose GSI QP a link down left in ERR, ACTIVE ports).

use std::process::Command;
use std::time::Duration;

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

/// Takes a veth down for a test and, on drop (also when the test fails), brings it back with
/// the testbed's policy routes (testbed/guest/setup.sh: an admin-down device loses its routes in
/// tables 100/101 and the kernel does not re-add them) and waits for both rxe ports to be
/// ACTIVE again, so later tests in the same VM find a working fabric.
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
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while active_rxe_ports() < 2 {
            assert!(
                std::time::Instant::now() < until,
                "rxe ports not ACTIVE 30 s after bringing {} back up",
                self.0
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
