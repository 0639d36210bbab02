//! The ring: one io_uring with 128-byte SQEs and 32-byte CQEs that carries NVMe passthrough
//! commands, O_DIRECT file I/O and polls of foreign fds. Operations own their buffers from
//! submission until their completion is reaped.

use crate::abi;
use crate::buf::{AlignedBuf, IoBuf};
use crate::capability::{Capabilities, Feature};
use crate::cmd::{dsm_ranges, Direction, NvmeCommand};
use crate::error::{Error, Rejected, Result};
use crate::file::FileTarget;
use crate::namespace::{Namespace, NamespaceInfo};
use crate::status::NvmeStatus;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

type Sqe = squeue::Entry128;
type Cqe = cqueue::Entry32;

/// user_data of SQEs whose completions the ring consumes itself (cancels, poll removals).
const INTERNAL: u64 = u64::MAX;

/// Distinguishes rings so a [`TargetId`] of one ring is refused by another.
static NEXT_RING_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Identifies a target (namespace or file) added to a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetId(u32, u32);

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
    fn name(self) -> &'static str {
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

/// A finished operation, with the buffer(s) it owned.
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
    /// The buffer of a single-buffer operation.
    pub buf: Option<B>,
    /// The buffers of a vectored operation.
    pub bufs: Vec<B>,
}

#[derive(Debug, Clone)]
enum TargetKind {
    Nvme(Box<NamespaceInfo>),
    File {
        size: u64,
        is_block: bool,
        offset_align: u32,
        mem_align: u32,
    },
}

struct Target {
    id: u32,
    fd: OwnedFd,
    /// The controller char device, for admin commands (namespaces only).
    admin_fd: Option<OwnedFd>,
    registered: bool,
    writable: bool,
    kind: TargetKind,
}

impl Target {
    fn nsid(&self) -> Option<u32> {
        match &self.kind {
            TargetKind::Nvme(i) => Some(i.nsid),
            TargetKind::File { .. } => None,
        }
    }
}

struct Slot<B> {
    live: bool,
    tag: u64,
    kind: OpKind,
    parts: u32,
    bytes: usize,
    nvme: bool,
    error: Option<Error>,
    cmd_result: u64,
    buf: Option<B>,
    bufs: Vec<B>,
    aux: Option<AlignedBuf>,
    iov: Vec<libc::iovec>,
}

impl<B> Slot<B> {
    fn empty() -> Self {
        Slot {
            live: false,
            tag: 0,
            kind: OpKind::Read,
            parts: 0,
            bytes: 0,
            nvme: false,
            error: None,
            cmd_result: 0,
            buf: None,
            bufs: Vec::new(),
            aux: None,
            iov: Vec::new(),
        }
    }
}

/// Builds a [`Ring`]: every feature is optional and falls back when the kernel says no (see
/// [`Ring::capabilities`]).
#[derive(Debug, Clone)]
pub struct RingBuilder {
    entries: u32,
    iopoll: bool,
    sqpoll: Option<u32>,
    coop_taskrun: bool,
    single_issuer: bool,
    defer_taskrun: bool,
    file_slots: u32,
    buffer_slots: u32,
}

impl Default for RingBuilder {
    fn default() -> Self {
        RingBuilder {
            entries: 128,
            iopoll: false,
            sqpoll: None,
            coop_taskrun: true,
            single_issuer: true,
            defer_taskrun: true,
            file_slots: 16,
            buffer_slots: 64,
        }
    }
}

impl RingBuilder {
    /// Submission queue size (power of two; the completion queue is twice that). Also the
    /// most operations in flight at once.
    pub fn entries(mut self, n: u32) -> Self {
        self.entries = n.max(2);
        self
    }
    /// Completion by polling (IOPOLL): lowest latency, but only for O_DIRECT block/NVMe I/O on
    /// devices with poll queues (`nvme.poll_queues`); polls of foreign fds and file
    /// fsync/fallocate are then refused.
    pub fn iopoll(mut self, on: bool) -> Self {
        self.iopoll = on;
        self
    }
    /// A kernel thread polls the submission queue (SQPOLL), idling after `idle_ms`.
    pub fn sqpoll(mut self, idle_ms: Option<u32>) -> Self {
        self.sqpoll = idle_ms;
        self
    }
    /// COOP_TASKRUN + SINGLE_ISSUER + DEFER_TASKRUN (default on): cheaper completions, but
    /// the ring must then be used from one thread (the first that submits).
    pub fn single_thread_hints(mut self, on: bool) -> Self {
        self.coop_taskrun = on;
        self.single_issuer = on;
        self.defer_taskrun = on;
        self
    }
    /// IORING_SETUP_COOP_TASKRUN alone (see [`RingBuilder::single_thread_hints`]).
    pub fn coop_taskrun(mut self, on: bool) -> Self {
        self.coop_taskrun = on;
        self
    }
    /// IORING_SETUP_SINGLE_ISSUER alone.
    pub fn single_issuer(mut self, on: bool) -> Self {
        self.single_issuer = on;
        self
    }
    /// IORING_SETUP_DEFER_TASKRUN alone (needs SINGLE_ISSUER; not with SQPOLL).
    pub fn defer_taskrun(mut self, on: bool) -> Self {
        self.defer_taskrun = on;
        self
    }
    /// How many targets can use registered files (0 disables registered files).
    pub fn file_slots(mut self, n: u32) -> Self {
        self.file_slots = n;
        self
    }
    /// How many buffers can be registered (0 disables fixed buffers).
    pub fn buffer_slots(mut self, n: u32) -> Self {
        self.buffer_slots = n;
        self
    }

    /// Creates the ring, probing each feature.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `io_uring_setup` when even a plain SQE128/CQE32 ring cannot be created:
    /// ENOSYS/EPERM (io_uring disabled, e.g. `kernel.io_uring_disabled` or a seccomp
    /// filter), EINVAL (kernel older than 5.19), ENOMEM (memlock limit).
    pub fn build<B: IoBuf>(&self) -> Result<Ring<B>> {
        let mut want = [
            self.iopoll,
            self.sqpoll.is_some(),
            self.coop_taskrun,
            self.single_issuer,
            self.defer_taskrun && self.sqpoll.is_none(),
        ];
        let mut refused = [None::<i32>; 5];
        // Drop flags one at a time, the most exotic first, until the kernel accepts.
        let drop_order = [4usize, 3, 2, 1, 0];
        let mut next_drop = 0;
        let uring = loop {
            let mut b = IoUring::<Sqe, Cqe>::builder();
            if want[0] {
                b.setup_iopoll();
            }
            if want[1] {
                b.setup_sqpoll(self.sqpoll.unwrap_or(0));
            }
            if want[2] {
                b.setup_coop_taskrun();
            }
            if want[3] {
                b.setup_single_issuer();
            }
            if want[4] {
                b.setup_defer_taskrun();
            }
            match b.build(self.entries) {
                Ok(u) => break u,
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                    while next_drop < drop_order.len() && !want[drop_order[next_drop]] {
                        next_drop += 1;
                    }
                    if next_drop == drop_order.len() {
                        return Err(Error::Os {
                            op: "io_uring_setup (SQE128/CQE32)",
                            errno,
                        });
                    }
                    let i = drop_order[next_drop];
                    want[i] = false;
                    refused[i] = Some(errno);
                }
            }
        };
        let feat = |asked: bool, on: bool, refused: Option<i32>| match (asked, on, refused) {
            (_, true, _) => Feature::On,
            (true, false, Some(e)) => Feature::Unavailable(e),
            _ => Feature::Off,
        };
        let mut probe = io_uring::Probe::new();
        let probed = uring.submitter().register_probe(&mut probe).is_ok();
        let has = |code: u8| probed && probe.is_supported(code);
        let mut caps = Capabilities {
            uring_cmd: has(abi::IORING_OP_URING_CMD),
            poll_add: has(opcode::PollAdd::CODE),
            iopoll: feat(self.iopoll, want[0], refused[0]),
            sqpoll: feat(self.sqpoll.is_some(), want[1], refused[1]),
            coop_taskrun: feat(self.coop_taskrun, want[2], refused[2]),
            single_issuer: feat(self.single_issuer, want[3], refused[3]),
            defer_taskrun: feat(self.defer_taskrun, want[4], refused[4]),
            registered_files: Feature::Off,
            fixed_buffers: Feature::Off,
            unregistered_buffers: Vec::new(),
            sq_entries: uring.params().sq_entries(),
            cq_entries: uring.params().cq_entries(),
        };
        if self.file_slots > 0 {
            caps.registered_files = match uring.submitter().register_files_sparse(self.file_slots) {
                Ok(()) => Feature::On,
                Err(e) => Feature::Unavailable(e.raw_os_error().unwrap_or(libc::EINVAL)),
            };
        }
        if self.buffer_slots > 0 {
            caps.fixed_buffers = match uring.submitter().register_buffers_sparse(self.buffer_slots)
            {
                Ok(()) => trial_fixed_buffer(&uring),
                Err(e) => Feature::Unavailable(e.raw_os_error().unwrap_or(libc::EINVAL)),
            };
        }
        let max_ops = uring.params().sq_entries() as usize;
        let mut slots = Vec::with_capacity(max_ops);
        slots.resize_with(max_ops, Slot::empty);
        Ok(Ring {
            uring,
            slots,
            free: (0..max_ops as u32).rev().collect(),
            targets: Vec::new(),
            file_slots: self.file_slots,
            buffer_slots: self.buffer_slots,
            registered: Vec::new(),
            caps,
            check_alignment: true,
            submit_batch: 0,
            spin: std::time::Duration::ZERO,
            ring_id: NEXT_RING_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            file_max_transfer: 1 << 30,
            pending_cqes: 0,
        })
    }
}

/// Registers one page at slot 0 and clears it again: proves fixed buffers work here.
fn trial_fixed_buffer(uring: &IoUring<Sqe, Cqe>) -> Feature {
    let mut page = AlignedBuf::new(4096);
    let iov = [libc::iovec {
        iov_base: page.as_mut_ptr().cast(),
        iov_len: page.len(),
    }];
    // SAFETY: the page stays alive until the slot is cleared right below.
    let r = unsafe { uring.submitter().register_buffers_update(0, &iov, None) };
    let clear = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    // SAFETY: an empty iovec clears the slot; nothing references the page afterwards.
    let _ = unsafe { uring.submitter().register_buffers_update(0, &clear, None) };
    match r {
        Ok(()) => Feature::On,
        Err(e) => Feature::Unavailable(e.raw_os_error().unwrap_or(libc::EINVAL)),
    }
}

/// An io_uring for NVMe passthrough, file I/O and polls; `B` is the buffer type operations
/// own (use `Box<dyn IoBuf>` to mix kinds).
///
/// Use a ring from one thread (it is set up with SINGLE_ISSUER when the kernel allows).
/// Queue operations, then [`Ring::submit`] (or [`Ring::wait`], which submits too) sends all
/// queued SQEs in one system call.
pub struct Ring<B: IoBuf = AlignedBuf> {
    uring: IoUring<Sqe, Cqe>,
    slots: Vec<Slot<B>>,
    free: Vec<u32>,
    targets: Vec<Target>,
    file_slots: u32,
    buffer_slots: u32,
    /// Registered buffers: (start, end, index).
    registered: Vec<(usize, usize, u16)>,
    caps: Capabilities,
    check_alignment: bool,
    submit_batch: usize,
    spin: std::time::Duration,
    ring_id: u32,
    file_max_transfer: usize,
    /// CQEs still expected for live operations (polls count one each).
    pending_cqes: usize,
}

// SAFETY: the raw pointers a Ring holds (iovec arrays in slots) point only into buffers the
// ring itself owns, so moving the ring with its buffers to another thread is sound when the
// buffers may move (`B: Send`). A ring set up with SINGLE_ISSUER then answers EEXIST on the
// new thread (an error, not undefined behaviour).
unsafe impl<B: IoBuf + Send> Send for Ring<B> {}

macro_rules! with_fd {
    ($t:expr, $fd:ident => $e:expr) => {
        if $t.0 {
            let $fd = types::Fixed($t.1 as u32);
            $e
        } else {
            let $fd = types::Fd($t.1);
            $e
        }
    };
}

/// Parameters of one read/write part.
struct Part {
    offset: u64,
    addr: *mut u8,
    len: usize,
}

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
        self.slots.len() - self.free.len()
    }
    /// Most operations in flight at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
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

    fn add_target(
        &mut self,
        fd: OwnedFd,
        admin_fd: Option<OwnedFd>,
        writable: bool,
        kind: TargetKind,
    ) -> Result<TargetId> {
        let id = self.targets.len() as u32;
        let mut registered = false;
        if self.caps.registered_files == Feature::On && id < self.file_slots {
            registered = self
                .uring
                .submitter()
                .register_files_update(id, &[fd.as_raw_fd()])
                .is_ok();
        }
        let tid = TargetId(id, self.ring_id);
        self.targets.push(Target {
            id,
            fd,
            admin_fd,
            registered,
            writable,
            kind,
        });
        Ok(tid)
    }

    /// Adds a namespace (the ring keeps its own duplicate of the fd).
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `dup` (EMFILE); [`Error::Unsupported`] when the kernel has no
    /// `IORING_OP_URING_CMD` (older than 5.19).
    pub fn add_namespace(&mut self, ns: &Namespace) -> Result<TargetId> {
        if !self.caps.uring_cmd {
            return Err(Error::unsupported(
                "add namespace",
                "this kernel has no IORING_OP_URING_CMD (needs 5.19+): use FileTarget on the block device",
            ));
        }
        let fd = ns
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::from_io("dup", &e))?;
        let admin = ns
            .controller_file()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::from_io("dup", &e))?;
        self.add_target(
            fd,
            Some(admin),
            ns.writable(),
            TargetKind::Nvme(Box::new(ns.info().clone())),
        )
    }

    /// Adds a file or block device (the ring keeps its own duplicate of the fd).
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `dup` (EMFILE).
    pub fn add_file(&mut self, f: &FileTarget) -> Result<TargetId> {
        let fd = f
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::from_io("dup", &e))?;
        self.add_target(
            fd,
            None,
            f.writable(),
            TargetKind::File {
                size: f.size(),
                is_block: f.is_block_device(),
                offset_align: f.offset_align(),
                mem_align: f.mem_align(),
            },
        )
    }

    /// Registers `len` bytes at `addr` as a fixed buffer; later operations whose buffer lies
    /// inside it use it automatically (`READ_FIXED`/`WRITE_FIXED`, `IORING_URING_CMD_FIXED`).
    /// When registration fails the memory keeps working unregistered, and the failure is
    /// listed in [`Capabilities::unregistered_buffers`].
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `io_uring_register_buffers` with the kernel's errno: EREMOTEIO for a
    /// `/dev/p2pmem0` mapping, EFAULT for a sysfs p2pmem `allocate` mapping or a bad address,
    /// ENOMEM over RLIMIT_MEMLOCK; [`Error::Unsupported`] when fixed buffers are unavailable
    /// or all slots are used.
    ///
    /// # Safety
    ///
    /// The memory must stay mapped, and must not be freed and reused for anything else,
    /// until [`Ring::unregister_buffers`] or the ring is dropped.
    pub unsafe fn register_buffer(&mut self, addr: *mut u8, len: usize) -> Result<u16> {
        const OP: &str = "io_uring_register_buffers";
        if self.caps.fixed_buffers != Feature::On {
            return Err(Error::unsupported(
                OP,
                "fixed buffers are unavailable on this ring",
            ));
        }
        let idx = self.registered.len() as u32;
        if idx >= self.buffer_slots {
            return Err(Error::unsupported(
                OP,
                format!(
                    "all {} buffer slots used: raise RingBuilder::buffer_slots",
                    self.buffer_slots
                ),
            ));
        }
        let iov = [libc::iovec {
            iov_base: addr.cast(),
            iov_len: len,
        }];
        // SAFETY: the caller keeps the memory valid while registered.
        let r = unsafe {
            self.uring
                .submitter()
                .register_buffers_update(idx, &iov, None)
        };
        match r {
            Ok(()) => {
                self.registered
                    .push((addr as usize, addr as usize + len, idx as u16));
                Ok(idx as u16)
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                self.caps
                    .unregistered_buffers
                    .push((addr as usize, len, errno));
                Err(Error::Os { op: OP, errno })
            }
        }
    }

    /// Registers several regions as fixed buffers, in order (see [`Ring::register_buffer`]);
    /// returns their indices. Stops at the first region the kernel refuses: the regions
    /// before it stay registered, the refused one is listed in
    /// [`Capabilities::unregistered_buffers`] and keeps working unregistered.
    ///
    /// # Errors
    ///
    /// As [`Ring::register_buffer`]: [`Error::Os`] `io_uring_register_buffers` carrying the
    /// errno (EREMOTEIO for `/dev/p2pmem0` mappings, EFAULT for sysfs p2pmem `allocate`
    /// mappings on current kernels, ENOMEM over RLIMIT_MEMLOCK).
    ///
    /// # Safety
    ///
    /// As [`Ring::register_buffer`], for every region.
    pub unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> Result<Vec<u16>> {
        let mut out = Vec::with_capacity(regions.len());
        for &(addr, len) in regions {
            // SAFETY: forwarded from the caller.
            out.push(unsafe { self.register_buffer(addr, len) }?);
        }
        Ok(out)
    }

    /// Drops all buffer registrations.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] while operations are in flight (they may use the buffers).
    pub fn unregister_buffers(&mut self) -> Result<()> {
        if self.in_flight() > 0 {
            return Err(Error::invalid(
                "unregister buffers",
                "operations are in flight: reap them first",
            ));
        }
        let clear = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        for &(_, _, idx) in &self.registered {
            // SAFETY: an empty iovec clears the slot.
            unsafe {
                self.uring
                    .submitter()
                    .register_buffers_update(idx as u32, &[clear], None)
                    .map_err(|e| Error::from_io("io_uring_register_buffers", &e))?;
            }
        }
        self.registered.clear();
        Ok(())
    }

    fn fixed_index(&self, addr: usize, len: usize) -> Option<u16> {
        self.registered
            .iter()
            .find(|&&(s, e, _)| addr >= s && addr + len <= e)
            .map(|&(_, _, i)| i)
    }

    fn target(&self, op: &'static str, t: TargetId) -> Result<&Target> {
        let found = self
            .targets
            .get(t.0 as usize)
            .filter(|_| t.1 == self.ring_id);
        found.ok_or_else(|| {
            Error::invalid(
                op,
                "unknown target: use the id add_namespace/add_file returned on this ring",
            )
        })
    }

    fn alloc_slot(&mut self, op: &'static str) -> Result<u32> {
        self.free.pop().ok_or(Error::RingFull {
            op,
            in_flight: self.slots.len(),
        })
    }

    fn release_slot(&mut self, i: u32) -> Slot<B> {
        self.free.push(i);
        std::mem::replace(&mut self.slots[i as usize], Slot::empty())
    }

    /// Pushes one SQE, flushing the submission queue to the kernel when it is full.
    fn push(&mut self, sqe: &Sqe) -> Result<()> {
        loop {
            // SAFETY: every SQE built by this ring points only at memory owned by a live
            // slot (buffer, aux buffer, iovec array) that stays put until its CQE is reaped.
            let r = unsafe { self.uring.submission().push(sqe) };
            if r.is_ok() {
                return Ok(());
            }
            self.uring
                .submit()
                .map_err(|e| Error::from_io("io_uring_enter", &e))?;
        }
    }

    /// Checks a data transfer against the target's rules.
    fn check_rw(
        &self,
        op: &'static str,
        t: &Target,
        offset: u64,
        addr: usize,
        len: usize,
        write: bool,
    ) -> Result<()> {
        if len == 0 {
            return Err(Error::invalid(op, "zero-length transfer"));
        }
        if write && !t.writable {
            return Err(Error::invalid(
                op,
                "target opened read-only: open it writable",
            ));
        }
        match &t.kind {
            TargetKind::Nvme(info) => {
                let lba = u64::from(info.lba_size());
                if offset % lba != 0 || len as u64 % lba != 0 {
                    return Err(Error::invalid(
                        op,
                        format!("offset {offset} and length {len} must be multiples of the LBA size {lba}"),
                    ));
                }
                let end = offset.checked_add(len as u64);
                if end.map_or(true, |e| e > info.capacity()) {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "bytes {offset}..{} are outside the namespace ({} bytes, {} LBAs of {lba})",
                            offset.saturating_add(len as u64),
                            info.capacity(),
                            info.format.nlba
                        ),
                    ));
                }
                if self.check_alignment && addr % info.dma_alignment != 0 {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "buffer at {addr:#x} is not {}-byte aligned: the kernel would copy it \
                             through a bounce buffer (a silent CPU copy, e.g. out of p2pmem); use an aligned buffer",
                            info.dma_alignment
                        ),
                    ));
                }
            }
            TargetKind::File {
                offset_align,
                mem_align,
                size,
                is_block,
            } => {
                if *is_block && offset.checked_add(len as u64).map_or(true, |e| e > *size) {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "bytes {offset}..{} are outside the block device ({size} bytes)",
                            offset.saturating_add(len as u64)
                        ),
                    ));
                }
                let oa = u64::from(*offset_align);
                if self.check_alignment
                    && (offset % oa != 0 || len as u64 % oa != 0 || addr % *mem_align as usize != 0)
                {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "O_DIRECT needs offset ({offset}) and length ({len}) multiples of {oa} \
                             and the buffer address ({addr:#x}) a multiple of {mem_align}: use AlignedBuf"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn max_part(&self, t: &Target) -> usize {
        match &t.kind {
            TargetKind::Nvme(info) => info.max_transfer as usize,
            TargetKind::File { .. } => self.file_max_transfer,
        }
    }

    /// Splits file reads/writes into parts of at most `bytes` (default 1 GiB, below the
    /// kernel's per-call limit); rounded down to a multiple of 4096, at least 4096.
    pub fn set_file_max_transfer(&mut self, bytes: usize) {
        self.file_max_transfer = (bytes & !4095).clamp(4096, 1 << 30);
    }

    fn rw_sqe(&self, t: &Target, write: bool, p: &Part, fixed: Option<u16>) -> Sqe {
        let fdt = fd_of(self, t);
        match &t.kind {
            TargetKind::Nvme(info) => {
                let lba = u64::from(info.lba_size());
                let nlb = (p.len as u64 / lba) as u32;
                let mut c = if write {
                    NvmeCommand::write(info.nsid, p.offset / lba, nlb)
                } else {
                    NvmeCommand::read(info.nsid, p.offset / lba, nlb)
                };
                c.cmd.addr = p.addr as u64;
                c.cmd.data_len = p.len as u32;
                nvme_sqe(fdt, false, &c, fixed)
            }
            TargetKind::File { .. } => {
                let e: squeue::Entry = match (write, fixed) {
                    (false, None) => {
                        with_fd!(fdt, f => opcode::Read::new(f, p.addr, p.len as u32).offset(p.offset).build())
                    }
                    (true, None) => {
                        with_fd!(fdt, f => opcode::Write::new(f, p.addr, p.len as u32).offset(p.offset).build())
                    }
                    (false, Some(i)) => {
                        with_fd!(fdt, f => opcode::ReadFixed::new(f, p.addr, p.len as u32, i).offset(p.offset).build())
                    }
                    (true, Some(i)) => {
                        with_fd!(fdt, f => opcode::WriteFixed::new(f, p.addr, p.len as u32, i).offset(p.offset).build())
                    }
                };
                e.into()
            }
        }
    }

    /// Queues SQEs produced by `make(i)` for `n` parts of slot `s`. On a push failure the
    /// parts already queued keep the slot alive and it completes with that error.
    fn queue_parts(
        &mut self,
        s: u32,
        n: usize,
        mut make: impl FnMut(&Self, usize) -> Sqe,
    ) -> std::result::Result<(), Error> {
        for i in 0..n {
            let sqe = make(self, i).user_data(u64::from(s));
            if let Err(e) = self.push(&sqe) {
                if i == 0 {
                    return Err(e);
                }
                let slot = &mut self.slots[s as usize];
                slot.parts = i as u32;
                slot.error = Some(e);
                self.pending_cqes += i;
                return Ok(());
            }
        }
        self.slots[s as usize].parts = n as u32;
        self.pending_cqes += n;
        if self.submit_batch > 0 && self.uring.submission().len() >= self.submit_batch {
            // The SQEs are queued and owned by the slot: a failed enter leaves them queued
            // for the next submit/wait, which reports the error then. GETEVENTS also posts
            // completions that are ready (like fio's commit), so the next wait finds them.
            let _ = self.enter_getevents(0);
        }
        Ok(())
    }

    fn start_slot(&mut self, s: u32, tag: u64, kind: OpKind, nvme: bool) {
        let slot = &mut self.slots[s as usize];
        slot.live = true;
        slot.tag = tag;
        slot.kind = kind;
        slot.nvme = nvme;
        slot.bytes = 0;
        slot.error = None;
        slot.cmd_result = 0;
    }

    fn rw(
        &mut self,
        t: TargetId,
        offset: u64,
        mut buf: B,
        tag: u64,
        write: bool,
    ) -> Result<(), Rejected<B>> {
        let kind = if write { OpKind::Write } else { OpKind::Read };
        let op = kind.name();
        let addr = buf.as_mut_ptr();
        let len = buf.len();
        let prepared = (|| {
            let tg = self.target(op, t)?;
            self.check_rw(op, tg, offset, addr as usize, len, write)?;
            let (chunk, nvme) = (self.max_part(tg), tg.nsid().is_some());
            let s = self.alloc_slot(op)?;
            Ok((s, chunk, nvme))
        })();
        let (s, chunk, nvme) = match prepared {
            Ok(v) => v,
            Err(error) => {
                return Err(Rejected {
                    error,
                    buf: Some(buf),
                })
            }
        };
        let fixed = self.fixed_index(addr as usize, len);
        self.start_slot(s, tag, kind, nvme);
        self.slots[s as usize].buf = Some(buf);
        let n = len.div_ceil(chunk);
        let r = self.queue_parts(s, n, |ring, i| {
            let off = i * chunk;
            let p = Part {
                offset: offset + off as u64,
                // SAFETY: off < len, inside the buffer.
                addr: unsafe { addr.add(off) },
                len: chunk.min(len - off),
            };
            ring.rw_sqe(&ring.targets[t.0 as usize], write, &p, fixed)
        });
        if let Err(error) = r {
            let slot = self.release_slot(s);
            return Err(Rejected {
                error,
                buf: slot.buf,
            });
        }
        if nvme {
            // Passthrough completes with res 0: count the bytes up front.
            self.slots[s as usize].bytes = len;
        }
        Ok(())
    }

    /// Queues a read of `buf.len()` bytes at byte `offset` of target `t` into `buf`, split
    /// into several commands when larger than the namespace's max transfer. The buffer comes
    /// back in the [`Completion`]; reads of files may be short at end of file.
    ///
    /// # Errors
    ///
    /// Rejected before submission, with the buffer returned: [`Error::Invalid`] (unknown
    /// target, zero length, offset/length not multiples of the LBA size or DIO alignment,
    /// range beyond the namespace, misaligned buffer that would be bounced),
    /// [`Error::RingFull`] (reap first), [`Error::Os`] `io_uring_enter` when flushing a full
    /// submission queue failed.
    pub fn read(&mut self, t: TargetId, offset: u64, buf: B, tag: u64) -> Result<(), Rejected<B>> {
        self.rw(t, offset, buf, tag, false)
    }

    /// Queues a write of all of `buf` at byte `offset` of target `t`.
    ///
    /// # Errors
    ///
    /// As [`Ring::read`], plus [`Error::Invalid`] when the target was opened read-only.
    pub fn write(&mut self, t: TargetId, offset: u64, buf: B, tag: u64) -> Result<(), Rejected<B>> {
        self.rw(t, offset, buf, tag, true)
    }

    /// Queues a vectored read at byte `offset` into `bufs` in order (one command: the total
    /// must fit the max transfer). For NVMe, every buffer but the first must start on a 4 KiB
    /// boundary and every buffer but the last must end on one, or the kernel would bounce.
    ///
    /// # Errors
    ///
    /// As [`Ring::read`], plus [`Error::Invalid`] when the total exceeds the max transfer or
    /// buffer boundaries would make the kernel bounce; the buffers come back in `Err`.
    pub fn readv(
        &mut self,
        t: TargetId,
        offset: u64,
        bufs: Vec<B>,
        tag: u64,
    ) -> Result<(), (Error, Vec<B>)> {
        self.rwv(t, offset, bufs, tag, false)
    }

    /// Queues a vectored write from `bufs` in order at byte `offset`.
    ///
    /// # Errors
    ///
    /// As [`Ring::readv`].
    pub fn writev(
        &mut self,
        t: TargetId,
        offset: u64,
        bufs: Vec<B>,
        tag: u64,
    ) -> Result<(), (Error, Vec<B>)> {
        self.rwv(t, offset, bufs, tag, true)
    }

    fn rwv(
        &mut self,
        t: TargetId,
        offset: u64,
        mut bufs: Vec<B>,
        tag: u64,
        write: bool,
    ) -> Result<(), (Error, Vec<B>)> {
        let kind = if write { OpKind::Writev } else { OpKind::Readv };
        let op = kind.name();
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let prepared = (|| {
            let tg = self.target(op, t)?;
            if iov.is_empty() || iov.len() > 1024 {
                return Err(Error::invalid(op, "between 1 and 1024 buffers"));
            }
            // Whole-transfer rules (range, multiples, read-only) on the sum, address on each.
            self.check_rw(op, tg, offset, iov[0].iov_base as usize, total, write)?;
            if total > self.max_part(tg) {
                return Err(Error::invalid(
                    op,
                    format!(
                        "{total} bytes exceed the max transfer {}: split it into several calls",
                        self.max_part(tg)
                    ),
                ));
            }
            for (i, v) in iov.iter().enumerate() {
                let a = v.iov_base as usize;
                if v.iov_len == 0 {
                    return Err(Error::invalid(op, "empty buffer in the vector"));
                }
                if !self.check_alignment {
                    continue;
                }
                match &tg.kind {
                    TargetKind::Nvme(info) => {
                        let bad_start = i > 0 && a % 4096 != 0;
                        let bad_end = i + 1 < iov.len() && (a + v.iov_len) % 4096 != 0;
                        if a % info.dma_alignment != 0 || bad_start || bad_end {
                            return Err(Error::invalid(
                                op,
                                format!("buffer {i} at {a:#x}+{}: inner buffer boundaries must be 4 KiB aligned or the kernel bounces the data", v.iov_len),
                            ));
                        }
                    }
                    TargetKind::File {
                        offset_align,
                        mem_align,
                        ..
                    } => {
                        if a % *mem_align as usize != 0 || v.iov_len % *offset_align as usize != 0 {
                            return Err(Error::invalid(
                                op,
                                format!("buffer {i} at {a:#x}+{}: O_DIRECT needs addresses aligned to {mem_align} and lengths to {offset_align}", v.iov_len),
                            ));
                        }
                    }
                }
            }
            let nvme = tg.nsid().is_some();
            let s = self.alloc_slot(op)?;
            Ok((s, nvme))
        })();
        let (s, nvme) = match prepared {
            Ok(v) => v,
            Err(e) => return Err((e, bufs)),
        };
        self.start_slot(s, tag, kind, nvme);
        {
            let slot = &mut self.slots[s as usize];
            slot.iov = iov;
            slot.bufs = std::mem::take(&mut bufs);
        }
        let r = self.queue_parts(s, 1, |ring, _| {
            let tg = &ring.targets[t.0 as usize];
            let slot = &ring.slots[s as usize];
            let iovp = slot.iov.as_ptr();
            let n = slot.iov.len();
            let fdt = fd_of(ring, tg);
            match &tg.kind {
                TargetKind::Nvme(info) => {
                    let lba = u64::from(info.lba_size());
                    let nlb = (total as u64 / lba) as u32;
                    let mut c = if write {
                        NvmeCommand::write(info.nsid, offset / lba, nlb)
                    } else {
                        NvmeCommand::read(info.nsid, offset / lba, nlb)
                    };
                    c.cmd.addr = iovp as u64;
                    c.cmd.data_len = n as u32;
                    nvme_sqe(fdt, true, &c, None)
                }
                TargetKind::File { .. } => {
                    let e: squeue::Entry = if write {
                        with_fd!(fdt, f => opcode::Writev::new(f, iovp, n as u32).offset(offset).build())
                    } else {
                        with_fd!(fdt, f => opcode::Readv::new(f, iovp, n as u32).offset(offset).build())
                    };
                    e.into()
                }
            }
        });
        if let Err(e) = r {
            let slot = self.release_slot(s);
            return Err((e, slot.bufs));
        }
        if nvme {
            self.slots[s as usize].bytes = total;
        }
        Ok(())
    }

    fn no_data_op(
        &mut self,
        t: TargetId,
        tag: u64,
        kind: OpKind,
        make: impl Fn(&Self, &Target) -> Result<Vec<Sqe>>,
        aux: Option<AlignedBuf>,
    ) -> Result<()> {
        let op = kind.name();
        let tg = self.target(op, t)?;
        let sqes = make(self, tg)?;
        let nvme = tg.nsid().is_some();
        let s = self.alloc_slot(op)?;
        self.start_slot(s, tag, kind, nvme);
        self.slots[s as usize].aux = aux;
        let r = self.queue_parts(s, sqes.len(), |_, i| sqes[i].clone());
        if let Err(e) = r {
            self.release_slot(s);
            return Err(e);
        }
        Ok(())
    }

    fn no_fs_sync_on_iopoll(&self, op: &'static str, tg: &Target) -> Result<()> {
        if matches!(tg.kind, TargetKind::File { .. }) && self.caps.iopoll == Feature::On {
            return Err(Error::unsupported(
                op,
                "an IOPOLL ring cannot fsync/fallocate files: use a second ring without IOPOLL",
            ));
        }
        Ok(())
    }

    /// Queues a flush: NVMe Flush (makes the volatile write cache durable) or fdatasync.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] (unknown target), [`Error::Unsupported`] (file on an IOPOLL ring),
    /// [`Error::RingFull`], [`Error::Os`] `io_uring_enter`.
    pub fn flush(&mut self, t: TargetId, tag: u64) -> Result<()> {
        self.sync(t, tag, true)
    }

    /// Queues an fsync (files: data and metadata; NVMe: same as [`Ring::flush`]).
    ///
    /// # Errors
    ///
    /// As [`Ring::flush`].
    pub fn fsync(&mut self, t: TargetId, tag: u64) -> Result<()> {
        self.sync(t, tag, false)
    }

    fn sync(&mut self, t: TargetId, tag: u64, datasync: bool) -> Result<()> {
        let kind = if datasync {
            OpKind::Flush
        } else {
            OpKind::Fsync
        };
        self.no_data_op(
            t,
            tag,
            kind,
            |ring, tg| {
                ring.no_fs_sync_on_iopoll(kind.name(), tg)?;
                let fdt = fd_of(ring, tg);
                Ok(vec![match &tg.kind {
                    TargetKind::Nvme(info) => {
                        nvme_sqe(fdt, false, &NvmeCommand::flush(info.nsid), None)
                    }
                    TargetKind::File { .. } => {
                        let flags = if datasync {
                            types::FsyncFlags::DATASYNC
                        } else {
                            types::FsyncFlags::empty()
                        };
                        let e: squeue::Entry =
                            with_fd!(fdt, f => opcode::Fsync::new(f).flags(flags).build());
                        e.into()
                    }
                }])
            },
            None,
        )
    }

    /// Queues zeroing `len` bytes at `offset` (NVMe Write Zeroes, split at 65536 blocks;
    /// files: fallocate ZERO_RANGE|KEEP_SIZE).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for ranges outside the namespace, not LBA/DIO multiples, or a
    /// read-only target; [`Error::Unsupported`] when the controller lacks Write Zeroes (ONCS)
    /// or a file on an IOPOLL ring; [`Error::RingFull`].
    pub fn write_zeroes(&mut self, t: TargetId, offset: u64, len: u64, tag: u64) -> Result<()> {
        self.range_op(t, &[(offset, len)], tag, OpKind::WriteZeroes)
    }

    /// Queues deallocation (TRIM) of the byte ranges `(offset, len)`: NVMe Dataset Management
    /// with Deallocate (up to 256 ranges per command), files: fallocate PUNCH_HOLE|KEEP_SIZE.
    /// Deallocated blocks read back as zeroes on most devices (not guaranteed by NVMe).
    ///
    /// # Errors
    ///
    /// As [`Ring::write_zeroes`] (Unsupported when the controller lacks DSM).
    pub fn deallocate(&mut self, t: TargetId, ranges: &[(u64, u64)], tag: u64) -> Result<()> {
        self.range_op(t, ranges, tag, OpKind::Deallocate)
    }

    fn range_op(
        &mut self,
        t: TargetId,
        ranges: &[(u64, u64)],
        tag: u64,
        kind: OpKind,
    ) -> Result<()> {
        let op = kind.name();
        let tg = self.target(op, t)?;
        if ranges.is_empty() {
            return Err(Error::invalid(op, "no ranges"));
        }
        for &(off, len) in ranges {
            if len > usize::MAX as u64 {
                return Err(Error::invalid(op, "range too long"));
            }
            // The range checks of a write; address 0 passes the buffer alignment check.
            self.check_rw(op, tg, off, 0, len as usize, true)?;
        }
        let mut aux = None;
        let sqes = match &tg.kind {
            TargetKind::Nvme(info) => {
                let lba = u64::from(info.lba_size());
                let fdt = fd_of(self, tg);
                let mut v = Vec::new();
                if kind == OpKind::WriteZeroes {
                    if !info.controller.supports_write_zeroes() {
                        return Err(Error::unsupported(op, "the controller does not support Write Zeroes (ONCS bit 3): write a zeroed buffer instead"));
                    }
                    let (off, len) = ranges[0];
                    let mut b = off / lba;
                    let end = (off + len) / lba;
                    while b < end {
                        let n = (end - b).min(abi::MAX_NLB);
                        v.push(nvme_sqe(
                            fdt,
                            false,
                            &NvmeCommand::write_zeroes(info.nsid, b, n as u32, false),
                            None,
                        ));
                        b += n;
                    }
                } else {
                    if !info.controller.supports_dsm() {
                        return Err(Error::unsupported(
                            op,
                            "the controller does not support Dataset Management (ONCS bit 2)",
                        ));
                    }
                    let mut list = Vec::new();
                    for &(off, len) in ranges {
                        let mut b = off / lba;
                        let end = (off + len) / lba;
                        while b < end {
                            let n = (end - b).min(u64::from(u32::MAX));
                            list.push((b, n as u32));
                            b += n;
                        }
                    }
                    let mut buf = AlignedBuf::new(
                        list.len().div_ceil(abi::DSM_MAX_RANGES)
                            * abi::DSM_MAX_RANGES
                            * abi::DSM_RANGE_LEN,
                    );
                    for (ci, chunk) in list.chunks(abi::DSM_MAX_RANGES).enumerate() {
                        let base = ci * abi::DSM_MAX_RANGES * abi::DSM_RANGE_LEN;
                        let bytes = chunk.len() * abi::DSM_RANGE_LEN;
                        dsm_ranges(chunk, &mut buf[base..base + bytes]);
                        let mut c = NvmeCommand::deallocate(info.nsid, chunk.len() as u32);
                        // SAFETY: base is inside buf, which the slot owns until completion.
                        c.cmd.addr = unsafe { buf.as_mut_ptr().add(base) } as u64;
                        c.cmd.data_len = bytes as u32;
                        v.push(nvme_sqe(fdt, false, &c, None));
                    }
                    aux = Some(buf);
                }
                v
            }
            TargetKind::File { .. } => {
                self.no_fs_sync_on_iopoll(op, tg)?;
                let fdt = fd_of(self, tg);
                let mode = libc::FALLOC_FL_KEEP_SIZE
                    | if kind == OpKind::WriteZeroes {
                        libc::FALLOC_FL_ZERO_RANGE
                    } else {
                        libc::FALLOC_FL_PUNCH_HOLE
                    };
                ranges
                    .iter()
                    .map(|&(off, len)| {
                        let e: squeue::Entry = with_fd!(fdt, f => opcode::Fallocate::new(f, len).offset(off).mode(mode).build());
                        e.into()
                    })
                    .collect()
            }
        };
        self.no_data_op(t, tag, kind, move |_, _| Ok(sqes.clone()), aux)
    }

    /// Queues a raw NVMe command (power users); admin commands go to the namespace's
    /// controller device (`/dev/nvmeX`), I/O commands to the namespace. With a buffer, `cmd.addr` is set to it and
    /// `cmd.data_len` defaults to its length (a smaller nonzero `data_len` is kept); no range
    /// or size checks are made, so the controller's status comes back as [`Error::Nvme`].
    /// The command result (DW0/DW1) is in [`Completion::cmd_result`].
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] (with the buffer returned) when the target is not a namespace,
    /// `cmd.addr`/`cmd.metadata` are nonzero (they would let the device write arbitrary
    /// memory), or `data_len` exceeds the buffer; [`Error::RingFull`].
    pub fn nvme_command(
        &mut self,
        t: TargetId,
        mut c: NvmeCommand,
        mut buf: Option<B>,
        tag: u64,
    ) -> Result<(), Rejected<B>> {
        const OP: &str = "nvme command";
        let checked = (|| {
            let tg = self.target(OP, t)?;
            if tg.nsid().is_none() {
                return Err(Error::invalid(
                    OP,
                    "raw NVMe commands need a namespace target",
                ));
            }
            if c.cmd.addr != 0 || c.cmd.metadata != 0 || c.cmd.metadata_len != 0 {
                return Err(Error::invalid(
                    OP,
                    "leave cmd.addr/metadata zero: pass the data buffer as `buf`",
                ));
            }
            match &mut buf {
                Some(b) => {
                    if c.cmd.data_len == 0 {
                        c.cmd.data_len = u32::try_from(b.len())
                            .map_err(|_| Error::invalid(OP, "buffer larger than 4 GiB"))?;
                    } else if c.cmd.data_len as usize > b.len() {
                        return Err(Error::invalid(
                            OP,
                            format!(
                                "data_len {} exceeds the {}-byte buffer",
                                c.cmd.data_len,
                                b.len()
                            ),
                        ));
                    }
                    c.cmd.addr = b.as_mut_ptr() as u64;
                }
                None if c.cmd.data_len != 0 => {
                    return Err(Error::invalid(OP, "data_len without a buffer"));
                }
                None => {}
            }
            if c.direction() == Direction::ToDevice && !tg.writable {
                return Err(Error::invalid(
                    OP,
                    "data-out command on a namespace opened read-only",
                ));
            }
            self.alloc_slot(OP)
        })();
        let s = match checked {
            Ok(s) => s,
            Err(error) => return Err(Rejected { error, buf }),
        };
        let fixed = buf
            .as_ref()
            .and_then(|b| self.fixed_index(b.as_ptr() as usize, c.cmd.data_len as usize));
        self.start_slot(s, tag, OpKind::Nvme, true);
        self.slots[s as usize].buf = buf;
        let r = self.queue_parts(s, 1, |ring, _| {
            let tg = &ring.targets[t.0 as usize];
            let fdt = match (c.queue, &tg.admin_fd) {
                // Admin commands go to the controller device.
                (crate::cmd::Queue::Admin, Some(a)) => (false, a.as_raw_fd()),
                _ => fd_of(ring, tg),
            };
            nvme_sqe(fdt, false, &c, fixed)
        });
        if let Err(error) = r {
            let slot = self.release_slot(s);
            return Err(Rejected {
                error,
                buf: slot.buf,
            });
        }
        self.slots[s as usize].bytes = c.cmd.data_len as usize;
        Ok(())
    }

    /// Polls a foreign fd (e.g. an RDMA completion channel, an eventfd) in this ring for
    /// `events` (`libc::POLLIN`...). A oneshot poll completes once; a multishot poll
    /// completes each time the fd becomes ready (with [`Completion::more`] set) until
    /// [`Ring::poll_remove`]. The completion's result is the ready events.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] on an IOPOLL ring (the kernel refuses polls there) or a kernel
    /// without POLL_ADD; [`Error::RingFull`]; [`Error::Os`] `io_uring_enter`.
    pub fn poll_add(
        &mut self,
        fd: impl AsFd,
        events: i16,
        multishot: bool,
        tag: u64,
    ) -> Result<PollId> {
        const OP: &str = "poll";
        if self.caps.iopoll == Feature::On {
            return Err(Error::unsupported(
                OP,
                "an IOPOLL ring cannot poll fds: use a second ring without IOPOLL",
            ));
        }
        if !self.caps.poll_add {
            return Err(Error::unsupported(
                OP,
                "this kernel has no IORING_OP_POLL_ADD",
            ));
        }
        let raw = fd.as_fd().as_raw_fd();
        let s = self.alloc_slot(OP)?;
        self.start_slot(s, tag, OpKind::Poll, false);
        let sqe: Sqe = opcode::PollAdd::new(types::Fd(raw), events as u16 as u32)
            .multi(multishot)
            .build()
            .into();
        if let Err(e) = self.queue_parts(s, 1, |_, _| sqe.clone()) {
            self.release_slot(s);
            return Err(e);
        }
        Ok(PollId(s))
    }

    /// Removes an armed poll; its final completion (ECANCELED, or a last event) still comes.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when the id is not a live poll; [`Error::Os`] `io_uring_enter`.
    pub fn poll_remove(&mut self, id: PollId) -> Result<()> {
        let live = self
            .slots
            .get(id.0 as usize)
            .is_some_and(|s| s.live && s.kind == OpKind::Poll);
        if !live {
            return Err(Error::invalid(
                "poll remove",
                "not a live poll of this ring",
            ));
        }
        let sqe: Sqe = opcode::PollRemove::new(u64::from(id.0))
            .build()
            .user_data(INTERNAL)
            .into();
        self.push(&sqe)
    }

    /// Sends all queued SQEs to the kernel in one system call; returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `io_uring_enter` (EBUSY: too many completions pending, reap first;
    /// EEXIST: used from a second thread with SINGLE_ISSUER).
    pub fn submit(&mut self) -> Result<usize> {
        loop {
            match self.uring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => return r.map_err(|e| Error::from_io("io_uring_enter", &e)),
            }
        }
    }

    /// Reaps the completions that are ready without blocking (polling the device on IOPOLL
    /// rings), appending finished operations to `out`; returns how many were appended.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `io_uring_enter` when polling for completions failed.
    pub fn reap(&mut self, out: &mut Vec<Completion<B>>) -> Result<usize> {
        let n = self.drain(out);
        if n > 0 || self.pending_cqes == 0 {
            return Ok(n);
        }
        if self.caps.iopoll == Feature::On
            || self.caps.defer_taskrun == Feature::On
            || self.needs_flush()
        {
            // Completions are only produced inside io_uring_enter(GETEVENTS) here.
            self.enter_getevents(0)?;
        }
        Ok(self.drain(out))
    }

    fn needs_flush(&mut self) -> bool {
        !self.uring.submission().is_empty()
    }

    fn enter_getevents(&mut self, want: usize) -> Result<()> {
        let r = if want == 0 && self.caps.sqpoll != Feature::On {
            // submit_and_wait(0) would leave out GETEVENTS, which is what runs deferred
            // completion work (DEFER_TASKRUN) and polls the device (IOPOLL).
            let to_submit = self.uring.submission().len() as u32;
            // SAFETY: no argument pointer is passed; the SQEs being submitted point into
            // memory owned by live slots.
            unsafe {
                self.uring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    0,
                    abi::IORING_ENTER_GETEVENTS,
                    None,
                )
            }
        } else {
            self.uring.submit_and_wait(want)
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::from_io("io_uring_enter", &e)),
        }
    }

    /// Submits queued SQEs and waits until at least `min` operations have finished (fewer
    /// when fewer are in flight), appending them to `out`; returns how many were appended.
    /// Waits forever for polls that never fire: use [`Ring::wait_timeout`] for those.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `io_uring_enter`.
    pub fn wait(&mut self, min: usize, out: &mut Vec<Completion<B>>) -> Result<usize> {
        self.wait_inner(min, None, out)
    }

    /// As [`Ring::wait`], but returns after `timeout` with what has finished by then.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `io_uring_enter` (EINVAL on kernels without EXT_ARG, before 5.11).
    pub fn wait_timeout(
        &mut self,
        min: usize,
        timeout: std::time::Duration,
        out: &mut Vec<Completion<B>>,
    ) -> Result<usize> {
        self.wait_inner(min, Some(timeout), out)
    }

    fn wait_inner(
        &mut self,
        min: usize,
        timeout: Option<std::time::Duration>,
        out: &mut Vec<Completion<B>>,
    ) -> Result<usize> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut got = self.drain(out);
        loop {
            if got >= min || self.in_flight() == 0 {
                if !self.uring.submission().is_empty() {
                    self.submit()?;
                }
                return Ok(got);
            }
            if !self.spin.is_zero() && self.spin_wait(min - got, out, &mut got)? {
                continue;
            }
            match deadline {
                None => self.enter_getevents(1)?,
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Ok(got);
                    }
                    let left = d - now;
                    let ts = types::Timespec::new()
                        .sec(left.as_secs())
                        .nsec(left.subsec_nanos());
                    let args = types::SubmitArgs::new().timespec(&ts);
                    match self.uring.submitter().submit_with_args(1, &args) {
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
                            ) => {}
                        Err(e) => return Err(Error::from_io("io_uring_enter", &e)),
                    }
                }
            }
            got += self.drain(out);
        }
    }

    /// Spins up to `self.spin` until `want` more operations finished; true when they did.
    fn spin_wait(
        &mut self,
        want: usize,
        out: &mut Vec<Completion<B>>,
        got: &mut usize,
    ) -> Result<bool> {
        // With deferred task work or IOPOLL, completions only appear inside io_uring_enter.
        let must_enter = self.caps.iopoll == Feature::On || self.caps.defer_taskrun == Feature::On;
        if !self.uring.submission().is_empty() {
            self.submit()?;
        }
        let start = std::time::Instant::now();
        let mut n = 0;
        loop {
            if must_enter {
                self.enter_getevents(0)?;
            }
            n += self.drain(out);
            if n >= want {
                *got += n;
                return Ok(true);
            }
            if start.elapsed() >= self.spin {
                *got += n;
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Moves every ready CQE into its slot; finished operations go to `out`.
    fn drain(&mut self, out: &mut Vec<Completion<B>>) -> usize {
        let mut n = 0;
        let slots = &mut self.slots;
        let free = &mut self.free;
        let pending = &mut self.pending_cqes;
        for cqe in self.uring.completion() {
            let ud = cqe.user_data();
            if ud == INTERNAL {
                continue;
            }
            let s = ud as u32;
            let slot = &mut slots[s as usize];
            let res = cqe.result();
            if slot.kind == OpKind::Poll {
                let more = cqueue::more(cqe.flags());
                let result = if res < 0 {
                    Err(Error::Os {
                        op: "poll",
                        errno: -res,
                    })
                } else {
                    Ok(res as usize)
                };
                if !more {
                    *pending -= 1;
                    let done = std::mem::replace(slot, Slot::empty());
                    free.push(s);
                    out.push(Completion {
                        tag: done.tag,
                        kind: OpKind::Poll,
                        result,
                        cmd_result: 0,
                        more,
                        buf: None,
                        bufs: Vec::new(),
                    });
                } else {
                    out.push(Completion {
                        tag: slot.tag,
                        kind: OpKind::Poll,
                        result,
                        cmd_result: 0,
                        more,
                        buf: None,
                        bufs: Vec::new(),
                    });
                }
                n += 1;
                continue;
            }
            *pending -= 1;
            let op = slot.kind.name();
            if res < 0 {
                slot.error.get_or_insert(Error::Os { op, errno: -res });
            } else if slot.nvme {
                if res > 0 {
                    slot.error.get_or_insert(Error::Nvme {
                        op,
                        status: NvmeStatus::from_res(res),
                    });
                } else {
                    slot.cmd_result = cqe.big_cqe()[0];
                }
            } else {
                slot.bytes += res as usize;
            }
            slot.parts -= 1;
            if slot.parts == 0 {
                let done = std::mem::replace(slot, Slot::empty());
                free.push(s);
                let result = match done.error {
                    Some(e) => Err(e),
                    None => Ok(done.bytes),
                };
                out.push(Completion {
                    tag: done.tag,
                    kind: done.kind,
                    result,
                    cmd_result: done.cmd_result,
                    more: false,
                    buf: done.buf,
                    bufs: done.bufs,
                });
                n += 1;
            }
        }
        n
    }
}

fn fd_of<B: IoBuf>(_ring: &Ring<B>, t: &Target) -> (bool, RawFd) {
    if t.registered {
        (true, t.id as RawFd)
    } else {
        (false, t.fd.as_raw_fd())
    }
}

fn nvme_sqe(fdt: (bool, RawFd), vectored: bool, c: &NvmeCommand, fixed: Option<u16>) -> Sqe {
    if fdt.0 {
        crate::cmd::uring_cmd_sqe(types::Fixed(fdt.1 as u32), vectored, c, fixed)
    } else {
        crate::cmd::uring_cmd_sqe_fd(fdt.1, vectored, c, fixed)
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
        for i in 0..self.slots.len() {
            if self.slots[i].live && self.slots[i].kind == OpKind::Poll {
                let sqe: Sqe = opcode::AsyncCancel::new(i as u64)
                    .build()
                    .user_data(INTERNAL)
                    .into();
                let _ = self.push(&sqe);
            }
        }
        let mut sink = Vec::new();
        while self.in_flight() > 0 {
            if let Err(e) = self.enter_getevents(1) {
                tracing::error!(error = %e, in_flight = self.in_flight(), "cannot wait for in-flight I/O while dropping the ring: leaking its buffers");
                for s in self.slots.drain(..) {
                    std::mem::forget(s);
                }
                return;
            }
            self.drain(&mut sink);
            sink.clear();
        }
    }
}
