//! Connection parameters, and the setup both sides share before connect / accept: the QP on
//! the id, its ACK timeout, the raw `rdma_conn_param`.

use std::sync::Arc;
use std::time::Duration;

use rdma_sys::*;

use super::id::CmId;
use crate::device::Context;
use crate::error::{Error, Result};
use crate::qp::{QpInit, QueuePair};

/// Connection parameters (both sides).
#[derive(Debug, Clone)]
pub struct ConnParams {
    /// Sent to the peer in the connect request / accept reply (at most 56 / 196 bytes).
    pub private_data: Vec<u8>,
    /// Outstanding RDMA READs the peer may have against us. Clamped to the device limits
    /// (and, when accepting, to what the client asked for).
    pub responder_resources: u8,
    /// Outstanding RDMA READs we may have against the peer. Clamped to the device limits
    /// (and, when accepting, to the client's responder resources).
    pub initiator_depth: u8,
    /// Transport retries before a send fails with `RetryExceeded` (0..7).
    pub retry_count: u8,
    /// Receiver-not-ready retries (7 = infinite).
    pub rnr_retry_count: u8,
    /// Timeout for each phase: address resolution, route resolution, connect/accept.
    pub timeout: Duration,
    /// Local ACK timeout of the QP as the verbs exponent (0..=31): a packet not acknowledged
    /// within 4.096 us * 2^n is retransmitted. `None` keeps rdma_cm's default, which on RoCE
    /// is 17 (about 0.5 s, from a packet lifetime of 16), so one lost packet stalls the QP
    /// that long. perftest sets 14 (67 ms). Lower values recover faster from loss but give up
    /// sooner on a slow peer (`retry_count` times this).
    pub ack_timeout: Option<u8>,
}

impl Default for ConnParams {
    fn default() -> ConnParams {
        ConnParams {
            private_data: Vec::new(),
            responder_resources: 16,
            initiator_depth: 16,
            retry_count: 7,
            rnr_retry_count: 7,
            timeout: Duration::from_secs(5),
            ack_timeout: None,
        }
    }
}

// rdma-sys 0.3 does not export librdmacm's option enums; values from <rdma/rdma_cma.h>.
const RDMA_OPTION_ID: i32 = 0;
const RDMA_OPTION_ID_ACK_TIMEOUT: i32 = 3;

/// Sets the QP's local ACK timeout on `id` (before rdma_connect / rdma_accept, which move the
/// QP to RTS with it).
pub(super) fn set_ack_timeout(id: *mut rdma_cm_id, p: &ConnParams) -> Result<()> {
    let Some(mut t) = p.ack_timeout else {
        return Ok(());
    };
    if t > 31 {
        return Err(Error::InvalidArgument {
            op: "rdma_set_option(ACK_TIMEOUT)",
            reason: format!("ack_timeout {t} is not a verbs timeout exponent (0..=31)"),
        });
    }
    // SAFETY: valid id; optval points to one byte that lives across the call.
    let rc = unsafe {
        rdma_set_option(
            id,
            RDMA_OPTION_ID,
            RDMA_OPTION_ID_ACK_TIMEOUT,
            (&mut t as *mut u8).cast(),
            1,
        )
    };
    if rc != 0 {
        return Err(Error::last_os("rdma_set_option(ACK_TIMEOUT)"));
    }
    Ok(())
}

/// The raw parameters for rdma_connect / rdma_accept; private data of at most `max_pd` bytes.
pub(super) fn raw_conn_param(
    p: &ConnParams,
    ctx: &Context,
    max_pd: usize,
) -> Result<rdma_conn_param> {
    if p.private_data.len() > max_pd {
        return Err(Error::InvalidArgument {
            op: "rdma_cm private data",
            reason: format!("{} bytes, at most {max_pd} allowed", p.private_data.len()),
        });
    }
    let attr = ctx.attributes()?;
    Ok(rdma_conn_param {
        private_data: if p.private_data.is_empty() {
            std::ptr::null()
        } else {
            p.private_data.as_ptr().cast()
        },
        private_data_len: p.private_data.len() as u8,
        responder_resources: (p.responder_resources as u32).min(attr.max_qp_rd_atom) as u8,
        initiator_depth: (p.initiator_depth as u32).min(attr.max_qp_init_rd_atom) as u8,
        flow_control: 1,
        retry_count: p.retry_count.min(7),
        rnr_retry_count: p.rnr_retry_count.min(7),
        srq: 0,
        qp_num: 0,
    })
}

/// Creates the id's QP on `ctx` (after checking `init` belongs to it) and runs `prepare` on it
/// before anything goes to the peer: the shared first half of connect and accept.
pub(super) fn prepared_qp(
    id: &Arc<CmId>,
    ctx: &Context,
    init: &QpInit,
    prepare: impl FnOnce(&QueuePair) -> Result<()>,
) -> Result<QueuePair> {
    check_device(ctx, init)?;
    let qp = QueuePair::create_on_cm(id.clone(), init)?;
    prepare(&qp)?;
    Ok(qp)
}

/// Refuses a PD or CQ of another device than the connection's.
fn check_device(ctx: &Context, init: &QpInit) -> Result<()> {
    let ok = init.pd.context().same_device(ctx)
        && init.send_cq.context().same_device(ctx)
        && init.recv_cq.context().same_device(ctx);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op: "rdma_create_qp",
            reason: format!(
                "the PD and CQs must be created on the connection's device {} (use its context())",
                ctx.name()
            ),
        })
    }
}
