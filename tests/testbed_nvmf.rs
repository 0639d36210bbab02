//! Testbed tests of `peerpipe target`, the userspace NVMe-oF (RDMA) target, served to the
//! guest kernel's own nvme-rdma host (nvme-cli, fio, dd) over rxe0 -> rxe1, and to crafted
//! rdma_cm clients for what the kernel host never does (bad private data, short capsules,
//! going silent). Run with `cargo xtask test --vm-only -- nvmf`.
//!
//! The backing namespace is the `data3` drive (the replicator tests use data1 and data2; the
//! suite runs test binaries one at a time).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use peerpipe::nvmf::{CmRequest, Completion, SQE_LEN};
use peerpipe::rdma::{
    Access, CompletionQueue, ConnParams, Connection, Connector, MemoryRegion, ProtectionDomain,
    QpInit, RecvRequest, SendRequest, EMPTY_COMPLETION,
};
use peerpipe_testbed as tb;

mod nvmf_tb;
use nvmf_tb::*;

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_discover_connect_identify_fio_and_backing_drive() {
    tb::require_testbed();
    let port = 4420;
    let n = nqn("full");
    let drive = tb::drive("data3");
    let t = start_target(port, &n, &drive.block, &[]);

    // Discovery lists the subsystem at our address.
    let mut args: Vec<String> = vec!["discover".into()];
    args.extend(fabric_args(port));
    args.extend(["-q".into(), HOSTNQN.into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = nvme(&refs);
    assert!(o.status.success(), "{}", tb::text(&o));
    let d = stdout(&o);
    let (_, a1) = tb::addrs();
    assert!(d.contains(&format!("subnqn:  {n}")), "{d}");
    assert!(d.contains(&format!("traddr:  {a1}")), "{d}");
    assert!(d.contains(&format!("trsvcid: {port}")), "{d}");
    assert!(d.contains("trtype:  rdma"), "{d}");

    let host = Host::connect(port, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let transport = std::fs::read_to_string(host.ctrl.join("transport")).unwrap();
    assert_eq!(transport.trim(), "rdma");

    // Identify Controller / Namespace as the target built them.
    let ctrl_dev = Path::new("/dev").join(host.ctrl.file_name().unwrap());
    let o = nvme(&["id-ctrl", ctrl_dev.to_str().unwrap()]);
    assert!(o.status.success(), "{}", tb::text(&o));
    let id = stdout(&o);
    assert_eq!(field(&id, "mn"), "peerpipe nvmf target");
    assert_eq!(field(&id, "subnqn"), n);
    assert_eq!(field(&id, "mdts"), "8", "1 MiB in 4 KiB pages");
    let cntlid = std::fs::read_to_string(host.ctrl.join("cntlid")).unwrap();
    assert_eq!(
        u16::from_str_radix(field(&id, "cntlid").trim_start_matches("0x"), 16).unwrap(),
        cntlid.trim().parse::<u16>().unwrap()
    );
    let o = nvme(&["id-ns", host.dev.to_str().unwrap()]);
    assert!(o.status.success(), "{}", tb::text(&o));
    let ns = stdout(&o);
    let name = drive
        .block
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let blocks = sectors * 512 / drive.lba_size;
    let nsze = u64::from_str_radix(field(&ns, "nsze").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(nsze, blocks, "{ns}");

    // Data through the fabric: fio with verification, 4 KiB random and 128 KiB sequential.
    fio(&host.dev, "randwrite", "4k");
    fio(&host.dev, "write", "128k");
    // And it lands on the backing drive, byte for byte.
    pattern_reaches_backing(&host.dev, &drive.block, 40, 4);

    // Write Zeroes, Deallocate and Flush through the fabric reach the backing drive too.
    let at = (40u64 << 20) / drive.lba_size;
    let blocks = (64u64 << 10) / drive.lba_size;
    let dev = host.dev.to_str().unwrap();
    let o = nvme(&[
        "write-zeroes",
        dev,
        &format!("--start-block={at}"),
        &format!("--block-count={}", blocks - 1),
    ]);
    assert!(o.status.success(), "{}", tb::text(&o));
    let o = nvme(&[
        "dsm",
        dev,
        "--ad",
        &format!("--slbs={}", at + blocks),
        &format!("--blocks={blocks}"),
    ]);
    assert!(o.status.success(), "{}", tb::text(&o));
    let o = nvme(&["flush", dev]);
    assert!(o.status.success(), "{}", tb::text(&o));
    let back = Path::new("/tmp/peerpipe/nvmf-zeroed");
    dd(&[
        &format!("if={}", drive.block.display()),
        &format!("of={}", back.display()),
        "bs=64k",
        "count=3",
        &format!("skip={}", (40u64 << 20) / (64 << 10)),
        "iflag=direct",
    ]);
    let got = std::fs::read(back).unwrap();
    let pat = std::fs::read("/tmp/peerpipe/nvmf-pattern").unwrap();
    assert!(got[..64 << 10].iter().all(|&x| x == 0), "write zeroes");
    assert_eq!(
        &got[128 << 10..],
        &pat[128 << 10..192 << 10],
        "data after the deallocated range is untouched"
    );

    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    assert!(
        stdout(&o).contains("disconnected 1 controller"),
        "{}",
        tb::text(&o)
    );
    let o = stop_target(t);
    assert!(o.status.success(), "{}", tb::text(&o));
    let err = stderr(&o);
    assert!(err.contains("target: buffers p2p"), "{err}");
    assert!(err.contains(" 0 payload bytes copied by the CPU"), "{err}");
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_passthrough_namespace_with_host_buffers_and_allowed_hosts() {
    tb::require_testbed();
    let port = 4421;
    let n = nqn("passthrough");
    let drive = tb::drive("data3");
    let t = start_target(
        port,
        &n,
        &drive.ng,
        &["--buffers", "host", "--allow-host", HOSTNQN],
    );
    // A host not on the list is refused (Connect fails), and the target keeps serving.
    match Host::connect(port, &n, OTHER_HOSTNQN) {
        Ok(h) => panic!("{} connected although not allowed", h.dev.display()),
        Err(o) => assert!(!o.status.success()),
    }
    let host = Host::connect(port, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    fio(&host.dev, "randwrite", "4k");
    pattern_reaches_backing(&host.dev, &drive.block, 8, 2);
    device_status_reaches_the_host(&drive, &host.dev);
    // Stopping with the host still connected: the target disconnects it and exits cleanly.
    let stopped = stop_target(t);
    assert!(stopped.status.success(), "{}", tb::text(&stopped));
    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    let err = stderr(&stopped);
    assert!(err.contains("queue closed"), "{err}");
    assert!(err.contains("nvme passthrough"), "{err}");
    assert!(err.contains("target: buffers host"), "{err}");
}

/// Turns the backing drive's Error Recovery feature back off (DULBE) when dropped.
struct Dulbe(String);

impl Drop for Dulbe {
    fn drop(&mut self) {
        let o = nvme(&["set-feature", &self.0, "-f", "5", "-v", "0", "-n", "1"]);
        assert!(
            o.status.success() || std::thread::panicking(),
            "{}",
            tb::text(&o)
        );
    }
}

/// An error of the backing device itself reaches the host as that device's NVMe status:
/// with Deallocated or Unwritten Logical Block Error enabled on the drive (Set Features Error
/// Recovery, DULBE), a read of blocks never written fails with SCT 2 / SC 0x87 and DNR
/// (0x4287) through the fabrics namespace too, not with a generic error; once DULBE is off
/// again the same read succeeds. The testbed's drives ignore deallocation (QEMU's default
/// `discard=ignore`), so the range is one no test has written in this boot: the drive itself
/// is asked, near its end, which range reads back as unwritten.
fn device_status_reaches_the_host(drive: &tb::Drive, fabrics: &Path) {
    let block = drive.block.display().to_string();
    let ctrl = block.trim_end_matches(|c: char| c.is_ascii_digit());
    let ctrl = ctrl.strip_suffix('n').unwrap_or(ctrl).to_string();
    let o = nvme(&["set-feature", &ctrl, "-f", "5", "-v", "0x10000", "-n", "1"]);
    assert!(o.status.success(), "enable DULBE: {}", tb::text(&o));
    let guard = Dulbe(ctrl);
    let unwritten = |o: &std::process::Output| {
        let text = tb::text(o);
        !o.status.success()
            && text.contains("Deallocated or Unwritten Logical Block")
            && text.contains("0x4287")
    };
    let read = |dev: &str, slba: u64| {
        let (s, c) = (slba.to_string(), (4096 / drive.lba_size - 1).to_string());
        nvme(&[
            "read",
            dev,
            "-s",
            &s,
            "-c",
            &c,
            "-z",
            "4096",
            "-d",
            "/dev/null",
        ])
    };
    let sectors: u64 = std::fs::read_to_string(format!(
        "/sys/class/block/{}/size",
        block_name(&drive.block)
    ))
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    let blocks = sectors * 512 / drive.lba_size;
    let per_mib = (1 << 20) / drive.lba_size;
    let slba = (1..=32u64)
        .map(|k| blocks - k * per_mib)
        .find(|&slba| unwritten(&read(&block, slba)))
        .expect("no unwritten 4 KiB range in the drive's last 32 MiB");
    let dev = fabrics.display().to_string();
    let o = read(&dev, slba);
    assert!(
        unwritten(&o),
        "the host did not get the device's own status for LBA {slba}: {}",
        tb::text(&o)
    );
    drop(guard);
    let o = read(&dev, slba);
    assert!(o.status.success(), "read after DULBE off: {}", tb::text(&o));
}

/// A small deterministic generator for file contents and sizes (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let o = tb::run(cmd, Duration::from_secs(600));
    assert!(o.status.success(), "{what}: {}", tb::text(&o));
    tb::text(&o)
}

fn fnv64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Mounted {
    fn new(dev: &Path, at: &Path) -> Mounted {
        run_ok(
            Command::new("mount").args(["-t", "ext4"]).arg(dev).arg(at),
            "mount",
        );
        Mounted(at.to_path_buf())
    }

    fn unmount(self) {
        run_ok(Command::new("umount").arg(&self.0), "umount");
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = tb::run(Command::new("umount").arg(&self.0), Duration::from_secs(60));
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_ext4_mkfs_files_remount_fsck() {
    tb::require_testbed();
    let port = 4424;
    let n = nqn("ext4");
    let drive = tb::drive("data3");
    // Without busy polling (on by default): every queue sleeps until woken.
    let t = start_target(port, &n, &drive.block, &["--busy-poll", "0"]);
    let host = Host::connect(port, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let dev = host.dev.clone();
    // Inode tables and journal written now, through the fabric, not lazily after mount.
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&dev),
        "mkfs.ext4",
    );
    let mnt = Path::new("/tmp/peerpipe/nvmf-ext4");
    std::fs::create_dir_all(mnt).unwrap();
    let m = Mounted::new(&dev, mnt);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut files = Vec::new();
    for i in 0..20 {
        let len = (rng.next() % (1 << 20)) as usize + 1;
        let data = rng.bytes(len);
        let path = mnt.join(format!("dir{}/f{i:02}", i % 3));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &data).unwrap();
        files.push((path, len, fnv64(&data)));
    }
    run_ok(&mut Command::new("sync"), "sync");
    m.unmount();
    // Nothing of the filesystem stays cached: the read-back comes through the fabric.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let m = Mounted::new(&dev, mnt);
    for (path, len, sum) in &files {
        let got = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(got.len(), *len, "{}", path.display());
        assert_eq!(
            fnv64(&got),
            *sum,
            "{} differs after remount",
            path.display()
        );
    }
    m.unmount();
    let fsck = run_ok(
        Command::new("fsck.ext4").arg("-fn").arg(&dev),
        "fsck.ext4 -fn",
    );
    // -n: exit status 0 only when the check found nothing to fix.
    assert!(fsck.contains(" files ("), "{fsck}");
    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    let o = stop_target(t);
    assert!(o.status.success(), "{}", tb::text(&o));
    assert!(
        stderr(&o).contains(" 0 payload bytes copied by the CPU"),
        "{}",
        tb::text(&o)
    );
    assert!(
        stderr(&o).contains("busy polls 0 found work / 0 ran out"),
        "{}",
        tb::text(&o)
    );
}

const UUID_B: &str = "0f8e4c2a-1d3b-4e5f-8a9b-0c1d2e3f4a5b";
const NGUID_B: &str = "00112233445566778899aabbccddeeff";

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_two_hosts_two_subsystems_concurrent_fio_verify() {
    tb::require_testbed();
    let port = 4425;
    let (na, nb) = (nqn("two-a"), nqn("two-b"));
    let (da, db) = (tb::drive("data3"), tb::drive("data2"));
    let ns_b = format!("{},uuid={UUID_B},nguid={NGUID_B}", db.block.display());
    let t = start_target_args(
        port,
        &[
            "--nqn",
            &na,
            "--ns",
            da.block.to_str().unwrap(),
            "--allow-host",
            HOSTNQN,
            "--nqn",
            &nb,
            "--ns",
            &ns_b,
        ],
    );
    // Discovery lists both subsystems of the port.
    let d = discover(port);
    for n in [&na, &nb] {
        assert!(d.contains(&format!("subnqn:  {n}")), "{n} missing:\n{d}");
    }
    // The allowed-hosts list belongs to the first subsystem only.
    if let Ok(h) = Host::connect(port, &na, OTHER_HOSTNQN) {
        panic!("{} connected to {na} although not allowed", h.dev.display());
    }
    let queues = ["--nr-io-queues", "2", "--queue-size", "128"];
    let ha = Host::connect_with(port, &na, HOSTNQN, &queues)
        .unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let hb = Host::connect_with(port, &nb, OTHER_HOSTNQN, &queues)
        .unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    for h in [&ha, &hb] {
        let qc = std::fs::read_to_string(h.ctrl.join("queue_count")).unwrap();
        assert_eq!(
            qc.trim(),
            "3",
            "admin + 2 I/O queues on {}",
            h.ctrl.display()
        );
        let sq = std::fs::read_to_string(h.ctrl.join("sqsize")).unwrap();
        assert_eq!(sq.trim(), "127", "{}", h.ctrl.display());
    }
    // The configured IDs of B's namespace reach the host.
    let sysfs = |h: &Host, attr: &str| {
        std::fs::read_to_string(format!("/sys/block/{}/{attr}", block_name(&h.dev)))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(sysfs(&hb, "uuid"), UUID_B);
    assert_eq!(sysfs(&hb, "nguid").replace('-', ""), NGUID_B);
    assert_ne!(sysfs(&ha, "nguid").replace('-', ""), NGUID_B);

    let args = [
        "--rw=randwrite",
        "--bsrange=4k-128k",
        "--iodepth=128",
        "--iodepth_batch_submit=32",
        "--size=24M",
        "--offset=64M",
    ];
    let fa = tb::spawn(&mut fio_verify_cmd(&ha.dev, "host-a", &args));
    let fb = tb::spawn(&mut fio_verify_cmd(&hb.dev, "host-b", &args));
    let oa = tb::wait(fa, Duration::from_secs(900), "fio host a");
    let ob = tb::wait(fb, Duration::from_secs(900), "fio host b");
    fio_passed(&oa, "host a");
    fio_passed(&ob, "host b");

    for h in [ha, hb] {
        let o = h.disconnect();
        assert!(o.status.success(), "{}", tb::text(&o));
    }
    let o = stop_target(t);
    assert!(o.status.success(), "{}", tb::text(&o));
    let err = stderr(&o);
    assert!(err.contains(&format!("subsystems {na}, {nb}")), "{err}");
}

/// `--busy-poll`: the kernel host's I/O through a target whose idle queues poll before they
/// sleep is verified at queue depth 1 (where polls find the next command or the drive
/// completion) and 32 over two I/O queues, and the stop statistics show polls that found
/// work. The budget is large (100 ms) so that a poll finds its work on any machine, however
/// slow; a poll never outlasts it, and the target stops promptly on SIGTERM.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_busy_poll_serves_verified_io_and_its_polls_find_work() {
    tb::require_testbed();
    let port = 4428;
    let n = nqn("busy-poll");
    let drive = tb::drive("data3");
    let t = start_target(
        port,
        &n,
        &drive.block,
        &[
            "--busy-poll",
            "100000",
            "--buffers",
            "host",
            "--output-format=json",
        ],
    );
    let host = Host::connect_with(port, &n, HOSTNQN, &["--nr-io-queues", "2"])
        .unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let qd1 = [
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=1",
        "--size=4M",
        "--offset=32M",
    ];
    fio_verify(&host.dev, "busy-qd1", &qd1);
    let qd32 = [
        "--rw=randwrite",
        "--bsrange=4k-128k",
        "--iodepth=32",
        "--numjobs=2",
        "--size=8M",
        "--offset=64M",
        "--offset_increment=16M",
    ];
    fio_verify(&host.dev, "busy-qd32", &qd32);
    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    let o = stop_target(t);
    assert!(o.status.success(), "{}", tb::text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stop statistics JSON");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["payload_bytes_copied"], 0, "{v}");
    let hits = v["busy_poll_hits"].as_u64().expect("busy_poll_hits");
    assert!(hits > 0, "no busy poll found work: {v}");
    assert!(
        stderr(&o).contains(&format!("busy polls {hits} found work")),
        "{}",
        tb::text(&o)
    );
}

#[test]
fn target_cli_refuses_bad_combinations_with_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["--ns", "/dev/null", "--nqn", "nqn.a"], "before any --nqn"),
        (
            &["--nqn", "nqn.a", "--ns", "/dev/null", "--nqn", "nqn.b"],
            "has no --ns",
        ),
        (
            &[
                "--nqn",
                "nqn.a",
                "--ns",
                "/dev/null",
                "--nqn",
                "nqn.a",
                "--ns",
                "/dev/zero",
            ],
            "given twice",
        ),
        (&["--nqn", "nqn.a", "--ns", "/dev/null,uuid=xyz"], "uuid="),
        (
            &["--nqn", "nqn.a", "--ns", "/dev/null,color=red"],
            "unknown namespace option",
        ),
    ];
    for (args, want) in cases {
        let o = tb::run(
            Command::new(env!("CARGO_BIN_EXE_peerpipe"))
                .args(["target", "--listen", "127.0.0.1"])
                .args(*args),
            Duration::from_secs(30),
        );
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", tb::text(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", tb::text(&o));
    }
    let o = tb::run(
        Command::new(env!("CARGO_BIN_EXE_peerpipe")).args(["target", "--help"]),
        Duration::from_secs(30),
    );
    assert!(o.status.success());
    assert!(
        stdout(&o).contains("PATH[,uuid=UUID][,nguid=HEX32]"),
        "{}",
        tb::text(&o)
    );
}

/// A crafted rdma_cm host: connects with raw private data, can post raw capsules.
struct Crafted {
    // The connection before the regions its work requests name.
    conn: Connection,
    cq: CompletionQueue,
    pd: ProtectionDomain,
    recv: MemoryRegion,
}

fn crafted_connect(port: u16, private: &[u8]) -> Result<Crafted, peerpipe::rdma::Error> {
    let (a0, a1) = tb::addrs();
    let dst: SocketAddr = format!("{a1}:{port}").parse().unwrap();
    let c = Connector::resolve(Some(a0.parse().unwrap()), dst, Duration::from_secs(10))?;
    let pd = ProtectionDomain::new(c.context())?;
    let cq = CompletionQueue::new(c.context(), 64)?;
    let recv = MemoryRegion::alloc(&pd, 16 * 8, Access::local_read().local_write())?;
    let params = ConnParams {
        private_data: private.to_vec(),
        responder_resources: 16,
        initiator_depth: 0,
        timeout: Duration::from_secs(10),
        ..ConnParams::default()
    };
    let init = QpInit::new(&pd, &cq);
    let r = recv.clone();
    let conn = c.connect_with(&init, &params, move |qp| {
        let wrs: Vec<RecvRequest> = (0..8)
            .map(|i| Ok(RecvRequest::new(i, vec![r.sge(i as usize * 16, 16)?])))
            .collect::<Result<_, peerpipe::rdma::Error>>()?;
        qp.post_recv(&wrs)
    })?;
    Ok(Crafted { conn, cq, pd, recv })
}

fn admin_request() -> CmRequest {
    CmRequest {
        recfmt: 0,
        qid: 0,
        hrqsize: 32,
        hsqsize: 31,
        cntlid: 0,
    }
}

impl Crafted {
    /// Sends a capsule and waits for its response (the first receive completion).
    fn command(&self, sqe: &[u8; SQE_LEN]) -> Completion {
        self.conn
            .post_send(&[SendRequest::send_inline(99, sqe)])
            .expect("post capsule");
        let end = Instant::now() + Duration::from_secs(20);
        let mut wcs = [EMPTY_COMPLETION; 4];
        loop {
            let n = self
                .conn
                .wait_completions(&self.cq, &mut wcs, Duration::from_secs(20))
                .expect("completion");
            for wc in &wcs[..n] {
                let wc = wc.ok().expect("completion status");
                if wc.opcode.is_recv() {
                    let mut b = [0u8; 16];
                    self.recv.read_at(wc.wr_id as usize * 16, &mut b).unwrap();
                    return Completion::decode(&b);
                }
            }
            assert!(Instant::now() < end, "no response");
        }
    }

    /// Fabrics Connect on the admin queue with `kato_ms`; the connect data is fetched by
    /// the target with RDMA READ from a region of ours.
    fn fabrics_connect(&self, subnqn: &str, kato_ms: u32) -> (Completion, MemoryRegion) {
        let data = MemoryRegion::alloc(&self.pd, 1024, Access::local_read().remote_read())
            .expect("connect data region");
        let mut d = [0u8; 1024];
        d[0..16].copy_from_slice(&[0xa1; 16]); // hostid
        d[16..18].copy_from_slice(&0xffffu16.to_le_bytes()); // dynamic controller
        d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        d[512..512 + HOSTNQN.len()].copy_from_slice(HOSTNQN.as_bytes());
        data.write_at(0, &d).unwrap();
        let mut sqe = [0u8; SQE_LEN];
        sqe[0] = 0x7f; // fabrics
        sqe[1] = 0x40; // PSDT 01b: SGL
        sqe[2..4].copy_from_slice(&7u16.to_le_bytes()); // cid
        sqe[4] = 0x01; // Connect
        sqe[24..32].copy_from_slice(&data.addr().to_le_bytes());
        sqe[32..35].copy_from_slice(&1024u32.to_le_bytes()[..3]);
        sqe[35..39].copy_from_slice(&data.rkey().to_le_bytes());
        sqe[39] = 0x40; // keyed data block
        sqe[42..44].copy_from_slice(&0u16.to_le_bytes()); // qid 0
        sqe[44..46].copy_from_slice(&31u16.to_le_bytes()); // sqsize
        sqe[48..52].copy_from_slice(&kato_ms.to_le_bytes());
        (self.command(&sqe), data)
    }
}

#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_bad_hosts_are_rejected_or_torn_down_without_disturbing_others() {
    tb::require_testbed();
    let port = 4422;
    let n = nqn("isolation");
    let drive = tb::drive("data3");
    let t = start_target(port, &n, &drive.block, &[]);

    // The block device is held exclusively: a second target on it is refused.
    let o = tb::run(
        Command::new(env!("CARGO_BIN_EXE_peerpipe"))
            .args([
                "target",
                "--listen",
                &format!("{}:{}", tb::addrs().1, port + 10),
            ])
            .args(["--nqn", &nqn("second"), "--ns"])
            .arg(&drive.block),
        Duration::from_secs(60),
    );
    assert!(!o.status.success(), "{}", tb::text(&o));
    assert!(
        stderr(&o).contains("busy"),
        "expected EBUSY: {}",
        tb::text(&o)
    );

    // Bad private data: rejected with the NVMe/RDMA status (invalid hsqsize = 4).
    let mut bad = admin_request();
    bad.hsqsize = 200;
    match crafted_connect(port, &bad.encode()) {
        Err(peerpipe::rdma::Error::Rejected { private_data, .. }) => {
            assert_eq!(&private_data[..4], &[0, 0, 4, 0], "{private_data:?}")
        }
        Err(e) => panic!("expected a reject, got {e}"),
        Ok(_) => panic!("an admin queue of 201 entries was accepted"),
    }
    let mut bad = admin_request();
    bad.recfmt = 1;
    match crafted_connect(port, &bad.encode()) {
        Err(peerpipe::rdma::Error::Rejected { private_data, .. }) => {
            assert_eq!(&private_data[..4], &[0, 0, 2, 0], "{private_data:?}")
        }
        Err(e) => panic!("expected a reject, got {e}"),
        Ok(_) => panic!("record format 1 was accepted"),
    }

    // A kernel host works beside a crafted one that sends a short capsule: that queue alone
    // is torn down.
    let host = Host::connect(port, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let c = crafted_connect(port, &admin_request().encode()).expect("crafted connect");
    c.conn
        .post_send(&[SendRequest::send_inline(1, &[0u8; 16])])
        .expect("post a short capsule");
    c.conn
        .wait_event(
            peerpipe::rdma::CmEventKind::Disconnected,
            Duration::from_secs(30),
        )
        .expect("the target disconnects the misbehaving queue");
    drop(c);
    pattern_reaches_backing(&host.dev, &drive.block, 24, 1);

    // Keep-alive: a controller whose host goes silent past KATO is torn down; the kernel
    // host (which sends keep-alives) is not.
    let c = crafted_connect(port, &admin_request().encode()).expect("crafted connect");
    let (cqe, _data) = c.fabrics_connect(&n, 1000);
    assert!(cqe.status.is_success(), "Connect failed: {cqe:?}");
    let started = Instant::now();
    c.conn
        .wait_event(
            peerpipe::rdma::CmEventKind::Disconnected,
            Duration::from_secs(30),
        )
        .expect("a silent controller is torn down");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "torn down before its KATO: {:?}",
        started.elapsed()
    );
    drop(c);
    pattern_reaches_backing(&host.dev, &drive.block, 28, 1);

    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    let o = stop_target(t);
    assert!(o.status.success(), "{}", tb::text(&o));
    let err = stderr(&o);
    assert!(err.contains("keep-alive expired"), "{err}");
}

impl Crafted {
    /// A capsule with `opcode`, `nsid`, cdw10..cdw15 and a keyed SGL over `region` (or a null
    /// keyed SGL without one); `sgl_type` overrides the descriptor type byte.
    fn capsule(
        opcode: u8,
        nsid: u32,
        cdws: [u32; 6],
        region: Option<&MemoryRegion>,
        sgl_type: u8,
    ) -> [u8; SQE_LEN] {
        let mut sqe = [0u8; SQE_LEN];
        sqe[0] = opcode;
        sqe[1] = 0x40; // PSDT 01b: SGL
        sqe[2..4].copy_from_slice(&9u16.to_le_bytes());
        sqe[4..8].copy_from_slice(&nsid.to_le_bytes());
        if let Some(r) = region {
            sqe[24..32].copy_from_slice(&r.addr().to_le_bytes());
            sqe[32..35].copy_from_slice(&(r.len() as u32).to_le_bytes()[..3]);
            sqe[35..39].copy_from_slice(&r.rkey().to_le_bytes());
        }
        sqe[39] = sgl_type;
        for (i, v) in cdws.iter().enumerate() {
            sqe[40 + 4 * i..44 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        sqe
    }

    /// Fabrics Property Set of CC to `value` (4 bytes).
    fn set_cc(&self, value: u32) -> Completion {
        let mut sqe = Self::capsule(0x7f, 0, [0, 0x14, value, 0, 0, 0], None, 0x40);
        sqe[4] = 0x00; // Property Set
        self.command(&sqe)
    }

    /// Fabrics Connect of queue `qid` naming controller `cntlid` (0xffff: a new one).
    fn fabrics_connect_queue(
        &self,
        subnqn: &str,
        qid: u16,
        cntlid: u16,
    ) -> (Completion, MemoryRegion) {
        let data = MemoryRegion::alloc(&self.pd, 1024, Access::local_read().remote_read())
            .expect("connect data region");
        let mut d = [0u8; 1024];
        d[0..16].copy_from_slice(&[0xa1; 16]);
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        d[512..512 + HOSTNQN.len()].copy_from_slice(HOSTNQN.as_bytes());
        data.write_at(0, &d).unwrap();
        let mut sqe = Self::capsule(0x7f, 0, [0; 6], Some(&data), 0x40);
        sqe[4] = 0x01; // Connect
        sqe[42..44].copy_from_slice(&qid.to_le_bytes());
        sqe[44..46].copy_from_slice(&31u16.to_le_bytes());
        (self.command(&sqe), data)
    }
}

/// Bad input from a crafted initiator over RDMA gets the proper NVMe status, not a crash or
/// a hang: commands before Connect, unknown and non-fabrics admin opcodes, an admin command on
/// an I/O queue, a bad SGL descriptor type, an SGL shorter than the transfer, an I/O-queue
/// Connect naming another controller, a read past the namespace's end and one beyond MDTS. A
/// kernel host keeps working beside it.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_nvmf_crafted_bad_commands_get_the_proper_status() {
    use peerpipe::nvmf::Status;
    tb::require_testbed();
    let port = 4423;
    let n = nqn("crafted");
    let drive = tb::drive("data3");
    let t = start_target(port, &n, &drive.block, &["--buffers", "host"]);
    let host = Host::connect(port, &n, HOSTNQN).unwrap_or_else(|o| panic!("{}", tb::text(&o)));
    let code = |c: &Completion| c.status.code();

    let a = crafted_connect(port, &admin_request().encode()).expect("crafted admin queue");
    // Identify before Connect: Command Sequence Error.
    let id = Crafted::capsule(0x06, 0, [1, 0, 0, 0, 0, 0], None, 0x40);
    assert_eq!(code(&a.command(&id)), Status::CMD_SEQ_ERROR);
    let (cqe, _d) = a.fabrics_connect(&n, 0);
    assert!(cqe.status.is_success(), "Connect: {cqe:?}");
    let cntlid = cqe.result as u16;
    assert!(a.set_cc(0x0046_0001).status.is_success());
    // An unknown admin opcode, and Create I/O Submission Queue (queues come from Connect on
    // fabrics): Invalid Opcode, DNR. (I/O opcodes mostly share numbers with admin ones:
    // Read's 0x02 is Get Log Page here.)
    for op in [0xf0u8, 0x01] {
        let c = a.command(&Crafted::capsule(op, 1, [0; 6], None, 0x40));
        assert_eq!(code(&c), Status::INVALID_OPCODE, "opcode {op:#x}: {c:?}");
        assert!(c.status.dnr(), "opcode {op:#x}: {c:?}");
    }
    // Identify Controller with an SGL descriptor type the target does not take.
    let buf = MemoryRegion::alloc(
        &a.pd,
        4096,
        Access::local_read().local_write().remote_write(),
    )
    .unwrap();
    let c = a.command(&Crafted::capsule(
        0x06,
        0,
        [1, 0, 0, 0, 0, 0],
        Some(&buf),
        0x30,
    ));
    assert_eq!(code(&c), Status::SGL_INVALID_TYPE, "{c:?}");
    // Number of Queues: one I/O queue.
    let c = a.command(&Crafted::capsule(0x09, 0, [7, 0, 0, 0, 0, 0], None, 0x40));
    assert!(c.status.is_success(), "Set Features NQ: {c:?}");

    // An I/O queue naming another controller is refused (at the CM or by Connect).
    let mut req = admin_request();
    req.qid = 1;
    req.cntlid = cntlid.wrapping_add(1);
    if let Ok(q) = crafted_connect(port, &req.encode()) {
        let (c, _d) = q.fabrics_connect_queue(&n, 1, cntlid.wrapping_add(1));
        assert_eq!(code(&c), Status::CONNECT_INVALID_PARAM, "{c:?}");
    }
    // The right controller: reads past the end and beyond MDTS are refused.
    req.cntlid = cntlid;
    let q = crafted_connect(port, &req.encode()).expect("crafted I/O queue");
    let (c, _d) = q.fabrics_connect_queue(&n, 1, cntlid);
    assert!(c.status.is_success(), "I/O Connect: {c:?}");
    let blocks = std::fs::read_to_string(format!(
        "/sys/class/block/{}/size",
        block_name(&drive.block)
    ))
    .unwrap()
    .trim()
    .parse::<u64>()
    .unwrap();
    let data = MemoryRegion::alloc(
        &q.pd,
        4096,
        Access::local_read().local_write().remote_write(),
    )
    .unwrap();
    let read = |slba: u64, nlb0: u32, r: &MemoryRegion| {
        Crafted::capsule(
            0x02,
            1,
            [slba as u32, (slba >> 32) as u32, nlb0, 0, 0, 0],
            Some(r),
            0x40,
        )
    };
    let c = q.command(&read(blocks, 7, &data));
    assert_eq!(code(&c), Status::LBA_OUT_OF_RANGE, "{c:?}");
    let big = MemoryRegion::alloc(
        &q.pd,
        8 << 20,
        Access::local_read().local_write().remote_write(),
    )
    .unwrap();
    let c = q.command(&read(0, (8 << 20) / 512 - 1, &big));
    assert_eq!(code(&c), Status::INVALID_FIELD, "beyond MDTS: {c:?}");
    // An admin command (Identify) on the I/O queue: Invalid Opcode.
    let c = q.command(&Crafted::capsule(
        0x06,
        0,
        [1, 0, 0, 0, 0, 0],
        Some(&data),
        0x40,
    ));
    assert_eq!(
        code(&c),
        Status::INVALID_OPCODE,
        "Identify on an I/O queue: {c:?}"
    );
    // A keyed SGL shorter than the transfer (512 bytes for 8 blocks): Data SGL Length
    // Invalid, DNR, and nothing is written past the host's 512 bytes.
    let small = MemoryRegion::alloc(
        &q.pd,
        512,
        Access::local_read().local_write().remote_write(),
    )
    .unwrap();
    let c = q.command(&read(0, 7, &small));
    assert_eq!(code(&c), Status::SGL_INVALID_DATA_LEN, "short SGL: {c:?}");
    assert!(c.status.dnr(), "short SGL: {c:?}");
    // A well-formed read works on the same queue.
    let c = q.command(&read(0, 7, &data));
    assert!(c.status.is_success(), "read: {c:?}");
    drop((q, a));

    pattern_reaches_backing(&host.dev, &drive.block, 32, 1);
    let o = host.disconnect();
    assert!(o.status.success(), "{}", tb::text(&o));
    let o = stop_target(t);
    assert!(o.status.success(), "{}", tb::text(&o));
}
