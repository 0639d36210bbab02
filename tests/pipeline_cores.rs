//! Host tests of the pipeline cores (`PrimaryCore`, `ReplicaCore`: the I/O-free state
//! machines under `src/pipeline/core/`), the primary and its replicas wired together by a
//! simulated transport: messages, RDMA writes checked against the advertised windows, drives
//! as byte vectors, and completions delivered in random order. Failure injection: a replica
//! dying mid-run, malformed messages, write errors, corrupted drives.

use std::collections::{HashMap, VecDeque};

use peerpipe::pipeline::{
    crc32c, ByteRange, Failure, Layout, PrimaryAction, PrimaryCore, ReplicaAction, ReplicaCore,
};
use peerpipe::protocol::{Message, Status, MSG_LEN};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Replica {
    core: ReplicaCore,
    drive: Vec<u8>,
    slots: Vec<Vec<u8>>,
    /// Live windows: slot -> (rkey, granted len).
    windows: HashMap<usize, (u32, u32)>,
    next_rkey: u32,
    inbox: VecDeque<Vec<u8>>,
    completions: VecDeque<ReplicaAction>,
    alive: bool,
    /// Fail the drive write of this block.
    fail_write: Option<u64>,
    /// Flip a byte after writing this block (silent corruption for --verify to find).
    corrupt: Option<u64>,
    writes_outside: u64,
    aborted: bool,
}

enum PEvent {
    ReadDone(u64),
    WriteDone(usize, u64, Result<(), Failure>),
}

struct Sim {
    rng: Rng,
    src: Vec<u8>,
    primary: PrimaryCore,
    bufs: HashMap<u64, Vec<u8>>,
    pevents: VecDeque<PEvent>,
    pinbox: VecDeque<(usize, Vec<u8>)>,
    reps: Vec<Replica>,
    linked: Vec<bool>,
    /// Kill replica (index) after it has acked this many blocks.
    kill: Option<(usize, u64)>,
    /// Inject these raw bytes from replica (index) after its first ack.
    inject: Option<(usize, Vec<u8>)>,
    acks: Vec<u64>,
    max_bufs: usize,
}

const SLOT: usize = 1 << 20;

impl Sim {
    fn new(layout: Layout, replicas: usize, window: u32, verify: bool, seed: u64) -> Sim {
        let mut rng = Rng(seed | 1);
        let src: Vec<u8> = (0..layout.range().end + 4096)
            .map(|_| rng.next() as u8)
            .collect();
        let cap = layout.range().end + 8192;
        Sim {
            rng,
            src,
            primary: PrimaryCore::new(layout, replicas, window, verify).unwrap(),
            bufs: HashMap::new(),
            pevents: VecDeque::new(),
            pinbox: VecDeque::new(),
            reps: (0..replicas)
                .map(|_| Replica {
                    core: ReplicaCore::new(cap, 3),
                    drive: vec![0; cap as usize],
                    slots: vec![vec![0; SLOT]; 3],
                    windows: HashMap::new(),
                    next_rkey: 0x100,
                    inbox: VecDeque::new(),
                    completions: VecDeque::new(),
                    alive: true,
                    fail_write: None,
                    corrupt: None,
                    writes_outside: 0,
                    aborted: false,
                })
                .collect(),
            linked: vec![true; replicas],
            kill: None,
            inject: None,
            acks: vec![0; replicas],
            max_bufs: 0,
        }
    }

    fn primary_do(&mut self, actions: Vec<PrimaryAction>) {
        for a in actions {
            match a {
                PrimaryAction::Send { replica, msg } => {
                    if self.linked[replica] && self.reps[replica].alive {
                        self.reps[replica].inbox.push_back(msg.encode().to_vec());
                    }
                }
                PrimaryAction::Read { seq, offset, len } => {
                    let o = offset as usize;
                    // Simulated DMA from the source drive.
                    assert!(self
                        .bufs
                        .insert(seq, self.src[o..o + len as usize].to_vec())
                        .is_none());
                    self.max_bufs = self.max_bufs.max(self.bufs.len());
                    self.pevents.push_back(PEvent::ReadDone(seq));
                }
                PrimaryAction::Write {
                    replica,
                    seq,
                    remote,
                } => {
                    let data = self.bufs.get(&seq).expect("write from a released buffer");
                    let rep = &mut self.reps[replica];
                    let res = if !rep.alive || !self.linked[replica] {
                        Err(Failure::Lower("transport retry exceeded".into()))
                    } else {
                        let slot = (remote.addr as usize) / SLOT;
                        match rep.windows.get(&slot) {
                            Some(&(rkey, len))
                                if rkey == remote.rkey
                                    && data.len() as u32 <= len
                                    && remote.addr as usize % SLOT == 0 =>
                            {
                                rep.slots[slot][..data.len()].copy_from_slice(data);
                                Ok(())
                            }
                            _ => Err(Failure::Lower("remote access error".into())),
                        }
                    };
                    self.pevents.push_back(PEvent::WriteDone(replica, seq, res));
                }
                PrimaryAction::Release { seq } => {
                    assert!(self.bufs.remove(&seq).is_some(), "double release {seq}");
                }
                PrimaryAction::Disconnect { replica } => self.linked[replica] = false,
            }
        }
    }

    fn replica_do(&mut self, r: usize, actions: Vec<ReplicaAction>) {
        for a in actions {
            let rep = &mut self.reps[r];
            match a {
                ReplicaAction::Send(m) => {
                    if self.linked[r] {
                        self.pinbox.push_back((r, m.encode().to_vec()));
                    }
                }
                ReplicaAction::Advertise { slot, seq, len } => {
                    rep.next_rkey += 1;
                    rep.windows.insert(slot, (rep.next_rkey, len));
                    if self.linked[r] {
                        let m = Message::BufferReady {
                            seq,
                            addr: (slot * SLOT) as u64,
                            rkey: rep.next_rkey,
                            len,
                        };
                        self.pinbox.push_back((r, m.encode().to_vec()));
                    }
                }
                a @ (ReplicaAction::Write { .. } | ReplicaAction::ReadBack { .. }) => {
                    if let ReplicaAction::Write { slot, .. } = a {
                        // Revoke the window before the drive write.
                        assert!(rep.windows.remove(&slot).is_some());
                    }
                    rep.completions.push_back(a);
                }
            }
        }
    }

    fn replica_complete(&mut self, r: usize) {
        let a = self.reps[r].completions.pop_front().unwrap();
        let mut out = Vec::new();
        let rep = &mut self.reps[r];
        match a {
            ReplicaAction::Write {
                slot,
                seq,
                offset,
                len,
            } => {
                let (o, l) = (offset as usize, len as usize);
                let layout = *rep.core.layout().unwrap();
                if offset < layout.offset() || offset + len as u64 > layout.range().end {
                    rep.writes_outside += 1;
                }
                let status = if rep.fail_write == Some(seq) {
                    Status::Nvme(0x0281)
                } else {
                    rep.drive[o..o + l].copy_from_slice(&rep.slots[slot][..l]);
                    if rep.corrupt == Some(seq) {
                        rep.drive[o + l / 2] ^= 0x40;
                    }
                    Status::Ok
                };
                rep.core.on_write_done(seq, status, &mut out).unwrap();
                self.acks[r] += 1;
            }
            ReplicaAction::ReadBack { seq, offset, len } => {
                let (o, l) = (offset as usize, len as usize);
                let crc = crc32c(&rep.drive[o..o + l]);
                rep.core
                    .on_readback_done(seq, len, crc, Status::Ok, &mut out);
            }
            _ => unreachable!(),
        }
        self.replica_do(r, out);
        if let Some((k, n)) = self.kill {
            if k == r && self.acks[r] >= n && self.reps[r].alive {
                self.reps[r].alive = false;
                self.reps[r].inbox.clear();
                self.reps[r].completions.clear();
                self.pinbox.retain(|(from, _)| *from != r);
                let mut out = Vec::new();
                self.primary
                    .on_replica_lost(r, Failure::Lower("disconnected".into()), &mut out);
                self.primary_do(out);
            }
        }
        if let Some((k, _)) = &self.inject {
            if *k == r && self.acks[r] >= 1 {
                let (k, bytes) = self.inject.take().unwrap();
                self.pinbox.push_back((k, bytes));
            }
        }
    }

    /// `PrimaryCore::awaits` names exactly the replicas that owe an answer: one with a drive
    /// write or read-back in progress is awaited, and one awaited has something under way
    /// that will answer (a message to read, a drive operation, a message to the primary).
    fn check_awaits(&self) {
        for (r, rep) in self.reps.iter().enumerate() {
            if !rep.alive || !self.linked[r] || !self.primary.is_alive(r) {
                continue;
            }
            let awaited = self.primary.awaits(r);
            if !rep.completions.is_empty() {
                assert!(
                    awaited,
                    "replica {r} is writing or reading back, yet not awaited"
                );
            }
            if awaited {
                let under_way = !rep.inbox.is_empty()
                    || !rep.completions.is_empty()
                    || self.pinbox.iter().any(|(from, _)| *from == r);
                assert!(under_way, "replica {r} is awaited with nothing under way");
            }
        }
    }

    /// Runs until nothing is left to do; returns steps taken.
    fn run(&mut self) -> usize {
        let mut out = Vec::new();
        self.primary.start(&mut out);
        self.primary_do(out);
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 1_000_000, "simulation does not terminate");
            self.check_awaits();
            // Pick a random queue with work.
            let mut choices = Vec::new();
            if !self.pevents.is_empty() {
                choices.push(0usize);
            }
            if !self.pinbox.is_empty() {
                choices.push(1);
            }
            for r in 0..self.reps.len() {
                if self.reps[r].alive && !self.reps[r].inbox.is_empty() {
                    choices.push(2 + 2 * r);
                }
                if self.reps[r].alive && !self.reps[r].completions.is_empty() {
                    choices.push(3 + 2 * r);
                }
            }
            if choices.is_empty() {
                return steps;
            }
            let c = choices[self.rng.below(choices.len())];
            let mut out = Vec::new();
            match c {
                0 => {
                    // Completions may come back in any order.
                    let i = self.rng.below(self.pevents.len());
                    match self.pevents.remove(i).unwrap() {
                        PEvent::ReadDone(seq) => {
                            let crc = crc32c(&self.bufs[&seq]);
                            self.primary.on_read_done(seq, Ok(crc), &mut out);
                        }
                        PEvent::WriteDone(r, seq, res) => {
                            self.primary.on_write_done(r, seq, res, &mut out)
                        }
                    }
                    self.primary_do(out);
                }
                1 => {
                    let (r, bytes) = self.pinbox.pop_front().unwrap();
                    self.primary.on_message(r, &bytes, &mut out);
                    self.primary_do(out);
                }
                c if c % 2 == 0 => {
                    let r = (c - 2) / 2;
                    let bytes = self.reps[r].inbox.pop_front().unwrap();
                    let mut rout = Vec::new();
                    match self.reps[r].core.on_message(&bytes, &mut rout) {
                        Ok(()) => self.replica_do(r, rout),
                        Err(e) => {
                            self.reps[r].aborted = true;
                            self.reps[r].alive = false;
                            let _ = e;
                        }
                    }
                }
                c => {
                    let r = (c - 3) / 2;
                    self.replica_complete(r);
                }
            }
        }
    }

    fn block_ok_on(&self, r: usize, range: ByteRange) -> bool {
        let (s, e) = (range.start as usize, range.end as usize);
        self.reps[r].drive[s..e] == self.src[s..e]
    }
}

fn layout_short_tail() -> Layout {
    // 4 KiB LBAs, 16 KiB blocks, starts at 8 KiB, 12 blocks + a 4 KiB tail.
    Layout::new(8192, 12 * 16384 + 4096, 16384, 4096, 1 << 30).unwrap()
}

#[test]
fn one_replica_with_verify_succeeds_and_copies_exact_bytes() {
    for seed in 1..20 {
        let l = layout_short_tail();
        let mut sim = Sim::new(l, 1, 4, true, seed);
        sim.run();
        assert!(sim.primary.is_finished());
        let o = sim.primary.outcome();
        assert!(o.success, "seed {seed}: {o:?}");
        assert!(o.unreplicated.is_empty());
        assert_eq!(o.replicated_bytes, l.len());
        assert_eq!(o.replicated_blocks, l.blocks());
        assert_eq!(o.verified_blocks, l.blocks());
        assert!(sim.block_ok_on(0, l.range()));
        // Nothing outside the range was written.
        assert!(sim.reps[0].drive[..8192].iter().all(|&b| b == 0));
        let end = l.range().end as usize;
        assert!(sim.reps[0].drive[end..].iter().all(|&b| b == 0));
        assert!(sim.bufs.is_empty(), "every buffer released");
        assert!(sim.max_bufs <= 4, "window bounds buffers: {}", sim.max_bufs);
        assert_eq!(sim.primary.latency().len() as u64, l.blocks());
        assert!(sim.reps[0].core.is_finished());
        assert_eq!(sim.reps[0].core.written(), (l.blocks(), l.len()));
    }
}

#[test]
fn two_replicas_fan_out_in_random_order() {
    for seed in 1..20 {
        let l = Layout::new(0, 40 * 8192, 8192, 512, 1 << 30).unwrap();
        let mut sim = Sim::new(l, 2, 8, seed % 2 == 0, seed * 7919);
        sim.run();
        let o = sim.primary.outcome();
        assert!(o.success, "seed {seed}: {o:?}");
        assert!(sim.block_ok_on(0, l.range()) && sim.block_ok_on(1, l.range()));
        assert!(sim.bufs.is_empty());
    }
}

#[test]
fn replica_dying_mid_run_names_exactly_the_unreplicated_ranges() {
    for seed in 1..30 {
        let l = layout_short_tail();
        let mut sim = Sim::new(l, 2, 4, false, seed);
        sim.kill = Some((1, 5));
        sim.run();
        let o = sim.primary.outcome();
        assert!(
            !o.success,
            "seed {seed}: success claimed with a dead replica"
        );
        assert!(!o.unreplicated.is_empty());
        assert!(o.replica_errors[1].is_some());
        assert!(o.replica_errors[0].is_none());
        // Everything not reported unreplicated really is on both drives.
        for b in l.iter() {
            let r = b.range();
            let reported = o
                .unreplicated
                .iter()
                .any(|u| u.start <= r.start && r.end <= u.end);
            if !reported {
                assert!(
                    sim.block_ok_on(0, r) && sim.block_ok_on(1, r),
                    "seed {seed} block {}",
                    b.seq
                );
            }
        }
        // The survivor got everything and finished cleanly.
        assert!(sim.block_ok_on(0, l.range()), "seed {seed}");
        assert!(sim.reps[0].core.is_finished());
        assert!(sim.bufs.is_empty());
        // Acks still in flight when it died are lost: at most the 5 it sent count.
        assert!(o.replicated_blocks <= 5);
    }
}

#[test]
fn only_replica_dying_stops_the_run_without_success() {
    let l = layout_short_tail();
    let mut sim = Sim::new(l, 1, 4, true, 3);
    sim.kill = Some((0, 2));
    sim.run();
    assert!(sim.primary.is_settled());
    let o = sim.primary.outcome();
    assert!(!o.success);
    assert!(o.replicated_blocks <= 2);
    let covered: u64 = o.unreplicated.iter().map(|r| r.len()).sum();
    assert_eq!(covered + o.replicated_bytes, l.len());
    assert!(sim.bufs.is_empty());
}

#[test]
fn write_error_and_silent_corruption_are_reported() {
    let l = layout_short_tail();
    let mut sim = Sim::new(l, 2, 4, true, 11);
    sim.reps[0].fail_write = Some(3);
    sim.reps[1].corrupt = Some(12);
    sim.run();
    let o = sim.primary.outcome();
    assert!(!o.success);
    assert_eq!(o.unreplicated, vec![l.block(3).unwrap().range()]);
    assert!(o.replica_errors[0]
        .as_ref()
        .unwrap()
        .to_string()
        .contains("block 3"));
    assert_eq!(o.mismatches[1], vec![l.block(12).unwrap().range()]);
    assert!(o.mismatches[0].is_empty());
}

#[test]
fn malformed_message_from_replica_ends_only_that_connection() {
    let l = layout_short_tail();
    let cases: Vec<Vec<u8>> = vec![
        vec![1, 2, 3],
        [0xffu8; MSG_LEN].to_vec(),
        // Ack of a block never sent.
        Message::BlockWritten {
            seq: 11,
            status: Status::Ok,
        }
        .encode()
        .to_vec(),
        // A fin before the primary's: the replica may only answer one.
        Message::Fin {
            blocks: 1,
            bytes: 16384,
        }
        .encode()
        .to_vec(),
        // Advertisement far out of order.
        Message::BufferReady {
            seq: 9,
            addr: 0,
            rkey: 1,
            len: 16384,
        }
        .encode()
        .to_vec(),
    ];
    for bytes in cases {
        let mut sim = Sim::new(l, 2, 4, false, 5);
        sim.inject = Some((1, bytes));
        sim.run();
        let o = sim.primary.outcome();
        assert!(!o.success);
        let why = o.replica_errors[1].as_ref().unwrap().to_string();
        assert!(why.contains("replica 1"), "{why}");
        assert!(o.replica_errors[0].is_none());
        assert!(sim.block_ok_on(0, l.range()));
        assert!(sim.bufs.is_empty());
    }
}

#[test]
fn crafted_primary_cannot_make_a_replica_write_outside_the_range() {
    let l = Layout::new(1 << 20, 4 * 4096, 4096, 4096, 1 << 30).unwrap();
    let cfg = l.config(0, 2, 0);
    let mut rep = ReplicaCore::new(1 << 30, 2);
    let mut out = Vec::new();
    rep.on_message(&Message::Hello(cfg).encode(), &mut out)
        .unwrap();
    assert!(matches!(
        out[0],
        ReplicaAction::Send(Message::HelloAck { window: 2, .. })
    ));
    assert_eq!(
        out[1..],
        [
            ReplicaAction::Advertise {
                slot: 0,
                seq: 0,
                len: 4096
            },
            ReplicaAction::Advertise {
                slot: 1,
                seq: 1,
                len: 4096
            },
        ]
    );
    let bad = [
        // Offset pointing at the start of the drive.
        Message::BlockSent {
            seq: 0,
            offset: 0,
            len: 4096,
        },
        // Longer than the block.
        Message::BlockSent {
            seq: 0,
            offset: 1 << 20,
            len: 8192,
        },
        // Not advertised yet.
        Message::BlockSent {
            seq: 2,
            offset: (1 << 20) + 8192,
            len: 4096,
        },
        // Beyond the range.
        Message::BlockSent {
            seq: 4,
            offset: (1 << 20) + 16384,
            len: 4096,
        },
    ];
    for m in bad {
        let mut rep = ReplicaCore::new(1 << 30, 2);
        let mut out = Vec::new();
        rep.on_message(&Message::Hello(cfg).encode(), &mut out)
            .unwrap();
        out.clear();
        assert!(rep.on_message(&m.encode(), &mut out).is_err(), "{m:?}");
        assert!(out.is_empty(), "no write for a rejected message");
    }
    // A range that does not fit the replica is refused at hello.
    let mut small = ReplicaCore::new(1 << 20, 2);
    assert!(small
        .on_message(&Message::Hello(cfg).encode(), &mut Vec::new())
        .is_err());
}

// ---------------------------------------------------------------- engine configuration (host)

mod engine_config {
    use std::time::Duration;

    use peerpipe::pipeline::engine::{
        write_cache_from_sysfs, BufferChoice, CopyMode, EngineError, PrimaryConfig, PrimaryEngine,
        ReplicaConfig, WaitMode,
    };

    fn addr() -> std::net::SocketAddr {
        "127.0.0.1:7471".parse().unwrap()
    }

    fn invalid(e: EngineError) -> (&'static str, String) {
        match e {
            EngineError::InvalidConfig { what, reason } => (what, reason),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn wait_buffers_and_copy_parse_their_cli_words_and_reject_others() {
        assert_eq!("events".parse::<WaitMode>().unwrap(), WaitMode::Events);
        assert_eq!("busy".parse::<WaitMode>().unwrap(), WaitMode::BusyPoll);
        assert_eq!(WaitMode::default(), WaitMode::Events);
        assert_eq!(WaitMode::BusyPoll.to_string(), "busy");
        let (what, reason) = invalid("spin".parse::<WaitMode>().unwrap_err());
        assert_eq!(what, "wait");
        assert!(reason.contains("events or busy"), "{reason}");
        assert_eq!("host".parse::<BufferChoice>().unwrap(), BufferChoice::Host);
        assert_eq!("p2p".parse::<BufferChoice>().unwrap(), BufferChoice::P2p);
        assert!("dram".parse::<BufferChoice>().is_err());
        assert_eq!("bounce".parse::<CopyMode>().unwrap(), CopyMode::Bounce);
        assert_eq!("none".parse::<CopyMode>().unwrap(), CopyMode::None);
        assert!("memcpy".parse::<CopyMode>().is_err());
    }

    #[test]
    fn primary_config_validation_names_the_bad_setting() {
        let ok = PrimaryConfig::new("/dev/ng1n1").replica(addr());
        ok.validate().unwrap();
        let (what, _) = invalid(PrimaryConfig::new("/dev/ng1n1").validate().unwrap_err());
        assert_eq!(what, "replicas");
        let (what, _) = invalid(
            PrimaryConfig::new("")
                .replica(addr())
                .validate()
                .unwrap_err(),
        );
        assert_eq!(what, "source");
        for w in [0, 1025] {
            let (what, reason) = invalid(ok.clone().window(w).validate().unwrap_err());
            assert_eq!(what, "window");
            assert!(reason.contains("1..=1024"), "{reason}");
        }
        ok.clone().window(1024).validate().unwrap();
        let (what, _) = invalid(ok.clone().timeout(Duration::ZERO).validate().unwrap_err());
        assert_eq!(what, "timeout");
    }

    #[test]
    fn replica_config_validation_names_the_bad_setting() {
        let ok = ReplicaConfig::new("/dev/ng2n1", addr());
        ok.validate().unwrap();
        let (what, _) = invalid(ok.clone().block_size(0).validate().unwrap_err());
        assert_eq!(what, "block_size");
        let (what, _) = invalid(ok.clone().block_size(1 << 40).validate().unwrap_err());
        assert_eq!(what, "block_size");
        let (what, _) = invalid(ok.clone().window(0).validate().unwrap_err());
        assert_eq!(what, "window");
        let (what, _) = invalid(ReplicaConfig::new("", addr()).validate().unwrap_err());
        assert_eq!(what, "target");
    }

    #[test]
    fn write_cache_decision_from_sysfs_text() {
        assert_eq!(write_cache_from_sysfs("write back\n"), Some(true));
        assert_eq!(write_cache_from_sysfs("write through\n"), Some(false));
        assert_eq!(write_cache_from_sysfs("write back"), Some(true));
        assert_eq!(write_cache_from_sysfs(""), None);
        assert_eq!(write_cache_from_sysfs("writeback"), None);
    }

    #[test]
    fn primary_engine_on_a_missing_source_is_a_typed_open_error() {
        let e = PrimaryEngine::new(
            PrimaryConfig::new("/nonexistent/peerpipe-source")
                .replica(addr())
                .buffers(BufferChoice::Host),
        )
        .err()
        .expect("a missing source must fail");
        assert!(matches!(e, EngineError::Open { .. }), "{e:?}");
        let s = e.to_string();
        assert!(s.contains("/nonexistent/peerpipe-source"), "{s}");
    }

    /// A regular file is a real O_DIRECT target on the host: the range checks run against its
    /// size and LBA alignment before anything connects.
    #[test]
    fn primary_engine_checks_the_range_against_a_file_source() {
        let dir = std::env::temp_dir().join(format!("peerpipe-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("src.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let cfg = PrimaryConfig::new(&path)
            .replica(addr())
            .buffers(BufferChoice::Host);
        let r = PrimaryEngine::new(cfg.clone().offset(2 << 20).len(Some(4096)));
        match r {
            Err(EngineError::Range(e)) => assert!(e.to_string().contains("beyond"), "{e}"),
            Err(EngineError::Open { .. }) => {
                // tmpfs without O_DIRECT support: nothing to check on this host.
                eprintln!("skipped: {} does not support O_DIRECT", dir.display());
                return;
            }
            other => panic!("expected a range error, got {:?}", other.err()),
        }
        let e = PrimaryEngine::new(cfg.clone().len(Some(1000)))
            .err()
            .unwrap();
        assert!(e.to_string().contains("round to"), "{e}");
        let eng = PrimaryEngine::new(cfg.len(Some(200 << 10)).window(64)).unwrap();
        assert_eq!(eng.layout().blocks(), 4);
        assert_eq!(eng.window(), 4, "the window is capped at the block count");
        assert_eq!(eng.buffers().kind, BufferChoice::Host);
        assert_eq!(eng.backend(), peerpipe::pipeline::engine::Backend::File);
        drop(eng);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `PrimaryCore::awaits` in a directed run: a replica owes its hello-ack and a buffer for a
/// block that was read, but not while all its buffers are advertised and it waits behind
/// another replica; it owes acks for blocks written to it; nothing after a failed source read.
#[test]
fn awaits_names_who_owes_the_primary_an_answer() {
    let l = Layout::new(0, 4 * 4096, 4096, 512, 1 << 30).unwrap();
    let mut p = PrimaryCore::new(l, 2, 4, false).unwrap();
    let mut out = Vec::new();
    let msg = |p: &mut PrimaryCore, r: usize, m: Message, out: &mut Vec<PrimaryAction>| {
        p.on_message(r, &m.encode(), out);
    };
    p.start(&mut out);
    // Nothing read yet: no replica holds anything up.
    assert!(!p.awaits(0) && !p.awaits(1));
    p.on_read_done(0, Ok(0), &mut out);
    assert!(p.awaits(0) && p.awaits(1), "both owe their hello-ack");
    for (r, window) in [(0usize, 1u32), (1, 2)] {
        let ack = Message::HelloAck {
            replica_id: r as u32,
            window,
            capacity: 1 << 30,
        };
        msg(&mut p, r, ack, &mut out);
    }
    let adv = |seq| Message::BufferReady {
        seq,
        addr: 0,
        rkey: 5,
        len: 4096,
    };
    msg(&mut p, 0, adv(0), &mut out);
    // Replica 0's only buffer is advertised: it waits for replica 1, which owes one.
    assert!(!p.awaits(0));
    assert!(p.awaits(1));
    msg(&mut p, 1, adv(0), &mut out);
    assert!(out.iter().any(|a| matches!(
        a,
        PrimaryAction::Write {
            replica: 1,
            seq: 0,
            ..
        }
    )));
    // Block 0 went to both: both owe its ack.
    assert!(p.awaits(0) && p.awaits(1));
    for r in 0..2 {
        p.on_write_done(r, 0, Ok(()), &mut out);
        let written = Message::BlockWritten {
            seq: 0,
            status: Status::Ok,
        };
        msg(&mut p, r, written, &mut out);
    }
    // Acked, and block 1 not read yet: nobody owes anything.
    assert!(!p.awaits(0) && !p.awaits(1));
    p.on_read_done(
        1,
        Err(Failure::Short {
            op: "read",
            got: 0,
            want: 4096,
        }),
        &mut out,
    );
    assert!(
        !p.awaits(0) && !p.awaits(1),
        "a failed read is owed by no one"
    );
}
