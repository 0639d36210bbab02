//! The command line of `peerpipe target` (clap): global options plus repeated subsystem
//! groups (`--nqn A --ns P [--ns P...] [--allow-host H...] --nqn B ...`), like the kernel
//! target's several subsystems on one port. Every `--ns` and `--allow-host` belongs to the
//! `--nqn` before it: clap collects the values, [`from_matches`] groups them by their
//! positions on the command line. Errors are plain messages; the caller exits 2 with them.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{ArgMatches, FromArgMatches as _};
use peerpipe::nvmf::server::BufferChoice;
use peerpipe::nvmf::{NamespaceConfig, SubsystemConfig, TargetConfig};

use crate::common::OutputFormat;

/// Printed after the options by `peerpipe target --help`.
pub const AFTER_HELP: &str = "\
--ns SPEC is PATH[,uuid=UUID][,nguid=HEX32]. PATH: /dev/ngXnY (NVMe passthrough), a block
device (opened O_EXCL) or a file, all with O_DIRECT; a path may serve one namespace only.
UUID: 8-4-4-4-12 hex digits (or 32 hex digits); NGUID: 32 hex digits; neither may be all zero
or repeat another namespace's. Default: derived stably from the subsystem NQN and the nsid.
Namespaces are numbered 1, 2, ... in order in each subsystem. Several subsystems share the
port and `nvme discover` lists them all.

--output-format=json prints one JSON object with the statistics on stdout at exit:
  {\"commands\":N,\"errors\":N,\"rdma_read_bytes\":N,\"rdma_write_bytes\":N,
   \"payload_bytes_copied\":N,\"busy_poll_hits\":N,\"busy_poll_misses\":N,
   \"error\":null|\"message\"}

exit codes: 0 stopped by SIGINT/SIGTERM; 1 setup or serving failure; 2 usage error (bad
combinations: an --ns or --allow-host before any --nqn, a subsystem without --ns, a repeated
NQN, path, UUID or NGUID, an unknown namespace option).

example: peerpipe target --listen 10.0.0.2 --nqn nqn.2026-11.io.example:a --ns /dev/ng1n1 \\
           --nqn nqn.2026-11.io.example:b --ns /dev/nvme2n1,uuid=0f8e4c2a-1d3b-4e5f-8a9b-0c1d2e3f4a5b";

/// The options as clap sees them; [`from_matches`] turns them into [`Args`].
#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Local address of an RDMA device (port 4420 by default)
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// Starts a subsystem; the --ns and --allow-host options after it, up to the next
    /// --nqn, belong to it
    #[arg(long, value_name = "NQN", required = true)]
    pub nqn: Vec<String>,
    /// A namespace of the current subsystem: PATH[,uuid=UUID][,nguid=HEX32]
    #[arg(long, value_name = "SPEC")]
    pub ns: Vec<String>,
    /// The current subsystem accepts only these hosts (default: any host)
    #[arg(long, value_name = "HOSTNQN")]
    pub allow_host: Vec<String>,
    /// Data buffers in p2pmem, host memory, or p2pmem when usable
    #[arg(long, value_name = "p2p|host|auto", default_value = "auto", value_parser = parse_buffers)]
    pub buffers: BufferChoice,
    /// Microseconds a queue with at most one command in the works polls for the next command
    /// or drive completion before it sleeps (0: sleep at once); spends CPU to save the
    /// wake-ups of each command at queue depth 1, and backs off on queues that find nothing
    #[arg(long, value_name = "USECS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub busy_poll: u64,
    /// Statistics at exit as a JSON line on stdout (json); --json is short for it
    #[arg(long, value_enum, value_name = "normal|json", default_value = "normal")]
    pub output_format: OutputFormat,
    /// Same as --output-format=json
    #[arg(long)]
    pub json: bool,
}

fn parse_buffers(v: &str) -> Result<BufferChoice, String> {
    v.parse()
}

/// The parsed command line.
#[derive(Debug)]
pub struct Args {
    /// rdma_cm listen address.
    pub listen: SocketAddr,
    /// Subsystems in command-line order, namespaces numbered from 1 in each.
    pub subsystems: Vec<SubsystemConfig>,
    /// Where the data buffers live.
    pub buffers: BufferChoice,
    /// Statistics at exit as JSON.
    pub json: bool,
    /// [`TargetConfig::busy_poll`].
    pub busy_poll: std::time::Duration,
}

impl Args {
    /// The target configuration (defaults of [`TargetConfig::new`] for the limits).
    pub fn config(&self) -> TargetConfig {
        let mut cfg = TargetConfig::new(self.listen);
        cfg.subsystems = self.subsystems.clone();
        cfg.busy_poll = self.busy_poll;
        cfg
    }
}

fn parse_listen(v: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip = v
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map_err(|_| format!("{v:?}: not an ADDR or ADDR:PORT"))?;
    Ok(SocketAddr::new(ip, 4420))
}

/// 32 hex digits (dashes allowed anywhere, as in the UUID text form) -> 16 bytes.
fn hex16(what: &str, v: &str, dashes: bool) -> Result<[u8; 16], String> {
    let digits: String = if dashes {
        let groups: Vec<&str> = v.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if groups.len() != 1 && lens != [8, 4, 4, 4, 12] {
            return Err(format!(
                "{what}={v:?}: not 8-4-4-4-12 hex digits or 32 hex digits"
            ));
        }
        groups.concat()
    } else {
        v.to_string()
    };
    if digits.len() != 32 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        let form = if dashes {
            "8-4-4-4-12 hex digits or "
        } else {
            ""
        };
        return Err(format!("{what}={v:?}: needs {form}32 hex digits"));
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{what}={v:?}: needs 32 hex digits"))?;
    }
    if out == [0; 16] {
        return Err(format!(
            "{what}={v:?}: all zero means \"no {what}\"; leave it out for a derived one"
        ));
    }
    Ok(out)
}

/// `PATH[,uuid=UUID][,nguid=HEX32]` -> a namespace numbered `nsid`.
fn parse_ns(spec: &str, nsid: u32) -> Result<NamespaceConfig, String> {
    let mut parts = spec.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!("--ns {spec:?}: no path"));
    }
    let mut ns = NamespaceConfig {
        nsid,
        path: PathBuf::from(path),
        uuid: None,
        nguid: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("uuid", v)) if ns.uuid.is_none() => ns.uuid = Some(hex16("uuid", v, true)?),
            Some(("nguid", v)) if ns.nguid.is_none() => ns.nguid = Some(hex16("nguid", v, false)?),
            Some(("uuid" | "nguid", _)) => {
                return Err(format!("--ns {spec:?}: {opt:?} given twice"))
            }
            _ => {
                return Err(format!(
                    "--ns {spec:?}: unknown namespace option {opt:?} (known: uuid=, nguid=)"
                ))
            }
        }
    }
    Ok(ns)
}

fn new_subsystem(nqn: String) -> SubsystemConfig {
    SubsystemConfig {
        serial: format!("peerpipe{:08x}", fnv(&nqn)),
        nqn,
        namespaces: Vec::new(),
        allowed_hosts: Vec::new(),
        model: "peerpipe nvmf target".into(),
    }
}

/// The [`Args`] of the `target` subcommand's matches: groups each `--ns` and `--allow-host`
/// with the `--nqn` before it on the command line, then checks the whole configuration.
pub fn from_matches(m: &ArgMatches) -> Result<Args, String> {
    let t = TargetArgs::from_arg_matches(m).map_err(|e| e.to_string())?;
    let at =
        |id: &str| -> Vec<usize> { m.indices_of(id).map(Iterator::collect).unwrap_or_default() };
    enum Opt {
        Nqn(String),
        Ns(String),
        Host(String),
    }
    let mut opts: Vec<(usize, Opt)> = Vec::new();
    opts.extend(
        at("nqn")
            .into_iter()
            .zip(t.nqn)
            .map(|(i, v)| (i, Opt::Nqn(v))),
    );
    opts.extend(at("ns").into_iter().zip(t.ns).map(|(i, v)| (i, Opt::Ns(v))));
    opts.extend(
        at("allow_host")
            .into_iter()
            .zip(t.allow_host)
            .map(|(i, v)| (i, Opt::Host(v))),
    );
    opts.sort_by_key(|(i, _)| *i);
    let mut subsystems: Vec<SubsystemConfig> = Vec::new();
    for (_, o) in opts {
        match o {
            Opt::Nqn(n) => subsystems.push(new_subsystem(n)),
            Opt::Ns(spec) => {
                let s = subsystems
                    .last_mut()
                    .ok_or(format!("--ns {spec}: comes before any --nqn (a namespace belongs to the --nqn before it)"))?;
                let nsid = s.namespaces.len() as u32 + 1;
                s.namespaces.push(parse_ns(&spec, nsid)?);
            }
            Opt::Host(h) => {
                let s = subsystems.last_mut().ok_or(format!(
                    "--allow-host {h}: comes before any --nqn (it belongs to the --nqn before it)"
                ))?;
                if !s.allowed_hosts.contains(&h) {
                    s.allowed_hosts.push(h);
                }
            }
        }
    }
    check(&subsystems)?;
    let a = Args {
        listen: t.listen,
        subsystems,
        buffers: t.buffers,
        json: t.json || t.output_format == OutputFormat::Json,
        busy_poll: std::time::Duration::from_micros(t.busy_poll),
    };
    a.config().validate().map_err(|e| e.to_string())?;
    Ok(a)
}

/// Parses the arguments after `peerpipe target` as the binary does; `Err("")` means `--help`.
#[cfg(test)]
pub fn parse(it: impl Iterator<Item = String>) -> Result<Args, String> {
    use clap::CommandFactory as _;
    let argv = ["peerpipe".to_string(), "target".to_string()]
        .into_iter()
        .chain(it);
    let m = crate::Cli::command()
        .try_get_matches_from(argv)
        .map_err(|e| match e.kind() {
            clap::error::ErrorKind::DisplayHelp => String::new(),
            _ => e.to_string(),
        })?;
    from_matches(
        m.subcommand_matches("target")
            .ok_or("no target subcommand")?,
    )
}

/// Cross-subsystem checks the configuration itself does not make.
fn check(subsystems: &[SubsystemConfig]) -> Result<(), String> {
    let (mut nqns, mut paths, mut ids) = (HashSet::new(), HashSet::new(), HashSet::new());
    for s in subsystems {
        if !nqns.insert(s.nqn.as_str()) {
            return Err(format!("--nqn {} given twice", s.nqn));
        }
        if s.namespaces.is_empty() {
            return Err(format!(
                "--nqn {} has no --ns (every subsystem needs a namespace)",
                s.nqn
            ));
        }
        for n in &s.namespaces {
            // The same file under two names is caught when opening (O_EXCL / EBUSY for
            // block devices); canonical paths catch the common spellings here.
            let key = std::fs::canonicalize(&n.path).unwrap_or_else(|_| n.path.clone());
            if !paths.insert(key) {
                return Err(format!(
                    "--ns {}: the same path serves two namespaces",
                    n.path.display()
                ));
            }
            // The Linux host rejects two namespaces with one ID as duplicates.
            for (what, id) in [
                ("uuid", n.effective_uuid(&s.nqn)),
                ("nguid", n.effective_nguid(&s.nqn)),
            ] {
                if !ids.insert((what, id)) {
                    return Err(format!(
                        "--ns {}: {what} repeats another namespace's",
                        n.path.display()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A short stable hash of the NQN for the serial number (FNV-1a).
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    fn err(v: &[&str]) -> String {
        args(v)
            .err()
            .unwrap_or_else(|| panic!("{v:?} was accepted"))
    }

    #[test]
    fn listen_port_defaults_to_4420_and_required_options_are_named() {
        let a = args(&[
            "--listen",
            "10.77.0.2",
            "--nqn",
            "nqn.x",
            "--ns",
            "/dev/null",
        ])
        .unwrap();
        assert_eq!(a.listen, "10.77.0.2:4420".parse().unwrap());
        let a = args(&[
            "--listen",
            "10.77.0.2:4421",
            "--nqn",
            "n",
            "--ns",
            "a",
            "--ns",
            "b",
        ])
        .unwrap();
        assert_eq!(a.listen.port(), 4421);
        let j = args(&[
            "--listen=1.2.3.4",
            "--nqn=n",
            "--ns=a",
            "--output-format=json",
        ])
        .unwrap();
        assert!(j.json);
        assert!(
            args(&["--listen=1.2.3.4", "--nqn=n", "--ns=a", "--json"])
                .unwrap()
                .json
        );
        assert_eq!(a.subsystems[0].namespaces.len(), 2);
        assert_eq!(a.subsystems[0].namespaces[1].nsid, 2);
        assert!(err(&["--nqn", "n", "--ns", "a"]).contains("--listen"));
        assert!(err(&["--listen", "1.2.3.4"]).contains("--nqn"));
        assert!(err(&["--listen", "1.2.3.4", "--nqn", "n"]).contains("no --ns"));
        assert!(err(&["--listen", "nope", "--nqn", "n", "--ns", "a"]).contains("nope"));
        let e = err(&[
            "--listen",
            "1.2.3.4",
            "--nqn",
            "n",
            "--ns",
            "a",
            "--buffers",
            "gpu",
        ]);
        assert!(e.contains("gpu"), "{e}");
        assert_eq!(args(&["--help"]).err().unwrap(), "");
    }

    #[test]
    fn busy_poll_reaches_the_config_and_defaults_to_one_millisecond() {
        let base = ["--listen=1.2.3.4", "--nqn=n", "--ns=a"];
        let a = args(&base).unwrap();
        assert_eq!(a.config().busy_poll, std::time::Duration::from_millis(1));
        assert_eq!(
            args(&[&base[..], &["--busy-poll=0"]].concat())
                .unwrap()
                .config()
                .busy_poll,
            std::time::Duration::ZERO
        );
        let a = args(&[&base[..], &["--busy-poll=250"]].concat()).unwrap();
        assert_eq!(a.config().busy_poll, std::time::Duration::from_micros(250));
        for bad in ["--busy-poll=-1", "--busy-poll=1000001", "--busy-poll=x"] {
            let e = err(&[&base[..], &[bad]].concat());
            assert!(e.contains("--busy-poll"), "{e}");
        }
    }

    #[test]
    fn groups_own_the_namespaces_and_hosts_after_their_nqn() {
        let a = args(&[
            "--nqn",
            "nqn.a",
            "--ns",
            "/x/a1",
            "--allow-host",
            "nqn.h1",
            "--ns",
            "/x/a2",
            "--listen",
            "10.0.0.1:4430",
            "--nqn",
            "nqn.b",
            "--ns",
            "/x/b1,uuid=0f8e4c2a-1d3b-4e5f-8a9b-0c1d2e3f4a5b,nguid=00112233445566778899aabbccddeeff",
            "--verbose",
        ])
        .unwrap();
        assert!(!a.json);
        let [sa, sb] = &a.subsystems[..] else {
            panic!("{:?}", a.subsystems)
        };
        assert_eq!(sa.nqn, "nqn.a");
        assert_eq!(sa.allowed_hosts, ["nqn.h1"]);
        let paths: Vec<_> = sa
            .namespaces
            .iter()
            .map(|n| (n.nsid, n.path.clone()))
            .collect();
        assert_eq!(paths, [(1, "/x/a1".into()), (2, "/x/a2".into())]);
        assert_eq!(sa.namespaces[0].uuid, None);
        assert_eq!(sb.nqn, "nqn.b");
        assert!(sb.allowed_hosts.is_empty());
        assert_eq!(sb.namespaces[0].nsid, 1);
        assert_eq!(
            sb.namespaces[0].uuid,
            Some([
                0x0f, 0x8e, 0x4c, 0x2a, 0x1d, 0x3b, 0x4e, 0x5f, 0x8a, 0x9b, 0x0c, 0x1d, 0x2e, 0x3f,
                0x4a, 0x5b
            ])
        );
        assert_eq!(
            sb.namespaces[0].nguid.unwrap()[..4],
            [0x00, 0x11, 0x22, 0x33]
        );
        assert_ne!(sa.serial, sb.serial);
        let cfg = a.config();
        assert_eq!(cfg.subsystems.len(), 2);
        assert_eq!(cfg.listen.port(), 4430);
    }

    #[test]
    fn bad_combinations_are_refused_with_the_reason() {
        let l = ["--listen", "1.2.3.4"];
        let cases: &[(&[&str], &str)] = &[
            (&["--ns", "/x/a", "--nqn", "n"], "before any --nqn"),
            (&["--allow-host", "h", "--nqn", "n", "--ns", "/x/a"], "before any --nqn"),
            (&["--nqn", "n", "--ns", "/x/a", "--nqn", "m"], "--nqn m has no --ns"),
            (&["--nqn", "n", "--ns", "/x/a", "--nqn", "n", "--ns", "/x/b"], "given twice"),
            (&["--nqn", "n", "--ns", "/x/a", "--nqn", "m", "--ns", "/x/a"], "same path"),
            (&["--nqn", "n", "--ns", "/x/a,size=3"], "unknown namespace option"),
            (&["--nqn", "n", "--ns", ",uuid=1"], "no path"),
            (&["--nqn", "n", "--ns", "/x/a,uuid=1234"], "8-4-4-4-12"),
            (&["--nqn", "n", "--ns", "/x/a,nguid=zz112233445566778899aabbccddeeff"], "32 hex"),
            (&["--nqn", "n", "--ns", "/x/a,nguid=00000000000000000000000000000000"], "all zero"),
            (
                &[
                    "--nqn",
                    "n",
                    "--ns",
                    "/x/a,uuid=0f8e4c2a1d3b4e5f8a9b0c1d2e3f4a5b",
                    "--ns",
                    "/x/b,uuid=0f8e4c2a-1d3b-4e5f-8a9b-0c1d2e3f4a5b",
                ],
                "uuid repeats",
            ),
            (
                &[
                    "--nqn",
                    "n",
                    "--ns",
                    "/x/a,uuid=0f8e4c2a1d3b4e5f8a9b0c1d2e3f4a5b,uuid=0f8e4c2a1d3b4e5f8a9b0c1d2e3f4a5c",
                ],
                "given twice",
            ),
            (
                &["--nqn", "nqn.2014-08.org.nvmexpress.discovery", "--ns", "/x/a"],
                "discovery",
            ),
            (&["--nqn", "n", "--ns"], "a value is required for '--ns"),
            (&["--nqn", "n", "--ns", "/x/a", "--frobnicate"], "unexpected argument '--frobnicate'"),
            (&["--nqn", "n", "--ns", "/x/a", "--output-format=xml"], "xml"),
        ];
        for (extra, want) in cases {
            let v: Vec<&str> = l.iter().chain(extra.iter()).copied().collect();
            let e = err(&v);
            assert!(
                e.to_lowercase().contains(&want.to_lowercase()),
                "{v:?}: {e}"
            );
        }
    }
}
