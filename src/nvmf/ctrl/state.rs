//! The state shared by every queue of a listener: subsystems with their namespaces, and the
//! live controllers (one per connected admin queue).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Instant;

use super::NamespaceInfo;

/// Limits copied from the configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub listen: SocketAddr,
    pub inline_data_size: u32,
    pub max_io_queues: u16,
    pub queue_depth_max: u16,
    pub mdts_bytes: u32,
    pub port_id: u16,
}

/// One namespace as served.
#[derive(Clone, Debug)]
pub(crate) struct Namespace {
    pub info: NamespaceInfo,
    pub uuid: [u8; 16],
    pub nguid: [u8; 16],
}

/// One NVM subsystem as served.
#[derive(Clone, Debug)]
pub(crate) struct Subsystem {
    pub nqn: String,
    pub allowed_hosts: Vec<String>,
    pub serial: String,
    pub model: String,
    /// Sorted by nsid.
    pub namespaces: Vec<Namespace>,
}

impl Subsystem {
    pub fn allows(&self, hostnqn: &str) -> bool {
        self.allowed_hosts.is_empty() || self.allowed_hosts.iter().any(|h| h == hostnqn)
    }

    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.info.nsid == nsid)
    }
}

/// One controller (created by an admin queue Connect).
#[derive(Clone, Debug)]
pub(crate) struct Controller {
    /// Index into `Shared::subsystems`; `None` for a discovery controller.
    pub subsys: Option<usize>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// Keep Alive Timeout in milliseconds; 0: none.
    pub kato_ms: u32,
    pub last_seen: Instant,
    pub cc: u32,
    pub csts: u32,
    /// I/O queues granted by Set Features Number of Queues (the maximum until then).
    pub queues_granted: u16,
    /// Connected I/O queue ids.
    pub io_qids: BTreeSet<u16>,
    /// Async Event Configuration feature value.
    pub aec: u32,
    /// Already counted as expired in the statistics.
    pub expired: bool,
}

/// Counters for SMART and [`super::TargetStats`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    pub commands: u64,
    pub errors: u64,
    pub read_cmds: u64,
    pub write_cmds: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub controllers_created: u64,
    pub keep_alive_expired: u64,
}

/// Everything behind the `TargetCore` mutex.
#[derive(Debug)]
pub(crate) struct Shared {
    pub limits: Limits,
    pub subsystems: Vec<Subsystem>,
    pub controllers: BTreeMap<u16, Controller>,
    pub next_cntlid: u16,
    pub counters: Counters,
    pub started: Instant,
}

/// Controller ids handed out (NVMe reserves 0xFFF0.. ; nvmet uses 1..=0xFFEF too).
pub(crate) const CNTLID_MIN: u16 = 1;
pub(crate) const CNTLID_MAX: u16 = 0xffef;

impl Shared {
    /// A free controller id, round robin so a reconnecting host sees a new one.
    pub fn alloc_cntlid(&mut self) -> Option<u16> {
        let span = u32::from(CNTLID_MAX - CNTLID_MIN) + 1;
        for _ in 0..span {
            let id = self.next_cntlid;
            self.next_cntlid = if id >= CNTLID_MAX { CNTLID_MIN } else { id + 1 };
            if !self.controllers.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    pub fn subsystem_index(&self, nqn: &str) -> Option<usize> {
        self.subsystems.iter().position(|s| s.nqn == nqn)
    }
}
