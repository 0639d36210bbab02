//! The library API in a few lines: replicate a byte range of a drive to one replica over
//! RDMA with [`PrimaryEngine`]. The product is `peerpipe replicate` / `peerpipe replica`;
//! start a replica with the binary, then:
//!
//! ```text
//! cargo run --example replicate_range -- /dev/ng1n1 10.77.0.2:7471 1M SECRET_FILE
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use peerpipe::pipeline::engine::{EngineError, PrimaryConfig, PrimaryEngine, Secret};

fn run(source: &str, replica: SocketAddr, len: u64, secret: &Path) -> Result<bool, EngineError> {
    let config = PrimaryConfig::new(source)
        .replica(replica)
        .len(Some(len))
        .verify(true)
        .secret(Some(Secret::from_file(secret)?));
    let report = PrimaryEngine::new(config)?.run_with(&mut |_event| {})?;
    println!(
        "{} of {len} bytes replicated in {:.3} s, {} block copies verified",
        report.outcome.replicated_bytes,
        report.elapsed.as_secs_f64(),
        report.outcome.verified_blocks
    );
    Ok(report.outcome.success)
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, replica, len, secret] = &args[..] else {
        eprintln!("usage: replicate_range SOURCE REPLICA_ADDR:PORT LEN_BYTES SECRET_FILE");
        return ExitCode::from(2);
    };
    let (Ok(replica), Ok(len)) = (replica.parse(), len.parse()) else {
        eprintln!("replicate_range: REPLICA is ADDR:PORT, LEN a byte count");
        return ExitCode::from(2);
    };
    match run(source, replica, len, Path::new(secret)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("replicate_range: {e}");
            ExitCode::from(2)
        }
    }
}
