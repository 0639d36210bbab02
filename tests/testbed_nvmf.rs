//! Testbed tests of `peerpipe target`, the userspace NVMe-oF (RDMA) target, served to the
//! guest kernel's own nvme-rdma host (nvme-cli, fio, dd) over rxe0 -> rxe1, and to crafted
//! rdma_cm clients for what the kernel host never does (bad private data, short capsules,
//! going silent). Run with `cargo xtask test --vm-only -- nvmf`.
//!
//! The backing namespace is the `data3` drive (the replicator tests use data1 and data2; the
//! suite runs test binaries one at a time).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use peerpipe::nvmf::{CmRequest, Completion, SQE_LEN};
use peerpipe::rdma::{
    Access, CompletionQueue, ConnParams, Connection, Connector, MemoryRegion, ProtectionDomain,
    QpInit, RecvRequest, SendRequest, EMPTY_COMPLETION,
};
use peerpipe_testbed as tb;

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a1";
const OTHER_HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000b2";

fn nqn(test: &str) -> String {
    format!("nqn.2026-11.io.peerpipe:{test}")
}

/// Starts `peerpipe target` on rxe1's address and waits for its listening line.
fn start_target(port: u16, nqn: &str, ns: &Path, extra: &[&str]) -> tb::Watched {
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
fn stop_target(t: tb::Watched) -> Output {
    let o = tb::run(
        Command::new("kill").args(["-TERM", &t.id().to_string()]),
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "{}", tb::text(&o));
    t.finish(Duration::from_secs(90))
}

fn nvme(args: &[&str]) -> Output {
    tb::run(Command::new("nvme").args(args), Duration::from_secs(120))
}

fn fabric_args(port: u16) -> Vec<String> {
    let (a0, a1) = tb::addrs();
    ["-t", "rdma", "-a", &a1, "-s", &port.to_string(), "-w", &a0]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A connected kernel host controller; disconnected on drop so a failing test leaves no
/// controller behind.
struct Host {
    nqn: String,
    ctrl: PathBuf,
    dev: PathBuf,
}

impl Host {
    fn connect(port: u16, nqn: &str, hostnqn: &str) -> Result<Host, Output> {
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

    fn disconnect(self) -> Output {
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
fn wait_fabrics_namespace(nqn: &str) -> (PathBuf, PathBuf) {
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
fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name} in\n{out}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn dd(args: &[&str]) {
    let o = tb::run(
        Command::new("dd").args(args).arg("status=none"),
        Duration::from_secs(180),
    );
    assert!(o.status.success(), "dd {args:?}: {}", tb::text(&o));
}

fn fio(dev: &Path, rw: &str, bs: &str) {
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
fn pattern_reaches_backing(via: &Path, backing: &Path, offset_mib: u32, mib: u32) {
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
