//! One typed error for every fallible operation in this crate.

use std::fmt;
use std::time::Duration;

pub use peerpipe_p2p_alloc::Errno;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Status of a work completion (`enum ibv_wc_status`), named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// The work request completed.
    Success,
    /// A message exceeds the posted receive buffer or the port's limits.
    LocalLengthError,
    /// A send queue WQE was malformed (or the QP is in a bad state).
    LocalQpOperationError,
    /// EE context error (reliable datagram only).
    LocalEecOperationError,
    /// A local buffer lies outside its region or lacks the access it needs.
    LocalProtectionError,
    /// The QP went to the error state (disconnect, earlier error, destroy): the WR was flushed.
    Flushed,
    /// A memory window bind was refused.
    MemoryWindowBindError,
    /// The responder sent an unexpected transport opcode.
    BadResponse,
    /// A protection error on a local buffer while executing a request from the peer.
    LocalAccessError,
    /// The peer refused the request (unsupported operation, bad length).
    RemoteInvalidRequest,
    /// The remote side refused the access (bad rkey, out of range, missing rights, invalidated
    /// window).
    RemoteAccessError,
    /// The peer could not complete the operation.
    RemoteOperationError,
    /// The peer stopped acknowledging (vanished, or the link is down): transport retries ran out.
    RetryExceeded,
    /// The peer had no receive posted for too long.
    RnrRetryExceeded,
    /// RDD violation (reliable datagram only).
    LocalRddViolation,
    /// The peer refused an RDMA READ or atomic (reliable datagram only).
    RemoteInvalidRdRequest,
    /// The peer aborted the operation.
    RemoteAborted,
    /// Invalid EE context number (reliable datagram only).
    InvalidEecn,
    /// Invalid EE context state (reliable datagram only).
    InvalidEecState,
    /// The device hit a fatal error.
    Fatal,
    /// A response timed out.
    ResponseTimeout,
    /// A general error the provider reported without detail.
    General,
    /// Tag matching error.
    TagMatching,
    /// Tag matching rendezvous request incomplete.
    TagMatchingRendezvousIncomplete,
    /// A status this crate does not know.
    Unknown(u32),
}

impl WcStatus {
    /// Maps the raw `ibv_wc_status` value.
    pub fn from_raw(raw: u32) -> WcStatus {
        use WcStatus::*;
        match raw {
            0 => Success,
            1 => LocalLengthError,
            2 => LocalQpOperationError,
            3 => LocalEecOperationError,
            4 => LocalProtectionError,
            5 => Flushed,
            6 => MemoryWindowBindError,
            7 => BadResponse,
            8 => LocalAccessError,
            9 => RemoteInvalidRequest,
            10 => RemoteAccessError,
            11 => RemoteOperationError,
            12 => RetryExceeded,
            13 => RnrRetryExceeded,
            14 => LocalRddViolation,
            15 => RemoteInvalidRdRequest,
            16 => RemoteAborted,
            17 => InvalidEecn,
            18 => InvalidEecState,
            19 => Fatal,
            20 => ResponseTimeout,
            21 => General,
            22 => TagMatching,
            23 => TagMatchingRendezvousIncomplete,
            other => Unknown(other),
        }
    }

    /// The raw `ibv_wc_status` value.
    pub fn raw(self) -> u32 {
        use WcStatus::*;
        match self {
            Success => 0,
            LocalLengthError => 1,
            LocalQpOperationError => 2,
            LocalEecOperationError => 3,
            LocalProtectionError => 4,
            Flushed => 5,
            MemoryWindowBindError => 6,
            BadResponse => 7,
            LocalAccessError => 8,
            RemoteInvalidRequest => 9,
            RemoteAccessError => 10,
            RemoteOperationError => 11,
            RetryExceeded => 12,
            RnrRetryExceeded => 13,
            LocalRddViolation => 14,
            RemoteInvalidRdRequest => 15,
            RemoteAborted => 16,
            InvalidEecn => 17,
            InvalidEecState => 18,
            Fatal => 19,
            ResponseTimeout => 20,
            General => 21,
            TagMatching => 22,
            TagMatchingRendezvousIncomplete => 23,
            Unknown(v) => v,
        }
    }

    /// What usually causes this status, for error messages.
    pub fn hint(self) -> &'static str {
        use WcStatus::*;
        match self {
            Flushed => {
                "the queue pair is in the error state (disconnected or an earlier WR failed)"
            }
            RemoteAccessError => {
                "the peer refused the access: wrong rkey, range outside the region/window, \
                 missing remote access rights, or the window was invalidated"
            }
            RetryExceeded => "the peer stopped responding (process gone or link down)",
            RnrRetryExceeded => "the peer had no receive buffer posted",
            LocalProtectionError => {
                "a local buffer is outside its memory region or lacks local write access"
            }
            LocalLengthError => "the message does not fit the posted receive buffer",
            MemoryWindowBindError => {
                "the window bind was refused (region lacks mw_bind access or range is outside it)"
            }
            RemoteInvalidRequest => {
                "the peer does not allow this operation or the length is invalid"
            }
            _ => "",
        }
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            WcStatus::Unknown(v) => return write!(f, "unknown status {v}"),
            WcStatus::Flushed => "work request flushed",
            WcStatus::RemoteAccessError => "remote access error",
            WcStatus::RetryExceeded => "transport retry counter exceeded",
            WcStatus::RnrRetryExceeded => "RNR retry counter exceeded",
            WcStatus::LocalProtectionError => "local protection error",
            WcStatus::LocalLengthError => "local length error",
            WcStatus::Success => "success",
            other => return write!(f, "{other:?}"),
        };
        f.write_str(name)
    }
}

/// Why a `ibv_reg_mr` on peer memory failed (the kernel's p2pdma pinning support).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMemoryCause {
    /// EFAULT: `pin_user_pages` refused the pages; typical for a mapping of sysfs
    /// `p2pmem/allocate`, whose pages are not ZONE_DEVICE pages the GUP path accepts.
    NotPinnable,
    /// EREMOTEIO: the pages are P2PDMA pages and the pinning caller did not ask for
    /// FOLL_PCI_P2PDMA (kernel without the testbed patches for this path).
    P2pdmaNotAllowed,
}

/// Every error of this crate: the operation, the errno where there is one (as the error's
/// [`source`](std::error::Error::source)), and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A verbs / rdma_cm call failed with an errno.
    #[error("{op} failed: {} (errno {}){}", errno_text(errno.0), errno.0, errno_hint(op, errno.0))]
    Verbs {
        /// The call (`ibv_reg_mr`, `rdma_connect`, ...).
        op: &'static str,
        /// The OS error number.
        #[source]
        errno: Errno,
    },

    /// The kernel cannot pin this peer (p2pmem) memory for RDMA.
    #[error(
        "{op} failed: the kernel cannot pin this peer (p2pmem) memory for RDMA ({}, errno {}; \
         {len} bytes at {addr:#x}{}). {}",
        errno_text(errno.0),
        errno.0,
        mapping.as_deref().map(|m| format!(", mapping {m}")).unwrap_or_default(),
        peer_memory_advice(*cause)
    )]
    PeerMemoryNotPinnable {
        /// The registration call.
        op: &'static str,
        /// The OS error number (EFAULT or EREMOTEIO).
        #[source]
        errno: Errno,
        /// What the errno means for peer memory.
        cause: PeerMemoryCause,
        /// Start of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// The mapped file (from /proc/self/maps) when known.
        mapping: Option<String>,
    },

    /// A work request completed with an error status.
    #[error("{op} work request {wr_id} completed with {status} (vendor error {vendor_err:#x}){}",
        if status.hint().is_empty() { String::new() } else { format!(": {}", status.hint()) })]
    Completion {
        /// The work request's operation (`RDMA_WRITE`, `RECV`, ...).
        op: &'static str,
        /// The work request's id.
        wr_id: u64,
        /// The completion status.
        status: WcStatus,
        /// The provider's own error code.
        vendor_err: u32,
    },

    /// The device (or the kernel) does not support this.
    #[error("{op} is not supported by {device}: {reason}")]
    Unsupported {
        /// The refused operation.
        op: &'static str,
        /// The device's name.
        device: String,
        /// Why, and what to do instead.
        reason: String,
    },

    /// A blocking call ran out of time.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        op: &'static str,
        /// The time allowed.
        after: Duration,
    },

    /// The peer disconnected (or vanished: its process exited and the kernel tore down its side).
    #[error("{op}: the peer disconnected")]
    Disconnected {
        /// What noticed it.
        op: &'static str,
    },

    /// The RDMA device was removed under the connection.
    #[error("{op}: the RDMA device was removed")]
    DeviceRemoved {
        /// What noticed it.
        op: &'static str,
    },

    /// The peer rejected the connection (status is the CM reject reason; 28 = consumer reject).
    #[error("connect rejected by the peer (reason {status}, {} bytes of private data)", private_data.len())]
    Rejected {
        /// The CM reject reason.
        status: i32,
        /// The private data the peer sent with the reject.
        private_data: Vec<u8>,
    },

    /// rdma_cm reported an error event (address/route resolution, unreachable, connect error).
    #[error("{op}: rdma_cm reported {event} (status {status}: {}){}", errno_text(status.abs()), cm_hint(event))]
    Cm {
        /// What was being done.
        op: &'static str,
        /// The event's name (`ADDR_ERROR`, `UNREACHABLE`, ...).
        event: &'static str,
        /// The event's status (a negative errno).
        status: i32,
    },

    /// No RDMA device with this name.
    #[error("no RDMA device named {name:?} (present: {present:?}); load rdma_rxe and `rdma link add` one")]
    NoSuchDevice {
        /// The name asked for.
        name: String,
        /// The devices there are.
        present: Vec<String>,
    },

    /// The caller passed something invalid.
    #[error("{op}: invalid argument: {reason}")]
    InvalidArgument {
        /// The refused operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// The errno carried by this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Verbs { errno, .. } | Error::PeerMemoryNotPinnable { errno, .. } => {
                Some(errno.0)
            }
            Error::Cm { status, .. } => Some(status.abs()),
            _ => None,
        }
    }

    /// The completion status carried by this error, if any.
    pub fn wc_status(&self) -> Option<WcStatus> {
        match self {
            Error::Completion { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Builds a `Verbs` error from the thread's current errno.
    pub(crate) fn last_os(op: &'static str) -> Error {
        Error::Verbs {
            op,
            errno: Errno(last_errno()),
        }
    }

    /// Builds a `Verbs` error from a returned errno-style code (verbs post/modify calls return
    /// the errno directly; rdma_cm calls return -1 and set errno).
    pub(crate) fn from_ret(op: &'static str, ret: i32) -> Error {
        let errno = if ret > 0 { ret } else { last_errno() };
        Error::Verbs {
            op,
            errno: Errno(errno),
        }
    }
}

pub(crate) fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

fn errno_hint(op: &str, errno: i32) -> String {
    let hint = match (op, errno) {
        ("ibv_reg_mr", libc::EFAULT) => {
            "the range is not mapped in this process, or the kernel cannot pin it \
             (for p2pmem use /dev/p2pmemN, not sysfs p2pmem/allocate)"
        }
        ("ibv_reg_mr", libc::ENOMEM) => {
            "cannot pin that much memory: raise RLIMIT_MEMLOCK (ulimit -l) or register less"
        }
        ("ibv_reg_mr", libc::EINVAL) => {
            "invalid access flags (remote write/atomic need local write) or zero length"
        }
        (_, libc::EPERM) | (_, libc::EACCES) => {
            "permission denied: run as root or grant access to /dev/infiniband"
        }
        (_, libc::ENODEV) => "no such RDMA device, or it was removed",
        (_, libc::EADDRINUSE) => "the address/port is already in use",
        (_, libc::ENOMEM) => "the device or kernel ran out of resources (queue too deep?)",
        _ => "",
    };
    if hint.is_empty() {
        String::new()
    } else {
        format!(": {hint}")
    }
}

fn cm_hint(event: &str) -> &'static str {
    match event {
        "ADDR_ERROR" => {
            ": no RDMA device has a route to that address (is rxe/RoCE set up on that interface?)"
        }
        "ROUTE_ERROR" => ": no route to the peer",
        "UNREACHABLE" => ": the peer did not answer (no listener there, or a firewall)",
        "CONNECT_ERROR" => ": the connection could not be established",
        _ => "",
    }
}

fn peer_memory_advice(cause: PeerMemoryCause) -> &'static str {
    match cause {
        PeerMemoryCause::NotPinnable => {
            "Map the memory from /dev/p2pmemN instead of sysfs p2pmem/allocate: only the \
             character-device mapping can be pinned for RDMA"
        }
        PeerMemoryCause::P2pdmaNotAllowed => {
            "This kernel does not let RDMA pin PCI peer-to-peer memory; boot a kernel with the \
             testbed's p2pdma patches (see testbed/kernel), or use host memory"
        }
    }
}

/// What kind of memory the caller says it is registering; peer memory failing with
/// EFAULT/EREMOTEIO becomes [`Error::PeerMemoryNotPinnable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryKind {
    /// Unknown: look at /proc/self/maps on failure to tell whether it is a p2pmem mapping.
    #[default]
    Detect,
    /// Ordinary host memory (anonymous, hugepage, file-backed).
    Host,
    /// A mapping of PCI peer memory (p2pmem).
    Peer,
}

/// Maps an `ibv_reg_mr` failure to the right error. `mapping` is the backing file of the range
/// (from /proc/self/maps) when known.
pub(crate) fn reg_mr_error(
    errno: i32,
    kind: MemoryKind,
    addr: usize,
    len: usize,
    mapping: Option<String>,
) -> Error {
    let looks_peer = mapping.as_deref().is_some_and(is_p2pmem_path);
    let peer = match kind {
        MemoryKind::Peer => true,
        MemoryKind::Host => false,
        MemoryKind::Detect => looks_peer || errno == libc::EREMOTEIO,
    };
    let cause = match errno {
        libc::EFAULT => Some(PeerMemoryCause::NotPinnable),
        libc::EREMOTEIO => Some(PeerMemoryCause::P2pdmaNotAllowed),
        _ => None,
    };
    match (peer, cause) {
        (true, Some(cause)) => Error::PeerMemoryNotPinnable {
            op: "ibv_reg_mr",
            errno: Errno(errno),
            cause,
            addr,
            len,
            mapping,
        },
        _ => Error::Verbs {
            op: "ibv_reg_mr",
            errno: Errno(errno),
        },
    }
}

/// True for the paths a p2pmem mapping shows in /proc/self/maps: `/dev/p2pmemN` or a sysfs
/// `.../p2pmem/allocate` file.
fn is_p2pmem_path(path: &str) -> bool {
    path.starts_with("/dev/p2pmem") || path.contains("/p2pmem/")
}

/// The backing path of the mapping containing `addr`, from /proc/self/maps.
pub(crate) fn mapping_path(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps_lookup(&maps, addr)
}

/// Finds the mapping containing `addr` in /proc/self/maps text; returns its path (if any).
fn maps_lookup(maps: &str, addr: usize) -> Option<String> {
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let range = fields.next()?;
        let (lo, hi) = range.split_once('-')?;
        let lo = usize::from_str_radix(lo, 16).ok()?;
        let hi = usize::from_str_radix(hi, 16).ok()?;
        if (lo..hi).contains(&addr) {
            // perms, offset, dev, inode, then the path (may contain spaces)
            let rest: Vec<&str> = fields.skip(4).collect();
            return if rest.is_empty() {
                None
            } else {
                Some(rest.join(" "))
            };
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wc_status_roundtrip_and_names() {
        for raw in 0..30 {
            assert_eq!(WcStatus::from_raw(raw).raw(), raw);
        }
        assert_eq!(WcStatus::from_raw(12), WcStatus::RetryExceeded);
        assert_eq!(WcStatus::from_raw(10), WcStatus::RemoteAccessError);
        assert_eq!(WcStatus::from_raw(5), WcStatus::Flushed);
        assert_eq!(WcStatus::from_raw(99), WcStatus::Unknown(99));
        assert_eq!(
            WcStatus::RemoteAccessError.to_string(),
            "remote access error"
        );
        let e = Error::Completion {
            op: "RDMA_WRITE",
            wr_id: 7,
            status: WcStatus::RetryExceeded,
            vendor_err: 0,
        };
        let text = e.to_string();
        assert!(text.contains("retry counter exceeded"), "{text}");
        assert!(text.contains("stopped responding"), "{text}");
        assert_eq!(e.wc_status(), Some(WcStatus::RetryExceeded));
    }

    #[test]
    fn reg_mr_efault_on_sysfs_allocate_is_peer_error() {
        let path = "/sys/devices/pci0000:00/0000:03:00.0/p2pmem/allocate".to_string();
        let e = reg_mr_error(libc::EFAULT, MemoryKind::Detect, 0x1000, 4096, Some(path));
        match &e {
            Error::PeerMemoryNotPinnable { errno, cause, .. } => {
                assert_eq!(*errno, libc::EFAULT);
                assert_eq!(*cause, PeerMemoryCause::NotPinnable);
            }
            other => panic!("wrong variant {other:?}"),
        }
        let text = e.to_string();
        assert!(text.contains("/dev/p2pmemN"), "{text}");
        assert!(text.contains("cannot pin"), "{text}");
        assert_eq!(e.errno(), Some(libc::EFAULT));
    }

    #[test]
    fn reg_mr_caller_says_peer() {
        let e = reg_mr_error(libc::EREMOTEIO, MemoryKind::Peer, 0x1000, 4096, None);
        assert!(matches!(
            e,
            Error::PeerMemoryNotPinnable {
                cause: PeerMemoryCause::P2pdmaNotAllowed,
                ..
            }
        ));
        assert!(e.to_string().contains("testbed"), "{e}");
        // EREMOTEIO only ever comes from P2PDMA pages, even undeclared
        let e = reg_mr_error(libc::EREMOTEIO, MemoryKind::Detect, 0x1000, 4096, None);
        assert!(matches!(e, Error::PeerMemoryNotPinnable { .. }));
    }

    #[test]
    fn reg_mr_host_efault_stays_verbs_error_with_hint() {
        let e = reg_mr_error(libc::EFAULT, MemoryKind::Host, 0x1000, 4096, None);
        assert!(matches!(
            e,
            Error::Verbs {
                op: "ibv_reg_mr",
                errno: Errno(libc::EFAULT)
            }
        ));
        let e = reg_mr_error(libc::EFAULT, MemoryKind::Detect, 0x1000, 4096, None);
        assert!(matches!(e, Error::Verbs { .. }));
        assert!(e.to_string().contains("p2pmem"), "{e}");
        let e = reg_mr_error(libc::ENOMEM, MemoryKind::Peer, 0x1000, 4096, None);
        assert!(matches!(
            e,
            Error::Verbs {
                errno: Errno(libc::ENOMEM),
                ..
            }
        ));
        assert!(e.to_string().contains("MEMLOCK"), "{e}");
    }

    #[test]
    fn maps_parsing() {
        let maps = "\
7f0000000000-7f0000001000 rw-s 00000000 00:05 12 /dev/p2pmem0
7f0000002000-7f0000004000 rw-p 00000000 00:00 0 
7f0000004000-7f0000005000 rw-s 00000000 00:14 33 /sys/devices/pci0000:00/0000:03:00.0/p2pmem/allocate
";
        assert_eq!(
            maps_lookup(maps, 0x7f0000000800).as_deref(),
            Some("/dev/p2pmem0")
        );
        assert_eq!(maps_lookup(maps, 0x7f0000003000), None);
        let p = maps_lookup(maps, 0x7f0000004010).unwrap();
        assert!(is_p2pmem_path(&p));
        assert!(is_p2pmem_path("/dev/p2pmem0"));
        assert!(!is_p2pmem_path("/dev/shm/x"));
        assert_eq!(maps_lookup(maps, 0x10), None);
        // the test binary's own heap is found in the real maps
        let v = Box::new([0u8; 64]);
        let _ = mapping_path(v.as_ptr() as usize);
    }

    #[test]
    fn errno_is_the_source() {
        use std::error::Error as _;
        let e = reg_mr_error(libc::EFAULT, MemoryKind::Peer, 0x1000, 4096, None);
        let errno = e.source().and_then(|s| s.downcast_ref::<Errno>()).copied();
        assert_eq!(errno, Some(Errno(libc::EFAULT)));
        let e = Error::from_ret("ibv_post_send", libc::ENOMEM);
        let errno = e.source().and_then(|s| s.downcast_ref::<Errno>()).copied();
        assert_eq!(errno, Some(Errno(libc::ENOMEM)));
        assert!(Error::Disconnected { op: "connection" }.source().is_none());
    }

    #[test]
    fn verbs_error_text() {
        let e = Error::Verbs {
            op: "rdma_bind_addr",
            errno: Errno(libc::EADDRINUSE),
        };
        assert!(e.to_string().contains("already in use"), "{e}");
        assert_eq!(e.errno(), Some(libc::EADDRINUSE));
        let e = Error::Cm {
            op: "resolve address",
            event: "ADDR_ERROR",
            status: -110,
        };
        assert!(e.to_string().contains("no RDMA device"), "{e}");
    }
}
