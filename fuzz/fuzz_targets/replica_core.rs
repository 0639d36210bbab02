//! `ReplicaCore` driven by an arbitrary primary (Hello included) and drive completions in any
//! order: no panic, no write outside the negotiated range, bounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerpipe_fuzz::replica::{run, ReplicaInput};

fuzz_target!(|input: ReplicaInput| run(input));
