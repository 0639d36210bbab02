//! `peerpipe`: the command-line tool. `peerpipe info` tells what a machine offers for
//! zero-copy p2p pipelines, `peerpipe replicate` / `peerpipe replica` replicate a byte range
//! of a drive over RDMA, `peerpipe target` serves namespaces to NVMe over Fabrics (RDMA)
//! hosts. Every command logs through `tracing` to stderr (`RUST_LOG`, `-v`, `-q`).

mod common;
mod info;
mod log;
mod replica;
mod replicate;
mod target;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

/// Zero-copy storage pipelines over PCI peer-to-peer memory: NVMe -> p2pmem -> RDMA.
#[derive(Debug, Parser)]
#[command(name = "peerpipe", version, propagate_version = true)]
#[command(
    after_help = "Usage errors exit with status 2. `peerpipe COMMAND --help` for each command."
)]
pub(crate) struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Logging")]
    verbose: u8,
    /// Less log output on stderr (-q errors only, -qq nothing); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Logging")]
    quiet: u8,
    #[command(subcommand)]
    command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// What this machine offers for p2p pipelines: p2pmem, NVMe, RDMA, the PCI verdicts
    /// and the capability probe (exit 0, or 1 when the system cannot be read)
    Info(info::Info),
    /// Replicate a byte range of a drive to replicas over RDMA (the primary)
    #[command(after_help = format!("{}\n\n{}\n\n{}", common::TRUST, common::PRIMARY_JSON, common::EXIT_CODES))]
    Replicate(replicate::Replicate),
    /// Receive a replicated range from a primary and write it to a drive
    #[command(after_help = format!("{}\n\n{}\n\n{}", common::TRUST, common::REPLICA_JSON, common::EXIT_CODES))]
    Replica(replica::Replica),
    /// Serve namespaces to NVMe over Fabrics (RDMA) hosts until SIGINT or SIGTERM
    #[command(after_help = target::args::AFTER_HELP)]
    Target(target::args::TargetArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    log::init(cli.verbose, cli.quiet);
    match cli.command {
        Command::Info(a) => info::main(a),
        Command::Replicate(a) => replicate::main(&a),
        Command::Replica(a) => replica::main(&a),
        Command::Target(_) => {
            let sub = matches
                .subcommand_matches("target")
                .expect("clap matched the target subcommand");
            match target::args::from_matches(sub) {
                Ok(a) => target::main(a),
                Err(e) => Cli::command()
                    .find_subcommand_mut("target")
                    .expect("target subcommand")
                    .error(clap::error::ErrorKind::ValueValidation, e)
                    .exit(),
            }
        }
    }
}
