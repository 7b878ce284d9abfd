//! A link to one peer node: messages delivered once each, in order, across
//! any number of connections, with every frame authenticated and the
//! receiver's buffer bounded by credits. Sans I/O: the caller writes what
//! [`Link::poll_transmit`] encodes to the current connection, hands every
//! frame it reads to [`Link::on_frame`], and tells the link when a
//! connection comes ([`Link::connected`], with the handshake's session key)
//! and goes ([`Link::disconnected`]). The deterministic network simulation
//! (`net/tests/link_sim.rs`) drives the same code through lost connections,
//! delays, stale and forged frames and partitions.
//!
//! # Frames
//!
//! Every link frame's payload starts with a 64-byte header, little endian:
//!
//! ```text
//! 0  seq u64          data: the message's number (from 1); resume: the
//!                     incarnation of the receiver this side last heard from
//! 8  acked u64        the peer's messages this side has delivered, in order
//! 16 credit u64       the highest number the peer may send
//! 24 incarnation u64  this side's link (a new one per process start)
//! 32 kind u8          data: the caller's kind of message; 15 reserved bytes (0)
//! 48 tag [u8; 16]     AES-128-GCM's tag (below)
//! 64 body             (data only; 16-aligned in the frame), encrypted
//! ```
//!
//! Every frame is sealed with AES-128-GCM under the connection's session
//! key (its first 16 bytes; from the handshake, new for each connection;
//! AES-128 as TLS 1.3's mandatory suite, and about a fifth cheaper a byte
//! than AES-256 on the AMD EPYC VM measured): the body is
//! encrypted, and the tag covers the frame kind and bytes 0..48 (associated
//! data) and the body. The nonce is the sender's role (client or server of
//! the handshake) and the frame's number on this connection in this
//! direction, from 0: the receiver counts the frames it took, so a frame
//! replayed or moved within a connection fails its tag, as does the frame
//! after one dropped, and one reflected back to its sender (the other
//! role). No nonce repeats under a key: each direction has its own role
//! byte and counts up.
//!
//! Frame kinds: [`DATA_KIND`], [`ACK_KIND`] (acks and credit alone; also
//! the heartbeat) and [`RESUME_KIND`] (the first frame each side sends on a
//! connection). Every link frame is flagged `frame::FLAG_SEALED`: its tag
//! takes the place of the frame's crc (one pass less over each body on
//! each side). Before the tag is checked, only the frame's flags, length
//! and kind are looked at (the frame decoder checked its length):
//! a frame that fails it (another session's, a forged,
//! changed, replayed or reordered one) is a [`LinkError`], and the caller
//! drops the connection.
//!
//! # Delivery
//!
//! The sender numbers its messages and keeps each until the peer acks it
//! (at most `send_buffer_msgs`; [`Link::send`] refuses more: back-pressure).
//! On each connection both sides first send a resume: what they delivered
//! of the other's messages. The sender then sends again everything after
//! that, so a message lost with a connection is sent again, and one the
//! peer had already delivered is not. A data frame must carry the next
//! number the receiver expects and stay within the credit it granted;
//! anything else is a protocol error.
//!
//! # Credit
//!
//! The receiver grants `credit = delivered + room`, where room is what its
//! inbox (`window_msgs`) has left: the sender never sends past it, so the
//! inbox never holds more than `window_msgs` messages, whatever the peer
//! does (a peer that sends past its credit is refused). Within a stream
//! (one incarnation of each side), credit only grows. The inbox holds at
//! most `window_msgs` messages of at most a frame each: `window_msgs x
//! frame_bytes_max` bytes (1,024 x 64 KiB = 64 MiB with the defaults), and
//! the sender holds at most `send_buffer_msgs` (4,096) messages. (A window
//! of 256 messages ran `dirigo bench net` at 0.49-0.51M messages/s against
//! 0.77-0.84M with 1,024: credit goes out as the caller takes messages.)
//!
//! # Restarts
//!
//! Each side names its incarnation. A peer whose incarnation changed has
//! lost what it held: the link forgets the old stream both ways (messages
//! still unacked to the old incarnation, and those of it not yet taken, are
//! dropped and counted; the numbering starts again), and says so in
//! [`LinkStats::peer_restarts`].
//!
//! # Its connection
//!
//! A link owns every frame of its connection: the caller hands each one to
//! [`Link::on_frame`] (a frame of another kind is a protocol error) and
//! tells the link of a connection's end before the next one's start.
//! Recovering what they carried is the engine's (checkpoints), not the
//! link's.

use std::collections::VecDeque;
use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_128_GCM};

use crate::frame::{begin_frame, finish_sealed_frame, Frame, FrameConfig, FLAG_SEALED};
use crate::handshake::SessionKey;

/// A message.
pub const DATA_KIND: u8 = 1;
/// Acks and credit with no message; also the heartbeat.
pub const ACK_KIND: u8 = 2;
/// The first frame of each side on a connection.
pub const RESUME_KIND: u8 = 3;
/// Bytes of the link header in each frame's payload.
pub const LINK_HEADER_BYTES: usize = 64;
/// Bytes of the header the tag covers.
const FIELD_BYTES: usize = 48;
const TAG_BYTES: usize = 16;

/// Which end of the handshake this side was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Client => 0,
            Role::Server => 1,
        }
    }

    fn other(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Messages the receiving side holds for its caller: the credit it grants
    /// beyond what it delivered.
    pub window_msgs: u32,
    /// Messages the sending side holds, queued or sent and not yet acked.
    pub send_buffer_msgs: u32,
    /// Send an ack frame (the heartbeat) when nothing was sent for this long.
    pub heartbeat_ns: u64,
    /// Tell the peer of new acks or credit within this long, when no data
    /// frame carries them and they are under a quarter of the window.
    pub ack_delay_ns: u64,
    /// [`Link::is_dead`] says the connection is dead when nothing came for this long.
    pub dead_after_ns: u64,
    pub frame: FrameConfig,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            window_msgs: 1024,
            send_buffer_msgs: 4096,
            heartbeat_ns: 100_000_000,
            ack_delay_ns: 1_000_000,
            dead_after_ns: 1_000_000_000,
            frame: FrameConfig::new(64 * 1024).expect("a valid bound"),
        }
    }
}

/// Why [`Link::send`] took no message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// `send_buffer_msgs` are held: try again once the peer acked some.
    Full,
    /// The message cannot fit in one frame.
    TooLarge { body_bytes: usize, max: usize },
    /// The session that drives the link was stopped (`net::session`).
    Stopped,
}

/// A frame the link refuses; the caller drops the connection (the link is
/// already disconnected) and connects again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// A frame while no connection is up.
    NotConnected,
    Malformed(String),
    /// The tag does not verify: another session's frame, or a changed one.
    BadTag {
        kind: u8,
    },
    /// The peer broke the protocol (a gap, credit overrun, data before its
    /// resume, an unknown kind).
    Protocol(String),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::NotConnected => write!(f, "a link frame with no connection up"),
            LinkError::Malformed(why) => write!(f, "a malformed link frame: {why}"),
            LinkError::BadTag { kind } => write!(
                f,
                "a link frame (kind {kind}) whose tag does not verify: not from this session"
            ),
            LinkError::Protocol(why) => write!(f, "the peer broke the link protocol: {why}"),
        }
    }
}

impl std::error::Error for LinkError {}

/// What a link counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub connections: u64,
    pub sent: u64,
    /// Messages sent again on a later connection.
    pub resent: u64,
    pub delivered: u64,
    /// Messages dropped because the peer restarted: unacked to it, or
    /// received from its old incarnation and not yet taken.
    pub dropped_on_restart: u64,
    pub peer_restarts: u64,
    pub refused_frames: u64,
}

struct Outgoing {
    seq: u64,
    kind: u8,
    body: Vec<u8>,
    /// Sent on some connection before (a later send counts as resent).
    sent: bool,
}

struct Conn {
    /// AES-128-GCM under the session key's first 16 bytes.
    key: LessSafeKey,
    role: Role,
    /// Frames sealed for this connection, and frames opened from it: the
    /// nonces of the next frame each way.
    sealed: u64,
    opened: u64,
    resume_sent: bool,
    /// The peer's resume came: data may flow.
    resumed: bool,
    /// Highest number written on this connection.
    sent_up_to: u64,
    /// Acked and credit last told the peer on this connection.
    told: (u64, u64),
    /// Since when acked or credit changed without the peer being told.
    unreported_since_ns: Option<u64>,
    last_rx_ns: u64,
    last_tx_ns: u64,
}

/// One side of a link (see the module header).
pub struct Link {
    config: LinkConfig,
    incarnation: u64,
    peer_incarnation: Option<u64>,
    // Sending.
    next_seq: u64,
    /// Highest number sent on any connection (of this stream).
    highest_sent: u64,
    outbox: VecDeque<Outgoing>,
    peer_acked: u64,
    peer_credit: u64,
    // Receiving.
    delivered: u64,
    inbox: VecDeque<(u8, Vec<u8>)>,
    conn: Option<Conn>,
    stats: LinkStats,
}

/// A decoded, verified link header.
struct Header {
    seq: u64,
    acked: u64,
    credit: u64,
    incarnation: u64,
    kind: u8,
}

impl Link {
    /// A link of this side's `incarnation` (nonzero, new with each start of
    /// the process, e.g. random).
    pub fn new(config: LinkConfig, incarnation: u64) -> Link {
        assert!(incarnation != 0, "incarnation 0 means none");
        assert!(config.window_msgs > 0 && config.send_buffer_msgs > 0);
        assert!(
            config.frame.payload_bytes_max() >= LINK_HEADER_BYTES,
            "frames too small for the link header"
        );
        Link {
            config,
            incarnation,
            peer_incarnation: None,
            next_seq: 1,
            highest_sent: 0,
            outbox: VecDeque::new(),
            peer_acked: 0,
            peer_credit: 0,
            delivered: 0,
            inbox: VecDeque::new(),
            conn: None,
            stats: LinkStats::default(),
        }
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Messages held to send: queued, or sent and not yet acked.
    pub fn unacked(&self) -> usize {
        self.outbox.len()
    }

    /// Whether [`Link::send`] would take a message now.
    pub fn has_room(&self) -> bool {
        self.outbox.len() < self.config.send_buffer_msgs as usize
    }

    /// Messages delivered and not yet taken by [`Link::recv`].
    pub fn inbox_len(&self) -> usize {
        self.inbox.len()
    }

    /// Largest body a message may have.
    pub fn body_bytes_max(&self) -> usize {
        self.config.frame.payload_bytes_max() - LINK_HEADER_BYTES
    }

    /// Queue a message of `kind` (the caller's meaning); its number.
    pub fn send(&mut self, kind: u8, body: Vec<u8>) -> Result<u64, SendError> {
        let max = self.body_bytes_max();
        if body.len() > max {
            return Err(SendError::TooLarge {
                body_bytes: body.len(),
                max,
            });
        }
        if self.outbox.len() >= self.config.send_buffer_msgs as usize {
            return Err(SendError::Full);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.push_back(Outgoing {
            seq,
            kind,
            body,
            sent: false,
        });
        Ok(seq)
    }

    /// The next message delivered from the peer, in order: `(kind, body)`.
    pub fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        self.inbox.pop_front()
    }

    /// A connection came up, authenticated with `key`; this side was `role`
    /// in its handshake. Replaces any connection before it.
    pub fn connected(&mut self, key: SessionKey, role: Role, now_ns: u64) {
        self.stats.connections += 1;
        self.conn = Some(Conn {
            key: LessSafeKey::new(
                UnboundKey::new(&AES_128_GCM, &key.0[..16]).expect("16 bytes fit AES-128"),
            ),
            role,
            sealed: 0,
            opened: 0,
            resume_sent: false,
            resumed: false,
            sent_up_to: 0,
            told: (0, 0),
            unreported_since_ns: None,
            last_rx_ns: now_ns,
            last_tx_ns: now_ns,
        });
    }

    /// The connection is gone (closed, broken, or refused by this link).
    pub fn disconnected(&mut self) {
        self.conn = None;
    }

    /// Whether the connection is up but nothing came for `dead_after_ns`:
    /// the caller should drop it and connect again.
    pub fn is_dead(&self, now_ns: u64) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| now_ns.saturating_sub(c.last_rx_ns) >= self.config.dead_after_ns)
    }

    fn credit(&self) -> u64 {
        let room = (self.config.window_msgs as usize).saturating_sub(self.inbox.len());
        self.delivered + room as u64
    }

    /// Append to `out` the frames to write on the connection now, at most
    /// about `bytes_max` of them (at least one frame if any is due); how
    /// many frames. Nothing while no connection is up.
    pub fn poll_transmit(&mut self, now_ns: u64, out: &mut Vec<u8>, bytes_max: usize) -> usize {
        let credit = self.credit();
        let acked = self.delivered;
        // Read before anything is told below; if a data frame tells it, no
        // ack frame is needed anyway.
        let worth = self.acks_due();
        let start = out.len();
        let mut frames = 0;
        let Some(conn) = self.conn.as_mut() else {
            return 0;
        };
        if !conn.resume_sent {
            let seq = self.peer_incarnation.unwrap_or(0);
            let header = [seq, acked, credit, self.incarnation];
            encode(&self.config, conn, RESUME_KIND, header, 0, &[], out);
            conn.resume_sent = true;
            conn.told = (acked, credit);
            conn.last_tx_ns = now_ns;
            frames += 1;
        }
        if !conn.resumed {
            return frames;
        }
        let first = conn.sent_up_to.max(self.peer_acked) + 1;
        let skip = first.saturating_sub(self.outbox.front().map_or(first, |o| o.seq)) as usize;
        for message in self.outbox.iter_mut().skip(skip) {
            if message.seq > self.peer_credit || (frames > 0 && out.len() - start >= bytes_max) {
                break;
            }
            let header = [message.seq, acked, credit, self.incarnation];
            let body = &message.body;
            encode(
                &self.config,
                conn,
                DATA_KIND,
                header,
                message.kind,
                body,
                out,
            );
            if message.sent {
                self.stats.resent += 1;
            } else {
                self.stats.sent += 1;
            }
            message.sent = true;
            conn.sent_up_to = message.seq;
            self.highest_sent = self.highest_sent.max(message.seq);
            conn.told = (acked, credit);
            conn.last_tx_ns = now_ns;
            frames += 1;
        }
        // Acks and credit ride on data frames; alone, they wait until a
        // quarter of the window is worth telling, `ack_delay_ns` passed, or
        // the heartbeat is due (an ack frame per message taken would cost a
        // write and a tag each way).
        let stale = conn.told != (acked, credit);
        if !stale {
            conn.unreported_since_ns = None;
        } else if conn.unreported_since_ns.is_none() {
            conn.unreported_since_ns = Some(now_ns);
        }
        let delayed = conn
            .unreported_since_ns
            .is_some_and(|since| now_ns.saturating_sub(since) >= self.config.ack_delay_ns);
        let quiet = now_ns.saturating_sub(conn.last_tx_ns) >= self.config.heartbeat_ns;
        if (stale && (worth || delayed)) || quiet {
            let header = [0, acked, credit, self.incarnation];
            encode(&self.config, conn, ACK_KIND, header, 0, &[], out);
            conn.told = (acked, credit);
            conn.unreported_since_ns = None;
            conn.last_tx_ns = now_ns;
            frames += 1;
        }
        frames
    }

    /// Start the `ack_delay_ns` clock for acks or credit the peer was not
    /// told of (the caller took messages); true if it was not running, so
    /// that whoever drives the link can wake to keep it.
    pub fn note_unreported(&mut self, now_ns: u64) -> bool {
        self.note_unreported_at(|| now_ns)
    }

    /// [`Link::note_unreported`], reading the clock only if the `ack_delay_ns`
    /// clock is to start (not for every message taken while it runs).
    pub fn note_unreported_at(&mut self, now_ns: impl FnOnce() -> u64) -> bool {
        let credit = self.credit();
        let acked = self.delivered;
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        if conn.told == (acked, credit) || conn.unreported_since_ns.is_some() {
            return false;
        }
        conn.unreported_since_ns = Some(now_ns());
        true
    }

    /// Whether acks and credit not yet told are worth a frame of their own
    /// now (a quarter of the window): what a caller that just took messages
    /// checks before waking its transmitter.
    pub fn acks_due(&self) -> bool {
        let Some(conn) = self.conn.as_ref() else {
            return false;
        };
        let quarter = u64::from(self.config.window_msgs / 4).max(1);
        self.delivered.saturating_sub(conn.told.0) >= quarter
            || self.credit().saturating_sub(conn.told.1) >= quarter
    }

    /// When [`Link::poll_transmit`] has something due with nothing new (a
    /// delayed ack, or the heartbeat); `None` with no connection.
    pub fn next_due_ns(&self) -> Option<u64> {
        let conn = self.conn.as_ref()?;
        if !conn.resumed {
            // Nothing is sent before the peer's resume but the resume
            // itself: the next thing due is the dead-connection check.
            return Some(conn.last_rx_ns.saturating_add(self.config.dead_after_ns));
        }
        let heartbeat = conn.last_tx_ns.saturating_add(self.config.heartbeat_ns);
        let ack = conn.unreported_since_ns.map_or(u64::MAX, |since| {
            since.saturating_add(self.config.ack_delay_ns)
        });
        Some(heartbeat.min(ack))
    }

    /// A frame read from the connection. On an error the link is
    /// disconnected already; the caller closes the connection.
    pub fn on_frame(&mut self, frame: &Frame<'_>, now_ns: u64) -> Result<(), LinkError> {
        let outcome = self.take(frame, now_ns);
        if outcome.is_err() {
            self.stats.refused_frames += 1;
            self.conn = None;
        }
        outcome
    }

    fn take(&mut self, frame: &Frame<'_>, now_ns: u64) -> Result<(), LinkError> {
        let conn = self.conn.as_mut().ok_or(LinkError::NotConnected)?;
        let (header, body) = verify(conn, frame)?;
        conn.last_rx_ns = now_ns;
        match frame.kind {
            RESUME_KIND => {
                if conn.resumed {
                    return Err(LinkError::Protocol("a second resume".into()));
                }
                // Its acks and credit are read there, against the stream
                // they refer to.
                return self.resume(&header);
            }
            DATA_KIND | ACK_KIND => {
                if !conn.resumed {
                    return Err(LinkError::Protocol(
                        "a frame before the peer's resume".into(),
                    ));
                }
                if Some(header.incarnation) != self.peer_incarnation {
                    return Err(LinkError::Protocol(
                        "the incarnation changed within a connection".into(),
                    ));
                }
            }
            kind => return Err(LinkError::Protocol(format!("unknown frame kind {kind}"))),
        }
        if frame.kind == DATA_KIND {
            let expected = self.delivered + 1;
            if header.seq != expected {
                return Err(LinkError::Protocol(format!(
                    "message {} where {expected} was next",
                    header.seq
                )));
            }
            if header.seq > self.credit() {
                return Err(LinkError::Protocol(format!(
                    "message {} past the credit of {}",
                    header.seq,
                    self.credit()
                )));
            }
            self.inbox.push_back((header.kind, body));
            self.delivered = header.seq;
            self.stats.delivered += 1;
        }
        self.on_acks(header.acked, header.credit)
    }

    fn resume(&mut self, header: &Header) -> Result<(), LinkError> {
        let restarted = self
            .peer_incarnation
            .is_some_and(|known| known != header.incarnation);
        if restarted {
            // The peer lost what it held: forget its old stream (also what
            // of it was not taken yet), and what it had not acked of ours.
            self.stats.peer_restarts += 1;
            self.stats.dropped_on_restart += (self.outbox.len() + self.inbox.len()) as u64;
            self.outbox.clear();
            self.inbox.clear();
            self.next_seq = 1;
            self.highest_sent = 0;
            self.peer_acked = 0;
            self.peer_credit = 0;
            self.delivered = 0;
        }
        self.peer_incarnation = Some(header.incarnation);
        // What the peer acked and its credit refer to this incarnation's
        // stream only if it names this incarnation. If not, it never took
        // our resume (a first contact, a resume lost with its connection,
        // or this side restarted): it delivered nothing of this stream, it
        // starts it from 1, and its room (credit less acked) is the credit.
        let (acked, credit) = if header.seq == self.incarnation {
            if header.acked < self.peer_acked {
                return Err(LinkError::Protocol(format!(
                    "the peer resumed at message {} after it acked {}",
                    header.acked, self.peer_acked
                )));
            }
            (header.acked, header.credit)
        } else if self.peer_acked > 0 {
            return Err(LinkError::Protocol(format!(
                "the peer acked message {} and then no longer knew this incarnation",
                self.peer_acked
            )));
        } else {
            (0, header.credit.saturating_sub(header.acked))
        };
        self.check_acked(acked)?;
        let conn = self.conn.as_mut().expect("taking a frame");
        conn.resumed = true;
        conn.sent_up_to = acked;
        self.peer_acked = acked;
        self.peer_credit = credit;
        self.drop_acked();
        Ok(())
    }

    /// A peer may ack only what was sent to it.
    fn check_acked(&self, acked: u64) -> Result<(), LinkError> {
        if acked > self.highest_sent {
            return Err(LinkError::Protocol(format!(
                "the peer acked message {acked}, past the last sent ({})",
                self.highest_sent
            )));
        }
        Ok(())
    }

    fn on_acks(&mut self, acked: u64, credit: u64) -> Result<(), LinkError> {
        self.check_acked(acked)?;
        self.peer_acked = self.peer_acked.max(acked);
        self.peer_credit = self.peer_credit.max(credit);
        self.drop_acked();
        Ok(())
    }

    fn drop_acked(&mut self) {
        while self
            .outbox
            .front()
            .is_some_and(|o| o.seq <= self.peer_acked)
        {
            self.outbox.pop_front();
        }
    }
}

/// The nonce of frame `number` sent by `role` on a connection.
fn nonce(role: Role, number: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[0] = role.byte();
    bytes[4..].copy_from_slice(&number.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

/// The associated data of a frame: its kind, then the header's fields.
fn associated(frame_kind: u8, fields: &[u8]) -> [u8; 1 + FIELD_BYTES] {
    let mut aad = [0u8; 1 + FIELD_BYTES];
    aad[0] = frame_kind;
    aad[1..].copy_from_slice(fields);
    aad
}

/// Encode one link frame of `frame_kind` into `out`, sealed as the next
/// frame this side sends on `conn`.
fn encode(
    config: &LinkConfig,
    conn: &mut Conn,
    frame_kind: u8,
    header: [u64; 4],
    message_kind: u8,
    body: &[u8],
    out: &mut Vec<u8>,
) {
    // Written in place: the frame header, the link header, the tag, the
    // body, which is then encrypted where it lies.
    let start = begin_frame(out);
    let fields = out.len();
    for field in header {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out.push(message_kind);
    out.resize(fields + LINK_HEADER_BYTES, 0);
    out.extend_from_slice(body);
    let aad = associated(frame_kind, &out[fields..fields + FIELD_BYTES]);
    let nonce = nonce(conn.role, conn.sealed);
    conn.sealed += 1;
    let tag = conn
        .key
        .seal_in_place_separate_tag(
            nonce,
            Aad::from(&aad),
            &mut out[fields + LINK_HEADER_BYTES..],
        )
        .expect("a frame's body is far below AES-GCM's bound");
    out[fields + FIELD_BYTES..fields + LINK_HEADER_BYTES].copy_from_slice(tag.as_ref());
    finish_sealed_frame(&config.frame, frame_kind, start, out)
        .expect("a body within body_bytes_max fits a frame");
}

/// Open the next frame from the peer on `conn`: its header and its body,
/// decrypted; nothing of the header fields or body is read before the tag
/// verified (the flags and the length are checked first).
fn verify(conn: &mut Conn, frame: &Frame<'_>) -> Result<(Header, Vec<u8>), LinkError> {
    let payload = frame.payload;
    if frame.flags != FLAG_SEALED {
        // Under neither crc nor tag: link frames are flagged sealed only.
        return Err(LinkError::Malformed(format!(
            "flags {:#04x}, not sealed only",
            frame.flags
        )));
    }
    if payload.len() < LINK_HEADER_BYTES {
        return Err(LinkError::Malformed(format!(
            "{} bytes, short of the {LINK_HEADER_BYTES}-byte header",
            payload.len()
        )));
    }
    let (fields, rest) = payload.split_at(FIELD_BYTES);
    let (their_tag, sealed) = rest.split_at(TAG_BYTES);
    let tag: [u8; TAG_BYTES] = their_tag.try_into().expect("16 bytes");
    let aad = associated(frame.kind, fields);
    let mut body = sealed.to_vec();
    conn.key
        .open_in_place_separate_tag(
            nonce(conn.role.other(), conn.opened),
            Aad::from(&aad),
            Tag::from(tag),
            &mut body,
            0..,
        )
        .map_err(|_| LinkError::BadTag { kind: frame.kind })?;
    conn.opened += 1;
    if fields[33..FIELD_BYTES].iter().any(|&b| b != 0) {
        return Err(LinkError::Malformed("reserved header bytes set".into()));
    }
    let field = |i: usize| u64::from_le_bytes(fields[i * 8..i * 8 + 8].try_into().expect("8"));
    let header = Header {
        seq: field(0),
        acked: field(1),
        credit: field(2),
        incarnation: field(3),
        kind: fields[32],
    };
    Ok((header, body))
}

/// Delays between attempts to connect again: doubling from `base_ns` up to
/// `max_ns`, each drawn uniformly below its bound ("full jitter", so that
/// the nodes of a cluster that lost one peer do not all call it at once),
/// from a seeded generator (deterministic under simulation).
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ns: u64,
    max_ns: u64,
    attempt: u32,
    state: u64,
}

impl Backoff {
    pub fn new(base_ns: u64, max_ns: u64, seed: u64) -> Backoff {
        assert!(base_ns > 0 && max_ns >= base_ns);
        Backoff {
            base_ns,
            max_ns,
            attempt: 0,
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// How long to wait before the next attempt: from 1 ns to
    /// `min(max, base * 2^attempts)`, both included.
    pub fn next_delay_ns(&mut self) -> u64 {
        let bound = self
            .base_ns
            .saturating_mul(1u64 << self.attempt.min(40))
            .min(self.max_ns);
        self.attempt = self.attempt.saturating_add(1);
        // splitmix64
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        1 + z % bound
    }

    /// A connection held: the next loss starts from `base_ns` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound_with_jitter_and_resets() {
        let mut backoff = Backoff::new(1_000, 64_000, 7);
        let delays: Vec<u64> = (0..12).map(|_| backoff.next_delay_ns()).collect();
        for (i, &d) in delays.iter().enumerate() {
            let bound = (1_000u64 << i.min(6)).min(64_000);
            assert!(d >= 1 && d <= bound, "attempt {i}: {d} over {bound}");
        }
        assert!(delays[6..].iter().any(|&d| d > 32_000), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay_ns() <= 1_000);
    }
}
