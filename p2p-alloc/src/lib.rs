//! Where peerpipe gets its memory: p2pmem providers (`/dev/p2pmemN` and sysfs
//! `p2pmem/allocate`), PCI distance, and buffer pools with host-memory fallback.
