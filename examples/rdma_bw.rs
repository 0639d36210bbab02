//! RDMA WRITE bandwidth and latency over peerpipe-rdma, in the style of perftest's
//! `ib_write_bw -R` and `ib_write_lat -R` (same parameters, same output columns).
//!
//! ```text
//! server: rdma_bw [bw|lat] [--bind ADDR] [-p PORT] [-u QP_TIMEOUT]
//! client: rdma_bw [bw|lat] [-s SIZE] [-n ITERS] [-t TX_DEPTH] [-l POST_LIST] [-Q CQ_MOD]
//!                 [-u QP_TIMEOUT] [--source_ip ADDR] [-p PORT] [-d DEVICE]
//!                 [-D SECS] [-a] [--report_gbits] SERVER
//! ```
//! (clap: `--opt=value`, `-h/--help`, `--version`, exit status 2 on usage errors; `RUST_LOG`
//! for the library's logs.) The client sends the test parameters and its buffer in the connect private data; the
//! server answers with its buffer in the accept private data. BW is MiB/s (like perftest).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use peerpipe_rdma::*;

const T: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Bw,
    Lat,
}

struct Opts {
    mode: Mode,
    size: usize,
    iters: u64,
    tx_depth: u32,
    /// WRs per `ibv_post_send` (perftest's `--post_list`, default 1 like perftest: on rxe a
    /// chain is handed to the kernel only once it is complete, while single posts let the
    /// kernel start sending the first WR at once)
    post_list: u32,
    /// a signalled WR every `cq_mod` (perftest's `-Q/--cq-mod`, default 100 like perftest)
    cq_mod: u32,
    /// local ACK timeout exponent (perftest's `-u/--qp-timeout`, default 14 like perftest:
    /// a lost packet is resent after 67 ms instead of rdma_cm's RoCE default of ~0.5 s)
    qp_timeout: u8,
    port: u16,
    bind: Option<IpAddr>,
    source: Option<IpAddr>,
    server: Option<IpAddr>,
    /// Run each size this long instead of `iters` times (perftest `-D`).
    duration: Option<Duration>,
    /// Every size from 2 B to 8 MiB, doubling (perftest `-a`).
    all_sizes: bool,
    /// Bandwidth in Gb/s instead of MiB/s (perftest `--report_gbits`).
    gbits: bool,
    /// The RDMA device the connection must be on (perftest `-d`).
    ib_dev: Option<String>,
    /// The buffer is a mapping of this p2pmem char device (perftest `--mmap`).
    mmap: Option<std::path::PathBuf>,
}

/// perftest's `-a` sizes: 2 B to 8 MiB.
const ALL_SIZES: std::ops::RangeInclusive<u32> = 1..=23;

/// RDMA WRITE bandwidth / latency in the style of perftest (its flag names; BW in MiB/s).
#[derive(Debug, clap::Parser)]
#[command(name = "rdma_bw", version)]
struct Cli {
    /// `bw` (as ib_write_bw, the default) or `lat` (as ib_write_lat), then the server's
    /// address on the client (no address: run the server)
    #[arg(value_name = "[bw|lat] [SERVER]", num_args = 0..=2)]
    words: Vec<String>,
    /// Size of message to exchange (perftest -s)
    #[arg(short = 's', long, default_value_t = 65536)]
    size: usize,
    /// Number of exchanges (perftest -n; default 5000 bw, 1000 lat)
    #[arg(short = 'n', long, default_value_t = 0)]
    iters: u64,
    /// Size of the send queue (perftest -t)
    #[arg(short = 't', long = "tx-depth", default_value_t = 128)]
    tx_depth: u32,
    /// WRs per ibv_post_send (perftest -l; 1 lets rxe start the first WR at once)
    #[arg(short = 'l', long = "post_list", default_value_t = 1)]
    post_list: u32,
    /// A signalled WR every N (perftest -Q)
    #[arg(short = 'Q', long = "cq-mod", default_value_t = 100)]
    cq_mod: u32,
    /// Local ACK timeout exponent (perftest -u; 14: a lost packet is resent after 67 ms)
    #[arg(short = 'u', long = "qp-timeout", default_value_t = 14)]
    qp_timeout: u8,
    /// Listen / connect port (perftest -p)
    #[arg(short = 'p', long, default_value_t = 18515)]
    port: u16,
    /// Server: local address to listen on (default: any)
    #[arg(long, value_name = "ADDR")]
    bind: Option<IpAddr>,
    /// Client: source address to connect from (perftest --source_ip)
    #[arg(long = "source_ip", value_name = "ADDR")]
    source_ip: Option<IpAddr>,
    /// Connect through rdma_cm (perftest -R; always on here)
    #[arg(short = 'R', long = "rdma_cm")]
    rdma_cm: bool,
    /// Client, bw: run for SECS seconds per size instead of -n iterations (perftest -D)
    #[arg(short = 'D', long = "duration", value_name = "SECS")]
    duration: Option<u64>,
    /// Client, bw: every size from 2 B to 8 MiB, doubling, one row each (perftest -a)
    #[arg(short = 'a', long = "all")]
    all: bool,
    /// Client, bw: report bandwidth in Gb/s (10^9 bits/s) instead of MiB/s (perftest
    /// --report_gbits)
    #[arg(long = "report_gbits")]
    report_gbits: bool,
    /// Client: the RDMA device the connection must use (perftest -d; rdma_cm picks the device
    /// by address, so this checks it)
    #[arg(short = 'd', long = "ib-dev", value_name = "DEVICE")]
    ib_dev: Option<String>,
    /// This side's buffer is a mapping of FILE instead of host memory (perftest --mmap): a
    /// p2pmem char device (/dev/p2pmemN) of a provider found in sysfs
    #[arg(long = "mmap", value_name = "FILE")]
    mmap: Option<std::path::PathBuf>,
}

fn parse() -> Opts {
    use clap::{CommandFactory as _, Parser as _};
    let c = Cli::parse();
    let fail = |msg: String| -> ! {
        Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, msg)
            .exit()
    };
    let mut words = c.words.iter().map(String::as_str).peekable();
    let mode = match words.peek() {
        Some(&"lat") => Mode::Lat,
        _ => Mode::Bw,
    };
    if matches!(words.peek(), Some(&("bw" | "lat"))) {
        words.next();
    }
    let server = words.next().map(|w| {
        w.parse::<IpAddr>()
            .unwrap_or_else(|e| fail(format!("server address {w:?}: {e}")))
    });
    if let Some(w) = words.next() {
        fail(format!("unexpected argument {w:?}"));
    }
    let mut o = Opts {
        mode,
        size: c.size,
        iters: c.iters,
        tx_depth: c.tx_depth,
        post_list: c.post_list,
        cq_mod: c.cq_mod,
        qp_timeout: c.qp_timeout,
        port: c.port,
        bind: c.bind,
        source: c.source_ip,
        server,
        duration: c.duration.map(Duration::from_secs),
        all_sizes: c.all,
        gbits: c.report_gbits,
        ib_dev: c.ib_dev,
        mmap: c.mmap,
    };
    if o.mode == Mode::Lat && (o.duration.is_some() || o.all_sizes || o.gbits) {
        fail("-D, -a and --report_gbits apply to bw only".into());
    }
    if o.server.is_none() && (o.duration.is_some() || o.all_sizes || o.gbits || o.ib_dev.is_some())
    {
        fail("-D, -a, --report_gbits and -d are client options (give the server's address)".into());
    }
    if o.duration == Some(Duration::ZERO) {
        fail("-D must be at least 1 second".into());
    }
    if o.all_sizes {
        // One buffer for every size: the largest.
        o.size = 1 << ALL_SIZES.end();
    }
    if o.iters == 0 {
        o.iters = if o.mode == Mode::Bw { 5000 } else { 1000 };
    }
    if o.size == 0 || o.iters < 5 || o.tx_depth == 0 || o.post_list == 0 {
        fail("size must be > 0, iters >= 5, tx-depth > 0, post_list > 0".into());
    }
    o
}

/// Connect private data: mode, size, iters, tx_depth, buffer (addr, rkey).
fn encode_req(mode: Mode, size: u32, iters: u64, depth: u32, buf: RemoteBuf) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    v.push(if mode == Mode::Bw { 1 } else { 2 });
    v.extend_from_slice(&[0; 3]);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&iters.to_be_bytes());
    v.extend_from_slice(&depth.to_be_bytes());
    v.extend_from_slice(&buf.addr.to_be_bytes());
    v.extend_from_slice(&buf.rkey.to_be_bytes());
    v
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn make_cq(ctx: &Context) -> Result<CompletionQueue> {
    CompletionQueue::new(ctx, 1024)
}

fn caps(depth: u32) -> QpCaps {
    QpCaps {
        max_send_wr: depth.max(16),
        max_recv_wr: 16,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 64,
    }
}

/// The test buffer: host memory, or with `--mmap` a fresh mapping of that p2pmem char device.
fn buffer(
    pd: &ProtectionDomain,
    size: usize,
    access: Access,
    mmap: Option<&std::path::Path>,
) -> Result<MemoryRegion> {
    use peerpipe_p2p_alloc::{discover, Interface, Mapping, SysRoot};
    let Some(path) = mmap else {
        return MemoryRegion::alloc(pd, size, access);
    };
    let bad = |reason: String| Error::InvalidArgument {
        op: "rdma_bw --mmap",
        reason,
    };
    let provider = discover(&SysRoot::live())
        .map_err(|e| bad(format!("looking for p2pmem providers: {e}")))?
        .into_iter()
        .find(|p| p.chardev.as_deref() == Some(path))
        .ok_or_else(|| bad(format!("{} is no p2pmem char device", path.display())))?;
    let map = Mapping::p2p(
        &provider,
        Interface::CharDev,
        size.next_multiple_of(4096),
        4096,
    )
    .map_err(|e| bad(format!("mapping {}: {e}", path.display())))?;
    let ptr = map.addr();
    eprintln!(
        "rdma_bw: buffer of {size} bytes in p2pmem ({})",
        path.display()
    );
    // SAFETY: `map` is a live mapping of at least `size` bytes; the region keeps it (as its
    // owner) until after deregistration, and this program makes no Rust references into it.
    unsafe {
        MemoryRegion::register_with_owner(
            pd,
            ptr,
            size,
            access,
            MemoryKind::Peer,
            Some(Box::new(map)),
        )
    }
}

fn run_server(o: &Opts) -> Result<()> {
    let addr = o.bind.unwrap_or(IpAddr::from([0u8, 0, 0, 0]));
    let listener = Listener::bind(SocketAddr::new(addr, o.port), 4)?;
    println!("waiting for a client on {addr}:{}", o.port);
    let req = loop {
        match listener.get_request(Duration::from_secs(1)) {
            Ok(r) => break r,
            Err(Error::Timeout { .. }) => continue,
            Err(e) => return Err(e),
        }
    };
    let pdata = req.private_data().to_vec();
    if pdata.len() < 32 {
        return Err(Error::InvalidArgument {
            op: "rdma_bw server",
            reason: "client sent no test parameters".into(),
        });
    }
    let mode = if pdata[0] == 2 { Mode::Lat } else { Mode::Bw };
    let size = be32(&pdata[4..]) as usize;
    let iters = be64(&pdata[8..]);
    let depth = be32(&pdata[16..]);
    let peer = RemoteBuf {
        addr: be64(&pdata[20..]),
        rkey: be32(&pdata[28..]),
        len: size as u32,
    };
    let ctx = req.context().clone();
    let pd = ProtectionDomain::new(&ctx)?;
    let cq = make_cq(&ctx)?;
    let buf = buffer(
        &pd,
        size,
        Access::default().remote_write(),
        o.mmap.as_deref(),
    )?;
    let reply = encode_req(mode, size as u32, iters, depth, buf.remote());
    let init = QpInit::new(&pd, &cq).caps(caps(depth));
    let conn = req.accept(
        &init,
        &ConnParams {
            private_data: reply,
            timeout: T,
            ack_timeout: Some(o.qp_timeout),
            ..Default::default()
        },
    )?;
    match mode {
        Mode::Bw => {
            // the client writes; we wait for it to disconnect
            conn.wait_event(CmEventKind::Disconnected, Duration::from_secs(3600))?;
        }
        Mode::Lat => {
            let src = MemoryRegion::alloc(&pd, size, Access::default())?;
            let lat = pingpong(&conn, &cq, &src, &buf, peer, iters, false)?;
            drop(lat);
            let _ = conn.disconnect(Duration::from_secs(5));
        }
    }
    Ok(())
}

/// ib_write_lat: the client writes iteration n (in the last byte) into the peer's buffer; the
/// peer spins on its memory until it sees n and writes back. Returns the per-iteration
/// round-trip times (client side).
fn pingpong(
    conn: &Connection,
    cq: &CompletionQueue,
    src: &MemoryRegion,
    dst: &MemoryRegion,
    peer: RemoteBuf,
    iters: u64,
    client: bool,
) -> Result<Vec<Duration>> {
    let size = src.len();
    let inline = size <= conn.caps().max_inline_data as usize;
    let mut rtts = Vec::with_capacity(iters as usize);
    let mut outstanding = 0u32;
    let signal_every = 16u64;
    let mut comps = [EMPTY_COMPLETION; 16];
    // Built once: a ping changes only the id, the signalled flag and the last byte, so the
    // loop allocates nothing (TCG multiplies every avoidable instruction).
    let mut req = if inline {
        SendRequest::write(0, vec![], peer).with_inline(&vec![0u8; size])
    } else {
        SendRequest::write(0, vec![src.sge_all()], peer)
    };
    let mut post = |n: u64, outstanding: &mut u32| -> Result<()> {
        let value = [(n % 251) as u8 + 1];
        // the last write is signalled so the loop below waits for it before disconnecting
        let signaled = n % signal_every == signal_every - 1 || n + 1 == iters;
        match req.inline.as_mut() {
            Some(data) => data[size - 1] = value[0],
            None => src.write_at(size - 1, &value)?,
        }
        req.wr_id = n;
        req.signaled = signaled;
        conn.post_send(std::slice::from_ref(&req))?;
        if signaled {
            *outstanding += 1;
        }
        Ok(())
    };
    let wait_value = |n: u64| -> Result<()> {
        let want = (n % 251) as u8 + 1;
        let start = Instant::now();
        let mut spins = 0u32;
        while dst.read_volatile(size - 1)? != want {
            // PAUSE between reads, like the library's own spin-waits (CompletionQueue::
            // poll_blocking explains why); ib_write_lat spins without it
            std::hint::spin_loop();
            spins += 1;
            if spins % 100_000 == 0 {
                conn.check()?;
                if start.elapsed() > T {
                    return Err(Error::Timeout {
                        op: "wait for peer write",
                        after: T,
                    });
                }
            }
        }
        Ok(())
    };
    // Like ib_write_lat: one time stamp per ping, taken just before posting it; a round trip
    // is the gap between consecutive stamps (the last one closes when the last pong lands).
    let mut stamps: Vec<u64> = Vec::with_capacity(iters as usize + 1);
    let wall = Instant::now();
    for n in 0..iters {
        if client {
            stamps.push(ticks());
            post(n, &mut outstanding)?;
            wait_value(n)?;
        } else {
            wait_value(n)?;
            post(n, &mut outstanding)?;
        }
        // reap send completions without blocking the ping-pong
        if outstanding > 0 {
            let k = cq.poll(&mut comps)?;
            for c in &comps[..k] {
                c.ok()?;
            }
            outstanding -= k as u32;
        }
    }
    if client {
        stamps.push(ticks());
        // ticks -> time, with the rate measured over this run
        let (first, last) = (stamps[0], stamps[stamps.len() - 1]);
        let ns_per_tick = wall.elapsed().as_nanos() as f64 / (last - first).max(1) as f64;
        rtts.extend(
            stamps
                .windows(2)
                .map(|w| Duration::from_nanos(((w[1] - w[0]) as f64 * ns_per_tick) as u64)),
        );
    }
    while outstanding > 0 {
        let k = conn.wait_completions(cq, &mut comps, T)?;
        for c in &comps[..k] {
            c.ok()?;
        }
        outstanding -= k as u32;
    }
    Ok(rtts)
}

/// A time stamp in CPU ticks: the time-stamp counter on x86-64 (one instruction, like
/// perftest's get_cycles, and no system call whatever the kernel's clocksource), else
/// nanoseconds from a monotonic clock.
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC exists on every x86-64 CPU and has no side effects.
        #[allow(unused_unsafe)]
        unsafe {
            std::arch::x86_64::_rdtsc()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

fn connect(
    o: &Opts,
    server: IpAddr,
) -> Result<(
    Connection,
    ProtectionDomain,
    CompletionQueue,
    MemoryRegion,
    RemoteBuf,
)> {
    let c = Connector::resolve(o.source, SocketAddr::new(server, o.port), T)?;
    let ctx = c.context().clone();
    if let Some(want) = &o.ib_dev {
        if ctx.name() != want.as_str() {
            return Err(Error::InvalidArgument {
                op: "rdma_bw client",
                reason: format!(
                    "{server} is reached through {}, not {want} (rdma_cm picks the device by address: use --source_ip)",
                    ctx.name()
                ),
            });
        }
    }
    let pd = ProtectionDomain::new(&ctx)?;
    let cq = make_cq(&ctx)?;
    let access = if o.mode == Mode::Lat {
        Access::default().remote_write()
    } else {
        Access::default()
    };
    let buf = buffer(&pd, o.size, access, o.mmap.as_deref())?;
    let pdata = encode_req(o.mode, o.size as u32, o.iters, o.tx_depth, buf.remote());
    let init = QpInit::new(&pd, &cq).caps(caps(o.tx_depth));
    let conn = c.connect(
        &init,
        &ConnParams {
            private_data: pdata,
            timeout: T,
            ack_timeout: Some(o.qp_timeout),
            ..Default::default()
        },
    )?;
    let r = conn.peer_private_data();
    if r.len() < 32 {
        return Err(Error::InvalidArgument {
            op: "rdma_bw client",
            reason: "server sent no buffer".into(),
        });
    }
    let remote = RemoteBuf {
        addr: be64(&r[20..]),
        rkey: be32(&r[28..]),
        len: o.size as u32,
    };
    Ok((conn, pd, cq, buf, remote))
}

fn run_bw(o: &Opts, server: IpAddr) -> Result<()> {
    let (conn, _pd, cq, src, remote) = connect(o, server)?;
    let depth = conn.caps().max_send_wr.min(o.tx_depth) as u64;
    let cq_mod = u64::from(o.cq_mod).clamp(1, depth);
    let post_list = o.post_list.min(depth as u32);
    let unit = if o.gbits { "Gb/sec" } else { "MB/sec" };
    println!(
        "---------------------------------------------------------------------------------------"
    );
    println!("                    RDMA_Write BW Test (peerpipe-rdma)");
    println!(
        " Device: {}  TX depth: {depth}  CQ moderation: {cq_mod}  Post list: {post_list}",
        conn.context().name(),
    );
    println!(
        "---------------------------------------------------------------------------------------"
    );
    println!(" #bytes     #iterations    BW peak[{unit}]    BW average[{unit}]   MsgRate[Mpps]");
    let sizes: Vec<usize> = if o.all_sizes {
        ALL_SIZES.map(|k| 1usize << k).collect()
    } else {
        vec![o.size]
    };
    for size in sizes {
        let remote = RemoteBuf {
            len: size as u32,
            ..remote
        };
        let r = measure(o, &conn, &cq, &src, remote, depth, cq_mod, post_list)?;
        // MiB/s like perftest's MB/sec column, or Gb/s with --report_gbits.
        let scale = |bytes_per_s: f64| {
            if o.gbits {
                bytes_per_s * 8.0 / 1e9
            } else {
                bytes_per_s / 1048576.0
            }
        };
        let secs = r.elapsed.as_secs_f64();
        println!(
            " {:<10} {:<16} {:<18.2} {:<20.2} {:.6}",
            size,
            r.iters,
            scale(r.peak_bytes_per_s),
            scale(r.iters as f64 * size as f64 / secs),
            r.iters as f64 / secs / 1e6
        );
    }
    println!(
        "---------------------------------------------------------------------------------------"
    );
    conn.disconnect(Duration::from_secs(5))?;
    Ok(())
}

/// One size's run.
struct BwRun {
    iters: u64,
    elapsed: Duration,
    /// Best rate between consecutive signalled completions (like perftest's peak).
    peak_bytes_per_s: f64,
}

/// RDMA WRITEs of `remote.len` bytes of `src` to `remote`, `o.iters` of them or for
/// `o.duration`.
#[allow(clippy::too_many_arguments)]
fn measure(
    o: &Opts,
    conn: &Connection,
    cq: &CompletionQueue,
    src: &MemoryRegion,
    remote: RemoteBuf,
    depth: u64,
    cq_mod: u64,
    post_list: u32,
) -> Result<BwRun> {
    let size = f64::from(remote.len);
    // With -D the count is open until the time is up, then rounded up to a signalled WR.
    let mut iters = if o.duration.is_some() {
        u64::MAX
    } else {
        o.iters
    };
    let (mut posted, mut completed) = (0u64, 0u64);
    let mut comps = [EMPTY_COMPLETION; 32];
    let mut done_at: Vec<(u64, Instant)> = Vec::new();
    let start = Instant::now();
    // Built once and rewritten in place (id, signalled flag) for every post.
    let mut batch: Vec<SendRequest> = (0..post_list)
        .map(|_| {
            Ok(SendRequest::write(
                0,
                vec![src.sge(0, remote.len as usize)?],
                remote,
            ))
        })
        .collect::<Result<_>>()?;
    while completed < iters {
        if iters == u64::MAX && o.duration.is_some_and(|d| start.elapsed() >= d) {
            iters = posted.div_ceil(cq_mod).max(1) * cq_mod;
        }
        if posted < iters && posted - completed < depth {
            let mut k = 0;
            while posted < iters && posted - completed < depth && k < batch.len() {
                batch[k].wr_id = posted;
                batch[k].signaled = (posted + 1) % cq_mod == 0 || posted + 1 == iters;
                posted += 1;
                k += 1;
            }
            conn.post_send(&batch[..k])?;
        }
        let k = cq.poll(&mut comps)?;
        if k == 0 && posted - completed >= depth {
            // queue full: wait for the device (with a bound and peer-loss detection)
            let k = conn.wait_completions(cq, &mut comps, T)?;
            completed = reap(&comps[..k], completed, &mut done_at)?;
            continue;
        }
        completed = reap(&comps[..k], completed, &mut done_at)?;
    }
    let elapsed = start.elapsed();
    let mut peak = iters as f64 * size / elapsed.as_secs_f64();
    let mut prev = (0u64, start);
    for &(n, t) in &done_at {
        let dt = t.duration_since(prev.1).as_secs_f64();
        if dt > 0.0 && n > prev.0 + cq_mod / 2 {
            peak = peak.max((n - prev.0) as f64 * size / dt);
        }
        prev = (n, t);
    }
    Ok(BwRun {
        iters,
        elapsed,
        peak_bytes_per_s: peak,
    })
}

fn reap(
    comps: &[Completion],
    mut completed: u64,
    done_at: &mut Vec<(u64, Instant)>,
) -> Result<u64> {
    for c in comps {
        c.ok()?;
        completed = c.wr_id + 1; // signalled WR n completes everything up to n
        done_at.push((completed, Instant::now()));
    }
    Ok(completed)
}

fn run_lat(o: &Opts, server: IpAddr) -> Result<()> {
    let (conn, pd, cq, buf, remote) = connect(o, server)?;
    let src = MemoryRegion::alloc(&pd, o.size, Access::default())?;
    let rtts = pingpong(&conn, &cq, &src, &buf, remote, o.iters, true)?;
    // one-way latency = RTT / 2, as ib_write_lat reports
    let mut us: Vec<f64> = rtts.iter().map(|d| d.as_secs_f64() * 1e6 / 2.0).collect();
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = us.len();
    let avg = us.iter().sum::<f64>() / n as f64;
    let var = us.iter().map(|x| (x - avg) * (x - avg)).sum::<f64>() / n as f64;
    let pct = |p: f64| us[((n as f64 * p) as usize).min(n - 1)];
    println!(
        "---------------------------------------------------------------------------------------"
    );
    println!("                    RDMA_Write Latency Test (peerpipe-rdma)");
    println!(" Device: {}", conn.context().name());
    println!(
        "---------------------------------------------------------------------------------------"
    );
    println!(" #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]");
    println!(
        " {:<6} {:<14} {:<14.2} {:<12.2} {:<18.2} {:<14.2} {:<15.2} {:<22.2} {:.2}",
        o.size,
        n,
        us[0],
        us[n - 1],
        us[n / 2],
        avg,
        var.sqrt(),
        pct(0.99),
        pct(0.999)
    );
    println!(
        "---------------------------------------------------------------------------------------"
    );
    let _ = conn.wait_event(CmEventKind::Disconnected, Duration::from_secs(5));
    Ok(())
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let o = parse();
    let r = match (o.server, o.mode) {
        (None, _) => run_server(&o),
        (Some(s), Mode::Bw) => run_bw(&o, s),
        (Some(s), Mode::Lat) => run_lat(&o, s),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdma_bw failed: {e}");
            ExitCode::FAILURE
        }
    }
}
