//! The fixed-buffer registry: which memory regions are registered with the ring
//! (`io_uring_register_buffers`) at which index, so operations whose buffer lies inside one use
//! it automatically (`READ_FIXED`/`WRITE_FIXED`, `IORING_URING_CMD_FIXED`).

use super::Ring;
use crate::buf::IoBuf;
use crate::capability::Feature;
use crate::error::{Errno, Error, Result};

const OP: &str = "io_uring_register_buffers";

/// One registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: usize,
    end: usize,
    index: u16,
}

/// The bookkeeping of registered regions; the kernel calls are [`Ring`]'s.
#[derive(Debug)]
pub(super) struct Registry {
    /// Buffer slots the ring reserved (`RingBuilder::buffer_slots`).
    slots: u32,
    regions: Vec<Region>,
}

impl Registry {
    /// An empty registry over `slots` buffer slots.
    pub(super) fn new(slots: u32) -> Self {
        Registry {
            slots,
            regions: Vec::new(),
        }
    }
    /// The index the next region gets.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when every slot is used.
    pub(super) fn next_index(&self) -> Result<u32> {
        let idx = self.regions.len() as u32;
        if idx >= self.slots {
            return Err(Error::unsupported(
                OP,
                format!(
                    "all {} buffer slots used: raise RingBuilder::buffer_slots",
                    self.slots
                ),
            ));
        }
        Ok(idx)
    }
    /// Records that `addr..addr + len` is registered at `index`.
    pub(super) fn insert(&mut self, addr: usize, len: usize, index: u16) {
        self.regions.push(Region {
            start: addr,
            end: addr.saturating_add(len),
            index,
        });
    }
    /// The index of a registered region holding all of `addr..addr + len`.
    pub(super) fn lookup(&self, addr: usize, len: usize) -> Option<u16> {
        let end = addr.checked_add(len)?;
        self.regions
            .iter()
            .find(|r| addr >= r.start && end <= r.end)
            .map(|r| r.index)
    }
    /// The indices in use.
    pub(super) fn indices(&self) -> impl Iterator<Item = u16> + '_ {
        self.regions.iter().map(|r| r.index)
    }
    /// Forgets every region.
    pub(super) fn clear(&mut self) {
        self.regions.clear();
    }
}

impl<B: IoBuf> Ring<B> {
    /// Registers `len` bytes at `addr` as a fixed buffer; later operations whose buffer lies
    /// inside it use it automatically (`READ_FIXED`/`WRITE_FIXED`, `IORING_URING_CMD_FIXED`).
    /// When registration fails the memory keeps working unregistered, and the failure is
    /// listed in [`Capabilities::unregistered_buffers`](crate::Capabilities::unregistered_buffers).
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
        if self.caps.fixed_buffers != Feature::On {
            return Err(Error::unsupported(
                OP,
                "fixed buffers are unavailable on this ring",
            ));
        }
        let idx = self.registry.next_index()?;
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
                self.registry.insert(addr as usize, len, idx as u16);
                Ok(idx as u16)
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                self.caps
                    .unregistered_buffers
                    .push((addr as usize, len, errno));
                Err(Error::Os {
                    op: OP,
                    errno: Errno(errno),
                })
            }
        }
    }

    /// Registers several regions as fixed buffers, in order (see [`Ring::register_buffer`]);
    /// returns their indices. Stops at the first region the kernel refuses: the regions
    /// before it stay registered, the refused one is listed in
    /// [`Capabilities::unregistered_buffers`](crate::Capabilities::unregistered_buffers) and
    /// keeps working unregistered.
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
        for idx in self.registry.indices() {
            // SAFETY: an empty iovec clears the slot.
            unsafe {
                self.uring
                    .submitter()
                    .register_buffers_update(u32::from(idx), &[clear], None)
                    .map_err(|e| Error::from_io(OP, &e))?;
            }
        }
        self.registry.clear();
        Ok(())
    }

    /// The registered buffer holding `addr..addr + len`, if any.
    pub(super) fn fixed_index(&self, addr: usize, len: usize) -> Option<u16> {
        self.registry.lookup(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_needs_the_whole_range_inside_one_region() {
        let mut r = Registry::new(4);
        r.insert(0x10000, 0x4000, 0);
        r.insert(0x20000, 0x1000, 1);
        assert_eq!(r.lookup(0x10000, 0x4000), Some(0), "the whole region");
        assert_eq!(r.lookup(0x11000, 0x1000), Some(0), "a part of it");
        assert_eq!(r.lookup(0x20000, 0x1000), Some(1));
        assert_eq!(r.lookup(0x13000, 0x2000), None, "runs past the end");
        assert_eq!(r.lookup(0xf000, 0x2000), None, "starts before it");
        assert_eq!(r.lookup(0x30000, 16), None, "not registered");
        assert_eq!(r.lookup(usize::MAX - 1, 16), None, "no overflow");
    }

    #[test]
    fn indices_run_until_the_slots_are_used() {
        let mut r = Registry::new(2);
        assert_eq!(r.next_index().unwrap(), 0);
        r.insert(0x1000, 0x1000, 0);
        assert_eq!(r.next_index().unwrap(), 1);
        r.insert(0x3000, 0x1000, 1);
        let e = r.next_index().unwrap_err();
        assert!(matches!(e, Error::Unsupported { op: OP, .. }), "{e}");
        assert!(e.to_string().contains("all 2 buffer slots used"), "{e}");
        assert_eq!(r.indices().collect::<Vec<_>>(), vec![0, 1]);
        r.clear();
        assert_eq!(r.next_index().unwrap(), 0, "free again after clear");
        assert_eq!(r.lookup(0x1000, 16), None);
    }

    #[test]
    fn no_slots_means_no_registration() {
        assert!(Registry::new(0).next_index().is_err());
    }
}
