//! io_uring NVMe passthrough (`IORING_OP_URING_CMD` on `/dev/ngXnY`) and O_DIRECT file I/O
//! for peerpipe (raw layer: `io-uring`).
