//! Mutual authentication of a connection between two nodes, before anything
//! else crosses it: an HMAC-SHA256 challenge over a secret both were given
//! (`--secret-file`), with the cluster id and the protocol version checked.
//! Sans I/O: the functions here turn bytes into bytes and decisions, so the
//! transport ([`crate::conn`]) and the fuzz tests drive the same code.
//!
//! # Exchange
//!
//! ```text
//! client -> server  Hello     magic "DRGO", version, cluster, client node, client nonce
//! server -> client  Challenge version, cluster, server node, server nonce,
//!                             server proof = HMAC(secret, "dirigo server" | Hello | server half)
//! client -> server  Proof     client proof = HMAC(secret, "dirigo client" | Hello | Challenge)
//! ```
//!
//! Each side proves it holds the secret over the other's fresh nonce, so a
//! recorded exchange replays to nobody. The client checks the server's proof
//! before it sends its own: a server without the secret learns nothing it
//! could replay. Both sides then hold the connection's session key,
//! `HMAC(secret, "dirigo session" | Hello | Challenge)`: fresh with each
//! pair of nonces, known only to holders of the secret, and what
//! [`crate::link`] seals every frame after the handshake with (AES-128-GCM
//! under its first 16 bytes).
//!
//! A wrong magic, version or cluster, a message of the wrong length or a
//! proof that does not verify is a [`HandshakeError`]; the side that finds
//! it closes the connection, and nothing the peer sent is decoded beyond
//! these fixed-size messages (each at most [`HANDSHAKE_BYTES_MAX`]).
//!
//! # Layout (little endian, fixed sizes)
//!
//! - Hello, 84 bytes: magic `u32`, version `u16`, reserved `u16` (0),
//!   cluster `[u8; 32]`, node `u64`, nonce `[u8; 32]`, reserved `u32` (0).
//! - Challenge, 116 bytes: version `u16`, reserved `u16` (0), reserved `u32`
//!   (0), cluster `[u8; 32]`, node `u64`, nonce `[u8; 32]`, reserved `u32`
//!   (0), proof `[u8; 32]` (over the 84 bytes before it).
//! - Proof, 32 bytes: proof `[u8; 32]`.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// `"DRGO"`: the first bytes of every connection.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DRGO");
/// The protocol version this build speaks; a peer with another is refused.
/// 4: link frames sealed with AES-128-GCM (3: with AES-256-GCM, flagged
/// sealed, with no crc; 2: AES-256-GCM and a crc; 1: tagged with
/// HMAC-SHA256).
pub const PROTOCOL_VERSION: u16 = 4;
pub const HELLO_BYTES: usize = 84;
pub const CHALLENGE_BYTES: usize = 116;
pub const PROOF_BYTES: usize = 32;
/// The largest handshake message: what a peer not yet authenticated can make
/// this side buffer.
pub const HANDSHAKE_BYTES_MAX: usize = CHALLENGE_BYTES;

/// A secret shorter than this is refused (`--secret-file`).
pub const SECRET_BYTES_MIN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Who this node is to its peers: its cluster, its node id, and the shared
/// secret.
#[derive(Clone)]
pub struct Identity {
    cluster: [u8; 32],
    cluster_name: String,
    node: u64,
    secret: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("Identity")
            .field("cluster", &self.cluster_name)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// `cluster` names the cluster (its SHA-256 goes on the wire); `secret`
    /// is the shared secret (at least [`SECRET_BYTES_MIN`] bytes).
    pub fn new(cluster: &str, node: u64, secret: &[u8]) -> Result<Identity, String> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(format!(
                "the secret has {} bytes; at least {SECRET_BYTES_MIN} are needed",
                secret.len()
            ));
        }
        Ok(Identity {
            cluster: Sha256::digest(cluster.as_bytes()).into(),
            cluster_name: cluster.to_string(),
            node,
            secret: secret.to_vec(),
        })
    }

    pub fn node(&self) -> u64 {
        self.node
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.secret).expect("HMAC takes a key of any length")
    }
}

/// Why a handshake failed. Nothing of it comes from the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// A message of the wrong size, magic or reserved bits.
    Malformed(String),
    Version {
        ours: u16,
        theirs: u16,
    },
    /// The peer belongs to another cluster.
    Cluster,
    /// The peer's proof does not verify: it does not hold the secret.
    BadProof,
    /// The peer gave this node's own id.
    SameNode(u64),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Malformed(what) => write!(f, "malformed handshake: {what}"),
            HandshakeError::Version { ours, theirs } => {
                write!(f, "protocol version {theirs}, this node speaks {ours}")
            }
            HandshakeError::Cluster => write!(f, "the peer belongs to another cluster"),
            HandshakeError::BadProof => {
                write!(f, "the peer's proof does not verify (wrong secret)")
            }
            HandshakeError::SameNode(node) => write!(f, "the peer says it is this node ({node})"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// The authenticated peer, and the key of this connection's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub node: u64,
    pub session: SessionKey,
}

/// A connection's session key (see the module header); `Debug` never shows it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionKey(pub [u8; 32]);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl Identity {
    fn session_key(&self, hello: &[u8], challenge: &[u8]) -> SessionKey {
        let mut mac = self.mac();
        mac.update(b"dirigo session");
        mac.update(hello);
        mac.update(challenge);
        SessionKey(mac.finalize().into_bytes().into())
    }
}

/// A client that sent its Hello and waits for the Challenge.
pub struct ClientHandshake {
    identity: Identity,
    hello: [u8; HELLO_BYTES],
}

/// A server that answered a Hello and waits for the Proof.
pub struct ServerHandshake {
    identity: Identity,
    hello: [u8; HELLO_BYTES],
    challenge: [u8; CHALLENGE_BYTES],
    node: u64,
}

/// Begin as the client: the Hello to send.
pub fn client_hello(identity: &Identity, nonce: [u8; 32]) -> (ClientHandshake, Vec<u8>) {
    let mut hello = [0u8; HELLO_BYTES];
    hello[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    hello[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello[8..40].copy_from_slice(&identity.cluster);
    hello[40..48].copy_from_slice(&identity.node.to_le_bytes());
    hello[48..80].copy_from_slice(&nonce);
    let state = ClientHandshake {
        identity: identity.clone(),
        hello,
    };
    (state, hello.to_vec())
}

/// A Hello, as the server reads it.
struct Hello {
    version: u16,
    cluster: [u8; 32],
    node: u64,
}

fn read_hello(bytes: &[u8]) -> Result<Hello, HandshakeError> {
    if bytes.len() != HELLO_BYTES {
        return Err(HandshakeError::Malformed(format!(
            "a hello of {} bytes, not {HELLO_BYTES}",
            bytes.len()
        )));
    }
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(HandshakeError::Malformed(format!(
            "magic {magic:#010x}, not a Dirigo node"
        )));
    }
    if bytes[6..8] != [0, 0] || bytes[80..84] != [0; 4] {
        return Err(HandshakeError::Malformed(
            "reserved bits set in the hello".into(),
        ));
    }
    Ok(Hello {
        version: u16::from_le_bytes(bytes[4..6].try_into().expect("2 bytes")),
        cluster: bytes[8..40].try_into().expect("32 bytes"),
        node: u64::from_le_bytes(bytes[40..48].try_into().expect("8 bytes")),
    })
}

/// Answer a client's Hello as the server: the Challenge to send, or why the
/// client is refused.
pub fn server_challenge(
    identity: &Identity,
    hello: &[u8],
    nonce: [u8; 32],
) -> Result<(ServerHandshake, Vec<u8>), HandshakeError> {
    let read = read_hello(hello)?;
    check_peer(identity, read.version, &read.cluster, read.node)?;
    let hello: [u8; HELLO_BYTES] = hello.try_into().expect("checked");
    let mut challenge = [0u8; CHALLENGE_BYTES];
    challenge[0..2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    challenge[8..40].copy_from_slice(&identity.cluster);
    challenge[40..48].copy_from_slice(&identity.node.to_le_bytes());
    challenge[48..80].copy_from_slice(&nonce);
    let mut mac = identity.mac();
    mac.update(b"dirigo server");
    mac.update(&hello);
    mac.update(&challenge[..84]);
    challenge[84..116].copy_from_slice(&mac.finalize().into_bytes());
    let state = ServerHandshake {
        identity: identity.clone(),
        hello,
        challenge,
        node: read.node,
    };
    Ok((state, challenge.to_vec()))
}

fn check_peer(
    identity: &Identity,
    version: u16,
    cluster: &[u8; 32],
    node: u64,
) -> Result<(), HandshakeError> {
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    if *cluster != identity.cluster {
        return Err(HandshakeError::Cluster);
    }
    if node == identity.node {
        return Err(HandshakeError::SameNode(node));
    }
    Ok(())
}

impl ClientHandshake {
    /// The server's Challenge: the Proof to send and the authenticated
    /// server, or why the server is refused.
    pub fn on_challenge(self, challenge: &[u8]) -> Result<(Vec<u8>, Peer), HandshakeError> {
        if challenge.len() != CHALLENGE_BYTES {
            return Err(HandshakeError::Malformed(format!(
                "a challenge of {} bytes, not {CHALLENGE_BYTES}",
                challenge.len()
            )));
        }
        if challenge[2..8] != [0; 6] || challenge[80..84] != [0; 4] {
            return Err(HandshakeError::Malformed(
                "reserved bits set in the challenge".into(),
            ));
        }
        let version = u16::from_le_bytes(challenge[0..2].try_into().expect("2 bytes"));
        let cluster: [u8; 32] = challenge[8..40].try_into().expect("32 bytes");
        let node = u64::from_le_bytes(challenge[40..48].try_into().expect("8 bytes"));
        check_peer(&self.identity, version, &cluster, node)?;
        let mut mac = self.identity.mac();
        mac.update(b"dirigo server");
        mac.update(&self.hello);
        mac.update(&challenge[..84]);
        mac.verify_slice(&challenge[84..116])
            .map_err(|_| HandshakeError::BadProof)?;
        let mut mac = self.identity.mac();
        mac.update(b"dirigo client");
        mac.update(&self.hello);
        mac.update(challenge);
        let session = self.identity.session_key(&self.hello, challenge);
        Ok((mac.finalize().into_bytes().to_vec(), Peer { node, session }))
    }
}

impl ServerHandshake {
    /// The client's Proof: the authenticated client, or why it is refused.
    pub fn on_proof(self, proof: &[u8]) -> Result<Peer, HandshakeError> {
        if proof.len() != PROOF_BYTES {
            return Err(HandshakeError::Malformed(format!(
                "a proof of {} bytes, not {PROOF_BYTES}",
                proof.len()
            )));
        }
        let mut mac = self.identity.mac();
        mac.update(b"dirigo client");
        mac.update(&self.hello);
        mac.update(&self.challenge);
        mac.verify_slice(proof)
            .map_err(|_| HandshakeError::BadProof)?;
        let session = self.identity.session_key(&self.hello, &self.challenge);
        Ok(Peer {
            node: self.node,
            session,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(cluster: &str, node: u64, secret: &[u8]) -> Identity {
        Identity::new(cluster, node, secret).unwrap()
    }

    /// Run a whole exchange: what each side concluded.
    fn exchange(
        client: &Identity,
        server: &Identity,
    ) -> (Result<Peer, HandshakeError>, Result<Peer, HandshakeError>) {
        let (state, hello) = client_hello(client, [7; 32]);
        let (server_state, challenge) = match server_challenge(server, &hello, [9; 32]) {
            Ok(answer) => answer,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let (proof, server_peer) = match state.on_challenge(&challenge) {
            Ok(answer) => answer,
            Err(e) => {
                let none = Peer {
                    node: 0,
                    session: SessionKey([0; 32]),
                };
                return (Err(e), Ok(none));
            }
        };
        (Ok(server_peer), server_state.on_proof(&proof))
    }

    const SECRET: &[u8] = b"sixteen bytes or more of secret";

    #[test]
    fn nodes_with_the_secret_authenticate_each_other() {
        let (client, server) = exchange(&identity("c", 1, SECRET), &identity("c", 2, SECRET));
        let (client, server) = (client.unwrap(), server.unwrap());
        assert_eq!((client.node, server.node), (2, 1));
        // Both hold the same session key, and another pair of nonces gives
        // another.
        assert_eq!(client.session, server.session);
        let (state, hello) = client_hello(&identity("c", 1, SECRET), [8; 32]);
        let (_, challenge) = server_challenge(&identity("c", 2, SECRET), &hello, [9; 32]).unwrap();
        let (_, again) = state.on_challenge(&challenge).unwrap();
        assert_ne!(again.session, client.session);
        assert!(format!("{client:?}").contains("session: SessionKey(..)"));
    }

    #[test]
    fn a_wrong_secret_is_refused_by_whichever_side_checks_first() {
        let other = b"another secret of sixteen bytes";
        // The client checks the server's proof first: a server without the
        // secret never sees a client proof.
        let (client, _) = exchange(&identity("c", 1, SECRET), &identity("c", 2, other));
        assert_eq!(client, Err(HandshakeError::BadProof));
        // A client that does not check (forges its side) fails at the server.
        let (state, hello) = client_hello(&identity("c", 1, other), [7; 32]);
        let (server_state, challenge) =
            server_challenge(&identity("c", 2, SECRET), &hello, [9; 32]).unwrap();
        assert!(state.on_challenge(&challenge).is_err());
        assert_eq!(
            server_state.on_proof(&[0u8; PROOF_BYTES]),
            Err(HandshakeError::BadProof)
        );
    }

    #[test]
    fn another_cluster_version_or_the_same_node_is_refused() {
        let (_, server) = exchange(&identity("a", 1, SECRET), &identity("b", 2, SECRET));
        assert_eq!(server, Err(HandshakeError::Cluster));
        let (_, server) = exchange(&identity("c", 2, SECRET), &identity("c", 2, SECRET));
        assert_eq!(server, Err(HandshakeError::SameNode(2)));
        let (_, mut hello) = client_hello(&identity("c", 1, SECRET), [7; 32]);
        hello[4] = 9;
        let refused = server_challenge(&identity("c", 2, SECRET), &hello, [9; 32]).err();
        assert_eq!(
            refused,
            Some(HandshakeError::Version {
                ours: PROTOCOL_VERSION,
                theirs: 9
            })
        );
    }

    #[test]
    fn a_replayed_proof_does_not_pass_a_new_challenge() {
        let (client, server) = (identity("c", 1, SECRET), identity("c", 2, SECRET));
        let (state, hello) = client_hello(&client, [7; 32]);
        let (_, challenge) = server_challenge(&server, &hello, [9; 32]).unwrap();
        let (proof, _) = state.on_challenge(&challenge).unwrap();
        // The same hello, a fresh server nonce: the recorded proof fails.
        let (second, _) = server_challenge(&server, &hello, [10; 32]).unwrap();
        assert_eq!(second.on_proof(&proof), Err(HandshakeError::BadProof));
    }

    #[test]
    fn a_short_secret_is_refused_and_debug_never_shows_it() {
        assert!(Identity::new("c", 1, b"short").is_err());
        let shown = format!("{:?}", identity("c", 1, SECRET));
        assert!(!shown.contains("sixteen"), "{shown}");
    }
}
