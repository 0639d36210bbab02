//! Testbed test of `examples/rdma_bw.rs`'s perftest flags (`-a`, `-D`, `--report_gbits`, `-d`)
//! over the testbed's rxe pair; and host tests of its refusals.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use peerpipe_testbed as tb;

fn bin() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/examples/rdma_bw
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("examples/rdma_bw");
    assert!(p.exists(), "{} missing: build the examples", p.display());
    p
}

/// A server on rxe1's address on `port`, then the client with `args`; the client's output.
fn client(port: u16, args: &[&str]) -> std::process::Output {
    client_and_server(port, args, &[])
}

/// As [`client`], the server started with `server_args` too.
fn client_and_server(port: u16, args: &[&str], server_args: &[&str]) -> std::process::Output {
    let (a0, a1) = tb::addrs();
    let port = port.to_string();
    let mut server = tb::spawn_watched(
        Command::new(bin())
            .args(["--bind", &a1, "-p", &port])
            .args(server_args),
        "rdma_bw server",
    );
    server.wait_line("waiting for a client", Duration::from_secs(60));
    let o = tb::run(
        Command::new(bin())
            .args(args)
            .args(["-p", &port, "--source_ip", &a0, &a1]),
        Duration::from_secs(300),
    );
    drop(server);
    o
}

/// Data rows of the bandwidth table: (bytes, iterations, message rate in Mpps).
fn rows(out: &str) -> Vec<(u64, u64, f64)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [b, n, _peak, _avg, rate] => {
                    Some((b.parse().ok()?, n.parse().ok()?, rate.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_rdma_bw_all_sizes_duration_gbits_and_device_check() {
    tb::require_testbed();
    // -a: one row per size, 2 B .. 8 MiB, in Gb/s.
    let o = client(18601, &["-a", "-n", "5", "--report_gbits"]);
    assert!(o.status.success(), "{}", tb::text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("BW average[Gb/sec]"), "{out}");
    let r = rows(&out);
    let sizes: Vec<u64> = r.iter().map(|x| x.0).collect();
    assert_eq!(
        sizes,
        (1..=23).map(|k| 1u64 << k).collect::<Vec<_>>(),
        "{out}"
    );
    // (Small sizes print 0.00 Gb/s at two decimals: the message rate shows they ran.)
    assert!(r.iter().all(|x| x.1 >= 5 && x.2 > 0.0), "{out}");

    // -D 2: runs about two seconds, as many iterations as fit (a multiple of -Q).
    let t = std::time::Instant::now();
    let o = client(18602, &["-D", "2", "-s", "4096", "-Q", "10"]);
    assert!(o.status.success(), "{}", tb::text(&o));
    assert!(t.elapsed() >= Duration::from_secs(2), "-D 2 ended early");
    let out = String::from_utf8_lossy(&o.stdout);
    let r = rows(&out);
    assert_eq!(r.len(), 1, "{out}");
    assert!(r[0].1 >= 10 && r[0].1 % 10 == 0, "{out}");
    assert!(out.contains("BW average[MB/sec]"), "{out}");

    // -d names the device the address is on (rxe0 for rxe0's address), or fails clearly.
    let o = client(18603, &["-d", "rxe0", "-n", "5"]);
    assert!(o.status.success(), "-d rxe0: {}", tb::text(&o));
    let o = client(18604, &["-d", "mlx5_0", "-n", "5"]);
    assert!(!o.status.success(), "{}", tb::text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not mlx5_0"),
        "{}",
        tb::text(&o)
    );
}

/// `--mmap /dev/p2pmemN` (perftest's flag) puts both sides' buffers in p2pmem, as the
/// replicator bench needs for its p2p network bound; a file that is no p2pmem char device is
/// refused with the reason.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_rdma_bw_mmap_puts_the_buffers_in_p2pmem() {
    use peerpipe::p2p_alloc::{discover, SysRoot};
    tb::require_testbed();
    let dev = discover(&SysRoot::live()).expect("discover").remove(0);
    let chardev = dev.chardev.clone().expect("/dev/p2pmemN");
    let before = dev.available().expect("available");
    let mmap = format!("--mmap={}", chardev.display());
    let o = client_and_server(18605, &["-s", "65536", "-n", "50", &mmap], &[&mmap]);
    assert!(o.status.success(), "{}", tb::text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in p2pmem"), "{err}");
    let r = rows(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(r.len(), 1, "{}", tb::text(&o));
    assert_eq!((r[0].0, r[0].1), (65536, 50), "{}", tb::text(&o));
    // Both mappings went back to the provider when the two ended.
    let back = || {
        discover(&SysRoot::live())
            .expect("discover")
            .remove(0)
            .available()
            .unwrap()
    };
    let t = std::time::Instant::now();
    while back() != before && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(back(), before, "p2pmem not given back");

    let o = client(18606, &["-n", "5", "--mmap=/dev/null"]);
    assert!(!o.status.success(), "{}", tb::text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is no p2pmem char device"),
        "{}",
        tb::text(&o)
    );
}

#[test]
fn rdma_bw_refuses_flags_that_do_not_apply() {
    for args in [
        &["lat", "-D", "1", "10.0.0.1"][..],
        &["lat", "-a", "10.0.0.1"],
        &["-a"],
        &["--report_gbits"],
        &["-D", "0", "10.0.0.1"],
    ] {
        let o = Command::new(bin()).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", tb::text(&o));
    }
}
