//! Splitting a byte range into blocks, and byte-range helpers.

use std::fmt;

/// A half-open byte range `[start, end)` on a drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bytes {}..{} ({} bytes)",
            self.start,
            self.end,
            self.len()
        )
    }
}

/// Merges sorted-or-not ranges into the smallest sorted list of disjoint, non-adjacent ranges.
pub fn coalesce(ranges: impl IntoIterator<Item = ByteRange>) -> Vec<ByteRange> {
    let mut v: Vec<ByteRange> = ranges.into_iter().filter(|r| !r.is_empty()).collect();
    v.sort();
    let mut out: Vec<ByteRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// One block of a [`Layout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Index inside the range (the protocol's sequence number).
    pub seq: u64,
    /// Byte offset on the drive.
    pub offset: u64,
    /// Length in bytes (block size, or less for the final block).
    pub len: u32,
}

impl Block {
    /// The drive bytes this block covers.
    pub fn range(&self) -> ByteRange {
        ByteRange {
            start: self.offset,
            end: self.offset + u64::from(self.len),
        }
    }
}

/// Why a range cannot be split into blocks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// Block size is zero, not a multiple of the LBA size, or too large.
    #[error("block size {block_size} is invalid: use a multiple of the {lba_size}-byte logical block size, at most 64 MiB")]
    BlockSize {
        /// Requested block size.
        block_size: u64,
        /// Device logical block size.
        lba_size: u32,
    },
    /// The LBA size is not a power of two.
    #[error("logical block size {0} is not a power of two")]
    LbaSize(u32),
    /// The range is empty.
    #[error("the range is empty: give a length > 0")]
    Empty,
    /// Offset or length not a multiple of the device's logical block size.
    #[error("range offset {offset} / length {len} must be multiples of the {lba_size}-byte logical block size (direct I/O cannot address partial sectors): round to {lba_size}")]
    Unaligned {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Device logical block size.
        lba_size: u32,
    },
    /// The range ends beyond the device (or overflows).
    #[error("range {offset}+{len} ends beyond the {capacity}-byte target: shorten it")]
    OutOfBounds {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Target size.
        capacity: u64,
    },
}

/// How a byte range maps onto blocks.
///
/// Policy for ranges not aligned to the block size: blocks are laid out from the range's
/// offset, so only the final block can be short (any multiple of the LBA size). Offsets and
/// lengths that are not multiples of the LBA size are rejected ([`LayoutError::Unaligned`]):
/// direct I/O and NVMe commands address whole logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    offset: u64,
    len: u64,
    block_size: u32,
    lba_size: u32,
}

impl Layout {
    /// Checks and builds a layout for `len` bytes at `offset` of a `capacity`-byte target.
    ///
    /// # Errors
    /// A [`LayoutError`] saying what to change.
    pub fn new(
        offset: u64,
        len: u64,
        block_size: u64,
        lba_size: u32,
        capacity: u64,
    ) -> Result<Layout, LayoutError> {
        if lba_size == 0 || !lba_size.is_power_of_two() {
            return Err(LayoutError::LbaSize(lba_size));
        }
        if block_size == 0
            || block_size % u64::from(lba_size) != 0
            || block_size > u64::from(crate::protocol::MAX_BLOCK_SIZE)
        {
            return Err(LayoutError::BlockSize {
                block_size,
                lba_size,
            });
        }
        if len == 0 {
            return Err(LayoutError::Empty);
        }
        let lba = u64::from(lba_size);
        if offset % lba != 0 || len % lba != 0 {
            return Err(LayoutError::Unaligned {
                offset,
                len,
                lba_size,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= capacity => {}
            _ => {
                return Err(LayoutError::OutOfBounds {
                    offset,
                    len,
                    capacity,
                })
            }
        }
        Ok(Layout {
            offset,
            len,
            block_size: block_size as u32,
            lba_size,
        })
    }

    /// Start of the range.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Length of the range.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Never true (empty ranges are rejected); for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Logical block size.
    pub fn lba_size(&self) -> u32 {
        self.lba_size
    }
    /// The whole range.
    pub fn range(&self) -> ByteRange {
        ByteRange {
            start: self.offset,
            end: self.offset + self.len,
        }
    }
    /// Number of blocks (the last may be short).
    pub fn blocks(&self) -> u64 {
        self.len.div_ceil(u64::from(self.block_size))
    }
    /// Block `seq`, or `None` past the end.
    pub fn block(&self, seq: u64) -> Option<Block> {
        let bs = u64::from(self.block_size);
        let rel = seq.checked_mul(bs).filter(|&r| r < self.len)?;
        Some(Block {
            seq,
            offset: self.offset + rel,
            len: (self.len - rel).min(bs) as u32,
        })
    }
    /// All blocks in order.
    pub fn iter(&self) -> impl Iterator<Item = Block> + '_ {
        (0..self.blocks()).filter_map(|s| self.block(s))
    }
    /// The protocol configuration for replica `replica_id` with this layout.
    pub fn config(&self, replica_id: u32, window: u32, flags: u32) -> crate::protocol::Config {
        crate::protocol::Config {
            replica_id,
            block_size: self.block_size,
            lba_size: self.lba_size,
            window,
            range_offset: self.offset,
            range_len: self.len,
            flags,
        }
    }
    /// The layout a validated protocol configuration describes.
    ///
    /// # Errors
    /// As [`Layout::new`], with `capacity` the local target size.
    pub fn from_config(c: &crate::protocol::Config, capacity: u64) -> Result<Layout, LayoutError> {
        Layout::new(
            c.range_offset,
            c.range_len,
            c.block_size.into(),
            c.lba_size,
            capacity,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_range_splits_evenly() {
        let l = Layout::new(0, 1 << 20, 65536, 512, 1 << 30).unwrap();
        assert_eq!(l.blocks(), 16);
        let v: Vec<_> = l.iter().collect();
        assert_eq!(v.len(), 16);
        assert!(v.iter().all(|b| b.len == 65536));
        assert_eq!(v[15].offset, 15 * 65536);
        assert_eq!(v[15].range().end, 1 << 20);
        assert_eq!(l.block(16), None);
    }

    #[test]
    fn short_final_block_and_offset_not_block_aligned() {
        // 4 KiB LBA, 64 KiB blocks, range starts mid-block and ends 12 KiB into a block.
        let l = Layout::new(8192, 3 * 65536 + 12288, 65536, 4096, 1 << 30).unwrap();
        assert_eq!(l.blocks(), 4);
        let last = l.block(3).unwrap();
        assert_eq!(last.len, 12288);
        assert_eq!(last.offset, 8192 + 3 * 65536);
        assert_eq!(last.range().end, l.range().end);
        // Blocks tile the range exactly.
        let total: u64 = l.iter().map(|b| u64::from(b.len)).sum();
        assert_eq!(total, l.len());
        let tiles = coalesce(l.iter().map(|b| b.range()));
        assert_eq!(tiles, vec![l.range()]);
        // A range smaller than one block is one short block.
        let tiny = Layout::new(0, 512, 65536, 512, 4096).unwrap();
        assert_eq!(tiny.blocks(), 1);
        assert_eq!(tiny.block(0).unwrap().len, 512);
    }

    #[test]
    fn bad_ranges_are_rejected_clearly() {
        assert_eq!(
            Layout::new(0, 0, 4096, 512, 1 << 20),
            Err(LayoutError::Empty)
        );
        let e = Layout::new(100, 4096, 4096, 512, 1 << 20).unwrap_err();
        assert!(matches!(e, LayoutError::Unaligned { .. }));
        assert!(e.to_string().contains("round to 512"), "{e}");
        assert!(matches!(
            Layout::new(0, 4097, 4096, 512, 1 << 20),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            Layout::new(0, 8192, 6000, 512, 1 << 20),
            Err(LayoutError::BlockSize { .. })
        ));
        assert!(matches!(
            Layout::new(0, 8192, 0, 512, 1 << 20),
            Err(LayoutError::BlockSize { .. })
        ));
        assert!(matches!(
            Layout::new(0, 8192, 4096, 1000, 1 << 20),
            Err(LayoutError::LbaSize(1000))
        ));
        assert!(matches!(
            Layout::new(1 << 20, 4096, 4096, 512, 1 << 20),
            Err(LayoutError::OutOfBounds { .. })
        ));
        assert!(matches!(
            Layout::new(u64::MAX - 511, 1024, 512, 512, u64::MAX),
            Err(LayoutError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn config_round_trip_agrees_with_protocol() {
        let l = Layout::new(4096, 5 * 8192 + 512, 8192, 512, 1 << 20).unwrap();
        let c = l.config(0, 8, 0);
        c.validate().unwrap();
        assert_eq!(c.blocks(), l.blocks());
        for b in l.iter() {
            assert_eq!(c.block_len(b.seq), Some(b.len));
            assert_eq!(c.block_offset(b.seq), b.offset);
        }
        assert_eq!(Layout::from_config(&c, 1 << 20), Ok(l));
    }

    #[test]
    fn coalesce_merges_overlaps_and_neighbours() {
        let r = |start, end| ByteRange { start, end };
        assert_eq!(
            coalesce([r(10, 20), r(0, 5), r(5, 8), r(19, 25), r(30, 30), r(40, 50)]),
            vec![r(0, 8), r(10, 25), r(40, 50)]
        );
        assert!(coalesce([]).is_empty());
    }
}
