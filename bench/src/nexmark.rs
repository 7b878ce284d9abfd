//! Nexmark: running one query end to end (what `dirigo run` does), and the
//! `dirigo bench nexmark` suite: each query at full speed with the null sink, then
//! paced at half that rate for latency. The baseline, measured in the same run, is
//! the bare generator on the same number of threads: how fast events can be made
//! at all, so each query's throughput is also reported as a fraction of it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirigo_engine::dataflow::graph::SinkFactory;
use dirigo_engine::dataflow::{Dataflow, DataflowConfig, JobReport};
use dirigo_engine::nexmark::queries::{build, EventSource, NullSink, QueryOptions, Row, QUERIES};
use dirigo_engine::nexmark::{Generator, GeneratorConfig};
use serde::Serialize;

use crate::machine::Machine;
use crate::BenchError;

/// One query run.
#[derive(Clone)]
pub struct RunConfig {
    pub query: String,
    pub cores: usize,
    pub source: EventSource,
    pub sink: SinkFactory<Row>,
    pub sink_parallelism: u32,
    pub rate_events_per_s: Option<u64>,
    pub slo: Duration,
    /// Called about four times a second with (records in so far, outputs so far).
    pub progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
    pub time_limit: Duration,
}

/// What one run measured.
#[derive(Serialize, Clone, Debug)]
pub struct RunReport {
    pub query: String,
    pub cores: usize,
    pub events: u64,
    /// Malformed input lines skipped (`--skip-malformed`).
    pub skipped: u64,
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
pub fn run_query(config: &RunConfig) -> Result<RunReport, BenchError> {
    let mut engine_config = DataflowConfig::default();
    engine_config.runtime.shards = config.cores;
    let mut dataflow = Dataflow::start(engine_config).map_err(|e| BenchError(e.to_string()))?;
    let cores = dataflow.shards() as u32;
    let options = QueryOptions {
        source: config.source.clone(),
        source_parallelism: cores,
        parallelism: 2 * cores,
        slo: config.slo,
        rate_events_per_s: config.rate_events_per_s,
        sink: config.sink.clone(),
        sink_parallelism: config.sink_parallelism,
    };
    let job = build(&config.query, &options).map_err(BenchError)?;
    let handle = dataflow.submit(job).map_err(BenchError)?;
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
            progress(
                metrics.source_records.load(Ordering::Relaxed),
                metrics.outputs.load(Ordering::Relaxed),
            );
        }
    }
    let report = handle.wait(config.time_limit).map_err(BenchError)?;
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
        elapsed_s,
        events_per_s,
        events_per_s_per_core: events_per_s / cores as f64,
        outputs: report.outputs,
        latency_us: latency(&report),
        deadline_misses: job.deadline_misses,
        messages: job.messages,
        queue_us_p99: job.queue_us.value_at_quantile(0.99),
        stalls: stats.stalls(),
    })
}

/// `dirigo bench nexmark` options.
pub struct SuiteConfig {
    pub cores: usize,
    pub events: u64,
    pub queries: Vec<String>,
    /// Seconds of paced input for the latency measurement.
    pub latency_seconds: f64,
}

#[derive(Serialize, Debug)]
pub struct QueryFigures {
    pub events_per_s: f64,
    pub events_per_s_per_core: f64,
    /// Throughput as a fraction of the bare generator's (the baseline).
    pub generator_ratio: f64,
    pub latency_rate_events_per_s: u64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_p999: u64,
    pub latency_us_max: u64,
}

#[derive(Serialize, Debug)]
pub struct SuiteReport {
    pub cores: usize,
    pub machine: String,
    pub events: u64,
    pub generator_events_per_s: f64,
    pub queries: std::collections::BTreeMap<String, QueryFigures>,
}

/// Events per second of the bare generator on `cores` threads (the baseline).
pub fn generator_baseline(cores: usize, events: u64) -> f64 {
    let generator =
        Arc::new(Generator::new(GeneratorConfig::default()).expect("default config is valid"));
    let started = Instant::now();
    let threads: Vec<_> = dirigo_engine::nexmark::split(events, cores.max(1))
        .into_iter()
        .map(|range| {
            let generator = generator.clone();
            std::thread::spawn(move || {
                let mut batch = Vec::with_capacity(1024);
                let mut n = range.start;
                let mut checksum = 0u64;
                while n < range.end {
                    let end = (n + 1024).min(range.end);
                    batch.clear();
                    generator.fill(n..end, &mut batch);
                    checksum = checksum.wrapping_add(batch.len() as u64);
                    n = end;
                }
                checksum
            })
        })
        .collect();
    let made: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    made as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

pub fn run_suite(config: &SuiteConfig) -> Result<SuiteReport, BenchError> {
    let machine = Machine::detect();
    let null: SinkFactory<Row> = Arc::new(|_| Box::new(NullSink));
    let generator_events_per_s = generator_baseline(config.cores, config.events);
    let mut queries = std::collections::BTreeMap::new();
    for query in &config.queries {
        if !QUERIES.contains(&query.as_str()) {
            return Err(BenchError(format!(
                "unknown query {query:?}; the queries are {}",
                QUERIES.join(", ")
            )));
        }
        eprintln!(
            "bench nexmark: {query} at full speed over {} events",
            config.events
        );
        let full = run_query(&RunConfig {
            query: query.clone(),
            cores: config.cores,
            source: EventSource::Generator {
                config: GeneratorConfig::default(),
                events: config.events,
            },
            sink: null.clone(),
            sink_parallelism: config.cores as u32,
            rate_events_per_s: None,
            slo: Duration::from_millis(100),
            progress: None,
            time_limit: Duration::from_secs(600),
        })?;
        let rate = ((full.events_per_s / 2.0) as u64).max(1);
        let paced_events = ((rate as f64 * config.latency_seconds) as u64).max(1);
        eprintln!("bench nexmark: {query} paced at {rate} events/s for latency");
        let paced = run_query(&RunConfig {
            query: query.clone(),
            cores: config.cores,
            source: EventSource::Generator {
                config: GeneratorConfig {
                    events_per_second: rate,
                    ..GeneratorConfig::default()
                },
                events: paced_events,
            },
            sink: null.clone(),
            sink_parallelism: config.cores as u32,
            rate_events_per_s: Some(rate),
            slo: Duration::from_millis(100),
            progress: None,
            time_limit: Duration::from_secs(600),
        })?;
        queries.insert(
            query.clone(),
            QueryFigures {
                events_per_s: full.events_per_s,
                events_per_s_per_core: full.events_per_s_per_core,
                generator_ratio: full.events_per_s / generator_events_per_s.max(1e-9),
                latency_rate_events_per_s: rate,
                latency_us_p50: paced.latency_us.p50,
                latency_us_p99: paced.latency_us.p99,
                latency_us_p999: paced.latency_us.p999,
                latency_us_max: paced.latency_us.max,
            },
        );
    }
    Ok(SuiteReport {
        cores: config.cores,
        machine: machine.machine.clone(),
        events: config.events,
        generator_events_per_s,
        queries,
    })
}
