//! The actors a plan runs as: one kind per stage kind. Each keeps what its stage
//! needs (the source position, the operator's state, the sink writer) and the
//! watermark bookkeeping of its inputs, and hands its outputs to an `Emitter`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::actor::{Actor, BoxActor, Context, SchedCtx};
use crate::clock::monotonic_ns;
use crate::ids::ActorId;

use super::graph::{
    Operator, Output, Partitioner, Plan, Sink, Source, SourceBatch, StageKind, Step,
};
use super::{key_group, partition_of_group, DataMsg, END_OF_INPUT};

pub(crate) fn activate<R: Clone + Send + 'static>(
    plan: Arc<Plan<R>>,
    id: ActorId,
) -> BoxActor<DataMsg<R>> {
    let stage = id.operator;
    let partition = id.partition;
    let stage_plan = &plan.stages[stage as usize];
    assert!(
        partition < stage_plan.parallelism,
        "{id} beyond its stage's parallelism"
    );
    match &stage_plan.kind {
        StageKind::Source(factory) => {
            let source = factory(partition, stage_plan.parallelism);
            let rate_per_partition = plan
                .rate_records_per_s
                .map(|r| (r / stage_plan.parallelism as u64).max(1));
            Box::new(SourceActor {
                emitter: Emitter::new(&plan, stage, partition),
                source,
                rate_per_partition,
                started_ns: 0,
                produced: 0,
                skipped: 0,
                last_watermark_ms: i64::MIN,
                done: false,
                plan,
            })
        }
        StageKind::Operator(factory) => Box::new(StageActor {
            operator: factory(partition),
            inputs: Watermarks::new(&stage_plan.inputs),
            emitter: Emitter::new(&plan, stage, partition),
            out: Vec::new(),
            plan,
        }),
        StageKind::Sink(factory) => Box::new(SinkActor {
            sink: factory(partition),
            inputs: Watermarks::new(&stage_plan.inputs),
            stage,
            finished: false,
            plan,
        }),
    }
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

/// Applies a stage's fused steps to its output and sends it, partitioned, to the
/// next stages; also broadcasts watermarks.
struct Emitter<R> {
    stage: u32,
    partition: u32,
    /// Per output: a buffer per target partition, reused.
    buffers: Vec<Vec<Vec<R>>>,
}

impl<R: Send + 'static> Emitter<R> {
    fn new(plan: &Plan<R>, stage: u32, partition: u32) -> Self {
        let buffers = plan.stages[stage as usize]
            .outputs
            .iter()
            .map(|o| {
                (0..plan.stages[o.target as usize].parallelism)
                    .map(|_| Vec::new())
                    .collect()
            })
            .collect();
        Emitter {
            stage,
            partition,
            buffers,
        }
    }

    fn emit(&mut self, plan: &Plan<R>, records: Vec<R>, ctx: &mut Context<'_, DataMsg<R>>)
    where
        R: Clone,
    {
        if records.is_empty() {
            return;
        }
        let outputs = &plan.stages[self.stage as usize].outputs;
        let last = outputs.len() - 1;
        let mut records = Some(records);
        for (o, output) in outputs.iter().enumerate() {
            let batch = if o == last {
                records.take().expect("moved once, at the last output")
            } else {
                records.as_ref().expect("still here").clone()
            };
            let batch = run_steps(&output.steps, batch);
            if !batch.is_empty() {
                self.partition_out(plan, o, output, batch, ctx);
            }
        }
    }

    fn partition_out(
        &mut self,
        plan: &Plan<R>,
        o: usize,
        output: &Output<R>,
        batch: Vec<R>,
        ctx: &mut Context<'_, DataMsg<R>>,
    ) {
        let targets = self.buffers[o].len() as u32;
        let sched = stamp(plan, ctx.sched(), output.target);
        let send = |ctx: &mut Context<'_, DataMsg<R>>, p: u32, records: Vec<R>| {
            let to = ActorId::new(plan.id, output.target, p);
            ctx.send_with(
                to,
                DataMsg::Records {
                    input: output.input,
                    records,
                },
                sched,
            );
        };
        match &output.partitioner {
            Partitioner::Forward => send(ctx, self.partition % targets, batch),
            Partitioner::Key(key) => {
                let expected = batch.len() / targets as usize + 16;
                for record in batch {
                    let p = partition_of_group(key_group(key(&record)), targets) as usize;
                    let buffer = &mut self.buffers[o][p];
                    if buffer.capacity() == 0 {
                        buffer.reserve(expected);
                    }
                    buffer.push(record);
                }
                for p in 0..targets {
                    let buffer = &mut self.buffers[o][p as usize];
                    if !buffer.is_empty() {
                        send(ctx, p, std::mem::take(buffer));
                    }
                }
            }
        }
    }

    fn watermark(&self, plan: &Plan<R>, watermark_ms: i64, ctx: &mut Context<'_, DataMsg<R>>) {
        for output in &plan.stages[self.stage as usize].outputs {
            let sched = stamp(plan, ctx.sched(), output.target);
            for p in 0..plan.stages[output.target as usize].parallelism {
                let to = ActorId::new(plan.id, output.target, p);
                let message = DataMsg::Watermark {
                    input: output.input,
                    from: self.partition,
                    watermark_ms,
                };
                ctx.send_with(to, message, sched);
            }
        }
    }
}

fn stamp<R>(plan: &Plan<R>, sched: SchedCtx, target: u32) -> SchedCtx {
    SchedCtx {
        deadline_ns: plan.deadline_ns(&sched, target),
        ..sched
    }
}

/// Run `records` through the fused steps. Maps and filters run in place, reusing
/// the batch's allocation (each record is moved once); a flat_map builds a new batch.
fn run_steps<R>(steps: &[Step<R>], records: Vec<R>) -> Vec<R> {
    if steps.is_empty() {
        return records;
    }
    if !steps.iter().any(|s| matches!(s, Step::FlatMap(_))) {
        return records
            .into_iter()
            .filter_map(|r| map_filter(steps, r))
            .collect();
    }
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        expand(steps, record, &mut out);
    }
    out
}

#[inline]
fn map_filter<R>(steps: &[Step<R>], mut record: R) -> Option<R> {
    for step in steps {
        match step {
            Step::Map(f) => record = f(record),
            Step::Filter(f) => {
                if !f(&record) {
                    return None;
                }
            }
            Step::FlatMap(_) => unreachable!("batches with flat_map take the other path"),
        }
    }
    Some(record)
}

fn expand<R>(steps: &[Step<R>], mut record: R, out: &mut Vec<R>) {
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Map(f) => record = f(record),
            Step::Filter(f) => {
                if !f(&record) {
                    return;
                }
            }
            Step::FlatMap(f) => {
                let mut produced = Vec::new();
                f(record, &mut produced);
                for next in produced {
                    expand(&steps[i + 1..], next, out);
                }
                return;
            }
        }
    }
    out.push(record);
}

struct SourceActor<R> {
    plan: Arc<Plan<R>>,
    source: Box<dyn Source<R>>,
    emitter: Emitter<R>,
    rate_per_partition: Option<u64>,
    started_ns: u64,
    produced: u64,
    skipped: u64,
    last_watermark_ms: i64,
    done: bool,
}

impl<R: Send + Clone + 'static> SourceActor<R> {
    /// Records this turn may produce under the rate limit; 0 means wait (a timer
    /// brings the next `Tick`). A paced source waits until a batch of at least
    /// `PACED_BATCH_NS` worth of records is due: one turn per few records would cost
    /// more than the records, and 100 µs is well inside any latency target.
    fn allowance(&mut self, now_ns: u64, ctx: &mut Context<'_, DataMsg<R>>) -> usize {
        let max = self.plan.source_batch_records;
        let Some(rate) = self.rate_per_partition else {
            return max;
        };
        let elapsed_ns = now_ns.saturating_sub(self.started_ns) as u128;
        let allowed = (elapsed_ns * rate as u128 / 1_000_000_000) as u64;
        let min_batch =
            ((rate as u128 * PACED_BATCH_NS as u128 / 1_000_000_000) as u64).clamp(1, max as u64);
        if allowed >= self.produced + min_batch {
            return ((allowed - self.produced) as usize).min(max);
        }
        // Come back when the next batch is due.
        let due_records = (self.produced + min_batch) as u128;
        let due_ns = self.started_ns + (due_records * 1_000_000_000 / rate as u128) as u64;
        ctx.send_self_at(due_ns, DataMsg::Tick, ctx.sched());
        0
    }
}

/// How long a source with nothing ready (`SourceBatch::Pending`) waits before it
/// is asked again.
const SOURCE_RETRY_NS: u64 = 20_000;

/// Wall time a paced source lets records gather before it makes a batch.
const PACED_BATCH_NS: u64 = 100_000;

impl<R: Send + Clone + 'static> Actor for SourceActor<R> {
    type Message = DataMsg<R>;

    fn handle(&mut self, message: DataMsg<R>, ctx: &mut Context<'_, DataMsg<R>>) {
        let DataMsg::Tick = message else {
            return; // sources have no inputs
        };
        if self.done {
            return;
        }
        let now_ns = monotonic_ns();
        if self.started_ns == 0 {
            self.started_ns = now_ns;
        }
        let max = self.allowance(now_ns, ctx);
        if max == 0 {
            return;
        }
        // The input enters now: this is the origin every result of it is timed from.
        let plan = self.plan.clone();
        let origin = SchedCtx {
            job: plan.id,
            origin_ns: now_ns,
            deadline_ns: now_ns + plan.slo_ns,
        };
        ctx.sched = origin;
        let mut batch = Vec::with_capacity(max);
        let status = self.source.next_batch(max, &mut batch);
        self.produced += batch.len() as u64;
        let skipped = self.source.skipped_records();
        if skipped > self.skipped {
            let new = skipped - self.skipped;
            plan.metrics
                .skipped_records
                .fetch_add(new, Ordering::Relaxed);
            self.skipped = skipped;
        }
        plan.metrics
            .source_records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.emitter.emit(&plan, batch, ctx);
        match status {
            SourceBatch::More { watermark_ms } => {
                // Watermarks at most once per millisecond of event time.
                if watermark_ms > self.last_watermark_ms {
                    self.last_watermark_ms = watermark_ms;
                    self.emitter.watermark(&plan, watermark_ms, ctx);
                }
                ctx.send_with(ctx.me(), DataMsg::Tick, origin);
            }
            SourceBatch::Pending => {
                let again_ns = ctx.now_ns() + SOURCE_RETRY_NS;
                ctx.send_self_at(again_ns, DataMsg::Tick, origin);
            }
            SourceBatch::Done => {
                self.done = true;
                self.emitter.watermark(&plan, END_OF_INPUT, ctx);
            }
            SourceBatch::Failed(message) => {
                self.done = true;
                plan.metrics.fail(message);
                self.emitter.watermark(&plan, END_OF_INPUT, ctx);
            }
        }
        plan.metrics
            .observe_cost(self.emitter.stage, monotonic_ns().saturating_sub(now_ns));
    }
}

struct StageActor<R> {
    plan: Arc<Plan<R>>,
    operator: Box<dyn Operator<R>>,
    inputs: Watermarks,
    emitter: Emitter<R>,
    out: Vec<R>,
}

impl<R: Send + Clone + 'static> Actor for StageActor<R> {
    type Message = DataMsg<R>;

    fn handle(&mut self, message: DataMsg<R>, ctx: &mut Context<'_, DataMsg<R>>) {
        let start_ns = monotonic_ns();
        let plan = self.plan.clone();
        match message {
            DataMsg::Tick => return,
            DataMsg::Records { input, records } => {
                self.operator.on_records(input, records, &mut self.out);
                let out = std::mem::take(&mut self.out);
                self.emitter.emit(&plan, out, ctx);
            }
            DataMsg::Watermark {
                input,
                from,
                watermark_ms,
            } => {
                if let Some(current) = self.inputs.update(input, from, watermark_ms) {
                    self.operator.on_watermark(current, &mut self.out);
                    let out = std::mem::take(&mut self.out);
                    self.emitter.emit(&plan, out, ctx);
                    self.emitter.watermark(&plan, current, ctx);
                }
            }
        }
        plan.metrics
            .observe_cost(self.emitter.stage, monotonic_ns().saturating_sub(start_ns));
    }
}

struct SinkActor<R> {
    plan: Arc<Plan<R>>,
    sink: Box<dyn Sink<R>>,
    inputs: Watermarks,
    stage: u32,
    finished: bool,
}

impl<R: Send + 'static> Actor for SinkActor<R> {
    type Message = DataMsg<R>;

    fn handle(&mut self, message: DataMsg<R>, ctx: &mut Context<'_, DataMsg<R>>) {
        let start_ns = monotonic_ns();
        match message {
            DataMsg::Tick => {}
            DataMsg::Records { records, .. } => {
                self.sink.write(&records);
                let metrics = &self.plan.metrics;
                metrics
                    .outputs
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                let latency_ns = start_ns.saturating_sub(ctx.sched().origin_ns);
                let mut histogram = metrics.latency_us.lock().expect("latency lock poisoned");
                crate::runtime::stats::record_us(&mut histogram, latency_ns, records.len() as u64);
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
                    self.plan.metrics.sink_done();
                }
            }
        }
        self.plan
            .metrics
            .observe_cost(self.stage, monotonic_ns().saturating_sub(start_ns));
    }
}
