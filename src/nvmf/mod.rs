//! `peerpipe::nvmf`: a userspace NVMe over Fabrics (RDMA) target for the Linux kernel's own
//! `nvme-rdma` host (`nvme discover` / `nvme connect`, then the block device).
//!
//! # Two halves
//!
//! - The **core** (this module's [`wire`], [`status`], [`config`] and the controller state
//!   machine, [`TargetCore`] / [`QueueCore`]) decides everything the NVMe-oF protocol
//!   decides: which Connect creates which controller, what properties and Identify data say,
//!   which features are granted, which log pages exist, and whether an I/O command is valid
//!   (namespace, LBA range, MDTS, SGL type and length). It does no I/O and is tested on the
//!   host by driving it with byte-exact SQEs (`tests/nvmf_core.rs`).
//! - The **transport** (`transport/`, `backend.rs`, `server.rs`) owns the devices: the
//!   rdma_cm listener, one RC QP per queue with receive buffers of 64 + inline bytes, RDMA
//!   READ/WRITE of host data into p2p-alloc buffers, SEND of completions, and namespace
//!   backends. It carries out the core's [`Action`]s and trusts its checks.
//!
//! # The flow of one queue
//!
//! 1. rdma_cm connect request: [`CmRequest::parse`] the private data, then
//!    [`TargetCore::admit`]; on error reject with [`CmReject::encode`]. Else create a
//!    [`QueueCore::new`], post at least `hsqsize + 1` receives, accept with
//!    [`cm_accept_data`].
//! 2. Each received capsule: [`Command::parse`] the first 64 bytes, pass the rest as
//!    `in_capsule` to [`QueueCore::on_command`], and act:
//!    - [`Action::Complete`]: SEND [`Completion::encode`].
//!    - [`Action::FetchData`]: RDMA READ `len` bytes from the command's keyed SGL, then
//!      [`QueueCore::on_data`] (used for Connect data and DSM range lists; in-capsule data
//!      is consumed by the core itself and never produces `FetchData`).
//!    - [`Action::ReturnData`]: RDMA WRITE `data` to the keyed SGL, then SEND the completion.
//!    - [`Action::Io`]: run the [`IoOp`] on namespace `nsid` of subsystem `subsystem`
//!      (Write: RDMA READ the keyed SGL or take the in-capsule bytes first; Read: RDMA WRITE
//!      the data to the keyed SGL after the drive read), then SEND
//!      [`QueueCore::on_io_done`]'s completion.
//!    - [`Action::Hold`]: nothing (an Async Event Request waits for an event).
//! 3. Periodically call [`TargetCore::expired`]: tear down every queue of those controllers.
//! 4. On disconnect, [`QueueCore::on_disconnect`] (the admin queue's frees its controller).
//!
//! # What the Linux 6.12 host expects (and the core provides)
//!
//! Connect on qid 0 with 1024 bytes of Connect data fetched by RDMA READ, the cntlid in the
//! result; Property Get CAP (MQES, CQR, TO, CSS NVM, MPSMIN 0), Set CC (EN -> CSTS.RDY), VS
//! 1.3; Identify Controller with the Connect cntlid, KAS != 0, IOCCSZ >= 4, IORCSZ 1, SGLS
//! keyed (bit 2) and offset (bit 20), ICDOFF 0; Set Features Number of Queues (the grant is
//! enforced at I/O-queue Connect; until the host sets it the grant is `max_io_queues`); I/O
//! queue Connect naming the cntlid; Keep Alive (any command refreshes the timer); Identify
//! CNS 2/3/0 (CNS 3 is mandatory at VS 1.3: NGUID + UUID descriptors, derived stably from
//! the subsystem NQN and nsid, never copied from the backing drive); Read/Write/Flush/Write
//! Zeroes/DSM; CC.SHN -> CSTS.SHST complete. Discovery (`nqn.2014-08.org.nvmexpress.discovery`)
//! serves Identify (CNTRLTYPE 2) and Get Log Page 0x70 honouring offset and length.
//!
//! # Notes for the transport (changes against the first published contract)
//!
//! - [`IoCommand`] carries `subsystem`, the index of the subsystem in
//!   [`TargetConfig::subsystems`]: nsids are per subsystem.
//! - A Flush may name nsid `0xFFFFFFFF`: flush every namespace of the subsystem.
//! - [`TargetCore::admit`] checks the connect request against the listener limits;
//!   [`TargetCore::inline_data_size`] sizes I/O receive buffers (64 + inline bytes).
//! - `on_io_done` takes a positive errno (a negative one is accepted too).

pub mod backend;
pub mod config;
mod ctrl;
pub mod server;
pub mod status;
pub mod transport;
pub mod wire;

pub use config::{ConfigError, NamespaceConfig, SubsystemConfig, TargetConfig, DISCOVERY_NQN};
pub use ctrl::{Action, IoCommand, IoOp, NamespaceInfo, QueueCore, TargetCore, TargetStats};
pub use status::Status;
pub use wire::{
    cm_accept_data, CmReject, CmRequest, Command, Completion, Sgl, WireError, CQE_LEN, SQE_LEN,
};
