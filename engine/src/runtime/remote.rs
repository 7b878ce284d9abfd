//! Remote actor sends: one run's shards spread over several nodes.
//!
//! A run that spans nodes numbers its shards across all of them: node 0's
//! shards first, then node 1's, and so on (`RemoteConfig::nodes`, the same
//! list on every node). The directory places actors over that whole range,
//! so an actor is named, homed and routed the same way wherever it is sent
//! from. Each process runs its own shards and one more thread, the
//! *gateway*: for every pair (local shard, shard of another node) the shard
//! has an ordinary ring out to the gateway and one in from it, so a shard
//! stages and flushes a packet for a remote shard exactly as for a local
//! one, and the gateway is the other end. Everything the shard protocol
//! carries between shards crosses the same way: messages (alone or as a
//! channel's run), acks (credits), placement updates, migration requests
//! and actors moving between nodes.
//! Per-channel order and exactly-once delivery are the shard protocol's
//! (sequence numbers, credits), over a session that delivers each frame
//! once and in order (`dirigo_net::session`, every frame sealed).
//!
//! # Frames
//!
//! The gateway drains its rings toward one node into a batch, 16 packets
//! at a time, until it holds `BATCH_MESSAGES_MAX` (512) messages or more
//! (a run counts each of its messages), or as many as fill three
//! quarters of a frame's body at the bytes a message took in the last
//! batch of messages with no move and no message in parts
//! (`batch_budget`), or the rings are empty, encodes
//! it as one rkyv archive (a
//! `WireBatch`: per packet, its source and target shard and the packet,
//! each message in its type's wire form, `Wire::Repr`, made as the
//! gateway takes it from the ring and undone as the receiving gateway
//! hands it on),
//! and sends it as one session message; a batch over the frame's body bound
//! is split in halves (a channel's run splits too, its sequence numbers
//! following): before it is encoded when the last batch's bytes a message
//! say it is over (without it, most frames of a busy channel of 512-byte
//! messages were encoded twice: two runs of 256 just passed a frame),
//! after when only its encoding shows it. A message that alone does not fit a frame crosses in
//! parts, as a move does (below; `WirePacket::MessagePart`), up to
//! `HANDOFF_BYTES_MAX` encoded. One over that, or that its type fails to
//! encode, cannot cross: it is dropped, counted (`oversized`), logged, and
//! the failure hook is told, naming the sender.
//! Its channel stops there (the target holds every later message of the
//! channel until the missing one), so the hook's owner must end the
//! sender's job; the dataflow layer's hook does. The
//! receiving gateway checks the archive once (rkyv validation; a move in
//! parts is checked again whole once assembled), checks that
//! each packet comes from a shard of the node that sent it and goes to a
//! shard of this one (an error drops the batch, logged and counted), and
//! pushes the packets into the target shards' rings.
//!
//! # Deadlines
//!
//! A message's deadline and origin are points on its node's clock, which
//! means nothing on another node. The gateway sends what is left of them
//! instead: the slack (deadline minus now, negative when late) and the age
//! (now minus origin), and the receiving gateway puts them back on its own
//! clock. So a message keeps its place in the receiver's deadline order,
//! and its latency counts from its input's arrival on the first node.
//! The slack is read when the gateway takes the message from its ring, and
//! put back when the other gateway decodes it: the time in between (a
//! batch waiting for room in a full session, the network, a resend after
//! a reconnect) is not charged, as the clocks of two nodes are never
//! compared.
//!
//! # Bounds
//!
//! The shards' rings toward the gateway bound what it is handed; a session
//! holds at most `SEND_BUFFER_FRAMES` frames unacked and takes at most
//! `WINDOW_FRAMES` from the peer, of at most `FRAME_BYTES_MAX` each; each
//! pass over a peer's rings starts at the next ring, so none waits behind
//! busier ones; while
//! a peer's session is full the gateway stops draining the rings toward
//! that peer (the shards' staging and credits hold the rest), and while a
//! target shard's ring is full it stops taking that peer's frames (the
//! session's credit stops the peer), unless that shard has died: what is
//! for it is dropped and counted, as the shards do. A move or a message
//! over a frame is the exception in size, within bounds: its sender holds
//! its encoding and its parts (at most `HANDOFF_BYTES_MAX` each, and a
//! batch takes no more from the rings after a move, past the drain under
//! way; a batch of messages holds at most `BATCH_MESSAGES_MAX` and a few,
//! so a batch of messages each near that size is the most a peer's
//! frames waiting to be sent come to), its receiver at most one move or
//! message per peer under way, of at most `HANDOFF_BYTES_MAX`. Nothing
//! grows without bound.
//!
//! # Moving an actor to another node
//!
//! Within a node an actor's slot moves by ownership; to another node it
//! moves by value (`shard::RemoteSlot`, a `Handoff` on the wire): its
//! owner snapshots it (`Actor::snapshot`, as for a deactivation) and sends
//! the snapshot with its channel tables, its mailbox (each message with
//! the credit it holds), its early arrivals and its sends not admitted
//! yet; the new owner rebuilds it with the factory from the snapshot and
//! takes all of that as its own, so order, credits and exactly-once
//! delivery carry over as in a local move (messages still on their way to
//! the old owner are forwarded, placement updates broadcast to every
//! shard of the run). Its per-actor counters start again there. A move
//! over a frame's body crosses in parts (`WirePacket::HandoffPart`): the
//! gateway encodes it alone, as a batch of one, and sends the encoding in
//! parts of a frame's body less 1 KiB each (or half a body, whichever is
//! more), back to back; the receiving gateway assembles one move per peer
//! at a time (`Assembly`, at most `HANDOFF_BYTES_MAX`, 32 MiB), checks the
//! whole as it checks a batch, and hands it on as one packet. A move whose
//! parts do not all come whole (out of place, over the bound, a first
//! part while another move is under way, the peer restarted midway, or a
//! whole that is not the move its parts said) is dropped, and the
//! receiving gateway hands the target shard a `Lost` notice in its place
//! (with no credits: those its messages held are not known there). A
//! move is refused (counted in `migrations_refused`; an active actor
//! stays as it was, a deactivated one stays, activated) while the actor
//! holds more than
//! `shard::REMOTE_HANDOFF_MESSAGES_MAX` (1,024) messages, its channel
//! tables more than `shard::REMOTE_HANDOFF_CHANNELS_MAX` (4,096) entries,
//! its snapshot is over `shard::REMOTE_HANDOFF_STATE_BYTES_MAX` (16 MiB),
//! or it says it may not be deactivated. Should the encoded move still be
//! over `HANDOFF_BYTES_MAX` (many large messages), it is dropped like an
//! oversized message: the actor is lost with what it held and the failure hook is
//! told its name on both nodes (the hook's owner must end its job). In its
//! place goes a `Lost` packet (the actor, its new epoch, the credits its
//! messages held per shard, how many held none): the new owner counts
//! them all dropped and holds its place as a failed actor, so the
//! credits go back, later messages to it are dropped with theirs, and a
//! later move of it stops there. An actor deactivated on its node is
//! activated there from its saved state first; one never activated there
//! moves by name only.
//! The actor's timers stay with the shard that set them and still reach it.
//!
//! # Not here
//!
//! What happens when a node of the run is lost: what was in flight to it
//! stays unacked (its senders run out of credit for its actors), and an
//! actor moving to it is gone with it; recovering a run is the
//! checkpoints' job. The gateway only says, per node, whether its session
//! is connected (`RemoteSnapshot::connected`).

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::{Error as RkyvError, Strategy};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use dirigo_net::conn::{accept, connect, ConnConfig};
use dirigo_net::handshake::Identity;
use dirigo_net::link::{Backoff, LinkConfig, Role, SendError as LinkSendError};
use dirigo_net::session::{Session, SessionConfig};
use dirigo_net::FrameConfig;

use crate::actor::{Outgoing, SchedCtx};
use crate::doorbell::Doorbell;
use crate::ids::{ActorId, JobId, ShardId};
use crate::ring::{Consumer, Producer};

use super::directory::Placement;
use super::executor::ReadyGuard;
use super::shard::{Envelope, Packet, RemoteSlot, Run};
use super::{Failure, FailureHook, Shared};

/// The session message kind of a batch of packets.
const BATCH_KIND: u8 = 1;
/// A batch stops taking packets once it holds this many messages (a run
/// counts each of its messages; the last drain of 16 packets may take it
/// past), or fewer where its messages are large (`batch_budget`); frames
/// stay within their byte bound by splitting.
const BATCH_MESSAGES_MAX: usize = 512;
/// A frame's bound between gateways.
pub const FRAME_BYTES_MAX: usize = 256 * 1024;
/// Frames a gateway takes from one peer before its caller drains them.
const WINDOW_FRAMES: u32 = 64;
/// Frames a gateway holds for one peer, sent and not yet acked.
const SEND_BUFFER_FRAMES: u32 = 64;
/// How often a gateway with frames waiting for a full session looks again.
const FULL_RETRY: Duration = Duration::from_micros(100);
/// How long an idle gateway parks before it looks again anyway.
const PARK_MAX: Duration = Duration::from_millis(50);
/// The alignment an archive is read at.
const ARCHIVE_ALIGN: usize = 16;
/// How often a gateway looks again at a full ring to a local shard.
const RING_RETRY: Duration = Duration::from_micros(20);

/// A move to another node whose packet is over a frame crosses as parts
/// (`WirePacket::HandoffPart`), each a frame's body less this much (room
/// for the part's own fields, under 100 bytes encoded) of its encoding.
const HANDOFF_PART_ROOM: usize = 1024;

/// The largest encoded move or message that crosses in parts: over it
/// (with `shard::REMOTE_HANDOFF_STATE_BYTES_MAX`, 16 MiB, of state, only
/// many large messages get a move there) a move is lost (`Lost`), and a
/// message dropped. A receiving gateway holds at most this much of a
/// peer's move or message at once.
pub const HANDOFF_BYTES_MAX: usize = 32 * 1024 * 1024;

/// One node of a run.
#[derive(Clone, Debug)]
pub struct RemoteNode {
    /// Where its gateway listens.
    pub addr: SocketAddr,
    /// How many shards it runs.
    pub shards: u16,
}

/// This node's part in a run that spans nodes.
#[derive(Debug)]
pub struct RemoteConfig {
    /// Every node of the run, in the same order on every node: global shard
    /// ids run through them in this order.
    pub nodes: Vec<RemoteNode>,
    /// This node's place in `nodes`.
    pub me: usize,
    /// Where this node's gateway takes connections (bound to
    /// `nodes[me].addr`): a node dials those after it in `nodes` and
    /// accepts those before it.
    pub listener: std::net::TcpListener,
    /// The cluster's name and shared secret: every connection is
    /// authenticated both ways (`dirigo_net::handshake`); node `i` of
    /// `nodes` authenticates as node id `i + 1`.
    pub cluster: String,
    pub secret: Vec<u8>,
    /// Changes each time this node's part starts (a restarted peer's
    /// session drops what it held, see `dirigo_net::link`).
    pub incarnation: u64,
}

/// Which shards of a run are this process's.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    /// The global id of this node's first shard.
    pub first: u16,
    /// How many shards this node runs.
    pub local: u16,
    /// Per shard of the run, the node that runs it.
    pub node_of: Vec<u16>,
}

impl Layout {
    /// A run on one node.
    pub fn single(shards: usize) -> Layout {
        Layout {
            first: 0,
            local: shards.min(u16::MAX as usize) as u16,
            node_of: vec![0; shards],
        }
    }

    pub fn of(nodes: &[RemoteNode], me: usize) -> Result<Layout, String> {
        if me >= nodes.len() {
            return Err(format!("node {me} of a run of {} nodes", nodes.len()));
        }
        let total: usize = nodes.iter().map(|n| usize::from(n.shards)).sum();
        if total > 1024 || nodes.iter().any(|n| n.shards == 0) {
            return Err(format!(
                "a run needs 1 to 1024 shards on each node and at most 1024 in all, not {:?}",
                nodes.iter().map(|n| n.shards).collect::<Vec<_>>()
            ));
        }
        let mut node_of = Vec::with_capacity(total);
        let mut first = 0;
        for (i, node) in nodes.iter().enumerate() {
            if i == me {
                first = node_of.len() as u16;
            }
            node_of.extend(std::iter::repeat_n(i as u16, usize::from(node.shards)));
        }
        Ok(Layout {
            first,
            local: nodes[me].shards,
            node_of,
        })
    }

    pub fn total(&self) -> u16 {
        self.node_of.len() as u16
    }

    pub fn local_range(&self) -> std::ops::Range<u16> {
        self.first..self.first + self.local
    }

    /// `shard`'s index among this node's shards, if it is one of them.
    pub fn local_index(&self, shard: ShardId) -> Option<usize> {
        self.local_range()
            .contains(&shard.0)
            .then(|| usize::from(shard.0 - self.first))
    }
}

/// A message that crosses nodes: it becomes its `Repr` (an rkyv-encodable
/// value, checked on the way in) as the gateway takes it from its ring, and
/// is made again from it on the other node. A type that is its own
/// representation says so with [`WireValue`]; the dataflow layer's
/// `DataMsg` has a representation of its own (its record batches encoded).
pub trait Wire: Send + Sized + 'static {
    type Repr: WireRepr;
    fn into_wire(self) -> Self::Repr;
    fn from_wire(repr: Self::Repr) -> Self;
}

/// A message type that crosses nodes as itself (rkyv-encodable): `impl
/// WireValue for MyMessage {}` makes it [`Wire`].
pub trait WireValue: WireRepr {}

impl<M: WireValue> Wire for M {
    type Repr = M;

    #[inline]
    fn into_wire(self) -> M {
        self
    }

    #[inline]
    fn from_wire(repr: M) -> M {
        repr
    }
}

impl WireValue for Vec<u8> {}

/// What crosses: rkyv-encodable and checked on the way in. Implemented for
/// every such type; nothing to write by hand.
pub trait WireRepr: Send + Sized + 'static {
    #[doc(hidden)]
    fn encode_batch(batch: &WireBatch<Self>, out: Vec<u8>) -> Result<Vec<u8>, RkyvError>;
    #[doc(hidden)]
    fn decode_batch(bytes: &[u8]) -> Result<WireBatch<Self>, RkyvError>;
}

impl<M> WireRepr for M
where
    M: Archive + Send + 'static,
    M: for<'a> Serialize<HighSerializer<Vec<u8>, ArenaHandle<'a>, RkyvError>>,
    M::Archived: for<'a> CheckBytes<HighValidator<'a, RkyvError>>
        + Deserialize<M, Strategy<Pool, RkyvError>>,
{
    fn encode_batch(batch: &WireBatch<Self>, out: Vec<u8>) -> Result<Vec<u8>, RkyvError> {
        // Positions in the archive are relative to its start: the receiver
        // copies it to an aligned buffer before it reads it.
        rkyv::api::high::to_bytes_in::<_, RkyvError>(batch, out)
    }

    fn decode_batch(bytes: &[u8]) -> Result<WireBatch<Self>, RkyvError> {
        rkyv::from_bytes::<WireBatch<M>, RkyvError>(bytes)
    }
}

/// A message's scheduling context as it crosses nodes: what is left of its
/// deadline, and how long ago its input arrived (see "Deadlines").
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[doc(hidden)]
pub struct WireSched {
    job: u32,
    /// Deadline minus now (ns); meaningless unless `deadline_set`.
    slack_ns: i64,
    /// Now minus origin (ns); meaningless unless `origin_set`.
    age_ns: u64,
    deadline_set: bool,
    origin_set: bool,
}

impl WireSched {
    fn from_sched(sched: SchedCtx, now_ns: u64) -> WireSched {
        let slack = i128::from(sched.deadline_ns) - i128::from(now_ns);
        WireSched {
            job: sched.job.0,
            slack_ns: slack.clamp(i64::MIN.into(), i64::MAX.into()) as i64,
            age_ns: now_ns.saturating_sub(sched.origin_ns),
            deadline_set: sched.deadline_ns != 0,
            origin_set: sched.origin_ns != 0,
        }
    }

    /// Back on the receiving clock; a time that would fall before its
    /// start is its start (1 ns: 0 means "none").
    fn to_sched(self, now_ns: u64) -> SchedCtx {
        let deadline = i128::from(now_ns) + i128::from(self.slack_ns);
        SchedCtx {
            job: JobId(self.job),
            deadline_ns: if self.deadline_set {
                deadline.clamp(1, u64::MAX.into()) as u64
            } else {
                0
            },
            origin_ns: if self.origin_set {
                now_ns.saturating_sub(self.age_ns).max(1)
            } else {
                0
            },
        }
    }
}

/// One packet of a batch, as the shard protocol has it.
#[derive(Archive, Serialize, Deserialize)]
#[doc(hidden)]
pub enum WirePacket<M> {
    Message {
        to: ActorId,
        from: ActorId,
        seq: u64,
        credit_shard: u16,
        route_epoch: u64,
        sched: WireSched,
        message: M,
    },
    Run {
        to: ActorId,
        from: ActorId,
        first_seq: u64,
        credit_shard: u16,
        route_epoch: u64,
        messages: Vec<(WireSched, M)>,
    },
    Ack {
        actor: ActorId,
        messages: u32,
    },
    Placement {
        actor: ActorId,
        shard: u16,
        epoch: u64,
    },
    Migrate {
        actor: ActorId,
        to: u16,
    },
    /// An actor moving to the receiving node (`shard::RemoteSlot`).
    Handoff(Box<WireSlot<M>>),
    /// One part of a `Handoff` over a frame: `bytes` is part `part` of
    /// `parts` of the encoding of a batch holding that one `Handoff` (see
    /// `Assembly`). The parts of a move go out back to back, in order.
    HandoffPart {
        actor: ActorId,
        epoch: u64,
        part: u32,
        parts: u32,
        bytes: Vec<u8>,
    },
    /// One part of a message (alone, or a run of one) over a frame:
    /// `bytes` is part `part` of `parts` of the encoding of a batch
    /// holding that one message to `to`, number `seq` on its channel. The
    /// parts of a message go out back to back, in order.
    MessagePart {
        to: ActorId,
        seq: u64,
        part: u32,
        parts: u32,
        bytes: Vec<u8>,
    },
    /// In place of a `Handoff` that could not cross (over
    /// `HANDOFF_BYTES_MAX` encoded, or not encodable; or, made by the
    /// receiving gateway, one whose parts did not all come whole): the actor is
    /// lost, placed at the target as failed, and the credits its messages
    /// held, `(shard, messages)`, go back (`Packet::LostHandoff`).
    Lost {
        actor: ActorId,
        epoch: u64,
        credits: Vec<(u16, u32)>,
        uncredited: u32,
    },
}

/// An early arrival of a moving actor: an envelope to it.
#[derive(Archive, Serialize, Deserialize)]
#[doc(hidden)]
pub struct WireEarly<M> {
    from: ActorId,
    seq: u64,
    credit_shard: u16,
    route_epoch: u64,
    sched: WireSched,
    message: M,
}

/// A send of a moving actor not admitted yet.
#[derive(Archive, Serialize, Deserialize)]
#[doc(hidden)]
pub struct WireBlocked<M> {
    to: ActorId,
    sched: WireSched,
    uncredited: bool,
    message: M,
}

/// `shard::RemoteSlot` on the wire.
#[derive(Archive, Serialize, Deserialize)]
#[doc(hidden)]
pub struct WireSlot<M> {
    id: ActorId,
    epoch: u64,
    state: Option<Vec<u8>>,
    in_seq: Vec<(ActorId, u64)>,
    out_seq: Vec<(ActorId, u64)>,
    mailbox: Vec<(WireSched, u16, M)>,
    early: Vec<WireEarly<M>>,
    blocked: Vec<WireBlocked<M>>,
}

impl<R> WireSlot<R> {
    fn from_slot<M: Wire<Repr = R>>(slot: RemoteSlot<M>, now_ns: u64) -> WireSlot<R> {
        let wire = |sched| WireSched::from_sched(sched, now_ns);
        WireSlot {
            id: slot.id,
            epoch: slot.epoch,
            state: slot.state,
            in_seq: slot.in_seq,
            out_seq: slot.out_seq,
            mailbox: slot
                .mailbox
                .into_iter()
                .map(|(sched, credit, m)| (wire(sched), credit, m.into_wire()))
                .collect(),
            early: slot
                .early
                .into_iter()
                .map(|env| WireEarly {
                    from: env.from,
                    seq: env.seq,
                    credit_shard: env.credit_shard,
                    route_epoch: env.route_epoch,
                    sched: wire(env.sched),
                    message: env.message.into_wire(),
                })
                .collect(),
            blocked: slot
                .blocked
                .into_iter()
                .map(|out| WireBlocked {
                    to: out.to,
                    sched: wire(out.sched),
                    uncredited: out.uncredited,
                    message: out.message.into_wire(),
                })
                .collect(),
        }
    }

    fn into_slot<M: Wire<Repr = R>>(self, now_ns: u64) -> RemoteSlot<M> {
        let id = self.id;
        RemoteSlot {
            id,
            epoch: self.epoch,
            state: self.state,
            in_seq: self.in_seq,
            out_seq: self.out_seq,
            mailbox: self
                .mailbox
                .into_iter()
                .map(|(sched, credit, m)| (sched.to_sched(now_ns), credit, M::from_wire(m)))
                .collect(),
            early: self
                .early
                .into_iter()
                .map(|e| Envelope {
                    to: id,
                    from: e.from,
                    seq: e.seq,
                    credit_shard: e.credit_shard,
                    route_epoch: e.route_epoch,
                    sched: e.sched.to_sched(now_ns),
                    message: M::from_wire(e.message),
                })
                .collect(),
            blocked: self
                .blocked
                .into_iter()
                .map(|b| Outgoing {
                    to: b.to,
                    sched: b.sched.to_sched(now_ns),
                    message: M::from_wire(b.message),
                    due_ns: 0,
                    uncredited: b.uncredited,
                })
                .collect(),
        }
    }

    /// The shards whose credit its messages hold (besides "none" and
    /// "a self-send").
    fn credit_shards(&self) -> impl Iterator<Item = u16> + '_ {
        self.mailbox
            .iter()
            .map(|(_, credit, _)| *credit)
            .chain(self.early.iter().map(|e| e.credit_shard))
            .filter(|&s| s < u16::MAX - 1)
    }

    fn messages(&self) -> usize {
        self.mailbox.len() + self.early.len() + self.blocked.len()
    }

    /// What a lost move leaves: the credits its messages hold, per shard.
    fn lost(&self) -> WirePacket<R> {
        let mut credits: Vec<(u16, u32)> = Vec::new();
        for shard in self.credit_shards() {
            match credits.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, messages)) => *messages += 1,
                None => credits.push((shard, 1)),
            }
        }
        let credited: u32 = credits.iter().map(|&(_, m)| m).sum();
        WirePacket::Lost {
            actor: self.id,
            epoch: self.epoch,
            credits,
            uncredited: (self.messages() as u32).saturating_sub(credited),
        }
    }
}

#[derive(Archive, Serialize, Deserialize)]
#[doc(hidden)]
pub struct WireItem<M> {
    from_shard: u16,
    to_shard: u16,
    packet: WirePacket<M>,
}

/// What crosses between two gateways in one frame.
#[derive(Archive, Serialize, Deserialize)]
#[doc(hidden)]
pub struct WireBatch<M> {
    items: Vec<WireItem<M>>,
}

#[cfg(test)]
impl<R> WireBatch<R> {
    /// A batch of `messages`, each alone in a packet between two shards,
    /// for tests of a message type's wire form.
    pub(crate) fn of_messages(messages: Vec<R>) -> WireBatch<R> {
        let actor = ActorId::new(JobId(1), 0, 0);
        let items = messages
            .into_iter()
            .enumerate()
            .map(|(seq, message)| WireItem {
                from_shard: 0,
                to_shard: 1,
                packet: WirePacket::Message {
                    to: actor,
                    from: actor,
                    seq: seq as u64,
                    credit_shard: 0,
                    route_epoch: 0,
                    sched: WireSched::from_sched(SchedCtx::default(), 0),
                    message,
                },
            })
            .collect();
        WireBatch { items }
    }

    /// The messages of a batch `of_messages` made, in order.
    pub(crate) fn into_messages(self) -> Vec<R> {
        self.items
            .into_iter()
            .filter_map(|item| match item.packet {
                WirePacket::Message { message, .. } => Some(message),
                _ => None,
            })
            .collect()
    }
}

impl<R> WirePacket<R> {
    /// The packet for the wire; `None` for a handoff by ownership, which
    /// never crosses nodes (`ShardCore::migrate_out` sends an actor to
    /// another node as a `RemoteHandoff`).
    fn from_packet<M: Wire<Repr = R>>(packet: Packet<M>, now_ns: u64) -> Option<WirePacket<R>> {
        Some(match packet {
            Packet::Message(env) => WirePacket::Message {
                to: env.to,
                from: env.from,
                seq: env.seq,
                credit_shard: env.credit_shard,
                route_epoch: env.route_epoch,
                sched: WireSched::from_sched(env.sched, now_ns),
                message: env.message.into_wire(),
            },
            Packet::Run(run) => WirePacket::Run {
                to: run.to,
                from: run.from,
                first_seq: run.first_seq,
                credit_shard: run.credit_shard,
                route_epoch: run.route_epoch,
                messages: run
                    .messages
                    .into_iter()
                    .map(|(sched, m)| (WireSched::from_sched(sched, now_ns), m.into_wire()))
                    .collect(),
            },
            Packet::Ack { actor, messages } => WirePacket::Ack { actor, messages },
            Packet::Placement { actor, placement } => WirePacket::Placement {
                actor,
                shard: placement.shard.0,
                epoch: placement.epoch,
            },
            Packet::Migrate { actor, to } => WirePacket::Migrate { actor, to: to.0 },
            Packet::RemoteHandoff(slot) => {
                WirePacket::Handoff(Box::new(WireSlot::from_slot(*slot, now_ns)))
            }
            Packet::LostHandoff {
                actor,
                epoch,
                credits,
                uncredited,
            } => WirePacket::Lost {
                actor,
                epoch,
                credits,
                uncredited,
            },
            Packet::Handoff(..) => return None,
        })
    }

    /// The packet for the target shard; `None` for a part of a move,
    /// which the receiving gateway assembles first (`Assembly`).
    fn into_packet<M: Wire<Repr = R>>(self, now_ns: u64) -> Option<Packet<M>> {
        Some(match self {
            WirePacket::Message {
                to,
                from,
                seq,
                credit_shard,
                route_epoch,
                sched,
                message,
            } => Packet::Message(Envelope {
                to,
                from,
                seq,
                credit_shard,
                route_epoch,
                sched: sched.to_sched(now_ns),
                message: M::from_wire(message),
            }),
            WirePacket::Run {
                to,
                from,
                first_seq,
                credit_shard,
                route_epoch,
                messages,
            } => Packet::Run(Run {
                to,
                from,
                first_seq,
                credit_shard,
                route_epoch,
                messages: messages
                    .into_iter()
                    .map(|(sched, m)| (sched.to_sched(now_ns), M::from_wire(m)))
                    .collect(),
            }),
            WirePacket::Ack { actor, messages } => Packet::Ack { actor, messages },
            WirePacket::Placement {
                actor,
                shard,
                epoch,
            } => Packet::Placement {
                actor,
                placement: Placement {
                    shard: ShardId(shard),
                    epoch,
                },
            },
            WirePacket::Migrate { actor, to } => Packet::Migrate {
                actor,
                to: ShardId(to),
            },
            WirePacket::Handoff(slot) => Packet::RemoteHandoff(Box::new(slot.into_slot(now_ns))),
            WirePacket::Lost {
                actor,
                epoch,
                credits,
                uncredited,
            } => Packet::LostHandoff {
                actor,
                epoch,
                credits,
                uncredited,
            },
            WirePacket::HandoffPart { .. } | WirePacket::MessagePart { .. } => return None,
        })
    }

    fn messages(&self) -> usize {
        match self {
            WirePacket::Message { .. } => 1,
            WirePacket::Run { messages, .. } => messages.len(),
            WirePacket::Handoff(slot) => slot.messages(),
            _ => 0,
        }
    }

    /// Whether every shard the packet names besides its ends (the shard
    /// whose credit a message holds, a placement's, a migration's target)
    /// is one of the run's `total`.
    fn names_shards_within(&self, total: usize) -> bool {
        let within = |s: u16| usize::from(s) < total;
        match self {
            // A message that holds no credit names `NO_SHARD`.
            WirePacket::Message { credit_shard, .. } | WirePacket::Run { credit_shard, .. } => {
                *credit_shard == u16::MAX || within(*credit_shard)
            }
            WirePacket::Placement { shard, .. } => within(*shard),
            WirePacket::Migrate { to, .. } => within(*to),
            WirePacket::Handoff(slot) => slot.credit_shards().all(within),
            WirePacket::Lost { credits, .. } => credits.iter().all(|&(s, _)| within(s)),
            WirePacket::HandoffPart { .. } | WirePacket::MessagePart { .. } => true,
            WirePacket::Ack { .. } => true,
        }
    }

    /// The sender of the packet's messages, for a failure report.
    fn sender(&self) -> Option<ActorId> {
        match self {
            WirePacket::Message { from, .. } | WirePacket::Run { from, .. } => Some(*from),
            WirePacket::Handoff(slot) => Some(slot.id),
            WirePacket::Lost { actor, .. } | WirePacket::HandoffPart { actor, .. } => Some(*actor),
            _ => None,
        }
    }
}

/// The gateway's counts (cumulative, since the start).
#[derive(Debug, Default)]
pub struct RemoteStats {
    frames_out: AtomicU64,
    frames_in: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    messages_in: AtomicU64,
    /// Batches split because they were over the bound, or would be by the
    /// last batch's measure of a message.
    splits: AtomicU64,
    /// Messages dropped because one alone is over the frame's bound, or
    /// held by a move that could not cross.
    oversized: AtomicU64,
    /// Parts of moves over a frame sent (`WirePacket::HandoffPart`).
    handoff_parts_out: AtomicU64,
    /// Parts of messages over a frame sent (`WirePacket::MessagePart`).
    message_parts_out: AtomicU64,
    /// Batches refused (not an archive, or naming shards they may not),
    /// and parts of moves refused (out of place, over the bound, or a
    /// whole that is not the move its parts said).
    refused: AtomicU64,
    /// Packets for a local shard that died, dropped.
    dropped_to_dead_shards: AtomicU64,
    /// Per node of the run, whether this node's session to it is connected
    /// (this node's own entry is always set), as of the gateway's last pass
    /// (at most `PARK_MAX` ago).
    connected: Vec<std::sync::atomic::AtomicBool>,
    /// Per node of the run, the times it came back as a new process (its
    /// session's peer restarts), as of the gateway's last pass.
    peer_restarts: Vec<AtomicU64>,
    /// Per node of the run, whether everything for it was sent and acked at
    /// the gateway's last pass (its rings empty, no frame waiting, none
    /// unacked by its session; this node's own entry is always set).
    sent_all: Vec<std::sync::atomic::AtomicBool>,
    /// The gateway's passes over its peers so far.
    passes: AtomicU64,
}

/// A copy of [`RemoteStats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteSnapshot {
    pub frames_out: u64,
    pub frames_in: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub messages_in: u64,
    pub splits: u64,
    pub oversized: u64,
    pub handoff_parts_out: u64,
    pub message_parts_out: u64,
    pub refused: u64,
    pub dropped_to_dead_shards: u64,
    /// Per node of the run: connected to it (this node: `true`).
    pub connected: Vec<bool>,
    /// Per node of the run: the times it came back as a new process (its
    /// part of the run started again, with none of this one's state).
    pub peer_restarts: Vec<u64>,
    /// Per node of the run: everything for it sent and acked as of the
    /// gateway's last pass (this node: `true`).
    pub sent_all: Vec<bool>,
    /// The gateway's passes over its peers so far: a figure read after
    /// two more passes is newer than anything a shard handed it before.
    pub passes: u64,
}

impl RemoteStats {
    pub(crate) fn new(nodes: usize, me: usize) -> RemoteStats {
        RemoteStats {
            connected: (0..nodes)
                .map(|j| std::sync::atomic::AtomicBool::new(j == me))
                .collect(),
            sent_all: (0..nodes)
                .map(|j| std::sync::atomic::AtomicBool::new(j == me))
                .collect(),
            peer_restarts: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            ..RemoteStats::default()
        }
    }

    pub fn snapshot(&self) -> RemoteSnapshot {
        let passes = self.passes.load(Ordering::Acquire);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RemoteSnapshot {
            frames_out: get(&self.frames_out),
            frames_in: get(&self.frames_in),
            bytes_out: get(&self.bytes_out),
            bytes_in: get(&self.bytes_in),
            messages_out: get(&self.messages_out),
            messages_in: get(&self.messages_in),
            splits: get(&self.splits),
            oversized: get(&self.oversized),
            handoff_parts_out: get(&self.handoff_parts_out),
            message_parts_out: get(&self.message_parts_out),
            refused: get(&self.refused),
            dropped_to_dead_shards: get(&self.dropped_to_dead_shards),
            connected: self
                .connected
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            peer_restarts: self.peer_restarts.iter().map(get).collect(),
            // Read before `sent_all`: a pass counted here ended before
            // the flags read below were stored.
            passes,
            sent_all: self
                .sent_all
                .iter()
                .map(|c| c.load(Ordering::Acquire))
                .collect(),
        }
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A ring between a shard of this node and one of another node, with its
/// two ends' global ids (source, target).
pub(super) type Crossing<R> = (ShardId, ShardId, R);

/// The rings and handles `Runtime::start_with` makes for the gateway.
pub(super) struct GatewayParts<M: Send + 'static> {
    pub layout: Layout,
    /// From a local shard to another node's shard: the gateway drains it.
    pub outbound: Vec<Crossing<Consumer<Packet<M>>>>,
    /// From another node's shard to a local one: the gateway fills it.
    pub inbound: Vec<Crossing<Producer<Packet<M>>>>,
    pub shared_stop: Arc<Shared<M>>,
    pub doorbell: Arc<Doorbell>,
    pub on_failure: Option<FailureHook>,
    pub ready: Option<ReadyGuard>,
}

/// The session settings between gateways (see "Bounds").
fn session_config() -> SessionConfig {
    let frame = FrameConfig::new(FRAME_BYTES_MAX).expect("a valid frame bound");
    SessionConfig {
        link: LinkConfig {
            window_msgs: WINDOW_FRAMES,
            send_buffer_msgs: SEND_BUFFER_FRAMES,
            frame,
            ..LinkConfig::default()
        },
        conn: ConnConfig {
            frame,
            ..ConnConfig::default()
        },
        ..SessionConfig::default()
    }
}

/// A gateway made and not yet started: its tasks, to run on a glommio
/// executor, its own thread's (`start_gateway`) or, on a node of one
/// shard, that shard's (`Runtime::start_with`).
pub(super) struct GatewayTask {
    me: usize,
    make: Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>,
}

impl GatewayTask {
    /// The gateway's future, made on the executor that runs it (its
    /// tasks share `Rc`s).
    pub fn into_future(self) -> Pin<Box<dyn Future<Output = ()>>> {
        (self.make)()
    }
}

/// Make this node's gateway over `parts` (its identity proven at each
/// handshake with `config`'s secret).
pub(super) fn gateway_task<M: Wire>(
    config: RemoteConfig,
    parts: GatewayParts<M>,
    stats: Arc<RemoteStats>,
) -> Result<GatewayTask, String> {
    let identity = Identity::new(&config.cluster, config.me as u64 + 1, &config.secret)?;
    Ok(GatewayTask {
        me: config.me,
        make: Box::new(move || Box::pin(gateway(config, identity, parts, stats))),
    })
}

/// Run a gateway on a thread of its own.
pub(super) fn start_gateway(task: GatewayTask) -> Result<glommio::ExecutorJoinHandle<()>, String> {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name(&format!("dirigo-gateway{}", task.me))
        .io_memory(64 << 10)
        .spawn(move || task.into_future())
        .map_err(|e| e.to_string())
}

async fn gateway<M: Wire>(
    config: RemoteConfig,
    identity: Identity,
    mut parts: GatewayParts<M>,
    stats: Arc<RemoteStats>,
) {
    let me = config.me;
    let listener_fd = config.listener.into_raw_fd();
    // SAFETY: the descriptor is a bound TCP listener that this call owns
    // from `into_raw_fd` on.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener_fd) };
    let sessions: Rc<Vec<Option<Session>>> = Rc::new(
        (0..config.nodes.len())
            .map(|j| (j != me).then(|| Session::new(session_config(), config.incarnation)))
            .collect(),
    );
    let identity = Rc::new(identity);
    let mut tasks = Vec::new();
    for (j, node) in config.nodes.iter().enumerate().skip(me + 1) {
        let session = sessions[j].clone().expect("a peer's session");
        tasks.push(glommio::spawn_local(dial(
            session,
            node.addr,
            identity.clone(),
            j as u64 + 1,
            config.incarnation ^ j as u64,
        )));
    }
    tasks.push(glommio::spawn_local(accept_loop(
        listener,
        sessions.clone(),
        identity.clone(),
        me,
    )));
    // Each peer's receiver fills the rings from that peer's shards.
    let mut inbound: Vec<Vec<Crossing<Producer<Packet<M>>>>> =
        (0..config.nodes.len()).map(|_| Vec::new()).collect();
    for (from, to, producer) in std::mem::take(&mut parts.inbound) {
        inbound[usize::from(parts.layout.node_of[from.index()])].push((from, to, producer));
    }
    for (j, rings) in inbound.into_iter().enumerate() {
        if let Some(session) = &sessions[j] {
            tasks.push(glommio::spawn_local(receive(
                session.clone(),
                j,
                rings,
                parts.layout.clone(),
                parts.shared_stop.clone(),
                stats.clone(),
            )));
        }
    }
    if let Some(mut ready) = parts.ready.take() {
        ready.signal(true);
    }
    send_loop(&mut parts, &sessions, &stats).await;
    for session in sessions.iter().flatten() {
        session.stop();
    }
    // The other tasks end with the sessions (or are dropped with the executor).
    drop(tasks);
}

/// Drain the rings toward other nodes into frames until the runtime stops.
async fn send_loop<M: Wire>(
    parts: &mut GatewayParts<M>,
    sessions: &[Option<Session>],
    stats: &RemoteStats,
) {
    let nodes = sessions.len();
    // Frames made and not yet taken by a full session, per peer.
    let mut waiting: Vec<std::collections::VecDeque<Vec<u8>>> =
        (0..nodes).map(|_| Default::default()).collect();
    // Per peer, the ring its next batch starts draining from: each pass
    // starts one further, so that no ring waits behind busier ones.
    let mut cursor = vec![0usize; nodes];
    // Per peer, the bytes a message took in its last batch: a batch
    // takes as many messages as fill `BATCH_FILL` of a frame's body, so
    // that it is seldom encoded twice (split).
    let mut message_bytes = vec![0usize; nodes];
    // Per peer, its rings' places in `outbound`.
    let rings: Vec<Vec<usize>> = (0..nodes)
        .map(|j| {
            (0..parts.outbound.len())
                .filter(|&r| usize::from(parts.layout.node_of[parts.outbound[r].1.index()]) == j)
                .collect()
        })
        .collect();
    let shared = parts.shared_stop.clone();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let now_ns = crate::clock::monotonic_ns();
        let mut progress = false;
        for (j, session) in sessions.iter().enumerate() {
            let Some(session) = session else {
                continue;
            };
            if let Some(connected) = stats.connected.get(j) {
                connected.store(session.is_connected(), Ordering::Relaxed);
            }
            if let Some(restarts) = stats.peer_restarts.get(j) {
                restarts.store(session.stats().peer_restarts, Ordering::Relaxed);
            }
            let sent_all = stats.sent_all.get(j);
            if !offer(session, &mut waiting[j], stats) {
                if let Some(sent_all) = sent_all {
                    sent_all.store(false, Ordering::Release);
                }
                continue; // full: leave this peer's rings to the shards' staging
            }
            let mut items = Vec::new();
            let mut messages = 0;
            let body_max = session.body_bytes_max();
            let budget = batch_budget(body_max, message_bytes[j]);
            let mut moves = false;
            let peer_rings = &rings[j];
            for k in 0..peer_rings.len() {
                let r = peer_rings[(cursor[j] + k) % peer_rings.len()];
                let (from, to, consumer) = &mut parts.outbound[r];
                while messages < budget {
                    let taken = consumer.drain(16, |packet| {
                        match WirePacket::from_packet(packet, now_ns) {
                            Some(packet) => {
                                // A move fills a batch alone (it may be
                                // many frames' worth): the drain under way
                                // is the last of this batch.
                                messages += match packet {
                                    WirePacket::Handoff(_) => {
                                        moves = true;
                                        BATCH_MESSAGES_MAX
                                    }
                                    _ => packet.messages(),
                                };
                                items.push(WireItem {
                                    from_shard: from.0,
                                    to_shard: to.0,
                                    packet,
                                });
                            }
                            None => {
                                // `ShardCore::migrate_out` sends a
                                // `RemoteHandoff` instead; never made.
                                add(&stats.refused, 1);
                                eprintln!("dirigo gateway: a handoff toward another node dropped");
                            }
                        }
                    });
                    if taken == 0 {
                        break;
                    }
                }
            }
            cursor[j] = cursor[j].wrapping_add(1);
            if let Some(sent_all) = sent_all {
                let done = items.is_empty() && waiting[j].is_empty() && session.unacked() == 0;
                sent_all.store(done, Ordering::Release);
            }
            if items.is_empty() {
                continue;
            }
            progress = true;
            let before = waiting[j].len();
            let mut framer = Framer {
                body_max,
                message_bytes: message_bytes[j],
                out: &mut waiting[j],
                stats,
                on_failure: &parts.on_failure,
                parted: false,
            };
            framer.encode(items);
            // A move, or a message sent in parts, says nothing of the
            // next batch's messages: the measure stays.
            let parted = framer.parted;
            if !moves && !parted && messages > 0 {
                let bytes: usize = waiting[j].iter().skip(before).map(Vec::len).sum();
                message_bytes[j] = bytes.div_ceil(messages);
            }
            offer(session, &mut waiting[j], stats);
        }
        stats.passes.fetch_add(1, Ordering::Release);
        if progress {
            // Let the sessions' pumps (tasks of this executor) write what
            // was queued and read acks before the next pass.
            glommio::executor().yield_now().await;
            continue;
        }
        // Park until a shard hands over more for a peer whose session has
        // room, or time out; a full session's room shows only by looking
        // again (its pump runs while this task waits).
        let full: Vec<bool> = waiting.iter().map(|w| !w.is_empty()).collect();
        let any_full = full.iter().any(|&f| f);
        let outbound = &parts.outbound;
        let layout = &parts.layout;
        let park = parts.doorbell.park(|| {
            shared.stop.load(Ordering::Acquire)
                || outbound.iter().any(|(_, to, c)| {
                    !full[usize::from(layout.node_of[to.index()])] && !c.is_empty()
                })
        });
        let wait = if any_full { FULL_RETRY } else { PARK_MAX };
        let _ = glommio::timer::timeout(wait, async {
            park.await;
            Ok(())
        })
        .await;
    }
}

/// The share of a frame's body a batch aims to fill.
const BATCH_FILL: (usize, usize) = (3, 4);

/// How many messages the next batch toward a peer takes: as many as fill
/// `BATCH_FILL` of `body_max` at `message_bytes` each (as the last batch
/// took; 0 before the first), within 1 and `BATCH_MESSAGES_MAX`.
fn batch_budget(body_max: usize, message_bytes: usize) -> usize {
    let aim = body_max / BATCH_FILL.1 * BATCH_FILL.0;
    match aim.checked_div(message_bytes) {
        Some(fit) => fit.clamp(1, BATCH_MESSAGES_MAX),
        None => BATCH_MESSAGES_MAX,
    }
}

/// Hand a peer's waiting frames to its session; whether all were taken.
fn offer(
    session: &Session,
    waiting: &mut std::collections::VecDeque<Vec<u8>>,
    stats: &RemoteStats,
) -> bool {
    while !waiting.is_empty() {
        if !session.has_room() {
            return false;
        }
        let frame = waiting.pop_front().expect("not empty");
        let bytes = frame.len() as u64;
        match session.send(BATCH_KIND, frame) {
            Ok(_) => {
                add(&stats.frames_out, 1);
                add(&stats.bytes_out, bytes);
            }
            // Stopped: the runtime is stopping.
            Err(LinkSendError::Stopped) => return false,
            // Full was ruled out above; a frame too large cannot be made
            // (`Framer::encode` keeps within the bound).
            Err(e) => debug_assert!(false, "a gateway frame refused: {e:?}"),
        }
    }
    true
}

/// Where the frames encoded for one peer go, their bound, and whom a
/// message that cannot cross is told to.
struct Framer<'a> {
    body_max: usize,
    /// The bytes a message took in the peer's last batch (0: not known): a
    /// batch of messages that would take more than `body_max` at that is
    /// split before it is encoded, not after.
    message_bytes: usize,
    out: &'a mut std::collections::VecDeque<Vec<u8>>,
    stats: &'a RemoteStats,
    on_failure: &'a Option<FailureHook>,
    /// A message went in parts (`send_in_parts`).
    parted: bool,
}

impl Framer<'_> {
    /// Encode `items` as frames in order, splitting a batch (and a run)
    /// that is over the bound.
    fn encode<R: WireRepr>(&mut self, items: Vec<WireItem<R>>) {
        let (body_max, stats) = (self.body_max, self.stats);
        let batch = WireBatch { items };
        let messages: usize = batch.items.iter().map(|i| i.packet.messages()).sum();
        let splittable = match &batch.items[..] {
            [one] => matches!(&one.packet, WirePacket::Run { messages, .. } if messages.len() > 1),
            _ => true,
        };
        // Over the bound by the last batch's measure: split unencoded.
        let over = splittable && messages.saturating_mul(self.message_bytes) > body_max;
        if !over {
            match R::encode_batch(&batch, Vec::with_capacity(body_max)) {
                Ok(bytes) if bytes.len() <= body_max => {
                    add(&stats.messages_out, messages as u64);
                    self.out.push_back(bytes);
                    return;
                }
                // Freed here, not held through the halves below.
                Ok(bytes) => drop(bytes),
                Err(e) if batch.items.len() == 1 && messages <= 1 => {
                    let item = batch.items.into_iter().next().expect("one item");
                    let message = format!(
                        "a message could not be encoded to cross nodes ({e}); it was dropped"
                    );
                    self.drop_item(item, message);
                    return;
                }
                // Split until the message that fails is alone.
                Err(_) => {}
            }
        }
        add(&stats.splits, 1);
        let mut items = batch.items;
        if items.len() > 1 {
            let second = items.split_off(items.len() / 2);
            self.encode(items);
            self.encode(second);
            return;
        }
        let Some(item) = items.pop() else {
            return;
        };
        match item.packet {
            WirePacket::Run {
                to,
                from,
                first_seq,
                credit_shard,
                route_epoch,
                mut messages,
            } if messages.len() > 1 => {
                let second = messages.split_off(messages.len() / 2);
                let half = |first_seq, messages| WireItem {
                    from_shard: item.from_shard,
                    to_shard: item.to_shard,
                    packet: WirePacket::Run {
                        to,
                        from,
                        first_seq,
                        credit_shard,
                        route_epoch,
                        messages,
                    },
                };
                let second_seq = first_seq + messages.len() as u64;
                self.encode(vec![half(first_seq, messages)]);
                self.encode(vec![half(second_seq, second)]);
            }
            packet @ (WirePacket::Handoff(_)
            | WirePacket::Message { .. }
            | WirePacket::Run { .. }) => {
                self.send_in_parts(WireItem { packet, ..item });
            }
            packet => {
                let message = format!(
                    "a message of more than {body_max} bytes (encoded) cannot cross nodes; \
                     it was dropped"
                );
                let item = WireItem { packet, ..item };
                self.drop_item(item, message);
            }
        }
    }

    /// A move or a message over a frame: encoded alone as a batch of one,
    /// and sent as parts of a frame's body less `HANDOFF_PART_ROOM` each (or
    /// half a body, whichever is more), back to back; over
    /// `HANDOFF_BYTES_MAX` encoded, or not encodable, it is lost
    /// (`drop_item`).
    fn send_in_parts<R: WireRepr>(&mut self, item: WireItem<R>) {
        let body_max = self.body_max;
        let (from_shard, to_shard) = (item.from_shard, item.to_shard);
        let Some(of) = PartsOf::of(&item.packet) else {
            return self.drop_item(item, "neither a move nor a message".into());
        };
        let whole = WireBatch { items: vec![item] };
        let encoded = R::encode_batch(&whole, Vec::new());
        let item = whole.items.into_iter().next().expect("one item");
        let bytes = match encoded {
            Ok(bytes) if bytes.len() <= HANDOFF_BYTES_MAX => bytes,
            Ok(bytes) => {
                let encoded_bytes = bytes.len();
                drop(bytes);
                let message = format!(
                    "{of} is {encoded_bytes} bytes encoded, over {HANDOFF_BYTES_MAX}: \
                     it cannot cross nodes and was dropped"
                );
                return self.drop_item(item, message);
            }
            Err(e) => {
                let message =
                    format!("{of} could not be encoded to cross nodes ({e}): it was dropped");
                return self.drop_item(item, message);
            }
        };
        drop(item);
        let part_bytes = body_max
            .saturating_sub(HANDOFF_PART_ROOM)
            .max(body_max / 2)
            .max(1);
        let parts = bytes.len().div_ceil(part_bytes) as u32;
        let counter = match of {
            PartsOf::Move { .. } => &self.stats.handoff_parts_out,
            PartsOf::Message { .. } => {
                self.parted = true;
                &self.stats.message_parts_out
            }
        };
        add(counter, u64::from(parts));
        for (part, chunk) in bytes.chunks(part_bytes).enumerate() {
            let item = WireItem {
                from_shard,
                to_shard,
                packet: of.part::<R>(part as u32, parts, chunk.to_vec()),
            };
            self.encode(vec![item]);
        }
    }

    /// Drop an item that cannot cross (`fail`). A move dropped so leaves in
    /// its place a `Lost` packet, small enough to cross, so that the new
    /// owner holds the actor's place as failed and returns the credits its
    /// messages held.
    fn drop_item<R: WireRepr>(&mut self, item: WireItem<R>, message: String) {
        fail(
            self.stats,
            self.on_failure,
            &item.packet,
            item.from_shard,
            message,
        );
        if let WirePacket::Handoff(slot) = &item.packet {
            let lost = WireItem {
                from_shard: item.from_shard,
                to_shard: item.to_shard,
                packet: slot.lost(),
            };
            self.encode(vec![lost]);
        }
    }
}

/// What crosses in parts: a move (an actor, its new epoch) or a message
/// (its target, its number on its channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PartsOf {
    Move { actor: ActorId, epoch: u64 },
    Message { to: ActorId, seq: u64 },
}

impl PartsOf {
    /// What `packet` would cross in parts as: a move, a message or a run
    /// of one; `None` for anything else.
    fn of<R>(packet: &WirePacket<R>) -> Option<PartsOf> {
        match packet {
            WirePacket::Handoff(slot) => Some(PartsOf::Move {
                actor: slot.id,
                epoch: slot.epoch,
            }),
            WirePacket::Message { to, seq, .. } => Some(PartsOf::Message { to: *to, seq: *seq }),
            WirePacket::Run {
                to,
                first_seq,
                messages,
                ..
            } if messages.len() == 1 => Some(PartsOf::Message {
                to: *to,
                seq: *first_seq,
            }),
            _ => None,
        }
    }

    /// Part `part` of `parts` of it.
    fn part<R>(self, part: u32, parts: u32, bytes: Vec<u8>) -> WirePacket<R> {
        match self {
            PartsOf::Move { actor, epoch } => WirePacket::HandoffPart {
                actor,
                epoch,
                part,
                parts,
                bytes,
            },
            PartsOf::Message { to, seq } => WirePacket::MessagePart {
                to,
                seq,
                part,
                parts,
                bytes,
            },
        }
    }

    /// What a move from `from` to `to` lost on the way in leaves for its
    /// target (`lost_notice`); a message lost so leaves nothing: its
    /// channel stops there.
    fn lost<R>(self, from: u16, to: u16) -> Option<WireItem<R>> {
        match self {
            PartsOf::Move { actor, epoch } => Some(lost_notice(from, to, actor, epoch)),
            PartsOf::Message { .. } => None,
        }
    }
}

impl std::fmt::Display for PartsOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartsOf::Move { actor, .. } => write!(f, "{actor}'s move"),
            PartsOf::Message { to, seq } => write!(f, "a message to {to} (number {seq})"),
        }
    }
}

/// A peer's move or message arriving in parts (`WirePacket::HandoffPart`,
/// `WirePacket::MessagePart`): one at a time per peer (a sender sends the
/// parts of one back to back), at most `HANDOFF_BYTES_MAX` bytes.
#[derive(Default)]
struct Assembly {
    /// `(from shard, to shard, what, parts, next part)` of the one under
    /// way, and its bytes so far.
    under_way: Option<(u16, u16, PartsOf, u32, u32)>,
    bytes: AlignedVec<ARCHIVE_ALIGN>,
}

/// The notice that a move from `from` to `to` was lost on the way in:
/// the target holds the actor as failed (`Packet::LostHandoff`; the
/// credits its messages held are not known here).
fn lost_notice<M>(from: u16, to: u16, actor: ActorId, epoch: u64) -> WireItem<M> {
    WireItem {
        from_shard: from,
        to_shard: to,
        packet: WirePacket::Lost {
            actor,
            epoch,
            credits: Vec::new(),
            uncredited: 0,
        },
    }
}

impl Assembly {
    /// Take `item` from `peer` (its batch checked already): a part of a
    /// move or message gives the whole one's packet once its last part
    /// came, checked to be what its parts said, between the same shards,
    /// naming only shards of the run; any other packet is given back. A
    /// first part while another is under way drops that one; a part out of
    /// place, over the bound, or a whole that is not what its parts said is
    /// an error and drops it. Each move dropped leaves a notice in `lost`
    /// (a message dropped so leaves nothing: its channel stops there).
    fn take<R: WireRepr>(
        &mut self,
        item: WireItem<R>,
        layout: &Layout,
        peer: usize,
        lost: &mut Vec<WireItem<R>>,
    ) -> Result<Option<WirePacket<R>>, String> {
        let (of, part, parts, bytes) = match item.packet {
            WirePacket::HandoffPart {
                actor,
                epoch,
                part,
                parts,
                bytes,
            } => (PartsOf::Move { actor, epoch }, part, parts, bytes),
            WirePacket::MessagePart {
                to,
                seq,
                part,
                parts,
                bytes,
            } => (PartsOf::Message { to, seq }, part, parts, bytes),
            packet => return Ok(Some(packet)),
        };
        let (from, to) = (item.from_shard, item.to_shard);
        if part == 0 {
            self.abandon(lost);
            self.under_way = Some((from, to, of, parts, 0));
        }
        let Some((f, t, o, n, next)) = self.under_way.as_mut() else {
            lost.extend(of.lost(from, to));
            return Err(format!(
                "part {part} of {of} from node {peer} with no first part"
            ));
        };
        if (*f, *t, *o, *n, *next) != (from, to, of, parts, part)
            || self.bytes.len() + bytes.len() > HANDOFF_BYTES_MAX
        {
            self.abandon(lost);
            return Err(format!(
                "part {part} of {parts} of {of} from node {peer} out of place or over {HANDOFF_BYTES_MAX} bytes"
            ));
        }
        *next += 1;
        self.bytes.extend_from_slice(&bytes);
        if *next < parts {
            return Ok(None);
        }
        let decoded = R::decode_batch(&self.bytes);
        self.under_way = None;
        self.bytes = AlignedVec::new();
        let whole = decoded
            .ok()
            .and_then(|batch| <[WireItem<R>; 1]>::try_from(batch.items).ok());
        match whole {
            Some([whole])
                if (whole.from_shard, whole.to_shard) == (from, to)
                    && PartsOf::of(&whole.packet) == Some(of)
                    && whole.packet.names_shards_within(layout.node_of.len()) =>
            {
                Ok(Some(whole.packet))
            }
            _ => {
                lost.extend(of.lost(from, to));
                Err(format!("{of} from node {peer} is not what its parts said"))
            }
        }
    }

    /// Drop what is under way, if anything, leaving a move's notice in
    /// `lost` (its peer restarted, or its parts came out of place).
    fn abandon<M>(&mut self, lost: &mut Vec<WireItem<M>>) {
        if let Some((from, to, of, _, _)) = self.under_way.take() {
            eprintln!("dirigo gateway: {of} was dropped before all of its parts came");
            lost.extend(of.lost(from, to));
        }
        self.bytes = AlignedVec::new();
    }
}

/// A message that cannot cross: counted, logged and told to the failure
/// hook, naming its sender. Its channel stops there: the target holds
/// every later message of the channel until the one missing, so the
/// hook's owner must end the sender's job (the dataflow layer's hook
/// does).
fn fail<M>(
    stats: &RemoteStats,
    on_failure: &Option<FailureHook>,
    packet: &WirePacket<M>,
    from_shard: u16,
    message: String,
) {
    add(&stats.oversized, packet.messages() as u64);
    eprintln!("dirigo gateway: {message}");
    if let Some(hook) = on_failure {
        hook(Failure {
            actor: packet.sender(),
            shard: ShardId(from_shard),
            message,
        });
    }
}

/// Take `peer`'s frames and push their packets into the local shards'
/// rings, in order, waiting while a ring is full.
async fn receive<M: Wire>(
    session: Session,
    peer: usize,
    rings: Vec<Crossing<Producer<Packet<M>>>>,
    layout: Layout,
    shared: Arc<Shared<M>>,
    stats: Arc<RemoteStats>,
) {
    // The rings from `peer`'s shards, by (its shard - its first) * local
    // shards + (local shard - first local): every pair has one.
    let peer_first = layout
        .node_of
        .iter()
        .position(|&n| usize::from(n) == peer)
        .unwrap_or(0);
    let local = usize::from(layout.local);
    let place = |from: u16, to: u16| {
        (usize::from(from) - peer_first) * local + (usize::from(to) - usize::from(layout.first))
    };
    let mut by_pair: Vec<Option<Producer<Packet<M>>>> = (0..rings.len()).map(|_| None).collect();
    for (from, to, ring) in rings {
        let at = place(from.0, to.0);
        by_pair[at] = Some(ring);
    }
    let mut woken = vec![false; local];
    let mut aligned = AlignedVec::<ARCHIVE_ALIGN>::new();
    let mut assembly = Assembly::default();
    // Notices of moves lost on the way in, and the packets ready for the
    // shards, of the item at hand.
    let mut lost: Vec<WireItem<M::Repr>> = Vec::new();
    let mut ready: Vec<WireItem<M::Repr>> = Vec::new();
    let mut restarts = session.stats().peer_restarts;
    while let Some((kind, body)) = session.recv_wait().await {
        add(&stats.frames_in, 1);
        // A peer that restarted sends none of a move it had under way.
        if session.stats().peer_restarts != restarts {
            restarts = session.stats().peer_restarts;
            assembly.abandon(&mut lost);
        }
        add(&stats.bytes_in, body.len() as u64);
        if kind != BATCH_KIND {
            add(&stats.refused, 1);
            eprintln!("dirigo gateway: a message of kind {kind} from node {peer} refused");
            continue;
        }
        // The archive is read where it lies when the allocator gave the
        // body an aligned buffer (mimalloc does, for any body this large),
        // else from an aligned copy.
        let bytes: &[u8] = if (body.as_ptr() as usize).is_multiple_of(ARCHIVE_ALIGN) {
            &body
        } else {
            aligned.clear();
            aligned.extend_from_slice(&body);
            &aligned
        };
        let decoded = M::Repr::decode_batch(bytes);
        drop(body);
        let batch = match decoded {
            Ok(batch) => batch,
            Err(e) => {
                add(&stats.refused, 1);
                eprintln!("dirigo gateway: a malformed batch from node {peer} refused: {e}");
                continue;
            }
        };
        if !batch_is_valid(&batch, &layout, peer) {
            add(&stats.refused, 1);
            eprintln!("dirigo gateway: a batch from node {peer} naming shards it may not refused");
            continue;
        }
        let now_ns = crate::clock::monotonic_ns();
        for item in batch.items {
            let (from_shard, to_shard) = (item.from_shard, item.to_shard);
            match assembly.take(item, &layout, peer, &mut lost) {
                Ok(Some(packet)) => ready.push(WireItem {
                    from_shard,
                    to_shard,
                    packet,
                }),
                Ok(None) => {} // a part of a move; more to come
                Err(why) => {
                    add(&stats.refused, 1);
                    eprintln!("dirigo gateway: refused: {why}");
                }
            }
            for notice in lost.drain(..) {
                eprintln!(
                    "dirigo gateway: {:?}'s move from node {peer} was lost on the way in",
                    notice.packet.sender()
                );
                ready.push(notice);
            }
            for item in ready.drain(..) {
                add(&stats.messages_in, item.packet.messages() as u64);
                let Some(mut packet) = item.packet.into_packet::<M>(now_ns) else {
                    continue;
                };
                let to = ShardId(item.to_shard);
                // `batch_is_valid` checked both ends: every such pair has its ring.
                let Some(ring) = by_pair[place(item.from_shard, item.to_shard)].as_mut() else {
                    continue;
                };
                loop {
                    match ring.push(packet) {
                        Ok(()) => break,
                        Err(back) => {
                            packet = back;
                            shared.doorbells[to.index()].ring();
                            if shared.stop.load(Ordering::Acquire) {
                                return;
                            }
                            // A dead shard never drains its ring: drop what
                            // is for it, as the shards do, rather than hold
                            // up everything else from this peer.
                            if shared.is_dead(to) {
                                add(&stats.dropped_to_dead_shards, 1);
                                break;
                            }
                            glommio::timer::sleep(RING_RETRY).await;
                        }
                    }
                }
                woken[usize::from(item.to_shard - layout.first)] = true;
            }
        }
        // Each shard that got packets is rung once per batch.
        for (i, rung) in woken.iter_mut().enumerate() {
            if std::mem::take(rung) {
                shared.doorbells[usize::from(layout.first) + i].ring();
            }
        }
    }
}

/// Whether every packet of a batch from `peer` comes from one of that
/// node's shards, goes to one of this node's, and names only shards of
/// the run.
fn batch_is_valid<M>(batch: &WireBatch<M>, layout: &Layout, peer: usize) -> bool {
    let total = layout.node_of.len();
    batch.items.iter().all(|item| {
        usize::from(item.from_shard) < total
            && usize::from(layout.node_of[usize::from(item.from_shard)]) == peer
            && layout.local_index(ShardId(item.to_shard)).is_some()
            && item.packet.names_shards_within(total)
    })
}

/// Dial `peer` (node index + 1 as its id) until the session stops.
async fn dial(session: Session, addr: SocketAddr, identity: Rc<Identity>, peer: u64, seed: u64) {
    let config = session_config();
    let mut backoff = Backoff::new(
        config.backoff_base.as_nanos() as u64,
        config.backoff_max.as_nanos() as u64,
        seed,
    );
    let mut failures = 0u64;
    loop {
        match connect(addr, &identity, &config.conn).await {
            Ok(conn) if conn.peer().node == peer => {
                failures = 0;
                let before = session.stats().delivered + session.stats().sent;
                let ended = session.serve(conn, Role::Client).await;
                if matches!(ended, dirigo_net::session::Ended::Stopped) {
                    return;
                }
                if session.stats().delivered + session.stats().sent > before {
                    backoff.reset();
                }
            }
            Ok(conn) => eprintln!(
                "dirigo gateway: {addr} is node {}, not node {peer}",
                conn.peer().node
            ),
            Err(e) => {
                failures += 1;
                if failures % 50 == 1 {
                    eprintln!(
                        "dirigo gateway: dialing node {peer} at {addr} ({failures} tries): {e}"
                    );
                }
            }
        }
        glommio::timer::sleep(Duration::from_nanos(backoff.next_delay_ns())).await;
    }
}

/// Take the connections of the nodes before this one in the run.
async fn accept_loop(
    listener: glommio::net::TcpListener,
    sessions: Rc<Vec<Option<Session>>>,
    identity: Rc<Identity>,
    me: usize,
) {
    let config = session_config();
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("dirigo gateway: accept: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let sessions = sessions.clone();
        let identity = identity.clone();
        let conn_config = config.conn.clone();
        glommio::spawn_local(async move {
            match accept(stream, &identity, &conn_config).await {
                Ok(conn) => {
                    let peer = conn.peer().node;
                    let index = peer.checked_sub(1).map(|i| i as usize);
                    match index.filter(|&i| i < me).and_then(|i| sessions[i].clone()) {
                        Some(session) => {
                            session.serve(conn, Role::Server).await;
                        }
                        None => eprintln!(
                            "dirigo gateway: refused node {peer}: only the nodes before this one ({me}) dial it"
                        ),
                    }
                }
                Err((addr, e)) => eprintln!(
                    "dirigo gateway: refused a connection from {}: {e}",
                    addr.map_or("an unknown address".into(), |a| a.to_string())
                ),
            }
        })
        .detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn two_nodes() -> Layout {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let nodes = [
            RemoteNode { addr, shards: 2 },
            RemoteNode { addr, shards: 2 },
        ];
        Layout::of(&nodes, 1).unwrap()
    }

    /// What a peer's bytes can become: decoded (validated) or refused,
    /// checked against the layout, and turned into packets when valid;
    /// never a panic.
    fn take(bytes: &[u8]) {
        let mut aligned = AlignedVec::<ARCHIVE_ALIGN>::new();
        aligned.extend_from_slice(bytes);
        if let Ok(batch) = Vec::<u8>::decode_batch(&aligned) {
            if batch_is_valid(&batch, &two_nodes(), 0) {
                let mut assembly = Assembly::default();
                for item in batch.items {
                    let mut lost = Vec::new();
                    if let Ok(Some(packet)) = assembly.take(item, &two_nodes(), 0, &mut lost) {
                        let _ = packet.into_packet::<Vec<u8>>(1_000);
                    }
                    for notice in lost {
                        let _ = notice.packet.into_packet::<Vec<u8>>(1_000);
                    }
                }
            }
        }
    }

    /// A valid batch of every kind of packet, from node 0 to node 1.
    fn every_kind() -> Vec<u8> {
        let actor = ActorId::new(JobId(1), 1, 2);
        let sched = WireSched::from_sched(SchedCtx::default(), 0);
        let item = |packet| WireItem {
            from_shard: 0,
            to_shard: 2,
            packet,
        };
        let slot = WireSlot {
            id: actor,
            epoch: 3,
            state: Some(vec![1, 2, 3]),
            in_seq: vec![(actor, 4)],
            out_seq: vec![(actor, 5)],
            mailbox: vec![(sched, 1, vec![6; 9])],
            early: vec![WireEarly {
                from: actor,
                seq: 7,
                credit_shard: 0,
                route_epoch: 1,
                sched,
                message: vec![8; 3],
            }],
            blocked: vec![WireBlocked {
                to: actor,
                sched,
                uncredited: false,
                message: vec![9],
            }],
        };
        let batch = WireBatch {
            items: vec![
                item(WirePacket::Message {
                    to: actor,
                    from: actor,
                    seq: 1,
                    credit_shard: 0,
                    route_epoch: 0,
                    sched,
                    message: vec![1; 20],
                }),
                item(WirePacket::Run {
                    to: actor,
                    from: actor,
                    first_seq: 2,
                    credit_shard: 1,
                    route_epoch: 0,
                    messages: vec![(sched, vec![2; 5]), (sched, vec![3; 7])],
                }),
                item(WirePacket::Ack { actor, messages: 3 }),
                item(WirePacket::Placement {
                    actor,
                    shard: 3,
                    epoch: 2,
                }),
                item(WirePacket::Migrate { actor, to: 1 }),
                item(WirePacket::Lost {
                    actor,
                    epoch: 4,
                    credits: vec![(0, 2), (3, 1)],
                    uncredited: 1,
                }),
                item(WirePacket::HandoffPart {
                    actor,
                    epoch: 3,
                    part: 0,
                    parts: 2,
                    bytes: vec![4; 10],
                }),
                item(WirePacket::Handoff(Box::new(slot))),
            ],
        };
        Vec::<u8>::encode_batch(&batch, Vec::new()).unwrap()
    }

    #[test]
    fn a_batch_of_every_kind_decodes_as_sent_and_valid_only_from_its_node() {
        let bytes = every_kind();
        let mut aligned = AlignedVec::<ARCHIVE_ALIGN>::new();
        aligned.extend_from_slice(&bytes);
        let batch = Vec::<u8>::decode_batch(&aligned).unwrap();
        assert_eq!(batch.items.len(), 8);
        assert!(batch_is_valid(&batch, &two_nodes(), 0));
        // From node 1's own shards, or to shards not of this node: refused.
        assert!(!batch_is_valid(&batch, &two_nodes(), 1));
        let layout0 = Layout::of(
            &[
                RemoteNode {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    shards: 2,
                },
                RemoteNode {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    shards: 2,
                },
            ],
            0,
        )
        .unwrap();
        assert!(!batch_is_valid(&batch, &layout0, 1));
        let Some(WirePacket::Handoff(slot)) = batch.items.into_iter().last().map(|i| i.packet)
        else {
            panic!("the last is the handoff");
        };
        let slot = slot.into_slot::<Vec<u8>>(5);
        assert_eq!((slot.id.partition, slot.epoch), (2, 3));
        assert_eq!(slot.state.as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(slot.mailbox[0].1, 1);
        assert_eq!((slot.early[0].seq, slot.early[0].to), (7, slot.id));
        assert_eq!(slot.blocked[0].message, vec![9]);
    }

    proptest! {
        /// Any bytes from a peer: no panic (`scripts/fuzz` runs a million).
        #[test]
        fn any_bytes_from_a_peer_are_taken_or_refused_without_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048)
        ) {
            take(&bytes);
        }

        /// A valid batch with bytes changed or cut: no panic.
        #[test]
        fn a_changed_batch_is_taken_or_refused_without_a_panic(
            changes in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut bytes = every_kind();
            for (at, value) in changes {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            take(&bytes);
            let cut = cut % (bytes.len() + 1);
            take(&bytes[..cut]);
        }
    }

    #[test]
    fn a_deadline_crosses_as_slack_and_an_origin_as_age() {
        let sched = SchedCtx {
            job: JobId(3),
            deadline_ns: 5_000_000,
            origin_ns: 1_000_000,
        };
        // Sent at 2 ms on one clock, taken at 10 s on another.
        let wire = WireSched::from_sched(sched, 2_000_000);
        let back = wire.to_sched(10_000_000_000);
        assert_eq!(back.job, JobId(3));
        assert_eq!(back.deadline_ns, 10_000_000_000 + 3_000_000);
        assert_eq!(back.origin_ns, 10_000_000_000 - 1_000_000);
        // Late: the slack is negative and stays so.
        let late = WireSched::from_sched(sched, 7_000_000).to_sched(10_000_000_000);
        assert_eq!(late.deadline_ns, 10_000_000_000 - 2_000_000);
        // None stays none; a deadline before the receiver's clock began is its start.
        let none = WireSched::from_sched(SchedCtx::default(), 7).to_sched(9);
        assert_eq!(none, SchedCtx::default());
        let early = WireSched::from_sched(sched, 9_000_000).to_sched(1_000);
        assert_eq!(early.deadline_ns, 1);
        assert_eq!(early.origin_ns, 1);
    }

    /// Encode `items` as frames of at most `body_max` bytes each, in order,
    /// splitting a batch (and a run) that is over it (`Framer::encode`, with
    /// no measure of a message's bytes yet).
    fn encode_frames<R: WireRepr>(
        items: Vec<WireItem<R>>,
        body_max: usize,
        out: &mut std::collections::VecDeque<Vec<u8>>,
        stats: &RemoteStats,
        on_failure: &Option<FailureHook>,
    ) {
        Framer {
            body_max,
            message_bytes: 0,
            out,
            stats,
            on_failure,
            parted: false,
        }
        .encode(items);
    }

    /// A batch takes what fills three quarters of a frame's body at the
    /// last batch's bytes per message: large messages make smaller batches,
    /// small ones stop at the message bound, and the first takes the bound.
    #[test]
    fn a_batch_takes_what_fills_three_quarters_of_a_frame() {
        let body = FRAME_BYTES_MAX - 1024;
        assert_eq!(batch_budget(body, 0), BATCH_MESSAGES_MAX);
        assert_eq!(batch_budget(body, 16), BATCH_MESSAGES_MAX);
        let fit = batch_budget(body, 540);
        assert!(fit * 540 <= body * 3 / 4 && (fit + 1) * 540 > body * 3 / 4 - 540);
        assert!(fit < BATCH_MESSAGES_MAX);
        assert_eq!(batch_budget(body, 10 * body), 1);
    }

    #[test]
    fn the_layout_numbers_shards_across_nodes_in_order() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let nodes = [
            RemoteNode { addr, shards: 2 },
            RemoteNode { addr, shards: 3 },
            RemoteNode { addr, shards: 1 },
        ];
        let layout = Layout::of(&nodes, 1).unwrap();
        assert_eq!(layout.first, 2);
        assert_eq!(layout.total(), 6);
        assert_eq!(layout.node_of, vec![0, 0, 1, 1, 1, 2]);
        assert_eq!(layout.local_index(ShardId(1)), None);
        assert_eq!(layout.local_index(ShardId(4)), Some(2));
        assert_eq!(layout.local_index(ShardId(5)), None);
        assert!(Layout::of(&nodes, 3).is_err());
        let empty = [RemoteNode { addr, shards: 0 }];
        assert!(Layout::of(&empty, 0).is_err());
    }

    #[test]
    fn a_batch_over_the_bound_is_split_in_order_and_a_run_with_it() {
        let actor = ActorId::new(JobId(1), 1, 0);
        let sched = WireSched::from_sched(SchedCtx::default(), 0);
        let run = |first_seq: u64, n: usize| WireItem {
            from_shard: 0,
            to_shard: 1,
            packet: WirePacket::Run {
                to: actor,
                from: actor,
                first_seq,
                credit_shard: 0,
                route_epoch: 0,
                messages: (0..n).map(|i| (sched, vec![i as u8; 1000])).collect(),
            },
        };
        // Split after encoding (no measure yet), and before it at the
        // last batch's measure: under it, near it, far over it.
        for message_bytes in [0, 500, 1_100, 20_000] {
            let stats = RemoteStats::default();
            let mut frames = std::collections::VecDeque::new();
            Framer {
                body_max: 8_192,
                message_bytes,
                out: &mut frames,
                stats: &stats,
                on_failure: &None,
                parted: false,
            }
            .encode(vec![run(1, 40), run(41, 10)]);
            // Runs of 5 fit 8 KiB; a measure of 20,000 bytes a message
            // splits down to one message a frame, unencoded.
            let expected = if message_bytes == 20_000 { 50 } else { 10 };
            assert_eq!(frames.len(), expected, "measure {message_bytes}");
            let splits = stats.snapshot().splits;
            assert!(splits >= expected as u64 - 1, "{splits} splits");
            let mut next = 1;
            for frame in &frames {
                assert!(frame.len() <= 8_192);
                let mut aligned = AlignedVec::<16>::new();
                aligned.extend_from_slice(frame);
                for item in Vec::<u8>::decode_batch(&aligned).unwrap().items {
                    let WirePacket::Run {
                        first_seq,
                        messages,
                        ..
                    } = item.packet
                    else {
                        panic!("runs only");
                    };
                    assert_eq!(first_seq, next, "measure {message_bytes}");
                    for (i, (_, m)) in messages.iter().enumerate() {
                        assert_eq!(u64::from(m[0]), (first_seq - 1 + i as u64) % 40);
                    }
                    next += messages.len() as u64;
                }
            }
            assert_eq!(next, 51, "measure {message_bytes}");
            assert_eq!(stats.snapshot().oversized, 0);
        }
    }

    /// The items of `frames` as the receiving gateway takes them: each
    /// frame checked, parts assembled.
    fn received(frames: &std::collections::VecDeque<Vec<u8>>) -> Vec<WirePacket<Vec<u8>>> {
        let mut assembly = Assembly::default();
        let mut whole = Vec::new();
        for frame in frames {
            let mut aligned = AlignedVec::<16>::new();
            aligned.extend_from_slice(frame);
            let batch = Vec::<u8>::decode_batch(&aligned).unwrap();
            assert!(batch_is_valid(&batch, &two_nodes(), 0));
            for item in batch.items {
                let mut lost = Vec::new();
                if let Some(packet) = assembly.take(item, &two_nodes(), 0, &mut lost).unwrap() {
                    whole.push(packet);
                }
                assert!(lost.is_empty());
            }
        }
        assert!(assembly.under_way.is_none());
        whole
    }

    #[test]
    fn a_message_over_the_bound_crosses_in_parts_between_the_others_in_order() {
        let stats = RemoteStats::default();
        let actor = ActorId::new(JobId(1), 1, 0);
        let sched = WireSched::from_sched(SchedCtx::default(), 0);
        let message = |seq: u64, bytes: usize| WireItem {
            from_shard: 0,
            to_shard: 2,
            packet: WirePacket::Message {
                to: actor,
                from: actor,
                seq,
                credit_shard: 0,
                route_epoch: 0,
                sched,
                message: vec![seq as u8; bytes],
            },
        };
        let mut frames = std::collections::VecDeque::new();
        // A small one, one of 20 frames' worth, a small one, and a run of one
        // over the bound.
        let run_of_one = WireItem {
            from_shard: 0,
            to_shard: 2,
            packet: WirePacket::Run {
                to: actor,
                from: actor,
                first_seq: 4,
                credit_shard: 0,
                route_epoch: 0,
                messages: vec![(sched, vec![4u8; 9_000])],
            },
        };
        let items = vec![
            message(1, 10),
            message(2, 20_000),
            message(3, 30),
            run_of_one,
        ];
        encode_frames(items, 1_024, &mut frames, &stats, &None);
        assert!(frames.iter().all(|f| f.len() <= 1_024));
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.oversized, 0);
        assert!(snapshot.message_parts_out >= 20 + 9, "{snapshot:?}");
        let got: Vec<(u64, Vec<u8>)> = received(&frames)
            .into_iter()
            .map(|packet| match packet {
                WirePacket::Message { seq, message, .. } => (seq, message),
                WirePacket::Run {
                    first_seq,
                    mut messages,
                    ..
                } => {
                    assert_eq!(messages.len(), 1);
                    (first_seq, messages.pop().unwrap().1)
                }
                _ => panic!("messages only"),
            })
            .collect();
        let expected: Vec<(u64, Vec<u8>)> = [(1, 10), (2, 20_000), (3, 30), (4, 9_000)]
            .into_iter()
            .map(|(seq, bytes)| (seq, vec![seq as u8; bytes]))
            .collect();
        assert_eq!(got, expected);

        // A part of another message in the middle of one: both dropped,
        // and neither leaves a notice (only a move's target is told).
        let mut frames = std::collections::VecDeque::new();
        encode_frames(vec![message(5, 5_000)], 1_024, &mut frames, &stats, &None);
        let mut other = std::collections::VecDeque::new();
        encode_frames(vec![message(6, 5_000)], 1_024, &mut other, &stats, &None);
        let mut assembly = Assembly::default();
        let mut errors = 0;
        for frame in [&frames[0], &other[1], &frames[1]] {
            let mut aligned = AlignedVec::<16>::new();
            aligned.extend_from_slice(frame);
            for item in Vec::<u8>::decode_batch(&aligned).unwrap().items {
                let mut lost = Vec::new();
                match assembly.take(item, &two_nodes(), 0, &mut lost) {
                    Ok(packet) => assert!(packet.is_none()),
                    Err(_) => errors += 1,
                }
                assert!(lost.is_empty());
            }
        }
        assert_eq!(errors, 2);
    }

    #[test]
    fn a_message_over_what_crosses_in_parts_is_dropped_and_its_sender_named() {
        let stats = RemoteStats::default();
        let actor = ActorId::new(JobId(1), 1, 0);
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook: FailureHook = {
            let told = told.clone();
            Arc::new(move |f: Failure| told.lock().unwrap().push(f.actor))
        };
        let item = WireItem {
            from_shard: 0,
            to_shard: 1,
            packet: WirePacket::Message {
                to: actor,
                from: ActorId::new(JobId(1), 0, 3),
                seq: 1,
                credit_shard: 0,
                route_epoch: 0,
                sched: WireSched::from_sched(SchedCtx::default(), 0),
                message: vec![1u8; HANDOFF_BYTES_MAX],
            },
        };
        let mut frames = std::collections::VecDeque::new();
        encode_frames(vec![item], 64 * 1024, &mut frames, &stats, &Some(hook));
        assert!(frames.is_empty());
        assert_eq!(stats.snapshot().oversized, 1);
        assert_eq!(stats.snapshot().message_parts_out, 0);
        assert_eq!(
            *told.lock().unwrap(),
            vec![Some(ActorId::new(JobId(1), 0, 3))]
        );
    }

    #[test]
    fn a_move_over_the_bound_leaves_a_lost_packet_with_its_credits() {
        let stats = RemoteStats::default();
        let actor = ActorId::new(JobId(1), 1, 2);
        let sched = WireSched::from_sched(SchedCtx::default(), 0);
        let slot = WireSlot {
            id: actor,
            epoch: 6,
            // Over what crosses even in parts.
            state: Some(vec![5; HANDOFF_BYTES_MAX]),
            in_seq: vec![],
            out_seq: vec![],
            // Credits of shards 0, 0, 3, none and a self-send.
            mailbox: [0u16, 0, 3, u16::MAX, u16::MAX - 1]
                .into_iter()
                .map(|credit| (sched, credit, vec![1u8; 1000]))
                .collect(),
            early: vec![WireEarly {
                from: actor,
                seq: 9,
                credit_shard: 3,
                route_epoch: 0,
                sched,
                message: vec![2; 1000],
            }],
            blocked: vec![],
        };
        let item = WireItem {
            from_shard: 0,
            to_shard: 2,
            packet: WirePacket::Handoff(Box::new(slot)),
        };
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook: FailureHook = {
            let told = told.clone();
            Arc::new(move |f: Failure| told.lock().unwrap().push(f.actor))
        };
        let mut frames = std::collections::VecDeque::new();
        encode_frames(vec![item], 2_048, &mut frames, &stats, &Some(hook));
        assert_eq!(stats.snapshot().oversized, 6);
        assert_eq!(*told.lock().unwrap(), vec![Some(actor)]);
        assert_eq!(frames.len(), 1);
        let mut aligned = AlignedVec::<16>::new();
        aligned.extend_from_slice(&frames[0]);
        let batch = Vec::<u8>::decode_batch(&aligned).unwrap();
        assert!(batch_is_valid(&batch, &two_nodes(), 0));
        let packet = batch
            .items
            .into_iter()
            .next()
            .unwrap()
            .packet
            .into_packet::<Vec<u8>>(0)
            .expect("not a part");
        let Packet::LostHandoff {
            actor: lost,
            epoch,
            credits,
            uncredited,
        } = packet
        else {
            panic!("a lost move");
        };
        assert_eq!((lost, epoch, credits), (actor, 6, vec![(0, 2), (3, 2)]));
        // The message that held no credit and the self-send.
        assert_eq!(uncredited, 2);
    }

    /// A move over a frame's body: the parts of its encoding.
    fn move_in_parts(body_max: usize) -> Vec<WireItem<Vec<u8>>> {
        let actor = ActorId::new(JobId(1), 1, 2);
        let sched = WireSched::from_sched(SchedCtx::default(), 0);
        let slot = WireSlot {
            id: actor,
            epoch: 4,
            state: Some((0..50_000u32).map(|i| i as u8).collect()),
            in_seq: vec![(actor, 8)],
            out_seq: vec![],
            mailbox: (0..20).map(|i| (sched, 0, vec![i as u8; 900])).collect(),
            early: vec![],
            blocked: vec![],
        };
        let item = WireItem {
            from_shard: 0,
            to_shard: 2,
            packet: WirePacket::Handoff(Box::new(slot)),
        };
        let stats = RemoteStats::default();
        let mut frames = std::collections::VecDeque::new();
        encode_frames(vec![item], body_max, &mut frames, &stats, &None);
        assert_eq!(stats.snapshot().oversized, 0);
        assert_eq!(stats.snapshot().handoff_parts_out, frames.len() as u64);
        frames
            .iter()
            .flat_map(|frame| {
                assert!(frame.len() <= body_max);
                let mut aligned = AlignedVec::<16>::new();
                aligned.extend_from_slice(frame);
                let batch = Vec::<u8>::decode_batch(&aligned).unwrap();
                assert!(batch_is_valid(&batch, &two_nodes(), 0));
                batch.items
            })
            .collect()
    }

    #[test]
    fn a_move_over_a_frame_crosses_in_parts_and_is_assembled_whole() {
        let parts = move_in_parts(8_192);
        assert!(parts.len() > 8, "{} parts", parts.len());
        let mut assembly = Assembly::default();
        let last = parts.len() - 1;
        for (i, part) in parts.into_iter().enumerate() {
            let taken = assembly
                .take(part, &two_nodes(), 0, &mut Vec::new())
                .unwrap();
            assert_eq!(taken.is_some(), i == last, "part {i}");
            if let Some(WirePacket::Handoff(slot)) = taken {
                let slot = slot.into_slot::<Vec<u8>>(0);
                assert_eq!((slot.id.partition, slot.epoch), (2, 4));
                let state = slot.state.unwrap();
                assert!(state.iter().enumerate().all(|(i, &b)| b == i as u8));
                assert_eq!(state.len(), 50_000);
                assert_eq!(slot.mailbox.len(), 20);
                assert_eq!(slot.mailbox[19].2, vec![19u8; 900]);
            }
        }
        assert!(assembly.under_way.is_none() && assembly.bytes.is_empty());
    }

    #[test]
    fn parts_out_of_place_are_refused_and_each_move_dropped_leaves_a_notice() {
        let parts = move_in_parts(8_192);
        let mut lost = Vec::new();
        let mut take = |assembly: &mut Assembly, part: WireItem<Vec<u8>>| {
            let taken = assembly.take(part, &two_nodes(), 0, &mut lost);
            let notices: Vec<(ActorId, u64, u16)> = lost
                .drain(..)
                .map(|n| match n.packet {
                    WirePacket::Lost {
                        actor,
                        epoch,
                        credits,
                        uncredited,
                    } => {
                        assert!(credits.is_empty() && uncredited == 0);
                        (actor, epoch, n.to_shard)
                    }
                    _ => panic!("a notice"),
                })
                .collect();
            (taken, notices)
        };
        let actor = ActorId::new(JobId(1), 1, 2);
        let notice = vec![(actor, 4, 2)];
        // No first part.
        let mut assembly = Assembly::default();
        let (taken, notices) = take(&mut assembly, parts[1].clone_part());
        assert!(taken.is_err());
        assert_eq!(notices, notice);
        // A part skipped.
        assert!(
            matches!(take(&mut assembly, parts[0].clone_part()), (Ok(None), n) if n.is_empty())
        );
        let (taken, notices) = take(&mut assembly, parts[2].clone_part());
        assert!(taken.is_err());
        assert_eq!(notices, notice);
        assert!(assembly.under_way.is_none() && assembly.bytes.is_empty());
        // A move begun before the last ended: the last is dropped, the new
        // one goes on to the end.
        assert!(matches!(
            take(&mut assembly, parts[0].clone_part()),
            (Ok(None), _)
        ));
        assert!(matches!(
            take(&mut assembly, parts[1].clone_part()),
            (Ok(None), _)
        ));
        let (taken, notices) = take(&mut assembly, parts[0].clone_part());
        assert!(matches!(taken, Ok(None)));
        assert_eq!(notices, notice);
        for (i, part) in parts.iter().enumerate().skip(1) {
            let (taken, notices) = take(&mut assembly, part.clone_part());
            assert!(notices.is_empty());
            assert_eq!(taken.unwrap().is_some(), i == parts.len() - 1);
        }
        // From another pair of shards.
        assert!(matches!(
            take(&mut assembly, parts[0].clone_part()),
            (Ok(None), _)
        ));
        let mut other = parts[1].clone_part();
        other.to_shard = 3;
        let (taken, notices) = take(&mut assembly, other);
        assert!(taken.is_err());
        assert_eq!(notices, notice);
        // Whole, but the parts said another actor: refused, with a notice
        // for the actor the parts named.
        let n = parts.len();
        for (i, part) in parts.iter().enumerate() {
            let mut part = part.clone_part();
            if let WirePacket::HandoffPart { actor, .. } = &mut part.packet {
                actor.partition = 3;
            }
            let (taken, notices) = take(&mut assembly, part);
            assert_eq!(taken.is_err(), i == n - 1, "part {i}");
            assert_eq!(notices.len(), usize::from(i == n - 1));
        }
        // A peer that restarted: what was under way is abandoned.
        assert!(matches!(
            take(&mut assembly, parts[0].clone_part()),
            (Ok(None), _)
        ));
        let mut lost = Vec::new();
        assembly.abandon(&mut lost);
        assert_eq!(lost.len(), 1);
        assert!(assembly.under_way.is_none());
        // Any other packet is given back.
        let ack = WireItem::<Vec<u8>> {
            from_shard: 0,
            to_shard: 2,
            packet: WirePacket::Ack { actor, messages: 1 },
        };
        assert!(matches!(
            assembly.take(ack, &two_nodes(), 0, &mut lost),
            Ok(Some(WirePacket::Ack { messages: 1, .. }))
        ));
    }

    impl WireItem<Vec<u8>> {
        fn clone_part(&self) -> WireItem<Vec<u8>> {
            let WirePacket::HandoffPart {
                actor,
                epoch,
                part,
                parts,
                bytes,
            } = &self.packet
            else {
                panic!("a part");
            };
            WireItem {
                from_shard: self.from_shard,
                to_shard: self.to_shard,
                packet: WirePacket::HandoffPart {
                    actor: *actor,
                    epoch: *epoch,
                    part: *part,
                    parts: *parts,
                    bytes: bytes.clone(),
                },
            }
        }
    }
}
