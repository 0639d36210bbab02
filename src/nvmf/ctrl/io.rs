//! I/O commands: Read, Write, Flush, Write Zeroes and Dataset Management (deallocate).
//! Every check that involves the namespace happens here, so an [`IoCommand`] is safe to
//! execute as is: the namespace exists, the byte range lies inside it, a data transfer is at
//! most MDTS and its SGL describes exactly the bytes the command names.

use super::fabrics::in_capsule_slice;
use super::state::Namespace;
use super::{Action, IoCommand, IoKind, IoOp, NamespaceInfo, Pending, QueueCore};
use crate::nvmf::status::Status;
use crate::nvmf::wire::{opcode, Command, Sgl};

/// Flush of every namespace.
pub(crate) const NSID_ALL: u32 = 0xffff_ffff;
/// Read/Write cdw12: Force Unit Access.
const RW_FUA: u32 = 1 << 30;
/// DSM attribute: deallocate.
const DSM_AD: u32 = 1 << 2;
/// Bytes of one DSM range.
const DSM_RANGE_LEN: usize = 16;

/// What the I/O path needs from the shared state, copied out under the lock.
struct Target {
    subsystem: usize,
    namespaces: Vec<NamespaceInfo>,
    mdts_bytes: u32,
    inline_data_size: u32,
}

fn target(q: &QueueCore, cntlid: u16) -> Option<Target> {
    let s = q.core.lock();
    let subsystem = s.controllers.get(&cntlid)?.subsys?;
    let namespaces = s.subsystems[subsystem]
        .namespaces
        .iter()
        .map(|n: &Namespace| n.info)
        .collect();
    Some(Target {
        subsystem,
        namespaces,
        mdts_bytes: s.limits.mdts_bytes,
        inline_data_size: s.limits.inline_data_size,
    })
}

impl Target {
    /// A data-less command (Flush, Write Zeroes, Deallocate) for the backend.
    fn io(&self, cid: u16, nsid: u32, op: IoOp) -> IoCommand {
        IoCommand {
            cid,
            nsid,
            subsystem: self.subsystem,
            op,
            sgl: Sgl::NoData,
            fua: false,
        }
    }

    fn ns(&self, nsid: u32) -> Option<&NamespaceInfo> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }
}

/// Byte offset and length of `nlb` blocks (1-based count) at `slba`, if inside `ns`.
fn byte_range(ns: &NamespaceInfo, slba: u64, nlb: u64) -> Option<(u64, u64)> {
    let end = slba.checked_add(nlb)?;
    if end > ns.blocks {
        return None;
    }
    let lba = u64::from(ns.lba_size);
    Some((slba * lba, nlb * lba))
}

/// An I/O command on a connected, enabled controller.
pub(crate) fn on_io(q: &mut QueueCore, cntlid: u16, cmd: &Command, in_capsule: &[u8]) -> Action {
    let cid = cmd.cid();
    let op = cmd.opcode();
    if !matches!(
        op,
        opcode::READ | opcode::WRITE | opcode::FLUSH | opcode::WRITE_ZEROES | opcode::DSM
    ) {
        return q.done(cid, Status::INVALID_OPCODE.with_dnr());
    }
    let Some(t) = target(q, cntlid) else {
        // A discovery controller has no I/O queues; a freed controller serves nothing.
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    };
    let nsid = cmd.nsid();
    if op == opcode::FLUSH && nsid == NSID_ALL {
        if !t.namespaces.iter().any(|n| n.volatile_write_cache) {
            return q.done(cid, Status::SUCCESS);
        }
        return issue(q, t.io(cid, nsid, IoOp::Flush), IoKind::Other, 0);
    }
    let Some(ns) = t.ns(nsid).copied() else {
        return q.done(cid, Status::INVALID_NS.with_dnr());
    };
    match op {
        opcode::READ | opcode::WRITE => read_write(q, &t, &ns, cmd, in_capsule),
        opcode::FLUSH => {
            if !ns.volatile_write_cache {
                return q.done(cid, Status::SUCCESS);
            }
            issue(q, t.io(cid, nsid, IoOp::Flush), IoKind::Other, 0)
        }
        opcode::WRITE_ZEROES => {
            if !ns.supports_write_zeroes {
                return q.done(cid, Status::INVALID_OPCODE.with_dnr());
            }
            let slba = u64::from(cmd.cdw(10)) | (u64::from(cmd.cdw(11)) << 32);
            let nlb = u64::from(cmd.cdw(12) & 0xffff) + 1;
            match byte_range(&ns, slba, nlb) {
                Some((offset, len)) => {
                    let op = IoOp::WriteZeroes { offset, len };
                    issue(q, t.io(cid, nsid, op), IoKind::Other, 0)
                }
                None => q.done(cid, Status::LBA_OUT_OF_RANGE.with_dnr()),
            }
        }
        _ => dsm(q, &t, &ns, cmd, in_capsule),
    }
}

/// Records the command as in flight and hands it to the transport.
fn issue(q: &mut QueueCore, io: IoCommand, kind: IoKind, bytes: u64) -> Action {
    q.pending.insert(io.cid, Pending::Io { kind, bytes });
    Action::Io(io)
}

fn read_write(
    q: &mut QueueCore,
    t: &Target,
    ns: &NamespaceInfo,
    cmd: &Command,
    in_capsule: &[u8],
) -> Action {
    let cid = cmd.cid();
    let write = cmd.opcode() == opcode::WRITE;
    let sgl = cmd.sgl();
    // The descriptor's type first: reads need host memory, writes host memory or capsule.
    match sgl {
        Sgl::Invalid { .. } => return q.done(cid, Status::SGL_INVALID_TYPE.with_dnr()),
        Sgl::InCapsule { .. } if !write => return q.done(cid, Status::INVALID_FIELD.with_dnr()),
        _ => {}
    }
    let slba = u64::from(cmd.cdw(10)) | (u64::from(cmd.cdw(11)) << 32);
    let nlb = u64::from(cmd.cdw(12) & 0xffff) + 1;
    let Some((offset, len)) = byte_range(ns, slba, nlb) else {
        return q.done(cid, Status::LBA_OUT_OF_RANGE.with_dnr());
    };
    if len > u64::from(t.mdts_bytes) {
        return q.done(cid, Status::INVALID_FIELD.with_dnr());
    }
    // Fits: len <= MDTS <= u32::MAX.
    let len = len as u32;
    match sgl {
        Sgl::Keyed { len: l, .. } if l == len => {}
        Sgl::InCapsule { offset: o, len: l } => {
            if o.saturating_add(u64::from(l)) > u64::from(t.inline_data_size) {
                return q.done(cid, Status::SGL_INVALID_OFFSET.with_dnr());
            }
            if l != len || in_capsule_slice(in_capsule, o, l).is_none() {
                return q.done(cid, Status::SGL_INVALID_DATA_LEN.with_dnr());
            }
        }
        _ => return q.done(cid, Status::SGL_INVALID_DATA_LEN.with_dnr()),
    }
    let (op, kind) = if write {
        (IoOp::Write { offset, len }, IoKind::Write)
    } else {
        (IoOp::Read { offset, len }, IoKind::Read)
    };
    let io = IoCommand {
        fua: write && cmd.cdw(12) & RW_FUA != 0,
        sgl,
        ..t.io(cid, ns.nsid, op)
    };
    issue(q, io, kind, u64::from(len))
}

fn dsm(
    q: &mut QueueCore,
    t: &Target,
    ns: &NamespaceInfo,
    cmd: &Command,
    in_capsule: &[u8],
) -> Action {
    let cid = cmd.cid();
    if !ns.supports_deallocate {
        return q.done(cid, Status::INVALID_OPCODE.with_dnr());
    }
    if cmd.cdw(11) & DSM_AD == 0 {
        // Only hints (integral read/write): nothing to do.
        return q.done(cid, Status::SUCCESS);
    }
    let ranges = (cmd.cdw(10) & 0xff) + 1;
    let need = ranges * DSM_RANGE_LEN as u32;
    match cmd.sgl() {
        Sgl::Keyed { len, .. } if len == need => {
            q.pending.insert(
                cid,
                Pending::Dsm {
                    nsid: ns.nsid,
                    ranges,
                },
            );
            Action::FetchData { cid, len }
        }
        Sgl::InCapsule { offset, len } if len == need => {
            if offset.saturating_add(u64::from(len)) > u64::from(t.inline_data_size) {
                return q.done(cid, Status::SGL_INVALID_OFFSET.with_dnr());
            }
            match in_capsule_slice(in_capsule, offset, len) {
                Some(data) => deallocate(q, t, ns, cid, ranges, data),
                None => q.done(cid, Status::SGL_INVALID_DATA_LEN.with_dnr()),
            }
        }
        Sgl::Invalid { .. } => q.done(cid, Status::SGL_INVALID_TYPE.with_dnr()),
        _ => q.done(cid, Status::SGL_INVALID_DATA_LEN.with_dnr()),
    }
}

/// The DSM range list arrived (from `FetchData`).
pub(crate) fn on_dsm_data(
    q: &mut QueueCore,
    cntlid: u16,
    cid: u16,
    nsid: u32,
    ranges: u32,
    data: &[u8],
) -> Action {
    let Some(t) = target(q, cntlid) else {
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    };
    let Some(ns) = t.ns(nsid).copied() else {
        return q.done(cid, Status::INVALID_NS.with_dnr());
    };
    deallocate(q, &t, &ns, cid, ranges, data)
}

fn deallocate(
    q: &mut QueueCore,
    t: &Target,
    ns: &NamespaceInfo,
    cid: u16,
    ranges: u32,
    data: &[u8],
) -> Action {
    let need = ranges as usize * DSM_RANGE_LEN;
    let Some(list) = data.get(..need) else {
        return q.done(cid, Status::SGL_INVALID_DATA_LEN.with_dnr());
    };
    let mut out = Vec::with_capacity(ranges as usize);
    for r in list.chunks_exact(DSM_RANGE_LEN) {
        // Context attributes (0..4) are hints; NLB here is a 1-based count.
        let nlb = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
        let mut slba = [0u8; 8];
        slba.copy_from_slice(&r[8..16]);
        let slba = u64::from_le_bytes(slba);
        if nlb == 0 {
            continue;
        }
        match byte_range(ns, slba, nlb) {
            Some(range) => out.push(range),
            None => return q.done(cid, Status::LBA_OUT_OF_RANGE.with_dnr()),
        }
    }
    if out.is_empty() {
        return q.done(cid, Status::SUCCESS);
    }
    let op = IoOp::Deallocate { ranges: out };
    issue(q, t.io(cid, ns.nsid, op), IoKind::Other, 0)
}
