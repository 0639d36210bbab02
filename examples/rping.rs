//! rping over peerpipe-rdma: speaks rdma-core's `rping` protocol, so it interoperates with the
//! real `rping` in both roles.
//!
//! Per ping: the client SENDs a 16-byte advertisement (be64 addr, be32 rkey, be32 size) of its
//! source buffer; the server RDMA READs it and SENDs a 16-byte "go ahead"; the client advertises
//! its sink buffer; the server RDMA WRITEs the data back there and SENDs "go ahead" again; the
//! client compares source and sink (`-V`) and prints the data (`-v`).
//!
//! ```text
//! rping -s [-vVdP] [-S size] [-C count] [-a addr] [-p port]
//! rping -c [-vVd] [-S size] [-C count] [-I addr] -a addr [-p port]
//! ```
//! (clap: `-h/--help`, `--version`, exit status 2 on usage errors; `RUST_LOG` for logs.)

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use peerpipe_rdma::*;

const MIN_SIZE: usize = 26; // sizeof("2147483647") + sizeof("rdma-ping-%d: "), as rping
const MAX_SIZE: usize = 64 * 1024 - 1;
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Opts {
    server: Option<bool>,
    /// `-P`: keep accepting clients, each served on its own thread, until killed.
    persistent: bool,
    addr: Option<IpAddr>,
    source: Option<IpAddr>,
    port: u16,
    count: u64,
    size: usize,
    verbose: bool,
    validate: bool,
    debug: bool,
}

/// rping over peerpipe-rdma (rdma-core's flags; `RUST_LOG` sets the library's log level).
#[derive(Debug, clap::Parser)]
#[command(name = "rping", version, disable_version_flag = true)]
#[command(group(clap::ArgGroup::new("role").required(true).args(["server", "client"])))]
struct Cli {
    /// server side
    #[arg(short = 's')]
    server: bool,
    /// client side
    #[arg(short = 'c')]
    client: bool,
    /// persistent server mode allowing multiple connections
    #[arg(short = 'P', requires = "server")]
    persistent: bool,
    /// address
    #[arg(short = 'a', value_name = "addr", value_parser = resolve_ip, required_if_eq("client", "true"))]
    addr: Option<IpAddr>,
    /// Source address to bind to for client
    #[arg(short = 'I', value_name = "addr", value_parser = resolve_ip, requires = "client")]
    source: Option<IpAddr>,
    /// port
    #[arg(short = 'p', value_name = "port", default_value_t = 7174)]
    port: u16,
    /// ping count times (0: forever)
    #[arg(short = 'C', value_name = "count", default_value_t = 0)]
    count: u64,
    /// ping data size
    #[arg(short = 'S', value_name = "size", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(MIN_SIZE as u64..=MAX_SIZE as u64))]
    size: u64,
    /// display ping data to stdout
    #[arg(short = 'v')]
    verbose: bool,
    /// validate ping data
    #[arg(short = 'V')]
    validate: bool,
    /// debug printfs
    #[arg(short = 'd')]
    debug: bool,
    /// use a raw QP (accepted; the QP is always created through rdma_cm here)
    #[arg(short = 'q')]
    raw_qp: bool,
    /// type of service (accepted, not applied)
    #[arg(short = 't', value_name = "tos")]
    tos: Option<u8>,
    /// Print version
    #[arg(long, action = clap::ArgAction::Version)]
    version: Option<bool>,
}

fn resolve_ip(s: &str) -> std::result::Result<IpAddr, String> {
    if let Ok(ip) = s.parse() {
        return Ok(ip);
    }
    (s, 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .map(|a| a.ip())
        .ok_or_else(|| format!("getaddrinfo failed - invalid hostname or IP address: {s}"))
}

fn parse() -> Opts {
    let c = <Cli as clap::Parser>::parse();
    Opts {
        server: Some(c.server),
        persistent: c.persistent,
        addr: c.addr,
        source: c.source,
        port: c.port,
        count: c.count,
        size: c.size as usize,
        verbose: c.verbose,
        validate: c.validate,
        debug: c.debug,
    }
}

/// The 16-byte buffer advertisement (`struct rping_rdma_info`).
fn encode_info(addr: u64, rkey: u32, size: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_be_bytes());
    b[8..12].copy_from_slice(&rkey.to_be_bytes());
    b[12..].copy_from_slice(&size.to_be_bytes());
    b
}

fn decode_info(b: &[u8; 16]) -> RemoteBuf {
    RemoteBuf {
        addr: u64::from_be_bytes(b[..8].try_into().unwrap()),
        rkey: u32::from_be_bytes(b[8..12].try_into().unwrap()),
        len: u32::from_be_bytes(b[12..].try_into().unwrap()),
    }
}

/// Everything one rping connection uses.
struct Session {
    conn: Connection,
    cq: CompletionQueue,
    recv_mr: MemoryRegion,
    send_mr: MemoryRegion,
    rdma_mr: MemoryRegion,
    pending: VecDeque<Done>,
    debug: bool,
}

const WR_RECV: u64 = 1;
const WR_SEND: u64 = 2;
const WR_RDMA: u64 = 3;

impl Session {
    fn resources(
        conn_ctx: &Context,
        size: usize,
    ) -> Result<(ProtectionDomain, CompletionQueue, [MemoryRegion; 3])> {
        let pd = ProtectionDomain::new(conn_ctx)?;
        let ch = CompletionChannel::new(conn_ctx)?;
        let cq = CompletionQueue::with_channel(conn_ctx, 32, &ch)?;
        let recv_mr = MemoryRegion::alloc(&pd, 16, Access::default().local_write())?;
        let send_mr = MemoryRegion::alloc(&pd, 16, Access::default())?;
        let rdma_mr = MemoryRegion::alloc(&pd, size, Access::remote_rw())?;
        Ok((pd, cq, [recv_mr, send_mr, rdma_mr]))
    }

    fn caps() -> QpCaps {
        QpCaps {
            max_send_wr: 16,
            max_recv_wr: 2,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        }
    }

    fn post_recv(&self) -> Result<()> {
        self.conn
            .post_recv(&[RecvRequest::new(WR_RECV, vec![self.recv_mr.sge_all()])])
    }

    fn send_info(&self, info: [u8; 16]) -> Result<()> {
        self.send_mr.write_at(0, &info)?;
        self.conn
            .post_send(&[SendRequest::send(WR_SEND, vec![self.send_mr.sge_all()])])
    }

    /// Waits for the next completion of the given kind (SEND completions are consumed
    /// silently, like rping's handler). For a receive, returns the advertisement it carried
    /// (copied out before the buffer is re-posted).
    fn wait(&mut self, want: WcOpcode) -> Result<Option<RemoteBuf>> {
        loop {
            if let Some(pos) = self.pending.iter().position(|d| d.opcode == want) {
                return Ok(self.pending.remove(pos).unwrap().info);
            }
            let mut buf = [EMPTY_COMPLETION; 8];
            let n = self
                .conn
                .wait_completions(&self.cq, &mut buf, STEP_TIMEOUT)?;
            for c in &buf[..n] {
                if c.status == WcStatus::Flushed && self.conn.check().is_err() {
                    return Err(Error::Disconnected { op: "rping" });
                }
                let c = c.ok()?;
                if self.debug {
                    println!("{:?} completion", c.opcode);
                }
                match c.opcode {
                    WcOpcode::Send => {}
                    WcOpcode::Recv => {
                        if c.byte_len != 16 {
                            return Err(Error::InvalidArgument {
                                op: "rping receive",
                                reason: format!("Received bogus data, size {}", c.byte_len),
                            });
                        }
                        let mut info = [0u8; 16];
                        self.recv_mr.read_at(0, &mut info)?;
                        self.post_recv()?;
                        self.pending.push_back(Done {
                            opcode: c.opcode,
                            info: Some(decode_info(&info)),
                        });
                    }
                    other => self.pending.push_back(Done {
                        opcode: other,
                        info: None,
                    }),
                }
            }
        }
    }
}

/// A reaped completion the protocol has not consumed yet.
struct Done {
    opcode: WcOpcode,
    info: Option<RemoteBuf>,
}

fn c_string(mr: &MemoryRegion) -> String {
    let v = mr.to_vec();
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

fn run_server(o: &Opts) -> Result<()> {
    let addr = o.addr.unwrap_or(IpAddr::from([0u8, 0, 0, 0]));
    let listener = Listener::bind(SocketAddr::new(addr, o.port), 3)?;
    loop {
        let req = match listener.get_request(Duration::from_secs(1)) {
            Ok(r) => r,
            Err(Error::Timeout { .. }) => continue,
            Err(e) => return Err(e),
        };
        if !o.persistent {
            return serve(req, o);
        }
        // -P: one thread per client, as rping's persistent server; a failed session is
        // reported and the server keeps accepting
        let opts = o.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(req, &opts) {
                eprintln!("rping server session failed: {e}");
            }
        });
    }
}

/// Serves one client until it disconnects.
fn serve(req: ConnectRequest, o: &Opts) -> Result<()> {
    let (_pd, cq, [recv_mr, send_mr, rdma_mr]) = Session::resources(req.context(), o.size)?;
    let init = QpInit::new(&_pd, &cq).caps(Session::caps());
    // rping's client asks for 1 outstanding READ each way; accept matches the request.
    let params = ConnParams {
        timeout: STEP_TIMEOUT,
        ..Default::default()
    };
    // the receive is posted before accepting, so the client's first SEND finds it
    let post = |qp: &QueuePair| qp.post_recv(&[RecvRequest::new(WR_RECV, vec![recv_mr.sge_all()])]);
    let conn = req.accept_with(&init, &params, post)?;
    let mut s = Session {
        conn,
        cq,
        recv_mr,
        send_mr,
        rdma_mr,
        pending: VecDeque::new(),
        debug: o.debug,
    };
    let result = (|| -> Result<()> {
        loop {
            let adv = match s.wait(WcOpcode::Recv) {
                Ok(info) => info.expect("receives carry an advertisement"),
                Err(Error::Disconnected { .. }) => return Ok(()),
                Err(e) => return Err(e),
            };
            if o.debug {
                println!(
                    "Received rkey {:x} addr {:x} len {} from peer",
                    adv.rkey, adv.addr, adv.len
                );
            }
            let len = (adv.len as usize).min(s.rdma_mr.len());
            s.conn.post_send(&[SendRequest::read(
                WR_RDMA,
                vec![s.rdma_mr.sge(0, len)?],
                adv,
            )])?;
            s.wait(WcOpcode::RdmaRead)?;
            if o.verbose {
                println!("server ping data: {}", c_string(&s.rdma_mr));
            }
            s.send_info([0; 16])?; // go ahead
            let sink = s
                .wait(WcOpcode::Recv)?
                .expect("receives carry an advertisement");
            let data = c_string(&s.rdma_mr);
            let wlen = (data.len() + 1).min(s.rdma_mr.len());
            s.conn.post_send(&[SendRequest::write(
                WR_RDMA,
                vec![s.rdma_mr.sge(0, wlen)?],
                sink,
            )])?;
            s.wait(WcOpcode::RdmaWrite)?;
            s.send_info([0; 16])?; // go ahead
        }
    })();
    eprintln!("server DISCONNECT EVENT...");
    let _ = s.conn.disconnect(Duration::from_secs(2));
    result
}

fn run_client(o: &Opts) -> Result<()> {
    let dst = o.addr.ok_or_else(|| Error::InvalidArgument {
        op: "rping",
        reason: "-a addr is required".into(),
    })?;
    let connector = Connector::resolve(
        o.source,
        SocketAddr::new(dst, o.port),
        Duration::from_secs(2),
    )?;
    let (pd, cq, [recv_mr, send_mr, rdma_mr]) = Session::resources(connector.context(), o.size)?;
    let start_mr = MemoryRegion::alloc(&pd, o.size, Access::remote_rw())?;
    let init = QpInit::new(&pd, &cq).caps(Session::caps());
    let params = ConnParams {
        responder_resources: 1,
        initiator_depth: 1,
        retry_count: 7,
        rnr_retry_count: 7,
        timeout: STEP_TIMEOUT,
        ..Default::default()
    };
    let post = |qp: &QueuePair| qp.post_recv(&[RecvRequest::new(WR_RECV, vec![recv_mr.sge_all()])]);
    let conn = connector.connect_with(&init, &params, post)?;
    let mut s = Session {
        conn,
        cq,
        recv_mr,
        send_mr,
        rdma_mr,
        pending: VecDeque::new(),
        debug: o.debug,
    };
    let size = o.size;
    let mut start = 65u8;
    let mut ping = 0u64;
    let result = (|| -> Result<()> {
        while o.count == 0 || ping < o.count {
            let mut buf = format!("rdma-ping-{ping}: ").into_bytes();
            buf.truncate(size - 1);
            let mut c = start;
            while buf.len() < size {
                buf.push(c);
                c += 1;
                if c > 122 {
                    c = 65;
                }
            }
            start += 1;
            if start > 122 {
                start = 65;
            }
            buf[size - 1] = 0;
            start_mr.write_at(0, &buf)?;
            s.send_info(encode_info(start_mr.addr(), start_mr.rkey(), size as u32))?;
            s.wait(WcOpcode::Recv)?; // server read our data
            s.send_info(encode_info(s.rdma_mr.addr(), s.rdma_mr.rkey(), size as u32))?;
            s.wait(WcOpcode::Recv)?; // server wrote it back
            if o.validate && s.rdma_mr.to_vec() != start_mr.to_vec() {
                return Err(Error::InvalidArgument {
                    op: "rping validate",
                    reason: "data mismatch!".into(),
                });
            }
            if o.verbose {
                println!("ping data: {}", c_string(&s.rdma_mr));
            }
            ping += 1;
        }
        Ok(())
    })();
    let _ = s.conn.disconnect(Duration::from_secs(2));
    result
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let o = parse();
    let r = if o.server == Some(true) {
        run_server(&o)
    } else {
        run_client(&o)
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "rping {} failed: {e}",
                if o.server == Some(true) {
                    "server"
                } else {
                    "client"
                }
            );
            ExitCode::FAILURE
        }
    }
}
