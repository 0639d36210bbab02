//! peerpipe: zero-copy storage pipelines over PCI peer-to-peer memory.
//!
//! Data moves NVMe -> p2pmem (an NVMe Controller Memory Buffer exposed by the kernel's
//! p2pdma) -> RDMA NIC -> remote p2pmem -> remote NVMe without touching host DRAM.
//!
//! The workspace is layered:
//! - [`peerpipe_p2p_alloc`]: p2pmem discovery, PCI distance and buffer allocation (bottom);
//! - [`peerpipe_rdma`] and [`peerpipe_uring`]: RDMA verbs/rdma_cm and io_uring NVMe
//!   passthrough, beside each other and unaware of each other;
//! - this crate: the pipeline that ties them together.

pub use peerpipe_p2p_alloc as p2p_alloc;
pub use peerpipe_rdma as rdma;
pub use peerpipe_uring as uring;
pub mod info;
pub mod nvmf;
pub mod pipeline;
pub mod protocol;
