//! io_uring NVMe passthrough (`IORING_OP_URING_CMD` on `/dev/ngXnY`) and O_DIRECT file I/O
//! for peerpipe (raw layer: `io-uring`).
//!
//! - [`Namespace`] opens an NVMe namespace and identifies it (LBA format, limits).
//! - [`FileTarget`] wraps a file or block device (O_DIRECT).
//! - [`Ring`] carries reads/writes/flush/write-zeroes/deallocate/raw commands to either, plus
//!   polls of foreign fds; operations own their [`IoBuf`]s until the [`Completion`] is
//!   reaped (they come back as its [`Buffers`]), and a refused submission hands them back
//!   in a [`Rejected`].
//!   Buffers: [`AlignedBuf`] (owned host memory, from `peerpipe-p2p-alloc`), a p2p-alloc pool
//!   `Buffer`, [`Slice`] (part of an owned buffer), [`RawBuf`] (memory the caller keeps
//!   alive), or your own `IoBuf`.
//! - [`Error`] carries the operation, the errno or decoded [`NvmeStatus`], and what to do.
//!
//! ```no_run
//! use peerpipe_uring::{AlignedBuf, Namespace, Ring};
//! # fn main() -> Result<(), peerpipe_uring::Error> {
//! let ns = Namespace::open("/dev/ng1n1")?;
//! let mut ring: Ring = Ring::new()?;
//! let t = ring.add_namespace(&ns)?;
//! ring.read(t, 0, AlignedBuf::new(4096), 7)?;
//! let mut done = Vec::new();
//! ring.wait(1, &mut done)?;
//! let c = done.pop().unwrap();
//! assert_eq!(c.result?, 4096);
//! # Ok(()) }
//! ```
//!
//! Modules are private and every type, trait and function is exported once, here at the
//! crate root. The one public module is [`abi`], the mirror of the kernel and NVMe ABI
//! (`struct nvme_uring_cmd` and the constants of the headers, grouped as there); the NVMe
//! status code constants are [`sc`] and [`sct`].

pub mod abi;
mod buf;
mod capability;
mod cmd;
mod error;
mod file;
mod namespace;
mod ring;
mod status;

pub use buf::{AlignedBuf, Buffers, IoBuf, RawBuf, Slice};
pub use capability::{Capabilities, Feature};
pub use cmd::{dsm_ranges, Direction, NvmeCommand, Queue};
pub use error::{errno_hint, Errno, Error, Rejected, Result};
pub use file::{FileOptions, FileTarget};
pub use namespace::{char_device_path, ControllerInfo, LbaFormat, Namespace, NamespaceInfo};
pub use ring::{uring_cmd_sqe, Completion, FileRef, OpKind, PollId, Ring, RingBuilder, TargetId};
pub use status::{sc, sct, NvmeStatus};
