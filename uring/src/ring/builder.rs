//! The ring builder: which io_uring setup flags and registrations to ask for, and the
//! fallback that drops flags the kernel refuses, recording what was granted in
//! [`Capabilities`].

use super::registry::Registry;
use super::slots::SlotTable;
use super::target::TargetTable;
use super::{Cqe, Ring, Sqe};
use crate::abi;
use crate::buf::{AlignedBuf, IoBuf};
use crate::capability::{Capabilities, Feature};
use crate::error::{Errno, Error, Result};
use io_uring::{opcode, IoUring};

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
        let want = [
            self.iopoll,
            self.sqpoll.is_some(),
            self.coop_taskrun,
            self.single_issuer,
            self.defer_taskrun && self.sqpoll.is_none(),
        ];
        let setup = |want: &[bool; FLAGS]| {
            let mut b = IoUring::<Sqe, Cqe>::builder();
            if want[IOPOLL] {
                b.setup_iopoll();
            }
            if want[SQPOLL] {
                b.setup_sqpoll(self.sqpoll.unwrap_or(0));
            }
            if want[COOP_TASKRUN] {
                b.setup_coop_taskrun();
            }
            if want[SINGLE_ISSUER] {
                b.setup_single_issuer();
            }
            if want[DEFER_TASKRUN] {
                // With TASKRUN_FLAG the kernel marks the SQ ring when deferred completion
                // work is waiting, so a reap enters the kernel only then (Linux 5.19; every
                // kernel with DEFER_TASKRUN, 6.1, has it).
                b.setup_defer_taskrun().setup_taskrun_flag();
            }
            b.build(self.entries)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))
        };
        let Granted {
            value: uring,
            on,
            refused,
        } = with_fallback(want, setup).map_err(|errno| Error::Os {
            op: "io_uring_setup (SQE128/CQE32)",
            errno: Errno(errno),
        })?;
        let feat = |i: usize, asked: bool| feature(asked, on[i], refused[i]);
        let mut probe = io_uring::Probe::new();
        let probed = uring.submitter().register_probe(&mut probe).is_ok();
        let has = |code: u8| probed && probe.is_supported(code);
        let mut caps = Capabilities {
            uring_cmd: has(abi::IORING_OP_URING_CMD),
            poll_add: has(opcode::PollAdd::CODE),
            iopoll: feat(IOPOLL, self.iopoll),
            sqpoll: feat(SQPOLL, self.sqpoll.is_some()),
            coop_taskrun: feat(COOP_TASKRUN, self.coop_taskrun),
            single_issuer: feat(SINGLE_ISSUER, self.single_issuer),
            defer_taskrun: feat(DEFER_TASKRUN, self.defer_taskrun),
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
        Ok(Ring {
            uring,
            slots: SlotTable::new(max_ops),
            targets: TargetTable::new(self.file_slots),
            registry: Registry::new(self.buffer_slots),
            caps,
            check_alignment: true,
            submit_batch: 0,
            spin: std::time::Duration::ZERO,
            file_max_transfer: 1 << 30,
        })
    }
}

/// The optional setup flags, as indices into the `want`/`refused` arrays.
const IOPOLL: usize = 0;
const SQPOLL: usize = 1;
const COOP_TASKRUN: usize = 2;
const SINGLE_ISSUER: usize = 3;
const DEFER_TASKRUN: usize = 4;
const FLAGS: usize = 5;
/// Which flag to give up next when the kernel refuses a setup: the most exotic first.
const DROP_ORDER: [usize; FLAGS] = [DEFER_TASKRUN, SINGLE_ISSUER, COOP_TASKRUN, SQPOLL, IOPOLL];

/// What a setup with fallback ended with.
#[derive(Debug)]
struct Granted<T> {
    /// What the successful setup returned.
    value: T,
    /// The flags it succeeded with.
    on: [bool; FLAGS],
    /// Per flag, the errno of the refusal that dropped it.
    refused: [Option<i32>; FLAGS],
}

/// Calls `setup` with the wanted flags, dropping one flag after each refusal (in
/// [`DROP_ORDER`], skipping flags not wanted) until it succeeds; or returns the errno of the
/// refusal with every flag dropped.
fn with_fallback<T>(
    mut want: [bool; FLAGS],
    mut setup: impl FnMut(&[bool; FLAGS]) -> std::result::Result<T, i32>,
) -> std::result::Result<Granted<T>, i32> {
    let mut refused = [None::<i32>; FLAGS];
    let mut next_drop = 0;
    loop {
        match setup(&want) {
            Ok(value) => {
                return Ok(Granted {
                    value,
                    on: want,
                    refused,
                })
            }
            Err(errno) => {
                while next_drop < DROP_ORDER.len() && !want[DROP_ORDER[next_drop]] {
                    next_drop += 1;
                }
                let Some(&i) = DROP_ORDER.get(next_drop) else {
                    return Err(errno);
                };
                want[i] = false;
                refused[i] = Some(errno);
            }
        }
    }
}

/// What became of a flag: on, refused with an errno, or not asked for.
fn feature(asked: bool, on: bool, refused: Option<i32>) -> Feature {
    match (asked, on, refused) {
        (_, true, _) => Feature::On,
        (true, false, Some(e)) => Feature::Unavailable(e),
        _ => Feature::Off,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_flags_are_dropped_most_exotic_first() {
        let mut tries = Vec::new();
        // A kernel that accepts only rings without DEFER_TASKRUN and SINGLE_ISSUER.
        let g = with_fallback([true, false, true, true, true], |w| {
            tries.push(*w);
            if w[DEFER_TASKRUN] {
                Err(libc::EINVAL)
            } else if w[SINGLE_ISSUER] {
                Err(libc::EPERM)
            } else {
                Ok(7)
            }
        })
        .unwrap();
        let (on, refused) = (g.on, g.refused);
        assert_eq!(g.value, 7);
        assert_eq!(on, [true, false, true, false, false]);
        assert_eq!(
            refused,
            [None, None, None, Some(libc::EPERM), Some(libc::EINVAL)]
        );
        assert_eq!(tries.len(), 3);
        assert_eq!(feature(true, on[IOPOLL], refused[IOPOLL]), Feature::On);
        assert_eq!(feature(false, on[SQPOLL], refused[SQPOLL]), Feature::Off);
        assert_eq!(
            feature(true, on[SINGLE_ISSUER], refused[SINGLE_ISSUER]),
            Feature::Unavailable(libc::EPERM)
        );
    }

    #[test]
    fn flags_not_wanted_are_not_dropped_twice() {
        let mut tries = 0;
        let r = with_fallback([false, true, false, false, false], |_| {
            tries += 1;
            Err::<(), i32>(libc::ENOSYS)
        });
        assert_eq!(r.unwrap_err(), libc::ENOSYS, "the last refusal's errno");
        assert_eq!(tries, 2, "with SQPOLL, then plain");
    }

    #[test]
    fn first_success_keeps_every_flag() {
        let g = with_fallback([true; FLAGS], |_| Ok::<_, i32>(())).unwrap();
        assert_eq!(g.on, [true; FLAGS]);
        assert_eq!(g.refused, [None; FLAGS]);
    }
}
