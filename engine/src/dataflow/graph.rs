//! Building a job: sources, stateless steps, keyed stages, joins and sinks, and the
//! `Plan` the actors run from.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use dirigo_engine::dataflow::{Dataflow, DataflowConfig, Job, Operator, Sink, Source, SourceBatch};
//!
//! /// Numbers 0..1000 with event time = the number, as two partitions.
//! struct Numbers { next: u64, step: u64 }
//! impl Source<u64> for Numbers {
//!     fn next_batch(&mut self, max: usize, out: &mut Vec<u64>) -> SourceBatch {
//!         for _ in 0..max {
//!             if self.next >= 1000 { return SourceBatch::Done; }
//!             out.push(self.next);
//!             self.next += self.step;
//!         }
//!         SourceBatch::More { watermark_ms: self.next as i64 - self.step as i64 }
//!     }
//! }
//! /// Sums what it sees per key and emits the sums at the end of input.
//! #[derive(Default)]
//! struct Sum(std::collections::BTreeMap<u64, u64>);
//! impl Operator<u64> for Sum {
//!     fn on_records(&mut self, _input: u8, records: Vec<u64>, _out: &mut Vec<u64>) {
//!         for r in records { *self.0.entry(r % 10).or_default() += r; }
//!     }
//!     fn on_watermark(&mut self, watermark_ms: i64, out: &mut Vec<u64>) {
//!         if watermark_ms == i64::MAX { out.extend(self.0.values()); }
//!     }
//! }
//! struct Collect(Arc<Mutex<Vec<u64>>>);
//! impl Sink<u64> for Collect {
//!     fn write(&mut self, records: &[u64]) { self.0.lock().unwrap().extend_from_slice(records); }
//! }
//!
//! let mut config = DataflowConfig::default();
//! config.runtime.shards = 2;
//! let mut dataflow = Dataflow::start(config).unwrap();
//! let rows = Arc::new(Mutex::new(Vec::new()));
//! let mut job = Job::new("sum-by-last-digit", Duration::from_millis(10));
//! let collected = rows.clone();
//! job.source("numbers", 2, Arc::new(|p, n| Box::new(Numbers { next: p as u64, step: n as u64 })))
//!     .filter(|n| n % 2 == 0)
//!     .key_by(|n| n % 10)
//!     .process("sum", 4, Arc::new(|_| Box::new(Sum::default())))
//!     .sink("collect", 1, Arc::new(move |_| Box::new(Collect(collected.clone()))));
//! let handle = dataflow.submit(job).unwrap();
//! handle.wait(Duration::from_secs(30)).unwrap();
//! let mut sums = rows.lock().unwrap().clone();
//! sums.sort();
//! // Even numbers below 1000 by last digit 0, 2, 4, 6, 8.
//! assert_eq!(sums, vec![49500, 49700, 49900, 50100, 50300]);
//! dataflow.shutdown();
//! ```

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::actor::SchedCtx;
use crate::ids::{ActorId, JobId};

use super::ops::{Aggregate, Partial, WindowAggregate, WindowMerge, WindowSpec};
use super::JobMetrics;

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

/// A partition of a source: produces batches on demand.
pub trait Source<R>: Send + 'static {
    fn next_batch(&mut self, max_records: usize, out: &mut Vec<R>) -> SourceBatch;

    /// Malformed input skipped so far (for sources told to skip rather than fail).
    fn skipped_records(&self) -> u64 {
        0
    }
}

/// A partition of a keyed (or global) stage.
pub trait Operator<R>: Send + 'static {
    /// Records arrived on `input` (0, or 1 for the second side of a join).
    fn on_records(&mut self, input: u8, records: Vec<R>, out: &mut Vec<R>);
    /// The stage's watermark (the minimum over its inputs) advanced; `i64::MAX` at
    /// the end of input, when everything still held must be emitted.
    fn on_watermark(&mut self, _watermark_ms: i64, _out: &mut Vec<R>) {}
}

/// A partition of a sink.
pub trait Sink<R>: Send + 'static {
    fn write(&mut self, records: &[R]);
    /// The end of input reached this partition.
    fn finish(&mut self) {}
}

pub type SourceFactory<R> = Arc<dyn Fn(u32, u32) -> Box<dyn Source<R>> + Send + Sync>;
pub type OperatorFactory<R> = Arc<dyn Fn(u32) -> Box<dyn Operator<R>> + Send + Sync>;
pub type SinkFactory<R> = Arc<dyn Fn(u32) -> Box<dyn Sink<R>> + Send + Sync>;
pub type KeyFn<R> = Arc<dyn Fn(&R) -> u64 + Send + Sync>;
/// Refines a message's deadline for the stage it goes to.
pub type DeadlineHook = Arc<dyn Fn(&SchedCtx, u32) -> u64 + Send + Sync>;

type MapFn<R> = Arc<dyn Fn(R) -> R + Send + Sync>;
type FilterFn<R> = Arc<dyn Fn(&R) -> bool + Send + Sync>;
type FlatMapFn<R> = Arc<dyn Fn(R, &mut Vec<R>) + Send + Sync>;

/// A stateless step fused into the stage that produces its input.
pub(crate) enum Step<R> {
    Map(MapFn<R>),
    Filter(FilterFn<R>),
    FlatMap(FlatMapFn<R>),
}

impl<R> Clone for Step<R> {
    fn clone(&self) -> Self {
        match self {
            Step::Map(f) => Step::Map(f.clone()),
            Step::Filter(f) => Step::Filter(f.clone()),
            Step::FlatMap(f) => Step::FlatMap(f.clone()),
        }
    }
}

/// How records are spread over the partitions of the next stage.
pub(crate) enum Partitioner<R> {
    /// By key: key -> key group -> partition.
    Key(KeyFn<R>),
    /// Partition i sends to partition i modulo the target's parallelism.
    Forward,
}

pub(crate) struct Output<R> {
    pub steps: Vec<Step<R>>,
    pub target: u32,
    pub input: u8,
    pub partitioner: Partitioner<R>,
}

pub(crate) enum StageKind<R> {
    Source(SourceFactory<R>),
    Operator(OperatorFactory<R>),
    Sink(SinkFactory<R>),
}

pub(crate) struct StagePlan<R> {
    pub name: String,
    pub parallelism: u32,
    pub kind: StageKind<R>,
    pub outputs: Vec<Output<R>>,
    /// Parallelism of the upstream stage(s) feeding each input.
    pub inputs: Vec<u32>,
}

/// A job ready to run.
pub struct Plan<R> {
    pub name: String,
    pub id: JobId,
    pub slo_ns: u64,
    pub(crate) stages: Vec<StagePlan<R>>,
    pub(crate) metrics: Arc<JobMetrics>,
    pub(crate) deadline_hook: Option<DeadlineHook>,
    /// Records a source partition produces per turn at most.
    pub source_batch_records: usize,
    /// Records per second over all source partitions; `None`: as fast as it goes.
    pub rate_records_per_s: Option<u64>,
}

impl<R> Plan<R> {
    pub(crate) fn source_stages(&self) -> Vec<(u32, u32)> {
        self.stages
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.kind, StageKind::Source(_)))
            .map(|(i, s)| (i as u32, s.parallelism))
            .collect()
    }

    pub(crate) fn sink_partitions(&self) -> u64 {
        self.stages
            .iter()
            .filter(|s| matches!(s.kind, StageKind::Sink(_)))
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

    pub(crate) fn sched_now(&self) -> SchedCtx {
        let now_ns = crate::clock::monotonic_ns();
        SchedCtx {
            job: self.id,
            deadline_ns: now_ns + self.slo_ns,
            origin_ns: now_ns,
        }
    }

    /// Estimated cost of everything after `stage` on its longest path, in ns.
    fn rest_cost_ns(&self, stage: u32) -> u64 {
        self.stages[stage as usize]
            .outputs
            .iter()
            .map(|o| self.metrics.cost_from(&[o.target]) + self.rest_cost_ns(o.target))
            .max()
            .unwrap_or(0)
    }

    /// The deadline of a message going to `stage`: it must be done there in time for
    /// the rest of the path to finish within the SLO.
    pub(crate) fn deadline_ns(&self, sched: &SchedCtx, stage: u32) -> u64 {
        if let Some(hook) = &self.deadline_hook {
            return hook(sched, stage);
        }
        (sched.origin_ns + self.slo_ns).saturating_sub(self.rest_cost_ns(stage))
    }
}

struct Builder<R> {
    stages: Vec<StagePlan<R>>,
}

/// A job under construction.
pub struct Job<R> {
    name: String,
    slo: Duration,
    graph: Rc<RefCell<Builder<R>>>,
    deadline_hook: Option<DeadlineHook>,
    source_batch_records: usize,
    rate_records_per_s: Option<u64>,
}

/// A stream of records produced by a stage, with the stateless steps applied so far.
pub struct Stream<R> {
    graph: Rc<RefCell<Builder<R>>>,
    stage: u32,
    steps: Vec<Step<R>>,
}

/// A stream partitioned by key, ready for a keyed stage.
pub struct KeyedStream<R> {
    stream: Stream<R>,
    key: KeyFn<R>,
}

impl<R: Send + 'static> Job<R> {
    pub fn new(name: &str, slo: Duration) -> Self {
        Job {
            name: name.to_string(),
            slo,
            graph: Rc::new(RefCell::new(Builder { stages: Vec::new() })),
            deadline_hook: None,
            source_batch_records: 1024,
            rate_records_per_s: None,
        }
    }

    /// Pace the sources: `records_per_s` in total, split evenly over source partitions.
    pub fn rate(&mut self, records_per_s: Option<u64>) -> &mut Self {
        self.rate_records_per_s = records_per_s;
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

    pub fn source(&mut self, name: &str, parallelism: u32, factory: SourceFactory<R>) -> Stream<R> {
        let stage = add_stage(
            &self.graph,
            name,
            parallelism,
            StageKind::Source(factory),
            vec![],
        );
        Stream {
            graph: self.graph.clone(),
            stage,
            steps: Vec::new(),
        }
    }

    pub(crate) fn into_plan(self, id: JobId) -> Result<Plan<R>, String> {
        let graph = Rc::try_unwrap(self.graph)
            .map_err(|_| format!("job {}: a stream of it is still in use", self.name))?
            .into_inner();
        let stages = graph.stages;
        if stages.is_empty() {
            return Err(format!("job {} has no stages", self.name));
        }
        for stage in &stages {
            if stage.parallelism == 0 {
                return Err(format!(
                    "stage {} of job {} has parallelism 0",
                    stage.name, self.name
                ));
            }
            let is_sink = matches!(stage.kind, StageKind::Sink(_));
            if !is_sink && stage.outputs.is_empty() {
                return Err(format!(
                    "stage {} of job {} has no consumer: end every stream in a sink",
                    stage.name, self.name
                ));
            }
        }
        let slo_ns = self.slo.as_nanos().min(u64::MAX as u128) as u64;
        Ok(Plan {
            name: self.name,
            id,
            slo_ns,
            metrics: Arc::new(JobMetrics::new(stages.len())),
            stages,
            deadline_hook: self.deadline_hook,
            source_batch_records: self.source_batch_records,
            rate_records_per_s: self.rate_records_per_s,
        })
    }
}

fn add_stage<R>(
    graph: &Rc<RefCell<Builder<R>>>,
    name: &str,
    parallelism: u32,
    kind: StageKind<R>,
    inputs: Vec<u32>,
) -> u32 {
    let mut graph = graph.borrow_mut();
    graph.stages.push(StagePlan {
        name: name.to_string(),
        parallelism,
        kind,
        outputs: Vec::new(),
        inputs,
    });
    (graph.stages.len() - 1) as u32
}

impl<R: Send + 'static> Stream<R> {
    fn with(&self, step: Step<R>) -> Stream<R> {
        let mut steps = self.steps.clone();
        steps.push(step);
        Stream {
            graph: self.graph.clone(),
            stage: self.stage,
            steps,
        }
    }

    pub fn map(&self, f: impl Fn(R) -> R + Send + Sync + 'static) -> Stream<R> {
        self.with(Step::Map(Arc::new(f)))
    }

    pub fn filter(&self, f: impl Fn(&R) -> bool + Send + Sync + 'static) -> Stream<R> {
        self.with(Step::Filter(Arc::new(f)))
    }

    pub fn flat_map(&self, f: impl Fn(R, &mut Vec<R>) + Send + Sync + 'static) -> Stream<R> {
        self.with(Step::FlatMap(Arc::new(f)))
    }

    pub fn key_by(&self, key: impl Fn(&R) -> u64 + Send + Sync + 'static) -> KeyedStream<R> {
        KeyedStream {
            stream: self.with_nothing(),
            key: Arc::new(key),
        }
    }

    fn with_nothing(&self) -> Stream<R> {
        Stream {
            graph: self.graph.clone(),
            stage: self.stage,
            steps: self.steps.clone(),
        }
    }

    fn upstream_parallelism(&self) -> u32 {
        self.graph.borrow().stages[self.stage as usize].parallelism
    }

    fn connect(&self, target: u32, input: u8, partitioner: Partitioner<R>) {
        self.graph.borrow_mut().stages[self.stage as usize]
            .outputs
            .push(Output {
                steps: self.steps.clone(),
                target,
                input,
                partitioner,
            });
    }

    /// End the stream in a sink; upstream partition i feeds sink partition
    /// i modulo `parallelism`.
    pub fn sink(&self, name: &str, parallelism: u32, factory: SinkFactory<R>) {
        let inputs = vec![self.upstream_parallelism()];
        let stage = add_stage(
            &self.graph,
            name,
            parallelism,
            StageKind::Sink(factory),
            inputs,
        );
        self.connect(stage, 0, Partitioner::Forward);
    }
}

impl<R: Send + 'static> KeyedStream<R> {
    /// A keyed stage: each partition owns a range of key groups and sees every
    /// record whose key falls in it, in order per upstream partition.
    pub fn process(&self, name: &str, parallelism: u32, factory: OperatorFactory<R>) -> Stream<R> {
        keyed_stage(&[self], name, parallelism, factory)
    }

    /// A keyed stage with two inputs, this stream as input 0 and `other` as input 1,
    /// partitioned alike so that equal keys meet in one partition.
    pub fn join(
        &self,
        other: &KeyedStream<R>,
        name: &str,
        parallelism: u32,
        factory: OperatorFactory<R>,
    ) -> Stream<R> {
        keyed_stage(&[self, other], name, parallelism, factory)
    }
}

/// A stage of `factory`'s operator whose input `i` is `inputs[i]`, partitioned by
/// its key.
fn keyed_stage<R: Send + 'static>(
    inputs: &[&KeyedStream<R>],
    name: &str,
    parallelism: u32,
    factory: OperatorFactory<R>,
) -> Stream<R> {
    let graph = inputs[0].stream.graph.clone();
    let upstream = inputs
        .iter()
        .map(|i| i.stream.upstream_parallelism())
        .collect();
    let kind = StageKind::Operator(factory);
    let stage = add_stage(&graph, name, parallelism, kind, upstream);
    for (input, keyed) in inputs.iter().enumerate() {
        let partitioner = Partitioner::Key(keyed.key.clone());
        keyed.stream.connect(stage, input as u8, partitioner);
    }
    Stream {
        graph,
        stage,
        steps: Vec::new(),
    }
}

/// Library operators as stages (see `ops.rs`).
impl<R: Send + 'static> KeyedStream<R> {
    /// A keyed windowed aggregation in one stage: per window of `spec` and per
    /// `key(record)`, `aggregate` folds the records and emits when the window fires.
    pub fn window_aggregate<A: Aggregate<R>>(
        &self,
        name: &str,
        parallelism: u32,
        spec: WindowSpec,
        time: impl Fn(&R) -> i64 + Send + Sync + 'static,
        key: impl Fn(&R) -> u64 + Send + Sync + 'static,
        aggregate: A,
    ) -> Stream<R> {
        let operator = WindowAggregate::new(spec, time, key, aggregate);
        self.process(name, parallelism, operator.factory())
    }

    /// The same in two stages, for a mergeable aggregate: `{name}-partial` folds
    /// each partition's records into partials, `{name}-merge`, keyed by window,
    /// merges the partials of every window. Use it when the aggregate's key is not
    /// this stream's key (a global maximum), so that no partition holds all records.
    pub fn window_aggregate_two_phase<A: Partial<R>>(
        &self,
        name: &str,
        parallelism: u32,
        spec: WindowSpec,
        time: impl Fn(&R) -> i64 + Send + Sync + 'static,
        key: impl Fn(&R) -> u64 + Send + Sync + 'static,
        aggregate: A,
    ) -> Stream<R> {
        let aggregate = Arc::new(aggregate);
        let partial =
            WindowAggregate::partial_shared(spec, Arc::new(time), Arc::new(key), aggregate.clone());
        let by_window = aggregate.clone();
        self.process(&format!("{name}-partial"), parallelism, partial.factory())
            .key_by(move |r| by_window.window_of(r).map_or(0, |(_, end)| end as u64))
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
    impl Operator<u64> for Pass {
        fn on_records(&mut self, _input: u8, records: Vec<u64>, out: &mut Vec<u64>) {
            out.extend(records);
        }
    }
    struct Discard;
    impl Sink<u64> for Discard {
        fn write(&mut self, _records: &[u64]) {}
    }

    /// source (0) -> a (1) -> b (2) -> sink (3)
    fn chain(slo: Duration) -> Job<u64> {
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
            .into_plan(JobId(1))
            .expect("valid job");
        // Measured handling costs per message: a 300 µs, b 200 µs, sink 100 µs.
        for (stage, cost_ns) in [(1u32, 300_000u64), (2, 200_000), (3, 100_000)] {
            plan.metrics.observe_cost(stage, cost_ns);
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
                plan.deadline_ns(&sched, stage),
                end_ns - rest_ns,
                "to stage {stage}"
            );
        }
    }

    #[test]
    fn a_deadline_hook_replaces_the_rule() {
        let mut job = chain(Duration::from_millis(10));
        job.deadline_hook(Arc::new(|sched, stage| sched.origin_ns + stage as u64));
        let plan = job.into_plan(JobId(1)).expect("valid job");
        let sched = SchedCtx {
            job: JobId(1),
            deadline_ns: 0,
            origin_ns: 50,
        };
        assert_eq!(plan.deadline_ns(&sched, 2), 52);
    }

    #[test]
    fn a_stream_without_a_sink_is_refused() {
        let mut job = Job::<u64>::new("dangling", Duration::from_millis(10));
        let _ = job
            .source("source", 1, Arc::new(|_, _| Box::new(Nothing)))
            .filter(|_| true);
        let error = job.into_plan(JobId(1)).err().expect("refused");
        assert!(
            error.contains("source") && error.contains("no consumer"),
            "{error}"
        );
    }
}
