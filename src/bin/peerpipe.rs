//! `peerpipe`: command-line front end. `peerpipe info [--json] [--no-probe]
//! [--probe-dev /dev/nvmeXnY] [--sysroot DIR]` prints what this machine offers for
//! zero-copy p2p pipelines (run as root for the probe and ACS details); `peerpipe target ...`
//! serves namespaces to NVMe over Fabrics (RDMA) hosts (see `target.rs`).

#[path = "peerpipe/log.rs"]
mod log;
#[path = "peerpipe/target.rs"]
mod target;

use std::path::PathBuf;
use std::process::ExitCode;

use peerpipe::info;
use peerpipe::p2p_alloc::{Prober, SysRoot};

const USAGE: &str =
    "usage: peerpipe info [--json] [--no-probe] [--probe-dev BLOCKDEV] [--sysroot DIR]
       peerpipe target --help

  --json         machine-readable output
  --no-probe     skip the capability probe (it maps 64 KiB of each provider)
  --probe-dev    NVMe block device for the O_DIRECT probe (default: the first namespace
                 not on the provider itself)
  --sysroot DIR  read sys/, dev/, proc/ below DIR instead of / (recorded trees)";

struct Args {
    json: bool,
    probe: bool,
    probe_dev: Option<PathBuf>,
    sysroot: Option<PathBuf>,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    match it.next().as_deref() {
        Some("info") => {}
        Some("-h" | "--help") | None => return Err(String::new()),
        Some(other) => return Err(format!("unknown command {other:?}")),
    }
    let mut a = Args {
        json: false,
        probe: true,
        probe_dev: None,
        sysroot: None,
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => a.json = true,
            "--no-probe" => a.probe = false,
            "--probe-dev" => {
                a.probe_dev = Some(it.next().ok_or("--probe-dev needs a block device")?.into())
            }
            "--sysroot" => a.sysroot = Some(it.next().ok_or("--sysroot needs a directory")?.into()),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("target") {
        return target::main(std::env::args().skip(2));
    }
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("peerpipe: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let root = args.sysroot.map_or_else(SysRoot::live, SysRoot::at);
    // Probing maps real provider memory: only on the live system.
    let prober = (args.probe && root.is_live()).then(|| {
        let dev = args.probe_dev.or_else(|| info::default_probe_dev(&root));
        let ng = dev.as_deref().and_then(info::passthrough_dev_for);
        let rdma: Vec<String> = info::rdma_devices(&root)
            .into_iter()
            .map(|d| d.name)
            .collect();
        let p = info::with_default_checks(Prober::new(), &rdma, ng);
        match dev {
            Some(d) => p.o_direct_from(d),
            None => p,
        }
    });
    let report = match info::gather(&root, prober.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("peerpipe info: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{}", info::render_json(&report));
    } else {
        print!("{}", info::render_text(&report));
    }
    ExitCode::SUCCESS
}
