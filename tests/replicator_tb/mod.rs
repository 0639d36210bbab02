//! The replicator's testbed tests, one concept per module, in two test binaries:
//! `testbed_replicator` holds every module but `faults`, `testbed_replicator_faults` holds
//! `faults` and `support` (see why in that binary's root).
//! - [`verify`]: happy paths, verified end to end;
//! - `faults`: a replica killed or stalled, the link down, the primary killed, mid-run;
//! - [`crafted_peers`]: protocol violations from crafted primaries, refused cleanly;
//! - [`refusals`]: bad ranges, bounds, authentication, a claimed device, exhausted p2pmem;
//! - [`support`] and [`crafted_primary`]: the helpers they share.
//!
//! Every testbed test is `#[ignore = "skipped: no device ..."]` and calls
//! `tb::require_testbed()`: the host run lists it as ignored, the VM runs it with `--ignored`.

mod crafted_peers;
mod crafted_primary;
mod refusals;
pub mod support;
mod verify;
