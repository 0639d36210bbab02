//! rping interop (examples/rping.rs against rdma-core's rping, both ways) and a peer killed
//! mid-transfer. Needs `cargo build --example rping` (cargo test builds examples).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn ours() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/examples/rping");
    assert!(
        p.exists(),
        "{} missing: run `cargo build --example rping` first",
        p.display()
    );
    p
}

/// The data line rping prints for ping `n` with size `size`.
fn expected_line(n: u64, size: usize) -> String {
    let mut s = format!("rdma-ping-{n}: ").into_bytes();
    let mut c = 65 + (n % 58) as u8;
    while s.len() < size - 1 {
        s.push(c);
        c = if c >= 122 { 65 } else { c + 1 };
    }
    String::from_utf8(s).unwrap()
}

fn lines_with<'a>(text: &'a str, prefix: &'a str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .collect()
}

fn check_pings(text: &str, prefix: &str, count: u64, size: usize) {
    let got = lines_with(text, prefix);
    assert_eq!(got.len() as u64, count, "{prefix} lines in:\n{text}");
    for (n, line) in got.iter().enumerate() {
        assert_eq!(*line, expected_line(n as u64, size), "ping {n}");
    }
}

fn pair_run(server: &mut Command, client: &mut Command) -> (String, String) {
    let srv = peerpipe_testbed::spawn(server);
    std::thread::sleep(Duration::from_millis(1500));
    let cli = peerpipe_testbed::run(client, Duration::from_secs(120));
    let cli_text = peerpipe_testbed::text(&cli);
    let srv = peerpipe_testbed::wait(srv, Duration::from_secs(20), "rping server");
    let srv_text = peerpipe_testbed::text(&srv);
    assert!(
        cli.status.success(),
        "client failed:\n{cli_text}\nserver:\n{srv_text}"
    );
    assert!(
        srv.status.success(),
        "server failed:\n{srv_text}\nclient:\n{cli_text}"
    );
    (srv_text, cli_text)
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn rping_our_server_real_client() {
    peerpipe_testbed::require_testbed();
    let (a0, a1) = peerpipe_testbed::addrs();
    let (s, c) = pair_run(
        Command::new(ours()).args(["-s", "-v", "-a", &a1, "-p", "7201"]),
        Command::new("rping").args([
            "-c", "-v", "-V", "-C", "10", "-I", &a0, "-a", &a1, "-p", "7201",
        ]),
    );
    check_pings(&c, "ping data: ", 10, 64);
    check_pings(&s, "server ping data: ", 10, 64);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn rping_real_server_our_client() {
    peerpipe_testbed::require_testbed();
    let (a0, a1) = peerpipe_testbed::addrs();
    let (s, c) = pair_run(
        Command::new("rping").args(["-s", "-v", "-S", "100", "-a", &a1, "-p", "7202"]),
        Command::new(ours()).args([
            "-c", "-v", "-V", "-C", "10", "-S", "100", "-I", &a0, "-a", &a1, "-p", "7202",
        ]),
    );
    check_pings(&c, "ping data: ", 10, 100);
    check_pings(&s, "server ping data: ", 10, 100);
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn rping_ours_both_sides() {
    peerpipe_testbed::require_testbed();
    let (a0, a1) = peerpipe_testbed::addrs();
    let (s, c) = pair_run(
        Command::new(ours()).args(["-s", "-v", "-a", &a1, "-p", "7203"]),
        Command::new(ours()).args(["-c", "-vV", "-C", "5", "-I", &a0, "-a", &a1, "-p7203"]),
    );
    check_pings(&c, "ping data: ", 5, 64);
    check_pings(&s, "server ping data: ", 5, 64);
}

fn kill(child: &mut std::process::Child) {
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn peer_killed_mid_transfer_client_gets_error() {
    peerpipe_testbed::require_testbed();
    let (a0, a1) = peerpipe_testbed::addrs();
    let mut srv = peerpipe_testbed::spawn(
        Command::new("rping").args(["-s", "-S", "60000", "-a", &a1, "-p", "7204"]),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let cli = peerpipe_testbed::spawn(Command::new(ours()).args([
        "-c", "-V", "-C", "0", "-S", "60000", "-I", &a0, "-a", &a1, "-p", "7204",
    ]));
    std::thread::sleep(Duration::from_secs(3));
    kill(&mut srv);
    let t = Instant::now();
    let out = peerpipe_testbed::wait(cli, Duration::from_secs(30), "surviving rping client");
    let text = peerpipe_testbed::text(&out);
    let _ = srv.wait();
    assert!(
        !out.status.success(),
        "client must report the vanished peer:\n{text}"
    );
    assert!(
        text.contains("disconnected")
            || text.contains("completed with")
            || text.contains("timed out"),
        "typed error expected:\n{text}"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn peer_killed_mid_transfer_server_notices() {
    peerpipe_testbed::require_testbed();
    let (a0, a1) = peerpipe_testbed::addrs();
    let srv = peerpipe_testbed::spawn(
        Command::new(ours()).args(["-s", "-S", "60000", "-a", &a1, "-p", "7205"]),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut cli = peerpipe_testbed::spawn(Command::new("rping").args([
        "-c", "-C", "0", "-S", "60000", "-I", &a0, "-a", &a1, "-p", "7205",
    ]));
    std::thread::sleep(Duration::from_secs(3));
    kill(&mut cli);
    let _ = cli.wait();
    let out = peerpipe_testbed::wait(srv, Duration::from_secs(30), "surviving rping server");
    let text = peerpipe_testbed::text(&out);
    assert!(
        text.contains("DISCONNECT"),
        "server noticed the vanished client:\n{text}"
    );
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn rping_persistent_server_serves_several_real_clients() {
    peerpipe_testbed::require_testbed();
    let (a0, a1) = peerpipe_testbed::addrs();
    let mut srv = peerpipe_testbed::spawn(
        Command::new(ours()).args(["-s", "-P", "-v", "-a", &a1, "-p", "7205"]),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let client = |count: &str| {
        let mut c = Command::new("rping");
        c.args([
            "-c", "-v", "-V", "-C", count, "-I", &a0, "-a", &a1, "-p", "7205",
        ]);
        c
    };
    // one after the other, then two at once: -P keeps accepting and serves each on its own
    for count in [3u64, 4] {
        let o = peerpipe_testbed::run(&mut client(&count.to_string()), Duration::from_secs(60));
        assert!(o.status.success(), "{}", peerpipe_testbed::text(&o));
        check_pings(&peerpipe_testbed::text(&o), "ping data: ", count, 64);
    }
    let (mut c1, mut c2) = (client("2"), client("2"));
    let j1 = std::thread::spawn(move || peerpipe_testbed::run(&mut c1, Duration::from_secs(60)));
    let o2 = peerpipe_testbed::run(&mut c2, Duration::from_secs(60));
    let o1 = j1.join().unwrap();
    for o in [&o1, &o2] {
        assert!(o.status.success(), "{}", peerpipe_testbed::text(o));
        check_pings(&peerpipe_testbed::text(o), "ping data: ", 2, 64);
    }
    // still running after all of them: a persistent server only ends when killed
    assert!(srv.try_wait().unwrap().is_none(), "-P server exited");
    kill(&mut srv);
    let out = peerpipe_testbed::wait(srv, Duration::from_secs(10), "rping -P server");
    let text = peerpipe_testbed::text(&out);
    assert_eq!(
        lines_with(&text, "server ping data: ").len(),
        3 + 4 + 2 + 2,
        "{text}"
    );
}
