//! Host tests of the NVMe-oF controller core: the Linux 6.12 `nvme-rdma` host's bring-up
//! sequence and I/O, driven through `QueueCore` with byte-exact SQEs built by [`Sqe`], and
//! bad input (unknown opcodes, bad SGLs, MDTS, LBA range, sequence errors, Connect errors,
//! queue sizes, keep-alive expiry, discovery log offsets) plus a randomized fuzz run.

#[path = "nvmf_core/fuzz.rs"]
mod fuzz;
#[path = "nvmf_core/sessions.rs"]
mod sessions;
#[path = "nvmf_core/support.rs"]
mod support;

use std::time::Instant;

use peerpipe::nvmf::{Action, CmRequest, IoFailure, IoOp, QueueCore, Sgl, Status};
use support::*;

// ---------------------------------------------------------------- the Linux bring-up

#[test]
fn linux_host_bring_up_io_and_shutdown() {
    let core = target();
    // 1. Connect on qid 0: the cntlid comes back in result[15:0].
    let (mut h, c) = Host::connect(&core, SUBNQN, HOST_A, 5000);
    assert_eq!((c.status, c.cid, c.sqid), (Status::SUCCESS, 1, 0));
    assert_ne!(h.cntlid, 0);
    assert_eq!(c.result >> 16, 0, "no authentication requested");

    // 2. CAP, CC, CSTS, VS.
    let cap = h.prop(true, 0x00);
    assert_eq!(cap & 0xffff, 127, "MQES = queue_depth_max - 1");
    assert_eq!((cap >> 16) & 1, 1, "CQR");
    assert_ne!((cap >> 24) & 0xff, 0, "TO");
    assert_eq!((cap >> 37) & 0xff, 1, "CSS: NVM only");
    assert_eq!((cap >> 48) & 0xf, 0, "MPSMIN");
    h.set_cc(0x0046_0000); // IOCQES 4, IOSQES 6, not enabled
    assert_eq!(h.prop(false, 0x1c) & 1, 0);
    h.set_cc(0x0046_0001);
    assert_eq!(h.prop(false, 0x1c), 1, "CSTS.RDY, no CFS");
    assert_eq!(h.prop(false, 0x14), 0x0046_0001);
    assert_eq!(h.prop(false, 0x08), 0x0001_0300, "VS 1.3");

    // 3. Identify Controller and the host's checks on it.
    let id = h.identify(1, 0);
    assert_eq!(u16_at(&id, 78), h.cntlid, "CNTLID");
    assert_ne!(u16_at(&id, 320), 0, "KAS");
    assert_eq!(u32_at(&id, 1792), (64 + 4096) / 16, "IOCCSZ");
    assert_eq!(u32_at(&id, 1796), 1, "IORCSZ");
    assert_eq!(u16_at(&id, 1800), 0, "ICDOFF");
    let sgls = u32_at(&id, 536);
    assert!(
        sgls & (1 << 2) != 0 && sgls & (1 << 20) != 0 && sgls & 3 == 1,
        "SGLS {sgls:#x}"
    );
    assert_eq!(id[77], 8, "MDTS 1 MiB in 4 KiB units");
    assert_eq!((id[111], id[512], id[513], id[1803]), (1, 0x66, 0x44, 1));
    assert_eq!(u16_at(&id, 514), 128, "MAXCMD");
    assert_eq!(u32_at(&id, 516), 2, "NN");
    assert_eq!(
        u16_at(&id, 520),
        (1 << 2) | (1 << 3),
        "ONCS: DSM + Write Zeroes"
    );
    assert_eq!(id[525] & 1, 1, "VWC mirrors namespace 1's cache");
    assert_eq!(c_str(&id[768..1024]), SUBNQN);
    assert_eq!(
        std::str::from_utf8(&id[4..24]).unwrap().trim_end(),
        "PP0001"
    );
    assert_eq!(u32_at(&id, 80), 0x0001_0300);
    assert_eq!(u32_at(&id, 92), 0, "OAES");
    assert_eq!(id[259], 3, "AERL");

    // 4. Number of Queues: the host asks for 8, the target (max 4) grants 4.
    assert_eq!(h.set_queues(8), 3 | (3 << 16));
    let cid = h.next_cid();
    let c = complete(h.admin(Sqe::new(0x0a, cid).cdw(10, 7)));
    assert_eq!(c.result, 3 | (3 << 16));

    // 5. I/O queue Connects name the cntlid (private data and connect data).
    let mut queues = Vec::new();
    for qid in 1..=4 {
        let (q, c) = h.io_queue(qid, h.cntlid);
        assert_eq!(
            (c.status, c.result as u16, c.sqid),
            (Status::SUCCESS, h.cntlid, qid)
        );
        queues.push(q);
    }

    // 6. Keep Alive.
    let cid = h.next_cid();
    assert_eq!(status(h.admin(Sqe::new(0x18, cid))), Status::SUCCESS);

    // 7. Scan: CNS 2, CNS 3, CNS 0.
    let list = h.identify(2, 0);
    assert_eq!(
        (u32_at(&list, 0), u32_at(&list, 4), u32_at(&list, 8)),
        (1, 2, 0)
    );
    let list = h.identify(2, 1);
    assert_eq!((u32_at(&list, 0), u32_at(&list, 4)), (2, 0));
    let mut ids = Vec::new();
    for nsid in [1, 2] {
        let d = h.identify(3, nsid);
        assert_eq!((d[0], d[1]), (2, 16), "NGUID descriptor");
        assert_eq!((d[20], d[21]), (3, 16), "UUID descriptor");
        assert_eq!(d[40], 0, "list ends");
        let ns = h.identify(0, nsid);
        assert_eq!(
            &ns[104..120],
            &d[4..20],
            "Identify NGUID equals the descriptor"
        );
        ids.push(d[4..20].to_vec());
        ids.push(d[24..40].to_vec());
        let (blocks, lbads) = if nsid == 1 {
            (NS1_BLOCKS, 9)
        } else {
            (NS2_BLOCKS, 12)
        };
        assert_eq!(
            (u64_at(&ns, 0), u64_at(&ns, 8), u64_at(&ns, 16)),
            (blocks, blocks, blocks)
        );
        assert_eq!((ns[25], ns[26] & 0xf, ns[130]), (0, 0, lbads));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "every NGUID/UUID is unique");
    // The NVM command set's controller structure (no extra limits), CSI 0 only.
    assert!(h.identify(6, 0).iter().all(|&b| b == 0));
    let cid = h.next_cid();
    let csi2 = identify(cid, 6, 0).cdw(11, 2 << 24);
    assert_eq!(status(h.admin(csi2)), Status::INVALID_FIELD.with_dnr());

    // 8. I/O on queue 1: a read by RDMA WRITE, an in-capsule write, a keyed write, flush.
    let q = &mut queues[0];
    let a = q.on_command(&rw(0x02, 10, 1, 8, 7).keyed(4096).cmd(), &[], h.now);
    let Action::Io(io) = a else {
        panic!("read: {a:?}")
    };
    assert_eq!((io.cid, io.nsid, io.subsystem), (10, 1, 0));
    assert_eq!(
        io.op,
        IoOp::Read {
            offset: 4096,
            len: 4096
        }
    );
    assert!(matches!(
        io.sgl,
        Sgl::Keyed {
            len: 4096,
            invalidate: true,
            ..
        }
    ));
    let c = q.on_io_done(10, Ok(()));
    assert_eq!((c.status, c.cid, c.sqid), (Status::SUCCESS, 10, 1));

    let payload = vec![0x5a; 4096];
    let a = q.on_command(
        &rw(0x01, 11, 2, 3, 0).in_capsule(0, 4096).cmd(),
        &payload,
        h.now,
    );
    let Action::Io(io) = a else {
        panic!("write: {a:?}")
    };
    assert_eq!(
        io.op,
        IoOp::Write {
            offset: 3 * 4096,
            len: 4096
        }
    );
    assert_eq!(
        io.sgl,
        Sgl::InCapsule {
            offset: 0,
            len: 4096
        }
    );
    assert_eq!(q.on_io_done(11, Ok(())).status, Status::SUCCESS);

    let a = q.on_command(&rw(0x01, 12, 1, 0, 255).keyed(128 * 1024).cmd(), &[], h.now);
    assert!(matches!(a, Action::Io(ref io) if io.op == IoOp::Write { offset: 0, len: 131072 }));
    assert!(matches!(a, Action::Io(ref io) if !io.fua));
    assert_eq!(q.on_io_done(12, Ok(())).status, Status::SUCCESS);

    // Force Unit Access (cdw12 bit 30) is passed on for writes.
    let fua = rw(0x01, 15, 1, 64, 7).cdw(12, 7 | (1 << 30)).keyed(4096);
    let a = q.on_command(&fua.cmd(), &[], h.now);
    assert!(
        matches!(a, Action::Io(ref io) if io.fua && io.op == IoOp::Write { offset: 32768, len: 4096 })
    );
    assert_eq!(q.on_io_done(15, Ok(())).status, Status::SUCCESS);
    let a = q.on_command(&Sqe::new(0x00, 13).nsid(1).cmd(), &[], h.now);
    assert!(matches!(a, Action::Io(ref io) if io.op == IoOp::Flush && io.nsid == 1));
    assert_eq!(q.on_io_done(13, Ok(())).status, Status::SUCCESS);
    // Namespace 2 has no volatile cache: its Flush completes at once.
    assert_eq!(
        status(q.on_command(&Sqe::new(0x00, 14).nsid(2).cmd(), &[], h.now)),
        Status::SUCCESS
    );

    let st = core.stats();
    assert_eq!((st.read_cmds, st.write_cmds), (1, 3));
    assert_eq!(
        (st.bytes_read, st.bytes_written),
        (4096, 4096 + 131072 + 4096)
    );
    assert_eq!(st.controllers, 1);

    // Shutdown: CC.SHN normal -> CSTS.SHST complete.
    h.set_cc(0x0046_4001);
    assert_eq!((h.prop(false, 0x1c) >> 2) & 3, 2, "SHST complete");
    for mut q in queues {
        q.on_disconnect();
    }
    h.admin.on_disconnect();
    assert_eq!(core.stats().controllers, 0);
}

// ---------------------------------------------------------------- bad input

#[test]
fn unknown_opcodes_and_queue_mixups() {
    let core = target();
    let mut h = Host::ready(&core, SUBNQN);
    let (mut q, _) = h.io_queue(1, h.cntlid);
    let inv = Status::INVALID_OPCODE.with_dnr();
    for op in [0x80u8, 0xc1, 0x01, 0x00, 0x10, 0x7e] {
        assert_eq!(
            status(h.admin(Sqe::new(op, 5))),
            inv,
            "admin opcode {op:#x}"
        );
    }
    // Admin commands on an I/O queue.
    for op in [0x06u8, 0x18, 0x0c, 0x0a, 0x80] {
        let st = status(q.on_command(&Sqe::new(op, 6).nsid(1).keyed(4096).cmd(), &[], h.now));
        assert_eq!(st, inv, "I/O opcode {op:#x}");
    }
    // Property Get on an I/O queue, an unknown fabrics type.
    assert_eq!(
        status(q.on_command(&prop_get(7, true, 0).cmd(), &[], h.now)),
        inv
    );
    assert_eq!(status(h.admin(Sqe::fabrics(0x42, 8))), inv);
    // Write Zeroes / DSM where the namespace does not support them.
    assert_eq!(
        status(q.on_command(&rw(0x08, 9, 2, 0, 0).cmd(), &[], h.now)),
        inv
    );
    assert_eq!(
        status(q.on_command(&rw(0x09, 9, 2, 0, 0).cdw(11, 4).cmd(), &[], h.now)),
        inv
    );
    // Invalid CNS, unknown features, saveable features, unknown log pages.
    let invf = Status::INVALID_FIELD.with_dnr();
    assert_eq!(status(h.admin(identify(20, 0x10, 0))), invf);
    assert_eq!(status(h.admin(Sqe::new(0x09, 21).cdw(10, 0x06))), invf);
    assert_eq!(status(h.admin(Sqe::new(0x0a, 22).cdw(10, 0x80))), invf);
    assert_eq!(
        status(h.admin(Sqe::new(0x09, 23).cdw(10, (1 << 31) | 7))),
        Status::FEATURE_NOT_SAVEABLE.with_dnr()
    );
    assert_eq!(status(h.admin(get_log(24, 0xc0, 512, 0))), invf);
    assert_eq!(
        status(h.admin(get_log(25, 0x70, 1024, 0))),
        invf,
        "no discovery log on an NVM controller"
    );
    assert_eq!(
        status(h.admin(Sqe::new(0x09, 26).cdw(10, 7).cdw(11, 0xffff))),
        invf
    );
    // Properties: only CAP is 8 bytes, only CC is writable.
    assert_eq!(status(h.admin(prop_get(27, true, 0x14))), invf);
    assert_eq!(status(h.admin(prop_get(28, false, 0x00))), invf);
    assert_eq!(status(h.admin(prop_set(29, 0x1c, 1))), invf);
    // Identify of a namespace that does not exist.
    assert_eq!(
        status(h.admin(identify(30, 0, 9))),
        Status::INVALID_NS.with_dnr()
    );
    assert_eq!(
        status(h.admin(identify(31, 3, 0xffff_ffff))),
        Status::INVALID_NS.with_dnr()
    );
    assert_eq!(
        status(h.admin(identify(32, 2, 0xffff_fffe))),
        Status::INVALID_NS.with_dnr()
    );
    // A cid still outstanding.
    assert_eq!(h.admin(Sqe::new(0x0c, 40)), Action::Hold);
    assert_eq!(
        status(h.admin(Sqe::new(0x18, 40))),
        Status::CMDID_CONFLICT.with_dnr()
    );
    // Errors are counted.
    assert!(core.stats().errors >= 20);
}

#[test]
fn commands_before_connect_and_enable() {
    let core = target();
    let req = CmRequest {
        recfmt: 0,
        qid: 0,
        hrqsize: 32,
        hsqsize: 31,
        cntlid: 0,
    };
    let mut q = QueueCore::new(&core, &req);
    let seq = Status::CMD_SEQ_ERROR.with_dnr();
    let now = Instant::now();
    assert_eq!(
        status(q.on_command(&identify(1, 1, 0).cmd(), &[], now)),
        seq
    );
    assert_eq!(
        status(q.on_command(&prop_get(2, true, 0).cmd(), &[], now)),
        seq
    );
    assert_eq!(
        status(q.on_command(&Sqe::new(0x18, 3).cmd(), &[], now)),
        seq
    );
    let ioreq = CmRequest {
        recfmt: 0,
        qid: 1,
        hrqsize: 128,
        hsqsize: 127,
        cntlid: 0,
    };
    let mut io = QueueCore::new(&core, &ioreq);
    assert_eq!(
        status(io.on_command(&rw(0x02, 4, 1, 0, 0).keyed(512).cmd(), &[], now)),
        seq
    );
    assert_eq!(io.cntlid(), None);

    // Connected but CC.EN = 0: only fabrics commands are served.
    let (mut h, _) = Host::connect(&core, SUBNQN, HOST_A, 0);
    assert_eq!(status(h.admin(identify(5, 1, 0))), seq);
    assert_eq!(h.prop(false, 0x1c), 0);
    // A second Connect on the same queue.
    assert_eq!(status(h.admin(connect_sqe(6, 0, 31, 0))), seq);
    // An enable with wrong queue entry sizes sets CSTS.CFS, not RDY.
    h.set_cc(0x0000_0001);
    assert_eq!(h.prop(false, 0x1c), 2);
    assert_eq!(status(h.admin(identify(7, 1, 0))), seq);
}

#[test]
fn bad_sgls() {
    let core = target();
    let h = Host::ready(&core, SUBNQN);
    let (mut q, _) = h.io_queue(1, h.cntlid);
    let now = h.now;
    let mut run = |sqe: Sqe, capsule: &[u8]| status(q.on_command(&sqe.cmd(), capsule, now));
    let read = rw(0x02, 1, 1, 0, 7); // 4 KiB
    assert_eq!(
        run(read.keyed(4096).flags(0x00), &[]),
        Status::SGL_INVALID_TYPE.with_dnr(),
        "PRP"
    );
    assert_eq!(
        run(read.keyed(4096).flags(0x80), &[]),
        Status::SGL_INVALID_TYPE.with_dnr(),
        "PSDT 10"
    );
    let mut seg = read.keyed(4096);
    seg.0[39] = 0x02; // segment descriptor
    assert_eq!(run(seg, &[]), Status::SGL_INVALID_TYPE.with_dnr());
    assert_eq!(
        run(read.keyed(4095), &[]),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );
    assert_eq!(
        run(read.keyed(8192), &[]),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );
    assert_eq!(
        run(read, &[]),
        Status::SGL_INVALID_DATA_LEN.with_dnr(),
        "no data"
    );
    assert_eq!(
        run(read.in_capsule(0, 4096), &[0; 4096]),
        Status::INVALID_FIELD.with_dnr()
    );
    let write = rw(0x01, 2, 1, 0, 7);
    let full = vec![0u8; 4096];
    assert_eq!(
        run(write.in_capsule(16, 4096), &full),
        Status::SGL_INVALID_OFFSET.with_dnr()
    );
    assert_eq!(
        run(write.in_capsule(0, 4096), &full[..4000]),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );
    assert_eq!(
        run(write.in_capsule(0, 2048), &full),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );
    // Beyond the inline size even if the bytes were there.
    let big = vec![0u8; 8192];
    assert_eq!(
        run(rw(0x01, 3, 1, 0, 15).in_capsule(0, 8192), &big),
        Status::SGL_INVALID_OFFSET.with_dnr()
    );
    // Admin data commands: the SGL must cover exactly the structure.
    let mut h = h;
    assert_eq!(
        status(h.admin(Sqe::new(0x06, 4).cdw(10, 1).keyed(1024))),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );
    assert_eq!(
        status(h.admin(Sqe::new(0x06, 5).cdw(10, 1))),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );
    assert_eq!(
        status(h.admin(Sqe::new(0x06, 6).cdw(10, 1).in_capsule(0, 4096))),
        Status::INVALID_FIELD.with_dnr()
    );
    // Connect without its 1024 bytes.
    let req = CmRequest {
        recfmt: 0,
        qid: 0,
        hrqsize: 32,
        hsqsize: 31,
        cntlid: 0,
    };
    let mut fresh = QueueCore::new(&core, &req);
    let c = Sqe::fabrics(0x01, 7).cdw(11, 31);
    assert_eq!(
        status(fresh.on_command(&c.cmd(), &[], now)),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );
    assert_eq!(
        status(fresh.on_command(&c.keyed(512).cmd(), &[], now)),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );
    // Connect data in the capsule is consumed directly.
    let d = connect_data(0xffff, SUBNQN, HOST_A);
    let c = complete(fresh.on_command(&c.in_capsule(0, 1024).cmd(), &d, now));
    assert_eq!(c.status, Status::SUCCESS);
    // The SGL parser itself.
    assert_eq!(
        Sqe::new(0x02, 1).sgl_type(0x01),
        Sgl::InCapsule { offset: 0, len: 0 }
    );
    assert_eq!(
        Sqe::new(0x02, 1).sgl_type(0x5f),
        Sgl::Invalid { type_byte: 0x5f }
    );
}

#[test]
fn lba_range_mdts_and_namespace_checks() {
    let core = target();
    let h = Host::ready(&core, SUBNQN);
    let (mut q, _) = h.io_queue(1, h.cntlid);
    let now = h.now;
    let mut run = |sqe: Sqe| status(q.on_command(&sqe.cmd(), &[], now));
    let oor = Status::LBA_OUT_OF_RANGE.with_dnr();
    assert_eq!(run(rw(0x02, 1, 1, NS1_BLOCKS - 1, 1).keyed(1024)), oor);
    assert_eq!(run(rw(0x02, 2, 1, NS1_BLOCKS, 0).keyed(512)), oor);
    assert_eq!(
        run(rw(0x01, 3, 2, u64::MAX, 0).keyed(4096)),
        oor,
        "no overflow"
    );
    assert_eq!(run(rw(0x08, 4, 1, NS1_BLOCKS - 4, 7)), oor);
    // The last block is fine.
    assert!(matches!(
        q.on_command(
            &rw(0x02, 5, 1, NS1_BLOCKS - 1, 0).keyed(512).cmd(),
            &[],
            now
        ),
        Action::Io(_)
    ));
    let mut run = |sqe: Sqe| status(q.on_command(&sqe.cmd(), &[], now));
    // 2 MiB > MDTS (1 MiB), even with a matching SGL; exactly 1 MiB passes.
    assert_eq!(
        run(rw(0x02, 6, 1, 0, 4095).keyed(2 << 20)),
        Status::INVALID_FIELD.with_dnr()
    );
    assert!(matches!(
        q.on_command(&rw(0x02, 7, 1, 0, 2047).keyed(1 << 20).cmd(), &[], now),
        Action::Io(_)
    ));
    let mut run = |sqe: Sqe| status(q.on_command(&sqe.cmd(), &[], now));
    // Unknown namespaces.
    assert_eq!(
        run(rw(0x02, 8, 3, 0, 0).keyed(512)),
        Status::INVALID_NS.with_dnr()
    );
    assert_eq!(
        run(rw(0x02, 9, 0, 0, 0).keyed(512)),
        Status::INVALID_NS.with_dnr()
    );
    // Flush of every namespace goes to the backend once (namespace 1 caches).
    let a = q.on_command(&Sqe::new(0x00, 10).nsid(0xffff_ffff).cmd(), &[], now);
    assert!(matches!(a, Action::Io(ref io) if io.op == IoOp::Flush && io.nsid == 0xffff_ffff));
    // Write Zeroes has no MDTS limit.
    let a = q.on_command(&rw(0x08, 11, 1, 16, 0xffff).cmd(), &[], now);
    assert!(
        matches!(a, Action::Io(ref io) if io.op == IoOp::WriteZeroes { offset: 8192, len: 65536 * 512 })
    );
}

#[test]
fn dsm_deallocate_and_backend_errors() {
    let core = target();
    let h = Host::ready(&core, SUBNQN);
    let (mut q, _) = h.io_queue(1, h.cntlid);
    let now = h.now;
    let range = |slba: u64, nlb: u32| {
        let mut r = vec![0u8; 16];
        r[4..8].copy_from_slice(&nlb.to_le_bytes());
        r[8..16].copy_from_slice(&slba.to_le_bytes());
        r
    };
    // Two ranges by RDMA READ.
    let dsm = rw(0x09, 1, 1, 0, 0).cdw(10, 1).cdw(11, 1 << 2);
    assert_eq!(
        q.on_command(&dsm.keyed(32).cmd(), &[], now),
        Action::FetchData { cid: 1, len: 32 }
    );
    let list = [range(8, 8), range(100, 1)].concat();
    let Action::Io(io) = q.on_data(1, &list, now) else {
        panic!("deallocate")
    };
    assert_eq!(
        io.op,
        IoOp::Deallocate {
            ranges: vec![(4096, 4096), (51200, 512)]
        }
    );
    assert_eq!(q.on_io_done(1, Ok(())).status, Status::SUCCESS);
    // In-capsule ranges; one past the end.
    let bad = [range(0, 1), range(NS1_BLOCKS, 1)].concat();
    assert_eq!(
        status(q.on_command(&dsm.in_capsule(0, 32).cmd(), &bad, now)),
        Status::LBA_OUT_OF_RANGE.with_dnr()
    );
    // Without AD nothing is done; a wrong length is refused.
    assert_eq!(
        status(q.on_command(&rw(0x09, 2, 1, 0, 0).cdw(11, 1).keyed(16).cmd(), &[], now)),
        Status::SUCCESS
    );
    assert_eq!(
        status(q.on_command(&dsm.keyed(16).cmd(), &[], now)),
        Status::SGL_INVALID_DATA_LEN.with_dnr()
    );

    // errno -> status by operation.
    let mut io_err = |sqe: Sqe, errno: i32| {
        let cid = sqe.cmd().cid();
        assert!(matches!(q.on_command(&sqe.cmd(), &[], now), Action::Io(_)));
        q.on_io_done(cid, Err(IoFailure::Errno(errno)))
    };
    let c = io_err(rw(0x02, 10, 1, 0, 0).keyed(512), libc::EIO);
    assert_eq!((c.status, c.cid), (Status::UNRECOVERED_READ.with_dnr(), 10));
    assert_eq!(
        io_err(rw(0x01, 11, 1, 0, 0).keyed(512), libc::EIO).status,
        Status::WRITE_FAULT.with_dnr()
    );
    assert_eq!(
        io_err(rw(0x01, 12, 1, 0, 0).keyed(512), libc::ENOSPC).status,
        Status::CAP_EXCEEDED.with_dnr()
    );
    assert_eq!(
        io_err(Sqe::new(0x00, 13).nsid(1), libc::EPERM).status,
        Status::INTERNAL.with_dnr()
    );
    // A passthrough device's own status goes to the host as it was (here Deallocated or
    // Unwritten Logical Block, SCT 2 SC 0x87, DNR).
    assert!(matches!(
        q.on_command(&rw(0x02, 14, 1, 0, 0).keyed(512).cmd(), &[], now),
        Action::Io(_)
    ));
    let dulb = Status::from_device((1 << 14) | (2 << 8) | 0x87);
    assert_eq!(q.on_io_done(14, Err(IoFailure::Device(dulb))).status, dulb);
    // A completion for a command the core never issued.
    assert_eq!(q.on_io_done(99, Ok(())).status, Status::INTERNAL.with_dnr());
    assert_eq!(core.stats().read_cmds, 0);
    // Data for a command that waits for none is refused without losing that command.
    assert!(matches!(
        q.on_command(&rw(0x02, 20, 1, 0, 0).keyed(512).cmd(), &[], now),
        Action::Io(_)
    ));
    assert_eq!(
        status(q.on_data(20, &[0; 512], now)),
        Status::INTERNAL.with_dnr()
    );
    assert_eq!(
        status(q.on_data(21, &[0; 16], now)),
        Status::INTERNAL.with_dnr()
    );
    assert_eq!(q.on_io_done(20, Ok(())).status, Status::SUCCESS);
    assert_eq!(core.stats().read_cmds, 1);
    assert_eq!(q.outstanding(), 0);
}
