//! Why a message or a conversation step was rejected.

use super::{MessageKind, Status, MSG_LEN, VERSION};

/// Why a message or a conversation step was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Fewer or more than [`MSG_LEN`] bytes arrived.
    #[error("message is {got} bytes, expected {MSG_LEN}: the peer is not a peerpipe replicator or the link truncated it")]
    BadLength {
        /// Bytes received.
        got: usize,
    },
    /// The magic number is wrong.
    #[error("bad magic {got:#010x}: the peer is not a peerpipe replicator")]
    BadMagic {
        /// Value received.
        got: u32,
    },
    /// The version is not ours.
    #[error(
        "protocol version {got}, this build speaks {VERSION}: run the same peerpipe on both ends"
    )]
    BadVersion {
        /// Version received.
        got: u8,
    },
    /// Unknown message type.
    #[error("unknown message type {got}")]
    UnknownKind {
        /// Type code received.
        got: u8,
    },
    /// Reserved or padding bytes are not zero.
    #[error("non-zero reserved bytes in a {kind} message")]
    Reserved {
        /// Message kind.
        kind: MessageKind,
    },
    /// A field is out of its range regardless of context.
    #[error("{kind}: {what}")]
    BadField {
        /// Message kind.
        kind: MessageKind,
        /// What is wrong.
        what: &'static str,
    },
    /// A status word's kind (its high 16 bits) is unknown, or `Ok` carries a value.
    /// [`Message::decode`](super::Message::decode) reports it as a [`ProtocolError::BadField`]
    /// of the message that carried it.
    #[error("unknown status word {got:#010x}")]
    BadStatus {
        /// Status word received.
        got: u32,
    },
    /// The proposed configuration is invalid.
    #[error("bad configuration: {what}")]
    BadConfig {
        /// What is wrong.
        what: &'static str,
    },
    /// The message is not allowed in the current state (e.g. data before hello).
    #[error("unexpected {got} message while {state}")]
    Unexpected {
        /// Message kind received.
        got: MessageKind,
        /// What the receiver was waiting for.
        state: &'static str,
    },
    /// A sequence number is outside the range, repeated, or out of the required order.
    #[error("{kind}: sequence {seq} rejected: {why}")]
    BadSequence {
        /// Message kind.
        kind: MessageKind,
        /// Sequence number received.
        seq: u64,
        /// Why.
        why: &'static str,
    },
    /// An offset/length does not match the block it names.
    #[error("{kind} seq {seq}: {what} is {got}, expected {expected}")]
    Mismatch {
        /// Message kind.
        kind: MessageKind,
        /// Block.
        seq: u64,
        /// Field.
        what: &'static str,
        /// Value received.
        got: u64,
        /// Value required.
        expected: u64,
    },
    /// A `BlockSent` did not arrive as a SEND_WITH_INV of the key of the window its block was
    /// written through (it came as a plain SEND, or invalidated another key), so the window is
    /// still open to the primary. A version-3 replica never invalidates a window itself: its
    /// LOCAL_INV of a window the peer may also invalidate crashes soft-RoCE kernels (Linux
    /// 6.12 `rxe_invalidate_mw`), so it refuses the block instead of writing it.
    #[error("BlockSent seq {seq} did not invalidate its window: protocol version {VERSION} requires each BlockSent to be a SEND_WITH_INV of the rkey of the window its block was written through")]
    NotInvalidating {
        /// Block.
        seq: u64,
    },
    /// The peer aborted.
    #[error("peer aborted: {status} (block {seq})")]
    PeerAborted {
        /// Peer's reason.
        status: Status,
        /// Block concerned, `u64::MAX` if none.
        seq: u64,
    },
}

impl ProtocolError {
    /// Small stable number for [`Status::Protocol`] in an abort sent to the offender.
    pub fn code(&self) -> u16 {
        match self {
            ProtocolError::BadLength { .. } => 1,
            ProtocolError::BadMagic { .. } => 2,
            ProtocolError::BadVersion { .. } => 3,
            ProtocolError::UnknownKind { .. } => 4,
            ProtocolError::Reserved { .. } => 5,
            ProtocolError::BadField { .. } | ProtocolError::BadStatus { .. } => 6,
            ProtocolError::BadConfig { .. } => 7,
            ProtocolError::Unexpected { .. } => 8,
            ProtocolError::BadSequence { .. } => 9,
            ProtocolError::Mismatch { .. } => 10,
            ProtocolError::PeerAborted { .. } => 11,
            ProtocolError::NotInvalidating { .. } => 12,
        }
    }
}
