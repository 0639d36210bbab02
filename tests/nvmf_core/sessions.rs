//! Connect errors, rdma_cm queue sizes, keep-alive expiry, async events, log pages and the
//! discovery controller.

use std::time::{Duration, Instant};

use peerpipe::nvmf::{Action, CmReject, CmRequest, QueueCore, Status, DISCOVERY_NQN};

use super::support::*;

// ---------------------------------------------------------------- Connect errors

#[test]
fn connect_errors() {
    let core = target();
    let param = Status::CONNECT_INVALID_PARAM.with_dnr();
    // Unknown subsystem: IATTR 1 (connect data), IPO 256 (SUBNQN).
    let (_h, c) = Host::connect(&core, "nqn.2026-11.io.peerpipe:nope", HOST_A, 0);
    assert_eq!((c.status, c.result), (param, (1 << 16) | 256));
    // A host not on the allow list: Invalid Host, IPO 512 (HOSTNQN).
    let (_h, c) = Host::connect(&core, RESTRICTED, HOST_A, 0);
    assert_eq!(
        (c.status, c.result),
        (Status::CONNECT_INVALID_HOST.with_dnr(), (1 << 16) | 512)
    );
    let (_h, c) = Host::connect(&core, RESTRICTED, HOST_B, 0);
    assert_eq!(c.status, Status::SUCCESS);

    let mut h = Host::ready(&core, SUBNQN);
    // An I/O Connect naming a controller that does not exist: IPO 16 (CNTLID).
    let (_q, c) = h.io_queue(1, h.cntlid.wrapping_add(100));
    assert_eq!((c.status, c.result), (param, (1 << 16) | 16));
    // Another host's controller.
    let now = h.now;
    let io_req = |qid: u16, cntlid: u16| CmRequest {
        recfmt: 0,
        qid,
        hrqsize: 128,
        hsqsize: 127,
        cntlid,
    };
    let mut q = QueueCore::new(&core, &io_req(1, h.cntlid));
    assert!(matches!(
        q.on_command(&connect_sqe(1, 1, 127, 0).cmd(), &[], now),
        Action::FetchData { .. }
    ));
    let c = complete(q.on_data(1, &connect_data(h.cntlid, SUBNQN, HOST_B), now));
    assert_eq!((c.status, c.result), (param, (1 << 16) | 16));
    // The rdma_cm private data names another cntlid than the connect data.
    let mut q = QueueCore::new(&core, &io_req(1, h.cntlid + 1));
    assert!(matches!(
        q.on_command(&connect_sqe(1, 1, 127, 0).cmd(), &[], now),
        Action::FetchData { .. }
    ));
    let c = complete(q.on_data(1, &connect_data(h.cntlid, SUBNQN, HOST_A), now));
    assert_eq!(c.status, param);
    // qid in the SQE differs from the queue's: IPO 42 (QID in the SQE).
    let mut q = QueueCore::new(&core, &io_req(2, h.cntlid));
    let c = complete(q.on_command(&connect_sqe(1, 3, 127, 0).cmd(), &[], now));
    assert_eq!((c.status, c.result), (param, 42));
    // sqsize 0 or beyond the queue's announced size: IPO 44.
    let c = complete(q.on_command(&connect_sqe(2, 2, 0, 0).cmd(), &[], now));
    assert_eq!((c.status, c.result), (param, 44));
    let c = complete(q.on_command(&connect_sqe(3, 2, 128, 0).cmd(), &[], now));
    assert_eq!((c.status, c.result), (param, 44));
    // Record format 1.
    let c = complete(q.on_command(
        &connect_sqe(4, 2, 127, 0).cdw(10, (2 << 16) | 1).cmd(),
        &[],
        now,
    ));
    assert_eq!(c.status, Status::CONNECT_FORMAT.with_dnr());

    // qid above the grant: the host was granted 2 queues.
    assert_eq!(h.set_queues(2), 1 | (1 << 16));
    let (_q1, c) = h.io_queue(1, h.cntlid);
    assert_eq!(c.status, Status::SUCCESS);
    let (_q1b, c) = h.io_queue(1, h.cntlid);
    assert_eq!((c.status, c.result), (param, 42), "qid 1 is taken");
    let (_q2, c) = h.io_queue(2, h.cntlid);
    assert_eq!(c.status, Status::SUCCESS);
    let (_q3, c) = h.io_queue(3, h.cntlid);
    assert_eq!((c.status, c.result), (param, 42));
    // The discovery controller has no I/O queues.
    let (d, _) = Host::connect(&core, DISCOVERY_NQN, HOST_A, 0);
    let mut q = QueueCore::new(&core, &io_req(1, d.cntlid));
    q.on_command(&connect_sqe(1, 1, 127, 0).cmd(), &[], now);
    let c = complete(q.on_data(1, &connect_data(d.cntlid, DISCOVERY_NQN, HOST_A), now));
    assert_eq!(c.status, param);
    // Freed controllers' ids are not served any more.
    let gone = h.cntlid;
    h.admin.on_disconnect();
    let (_q, c) = h.io_queue(2, gone);
    assert_eq!(c.status, param);
}

#[test]
fn queue_sizes_in_the_cm_request() {
    let core = target();
    let parse = |qid: u16, hrqsize: u16, hsqsize: u16| {
        CmRequest::parse(
            &CmRequest {
                recfmt: 0,
                qid,
                hrqsize,
                hsqsize,
                cntlid: 0,
            }
            .encode(),
        )
    };
    assert_eq!(
        parse(0, 32, 32),
        Err(CmReject::InvalidHsqsize),
        "admin hsqsize + 1 > 32"
    );
    assert_eq!(parse(0, 32, 0), Err(CmReject::InvalidHsqsize));
    assert_eq!(parse(0, 33, 31), Err(CmReject::InvalidHrqsize));
    assert_eq!(parse(1, 0, 127), Err(CmReject::InvalidHrqsize));
    assert_eq!(parse(1, 128, 1024), Err(CmReject::InvalidHsqsize));
    assert_eq!(CmRequest::parse(&[0u8; 16]), Err(CmReject::InvalidLength));
    let mut raw = CmRequest {
        recfmt: 0,
        qid: 0,
        hrqsize: 32,
        hsqsize: 31,
        cntlid: 0,
    }
    .encode();
    raw[0] = 1;
    assert_eq!(CmRequest::parse(&raw), Err(CmReject::InvalidRecfmt));
    // The listener's own limits: 4 I/O queues of at most 128 entries.
    let ok = parse(4, 128, 127).unwrap();
    assert_eq!(core.admit(&ok), Ok(()));
    assert_eq!(
        core.admit(&parse(5, 128, 127).unwrap()),
        Err(CmReject::InvalidQid)
    );
    assert_eq!(
        core.admit(&parse(1, 256, 255).unwrap()),
        Err(CmReject::InvalidHsqsize)
    );
    assert_eq!(CmReject::InvalidQid.encode(), [0, 0, 3, 0]);
}

// ---------------------------------------------------------------- keep-alive, events

#[test]
fn keep_alive_expiry() {
    let core = target();
    let (mut h, _) = Host::connect(&core, SUBNQN, HOST_A, 1000);
    let t0 = h.now;
    let ms = |n: u64| t0 + Duration::from_millis(n);
    assert!(core.expired(ms(500)).is_empty());
    assert!(
        core.expired(ms(1000)).is_empty(),
        "exactly KATO is not late"
    );
    // Any command refreshes the timer (here a Property Get at 900 ms).
    h.now = ms(900);
    h.prop(false, 0x1c);
    assert!(core.expired(ms(1500)).is_empty());
    assert_eq!(core.expired(ms(1901)), vec![h.cntlid]);
    // An explicit Keep Alive on an enabled controller, and a new KATO by Set Features.
    h.set_cc(0x0046_0001);
    h.now = ms(3000);
    let cid = h.next_cid();
    assert_eq!(status(h.admin(Sqe::new(0x18, cid))), Status::SUCCESS);
    assert!(core.expired(ms(3900)).is_empty());
    let cid = h.next_cid();
    assert_eq!(
        status(h.admin(Sqe::new(0x09, cid).cdw(10, 0x0f).cdw(11, 10_000))),
        Status::SUCCESS
    );
    let cid = h.next_cid();
    assert_eq!(
        complete(h.admin(Sqe::new(0x0a, cid).cdw(10, 0x0f))).result,
        10_000
    );
    assert!(core.expired(ms(12_000)).is_empty());
    assert_eq!(core.expired(ms(13_001)), vec![h.cntlid]);
    assert_eq!(
        core.expired(ms(13_002)),
        vec![h.cntlid],
        "reported until torn down"
    );
    assert_eq!(
        core.stats().keep_alive_expired,
        2,
        "each expiry counted once"
    );
    // Traffic on an I/O queue counts too.
    let (mut q, _) = h.io_queue(1, h.cntlid);
    q.on_command(&Sqe::new(0x00, 9).nsid(2).cmd(), &[], ms(13_000));
    assert!(core.expired(ms(22_000)).is_empty());
    // KATO 0: never.
    let core2 = target();
    let (_h2, _) = Host::connect(&core2, SUBNQN, HOST_A, 0);
    assert!(core2
        .expired(Instant::now() + Duration::from_secs(86_400))
        .is_empty());
}

#[test]
fn async_event_requests_are_held_up_to_aerl() {
    let core = target();
    let mut h = Host::ready(&core, SUBNQN);
    for cid in 100..104 {
        assert_eq!(h.admin(Sqe::new(0x0c, cid)), Action::Hold);
    }
    assert_eq!(h.admin.outstanding(), 4);
    assert_eq!(
        status(h.admin(Sqe::new(0x0c, 104))),
        Status::ASYNC_LIMIT.with_dnr()
    );
    // Async Event Configuration is accepted and read back.
    assert_eq!(
        status(h.admin(Sqe::new(0x09, 105).cdw(10, 0x0b).cdw(11, 0x100))),
        Status::SUCCESS
    );
    assert_eq!(
        complete(h.admin(Sqe::new(0x0a, 106).cdw(10, 0x0b))).result,
        0x100
    );
    // Log pages of an NVM controller.
    let (smart, c) = data(h.admin(get_log(107, 0x02, 512, 0)));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(
        (smart[0], u16_at(&smart, 1), smart[3], smart[4]),
        (0, 313, 100, 10)
    );
    let (err, _) = data(h.admin(get_log(108, 0x01, 64, 0)));
    assert!(err.iter().all(|&b| b == 0));
    let (chg, _) = data(h.admin(get_log(109, 0x04, 4096, 0)));
    assert!(chg.iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------- discovery

#[test]
fn discovery_controller_and_log_offsets() {
    let core = target();
    for (host, visible) in [(HOST_A, vec![SUBNQN]), (HOST_B, vec![SUBNQN, RESTRICTED])] {
        let (mut d, c) = Host::connect(&core, DISCOVERY_NQN, host, 0);
        assert_eq!(c.status, Status::SUCCESS);
        d.set_cc(0x0000_0001); // the discovery controller takes any queue entry sizes
        assert_eq!(d.prop(false, 0x1c), 1);
        let id = d.identify(1, 0);
        assert_eq!(
            (id[111], u16_at(&id, 78)),
            (2, d.cntlid),
            "CNTRLTYPE discovery"
        );
        assert_eq!(c_str(&id[768..1024]), DISCOVERY_NQN);
        assert_eq!(u32_at(&id, 516), 0, "no namespaces");
        assert!(u32_at(&id, 536) & (1 << 2) != 0);
        let cid = d.next_cid();
        assert_eq!(
            status(d.admin(identify(cid, 2, 0))),
            Status::INVALID_FIELD.with_dnr()
        );

        // nvme discover: the header first, then the rest in pieces.
        let cid = d.next_cid();
        let (hdr, _) = data(d.admin(get_log(cid, 0x70, 1024, 0)));
        let numrec = u64_at(&hdr, 8);
        assert_eq!(
            (u64_at(&hdr, 0), numrec, u16_at(&hdr, 16)),
            (1, visible.len() as u64, 0)
        );
        let total = 1024 + 1024 * numrec as u32;
        let cid = d.next_cid();
        let (whole, _) = data(d.admin(get_log(cid, 0x70, total, 0)));
        assert_eq!(&whole[..1024], &hdr[..]);
        for (k, nqn) in visible.iter().enumerate() {
            let cid = d.next_cid();
            let off = 1024 + 1024 * k as u64;
            let (e, _) = data(d.admin(get_log(cid, 0x70, 1024, off)));
            assert_eq!(
                &e[..],
                &whole[off as usize..off as usize + 1024],
                "offset honoured"
            );
            assert_eq!(
                (e[0], e[1], e[2], e[3]),
                (1, 1, 2, 0),
                "TRTYPE ADRFAM SUBTYPE TREQ"
            );
            assert_eq!(
                (u16_at(&e, 4), u16_at(&e, 6), u16_at(&e, 8)),
                (1, 0xffff, 32)
            );
            assert_eq!(c_str(&e[32..64]), "4420");
            assert_eq!(c_str(&e[256..512]), *nqn);
            assert_eq!(c_str(&e[512..768]), "10.77.0.2");
            assert_eq!((e[768], e[769], e[770]), (1, 1, 1), "TSAS RDMA");
        }
        // A 4 KiB piece past the end reads zeros; an offset beyond the page or unaligned
        // is refused; the Number of Queues feature does not exist here.
        let cid = d.next_cid();
        let (tail, _) = data(d.admin(get_log(cid, 0x70, 4096, u64::from(total - 8))));
        assert!(tail.iter().all(|&b| b == 0));
        let cid = d.next_cid();
        assert_eq!(
            status(d.admin(get_log(cid, 0x70, 4096, u64::from(total) + 4))),
            Status::INVALID_FIELD.with_dnr()
        );
        let cid = d.next_cid();
        assert_eq!(
            status(d.admin(get_log(cid, 0x70, 1024, 2))),
            Status::INVALID_FIELD.with_dnr()
        );
        let cid = d.next_cid();
        assert_eq!(
            status(d.admin(get_log(cid, 0x02, 512, 0))),
            Status::INVALID_FIELD.with_dnr()
        );
        let cid = d.next_cid();
        assert_eq!(
            status(d.admin(Sqe::new(0x09, cid).cdw(10, 7).cdw(11, 0))),
            Status::INVALID_FIELD.with_dnr()
        );
    }
}
