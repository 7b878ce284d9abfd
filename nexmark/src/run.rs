//! Running queries end to end on a fresh embedded engine: what `dirigo run`
//! does (one job, or several sharing the engine's shards) and what `dirigo
//! bench nexmark` repeats per query. Submits every job before it waits for any,
//! so that they run at once, then gathers each job's report and the engine's
//! accounting of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::queries::{build, EventSource, Output, QueryOptions};
use dirigo_engine::dataflow::checkpoint::CheckpointOptions;
use dirigo_engine::dataflow::{
    AutoscaleOptions, Dataflow, DataflowConfig, JobHandle, JobReport, RateSchedule,
};
use dirigo_engine::runtime::PolicyKind;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Called about four times a second with (records in so far, outputs so far),
/// summed over the run's jobs.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Called every [`LIVE_EVERY`] while the jobs run, with each job's figures
/// over the last interval, in the order of the run's jobs (None for a job
/// that did not start): what a cluster node reads of its runs.
pub type LiveHook = Arc<dyn Fn(&[Option<LiveFigures>]) + Send + Sync>;

/// How often a [`LiveHook`] is called.
pub const LIVE_EVERY: Duration = Duration::from_secs(1);

/// One job's output latency over an interval: this process's sinks' rows
/// (over nodes, its own part's).
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveFigures {
    /// Output rows the sinks recorded in the interval.
    pub rows: u64,
    /// Their latency's p99 (0 with no rows).
    pub p99_us: u64,
    /// The job's latency target.
    pub slo_us: u64,
}

/// The engine of a run, shared by all its jobs.
#[derive(Clone)]
pub struct EngineOptions {
    pub cores: usize,
    /// Allow more shards than online cores (`--oversubscribe`).
    pub oversubscribe: bool,
    /// How each shard picks the actor that runs next (`--scheduler`).
    pub scheduler: PolicyKind,
    /// Run the autoscaler (`--autoscale on`), with these options.
    pub autoscale: Option<AutoscaleOptions>,
    pub progress: Option<Progress>,
    /// Each job's output latency every [`LIVE_EVERY`] (`--live`).
    pub live: Option<LiveHook>,
    /// How long to wait for the jobs, from their start.
    pub time_limit: Duration,
    /// This process's part of a run over several processes (`--nodes`).
    pub nodes: Option<NodesOptions>,
}

/// A run over several processes (nodes), each running `cores` shards: the
/// jobs' actors placed over all of them (`Dataflow::start_remote`).
#[derive(Clone, Debug)]
pub struct NodesOptions {
    /// Every node's address, in the same order on every node.
    pub addrs: Vec<std::net::SocketAddr>,
    /// This process's place in `addrs`.
    pub me: usize,
    /// The run's shared secret: every connection is authenticated both ways.
    pub secret: Vec<u8>,
    /// The run's name, the same on every node that runs the same jobs on
    /// the same layout (the handshake refuses a peer with another).
    pub cluster: String,
}

/// How long a run over nodes waits for a peer to connect, and for its jobs
/// to end once a peer that was connected is gone.
const PEER_CONNECT_MAX: Duration = Duration::from_secs(30);
const PEER_GONE_GRACE: Duration = Duration::from_secs(2);

/// Why [`run_jobs`] gave no reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// The engine did not start, or the jobs could not be set up.
    Failed(String),
    /// A run over nodes lost a peer: one never connected, or one left while
    /// the jobs ran on. The same run started again on every node may
    /// succeed (a cluster restarts it, from its last checkpoint).
    PeerLost(String),
    /// A run over nodes could not listen on its address: another process
    /// holds the port (a cluster runs it again on other ports).
    PortTaken(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Failed(e) | RunError::PeerLost(e) | RunError::PortTaken(e) => f.write_str(e),
        }
    }
}

impl From<String> for RunError {
    fn from(error: String) -> RunError {
        RunError::Failed(error)
    }
}

impl From<RunError> for String {
    fn from(error: RunError) -> String {
        error.to_string()
    }
}

/// A run over nodes gives up on a peer that never connects, or that left
/// while its jobs run on (its process ended: failed, or killed).
struct PeerWatch {
    started: Instant,
    seen: Vec<bool>,
    gone_since: Vec<Option<Instant>>,
}

impl PeerWatch {
    fn new(nodes: usize) -> PeerWatch {
        PeerWatch {
            started: Instant::now(),
            seen: vec![false; nodes],
            gone_since: vec![None; nodes],
        }
    }

    /// Why the run must stop, if it must.
    fn check(&mut self, dataflow: &Dataflow, nodes: &NodesOptions) -> Result<(), String> {
        let Some(stats) = dataflow.remote_stats() else {
            return Ok(());
        };
        for (j, &connected) in stats.connected.iter().enumerate() {
            if j == nodes.me {
                continue;
            }
            let addr = nodes.addrs[j];
            // A peer that came back as a new process resumed from a
            // checkpoint while this one ran on: their states no longer
            // agree, and the run must start again on every node.
            if stats.peer_restarts.get(j).is_some_and(|r| *r > 0) {
                return Err(format!(
                    "node {j} ({addr}) started again while the jobs ran"
                ));
            }
            if connected {
                self.seen[j] = true;
                self.gone_since[j] = None;
            } else if self.seen[j] {
                // A peer whose jobs all ended exits once what it sent was
                // acked; this node's own end may trail it by a moment.
                let since = *self.gone_since[j].get_or_insert_with(Instant::now);
                if since.elapsed() > PEER_GONE_GRACE {
                    return Err(format!("node {j} ({addr}) left before the jobs ended"));
                }
            } else if self.started.elapsed() > PEER_CONNECT_MAX {
                return Err(format!(
                    "node {j} ({addr}) did not connect within {PEER_CONNECT_MAX:?}"
                ));
            }
        }
        Ok(())
    }
}

/// One job of a run.
#[derive(Clone)]
pub struct JobConfig {
    pub query: String,
    pub source: EventSource,
    pub output: Output,
    pub sink_parallelism: u32,
    /// Pace the source by this schedule (events/s over all partitions); `None`:
    /// as fast as it goes.
    pub pace: Option<RateSchedule>,
    pub slo: Duration,
    /// Take checkpoints into a data directory (and resume from it).
    pub checkpoints: Option<CheckpointOptions>,
    /// Activations of each keyed stage, fixed, with the autoscaler kept off
    /// the job (`--parallelism`); `None`: two per shard, autoscaled.
    pub parallelism: Option<u32>,
}

/// One query run alone on its engine, with the default scheduler (what the
/// benchmarks repeat).
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
    pub progress: Option<Progress>,
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
    /// The job's latency target.
    pub slo_us: u64,
    /// Percentage of output rows whose latency exceeded `slo_us` (see
    /// [`slo_violation_pct`]).
    pub slo_violation_pct: f64,
    /// The shards' scheduling policy (`edf`, `fifo` or `fair`).
    pub scheduler: String,
    /// Autoscaler decisions that acted on the job; absent with the
    /// autoscaler off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_actions: Option<u64>,
    /// Over nodes (`--nodes`): this process's place and the number of
    /// nodes; its figures (`cores`, `events`, `outputs`, latency) are its
    /// own part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<usize>,
    /// Messages of the job handled after their deadline had passed.
    pub deadline_misses: u64,
    /// Messages of the job handled.
    pub messages: u64,
    /// Queueing delay of the job's messages (arrival in a mailbox to handling).
    pub queue_us_p99: u64,
    /// Turns over the stall threshold, on any shard.
    pub stalls: u64,
    /// Actors deactivated while idle (scaled to zero, their state to the
    /// store) and brought back when input came, on any shard: the run's
    /// engine, so every job of a run of several reports the same count.
    pub deactivations: u64,
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

/// Percentage of the rows in `latency_us` (one count per output row) above
/// `slo_us`, to the histogram's resolution (two significant digits): a bucket
/// counts as above only when its lowest value is, so a bucket that holds the SLO
/// itself counts as within it.
pub fn slo_violation_pct(latency_us: &Histogram<u32>, slo_us: u64) -> f64 {
    let total = latency_us.len();
    if total == 0 {
        return 0.0;
    }
    let above: u64 = latency_us
        .iter_recorded()
        .filter(|v| latency_us.lowest_equivalent(v.value_iterated_to()) > slo_us)
        .map(|v| u64::from(v.count_at_value()))
        .sum();
    above as f64 * 100.0 / total as f64
}

/// Each job's output latency per interval ([`LiveHook`]): the jobs'
/// cumulative latency histograms read every [`LIVE_EVERY`], each interval's
/// rows the difference from the one before.
struct LiveMeter {
    slo_us: Vec<u64>,
    /// Each job's histogram at the last reading.
    before: Vec<Option<Histogram<u32>>>,
    last: Instant,
}

impl LiveMeter {
    fn new(jobs: &[JobConfig]) -> LiveMeter {
        LiveMeter {
            slo_us: jobs
                .iter()
                .map(|j| j.slo.as_micros().min(u128::from(u64::MAX)) as u64)
                .collect(),
            before: vec![None; jobs.len()],
            last: Instant::now(),
        }
    }

    /// The interval's figures once [`LIVE_EVERY`] passed since the last.
    fn tick(
        &mut self,
        handles: &[Result<JobHandle, String>],
        now: Instant,
    ) -> Option<Vec<Option<LiveFigures>>> {
        if now.duration_since(self.last) < LIVE_EVERY {
            return None;
        }
        self.last = now;
        let figures = handles
            .iter()
            .zip(&mut self.before)
            .zip(&self.slo_us)
            .map(|((handle, before), &slo_us)| {
                let total = handle.as_ref().ok()?.metrics().latency_us();
                let mut interval = total.clone();
                if let Some(before) = before.replace(total) {
                    // Same bounds, and counts only grow: cannot fail.
                    interval.subtract(&before).ok()?;
                }
                let rows = interval.len();
                let p99_us = if rows == 0 {
                    0
                } else {
                    interval.value_at_quantile(0.99)
                };
                Some(LiveFigures {
                    rows,
                    p99_us,
                    slo_us,
                })
            })
            .collect();
        Some(figures)
    }
}

/// Run one query on a fresh engine and wait for it to finish.
pub fn run_query(config: &RunConfig) -> Result<RunReport, String> {
    let engine = EngineOptions {
        cores: config.cores,
        oversubscribe: config.oversubscribe,
        scheduler: PolicyKind::default(),
        // The benchmarks measure a placement that stays put.
        autoscale: None,
        progress: config.progress.clone(),
        live: None,
        time_limit: config.time_limit,
        nodes: None,
    };
    let job = JobConfig {
        query: config.query.clone(),
        source: config.source.clone(),
        output: config.output.clone(),
        sink_parallelism: config.sink_parallelism,
        pace: config.rate_events_per_s.map(RateSchedule::constant),
        slo: config.slo,
        checkpoints: config.checkpoints.clone(),
        parallelism: None,
    };
    let mut reports = run_jobs(&engine, &[job])?;
    reports.pop().expect("one report per job")
}

/// Build `job` and submit it to `dataflow` (of `cores` shards).
fn submit(dataflow: &mut Dataflow, job: &JobConfig, cores: u32) -> Result<JobHandle, String> {
    dataflow.submit(build_job(job, cores)?)
}

/// Build `job` for a run of `cores` shards.
fn build_job(job: &JobConfig, cores: u32) -> Result<dirigo_engine::dataflow::Job, String> {
    let options = QueryOptions {
        source: job.source.clone(),
        source_parallelism: cores,
        parallelism: job.parallelism.unwrap_or(2 * cores),
        slo: job.slo,
        pace: job.pace.clone(),
        output: job.output.clone(),
        sink_parallelism: job.sink_parallelism,
    };
    let mut built = build(&job.query, &options)?;
    built.autoscale(job.parallelism.is_none());
    if let Some(checkpoints) = &job.checkpoints {
        built.checkpoints(checkpoints.clone());
    }
    Ok(built)
}

/// This process's part of a run over nodes: every job registered before
/// the runtime starts (so that no actor of it is asked for here before its
/// plan is), then started from node 0. Under `--autoscale on` each node's
/// autoscaler moves the actors on its own shards (and node 0's splits
/// key-group ranges), and spills a keyed stage's actor to another node's
/// shard when nothing of its own relieves a shard; `--parallelism` keeps
/// it off a job, as on one node.
fn start_over_nodes(
    config: DataflowConfig,
    nodes: &NodesOptions,
    jobs: &[JobConfig],
) -> Result<(Dataflow, Vec<Result<JobHandle, String>>), RunError> {
    use dirigo_engine::runtime::{RemoteConfig, RemoteNode};
    let shards = u16::try_from(config.runtime.shards).map_err(|_| "too many cores".to_string())?;
    let addr = nodes.addrs[nodes.me];
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        let error = format!("listening on {addr}: {e}");
        match e.kind() {
            std::io::ErrorKind::AddrInUse => RunError::PortTaken(error),
            _ => RunError::Failed(error),
        }
    })?;
    let remote = RemoteConfig {
        nodes: nodes
            .addrs
            .iter()
            .map(|&addr| RemoteNode { addr, shards })
            .collect(),
        me: nodes.me,
        listener,
        cluster: nodes.cluster.clone(),
        secret: nodes.secret.clone(),
        incarnation: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    let cores = (usize::from(shards) * nodes.addrs.len()) as u32;
    let built = jobs.iter().map(|job| build_job(job, cores)).collect();
    let (dataflow, handles) =
        Dataflow::start_remote_with(config, remote, built).map_err(|e| e.to_string())?;
    if nodes.me == 0 {
        for handle in handles.iter().flatten() {
            dataflow.start_job(handle).expect("node 0 starts its jobs");
        }
    }
    Ok((dataflow, handles))
}

/// A finished job's report and its checkpoints' figures, before the engine's
/// accounting is added.
type Finished = (JobHandle, JobReport, Option<Checkpoints>);

/// Run `jobs` at once on one fresh engine, sharing its shards, and wait for
/// all of them. One outcome per job, in order: its report, or why it failed
/// (it did not build, could not resume, or failed while running); the others
/// run on. An error only when the engine cannot start.
pub fn run_jobs(
    engine: &EngineOptions,
    jobs: &[JobConfig],
) -> Result<Vec<Result<RunReport, String>>, RunError> {
    let mut engine_config = DataflowConfig::default();
    engine_config.runtime.shards = engine.cores;
    engine_config.runtime.oversubscribe = engine.oversubscribe;
    engine_config.runtime.shard.policy = engine.scheduler.clone();
    engine_config.autoscale = engine.autoscale.clone();
    let (dataflow, handles) = match &engine.nodes {
        None => {
            let mut dataflow = Dataflow::start(engine_config).map_err(|e| e.to_string())?;
            let cores = dataflow.shards() as u32;
            let handles: Vec<Result<JobHandle, String>> = jobs
                .iter()
                .map(|job| submit(&mut dataflow, job, cores))
                .collect();
            (dataflow, handles)
        }
        Some(nodes) => start_over_nodes(engine_config, nodes, jobs)?,
    };
    // This node's shards: its figures are its part of a run over nodes.
    let cores = dataflow.shards() as u32;
    let started = Instant::now();
    let running = || handles.iter().flatten().any(|h| !h.is_done());
    let mut peers = engine.nodes.as_ref().map(|n| PeerWatch::new(n.addrs.len()));
    let mut live = engine
        .live
        .as_ref()
        .map(|hook| (hook, LiveMeter::new(jobs)));
    while running() && started.elapsed() <= engine.time_limit {
        let hooked = engine.progress.is_some() || engine.live.is_some();
        std::thread::sleep(Duration::from_millis(if hooked { 250 } else { 1 }));
        if let (Some(peers), Some(nodes)) = (peers.as_mut(), engine.nodes.as_ref()) {
            if let Err(e) = peers.check(&dataflow, nodes) {
                dataflow.shutdown();
                return Err(RunError::PeerLost(e));
            }
        }
        if let Some(progress) = &engine.progress {
            let (records, outputs) = handles.iter().flatten().fold((0, 0), |(r, o), h| {
                (r + h.metrics().source_records(), o + h.metrics().outputs())
            });
            progress(records, outputs);
        }
        if let Some((hook, meter)) = live.as_mut() {
            if let Some(figures) = meter.tick(&handles, Instant::now()) {
                hook(&figures);
            }
        }
    }
    let finished: Vec<Result<Finished, String>> = handles
        .into_iter()
        .map(|handle| {
            let handle = handle?;
            let report = dataflow.wait(&handle, engine.time_limit)?;
            let checkpoints = handle.checkpoint_stats().map(|s| Checkpoints {
                completed: s.completed,
                failed: s.failed,
                resumed_from: s.restored_epoch,
                last_error: s.last_error.clone(),
                checkpoint_ms_p99: s.checkpoint_ms.value_at_quantile(0.99),
                alignment_ms_p99: s.alignment_us.value_at_quantile(0.99) as f64 / 1e3,
                state_bytes: s.state_bytes,
            });
            Ok((handle, report, checkpoints))
        })
        .collect();
    let stats = dataflow.stats();
    dataflow.shutdown();
    let reports = finished.into_iter().zip(jobs).map(|(outcome, config)| {
        let (handle, report, checkpoints) = outcome?;
        let job = stats.job(handle.id);
        let elapsed_s = report.elapsed.as_secs_f64();
        let events_per_s = report.source_records as f64 / elapsed_s.max(1e-9);
        let slo_us = config.slo.as_micros().min(u128::from(u64::MAX)) as u64;
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
            slo_us,
            slo_violation_pct: slo_violation_pct(&report.latency_us, slo_us),
            scheduler: engine.scheduler.name().to_string(),
            scale_actions: engine.autoscale.as_ref().map(|_| report.scale_actions),
            node: engine.nodes.as_ref().map(|n| n.me),
            nodes: engine.nodes.as_ref().map(|n| n.addrs.len()),
            deadline_misses: job.deadline_misses,
            messages: job.messages,
            queue_us_p99: job.queue_us.value_at_quantile(0.99),
            stalls: stats.stalls(),
            deactivations: stats.deactivations(),
            checkpoints,
        })
    });
    Ok(reports.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slo_violations_count_rows_above_the_slo() {
        let mut latency_us = dirigo_engine::runtime::stats::new_histogram();
        assert_eq!(slo_violation_pct(&latency_us, 10_000), 0.0);
        latency_us.record_n(200, 90).unwrap();
        latency_us.record_n(9_000, 6).unwrap();
        latency_us.record_n(12_000, 3).unwrap();
        latency_us.record_n(2_000_000, 1).unwrap();
        assert_eq!(slo_violation_pct(&latency_us, 10_000), 4.0);
        assert_eq!(slo_violation_pct(&latency_us, 100), 100.0);
        assert_eq!(slo_violation_pct(&latency_us, 5_000_000), 0.0);
    }

    /// The latency histogram a job reports holds one value per output row,
    /// whichever sink partition wrote it (so `slo_violation_pct` is per row).
    #[test]
    fn the_latency_histogram_counts_every_output_row() {
        let mut config = DataflowConfig::default();
        config.runtime.shards = 2;
        config.runtime.oversubscribe = true;
        let mut dataflow = Dataflow::start(config).unwrap();
        for (query, pace) in [("q1", Some(200_000)), ("q5", None), ("q2", None)] {
            let job = JobConfig {
                query: query.to_string(),
                source: EventSource::Generator {
                    config: crate::GeneratorConfig::default(),
                    events: 30_000,
                },
                output: Output::Null,
                sink_parallelism: 2,
                pace: pace.map(RateSchedule::constant),
                slo: Duration::from_millis(10),
                checkpoints: None,
                parallelism: None,
            };
            let handle = submit(&mut dataflow, &job, 2).unwrap();
            let report = dataflow.wait(&handle, Duration::from_secs(60)).unwrap();
            assert!(report.outputs > 0, "{query}");
            assert_eq!(report.latency_us.len(), report.outputs, "{query}");
        }
        dataflow.shutdown();
    }
}
