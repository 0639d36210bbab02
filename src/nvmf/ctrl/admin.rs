//! Admin commands: dispatch, Set/Get Features, Keep Alive and Asynchronous Event Requests.
//! Identify and Get Log Page live in their own modules.

use super::{identify, log, Action, Pending, QueueCore};
use crate::nvmf::status::Status;
use crate::nvmf::wire::{opcode, Command, Sgl};

/// Outstanding Async Event Requests allowed, 0's based (Identify AERL).
pub(crate) const AERL: u8 = 3;

/// Feature identifiers served.
mod fid {
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const NUM_QUEUES: u8 = 0x07;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
}

/// An admin command on a connected, enabled controller.
pub(crate) fn on_admin(
    q: &mut QueueCore,
    cntlid: u16,
    cmd: &Command,
    _in_capsule: &[u8],
) -> Action {
    let cid = cmd.cid();
    match cmd.opcode() {
        opcode::IDENTIFY => identify::identify(q, cntlid, cmd),
        opcode::GET_LOG_PAGE => log::get_log_page(q, cntlid, cmd),
        opcode::SET_FEATURES => set_features(q, cntlid, cmd),
        opcode::GET_FEATURES => get_features(q, cntlid, cmd),
        // The timer was refreshed when the command arrived.
        opcode::KEEP_ALIVE => q.done(cid, Status::SUCCESS),
        opcode::ASYNC_EVENT => {
            let held = q
                .pending
                .values()
                .filter(|p| matches!(p, Pending::Aer))
                .count();
            if held > usize::from(AERL) {
                q.done(cid, Status::ASYNC_LIMIT.with_dnr())
            } else {
                q.pending.insert(cid, Pending::Aer);
                Action::Hold
            }
        }
        _ => q.done(cid, Status::INVALID_OPCODE.with_dnr()),
    }
}

/// Sends `data` to the command's keyed SGL, which must describe exactly `data.len()` bytes.
pub(crate) fn return_data(q: &QueueCore, cmd: &Command, data: Vec<u8>) -> Action {
    let cid = cmd.cid();
    match cmd.sgl() {
        Sgl::Keyed { len, .. } if len as usize == data.len() => Action::ReturnData {
            data,
            completion: q.completion(cid, Status::SUCCESS, 0),
        },
        Sgl::Keyed { .. } | Sgl::NoData => q.done(cid, Status::SGL_INVALID_DATA_LEN.with_dnr()),
        // Host-bound data cannot travel in the command capsule.
        Sgl::InCapsule { .. } => q.done(cid, Status::INVALID_FIELD.with_dnr()),
        Sgl::Invalid { .. } => q.done(cid, Status::SGL_INVALID_TYPE.with_dnr()),
    }
}

fn set_features(q: &mut QueueCore, cntlid: u16, cmd: &Command) -> Action {
    let cid = cmd.cid();
    if cmd.cdw(10) & (1 << 31) != 0 {
        return q.done(cid, Status::FEATURE_NOT_SAVEABLE.with_dnr());
    }
    let fid = (cmd.cdw(10) & 0xff) as u8;
    let value = cmd.cdw(11);
    let mut s = q.core.lock();
    let max = s.limits.max_io_queues;
    let Some(c) = s.controllers.get_mut(&cntlid) else {
        drop(s);
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    };
    let result = match fid {
        fid::NUM_QUEUES if c.subsys.is_some() => {
            let nsqr = value & 0xffff;
            let ncqr = value >> 16;
            if nsqr == 0xffff || ncqr == 0xffff {
                None
            } else {
                // 0's based on the wire; grant at most max_io_queues of each.
                let nsqa = (nsqr + 1).min(u32::from(max));
                let ncqa = (ncqr + 1).min(u32::from(max));
                c.queues_granted = nsqa.min(ncqa) as u16;
                Some(u64::from((nsqa - 1) | ((ncqa - 1) << 16)))
            }
        }
        fid::KEEP_ALIVE_TIMER => {
            c.kato_ms = value;
            Some(0)
        }
        fid::ASYNC_EVENT_CONFIG => {
            c.aec = value;
            Some(0)
        }
        _ => None,
    };
    drop(s);
    match result {
        Some(r) => q.done_result(cid, Status::SUCCESS, r),
        None => q.done(cid, Status::INVALID_FIELD.with_dnr()),
    }
}

fn get_features(q: &mut QueueCore, cntlid: u16, cmd: &Command) -> Action {
    let cid = cmd.cid();
    let fid = (cmd.cdw(10) & 0xff) as u8;
    let s = q.core.lock();
    let Some(c) = s.controllers.get(&cntlid) else {
        drop(s);
        return q.done(cid, Status::CMD_SEQ_ERROR.with_dnr());
    };
    let result = match fid {
        fid::NUM_QUEUES if c.subsys.is_some() => {
            let n = u32::from(c.queues_granted.max(1) - 1);
            Some(u64::from(n | (n << 16)))
        }
        fid::KEEP_ALIVE_TIMER => Some(u64::from(c.kato_ms)),
        fid::ASYNC_EVENT_CONFIG => Some(u64::from(c.aec)),
        _ => None,
    };
    drop(s);
    match result {
        Some(r) => q.done_result(cid, Status::SUCCESS, r),
        None => q.done(cid, Status::INVALID_FIELD.with_dnr()),
    }
}
