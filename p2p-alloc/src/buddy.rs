//! A binary buddy allocator over one chunk: blocks of 2^order bytes, naturally aligned
//! (relative to the chunk start), split on demand and merged with their buddy on free.

use std::collections::BTreeSet;

/// Smallest block: one 4 KiB page.
pub const MIN_ORDER: u32 = 12;

#[derive(Debug)]
pub(crate) struct Buddy {
    max_order: u32,
    /// Free block offsets per order (index = order - MIN_ORDER).
    free: Vec<BTreeSet<usize>>,
    free_bytes: usize,
}

impl Buddy {
    /// A buddy over a chunk of 2^max_order bytes, all free.
    pub(crate) fn new(max_order: u32) -> Buddy {
        let mut free = vec![BTreeSet::new(); (max_order - MIN_ORDER + 1) as usize];
        free[(max_order - MIN_ORDER) as usize].insert(0);
        Buddy {
            max_order,
            free,
            free_bytes: 1 << max_order,
        }
    }

    /// Allocates a block of 2^order bytes; its offset, or `None` when nothing fits.
    pub(crate) fn alloc(&mut self, order: u32) -> Option<usize> {
        let from = (order..=self.max_order).find(|&o| !self.list(o).is_empty())?;
        let off = self.list_mut(from).pop_first()?;
        // Split down, keeping the lower half and freeing each upper half.
        for o in (order..from).rev() {
            self.list_mut(o).insert(off + (1 << o));
        }
        self.free_bytes -= 1 << order;
        Some(off)
    }

    /// Frees the block at `off` of 2^order bytes, merging with free buddies.
    pub(crate) fn free(&mut self, mut off: usize, mut order: u32) {
        self.free_bytes += 1 << order;
        while order < self.max_order {
            let buddy = off ^ (1 << order);
            if !self.list_mut(order).remove(&buddy) {
                break;
            }
            off &= !(1 << order);
            order += 1;
        }
        let fresh = self.list_mut(order).insert(off);
        debug_assert!(fresh, "double free of block {off:#x} order {order}");
    }

    /// Bytes free in this chunk (possibly fragmented).
    pub(crate) fn free_bytes(&self) -> usize {
        self.free_bytes
    }

    fn list(&self, order: u32) -> &BTreeSet<usize> {
        &self.free[(order - MIN_ORDER) as usize]
    }

    fn list_mut(&mut self, order: u32) -> &mut BTreeSet<usize> {
        &mut self.free[(order - MIN_ORDER) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_merge_back_to_one_block() {
        let mut b = Buddy::new(16); // 64 KiB: 16 pages
        let offs: Vec<usize> = (0..16).map(|_| b.alloc(12).unwrap()).collect();
        assert!(b.alloc(12).is_none());
        assert_eq!(b.free_bytes(), 0);
        let mut sorted = offs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 16);
        for o in offs {
            b.free(o, 12);
        }
        assert_eq!(b.free_bytes(), 1 << 16);
        assert_eq!(b.alloc(16), Some(0), "fully merged");
    }

    #[test]
    fn blocks_are_naturally_aligned() {
        let mut b = Buddy::new(20);
        let _a = b.alloc(12).unwrap();
        let big = b.alloc(15).unwrap();
        assert_eq!(big % (1 << 15), 0);
        let mid = b.alloc(13).unwrap();
        assert_eq!(mid % (1 << 13), 0);
    }
}
