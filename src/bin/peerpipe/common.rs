//! What `peerpipe replicate` and `peerpipe replica` share: the fio-named options both roles
//! take, size parsing, the output format and the exit codes.

use std::time::Duration;

use clap::{Args, ValueEnum};
use peerpipe::pipeline::engine::{
    BufferChoice, CopyMode, EngineError, WaitMode, DEFAULT_BUSY_POLL,
};

/// The exit codes of both roles, printed by `--help` (scripts and tests rely on them).
pub const EXIT_CODES: &str = "\
exit codes:
  0  primary: every block acked by every replica (and verified with --verify).
     replica: the primary sent fin; every block it acked is on the drive (flushed).
  1  primary: failure; the unreplicated byte ranges (and verify mismatches) are printed, and
     --output-format=json says \"success\":false. Never 0 when any block was not acked by
     every replica.
  2  usage or setup error, or a protocol violation (malformed / out-of-order message).
  3  replica only: the primary went away before fin (it exited, was killed, the link went
     down, or it sent nothing for --timeout seconds). This is an orderly exit, not a crash:
     blocks this replica acked are on its drive, blocks it never acked were never claimed as
     replicated by the primary; the summary line says how many blocks were written. It is
     distinct from 0 because this replica does not hold the whole range.";

/// The `--output-format=json` summary of `peerpipe replicate`, printed by its `--help`.
pub const PRIMARY_JSON: &str = "\
--output-format=json: one object on stdout at the end (MB = 10^6 bytes, ranges [start,end)):
  {\"success\":bool,\"replicas\":N,\"buffers\":\"p2p|host\",\"copy\":\"none|bounce\",
   \"wait\":\"events|busy\",\"block_size\":N,\"window\":N,\"bytes\":N,\"blocks\":N,
   \"replicated_bytes\":N,\"seconds\":F,\"mb_per_s\":F,\"iops\":F,
   \"latency_us\":{\"p50\":F,\"p99\":F,\"p999\":F,\"max\":F},\"cpu_seconds\":F,
   \"payload_bytes_copied\":N,\"control_messages\":N,\"control_sends\":N,
   \"verified_blocks\":N,\"unreplicated\":[[start,end],...],
   \"mismatches\":[[[start,end],...] per replica],\"replica_errors\":[null|\"why\" per replica]}";

/// The `--output-format=json` summary of `peerpipe replica`, printed by its `--help`.
pub const REPLICA_JSON: &str = "\
--output-format=json: one object on stdout at exit:
  {\"end\":\"fin|primary_gone\",\"primary_gone\":null|\"why\",\"blocks_written\":N,
   \"bytes_written\":N,\"failed_blocks\":N,\"payload_bytes_copied\":N,
   \"control_messages\":N,\"control_sends\":N,\"windows_invalidated_by_primary\":N,
   \"cpu_seconds\":F}";

/// The trust model, printed by both roles' `--help`.
pub const TRUST: &str = "\
PATH: /dev/ngXnY (NVMe passthrough), a block device or a file (O_DIRECT). Sizes take K/M/G
suffixes (powers of 1024, as fio).
trust model: a replica writes only what its primary sends, so it accepts as primary only a
peer connecting from an --allow-primary address that proves the secret in --secret-file (at
least 16 bytes, the same file on both sides; a mutual HMAC-SHA256 challenge-response in the
connection setup: the secret never crosses the wire, the replica proves it too), and only a
range inside its own --offset/--size (default: the whole target). Others are refused and the
replica goes on listening. --insecure-any-primary accepts the first peer that connects (trials
on a closed network only). A block device target is opened O_EXCL: a mounted or claimed device
is refused. If a replica dies, stalls or misbehaves, the primary fails that replica alone, the
others finish, and exit code 1 and the summary name the failed replica and the unreplicated
ranges; if the primary dies, each replica exits 3 with every block it acked on its drive.";

/// `--output-format` (fio's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable lines.
    Normal,
    /// One JSON object on stdout.
    Json,
}

/// A size: a number with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (n, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(mul))
        .ok_or_else(|| format!("bad size {s:?}: use a number with optional K/M/G"))
}

/// Seconds > 0, fractions allowed.
pub fn parse_seconds(v: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{v:?}: seconds > 0"))
}

fn from_str<T: std::str::FromStr>(v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.parse().map_err(|e: T::Err| e.to_string())
}

/// Options both roles take.
#[derive(Debug, Args)]
pub struct Shared {
    /// Start of the range (primary: what to replicate; replica: the lowest offset it accepts)
    #[arg(long, value_name = "B", default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Length of the range (default: to the end of the source / target)
    #[arg(long, value_name = "B", alias = "len", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Block size of each transfer
    #[arg(long, value_name = "B", alias = "block-size", default_value = "64K", value_parser = parse_size)]
    pub bs: u64,
    /// Blocks in flight
    #[arg(long, value_name = "N", alias = "window", default_value_t = 16)]
    pub iodepth: u32,
    /// Where the data buffers live: p2p (p2pmem) or host memory
    #[arg(long, value_name = "p2p|host", default_value = "p2p", value_parser = from_str::<BufferChoice>)]
    pub buffers: BufferChoice,
    /// none: zero-copy; bounce: copy each block through a host buffer (for comparison)
    #[arg(long, value_name = "none|bounce", default_value = "none", value_parser = from_str::<CopyMode>)]
    pub copy: CopyMode,
    /// events: sleep on RDMA completion channels and the drive in one io_uring; busy: poll
    #[arg(long, value_name = "events|busy", default_value = "events", value_parser = from_str::<WaitMode>)]
    pub wait: WaitMode,
    /// Microseconds an events-mode loop keeps polling after it runs out of work, before it
    /// sleeps (0: sleep at once); spends up to that much CPU per idle spell to save wake-ups
    #[arg(long, value_name = "USECS", default_value_t = DEFAULT_BUSY_POLL.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub busy_poll: u64,
    /// Seconds without progress before a peer is declared gone
    #[arg(long, value_name = "S", default_value_t = 20)]
    pub timeout: u64,
    /// The shared secret (at least 16 bytes, the same file on both sides)
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<String>,
    /// Output format (fio's name); --json is short for --output-format=json
    #[arg(long, value_enum, value_name = "normal|json", default_value = "normal")]
    pub output_format: OutputFormat,
    /// Same as --output-format=json
    #[arg(long)]
    pub json: bool,
}

impl Shared {
    /// Whether the summary is JSON.
    pub fn json(&self) -> bool {
        self.json || self.output_format == OutputFormat::Json
    }

    /// The secret from `--secret-file`, if given.
    pub fn secret(
        &self,
    ) -> Result<Option<peerpipe::pipeline::engine::Secret>, peerpipe::pipeline::engine::EngineError>
    {
        self.secret_file
            .as_ref()
            .map(|f| peerpipe::pipeline::engine::Secret::from_file(std::path::Path::new(f)))
            .transpose()
    }
}

/// ", copy bounce" or ", zero-copy" for the start lines.
pub fn copy_text(c: CopyMode) -> &'static str {
    match c {
        CopyMode::Bounce => ", copy bounce",
        CopyMode::None => ", zero-copy",
    }
}

/// How the loop waits, for the start-up lines: "events, busy poll 200 us", "busy".
pub fn wait_text(s: &Shared) -> String {
    match s.wait {
        WaitMode::Events if s.busy_poll > 0 => format!("events, busy poll {} us", s.busy_poll),
        w => w.to_string(),
    }
}

/// One status line to stderr in a single write, so lines of processes sharing a terminal
/// (a primary and its replicas in the demo) do not interleave mid-line.
pub fn say(mut line: String) {
    use std::io::Write;
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Prints `value` as one compact JSON line on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("peerpipe: JSON encoding failed: {e}"),
    }
}

/// An engine error as the command line prints it: the library speaks of its configuration
/// fields, the command line names the option that sets them and adds what to try.
pub fn engine_error_text(e: &EngineError) -> String {
    match e {
        EngineError::InvalidConfig { what, reason } => format!("{}: {reason}", option_of(what)),
        EngineError::NoP2pMem(_) => format!("{e} (--buffers host)"),
        EngineError::BlockTooLarge { got, .. } => format!("{e} (peerpipe replica --bs {got})"),
        EngineError::Refused { .. } => {
            format!("{e} (check --secret-file on both sides and the replica's --allow-primary)")
        }
        _ => e.to_string(),
    }
}

/// The command-line option of an engine configuration field.
fn option_of(field: &str) -> &str {
    match field {
        "source" => "--source",
        "replicas" => "--replica",
        "target" => "--target",
        "block_size" => "--bs",
        "window" => "--iodepth",
        "timeout" => "--timeout",
        "buffers" => "--buffers",
        "copy" => "--copy",
        "wait" => "--wait",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_name_the_options() {
        let e: EngineError = "spin".parse::<WaitMode>().unwrap_err();
        assert!(engine_error_text(&e).starts_with("--wait: "), "{e}");
        assert!(
            !e.to_string().contains("--"),
            "the library speaks its own terms: {e}"
        );
        let e = EngineError::NoP2pMem("out of p2pmem".into());
        assert!(engine_error_text(&e).ends_with("(--buffers host)"));
        assert_eq!(option_of("block_size"), "--bs");
        assert_eq!(option_of("window"), "--iodepth");
    }
}
