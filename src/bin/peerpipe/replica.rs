//! `peerpipe replica`: listens for one primary and writes what it sends to a drive (or
//! file) until the primary's `fin` (exit 0) or its loss (exit 3).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use peerpipe::pipeline::engine::{
    EngineError, Event, ReplicaAccess, ReplicaConfig, ReplicaEnd, ReplicaEngine,
};
use serde::Serialize;

use crate::common::{copy_text, print_json, say, wait_text, Shared};

/// `peerpipe replica` options.
#[derive(Debug, Args)]
pub struct Replica {
    /// Local ADDR:PORT to listen on
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// The target: /dev/ngXnY, a block device (opened O_EXCL) or a file
    #[arg(long, value_name = "PATH")]
    pub target: String,
    /// Accept a primary connecting from ADDR (repeat for several); needs --secret-file
    #[arg(
        long,
        value_name = "ADDR",
        required_unless_present = "insecure_any_primary",
        requires = "secret_file"
    )]
    pub allow_primary: Vec<IpAddr>,
    /// Accept the first peer that connects, unauthenticated (closed networks only)
    #[arg(long, conflicts_with_all = ["allow_primary", "secret_file"])]
    pub insecure_any_primary: bool,
    #[command(flatten)]
    pub shared: Shared,
}

/// The `--output-format=json` summary of a replica (one object on stdout).
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `fin` (the primary finished) or `primary_gone`.
    pub end: &'static str,
    /// Why the primary is considered gone (null after fin).
    pub primary_gone: Option<String>,
    /// Blocks written to the target.
    pub blocks_written: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// Blocks whose write failed.
    pub failed_blocks: u64,
    /// Payload bytes the CPU copied (0 when zero-copy).
    pub payload_bytes_copied: u64,
    /// Control messages sent to the primary.
    pub control_messages: u64,
    /// SENDs that carried them (several messages per SEND when ready at once).
    pub control_sends: u64,
    /// Blocks whose window the primary's SEND_WITH_INV invalidated (every block received: a
    /// replica never invalidates a window itself).
    pub windows_invalidated_by_primary: u64,
    /// CPU time of the engine.
    pub cpu_seconds: f64,
}

fn config(o: &Replica) -> Result<ReplicaConfig, EngineError> {
    let s = &o.shared;
    Ok(ReplicaConfig::new(&o.target, o.listen)
        .block_size(s.bs)
        .window(s.iodepth)
        .buffers(s.buffers)
        .copy(s.copy)
        .timeout(Duration::from_secs(s.timeout))
        .wait(s.wait)
        .busy_poll(Duration::from_micros(s.busy_poll))
        .bounds(s.offset, s.size)
        .access(ReplicaAccess {
            primaries: o.allow_primary.clone(),
            secret: s.secret()?,
        }))
}

fn run(o: &Replica) -> Result<u8, EngineError> {
    let _span = tracing::info_span!("replica", listen = %o.listen).entered();
    let engine = ReplicaEngine::new(config(o)?)?;
    say(format!(
        "replica: listening on {}, target {} ({} bytes, {}), write cache: {}",
        o.listen,
        o.target,
        engine.capacity(),
        engine.backend(),
        engine.write_cache()
    ));
    let line = format!(
        "replica: primary connected; buffers {}{}, wait {}",
        engine.buffers(),
        copy_text(o.shared.copy),
        wait_text(&o.shared)
    );
    let report = engine.run_with(&mut |ev| match ev {
        Event::Connected => say(line.clone()),
        Event::Refused(why) => say(format!("replica: {why}")),
        _ => {}
    })?;
    let (code, end, gone) = match &report.end {
        ReplicaEnd::Fin => (0, "fin", None),
        ReplicaEnd::PrimaryGone(why) => {
            eprintln!("replica: {why}");
            (3, "primary_gone", Some(why.to_string()))
        }
    };
    say(format!(
        "replica: wrote {} blocks ({} bytes), {} failed, payload bytes copied by the CPU: {}, CPU {:.3} s, control messages {} in {} SENDs, windows invalidated by the primary {}",
        report.blocks_written,
        report.bytes_written,
        report.failed_blocks,
        report.payload_bytes_copied,
        report.cpu.as_secs_f64(),
        report.messages.messages,
        report.messages.sends,
        report.windows_invalidated_by_primary,
    ));
    if o.shared.json() {
        print_json(&Summary {
            end,
            primary_gone: gone,
            blocks_written: report.blocks_written,
            bytes_written: report.bytes_written,
            failed_blocks: report.failed_blocks,
            payload_bytes_copied: report.payload_bytes_copied,
            control_messages: report.messages.messages,
            control_sends: report.messages.sends,
            windows_invalidated_by_primary: report.windows_invalidated_by_primary,
            cpu_seconds: report.cpu.as_secs_f64(),
        });
    }
    Ok(code)
}

/// Runs `peerpipe replica`.
pub fn main(o: &Replica) -> ExitCode {
    match run(o) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("peerpipe replica: {}", crate::common::engine_error_text(&e));
            ExitCode::from(2)
        }
    }
}
