//! Building a job: typed streams from sources through stateless steps, keyed
//! stages and joins to sinks, and the `Plan` the actors run from.
//!
//! Every edge is typed: `Stream<Bid>` -> `map` -> `Stream<Q1>`; a keyed stage is
//! typed on its input and output (`Operator<In, Out>`), a join on both inputs
//! (`JoinOperator<L, R, Out>`). Types are erased only at the actor boundary, where a
//! batch travels as a [`Batch`](super::batch::Batch) and the receiving stage takes
//! its vector back with the type it was built with.
//!
//! How it is built: a `Stream<T>` is a stage plus the stateless steps applied since
//! (map, filter, filter_map, flat_map). Steps are not stages: when a stream is
//! finally connected to a consumer (a keyed stage or a sink), its steps are
//! composed, from the consumer back to the producing stage, into one *route*
//! function `Vec<Out of the stage> -> partitioned sends`, monomorphized per step;
//! the producing stage's actor runs its routes on every batch it emits (operator
//! chaining, each step one tight pass over the batch).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use dirigo_engine::dataflow::{Dataflow, DataflowConfig, Job, Operator, Sink, Source, SourceBatch};
//! use dirigo_engine::dataflow::state::{KeyedState, Stateful};
//!
//! /// A user's own record types (rkyv-encodable, to cross nodes).
//! #[derive(Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
//! struct Reading { sensor: u64, celsius: i64 }
//! #[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
//! struct Total { sensor: u64, sum: i64 }
//!
//! /// Readings 0..1000 (reading n comes from sensor n % 10), as two partitions.
//! struct Readings { next: u64, step: u64 }
//! impl Source<Reading> for Readings {
//!     fn next_batch(&mut self, max: usize, out: &mut Vec<Reading>) -> SourceBatch {
//!         for _ in 0..max {
//!             if self.next >= 1000 { return SourceBatch::Done; }
//!             out.push(Reading { sensor: self.next % 10, celsius: self.next as i64 });
//!             self.next += self.step;
//!         }
//!         SourceBatch::More { watermark_ms: self.next as i64 - self.step as i64 }
//!     }
//! }
//! /// Sums the readings of each sensor and emits the totals at the end of input.
//! /// Its state is a table by key (the sensor) kept by the engine's key groups,
//! /// so checkpoints and deactivation keep it.
//! #[derive(Default)]
//! struct SumPerSensor(KeyedState<i64>);
//! impl Operator<Reading, Total> for SumPerSensor {
//!     fn on_records(&mut self, records: Vec<Reading>, _out: &mut Vec<Total>) {
//!         for r in records { *self.0.for_key(r.sensor).entry(r.sensor).or_default() += r.celsius; }
//!     }
//!     fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<Total>) {
//!         if watermark_ms == i64::MAX {
//!             for (_, sums) in self.0.iter() {
//!                 out.extend(sums.iter().map(|(&sensor, &sum)| Total { sensor, sum }));
//!             }
//!         }
//!     }
//!     fn state(&mut self) -> Option<&mut dyn Stateful> { Some(&mut self.0) }
//! }
//! struct Collect(Arc<Mutex<Vec<(u64, i64)>>>);
//! impl Sink<(u64, i64)> for Collect {
//!     fn write(&mut self, records: &[(u64, i64)]) { self.0.lock().unwrap().extend_from_slice(records); }
//! }
//!
//! let mut config = DataflowConfig::default();
//! config.runtime.shards = 2;
//! let mut dataflow = Dataflow::start(config).unwrap();
//! let rows = Arc::new(Mutex::new(Vec::new()));
//! let collected = rows.clone();
//! let mut job = Job::new("sum-per-sensor", Duration::from_millis(10));
//! job.source("readings", 2, Arc::new(|p, n| Box::new(Readings { next: p as u64, step: n as u64 })))
//!     .filter(|r: &Reading| r.celsius % 2 == 0)         // Stream<Reading>
//!     .key_by(|r: &Reading| r.sensor)                    // KeyedStream<Reading>
//!     .process("sum", 4, Arc::new(|_| Box::new(SumPerSensor::default())))  // Stream<Total>
//!     .map(|t: Total| (t.sensor, t.sum))                 // Stream<(u64, i64)>
//!     .sink("collect", 1, Arc::new(move |_| Box::new(Collect(collected.clone()))));
//! let handle = dataflow.submit(job).unwrap();
//! handle.wait(Duration::from_secs(30)).unwrap();
//! let mut totals = rows.lock().unwrap().clone();
//! totals.sort();
//! // Even readings below 1000 by sensor 0, 2, 4, 6, 8.
//! assert_eq!(totals, vec![(0, 49500), (2, 49700), (4, 49900), (6, 50100), (8, 50300)]);
//! dataflow.shutdown();
//! ```

use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::actor::{BoxActor, Context, SchedCtx};
use crate::ids::{ActorId, JobId, ShardId};

use super::actors;
use super::batch::Batch;
use super::checkpoint::{CheckpointOptions, Checkpointer, Role, Sealed};
use super::ops::{Aggregate, PartialRow, WindowAggregate, WindowMerge, WindowPartial, WindowSpec};
use super::pace::RateSchedule;
use super::state::Stateful;
use super::{key_group, partition_of_group, DataMsg, JobMetrics};

pub use super::batch::Data;

/// The stage number of a job's monitors over nodes (`Plan::monitors`);
/// `u32::MAX` is the runtime's injector's (`ids::INJECTOR_OPERATOR`).
pub(crate) const MONITOR_STAGE: u32 = u32::MAX - 1;

/// What a source produced.
pub enum SourceBatch {
    /// Records were appended; none will follow with an earlier time than this.
    More { watermark_ms: i64 },
    /// The input is exhausted (records may have been appended too).
    Done,
    /// Nothing is ready yet (input still on its way, e.g. a read in flight); the
    /// source is asked again shortly. Records may have been appended too.
    Pending,
    /// The input is bad; the job ends with this error (records appended before it
    /// are processed).
    Failed(String),
}

/// A partition of a source: produces batches on demand. Must never block: input
/// that is not there yet is `SourceBatch::Pending`.
pub trait Source<T>: Send + 'static {
    fn next_batch(&mut self, max_records: usize, out: &mut Vec<T>) -> SourceBatch;

    /// Malformed input skipped so far (for sources told to skip rather than fail).
    fn skipped_records(&self) -> u64 {
        0
    }

    /// Where the source stands, for a checkpoint: what [`Source::seek`] needs to
    /// produce exactly the records after the last one `next_batch` returned (and
    /// to go on counting `skipped_records` from where it was). `None`: the source
    /// cannot be replayed, and a job that takes checkpoints fails at its first
    /// one naming the source.
    fn position(&self) -> Option<Vec<u8>> {
        None
    }

    /// Resume at a `position` this source's kind returned earlier (called at
    /// most once, before the first `next_batch`). An error (a position that does
    /// not decode, or does not fit the input) fails the job with it.
    fn seek(&mut self, _position: &[u8]) -> Result<(), String> {
        Err("this source cannot resume from a position".to_string())
    }
}

/// A partition of a keyed (or global) stage with one input.
pub trait Operator<In, Out>: Send + 'static {
    fn on_records(&mut self, records: Vec<In>, out: &mut Vec<Out>);
    /// The stage's watermark (the minimum over its inputs) advanced; `i64::MAX` at
    /// the end of input, when everything still held must be emitted.
    fn on_watermark(&mut self, _watermark_ms: i64, _out: &mut Vec<Out>) {}
    /// Whether `on_watermark` left work for later: what it fires is done a
    /// step at a time (a window of a million keys would otherwise hold its
    /// shard for tens of ms). The engine then calls `fire_more` in later
    /// turns, and hands the operator nothing else, nor passes its watermark
    /// on, until that is done.
    fn firing(&self) -> bool {
        false
    }
    /// One more step of what `on_watermark` left; true once nothing is left.
    fn fire_more(&mut self, _out: &mut Vec<Out>) -> bool {
        true
    }
    /// Records that arrived behind the watermark (for a window that had already
    /// fired) so far; the engine adds them up per job as `late`.
    fn late_records(&self) -> u64 {
        0
    }
    /// The operator's state by key group (see `state`), which checkpoints write
    /// and deactivation saves; `None` for an operator that keeps nothing between
    /// calls, whose stage may then run in parallel mode (see `reroute`): its
    /// records of one key spread over its partitions, so it must not count on
    /// seeing all of a key's records, or in order. Required, so that no operator can hold state the engine does not
    /// know of and lose it silently. The engine never reads it while
    /// `firing`. State of a key lives in the group of the key its input is
    /// routed by: when the stage is rerouted, each group moves to its new
    /// owner (see `reroute`), unless the operator `keeps_partials`.
    fn state(&mut self) -> Option<&mut dyn Stateful>;
    /// Whether its state holds partials that a later stage merges (a
    /// mergeable aggregate's first phase, its state not keyed by the key its
    /// input is routed by): when its stage is rerouted it keeps what it
    /// holds and fires it where it is, and a group's new owner starts
    /// partials of its own.
    fn keeps_partials(&self) -> bool {
        false
    }
    /// Whether its output is the same whatever the order its records come
    /// in between two watermarks (a window's aggregate: it emits only when
    /// the watermark fires a window). Then the stateless steps fused into
    /// the stage that feeds it may be split out of that stage onto relays
    /// (see `Stream` and "The autoscaler" in ARCHITECTURE.md), which mixes
    /// the order of records of one key; the default, no, keeps them fused.
    fn accepts_unordered(&self) -> bool {
        false
    }
}

/// A partition of a keyed stage with two inputs, partitioned alike so that equal
/// keys meet: `left` (input 0) and `right` (input 1).
pub trait JoinOperator<L, R, Out>: Send + 'static {
    fn on_left(&mut self, records: Vec<L>, out: &mut Vec<Out>);
    fn on_right(&mut self, records: Vec<R>, out: &mut Vec<Out>);
    /// As [`Operator::on_watermark`]: the minimum over both inputs.
    fn on_watermark(&mut self, _watermark_ms: i64, _out: &mut Vec<Out>) {}
    /// As [`Operator::late_records`].
    fn late_records(&self) -> u64 {
        0
    }
    /// As [`Operator::state`].
    fn state(&mut self) -> Option<&mut dyn Stateful>;
}

/// A partition of a sink.
pub trait Sink<T>: Send + 'static {
    fn write(&mut self, records: &[T]);
    /// The end of input reached this partition.
    fn finish(&mut self) {}
    /// Whether a fresh sink from the factory would do just what this one does
    /// (it keeps nothing of its own: it counts, or hands rows to shared
    /// storage). Then an idle partition may be deactivated mid-job and made
    /// anew when rows come. A sink that owns a writer or buffers rows says no
    /// (the default), and stays active until its input ends.
    fn stateless(&self) -> bool {
        false
    }
    /// A checkpoint barrier reached this partition: what was written since the
    /// last one belongs to checkpoint `epoch`. A sink with exactly-once output
    /// returns its staged rows ([`Sealed`]), which the job's checkpointer makes
    /// durable and appends to their output only once the checkpoint commits. The
    /// default, nothing, suits sinks whose output is not kept (counting, tests):
    /// after a restore they see the replayed rows again.
    fn seal(&mut self, _epoch: u64) -> Result<Vec<Sealed>, String> {
        Ok(Vec::new())
    }
}

pub type SourceFactory<T> = Arc<dyn Fn(u32, u32) -> Box<dyn Source<T>> + Send + Sync>;
pub type OperatorFactory<In, Out> = Arc<dyn Fn(u32) -> Box<dyn Operator<In, Out>> + Send + Sync>;
pub type JoinFactory<L, R, Out> =
    Arc<dyn Fn(u32) -> Box<dyn JoinOperator<L, R, Out>> + Send + Sync>;
pub type SinkFactory<T> = Arc<dyn Fn(u32) -> Box<dyn Sink<T>> + Send + Sync>;
pub type KeyFn<T> = Arc<dyn Fn(&T) -> u64 + Send + Sync>;
/// Refines a message's deadline for the stage it goes to.
pub type DeadlineHook = Arc<dyn Fn(&SchedCtx, u32) -> u64 + Send + Sync>;

/// One consumer of a stage's output: the fused steps and the partitioning into
/// sends, as one function of the stage's output batch. Arguments: the batch, the
/// plan, the sending partition and its routing, the sending actor's context.
pub(crate) type Route<T> =
    Arc<dyn Fn(Records<'_, T>, &Plan, &Sender<'_>, &mut Context<'_, DataMsg>) + Send + Sync>;

/// Who sends through a route: the sending partition, and the key-group
/// tables it routes rerouted stages by (see `reroute`).
pub(crate) struct Sender<'a> {
    pub partition: u32,
    pub owners: &'a Owners,
}

/// The owner of each key group of the stages a partition has been told to
/// reroute (`DataMsg::Reroute`), by stage: few entries, none until the first
/// reroute (the stage's contiguous ranges hold until then).
#[derive(Clone, Default)]
pub(crate) struct Owners(Vec<(u32, u64, Arc<[u32]>)>);

impl Owners {
    /// The table `stage` is routed by, if it was ever rerouted.
    #[inline]
    pub(crate) fn of(&self, stage: u32) -> Option<&[u32]> {
        self.0
            .iter()
            .find(|(s, _, _)| *s == stage)
            .map(|(_, _, owners)| &owners[..])
    }

    /// The version of `stage`'s table in force here (0: never rerouted).
    pub(crate) fn version(&self, stage: u32) -> u64 {
        self.0
            .iter()
            .find(|(s, _, _)| *s == stage)
            .map_or(0, |(_, v, _)| *v)
    }

    pub(crate) fn set(&mut self, stage: u32, version: u64, owners: Arc<[u32]>) {
        match self.0.iter_mut().find(|(s, _, _)| *s == stage) {
            Some(entry) => *entry = (stage, version, owners),
            None => self.0.push((stage, version, owners)),
        }
    }

    /// As saved with an actor: `(stage, version, owners)`.
    pub(crate) fn to_saved(&self) -> Vec<(u32, u64, Vec<u32>)> {
        self.0
            .iter()
            .map(|(s, v, o)| (*s, *v, o.to_vec()))
            .collect()
    }

    /// Take `other`'s table of each stage it is newer for.
    pub(crate) fn at_least(mut self, other: &Owners) -> Self {
        for (stage, version, owners) in &other.0 {
            if *version > self.version(*stage) {
                self.set(*stage, *version, owners.clone());
            }
        }
        self
    }

    pub(crate) fn from_saved(saved: &[(u32, u64, Vec<u32>)]) -> Self {
        Owners(
            saved
                .iter()
                .map(|(s, v, o)| (*s, *v, Arc::from(&o[..])))
                .collect(),
        )
    }
}

/// A batch on its way through one route's steps. A stage with several
/// consumers gives the batch itself to the last route and lends it to the
/// others, so that a step which drops records (`filter`) copies only the ones it
/// keeps: a branch taking 2% of a source's records copies 2%, not all of them.
pub(crate) enum Records<'a, T> {
    Owned(Vec<T>),
    Shared(&'a [T]),
}

/// A step's pass over lent records, on copies of them. Kept out of line so that
/// the owned path, the hot one, stays small enough for its in-place collect to
/// be inlined.
#[inline(never)]
fn lent<T: Clone, R>(
    records: &[T],
    pass: impl FnOnce(std::iter::Cloned<std::slice::Iter<'_, T>>) -> R,
) -> R {
    pass(records.iter().cloned())
}

/// `filter` over lent records: only the records kept are copied.
#[inline(never)]
fn lent_filter<T: Clone>(records: &[T], keep: impl Fn(&T) -> bool) -> Vec<T> {
    records.iter().filter(|r| keep(r)).cloned().collect()
}

impl<T: Clone> Records<'_, T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Records::Owned(records) => records,
            Records::Shared(records) => records,
        }
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// The records as a vector of their own (a copy only if lent).
    fn into_vec(self) -> Vec<T> {
        match self {
            Records::Owned(records) => records,
            Records::Shared(records) => records.to_vec(),
        }
    }
}

/// Builds the actor of one `(job, stage, partition)`, with the bookkeeping it
/// saved when it was deactivated.
pub(crate) type Activate =
    Box<dyn Fn(&Arc<Plan>, ActorId, Option<actors::Saved>) -> BoxActor<DataMsg> + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StageKind {
    Source,
    Operator,
    Sink,
    /// A hidden stage that runs the steps fused into a producer's edge when
    /// the autoscaler splits them out of it (`Plan::unchained`): stateless,
    /// never rerouted, as many partitions as the run has shards (none when
    /// the job is fixed or its producer has that many already).
    Relay,
}

pub(crate) struct StagePlan {
    pub name: String,
    pub parallelism: u32,
    pub kind: StageKind,
    /// Parallelism of the upstream stage(s) feeding each input.
    pub inputs: Vec<u32>,
    /// `(target stage, input)` of every consumer, in the order of `routes`.
    pub targets: Vec<(u32, u8)>,
    /// What its partition `p` is called on its output channels: `p +
    /// from_base`. 0 but for a relay, whose partitions follow its
    /// producer's on the consumer's input (the consumer keeps a watermark,
    /// marker and barrier per channel, direct ones first).
    pub from_base: u32,
    /// A keyed stage whose operator keeps partials (`keeps_partials`) or no
    /// state (`state` is `None`): it may run in parallel mode.
    pub parallelizable: bool,
    /// `Vec<Route<Out>>` for the stage's output type `Out`.
    pub routes: Box<dyn Any + Send + Sync>,
    pub activate: Activate,
}

impl StagePlan {
    /// The routes of a stage whose output type is `T`.
    pub(crate) fn routes<T: 'static>(&self) -> Vec<Route<T>> {
        self.routes
            .downcast_ref::<Vec<Route<T>>>()
            .unwrap_or_else(|| panic!("stage {} does not output this type", self.name))
            .clone()
    }
}

/// A job ready to run.
pub struct Plan {
    pub name: String,
    pub id: JobId,
    pub slo_ns: u64,
    pub(crate) stages: Vec<StagePlan>,
    pub(crate) metrics: Arc<JobMetrics>,
    pub(crate) deadline_hook: Option<DeadlineHook>,
    /// Records a source partition produces per turn at most.
    pub source_batch_records: usize,
    /// Records per second over all source partitions, step by step; `None`: as
    /// fast as it goes.
    pub pace: Option<RateSchedule>,
    /// Key groups of the job (`Job::key_groups`).
    pub key_groups: u32,
    /// The autoscaler may move the job's actors (`Job::autoscale`).
    pub autoscale: bool,
    /// Checkpoints of the job, if it takes any.
    pub(crate) checkpointer: Option<Arc<Checkpointer>>,
    /// Per stage, its reroutes (keyed stages only; see `reroute`).
    pub(crate) reroutes: Vec<super::reroute::RerouteSlot>,
    /// Held while a reroute of the job is checked and ordered.
    pub(crate) reroute_order: std::sync::Mutex<()>,
    /// Per stage, whether its fused steps toward consumers with relays go
    /// through the relays (`Plan::unchain`); read once per output batch.
    pub(crate) unchained: Vec<std::sync::atomic::AtomicBool>,
    /// A restored job's tables as of its checkpoint (`RerouteSlot::restore`):
    /// a feeder routes by these at least, whatever its own part held (a
    /// relay partition new in this run has none, one that a run on fewer
    /// shards did not have an older one).
    pub(crate) restored_tables: Owners,
    /// Over nodes, the job's monitor on each node, in node order
    /// (partition: the node's first shard, stage `MONITOR_STAGE`): sink
    /// partitions tell every one that they ended, and keyed partitions
    /// tell node 0's that they completed a reroute. Empty on one node,
    /// where the plan itself is told.
    pub(crate) monitors: Vec<ActorId>,
    /// Over nodes: this node's place, and how to reach the other nodes'
    /// monitors (set once the runtime runs).
    pub(crate) me: Option<usize>,
    pub(crate) post: Arc<std::sync::OnceLock<super::checkpoint::Post>>,
    /// Over nodes: the other nodes' shards' loads, as their monitors of
    /// this job (or any other) are told them (`DataMsg::NodeLoads`).
    pub(crate) remote_loads: super::RemoteLoads,
    /// A failure of the job here was told to the other nodes (or needs no
    /// telling): the job may be retired here (see `Plan::fail`).
    pub(crate) failure_told: Arc<std::sync::atomic::AtomicBool>,
}

impl Plan {
    pub(crate) fn source_stages(&self) -> Vec<(u32, u32)> {
        self.stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == StageKind::Source)
            .map(|(i, s)| (i as u32, s.parallelism))
            .collect()
    }

    /// `JobSample::splittable`: keyed stages of several partitions.
    pub(crate) fn splittable(&self) -> u64 {
        self.stage_bits(|s| s.kind == StageKind::Operator && s.parallelism > 1)
    }

    /// `JobSample::crossable`: keyed stages, over nodes (their actors may
    /// move to another node's shard, with their state).
    pub(crate) fn crossable(&self) -> u64 {
        match self.me {
            Some(_) => self.stage_bits(|s| s.kind == StageKind::Operator),
            None => 0,
        }
    }

    /// `JobSample::parallelizable`: splittable stages that keep partials or
    /// no state.
    pub(crate) fn parallelizable(&self) -> u64 {
        self.stage_bits(|s| s.parallelizable) & self.splittable()
    }

    /// `JobSample::unchainable`: stages with a relay of some partitions on
    /// an edge, whose fused steps may be split out onto it.
    pub(crate) fn unchainable(&self) -> u64 {
        self.stage_bits(|s| {
            s.targets.iter().any(|&(t, _)| {
                let target = &self.stages[t as usize];
                target.kind == StageKind::Relay && target.parallelism > 0
            })
        })
    }

    /// `JobSample::relays`: the relay stages of some partitions.
    pub(crate) fn relays(&self) -> u64 {
        self.stage_bits(|s| s.kind == StageKind::Relay && s.parallelism > 0)
    }

    /// Whether `stage` sends what its fused steps take through its relays.
    #[inline]
    pub(crate) fn unchained(&self, stage: u32) -> bool {
        self.unchained[stage as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Split `stage`'s fused steps out onto their relays (`on`), or fuse
    /// them back. Each output batch goes one way whole: a batch already
    /// routed one way is not sent the other. Watermarks, barriers and
    /// markers go down both ways whatever the mode, so the consumer, which
    /// keeps the least over every channel, stays exact across the switch.
    /// Returns whether `stage` has relays to switch to.
    pub(crate) fn unchain(&self, stage: u32, on: bool) -> bool {
        if self.unchainable() & 1u64.checked_shl(stage).unwrap_or(0) == 0 {
            return false;
        }
        self.unchained[stage as usize].store(on, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Bit `i` set for each of the first 64 stages that passes `keep`.
    fn stage_bits(&self, keep: impl Fn(&StagePlan) -> bool) -> u64 {
        self.stages
            .iter()
            .take(64)
            .enumerate()
            .filter(|(_, s)| keep(s))
            .fold(0, |bits, (i, _)| bits | 1 << i)
    }

    /// The table `stage` is routed by: the newest ordered, or its
    /// contiguous ranges if it was never rerouted.
    pub(crate) fn table(&self, stage: u32) -> Arc<[u32]> {
        let (_, owners, _) = self.reroutes[stage as usize].get();
        owners.unwrap_or_else(|| {
            let parallelism = self.stages[stage as usize].parallelism;
            initial_owners(parallelism, self.key_groups).into()
        })
    }

    /// A stage whose reroute is under way: `(stage, version, partitions
    /// done)`; `None` when every partition completed its last.
    pub(crate) fn rerouting(&self) -> Option<(u32, u64, u32)> {
        self.stages.iter().enumerate().find_map(|(i, s)| {
            let (version, _, done) = self.reroutes[i].get();
            (version > 0 && done < s.parallelism).then_some((i as u32, version, done))
        })
    }

    /// End the job with `message` (the first failure stands). Over nodes
    /// the other nodes' monitors are told too (`DataMsg::JobFailed`), from
    /// a thread of its own (the caller may be a shard, which must not wait
    /// on its own queue); `Dataflow::wait` retires the job here only once
    /// the notices were handed to the runtime (a message for a retired job
    /// is dropped, even one on its way to another node), for 2 s at most.
    /// Handed over is not yet sent: see ARCHITECTURE.md, "A dataflow over
    /// nodes", for the cases a notice is lost.
    pub(crate) fn fail(&self, message: String) {
        use std::sync::atomic::Ordering;
        if !self.metrics.fail(message.clone()) {
            return;
        }
        let Some((me, post)) = self.me.zip(self.post.get().cloned()) else {
            self.failure_told.store(true, Ordering::Release);
            return;
        };
        let others: Vec<ActorId> = (self.monitors.iter().enumerate())
            .filter(|&(node, _)| node != me)
            .map(|(_, &monitor)| monitor)
            .collect();
        let told = self.failure_told.clone();
        std::thread::spawn(move || {
            for monitor in others {
                post(
                    monitor,
                    DataMsg::JobFailed {
                        error: message.clone(),
                    },
                );
            }
            told.store(true, Ordering::Release);
        });
    }

    /// The job failed on another node, which told this one (and the
    /// others). If it had failed here first, this node's own telling is
    /// under way and sets `failure_told` when done.
    pub(crate) fn failed_elsewhere(&self, message: String) {
        if self.metrics.fail(message) {
            self.failure_told
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// A sink partition saw the end of its input: told to the plan, or over
    /// nodes to every node's monitor of the job.
    pub(crate) fn sink_done(&self, ctx: &mut crate::actor::Context<'_, DataMsg>) {
        if self.monitors.is_empty() {
            return self.metrics.sink_done(ctx.clock_ns());
        }
        // Uncredited (one per sink partition and monitor): a send waiting
        // for credit would be dropped with the sink if its node retired the
        // job first, and the other node would never see it end.
        let sched = ctx.sched();
        for &monitor in &self.monitors {
            ctx.send_uncredited(monitor, DataMsg::SinkDone, sched);
        }
    }

    /// A partition of `stage` completed its reroute to `version`: told to
    /// the plan, or over nodes to node 0's monitor, where reroutes are
    /// ordered.
    pub(crate) fn reroute_done(
        &self,
        stage: u32,
        version: u64,
        ctx: &mut crate::actor::Context<'_, DataMsg>,
    ) {
        match self.monitors.first() {
            None => self.rerouted(stage, version),
            // Uncredited: one per partition and reroute.
            Some(&monitor) => {
                let sched = ctx.sched();
                ctx.send_uncredited(monitor, DataMsg::RerouteDone { stage, version }, sched);
            }
        }
    }

    /// A partition of `stage` completed its reroute to `version`.
    pub(crate) fn rerouted(&self, stage: u32, version: u64) {
        let Some(slot) = self.reroutes.get(stage as usize) else {
            return;
        };
        let done = slot.completed(version);
        if done == self.stages[stage as usize].parallelism {
            if let Some(checkpointer) = &self.checkpointer {
                checkpointer.end_reroute();
            }
        }
    }

    pub(crate) fn sink_partitions(&self) -> u64 {
        self.stages
            .iter()
            .filter(|s| s.kind == StageKind::Sink)
            .map(|s| s.parallelism as u64)
            .sum()
    }

    pub(crate) fn actor_ids(&self, job: JobId) -> Vec<ActorId> {
        let mut ids = Vec::new();
        for (stage, plan) in self.stages.iter().enumerate() {
            for partition in 0..plan.parallelism {
                ids.push(ActorId::new(job, stage as u32, partition));
            }
        }
        ids
    }

    /// Estimated cost of everything after `stage` on its longest path, in ns, as
    /// measured on `shard`.
    fn rest_cost_ns(&self, shard: ShardId, stage: u32) -> u64 {
        self.stages[stage as usize]
            .targets
            .iter()
            .map(|&(target, _)| {
                self.metrics
                    .stage_cost_ns(shard, target)
                    .saturating_add(self.rest_cost_ns(shard, target))
            })
            .max()
            .unwrap_or(0)
    }

    /// The deadline of a message going to `stage`: it must be done there in time for
    /// the rest of the path to finish within the SLO.
    pub(crate) fn deadline_ns(&self, sched: &SchedCtx, shard: ShardId, stage: u32) -> u64 {
        if let Some(hook) = &self.deadline_hook {
            return hook(sched, stage);
        }
        sched
            .origin_ns
            .saturating_add(self.slo_ns)
            .saturating_sub(self.rest_cost_ns(shard, stage))
    }

    /// `sched` with the deadline for `stage`.
    pub(crate) fn stamp(&self, sched: SchedCtx, shard: ShardId, stage: u32) -> SchedCtx {
        SchedCtx {
            deadline_ns: self.deadline_ns(&sched, shard, stage),
            ..sched
        }
    }
}

#[derive(Default)]
struct Builder {
    stages: Vec<StagePlan>,
    /// Relay stages (`add_relay`), numbered after every stage of the job
    /// when the plan is made, so that the job's own stages keep the numbers
    /// they were built with (and a checkpoint of the job before relays
    /// existed still matches it). Each with the cell its number goes in.
    relays: Vec<(StagePlan, Arc<std::sync::OnceLock<u32>>)>,
}

/// The target a producer names its relay `i` by until the plan numbers it
/// (`Job::into_plan_as`).
const RELAY_PENDING: u32 = 1 << 30;

/// A job under construction.
pub struct Job {
    name: String,
    slo: Duration,
    graph: Rc<RefCell<Builder>>,
    deadline_hook: Option<DeadlineHook>,
    source_batch_records: usize,
    pace: Option<RateSchedule>,
    key_groups: u32,
    autoscale: bool,
    relays: Option<bool>,
    checkpoints: Option<CheckpointOptions>,
}

/// Attaches a consumer (`target`, `input`, the route of `T` records) to the stage
/// that produces the stream, through the steps fused so far; with a relay
/// the steps may be split out onto (the last argument).
type Attach<T> = Rc<dyn Fn(&mut Builder, u32, u8, Route<T>, bool)>;

/// A stream of `T` records produced by a stage, with the stateless steps applied
/// so far.
///
/// The steps run in the producing stage's actors, so they have its
/// parallelism. Where the consumer takes its input in any order (a sink, an
/// operator that `accepts_unordered`) and the job may scale, the edge also
/// gets a hidden *relay* stage: the producer sends its watermarks, barriers
/// and markers to the relay's partitions too, and once the autoscaler finds
/// the producer's shard overloaded by them it splits the steps out
/// (`Plan::unchain`): each output batch then goes whole to the relay
/// partition with the least backlog, which runs the steps and sends on.
pub struct Stream<T> {
    graph: Rc<RefCell<Builder>>,
    stage: u32,
    attach: Attach<T>,
    /// Steps were applied since the stage.
    chained: bool,
}

impl<T> Clone for Stream<T> {
    fn clone(&self) -> Self {
        Stream {
            graph: self.graph.clone(),
            stage: self.stage,
            attach: self.attach.clone(),
            chained: self.chained,
        }
    }
}

/// A stream partitioned by key, ready for a keyed stage.
pub struct KeyedStream<T> {
    stream: Stream<T>,
    key: KeyFn<T>,
}

impl Job {
    pub fn new(name: &str, slo: Duration) -> Self {
        Job {
            name: name.to_string(),
            slo,
            graph: Rc::new(RefCell::new(Builder::default())),
            deadline_hook: None,
            source_batch_records: 1024,
            pace: None,
            key_groups: super::KEY_GROUPS_DEFAULT,
            autoscale: true,
            relays: None,
            checkpoints: None,
        }
    }

    /// Key groups of the job: the unit keyed state is kept, checkpointed and
    /// moved in. Fixed for the job's life (a resumed job must say the same).
    pub fn key_groups(&mut self, groups: u32) -> &mut Self {
        self.key_groups = groups.max(1);
        self
    }

    /// Whether the engine's autoscaler may move the job's actors (default
    /// yes); a job whose placement is fixed for an experiment says no.
    pub fn autoscale(&mut self, on: bool) -> &mut Self {
        self.autoscale = on;
        self
    }

    /// Whether the job's steps may be split out onto relays (see `Stream`).
    /// By default they may where the engine runs an autoscaler, on one node
    /// (over nodes every node must make the same plan, whatever its own
    /// autoscaler: say yes on every node). A job whose sinks need each
    /// producer partition's rows in the order it made them says no: its
    /// steps always run fused. Yes builds the relays with no autoscaler too,
    /// for `Dataflow::unchain`; a job that may not scale
    /// (`Job::autoscale(false)`) never has relays.
    pub fn relays(&mut self, on: bool) -> &mut Self {
        self.relays = Some(on);
        self
    }

    /// Whether it takes checkpoints (`Job::checkpoints`).
    pub fn takes_checkpoints(&self) -> bool {
        self.checkpoints.is_some()
    }

    /// Whether the autoscaler may move the job's actors (`autoscale`).
    pub fn scalable(&self) -> bool {
        self.autoscale
    }

    /// Take checkpoints (see `checkpoint`): sources inject barriers every
    /// `options.interval`, state and staged output go to `options.dir`, and a job
    /// submitted again with the same directory resumes from its last complete
    /// checkpoint.
    pub fn checkpoints(&mut self, options: CheckpointOptions) -> &mut Self {
        self.checkpoints = Some(options);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pace the sources: `records_per_s` in total (at least 1), split evenly
    /// over source partitions.
    pub fn rate(&mut self, records_per_s: Option<u64>) -> &mut Self {
        self.pace(records_per_s.map(|r| RateSchedule::constant(r.max(1))))
    }

    /// Pace the sources by a schedule of rates (see `pace`): each step's rate in
    /// total, split evenly over source partitions, each partition following the
    /// schedule in wall time from its first turn.
    pub fn pace(&mut self, schedule: Option<RateSchedule>) -> &mut Self {
        self.pace = schedule;
        self
    }

    pub fn source_batch_records(&mut self, records: usize) -> &mut Self {
        self.source_batch_records = records.max(1);
        self
    }

    /// Replace the default deadline rule (origin + SLO - cost of the rest of the path).
    pub fn deadline_hook(&mut self, hook: DeadlineHook) -> &mut Self {
        self.deadline_hook = Some(hook);
        self
    }

    pub fn source<T: Data>(
        &mut self,
        name: &str,
        parallelism: u32,
        factory: SourceFactory<T>,
    ) -> Stream<T> {
        let activate: Activate = Box::new(move |plan, id, saved| {
            actors::source_actor::<T>(plan, id, factory.clone(), saved)
        });
        let stage = add_stage::<T>(
            &self.graph,
            name,
            parallelism,
            StageKind::Source,
            vec![],
            activate,
        );
        Stream::of_stage(self.graph.clone(), stage)
    }

    /// The plan on `shards`, as under an autoscaler (relays by default).
    #[cfg(test)]
    pub(crate) fn into_plan(self, id: JobId, shards: usize) -> Result<Plan, String> {
        self.into_plan_as(id, shards, Role::Alone, true)
    }

    /// As `into_plan`, its checkpointer taking `role` in a dataflow over
    /// nodes; relays unless the job says otherwise where `relays_by_default`
    /// (`Job::relays`).
    pub(crate) fn into_plan_as(
        self,
        id: JobId,
        shards: usize,
        role: Role,
        relays_by_default: bool,
    ) -> Result<Plan, String> {
        let (mut stages, relays) = {
            let mut builder = self.graph.borrow_mut();
            let relays = std::mem::take(&mut builder.relays);
            (std::mem::take(&mut builder.stages), relays)
        };
        if stages.is_empty() {
            return Err(format!("job {} has no stages", self.name));
        }
        // The relays come after the job's own stages.
        let first_relay = stages.len() as u32;
        for (i, (relay, number)) in relays.into_iter().enumerate() {
            let _ = number.set(first_relay + i as u32);
            stages.push(relay);
        }
        for stage in &mut stages {
            for target in stage.targets.iter_mut().filter(|t| t.0 >= RELAY_PENDING) {
                target.0 = target.0 - RELAY_PENDING + first_relay;
            }
        }
        // A relay has a partition per shard of the run where its producer has
        // fewer and the autoscaler may split its steps out; else none (its
        // producer always runs them).
        let relays_on = self.autoscale && self.relays.unwrap_or(relays_by_default);
        for relay in first_relay as usize..stages.len() {
            let producers = stages[relay].inputs[0];
            let partitions = match relays_on && shards as u32 > producers {
                true => shards as u32,
                false => 0,
            };
            stages[relay].parallelism = partitions;
            stages[relay].from_base = producers;
            let (target, input) = stages[relay].targets[0];
            stages[target as usize].inputs[input as usize] += partitions;
        }
        for stage in &stages {
            if stage.parallelism == 0 && stage.kind != StageKind::Relay {
                return Err(format!(
                    "stage {} of job {} has parallelism 0",
                    stage.name, self.name
                ));
            }
            if stage.kind != StageKind::Sink && stage.targets.is_empty() {
                return Err(format!(
                    "stage {} of job {} has no consumer: end every stream in a sink",
                    stage.name, self.name
                ));
            }
        }
        let slo_ns = self.slo.as_nanos().min(u64::MAX as u128) as u64;
        let stages_len = stages.len();
        let metrics = Arc::new(JobMetrics::new(shards, stages.len()));
        let checkpointer = match self.checkpoints {
            Some(options) => {
                // Relays keep nothing but their channels' watermarks, and how
                // many there are follows the shards: a checkpoint is the
                // job's own stages' (a restored consumer meets the relays it
                // has now, `actors::Watermarks::restore`).
                let shape = stages
                    .iter()
                    .filter(|s| s.kind != StageKind::Relay)
                    .map(|s| (s.name.clone(), s.parallelism))
                    .collect();
                let checkpointer =
                    Checkpointer::open(options, &self.name, shape, self.key_groups, role)?;
                Some(Arc::new(checkpointer))
            }
            None => None,
        };
        let reroutes: Vec<super::reroute::RerouteSlot> =
            (0..stages_len).map(|_| Default::default()).collect();
        let mut restored_tables = Owners::default();
        if let Some(checkpointer) = &checkpointer {
            // A restored job goes on with the tables its checkpoint's
            // partitions had (every reroute had completed at the cut).
            for (i, stage) in stages.iter().enumerate() {
                let restored = checkpointer
                    .restored_metas(i as u32)
                    .iter()
                    .filter_map(|meta| actors::restored_table(meta))
                    .max_by_key(|(version, _)| *version);
                if let Some((version, owners)) = restored {
                    let owners: Arc<[u32]> = owners.into();
                    restored_tables.set(i as u32, version, owners.clone());
                    reroutes[i].restore(version, owners, stage.parallelism);
                }
            }
        }
        Ok(Plan {
            name: self.name,
            id,
            slo_ns,
            metrics,
            stages,
            deadline_hook: self.deadline_hook,
            source_batch_records: self.source_batch_records,
            pace: self.pace,
            key_groups: self.key_groups,
            autoscale: self.autoscale,
            checkpointer,
            reroutes,
            reroute_order: std::sync::Mutex::new(()),
            unchained: (0..stages_len).map(|_| Default::default()).collect(),
            restored_tables,
            monitors: Vec::new(),
            me: None,
            post: Arc::new(std::sync::OnceLock::new()),
            remote_loads: super::RemoteLoads::default(),
            failure_told: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }
}

/// Add a stage whose output type is `Out`; returns its index.
fn add_stage<Out: Data>(
    graph: &Rc<RefCell<Builder>>,
    name: &str,
    parallelism: u32,
    kind: StageKind,
    inputs: Vec<u32>,
    activate: Activate,
) -> u32 {
    let mut graph = graph.borrow_mut();
    graph.stages.push(StagePlan {
        name: name.to_string(),
        parallelism,
        kind,
        inputs,
        targets: Vec::new(),
        from_base: 0,
        parallelizable: false,
        routes: Box::new(Vec::<Route<Out>>::new()),
        activate,
    });
    (graph.stages.len() - 1) as u32
}

/// Records one message carries at most: a larger output (a window operator
/// firing everything at the end of input) leaves in several messages, so a
/// mailbox bounded in messages is bounded in records too.
pub const BATCH_RECORDS_MAX: usize = 4_096;

/// Send one partition's records to `(target, partition)` as input `input`.
#[inline]
fn send_records<T: Data>(
    plan: &Plan,
    sched: SchedCtx,
    ctx: &mut Context<'_, DataMsg>,
    (target, input): (u32, u8),
    (from, partition): (u32, u32),
    records: Vec<T>,
) {
    let to = ActorId::new(plan.id, target, partition);
    if records.len() <= BATCH_RECORDS_MAX {
        let batch = Batch::new(records);
        ctx.send_with(to, DataMsg::Records { input, from, batch }, sched);
        return;
    }
    let mut rest = records.into_iter();
    loop {
        let chunk: Vec<T> = rest.by_ref().take(BATCH_RECORDS_MAX).collect();
        if chunk.is_empty() {
            return;
        }
        let batch = Batch::new(chunk);
        ctx.send_with(to, DataMsg::Records { input, from, batch }, sched);
    }
}

/// Upstream partition i feeds partition i modulo the target's parallelism.
fn forward_route<T: Data>(target: (u32, u8), parallelism: u32) -> Route<T> {
    Arc::new(move |records: Records<'_, T>, plan, from, ctx| {
        if records.is_empty() {
            return;
        }
        let sched = plan.stamp(ctx.sched(), ctx.shard(), target.0);
        let from = from.partition;
        send_records(
            plan,
            sched,
            ctx,
            target,
            (from, from % parallelism),
            records.into_vec(),
        );
    })
}

/// By key: key -> key group -> the partition that owns the group (by the
/// sender's table for the stage once it was rerouted, else by contiguous
/// ranges).
fn keyed_route<T: Data>(target: (u32, u8), parallelism: u32, key: KeyFn<T>) -> Route<T> {
    // The owner of each key group, made once (the plan's key groups are known
    // at the first call): a load per record instead of a division.
    let ranges: std::sync::OnceLock<Box<[u32]>> = std::sync::OnceLock::new();
    Arc::new(move |records: Records<'_, T>, plan, sender, ctx| {
        if records.is_empty() {
            return;
        }
        let sched = plan.stamp(ctx.sched(), ctx.shard(), target.0);
        let from = sender.partition;
        if parallelism == 1 {
            send_records(plan, sched, ctx, target, (from, 0), records.into_vec());
            return;
        }
        let groups = plan.key_groups;
        let owners = match sender.owners.of(target.0) {
            Some([]) => {
                // Parallel mode: the whole batch to the partition with the
                // least backlog.
                let p = least_backlog(plan, ctx, (target.0, parallelism), from);
                send_records(plan, sched, ctx, target, (from, p), records.into_vec());
                return;
            }
            Some(owners) => owners,
            None => ranges.get_or_init(|| initial_owners(parallelism, groups).into()),
        };
        let expected = records.len() / parallelism as usize + 16;
        let mut parts: Vec<Vec<T>> = (0..parallelism).map(|_| Vec::new()).collect();
        let place = |record: T| {
            let p = owners[key_group(key(&record), groups) as usize] as usize;
            let part = &mut parts[p];
            if part.capacity() == 0 {
                part.reserve(expected);
            }
            part.push(record);
        };
        match records {
            Records::Owned(records) => records.into_iter().for_each(place),
            Records::Shared(records) => records.iter().cloned().for_each(place),
        }
        for (p, part) in parts.into_iter().enumerate() {
            if !part.is_empty() {
                send_records(plan, sched, ctx, target, (from, p as u32), part);
            }
        }
    })
}

/// A keyed stage's owner of each key group until it is rerouted: contiguous
/// ranges.
pub(crate) fn initial_owners(parallelism: u32, groups: u32) -> Vec<u32> {
    (0..groups)
        .map(|g| partition_of_group(g, parallelism, groups))
        .collect()
}

/// Add `route` as the route of `stage`'s output to `(target, input)`.
fn push_route<T: Data>(builder: &mut Builder, stage: u32, target: (u32, u8), route: Route<T>) {
    let plan = &mut builder.stages[stage as usize];
    plan.targets.push(target);
    plan.routes
        .downcast_mut::<Vec<Route<T>>>()
        .expect("a stream's type is its stage's output type")
        .push(route);
}

/// A relay of `T` records: hands each batch on as it came, to run its
/// edge's steps (its route) in its own partition. Keeps nothing.
struct Relay;

impl<T: Data> Operator<T, T> for Relay {
    fn on_records(&mut self, records: Vec<T>, out: &mut Vec<T>) {
        if out.is_empty() {
            *out = records;
        } else {
            out.extend(records);
        }
    }
    fn state(&mut self) -> Option<&mut dyn Stateful> {
        None
    }
}

/// Give `producer`'s edge to `(target, input)` a relay stage (sized at
/// `Job::into_plan_as`): the relay takes the producer's records as they
/// are and runs the edge's `route` (its steps, then the consumer's
/// partitioning) in its own partitions. The producer is also a feeder of
/// the relay (an empty route: it gets the producer's watermarks, barriers
/// and markers whatever the mode). Returns the producer's route of the
/// edge: `route` itself while the steps are fused, else each batch whole
/// to the relay partition with the least backlog.
fn add_relay<T: Data>(
    builder: &mut Builder,
    producer: u32,
    (target, input): (u32, u8),
    route: Route<T>,
) -> Route<T> {
    let name = format!(
        "{}-{}-relay",
        builder.stages[producer as usize].name, builder.stages[target as usize].name
    );
    let activate: Activate = Box::new(move |plan, id, saved| {
        actors::unary_actor::<T, T>(plan, id, Box::new(Relay), saved)
    });
    let number = Arc::new(std::sync::OnceLock::new());
    let pending = RELAY_PENDING + builder.relays.len() as u32;
    let relay = StagePlan {
        name,
        parallelism: 0,
        kind: StageKind::Relay,
        inputs: vec![builder.stages[producer as usize].parallelism],
        targets: vec![(target, input)],
        from_base: 0,
        parallelizable: false,
        routes: Box::new(vec![route.clone()]),
        activate,
    };
    builder.relays.push((relay, number.clone()));
    let nothing: Route<T> = Arc::new(|_, _, _, _| {});
    push_route(builder, producer, (pending, 0), nothing);
    let to_relay = relay_route::<T>(number);
    Arc::new(
        move |records: Records<'_, T>, plan, sender, ctx| match plan.unchained(producer) {
            true => to_relay(records, plan, sender, ctx),
            false => route(records, plan, sender, ctx),
        },
    )
}

/// Of `stage`'s `parallelism` partitions, the one with the least backlog as
/// `from`'s shard sees it (`Context::backlog`), ties broken from a start
/// that moves with time: where parallel mode and relays send a batch.
fn least_backlog(
    plan: &Plan,
    ctx: &Context<'_, DataMsg>,
    (stage, parallelism): (u32, u32),
    from: u32,
) -> u32 {
    let start = (from as u64 ^ ctx.now_ns() >> 10) % parallelism as u64;
    (0..parallelism)
        .map(|i| (start as u32 + i) % parallelism)
        .min_by_key(|&p| ctx.backlog(ActorId::new(plan.id, stage, p)))
        .unwrap_or(0)
}

/// Each batch whole to the partition of the relay numbered `relay` with the
/// least backlog, as parallel mode sends.
fn relay_route<T: Data>(relay: Arc<std::sync::OnceLock<u32>>) -> Route<T> {
    Arc::new(move |records: Records<'_, T>, plan, sender, ctx| {
        let relay = *relay.get().expect("a plan numbers its relays");
        let partitions = plan.stages[relay as usize].parallelism;
        if records.is_empty() || partitions == 0 {
            return;
        }
        let sched = plan.stamp(ctx.sched(), ctx.shard(), relay);
        let from = sender.partition;
        let p = least_backlog(plan, ctx, (relay, partitions), from);
        send_records(plan, sched, ctx, (relay, 0), (from, p), records.into_vec());
    })
}

impl<T: Data> Stream<T> {
    /// The output of `stage` itself, with no steps yet.
    fn of_stage(graph: Rc<RefCell<Builder>>, stage: u32) -> Stream<T> {
        let attach: Attach<T> = Rc::new(move |builder, target, input, route, relay| {
            let route = match relay {
                true => add_relay(builder, stage, (target, input), route),
                false => route,
            };
            push_route(builder, stage, (target, input), route);
        });
        Stream {
            graph,
            stage,
            attach,
            chained: false,
        }
    }

    /// This stream with one more step, `step` turning a route of `U` into a route
    /// of `T` (a pass over the batch before the next route).
    fn then<U: Data>(&self, step: impl Fn(Route<U>) -> Route<T> + 'static) -> Stream<U> {
        let attach = self.attach.clone();
        Stream {
            graph: self.graph.clone(),
            stage: self.stage,
            attach: Rc::new(move |builder, target, input, next: Route<U>, relay| {
                attach(builder, target, input, step(next), relay)
            }),
            chained: true,
        }
    }

    pub fn map<U: Data>(&self, f: impl Fn(T) -> U + Send + Sync + 'static) -> Stream<U> {
        let f = Arc::new(f);
        self.then(move |next: Route<U>| {
            let f = f.clone();
            Arc::new(move |records: Records<'_, T>, plan, from, ctx| {
                // Collects in place when `U` fits in `T`'s allocation.
                let out = match records {
                    Records::Owned(records) => records.into_iter().map(&*f).collect(),
                    Records::Shared(records) => lent(records, |r| r.map(&*f).collect()),
                };
                next(Records::Owned(out), plan, from, ctx)
            })
        })
    }

    pub fn filter(&self, f: impl Fn(&T) -> bool + Send + Sync + 'static) -> Stream<T> {
        let f = Arc::new(f);
        self.then(move |next: Route<T>| {
            let f = f.clone();
            Arc::new(move |records: Records<'_, T>, plan, from, ctx| {
                let kept = match records {
                    Records::Owned(mut records) => {
                        records.retain(|r| f(r));
                        records
                    }
                    // Only the records kept are copied.
                    Records::Shared(records) => lent_filter(records, &*f),
                };
                next(Records::Owned(kept), plan, from, ctx)
            })
        })
    }

    /// Keep and transform in one pass: `Some(u)` goes on, `None` is dropped.
    pub fn filter_map<U: Data>(
        &self,
        f: impl Fn(T) -> Option<U> + Send + Sync + 'static,
    ) -> Stream<U> {
        let f = Arc::new(f);
        self.then(move |next: Route<U>| {
            let f = f.clone();
            Arc::new(move |records: Records<'_, T>, plan, from, ctx| {
                let out = match records {
                    Records::Owned(records) => records.into_iter().filter_map(&*f).collect(),
                    Records::Shared(records) => lent(records, |r| r.filter_map(&*f).collect()),
                };
                next(Records::Owned(out), plan, from, ctx)
            })
        })
    }

    /// `filter_map` with a function of a borrowed record: a branch lent its
    /// stage's batch copies only what `f` returns, never the records it drops.
    /// For selecting a few records of many out of a stage that feeds several
    /// consumers (one kind of event out of a source).
    pub fn filter_map_ref<U: Data>(
        &self,
        f: impl Fn(&T) -> Option<U> + Send + Sync + 'static,
    ) -> Stream<U> {
        let f = Arc::new(f);
        self.then(move |next: Route<U>| {
            let f = f.clone();
            Arc::new(move |records: Records<'_, T>, plan, from, ctx| {
                let out = records.as_slice().iter().filter_map(&*f).collect();
                next(Records::Owned(out), plan, from, ctx)
            })
        })
    }

    pub fn flat_map<U: Data>(
        &self,
        f: impl Fn(T, &mut Vec<U>) + Send + Sync + 'static,
    ) -> Stream<U> {
        let f = Arc::new(f);
        self.then(move |next: Route<U>| {
            let f = f.clone();
            Arc::new(move |records: Records<'_, T>, plan, from, ctx| {
                let mut out = Vec::with_capacity(records.len());
                match records {
                    Records::Owned(records) => records.into_iter().for_each(|r| f(r, &mut out)),
                    Records::Shared(records) => lent(records, |r| r.for_each(|r| f(r, &mut out))),
                }
                next(Records::Owned(out), plan, from, ctx)
            })
        })
    }

    pub fn key_by(&self, key: impl Fn(&T) -> u64 + Send + Sync + 'static) -> KeyedStream<T> {
        KeyedStream {
            stream: self.clone(),
            key: Arc::new(key),
        }
    }

    fn upstream_parallelism(&self) -> u32 {
        self.graph.borrow().stages[self.stage as usize].parallelism
    }

    /// Attach consumer `(target, input)`; one that `unordered` takes its
    /// records in any order, so the steps may go through a relay.
    fn connect(&self, target: u32, input: u8, route: Route<T>, unordered: bool) {
        let mut builder = self.graph.borrow_mut();
        (self.attach)(
            &mut builder,
            target,
            input,
            route,
            self.chained && unordered,
        );
    }

    /// End the stream in a sink; upstream partition i feeds sink partition
    /// i modulo `parallelism`. A sink takes its rows in any order: the steps
    /// before it may be split out onto a relay (see `Stream`).
    pub fn sink(&self, name: &str, parallelism: u32, factory: SinkFactory<T>) {
        let inputs = vec![self.upstream_parallelism()];
        let activate: Activate = Box::new(move |plan, id, saved| {
            actors::sink_actor::<T>(plan, id, factory(id.partition), saved)
        });
        let stage = add_stage::<()>(
            &self.graph,
            name,
            parallelism,
            StageKind::Sink,
            inputs,
            activate,
        );
        self.connect(stage, 0, forward_route((stage, 0), parallelism), true);
    }
}

impl<T: Data> KeyedStream<T> {
    /// A keyed stage: each partition owns a range of key groups and sees every
    /// record whose key falls in it, in order per upstream partition.
    pub fn process<Out: Data>(
        &self,
        name: &str,
        parallelism: u32,
        factory: OperatorFactory<T, Out>,
    ) -> Stream<Out> {
        let graph = self.stream.graph.clone();
        let inputs = vec![self.stream.upstream_parallelism()];
        // What kind of operator the factory makes (one is made to ask): one
        // that keeps partials or no state may run in parallel mode.
        let mut probe = factory(0);
        let parallelizable = probe.keeps_partials() || probe.state().is_none();
        let unordered = probe.accepts_unordered();
        let activate: Activate = Box::new(move |plan, id, saved| {
            actors::unary_actor::<T, Out>(plan, id, factory(id.partition), saved)
        });
        let stage = add_stage::<Out>(
            &graph,
            name,
            parallelism,
            StageKind::Operator,
            inputs,
            activate,
        );
        graph.borrow_mut().stages[stage as usize].parallelizable = parallelizable;
        let route = keyed_route((stage, 0), parallelism, self.key.clone());
        self.stream.connect(stage, 0, route, unordered);
        Stream::of_stage(graph, stage)
    }

    /// A keyed stage with two inputs, this stream as the left (input 0) and
    /// `other` as the right (input 1), partitioned alike so that equal keys meet in
    /// one partition.
    pub fn join<R: Data, Out: Data>(
        &self,
        other: &KeyedStream<R>,
        name: &str,
        parallelism: u32,
        factory: JoinFactory<T, R, Out>,
    ) -> Stream<Out> {
        let graph = self.stream.graph.clone();
        assert!(
            Rc::ptr_eq(&graph, &other.stream.graph),
            "join {name}: both inputs must belong to the same job"
        );
        let inputs = vec![
            self.stream.upstream_parallelism(),
            other.stream.upstream_parallelism(),
        ];
        let activate: Activate = Box::new(move |plan, id, saved| {
            actors::join_actor::<T, R, Out>(plan, id, factory(id.partition), saved)
        });
        let stage = add_stage::<Out>(
            &graph,
            name,
            parallelism,
            StageKind::Operator,
            inputs,
            activate,
        );
        let left = keyed_route((stage, 0), parallelism, self.key.clone());
        let right = keyed_route((stage, 1), parallelism, other.key.clone());
        // A join's rows follow the order its inputs come in: no relays.
        self.stream.connect(stage, 0, left, false);
        other.stream.connect(stage, 1, right, false);
        Stream::of_stage(graph, stage)
    }

    /// A keyed windowed aggregation in one stage: per window of `spec` and per
    /// `key(record)`, `aggregate` folds the records and emits when the window fires.
    pub fn window_aggregate<A: Aggregate<T>>(
        &self,
        name: &str,
        parallelism: u32,
        spec: WindowSpec,
        time: impl Fn(&T) -> i64 + Send + Sync + 'static,
        key: impl Fn(&T) -> u64 + Send + Sync + 'static,
        aggregate: A,
    ) -> Stream<A::Out> {
        let operator = WindowAggregate::new(spec, time, key, aggregate);
        self.process(name, parallelism, operator.factory())
    }

    /// The same in two stages, for a mergeable aggregate: `{name}-partial` folds
    /// each partition's records into partials, `{name}-merge`, keyed by window,
    /// merges the partials of every window. Use it when the aggregate's key is not
    /// this stream's key (a global maximum), so that no partition holds all records.
    pub fn window_aggregate_two_phase<A: Aggregate<T>>(
        &self,
        name: &str,
        parallelism: u32,
        spec: WindowSpec,
        time: impl Fn(&T) -> i64 + Send + Sync + 'static,
        key: impl Fn(&T) -> u64 + Send + Sync + 'static,
        aggregate: A,
    ) -> Stream<A::Out>
    where
        PartialRow<A::Acc>: Data,
    {
        let aggregate = Arc::new(aggregate);
        let partial = WindowPartial::shared(spec, Arc::new(time), Arc::new(key), aggregate.clone());
        self.process(&format!("{name}-partial"), parallelism, partial.factory())
            .key_by(|p: &PartialRow<A::Acc>| p.window.1 as u64)
            .process(
                &format!("{name}-merge"),
                parallelism,
                WindowMerge::shared(aggregate).factory(),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl Source<u64> for Nothing {
        fn next_batch(&mut self, _max: usize, _out: &mut Vec<u64>) -> SourceBatch {
            SourceBatch::Done
        }
    }
    struct Pass;
    impl Operator<u64, u64> for Pass {
        fn on_records(&mut self, records: Vec<u64>, out: &mut Vec<u64>) {
            out.extend(records);
        }
        fn state(&mut self) -> Option<&mut dyn Stateful> {
            None
        }
    }
    struct Discard;
    impl Sink<u64> for Discard {
        fn write(&mut self, _records: &[u64]) {}
    }

    /// source (0) -> a (1) -> b (2) -> sink (3)
    fn chain(slo: Duration) -> Job {
        let mut job = Job::new("chain", slo);
        job.source("source", 1, Arc::new(|_, _| Box::new(Nothing)))
            .key_by(|r| *r)
            .process("a", 2, Arc::new(|_| Box::new(Pass)))
            .key_by(|r| *r)
            .process("b", 2, Arc::new(|_| Box::new(Pass)))
            .sink("sink", 1, Arc::new(|_| Box::new(Discard)));
        job
    }

    #[test]
    fn deadlines_leave_room_for_the_measured_cost_of_the_rest_of_the_path() {
        let plan = chain(Duration::from_millis(10))
            .into_plan(JobId(1), 2)
            .expect("valid job");
        // Measured handling costs per message on shard 1: a 300 µs, b 200 µs,
        // sink 100 µs; shard 0 has measured nothing yet.
        let shard = ShardId(1);
        for (stage, cost_ns) in [(1u32, 300_000u64), (2, 200_000), (3, 100_000)] {
            plan.metrics.observe_cost(shard, stage, cost_ns);
        }
        let sched = SchedCtx {
            job: JobId(1),
            deadline_ns: 0,
            origin_ns: 1_000_000,
        };
        let end_ns = 1_000_000 + 10_000_000;
        // (stage the message goes to, the rest of the path after it)
        let cases = [(1u32, 300_000u64), (2, 100_000), (3, 0)];
        for (stage, rest_ns) in cases {
            assert_eq!(
                plan.deadline_ns(&sched, shard, stage),
                end_ns - rest_ns,
                "to stage {stage}"
            );
            assert_eq!(
                plan.deadline_ns(&sched, ShardId(0), stage),
                end_ns,
                "shard 0 keeps its own estimates"
            );
        }
    }

    #[test]
    fn a_deadline_hook_replaces_the_rule() {
        let mut job = chain(Duration::from_millis(10));
        job.deadline_hook(Arc::new(|sched, stage| sched.origin_ns + stage as u64));
        let plan = job.into_plan(JobId(1), 1).expect("valid job");
        let sched = SchedCtx {
            job: JobId(1),
            deadline_ns: 0,
            origin_ns: 50,
        };
        assert_eq!(plan.deadline_ns(&sched, ShardId(0), 2), 52);
    }

    #[test]
    fn a_stream_without_a_sink_is_refused() {
        let mut job = Job::new("dangling", Duration::from_millis(10));
        let _ = job
            .source("source", 1, Arc::new(|_, _| Box::new(Nothing)))
            .filter(|_| true);
        let error = job.into_plan(JobId(1), 1).err().expect("refused");
        assert!(
            error.contains("source") && error.contains("no consumer"),
            "{error}"
        );
    }

    #[test]
    fn edges_are_typed_from_stage_to_stage() {
        let mut job = Job::new("typed", Duration::from_millis(10));
        let numbers: Stream<u64> = job.source("source", 1, Arc::new(|_, _| Box::new(Nothing)));
        let words: Stream<String> = numbers.filter(|n| n % 2 == 0).map(|n| n.to_string());
        let lengths: Stream<usize> = words.filter_map(|w| (!w.is_empty()).then_some(w.len()));
        lengths.sink(
            "sink",
            1,
            Arc::new(|_| Box::new(Collect::<usize>(Vec::new()))),
        );
        let plan = job.into_plan(JobId(1), 1).expect("valid job");
        // The sink takes any order: the steps' edge has a relay (stage 2),
        // with no partitions on one shard.
        assert_eq!(plan.stages[0].targets, vec![(2, 0), (1, 0)]);
        assert_eq!(plan.stages[0].routes::<u64>().len(), 2);
        assert_eq!(plan.stages[2].kind, StageKind::Relay);
        assert_eq!(plan.stages[2].parallelism, 0);
        assert_eq!(plan.stages[2].routes::<u64>().len(), 1);
    }

    /// source (0) -> map -> a (1, keeps its input's order) -> map -> sink
    /// (2); the relay of a's edge to the sink is stage 3.
    fn relayed(autoscale: bool) -> Job {
        let mut job = Job::new("relayed", Duration::from_millis(10));
        job.autoscale(autoscale);
        job.source("source", 1, Arc::new(|_, _| Box::new(Nothing)))
            .map(|n| n + 1)
            .key_by(|r| *r)
            .process("a", 2, Arc::new(|_| Box::new(Pass)))
            .map(|n| n * 2)
            .sink("sink", 1, Arc::new(|_| Box::new(Discard)));
        job
    }

    #[test]
    fn a_chained_edge_into_a_consumer_of_any_order_gets_a_relay_of_a_partition_per_shard() {
        let plan = relayed(true).into_plan(JobId(1), 4).expect("valid job");
        assert_eq!(plan.stages.len(), 4, "no relay before a, which keeps order");
        assert_eq!(plan.stages[0].targets, vec![(1, 0)]);
        assert_eq!(plan.stages[1].targets, vec![(3, 0), (2, 0)]);
        let relay = &plan.stages[3];
        assert_eq!(
            (relay.kind, relay.parallelism, relay.from_base),
            (StageKind::Relay, 4, 2)
        );
        assert_eq!(relay.inputs, vec![2]);
        assert_eq!(relay.targets, vec![(2, 0)]);
        // The sink counts a's two channels and the relay's four.
        assert_eq!(plan.stages[2].inputs, vec![6]);
        assert_eq!(plan.unchainable(), 1 << 1);
        assert_eq!(plan.relays(), 1 << 3);
        assert_eq!(plan.splittable(), 1 << 1, "a relay is never rerouted");
        assert!(!plan.unchain(0, true), "the source's edge has no relay");
        assert!(plan.unchain(1, true));
        assert!(plan.unchained(1));
        assert!(plan.unchain(1, false));
        assert!(!plan.unchained(1));
        // As many producer partitions as shards, a job that may not scale,
        // or one that keeps its steps fused: the relay has none, and nothing
        // switches.
        let mut fused = relayed(true);
        fused.relays(false);
        let role = Role::Alone;
        for plan in [
            relayed(true).into_plan(JobId(1), 2).expect("valid job"),
            relayed(false).into_plan(JobId(1), 4).expect("valid job"),
            fused.into_plan(JobId(1), 4).expect("valid job"),
            // No autoscaler: none unless the job asks.
            relayed(true)
                .into_plan_as(JobId(1), 4, role, false)
                .expect("valid job"),
        ] {
            assert_eq!(plan.stages[3].parallelism, 0);
            assert_eq!(plan.stages[2].inputs, vec![2]);
            assert_eq!(plan.unchainable(), 0);
            assert!(!plan.unchain(1, true));
            assert!(!plan.unchained(1));
        }
        let mut asked = relayed(true);
        asked.relays(true);
        let plan = asked
            .into_plan_as(JobId(1), 4, role, false)
            .expect("valid job");
        assert_eq!(plan.stages[3].parallelism, 4);
    }

    struct Collect<T>(Vec<T>);
    impl<T: Data> Sink<T> for Collect<T> {
        fn write(&mut self, records: &[T]) {
            self.0.extend_from_slice(records);
        }
    }
}
