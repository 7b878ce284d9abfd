//! `dirigo bench relays`: a job whose cost is the stateless step fused into a
//! source of one partition, with the autoscaler on in both configurations,
//! measured two ways in the same run:
//!
//! - the baseline, `Job::relays(false)`: the step always runs fused into the
//!   source's one actor, so the job has the parallelism of its source (the
//!   autoscaler can move its actors, and split its keyed stage, but not the
//!   step);
//! - Dirigo: relays allowed, so once the source's shard is overloaded with
//!   nothing it can move or split, the autoscaler splits the step out onto
//!   the relay stage (a partition per shard) and every shard runs it.
//!
//! The job: numbers `0..events` from one source partition; a step that
//! mixes each number `rounds` times (splitmix64) into a key of 1,000 and an
//! event time; a windowed count per key (100 ms tumbling windows of event
//! time, 100,000 numbers each); a sink that keeps the rows. Each run
//! measures both configurations (alternating which goes first) on a freshly
//! started engine; the rows of every run of both must be equal, and the
//! figures are the medians.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use dirigo_engine::autoscale::Action;
use dirigo_engine::dataflow::ops::{Count, WindowSpec};
use dirigo_engine::dataflow::{
    AutoscaleOptions, Dataflow, DataflowConfig, Job, Sink, Source, SourceBatch,
};

use crate::machine::Machine;
use crate::{median, median_u64, progress, BenchError};

const KEYS: u64 = 1_000;
const WINDOW_MS: i64 = 100;
/// Numbers per millisecond of event time.
const PER_MS: u64 = 1_000;

#[derive(Clone, Debug)]
pub struct Config {
    /// Shards.
    pub cores: usize,
    pub runs: usize,
    pub events: u64,
    /// Rounds of splitmix64 the step spends on each number.
    pub rounds: u32,
    pub time_limit: Duration,
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cores: 2,
            runs: 3,
            events: 4_000_000,
            rounds: 200,
            time_limit: Duration::from_secs(300),
            progress: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub cores: usize,
    pub events: u64,
    pub rounds: u32,
    pub runs: usize,
    /// The baseline: the step fused into its source, medians.
    pub fused_events_per_s: f64,
    /// Relays allowed, medians.
    pub relays_events_per_s: f64,
    /// `relays_events_per_s / fused_events_per_s`.
    pub ratio: f64,
    /// The autoscaler's splits of the step onto the relays, per run (median).
    pub unchain_actions: u64,
    /// Its fusings back, per run (median): of a split that relieved nothing
    /// (a cheap step), or once load fell.
    pub rechain_actions: u64,
    /// Every run of both configurations wrote the same rows.
    pub rows_equal: bool,
    pub rows: usize,
    pub fused_samples: Vec<f64>,
    pub relays_samples: Vec<f64>,
}

/// `0..end`, with the event time of the last number as the watermark.
struct Numbers {
    next: u64,
    end: u64,
}

impl Source<u64> for Numbers {
    fn next_batch(&mut self, max: usize, out: &mut Vec<u64>) -> SourceBatch {
        for _ in 0..max {
            if self.next >= self.end {
                return SourceBatch::Done;
            }
            out.push(self.next);
            self.next += 1;
        }
        SourceBatch::More {
            watermark_ms: ((self.next - 1) / PER_MS) as i64,
        }
    }
}

/// `(key, window start, count)`.
type Row = (u64, i64, u64);
type Rows = Arc<Mutex<Vec<Row>>>;

struct Keep(Rows);

impl Sink<Row> for Keep {
    fn write(&mut self, records: &[Row]) {
        self.0
            .lock()
            .expect("rows poisoned")
            .extend_from_slice(records);
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn job(config: &Config, relays: bool, rows: Rows) -> Job {
    let mut job = Job::new("relays", Duration::from_secs(2));
    job.relays(relays);
    let (end, rounds) = (config.events, config.rounds);
    job.source(
        "numbers",
        1,
        Arc::new(move |_, _| Box::new(Numbers { next: 0, end })),
    )
    .map(move |n: u64| {
        let mut x = n;
        for _ in 0..rounds {
            x = splitmix(x);
        }
        (x % KEYS, (n / PER_MS) as i64)
    })
    .key_by(|r: &(u64, i64)| r.0)
    .window_aggregate(
        "count",
        2 * config.cores as u32,
        WindowSpec::Tumbling { size_ms: WINDOW_MS },
        |r| r.1,
        |r| r.0,
        Count::new(|key, (start, _), n| (key, start, n)),
    )
    .sink("rows", 1, Arc::new(move |_| Box::new(Keep(rows.clone()))));
    job
}

/// One configuration once: events per second, splits of the step out and
/// back, rows.
fn measure(config: &Config, relays: bool) -> Result<(f64, [u64; 2], Vec<Row>), BenchError> {
    let mut engine = DataflowConfig::default();
    engine.runtime.shards = config.cores;
    engine.autoscale = Some(AutoscaleOptions::default());
    let mut dataflow = Dataflow::start(engine).map_err(|e| BenchError(e.to_string()))?;
    let rows = Rows::default();
    let started = Instant::now();
    let handle = dataflow
        .submit(job(config, relays, rows.clone()))
        .map_err(BenchError)?;
    let report = handle.wait(config.time_limit).map_err(BenchError);
    let elapsed = started.elapsed().as_secs_f64();
    let decisions = dataflow.decisions();
    let count = |unchain: bool| {
        decisions
            .iter()
            .filter(|d| match d.action {
                Action::Unchain { job, .. } => unchain && job == handle.id,
                Action::Rechain { job, .. } => !unchain && job == handle.id,
                _ => false,
            })
            .count() as u64
    };
    let switches = [count(true), count(false)];
    for decision in decisions
        .iter()
        .filter(|d| matches!(d.action, Action::Unchain { .. } | Action::Rechain { .. }))
    {
        progress(config.progress, format_args!("relays: {decision}"));
    }
    dataflow.shutdown();
    let report = report?;
    if report.source_records != config.events || report.late_records != 0 {
        return Err(BenchError(format!(
            "{} of {} numbers in, {} late",
            report.source_records, config.events, report.late_records
        )));
    }
    let mut rows = std::mem::take(&mut *rows.lock().expect("rows poisoned"));
    rows.sort_unstable();
    Ok((config.events as f64 / elapsed.max(1e-9), switches, rows))
}

pub fn run(config: &Config) -> Result<Report, BenchError> {
    let machine = Machine::detect();
    let (mut fused, mut relayed) = (Vec::new(), Vec::new());
    let (mut unchains, mut rechains) = (Vec::new(), Vec::new());
    let mut first: Option<Vec<Row>> = None;
    let mut rows_equal = true;
    for run in 0..config.runs.max(1) {
        let order = match run % 2 {
            0 => [false, true],
            _ => [true, false],
        };
        for relays in order {
            progress(
                config.progress,
                format_args!(
                    "relays: run {} of {}, relays {}",
                    run + 1,
                    config.runs,
                    if relays { "allowed" } else { "off (baseline)" }
                ),
            );
            let (per_s, [unchained, rechained], rows) = measure(config, relays)?;
            match relays {
                true => {
                    relayed.push(per_s);
                    unchains.push(unchained);
                    rechains.push(rechained);
                }
                false => fused.push(per_s),
            }
            match &first {
                Some(first) => rows_equal &= *first == rows,
                None => first = Some(rows),
            }
        }
    }
    let (fused_events_per_s, relays_events_per_s) = (median(&fused), median(&relayed));
    Ok(Report {
        machine: machine.machine,
        cores: config.cores,
        events: config.events,
        rounds: config.rounds,
        runs: config.runs.max(1),
        fused_events_per_s,
        relays_events_per_s,
        ratio: relays_events_per_s / fused_events_per_s.max(1e-9),
        unchain_actions: median_u64(unchains),
        rechain_actions: median_u64(rechains),
        rows_equal,
        rows: first.map_or(0, |rows| rows.len()),
        fused_samples: fused,
        relays_samples: relayed,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dirigo bench relays: {} numbers from one source partition, a step of {} \
             splitmix64 rounds each, a windowed count; autoscaler on, {} runs",
            self.events, self.rounds, self.runs
        )?;
        writeln!(f, "machine: {} ({} shards)", self.machine, self.cores)?;
        writeln!(f)?;
        writeln!(
            f,
            "step fused into the source (baseline): {:>12.0} events/s  samples {:?}",
            self.fused_events_per_s, self.fused_samples
        )?;
        writeln!(
            f,
            "step split out onto relays:            {:>12.0} events/s  samples {:?}",
            self.relays_events_per_s, self.relays_samples
        )?;
        writeln!(
            f,
            "ratio {:.2}; the autoscaler split the step out {} time(s) and fused it back {} \
             time(s) a run (medians); {} rows, {}",
            self.ratio,
            self.unchain_actions,
            self.rechain_actions,
            self.rows,
            if self.rows_equal {
                "equal in every run"
            } else {
                "NOT equal across runs"
            }
        )
    }
}
