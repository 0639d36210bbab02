//! Crafted-peer tests: protocol violations a real primary never commits (an unknown message
//! type, a SEND that is not whole messages, a protocol error during a read-back, a block whose
//! `BlockSent` did not invalidate its window) end the replica with exit 2 and a clear reason,
//! never a panic, and nothing refused reaches the drive.

use std::time::Duration;

use peerpipe_testbed as tb;

use super::crafted_primary::CraftedPrimary;
use super::support::*;

/// A crafted primary connects to a fresh replica on `port` and sends `payload` as one inline
/// SEND: the replica must end with a protocol error (exit 2) whose text holds every `want`,
/// never a panic.
fn crafted_send_is_refused(port: u16, payload: &[u8], want: &[&str]) {
    let (_, a1) = tb::addrs();
    let dev = tb::drive("data2").block;
    let addr = format!("{a1}:{port}");
    let kid = open_replica(&addr, &dev);
    let p = CraftedPrimary::connect(&addr, &kid, 4096);
    p.send_raw(payload);
    let o = kid.finish(Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}", tb::text(&o));
    assert!(err.contains("protocol error"), "{err}");
    for w in want {
        assert!(err.contains(w), "no {w:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_rejects_malformed_message_from_crafted_peer() {
    tb::require_testbed();
    crafted_send_is_refused(7495, &unknown_type(), &["unknown message type"]);
}

/// A message with an unknown message type byte.
fn unknown_type() -> [u8; peerpipe::protocol::MSG_LEN] {
    let mut msg = peerpipe::protocol::Message::Fin {
        blocks: 0,
        bytes: 0,
    }
    .encode();
    msg[5] = 0x77;
    msg
}

/// Why the fault tests are a test binary of their own (`tests/testbed_replicator_faults.rs`):
/// once a process has used rdma_cm, librdmacm keeps the rxe device open until the process
/// exits, after every object on it is gone. `tb::verbs_holders` must see that, or
/// `tb::LinkDown` could not refuse to recreate a device its own process holds (that delete
/// would wait for ever).
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_a_crafted_peer_holds_its_device_open_until_exit() {
    tb::require_testbed();
    let me = std::process::id();
    // The crafted primary (on rxe0's address) is created and dropped in here.
    crafted_send_is_refused(7530, &unknown_type(), &["unknown message type"]);
    let holders = tb::verbs_holders("rxe0");
    assert!(
        holders.iter().any(|(pid, _)| *pid == me),
        "this process ({me}) used rdma_cm on rxe0 but is not among its holders: {holders:?}"
    );
}

/// Protocol version 3 packs up to `MAX_PACKED` whole messages into one SEND: a crafted
/// primary's SEND of a valid hello followed by a 10-byte tail is a protocol error (after the
/// hello was handled, as the messages of a SEND are handled in order), never a panic or a
/// message made up of the tail.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_rejects_a_send_that_is_not_whole_messages() {
    use peerpipe::protocol::{Config, Message};
    tb::require_testbed();
    let hello = Message::Hello(Config {
        replica_id: 0,
        block_size: 65536,
        lba_size: 512,
        window: 4,
        range_offset: 0,
        range_len: 65536,
        flags: 0,
    });
    let mut payload = hello.encode().to_vec();
    payload.extend_from_slice(&[0xa5; 10]);
    crafted_send_is_refused(7508, &payload, &["10 bytes"]);
}

/// Issue 12 part 2: a crafted primary has a block written and verified, then asks for a
/// read-back and sends a malformed message in the same breath, so the replica's loop ends on a
/// protocol error while its drive may still be reading the block back. The read-back buffer is
/// owned by the drive ring (not by the loop that returns), so the replica drains the ring and
/// exits in order with 2 instead of freeing memory the drive writes.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_protocol_error_during_read_back_exits_cleanly() {
    use peerpipe::protocol::{flags, Message, Status};
    tb::require_testbed();
    let (_, a1) = tb::addrs();
    let dev = tb::drive("data2").block;
    let addr = format!("{a1}:7506");
    let kid = open_replica(&addr, &dev);
    let bs = 65536u32;
    let mut p = CraftedPrimary::connect(&addr, &kid, bs as usize);
    p.hello(bs, 1, flags::VERIFY);
    let buf = p.buffers(&kid, 1)[0];
    // The advertised address is offset-based (a pool chunk's (index + 1) << 32 plus the
    // buffer's offset in it), not the replica's virtual address.
    let raddr = buf.0;
    assert!(
        (1..4096).contains(&(raddr >> 32)) && (raddr & 0xffff_ffff) < 64 << 20,
        "advertised address {raddr:#x} looks like a virtual address"
    );
    // Protocol version 3: the BlockSent invalidates the window the block went through.
    p.write_block(0, bs, buf, Some(buf.1));
    loop {
        match p.next(&kid) {
            Message::BlockWritten { seq: 0, status } => {
                assert_eq!(status, Status::Ok);
                break;
            }
            Message::BufferReady { .. } => {}
            m => panic!("unexpected {m:?}"),
        }
    }
    // The read-back request, then at once a message with an unknown type byte (sent raw).
    let mut bad = Message::Fin {
        blocks: 0,
        bytes: 0,
    }
    .encode();
    bad[5] = 0x77;
    p.conn
        .post_send(&[
            peerpipe::rdma::SendRequest::send_inline(
                1003,
                &Message::VerifyRequest { seq: 0 }.encode(),
            ),
            peerpipe::rdma::SendRequest::send_inline(1004, &bad),
        ])
        .unwrap();
    let o = kid.finish(Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}", tb::text(&o));
    assert!(err.contains("protocol error"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Protocol version 3: a replica never invalidates a window itself (on 6.12 rxe a LOCAL_INV of
/// a window that a peer's SEND_WITH_INV invalidated too dereferences NULL in
/// `rxe_invalidate_mw` and panics the kernel, and a crafted primary could race the two). So a
/// block whose `BlockSent` left its window open (a plain SEND, or a SEND_WITH_INV of another
/// block's key) is a protocol error: the primary gets an abort, the replica exits 2 naming
/// the block and the rule, and nothing of the block reaches the drive.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_refuses_a_block_sent_that_did_not_invalidate() {
    use peerpipe::protocol::{Message, Status};
    tb::require_testbed();
    let (_, a1) = tb::addrs();
    let dev = tb::drive("data2").block;
    let bs = 65536u32;
    for (port, other_key) in [(7509, false), (7510, true)] {
        let case = if other_key {
            "SEND_WITH_INV of block 1's key"
        } else {
            "plain SEND"
        };
        zero(&dev, 1);
        let addr = format!("{a1}:{port}");
        let kid = open_replica(&addr, &dev);
        let mut p = CraftedPrimary::connect(&addr, &kid, bs as usize);
        p.hello(bs, 2, 0);
        let bufs = p.buffers(&kid, 2);
        p.write_block(0, bs, bufs[0], other_key.then_some(bufs[1].1));
        // The replica's abort names the violation (protocol error code 12), then it hangs up.
        loop {
            match p.next(&kid) {
                Message::Abort { status, .. } => {
                    assert_eq!(status, Status::Protocol(12), "{case}");
                    break;
                }
                Message::BufferReady { .. } => {}
                m => panic!("{case}: unexpected {m:?}\n{}", kid.so_far()),
            }
        }
        let o = kid.finish(Duration::from_secs(60));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{case}: {}", tb::text(&o));
        for want in [
            "protocol error",
            "BlockSent seq 0 did not invalidate its window",
            "SEND_WITH_INV",
        ] {
            assert!(err.contains(want), "{case}: no {want:?} in: {err}");
        }
        assert!(!err.contains("panicked"), "{case}: {err}");
        assert!(
            read_range(&dev, 0, 2 * u64::from(bs))
                .iter()
                .all(|&b| b == 0),
            "{case}: the refused block reached the drive"
        );
    }
}
