//! peerpipe's tooling, run as `cargo xtask <command>`.
//!
//! - `install-deps`: Debian packages, qemu from backports, virtme-ng (idempotent).
//! - `testbed build`: the testbed kernel (cached by a hash of its recipe); `testbed hash`: that hash.
//! - `vm [--drives N] [--timeout SECS] [--memory SIZE] -- CMD...`: boot the testbed VM and run
//!   CMD as root in it.
//! - `test`: host `cargo test`, then the in-VM suite in one VM boot.
//! - `demo`: the README's main command.
//! - `guest-suite FILE`: (inside the VM) run the test binaries listed in FILE.
//!
//! (clap: `cargo xtask help`, `cargo xtask <command> --help`; usage errors exit 2.)

mod kernel;
mod suite;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Result of an xtask step: the error is the message printed before exiting.
pub type Result<T> = std::result::Result<T, String>;

/// peerpipe's tooling: the testbed kernel and VM, the test suite, the demo.
#[derive(Debug, clap::Parser)]
#[command(name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Debian packages, qemu from backports, virtme-ng (idempotent)
    InstallDeps,
    /// The testbed kernel (cached by a hash of its recipe)
    Testbed {
        #[command(subcommand)]
        what: TestbedCmd,
    },
    /// Boot the testbed VM and run CMD as root in it (cargo xtask vm -- CMD...)
    Vm(vm::VmArgs),
    /// Host `cargo test`, then the in-VM suite in one VM boot (-- FILTER... narrows both)
    Test(suite::TestArgs),
    /// The README's main command: the demo in the testbed VM
    Demo,
    /// (Inside the VM) run the test binaries listed in FILE
    GuestSuite {
        /// The list the host wrote
        file: PathBuf,
    },
}

#[derive(Debug, clap::Subcommand)]
enum TestbedCmd {
    /// Build the testbed kernel (or find it cached) and print its path
    Build,
    /// Print the recipe's hash
    Hash,
}

fn main() -> ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    match run(cli.cmd) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cmd: Cmd) -> Result<u8> {
    match cmd {
        Cmd::InstallDeps => install_deps().map(|_| 0),
        Cmd::Testbed {
            what: TestbedCmd::Build,
        } => {
            install_deps()?;
            let image = kernel::ensure_kernel()?;
            println!("{}", image.display());
            Ok(0)
        }
        Cmd::Testbed {
            what: TestbedCmd::Hash,
        } => {
            println!("{}", kernel::recipe_hash()?);
            Ok(0)
        }
        Cmd::Vm(args) => {
            let opts = vm::VmOptions::from_args(args);
            install_deps()?;
            let kernel = kernel::ensure_kernel()?;
            vm::run_in_vm(&kernel, &opts).map(|r| r.status)
        }
        Cmd::Test(args) => suite::test(&args),
        Cmd::Demo => {
            install_deps()?;
            let kernel = kernel::ensure_kernel()?;
            build_workspace_bins()?;
            let opts = vm::VmOptions::for_command(vec![
                "bash".into(),
                repo_root().join("testbed/demo.sh").display().to_string(),
            ]);
            vm::run_in_vm(&kernel, &opts).map(|r| r.status)
        }
        Cmd::GuestSuite { file } => suite::guest_suite(&file),
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
