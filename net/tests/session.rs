//! Two sessions over loopback TCP, each on its own glommio executor and
//! thread: the dialing node reconnects with backoff, the listening node
//! serves what it accepts, and the listener cuts every connection it
//! accepted after a random 20-80 ms (mid-frame, often). Both sides send
//! 100,000 messages of varying size through it all; each takes every one of
//! the other's exactly once, in order, whole.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dirigo_net::conn::accept;
use dirigo_net::handshake::Identity;
use dirigo_net::link::Role;
use dirigo_net::session::{Session, SessionConfig};
use glommio::net::TcpListener;
use glommio::LocalExecutorBuilder;

const SECRET: &[u8] = b"a secret of sixteen bytes or more";
const MESSAGES: u64 = 100_000;

fn body(side: u64, index: u64) -> Vec<u8> {
    let len = (index.wrapping_mul(2_654_435_761) ^ side) % 2_000;
    let mut body = index.to_le_bytes().to_vec();
    body.extend((0..len).map(|i| (i as u8) ^ (index as u8) ^ (side as u8)));
    body
}

/// Send this side's messages and take the peer's; checks every one.
async fn exchange(session: &Session, side: u64) {
    let sender = glommio::spawn_local({
        let session = session.clone();
        async move {
            for i in 1..=MESSAGES {
                session
                    .send_wait(7, body(side, i))
                    .await
                    .expect("fits a frame");
            }
        }
    });
    for i in 1..=MESSAGES {
        let waited = glommio::timer::timeout(Duration::from_secs(60), async {
            Ok(session.recv_wait().await)
        })
        .await;
        let (kind, got) = waited
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("side {side}: message {i} never came"));
        assert_eq!(kind, 7);
        assert!(
            got == body(1 - side, i),
            "side {side}: message {i} is not the peer's {i}th"
        );
    }
    sender.await;
}

/// Both sides took every message: neither stops before (its pump carries
/// the other's last messages and acks).
async fn both_done(done: &AtomicU64) {
    done.fetch_add(1, Ordering::AcqRel);
    while done.load(Ordering::Acquire) < 2 {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

fn executor<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    name: &str,
    work: impl FnOnce() -> F + Send + 'static,
) -> glommio::ExecutorJoinHandle<T> {
    LocalExecutorBuilder::default()
        .name(name)
        .io_memory(256 << 10)
        .spawn(work)
        .expect("executor starts")
}

#[test]
fn messages_cross_once_in_order_while_connections_are_cut() {
    let mut config = SessionConfig {
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(20),
        ..SessionConfig::default()
    };
    config.conn.handshake_timeout = Duration::from_secs(1);
    let done = Arc::new(AtomicU64::new(0));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let server = executor("server", {
        let config = config.clone();
        let done = done.clone();
        move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let session = Session::new(config.clone(), 2);
            let identity = Identity::new("c", 2, SECRET).unwrap();
            let acceptor = glommio::spawn_local({
                let session = session.clone();
                async move {
                    let mut cuts = 0u64;
                    let mut rng = 12345u64;
                    loop {
                        let Ok(stream) = listener.accept().await else {
                            continue;
                        };
                        let Ok(conn) = accept(stream, &identity, &config.conn).await else {
                            continue;
                        };
                        assert_eq!(conn.peer().node, 1);
                        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        let life = Duration::from_millis(20 + (rng >> 33) % 60);
                        let session = session.clone();
                        glommio::spawn_local(async move {
                            let served = glommio::timer::timeout(life, async {
                                Ok(session.serve(conn, Role::Server).await)
                            })
                            .await;
                            served.is_err()
                        })
                        .detach();
                        cuts += 1;
                        if cuts > 10_000 {
                            break;
                        }
                    }
                }
            });
            exchange(&session, 1).await;
            both_done(&done).await;
            session.stop();
            drop(acceptor);
            session.stats()
        }
    });
    let addr = addr_rx.recv().unwrap();
    let client = executor("client", move || async move {
        let session = Session::new(config, 1);
        let identity = Identity::new("c", 1, SECRET).unwrap();
        let dialer = glommio::spawn_local({
            let session = session.clone();
            async move { session.dial(addr, &identity, 7).await }
        });
        exchange(&session, 0).await;
        both_done(&done).await;
        session.stop();
        let report = dialer.await;
        (session.stats(), report)
    });
    let (client_stats, report) = client.join().expect("client ends");
    let server_stats = server.join().expect("server ends");
    eprintln!("client {client_stats:?}\nserver {server_stats:?}\ndial {report:?}");
    assert_eq!(client_stats.delivered, MESSAGES);
    assert_eq!(server_stats.delivered, MESSAGES);
    // The connections were cut, and messages had to be sent again.
    assert!(report.connected >= 3, "{report:?}");
    assert!(client_stats.resent + server_stats.resent > 0);
}

/// Both sides send large messages at once, more than the sockets' buffers
/// hold in flight: a side may not wait on its write while its peer waits on
/// its own (each keeps reading while it writes). No cuts here.
#[test]
fn large_messages_both_ways_at_once_do_not_deadlock() {
    const LARGE: u64 = 400;
    let large = |side: u64, i: u64| {
        let mut body = i.to_le_bytes().to_vec();
        body.resize(60_000, (i as u8) ^ (side as u8));
        body
    };
    let run = move |session: Session, side: u64| async move {
        let sender = glommio::spawn_local({
            let session = session.clone();
            async move {
                for i in 1..=LARGE {
                    session.send_wait(7, large(side, i)).await.expect("sent");
                }
            }
        });
        for i in 1..=LARGE {
            let got = glommio::timer::timeout(Duration::from_secs(60), async {
                Ok(session.recv_wait().await)
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("side {side}: large message {i} never came"));
            assert!(got.1 == large(1 - side, i), "side {side}: message {i}");
        }
        sender.await;
    };
    let config = SessionConfig::default();
    let done = Arc::new(AtomicU64::new(0));
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let server = executor("large-server", {
        let (config, done) = (config.clone(), done.clone());
        move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let stream = listener.accept().await.unwrap();
            let identity = Identity::new("c", 2, SECRET).unwrap();
            let conn = accept(stream, &identity, &config.conn).await.ok().unwrap();
            let session = Session::new(config, 2);
            let pump = glommio::spawn_local({
                let session = session.clone();
                async move { session.serve(conn, Role::Server).await }
            });
            run(session.clone(), 1).await;
            both_done(&done).await;
            session.stop();
            let _ = pump.await;
        }
    });
    let addr = addr_rx.recv().unwrap();
    let client = executor("large-client", move || async move {
        let identity = Identity::new("c", 1, SECRET).unwrap();
        let conn = dirigo_net::conn::connect(addr, &identity, &config.conn)
            .await
            .expect("connected");
        let session = Session::new(config, 1);
        let pump = glommio::spawn_local({
            let session = session.clone();
            async move { session.serve(conn, Role::Client).await }
        });
        run(session.clone(), 0).await;
        both_done(&done).await;
        session.stop();
        let _ = pump.await;
        session.stats()
    });
    let stats = client.join().expect("client ends");
    server.join().expect("server ends");
    assert_eq!(stats.delivered, LARGE);
    assert_eq!(stats.connections, 1);
}
