//! The only place peerpipe copies payload bytes with the CPU, so they can be counted.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts payload bytes copied by the CPU. Zero-copy runs must end with [`CopyMeter::bytes`]
/// at 0; the bounce mode copies through [`CopyMeter::copy`] so the cost is visible.
#[derive(Debug, Default)]
pub struct CopyMeter {
    bytes: AtomicU64,
    copies: AtomicU64,
}

impl CopyMeter {
    /// A meter at zero.
    pub fn new() -> CopyMeter {
        CopyMeter::default()
    }

    /// Copies `src` into the start of `dst` and counts it; returns the bytes copied
    /// (`min(dst.len(), src.len())`: a short destination is the caller's bug, never an
    /// overrun).
    pub fn copy(&self, dst: &mut [u8], src: &[u8]) -> usize {
        let n = dst.len().min(src.len());
        dst[..n].copy_from_slice(&src[..n]);
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.copies.fetch_add(1, Ordering::Relaxed);
        n
    }

    /// Payload bytes copied so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Number of copy calls so far.
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_exactly_what_it_copies() {
        let m = CopyMeter::new();
        assert_eq!(m.bytes(), 0);
        let src = [7u8; 100];
        let mut dst = [0u8; 64];
        assert_eq!(m.copy(&mut dst, &src), 64);
        assert!(dst.iter().all(|&b| b == 7));
        let mut big = [0u8; 200];
        assert_eq!(m.copy(&mut big, &src), 100);
        assert_eq!(big[100], 0);
        assert_eq!(m.bytes(), 164);
        assert_eq!(m.copies(), 2);
    }
}
