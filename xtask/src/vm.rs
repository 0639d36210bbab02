//! The testbed VM: virtme-ng + QEMU (TCG) with emulated NVMe drives behind a PCIe switch,
//! one of them with a 64 MiB CMB (the p2pmem provider), and two soft-RoCE devices inside.

use crate::{cache_dir, repo_root, venv_bin, Result};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Size of every emulated drive (raw sparse files, made anew per run).
const DRIVE_BYTES: u64 = 1 << 30;
/// A boot that has not reached the guest script by then is stalled (normal: 20-45 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const BOOT_ATTEMPTS: u32 = 3;
/// Exit status the guest wrapper reports when the testbed itself could not be set up.
const SETUP_FAILED: u8 = 97;

pub struct VmOptions {
    /// Plain NVMe drives besides the CMB drive (`p2p0`).
    pub data_drives: usize,
    pub timeout: Duration,
    pub memory: String,
    pub cmd: Vec<String>,
}

impl VmOptions {
    pub fn for_command(cmd: Vec<String>) -> Self {
        VmOptions {
            data_drives: 3,
            timeout: Duration::from_secs(45 * 60),
            memory: "3G".into(),
            cmd,
        }
    }

    /// The options `cargo xtask vm` was given.
    pub fn from_args(a: VmArgs) -> Self {
        VmOptions {
            data_drives: a.drives as usize,
            timeout: Duration::from_secs(a.timeout),
            memory: a.memory,
            cmd: a.cmd,
        }
    }
}

/// `cargo xtask vm [--drives N] [--timeout SECS] [--memory SIZE] -- CMD...`
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Plain NVMe drives besides the CMB drive p2p0 (1-6)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=6))]
    drives: u32,
    /// Give up on the VM after SECS seconds
    #[arg(long, value_name = "SECS", default_value_t = 45 * 60)]
    timeout: u64,
    /// Guest memory (QEMU's -m syntax)
    #[arg(long, value_name = "SIZE", default_value = "3G")]
    memory: String,
    /// The command to run as root in the VM
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// QEMU arguments for the PCIe topology: root port -> switch -> one downstream port per drive.
fn qemu_devices(images: &[PathBuf]) -> String {
    let mut o = String::from(
        "-device pcie-root-port,id=rp0,chassis=1,slot=1 -device x3130-upstream,id=up0,bus=rp0",
    );
    for (i, img) in images.iter().enumerate() {
        let _ = write!(
            o,
            " -device xio3130-downstream,id=dn{i},bus=up0,chassis={},slot={i}",
            i + 2
        );
        let _ = write!(
            o,
            " -drive file={},if=none,id=d{i},format=raw",
            img.display()
        );
        if i == 0 {
            let _ = write!(
                o,
                " -device nvme,serial=p2p0,drive=d0,bus=dn0,cmb_size_mb=64"
            );
        } else {
            let _ = write!(o, " -device nvme,serial=data{i},drive=d{i},bus=dn{i}");
        }
    }
    o
}

/// TCG threading: `single` (default) runs all vCPUs in one host thread. Multi-threaded TCG
/// is faster but, on a loaded host, intermittently loses the wakeup of a halted vCPU during
/// boot (seen here: RCU stalls "timer wakeup didn't happen", NVMe admin timeouts
/// "completion polled", a guest that never reaches userspace). `PEERPIPE_VM_TCG=multi`
/// opts back in.
fn tcg_threading() -> &'static str {
    match std::env::var("PEERPIPE_VM_TCG").as_deref() {
        Ok("multi") => "multi",
        _ => "single",
    }
}

/// `PEERPIPE_VM_QEMU_OPTS`: more QEMU options, appended as they are (e.g. `-perfmap`, for
/// a host-side `perf` profile of the vCPU thread with guest code addresses; see
/// benches/README.md).
fn extra_qemu_opts() -> String {
    std::env::var("PEERPIPE_VM_QEMU_OPTS")
        .map(|o| format!(" {o}"))
        .unwrap_or_default()
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What a VM run left behind.
pub struct VmRun {
    /// The guest command's exit status.
    pub status: u8,
    /// Small files the guest wrote to `$PEERPIPE_OUT` (name -> text).
    pub outputs: std::collections::HashMap<String, String>,
}

/// Boots the VM, runs `opts.cmd` as root in the guest (cwd: the checkout, devices ready),
/// streams its output, and returns its exit status and outputs.
pub fn run_in_vm(kernel: &Path, opts: &VmOptions) -> Result<VmRun> {
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    // Under the cache dir, not /tmp: the guest sees the host root read-only but gets its
    // own /tmp.
    let run_dir = cache_dir().join("runs").join(&run_id);
    let out_dir = run_dir.join("out");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let _cleanup = RemoveOnDrop(run_dir.clone());

    let mut images = Vec::new();
    for i in 0..=opts.data_drives {
        let img = run_dir.join(format!("nvme{i}.img"));
        let f = std::fs::File::create(&img).map_err(|e| format!("{}: {e}", img.display()))?;
        f.set_len(DRIVE_BYTES)
            .map_err(|e| format!("{}: {e}", img.display()))?;
        images.push(img);
    }

    let repo = repo_root();
    let cmd_line: Vec<String> = opts.cmd.iter().map(|a| shell_quote(a)).collect();
    let status_file = out_dir.join("status");
    let script = format!(
        r#"#!/bin/bash
echo started > {out}/started
cd {repo}
export PEERPIPE_TESTBED=1 PEERPIPE_OUT={out} PEERPIPE_DRIVES={drives} PEERPIPE_VM_TCG={tcg}
export PEERPIPE_ADDR0=10.77.0.1 PEERPIPE_ADDR1=10.77.0.2
export PATH={venv}:$PATH
if ! bash {repo}/testbed/guest/setup.sh > {out}/setup.log 2>&1; then
  echo "testbed: guest setup failed:"; cat {out}/setup.log
  echo {setup_failed} > {status}; exit {setup_failed}
fi
{cmd}
rc=$?
echo $rc > {status}
exit $rc
"#,
        repo = shell_quote(&repo.display().to_string()),
        out = shell_quote(&out_dir.display().to_string()),
        drives = opts.data_drives + 1,
        tcg = tcg_threading(),
        venv = shell_quote(&venv_bin().display().to_string()),
        setup_failed = SETUP_FAILED,
        status = shell_quote(&status_file.display().to_string()),
        cmd = cmd_line.join(" "),
    );
    let script_path = run_dir.join("guest.sh");
    std::fs::write(&script_path, script).map_err(|e| format!("guest script: {e}"))?;

    let mut vng = Command::new(venv_bin().join("vng"));
    vng.env(
        "PATH",
        format!(
            "{}:{}",
            venv_bin().display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    )
    .current_dir(&repo)
    .arg("--run")
    .arg(kernel)
    // /dev/kvm here is a PVM hypervisor: a stock guest aborts on it ("failed to set MSR").
    .args(["--disable-kvm", "--disable-microvm", "--cpus", "2"])
    .args(["--memory", &opts.memory])
    // Keep the CMB for data (no SQs in it); one poll queue so IOPOLL can be tested.
    .args(["--append", "nvme.use_cmb_sqes=0 nvme.poll_queues=1"])
    .arg(format!("--rwdir={}", out_dir.display()))
    .arg(format!(
        "--qemu-opts={} -accel tcg,thread={}{}",
        qemu_devices(&images),
        tcg_threading(),
        extra_qemu_opts()
    ))
    .args(["--exec", &format!("bash {}", script_path.display())]);
    if std::env::var_os("PEERPIPE_VM_VERBOSE").is_some() {
        // The guest kernel's console on stderr: for boot problems.
        vng.arg("--verbose");
    }

    let started = Instant::now();
    let marker = out_dir.join("started");
    let mut attempt = 1;
    while boot_once(&mut vng, &marker, opts.timeout)? == Boot::NeverStarted {
        if attempt == BOOT_ATTEMPTS {
            return Err(format!(
                "vm: the guest never reached its command in {BOOT_ATTEMPTS} boots of {} s each \
                 (rerun with PEERPIPE_VM_VERBOSE=1 to see the guest console)",
                BOOT_TIMEOUT.as_secs()
            ));
        }
        attempt += 1;
        eprintln!(
            "xtask: the guest did not start within {} s; booting again (attempt {attempt}/{BOOT_ATTEMPTS})",
            BOOT_TIMEOUT.as_secs()
        );
    }
    eprintln!(
        "xtask: vm finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The guest's own exit status, not vng's: a kernel panic or a failed boot leaves none.
    let status = std::fs::read_to_string(&status_file).map_err(|_| {
        "vm: the guest left no exit status (boot failure or kernel panic; see the output above)"
            .to_string()
    })?;
    let status = status
        .trim()
        .parse::<u8>()
        .map_err(|_| format!("vm: bad guest status {status:?}"))?;
    let mut outputs = std::collections::HashMap::new();
    for entry in std::fs::read_dir(&out_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            outputs.insert(name, text);
        }
    }
    Ok(VmRun { status, outputs })
}

/// Copies a child's output to ours until it closes.
fn forward(src: Option<Box<dyn Read + Send>>, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut src) = src else { return };
        let mut buf = [0u8; 8192];
        while let Ok(n) = src.read(&mut buf) {
            if n == 0 {
                break;
            }
            let r = if to_stderr {
                std::io::stderr().write_all(&buf[..n])
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&buf[..n]).and_then(|_| out.flush())
            };
            if r.is_err() {
                break;
            }
        }
    })
}

#[derive(PartialEq)]
enum Boot {
    /// The guest ran its command (whatever its status).
    Finished,
    /// The guest never reached its command: retry.
    NeverStarted,
}

/// One boot. Under heavy host load a TCG boot occasionally stalls before userspace; the
/// guest script's first act is to write `marker`, so a boot without it is killed and retried.
fn boot_once(vng: &mut Command, marker: &Path, timeout: Duration) -> Result<Boot> {
    let started = Instant::now();
    // Own process group: QEMU is vng's grandchild and must die with it.
    // QEMU reopens /proc/self/fd/1 by path for the guest's stdout, which truncates our stdout
    // when it is a regular file (a CI log): hand it pipes and copy them through.
    let mut child = vng
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("vng: cannot start (run cargo xtask install-deps): {e}"))?;
    let out = child
        .stdout
        .take()
        .map(|o| Box::new(o) as Box<dyn Read + Send>);
    let err = child
        .stderr
        .take()
        .map(|o| Box::new(o) as Box<dyn Read + Send>);
    let copiers = [forward(out, false), forward(err, true)];
    let kill_group = |child: &mut std::process::Child| {
        // SAFETY: kill(2) on our child's process group; no memory is involved.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    };
    let result = loop {
        if child.try_wait().map_err(|e| format!("vng: {e}"))?.is_some() {
            break Ok(Boot::Finished);
        }
        if !marker.exists() && started.elapsed() > BOOT_TIMEOUT {
            kill_group(&mut child);
            break Ok(Boot::NeverStarted);
        }
        if started.elapsed() > timeout {
            kill_group(&mut child);
            break Err(format!(
                "vm: timed out after {} s; the guest was killed",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for c in copiers {
        let _ = c.join();
    }
    result
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::env::var_os("PEERPIPE_KEEP_RUN").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_has_one_port_per_drive_and_cmb_on_first() {
        let imgs: Vec<PathBuf> = (0..3)
            .map(|i| PathBuf::from(format!("/x/{i}.img")))
            .collect();
        let o = qemu_devices(&imgs);
        assert_eq!(o.matches("xio3130-downstream").count(), 3);
        assert_eq!(o.matches("cmb_size_mb=64").count(), 1);
        assert!(o.contains("serial=p2p0,drive=d0,bus=dn0,cmb_size_mb=64"));
        assert!(o.contains("serial=data2,drive=d2,bus=dn2"));
    }

    #[test]
    fn options_parse_and_reject() {
        #[derive(Debug, clap::Parser)]
        struct T {
            #[command(flatten)]
            vm: VmArgs,
        }
        let parse = |v: &[&str]| {
            <T as clap::Parser>::try_parse_from(std::iter::once("vm").chain(v.iter().copied()))
                .map(|t| VmOptions::from_args(t.vm))
        };
        let o = parse(&["--drives", "2", "--", "ls", "-l"]).unwrap();
        assert_eq!(o.data_drives, 2);
        assert_eq!(o.cmd, ["ls", "-l"]);
        assert_eq!(parse(&["--", "ls"]).unwrap().data_drives, 3);
        assert_eq!(
            parse(&["--timeout=60", "--", "ls"]).unwrap().timeout,
            Duration::from_secs(60)
        );
        assert!(parse(&["--"]).is_err(), "no command");
        assert!(parse(&["--drives", "x", "--", "ls"]).is_err());
        assert!(
            parse(&["--drives", "7", "--", "ls"]).is_err(),
            "at most 6 drives"
        );
        assert!(parse(&["--bogus", "--", "ls"]).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc/d-1"), "abc/d-1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
