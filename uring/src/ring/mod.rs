//! The ring: one io_uring with 128-byte SQEs and 32-byte CQEs that carries NVMe passthrough
//! commands, O_DIRECT file I/O and polls of foreign fds. Operations own their buffers from
//! submission until their completion is reaped.
//!
//! Where things live:
//! - `mod.rs` (here): [`Ring`] itself, its settings and its drop (which waits for the
//!   kernel), [`OpKind`], [`Completion`], [`PollId`].
//! - `builder.rs`: [`RingBuilder`], the setup flags and the fallback when the kernel refuses
//!   one, recorded in [`Capabilities`].
//! - `target.rs`: the target table ([`TargetId`], `add_namespace`/`add_file`), each target's
//!   transfer rules, and which file its SQEs name.
//! - `sqe.rs`: [`FileRef`] (plain fd or registered-file index) and the encoding of every
//!   operation into an SQE ([`uring_cmd_sqe`] for NVMe passthrough).
//! - `registry.rs`: the fixed-buffer registry (`register_buffer(s)`, `unregister_buffers`).
//! - `slots.rs`: the slot table: what each operation in flight owns and how its CQEs add up.
//! - `submit.rs`: queueing SQEs, [`Ring::submit`], and the operations that own buffers
//!   (read, write, readv, writev, raw NVMe commands), refused with a
//!   [`Rejected`](crate::Rejected).
//! - `commands.rs`: the operations without data buffers (flush, fsync, write zeroes,
//!   deallocate, polls of foreign fds).
//! - `complete.rs`: waiting and reaping (the `io_uring_enter` calls that produce
//!   completions, draining them into the slot table).

mod builder;
mod commands;
mod complete;
mod registry;
mod slots;
mod sqe;
mod submit;
mod target;

pub use builder::RingBuilder;
pub use sqe::{uring_cmd_sqe, FileRef};
pub use target::TargetId;

use crate::buf::{AlignedBuf, Buffers, IoBuf};
use crate::capability::Capabilities;
use crate::error::Result;
use io_uring::{cqueue, opcode, squeue, IoUring};
use registry::Registry;
use slots::SlotTable;
use target::TargetTable;

type Sqe = squeue::Entry128;
type Cqe = cqueue::Entry32;

/// user_data of SQEs whose completions the ring consumes itself (cancels, poll removals).
const INTERNAL: u64 = u64::MAX;

/// Identifies an armed poll, for [`Ring::poll_remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PollId(u32);

/// What an operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read into one buffer.
    Read,
    /// Write from one buffer.
    Write,
    /// Vectored read.
    Readv,
    /// Vectored write.
    Writev,
    /// NVMe Flush / fdatasync.
    Flush,
    /// NVMe Flush / fsync.
    Fsync,
    /// NVMe Write Zeroes / fallocate(ZERO_RANGE).
    WriteZeroes,
    /// NVMe Dataset Management deallocate / fallocate(PUNCH_HOLE).
    Deallocate,
    /// A raw NVMe command.
    Nvme,
    /// A poll of a foreign fd.
    Poll,
}

impl OpKind {
    /// The operation's name in errors.
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Readv => "readv",
            OpKind::Writev => "writev",
            OpKind::Flush => "flush",
            OpKind::Fsync => "fsync",
            OpKind::WriteZeroes => "write zeroes",
            OpKind::Deallocate => "deallocate",
            OpKind::Nvme => "nvme command",
            OpKind::Poll => "poll",
        }
    }
}

/// A finished operation, with the buffers it owned.
#[derive(Debug)]
pub struct Completion<B> {
    /// The caller's tag given at submission.
    pub tag: u64,
    /// What the operation was.
    pub kind: OpKind,
    /// Bytes transferred (reads may be short on files), 0 for commands without data, the
    /// ready events for polls; or the error with its errno/NVMe status.
    pub result: Result<usize>,
    /// The NVMe command result (completion dwords 0-1 from the big CQE), passthrough only.
    pub cmd_result: u64,
    /// For multishot polls: more completions will follow for this poll.
    pub more: bool,
    /// The buffers the operation owned: one for reads, writes and raw commands with data,
    /// all of them in order for vectored operations, none otherwise.
    pub bufs: Buffers<B>,
}

/// An io_uring for NVMe passthrough, file I/O and polls; `B` is the buffer type operations
/// own (use `Box<dyn IoBuf>` to mix kinds).
///
/// Use a ring from one thread (it is set up with SINGLE_ISSUER when the kernel allows).
/// Queue operations, then [`Ring::submit`] (or [`Ring::wait`], which submits too) sends all
/// queued SQEs in one system call.
pub struct Ring<B: IoBuf = AlignedBuf> {
    // Field order is drop order: the io_uring goes first, then what operations owned.
    uring: IoUring<Sqe, Cqe>,
    slots: SlotTable<B>,
    targets: TargetTable,
    registry: Registry,
    caps: Capabilities,
    check_alignment: bool,
    submit_batch: usize,
    spin: std::time::Duration,
    file_max_transfer: usize,
}

// SAFETY: the raw pointers a Ring holds (iovec arrays in slots) point only into buffers the
// ring itself owns, so moving the ring with its buffers to another thread is sound when the
// buffers may move (`B: Send`). A ring set up with SINGLE_ISSUER then answers EEXIST on the
// new thread (an error, not undefined behaviour).
unsafe impl<B: IoBuf + Send> Send for Ring<B> {}

impl Ring<AlignedBuf> {
    /// A builder (`build::<B>()` picks the buffer type; `B` is inferred from the binding).
    pub fn builder() -> RingBuilder {
        RingBuilder::default()
    }
}

impl<B: IoBuf> Ring<B> {
    /// A ring with the default settings (see [`RingBuilder`]).
    ///
    /// # Errors
    ///
    /// As [`RingBuilder::build`].
    pub fn new() -> Result<Self> {
        RingBuilder::default().build()
    }
    /// What the kernel granted.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    /// Operations in flight (queued or submitted, not yet reaped).
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }
    /// Most operations in flight at once.
    pub fn capacity(&self) -> usize {
        self.slots.capacity()
    }
    /// Submits automatically once `n` SQEs are queued (0, the default: only on
    /// [`Ring::submit`]/[`Ring::wait`]). `1` sends each operation to the device as soon as
    /// it is queued: on devices that serve requests one after another (virtio-blk, QEMU NVMe)
    /// this keeps them busier than a batch that is dispatched only after the whole batch was
    /// prepared, at the price of one system call per operation.
    pub fn set_submit_batch(&mut self, n: usize) {
        self.submit_batch = n;
    }
    /// Busy-polls for completions for up to `spin` in [`Ring::wait`] before sleeping in the
    /// kernel (default zero: sleep at once). Spinning avoids the wake-up latency of a sleeping
    /// thread (large in VMs, where an idle vCPU halts) at the cost of burning a CPU while
    /// waiting.
    pub fn set_spin(&mut self, spin: std::time::Duration) {
        self.spin = spin;
    }
    /// Turns the buffer alignment checks off (they refuse buffers the kernel would bounce or
    /// reject). Only for observing what the kernel does with misaligned buffers; memory
    /// safety checks stay on.
    pub fn set_alignment_checks(&mut self, on: bool) {
        self.check_alignment = on;
    }

    /// Splits file reads/writes into parts of at most `bytes` (default 1 GiB, below the
    /// kernel's per-call limit); rounded down to a multiple of 4096, at least 4096.
    pub fn set_file_max_transfer(&mut self, bytes: usize) {
        self.file_max_transfer = (bytes & !4095).clamp(4096, 1 << 30);
    }
}

impl<B: IoBuf> Drop for Ring<B> {
    /// Waits for every operation in flight (cancelling polls) so no buffer is freed while
    /// the kernel or a device may still use it; if waiting fails, the buffers are leaked
    /// rather than freed.
    fn drop(&mut self) {
        if self.in_flight() == 0 {
            return;
        }
        let polls: Vec<u32> = self.slots.live_polls().collect();
        for s in polls {
            let sqe: Sqe = opcode::AsyncCancel::new(u64::from(s))
                .build()
                .user_data(INTERNAL)
                .into();
            let _ = self.push(&sqe);
        }
        let mut sink = Vec::new();
        while self.in_flight() > 0 {
            if let Err(e) = self.enter_getevents(1) {
                tracing::error!(error = %e, in_flight = self.in_flight(), "cannot wait for in-flight I/O while dropping the ring: leaking its buffers");
                self.slots.leak();
                return;
            }
            self.drain(&mut sink);
            sink.clear();
        }
    }
}
