//! Get Log Page: Error Information (1), SMART / Health (2), Changed Namespace List (4) on
//! NVM controllers, and the Discovery log (0x70) on discovery controllers. Every page is
//! built whole and the requested window (offset LPOL/LPOU, length NUMDL/NUMDU) is cut
//! from it; bytes past the end of the page read as zero.

use std::net::SocketAddr;
use std::time::Instant;

use super::admin::return_data;
use super::state::{Shared, Subsystem};
use super::{Action, QueueCore};
use crate::nvmf::status::Status;
use crate::nvmf::wire::Command;

/// Log page identifiers.
pub(crate) mod lid {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const CHANGED_NS: u8 = 0x04;
    pub const DISCOVERY: u8 = 0x70;
}

/// Bytes of the discovery log header and of each entry.
pub(crate) const DISC_HDR_LEN: usize = 1024;
pub(crate) const DISC_ENTRY_LEN: usize = 1024;
/// Generation counter of the discovery log: the subsystem set never changes while a
/// listener runs.
pub(crate) const DISC_GENCTR: u64 = 1;

/// Bytes of one error log entry, of the SMART page, of the changed namespace list.
const ERROR_ENTRY_LEN: usize = 64;
const SMART_LEN: usize = 512;
const CHANGED_NS_LEN: usize = 4096;

pub(crate) fn get_log_page(q: &mut QueueCore, cntlid: u16, cmd: &Command) -> Action {
    let cid = cmd.cid();
    let page_id = (cmd.cdw(10) & 0xff) as u8;
    let numd = u64::from(cmd.cdw(10) >> 16) | (u64::from(cmd.cdw(11) & 0xffff) << 16);
    let len = (numd + 1) * 4;
    let offset = u64::from(cmd.cdw(12)) | (u64::from(cmd.cdw(13)) << 32);
    let s = q.core.lock();
    if offset % 4 != 0 || len > u64::from(s.limits.mdts_bytes) {
        drop(s);
        return q.done(cid, Status::INVALID_FIELD.with_dnr());
    }
    let Some(c) = s.controllers.get(&cntlid) else {
        drop(s);
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    };
    let page = match (page_id, c.subsys) {
        (lid::DISCOVERY, None) => Some(discovery_log(&s, &c.hostnqn)),
        (lid::ERROR, Some(_)) => Some(vec![0u8; ERROR_ENTRY_LEN]),
        (lid::SMART, Some(_)) => Some(smart(&s, Instant::now())),
        (lid::CHANGED_NS, Some(_)) => Some(vec![0u8; CHANGED_NS_LEN]),
        _ => None,
    };
    drop(s);
    let Some(page) = page else {
        return q.done(cid, Status::INVALID_FIELD.with_dnr());
    };
    match window(&page, offset, len) {
        Some(data) => return_data(q, cmd, data),
        None => q.done(cid, Status::INVALID_FIELD.with_dnr()),
    }
}

/// `len` bytes of `page` from `offset`, zero-filled past its end; `None` if the offset lies
/// beyond the page.
pub(crate) fn window(page: &[u8], offset: u64, len: u64) -> Option<Vec<u8>> {
    let start = usize::try_from(offset).ok().filter(|&o| o <= page.len())?;
    let len = usize::try_from(len).ok()?;
    let mut out = vec![0u8; len];
    let avail = (page.len() - start).min(len);
    out[..avail].copy_from_slice(&page[start..start + avail]);
    Some(out)
}

/// The discovery log as `hostnqn` sees it: the subsystems it may connect to.
pub(crate) fn discovery_log(s: &Shared, hostnqn: &str) -> Vec<u8> {
    let visible: Vec<&Subsystem> = s.subsystems.iter().filter(|x| x.allows(hostnqn)).collect();
    let mut b = vec![0u8; DISC_HDR_LEN + DISC_ENTRY_LEN * visible.len()];
    b[0..8].copy_from_slice(&DISC_GENCTR.to_le_bytes());
    b[8..16].copy_from_slice(&(visible.len() as u64).to_le_bytes());
    // RECFMT 0 (16..18).
    for (k, sub) in visible.iter().enumerate() {
        let e = &mut b[DISC_HDR_LEN + k * DISC_ENTRY_LEN..][..DISC_ENTRY_LEN];
        entry(e, sub, s.limits.listen, s.limits.port_id);
    }
    b
}

fn put_str(field: &mut [u8], s: &str) {
    let n = s.len().min(field.len().saturating_sub(1));
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// One 1024-byte discovery log entry.
fn entry(e: &mut [u8], sub: &Subsystem, listen: SocketAddr, port_id: u16) {
    e[0] = 1; // TRTYPE: RDMA
    e[1] = if listen.is_ipv4() { 1 } else { 2 }; // ADRFAM: IPv4 / IPv6
    e[2] = 2; // SUBTYPE: NVMe subsystem
    e[3] = 0; // TREQ: secure channel not specified
    e[4..6].copy_from_slice(&port_id.to_le_bytes());
    e[6..8].copy_from_slice(&0xffffu16.to_le_bytes()); // CNTLID: dynamic model
    e[8..10].copy_from_slice(&32u16.to_le_bytes()); // ASQSZ
    put_str(&mut e[32..64], &listen.port().to_string()); // TRSVCID
    put_str(&mut e[256..512], &sub.nqn); // SUBNQN
    put_str(&mut e[512..768], &listen.ip().to_string()); // TRADDR
    e[768] = 1; // TSAS.RDMA QPTYPE: reliable connected
    e[769] = 1; // PRTYPE: no provider specified
    e[770] = 1; // CMS: rdma_cm
}

/// A 128-bit little-endian counter field.
fn put_u128(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 16].copy_from_slice(&u128::from(v).to_le_bytes());
}

/// SMART / Health Information: no warnings, 40 C, full spare, counters of this listener.
fn smart(s: &Shared, now: Instant) -> Vec<u8> {
    let mut b = vec![0u8; SMART_LEN];
    let c = &s.counters;
    b[1..3].copy_from_slice(&313u16.to_le_bytes()); // composite temperature, kelvin
    b[3] = 100; // available spare %
    b[4] = 10; // available spare threshold %
               // Data units are thousands of 512-byte units, rounded up.
    put_u128(&mut b, 32, c.bytes_read.div_ceil(512_000));
    put_u128(&mut b, 48, c.bytes_written.div_ceil(512_000));
    put_u128(&mut b, 64, c.read_cmds);
    put_u128(&mut b, 80, c.write_cmds);
    put_u128(&mut b, 112, 1); // power cycles
    put_u128(
        &mut b,
        128,
        now.saturating_duration_since(s.started).as_secs() / 3600,
    );
    b
}

#[cfg(test)]
mod tests {
    use super::window;

    #[test]
    fn window_cuts_and_pads() {
        let page: Vec<u8> = (0..16).collect();
        assert_eq!(window(&page, 4, 4), Some(vec![4, 5, 6, 7]));
        assert_eq!(window(&page, 12, 8), Some(vec![12, 13, 14, 15, 0, 0, 0, 0]));
        assert_eq!(window(&page, 16, 4), Some(vec![0; 4]));
        assert_eq!(window(&page, 20, 4), None);
    }
}
