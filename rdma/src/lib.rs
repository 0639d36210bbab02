//! Safe RDMA verbs and rdma_cm for peerpipe, over the system libibverbs/librdmacm
//! (raw layer: `rdma-sys`).
