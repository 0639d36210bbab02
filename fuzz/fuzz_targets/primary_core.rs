//! `PrimaryCore` driven by arbitrary replicas and completions in any order: no panic, writes
//! only into advertised buffers, no buffer freed under a live NIC, no false success, bounded
//! allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerpipe_fuzz::primary::{run, PrimaryInput};

fuzz_target!(|input: PrimaryInput| run(input));
