//! A [`Link`] driven over real connections on a glommio executor: the
//! caller's side ([`Session`]: send, receive, wait for room or for a
//! message) and the pump that moves the link's frames over one connection
//! ([`Session::serve`]), which a dialing node runs in a loop with
//! [`Backoff`] ([`Session::dial`]) and a listening node runs for each
//! connection it accepted from that peer.
//!
//! One task per connection does both directions. It encodes what the link
//! has due, then waits for whichever comes first: some of it written, bytes
//! read, the caller's doorbell (a message queued, or credit to tell), or
//! the link's next due time (a delayed ack, the heartbeat). It never waits
//! on a write alone: two nodes that both had more to send than the sockets
//! hold would each wait for the other to read. Every wait may be given up
//! that way because glommio's stream reads and writes are readiness-based
//! (the bytes move in the `recv` or `send` call of the poll that returns
//! them), so a poll that returned `Pending` moved nothing. Every whole frame
//! read goes to the link at once.
//!
//! A newer connection from the same peer replaces the one being served:
//! each connection holds a generation, and a pump whose generation is no
//! longer the session's stops without touching the link (a stale socket
//! never feeds the new connection's link state).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use crate::conn::{connect, ConnConfig, ConnError, Connection};
use crate::handshake::Identity;
use crate::link::{Backoff, Link, LinkConfig, LinkError, LinkStats, Role, SendError};

/// How a session dials and paces itself.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub link: LinkConfig,
    pub conn: ConnConfig,
    /// Reconnect delays: doubling from `backoff_base` up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Bytes of frames written to the socket in one write.
    pub write_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        let link = LinkConfig::default();
        SessionConfig {
            conn: ConnConfig {
                frame: link.frame,
                ..ConnConfig::default()
            },
            link,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            write_bytes: 256 * 1024,
        }
    }
}

/// Why one connection's pump ended.
#[derive(Debug)]
pub enum Ended {
    /// The peer closed the connection between frames.
    Closed,
    /// Nothing came for `dead_after_ns`.
    Dead,
    /// A newer connection took the session over.
    Replaced,
    /// The session was stopped.
    Stopped,
    Conn(ConnError),
    Link(LinkError),
}

struct Shared {
    link: RefCell<Link>,
    /// The connection being served; a pump of another stops.
    generation: Cell<u64>,
    stopped: Cell<bool>,
    /// Wakes the pump: something to send.
    doorbell: LocalSender<()>,
    doorbell_rx: LocalReceiver<()>,
    /// Wakes the caller waiting for a message (one arrived, or the
    /// connection ended).
    arrived: LocalSender<()>,
    arrived_rx: LocalReceiver<()>,
    /// Wakes the caller waiting for room to send (acks came, or the
    /// connection ended).
    room: LocalSender<()>,
    room_rx: LocalReceiver<()>,
    started: Instant,
}

/// The caller's side of a link to one peer; clones share it. Only on the
/// executor that made it.
#[derive(Clone)]
pub struct Session {
    shared: Rc<Shared>,
    config: SessionConfig,
}

impl Session {
    /// A session of this side's `incarnation` (see [`Link::new`]).
    pub fn new(config: SessionConfig, incarnation: u64) -> Session {
        let (doorbell, doorbell_rx) = local_channel::new_bounded(1);
        let (arrived, arrived_rx) = local_channel::new_bounded(1);
        let (room, room_rx) = local_channel::new_bounded(1);
        Session {
            shared: Rc::new(Shared {
                link: RefCell::new(Link::new(config.link, incarnation)),
                generation: Cell::new(0),
                stopped: Cell::new(false),
                doorbell,
                doorbell_rx,
                arrived,
                arrived_rx,
                room,
                room_rx,
                started: Instant::now(),
            }),
            config,
        }
    }

    fn now_ns(&self) -> u64 {
        self.shared.started.elapsed().as_nanos() as u64
    }

    pub fn stats(&self) -> LinkStats {
        self.shared.link.borrow().stats()
    }

    /// Messages queued or sent and not yet acked by the peer.
    pub fn unacked(&self) -> usize {
        self.shared.link.borrow().unacked()
    }

    pub fn is_connected(&self) -> bool {
        self.shared.link.borrow().is_connected()
    }

    /// Whether `send` would take a message now (fewer than
    /// `send_buffer_msgs` wait for acks).
    pub fn has_room(&self) -> bool {
        self.shared.link.borrow().has_room()
    }

    /// Largest body a message may have.
    pub fn body_bytes_max(&self) -> usize {
        self.shared.link.borrow().body_bytes_max()
    }

    /// Queue a message; `Full` while `send_buffer_msgs` wait for acks,
    /// `Stopped` once the session is.
    pub fn send(&self, kind: u8, body: Vec<u8>) -> Result<u64, SendError> {
        if self.shared.stopped.get() {
            return Err(SendError::Stopped);
        }
        let seq = self.shared.link.borrow_mut().send(kind, body)?;
        let _ = self.shared.doorbell.try_send(());
        Ok(seq)
    }

    /// Queue a message, waiting for room (acks from the peer) if need be;
    /// `Stopped` once the session is.
    pub async fn send_wait(&self, kind: u8, body: Vec<u8>) -> Result<u64, SendError> {
        while !self.shared.stopped.get() && !self.shared.link.borrow().has_room() {
            let _ = self.shared.room_rx.recv().await;
        }
        let sent = self.send(kind, body);
        if self.shared.link.borrow().has_room() {
            // Another waiter may go on too.
            let _ = self.shared.room.try_send(());
        }
        sent
    }

    /// The next message from the peer, if one is here.
    pub fn recv(&self) -> Option<(u8, Vec<u8>)> {
        let mut link = self.shared.link.borrow_mut();
        let message = link.recv()?;
        // Room in the inbox: more credit to tell the peer. The pump hears of
        // it once a quarter of the window is owed, or once to start the
        // `ack_delay_ns` clock for less.
        if link.acks_due() || link.note_unreported_at(|| self.now_ns()) {
            let _ = self.shared.doorbell.try_send(());
        }
        if link.inbox_len() > 0 {
            // Another waiter may take the next.
            let _ = self.shared.arrived.try_send(());
        }
        Some(message)
    }

    /// The next message from the peer, waiting for it; `None` once the
    /// session is stopped (and nothing is left to take).
    pub async fn recv_wait(&self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(message) = self.recv() {
                return Some(message);
            }
            if self.shared.stopped.get() {
                return None;
            }
            let _ = self.shared.arrived_rx.recv().await;
        }
    }

    /// Stop: every pump of this session ends at its next wakeup, `dial`
    /// returns, and callers waiting to send or receive are answered.
    pub fn stop(&self) {
        self.shared.stopped.set(true);
        self.wake_all();
    }

    fn wake_all(&self) {
        let _ = self.shared.doorbell.try_send(());
        let _ = self.shared.arrived.try_send(());
        let _ = self.shared.room.try_send(());
    }

    /// Dial `addr` until stopped: connect (the handshake within its
    /// timeout), serve the connection until it ends, wait a backoff delay,
    /// again. Connections refused or lost are counted in the result.
    pub async fn dial(&self, addr: SocketAddr, identity: &Identity, seed: u64) -> DialReport {
        let mut backoff = Backoff::new(
            self.config.backoff_base.as_nanos().max(1) as u64,
            self.config.backoff_max.as_nanos().max(1) as u64,
            seed,
        );
        let mut report = DialReport::default();
        while !self.shared.stopped.get() {
            match connect(addr, identity, &self.config.conn).await {
                Ok(conn) => {
                    report.connected += 1;
                    let before = self.stats().delivered + self.stats().sent;
                    let ended = self.serve(conn, Role::Client).await;
                    if self.stats().delivered + self.stats().sent > before {
                        backoff.reset();
                    }
                    if matches!(ended, Ended::Stopped) {
                        break;
                    }
                    report.lost += 1;
                    report.last_error = Some(format!("{ended:?}"));
                }
                Err(e) => {
                    report.refused += 1;
                    report.last_error = Some(e.to_string());
                }
            }
            let delay = Duration::from_nanos(backoff.next_delay_ns());
            glommio::timer::sleep(delay).await;
        }
        report
    }

    /// Serve one authenticated connection (this side was `role` in its
    /// handshake) until it ends; the link is told of its start and of its
    /// end, also if this future is dropped (the connection with it).
    pub async fn serve(&self, mut conn: Connection, role: Role) -> Ended {
        // The connection carries link frames only from now: sealed, no crc.
        conn.allow_sealed_frames();
        let shared = &self.shared;
        let generation = shared.generation.get() + 1;
        shared.generation.set(generation);
        let now = self.now_ns();
        shared
            .link
            .borrow_mut()
            .connected(conn.peer().session, role, now);
        let _served = Served {
            session: self,
            generation,
        };
        self.pump(&mut conn, generation).await
    }

    async fn pump(&self, conn: &mut Connection, generation: u64) -> Ended {
        let shared = &self.shared;
        let heartbeat = Duration::from_nanos(self.config.link.heartbeat_ns);
        // Frames encoded and not yet all written, and how far written.
        let mut out = Vec::new();
        let mut written = 0;
        loop {
            if shared.stopped.get() {
                return Ended::Stopped;
            }
            if shared.generation.get() != generation {
                return Ended::Replaced;
            }
            if written == out.len() {
                out.clear();
                written = 0;
                let now = self.now_ns();
                shared
                    .link
                    .borrow_mut()
                    .poll_transmit(now, &mut out, self.config.write_bytes);
            }
            if shared.link.borrow().is_dead(self.now_ns()) {
                return Ended::Dead;
            }
            // Write, read and wait at once: a side that only wrote until
            // its peer read could wait on a peer doing the same.
            let due = shared.link.borrow().next_due_ns();
            let wait = due.map_or(heartbeat, |due| {
                Duration::from_nanos(due.saturating_sub(self.now_ns()).max(1))
            });
            let mut bell = std::pin::pin!(glommio::timer::timeout(wait, async {
                shared.doorbell_rx.recv().await;
                Ok(())
            }));
            let pending = &out[written..];
            let woke = futures_lite::future::poll_fn(|cx| {
                if !pending.is_empty() {
                    if let Poll::Ready(wrote) = conn.poll_write_some(cx, pending) {
                        return Poll::Ready(wrote.map(Woke::Wrote));
                    }
                }
                if let Poll::Ready(read) = conn.poll_read_more(cx) {
                    return Poll::Ready(read.map(Woke::Read));
                }
                if bell.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Woke::Bell));
                }
                Poll::Pending
            })
            .await;
            match woke {
                Err(e) => return Ended::Conn(e),
                Ok(Woke::Wrote(n)) => written += n,
                Ok(Woke::Bell) => {}
                Ok(Woke::Read(0)) => return Ended::Closed,
                Ok(Woke::Read(_)) => {
                    if shared.generation.get() != generation {
                        return Ended::Replaced;
                    }
                    if let Some(ended) = self.take_frames(conn) {
                        return ended;
                    }
                }
            }
        }
    }

    /// Hand every whole frame read so far to the link; wake whoever waits
    /// for what they brought.
    fn take_frames(&self, conn: &mut Connection) -> Option<Ended> {
        let shared = &self.shared;
        let now = self.now_ns();
        let mut link = shared.link.borrow_mut();
        let (inbox, unacked) = (link.inbox_len(), link.unacked());
        let ended = loop {
            match conn.next_buffered() {
                Ok(Some(frame)) => {
                    if let Err(e) = link.on_frame(&frame, now) {
                        break Some(Ended::Link(e));
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(Ended::Conn(e)),
            }
        };
        if link.inbox_len() > inbox {
            let _ = shared.arrived.try_send(());
        }
        if link.unacked() < unacked {
            let _ = shared.room.try_send(());
        }
        ended
    }
}

/// What woke a pump.
enum Woke {
    Wrote(usize),
    Read(usize),
    Bell,
}

/// A connection being served: when its `serve` ends or is dropped, the link
/// hears of it (unless a newer connection took over), and every waiter looks
/// again; the doorbell is rung on, so that a newer pump does not miss one
/// this pump took.
struct Served<'a> {
    session: &'a Session,
    generation: u64,
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        let shared = &self.session.shared;
        if shared.generation.get() == self.generation {
            shared.link.borrow_mut().disconnected();
        }
        self.session.wake_all();
    }
}

/// What `dial` met.
#[derive(Debug, Default, Clone)]
pub struct DialReport {
    pub connected: u64,
    /// Connections that ended other than by `stop`.
    pub lost: u64,
    /// Connection attempts that failed (refused, handshake, timeout).
    pub refused: u64,
    pub last_error: Option<String>,
}
