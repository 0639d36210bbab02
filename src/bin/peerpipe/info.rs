//! `peerpipe info`: what this machine offers for zero-copy p2p pipelines (run as root for
//! the probe and ACS details).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use peerpipe::info;
use peerpipe::p2p_alloc::{Prober, SysRoot};

use crate::common::OutputFormat;

/// `peerpipe info` options.
#[derive(Debug, Args)]
pub struct Info {
    /// Output format; --json is short for --output-format=json
    #[arg(long, value_enum, value_name = "normal|json", default_value = "normal")]
    pub output_format: OutputFormat,
    /// Machine-readable output (same as --output-format=json)
    #[arg(long)]
    pub json: bool,
    /// Skip the capability probe (it maps 64 KiB of each provider)
    #[arg(long)]
    pub no_probe: bool,
    /// NVMe block device for the O_DIRECT probe (default: the first namespace not on the
    /// provider itself)
    #[arg(long, value_name = "BLOCKDEV")]
    pub probe_dev: Option<PathBuf>,
    /// Read sys/, dev/, proc/ below DIR instead of / (recorded trees)
    #[arg(long, value_name = "DIR")]
    pub sysroot: Option<PathBuf>,
}

/// Runs `peerpipe info`.
pub fn main(args: Info) -> ExitCode {
    let root = args.sysroot.map_or_else(SysRoot::live, SysRoot::at);
    // Probing maps real provider memory: only on the live system.
    let prober = (!args.no_probe && root.is_live()).then(|| {
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
    if args.json || args.output_format == OutputFormat::Json {
        match info::render_json(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("peerpipe info: JSON encoding failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", info::render_text(&report));
    }
    ExitCode::SUCCESS
}
