//! The target table: the namespaces and files added to a ring, what each allows (size,
//! alignment, writability, max transfer), and which file an SQE for it names ([`FileRef`]:
//! the registered-file index when the ring could register it, its descriptor otherwise).

use super::sqe::FileRef;
use super::Ring;
use crate::buf::IoBuf;
use crate::capability::Feature;
use crate::cmd::Queue;
use crate::error::{Error, Result};
use crate::file::FileTarget;
use crate::namespace::{Namespace, NamespaceInfo};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// Distinguishes rings so a [`TargetId`] of one ring is refused by another.
static NEXT_RING_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Identifies a target (namespace or file) added to a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetId(u32, u32);

impl TargetId {
    /// The index in the ring's target table.
    pub(super) fn index(self) -> usize {
        self.0 as usize
    }
}

/// What a target is, with the rules transfers to it follow.
#[derive(Debug, Clone)]
pub(super) enum TargetKind {
    /// An NVMe namespace (passthrough).
    Nvme(Box<NamespaceInfo>),
    /// A file or block device (O_DIRECT).
    File {
        size: u64,
        is_block: bool,
        offset_align: u32,
        mem_align: u32,
    },
}

/// One entry of the target table.
#[derive(Debug)]
pub(super) struct Target {
    /// Index in the table, also the registered-file index when `registered`.
    id: u32,
    fd: OwnedFd,
    /// The controller char device, for admin commands (namespaces only).
    admin_fd: Option<OwnedFd>,
    registered: bool,
    pub(super) writable: bool,
    pub(super) kind: TargetKind,
}

impl Target {
    /// The namespace ID, for namespaces.
    pub(super) fn nsid(&self) -> Option<u32> {
        match &self.kind {
            TargetKind::Nvme(i) => Some(i.nsid),
            TargetKind::File { .. } => None,
        }
    }

    /// The file SQEs for this target name.
    pub(super) fn file_ref(&self) -> FileRef {
        if self.registered {
            FileRef::Fixed(self.id)
        } else {
            FileRef::Fd(self.fd.as_raw_fd())
        }
    }

    /// The file a passthrough command on `queue` goes to: admin commands to the controller
    /// device, I/O commands to the namespace.
    pub(super) fn command_file(&self, queue: Queue) -> FileRef {
        match (queue, &self.admin_fd) {
            (Queue::Admin, Some(a)) => FileRef::Fd(a.as_raw_fd()),
            _ => self.file_ref(),
        }
    }

    /// The largest transfer one SQE may carry (`file_max` for files).
    pub(super) fn max_part(&self, file_max: usize) -> usize {
        match &self.kind {
            TargetKind::Nvme(info) => info.max_transfer as usize,
            TargetKind::File { .. } => file_max,
        }
    }

    /// Checks a data transfer of `len` bytes at `offset` from/to memory at `addr` against the
    /// target's rules (buffer alignment only with `check_alignment`).
    pub(super) fn check_rw(
        &self,
        op: &'static str,
        offset: u64,
        addr: usize,
        len: usize,
        write: bool,
        check_alignment: bool,
    ) -> Result<()> {
        if len == 0 {
            return Err(Error::invalid(op, "zero-length transfer"));
        }
        if write && !self.writable {
            return Err(Error::invalid(
                op,
                "target opened read-only: open it writable",
            ));
        }
        match &self.kind {
            TargetKind::Nvme(info) => {
                let lba = u64::from(info.lba_size());
                if offset % lba != 0 || len as u64 % lba != 0 {
                    return Err(Error::invalid(
                        op,
                        format!("offset {offset} and length {len} must be multiples of the LBA size {lba}"),
                    ));
                }
                let end = offset.checked_add(len as u64);
                if end.map_or(true, |e| e > info.capacity()) {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "bytes {offset}..{} are outside the namespace ({} bytes, {} LBAs of {lba})",
                            offset.saturating_add(len as u64),
                            info.capacity(),
                            info.format.nlba
                        ),
                    ));
                }
                if check_alignment && addr % info.dma_alignment != 0 {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "buffer at {addr:#x} is not {}-byte aligned: the kernel would copy it \
                             through a bounce buffer (a silent CPU copy, e.g. out of p2pmem); use an aligned buffer",
                            info.dma_alignment
                        ),
                    ));
                }
            }
            TargetKind::File {
                offset_align,
                mem_align,
                size,
                is_block,
            } => {
                if *is_block && offset.checked_add(len as u64).map_or(true, |e| e > *size) {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "bytes {offset}..{} are outside the block device ({size} bytes)",
                            offset.saturating_add(len as u64)
                        ),
                    ));
                }
                let oa = u64::from(*offset_align);
                if check_alignment
                    && (offset % oa != 0 || len as u64 % oa != 0 || addr % *mem_align as usize != 0)
                {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "O_DIRECT needs offset ({offset}) and length ({len}) multiples of {oa} \
                             and the buffer address ({addr:#x}) a multiple of {mem_align}: use AlignedBuf"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The targets of one ring.
#[derive(Debug)]
pub(super) struct TargetTable {
    /// This ring's identity, carried by every [`TargetId`] it hands out.
    ring_id: u32,
    /// How many targets may use registered files (`RingBuilder::file_slots`).
    file_slots: u32,
    list: Vec<Target>,
}

impl TargetTable {
    /// An empty table for a new ring.
    pub(super) fn new(file_slots: u32) -> Self {
        TargetTable {
            ring_id: NEXT_RING_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            file_slots,
            list: Vec::new(),
        }
    }

    /// The index the next target gets, and whether it may use a registered-file slot.
    fn next(&self, registered_files: bool) -> (u32, bool) {
        let id = self.list.len() as u32;
        (id, registered_files && id < self.file_slots)
    }

    /// Appends a target; `registered` when its fd was registered at index `next().0`.
    fn push(
        &mut self,
        fd: OwnedFd,
        admin_fd: Option<OwnedFd>,
        registered: bool,
        writable: bool,
        kind: TargetKind,
    ) -> TargetId {
        let id = self.list.len() as u32;
        self.list.push(Target {
            id,
            fd,
            admin_fd,
            registered,
            writable,
            kind,
        });
        TargetId(id, self.ring_id)
    }

    /// The target `t` names, refusing ids of other rings.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for an unknown id or one of another ring.
    pub(super) fn get(&self, op: &'static str, t: TargetId) -> Result<&Target> {
        let found = self.list.get(t.index()).filter(|_| t.1 == self.ring_id);
        found.ok_or_else(|| {
            Error::invalid(
                op,
                "unknown target: use the id add_namespace/add_file returned on this ring",
            )
        })
    }

    /// The target of an id already checked by [`TargetTable::get`].
    pub(super) fn checked(&self, t: TargetId) -> &Target {
        &self.list[t.index()]
    }
}

impl<B: IoBuf> Ring<B> {
    fn add_target(
        &mut self,
        fd: OwnedFd,
        admin_fd: Option<OwnedFd>,
        writable: bool,
        kind: TargetKind,
    ) -> Result<TargetId> {
        let (id, may_register) = self.targets.next(self.caps.registered_files == Feature::On);
        let registered = may_register
            && self
                .uring
                .submitter()
                .register_files_update(id, &[fd.as_raw_fd()])
                .is_ok();
        Ok(self.targets.push(fd, admin_fd, registered, writable, kind))
    }

    /// Adds a namespace (the ring keeps its own duplicate of the fd).
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `dup` (EMFILE); [`Error::Unsupported`] when the kernel has no
    /// `IORING_OP_URING_CMD` (older than 5.19).
    pub fn add_namespace(&mut self, ns: &Namespace) -> Result<TargetId> {
        if !self.caps.uring_cmd {
            return Err(Error::unsupported(
                "add namespace",
                "this kernel has no IORING_OP_URING_CMD (needs 5.19+): use FileTarget on the block device",
            ));
        }
        let fd = ns
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::from_io("dup", &e))?;
        let admin = ns
            .controller_file()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::from_io("dup", &e))?;
        self.add_target(
            fd,
            Some(admin),
            ns.writable(),
            TargetKind::Nvme(Box::new(ns.info().clone())),
        )
    }

    /// Adds a file or block device (the ring keeps its own duplicate of the fd).
    ///
    /// # Errors
    ///
    /// [`Error::Os`] `dup` (EMFILE).
    pub fn add_file(&mut self, f: &FileTarget) -> Result<TargetId> {
        let fd = f
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::from_io("dup", &e))?;
        self.add_target(
            fd,
            None,
            f.writable(),
            TargetKind::File {
                size: f.size(),
                is_block: f.is_block_device(),
                offset_align: f.offset_align(),
                mem_align: f.mem_align(),
            },
        )
    }

    /// Refuses file fsync/fallocate on an IOPOLL ring (the kernel would fail them).
    pub(super) fn no_fs_sync_on_iopoll(&self, op: &'static str, tg: &Target) -> Result<()> {
        if matches!(tg.kind, TargetKind::File { .. }) && self.caps.iopoll == Feature::On {
            return Err(Error::unsupported(
                op,
                "an IOPOLL ring cannot fsync/fallocate files: use a second ring without IOPOLL",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::{ControllerInfo, LbaFormat};

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn namespace(nlba: u64, dma_alignment: usize) -> TargetKind {
        let format = LbaFormat {
            nlba,
            index: 0,
            lba_size: 512,
            metadata_size: 0,
            extended_lba: false,
        };
        let controller = ControllerInfo {
            serial: "s".into(),
            model: "m".into(),
            firmware: "f".into(),
            mdts: 5,
            volatile_write_cache: false,
            oncs: 0,
        };
        let info = NamespaceInfo::new(1, format, controller, None, None, dma_alignment).unwrap();
        TargetKind::Nvme(Box::new(info))
    }

    fn file(is_block: bool) -> TargetKind {
        TargetKind::File {
            size: 1 << 20,
            is_block,
            offset_align: 512,
            mem_align: 4096,
        }
    }

    #[test]
    fn registered_targets_resolve_to_their_index() {
        let mut t = TargetTable::new(1);
        assert_eq!(t.next(true), (0, true));
        let a = t.push(fd(), None, true, true, file(false));
        assert_eq!(t.next(true), (1, false), "past file_slots: not registered");
        assert_eq!(
            t.next(false),
            (1, false),
            "no registered files on this ring"
        );
        let plain = fd();
        let raw = plain.as_raw_fd();
        let b = t.push(plain, None, false, true, file(false));
        assert_eq!(t.get("read", a).unwrap().file_ref(), FileRef::Fixed(0));
        assert_eq!(t.get("read", b).unwrap().file_ref(), FileRef::Fd(raw));
    }

    #[test]
    fn admin_commands_go_to_the_controller() {
        let mut t = TargetTable::new(4);
        let admin = fd();
        let admin_raw = admin.as_raw_fd();
        let ns = t.push(fd(), Some(admin), true, true, namespace(1024, 4));
        let tg = t.get("nvme command", ns).unwrap();
        assert_eq!(tg.command_file(Queue::Admin), FileRef::Fd(admin_raw));
        assert_eq!(tg.command_file(Queue::Io), FileRef::Fixed(0));
        assert_eq!(tg.nsid(), Some(1));
        let f = t.push(fd(), None, false, true, file(true));
        let tg = t.checked(f);
        assert_eq!(
            tg.command_file(Queue::Admin),
            tg.file_ref(),
            "no controller"
        );
        assert_eq!(tg.nsid(), None);
    }

    #[test]
    fn ids_of_other_rings_and_unknown_ids_are_refused() {
        let mut one = TargetTable::new(0);
        let mut two = TargetTable::new(0);
        let a = one.push(fd(), None, false, true, file(false));
        let b = two.push(fd(), None, false, true, file(false));
        assert_eq!(a.index(), b.index(), "same index, different rings");
        assert!(one.get("read", a).is_ok());
        let e = one.get("read", b).unwrap_err();
        assert!(matches!(e, Error::Invalid { op: "read", .. }), "{e}");
        assert!(two.get("write", TargetId(5, b.1)).is_err());
    }

    #[test]
    fn namespace_transfer_rules() {
        let mut t = TargetTable::new(0);
        let id = t.push(fd(), None, false, true, namespace(1024, 4));
        let tg = t.checked(id);
        let ok = |off, addr, len| tg.check_rw("read", off, addr, len, false, true);
        assert!(ok(0, 0x1000, 4096).is_ok());
        assert!(ok(1024 * 512 - 512, 0x1000, 512).is_ok(), "the last block");
        assert!(ok(0, 0x1000, 0).is_err(), "zero length");
        assert!(ok(100, 0x1000, 512).is_err(), "offset not an LBA multiple");
        assert!(ok(0, 0x1000, 500).is_err(), "length not an LBA multiple");
        assert!(ok(1024 * 512, 0x1000, 512).is_err(), "past the end");
        assert!(
            ok(u64::MAX - 511, 0x1000, 512).is_err(),
            "overflowing range"
        );
        assert!(ok(0, 0x1002, 512).is_err(), "misaligned buffer");
        assert!(
            tg.check_rw("read", 0, 0x1002, 512, false, false).is_ok(),
            "alignment checks off"
        );
        assert_eq!(tg.max_part(1 << 30), 32 * 4096, "MDTS 5 with 4 KiB pages");
    }

    #[test]
    fn file_transfer_rules() {
        let mut t = TargetTable::new(0);
        let block = t.push(fd(), None, false, false, file(true));
        let reg = t.push(fd(), None, false, true, file(false));
        let (block, reg) = (t.checked(block), t.checked(reg));
        let e = block
            .check_rw("write", 0, 0x1000, 4096, true, true)
            .unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
        assert!(block.check_rw("read", 0, 0x1000, 4096, false, true).is_ok());
        assert!(
            block
                .check_rw("read", 1 << 20, 0x1000, 512, false, true)
                .is_err(),
            "past the end of a block device"
        );
        assert!(
            reg.check_rw("read", 1 << 20, 0x1000, 512, false, true)
                .is_ok(),
            "a regular file may grow"
        );
        assert!(reg.check_rw("read", 256, 0x1000, 512, false, true).is_err());
        assert!(reg.check_rw("read", 0, 0x1200, 512, false, true).is_err());
        assert!(reg.check_rw("read", 0, 0x1200, 512, false, false).is_ok());
        assert_eq!(reg.max_part(1 << 20), 1 << 20);
    }
}
