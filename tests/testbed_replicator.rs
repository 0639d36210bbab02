//! Testbed tests of `examples/replicator.rs`: real NVMe drives, real rxe RDMA, real p2pmem.
//! Run with `cargo xtask test --vm-only -- replicator`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use peerpipe_testbed as tb;

fn bin() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/examples/replicator
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/replicator");
    assert!(
        p.exists(),
        "{} missing: build the examples (cargo test builds them)",
        p.display()
    );
    p
}

fn fill_random(dev: &Path, mib: u32) {
    let o = tb::run(
        Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", dev.display()))
            .args([
                "bs=1M",
                &format!("count={mib}"),
                "oflag=direct",
                "status=none",
            ]),
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "{}", tb::text(&o));
}

fn zero(dev: &Path, mib: u32) {
    let o = tb::run(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", dev.display()))
            .args([
                "bs=1M",
                &format!("count={mib}"),
                "oflag=direct",
                "status=none",
            ]),
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "{}", tb::text(&o));
}

fn read_range(dev: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(dev).expect("open drive");
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len as usize];
    f.read_exact(&mut v).unwrap();
    v
}

fn replica(listen: &str, target: &Path, bufs: &str) -> std::process::Child {
    let c = tb::spawn(
        Command::new(bin())
            .args(["replica", "--listen", listen, "--target"])
            .arg(target)
            .args(["--buffers", bufs, "--timeout", "30"]),
    );
    std::thread::sleep(Duration::from_millis(1500));
    c
}

fn primary(src: &Path, replicas: &[&str], extra: &[&str], timeout: Duration) -> Output {
    let (a0, _) = tb::addrs();
    let mut cmd = Command::new(bin());
    cmd.args(["primary", "--source"])
        .arg(src)
        .args(["--bind", &a0]);
    for r in replicas {
        cmd.args(["--replica", r]);
    }
    cmd.args(extra);
    tb::run(&mut cmd, timeout)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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
    assert!(out.contains("\"success\":true"), "{out}");
    assert!(out.contains(&format!("\"buffers\":\"{bufs}\"")), "{out}");
    // The zero-copy claim: no payload byte copied by the CPU.
    assert!(out.contains("\"payload_bytes_copied\":0,"), "{out}");
    let blocks = LEN.div_ceil(65536);
    assert!(
        out.contains(&format!(
            "\"verified_blocks\":{}",
            blocks * targets.len() as u64
        )),
        "{out}"
    );
    let want = read_range(&src, OFFSET, LEN);
    for (kid, dev) in kids {
        let ro = tb::wait(kid, Duration::from_secs(60), "replica");
        assert!(ro.status.success(), "{}", tb::text(&ro));
        let err = String::from_utf8_lossy(&ro.stderr);
        assert!(err.contains("payload bytes copied by the CPU: 0"), "{err}");
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

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_killed_replica_names_unreplicated_ranges() {
    tb::require_testbed();
    let (_, a1) = tb::addrs();
    let src = tb::drive("data1").block;
    let (d2, d3) = (tb::drive("data2").block, tb::drive("data3").block);
    let (r0, r1) = (format!("{a1}:7491"), format!("{a1}:7492"));
    let k0 = replica(&r0, &d2, "host");
    let mut k1 = replica(&r1, &d3, "host");
    let (a0, _) = tb::addrs();
    let p = tb::spawn(
        Command::new(bin())
            .args(["primary", "--source"])
            .arg(&src)
            .args(["--bind", &a0, "--replica", &r0, "--replica", &r1])
            .args([
                "--len",
                "16M",
                "--buffers",
                "host",
                "--json",
                "--timeout",
                "15",
            ]),
    );
    std::thread::sleep(Duration::from_secs(4));
    k1.kill().expect("kill replica 1");
    let _ = k1.wait();
    let o = tb::wait(p, Duration::from_secs(600), "primary");
    let out = stdout(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", tb::text(&o));
    assert!(out.contains("\"success\":false"), "{out}");
    assert!(err.contains("unreplicated: bytes"), "{err}");
    assert!(err.contains("replica 1"), "{err}");
    // The survivor exits cleanly.
    let ro = tb::wait(k0, Duration::from_secs(120), "surviving replica");
    assert!(ro.status.success(), "{}", tb::text(&ro));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_rejects_malformed_message_from_crafted_peer() {
    use peerpipe::rdma::{
        CompletionQueue, ConnParams, Connector, ProtectionDomain, QpInit, SendRequest,
    };
    tb::require_testbed();
    let (a0, a1) = tb::addrs();
    let dev = tb::drive("data2").block;
    let addr = format!("{a1}:7495");
    let kid = replica(&addr, &dev, "host");
    let c = Connector::resolve(
        Some(a0.parse().unwrap()),
        addr.parse().unwrap(),
        Duration::from_secs(5),
    )
    .expect("resolve");
    let pd = ProtectionDomain::new(c.context()).unwrap();
    let cq = CompletionQueue::new(c.context(), 16).unwrap();
    let conn = c
        .connect(&QpInit::new(&pd, &cq), &ConnParams::default())
        .expect("connect to the replica");
    // A hello with an unknown message type byte.
    let mut msg = peerpipe::protocol::Message::Fin {
        blocks: 0,
        bytes: 0,
    }
    .encode();
    msg[5] = 0x77;
    conn.post_send(&[SendRequest::send_inline(1, &msg)])
        .unwrap();
    let o = tb::wait(kid, Duration::from_secs(60), "replica");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}", tb::text(&o));
    assert!(
        err.contains("protocol error") && err.contains("unknown message type"),
        "{err}"
    );
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_rejects_unaligned_range_clearly() {
    tb::require_testbed();
    let src = tb::drive("data1").block;
    for (extra, want) in [
        (vec!["--offset", "100", "--len", "1M"], "round to"),
        (vec!["--len", "1000"], "round to"),
        (
            vec!["--block-size", "1000", "--len", "1M"],
            "block size 1000 is invalid",
        ),
        (vec!["--offset", "2G", "--len", "1M"], "beyond"),
    ] {
        let o = primary(&src, &["127.0.0.1:1"], &extra, Duration::from_secs(60));
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", tb::text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}
