//! What the kernel granted a ring: each optional feature is probed (io_uring probe and a
//! trial) and reported, so callers know which fast paths are in use.

use std::fmt;

/// State of one optional feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Not requested.
    Off,
    /// Requested and in use.
    On,
    /// Requested, refused by the kernel with this errno; the ring runs without it.
    Unavailable(i32),
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Feature::Off => write!(f, "off (not requested)"),
            Feature::On => write!(f, "on"),
            Feature::Unavailable(e) => write!(
                f,
                "unavailable ({}), falling back",
                std::io::Error::from_raw_os_error(*e)
            ),
        }
    }
}

/// The capability report of a ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// `IORING_OP_URING_CMD` is supported (NVMe passthrough possible).
    pub uring_cmd: bool,
    /// `IORING_OP_POLL_ADD` is supported.
    pub poll_add: bool,
    /// Completion polling (needs NVMe poll queues for passthrough).
    pub iopoll: Feature,
    /// Kernel submission thread.
    pub sqpoll: Feature,
    /// IORING_SETUP_COOP_TASKRUN.
    pub coop_taskrun: Feature,
    /// IORING_SETUP_SINGLE_ISSUER.
    pub single_issuer: Feature,
    /// IORING_SETUP_DEFER_TASKRUN (asked together with IORING_SETUP_TASKRUN_FLAG: the
    /// kernel flags the ring when deferred completions wait, so reaps enter only then).
    pub defer_taskrun: Feature,
    /// Registered files (targets are referenced by index, skipping fd lookups).
    pub registered_files: Feature,
    /// Fixed buffers (pinned once, `READ_FIXED`/`IORING_URING_CMD_FIXED`).
    pub fixed_buffers: Feature,
    /// Buffers whose registration failed `(addr, len, errno)`: they are used unregistered
    /// (EREMOTEIO: /dev/p2pmem0 mapping; EFAULT: sysfs p2pmem allocate mapping).
    pub unregistered_buffers: Vec<(usize, usize, i32)>,
    /// Submission queue entries.
    pub sq_entries: u32,
    /// Completion queue entries.
    pub cq_entries: u32,
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "io_uring ring: {} SQEs (128 B), {} CQEs (32 B)",
            self.sq_entries, self.cq_entries
        )?;
        writeln!(
            f,
            "  NVMe passthrough (URING_CMD): {}",
            if self.uring_cmd { "yes" } else { "no" }
        )?;
        writeln!(
            f,
            "  poll of foreign fds (POLL_ADD): {}",
            if self.poll_add { "yes" } else { "no" }
        )?;
        writeln!(f, "  IOPOLL: {}", self.iopoll)?;
        writeln!(f, "  SQPOLL: {}", self.sqpoll)?;
        writeln!(f, "  COOP_TASKRUN: {}", self.coop_taskrun)?;
        writeln!(f, "  SINGLE_ISSUER: {}", self.single_issuer)?;
        writeln!(f, "  DEFER_TASKRUN: {}", self.defer_taskrun)?;
        writeln!(f, "  registered files: {}", self.registered_files)?;
        writeln!(f, "  fixed buffers: {}", self.fixed_buffers)?;
        for (addr, len, e) in &self.unregistered_buffers {
            writeln!(
                f,
                "    buffer {addr:#x}+{len} not registered ({}): used with unregistered addresses",
                std::io::Error::from_raw_os_error(*e)
            )?;
        }
        Ok(())
    }
}
