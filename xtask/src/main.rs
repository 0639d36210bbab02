//! peerpipe's tooling, run as `cargo xtask <command>`.
//!
//! - `install-deps`: Debian packages, qemu from backports, virtme-ng (idempotent).
//! - `testbed build`: the testbed kernel (cached by a hash of its recipe); `testbed hash`: that hash.
//! - `vm [--drives N] [--timeout SECS] -- CMD...`: boot the testbed VM and run CMD as root in it.
//! - `test`: host `cargo test`, then the in-VM suite in one VM boot.
//! - `demo`: the README's main command.
//! - `guest-suite FILE`: (inside the VM) run the test binaries listed in FILE.

mod kernel;
mod suite;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Result of an xtask step: the error is the message printed before exiting.
pub type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}

const USAGE: &str = "usage: cargo xtask <install-deps | testbed build | testbed hash | vm [--drives N] [--timeout SECS] -- CMD... | test [--host-only|--vm-only] | demo | guest-suite FILE>";

fn run(args: &[String]) -> Result<u8> {
    let first = args.first().map(String::as_str);
    match first {
        Some("install-deps") => install_deps().map(|_| 0),
        Some("testbed") if args.get(1).map(String::as_str) == Some("build") => {
            install_deps()?;
            let image = kernel::ensure_kernel()?;
            println!("{}", image.display());
            Ok(0)
        }
        Some("testbed") if args.get(1).map(String::as_str) == Some("hash") => {
            println!("{}", kernel::recipe_hash()?);
            Ok(0)
        }
        Some("vm") => {
            let opts = vm::VmOptions::parse(&args[1..])?;
            install_deps()?;
            let kernel = kernel::ensure_kernel()?;
            vm::run_in_vm(&kernel, &opts).map(|r| r.status)
        }
        Some("test") => suite::test(&args[1..]),
        Some("demo") => {
            install_deps()?;
            let kernel = kernel::ensure_kernel()?;
            build_workspace_bins()?;
            let opts = vm::VmOptions::for_command(vec![
                "bash".into(),
                repo_root().join("testbed/demo.sh").display().to_string(),
            ]);
            vm::run_in_vm(&kernel, &opts).map(|r| r.status)
        }
        Some("guest-suite") => {
            let file = args.get(1).ok_or(USAGE)?;
            suite::guest_suite(Path::new(file))
        }
        _ => Err(USAGE.into()),
    }
}

/// The checkout's top directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// `$XDG_CACHE_HOME/peerpipe` or `~/.cache/peerpipe`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("peerpipe")
}

/// The virtme-ng venv's bin directory (installed by `testbed/install-deps.sh`).
pub fn venv_bin() -> PathBuf {
    cache_dir().join("venv/bin")
}

fn install_deps() -> Result<()> {
    let script = repo_root().join("testbed/install-deps.sh");
    status(Command::new("bash").arg(&script), "testbed/install-deps.sh")
}

/// Builds every binary the VM runs: examples and the workspace's bins, on the host.
pub fn build_workspace_bins() -> Result<()> {
    status(
        Command::new("cargo").current_dir(repo_root()).args([
            "build",
            "--quiet",
            "--workspace",
            "--bins",
            "--examples",
        ]),
        "cargo build --bins --examples",
    )
}

/// Runs `cmd` and turns a non-zero exit into an error naming `what`.
pub fn status(cmd: &mut Command, what: &str) -> Result<()> {
    let st = cmd
        .status()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{what}: failed ({st})"))
    }
}
