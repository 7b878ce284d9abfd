//! `dirigo bench isolation`: does a latency-critical job keep its SLO while a
//! co-tenant's input bursts far above what the cores can do, and what does
//! the bulk job pay for it?
//!
//! Two Nexmark jobs share one engine (`run_jobs`, every shard time-shared):
//!
//! - **LC** (latency-critical): q1, paced at `lc_rate_per_s` (200,000
//!   events/s) for `lc_events`, with a tight SLO (`lc_slo`, 2 ms: sized so
//!   that FIFO misses it on at least 5% of rows on two cores; at 10 ms it
//!   misses on 0.8-2.1%). q1 maps
//!   every bid to one row, so its rows are known in advance
//!   ([`dirigo_nexmark::bids_before`]): `lc_rows` must equal
//!   `lc_rows_expected`, in every run and configuration.
//! - **bulk**: q5 (hot items, sliding windows) with a 2 s SLO, whose input
//!   follows the schedule `50000/1s,BURST_RATE/BURST,50000`: a quiet second,
//!   then a burst at `burst_rate_per_s` (30M events/s, 600x the quiet rate
//!   and several times what q5 does on two cores) for `burst_ms`, then quiet
//!   again. Its events default to the whole schedule (the quiet second, the
//!   burst, one more quiet second). A paced source that falls behind its
//!   schedule produces as fast as it can, so the burst lasts, in wall time,
//!   until the backlog is through: the shards are saturated by the co-tenant
//!   that long. The LC job's `lc_events` should cover that (the report has
//!   both jobs' elapsed time per run to check it).
//!
//! Each run runs the same two jobs (same seeds, payloads and schedules) in two
//! configurations, each on a fresh engine:
//!
//! - **baseline**: FIFO scheduling (`PolicyKind::Fifo`: each shard runs the
//!   actor whose message arrived first, as slot-based engines behave),
//!   autoscaler off: the placement stays as made (static).
//! - **dirigo**: EDF scheduling (by the deadline the SLO gives each message)
//!   and the autoscaler (`AutoscaleOptions::default()`), which may move any
//!   job's actors between shards.
//!
//! Run `r` (from 0) measures the baseline first when `r` is even and dirigo
//! first when it is odd, so that drift on a shared machine (another process
//! starting, the CPU's clock) does not favour one configuration. Each figure
//! is the median over the runs; the samples are in the report.
//!
//! Figures: the LC job's latency p99 and the percentage of its rows over its
//! SLO (`slo_violation_pct`, from one histogram value per row), the bulk job's
//! throughput (its input events over its elapsed time), their ratios, and the
//! autoscaler's actions. The targets (dirigo under 1% violations and at least
//! 10x fewer than the baseline; bulk throughput at least 0.9 of the
//! baseline's) are shown for information: no timing fails the command. Only
//! a lost or duplicated LC row does (see [`Report::rows_delivered`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use dirigo_engine::dataflow::{AutoscaleOptions, RateSchedule, RateStep};
use dirigo_engine::runtime::PolicyKind;
use dirigo_nexmark::queries::{EventSource, Output};
use dirigo_nexmark::run::{run_jobs, EngineOptions, JobConfig, RunReport};
use dirigo_nexmark::GeneratorConfig;

use crate::machine::Machine;
use crate::{median, median_u64, progress, BenchError};

/// The latency-critical job's query: one row per bid.
const LC_QUERY: &str = "q1";
/// The bulk job's query.
const BULK_QUERY: &str = "q5";
/// The bulk job's SLO: loose, as bulk work's is.
const BULK_SLO: Duration = Duration::from_secs(2);
/// The bulk job's rate outside the burst, events/s, and how long it holds
/// before and after it, ms.
const QUIET_RATE_PER_S: u64 = 50_000;
const QUIET_MS: u64 = 1_000;

pub const NOTE: &str = "baseline: FIFO scheduling, autoscaler off (placement as made); dirigo: \
EDF scheduling and the autoscaler; same jobs, payloads and schedules, each configuration on a \
fresh engine, the order alternated run by run; figures are medians over the runs, ratios are of \
the medians; the LC job's latency runs from the moment its input was due by its pace (so time \
its source waited for a turn counts) to the sink; bulk_events_per_s is the bulk job's input \
events over its whole elapsed time (quiet phases included)";

#[derive(Clone, Debug)]
pub struct Config {
    /// Shards (cores) of each engine.
    pub cores: usize,
    /// Runs, each measuring both configurations.
    pub runs: usize,
    /// The LC job's constant input rate, events/s.
    pub lc_rate_per_s: u64,
    /// The LC job's input events.
    pub lc_events: u64,
    pub lc_slo: Duration,
    /// The bulk job's rate during the burst, events/s, and how long the burst
    /// lasts in the schedule.
    pub burst_rate_per_s: u64,
    pub burst_ms: u64,
    /// The bulk job's input events; `None`: the whole schedule (see
    /// [`Config::bulk_events`]).
    pub bulk_events: Option<u64>,
    pub progress: bool,
    /// A configuration whose jobs have not finished after this long is an error.
    pub time_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cores: dirigo_engine::runtime::online_cores(),
            runs: 3,
            lc_rate_per_s: 200_000,
            lc_events: 1_400_000,
            lc_slo: Duration::from_millis(2),
            burst_rate_per_s: 30_000_000,
            burst_ms: 2_000,
            bulk_events: None,
            progress: true,
            time_max: Duration::from_secs(600),
        }
    }
}

impl Config {
    /// The bulk job's input schedule: quiet, burst, quiet (held to the end).
    pub fn bulk_schedule(&self) -> Result<RateSchedule, String> {
        RateSchedule::new(&[
            RateStep {
                per_s: QUIET_RATE_PER_S,
                duration_ms: QUIET_MS,
            },
            RateStep {
                per_s: self.burst_rate_per_s,
                duration_ms: self.burst_ms,
            },
            RateStep {
                per_s: QUIET_RATE_PER_S,
                duration_ms: QUIET_MS,
            },
        ])
    }

    /// The bulk job's input events: as given, or the schedule's three steps
    /// (each step's rate times its duration).
    pub fn bulk_events(&self) -> u64 {
        self.bulk_events.unwrap_or_else(|| {
            let quiet = QUIET_RATE_PER_S * QUIET_MS / 1000;
            let burst = (u128::from(self.burst_rate_per_s) * u128::from(self.burst_ms) / 1000)
                .min(u128::from(u64::MAX / 4)) as u64;
            2 * quiet + burst
        })
    }
}

/// One configuration's figures: medians over the runs, or one run's.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    /// `fifo` or `edf`.
    pub scheduler: &'static str,
    pub autoscale: bool,
    pub lc_p50_us: u64,
    pub lc_p99_us: u64,
    pub lc_max_us: u64,
    /// Percentage of the LC job's rows whose latency exceeded its SLO.
    pub lc_violation_pct: f64,
    /// Rows the LC job delivered. Over several runs: the count farthest from
    /// `lc_rows_expected` (so a loss or a duplicate in any run shows).
    pub lc_rows: u64,
    /// The LC job's messages handled after their deadline (the engine's
    /// accounting), and its mailbox queueing p99.
    pub lc_deadline_misses: u64,
    pub lc_queue_us_p99: u64,
    pub bulk_events_per_s: f64,
    pub lc_elapsed_s: f64,
    pub bulk_elapsed_s: f64,
    /// Autoscaler decisions that moved an actor, over both jobs and of each
    /// (dirigo only: absent with the autoscaler off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_actions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lc_scale_actions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk_scale_actions: Option<u64>,
    /// Shard turns over 10 ms (the OS took a core away, or one turn did that
    /// much work), on any shard.
    pub stalls: u64,
}

/// One run: both configurations, and which went first.
#[derive(Clone, Debug, Serialize)]
pub struct RunSample {
    pub run: usize,
    pub baseline_first: bool,
    pub baseline: Figures,
    pub dirigo: Figures,
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub lc_query: &'static str,
    pub lc_rate_per_s: u64,
    pub lc_events: u64,
    pub lc_slo_us: u64,
    pub bulk_query: &'static str,
    /// As `dirigo run --rate` takes it.
    pub bulk_schedule: String,
    pub bulk_events: u64,
    pub bulk_slo_us: u64,
    /// Burst rate over the quiet rate.
    pub burst_factor: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub runs: usize,
    pub workload: Workload,
    pub baseline: Figures,
    pub dirigo: Figures,
    /// Baseline's LC violations over dirigo's; `None` (JSON null) when dirigo
    /// had none (the ratio is unbounded).
    pub violation_ratio: Option<f64>,
    /// Dirigo's bulk throughput over the baseline's.
    pub bulk_throughput_ratio: f64,
    /// Rows q1 makes of `lc_events` events: one per bid.
    pub lc_rows_expected: u64,
    /// dirigo's scale actions (median over the runs), also in `dirigo`.
    pub scale_actions: u64,
    pub samples: Vec<RunSample>,
    pub note: &'static str,
}

impl Report {
    /// Every run of both configurations delivered exactly the LC rows expected.
    pub fn rows_delivered(&self) -> bool {
        self.samples.iter().all(|s| {
            s.baseline.lc_rows == self.lc_rows_expected && s.dirigo.lc_rows == self.lc_rows_expected
        })
    }
}

/// The two jobs of every run.
fn jobs(config: &Config, schedule: &RateSchedule) -> [JobConfig; 2] {
    let sinks = config.cores as u32;
    let job = |query: &str, pace: RateSchedule, events: u64, slo: Duration| JobConfig {
        query: query.to_string(),
        source: EventSource::Generator {
            // A paced run's event time follows its schedule (NEXMARK.md).
            config: GeneratorConfig {
                rate: pace.clone(),
                ..GeneratorConfig::default()
            },
            events,
        },
        output: Output::Null,
        sink_parallelism: sinks,
        pace: Some(pace),
        slo,
        checkpoints: None,
        parallelism: None,
    };
    [
        job(
            LC_QUERY,
            RateSchedule::constant(config.lc_rate_per_s),
            config.lc_events,
            config.lc_slo,
        ),
        job(BULK_QUERY, schedule.clone(), config.bulk_events(), BULK_SLO),
    ]
}

/// Run both jobs on a fresh engine in one configuration.
fn measure(config: &Config, jobs: &[JobConfig], dirigo: bool) -> Result<Figures, BenchError> {
    let engine = EngineOptions {
        cores: config.cores,
        oversubscribe: false,
        scheduler: if dirigo {
            PolicyKind::Edf
        } else {
            PolicyKind::Fifo
        },
        autoscale: dirigo.then(AutoscaleOptions::default),
        // A progress hook makes `run_jobs` poll its jobs every 250 ms instead
        // of every millisecond: less of a third thread on the shards' cores.
        progress: Some(Arc::new(|_, _| {})),
        live: None,
        time_limit: config.time_max,
        nodes: None,
    };
    let name = if dirigo { "dirigo" } else { "baseline" };
    let mut reports = run_jobs(&engine, jobs)
        .map_err(|e| BenchError(format!("{name}: the engine did not start: {e}")))?
        .into_iter()
        .map(|r| r.map_err(|e| BenchError(format!("{name}: a job failed: {e}"))));
    let lc: RunReport = reports.next().expect("an LC report")?;
    let bulk: RunReport = reports.next().expect("a bulk report")?;
    let actions = lc.scale_actions.zip(bulk.scale_actions);
    Ok(Figures {
        scheduler: engine.scheduler.name(),
        autoscale: dirigo,
        lc_p50_us: lc.latency_us.p50,
        lc_p99_us: lc.latency_us.p99,
        lc_max_us: lc.latency_us.max,
        lc_violation_pct: lc.slo_violation_pct,
        lc_rows: lc.outputs,
        lc_deadline_misses: lc.deadline_misses,
        lc_queue_us_p99: lc.queue_us_p99,
        bulk_events_per_s: bulk.events_per_s,
        lc_elapsed_s: lc.elapsed_s,
        bulk_elapsed_s: bulk.elapsed_s,
        scale_actions: actions.map(|(l, b)| l + b),
        lc_scale_actions: actions.map(|(l, _)| l),
        bulk_scale_actions: actions.map(|(_, b)| b),
        stalls: lc.stalls,
    })
}

/// Medians of one configuration's samples.
fn medians(samples: &[&Figures], expected_rows: u64) -> Figures {
    let first = samples[0];
    let of = |f: fn(&Figures) -> f64| median(&samples.iter().map(|s| f(s)).collect::<Vec<_>>());
    let of_u64 = |f: fn(&Figures) -> u64| median_u64(samples.iter().map(|s| f(s)));
    let of_opt = |f: fn(&Figures) -> Option<u64>| {
        first
            .scale_actions
            .map(|_| median_u64(samples.iter().map(|s| f(s).unwrap_or(0))))
    };
    Figures {
        scheduler: first.scheduler,
        autoscale: first.autoscale,
        lc_p50_us: of_u64(|s| s.lc_p50_us),
        lc_p99_us: of_u64(|s| s.lc_p99_us),
        lc_max_us: of_u64(|s| s.lc_max_us),
        lc_violation_pct: of(|s| s.lc_violation_pct),
        lc_rows: samples
            .iter()
            .map(|s| s.lc_rows)
            .max_by_key(|rows| rows.abs_diff(expected_rows))
            .expect("at least one sample"),
        lc_deadline_misses: of_u64(|s| s.lc_deadline_misses),
        lc_queue_us_p99: of_u64(|s| s.lc_queue_us_p99),
        bulk_events_per_s: of(|s| s.bulk_events_per_s),
        lc_elapsed_s: of(|s| s.lc_elapsed_s),
        bulk_elapsed_s: of(|s| s.bulk_elapsed_s),
        scale_actions: of_opt(|s| s.scale_actions),
        lc_scale_actions: of_opt(|s| s.lc_scale_actions),
        bulk_scale_actions: of_opt(|s| s.bulk_scale_actions),
        stalls: of_u64(|s| s.stalls),
    }
}

fn sample_line(run: usize, name: &str, f: &Figures) -> String {
    let actions = f.scale_actions.map_or("autoscaler off".to_string(), |a| {
        format!(
            "{a} scale actions (lc {}, bulk {})",
            f.lc_scale_actions.unwrap_or(0),
            f.bulk_scale_actions.unwrap_or(0)
        )
    });
    format!(
        "isolation: run {run} {name:<8}: LC p99 {} us, {:.2}% over SLO, {} rows; bulk {:.2}M \
         events/s; LC {:.2} s, bulk {:.2} s; {actions}; {} turns over 10 ms",
        f.lc_p99_us,
        f.lc_violation_pct,
        f.lc_rows,
        f.bulk_events_per_s / 1e6,
        f.lc_elapsed_s,
        f.bulk_elapsed_s,
        f.stalls
    )
}

pub fn run(config: &Config) -> Result<Report, BenchError> {
    if config.cores == 0 || config.runs == 0 {
        return Err(BenchError("cores and runs must be above 0".to_string()));
    }
    if config.lc_rate_per_s == 0 || config.lc_events == 0 || config.burst_rate_per_s == 0 {
        return Err(BenchError(
            "the LC rate, LC events and burst rate must be above 0".to_string(),
        ));
    }
    let schedule = config.bulk_schedule().map_err(BenchError)?;
    let jobs = jobs(config, &schedule);
    let machine = Machine::detect();
    let lc_rows_expected = dirigo_nexmark::bids_before(config.lc_events);
    progress(
        config.progress,
        format_args!(
            "isolation: {LC_QUERY} at {} events/s ({} events, SLO {:?}) next to {BULK_QUERY} at \
             {schedule} ({} events, SLO {BULK_SLO:?}) on {} cores, {} runs",
            config.lc_rate_per_s,
            config.lc_events,
            config.lc_slo,
            config.bulk_events(),
            config.cores,
            config.runs
        ),
    );
    let mut samples = Vec::with_capacity(config.runs);
    for run in 0..config.runs {
        let baseline_first = run % 2 == 0;
        let (mut baseline, mut dirigo) = (None, None);
        for dirigo_now in [!baseline_first, baseline_first] {
            let figures = measure(config, &jobs, dirigo_now)?;
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
    let baseline = medians(
        &samples.iter().map(|s| &s.baseline).collect::<Vec<_>>(),
        lc_rows_expected,
    );
    let dirigo = medians(
        &samples.iter().map(|s| &s.dirigo).collect::<Vec<_>>(),
        lc_rows_expected,
    );
    let violation_ratio = (dirigo.lc_violation_pct > 0.0)
        .then(|| baseline.lc_violation_pct / dirigo.lc_violation_pct);
    let bulk_throughput_ratio = dirigo.bulk_events_per_s / baseline.bulk_events_per_s.max(1e-9);
    Ok(Report {
        machine: machine.machine,
        cores: config.cores,
        runs: config.runs,
        workload: Workload {
            lc_query: LC_QUERY,
            lc_rate_per_s: config.lc_rate_per_s,
            lc_events: config.lc_events,
            lc_slo_us: config.lc_slo.as_micros() as u64,
            bulk_query: BULK_QUERY,
            bulk_schedule: schedule.to_string(),
            bulk_events: config.bulk_events(),
            bulk_slo_us: BULK_SLO.as_micros() as u64,
            burst_factor: config.burst_rate_per_s as f64 / QUIET_RATE_PER_S as f64,
        },
        scale_actions: dirigo.scale_actions.unwrap_or(0),
        baseline,
        dirigo,
        violation_ratio,
        bulk_throughput_ratio,
        lc_rows_expected,
        samples,
        note: NOTE,
    })
}

// ---- the table ---------------------------------------------------------------

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        writeln!(
            f,
            "dirigo bench isolation: {} at {} events/s (SLO {:?}, {} events) next to {} at {} \
             (SLO {:?}, {} events; the burst is {:.0}x the quiet rate)",
            w.lc_query,
            w.lc_rate_per_s,
            Duration::from_micros(w.lc_slo_us),
            w.lc_events,
            w.bulk_query,
            w.bulk_schedule,
            Duration::from_micros(w.bulk_slo_us),
            w.bulk_events,
            w.burst_factor
        )?;
        writeln!(
            f,
            "machine: {} ({} cores used); {} runs, configurations alternated, medians",
            self.machine, self.cores, self.runs
        )?;
        writeln!(
            f,
            "baseline: FIFO, autoscaler off (static placement); dirigo: EDF + autoscaler"
        )?;
        writeln!(f)?;
        let (b, d) = (&self.baseline, &self.dirigo);
        writeln!(
            f,
            "{:<20}{:>14}{:>14}  ratio / target (information only)",
            "figure", "baseline", "dirigo"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, b: String, d: String, rest: String| {
            writeln!(f, "{name:<20}{b:>14}{d:>14}  {rest}")
        };
        row(
            f,
            "lc_p99_us",
            b.lc_p99_us.to_string(),
            d.lc_p99_us.to_string(),
            format!(
                "p50 {} / {} us, max {} / {} us",
                b.lc_p50_us, d.lc_p50_us, b.lc_max_us, d.lc_max_us
            ),
        )?;
        let ratio = match self.violation_ratio {
            Some(r) => format!("violation_ratio {r:.1} (>= 10: {})", verdict(r >= 10.0)),
            None => "violation_ratio null: dirigo had no violation (unbounded; met)".to_string(),
        };
        row(
            f,
            "lc_violation_pct",
            format!("{:.3}%", b.lc_violation_pct),
            format!("{:.3}%", d.lc_violation_pct),
            format!(
                "{ratio}; dirigo < 1%: {}; baseline >= 5% (the workload's sizing): {}",
                verdict(d.lc_violation_pct < 1.0),
                verdict(b.lc_violation_pct >= 5.0)
            ),
        )?;
        row(
            f,
            "bulk_events_per_s",
            format!("{:.2}M", b.bulk_events_per_s / 1e6),
            format!("{:.2}M", d.bulk_events_per_s / 1e6),
            format!(
                "bulk_throughput_ratio {:.3} (>= 0.9: {})",
                self.bulk_throughput_ratio,
                verdict(self.bulk_throughput_ratio >= 0.9)
            ),
        )?;
        row(
            f,
            "lc_rows",
            b.lc_rows.to_string(),
            d.lc_rows.to_string(),
            format!(
                "expected {} (one per bid): {}",
                self.lc_rows_expected,
                if self.rows_delivered() {
                    "every row delivered, every run"
                } else {
                    "ROWS LOST OR DUPLICATED"
                }
            ),
        )?;
        row(
            f,
            "scale_actions",
            "off".to_string(),
            d.scale_actions.unwrap_or(0).to_string(),
            format!(
                "dirigo: LC job {}, bulk job {}",
                d.lc_scale_actions.unwrap_or(0),
                d.bulk_scale_actions.unwrap_or(0)
            ),
        )?;
        row(
            f,
            "lc_queue_us_p99",
            b.lc_queue_us_p99.to_string(),
            d.lc_queue_us_p99.to_string(),
            format!(
                "LC messages past their deadline: {} / {}",
                b.lc_deadline_misses, d.lc_deadline_misses
            ),
        )?;
        row(
            f,
            "elapsed s (LC/bulk)",
            format!("{:.2}/{:.2}", b.lc_elapsed_s, b.bulk_elapsed_s),
            format!("{:.2}/{:.2}", d.lc_elapsed_s, d.bulk_elapsed_s),
            "the LC job should run until the bulk job's backlog is through".to_string(),
        )?;
        row(
            f,
            "stalls",
            b.stalls.to_string(),
            d.stalls.to_string(),
            "shard turns over 10 ms (on a shared machine, mostly the OS taking a core)".to_string(),
        )?;
        writeln!(f)?;
        writeln!(f, "per run (LC violations %, LC p99 us, bulk M events/s):")?;
        for s in &self.samples {
            writeln!(
                f,
                "  run {} ({} first): baseline {:.2}%, {} us, {:.2}M; dirigo {:.2}%, {} us, \
                 {:.2}M, {} scale actions",
                s.run,
                if s.baseline_first {
                    "baseline"
                } else {
                    "dirigo"
                },
                s.baseline.lc_violation_pct,
                s.baseline.lc_p99_us,
                s.baseline.bulk_events_per_s / 1e6,
                s.dirigo.lc_violation_pct,
                s.dirigo.lc_p99_us,
                s.dirigo.bulk_events_per_s / 1e6,
                s.dirigo.scale_actions.unwrap_or(0)
            )?;
        }
        if self
            .samples
            .iter()
            .flat_map(|s| [&s.baseline, &s.dirigo])
            .any(|f| f.lc_elapsed_s + 0.5 < f.bulk_elapsed_s)
        {
            writeln!(
                f,
                "warning: in some run the LC job ended over 0.5 s before the bulk job: it did \
                 not see the whole burst (raise --lc-events)"
            )?;
        }
        write!(f, "note: {}", self.note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bulk_input_defaults_to_its_whole_schedule() {
        let config = Config::default();
        assert_eq!(
            config.bulk_schedule().unwrap().to_string(),
            "50000/1s,30000000/2s,50000"
        );
        assert_eq!(config.bulk_events(), 50_000 + 60_000_000 + 50_000);
        let given = Config {
            bulk_events: Some(7),
            ..Config::default()
        };
        assert_eq!(given.bulk_events(), 7);
    }
}
