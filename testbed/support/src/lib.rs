//! Helpers shared by the testbed tests (tests that need the VM's devices).
//!
//! Convention: such a test carries `#[ignore = "skipped: no device ..."]`; `cargo xtask test`
//! runs it inside the testbed VM with `--ignored`, where a missing device fails it.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod link;
pub use link::{active_rxe_ports, gsi_qps_in_error, ip, verbs_holders, LinkDown};

/// Panics (fails the test) when not inside the testbed VM: these tests must never pass
/// vacuously.
pub fn require_testbed() {
    assert!(
        std::env::var_os("PEERPIPE_TESTBED").is_some(),
        "testbed test run outside the testbed VM: use `cargo xtask test`"
    );
}

/// The two "hosts" on the veth wire: (rxe0's address, rxe1's address).
pub fn addrs() -> (String, String) {
    (
        std::env::var("PEERPIPE_ADDR0").unwrap_or_else(|_| "10.77.0.1".into()),
        std::env::var("PEERPIPE_ADDR1").unwrap_or_else(|_| "10.77.0.2".into()),
    )
}

/// Number of emulated NVMe drives the VM was booted with.
pub fn drive_count() -> usize {
    std::env::var("PEERPIPE_DRIVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("PEERPIPE_DRIVES is set by the testbed")
}

/// An emulated NVMe drive: its block device and passthrough char device.
#[derive(Debug, Clone)]
pub struct Drive {
    /// The drive's serial number (as in the QEMU `-device nvme,serial=`).
    pub serial: String,
    /// The block device (`/dev/nvmeXnY`).
    pub block: PathBuf,
    /// The passthrough char device (`/dev/ngXnY`).
    pub ng: PathBuf,
    /// The LBA size in bytes.
    pub lba_size: u64,
}

/// All drives, found by their serial (`p2p0` has the CMB; `data1`, `data2`, ... are plain).
pub fn drives() -> Vec<Drive> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("nvme") {
            continue;
        }
        let serial = std::fs::read_to_string(e.path().join("device/serial"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let lba_size = std::fs::read_to_string(e.path().join("queue/logical_block_size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512);
        out.push(Drive {
            serial,
            block: Path::new("/dev").join(&name),
            ng: Path::new("/dev").join(name.replacen("nvme", "ng", 1)),
            lba_size,
        });
    }
    out.sort_by(|a, b| a.serial.cmp(&b.serial));
    out
}

/// The drive with serial `serial`; panics (failing the test) when the testbed has none.
pub fn drive(serial: &str) -> Drive {
    drives()
        .into_iter()
        .find(|d| d.serial == serial)
        .unwrap_or_else(|| panic!("no NVMe drive with serial {serial}"))
}

/// Runs a command to completion within `timeout`, killing it past that.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    wait(child, timeout, &format!("{cmd:?}"))
}

/// Waits for a spawned child (stdout/stderr piped) within `timeout`.
pub fn wait(mut child: Child, timeout: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spawns a server-side command with piped output.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// A spawned process whose output lines are read as they come, so a test waits for a line
/// the program printed (a "listening" line, a progress count) instead of sleeping a fixed
/// time. Lines of stdout and stderr both reach [`Watched::wait_line`]; all bytes are kept
/// for [`Watched::finish`].
pub struct Watched {
    child: Child,
    what: String,
    lines: mpsc::Receiver<String>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

fn pump(
    src: impl Read + Send + 'static,
    keep: Arc<Mutex<Vec<u8>>>,
    tx: mpsc::Sender<String>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        // Lines end at '\n' or '\r' (a terminal-style progress line rewrites itself with '\r').
        loop {
            line.clear();
            let mut byte = [0u8; 1];
            loop {
                match r.read(&mut byte) {
                    Ok(1) => {
                        keep.lock().unwrap().push(byte[0]);
                        if byte[0] == b'\n' || byte[0] == b'\r' {
                            break;
                        }
                        line.push(byte[0]);
                    }
                    _ => {
                        if !line.is_empty() {
                            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                        }
                        return;
                    }
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    })
}

/// Spawns `cmd` with its output watched (see [`Watched`]); `what` names it in failures.
pub fn spawn_watched(cmd: &mut Command, what: &str) -> Watched {
    let mut child = spawn(cmd);
    let (tx, rx) = mpsc::channel();
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let readers = vec![
        pump(
            child.stdout.take().expect("piped stdout"),
            out.clone(),
            tx.clone(),
        ),
        pump(child.stderr.take().expect("piped stderr"), err.clone(), tx),
    ];
    Watched {
        child,
        what: what.to_string(),
        lines: rx,
        out,
        err,
        readers,
    }
}

impl Watched {
    /// The output so far, for failure messages.
    pub fn so_far(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&self.out.lock().unwrap()),
            String::from_utf8_lossy(&self.err.lock().unwrap())
        )
    }

    /// Waits until the process prints a line for which `pick` returns `Some`, and returns
    /// that. Fails the test (with the output so far) when the process ends first or
    /// `timeout` passes: a generous bound for a hang, never a pacing device.
    pub fn wait_for<T>(&mut self, timeout: Duration, pick: impl FnMut(&str) -> Option<T>) -> T {
        match self.try_wait_for(timeout, pick) {
            Ok(v) => v,
            Err(why) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{why}\n{}", self.so_far());
            }
        }
    }

    /// [`Watched::wait_for`] that says why it gave up (the process ended, or `timeout`
    /// passed) instead of failing the test, so the caller can gather more evidence first.
    pub fn try_wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    if let Some(v) = pick(&line) {
                        return Ok(v);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(e) => {
                    let ended = matches!(e, mpsc::RecvTimeoutError::Disconnected);
                    return Err(format!(
                        "{}: {} before the awaited line",
                        self.what,
                        if ended { "ended" } else { "timed out" },
                    ));
                }
            }
        }
    }

    /// Waits for a line containing `needle` and returns it (see [`Watched::wait_for`]).
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for(timeout, |l| l.contains(needle).then(|| l.to_string()))
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill");
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// Waits for the process to exit within `timeout` (else kills it and fails the test) and
    /// returns all its output.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                panic!(
                    "{} did not finish within {timeout:?}\n{}",
                    self.what,
                    self.so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let stdout = std::mem::take(&mut *self.out.lock().unwrap());
        let stderr = std::mem::take(&mut *self.err.lock().unwrap());
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Watched {
    /// A test that fails midway leaves no process behind to disturb the next test.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A command's exit status, stdout and stderr as text, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The sysfs `p2pmem/allocate` attribute of the (first) p2pmem provider.
pub fn sysfs_allocate() -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/sys/bus/pci/devices")
        .expect("sysfs")
        .flatten()
        .map(|e| e.path().join("p2pmem/allocate"))
        .filter(|p| p.exists())
        .collect();
    v.sort();
    v.into_iter().next().expect("a p2pmem provider")
}

/// A fresh p2pmem allocation: a shared read-write mapping of `/dev/p2pmemN` or of a sysfs
/// `allocate` attribute (every mmap of either allocates from the provider), unmapped on drop.
/// Tests use it to reach the kernel directly, without the library's allocator.
pub struct P2pMap {
    ptr: *mut u8,
    len: usize,
    _file: std::fs::File,
}

// SAFETY: the mapping is owned by the value and reachable only through it.
unsafe impl Send for P2pMap {}

impl P2pMap {
    /// Maps `len` bytes of `path`; panics (fails the test) with the errno if mmap fails.
    pub fn new(path: &Path, len: usize) -> P2pMap {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // SAFETY: a fresh shared mapping of a device file; no Rust object aliases it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        P2pMap {
            ptr: ptr.cast(),
            len,
            _file: file,
        }
    }

    /// Start of the mapping, writable.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes (CPU view; p2pmem is read over PCIe).
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live for self's lifetime and only reachable through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for P2pMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; nothing borrows it past self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
