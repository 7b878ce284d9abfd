//! What travels between a node and its clients (`dirigo submit`, `status`,
//! `cancel`, and a node asking to join), and the client's side: one
//! authenticated connection, one request, one reply.
//!
//! A client authenticates like a node (the handshake over the shared
//! secret) under node id 0, which no node has; its messages go over a
//! session link, sealed with the session key like every node's.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use dirigo_net::conn::connect;
use dirigo_net::handshake::Identity;
use dirigo_net::link::Role;
use dirigo_net::session::{Session, SessionConfig};

/// Message kinds on a node's sessions.
pub const RAFT_KIND: u8 = 10;
pub const LEASE_REQUEST_KIND: u8 = 11;
pub const LEASE_GRANT_KIND: u8 = 12;
/// One part of a Raft message too large for a frame (a snapshot):
/// `[part u32 LE][parts u32 LE][bytes]`, the parts in order.
pub const RAFT_PART_KIND: u8 = 13;
/// The leader's numbered probe to a voter (8 bytes), and the voter's echo
/// of it while it follows that leader: the leader's own lease.
pub const LEASE_PROBE_KIND: u8 = 14;
pub const LEASE_ECHO_KIND: u8 = 15;
pub const REQUEST_KIND: u8 = 20;
pub const REPLY_KIND: u8 = 21;

/// The node id clients authenticate under.
pub const CLIENT_NODE: u64 = 0;

/// How long a client waits for its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Request {
    /// Run `dirigo run QUERY ARGS` on the cluster, in `cwd`.
    Submit {
        query: String,
        args: Vec<String>,
        cwd: String,
    },
    Status,
    Cancel {
        job: String,
    },
    /// A node asks to become a member.
    Join {
        node: u64,
        addr: String,
    },
    /// A member restarted on another address says where it is now.
    Moved {
        node: u64,
        addr: String,
    },
    /// A node is to leave the cluster.
    Remove {
        node: u64,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Reply {
    Submitted {
        job: String,
    },
    Status {
        status: serde_json::Value,
    },
    Cancelled {
        job: String,
    },
    /// The members' addresses, the joining node among them.
    Joined {
        nodes: Vec<(u64, String)>,
    },
    Moved,
    /// The cluster agreed that the node leaves; it goes once its jobs moved.
    Removing {
        node: u64,
    },
    Error {
        message: String,
    },
}

/// The cluster secret from `path`: its bytes, less one trailing newline.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let mut secret = std::fs::read(path)
        .map_err(|e| format!("reading the secret file {}: {e}", path.display()))?;
    if secret.last() == Some(&b'\n') {
        secret.pop();
    }
    Ok(secret)
}

/// Send one request to the node at `addr` and wait for its reply.
pub fn request(addr: SocketAddr, identity: Identity, request: Request) -> Result<Reply, String> {
    glommio::LocalExecutorBuilder::default()
        .name("dirigo-client")
        .io_memory(1 << 20)
        .spawn(move || async move { request_on_executor(addr, &identity, &request).await })
        .map_err(|e| format!("the client's executor did not start: {e}"))?
        .join()
        .map_err(|e| format!("the client's executor failed: {e}"))?
}

/// [`request`], on a glommio executor already running.
pub async fn request_on_executor(
    addr: SocketAddr,
    identity: &Identity,
    request: &Request,
) -> Result<Reply, String> {
    let config = SessionConfig::default();
    let conn = connect(addr, identity, &config.conn)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let session = Session::new(config, crate::node::random_u64());
    let pump = glommio::spawn_local({
        let session = session.clone();
        async move { session.serve(conn, Role::Client).await }
    });
    let body = serde_json::to_vec(request).expect("requests serialize");
    let sent = session.send_wait(REQUEST_KIND, body).await;
    let reply = match sent {
        Err(e) => Err(format!("sending to {addr}: {e:?}")),
        Ok(_) => {
            let wait = async {
                loop {
                    match session.recv_wait().await {
                        Some((REPLY_KIND, body)) => {
                            return serde_json::from_slice::<Reply>(&body)
                                .map_err(|e| format!("a malformed reply from {addr}: {e}"))
                        }
                        Some(_) => continue,
                        None => return Err(format!("{addr} closed the connection")),
                    }
                }
            };
            let timeout = async {
                glommio::timer::sleep(REPLY_TIMEOUT).await;
                Err(format!("{addr} did not reply within {REPLY_TIMEOUT:?}"))
            };
            futures_lite::future::or(wait, timeout).await
        }
    };
    session.stop();
    let _ = pump.await;
    reply
}
