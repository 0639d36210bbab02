//! Protocol semantics the cores enforce (issue 12, part 4): who may end a run when, what a
//! replica reads back for whom, what a Hello must fit, and how failed blocks settle. Each test
//! drives [`PrimaryCore`] / [`ReplicaCore`] (or the per-connection validators) with the exact
//! messages a misbehaving peer would send and checks both the refusal and that nothing was
//! done on its behalf.

use peerpipe::pipeline::{Failure, Layout, PrimaryAction, PrimaryCore, ReplicaAction, ReplicaCore};
use peerpipe::protocol::{
    flags, Config, Message, MessageKind, PrimarySide, ProtocolError, ReplicaSide, ReplicaTarget,
    Status,
};

const CAP: u64 = 1 << 30;

/// 4 blocks of 4 KiB at 64 KiB, 512-byte LBAs.
fn cfg(window: u32, verify: bool) -> Config {
    Config {
        replica_id: 0,
        block_size: 4096,
        lba_size: 512,
        window,
        range_offset: 65536,
        range_len: 4 * 4096,
        flags: if verify { flags::VERIFY } else { 0 },
    }
}

fn feed(rep: &mut ReplicaCore, m: Message) -> Result<Vec<ReplicaAction>, ProtocolError> {
    let mut out = Vec::new();
    rep.on_message(&m.encode(), &mut out).map(|()| out)
}

/// A replica with `slots` buffers that accepted `c`.
fn replica(c: Config, slots: usize) -> ReplicaCore {
    let mut rep = ReplicaCore::new(CAP, slots);
    feed(&mut rep, Message::Hello(c)).unwrap();
    rep
}

/// The primary sends block `seq`; the drive write ends with `status`; returns the ack actions.
fn write_block(rep: &mut ReplicaCore, c: &Config, seq: u64, status: Status) -> Vec<ReplicaAction> {
    let len = c.block_len(seq).unwrap();
    let out = feed(
        rep,
        Message::BlockSent {
            seq,
            offset: c.block_offset(seq),
            len,
        },
    )
    .unwrap();
    assert!(matches!(out[..], [ReplicaAction::Write { seq: s, .. }] if s == seq));
    let mut out = Vec::new();
    rep.on_write_done(seq, status, &mut out).unwrap();
    out
}

fn readbacks(out: &[ReplicaAction]) -> usize {
    out.iter()
        .filter(|a| matches!(a, ReplicaAction::ReadBack { .. }))
        .count()
}

// ------------------------------------------------------------------------------ Fin

#[test]
fn replica_refuses_the_primarys_fin_before_every_block_is_acked() {
    let c = cfg(4, false);
    let mut rep = replica(c, 4);
    write_block(&mut rep, &c, 0, Status::Ok);
    let e = feed(
        &mut rep,
        Message::Fin {
            blocks: 1,
            bytes: 4096,
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Unexpected {
                got: MessageKind::Fin,
                ..
            }
        ),
        "{e}"
    );
    assert!(!rep.is_finished());
    // Once every block is acked the same fin is answered with what this replica wrote.
    for seq in 1..4 {
        write_block(&mut rep, &c, seq, Status::Ok);
    }
    let out = feed(
        &mut rep,
        Message::Fin {
            blocks: 4,
            bytes: 4 * 4096,
        },
    )
    .unwrap();
    assert_eq!(
        out,
        [ReplicaAction::Send(Message::Fin {
            blocks: 4,
            bytes: 4 * 4096
        })]
    );
    assert!(rep.is_finished());
}

#[test]
fn replica_refuses_a_fin_before_its_read_backs_are_answered() {
    let c = cfg(4, true);
    let mut rep = replica(c, 4);
    for seq in 0..4 {
        write_block(&mut rep, &c, seq, Status::Ok);
    }
    // Verify negotiated, nothing verified yet: the primary may not end the run.
    assert!(feed(
        &mut rep,
        Message::Fin {
            blocks: 4,
            bytes: 16384
        }
    )
    .is_err());
}

#[test]
fn replica_refuses_a_fin_claiming_more_than_it_wrote() {
    let c = cfg(4, false);
    let mut rep = replica(c, 4);
    for seq in 0..4 {
        write_block(&mut rep, &c, seq, Status::Ok);
    }
    let e = feed(
        &mut rep,
        Message::Fin {
            blocks: 5,
            bytes: 4 * 4096,
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Mismatch {
                kind: MessageKind::Fin,
                ..
            }
        ),
        "{e}"
    );
}

/// A replica `Fin` before the primary's is that replica's protocol violation: it is sent an
/// abort and lost, the other replica is untouched.
#[test]
fn replica_fin_before_the_primarys_is_a_violation_of_that_replica_alone() {
    let l = Layout::new(0, 4 * 4096, 4096, 512, CAP).unwrap();
    let mut p = PrimaryCore::new(l, 2, 4, false).unwrap();
    let mut out = Vec::new();
    p.start(&mut out);
    for r in 0..2u32 {
        let ack = Message::HelloAck {
            replica_id: r,
            window: 4,
            capacity: CAP,
        };
        p.on_message(r as usize, &ack.encode(), &mut out);
    }
    out.clear();
    p.on_message(
        1,
        &Message::Fin {
            blocks: 0,
            bytes: 0,
        }
        .encode(),
        &mut out,
    );
    assert!(out.contains(&PrimaryAction::Send {
        replica: 1,
        msg: Message::Abort {
            status: Status::Protocol(
                ProtocolError::Unexpected {
                    got: MessageKind::Fin,
                    state: ""
                }
                .code()
            ),
            seq: u64::MAX
        }
    }));
    assert!(out.contains(&PrimaryAction::Disconnect { replica: 1 }));
    assert!(!out.iter().any(|a| matches!(
        a,
        PrimaryAction::Send { replica: 0, .. } | PrimaryAction::Disconnect { replica: 0 }
    )));
    assert!(p.is_alive(0) && !p.is_alive(1));
    let o = p.outcome();
    let why = o.replica_errors[1].as_ref().unwrap().to_string();
    assert!(why.contains("replica 1") && why.contains("fin"), "{why}");
    assert!(o.replica_errors[0].is_none());
    assert!(!p.is_settled(), "the run goes on to replica 0");
}

#[test]
fn primary_checks_the_replicas_fin_counts_against_its_ok_acks() {
    let c = cfg(4, false);
    let mut p = PrimarySide::new(c).unwrap();
    p.on_receive(&Message::HelloAck {
        replica_id: 0,
        window: 4,
        capacity: CAP,
    })
    .unwrap();
    assert!(p.on_fin_sent().is_err(), "nothing acked: no fin yet");
    for seq in 0..4 {
        p.on_receive(&Message::BufferReady {
            seq,
            addr: 0,
            rkey: 1,
            len: 4096,
        })
        .unwrap();
        p.on_sent(seq).unwrap();
        let status = if seq == 2 {
            Status::Errno(5)
        } else {
            Status::Ok
        };
        p.on_receive(&Message::BlockWritten { seq, status })
            .unwrap();
    }
    p.on_fin_sent().unwrap();
    assert!(p.on_fin_sent().is_err(), "one fin");
    // Block 2 failed: the replica wrote 3 blocks, not 4.
    let e = p
        .on_receive(&Message::Fin {
            blocks: 4,
            bytes: 16384,
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Mismatch {
                kind: MessageKind::Fin,
                ..
            }
        ),
        "{e}"
    );
    p.on_receive(&Message::Fin {
        blocks: 3,
        bytes: 12288,
    })
    .unwrap();
    assert!(p.is_finished());
}

// ------------------------------------------------------------------------------ Verify

#[test]
fn verify_request_without_verify_negotiated_is_refused() {
    let c = cfg(4, false);
    let mut rep = replica(c, 4);
    write_block(&mut rep, &c, 0, Status::Ok);
    let e = feed(&mut rep, Message::VerifyRequest { seq: 0 }).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Unexpected {
                got: MessageKind::VerifyRequest,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn verify_request_is_served_once_per_block() {
    let c = cfg(4, true);
    let mut rep = replica(c, 4);
    write_block(&mut rep, &c, 0, Status::Ok);
    let out = feed(&mut rep, Message::VerifyRequest { seq: 0 }).unwrap();
    assert_eq!(readbacks(&out), 1);
    // Again while the read-back runs, and again after it was answered.
    assert!(feed(&mut rep, Message::VerifyRequest { seq: 0 }).is_err());
    let mut rep = replica(c, 4);
    write_block(&mut rep, &c, 0, Status::Ok);
    feed(&mut rep, Message::VerifyRequest { seq: 0 }).unwrap();
    let mut out = Vec::new();
    rep.on_readback_done(0, 4096, 7, Status::Ok, &mut out);
    assert_eq!(out.len(), 1);
    let e = feed(&mut rep, Message::VerifyRequest { seq: 0 }).unwrap_err();
    assert!(
        matches!(e, ProtocolError::BadSequence { seq: 0, .. }),
        "{e}"
    );
    // A read-back result nobody asked for is not sent.
    let mut out = Vec::new();
    rep.on_readback_done(0, 4096, 7, Status::Ok, &mut out);
    assert!(out.is_empty());
}

#[test]
fn read_backs_beyond_the_granted_window_are_refused() {
    let c = cfg(4, true);
    // Two buffers: the window granted is 2.
    let mut rep = replica(c, 2);
    for seq in 0..4 {
        write_block(&mut rep, &c, seq, Status::Ok);
    }
    feed(&mut rep, Message::VerifyRequest { seq: 0 }).unwrap();
    feed(&mut rep, Message::VerifyRequest { seq: 1 }).unwrap();
    let e = feed(&mut rep, Message::VerifyRequest { seq: 2 }).unwrap_err();
    assert!(
        matches!(e, ProtocolError::BadSequence { seq: 2, .. }),
        "{e}"
    );
    let mut rep = replica(c, 2);
    for seq in 0..4 {
        write_block(&mut rep, &c, seq, Status::Ok);
    }
    feed(&mut rep, Message::VerifyRequest { seq: 0 }).unwrap();
    feed(&mut rep, Message::VerifyRequest { seq: 1 }).unwrap();
    // An answer makes room for the next.
    rep.on_readback_done(1, 4096, 0, Status::Ok, &mut Vec::new());
    let out = feed(&mut rep, Message::VerifyRequest { seq: 2 }).unwrap();
    assert_eq!(readbacks(&out), 1);
}

/// The primary never has more read-backs outstanding than the replica granted: the rest wait
/// in a queue (an honest primary must not trip the replica's bound).
#[test]
fn primary_queues_verify_requests_beyond_the_granted_window() {
    let l = Layout::new(0, 3 * 4096, 4096, 512, CAP).unwrap();
    let mut p = PrimaryCore::new(l, 1, 4, true).unwrap();
    let mut out = Vec::new();
    p.start(&mut out);
    for seq in 0..3 {
        p.on_read_done(seq, Ok(seq as u32), &mut out);
    }
    let ack = Message::HelloAck {
        replica_id: 0,
        window: 1,
        capacity: CAP,
    };
    p.on_message(0, &ack.encode(), &mut out);
    out.clear();
    let mut requests = Vec::new();
    for seq in 0..2u64 {
        let adv = Message::BufferReady {
            seq,
            addr: 0,
            rkey: 9,
            len: 4096,
        };
        p.on_message(0, &adv.encode(), &mut out);
        p.on_write_done(0, seq, Ok(()), &mut out);
        let written = Message::BlockWritten {
            seq,
            status: Status::Ok,
        };
        p.on_message(0, &written.encode(), &mut out);
        requests.extend(out.drain(..).filter_map(|a| match a {
            PrimaryAction::Send {
                msg: Message::VerifyRequest { seq },
                ..
            } => Some(seq),
            _ => None,
        }));
    }
    assert_eq!(requests, [0], "window 1: one read-back outstanding");
    let result = Message::VerifyResult {
        seq: 0,
        len: 4096,
        crc: 0,
        status: Status::Ok,
    };
    p.on_message(0, &result.encode(), &mut out);
    assert!(out.contains(&PrimaryAction::Send {
        replica: 0,
        msg: Message::VerifyRequest { seq: 1 }
    }));
    assert!(p.is_alive(0));
}

// ------------------------------------------------------------------------------ Hello

fn target(lba: u32, slots: u32, slot_bytes: u32) -> ReplicaCore {
    ReplicaCore::with_target(ReplicaTarget::new(CAP, lba, slots, slot_bytes))
}

#[test]
fn hello_not_aligned_to_the_replicas_logical_block_size_is_refused() {
    // The primary's drive has 512-byte LBAs; this replica's has 4 KiB.
    for (offset, len, block) in [(512, 16384, 4096), (0, 16384 + 512, 4096), (0, 16384, 6144)] {
        let c = Config {
            range_offset: offset,
            range_len: len,
            block_size: block,
            ..cfg(4, false)
        };
        let mut rep = target(4096, 4, 1 << 20);
        let e = feed(&mut rep, Message::Hello(c)).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::Mismatch {
                    kind: MessageKind::Hello,
                    expected: 4096,
                    ..
                }
            ),
            "{c:?}: {e}"
        );
        assert!(rep.layout().is_none());
    }
    // 512-byte LBAs on the primary are fine when the range is 4 KiB aligned.
    let mut rep = target(4096, 4, 1 << 20);
    let out = feed(&mut rep, Message::Hello(cfg(4, false))).unwrap();
    assert_eq!(out.len(), 5, "hello-ack and 4 advertisements: {out:?}");
}

#[test]
fn hello_with_blocks_larger_than_the_replicas_buffers_is_refused() {
    let c = Config {
        block_size: 8192,
        range_len: 4 * 8192,
        ..cfg(4, false)
    };
    let mut rep = target(512, 4, 4096);
    let e = feed(&mut rep, Message::Hello(c)).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Mismatch {
                got: 8192,
                expected: 4096,
                ..
            }
        ),
        "{e}"
    );
    let mut rep = target(512, 4, 8192);
    feed(&mut rep, Message::Hello(c)).unwrap();
}

#[test]
fn hello_beyond_the_capacity_is_refused_and_the_window_is_capped_at_the_buffers() {
    let c = Config {
        range_offset: CAP - 8192,
        ..cfg(64, false)
    };
    let mut rep = target(512, 4, 4096);
    assert!(feed(&mut rep, Message::Hello(c)).is_err());
    let mut rep = target(512, 3, 4096);
    let out = feed(&mut rep, Message::Hello(cfg(64, false))).unwrap();
    assert!(matches!(
        out[0],
        ReplicaAction::Send(Message::HelloAck { window: 3, .. })
    ));
    // Three buffers: three advertisements, whatever the primary proposed.
    assert_eq!(out.len(), 4);
    let mut side = ReplicaSide::new(ReplicaTarget::new(CAP, 512, 3, 4096));
    side.on_receive(&Message::Hello(cfg(64, false))).unwrap();
    assert_eq!(side.window(), Some(3));
    for seq in 0..3 {
        side.on_advertise(seq).unwrap();
    }
    assert!(
        side.on_advertise(3).is_err(),
        "a fourth buffer overruns the window"
    );
}

// ------------------------------------------------------------------------------ Failed blocks

/// A failed (or short) drive write settles the block as failed on both sides: acked with the
/// error, not counted, never read back, and the run still ends with a fin exchange.
#[test]
fn failed_write_settles_the_block_as_failed_on_both_sides() {
    let c = cfg(4, true);
    let mut rep = replica(c, 4);
    let short = Status::Errno(libc::EIO as u16);
    let out = write_block(&mut rep, &c, 1, short);
    assert!(out.contains(&ReplicaAction::Send(Message::BlockWritten {
        seq: 1,
        status: short
    })));
    assert_eq!(rep.failed_blocks(), 1);
    assert!(feed(&mut rep, Message::VerifyRequest { seq: 1 }).is_err());
    // The others are written and verified; then fin is allowed.
    let mut rep = replica(c, 4);
    write_block(&mut rep, &c, 1, short);
    for seq in [0, 2, 3] {
        write_block(&mut rep, &c, seq, Status::Ok);
        feed(&mut rep, Message::VerifyRequest { seq }).unwrap();
        rep.on_readback_done(seq, 4096, 0, Status::Ok, &mut Vec::new());
    }
    assert_eq!(rep.written(), (3, 3 * 4096));
    let out = feed(
        &mut rep,
        Message::Fin {
            blocks: 0,
            bytes: 0,
        },
    )
    .unwrap();
    assert_eq!(
        out,
        [ReplicaAction::Send(Message::Fin {
            blocks: 3,
            bytes: 3 * 4096
        })]
    );
}

/// A short or failed source read fails its block: nothing is written from that buffer, every
/// replica is aborted, the buffer is released and the verdict is failure naming the block.
#[test]
fn short_source_read_fails_the_block_and_the_run() {
    let l = Layout::new(0, 4 * 4096, 4096, 512, CAP).unwrap();
    let mut p = PrimaryCore::new(l, 1, 4, false).unwrap();
    let mut out = Vec::new();
    p.start(&mut out);
    let ack = Message::HelloAck {
        replica_id: 0,
        window: 4,
        capacity: CAP,
    };
    p.on_message(0, &ack.encode(), &mut out);
    for seq in 0..4 {
        let adv = Message::BufferReady {
            seq,
            addr: 0,
            rkey: 1,
            len: 4096,
        };
        p.on_message(0, &adv.encode(), &mut out);
    }
    out.clear();
    p.on_read_done(
        2,
        Err(Failure::Short {
            op: "read",
            got: 1024,
            want: 4096,
        }),
        &mut out,
    );
    assert!(!out
        .iter()
        .any(|a| matches!(a, PrimaryAction::Write { seq: 2, .. })));
    assert!(out.contains(&PrimaryAction::Release { seq: 2 }));
    assert!(out.iter().any(|a| matches!(
        a,
        PrimaryAction::Send {
            msg: Message::Abort { seq: 2, .. },
            ..
        }
    )));
    for seq in [0, 1, 3] {
        p.on_read_done(seq, Ok(0), &mut out);
    }
    assert!(!out.iter().any(|a| matches!(a, PrimaryAction::Write { .. })));
    assert!(p.is_finished());
    let o = p.outcome();
    assert!(!o.success);
    assert_eq!(o.unreplicated, vec![l.range()]);
    let why = o.replica_errors[0].as_ref().unwrap().to_string();
    assert!(why.contains("source read failed"), "{why}");
}

/// Regression (fuzz/primary_core): a failed source read aborted the replicas one by one, and
/// losing the first re-dispatched the failed block to the second, which had a buffer for it:
/// the bytes of a failed read were RDMA-written and announced with `BlockSent`.
#[test]
fn failed_source_read_is_never_written_to_any_replica() {
    let l = Layout::new(0, 4096, 4096, 512, CAP).unwrap();
    let mut p = PrimaryCore::new(l, 2, 4, true).unwrap();
    let mut out = Vec::new();
    p.start(&mut out);
    let ack = Message::HelloAck {
        replica_id: 1,
        window: 2,
        capacity: CAP,
    };
    p.on_message(1, &ack.encode(), &mut out);
    let adv = Message::BufferReady {
        seq: 0,
        addr: 0x1000,
        rkey: 7,
        len: 4096,
    };
    p.on_message(1, &adv.encode(), &mut out);
    out.clear();
    p.on_read_done(
        0,
        Err(Failure::Short {
            op: "read",
            got: 512,
            want: 4096,
        }),
        &mut out,
    );
    assert!(
        !out.iter().any(|a| matches!(
            a,
            PrimaryAction::Write { .. }
                | PrimaryAction::Send {
                    msg: Message::BlockSent { .. },
                    ..
                }
        )),
        "{out:?}"
    );
    assert!(out.contains(&PrimaryAction::Release { seq: 0 }));
    assert!(p.is_finished() && !p.outcome().success);
}

/// The replica's rule for a drive result: only a write of the whole block is `Ok`.
#[test]
fn short_write_is_a_failed_block_not_ok() {
    let c = Config {
        range_len: 3 * 4096 + 1024,
        ..cfg(4, false)
    };
    let rep = replica(c, 4);
    assert_eq!(rep.write_status(0, Ok(4096)), Status::Ok);
    assert_eq!(
        rep.write_status(3, Ok(1024)),
        Status::Ok,
        "short last block, whole"
    );
    let eio = Status::Errno(libc::EIO as u16);
    assert_eq!(rep.write_status(0, Ok(4095)), eio);
    assert_eq!(rep.write_status(0, Ok(0)), eio);
    assert_eq!(
        rep.write_status(3, Ok(4096)),
        eio,
        "more than the block is wrong too"
    );
    assert_eq!(rep.write_status(9, Ok(4096)), eio, "no such block");
    assert_eq!(
        rep.write_status(0, Err(Status::Nvme(0x0281))),
        Status::Nvme(0x0281)
    );
    assert_eq!(
        rep.write_status(0, Err(Status::Ok)),
        eio,
        "an error is never ok"
    );
}

// ------------------------------------------------------------------ Window invalidation

/// Protocol version 3: a replica never invalidates a window itself (a LOCAL_INV of a window
/// the primary's SEND_WITH_INV killed too crashes soft-RoCE kernels), so a `BlockSent` that
/// did not invalidate its window is a violation of its own, with its own abort code, and its
/// text names the block and the rule (the engine's check is a testbed test:
/// `testbed_replicator_refuses_a_block_sent_that_did_not_invalidate`).
#[test]
fn a_block_sent_that_did_not_invalidate_is_its_own_violation() {
    let e = ProtocolError::NotInvalidating { seq: 7 };
    assert_eq!(e.code(), 12);
    assert_eq!(
        ReplicaCore::abort_for(&e),
        Message::Abort {
            status: Status::Protocol(12),
            seq: u64::MAX
        }
    );
    let text = e.to_string();
    for want in ["BlockSent seq 7", "SEND_WITH_INV", "rkey of the window"] {
        assert!(text.contains(want), "no {want:?} in {text}");
    }
}
