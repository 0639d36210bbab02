//! CRC32C (Castagnoli), the checksum `--verify` compares: the `crc32c` crate, which uses the
//! CPU's CRC32 instruction (SSE 4.2, ARMv8) where there is one and a table otherwise.

/// Incremental CRC32C.
#[derive(Clone, Copy, Debug)]
pub struct Crc32c(u32);

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c::new()
    }
}

impl Crc32c {
    /// Fresh state.
    pub fn new() -> Crc32c {
        Crc32c(0)
    }
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0 = ::crc32c::crc32c_append(self.0, data);
    }
    /// The checksum of everything fed.
    pub fn finish(&self) -> u32 {
        self.0
    }
}

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(data);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // RFC 3720 (iSCSI) B.4 test vectors and the classic check value.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn incremental_equals_one_shot_and_detects_flips() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut c = Crc32c::new();
        for part in data.chunks(777) {
            c.update(part);
        }
        assert_eq!(c.finish(), crc32c(&data));
        let mut flipped = data.clone();
        flipped[5000] ^= 0x10;
        assert_ne!(crc32c(&flipped), crc32c(&data));
    }
}
