//! Fabrics commands: Connect (admin queue: create a controller; I/O queue: join one) and
//! Property Get/Set (CAP, VS, CC, CSTS).

use std::collections::BTreeSet;
use std::time::Instant;

use super::state::Controller;
use super::{Action, Pending, QueueCore};
use crate::nvmf::config::DISCOVERY_NQN;
use crate::nvmf::status::Status;
use crate::nvmf::wire::{fctype, Command, Sgl};

/// Bytes of Connect data.
pub(crate) const CONNECT_DATA_LEN: usize = 1024;

/// Property offsets.
pub(crate) const PROP_CAP: u32 = 0x00;
pub(crate) const PROP_VS: u32 = 0x08;
pub(crate) const PROP_CC: u32 = 0x14;
pub(crate) const PROP_CSTS: u32 = 0x1c;

/// NVMe version reported (1.3.0): the host then requires Identify CNS 3.
pub(crate) const VERSION: u32 = 0x0001_0300;

/// CC bits.
pub(crate) const CC_EN: u32 = 1;
const CC_SHN_SHIFT: u32 = 14;
/// CSTS bits.
pub(crate) const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 1 << 1;
pub(crate) const CSTS_SHST_CMPLT: u32 = 0b10 << 2;

/// Byte offsets used in Invalid Parameter results (`IPO`); IATTR 1 = Connect data.
const IPO_SQE_QID: u64 = 42;
const IPO_SQE_SQSIZE: u64 = 44;
const IPO_DATA_CNTLID: u64 = (1 << 16) | 16;
const IPO_DATA_SUBNQN: u64 = (1 << 16) | 256;
const IPO_DATA_HOSTNQN: u64 = (1 << 16) | 512;

/// A fabrics command on any queue.
pub(crate) fn on_fabrics(
    q: &mut QueueCore,
    cmd: &Command,
    in_capsule: &[u8],
    now: Instant,
) -> Action {
    let cid = cmd.cid();
    match cmd.fctype() {
        fctype::CONNECT => connect(q, cmd, in_capsule, now),
        fctype::PROPERTY_GET | fctype::PROPERTY_SET if q.qid == 0 => {
            let Some(cntlid) = q.cntlid else {
                return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
            };
            if cmd.fctype() == fctype::PROPERTY_GET {
                property_get(q, cntlid, cmd)
            } else {
                property_set(q, cntlid, cmd)
            }
        }
        _ => q.done(cid, Status::INVALID_OPCODE.with_dnr()),
    }
}

fn connect(q: &mut QueueCore, cmd: &Command, in_capsule: &[u8], now: Instant) -> Action {
    let cid = cmd.cid();
    if q.cntlid.is_some() {
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    }
    let recfmt = cmd.cdw(10) & 0xffff;
    let qid = (cmd.cdw(10) >> 16) as u16;
    let sqsize = (cmd.cdw(11) & 0xffff) as u16;
    let kato_ms = cmd.cdw(12);
    if recfmt != 0 {
        return q.done(cid, Status::CONNECT_FORMAT.with_dnr());
    }
    let invalid = Status::CONNECT_INVALID_PARAM.with_dnr();
    if qid != q.qid {
        return q.done_result(cid, invalid, IPO_SQE_QID);
    }
    let depth_max = if qid == 0 {
        u32::from(crate::nvmf::wire::ADMIN_QUEUE_SIZE)
    } else {
        u32::from(q.core.lock().limits.queue_depth_max)
    };
    // sqsize is 0's based; it may not exceed what the rdma_cm request announced (the
    // receives posted for this queue) nor CAP.MQES.
    if sqsize == 0 || sqsize >= q.sq_entries || u32::from(sqsize) + 1 > depth_max {
        return q.done_result(cid, invalid, IPO_SQE_SQSIZE);
    }
    match cmd.sgl() {
        Sgl::Keyed { len, .. } if len as usize == CONNECT_DATA_LEN => {
            q.pending.insert(cid, Pending::Connect { kato_ms });
            Action::FetchData { cid, len }
        }
        Sgl::InCapsule { offset, len } if len as usize == CONNECT_DATA_LEN => {
            match in_capsule_slice(in_capsule, offset, len) {
                Some(data) => on_connect_data(q, cid, kato_ms, data, now),
                None => q.done(cid, Status::SGL_INVALID_OFFSET.with_dnr()),
            }
        }
        Sgl::Invalid { .. } => q.done(cid, Status::SGL_INVALID_TYPE.with_dnr()),
        _ => q.done(cid, Status::SGL_INVALID_DATA_LEN.with_dnr()),
    }
}

/// The bytes `offset..offset+len` of the in-capsule data, if they arrived.
pub(crate) fn in_capsule_slice(in_capsule: &[u8], offset: u64, len: u32) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len as usize)?;
    in_capsule.get(start..end)
}

/// A NUL-terminated (or full-width) string field.
fn c_str(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Connect data arrived: create (admin) or join (I/O) a controller.
pub(crate) fn on_connect_data(
    q: &mut QueueCore,
    cid: u16,
    kato_ms: u32,
    data: &[u8],
    now: Instant,
) -> Action {
    if data.len() < CONNECT_DATA_LEN {
        return q.done(cid, Status::SGL_INVALID_DATA_LEN.with_dnr());
    }
    let mut hostid = [0u8; 16];
    hostid.copy_from_slice(&data[0..16]);
    let data_cntlid = u16::from_le_bytes([data[16], data[17]]);
    let subnqn = c_str(&data[256..512]);
    let hostnqn = c_str(&data[512..768]);
    let invalid = Status::CONNECT_INVALID_PARAM.with_dnr();

    let core = q.core.clone();
    let mut s = core.lock();
    if q.qid == 0 {
        let subsys = if subnqn == DISCOVERY_NQN {
            None
        } else {
            match s.subsystem_index(&subnqn) {
                Some(i) => Some(i),
                None => {
                    drop(s);
                    return q.done_result(cid, invalid, IPO_DATA_SUBNQN);
                }
            }
        };
        if let Some(i) = subsys {
            if !s.subsystems[i].allows(&hostnqn) {
                drop(s);
                return q.done_result(
                    cid,
                    Status::CONNECT_INVALID_HOST.with_dnr(),
                    IPO_DATA_HOSTNQN,
                );
            }
        }
        if hostnqn.is_empty() {
            drop(s);
            return q.done_result(cid, invalid, IPO_DATA_HOSTNQN);
        }
        let Some(cntlid) = s.alloc_cntlid() else {
            drop(s);
            return q.done(cid, Status::CONNECT_CTRL_BUSY.with_dnr());
        };
        let granted = if subsys.is_some() {
            s.limits.max_io_queues
        } else {
            0
        };
        s.controllers.insert(
            cntlid,
            Controller {
                subsys,
                hostnqn,
                hostid,
                kato_ms,
                last_seen: now,
                cc: 0,
                csts: 0,
                queues_granted: granted,
                io_qids: BTreeSet::new(),
                aec: 0,
                expired: false,
            },
        );
        s.counters.controllers_created += 1;
        drop(s);
        q.cntlid = Some(cntlid);
        return q.done_result(cid, Status::SUCCESS, u64::from(cntlid));
    }

    // I/O queue: join the controller named in the connect data.
    let qid = q.qid;
    // Linux 6.12 also names the controller in the rdma_cm private data of I/O queues.
    let cm_ok = q.cm_cntlid == 0 || q.cm_cntlid == data_cntlid;
    let shared = &mut *s;
    let subsystems = &shared.subsystems;
    let found = shared.controllers.get_mut(&data_cntlid).filter(|c| {
        let nqn = c
            .subsys
            .map_or(DISCOVERY_NQN, |i| subsystems[i].nqn.as_str());
        cm_ok && nqn == subnqn && c.hostnqn == hostnqn && c.hostid == hostid
    });
    let Some(c) = found else {
        drop(s);
        return q.done_result(cid, invalid, IPO_DATA_CNTLID);
    };
    if c.subsys.is_none() || qid > c.queues_granted || c.io_qids.contains(&qid) {
        drop(s);
        return q.done_result(cid, invalid, IPO_SQE_QID);
    }
    c.io_qids.insert(qid);
    c.last_seen = now;
    drop(s);
    q.cntlid = Some(data_cntlid);
    q.done_result(cid, Status::SUCCESS, u64::from(data_cntlid))
}

/// CAP for a controller with queues of at most `depth` entries.
pub(crate) fn cap(depth: u16) -> u64 {
    let mqes = u64::from(depth.saturating_sub(1));
    let cqr = 1u64 << 16; // physically contiguous queues required
    let to = 15u64 << 24; // 7.5 s ready timeout (500 ms units)
    let css_nvm = 1u64 << 37; // NVM command set; no CSI bit: the host stays on NVM paths
    mqes | cqr | to | css_nvm // MPSMIN = MPSMAX = 0 (4 KiB)
}

fn property_get(q: &mut QueueCore, cntlid: u16, cmd: &Command) -> Action {
    let cid = cmd.cid();
    let size8 = cmd.cdw(10) & 0x7 == 1;
    let offset = cmd.cdw(11);
    let s = q.core.lock();
    let Some(c) = s.controllers.get(&cntlid) else {
        drop(s);
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    };
    let value = match (size8, offset) {
        (true, PROP_CAP) => Some(cap(s.limits.queue_depth_max)),
        (false, PROP_VS) => Some(u64::from(VERSION)),
        (false, PROP_CC) => Some(u64::from(c.cc)),
        (false, PROP_CSTS) => Some(u64::from(c.csts)),
        _ => None,
    };
    drop(s);
    match value {
        Some(v) => q.done_result(cid, Status::SUCCESS, v),
        None => q.done(cid, Status::INVALID_FIELD.with_dnr()),
    }
}

fn property_set(q: &mut QueueCore, cntlid: u16, cmd: &Command) -> Action {
    let cid = cmd.cid();
    let size8 = cmd.cdw(10) & 0x7 == 1;
    if size8 || cmd.cdw(11) != PROP_CC {
        return q.done(cid, Status::INVALID_FIELD.with_dnr());
    }
    let new = cmd.cdw(12);
    let mut s = q.core.lock();
    let Some(c) = s.controllers.get_mut(&cntlid) else {
        drop(s);
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    };
    let discovery = c.subsys.is_none();
    apply_cc(c, new, discovery);
    drop(s);
    q.done(cid, Status::SUCCESS)
}

/// A CC write: enable (if the queue entry sizes are the NVM ones) -> CSTS.RDY, disable ->
/// reset, shutdown notification -> shutdown complete.
fn apply_cc(c: &mut Controller, new: u32, discovery: bool) {
    let old = c.cc;
    c.cc = new;
    let shn = |v: u32| (v >> CC_SHN_SHIFT) & 0x3;
    if new & CC_EN != 0 && old & CC_EN == 0 {
        let iosqes = (new >> 16) & 0xf;
        let iocqes = (new >> 20) & 0xf;
        let mps = (new >> 7) & 0xf;
        let ams = (new >> 11) & 0x7;
        let css = (new >> 4) & 0x7;
        let ok = mps == 0 && ams == 0 && css == 0 && (discovery || (iosqes == 6 && iocqes == 4));
        c.csts = if ok { CSTS_RDY } else { CSTS_CFS };
    }
    if new & CC_EN == 0 && old & CC_EN != 0 {
        // Controller reset.
        c.csts = 0;
    }
    if shn(new) != 0 && shn(old) == 0 {
        c.csts = (c.csts & !CSTS_RDY) | CSTS_SHST_CMPLT;
        c.cc &= !CC_EN;
    }
    if shn(new) == 0 && shn(old) != 0 {
        c.csts &= !CSTS_SHST_CMPLT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields() {
        let c = cap(128);
        assert_eq!(c & 0xffff, 127);
        assert_eq!((c >> 16) & 1, 1);
        assert_eq!((c >> 24) & 0xff, 15);
        assert_eq!((c >> 37) & 0xff, 1);
        assert_eq!((c >> 48) & 0xf, 0);
    }
}
