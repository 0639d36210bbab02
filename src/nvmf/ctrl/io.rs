//! I/O commands (stub).
use super::{Action, QueueCore};
use crate::nvmf::status::Status;
use crate::nvmf::wire::Command;

pub(crate) fn on_io(q: &mut QueueCore, _cntlid: u16, cmd: &Command, _in_capsule: &[u8]) -> Action {
    q.done(cmd.cid(), Status::INVALID_OPCODE.with_dnr())
}

pub(crate) fn on_dsm_data(
    q: &mut QueueCore,
    _cntlid: u16,
    cid: u16,
    _nsid: u32,
    _ranges: u32,
    _data: &[u8],
) -> Action {
    q.done(cid, Status::INVALID_OPCODE.with_dnr())
}
