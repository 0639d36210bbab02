//! Replicates a byte range of a drive (or file) from a primary to N replicas over RDMA,
//! zero-copy: source NVMe -> buffer (p2pmem or host) -> RDMA WRITE -> replica buffer -> drive.
//!
//! ```text
//! replicator replica --listen 10.77.0.2:7471 --target /dev/nvme2n1 [--buffers p2p|host] [--copy bounce]
//! replicator primary --source /dev/nvme1n1 --replica 10.77.0.2:7471 [--replica ...]
//!            [--bind 10.77.0.1] [--offset B] [--len B] [--block-size B] [--window N]
//!            [--buffers p2p|host] [--copy bounce] [--verify] [--json]
//! ```
//! Exit codes: 0 success; 1 failure (unreplicated ranges or verify mismatches are printed);
//! 2 usage or setup error; 3 (replica) the primary went away before `fin`.
//!
//! The protocol and the engine's rules live in `peerpipe::protocol` and `peerpipe::pipeline`;
//! this file only carries out their actions with io_uring and RDMA verbs.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use peerpipe::p2p_alloc::{self as alloc, Placement, Pool};
use peerpipe::pipeline::{
    crc32c, CopyMeter, Layout, PrimaryAction, PrimaryCore, ReplicaAction, ReplicaCore,
};
use peerpipe::protocol::{Message, Status, MSG_LEN};
use peerpipe::rdma::{
    self, Access, CompletionQueue, ConnParams, Connection, Connector, Listener, MemoryKind,
    MemoryRegion, MemoryWindow, ProtectionDomain, QpCaps, QpInit, RecvRequest, SendOp, SendRequest,
    Sge, WcOpcode, WcStatus, WindowAccess,
};
use peerpipe::uring::{FileOptions, FileTarget, IoBuf, Ring, TargetId};

type Res<T> = Result<T, String>;

// ---------------------------------------------------------------- options

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Buffers {
    P2p,
    Host,
}

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
    buffers: Buffers,
    bounce: bool,
    verify: bool,
    json: bool,
    timeout: Duration,
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
        buffers: Buffers::P2p,
        bounce: false,
        verify: false,
        json: false,
        timeout: Duration::from_secs(20),
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
            "--buffers" => {
                o.buffers = match val()?.as_str() {
                    "p2p" => Buffers::P2p,
                    "host" => Buffers::Host,
                    v => return Err(format!("--buffers {v}: use p2p or host")),
                }
            }
            "--copy" => match val()?.as_str() {
                "bounce" => o.bounce = true,
                "none" => o.bounce = false,
                v => return Err(format!("--copy {v}: use bounce or none")),
            },
            "--timeout" => {
                o.timeout =
                    Duration::from_secs(val()?.parse().map_err(|e| format!("--timeout: {e}"))?)
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
    if o.window == 0 || o.window > 1024 {
        return Err("--window must be 1..=1024".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------- buffers (p2p-alloc adapter)

/// `n` block buffers from a p2p-alloc pool, plus what they are and why.
struct Slots {
    _pool: Pool,
    bufs: Vec<alloc::Buffer>,
    kind: &'static str,
    reason: String,
}

fn alloc_slots(want: Buffers, n: usize, block: usize) -> Res<Slots> {
    let chunk = (block.next_power_of_two()).max(4 << 20);
    let (pool, kind, reason) = match want {
        Buffers::Host => (
            Pool::builder(Placement::HostOnly)
                .chunk_size(chunk)
                .build()
                .map_err(|e| format!("host pool: {e}"))?,
            "host",
            "--buffers host".to_string(),
        ),
        Buffers::P2p => {
            let providers = alloc::discover(&alloc::SysRoot::live())
                .map_err(|e| format!("p2pmem discovery: {e}"))?;
            // ibv_reg_mr works on the char device interface only (see the capability matrix).
            let p = providers
                .into_iter()
                .find(|p| p.chardev.is_some())
                .ok_or("--buffers p2p: no p2pmem provider with a /dev/p2pmemN char device; use --buffers host")?;
            let reason = format!("p2pmem of {} via {:?}", p.pci, p.chardev);
            (
                Pool::builder(Placement::P2pRequired)
                    .provider(p)
                    .interface(alloc::Interface::CharDev)
                    .chunk_size(chunk)
                    .build()
                    .map_err(|e| format!("p2pmem pool: {e}"))?,
                "p2p",
                reason,
            )
        }
    };
    let mut bufs = Vec::with_capacity(n);
    for _ in 0..n {
        bufs.push(
            pool.alloc(block)
                .map_err(|e| format!("allocating {n} x {block} B {kind} buffers: {e}"))?,
        );
    }
    Ok(Slots {
        _pool: pool,
        bufs,
        kind,
        reason,
    })
}

/// Registers every chunk of the pool once; returns chunk id -> region.
fn register_chunks(
    pd: &ProtectionDomain,
    slots: &Slots,
    access: Access,
) -> Res<HashMap<u32, MemoryRegion>> {
    let mut out = HashMap::new();
    for c in slots._pool.chunks() {
        let kind = if slots.kind == "p2p" {
            MemoryKind::Peer
        } else {
            MemoryKind::Host
        };
        // SAFETY: the chunk stays mapped while the pool (held by `Slots`) lives, and every
        // region is dropped before the slots (declaration order in the callers).
        let mr = unsafe { MemoryRegion::register_raw(pd, c.addr as *mut u8, c.len, access, kind) }
            .map_err(|e| format!("registering {} chunk {}: {e}", slots.kind, c.id))?;
        out.insert(c.id, mr);
    }
    Ok(out)
}

/// A slot's memory handed to io_uring for one operation.
struct RawBuf {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the pointer names a pool buffer (or a bounce buffer) that outlives the ring's use of
// it: callers keep the `Slots`/bounce vectors alive until every operation completed, and never
// give the same slot to two operations at once (the engine's slot bookkeeping).
unsafe impl IoBuf for RawBuf {
    fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

fn slot_ptr(s: &Slots, i: usize) -> *mut u8 {
    s.bufs[i].addr()
}

/// Reads `len` bytes of a buffer that no device is writing right now (for checksums).
fn slot_bytes(ptr: *mut u8, len: usize) -> &'static [u8] {
    // SAFETY: callers pass a slot whose I/O completed and which nothing writes until it is
    // reused; the returned slice is used immediately and not kept.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

// ---------------------------------------------------------------- drive (uring adapter)

struct Drive {
    _file: FileTarget,
    ring: Ring<RawBuf>,
    t: TargetId,
    capacity: u64,
    lba: u32,
}

fn open_drive(path: &str, write: bool) -> Res<Drive> {
    let file = FileTarget::open(
        path,
        FileOptions {
            write,
            create: false,
            direct: true,
        },
    )
    .map_err(|e| format!("opening {path}: {e}"))?;
    let mut ring: Ring<RawBuf> = Ring::new().map_err(|e| format!("io_uring: {e}"))?;
    let t = ring
        .add_file(&file)
        .map_err(|e| format!("io_uring add {path}: {e}"))?;
    let capacity = file.size();
    let lba = file.offset_align().max(512);
    Ok(Drive {
        _file: file,
        ring,
        t,
        capacity,
        lba,
    })
}

// ---------------------------------------------------------------- rdma adapter

const RECV_DEPTH: usize = 256;
const WR_RECV: u64 = 1 << 60;
const WR_SEND: u64 = 2 << 60;
const WR_WRITE: u64 = 3 << 60;
const WR_INV: u64 = 4 << 60;
const WR_BIND: u64 = 5 << 60;
const WR_MASK: u64 = 0xf << 60;

fn caps() -> QpCaps {
    QpCaps {
        max_send_wr: 1024,
        max_recv_wr: RECV_DEPTH as u32,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: MSG_LEN as u32,
    }
}

fn params(timeout: Duration) -> ConnParams {
    ConnParams {
        // 7 = retry forever on receiver-not-ready: a peer busy writing is not an error.
        rnr_retry_count: 7,
        retry_count: 7,
        timeout,
        ..Default::default()
    }
}

struct Link {
    conn: Connection,
    cq: CompletionQueue,
    recv: MemoryRegion,
    alive: bool,
}

fn recv_mr(pd: &ProtectionDomain) -> Res<MemoryRegion> {
    MemoryRegion::alloc(pd, RECV_DEPTH * MSG_LEN, Access::local_read().local_write())
        .map_err(|e| format!("receive buffers: {e}"))
}

fn recv_wr(mr: &MemoryRegion, i: usize) -> rdma::Result<RecvRequest> {
    Ok(RecvRequest::new(
        WR_RECV | i as u64,
        vec![mr.sge(i * MSG_LEN, MSG_LEN)?],
    ))
}

fn post_all_recvs(qp: &rdma::QueuePair, mr: &MemoryRegion) -> rdma::Result<()> {
    let wrs = (0..RECV_DEPTH)
        .map(|i| recv_wr(mr, i))
        .collect::<rdma::Result<Vec<_>>>()?;
    qp.post_recv(&wrs)
}

fn send_msg(link: &Link, m: &Message) -> Res<()> {
    link.conn
        .post_send(&[SendRequest::send_inline(WR_SEND, &m.encode())])
        .map_err(|e| format!("posting {}: {e}", m.name()))
}

/// A received control message: copies the 64 bytes out and re-posts the receive.
fn take_recv(link: &Link, wr_id: u64) -> Res<[u8; MSG_LEN]> {
    let i = (wr_id & !WR_MASK) as usize;
    let mut b = [0u8; MSG_LEN];
    link.recv
        .read_at(i * MSG_LEN, &mut b)
        .map_err(|e| format!("reading a receive: {e}"))?;
    let wr = recv_wr(&link.recv, i).map_err(|e| e.to_string())?;
    link.conn
        .post_recv(&[wr])
        .map_err(|e| format!("re-posting a receive: {e}"))?;
    Ok(b)
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Idle backoff for the polling loops: spin briefly, then sleep a little (the testbed has
/// two CPUs shared by the primary and its replicas).
struct Idle(u32);
impl Idle {
    fn busy(&mut self) {
        self.0 = 0;
    }
    fn idle(&mut self) {
        self.0 += 1;
        // Under emulation the kernel's rxe threads need the CPU more than we do: back off
        // after a few empty polls (the completion-channel wait is future work).
        if self.0 > 8 {
            std::thread::sleep(Duration::from_micros(200));
        } else {
            std::thread::yield_now();
        }
    }
}

// ---------------------------------------------------------------- primary

// Replica indices address several parallel vectors (links, mrs, the core).
#[allow(clippy::needless_range_loop)]
fn run_primary(o: &Opts) -> Res<bool> {
    let mut drive = open_drive(&o.path, false)?;
    let len = o.len.unwrap_or(drive.capacity.saturating_sub(o.offset));
    let layout = Layout::new(o.offset, len, o.block_size, drive.lba, drive.capacity)
        .map_err(|e| format!("range: {e}"))?;
    let n = o.replicas.len();
    let window = o.window.min(layout.blocks().min(1024) as u32).max(1);
    let slots = alloc_slots(o.buffers, window as usize, layout.block_size() as usize)?;
    let meter = CopyMeter::new();
    // Bounce mode: reads land in plain host memory and are copied into the registered slot.
    let mut bounce: Vec<Vec<u8>> = if o.bounce {
        (0..window)
            .map(|_| vec![0u8; layout.block_size() as usize + 4096])
            .collect()
    } else {
        Vec::new()
    };
    eprintln!(
        "primary: {} bytes at {} in {} blocks of {} to {n} replica(s), window {window}, buffers {} ({}){}",
        layout.len(),
        layout.offset(),
        layout.blocks(),
        layout.block_size(),
        slots.kind,
        slots.reason,
        if o.bounce { ", copy bounce" } else { ", zero-copy" }
    );

    let mut links = Vec::new();
    let mut mrs = Vec::new();
    for (r, dst) in o.replicas.iter().enumerate() {
        // A replica that is still starting rejects the connection: retry until the timeout.
        let give_up = Instant::now() + o.timeout;
        let (conn, cq, recv, regs) = loop {
            let attempt = (|| -> Res<_> {
                let c = Connector::resolve(o.bind, *dst, o.timeout)
                    .map_err(|e| format!("replica {r} ({dst}): resolve: {e}"))?;
                let pd = ProtectionDomain::new(c.context()).map_err(|e| e.to_string())?;
                let cq = CompletionQueue::new(c.context(), 2048).map_err(|e| e.to_string())?;
                // Our buffers are only read by our own NIC: no remote access at all.
                let regs = register_chunks(&pd, &slots, Access::local_read().local_write())?;
                let recv = recv_mr(&pd)?;
                let init = QpInit::new(&pd, &cq).caps(caps());
                let conn = c
                    .connect_with(&init, &params(o.timeout), |qp| post_all_recvs(qp, &recv))
                    .map_err(|e| format!("replica {r} ({dst}): connect: {e}"))?;
                Ok((conn, cq, recv, regs))
            })();
            match attempt {
                Ok(v) => break v,
                Err(e) if e.contains("rejected") && Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        };
        mrs.push(regs);
        links.push(Link {
            conn,
            cq,
            recv,
            alive: true,
        });
    }

    let mut core = PrimaryCore::new(layout, n, window, o.verify).map_err(|e| e.to_string())?;
    let mut free: Vec<usize> = (0..window as usize).rev().collect();
    let mut slot_of: HashMap<u64, usize> = HashMap::new();
    let mut actions: VecDeque<PrimaryAction> = VecDeque::new();
    let mut out = Vec::new();
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    core.start(&mut out);
    actions.extend(out.drain(..));
    let mut done = Vec::new();
    let mut wcs = vec![rdma::EMPTY_COMPLETION; 64];
    let mut last_progress = Instant::now();
    let mut idle = Idle(0);
    let mut last_print = Instant::now();
    let progress = layout.len() >= (64 << 20) && !o.json;

    while !core.is_finished() {
        let mut busy = false;
        while let Some(a) = actions.pop_front() {
            busy = true;
            match a {
                PrimaryAction::Send { replica, msg } => {
                    if links[replica].alive {
                        if let Err(e) = send_msg(&links[replica], &msg) {
                            core.on_replica_lost(replica, e, &mut out);
                        }
                    }
                }
                PrimaryAction::Read { seq, offset, len } => {
                    let s = free
                        .pop()
                        .ok_or("internal: no free slot within the window")?;
                    slot_of.insert(seq, s);
                    let ptr = if o.bounce {
                        bounce[s]
                            .as_mut_ptr()
                            .wrapping_add(bounce[s].as_ptr().align_offset(4096))
                    } else {
                        slot_ptr(&slots, s)
                    };
                    let buf = RawBuf {
                        ptr,
                        len: len as usize,
                    };
                    if let Err(rej) = drive.ring.read(drive.t, offset, buf, seq) {
                        core.on_read_done(seq, Err(rej.to_string()), &mut out);
                    }
                }
                PrimaryAction::Write {
                    replica,
                    seq,
                    remote,
                } => {
                    let s = slot_of[&seq];
                    let b = &slots.bufs[s];
                    let mr = &mrs[replica][&b.chunk_id()];
                    let post =
                        mr.sge(b.offset_in_chunk(), remote.len as usize)
                            .and_then(|sge: Sge| {
                                links[replica].conn.post_send(&[SendRequest::new(
                                    WR_WRITE | seq,
                                    SendOp::Write(rdma::RemoteBuf {
                                        addr: remote.addr,
                                        len: remote.len,
                                        rkey: remote.rkey,
                                    }),
                                    vec![sge],
                                )])
                            });
                    if let Err(e) = post {
                        core.on_write_done(replica, seq, Err(e.to_string()), &mut out);
                    }
                }
                PrimaryAction::Release { seq } => {
                    if let Some(s) = slot_of.remove(&seq) {
                        free.push(s);
                    }
                }
                PrimaryAction::Disconnect { replica } => {
                    if links[replica].alive {
                        links[replica].alive = false;
                        let _ = links[replica].conn.disconnect(Duration::from_millis(500));
                    }
                }
            }
            actions.extend(out.drain(..));
        }
        // Source reads.
        done.clear();
        drive
            .ring
            .reap(&mut done)
            .map_err(|e| format!("io_uring: {e}"))?;
        for c in done.drain(..) {
            busy = true;
            let seq = c.tag;
            let res = match c.result {
                Ok(got) if got as u64 == layout.block(seq).map_or(0, |b| u64::from(b.len)) => {
                    let s = slot_of[&seq];
                    let l = got;
                    if o.bounce {
                        let src = &bounce[s][bounce[s].as_ptr().align_offset(4096)..][..l];
                        // SAFETY: slot `s` belongs to this block only and no DMA targets it now.
                        let dst = unsafe { std::slice::from_raw_parts_mut(slot_ptr(&slots, s), l) };
                        meter.copy(dst, src);
                    }
                    Ok(if o.verify {
                        crc32c(slot_bytes(slot_ptr(&slots, s), l))
                    } else {
                        0
                    })
                }
                Ok(got) => Err(format!("short read: {got} bytes")),
                Err(e) => Err(e.to_string()),
            };
            core.on_read_done(seq, res, &mut out);
        }
        actions.extend(out.drain(..));
        // RDMA completions and connection events.
        for r in 0..n {
            if !links[r].alive {
                continue;
            }
            let got = links[r].cq.poll(&mut wcs).map_err(|e| e.to_string())?;
            for wc in &wcs[..got] {
                busy = true;
                if wc.status != WcStatus::Success {
                    let why = format!(
                        "{:?} completion failed: {:?} (the replica died or the link is down)",
                        wc.opcode, wc.status
                    );
                    if wc.wr_id & WR_MASK == WR_WRITE {
                        core.on_write_done(r, wc.wr_id & !WR_MASK, Err(why), &mut out);
                    } else {
                        core.on_replica_lost(r, why, &mut out);
                    }
                    continue;
                }
                match wc.wr_id & WR_MASK {
                    WR_WRITE => core.on_write_done(r, wc.wr_id & !WR_MASK, Ok(()), &mut out),
                    WR_RECV if wc.opcode == WcOpcode::Recv => {
                        match take_recv(&links[r], wc.wr_id) {
                            Ok(b) => core.on_message(
                                r,
                                &b[..wc.byte_len.min(MSG_LEN as u32) as usize],
                                &mut out,
                            ),
                            Err(e) => core.on_replica_lost(r, e, &mut out),
                        }
                    }
                    _ => {}
                }
            }
            if links[r].alive {
                if let Err(e) = links[r].conn.check() {
                    core.on_replica_lost(r, format!("connection: {e}"), &mut out);
                }
            }
        }
        actions.extend(out.drain(..));
        if busy {
            last_progress = Instant::now();
            idle.busy();
        } else {
            if last_progress.elapsed() > o.timeout {
                for r in 0..n {
                    core.on_replica_lost(
                        r,
                        format!("no progress for {:?}: replica or link stalled", o.timeout),
                        &mut out,
                    );
                }
                actions.extend(out.drain(..));
                if actions.is_empty() && !core.is_finished() {
                    break;
                }
            }
            idle.idle();
        }
        if progress && last_print.elapsed() > Duration::from_secs(1) {
            last_print = Instant::now();
            let (b, bytes) = core.ledger().replicated_blocks_bytes();
            eprint!(
                "\r{:5.1}% {b}/{} blocks {:.1} MB/s   ",
                100.0 * bytes as f64 / layout.len() as f64,
                layout.blocks(),
                bytes as f64 / t0.elapsed().as_secs_f64() / 1e6
            );
        }
    }
    // Drain reads still in flight before the buffers go away.
    while drive.ring.in_flight() > 0 {
        done.clear();
        let _ = drive.ring.wait(1, &mut done);
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    let oc = core.outcome();
    let p = core.latency().percentiles();
    let secs = elapsed.as_secs_f64();
    let ranges = |v: &[peerpipe::pipeline::ByteRange]| {
        v.iter()
            .map(|r| format!("[{},{}]", r.start, r.end))
            .collect::<Vec<_>>()
            .join(",")
    };
    if progress {
        eprintln!();
    }
    if o.json {
        let errs = oc
            .replica_errors
            .iter()
            .map(|e| match e {
                Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
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
            "{{\"success\":{},\"replicas\":{n},\"buffers\":\"{}\",\"copy\":\"{}\",\"block_size\":{},\"window\":{window},\"bytes\":{},\"blocks\":{},\"replicated_bytes\":{},\"seconds\":{secs:.6},\"mb_per_s\":{:.3},\"iops\":{:.1},\"latency_us\":{{\"p50\":{:.1},\"p99\":{:.1},\"p999\":{:.1},\"max\":{:.1}}},\"cpu_seconds\":{:.6},\"payload_bytes_copied\":{},\"verified_blocks\":{},\"unreplicated\":[{}],\"mismatches\":[{mism}],\"replica_errors\":[{errs}]}}",
            oc.success,
            slots.kind,
            if o.bounce { "bounce" } else { "none" },
            layout.block_size(),
            layout.len(),
            layout.blocks(),
            oc.replicated_bytes,
            oc.replicated_bytes as f64 / secs / 1e6,
            oc.replicated_blocks as f64 / secs,
            p.p50_us,
            p.p99_us,
            p.p999_us,
            p.max_us,
            cpu.as_secs_f64(),
            meter.bytes(),
            oc.verified_blocks,
            ranges(&oc.unreplicated),
        );
    } else {
        println!(
            "{} {} bytes to {n} replica(s) in {secs:.3} s: {:.2} MB/s, {:.0} IOPS, latency p50 {:.0} us p99 {:.0} us p999 {:.0} us, CPU {:.3} s, payload bytes copied by the CPU: {}",
            if oc.success { "replicated" } else { "FAILED:" },
            oc.replicated_bytes,
            oc.replicated_bytes as f64 / secs / 1e6,
            oc.replicated_blocks as f64 / secs,
            p.p50_us,
            p.p99_us,
            p.p999_us,
            cpu.as_secs_f64(),
            meter.bytes()
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
    drop(links);
    drop(mrs);
    Ok(oc.success)
}

// ---------------------------------------------------------------- replica

enum Io {
    Write { seq: u64 },
    Flush,
    ReadBack { seq: u64, len: u32, buf: Vec<u8> },
}

fn run_replica(o: &Opts) -> Res<u8> {
    let listen = o.listen.ok_or("--listen is required")?;
    let mut drive = open_drive(&o.path, true)?;
    let listener = Listener::bind(listen, 4).map_err(|e| format!("listen {listen}: {e}"))?;
    eprintln!(
        "replica: listening on {listen}, target {} ({} bytes)",
        o.path, drive.capacity
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let req = loop {
        match listener.get_request(Duration::from_secs(1)) {
            Ok(r) => break r,
            Err(rdma::Error::Timeout { .. }) if Instant::now() < deadline => continue,
            Err(e) => return Err(format!("waiting for the primary: {e}")),
        }
    };
    let slots_n = o.window as usize;
    // The block size is only known after hello; slots are sized for the largest allowed here.
    let block_max = o.block_size as usize;
    let slots = alloc_slots(o.buffers, slots_n, block_max)?;
    let pd = ProtectionDomain::new(req.context()).map_err(|e| e.to_string())?;
    let cq = CompletionQueue::new(req.context(), 2048).map_err(|e| e.to_string())?;
    // Local access plus window binding only: the region's own rkey grants nothing remotely.
    let mrs = register_chunks(&pd, &slots, Access::local_read().local_write().mw_bind())?;
    let mws = (0..slots_n)
        .map(|_| MemoryWindow::alloc(&pd))
        .collect::<rdma::Result<Vec<_>>>()
        .map_err(|e| format!("memory windows (needed for least-privilege access): {e}"))?;
    let recv = recv_mr(&pd)?;
    let init = QpInit::new(&pd, &cq).caps(caps());
    let conn = req
        .accept_with(&init, &params(o.timeout), |qp| post_all_recvs(qp, &recv))
        .map_err(|e| format!("accept: {e}"))?;
    let link = Link {
        conn,
        cq,
        recv,
        alive: true,
    };
    eprintln!(
        "replica: primary connected; buffers {} ({}){}",
        slots.kind,
        slots.reason,
        if o.bounce {
            ", copy bounce"
        } else {
            ", zero-copy"
        }
    );
    let meter = CopyMeter::new();
    let mut bounce: Vec<Vec<u8>> = if o.bounce {
        (0..slots_n).map(|_| vec![0u8; block_max + 4096]).collect()
    } else {
        Vec::new()
    };
    let mut core = ReplicaCore::new(drive.capacity, slots_n);
    let mut out = Vec::new();
    let mut actions: VecDeque<ReplicaAction> = VecDeque::new();
    let mut pending_write: HashMap<usize, (u64, u64, u32)> = HashMap::new();
    let mut ios: HashMap<u64, Io> = HashMap::new();
    let mut next_tag = 1u64;
    let mut unflushed: Vec<(u64, Status)> = Vec::new();
    let mut flushing: Option<Vec<(u64, Status)>> = None;
    let mut wcs = vec![rdma::EMPTY_COMPLETION; 64];
    let mut done = Vec::new();
    let mut idle = Idle(0);
    let mut exit = 0u8;
    let mut fin_sent_at: Option<Instant> = None;
    let mut last_progress = Instant::now();
    'run: loop {
        let mut busy = false;
        while let Some(a) = actions.pop_front() {
            busy = true;
            match a {
                ReplicaAction::Send(m) => {
                    send_msg(&link, &m)?;
                    if matches!(m, Message::Fin { .. }) {
                        fin_sent_at = Some(Instant::now());
                    }
                }
                ReplicaAction::Advertise { slot, seq, len } => {
                    if len as usize > block_max {
                        let m = Message::Abort {
                            status: Status::Refused(1),
                            seq,
                        };
                        let _ = send_msg(&link, &m);
                        return Err(format!(
                            "primary's block size exceeds this replica's --block-size {block_max}"
                        ));
                    }
                    let b = &slots.bufs[slot];
                    let mr = &mrs[&b.chunk_id()];
                    let bind = SendRequest::bind_window(
                        WR_BIND | slot as u64,
                        &mws[slot],
                        mr,
                        b.offset_in_chunk() as u64,
                        u64::from(len),
                        WindowAccess::none().remote_write(),
                    );
                    link.conn
                        .post_send(&[bind])
                        .map_err(|e| format!("binding a memory window: {e}"))?;
                    let m = Message::BufferReady {
                        seq,
                        addr: b.addr() as u64,
                        rkey: mws[slot].rkey(),
                        len,
                    };
                    send_msg(&link, &m)?;
                }
                ReplicaAction::Write {
                    slot,
                    seq,
                    offset,
                    len,
                } => {
                    // Revoke the window before the drive reads the buffer.
                    pending_write.insert(slot, (seq, offset, len));
                    link.conn
                        .post_send(&[SendRequest::new(
                            WR_INV | slot as u64,
                            SendOp::LocalInv(mws[slot].rkey()),
                            Vec::new(),
                        )])
                        .map_err(|e| format!("invalidating a memory window: {e}"))?;
                }
                ReplicaAction::ReadBack { seq, offset, len } => {
                    let mut buf = vec![0u8; len as usize + 4096];
                    let a = buf.as_ptr().align_offset(4096);
                    let raw = RawBuf {
                        ptr: buf.as_mut_ptr().wrapping_add(a),
                        len: len as usize,
                    };
                    let tag = next_tag;
                    next_tag += 1;
                    drive
                        .ring
                        .read(drive.t, offset, raw, tag)
                        .map_err(|e| format!("read-back: {e}"))?;
                    ios.insert(tag, Io::ReadBack { seq, len, buf });
                }
            }
            actions.extend(out.drain(..));
        }
        // RDMA completions.
        let got = link.cq.poll(&mut wcs).map_err(|e| e.to_string())?;
        for wc in &wcs[..got] {
            busy = true;
            if wc.status != WcStatus::Success {
                if core.is_finished() {
                    break 'run;
                }
                eprintln!(
                    "replica: {:?} completion failed ({:?}): the primary went away",
                    wc.opcode, wc.status
                );
                exit = 3;
                break 'run;
            }
            match wc.wr_id & WR_MASK {
                WR_RECV if wc.opcode == WcOpcode::Recv => {
                    let b = take_recv(&link, wc.wr_id)?;
                    let bytes = &b[..wc.byte_len.min(MSG_LEN as u32) as usize];
                    if let Err(e) = core.on_message(bytes, &mut out) {
                        if !matches!(e, peerpipe::protocol::ProtocolError::PeerAborted { .. }) {
                            let _ = send_msg(&link, &ReplicaCore::abort_for(&e));
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        let _ = link.conn.disconnect(Duration::from_millis(500));
                        return Err(format!("protocol error from the primary: {e}"));
                    }
                }
                WR_INV => {
                    let slot = (wc.wr_id & !WR_MASK) as usize;
                    let (seq, offset, len) = pending_write
                        .remove(&slot)
                        .ok_or("internal: invalidation without a write")?;
                    let mut ptr = slot_ptr(&slots, slot);
                    if o.bounce {
                        let a = bounce[slot].as_ptr().align_offset(4096);
                        let dst = &mut bounce[slot][a..a + len as usize];
                        meter.copy(dst, slot_bytes(ptr, len as usize));
                        ptr = dst.as_mut_ptr();
                    }
                    let tag = next_tag;
                    next_tag += 1;
                    drive
                        .ring
                        .write(
                            drive.t,
                            offset,
                            RawBuf {
                                ptr,
                                len: len as usize,
                            },
                            tag,
                        )
                        .map_err(|e| format!("drive write: {e}"))?;
                    ios.insert(tag, Io::Write { seq });
                }
                _ => {}
            }
        }
        actions.extend(out.drain(..));
        // Drive completions: writes are acked only after a flush that started after them.
        done.clear();
        drive
            .ring
            .reap(&mut done)
            .map_err(|e| format!("io_uring: {e}"))?;
        for c in done.drain(..) {
            busy = true;
            let status = match &c.result {
                Ok(_) => Status::Ok,
                Err(e) => Status::Errno(e.errno().unwrap_or(libc::EIO) as u16),
            };
            match ios.remove(&c.tag) {
                Some(Io::Write { seq }) => unflushed.push((seq, status)),
                Some(Io::Flush) => {
                    for (seq, st) in flushing.take().unwrap_or_default() {
                        let st = if st.is_ok() { status } else { st };
                        core.on_write_done(seq, st, &mut out)
                            .map_err(|e| e.to_string())?;
                    }
                }
                Some(Io::ReadBack { seq, len, buf }) => {
                    let a = buf.as_ptr().align_offset(4096);
                    let crc = crc32c(&buf[a..a + len as usize]);
                    core.on_readback_done(seq, len, crc, status, &mut out);
                }
                None => {}
            }
        }
        if flushing.is_none() && !unflushed.is_empty() {
            let tag = next_tag;
            next_tag += 1;
            drive
                .ring
                .fsync(drive.t, tag)
                .map_err(|e| format!("flush: {e}"))?;
            ios.insert(tag, Io::Flush);
            flushing = Some(std::mem::take(&mut unflushed));
        }
        actions.extend(out.drain(..));
        if let Err(e) = link.conn.check() {
            if !core.is_finished() {
                eprintln!("replica: connection ended before fin: {e}");
                exit = 3;
            }
            break;
        }
        if let Some(t) = fin_sent_at {
            // Give the fin time to leave, then hang up.
            if t.elapsed() > Duration::from_millis(200) || link.conn.is_disconnected() {
                break;
            }
        }
        if busy {
            idle.busy();
            last_progress = Instant::now();
        } else {
            if core.layout().is_none() && last_progress.elapsed() > o.timeout {
                return Err("no hello from the primary".into());
            }
            idle.idle();
        }
    }
    while drive.ring.in_flight() > 0 {
        done.clear();
        let _ = drive.ring.wait(1, &mut done);
    }
    let (blocks, bytes) = core.written();
    eprintln!(
        "replica: wrote {blocks} blocks ({bytes} bytes), {} failed, payload bytes copied by the CPU: {}",
        core.failed_blocks(),
        meter.bytes()
    );
    let _ = link.conn.disconnect(Duration::from_millis(500));
    drop(mws);
    drop(mrs);
    Ok(exit)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "replicator: {e}\n(see the doc comment at the top of examples/replicator.rs)"
            );
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
