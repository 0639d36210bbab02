//! An established connection: its QP, its CM events (disconnect, device removal) and
//! completion waits that notice the peer going away.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdma_sys::*;

use super::event::{CmEvent, CmEventKind};
use super::id::CmId;
use crate::cq::{Completion, CompletionQueue};
use crate::device::Context;
use crate::error::{Errno, Error, Result};
use crate::fd::wait_readable;
use crate::qp::QueuePair;

/// A connected RC queue pair with its rdma_cm id.
///
/// Dereferences to the [`QueuePair`] for posting. Dropping it disconnects (the kernel sends
/// the disconnect request) and destroys QP then id.
pub struct Connection {
    // Field order: the QP is destroyed before the id.
    qp: QueuePair,
    id: Arc<CmId>,
    ctx: Context,
    peer_private_data: Vec<u8>,
    disconnected: AtomicBool,
    disconnect_sent: AtomicBool,
    events: Mutex<Vec<CmEvent>>,
}

impl std::ops::Deref for Connection {
    type Target = QueuePair;
    fn deref(&self) -> &QueuePair {
        &self.qp
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.event_fd()
    }
}

impl Connection {
    pub(super) fn new(
        qp: QueuePair,
        id: Arc<CmId>,
        ctx: Context,
        peer_private_data: Vec<u8>,
    ) -> Connection {
        Connection {
            qp,
            id,
            ctx,
            peer_private_data,
            disconnected: AtomicBool::new(false),
            disconnect_sent: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
        }
    }

    /// The queue pair (also reachable through `Deref`).
    pub fn qp(&self) -> &QueuePair {
        &self.qp
    }
    /// The device the connection runs on.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
    /// The connection's `rdma_cm_id`, for librdmacm calls this crate does not wrap; valid
    /// while `self` lives. (The QP's own handle is `qp().as_raw()`.)
    pub fn as_raw(&self) -> *mut rdma_cm_id {
        self.id.as_raw()
    }
    /// The private data the peer sent (connect request on the server, accept reply on the
    /// client). The transport may pad it with zeros (IB CM: to 56 / 196 bytes), so encode
    /// lengths inside it.
    pub fn peer_private_data(&self) -> &[u8] {
        &self.peer_private_data
    }
    /// This side's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.id.local_addr()
    }
    /// The peer's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.id.peer_addr()
    }
    /// The CM event fd of this connection (readable when an event is queued; non-blocking;
    /// the same as [`AsFd::as_fd`]).
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.id.channel.as_fd()
    }

    /// Reads queued CM events without blocking, records them, and returns them.
    ///
    /// # Errors
    /// `Verbs { op: "rdma_get_cm_event" }`.
    pub fn poll_events(&self) -> Result<Vec<CmEvent>> {
        let mut out = Vec::new();
        while let Some(ev) = self.id.channel.try_next()? {
            if matches!(
                ev.kind,
                CmEventKind::Disconnected | CmEventKind::DeviceRemoval
            ) {
                self.disconnected.store(true, Ordering::Release);
            }
            if ev.kind == CmEventKind::Disconnected {
                // The peer's disconnect request (IB CM DREQ) is only answered (DREP) when this
                // side calls rdma_disconnect too (or destroys its id). Without the answer the
                // peer's own DISCONNECTED arrives only after its DREQ retries time out.
                self.answer_disconnect();
            }
            self.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ev.clone());
            out.push(ev);
        }
        Ok(out)
    }

    /// Waits up to `timeout` for an event of `kind` (earlier recorded events count).
    ///
    /// # Errors
    /// `Timeout`.
    pub fn wait_event(&self, kind: CmEventKind, timeout: Duration) -> Result<CmEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_events()?;
            if let Some(e) = self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|e| e.kind == kind)
            {
                return Ok(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    op: "wait for CM event",
                    after: timeout,
                });
            }
            wait_readable(&[self.event_fd()], left)?;
        }
    }

    /// Ok while connected; `Disconnected`/`DeviceRemoved` once the peer went away.
    ///
    /// # Errors
    /// `Disconnected`, `DeviceRemoved`, `Verbs`.
    pub fn check(&self) -> Result<()> {
        self.poll_events()?;
        if self.disconnected.load(Ordering::Acquire) {
            let removed = self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|e| e.kind == CmEventKind::DeviceRemoval);
            return Err(if removed {
                Error::DeviceRemoved { op: "connection" }
            } else {
                Error::Disconnected { op: "connection" }
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for completions on `cq`, and notices the peer going away: returns
    /// `Disconnected` if the connection dropped and no completion is pending. Uses the CQ's
    /// channel if it has one (sleeping), else busy-polls with a spin-wait hint between empty
    /// polls and a yield every 4096.
    ///
    /// # Errors
    /// `Timeout { op: "wait for completion" }`, `Disconnected`, `DeviceRemoved`.
    pub fn wait_completions(
        &self,
        cq: &CompletionQueue,
        out: &mut [Completion],
        timeout: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        if cq.channel().is_some() {
            loop {
                let n = cq.poll(out)?;
                if n > 0 {
                    return Ok(n);
                }
                // Completions first (flushes after a disconnect), then the connection state: a
                // connection already known to be gone must not wait for the timeout.
                self.check()?;
                let left = deadline.saturating_duration_since(Instant::now());
                match cq.wait_with(out, left, &[self.event_fd()]) {
                    Ok((n, _)) if n > 0 => return Ok(n),
                    Ok(_) => self.check()?,
                    Err(e) => return Err(e),
                }
            }
        }
        let mut spins = 0u32;
        loop {
            let n = cq.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            // PAUSE between empty polls (see `CompletionQueue::poll_blocking`)
            std::hint::spin_loop();
            spins += 1;
            if spins % 4096 == 0 {
                self.check()?;
                if Instant::now() > deadline {
                    return Err(Error::Timeout {
                        op: "wait for completion",
                        after: timeout,
                    });
                }
                std::thread::yield_now();
            }
        }
    }

    /// Starts disconnecting: moves the QP to the error state (posted WRs flush) and sends the
    /// disconnect request. Does not wait; use [`disconnect`](Self::disconnect)
    /// or [`wait_event`](Self::wait_event) for the DISCONNECTED event. It arrives when the
    /// peer answers, which a peer `Connection` does as soon as it reads the request (any of
    /// `poll_events`, `check`, `wait_event`, `wait_completions`) or is dropped; a peer that
    /// never looks costs the CM's disconnect-request timeout instead.
    ///
    /// # Errors
    /// `Verbs { op: "rdma_disconnect" }`.
    pub fn start_disconnect(&self) -> Result<()> {
        if self.disconnect_sent.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // SAFETY: valid connected id.
        if unsafe { rdma_disconnect(self.id.as_raw()) } != 0 {
            let errno = crate::error::last_errno();
            // EINVAL: already disconnected by the peer
            if errno != libc::EINVAL {
                return Err(Error::Verbs {
                    op: "rdma_disconnect",
                    errno: Errno(errno),
                });
            }
        }
        Ok(())
    }

    /// Answers the peer's disconnect request once; errors are only logged (the id may
    /// already be gone with its device).
    fn answer_disconnect(&self) {
        if self.disconnect_sent.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: valid id; rdma_disconnect on a disconnecting id sends the DREP.
        if unsafe { rdma_disconnect(self.id.as_raw()) } != 0 {
            tracing::debug!(
                errno = crate::error::last_errno(),
                "rdma_disconnect answering the peer failed"
            );
        }
    }

    /// [`start_disconnect`](Self::start_disconnect), then waits up to `timeout` for the
    /// DISCONNECTED event (the peer's answer).
    ///
    /// # Errors
    /// `Verbs { op: "rdma_disconnect" }`, `Timeout`.
    pub fn disconnect(&self, timeout: Duration) -> Result<()> {
        self.start_disconnect()?;
        self.wait_event(CmEventKind::Disconnected, timeout)
            .map(|_| ())
    }

    /// True once a DISCONNECTED or DEVICE_REMOVAL event was seen.
    pub fn is_disconnected(&self) -> bool {
        self.disconnected.load(Ordering::Acquire)
    }
}
