//! Shared setup for the RDMA testbed tests: a connected client (rxe0) / server (rxe1) pair.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use peerpipe_rdma::*;

pub const T: Duration = Duration::from_secs(10);

pub fn addrs() -> (IpAddr, IpAddr) {
    let (a0, a1) = peerpipe_testbed::addrs();
    (a0.parse().unwrap(), a1.parse().unwrap())
}

/// One end of a test connection.
pub struct Side {
    pub conn: Connection,
    pub pd: ProtectionDomain,
    pub cq: CompletionQueue,
    pub srq: Option<SharedReceiveQueue>,
}

impl Side {
    /// Waits for one completion and requires success.
    pub fn wait_ok(&self) -> Completion {
        self.wait()
            .ok()
            .unwrap_or_else(|e| panic!("completion failed: {e}"))
    }
    /// Waits for one completion (any status).
    pub fn wait(&self) -> Completion {
        let mut c = [EMPTY_COMPLETION];
        let n = self
            .conn
            .wait_completions(&self.cq, &mut c, T)
            .expect("wait for completion");
        assert_eq!(n, 1);
        c[0]
    }
}

#[derive(Default)]
pub struct PairOpts {
    pub caps: QpCaps,
    pub server_srq: bool,
    pub client_data: Vec<u8>,
    pub server_data: Vec<u8>,
    pub client_ack_timeout: Option<u8>,
    pub server_ack_timeout: Option<u8>,
}

fn make_cq(ctx: &Context) -> CompletionQueue {
    let ch = CompletionChannel::new(ctx).expect("completion channel");
    CompletionQueue::with_channel(ctx, 256, &ch).expect("cq")
}

/// Connects a client bound to ADDR0 (rxe0) to a server listening on ADDR1 (rxe1):port.
pub fn pair(port: u16, opts: PairOpts) -> (Side, Side) {
    let (a0, a1) = addrs();
    let listener = Listener::bind(SocketAddr::new(a1, port), 8).expect("listen");
    let caps = opts.caps;
    let srq_wanted = opts.server_srq;
    let sdata = opts.server_data.clone();
    let server_ack = opts.server_ack_timeout;
    let server = std::thread::spawn(move || {
        let req = listener.get_request(3 * T).expect("connect request");
        eprintln!("pair: request on {}", req.context().name());
        let ctx = req.context().clone();
        let pd = ProtectionDomain::new(&ctx).expect("pd");
        let cq = make_cq(&ctx);
        let srq = srq_wanted.then(|| SharedReceiveQueue::new(&pd, 64, 4).expect("srq"));
        let mut init = QpInit::new(&pd, &cq).caps(caps);
        if let Some(s) = &srq {
            init = init.srq(s);
        }
        let params = ConnParams {
            private_data: sdata,
            timeout: T,
            ack_timeout: server_ack,
            ..Default::default()
        };
        let conn = req.accept(&init, &params).expect("accept");
        Side { conn, pd, cq, srq }
    });
    let t0 = std::time::Instant::now();
    let conn = Connector::resolve(Some(a0), SocketAddr::new(a1, port), T).expect("resolve");
    eprintln!(
        "pair: resolved via {} in {:?}",
        conn.context().name(),
        t0.elapsed()
    );
    let ctx = conn.context().clone();
    let pd = ProtectionDomain::new(&ctx).expect("pd");
    let cq = make_cq(&ctx);
    let init = QpInit::new(&pd, &cq).caps(caps);
    let params = ConnParams {
        private_data: opts.client_data,
        timeout: T,
        ack_timeout: opts.client_ack_timeout,
        ..Default::default()
    };
    let conn = conn.connect(&init, &params).expect("connect");
    let server = server.join().expect("server thread");
    (
        Side {
            conn,
            pd,
            cq,
            srq: None,
        },
        server,
    )
}

/// Sum of the resource counts `rdma res` shows for rxe0 and rxe1.
pub fn rdma_res() -> std::collections::BTreeMap<String, u64> {
    let out = peerpipe_testbed::run(
        std::process::Command::new("rdma").arg("res"),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}", peerpipe_testbed::text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut m = std::collections::BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // "0: rxe0: pd 1 cq 2 qp 1 cm_id 0 mr 0 ctx 0 srq 0"
        let mut i = 2;
        while i + 1 < words.len() {
            if let Ok(v) = words[i + 1].parse::<u64>() {
                *m.entry(words[i].to_string()).or_insert(0) += v;
            }
            i += 2;
        }
    }
    m
}
