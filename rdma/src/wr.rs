//! Work requests: what can be posted to a send queue or a receive queue.

use crate::access::WindowAccess;
use crate::mr::{MemoryRegion, RemoteBuf, Sge};
use crate::mw::MemoryWindow;

/// The operation of a send-queue work request.
#[derive(Clone, Debug)]
pub enum SendOp {
    /// SEND: the peer's next RECV takes the data.
    Send,
    /// SEND with 32-bit immediate data (delivered in the peer's receive completion).
    SendWithImm(u32),
    /// SEND that also invalidates the peer's rkey (a memory window or region it handed out).
    SendWithInv(u32),
    /// RDMA WRITE into the peer's buffer.
    Write(RemoteBuf),
    /// RDMA WRITE plus immediate data; consumes a RECV at the peer.
    WriteWithImm(RemoteBuf, u32),
    /// RDMA READ from the peer's buffer into the local SGL (needs local write access).
    Read(RemoteBuf),
    /// Invalidates a local rkey (memory window) so the peer can no longer use it.
    LocalInv(u32),
    /// Binds a type-2 memory window to `[offset, offset+len)` of `mr` (which needs
    /// `Access::mw_bind`); afterwards `window.rkey()` is the key to hand out.
    BindWindow {
        /// The window to bind.
        window: MemoryWindow,
        /// The region it opens onto.
        mr: MemoryRegion,
        /// Start of the window within the region.
        offset: u64,
        /// Length of the window.
        len: u64,
        /// What the peer may do through it.
        access: WindowAccess,
    },
}

impl SendOp {
    /// The verbs name of the operation.
    pub fn name(&self) -> &'static str {
        match self {
            SendOp::Send | SendOp::SendWithImm(_) | SendOp::SendWithInv(_) => "SEND",
            SendOp::Write(_) | SendOp::WriteWithImm(..) => "RDMA_WRITE",
            SendOp::Read(_) => "RDMA_READ",
            SendOp::LocalInv(_) => "LOCAL_INV",
            SendOp::BindWindow { .. } => "BIND_MW",
        }
    }
}

/// A send-queue work request. Build with the constructors, adjust with the flag methods.
#[derive(Clone, Debug)]
pub struct SendRequest {
    /// Returned in the completion (and in error completions).
    pub wr_id: u64,
    /// What to do.
    pub op: SendOp,
    /// The local buffers (gathered for sends and writes, scattered into for reads).
    pub sges: Vec<Sge>,
    /// Inline payload: copied into the WQE at post time (no MR needed); replaces `sges`.
    pub inline: Option<Vec<u8>>,
    /// Generate a completion (default true). Unsignalled WRs complete silently; a later
    /// signalled completion implies they are done (and releases their buffers).
    pub signaled: bool,
    /// Wait for earlier RDMA READs to finish before starting (IBV_SEND_FENCE).
    pub fence: bool,
    /// Ask the peer to wake on this message even if armed for solicited events only.
    pub solicited: bool,
}

impl SendRequest {
    /// A signalled work request doing `op` on `sges`.
    pub fn new(wr_id: u64, op: SendOp, sges: Vec<Sge>) -> SendRequest {
        SendRequest {
            wr_id,
            op,
            sges,
            inline: None,
            signaled: true,
            fence: false,
            solicited: false,
        }
    }
    /// A signalled SEND of `sges`.
    pub fn send(wr_id: u64, sges: Vec<Sge>) -> SendRequest {
        Self::new(wr_id, SendOp::Send, sges)
    }
    /// A signalled RDMA WRITE of `sges` to `remote`.
    pub fn write(wr_id: u64, sges: Vec<Sge>, remote: RemoteBuf) -> SendRequest {
        Self::new(wr_id, SendOp::Write(remote), sges)
    }
    /// A signalled RDMA READ of `remote` into `sges`.
    pub fn read(wr_id: u64, sges: Vec<Sge>, remote: RemoteBuf) -> SendRequest {
        Self::new(wr_id, SendOp::Read(remote), sges)
    }
    /// A SEND of `data` inline (copied at post time).
    pub fn send_inline(wr_id: u64, data: &[u8]) -> SendRequest {
        let mut r = Self::new(wr_id, SendOp::Send, Vec::new());
        r.inline = Some(data.to_vec());
        r
    }
    /// Binds `window` to a range of `mr` granting `access`.
    pub fn bind_window(
        wr_id: u64,
        window: &MemoryWindow,
        mr: &MemoryRegion,
        offset: u64,
        len: u64,
        access: WindowAccess,
    ) -> SendRequest {
        Self::new(
            wr_id,
            SendOp::BindWindow {
                window: window.clone(),
                mr: mr.clone(),
                offset,
                len,
                access,
            },
            Vec::new(),
        )
    }
    /// Carries `data` inline instead of the SGL.
    pub fn with_inline(mut self, data: &[u8]) -> SendRequest {
        self.inline = Some(data.to_vec());
        self.sges.clear();
        self
    }
    /// Without a completion on success (see [`signaled`](Self::signaled)).
    pub fn unsignaled(mut self) -> SendRequest {
        self.signaled = false;
        self
    }
    /// Signalled or not, by `yes`.
    pub fn signaled_if(mut self, yes: bool) -> SendRequest {
        self.signaled = yes;
        self
    }
    /// Fenced: starts after earlier RDMA READs finished.
    pub fn fenced(mut self) -> SendRequest {
        self.fence = true;
        self
    }
    /// Solicited: wakes a peer armed for solicited events only.
    pub fn solicited(mut self) -> SendRequest {
        self.solicited = true;
        self
    }
}

/// A receive work request: where the next incoming SEND (or WRITE_WITH_IMM) lands.
#[derive(Clone, Debug)]
pub struct RecvRequest {
    /// Returned in the receive completion.
    pub wr_id: u64,
    /// Where the incoming data is scattered.
    pub sges: Vec<Sge>,
}

impl RecvRequest {
    /// A receive into `sges`.
    pub fn new(wr_id: u64, sges: Vec<Sge>) -> RecvRequest {
        RecvRequest { wr_id, sges }
    }
}
