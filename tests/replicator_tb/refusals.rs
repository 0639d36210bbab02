//! Refusals at the door, each with a clear reason: a primary's unaligned or out-of-range
//! range, a hello outside the replica's bounds, unauthenticated primaries, a claimed block
//! device as a target, and exhausted p2pmem (without disturbing a run that holds its own).

use std::process::Command;
use std::time::Duration;

use peerpipe_testbed as tb;

use super::support::*;

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

/// p2pmem exhaustion: with most of the CMB held elsewhere, a replica or primary asking for
/// p2p buffers fails at start with a clear error naming the shortage, and a run that already
/// holds its p2pmem is not disturbed by a later exhaustion (its data is verified).
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_p2pmem_exhaustion_is_a_clear_error() {
    use peerpipe::p2p_alloc::{discover, SysRoot};
    tb::require_testbed();
    let (_, a1) = tb::addrs();
    let provider = || discover(&SysRoot::live()).expect("discover").remove(0);
    let chardev = provider().chardev.expect("/dev/p2pmemN");
    let avail = || provider().available().expect("available");
    // At start: all but 1 MiB of the CMB is held by someone else.
    {
        let _hold = tb::P2pMap::new(&chardev, (avail() - (1 << 20)) as usize);
        let o = tb::run(
            Command::new(bin())
                .args(["replica", "--listen", &format!("{a1}:7507"), "--target"])
                .arg(tb::drive("data2").block)
                .args(["--buffers", "p2p", "--insecure-any-primary"]),
            Duration::from_secs(60),
        );
        assert_eq!(o.status.code(), Some(2), "{}", tb::text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("out of p2pmem"), "{err}");
    }
    // While a replica holds its p2pmem: the rest is taken, a p2p primary is refused clearly,
    // and a host-buffer primary still replicates into the p2p replica, verified.
    let src = tb::drive("data1").block;
    let dst = tb::drive("data2").block;
    fill_random(&src, 4);
    zero(&dst, 4);
    let addr = format!("{a1}:7508");
    let kid = replica(&addr, &dst, "p2p");
    let _hold = tb::P2pMap::new(&chardev, avail() as usize);
    let o = primary(
        &src,
        &[&addr],
        &["--len", "2M", "--buffers", "p2p"],
        Duration::from_secs(60),
    );
    assert_eq!(o.status.code(), Some(2), "{}", tb::text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("out of p2pmem"),
        "{}",
        tb::text(&o)
    );
    let o = primary(
        &src,
        &[&addr],
        &["--len", "2M", "--buffers", "host", "--verify", "--json"],
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", tb::text(&o));
    assert_eq!(
        summary(&stdout(&o))["verified_blocks"],
        32,
        "{}",
        stdout(&o)
    );
    let ro = kid.finish(Duration::from_secs(60));
    assert!(ro.status.success(), "{}", tb::text(&ro));
    assert!(read_range(&dst, 0, 2 << 20) == read_range(&src, 0, 2 << 20));
}

/// Who may write to a replica: a primary without the secret, with another secret, or from an
/// address not allowed is refused with a clear reason on both sides, and the replica goes on
/// listening; then the rightful primary replicates through the same replica process.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_refuses_unauthenticated_primaries() {
    tb::require_testbed();
    let (a0, a1) = tb::addrs();
    let src = tb::drive("data1").block;
    let dst = tb::drive("data2").block;
    let addr = format!("{a1}:7503");
    let mut kid = replica(&addr, &dst, "host");
    let other = std::env::temp_dir().join("peerpipe-other-secret");
    std::fs::write(&other, "another-secret-fedcba9876543210").unwrap();
    let other = other.to_str().unwrap().to_string();
    let try_primary = |bind: &str, secret: Option<&str>| {
        let mut cmd = Command::new(bin());
        cmd.args(["replicate", "--source"]).arg(&src).args([
            "--bind",
            bind,
            "--replica",
            &addr,
            "--len",
            "1M",
            "--buffers",
            "host",
            "--timeout",
            "10",
        ]);
        if let Some(f) = secret {
            cmd.args(["--secret-file", f]);
        }
        tb::run(&mut cmd, Duration::from_secs(120))
    };
    for (bind, secret, primary_says, replica_says) in [
        (
            a0.as_str(),
            None,
            "requires a proof of its shared secret",
            "offered no proof",
        ),
        (
            a0.as_str(),
            Some(other.as_str()),
            "proof of the shared secret is wrong",
            "hung up on",
        ),
        (
            a1.as_str(),
            Some(secret_file().as_str()),
            "does not allow this primary's address",
            "not an allowed primary",
        ),
    ] {
        let o = try_primary(bind, secret);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{bind} {secret:?}: {}",
            tb::text(&o)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(primary_says), "{bind} {secret:?}: {err}");
        kid.wait_line(replica_says, Duration::from_secs(60));
    }
    // The replica is still listening: the rightful primary gets through.
    let o = try_primary(&a0, Some(&secret_file()));
    assert!(o.status.success(), "{}", tb::text(&o));
    let ro = kid.finish(Duration::from_secs(60));
    assert!(ro.status.success(), "{}", tb::text(&ro));
}

/// A replica bounds what it accepts (--offset/--len): a hello outside is refused before
/// anything is written.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_refuses_a_range_outside_its_bounds() {
    tb::require_testbed();
    let (_, a1) = tb::addrs();
    let src = tb::drive("data1").block;
    let dst = tb::drive("data2").block;
    fill_random(&src, 2);
    zero(&dst, 4);
    let addr = format!("{a1}:7504");
    let kid = replica_with(
        &[
            "--listen",
            &addr,
            "--target",
            dst.to_str().unwrap(),
            "--buffers",
            "host",
            "--offset",
            "2M",
            "--len",
            "1M",
        ],
        "bounded replica",
    );
    let o = primary(
        &src,
        &[&addr],
        &["--len", "1M", "--buffers", "host", "--timeout", "10"],
        Duration::from_secs(120),
    );
    let ro = kid.finish(Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1), "{}", tb::text(&o));
    assert_eq!(ro.status.code(), Some(2), "{}", tb::text(&ro));
    let rerr = String::from_utf8_lossy(&ro.stderr);
    assert!(
        rerr.contains("outside the range this replica accepts"),
        "{rerr}"
    );
    assert!(
        read_range(&dst, 0, 4 << 20).iter().all(|&b| b == 0),
        "bytes were written"
    );
}

/// A block device that is in use (here: held open O_EXCL by the test, as a mount would) is
/// refused as a replica target with a clear error.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_replicator_refuses_a_claimed_block_device() {
    use std::os::unix::fs::OpenOptionsExt;
    tb::require_testbed();
    let (_, a1) = tb::addrs();
    let d = tb::drive("data3");
    let _claim = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&d.block)
        .expect("claim the block device");
    for target in [&d.block, &d.ng] {
        let o = tb::run(
            Command::new(bin())
                .args(["replica", "--listen", &format!("{a1}:7505"), "--target"])
                .arg(target)
                .args(["--buffers", "host", "--insecure-any-primary"]),
            Duration::from_secs(60),
        );
        assert_eq!(o.status.code(), Some(2), "{}", tb::text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("is in use"), "{}: {err}", target.display());
    }
}
