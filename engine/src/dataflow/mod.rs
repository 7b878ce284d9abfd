//! The streaming dataflow layer: jobs as graphs of operators, run on virtual actors.
//!
//! A job is a graph of *stages*. A stage is one operator (a source, a keyed
//! operator such as a window, an aggregate or a join, or a sink) with its
//! `parallelism` partitions; each `(job, stage, partition)` is a virtual actor of the
//! runtime, so stages of many jobs time-share every shard and move like any actor.
//! Stateless steps (map, filter, flat_map) never become actors of their own: they
//! are fused into the stage that produces their input (operator chaining), and run
//! on the batch right before it is partitioned for the next stage.
//!
//! Events travel in batches (`DataMsg::Records`). Keyed edges partition by key:
//! key -> key group (`Job::key_groups` of them, default 256, fixed for the life of
//! a job, so scaling never re-hashes) -> partition (a contiguous range of key groups). Watermarks
//! flow on every edge from every upstream partition, in order with the records
//! (the runtime keeps each channel FIFO, also while actors move); a stage's
//! watermark is the minimum over its inputs, and `i64::MAX` means end of input.
//!
//! Scheduling: each message carries `{job, deadline, origin}`. Sources stamp the
//! origin (when the input entered) and the deadline `origin + slo - estimated cost
//! of the rest of the path`; stage costs are measured online (an average of each
//! stage's handling time per message), and every stage re-stamps the deadline for
//! the path that remains (or calls the job's deadline hook). Outputs inherit the
//! origin of the message that caused them, so a window's result is timed from the
//! watermark that fired it.

pub(crate) mod actors;
pub mod batch;
pub mod checkpoint;
pub mod graph;
pub mod ops;
pub mod pace;
pub mod reroute;
pub mod scaling;
pub mod state;
pub mod window;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;

use crate::actor::{ActorFactory, SchedCtx};
use crate::ids::{ActorId, IdMap, JobId, ShardId};
use crate::runtime::{Failure, MemoryStateStore, Runtime, RuntimeConfig, RuntimeStats, StartError};

pub use batch::Batch;
pub use graph::{
    Data, Job, JoinOperator, KeyedStream, Operator, Sink, SinkFactory, Source, SourceBatch,
    SourceFactory, Stream,
};
pub use pace::{RateSchedule, RateStep};
pub use scaling::AutoscaleOptions;

/// Key groups of a job unless it says otherwise (`Job::key_groups`): fixed for
/// the job's life, so scaling never re-hashes a key.
pub const KEY_GROUPS_DEFAULT: u32 = 256;

/// Watermark meaning "no more input". Sources never produce it from data: it is
/// sent only when a source is done (or failed).
pub const END_OF_INPUT: i64 = i64::MAX;

/// What dataflow actors send each other. One type for every job: record batches
/// carry their element type erased (see [`Batch`]).
pub enum DataMsg {
    /// A source's cue to produce its next batch.
    Tick,
    /// Records of `input` from upstream partition `from`.
    Records { input: u8, from: u32, batch: Batch },
    /// Upstream partition `from` of `input` promises no record with an earlier time.
    Watermark {
        input: u8,
        from: u32,
        watermark_ms: i64,
    },
    /// Checkpoint `epoch`'s barrier from upstream partition `from` of `input`:
    /// what came before it on this channel belongs to the checkpoint, what
    /// follows does not (see `checkpoint`). A declined barrier cancels the epoch.
    Barrier {
        input: u8,
        from: u32,
        epoch: u64,
        declined: bool,
    },
    /// An aligned stage's or sink's cue, sent to itself, to take its part of
    /// checkpoint `epoch` (its barrier has gone on already).
    Snapshot { epoch: u64 },
    /// A stage's or sink's cue, sent to itself, to go on handling the
    /// messages that waited for an alignment (handed back a step at a time).
    Replay,
    /// First among a stage's queued messages (never sent): take the next
    /// step of what its operator fires (`Operator::firing`); what came in
    /// meanwhile waits behind it.
    Fire,
    /// To every partition of the stages that feed `stage`: route `stage`'s
    /// key groups by `owners` (its version `version`) from now on, and say
    /// so on each channel to it (`Rerouted`). See `reroute`.
    Reroute {
        stage: u32,
        version: u64,
        owners: Arc<[u32]>,
    },
    /// Upstream partition `from` of `input` routes by `owners` (version
    /// `version`) from here on: what came before on this channel was routed
    /// by the table before.
    Rerouted {
        input: u8,
        from: u32,
        version: u64,
        owners: Arc<[u32]>,
    },
    /// From partition `from` of a rerouted stage (on `input` of its
    /// consumer): every row it emitted for the key groups it gave up under
    /// `version` came before this on this channel.
    Handed { input: u8, from: u32, version: u64 },
    /// From partition `from` of a rerouted stage: what follows on this
    /// channel comes from key groups it took from partition `giver` under
    /// `version`, so it waits for `giver`'s `Handed` on its own channel.
    After {
        input: u8,
        from: u32,
        giver: u32,
        version: u64,
    },
    /// Partition `from` of the same stage hands over the key groups it gave
    /// up to this one under `version` (by `owners`), each as it held it
    /// (`Stateful::take_group`; `None`: empty): it has handled every record
    /// routed to it by the old table.
    Handoff {
        from: u32,
        version: u64,
        owners: Arc<[u32]>,
        groups: Vec<(u32, Option<state::MovedGroup>)>,
    },
    /// To the job's monitor on every node of a dataflow over nodes
    /// (`Plan::monitors`): a sink partition saw the end of its input.
    SinkDone,
    /// To the job's monitor on node 0 of a dataflow over nodes: a partition
    /// of `stage` completed its reroute to `version`.
    RerouteDone { stage: u32, version: u64 },
    /// To the job's monitors on the other nodes of a dataflow over nodes:
    /// the job failed on the sender's node (`Plan::fail`).
    JobFailed { error: String },
    /// To the job's monitor on node 0 of a dataflow over nodes: an actor's
    /// checkpoint part from another node (`checkpoint::nodes`).
    CheckpointPart(Box<checkpoint::RemotePart>),
    /// From node 0 to the job's monitor on each other node: checkpoint
    /// `epoch` is requested (its sources there inject its barrier); node 0
    /// resumed from checkpoint `restored` (0: none).
    CheckpointRequest { epoch: u64, restored: u64 },
    /// Between node 0's monitor of a job and the others': the final
    /// checkpoint committed (`None`), or the job failed.
    CheckpointOver { error: Option<String> },
    /// To a job's monitors on the other nodes of a dataflow over nodes: the
    /// sender's shards from `first` on, and each one's load in thousandths,
    /// as its autoscaler measured it (`scaling`).
    NodeLoads { first: u16, loads: Vec<u16> },
}

impl DataMsg {
    /// The channel `(input, upstream partition)` a message came on, for
    /// those that keep their order on it.
    #[inline]
    pub(crate) fn channel(&self) -> Option<(u8, u32)> {
        match *self {
            DataMsg::Records { input, from, .. }
            | DataMsg::Watermark { input, from, .. }
            | DataMsg::Barrier { input, from, .. }
            | DataMsg::Rerouted { input, from, .. }
            | DataMsg::Handed { input, from, .. }
            | DataMsg::After { input, from, .. } => Some((input, from)),
            DataMsg::Tick
            | DataMsg::Snapshot { .. }
            | DataMsg::Replay
            | DataMsg::Fire
            | DataMsg::Reroute { .. }
            | DataMsg::Handoff { .. }
            | DataMsg::SinkDone
            | DataMsg::RerouteDone { .. }
            | DataMsg::JobFailed { .. }
            | DataMsg::CheckpointPart(_)
            | DataMsg::CheckpointRequest { .. }
            | DataMsg::CheckpointOver { .. }
            | DataMsg::NodeLoads { .. } => None,
        }
    }
}

/// A keyed stage of a job, as `Registry::keyed_stages` lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyedStage {
    pub stage: u32,
    pub parallelism: u32,
    /// Its operator keeps partials or no state: it may run in parallel mode
    /// (an empty table: each batch to the partition with the least backlog).
    pub parallelizable: bool,
}

/// A reroute's orders: one to each partition that feeds its stage.
pub type Orders = Vec<(ActorId, DataMsg)>;

/// Send a reroute's orders to the feeders of its stage, due now.
pub(crate) fn deliver_orders(runtime: &Runtime<DataMsg>, job: JobId, orders: Orders) {
    let now_ns = crate::clock::monotonic_ns();
    let sched = SchedCtx {
        job,
        deadline_ns: now_ns,
        origin_ns: now_ns,
    };
    for (actor, order) in orders {
        // A dead shard fails every job through the failure hook.
        let _ = runtime.send(actor, order, sched);
    }
}

/// The key group (of a job's `groups`) of a key: the mixed key scaled into
/// `0..groups` by a multiply and a shift (no division on the per-record path).
#[inline]
pub fn key_group(key: u64, groups: u32) -> u32 {
    ((crate::ids::mix64(key) as u128 * groups as u128) >> 64) as u32
}

/// The partition (of `parallelism`) that owns a key group: contiguous ranges.
#[inline]
pub fn partition_of_group(group: u32, parallelism: u32, groups: u32) -> u32 {
    (group as u64 * parallelism as u64 / groups as u64) as u32
}

/// A counter with one writer (the shard that owns its slot): a plain load and
/// store, no read-modify-write across cores.
#[derive(Default)]
pub(crate) struct ShardCounter(AtomicU64);

impl ShardCounter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One shard's part of a job's measurements: written only by that shard's thread
/// (whichever of the job's actors run there), read by anyone, merged when read.
pub(crate) struct ShardSlot {
    pub source_records: ShardCounter,
    pub skipped_records: ShardCounter,
    pub outputs: ShardCounter,
    pub late_records: ShardCounter,
    /// Over nodes: records this shard's stages and sinks took from another
    /// node (as the batch crossed, encoded): with `source_records`, what
    /// tells the autoscaler a job here has input.
    pub remote_records: ShardCounter,
    /// Average handling time per message of each stage as measured on this shard,
    /// in ns (an exponential average): the deadline estimates of this shard.
    stage_cost_ns: Box<[AtomicU64]>,
    /// End-to-end latency of outputs, merged in from the sinks' own histograms
    /// every `LATENCY_FLUSH_NS` and at their end (never locked per batch).
    pub latency_us: Mutex<Histogram<u32>>,
}

/// What a job measured: a slot per shard on the hot path, and the few job-wide
/// facts (sinks finished, the first error) written once each.
pub struct JobMetrics {
    shards: Box<[CachePadded<ShardSlot>]>,
    sinks_done: AtomicU64,
    /// When the last sink saw the end of its input (clock ns; 0 while running).
    finished_ns: AtomicU64,
    /// Set with the first error; sources stop producing when they see it.
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    /// Autoscaler decisions that acted on the job.
    scale_actions: AtomicU64,
}

impl JobMetrics {
    fn new(shards: usize, stages: usize) -> Self {
        let slot = || {
            CachePadded::new(ShardSlot {
                source_records: ShardCounter::default(),
                skipped_records: ShardCounter::default(),
                outputs: ShardCounter::default(),
                late_records: ShardCounter::default(),
                remote_records: ShardCounter::default(),
                stage_cost_ns: (0..stages).map(|_| AtomicU64::new(0)).collect(),
                latency_us: Mutex::new(crate::runtime::stats::new_histogram()),
            })
        };
        JobMetrics {
            shards: (0..shards.max(1)).map(|_| slot()).collect(),
            sinks_done: AtomicU64::new(0),
            finished_ns: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            scale_actions: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn shard(&self, shard: ShardId) -> &ShardSlot {
        &self.shards[shard.index()]
    }

    fn sum(&self, counter: impl Fn(&ShardSlot) -> &ShardCounter) -> u64 {
        self.shards.iter().map(|slot| counter(slot).get()).sum()
    }

    pub fn source_records(&self) -> u64 {
        self.sum(|s| &s.source_records)
    }

    pub fn skipped_records(&self) -> u64 {
        self.sum(|s| &s.skipped_records)
    }

    /// Over nodes: records this node's stages and sinks took from others.
    pub fn remote_records(&self) -> u64 {
        self.sum(|s| &s.remote_records)
    }

    pub fn outputs(&self) -> u64 {
        self.sum(|s| &s.outputs)
    }

    pub fn late_records(&self) -> u64 {
        self.sum(|s| &s.late_records)
    }

    /// A stage's estimated cost per message on `shard`, in ns.
    #[inline]
    pub(crate) fn stage_cost_ns(&self, shard: ShardId, stage: u32) -> u64 {
        self.shard(shard).stage_cost_ns[stage as usize].load(Ordering::Relaxed)
    }

    /// Fold one measured handling time into the stage's average on `shard`.
    #[inline]
    pub(crate) fn observe_cost(&self, shard: ShardId, stage: u32, cost_ns: u64) {
        let slot = &self.shard(shard).stage_cost_ns[stage as usize];
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            cost_ns
        } else {
            (old.saturating_mul(7).saturating_add(cost_ns)) / 8
        };
        slot.store(new, Ordering::Relaxed);
    }

    /// A sink partition saw the end of its input; the last one stamps the job's end.
    fn sink_done(&self, now_ns: u64) {
        self.finished_ns.fetch_max(now_ns, Ordering::AcqRel);
        self.sinks_done.fetch_add(1, Ordering::AcqRel);
    }

    /// End the job with `message` (the first error wins).
    /// Record the job's failure; true if it is the first.
    pub(crate) fn fail(&self, message: String) -> bool {
        let mut error = self.error.lock().expect("error lock poisoned");
        let first = error.is_none();
        error.get_or_insert(message);
        self.failed.store(true, Ordering::Release);
        first
    }

    #[inline]
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().expect("error lock poisoned").clone()
    }

    /// End-to-end latency of the outputs so far (as the sinks last flushed it).
    pub fn latency_us(&self) -> Histogram<u32> {
        let mut total = crate::runtime::stats::new_histogram();
        for slot in self.shards.iter() {
            let histogram = slot.latency_us.lock().expect("latency lock poisoned");
            // Same bounds on both sides: adding cannot fail.
            let _ = total.add(&*histogram);
        }
        total
    }
}

/// Options of the dataflow engine.
#[derive(Clone, Debug)]
pub struct DataflowConfig {
    pub runtime: RuntimeConfig,
    /// Run the autoscaler (`autoscale`): it moves actors between shards to
    /// keep every shard under its load mark. `None` (the default): placement
    /// stays as the runtime made it, unless migrated by hand.
    pub autoscale: Option<AutoscaleOptions>,
}

impl Default for DataflowConfig {
    fn default() -> Self {
        let mut runtime = RuntimeConfig::default();
        // Idle actors deactivate (scale to zero): a keyed stage with its
        // operator's key groups, a stateless sink, and any actor whose input
        // has ended (see `actors`).
        runtime.shard.idle_timeout_ns = Some(1_000_000_000);
        runtime.shard.mailbox_credit_messages = 64;
        DataflowConfig {
            runtime,
            autoscale: None,
        }
    }
}

/// The submitted jobs' plans, by job: what the actor factory builds actors from.
/// Shared by the engine's shards (read on activation only) and the submitting
/// thread; also drives a dataflow under the simulator (`runtime::sim`).
#[derive(Clone)]
pub struct Registry {
    plans: Arc<RwLock<IdMap<JobId, Arc<graph::Plan>>>>,
    shards: usize,
    /// Over nodes: each node's first shard, where its jobs' monitors live
    /// (`Plan::monitors`); empty on one node.
    node_firsts: Vec<u32>,
    /// Over nodes: this node's place (node 0 coordinates checkpoints).
    me: Option<usize>,
    /// Over nodes: how to reach another node's actors (set once the
    /// runtime runs), for every job's plan.
    post: Arc<std::sync::OnceLock<checkpoint::Post>>,
    /// An autoscaler runs over these shards: jobs get relays by default
    /// (`Job::relays`; on one node only).
    pub autoscaled: bool,
    /// Over nodes: the other nodes' shards' loads, as told to any job's
    /// monitor here (every plan holds it).
    remote_loads: RemoteLoads,
}

/// Other nodes' shards' loads (`DataMsg::NodeLoads`): per shard, when it
/// was told and its load.
pub(crate) type RemoteLoads =
    Arc<std::sync::Mutex<std::collections::BTreeMap<u16, (Instant, f64)>>>;

/// Shards a `DataMsg::NodeLoads` carries at most (a larger one is cut).
const NODE_LOADS_MAX: usize = 1024;

impl Registry {
    pub fn new(shards: usize) -> Self {
        Registry {
            plans: Arc::new(RwLock::new(IdMap::default())),
            shards,
            node_firsts: Vec::new(),
            me: None,
            post: Arc::new(std::sync::OnceLock::new()),
            autoscaled: false,
            remote_loads: RemoteLoads::default(),
        }
    }

    /// Over nodes: the other nodes' shards whose loads were told within
    /// `fresh` of now, and their loads.
    pub fn remote_loads(&self, fresh: Duration) -> Vec<(ShardId, f64)> {
        let now = Instant::now();
        let mut loads = self.remote_loads.lock().expect("remote loads poisoned");
        loads.retain(|_, (at, _)| now.duration_since(*at) < fresh);
        loads
            .iter()
            .map(|(&shard, &(_, load))| (ShardId(shard), load))
            .collect()
    }

    /// Over nodes: tell every other node this node's shards' loads (from
    /// `first` on), through the monitors of a job that took records here
    /// and has not ended (any job's monitor takes them for its node).
    /// Nothing with no such job, or before the runtime runs: whether it was
    /// told.
    pub fn tell_loads(&self, first: u16, loads: &[f64]) -> bool {
        let Some(me) = self.me else {
            return false;
        };
        let Some(post) = self.post.get().cloned() else {
            return false;
        };
        let monitors: Vec<ActorId> = {
            let plans = self.plans.read().expect("plan registry poisoned");
            // A job that took records here has started, so every node has
            // registered it (a monitor asked for on a node that has not
            // would fail there).
            let Some(plan) = plans.values().find(|p| {
                p.metrics.sinks_done.load(Ordering::Acquire) < p.sink_partitions()
                    && !p.metrics.has_failed()
                    && p.metrics
                        .source_records()
                        .wrapping_add(p.metrics.remote_records())
                        > 0
            }) else {
                return false;
            };
            (plan.monitors.iter().enumerate())
                .filter(|&(node, _)| node != me)
                .map(|(_, &monitor)| monitor)
                .collect()
        };
        let loads: Vec<u16> = loads
            .iter()
            .take(NODE_LOADS_MAX)
            .map(|l| (l.clamp(0.0, 60.0) * 1e3).round() as u16)
            .collect();
        for monitor in monitors {
            post(
                monitor,
                DataMsg::NodeLoads {
                    first,
                    loads: loads.clone(),
                },
            );
        }
        true
    }

    /// The actor factory of every job registered here.
    pub fn factory(&self) -> Arc<dyn ActorFactory<DataMsg>> {
        let plans = self.plans.clone();
        Arc::new(move |id: ActorId, state: Option<&[u8]>| {
            let plan = plans
                .read()
                .expect("plan registry poisoned")
                .get(&id.job)
                .cloned()
                .unwrap_or_else(|| panic!("{id} belongs to no submitted job"));
            actors::activate(plan, id, state)
        })
    }

    /// Register `job` as `id` (`now_ns` on the shards' clock); whoever drives
    /// the shards starts it with [`JobHandle::first_messages`].
    pub fn register(&self, job: Job, id: JobId, now_ns: u64) -> Result<JobHandle, String> {
        let role = match self.me {
            None => checkpoint::Role::Alone,
            Some(0) => checkpoint::Role::Coordinator,
            Some(_) => checkpoint::Role::Participant,
        };
        let relays = self.autoscaled && self.me.is_none();
        let mut plan = job.into_plan_as(id, self.shards, role, relays)?;
        // Partition p of any stage is homed on shard p (`Directory::home`):
        // the monitor of node n on n's first shard, never moved.
        plan.monitors = self
            .node_firsts
            .iter()
            .map(|&first| ActorId::new(id, graph::MONITOR_STAGE, first))
            .collect();
        plan.me = self.me;
        plan.post = self.post.clone();
        plan.remote_loads = self.remote_loads.clone();
        let plan = Arc::new(plan);
        if let Some(checkpointer) = &plan.checkpointer {
            let actors: Vec<_> = plan
                .actor_ids(id)
                .iter()
                .map(|a| (a.operator, a.partition))
                .collect();
            let sources = plan
                .source_stages()
                .into_iter()
                .flat_map(|(stage, partitions)| (0..partitions).map(move |p| (stage, p)))
                .collect();
            // Sinks that had finished before the restore will not finish again.
            for &(stage, _) in checkpointer.ended_at_restore() {
                if plan.stages[stage as usize].kind == graph::StageKind::Sink {
                    plan.metrics.sinks_done.fetch_add(1, Ordering::AcqRel);
                }
            }
            checkpointer.start(actors, sources);
        }
        self.plans
            .write()
            .expect("plan registry poisoned")
            .insert(id, plan.clone());
        let sources = plan
            .source_stages()
            .into_iter()
            .flat_map(|(stage, partitions)| {
                (0..partitions).map(move |p| ActorId::new(id, stage, p))
            })
            .collect();
        Ok(JobHandle {
            id,
            name: plan.name.clone(),
            metrics: plan.metrics.clone(),
            checkpointer: plan.checkpointer.clone(),
            sinks: plan.sink_partitions(),
            started: Instant::now(),
            started_ns: now_ns,
            sources,
            slo_ns: plan.slo_ns,
            spans_nodes: false,
        })
    }

    /// Order a split of `actor`'s key groups: the upper half of those it
    /// owns go to partition `into` of its stage. Returns the table before
    /// it (to merge back later) and the orders to deliver.
    pub fn split(&self, actor: ActorId, into: u32) -> Result<(Vec<u32>, Orders), String> {
        let (owners, _) = self
            .routing(actor.job, actor.operator)
            .ok_or_else(|| format!("{actor}: no such job or stage"))?;
        let table = reroute::split(&owners, actor.partition, into)
            .ok_or_else(|| format!("{actor} owns fewer than two key groups"))?;
        let orders = self.reroute(actor.job, actor.operator, table)?;
        Ok((owners, orders))
    }

    /// Undo a split of `into`'s groups with `from` (`before`: the table
    /// before the split): the groups `from` took in it go back to `into`.
    pub fn merge(&self, into: ActorId, from: u32, before: &[u32]) -> Result<Orders, String> {
        let (owners, _) = self
            .routing(into.job, into.operator)
            .ok_or_else(|| format!("{into}: no such job or stage"))?;
        let table = owners
            .iter()
            .zip(before)
            .map(|(&now, &was)| {
                if now == from && was == into.partition {
                    into.partition
                } else {
                    now
                }
            })
            .collect();
        self.reroute(into.job, into.operator, table)
    }

    /// Order a reroute of keyed stage `stage` of `job`: from now on key group
    /// `g` belongs to partition `owners[g]` (see `reroute` in the module
    /// header); an empty `owners` switches a stage that keeps partials to
    /// parallel mode (each batch to the partition with the least backlog),
    /// and a table switches it back. Returns the orders to deliver, one to
    /// each partition of the stages that feed it, for whoever drives the
    /// shards; none when `owners` is the table in force. Refused for an
    /// unknown job or stage, parallel mode for a stage that keeps state by
    /// key,
    /// a stage that is not keyed, a job whose checkpoint is under way (its
    /// actors may align for it; see `Checkpointer::begin_reroute`),
    /// a table of the wrong size or naming a partition the stage does not
    /// have, and while a reroute of any stage of the job is under way.
    pub fn reroute(&self, job: JobId, stage: u32, owners: Vec<u32>) -> Result<Orders, String> {
        let plans = self.plans.read().expect("plan registry poisoned");
        let plan = plans.get(&job).ok_or_else(|| format!("no job {job:?}"))?;
        // Whether a reroute is under way and ordering this one is one step:
        // two callers (the autoscaler, a user) never both pass the check.
        let _ordering = plan.reroute_order.lock().expect("reroute order poisoned");
        let target = plan
            .stages
            .get(stage as usize)
            .ok_or_else(|| format!("job {} has no stage {stage}", plan.name))?;
        let name = &target.name;
        if target.kind != graph::StageKind::Operator {
            return Err(format!(
                "stage {name} is not keyed: only keyed stages reroute"
            ));
        }
        if owners.is_empty() && !target.parallelizable {
            return Err(format!(
                "stage {name} keeps state by key: only a stage that keeps partials or no \
                 state runs in parallel mode"
            ));
        }
        if !owners.is_empty() && owners.len() != plan.key_groups as usize {
            return Err(format!(
                "a table of {} owners for the job's {} key groups",
                owners.len(),
                plan.key_groups
            ));
        }
        if let Some(p) = owners.iter().find(|&&p| p >= target.parallelism) {
            return Err(format!(
                "partition {p} of stage {name}, which has {}",
                target.parallelism
            ));
        }
        // One reroute of a job at a time: a consumer that orders rows
        // across an upstream reroute (`Handed`, `After`) and holds what
        // follows its own markers could otherwise wait on itself.
        if let Some((other, version, done)) = plan.rerouting() {
            let other = &plan.stages[other as usize];
            return Err(format!(
                "stage {}'s reroute {version} is under way ({done} of {} partitions)",
                other.name, other.parallelism
            ));
        }
        let slot = &plan.reroutes[stage as usize];
        let (version, _, _) = slot.get();
        if plan.table(stage)[..] == owners[..] {
            return Ok(Vec::new());
        }
        if let Some(checkpointer) = &plan.checkpointer {
            checkpointer
                .begin_reroute()
                .map_err(|e| format!("job {}: {e}", plan.name))?;
        }
        let version = version + 1;
        let owners: Arc<[u32]> = owners.into();
        slot.order(version, owners.clone());
        let mut orders = Vec::new();
        for (feeder, plan_of) in plan.stages.iter().enumerate() {
            if !plan_of.targets.iter().any(|&(t, _)| t == stage) {
                continue;
            }
            for p in 0..plan_of.parallelism {
                let order = DataMsg::Reroute {
                    stage,
                    version,
                    owners: owners.clone(),
                };
                orders.push((ActorId::new(job, feeder as u32, p), order));
            }
        }
        Ok(orders)
    }

    /// Split `stage`'s fused steps out onto its relays (`on`), or fuse them
    /// back (see `Stream`): its partitions here read the switch at their
    /// next output batch. Over nodes each node switches its own partitions.
    /// Refused for an unknown job or stage, and a stage with no relay of
    /// any partitions (a job that may not scale, or a producer with as many
    /// partitions as shards).
    pub fn unchain(&self, job: JobId, stage: u32, on: bool) -> Result<(), String> {
        let plans = self.plans.read().expect("plan registry poisoned");
        let plan = plans.get(&job).ok_or_else(|| format!("no job {job:?}"))?;
        let name = &plan
            .stages
            .get(stage as usize)
            .ok_or_else(|| format!("job {} has no stage {stage}", plan.name))?
            .name;
        match plan.unchain(stage, on) {
            true => Ok(()),
            false => Err(format!(
                "stage {name} has no relay to split its steps out onto"
            )),
        }
    }

    /// A checkpoint of `job` is under way (an actor may align for it): a
    /// reroute of it would be refused now.
    pub fn checkpoint_under_way(&self, job: JobId) -> bool {
        let plans = self.plans.read().expect("plan registry poisoned");
        plans
            .get(&job)
            .and_then(|plan| plan.checkpointer.as_ref())
            .is_some_and(|c| c.barriers_out())
    }

    /// The owner of each key group of `stage` by the newest table ordered
    /// (a stage never rerouted: its contiguous ranges), and whether the job
    /// is settled: every partition of every stage completed its last
    /// reroute, so a new one may be ordered. `None` for an unknown job or
    /// stage.
    pub fn routing(&self, job: JobId, stage: u32) -> Option<(Vec<u32>, bool)> {
        let plans = self.plans.read().expect("plan registry poisoned");
        let plan = plans.get(&job)?;
        plan.stages.get(stage as usize)?;
        Some((plan.table(stage).to_vec(), plan.rerouting().is_none()))
    }

    /// The keyed stages of a job, the ones that reroute.
    pub fn keyed_stages(&self, job: JobId) -> Vec<KeyedStage> {
        let plans = self.plans.read().expect("plan registry poisoned");
        plans.get(&job).map_or(Vec::new(), |plan| {
            plan.stages
                .iter()
                .enumerate()
                .filter(|(_, s)| s.kind == graph::StageKind::Operator)
                .map(|(i, s)| KeyedStage {
                    stage: i as u32,
                    parallelism: s.parallelism,
                    parallelizable: s.parallelizable,
                })
                .collect()
        })
    }

    /// Every actor of a job, for tests and the autoscaler.
    pub fn actors(&self, job: JobId) -> Vec<ActorId> {
        let plans = self.plans.read().expect("plan registry poisoned");
        plans
            .get(&job)
            .map_or(Vec::new(), |plan| plan.actor_ids(job))
    }

    /// Whether a failure of `job` here was told to the other nodes (set
    /// for a job no longer registered).
    pub(crate) fn failure_told(&self, job: JobId) -> Arc<std::sync::atomic::AtomicBool> {
        let plans = self.plans.read().expect("plan registry poisoned");
        plans.get(&job).map_or_else(
            || Arc::new(std::sync::atomic::AtomicBool::new(true)),
            |plan| plan.failure_told.clone(),
        )
    }

    /// A job's monitor on each node, node 0's first (empty on one node).
    pub(crate) fn monitors(&self, job: JobId) -> Vec<ActorId> {
        let plans = self.plans.read().expect("plan registry poisoned");
        plans
            .get(&job)
            .map_or(Vec::new(), |plan| plan.monitors.clone())
    }

    /// End a job with an error about one of its actors (a panic in an operator,
    /// source or sink): the job's handle returns the error, its sources stop.
    pub fn fail_actor(&self, actor: ActorId, message: &str) {
        let plans = self.plans.read().expect("plan registry poisoned");
        let Some(plan) = plans.get(&actor.job) else {
            return;
        };
        let stage = plan
            .stages
            .get(actor.operator as usize)
            .map_or("?", |s| s.name.as_str());
        plan.fail(format!(
            "stage {stage} (#{}) partition {}: {message}",
            actor.operator, actor.partition
        ));
    }

    /// End every job still running with `message` (a shard died under all of
    /// them); a job whose sinks have all finished keeps its result.
    pub fn fail_all(&self, message: &str) {
        let plans = self.plans.read().expect("plan registry poisoned");
        for plan in plans.values() {
            let finished =
                plan.metrics.sinks_done.load(Ordering::Acquire) >= plan.sink_partitions();
            if !finished {
                plan.fail(message.to_string());
            }
        }
    }

    /// Stop every job's checkpointer (see `Dataflow::shutdown`).
    /// Every registered job as the autoscaler sees it: its SLO and whether
    /// it may be moved.
    ///
    /// Over nodes, as this node's autoscaler sees it: its records in are
    /// those its sources here read and those its stages and sinks here took
    /// from other nodes (a node may have no source of a job and still be
    /// busy with it); a stage is split only from node 0, where reroutes are
    /// ordered, and never switched to parallel mode (that spreads the
    /// stage over every node's partitions, on the load of one node's).
    pub fn scaling_view(&self) -> std::collections::BTreeMap<JobId, crate::autoscale::JobSample> {
        let plans = self.plans.read().expect("plan registry poisoned");
        plans
            .iter()
            .map(|(&id, plan)| {
                let (records_in, splittable, parallelizable) = match self.me {
                    None => (
                        plan.metrics.source_records(),
                        plan.splittable(),
                        plan.parallelizable(),
                    ),
                    Some(node) => (
                        plan.metrics
                            .source_records()
                            .wrapping_add(plan.metrics.remote_records()),
                        if node == 0 { plan.splittable() } else { 0 },
                        0,
                    ),
                };
                let job = crate::autoscale::JobSample {
                    slo_ns: plan.slo_ns,
                    scalable: plan.autoscale,
                    records_in,
                    ended: plan.metrics.sinks_done.load(Ordering::Acquire)
                        >= plan.sink_partitions(),
                    splittable,
                    parallelizable,
                    unchainable: plan.unchainable(),
                    relays: plan.relays(),
                    crossable: if plan.autoscale { plan.crossable() } else { 0 },
                };
                (id, job)
            })
            .collect()
    }

    /// Count one autoscaler decision for `job` (`JobReport::scale_actions`).
    pub fn count_scale_action(&self, job: JobId) {
        let plans = self.plans.read().expect("plan registry poisoned");
        if let Some(plan) = plans.get(&job) {
            plan.metrics.scale_actions.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stop_checkpoints(&self) {
        let plans: Vec<_> = self
            .plans
            .read()
            .expect("plan registry poisoned")
            .values()
            .cloned()
            .collect();
        for plan in plans {
            if let Some(checkpointer) = &plan.checkpointer {
                checkpointer.stop();
            }
        }
    }

    /// Jobs whose plans are registered (submitted and not yet retired).
    pub fn jobs(&self) -> usize {
        self.plans.read().expect("plan registry poisoned").len()
    }

    /// Forget a job's plan (its actors must be gone: a message for it would find
    /// no plan to activate from).
    pub fn remove(&self, job: JobId) {
        let plan = self
            .plans
            .write()
            .expect("plan registry poisoned")
            .remove(&job);
        if let Some(checkpointer) = plan.as_ref().and_then(|p| p.checkpointer.as_ref()) {
            checkpointer.stop();
        }
    }
}

/// Register `job` in `registry` as the next id (`next_job`).
fn register_job(
    registry: &Registry,
    node: Option<usize>,
    next_job: &mut u32,
    job: Job,
) -> Result<JobHandle, String> {
    // The id is taken whatever the outcome (see `start_remote_with`).
    let id = JobId(*next_job);
    *next_job += 1;
    let mut handle = registry.register(job, id, crate::clock::monotonic_ns())?;
    handle.spans_nodes = node.is_some();
    Ok(handle)
}

/// Sends from outside through `runtime`, while it runs (a message to an
/// actor of the run, due now).
fn post_through(runtime: &Arc<Runtime<DataMsg>>) -> checkpoint::Post {
    let runtime = Arc::downgrade(runtime);
    Arc::new(move |to: ActorId, message| {
        // Gone: the dataflow is shutting down.
        if let Some(runtime) = runtime.upgrade() {
            let now_ns = crate::clock::monotonic_ns();
            let sched = SchedCtx {
                job: to.job,
                deadline_ns: now_ns,
                origin_ns: now_ns,
            };
            // A dead shard fails every job through the failure hook.
            let _ = runtime.send(to, message, sched);
        }
    })
}

/// The runtime's failure hook of a dataflow: a panic in an actor ends its
/// job; a shard that dies ends every job; then `outer`, if any.
fn supervise(
    registry: &Registry,
    outer: Option<crate::runtime::FailureHook>,
) -> crate::runtime::FailureHook {
    let supervisor = registry.clone();
    Arc::new(move |failure: Failure| {
        match failure.actor {
            Some(actor) => supervisor.fail_actor(actor, &failure.message),
            None => supervisor.fail_all(&format!("{} died: {}", failure.shard, failure.message)),
        }
        if let Some(outer) = &outer {
            outer(failure);
        }
    })
}

/// A dataflow engine: a runtime whose actors are the stages of submitted jobs.
pub struct Dataflow {
    runtime: Arc<Runtime<DataMsg>>,
    registry: Registry,
    next_job: u32,
    scaler: Option<scaling::Driver>,
    /// This node's place in a run that spans nodes (`start_remote`).
    node: Option<usize>,
}

/// A submitted job.
pub struct JobHandle {
    pub id: JobId,
    pub name: String,
    metrics: Arc<JobMetrics>,
    checkpointer: Option<Arc<checkpoint::Checkpointer>>,
    sinks: u64,
    started: Instant,
    started_ns: u64,
    /// Its source partitions (`JobHandle::first_messages`).
    sources: Vec<ActorId>,
    slo_ns: u64,
    /// Its dataflow spans nodes: its figures are this node's part.
    spans_nodes: bool,
}

/// What a finished job reports.
pub struct JobReport {
    pub name: String,
    pub elapsed: Duration,
    pub source_records: u64,
    pub skipped_records: u64,
    /// Records that arrived behind their stage's watermark (dropped from the
    /// windows that had fired; see `ops`).
    pub late_records: u64,
    pub outputs: u64,
    pub latency_us: Histogram<u32>,
    /// Autoscaler decisions that acted on the job (moves of its actors).
    pub scale_actions: u64,
}

impl JobHandle {
    /// Every sink has seen the end of its input and, for a job that takes
    /// checkpoints, the final one has committed (every output holds all its
    /// rows); or the job failed. Over nodes, every sink partition's end
    /// reaches this node's monitor of the job, wherever it ran; a failure
    /// on any node ends it on every node (`Plan::fail`).
    pub fn is_done(&self) -> bool {
        if self.metrics.has_failed() {
            return true;
        }
        if let Some(checkpointer) = &self.checkpointer {
            if checkpointer.error().is_some() {
                return true;
            }
            if !checkpointer.finished() {
                return false;
            }
        }
        self.metrics.sinks_done.load(Ordering::Acquire) >= self.sinks
    }

    /// What starts the job: a tick to each of its source partitions, due
    /// within its SLO of `now_ns` (on the clock of whoever sends them).
    pub fn first_messages(&self, now_ns: u64) -> Vec<(ActorId, SchedCtx)> {
        let sched = SchedCtx {
            job: self.id,
            deadline_ns: now_ns.saturating_add(self.slo_ns),
            origin_ns: now_ns,
        };
        self.sources.iter().map(|&actor| (actor, sched)).collect()
    }

    /// The job's sink partitions, over every node.
    pub fn sinks(&self) -> u64 {
        self.sinks
    }

    /// Sink partitions that have seen the end of their input (over nodes,
    /// those this node's monitor has heard of).
    pub fn sinks_done(&self) -> u64 {
        self.metrics.sinks_done.load(Ordering::Acquire)
    }

    /// Whether the job's dataflow spans nodes (`Dataflow::start_remote`):
    /// its figures are this node's part.
    pub fn spans_nodes(&self) -> bool {
        self.spans_nodes
    }

    /// What the job's checkpoints measured (`None`: it takes none).
    pub fn checkpoint_stats(&self) -> Option<checkpoint::CheckpointStats> {
        self.checkpointer.as_ref().map(|c| c.stats())
    }

    pub fn metrics(&self) -> &JobMetrics {
        &self.metrics
    }

    /// Wait until every sink has seen the end of its input, the job fails, or
    /// `limit` passes.
    pub fn wait(&self, limit: Duration) -> Result<JobReport, String> {
        let mut pause_us = 10;
        while !self.is_done() {
            if self.started.elapsed() > limit {
                return Err(format!(
                    "job {} not finished after {limit:?} ({} records in, {} out)",
                    self.name,
                    self.metrics.source_records(),
                    self.metrics.outputs()
                ));
            }
            std::thread::sleep(Duration::from_micros(pause_us));
            pause_us = (pause_us * 2).min(2_000);
        }
        let checkpoint_error = self.checkpointer.as_ref().and_then(|c| c.error());
        match self.metrics.error().or(checkpoint_error) {
            Some(error) => Err(format!("job {}: {error}", self.name)),
            None => Ok(self.report()),
        }
    }

    pub fn report(&self) -> JobReport {
        JobReport {
            name: self.name.clone(),
            elapsed: match self.metrics.finished_ns.load(Ordering::Acquire) {
                0 => self.started.elapsed(),
                finished_ns => Duration::from_nanos(finished_ns.saturating_sub(self.started_ns)),
            },
            source_records: self.metrics.source_records(),
            skipped_records: self.metrics.skipped_records(),
            late_records: self.metrics.late_records(),
            outputs: self.metrics.outputs(),
            latency_us: self.metrics.latency_us(),
            scale_actions: self.metrics.scale_actions.load(Ordering::Relaxed),
        }
    }
}

impl Dataflow {
    /// Start the shards. A panic in any job's operator, source or sink ends that
    /// job (its handle returns the error, naming job, stage, partition and the
    /// panic message) and no other; a shard that dies ends every job.
    pub fn start(config: DataflowConfig) -> Result<Self, StartError> {
        let mut runtime_config = config.runtime;
        let mut registry = Registry::new(runtime_config.shards);
        registry.autoscaled = config.autoscale.is_some();
        runtime_config.on_failure = Some(supervise(&registry, runtime_config.on_failure.take()));
        let runtime = Arc::new(Runtime::start(
            runtime_config,
            registry.factory(),
            Arc::new(MemoryStateStore::default()),
        )?);
        let scaler = config
            .autoscale
            .map(|options| scaling::Driver::start(options, runtime.clone(), registry.clone()));
        Ok(Dataflow {
            runtime,
            registry,
            next_job: 1,
            scaler,
            node: None,
        })
    }

    /// Start this node's part of a dataflow that spans nodes: its shards
    /// are numbered within the whole run (see `runtime::remote`), and a
    /// job's actors are placed over every node's shards, messages crossing
    /// through the gateways (`wire`). Every node of the run registers the
    /// same jobs in the same order ([`Dataflow::register`]: the same ids
    /// and plans everywhere), then one node starts each
    /// ([`Dataflow::start_job`]). Each node's handle of a job ends when every
    /// sink partition has, wherever it ran (the job's monitors,
    /// `Plan::monitors`); its figures are its own shards'. Reroutes are
    /// ordered from node 0 only, and node 0 commits the checkpoints of a
    /// job that takes them (into a data directory every node reaches, see
    /// `checkpoint::nodes`). With `DataflowConfig::autoscale`, each node
    /// runs its own autoscaler over its own shards (`scaling`): it moves
    /// this node's actors among them, on node 0 splits key-group ranges, and
    /// spills a keyed stage's actor to another node's shard with room when
    /// nothing of its own relieves a shard.
    pub fn start_remote(
        config: DataflowConfig,
        remote: crate::runtime::RemoteConfig,
    ) -> Result<Self, StartError> {
        Ok(Self::start_remote_with(config, remote, Vec::new())?.0)
    }

    /// As [`Dataflow::start_remote`], with `jobs` registered (in order)
    /// before the runtime starts: a node whose peers may start a job as soon
    /// as they run (each node a process of its own) has every plan before
    /// any of its actors can be asked for. One outcome per job, as
    /// [`Dataflow::register`]'s; a job that did not build stays an error.
    pub fn start_remote_with(
        config: DataflowConfig,
        remote: crate::runtime::RemoteConfig,
        jobs: Vec<Result<Job, String>>,
    ) -> Result<(Self, Vec<Result<JobHandle, String>>), StartError> {
        let node = remote.me;
        let total = remote
            .nodes
            .iter()
            .map(|n| usize::from(n.shards))
            .sum::<usize>();
        let mut runtime_config = config.runtime;
        let mut registry = Registry::new(total);
        registry.me = Some(node);
        registry.node_firsts = remote
            .nodes
            .iter()
            .scan(0u32, |first, n| {
                let this = *first;
                *first += u32::from(n.shards);
                Some(this)
            })
            .collect();
        let mut next_job = 1;
        // Job `i` of the list is id `i + 1` whatever its outcome, so that a
        // job that fails on one node only does not shift the others' ids.
        let handles: Vec<Result<JobHandle, String>> = jobs
            .into_iter()
            .map(|job| match job {
                Ok(job) => register_job(&registry, Some(node), &mut next_job, job),
                Err(e) => {
                    next_job += 1;
                    Err(e)
                }
            })
            .collect();
        runtime_config.on_failure = Some(supervise(&registry, runtime_config.on_failure.take()));
        let runtime = Runtime::start_remote(
            runtime_config,
            remote,
            registry.factory(),
            Arc::new(MemoryStateStore::default()),
        );
        let runtime = match runtime {
            Ok(runtime) => Arc::new(runtime),
            Err(e) => {
                // The registered jobs' checkpointers run already.
                registry.stop_checkpoints();
                return Err(e);
            }
        };
        let scaler = config
            .autoscale
            .map(|options| scaling::Driver::start(options, runtime.clone(), registry.clone()));
        let dataflow = Dataflow {
            runtime,
            registry,
            next_job,
            scaler,
            node: Some(node),
        };
        let _ = dataflow.registry.post.set(post_through(&dataflow.runtime));
        for handle in handles.iter().flatten() {
            dataflow.connect_checkpoints(handle);
        }
        Ok((dataflow, handles))
    }

    /// This node's shards.
    pub fn shards(&self) -> usize {
        self.runtime.shards()
    }

    /// The shards of the run: over every node of a dataflow that spans
    /// nodes (shard ids are the run's, and a job's per-shard figures have a
    /// slot for each), else `shards()`.
    pub fn shards_in_run(&self) -> usize {
        self.registry.shards
    }

    /// What this node's gateway carried (`None` unless the dataflow spans
    /// nodes).
    pub fn remote_stats(&self) -> Option<crate::runtime::remote::RemoteSnapshot> {
        self.runtime.remote_stats()
    }

    /// Submit a job; its sources start at once. Refused over nodes, where
    /// every node registers the job before one starts it
    /// ([`Dataflow::register`], [`Dataflow::start_job`]).
    pub fn submit(&mut self, job: Job) -> Result<JobHandle, String> {
        if let Some(node) = self.node {
            return Err(format!(
                "job {}: a dataflow that spans nodes takes a job registered on every node, \
                 then started from one (node {node})",
                job.name()
            ));
        }
        let handle = self.register(job)?;
        self.start_job(&handle)?;
        Ok(handle)
    }

    /// Register a job without starting it ([`Dataflow::submit`] does both):
    /// over nodes, every node registers it before one starts it, so that no
    /// actor of it is asked for on a node that has not its plan yet.
    pub fn register(&mut self, job: Job) -> Result<JobHandle, String> {
        let scalable = job.scalable();
        let handle = register_job(&self.registry, self.node, &mut self.next_job, job)?;
        self.connect_checkpoints(&handle);
        let id = handle.id;
        // Serverless sizing: under the autoscaler a scalable job starts on
        // one shard, and is spread from there as its load needs. Its actors
        // are not active yet: each move only renames their shard, before the
        // first message. Not over nodes: there every node places a job's
        // actors alike over all the run's shards, and each node's
        // autoscaler moves only those on its own.
        let starts_small = scalable && self.node.is_none();
        if let Some(scaler) = self.scaler.as_ref().filter(|_| starts_small) {
            let live: Vec<ShardId> = (0..self.runtime.shards())
                .map(|s| ShardId(s as u16))
                .filter(|s| !self.runtime.is_dead(*s))
                .collect();
            if let Some(shard) = scaler.start_shard(&live) {
                for actor in self.registry.actors(id) {
                    let _ = self.runtime.migrate(actor, shard);
                }
            }
        }
        Ok(handle)
    }

    /// Over nodes, a job's checkpointer reaches the job's monitors through
    /// this node's runtime (see `checkpoint::nodes`).
    fn connect_checkpoints(&self, handle: &JobHandle) {
        let Some(checkpointer) = handle.checkpointer.as_ref().filter(|_| self.node.is_some())
        else {
            return;
        };
        let monitors = self.registry.monitors(handle.id);
        checkpointer.connect(post_through(&self.runtime), monitors);
    }

    /// Start a registered job: the first message of each of its source
    /// partitions, wherever they are placed.
    ///
    /// Over nodes, a job that takes checkpoints is started from node 0,
    /// whose checkpointer coordinates them once the job has started
    /// (refused on another node).
    pub fn start_job(&self, handle: &JobHandle) -> Result<(), String> {
        if let Some(checkpointer) = &handle.checkpointer {
            if let Some(node) = self.node.filter(|&n| n != 0) {
                return Err(format!(
                    "job {}: a job that takes checkpoints over nodes is started from node 0, \
                     not node {node}",
                    handle.name
                ));
            }
            checkpointer.mark_started();
        }
        for (actor, sched) in handle.first_messages(crate::clock::monotonic_ns()) {
            // A dead shard fails every job through the failure hook.
            let _ = self.runtime.send(actor, DataMsg::Tick, sched);
        }
        Ok(())
    }

    /// Wait for a job as [`JobHandle::wait`] does, then retire it: its actors,
    /// saved bookkeeping and routing entries are dropped on every shard of
    /// this node, and messages still on their way to it are dropped (a failed
    /// job's leftovers included). Over nodes, each node waits and retires its
    /// own part.
    pub fn wait(&self, handle: &JobHandle, limit: Duration) -> Result<JobReport, String> {
        let outcome = handle.wait(limit);
        if self.node.is_some() && handle.metrics.has_failed() {
            // Not before the other nodes were told of a failure here.
            let told = self.registry.failure_told(handle.id);
            let started = Instant::now();
            while !told.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.retire(handle.id);
        outcome
    }

    /// Drop a job's actors on every shard (see `Runtime::retire_job`), then its
    /// plan. The plan goes only once every live shard has confirmed the
    /// retirement: until then a shard could still activate a late message's
    /// target from it; after it, every shard drops the job's messages unopened.
    pub fn retire(&self, job: JobId) {
        if self.runtime.retire_job(job) {
            self.registry.remove(job);
        }
    }

    /// Every actor of a job: `(stage, partition)` pairs, for tests and the autoscaler.
    pub fn actors(&self, job: JobId) -> Vec<ActorId> {
        self.registry.actors(job)
    }

    /// Jobs submitted and not yet retired.
    pub fn jobs(&self) -> usize {
        self.registry.jobs()
    }

    /// Move `actor` to shard `to` (of the run). A job's monitor over nodes
    /// stays on its node: asked to move, it does not.
    pub fn migrate(&self, actor: ActorId, to: ShardId) {
        if actor.operator == graph::MONITOR_STAGE {
            return;
        }
        // A dead shard is the runtime's to report (`RuntimeConfig::on_failure`).
        let _ = self.runtime.migrate(actor, to);
    }

    /// Reroute a keyed stage's key groups live (see [`Registry::reroute`]):
    /// `owners[g]` owns group `g` from now on. Returns once the orders are
    /// sent; [`Dataflow::routing`] says when every partition has completed
    /// it. Over nodes, only on node 0 (where `routing` is kept: another
    /// node's says the first table, settled).
    pub fn reroute(&self, job: JobId, stage: u32, owners: Vec<u32>) -> Result<(), String> {
        if let Some(node) = self.node.filter(|&n| n != 0) {
            // Node 0's monitor counts the partitions that completed a reroute,
            // wherever they ran: there alone a reroute is seen to end.
            return Err(format!(
                "a dataflow over nodes reroutes key groups from node 0, not node {node}"
            ));
        }
        deliver_orders(
            &self.runtime,
            job,
            self.registry.reroute(job, stage, owners)?,
        );
        Ok(())
    }

    /// Split a stage's fused steps out onto its relays, or fuse them back
    /// (see [`Registry::unchain`]); what the autoscaler does with
    /// `Action::Unchain` and `Action::Rechain`.
    pub fn unchain(&self, job: JobId, stage: u32, on: bool) -> Result<(), String> {
        self.registry.unchain(job, stage, on)
    }

    /// See [`Registry::keyed_stages`].
    pub fn keyed_stages(&self, job: JobId) -> Vec<KeyedStage> {
        self.registry.keyed_stages(job)
    }

    /// See [`Registry::routing`].
    pub fn routing(&self, job: JobId, stage: u32) -> Option<(Vec<u32>, bool)> {
        self.registry.routing(job, stage)
    }

    pub fn stats(&self) -> RuntimeStats {
        self.runtime.stats()
    }

    /// Stop the shards. Jobs still running stop where they are; a job taking
    /// checkpoints keeps its last committed one (its checkpointer is stopped
    /// first, so nothing writes to its data directory after this returns).
    pub fn shutdown(mut self) {
        if let Some(mut scaler) = self.scaler.take() {
            scaler.stop();
        }
        // Checkpoints stop first: over nodes, jobs run on while this node
        // lingers, and none may commit after the stop was asked for.
        self.registry.stop_checkpoints();
        self.linger(Duration::from_secs(5));
        // The autoscaler held the only other reference, and it has stopped.
        if let Ok(runtime) = Arc::try_unwrap(self.runtime) {
            runtime.shutdown();
        }
    }

    /// Over nodes, wait at most `limit` until everything this node's shards
    /// handed its gateway for a node still connected was sent and acked
    /// (read after two more of the gateway's passes): a job's last notices
    /// (a sink's end to the other nodes' monitors) reach them before this
    /// node stops.
    fn linger(&self, limit: Duration) {
        let Some(first) = self.runtime.remote_stats() else {
            return;
        };
        let started = Instant::now();
        while started.elapsed() < limit {
            let now = self.runtime.remote_stats().expect("over nodes");
            let settled = now
                .sent_all
                .iter()
                .zip(&now.connected)
                .all(|(&sent, &connected)| sent || !connected);
            if now.passes >= first.passes + 2 && settled {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The autoscaler's decisions so far (the last `DECISIONS_KEPT_MAX`),
    /// oldest first; empty without an autoscaler.
    pub fn decisions(&self) -> Vec<crate::autoscale::Decision> {
        self.scaler.as_ref().map_or(Vec::new(), |scaler| {
            let kept = scaler.decisions.lock().expect("decision log poisoned");
            kept.iter().cloned().collect()
        })
    }
}
