//! Test support: a byte-exact SQE builder, the fixture target (two subsystems, two
//! namespaces with different block sizes and capabilities) and a simulated host.

#![allow(dead_code)]

use std::time::Instant;

use peerpipe::nvmf::{
    Action, CmRequest, Command, Completion, NamespaceConfig, NamespaceInfo, QueueCore, Sgl, Status,
    SubsystemConfig, TargetConfig, TargetCore,
};

pub const SUBNQN: &str = "nqn.2026-11.io.peerpipe:test";
pub const RESTRICTED: &str = "nqn.2026-11.io.peerpipe:restricted";
pub const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000000a";
pub const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000000b";
pub const HOSTID: [u8; 16] = [0xa5; 16];
/// Namespace 1: 512-byte blocks, 1 GiB, volatile cache, deallocate and write zeroes.
pub const NS1_BLOCKS: u64 = 1 << 21;
/// Namespace 2: 4096-byte blocks, 4 MiB, write-through, no optional commands.
pub const NS2_BLOCKS: u64 = 1024;

// ---------------------------------------------------------------- SQE builder

/// A 64-byte SQE under construction, laid out exactly as the Linux host writes it.
#[derive(Clone, Copy)]
pub struct Sqe(pub [u8; 64]);

impl Sqe {
    /// Opcode and cid, PSDT 01b (SGL) and a "no data" keyed descriptor (type 0x40, len 0).
    pub fn new(opcode: u8, cid: u16) -> Sqe {
        let mut b = [0u8; 64];
        b[0] = opcode;
        b[1] = 0x40;
        b[2..4].copy_from_slice(&cid.to_le_bytes());
        b[39] = 0x40;
        Sqe(b)
    }
    pub fn fabrics(fctype: u8, cid: u16) -> Sqe {
        let mut s = Sqe::new(0x7f, cid);
        s.0[4] = fctype;
        s
    }
    pub fn nsid(mut self, nsid: u32) -> Sqe {
        self.0[4..8].copy_from_slice(&nsid.to_le_bytes());
        self
    }
    pub fn cdw(mut self, n: usize, v: u32) -> Sqe {
        self.0[n * 4..n * 4 + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    /// Keyed data block with invalidate (0x4F), as nvme-rdma sends with fast registration.
    pub fn keyed(mut self, len: u32) -> Sqe {
        self.0[24..32].copy_from_slice(&0x7f00_1234_5000u64.to_le_bytes());
        self.0[32..35].copy_from_slice(&len.to_le_bytes()[..3]);
        self.0[35..39].copy_from_slice(&0x0042_1337u32.to_le_bytes());
        self.0[39] = 0x4f;
        self
    }
    /// Offset data block (in-capsule data).
    pub fn in_capsule(mut self, offset: u64, len: u32) -> Sqe {
        self.0[24..32].copy_from_slice(&offset.to_le_bytes());
        self.0[32..36].copy_from_slice(&len.to_le_bytes());
        self.0[36..39].fill(0);
        self.0[39] = 0x01;
        self
    }
    pub fn sgl_type(mut self, t: u8) -> Sgl {
        self.0[39] = t;
        self.cmd().sgl()
    }
    pub fn flags(mut self, f: u8) -> Sqe {
        self.0[1] = f;
        self
    }
    pub fn cmd(&self) -> Command {
        Command::parse(&self.0).expect("64 bytes")
    }
}

pub fn connect_sqe(cid: u16, qid: u16, sqsize: u16, kato_ms: u32) -> Sqe {
    Sqe::fabrics(0x01, cid)
        .cdw(10, u32::from(qid) << 16)
        .cdw(11, u32::from(sqsize))
        .cdw(12, kato_ms)
        .keyed(1024)
}

pub fn connect_data(cntlid: u16, subnqn: &str, hostnqn: &str) -> Vec<u8> {
    let mut d = vec![0u8; 1024];
    d[0..16].copy_from_slice(&HOSTID);
    d[16..18].copy_from_slice(&cntlid.to_le_bytes());
    d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
    d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
    d
}

pub fn prop_get(cid: u16, size8: bool, offset: u32) -> Sqe {
    Sqe::fabrics(0x04, cid)
        .cdw(10, u32::from(size8))
        .cdw(11, offset)
}

pub fn prop_set(cid: u16, offset: u32, value: u32) -> Sqe {
    Sqe::fabrics(0x00, cid).cdw(11, offset).cdw(12, value)
}

pub fn identify(cid: u16, cns: u8, nsid: u32) -> Sqe {
    Sqe::new(0x06, cid)
        .nsid(nsid)
        .cdw(10, u32::from(cns))
        .keyed(4096)
}

pub fn get_log(cid: u16, lid: u8, len: u32, offset: u64) -> Sqe {
    let numd = len / 4 - 1;
    Sqe::new(0x02, cid)
        .cdw(10, u32::from(lid) | ((numd & 0xffff) << 16))
        .cdw(11, numd >> 16)
        .cdw(12, offset as u32)
        .cdw(13, (offset >> 32) as u32)
        .keyed(len)
}

pub fn rw(opcode: u8, cid: u16, nsid: u32, slba: u64, nlb0: u16) -> Sqe {
    Sqe::new(opcode, cid)
        .nsid(nsid)
        .cdw(10, slba as u32)
        .cdw(11, (slba >> 32) as u32)
        .cdw(12, u32::from(nlb0))
}

// ---------------------------------------------------------------- target and host

pub fn config() -> TargetConfig {
    let ns = |nsid: u32| NamespaceConfig {
        nsid,
        path: format!("/dev/fake{nsid}").into(),
        uuid: None,
        nguid: None,
    };
    let mut cfg = TargetConfig::new("10.77.0.2:4420".parse().unwrap());
    cfg.subsystems = vec![
        SubsystemConfig {
            nqn: SUBNQN.into(),
            namespaces: vec![ns(1), ns(2)],
            allowed_hosts: vec![],
            serial: "PP0001".into(),
            model: "peerpipe test".into(),
        },
        SubsystemConfig {
            nqn: RESTRICTED.into(),
            namespaces: vec![ns(1)],
            allowed_hosts: vec![HOST_B.into()],
            serial: "PP0002".into(),
            model: "peerpipe restricted".into(),
        },
    ];
    cfg
}

pub fn infos() -> Vec<(String, NamespaceInfo)> {
    let ns1 = NamespaceInfo {
        nsid: 1,
        lba_size: 512,
        blocks: NS1_BLOCKS,
        volatile_write_cache: true,
        supports_deallocate: true,
        supports_write_zeroes: true,
    };
    let ns2 = NamespaceInfo {
        nsid: 2,
        lba_size: 4096,
        blocks: NS2_BLOCKS,
        volatile_write_cache: false,
        supports_deallocate: false,
        supports_write_zeroes: false,
    };
    vec![
        (SUBNQN.into(), ns1),
        (SUBNQN.into(), ns2),
        (RESTRICTED.into(), ns1),
    ]
}

pub fn target() -> TargetCore {
    TargetCore::new(&config(), infos()).expect("valid config")
}

pub fn complete(a: Action) -> Completion {
    match a {
        Action::Complete(c) => c,
        other => panic!("expected a completion, got {other:?}"),
    }
}

pub fn data(a: Action) -> (Vec<u8>, Completion) {
    match a {
        Action::ReturnData { data, completion } => (data, completion),
        other => panic!("expected data, got {other:?}"),
    }
}

pub fn status(a: Action) -> Status {
    complete(a).status
}

pub fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
pub fn c_str(b: &[u8]) -> &str {
    std::str::from_utf8(&b[..b.iter().position(|&x| x == 0).unwrap_or(b.len())]).unwrap()
}

/// One host: an admin queue and the clock.
pub struct Host {
    pub core: TargetCore,
    pub admin: QueueCore,
    pub now: Instant,
    pub cntlid: u16,
    pub cid: u16,
}

impl Host {
    /// rdma_cm request, admit, Connect (data by "RDMA READ").
    pub fn connect(
        core: &TargetCore,
        subnqn: &str,
        hostnqn: &str,
        kato_ms: u32,
    ) -> (Host, Completion) {
        let req = CmRequest::parse(
            &CmRequest {
                recfmt: 0,
                qid: 0,
                hrqsize: 32,
                hsqsize: 31,
                cntlid: 0,
            }
            .encode(),
        )
        .expect("admin private data");
        core.admit(&req).expect("admin queue admitted");
        let now = Instant::now();
        let mut admin = QueueCore::new(core, &req);
        let fetch = admin.on_command(&connect_sqe(1, 0, 31, kato_ms).cmd(), &[], now);
        assert_eq!(fetch, Action::FetchData { cid: 1, len: 1024 });
        let c = complete(admin.on_data(1, &connect_data(0xffff, subnqn, hostnqn), now));
        let host = Host {
            core: core.clone(),
            admin,
            now,
            cntlid: c.result as u16,
            cid: 1,
        };
        (host, c)
    }

    /// Connect and enable, as nvme_rdma_setup_ctrl does before Identify.
    pub fn ready(core: &TargetCore, subnqn: &str) -> Host {
        let (mut h, c) = Host::connect(core, subnqn, HOST_A, 5000);
        assert_eq!(c.status, Status::SUCCESS);
        h.set_cc(0x0046_0000);
        h.set_cc(0x0046_0001);
        assert_eq!(h.prop(false, 0x1c) & 1, 1, "CSTS.RDY");
        h
    }

    pub fn next_cid(&mut self) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        self.cid
    }

    pub fn admin(&mut self, sqe: Sqe) -> Action {
        self.admin.on_command(&sqe.cmd(), &[], self.now)
    }

    pub fn prop(&mut self, size8: bool, offset: u32) -> u64 {
        let cid = self.next_cid();
        let c = complete(self.admin(prop_get(cid, size8, offset)));
        assert_eq!(c.status, Status::SUCCESS, "property {offset:#x}");
        c.result
    }

    pub fn set_cc(&mut self, cc: u32) {
        let cid = self.next_cid();
        assert_eq!(status(self.admin(prop_set(cid, 0x14, cc))), Status::SUCCESS);
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> Vec<u8> {
        let cid = self.next_cid();
        let (d, c) = data(self.admin(identify(cid, cns, nsid)));
        assert_eq!((c.status, c.cid, d.len()), (Status::SUCCESS, cid, 4096));
        d
    }

    pub fn set_queues(&mut self, n: u16) -> u64 {
        let cid = self.next_cid();
        let nq = u32::from(n - 1) | (u32::from(n - 1) << 16);
        let c = complete(self.admin(Sqe::new(0x09, cid).cdw(10, 7).cdw(11, nq)));
        assert_eq!(c.status, Status::SUCCESS);
        c.result
    }

    /// An I/O queue: rdma_cm request with the 6.12 cntlid, then Connect.
    pub fn io_queue(&self, qid: u16, data_cntlid: u16) -> (QueueCore, Completion) {
        let req = CmRequest {
            recfmt: 0,
            qid,
            hrqsize: 128,
            hsqsize: 127,
            cntlid: self.cntlid,
        };
        let req = CmRequest::parse(&req.encode()).expect("io private data");
        let mut q = QueueCore::new(&self.core, &req);
        let fetch = q.on_command(&connect_sqe(1, qid, 127, 0).cmd(), &[], self.now);
        assert_eq!(fetch, Action::FetchData { cid: 1, len: 1024 });
        let c = complete(q.on_data(1, &connect_data(data_cntlid, SUBNQN, HOST_A), self.now));
        (q, c)
    }
}
