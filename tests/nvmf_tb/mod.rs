//! Helpers shared by the testbed tests of `peerpipe target` (tests/testbed_nvmf*.rs): the
//! target process, the kernel nvme-rdma host (nvme-cli), fio and dd.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use peerpipe_testbed as tb;

pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a1";
pub const OTHER_HOSTNQN: &str =
    "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000b2";

pub fn nqn(test: &str) -> String {
    format!("nqn.2026-11.io.peerpipe:{test}")
}

/// Starts `peerpipe target` on rxe1's address and waits for its listening line.
pub fn start_target(port: u16, nqn: &str, ns: &Path, extra: &[&str]) -> tb::Watched {
    let (_, a1) = tb::addrs();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peerpipe"));
    cmd.args([
        "target",
        "--listen",
        &format!("{a1}:{port}"),
        "--nqn",
        nqn,
        "--ns",
    ])
    .arg(ns)
    .arg("--verbose")
    .args(extra);
    let mut t = tb::spawn_watched(&mut cmd, "peerpipe target");
    t.wait_line("target: listening on", Duration::from_secs(60));
    t
}

/// SIGTERM, then the exit within a bound; returns the output.
pub fn stop_target(t: tb::Watched) -> Output {
    let o = tb::run(
        Command::new("kill").args(["-TERM", &t.id().to_string()]),
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "{}", tb::text(&o));
    t.finish(Duration::from_secs(90))
}

pub fn nvme(args: &[&str]) -> Output {
    tb::run(Command::new("nvme").args(args), Duration::from_secs(120))
}

pub fn fabric_args(port: u16) -> Vec<String> {
    let (a0, a1) = tb::addrs();
    ["-t", "rdma", "-a", &a1, "-s", &port.to_string(), "-w", &a0]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A connected kernel host controller; disconnected on drop so a failing test leaves no
/// controller behind.
pub struct Host {
    pub nqn: String,
    pub ctrl: PathBuf,
    pub dev: PathBuf,
}

impl Host {
    pub fn connect(port: u16, nqn: &str, hostnqn: &str) -> Result<Host, Output> {
        Host::connect_with(port, nqn, hostnqn, &[])
    }

    /// [`Host::connect`] with more `nvme connect` options.
    pub fn connect_with(
        port: u16,
        nqn: &str,
        hostnqn: &str,
        extra: &[&str],
    ) -> Result<Host, Output> {
        let mut args: Vec<String> = vec!["connect".into()];
        args.extend(fabric_args(port));
        for a in [
            "-n",
            nqn,
            "-q",
            hostnqn,
            "--ctrl-loss-tmo=5",
            "--reconnect-delay=1",
        ] {
            args.push(a.into());
        }
        // Two live hosts need two host IDs too: the kernel refuses a second host NQN with
        // the host ID of another ("found same hostid ... but different hostnqn", EINVAL), and
        // nvme-cli's default host ID is one per machine.
        if let Some((_, uuid)) = hostnqn.split_once(":uuid:") {
            args.extend(["-I".to_string(), uuid.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = nvme(&refs);
        if !o.status.success() {
            return Err(o);
        }
        let (ctrl, dev) = wait_fabrics_namespace(nqn);
        Ok(Host {
            nqn: nqn.to_string(),
            ctrl,
            dev,
        })
    }

    pub fn disconnect(self) -> Output {
        let o = nvme(&["disconnect", "-n", &self.nqn]);
        std::mem::forget(self);
        o
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = nvme(&["disconnect", "-n", &self.nqn]);
    }
}

/// The controller (/sys/class/nvme/nvmeX) whose subsysnqn is `nqn` and its namespace block
/// device, once the kernel has created it.
pub fn wait_fabrics_namespace(nqn: &str) -> (PathBuf, PathBuf) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        for e in std::fs::read_dir("/sys/class/nvme")
            .expect("/sys/class/nvme")
            .flatten()
        {
            let c = e.path();
            let sub = std::fs::read_to_string(c.join("subsysnqn")).unwrap_or_default();
            if sub.trim() != nqn {
                continue;
            }
            let ctrl = e.file_name().to_string_lossy().into_owned();
            let ns = std::fs::read_dir(&c).ok().and_then(|d| {
                d.flatten()
                    .map(|x| x.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with(&ctrl) && n[ctrl.len()..].starts_with('n'))
            });
            if let Some(ns) = ns {
                let dev = Path::new("/dev").join(ns);
                if dev.exists() {
                    return (c, dev);
                }
            }
        }
        assert!(Instant::now() < end, "no namespace of {nqn} appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The hex value of `field` in nvme-cli's `name : value` output.
pub fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name} in\n{out}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn dd(args: &[&str]) {
    let o = tb::run(
        Command::new("dd").args(args).arg("status=none"),
        Duration::from_secs(180),
    );
    assert!(o.status.success(), "dd {args:?}: {}", tb::text(&o));
}

pub fn fio(dev: &Path, rw: &str, bs: &str) {
    let o = tb::run(
        Command::new("fio")
            .args([
                "--name=nvmf",
                "--ioengine=io_uring",
                "--direct=1",
                "--iodepth=16",
            ])
            .arg(format!("--filename={}", dev.display()))
            .args([
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--size=4M",
                "--offset=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ]),
        Duration::from_secs(600),
    );
    assert!(o.status.success(), "fio {rw} {bs}: {}", tb::text(&o));
    assert!(
        !stdout(&o).contains("verify:") && stdout(&o).contains("WRITE:"),
        "{}",
        tb::text(&o)
    );
}

/// Writes `mib` MiB of random data through `via` at `offset_mib`, then reads the same range
/// of `backing` with O_DIRECT (bypassing the fabric) and compares.
pub fn pattern_reaches_backing(via: &Path, backing: &Path, offset_mib: u32, mib: u32) {
    let dir = Path::new("/tmp/peerpipe");
    std::fs::create_dir_all(dir).unwrap();
    let pat = dir.join("nvmf-pattern");
    let back = dir.join("nvmf-backing");
    let count = format!("count={mib}");
    let seek = format!("seek={offset_mib}");
    let skip = format!("skip={offset_mib}");
    dd(&[
        "if=/dev/urandom",
        &format!("of={}", pat.display()),
        "bs=1M",
        &count,
    ]);
    dd(&[
        &format!("if={}", pat.display()),
        &format!("of={}", via.display()),
        "bs=1M",
        &count,
        &seek,
        "oflag=direct",
    ]);
    dd(&[
        &format!("if={}", backing.display()),
        &format!("of={}", back.display()),
        "bs=1M",
        &count,
        &skip,
        "iflag=direct",
    ]);
    let (a, b) = (std::fs::read(&pat).unwrap(), std::fs::read(&back).unwrap());
    assert_eq!(a.len(), (mib as usize) << 20);
    assert!(
        a == b,
        "the backing drive differs from what was written through the fabric"
    );
}

/// Starts `peerpipe target` with the whole argument list after `--listen ADDR:PORT` (for
/// several subsystems) and waits for its listening line.
pub fn start_target_args(port: u16, args: &[&str]) -> tb::Watched {
    let (_, a1) = tb::addrs();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peerpipe"));
    cmd.args(["target", "--listen", &format!("{a1}:{port}"), "--verbose"])
        .args(args);
    let mut t = tb::spawn_watched(&mut cmd, "peerpipe target");
    t.wait_line("target: listening on", Duration::from_secs(60));
    t
}

/// `nvme discover` against the target on `port`; its stdout.
pub fn discover(port: u16) -> String {
    let mut args: Vec<String> = vec!["discover".into()];
    args.extend(fabric_args(port));
    args.extend(["-q".into(), HOSTNQN.into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = nvme(&refs);
    assert!(o.status.success(), "{}", tb::text(&o));
    stdout(&o)
}

/// A fio command with crc32c verification (asserting it is checked by [`fio_passed`]).
pub fn fio_verify_cmd(dev: &Path, name: &str, args: &[&str]) -> Command {
    let mut c = Command::new("fio");
    c.arg(format!("--name={name}"))
        .args(["--ioengine=io_uring", "--direct=1"])
        .arg(format!("--filename={}", dev.display()))
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"])
        .args(args);
    c
}

/// Runs [`fio_verify_cmd`] to its end (at most 15 minutes) and asserts [`fio_passed`].
pub fn fio_verify(dev: &Path, name: &str, args: &[&str]) {
    let o = tb::wait(
        tb::spawn(&mut fio_verify_cmd(dev, name, args)),
        Duration::from_secs(900),
        name,
    );
    fio_passed(&o, name);
}

/// Asserts a fio run wrote and verified without error.
pub fn fio_passed(o: &Output, what: &str) {
    assert!(o.status.success(), "fio {what}: {}", tb::text(o));
    let out = stdout(o);
    assert!(
        !out.contains("verify:") && out.contains("WRITE:") && out.contains("READ:"),
        "fio {what}: {}",
        tb::text(o)
    );
}

/// The block device name of a `/dev/...` path (`nvme3n1`).
pub fn block_name(dev: &Path) -> String {
    dev.file_name().unwrap().to_string_lossy().into_owned()
}

/// Sectors written to a block device so far (/sys/block/X/stat, field 7).
pub fn sectors_written(dev: &Path) -> u64 {
    let s = std::fs::read_to_string(format!("/sys/block/{}/stat", block_name(dev))).unwrap();
    s.split_whitespace().nth(6).unwrap().parse().unwrap()
}
