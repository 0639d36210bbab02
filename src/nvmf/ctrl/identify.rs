//! Identify: controller (CNS 1), namespace (CNS 0), active namespace list (CNS 2) and
//! namespace identification descriptors (CNS 3), and the NVM command set's controller
//! structure (CNS 6, CSI 0). Every structure is 4096 bytes.

use super::admin::{return_data, AERL};
use super::fabrics::VERSION;
use super::state::{Limits, Namespace, Subsystem};
use super::Action;
use super::QueueCore;
use crate::nvmf::config::DISCOVERY_NQN;
use crate::nvmf::status::Status;
use crate::nvmf::wire::Command;

/// Bytes of every Identify structure.
pub(crate) const IDENTIFY_LEN: usize = 4096;

mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_DESCRIPTORS: u8 = 0x03;
    pub const CSI_CONTROLLER: u8 = 0x06;
}

/// Keep Alive granularity reported (KAS, 100 ms units): 1 s.
pub(crate) const KAS: u16 = 10;

/// ONCS bits.
pub(crate) const ONCS_DSM: u16 = 1 << 2;
pub(crate) const ONCS_WRITE_ZEROES: u16 = 1 << 3;

/// Identify CNTRLTYPE values.
pub(crate) const CNTRLTYPE_IO: u8 = 1;
pub(crate) const CNTRLTYPE_DISCOVERY: u8 = 2;

/// Namespace Identifier Types (CNS 3).
const NIDT_NGUID: u8 = 2;
const NIDT_UUID: u8 = 3;

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// An ASCII field padded with spaces (SN, MN, FR).
fn put_ascii(buf: &mut [u8], off: usize, width: usize, s: &str) {
    let field = &mut buf[off..off + width];
    field.fill(b' ');
    let n = s.len().min(width);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// The Identify command.
pub(crate) fn identify(q: &mut QueueCore, cntlid: u16, cmd: &Command) -> Action {
    let cid = cmd.cid();
    let which = (cmd.cdw(10) & 0xff) as u8;
    let nsid = cmd.nsid();
    let s = q.core.lock();
    let Some(c) = s.controllers.get(&cntlid) else {
        drop(s);
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    };
    let subsys = c.subsys.map(|i| &s.subsystems[i]);
    let built: Result<Vec<u8>, Status> = match (which, subsys) {
        (cns::CONTROLLER, _) => Ok(controller(cntlid, subsys, &s.limits)),
        (_, None) => Err(Status::INVALID_FIELD.with_dnr()),
        (cns::NAMESPACE, Some(sub)) => sub
            .namespace(nsid)
            .map(namespace)
            .ok_or(Status::INVALID_NS.with_dnr()),
        (cns::ACTIVE_NS_LIST, Some(sub)) => active_list(sub, nsid),
        // The NVM command set's controller structure (Linux reads it at VS >= 1.2 for the
        // Write Zeroes / DSM limits): all zero, no limits beyond MDTS.
        (cns::CSI_CONTROLLER, Some(_)) if cmd.cdw(11) >> 24 == 0 => Ok(vec![0u8; IDENTIFY_LEN]),
        (cns::NS_DESCRIPTORS, Some(sub)) => sub
            .namespace(nsid)
            .map(descriptors)
            .ok_or(Status::INVALID_NS.with_dnr()),
        _ => Err(Status::INVALID_FIELD.with_dnr()),
    };
    drop(s);
    match built {
        Ok(data) => return_data(q, cmd, data),
        Err(status) => q.done(cid, status),
    }
}

/// Identify Controller for an I/O (`subsys` set) or discovery controller.
pub(crate) fn controller(cntlid: u16, subsys: Option<&Subsystem>, l: &Limits) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    // VID, SSVID 0 (bytes 0..4).
    let (serial, model, nqn) = match subsys {
        Some(s) => (s.serial.as_str(), s.model.as_str(), s.nqn.as_str()),
        None => ("", "peerpipe discovery", DISCOVERY_NQN),
    };
    put_ascii(&mut b, 4, 20, serial);
    put_ascii(
        &mut b,
        24,
        40,
        if model.is_empty() { "peerpipe" } else { model },
    );
    put_ascii(&mut b, 64, 8, env!("CARGO_PKG_VERSION"));
    b[72] = 6; // RAB: 64 commands
               // IEEE OUI 0 (bytes 73..76).
    if subsys.is_some() {
        b[76] = 1 << 1; // CMIC: more than one controller may join the subsystem
    }
    b[77] = (l.mdts_bytes / 4096).trailing_zeros() as u8; // MDTS in 4 KiB (MPSMIN) units
    put(&mut b, 78, &cntlid.to_le_bytes());
    put(&mut b, 80, &VERSION.to_le_bytes());
    // OAES 0 (92): no optional async events.
    put(&mut b, 96, &1u32.to_le_bytes()); // CTRATT: 128-bit host identifier
    b[111] = if subsys.is_some() {
        CNTRLTYPE_IO
    } else {
        CNTRLTYPE_DISCOVERY
    };
    b[258] = 3; // ACL
    b[259] = AERL;
    b[261] = 1 << 2; // LPA: extended data (NUMDU, LPOL/LPOU)
    b[262] = 0; // ELPE: one error log entry
    put(&mut b, 320, &KAS.to_le_bytes());
    b[512] = 0x66; // SQES
    b[513] = 0x44; // CQES
    put(&mut b, 514, &l.queue_depth_max.to_le_bytes()); // MAXCMD
    if let Some(s) = subsys {
        let nn = s.namespaces.iter().map(|n| n.info.nsid).max().unwrap_or(0);
        put(&mut b, 516, &nn.to_le_bytes());
        let mut oncs = 0u16;
        if s.namespaces.iter().any(|n| n.info.supports_write_zeroes) {
            oncs |= ONCS_WRITE_ZEROES;
        }
        if s.namespaces.iter().any(|n| n.info.supports_deallocate) {
            oncs |= ONCS_DSM;
        }
        put(&mut b, 520, &oncs.to_le_bytes());
        if s.namespaces.iter().any(|n| n.info.volatile_write_cache) {
            b[525] = 1; // VWC present
        }
    }
    let mut sgls = 1u32 | (1 << 2); // SGLs without alignment rules; keyed data blocks
    if l.inline_data_size > 0 {
        sgls |= 1 << 20; // offset (in-capsule) data blocks
    }
    put(&mut b, 536, &sgls.to_le_bytes());
    let nqn_bytes = nqn.as_bytes();
    put(&mut b, 768, &nqn_bytes[..nqn_bytes.len().min(255)]);
    put(
        &mut b,
        1792,
        &((64 + l.inline_data_size) / 16).to_le_bytes(),
    ); // IOCCSZ
    put(&mut b, 1796, &1u32.to_le_bytes()); // IORCSZ
                                            // ICDOFF 0 (1800), CTRATTR 0: dynamic controller model.
    b[1803] = 1; // MSDBD
    b
}

/// Identify Namespace.
fn namespace(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let i = &ns.info;
    put(&mut b, 0, &i.blocks.to_le_bytes()); // NSZE
    put(&mut b, 8, &i.blocks.to_le_bytes()); // NCAP
    put(&mut b, 16, &i.blocks.to_le_bytes()); // NUSE
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0
    b[30] = 1; // NMIC: may be attached to several controllers
    let bytes = u128::from(i.blocks) * u128::from(i.lba_size);
    put(&mut b, 48, &bytes.to_le_bytes()); // NVMCAP
    put(&mut b, 104, &ns.nguid);
    // LBAF0 (128): MS 0, LBADS = log2(lba_size), RP 0.
    b[130] = i.lba_size.trailing_zeros() as u8;
    b
}

/// Active namespace ids above `nsid`, ascending, at most 1024.
fn active_list(sub: &Subsystem, nsid: u32) -> Result<Vec<u8>, Status> {
    if nsid >= 0xffff_fffe {
        return Err(Status::INVALID_NS.with_dnr());
    }
    let mut b = vec![0u8; IDENTIFY_LEN];
    let ids = sub
        .namespaces
        .iter()
        .map(|n| n.info.nsid)
        .filter(|&id| id > nsid);
    for (k, id) in ids.take(IDENTIFY_LEN / 4).enumerate() {
        put(&mut b, k * 4, &id.to_le_bytes());
    }
    Ok(b)
}

/// Namespace identification descriptors: NGUID and UUID.
fn descriptors(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let mut off = 0;
    for (nidt, id) in [(NIDT_NGUID, &ns.nguid), (NIDT_UUID, &ns.uuid)] {
        b[off] = nidt;
        b[off + 1] = 16; // NIDL
        put(&mut b, off + 4, id);
        off += 4 + 16;
    }
    b
}
