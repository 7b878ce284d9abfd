//! One shard's state machine: actor table, mailboxes, run queue, credits, the
//! directory replica and migration. No threads and no I/O here: the executor loop
//! in `runtime::executor` moves `Packet`s between this core and the rings, and a
//! test can drive several cores by hand with a manual clock (see `sim` tests).
//!
//! # Delivery and order
//!
//! Every message travels on a *channel* `(sender actor, target actor)` and carries
//! the channel's sequence number, assigned when the shard admits the send. The
//! target accepts sequence numbers in order and holds early arrivals aside, so
//! per-sender order survives any path a message takes: direct, through a ring,
//! forwarded by an old owner, or delivered after the sender itself moved. A
//! sequence number at or below the last one accepted is a duplicate, which the
//! protocol never produces; it is asserted, because processing it would corrupt
//! state.
//!
//! Consecutive remote sends of one channel staged before the same flush travel as
//! one `Run` packet (their sequence numbers are implied by the first), so a stream
//! of small messages moves one pointer through the ring per run; the receiver
//! delivers them one by one, exactly as if they had come alone.
//!
//! # Credits (back-pressure)
//!
//! A send is admitted only if the target has room: for a target on this shard, its
//! mailbox holds fewer than `mailbox_credit_messages`; for a target elsewhere, this
//! shard has fewer than that many messages to it that the target has not yet
//! handled (the target acknowledges them in batches, one `Ack` per turn per sending
//! shard). A send without credit stays in the *sender's* `blocked` queue (with
//! every later send of that turn), and the sender does not run until the queue has
//! drained. Credits are per target actor, not per ring, and rings are always
//! drained, so a full actor never blocks traffic to other actors (no head-of-line
//! blocking), and in an acyclic dataflow a blocked sender always waits on a target
//! that can run: no deadlock. Memory is bounded: a target holds at most
//! `mailbox_credit_messages` from each shard (`remote_credit_messages` from
//! each shard of another node, when the run spans nodes) plus as many from
//! its own shard (early arrivals included), and a sender's blocked queue
//! holds at most what one handled message sent.
//!
//! # Migration
//!
//! `migrate_out` runs between two turns of the actor: the slot (actor object,
//! mailbox, channel sequence tables, blocked sends) is removed and handed to the
//! new shard as one `Handoff` packet: within a node state moves by ownership,
//! nothing is serialised. To a shard of another node (a run that spans
//! nodes) it moves by value instead: `migrate_to_node` snapshots the actor
//! and sends a `RemoteHandoff` with its channel tables, mailbox, early
//! arrivals and blocked sends; `install_remote` rebuilds it (see
//! `runtime::remote`). The rest below holds for both.
//!
//! The old owner bumps the actor's placement epoch, applies it to its own
//! directory and broadcasts it. Messages that still reach the old
//! owner are forwarded along its directory. A message that reaches a shard whose
//! directory is older than the sender's (`route_epoch` ahead) waits there in
//! `pending` until the handoff, the placement update, or (for a move from
//! another node that could not cross) the lost move's notice arrives. Because the old
//! owner updates its own directory before anything else, a message is forwarded at
//! most to a shard that knows more: every message reaches the owner exactly once.
//!
//! # Failures and retired jobs
//!
//! A turn's `handle` calls run inside one `catch_unwind`; a flag set around each
//! call tells an actor's panic from a runtime one (which is re-raised and ends the
//! shard). Activation (factory and state decoding) and `snapshot` are guarded the
//! same way. A failed actor is removed: the credits its queued and early messages
//! hold are acknowledged, its blocked sends are dropped, local senders waiting on
//! it are woken, and it goes into `failed`, so that later messages to it are
//! dropped (and acknowledged) instead of activating it again. `retire_job` drops
//! every trace of a job here (actors, saved states, timers, pending packets,
//! waiters, credit and sequence-table entries, directory overrides) and remembers
//! the job in `retired`, so that late messages for it are dropped as well. The
//! checks sit on the activation path only: a message to an active actor pays none.
//!
//! # Bounds (what limits each table of the shard)
//!
//! - Mailboxes and early arrivals: credits (above), per target actor.
//! - `blocked`: what one handled message sent.
//! - `staging` (per target shard): remote sends hold credits, so it holds at most
//!   `mailbox_credit_messages` per (sending actor's shard, target actor) plus
//!   acknowledgements and placement updates; a ring toward a dead shard is not
//!   waited for (the executor drops what does not fit), and a queue's capacity
//!   above `STAGING_KEEP_PACKETS` is given back once it drains.
//! - Self-sends take no credit (the sender is running, so it drains its own
//!   mailbox); an actor with more than `SELF_SENDS_PENDING_MAX` of them
//!   unhandled fails, rather than grow its mailbox without end.
//! - `Context::send_uncredited` takes none either: for rare messages whose
//!   count the protocol that sends them bounds (a reroute's handoffs, one per
//!   pair of partitions), between actors that may each be blocked on the
//!   other, which credits would deadlock.
//! - `timers`: at most `timers_per_actor_max` pending per actor (per shard where
//!   they were set); more are refused and counted in `timers_refused`.
//! - `pending`: packets for actors whose handoff is on its way; drained by the
//!   handoff, a placement update or a lost move's notice, dropped when their
//!   job retires.
//! - `failed`: at most `FAILED_ACTORS_MAX` actors (oldest job first out); emptied
//!   of a job's actors when it retires.
//! - `retired`: at most `RETIRED_JOBS_MAX` jobs (the lowest id is forgotten first).
//! - `jobs` (per-job counters, two histograms each): a retired job's are kept for
//!   `stats` until `RETIRED_JOB_STATS_MAX` later jobs have retired.
//! - Directory overrides, `credits`, `waiters`, per-channel `in_seq`/`out_seq`
//!   tables: entries of a job's actors are removed when it retires, so they are
//!   bounded by the actors of live jobs. (An override is not removed when an actor
//!   moves back home: its epoch is what stops an older placement update, still in
//!   flight through another ring, from rolling the placement back.)

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::actor::{ActorFactory, BoxActor, Context, Outgoing, SchedCtx};
use crate::clock::Clock;
use crate::ids::{ActorId, IdMap, JobId, ShardId};

use super::directory::{Directory, Placement};
use super::sched::{make_policy, Policy, PolicyKind, RunQueue};
use super::small_map::SmallMap;
use super::stats::{new_histogram, record_us, ActorReport, Counters, JobTable, ShardReport};
use super::store::StateStore;
use super::{panic_message, Failure, FailureHook};

/// Limits and policy of one shard.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// Messages a target accepts from one shard before that shard must wait for
    /// acknowledgements (and the local mailbox bound).
    pub mailbox_credit_messages: u32,
    /// The same for a sender on another node of the run (see
    /// `runtime::remote`): acks take longer to come back across nodes, so
    /// more may be on the way before the sender waits. A target holds at
    /// most this many from each shard of another node.
    pub remote_credit_messages: u32,
    /// Messages one turn handles at most before the actor yields the core.
    pub turn_messages_max: u32,
    /// Time one turn runs at most (checked after the first message, then as
    /// often as the pace of its messages needs, at least every
    /// `TURN_CLOCK_EVERY`).
    pub turn_ns_max: u64,
    /// A turn longer than this counts as a stall.
    pub stall_ns: u64,
    /// Deactivate an actor idle this long; `None` keeps actors active.
    pub idle_timeout_ns: Option<u64>,
    /// Timers one actor may have pending on one shard; past it `send_self_at` is
    /// refused (dropped and counted in `ShardReport::timers_refused`).
    pub timers_per_actor_max: u32,
    pub policy: PolicyKind,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            mailbox_credit_messages: 1024,
            remote_credit_messages: 4096,
            turn_messages_max: 256,
            turn_ns_max: 200_000,
            stall_ns: 10_000_000,
            idle_timeout_ns: Some(30_000_000_000),
            timers_per_actor_max: 1024,
            policy: PolicyKind::Edf,
        }
    }
}

/// Messages handled between two reads of the clock inside a turn, once a
/// turn has handled that many.
const TURN_CLOCK_EVERY: u32 = 16;

/// Messages a turn handles before it reads the clock again, having handled
/// `handled` in `elapsed_ns`: as many as fit in what is left of `turn_ns_max`
/// at the pace so far or at `message_ns` (what the actor's messages took in
/// its last turns), whichever is slower, and at most as many as it handled
/// so far (1, 2, 4, ... up to `TURN_CLOCK_EVERY`). The clock is first read
/// after one message, so a turn of slow messages (a batch of records each)
/// stops soon after `turn_ns_max` rather than after 16 of them (6 ms and
/// more were seen); and a fast first message (a watermark) ahead of slow
/// ones lets no more than one more through before the next reading (before,
/// a turn of a watermark and 16 batches took 15 to 43 ms in a burst).
#[inline]
fn clock_gap(handled: u32, elapsed_ns: u64, turn_ns_max: u64, message_ns: u64) -> u32 {
    let per_message_ns = (elapsed_ns / handled.max(1) as u64).max(message_ns);
    let left_ns = turn_ns_max.saturating_sub(elapsed_ns);
    let most = handled.clamp(1, TURN_CLOCK_EVERY) as u64;
    match left_ns.checked_div(per_message_ns) {
        Some(fit) => fit.clamp(1, most) as u32,
        None => most as u32,
    }
}

/// What an actor's messages take, about, after a turn whose messages took
/// `mean_ns` each: up to it at once, else an eighth of the way down to it,
/// so that one turn of fast messages (watermarks) does not hide that its
/// messages can be slow.
#[inline]
fn ease_message_ns(message_ns: u64, mean_ns: u64) -> u64 {
    if mean_ns >= message_ns {
        mean_ns
    } else {
        message_ns - (message_ns - mean_ns) / 8
    }
}

/// Marks an envelope that took no remote credit.
const NO_SHARD: u16 = u16::MAX;

/// Marks a message an actor sent itself (it took no credit either); counted in
/// its slot's `self_pending` until handled.
const SELF_SEND: u16 = u16::MAX - 1;

/// The shard whose credit an envelope holds, if any.
#[inline]
fn credit_index(credit_shard: u16) -> Option<usize> {
    (credit_shard < SELF_SEND).then_some(credit_shard as usize)
}

/// Failed actors a shard remembers (to drop their messages) until their job retires.
const FAILED_ACTORS_MAX: usize = 65_536;

/// Retired jobs a shard remembers (to drop their late messages).
const RETIRED_JOBS_MAX: usize = 4_096;
/// Retired jobs whose counters a shard still reports.
const RETIRED_JOB_STATS_MAX: usize = 64;

/// Capacity a drained staging queue keeps; above it the memory is given back.
const STAGING_KEEP_PACKETS: usize = 4_096;

/// Messages an actor may have sent itself and not yet handled. Self-sends take
/// no credit (the sender is running, so it drains), so this bound is what stops
/// a handler that sends itself more than one message per message: past it the
/// actor fails (`Failure`) instead of growing its mailbox without end.
pub const SELF_SENDS_PENDING_MAX: usize = 4_096;

/// A message on its way, with everything delivery needs.
pub struct Envelope<M> {
    pub(crate) to: ActorId,
    pub(crate) from: ActorId,
    /// Position on the channel `(from, to)`, from 1.
    pub(crate) seq: u64,
    /// The shard whose credit this message holds (`NO_SHARD` if none).
    pub(crate) credit_shard: u16,
    /// The placement epoch of `to` the last router believed in.
    pub(crate) route_epoch: u64,
    pub(crate) sched: SchedCtx,
    pub(crate) message: M,
}

impl<M> Queued<M> {
    #[inline]
    fn arrived(env: Envelope<M>, now_ns: u64, arrival: u64) -> Self {
        Queued {
            sched: env.sched,
            enqueued_ns: now_ns,
            arrival,
            credit_shard: env.credit_shard,
            message: env.message,
        }
    }
}

/// Consecutive messages of one channel: envelope `i` has sequence `first_seq + i`.
pub struct Run<M> {
    pub(crate) to: ActorId,
    pub(crate) from: ActorId,
    pub(crate) first_seq: u64,
    pub(crate) credit_shard: u16,
    pub(crate) route_epoch: u64,
    /// At most `RUN_MESSAGES_MAX` when made here; a run taken from another
    /// node holds what its sender put in it (delivery does not care).
    pub(crate) messages: Vec<(SchedCtx, M)>,
}

/// Messages one `Run` packet carries at most.
const RUN_MESSAGES_MAX: usize = 256;

impl<M> Run<M> {
    /// Start a run with its first message.
    fn start(first: Envelope<M>) -> Self {
        let mut messages = Vec::with_capacity(64);
        messages.push((first.sched, first.message));
        Run {
            to: first.to,
            from: first.from,
            first_seq: first.seq,
            credit_shard: first.credit_shard,
            route_epoch: first.route_epoch,
            messages,
        }
    }

    /// Whether `env` is the next message of this run's channel.
    fn extends(&self, env: &Envelope<M>) -> bool {
        let next_seq = self.first_seq + self.messages.len() as u64;
        self.messages.len() < RUN_MESSAGES_MAX
            && continues(
                self.to,
                self.from,
                self.credit_shard,
                self.route_epoch,
                next_seq,
                env,
            )
    }

    fn envelopes(self) -> impl Iterator<Item = Envelope<M>> {
        let Run {
            to,
            from,
            first_seq,
            credit_shard,
            route_epoch,
            messages,
        } = self;
        messages
            .into_iter()
            .zip(first_seq..)
            .map(move |((sched, message), seq)| Envelope {
                to,
                from,
                seq,
                credit_shard,
                route_epoch,
                sched,
                message,
            })
    }
}

/// A message in a mailbox: what handling and accounting need, none of the routing
/// (a smaller copy on every push and pop of the data path).
struct Queued<M> {
    sched: SchedCtx,
    /// When it entered the mailbox (the shard clock of that moment).
    enqueued_ns: u64,
    /// Arrival order on this shard (the FIFO policy's key).
    arrival: u64,
    /// The shard whose credit it holds (`NO_SHARD` if none).
    credit_shard: u16,
    message: M,
}

/// What shards send each other through the rings.
pub enum Packet<M> {
    Message(Envelope<M>),
    /// Consecutive messages of one channel, staged in one flush: they cross the ring
    /// as one packet (a pointer to their batch), and are delivered one by one.
    Run(Run<M>),
    /// `messages` sent by the receiving shard to `actor` have been handled.
    Ack {
        actor: ActorId,
        messages: u32,
    },
    /// An actor moving in, with its new placement epoch.
    Handoff(Box<Slot<M>>, u64),
    /// An actor moving in from another node: its state and what it held,
    /// by value (see `RemoteSlot`).
    RemoteHandoff(Box<RemoteSlot<M>>),
    /// An actor whose move from another node could not cross (the
    /// gateway found it over `remote::HANDOFF_BYTES_MAX` encoded, or its
    /// parts did not all arrive whole): it is placed here at `epoch` as
    /// failed, and the credits its messages held (`(shard, messages)`)
    /// go back to their senders.
    LostHandoff {
        actor: ActorId,
        epoch: u64,
        credits: Vec<(u16, u32)>,
        /// Its messages that held no credit (self-sends, blocked sends).
        uncredited: u32,
    },
    Placement {
        actor: ActorId,
        placement: Placement,
    },
    /// Move `actor` to `to`; routed like a message until it reaches the owner.
    Migrate {
        actor: ActorId,
        to: ShardId,
    },
}

/// An actor on its way to another node: what a `Slot` holds, by value,
/// for the gateway to encode. Its object is rebuilt there by the factory
/// from `state` (what `Actor::snapshot` gave), as after a deactivation.
pub struct RemoteSlot<M> {
    pub(crate) id: ActorId,
    /// Its placement epoch at the new owner.
    pub(crate) epoch: u64,
    pub(crate) state: Option<Vec<u8>>,
    pub(crate) in_seq: Vec<(ActorId, u64)>,
    pub(crate) out_seq: Vec<(ActorId, u64)>,
    /// Its mailbox in order: each message's context, the shard whose
    /// credit it holds (or `SELF_SEND`, `NO_SHARD`) and the message.
    pub(crate) mailbox: Vec<(SchedCtx, u16, M)>,
    /// Early arrivals, each waiting for the gap before it.
    pub(crate) early: Vec<Envelope<M>>,
    /// Its sends not admitted yet, in order.
    pub(crate) blocked: Vec<Outgoing<M>>,
}

/// An actor moves to another node only while its mailbox, early arrivals
/// and blocked sends hold at most this many messages together, its
/// snapshot at most `REMOTE_HANDOFF_STATE_BYTES_MAX` and its channel
/// tables at most `REMOTE_HANDOFF_CHANNELS_MAX` entries; otherwise the
/// move is refused (`migrations_refused`) and may be asked again. A move
/// crosses in one frame (`runtime::remote::FRAME_BYTES_MAX`, 256 KiB), or
/// in parts when over it; the shard does not know its messages' sizes,
/// so a move whose encoding is still over
/// `runtime::remote::HANDOFF_BYTES_MAX` (32 MiB: many large messages) is
/// lost, not refused (see `runtime::remote`).
pub const REMOTE_HANDOFF_MESSAGES_MAX: usize = 1_024;
pub const REMOTE_HANDOFF_STATE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The same for its channel tables (`in_seq` and `out_seq` together, 24
/// bytes an entry on the wire): 96 KiB at most.
pub const REMOTE_HANDOFF_CHANNELS_MAX: usize = 4_096;

/// A request from outside the runtime, queued to one shard.
pub enum External<M> {
    Send(Outgoing<M>),
    Migrate {
        actor: ActorId,
        to: ShardId,
    },
    Report(std::sync::mpsc::Sender<ShardReport>),
    /// Drop every actor of the job and every later message for it; the shard's
    /// id goes back once done.
    RetireJob(JobId, std::sync::mpsc::Sender<ShardId>),
    /// Deactivate the job's idle actors now (scale to zero).
    DeactivateJob(JobId),
    /// Panic outside actor code (tests of shard death).
    #[doc(hidden)]
    Crash,
}

/// An actor as a shard holds it.
pub struct Slot<M> {
    id: ActorId,
    actor: Option<BoxActor<M>>,
    mailbox: VecDeque<Queued<M>>,
    /// Last sequence number accepted, per sender.
    in_seq: SmallMap<u64>,
    /// Early arrivals, per sender, waiting for the gap before them to fill.
    reorder: IdMap<ActorId, BTreeMap<u64, Envelope<M>>>,
    /// Envelopes held in `reorder`; they count against the mailbox bound.
    early: usize,
    /// Messages in the mailbox the actor sent itself (`SELF_SEND`).
    self_pending: usize,
    /// Last sequence number assigned, per target.
    out_seq: SmallMap<u64>,
    /// Sends waiting for credit, in order; the actor does not run while non-empty.
    blocked: VecDeque<Outgoing<M>>,
    queued: bool,
    last_active_ns: u64,
    last_handled_ns: u64,
    /// What one of its messages takes, about: the mean of its last turn when
    /// that was higher, else easing down to it (see `clock_gap`).
    message_ns: u64,
    /// Set by a handoff: when the old owner last handled a message.
    pause_from_ns: Option<u64>,
    /// Set by a handoff: when the old owner handed the actor over.
    handed_off_ns: u64,
    counters: Counters,
}

impl<M> Slot<M> {
    fn new(id: ActorId, actor: Option<BoxActor<M>>, now_ns: u64) -> Box<Self> {
        Box::new(Slot {
            id,
            actor,
            mailbox: VecDeque::new(),
            in_seq: SmallMap::default(),
            reorder: IdMap::default(),
            early: 0,
            self_pending: 0,
            out_seq: SmallMap::default(),
            blocked: VecDeque::new(),
            queued: false,
            last_active_ns: now_ns,
            last_handled_ns: now_ns,
            message_ns: 0,
            pause_from_ns: None,
            handed_off_ns: 0,
            counters: Counters::default(),
        })
    }

    /// Accept an envelope in channel order; returns how many entered the mailbox.
    #[inline]
    fn accept(&mut self, env: Envelope<M>, now_ns: u64, arrivals: &mut u64) -> usize {
        let last = self.in_seq.entry(env.from);
        if env.seq != *last + 1 {
            assert!(
                env.seq > *last,
                "duplicate delivery to {}: seq {} from {} after {}",
                self.id,
                env.seq,
                env.from,
                last
            );
            self.reorder
                .entry(env.from)
                .or_default()
                .insert(env.seq, env);
            self.early += 1;
            return 0;
        }
        *last += 1;
        let mut next_seq = *last + 1;
        let from = env.from;
        *arrivals += 1;
        self.mailbox
            .push_back(Queued::arrived(env, now_ns, *arrivals));
        let mut accepted = 1;
        if self.early == 0 {
            return accepted; // nothing held aside: skip the lookup
        }
        if let Some(early) = self.reorder.get_mut(&from) {
            while let Some(next) = early.remove(&next_seq) {
                next_seq += 1;
                self.early -= 1;
                *arrivals += 1;
                self.mailbox
                    .push_back(Queued::arrived(next, now_ns, *arrivals));
                accepted += 1;
            }
            if early.is_empty() {
                self.reorder.remove(&from);
            }
            *self.in_seq.entry(from) = next_seq - 1;
        }
        accepted
    }

    #[inline]
    fn next_seq(&mut self, to: ActorId) -> u64 {
        let seq = self.out_seq.entry(to);
        *seq += 1;
        *seq
    }

    fn is_idle(&self) -> bool {
        self.mailbox.is_empty()
            && self.blocked.is_empty()
            && self.reorder.is_empty()
            && !self.queued
    }
}

/// A timer: a send held back until its due time.
struct Timer<M> {
    seq: u64,
    send: Outgoing<M>,
}

impl<M> PartialEq for Timer<M> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl<M> Eq for Timer<M> {}
impl<M> PartialOrd for Timer<M> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl<M> Ord for Timer<M> {
    /// Reversed, so the max-heap yields the earliest due time first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.send.due_ns, other.seq).cmp(&(self.send.due_ns, self.seq))
    }
}

/// Whether `env` is message `next_seq` of the channel `(from, to)`, routed alike.
#[inline]
fn continues<M>(
    to: ActorId,
    from: ActorId,
    credit_shard: u16,
    route_epoch: u64,
    next_seq: u64,
    env: &Envelope<M>,
) -> bool {
    env.seq == next_seq
        && env.to == to
        && env.from == from
        && env.credit_shard == credit_shard
        && env.route_epoch == route_epoch
}

/// Stage a message for another shard, joining it to the run of its channel at the
/// back of the queue when it continues it. Returns whether it joined a run.
#[inline]
fn stage_remote<M>(staging: &mut VecDeque<Packet<M>>, env: Envelope<M>) -> bool {
    match staging.back_mut() {
        Some(Packet::Run(run)) if run.extends(&env) => {
            run.messages.push((env.sched, env.message));
            true
        }
        Some(Packet::Message(p))
            if continues(p.to, p.from, p.credit_shard, p.route_epoch, p.seq + 1, &env) =>
        {
            let Some(Packet::Message(previous)) = staging.pop_back() else {
                unreachable!("matched just above");
            };
            let mut run = Run::start(previous);
            run.messages.push((env.sched, env.message));
            staging.push_back(Packet::Run(run));
            true
        }
        _ => {
            staging.push_back(Packet::Message(env));
            false
        }
    }
}

/// A deactivated actor as the state store keeps it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Saved {
    state: Option<Vec<u8>>,
    in_seq: Vec<(ActorId, u64)>,
    out_seq: Vec<(ActorId, u64)>,
}

pub struct ShardCore<M> {
    id: ShardId,
    config: ShardConfig,
    clock: Clock,
    /// The clock as read at the last turn or input drain.
    now_ns: u64,
    directory: Directory,
    policy: Box<dyn Policy>,
    run_queue: RunQueue,
    slots: Vec<Option<Box<Slot<M>>>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    index: IdMap<ActorId, u32>,
    /// The last local send's target and its slot: a stream of sends to one actor
    /// skips the hash lookup. Valid while the slot's generation is unchanged.
    last_target: Option<(ActorId, u32, u32)>,
    /// Packets for actors on their way to this shard.
    pending: IdMap<ActorId, Vec<Packet<M>>>,
    /// Remote sends not yet acknowledged, per target actor.
    credits: SmallMap<u32>,
    /// Senders blocked on each target.
    waiters: IdMap<ActorId, Vec<ActorId>>,
    /// Sender identity (and blocked queue) of sends from outside the runtime.
    injector: Option<Box<Slot<M>>>,
    /// Outgoing packets per target shard, flushed into the rings by the executor.
    staging: Vec<VecDeque<Packet<M>>>,
    ack_counts: Vec<u32>,
    scratch: Vec<Outgoing<M>>,
    /// Self-sends waiting for their due time; fired through the injector channel.
    timers: BinaryHeap<Timer<M>>,
    timers_set: u64,
    /// Pending timers per actor (entries only while some are pending).
    timer_counts: IdMap<ActorId, u32>,
    /// Actors that panicked here; their messages are dropped.
    failed: BTreeSet<ActorId>,
    /// Jobs retired; their messages are dropped.
    retired: BTreeSet<JobId>,
    /// Retired jobs whose counters are still kept, oldest first.
    retired_stats: VecDeque<JobId>,
    on_failure: Option<FailureHook>,
    /// Queueing delays of the turn's messages, run-length coded: `(µs, count)`.
    turn_delays_us: Vec<(u64, u64)>,
    arrivals: u64,
    factory: Arc<dyn ActorFactory<M>>,
    store: Arc<dyn StateStore>,
    jobs: JobTable,
    report: ShardReport,
    /// The shards of this node (an actor moves to another node's by value);
    /// every shard when the run is on one node.
    local: std::ops::Range<u16>,
}

impl<M: Send + 'static> ShardCore<M> {
    pub fn new(
        id: ShardId,
        shards: u16,
        config: ShardConfig,
        clock: Clock,
        factory: Arc<dyn ActorFactory<M>>,
        store: Arc<dyn StateStore>,
    ) -> Self {
        assert!(id.0 < shards, "{id} out of {shards} shards");
        assert!(
            config.mailbox_credit_messages > 0
                && config.remote_credit_messages > 0
                && config.turn_messages_max > 0
        );
        let now_ns = clock.now_ns();
        ShardCore {
            id,
            policy: make_policy(&config.policy),
            config,
            clock,
            now_ns,
            directory: Directory::new(shards),
            run_queue: RunQueue::default(),
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            index: IdMap::default(),
            last_target: None,
            pending: IdMap::default(),
            credits: SmallMap::default(),
            waiters: IdMap::default(),
            injector: Some(Slot::new(ActorId::injector(id), None, now_ns)),
            staging: (0..shards).map(|_| VecDeque::new()).collect(),
            ack_counts: vec![0; shards as usize],
            scratch: Vec::new(),
            timers: BinaryHeap::new(),
            timers_set: 0,
            timer_counts: IdMap::default(),
            failed: BTreeSet::new(),
            retired: BTreeSet::new(),
            retired_stats: VecDeque::new(),
            on_failure: None,
            turn_delays_us: Vec::new(),
            arrivals: 0,
            factory,
            store,
            jobs: JobTable::default(),
            report: ShardReport {
                shard: id,
                at_ns: 0,
                turns: 0,
                messages: 0,
                stalls: 0,
                parks: 0,
                idle_ns: None,
                migrations_out: 0,
                migrations_in: 0,
                migrations_refused: 0,
                migrations_in_from_nodes: 0,
                forwarded: 0,
                run_messages: 0,
                activations: 0,
                deactivations: 0,
                failures: 0,
                dropped: 0,
                dropped_to_dead_shards: 0,
                timers_refused: 0,
                jobs_retired: 0,
                migration_pause_us: new_histogram(),
                migration_idle_before_us: new_histogram(),
                migration_transfer_us: new_histogram(),
                actors: Vec::new(),
                jobs: Vec::new(),
            },
            local: 0..shards,
        }
    }

    /// Say which shards are this node's when the run spans nodes: an
    /// actor moves to another node's shard by value (`RemoteHandoff`), and
    /// a sender to an actor there has `remote_credit_messages`.
    pub fn set_local_shards(&mut self, local: std::ops::Range<u16>) {
        assert!(
            local.contains(&self.id.0),
            "{} outside its own node",
            self.id
        );
        self.local = local;
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Who is told about actor failures on this shard.
    pub fn set_failure_hook(&mut self, hook: Option<FailureHook>) {
        self.on_failure = hook;
    }

    /// Active actors on this shard.
    pub fn active_actors(&self) -> usize {
        self.index.len()
    }

    /// Drop every packet staged for `shard` (it is dead); returns how many.
    pub fn discard_staging(&mut self, shard: ShardId) -> usize {
        let dropped = std::mem::take(&mut self.staging[shard.index()]);
        self.report.dropped_to_dead_shards += dropped.len() as u64;
        dropped.len()
    }

    /// Give back the memory of a drained staging queue that grew large.
    #[inline]
    pub fn trim_staging(&mut self, shard: ShardId) {
        let staged = &mut self.staging[shard.index()];
        if staged.is_empty() && staged.capacity() > STAGING_KEEP_PACKETS {
            staged.shrink_to(STAGING_KEEP_PACKETS);
        }
    }

    /// Read the clock; the executor calls this before draining inputs.
    pub fn tick(&mut self) {
        self.now_ns = self.clock.now_ns();
    }

    /// Packets waiting to go to `shard`.
    pub fn staging(&mut self, shard: ShardId) -> &mut VecDeque<Packet<M>> {
        &mut self.staging[shard.index()]
    }

    pub fn has_staged(&self) -> bool {
        self.staging.iter().any(|s| !s.is_empty())
    }

    pub fn has_runnable(&self) -> bool {
        !self.run_queue.is_empty()
    }

    /// When the earliest timer is due, if any.
    pub fn next_timer_ns(&self) -> Option<u64> {
        self.timers.peek().map(|t| t.send.due_ns)
    }

    /// Send every timer that is due; returns how many fired.
    pub fn fire_timers(&mut self) -> usize {
        let now_ns = self.clock.now_ns();
        let mut fired = 0;
        while self.timers.peek().is_some_and(|t| t.send.due_ns <= now_ns) {
            let mut timer = self.timers.pop().expect("peeked");
            self.timer_fired(timer.send.to);
            timer.send.due_ns = 0;
            self.external(External::Send(timer.send));
            fired += 1;
        }
        fired
    }

    /// Whether sends from outside may be taken now (else they wait in their queue).
    pub fn injector_ready(&self) -> bool {
        self.injector.as_ref().is_none_or(|i| i.blocked.is_empty())
    }

    pub fn is_active(&self, id: ActorId) -> bool {
        self.index.contains_key(&id)
    }

    pub fn count_park(&mut self) {
        self.report.parks += 1;
    }

    /// The shard's loop had nothing to do for `ns` (see `ShardReport::idle_ns`).
    pub fn add_idle_ns(&mut self, ns: u64) {
        *self.report.idle_ns.get_or_insert(0) += ns;
    }

    // ---- inputs ----------------------------------------------------------------

    /// A packet from another shard.
    pub fn receive(&mut self, packet: Packet<M>) {
        match packet {
            Packet::Message(env) => self.deliver(env),
            Packet::Run(run) => {
                for env in run.envelopes() {
                    self.deliver(env);
                }
            }
            Packet::Ack { actor, messages } => self.on_ack(actor, messages),
            Packet::Handoff(slot, epoch) => {
                if self.refuses(slot.id) {
                    self.release(slot);
                } else {
                    self.install(slot, epoch);
                }
            }
            Packet::Placement { actor, placement } => {
                if !self.retired.contains(&actor.job) {
                    self.directory.apply(actor, placement);
                    self.reroute_pending(actor);
                }
            }
            Packet::Migrate { actor, to } => self.route_migrate(actor, to),
            Packet::RemoteHandoff(moving) => self.install_remote(*moving),
            Packet::LostHandoff {
                actor,
                epoch,
                credits,
                uncredited,
            } => self.lost_remote(actor, epoch, credits, uncredited),
        }
    }

    /// A request from outside.
    pub fn external(&mut self, request: External<M>) {
        match request {
            External::Send(out) => {
                if self.retired.contains(&out.to.job) {
                    self.report.dropped += 1;
                    return;
                }
                let mut injector = self.injector.take().expect("the injector is home");
                self.send_from(&mut injector, out);
                self.injector = Some(injector);
            }
            External::Migrate { actor, to } => self.route_migrate(actor, to),
            External::Report(reply) => {
                // The caller may have stopped waiting; nothing to do then.
                let _ = reply.send(self.report());
            }
            External::RetireJob(job, done) => {
                self.retire_job(job);
                // The caller may have stopped waiting; nothing to do then.
                let _ = done.send(self.id);
            }
            External::DeactivateJob(job) => {
                self.deactivate_if(|id, _| id.job == job);
            }
            External::Crash => panic!("{} crashed on request (a test of shard death)", self.id),
        }
    }

    // ---- turns -----------------------------------------------------------------

    /// Run one turn of the most urgent runnable actor; false if none was runnable.
    pub fn run_turn(&mut self) -> bool {
        let Some((index, generation)) = self.run_queue.pop() else {
            return false;
        };
        let i = index as usize;
        if self.generations[i] != generation || self.slots[i].is_none() {
            return true; // the actor left this shard after it was queued
        }
        let mut slot = self.slots[i].take().expect("checked above");
        slot.queued = false;
        let start_ns = self.clock.now_ns();
        self.now_ns = start_ns;
        if let Some(from_ns) = slot.pause_from_ns.take() {
            record_us(
                &mut self.report.migration_pause_us,
                start_ns.saturating_sub(from_ns),
                1,
            );
        }
        let (handled, failure) = self.handle_messages(&mut slot, start_ns);
        let end_ns = self.clock.now_ns();
        self.now_ns = end_ns;
        self.account_turn(&mut slot, handled, start_ns, end_ns);
        let id = slot.id;
        if let Some(message) = failure {
            self.slots[i] = Some(slot);
            // Credits of the messages it handled this turn, the fatal one included.
            self.send_acks(id);
            self.fail_actor(id, message);
            return true;
        }
        let runnable = !slot.mailbox.is_empty() && slot.blocked.is_empty();
        let room = slot.mailbox.len() < self.config.mailbox_credit_messages as usize;
        self.slots[i] = Some(slot);
        if runnable {
            self.enqueue_run(index);
        }
        self.send_acks(id);
        if room && self.waiters.contains_key(&id) {
            self.wake_waiters(id);
        }
        true
    }

    /// Handle up to a turn's worth of messages; the count, and the panic message
    /// if the actor panicked (it is then gone from the slot).
    fn handle_messages(&mut self, slot: &mut Slot<M>, start_ns: u64) -> (u32, Option<String>) {
        let mut actor = slot.actor.take().expect("a queued actor is active");
        let mut out = std::mem::take(&mut self.scratch);
        let mut handled = 0u32;
        // The clock is read after this many messages (see `clock_gap`).
        let mut next_clock = 1u32;
        let mut misses = 0u64;
        // Set only around `handle`: a panic outside it is the runtime's, not the actor's.
        let mut in_handler = false;
        let mut overflow: Option<String> = None;
        // One `catch_unwind` per turn, not per message.
        let turn = catch_unwind(AssertUnwindSafe(|| {
            while handled < self.config.turn_messages_max {
                let Some(env) = slot.mailbox.pop_front() else {
                    break;
                };
                handled += 1;
                let delay_us = start_ns.saturating_sub(env.enqueued_ns) / 1_000;
                match self.turn_delays_us.last_mut() {
                    Some((us, count)) if *us == delay_us => *count += 1,
                    _ => self.turn_delays_us.push((delay_us, 1)),
                }
                misses += (env.sched.deadline_ns < start_ns) as u64;
                if let Some(shard) = credit_index(env.credit_shard) {
                    self.ack_counts[shard] += 1;
                } else if env.credit_shard == SELF_SEND {
                    slot.self_pending -= 1;
                }
                let (directory, credits) = (&self.directory, &self.credits);
                let (index, slots, here) = (&self.index, &self.slots, self.id);
                let backlog = |to: ActorId| -> u32 {
                    if directory.lookup(to).shard != here {
                        return credits.get(to).copied().unwrap_or(0);
                    }
                    index
                        .get(&to)
                        .and_then(|&i| slots[i as usize].as_ref())
                        .map_or(0, |t| (t.mailbox.len() + t.early) as u32)
                };
                let mut ctx = Context {
                    me: slot.id,
                    shard: self.id,
                    now_ns: start_ns,
                    clock: &self.clock,
                    sched: env.sched,
                    out: &mut out,
                    backlog: &backlog,
                };
                in_handler = true;
                actor.handle(env.message, &mut ctx);
                in_handler = false;
                // Checked before anything of this call leaves: a failing call
                // sends nothing.
                let me = slot.id;
                let new_self_sends = out.iter().filter(|s| s.due_ns == 0 && s.to == me).count();
                if slot.self_pending + new_self_sends > SELF_SENDS_PENDING_MAX {
                    overflow = Some(format!(
                        "sent itself more than {SELF_SENDS_PENDING_MAX} messages it has not \
                         handled yet (a mailbox is bounded; self-sends take no credit)"
                    ));
                    break;
                }
                for send in out.drain(..) {
                    if send.due_ns > 0 {
                        self.set_timer(send);
                    } else {
                        self.send_from(slot, send);
                    }
                }
                if overflow.is_some() || !slot.blocked.is_empty() {
                    break;
                }
                if handled == next_clock {
                    let elapsed_ns = self.clock.now_ns().saturating_sub(start_ns);
                    if elapsed_ns > self.config.turn_ns_max {
                        break;
                    }
                    next_clock = handled
                        + clock_gap(
                            handled,
                            elapsed_ns,
                            self.config.turn_ns_max,
                            slot.message_ns,
                        );
                }
            }
        }));
        let failure = match turn {
            Ok(()) if overflow.is_some() => {
                out.clear();
                let _ = catch_unwind(AssertUnwindSafe(move || drop(actor)));
                overflow
            }
            Ok(()) => {
                slot.actor = Some(actor);
                None
            }
            Err(payload) if in_handler => {
                // What the failed call sent goes nowhere; the actor is dropped (a
                // second panic in its `Drop` is contained too).
                out.clear();
                let _ = catch_unwind(AssertUnwindSafe(move || drop(actor)));
                Some(panic_message(payload.as_ref()))
            }
            Err(payload) => std::panic::resume_unwind(payload),
        };
        self.scratch = out;
        slot.counters.deadline_misses += misses;
        self.jobs.get(slot.id.job).deadline_misses += misses;
        (handled, failure)
    }

    /// Hold `send` until its due time, unless its actor has too many pending.
    fn set_timer(&mut self, send: Outgoing<M>) {
        let pending = self.timer_counts.entry(send.to).or_default();
        if *pending >= self.config.timers_per_actor_max {
            self.report.timers_refused += 1;
            return;
        }
        *pending += 1;
        self.timers_set += 1;
        let seq = self.timers_set;
        self.timers.push(Timer { seq, send });
    }

    fn timer_fired(&mut self, actor: ActorId) {
        if let Some(pending) = self.timer_counts.get_mut(&actor) {
            *pending -= 1;
            if *pending == 0 {
                self.timer_counts.remove(&actor);
            }
        }
    }

    fn account_turn(&mut self, slot: &mut Slot<M>, handled: u32, start_ns: u64, end_ns: u64) {
        let duration_ns = end_ns.saturating_sub(start_ns);
        let job = self.jobs.get(slot.id.job);
        for counters in [&mut slot.counters, job] {
            counters.turns += 1;
            counters.messages += handled as u64;
            counters.cpu_ns += duration_ns;
            if handled > 0 {
                record_us(
                    &mut counters.service_us,
                    duration_ns / handled as u64,
                    handled as u64,
                );
            }
            for &(delay_us, count) in &self.turn_delays_us {
                record_us(&mut counters.queue_us, delay_us * 1_000, count);
            }
        }
        self.turn_delays_us.clear();
        self.policy.charge(slot.id.job, duration_ns);
        self.report.turns += 1;
        self.report.messages += handled as u64;
        if duration_ns > self.config.stall_ns {
            self.report.stalls += 1;
        }
        slot.last_active_ns = end_ns;
        if handled > 0 {
            slot.last_handled_ns = end_ns;
            slot.message_ns = ease_message_ns(slot.message_ns, duration_ns / handled as u64);
        }
    }

    fn send_acks(&mut self, actor: ActorId) {
        for shard in 0..self.ack_counts.len() {
            let messages = std::mem::take(&mut self.ack_counts[shard]);
            if messages == 0 {
                continue;
            }
            if shard == self.id.index() {
                self.on_ack(actor, messages);
            } else {
                self.staging[shard].push_back(Packet::Ack { actor, messages });
            }
        }
    }

    // ---- sending ---------------------------------------------------------------

    /// Admit `send` from `sender`, or queue it in the sender's blocked list.
    #[inline]
    fn send_from(&mut self, sender: &mut Slot<M>, send: Outgoing<M>) {
        if !sender.blocked.is_empty() {
            sender.blocked.push_back(send);
            return;
        }
        if let Err(send) = self.admit(sender, send) {
            self.waiters.entry(send.to).or_default().push(sender.id);
            sender.blocked.push_back(send);
        }
    }

    fn admit(&mut self, sender: &mut Slot<M>, send: Outgoing<M>) -> Result<(), Outgoing<M>> {
        let credit_max = self.config.mailbox_credit_messages;
        if send.to == sender.id {
            // A self-send needs no credit: the sender is running, so it drains
            // (its count is bounded by `SELF_SENDS_PENDING_MAX` in the turn).
            let env = self.envelope(sender, send, SELF_SEND, 0);
            sender.self_pending += 1;
            sender.accept(env, self.now_ns, &mut self.arrivals);
            return Ok(());
        }
        let placement = self.directory.lookup(send.to);
        if placement.shard == self.id {
            let active = self.local_index(send.to);
            if let Some(target) = active.and_then(|i| self.slots[i as usize].as_ref()) {
                if target.mailbox.len() + target.early >= credit_max as usize && !send.uncredited {
                    return Err(send);
                }
            }
            let env = self.envelope(sender, send, NO_SHARD, placement.epoch);
            match active {
                Some(index) => self.accept_into(index, env),
                None => self.deliver(env),
            }
        } else {
            let credit_shard = if send.uncredited {
                NO_SHARD
            } else {
                let credit_max = if self.local.contains(&placement.shard.0) {
                    credit_max
                } else {
                    self.config.remote_credit_messages
                };
                let used = self.credits.entry(send.to);
                if *used >= credit_max {
                    return Err(send);
                }
                *used += 1;
                self.id.0
            };
            let env = self.envelope(sender, send, credit_shard, placement.epoch);
            let staging = &mut self.staging[placement.shard.index()];
            self.report.run_messages += stage_remote(staging, env) as u64;
        }
        Ok(())
    }

    /// The slot of a local actor, through the one-entry cache.
    #[inline]
    fn local_index(&mut self, id: ActorId) -> Option<u32> {
        if let Some((cached, index, generation)) = self.last_target {
            if cached == id && self.generations[index as usize] == generation {
                return Some(index);
            }
        }
        let index = *self.index.get(&id)?;
        self.last_target = Some((id, index, self.generations[index as usize]));
        Some(index)
    }

    #[inline]
    fn envelope(
        &self,
        sender: &mut Slot<M>,
        send: Outgoing<M>,
        credit_shard: u16,
        route_epoch: u64,
    ) -> Envelope<M> {
        Envelope {
            to: send.to,
            from: sender.id,
            seq: sender.next_seq(send.to),
            credit_shard,
            route_epoch,
            sched: send.sched,
            message: send.message,
        }
    }

    fn on_ack(&mut self, actor: ActorId, messages: u32) {
        if let Some(used) = self.credits.get_mut(actor) {
            debug_assert!(*used >= messages, "more acks than sends to {actor}");
            *used = used.saturating_sub(messages);
        }
        if self.waiters.contains_key(&actor) {
            self.wake_waiters(actor);
        }
    }

    /// Retry the blocked sends of every sender waiting on `target`.
    fn wake_waiters(&mut self, target: ActorId) {
        let Some(senders) = self.waiters.remove(&target) else {
            return;
        };
        for sender in senders {
            if sender == ActorId::injector(self.id) {
                let mut injector = self.injector.take().expect("the injector is home");
                self.retry_blocked(&mut injector);
                self.injector = Some(injector);
                continue;
            }
            let Some(&index) = self.index.get(&sender) else {
                continue; // moved or deactivated since
            };
            let Some(mut slot) = self.slots[index as usize].take() else {
                continue;
            };
            self.retry_blocked(&mut slot);
            let runnable = slot.blocked.is_empty() && !slot.mailbox.is_empty() && !slot.queued;
            self.slots[index as usize] = Some(slot);
            if runnable {
                self.enqueue_run(index);
            }
        }
    }

    fn retry_blocked(&mut self, sender: &mut Slot<M>) {
        while let Some(send) = sender.blocked.pop_front() {
            if let Err(send) = self.admit(sender, send) {
                self.waiters.entry(send.to).or_default().push(sender.id);
                sender.blocked.push_front(send);
                return;
            }
        }
    }

    // ---- delivery --------------------------------------------------------------

    #[inline]
    fn deliver(&mut self, env: Envelope<M>) {
        if let Some(index) = self.local_index(env.to) {
            self.accept_into(index, env);
            return;
        }
        if self.refuses(env.to) {
            self.drop_envelope(env);
            return;
        }
        let placement = self.directory.lookup(env.to);
        if placement.shard == self.id {
            match self.activate(env.to) {
                Some(index) => self.accept_into(index, env),
                None => self.drop_envelope(env),
            }
        } else if env.route_epoch > placement.epoch {
            self.pending
                .entry(env.to)
                .or_default()
                .push(Packet::Message(env));
        } else {
            self.forward(placement, Packet::Message(env));
        }
    }

    fn forward(&mut self, placement: Placement, packet: Packet<M>) {
        let packet = match packet {
            Packet::Message(mut env) => {
                env.route_epoch = placement.epoch;
                self.report.forwarded += 1;
                Packet::Message(env)
            }
            other => other,
        };
        self.staging[placement.shard.index()].push_back(packet);
    }

    #[inline]
    fn accept_into(&mut self, index: u32, env: Envelope<M>) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("indexed actors are in their slot outside their own turn");
        let accepted = slot.accept(env, self.now_ns, &mut self.arrivals);
        if accepted > 0 && !slot.queued && slot.blocked.is_empty() {
            self.enqueue_run(index);
        }
    }

    #[inline]
    fn enqueue_run(&mut self, index: u32) {
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("enqueue of an empty slot");
        debug_assert!(!slot.queued && !slot.mailbox.is_empty());
        let head = slot
            .mailbox
            .front()
            .expect("runnable actors have a message");
        let key = self.policy.key(&head.sched, head.arrival, self.now_ns);
        slot.queued = true;
        self.run_queue
            .push(key, index, self.generations[index as usize]);
    }

    // ---- actor table -----------------------------------------------------------

    fn insert(&mut self, slot: Box<Slot<M>>) -> u32 {
        let id = slot.id;
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        self.generations[index as usize] = self.generations[index as usize].wrapping_add(1);
        self.slots[index as usize] = Some(slot);
        let previous = self.index.insert(id, index);
        assert!(previous.is_none(), "{id} active twice on {}", self.id);
        index
    }

    fn remove(&mut self, id: ActorId) -> Option<Box<Slot<M>>> {
        let index = self.index.remove(&id)?;
        let mut slot = self.slots[index as usize]
            .take()
            .expect("indexed slot present");
        self.generations[index as usize] = self.generations[index as usize].wrapping_add(1);
        self.free.push(index);
        slot.queued = false;
        Some(slot)
    }

    /// Activate `id` from its saved state; `None` if the factory or the decoding
    /// panicked (the actor has failed then).
    fn activate(&mut self, id: ActorId) -> Option<u32> {
        let store = &self.store;
        let factory = &self.factory;
        let made = catch_unwind(AssertUnwindSafe(|| {
            let saved = store.take(id).map(|bytes| {
                crate::actor::decode_state::<Saved>(&bytes)
                    .unwrap_or_else(|error| panic!("saved state of {id} is corrupt: {error}"))
            });
            let (state, in_seq, out_seq) = match saved {
                Some(saved) => (saved.state, saved.in_seq, saved.out_seq),
                None => (None, Vec::new(), Vec::new()),
            };
            let actor = factory.activate(id, state.as_deref());
            (actor, in_seq, out_seq)
        }));
        match made {
            Ok((actor, in_seq, out_seq)) => {
                let mut slot = Slot::new(id, Some(actor), self.now_ns);
                slot.in_seq = in_seq.into_iter().collect();
                slot.out_seq = out_seq.into_iter().collect();
                self.report.activations += 1;
                Some(self.insert(slot))
            }
            Err(payload) => {
                self.record_failure(id, panic_message(payload.as_ref()));
                None
            }
        }
    }

    /// Deactivate every actor idle for longer than the timeout; returns how many.
    pub fn deactivate_idle(&mut self) -> usize {
        let Some(timeout_ns) = self.config.idle_timeout_ns else {
            return 0;
        };
        let now_ns = self.clock.now_ns();
        self.deactivate_if(|_, last_active_ns| now_ns.saturating_sub(last_active_ns) >= timeout_ns)
    }

    /// Deactivate every idle, willing actor for which `pick(id,
    /// last_active_ns)` holds; returns how many.
    pub fn deactivate_if(&mut self, pick: impl Fn(ActorId, u64) -> bool) -> usize {
        let idle: Vec<ActorId> = self
            .index
            .iter()
            .filter_map(|(&id, &index)| {
                let slot = self.slots[index as usize].as_ref()?;
                let willing = slot.actor.as_ref().is_some_and(|a| a.may_deactivate());
                (slot.is_idle() && willing && pick(id, slot.last_active_ns)).then_some(id)
            })
            .collect();
        for &id in &idle {
            self.deactivate(id);
        }
        idle.len()
    }

    fn deactivate(&mut self, id: ActorId) {
        let mut slot = self.remove(id).expect("deactivating an active actor");
        let actor = slot.actor.as_mut();
        let state = match catch_unwind(AssertUnwindSafe(|| actor.and_then(|a| a.snapshot()))) {
            Ok(state) => state.map(|s| s.to_vec()),
            Err(payload) => {
                self.record_failure(id, panic_message(payload.as_ref()));
                self.release(slot);
                return;
            }
        };
        let saved = Saved {
            state,
            in_seq: slot.in_seq.iter().copied().collect(),
            out_seq: slot.out_seq.iter().copied().collect(),
        };
        self.store
            .put(id, crate::actor::encode_state(&saved).to_vec());
        self.report.deactivations += 1;
    }

    // ---- migration -------------------------------------------------------------

    /// Move `actor` to `to`, or pass the request on towards the actor's owner.
    pub fn route_migrate(&mut self, actor: ActorId, to: ShardId) {
        if self.refuses(actor) {
            return;
        }
        if self.index.contains_key(&actor) {
            self.migrate_out(actor, to);
            return;
        }
        let placement = self.directory.lookup(actor);
        if placement.shard == self.id && !self.local.contains(&to.0) {
            // Deactivated here, going to another node: a state saved in
            // this node's store moves with the actor, which is activated
            // from it to move as an active actor does (and stays active
            // here if the move is refused). With nothing saved (never
            // activated here), only the name moves,
            // below, as within a node.
            if let Some(saved) = self.store.take(actor) {
                self.store.put(actor, saved);
                if self.activate(actor).is_some() {
                    self.migrate_out(actor, to);
                }
                return;
            }
        }
        if placement.shard != self.id {
            if let Some(waiting) = self.pending.get_mut(&actor) {
                waiting.push(Packet::Migrate { actor, to });
            } else {
                self.forward(placement, Packet::Migrate { actor, to });
            }
        } else if to != self.id {
            // Owned here but deactivated: the state is in the store, move the name.
            let placement = Placement {
                shard: to,
                epoch: placement.epoch + 1,
            };
            self.directory.apply(actor, placement);
            self.broadcast_placement(actor, placement, None);
            self.report.migrations_out += 1;
        }
    }

    fn migrate_out(&mut self, actor: ActorId, to: ShardId) {
        if to == self.id {
            return;
        }
        if !self.local.contains(&to.0) {
            self.migrate_to_node(actor, to);
            return;
        }
        let mut slot = self.remove(actor).expect("migrating an active actor");
        slot.pause_from_ns = Some(slot.last_handled_ns);
        slot.handed_off_ns = self.now_ns;
        // The first part of the pause: idle at the old owner, from the end of the
        // actor's last turn to the handoff.
        let idle_ns = self.now_ns.saturating_sub(slot.last_handled_ns);
        record_us(&mut self.report.migration_idle_before_us, idle_ns, 1);
        let placement = Placement {
            shard: to,
            epoch: self.directory.lookup(actor).epoch + 1,
        };
        self.directory.apply(actor, placement);
        self.staging[to.index()].push_back(Packet::Handoff(slot, placement.epoch));
        self.broadcast_placement(actor, placement, Some(to));
        self.report.migrations_out += 1;
        // Local senders blocked on its full mailbox now send remotely, with credits.
        if self.waiters.contains_key(&actor) {
            self.wake_waiters(actor);
        }
    }

    /// Move an active actor to a shard of another node: snapshot it and
    /// send what its slot holds by value. Refused (counted in
    /// `migrations_refused`) while the actor says it may not be
    /// deactivated (its snapshot would not hold all it needs), or while
    /// what it holds may be too much to cross: over
    /// `REMOTE_HANDOFF_MESSAGES_MAX` messages, over
    /// `REMOTE_HANDOFF_CHANNELS_MAX` channel-table entries, or a snapshot
    /// over `REMOTE_HANDOFF_STATE_BYTES_MAX`.
    fn migrate_to_node(&mut self, actor: ActorId, to: ShardId) {
        let movable = self
            .index
            .get(&actor)
            .and_then(|&i| self.slots[i as usize].as_ref())
            .is_some_and(|slot| {
                slot.actor.as_ref().is_some_and(|a| a.may_deactivate())
                    && slot.mailbox.len() + slot.early + slot.blocked.len()
                        <= REMOTE_HANDOFF_MESSAGES_MAX
                    && slot.in_seq.len() + slot.out_seq.len() <= REMOTE_HANDOFF_CHANNELS_MAX
            });
        if !movable {
            self.report.migrations_refused += 1;
            return;
        }
        let mut slot = self.remove(actor).expect("migrating an active actor");
        let object = slot.actor.as_mut();
        let state = match catch_unwind(AssertUnwindSafe(|| object.and_then(|a| a.snapshot()))) {
            Ok(state) => state.map(|s| s.to_vec()),
            Err(payload) => {
                self.record_failure(actor, panic_message(payload.as_ref()));
                self.release(slot);
                return;
            }
        };
        if state
            .as_ref()
            .is_some_and(|s| s.len() > REMOTE_HANDOFF_STATE_BYTES_MAX)
        {
            // Too large to cross with room to spare: it stays, as
            // it was (a snapshot has no effect on the actor).
            self.report.migrations_refused += 1;
            let index = self.insert(slot);
            if let Some(slot) = self.slots[index as usize].as_ref() {
                if !slot.mailbox.is_empty() && slot.blocked.is_empty() {
                    self.enqueue_run(index);
                }
            }
            return;
        }
        let placement = Placement {
            shard: to,
            epoch: self.directory.lookup(actor).epoch + 1,
        };
        let mut early = Vec::with_capacity(slot.early);
        for (_, waiting) in std::mem::take(&mut slot.reorder) {
            early.extend(waiting.into_values());
        }
        let moving = RemoteSlot {
            id: actor,
            epoch: placement.epoch,
            state,
            in_seq: slot.in_seq.iter().copied().collect(),
            out_seq: slot.out_seq.iter().copied().collect(),
            mailbox: slot
                .mailbox
                .drain(..)
                .map(|q| (q.sched, q.credit_shard, q.message))
                .collect(),
            early,
            blocked: slot.blocked.drain(..).collect(),
        };
        self.directory.apply(actor, placement);
        self.staging[to.index()].push_back(Packet::RemoteHandoff(Box::new(moving)));
        self.broadcast_placement(actor, placement, Some(to));
        self.report.migrations_out += 1;
        if self.waiters.contains_key(&actor) {
            self.wake_waiters(actor);
        }
    }

    /// An actor moving in from another node: rebuilt by the factory from
    /// its state, with its mailbox, early arrivals and blocked sends.
    fn install_remote(&mut self, moving: RemoteSlot<M>) {
        let RemoteSlot {
            id,
            epoch,
            state,
            in_seq,
            out_seq,
            mailbox,
            early,
            blocked,
        } = moving;
        let mut slot = Slot::new(id, None, self.now_ns);
        slot.in_seq = in_seq.into_iter().collect();
        slot.out_seq = out_seq.into_iter().collect();
        for (sched, credit_shard, message) in mailbox {
            self.arrivals += 1;
            if credit_shard == SELF_SEND {
                slot.self_pending += 1;
            }
            slot.mailbox.push_back(Queued {
                sched,
                enqueued_ns: self.now_ns,
                arrival: self.arrivals,
                credit_shard,
                message,
            });
        }
        for env in early {
            slot.early += 1;
            slot.reorder
                .entry(env.from)
                .or_default()
                .insert(env.seq, env);
        }
        slot.blocked = blocked.into();
        if self.refuses(id) {
            self.release(slot);
            self.reroute_pending(id);
            return;
        }
        let factory = &self.factory;
        match catch_unwind(AssertUnwindSafe(|| factory.activate(id, state.as_deref()))) {
            Ok(actor) => {
                slot.actor = Some(actor);
                self.report.activations += 1;
                self.report.migrations_in_from_nodes += 1;
                self.install(slot, epoch);
            }
            Err(payload) => {
                self.record_failure(id, panic_message(payload.as_ref()));
                // Its place is here now; its messages, and those that
                // waited here for it, will never be handled: dropped,
                // their credits returned.
                self.directory.apply(
                    id,
                    Placement {
                        shard: self.id,
                        epoch,
                    },
                );
                self.release(slot);
                self.reroute_pending(id);
            }
        }
    }

    /// An actor lost on its way in from another node: its place is here
    /// now, as a failed actor, so that what is sent to it (and what
    /// waited here for it) is dropped with its credits returned, and a
    /// later move of it goes nowhere. The messages it held are counted
    /// dropped and their credits (`(shard, messages)`) go back whatever
    /// else holds; the place is taken only for a newer epoch, of an actor
    /// not active here, of a job not retired.
    fn lost_remote(
        &mut self,
        actor: ActorId,
        epoch: u64,
        credits: Vec<(u16, u32)>,
        uncredited: u32,
    ) {
        self.report.dropped += u64::from(uncredited);
        for (shard, messages) in credits {
            self.report.dropped += u64::from(messages);
            if credit_index(shard).is_some() && usize::from(shard) < self.staging.len() {
                self.return_credits(actor, shard, messages);
            }
        }
        if self.retired.contains(&actor.job) || self.index.contains_key(&actor) {
            return;
        }
        let placement = Placement {
            shard: self.id,
            epoch,
        };
        if !self.directory.apply(actor, placement) {
            return;
        }
        if !self.refuses(actor) {
            self.record_failure(
                actor,
                format!(
                    "{actor} was lost moving to {}: its move could not cross",
                    self.id
                ),
            );
        }
        if self.waiters.contains_key(&actor) {
            self.wake_waiters(actor);
        }
        self.reroute_pending(actor);
    }

    fn broadcast_placement(&mut self, actor: ActorId, placement: Placement, skip: Option<ShardId>) {
        for shard in 0..self.staging.len() {
            if shard == self.id.index() || Some(ShardId(shard as u16)) == skip {
                continue;
            }
            self.staging[shard].push_back(Packet::Placement { actor, placement });
        }
    }

    fn install(&mut self, mut slot: Box<Slot<M>>, epoch: u64) {
        let id = slot.id;
        // A move from another node has no handoff time on this clock.
        if slot.handed_off_ns != 0 {
            let transfer_ns = self.clock.now_ns().saturating_sub(slot.handed_off_ns);
            record_us(&mut self.report.migration_transfer_us, transfer_ns, 1);
        }
        self.directory.apply(
            id,
            Placement {
                shard: self.id,
                epoch,
            },
        );
        debug_assert!(slot.actor.is_some(), "only active actors are handed off");
        let blocked = std::mem::take(&mut slot.blocked);
        let index = self.insert(slot);
        self.report.migrations_in += 1;
        let mut slot = self.slots[index as usize].take().expect("just inserted");
        for send in blocked {
            self.send_from(&mut slot, send);
        }
        let runnable = !slot.mailbox.is_empty() && slot.blocked.is_empty();
        self.slots[index as usize] = Some(slot);
        if runnable {
            self.enqueue_run(index);
        }
        self.reroute_pending(id);
    }

    fn reroute_pending(&mut self, actor: ActorId) {
        let Some(waiting) = self.pending.remove(&actor) else {
            return;
        };
        for packet in waiting {
            match packet {
                Packet::Message(env) => self.deliver(env),
                Packet::Migrate { actor, to } => self.route_migrate(actor, to),
                other => self.receive(other),
            }
        }
    }

    // ---- failures and retired jobs ----------------------------------------------

    /// Whether messages to `actor` are dropped here: it failed here or its job retired.
    #[inline]
    fn refuses(&self, actor: ActorId) -> bool {
        (!self.retired.is_empty() && self.retired.contains(&actor.job))
            || (!self.failed.is_empty() && self.failed.contains(&actor))
    }

    /// Drop a message that will never be handled, returning the credit it holds.
    fn drop_envelope(&mut self, env: Envelope<M>) {
        self.report.dropped += 1;
        if credit_index(env.credit_shard).is_some() {
            self.return_credits(env.to, env.credit_shard, 1);
        }
    }

    /// Acknowledge `messages` sent to `actor` by `shard` without handling them.
    fn return_credits(&mut self, actor: ActorId, shard: u16, messages: u32) {
        if shard == self.id.0 {
            self.on_ack(actor, messages);
            return;
        }
        let staging = &mut self.staging[shard as usize];
        if let Some(Packet::Ack {
            actor: last,
            messages: count,
        }) = staging.back_mut()
        {
            if *last == actor {
                *count += messages;
                return;
            }
        }
        staging.push_back(Packet::Ack { actor, messages });
    }

    /// Drop a removed actor with everything it holds: the credits of its queued
    /// and early messages go back to their senders, its blocked sends are dropped,
    /// and local senders waiting on it retry (and find it gone).
    fn release(&mut self, mut slot: Box<Slot<M>>) {
        let id = slot.id;
        let mut credits = vec![0u32; self.staging.len()];
        let mut dropped = 0u64;
        for queued in slot.mailbox.drain(..) {
            dropped += 1;
            if let Some(shard) = credit_index(queued.credit_shard) {
                credits[shard] += 1;
            }
        }
        for (_, early) in std::mem::take(&mut slot.reorder) {
            for env in early.into_values() {
                dropped += 1;
                if let Some(shard) = credit_index(env.credit_shard) {
                    credits[shard] += 1;
                }
            }
        }
        self.report.dropped += dropped;
        for (shard, messages) in credits.into_iter().enumerate() {
            if messages > 0 {
                self.return_credits(id, shard as u16, messages);
            }
        }
        drop(slot);
        if self.waiters.contains_key(&id) {
            self.wake_waiters(id);
        }
    }

    /// Remove an actor that panicked during its turn.
    fn fail_actor(&mut self, id: ActorId, message: String) {
        let slot = self.remove(id).expect("a failing actor is in its slot");
        // Recorded first, so that senders woken by the release find it failed.
        self.record_failure(id, message);
        self.release(slot);
    }

    /// Remember a failed actor and tell the hook.
    fn record_failure(&mut self, id: ActorId, message: String) {
        self.report.failures += 1;
        self.failed.insert(id);
        if self.failed.len() > FAILED_ACTORS_MAX {
            self.failed.pop_first();
        }
        if let Some(hook) = &self.on_failure {
            hook(Failure {
                actor: Some(id),
                shard: self.id,
                message,
            });
        }
    }

    /// Drop every trace of `job` on this shard, and its later messages.
    pub fn retire_job(&mut self, job: JobId) {
        if job == ActorId::injector(self.id).job || !self.retired.insert(job) {
            return;
        }
        if self.retired.len() > RETIRED_JOBS_MAX {
            // The oldest other than this one (a long job may outlive many).
            let oldest = self.retired.iter().copied().find(|&j| j != job);
            if let Some(oldest) = oldest {
                self.retired.remove(&oldest);
            }
        }
        self.report.jobs_retired += 1;
        self.policy.forget(job);
        self.retired_stats.push_back(job);
        if self.retired_stats.len() > RETIRED_JOB_STATS_MAX {
            let oldest = self.retired_stats.pop_front().expect("over the bound");
            self.jobs.remove(oldest);
        }
        let actors: Vec<ActorId> = self
            .index
            .keys()
            .filter(|a| a.job == job)
            .copied()
            .collect();
        for actor in actors {
            let slot = self.remove(actor).expect("indexed");
            self.release(slot);
        }
        self.store.remove_job(job);
        self.failed.retain(|a| a.job != job);
        self.pending.retain(|a, _| a.job != job);
        self.credits.retain(|a| a.job != job);
        self.waiters.retain(|target, senders| {
            senders.retain(|s| s.job != job);
            target.job != job && !senders.is_empty()
        });
        self.timers.retain(|t| t.send.to.job != job);
        self.timer_counts.retain(|a, _| a.job != job);
        self.directory.forget_job(job);
        let is_other = |a: &ActorId| a.job != job;
        for slot in self.slots.iter_mut().flatten() {
            slot.in_seq.retain(is_other);
            slot.out_seq.retain(is_other);
        }
        // The injector talks to every job: forget the job's channels and sends.
        let mut injector = self.injector.take().expect("the injector is home");
        injector.out_seq.retain(is_other);
        let before = injector.blocked.len();
        injector.blocked.retain(|send| send.to.job != job);
        self.report.dropped += (before - injector.blocked.len()) as u64;
        self.retry_blocked(&mut injector);
        self.injector = Some(injector);
    }

    // ---- reporting -------------------------------------------------------------

    pub fn report(&self) -> ShardReport {
        let mut report = self.report.clone();
        report.at_ns = self.clock.now_ns();
        report.actors = self
            .index
            .values()
            .filter_map(|&index| self.slots[index as usize].as_ref())
            .map(|slot| ActorReport {
                id: slot.id,
                mailbox: slot.mailbox.len(),
                early: slot.early,
                blocked: slot.blocked.len(),
                counters: slot.counters.clone(),
            })
            .collect();
        report.actors.sort_by_key(|a| a.id);
        report.jobs = self.jobs.report();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TURN: u64 = 200_000;

    #[test]
    fn the_clock_is_read_again_sooner_after_fast_messages_than_sixteen_later() {
        // After one fast message, one more before the next reading; then 2, 4,
        // 8 and 16 at most, however fast they were.
        assert_eq!(clock_gap(1, 100, TURN, 0), 1);
        assert_eq!(clock_gap(2, 200, TURN, 0), 2);
        assert_eq!(clock_gap(4, 400, TURN, 0), 4);
        assert_eq!(clock_gap(16, 1_600, TURN, 0), TURN_CLOCK_EVERY);
        assert_eq!(clock_gap(64, 6_400, TURN, 0), TURN_CLOCK_EVERY);
    }

    #[test]
    fn an_actor_whose_messages_were_slow_reads_the_clock_after_each() {
        // A fast first message (a watermark) of an actor whose batches took
        // 150 µs in its last turns: one message until the next reading.
        assert_eq!(clock_gap(1, 100, TURN, 150_000), 1);
        assert_eq!(clock_gap(8, 800, TURN, 150_000), 1);
        // Without that memory, eight more would have fit.
        assert_eq!(clock_gap(8, 800, TURN, 0), 8);
        // At its own pace: what fits in what is left of the turn.
        assert_eq!(clock_gap(4, 40_000, TURN, 0), 4);
        assert_eq!(clock_gap(4, 120_000, TURN, 0), 2);
        assert_eq!(clock_gap(4, 40_000, TURN, 50_000), 3);
        // Past the turn: still at least one (the caller stops the turn).
        assert_eq!(clock_gap(4, 300_000, TURN, 0), 1);
        // A clock that did not move (the manual clock of tests): no pace
        // known, the doubling alone bounds the gap.
        assert_eq!(clock_gap(4, 0, TURN, 0), 4);
        assert_eq!(clock_gap(32, 0, TURN, 0), TURN_CLOCK_EVERY);
    }

    #[test]
    fn an_actors_message_cost_rises_at_once_and_eases_down() {
        assert_eq!(ease_message_ns(0, 150_000), 150_000, "up at once");
        assert_eq!(ease_message_ns(100_000, 150_000), 150_000);
        // Down an eighth of the way a turn: after one turn of watermarks
        // it still counts its messages as slow.
        assert_eq!(ease_message_ns(160_000, 0), 140_000);
        let mut cost = 160_000;
        let mut turns = 0;
        while cost > 16_000 {
            cost = ease_message_ns(cost, 0);
            turns += 1;
        }
        assert_eq!(turns, 18, "a tenth of it after 18 turns of tiny messages");
        assert_eq!(ease_message_ns(7, 0), 7, "never below by rounding down");
    }
}
