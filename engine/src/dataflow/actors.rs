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

use std::sync::Arc;

use hdrhistogram::Histogram;

use crate::actor::{decode_state, encode_state, Actor, BoxActor, Context, SchedCtx, StateBytes};
use crate::ids::ActorId;

use super::batch::Batch;
use super::graph::{
    Data, JoinOperator, Operator, Plan, Route, Sink, Source, SourceBatch, SourceFactory,
};
use super::{DataMsg, END_OF_INPUT};

pub(crate) fn activate(plan: Arc<Plan>, id: ActorId, state: Option<&[u8]>) -> BoxActor<DataMsg> {
    let stage = &plan.stages[id.operator as usize];
    assert!(
        id.partition < stage.parallelism,
        "{id} beyond its stage's parallelism"
    );
    let saved = state.map(|bytes| {
        decode_state::<Saved>(bytes)
            .unwrap_or_else(|e| panic!("{id}: its saved bookkeeping does not decode: {e}"))
    });
    (stage.activate)(&plan, id, saved)
}

/// What a dataflow actor keeps while deactivated: its bookkeeping, never an
/// operator's or a sink's own state. So only actors with nothing else to lose
/// deactivate: stateless sinks (any time), and sources, keyed stages and sinks
/// once their input has ended (`may_deactivate`); operator state joins
/// snapshots with keyed state tables.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Default)]
pub(crate) struct Saved {
    /// Per input, per upstream partition, the last watermark.
    per_input: Vec<Vec<i64>>,
    current_ms: i64,
    /// The source ended, or the sink saw the end of its input.
    done: bool,
    /// A sink's latency samples not yet merged into its shard's slot: `(us, count)`.
    latency_us: Vec<(u64, u32)>,
}

/// Per input, per upstream partition, the last watermark received.
struct Watermarks {
    per_input: Vec<Vec<i64>>,
    current_ms: i64,
}

impl Watermarks {
    fn new(inputs: &[u32]) -> Self {
        Watermarks {
            per_input: inputs.iter().map(|&n| vec![i64::MIN; n as usize]).collect(),
            current_ms: i64::MIN,
        }
    }

    /// As saved, or new.
    fn restore(inputs: &[u32], saved: &Option<Saved>) -> Self {
        match saved {
            Some(saved) if !saved.per_input.is_empty() => Watermarks {
                per_input: saved.per_input.clone(),
                current_ms: saved.current_ms,
            },
            _ => Watermarks::new(inputs),
        }
    }

    /// Record a watermark; returns the new minimum if it advanced.
    fn update(&mut self, input: u8, from: u32, watermark_ms: i64) -> Option<i64> {
        let slot = &mut self.per_input[input as usize][from as usize];
        debug_assert!(
            watermark_ms >= *slot,
            "watermark went back on input {input} from {from}"
        );
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

/// Run every route of a stage on `records` (each but the last on a copy).
fn emit<T: Data>(
    routes: &[Route<T>],
    plan: &Plan,
    partition: u32,
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
        route(records.clone(), plan, partition, ctx);
    }
    last(records, plan, partition, ctx);
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
    for &(target, input) in &plan.stages[stage as usize].targets {
        let sched = plan.stamp(ctx.sched(), ctx.shard(), target);
        for p in 0..plan.stages[target as usize].parallelism {
            let message = DataMsg::Watermark {
                input,
                from: partition,
                watermark_ms,
            };
            ctx.send_with(ActorId::new(plan.id, target, p), message, sched);
        }
    }
}

/// How long a source with nothing ready (`SourceBatch::Pending`) waits before it
/// is asked again.
const SOURCE_RETRY_NS: u64 = 20_000;

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
    let rate_per_partition = plan
        .rate_records_per_s
        .map(|r| (r / stage.parallelism as u64).max(1));
    Box::new(SourceActor {
        routes: stage.routes::<T>(),
        plan: plan.clone(),
        id,
        factory,
        source: None,
        rate_per_partition,
        started_ns: 0,
        produced: 0,
        skipped: 0,
        last_watermark_ms: i64::MIN,
        done: saved.is_some_and(|s| s.done),
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
    rate_per_partition: Option<u64>,
    started_ns: u64,
    produced: u64,
    skipped: u64,
    last_watermark_ms: i64,
    done: bool,
}

impl<T: Data> SourceActor<T> {
    /// Records this turn may produce under the rate limit; 0 means wait (a timer
    /// brings the next `Tick`). A paced source waits until a batch of at least
    /// `PACED_BATCH_NS` worth of records is due: one turn per few records would cost
    /// more than the records, and 100 µs is well inside any latency target.
    fn allowance(&mut self, now_ns: u64, ctx: &mut Context<'_, DataMsg>) -> usize {
        let max = self.plan.source_batch_records;
        let Some(rate) = self.rate_per_partition else {
            return max;
        };
        let elapsed_ns = now_ns.saturating_sub(self.started_ns) as u128;
        let allowed = (elapsed_ns * rate as u128 / 1_000_000_000) as u64;
        let min_batch =
            ((rate as u128 * PACED_BATCH_NS as u128 / 1_000_000_000) as u64).clamp(1, max as u64);
        if allowed >= self.produced.saturating_add(min_batch) {
            return ((allowed - self.produced) as usize).min(max);
        }
        // Come back when the next batch is due.
        let due_records = self.produced.saturating_add(min_batch) as u128;
        let due_ns = (due_records * 1_000_000_000 / rate as u128).min(u64::MAX as u128) as u64;
        ctx.send_self_at(
            self.started_ns.saturating_add(due_ns),
            DataMsg::Tick,
            ctx.sched(),
        );
        0
    }

    /// Stop producing: the rest of the job sees the end of its input.
    fn finish(&mut self, ctx: &mut Context<'_, DataMsg>) {
        self.done = true;
        self.source = None;
        let (stage, partition) = (self.id.operator, self.id.partition);
        broadcast_watermark(&self.plan, stage, partition, END_OF_INPUT, ctx);
    }
}

impl<T: Data> Actor for SourceActor<T> {
    type Message = DataMsg;

    fn handle(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        let DataMsg::Tick = message else {
            return; // sources have no inputs
        };
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
        // The input enters now: this is the origin every result of it is timed from.
        let origin = SchedCtx {
            job: self.plan.id,
            origin_ns: now_ns,
            deadline_ns: now_ns.saturating_add(self.plan.slo_ns),
        };
        ctx.sched = origin;
        let (stage, partition) = (self.id.operator, self.id.partition);
        let parallelism = self.plan.stages[stage as usize].parallelism;
        let factory = &self.factory;
        let source = self
            .source
            .get_or_insert_with(|| factory(partition, parallelism));
        let mut batch = Vec::with_capacity(max);
        let status = source.next_batch(max, &mut batch);
        let skipped = source.skipped_records();
        self.produced += batch.len() as u64;
        let slot = self.plan.metrics.shard(ctx.shard());
        if skipped > self.skipped {
            slot.skipped_records.add(skipped - self.skipped);
            self.skipped = skipped;
        }
        slot.source_records.add(batch.len() as u64);
        emit(&self.routes, &self.plan, partition, batch, ctx);
        match status {
            SourceBatch::More { watermark_ms } if watermark_ms == END_OF_INPUT => {
                self.plan.metrics.fail(format!(
                    "source {} partition {partition}: a watermark of {watermark_ms} ms \
                     (the end-of-input mark) came from data; a source ends with Done",
                    self.plan.stages[stage as usize].name
                ));
                self.done = true;
                self.source = None;
            }
            SourceBatch::More { watermark_ms } => {
                if watermark_ms > self.last_watermark_ms {
                    self.last_watermark_ms = watermark_ms;
                    broadcast_watermark(&self.plan, stage, partition, watermark_ms, ctx);
                }
                ctx.send_with(ctx.me(), DataMsg::Tick, origin);
            }
            SourceBatch::Pending => {
                let again_ns = now_ns.saturating_add(SOURCE_RETRY_NS);
                ctx.send_self_at(again_ns, DataMsg::Tick, origin);
            }
            SourceBatch::Done => self.finish(ctx),
            SourceBatch::Failed(message) => {
                let name = &self.plan.stages[stage as usize].name;
                self.plan
                    .metrics
                    .fail(format!("source {name} partition {partition}: {message}"));
                self.done = true;
                self.source = None;
            }
        }
        let cost_ns = ctx.clock_ns().saturating_sub(now_ns);
        self.plan.metrics.observe_cost(ctx.shard(), stage, cost_ns);
    }

    /// Only an ended source: its position is its `Source`'s, which is not saved.
    fn may_deactivate(&self) -> bool {
        self.done
    }

    fn snapshot(&self) -> Option<StateBytes> {
        let saved = Saved {
            done: self.done,
            ..Saved::default()
        };
        Some(encode_state(&saved))
    }
}

/// What a keyed stage's operator is to its actor: records of an input, as the
/// batch they came in; a watermark; the late count.
trait StageOp<Out>: Send + 'static {
    fn records(&mut self, input: u8, batch: Batch, out: &mut Vec<Out>);
    fn watermark(&mut self, watermark_ms: i64, out: &mut Vec<Out>);
    fn late_records(&self) -> u64;
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
    fn late_records(&self) -> u64 {
        self.0.late_records()
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

fn stage_actor<Out: Data, Op: StageOp<Out>>(
    plan: &Arc<Plan>,
    id: ActorId,
    operator: Op,
    saved: Option<Saved>,
) -> BoxActor<DataMsg> {
    let stage = &plan.stages[id.operator as usize];
    Box::new(StageActor {
        inputs: Watermarks::restore(&stage.inputs, &saved),
        routes: stage.routes::<Out>(),
        plan: plan.clone(),
        id,
        operator,
        out: Vec::new(),
        // A restored operator is new: its own late count starts again at 0.
        late_seen: 0,
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
}

impl<Out: Data, Op: StageOp<Out>> Actor for StageActor<Out, Op> {
    type Message = DataMsg;

    fn handle(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        let start_ns = ctx.clock_ns();
        let (stage, partition) = (self.id.operator, self.id.partition);
        match message {
            DataMsg::Tick => return,
            DataMsg::Records { input, batch } => {
                self.operator.records(input, batch, &mut self.out);
                let out = std::mem::take(&mut self.out);
                emit(&self.routes, &self.plan, partition, out, ctx);
            }
            DataMsg::Watermark {
                input,
                from,
                watermark_ms,
            } => {
                if let Some(current) = self.inputs.update(input, from, watermark_ms) {
                    self.operator.watermark(current, &mut self.out);
                    let out = std::mem::take(&mut self.out);
                    emit(&self.routes, &self.plan, partition, out, ctx);
                    broadcast_watermark(&self.plan, stage, partition, current, ctx);
                }
            }
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

    /// Only once its input has ended: by then the operator has emitted and
    /// dropped everything it held (a window operator fires all at the end).
    fn may_deactivate(&self) -> bool {
        self.inputs.current_ms == END_OF_INPUT
    }

    fn snapshot(&self) -> Option<StateBytes> {
        let saved = Saved {
            per_input: self.inputs.per_input.clone(),
            current_ms: self.inputs.current_ms,
            ..Saved::default()
        };
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
        finished: saved.as_ref().is_some_and(|s| s.done),
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

impl<T: Data> Actor for SinkActor<T> {
    type Message = DataMsg;

    fn handle(&mut self, message: DataMsg, ctx: &mut Context<'_, DataMsg>) {
        let start_ns = ctx.clock_ns();
        match message {
            DataMsg::Tick => {}
            DataMsg::Records { batch, .. } => {
                let records = batch.into_vec::<T>();
                self.sink.write(&records);
                let slot = self.plan.metrics.shard(ctx.shard());
                slot.outputs.add(records.len() as u64);
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
                    self.plan.metrics.sink_done(ctx.clock_ns());
                }
            }
        }
        let cost_ns = ctx.clock_ns().saturating_sub(start_ns);
        let stage = self.id.operator;
        self.plan.metrics.observe_cost(ctx.shard(), stage, cost_ns);
    }

    /// Once its input has ended, or whenever it idles if its `Sink` is
    /// stateless: the rest (watermarks, unflushed latency samples) is saved.
    fn may_deactivate(&self) -> bool {
        self.finished || self.sink.stateless()
    }

    fn snapshot(&self) -> Option<StateBytes> {
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
        };
        Some(encode_state(&saved))
    }
}
