//! `peerpipe target`: serve namespaces to NVMe over Fabrics (RDMA) hosts in the foreground
//! until SIGINT or SIGTERM.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use peerpipe::nvmf::server::{Target, TargetError};

#[path = "target_args.rs"]
pub mod args;

/// The `--output-format=json` statistics printed at exit.
#[derive(Debug, serde::Serialize)]
struct Stats {
    commands: u64,
    errors: u64,
    rdma_read_bytes: u64,
    rdma_write_bytes: u64,
    payload_bytes_copied: u64,
    busy_poll_hits: u64,
    busy_poll_misses: u64,
    error: Option<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // An atomic store is async-signal-safe.
    STOP.store(true, Ordering::Release);
}

/// Makes SIGINT and SIGTERM set [`STOP`].
fn install_signal_handlers() -> Result<(), String> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the one unsafe place of the target command. `sa` is fully initialized
        // (zeroed, then the handler and an empty mask); the handler only stores to an atomic,
        // which is async-signal-safe; sigaction copies `sa`.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(format!(
                "sigaction({sig}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Runs `peerpipe target` with parsed arguments (logging is already set up by `-v`).
pub fn main(a: args::Args) -> ExitCode {
    if let Err(e) = install_signal_handlers() {
        eprintln!("peerpipe target: {e}");
        return ExitCode::FAILURE;
    }
    let cfg = a.config();
    let nqns: Vec<&str> = a.subsystems.iter().map(|s| s.nqn.as_str()).collect();
    let nqns = nqns.join(", ");
    let target = match Target::with_buffers(cfg, a.buffers) {
        Ok(t) => t,
        Err(e) => {
            let hint = match e {
                TargetError::NoP2pMem(_) => " (--buffers p2p: try --buffers auto or host)",
                _ => "",
            };
            eprintln!("peerpipe target: {e}{hint}");
            return ExitCode::FAILURE;
        }
    };
    for n in target.namespaces() {
        eprintln!("target: namespace {n}");
    }
    eprintln!("target: buffers {}", target.buffers());
    eprintln!(
        "target: listening on {} (rdma), subsystem{} {nqns}",
        target.local_addr(),
        if a.subsystems.len() > 1 { "s" } else { "" }
    );
    let result = target.serve(&STOP);
    let (read, written) = target.rdma_bytes();
    let s = target.core_stats();
    let (hits, misses) = target.busy_polls();
    eprintln!(
        "target: stopped; {} commands, {} errors, {} B RDMA READ, {} B RDMA WRITE, {} payload bytes copied by the CPU, busy polls {hits} found work / {misses} ran out",
        s.commands,
        s.errors,
        read,
        written,
        target.copied_bytes()
    );
    if a.json {
        crate::common::print_json(&Stats {
            commands: s.commands,
            errors: s.errors,
            rdma_read_bytes: read,
            rdma_write_bytes: written,
            payload_bytes_copied: target.copied_bytes(),
            busy_poll_hits: hits,
            busy_poll_misses: misses,
            error: result.as_ref().err().map(ToString::to_string),
        });
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerpipe target: {e}");
            ExitCode::FAILURE
        }
    }
}
