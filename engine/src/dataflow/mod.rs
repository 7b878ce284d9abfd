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
//! key -> key group (`KEY_GROUPS` of them, fixed for the life of a job, so scaling
//! never re-hashes) -> partition (a contiguous range of key groups). Watermarks
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

mod actors;
pub mod graph;
pub mod ops;
pub mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::ids::{ActorId, IdMap, JobId, ShardId};
use crate::runtime::{MemoryStateStore, Runtime, RuntimeConfig, RuntimeStats, StartError};

pub use graph::{Job, Operator, Sink, SinkFactory, Source, SourceBatch, Stream};

/// Key groups of every keyed stage; fixed, so scaling never re-hashes a key.
pub const KEY_GROUPS: u32 = 128;

/// Watermark meaning "no more input".
pub const END_OF_INPUT: i64 = i64::MAX;

/// What dataflow actors send each other.
pub enum DataMsg<R> {
    /// A source's cue to produce its next batch.
    Tick,
    Records {
        input: u8,
        records: Vec<R>,
    },
    /// Upstream partition `from` of `input` promises no record with an earlier time.
    Watermark {
        input: u8,
        from: u32,
        watermark_ms: i64,
    },
}

/// The key group of a key.
#[inline]
pub fn key_group(key: u64) -> u32 {
    (crate::ids::mix64(key) % KEY_GROUPS as u64) as u32
}

/// The partition (of `parallelism`) that owns a key group: contiguous ranges.
#[inline]
pub fn partition_of_group(group: u32, parallelism: u32) -> u32 {
    (group as u64 * parallelism as u64 / KEY_GROUPS as u64) as u32
}

/// What a job measured, shared by its actors.
pub struct JobMetrics {
    pub outputs: AtomicU64,
    pub source_records: AtomicU64,
    /// Malformed input records the sources skipped.
    pub skipped_records: AtomicU64,
    sinks_done: AtomicU64,
    /// When the last sink saw the end of its input (clock ns; 0 while running).
    finished_ns: AtomicU64,
    latency_us: Mutex<Histogram<u32>>,
    /// The first error a source reported; the job then ends early.
    error: Mutex<Option<String>>,
    /// Average handling time per message of each stage, in ns (exponential average).
    stage_cost_ns: Vec<AtomicU64>,
}

impl JobMetrics {
    fn new(stages: usize) -> Self {
        JobMetrics {
            outputs: AtomicU64::new(0),
            source_records: AtomicU64::new(0),
            skipped_records: AtomicU64::new(0),
            sinks_done: AtomicU64::new(0),
            finished_ns: AtomicU64::new(0),
            latency_us: Mutex::new(crate::runtime::stats::new_histogram()),
            error: Mutex::new(None),
            stage_cost_ns: (0..stages).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Estimated cost of stages `from..` (the rest of a path), in ns.
    fn cost_from(&self, stages: &[u32]) -> u64 {
        stages
            .iter()
            .map(|&s| self.stage_cost_ns[s as usize].load(Ordering::Relaxed))
            .sum()
    }

    fn observe_cost(&self, stage: u32, cost_ns: u64) {
        let slot = &self.stage_cost_ns[stage as usize];
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            cost_ns
        } else {
            (old * 7 + cost_ns) / 8
        };
        slot.store(new, Ordering::Relaxed);
    }

    /// A sink partition saw the end of its input; the last one stamps the job's end.
    fn sink_done(&self) {
        let now_ns = crate::clock::monotonic_ns();
        self.finished_ns.fetch_max(now_ns, Ordering::AcqRel);
        self.sinks_done.fetch_add(1, Ordering::AcqRel);
    }

    fn fail(&self, message: String) {
        let mut error = self.error.lock().expect("error lock poisoned");
        error.get_or_insert(message);
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().expect("error lock poisoned").clone()
    }

    pub fn latency_us(&self) -> Histogram<u32> {
        self.latency_us
            .lock()
            .expect("latency lock poisoned")
            .clone()
    }
}

/// Options of the dataflow engine.
#[derive(Clone, Debug)]
pub struct DataflowConfig {
    pub runtime: RuntimeConfig,
}

impl Default for DataflowConfig {
    fn default() -> Self {
        let mut runtime = RuntimeConfig::default();
        // Operator state lives in the actors while a job runs: no idle deactivation.
        runtime.shard.idle_timeout_ns = None;
        runtime.shard.mailbox_credit_messages = 64;
        DataflowConfig { runtime }
    }
}

type Plans<R> = Arc<RwLock<IdMap<JobId, Arc<graph::Plan<R>>>>>;

/// A dataflow engine: a runtime whose actors are the stages of submitted jobs.
pub struct Dataflow<R: Clone + Send + 'static> {
    runtime: Runtime<DataMsg<R>>,
    plans: Plans<R>,
    next_job: u32,
}

/// A submitted job.
pub struct JobHandle {
    pub id: JobId,
    pub name: String,
    metrics: Arc<JobMetrics>,
    sinks: u64,
    started: Instant,
    started_ns: u64,
}

/// What a finished job reports.
pub struct JobReport {
    pub name: String,
    pub elapsed: Duration,
    pub source_records: u64,
    pub skipped_records: u64,
    pub outputs: u64,
    pub latency_us: Histogram<u32>,
}

impl JobHandle {
    pub fn is_done(&self) -> bool {
        self.metrics.sinks_done.load(Ordering::Acquire) >= self.sinks
    }

    pub fn metrics(&self) -> &JobMetrics {
        &self.metrics
    }

    /// Wait until every sink has seen the end of its input (or `limit` passes).
    pub fn wait(&self, limit: Duration) -> Result<JobReport, String> {
        let mut pause_us = 10;
        while !self.is_done() {
            if self.started.elapsed() > limit {
                return Err(format!(
                    "job {} not finished after {limit:?} ({} records in, {} out)",
                    self.name,
                    self.metrics.source_records.load(Ordering::Acquire),
                    self.metrics.outputs.load(Ordering::Acquire)
                ));
            }
            std::thread::sleep(Duration::from_micros(pause_us));
            pause_us = (pause_us * 2).min(2_000);
        }
        match self.metrics.error() {
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
            source_records: self.metrics.source_records.load(Ordering::Acquire),
            skipped_records: self.metrics.skipped_records.load(Ordering::Acquire),
            outputs: self.metrics.outputs.load(Ordering::Acquire),
            latency_us: self.metrics.latency_us(),
        }
    }
}

impl<R: Clone + Send + 'static> Dataflow<R> {
    pub fn start(config: DataflowConfig) -> Result<Self, StartError> {
        if config.runtime.shard.idle_timeout_ns.is_some() {
            // Operators keep their state in the actor and do not snapshot it yet.
            return Err(StartError(
                "dataflow actors cannot be deactivated yet: set runtime.shard.idle_timeout_ns to None"
                    .to_string(),
            ));
        }
        let plans: Plans<R> = Arc::new(RwLock::new(IdMap::default()));
        let lookup = plans.clone();
        let factory = move |id: ActorId, _state: Option<&[u8]>| {
            let plan = lookup
                .read()
                .expect("plan registry poisoned")
                .get(&id.job)
                .cloned()
                .unwrap_or_else(|| panic!("{id} belongs to no submitted job"));
            actors::activate(plan, id)
        };
        let runtime = Runtime::start(
            config.runtime,
            Arc::new(factory),
            Arc::new(MemoryStateStore::default()),
        )?;
        Ok(Dataflow {
            runtime,
            plans,
            next_job: 1,
        })
    }

    pub fn shards(&self) -> usize {
        self.runtime.shards()
    }

    /// Submit a job; its sources start at once.
    pub fn submit(&mut self, job: Job<R>) -> Result<JobHandle, String> {
        let id = JobId(self.next_job);
        self.next_job += 1;
        let plan = Arc::new(job.into_plan(id)?);
        let metrics = plan.metrics.clone();
        let sinks = plan.sink_partitions();
        self.plans
            .write()
            .expect("plan registry poisoned")
            .insert(id, plan.clone());
        let started = Instant::now();
        let started_ns = crate::clock::monotonic_ns();
        for (stage, partitions) in plan.source_stages() {
            for partition in 0..partitions {
                let actor = ActorId::new(id, stage, partition);
                // A dead shard is the runtime's to report (`RuntimeConfig::on_failure`).
                let _ = self.runtime.send(actor, DataMsg::Tick, plan.sched_now());
            }
        }
        Ok(JobHandle {
            id,
            name: plan.name.clone(),
            metrics,
            sinks,
            started,
            started_ns,
        })
    }

    /// Every actor of a job: `(stage, partition)` pairs, for tests and the autoscaler.
    pub fn actors(&self, job: JobId) -> Vec<ActorId> {
        let plans = self.plans.read().expect("plan registry poisoned");
        let Some(plan) = plans.get(&job) else {
            return Vec::new();
        };
        plan.actor_ids(job)
    }

    pub fn migrate(&self, actor: ActorId, to: ShardId) {
        // A dead shard is the runtime's to report (`RuntimeConfig::on_failure`).
        let _ = self.runtime.migrate(actor, to);
    }

    pub fn stats(&self) -> RuntimeStats {
        self.runtime.stats()
    }

    pub fn shutdown(self) {
        self.runtime.shutdown();
    }
}
