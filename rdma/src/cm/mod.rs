//! Connection setup with rdma_cm: listener/acceptor, connector, private data, timeouts,
//! disconnect, and the CM event stream.
//!
//! Every connection id gets its own event channel (a non-blocking fd), so a connection's
//! events (disconnected, device removal, timewait exit) can be watched without a shared
//! dispatcher, and every wait has a timeout.
//!
//! - `event`: event kinds, the copied-out event, the per-id event channel;
//! - `id`: the rdma_cm id (a QP created through rdma_cm lives on one) and socket addresses;
//! - `params`: [`ConnParams`] and the setup both sides share (QP on the id, ACK timeout);
//! - `connector`: the client ([`Connector`]); `listener`: the server ([`Listener`],
//!   [`ConnectRequest`]); `connection`: an established [`Connection`].

mod connection;
mod connector;
mod event;
mod id;
mod listener;
mod params;

pub use connection::Connection;
pub use connector::Connector;
pub use event::{CmEvent, CmEventKind};
pub(crate) use id::CmId;
pub use listener::{ConnectRequest, Listener};
pub use params::ConnParams;
