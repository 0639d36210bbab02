//! How an operation becomes a submission queue entry: [`FileRef`] names the file (a plain
//! descriptor or a registered-file index), [`uring_cmd_sqe`] encodes an NVMe passthrough
//! command and `FileOp` the file operations (read/write, vectored, fsync, fallocate).

use crate::abi;
use crate::cmd::NvmeCommand;
use io_uring::{opcode, squeue, types};
use std::os::fd::RawFd;

/// The file an SQE works on, as io_uring names it: a plain descriptor, or an index into the
/// ring's registered-file table (`IOSQE_FIXED_FILE`, saves the per-operation file lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileRef {
    /// A plain file descriptor.
    Fd(RawFd),
    /// An index into the ring's registered files.
    Fixed(u32),
}

/// The 128-byte SQE for a passthrough command (the `io-uring` crate's `UringCmd80`) on `fd`;
/// `vectored` when `cmd.addr` points at an iovec array; `fixed` is the registered buffer index
/// when the data buffer is a fixed buffer.
pub fn uring_cmd_sqe(
    fd: FileRef,
    vectored: bool,
    c: &NvmeCommand,
    fixed: Option<u16>,
) -> squeue::Entry128 {
    let mut payload = [0u8; 80];
    payload[..abi::NVME_URING_CMD_SIZE].copy_from_slice(&c.cmd.to_bytes());
    let cmd_op = c.queue.cmd_op(vectored);
    let op = match fd {
        FileRef::Fd(fd) => opcode::UringCmd80::new(types::Fd(fd), cmd_op),
        FileRef::Fixed(i) => opcode::UringCmd80::new(types::Fixed(i), cmd_op),
    };
    op.cmd(payload).buf_index(fixed).build()
}

/// A file operation (O_DIRECT files and block devices), before it is given its file.
#[derive(Debug, Clone, Copy)]
pub(super) enum FileOp {
    /// Read `len` bytes at `offset` into `addr`; `buf_index` for a registered buffer.
    Read {
        addr: *mut u8,
        len: u32,
        offset: u64,
        buf_index: Option<u16>,
    },
    /// Write `len` bytes from `addr` at `offset`; `buf_index` for a registered buffer.
    Write {
        addr: *mut u8,
        len: u32,
        offset: u64,
        buf_index: Option<u16>,
    },
    /// Vectored read into the `n` iovecs at `iov`.
    Readv {
        iov: *const libc::iovec,
        n: u32,
        offset: u64,
    },
    /// Vectored write from the `n` iovecs at `iov`.
    Writev {
        iov: *const libc::iovec,
        n: u32,
        offset: u64,
    },
    /// fdatasync (`datasync`) or fsync.
    Fsync { datasync: bool },
    /// fallocate with `mode` over `len` bytes at `offset`.
    Fallocate { offset: u64, len: u64, mode: i32 },
}

impl FileOp {
    /// The SQE of this operation on `fd` (a 64-byte entry widened to the ring's 128 bytes).
    pub(super) fn sqe(self, fd: FileRef) -> squeue::Entry128 {
        // The io-uring crate takes either descriptor kind through a sealed trait, so each
        // operation is spelled once per kind; this is the only place that does it.
        use FileRef::{Fd, Fixed};
        let e: squeue::Entry = match self {
            FileOp::Read {
                addr,
                len,
                offset,
                buf_index,
            } => match (fd, buf_index) {
                (Fd(f), None) => opcode::Read::new(types::Fd(f), addr, len)
                    .offset(offset)
                    .build(),
                (Fixed(f), None) => opcode::Read::new(types::Fixed(f), addr, len)
                    .offset(offset)
                    .build(),
                (Fd(f), Some(i)) => opcode::ReadFixed::new(types::Fd(f), addr, len, i)
                    .offset(offset)
                    .build(),
                (Fixed(f), Some(i)) => opcode::ReadFixed::new(types::Fixed(f), addr, len, i)
                    .offset(offset)
                    .build(),
            },
            FileOp::Write {
                addr,
                len,
                offset,
                buf_index,
            } => match (fd, buf_index) {
                (Fd(f), None) => opcode::Write::new(types::Fd(f), addr, len)
                    .offset(offset)
                    .build(),
                (Fixed(f), None) => opcode::Write::new(types::Fixed(f), addr, len)
                    .offset(offset)
                    .build(),
                (Fd(f), Some(i)) => opcode::WriteFixed::new(types::Fd(f), addr, len, i)
                    .offset(offset)
                    .build(),
                (Fixed(f), Some(i)) => opcode::WriteFixed::new(types::Fixed(f), addr, len, i)
                    .offset(offset)
                    .build(),
            },
            FileOp::Readv { iov, n, offset } => match fd {
                Fd(f) => opcode::Readv::new(types::Fd(f), iov, n)
                    .offset(offset)
                    .build(),
                Fixed(f) => opcode::Readv::new(types::Fixed(f), iov, n)
                    .offset(offset)
                    .build(),
            },
            FileOp::Writev { iov, n, offset } => match fd {
                Fd(f) => opcode::Writev::new(types::Fd(f), iov, n)
                    .offset(offset)
                    .build(),
                Fixed(f) => opcode::Writev::new(types::Fixed(f), iov, n)
                    .offset(offset)
                    .build(),
            },
            FileOp::Fsync { datasync } => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                match fd {
                    Fd(f) => opcode::Fsync::new(types::Fd(f)).flags(flags).build(),
                    Fixed(f) => opcode::Fsync::new(types::Fixed(f)).flags(flags).build(),
                }
            }
            FileOp::Fallocate { offset, len, mode } => match fd {
                Fd(f) => opcode::Fallocate::new(types::Fd(f), len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                Fixed(f) => opcode::Fallocate::new(types::Fixed(f), len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
            },
        };
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(e: squeue::Entry128) -> [u8; 128] {
        // SAFETY: Entry128 is repr(C): a 64-byte io_uring_sqe followed by 64 bytes, all
        // plain integers.
        unsafe { std::mem::transmute(e) }
    }
    fn fd_field(b: &[u8; 128]) -> i32 {
        i32::from_le_bytes(b[4..8].try_into().unwrap())
    }
    fn off_field(b: &[u8; 128]) -> u64 {
        u64::from_le_bytes(b[8..16].try_into().unwrap())
    }
    fn len_field(b: &[u8; 128]) -> u32 {
        u32::from_le_bytes(b[24..28].try_into().unwrap())
    }
    fn buf_index_field(b: &[u8; 128]) -> u16 {
        u16::from_le_bytes(b[40..42].try_into().unwrap())
    }

    #[test]
    fn file_ref_picks_plain_or_fixed_file() {
        let read = FileOp::Read {
            addr: 0x1000 as *mut u8,
            len: 4096,
            offset: 8192,
            buf_index: None,
        };
        let plain = bytes(read.sqe(FileRef::Fd(9)));
        assert_eq!(plain[0], opcode::Read::CODE);
        assert_eq!(plain[1] & 1, 0, "no IOSQE_FIXED_FILE for a plain fd");
        assert_eq!(fd_field(&plain), 9);
        assert_eq!(off_field(&plain), 8192);
        assert_eq!(len_field(&plain), 4096);

        let fixed = bytes(read.sqe(FileRef::Fixed(2)));
        assert_eq!(fixed[0], opcode::Read::CODE);
        assert_eq!(fixed[1] & 1, 1, "IOSQE_FIXED_FILE");
        assert_eq!(fd_field(&fixed), 2, "the registered-file index");
        assert_eq!(&plain[8..], &fixed[8..], "only the file differs");
    }

    #[test]
    fn registered_buffer_selects_the_fixed_opcodes() {
        let op = |buf_index| FileOp::Write {
            addr: 0x2000 as *mut u8,
            len: 512,
            offset: 0,
            buf_index,
        };
        let b = bytes(op(Some(5)).sqe(FileRef::Fixed(1)));
        assert_eq!(b[0], opcode::WriteFixed::CODE);
        assert_eq!(buf_index_field(&b), 5);
        assert_eq!(bytes(op(None).sqe(FileRef::Fd(3)))[0], opcode::Write::CODE);
        let r = FileOp::Read {
            addr: 0x2000 as *mut u8,
            len: 512,
            offset: 0,
            buf_index: Some(7),
        };
        let b = bytes(r.sqe(FileRef::Fd(3)));
        assert_eq!(b[0], opcode::ReadFixed::CODE);
        assert_eq!(buf_index_field(&b), 7);
    }

    #[test]
    fn every_file_op_honours_the_file_ref() {
        let iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        let ops = [
            (
                FileOp::Readv {
                    iov: iov.as_ptr(),
                    n: 1,
                    offset: 4096,
                },
                opcode::Readv::CODE,
            ),
            (
                FileOp::Writev {
                    iov: iov.as_ptr(),
                    n: 1,
                    offset: 4096,
                },
                opcode::Writev::CODE,
            ),
            (FileOp::Fsync { datasync: true }, opcode::Fsync::CODE),
            (
                FileOp::Fallocate {
                    offset: 4096,
                    len: 8192,
                    mode: libc::FALLOC_FL_KEEP_SIZE,
                },
                opcode::Fallocate::CODE,
            ),
        ];
        for (op, code) in ops {
            let plain = bytes(op.sqe(FileRef::Fd(11)));
            let fixed = bytes(op.sqe(FileRef::Fixed(4)));
            assert_eq!((plain[0], fixed[0]), (code, code));
            assert_eq!((plain[1] & 1, fixed[1] & 1), (0, 1));
            assert_eq!((fd_field(&plain), fd_field(&fixed)), (11, 4));
            assert_eq!(&plain[8..], &fixed[8..]);
        }
        let fsync = |datasync| bytes(FileOp::Fsync { datasync }.sqe(FileRef::Fd(1)));
        let flags = |b: [u8; 128]| u32::from_le_bytes(b[28..32].try_into().unwrap());
        assert_eq!(flags(fsync(true)), 1, "IORING_FSYNC_DATASYNC");
        assert_eq!(flags(fsync(false)), 0);
    }

    #[test]
    fn passthrough_on_either_file_kind() {
        let c = NvmeCommand::flush(1);
        let plain = bytes(uring_cmd_sqe(FileRef::Fd(6), false, &c, None));
        let fixed = bytes(uring_cmd_sqe(FileRef::Fixed(0), false, &c, None));
        assert_eq!(plain[0], abi::IORING_OP_URING_CMD);
        assert_eq!((plain[1] & 1, fixed[1] & 1), (0, 1));
        assert_eq!((fd_field(&plain), fd_field(&fixed)), (6, 0));
        assert_eq!(&plain[8..], &fixed[8..]);
    }
}
