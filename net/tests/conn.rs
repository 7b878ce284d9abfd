//! Connections over loopback TCP on glommio executors: two nodes with the
//! secret authenticate each other and exchange frames; a peer with a wrong
//! secret, another cluster, or bytes that are no handshake at all is refused
//! (nothing it sends is read as a frame); a peer that never finishes its
//! handshake is cut off at the timeout; an oversized frame after the
//! handshake ends the connection.

use std::net::SocketAddr;
use std::time::Duration;

use dirigo_net::conn::{accept, connect, ConnConfig, ConnError, Connection};
use dirigo_net::handshake::{HandshakeError, Identity};
use dirigo_net::{FrameConfig, FrameError};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::LocalExecutorBuilder;

const SECRET: &[u8] = b"a secret of sixteen bytes or more";

/// Run `test` on a fresh glommio executor (small registered memory).
fn on_executor<F, T>(test: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    LocalExecutorBuilder::default()
        .io_memory(256 << 10)
        .spawn(move || async move { test().await })
        .expect("executor starts")
        .join()
        .expect("executor ends")
}

fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

fn node(cluster: &str, id: u64, secret: &[u8]) -> Identity {
    Identity::new(cluster, id, secret).unwrap()
}

/// Accept one connection as node 2 of cluster "c"; the client must pass.
async fn accept_node_2(listener: &TcpListener, config: &ConnConfig) -> Connection {
    let stream = listener.accept().await.unwrap();
    accept(stream, &node("c", 2, SECRET), config)
        .await
        .map_err(|(_, e)| e)
        .expect("the client is accepted")
}

#[test]
fn two_nodes_with_the_secret_authenticate_and_exchange_frames() {
    on_executor(|| async {
        let (listener, addr) = bind();
        let config = ConnConfig::default();
        let server = glommio::spawn_local({
            let config = config.clone();
            async move {
                let mut conn = accept_node_2(&listener, &config).await;
                assert_eq!(conn.peer().node, 1);
                let mut got = Vec::new();
                while let Some(frame) = conn.recv().await.expect("frames decode") {
                    got.push((frame.kind, frame.payload.to_vec()));
                    if frame.kind == 9 {
                        conn.send(9, b"bye").await.unwrap();
                    }
                }
                got
            }
        });
        let mut client = connect(addr, &node("c", 1, SECRET), &config)
            .await
            .expect("the server is authenticated");
        assert_eq!(client.peer().node, 2);
        client.heartbeat().await.unwrap();
        let big = vec![0xAB; 200_000];
        client.send(5, &big).await.unwrap();
        client.send(9, b"last").await.unwrap();
        let reply = client.recv().await.unwrap().expect("a reply");
        assert_eq!((reply.kind, reply.payload), (9, &b"bye"[..]));
        client.close().await.unwrap();
        let got = server.await;
        assert_eq!(
            got,
            vec![(0, Vec::new()), (5, big), (9, b"last".to_vec())],
            "every frame arrives whole and in order"
        );
    });
}

/// Accept once and return how the handshake ended.
async fn accept_once(
    listener: TcpListener,
    identity: Identity,
    config: ConnConfig,
) -> Result<u64, ConnError> {
    let stream = listener.accept().await.unwrap();
    match accept(stream, &identity, &config).await {
        Ok(conn) => Ok(conn.peer().node),
        Err((_, e)) => Err(e),
    }
}

#[test]
fn a_wrong_secret_or_cluster_is_refused_on_both_sides() {
    on_executor(|| async {
        let config = ConnConfig::default();
        for (client, why) in [
            (node("c", 1, b"not the secret of this cluster"), "secret"),
            (node("other", 1, SECRET), "cluster"),
        ] {
            let (listener, addr) = bind();
            let server =
                glommio::spawn_local(accept_once(listener, node("c", 2, SECRET), config.clone()));
            let client_side = connect(addr, &client, &config)
                .await
                .err()
                .expect("refused");
            let server_side = server.await.expect_err("refused");
            match why {
                // The client checks the server's proof first and hangs up:
                // the server sees the connection end before a proof.
                "secret" => {
                    assert!(
                        matches!(client_side, ConnError::Handshake(HandshakeError::BadProof)),
                        "{client_side}"
                    );
                    // It read no proof: the connection ended first.
                    assert!(
                        matches!(&server_side, ConnError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
                        "{server_side}"
                    );
                }
                _ => {
                    assert!(
                        matches!(server_side, ConnError::Handshake(HandshakeError::Cluster)),
                        "{server_side}"
                    );
                    // The server hung up without a challenge.
                    assert!(matches!(client_side, ConnError::Io(_)), "{client_side}");
                }
            }
        }
    });
}

#[test]
fn bytes_that_are_no_handshake_are_refused_and_a_silent_peer_times_out() {
    on_executor(|| async {
        let config = ConnConfig {
            handshake_timeout: Duration::from_millis(200),
            ..ConnConfig::default()
        };
        // An HTTP request is not a hello.
        let (listener, addr) = bind();
        let server =
            glommio::spawn_local(accept_once(listener, node("c", 2, SECRET), config.clone()));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        request.resize(84, b' ');
        stream.write_all(&request).await.unwrap();
        let refused = server.await.expect_err("refused").to_string();
        assert!(refused.contains("not a Dirigo node"), "{refused}");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing is answered to a stranger");

        // A peer that connects and says nothing is cut off.
        let (listener, addr) = bind();
        let server =
            glommio::spawn_local(accept_once(listener, node("c", 2, SECRET), config.clone()));
        let _silent = TcpStream::connect(addr).await.unwrap();
        let refused = server.await.expect_err("timed out");
        assert!(matches!(refused, ConnError::HandshakeTimeout), "{refused}");
    });
}

#[test]
fn an_oversized_frame_ends_the_connection() {
    on_executor(|| async {
        let (listener, addr) = bind();
        let small = ConnConfig {
            frame: FrameConfig::new(4096).unwrap(),
            ..ConnConfig::default()
        };
        let server = glommio::spawn_local({
            let small = small.clone();
            async move {
                let mut conn = accept_node_2(&listener, &small).await;
                let first = conn.recv().await.unwrap().map(|f| f.payload.len());
                let second = conn.recv().await.expect_err("the oversized frame fails");
                (first, second.to_string())
            }
        });
        // The client may send larger frames than the server takes.
        let large = ConnConfig {
            frame: FrameConfig::new(1 << 20).unwrap(),
            ..ConnConfig::default()
        };
        let mut client = connect(addr, &node("c", 1, SECRET), &large).await.unwrap();
        client.send(1, &[1; 1000]).await.unwrap();
        // The server fails on its length field (the decoder's bound: see
        // frames.rs), whether or not the rest has arrived.
        let _ = client.send(1, &[2; 100_000]).await;
        let (first, error) = server.await;
        assert_eq!(first, Some(1000));
        let expected = FrameError::Oversize {
            frame_number: 1,
            stream_offset: 16 + 1008,
            frame_bytes: 16 + 100_000,
            frame_bytes_max: 4096,
        };
        assert_eq!(error, expected.to_string());
    });
}

/// `recv` given up while it waits (raced against a short timer, as a
/// session's pump races it against its doorbell) loses no byte: every frame
/// still arrives whole and in order.
#[test]
fn a_recv_given_up_while_waiting_loses_nothing() {
    on_executor(|| async {
        let (listener, addr) = bind();
        let config = ConnConfig::default();
        let server = glommio::spawn_local({
            let config = config.clone();
            async move {
                let mut conn = accept_node_2(&listener, &config).await;
                let (mut got, mut given_up) = (Vec::new(), 0u64);
                loop {
                    let frame = async {
                        match conn.recv().await.expect("frames decode") {
                            Some(frame) => Some(Some(frame.payload.to_vec())),
                            None => Some(None),
                        }
                    };
                    let timer = async {
                        glommio::timer::sleep(Duration::from_micros(20)).await;
                        None
                    };
                    match futures_lite::future::or(frame, timer).await {
                        Some(Some(payload)) => got.push(payload),
                        Some(None) => break,
                        None => given_up += 1,
                    }
                }
                (got, given_up)
            }
        });
        let mut client = connect(addr, &node("c", 1, SECRET), &config)
            .await
            .expect("connected");
        for i in 0u32..3_000 {
            let payload: Vec<u8> = (0..(i % 700)).map(|b| (b as u8) ^ (i as u8)).collect();
            client.send(1, &payload).await.unwrap();
            if i % 50 == 0 {
                glommio::timer::sleep(Duration::from_micros(200)).await;
            }
        }
        client.close().await.unwrap();
        let (got, given_up) = server.await;
        assert_eq!(got.len(), 3_000);
        for (i, payload) in got.iter().enumerate() {
            let want: Vec<u8> = (0..(i as u32 % 700))
                .map(|b| (b as u8) ^ (i as u8))
                .collect();
            assert_eq!(payload, &want, "frame {i}");
        }
        assert!(
            given_up > 0,
            "the timer never won: the race was not exercised"
        );
    });
}
