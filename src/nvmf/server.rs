//! The NVMe-oF target as a whole: opens the namespace backends, builds the controller core
//! and the buffer pool, listens, and serves until told to stop.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use peerpipe::nvmf::server::Target;
//! use peerpipe::nvmf::{NamespaceConfig, SubsystemConfig, TargetConfig};
//! # fn main() -> Result<(), peerpipe::nvmf::server::TargetError> {
//! let mut cfg = TargetConfig::new("10.77.0.2:4420".parse().unwrap());
//! cfg.subsystems.push(SubsystemConfig {
//!     nqn: "nqn.2026-11.io.peerpipe:demo".into(),
//!     namespaces: vec![NamespaceConfig { nsid: 1, path: "/dev/nvme2n1".into(), uuid: None, nguid: None }],
//!     allowed_hosts: Vec::new(),
//!     serial: "peerpipe0".into(),
//!     model: "peerpipe".into(),
//! });
//! let target = Target::new(cfg)?;
//! println!("buffers: {}", target.buffers());
//! target.serve(&AtomicBool::new(false))?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::nvmf::backend::{Backend, BackendError, IoRequest, PoolBuf, QueueIo};
use crate::nvmf::transport::{self, Shared, TransportError};
use crate::nvmf::{ConfigError, IoFailure, NamespaceInfo, TargetConfig, TargetCore, TargetStats};
use crate::p2p_alloc::{self as alloc, Placement, Pool};
use crate::rdma::{self, Access, Context, Listener, MemoryKind, MemoryRegion, ProtectionDomain};

/// Why the target could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// A namespace backend could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The buffer pool could not be built.
    #[error("{what}: {source}")]
    Buffers {
        /// What was being done.
        what: String,
        /// The allocator's error.
        source: alloc::Error,
    },
    /// p2pmem buffers were required but are not usable here.
    #[error("p2p buffers: {0}")]
    NoP2pMem(String),
    /// The RDMA listener failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Where data buffers come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BufferChoice {
    /// p2pmem when a provider's memory can be registered with the RDMA devices and every
    /// backend can read into it, else host memory.
    #[default]
    Auto,
    /// p2pmem or fail.
    P2p,
    /// Host memory.
    Host,
}

impl FromStr for BufferChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<BufferChoice, String> {
        match s {
            "auto" => Ok(BufferChoice::Auto),
            "p2p" => Ok(BufferChoice::P2p),
            "host" => Ok(BufferChoice::Host),
            v => Err(format!("{v:?}: use p2p, host or auto")),
        }
    }
}

/// The buffer memory in use and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferInfo {
    /// True for p2pmem.
    pub p2p: bool,
    /// Why (the provider, or why host memory).
    pub reason: String,
}

impl fmt::Display for BufferInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.p2p { "p2p" } else { "host" };
        write!(f, "{kind} ({})", self.reason)
    }
}

/// A listening NVMe-oF target.
pub struct Target {
    listener: Listener,
    shared: Arc<Shared>,
    buffers: BufferInfo,
    listen: SocketAddr,
    namespaces: Vec<String>,
}

/// The pool's chunk size: a power of two holding the largest transfer and at least 4 MiB.
fn chunk_size(cfg: &TargetConfig) -> usize {
    (cfg.mdts_bytes as usize)
        .max(cfg.inline_data_size as usize)
        .next_power_of_two()
        .max(4 << 20)
}

/// Host memory the pool may map at most.
const HOST_POOL_MAX: u64 = 1 << 30;

fn host_pool(cfg: &TargetConfig, reason: String) -> Result<(Pool, BufferInfo), TargetError> {
    let pool = Pool::builder(Placement::HostOnly)
        .chunk_size(chunk_size(cfg))
        .max_host_bytes(HOST_POOL_MAX)
        .build()
        .map_err(|source| TargetError::Buffers {
            what: "host buffer pool".into(),
            source,
        })?;
    Ok((pool, BufferInfo { p2p: false, reason }))
}

/// Registers `buf` with every RDMA device (what each queue will do with every chunk).
fn registers_everywhere(buf: &alloc::Buffer) -> Result<(), String> {
    let names = rdma::device_names().map_err(|e| format!("listing RDMA devices: {e}"))?;
    for name in names {
        let ctx = Context::open(&name).map_err(|e| format!("{name}: {e}"))?;
        let pd = ProtectionDomain::new(&ctx).map_err(|e| format!("{name}: {e}"))?;
        // SAFETY: `buf` stays allocated (and its chunk mapped) until after this region is
        // dropped at the end of this iteration.
        let mr = unsafe {
            MemoryRegion::register_raw(
                &pd,
                buf.addr(),
                buf.len(),
                Access::local_read().local_write(),
                MemoryKind::Peer,
            )
        };
        mr.map_err(|e| format!("registering p2pmem with {name}: {e}"))?;
    }
    Ok(())
}

/// Reads the first block of every backend into a buffer of `pool` (what a host read does).
fn backends_read_into(pool: &Pool, backends: &[Arc<Backend>]) -> Result<(), String> {
    for b in backends {
        let what = |e: String| format!("reading {} into p2pmem: {e}", b.path().display());
        let mut io = QueueIo::new(std::slice::from_ref(b), 4).map_err(|e| what(e.to_string()))?;
        let buf = pool
            .alloc(b.geometry().lba_size as usize)
            .map_err(|e| what(e.to_string()))?;
        let req = IoRequest::Read {
            offset: 0,
            buf: PoolBuf::new(buf),
        };
        let result = match io.submit(0, req, 0) {
            Err(d) => d.result,
            Ok(()) => {
                let mut done = Vec::new();
                io.ring()
                    .wait_timeout(1, Duration::from_secs(30), &mut done)
                    .map_err(|e| what(e.to_string()))?;
                match done.pop().and_then(QueueIo::done) {
                    Some(d) => d.result,
                    None => Err(IoFailure::Errno(libc::ETIMEDOUT)),
                }
            }
        };
        result.map_err(|f| what(f.to_string()))?;
    }
    Ok(())
}

/// A p2pmem pool, if a provider has a char device, its memory registers with the RDMA
/// devices and every backend can read into it; `Err(reason)` otherwise.
fn p2p_pool(
    cfg: &TargetConfig,
    backends: &[Arc<Backend>],
) -> Result<Result<(Pool, BufferInfo), String>, TargetError> {
    let providers =
        alloc::discover(&alloc::SysRoot::live()).map_err(|source| TargetError::Buffers {
            what: "p2pmem discovery".into(),
            source,
        })?;
    // ibv_reg_mr works on the char device interface only.
    let Some(p) = providers.into_iter().find(|p| p.chardev.is_some()) else {
        return Ok(Err(
            "no p2pmem provider with a /dev/p2pmemN char device".into()
        ));
    };
    let via = p
        .chardev
        .as_ref()
        .map(|c| c.display().to_string())
        .unwrap_or_default();
    let reason = format!("p2pmem of {} via {via}", p.pci);
    let pool = match Pool::builder(Placement::P2pRequired)
        .provider(p)
        .interface(alloc::Interface::CharDev)
        .chunk_size(chunk_size(cfg))
        .build()
    {
        Ok(pool) => pool,
        Err(e) => return Ok(Err(format!("{reason}: {e}"))),
    };
    let probe = match pool.alloc(4096) {
        Ok(b) => b,
        Err(e) => return Ok(Err(format!("{reason}: {e}"))),
    };
    if let Err(e) = registers_everywhere(&probe) {
        return Ok(Err(e));
    }
    drop(probe);
    if let Err(e) = backends_read_into(&pool, backends) {
        return Ok(Err(e));
    }
    Ok(Ok((pool, BufferInfo { p2p: true, reason })))
}

impl Target {
    /// Opens everything with [`BufferChoice::Auto`] and starts listening.
    ///
    /// # Errors
    /// As [`Target::with_buffers`].
    pub fn new(cfg: TargetConfig) -> Result<Target, TargetError> {
        Target::with_buffers(cfg, BufferChoice::Auto)
    }

    /// Validates `cfg`, opens every namespace backend, builds the core and the buffer pool
    /// (`buffers`), and binds the rdma_cm listener.
    ///
    /// # Errors
    /// [`TargetError::Config`], [`TargetError::Backend`] (a path that cannot be opened, EBUSY
    /// for a mounted block device), [`TargetError::NoP2pMem`] (p2p asked for and unusable),
    /// [`TargetError::Buffers`], [`TargetError::Transport`] (EADDRNOTAVAIL when no RDMA device
    /// has the address, EADDRINUSE).
    pub fn with_buffers(cfg: TargetConfig, buffers: BufferChoice) -> Result<Target, TargetError> {
        cfg.validate()?;
        let mut backends = Vec::new();
        let mut infos = Vec::new();
        let mut map = HashMap::new();
        let mut names = Vec::new();
        for (si, s) in cfg.subsystems.iter().enumerate() {
            for n in &s.namespaces {
                let b = Backend::open(&n.path)?;
                let g = b.geometry();
                infos.push((
                    s.nqn.clone(),
                    NamespaceInfo {
                        nsid: n.nsid,
                        lba_size: g.lba_size,
                        blocks: g.blocks,
                        volatile_write_cache: g.volatile_write_cache,
                        supports_deallocate: g.supports_deallocate,
                        supports_write_zeroes: g.supports_write_zeroes,
                    },
                ));
                names.push(format!(
                    "{} nsid {} = {} ({}, {} x {} B, write cache: {})",
                    s.nqn,
                    n.nsid,
                    n.path.display(),
                    b.kind(),
                    g.blocks,
                    g.lba_size,
                    g.cache_source
                ));
                map.insert((si, n.nsid), backends.len());
                backends.push(Arc::new(b));
            }
        }
        let core = TargetCore::new(&cfg, infos)?;
        let (pool, info) = match buffers {
            BufferChoice::Host => host_pool(&cfg, "asked for".into())?,
            BufferChoice::P2p => p2p_pool(&cfg, &backends)?.map_err(TargetError::NoP2pMem)?,
            BufferChoice::Auto => match p2p_pool(&cfg, &backends)? {
                Ok(p) => p,
                Err(why) => host_pool(&cfg, format!("p2pmem not usable: {why}"))?,
            },
        };
        let listener = transport::listen(cfg.listen)?;
        let listen = listener.local_addr().unwrap_or(cfg.listen);
        Ok(Target {
            listener,
            shared: Arc::new(Shared::new(core, backends, map, pool, cfg.busy_poll)),
            buffers: info,
            listen,
            namespaces: names,
        })
    }

    /// The bound address (with the port picked when 0 was configured).
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Which buffer memory is used, and why.
    pub fn buffers(&self) -> &BufferInfo {
        &self.buffers
    }

    /// One line per namespace: subsystem, nsid, path, backend, size, write cache source.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Payload bytes the CPU copied so far (the zero-copy design keeps this at 0).
    pub fn copied_bytes(&self) -> u64 {
        self.shared.stats().copied_bytes.load(Ordering::Relaxed)
    }

    /// Bytes moved by RDMA READ (host writes) and RDMA WRITE (host reads).
    pub fn rdma_bytes(&self) -> (u64, u64) {
        let s = self.shared.stats();
        (
            s.rdma_read_bytes.load(Ordering::Relaxed),
            s.rdma_write_bytes.load(Ordering::Relaxed),
        )
    }

    /// Busy polls that found work and busy polls that ran out of budget
    /// ([`TargetConfig::busy_poll`]); both 0 when busy polling is off.
    pub fn busy_polls(&self) -> (u64, u64) {
        let s = self.shared.stats();
        (
            s.busy_poll_hits.load(Ordering::Relaxed),
            s.busy_poll_misses.load(Ordering::Relaxed),
        )
    }

    /// The controller core's counters.
    pub fn core_stats(&self) -> TargetStats {
        self.shared.core.stats()
    }

    /// Serves hosts until `stop` is set; then disconnects every host and waits for the
    /// queues to close.
    ///
    /// # Errors
    /// [`TargetError::Transport`] when the listener's device goes away.
    pub fn serve(&self, stop: &AtomicBool) -> Result<(), TargetError> {
        transport::serve(&self.listener, &self.shared, stop)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_choices_parse_and_chunks_hold_the_largest_transfer() {
        assert_eq!("p2p".parse(), Ok(BufferChoice::P2p));
        assert_eq!("host".parse(), Ok(BufferChoice::Host));
        assert_eq!("auto".parse(), Ok(BufferChoice::Auto));
        assert!("gpu".parse::<BufferChoice>().unwrap_err().contains("gpu"));
        let mut cfg = TargetConfig::default();
        assert_eq!(chunk_size(&cfg), 4 << 20);
        cfg.mdts_bytes = 16 << 20;
        assert_eq!(chunk_size(&cfg), 16 << 20);
    }

    #[test]
    fn a_missing_namespace_fails_before_anything_listens() {
        let mut cfg = TargetConfig::new("127.0.0.1:0".parse().unwrap());
        cfg.subsystems.push(crate::nvmf::SubsystemConfig {
            nqn: "nqn.2026-11.io.peerpipe:test".into(),
            namespaces: vec![crate::nvmf::NamespaceConfig {
                nsid: 1,
                path: "/nonexistent/peerpipe-ns".into(),
                uuid: None,
                nguid: None,
            }],
            allowed_hosts: Vec::new(),
            serial: "s".into(),
            model: "m".into(),
        });
        match Target::with_buffers(cfg, BufferChoice::Host) {
            Err(TargetError::Backend(BackendError::Open { path, .. })) => {
                assert_eq!(path, std::path::Path::new("/nonexistent/peerpipe-ns"))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a target without its namespace started"),
        }
    }
}
