//! Leak checks of the engine's error paths, in-process (issue 12 part 6): an engine embedded
//! in an application whose peer dies mid-run must give back every RDMA resource and every
//! byte of p2pmem it took, because the process goes on living. After each fault, this
//! process's `rdma res` counts (pd, cq, qp, mr, cm_id, ctx) and the provider's p2pmem
//! `available` are back at their start values.
//! Run with `cargo xtask test --vm-only -- leaks`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use peerpipe::p2p_alloc::{discover, SysRoot};
use peerpipe::pipeline::engine::{
    BufferChoice, Event, PrimaryConfig, PrimaryEngine, ReplicaAccess, ReplicaConfig, ReplicaEnd,
    ReplicaEngine, Secret,
};
use peerpipe_testbed as tb;

/// The `peerpipe` binary (its `replicate` and `replica` commands).
fn replicator() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_peerpipe"))
}

const SECRET: &str = "leak-test-secret-0123456789";

fn secret_file() -> String {
    let p = std::env::temp_dir().join("peerpipe-leak-secret");
    std::fs::write(&p, SECRET).expect("write secret");
    p.to_str().unwrap().to_string()
}

/// This process's RDMA resources by kind, as `rdma res show KIND` lists them.
fn rdma_counts() -> Vec<(&'static str, usize)> {
    let me = format!("pid {} ", std::process::id());
    ["pd", "cq", "qp", "mr", "cm_id", "ctx"]
        .into_iter()
        .map(|kind| {
            let o = tb::run(
                Command::new("rdma").args(["res", "show", kind]),
                Duration::from_secs(10),
            );
            assert!(o.status.success(), "rdma res show {kind}: {}", tb::text(&o));
            let n = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(&me))
                .count();
            (kind, n)
        })
        .collect()
}

fn p2pmem_available() -> u64 {
    let p = discover(&SysRoot::live()).expect("discover");
    p[0].available().expect("available")
}

/// Resources and p2pmem are back at `start` (p2pmem settles asynchronously on munmap; rdma
/// resources are released before a destroy returns).
fn assert_back_to(start: &(Vec<(&'static str, usize)>, u64), after: &str) {
    let mut avail = p2pmem_available();
    for _ in 0..100 {
        if avail == start.1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        avail = p2pmem_available();
    }
    assert_eq!(rdma_counts(), start.0, "rdma resources after {after}");
    assert_eq!(avail, start.1, "p2pmem available after {after}");
}

/// A primary engine in this process loses its only replica (killed once 16 blocks were
/// acked): the run ends in failure, and the engine gives everything back.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_leaks_primary_engine_after_its_replica_is_killed() {
    tb::require_testbed();
    let (a0, a1) = tb::addrs();
    let addr = format!("{a1}:7511");
    let start = (rdma_counts(), p2pmem_available());
    let mut replica = tb::spawn_watched(
        Command::new(replicator())
            .args(["replica", "--listen", &addr, "--target"])
            .arg(tb::drive("data2").block)
            .args(["--buffers", "host", "--allow-primary", &a0])
            .args(["--secret-file", &secret_file()]),
        "replica",
    );
    replica.wait_line("replica: listening on", Duration::from_secs(120));
    let cfg = PrimaryConfig::new(tb::drive("data1").block)
        .replica(addr.parse().unwrap())
        .bind(Some(a0.parse().unwrap()))
        .len(Some(64 << 20))
        .buffers(BufferChoice::P2p)
        .rate(Some(4 << 20))
        .progress_every(Duration::from_millis(100))
        .timeout(Duration::from_secs(10))
        .secret(Some(Secret::new(SECRET.as_bytes().to_vec()).unwrap()));
    let engine = PrimaryEngine::new(cfg).expect("primary engine");
    let pid = replica.id() as i32;
    let mut killed_at = None;
    let report = engine
        .run_with(&mut |ev| {
            if let Event::Progress { blocks, .. } = ev {
                if blocks >= 16 && killed_at.is_none() {
                    // SAFETY: kill(2) on our own child, not yet reaped.
                    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
                    killed_at = Some(blocks);
                }
            }
        })
        .expect("the run itself does not fail");
    let _ = replica.finish(Duration::from_secs(90));
    assert!(killed_at.is_some(), "never reached 16 blocks");
    assert!(!report.outcome.success, "{:?}", report.outcome);
    assert!(
        report.outcome.replicated_bytes < 64 << 20,
        "the kill landed mid-run"
    );
    assert_back_to(&start, "the primary engine's replica was killed");
}

/// A replica engine in this process loses its primary (killed once 16 blocks were acked):
/// the run ends with `PrimaryGone`, and the engine gives everything back.
#[test]
#[ignore = "skipped: no device (testbed test; run: cargo xtask test)"]
fn testbed_leaks_replica_engine_after_its_primary_is_killed() {
    tb::require_testbed();
    let (a0, a1) = tb::addrs();
    let addr = format!("{a1}:7512");
    let start = (rdma_counts(), p2pmem_available());
    let cfg = ReplicaConfig::new(tb::drive("data2").block, addr.parse().unwrap())
        .buffers(BufferChoice::P2p)
        .timeout(Duration::from_secs(10))
        .access(ReplicaAccess {
            primaries: vec![a0.parse().unwrap()],
            secret: Some(Secret::new(SECRET.as_bytes().to_vec()).unwrap()),
        });
    let engine = ReplicaEngine::new(cfg).expect("replica engine (listening)");
    // The engine listens from `new`: the primary may start now.
    let mut primary = tb::spawn_watched(
        Command::new(replicator())
            .args(["replicate", "--source"])
            .arg(tb::drive("data1").block)
            .args([
                "--bind",
                &a0,
                "--replica",
                &addr,
                "--len",
                "64M",
                "--rate",
                "4M",
            ])
            .args(["--status-interval", "0.1", "--buffers", "host"])
            .args(["--secret-file", &secret_file()]),
        "primary",
    );
    let run = std::thread::spawn(move || engine.run());
    // The engine's end, within a bound (its primary gone: 10 s of silence at most, plus rxe's
    // 50 s QP destroy stall; see tests/replicator_tb/faults.rs).
    let join = |run: std::thread::JoinHandle<_>| {
        let end = std::time::Instant::now() + Duration::from_secs(120);
        while !run.is_finished() {
            assert!(
                std::time::Instant::now() < end,
                "the replica engine did not end"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        run.join().expect("engine thread")
    };
    let reached = primary.try_wait_for(Duration::from_secs(300), |l| {
        let k: u64 = l
            .strip_prefix("progress: ")?
            .split('/')
            .next()?
            .parse()
            .ok()?;
        (k >= 16).then_some(())
    });
    if let Err(why) = reached {
        let out = primary.finish(Duration::from_secs(60));
        panic!("{why}\n{}\nreplica engine: {:?}", tb::text(&out), join(run));
    }
    primary.kill();
    let _ = primary.finish(Duration::from_secs(10));
    let report = join(run).expect("replica run");
    assert!(
        matches!(report.end, ReplicaEnd::PrimaryGone(_)),
        "{:?}",
        report.end
    );
    assert!(
        report.blocks_written >= 16 && report.blocks_written < 1024,
        "{report:?}"
    );
    assert_back_to(&start, "the replica engine's primary was killed");
}
