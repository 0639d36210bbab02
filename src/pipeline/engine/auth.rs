//! Who may write to a replica: an address allow-list and a shared secret proved by a mutual
//! challenge-response in the connection setup. The secret never crosses the wire.
//!
//! ```text
//! primary                                   replica
//!   connect, private data: MAGIC nonce_p  ->  source address on the allow-list? else reject
//!                                             (MAGIC, NOT_ALLOWED); no/odd private data and a
//!                                             secret is set? reject (MAGIC, AUTH_REQUIRED)
//!   check tag_r (else disconnect:         <-  accept, private data: MAGIC nonce_r tag_r
//!   the replica does not know the secret)     tag_r = HMAC(secret, "replica" nonce_p nonce_r)
//!   first SEND: MAGIC tag_p               ->  check tag_p before anything else (else hang up
//!   tag_p = HMAC(secret, "primary"            and keep listening)
//!            nonce_r nonce_p)
//! ```
//! Nonces are 16 random bytes per connection, so a recorded exchange cannot be replayed: the
//! replica's fresh nonce changes the proof it expects. HMAC-SHA256 tags, compared in constant
//! time. Without a secret on either side no proof is exchanged, and a side with a secret
//! refuses a peer without one.

use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::EngineError;
use crate::rdma;

/// Marks peerpipe's authentication data in rdma_cm private data and in the proof message.
pub(crate) const MAGIC: [u8; 4] = *b"PPA1";
/// Connect request private data: MAGIC + nonce_p.
pub(crate) const REQ_LEN: usize = 4 + 16;
/// Accept private data: MAGIC + nonce_r + tag_r.
pub(crate) const REP_LEN: usize = 4 + 16 + 32;
/// Reject private data: MAGIC + one reason byte.
pub(crate) const NOT_ALLOWED: u8 = 1;
/// Reject reason: this replica needs a proof of the shared secret.
pub(crate) const AUTH_REQUIRED: u8 = 2;

/// The shortest secret accepted (bytes).
pub const MIN_SECRET_LEN: usize = 16;

/// A shared secret (the contents of a file, without a trailing newline).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret of at least [`MIN_SECRET_LEN`] bytes.
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] when it is shorter.
    pub fn new(bytes: Vec<u8>) -> Result<Secret, EngineError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(EngineError::config(
                "secret",
                format!(
                    "{} bytes is too short: use at least {MIN_SECRET_LEN} random bytes (e.g. `head -c 32 /dev/urandom | base64`)",
                    bytes.len()
                ),
            ));
        }
        Ok(Secret(bytes))
    }

    /// Reads a secret from `path` (one trailing newline is dropped).
    ///
    /// # Errors
    /// [`EngineError::InvalidConfig`] when the file cannot be read or is too short.
    pub fn from_file(path: &Path) -> Result<Secret, EngineError> {
        let mut v = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut v))
            .map_err(|e| EngineError::config("secret file", format!("{}: {e}", path.display())))?;
        if v.last() == Some(&b'\n') {
            v.pop();
        }
        Secret::new(v)
    }

    fn tag(&self, role: &[u8], a: &[u8; 16], b: &[u8; 16]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(role);
        m.update(a);
        m.update(b);
        m.finalize().into_bytes().into()
    }

    fn check(&self, role: &[u8], a: &[u8; 16], b: &[u8; 16], tag: &[u8]) -> bool {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(role);
        m.update(a);
        m.update(b);
        m.verify_slice(tag).is_ok()
    }
}

/// Who a replica accepts as its primary.
#[derive(Clone, Debug, Default)]
pub struct ReplicaAccess {
    /// Source addresses a primary may connect from (empty: any address).
    pub primaries: Vec<IpAddr>,
    /// The secret a primary must prove (`None`: no proof asked).
    pub secret: Option<Secret>,
}

impl ReplicaAccess {
    /// Whether nothing is restricted (any peer that connects becomes the primary).
    pub fn is_open(&self) -> bool {
        self.primaries.is_empty() && self.secret.is_none()
    }
}

/// 16 random bytes.
pub(crate) fn nonce() -> Result<[u8; 16], EngineError> {
    let mut n = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(|_| EngineError::Internal("reading /dev/urandom for a nonce"))?;
    Ok(n)
}

/// The primary's connect private data for a secret (empty without one).
pub(crate) fn request(nonce_p: &[u8; 16]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(nonce_p);
    v
}

/// What a replica decides about a connect request.
pub(crate) enum Verdict {
    /// Accept with this private data; then expect the proof for `nonce_r` (with a secret).
    Accept {
        private_data: Vec<u8>,
        expect: Option<Expect>,
    },
    /// Reject with this private data, for this reason (logged by the replica).
    Reject { private_data: Vec<u8>, why: String },
}

/// What a replica needs to check the primary's proof.
pub(crate) struct Expect {
    nonce_p: [u8; 16],
    nonce_r: [u8; 16],
}

impl ReplicaAccess {
    /// Judges a connect request from `peer` carrying `private_data`.
    pub(crate) fn judge(
        &self,
        peer: Option<IpAddr>,
        private_data: &[u8],
    ) -> Result<Verdict, EngineError> {
        let reject = |code: u8, why: String| Verdict::Reject {
            private_data: [&MAGIC[..], &[code]].concat(),
            why,
        };
        if !self.primaries.is_empty() && !peer.is_some_and(|p| self.primaries.contains(&p)) {
            let who = peer.map_or("an unknown address".to_string(), |p| p.to_string());
            return Ok(reject(
                NOT_ALLOWED,
                format!("refused a connection from {who}: not an allowed primary"),
            ));
        }
        let Some(secret) = &self.secret else {
            return Ok(Verdict::Accept {
                private_data: Vec::new(),
                expect: None,
            });
        };
        // rdma_cm may pad private data: look at our prefix only.
        let Some(nonce_p) = private_data
            .get(..REQ_LEN)
            .filter(|d| d[..4] == MAGIC)
            .map(|d| <[u8; 16]>::try_from(&d[4..REQ_LEN]).expect("16 bytes"))
        else {
            return Ok(reject(
                AUTH_REQUIRED,
                format!(
                    "refused a connection from {}: it offered no proof of the shared secret",
                    peer.map_or("?".to_string(), |p| p.to_string())
                ),
            ));
        };
        let nonce_r = nonce()?;
        let mut pd = MAGIC.to_vec();
        pd.extend_from_slice(&nonce_r);
        pd.extend_from_slice(&secret.tag(b"replica", &nonce_p, &nonce_r));
        Ok(Verdict::Accept {
            private_data: pd,
            expect: Some(Expect { nonce_p, nonce_r }),
        })
    }

    /// Checks the primary's first message against `expect`.
    pub(crate) fn check_proof(&self, expect: &Expect, msg: &[u8]) -> bool {
        let Some(secret) = &self.secret else {
            return false;
        };
        msg.len() >= 36
            && msg[..4] == MAGIC
            && secret.check(b"primary", &expect.nonce_r, &expect.nonce_p, &msg[4..36])
    }
}

/// Why the shared-secret handshake failed, on either side (the message is what the engine
/// reports: the primary's [`EngineError::Refused`] reason, the replica's hang-up event).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AuthError {
    /// The primary: the replica's accept data carries no proof.
    #[error("the replica did not prove the shared secret (was it given the shared secret?)")]
    NoReplicaProof,
    /// The primary: the replica's proof does not match our secret.
    #[error("the replica's proof of the shared secret is wrong (different secrets?)")]
    WrongReplicaProof,
    /// The replica: no message from the primary within the timeout.
    #[error("no proof of the shared secret within {0:?}")]
    NoPrimaryProof(Duration),
    /// The replica: the primary's first message is not a valid proof.
    #[error("a wrong proof of the shared secret")]
    WrongPrimaryProof,
    /// The replica: a work request completed with an error before the proof arrived.
    #[error("{opcode:?} completion failed: {status:?}")]
    Completion {
        /// The work request's kind.
        opcode: rdma::WcOpcode,
        /// The status it completed with.
        status: rdma::WcStatus,
    },
    /// The replica: polling the CQ, reading the receive buffer or re-posting it failed.
    #[error(transparent)]
    Rdma(Box<rdma::Error>),
}

impl From<rdma::Error> for AuthError {
    fn from(e: rdma::Error) -> AuthError {
        AuthError::Rdma(Box::new(e))
    }
}

/// The primary's side: checks the replica's accept data and builds the proof message.
///
/// # Errors
/// [`AuthError::NoReplicaProof`] or [`AuthError::WrongReplicaProof`]: the replica did not
/// prove the secret.
pub(crate) fn primary_proof(
    secret: &Secret,
    nonce_p: &[u8; 16],
    accept_data: &[u8],
) -> Result<[u8; 64], AuthError> {
    let d = accept_data
        .get(..REP_LEN)
        .filter(|d| d[..4] == MAGIC)
        .ok_or(AuthError::NoReplicaProof)?;
    let nonce_r = <[u8; 16]>::try_from(&d[4..20]).expect("16 bytes");
    if !secret.check(b"replica", nonce_p, &nonce_r, &d[20..52]) {
        return Err(AuthError::WrongReplicaProof);
    }
    let mut m = [0u8; 64];
    m[..4].copy_from_slice(&MAGIC);
    m[4..36].copy_from_slice(&secret.tag(b"primary", &nonce_r, nonce_p));
    Ok(m)
}

/// Explains a replica's reject private data, if it is ours.
pub(crate) fn reject_reason(private_data: &[u8]) -> Option<&'static str> {
    match private_data {
        [a, b, c, d, code, ..] if [*a, *b, *c, *d] == MAGIC => Some(match *code {
            NOT_ALLOWED => {
                "the replica does not allow this primary's address (its allow-list of primaries)"
            }
            AUTH_REQUIRED => {
                "the replica requires a proof of its shared secret (give the primary the same secret)"
            }
            _ => "the replica refused the connection",
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Secret::new(b"short".to_vec()).is_err());
        assert!(Secret::new(vec![7; MIN_SECRET_LEN]).is_ok());
    }

    #[test]
    fn matching_secrets_authenticate_both_ways() {
        let s = secret("0123456789abcdef-shared");
        let access = ReplicaAccess {
            primaries: vec!["10.0.0.1".parse().unwrap()],
            secret: Some(s.clone()),
        };
        let np = nonce().unwrap();
        let Verdict::Accept {
            private_data,
            expect: Some(expect),
        } = access
            .judge(Some("10.0.0.1".parse().unwrap()), &request(&np))
            .unwrap()
        else {
            panic!("not accepted");
        };
        let proof = primary_proof(&s, &np, &private_data).expect("replica proved itself");
        assert!(access.check_proof(&expect, &proof));
        // The secret itself never appears on the wire.
        for wire in [&private_data[..], &proof[..], &request(&np)[..]] {
            assert!(!wire.windows(16).any(|w| w == &b"0123456789abcdef"[..]));
        }
    }

    #[test]
    fn wrong_secret_missing_proof_replay_and_address_are_refused() {
        let s = secret("0123456789abcdef-shared");
        let other = secret("fedcba9876543210-other!");
        let access = ReplicaAccess {
            primaries: vec!["10.0.0.1".parse().unwrap()],
            secret: Some(s.clone()),
        };
        let from = Some("10.0.0.1".parse().unwrap());
        // Another address.
        assert!(matches!(
            access.judge(Some("10.0.0.9".parse().unwrap()), &request(&nonce().unwrap())),
            Ok(Verdict::Reject { ref private_data, .. }) if reject_reason(private_data).unwrap().contains("address")
        ));
        // No proof offered.
        assert!(matches!(
            access.judge(from, &[]),
            Ok(Verdict::Reject { ref private_data, .. }) if reject_reason(private_data).unwrap().contains("secret")
        ));
        // A primary with another secret detects the replica's wrong proof, and vice versa.
        let np = nonce().unwrap();
        let Ok(Verdict::Accept {
            private_data,
            expect: Some(expect),
        }) = access.judge(from, &request(&np))
        else {
            panic!("not accepted");
        };
        assert!(matches!(
            primary_proof(&other, &np, &private_data),
            Err(AuthError::WrongReplicaProof)
        ));
        let forged = {
            let mut m = [0u8; 64];
            m[..4].copy_from_slice(&MAGIC);
            m
        };
        assert!(!access.check_proof(&expect, &forged));
        // Replay: a proof recorded for one connection fails on the next (fresh nonce_r).
        let proof = primary_proof(&s, &np, &private_data).unwrap();
        let Ok(Verdict::Accept {
            expect: Some(expect2),
            ..
        }) = access.judge(from, &request(&np))
        else {
            panic!("not accepted");
        };
        assert!(access.check_proof(&expect, &proof));
        assert!(!access.check_proof(&expect2, &proof));
        // A replica without the secret cannot satisfy a primary that has one.
        let missing = primary_proof(&s, &np, &[]).unwrap_err();
        assert!(matches!(missing, AuthError::NoReplicaProof));
        assert_eq!(
            missing.to_string(),
            "the replica did not prove the shared secret (was it given the shared secret?)"
        );
    }
}
