//! Happy paths, verified end to end: host and p2p buffers to one and two replicas, NVMe
//! passthrough on both sides, and the busy-polling wait; each checks the zero-copy count and
//! the bytes on the replica's drive (and nothing written around the range).

use std::path::{Path, PathBuf};
use std::time::Duration;

use peerpipe_testbed as tb;

use super::support::*;

/// Offset not a multiple of the block size and a short final block (12 KiB of 64 KiB).
const OFFSET: u64 = 3 * 4096;
const LEN: u64 = (2 << 20) + 12288;

fn replicate_and_check(bufs: &str, targets: &[&str], port0: u16) {
    let (_, a1) = tb::addrs();
    let src = tb::drive("data1").block;
    fill_random(&src, 4);
    let mut kids = Vec::new();
    let mut addrs = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let dev = tb::drive(t).block;
        zero(&dev, 4);
        let addr = format!("{a1}:{}", port0 + i as u16);
        kids.push((replica(&addr, &dev, bufs), dev));
        addrs.push(addr);
    }
    let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let o = primary(
        &src,
        &addr_refs,
        &[
            "--offset",
            &OFFSET.to_string(),
            "--len",
            &LEN.to_string(),
            "--buffers",
            bufs,
            "--verify",
            "--json",
        ],
        Duration::from_secs(600),
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{}", tb::text(&o));
    assert_eq!(summary(&out)["success"], true, "{out}");
    assert_eq!(summary(&out)["buffers"], bufs, "{out}");
    // The zero-copy claim: no payload byte copied by the CPU.
    assert_eq!(summary(&out)["payload_bytes_copied"], 0, "{out}");
    let blocks = LEN.div_ceil(65536);
    assert_eq!(
        summary(&out)["verified_blocks"],
        blocks * targets.len() as u64,
        "{out}"
    );
    let want = read_range(&src, OFFSET, LEN);
    for (kid, dev) in kids {
        let ro = kid.finish(Duration::from_secs(60));
        assert!(ro.status.success(), "{}", tb::text(&ro));
        let err = String::from_utf8_lossy(&ro.stderr);
        assert!(err.contains("payload bytes copied by the CPU: 0"), "{err}");
        // The replica's own --output-format=json summary agrees.
        let rs = summary(&stdout(&ro));
        assert_eq!(rs["end"], "fin", "{rs}");
        assert_eq!(rs["blocks_written"], blocks, "{rs}");
        assert_eq!(rs["bytes_written"], LEN, "{rs}");
        assert_eq!(rs["payload_bytes_copied"], 0, "{rs}");
        // Protocol version 3: every block's window died by the primary's SEND_WITH_INV
        // (rxe reports it, see rdma::cq; a replica never invalidates one itself, it would
        // have refused the block); the replica's acks and advertisements ready at once
        // shared SENDs.
        assert_eq!(rs["windows_invalidated_by_primary"], blocks, "{rs}");
        assert!(rs.get("windows_invalidated_locally").is_none(), "{rs}");
        let (msgs, sends) = (
            rs["control_messages"].as_u64().unwrap(),
            rs["control_sends"].as_u64().unwrap(),
        );
        assert!(msgs >= 2 * blocks && sends < msgs, "{rs}");
        assert!(
            read_range(&dev, OFFSET, LEN) == want,
            "{} differs",
            dev.display()
        );
        // Nothing written around the range.
        assert!(read_range(&dev, 0, OFFSET).iter().all(|&b| b == 0));
        assert!(read_range(&dev, OFFSET + LEN, 65536)
            .iter()
            .all(|&b| b == 0));
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_one_replica_verify_host() {
    tb::require_testbed();
    replicate_and_check("host", &["data2"], 7481);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_one_replica_verify_p2p() {
    tb::require_testbed();
    replicate_and_check("p2p", &["data2"], 7482);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_two_replicas_verify_p2p() {
    tb::require_testbed();
    replicate_and_check("p2p", &["data2", "data3"], 7483);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_two_replicas_verify_host() {
    tb::require_testbed();
    replicate_and_check("host", &["data2", "data3"], 7485);
}

// ---------------------------------------------------------------- engine: passthrough, wait modes

/// Reads `len` bytes at `offset` with O_DIRECT, so data written by NVMe passthrough (which
/// bypasses the block device's page cache) is never answered from stale cached pages.
fn read_direct(dev: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open drive O_DIRECT");
    let mut buf = peerpipe::uring::AlignedBuf::new(len as usize);
    f.read_exact_at(buf.as_mut_slice(), offset)
        .expect("O_DIRECT read");
    buf.as_slice().to_vec()
}

/// Replicates OFFSET/LEN (a short final block) of data1 to data2, addressing both drives by
/// the paths `pick` chooses, with `extra` options on both sides; verifies, checks the
/// zero-copy count and the bytes on data2, and returns (primary stdout, replica stderr).
fn replicate_with(
    pick: fn(&tb::Drive) -> PathBuf,
    bufs: &str,
    extra: &[&str],
    port: u16,
) -> (String, String) {
    let (_, a1) = tb::addrs();
    let (d1, d2) = (tb::drive("data1"), tb::drive("data2"));
    fill_random(&d1.block, 4);
    zero(&d2.block, 4);
    let addr = format!("{a1}:{port}");
    let target = pick(&d2);
    let mut rargs = vec![
        "--listen",
        &addr,
        "--target",
        target.to_str().expect("utf-8 path"),
        "--buffers",
        bufs,
        "--timeout",
        "30",
    ];
    rargs.extend(extra);
    let kid = replica_with(&rargs, "replica");
    let mut args = vec![
        "--offset".to_string(),
        OFFSET.to_string(),
        "--len".into(),
        LEN.to_string(),
        "--buffers".into(),
        bufs.into(),
        "--verify".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = primary(&pick(&d1), &[&addr], &args, Duration::from_secs(600));
    let out = stdout(&o);
    let perr = String::from_utf8_lossy(&o.stderr).into_owned();
    let ro = kid.finish(Duration::from_secs(60));
    let rerr = String::from_utf8_lossy(&ro.stderr).into_owned();
    assert!(
        o.status.success(),
        "{}\nreplica: {}",
        tb::text(&o),
        tb::text(&ro)
    );
    assert_eq!(summary(&out)["success"], true, "{out}");
    assert_eq!(summary(&out)["buffers"], bufs, "{out}");
    assert_eq!(summary(&out)["payload_bytes_copied"], 0, "{out}");
    let blocks = LEN.div_ceil(65536);
    assert_eq!(summary(&out)["verified_blocks"], blocks, "{out}");
    assert!(ro.status.success(), "{}", tb::text(&ro));
    assert!(
        rerr.contains("payload bytes copied by the CPU: 0"),
        "{rerr}"
    );
    assert!(rerr.contains("write cache: "), "{rerr}");
    let want = read_direct(&d1.block, OFFSET, LEN);
    assert!(
        read_direct(&d2.block, OFFSET, LEN) == want,
        "data2 differs from data1"
    );
    // Nothing written around the range.
    assert!(read_direct(&d2.block, 0, OFFSET).iter().all(|&b| b == 0));
    assert!(read_direct(&d2.block, OFFSET + LEN, 65536)
        .iter()
        .all(|&b| b == 0));
    eprintln!("primary: {perr}\nreplica: {rerr}");
    (out, format!("{perr}\n{rerr}"))
}

/// NVMe passthrough on both sides (`/dev/ngXn1` of data1 -> data2), p2pmem buffers, the
/// default event-driven wait: verified, zero-copy count 0, and the backend and the
/// write-cache decision (from Identify Controller) reported at start.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_nvme_passthrough_verify_p2p() {
    tb::require_testbed();
    let (out, err) = replicate_with(|d| d.ng.clone(), "p2p", &[], 7501);
    assert_eq!(summary(&out)["wait"], "events", "{out}");
    assert!(err.contains("wait events, busy poll 200 us"), "{err}");
    assert!(err.contains("source /dev/ng"), "{err}");
    assert!(err.contains("(nvme passthrough)"), "{err}");
    assert!(err.contains("Identify Controller VWC"), "{err}");
    assert!(err.contains("via /dev/p2pmem0"), "start line: {err}");
    assert!(!err.contains("Some("), "debug formatting leaked: {err}");
}

/// The event-driven wait with no polling at all (`--busy-poll 0` on both sides: every idle
/// spell sleeps at once), on block devices, host buffers.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_events_without_busy_poll_verify_host() {
    tb::require_testbed();
    let (out, err) = replicate_with(|d| d.block.clone(), "host", &["--busy-poll", "0"], 7520);
    assert_eq!(summary(&out)["wait"], "events", "{out}");
    // Both start lines say so (no "busy poll" in either).
    assert_eq!(err.matches(", wait events\n").count(), 2, "{err}");
}

/// The busy-polling wait (`--wait busy` on both sides) on block devices, host buffers.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_wait_busy_verify_host() {
    tb::require_testbed();
    let (out, err) = replicate_with(|d| d.block.clone(), "host", &["--wait", "busy"], 7502);
    assert_eq!(summary(&out)["wait"], "busy", "{out}");
    assert!(err.contains("block device, O_DIRECT"), "{err}");
    // The decision for a block device comes from sysfs queue/write_cache.
    assert!(err.contains("/queue/write_cache: write "), "{err}");
}
