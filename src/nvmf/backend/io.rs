//! I/O on namespace backends: the per-thread ring ([`QueueIo`]), the requests it runs
//! ([`IoRequest`]) into pool buffers it owns while they are in flight ([`PoolBuf`]), and their
//! completions mapped to NVMe statuses ([`IoDone`]).

use std::sync::Arc;

use super::{Backend, BackendError};
use crate::nvmf::status::{IoFailure, Status};
use crate::p2p_alloc::{Backing, Buffer, Pool};
use crate::uring::{self, IoBuf, OpKind, Ring, TargetId};

/// A pool buffer, or a range of it, as an io_uring buffer: the ring owns it while the I/O is
/// in flight.
#[derive(Debug)]
pub struct PoolBuf {
    buf: Buffer,
    start: usize,
    len: usize,
}

impl PoolBuf {
    /// The whole buffer.
    pub fn new(buf: Buffer) -> PoolBuf {
        let len = buf.len();
        PoolBuf { buf, start: 0, len }
    }
    /// `len` bytes from `start`, clamped to the buffer.
    pub fn range(buf: Buffer, start: usize, len: usize) -> PoolBuf {
        let start = start.min(buf.len());
        let len = len.min(buf.len() - start);
        PoolBuf { buf, start, len }
    }
    /// The pool buffer.
    pub fn buffer(&self) -> &Buffer {
        &self.buf
    }
    /// Where the view starts in the buffer.
    pub fn start(&self) -> usize {
        self.start
    }
    /// The pool buffer back.
    pub fn into_buffer(self) -> Buffer {
        self.buf
    }
}

// SAFETY: a pool Buffer's memory lies in a chunk that stays mapped while the handle lives,
// is handed to this handle only, and does not move with it; start + len never exceed its
// length (clamped in the constructors).
unsafe impl IoBuf for PoolBuf {
    fn as_ptr(&self) -> *const u8 {
        self.buf.addr().wrapping_add(self.start)
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.addr().wrapping_add(self.start)
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// One backend operation (byte offsets, already checked against the namespace by the core).
#[derive(Debug)]
pub enum IoRequest {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination.
        buf: PoolBuf,
    },
    /// Write `buf` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Source.
        buf: PoolBuf,
    },
    /// Make written data durable.
    Flush,
    /// Zero `len` bytes at `offset`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Deallocate byte ranges `(offset, len)`.
    Deallocate {
        /// The ranges.
        ranges: Vec<(u64, u64)>,
    },
}

/// A finished (or refused) backend operation.
#[derive(Debug)]
pub struct IoDone {
    /// The submitter's tag.
    pub tag: u64,
    /// Ok, an errno, or the NVMe status of a passthrough device.
    pub result: Result<(), IoFailure>,
    /// The buffer of a read or write, returned.
    pub buf: Option<PoolBuf>,
}

/// The errno an io_uring error stands for (NVMe statuses map to EIO, except the few with a
/// closer errno).
pub fn errno_of(e: &uring::Error) -> i32 {
    match e {
        uring::Error::Os { errno, .. } => errno.get(),
        uring::Error::Nvme { status, .. } => match (status.sct(), status.sc()) {
            (0, 0x80) => libc::ERANGE,     // LBA Out of Range
            (0, 0x81) => libc::ENOSPC,     // Capacity Exceeded
            (0, 0x82) => libc::EAGAIN,     // Namespace Not Ready
            (0, 0x01) => libc::EOPNOTSUPP, // Invalid Command Opcode
            (2, 0x81) => libc::ENODATA,    // Unrecovered Read Error
            _ => libc::EIO,
        },
        uring::Error::Unsupported { .. } => libc::EOPNOTSUPP,
        uring::Error::Invalid { .. } => libc::EINVAL,
        uring::Error::RingFull { .. } => libc::EAGAIN,
        // uring::Error is non-exhaustive: an error kind added later is an I/O error here
        _ => libc::EIO,
    }
}

/// How an io_uring error reaches the controller: an NVMe passthrough status as the device's
/// own status, anything else as its errno ([`errno_of`]).
fn failure_of(e: &uring::Error) -> IoFailure {
    match e {
        uring::Error::Nvme { status, .. } => IoFailure::Device(Status::from_device(status.0)),
        other => IoFailure::Errno(errno_of(other)),
    }
}

/// One transport thread's io_uring with every backend added: namespace I/O and the polls of
/// the thread's RDMA completion channel and rdma_cm event fd share it, so one
/// `io_uring_enter` sleeps until any of them has something.
pub struct QueueIo {
    // Field order is drop order: the ring (and its buffer registrations) before the pool
    // that keeps the registered chunks mapped.
    ring: Ring<PoolBuf>,
    targets: Vec<(TargetId, usize)>,
    fixed: Option<FixedChunks>,
}

/// The pool whose host-memory chunks a [`QueueIo`] registers as fixed buffers, as they are
/// first used.
struct FixedChunks {
    pool: Pool,
    /// Chunks already tried (registered or refused).
    seen: Vec<u32>,
    registered: usize,
}

impl QueueIo {
    /// A ring for `depth` operations in flight, with `backends` added in order (the index in
    /// `backends` names a backend in [`QueueIo::submit`]).
    ///
    /// # Errors
    /// [`BackendError::Ring`]: io_uring setup (ENOSYS/EPERM when io_uring is disabled), EMFILE.
    pub fn new(backends: &[Arc<Backend>], depth: usize) -> Result<QueueIo, BackendError> {
        let entries = (depth + 16).next_power_of_two().clamp(64, 4096) as u32;
        let mut ring: Ring<PoolBuf> =
            Ring::builder()
                .entries(entries)
                .build()
                .map_err(|source| BackendError::Ring {
                    op: "setup",
                    source,
                })?;
        // Operations are queued, and go to the device in the queue loop's next
        // `io_uring_enter`: its wait, or its reap after a few busy turns of RDMA work. One
        // system call submits the turn's I/O and sleeps.
        ring.set_submit_batch(0);
        let mut targets = Vec::with_capacity(backends.len());
        for b in backends {
            targets.push((b.add_to(&mut ring)?, b.geometry.lba_size as usize));
        }
        Ok(QueueIo {
            ring,
            targets,
            fixed: None,
        })
    }

    /// Registers the host-memory chunks of `pool` with the ring as fixed buffers, each when a
    /// read or write first uses it, so the kernel does not pin and unpin the pages of every
    /// O_DIRECT or passthrough transfer (`READ_FIXED`/`WRITE_FIXED`, `URING_CMD_FIXED`).
    /// The ring keeps a handle of the pool, so the chunks stay mapped while registered. A
    /// chunk the kernel refuses (p2pmem, RLIMIT_MEMLOCK) keeps working unregistered.
    pub fn use_fixed_buffers(&mut self, pool: &Pool) {
        self.fixed = Some(FixedChunks {
            pool: pool.clone(),
            seen: Vec::new(),
            registered: 0,
        });
    }

    /// How many pool chunks are registered as fixed buffers.
    pub fn fixed_chunks(&self) -> usize {
        self.fixed.as_ref().map_or(0, |f| f.registered)
    }

    /// Registers `buf`'s chunk on first sight (see [`QueueIo::use_fixed_buffers`]).
    fn register_chunk_of(&mut self, buf: &Buffer) {
        let Some(f) = self.fixed.as_mut() else {
            return;
        };
        let id = buf.chunk_id();
        if f.seen.contains(&id) {
            return;
        }
        f.seen.push(id);
        let Some(c) = f.pool.chunks().into_iter().find(|c| c.id == id) else {
            return;
        };
        if !matches!(c.backing, Backing::Host { .. }) {
            // p2pmem cannot be registered (EREMOTEIO / EFAULT on current kernels).
            return;
        }
        // SAFETY: `self.fixed` holds a handle of the pool, which keeps every chunk mapped
        // (and never reuses its memory for anything else) while it lives; it is dropped
        // after the ring, so after the registration.
        match unsafe { self.ring.register_buffer(c.addr as *mut u8, c.len) } {
            Ok(_) => f.registered += 1,
            Err(e) => tracing::debug!(chunk = id, error = %e, "pool chunk used unregistered"),
        }
    }

    /// The ring (to add and remove polls of foreign fds, and to wait).
    pub fn ring(&mut self) -> &mut Ring<PoolBuf> {
        &mut self.ring
    }

    /// Operations in flight (backend I/O and polls).
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Queues `req` on backend `index`. A refusal gives the buffer back with an errno
    /// (EINVAL for an unknown backend or a request the ring rejects, EAGAIN when the ring is
    /// full, EOPNOTSUPP for an operation the backend lacks).
    ///
    /// # Errors
    /// The refusal as an [`IoDone`] carrying `tag`, the errno and the buffer.
    pub fn submit(&mut self, index: usize, req: IoRequest, tag: u64) -> Result<(), IoDone> {
        let refuse = |failure, buf| IoDone {
            tag,
            result: Err(failure),
            buf,
        };
        let Some(&(t, _)) = self.targets.get(index) else {
            return Err(match req {
                IoRequest::Read { buf, .. } | IoRequest::Write { buf, .. } => {
                    refuse(IoFailure::Errno(libc::EINVAL), Some(buf))
                }
                _ => refuse(IoFailure::Errno(libc::EINVAL), None),
            });
        };
        if let IoRequest::Read { buf, .. } | IoRequest::Write { buf, .. } = &req {
            self.register_chunk_of(buf.buffer());
        }
        let r = match req {
            IoRequest::Read { offset, buf } => self.ring.read(t, offset, buf, tag),
            IoRequest::Write { offset, buf } => self.ring.write(t, offset, buf, tag),
            IoRequest::Flush => {
                return self
                    .ring
                    .flush(t, tag)
                    .map_err(|e| refuse(failure_of(&e), None))
            }
            IoRequest::WriteZeroes { offset, len } => {
                return self
                    .ring
                    .write_zeroes(t, offset, len, tag)
                    .map_err(|e| refuse(failure_of(&e), None))
            }
            IoRequest::Deallocate { ranges } => {
                return self
                    .ring
                    .deallocate(t, &ranges, tag)
                    .map_err(|e| refuse(failure_of(&e), None))
            }
        };
        r.map_err(|rej| refuse(failure_of(&rej.error), rej.bufs.into_single()))
    }

    /// Turns a reaped ring completion of a backend operation into an [`IoDone`]; `None` for
    /// poll completions (handled by the caller). A read or write that moved fewer bytes than
    /// its buffer counts as EIO.
    pub fn done(c: uring::Completion<PoolBuf>) -> Option<IoDone> {
        if c.kind == OpKind::Poll {
            return None;
        }
        let want = c.bufs.single().map(IoBuf::len);
        let result = match (&c.result, c.kind, want) {
            (Ok(n), OpKind::Read | OpKind::Write, Some(w)) if *n != w => {
                Err(IoFailure::Errno(libc::EIO))
            }
            (Ok(_), _, _) => Ok(()),
            (Err(e), _, _) => Err(failure_of(e)),
        };
        Some(IoDone {
            tag: c.tag,
            result,
            buf: c.bufs.into_single(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::nvmf::backend::BackendKind;
    use crate::p2p_alloc::{Placement, Pool};

    fn completion(kind: OpKind, result: uring::Result<usize>) -> uring::Completion<PoolBuf> {
        uring::Completion {
            tag: 7,
            kind,
            result,
            cmd_result: 0,
            more: false,
            bufs: uring::Buffers::None,
        }
    }

    #[test]
    fn a_passthrough_device_status_is_kept_and_an_errno_is_mapped() {
        // Unrecovered Read Error (SCT 2, SC 0x81) with DNR, as a passthrough CQE reports it.
        let nvme = uring::Error::Nvme {
            op: "nvme read",
            status: uring::NvmeStatus((1 << 14) | (2 << 8) | 0x81),
        };
        let d = QueueIo::done(completion(OpKind::Nvme, Err(nvme))).unwrap();
        assert_eq!(d.tag, 7);
        let Err(IoFailure::Device(s)) = d.result else {
            panic!("{:?}", d.result)
        };
        assert_eq!((s.sct(), s.sc(), s.dnr()), (2, 0x81, true));
        let os = uring::Error::Os {
            op: "read",
            errno: uring::Errno(libc::ENOSPC),
        };
        let d = QueueIo::done(completion(OpKind::Read, Err(os))).unwrap();
        assert_eq!(d.result, Err(IoFailure::Errno(libc::ENOSPC)));
        assert!(QueueIo::done(completion(OpKind::Poll, Ok(1))).is_none());
    }

    /// A scratch file of `len` bytes, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str, len: u64) -> Scratch {
            // /tmp here is ext4 (O_DIRECT capable); tmpfs supports it too on 6.6+.
            let p = std::env::temp_dir().join(format!(
                "peerpipe-nvmf-backend-{}-{name}",
                std::process::id()
            ));
            std::fs::File::create(&p).unwrap().set_len(len).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pool() -> Pool {
        Pool::builder(Placement::HostOnly)
            .chunk_size(1 << 20)
            .build()
            .unwrap()
    }

    /// Submits `req` and waits for its completion.
    fn run(io: &mut QueueIo, req: IoRequest, tag: u64) -> IoDone {
        if let Err(d) = io.submit(0, req, tag) {
            return d;
        }
        let mut done = Vec::new();
        io.ring().wait(1, &mut done).unwrap();
        let d = QueueIo::done(done.pop().unwrap()).expect("an I/O completion");
        assert_eq!(d.tag, tag);
        d
    }

    #[test]
    fn file_backend_reads_writes_zeroes_and_deallocates_through_pool_buffers() {
        let s = Scratch::new("rw", 1 << 20);
        let b = Arc::new(Backend::open(&s.0).unwrap());
        assert_eq!(b.kind(), BackendKind::File);
        let g = b.geometry().clone();
        assert_eq!(u64::from(g.lba_size) * g.blocks, 1 << 20);
        assert!(g.volatile_write_cache, "a file needs fdatasync");
        let pool = pool();
        let mut io = QueueIo::new(&[b], 8).unwrap();
        io.use_fixed_buffers(&pool);

        let mut w = pool.alloc(8192).unwrap();
        for (i, x) in w.as_mut_slice().iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        let d = run(
            &mut io,
            IoRequest::Write {
                offset: 65536,
                buf: PoolBuf::new(w),
            },
            1,
        );
        assert_eq!(d.result, Ok(()));
        assert!(d.buf.is_some(), "the buffer comes back with the completion");
        assert_eq!(run(&mut io, IoRequest::Flush, 2).result, Ok(()));

        // Read the middle 4 KiB into a range of a bigger buffer.
        let r = PoolBuf::range(pool.alloc(16384).unwrap(), 4096, 4096);
        let d = run(
            &mut io,
            IoRequest::Read {
                offset: 65536 + 4096,
                buf: r,
            },
            3,
        );
        assert_eq!(d.result, Ok(()));
        let back = d.buf.unwrap();
        let got = &back.buffer().as_slice()[4096..8192];
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, &x)| x == ((i + 4096) % 251) as u8));
        // The pool's host chunk was registered on first use, and the data above went through
        // the fixed-buffer path (READ_FIXED / WRITE_FIXED) correctly.
        if io.ring().capabilities().fixed_buffers == uring::Feature::On {
            assert_eq!(io.fixed_chunks(), 1);
        }

        let d = run(
            &mut io,
            IoRequest::WriteZeroes {
                offset: 65536,
                len: 4096,
            },
            4,
        );
        assert_eq!(d.result, Ok(()));
        let d = run(
            &mut io,
            IoRequest::Deallocate {
                ranges: vec![(65536 + 4096, 4096)],
            },
            5,
        );
        assert_eq!(d.result, Ok(()));
        let d = run(
            &mut io,
            IoRequest::Read {
                offset: 65536,
                buf: PoolBuf::new(pool.alloc(8192).unwrap()),
            },
            6,
        );
        assert_eq!(d.result, Ok(()));
        assert!(d.buf.unwrap().buffer().as_slice()[..8192]
            .iter()
            .all(|&x| x == 0));
    }

    #[test]
    fn bad_requests_and_paths_fail_with_errno_and_keep_buffers() {
        let s = Scratch::new("bad", 1 << 20);
        let pool = pool();
        let mut io = QueueIo::new(&[Arc::new(Backend::open(&s.0).unwrap())], 8).unwrap();
        // Beyond the end of a file: the read moves nothing, which counts as EIO; the buffer
        // comes back.
        let d = run(
            &mut io,
            IoRequest::Read {
                offset: 1 << 20,
                buf: PoolBuf::new(pool.alloc(4096).unwrap()),
            },
            9,
        );
        assert_eq!(d.result, Err(IoFailure::Errno(libc::EIO)));
        assert!(d.buf.is_some());
        // An unknown backend index.
        let e = io.submit(3, IoRequest::Flush, 10).unwrap_err();
        assert_eq!((e.tag, e.result), (10, Err(IoFailure::Errno(libc::EINVAL))));

        match Backend::open(Path::new("/nonexistent/peerpipe-ns")) {
            Err(BackendError::Open { source, .. }) => {
                assert_eq!(source.errno(), Some(libc::ENOENT))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Backend::open(&std::env::temp_dir()),
            Err(BackendError::Unsupported { .. })
        ));
        let empty = Scratch::new("empty", 0);
        assert!(matches!(
            Backend::open(&empty.0),
            Err(BackendError::Unsupported { .. })
        ));
    }

    #[test]
    fn nvme_statuses_map_to_the_nearest_errno() {
        let nvme = |sct: u16, sc: u16| uring::Error::Nvme {
            op: "t",
            status: uring::NvmeStatus((sct << 8) | sc),
        };
        assert_eq!(errno_of(&nvme(0, 0x80)), libc::ERANGE);
        assert_eq!(errno_of(&nvme(2, 0x81)), libc::ENODATA);
        assert_eq!(errno_of(&nvme(2, 0x80)), libc::EIO);
        assert_eq!(
            errno_of(&uring::Error::Os {
                op: "t",
                errno: uring::Errno(libc::ENOSPC)
            }),
            libc::ENOSPC
        );
    }
}
