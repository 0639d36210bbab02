//! The slot table: one slot per operation in flight, holding what the operation owns (its
//! buffers, an auxiliary buffer, an iovec array) and what its completions have added up to so
//! far. A slot's index is the `user_data` of the operation's SQEs; a slot is free again once
//! its last completion has been turned into a [`Completion`].

use super::{Completion, OpKind};
use crate::buf::{AlignedBuf, Buffers};
use crate::error::{Errno, Error, Result};
use crate::status::NvmeStatus;

/// One operation in flight.
pub(super) struct Slot<B> {
    /// In use (between allocation and its last completion).
    pub(super) live: bool,
    /// The caller's tag.
    pub(super) tag: u64,
    /// What the operation is.
    pub(super) kind: OpKind,
    /// Completions still expected (an operation may be split into several SQEs).
    pub(super) parts: u32,
    /// Bytes transferred so far (passthrough: counted up front).
    pub(super) bytes: usize,
    /// NVMe passthrough: a positive result is an NVMe status, not a byte count.
    pub(super) nvme: bool,
    /// The first error of any part.
    pub(super) error: Option<Error>,
    /// Completion dwords 0-1 of a passthrough command.
    pub(super) cmd_result: u64,
    /// The caller's buffers, handed back with the completion.
    pub(super) bufs: Buffers<B>,
    /// Memory the ring made for the operation (DSM range list).
    pub(super) aux: Option<AlignedBuf>,
    /// The iovec array of a vectored operation (the kernel reads it after submission).
    pub(super) iov: Vec<libc::iovec>,
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
            bufs: Buffers::None,
            aux: None,
            iov: Vec::new(),
        }
    }
}

/// What one CQE says, as the slot table needs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct CqeInfo {
    /// The slot (the SQE's `user_data`).
    pub(super) slot: u32,
    /// `res`: `-errno`, bytes, poll events or an NVMe status.
    pub(super) res: i32,
    /// IORING_CQE_F_MORE: a multishot poll stays armed.
    pub(super) more: bool,
    /// The first extra dword pair of the big CQE (NVMe command result).
    pub(super) big0: u64,
}

/// Every slot of a ring, the free list and the count of completions still expected.
pub(super) struct SlotTable<B> {
    slots: Vec<Slot<B>>,
    free: Vec<u32>,
    /// CQEs still expected for live operations (polls count one each).
    pending_cqes: usize,
}

impl<B> SlotTable<B> {
    /// `n` free slots, handed out lowest index first.
    pub(super) fn new(n: usize) -> Self {
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, Slot::empty);
        SlotTable {
            slots,
            free: (0..n as u32).rev().collect(),
            pending_cqes: 0,
        }
    }
    /// Most operations in flight at once.
    pub(super) fn capacity(&self) -> usize {
        self.slots.len()
    }
    /// Operations in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
    /// Completions still expected.
    pub(super) fn pending_cqes(&self) -> usize {
        self.pending_cqes
    }
    /// A free slot for operation `op`.
    ///
    /// # Errors
    ///
    /// [`Error::RingFull`] when every slot is in flight.
    pub(super) fn alloc(&mut self, op: &'static str) -> Result<u32> {
        self.free.pop().ok_or(Error::RingFull {
            op,
            in_flight: self.slots.len(),
        })
    }
    /// Marks an allocated slot live for a new operation.
    pub(super) fn start(&mut self, s: u32, tag: u64, kind: OpKind, nvme: bool) {
        let slot = &mut self.slots[s as usize];
        slot.live = true;
        slot.tag = tag;
        slot.kind = kind;
        slot.nvme = nvme;
        slot.bytes = 0;
        slot.error = None;
        slot.cmd_result = 0;
    }
    /// Frees a slot whose operation never reached the queue; returns what it owned.
    pub(super) fn release(&mut self, s: u32) -> Slot<B> {
        self.free.push(s);
        std::mem::replace(&mut self.slots[s as usize], Slot::empty())
    }
    /// The slot `s`.
    pub(super) fn get(&self, s: u32) -> &Slot<B> {
        &self.slots[s as usize]
    }
    /// The slot `s`, to fill in.
    pub(super) fn get_mut(&mut self, s: u32) -> &mut Slot<B> {
        &mut self.slots[s as usize]
    }
    /// Whether `s` is an armed poll.
    pub(super) fn is_live_poll(&self, s: u32) -> bool {
        self.slots
            .get(s as usize)
            .is_some_and(|s| s.live && s.kind == OpKind::Poll)
    }
    /// The armed polls (to cancel them).
    pub(super) fn live_polls(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.slots.len() as u32).filter(|&s| self.is_live_poll(s))
    }
    /// `parts` SQEs of slot `s` are queued: that many completions will come. When `error`
    /// is given (queueing stopped early), the operation completes with it.
    pub(super) fn queued(&mut self, s: u32, parts: usize, error: Option<Error>) {
        let slot = &mut self.slots[s as usize];
        slot.parts = parts as u32;
        if error.is_some() {
            slot.error = error;
        }
        self.pending_cqes += parts;
    }
    /// Forgets every slot without dropping what they own (the kernel may still use it).
    pub(super) fn leak(&mut self) {
        for s in self.slots.drain(..) {
            std::mem::forget(s);
        }
        self.free.clear();
    }

    /// Accounts one CQE; returns the completion it finishes (every poll event finishes one).
    pub(super) fn complete(&mut self, cqe: CqeInfo) -> Option<Completion<B>> {
        let s = cqe.slot;
        let slot = self.slots.get_mut(s as usize)?;
        let res = cqe.res;
        if slot.kind == OpKind::Poll {
            let result = if res < 0 {
                Err(Error::Os {
                    op: "poll",
                    errno: Errno(-res),
                })
            } else {
                Ok(res as usize)
            };
            let tag = slot.tag;
            if !cqe.more {
                self.pending_cqes -= 1;
                self.release(s);
            }
            return Some(Completion {
                tag,
                kind: OpKind::Poll,
                result,
                cmd_result: 0,
                more: cqe.more,
                bufs: Buffers::None,
            });
        }
        self.pending_cqes -= 1;
        let op = slot.kind.name();
        if res < 0 {
            slot.error.get_or_insert(Error::Os {
                op,
                errno: Errno(-res),
            });
        } else if slot.nvme {
            if res > 0 {
                slot.error.get_or_insert(Error::Nvme {
                    op,
                    status: NvmeStatus::from_res(res),
                });
            } else {
                slot.cmd_result = cqe.big0;
            }
        } else {
            slot.bytes += res as usize;
        }
        slot.parts -= 1;
        if slot.parts > 0 {
            return None;
        }
        let done = self.release(s);
        let result = match done.error {
            Some(e) => Err(e),
            None => Ok(done.bytes),
        };
        Some(Completion {
            tag: done.tag,
            kind: done.kind,
            result,
            cmd_result: done.cmd_result,
            more: false,
            bufs: done.bufs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cqe(slot: u32, res: i32) -> CqeInfo {
        CqeInfo {
            slot,
            res,
            more: false,
            big0: 0,
        }
    }

    #[test]
    fn slots_are_handed_out_until_full_and_reused() {
        let mut t = SlotTable::<u8>::new(2);
        assert_eq!((t.capacity(), t.in_flight()), (2, 0));
        assert_eq!(t.alloc("read").unwrap(), 0, "lowest index first");
        assert_eq!(t.alloc("read").unwrap(), 1);
        assert_eq!(t.in_flight(), 2);
        assert_eq!(
            t.alloc("write"),
            Err(Error::RingFull {
                op: "write",
                in_flight: 2
            })
        );
        t.get_mut(0).bufs = Buffers::One(42);
        let back = t.release(0);
        assert!(
            matches!(back.bufs, Buffers::One(42)),
            "release hands back the buffer"
        );
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.alloc("read").unwrap(), 0, "a released slot is reused");
    }

    #[test]
    fn split_operation_completes_after_its_last_part() {
        let mut t = SlotTable::<u8>::new(4);
        let s = t.alloc("read").unwrap();
        t.start(s, 77, OpKind::Read, false);
        t.get_mut(s).bufs = Buffers::One(1);
        t.queued(s, 3, None);
        assert_eq!(t.pending_cqes(), 3);
        assert!(t.complete(cqe(s, 4096)).is_none());
        assert!(t.complete(cqe(s, 4096)).is_none());
        let c = t.complete(cqe(s, 100)).expect("last part finishes it");
        assert_eq!((c.tag, c.kind, c.more), (77, OpKind::Read, false));
        assert_eq!(
            c.result,
            Ok(8292),
            "bytes of all parts, short last part included"
        );
        assert!(matches!(c.bufs, Buffers::One(1)));
        assert_eq!((t.in_flight(), t.pending_cqes()), (0, 0));
    }

    #[test]
    fn first_error_of_any_part_wins() {
        let mut t = SlotTable::<u8>::new(1);
        let s = t.alloc("write").unwrap();
        t.start(s, 5, OpKind::Write, false);
        t.queued(s, 3, None);
        assert!(t.complete(cqe(s, -libc::EIO)).is_none());
        assert!(t.complete(cqe(s, 4096)).is_none());
        assert!(t.complete(cqe(s, -libc::ENOSPC)).is_some_and(|c| c.result
            == Err(Error::Os {
                op: "write",
                errno: Errno(libc::EIO)
            })));
    }

    #[test]
    fn queueing_stopped_early_completes_with_that_error() {
        let mut t = SlotTable::<u8>::new(1);
        let s = t.alloc("read").unwrap();
        t.start(s, 1, OpKind::Read, false);
        let e = Error::Os {
            op: "io_uring_enter",
            errno: Errno(libc::EBUSY),
        };
        t.queued(s, 1, Some(e.clone()));
        let c = t.complete(cqe(s, 4096)).unwrap();
        assert_eq!(c.result, Err(e));
    }

    #[test]
    fn passthrough_status_and_command_result() {
        let mut t = SlotTable::<u8>::new(2);
        let s = t.alloc("nvme command").unwrap();
        t.start(s, 9, OpKind::Nvme, true);
        t.get_mut(s).bytes = 4096;
        t.queued(s, 1, None);
        let c = t
            .complete(CqeInfo {
                slot: s,
                res: 0,
                more: false,
                big0: 0xabcd,
            })
            .unwrap();
        assert_eq!((c.result, c.cmd_result), (Ok(4096), 0xabcd));

        let s = t.alloc("read").unwrap();
        t.start(s, 10, OpKind::Read, true);
        t.queued(s, 1, None);
        let c = t.complete(cqe(s, 0x280)).unwrap();
        let e = c.result.unwrap_err();
        assert_eq!(e.op(), "read");
        assert_eq!(e.nvme_status(), Some(NvmeStatus::from_res(0x280)));
    }

    #[test]
    fn multishot_poll_stays_until_its_last_event() {
        let mut t = SlotTable::<u8>::new(1);
        let s = t.alloc("poll").unwrap();
        t.start(s, 3, OpKind::Poll, false);
        t.queued(s, 1, None);
        assert!(t.is_live_poll(s));
        assert_eq!(t.live_polls().collect::<Vec<_>>(), vec![s]);
        let event = CqeInfo {
            slot: s,
            res: i32::from(libc::POLLIN),
            more: true,
            big0: 0,
        };
        let c = t.complete(event).unwrap();
        assert_eq!((c.tag, c.more), (3, true));
        assert_eq!(c.result, Ok(libc::POLLIN as usize));
        assert_eq!((t.in_flight(), t.pending_cqes()), (1, 1), "still armed");
        let c = t.complete(cqe(s, -libc::ECANCELED)).unwrap();
        assert!(!c.more);
        assert_eq!(c.result.unwrap_err().errno(), Some(libc::ECANCELED));
        assert_eq!((t.in_flight(), t.pending_cqes()), (0, 0));
        assert!(!t.is_live_poll(s));
    }

    #[test]
    fn unknown_slot_is_ignored() {
        let mut t = SlotTable::<u8>::new(1);
        assert!(t.complete(cqe(7, 0)).is_none());
        assert!(!t.is_live_poll(7));
    }
}
