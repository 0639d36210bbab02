//! Where peerpipe gets its memory: p2pmem providers (`/dev/p2pmemN` and sysfs
//! `p2pmem/allocate`), PCI distance, and buffer pools with host-memory fallback.
//!
//! - [`discover`] finds providers; [`Topology`] judges the PCI path between a provider and
//!   each client ([`clients`]: NVMe controllers, RDMA devices) like the kernel's
//!   `pci_p2pdma_distance()`;
//! - [`Pool`] maps chunks of provider (or host) memory once and hands out [`Buffer`]s from
//!   them; chunks are the unit of registration;
//! - [`Prober`] tests what the memory can be used for on this machine;
//! - [`AlignedBuf`] is owned, aligned host memory on the heap: the one aligned host buffer
//!   the io_uring and RDMA crates share.
//!
//! Everything that reads sysfs takes a [`SysRoot`], so it runs on recorded trees in tests.
//!
//! Every item has one path, at the crate root. The modules behind it (private): `provider`
//! (discovery), `topology` (PCI paths, ACS, verdicts), `mapping` (mmap of provider memory),
//! `pool` (chunks, buddies, counters, the `Buffer` handle), `probe` (capability probes),
//! `aligned` (`AlignedBuf`), `error`, `sysfs` and `buddy` (helpers).
//!
//! ```no_run
//! use peerpipe_p2p_alloc::{clients, discover, Placement, Pool, SysRoot, Topology};
//! # fn main() -> peerpipe_p2p_alloc::Result<()> {
//! let root = SysRoot::live();
//! let provider = discover(&root)?.into_iter().next().expect("no p2pmem provider");
//! let topo = Topology::new(&root);
//! for client in clients(&root) {
//!     let v = topo.verdict(&provider.pci, &client);
//!     println!("{} -> {}: {} ({})", provider.pci, client.name, v.map.name(), v.explain());
//! }
//! let pool = Pool::builder(Placement::P2pPreferred)
//!     .provider(provider)
//!     .chunk_size(4 << 20)
//!     .on_new_chunk(|c| {
//!         // Register the chunk once (RDMA MR, io_uring buffer) here.
//!         println!("chunk {} at {:#x}, {} bytes", c.id, c.addr, c.len);
//!         Ok(())
//!     })
//!     .build()?;
//! let mut buf = pool.alloc(64 << 10)?;
//! buf.as_mut_slice()[0] = 1;
//! println!("{:?} in chunk {}", buf.provider(), buf.chunk_id());
//! # Ok(()) }
//! ```

mod aligned;
mod buddy;
mod error;
mod mapping;
mod pool;
mod probe;
mod provider;
mod sysfs;
mod topology;

pub use aligned::{AlignedBuf, PAGE_ALIGN};
pub use error::{Errno, Error, Result};
pub use mapping::{Backing, Mapping};
pub use pool::{Buffer, ChunkHook, ChunkInfo, HookError, Placement, Pool, PoolBuilder, PoolStats};
pub use probe::{errno_name, Cell, Check, Outcome, ProbeReport, Prober, PROBE_LEN};
pub use provider::{discover, Interface, Provider};
pub use sysfs::SysRoot;
pub use topology::{
    clients, Acs, Client, ClientKind, MapType, PciChain, PciNode, Reason, Topology, Verdict,
};
