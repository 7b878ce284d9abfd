//! `dirigo bench scaling`: what a paced job's latency does when its input
//! steps up 4x and back, whether every row survives the autoscaler acting on
//! it, what the job costs while its input pauses, and how fast it answers
//! when the input resumes.
//!
//! One job, q2 (a filter and a projection of bids: one row per bid on every
//! 123rd auction, as soon as the bid arrives, so its rows sample latency all
//! along the run; q5's windows would give rows only every 2 s of event time),
//! paced by the schedule
//!
//! ```text
//! RATE/STEP_MS, 4*RATE/STEP_MS, RATE/STEP_MS/2, 0/PAUSE_MS, RATE/STEP_MS/2
//! ```
//!
//! a steady phase, the step up, the steady rate again, a pause (rate 0: no
//! input, the source waits on one timer, the stages deactivate after 1 s
//! idle) and a short steady tail. Its rows go to an in-memory JSON Lines
//! writer (the `Output::JsonLines` sink that `--sink file:PATH` uses), which
//! keeps every line and the wall time of every write.
//!
//! Each run measures the same job twice, each on a fresh engine with EDF
//! scheduling: the **baseline** with the autoscaler off (`--autoscale off`)
//! and **dirigo** with it on; run `r` measures the baseline first when `r` is
//! even. Figures, per configuration (medians over the runs):
//!
//! - `reaction_ms`: the p99 latency over a sliding 100 ms window of output
//!   rows (sampled every 10 ms as the difference of the job's cumulative
//!   latency histogram, `JobMetrics::latency_us`, which sinks flush every
//!   10 ms) is followed through the step; `reaction_ms` is the time from the
//!   step until the end of the last window over the SLO (0 when none was),
//!   null when the p99 was still over the SLO at the end of the step.
//!   `p99_window_max_us` is the worst window from the step to the pause
//!   (the step down included).
//! - `p99_before_us`: rows of the second half of the first steady phase;
//!   `p99_during_us`: rows of the step.
//! - `scale_out_actions`: the autoscaler's moves off a shard over its load
//!   mark; `scale_in_actions`: its moves off a shard cold for a second,
//!   drained into the others when load falls; `needs_parallelism`: the steps
//!   at which it found no move that helps.
//! - `lost` and `duplicated`: the rows as a multiset against the reference,
//!   the baseline's rows of the first run (same job, same schedule, so the
//!   same rows: event time follows the schedule, not the wall clock).
//!   q2's rows carry no sequence, so per-key order is not checked here
//!   (`dirigo bench migrate` checks order across moves).
//! - `idle_cpu_pct`: the process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`,
//!   every thread: shards, autoscaler, this sampler) over a window of the
//!   pause that starts once the stages have had time to deactivate, over the
//!   window's wall time, in percent of one core. The sampler sleeps through
//!   the window.
//! - `wake_ms`: from the end of the pause (by the schedule, from the job's
//!   submission) to the first write of a row after it.
//!
//! Targets from the design (reaction_ms <= 200, lost = duplicated = 0,
//! idle_cpu_pct <= 1, wake_ms <= 10) are shown for information; only a lost
//! or duplicated row fails the command ([`Report::exact`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use dirigo_engine::autoscale::{Action, Scale};
use dirigo_engine::dataflow::{AutoscaleOptions, Dataflow, DataflowConfig, RateSchedule, RateStep};
use dirigo_engine::runtime::PolicyKind;
use dirigo_nexmark::queries::{build, EventSource, LineWriter, Output, QueryOptions};
use dirigo_nexmark::GeneratorConfig;

use crate::machine::Machine;
use crate::{median, median_u64, progress, BenchError};

const QUERY: &str = "q2";
/// Width of the sliding window the p99 is taken over, and how often it is sampled.
const WINDOW_MS: u64 = 100;
const SAMPLE_MS: u64 = 10;
/// The idle window starts this long into the pause (the stages deactivate
/// after 1 s idle) and ends this long before it ends; both shrink for short
/// pauses.
const IDLE_SETTLE_MS: u64 = 1_200;
const IDLE_GUARD_MS: u64 = 100;

pub const NOTE: &str = "baseline: EDF, autoscaler off; dirigo: EDF and the autoscaler; same job, \
schedule and rows, each configuration on a fresh engine, the order alternated run by run; \
figures are medians over the runs (lost and duplicated: the worst run); a row's latency runs \
from when its input was due by the schedule to the sink; the sliding-window p99 comes from the \
job's latency histogram sampled every 10 ms (sinks flush it every 10 ms); lost and duplicated \
compare the rows as a multiset with the first run's baseline; out_of_order is not measured \
(q2 rows carry no sequence; bench migrate checks order across moves); idle_cpu_pct is the whole process's CPU \
during the pause after the stages deactivated";

#[derive(Clone, Debug)]
pub struct Config {
    pub cores: usize,
    pub runs: usize,
    /// The steady rate, events/s.
    pub rate_per_s: u64,
    /// The step's rate over the steady rate.
    pub step_factor: u64,
    /// How long the step (and the steady phase before it) lasts, ms; the
    /// steady phase after it and the tail last half that.
    pub step_ms: u64,
    pub pause_ms: u64,
    pub slo: Duration,
    pub progress: bool,
    pub time_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cores: dirigo_engine::runtime::online_cores(),
            runs: 3,
            rate_per_s: 10_000_000,
            step_factor: 4,
            step_ms: 2_000,
            pause_ms: 2_500,
            slo: Duration::from_millis(10),
            progress: true,
            time_max: Duration::from_secs(300),
        }
    }
}

/// Where the phases start and end, ms from the job's submission.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Phases {
    pub step_start_ms: u64,
    pub step_end_ms: u64,
    pub pause_start_ms: u64,
    pub pause_end_ms: u64,
}

impl Config {
    fn steps(&self) -> [RateStep; 5] {
        let half = (self.step_ms / 2).max(1);
        let step = |per_s, duration_ms| RateStep { per_s, duration_ms };
        [
            step(self.rate_per_s, self.step_ms),
            step(self.rate_per_s * self.step_factor, self.step_ms),
            step(self.rate_per_s, half),
            step(0, self.pause_ms),
            step(self.rate_per_s, half),
        ]
    }

    pub fn schedule(&self) -> Result<RateSchedule, String> {
        RateSchedule::new(&self.steps())
    }

    /// Every step's events, the last held for its duration too.
    pub fn events(&self) -> u64 {
        self.steps()
            .iter()
            .map(|s| (u128::from(s.per_s) * u128::from(s.duration_ms)).div_ceil(1000) as u64)
            .sum()
    }

    pub fn phases(&self) -> Phases {
        let step_start_ms = self.step_ms;
        let step_end_ms = step_start_ms + self.step_ms;
        let pause_start_ms = step_end_ms + (self.step_ms / 2).max(1);
        Phases {
            step_start_ms,
            step_end_ms,
            pause_start_ms,
            pause_end_ms: pause_start_ms + self.pause_ms,
        }
    }
}

/// One configuration's figures: medians over the runs, or one run's.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub autoscale: bool,
    /// Null: the window p99 was still over the SLO when the step ended.
    pub reaction_ms: Option<f64>,
    pub p99_before_us: u64,
    pub p99_during_us: u64,
    /// The worst 100 ms window's p99 from the step to the pause.
    pub p99_window_max_us: u64,
    pub slo_violation_pct: f64,
    /// Autoscaler moves, and steps that found none that helps (absent with
    /// the autoscaler off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_out_actions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_in_actions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs_parallelism: Option<u64>,
    pub rows: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub idle_cpu_pct: f64,
    /// Null: no row came after the pause.
    pub wake_ms: Option<f64>,
    pub elapsed_s: f64,
    pub stalls: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSample {
    pub run: usize,
    pub baseline_first: bool,
    pub baseline: Figures,
    pub dirigo: Figures,
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub query: &'static str,
    /// As `dirigo run --rate` takes it.
    pub schedule: String,
    pub events: u64,
    pub slo_us: u64,
    pub phases: Phases,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub runs: usize,
    pub workload: Workload,
    /// Dirigo's medians, under the names the design gives them.
    pub reaction_ms: Option<f64>,
    pub p99_before_us: u64,
    pub p99_during_us: u64,
    pub scale_out_actions: u64,
    pub scale_in_actions: u64,
    /// Over every run of both configurations.
    pub lost: u64,
    pub duplicated: u64,
    pub idle_cpu_pct: f64,
    pub wake_ms: Option<f64>,
    pub rows_reference: u64,
    pub baseline: Figures,
    pub dirigo: Figures,
    pub samples: Vec<RunSample>,
    pub note: &'static str,
}

impl Report {
    /// No run of either configuration lost or duplicated a row.
    pub fn exact(&self) -> bool {
        self.lost == 0 && self.duplicated == 0
    }
}

// ---- the sink: every line and when it was written ------------------------------

#[derive(Default)]
struct Written {
    lines: Vec<u8>,
    at: Vec<Instant>,
}

/// One buffer per sink partition, kept across the partition's activations.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<BTreeMap<u32, Arc<Mutex<Written>>>>>);

struct CaptureWriter(Arc<Mutex<Written>>);

impl LineWriter for CaptureWriter {
    fn write_lines(&mut self, lines: &[u8]) {
        let now = Instant::now();
        let mut written = self.0.lock().expect("capture poisoned");
        written.lines.extend_from_slice(lines);
        written.at.push(now);
    }
}

impl Capture {
    fn output(&self) -> Output {
        let capture = self.clone();
        Output::JsonLines(Arc::new(move |partition| {
            let mut parts = capture.0.lock().expect("capture poisoned");
            let part = parts.entry(partition).or_default().clone();
            Box::new(CaptureWriter(part))
        }))
    }

    /// Every row, sorted (a multiset), and the first write at or after `from`.
    fn take(&self, from: Instant) -> (Vec<Box<[u8]>>, Option<Instant>) {
        let parts = self.0.lock().expect("capture poisoned");
        let (mut rows, mut first) = (Vec::new(), None::<Instant>);
        for part in parts.values() {
            let written = part.lock().expect("capture poisoned");
            rows.extend(
                written
                    .lines
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(Box::from),
            );
            if let Some(&at) = written.at.iter().find(|&&at| at >= from) {
                first = Some(first.map_or(at, |f| f.min(at)));
            }
        }
        rows.sort_unstable();
        (rows, first)
    }
}

/// Rows of `reference` missing from `rows`, and rows of `rows` beyond
/// `reference`: both sorted.
fn multiset_diff(reference: &[Box<[u8]>], rows: &[Box<[u8]>]) -> (u64, u64) {
    let (mut i, mut j, mut lost, mut duplicated) = (0, 0, 0u64, 0u64);
    while i < reference.len() && j < rows.len() {
        match reference[i].cmp(&rows[j]) {
            std::cmp::Ordering::Equal => (i, j) = (i + 1, j + 1),
            std::cmp::Ordering::Less => (i, lost) = (i + 1, lost + 1),
            std::cmp::Ordering::Greater => (j, duplicated) = (j + 1, duplicated + 1),
        }
    }
    (
        lost + (reference.len() - i) as u64,
        duplicated + (rows.len() - j) as u64,
    )
}

/// CPU time of the whole process so far, ns.
fn process_cpu_ns() -> u64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    assert_eq!(
        rc, 0,
        "CLOCK_PROCESS_CPUTIME_ID is always available on Linux"
    );
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

// ---- one measurement ------------------------------------------------------------

/// The job's cumulative latency histogram at `ms` from its submission.
struct Sample {
    ms: f64,
    latency_us: Histogram<u32>,
}

/// The latest sample at or before `ms` (the first if none is).
fn at(samples: &[Sample], ms: f64) -> &Sample {
    let i = samples.partition_point(|s| s.ms <= ms);
    &samples[i.saturating_sub(1)]
}

fn p99_between(samples: &[Sample], from_ms: f64, to_ms: f64) -> Option<u64> {
    let mut rows = at(samples, to_ms).latency_us.clone();
    rows.subtract(&at(samples, from_ms).latency_us).ok()?;
    (!rows.is_empty()).then(|| rows.value_at_quantile(0.99))
}

/// `reaction_ms` (over the windows that end within the step) and the worst
/// window p99 from the step to the pause.
fn reaction(samples: &[Sample], phases: &Phases, slo_us: u64) -> (Option<f64>, u64) {
    let (start, step_end) = (phases.step_start_ms as f64, phases.step_end_ms as f64);
    let end = phases.pause_start_ms as f64;
    let (mut last_over, mut worst) = (None::<f64>, 0);
    let mut recovered = true;
    for sample in samples.iter().filter(|s| s.ms > start && s.ms <= end) {
        let Some(p99) = p99_between(samples, sample.ms - WINDOW_MS as f64, sample.ms) else {
            continue;
        };
        worst = worst.max(p99);
        if sample.ms > step_end {
            continue;
        }
        recovered = p99 <= slo_us;
        if !recovered {
            last_over = Some(sample.ms);
        }
    }
    let reaction_ms = match (recovered, last_over) {
        (false, _) => None,
        (true, None) => Some(0.0),
        (true, Some(ms)) => Some(ms - start),
    };
    (reaction_ms, worst)
}

struct Measured {
    figures: Figures,
    rows: Vec<Box<[u8]>>,
}

fn measure(config: &Config, schedule: &RateSchedule, dirigo: bool) -> Result<Measured, BenchError> {
    let name = if dirigo { "dirigo" } else { "baseline" };
    let mut engine = DataflowConfig::default();
    engine.runtime.shards = config.cores;
    engine.runtime.shard.policy = PolicyKind::Edf;
    engine.autoscale = dirigo.then(AutoscaleOptions::default);
    let mut dataflow = Dataflow::start(engine)
        .map_err(|e| BenchError(format!("{name}: the engine did not start: {e}")))?;
    let cores = dataflow.shards() as u32;
    let capture = Capture::default();
    let options = QueryOptions {
        source: EventSource::Generator {
            config: GeneratorConfig {
                rate: schedule.clone(),
                ..GeneratorConfig::default()
            },
            events: config.events(),
        },
        source_parallelism: cores,
        parallelism: 2 * cores,
        slo: config.slo,
        pace: Some(schedule.clone()),
        output: capture.output(),
        sink_parallelism: cores,
    };
    let mut job = build(QUERY, &options).map_err(BenchError)?;
    job.autoscale(true);
    let phases = config.phases();
    let started = Instant::now();
    let handle = dataflow.submit(job).map_err(BenchError)?;
    let since = |ms: u64| started + Duration::from_millis(ms);
    let settle_ms = IDLE_SETTLE_MS.min(config.pause_ms / 2);
    let guard_ms = IDLE_GUARD_MS.min(config.pause_ms / 4);
    let (idle_from, idle_to) = (
        since(phases.pause_start_ms + settle_ms),
        since(phases.pause_end_ms - guard_ms),
    );
    let mut samples = Vec::new();
    let mut idle_cpu_pct = None;
    while !handle.is_done() && started.elapsed() <= config.time_max {
        let now = Instant::now();
        if idle_cpu_pct.is_none() && now >= idle_from && now < idle_to {
            let cpu_ns = process_cpu_ns();
            std::thread::sleep(idle_to - now);
            let wall_ns = now.elapsed().as_nanos() as f64;
            idle_cpu_pct = Some((process_cpu_ns() - cpu_ns) as f64 * 100.0 / wall_ns);
            continue;
        }
        samples.push(Sample {
            ms: started.elapsed().as_secs_f64() * 1e3,
            latency_us: handle.metrics().latency_us(),
        });
        std::thread::sleep(Duration::from_millis(SAMPLE_MS));
    }
    let report = dataflow
        .wait(&handle, config.time_max)
        .map_err(|e| BenchError(format!("{name}: {e}")))?;
    samples.push(Sample {
        ms: started.elapsed().as_secs_f64() * 1e3,
        latency_us: report.latency_us.clone(),
    });
    let decisions = dataflow.decisions();
    let stalls = dataflow.stats().stalls();
    dataflow.shutdown();
    let pause_end = since(phases.pause_end_ms);
    let (rows, first_after) = capture.take(pause_end);
    let slo_us = config.slo.as_micros() as u64;
    let (reaction_ms, p99_window_max_us) = reaction(&samples, &phases, slo_us);
    let half_steady = phases.step_start_ms as f64 / 2.0;
    let count = |f: fn(&Action) -> bool| decisions.iter().filter(|d| f(&d.action)).count() as u64;
    let figures = Figures {
        autoscale: dirigo,
        reaction_ms,
        p99_before_us: p99_between(&samples, half_steady, phases.step_start_ms as f64).unwrap_or(0),
        p99_during_us: p99_between(
            &samples,
            phases.step_start_ms as f64,
            phases.step_end_ms as f64,
        )
        .unwrap_or(0),
        p99_window_max_us,
        slo_violation_pct: dirigo_nexmark::run::slo_violation_pct(&report.latency_us, slo_us),
        scale_out_actions: dirigo.then(|| count(|a| a.scale() == Some(Scale::Out))),
        scale_in_actions: dirigo.then(|| count(|a| a.scale() == Some(Scale::In))),
        needs_parallelism: dirigo.then(|| count(|a| matches!(a, Action::NeedsParallelism { .. }))),
        rows: rows.len() as u64,
        lost: 0,
        duplicated: 0,
        idle_cpu_pct: idle_cpu_pct.unwrap_or(f64::NAN),
        wake_ms: first_after.map(|at| (at - pause_end).as_secs_f64() * 1e3),
        elapsed_s: report.elapsed.as_secs_f64(),
        stalls,
    };
    Ok(Measured { figures, rows })
}

// ---- runs and medians -------------------------------------------------------------

/// The median of optional figures, a missing one counting as the largest;
/// `None` when the median is one.
fn median_opt(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let all: Vec<f64> = values.map(|v| v.unwrap_or(f64::INFINITY)).collect();
    let m = median(&all);
    m.is_finite().then_some(m)
}

fn medians(samples: &[&Figures]) -> Figures {
    let of = |f: fn(&Figures) -> f64| median(&samples.iter().map(|s| f(s)).collect::<Vec<_>>());
    let of_u64 = |f: fn(&Figures) -> u64| median_u64(samples.iter().map(|s| f(s)));
    let first = samples[0];
    Figures {
        autoscale: first.autoscale,
        reaction_ms: median_opt(samples.iter().map(|s| s.reaction_ms)),
        p99_before_us: of_u64(|s| s.p99_before_us),
        p99_during_us: of_u64(|s| s.p99_during_us),
        p99_window_max_us: of_u64(|s| s.p99_window_max_us),
        slo_violation_pct: of(|s| s.slo_violation_pct),
        scale_out_actions: first
            .scale_out_actions
            .map(|_| of_u64(|s| s.scale_out_actions.unwrap_or(0))),
        scale_in_actions: first
            .scale_in_actions
            .map(|_| of_u64(|s| s.scale_in_actions.unwrap_or(0))),
        needs_parallelism: first
            .needs_parallelism
            .map(|_| of_u64(|s| s.needs_parallelism.unwrap_or(0))),
        rows: of_u64(|s| s.rows),
        lost: samples.iter().map(|s| s.lost).max().unwrap_or(0),
        duplicated: samples.iter().map(|s| s.duplicated).max().unwrap_or(0),
        idle_cpu_pct: of(|s| s.idle_cpu_pct),
        wake_ms: median_opt(samples.iter().map(|s| s.wake_ms)),
        elapsed_s: of(|s| s.elapsed_s),
        stalls: of_u64(|s| s.stalls),
    }
}

fn sample_line(run: usize, name: &str, f: &Figures) -> String {
    let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.0}"));
    format!(
        "scaling: run {run} {name:<8}: reaction {} ms, p99 before {} us, during {} us, worst \
         window {} us; {} moves out, {} in; rows {} (lost {}, duplicated {}); idle CPU {:.2}%; wake {} ms",
        opt(f.reaction_ms),
        f.p99_before_us,
        f.p99_during_us,
        f.p99_window_max_us,
        f.scale_out_actions
            .map_or("-".to_string(), |a| a.to_string()),
        f.scale_in_actions
            .map_or("-".to_string(), |a| a.to_string()),
        f.rows,
        f.lost,
        f.duplicated,
        f.idle_cpu_pct,
        f.wake_ms.map_or("null".to_string(), |v| format!("{v:.2}")),
    )
}

pub fn run(config: &Config) -> Result<Report, BenchError> {
    if config.cores == 0 || config.runs == 0 || config.rate_per_s == 0 {
        return Err(BenchError(
            "cores, runs and rate must be above 0".to_string(),
        ));
    }
    if config.step_factor == 0 || config.step_ms < 2 || config.pause_ms < 4 {
        return Err(BenchError(
            "the step factor must be above 0, the step at least 2 ms, the pause at least 4 ms"
                .to_string(),
        ));
    }
    let schedule = config.schedule().map_err(BenchError)?;
    let machine = Machine::detect();
    progress(
        config.progress,
        format_args!(
            "scaling: {QUERY} at {schedule} ({} events, SLO {:?}) on {} cores, {} runs",
            config.events(),
            config.slo,
            config.cores,
            config.runs
        ),
    );
    let mut reference: Option<Vec<Box<[u8]>>> = None;
    let mut samples = Vec::with_capacity(config.runs);
    for run in 0..config.runs {
        let baseline_first = run % 2 == 0;
        let (mut baseline, mut dirigo) = (None, None);
        for dirigo_now in [!baseline_first, baseline_first] {
            let Measured { mut figures, rows } = measure(config, &schedule, dirigo_now)?;
            let reference = reference.get_or_insert(rows.clone());
            (figures.lost, figures.duplicated) = multiset_diff(reference, &rows);
            let name = if dirigo_now { "dirigo" } else { "baseline" };
            progress(
                config.progress,
                format_args!("{}", sample_line(run + 1, name, &figures)),
            );
            match dirigo_now {
                true => dirigo = Some(figures),
                false => baseline = Some(figures),
            }
        }
        samples.push(RunSample {
            run: run + 1,
            baseline_first,
            baseline: baseline.expect("measured"),
            dirigo: dirigo.expect("measured"),
        });
    }
    let baseline = medians(&samples.iter().map(|s| &s.baseline).collect::<Vec<_>>());
    let dirigo = medians(&samples.iter().map(|s| &s.dirigo).collect::<Vec<_>>());
    Ok(Report {
        machine: machine.machine,
        cores: config.cores,
        runs: config.runs,
        workload: Workload {
            query: QUERY,
            schedule: schedule.to_string(),
            events: config.events(),
            slo_us: config.slo.as_micros() as u64,
            phases: config.phases(),
        },
        reaction_ms: dirigo.reaction_ms,
        p99_before_us: dirigo.p99_before_us,
        p99_during_us: dirigo.p99_during_us,
        scale_out_actions: dirigo.scale_out_actions.unwrap_or(0),
        scale_in_actions: dirigo.scale_in_actions.unwrap_or(0),
        lost: baseline.lost.max(dirigo.lost),
        duplicated: baseline.duplicated.max(dirigo.duplicated),
        idle_cpu_pct: dirigo.idle_cpu_pct,
        wake_ms: dirigo.wake_ms,
        rows_reference: reference.map_or(0, |r| r.len() as u64),
        baseline,
        dirigo,
        samples,
        note: NOTE,
    })
}

// ---- the table ---------------------------------------------------------------------

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("null".to_string(), |v| format!("{v:.1}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        writeln!(
            f,
            "dirigo bench scaling: {} at {} ({} events, SLO {:?}); step {}-{} ms, pause {}-{} ms",
            w.query,
            w.schedule,
            w.events,
            Duration::from_micros(w.slo_us),
            w.phases.step_start_ms,
            w.phases.step_end_ms,
            w.phases.pause_start_ms,
            w.phases.pause_end_ms
        )?;
        writeln!(
            f,
            "machine: {} ({} cores used); {} runs, configurations alternated, medians",
            self.machine, self.cores, self.runs
        )?;
        writeln!(f, "baseline: EDF, autoscaler off; dirigo: EDF + autoscaler")?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<20}{:>12}{:>12}  target (information only)",
            "figure", "baseline", "dirigo"
        )?;
        let (b, d) = (&self.baseline, &self.dirigo);
        let row = |f: &mut fmt::Formatter<'_>, name: &str, b: String, d: String, rest: String| {
            writeln!(f, "{name:<20}{b:>12}{d:>12}  {rest}")
        };
        let reaction = match d.reaction_ms {
            Some(r) => format!("<= 200: {}", verdict(r <= 200.0)),
            None => "<= 200: MISSED (not back under the SLO)".to_string(),
        };
        row(
            f,
            "reaction_ms",
            ms(b.reaction_ms),
            ms(d.reaction_ms),
            reaction,
        )?;
        row(
            f,
            "p99_before_us",
            b.p99_before_us.to_string(),
            d.p99_before_us.to_string(),
            String::new(),
        )?;
        row(
            f,
            "p99_during_us",
            b.p99_during_us.to_string(),
            d.p99_during_us.to_string(),
            format!(
                "worst 100 ms window {} / {} us",
                b.p99_window_max_us, d.p99_window_max_us
            ),
        )?;
        row(
            f,
            "slo_violation_pct",
            format!("{:.3}", b.slo_violation_pct),
            format!("{:.3}", d.slo_violation_pct),
            String::new(),
        )?;
        row(
            f,
            "scale_out_actions",
            "-".to_string(),
            self.scale_out_actions.to_string(),
            format!(
                "moves; {} steps found no move that helps",
                d.needs_parallelism.unwrap_or(0)
            ),
        )?;
        row(
            f,
            "scale_in_actions",
            "-".to_string(),
            self.scale_in_actions.to_string(),
            "moves off a shard cold for a second".to_string(),
        )?;
        row(
            f,
            "lost",
            b.lost.to_string(),
            d.lost.to_string(),
            format!(
                "0: {} (of {} rows)",
                verdict(self.lost == 0),
                self.rows_reference
            ),
        )?;
        row(
            f,
            "duplicated",
            b.duplicated.to_string(),
            d.duplicated.to_string(),
            format!("0: {}", verdict(self.duplicated == 0)),
        )?;
        row(
            f,
            "idle_cpu_pct",
            format!("{:.2}", b.idle_cpu_pct),
            format!("{:.2}", d.idle_cpu_pct),
            format!("<= 1: {}", verdict(d.idle_cpu_pct <= 1.0)),
        )?;
        row(
            f,
            "wake_ms",
            ms(b.wake_ms),
            ms(d.wake_ms),
            format!("<= 10: {}", verdict(d.wake_ms.is_some_and(|w| w <= 10.0))),
        )?;
        writeln!(f)?;
        write!(f, "note: {}", self.note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiset_difference_counts_missing_and_extra_rows() {
        let rows = |s: &[&str]| {
            s.iter()
                .map(|r| Box::from(r.as_bytes()))
                .collect::<Vec<_>>()
        };
        for (reference, got, expected) in [
            (&["a", "b", "b"][..], &["a", "b", "b"][..], (0, 0)),
            (&["a", "b", "b"][..], &["a", "b"][..], (1, 0)),
            (&["a", "b"][..], &["a", "a", "b", "c"][..], (0, 2)),
            (&["a", "c"][..], &["b"][..], (2, 1)),
        ] {
            assert_eq!(multiset_diff(&rows(reference), &rows(got)), expected);
        }
    }

    #[test]
    fn the_schedule_has_a_step_and_a_pause() {
        let config = Config::default();
        let phases = config.phases();
        assert_eq!(
            config.schedule().unwrap().to_string(),
            "10000000/2s,40000000/2s,10000000/1s,0/2500ms,10000000"
        );
        assert_eq!(
            (
                phases.step_start_ms,
                phases.step_end_ms,
                phases.pause_start_ms,
                phases.pause_end_ms
            ),
            (2_000, 4_000, 5_000, 7_500)
        );
        assert_eq!(
            config.events(),
            20_000_000 + 80_000_000 + 10_000_000 + 10_000_000
        );
    }
}
