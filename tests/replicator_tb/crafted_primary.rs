//! [`CraftedPrimary`]: a primary driven by hand over raw RDMA (no authentication, so its
//! replica is an [`open_replica`](super::support::open_replica)), for tests that send what a
//! real primary never would.

use std::time::Duration;

use peerpipe_testbed as tb;

/// Receives a crafted primary keeps posted, and the bytes of each (a SEND carries up to
/// `MAX_PACKED` messages, protocol version 3).
const CRAFTED_RECVS: usize = 16;
const CRAFTED_RECV_LEN: usize = peerpipe::protocol::MAX_PACKED * peerpipe::protocol::MSG_LEN;

/// A crafted primary (it does not authenticate: its replica is an
/// [`open_replica`](super::support::open_replica)): a connection with receives posted for the
/// replica's messages and one registered block of payload (0x5a bytes). Its own work requests
/// have ids from 1000 up and are signalled.
pub struct CraftedPrimary {
    // Drop order: the connection (QP) before the CQ and the regions it uses.
    pub conn: peerpipe::rdma::Connection,
    cq: peerpipe::rdma::CompletionQueue,
    rmr: peerpipe::rdma::MemoryRegion,
    data: peerpipe::rdma::MemoryRegion,
    _pd: peerpipe::rdma::ProtectionDomain,
    queued: std::collections::VecDeque<peerpipe::protocol::Message>,
}

impl CraftedPrimary {
    /// Connects to the replica `kid` that listens on `addr` (it printed so: one connect
    /// attempt is enough), with a payload block of `block` bytes.
    pub fn connect(addr: &str, kid: &tb::Watched, block: usize) -> CraftedPrimary {
        use peerpipe::rdma::{
            Access, CompletionQueue, ConnParams, Connector, MemoryRegion, ProtectionDomain, QpCaps,
            QpInit,
        };
        let (a0, _) = tb::addrs();
        let c = Connector::resolve(
            Some(a0.parse().unwrap()),
            addr.parse().unwrap(),
            Duration::from_secs(5),
        )
        .expect("resolve");
        let pd = ProtectionDomain::new(c.context()).unwrap();
        let cq = CompletionQueue::new(c.context(), 64).unwrap();
        let rmr = MemoryRegion::alloc(
            &pd,
            CRAFTED_RECVS * CRAFTED_RECV_LEN,
            Access::local_read().local_write(),
        )
        .unwrap();
        let data = MemoryRegion::alloc(&pd, block, Access::local_read().local_write()).unwrap();
        data.write_at(0, &vec![0x5a; block]).unwrap();
        // Inline SENDs as long as a receive (`send_raw` sends whole packed payloads).
        let caps = QpCaps {
            max_inline_data: CRAFTED_RECV_LEN as u32,
            ..QpCaps::default()
        };
        let conn = c
            .connect_with(
                &QpInit::new(&pd, &cq).caps(caps),
                &ConnParams::default(),
                |qp| {
                    qp.post_recv(
                        &(0..CRAFTED_RECVS)
                            .map(|i| Self::recv(&rmr, i))
                            .collect::<Vec<_>>(),
                    )
                },
            )
            .unwrap_or_else(|e| panic!("connect: {e}\n{}", kid.so_far()));
        CraftedPrimary {
            conn,
            cq,
            rmr,
            data,
            _pd: pd,
            queued: std::collections::VecDeque::new(),
        }
    }

    fn recv(rmr: &peerpipe::rdma::MemoryRegion, i: usize) -> peerpipe::rdma::RecvRequest {
        let sge = rmr.sge(i * CRAFTED_RECV_LEN, CRAFTED_RECV_LEN).unwrap();
        peerpipe::rdma::RecvRequest::new(i as u64, vec![sge])
    }

    /// Waits for the next message from the replica `kid`.
    pub fn next(&mut self, kid: &tb::Watched) -> peerpipe::protocol::Message {
        use peerpipe::protocol::{Message, MSG_LEN};
        if let Some(m) = self.queued.pop_front() {
            return m;
        }
        let mut wcs = [peerpipe::rdma::EMPTY_COMPLETION; 1];
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                std::time::Instant::now() < end,
                "no message\n{}",
                kid.so_far()
            );
            if self.cq.poll(&mut wcs).unwrap() == 0 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            assert_eq!(
                wcs[0].status,
                peerpipe::rdma::WcStatus::Success,
                "{:?}\n{}",
                wcs[0],
                kid.so_far()
            );
            if wcs[0].wr_id >= 1000 {
                continue; // our own signalled sends and writes
            }
            let i = wcs[0].wr_id as usize;
            let len = wcs[0].byte_len as usize;
            assert!(
                len > 0 && len % MSG_LEN == 0,
                "a SEND of {len} bytes is not whole messages"
            );
            let mut b = vec![0u8; len];
            self.rmr.read_at(i * CRAFTED_RECV_LEN, &mut b).unwrap();
            self.conn.post_recv(&[Self::recv(&self.rmr, i)]).unwrap();
            for m in b.chunks(MSG_LEN) {
                self.queued
                    .push_back(Message::decode(m).expect("replica's message decodes"));
            }
            return self.queued.pop_front().expect("at least one message");
        }
    }

    /// Posts `msgs` (work request id, message) as one chain of inline SENDs.
    fn send(&self, msgs: &[(u64, peerpipe::protocol::Message)]) {
        let wrs: Vec<_> = msgs
            .iter()
            .map(|(id, m)| peerpipe::rdma::SendRequest::send_inline(*id, &m.encode()))
            .collect();
        self.conn.post_send(&wrs).unwrap();
    }

    /// Sends `payload` as it is, one inline SEND (for payloads no real primary would send).
    pub fn send_raw(&self, payload: &[u8]) {
        let wr = peerpipe::rdma::SendRequest::send_inline(1003, payload);
        self.conn.post_send(&[wr]).unwrap();
    }

    /// Sends a hello for `blocks` blocks of `bs` bytes from offset 0, window 4.
    pub fn hello(&self, bs: u32, blocks: u64, flags: u32) {
        use peerpipe::protocol::{Config, Message};
        let hello = Message::Hello(Config {
            replica_id: 0,
            block_size: bs,
            lba_size: 512,
            window: 4,
            range_offset: 0,
            range_len: u64::from(bs) * blocks,
            flags,
        });
        self.send(&[(1000, hello)]);
    }

    /// Waits for the replica's buffers for blocks `0..n` (after its HelloAck): their
    /// (address, rkey), in seq order.
    pub fn buffers(&mut self, kid: &tb::Watched, n: usize) -> Vec<(u64, u32)> {
        use peerpipe::protocol::Message;
        let mut got = vec![None; n];
        while got.iter().any(Option::is_none) {
            match self.next(kid) {
                Message::BufferReady {
                    seq, addr, rkey, ..
                } if (seq as usize) < n => got[seq as usize] = Some((addr, rkey)),
                Message::HelloAck { .. } | Message::BufferReady { .. } => {}
                m => panic!("unexpected {m:?}\n{}", kid.so_far()),
            }
        }
        got.into_iter().flatten().collect()
    }

    /// RDMA-writes the payload block (`bs` bytes) as block `seq` to the buffer `(addr, rkey)`,
    /// then sends its `BlockSent` as a SEND_WITH_INV of `inv` (protocol version 3: the
    /// window's key), or as a plain SEND when `inv` is `None`; one chain (RC keeps the order).
    pub fn write_block(&self, seq: u64, bs: u32, (addr, rkey): (u64, u32), inv: Option<u32>) {
        use peerpipe::protocol::Message;
        use peerpipe::rdma::{RemoteBuf, SendOp, SendRequest};
        let sent = Message::BlockSent {
            seq,
            offset: seq * u64::from(bs),
            len: bs,
        };
        let mut send = SendRequest::send_inline(1002, &sent.encode());
        if let Some(k) = inv {
            send.op = SendOp::SendWithInv(k);
        }
        self.conn
            .post_send(&[
                SendRequest::write(
                    1001,
                    vec![self.data.sge(0, bs as usize).unwrap()],
                    RemoteBuf {
                        addr,
                        len: bs,
                        rkey,
                    },
                ),
                send,
            ])
            .unwrap();
    }
}
