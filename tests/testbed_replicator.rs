//! Testbed tests of `peerpipe replicate` / `peerpipe replica`: real NVMe drives, real rxe RDMA, real p2pmem.
//! Run with `cargo xtask test --vm-only -- replicator`.
//!
//! The tests live in `tests/replicator_tb/` by concept (see its `mod.rs`), so their full names
//! carry a module prefix (`replicator_tb::verify::testbed_replicator_...`); filters by
//! substring of the test name match as before. The fault tests (a replica killed or stalled,
//! the link down, the primary killed) are the test binary `testbed_replicator_faults`. This
//! file holds the one host test.

use std::process::Command;

use peerpipe_testbed as tb;

mod replicator_tb;
use replicator_tb::support::bin;

/// Host test (no device): `--help` of both roles documents the exit codes scripts rely on.
#[test]
fn replicator_help_documents_exit_codes() {
    for role in ["replicate", "replica"] {
        let o = Command::new(bin())
            .args([role, "--help"])
            .output()
            .expect("run --help");
        assert!(o.status.success(), "{}", tb::text(&o));
        let s = String::from_utf8_lossy(&o.stdout);
        for want in [
            "Usage:",
            "exit codes:",
            "  0  ",
            "  1  ",
            "  2  ",
            "  3  replica only",
        ] {
            assert!(s.contains(want), "{role}: missing {want:?} in:\n{s}");
        }
    }
    let o = Command::new(bin()).arg("bogus").output().expect("run");
    assert_eq!(o.status.code(), Some(2));
}
