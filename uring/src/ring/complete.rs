//! Waiting and reaping: the `io_uring_enter` calls that produce completions (GETEVENTS,
//! timeouts, spinning), and draining the completion queue into the slot table.

use super::slots::CqeInfo;
use super::{Completion, Ring, INTERNAL};
use crate::abi;
use crate::buf::IoBuf;
use crate::capability::Feature;
use crate::error::{Error, Result};
use io_uring::{cqueue, types};

impl<B: IoBuf> Ring<B> {
    /// Reaps the completions that are ready without blocking (polling the device on IOPOLL
    /// rings), appending finished operations to `out`; returns how many were appended.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `io_uring_enter` when polling for completions failed.
    pub fn reap(&mut self, out: &mut Vec<Completion<B>>) -> Result<usize> {
        let n = self.drain(out);
        if n > 0 || self.slots.pending_cqes() == 0 {
            return Ok(n);
        }
        if self.caps.iopoll == Feature::On || self.needs_flush() || self.work_waiting() {
            // Completions are only produced inside io_uring_enter(GETEVENTS) here.
            self.enter_getevents(0)?;
        }
        Ok(self.drain(out))
    }

    /// With deferred task work: whether the kernel flagged completion work waiting for an
    /// `io_uring_enter(GETEVENTS)` (IORING_SQ_TASKRUN, set by TASKRUN_FLAG), or completions
    /// overflowed the CQ ring. Without the flag nothing would tell, so a reap would enter
    /// (and make a system call) every time, found something or not.
    fn work_waiting(&mut self) -> bool {
        if self.caps.defer_taskrun != Feature::On {
            return false;
        }
        let sq = self.uring.submission();
        sq.taskrun() || sq.cq_overflow()
    }

    fn needs_flush(&mut self) -> bool {
        !self.uring.submission().is_empty()
    }

    pub(super) fn enter_getevents(&mut self, want: usize) -> Result<()> {
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
        // With IOPOLL completions only appear inside io_uring_enter; with deferred task work
        // too, once the kernel flagged work waiting.
        let must_enter = self.caps.iopoll == Feature::On;
        if !self.uring.submission().is_empty() {
            self.submit()?;
        }
        let start = std::time::Instant::now();
        let mut n = 0;
        loop {
            if must_enter || self.work_waiting() {
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
    pub(super) fn drain(&mut self, out: &mut Vec<Completion<B>>) -> usize {
        let mut n = 0;
        let slots = &mut self.slots;
        for cqe in self.uring.completion() {
            let ud = cqe.user_data();
            if ud == INTERNAL {
                continue;
            }
            let done = slots.complete(CqeInfo {
                slot: ud as u32,
                res: cqe.result(),
                more: cqueue::more(cqe.flags()),
                big0: cqe.big_cqe()[0],
            });
            if let Some(c) = done {
                out.push(c);
                n += 1;
            }
        }
        n
    }
}
