//! `peerpipe target`: serve namespaces to NVMe over Fabrics (RDMA) hosts in the foreground
//! until SIGINT or SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use peerpipe::nvmf::server::{BufferChoice, Target};
use peerpipe::nvmf::{NamespaceConfig, SubsystemConfig, TargetConfig};

pub const USAGE: &str =
    "usage: peerpipe target --listen ADDR[:PORT] --nqn NQN --ns PATH [--ns PATH ...]
                       [--buffers p2p|host|auto] [--allow-host HOSTNQN ...] [--verbose]

  --listen ADDR[:PORT]  local address of an RDMA device (port 4420 by default)
  --nqn NQN             the subsystem's NQN
  --ns PATH             a namespace (nsid 1, 2, ... in order): /dev/ngXnY (NVMe passthrough),
                        a block device (opened O_EXCL) or a file, all with O_DIRECT
  --buffers             data buffers in p2pmem, host memory, or p2pmem when usable (default)
  --allow-host HOSTNQN  accept only these hosts (default: any host)
  --verbose             log connections and queue events to stderr";

/// The parsed command line.
struct Args {
    listen: SocketAddr,
    nqn: String,
    namespaces: Vec<PathBuf>,
    buffers: BufferChoice,
    allowed_hosts: Vec<String>,
    verbose: bool,
}

fn parse_listen(v: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip = v
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map_err(|_| format!("--listen {v:?}: not an ADDR or ADDR:PORT"))?;
    Ok(SocketAddr::new(ip, 4420))
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut nqn) = (None, None);
    let mut a = Args {
        listen: SocketAddr::from(([0, 0, 0, 0], 4420)),
        nqn: String::new(),
        namespaces: Vec::new(),
        buffers: BufferChoice::Auto,
        allowed_hosts: Vec::new(),
        verbose: false,
    };
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{arg} needs {what}"));
        match arg.as_str() {
            "--listen" => listen = Some(parse_listen(&value("ADDR[:PORT]")?)?),
            "--nqn" => nqn = Some(value("an NQN")?),
            "--ns" => a.namespaces.push(value("a path")?.into()),
            "--buffers" => {
                a.buffers = value("p2p, host or auto")?
                    .parse()
                    .map_err(|e| format!("--buffers {e}"))?
            }
            "--allow-host" => a.allowed_hosts.push(value("a host NQN")?),
            "--verbose" => a.verbose = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    a.listen = listen.ok_or("--listen is required")?;
    a.nqn = nqn.ok_or("--nqn is required")?;
    if a.namespaces.is_empty() {
        return Err("at least one --ns PATH is required".into());
    }
    Ok(a)
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

/// Runs `peerpipe target ARGS...`.
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("peerpipe target: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if a.verbose {
        crate::log::init();
    }
    if let Err(e) = install_signal_handlers() {
        eprintln!("peerpipe target: {e}");
        return ExitCode::FAILURE;
    }
    let mut cfg = TargetConfig::new(a.listen);
    cfg.subsystems.push(SubsystemConfig {
        nqn: a.nqn.clone(),
        namespaces: a
            .namespaces
            .iter()
            .enumerate()
            .map(|(i, p)| NamespaceConfig {
                nsid: i as u32 + 1,
                path: p.clone(),
                uuid: None,
                nguid: None,
            })
            .collect(),
        allowed_hosts: a.allowed_hosts,
        serial: format!("peerpipe{:08x}", fnv(&a.nqn)),
        model: "peerpipe nvmf target".into(),
    });
    let target = match Target::with_buffers(cfg, a.buffers) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("peerpipe target: {e}");
            return ExitCode::FAILURE;
        }
    };
    for n in target.namespaces() {
        eprintln!("target: namespace {n}");
    }
    eprintln!("target: buffers {}", target.buffers());
    eprintln!(
        "target: listening on {} (rdma), subsystem {}",
        target.local_addr(),
        a.nqn
    );
    let result = target.serve(&STOP);
    let (read, written) = target.rdma_bytes();
    let s = target.core_stats();
    eprintln!(
        "target: stopped; {} commands, {} errors, {} B RDMA READ, {} B RDMA WRITE, {} payload bytes copied by the CPU",
        s.commands,
        s.errors,
        read,
        written,
        target.copied_bytes()
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerpipe target: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A short stable hash of the NQN for the serial number (FNV-1a).
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn listen_port_defaults_to_4420_and_required_options_are_named() {
        let a = args(&[
            "--listen",
            "10.77.0.2",
            "--nqn",
            "nqn.x",
            "--ns",
            "/dev/null",
        ])
        .unwrap();
        assert_eq!(a.listen, "10.77.0.2:4420".parse().unwrap());
        let a = args(&[
            "--listen",
            "10.77.0.2:4421",
            "--nqn",
            "n",
            "--ns",
            "a",
            "--ns",
            "b",
        ])
        .unwrap();
        assert_eq!(a.listen.port(), 4421);
        assert_eq!(a.namespaces.len(), 2);
        let e = args(&["--nqn", "n", "--ns", "a"]).err().unwrap();
        assert!(e.contains("--listen"), "{e}");
        let e = args(&["--listen", "1.2.3.4", "--ns", "a"]).err().unwrap();
        assert!(e.contains("--nqn"), "{e}");
        let e = args(&["--listen", "1.2.3.4", "--nqn", "n"]).err().unwrap();
        assert!(e.contains("--ns"), "{e}");
        let e = args(&["--listen", "nope", "--nqn", "n", "--ns", "a"])
            .err()
            .unwrap();
        assert!(e.contains("nope"), "{e}");
        let e = args(&[
            "--listen",
            "1.2.3.4",
            "--nqn",
            "n",
            "--ns",
            "a",
            "--buffers",
            "gpu",
        ])
        .err()
        .unwrap();
        assert!(e.contains("gpu"), "{e}");
    }
}
