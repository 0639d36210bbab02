//! Target configuration: the listener, its subsystems (NQN, allowed hosts, namespaces) and
//! the limits the controllers advertise. Validated by [`TargetConfig::validate`] (called by
//! `TargetCore::new`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// NQN of the discovery subsystem (well known).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Longest NQN (bytes, without the terminating NUL) the NVMe spec allows.
pub const NQN_MAX_LEN: usize = 223;
/// Largest in-capsule data size (the Linux host and nvmet cap it at 16 KiB).
pub const INLINE_DATA_MAX: u32 = 16384;
/// The default [`TargetConfig::busy_poll`]: 1 ms.
pub const BUSY_POLL_DEFAULT: std::time::Duration = std::time::Duration::from_millis(1);

/// Everything a listener serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetConfig {
    /// Address and port (4420 by convention) of the rdma_cm listener; also reported in
    /// discovery log entries (TRADDR/TRSVCID/ADRFAM).
    pub listen: SocketAddr,
    /// NVM subsystems (the discovery subsystem is implicit).
    pub subsystems: Vec<SubsystemConfig>,
    /// In-capsule data bytes per I/O command (IOCCSZ = (64 + this) / 16); a multiple of 16,
    /// at most [`INLINE_DATA_MAX`]; 0 disables in-capsule data.
    pub inline_data_size: u32,
    /// Most I/O queues per controller (the Number of Queues grant never exceeds it).
    pub max_io_queues: u16,
    /// Most entries per I/O queue (CAP.MQES = this - 1); 2..=1024.
    pub queue_depth_max: u16,
    /// Largest data transfer (MDTS): a power of two, 4 KiB..=2 GiB.
    pub mdts_bytes: u32,
    /// Port id reported in discovery log entries.
    pub port_id: u16,
    /// Busy polling: how long a queue with at most one command in the works keeps polling
    /// its completion queues (and its backend ring, while drive I/O is in flight) before it
    /// sleeps ([`BUSY_POLL_DEFAULT`]; zero: sleep at once). Polling trades CPU time for the
    /// wake-ups a sleeping queue pays per command at queue depth 1, as SPDK's reactors and
    /// Linux's `busy_poll` do. A poll never outlasts this budget, a queue that found nothing
    /// backs off (it sleeps at once for its next 1, 2, 4, ... 64 chances), and a queue that
    /// has gone to sleep does not poll again until a completion wakes it, so an idle target
    /// costs no CPU. At most 1 s.
    pub busy_poll: std::time::Duration,
}

impl TargetConfig {
    /// A configuration with the defaults: inline 4096, 4 I/O queues, depth 128, MDTS 1 MiB,
    /// port id 1, busy polling for up to 1 ms, no subsystems.
    pub fn new(listen: SocketAddr) -> TargetConfig {
        TargetConfig {
            listen,
            subsystems: Vec::new(),
            inline_data_size: 4096,
            max_io_queues: 4,
            queue_depth_max: 128,
            mdts_bytes: 1 << 20,
            port_id: 1,
            busy_poll: BUSY_POLL_DEFAULT,
        }
    }

    /// Checks every field and cross-reference.
    ///
    /// # Errors
    /// The first problem found, as a [`ConfigError`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.inline_data_size > INLINE_DATA_MAX || self.inline_data_size % 16 != 0 {
            return Err(ConfigError::InlineDataSize {
                got: self.inline_data_size,
            });
        }
        if self.max_io_queues == 0 {
            return Err(ConfigError::Limit {
                what: "max_io_queues must be at least 1",
            });
        }
        if !(2..=super::wire::IO_QUEUE_SIZE_MAX).contains(&self.queue_depth_max) {
            return Err(ConfigError::Limit {
                what: "queue_depth_max must be 2..=1024",
            });
        }
        if self.busy_poll > std::time::Duration::from_secs(1) {
            return Err(ConfigError::Limit {
                what: "busy_poll must be at most 1 s",
            });
        }
        if !self.mdts_bytes.is_power_of_two() || self.mdts_bytes < 4096 {
            return Err(ConfigError::Limit {
                what: "mdts_bytes must be a power of two >= 4096",
            });
        }
        for (i, s) in self.subsystems.iter().enumerate() {
            check_nqn(&s.nqn)?;
            if s.nqn == DISCOVERY_NQN {
                return Err(ConfigError::ReservedNqn);
            }
            if self.subsystems[..i].iter().any(|o| o.nqn == s.nqn) {
                return Err(ConfigError::DuplicateSubsystem { nqn: s.nqn.clone() });
            }
            for h in &s.allowed_hosts {
                check_nqn(h)?;
            }
            if s.serial.len() > 20 || s.model.len() > 40 {
                return Err(ConfigError::Limit {
                    what: "serial <= 20 and model <= 40 bytes",
                });
            }
            for (j, n) in s.namespaces.iter().enumerate() {
                if n.nsid == 0 || n.nsid >= 0xffff_fffe {
                    return Err(ConfigError::BadNsid {
                        nqn: s.nqn.clone(),
                        nsid: n.nsid,
                    });
                }
                if s.namespaces[..j].iter().any(|o| o.nsid == n.nsid) {
                    return Err(ConfigError::DuplicateNsid {
                        nqn: s.nqn.clone(),
                        nsid: n.nsid,
                    });
                }
            }
        }
        Ok(())
    }
}

fn check_nqn(nqn: &str) -> Result<(), ConfigError> {
    if nqn.is_empty() || nqn.len() > NQN_MAX_LEN || nqn.bytes().any(|b| b == 0) {
        return Err(ConfigError::BadNqn {
            nqn: nqn.to_owned(),
        });
    }
    Ok(())
}

impl Default for TargetConfig {
    fn default() -> TargetConfig {
        TargetConfig::new(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 4420)))
    }
}

/// One NVM subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsystemConfig {
    /// Its NQN (unique; not the discovery NQN).
    pub nqn: String,
    /// Its namespaces.
    pub namespaces: Vec<NamespaceConfig>,
    /// Host NQNs allowed to connect; empty: any host.
    pub allowed_hosts: Vec<String>,
    /// Serial number (Identify SN, at most 20 ASCII bytes).
    pub serial: String,
    /// Model number (Identify MN, at most 40 ASCII bytes).
    pub model: String,
}

/// One namespace of a subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceConfig {
    /// Namespace id (1..0xFFFFFFFE, unique in the subsystem).
    pub nsid: u32,
    /// Backing block device, file or NVMe char device (opened by the transport side).
    pub path: PathBuf,
    /// UUID reported in the namespace ID descriptors; derived when `None`.
    pub uuid: Option<[u8; 16]>,
    /// NGUID reported in Identify Namespace; derived when `None`.
    pub nguid: Option<[u8; 16]>,
}

impl NamespaceConfig {
    /// The UUID: the configured one, else a stable RFC 9562 version-8 UUID derived from
    /// (subsystem NQN, nsid), so a restart reports the same identity and two namespaces
    /// never share one (the local drive's own IDs are never copied).
    pub fn effective_uuid(&self, subsys_nqn: &str) -> [u8; 16] {
        self.uuid.unwrap_or_else(|| {
            let mut u = derive_id(b"uuid", subsys_nqn, self.nsid);
            u[6] = (u[6] & 0x0f) | 0x80; // version 8 (custom)
            u[8] = (u[8] & 0x3f) | 0x80; // RFC variant
            u
        })
    }

    /// The NGUID: the configured one, else derived from (subsystem NQN, nsid).
    pub fn effective_nguid(&self, subsys_nqn: &str) -> [u8; 16] {
        self.nguid
            .unwrap_or_else(|| derive_id(b"nguid", subsys_nqn, self.nsid))
    }
}

/// 128 stable bits from a domain tag, an NQN and an nsid: two FNV-1a 64 passes with
/// different offsets (not cryptographic; only needs to be stable and well spread).
fn derive_id(domain: &[u8], nqn: &str, nsid: u32) -> [u8; 16] {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut out = [0u8; 16];
    for (half, basis) in [0xcbf2_9ce4_8422_2325u64, 0x6c62_272e_07bb_0142]
        .iter()
        .enumerate()
    {
        let mut h = *basis;
        let nsid_le = nsid.to_le_bytes();
        let bytes = domain
            .iter()
            .chain([0u8].iter())
            .chain(nqn.as_bytes())
            .chain([0u8].iter())
            .chain(nsid_le.iter());
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        // Final avalanche so nearby nsids differ in every byte.
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        out[half * 8..half * 8 + 8].copy_from_slice(&h.to_be_bytes());
    }
    out
}

/// A configuration problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An NQN is empty, too long or holds a NUL.
    #[error("bad NQN {nqn:?}: must be 1..=223 bytes without NUL")]
    BadNqn {
        /// The NQN.
        nqn: String,
    },
    /// A subsystem uses the discovery NQN.
    #[error("the discovery NQN {DISCOVERY_NQN} cannot name an NVM subsystem")]
    ReservedNqn,
    /// Two subsystems share an NQN.
    #[error("subsystem {nqn} is configured twice")]
    DuplicateSubsystem {
        /// The NQN.
        nqn: String,
    },
    /// A namespace id is 0 or a broadcast value.
    #[error("subsystem {nqn}: namespace id {nsid} is not usable (1..=0xfffffffd)")]
    BadNsid {
        /// Subsystem.
        nqn: String,
        /// Nsid.
        nsid: u32,
    },
    /// Two namespaces of a subsystem share an id.
    #[error("subsystem {nqn}: namespace id {nsid} is configured twice")]
    DuplicateNsid {
        /// Subsystem.
        nqn: String,
        /// Nsid.
        nsid: u32,
    },
    /// In-capsule data size out of range.
    #[error("inline_data_size {got} must be a multiple of 16 and at most 16384")]
    InlineDataSize {
        /// The value.
        got: u32,
    },
    /// Some other limit is out of range.
    #[error("invalid limit: {what}")]
    Limit {
        /// Which rule.
        what: &'static str,
    },
    /// A configured namespace has no [`super::NamespaceInfo`] (or one names an unknown
    /// subsystem or namespace).
    #[error("subsystem {nqn} namespace {nsid}: {what}")]
    NamespaceInfo {
        /// Subsystem.
        nqn: String,
        /// Nsid.
        nsid: u32,
        /// What is wrong.
        what: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subsys(nqn: &str) -> SubsystemConfig {
        SubsystemConfig {
            nqn: nqn.into(),
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                path: "/dev/null".into(),
                uuid: None,
                nguid: None,
            }],
            allowed_hosts: vec![],
            serial: "sn".into(),
            model: "model".into(),
        }
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let ns = &subsys("nqn.a").namespaces[0];
        assert_eq!(ns.effective_uuid("nqn.a"), ns.effective_uuid("nqn.a"));
        assert_ne!(ns.effective_uuid("nqn.a"), ns.effective_uuid("nqn.b"));
        assert_ne!(ns.effective_nguid("nqn.a"), ns.effective_uuid("nqn.a"));
        let ns2 = NamespaceConfig {
            nsid: 2,
            ..ns.clone()
        };
        assert_ne!(ns.effective_nguid("nqn.a"), ns2.effective_nguid("nqn.a"));
        assert_eq!(ns.effective_uuid("nqn.a")[6] >> 4, 8);
        let fixed = NamespaceConfig {
            uuid: Some([7; 16]),
            ..ns.clone()
        };
        assert_eq!(fixed.effective_uuid("nqn.a"), [7; 16]);
    }

    #[test]
    fn validation_rejects_bad_configs() {
        let mut c = TargetConfig::default();
        c.subsystems.push(subsys("nqn.a"));
        assert_eq!(c.validate(), Ok(()));
        let mut d = c.clone();
        d.subsystems.push(subsys("nqn.a"));
        assert!(matches!(
            d.validate(),
            Err(ConfigError::DuplicateSubsystem { .. })
        ));
        let mut d = c.clone();
        let dup = d.subsystems[0].namespaces[0].clone();
        d.subsystems[0].namespaces.push(dup);
        assert!(matches!(
            d.validate(),
            Err(ConfigError::DuplicateNsid { nsid: 1, .. })
        ));
        let mut d = c.clone();
        d.subsystems[0].nqn = DISCOVERY_NQN.into();
        assert_eq!(d.validate(), Err(ConfigError::ReservedNqn));
        let mut d = c.clone();
        d.inline_data_size = 100;
        assert!(matches!(
            d.validate(),
            Err(ConfigError::InlineDataSize { got: 100 })
        ));
        let mut d = c.clone();
        d.busy_poll = std::time::Duration::from_secs(1);
        assert_eq!(d.validate(), Ok(()));
        d.busy_poll = std::time::Duration::from_micros(1_000_001);
        assert!(matches!(d.validate(), Err(ConfigError::Limit { .. })));
        let mut d = c.clone();
        d.mdts_bytes = 3 << 12;
        assert!(matches!(d.validate(), Err(ConfigError::Limit { .. })));
        let mut d = c;
        d.subsystems[0].nqn = "x".repeat(224);
        assert!(matches!(d.validate(), Err(ConfigError::BadNqn { .. })));
    }
}
