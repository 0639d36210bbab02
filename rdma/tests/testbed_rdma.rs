//! RDMA testbed tests on rxe0 (client, ADDR0) <-> rxe1 (server, ADDR1).
//! Run in the VM: `cargo xtask test --vm-only -- testbed_rdma`.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use peerpipe_rdma::*;

const SKIP: &str = "skipped: no device (testbed test; run: cargo xtask test)";

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn devices_ports_gids_limits() {
    peerpipe_testbed::require_testbed();
    let _ = SKIP;
    let names = device_names().unwrap();
    assert!(
        names.contains(&"rxe0".to_string()) && names.contains(&"rxe1".to_string()),
        "{names:?}"
    );
    let ctx = Context::open("rxe0").unwrap();
    let a = ctx.attributes().unwrap();
    assert!(
        a.max_qp_wr >= 64 && a.max_sge >= 4 && a.max_mr_size > 1 << 30,
        "{a:?}"
    );
    assert!(a.mw_type2, "rxe supports type 2 windows: {a:?}");
    let p = ctx.port(1).unwrap();
    assert_eq!(p.state, PortState::Active, "{p:?}");
    assert!(p.link_layer_ethernet);
    assert!(p.active_mtu >= 256 && p.active_mtu <= 4096, "{p:?}");
    let gids = ctx.gids(1).unwrap();
    let (a0, _) = addrs();
    assert!(
        gids.iter()
            .any(|g| g.kind == GidType::RoceV2 && g.ipv4().map(std::net::IpAddr::V4) == Some(a0)),
        "no RoCE v2 GID for {a0}: {gids:?}"
    );
    let inline = ctx.max_inline_data().unwrap();
    assert!(inline >= 64, "max inline {inline}");
    assert!(matches!(
        ctx.port(9),
        Err(Error::Verbs {
            op: "ibv_query_port",
            ..
        })
    ));
    assert!(matches!(
        Context::open("mlx5_9"),
        Err(Error::NoSuchDevice { .. })
    ));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn send_recv_write_imm_read_with_private_data() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(
        20001,
        PairOpts {
            client_data: b"hello-from-client".to_vec(),
            server_data: b"welcome".to_vec(),
            ..Default::default()
        },
    );
    assert!(s.conn.peer_private_data().starts_with(b"hello-from-client"));
    assert!(c.conn.peer_private_data().starts_with(b"welcome"));

    // SEND / RECV
    let src = MemoryRegion::alloc(&c.pd, 4096, Access::default()).unwrap();
    let dst = MemoryRegion::alloc(&s.pd, 4096, Access::default().local_write()).unwrap();
    let data = pattern(4096, 1);
    src.write_at(0, &data).unwrap();
    s.conn
        .post_recv(&[RecvRequest::new(7, vec![dst.sge_all()])])
        .unwrap();
    assert_eq!(s.conn.recv_in_flight(), 1);
    c.conn
        .post_send(&[SendRequest::send(1, vec![src.sge_all()])])
        .unwrap();
    let sc = c.wait_ok();
    assert_eq!((sc.wr_id, sc.opcode), (1, WcOpcode::Send));
    let rc = s.wait_ok();
    assert_eq!(
        (rc.wr_id, rc.opcode, rc.byte_len),
        (7, WcOpcode::Recv, 4096)
    );
    assert_eq!(dst.to_vec(), data);
    assert_eq!(
        s.conn.recv_in_flight(),
        0,
        "reaping released the receive buffer"
    );
    assert_eq!(c.conn.send_in_flight(), 0);

    // RDMA WRITE (65 KiB, several MTUs) into a remote-writable region
    let big = 65 * 1024;
    let wsrc = MemoryRegion::alloc(&c.pd, big, Access::default()).unwrap();
    let wdst = MemoryRegion::alloc(&s.pd, big, Access::default().remote_write()).unwrap();
    let data = pattern(big, 2);
    wsrc.write_at(0, &data).unwrap();
    c.conn
        .post_send(&[SendRequest::write(2, vec![wsrc.sge_all()], wdst.remote())])
        .unwrap();
    assert_eq!(c.wait_ok().opcode, WcOpcode::RdmaWrite);
    assert_eq!(wdst.to_vec(), data);

    // WRITE_WITH_IMM consumes a receive and carries the immediate
    s.conn.post_recv(&[RecvRequest::new(8, vec![])]).unwrap();
    let d2 = pattern(100, 3);
    wsrc.write_at(0, &d2).unwrap();
    let req = SendRequest::new(
        3,
        SendOp::WriteWithImm(wdst.remote().slice(1000, 100), 0xdead_beef),
        vec![wsrc.sge(0, 100).unwrap()],
    );
    c.conn.post_send(&[req]).unwrap();
    c.wait_ok();
    let rc = s.wait_ok();
    assert_eq!(rc.opcode, WcOpcode::RecvRdmaWithImm);
    assert_eq!(rc.imm, Some(0xdead_beef));
    let mut got = vec![0; 100];
    wdst.read_at(1000, &mut got).unwrap();
    assert_eq!(got, d2);

    // SEND_WITH_IMM
    s.conn
        .post_recv(&[RecvRequest::new(9, vec![dst.sge_all()])])
        .unwrap();
    c.conn
        .post_send(&[SendRequest::new(
            4,
            SendOp::SendWithImm(42),
            vec![src.sge(0, 10).unwrap()],
        )])
        .unwrap();
    c.wait_ok();
    let rc = s.wait_ok();
    assert_eq!((rc.imm, rc.byte_len), (Some(42), 10));

    // RDMA READ from a remote-readable region into a locally writable one
    let rsrc = MemoryRegion::alloc(&s.pd, 8192, Access::default().remote_read()).unwrap();
    let rdst = MemoryRegion::alloc(&c.pd, 8192, Access::default().local_write()).unwrap();
    let data = pattern(8192, 4);
    rsrc.write_at(0, &data).unwrap();
    c.conn
        .post_send(&[SendRequest::read(5, vec![rdst.sge_all()], rsrc.remote())])
        .unwrap();
    assert_eq!(c.wait_ok().opcode, WcOpcode::RdmaRead);
    assert_eq!(rdst.to_vec(), data);

    c.conn.start_disconnect().unwrap();
    s.conn.wait_event(CmEventKind::Disconnected, T).unwrap();
    assert!(matches!(s.conn.check(), Err(Error::Disconnected { .. })));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn sgl_inline_unsignaled_chain() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20002, PairOpts::default());
    // gather 3 pieces of two regions into one SEND, scatter into 2 pieces at the receiver
    let a = MemoryRegion::alloc(&c.pd, 300, Access::default()).unwrap();
    let b = MemoryRegion::alloc(&c.pd, 300, Access::default()).unwrap();
    a.write_at(0, &pattern(300, 5)).unwrap();
    b.write_at(0, &pattern(300, 6)).unwrap();
    let r1 = MemoryRegion::alloc(&s.pd, 250, Access::default().local_write()).unwrap();
    let r2 = MemoryRegion::alloc(&s.pd, 250, Access::default().local_write()).unwrap();
    s.conn
        .post_recv(&[RecvRequest::new(1, vec![r1.sge_all(), r2.sge_all()])])
        .unwrap();
    let sges = vec![
        a.sge(0, 100).unwrap(),
        b.sge(50, 200).unwrap(),
        a.sge(200, 100).unwrap(),
    ];
    c.conn.post_send(&[SendRequest::send(1, sges)]).unwrap();
    c.wait_ok();
    assert_eq!(s.wait_ok().byte_len, 400);
    let mut expect = pattern(300, 5)[..100].to_vec();
    expect.extend_from_slice(&pattern(300, 6)[50..250]);
    expect.extend_from_slice(&pattern(300, 5)[200..300]);
    let mut got = r1.to_vec();
    got.extend(r2.to_vec()[..150].iter());
    assert_eq!(got, expect);

    // too many SGEs is a typed error, not a post
    let many: Vec<Sge> = (0..c.conn.caps().max_send_sge + 1)
        .map(|_| a.sge(0, 1).unwrap())
        .collect();
    assert!(matches!(
        c.conn.post_send(&[SendRequest::send(9, many)]),
        Err(Error::InvalidArgument { .. })
    ));

    // inline SEND: no MR needed at the sender
    s.conn
        .post_recv(&[RecvRequest::new(2, vec![r1.sge_all()])])
        .unwrap();
    c.conn
        .post_send(&[SendRequest::send_inline(2, b"inline payload")])
        .unwrap();
    c.wait_ok();
    assert_eq!(s.wait_ok().byte_len, 14);
    let mut got = vec![0; 14];
    r1.read_at(0, &mut got).unwrap();
    assert_eq!(&got, b"inline payload");
    let too_big = vec![0u8; c.conn.caps().max_inline_data as usize + 1];
    assert!(matches!(
        c.conn.post_send(&[SendRequest::send_inline(3, &too_big)]),
        Err(Error::InvalidArgument { .. })
    ));

    // 16 chained WRITEs, only the last signalled: one completion, all data there,
    // all 16 buffers released by that one completion.
    let dst = MemoryRegion::alloc(&s.pd, 16 * 512, Access::default().remote_write()).unwrap();
    let src = MemoryRegion::alloc(&c.pd, 16 * 512, Access::default()).unwrap();
    let data = pattern(16 * 512, 7);
    src.write_at(0, &data).unwrap();
    let chain: Vec<SendRequest> = (0..16)
        .map(|i| {
            SendRequest::write(
                100 + i as u64,
                vec![src.sge(i * 512, 512).unwrap()],
                dst.remote().slice(i as u64 * 512, 512),
            )
            .signaled_if(i == 15)
        })
        .collect();
    c.conn.post_send(&chain).unwrap();
    assert_eq!(c.conn.send_in_flight(), 16);
    let done = c.wait_ok();
    assert_eq!(done.wr_id, 115);
    assert_eq!(c.conn.send_in_flight(), 0);
    assert_eq!(dst.to_vec(), data);
    assert!(
        c.cq.poll_one().unwrap().is_none(),
        "unsignalled WRs made no completion"
    );
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn shared_receive_queue() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(
        20003,
        PairOpts {
            server_srq: true,
            ..Default::default()
        },
    );
    let srq = s.srq.as_ref().unwrap();
    let bufs: Vec<MemoryRegion> = (0..4)
        .map(|_| MemoryRegion::alloc(&s.pd, 64, Access::default().local_write()).unwrap())
        .collect();
    let reqs: Vec<RecvRequest> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| RecvRequest::new(i as u64, vec![b.sge_all()]))
        .collect();
    srq.post_recv(&reqs).unwrap();
    assert_eq!(srq.in_flight(), 4);
    let r = MemoryRegion::alloc(&s.pd, 64, Access::default().local_write()).unwrap();
    assert!(matches!(
        s.conn.post_recv(&[RecvRequest::new(9, vec![r.sge_all()])]),
        Err(Error::InvalidArgument { .. })
    ));
    for i in 0..3u8 {
        c.conn
            .post_send(&[SendRequest::send_inline(i as u64, &[i + 10; 20])])
            .unwrap();
        c.wait_ok();
        let rc = s.wait_ok();
        assert_eq!(rc.byte_len, 20);
        let mut got = [0u8; 20];
        bufs[rc.wr_id as usize].read_at(0, &mut got).unwrap();
        assert_eq!(got, [i + 10; 20]);
    }
    assert_eq!(srq.in_flight(), 1);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn memory_window_bind_write_invalidate() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20004, PairOpts::default());
    // the server exposes 4 KiB in the middle of a 16 KiB region for one transfer
    let region =
        MemoryRegion::alloc(&s.pd, 16384, Access::default().local_write().mw_bind()).unwrap();
    let mw = MemoryWindow::alloc(&s.pd).unwrap();
    s.conn
        .post_send(&[SendRequest::bind_window(
            1,
            &mw,
            &region,
            4096,
            4096,
            WindowAccess::none().remote_write(),
        )])
        .unwrap();
    assert_eq!(s.wait_ok().opcode, WcOpcode::BindMw);
    let window = RemoteBuf {
        addr: region.addr() + 4096,
        len: 4096,
        rkey: mw.rkey(),
    };
    assert_ne!(mw.rkey(), region.rkey());

    let src = MemoryRegion::alloc(&c.pd, 4096, Access::default()).unwrap();
    let data = pattern(4096, 9);
    src.write_at(0, &data).unwrap();
    c.conn
        .post_send(&[SendRequest::write(1, vec![src.sge_all()], window)])
        .unwrap();
    c.wait_ok();
    let mut got = vec![0; 4096];
    region.read_at(4096, &mut got).unwrap();
    assert_eq!(got, data);
    // beyond the region through the window's key: refused. (rxe checks window accesses
    // against the underlying region's range only, not the window's sub-range.)
    c.conn
        .post_send(&[SendRequest::write(
            2,
            vec![src.sge(0, 16).unwrap()],
            window.slice(16384 - 4096, 16),
        )])
        .unwrap();
    let e = c.wait().ok().unwrap_err();
    assert_eq!(e.wc_status(), Some(WcStatus::RemoteAccessError), "{e}");
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn memory_window_bound_twice_in_one_chain_is_refused() {
    peerpipe_testbed::require_testbed();
    let (_c, s) = pair(20034, PairOpts::default());
    let region =
        MemoryRegion::alloc(&s.pd, 8192, Access::default().local_write().mw_bind()).unwrap();
    let mw = MemoryWindow::alloc(&s.pd).unwrap();
    let key = mw.rkey();
    let bind = |id, off| {
        SendRequest::bind_window(
            id,
            &mw,
            &region,
            off,
            4096,
            WindowAccess::none().remote_write(),
        )
    };
    match s.conn.post_send(&[bind(1, 0), bind(2, 4096)]) {
        Err(Error::InvalidArgument { op, reason }) => {
            assert_eq!(op, "ibv_post_send");
            assert!(reason.contains("twice"), "{reason}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_eq!(mw.rkey(), key, "nothing was posted");
    assert_eq!(s.conn.qp().send_in_flight(), 0);
    // one bind per post works; after invalidation the next bind gets a new key
    s.conn.post_send(&[bind(3, 0)]).unwrap();
    assert_eq!(s.wait_ok().opcode, WcOpcode::BindMw);
    let first = mw.rkey();
    s.conn
        .post_send(&[SendRequest::new(5, SendOp::LocalInv(first), vec![])])
        .unwrap();
    s.wait_ok();
    let predicted = mw.next_bind_rkey();
    s.conn.post_send(&[bind(4, 4096)]).unwrap();
    assert_eq!(
        mw.rkey(),
        predicted,
        "next_bind_rkey names the key the bind sets"
    );
    assert_eq!(s.wait_ok().opcode, WcOpcode::BindMw);
    assert_ne!(mw.rkey(), first);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn memory_window_write_after_local_invalidate_fails() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20005, PairOpts::default());
    let region =
        MemoryRegion::alloc(&s.pd, 8192, Access::default().local_write().mw_bind()).unwrap();
    let mw = MemoryWindow::alloc(&s.pd).unwrap();
    s.conn
        .post_send(&[SendRequest::bind_window(
            1,
            &mw,
            &region,
            0,
            8192,
            WindowAccess::none().remote_write(),
        )])
        .unwrap();
    s.wait_ok();
    let window = RemoteBuf {
        addr: region.addr(),
        len: 8192,
        rkey: mw.rkey(),
    };
    let src = MemoryRegion::alloc(&c.pd, 64, Access::default()).unwrap();
    src.write_at(0, &[0xab; 64]).unwrap();
    c.conn
        .post_send(&[SendRequest::write(1, vec![src.sge_all()], window)])
        .unwrap();
    c.wait_ok();
    s.conn
        .post_send(&[SendRequest::new(2, SendOp::LocalInv(mw.rkey()), vec![])])
        .unwrap();
    assert_eq!(s.wait_ok().opcode, WcOpcode::LocalInv);
    region.write_at(0, &[0; 64]).unwrap();
    c.conn
        .post_send(&[SendRequest::write(2, vec![src.sge_all()], window)])
        .unwrap();
    let e = c.wait().ok().unwrap_err();
    assert_eq!(e.wc_status(), Some(WcStatus::RemoteAccessError), "{e}");
    assert_eq!(
        region.to_vec()[..64],
        [0u8; 64],
        "nothing written after invalidation"
    );
    assert!(e.to_string().contains("remote access error"), "{e}");
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn memory_window_invalidated_by_peer_send_with_inv() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20006, PairOpts::default());
    let region =
        MemoryRegion::alloc(&s.pd, 4096, Access::default().local_write().mw_bind()).unwrap();
    let mw = MemoryWindow::alloc(&s.pd).unwrap();
    s.conn
        .post_send(&[SendRequest::bind_window(
            1,
            &mw,
            &region,
            0,
            4096,
            WindowAccess::none().remote_write(),
        )])
        .unwrap();
    s.wait_ok();
    let window = RemoteBuf {
        addr: region.addr(),
        len: 4096,
        rkey: mw.rkey(),
    };
    let src = MemoryRegion::alloc(&c.pd, 64, Access::default()).unwrap();
    c.conn
        .post_send(&[SendRequest::write(1, vec![src.sge_all()], window)])
        .unwrap();
    c.wait_ok();
    // "done": the client's SEND_WITH_INV revokes the window at the server
    s.conn.post_recv(&[RecvRequest::new(5, vec![])]).unwrap();
    c.conn
        .post_send(&[SendRequest::new(
            2,
            SendOp::SendWithInv(window.rkey),
            vec![],
        )])
        .unwrap();
    c.wait_ok();
    let rc = s.wait_ok();
    // rxe reports the kernel's IB_WC_WITH_INVALIDATE bit, which is not IBV_WC_WITH_INV, so
    // the rkey may not be reported; the invalidation itself is checked below.
    assert!(
        rc.invalidated_rkey.map_or(true, |k| k == window.rkey),
        "{rc:?}"
    );
    c.conn
        .post_send(&[SendRequest::write(3, vec![src.sge_all()], window)])
        .unwrap();
    assert_eq!(c.wait().status, WcStatus::RemoteAccessError);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn remote_access_outside_region_fails_cleanly() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20007, PairOpts::default());
    let dst = MemoryRegion::alloc(&s.pd, 4096, Access::default().remote_write()).unwrap();
    let ro = MemoryRegion::alloc(&s.pd, 4096, Access::default().remote_read()).unwrap();
    let src = MemoryRegion::alloc(&c.pd, 8192, Access::default()).unwrap();
    // past the end
    c.conn
        .post_send(&[SendRequest::write(
            1,
            vec![src.sge(0, 128).unwrap()],
            dst.remote().slice(4000, 128),
        )])
        .unwrap();
    let e = c.wait().ok().unwrap_err();
    assert_eq!(e.wc_status(), Some(WcStatus::RemoteAccessError), "{e}");
    // the QP is now in error: a later WR is refused or flushed with a typed status, no hang
    let posted = c.conn.post_send(&[SendRequest::write(
        2,
        vec![src.sge(0, 8).unwrap()],
        dst.remote(),
    )]);
    match posted {
        Ok(()) => assert_eq!(c.wait().status, WcStatus::Flushed),
        Err(e) => assert!(
            matches!(
                e,
                Error::Verbs {
                    op: "ibv_post_send",
                    ..
                }
            ),
            "{e}"
        ),
    }
    assert_eq!(
        c.conn.send_in_flight(),
        0,
        "error completions release buffers too"
    );
    // a second connection: write into a region without remote write rights
    drop((c, s));
    let (c, s) = pair(20008, PairOpts::default());
    let ro2 = MemoryRegion::alloc(&s.pd, 4096, Access::default().remote_read()).unwrap();
    let src = MemoryRegion::alloc(&c.pd, 64, Access::default()).unwrap();
    c.conn
        .post_send(&[SendRequest::write(1, vec![src.sge_all()], ro2.remote())])
        .unwrap();
    assert_eq!(c.wait().status, WcStatus::RemoteAccessError);
    drop(ro);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn connect_errors_are_typed_and_bounded() {
    peerpipe_testbed::require_testbed();
    let (a0, a1) = addrs();
    // no listener on that port
    let t = Instant::now();
    let r = Connector::resolve(Some(a0), SocketAddr::new(a1, 20999), T).and_then(|c| {
        let ctx = c.context().clone();
        let pd = ProtectionDomain::new(&ctx)?;
        let cq = CompletionQueue::new(&ctx, 16)?;
        c.connect(
            &QpInit::new(&pd, &cq),
            &ConnParams {
                timeout: Duration::from_secs(5),
                ..Default::default()
            },
        )
    });
    match r {
        Err(Error::Cm { .. }) | Err(Error::Rejected { .. }) | Err(Error::Timeout { .. }) => {}
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
    assert!(t.elapsed() < Duration::from_secs(20));

    // rejected with private data
    let listener = Listener::bind(SocketAddr::new(a1, 20009), 4).unwrap();
    let srv = std::thread::spawn(move || {
        let req = listener.get_request(T).unwrap();
        assert!(req.private_data().starts_with(b"let me in"));
        req.reject(b"no").unwrap();
    });
    let c = Connector::resolve(Some(a0), SocketAddr::new(a1, 20009), T).unwrap();
    let ctx = c.context().clone();
    assert_eq!(
        ctx.name(),
        "rxe0",
        "source address picks the client's device"
    );
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let cq = CompletionQueue::new(&ctx, 16).unwrap();
    let params = ConnParams {
        private_data: b"let me in".to_vec(),
        ..Default::default()
    };
    match c.connect(&QpInit::new(&pd, &cq), &params) {
        Err(Error::Rejected { status, .. }) => assert_eq!(status, 28, "consumer reject"),
        other => panic!("expected Rejected, got {:?}", other.map(|_| ())),
    }
    srv.join().unwrap();

    // a PD from the other device is refused with a clear error
    let c = Connector::resolve(Some(a0), SocketAddr::new(a1, 20009), T);
    if let Ok(c) = c {
        let other = Context::open("rxe1").unwrap();
        let pd = ProtectionDomain::new(&other).unwrap();
        let cq = CompletionQueue::new(&other, 16).unwrap();
        assert!(matches!(
            c.connect(&QpInit::new(&pd, &cq), &ConnParams::default()),
            Err(Error::InvalidArgument { .. })
        ));
    }
    // listener get_request times out
    let l = Listener::bind(SocketAddr::new(a1, 20010), 4).unwrap();
    let t = Instant::now();
    assert!(matches!(
        l.get_request(Duration::from_millis(300)),
        Err(Error::Timeout { .. })
    ));
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn ack_timeout_is_applied_to_both_ends() {
    peerpipe_testbed::require_testbed();
    let timeouts = |port, opts| {
        let (c, s) = pair(port, opts);
        (
            c.conn.qp().ack_timeout().unwrap(),
            s.conn.qp().ack_timeout().unwrap(),
        )
    };
    // rdma_cm's own default on RoCE: packet lifetime 16 + 1
    assert_eq!(
        timeouts(20031, PairOpts::default()),
        (17, 17),
        "(client, server), rdma_cm default"
    );
    let set = PairOpts {
        client_ack_timeout: Some(14),
        server_ack_timeout: Some(12),
        ..Default::default()
    };
    assert_eq!(
        timeouts(20032, set),
        (14, 12),
        "(client, server), set before connect / accept"
    );
    // out of range: refused before anything goes to the peer
    let (a0, a1) = addrs();
    let c = Connector::resolve(Some(a0), SocketAddr::new(a1, 20033), T).unwrap();
    let ctx = c.context().clone();
    let pd = ProtectionDomain::new(&ctx).unwrap();
    let cq = CompletionQueue::new(&ctx, 16).unwrap();
    let params = ConnParams {
        ack_timeout: Some(32),
        ..Default::default()
    };
    match c.connect(&QpInit::new(&pd, &cq), &params) {
        Err(Error::InvalidArgument { op, reason }) => {
            assert_eq!(op, "rdma_set_option(ACK_TIMEOUT)");
            assert!(reason.contains("0..=31"), "{reason}");
        }
        other => panic!("expected InvalidArgument, got {:?}", other.map(|_| ())),
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn connection_loop_leaks_nothing() {
    peerpipe_testbed::require_testbed();
    // warm-up: librdmacm opens its device contexts once per process
    {
        let (c, s) = pair(20011, PairOpts::default());
        c.conn.start_disconnect().unwrap();
        drop((c, s));
    }
    std::thread::sleep(Duration::from_millis(300));
    let base = rdma_res();
    for i in 0..20u16 {
        let (c, s) = pair(20012 + i, PairOpts::default());
        let mr = MemoryRegion::alloc(&c.pd, 4096, Access::default()).unwrap();
        let rmr = MemoryRegion::alloc(&s.pd, 4096, Access::default().remote_write()).unwrap();
        c.conn
            .post_send(&[SendRequest::write(1, vec![mr.sge_all()], rmr.remote())])
            .unwrap();
        c.wait_ok();
        if i % 2 == 0 {
            c.conn.start_disconnect().unwrap();
            // drop in an unusual order: PD and CQ handles before the connection
            let Side { conn, pd, cq, srq } = c;
            drop(pd);
            drop(cq);
            drop(mr);
            drop(conn);
            drop(srq);
        } else {
            // no explicit disconnect: drop does it; server side dropped first
            drop(s);
            drop(c);
            continue;
        }
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rdma_res();
    for key in ["pd", "cq", "qp", "cm_id", "mr", "srq"] {
        assert_eq!(
            base.get(key),
            after.get(key),
            "{key}: before {base:?} after {after:?}"
        );
    }
    assert!(base.contains_key("qp"), "rdma res output parsed: {base:?}");
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn completion_channel_fd_is_pollable() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20040, PairOpts::default());
    let ch = s.cq.channel().unwrap();
    let fd = ch.fd().as_raw_fd();
    // SAFETY: fcntl on a live fd.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(
        fl & libc::O_NONBLOCK != 0,
        "channel fd must be non-blocking"
    );
    assert!(!s.cq.take_event().unwrap(), "no event before arming");
    let dst = MemoryRegion::alloc(&s.pd, 64, Access::default().local_write()).unwrap();
    s.conn
        .post_recv(&[RecvRequest::new(1, vec![dst.sge_all()])])
        .unwrap();
    s.cq.arm(false).unwrap();
    c.conn
        .post_send(&[SendRequest::send_inline(1, b"wake up")])
        .unwrap();
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 10_000) };
    assert_eq!(n, 1, "channel fd became readable");
    assert!(s.cq.take_event().unwrap());
    let got =
        s.cq.poll_one()
            .unwrap()
            .expect("completion after event")
            .ok()
            .unwrap();
    assert_eq!(got.byte_len, 7);
    // and a timeout when nothing comes
    let mut out = [EMPTY_COMPLETION];
    assert!(matches!(
        s.cq.wait(&mut out, Duration::from_millis(200)),
        Err(Error::Timeout { .. })
    ));
    c.wait_ok();
}

fn mmap_shared(path: &str, len: usize) -> std::result::Result<(*mut u8, i32), String> {
    let cpath = std::ffi::CString::new(path).unwrap();
    // SAFETY: plain open of a path.
    let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh shared mapping of the file at offset 0.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {path}: {}", std::io::Error::last_os_error()));
    }
    Ok((p.cast(), fd))
}

struct Mapping(*mut u8, usize, i32);
// SAFETY: just an address range and an fd.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping and fd.
        unsafe {
            libc::munmap(self.0.cast(), self.1);
            libc::close(self.2);
        }
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn p2pmem_registration_dev_ok_sysfs_allocate_distinct_error() {
    peerpipe_testbed::require_testbed();
    let len = 2 << 20;
    let ctx = Context::open("rxe1").unwrap();
    let pd = ProtectionDomain::new(&ctx).unwrap();

    let (p, fd) = mmap_shared("/dev/p2pmem0", len).unwrap();
    let map = Mapping(p, len, fd);
    // SAFETY: the mapping lives in `map`, owned by the region until after deregistration.
    let mr = unsafe {
        MemoryRegion::register_with_owner(
            &pd,
            p,
            len,
            Access::remote_rw(),
            MemoryKind::Detect,
            Some(Box::new(map)),
        )
    }
    .unwrap_or_else(|e| panic!("/dev/p2pmem0 registration must work: {e}"));
    assert_eq!(mr.len(), len);

    let alloc = "/sys/bus/pci/devices/0000:03:00.0/p2pmem/allocate";
    let (p2, fd2) = mmap_shared(alloc, len).unwrap();
    let map2 = Mapping(p2, len, fd2);
    // SAFETY: `map2` outlives the (failing) registration.
    let r = unsafe {
        MemoryRegion::register_raw(&pd, p2, len, Access::remote_rw(), MemoryKind::Detect)
    };
    match &r {
        Err(Error::PeerMemoryNotPinnable {
            errno,
            cause,
            mapping,
            ..
        }) => {
            assert_eq!(*errno, libc::EFAULT);
            assert_eq!(*cause, PeerMemoryCause::NotPinnable);
            assert!(
                mapping.as_deref().is_some_and(|m| m.contains("p2pmem")),
                "{mapping:?}"
            );
        }
        other => panic!(
            "expected PeerMemoryNotPinnable, got {:?}",
            other.as_ref().map(|_| ())
        ),
    }
    let text = r.err().unwrap().to_string();
    assert!(text.contains("/dev/p2pmemN"), "{text}");
    // the caller may also just say it is peer memory
    // SAFETY: as above.
    let r =
        unsafe { MemoryRegion::register_raw(&pd, p2, len, Access::remote_rw(), MemoryKind::Peer) };
    assert!(matches!(r, Err(Error::PeerMemoryNotPinnable { .. })));
    drop(map2);

    // dma-buf MRs: rxe has none, and says so
    // SAFETY: memfd is a valid fd for the call; the region is never created.
    let memfd = unsafe { libc::memfd_create(c"x".as_ptr(), 0) };
    // SAFETY: fd stays valid during the call.
    let r = unsafe {
        MemoryRegion::register_dmabuf(&pd, memfd, 0, 4096, 0, Access::default().local_write())
    };
    assert!(
        matches!(
            r,
            Err(Error::Unsupported {
                op: "ibv_reg_dmabuf_mr",
                ..
            })
        ),
        "{:?}",
        r.map(|_| ())
    );
    // SAFETY: our fd.
    unsafe { libc::close(memfd) };
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn rdma_write_into_p2pmem() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20041, PairOpts::default());
    let len = 1 << 20;
    let (p, fd) = mmap_shared("/dev/p2pmem0", len).unwrap();
    // SAFETY: the mapping is owned by the region.
    let dst = unsafe {
        MemoryRegion::register_with_owner(
            &s.pd,
            p,
            len,
            Access::remote_rw(),
            MemoryKind::Peer,
            Some(Box::new(Mapping(p, len, fd))),
        )
    }
    .unwrap();
    let src = MemoryRegion::alloc(&c.pd, len, Access::default()).unwrap();
    let data = pattern(len, 11);
    src.write_at(0, &data).unwrap();
    c.conn
        .post_send(&[SendRequest::write(1, vec![src.sge_all()], dst.remote())])
        .unwrap();
    c.wait_ok();
    assert!(
        dst.to_vec() == data,
        "data written by RDMA into the CMB reads back"
    );
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn cm_event_stream_disconnect() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20042, PairOpts::default());
    assert!(c.conn.check().is_ok() && s.conn.check().is_ok());
    assert_eq!(c.conn.local_addr().map(|a| a.ip()), Some(addrs().0));
    assert_eq!(c.conn.peer_addr().map(|a| a.ip()), Some(addrs().1));
    let t = Instant::now();
    c.conn.start_disconnect().unwrap();
    let ev = s.conn.wait_event(CmEventKind::Disconnected, T).unwrap();
    assert_eq!(ev.kind, CmEventKind::Disconnected);
    assert!(matches!(s.conn.check(), Err(Error::Disconnected { .. })));
    // the server answered the DREQ while reading it, so the client's own DISCONNECTED (the
    // DREP) arrives promptly, not after the CM's DREQ retries time out
    let tc = Instant::now();
    c.conn.wait_event(CmEventKind::Disconnected, T).unwrap();
    assert!(matches!(c.conn.check(), Err(Error::Disconnected { .. })));
    eprintln!("client DISCONNECTED {:?} after the server's", tc.elapsed());
    assert!(tc.elapsed() < Duration::from_secs(3), "{:?}", tc.elapsed());
    // posting on a disconnected QP: refused, flushed, or reported as disconnected by the
    // connection-aware wait; never a hang
    let mr = MemoryRegion::alloc(&s.pd, 64, Access::default()).unwrap();
    if s.conn
        .post_send(&[SendRequest::send(1, vec![mr.sge_all()])])
        .is_ok()
    {
        let mut out = [EMPTY_COMPLETION];
        match s.conn.wait_completions(&s.cq, &mut out, T) {
            Ok(n) => assert_eq!((n, out[0].status), (1, WcStatus::Flushed)),
            Err(e) => assert!(matches!(e, Error::Disconnected { .. }), "{e}"),
        }
    }
    assert!(t.elapsed() < 2 * T);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn cm_disconnect_both_sides_then_timewait_exit() {
    peerpipe_testbed::require_testbed();
    let (c, s) = pair(20043, PairOpts::default());
    let t = Instant::now();
    // the blocking form on the client, with the server reading its events in a thread
    let server = std::thread::spawn(move || {
        s.conn.wait_event(CmEventKind::Disconnected, T).unwrap();
        s
    });
    c.conn
        .disconnect(T)
        .expect("client sees its own DISCONNECTED");
    let s = server.join().unwrap();
    eprintln!("both DISCONNECTED after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // IB CM (RoCE) keeps each id in TIMEWAIT for about the packet lifetime after the
    // DREQ/DREP exchange, then rdma_cm reports TIMEWAIT_EXIT while the id is still alive
    let tw = Instant::now();
    c.conn.wait_event(CmEventKind::TimewaitExit, T).unwrap();
    s.conn.wait_event(CmEventKind::TimewaitExit, T).unwrap();
    eprintln!(
        "TIMEWAIT_EXIT on both sides {:?} after DISCONNECTED",
        tw.elapsed()
    );
}
