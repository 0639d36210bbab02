//! Randomized input: arbitrary SQEs (biased towards real opcodes and the host's SGL
//! types), capsules, fetched data and backend results never panic the core, and every
//! answer is well formed.

use std::time::{Duration, Instant};

use peerpipe::nvmf::{
    Action, CmRequest, Command, Completion, IoFailure, IoOp, QueueCore, Sgl, Status, DISCOVERY_NQN,
};

use super::support::*;

// ---------------------------------------------------------------- randomized

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A random SQE, biased towards meaningful opcodes, PSDT 01b and the host's SGL types.
fn random_sqe(r: &mut Rng) -> [u8; 64] {
    let mut b: [u8; 64] = r.bytes(64).try_into().unwrap();
    const OPS: [u8; 12] = [
        0x7f, 0x02, 0x06, 0x09, 0x0a, 0x0c, 0x18, 0x00, 0x01, 0x08, 0x09, 0x02,
    ];
    if r.below(8) != 0 {
        b[0] = OPS[r.below(OPS.len() as u64) as usize];
    }
    if r.below(4) != 0 {
        b[1] = 0x40;
    }
    if b[0] == 0x7f {
        if r.below(4) != 0 {
            b[4] = [0x00, 0x01, 0x04][r.below(3) as usize];
            b[5..8].fill(0);
        }
    } else if r.below(4) != 0 {
        let nsid = [0u32, 1, 2, 0xffff_ffff][r.below(4) as usize];
        b[4..8].copy_from_slice(&nsid.to_le_bytes());
    }
    if r.below(4) != 0 {
        b[39] = [0x40, 0x4f, 0x01][r.below(3) as usize];
    }
    if r.below(2) == 0 {
        b[40] = r.below(5) as u8; // CNS / FID / LID / property size
        b[41..44].fill(0); // small cdw10 (LID/NUMD, SLBA)
        b[44..48].fill(0);
        b[49..52].fill(0); // small NLB / KATO
    }
    if r.below(2) == 0 {
        // A length the command could really ask for, with matching NUMD and NLB.
        let len: u32 = [4096, 1024, 512, 64, 32, 16][r.below(6) as usize];
        b[32..35].copy_from_slice(&len.to_le_bytes()[..3]);
        if b[39] == 0x01 {
            b[32..36].copy_from_slice(&len.to_le_bytes());
            b[24..32].fill(0);
        }
        if r.below(2) == 0 {
            b[40] = r.below(5) as u8; // CNS / LID
            b[41] = 0;
            b[42..44].copy_from_slice(&((len / 4 - 1) as u16).to_le_bytes());
            b[44..56].fill(0); // NUMDU, LPOL, LPOU
        } else {
            let nlb0 = (len / 512).max(1) - 1;
            b[48..50].copy_from_slice(&(nlb0 as u16).to_le_bytes());
        }
    }
    match r.below(16) {
        // A DSM deallocate whose range count matches a keyed or in-capsule list.
        0 => {
            let ranges = 1 + r.below(4) as u32;
            b[0] = 0x09;
            b[1] = 0x40;
            b[40..44].copy_from_slice(&(ranges - 1).to_le_bytes());
            b[44..48].copy_from_slice(&4u32.to_le_bytes());
            b[32..36].copy_from_slice(&(ranges * 16).to_le_bytes());
            b[35] = 0;
        }
        // A Connect for the spare queue (qid 2) with a plausible sqsize.
        1 => {
            b[0] = 0x7f;
            b[1] = 0x40;
            b[4] = 0x01;
            b[40..44].copy_from_slice(&(2u32 << 16).to_le_bytes());
            b[44..48].copy_from_slice(&(1 + r.below(127) as u32).to_le_bytes());
            b[32..35].copy_from_slice(&1024u32.to_le_bytes()[..3]);
        }
        _ => {}
    }
    b
}

/// Counts of what the core answered: success, error, data, fetch, I/O, hold.
type Seen = [u64; 6];

/// Checks one action for well-formedness and drives it to its end.
fn check_action(
    q: &mut QueueCore,
    r: &mut Rng,
    cmd: &Command,
    a: Action,
    now: Instant,
    seen: &mut Seen,
) {
    let well_formed = |c: &Completion, q: &QueueCore| {
        assert_eq!(c.cid, cmd.cid());
        assert_eq!(c.sqid, q.qid());
        assert_eq!(
            Completion::decode(&c.encode()),
            *c,
            "CQE round trip (phase 0)"
        );
        assert_eq!(c.status.0 & 0x8000, 0);
    };
    match a {
        Action::Complete(c) => {
            well_formed(&c, q);
            seen[usize::from(!c.status.is_success())] += 1;
        }
        Action::ReturnData { data, completion } => {
            seen[2] += 1;
            well_formed(&completion, q);
            assert_eq!(completion.status, Status::SUCCESS);
            assert_eq!(
                data.len() as u32,
                cmd.sgl().len(),
                "data fits the host buffer exactly"
            );
            assert!(matches!(cmd.sgl(), Sgl::Keyed { .. }));
        }
        Action::FetchData { cid, len } => {
            seen[3] += 1;
            assert_eq!(cid, cmd.cid());
            assert_eq!(len, cmd.sgl().len());
            let mut bytes = r.bytes(len as usize);
            if r.below(2) == 0 {
                bytes.truncate(r.below(u64::from(len) + 1) as usize);
            }
            let next = q.on_data(cid, &bytes, now);
            check_action(q, r, cmd, next, now, seen);
        }
        Action::Io(io) => {
            seen[4] += 1;
            assert_eq!(io.cid, cmd.cid());
            let (ns_bytes, lba) = match io.nsid {
                1 => (NS1_BLOCKS * 512, 512),
                2 => (NS2_BLOCKS * 4096, 4096),
                0xffff_ffff => (0, 1),
                other => panic!("I/O on unknown namespace {other}"),
            };
            let inside =
                |off: u64, len: u64| off % lba == 0 && len % lba == 0 && off + len <= ns_bytes;
            match &io.op {
                IoOp::Read { offset, len } | IoOp::Write { offset, len } => {
                    assert!(inside(*offset, u64::from(*len)) && *len <= 1 << 20);
                    assert_eq!(io.sgl.len(), *len);
                }
                IoOp::WriteZeroes { offset, len } => assert!(inside(*offset, *len)),
                IoOp::Deallocate { ranges } => assert!(ranges.iter().all(|&(o, l)| inside(o, l))),
                IoOp::Flush => {}
            }
            let res = if r.below(3) == 0 {
                Err(match r.below(4) {
                    // A passthrough device's own status (Unrecovered Read Error, DNR).
                    3 => IoFailure::Device(Status::from_device((1 << 14) | (2 << 8) | 0x81)),
                    i => IoFailure::Errno([libc::EIO, libc::ENOSPC, libc::EINVAL][i as usize]),
                })
            } else {
                Ok(())
            };
            let c = q.on_io_done(io.cid, res);
            well_formed(&c, q);
        }
        Action::Hold => {
            seen[5] += 1;
            assert_eq!(cmd.opcode(), 0x0c, "only Async Event Requests are held");
        }
    }
}

#[test]
fn random_sqes_never_panic_and_always_complete_well_formed() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let core = target();
    let mut seen = Seen::default();
    for round in 0..40 {
        let h = Host::ready(
            &core,
            if round % 5 == 0 {
                DISCOVERY_NQN
            } else {
                SUBNQN
            },
        );
        let (io, _) = h.io_queue(1, h.cntlid);
        let req = CmRequest {
            recfmt: 0,
            qid: 2,
            hrqsize: 128,
            hsqsize: 127,
            cntlid: 0,
        };
        let mut queues = vec![h.admin, io, QueueCore::new(&core, &req)];
        for _ in 0..500 {
            let k = r.below(3) as usize;
            let cmd = Command::from_bytes(random_sqe(&mut r));
            let capsule_len = r.below(6000) as usize;
            let capsule = r.bytes(capsule_len);
            let now = h.now + Duration::from_millis(r.below(10_000));
            let a = queues[k].on_command(&cmd, &capsule, now);
            check_action(&mut queues[k], &mut r, &cmd, a, now, &mut seen);
        }
        for mut q in queues {
            q.on_disconnect();
        }
        let _ = core.expired(Instant::now());
    }
    // Arbitrary rdma_cm private data and short capsules.
    for _ in 0..2000 {
        let n = r.below(40) as usize;
        let _ = CmRequest::parse(&r.bytes(n));
        let n = r.below(70) as usize;
        let _ = Command::parse(&r.bytes(n));
    }
    // The run reached every kind of answer, not only rejections.
    assert!(seen.iter().all(|&n| n > 0), "answers seen: {seen:?}");
    assert_eq!(
        core.stats().controllers,
        0,
        "every controller freed with its admin queue"
    );
}
