//! `peerpipe replicate`: the primary. Reads a byte range of a drive (or file) and replicates
//! it to N replicas over RDMA, zero-copy: source NVMe -> buffer (p2pmem or host) -> RDMA
//! WRITE -> replica buffer -> drive. The engine (`peerpipe::pipeline::engine`) does all the
//! I/O; this file holds the options, shows progress and prints the summary.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use peerpipe::pipeline::engine::{EngineError, Event, PrimaryConfig, PrimaryEngine, PrimaryReport};
use peerpipe::pipeline::ByteRange;
use serde::Serialize;

use crate::common::{copy_text, parse_seconds, parse_size, print_json, say, wait_text, Shared};

/// `peerpipe replicate` options.
#[derive(Debug, Args)]
pub struct Replicate {
    /// The source: /dev/ngXnY, a block device or a file
    #[arg(long, value_name = "PATH")]
    pub source: String,
    /// A replica's ADDR:PORT (repeat for several)
    #[arg(long, value_name = "ADDR:PORT", required = true)]
    pub replica: Vec<SocketAddr>,
    /// Local address to connect from
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<IpAddr>,
    /// Read the whole range back from every replica and compare
    #[arg(long)]
    pub verify: bool,
    /// Read the source at most B bytes/s (fio's --rate; default: unpaced)
    #[arg(long, value_name = "B", value_parser = parse_size)]
    pub rate: Option<u64>,
    /// Print a `progress:` line to stderr every S seconds (fractions allowed), also when
    /// stderr is not a terminal (default: a progress bar with rate, ETA and per-replica lag
    /// when stderr is a terminal, nothing otherwise)
    #[arg(long, value_name = "S", value_parser = parse_seconds)]
    pub status_interval: Option<Duration>,
    #[command(flatten)]
    pub shared: Shared,
}

/// The `--output-format=json` summary of a run (one object on stdout).
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Every block acked by every replica (and verified with --verify).
    pub success: bool,
    /// Number of replicas.
    pub replicas: usize,
    /// `p2p` or `host`.
    pub buffers: String,
    /// `none` or `bounce`.
    pub copy: String,
    /// `events` or `busy`.
    pub wait: String,
    /// Bytes per block.
    pub block_size: u32,
    /// Blocks in flight.
    pub window: u32,
    /// Bytes in the range.
    pub bytes: u64,
    /// Blocks in the range.
    pub blocks: u64,
    /// Bytes acked by every replica.
    pub replicated_bytes: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// replicated_bytes / seconds / 10^6.
    pub mb_per_s: f64,
    /// Blocks acked by every replica per second.
    pub iops: f64,
    /// Block latency percentiles (read to last ack), microseconds.
    pub latency_us: Latency,
    /// CPU time of the engine.
    pub cpu_seconds: f64,
    /// Payload bytes the CPU copied (0 when zero-copy).
    pub payload_bytes_copied: u64,
    /// Control messages sent to the replicas.
    pub control_messages: u64,
    /// SENDs that carried them (several messages per SEND when ready at once).
    pub control_sends: u64,
    /// Block copies read back and compared equal.
    pub verified_blocks: u64,
    /// Byte ranges `[start, end)` not acked by every replica.
    pub unreplicated: Vec<[u64; 2]>,
    /// Per replica, the byte ranges whose read-back differed.
    pub mismatches: Vec<Vec<[u64; 2]>>,
    /// Per replica, why it failed (null when it did not).
    pub replica_errors: Vec<Option<String>>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

fn pair(r: &ByteRange) -> [u64; 2] {
    [r.start, r.end]
}

impl Summary {
    fn new(rep: &PrimaryReport, replicas: usize) -> Summary {
        let oc = &rep.outcome;
        let secs = rep.elapsed.as_secs_f64();
        Summary {
            success: oc.success,
            replicas,
            buffers: rep.buffers.kind.to_string(),
            copy: rep.copy.to_string(),
            wait: rep.wait.to_string(),
            block_size: rep.layout.block_size(),
            window: rep.window,
            bytes: rep.layout.len(),
            blocks: rep.layout.blocks(),
            replicated_bytes: oc.replicated_bytes,
            seconds: secs,
            mb_per_s: oc.replicated_bytes as f64 / secs / 1e6,
            iops: oc.replicated_blocks as f64 / secs,
            latency_us: Latency {
                p50: rep.latency.p50_us,
                p99: rep.latency.p99_us,
                p999: rep.latency.p999_us,
                max: rep.latency.max_us,
            },
            cpu_seconds: rep.cpu.as_secs_f64(),
            payload_bytes_copied: rep.payload_bytes_copied,
            control_messages: rep.messages.messages,
            control_sends: rep.messages.sends,
            verified_blocks: oc.verified_blocks,
            unreplicated: oc.unreplicated.iter().map(pair).collect(),
            mismatches: oc
                .mismatches
                .iter()
                .map(|v| v.iter().map(pair).collect())
                .collect(),
            replica_errors: oc
                .replica_errors
                .iter()
                .map(|e| e.as_ref().map(ToString::to_string))
                .collect(),
        }
    }
}

fn config(o: &Replicate) -> Result<PrimaryConfig, EngineError> {
    let s = &o.shared;
    Ok(o.replica
        .iter()
        .fold(PrimaryConfig::new(&o.source), |c, r| c.replica(*r))
        .bind(o.bind)
        .offset(s.offset)
        .len(s.size)
        .block_size(s.bs)
        .window(s.iodepth)
        .buffers(s.buffers)
        .copy(s.copy)
        .verify(o.verify)
        .timeout(Duration::from_secs(s.timeout))
        .wait(s.wait)
        .busy_poll(Duration::from_micros(s.busy_poll))
        .rate(o.rate)
        .progress_every(o.status_interval.unwrap_or(Duration::from_secs(1)))
        .secret(s.secret()?))
}

fn run(o: &Replicate) -> Result<bool, EngineError> {
    let _span = tracing::info_span!("replicate", source = %o.source).entered();
    let engine = PrimaryEngine::new(config(o)?)?;
    let layout = *engine.layout();
    let n = o.replica.len();
    let json = o.shared.json();
    say(format!(
        "primary: {} bytes at {} in {} blocks of {} to {n} replica(s), window {}, buffers {}{}, source {} ({}), wait {}",
        layout.len(),
        layout.offset(),
        layout.blocks(),
        layout.block_size(),
        engine.window(),
        engine.buffers(),
        copy_text(o.shared.copy),
        o.source,
        engine.backend(),
        wait_text(&o.shared)
    ));
    // A progress bar only for a person watching: stderr is a terminal, no JSON, no
    // `progress:` lines asked for.
    let bar = (o.status_interval.is_none() && !json && std::io::stderr().is_terminal())
        .then(|| progress_bar(layout.len()));
    let report = engine.run_with(&mut |ev| {
        if let Event::Progress {
            blocks,
            bytes,
            elapsed,
            per_replica,
        } = ev
        {
            if o.status_interval.is_some() {
                say(format!(
                    "progress: {blocks}/{} blocks, {bytes} bytes acked by every replica, {:.3} s",
                    layout.blocks(),
                    elapsed.as_secs_f64()
                ));
            } else if let Some(bar) = &bar {
                bar.set_position(bytes);
                bar.set_message(lag_text(&per_replica));
            }
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print_summary(o, &report);
    Ok(report.outcome.success)
}

/// A bar over the range's bytes: bytes acked by every replica, rate, ETA, and the lag message.
fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    // The template is a constant and valid: fall back to the default style if not.
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {bytes}/{total_bytes} acked by every replica, {binary_bytes_per_sec}, ETA {eta} {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// How far each replica lags behind the one furthest ahead, in blocks acked
/// ("lag: r0 0, r1 12 blocks"); empty with a single replica.
fn lag_text(per_replica: &[u64]) -> String {
    if per_replica.len() < 2 {
        return String::new();
    }
    let lead = per_replica.iter().copied().max().unwrap_or(0);
    let parts: Vec<String> = per_replica
        .iter()
        .enumerate()
        .map(|(r, &n)| format!("r{r} {}", lead - n))
        .collect();
    format!("lag: {} blocks", parts.join(", "))
}

fn print_summary(o: &Replicate, rep: &PrimaryReport) {
    let oc = &rep.outcome;
    let n = o.replica.len();
    let sum = Summary::new(rep, n);
    if o.shared.json() {
        print_json(&sum);
    } else {
        let p = &sum.latency_us;
        println!(
            "{} {} bytes to {n} replica(s) in {:.3} s: {:.2} MB/s, {:.0} IOPS, latency p50 {:.0} us p99 {:.0} us p999 {:.0} us, CPU {:.3} s, payload bytes copied by the CPU: {}, control messages {} in {} SENDs",
            if oc.success { "replicated" } else { "FAILED:" },
            oc.replicated_bytes,
            sum.seconds,
            sum.mb_per_s,
            sum.iops,
            p.p50,
            p.p99,
            p.p999,
            sum.cpu_seconds,
            rep.payload_bytes_copied,
            rep.messages.messages,
            rep.messages.sends,
        );
        if o.verify {
            println!("verified {} block copies", oc.verified_blocks);
        }
    }
    for (r, e) in oc.replica_errors.iter().enumerate() {
        if let Some(e) = e {
            eprintln!("replica {r} ({}): {e}", o.replica[r]);
        }
    }
    for r in &oc.unreplicated {
        eprintln!("unreplicated: {r}");
    }
    for (rep, v) in oc.mismatches.iter().enumerate() {
        for r in v {
            eprintln!("verify mismatch on replica {rep}: {r}");
        }
    }
}

/// Runs `peerpipe replicate`.
pub fn main(o: &Replicate) -> ExitCode {
    match run(o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!(
                "peerpipe replicate: {}",
                crate::common::engine_error_text(&e)
            );
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lag_text;

    #[test]
    fn lag_is_behind_the_leading_replica() {
        assert_eq!(lag_text(&[]), "");
        assert_eq!(lag_text(&[7]), "");
        assert_eq!(lag_text(&[10, 4, 10]), "lag: r0 0, r1 6, r2 0 blocks");
    }
}
