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
//! - Connect on qid 0 with 1024 bytes of Connect data fetched by RDMA READ; the new
//!   controller's cntlid in result bits 15:0; KATO from cdw12 (0: no keep-alive).
//! - Property Get CAP (MQES = `queue_depth_max - 1`, CQR, TO 7.5 s, CSS NVM without the
//!   CSI bit, MPSMIN 0), Set CC (EN -> CSTS.RDY, or CSTS.CFS for queue entry sizes other
//!   than 64/16), VS 1.3, and at shutdown CC.SHN -> CSTS.SHST complete.
//! - Identify Controller: the Connect cntlid, KAS 10 (1 s), IOCCSZ (64 + inline) / 16,
//!   IORCSZ 1, SGLS keyed (bit 2) and offset (bit 20), ICDOFF 0, MSDBD 1, MDTS, NN, ONCS
//!   and VWC from the namespaces, CMIC multi-controller, CNTRLTYPE 1 (2 for discovery).
//! - Set Features Number of Queues: grants min(requested, `max_io_queues`); the grant is
//!   enforced at I/O-queue Connect (until the host sets it, the grant is `max_io_queues`).
//! - I/O queue Connect naming the cntlid (connect data, and the rdma_cm private data in
//!   6.12), the same host NQN / host id / subsystem NQN, a qid within the grant.
//! - Keep Alive every KATO / 2; any command refreshes the timer here.
//! - Scan: Identify CNS 2, CNS 3 (mandatory at VS 1.3: NGUID + UUID descriptors, derived
//!   stably from the subsystem NQN and nsid, never copied from the backing drive), CNS 0;
//!   CNS 6 with CSI 0 (the NVM controller structure: all zero, no limits beyond MDTS).
//! - Read / Write (FUA passed on) / Flush / Write Zeroes / DSM deallocate.
//! - Discovery (`nqn.2014-08.org.nvmexpress.discovery`): Identify (CNTRLTYPE 2) and Get Log
//!   Page 0x70 honouring offset and length, listing only subsystems the host may use.
//!
//! # What the core decides on bad input
//!
//! Every refusal is an NVMe status with DNR (except Namespace Not Ready from `EAGAIN` /
//! `EBUSY`): commands before Connect or before CC.EN -> Command Sequence Error; unknown
//! opcodes, admin opcodes on I/O queues and I/O opcodes on the admin queue -> Invalid
//! Opcode; an SGL that is neither keyed nor offset (or PSDT != 01b) -> SGL Descriptor Type
//! Invalid; a length that differs from the command's -> Data SGL Length Invalid; in-capsule
//! data past the inline size -> SGL Offset Invalid; an unknown nsid -> Invalid Namespace;
//! blocks past the end -> LBA Out of Range; more than MDTS -> Invalid Field; Connect errors
//! -> Connect Invalid Parameters / Invalid Host with IATTR/IPO in the result, as nvmet
//! reports them. A malformed rdma_cm request is rejected before any queue exists.
//!
//! # Notes for the transport (changes against the first published contract)
//!
//! - [`IoCommand`] carries `subsystem`, the index of the subsystem in
//!   [`TargetConfig::subsystems`]: nsids are per subsystem.
//! - A Flush may name nsid `0xFFFFFFFF`: flush every namespace of the subsystem.
//! - [`TargetCore::admit`] checks the connect request against the listener limits;
//!   [`TargetCore::inline_data_size`] sizes I/O receive buffers (64 + inline bytes).
//! - `on_io_done` takes an [`IoFailure`]: an errno (positive; a negative one is accepted
//!   too), or the NVMe status of a passthrough device, passed on to the host as it was.
//! - [`IoCommand::fua`]: a Write with Force Unit Access must be durable at completion.
//! - [`TargetConfig::listen`] is also what discovery log entries advertise (TRADDR,
//!   TRSVCID): listen on a concrete address, not `0.0.0.0`, when serving discovery.

pub mod backend;
pub mod config;
mod ctrl;
pub mod server;
pub mod status;
pub mod transport;
pub mod wire;

pub use config::{
    ConfigError, NamespaceConfig, SubsystemConfig, TargetConfig, BUSY_POLL_DEFAULT, DISCOVERY_NQN,
};
pub use ctrl::{Action, IoCommand, IoOp, NamespaceInfo, QueueCore, TargetCore, TargetStats};
pub use status::{IoFailure, Status};
pub use wire::{
    cm_accept_data, CmReject, CmRequest, Command, Completion, Sgl, WireError, CQE_LEN, SQE_LEN,
};
