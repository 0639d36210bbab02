//! The RDMA transport of the NVMe-oF target: the rdma_cm listener, one thread per accepted
//! queue, RDMA READ/WRITE of host data, SEND of completions.
//!
//! # Threads
//! [`serve`] runs the listener on the caller's thread: it waits (200 ms at a time, so the
//! stop flag and keep-alive expiry are checked) for connect requests, rejects a request whose
//! private data is bad with the `CmReject` status, and hands every other one to a new queue
//! thread. The main loop also asks [`TargetCore::expired`] about once a second and tells every
//! queue of an expired controller to tear down.
//!
//! Each queue (admin or I/O) gets its own thread, with its own completion queue (on a
//! completion channel), io_uring for the namespace backends, receive buffers and
//! [`QueueCore`](crate::nvmf::QueueCore). Chosen over one event loop for all queues because:
//! - isolation: accepting waits for the ESTABLISHED event, and destroying a QP whose host
//!   vanished can block in the kernel (6.12 rxe stalls `rxe_destroy_qp` up to 50 s); in a
//!   thread of its own that stalls only the queue concerned, never another host;
//! - the Linux host opens one I/O queue per CPU, so threads are few, and each one sleeps in
//!   one `io_uring_enter` that wakes on its RDMA completions, its rdma_cm events and its
//!   backend I/O (the replicator engine's way of waiting, see `queue.rs`).
//!
//! # Memory
//! Data buffers come from one p2p-alloc pool (p2pmem or host memory). Every chunk of it is
//! registered once per RDMA device, on first use (`DeviceRes`); all queues on a device share
//! its protection domain. A command owns its buffers until its response SEND has completed, or
//! until its queue's QP is destroyed on teardown; a backend I/O owns its buffer inside the
//! ring until its completion is reaped, and teardown drains the ring first.

mod queue;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::nvmf::backend::Backend;
use crate::nvmf::{CmRequest, TargetCore};
use crate::p2p_alloc::{Backing, Buffer, Pool};
use crate::rdma::{
    self, Access, Context, Listener, MemoryKind, MemoryRegion, ProtectionDomain, Sge,
};

/// Why the transport could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Binding or listening on the address failed.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// The rdma_cm error (EADDRINUSE, EADDRNOTAVAIL: no RDMA device has the address).
        source: rdma::Error,
    },
    /// The listener's device went away.
    #[error("the listener failed: {0}")]
    Listener(rdma::Error),
}

/// Per-queue control shared with the listener: a kill flag and the controller id.
#[derive(Debug)]
pub(crate) struct QueueCtl {
    /// Set by the listener (stop, keep-alive expiry): tear the queue down.
    pub(crate) kill: AtomicBool,
    /// The controller after Connect (`NO_CNTLID` before).
    pub(crate) cntlid: AtomicU32,
}

pub(crate) const NO_CNTLID: u32 = u32::MAX;

/// Counters of a running target.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Payload bytes the CPU copied (only an in-capsule write whose data is not aligned for
    /// the backend is copied; the Linux host never sends one): stays 0.
    pub copied_bytes: AtomicU64,
    /// Bytes fetched from hosts by RDMA READ for writes.
    pub rdma_read_bytes: AtomicU64,
    /// Bytes sent to hosts by RDMA WRITE for reads.
    pub rdma_write_bytes: AtomicU64,
    /// Commands received.
    pub commands: AtomicU64,
    /// Queues accepted.
    pub queues_accepted: AtomicU64,
    /// Connect requests rejected.
    pub queues_rejected: AtomicU64,
    /// Busy polls (`TargetConfig::busy_poll`) that found work before their budget ran out.
    pub busy_poll_hits: AtomicU64,
    /// Busy polls that ran out of budget (the queue then slept).
    pub busy_poll_misses: AtomicU64,
}

/// One RDMA device's protection domain and the pool chunks registered on it.
pub(crate) struct DeviceRes {
    // Regions before the PD (they hold it anyway).
    mrs: Mutex<HashMap<u32, MemoryRegion>>,
    pub(crate) pd: ProtectionDomain,
    pub(crate) ctx: Context,
}

impl DeviceRes {
    /// The scatter/gather entry for `len` bytes at `start` of a pool buffer, registering its
    /// chunk on this device the first time.
    pub(crate) fn sge(
        &self,
        pool: &Pool,
        buf: &Buffer,
        start: usize,
        len: usize,
    ) -> Result<Sge, rdma::Error> {
        let mut mrs = self.mrs.lock().unwrap_or_else(|e| e.into_inner());
        let id = buf.chunk_id();
        let mr = match mrs.entry(id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let c = pool
                    .chunks()
                    .into_iter()
                    .find(|c| c.id == id)
                    .ok_or_else(|| rdma::Error::InvalidArgument {
                        op: "register pool chunk",
                        reason: format!("chunk {id} is not in the pool"),
                    })?;
                let kind = match c.backing {
                    Backing::P2p { .. } => MemoryKind::Peer,
                    Backing::Host { .. } => MemoryKind::Host,
                };
                // SAFETY: the chunk stays mapped while the pool lives. `Shared` drops its devices
                // (and so these regions) before its pool, and queue threads, whose in-flight work
                // requests hold clones, keep `Shared` alive until their QPs are destroyed.
                let mr = unsafe {
                    MemoryRegion::register_raw(
                        &self.pd,
                        c.addr as *mut u8,
                        c.len,
                        Access::local_read().local_write(),
                        kind,
                    )
                }?;
                v.insert(mr)
            }
        };
        mr.sge(buf.offset_in_chunk() + start, len)
    }
}

/// Everything the queues share.
pub struct Shared {
    // Field order is drop order: device regions before the pool whose chunks they register.
    devices: Mutex<Vec<Arc<DeviceRes>>>,
    pub(crate) core: TargetCore,
    pub(crate) backends: Vec<Arc<Backend>>,
    /// (subsystem index in the configuration, nsid) -> index in `backends`.
    pub(crate) namespaces: HashMap<(usize, u32), usize>,
    pub(crate) pool: Pool,
    pub(crate) stats: TransportStats,
    /// [`crate::nvmf::TargetConfig::busy_poll`].
    pub(crate) busy_poll: Duration,
}

impl Shared {
    /// Ties the pieces together; `namespaces` maps (subsystem index in the configuration,
    /// nsid) to an index in `backends`.
    pub fn new(
        core: TargetCore,
        backends: Vec<Arc<Backend>>,
        namespaces: HashMap<(usize, u32), usize>,
        pool: Pool,
        busy_poll: Duration,
    ) -> Shared {
        Shared {
            devices: Mutex::new(Vec::new()),
            core,
            backends,
            namespaces,
            pool,
            stats: TransportStats::default(),
            busy_poll,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &TransportStats {
        &self.stats
    }

    /// The protection domain and regions of `ctx`'s device (created on first use).
    pub(crate) fn device(&self, ctx: &Context) -> Result<Arc<DeviceRes>, rdma::Error> {
        let mut devs = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = devs.iter().find(|d| d.ctx.same_device(ctx)) {
            return Ok(d.clone());
        }
        let d = Arc::new(DeviceRes {
            mrs: Mutex::new(HashMap::new()),
            pd: ProtectionDomain::new(ctx)?,
            ctx: ctx.clone(),
        });
        devs.push(d.clone());
        Ok(d)
    }
}

struct Running {
    ctl: Arc<QueueCtl>,
    thread: JoinHandle<()>,
}

/// How often the listener checks keep-alive expiry.
const EXPIRY_EVERY: Duration = Duration::from_millis(500);

/// Binds the rdma_cm listener on `addr` (port 0 picks one).
///
/// # Errors
/// [`TransportError::Listen`].
pub fn listen(addr: SocketAddr) -> Result<Listener, TransportError> {
    Listener::bind(addr, 64).map_err(|source| TransportError::Listen { addr, source })
}

/// Serves connect requests on `listener` until `stop` is set, then tears every queue down
/// (disconnecting its host) and waits for the queue threads.
///
/// # Errors
/// [`TransportError::Listener`] when the listener's device is removed.
pub fn serve(
    listener: &Listener,
    shared: &Arc<Shared>,
    stop: &AtomicBool,
) -> Result<(), TransportError> {
    let mut running: Vec<Running> = Vec::new();
    let mut last_expiry = Instant::now();
    let result = loop {
        if stop.load(Ordering::Acquire) {
            break Ok(());
        }
        running.retain(|r| !r.thread.is_finished());
        if last_expiry.elapsed() >= EXPIRY_EVERY {
            last_expiry = Instant::now();
            for cntlid in shared.core.expired(last_expiry) {
                tracing::warn!(cntlid, "keep-alive expired: tearing the controller down");
                for r in &running {
                    if r.ctl.cntlid.load(Ordering::Acquire) == u32::from(cntlid) {
                        r.ctl.kill.store(true, Ordering::Release);
                    }
                }
            }
        }
        let req = match listener.get_request(Duration::from_millis(200)) {
            Ok(r) => r,
            Err(rdma::Error::Timeout { .. }) => continue,
            Err(e @ rdma::Error::DeviceRemoved { .. }) => break Err(TransportError::Listener(e)),
            Err(e) => {
                tracing::warn!(error = %e, "listener event");
                continue;
            }
        };
        let cm = match CmRequest::parse(req.private_data())
            .and_then(|cm| shared.core.admit(&cm).map(|()| cm))
        {
            Ok(cm) => cm,
            Err(rej) => {
                shared.stats.queues_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = ?req.peer_addr(), reason = %rej, "rejecting a connect request");
                if let Err(e) = req.reject(&rej.encode()) {
                    tracing::warn!(error = %e, "rdma_reject");
                }
                continue;
            }
        };
        let ctl = Arc::new(QueueCtl {
            kill: AtomicBool::new(false),
            cntlid: AtomicU32::new(NO_CNTLID),
        });
        let (s, c) = (shared.clone(), ctl.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("nvmf-q{}", cm.qid))
            .spawn(move || queue::run(req, cm, &s, &c));
        match spawned {
            Ok(thread) => running.push(Running { ctl, thread }),
            Err(e) => tracing::error!(error = %e, "cannot start a queue thread"),
        }
    };
    for r in &running {
        r.ctl.kill.store(true, Ordering::Release);
    }
    for r in running {
        if r.thread.join().is_err() {
            tracing::error!("a queue thread panicked");
        }
    }
    result
}
