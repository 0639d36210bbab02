//! The tracing subscriber every `peerpipe` command installs: `tracing-subscriber`'s fmt layer
//! on stderr, filtered by `RUST_LOG` when set, else by the `-v/-q` count (warn by default, so
//! the library's warnings, such as a ring leaking its buffers, are never lost).

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// The level for `verbose` `-v`s and `quiet` `-q`s: warn by default, -v info, -vv debug,
/// -vvv trace; -q error, -qq off.
pub fn level(verbose: u8, quiet: u8) -> &'static str {
    match i16::from(verbose) - i16::from(quiet) {
        i16::MIN..=-2 => "off",
        -1 => "error",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    }
}

/// Installs the subscriber once (later calls do nothing).
pub fn init(verbose: u8, quiet: u8) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level(verbose, quiet)));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
