//! Running one query end to end on a fresh embedded engine: what `dirigo run` does
//! and what `dirigo bench nexmark` repeats per query. Waits for the job, gathers its
//! report and the engine's accounting of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::queries::{build, EventSource, Output, QueryOptions};
use dirigo_engine::dataflow::checkpoint::CheckpointOptions;
use dirigo_engine::dataflow::{Dataflow, DataflowConfig, JobReport, RateSchedule};
use serde::Serialize;

/// One query run.
#[derive(Clone)]
pub struct RunConfig {
    pub query: String,
    pub cores: usize,
    /// Allow more shards than online cores (`--oversubscribe`).
    pub oversubscribe: bool,
    pub source: EventSource,
    pub output: Output,
    pub sink_parallelism: u32,
    pub rate_events_per_s: Option<u64>,
    pub slo: Duration,
    /// Called about four times a second with (records in so far, outputs so far).
    pub progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
    pub time_limit: Duration,
    /// Take checkpoints into a data directory (and resume from it).
    pub checkpoints: Option<CheckpointOptions>,
}

/// What one run measured.
#[derive(Serialize, Clone, Debug)]
pub struct RunReport {
    pub query: String,
    pub cores: usize,
    pub events: u64,
    /// Malformed input lines skipped (`--skip-malformed`).
    pub skipped: u64,
    /// Records that arrived behind their stage's watermark (counted, dropped from
    /// windows that had already fired).
    pub late: u64,
    pub elapsed_s: f64,
    pub events_per_s: f64,
    pub events_per_s_per_core: f64,
    pub outputs: u64,
    pub latency_us: Latency,
    /// Messages of the job handled after their deadline had passed.
    pub deadline_misses: u64,
    /// Messages of the job handled.
    pub messages: u64,
    /// Queueing delay of the job's messages (arrival in a mailbox to handling).
    pub queue_us_p99: u64,
    /// Turns over the stall threshold, on any shard.
    pub stalls: u64,
    /// With a data directory: checkpoints committed and failed in this run,
    /// and the one it resumed from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<Checkpoints>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Checkpoints {
    pub completed: u64,
    pub failed: u64,
    pub resumed_from: Option<u64>,
    pub last_error: Option<String>,
    pub checkpoint_ms_p99: u64,
    pub alignment_ms_p99: f64,
    pub state_bytes: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

fn latency(report: &JobReport) -> Latency {
    let h = &report.latency_us;
    Latency {
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// Run one query on a fresh engine and wait for it to finish.
pub fn run_query(config: &RunConfig) -> Result<RunReport, String> {
    let mut engine_config = DataflowConfig::default();
    engine_config.runtime.shards = config.cores;
    engine_config.runtime.oversubscribe = config.oversubscribe;
    let mut dataflow = Dataflow::start(engine_config).map_err(|e| e.to_string())?;
    let cores = dataflow.shards() as u32;
    let options = QueryOptions {
        source: config.source.clone(),
        source_parallelism: cores,
        parallelism: 2 * cores,
        slo: config.slo,
        pace: config.rate_events_per_s.map(RateSchedule::constant),
        output: config.output.clone(),
        sink_parallelism: config.sink_parallelism,
    };
    let mut job = build(&config.query, &options)?;
    if let Some(checkpoints) = &config.checkpoints {
        job.checkpoints(checkpoints.clone());
    }
    let handle = dataflow.submit(job)?;
    let started = Instant::now();
    while !handle.is_done() {
        if started.elapsed() > config.time_limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(if config.progress.is_some() {
            250
        } else {
            1
        }));
        if let Some(progress) = &config.progress {
            let metrics = handle.metrics();
            progress(metrics.source_records(), metrics.outputs());
        }
    }
    let report = dataflow.wait(&handle, config.time_limit)?;
    let checkpoints = handle.checkpoint_stats().map(|s| Checkpoints {
        completed: s.completed,
        failed: s.failed,
        resumed_from: s.restored_epoch,
        last_error: s.last_error.clone(),
        checkpoint_ms_p99: s.checkpoint_ms.value_at_quantile(0.99),
        alignment_ms_p99: s.alignment_us.value_at_quantile(0.99) as f64 / 1e3,
        state_bytes: s.state_bytes,
    });
    let stats = dataflow.stats();
    dataflow.shutdown();
    let job = stats.job(handle.id);
    let elapsed_s = report.elapsed.as_secs_f64();
    let events_per_s = report.source_records as f64 / elapsed_s.max(1e-9);
    Ok(RunReport {
        query: config.query.clone(),
        cores: cores as usize,
        events: report.source_records,
        skipped: report.skipped_records,
        late: report.late_records,
        elapsed_s,
        events_per_s,
        events_per_s_per_core: events_per_s / cores as f64,
        outputs: report.outputs,
        latency_us: latency(&report),
        deadline_misses: job.deadline_misses,
        messages: job.messages,
        queue_us_p99: job.queue_us.value_at_quantile(0.99),
        stalls: stats.stalls(),
        checkpoints,
    })
}
