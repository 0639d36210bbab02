//! The loop both engines run, one turn at a time: carry out the core's actions, ring each
//! link's doorbell once, take RDMA completions (each link's queue polled dry), take drive
//! completions, check the role's timers, and wait when nothing moved. What differs between
//! the primary and a replica is a [`Role`]'s handlers; the order of a turn is here only.

use std::time::{Duration, Instant};

use crate::rdma::{self, Completion as WorkCompletion};
use crate::uring::Completion;

use super::drive::Drive;
use super::link::Link;
use super::slots::DriveBuf;
use super::wait::Waiter;
use super::EngineError;

/// Whether the loop goes on after a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Go on with the turn.
    Go,
    /// End the run (the role knows why).
    Stop,
}

/// What a role wants when a turn moved nothing and no action is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Idle {
    /// Wait up to this long for a drive completion, an RDMA completion or a connection event.
    Wait(Duration),
    /// Its handlers queued work: start the next turn without waiting.
    Again,
    /// End the run.
    Stop,
}

/// One role's handlers (the primary's or a replica's). Each handler feeds its core and queues
/// the actions the core answers with; [`Role::act`] carries them out at the next turn.
pub(super) trait Role {
    /// True when the run is over before a turn starts.
    fn finished(&self) -> bool;
    /// Carries out the queued actions (and those they lead to); true if any was carried out.
    fn act(&mut self, links: &mut [Link], drive: &mut Drive) -> Result<bool, EngineError>;
    /// True while actions are queued (a turn with queued actions never waits).
    fn has_actions(&self) -> bool;
    /// Posting the work requests queued on link `r` failed.
    fn post_failed(&mut self, r: usize, e: rdma::Error) -> Result<(), EngineError>;
    /// One RDMA completion of link `r`.
    fn on_completion(
        &mut self,
        r: usize,
        wc: &WorkCompletion,
        links: &mut [Link],
        drive: &mut Drive,
    ) -> Result<Next, EngineError>;
    /// One drive completion (reaped, or delivered while waiting).
    fn on_drive(&mut self, c: Completion<DriveBuf>, drive: &mut Drive) -> Result<(), EngineError>;
    /// After the turn's completions: connection checks and timers. Sets `busy` when it did
    /// something.
    fn after_events(
        &mut self,
        links: &mut [Link],
        drive: &mut Drive,
        busy: &mut bool,
    ) -> Result<Next, EngineError>;
    /// Nothing moved and no action is queued, for `since_progress` now.
    fn idle(&mut self, since_progress: Duration) -> Result<Idle, EngineError>;
    /// The end of every turn (progress reports).
    fn end_of_turn(&mut self) {}
}

/// Runs `role` until it stops or finishes. Drive completions that arrive while waiting are
/// handled at the next turn; on return, what is still in flight is the caller's to drain.
///
/// # Errors
/// The first [`EngineError`] a handler, the ring or a completion queue returns.
pub(super) fn run<R: Role>(
    role: &mut R,
    links: &mut [Link],
    drive: &mut Drive,
    waiter: &mut Waiter,
) -> Result<(), EngineError> {
    let mut wcs = vec![rdma::EMPTY_COMPLETION; 64];
    let mut done = Vec::new();
    let mut last_progress = Instant::now();
    while !role.finished() {
        let mut busy = role.act(links, drive)?;
        // One doorbell per link for everything this turn queued.
        for (r, link) in links.iter().enumerate() {
            if link.alive {
                if let Err(e) = link.flush() {
                    busy = true;
                    role.post_failed(r, e)?;
                }
            }
        }
        // RDMA completions, each queue polled dry: in events mode no new event comes for what
        // is already queued.
        for r in 0..links.len() {
            if !links[r].alive {
                continue;
            }
            loop {
                let got = links[r]
                    .cq
                    .poll(&mut wcs)
                    .map_err(|e| EngineError::rdma("polling a completion queue", e))?;
                for wc in &wcs[..got] {
                    busy = true;
                    if role.on_completion(r, wc, links, drive)? == Next::Stop {
                        return Ok(());
                    }
                }
                if got < wcs.len().min(32) {
                    break;
                }
            }
        }
        // Drive completions (some may have arrived while waiting).
        drive
            .ring
            .reap(&mut done)
            .map_err(|e| EngineError::ring("reap", e))?;
        waiter.filter(links, &mut done)?;
        for c in done.drain(..) {
            busy = true;
            role.on_drive(c, drive)?;
        }
        if role.after_events(links, drive, &mut busy)? == Next::Stop {
            return Ok(());
        }
        if busy {
            last_progress = Instant::now();
            waiter.busy();
        } else if !role.has_actions() && !role.finished() {
            match role.idle(last_progress.elapsed())? {
                Idle::Wait(bound) => waiter.idle(links, &mut drive.ring, bound, &mut done)?,
                Idle::Again => continue,
                Idle::Stop => return Ok(()),
            }
        }
        role.end_of_turn();
    }
    Ok(())
}
