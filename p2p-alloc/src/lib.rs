//! Where peerpipe gets its memory: p2pmem providers (`/dev/p2pmemN` and sysfs
//! `p2pmem/allocate`), PCI distance, and buffer pools with host-memory fallback.
//!
//! - [`provider::discover`] finds providers; [`topology::Topology`] judges the PCI path
//!   between a provider and each client (NVMe controller, RDMA device) like the kernel's
//!   `pci_p2pdma_distance()`;
//! - [`pool::Pool`] maps chunks of provider (or host) memory once and hands out
//!   [`pool::Buffer`]s from them; chunks are the unit of registration;
//! - [`probe::Prober`] tests what the memory can be used for on this machine;
//! - [`AlignedBuf`] is owned, aligned host memory on the heap: the one aligned host buffer
//!   the io_uring and RDMA crates share.
//!
//! Everything that reads sysfs takes a [`SysRoot`], so it runs on recorded trees in tests.
//!
//! ```no_run
//! use peerpipe_p2p_alloc::{discover, topology, Placement, Pool, SysRoot, Topology};
//! # fn main() -> peerpipe_p2p_alloc::Result<()> {
//! let root = SysRoot::live();
//! let provider = discover(&root)?.into_iter().next().expect("no p2pmem provider");
//! let topo = Topology::new(&root);
//! for client in topology::clients(&root) {
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
pub mod error;
pub mod mapping;
pub mod pool;
pub mod probe;
pub mod provider;
mod sysfs;
pub mod topology;

pub use aligned::{AlignedBuf, PAGE_ALIGN};
pub use error::{Errno, Error, Result};
pub use mapping::{Backing, Mapping};
pub use pool::{Buffer, ChunkInfo, Placement, Pool, PoolBuilder, PoolStats};
pub use probe::{Cell, Outcome, ProbeReport, Prober};
pub use provider::{discover, Interface, Provider};
pub use sysfs::SysRoot;
pub use topology::{Acs, Client, ClientKind, MapType, Reason, Topology, Verdict};
