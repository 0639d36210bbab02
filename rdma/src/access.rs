//! Access rights of memory regions and windows, least privilege by default.

use rdma_sys::ibv_access_flags;

/// Access rights of a memory region (`IBV_ACCESS_*`).
///
/// `Access::default()` grants nothing beyond what every region has: the local NIC may *read* it
/// (SEND / RDMA WRITE source). Everything else must be asked for. Verbs require local write for
/// remote write and remote atomics; the builders add it so the flags are always valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Access(u32);

impl Access {
    /// Local read only (the default).
    pub const fn local_read() -> Access {
        Access(0)
    }
    /// The NIC may write into it locally (RECV target, RDMA READ destination).
    pub const fn local_write(self) -> Access {
        Access(self.0 | ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0)
    }
    /// The peer may RDMA WRITE into it (implies local write, as verbs require).
    pub const fn remote_write(self) -> Access {
        Access(
            self.0
                | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
                | ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
        )
    }
    /// The peer may RDMA READ from it.
    pub const fn remote_read(self) -> Access {
        Access(self.0 | ibv_access_flags::IBV_ACCESS_REMOTE_READ.0)
    }
    /// The peer may run atomics on it (implies local write).
    pub const fn remote_atomic(self) -> Access {
        Access(
            self.0
                | ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0
                | ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
        )
    }
    /// Memory windows may be bound to it (needed for [`crate::MemoryWindow`]).
    pub const fn mw_bind(self) -> Access {
        Access(self.0 | ibv_access_flags::IBV_ACCESS_MW_BIND.0)
    }
    /// Allows the NIC to relax PCIe ordering (faster on some devices; ignored by rxe).
    pub const fn relaxed_ordering(self) -> Access {
        Access(self.0 | ibv_access_flags::IBV_ACCESS_RELAXED_ORDERING.0)
    }
    /// Everything a remotely readable/writable data buffer needs.
    pub const fn remote_rw() -> Access {
        Access(0).remote_read().remote_write()
    }
    /// The raw `IBV_ACCESS_*` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// True if these rights allow any remote access.
    pub const fn is_remote(self) -> bool {
        self.0
            & (ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
                | ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
                | ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0)
            != 0
    }
    /// True if `self` includes every right in `other`.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Rights a memory window grants the peer (subset of its region's rights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct WindowAccess(u32);

impl WindowAccess {
    /// No remote access (binding such a window is pointless but valid).
    pub const fn none() -> WindowAccess {
        WindowAccess(0)
    }
    /// Adds remote write (the region needs local write too).
    pub const fn remote_write(self) -> WindowAccess {
        WindowAccess(self.0 | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0)
    }
    /// Adds remote read.
    pub const fn remote_read(self) -> WindowAccess {
        WindowAccess(self.0 | ibv_access_flags::IBV_ACCESS_REMOTE_READ.0)
    }
    /// The `ibv_access_flags` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_privilege_default() {
        assert_eq!(Access::default().bits(), 0);
        assert!(!Access::default().is_remote());
        assert_eq!(Access::local_read(), Access::default());
    }

    #[test]
    fn remote_write_implies_local_write() {
        let a = Access::default().remote_write();
        assert_eq!(a.bits(), 1 | 2); // LOCAL_WRITE | REMOTE_WRITE
        assert!(a.is_remote());
        assert!(a.contains(Access::default().local_write()));
        let a = Access::default().remote_atomic();
        assert_eq!(a.bits(), 1 | 8);
    }

    #[test]
    fn flag_values_match_verbs() {
        assert_eq!(Access::default().local_write().bits(), 1);
        assert_eq!(Access::default().remote_read().bits(), 4);
        assert_eq!(Access::default().mw_bind().bits(), 16);
        assert_eq!(Access::remote_rw().bits(), 1 | 2 | 4);
        assert_eq!(Access::default().relaxed_ordering().bits(), 1 << 20);
        assert!(!Access::default()
            .remote_read()
            .contains(Access::default().local_write()));
        assert_eq!(
            WindowAccess::none().remote_write().remote_read().bits(),
            2 | 4
        );
    }
}
