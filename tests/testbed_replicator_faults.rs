//! Fault tests of `peerpipe replicate` / `peerpipe replica` in the testbed: a replica killed
//! or stalled, the link down, the primary killed, each mid-run (`tests/replicator_tb/faults.rs`).
//! Run with `cargo xtask test --vm-only -- replicator`.
//!
//! A test binary of their own, apart from `testbed_replicator`, because the link-down test
//! may have to recreate an rxe device, which waits until no process holds the device open,
//! and librdmacm keeps every device a process used open until that process exits: the crafted
//! primaries of `testbed_replicator` use rdma_cm inside the test process, so after them the
//! recreation would wait for its own process (`tb::LinkDown` refuses that with a clear failure
//! instead of hanging). The tests here only spawn `peerpipe` processes.

// Shared with `testbed_replicator`, which uses the helpers these tests do not.
#[allow(dead_code)]
#[path = "replicator_tb/support.rs"]
mod support;

#[path = "replicator_tb/faults.rs"]
mod faults;
