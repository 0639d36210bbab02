//! The controller core: everything an NVMe-oF target decides, without any I/O.
//!
//! [`TargetCore`] holds the subsystems and the live controllers of one listener; it is shared
//! by every queue (an `Arc<Mutex<..>>` inside). A [`QueueCore`] is one connected RDMA queue
//! (admin or I/O): the transport feeds it received capsules ([`QueueCore::on_command`]), host
//! data it fetched ([`QueueCore::on_data`]) and backend completions
//! ([`QueueCore::on_io_done`]), and carries out the returned [`Action`]s.
//!
//! Split by concern: `fabrics` (Connect, Property Get/Set), `admin` (dispatch, features,
//! keep-alive, async events), `identify`, `log` (log pages and the discovery log), `io`
//! (Read/Write/Flush/Write Zeroes/DSM), `state` (the shared tables).

mod admin;
mod fabrics;
mod identify;
mod io;
mod log;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::config::{ConfigError, TargetConfig};
use super::status::{IoFailure, Status};
use super::wire::{CmReject, CmRequest, Command, Completion, Sgl, ADMIN_QUEUE_SIZE};
use state::{Counters, Limits, Namespace, Shared, Subsystem, CNTLID_MIN};

/// What the transport learned about a namespace's backing store when it opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace id (as configured).
    pub nsid: u32,
    /// Logical block size in bytes (power of two, 512..=65536).
    pub lba_size: u32,
    /// Capacity in logical blocks (> 0).
    pub blocks: u64,
    /// The backing store caches writes (a Flush is meaningful; reported as VWC).
    pub volatile_write_cache: bool,
    /// Deallocate (DSM AD / discard) is available (ONCS DSM).
    pub supports_deallocate: bool,
    /// Write Zeroes is available (ONCS Write Zeroes).
    pub supports_write_zeroes: bool,
}

/// What the transport must do after a core call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this completion now (no data phase).
    Complete(Completion),
    /// The command needs `len` bytes of host data through its keyed SGL (RDMA READ); then
    /// call [`QueueCore::on_data`]. (In-capsule data is consumed by the core directly.)
    FetchData {
        /// Command id.
        cid: u16,
        /// Bytes to fetch (equal to the SGL's length).
        len: u32,
    },
    /// RDMA WRITE `data` to the command's keyed SGL (exactly its length), then send
    /// `completion`.
    ReturnData {
        /// The bytes.
        data: Vec<u8>,
        /// What to send once the data is placed.
        completion: Completion,
    },
    /// Backend I/O; then call [`QueueCore::on_io_done`].
    Io(IoCommand),
    /// Nothing to send now (an Async Event Request is held until an event fires).
    Hold,
}

/// A checked backend I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoCommand {
    /// Command id.
    pub cid: u16,
    /// Namespace (0xFFFFFFFF for a Flush of every namespace of the subsystem).
    pub nsid: u32,
    /// Index of the subsystem in [`TargetConfig::subsystems`] (nsids are per subsystem).
    pub subsystem: usize,
    /// The operation, in bytes, already checked against the namespace.
    pub op: IoOp,
    /// The command's data descriptor: Read -> Keyed (RDMA WRITE to it); Write -> Keyed
    /// (RDMA READ) or InCapsule (the capsule's bytes at `offset`); others: ignore.
    pub sgl: Sgl,
    /// Write with Force Unit Access (cdw12 bit 30; Linux sets it for REQ_FUA when VWC is
    /// reported): the data must be durable when the completion is sent (write with
    /// `RWF_DSYNC` / NVMe FUA, or flush before completing). Always false for other ops.
    pub fua: bool,
}

/// A backend operation (byte offsets and lengths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Drive -> buffer -> RDMA WRITE to the host -> completion.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes (<= MDTS, == the SGL length).
        len: u32,
    },
    /// RDMA READ (or in-capsule) -> buffer -> drive -> completion.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes (<= MDTS, == the SGL length).
        len: u32,
    },
    /// Make written data durable (fdatasync / NVMe Flush).
    Flush,
    /// Write zeroes over the range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Discard these (offset, len) byte ranges.
    Deallocate {
        /// Ranges in bytes, each inside the namespace.
        ranges: Vec<(u64, u64)>,
    },
}

/// Counters of a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetStats {
    /// Live controllers.
    pub controllers: usize,
    /// Controllers created since start.
    pub controllers_created: u64,
    /// Commands received.
    pub commands: u64,
    /// Completions with an error status.
    pub errors: u64,
    /// Read commands completed successfully.
    pub read_cmds: u64,
    /// Write commands completed successfully.
    pub write_cmds: u64,
    /// Bytes read by hosts.
    pub bytes_read: u64,
    /// Bytes written by hosts.
    pub bytes_written: u64,
    /// Keep-alive expiries reported by [`TargetCore::expired`] (each counted once).
    pub keep_alive_expired: u64,
}

/// The shared core of one listener. Cheap to clone (a reference).
#[derive(Clone, Debug)]
pub struct TargetCore {
    shared: Arc<Mutex<Shared>>,
}

impl TargetCore {
    /// Builds the core from the configuration and the transport's view of each namespace
    /// (`(subsystem nqn, info)`); every configured namespace needs exactly one info.
    ///
    /// # Errors
    /// [`ConfigError`] for an invalid configuration or a missing / stray / bad namespace info.
    pub fn new(
        cfg: &TargetConfig,
        namespaces: Vec<(String, NamespaceInfo)>,
    ) -> Result<TargetCore, ConfigError> {
        cfg.validate()?;
        let bad = |nqn: &str, nsid: u32, what: &'static str| ConfigError::NamespaceInfo {
            nqn: nqn.to_owned(),
            nsid,
            what,
        };
        for (i, (nqn, info)) in namespaces.iter().enumerate() {
            let known = cfg
                .subsystems
                .iter()
                .any(|s| &s.nqn == nqn && s.namespaces.iter().any(|n| n.nsid == info.nsid));
            if !known {
                return Err(bad(nqn, info.nsid, "no such configured namespace"));
            }
            if namespaces[..i]
                .iter()
                .any(|(q, o)| q == nqn && o.nsid == info.nsid)
            {
                return Err(bad(nqn, info.nsid, "namespace info given twice"));
            }
            if !info.lba_size.is_power_of_two() || !(512..=65536).contains(&info.lba_size) {
                return Err(bad(
                    nqn,
                    info.nsid,
                    "lba_size must be a power of two 512..=65536",
                ));
            }
            if info.blocks == 0 || info.blocks.checked_mul(u64::from(info.lba_size)).is_none() {
                return Err(bad(
                    nqn,
                    info.nsid,
                    "capacity must be 1 block..=u64::MAX bytes",
                ));
            }
        }
        let mut subsystems = Vec::with_capacity(cfg.subsystems.len());
        for s in &cfg.subsystems {
            let mut nss = Vec::with_capacity(s.namespaces.len());
            for n in &s.namespaces {
                let info = namespaces
                    .iter()
                    .find(|(q, i)| q == &s.nqn && i.nsid == n.nsid)
                    .map(|(_, i)| *i)
                    .ok_or_else(|| bad(&s.nqn, n.nsid, "no backend information"))?;
                nss.push(Namespace {
                    info,
                    uuid: n.effective_uuid(&s.nqn),
                    nguid: n.effective_nguid(&s.nqn),
                });
            }
            nss.sort_by_key(|n| n.info.nsid);
            subsystems.push(Subsystem {
                nqn: s.nqn.clone(),
                allowed_hosts: s.allowed_hosts.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                namespaces: nss,
            });
        }
        let now = Instant::now();
        Ok(TargetCore {
            shared: Arc::new(Mutex::new(Shared {
                limits: Limits {
                    listen: cfg.listen,
                    inline_data_size: cfg.inline_data_size,
                    max_io_queues: cfg.max_io_queues,
                    queue_depth_max: cfg.queue_depth_max,
                    mdts_bytes: cfg.mdts_bytes,
                    port_id: cfg.port_id,
                },
                subsystems,
                controllers: Default::default(),
                next_cntlid: CNTLID_MIN,
                counters: Counters::default(),
                started: now,
            })),
        })
    }

    /// The state; a poisoned lock is taken over (the state stays consistent: every update
    /// is a plain field store).
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a queue's connect request against this listener's limits before accepting it
    /// (qid <= max_io_queues, I/O queue depth <= queue_depth_max).
    ///
    /// # Errors
    /// The reject reason to send.
    pub fn admit(&self, req: &CmRequest) -> Result<(), CmReject> {
        let l = self.lock().limits;
        if req.qid > l.max_io_queues {
            return Err(CmReject::InvalidQid);
        }
        let max = if req.qid == 0 {
            ADMIN_QUEUE_SIZE
        } else {
            l.queue_depth_max
        };
        if req.sq_entries() > u32::from(max) {
            return Err(CmReject::InvalidHsqsize);
        }
        Ok(())
    }

    /// In-capsule data bytes an I/O queue's receive buffers must hold after the 64-byte SQE
    /// (0 on the admin queue).
    pub fn inline_data_size(&self) -> u32 {
        self.lock().limits.inline_data_size
    }

    /// Keep-alive: controllers whose KATO passed at `now` without a command on any of their
    /// queues. The transport tears down all their queues (which frees them).
    pub fn expired(&self, now: Instant) -> Vec<u16> {
        let mut s = self.lock();
        let mut out = Vec::new();
        let mut newly = 0;
        for (&id, c) in s.controllers.iter_mut() {
            if c.kato_ms == 0 {
                continue;
            }
            let idle = now.saturating_duration_since(c.last_seen);
            if idle > Duration::from_millis(u64::from(c.kato_ms)) {
                out.push(id);
                newly += u64::from(!c.expired);
                c.expired = true;
            } else {
                c.expired = false;
            }
        }
        s.counters.keep_alive_expired += newly;
        out
    }

    /// Current counters.
    pub fn stats(&self) -> TargetStats {
        let s = self.lock();
        let c = s.counters;
        TargetStats {
            controllers: s.controllers.len(),
            controllers_created: c.controllers_created,
            commands: c.commands,
            errors: c.errors,
            read_cmds: c.read_cmds,
            write_cmds: c.write_cmds,
            bytes_read: c.bytes_read,
            bytes_written: c.bytes_written,
            keep_alive_expired: c.keep_alive_expired,
        }
    }
}

/// What a command waits for between `on_command` and `on_data` / `on_io_done`.
#[derive(Clone, Copy, Debug)]
enum Pending {
    /// Connect data (1024 bytes) is being fetched.
    Connect { kato_ms: u32 },
    /// DSM range list is being fetched.
    Dsm { nsid: u32, ranges: u32 },
    /// Backend I/O in flight.
    Io { kind: IoKind, bytes: u64 },
    /// Async Event Request held.
    Aer,
}

/// Direction of a backend I/O for the errno mapping and the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoKind {
    Read,
    Write,
    Other,
}

/// One connected queue. Not shared between threads; lives with the transport's queue.
#[derive(Debug)]
pub struct QueueCore {
    core: TargetCore,
    qid: u16,
    /// Host SQ entries (hsqsize + 1).
    sq_entries: u16,
    sqhd: u16,
    /// Controller id from the rdma_cm private data (0: not given).
    cm_cntlid: u16,
    cntlid: Option<u16>,
    pending: HashMap<u16, Pending>,
}

impl QueueCore {
    /// A queue accepted with `req` (already checked by [`CmRequest::parse`] and
    /// [`TargetCore::admit`]). It serves nothing but Connect until Connect succeeds.
    pub fn new(core: &TargetCore, req: &CmRequest) -> QueueCore {
        QueueCore {
            core: core.clone(),
            qid: req.qid,
            sq_entries: req.hsqsize.saturating_add(1),
            sqhd: 0,
            cm_cntlid: if req.qid == 0 { 0 } else { req.cntlid },
            cntlid: None,
            pending: HashMap::new(),
        }
    }

    /// Queue id (0: admin).
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The controller this queue belongs to (after Connect).
    pub fn cntlid(&self) -> Option<u16> {
        self.cntlid
    }

    /// Commands waiting for data, a backend or an event.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    fn completion(&self, cid: u16, status: Status, result: u64) -> Completion {
        Completion {
            result,
            sqhd: self.sqhd,
            sqid: self.qid,
            cid,
            status,
        }
    }

    fn done(&self, cid: u16, status: Status) -> Action {
        if !status.is_success() {
            self.core.lock().counters.errors += 1;
        }
        Action::Complete(self.completion(cid, status, 0))
    }

    fn done_result(&self, cid: u16, status: Status, result: u64) -> Action {
        if !status.is_success() {
            self.core.lock().counters.errors += 1;
        }
        Action::Complete(self.completion(cid, status, result))
    }

    /// A received command capsule: the SQE and the in-capsule data after it (empty if
    /// none).
    pub fn on_command(&mut self, cmd: &Command, in_capsule: &[u8], now: Instant) -> Action {
        self.sqhd = if self.sq_entries == 0 {
            0
        } else {
            (self.sqhd + 1) % self.sq_entries
        };
        let cid = cmd.cid();
        {
            let mut s = self.core.lock();
            s.counters.commands += 1;
            if let Some(c) = self.cntlid.and_then(|id| s.controllers.get_mut(&id)) {
                c.last_seen = now;
            }
        }
        if self.pending.contains_key(&cid) {
            return self.done(cid, Status::CMDID_CONFLICT.with_dnr());
        }
        if cmd.is_fabrics() {
            return fabrics::on_fabrics(self, cmd, in_capsule, now);
        }
        let Some(cntlid) = self.cntlid else {
            return self.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
        };
        let ready = {
            let s = self.core.lock();
            s.controllers
                .get(&cntlid)
                .map(|c| c.csts & fabrics::CSTS_RDY != 0)
        };
        match ready {
            Some(true) => {}
            Some(false) | None => return self.done(cid, Status::CMD_SEQ_ERROR.with_dnr()),
        }
        if self.qid == 0 {
            admin::on_admin(self, cntlid, cmd, in_capsule)
        } else {
            io::on_io(self, cntlid, cmd, in_capsule)
        }
    }

    /// Host data fetched for a [`Action::FetchData`].
    pub fn on_data(&mut self, cid: u16, data: &[u8], now: Instant) -> Action {
        match self.pending.remove(&cid) {
            Some(Pending::Connect { kato_ms }) => {
                fabrics::on_connect_data(self, cid, kato_ms, data, now)
            }
            Some(Pending::Dsm { nsid, ranges }) => match self.cntlid {
                Some(cntlid) => io::on_dsm_data(self, cntlid, cid, nsid, ranges, data),
                None => self.done(cid, Status::CMD_SEQ_ERROR.with_dnr()),
            },
            Some(other) => {
                // Not waiting for data: keep the command's state, answer the stray call.
                self.pending.insert(cid, other);
                self.done(cid, Status::INTERNAL.with_dnr())
            }
            None => self.done(cid, Status::INTERNAL.with_dnr()),
        }
    }

    /// A backend I/O from [`Action::Io`] finished: `Ok(())`, an errno, or the device's own
    /// NVMe status (passed on as it was).
    pub fn on_io_done(&mut self, cid: u16, result: Result<(), IoFailure>) -> Completion {
        let kind = match self.pending.remove(&cid) {
            Some(Pending::Io { kind, bytes }) => Some((kind, bytes)),
            Some(other) => {
                self.pending.insert(cid, other);
                None
            }
            None => None,
        };
        let status = match (kind, result) {
            (None, _) => Status::INTERNAL.with_dnr(),
            (Some((kind, bytes)), Ok(())) => {
                let mut s = self.core.lock();
                match kind {
                    IoKind::Read => {
                        s.counters.read_cmds += 1;
                        s.counters.bytes_read += bytes;
                    }
                    IoKind::Write => {
                        s.counters.write_cmds += 1;
                        s.counters.bytes_written += bytes;
                    }
                    IoKind::Other => {}
                }
                Status::SUCCESS
            }
            (Some((kind, _)), Err(f)) => f.status(kind != IoKind::Read),
        };
        if !status.is_success() {
            self.core.lock().counters.errors += 1;
        }
        self.completion(cid, status, 0)
    }

    /// The queue was torn down: held commands are dropped; an admin queue frees its
    /// controller, an I/O queue releases its qid.
    pub fn on_disconnect(&mut self) {
        self.pending.clear();
        if let Some(id) = self.cntlid.take() {
            let mut s = self.core.lock();
            if self.qid == 0 {
                s.controllers.remove(&id);
            } else if let Some(c) = s.controllers.get_mut(&id) {
                c.io_qids.remove(&self.qid);
            }
        }
    }
}

impl Drop for QueueCore {
    fn drop(&mut self) {
        self.on_disconnect();
    }
}
