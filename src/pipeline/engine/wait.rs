//! How an engine loop waits when a round found nothing to do.
//!
//! [`WaitMode::Events`]: every link's CQ sits on a completion channel; its fd and the link's
//! rdma_cm event fd are polled in the same io_uring as the drive I/O, so one
//! `io_uring_enter` sleeps until a drive completion, an RDMA completion or a connection event
//! arrives (or the loop's deadline). The race rule: a CQ is re-armed, and then polled again,
//! before the loop sleeps; a completion that slipped in between arming and sleeping makes the
//! channel readable, so the sleep ends at once.
//!
//! Events mode first polls for a while (`busy_poll`, 200 us by default) before it sleeps: the
//! CQs and the ring are polled in the loop's own rounds, with a PAUSE between them, until
//! work turns up or the spell is over. In the testbed's single-threaded TCG, where every
//! sleep halts a vCPU and every wake-up costs the emulator a host-thread switch, this made
//! the replicator 1.1-1.5x faster (benches/results-replicator.md, "Session 11"); the PAUSE
//! hands the host thread to the other vCPU meanwhile.
//!
//! [`WaitMode::BusyPoll`]: poll the CQs and the ring in a loop, yielding the CPU and, after a
//! few empty rounds, sleeping 200 us (under emulation the kernel's rxe threads need the CPU
//! more than the poller does).

use std::time::{Duration, Instant};

use super::slots::DriveBuf;
use crate::uring::{Completion, OpKind, PollId, Ring};

use super::link::Link;
use super::{EngineError, WaitMode};

/// Tags of the ring's polls: the top bit set, the link index, and which fd.
const POLL_TAG: u64 = 1 << 63;
const POLL_CM: u64 = 1;

#[derive(Default)]
struct Watch {
    /// The CQ is armed (a completion will make its channel readable).
    armed: bool,
    cq_poll: Option<PollId>,
    cm_poll: Option<PollId>,
}

/// The waiting state of one engine loop.
pub(crate) struct Waiter {
    mode: WaitMode,
    empty_rounds: u32,
    /// Events mode: poll (with a PAUSE between rounds) for this long before sleeping.
    spin: Duration,
    /// When the current run of empty rounds began.
    idle_since: Option<Instant>,
    watches: Vec<Watch>,
}

impl Waiter {
    /// A waiter for `links` links; in events mode it polls for up to `spin` before sleeping.
    pub(crate) fn new(mode: WaitMode, spin: Duration, links: usize) -> Waiter {
        Waiter {
            mode,
            empty_rounds: 0,
            spin,
            idle_since: None,
            watches: (0..links).map(|_| Watch::default()).collect(),
        }
    }

    /// A round did work: the next empty round starts the backoff again.
    pub(crate) fn busy(&mut self) {
        self.empty_rounds = 0;
        self.idle_since = None;
    }

    /// A round did nothing: wait up to `bound` for something to happen. Drive completions
    /// that arrive while waiting are appended to `done` (handle them like reaped ones).
    ///
    /// # Errors
    /// [`EngineError::Rdma`] (arming a CQ, reading a channel event), [`EngineError::Ring`]
    /// (adding a poll, `io_uring_enter`).
    pub(crate) fn idle(
        &mut self,
        links: &[Link],
        ring: &mut Ring<DriveBuf>,
        bound: Duration,
        done: &mut Vec<Completion<DriveBuf>>,
    ) -> Result<(), EngineError> {
        self.empty_rounds += 1;
        match self.mode {
            WaitMode::BusyPoll => {
                if self.empty_rounds > 8 {
                    std::thread::sleep(Duration::from_micros(200).min(bound));
                } else {
                    std::thread::yield_now();
                }
                Ok(())
            }
            WaitMode::Events => {
                if !self.spin.is_zero() {
                    let since = *self.idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < self.spin.min(bound) {
                        for _ in 0..16 {
                            std::hint::spin_loop();
                        }
                        return Ok(());
                    }
                }
                self.sleep(links, ring, bound, done)
            }
        }
    }

    fn sleep(
        &mut self,
        links: &[Link],
        ring: &mut Ring<DriveBuf>,
        bound: Duration,
        done: &mut Vec<Completion<DriveBuf>>,
    ) -> Result<(), EngineError> {
        let mut rearmed = false;
        for (i, (l, w)) in links.iter().zip(&mut self.watches).enumerate() {
            if !l.alive {
                continue;
            }
            if !w.armed {
                l.cq.arm(false)
                    .map_err(|e| EngineError::rdma("arming a completion queue", e))?;
                w.armed = true;
                rearmed = true;
            }
            let ch = l.cq.channel().ok_or(EngineError::Internal(
                "events mode with a CQ without a completion channel",
            ))?;
            if w.cq_poll.is_none() {
                // Fd lifetime: the channel fd stays open while the link lives; links outlive the
                // ring's polls (`Waiter::drain` runs before the links are dropped).
                let fd = ch.fd();
                w.cq_poll = Some(
                    ring.poll_add(fd, libc::POLLIN, false, POLL_TAG | (i as u64) << 1)
                        .map_err(|e| EngineError::ring("poll a completion channel", e))?,
                );
            }
            if w.cm_poll.is_none() {
                // Fd lifetime: as above, for the connection's rdma_cm event channel.
                let fd = l.conn.event_fd();
                w.cm_poll = Some(
                    ring.poll_add(
                        fd,
                        libc::POLLIN,
                        false,
                        POLL_TAG | (i as u64) << 1 | POLL_CM,
                    )
                    .map_err(|e| EngineError::ring("poll a connection's events", e))?,
                );
            }
        }
        if rearmed {
            // The race rule: completions that arrived before the arm raise no event; the
            // caller polls the CQs once more before this sleeps.
            return Ok(());
        }
        let start = done.len();
        ring.wait_timeout(1, bound, done)
            .map_err(|e| EngineError::ring("wait", e))?;
        self.take_polls(links, done, start)
    }

    /// Removes the poll completions from `done[start..]`, consuming channel events.
    fn take_polls(
        &mut self,
        links: &[Link],
        done: &mut Vec<Completion<DriveBuf>>,
        start: usize,
    ) -> Result<(), EngineError> {
        let mut i = start;
        while i < done.len() {
            if done[i].kind != OpKind::Poll || done[i].tag & POLL_TAG == 0 {
                i += 1;
                continue;
            }
            let c = done.swap_remove(i);
            let link = ((c.tag & !POLL_TAG) >> 1) as usize;
            let (Some(w), Some(l)) = (self.watches.get_mut(link), links.get(link)) else {
                continue;
            };
            if c.tag & POLL_CM != 0 {
                // The loop reads the connection's events itself (Connection::check).
                w.cm_poll = None;
            } else {
                w.cq_poll = None;
                // Get and ack the events; the CQ must be re-armed before the next sleep.
                while l
                    .cq
                    .take_event()
                    .map_err(|e| EngineError::rdma("reading a completion channel event", e))?
                {
                }
                w.armed = false;
            }
        }
        Ok(())
    }

    /// Filters poll completions out of reaped completions (events mode; a no-op otherwise).
    ///
    /// # Errors
    /// As [`Waiter::idle`].
    pub(crate) fn filter(
        &mut self,
        links: &[Link],
        done: &mut Vec<Completion<DriveBuf>>,
    ) -> Result<(), EngineError> {
        if self.mode == WaitMode::Events {
            self.take_polls(links, done, 0)?;
        }
        Ok(())
    }

    /// Removes every armed poll and waits until the ring has no operation in flight, so no
    /// buffer or fd is dropped under the kernel's feet (drive I/O always completes: the NVMe
    /// driver times commands out). Drive completions are discarded: call only when the run is
    /// over.
    pub(crate) fn drain(&mut self, ring: &mut Ring<DriveBuf>) {
        for w in &mut self.watches {
            for p in [w.cq_poll.take(), w.cm_poll.take()].into_iter().flatten() {
                if let Err(e) = ring.poll_remove(p) {
                    tracing::debug!(error = %e, "poll_remove");
                }
            }
        }
        let mut done = Vec::new();
        while ring.in_flight() > 0 {
            done.clear();
            if let Err(e) = ring.wait_timeout(1, Duration::from_secs(10), &mut done) {
                // The ring owns every buffer in flight, so stopping here is safe: its drop
                // waits again or, failing that, leaks them. Retrying a ring that fails for
                // good would hang the engine's exit.
                tracing::warn!(error = %e, in_flight = ring.in_flight(), "draining the ring");
                break;
            }
        }
    }
}
