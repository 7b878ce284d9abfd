//! The actors a plan runs as: one kind per stage kind, typed by the stage's
//! record types. Each keeps what its stage needs (the source position, the
//! operator's state, the sink writer) and the watermark bookkeeping of its inputs,
//! and runs its routes (fused steps and partitioning, see `graph`) on what it
//! emits.
//!
//! Shared nothing per message: an actor holds its plan (one `Arc` clone at
//! activation, never per message), counts into its shard's slot of the job's
//! metrics (single writer), keeps its latency histogram to itself and merges it
//! into the shard slot at most every `LATENCY_FLUSH_NS`, and reads time only from
//! its context (the shard clock), so a whole dataflow runs under the simulator.

use std::collections::VecDeque;
use std::sync::Arc;

use hdrhistogram::Histogram;

use crate::actor::{decode_state, encode_state, Actor, BoxActor, Context, SchedCtx, StateBytes};
use crate::ids::ActorId;

use super::batch::Batch;
use super::checkpoint::{Checkpointer, Groups, Part, PartKind, Written, ALIGN_BUFFER_MESSAGES_MAX};
use super::graph::{
    initial_owners, Data, JoinOperator, Operator, Owners, Plan, Records, Route, Sender, Sink,
    Source, SourceBatch, SourceFactory,
};
use super::pace::RateSchedule;
use super::state::{encode_groups, MovedGroup, Stateful};
use super::{DataMsg, END_OF_INPUT};

pub(crate) fn activate(plan: Arc<Plan>, id: ActorId, state: Option<&[u8]>) -> BoxActor<DataMsg> {
    if id.operator == super::graph::MONITOR_STAGE {
        return Box::new(Monitor { plan });
    }
    let stage = &plan.stages[id.operator as usize];
    assert!(
        id.partition < stage.parallelism,
        "{id} beyond its stage's parallelism"
    );
    // Saved at a deactivation in this process, or else restored from the last
    // checkpoint (at most once: the first activation takes it).
    let saved = match state {
        Some(bytes) => Some(
            decode_state::<Saved>(bytes)
                .unwrap_or_else(|e| panic!("{id}: its saved state does not decode: {e}")),
        ),
        None => plan
            .checkpointer
            .as_ref()
            .and_then(|c| c.take_restore((id.operator, id.partition)))
            .map(|restored| {
                let mut saved = decode_state::<Saved>(&restored.meta).unwrap_or_else(|e| {
                    panic!("{id}: its checkpointed bookkeeping does not decode: {e}")
                });
                saved.groups = restored.groups;
                // Parts are numbered per run (the coordinator counts from 1).
                saved.parts = 0;
                saved
            }),
    };
    (stage.activate)(&plan, id, saved)
}

/// A job's monitor on one node of a dataflow over nodes (`Plan::monitors`):
/// this node's view of the job's end (every sink partition's, wherever it
/// ran) and, on node 0, of its reroutes' completion. All it knows is in
/// the plan: it saves nothing, and may deactivate.
struct Monitor {
    plan: Arc<Plan>,
}

impl Actor for Monitor {
    type Message = DataMsg;

    fn handle(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        match message {
            DataMsg::SinkDone => self.plan.metrics.sink_done(ctx.clock_ns()),
            DataMsg::RerouteDone { stage, version } => self.plan.rerouted(stage, version),
            DataMsg::JobFailed { error } => self.plan.failed_elsewhere(error),
            DataMsg::CheckpointPart(part) => {
                if let Some(checkpointer) = &self.plan.checkpointer {
                    checkpointer.report_remote(*part);
                }
            }
            DataMsg::CheckpointRequest { epoch, restored } => {
                if let Some(checkpointer) = &self.plan.checkpointer {
                    checkpointer.note_requested(epoch, restored);
                }
            }
            DataMsg::CheckpointOver { error } => {
                if let Some(checkpointer) = &self.plan.checkpointer {
                    checkpointer.note_over(error);
                }
            }
            DataMsg::NodeLoads { first, loads } => {
                let now = std::time::Instant::now();
                let mut remote = self
                    .plan
                    .remote_loads
                    .lock()
                    .expect("remote loads poisoned");
                for (i, load) in loads.into_iter().enumerate() {
                    let shard = first.saturating_add(i as u16);
                    remote.insert(shard, (now, f64::from(load) / 1e3));
                }
            }
            _ => {}
        }
    }

    fn snapshot(&mut self) -> Option<crate::actor::StateBytes> {
        None
    }
}

/// The table a keyed stage's partition routed by at a checkpoint and its
/// version, from its restored bookkeeping (`None`: never rerouted, or not
/// a keyed stage's).
pub(crate) fn restored_table(meta: &[u8]) -> Option<(u64, Vec<u32>)> {
    decode_state::<Saved>(meta).ok()?.own
}

/// What a dataflow actor keeps while deactivated, and (without `groups`,
/// `changed` and `latency_us`) what it hands to a checkpoint as its
/// bookkeeping.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct Saved {
    /// Per input, per upstream partition, the last watermark.
    per_input: Vec<Vec<i64>>,
    current_ms: i64,
    /// The source ended, or the sink saw the end of its input.
    done: bool,
    /// A sink's latency samples not yet merged into its shard's slot: `(us, count)`.
    latency_us: Vec<(u64, u32)>,
    /// A source's position (`Source::position`), its last watermark and its
    /// skipped count.
    position: Option<Vec<u8>>,
    last_watermark_ms: i64,
    /// Newest checkpoint epoch this actor completed, declined or gave up.
    last_epoch: u64,
    /// Checkpoint parts it handed over in this run (`Part::seq`; a restore
    /// starts it again at 0).
    parts: u64,
    /// The operator's key groups: every non-empty one at a deactivation; the
    /// ones a checkpoint holds at a restore.
    groups: Vec<(u32, Vec<u8>)>,
    /// Groups changed since the actor's last checkpoint part (deactivation only).
    changed: Vec<u32>,
    /// The tables it routes rerouted downstream stages by: `(stage, version,
    /// owner of each key group)`.
    routing: Vec<(u32, u64, Vec<u32>)>,
    /// A keyed stage's own table and its version, once it was rerouted.
    own: Option<(u64, Vec<u32>)>,
    /// Per input, per upstream partition: the newest reroute whose
    /// `Handed` came (`Gate`).
    handed: Vec<Vec<u64>>,
}

impl Default for Saved {
    fn default() -> Self {
        Saved {
            per_input: Vec::new(),
            current_ms: i64::MIN,
            done: false,
            latency_us: Vec::new(),
            position: None,
            last_watermark_ms: i64::MIN,
            last_epoch: 0,
            parts: 0,
            groups: Vec::new(),
            changed: Vec::new(),
            routing: Vec::new(),
            own: None,
            handed: Vec::new(),
        }
    }
}

/// Order across a reroute of an upstream stage, at its consumer: a key's
/// rows from before the reroute come on the giver's channel, those from
/// after on the taker's. A taker says `After` on its channel before its
/// first row from the groups it took; that channel then waits here until
/// the giver's `Handed` came on the giver's channel, so the key's rows are
/// handled in the order they were made.
struct Gate {
    /// Per input, per upstream partition: the newest reroute version whose
    /// `Handed` came on that channel.
    handed: Vec<Vec<u64>>,
    /// Channels waiting for a giver's `Handed`.
    waits: Vec<Wait>,
}

struct Wait {
    channel: (u8, u32),
    giver: u32,
    version: u64,
    /// What came on the channel meanwhile, in order.
    held: Vec<DataMsg>,
}

impl Gate {
    fn new(inputs: &[u32], saved: &Option<Saved>) -> Self {
        let handed = match saved {
            Some(saved) if !saved.handed.is_empty() => {
                let mut handed = saved.handed.clone();
                // A relay's channel never says `Handed`.
                fit_channels(&mut handed, inputs, 0);
                handed
            }
            _ => inputs.iter().map(|&n| vec![0; n as usize]).collect(),
        };
        Gate {
            handed,
            waits: Vec::new(),
        }
    }

    /// `message`, unless its channel waits: then it is kept, in order.
    #[inline]
    fn admit(&mut self, message: DataMsg) -> Option<DataMsg> {
        if self.waits.is_empty() {
            return Some(message);
        }
        let Some(channel) = message.channel() else {
            return Some(message);
        };
        match self.waits.iter_mut().find(|w| w.channel == channel) {
            Some(wait) => {
                wait.held.push(message);
                None
            }
            None => Some(message),
        }
    }

    /// A giver's `Handed`: what waited for it, in order.
    fn handed(&mut self, (input, from): (u8, u32), version: u64) -> Vec<DataMsg> {
        let slot = &mut self.handed[input as usize][from as usize];
        *slot = (*slot).max(version);
        let mut released = Vec::new();
        let mut i = 0;
        while i < self.waits.len() {
            let wait = &self.waits[i];
            if wait.channel.0 == input && wait.giver == from && wait.version <= version {
                released.extend(self.waits.swap_remove(i).held);
            } else {
                i += 1;
            }
        }
        released
    }

    /// A taker's `After` on `channel`: it waits unless the giver's `Handed`
    /// came already.
    fn after(&mut self, channel: (u8, u32), giver: u32, version: u64) {
        if self.handed[channel.0 as usize][giver as usize] < version {
            self.waits.push(Wait {
                channel,
                giver,
                version,
                held: Vec::new(),
            });
        }
    }

    fn idle(&self) -> bool {
        self.waits.is_empty()
    }
}

/// Per input, per upstream partition, the last watermark received.
struct Watermarks {
    per_input: Vec<Vec<i64>>,
    current_ms: i64,
}

/// Per input, `inputs[i]` channels: those beyond are dropped, those
/// missing added as `fill` (see `Watermarks::restore`).
fn fit_channels<T: Clone>(per_input: &mut [Vec<T>], inputs: &[u32], fill: T) {
    for (channels, &n) in per_input.iter_mut().zip(inputs) {
        channels.resize(n as usize, fill.clone());
    }
}

impl Watermarks {
    fn new(inputs: &[u32]) -> Self {
        Watermarks {
            per_input: inputs.iter().map(|&n| vec![i64::MIN; n as usize]).collect(),
            current_ms: i64::MIN,
        }
    }

    /// As saved, or new. A checkpoint taken with other relays on an input
    /// (their number follows the run's shards: channels after the
    /// producer's, `StagePlan::from_base`) is fitted to the channels there
    /// are now: a channel gone is dropped, a new one starts at the restored
    /// watermark. Nothing is in flight at a restore, and what the
    /// producers replay comes after their watermarks at the cut, which the
    /// restored one is not past.
    fn restore(inputs: &[u32], saved: &Option<Saved>) -> Self {
        match saved {
            Some(saved) if !saved.per_input.is_empty() => {
                let mut per_input = saved.per_input.clone();
                fit_channels(&mut per_input, inputs, saved.current_ms);
                Watermarks {
                    per_input,
                    current_ms: saved.current_ms,
                }
            }
            _ => Watermarks::new(inputs),
        }
    }

    /// Record a watermark; returns the new minimum if it advanced.
    fn update(&mut self, input: u8, from: u32, watermark_ms: i64) -> Option<i64> {
        let slot = &mut self.per_input[input as usize][from as usize];
        *slot = (*slot).max(watermark_ms);
        let minimum = self
            .per_input
            .iter()
            .flatten()
            .copied()
            .min()
            .unwrap_or(END_OF_INPUT);
        if minimum > self.current_ms {
            self.current_ms = minimum;
            Some(minimum)
        } else {
            None
        }
    }
}

/// Run every route of a stage on `records`: lent to each but the last, which
/// takes them.
fn emit<T: Data>(
    routes: &[Route<T>],
    plan: &Plan,
    sender: &Sender<'_>,
    records: Vec<T>,
    ctx: &mut Context<'_, DataMsg>,
) {
    let Some((last, others)) = routes.split_last() else {
        return;
    };
    if records.is_empty() {
        return;
    }
    for route in others {
        route(Records::Shared(&records), plan, sender, ctx);
    }
    last(Records::Owned(records), plan, sender, ctx);
}

/// `DataMsg::Reroute` at a partition that feeds `stage`: route it by `owners`
/// from now on, and say so on each channel to it, after everything this
/// partition sent it by the table before. A repeated or older order is
/// ignored.
fn reroute_out(
    plan: &Plan,
    (from_stage, partition): (u32, u32),
    routing: &mut Owners,
    (stage, version, owners): (u32, u64, Arc<[u32]>),
    ctx: &mut Context<'_, DataMsg>,
) {
    if version <= routing.version(stage) {
        return;
    }
    routing.set(stage, version, owners.clone());
    let partition = partition + plan.stages[from_stage as usize].from_base;
    for &(target, input) in &plan.stages[from_stage as usize].targets {
        if target != stage {
            continue;
        }
        let sched = plan.stamp(ctx.sched(), ctx.shard(), target);
        for p in 0..plan.stages[target as usize].parallelism {
            let marker = DataMsg::Rerouted {
                input,
                from: partition,
                version,
                owners: owners.clone(),
            };
            ctx.send_with(ActorId::new(plan.id, target, p), marker, sched);
        }
    }
}

/// Send `watermark_ms` from `(stage, partition)` to every partition of every
/// consumer of the stage.
fn broadcast_watermark(
    plan: &Plan,
    stage: u32,
    partition: u32,
    watermark_ms: i64,
    ctx: &mut Context<'_, DataMsg>,
) {
    let partition = partition + plan.stages[stage as usize].from_base;
    broadcast(plan, stage, false, ctx, |input| DataMsg::Watermark {
        input,
        from: partition,
        watermark_ms,
    });
}

/// Send checkpoint `epoch`'s barrier from `(stage, partition)` on every output
/// channel, due at once: an actor whose mailbox starts with a barrier runs
/// before any data that waits (a mailbox is FIFO, so a barrier still follows
/// every record sent before it on its channel). Handling one costs next to
/// nothing, and an alignment then waits only for the data ahead of the
/// barriers in the actor's own mailbox, not also for the earlier-deadline
/// data of other actors on its shard (a sink with no data of its own, behind
/// a saturated stage, otherwise ran only after every message on its shard
/// with an earlier deadline).
fn broadcast_barrier(
    plan: &Plan,
    (stage, partition): (u32, u32),
    epoch: u64,
    declined: bool,
    ctx: &mut Context<'_, DataMsg>,
) {
    let partition = partition + plan.stages[stage as usize].from_base;
    broadcast(plan, stage, true, ctx, |input| DataMsg::Barrier {
        input,
        from: partition,
        epoch,
        declined,
    });
}

fn broadcast(
    plan: &Plan,
    stage: u32,
    urgent: bool,
    ctx: &mut Context<'_, DataMsg>,
    message: impl Fn(u8) -> DataMsg,
) {
    for &(target, input) in &plan.stages[stage as usize].targets {
        let mut sched = plan.stamp(ctx.sched(), ctx.shard(), target);
        if urgent {
            sched.deadline_ns = 0;
        }
        for p in 0..plan.stages[target as usize].parallelism {
            ctx.send_with(ActorId::new(plan.id, target, p), message(input), sched);
        }
    }
}

/// How long a source with nothing ready (`SourceBatch::Pending`) waits before it
/// is asked again; after `SOURCE_RETRY_FAST` empty asks in a row the wait
/// doubles, up to `SOURCE_RETRY_MAX_NS`, so an idle input costs next to no
/// CPU and is still seen within a millisecond when it resumes.
const SOURCE_RETRY_NS: u64 = 20_000;
const SOURCE_RETRY_FAST: u32 = 4;
const SOURCE_RETRY_MAX_NS: u64 = 1_000_000;

/// Wall time a paced source lets records gather before it makes a batch.
const PACED_BATCH_NS: u64 = 100_000;

/// How often a sink merges its latency histogram into its shard's slot.
const LATENCY_FLUSH_NS: u64 = 10_000_000;

pub(crate) fn source_actor<T: Data>(
    plan: &Arc<Plan>,
    id: ActorId,
    factory: SourceFactory<T>,
    saved: Option<Saved>,
) -> BoxActor<DataMsg> {
    let stage = &plan.stages[id.operator as usize];
    let pace = plan
        .pace
        .as_ref()
        .map(|schedule| schedule.per_partition(stage.parallelism));
    let saved = saved.unwrap_or_default();
    Box::new(SourceActor {
        routes: stage.routes::<T>(),
        plan: plan.clone(),
        id,
        factory,
        source: None,
        pace,
        started_ns: 0,
        produced: 0,
        skipped: 0,
        last_watermark_ms: saved.last_watermark_ms,
        done: saved.done,
        resume_at: saved.position,
        injected: saved.last_epoch,
        parts: saved.parts,
        empty_asks: 0,
        routing: Owners::from_saved(&saved.routing).at_least(&plan.restored_tables),
    })
}

struct SourceActor<T> {
    plan: Arc<Plan>,
    id: ActorId,
    factory: SourceFactory<T>,
    /// Made on the first `Tick` (a source may start threads or open files; an
    /// actor reactivated after its end makes none).
    source: Option<Box<dyn Source<T>>>,
    routes: Vec<Route<T>>,
    /// This partition's share of the job's rate schedule, from `started_ns`.
    pace: Option<RateSchedule>,
    started_ns: u64,
    produced: u64,
    skipped: u64,
    last_watermark_ms: i64,
    done: bool,
    /// Where to seek the source when it is made (a restored checkpoint).
    resume_at: Option<Vec<u8>>,
    /// Newest checkpoint epoch whose barrier this partition sent.
    injected: u64,
    /// Checkpoint parts handed over (`Part::seq`).
    parts: u64,
    /// `Pending` answers with no record in a row.
    empty_asks: u32,
    /// Tables of the rerouted stages it feeds.
    routing: Owners,
}

impl<T: Data> SourceActor<T> {
    /// Records this turn may produce under the rate schedule; 0 means wait (a
    /// timer brings the next `Tick`). A paced source waits until a batch of at
    /// least `PACED_BATCH_NS` worth of records (at the rate in force) is due: one
    /// turn per few records would cost more than the records, and 100 µs is well
    /// inside any latency target.
    fn allowance(&mut self, now_ns: u64, ctx: &mut Context<'_, DataMsg>) -> usize {
        let max = self.plan.source_batch_records;
        let Some(pace) = &self.pace else {
            return max;
        };
        let elapsed_ns = now_ns.saturating_sub(self.started_ns);
        let allowed = pace.records_due(elapsed_ns);
        let rate = pace.per_s_at(elapsed_ns);
        let min_batch =
            ((rate as u128 * PACED_BATCH_NS as u128 / 1_000_000_000) as u64).clamp(1, max as u64);
        // A record waits for others to batch with for at most
        // `PACED_BATCH_NS`: before a pause (or a slower step), the batch it
        // waits for may not fill until the pause is over.
        let first_due_ns = pace.due_ns(self.produced.saturating_add(1));
        let waited_long = elapsed_ns.saturating_sub(first_due_ns) >= PACED_BATCH_NS;
        if allowed >= self.produced.saturating_add(min_batch)
            || (allowed > self.produced && waited_long)
        {
            return ((allowed - self.produced) as usize).min(max);
        }
        // Come back when the next batch is due, or when the first record due
        // has waited long enough.
        let due_ns = pace
            .due_ns(self.produced.saturating_add(min_batch))
            .min(first_due_ns.saturating_add(PACED_BATCH_NS));
        ctx.send_self_at(
            self.started_ns.saturating_add(due_ns),
            DataMsg::Tick,
            ctx.sched(),
        );
        0
    }

    fn name(&self) -> &str {
        &self.plan.stages[self.id.operator as usize].name
    }

    /// End the job with an error about this partition; produce nothing more.
    fn fail(&mut self, message: String) {
        let partition = self.id.partition;
        let message = format!("source {} partition {partition}: {message}", self.name());
        self.plan.fail(message);
        self.done = true;
        self.source = None;
    }

    /// This partition's bookkeeping for a checkpoint: where its source stands.
    fn part(&mut self, epoch: u64, kind: PartKind) -> Option<Part> {
        let position = match (&self.source, &self.resume_at) {
            (Some(source), _) => source.position(),
            // Not made yet: it stands where it was restored to.
            (None, Some(restored)) => Some(restored.clone()),
            (None, None) => None,
        };
        let position = match position {
            Some(position) => position,
            None => {
                self.fail(
                    "this source cannot be replayed (no position), so the job cannot take \
                     checkpoints"
                        .to_string(),
                );
                return None;
            }
        };
        let saved = Saved {
            done: matches!(kind, PartKind::Final),
            position: Some(position),
            last_watermark_ms: self.last_watermark_ms,
            last_epoch: epoch,
            routing: self.routing.to_saved(),
            ..Saved::default()
        };
        Some(Part {
            actor: (self.id.operator, self.id.partition),
            seq: 0,
            epoch,
            kind,
            meta: encode_state(&saved).to_vec(),
            groups: Groups::none(),
            sealed: Vec::new(),
            alignment_ns: None,
        })
    }

    /// Take this partition's part of checkpoint `epoch` and send its barrier.
    fn barrier(&mut self, epoch: u64, ctx: &mut Context<'_, DataMsg>) {
        self.injected = epoch;
        let Some(part) = self.part(epoch, PartKind::Regular) else {
            return;
        };
        if let Some(checkpointer) = &self.plan.checkpointer {
            checkpointer.report(part, &mut self.parts);
        }
        let key = (self.id.operator, self.id.partition);
        broadcast_barrier(&self.plan, key, epoch, false, ctx);
    }

    /// Stop producing: the rest of the job sees the end of its input.
    fn finish(&mut self, ctx: &mut Context<'_, DataMsg>) {
        let (stage, partition) = (self.id.operator, self.id.partition);
        broadcast_watermark(&self.plan, stage, partition, END_OF_INPUT, ctx);
        if self.plan.checkpointer.is_some() {
            if let Some(part) = self.part(self.injected, PartKind::Final) {
                self.plan
                    .checkpointer
                    .as_ref()
                    .expect("checked")
                    .report(part, &mut self.parts);
            }
        }
        self.done = true;
        self.source = None;
    }
}

impl<T: Data> Actor for SourceActor<T> {
    type Message = DataMsg;

    fn handle(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        if !matches!(message, DataMsg::Tick) {
            if let DataMsg::Reroute {
                stage,
                version,
                owners,
            } = message
            {
                // Also once ended: the stage waits for every channel's word.
                let key = (self.id.operator, self.id.partition);
                let order = (stage, version, owners);
                reroute_out(&self.plan, key, &mut self.routing, order, ctx);
            }
            return; // sources have no other inputs
        }
        if self.done {
            return;
        }
        if self.plan.metrics.has_failed() {
            self.done = true; // the job is over; its handle reports the error
            self.source = None;
            return;
        }
        let now_ns = ctx.clock_ns();
        if self.started_ns == 0 {
            self.started_ns = now_ns;
        }
        let max = self.allowance(now_ns, ctx);
        if max == 0 {
            return;
        }
        // The origin every result of this batch is timed from: when its first
        // record was due by the pace (the input arrived then, and whatever kept
        // the source from running since is latency too), or now, unpaced.
        let origin_ns = match &self.pace {
            Some(pace) => self
                .started_ns
                .saturating_add(pace.due_ns(self.produced.saturating_add(1)))
                .min(now_ns),
            None => now_ns,
        };
        let origin = SchedCtx {
            job: self.plan.id,
            origin_ns,
            deadline_ns: origin_ns.saturating_add(self.plan.slo_ns),
        };
        ctx.sched = origin;
        let (stage, partition) = (self.id.operator, self.id.partition);
        if self.source.is_none() {
            let parallelism = self.plan.stages[stage as usize].parallelism;
            let mut source = (self.factory)(partition, parallelism);
            if let Some(position) = &self.resume_at {
                if let Err(e) = source.seek(position) {
                    self.fail(format!("resuming from its checkpointed position: {e}"));
                    return;
                }
                self.skipped = source.skipped_records();
            }
            self.source = Some(source);
        }
        if let Some(checkpointer) = &self.plan.checkpointer {
            let requested = checkpointer.requested();
            if requested > self.injected {
                self.barrier(requested, ctx);
                if self.done {
                    return;
                }
            }
        }
        let source = self.source.as_mut().expect("made above");
        let mut batch = Vec::with_capacity(max);
        let status = source.next_batch(max, &mut batch);
        let skipped = source.skipped_records();
        let produced = batch.len();
        self.produced += produced as u64;
        let slot = self.plan.metrics.shard(ctx.shard());
        if skipped > self.skipped {
            slot.skipped_records.add(skipped - self.skipped);
            self.skipped = skipped;
        }
        slot.source_records.add(batch.len() as u64);
        let sender = Sender {
            partition,
            owners: &self.routing,
        };
        emit(&self.routes, &self.plan, &sender, batch, ctx);
        match status {
            SourceBatch::More { watermark_ms } if watermark_ms == END_OF_INPUT => {
                self.fail(format!(
                    "a watermark of {watermark_ms} ms (the end-of-input mark) came from data; \
                     a source ends with Done"
                ));
            }
            SourceBatch::More { watermark_ms } => {
                if watermark_ms > self.last_watermark_ms {
                    self.last_watermark_ms = watermark_ms;
                    broadcast_watermark(&self.plan, stage, partition, watermark_ms, ctx);
                }
                ctx.send_with(ctx.me(), DataMsg::Tick, origin);
            }
            SourceBatch::Pending => {
                self.empty_asks = if produced == 0 {
                    self.empty_asks.saturating_add(1)
                } else {
                    0
                };
                let backoff = self.empty_asks.saturating_sub(SOURCE_RETRY_FAST).min(16);
                let wait_ns = (SOURCE_RETRY_NS << backoff).min(SOURCE_RETRY_MAX_NS);
                let again_ns = now_ns.saturating_add(wait_ns);
                ctx.send_self_at(again_ns, DataMsg::Tick, origin);
            }
            SourceBatch::Done => self.finish(ctx),
            SourceBatch::Failed(message) => self.fail(message),
        }
        let cost_ns = ctx.clock_ns().saturating_sub(now_ns);
        self.plan.metrics.observe_cost(ctx.shard(), stage, cost_ns);
    }

    /// Only an ended source: its position is its `Source`'s, which is not saved.
    fn may_deactivate(&self) -> bool {
        self.done
    }

    fn snapshot(&mut self) -> Option<StateBytes> {
        let saved = Saved {
            done: self.done,
            last_epoch: self.injected,
            parts: self.parts,
            last_watermark_ms: self.last_watermark_ms,
            routing: self.routing.to_saved(),
            ..Saved::default()
        };
        Some(encode_state(&saved))
    }
}

/// What a keyed stage's operator is to its actor: records of an input, as the
/// batch they came in; a watermark; the late count; its state.
trait StageOp<Out>: Send + 'static {
    fn records(&mut self, input: u8, batch: Batch, out: &mut Vec<Out>);
    fn watermark(&mut self, watermark_ms: i64, out: &mut Vec<Out>);
    /// `Operator::firing`, `Operator::fire_more` (a join fires at once).
    fn firing(&self) -> bool {
        false
    }
    fn fire_more(&mut self, _out: &mut Vec<Out>) -> bool {
        true
    }
    fn late_records(&self) -> u64;
    fn state(&mut self) -> Option<&mut dyn Stateful>;
    fn keeps_partials(&self) -> bool {
        false
    }
}

struct Unary<In, Out>(Box<dyn Operator<In, Out>>);

impl<In: Data, Out: Data> StageOp<Out> for Unary<In, Out> {
    #[inline]
    fn records(&mut self, _input: u8, batch: Batch, out: &mut Vec<Out>) {
        self.0.on_records(batch.into_vec::<In>(), out);
    }
    fn watermark(&mut self, watermark_ms: i64, out: &mut Vec<Out>) {
        self.0.on_watermark(watermark_ms, out);
    }
    fn firing(&self) -> bool {
        self.0.firing()
    }
    fn fire_more(&mut self, out: &mut Vec<Out>) -> bool {
        self.0.fire_more(out)
    }
    fn late_records(&self) -> u64 {
        self.0.late_records()
    }
    fn state(&mut self) -> Option<&mut dyn Stateful> {
        self.0.state()
    }
    fn keeps_partials(&self) -> bool {
        self.0.keeps_partials()
    }
}

struct Join<L, R, Out>(Box<dyn JoinOperator<L, R, Out>>);

impl<L: Data, R: Data, Out: Data> StageOp<Out> for Join<L, R, Out> {
    #[inline]
    fn records(&mut self, input: u8, batch: Batch, out: &mut Vec<Out>) {
        if input == 0 {
            self.0.on_left(batch.into_vec::<L>(), out);
        } else {
            self.0.on_right(batch.into_vec::<R>(), out);
        }
    }
    fn watermark(&mut self, watermark_ms: i64, out: &mut Vec<Out>) {
        self.0.on_watermark(watermark_ms, out);
    }
    fn late_records(&self) -> u64 {
        self.0.late_records()
    }
    fn state(&mut self) -> Option<&mut dyn Stateful> {
        self.0.state()
    }
}

pub(crate) fn unary_actor<In: Data, Out: Data>(
    plan: &Arc<Plan>,
    id: ActorId,
    operator: Box<dyn Operator<In, Out>>,
    saved: Option<Saved>,
) -> BoxActor<DataMsg> {
    stage_actor(plan, id, Unary(operator), saved)
}

pub(crate) fn join_actor<L: Data, R: Data, Out: Data>(
    plan: &Arc<Plan>,
    id: ActorId,
    operator: Box<dyn JoinOperator<L, R, Out>>,
    saved: Option<Saved>,
) -> BoxActor<DataMsg> {
    stage_actor(plan, id, Join(operator), saved)
}

/// Checkpoint alignment of a stage or sink partition (see `checkpoint`).
struct Aligner {
    /// The epoch being aligned; 0 when none.
    epoch: u64,
    /// Newest epoch completed, declined or given up here: older barriers are
    /// stale.
    last: u64,
    /// Per input, per upstream partition: barrier `epoch` came.
    arrived: Vec<Vec<bool>>,
    /// Messages of channels whose barrier came, in arrival order.
    buffer: Vec<DataMsg>,
    /// What waited for an alignment now over, handed back a step at a time
    /// (`REPLAY_STEP_NS`), and what came in meanwhile behind it: channel
    /// order is kept, and no handler runs for as long as a whole held buffer
    /// takes (tens of ms under full load), which would stall the shard and
    /// the barriers it has to pass on. Each message that arrives while it is
    /// not empty is queued and at least one is handled, so it never grows.
    replay: VecDeque<DataMsg>,
    /// In a replay step (a step reached from within one queues and returns).
    replaying: bool,
    /// A `Replay` to itself is on its way.
    replay_due: bool,
    started_ns: u64,
    /// Aligned: the barrier went on, the `Snapshot` to itself is on its way
    /// (every channel stays held until it is taken).
    snapshot_due: bool,
    alignment_ns: u64,
    /// Checkpoint parts the actor handed over (`Part::seq`).
    parts: u64,
}

impl Aligner {
    fn new(inputs: &[u32], saved: Option<&Saved>) -> Self {
        Aligner {
            epoch: 0,
            last: saved.map_or(0, |s| s.last_epoch),
            parts: saved.map_or(0, |s| s.parts),
            arrived: inputs.iter().map(|&n| vec![false; n as usize]).collect(),
            buffer: Vec::new(),
            replay: VecDeque::new(),
            replaying: false,
            replay_due: false,
            started_ns: 0,
            snapshot_due: false,
            alignment_ns: 0,
        }
    }

    /// Whether `message` must wait: its channel's barrier came already (or
    /// the snapshot is due: every channel waits).
    #[inline]
    fn holds(&self, message: &DataMsg) -> bool {
        if self.epoch == 0 {
            return false;
        }
        match message.channel() {
            Some((input, from)) => self.snapshot_due || self.arrived[input as usize][from as usize],
            None => false,
        }
    }

    fn start(&mut self, epoch: u64, now_ns: u64) {
        self.epoch = epoch;
        self.started_ns = now_ns;
        self.snapshot_due = false;
        self.arrived.iter_mut().flatten().for_each(|a| *a = false);
    }

    /// Every channel has sent its barrier or ended.
    fn complete(&self, watermarks: &Watermarks) -> bool {
        self.arrived
            .iter()
            .zip(&watermarks.per_input)
            .all(|(arrived, marks)| {
                arrived
                    .iter()
                    .zip(marks)
                    .all(|(&a, &m)| a || m == END_OF_INPUT)
            })
    }

    /// Stop aligning (done, declined or overtaken): the messages that waited.
    fn finish(&mut self) -> Vec<DataMsg> {
        self.last = self.last.max(self.epoch);
        self.epoch = 0;
        self.snapshot_due = false;
        std::mem::take(&mut self.buffer)
    }
}

/// What a stage and a sink do alike about barriers: they align, then hand
/// over their part and forward the barrier.
trait Aligning {
    fn aligner(&mut self) -> &mut Aligner;
    fn gate(&mut self) -> &mut Gate;
    /// Every channel has sent the barrier being aligned, or ended.
    fn aligned(&self) -> bool;
    fn key(&self) -> (u32, u32);
    fn plan(&self) -> &Plan;
    /// Handle a message that does not wait.
    fn dispatch(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>);
    /// The part of a completed epoch (bookkeeping, changed groups, sealed output).
    fn part(&mut self, epoch: u64, kind: PartKind) -> Result<Part, String>;
    /// Hand `part` to the job's checkpointer, numbered in this actor's order.
    fn hand_over(&mut self, part: Part);
    /// Encode some of the changed groups for the part being taken; true once
    /// all are (a large snapshot takes several turns, so that the shard's
    /// other actors run in between). In a `hurry` (half the bound of held
    /// messages is used) it encodes the rest at once rather than decline.
    fn snapshot_step(&mut self, _hurry: bool) -> bool {
        true
    }
    /// A snapshot in progress is given up: its groups count as changed again.
    fn drop_snapshot(&mut self) {}
    /// Finish what the operator fires a step at a time, before a snapshot
    /// reads its state. (A barrier waits behind a fire under way, so there
    /// is none at an alignment; this keeps a snapshot whole regardless.)
    fn settle(&mut self, _ctx: &mut Context<'_, DataMsg>) {}

    /// `message` unless its channel waits for an upstream giver (then the
    /// gate keeps it) or it is the gate's own (`Handed`, `After`: taken
    /// here).
    #[inline]
    fn ordered(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) -> Option<DataMsg> {
        if self.gate().idle() && !matches!(message, DataMsg::Handed { .. } | DataMsg::After { .. })
        {
            return Some(message);
        }
        self.gate_slow(message, ctx)
    }

    #[inline(never)]
    fn gate_slow(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) -> Option<DataMsg> {
        match self.gate().admit(message)? {
            DataMsg::Handed {
                input,
                from,
                version,
            } => {
                let released = self.gate().handed((input, from), version);
                self.resume(released, ctx);
                None
            }
            DataMsg::After {
                input,
                from,
                giver,
                version,
            } => {
                self.gate().after((input, from), giver, version);
                None
            }
            message => Some(message),
        }
    }

    fn deliver(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        if self.aligner().holds(&message) {
            let aligner = self.aligner();
            aligner.buffer.push(message);
            if aligner.buffer.len() > ALIGN_BUFFER_MESSAGES_MAX {
                let epoch = aligner.epoch;
                self.decline(
                    epoch,
                    format!(
                        "over {ALIGN_BUFFER_MESSAGES_MAX} messages waited for barriers \
                         while aligning"
                    ),
                    ctx,
                );
            }
            return;
        }
        self.dispatch(message, ctx);
    }

    fn barrier(
        &mut self,
        (input, from): (u8, u32),
        epoch: u64,
        declined: bool,
        ctx: &mut Context<'_, DataMsg>,
    ) {
        let aligner = self.aligner();
        if epoch <= aligner.last || (aligner.epoch != 0 && epoch < aligner.epoch) {
            // Stale: that epoch is over here, or a newer one is being aligned
            // (the checkpointer gave the older up; a source that skipped it
            // sent the newer barrier first).
            return;
        }
        if declined {
            self.drop_snapshot();
            let aligner = self.aligner();
            let held = aligner.finish();
            aligner.last = aligner.last.max(epoch);
            let (plan_key, plan) = (self.key(), self.plan());
            broadcast_barrier(plan, plan_key, epoch, true, ctx);
            self.hand_over(Part {
                actor: plan_key,
                seq: 0,
                epoch,
                kind: PartKind::Passed,
                meta: Vec::new(),
                groups: Groups::none(),
                sealed: Vec::new(),
                alignment_ns: None,
            });
            self.resume(held, ctx);
            return;
        }
        let mut overtaken = Vec::new();
        if aligner.epoch != 0 && epoch > aligner.epoch {
            // An epoch the checkpointer gave up on: what waited goes on, after
            // this barrier starts the new alignment.
            self.drop_snapshot();
            overtaken = self.aligner().finish();
        }
        let aligner = self.aligner();
        if aligner.epoch == 0 {
            aligner.start(epoch, ctx.clock_ns());
        }
        aligner.arrived[input as usize][from as usize] = true;
        self.try_complete(ctx);
        self.resume(overtaken, ctx);
    }

    /// If every channel has sent its barrier or ended: forward the barrier
    /// (it leaves when this handler returns), and take the part at a
    /// `Snapshot` sent to itself, with every channel still held: so the
    /// barrier does not wait for the snapshot's encoding, and no input after
    /// the barrier reaches the state before it is taken.
    fn try_complete(&mut self, ctx: &mut Context<'_, DataMsg>) {
        let aligner = self.aligner();
        let epoch = aligner.epoch;
        if epoch == 0 || aligner.snapshot_due || !self.aligned() {
            return;
        }
        let aligner = self.aligner();
        aligner.alignment_ns = ctx.clock_ns().saturating_sub(aligner.started_ns);
        aligner.snapshot_due = true;
        broadcast_barrier(self.plan(), self.key(), epoch, false, ctx);
        ctx.send(ctx.me(), DataMsg::Snapshot { epoch });
    }

    /// The `Snapshot` a completed alignment sent itself: hand over the part,
    /// go on with what waited.
    fn snapshot_now(&mut self, epoch: u64, ctx: &mut Context<'_, DataMsg>) {
        let aligner = self.aligner();
        if aligner.epoch != epoch || !aligner.snapshot_due {
            return; // declined or overtaken meanwhile
        }
        let alignment_ns = aligner.alignment_ns;
        let hurry = aligner.buffer.len() > ALIGN_BUFFER_MESSAGES_MAX / 2;
        self.settle(ctx);
        if !self.snapshot_step(hurry) {
            ctx.send(ctx.me(), DataMsg::Snapshot { epoch });
            return;
        }
        match self.part(epoch, PartKind::Regular) {
            Ok(mut part) => {
                part.alignment_ns = Some(alignment_ns);
                self.hand_over(part);
            }
            Err(e) => {
                self.decline(epoch, e, ctx);
                return;
            }
        }
        let held = self.aligner().finish();
        self.resume(held, ctx);
    }

    /// Give up `epoch` here: the checkpointer fails it, and everyone downstream
    /// stops waiting for it.
    fn decline(&mut self, epoch: u64, reason: String, ctx: &mut Context<'_, DataMsg>) {
        let key = self.key();
        self.hand_over(Part {
            actor: key,
            seq: 0,
            epoch,
            kind: PartKind::Declined(reason),
            meta: Vec::new(),
            groups: Groups::none(),
            sealed: Vec::new(),
            alignment_ns: None,
        });
        broadcast_barrier(self.plan(), key, epoch, true, ctx);
        self.drop_snapshot();
        let held = self.aligner().finish();
        self.resume(held, ctx);
    }

    /// A message for this stage or sink: queued behind a replay under way,
    /// or handled.
    fn receive(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        match message {
            DataMsg::Replay => {
                self.aligner().replay_due = false;
                self.replay_step(ctx);
            }
            message
                if !self.aligner().replay.is_empty()
                    && (message.channel().is_some()
                        || matches!(message, DataMsg::Handoff { .. })) =>
            {
                self.aligner().replay.push_back(message);
                self.replay_step(ctx);
            }
            message => self.deliver(message, ctx),
        }
    }

    /// Hand back what waited for an alignment: before anything queued for
    /// replay already (all of it came earlier on its channel).
    fn resume(&mut self, held: Vec<DataMsg>, ctx: &mut Context<'_, DataMsg>) {
        let replay = &mut self.aligner().replay;
        for message in held.into_iter().rev() {
            replay.push_front(message);
        }
        self.replay_step(ctx);
    }

    /// Handle queued messages for up to `REPLAY_STEP_NS` (at least one), and
    /// cue itself for the rest.
    fn replay_step(&mut self, ctx: &mut Context<'_, DataMsg>) {
        let aligner = self.aligner();
        if aligner.replaying {
            return;
        }
        aligner.replaying = true;
        let start_ns = ctx.clock_ns();
        while let Some(message) = self.aligner().replay.pop_front() {
            self.deliver(message, ctx);
            if ctx.clock_ns().saturating_sub(start_ns) >= REPLAY_STEP_NS {
                break;
            }
        }
        let aligner = self.aligner();
        aligner.replaying = false;
        if !aligner.replay.is_empty() && !aligner.replay_due {
            aligner.replay_due = true;
            let firing = matches!(aligner.replay.front(), Some(DataMsg::Fire));
            ctx.send(ctx.me(), DataMsg::Replay);
            if let (Some(checkpointer), false) = (&self.plan().checkpointer, firing) {
                checkpointer.note_replay_step();
            }
        }
    }

    /// Queue `Fire` first, and make sure a replay step will take it.
    fn cue_fire(&mut self, ctx: &mut Context<'_, DataMsg>) {
        let aligner = self.aligner();
        aligner.replay.push_front(DataMsg::Fire);
        if !aligner.replaying && !aligner.replay_due {
            aligner.replay_due = true;
            ctx.send(ctx.me(), DataMsg::Replay);
        }
    }
}

/// Write an actor's changed groups of `epoch` as one chunk on this shard's
/// executor (glommio, io_uring), then tell the checkpointer where they are.
fn write_on_shard(
    checkpointer: Arc<Checkpointer>,
    actor: (u32, u32),
    epoch: u64,
    groups: Vec<(u32, Vec<u8>)>,
) {
    crate::runtime::spawn_io(async move {
        let (stage, partition) = actor;
        let name = format!("chunk-{epoch}-{stage}-{partition}-s");
        let mut order = Vec::with_capacity(groups.len());
        let mut full = Vec::with_capacity(groups.len());
        for (group, bytes) in groups {
            order.push((group, !bytes.is_empty()));
            if !bytes.is_empty() {
                full.push(bytes);
            }
        }
        let result = match checkpointer.store().write_chunk_async(&name, &full).await {
            Ok(refs) => {
                let mut refs = refs.into_iter();
                Ok(order
                    .iter()
                    .map(|&(group, some)| (group, if some { refs.next() } else { None }))
                    .collect())
            }
            Err(e) => {
                let mut full = full.into_iter();
                let bytes = order
                    .iter()
                    .map(|&(group, some)| {
                        (
                            group,
                            if some {
                                full.next().unwrap_or_default()
                            } else {
                                Vec::new()
                            },
                        )
                    })
                    .collect();
                Err((e.to_string(), bytes))
            }
        };
        checkpointer.report_written(Written {
            actor,
            epoch,
            result,
        });
    });
}

fn stage_actor<Out: Data, Op: StageOp<Out>>(
    plan: &Arc<Plan>,
    id: ActorId,
    mut operator: Op,
    saved: Option<Saved>,
) -> BoxActor<DataMsg> {
    let stage = &plan.stages[id.operator as usize];
    let inputs = Watermarks::restore(&stage.inputs, &saved);
    let gate = Gate::new(&stage.inputs, &saved);
    let saved = saved.unwrap_or_default();
    if let Some(state) = operator.state() {
        state.init(plan.key_groups);
        for (group, bytes) in &saved.groups {
            if let Err(e) = state.restore(*group, bytes) {
                panic!("{id}: restoring its state: {e}");
            }
        }
        for &group in &saved.changed {
            state.mark_changed(group);
        }
    }
    let own = match &saved.own {
        Some((version, owners)) => (*version, Arc::from(&owners[..])),
        None => (0, initial_owners(stage.parallelism, plan.key_groups).into()),
    };
    let mut out = Vec::new();
    if inputs.current_ms > i64::MIN {
        // The operator learns where its input stands (nothing fires: what the
        // watermark completed was emitted before the state was saved).
        operator.watermark(inputs.current_ms, &mut out);
        debug_assert!(out.is_empty(), "{id}: a restored operator fired again");
        out.clear();
    }
    Box::new(StageActor {
        align: Aligner::new(&stage.inputs, Some(&saved)),
        inputs,
        routes: stage.routes::<Out>(),
        plan: plan.clone(),
        id,
        operator,
        out,
        // A restored operator is new: its own late count starts again at 0.
        late_seen: 0,
        snapshot: None,
        held_watermark: None,
        routing: Owners::from_saved(&saved.routing).at_least(&plan.restored_tables),
        own,
        rescale: None,
        gate,
    })
}

struct StageActor<Out, Op> {
    plan: Arc<Plan>,
    id: ActorId,
    operator: Op,
    inputs: Watermarks,
    routes: Vec<Route<Out>>,
    out: Vec<Out>,
    /// The operator's late count already added to the job's.
    late_seen: u64,
    align: Aligner,
    /// A snapshot being encoded over several turns.
    snapshot: Option<Snapshotting>,
    /// The watermark that set off a fire under way: passed on once it is
    /// done (downstream sees a window's rows before the watermark past it).
    held_watermark: Option<i64>,
    /// Tables of the rerouted stages it feeds.
    routing: Owners,
    /// Its own stage's table in force here and its version: the key groups
    /// this partition owns are those it names this partition for.
    own: (u64, Arc<[u32]>),
    /// A reroute of its stage under way here.
    rescale: Option<Rescale>,
    /// Order across reroutes of the stages that feed it.
    gate: Gate,
}

/// Key groups handed to another partition of the stage, as they were held
/// (`None`: empty).
type MovedGroups = Vec<(u32, Option<MovedGroup>)>;

/// A reroute of a keyed stage at one of its partitions (see `reroute`): from
/// the first word of it (a channel's `Rerouted`, or a peer's `Handoff`) until
/// every channel has said it routes by the new table, the groups this
/// partition gave up went to their new owners, and the groups it takes came.
struct Rescale {
    version: u64,
    owners: Arc<[u32]>,
    /// Per input, per upstream partition: its `Rerouted` came.
    marked: Vec<Vec<bool>>,
    /// The new table gives some of its groups to others (and its state
    /// moves with them).
    gives: bool,
    /// Its groups that the new table gives to others were handed over.
    gave: bool,
    /// Partitions whose handoff is still to come.
    awaiting: Vec<u32>,
    /// Handoffs that came before this partition gave its own groups: taken
    /// right after it gave.
    early: Vec<(u32, MovedGroups)>,
    /// What came on channels already rerouted while a handoff was awaited
    /// (records of the groups it takes among them), in arrival order.
    held: Vec<DataMsg>,
}

impl Rescale {
    /// Whether `message` must wait: it came after its channel's marker,
    /// and either this partition has groups to give and has not given them
    /// yet (the watermarks that come after a marker must not fire their
    /// windows here: records for them go to the new owner), or groups to
    /// take that have not all come.
    fn holds(&self, message: &DataMsg) -> bool {
        if (self.gave || !self.gives) && self.awaiting.is_empty() {
            return false;
        }
        match message.channel() {
            Some((input, from)) => self.marked[input as usize][from as usize],
            None => false,
        }
    }
}

/// How long one step of handing back what waited for an alignment runs.
const REPLAY_STEP_NS: u64 = 250_000;

/// Bytes of state a snapshot encodes per turn, about (at least one group):
/// a step of 256 KiB takes some 0.2 ms, so the shard's other actors, and the
/// barriers they pass on, wait no longer than that.
const SNAPSHOT_STEP_BYTES: usize = 1 << 18;

/// Groups of a snapshot still to encode, and those encoded.
struct Snapshotting {
    todo: Vec<u32>,
    done: Vec<(u32, Vec<u8>)>,
}

impl<Out: Data, Op: StageOp<Out>> StageActor<Out, Op> {
    /// Pass the stage's watermark on; at the end of input, its final part.
    fn pass_watermark(&mut self, current: i64, ctx: &mut Context<'_, DataMsg>) {
        broadcast_watermark(
            &self.plan,
            self.id.operator,
            self.id.partition,
            current,
            ctx,
        );
        if current == END_OF_INPUT && self.plan.checkpointer.is_some() {
            let last = self.align.last;
            let part = self.part(last, PartKind::Final).expect("infallible");
            self.hand_over(part);
        }
    }

    /// One step of the operator's fire (all of it with `whole`): its rows go
    /// out, and once it is done, the watermark it held; true when done.
    fn fire_step(&mut self, whole: bool, ctx: &mut Context<'_, DataMsg>) -> bool {
        let done = loop {
            let done = self.operator.fire_more(&mut self.out);
            let out = std::mem::take(&mut self.out);
            self.emit_out(out, ctx);
            if done || !whole {
                break done;
            }
        };
        if done {
            if let Some(current) = self.held_watermark.take() {
                self.pass_watermark(current, ctx);
            }
        }
        done
    }

    /// Bookkeeping for a checkpoint or deactivation.
    fn saved(&self, epoch: u64) -> Saved {
        let (version, owners) = &self.own;
        Saved {
            per_input: self.inputs.per_input.clone(),
            current_ms: self.inputs.current_ms,
            last_epoch: epoch,
            parts: self.align.parts,
            routing: self.routing.to_saved(),
            own: (*version > 0).then(|| (*version, owners.to_vec())),
            handed: self.gate.handed.clone(),
            ..Saved::default()
        }
    }

    fn emit_out(&mut self, out: Vec<Out>, ctx: &mut Context<'_, DataMsg>) {
        let sender = Sender {
            partition: self.id.partition + self.plan.stages[self.id.operator as usize].from_base,
            owners: &self.routing,
        };
        emit(&self.routes, &self.plan, &sender, out, ctx);
    }

    /// The reroute to `version` by `owners` under way here: begun at its
    /// first word. `None` for a version this partition is past.
    fn rescale(&mut self, version: u64, owners: &Arc<[u32]>) -> Option<&mut Rescale> {
        if version <= self.own.0 {
            return None;
        }
        if self.rescale.is_none() {
            let me = self.id.partition;
            let old = &self.own.1;
            let moves = !self.operator.keeps_partials();
            let mut awaiting: Vec<u32> = old
                .iter()
                .zip(owners.iter())
                .filter(|&(&o, &n)| moves && n == me && o != me)
                .map(|(&o, _)| o)
                .collect();
            let gives = moves
                && old
                    .iter()
                    .zip(owners.iter())
                    .any(|(&o, &n)| o == me && n != me);
            awaiting.sort_unstable();
            awaiting.dedup();
            self.rescale = Some(Rescale {
                version,
                owners: owners.clone(),
                marked: self
                    .inputs
                    .per_input
                    .iter()
                    .map(|w| vec![false; w.len()])
                    .collect(),
                gives,
                gave: false,
                awaiting,
                early: Vec::new(),
                held: Vec::new(),
            });
        }
        let rescale = self.rescale.as_mut().expect("set above");
        debug_assert_eq!(rescale.version, version, "one reroute of a stage at a time");
        Some(rescale)
    }

    /// Take the next steps of the reroute under way: once every channel
    /// routes by the new table (or ended), hand the groups it gives up to
    /// their new owners; as soon as nothing is left to wait for (given, and
    /// taken), go on with what was held, before anything that comes after
    /// it on its channel; once every channel is rerouted too, tell the plan
    /// (`Plan::reroute_done`).
    fn rescale_progress(&mut self, ctx: &mut Context<'_, DataMsg>) {
        let Some(rescale) = &self.rescale else {
            return;
        };
        let rerouted = rescale
            .marked
            .iter()
            .zip(&self.inputs.per_input)
            .all(|(marked, marks)| {
                marked
                    .iter()
                    .zip(marks)
                    .all(|(&m, &w)| m || w == END_OF_INPUT)
            });
        if rerouted && !rescale.gave {
            self.give(ctx);
            let early = std::mem::take(&mut self.rescale.as_mut().expect("under way").early);
            for (from, groups) in early {
                self.take(from, groups, ctx);
            }
        }
        let rescale = self.rescale.as_mut().expect("under way");
        let mut released = Vec::new();
        if rescale.awaiting.is_empty() && (rescale.gave || !rescale.gives) {
            // What comes next on a channel is no longer held: what was held
            // goes first.
            released = std::mem::take(&mut rescale.held);
        }
        if rerouted && rescale.awaiting.is_empty() {
            let rescale = self.rescale.take().expect("under way");
            self.own = (rescale.version, rescale.owners);
            self.plan
                .reroute_done(self.id.operator, rescale.version, ctx);
        }
        self.resume(released, ctx);
    }

    /// Hand each group the new table gives to another partition to it (one
    /// `Handoff` per new owner, also of empty groups: it waits for it), and
    /// empty them here. Every record routed here by the old table was
    /// handled: every channel has said it routes by the new one.
    fn give(&mut self, ctx: &mut Context<'_, DataMsg>) {
        let me = self.id.partition;
        let rescale = self.rescale.as_mut().expect("under way");
        rescale.gave = true;
        if self.operator.keeps_partials() {
            return;
        }
        let (version, owners) = (rescale.version, rescale.owners.clone());
        self.settle(ctx);
        let mut handoffs: Vec<(u32, MovedGroups)> = Vec::new();
        let mut state = self.operator.state();
        for (group, (&old, &new)) in self.own.1.iter().zip(owners.iter()).enumerate() {
            if old != me || new == me {
                continue;
            }
            let group = group as u32;
            // The group's state itself goes, not an encoding of it: what a
            // burst left behind can be hundreds of megabytes, and encoding it
            // here held the shard for most of a second.
            let moved = state.as_deref_mut().and_then(|state| {
                let moved = state.take_group(group);
                state.mark_changed(group);
                moved
            });
            match handoffs.iter_mut().find(|(to, _)| *to == new) {
                Some((_, groups)) => groups.push((group, moved)),
                None => handoffs.push((new, vec![(group, moved)])),
            }
        }
        if !handoffs.is_empty() {
            // Its rows of those groups went out already: consumers hold
            // their new owners' rows until they have them.
            broadcast(&self.plan, self.id.operator, false, ctx, |input| {
                DataMsg::Handed {
                    input,
                    from: me,
                    version,
                }
            });
        }
        let sched = self.plan.stamp(ctx.sched(), ctx.shard(), self.id.operator);
        for (to, groups) in handoffs {
            let handoff = DataMsg::Handoff {
                from: me,
                version,
                owners: owners.clone(),
                groups,
            };
            // Partitions of one stage may each be blocked on the other's
            // full mailbox: a handoff takes no credit (one per pair).
            let to = ActorId::new(self.plan.id, self.id.operator, to);
            ctx.send_uncredited(to, handoff, sched);
        }
    }

    /// A peer's `Handoff`: take its groups; consumers hold what this
    /// partition sends from now on until they have the giver's rows.
    fn take(&mut self, from: u32, groups: MovedGroups, ctx: &mut Context<'_, DataMsg>) {
        let id = self.id;
        let version = self.rescale.as_ref().expect("under way").version;
        broadcast(&self.plan, id.operator, false, ctx, |input| {
            DataMsg::After {
                input,
                from: id.partition,
                giver: from,
                version,
            }
        });
        if let Some(state) = self.operator.state() {
            for (group, moved) in groups {
                let taken = match moved {
                    Some(moved) => state.put_group(group, moved),
                    None => state.restore(group, &[]),
                };
                if let Err(e) = taken {
                    panic!("{id}: taking key group {group} from partition {from}: {e}");
                }
                state.mark_changed(group);
            }
        }
        let rescale = self.rescale.as_mut().expect("under way");
        rescale.awaiting.retain(|&p| p != from);
    }
}

impl<Out: Data, Op: StageOp<Out>> Aligning for StageActor<Out, Op> {
    fn hand_over(&mut self, part: Part) {
        if let Some(checkpointer) = &self.plan.checkpointer {
            checkpointer.report(part, &mut self.align.parts);
        }
    }

    fn aligner(&mut self) -> &mut Aligner {
        &mut self.align
    }
    fn gate(&mut self) -> &mut Gate {
        &mut self.gate
    }
    fn aligned(&self) -> bool {
        self.align.complete(&self.inputs)
    }
    fn key(&self) -> (u32, u32) {
        (self.id.operator, self.id.partition)
    }
    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn snapshot_step(&mut self, hurry: bool) -> bool {
        let Some(state) = self.operator.state() else {
            return true;
        };
        let snapshot = self.snapshot.get_or_insert_with(|| {
            let todo = state.changed();
            state.clear_changed();
            Snapshotting {
                todo,
                done: Vec::new(),
            }
        });
        let mut budget = if hurry {
            usize::MAX
        } else {
            SNAPSHOT_STEP_BYTES
        };
        while let Some(group) = snapshot.todo.pop() {
            let mut bytes = Vec::new();
            state.encode_group(group, &mut bytes);
            budget = budget.saturating_sub(bytes.len().max(64));
            snapshot.done.push((group, bytes));
            if budget == 0 {
                break;
            }
        }
        snapshot.todo.is_empty()
    }

    fn settle(&mut self, ctx: &mut Context<'_, DataMsg>) {
        if self.operator.firing() || self.held_watermark.is_some() {
            self.fire_step(true, ctx);
            self.align.replay.retain(|m| !matches!(m, DataMsg::Fire));
        }
    }

    fn drop_snapshot(&mut self) {
        let (Some(snapshot), Some(state)) = (self.snapshot.take(), self.operator.state()) else {
            return;
        };
        let groups = snapshot.todo.into_iter();
        for group in groups.chain(snapshot.done.into_iter().map(|(g, _)| g)) {
            state.mark_changed(group);
        }
    }

    fn part(&mut self, epoch: u64, kind: PartKind) -> Result<Part, String> {
        let meta = encode_state(&self.saved(epoch)).to_vec();
        let groups = match (self.snapshot.take(), self.operator.state()) {
            // Encoded over the turns since the alignment.
            (Some(snapshot), _) => snapshot.done,
            (None, Some(state)) => {
                let groups = encode_groups(state, &state.changed());
                state.clear_changed();
                groups
            }
            (None, None) => Vec::new(),
        };
        // On a shard, a regular part's chunk is written there through
        // io_uring while the actor goes on; its final part (and any part under
        // the simulator) goes to the checkpointer's thread as bytes.
        let on_shard = matches!(kind, PartKind::Regular)
            && !groups.is_empty()
            && crate::runtime::shard_io_available();
        let groups = match &self.plan.checkpointer {
            Some(checkpointer) if on_shard => {
                write_on_shard(checkpointer.clone(), self.key(), epoch, groups);
                Groups::Writing
            }
            _ => Groups::Encoded(groups),
        };
        Ok(Part {
            actor: self.key(),
            seq: 0,
            epoch,
            kind,
            meta,
            groups,
            sealed: Vec::new(),
            alignment_ns: None,
        })
    }

    fn dispatch(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        let Some(message) = self.ordered(message, ctx) else {
            return;
        };
        if let Some(rescale) = self.rescale.as_mut().filter(|r| r.holds(&message)) {
            rescale.held.push(message);
            return;
        }
        let start_ns = ctx.clock_ns();
        let stage = self.id.operator;
        match message {
            // The gate takes its own (`ordered`).
            DataMsg::Tick
            | DataMsg::Replay
            | DataMsg::Handed { .. }
            | DataMsg::After { .. }
            | DataMsg::SinkDone
            | DataMsg::RerouteDone { .. }
            | DataMsg::JobFailed { .. }
            | DataMsg::CheckpointPart(_)
            | DataMsg::CheckpointRequest { .. }
            | DataMsg::CheckpointOver { .. }
            | DataMsg::NodeLoads { .. } => return,
            DataMsg::Snapshot { epoch } => return self.snapshot_now(epoch, ctx),
            DataMsg::Reroute {
                stage: target,
                version,
                owners,
            } => {
                let key = (stage, self.id.partition);
                let order = (target, version, owners);
                reroute_out(&self.plan, key, &mut self.routing, order, ctx);
            }
            DataMsg::Rerouted {
                input,
                from,
                version,
                owners,
            } => {
                if let Some(rescale) = self.rescale(version, &owners) {
                    rescale.marked[input as usize][from as usize] = true;
                    self.rescale_progress(ctx);
                }
            }
            DataMsg::Handoff {
                from,
                version,
                owners,
                groups,
            } => {
                if let Some(rescale) = self.rescale(version, &owners) {
                    if rescale.gives && !rescale.gave {
                        // It gives first: its `Handed` goes out before any
                        // `After`, so no two consumers' waits close a cycle.
                        rescale.early.push((from, groups));
                    } else {
                        self.take(from, groups, ctx);
                        self.rescale_progress(ctx);
                    }
                }
            }
            DataMsg::Fire => {
                if !self.fire_step(false, ctx) {
                    self.cue_fire(ctx);
                }
            }
            DataMsg::Records { input, batch, .. } => {
                if batch.crossed() {
                    let slot = self.plan.metrics.shard(ctx.shard());
                    slot.remote_records.add(batch.len() as u64);
                }
                self.operator.records(input, batch, &mut self.out);
                let out = std::mem::take(&mut self.out);
                self.emit_out(out, ctx);
            }
            DataMsg::Watermark {
                input,
                from,
                watermark_ms,
            } => {
                if let Some(current) = self.inputs.update(input, from, watermark_ms) {
                    self.operator.watermark(current, &mut self.out);
                    let out = std::mem::take(&mut self.out);
                    self.emit_out(out, ctx);
                    if self.operator.firing() {
                        // The rest fires in later turns, ahead of anything
                        // that comes in; the watermark goes on after it.
                        self.held_watermark = Some(current);
                        self.cue_fire(ctx);
                    } else {
                        // A watermark held for an earlier fire is passed by
                        // this one (never one behind it after it).
                        self.held_watermark = None;
                        self.pass_watermark(current, ctx);
                    }
                }
                if watermark_ms == END_OF_INPUT {
                    // The channel ended: an alignment or a reroute may need
                    // it no more.
                    self.try_complete(ctx);
                    self.rescale_progress(ctx);
                }
            }
            DataMsg::Barrier {
                input,
                from,
                epoch,
                declined,
            } => self.barrier((input, from), epoch, declined, ctx),
        }
        let slot = self.plan.metrics.shard(ctx.shard());
        let late = self.operator.late_records();
        if late > self.late_seen {
            slot.late_records.add(late - self.late_seen);
            self.late_seen = late;
        }
        let cost_ns = ctx.clock_ns().saturating_sub(start_ns);
        self.plan.metrics.observe_cost(ctx.shard(), stage, cost_ns);
    }
}

impl<Out: Data, Op: StageOp<Out>> Actor for StageActor<Out, Op> {
    type Message = DataMsg;

    fn handle(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        self.receive(message, ctx);
    }

    /// Whenever it is not aligning a checkpoint: its operator's state goes with
    /// it (`Operator::state`).
    fn may_deactivate(&self) -> bool {
        self.align.epoch == 0
            && self.align.replay.is_empty()
            && self.held_watermark.is_none()
            && !self.operator.firing()
            && self.rescale.is_none()
            && self.gate.idle()
    }

    fn snapshot(&mut self) -> Option<StateBytes> {
        let mut saved = self.saved(self.align.last);
        if let Some(state) = self.operator.state() {
            saved.groups = encode_groups(state, &state.non_empty());
            saved.changed = state.changed();
        }
        Some(encode_state(&saved))
    }
}

pub(crate) fn sink_actor<T: Data>(
    plan: &Arc<Plan>,
    id: ActorId,
    sink: Box<dyn Sink<T>>,
    saved: Option<Saved>,
) -> BoxActor<DataMsg> {
    let stage = &plan.stages[id.operator as usize];
    let mut latency_us = crate::runtime::stats::new_histogram();
    let mut latency_recorded = false;
    for &(us, count) in saved.iter().flat_map(|s| s.latency_us.iter()) {
        // Values come from a histogram of the same bounds.
        let _ = latency_us.record_n(us, count);
        latency_recorded = true;
    }
    Box::new(SinkActor {
        inputs: Watermarks::restore(&stage.inputs, &saved),
        gate: Gate::new(&stage.inputs, &saved),
        finished: saved.as_ref().is_some_and(|s| s.done),
        align: Aligner::new(&stage.inputs, saved.as_ref()),
        plan: plan.clone(),
        id,
        sink,
        latency_us,
        latency_recorded,
        next_flush_ns: 0,
    })
}

struct SinkActor<T> {
    plan: Arc<Plan>,
    id: ActorId,
    sink: Box<dyn Sink<T>>,
    inputs: Watermarks,
    /// Latency of this partition's outputs since the last flush to its shard slot.
    latency_us: Histogram<u32>,
    latency_recorded: bool,
    next_flush_ns: u64,
    finished: bool,
    align: Aligner,
    /// Order across reroutes of the stage that feeds it.
    gate: Gate,
}

impl<T> SinkActor<T> {
    /// Merge the local latency histogram into the shard's slot of the job.
    fn flush_latency(&mut self, ctx: &Context<'_, DataMsg>, now_ns: u64) {
        self.next_flush_ns = now_ns.saturating_add(LATENCY_FLUSH_NS);
        if !self.latency_recorded {
            return;
        }
        let slot = self.plan.metrics.shard(ctx.shard());
        let mut shared = slot.latency_us.lock().expect("latency lock poisoned");
        // Same bounds on both sides: adding cannot fail.
        let _ = shared.add(&self.latency_us);
        drop(shared);
        self.latency_us.reset();
        self.latency_recorded = false;
    }
}

impl<T: Data> Aligning for SinkActor<T> {
    fn hand_over(&mut self, part: Part) {
        if let Some(checkpointer) = &self.plan.checkpointer {
            checkpointer.report(part, &mut self.align.parts);
        }
    }

    fn aligner(&mut self) -> &mut Aligner {
        &mut self.align
    }
    fn gate(&mut self) -> &mut Gate {
        &mut self.gate
    }
    fn aligned(&self) -> bool {
        self.align.complete(&self.inputs)
    }
    fn key(&self) -> (u32, u32) {
        (self.id.operator, self.id.partition)
    }
    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn part(&mut self, epoch: u64, kind: PartKind) -> Result<Part, String> {
        let sealed = self.sink.seal(epoch)?;
        let saved = Saved {
            per_input: self.inputs.per_input.clone(),
            current_ms: self.inputs.current_ms,
            done: self.finished,
            last_epoch: epoch,
            handed: self.gate.handed.clone(),
            ..Saved::default()
        };
        Ok(Part {
            actor: self.key(),
            seq: 0,
            epoch,
            kind,
            meta: encode_state(&saved).to_vec(),
            groups: Groups::none(),
            sealed,
            alignment_ns: None,
        })
    }

    fn dispatch(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        let Some(message) = self.ordered(message, ctx) else {
            return;
        };
        let start_ns = ctx.clock_ns();
        match message {
            // A sink stage is never rerouted; the gate takes its own.
            DataMsg::Tick
            | DataMsg::Replay
            | DataMsg::Fire
            | DataMsg::Reroute { .. }
            | DataMsg::Rerouted { .. }
            | DataMsg::Handoff { .. }
            | DataMsg::Handed { .. }
            | DataMsg::After { .. }
            | DataMsg::SinkDone
            | DataMsg::RerouteDone { .. }
            | DataMsg::JobFailed { .. }
            | DataMsg::CheckpointPart(_)
            | DataMsg::CheckpointRequest { .. }
            | DataMsg::CheckpointOver { .. }
            | DataMsg::NodeLoads { .. } => {}
            DataMsg::Snapshot { epoch } => self.snapshot_now(epoch, ctx),
            DataMsg::Records { batch, .. } => {
                let crossed = batch.crossed();
                let records = batch.into_vec::<T>();
                self.sink.write(&records);
                let slot = self.plan.metrics.shard(ctx.shard());
                slot.outputs.add(records.len() as u64);
                if crossed {
                    slot.remote_records.add(records.len() as u64);
                }
                let latency_ns = start_ns.saturating_sub(ctx.sched().origin_ns);
                crate::runtime::stats::record_us(
                    &mut self.latency_us,
                    latency_ns,
                    records.len() as u64,
                );
                self.latency_recorded = true;
                if start_ns >= self.next_flush_ns {
                    self.flush_latency(ctx, start_ns);
                }
            }
            DataMsg::Watermark {
                input,
                from,
                watermark_ms,
            } => {
                let advanced = self.inputs.update(input, from, watermark_ms);
                if advanced == Some(END_OF_INPUT) && !self.finished {
                    self.finished = true;
                    self.sink.finish();
                    self.flush_latency(ctx, start_ns);
                    if self.plan.checkpointer.is_some() {
                        let last = self.align.last;
                        match self.part(last, PartKind::Final) {
                            Ok(part) => self.hand_over(part),
                            Err(e) => self.plan.fail(format!(
                                "sink {} partition {}: sealing its output: {e}",
                                self.plan.stages[self.id.operator as usize].name, self.id.partition
                            )),
                        }
                    }
                    self.plan.sink_done(ctx);
                }
                if watermark_ms == END_OF_INPUT {
                    self.try_complete(ctx);
                }
            }
            DataMsg::Barrier {
                input,
                from,
                epoch,
                declined,
            } => self.barrier((input, from), epoch, declined, ctx),
        }
        let cost_ns = ctx.clock_ns().saturating_sub(start_ns);
        let stage = self.id.operator;
        self.plan.metrics.observe_cost(ctx.shard(), stage, cost_ns);
    }
}

impl<T: Data> Actor for SinkActor<T> {
    type Message = DataMsg;

    fn handle(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        self.receive(message, ctx);
    }

    /// Once its input has ended, or whenever it idles if its `Sink` is
    /// stateless, and never while aligning a checkpoint: the rest (watermarks,
    /// unflushed latency samples) is saved.
    fn may_deactivate(&self) -> bool {
        self.align.epoch == 0
            && self.align.replay.is_empty()
            && self.gate.idle()
            && (self.finished || self.sink.stateless())
    }

    fn snapshot(&mut self) -> Option<StateBytes> {
        let latency_us = self
            .latency_us
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        let saved = Saved {
            per_input: self.inputs.per_input.clone(),
            current_ms: self.inputs.current_ms,
            done: self.finished,
            latency_us,
            last_epoch: self.align.last,
            parts: self.align.parts,
            handed: self.gate.handed.clone(),
            ..Saved::default()
        };
        Some(encode_state(&saved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(from: u32, n: u64) -> DataMsg {
        DataMsg::Records {
            input: 0,
            from,
            batch: Batch::new(vec![n]),
        }
    }

    /// `(from, value)` of a record batch of one `u64`.
    fn value(message: DataMsg) -> (u32, u64) {
        match message {
            DataMsg::Records { from, batch, .. } => (from, batch.into_vec::<u64>()[0]),
            _ => panic!("not records"),
        }
    }

    #[test]
    fn a_channel_after_an_after_waits_for_the_givers_handed_and_keeps_its_order() {
        // Three upstream partitions on one input; 2 took groups from 0.
        let mut gate = Gate::new(&[3], &None);
        assert_eq!(
            gate.admit(records(2, 1)).map(value),
            Some((2, 1)),
            "no wait yet"
        );
        gate.after((0, 2), 0, 1);
        assert!(!gate.idle());
        assert!(gate.admit(records(2, 2)).is_none(), "held behind its After");
        assert!(gate.admit(records(2, 3)).is_none());
        // Other channels flow, the giver's included.
        assert!(gate.admit(records(1, 4)).is_some());
        assert!(gate.admit(records(0, 5)).is_some());
        // A Handed of an older reroute releases nothing.
        assert!(gate.handed((0, 0), 0).is_empty());
        let released: Vec<_> = gate.handed((0, 0), 1).into_iter().map(value).collect();
        assert_eq!(released, [(2, 2), (2, 3)], "in the order they came");
        assert!(gate.idle());
        // The giver's Handed came first this time: no wait at all.
        gate.handed((0, 1), 2);
        gate.after((0, 2), 1, 2);
        assert!(gate.idle());
        assert!(gate.admit(records(2, 6)).is_some());
    }
}
