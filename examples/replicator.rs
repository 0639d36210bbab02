//! Replicates a byte range of a drive (or file) from a primary to N replicas over RDMA,
//! zero-copy: source NVMe -> buffer (p2pmem or host) -> RDMA WRITE -> replica buffer -> drive.
//!
//! ```text
//! replicator replica --listen 10.77.0.2:7471 --target /dev/nvme2n1 [--buffers p2p|host] [--copy bounce]
//! replicator primary --source /dev/ng1n1 --replica 10.77.0.2:7471 [--replica ...]
//!            [--bind 10.77.0.1] [--offset B] [--len B] [--block-size B] [--window N]
//!            [--buffers p2p|host] [--copy bounce] [--wait events|busy] [--verify] [--json]
//! ```
//! A `/dev/ngXnY` path is driven through NVMe passthrough; block devices and files through
//! O_DIRECT.
//!
//! Exit codes: 0 success; 1 failure (unreplicated ranges or verify mismatches are printed);
//! 2 usage or setup error; 3 (replica) the primary went away before `fin` (see `--help`).
//!
//! The engine (`peerpipe::pipeline::engine`) does all the I/O; this file parses the command
//! line, shows progress and prints the summary.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use peerpipe::pipeline::engine::{
    BufferChoice, CopyMode, EngineError, Event, PrimaryConfig, PrimaryEngine, PrimaryReport,
    ReplicaAccess, ReplicaConfig, ReplicaEnd, ReplicaEngine, Secret, WaitMode,
};
use peerpipe::pipeline::ByteRange;

type Res<T> = Result<T, String>;

/// Printed by `--help`; the exit codes are part of the interface (scripts and tests use them).
const USAGE: &str = "\
usage:
  replicator replica --listen ADDR:PORT --target PATH
                     (--allow-primary ADDR [--allow-primary ...] --secret-file FILE | --insecure-any-primary)
                     [--offset B] [--len B] [--buffers p2p|host] [--copy none|bounce]
                     [--window N] [--block-size B] [--timeout S] [--wait events|busy]
  replicator primary --source PATH --replica ADDR:PORT [--replica ...] [--bind ADDR]
                     [--offset B] [--len B] [--block-size B] [--window N]
                     [--buffers p2p|host] [--copy none|bounce] [--wait events|busy]
                     [--verify] [--json] [--timeout S] [--rate B] [--status-interval S]
                     [--secret-file FILE]
PATH: /dev/ngXnY (NVMe passthrough), a block device or a file (O_DIRECT).
sizes take K/M/G suffixes; defaults: --block-size 64K, --window 16, --buffers p2p, --timeout 20,
--wait events (sleep on RDMA completion channels and the drive in one io_uring; busy: poll).
trust model: a replica writes only what its primary sends, so it accepts as primary only a
peer connecting from an --allow-primary address that proves the secret in --secret-file (at
least 16 bytes, the same file on both sides; a mutual HMAC-SHA256 challenge-response in the
connection setup: the secret never crosses the wire, the replica proves it too), and only a
range inside its own --offset/--len (default: the whole target). Others are refused and the
replica goes on listening. --insecure-any-primary accepts the first peer that connects (trials
on a closed network only). A block device target is opened O_EXCL: a mounted or claimed device
is refused. If a replica dies, stalls or misbehaves, the primary fails that replica alone, the
others finish, and exit code 1 and the summary name the failed replica and the unreplicated
ranges; if the primary dies, each replica exits 3 with every block it acked on its drive.
--rate B: read the source at most B bytes/s (as fio's --rate; default: unpaced).
--status-interval S: print a `progress:` line to stderr every S seconds (fractions allowed),
also when stderr is not a terminal (default: a progress bar on a terminal for runs >= 64M).

exit codes:
  0  primary: every block acked by every replica (and verified with --verify).
     replica: the primary sent fin; every block it acked is on the drive (flushed).
  1  primary: failure; the unreplicated byte ranges (and verify mismatches) are printed, and
     --json says \"success\":false. Never 0 when any block was not acked by every replica.
  2  usage or setup error, or a protocol violation (malformed / out-of-order message).
  3  replica only: the primary went away before fin (it exited, was killed, the link went
     down, or it sent nothing for --timeout seconds). This is an orderly exit, not a crash:
     blocks this replica acked are on its drive, blocks it never acked were never claimed as
     replicated by the primary; the summary line says how many blocks were written. It is
     distinct from 0 because this replica does not hold the whole range.
";

// ---------------------------------------------------------------- options

#[derive(Debug)]
struct Opts {
    primary: bool,
    listen: Option<SocketAddr>,
    bind: Option<IpAddr>,
    replicas: Vec<SocketAddr>,
    path: String,
    offset: u64,
    len: Option<u64>,
    block_size: u64,
    window: u32,
    buffers: BufferChoice,
    copy: CopyMode,
    wait: WaitMode,
    verify: bool,
    json: bool,
    timeout: Duration,
    rate: Option<u64>,
    status_interval: Option<Duration>,
    allow: Vec<IpAddr>,
    secret_file: Option<String>,
    insecure: bool,
}

fn parse_size(s: &str) -> Res<u64> {
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

fn parse(args: &[String]) -> Res<Opts> {
    let role = args.first().map(String::as_str);
    let mut o = Opts {
        primary: match role {
            Some("primary") => true,
            Some("replica") => false,
            _ => return Err("first argument must be `primary` or `replica`".into()),
        },
        listen: None,
        bind: None,
        replicas: Vec::new(),
        path: String::new(),
        offset: 0,
        len: None,
        block_size: 64 << 10,
        window: 16,
        buffers: BufferChoice::P2p,
        copy: CopyMode::None,
        wait: WaitMode::Events,
        verify: false,
        json: false,
        timeout: Duration::from_secs(20),
        rate: None,
        status_interval: None,
        allow: Vec::new(),
        secret_file: None,
        insecure: false,
    };
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--listen" => o.listen = Some(val()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--bind" => o.bind = Some(val()?.parse().map_err(|e| format!("--bind: {e}"))?),
            "--replica" => o
                .replicas
                .push(val()?.parse().map_err(|e| format!("--replica: {e}"))?),
            "--source" | "--target" => o.path = val()?,
            "--offset" => o.offset = parse_size(&val()?)?,
            "--len" => o.len = Some(parse_size(&val()?)?),
            "--block-size" => o.block_size = parse_size(&val()?)?,
            "--window" => o.window = val()?.parse().map_err(|e| format!("--window: {e}"))?,
            "--buffers" => o.buffers = val()?.parse().map_err(|e: EngineError| e.to_string())?,
            "--copy" => o.copy = val()?.parse().map_err(|e: EngineError| e.to_string())?,
            "--wait" => o.wait = val()?.parse().map_err(|e: EngineError| e.to_string())?,
            "--timeout" => {
                o.timeout =
                    Duration::from_secs(val()?.parse().map_err(|e| format!("--timeout: {e}"))?)
            }
            "--rate" => o.rate = Some(parse_size(&val()?)?),
            "--allow-primary" => o.allow.push(
                val()?
                    .parse()
                    .map_err(|e| format!("--allow-primary: {e}"))?,
            ),
            "--secret-file" => o.secret_file = Some(val()?),
            "--insecure-any-primary" => o.insecure = true,
            "--status-interval" => {
                let v = val()?;
                o.status_interval = Some(
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| *s > 0.0)
                        .and_then(|s| Duration::try_from_secs_f64(s).ok())
                        .ok_or_else(|| format!("--status-interval {v:?}: seconds > 0"))?,
                )
            }
            "--verify" => o.verify = true,
            "--json" => o.json = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.path.is_empty() {
        return Err("--source (primary) / --target (replica) is required".into());
    }
    if o.primary && o.replicas.is_empty() {
        return Err("primary needs at least one --replica ADDR:PORT".into());
    }
    if !o.primary && o.listen.is_none() {
        return Err("replica needs --listen ADDR:PORT".into());
    }
    if !o.primary && (o.rate.is_some() || o.status_interval.is_some()) {
        return Err("--rate and --status-interval are primary options".into());
    }
    if o.primary && (!o.allow.is_empty() || o.insecure) {
        return Err("--allow-primary and --insecure-any-primary are replica options".into());
    }
    if !o.primary && !o.insecure && (o.allow.is_empty() || o.secret_file.is_none()) {
        return Err(
            "a replica needs --allow-primary ADDR and --secret-file FILE (who may write \
             to it), or --insecure-any-primary to accept the first peer that connects"
                .into(),
        );
    }
    if o.insecure && (!o.allow.is_empty() || o.secret_file.is_some()) {
        return Err("--insecure-any-primary contradicts --allow-primary / --secret-file".into());
    }
    // The engine checks the rest (window, timeout, range) with the same messages.
    Ok(o)
}

fn secret(o: &Opts) -> Result<Option<Secret>, EngineError> {
    o.secret_file
        .as_ref()
        .map(|f| Secret::from_file(std::path::Path::new(f)))
        .transpose()
}

fn primary_config(o: &Opts) -> Result<PrimaryConfig, EngineError> {
    Ok(o.replicas
        .iter()
        .fold(PrimaryConfig::new(&o.path), |c, r| c.replica(*r))
        .bind(o.bind)
        .offset(o.offset)
        .len(o.len)
        .block_size(o.block_size)
        .window(o.window)
        .buffers(o.buffers)
        .copy(o.copy)
        .verify(o.verify)
        .timeout(o.timeout)
        .wait(o.wait)
        .rate(o.rate)
        .progress_every(o.status_interval.unwrap_or(Duration::from_secs(1)))
        .secret(secret(o)?))
}

fn replica_config(o: &Opts, listen: SocketAddr) -> Result<ReplicaConfig, EngineError> {
    Ok(ReplicaConfig::new(&o.path, listen)
        .block_size(o.block_size)
        .window(o.window)
        .buffers(o.buffers)
        .copy(o.copy)
        .timeout(o.timeout)
        .wait(o.wait)
        .bounds(o.offset, o.len)
        .access(ReplicaAccess {
            primaries: o.allow.clone(),
            secret: secret(o)?,
        }))
}

fn copy_text(c: CopyMode) -> &'static str {
    match c {
        CopyMode::Bounce => ", copy bounce",
        CopyMode::None => ", zero-copy",
    }
}

/// One status line to stderr in a single write, so lines of processes sharing a terminal
/// (a primary and its replicas in the demo) do not interleave mid-line.
fn say(mut line: String) {
    use std::io::Write;
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

// ---------------------------------------------------------------- primary

fn run_primary(o: &Opts) -> Result<bool, EngineError> {
    let engine = PrimaryEngine::new(primary_config(o)?)?;
    let layout = *engine.layout();
    let n = o.replicas.len();
    say(format!(
        "primary: {} bytes at {} in {} blocks of {} to {n} replica(s), window {}, buffers {}{}, source {} ({}), wait {}",
        layout.len(),
        layout.offset(),
        layout.blocks(),
        layout.block_size(),
        engine.window(),
        engine.buffers(),
        copy_text(o.copy),
        o.path,
        engine.backend(),
        o.wait
    ));
    let progress = layout.len() >= (64 << 20) && !o.json;
    let mut shown = false;
    let report = engine.run_with(&mut |ev| {
        if let Event::Progress {
            blocks,
            bytes,
            elapsed,
        } = ev
        {
            if o.status_interval.is_some() {
                say(format!(
                    "progress: {blocks}/{} blocks, {bytes} bytes acked by every replica, {:.3} s",
                    layout.blocks(),
                    elapsed.as_secs_f64()
                ));
            } else if progress {
                shown = true;
                eprint!(
                    "\r{:5.1}% {blocks}/{} blocks {:.1} MB/s   ",
                    100.0 * bytes as f64 / layout.len() as f64,
                    layout.blocks(),
                    bytes as f64 / elapsed.as_secs_f64() / 1e6
                );
            }
        }
    })?;
    if shown {
        eprintln!();
    }
    print_summary(o, &report);
    Ok(report.outcome.success)
}

fn ranges(v: &[ByteRange]) -> String {
    v.iter()
        .map(|r| format!("[{},{}]", r.start, r.end))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_summary(o: &Opts, rep: &PrimaryReport) {
    let oc = &rep.outcome;
    let p = &rep.latency;
    let n = o.replicas.len();
    let secs = rep.elapsed.as_secs_f64();
    let cpu = rep.cpu.as_secs_f64();
    if o.json {
        let errs = oc
            .replica_errors
            .iter()
            .map(|e| match e {
                Some(e) => {
                    let s = e.to_string();
                    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
                }
                None => "null".into(),
            })
            .collect::<Vec<_>>()
            .join(",");
        let mism = oc
            .mismatches
            .iter()
            .map(|v| format!("[{}]", ranges(v)))
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{{\"success\":{},\"replicas\":{n},\"buffers\":\"{}\",\"copy\":\"{}\",\"wait\":\"{}\",\"block_size\":{},\"window\":{},\"bytes\":{},\"blocks\":{},\"replicated_bytes\":{},\"seconds\":{secs:.6},\"mb_per_s\":{:.3},\"iops\":{:.1},\"latency_us\":{{\"p50\":{:.1},\"p99\":{:.1},\"p999\":{:.1},\"max\":{:.1}}},\"cpu_seconds\":{cpu:.6},\"payload_bytes_copied\":{},\"verified_blocks\":{},\"unreplicated\":[{}],\"mismatches\":[{mism}],\"replica_errors\":[{errs}]}}",
            oc.success,
            rep.buffers.kind,
            rep.copy,
            rep.wait,
            rep.layout.block_size(),
            rep.window,
            rep.layout.len(),
            rep.layout.blocks(),
            oc.replicated_bytes,
            oc.replicated_bytes as f64 / secs / 1e6,
            oc.replicated_blocks as f64 / secs,
            p.p50_us,
            p.p99_us,
            p.p999_us,
            p.max_us,
            rep.payload_bytes_copied,
            oc.verified_blocks,
            ranges(&oc.unreplicated),
        );
    } else {
        println!(
            "{} {} bytes to {n} replica(s) in {secs:.3} s: {:.2} MB/s, {:.0} IOPS, latency p50 {:.0} us p99 {:.0} us p999 {:.0} us, CPU {cpu:.3} s, payload bytes copied by the CPU: {}",
            if oc.success { "replicated" } else { "FAILED:" },
            oc.replicated_bytes,
            oc.replicated_bytes as f64 / secs / 1e6,
            oc.replicated_blocks as f64 / secs,
            p.p50_us,
            p.p99_us,
            p.p999_us,
            rep.payload_bytes_copied
        );
        if o.verify {
            println!("verified {} block copies", oc.verified_blocks);
        }
    }
    for (r, e) in oc.replica_errors.iter().enumerate() {
        if let Some(e) = e {
            eprintln!("replica {r} ({}): {e}", o.replicas[r]);
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

// ---------------------------------------------------------------- replica

fn run_replica(o: &Opts) -> Result<u8, EngineError> {
    let listen = o.listen.ok_or_else(|| EngineError::InvalidConfig {
        what: "--listen",
        reason: "is required".into(),
    })?;
    let engine = ReplicaEngine::new(replica_config(o, listen)?)?;
    say(format!(
        "replica: listening on {listen}, target {} ({} bytes, {}), write cache: {}",
        o.path,
        engine.capacity(),
        engine.backend(),
        engine.write_cache()
    ));
    let line = format!(
        "replica: primary connected; buffers {}{}, wait {}",
        engine.buffers(),
        copy_text(o.copy),
        o.wait
    );
    let report = engine.run_with(&mut |ev| match ev {
        Event::Connected => say(line.clone()),
        Event::Refused(why) => say(format!("replica: {why}")),
        _ => {}
    })?;
    let code = match &report.end {
        ReplicaEnd::Fin => 0,
        ReplicaEnd::PrimaryGone(why) => {
            eprintln!("replica: {why}");
            3
        }
    };
    say(format!(
        "replica: wrote {} blocks ({} bytes), {} failed, payload bytes copied by the CPU: {}, CPU {:.3} s",
        report.blocks_written,
        report.bytes_written,
        report.failed_blocks,
        report.payload_bytes_copied,
        report.cpu.as_secs_f64()
    ));
    Ok(code)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("replicator: {e}\n(run `replicator --help` for usage and exit codes)");
            return ExitCode::from(2);
        }
    };
    if o.primary {
        match run_primary(&o) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("replicator primary: {e}");
                ExitCode::from(2)
            }
        }
    } else {
        match run_replica(&o) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("replicator replica: {e}");
                ExitCode::from(2)
            }
        }
    }
}
