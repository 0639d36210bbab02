//! `cargo xtask test`: host tests, then the in-VM suite in one VM boot.
//!
//! Convention: a test that needs the testbed's devices is `#[ignore = "skipped: no device ..."]`.
//! The host run reports it as ignored (never as passed); the VM runs every test binary with
//! `--ignored`, so there those tests execute and a missing device fails them.

use crate::{cache_dir, kernel, repo_root, vm, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One test binary may not run longer than this in the VM.
const BINARY_TIMEOUT: Duration = Duration::from_secs(20 * 60);

#[derive(Default, Debug, PartialEq)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// Parses libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
fn parse_result_line(line: &str) -> Option<Tally> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut t = Tally::default();
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        // Other parts ("finished in 0.01s") are not counts: skip them.
        let (n, what) = match words.as_slice() {
            [.., n, what] => match n.parse::<u64>() {
                Ok(n) => (n, *what),
                Err(_) => continue,
            },
            _ => continue,
        };
        match what {
            "passed" => t.passed = n,
            "failed" => t.failed = n,
            "ignored" => t.ignored = n,
            _ => {}
        }
    }
    Some(t)
}

/// Runs `cmd`, echoing its stdout line by line, and sums its libtest result lines.
fn run_tallied(cmd: &mut Command, timeout: Option<Duration>) -> Result<(bool, Tally, bool)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut t = Tally::default();
        let mut saw_result = false;
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            println!("{line}");
            if let Some(r) = parse_result_line(&line) {
                t.add(&r);
                saw_result = true;
            }
        }
        (t, saw_result)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(st);
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (tally, saw_result) = reader.join().map_err(|_| "output reader panicked")?;
    Ok((status.is_some_and(|s| s.success()), tally, saw_result))
}

/// `cargo xtask test [--host-only|--vm-only] [-- FILTER...]`
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Only the host's `cargo test`
    #[arg(long, conflicts_with = "vm_only")]
    host_only: bool,
    /// Only the in-VM suite
    #[arg(long)]
    vm_only: bool,
    /// Test name filters, passed to every test binary
    #[arg(last = true, value_name = "FILTER")]
    filter: Vec<String>,
}

pub fn test(args: &TestArgs) -> Result<u8> {
    let (host, in_vm) = (!args.vm_only, !args.host_only);
    let filter = args.filter.clone();
    crate::install_deps()?;
    let root = repo_root();
    let mut ok = true;
    let mut host_tally = Tally::default();

    if host {
        println!("==> host: cargo test --workspace");
        let (passed, t, _) = run_tallied(
            Command::new("cargo")
                .current_dir(&root)
                .args(["test", "--workspace", "--"])
                .args(&filter),
            None,
        )?;
        ok &= passed;
        println!(
            "host: {} passed, {} failed, {} ignored (ignored = testbed tests, run in the VM below)",
            t.passed, t.failed, t.ignored
        );
        host_tally = t;
    }

    let mut vm_status = 0u8;
    if in_vm {
        // The guest runs this very binary: keep a copy, since building the workspace below
        // may replace target/debug/xtask (a dependency's features unify differently in a
        // workspace build than in `cargo run -p xtask`).
        let xtask = cache_dir().join(format!("xtask-{}", std::process::id()));
        std::fs::copy(std::env::current_exe().map_err(|e| e.to_string())?, &xtask)
            .map_err(|e| format!("copying the xtask binary: {e}"))?;
        println!("==> testbed: building test binaries on the host");
        let list = test_binaries(&root)?;
        crate::build_workspace_bins()?;
        let list_file = cache_dir().join(format!("suite-{}.txt", std::process::id()));
        let mut text = String::new();
        for (exe, cwd) in &list {
            text.push_str(&format!("{}\t{}\n", exe.display(), cwd.display()));
        }
        if !filter.is_empty() {
            text.push_str(&format!("#filter\t{}\n", filter.join("\t")));
        }
        std::fs::write(&list_file, text).map_err(|e| format!("suite list: {e}"))?;
        let kernel = kernel::ensure_kernel()?;
        println!("==> testbed: booting the VM and running the suite");
        let opts = vm::VmOptions::for_command(vec![
            xtask.display().to_string(),
            "guest-suite".into(),
            list_file.display().to_string(),
        ]);
        let r = vm::run_in_vm(&kernel, &opts);
        let _ = std::fs::remove_file(&list_file);
        let _ = std::fs::remove_file(&xtask);
        let run = r?;
        vm_status = run.status;
        ok &= vm_status == 0;
        let mut vm_tally = Tally::default();
        if let Some(t) = run.outputs.get("tally") {
            let mut f = t.split_whitespace().map(|n| n.parse::<u64>().unwrap_or(0));
            vm_tally.passed = f.next().unwrap_or(0);
            vm_tally.failed = f.next().unwrap_or(0);
        } else {
            println!("testbed: the suite left no tally (see the output above)");
            vm_tally.failed += 1;
            ok = false;
        }
        host_tally.add(&vm_tally);
    }
    println!(
        "total: {} passed, {} failed",
        host_tally.passed, host_tally.failed
    );
    Ok(if ok { 0 } else { vm_status.max(1) })
}

/// Test executables of the workspace (with their package dirs), built on the host.
fn test_binaries(root: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(root)
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo test --no-run: {e}"))?;
    if !out.status.success() {
        return Err("cargo test --no-run failed".into());
    }
    let mut list = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) = (v["executable"].as_str(), v["manifest_path"].as_str())
        else {
            continue;
        };
        let dir = Path::new(manifest).parent().unwrap_or(root).to_path_buf();
        list.push((PathBuf::from(exe), dir));
    }
    if list.is_empty() {
        return Err("no test binaries found".into());
    }
    Ok(list)
}

/// Inside the VM: run each listed binary's ignored (= testbed) tests, serially.
pub fn guest_suite(list_file: &Path) -> Result<u8> {
    let text =
        std::fs::read_to_string(list_file).map_err(|e| format!("{}: {e}", list_file.display()))?;
    let mut filter: Vec<String> = Vec::new();
    let mut bins = Vec::new();
    for line in text.lines() {
        let mut f = line.split('\t');
        match (f.next(), f.next()) {
            (Some("#filter"), _) => filter = line.split('\t').skip(1).map(String::from).collect(),
            (Some(exe), Some(cwd)) => bins.push((exe.to_string(), cwd.to_string())),
            _ => {}
        }
    }
    let mut total = Tally::default();
    let mut crashed = Vec::new();
    for (exe, cwd) in &bins {
        let name = Path::new(exe)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        println!("==> testbed: {name}");
        let (ok, t, saw_result) = run_tallied(
            Command::new(exe)
                .current_dir(cwd)
                .args(["--ignored", "--test-threads=1"])
                .args(&filter)
                .env("RUST_BACKTRACE", "1"),
            Some(BINARY_TIMEOUT),
        )?;
        if !ok && (t.failed == 0 || !saw_result) {
            // Killed by the timeout, a signal or an abort: count it, never lose it.
            crashed.push(name.clone());
            total.failed += 1;
        }
        total.add(&t);
    }
    for c in &crashed {
        println!("testbed: {c} crashed or timed out");
    }
    println!("testbed: {} passed, {} failed", total.passed, total.failed);
    if let Some(out) = std::env::var_os("PEERPIPE_OUT") {
        let _ = std::fs::write(
            Path::new(&out).join("tally"),
            format!("{} {}\n", total.passed, total.failed),
        );
    }
    if total.passed == 0 && filter.is_empty() {
        println!("testbed: no test ran in the VM; the suite is broken");
        return Ok(1);
    }
    Ok(if total.failed == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_summary() {
        let t = parse_result_line(
            "test result: ok. 12 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        )
        .unwrap();
        assert_eq!(
            t,
            Tally {
                passed: 12,
                failed: 1,
                ignored: 3
            }
        );
        assert!(parse_result_line("running 3 tests").is_none());
    }
}
