//! The pipeline engine: carries out the [`PrimaryCore`](super::PrimaryCore) /
//! [`ReplicaCore`](super::ReplicaCore) state machines with real I/O.
//!
//! Each engine owns
//! - one io_uring ring for the drive ([`Backend`]: NVMe passthrough on `/dev/ngXnY`, or
//!   O_DIRECT on a block device / file),
//! - one RDMA connection per peer, whose completion queue sits on a completion channel polled
//!   in that same ring ([`WaitMode::Events`], the default) or is busy-polled
//!   ([`WaitMode::BusyPoll`]),
//! - a p2p-alloc pool of `window` block buffers (p2pmem or host memory: the same code path),
//!   whose chunks are registered once per connection as memory regions.
//!
//! The stages, the window, the completion ordering rules and the failure semantics are the
//! ones documented in [`crate::pipeline`]; the engines only execute the cores' actions.
//! Both run the same loop (`turn.rs`: actions, doorbells, RDMA completions, drive
//! completions, timers, wait); `primary.rs` and `replica.rs` hold each role's handlers.
//!
//! ```no_run
//! use peerpipe::pipeline::engine::{BufferChoice, PrimaryConfig, PrimaryEngine};
//! # fn main() -> Result<(), peerpipe::pipeline::engine::EngineError> {
//! let cfg = PrimaryConfig::new("/dev/ng1n1")
//!     .replica("10.77.0.2:7471".parse().unwrap())
//!     .bind(Some("10.77.0.1".parse().unwrap()))
//!     .len(Some(64 << 20))
//!     .buffers(BufferChoice::P2p)
//!     .verify(true);
//! let report = PrimaryEngine::new(cfg)?.run()?;
//! assert!(report.outcome.success);
//! # Ok(()) }
//! ```

mod auth;
mod drive;
mod error;
mod link;
mod pace;
mod primary;
mod replica;
mod slots;
mod turn;
mod wait;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use auth::{ReplicaAccess, Secret, MIN_SECRET_LEN};
pub use drive::{write_cache_from_sysfs, Backend, WriteCache};
pub use error::EngineError;
pub use primary::{PrimaryEngine, PrimaryReport};
pub use replica::{ReplicaEnd, ReplicaEngine, ReplicaReport};
pub use slots::BufferInfo;

/// Largest window (blocks in flight) an engine accepts.
pub const MAX_WINDOW: u32 = 1024;

/// How the engine loop waits when it has nothing to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WaitMode {
    /// Sleep in `io_uring_enter` until a drive completion, an RDMA completion (CQ completion
    /// channel polled in the ring) or a connection event arrives, after polling for up to
    /// [`PrimaryConfig::busy_poll`] (200 us by default). Costs no CPU while idle beyond that.
    #[default]
    Events,
    /// Poll the CQs and the ring in a loop (yield, then 200 us sleeps after a few empty
    /// rounds). Lowest latency on an idle machine, burns CPU.
    BusyPoll,
}

/// How long an events-mode loop polls before it sleeps, by default: [`PrimaryConfig::busy_poll`].
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);

impl fmt::Display for WaitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WaitMode::Events => "events",
            WaitMode::BusyPoll => "busy",
        })
    }
}

impl FromStr for WaitMode {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<WaitMode, EngineError> {
        match s {
            "events" => Ok(WaitMode::Events),
            "busy" => Ok(WaitMode::BusyPoll),
            v => Err(EngineError::config(
                "wait",
                format!("{v:?}: use events or busy"),
            )),
        }
    }
}

/// Where block buffers live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BufferChoice {
    /// p2pmem (an NVMe CMB via `/dev/p2pmemN`): DMA from the drive and the NIC, no host DRAM.
    #[default]
    P2p,
    /// Host memory.
    Host,
}

impl fmt::Display for BufferChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BufferChoice::P2p => "p2p",
            BufferChoice::Host => "host",
        })
    }
}

impl FromStr for BufferChoice {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<BufferChoice, EngineError> {
        match s {
            "p2p" => Ok(BufferChoice::P2p),
            "host" => Ok(BufferChoice::Host),
            v => Err(EngineError::config(
                "buffers",
                format!("{v}: use p2p or host"),
            )),
        }
    }
}

/// Whether the payload is copied by the CPU (for comparison only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopyMode {
    /// Zero-copy: only DMA touches the payload.
    #[default]
    None,
    /// The naive design: the drive's data goes through a host bounce buffer and is memcpy'd
    /// into / out of the registered buffer (counted by the [`super::CopyMeter`]).
    Bounce,
}

impl fmt::Display for CopyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyMode::None => "none",
            CopyMode::Bounce => "bounce",
        })
    }
}

impl FromStr for CopyMode {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<CopyMode, EngineError> {
        match s {
            "none" => Ok(CopyMode::None),
            "bounce" => Ok(CopyMode::Bounce),
            v => Err(EngineError::config(
                "copy",
                format!("{v}: use bounce or none"),
            )),
        }
    }
}

fn check_window(window: u32) -> Result<(), EngineError> {
    if window == 0 || window > MAX_WINDOW {
        return Err(EngineError::config(
            "window",
            format!("{window}: must be 1..={MAX_WINDOW}"),
        ));
    }
    Ok(())
}

fn check_timeout(t: Duration) -> Result<(), EngineError> {
    if t.is_zero() {
        return Err(EngineError::config("timeout", "must be at least 1 second"));
    }
    Ok(())
}

/// What a primary run replicates, where, and how.
#[derive(Clone, Debug)]
pub struct PrimaryConfig {
    source: PathBuf,
    replicas: Vec<SocketAddr>,
    bind: Option<IpAddr>,
    offset: u64,
    len: Option<u64>,
    block_size: u64,
    window: u32,
    buffers: BufferChoice,
    copy: CopyMode,
    verify: bool,
    timeout: Duration,
    wait: WaitMode,
    busy_poll: Duration,
    rate: Option<u64>,
    progress_every: Duration,
    secret: Option<Secret>,
}

impl PrimaryConfig {
    /// Replicates `source` (a `/dev/ngXnY` namespace, a block device or a file) from offset
    /// 0 to its end, in 64 KiB blocks, 16 in flight, through p2pmem, events wait, 20 s
    /// timeout. Add replicas with [`PrimaryConfig::replica`].
    pub fn new(source: impl Into<PathBuf>) -> PrimaryConfig {
        PrimaryConfig {
            source: source.into(),
            replicas: Vec::new(),
            bind: None,
            offset: 0,
            len: None,
            block_size: 64 << 10,
            window: 16,
            buffers: BufferChoice::P2p,
            copy: CopyMode::None,
            verify: false,
            timeout: Duration::from_secs(20),
            wait: WaitMode::Events,
            busy_poll: DEFAULT_BUSY_POLL,
            rate: None,
            progress_every: Duration::from_secs(1),
            secret: None,
        }
    }
    /// Adds a replica (its `--listen` address).
    pub fn replica(mut self, addr: SocketAddr) -> Self {
        self.replicas.push(addr);
        self
    }
    /// The local address to connect from (selects the RDMA device).
    pub fn bind(mut self, addr: Option<IpAddr>) -> Self {
        self.bind = addr;
        self
    }
    /// First byte of the range.
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }
    /// Bytes to replicate (`None`: to the end of the source).
    pub fn len(mut self, len: Option<u64>) -> Self {
        self.len = len;
        self
    }
    /// Block size in bytes (a multiple of the LBA size, at most 64 MiB).
    pub fn block_size(mut self, bytes: u64) -> Self {
        self.block_size = bytes;
        self
    }
    /// Blocks in flight (1..=[`MAX_WINDOW`]).
    pub fn window(mut self, blocks: u32) -> Self {
        self.window = blocks;
        self
    }
    /// Where block buffers live.
    pub fn buffers(mut self, b: BufferChoice) -> Self {
        self.buffers = b;
        self
    }
    /// Zero-copy or bounce.
    pub fn copy(mut self, c: CopyMode) -> Self {
        self.copy = c;
        self
    }
    /// Read every replica back and compare checksums.
    pub fn verify(mut self, on: bool) -> Self {
        self.verify = on;
        self
    }
    /// Connect retries and the no-progress limit.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// How the loop waits.
    pub fn wait(mut self, w: WaitMode) -> Self {
        self.wait = w;
        self
    }
    /// In [`WaitMode::Events`], how long a loop that ran out of work keeps polling its
    /// completion queues and drive ring (a PAUSE between rounds) before it sleeps
    /// ([`DEFAULT_BUSY_POLL`]; zero: sleep at once). A block's next event usually comes
    /// within it, so the loop saves a sleep and a wake-up per event for at most this much
    /// CPU per idle spell; like the kernel's `net.core.busy_poll`.
    pub fn busy_poll(mut self, d: Duration) -> Self {
        self.busy_poll = d;
        self
    }
    /// Reads the source at no more than `bytes_per_sec` (`None`: as fast as the pipeline
    /// goes), leaving drive and link bandwidth to other work, like fio's `--rate` or DRBD's
    /// resync rate. Only reads are paced; a block in flight completes at full speed.
    pub fn rate(mut self, bytes_per_sec: Option<u64>) -> Self {
        self.rate = bytes_per_sec;
        self
    }
    /// The secret shared with the replicas: proved to each (and each replica's proof
    /// checked) in the connection setup; see [`ReplicaAccess`].
    pub fn secret(mut self, secret: Option<Secret>) -> Self {
        self.secret = secret;
        self
    }
    /// How often [`Event::Progress`] is reported (default 1 s).
    pub fn progress_every(mut self, every: Duration) -> Self {
        self.progress_every = every;
        self
    }
    /// The replicas.
    pub fn replicas(&self) -> &[SocketAddr] {
        &self.replicas
    }
    /// The source path.
    pub fn source(&self) -> &std::path::Path {
        &self.source
    }

    /// Checks what can be checked without opening anything.
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] naming the setting: no source, no replica, a window
    /// outside 1..=1024, a zero timeout.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.source.as_os_str().is_empty() {
            return Err(EngineError::config("source", "is required"));
        }
        if self.replicas.is_empty() {
            return Err(EngineError::config(
                "replicas",
                "the primary needs at least one replica ADDR:PORT",
            ));
        }
        check_window(self.window)?;
        if self.progress_every.is_zero() {
            return Err(EngineError::config(
                "progress interval",
                "must be greater than zero",
            ));
        }
        check_timeout(self.timeout)
    }
}

/// Where a replica listens, what it writes to, and how.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    target: PathBuf,
    listen: SocketAddr,
    block_size: u64,
    window: u32,
    buffers: BufferChoice,
    copy: CopyMode,
    timeout: Duration,
    accept_timeout: Duration,
    wait: WaitMode,
    busy_poll: Duration,
    access: ReplicaAccess,
    bounds: (u64, Option<u64>),
}

impl ReplicaConfig {
    /// Serves one primary on `listen`, writing to `target`; buffers for blocks up to 64 KiB,
    /// 16 of them, p2pmem, events wait, 20 s silence limit, 120 s to wait for the primary.
    pub fn new(target: impl Into<PathBuf>, listen: SocketAddr) -> ReplicaConfig {
        ReplicaConfig {
            target: target.into(),
            listen,
            block_size: 64 << 10,
            window: 16,
            buffers: BufferChoice::P2p,
            copy: CopyMode::None,
            timeout: Duration::from_secs(20),
            accept_timeout: Duration::from_secs(120),
            wait: WaitMode::Events,
            busy_poll: DEFAULT_BUSY_POLL,
            access: ReplicaAccess::default(),
            bounds: (0, None),
        }
    }
    /// Who may be this replica's primary (default: anyone who connects first; see
    /// [`ReplicaAccess`]).
    pub fn access(mut self, access: ReplicaAccess) -> Self {
        self.access = access;
        self
    }
    /// The byte range a primary may write: `len` bytes from `offset` (`None`: to the end of
    /// the target). A hello outside it is refused. Default: the whole target.
    pub fn bounds(mut self, offset: u64, len: Option<u64>) -> Self {
        self.bounds = (offset, len);
        self
    }
    /// The largest block accepted (buffer size).
    pub fn block_size(mut self, bytes: u64) -> Self {
        self.block_size = bytes;
        self
    }
    /// Buffers (the most blocks granted to the primary at once; 1..=[`MAX_WINDOW`]).
    pub fn window(mut self, blocks: u32) -> Self {
        self.window = blocks;
        self
    }
    /// Where block buffers live.
    pub fn buffers(mut self, b: BufferChoice) -> Self {
        self.buffers = b;
        self
    }
    /// Zero-copy or bounce.
    pub fn copy(mut self, c: CopyMode) -> Self {
        self.copy = c;
        self
    }
    /// How long the primary may stay silent before it counts as gone (and the hello limit).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// How long to wait for a primary to connect.
    pub fn accept_timeout(mut self, t: Duration) -> Self {
        self.accept_timeout = t;
        self
    }
    /// How the loop waits.
    pub fn wait(mut self, w: WaitMode) -> Self {
        self.wait = w;
        self
    }
    /// As [`PrimaryConfig::busy_poll`].
    pub fn busy_poll(mut self, d: Duration) -> Self {
        self.busy_poll = d;
        self
    }
    /// The target path.
    pub fn target(&self) -> &std::path::Path {
        &self.target
    }
    /// The listen address.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Checks what can be checked without opening anything.
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] naming the setting: no target, a block size of 0 or
    /// above 64 MiB, a window outside 1..=1024, a zero timeout.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.target.as_os_str().is_empty() {
            return Err(EngineError::config("target", "is required"));
        }
        if self.block_size == 0 || self.block_size > u64::from(crate::protocol::MAX_BLOCK_SIZE) {
            return Err(EngineError::config(
                "block_size",
                format!(
                    "{}: must be 1..={} bytes",
                    self.block_size,
                    crate::protocol::MAX_BLOCK_SIZE
                ),
            ));
        }
        check_window(self.window)?;
        check_timeout(self.timeout)
    }
}

/// What an engine tells its observer while it runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// Every connection is up (the primary: to all replicas; a replica: from its primary).
    Connected,
    /// A replica refused a connection (an address not allowed, no or a wrong proof of the
    /// shared secret) and goes on listening.
    Refused(String),
    /// On the primary, once per progress interval (1 s unless
    /// [`PrimaryConfig::progress_every`] says otherwise): blocks and bytes acked by every
    /// replica so far.
    Progress {
        /// Blocks replicated.
        blocks: u64,
        /// Bytes replicated.
        bytes: u64,
        /// Since the run started.
        elapsed: Duration,
        /// Blocks each replica acked so far, in `--replica` order (how far each one lags).
        per_replica: Vec<u64>,
    },
}

/// Control messages a side sent and the SENDs that carried them: up to
/// [`crate::protocol::MAX_PACKED`] messages go in one SEND when several are ready at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCounts {
    /// Control messages sent.
    pub messages: u64,
    /// SENDs that carried them.
    pub sends: u64,
}

impl MessageCounts {
    fn of(links: &[link::Link]) -> MessageCounts {
        links.iter().fold(MessageCounts::default(), |acc, l| {
            let c = l.message_counts();
            MessageCounts {
                messages: acc.messages + c.messages,
                sends: acc.sends + c.sends,
            }
        })
    }
}

/// User + system CPU time of the calling thread (`RUSAGE_THREAD`), the one that runs the
/// engine's loop: other threads of an embedding process are not counted. Zero if the kernel
/// refuses the call.
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; zeroed is valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// How long an idle loop may sleep: until the silence limit expires, at most `cap`.
fn wait_bound(since_progress: Duration, limit: Duration, cap: Duration) -> Duration {
    limit
        .saturating_sub(since_progress)
        .clamp(Duration::from_millis(1), cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_waits_end_at_the_silence_limit_and_never_spin_at_zero() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Far from the limit: the cap (progress reports, fin grace) bounds the sleep.
        assert_eq!(wait_bound(s(0), s(20), s(1)), s(1));
        // Close to it: wake up when it expires so the no-progress rule fires on time.
        assert_eq!(wait_bound(ms(19_700), s(20), s(1)), ms(300));
        // Past it: still a real (1 ms) wait, not a zero timeout that would spin.
        assert_eq!(wait_bound(s(25), s(20), s(1)), ms(1));
    }

    #[test]
    fn write_cache_reports_the_decision_and_its_source() {
        let v = WriteCache {
            volatile: true,
            source: "Identify Controller VWC of nvme2n1".into(),
        };
        assert_eq!(
            v.to_string(),
            "volatile, flush before ack (Identify Controller VWC of nvme2n1)"
        );
        let n = WriteCache {
            volatile: false,
            source: "/sys/dev/block/259:3/queue/write_cache: write through".into(),
        };
        assert!(n.to_string().starts_with("none ("), "{n}");
    }

    #[test]
    fn cpu_time_counts_the_calling_thread_only() {
        let process = || {
            // SAFETY: rusage is plain data; zeroed is valid.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointer to a rusage.
            assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            tv(u.ru_utime) + tv(u.ru_stime)
        };
        let (mine0, all0) = (cpu_time(), process());
        // Another thread burns 150 ms of its own CPU while this one waits in join.
        let burnt = std::thread::spawn(|| {
            let t0 = cpu_time();
            let mut x = 0u64;
            while cpu_time().saturating_sub(t0) < Duration::from_millis(150) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            cpu_time().saturating_sub(t0)
        })
        .join()
        .unwrap();
        let (mine, all) = (cpu_time() - mine0, process() - all0);
        assert!(burnt >= Duration::from_millis(150), "{burnt:?}");
        assert!(all >= Duration::from_millis(150), "process: {all:?}");
        assert!(mine < Duration::from_millis(100), "this thread: {mine:?}");
    }
}
