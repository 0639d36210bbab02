//! The per-connection validators ([`PrimarySide`], [`ReplicaSide`]) on whole conversations:
//! the well-behaved one is accepted, each misbehaviour of either peer is refused with the
//! matching [`ProtocolError`], and random or mutated bytes never panic.

use peerpipe::protocol::{
    flags, Config, Message, PrimarySide, ProtocolError, ReplicaSide, ReplicaTarget, Status, MSG_LEN,
};

fn cfg() -> Config {
    Config {
        replica_id: 1,
        block_size: 8192,
        lba_size: 512,
        window: 4,
        range_offset: 4096,
        range_len: 3 * 8192 + 1024,
        flags: flags::VERIFY,
    }
}

/// A 512-byte-LBA target of `capacity` bytes with four 1 MiB buffers.
fn target(capacity: u64) -> ReplicaTarget {
    ReplicaTarget::new(capacity, 512, 4, 1 << 20)
}

fn all_kinds() -> Vec<Message> {
    vec![
        Message::Hello(cfg()),
        Message::HelloAck {
            replica_id: 1,
            window: 4,
            capacity: 1 << 30,
        },
        Message::BufferReady {
            seq: 3,
            addr: 0x7f00_0000_1000,
            rkey: 0xdead_beef,
            len: 1024,
        },
        Message::BlockSent {
            seq: 3,
            offset: 4096 + 3 * 8192,
            len: 1024,
        },
        Message::BlockWritten {
            seq: 7,
            status: Status::Nvme(0x0281),
        },
        Message::VerifyRequest { seq: 9 },
        Message::VerifyResult {
            seq: 9,
            len: 8192,
            crc: 1,
            status: Status::Ok,
        },
        Message::Fin {
            blocks: 4,
            bytes: 3 * 8192 + 1024,
        },
        Message::Abort {
            status: Status::Errno(5),
            seq: u64::MAX,
        },
    ]
}

/// A complete, well-behaved conversation with a short final block.
#[test]
fn conversation_in_order_is_accepted() {
    let c = cfg();
    assert_eq!(c.blocks(), 4);
    assert_eq!(c.block_len(3), Some(1024));
    assert_eq!(c.block_len(4), None);
    let mut p = PrimarySide::new(c).unwrap();
    let mut r = ReplicaSide::new(target(1 << 20));
    r.on_receive(&Message::Hello(c)).unwrap();
    p.on_receive(&Message::HelloAck {
        replica_id: 1,
        window: 2,
        capacity: 1 << 20,
    })
    .unwrap();
    for seq in 0..c.blocks() {
        let len = c.block_len(seq).unwrap();
        r.on_advertise(seq).unwrap();
        p.on_receive(&Message::BufferReady {
            seq,
            addr: 0x1000,
            rkey: 5,
            len,
        })
        .unwrap();
        p.on_sent(seq).unwrap();
        r.on_receive(&Message::BlockSent {
            seq,
            offset: c.block_offset(seq),
            len,
        })
        .unwrap();
        r.on_ack(seq, Status::Ok).unwrap();
        p.on_receive(&Message::BlockWritten {
            seq,
            status: Status::Ok,
        })
        .unwrap();
        p.on_verify_request(seq).unwrap();
        r.on_receive(&Message::VerifyRequest { seq }).unwrap();
        r.on_verify_done(seq).unwrap();
        p.on_receive(&Message::VerifyResult {
            seq,
            len,
            crc: 0,
            status: Status::Ok,
        })
        .unwrap();
    }
    r.on_receive(&Message::Fin {
        blocks: 4,
        bytes: c.range_len,
    })
    .unwrap();
    p.on_fin_sent().unwrap();
    p.on_receive(&Message::Fin {
        blocks: 4,
        bytes: c.range_len,
    })
    .unwrap();
    // Nothing may follow fin.
    assert!(matches!(
        p.on_receive(&Message::BlockWritten {
            seq: 0,
            status: Status::Ok
        }),
        Err(ProtocolError::Unexpected { .. })
    ));
}

fn primary_ready(window: u32) -> PrimarySide {
    let mut p = PrimarySide::new(cfg()).unwrap();
    p.on_receive(&Message::HelloAck {
        replica_id: 1,
        window,
        capacity: 1 << 20,
    })
    .unwrap();
    p
}

#[test]
fn primary_rejects_bad_replica_behaviour() {
    // Data before hello-ack.
    let mut p = PrimarySide::new(cfg()).unwrap();
    let adv0 = Message::BufferReady {
        seq: 0,
        addr: 0,
        rkey: 1,
        len: 8192,
    };
    assert!(matches!(
        p.on_receive(&adv0),
        Err(ProtocolError::Unexpected { .. })
    ));
    // Hello-ack with wrong id / too big window / too small capacity.
    for (id, w, cap) in [(2, 4, 1 << 20), (1, 5, 1 << 20), (1, 4, 8192)] {
        let mut p = PrimarySide::new(cfg()).unwrap();
        assert!(matches!(
            p.on_receive(&Message::HelloAck {
                replica_id: id,
                window: w,
                capacity: cap
            }),
            Err(ProtocolError::Mismatch { .. })
        ));
    }
    // Out of order advertisement.
    let mut p = primary_ready(4);
    let adv = |seq, len| Message::BufferReady {
        seq,
        addr: 0,
        rkey: 1,
        len,
    };
    assert!(matches!(
        p.on_receive(&adv(1, 8192)),
        Err(ProtocolError::BadSequence { .. })
    ));
    // Wrong length (the short last block must be advertised exactly).
    let mut p = primary_ready(4);
    assert!(matches!(
        p.on_receive(&adv(0, 4096)),
        Err(ProtocolError::Mismatch { .. })
    ));
    for s in 0..3 {
        p.on_receive(&adv(s, 8192)).unwrap();
    }
    assert!(matches!(
        p.on_receive(&adv(3, 8192)),
        Err(ProtocolError::Mismatch { .. })
    ));
    // Beyond the range.
    p.on_receive(&adv(3, 1024)).unwrap();
    assert!(matches!(
        p.on_receive(&adv(4, 1024)),
        Err(ProtocolError::BadSequence { .. })
    ));
    // Window overrun.
    let mut p = primary_ready(2);
    p.on_receive(&adv(0, 8192)).unwrap();
    p.on_receive(&adv(1, 8192)).unwrap();
    assert!(matches!(
        p.on_receive(&adv(2, 8192)),
        Err(ProtocolError::BadSequence { .. })
    ));
    // An ack frees a window slot.
    p.on_sent(0).unwrap();
    let ack0 = Message::BlockWritten {
        seq: 0,
        status: Status::Ok,
    };
    p.on_receive(&ack0).unwrap();
    p.on_receive(&adv(2, 8192)).unwrap();
    // Duplicate ack, ack of an unsent block.
    assert!(matches!(
        p.on_receive(&ack0),
        Err(ProtocolError::BadSequence { .. })
    ));
    assert!(matches!(
        p.on_receive(&Message::BlockWritten {
            seq: 1,
            status: Status::Ok
        }),
        Err(ProtocolError::BadSequence { .. })
    ));
    // Primary-side misuse: sending an unadvertised block.
    assert!(p.on_sent(3).is_err());
    // Verify result without request.
    assert!(matches!(
        p.on_receive(&Message::VerifyResult {
            seq: 0,
            len: 8192,
            crc: 0,
            status: Status::Ok
        }),
        Err(ProtocolError::BadSequence { .. })
    ));
    // Messages a replica never sends.
    assert!(matches!(
        p.on_receive(&Message::Hello(cfg())),
        Err(ProtocolError::Unexpected { .. })
    ));
    // Abort surfaces as such.
    assert_eq!(
        p.on_receive(&Message::Abort {
            status: Status::Errno(5),
            seq: 2
        }),
        Err(ProtocolError::PeerAborted {
            status: Status::Errno(5),
            seq: 2
        })
    );
}

#[test]
fn replica_rejects_bad_primary_behaviour() {
    let c = cfg();
    let mut r = ReplicaSide::new(target(1 << 20));
    let sent0 = Message::BlockSent {
        seq: 0,
        offset: c.range_offset,
        len: 8192,
    };
    assert!(matches!(
        r.on_receive(&sent0),
        Err(ProtocolError::Unexpected { .. })
    ));
    // Range beyond the replica's target.
    let mut small = ReplicaSide::new(target(8192));
    assert!(matches!(
        small.on_receive(&Message::Hello(c)),
        Err(ProtocolError::Mismatch { .. })
    ));
    r.on_receive(&Message::Hello(c)).unwrap();
    // Not advertised yet.
    assert!(matches!(
        r.on_receive(&sent0),
        Err(ProtocolError::BadSequence { .. })
    ));
    r.on_advertise(0).unwrap();
    assert!(r.on_advertise(0).is_err(), "double advertisement");
    assert!(r.on_advertise(4).is_err(), "beyond the range");
    // Offset outside the block: would write outside the target range.
    assert!(matches!(
        r.on_receive(&Message::BlockSent {
            seq: 0,
            offset: 0,
            len: 8192
        }),
        Err(ProtocolError::Mismatch { what: "offset", .. })
    ));
    assert!(matches!(
        r.on_receive(&Message::BlockSent {
            seq: 0,
            offset: c.range_offset,
            len: 4096
        }),
        Err(ProtocolError::Mismatch { what: "len", .. })
    ));
    r.on_receive(&sent0).unwrap();
    assert!(
        matches!(r.on_receive(&sent0), Err(ProtocolError::BadSequence { .. })),
        "duplicate"
    );
    assert!(matches!(
        r.on_receive(&Message::VerifyRequest { seq: 0 }),
        Err(ProtocolError::BadSequence { .. })
    ));
    r.on_ack(0, Status::Ok).unwrap();
    assert!(r.on_ack(0, Status::Ok).is_err());
    r.on_receive(&Message::VerifyRequest { seq: 0 }).unwrap();
    assert!(matches!(
        r.on_receive(&Message::HelloAck {
            replica_id: 1,
            window: 1,
            capacity: 0
        }),
        Err(ProtocolError::Unexpected { .. })
    ));
}

/// Tiny xorshift generator: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random bytes, random lengths and mutated valid messages: decode and the state machines
/// never panic; anything decoded re-encodes to the same bytes (canonical form).
#[test]
fn fuzz_random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = all_kinds();
    let mut p = primary_ready(4);
    let mut r = ReplicaSide::new(target(1 << 20));
    r.on_receive(&Message::Hello(cfg())).unwrap();
    let mut decoded = 0;
    for i in 0..200_000u32 {
        let mut buf = match i % 3 {
            0 => {
                let mut b = vec![0u8; (rng.next() % 80) as usize];
                b.iter_mut().for_each(|x| *x = rng.next() as u8);
                b
            }
            _ => {
                let mut b = seeds[(rng.next() % seeds.len() as u64) as usize]
                    .encode()
                    .to_vec();
                for _ in 0..=(rng.next() % 3) {
                    let at = (rng.next() % MSG_LEN as u64) as usize;
                    b[at] = rng.next() as u8;
                }
                b
            }
        };
        if i % 7 == 0 {
            buf.truncate((rng.next() % 65) as usize);
        }
        if let Ok(m) = Message::decode(&buf) {
            decoded += 1;
            assert_eq!(&m.encode()[..], &buf[..], "non-canonical accept");
            let _ = p.on_receive(&m);
            let _ = r.on_receive(&m);
        }
    }
    assert!(decoded > 1000, "mutations should often stay valid");
}
