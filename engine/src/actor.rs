//! The virtual actor programming model: the `Actor` trait, the `Context` an actor
//! sees during a turn, the scheduling context every message carries, and the
//! factory that activates an actor from its saved state.
//!
//! Handlers are synchronous: a turn runs a bounded number of `handle` calls back to
//! back with no future, no allocation and no atomics on the way (the design that
//! lets one core move tens of millions of messages a second). Sends made during a
//! handler are collected in the context and admitted by the shard after the handler
//! returns; a send that finds no credit (the target is full) parks the *sender*: it
//! does not run again until its pending sends have gone out. That is how a slow
//! actor makes its senders wait without a single message being dropped.

use crate::ids::{ActorId, JobId, ShardId};

/// Scheduling context of a message: which job it belongs to, when it must be done
/// and when the input that caused it entered the system (all in `clock` ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SchedCtx {
    pub job: JobId,
    pub deadline_ns: u64,
    pub origin_ns: u64,
}

/// An actor's state, encoded with rkyv (aligned so it can be read in place).
pub type StateBytes = rkyv::util::AlignedVec;

/// A virtual actor. It always exists logically; the runtime activates it on its
/// first message (through an `ActorFactory`), runs its messages one at a time, and
/// deactivates it after it has been idle, keeping what `snapshot` returned.
pub trait Actor: Send + 'static {
    type Message: Send + 'static;

    /// Handle one message. Sends go through `ctx`; they are delivered in order per
    /// (sender, target) pair wherever either actor lives or moves.
    fn handle(&mut self, message: Self::Message, ctx: &mut Context<'_, Self::Message>);

    /// The state to keep while the actor is deactivated; `None` for an actor
    /// that keeps nothing between messages. Required: an actor that forgot it
    /// would lose its state silently at its first idle deactivation.
    fn snapshot(&mut self) -> Option<StateBytes>;

    /// Whether the actor may be deactivated now, i.e. whether `snapshot` holds all
    /// it needs to resume. An actor with state it cannot snapshot yet (an operator
    /// mid-job) says no and stays active however long it idles.
    fn may_deactivate(&self) -> bool {
        true
    }
}

/// A boxed actor of the runtime's message type.
pub type BoxActor<M> = Box<dyn Actor<Message = M>>;

/// Makes actors: called on activation with the state saved at the last deactivation.
pub trait ActorFactory<M>: Send + Sync + 'static {
    fn activate(&self, id: ActorId, state: Option<&[u8]>) -> BoxActor<M>;
}

impl<M, F> ActorFactory<M> for F
where
    F: Fn(ActorId, Option<&[u8]>) -> BoxActor<M> + Send + Sync + 'static,
{
    fn activate(&self, id: ActorId, state: Option<&[u8]>) -> BoxActor<M> {
        self(id, state)
    }
}

/// A send waiting to be admitted by the shard.
pub struct Outgoing<M> {
    pub to: ActorId,
    pub sched: SchedCtx,
    pub message: M,
    /// Deliver no earlier than this clock time (0: now).
    pub due_ns: u64,
    /// Admitted without credit (`Context::send_uncredited`).
    pub uncredited: bool,
}

/// What an actor may do during its turn.
pub struct Context<'a, M> {
    pub(crate) me: ActorId,
    pub(crate) shard: ShardId,
    pub(crate) now_ns: u64,
    pub(crate) clock: &'a crate::clock::Clock,
    pub(crate) sched: SchedCtx,
    pub(crate) out: &'a mut Vec<Outgoing<M>>,
    /// Messages to an actor that its shard has not handled yet, as this
    /// shard sees them (see `backlog`).
    pub(crate) backlog: &'a dyn Fn(ActorId) -> u32,
}

impl<M> Context<'_, M> {
    /// The actor being run.
    pub fn me(&self) -> ActorId {
        self.me
    }

    /// The shard the actor runs on now (it may move between turns).
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The shard clock, read at the start of this turn.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// The shard clock, read now (the simulator's manual clock under test): the
    /// only way an actor should tell time, so that whole dataflows run simulated.
    pub fn clock_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// How far behind `to` is, as this shard sees it: for an actor here,
    /// the messages in its mailbox; for one elsewhere, the messages this
    /// shard sent it that it has not acknowledged yet (its credit in use).
    /// Sends of the running handler are not counted yet. A cheap load signal
    /// for choosing among equivalent targets.
    pub fn backlog(&self, to: ActorId) -> u32 {
        (self.backlog)(to)
    }

    /// Scheduling context of the message being handled.
    pub fn sched(&self) -> SchedCtx {
        self.sched
    }

    /// Send `message` to `to`, inheriting the deadline of the message being handled.
    pub fn send(&mut self, to: ActorId, message: M) {
        let sched = self.sched;
        self.out.push(Outgoing {
            to,
            sched,
            message,
            due_ns: 0,
            uncredited: false,
        });
    }

    /// Send with an explicit scheduling context (a source stamping a new deadline,
    /// or an operator refining it).
    pub fn send_with(&mut self, to: ActorId, message: M, sched: SchedCtx) {
        self.out.push(Outgoing {
            to,
            sched,
            message,
            due_ns: 0,
            uncredited: false,
        });
    }

    /// A timer: `message` comes back to this actor (wherever it lives then) once the
    /// shard clock reaches `due_ns`. Timers fire in due order; a shard with only
    /// timers pending sleeps until the first one is due.
    pub fn send_self_at(&mut self, due_ns: u64, message: M, sched: SchedCtx) {
        self.out.push(Outgoing {
            to: self.me,
            sched,
            message,
            due_ns: due_ns.max(1),
            uncredited: false,
        });
    }

    /// Send without taking credit: the target's mailbox may go past its
    /// bound by this message. Only for messages an actor sends rarely and
    /// boundedly, between actors that may wait for each other, so that
    /// credits cannot form a cycle (a reroute's handoffs between partitions
    /// of one stage: each may be blocked on the other's full mailbox). It
    /// still leaves after the sender's earlier sends.
    pub fn send_uncredited(&mut self, to: ActorId, message: M, sched: SchedCtx) {
        self.out.push(Outgoing {
            to,
            sched,
            message,
            due_ns: 0,
            uncredited: true,
        });
    }
}

/// Encode a value as actor state.
pub fn encode_state<T>(value: &T) -> StateBytes
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rkyv::rancor::Error>(value)
        .expect("encoding actor state into memory cannot fail")
}

/// Decode actor state saved by `encode_state`, validating it first.
pub fn decode_state<T>(bytes: &[u8]) -> Result<T, rkyv::rancor::Error>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned)
}
