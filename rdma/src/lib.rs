//! Safe RDMA verbs and rdma_cm for peerpipe, over the system libibverbs/librdmacm
//! (raw layer: `rdma-sys`; no own bindings were needed).
//!
//! * [`Context`]: devices, ports, GID tables, limits.
//! * [`ProtectionDomain`], [`MemoryRegion`] (any caller memory, least-privilege [`Access`]),
//!   [`MemoryWindow`] (type 2).
//! * [`CompletionQueue`] (busy/batch poll, or event-driven via [`CompletionChannel`]).
//! * [`Listener`] / [`Connector`] → [`Connection`] (an RC [`QueuePair`] set up by rdma_cm).
//! * [`SendRequest`] / [`RecvRequest`] posted in chains; [`SharedReceiveQueue`].
//!
//! Where things live (private modules; every item is exported once, here): `device` (contexts,
//! attributes), `pd`, `mr` (regions, [`RemoteBuf`], [`Sge`]), `mw`, `access`, `wr` (work
//! requests), `cq` (CQs, channels, completions), `qp` (queue pairs, SRQs, posting), `inflight`
//! (what posted work requests hold until reaped: recorded by `qp`, released by `cq`), `cm`
//! (rdma_cm: `event`, `id`, `params`, `connector`, `listener`, `connection`), `fd` (non-blocking
//! fds and readiness waits), `error`. Edges point one way: `cm` builds on `qp`, `cq`, `fd`;
//! `qp` on `cq`, `inflight` and the id it lives on (`cm::id`); `cq` on `inflight` and `fd`.
//!
//! Ownership: objects are reference counted internally (a QP holds its PD/CQs, an MR its PD,
//! a PD its device), so they may be dropped in any order; teardown errors are logged with
//! `tracing`. A posted work request holds its buffers until its completion is reaped.
//!
//! # Capability probe: register some memory
//! ```no_run
//! use peerpipe_rdma::{Access, Context, MemoryKind, MemoryRegion, ProtectionDomain};
//! # fn probe(ptr: *mut u8, len: usize) -> peerpipe_rdma::Result<()> {
//! let ctx = Context::open("rxe0")?;
//! let pd = ProtectionDomain::new(&ctx)?;
//! // SAFETY: the caller keeps ptr..ptr+len mapped until `mr` is dropped.
//! let mr = unsafe { MemoryRegion::register_raw(&pd, ptr, len, Access::remote_rw(), MemoryKind::Peer) };
//! match mr {
//!     Ok(_) => println!("registration works"),
//!     Err(e @ peerpipe_rdma::Error::PeerMemoryNotPinnable { .. }) => println!("{e}"),
//!     Err(e) => println!("other failure, errno {:?}: {e}", e.errno()),
//! }
//! # Ok(()) }
//! ```

mod access;
mod cm;
mod cq;
mod device;
mod error;
mod fd;
mod inflight;
mod mr;
mod mw;
mod pd;
mod qp;
mod wr;

pub use access::{Access, WindowAccess};
pub use cm::{CmEvent, CmEventKind, ConnParams, ConnectRequest, Connection, Connector, Listener};
pub use cq::{
    Completion, CompletionChannel, CompletionQueue, CqId, WcOpcode, EMPTY as EMPTY_COMPLETION,
};
pub use device::{
    device_names, mtu_bytes, Context, DeviceAttributes, GidEntry, GidType, PortAttributes,
    PortState, RXE_VENDOR_ID,
};
pub use error::{Errno, Error, MemoryKind, PeerMemoryCause, Result, WcStatus};
pub use mr::{MemoryRegion, RemoteBuf, Sge};
pub use mw::MemoryWindow;
pub use pd::ProtectionDomain;
pub use qp::{QpCaps, QpInit, QueuePair, SharedReceiveQueue};
pub use wr::{RecvRequest, SendOp, SendRequest};
