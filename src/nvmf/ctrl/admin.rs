//! Admin commands (stub).
use super::{Action, QueueCore};
use crate::nvmf::status::Status;
use crate::nvmf::wire::Command;

pub(crate) fn on_admin(
    q: &mut QueueCore,
    _cntlid: u16,
    cmd: &Command,
    _in_capsule: &[u8],
) -> Action {
    q.done(cmd.cid(), Status::INVALID_OPCODE.with_dnr())
}
