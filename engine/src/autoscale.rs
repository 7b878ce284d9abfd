//! The autoscaler's model: every step (50 ms by default) it **measures** each
//! actor's busy time, input rate and queueing delay over the last interval,
//! **computes** what each operator needs and where each shard stands, **acts**
//! on it, and **records** every decision with its reason and the figures
//! behind it.
//!
//! This module is the pure model: [`Autoscaler::step`] takes a [`Sample`] and
//! returns [`Decision`]s, with no clock, thread or runtime of its own, so the
//! same code runs in the engine ([`crate::dataflow::Dataflow`] drives it from
//! the runtime's accounting) and on recorded or synthetic load traces in tests,
//! deterministically, with any number of shards.
//!
//! # Measure
//!
//! For an actor over an interval of `elapsed` ns (between two reports of it):
//! `busy = cpu_ns / elapsed` (the fraction of a core it used), `rate =
//! messages / elapsed`, and its true
//! processing rate `rate / busy` (what it would handle with a core to itself,
//! as in DS2). In a running engine an actor's CPU time includes its share
//! of its shard's own time (rings, delivery, flushes), in proportion to
//! its turns' time, so that the busy fractions of a shard's actors add up
//! to the time the shard was not idle, each at most doubled
//! (`dataflow::scaling`). A shard's
//! load is the sum of its actors' busy fractions. An
//! actor is *late* when its queueing delay (p99 over the interval) ate more
//! than [`AutoscaleConfig::late_slack_fraction`] of its job's SLO.
//!
//! # Compute
//!
//! An operator (job and stage) needs `ceil(sum of its activations' busy /
//! target_load)` activations, in one step. A shard is *overloaded* when its
//! load is over [`AutoscaleConfig::high_load`], or over
//! [`AutoscaleConfig::late_load`] with a late actor on it (a queue that eats
//! the SLO is answered on a shard with room left too). A scale out marks both
//! its shards: neither is drained nor drained into for
//! [`AutoscaleConfig::repack_steps`] (a job spread because it was late is not
//! packed back a second later).
//!
//! # Act, cheapest first
//!
//! Moving an activation to another shard is the cheapest action (a migration
//! pauses one actor for microseconds). A shard at
//! [`AutoscaleConfig::saturated_load`] beside an idle shard gives it half of
//! each stage's movable actors at once: a saturated actor's busy time is what
//! it got, not what it needs, so moves by measured load would take a step
//! per actor (a job started small on one shard is sized in one step). While some shard is overloaded, the
//! model moves an actor from the most loaded shard to the least loaded one
//! that had room (under the target load) at the last step too. Of the actors
//! whose busy fraction lowers the higher of the two loads by at least
//! [`AutoscaleConfig::min_gain`], it takes one that brings both shards under
//! the high mark if there is one; among those, the one of the job with the
//! most slack (the largest SLO: a migration's pause costs it least); then the
//! one that evens the two shards best. The job with the tightest SLO on a
//! shard it shares with looser ones is moved only if its own actor is late:
//! a co-tenant's overload is the co-tenant's to move. It repeats on the loads
//! it expects after its moves, up to [`AutoscaleConfig::moves_per_step_max`],
//! so one step answers a load step in full. An overloaded shard whose work cannot be spread by moving (one
//! actor needs more than the room left anywhere) gets a split: its busiest
//! actor of a splittable stage ([`JobSample::splittable`]) gives half its
//! key groups to a partition of the same stage on the least loaded shard
//! that can take half its load ([`Action::Split`]); if no partition of the
//! stage is on such a shard, the lightest one moves to the shard with the
//! most room first. Over nodes, a shard that nothing here can relieve
//! spills: one actor of a keyed stage ([`JobSample::crossable`]) moves to
//! another node's shard with room ([`Sample::remote`]; see
//! `Autoscaler::spill`). Only a shard that nothing can split or spill is
//! recorded with the activations its operators need.
//!
//! # Scale in, lazily
//!
//! When no shard is over the target load or late, and nothing moved this
//! step, a shard whose
//! load stayed under [`AutoscaleConfig::low_load`] for
//! [`AutoscaleConfig::scale_in_steps`] steps in a row is drained: each of its
//! actors goes to the fullest other shard that already runs actors and stays
//! under [`AutoscaleConfig::packed_load`] with it. It drains only if every
//! one of its actors fits somewhere (a half-drained shard frees no core), and
//! only if none of them is fixed, cooling or late. The shard it leaves
//! empty parks, and is the room the next scale-out moves into. Scale out is
//! immediate and scale in waits a second, and the packed load stays under
//! the target (which is under the high mark): a drain's load alone never
//! sets off a scale out. If the packed shard's queues then run late, it is
//! spread again and kept out of drains for `repack_steps`.
//!
//! A split is merged back ([`Action::Merge`]) once the engine has been calm
//! (no shard over the target load or late) for `scale_in_steps`, nothing
//! else moved this step, and the split is `repack_steps` old, if the old
//! owner's shard stays under `packed_load` with the other partition's load;
//! the newest split first, one a step.
//!
//! # Scale to zero
//!
//! A scalable job that has had input, has not ended, and took no record for
//! [`AutoscaleConfig::zero_steps`] steps in a row is scaled to zero
//! ([`Action::ScaleToZero`]): the engine deactivates its idle actors now,
//! their state saved, rather than when each shard's idle timeout comes. It is
//! decided once; when records come in again the model records a
//! [`Action::Wake`] (the runtime activates each actor, with its state, on its
//! next message). Any record in resets the count, so a thin trickle keeps a
//! job up. The engine steps the model with no actor figures while no record
//! enters any job ([`Autoscaler::idle_step`]): an idle engine is not woken
//! to be measured.
//!
//! # Stability
//!
//! - Nothing moves unless a shard is overloaded; a move must lower the higher
//!   load by `min_gain` and leave its destination under the high mark (or go
//!   to a nearly idle shard, under `1 - high_load`), a destination that had
//!   room at the last step too: balanced or lightly loaded shards never trade
//!   actors back and forth over noise, and saturated ones (a job at full
//!   speed fills every core it is given) never trade an overload.
//! - An actor just moved stays put for [`AutoscaleConfig::cooldown_steps`]
//!   steps, the time its new shard's figures take to show it.
//! - Dead shards are never a destination; jobs with scaling off are never
//!   touched.

use std::collections::BTreeMap;
use std::fmt;

use crate::ids::{ActorId, JobId, ShardId};

/// A split of steps out, to be judged: its step, its job's records in per
/// measured step before it, its job's records in at it, and the job's
/// measured steps then (`Rates`).
type Unchained = (u64, f64, u64, u64);

/// A job's input as the placement steps measure it: records in at the last
/// one, per step over the last `RATE_STEPS`, and how many steps measured
/// it (idle steps, which measure nothing, are not counted).
type Rates = (u64, std::collections::VecDeque<u64>, u64);

/// Steps over which a job's input rate before a split of steps out is
/// taken (`Autoscaler::check_unchained`).
const RATE_STEPS: usize = 4;

/// The model's knobs. The defaults suit 50 ms steps.
#[derive(Clone, Debug)]
pub struct AutoscaleConfig {
    /// A shard over this load is overloaded.
    pub high_load: f64,
    /// A shard at this load is saturated: beside an idle shard, it gives
    /// half of each stage's actors at once.
    pub saturated_load: f64,
    /// What placement aims for; operators are sized to it.
    pub target_load: f64,
    /// A shard over this load with a late actor is overloaded too: a
    /// queue that eats the SLO is answered even on a shard with room left.
    pub late_load: f64,
    /// Steps after a scale out during which neither of its two shards is
    /// drained or drained into: a job spread because it was late is not
    /// packed back a second later.
    pub repack_steps: u64,
    /// A move must lower the higher of the two shards' loads by this much.
    pub min_gain: f64,
    /// Steps an actor stays where a move put it.
    pub cooldown_steps: u64,
    /// Moves in one step, at most.
    pub moves_per_step_max: usize,
    /// An actor whose queueing delay took more than this fraction of its
    /// job's SLO is late.
    pub late_slack_fraction: f64,
    /// Actors busy less than this are left where they are (moving them gains
    /// nothing measurable), except when their shard is drained.
    pub min_busy: f64,
    /// A shard under this load is cold; cold for `scale_in_steps` in a row,
    /// it is drained into the others.
    pub low_load: f64,
    /// Steps a shard stays cold before it is drained.
    pub scale_in_steps: u64,
    /// A drain fills a shard up to this load at most.
    pub packed_load: f64,
    /// Steps in a row with no record into a job (that had some before and
    /// has not ended) after which it is scaled to zero: its idle actors are
    /// deactivated, their state saved, until a message wakes them.
    pub zero_steps: u64,
    /// Over nodes: steps an actor spilled onto another node's shard counts
    /// on that shard's told load (until a figure told after it has come;
    /// the engine sets it from how often nodes tell their loads).
    pub spill_hold_steps: u64,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        AutoscaleConfig {
            high_load: 0.85,
            saturated_load: 0.9,
            target_load: 0.7,
            late_load: 0.4,
            repack_steps: 200,
            min_gain: 0.02,
            cooldown_steps: 6,
            moves_per_step_max: 8,
            late_slack_fraction: 0.5,
            min_busy: 0.01,
            low_load: 0.25,
            scale_in_steps: 20,
            packed_load: 0.6,
            zero_steps: 10,
            spill_hold_steps: 8,
        }
    }
}

/// One actor over one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorSample {
    pub id: ActorId,
    pub shard: ShardId,
    /// The interval, as its shard's clock measured it (ns).
    pub interval_ns: u64,
    /// CPU time it was handled for, in the interval.
    pub cpu_ns: u64,
    /// Messages it handled in the interval.
    pub messages: u64,
    /// Queueing delay of those messages, p99, in µs (0 if none).
    pub queue_p99_us: u64,
}

/// A job as the model needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobSample {
    pub slo_ns: u64,
    /// `false`: the job's placement is fixed (`--parallelism`, `--autoscale
    /// off` for it); it is measured but never moved.
    pub scalable: bool,
    /// Records that entered the job so far (its sources' counts; over
    /// nodes, this node's sources' and the records its stages and sinks
    /// took from other nodes).
    pub records_in: u64,
    /// Every sink has seen the end of input: the job is about to be retired.
    pub ended: bool,
    /// Bit `s` set: stage `s` is keyed with several partitions and may be
    /// rerouted.
    pub splittable: u64,
    /// Bit `s` set: stage `s` is splittable and keeps partials or no state,
    /// so it may run in parallel mode.
    pub parallelizable: u64,
    /// Bit `s` set: stage `s` has fused steps toward a relay of some
    /// partitions, and they may be split out onto it (`Action::Unchain`).
    pub unchainable: u64,
    /// Bit `s` set: stage `s` is a relay of some partitions.
    pub relays: u64,
    /// Bit `s` set: stage `s` is keyed, in a dataflow over nodes: its
    /// actors may move to another node's shard, with their state.
    pub crossable: u64,
}

/// What the runtime measured over one interval.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub shards: usize,
    /// Shards that are gone: never a destination.
    pub dead: Vec<ShardId>,
    pub actors: Vec<ActorSample>,
    pub jobs: BTreeMap<JobId, JobSample>,
    /// Over nodes: the other nodes' shards and their loads, as their own
    /// autoscalers measured them lately (none of their actors is in
    /// `actors`). Only a spill (`Autoscaler::spill`) goes to one.
    pub remote: Vec<(ShardId, f64)>,
}

/// What the model decided, and why.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Migrate `actor` from shard `from` to shard `to`: off an overloaded
    /// shard (scale out) or off a cold one being drained (scale in).
    Move {
        actor: ActorId,
        from: ShardId,
        to: ShardId,
        scale: Scale,
    },
    /// Split `actor`'s key-group range: the upper half of its groups goes to
    /// `into`, a partition of the same stage on a shard with room (an
    /// actor too busy for any shard to take whole).
    Split { actor: ActorId, into: ActorId },
    /// Undo a split once load fell: the groups `from` took from `into` in
    /// it go back.
    Merge { into: ActorId, from: ActorId },
    /// Switch a stage that keeps partials to parallel mode: each batch goes
    /// to the partition with the least backlog, whatever its keys.
    Parallel { job: JobId, stage: u32 },
    /// Back from parallel mode to the stage's table of key groups.
    Ordered { job: JobId, stage: u32 },
    /// Split the stateless steps fused into `stage` out onto its relays:
    /// each output batch goes to the relay partition with the least
    /// backlog, which runs them (a stage of fewer partitions than shards,
    /// busy with its steps, that nothing else can spread).
    Unchain { job: JobId, stage: u32 },
    /// Fuse them back into `stage` once load fell.
    Rechain { job: JobId, stage: u32 },
    /// `shard` is overloaded and no move or split can relieve it: the
    /// operators on it need these activations (job, stage, activations
    /// now, needed).
    NeedsParallelism {
        shard: ShardId,
        operators: Vec<(JobId, u32, u32, u32)>,
    },
    /// No record entered `job` for `zero_steps`: deactivate its idle actors
    /// (their state goes to the store; they cost no CPU until a message).
    ScaleToZero { job: JobId },
    /// Records enter `job` again after it was scaled to zero. Recorded only:
    /// the runtime activates each actor, with its state, on its next message.
    Wake { job: JobId },
}

/// Which way a move scales its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Spreads work off an overloaded shard.
    Out,
    /// Packs work off a cold shard, which then parks.
    In,
}

/// One decision of one step, with the figures behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub step: u64,
    pub action: Action,
    /// The loads of the shards concerned before the action, and the actor's
    /// figures for a move.
    pub reason: String,
}

impl Action {
    /// Which way an action scales its job; `None` for what only records.
    pub fn scale(&self) -> Option<Scale> {
        match self {
            Action::Move { scale, .. } => Some(*scale),
            Action::Split { .. } | Action::Parallel { .. } | Action::Unchain { .. } => {
                Some(Scale::Out)
            }
            Action::Merge { .. }
            | Action::Ordered { .. }
            | Action::Rechain { .. }
            | Action::ScaleToZero { .. } => Some(Scale::In),
            Action::NeedsParallelism { .. } | Action::Wake { .. } => None,
        }
    }

    /// Whether carrying it out reroutes a stage's key groups.
    pub fn reroutes(&self) -> bool {
        matches!(
            self,
            Action::Split { .. }
                | Action::Merge { .. }
                | Action::Parallel { .. }
                | Action::Ordered { .. }
        )
    }
}

impl Decision {
    /// The job the decision acts on, if one.
    pub fn job(&self) -> Option<JobId> {
        match &self.action {
            Action::Move { actor, .. }
            | Action::Split { actor, .. }
            | Action::Merge { into: actor, .. } => Some(actor.job),
            Action::ScaleToZero { job }
            | Action::Wake { job }
            | Action::Parallel { job, .. }
            | Action::Ordered { job, .. }
            | Action::Unchain { job, .. }
            | Action::Rechain { job, .. } => Some(*job),
            Action::NeedsParallelism { .. } => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            Action::Move {
                actor,
                from,
                to,
                scale,
            } => write!(
                f,
                "step {}: scale {}: move {actor} from {from} to {to}: {}",
                self.step,
                match scale {
                    Scale::Out => "out",
                    Scale::In => "in",
                },
                self.reason
            ),
            Action::Split { actor, into } => write!(
                f,
                "step {}: scale out: split {actor}'s key groups with partition {}: {}",
                self.step, into.partition, self.reason
            ),
            Action::Merge { into, from } => write!(
                f,
                "step {}: scale in: merge back into {into} the key groups partition {} took: {}",
                self.step, from.partition, self.reason
            ),
            Action::Parallel { job, stage } => write!(
                f,
                "step {}: scale out: parallel mode for job {} stage {stage}: {}",
                self.step, job.0, self.reason
            ),
            Action::Ordered { job, stage } => write!(
                f,
                "step {}: scale in: ordered mode for job {} stage {stage}: {}",
                self.step, job.0, self.reason
            ),
            Action::Unchain { job, stage } => write!(
                f,
                "step {}: scale out: job {} stage {stage}'s fused steps to its relays: {}",
                self.step, job.0, self.reason
            ),
            Action::Rechain { job, stage } => write!(
                f,
                "step {}: scale in: job {} stage {stage}'s steps fused back: {}",
                self.step, job.0, self.reason
            ),
            Action::NeedsParallelism { shard, operators } => {
                write!(f, "step {}: {shard} needs parallelism:", self.step)?;
                for (job, stage, now, needed) in operators {
                    write!(f, " job {} stage {stage} has {now}, needs {needed};", job.0)?;
                }
                write!(f, " {}", self.reason)
            }
            Action::ScaleToZero { job } => {
                write!(
                    f,
                    "step {}: scale to zero: job {}: {}",
                    self.step, job.0, self.reason
                )
            }
            Action::Wake { job } => {
                write!(
                    f,
                    "step {}: wake: job {}: {}",
                    self.step, job.0, self.reason
                )
            }
        }
    }
}

/// What the model knows of a job's input between steps.
struct Input {
    /// `JobSample::records_in` at the last step.
    records: u64,
    /// Steps in a row with no record in.
    idle_steps: u64,
}

impl Input {
    /// Scaled to zero in this idle spell (decided at its `zero_steps`-th
    /// step; an ended job takes no more records, so it is never woken).
    fn at_zero(&self, zero_steps: u64) -> bool {
        self.records > 0 && self.idle_steps >= zero_steps
    }
}

/// The autoscaler's state between steps.
pub struct Autoscaler {
    config: AutoscaleConfig,
    step: u64,
    /// Actors moved, with the step until which they stay.
    cooling: BTreeMap<ActorId, u64>,
    /// Shards reported as needing parallelism, with the step of the report
    /// (told again only after `cooldown_steps`).
    told: BTreeMap<ShardId, u64>,
    /// Each shard's load at the last step: a destination must have had room
    /// then too (a shard that paused for a moment, waiting on a full
    /// mailbox, is not room).
    last_load: Vec<f64>,
    /// Per shard, steps in a row it has been cold (under `low_load`).
    cold_steps: Vec<u64>,
    /// Per shard, the last step a scale out moved an actor off or onto it.
    last_out: BTreeMap<usize, u64>,
    /// Per job, its input: for scaling idle jobs to zero.
    inputs: BTreeMap<JobId, Input>,
    /// Splits and switches to parallel mode in force, oldest first, with
    /// their steps; undone newest first.
    splits: Vec<(Spread, u64)>,
    /// Actors a split or merge just took part in, with the step until which
    /// they take part in no other (their figures show it by then). A move's
    /// cooldown does not stop a split: the partition moved to take half
    /// splits at the next step.
    splitting: BTreeMap<ActorId, u64>,
    /// Steps in a row with no shard over the target load or late.
    calm_steps: u64,
    /// Stages whose steps were split out and not yet checked: the step of
    /// the split, its job's records in per step before it, and its job's
    /// records in at it.
    unchained_at: BTreeMap<(JobId, u32), Unchained>,
    /// Per job, its records in at the last step and over the last
    /// `RATE_STEPS` steps (each step's).
    rates: BTreeMap<JobId, Rates>,
    /// Stages whose split out relieved nothing, with the step until which
    /// they are not split out again.
    unchain_refused: BTreeMap<(JobId, u32), u64>,
    /// Other nodes' shards this model spilled actors onto: the step of the
    /// last and their loads, counted on the shard's told figure until
    /// `spill_hold_steps` later (when a figure told since shows them).
    spilled: BTreeMap<ShardId, (u64, f64)>,
}

/// What a split or a switch to parallel mode did, to be undone.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Spread {
    /// `(actor split, partition that took half)`.
    Split(ActorId, ActorId),
    /// A stage in parallel mode.
    Parallel(JobId, u32),
    /// A stage whose fused steps run on its relays.
    Unchained(JobId, u32),
}

impl Spread {
    fn job(&self) -> JobId {
        match *self {
            Spread::Split(actor, _) => actor.job,
            Spread::Parallel(job, _) | Spread::Unchained(job, _) => job,
        }
    }
}

/// Where a split may put load: the live shards, and each shard's load at
/// the last step (a destination had room then too).
#[derive(Clone, Copy)]
struct Room<'a> {
    live: &'a [usize],
    last_load: &'a [f64],
}

/// An actor's measured figures in one step.
struct Measured {
    id: ActorId,
    shard: ShardId,
    busy: f64,
    late: bool,
    slo_ns: u64,
    scalable: bool,
    /// Its stage may be rerouted (`JobSample::splittable`).
    splittable: bool,
    /// Its stage may run in parallel mode (`JobSample::parallelizable`).
    parallelizable: bool,
    /// Its stage's fused steps may be split out (`JobSample::unchainable`).
    unchainable: bool,
    /// Its stage is a relay (`JobSample::relays`).
    relay: bool,
    /// It may move to another node (`JobSample::crossable`).
    crossable: bool,
}

impl Autoscaler {
    pub fn new(config: AutoscaleConfig) -> Autoscaler {
        Autoscaler {
            config,
            step: 0,
            cooling: BTreeMap::new(),
            told: BTreeMap::new(),
            last_load: Vec::new(),
            cold_steps: Vec::new(),
            last_out: BTreeMap::new(),
            inputs: BTreeMap::new(),
            splits: Vec::new(),
            splitting: BTreeMap::new(),
            calm_steps: 0,
            unchained_at: BTreeMap::new(),
            rates: BTreeMap::new(),
            unchain_refused: BTreeMap::new(),
            spilled: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &AutoscaleConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Each shard's load as measured at the last step (empty before one).
    pub fn loads(&self) -> &[f64] {
        &self.last_load
    }

    /// Measure `sample`, compute, and decide this step's actions.
    pub fn step(&mut self, sample: &Sample) -> Vec<Decision> {
        let mut decisions = self.place(sample);
        decisions.extend(self.track_inputs(&sample.jobs));
        decisions
    }

    /// A step with no actor figures: no record entered any job since the
    /// last step, so the engine asked no shard (a report would wake a parked
    /// one). Only the jobs' input is looked at: an idle job is scaled to zero.
    pub fn idle_step(&mut self, jobs: &BTreeMap<JobId, JobSample>) -> Vec<Decision> {
        self.tick();
        self.track_inputs(jobs)
    }

    /// The next step: its number; the actors whose cooldown it ends may move.
    fn tick(&mut self) -> u64 {
        self.step += 1;
        let step = self.step;
        self.cooling.retain(|_, until| *until > step);
        self.splitting.retain(|_, until| *until > step);
        step
    }

    /// Scale to zero a scalable job that had input, has not ended, and has
    /// had no record in for `zero_steps`; once, until records come in again
    /// (recorded as a wake). A trickle of input, however thin, keeps a job up.
    fn track_inputs(&mut self, jobs: &BTreeMap<JobId, JobSample>) -> Vec<Decision> {
        let step = self.step;
        let zero_steps = self.config.zero_steps;
        self.inputs.retain(|job, _| jobs.contains_key(job));
        let mut decisions = Vec::new();
        for (&job, sample) in jobs.iter().filter(|(_, j)| j.scalable) {
            let input = self.inputs.entry(job).or_insert(Input {
                records: sample.records_in,
                idle_steps: 0,
            });
            if sample.records_in != input.records {
                let came = sample.records_in.wrapping_sub(input.records);
                if input.at_zero(zero_steps) {
                    decisions.push(Decision {
                        step,
                        action: Action::Wake { job },
                        reason: format!(
                            "{came} records in after {} steps with none",
                            input.idle_steps
                        ),
                    });
                }
                *input = Input {
                    records: sample.records_in,
                    idle_steps: 0,
                };
                continue;
            }
            input.idle_steps += 1;
            if input.idle_steps == zero_steps && input.records > 0 && !sample.ended {
                decisions.push(Decision {
                    step,
                    action: Action::ScaleToZero { job },
                    reason: format!(
                        "no record in for {} steps, after {} records",
                        input.idle_steps, input.records
                    ),
                });
            }
        }
        decisions
    }

    /// Placement: moves off overloaded shards, halving, splits, drains and
    /// merges.
    fn place(&mut self, sample: &Sample) -> Vec<Decision> {
        let step = self.tick();
        self.track_rates(&sample.jobs);
        self.splits
            .retain(|(spread, _)| sample.jobs.contains_key(&spread.job()));
        self.spilled
            .retain(|_, (at, _)| step < *at + self.config.spill_hold_steps);
        let measured = self.measure(sample);
        let mut load = vec![0.0f64; sample.shards];
        let mut late = vec![false; sample.shards];
        for m in &measured {
            if let Some(slot) = load.get_mut(m.shard.index()) {
                *slot += m.busy;
                late[m.shard.index()] |= m.late;
            }
        }
        let live: Vec<usize> = (0..sample.shards)
            .filter(|s| !sample.dead.contains(&ShardId(*s as u16)))
            .collect();
        let last_load = std::mem::replace(&mut self.last_load, load.clone());
        // Nothing to move to with one live shard (over nodes, one of this
        // node's own, and no other node's); its load is measured still (a
        // node tells it to the others).
        if live.len() + sample.remote.len() < 2 {
            return Vec::new();
        }
        // A destination had room at the last step too (at the first step
        // there is no last one).
        let target_load = self.config.target_load;
        let had_room = |s: usize| last_load.get(s).is_none_or(|&l| l <= target_load);
        // Per shard, the tightest and the loosest SLO of the jobs on it.
        let mut slos = vec![(u64::MAX, 0u64); sample.shards];
        for m in &measured {
            if let Some(slot) = slos.get_mut(m.shard.index()) {
                *slot = (slot.0.min(m.slo_ns), slot.1.max(m.slo_ns));
            }
        }
        // Where each movable actor is now (as the moves below change it).
        let mut place: BTreeMap<ActorId, usize> =
            measured.iter().map(|m| (m.id, m.shard.index())).collect();
        let mut decisions = Vec::new();
        // A saturated shard beside an idle one: half of each stage's actors
        // go at once (a saturated actor's busy time shows what it got, not
        // what it needs, so moving by measured load would take many steps).
        let mut hot_shards: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&s| load[s] >= self.config.saturated_load)
            .collect();
        hot_shards.sort_by(|a, b| load[*b].total_cmp(&load[*a]).then(a.cmp(b)));
        // Idle destinations, emptiest first; each takes one half.
        let mut idle: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&s| load[s] <= 1.0 - self.config.high_load && had_room(s))
            .collect();
        idle.sort_by(|a, b| load[*b].total_cmp(&load[*a]).then(b.cmp(a)));
        for hot in hot_shards {
            let Some(cool) = idle.pop() else {
                break;
            };
            let mut stages: BTreeMap<(JobId, u32), Vec<&Measured>> = BTreeMap::new();
            for m in &measured {
                if place[&m.id] == hot && self.may_leave(m, slos[hot]) {
                    stages.entry((m.id.job, m.id.operator)).or_default().push(m);
                }
            }
            let half: Vec<&Measured> = stages
                .into_values()
                .flat_map(|mut actors| {
                    actors.sort_by_key(|m| m.id);
                    let n = actors.len() / 2;
                    actors.into_iter().rev().take(n)
                })
                .collect();
            if half.is_empty() {
                idle.push(cool);
                continue;
            }
            let (hot_load, cool_load) = (load[hot], load[cool]);
            for m in half {
                let reason = format!(
                    "{} load {hot_load:.2}, saturated, and {} load {cool_load:.2}, idle: half \
                     of each stage's actors move",
                    ShardId(hot as u16),
                    ShardId(cool as u16),
                );
                decisions.push(move_decision(step, m, (hot, cool), Scale::Out, reason));
                self.spread(m, (hot, cool), &mut load, &mut place);
            }
        }
        let mut stuck: Vec<usize> = Vec::new();
        while decisions.len() < self.config.moves_per_step_max {
            let overloaded = |s: usize| {
                load[s] > self.config.high_load || (late[s] && load[s] > self.config.late_load)
            };
            let Some(&hot) = live
                .iter()
                .filter(|&&s| overloaded(s) && !stuck.contains(&s))
                .max_by(|a, b| load[**a].total_cmp(&load[**b]).then(b.cmp(a)))
            else {
                break;
            };
            let Some(&cool) = live
                .iter()
                .filter(|&&s| s != hot && had_room(s))
                .min_by(|a, b| load[**a].total_cmp(&load[**b]).then(a.cmp(b)))
            else {
                stuck.push(hot);
                continue;
            };
            let loads = (load[hot], load[cool]);
            let candidate = self.pick_move(&measured, &place, hot, loads, slos[hot], |_| true);
            let Some(m) = candidate else {
                stuck.push(hot);
                continue;
            };
            let reason = format!(
                "{} load {:.2}{} and {} load {:.2}",
                ShardId(hot as u16),
                load[hot],
                if late[hot] { " with a late actor" } else { "" },
                ShardId(cool as u16),
                load[cool],
            );
            decisions.push(move_decision(step, m, (hot, cool), Scale::Out, reason));
            self.spread(m, (hot, cool), &mut load, &mut place);
        }
        decisions.extend(self.check_unchained(step, &sample.jobs));
        self.cold_steps.resize(sample.shards, 0);
        for (s, &l) in load.iter().enumerate() {
            self.cold_steps[s] = if l < self.config.low_load {
                self.cold_steps[s] + 1
            } else {
                0
            };
        }
        let calm = decisions.is_empty()
            && stuck.is_empty()
            && !live
                .iter()
                .any(|&s| load[s] > self.config.target_load || late[s]);
        self.calm_steps = if calm { self.calm_steps + 1 } else { 0 };
        if calm {
            decisions.extend(self.drain(&measured, &live, &load));
            if decisions.is_empty() {
                decisions.extend(self.merge_back(step, &measured, &load));
            }
        }
        let mut spilled = false;
        for shard in stuck {
            let room = Room {
                live: &live,
                last_load: &last_load,
            };
            if let Some(decision) = self.split(step, shard, &measured, &mut load, &mut place, room)
            {
                decisions.push(decision);
                continue;
            }
            if let Some(decision) =
                self.unchain_busiest(step, (shard, load[shard]), &measured, &place)
            {
                decisions.push(decision);
                continue;
            }
            // Over nodes, nothing here relieves it: one actor to another
            // node, at most one a step (its node's figures must show it
            // before another goes there).
            if !spilled {
                if let Some(decision) =
                    self.spill(step, shard, &measured, &mut load, &mut place, sample)
                {
                    spilled = true;
                    decisions.push(decision);
                    continue;
                }
            }
            let recently = self
                .told
                .get(&ShardId(shard as u16))
                .is_some_and(|at| step < at + self.config.cooldown_steps);
            if recently {
                continue;
            }
            let operators = self.needs(&measured, shard);
            if operators.is_empty() {
                continue;
            }
            self.told.insert(ShardId(shard as u16), step);
            decisions.push(Decision {
                step,
                action: Action::NeedsParallelism {
                    shard: ShardId(shard as u16),
                    operators,
                },
                reason: format!(
                    "load {:.2}{}; no move lowers it by {:.2}",
                    load[shard],
                    if late[shard] {
                        " with a late actor"
                    } else {
                        ""
                    },
                    self.config.min_gain
                ),
            });
        }
        decisions
    }

    /// Over nodes: a move of one actor off `hot`, a shard of this node that
    /// no local move or split relieves, onto the least loaded shard of
    /// another node ([`Sample::remote`], with what this model spilled onto
    /// it within `spill_hold_steps` added) that had room at its node's last figures (at most
    /// `target_load`). The actor is of a keyed stage (`crossable`: a source
    /// keeps its node, and so do sinks and relays), may leave its shard,
    /// and lowers the higher of the two loads by `min_gain` while the
    /// destination stays under the high mark, or is nearly idle; of those,
    /// as for a local move. Its move is a scale out, and its cooldown, as
    /// for any move.
    fn spill(
        &mut self,
        step: u64,
        hot: usize,
        measured: &[Measured],
        load: &mut [f64],
        place: &mut BTreeMap<ActorId, usize>,
        sample: &Sample,
    ) -> Option<Decision> {
        let taken = |shard: &ShardId| self.spilled.get(shard).map_or(0.0, |(_, busy)| *busy);
        let (cool, cool_load) = sample
            .remote
            .iter()
            .map(|(shard, l)| (*shard, l + taken(shard)))
            .filter(|(_, l)| *l <= self.config.target_load)
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))?;
        let hot_load = load[hot];
        let slos = measured
            .iter()
            .filter(|m| place.get(&m.id) == Some(&hot))
            .fold((u64::MAX, 0u64), |(t, l), m| {
                (t.min(m.slo_ns), l.max(m.slo_ns))
            });
        let crossable = |m: &Measured| m.crossable;
        let m = self.pick_move(measured, place, hot, (hot_load, cool_load), slos, crossable)?;
        let reason = format!(
            "{} load {hot_load:.2}, no shard of this node relieves it, and {cool} (another \
             node's) load {cool_load:.2}",
            ShardId(hot as u16),
        );
        load[hot] -= m.busy;
        // Another node's now: no later decision of this step takes it.
        place.remove(&m.id);
        self.cooling
            .insert(m.id, self.step + self.config.cooldown_steps);
        self.last_out.insert(hot, self.step);
        let pending = self.spilled.entry(cool).or_insert((step, 0.0));
        *pending = (step, pending.1 + m.busy);
        Some(move_decision(
            step,
            m,
            (hot, cool.index()),
            Scale::Out,
            reason,
        ))
    }

    /// The actor a scale out moves off `hot` onto a shard, the two at
    /// `(hot_load, cool_load)`: on `hot`, busy `min_busy` or more, allowed
    /// by `also`, free to leave (`may_leave`, by `hot`'s tightest and
    /// loosest SLOs `slos`), and lowering the higher of the two loads by
    /// `min_gain` (after moving `busy` it is max(hot - busy, cool + busy))
    /// while the destination keeps room for it (moving work between two
    /// overloaded shards only moves the overload) or is nearly idle (an
    /// actor that alone fills a core, its measured busy time capped by the
    /// core it shares, may go to one). Of those: one that ends the overload
    /// on both shards first; of those, the job with the most slack; then
    /// the evener.
    fn pick_move<'m>(
        &self,
        measured: &'m [Measured],
        place: &BTreeMap<ActorId, usize>,
        hot: usize,
        (hot_load, cool_load): (f64, f64),
        slos: (u64, u64),
        also: impl Fn(&Measured) -> bool,
    ) -> Option<&'m Measured> {
        let gap = hot_load - cool_load;
        let idle = cool_load <= 1.0 - self.config.high_load;
        let fits = |busy: f64| {
            busy >= self.config.min_gain
                && busy <= gap - self.config.min_gain
                && (idle || cool_load + busy <= self.config.high_load)
        };
        let after = |busy: f64| (hot_load - busy).max(cool_load + busy);
        let high_load = self.config.high_load;
        measured
            .iter()
            .filter(|m| place.get(&m.id) == Some(&hot) && m.busy >= self.config.min_busy)
            .filter(|m| also(m) && self.may_leave(m, slos) && fits(m.busy))
            .max_by(|a, b| {
                (after(a.busy) <= high_load)
                    .cmp(&(after(b.busy) <= high_load))
                    .then(a.slo_ns.cmp(&b.slo_ns))
                    .then(after(b.busy).total_cmp(&after(a.busy)))
                    .then(b.id.cmp(&a.id))
            })
    }

    /// Whether scale out may take `m` off its shard, whose jobs' tightest and
    /// loosest SLOs are `(tightest, loosest)`: a fixed or cooling actor
    /// stays, and so does the tightest job on a shard shared with looser ones
    /// unless it is late itself (a co-tenant's overload is the co-tenant's to
    /// move).
    fn may_leave(&self, m: &Measured, (tightest, loosest): (u64, u64)) -> bool {
        m.scalable
            && !self.cooling.contains_key(&m.id)
            && (m.late || m.slo_ns > tightest || tightest == loosest)
    }

    /// Book a scale out of `m` from `hot` to `cool`: the loads and places
    /// this step expects, the actor's cooldown, and both shards kept out of
    /// drains for `repack_steps`.
    fn spread(
        &mut self,
        m: &Measured,
        (hot, cool): (usize, usize),
        load: &mut [f64],
        place: &mut BTreeMap<ActorId, usize>,
    ) {
        load[hot] -= m.busy;
        load[cool] += m.busy;
        place.insert(m.id, cool);
        self.cooling
            .insert(m.id, self.step + self.config.cooldown_steps);
        self.last_out.insert(hot, self.step);
        self.last_out.insert(cool, self.step);
    }

    /// Scale in: the moves that empty the coldest shard cold long enough,
    /// if all its actors fit elsewhere (see the module's "Scale in").
    fn drain(&mut self, measured: &[Measured], live: &[usize], load: &[f64]) -> Vec<Decision> {
        let step = self.step;
        let recently_out = |s: usize| {
            self.last_out
                .get(&s)
                .is_some_and(|&at| step < at + self.config.repack_steps)
        };
        let mut running = vec![0usize; load.len()];
        for m in measured {
            running[m.shard.index()] += 1;
        }
        let mut cold: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&s| running[s] > 0 && self.cold_steps[s] >= self.config.scale_in_steps)
            .filter(|&s| !recently_out(s))
            .collect();
        // The emptiest first; of equals, the highest index.
        cold.sort_by(|a, b| load[*a].total_cmp(&load[*b]).then(b.cmp(a)));
        for shard in cold {
            let mut on: Vec<&Measured> = measured
                .iter()
                .filter(|m| m.shard.index() == shard)
                .collect();
            if on
                .iter()
                .any(|m| !m.scalable || m.late || self.cooling.contains_key(&m.id))
            {
                continue;
            }
            if on.len() > self.config.moves_per_step_max {
                continue; // more than one step's moves: a drain is all or nothing
            }
            // The busiest first, each to the fullest shard it fits on.
            on.sort_by(|a, b| b.busy.total_cmp(&a.busy).then(a.id.cmp(&b.id)));
            let mut planned = load.to_vec();
            let mut moves = Vec::new();
            for m in &on {
                let to = live
                    .iter()
                    .copied()
                    .filter(|&d| d != shard && running[d] > 0 && !recently_out(d))
                    .filter(|&d| planned[d] + m.busy <= self.config.packed_load)
                    .max_by(|a, b| planned[*a].total_cmp(&planned[*b]).then(b.cmp(a)));
                let Some(to) = to else {
                    break;
                };
                planned[to] += m.busy;
                moves.push((m, to));
            }
            if moves.len() < on.len() {
                continue;
            }
            let cold_for = self.cold_steps[shard];
            self.cold_steps[shard] = 0;
            return moves
                .into_iter()
                .map(|(m, to)| {
                    self.cooling.insert(m.id, step + self.config.cooldown_steps);
                    let reason = format!(
                        "{} load {:.2}, under {:.2} for {cold_for} steps, drained; {} load {:.2}",
                        ShardId(shard as u16),
                        load[shard],
                        self.config.low_load,
                        ShardId(to as u16),
                        load[to],
                    );
                    move_decision(step, m, (shard, to), Scale::In, reason)
                })
                .collect();
        }
        Vec::new()
    }

    fn measure(&self, sample: &Sample) -> Vec<Measured> {
        sample
            .actors
            .iter()
            .map(|a| {
                let job = sample.jobs.get(&a.id.job);
                let slo_ns = job.map_or(u64::MAX, |j| j.slo_ns);
                let late_us = (slo_ns as f64 * self.config.late_slack_fraction / 1e3) as u64;
                Measured {
                    id: a.id,
                    shard: a.shard,
                    busy: match a.interval_ns {
                        0 => 0.0,
                        interval_ns => (a.cpu_ns as f64 / interval_ns as f64).min(1.0),
                    },
                    late: a.messages > 0 && a.queue_p99_us > late_us,
                    slo_ns,
                    scalable: job.is_some_and(|j| j.scalable),
                    splittable: job.is_some_and(|j| {
                        a.id.operator < 64 && j.splittable & (1 << a.id.operator) != 0
                    }),
                    parallelizable: job.is_some_and(|j| {
                        a.id.operator < 64 && j.parallelizable & (1 << a.id.operator) != 0
                    }),
                    unchainable: job.is_some_and(|j| {
                        a.id.operator < 64 && j.unchainable & (1 << a.id.operator) != 0
                    }),
                    relay: job.is_some_and(|j| {
                        a.id.operator < 64 && j.relays & (1 << a.id.operator) != 0
                    }),
                    crossable: job.is_some_and(|j| {
                        a.id.operator < 64 && j.crossable & (1 << a.id.operator) != 0
                    }),
                }
            })
            .collect()
    }

    /// A split for the stuck shard `hot`: its busiest actor of a splittable
    /// stage gives half its key groups to a partition of the same stage on
    /// the least loaded shard that can take half its load. If no partition
    /// of the stage is on such a shard, the lightest one moves to the one
    /// with the most room first (the split follows at a later step, once it
    /// is there and its figures show it).
    fn split(
        &mut self,
        step: u64,
        hot: usize,
        measured: &[Measured],
        load: &mut [f64],
        place: &mut BTreeMap<ActorId, usize>,
        room: Room<'_>,
    ) -> Option<Decision> {
        let free = |id: &ActorId| !self.splitting.contains_key(id);
        let m = measured
            .iter()
            .filter(|m| place.get(&m.id) == Some(&hot) && m.scalable)
            .filter(|m| m.splittable || (m.unchainable && self.may_unchain(m)))
            .filter(|m| m.busy >= self.config.min_gain && free(&m.id))
            .max_by(|a, b| a.busy.total_cmp(&b.busy).then(b.id.cmp(&a.id)))?;
        let stage = (m.id.job, m.id.operator);
        if !m.splittable {
            return Some(self.unchain(step, (hot, load[hot]), m, measured));
        }
        if m.parallelizable {
            // Its partials merge downstream: every partition may take any
            // batch, so the stage's load spreads over all its partitions at
            // once (where they run is the moves' business).
            let parallel = Spread::Parallel(stage.0, stage.1);
            if self.splits.iter().any(|(s, _)| *s == parallel) {
                return None;
            }
            for s in measured
                .iter()
                .filter(|s| (s.id.job, s.id.operator) == stage)
            {
                self.splitting
                    .insert(s.id, step + self.config.cooldown_steps);
            }
            self.splits.push((parallel, step));
            return Some(Decision {
                step,
                action: Action::Parallel {
                    job: stage.0,
                    stage: stage.1,
                },
                reason: format!(
                    "{} load {:.2}, no move relieves it; {} is {:.0}% busy and its stage keeps \
                     partials: each batch to the partition with the least backlog",
                    ShardId(hot as u16),
                    load[hot],
                    m.id,
                    m.busy * 100.0
                ),
            });
        }
        let half = m.busy / 2.0;
        let target_load = self.config.target_load;
        let fits = |s: usize, load: &[f64]| {
            s != hot
                && room.live.contains(&s)
                && room.last_load.get(s).is_none_or(|&l| l <= target_load)
                && load[s] + half <= self.config.high_load
        };
        let siblings: Vec<&Measured> = measured
            .iter()
            .filter(|s| s.id.job == m.id.job && s.id.operator == m.id.operator && s.id != m.id)
            .filter(|s| free(&s.id) && place.contains_key(&s.id))
            .collect();
        let into = siblings
            .iter()
            .filter(|s| fits(place[&s.id], load))
            .min_by(|a, b| {
                load[place[&a.id]]
                    .total_cmp(&load[place[&b.id]])
                    .then(a.id.cmp(&b.id))
            });
        if let Some(into) = into {
            let to = place[&into.id];
            let reason = format!(
                "{} load {:.2}, no move relieves it; the actor is {:.0}% busy: half its key \
                 groups go to partition {} on {} (load {:.2})",
                ShardId(hot as u16),
                load[hot],
                m.busy * 100.0,
                into.id.partition,
                ShardId(to as u16),
                load[to]
            );
            load[hot] -= half;
            load[to] += half;
            let until = step + self.config.cooldown_steps;
            for id in [m.id, into.id] {
                self.cooling.insert(id, until);
                self.splitting.insert(id, until);
            }
            self.last_out.insert(hot, step);
            self.last_out.insert(to, step);
            self.splits.push((Spread::Split(m.id, into.id), step));
            return Some(Decision {
                step,
                action: Action::Split {
                    actor: m.id,
                    into: into.id,
                },
                reason,
            });
        }
        let cool = room
            .live
            .iter()
            .copied()
            .filter(|&s| fits(s, load))
            .min_by(|a, b| load[*a].total_cmp(&load[*b]).then(a.cmp(b)))?;
        let sibling = siblings
            .iter()
            .filter(|s| place[&s.id] != cool)
            .min_by(|a, b| a.busy.total_cmp(&b.busy).then(a.id.cmp(&b.id)))?;
        let from = place[&sibling.id];
        let reason = format!(
            "{} load {:.2}, no move relieves it; {} ({:.0}% busy) is to split into this \
             partition on {} (load {:.2})",
            ShardId(hot as u16),
            load[hot],
            m.id,
            m.busy * 100.0,
            ShardId(cool as u16),
            load[cool]
        );
        let decision = move_decision(step, sibling, (from, cool), Scale::Out, reason);
        self.spread(sibling, (from, cool), load, place);
        Some(decision)
    }

    /// The busiest actor on the stuck shard `hot` whose stage's steps may
    /// still be split out onto relays: for when a split found no partition
    /// to take half (a keyed producer of fewer partitions than shards).
    fn unchain_busiest(
        &mut self,
        step: u64,
        (hot, hot_load): (usize, f64),
        measured: &[Measured],
        place: &BTreeMap<ActorId, usize>,
    ) -> Option<Decision> {
        let m = measured
            .iter()
            .filter(|m| place.get(&m.id) == Some(&hot) && m.scalable && m.unchainable)
            .filter(|m| m.busy >= self.config.min_gain && !self.splitting.contains_key(&m.id))
            .filter(|m| self.may_unchain(m))
            .max_by(|a, b| a.busy.total_cmp(&b.busy).then(b.id.cmp(&a.id)))?;
        Some(self.unchain(step, (hot, hot_load), m, measured))
    }

    /// Whether `m`'s stage may have its steps split out: not if they are
    /// already, only once its job's input rate is known (`RATE_STEPS`
    /// steps: the split is judged against it), and not while a split of
    /// them that slowed the job is recent.
    fn may_unchain(&self, m: &Measured) -> bool {
        let split_out = Spread::Unchained(m.id.job, m.id.operator);
        if self.splits.iter().any(|(s, _)| *s == split_out) {
            return false;
        }
        let rate_known = self
            .rates
            .get(&m.id.job)
            .is_some_and(|(_, deltas, _)| deltas.len() == RATE_STEPS);
        rate_known
            && self
                .unchain_refused
                .get(&(m.id.job, m.id.operator))
                .is_none_or(|&until| self.step >= until)
    }

    /// Each job's records in over the last `RATE_STEPS` steps.
    fn track_rates(&mut self, jobs: &BTreeMap<JobId, JobSample>) {
        self.rates.retain(|job, _| jobs.contains_key(job));
        for (&job, sample) in jobs {
            let Some((records, deltas, steps)) = self.rates.get_mut(&job) else {
                // First seen: its rate from the next step on.
                self.rates
                    .insert(job, (sample.records_in, Default::default(), 0));
                continue;
            };
            *steps += 1;
            if deltas.len() == RATE_STEPS {
                deltas.pop_front();
            }
            deltas.push_back(sample.records_in.saturating_sub(*records));
            *records = sample.records_in;
        }
    }

    /// Steps split out `cooldown_steps` ago whose job has since taken fewer
    /// records in per step than before (by a tenth) are fused back at once:
    /// the producer's own work, not its steps, filled its core (a source
    /// reading as fast as it can, its steps cheap), and the relays only add
    /// a hop. The stage is not split out again for `repack_steps`. A job
    /// that took no input before the split is not judged.
    fn check_unchained(&mut self, step: u64, jobs: &BTreeMap<JobId, JobSample>) -> Vec<Decision> {
        self.unchained_at
            .retain(|(job, _), _| jobs.contains_key(job));
        self.unchain_refused.retain(|_, until| *until > step);
        let cooldown = self.config.cooldown_steps;
        let due: Vec<((JobId, u32), Unchained)> = self
            .unchained_at
            .iter()
            .filter(|(_, (at, _, _, _))| step >= at + cooldown)
            .map(|(&stage, &figures)| (stage, figures))
            .collect();
        let mut decisions = Vec::new();
        for ((job, stage), (at, before, records_then, steps_then)) in due {
            self.unchained_at.remove(&(job, stage));
            let Some(&(records_now, _, steps_now)) = self.rates.get(&job) else {
                continue;
            };
            // Per measured step, as `before` (an idle step measures nothing).
            let steps = steps_now.saturating_sub(steps_then).max(1);
            let after = records_now.saturating_sub(records_then) as f64 / steps as f64;
            if before <= 0.0 || after >= before * 0.9 {
                continue;
            }
            self.splits
                .retain(|(s, _)| *s != Spread::Unchained(job, stage));
            self.unchain_refused
                .insert((job, stage), step + self.config.repack_steps);
            decisions.push(Decision {
                step,
                action: Action::Rechain { job, stage },
                reason: format!(
                    "its steps went to relays at step {at}, and since then the job took \
                     {after:.0} records in a step against {before:.0} before: the relays cost \
                     more than they relieve; not split out again for {} steps",
                    self.config.repack_steps
                ),
            });
        }
        decisions
    }

    /// Split `m`'s stage's fused steps out onto its relays: each batch to
    /// the least backlogged relay partition (where those run is the moves'
    /// business). Its actors take part in nothing else for a cooldown.
    fn unchain(
        &mut self,
        step: u64,
        (hot, hot_load): (usize, f64),
        m: &Measured,
        measured: &[Measured],
    ) -> Decision {
        let stage = (m.id.job, m.id.operator);
        for s in measured
            .iter()
            .filter(|s| (s.id.job, s.id.operator) == stage)
        {
            self.splitting
                .insert(s.id, step + self.config.cooldown_steps);
        }
        self.splits
            .push((Spread::Unchained(stage.0, stage.1), step));
        // Judged later against the job's input rate now.
        if let Some((records, deltas, steps)) = self.rates.get(&stage.0) {
            let before = deltas.iter().sum::<u64>() as f64 / deltas.len().max(1) as f64;
            self.unchained_at
                .insert(stage, (step, before, *records, *steps));
        }
        Decision {
            step,
            action: Action::Unchain {
                job: stage.0,
                stage: stage.1,
            },
            reason: format!(
                "{} load {hot_load:.2}, no move relieves it; {} is {:.0}% busy and its stage has \
                 fewer partitions than shards: its fused steps go to relays",
                ShardId(hot as u16),
                m.id,
                m.busy * 100.0
            ),
        }
    }

    /// Undo the newest split once the engine has been calm for
    /// `scale_in_steps` and the split is `repack_steps` old, if its old
    /// owner's shard can take back all the partition's load and stay under
    /// `packed_load`: scale in is lazy, and a merge never sets off a split.
    fn merge_back(&mut self, step: u64, measured: &[Measured], load: &[f64]) -> Option<Decision> {
        if self.calm_steps < self.config.scale_in_steps {
            return None;
        }
        // Newest first. Steps on relays change no table: one that must stay
        // split out is passed over for what came before it.
        for i in (0..self.splits.len()).rev() {
            let entry = self.splits[i];
            if let Some(decision) = self.undo(step, entry, measured, load) {
                self.splits.remove(i);
                if let Spread::Unchained(job, stage) = entry.0 {
                    self.unchained_at.remove(&(job, stage));
                }
                return Some(decision);
            }
            if !matches!(entry.0, Spread::Unchained(..)) {
                return None;
            }
        }
        None
    }

    /// Undo `spread`, made at step `at`, if it may be now (see `merge_back`).
    fn undo(
        &mut self,
        step: u64,
        (spread, at): (Spread, u64),
        measured: &[Measured],
        load: &[f64],
    ) -> Option<Decision> {
        if step < at + self.config.repack_steps {
            return None;
        }
        let resting =
            |id: &ActorId| self.cooling.contains_key(id) || self.splitting.contains_key(id);
        let decision = match spread {
            Spread::Split(split, took) => {
                let find = |id: ActorId| measured.iter().find(|m| m.id == id);
                let (into, from) = (find(split)?, find(took)?);
                let shard = into.shard.index();
                let after = load[shard]
                    + if from.shard == into.shard {
                        0.0
                    } else {
                        from.busy
                    };
                if resting(&split) || resting(&took) || after > self.config.packed_load {
                    return None;
                }
                let until = step + self.config.cooldown_steps;
                for id in [split, took] {
                    self.cooling.insert(id, until);
                    self.splitting.insert(id, until);
                }
                Decision {
                    step,
                    action: Action::Merge {
                        into: split,
                        from: took,
                    },
                    reason: format!(
                        "calm for {} steps, split at step {at}; {} load {:.2} takes back \
                         partition {}'s {:.0}% (at most {:.2})",
                        self.calm_steps,
                        ShardId(shard as u16),
                        load[shard],
                        took.partition,
                        from.busy * 100.0,
                        after
                    ),
                }
            }
            Spread::Parallel(job, stage) => {
                // Back by key: the stage's whole load must fit one partition's
                // share of a core comfortably (its keys may all be in one).
                let actors: Vec<&Measured> = measured
                    .iter()
                    .filter(|m| (m.id.job, m.id.operator) == (job, stage))
                    .collect();
                let total: f64 = actors.iter().map(|m| m.busy).sum();
                if actors.iter().any(|m| resting(&m.id)) || total > self.config.packed_load {
                    return None;
                }
                Decision {
                    step,
                    action: Action::Ordered { job, stage },
                    reason: format!(
                        "calm for {} steps, parallel since step {at}; the stage is {:.0}% busy \
                         in all (at most {:.2})",
                        self.calm_steps,
                        total * 100.0,
                        self.config.packed_load
                    ),
                }
            }
            Spread::Unchained(job, stage) => {
                // Fused again, the producer runs what its relays ran: the two
                // together must fit one partition's share of a core.
                let producer = |m: &&Measured| (m.id.job, m.id.operator) == (job, stage);
                let relay = |m: &&Measured| m.id.job == job && m.relay;
                let (ran, relayed): (f64, f64) = (
                    measured.iter().filter(producer).map(|m| m.busy).sum(),
                    measured.iter().filter(relay).map(|m| m.busy).sum(),
                );
                let total = ran + relayed;
                if measured.iter().filter(producer).any(|m| resting(&m.id))
                    || total > self.config.packed_load
                {
                    return None;
                }
                Decision {
                    step,
                    action: Action::Rechain { job, stage },
                    reason: format!(
                        "calm for {} steps, its steps on relays since step {at}; the stage and \
                         its relays are {:.0}% busy in all (at most {:.2})",
                        self.calm_steps,
                        total * 100.0,
                        self.config.packed_load
                    ),
                }
            }
        };
        Some(decision)
    }

    /// The operators with activations on `shard` whose total busy time needs
    /// more activations than they have: (job, stage, now, needed).
    fn needs(&self, measured: &[Measured], shard: usize) -> Vec<(JobId, u32, u32, u32)> {
        let mut operators: BTreeMap<(JobId, u32), (u32, f64, bool)> = BTreeMap::new();
        for m in measured {
            let entry = operators
                .entry((m.id.job, m.id.operator))
                .or_insert((0, 0.0, false));
            entry.0 += 1;
            entry.1 += m.busy;
            entry.2 |= m.shard.index() == shard;
        }
        operators
            .into_iter()
            .filter(|(_, (_, _, here))| *here)
            .filter_map(|((job, stage), (now, busy, _))| {
                let needed = needed_activations(busy, self.config.target_load);
                (needed > now).then_some((job, stage, now, needed))
            })
            .collect()
    }
}

/// A move of `m` from shard `from` to `to`, its reason followed by the
/// actor's own figures.
fn move_decision(
    step: u64,
    m: &Measured,
    (from, to): (usize, usize),
    scale: Scale,
    reason: String,
) -> Decision {
    Decision {
        step,
        action: Action::Move {
            actor: m.id,
            from: ShardId(from as u16),
            to: ShardId(to as u16),
            scale,
        },
        reason: format!(
            "{reason}; the actor is {:.0}% busy, SLO {} ms",
            m.busy * 100.0,
            m.slo_ns / 1_000_000
        ),
    }
}

/// Activations an operator busy `busy` cores in all needs to run each at
/// `target_load`, in one step (DS2: true rate times activations covers the
/// input rate).
pub fn needed_activations(busy: f64, target_load: f64) -> u32 {
    (busy / target_load).ceil().max(1.0) as u32
}

#[cfg(test)]
mod tests;
