//! Shared helpers of the replicator's testbed tests: the `peerpipe` binary, drive setup
//! (fill, zero, read back), the shared secret, spawning replicas and primaries, and the
//! primary's JSON summary.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use peerpipe_testbed as tb;

/// The `peerpipe` binary; tests run its `replicate` (primary) and `replica` commands.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_peerpipe"))
}

/// The primary's `--output-format=json` summary (the last line of its stdout), parsed.
pub fn summary(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary in {stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// Overwrites the first `mib` MiB of `dev` from `input` (/dev/urandom, /dev/zero) with O_DIRECT.
pub fn dd_from(input: &str, dev: &Path, mib: u32) {
    let o = tb::run(
        Command::new("dd")
            .arg(format!("if={input}"))
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

pub fn fill_random(dev: &Path, mib: u32) {
    dd_from("/dev/urandom", dev, mib);
}

pub fn zero(dev: &Path, mib: u32) {
    dd_from("/dev/zero", dev, mib);
}

pub fn read_range(dev: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(dev).expect("open drive");
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len as usize];
    f.read_exact(&mut v).unwrap();
    v
}

/// How long a starting replica may take to print its listening line (a hang bound only: the
/// tests wait for the line itself, however fast the machine).
pub const START_BOUND: Duration = Duration::from_secs(120);

/// The shared secret every test primary and replica use (in the VM's writable /tmp).
pub fn secret_file() -> String {
    let p = std::env::temp_dir().join("peerpipe-test-secret");
    if !p.exists() {
        std::fs::write(&p, "testbed-secret-0123456789abcdef\n").expect("write secret");
    }
    p.to_str().expect("utf-8").to_string()
}

/// Starts `peerpipe replica` with `args` and returns once it prints that it listens. Unless
/// `args` say who may connect, the test primary's address and the shared secret are allowed.
pub fn replica_with(args: &[&str], what: &str) -> tb::Watched {
    let mut cmd = Command::new(bin());
    cmd.arg("replica").args(args);
    let says_who = args.iter().any(|a| {
        matches!(
            *a,
            "--allow-primary" | "--secret-file" | "--insecure-any-primary"
        )
    });
    if !says_who {
        let (a0, _) = tb::addrs();
        cmd.args(["--allow-primary", &a0, "--secret-file", &secret_file()]);
    }
    let mut c = tb::spawn_watched(&mut cmd, what);
    c.wait_line("replica: listening on", START_BOUND);
    c
}

pub fn replica(listen: &str, target: &Path, bufs: &str) -> tb::Watched {
    let target = target.to_str().expect("utf-8 path");
    replica_with(
        &[
            "--listen",
            listen,
            "--target",
            target,
            "--buffers",
            bufs,
            "--timeout",
            "30",
            "--output-format=json",
        ],
        &format!("replica {listen}"),
    )
}

/// A replica with host buffers that takes the first peer as its primary (for crafted peers,
/// which do not authenticate).
pub fn open_replica(listen: &str, target: &Path) -> tb::Watched {
    let target = target.to_str().expect("utf-8 path");
    replica_with(
        &[
            "--listen",
            listen,
            "--target",
            target,
            "--buffers",
            "host",
            "--insecure-any-primary",
        ],
        &format!("replica {listen}"),
    )
}

pub fn primary(src: &Path, replicas: &[&str], extra: &[&str], timeout: Duration) -> Output {
    let (a0, _) = tb::addrs();
    let mut cmd = Command::new(bin());
    cmd.args(["replicate", "--source"])
        .arg(src)
        .args(["--bind", &a0]);
    for r in replicas {
        cmd.args(["--replica", r]);
    }
    if !extra.contains(&"--secret-file") {
        cmd.args(["--secret-file", &secret_file()]);
    }
    cmd.args(extra);
    tb::run(&mut cmd, timeout)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
