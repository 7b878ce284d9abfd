//! `dirigo bench density`: how many identical paced jobs one machine keeps
//! within their SLO, time-sharing every core against giving each job cores
//! of its own.
//!
//! Every job is q2 paced at `rate_per_s` (20,000 events/s) for `run_ms`,
//! with a 10 ms SLO. A set of N jobs *meets its SLO* when every job finished
//! and every job's share of rows over its SLO (`slo_violation_pct`) is under
//! `violation_pct_max` (1%). Two ways to run them:
//!
//! - **time-shared** (Dirigo): all N jobs submitted to one engine over every
//!   shard (`run_jobs`), EDF scheduling, the autoscaler on; each job's
//!   sources, stages and sinks are spread over every shard as usual.
//! - **static** (the baseline, core partitioning as slot-based engines do
//!   it): each job gets a shard of its own. Every job is built with one
//!   partition per stage, its autoscaling off, and all its actors migrated
//!   to its shard right after submission; FIFO scheduling; no autoscaler. A
//!   shard is never given to two jobs (that would be time-sharing, without
//!   deadlines), so at most one job per core: with C cores, static
//!   partitioning holds at most C jobs, and the search only asks whether
//!   each of them keeps its SLO on its core.
//!
//! The search: N = 1, 2, 4, ... until a set misses (or `jobs_max`), then
//! bisection between the last N that met and the first that missed; each
//! probe on a fresh engine, and a probe that misses is tried once more before
//! it counts as a miss. Each run searches both ways (the order
//! alternated run by run); figures are medians over the runs.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use dirigo_engine::dataflow::{AutoscaleOptions, Dataflow, DataflowConfig, RateSchedule};
use dirigo_engine::ids::ShardId;
use dirigo_engine::runtime::PolicyKind;
use dirigo_nexmark::queries::{build, EventSource, Output, QueryOptions};
use dirigo_nexmark::run::{run_jobs, slo_violation_pct, EngineOptions, JobConfig};
use dirigo_nexmark::GeneratorConfig;

use crate::machine::Machine;
use crate::{median, progress, BenchError};

const QUERY: &str = "q2";

pub const NOTE: &str = "time-shared: N jobs on one engine over every shard, EDF, autoscaler on; \
static: one job per shard (one partition per stage, every actor migrated to its shard, \
autoscaling off), FIFO, autoscaler off; a shard is never shared in the static mode, so it holds \
at most one job per core; a set of jobs meets its SLO when every job finished with under \
violation_pct_max percent of its rows over its SLO; N searched by doubling then bisection, each \
probe on a fresh engine, a probe that misses tried once more before it counts; the two \
searches alternate run by run, figures are medians over runs";

#[derive(Clone, Debug)]
pub struct Config {
    pub cores: usize,
    pub runs: usize,
    /// Each job's input rate, events/s.
    pub rate_per_s: u64,
    /// How long each job's input lasts, ms.
    pub run_ms: u64,
    pub slo: Duration,
    pub violation_pct_max: f64,
    /// The time-shared search stops here.
    pub jobs_max: usize,
    pub progress: bool,
    pub time_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cores: dirigo_engine::runtime::online_cores(),
            runs: 3,
            rate_per_s: 20_000,
            run_ms: 1_500,
            slo: Duration::from_millis(10),
            violation_pct_max: 1.0,
            jobs_max: 512,
            progress: true,
            time_max: Duration::from_secs(120),
        }
    }
}

impl Config {
    fn events(&self) -> u64 {
        (self.rate_per_s * self.run_ms).div_ceil(1000)
    }
}

/// One probe: N jobs, and how the worst of them did.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    pub jobs: usize,
    pub met: bool,
    /// The largest `slo_violation_pct` of the jobs (100 for a failed job).
    pub violation_pct_max: f64,
    /// The largest p99 of the jobs, us.
    pub p99_us_max: u64,
    pub wall_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Search {
    /// The most jobs that met their SLO (0: not even one).
    pub jobs: usize,
    pub probes: Vec<Probe>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSample {
    pub run: usize,
    pub static_first: bool,
    pub time_shared: Search,
    #[serde(rename = "static")]
    pub static_: Search,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub runs: usize,
    pub query: &'static str,
    pub rate_per_s: u64,
    pub events_per_job: u64,
    pub slo_us: u64,
    pub violation_pct_max: f64,
    pub time_shared_jobs: f64,
    pub static_jobs: f64,
    /// `time_shared_jobs / static_jobs`; null when static held no job.
    pub ratio: Option<f64>,
    pub samples: Vec<RunSample>,
    pub note: &'static str,
}

/// One job of a probe: its `slo_violation_pct` and p99 (us), or why it failed.
type Outcome = Result<(f64, u64), String>;

/// Summarize one probe's job outcomes: (met, worst violation, worst p99).
fn judge(config: &Config, outcomes: &[Outcome]) -> (bool, f64, u64) {
    let (mut worst, mut p99) = (0.0f64, 0u64);
    for outcome in outcomes {
        match outcome {
            Ok((violation, job_p99)) => {
                worst = worst.max(*violation);
                p99 = p99.max(*job_p99);
            }
            Err(_) => worst = 100.0,
        }
    }
    (worst < config.violation_pct_max, worst, p99)
}

fn job_config(config: &Config) -> JobConfig {
    let pace = RateSchedule::constant(config.rate_per_s);
    JobConfig {
        query: QUERY.to_string(),
        source: EventSource::Generator {
            config: GeneratorConfig {
                rate: pace.clone(),
                ..GeneratorConfig::default()
            },
            events: config.events(),
        },
        output: Output::Null,
        sink_parallelism: config.cores as u32,
        pace: Some(pace),
        slo: config.slo,
        checkpoints: None,
        parallelism: None,
    }
}

fn time_shared(config: &Config, jobs: usize) -> Result<Vec<Outcome>, BenchError> {
    let engine = EngineOptions {
        cores: config.cores,
        oversubscribe: false,
        scheduler: PolicyKind::Edf,
        autoscale: Some(AutoscaleOptions::default()),
        progress: Some(Arc::new(|_, _| {})),
        live: None,
        time_limit: config.time_max,
        nodes: None,
    };
    let reports = run_jobs(&engine, &vec![job_config(config); jobs])
        .map_err(|e| BenchError(format!("time-shared: the engine did not start: {e}")))?;
    Ok(reports
        .into_iter()
        .map(|r| r.map(|r| (r.slo_violation_pct, r.latency_us.p99)))
        .collect())
}

fn static_partitioned(config: &Config, jobs: usize) -> Result<Vec<Outcome>, BenchError> {
    let mut engine = DataflowConfig::default();
    engine.runtime.shards = config.cores;
    engine.runtime.shard.policy = PolicyKind::Fifo;
    engine.autoscale = None;
    let mut dataflow = Dataflow::start(engine)
        .map_err(|e| BenchError(format!("static: the engine did not start: {e}")))?;
    let template = job_config(config);
    let options = QueryOptions {
        source: template.source,
        source_parallelism: 1,
        parallelism: 1,
        slo: config.slo,
        pace: template.pace,
        output: Output::Null,
        sink_parallelism: 1,
    };
    let mut handles = Vec::with_capacity(jobs);
    for shard in 0..jobs {
        let mut job = build(QUERY, &options).map_err(BenchError)?;
        job.autoscale(false);
        let handle = dataflow.submit(job).map_err(BenchError)?;
        for actor in dataflow.actors(handle.id) {
            dataflow.migrate(actor, ShardId(shard as u16));
        }
        handles.push(handle);
    }
    let slo_us = config.slo.as_micros() as u64;
    let outcomes = handles
        .iter()
        .map(|handle| {
            let report = dataflow.wait(handle, config.time_max)?;
            Ok((
                slo_violation_pct(&report.latency_us, slo_us),
                report.latency_us.value_at_quantile(0.99),
            ))
        })
        .collect();
    dataflow.shutdown();
    Ok(outcomes)
}

/// Doubling then bisection over N in `1..=max`, each probe by `probe`. A
/// probe that misses is tried once more before it counts as a miss: on a
/// shared machine one stalled turn can fail a set that fits, and a single
/// miss would end the doubling early (both tries are in `probes`).
fn search(
    config: &Config,
    name: &str,
    max: usize,
    probe: impl Fn(&Config, usize) -> Result<Vec<Outcome>, BenchError>,
) -> Result<Search, BenchError> {
    let mut probes = Vec::new();
    let mut run = |jobs: usize| -> Result<bool, BenchError> {
        let started = Instant::now();
        let (met, violation, p99) = judge(config, &probe(config, jobs)?);
        let wall_s = started.elapsed().as_secs_f64();
        progress(
            config.progress,
            format_args!(
                "density: {name} {jobs} jobs: worst {violation:.2}% over SLO, worst p99 {p99} us \
                 ({wall_s:.1} s): {}",
                if met { "met" } else { "missed" }
            ),
        );
        probes.push(Probe {
            jobs,
            met,
            violation_pct_max: violation,
            p99_us_max: p99,
            wall_s,
        });
        Ok(met)
    };
    let mut meets = |jobs: usize| -> Result<bool, BenchError> { Ok(run(jobs)? || run(jobs)?) };
    let (mut good, mut bad) = (0usize, None::<usize>);
    let mut n = 1usize;
    while n <= max {
        if meets(n)? {
            good = n;
            if n == max {
                break;
            }
            n = (n * 2).min(max);
        } else {
            bad = Some(n);
            break;
        }
    }
    if let Some(mut bad) = bad {
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            match meets(mid)? {
                true => good = mid,
                false => bad = mid,
            }
        }
    }
    Ok(Search { jobs: good, probes })
}

pub fn run(config: &Config) -> Result<Report, BenchError> {
    if config.cores == 0 || config.runs == 0 || config.rate_per_s == 0 || config.run_ms == 0 {
        return Err(BenchError(
            "cores, runs, rate and run time must be above 0".to_string(),
        ));
    }
    let machine = Machine::detect();
    progress(
        config.progress,
        format_args!(
            "density: {QUERY} jobs at {} events/s each ({} events, SLO {:?}) on {} cores, {} runs",
            config.rate_per_s,
            config.events(),
            config.slo,
            config.cores,
            config.runs
        ),
    );
    let mut samples = Vec::with_capacity(config.runs);
    for run in 0..config.runs {
        let static_first = run % 2 == 0;
        let (mut shared, mut fixed) = (None, None);
        for static_now in [static_first, !static_first] {
            if static_now {
                fixed = Some(search(config, "static", config.cores, static_partitioned)?);
            } else {
                shared = Some(search(config, "time-shared", config.jobs_max, time_shared)?);
            }
        }
        samples.push(RunSample {
            run: run + 1,
            static_first,
            time_shared: shared.expect("searched"),
            static_: fixed.expect("searched"),
        });
    }
    let of = |f: fn(&RunSample) -> usize| {
        median(&samples.iter().map(|s| f(s) as f64).collect::<Vec<_>>())
    };
    let time_shared_jobs = of(|s| s.time_shared.jobs);
    let static_jobs = of(|s| s.static_.jobs);
    Ok(Report {
        machine: machine.machine,
        cores: config.cores,
        runs: config.runs,
        query: QUERY,
        rate_per_s: config.rate_per_s,
        events_per_job: config.events(),
        slo_us: config.slo.as_micros() as u64,
        violation_pct_max: config.violation_pct_max,
        time_shared_jobs,
        static_jobs,
        ratio: (static_jobs > 0.0).then(|| time_shared_jobs / static_jobs),
        samples,
        note: NOTE,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dirigo bench density: {} jobs at {} events/s each ({} events, SLO {:?}, each job \
             under {}% of rows over it)",
            self.query,
            self.rate_per_s,
            self.events_per_job,
            Duration::from_micros(self.slo_us),
            self.violation_pct_max
        )?;
        writeln!(
            f,
            "machine: {} ({} cores used); {} runs, searches alternated, medians",
            self.machine, self.cores, self.runs
        )?;
        writeln!(
            f,
            "static: one job per shard, FIFO, autoscaler off; time-shared: every job on every \
             shard, EDF + autoscaler"
        )?;
        writeln!(f)?;
        writeln!(f, "{:<20}{:>10}", "static_jobs", self.static_jobs)?;
        writeln!(f, "{:<20}{:>10}", "time_shared_jobs", self.time_shared_jobs)?;
        match self.ratio {
            Some(r) => writeln!(
                f,
                "{:<20}{:>10.2}  >= 2: {} (information only)",
                "ratio",
                r,
                if r >= 2.0 { "met" } else { "MISSED" }
            )?,
            None => writeln!(f, "{:<20}{:>10}  static held no job", "ratio", "null")?,
        }
        writeln!(f)?;
        write!(f, "note: {}", self.note)
    }
}
